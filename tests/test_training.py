"""Training at cluster scale on 2 CPU workers: ZeRO stages, checkpoints, failures, the loader.

Shards are built straight from the synthetic source (no curation) so these tests exercise the
trainer alone; the Ray Train runs share one local Ray.
"""

from __future__ import annotations

import json
import math
import os
import signal
import tarfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import ray.train
import torch
from conftest import forget_deepspeed_groups
from ray_checkpoints import register

from data.shards import write_shard
from data.synthetic import SourceConfig, generate
from data.tracking import TrackerSpec
from training.checkpoint import RunCheckpoints
from training.clips import normalize
from training.ema import EMA
from training.launch import run_training, worker_resources
from training.loader import Bucket, ClipStream, Loader, LoaderConfig
from training.model import ModelConfig, from_pretrained
from training.parallelize import DeepSpeedConfig, build_ds_config, checks_overflow, full_params, parallelize
from training.trainer import NonFiniteGuard, TrainConfig, lr_lambda, param_groups

NUM_FRAMES, SIZE = 8, (32, 32)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    return write_training_shards(tmp_path_factory.mktemp("shards"))


def write_training_shards(root: Path) -> list[str]:
    """4 shards of synthetic clips (whole videos) plus one corrupt sample in the last shard."""
    rows = generate(SourceConfig(num_videos=24, bad_fraction=0.0, multishot_fraction=0.0,
                                 seed=3), root / "src")
    samples = []
    for r in rows:
        mp4 = (root / "src" / r["path"]).read_bytes()
        key = r["id"]
        meta = {"start": 0, "end": r["num_frames"], "fps": r["fps"], "width": r["width"],
                "height": r["height"], "caption": r["caption"]}
        samples.append({"__key__": key, "mp4": mp4, "json": meta, "txt": r["caption"]})
    samples[-1] = {**samples[-1], "mp4": os.urandom(2000)}  # corrupt
    urls = []
    for i in range(4):
        path = root / f"train-{i:06d}.tar"
        write_shard(str(path), samples[i * 6 : (i + 1) * 6])
        urls.append(str(path))
    return urls


# ----- loader (no Ray) ----------------------------------------------------------------------
def epoch_keys(stream: ClipStream, nw: int = 0) -> list[str]:
    """Keys one rank sees in epoch 0 (the stream is endless: stop at epoch 1)."""
    keys, done = [], set()
    loader = Loader(replace_cfg(stream, nw))
    while len(done) < max(nw, 1):  # until every reader has moved on to epoch 1
        _, _, k = next(loader)
        if loader.last["epoch"] == 0:
            keys += k
        else:
            done.add(loader.last["reader"])
    return keys


def replace_cfg(stream: ClipStream, nw: int) -> ClipStream:
    stream.cfg = replace(stream.cfg, num_workers=nw)
    return stream


@pytest.mark.parametrize("num_workers", [0, 2])
def test_each_sample_once_per_epoch_across_ranks(shards, num_workers):
    def stream(rank):
        return ClipStream(shards, buckets=[Bucket(NUM_FRAMES, *SIZE, 1)], rank=rank,
                          world=2, seed=0, cfg=LoaderConfig(shuffle_buffer=4))

    k0, k1 = epoch_keys(stream(0), num_workers), epoch_keys(stream(1), num_workers)
    assert not set(k0) & set(k1)
    assert len(k0) == len(set(k0)) and len(k1) == len(set(k1))
    assert len(k0) + len(k1) == 23  # 24 samples, one corrupt


def test_corrupt_sample_is_skipped_and_counted(shards):
    loader = Loader(ClipStream(shards, buckets=[Bucket(NUM_FRAMES, *SIZE, 4)], rank=0,
                               world=1, seed=0))
    for _ in range(12):  # two epochs (23 good samples: the last batch of an epoch has 3)
        video, captions, keys = next(loader)
        assert video.shape[1:] == (3, NUM_FRAMES, *SIZE) and len(captions) == len(video)
        assert video.dtype == torch.uint8
    assert loader.skipped_total >= 1


def test_loader_resumes_exactly(shards):
    def make(state=None):
        return Loader(ClipStream(shards, buckets=[Bucket(NUM_FRAMES, *SIZE, 3),
                                                  Bucket(4, 16, 32, 2)],
                                 rank=1, world=2, seed=5, cfg=LoaderConfig(shuffle_buffer=5),
                                 state=state))

    a = make()
    for _ in range(5):
        next(a)
    state = Loader.restore_state(json.loads(json.dumps(a.state_dict())), 0)
    b = make(state)
    for _ in range(6):  # across an epoch boundary
        va, ca, ka = next(a)
        vb, cb, kb = next(b)
        assert ka == kb and ca == cb and torch.equal(va, vb)


