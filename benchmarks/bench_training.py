"""Training benchmarks, in one run on this machine (not a test; prints ratios).

(a) Per-rank bytes of parameters + gradients + optimizer states under ZeRO 0/1/2/3 with 2 ranks
    (gloo) for a medium preset. Measured as the bytes of every distinct tensor storage alive in
    the rank right after the last backward (gradients exist, optimizer states exist since the
    first step), minus what was alive before the model was built; communication buckets are
    set small (1e6 elements) so they do not hide the partitioning. Target: ZeRO-3 <= 0.55x
    ZeRO-0.
(b) Loader samples/s against decord alone decoding the same windows of the same clips at the
    same size (from memory). Target: >= 0.8x. And the share of step time spent waiting for
    data in the demo's training (its composed config, 2 Ray Train workers), with the
    loader's prefetch thread off and on. Target: < 5%.
(c) Step time of the DeepSpeed engine (ZeRO-2, 2 ranks) against a plain PyTorch DDP loop on the
    same model and batch. Target: <= 1.15x.

    python benchmarks/bench_training.py [--preset base] [--steps 6] [--parts abc]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def alive_tensor_bytes() -> int:
    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if torch.is_tensor(obj) and obj.device.type == "cpu":
                st = obj.untyped_storage()
                if st.data_ptr() not in seen and st.nbytes() > 0:
                    seen.add(st.data_ptr())
                    total += st.nbytes()
        except Exception:  # noqa: BLE001 - some tensor subclasses refuse storage access
            continue
    return total


def model_and_batch(preset: str, seed: int = 0):
    from training.dit import DiTConfig
    from training.model import ModelConfig
    from training.text import TextEncoderConfig

    dit = DiTConfig.from_preset(preset, patch_size=[2, 4, 4], text_dim=256)
    torch.manual_seed(seed)
    model = ModelConfig(dit=dit, text=TextEncoderConfig(dim=256, depth=1)).build()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 8, 32, 32, generator=g)  # (B, C, T, H, W)
    t = torch.rand(2, generator=g)
    ids = torch.randint(0, 1000, (2, 16), generator=g)
    mask = torch.ones(2, 16, dtype=torch.bool)
    return model, (x, t, ids, mask)


def _worker(rank: int, world: int, port: int, preset: str, steps: int, stage: int,
            out: str, precision: str = "fp32") -> None:
    """One ZeRO stage (or plain DDP when stage < 0) in fresh processes, so nothing leaks
    between measurements."""
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    res: dict = {}
    base = alive_tensor_bytes()
    if stage >= 0:
        import deepspeed
        from deepspeed.utils import logger

        from training.parallelize import DeepSpeedConfig, build_ds_config

        logger.setLevel("ERROR")
        model, (x, t, ids, mask) = model_and_batch(preset)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=opt, dist_init_required=False,
            config=build_ds_config(DeepSpeedConfig(zero_stage=stage, bucket_elements=10**6),
                                   2, precision))
        if precision == "bf16":
            x = x.to(torch.bfloat16)
        times = []
        for i in range(steps):
            t0 = time.perf_counter()
            loss = engine(x, t, ids, mask).pow(2).mean()
            engine.backward(loss)
            if i == steps - 1:  # params + grads + optimizer states all alive here
                t_pause = time.perf_counter()
                del loss
                gc.collect()
                res["memory"] = alive_tensor_bytes() - base
                t0 += time.perf_counter() - t_pause
            engine.step()
            times.append(time.perf_counter() - t0)
        gc.collect()
        res["step_s"] = sorted(times[1:])[len(times[1:]) // 2]
        if rank == 0:
            Path(out).write_text(json.dumps(res))
        dist.barrier()
        dist.destroy_process_group()
        return
    # the same model and batch in plain PyTorch DDP
    model, (x, t, ids, mask) = model_and_batch(preset)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-4)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = ddp(x, t, ids, mask).pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ddp.parameters(), 1.0)  # DeepSpeed clips too
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    res["memory"] = 0
    res["step_s"] = sorted(times[1:])[len(times[1:]) // 2]
    if rank == 0:
        Path(out).write_text(json.dumps(res))
    dist.barrier()
    dist.destroy_process_group()


def bench_zero(preset: str, steps: int, precision: str = "fp32", stages=(-1, 0, 1, 2, 3)) -> dict:
    res = {}
    for stage in stages:
        with tempfile.TemporaryDirectory() as d:
            out = str(Path(d) / "res.json")
            port = 29500 + (os.getpid() + stage) % 1000
            mp.spawn(_worker, args=(2, port, preset, steps, stage, out, precision), nprocs=2,
                     join=True)
            res["ddp" if stage < 0 else f"zero{stage}"] = json.loads(Path(out).read_text())
    return res


def _clip_shards(d: Path, n_clips: int, **source) -> list[str]:
    """Whole synthetic videos as samples, over 4 shards (as the shard stage writes them)."""
    from data.shards import write_shard
    from data.synthetic import SourceConfig, generate

    rows = generate(SourceConfig(num_videos=n_clips, bad_fraction=0.0, multishot_fraction=0.0,
                                 **source), d / "src")
    samples = [{"__key__": r["id"], "mp4": (d / "src" / r["path"]).read_bytes(),
                "txt": r["caption"], "json": {"start": 0, "end": r["num_frames"],
                                              "fps": r["fps"], "width": r["width"],
                                              "height": r["height"]}} for r in rows]
    urls = []
    for i in range(4):
        urls.append(str(d / f"s{i}.tar"))
        write_shard(urls[-1], samples[i::4])
    return urls


def bench_loader(n_clips: int = 48) -> dict:
    """The loader (one rank, in-process) against decord alone decoding the same windows at
    the same size from clips already in memory: the loader's cost over the decode floor is
    reading the tars, the shuffle buffer, cropping and batching. Prefetch is off here (its
    thread would decode ahead while the baseline runs); what it hides in training is what
    `bench_data_wait` measures."""
    import io
    import random

    import decord

    from data.shards import read_shards
    from training.loader import Bucket, ClipStream, Loader, LoaderConfig, _seed, clip_window

    with tempfile.TemporaryDirectory() as d:
        urls = _clip_shards(Path(d), n_clips, seconds=4.0, width=128, height=128)
        raw = list(read_shards(urls))

        def floor_pass(epoch: int):  # decord alone: the same windows and size, nothing else
            for s in raw:
                idx = clip_window(s["json"]["end"], 16, 1, random.Random(
                    _seed(0, epoch, s["__key__"])))
                vr = decord.VideoReader(io.BytesIO(s["mp4"]), ctx=decord.cpu(0), width=64,
                                        height=64)
                vr.get_batch(idx).asnumpy()  # (16, 64, 64, 3)

        loader = Loader(ClipStream(urls, buckets=[Bucket(16, 64, 64, 4)], rank=0, world=1,
                                   seed=0, cfg=LoaderConfig(prefetch=0)))

        def loader_pass():  # one epoch
            got = 0
            while got < len(raw):
                got += len(next(loader)[0])
            return got

        floor_pass(0), loader_pass()  # warm up both (imports, thread pools, page cache)
        floor_t, ours_t = [], []
        for epoch in (1, 2, 3):  # interleaved, so load on the machine hits both alike
            t0 = time.perf_counter()
            floor_pass(epoch)
            floor_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            got = loader_pass()
            ours_t.append(time.perf_counter() - t0)
        loader.close()
        floor = len(raw) / min(floor_t)
        ours = got / min(ours_t)
    return {"decode_floor_samples_per_s": floor, "loader_samples_per_s": ours,
            "ratio": ours / floor}


def bench_data_wait(steps: int = 40, prefetch: tuple[int, ...] = (0, 2)) -> dict:
    """The demo's training (its composed config: tiny DiT, ZeRO-2, 2 Ray Train workers on
    gloo, global batch 16) on shards of the demo's synthetic videos, for `steps` steps: the
    share of step time spent waiting for data (train/data_wait_s over train/step_time_s,
    summed over the steps after the first 5), per train.data.prefetch."""
    import ray
    from hydra import compose, initialize_config_dir

    from data.tracking import TrackerSpec
    from pipeline.config import CONF_DIR, register, to_object
    from training.launch import run_training

    register()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = to_object(compose("config", overrides=[f"train.steps={steps}",
                                                     "train.ckpt_every=100000", "train.log_every=1"]))
    res = {}
    # as `spacetime run` starts it (Ray Train's placement-group cleaner needs the dashboard)
    ray.init(num_cpus=2, dashboard_host=cfg.cluster.dashboard_host, configure_logging=False)
    try:
        with tempfile.TemporaryDirectory() as d:
            urls = _clip_shards(Path(d), 48)  # the demo source's size, fps and length
            for pf in prefetch:
                out = Path(d) / f"train-prefetch{pf}"
                out.mkdir()
                cfg.train.data.prefetch = pf
                spec = TrackerSpec(mode="disabled", project="bench", entity=None, dir=str(out),
                                   group="bench", job_type="train", name="train", config={},
                                   tags=[], jsonl=str(out / "metrics.jsonl"))
                run_training(train_cfg=cfg.train, model_cfg=cfg.model, ds_cfg=cfg.deepspeed,
                             cluster=cfg.cluster, out_dir=out, train_shards=urls,
                             tracker_spec=spec, stage="train", stage_hash="0" * 64, inputs={})
                recs = {}  # step -> metrics (the last attempt's, if Ray Train retried)
                for line in (out / "metrics.jsonl").read_text().splitlines():
                    r = json.loads(line)
                    if r["kind"] == "metrics":
                        recs[r["step"]] = r["metrics"]
                recs = [recs[k] for k in sorted(recs)][5:]
                wait = sum(m["train/data_wait_s"] for m in recs)
                total = sum(m["train/step_time_s"] for m in recs)
                res[pf] = {"wait_share": wait / total, "step_s": total / len(recs),
                           "samples_per_s": sum(m["train/samples_per_s"] for m in recs) / len(recs)}
    finally:
        ray.shutdown()
    return res


def print_loader(data_wait_steps: int) -> None:
    lo = bench_loader()
    print(f"(b) loader {lo['loader_samples_per_s']:.1f} samples/s vs decord alone "
          f"{lo['decode_floor_samples_per_s']:.1f}: {lo['ratio']:.2f}x "
          f"(target >= 0.8x: {'met' if lo['ratio'] >= 0.8 else 'MISSED'})", flush=True)
    for pf, r in bench_data_wait(data_wait_steps).items():
        target = (f" (target < 5%: {'met' if r['wait_share'] < 0.05 else 'MISSED'})"
                  if pf else " (prefetch off, for comparison)")
        print(f"    demo training, train.data.prefetch={pf}: data wait {r['wait_share']:.1%} of "
              f"step time (step {r['step_s'] * 1e3:.0f} ms, {r['samples_per_s']:.1f} "
              f"samples/s){target}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="base")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--data-wait-steps", type=int, default=40)
    ap.add_argument("--parts", default="abc", help="the parts to run, e.g. --parts b")
    args = ap.parse_args()
    if "a" in args.parts or "c" in args.parts:
        z = bench_zero(args.preset, args.steps)
    if "a" in args.parts:
        zb = bench_zero(args.preset, 3, "bf16", stages=(0, 1, 2, 3))
        print(f"(a) per-rank bytes of params+grads+optimizer states, preset {args.preset}, 2 ranks")
        for name, res in (("fp32", z), ("bf16", zb)):
            mem = {s: res[f"zero{s}"]["memory"] for s in (0, 1, 2, 3)}
            for s in (0, 1, 2, 3):
                print(f"    {name} ZeRO-{s}: {mem[s] / 2**20:8.1f} MiB   {mem[s] / mem[0]:.2f}x ZeRO-0")
            print(f"    {name}: target ZeRO-3 <= 0.55x: "
                  f"{'met' if mem[3] / mem[0] <= 0.55 else 'MISSED'}")
    if "b" in args.parts:
        print_loader(args.data_wait_steps)
    if "c" in args.parts:
        st = {k: v["step_s"] for k, v in z.items()}
        r = st["zero2"] / st["ddp"]
        print(f"(c) step time ZeRO-2 engine {st['zero2'] * 1e3:.0f} ms vs plain DDP "
              f"{st['ddp'] * 1e3:.0f} ms: {r:.2f}x (target <= 1.15x: "
              f"{'met' if r <= 1.15 else 'MISSED'}); zero0 {st['zero0'] * 1e3:.0f} ms, "
              f"zero1 {st['zero1'] * 1e3:.0f} ms, zero3 {st['zero3'] * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
