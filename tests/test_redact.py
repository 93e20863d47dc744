"""Credentials in the config stay out of every file a run writes and still reach the code.

A real run through the CLI (``--until source``, W&B offline) lists a manifest from a real HTTP
server on 127.0.0.1 that answers only with the right ``Authorization`` header, given in
``ingest.storage_options``; then ``spacetime report``. The header's secret is a random sentinel
that must appear in no file under run.root (lineage.json, info.json, W&B's offline run, the
report) nor in the CLI's output, while the listed input proves the server got it."""

from __future__ import annotations

import http.server
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import serve_http
from hydra.core.override_parser.overrides_parser import OverridesParser

from pipeline.graph import Graph, Stage, StageContext, StageFailed
from data.redact import REDACTED, credential_overrides, redact
from pipeline.report import write_report
from pipeline.submit import SubmitError, build_submission
from data.tracking import TrackingConfig, spec_for

SENTINEL = "storage-sentinel-" + secrets.token_hex(8)
REPO = Path(__file__).resolve().parent.parent


def files_holding(root: Path, needle: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()
            and needle.encode() in p.read_bytes()]


# ----- the rules --------------------------------------------------------------------------
def test_credential_keys_are_redacted_at_any_depth_and_the_rest_is_kept():
    cfg = {"ingest": {"storage_options": {
        "key": SENTINEL, "secret": SENTINEL, "token": "${oc.env:GCS_TOKEN}",
        "endpoint_url": "http://127.0.0.1:9000", "anon": False,
        "client_kwargs": {"aws_secret_access_key": SENTINEL, "region_name": "eu-west-1"},
        "headers": {"Authorization": f"Bearer {SENTINEL}", "Accept": "text/plain"}}},
        "embed": {"frames_key": "frames", "caption_key": "caption"},
        "caption": {"max_new_tokens": 128}, "deepspeed": {"extra": {"api_key": SENTINEL}},
        "secrets_seen": ["AWS_SECRET_ACCESS_KEY"]}
    out = redact(cfg)
    assert SENTINEL not in json.dumps(out)
    so = out["ingest"]["storage_options"]
    assert so["key"] == so["secret"] == so["headers"]["Authorization"] == REDACTED
    assert so["client_kwargs"] == {"aws_secret_access_key": REDACTED, "region_name": "eu-west-1"}
    assert so["token"] == "${oc.env:GCS_TOKEN}"  # a reference names the secret's source only
    assert (so["endpoint_url"], so["anon"], so["headers"]["Accept"]) == (
        "http://127.0.0.1:9000", False, "text/plain")
    assert out["embed"] == cfg["embed"] and out["caption"] == cfg["caption"]
    assert out["deepspeed"]["extra"]["api_key"] == REDACTED  # credential words anywhere
    assert out["secrets_seen"] == ["AWS_SECRET_ACCESS_KEY"]  # names, not values
    assert cfg["ingest"]["storage_options"]["key"] == SENTINEL  # the input is not changed


def test_command_line_overrides_are_redacted_and_stay_valid_overrides():
    argv = ["--until", "source", "train.lr=1e-4",
            f"ingest.storage_options.secret={SENTINEL}",
            f"+ingest.storage_options.headers.Authorization='Bearer {SENTINEL}'",
            f"ingest.storage_options={{key:{SENTINEL},endpoint_url:'http://h:9000/'}}",
            "ingest.storage_options.key=${oc.env:MY_KEY}"]
    out = redact(argv)
    assert SENTINEL not in json.dumps(out)
    assert out[:3] == argv[:3] and out[-1] == argv[-1]
    parser = OverridesParser.create()
    for arg in out[3:6]:  # each still parses, with only the credential replaced
        parser.parse_override(arg)
    assert parser.parse_override(out[5]).value() == {"key": REDACTED,
                                                     "endpoint_url": "http://h:9000/"}
    assert credential_overrides(argv) == ["ingest.storage_options.secret",
                                          "ingest.storage_options.headers.Authorization",
                                          "ingest.storage_options"]


def test_the_wandb_config_of_a_stage_is_redacted(tmp_path):
    stage = Stage("s", lambda ctx: None, config_keys=("ingest",))
    hashed = {"ingest": {"storage_options": {"secret": SENTINEL, "endpoint_url": "http://e"}}}
    ctx = StageContext(stage=stage, run_id="r", out_dir=tmp_path, inputs={}, stage_hash="0" * 64,
                       hashed_config=hashed, cfg=None)
    spec = spec_for(ctx, TrackingConfig(mode="offline"), str(tmp_path))
    assert SENTINEL not in json.dumps(spec.config)
    assert spec.config["ingest"]["storage_options"]["endpoint_url"] == "http://e"
    assert hashed["ingest"]["storage_options"]["secret"] == SENTINEL