def test_loader_resumes_exactly_with_loader_workers(shards):
    """The DataLoader takes batches from its workers round-robin from worker 0; a restore
    rotates the worker -> reader mapping so the next batch comes from the right reader."""
    def make(state=None):
        return Loader(ClipStream(shards, buckets=[Bucket(NUM_FRAMES, *SIZE, 1)], rank=0, world=1,
                                 seed=4, cfg=LoaderConfig(shuffle_buffer=3, num_workers=2),
                                 state=state))

    a = make()
    for _ in range(3):
        next(a)
    saved = json.loads(json.dumps(a.state_dict()))
    assert saved["next_worker"] == 1
    b = make(Loader.restore_state(saved, 2))
    for _ in range(5):
        va, _, ka = next(a)
        vb, _, kb = next(b)
        assert ka == kb and torch.equal(va, vb)
    a.close(), b.close()


@pytest.fixture(scope="module")
def damaged_shards(shards, tmp_path_factory) -> list[str]:
    """A shard with a .json that is not JSON and a .txt that is not UTF-8 among good samples,
    and a good shard cut off in the middle of its 4th sample's mp4."""
    from data.shards import read_shards

    root = tmp_path_factory.mktemp("damaged")
    good = [dict(s, json=dict(s["json"])) for s in read_shards(shards[:2])][:8]
    for s in good:
        for k in ("__url__", "__local_path__"):
            s.pop(k, None)
    bad = [dict(good[0], __key__="badjson", json=b'{"start": 0, "end'),
           dict(good[1], __key__="badtxt", txt=b"\xff\xfe not utf-8")]
    write_shard(str(root / "a.tar"), good[:2] + bad + good[2:4])
    write_shard(str(root / "b.tar"), good[4:8])
    with tarfile.open(root / "b.tar") as tf:
        cut = next(m for m in tf.getmembers() if m.name.endswith(".mp4")
                   and m.name.startswith(good[7]["__key__"])).offset_data + 100
    with open(root / "b.tar", "r+b") as f:
        f.truncate(cut)
    return [str(root / "a.tar"), str(root / "b.tar")]


def first_epoch(loader) -> tuple[list[str], int]:
    """The keys of `loader`'s first epoch and its skipped count as of that epoch's last batch
    (reads one batch into the second epoch to see the epoch end)."""
    seen, counts = [], []
    while not seen or loader.last["epoch"] == 0:
        seen += next(loader)[2]
        counts.append(loader.skipped_total)
    return seen[:-1], counts[-2]  # the last batch is epoch 1's first


def restored_copy_follows(make, after: int):
    """A loader `b` read `after` batches, and `c` restored from its (JSON round-tripped) state:
    both read to the end of the second epoch giving the same keys and skipped counts."""
    b = make()
    for _ in range(after):
        next(b)
    c = make(Loader.restore_state(json.loads(json.dumps(b.state_dict())), 0))
    for _ in range(11):  # to the end of the second epoch
        kb, kc = next(b)[2], next(c)[2]
        assert kb == kc and b.skipped_total == c.skipped_total
    return b, c


def test_damaged_shards_are_skipped_counted_and_the_count_survives_a_restore(damaged_shards):
    def make(state=None):
        return Loader(ClipStream(damaged_shards, buckets=[Bucket(NUM_FRAMES, *SIZE, 1)], rank=0,
                                 world=1, seed=0, cfg=LoaderConfig(shuffle_buffer=2),
                                 state=state))

    a = make()
    epoch0, skipped = first_epoch(a)
    assert len(epoch0) == len(set(epoch0)) == 7  # 4 + 3 whole samples before the cut
    assert "badjson" not in epoch0 and "badtxt" not in epoch0
    assert skipped == 3  # bad json, bad txt, the truncated tar
    b, c = restored_copy_follows(make, after=3)
    assert c.last["epoch"] == 1 and c.skipped_total == 6  # the second epoch counted again
    for loader in (a, b, c):
        loader.close()


