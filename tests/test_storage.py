"""Run state, stage outputs and checkpoints on an object store, against a real S3 API (moto's
server on loopback, through s3fs). Credentials and the endpoint come from the environment only.
"""

from __future__ import annotations

import json
import shutil
import uuid

import pytest
from conftest import Recorder

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from pipeline.graph import FAILED, INFO, RUNNING, SUCCESS, Graph, Stage, StageFailed  # noqa: E402
from data.storage import URL, Store  # noqa: E402


@pytest.fixture(scope="module")
def s3():
    """A local S3 endpoint; yields a function making a fresh bucket URL."""
    import s3fs

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as mp:
        for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(k, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_CONFIG_FILE", "/nonexistent")
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
        mp.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem(use_listings_cache=False)
        made = []

        def bucket(prefix="run"):
            # unique across fixture instances: moto keeps its buckets in process-wide state, and
            # test_recipe.py starts its own server (this fixture) in the same process
            name = f"bucket{len(made)}-{uuid.uuid4().hex[:8]}"
            fs.mkdir(name)
            made.append(name)
            return f"s3://{name}/{prefix}"

        yield bucket
        s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def keys(url: str) -> set[str]:
    """Every object under a URL, relative to it."""
    st = Store(url)
    return set(st._files(""))


# ----- the store ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["s3", "local"])
def test_store_operations(s3, tmp_path, kind):
    root = s3() if kind == "s3" else str(tmp_path / "root")
    st = Store(root)
    assert st.remote == (kind == "s3")
    assert st.url_of("a/b.json") == f"{root}/a/b.json"
    assert not st.exists("a/b.json") and st.list("a") == []
    st.write_json_atomic("a/b.json", {"x": 1})
    st.write_json_atomic("a/c/d.json", [1])
    assert st.exists("a/b.json") and st.read_json("a/b.json") == {"x": 1}
    assert st.list("a") == ["b.json", "c"]
    st.write_json_atomic("a/b.json", {"x": 2})  # replaced whole
    assert st.read_json("a/b.json") == {"x": 2}

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "one.bin").write_bytes(b"1" * 10)
    (src / "sub" / "two.txt").write_text("two")
    (src / "skip.me").write_text("no")
    sel = lambda f: f != "skip.me"  # noqa: E731
    assert st.put_dir(src, "d", select=sel) == 2
    assert st.put_dir(src, "d", select=sel) == 0  # unchanged: nothing uploaded again
    assert sorted(st._files("d")) == ["one.bin", "sub/two.txt"]
    dst = tmp_path / "dst"
    assert st.get_dir("d", dst) == 2
    assert (dst / "sub" / "two.txt").read_text() == "two"
    assert st.get_dir("d", dst) == 0  # equal sizes: skipped
    assert st.put_dir(dst, "d") == 0  # downloaded copies carry the remote time: not re-sent
    (src / "one.bin").write_bytes(b"2" * 11)
    assert st.put_dir(src, "d", select=sel) == 1  # resized
    assert st.get_dir("d", dst) == 1
    assert (dst / "one.bin").read_bytes() == b"2" * 11
    assert not list(dst.rglob(".*part-*"))  # temporary download names are gone

    st.rm("a")
    st.rm("never/was")
    assert not st.exists("a/b.json") and st.list("a") == []
    with pytest.raises(ValueError):
        st.rm("")


# ----- the graph on a bucket ----------------------------------------------------------------
CFG = {"a": {"x": 1}, "b": {"y": 1}, "c": {"z": 1}}


@pytest.fixture
def graph_on_s3(s3, tmp_path):
    rec = Recorder(blob=True, log=False)
    stages = [
        Stage("a", rec.stage("a"), config_keys=("a",)),
        Stage("b", rec.stage("b"), inputs=("a",), config_keys=("b",)),
        Stage("c", rec.stage("c"), inputs=("b",), config_keys=("c",)),
    ]
    root = s3()

    def graph(cache="cache1"):
        return Graph(stages, root, local_cache=tmp_path / cache)

    def run(g, **kw):
        return g.run(CFG, CFG, "run-s3", log=lambda s: None, **kw)

    return rec, root, graph, run


