"""Sequence-parallel (Ulysses) benchmark: activation memory, the longest trainable clip under a
memory cap, all-to-all overhead, and the planner's SP memory model. One run, ratios against
the SP=1 baseline measured in the same run (not a test).

Per rank, for the same sample (batch 1, one clip of T x H x W pixels, patch (1, 2, 2)):

(a) activation memory: the bytes autograd saves for backward in one forward (distinct
    storages, parameters excluded; what the planner models as "activations"), at SP=1 (one
    process) and SP=2 (each of 2 gloo processes). Target: SP=2 <= 0.6x SP=1.
(b) the largest clip one rank can train under a fixed cap on those bytes (the cap: SP=1's bytes
    at --frames), searched over frame counts up to 2.25x --frames: tokens at SP=2 / tokens at SP=1. Target >= 1.8x.
(c) all-to-all overhead: the share of an SP=2 forward + backward step spent inside
    ``all_to_all_single`` (timed around each call), and the SP=2 step time against SP=1's,
    paired (`benchmarks/paired.py`): `--reps` rounds of one SP=1 step (on rank 0, the other
    rank waiting) and one SP=2 step in turn; the median of the rounds' ratios and their range.
(d) the planner: ``pipeline.plan.activation_bytes`` for micro-batch x ceil(tokens / sp)
    tokens against (a)'s SP=2 measurement. Target: within 15%.

    python benchmarks/bench_sp.py [--hidden 384 --depth 4 --heads 6 --frames 8 --size 32]
"""

from __future__ import annotations

import argparse
import json
import math
import os
from statistics import median
import socket
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

sys.path.insert(0, str(Path(__file__).resolve().parent))

from paired import interleave, ratio  # noqa: E402
from pipeline.plan import activation_bytes  # noqa: E402
from training.dit import DiTConfig  # noqa: E402
from training.ulysses import apply_sequence_parallel, sequence_groups  # noqa: E402

L_TEXT = 16


def dit_cfg(a) -> DiTConfig:
    return DiTConfig(hidden_size=a.hidden, depth=a.depth, num_heads=a.heads, patch_size=[1, 2, 2],
                     in_channels=4, text_dim=64, attention=a.attention)


def inputs(cfg: DiTConfig, frames: int, size: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, cfg.in_channels, frames, size, size, generator=g)  # (1, C, T, H, W)
    return x, torch.rand(1, generator=g), torch.randn(1, L_TEXT, cfg.text_dim, generator=g), \
        torch.ones(1, L_TEXT, dtype=torch.bool)


