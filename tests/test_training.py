"""Training at cluster scale on 2 CPU workers: ZeRO stages, checkpoints, failures, the loader.

Shards are built straight from the synthetic source (no curation) so these tests exercise the
trainer alone; the Ray Train runs share one local Ray.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from data.shards import write_shard
from data.synthetic import SourceConfig, generate
from data.video_io import read_frames
from pipeline.tracking import TrackerSpec
from training.checkpoint import COMPLETE, Checkpoints
from training.ema import EMA
from training.loader import Bucket, ClipStream, Loader, LoaderConfig, normalize
from training.model import ModelConfig
from training.trainer import NonFiniteGuard, TrainConfig, run_training
from training.zero import DeepSpeedConfig

NUM_FRAMES, SIZE = 8, (32, 32)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    """4 shards of synthetic clips (whole videos) plus one corrupt sample in the last shard."""
    root = tmp_path_factory.mktemp("shards")
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


def test_incomplete_checkpoint_is_never_latest_and_old_ones_are_pruned(tmp_path):
    c = Checkpoints(tmp_path, keep=2)
    for step in (10, 20, 30):
        (tmp_path / f"step{step:08d}").mkdir()
        (tmp_path / f"step{step:08d}" / COMPLETE).write_text("{}")
    (tmp_path / "step00000040").mkdir()  # interrupted while saving
    assert c.latest() == "step00000030"
    c.prune()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step00000020", "step00000030", "step00000040"]


# ----- Ray Train + DeepSpeed ----------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, dashboard_host="127.0.0.1", include_dashboard=True,
             configure_logging=False)
    yield
    ray.shutdown()


class Cluster:
    num_workers, use_gpu, cpus_per_worker, peak_tflops_per_worker = 2, False, 1, None


def train(shards, out: Path, *, zero: int, steps: int = 16, ckpt_every: int = 100,
          max_failures: int = 0, offload: bool = False, mcfg: ModelConfig | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    tcfg = TrainConfig(steps=steps, global_batch_size=4, lr=3e-3, warmup_steps=1, log_every=1,
                       ckpt_every=ckpt_every, max_failures=max_failures, seed=1,
                       num_frames=NUM_FRAMES, height=SIZE[0], width=SIZE[1],
                       data=LoaderConfig(shuffle_buffer=4))
    spec = TrackerSpec(mode="disabled", project="t", entity=None, dir=str(out), group="g",
                       job_type="train", name="train", config={}, tags=[],
                       jsonl=str(out / "metrics.jsonl"))
    if mcfg is None:
        mcfg = ModelConfig()
        mcfg.dit.patch_size = [2, 4, 4]
    return run_training(train_cfg=tcfg, model_cfg=mcfg, ds_cfg=DeepSpeedConfig(zero_stage=zero, offload_optimizer=offload),
                        cluster=Cluster(), out_dir=out, train_shards=shards,
                        tracker_spec=spec, stage="train", stage_hash="0" * 64, inputs={})


def losses(out: Path) -> dict[int, float]:
    """Step -> loss; a step logged twice (replayed after a restore) keeps its last value."""
    recs = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["metrics"]["train/loss"] for r in recs if r["kind"] == "metrics"}


@pytest.fixture(scope="module")
def baseline(ray_local, shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zero2")
    train(shards, out, zero=2, ckpt_every=4)
    return out


def falling(ls: dict[int, float]) -> bool:
    v = [ls[k] for k in sorted(ls)]
    return np.mean(v[-4:]) < 0.9 * np.mean(v[:4])


def test_zero2_trains_with_falling_loss(baseline):
    assert falling(losses(baseline))
    recs = [json.loads(s) for s in (baseline / "metrics.jsonl").read_text().splitlines()]
    m = next(r["metrics"] for r in recs if r["kind"] == "metrics")
    assert 0 < m["train/mfu"] < 1.5 and m["train/tflops_per_worker"] > 0
    assert m["train/compute_s"] + m["train/data_wait_s"] == pytest.approx(
        m["train/step_time_s"])
    assert m["train/peak_memory_bytes"] > 0
    res = json.loads((baseline / "train_result.json").read_text())
    assert res["zero_stage"] == 2 and res["world_size"] == 2 and res["skipped_samples"] >= 0


@pytest.mark.parametrize("zero,offload", [(1, False), (3, False), (2, True)])
def test_zero_stage_trains_with_falling_loss(ray_local, shards, tmp_path, zero, offload):
    res = train(shards, tmp_path, zero=zero, offload=offload)
    assert res["zero_stage"] == zero
    assert falling(losses(tmp_path))
    if zero == 3:
        check_zero_to_fp32(tmp_path)


def check_zero_to_fp32(out: Path):
    """DeepSpeed's own converter reads our checkpoint; the weights load and sample."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from training.evaluate import EvalConfig, sample_videos
    from training.text import Tokenizer

    sd = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"))  # reads `latest`
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
    assert (baseline / "checkpoints" / "zero_to_fp32.py").exists()  # DeepSpeed's script
    assert len(Checkpoints(baseline / "checkpoints", 2).complete_tags()) == 2  # keep last K


def test_killed_worker_resumes_and_matches_uninterrupted_run(ray_local, shards, baseline,
                                                             tmp_path):
    import psutil

    box: dict = {}
    th = threading.Thread(target=lambda: box.setdefault(
        "res", train(shards, tmp_path, zero=2, ckpt_every=4, max_failures=2)))
    th.start()
    killed = None
    deadline = time.time() + 300
    while th.is_alive() and killed is None and time.time() < deadline:
        if (tmp_path / "metrics.jsonl").exists() and max(losses(tmp_path), default=-1) >= 6:
            workers = [p for p in psutil.process_iter(["cmdline"])
                       if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]
            if workers:
                killed = workers[-1].pid
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.2)
    th.join(timeout=600)
    assert killed is not None, "training finished before a worker could be killed"
    res = box["res"]
    assert res["resumed_from_step"] in (4, 8)  # restored from a complete checkpoint
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


def test_frozen_open_clip_encoder_trains_through_the_embedding_cache(ray_local, shards, tmp_path):
    """A frozen text tower (tiny random open_clip, no download) under ZeRO-2: its embeddings
    come from the cache, it gets no optimizer state, and the DiT still learns."""
    from test_text import write_open_clip_dir
    from training.dit import DiTConfig
    from training.text import TextEncoderConfig

    name = write_open_clip_dir(tmp_path / "clip")
    mcfg = ModelConfig(dit=DiTConfig(patch_size=[2, 4, 4], text_dim=64),
                       text=TextEncoderConfig(kind="open_clip", name=name, dim=64,
                                              max_length=16, cache_size=1024))
    res = train(shards, tmp_path / "out", zero=2, mcfg=mcfg)
    assert falling(losses(tmp_path / "out"))
    ema = torch.load(tmp_path / "out" / "model_ema.pt", weights_only=True)
    assert ema and not any(k.startswith("text_encoder.") for k in ema)  # frozen: no EMA
    assert res["zero_stage"] == 2
