"""Hydra multirun as Hydra users run it: `spacetime run -m train.lr=1e-3,2e-3` makes one run per
job (its own run id and lineage, the sweep recorded in each), Hydra's sweep directory under
run.root (nothing left in the working directory), and `spacetime status --sweep` shows the
jobs side by side. The sweep runs a real graph up to its cheapest stage (`--until source`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data.storage import Store
from pipeline.cli import parse_argv
from pipeline.sweep import run_id_for, table

REPO = Path(__file__).resolve().parent.parent
SWEEP = "20260101-000000-5eed"
SECRET = "literal-s3cr3t-value"


def spacetime(*args, cwd: Path, env=None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "SPACETIME_RUN_ID")}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**base, "PYTHONPATH": str(REPO), **(env or {})})


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("sweep")
    root = cwd / "out"
    r = spacetime("run", "-m", "experiment=tiny", "--until", "source", "tracking=disabled",
                  f"run.root={root}", "train.lr=1e-3,2e-3", f"+ingest.storage_options.secret={SECRET}",
                  cwd=cwd, env={"SPACETIME_RUN_ID": SWEEP})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return cwd, root, r


def test_each_job_is_its_own_run_with_the_sweep_in_its_lineage(sweep):
    cwd, root, r = sweep
    runs = sorted(p.name for p in (root / "runs").iterdir() if p.is_dir())
    assert runs == [f"{SWEEP}-0", f"{SWEEP}-1"]
    lin = [json.loads((root / "runs" / n / "lineage.json").read_text()) for n in runs]
    assert [x["run_id"] for x in lin] == runs
    assert [x["config"]["train"]["lr"] for x in lin] == [1e-3, 2e-3]  # neither overwrote the other
    for job, x in enumerate(lin):
        s = x["sweep"]
        assert (s["id"], s["job"]) == (SWEEP, job) and x["ok"]
        assert f"train.lr={x['config']['train']['lr']}" in s["overrides"]
        assert Path(s["dir"]) == root / "sweeps" / SWEEP
        job_json = json.loads((root / "sweeps" / SWEEP / str(job) / "job.json").read_text())
        assert job_json["run_id"] == runs[job] and job_json["overrides"] == s["overrides"]
    assert lin[0]["stages"]["source"]["state"] == "done" and lin[1]["stages"]["source"]["state"] == "cached"
    assert lin[0]["stages"]["train"]["hash"] != lin[1]["stages"]["train"]["hash"]
    assert json.loads((root / "runs" / "latest.json").read_text())["run_id"] == f"{SWEEP}-1"
    # Hydra's sweep output is under run.root, none in the working directory
    assert (root / "sweeps" / SWEEP / "multirun.yaml").exists()
    assert sorted(p.name for p in cwd.iterdir()) == ["out"]
    # what the sweep wrote holds no credential given on its command line (Hydra's file neither)
    written = [p for p in (root / "sweeps").rglob("*") if p.is_file()] + list((root / "runs").rglob("*.json"))
    assert len(written) >= 6 and not [p for p in written if SECRET in p.read_text()]
    assert "storage_options" in (root / "sweeps" / SWEEP / "multirun.yaml").read_text()


def rows_of(text: str) -> list[list[str]]:
    return [s.split() for s in text.splitlines() if s.startswith(("0 ", "1 "))]


def test_status_shows_the_sweeps_jobs_side_by_side(sweep):
    cwd, root, _ = sweep
    r = spacetime("status", "--sweep", f"run.root={root}", cwd=cwd)  # the latest sweep
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"sweep {SWEEP}: 2 jobs")
    assert "common overrides: experiment=tiny tracking=disabled" in r.stdout
    assert "+ingest.storage_options.secret='<redacted>'" in r.stdout and SECRET not in r.stdout
    header = next(s for s in lines if s.startswith("job "))
    assert "source " in header and "train*" in header and "eval*" in header  # the sweep changed train
    rows = rows_of(r.stdout)
    assert [row[:3] for row in rows] == [["0", f"{SWEEP}-0", "ok"], ["1", f"{SWEEP}-1", "ok"]]
    assert [row[4] for row in rows] == ["done", "cached"]  # source, per job
    assert [row[-1] for row in rows] == ["train.lr=0.001", "train.lr=0.002"]
    assert table(Store(root), SWEEP) == r.stdout.rstrip("\n")  # by its id, the same


def test_status_of_a_config_points_at_the_sweep_of_its_latest_run(sweep, capsys):
    from hydra import compose, initialize_config_dir

    from pipeline.cli import cmd_status
    from pipeline.config import CONF_DIR, register, to_dict, to_object
    from pipeline.stages import graph_for

    _, root, _ = sweep
    register()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        c = compose("config", overrides=["experiment=tiny", f"run.root={root}", "train.lr=2e-3"])
    assert cmd_status(graph_for(to_object(c)), to_dict(c)) == 0
    assert f"job 1 of sweep {SWEEP}: spacetime status --sweep {SWEEP}" in capsys.readouterr().out


def test_an_unknown_sweep_names_the_known_ones(sweep, tmp_path):
    _, root, _ = sweep
    with pytest.raises(ValueError, match=f"no sweep 'nope' under .*; sweeps: {SWEEP}$"):
        table(Store(root), "nope")
    with pytest.raises(ValueError, match="no sweeps under .*run `spacetime run -m"):
        table(Store(tmp_path), None)


def test_a_sweeps_jobs_get_their_own_ids_and_run_id_is_refused_in_one():
    job = {"id": SWEEP, "job": 3}
    assert run_id_for(job, None, SWEEP) == f"{SWEEP}-3"  # SPACETIME_RUN_ID names the sweep
    assert run_id_for(None, "mine", None) == "mine" and run_id_for(None, "mine", "env") == "env"
    with pytest.raises(ValueError, match="run.id=mine names one run"):
        run_id_for(job, "mine", None)


@pytest.mark.parametrize("argv, sweep, rest", [
    (["status", "--sweep"], "latest", []),
    (["status", "--sweep", "abc", "run.root=x"], "abc", ["run.root=x"]),
    (["status", "--sweep=abc"], "abc", []),
    (["status", "--sweep", "run.root=x"], "latest", ["run.root=x"]),
    (["status", "--sweep", "--cfg", "job"], "latest", ["--cfg", "job"]),
    (["status", "run.root=x"], None, ["run.root=x"]),
])
def test_the_sweep_flag_takes_an_optional_id(argv, sweep, rest):
    cmd, flags, got = parse_argv(argv)
    assert cmd == "status" and flags["sweep"] == sweep and got == rest