def saved_bytes(model, args) -> int:
    """Bytes autograd keeps for backward in one forward of `model(*args)` (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = max(storages.get(s.data_ptr(), 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(*args)
    del out
    return sum(storages.values())


class A2ATimer:
    """Wraps dist.all_to_all_single (what DeepSpeed's Ulysses calls) with a wall-clock timer."""

    def __init__(self):
        self.seconds, self.calls, self._orig = 0.0, 0, dist.all_to_all_single

    def __enter__(self):
        def timed(*args, **kw):
            t0 = time.perf_counter()
            r = self._orig(*args, **kw)
            self.seconds += time.perf_counter() - t0
            self.calls += 1
            return r
        dist.all_to_all_single = timed
        return self

    def __exit__(self, *exc):
        dist.all_to_all_single = self._orig


def measure(cfg: DiTConfig, frames: int, size: int, group=None) -> dict:
    torch.manual_seed(0)
    model = cfg.build().train()
    if group is not None:
        apply_sequence_parallel(model, group)
    return {"saved_bytes": saved_bytes(model, inputs(cfg, frames, size))}


def ladder(base: int) -> list[int]:
    """Frame counts searched in (b): base up to 2.25 x base in steps of base / 8 (one frame at
    the default 8), so a ratio near 1.8-2 is resolved to 1/8."""
    step = max(1, base // 8)
    return list(range(base, int(2.25 * base) + 1, step))


def paired_steps(cfg: DiTConfig, a, group, rank: int) -> dict:
    """(c), paired (``benchmarks.paired``): per round, one SP=1 step (rank 0 alone, the other
    rank waiting) and one SP=2 step (both ranks), in turn. Rank 0's seconds per round, and the
    all-to-all seconds and calls per SP=2 step."""
    torch.manual_seed(0)
    one, two = cfg.build().train(), cfg.build().train()
    apply_sequence_parallel(two, group)
    args = inputs(cfg, a.frames, a.size)

    def step(model):
        model(*args).square().mean().backward()
        model.zero_grad(set_to_none=True)

    with A2ATimer() as timer:
        times = interleave({"sp1": lambda: step(one) if rank == 0 else None, "sp2": lambda: step(two)},
                           a.reps, warmup=1, before=dist.barrier)
    calls = timer.calls / (a.reps + 1)  # the warm-up round's SP=2 step counts too
    return {"sp1_s": times["sp1"], "sp2_s": times["sp2"], "a2a_s_per_step": timer.seconds / (a.reps + 1),
            "a2a_calls_per_step": calls}


def sp_worker(rank: int, port: int, a, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    group, _, _ = sequence_groups(2)
    cfg = dit_cfg(a)
    res = {"main": measure(cfg, a.frames, a.size, group),
           "steps": paired_steps(cfg, a, group, rank),
           "ladder": {f: measure(cfg, f, a.size, group)["saved_bytes"] for f in ladder(a.frames)}}
    if rank == 0:
        Path(out).write_text(json.dumps(res))
    dist.barrier()  # neither rank tears gloo down while the other still uses it (SIGABRT)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--attention", default="full")
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5, help="(c): paired rounds")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)  # each SP rank gets one of the 2 cores; SP=1 the same one
    cfg = dit_cfg(a)
    one = measure(cfg, a.frames, a.size, None)
    cap = one["saved_bytes"]
    one_ladder = {f: measure(cfg, f, a.size)["saved_bytes"] for f in ladder(a.frames)}
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "sp2.json")
        mp.start_processes(sp_worker, args=(port, a, path), nprocs=2, start_method="spawn")
        two = json.loads(Path(path).read_text())
    tokens = lambda f: f * (a.size // 2) ** 2  # noqa: E731  patch (1, 2, 2)
    fit1 = max(f for f, b in one_ladder.items() if b <= cap)
    fit2 = max((int(f) for f, b in two["ladder"].items() if b <= cap), default=0)
    sp2, st = two["main"], two["steps"]
    planned = activation_bytes(cfg, math.ceil(tokens(a.frames) / 2), "fp32", False)
    res = {
        "model": {"hidden": a.hidden, "depth": a.depth, "heads": a.heads, "attention": a.attention},
        "sample": {"frames": a.frames, "size": a.size, "tokens": tokens(a.frames)},
        "a_activation_bytes": {"sp1": one["saved_bytes"], "sp2_per_rank": sp2["saved_bytes"],
                               "ratio": sp2["saved_bytes"] / one["saved_bytes"], "target": "<= 0.6"},
        "b_largest_tokens_under_cap": {"cap_bytes": cap, "sp1_tokens": tokens(fit1), "sp2_tokens": tokens(fit2),
                                       "ratio": tokens(fit2) / tokens(fit1), "target": ">= 1.8",
                                       "searched_frames": [min(one_ladder), max(one_ladder)],
                                       "ladder_capped": fit2 == max(one_ladder)},
        "c_all_to_all": {"sp1_step_s": median(st["sp1_s"]), "sp2_step_s": median(st["sp2_s"]),
                         "sp2_over_sp1": ratio(st["sp2_s"], st["sp1_s"]).as_dict(3),
                         "a2a_s_per_step": st["a2a_s_per_step"], "a2a_calls_per_step": st["a2a_calls_per_step"],
                         "a2a_share_of_sp2_step": st["a2a_s_per_step"] / median(st["sp2_s"])},
        "d_planner": {"planned_bytes": planned, "measured_bytes": sp2["saved_bytes"],
                      "planned_over_measured": planned / sp2["saved_bytes"], "target": "within 15%"},
    }
    print(json.dumps(res, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
