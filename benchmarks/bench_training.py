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
(c) Step time of the DeepSpeed engine the trainer builds (ZeRO-2, `training.parallelize`)
    against a plain PyTorch DDP loop (torch AdamW, clipping at 1.0 as DeepSpeed does) on the
    same model and batch, in the same ranks, stepping in turn (`benchmarks/paired.py`: the
    median of the per-round ratios and their range), at world size 2 and 1; at world size 1
    also ZeRO-2 against ZeRO-0. Target: ZeRO-2 / DDP <= 1.15x. `--profile` prints the top
    operators (torch.profiler) and Python functions (cProfile) of one step of each arm.

(b)'s loader and decode floor are paired the same way (`--rounds` + 1 rounds).

    python benchmarks/bench_training.py [--preset base] [--rounds 6] [--world 2 1] [--profile]
                                        [--parts abc]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paired import interleave, ratio  # noqa: E402


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


def _memory_worker(rank: int, world: int, port: int, preset: str, steps: int, stage: int,
                   out: str, precision: str = "fp32") -> None:
    """(a): one ZeRO stage in fresh processes, so nothing leaks between the measurements."""
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    base = alive_tensor_bytes()
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
    res: dict = {}
    for i in range(steps):
        loss = engine(x, t, ids, mask).pow(2).mean()
        engine.backward(loss)
        if i == steps - 1:  # params + grads + optimizer states all alive here
            del loss
            gc.collect()
            res["memory"] = alive_tensor_bytes() - base
        engine.step()
    if rank == 0:
        Path(out).write_text(json.dumps(res))
    dist.barrier()
    dist.destroy_process_group()


def bench_zero_memory(preset: str, steps: int, precision: str = "fp32",
                      stages=(0, 1, 2, 3)) -> dict:
    res = {}
    for stage in stages:
        with tempfile.TemporaryDirectory() as d:
            out = str(Path(d) / "res.json")
            mp.spawn(_memory_worker, args=(2, free_port(), preset, steps, stage, out, precision),
                     nprocs=2, join=True)
            res[f"zero{stage}"] = json.loads(Path(out).read_text())
    return res


def free_port() -> int:
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step_arms(names, preset: str, ds_overrides: dict | None = None) -> dict:
    """name -> one training step (forward, backward, clip at 1.0, AdamW), on its own copy of the
    same model and batch. "ddp": plain PyTorch DDP with the trainer's torch AdamW
    (``training.parallelize.adamw``: fused), so the ratio is DeepSpeed's cost, not an optimizer's;
    "zeroN": the engine the trainer builds (``training.parallelize.parallelize``, its default
    config at stage N, with `ds_overrides` as fields of DeepSpeedConfig)."""
    from training.parallelize import DeepSpeedConfig, adamw, parallelize

    arms = {}
    for name in names:
        model, (x, t, ids, mask) = model_and_batch(preset)
        if name == "ddp":
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            opt = adamw([{"params": list(ddp.parameters())}], lr=1e-4, weight_decay=0.0)

            def step(ddp=ddp, opt=opt, b=(x, t, ids, mask)):
                ddp(*b).pow(2).mean().backward()
                torch.nn.utils.clip_grad_norm_(ddp.parameters(), 1.0)  # DeepSpeed clips too
                opt.step()
                opt.zero_grad(set_to_none=True)
        else:
            cfg = DeepSpeedConfig(**{**(ds_overrides or {}), "zero_stage": int(name[4:])})
            engine = parallelize(model, cfg, params=[{"params": list(model.parameters())}],
                                 lr=1e-4, weight_decay=0.0, schedule=lambda s: 1.0,
                                 micro_batch=2, precision="fp32")

            def step(engine=engine, b=(x, t, ids, mask)):
                engine.backward(engine(*b).pow(2).mean())
                engine.step()
        arms[name] = step
    return arms


