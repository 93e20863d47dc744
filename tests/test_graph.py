"""Run-graph semantics on small fake stages: caching, forced reruns, invalidation, crashes."""

from __future__ import annotations

import json

import pytest
from conftest import Recorder

from pipeline.graph import FAILED, INFO, RUNNING, SUCCESS, Graph, GraphError, Stage, StageFailed
from data.tracking import MemoryTracker


@pytest.fixture
def setup(tmp_path):
    rec = Recorder()
    stages = [
        Stage("a", rec.stage("a"), config_keys=("a",), exclude=("a.workers",)),
        Stage("b", rec.stage("b"), inputs=("a",), config_keys=("b",)),
        Stage("c", rec.stage("c"), inputs=("b",), config_keys=("c",)),
        Stage("d", rec.stage("d"), inputs=("a",), config_keys=("d",)),
    ]
    graph = Graph(stages, tmp_path / "out")
    cfg = {"a": {"x": 1, "workers": 2}, "b": {"y": 1}, "c": {"z": 1}, "d": {"w": 1}}
    trackers: list[MemoryTracker] = []

    def factory(ctx):
        trackers.append(MemoryTracker())
        return trackers[-1]

    def run(cfg=cfg, **kw):
        return graph.run(cfg, cfg, "run-test", tracker_factory=factory, log=lambda s: None, **kw)

    return rec, graph, cfg, run, trackers


def states(graph, cfg):
    return {r.name: r.state for r in graph.status(cfg)}


def test_runs_in_dependency_order_then_caches(setup):
    rec, graph, cfg, run, trackers = setup
    assert set(states(graph, cfg).values()) == {"pending"}
    lineage = run()
    assert rec.calls.index("a") < rec.calls.index("b") < rec.calls.index("c")
    assert sorted(rec.calls) == ["a", "b", "c", "d"]
    assert all(s["state"] == "done" for s in lineage["stages"].values())
    assert set(states(graph, cfg).values()) == {"done"}
    assert all(t.finished and t.artifacts for t in trackers)  # one tracker run per execution
    rec.calls.clear()
    lineage = run()
    assert rec.calls == []
    assert all(s["state"] == "cached" for s in lineage["stages"].values())
    assert set(states(graph, cfg).values()) == {"cached"}


def test_info_json_explains_the_output(setup):
    rec, graph, cfg, run, _ = setup
    run()
    h = graph.hashes(cfg)
    info = json.loads((graph.stage_dir("b", h["b"]) / INFO).read_text())
    assert info["hash"] == h["b"]
    assert info["config"] == {"b": {"y": 1}}
    assert info["inputs"] == {"a": str(graph.stage_dir("a", h["a"]))}
    assert info["input_hashes"] == {"a": h["a"]}
    assert info["duration_s"] >= 0 and info["run_id"] == "run-test"


def test_only_reruns_one_stage(setup):
    rec, graph, cfg, run, _ = setup
    run()
    rec.calls.clear()
    run(only="b")
    assert rec.calls == ["b"]  # forced even though cached; downstream c is not rerun


def test_from_reruns_stage_and_downstream(setup):
    rec, graph, cfg, run, _ = setup
    run()
    rec.calls.clear()
    run(from_="b")
    assert rec.calls == ["b", "c"]
    rec.calls.clear()
    run(from_="a")
    assert sorted(rec.calls) == ["a", "b", "c", "d"]


def test_only_runs_missing_upstream_first(setup):
    rec, graph, cfg, run, _ = setup
    run(only="c")
    assert rec.calls == ["a", "b", "c"]


def test_config_change_invalidates_stage_and_downstream_only(setup):
    rec, graph, cfg, run, _ = setup
    run()
    rec.calls.clear()
    cfg2 = {**cfg, "b": {"y": 2}}
    st = states(graph, cfg2)
    assert st == {"a": "done", "b": "stale", "c": "stale", "d": "done"}
    run(cfg2)
    assert rec.calls == ["b", "c"]


def test_excluded_key_does_not_change_hash(setup):
    rec, graph, cfg, run, _ = setup
    run()
    rec.calls.clear()
    run({**cfg, "a": {"x": 1, "workers": 8}})
    assert rec.calls == []
    run({**cfg, "a": {"x": 2, "workers": 2}})
    assert sorted(rec.calls) == ["a", "b", "c", "d"]