def test_the_graph_writes_no_credential_even_from_a_stage_error(tmp_path):
    """The stage gets the real config; lineage.json, info.json and _FAILED.json (whose error
    quotes the secret, as a library's message might) get it redacted, and so does the log."""
    got = {}

    def quoting(ctx):
        got["secret"] = ctx.section("ingest")["storage_options"]["secret"]
        raise ValueError(f"the server refused secret={got['secret']}")

    cfg = {"ingest": {"storage_options": {"secret": SENTINEL, "endpoint_url": "http://e"}}}
    graph = Graph([Stage("s", quoting, config_keys=("ingest",))], tmp_path)
    logged = []
    with pytest.raises(StageFailed):
        graph.run(cfg, cfg, "r1", extra_info={"argv": [f"+ingest.storage_options.secret={SENTINEL}"]},
                  log=logged.append)
    assert got["secret"] == SENTINEL  # the code saw the real value
    assert files_holding(tmp_path, SENTINEL) == [] and SENTINEL not in " ".join(logged)
    failed = json.loads(next(tmp_path.glob("stages/s-*/_FAILED.json")).read_text())
    assert failed["error"] == f"ValueError: the server refused secret={REDACTED}"
    info = json.loads(next(tmp_path.glob("stages/s-*/info.json")).read_text())
    assert info["config"]["ingest"]["storage_options"] == {"secret": REDACTED, "endpoint_url": "http://e"}


def test_the_report_redacts_files_written_before_redaction(tmp_path):
    """A lineage.json from older code, with the secret in its config and argv."""
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    (run / "lineage.json").write_text(json.dumps({
        "run_id": "r1", "ok": True, "argv": [f"ingest.storage_options.secret={SENTINEL}"],
        "config": {"ingest": {"storage_options": {"secret": SENTINEL}}}, "stages": {}}))
    (tmp_path / "runs" / "latest.json").write_text(json.dumps({"run_id": "r1"}))
    page = write_report(tmp_path).read_text()
    assert SENTINEL not in page and "ingest.storage_options.secret=" in page


def test_submit_refuses_a_credential_in_the_command_line(monkeypatch):
    with pytest.raises(SubmitError, match=r"ingest\.storage_options\.secret .*'\$\{oc\.env:NAME\}'") as e:
        build_submission(["run.root=/shared/st", f"ingest.storage_options.secret={SENTINEL}"],
                         None, None, "http://127.0.0.1:8265", run_id="20260101-000000-abcd")
    assert SENTINEL not in str(e.value)
    monkeypatch.setenv("ST_TEST_SECRET", SENTINEL)  # by reference: accepted, and not in the job
    s = build_submission(["run.root=/shared/st", "+ingest.storage_options.secret=${oc.env:ST_TEST_SECRET}"],
                         None, None, "http://127.0.0.1:8265", run_id="20260101-000000-abcd")
    assert SENTINEL not in json.dumps({k: s[k] for k in ("entrypoint", "metadata", "runtime_env")})


# ----- a real run -----------------------------------------------------------------------------
@pytest.fixture
def guarded_http(tmp_path):
    """A manifest served on 127.0.0.1 only to requests with `Authorization: Bearer SENTINEL`."""
    www = tmp_path / "www"
    www.mkdir()
    (www / "inputs.jsonl").write_text(json.dumps({"path": "clip.mp4", "caption": "a red square"})
                                      + "\n")
    seen = {"authorized": 0, "refused": 0}

    class Guarded(http.server.SimpleHTTPRequestHandler):
        def _allowed(self) -> bool:
            ok = self.headers.get("Authorization") == f"Bearer {SENTINEL}"
            seen["authorized" if ok else "refused"] += 1
            if not ok:
                self.send_error(401)
            return ok

        def do_GET(self):
            if self._allowed():
                super().do_GET()

        def do_HEAD(self):
            if self._allowed():
                super().do_HEAD()

        def log_message(self, *args):
            pass

    with serve_http(Guarded, www) as url:
        yield url, seen


def spacetime(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(SPACETIME_RUN_ID="", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_a_run_uses_the_storage_secret_and_writes_it_nowhere(tmp_path, guarded_http):
    url, seen = guarded_http
    root = tmp_path / "root"
    common = [f"run.root={root}", "tracking.mode=offline"]
    r = spacetime("run", "--until", "source", "experiment=tiny", "source=ingest",
                  f"ingest.inputs=[{url}/inputs.jsonl]",
                  f"++ingest.storage_options={{headers:{{Authorization:'Bearer {SENTINEL}'}}}}",
                  *common, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # The code got the secret: the server answered, and the manifest's row was listed.
    assert seen["authorized"] >= 1 and seen["refused"] == 0
    (source,) = (root / "stages").glob("source-*")
    items = [json.loads(x) for x in (source / "inputs.jsonl").read_text().splitlines()]
    assert [i["url"] for i in items] == [f"{url}/clip.mp4"]
    assert "ingest.storage_options set on the command line" in r.stderr  # the warning, no value
    rep = spacetime("report", *common, cwd=tmp_path)
    assert rep.returncode == 0, rep.stderr[-3000:]
    # ... and wrote it nowhere: lineage.json, info.json, W&B's offline run, report.html, output.
    lineage = json.loads(next((root / "runs").glob("*/lineage.json")).read_text())
    assert lineage["config"]["ingest"]["storage_options"]["headers"]["Authorization"] == REDACTED
    assert any("storage_options" in a for a in lineage["argv"])
    wandb_runs = list((root / "wandb").glob("offline-run-*/run-*.wandb"))
    assert wandb_runs and (root / "runs" / lineage["run_id"] / "report.html").exists()
    assert files_holding(root, SENTINEL) == []
    assert SENTINEL not in r.stdout + r.stderr + rep.stdout + rep.stderr
