"""Peak memory of one training step on CPU against tokens, with and without gradient
checkpointing, under glibc's default allocator and under the training workers' setting
(``training.memory.ALLOCATOR_ENV``: ``MALLOC_MMAP_THRESHOLD_=131072``), against the planner.

    python benchmarks/bench_memory.py [--preset small] [--tokens 1024 2048 4096] [--steps 2]
                                      [--checkpointing both|on|off]

Each configuration (tokens x checkpointing x allocator) runs in a fresh subprocess
(``training.memory.measure``: fp32, batch 1, 8 text tokens, 1 thread, a token grid of
(tokens / 256, 16, 16)); the figure is the peak RSS that `--steps` forward + backward steps
add over the resident model, gradients and inputs. Printed per row: both allocators' peaks,
their ratio, the planner's activation bytes (``pipeline.plan.activation_bytes``, fp32) and
measured / planner. The two allocators of a row run back to back (in alternating order), and
the step-time ratio setting / default is the median of the rows' own ratios, with its range
(timing on a shared machine is noisy; memory is not).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.plan import activation_bytes  # noqa: E402
from training.dit import DiTConfig  # noqa: E402
from training.memory import ALLOCATOR_ENV, measure  # noqa: E402

MIB = 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--checkpointing", choices=["both", "on", "off"], default="both")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per subprocess")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    setting = " ".join(f"{k}={v}" for k, v in ALLOCATOR_ENV.items())
    print(f"DiT-{a.preset}, fp32, 1 thread, peak RSS added by {a.steps} forward + backward steps; "
          f"'setting' = {setting}")
    print(f"{'ckpt':<5} {'tokens':>6} {'glibc MiB':>10} {'setting MiB':>12} {'glibc/set':>9} "
          f"{'planner MiB':>12} {'set/planner':>11} {'time set/glibc':>14}")
    rows, n = [], 0
    modes = {"both": (False, True), "on": (True,), "off": (False,)}[a.checkpointing]
    for ckpt in modes:
        cfg = DiTConfig.from_preset(a.preset, grad_checkpointing=ckpt)
        for tokens in a.tokens:
            if tokens % 256:
                raise SystemExit(f"--tokens must be multiples of 256 (a 16x16 grid per frame), got {tokens}")
            spec = {"preset": a.preset, "grid": [tokens // 256, 16, 16], "steps": a.steps,
                    "dit": {"grad_checkpointing": ckpt}}
            order = (True, False) if n % 2 == 0 else (False, True)  # alternate who runs first
            res = {alloc: measure([spec], allocator=alloc, timeout=a.timeout)[0] for alloc in order}
            n += 1
            planned = activation_bytes(cfg, tokens, "fp32", ckpt)
            row = {"checkpointing": ckpt, "tokens": tokens, "glibc_bytes": res[False]["peak_bytes"],
                   "setting_bytes": res[True]["peak_bytes"], "planner_bytes": planned,
                   "glibc_step_s": res[False]["step_s"], "setting_step_s": res[True]["step_s"]}
            rows.append(row)
            print(f"{'on' if ckpt else 'off':<5} {tokens:>6} {row['glibc_bytes'] / MIB:>10.1f} "
                  f"{row['setting_bytes'] / MIB:>12.1f} {row['glibc_bytes'] / row['setting_bytes']:>9.2f} "
                  f"{planned / MIB:>12.1f} {row['setting_bytes'] / planned:>11.3f} "
                  f"{row['setting_step_s'] / row['glibc_step_s']:>14.2f}", flush=True)
    times = [r["setting_step_s"] / r["glibc_step_s"] for r in rows]
    summary = {"step_time_setting_over_glibc_median": statistics.median(times),
               "step_time_range": [min(times), max(times)],
               "setting_over_planner_range": [min(r["setting_bytes"] / r["planner_bytes"] for r in rows),
                                              max(r["setting_bytes"] / r["planner_bytes"] for r in rows)]}
    for ckpt in (False, True):
        sub = [r for r in rows if r["checkpointing"] == ckpt]
        if len(sub) > 1:  # bytes per token between the smallest and the largest token count
            lo, hi = sub[0], sub[-1]
            per = lambda k: (hi[k] - lo[k]) / (hi["tokens"] - lo["tokens"])  # noqa: E731
            summary[f"bytes_per_token_{'ckpt' if ckpt else 'no_ckpt'}"] = {
                k: per(k) for k in ("glibc_bytes", "setting_bytes", "planner_bytes")}
    print(json.dumps(summary, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps({"preset": a.preset, "steps": a.steps, "setting": ALLOCATOR_ENV,
                                            "rows": rows, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