def test_crash_leaves_no_marker_and_is_redone(setup):
    rec, graph, cfg, run, _ = setup
    rec.crash.add("b")
    with pytest.raises(StageFailed, match="b exploded"):
        run()
    h = graph.hashes(cfg)
    b_dir = graph.stage_dir("b", h["b"])
    assert not (b_dir / SUCCESS).exists() and not (b_dir / RUNNING).exists()
    assert "b exploded" in json.loads((b_dir / FAILED).read_text())["error"]
    assert (b_dir / "partial.txt").exists()  # partial output stays, but is not complete
    st = states(graph, cfg)
    assert st["a"] == "done" and st["b"] == "failed" and st["c"] == "pending"
    assert "c" not in rec.calls  # downstream of a failure does not run
    rec.crash.clear()
    rec.calls.clear()
    run()
    assert "a" not in rec.calls and rec.calls[0] == "b"
    assert (b_dir / SUCCESS).exists() and not (b_dir / FAILED).exists()


def test_forced_rerun_that_crashes_does_not_leave_the_old_marker(setup):
    rec, graph, cfg, run, _ = setup
    run()
    rec.crash.add("b")
    with pytest.raises(StageFailed):
        run(only="b")
    assert states(graph, cfg)["b"] == "failed"


def test_killed_process_shows_failed(setup):
    rec, graph, cfg, run, _ = setup
    h = graph.hashes(cfg)
    d = graph.stage_dir("a", h["a"])
    d.mkdir(parents=True)
    import socket

    (d / RUNNING).write_text(json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname()}))
    assert states(graph, cfg)["a"] == "failed"


def test_bad_requests_fail_before_any_stage(setup):
    rec, graph, cfg, run, _ = setup
    with pytest.raises(GraphError, match="unknown stage 'x'; stages are: a, b, c, d"):
        run(only="x")
    with pytest.raises(GraphError, match="one of --only, --from and --until"):
        run(only="a", from_="b")
    assert rec.calls == []
    with pytest.raises(GraphError, match="cycle"):
        Graph([Stage("p", lambda c: None, inputs=("q",)),
               Stage("q", lambda c: None, inputs=("p",))], "x")


def test_stage_cannot_read_unhashed_section(tmp_path):
    def sneaky(ctx):
        ctx.section("b")

    graph = Graph([Stage("a", sneaky, config_keys=("a",))], tmp_path)
    cfg = {"a": {}, "b": {}}
    with pytest.raises(StageFailed, match="not in its hash"):
        graph.run(cfg, cfg, "r", log=lambda s: None)


def test_local_root_gives_stages_their_paths_as_urls(tmp_path):
    seen = {}

    def b(ctx):
        seen.update(out_url=ctx.out_url, out_dir=ctx.out_dir, urls=ctx.input_urls,
                    inputs=ctx.inputs)

    graph = Graph([Stage("a", lambda ctx: None), Stage("b", b, inputs=("a",))], tmp_path / "r")
    graph.run({}, {}, "r", log=lambda s: None)
    assert graph.local_root == graph.root == tmp_path / "r"  # no staging, no cache
    assert seen["out_url"] == str(seen["out_dir"])
    assert seen["out_dir"].parent == tmp_path / "r" / "stages"
    assert seen["urls"] == {"a": str(seen["inputs"]["a"])}


def test_a_stage_can_hash_and_read_a_subsection_alone(tmp_path):
    """config_keys "m.text": only that part of m is hashed (nested, with its exclusions) and
    readable; the rest of m is neither."""
    seen = {}

    def fn(ctx):
        seen["text"] = ctx.section("m.text")
        seen["deeper"] = ctx.section("m.text.kind")  # inside a hashed subsection
        ctx.section("m")

    g = Graph([Stage("p", fn, config_keys=("lat", "m.text"), exclude=("m.text.cache",))], tmp_path)
    cfg = {"lat": {"a": 1}, "m": {"dit": {"w": 1}, "text": {"kind": "clip", "cache": 0}}}
    assert g.hashed_config("p", cfg) == {"lat": {"a": 1}, "m": {"text": {"kind": "clip"}}}
    h = g.hashes(cfg)["p"]
    assert g.hashes({**cfg, "m": {**cfg["m"], "dit": {"w": 2}}})["p"] == h  # outside the subsection
    assert g.hashes({**cfg, "m": {**cfg["m"], "text": {"kind": "clip", "cache": 9}}})["p"] == h  # excluded
    assert g.hashes({**cfg, "m": {**cfg["m"], "text": {"kind": "t5", "cache": 0}}})["p"] != h
    with pytest.raises(StageFailed, match="reads config section 'm' that is not in its hash"):
        g.run(cfg, cfg, "r", log=lambda s: None)
    assert seen == {"text": cfg["m"]["text"], "deeper": "clip"}