@pytest.fixture(scope="module")
def garbled_shards(shards, tmp_path_factory) -> list[str]:
    """Two shards of 6 good clips with their sidecars (as the shard stage writes them); a
    member header of the second shard's 3rd sample garbled: tarfile stops there silently."""
    from tar_damage import garble_header

    from data.shards import read_shards, write_sidecar

    root = tmp_path_factory.mktemp("garbled")
    good = [dict(s, json=dict(s["json"])) for s in read_shards(shards[:2])]
    for s in good:
        for k in ("__url__", "__local_path__"):
            s.pop(k, None)
    urls = []
    for i, part in enumerate((good[:6], good[6:12])):
        path = root / f"train-{i:06d}.tar"
        write_shard(str(path), part)
        write_sidecar(path, {"shard": path.name, "rows": [{"key": s["__key__"]} for s in part]})
        urls.append(str(path))
    garble_header(urls[1], good[8]["__key__"])
    return urls


def test_a_garbled_header_mid_shard_counts_every_lost_sample_across_a_restore(garbled_shards):
    def make(state=None, rank=0, world=1):
        return Loader(ClipStream(garbled_shards, buckets=[Bucket(NUM_FRAMES, *SIZE, 1)],
                                 rank=rank, world=world, seed=0,
                                 cfg=LoaderConfig(shuffle_buffer=3), state=state))

    a = make()
    epoch0, skipped = first_epoch(a)
    assert len(epoch0) == len(set(epoch0)) == 8  # 6 + the 2 before the garbled header
    assert skipped == 4  # the 4 samples tarfile never reached, not 0 (nor 1)
    b, c = restored_copy_follows(make, after=5)
    assert c.last["epoch"] == 1 and c.skipped_total == 8
    # 3 readers over 2 shards: every reader reads both and keeps its share; the lost samples
    # count for the readers they belonged to, each once
    ranks = [make(rank=r, world=3) for r in range(3)]
    keys, lost = [], 0
    for loader in ranks:
        k, count = [], 0
        while not k or loader.last["epoch"] == 0:
            count = loader.skipped_total  # as of the last batch of epoch 0
            k += next(loader)[2]
        keys += k[:-1]
        lost += count
    assert len(keys) == len(set(keys)) == 8 and lost == 4
    for loader in (a, b, c, *ranks):
        loader.close()


def test_loader_resizes_and_crops_keeping_aspect(tmp_path):
    from data.video_io import encode_mp4

    frames = np.zeros((10, 32, 64, 3), np.uint8)  # 2:1 wide
    frames[:, :, 28:36] = 255  # a vertical bar in the middle
    mp4 = encode_mp4(frames, fps=8)
    write_shard(str(tmp_path / "s.tar"), [{"__key__": "k", "mp4": mp4, "txt": "bar",
                                          "json": {"start": 0, "end": 10, "fps": 8.0,
                                                   "width": 64, "height": 32}}])
    loader = Loader(ClipStream([str(tmp_path / "s.tar")], buckets=[Bucket(4, 16, 16, 1)],
                               rank=0, world=1, seed=0))
    video, _, _ = next(loader)  # (1, 3, 4, 16, 16)
    col = normalize(video)[0, :, 0].mean(dim=(0, 1))  # (16,) brightness per column
    assert video.shape == (1, 3, 4, 16, 16)
    assert col[7:9].min() > 0.5 and col[:4].max() < -0.5  # bar kept centred, not squeezed


# ----- pieces -------------------------------------------------------------------------------
def test_nonfinite_guard_skips_then_stops():
    g = NonFiniteGuard(limit=3)
    assert g.check(True, 0) and not g.check(False, 1) and not g.check(False, 2)
    assert g.check(True, 3) and g.total == 2 and g.run == 0
    g.check(False, 4), g.check(False, 5)
    with pytest.raises(FloatingPointError, match="3 consecutive non-finite"):
        g.check(False, 6)


def test_ema_tracks_a_moving_average():
    ema = EMA({"w": torch.zeros(3)}, decay=0.9)
    for _ in range(200):
        ema.update({"w": torch.ones(3)})
    assert torch.allclose(ema.shadow["w"], torch.ones(3), atol=1e-6)
    ema2 = EMA({"w": torch.zeros(1)}, decay=0.5)
    ema2.updates = 100
    ema2.update({"w": torch.ones(1)})
    assert ema2.shadow["w"].item() == pytest.approx(0.5)


