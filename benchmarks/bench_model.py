"""Training-step benchmark of the DiT against diffusers' WanTransformer3DModel (CPU or GPU).

For each preset (default: small, and base as the medium one), our DiT (with per-block adaLN,
DiT-style, and with adaLN-single, Wan's own design) and Wan are built with the same width,
depth, heads, MLP width, patch size, channels, text width and token count, and timed on
forward + backward + AdamW step. The models and the machine's dense matmul rate are measured
in rounds (`benchmarks/paired.py`): each round times one step of every model and a short
matmul run (`--matmul-seconds`), in turn, so every figure of a round sees the same machine
load, and each comparison is the median over rounds of that round's own value, with the
range. Achieved FLOP/s is model FLOPs (3x the forward, counted by FlopCounterMode for both,
and our analytic count for ours) over the step time, so

    step ratio   = our step time / Wan's step time, per round        (target <= 1.0)
    utilisation  = our achieved FLOP/s / that round's matmul FLOP/s  (target >= 0.70 for the medium preset)

Usage (diffusers is a benchmark-only extra: pip install -e '.[bench]'):

    python benchmarks/bench_model.py                       # small + base, 4x32x32 latents
    python benchmarks/bench_model.py --presets small --steps 5 --threads 2 --json out.json

Not a test: numbers depend on the machine and on whatever else runs on it.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

sys.path.insert(0, str(Path(__file__).resolve().parent))

from paired import interleave, ratio, summarize  # noqa: E402
from training.dit import DiT, DiTConfig, count_params  # noqa: E402
from training.flops import forward_flops, matmul_flops_per_s, sdpa_flop_mapping  # noqa: E402


def autocast_context(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The timed forward's precision (``--precision``), on cpu or cuda alike.

    fp32: everything in float32 (autocast off, even inside an enclosing autocast).
    bf16: weights, optimizer state and gradients stay float32; matmuls, attention and the MLP
          run in bfloat16 under ``torch.autocast``. The DiT keeps the parts that need range in
          float32 itself: timestep sinusoids, RoPE angles and rotation (tests/test_model.py).

    The trainer's ``train.precision=bf16`` is DeepSpeed's bf16 mode instead, which stores the
    weights in bfloat16 (``training.parallelize.build_ds_config``)."""
    device_type = torch.device(device).type
    if precision == "fp32":  # explicit: also switches off an enclosing autocast
        return torch.autocast(device_type=device_type, enabled=False)
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)


def build_wan(cfg: DiTConfig) -> nn.Module:
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=tuple(cfg.patch_size), num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_channels, out_channels=cfg.in_channels, text_dim=cfg.text_dim, freq_dim=256,
        ffn_dim=cfg.mlp_hidden, num_layers=cfg.depth, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    )


class Runner:
    """One model + its optimizer + fixed inputs; `step()` times forward, backward and optimizer."""

    def __init__(self, name: str, model: nn.Module, forward, inputs, target, precision: str, device):
        self.name, self.model, self.forward, self.inputs, self.target = name, model, forward, inputs, target
        self.precision, self.device = precision, device
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        self.times: list[tuple[float, float, float]] = []  # (forward, backward, optimizer) seconds

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def step(self, record: bool = True) -> None:  # records every step; bench_preset drops the warm-up
        self._sync()
        t0 = time.perf_counter()
        with autocast_context(self.precision, self.device):
            out = self.forward(self.model, *self.inputs)  # (B, C, T, H, W)
            loss = (out.float() - self.target).pow(2).mean()
        self._sync()
        t1 = time.perf_counter()
        loss.backward()
        self._sync()
        t2 = time.perf_counter()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self._sync()
        t3 = time.perf_counter()
        if record:
            self.times.append((t1 - t0, t2 - t1, t3 - t2))

    def counted_train_flops(self) -> int:
        """Forward FLOPs counted by FlopCounterMode, times 3 (forward + backward)."""
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=sdpa_flop_mapping()) as counter:
            self.forward(self.model, *self.inputs)
        return 3 * counter.get_total_flops()

    def pick(self, which: str = "best") -> tuple[float, float, float, float]:
        """(total, forward, backward, optimizer) of the fastest (or the median) timed step."""
        totals = [sum(t) for t in self.times]
        i = totals.index(min(totals) if which == "best" else statistics.median_low(totals))
        return (totals[i], *self.times[i])