def states(g):
    return {r.name: r.state for r in g.status(CFG)}


def test_graph_keeps_outputs_and_state_in_the_bucket(graph_on_s3, tmp_path, monkeypatch):
    from moto.moto_api import recorder

    rec, root, graph, run = graph_on_s3
    g = graph()
    assert isinstance(g.root, URL) and g.root == root
    h = g.hashes(CFG)
    assert set(states(g).values()) == {"pending"}
    monkeypatch.chdir(tmp_path)  # moto writes its request recording to the working directory
    recorder.reset_recording()
    recorder.start_recording()
    try:
        lineage = run(g)
    finally:
        recorder.stop_recording()
    assert rec.calls == ["a", "b", "c"]
    b = g.stage_dir("b", h["b"])
    assert lineage["stages"]["b"]["path"] == b == f"{root}/stages/b-{h['b'][:12]}"
    assert keys(b) == {"out.txt", "partial.txt", "sub/out.bin", INFO, SUCCESS}
    assert Store(b).read_json(INFO)["result"] == {"ok": True}
    assert Store(b).read_json(INFO)["inputs"] == {"a": str(g.stage_dir("a", h["a"]))}
    assert Store(root).read_json("runs/latest.json") == {"run_id": "run-s3"}
    assert Store(root).read_json("runs/run-s3/lineage.json")["ok"] is True

    # In the order the server received them: every file of a stage, then its info.json, then
    # its _SUCCESS.json; nothing of a stage after its marker.
    puts = [json.loads(line)["url"].split(f"/{root[5:]}/", 1)[1]
            for line in recorder.download_recording().splitlines()
            if json.loads(line)["method"] == "PUT" and "/stages/" in json.loads(line)["url"]]
    for n in "abc":
        mine = [p.split("/", 2)[2] for p in puts if p.startswith(f"stages/{n}-")]
        assert mine[-1] == SUCCESS and mine.count(SUCCESS) == 1
        assert mine[-2] == INFO
        assert {"out.txt", "sub/out.bin"} <= set(mine[:-2])

    # A second run, on another machine: nothing reruns; status reads the bucket.
    rec.calls.clear()
    g2 = graph("cache2")
    assert set(states(g2).values()) == {"done"}
    lineage = run(g2)
    assert rec.calls == [] and {s["state"] for s in lineage["stages"].values()} == {"cached"}
    assert not (tmp_path / "cache2").exists()  # cached stages need no download
    assert set(states(g2).values()) == {"cached"}


def test_downstream_on_a_fresh_cache_downloads_its_inputs(graph_on_s3, tmp_path):
    rec, root, graph, run = graph_on_s3
    g = graph()
    run(g)
    h = g.hashes(CFG)
    shutil.rmtree(tmp_path / "cache1")
    rec.calls.clear()
    run(g, only="c")
    assert rec.calls == ["c"]
    b_copy = g.local_dir("b", h["b"])
    assert b_copy == tmp_path / "cache1" / "s3" / root[5:] / "stages" / f"b-{h['b'][:12]}"
    assert (b_copy / "sub" / "out.bin").read_bytes() == bytes(range(256)) * 4
    assert json.loads((b_copy / SUCCESS).read_text()) == Store(root).read_json(
        f"stages/b-{h['b'][:12]}/{SUCCESS}")
    assert not g.local_dir("a", h["a"]).exists()  # c reads only b
    out_c = json.loads(Store(g.stage_dir("c", h["c"])).fs.cat_file(
        Store(g.stage_dir("c", h["c"])).url_of("out.txt")))
    assert json.loads(out_c["up"]["b"])["cfg"] == {"b": {"y": 1}}

    # A cached copy that is not the bucket's output is replaced, not trusted.
    (b_copy / "out.txt").write_text("stale")
    (b_copy / SUCCESS).write_text(json.dumps({"run_id": "someone-else"}))
    run(g, only="c")
    assert json.loads((b_copy / "out.txt").read_text())["cfg"] == {"b": {"y": 1}}


