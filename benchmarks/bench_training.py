"""Training benchmarks, in one run on this machine (not a test; prints ratios).

(a) Per-rank bytes of parameters + gradients + optimizer states under ZeRO 0/1/2/3 with 2 ranks
    (gloo) for a medium preset. Measured as the bytes of every distinct tensor storage alive in
    the rank right after the last backward (gradients exist, optimizer states exist since the
    first step), minus what was alive before the model was built; communication buckets are
    set small (1e6 elements) so they do not hide the partitioning. Target: ZeRO-3 <= 0.55x
    ZeRO-0.
(b) Loader samples/s against raw decord decoding of the same clips (same windows, same
    resize). Target: >= 0.8x.
(c) Step time of the DeepSpeed engine (ZeRO-2, 2 ranks) against a plain PyTorch DDP loop on the
    same model and batch. Target: <= 1.15x.

    python benchmarks/bench_training.py [--preset base] [--steps 6]
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

        from training.zero import DeepSpeedConfig, build_ds_config

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


def bench_loader(n_clips: int = 48) -> dict:
    import random

    from data.shards import read_shards, write_shard
    from data.synthetic import SourceConfig, generate
    from data.video_io import read_frames
    from training.loader import Bucket, ClipStream, Loader, _seed, clip_window

    with tempfile.TemporaryDirectory() as d:
        rows = generate(SourceConfig(num_videos=n_clips, bad_fraction=0.0,
                                     multishot_fraction=0.0, seconds=4.0, width=128,
                                     height=128), Path(d) / "src")
        samples = [{"__key__": r["id"], "mp4": (Path(d) / "src" / r["path"]).read_bytes(),
                    "txt": r["caption"], "json": {"start": 0, "end": r["num_frames"],
                                                  "fps": r["fps"], "width": r["width"],
                                                  "height": r["height"]}} for r in rows]
        urls = []
        for i in range(4):
            urls.append(str(Path(d) / f"s{i}.tar"))
            write_shard(urls[-1], samples[i::4])
        raw = list(read_shards(urls))

        def floor_pass():  # the decode floor: the same windows and size, nothing else
            for s in raw:
                read_frames(s["mp4"], indices=clip_window(s["json"]["end"], 16, 1, random.Random(
                    _seed(0, 0, s["__key__"]))), size=(64, 64))

        loader = Loader(ClipStream(urls, buckets=[Bucket(16, 64, 64, 4)], rank=0, world=1,
                                   seed=0))

        def loader_pass():  # one epoch
            got = 0
            while got < len(raw):
                got += len(next(loader)[0])
            return got

        floor_pass(), loader_pass()  # warm up both (imports, thread pools, page cache)
        floor_t, ours_t = [], []
        for _ in range(3):  # interleaved, so load on the machine hits both alike
            t0 = time.perf_counter()
            floor_pass()
            floor_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            got = loader_pass()
            ours_t.append(time.perf_counter() - t0)
        floor = len(raw) / min(floor_t)
        ours = got / min(ours_t)
    return {"decode_floor_samples_per_s": floor, "loader_samples_per_s": ours,
            "ratio": ours / floor}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="base")
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    z = bench_zero(args.preset, args.steps)
    zb = bench_zero(args.preset, 3, "bf16", stages=(0, 1, 2, 3))
    print(f"(a) per-rank bytes of params+grads+optimizer states, preset {args.preset}, 2 ranks")
    for name, res in (("fp32", z), ("bf16", zb)):
        mem = {s: res[f"zero{s}"]["memory"] for s in (0, 1, 2, 3)}
        for s in (0, 1, 2, 3):
            print(f"    {name} ZeRO-{s}: {mem[s] / 2**20:8.1f} MiB   {mem[s] / mem[0]:.2f}x ZeRO-0")
        print(f"    {name}: target ZeRO-3 <= 0.55x: "
              f"{'met' if mem[3] / mem[0] <= 0.55 else 'MISSED'}")
    lo = bench_loader()
    print(f"(b) loader {lo['loader_samples_per_s']:.1f} samples/s vs decord floor "
          f"{lo['decode_floor_samples_per_s']:.1f}: {lo['ratio']:.2f}x "
          f"(target >= 0.8x: {'met' if lo['ratio'] >= 0.8 else 'MISSED'})")
    st = {k: v["step_s"] for k, v in z.items()}
    r = st["zero2"] / st["ddp"]
    print(f"(c) step time ZeRO-2 engine {st['zero2'] * 1e3:.0f} ms vs plain DDP "
          f"{st['ddp'] * 1e3:.0f} ms: {r:.2f}x (target <= 1.15x: "
          f"{'met' if r <= 1.15 else 'MISSED'}); zero0 {st['zero0'] * 1e3:.0f} ms, "
          f"zero1 {st['zero1'] * 1e3:.0f} ms, zero3 {st['zero3'] * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