def bench_preset(preset: str, args, device) -> dict:
    cfgs = {adaln: DiTConfig.from_preset(preset, patch_size=list(args.patch), in_channels=args.channels,
                                         text_dim=args.text_dim, attention=args.attention, adaln=adaln)
            for adaln in args.adaln}
    cfg = cfgs[args.adaln[0]]
    grid = tuple(args.grid)
    B, L = args.batch, args.text_len
    shape = (B, cfg.in_channels, grid[0] * cfg.patch_size[0], grid[1] * cfg.patch_size[1], grid[2] * cfg.patch_size[2])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(device)  # (B, C, T, H, W)
    target = torch.randn(shape, generator=g).to(device)  # (B, C, T, H, W)
    text = torch.randn(B, L, cfg.text_dim, generator=g).to(device)  # (B, L, Dt)
    mask = torch.ones(B, L, dtype=torch.bool, device=device)  # (B, L): Wan has no text mask, so no padding
    t = torch.rand(B, generator=g).to(device)  # (B,)

    torch.manual_seed(0)
    wan = build_wan(cfg).to(device).train()
    runners = [Runner(f"spacetime-{adaln}", DiT(c).to(device).train(), lambda m, *a: m(*a), (x, t, text, mask),
                      target, args.precision, device) for adaln, c in cfgs.items()]
    runners.append(Runner("wan", wan, lambda m, xx, tt, tx: m(xx, tt, tx, return_dict=False)[0], (x, t * 1000, text),
                          target, args.precision, device))
    flops = {r.name: r.counted_train_flops() for r in runners}
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    rates: list[float] = []  # the matmul rate of each round
    arms = {r.name: r.step for r in runners}
    arms["matmul"] = lambda: rates.append(matmul_flops_per_s(args.matmul_n, args.matmul_seconds, dtype, device))
    interleave(arms, args.steps, warmup=args.warmup)  # every model and the matmul, in turn
    rates = rates[args.warmup:]
    for r in runners:
        r.times = r.times[args.warmup:]
    res = {"preset": preset, "grid": grid, "tokens": grid[0] * grid[1] * grid[2], "batch": B, "text_len": L,
           "hidden": cfg.hidden_size, "depth": cfg.depth, "heads": cfg.num_heads, "models": {},
           "matmul_flops_per_s": summarize(rates).as_dict(0)}
    totals = {r.name: [sum(t) for t in r.times] for r in runners}
    for r in runners:
        total, fwd, bwd, opt = r.pick("median")
        util = summarize([flops[r.name] / t / rate for t, rate in zip(totals[r.name], rates)])
        res["models"][r.name] = {
            "params": sum(p.numel() for p in r.model.parameters()), "step_s": total, "forward_s": fwd,
            "backward_s": bwd, "optimizer_s": opt, "train_flops": flops[r.name], "flops_per_s": flops[r.name] / total,
            "utilisation": util.as_dict(), "all_steps_s": [round(x, 3) for x in totals[r.name]]}
    for adaln, c in cfgs.items():
        m = res["models"][f"spacetime-{adaln}"]
        assert m["params"] == count_params(c)
        m["analytic_train_flops"] = 3 * B * forward_flops(c, grid, L)
        m["step_ratio"] = ratio(totals[f"spacetime-{adaln}"], totals["wan"]).as_dict()
    del runners, wan
    gc.collect()
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["small", "base"], help="the last one is the 'medium' target")
    p.add_argument("--grid", nargs=3, type=int, default=[4, 16, 16], metavar=("T", "H", "W"), help="token grid after patchify")
    p.add_argument("--patch", nargs=3, type=int, default=[1, 2, 2])
    p.add_argument("--channels", type=int, default=16, help="latent channels")
    p.add_argument("--text-dim", type=int, default=512)
    p.add_argument("--text-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--attention", default="full", choices=["full", "factorised"])
    p.add_argument("--adaln", nargs="+", default=["block", "single"], choices=["block", "single"],
                   help="our adaLN variants to time (Wan's design is 'single')")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--steps", type=int, default=5, help="paired rounds: timed steps per model")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    p.add_argument("--matmul-n", type=int, default=2048)
    p.add_argument("--matmul-seconds", type=float, default=1.0, help="matmul run per round")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    header = (f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else f'{os.cpu_count()} CPUs'}), "
              f"torch {torch.__version__}, threads {torch.get_num_threads()}, precision {args.precision}")
    print(header, flush=True)
    results = []
    for preset in args.presets:
        t0 = time.time()
        results.append(bench_preset(preset, args, device))
        print(f"  {preset}: benchmarked in {time.time() - t0:.0f}s", flush=True)

    fmt = lambda d, digits=2, unit="x": (f"{d['median']:.{digits}f}{unit} ({d['lo']:.{digits}f}-"  # noqa: E731
                                         f"{d['hi']:.{digits}f})")
    pct = lambda d: f"{d['median']:.0%} ({d['lo']:.0%}-{d['hi']:.0%})"  # noqa: E731
    print(f"\nmedians over {args.steps} paired rounds (range over rounds in brackets)")
    print(f"{'preset':<7} {'tokens':>6} {'model':<18} {'params':>8} {'step s':>7} {'vs wan':>17} "
          f"{'of matmul':>15}  fwd/bwd/opt s")
    for r in results:
        mm = r["matmul_flops_per_s"]
        print(f"{r['preset']:<7} matmul {args.matmul_n}^3 {args.precision}: "
              f"{fmt({k: v / 1e9 for k, v in mm.items() if k != 'per_round'}, 1, '')} GFLOP/s")
        for name, m in r["models"].items():
            vs = fmt(m["step_ratio"]) if "step_ratio" in m else "1"
            print(f"{r['preset']:<7} {r['tokens']:>6} {name:<18} {m['params'] / 1e6:>7.1f}M {m['step_s']:>7.2f} {vs:>17} "
                  f"{pct(m['utilisation']):>15}  {m['forward_s']:.2f}/{m['backward_s']:.2f}/{m['optimizer_s']:.2f}")
    medium = results[-1]
    ratios = ", ".join(f"{r['preset']} {name[10:]} {m['step_ratio']['median']:.2f}" for r in results
                       for name, m in r["models"].items() if "step_ratio" in m)
    util = ", ".join(f"{name[10:]} {m['utilisation']['median']:.0%}" for name, m in medium["models"].items()
                     if "step_ratio" in m)
    print(f"\ntargets: our step / Wan's <= 1.00 -> {ratios}; {medium['preset']} utilisation >= 70% -> {util}")
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
