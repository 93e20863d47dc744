"""The tracker interface: JSONL record, in-memory, W&B offline files, rank-0-only logging."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data.tracking import (JsonlTracker, MemoryTracker, NullTracker, Tee, Tracker, TrackerSpec,
                               make_tracker, resolve_mode)


def spec(tmp_path: Path, mode: str) -> TrackerSpec:
    return TrackerSpec(mode=mode, project="spacetime-test", entity=None, dir=str(tmp_path),
                       group="run-123", job_type="train", name="train-abc", config={"lr": 0.1},
                       tags=[], jsonl=str(tmp_path / "metrics.jsonl"))


def test_auto_mode_follows_the_api_key(monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert resolve_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode("auto") == "online"
    assert resolve_mode("disabled") == "disabled"
    with pytest.raises(ValueError, match="tracking.mode"):
        resolve_mode("sometimes")


def test_only_rank_zero_logs(tmp_path):
    assert isinstance(make_tracker(spec(tmp_path, "disabled"), rank=1), NullTracker)


def test_disabled_mode_still_writes_the_jsonl_record(tmp_path):
    t = make_tracker(spec(tmp_path, "disabled"))
    assert isinstance(t, JsonlTracker)
    t.log({"loss": 1.5}, step=3)
    t.summary({"final": 2})
    recs = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert recs[0]["kind"] == "metrics" and recs[0]["step"] == 3
    assert recs[0]["metrics"] == {"loss": 1.5}
    assert recs[1] == {**recs[1], "kind": "summary", "values": {"final": 2}}
    assert not list(tmp_path.glob("wandb"))


def test_tee_fans_out_and_memory_tracker_records():
    a, b = MemoryTracker(), MemoryTracker()
    t = Tee(a, b)
    t.log({"x": 1}, step=0)
    t.log_artifact("shard-abc", "shard", "/data")
    t.log_histograms({"h": {"edges": [0, 1, 2], "counts": [5, 6]}})
    t.finish()
    for m in (a, b):
        assert m.metrics == [(0, {"x": 1})] and m.artifacts == [("shard-abc", "shard", "/data")]
        assert m.histograms == {"h": {"edges": [0, 1, 2], "counts": [5, 6]}}
        assert m.finished


def test_wandb_offline_run_is_written_with_group_and_job_type(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "_SUCCESS.json").write_text(json.dumps({"hash": "f" * 64}))
    t = make_tracker(spec(tmp_path, "auto"))
    t.log({"train/loss": 0.5}, step=0)
    hist = {"curate/hist/motion": {"edges": [0.0, 0.5, 1.0, 2.0], "counts": [3, 0, 4]}}
    t.log_histograms(hist, step=1)
    t.use_artifact("shard-ffffffffffff", "shard", str(tmp_path / "in"))
    t.log_artifact("train-abc", "train", str(tmp_path / "in"))
    info = t.info()
    t.finish()
    assert info["wandb_mode"] == "offline"
    run_dir = Path(info["wandb_dir"])
    assert run_dir.parent == tmp_path / "wandb" and run_dir.name.startswith("offline-run-")
    from wandb_offline import history, records

    recs = records(run_dir)  # the offline file, read back record by record
    (run,) = [r.run for r in recs if r.WhichOneof("record_type") == "run"]
    assert run.run_group == "run-123" and run.job_type == "train"
    rows = history(run_dir)
    assert rows[0]["train/loss"] == 0.5 and rows[0]["_step"] == 0
    config = {i.key: json.loads(i.value_json) for c in [run.config] + [
        r.config for r in recs if r.WhichOneof("record_type") == "config"] for i in c.update}
    assert config["lr"] == 0.1 and "shard-ffffffffffff" in config["_inputs"]  # offline lineage
    assert "WANDB_API_KEY" not in (tmp_path / "metrics.jsonl").read_text()
    # a real W&B histogram (what a dashboard plots), read back from the run; and in the JSONL
    (row,) = [r for r in rows if "curate/hist/motion" in r]
    assert row["_step"] == 1 and row["curate/hist/motion"] == {
        "_type": "histogram", "bins": [0.0, 0.5, 1.0, 2.0], "values": [3, 0, 4]}
    recs = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"kind": "histograms", "step": 1, "histograms": hist}.items() <= [
        r for r in recs if r["kind"] == "histograms"][0].items()


def test_wandb_table_of_videos_beside_their_prompts(tmp_path, monkeypatch):
    """The eval stage's samples table: Path cells become W&B videos. W&B keeps a logged table
    with media as a run-table artifact: the table file plus every video, each cell naming
    its video, which is what `wandb sync` uploads."""
    import numpy as np

    from data.video_io import write_mp4
    from wandb_offline import records

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    paths = []
    for i, c in enumerate([(200, 30, 30), (30, 180, 60)]):
        paths.append(tmp_path / f"sample-{i:02d}.mp4")
        write_mp4(paths[-1], np.full((8, 32, 32, 3), c, np.uint8), fps=8)
    t = make_tracker(spec(tmp_path, "offline"))
    t.log_table("samples", ["step", "prompt", "video", "color"],
                [[10, "one red circle", paths[0], True], [10, "two green squares", paths[1], False]])
    run_dir = Path(t.info()["wandb_dir"])
    t.finish()
    (art,) = [r.artifact for r in records(run_dir) if r.WhichOneof("record_type") == "artifact"]
    assert art.type == "run_table" and art.name.endswith("-samples")
    files = {e.path: Path(e.local_path) for e in art.manifest.contents}
    table = json.loads(files.pop("samples.table.json").read_text())
    assert table["columns"] == ["step", "prompt", "video", "color"]
    assert [r[1] for r in table["data"]] == ["one red circle", "two green squares"]
    cells = [r[2] for r in table["data"]]
    assert [c["_type"] for c in cells] == ["video-file"] * 2
    assert sorted(c["path"] for c in cells) == sorted(files)  # the two videos, nothing else
    for c, src in zip(cells, paths):
        assert files[c["path"]].read_bytes() == src.read_bytes()


class MarkerProbe(Tracker):
    """A tracker that notes, at each artifact call, which graph markers its directory holds."""

    def __init__(self):
        self.seen: list[tuple[str, str, set[str]]] = []

    def log_artifact(self, name, type, path):
        self.seen.append(("log", name, {p.name for p in Path(path).glob("_*.json")}))

    def use_artifact(self, name, type, path):
        self.seen.append(("use", name, {p.name for p in Path(path).glob("_*.json")}))


def test_offline_lineage_is_recorded_for_sync_as_artifact_uses(tmp_path, monkeypatch):
    """A graph a -> b -> c (c also reads a) with real offline W&B runs. Each downstream run's
    transaction log holds, per input, the producer's artifact (same name, type and digest: the
    same files) flagged as `use_artifact` flags a draft, which `wandb sync` uploads as a use of
    the producer's version. Artifacts are logged once `_SUCCESS.json` is written and hold no
    marker (`_RUNNING.json`) nor info.json."""
    from conftest import Recorder
    from wandb_offline import records

    from pipeline.graph import Graph, Stage

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    rec = Recorder(blob=True)
    graph = Graph([Stage("a", rec.stage("a")), Stage("b", rec.stage("b"), inputs=("a",)),
                   Stage("c", rec.stage("c"), inputs=("b", "a"))], tmp_path / "out")
    probes: dict[str, MarkerProbe] = {}

    def factory(ctx):
        probes[ctx.stage.name] = MarkerProbe()
        s = TrackerSpec(mode="offline", project="spacetime-test", entity=None, dir=str(tmp_path),
                        group="run-1", job_type=ctx.stage.name, name=f"{ctx.stage.name}-{ctx.stage_hash[:8]}",
                        config={}, tags=[], jsonl=str(ctx.out_dir / "metrics.jsonl"))
        return Tee(make_tracker(s), probes[ctx.stage.name])

    lineage = graph.run({}, {}, "run-1", tracker_factory=factory, log=lambda s: None)
    h = {n: r["hash"][:12] for n, r in lineage["stages"].items()}
    for name, probe in probes.items():  # each call saw a complete output, not a running one
        assert probe.seen and all(markers == {"_SUCCESS.json"} for _, _, markers in probe.seen), probe.seen
    arts = {}
    for name, rec_ in lineage["stages"].items():
        run_dir = Path(rec_["result"]["tracking"]["wandb_dir"])
        arts[name] = [r.artifact for r in records(run_dir) if r.WhichOneof("record_type") == "artifact"]
    outputs = {}
    for name, found in arts.items():
        (out,) = [a for a in found if not a.use_after_commit]
        assert (out.name, out.type, out.user_created) == (f"{name}-{h[name]}", name, False)
        files = {e.path for e in out.manifest.contents}
        assert {"out.txt", "partial.txt", "sub/out.bin", "metrics.jsonl"} == files, files
        outputs[name] = out
    for name, inputs in (("a", []), ("b", ["a"]), ("c", ["b", "a"])):
        used = [a for a in arts[name] if a.use_after_commit]
        assert sorted(a.name for a in used) == sorted(f"{i}-{h[i]}" for i in inputs)
        for a in used:
            src = outputs[a.type]
            assert a.user_created and a.type == src.type and a.digest == src.digest
            assert {(e.path, e.digest) for e in a.manifest.contents} == {
                (e.path, e.digest) for e in src.manifest.contents}
    for found in arts.values():
        for a in found:
            names = {e.path.rsplit("/", 1)[-1] for e in a.manifest.contents}
            assert not names & {"_RUNNING.json", "_SUCCESS.json", "info.json"}