def _step_worker(rank: int, world: int, port: int, preset: str, rounds: int, names: list,
                 out: str, profile: bool, ds_overrides: dict | None) -> None:
    """(c): every arm in the same `world` ranks, stepping in turn (``benchmarks.paired``)."""
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    arms = step_arms(names, preset, ds_overrides)
    times = interleave(arms, rounds, warmup=1, before=dist.barrier)
    res = {"times": times, "profiles": {}}
    if profile:
        for name, step in arms.items():
            dist.barrier()
            res["profiles"][name] = profile_step(step)
    if rank == 0:
        Path(out).write_text(json.dumps(res))
    dist.barrier()
    dist.destroy_process_group()


def profile_step(step, top: int = 14) -> dict:
    """One step under torch.profiler (operators, gloo collectives: self CPU time) and cProfile
    (Python functions, DeepSpeed's bookkeeping: own time), the top entries of each."""
    import cProfile
    import pstats

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        step()
        wall = time.perf_counter() - t0
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    pr = cProfile.Profile()
    pr.enable()
    step()
    pr.disable()
    stats = pstats.Stats(pr).stats  # (file, line, fn) -> (cc, nc, tottime, cumtime, callers)
    fns = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    return {"wall_s": wall,
            "ops": [(e.key, e.count, e.self_cpu_time_total / 1e6) for e in ops],
            "python": [(fn if f == "~" else f"{Path(f).parent.name}/{Path(f).name}:{ln}({fn})",
                        v[1], v[2], v[3]) for (f, ln, fn), v in fns]}


def bench_step(preset: str, world: int, rounds: int, names=("ddp", "zero2"), profile=False,
               ds_overrides: dict | None = None) -> dict:
    """Paired step times of the arms in `world` gloo ranks: name -> seconds per round (rank 0's),
    and "profiles" (name -> profile_step) when `profile`."""
    with tempfile.TemporaryDirectory() as d:
        out = str(Path(d) / "res.json")
        mp.spawn(_step_worker, args=(world, free_port(), preset, rounds, list(names), out,
                                     profile, ds_overrides), nprocs=world, join=True)
        return json.loads(Path(out).read_text())


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