def test_streamed_inputs_are_read_from_the_bucket_not_downloaded(s3, tmp_path):
    import fsspec

    seen = {}

    def a(ctx):  # a big file straight to storage, a small one locally
        with fsspec.open(f"{ctx.out_url}/big/x.bin", "wb") as f:
            f.write(b"x" * 4096)
        (ctx.out_dir / "index.json").write_text('["big/x.bin"]')

    def b(ctx):  # streams big/*: reads it by URL
        idx = json.loads((ctx.inputs["a"] / "index.json").read_text())
        with fsspec.open(f"{ctx.input_urls['a']}/{idx[0]}", "rb") as f:
            seen["b"] = (len(f.read()), (ctx.inputs["a"] / "big").exists())

    def c(ctx):  # reads everything locally
        seen["c"] = (ctx.inputs["a"] / "big" / "x.bin").stat().st_size

    g = Graph([Stage("a", a), Stage("b", b, inputs=("a",), stream=("big/*",)),
               Stage("c", c, inputs=("a",))], s3(), local_cache=tmp_path / "cache")
    g.run({}, {}, "r", log=lambda s: None)
    assert seen == {"b": (4096, False), "c": 4096}
    assert keys(g.stage_dir("a", g.hashes({})["a"])) == {"big/x.bin", "index.json", INFO,
                                                         SUCCESS}


def test_a_failed_stage_is_never_complete_in_the_bucket(graph_on_s3, tmp_path):
    rec, root, graph, run = graph_on_s3
    g = graph()
    h = g.hashes(CFG)
    rec.crash.add("b")
    with pytest.raises(StageFailed, match="b exploded"):
        run(g)
    b = Store(g.stage_dir("b", h["b"]))
    assert not b.exists(SUCCESS) and not b.exists(RUNNING)
    assert "b exploded" in b.read_json(FAILED)["error"]
    assert not b.exists("partial.txt")  # not resumable: its partial output stays local
    assert states(graph("cache2")) == {"a": "done", "b": "failed", "c": "pending"}
    rec.crash.clear()
    rec.calls.clear()
    run(g)
    assert rec.calls == ["b", "c"]
    assert b.exists(SUCCESS) and not b.exists(FAILED)


def test_resumable_stage_resumes_on_another_machine(s3, tmp_path):
    attempts = []

    def train(ctx):
        prog = ctx.out_dir / "progress.txt"
        done = int(prog.read_text()) if prog.exists() else 0
        attempts.append(done)
        prog.write_text(str(done + 5))
        if done == 0:
            raise RuntimeError("preempted")
        return {"steps": done + 5}

    stages = [Stage("t", train, config_keys=("t",), resumable=True)]
    root = s3()
    cfg = {"t": {}}
    with pytest.raises(StageFailed):
        Graph(stages, root, local_cache=tmp_path / "m1").run(cfg, cfg, "r1", log=lambda s: None)
    g = Graph(stages, root, local_cache=tmp_path / "m2")
    lineage = g.run(cfg, cfg, "r2", log=lambda s: None)
    assert attempts == [0, 5]  # the second machine started from the uploaded partial state
    assert lineage["stages"]["t"]["result"] == {"steps": 10}
    t = Store(g.stage_dir("t", g.hashes(cfg)["t"]))
    assert t.fs.cat_file(t.url_of("progress.txt")) == b"10" and t.exists(SUCCESS)


# ----- checkpoints in the bucket --------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine():
    """A real one-rank DeepSpeed engine (gloo) on a tiny model."""
    import socket

    import deepspeed
    import torch
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1"}.items():
            mp.setenv(k, v)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                                world_size=1)
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 4)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 1},
               "steps_per_print": 10**9}
        eng, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg,
                                       model_parameters=model.parameters(),
                                       dist_init_required=False)
        yield eng
        dist.destroy_process_group()