def test_deepspeed_config_comes_from_the_hydra_config_with_raw_keys_merged():
    ds = build_ds_config(DeepSpeedConfig(
        zero_stage=3, grad_clip=0.5, grad_accum=2, offload_param=True,
        extra={"zero_optimization": {"stage3_max_live_parameters": 7},
               "bf16": {"check_grad_overflow": True}, "wall_clock_breakdown": True}), 3, "bf16")
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"],
            ds["gradient_clipping"]) == (3, 2, 0.5)
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["offload_param"] == {"device": "cpu", "pin_memory": False}
    assert z["stage3_max_live_parameters"] == 7  # the raw key wins ...
    assert z["reduce_bucket_size"] == 50_000_000  # ... and the rest of the section stays
    assert ds["bf16"] == {"enabled": True, "check_grad_overflow": True}
    assert ds["wall_clock_breakdown"] is True
    for stage in (1, 2):  # all-reduce each bucket in place, no per-rank slices copied out and back
        assert build_ds_config(DeepSpeedConfig(zero_stage=stage), 1, "fp32")[
            "zero_optimization"]["reduce_scatter"] is False
    with pytest.raises(ValueError, match="offload_param needs zero_stage=3"):
        build_ds_config(DeepSpeedConfig(zero_stage=2, offload_param=True), 1, "fp32")
    with pytest.raises(ValueError, match="zero_stage must be 0-3"):
        build_ds_config(DeepSpeedConfig(zero_stage=4), 1, "fp32")
    with pytest.raises(ValueError, match="train.precision"):
        build_ds_config(DeepSpeedConfig(), 1, "fp16")


def test_parallelize_wraps_the_pure_module_as_the_configs_say(tmp_path, monkeypatch):
    """One place applies parallelism: the engine holds the module as built, and its ZeRO stage,
    accumulation, micro batch, optimizer groups and schedule come from the configs given."""
    import torch.distributed as dist

    monkeypatch.setenv("LOCAL_RANK", "0")  # what Ray Train sets in its workers
    forget_deepspeed_groups()  # test_storage's engine, earlier in this process, left its group there
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        mcfg = ModelConfig()
        mcfg.dit.patch_size = [2, 4, 4]
        model = mcfg.build()
        tcfg = train_cfg(lr=2e-3, warmup_steps=4)
        engine = parallelize(model, DeepSpeedConfig(zero_stage=1, grad_accum=2),
                             params=param_groups(model, tcfg.lr, 0.5), lr=tcfg.lr,
                             weight_decay=0.0, schedule=lr_lambda(tcfg), micro_batch=3,
                             precision="fp32")
        assert engine.module is model  # not a copy: the pure nn.Module inside
        assert engine.zero_optimization_stage() == 1 and checks_overflow(engine)
        # torch's fused AdamW steps the flat ZeRO partition (4.8x the default loop on a CPU)
        assert isinstance(engine.optimizer.optimizer, torch.optim.AdamW)
        assert engine.optimizer.optimizer.defaults["fused"] is True
        assert (engine.gradient_accumulation_steps(), engine.train_micro_batch_size_per_gpu()) == (2, 3)
        assert engine.get_lr()[0] == pytest.approx(2e-3 * lr_lambda(tcfg)(0))  # warmup's first rate
        with full_params(engine, 1) as named:
            assert named.keys() == {k for k, p in model.named_parameters() if p.requires_grad}
    finally:
        dist.destroy_process_group()


