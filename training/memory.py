"""Host memory of training on CPU: the allocator setting of the workers, and one step's peak.

glibc's malloc serves a request above its mmap threshold with a mapping of its own (returned
to the kernel on free) and the rest from its heap. The threshold is dynamic by default: each
freed mapping raises it to that size (up to 32 MiB), so after the first step nearly every
activation buffer comes from the heap, and freed heap memory between live chunks stays resident.
With gradient checkpointing the recomputed blocks' buffers are freed and reallocated in another
order on every block's backward, and the heap grows with them: measured peak RSS of one
forward + backward of DiT-small at 4k / 8k tokens was 2.74 / 4.13 GiB with glibc's default and
1.66 / 1.88 GiB with ``MALLOC_MMAP_THRESHOLD_=131072`` (a fixed threshold: every buffer above
128 KiB gets its own mapping and goes back on free, so RSS follows live memory).
``benchmarks/bench_memory.py`` prints the curve against tokens.

``ALLOCATOR_ENV`` is that setting; ``worker_env`` gives it to the environment Ray Train starts
its training workers with when they train on CPUs (``training.launch.run_config``: Ray Train's
``worker_runtime_env``; curation's workers and GPU training keep glibc's default). glibc
reads ``MALLOC_*`` once, at process start, so it must be in a worker's environment before the
worker starts: setting ``os.environ`` inside a running worker does nothing. A value the user
has set in their own environment wins.

``python -m training.memory '<json>'`` measures the peak RSS one training step of a DiT adds
(`step_peaks`), in a fresh process; ``measure`` runs it in a subprocess with or without the
setting (the planner's activation test and the benchmark use it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# Fixed mmap threshold: buffers above 128 KiB (glibc's default starting threshold) get their
# own mapping and are returned to the kernel when freed, so RSS follows live memory.
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
REPO = Path(__file__).resolve().parent.parent


def worker_env(environ=None) -> dict[str, str]:
    """The allocator variables for Ray workers' ``runtime_env.env_vars``: ours, unless the
    user's environment sets them (then theirs)."""
    environ = os.environ if environ is None else environ
    return {k: environ.get(k, v) for k, v in ALLOCATOR_ENV.items()}


def started_with() -> dict[str, str]:
    """The MALLOC_* variables this process was started with (/proc/self/environ: the
    environment glibc read at start, not os.environ as changed since)."""
    try:
        raw = Path("/proc/self/environ").read_bytes()
    except OSError:  # not Linux
        return {}
    pairs = (item.decode(errors="replace").partition("=") for item in raw.split(b"\0") if item)
    return {k: v for k, _, v in pairs if k.startswith("MALLOC_")}


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    """Reset the kernel's peak RSS (VmHWM) of this process to its current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def step_peaks(specs: list[dict]) -> list[dict]:
    """Peak RSS that forward + backward of one batch adds, in bytes, for each spec, in turn,
    in this process (with ``ALLOCATOR_ENV`` freed buffers go back to the kernel, so one spec's
    peak does not lower the next one's).

    A spec: preset, grid (T', H', W') of tokens, and optional dit (DiTConfig overrides),
    batch, text_len, steps, threads. The model, its gradients (allocated up front, as after the
    first step) and the inputs are resident before the baseline is read; one small warm-up step
    runs first so that one-off allocations (thread pools, kernel caches) are not counted. The
    figure is the highest VmHWM over `steps` steps minus the baseline; `step_s` the mean time
    of those steps.
    """
    import time

    # lazy: the launchers (pipeline.stages, submit, tune) import worker_env without torch
    import torch
    import torch.nn.functional as F

    from training.dit import DiTConfig  # lazy: with torch, above

    out = []
    for spec in specs:
        torch.set_num_threads(int(spec.get("threads", 1)))
        torch.manual_seed(0)
        cfg = DiTConfig.from_preset(spec["preset"], **spec.get("dit", {}))
        model = cfg.build().train()
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        B, L = int(spec.get("batch", 1)), int(spec.get("text_len", 8))
        pt, ph, pw = (int(p) for p in cfg.patch_size)

        def batch(grid):
            x = torch.randn(B, cfg.in_channels, grid[0] * pt, grid[1] * ph, grid[2] * pw)  # (B, C, T, H, W)
            return x, torch.rand(B), torch.randn(B, L, cfg.text_dim), torch.ones(B, L, dtype=torch.bool)

        def step(inputs):
            x, t, text, mask = inputs
            F.mse_loss(model(x, t, text, mask), x).backward()

        step(batch((1, 2, 2)))  # warm-up: one-off allocations
        inputs = batch(spec["grid"])
        baseline = _status_bytes("VmRSS")
        _reset_peak()
        peak, steps, t0 = 0, int(spec.get("steps", 1)), time.perf_counter()
        for _ in range(steps):
            step(inputs)
            peak = max(peak, _status_bytes("VmHWM") - baseline)
        out.append({"peak_bytes": peak, "baseline_bytes": baseline, "tokens": B * grid_tokens(spec["grid"]),
                    "step_s": (time.perf_counter() - t0) / steps,
                    "params": sum(p.numel() for p in model.parameters())})
        del model, inputs
    return out


def grid_tokens(grid) -> int:
    t, h, w = grid
    return int(t) * int(h) * int(w)


def measure(specs: list[dict], allocator: bool | dict = True, timeout: float = 600) -> list[dict]:
    """`step_peaks(specs)` in a fresh Python process, with ``ALLOCATOR_ENV`` (True), glibc's
    default (False: every MALLOC_* and GLIBC_TUNABLES variable removed) or the variables given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    env.update({"PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                "OMP_NUM_THREADS": str(max(int(s.get("threads", 1)) for s in specs))})
    if allocator:
        env.update(ALLOCATOR_ENV if allocator is True else allocator)
    r = subprocess.run([sys.executable, "-m", "training.memory", json.dumps(specs)], capture_output=True,
                       text=True, env=env, cwd=REPO, timeout=timeout)
    if r.returncode:
        raise RuntimeError(f"memory measurement failed ({r.returncode}): {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(step_peaks(json.loads(sys.argv[1]))))