def step(engine):
    import torch

    loss = engine(torch.ones(1, 4)).pow(2).sum()
    engine.backward(loss)
    engine.step()


def test_a_checkpoint_in_the_bucket_restores_through_ray_train(s3, engine, tmp_path):
    """A checkpoint registered in a bucket (as Ray Train's workers upload it straight there)
    is found by RunCheckpoints, downloaded by Ray's Checkpoint.as_directory and restored."""
    from pathlib import Path

    import torch
    from ray_checkpoints import register

    from training.checkpoint import RunCheckpoints, load_tag, write_tag

    url = s3("stage")
    assert RunCheckpoints(url).latest() is None  # nothing there: start afresh
    for s in (1, 2):
        step(engine)
        write_tag(engine, tmp_path / f"save{s}", s, {"step": s}, {"ema": torch.full((2,), float(s))})
    register(url, [(tmp_path / f"save{s}", {"step": s, "world_size": 1}) for s in (1, 2)])
    weights = {k: v.clone() for k, v in engine.module.state_dict().items()}
    assert "checkpoints/checkpoint_manager_snapshot.json" in keys(url)
    ckpts = RunCheckpoints(url)
    assert ckpts.tags() == ["step00000001", "step00000002"]
    checkpoint, metrics = ckpts.latest()
    assert metrics == {"step": 2, "world_size": 1}
    step(engine)  # move away from the saved weights, then load them back
    with checkpoint.as_directory() as d:
        got, rank_state, ema = load_tag(engine, Path(d), 0)
    assert got == 2 and rank_state == {"step": 2} and ema["ema"].tolist() == [2.0, 2.0]
    for k, v in engine.module.state_dict().items():
        assert torch.equal(v, weights[k])


# ----- the real graph on a bucket --------------------------------------------------------------
def test_the_tiny_graph_runs_with_its_root_in_a_bucket(s3, tmp_path):
    """`spacetime run` with run.root=s3://...: every stage's output, the shards (uploaded by
    the Ray workers), Ray Train's checkpoints (uploaded by its workers) and the run state end
    up in the bucket; a second machine (a fresh local cache) sees the whole graph as done."""
    import os
    import subprocess
    import sys

    root = s3("graph")
    env = {**os.environ, "SPACETIME_RUN_ID": ""}

    def spacetime(*args, cache):
        return subprocess.run([sys.executable, "-m", "pipeline.cli", *args, "experiment=tiny",
                               f"run.root={root}", f"run.local_cache={tmp_path / cache}",
                               "tracking=disabled"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)

    r = spacetime("run", cache="machine1")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got = keys(root)
    stages = {k.split("/")[1].split("-")[0] for k in got if k.endswith("/_SUCCESS.json")}
    assert stages == {"source", "curate", "filter", "caption", "shard", "train", "eval"}
    train = next(k.split("/")[1] for k in got if k.startswith("stages/train-"))
    assert {f"stages/{train}/{f}" for f in ("model.pt", "model_ema.pt", "train_result.json",
                                            "checkpoints/checkpoint_manager_snapshot.json")} <= got
    from training.checkpoint import RunCheckpoints

    _, last = RunCheckpoints(f"{root}/stages/{train}").latest()
    tag = f"step{last['step']:08d}"
    assert f"stages/{train}/checkpoints/{tag}/{tag}/mp_rank_00_model_states.pt" in got
    assert any(k.startswith("stages/shard-") and k.endswith(".tar") for k in got)
    assert any(k.startswith("runs/") and k.endswith("/lineage.json") for k in got)

    r = spacetime("status", cache="machine2")
    assert r.returncode == 0, r.stderr[-2000:]
    states = {line.split()[0]: line.split()[1] for line in r.stdout.splitlines()
              if line.split() and line.split()[0] in stages}
    assert states == dict.fromkeys(stages, "done")  # complete, made by the latest run
