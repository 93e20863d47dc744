"""`spacetime --help` is ours (commands, stage flags, config groups; Hydra's flags still work)
and Hydra's shell completion works after a subcommand (`spacetime run train.l<TAB>`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import SUBCOMMANDS, completion_line

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("args", [("--help",), ("run", "--help"), ("status", "-h")])
def test_help_lists_commands_and_stage_flags_and_is_short(args):
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) < 80
    assert lines[0].startswith("usage: spacetime")
    for cmd in SUBCOMMANDS:
        assert f"  {cmd}" in r.stdout or f"| {cmd}" in r.stdout, cmd
    for flag in ("--only S", "--from S", "--until S", "--cfg job", "--hydra-help", "-sc install=bash"):
        assert flag in r.stdout
    assert "model: 3b, base, large, small, tiny, xl" in r.stdout and "model/text:" in r.stdout
    assert "num_videos" not in r.stdout  # not Hydra's config dump


def test_hydras_own_help_still_works():
    r = cli("run", "--hydra-help")
    assert r.returncode == 0 and "--shell-completion" in r.stdout and "--cfg" in r.stdout


@pytest.mark.parametrize("line, hydra_line, commands", [
    ("spacetime run train.l", "spacetime train.l", []),
    ("spacetime run --only train model=", "spacetime model=", []),
    ("spacetime run a=1 ", "spacetime a=1 ", []),
    ("spacetime r", "spacetime r", ["run", "report"]),
    ("spacetime ", "spacetime ", list(SUBCOMMANDS)),
    ("spacetime submit --follow --address http://h:1 train.data.k", "spacetime train.data.k", []),
    ("spacetime report RUN1 --embed-videos eval.f", "spacetime eval.f", []),
    ("spacetime generate a cat --seconds 2 train.l", "spacetime train.l", []),
    ("spacetime run --only ", "spacetime ", []),  # an unfinished flag: what parses
])
def test_completion_line_drops_the_subcommand_and_our_flags(line, hydra_line, commands):
    got, cmds, _ = completion_line(line)
    assert got == hydra_line and cmds == commands


def test_completion_of_a_flag_offers_ours():
    assert completion_line("spacetime run --o") == (None, ["--only"], "run")
    r = cli("-sc", "query=bash", env={"COMP_LINE": "spacetime run --", "COMP_POINT": "16"})
    assert r.returncode == 0 and {"--only", "--from", "--until", "--cfg"} <= set(r.stdout.split())


def test_completion_after_a_subcommand_through_hydras_protocol():
    """What the script of `-sc install=bash` runs: COMP_LINE in the environment, `-sc query=bash`."""
    for line in ("spacetime run train.l", "spacetime status --help train.l"):
        r = cli("-sc", "query=bash", env={"COMP_LINE": line, "COMP_POINT": str(len(line))})
        assert r.returncode == 0, r.stderr
        assert "train.lr=" in r.stdout.split(), r.stdout
    r = cli("-sc", "query=bash", env={"COMP_LINE": "spacetime plan gp", "COMP_POINT": "17"})
    assert "gpu=" in r.stdout.split()  # plan completes against its own config


@pytest.mark.skipif(not (BIN / "spacetime").exists() or not shutil.which("bash"),
                    reason="needs bash and the installed spacetime entry point")
def test_bash_completion_offers_train_lr_after_run():
    script = ('eval "$(spacetime -sc install=bash)"; COMP_LINE="spacetime run train.l"; '
              'COMP_POINT=${#COMP_LINE}; COMP_CWORD=2; hydra_bash_completion; echo "${COMPREPLY[@]}"')
    r = subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["train.log_every=", "train.lr="]