def test_the_config_layer_imports_neither_deepspeed_nor_ray():
    """training.trainer and training.parallelize import them lazily (seconds each) because
    pipeline.config imports their config dataclasses."""
    import subprocess
    import sys

    code = ("import sys, pipeline.config; "
            "print(sorted(m for m in ('deepspeed', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_workers_gpus_and_backend_come_from_the_cluster_config():
    from pipeline.config import ClusterConfig

    assert worker_resources(ClusterConfig()) == {
        "num_workers": 2, "use_gpu": False, "resources_per_worker": {"CPU": 1}, "backend": "gloo"}
    gpu = ClusterConfig(num_workers=16, gpus_per_worker=1, cpus_per_worker=8)
    assert gpu.use_gpu and worker_resources(gpu) == {
        "num_workers": 16, "use_gpu": True, "resources_per_worker": {"CPU": 8, "GPU": 1.0},
        "backend": "nccl"}
    with pytest.raises(ValueError, match="gpus_per_worker must be >= 0"):  # by the config itself
        worker_resources(ClusterConfig(gpus_per_worker=-1))


def test_resuming_with_another_number_of_workers_fails_before_training(shards, tmp_path):
    (tmp_path / "save" / "step00000004").mkdir(parents=True)
    (tmp_path / "save" / "latest").write_text("step00000004")
    register(tmp_path, [(tmp_path / "save", {"step": 4, "world_size": 3})])
    with pytest.raises(ValueError, match=r"written by 3 training workers but cluster.num_workers=2"):
        train(shards, tmp_path, zero=2)  # no Ray needed: it fails before any worker starts
    assert not (tmp_path / ".staging").exists()


# ----- Ray Train + DeepSpeed ----------------------------------------------------------------
class Cluster:
    num_workers, gpus_per_worker, cpus_per_worker, peak_tflops_per_worker = 2, 0, 1, None


def train_cfg(steps: int = 16, **kw) -> TrainConfig:
    return TrainConfig(**{**dict(steps=steps, global_batch_size=4, lr=3e-3, warmup_steps=1,
                                 log_every=1, seed=1, num_frames=NUM_FRAMES, height=SIZE[0],
                                 width=SIZE[1], data=LoaderConfig(shuffle_buffer=4)), **kw})


def train(shards, out: Path, *, zero: int, steps: int = 16, ckpt_every: int = 100,
          max_failures: int = 0, offload: bool = False, mcfg: ModelConfig | None = None,
          ds: dict | None = None, **train_kw) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    tcfg = train_cfg(steps, ckpt_every=ckpt_every, max_failures=max_failures, **train_kw)
    spec = TrackerSpec(mode="disabled", project="t", entity=None, dir=str(out), group="g",
                       job_type="train", name="train", config={}, tags=[],
                       jsonl=str(out / "metrics.jsonl"))
    if mcfg is None:
        mcfg = ModelConfig()
        mcfg.dit.patch_size = [2, 4, 4]
    dcfg = DeepSpeedConfig(zero_stage=zero, offload_optimizer=offload, **(ds or {}))
    return run_training(train_cfg=tcfg, model_cfg=mcfg, ds_cfg=dcfg,
                        cluster=Cluster(), out_dir=out, train_shards=shards,
                        tracker_spec=spec, stage="train", stage_hash="0" * 64, inputs={})


def metrics(out: Path) -> list[dict]:
    """Every logged step's metrics in order (a step replayed after a restore appears twice)."""
    recs = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    return [{"step": r["step"], **r["metrics"]} for r in recs if r["kind"] == "metrics"]


def losses(out: Path) -> dict[int, float]:
    """Step -> loss; a step logged twice (replayed after a restore) keeps its last value."""
    return {m["step"]: m["train/loss"] for m in metrics(out)}


@pytest.fixture(scope="module")
def baseline(ray_with_state_api, shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zero2")
    train(shards, out, zero=2, ckpt_every=4)
    return out


def falling(ls: dict[int, float]) -> bool:
    v = [ls[k] for k in sorted(ls)]
    return np.mean(v[-4:]) < 0.9 * np.mean(v[:4])


def test_zero2_trains_with_falling_loss(baseline):
    assert falling(losses(baseline))
    ms = metrics(baseline)
    assert [m["step"] for m in ms] == list(range(16))  # every step
    schedule = lr_lambda(train_cfg())
    tokens = (NUM_FRAMES // 2) * (SIZE[0] // 4) * (SIZE[1] // 4)  # per clip, patches (2, 4, 4)
    for m in ms:
        assert m["train/lr"] == pytest.approx(3e-3 * schedule(m["step"]))  # the rate applied
        assert 0 < m["train/grad_norm"] < math.inf
        samples = m["train/samples_per_s"] * m["train/step_time_s"]  # 4, 3 at an epoch's end
        assert samples == pytest.approx(round(samples)) and round(samples) in (3, 4)
        assert m["train/tokens_per_s"] == pytest.approx(tokens * m["train/samples_per_s"])
        buckets = [v for k, v in m.items() if k.startswith("train/loss_t")]
        assert buckets and all(math.isfinite(v) for v in buckets)
        assert 0 < m["train/mfu"] < 1.5 and m["train/tflops_per_worker"] > 0
        assert m["train/compute_s"] + m["train/data_wait_s"] == pytest.approx(
            m["train/step_time_s"])
        assert m["train/peak_memory_bytes"] > 0 and m["train/nonfinite_steps"] == 0
    res = json.loads((baseline / "train_result.json").read_text())
    assert res["zero_stage"] == 2 and res["world_size"] == 2 and res["skipped_samples"] >= 0
    # the exports as safetensors folders too: the raw weights, and the EMA over them
    raw = torch.load(baseline / "model.pt", weights_only=True)
    ema = {**raw, **torch.load(baseline / "model_ema.pt", weights_only=True)}
    for folder, want in (("dit", raw), ("dit_ema", ema)):
        got = from_pretrained(baseline / folder).state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


# Three shapes, all filled by the 64x64 clips: a clip takes the largest with prob 0.5, else the next.
SHAPES = [Bucket(8, 32, 32, 2, prob=0.5), Bucket(4, 32, 32, 2, prob=0.5), Bucket(4, 16, 16, 4)]
SHAPE_TOKENS = {256, 128, 32}  # per clip, patches (2, 4, 4): 4*8*8, 2*8*8, 2*4*4


@pytest.mark.parametrize("zero,offload", [(1, False), (3, False), (2, True)])
def test_zero_stage_trains_with_falling_loss(ray_with_state_api, shards, tmp_path, zero, offload):
    """The ZeRO-2 run (optimizer offloaded) trains on the 3 buckets of SHAPES: the 2 ranks are
    on the same one at every step (training.lockstep), handing batches over when one waits."""
    shapes = zero == 2
    data = LoaderConfig(shuffle_buffer=4, **(dict(buckets=SHAPES, max_waiting=2) if shapes else {}))
    res = train(shards, tmp_path, zero=zero, offload=offload, data=data)
    assert res["zero_stage"] == zero
    assert falling(losses(tmp_path)) and all(math.isfinite(v) for v in losses(tmp_path).values())
    if zero == 3:
        check_zero_to_fp32(tmp_path)
    if shapes:  # tokens / samples of a step over both ranks is one bucket's per clip only if both ran it
        per_clip = [m["train/tokens_per_s"] / m["train/samples_per_s"] for m in metrics(tmp_path)]
        assert all(min(abs(p - t) for t in SHAPE_TOKENS) < 1e-6 for p in per_clip), per_clip
        assert {round(p) for p in per_clip} == SHAPE_TOKENS  # every shape trained
        assert res["shared_batches"] > 0  # batches went from rank to rank (a broadcast over gloo)


def test_zero3_param_offload_bf16_accumulation_clipping_and_checkpointing(ray_with_state_api, shards,
                                                                         tmp_path):
    """One run of the options the stage tests leave out: ZeRO-3 with parameters offloaded to
    the CPU, bf16 on the CPU under DeepSpeed, 2 accumulation steps, gradient clipping and the
    DiT's activation checkpointing inside the engine."""
    mcfg = ModelConfig()
    mcfg.dit.patch_size = [2, 4, 4]
    mcfg.dit.grad_checkpointing = True
    res = train(shards, tmp_path, zero=3, steps=10, mcfg=mcfg, precision="bf16",
                ds={"offload_param": True, "grad_accum": 2, "grad_clip": 0.05})
    assert res["zero_stage"] == 3 and res["micro_batch"] == 1  # 4 = 2 workers x 2 x 1
    ms = metrics(tmp_path)
    assert falling(losses(tmp_path)) and all(math.isfinite(m["train/loss"]) for m in ms)
    # the pre-clip norm is above the threshold at every step: clipping acted on every update
    assert all(0.05 < m["train/grad_norm"] < math.inf for m in ms)
    samples = [round(m["train/samples_per_s"] * m["train/step_time_s"]) for m in ms]
    assert max(samples) == 4  # 2 micro-batches per step on each of 2 workers


def test_nonfinite_losses_stop_the_run_with_a_message_and_no_retry(ray_with_state_api, shards, tmp_path):
    """An absurd learning rate: step 0 is finite and blows the weights up, every later loss
    is inf. Each such step is skipped whole (2 micro-batches each), the lr stays on its
    schedule, and after train.max_nonfinite in a row the run stops; the driver raises the
    guard's message and Ray Train does not retry (max_failures=2 would rerun from step 0)."""
    with pytest.raises(FloatingPointError, match=r"2 consecutive non-finite losses \(last at "
                                                 r"step 2\).*train.max_nonfinite"):
        train(shards, tmp_path, zero=2, steps=8, lr=1e30, max_nonfinite=2, max_failures=2,
              ds={"grad_accum": 2})
    ms = metrics(tmp_path)
    assert [m["step"] for m in ms] == [0, 1, 2]  # logged once each: no second attempt
    assert math.isfinite(ms[0]["train/loss"]) and ms[0]["train/grad_norm"] > 0
    assert [m["train/nonfinite_steps"] for m in ms] == [0, 1, 2]
    schedule = lr_lambda(train_cfg(8, lr=1e30))
    assert [m["train/lr"] for m in ms] == pytest.approx([1e30 * schedule(s) for s in range(3)])
    assert not (tmp_path / "train_result.json").exists()
    assert not (tmp_path / "NONFINITE.json").exists()  # consumed by the driver


def check_zero_to_fp32(out: Path):
    """DeepSpeed's own converter reads our checkpoint; the weights load and sample."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from training.evaluation.evaluate import EvalConfig, sample_videos
    from training.text import Tokenizer

    ck, _ = RunCheckpoints(out).latest()  # Ray Train's latest checkpoint: a DeepSpeed save dir
    sd = get_fp32_state_dict_from_zero_checkpoint(ck.path)  # reads its `latest`
    ref = torch.load(out / "model.pt", weights_only=True)
    assert sd.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(sd[k].float(), ref[k], rtol=0, atol=1e-6)
    mcfg = ModelConfig()
    mcfg.dit.patch_size = [2, 4, 4]
    model = mcfg.build().eval()
    model.load_state_dict(sd)
    videos = sample_videos(model, Tokenizer(), ["one red circle moving left"],
                           EvalConfig(sample_steps=3), (3, NUM_FRAMES, *SIZE), 1.0, "cpu")
    assert videos.shape == (1, NUM_FRAMES, *SIZE, 3) and videos.dtype == torch.uint8


def test_zero2_checkpoint_converts_with_zero_to_fp32(baseline):
    check_zero_to_fp32(baseline)
    ck, _ = RunCheckpoints(baseline).latest()
    assert (Path(ck.path) / "zero_to_fp32.py").exists()  # DeepSpeed's script, in each checkpoint


def test_checkpoints_and_metrics_are_ray_trains(baseline):
    """Ray Train's own Result of the run directory lists the checkpoints (the newest
    train.keep_checkpoints=2 of saves at 4, 8, 12 and the final 16) with rank 0's metrics; each
    holds every rank's files; nothing else is left in the run directory or the staging area."""
    result = ray.train.Result.from_path(str(baseline / "checkpoints"))
    steps = [m["step"] for _, m in result.best_checkpoints]
    assert steps == [12, 16] and result.metrics["step"] == 16
    assert result.checkpoint.path == str(baseline / "checkpoints" / "step00000016")
    logged = losses(baseline)
    for ck, m in result.best_checkpoints:
        assert m["world_size"] == 2 and m["sequence_parallel"] == 1
        assert m["train/loss"] == logged[m["train/step"]] and m["train/step"] == m["step"] - 1
        tag = Path(ck.path) / f"step{m['step']:08d}"
        assert {f.name for f in tag.iterdir()} >= {
            "mp_rank_00_model_states.pt", "rank00000_state.pt", "rank00001_state.pt", "ema.pt",
            "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"}
    assert sorted(p.name for p in (baseline / "checkpoints").iterdir() if p.is_dir()) == [
        "step00000012", "step00000016"]
    assert not any((baseline / ".staging").rglob("*.pt"))


def run_killing_a_worker(run, out: Path, after_step: int) -> tuple[dict, int | None]:
    """run() (a training into `out`) on a thread; once `out`'s metrics show `after_step` and Ray
    Train has registered a checkpoint (its controller polls the workers' reports every 2 s, so a
    saved checkpoint is not yet a registered one), SIGKILL one Ray Train worker. Returns (run()'s
    result, the killed pid or None if it finished first)."""
    import psutil

    box: dict = {}
    th = threading.Thread(target=lambda: box.setdefault("res", run()))
    th.start()
    killed, deadline = None, time.time() + 400
    while th.is_alive() and killed is None and time.time() < deadline:
        if ((out / "metrics.jsonl").exists() and max(losses(out), default=-1) >= after_step
                and RunCheckpoints(out).records()):
            # this test's Ray only (its raylet is our child): never another session's worker
            workers = []
            for p in psutil.Process().children(recursive=True):
                try:
                    if "RayTrainWorker" in " ".join(p.cmdline()):
                        workers.append(p)
                except psutil.Error:  # exited while listed
                    pass
            if workers:
                killed = workers[-1].pid
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.2)  # polling the metrics file, not waiting for luck
    th.join(timeout=600)
    return box["res"], killed


def test_killed_worker_resumes_and_matches_uninterrupted_run(ray_with_state_api, shards, baseline,
                                                             tmp_path):
    res, killed = run_killing_a_worker(
        lambda: train(shards, tmp_path, zero=2, ckpt_every=4, max_failures=2), tmp_path, after_step=6)
    assert killed is not None, "training finished before a worker could be killed"
    assert res["resumed_from_step"] in (4, 8, 12)  # restored from a registered checkpoint
    a, b = losses(baseline), losses(tmp_path)
    assert sorted(a) == sorted(b) == list(range(16))
    for step in a:  # same seed, same data order, same optimizer state: the same curve
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-5), step


