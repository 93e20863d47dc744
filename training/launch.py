"""Launch: the driver side of training, on Ray Train.

``run_training`` checks what it can before any worker starts (the latent data against the
model, the cluster's worker resources, a resumed checkpoint's world size), then starts a Ray Train
``TorchTrainer`` whose workers each run ``training.trainer.train_loop``. Ray Train creates the
process group (gloo on CPU, NCCL on GPU: the only difference between the two paths; see
``worker_resources``).

Failures: Ray Train restarts a dead worker group up to ``train.max_failures`` times; each
restart resumes from the latest complete checkpoint. Preemption: SIGTERM to the driver is
relayed as ``PREEMPT`` in the output directory (the workers checkpoint and stop), and
``run_training`` raises ``Preempted``. A run the non-finite guard stopped returns from the workers
(so Ray Train does not retry it) and ``run_training`` raises its message.
"""

from __future__ import annotations

import json
import signal
import threading
from dataclasses import asdict
from pathlib import Path

from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from data.storage import Store
from training.checkpoint import Checkpoints
from training.trainer import (
    EXPORTS,
    NONFINITE,
    PREEMPT,
    Preempted,
    TrainConfig,
    check_latent_data,
    follow_data,
    micro_batch_size,
    train_loop,
)
from training.ulysses import check_sequence_parallel
from training.warm_start import check_init


def worker_resources(cluster) -> dict:
    """Ray Train's per-worker scaling from the cluster config: CPUs and GPUs per worker
    (``cluster.gpus_per_worker``; 0 runs on CPU with gloo, > 0 on GPU with NCCL)."""
    gpus = float(cluster.gpus_per_worker or 0)
    if gpus < 0:
        raise ValueError(f"cluster.gpus_per_worker must be >= 0, got {gpus}")
    res = {"CPU": cluster.cpus_per_worker, **({"GPU": gpus} if gpus else {})}
    return {"num_workers": cluster.num_workers, "use_gpu": gpus > 0, "resources_per_worker": res,
            "backend": "nccl" if gpus > 0 else "gloo"}


def check_resume_world_size(ckpts, num_workers: int, sequence_parallel: int = 1) -> None:
    """The checkpoint training would resume from must have been written by as many workers, in
    sequence-parallel groups of the same degree: reader positions, generators and ZeRO
    partitions are per rank. Raises naming the key and both numbers."""
    record = ckpts.resume_record()
    if record is None:
        return
    saved = record.get("world_size")
    if saved is not None and saved != num_workers:
        raise ValueError(
            f"the latest checkpoint in {ckpts.root} was written by {saved} training workers but "
            f"cluster.num_workers={num_workers}: resume with cluster.num_workers={saved}, or "
            f"start this stage over (spacetime run --only train)")
    saved_sp = int(record.get("sequence_parallel", 1))  # older checkpoints: no SP
    if saved_sp != sequence_parallel:
        raise ValueError(
            f"the latest checkpoint in {ckpts.root} was written at sequence parallel degree "
            f"{saved_sp} but cluster.sequence_parallel={sequence_parallel}: resume with "
            f"cluster.sequence_parallel={saved_sp}, or start this stage over (spacetime run --only train)")


def run_training(*, train_cfg: TrainConfig, model_cfg, ds_cfg, cluster, out_dir: Path,
                 train_shards: list[str], tracker_spec, stage: str, stage_hash: str,
                 inputs: dict[str, str], latent: dict | None = None,
                 ckpt_mirror: str | None = None, init: dict | None = None) -> dict:
    """Driver side: start the workers, relay SIGTERM, wait, return rank 0's result.

    latent: for train.data.kind=latent, the latent shards' record (their ``latent_space.json``).
    ckpt_mirror: a URL every checkpoint is uploaded to (a bucket run root), so workers on any
    node, or a later run on another machine, resume from it.
    init: start from another training output's weights (a recipe's later stage; see
    ``training.warm_start``)."""
    check_latent_data(train_cfg, model_cfg, latent)  # before any worker starts
    out_dir = Path(out_dir).resolve()
    res = worker_resources(cluster)
    sp = int(getattr(cluster, "sequence_parallel", 1))
    check_init(init, cluster.num_workers, sp)
    check_sequence_parallel(model_cfg.dit.num_heads, sp, cluster.num_workers)
    micro_batch_size(train_cfg, cluster.num_workers, ds_cfg.grad_accum, sp)  # raises naming the keys
    check_resume_world_size(Checkpoints(out_dir / "checkpoints", train_cfg.keep_checkpoints,
                                        mirror=ckpt_mirror), cluster.num_workers, sp)
    model_cfg = follow_data(train_cfg, model_cfg, latent)  # what model_config.json records
    if res["use_gpu"] and train_cfg.precision == "fp32":
        print("training in fp32 on GPUs: set train.precision=bf16 for bf16 matmuls (the usual "
              "GPU setting)", flush=True)
    for name in (PREEMPT, NONFINITE):
        (out_dir / name).unlink(missing_ok=True)
    (out_dir / "train_result.json").unlink(missing_ok=True)
    config = {
        "train": asdict(train_cfg), "model": asdict(model_cfg), "deepspeed": asdict(ds_cfg),
        "out_dir": str(out_dir), "train_shards": train_shards, "tracker": asdict(tracker_spec),
        "stage": stage, "stage_hash": stage_hash, "inputs": inputs,
        "peak_flops_per_worker": (cluster.peak_tflops_per_worker or 0) * 1e12,
        "latent": latent, "ckpt_mirror": ckpt_mirror, "sequence_parallel": sp, "init": init,
    }
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=res["num_workers"], use_gpu=res["use_gpu"],
                                     resources_per_worker=res["resources_per_worker"]),
        torch_config=TorchConfig(backend=res["backend"]),
        run_config=RunConfig(storage_path=str(out_dir / "ray_train"), name="train",
                             failure_config=FailureConfig(max_failures=train_cfg.max_failures)),
    )
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, lambda s, f: (out_dir / PREEMPT).touch())
    try:
        trainer.fit()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    stop = out_dir / NONFINITE
    if stop.exists():  # the workers returned (so Ray Train did not retry): the run diverged
        msg = json.loads(stop.read_text())["message"]
        stop.unlink()
        raise FloatingPointError(msg)
    result = out_dir / "train_result.json"
    if not result.exists() and ckpt_mirror:  # rank 0 ran on another node: fetch its exports
        stage = Store(ckpt_mirror.rsplit("/checkpoints", 1)[0])
        if stage.exists("train_result.json"):
            for name in EXPORTS:
                stage.get_file(name, out_dir / name)
    if not result.exists():
        if (out_dir / PREEMPT).exists():
            (out_dir / PREEMPT).unlink()
            raise Preempted(f"training was preempted; checkpoint in {out_dir / 'checkpoints'}; "
                            "run the stage again to resume")
        raise RuntimeError("training finished without a result file")
    return json.loads(result.read_text())
