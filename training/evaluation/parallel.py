"""Sampling on sequence-parallel Ray Train workers: the one launcher generation and evaluation share.

    on_sequence_parallel_workers(work, P) --TorchTrainer, P workers (gloo on CPU, NCCL on GPU)-->
        every rank: work(device, group) with the world as one Ulysses group
        rank 0: its videos (uint8 (N, T, H, W, 3)) and a small JSON record back to the caller

``work`` loads the model itself (each worker is its own process), applies
``training.ulysses.apply_sequence_parallel`` with the group it is given, and samples. Every rank
runs the whole sampler on the same inputs, so no rank waits in a collective another one skipped
(the hang peers report when only rank 0 samples with SP on); the merge gives every rank the
whole output, so each step of the sampler sees the same state everywhere.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from training.ulysses import sequence_groups


def _worker(config: dict) -> None:
    import ray.train  # lazy: ray.train import ~3.7 s, only on sampling workers
    import ray.train.torch  # lazy: as above

    ctx = ray.train.get_context()
    group, _, _ = sequence_groups(ctx.get_world_size())
    videos, record = config["work"](ray.train.torch.get_device(), group)
    if ctx.get_world_rank() == 0:
        np.save(config["out"], videos)
        Path(config["out"]).with_suffix(".json").write_text(json.dumps(record))


def on_sequence_parallel_workers(work: Callable, sp: int, device: str = "cpu",
                                 address: str | None = None) -> tuple[np.ndarray, dict]:
    """`work(device, group) -> (videos, record)` on `sp` Ray Train workers in one sequence-parallel
    group; rank 0's result. Joins `address` (or the running Ray), else starts a local one."""
    import ray  # lazy: ray ~1.7 s to import, only for sequence-parallel sampling
    from ray.train import RunConfig, ScalingConfig  # lazy: as above
    from ray.train.torch import TorchConfig, TorchTrainer  # lazy: as above

    gpu = str(device).startswith("cuda")
    if not ray.is_initialized():
        ray.init(address=address, configure_logging=False, log_to_driver=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "videos.npy")
        TorchTrainer(_worker, train_loop_config={"work": work, "out": out},
                     scaling_config=ScalingConfig(num_workers=sp, use_gpu=gpu),
                     torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
                     run_config=RunConfig(storage_path=tmp, name="sample")).fit()
        return np.load(out), json.loads(Path(out).with_suffix(".json").read_text())