@pytest.fixture(scope="module")
def mixed_shards(tmp_path_factory) -> list[str]:
    """Square (32x32) and wide (32x64) clips, interleaved over 2 shards."""
    from data.synthetic import caption, render, sample_spec
    from data.video_io import encode_mp4

    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    samples = []
    for i in range(16):
        spec = sample_spec(rng)
        h, w = (32, 64) if i % 2 else (32, 32)
        mp4 = encode_mp4(render(spec, 12, h, w), fps=8)
        samples.append({"__key__": f"clip{i:03d}", "mp4": mp4, "txt": caption(spec),
                        "json": {"start": 0, "end": 12, "fps": 8.0, "width": w, "height": h}})
    urls = []
    for j in range(2):
        write_shard(str(root / f"m-{j}.tar"), samples[j::2][:4] + samples[8 + j::2][:4])
        urls.append(str(root / f"m-{j}.tar"))
    return urls


BUCKETS = [Bucket(8, 16, 16, 3), Bucket(4, 16, 32, 2)]


def test_buckets_give_one_shape_per_batch_by_aspect_ratio(mixed_shards):
    loader = Loader(ClipStream(mixed_shards, buckets=BUCKETS, rank=0, world=1, seed=0))
    shapes = {}
    for _ in range(8):
        video, _, keys = next(loader)
        for k in keys:
            shapes.setdefault(int(k[4:]) % 2, set()).add(tuple(video.shape[1:]))
    assert shapes[0] == {(3, 8, 16, 16)}  # square clips: the square bucket
    assert shapes[1] == {(3, 4, 16, 32)}  # wide clips: the wide bucket