def bench_loader(n_clips: int = 48, rounds: int = 7) -> dict:
    """The loader (one rank, in-process) against decord alone decoding the same windows at
    the same size from clips already in memory: the loader's cost over the decode floor is
    reading the tars, the shuffle buffer, cropping and batching. Prefetch is off here (its
    thread would decode ahead while the baseline runs); what it hides in training is what
    `bench_data_wait` measures. One epoch of each per round, `rounds` rounds in turn
    (``benchmarks.paired``): the ratio is the median of the rounds' own ratios, with their range."""
    import io
    import random

    import decord

    from data.shards import read_shards
    from training.clips import _seed, clip_window
    from training.loader import Bucket, ClipStream, Loader, LoaderConfig

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

        epochs = iter(range(10**6))  # a fresh window draw per floor pass, as the loader's epochs
        loader = Loader(ClipStream(urls, buckets=[Bucket(16, 64, 64, 4)], rank=0, world=1,
                                   seed=0, cfg=LoaderConfig(prefetch=0)))

        got = []  # samples per loader pass

        def loader_pass():  # one epoch
            n = 0
            while n < len(raw):
                n += len(next(loader)[0])
            got.append(n)

        times = interleave({"floor": lambda: floor_pass(next(epochs)), "loader": loader_pass},
                           rounds, warmup=1)  # epochs in turn: load on the machine hits both alike
        loader.close()
    floor = [len(raw) / s for s in times["floor"]]  # samples/s per round
    ours = [n / s for n, s in zip(got[1:], times["loader"])]  # got[0]: the warm-up pass
    return {"decode_floor_samples_per_s": sorted(floor)[len(floor) // 2],
            "loader_samples_per_s": sorted(ours)[len(ours) // 2],
            "ratio": ratio(ours, floor)}


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


def print_loader(data_wait_steps: int, rounds: int) -> None:
    lo = bench_loader(rounds=rounds)
    print(f"(b) loader vs decord alone {lo['ratio']} (median rates "
          f"{lo['loader_samples_per_s']:.1f} vs {lo['decode_floor_samples_per_s']:.1f} samples/s; "
          f"target >= 0.8x: {'met' if lo['ratio'].median >= 0.8 else 'MISSED'})", flush=True)
    for pf, r in bench_data_wait(data_wait_steps).items():
        target = (f" (target < 5%: {'met' if r['wait_share'] < 0.05 else 'MISSED'})"
                  if pf else " (prefetch off, for comparison)")
        print(f"    demo training, train.data.prefetch={pf}: data wait {r['wait_share']:.1%} of "
              f"step time (step {r['step_s'] * 1e3:.0f} ms, {r['samples_per_s']:.1f} "
              f"samples/s){target}", flush=True)


def print_step(preset: str, worlds, rounds: int, profile: bool,
               ds_overrides: dict | None = None) -> dict:
    """(c) at each world size: ZeRO-2 and plain DDP (and ZeRO-0 at world size 1) paired."""
    out = {}
    for world in worlds:
        names = ("ddp", "zero0", "zero2") if world == 1 else ("ddp", "zero2")
        res = bench_step(preset, world, rounds, names, profile, ds_overrides)
        t = res["times"]
        med = {k: sorted(v)[len(v) // 2] for k, v in t.items()}
        r = ratio(t["zero2"], t["ddp"])
        print(f"(c) world size {world}, preset {preset}: ZeRO-2 engine step vs plain DDP {r} "
              f"(target <= 1.15x: {'met' if r.median <= 1.15 else 'MISSED'}); median steps "
              + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in med.items()), flush=True)
        if world == 1:
            print(f"    ZeRO-2 vs ZeRO-0 engine, world size 1: {ratio(t['zero2'], t['zero0'])}",
                  flush=True)
        for name, pr in res["profiles"].items():
            print(f"    profile, {name}, one step on rank 0 ({pr['wall_s'] * 1e3:.0f} ms): "
                  "top operators by self CPU time (torch.profiler)")
            for key, count, sec in pr["ops"]:
                print(f"      {sec * 1e3:8.1f} ms  {count:6d}x  {key}")
            print("    top Python functions by own time (cProfile; the step run again under it)")
            for key, calls, tot, cum in pr["python"]:
                print(f"      {tot * 1e3:8.1f} ms own {cum * 1e3:8.1f} ms cum {calls:7d}x  {key}")
        out[world] = res
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="base")
    ap.add_argument("--steps", type=int, default=3, help="(a): steps per ZeRO stage")
    ap.add_argument("--rounds", type=int, default=6, help="(b), (c): paired rounds")
    ap.add_argument("--world", type=int, nargs="+", default=[2, 1], help="(c): world sizes")
    ap.add_argument("--profile", action="store_true",
                    help="(c): also profile one step of each arm (torch.profiler, cProfile)")
    ap.add_argument("--data-wait-steps", type=int, default=40)
    ap.add_argument("--parts", default="abc", help="the parts to run, e.g. --parts b")
    args = ap.parse_args()
    if "a" in args.parts:
        z, zb = bench_zero_memory(args.preset, args.steps), bench_zero_memory(args.preset, 3, "bf16")
        print(f"(a) per-rank bytes of params+grads+optimizer states, preset {args.preset}, 2 ranks")
        for name, res in (("fp32", z), ("bf16", zb)):
            mem = {s: res[f"zero{s}"]["memory"] for s in (0, 1, 2, 3)}
            for s in (0, 1, 2, 3):
                print(f"    {name} ZeRO-{s}: {mem[s] / 2**20:8.1f} MiB   {mem[s] / mem[0]:.2f}x ZeRO-0")
            print(f"    {name}: target ZeRO-3 <= 0.55x: "
                  f"{'met' if mem[3] / mem[0] <= 0.55 else 'MISSED'}")
    if "b" in args.parts:
        print_loader(args.data_wait_steps, args.rounds + 1)
    if "c" in args.parts:
        print_step(args.preset, args.world, args.rounds, args.profile)


if __name__ == "__main__":
    main()