def test_loader_resumes_exactly_with_partly_filled_buckets(mixed_shards):
    def make(state=None):
        return Loader(ClipStream(mixed_shards, buckets=BUCKETS, rank=0, world=1, seed=2,
                                 cfg=LoaderConfig(shuffle_buffer=3), state=state))

    a = make()
    for _ in range(3):
        next(a)
    saved = a.state_dict()
    assert any(p["pending"] for p in saved["positions"].values())  # something is waiting
    b = make(Loader.restore_state(json.loads(json.dumps(saved)), 0))
    for _ in range(10):  # across epoch boundaries and flushes
        va, ca, ka = next(a)
        vb, cb, kb = next(b)
        assert ka == kb and ca == cb and torch.equal(va, vb)


def test_frozen_open_clip_encoder_trains_through_the_embedding_cache(ray_with_state_api, shards, tmp_path):
    """A frozen text tower (tiny random open_clip, no download) under ZeRO-0 (the one stage the
    other runs leave out; fp32, so the trainer computes the gradient norm itself): its
    embeddings come from the cache, it gets no optimizer state, and the DiT still learns."""
    from test_text import write_open_clip_dir

    from training.dit import DiTConfig
    from training.text import TextEncoderConfig

    name = write_open_clip_dir(tmp_path / "clip")
    mcfg = ModelConfig(dit=DiTConfig(patch_size=[2, 4, 4], text_dim=64),
                       text=TextEncoderConfig(kind="open_clip", name=name, dim=64,
                                              max_length=16, cache_size=1024))
    res = train(shards, tmp_path / "out", zero=0, mcfg=mcfg)
    assert falling(losses(tmp_path / "out"))
    assert all(0 < m["train/grad_norm"] < math.inf for m in metrics(tmp_path / "out"))
    ema = torch.load(tmp_path / "out" / "model_ema.pt", weights_only=True)
    assert ema and not any(k.startswith("text_encoder.") for k in ema)  # frozen: no EMA
    assert res["zero_stage"] == 0


def test_op_builds_use_the_ninja_installed_beside_this_python(monkeypatch):
    """Debian's ninja and pip's discard each other's build logs, so DeepSpeed's cached ops would
    rebuild whenever processes found different ones: use_venv_ninja puts the venv's first on
    PATH, whatever PATH held, once however often it is called."""
    import shutil
    import sysconfig

    from training.prebuild import use_venv_ninja

    scripts = sysconfig.get_path("scripts")
    assert os.path.isfile(os.path.join(scripts, "ninja"))  # pip's ninja: a DeepSpeed dependency
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/bin", "/bin"]))
    use_venv_ninja()
    use_venv_ninja()
    assert shutil.which("ninja") == os.path.join(scripts, "ninja")
    assert os.environ["PATH"].split(os.pathsep) == [scripts, "/usr/bin", "/bin"]
