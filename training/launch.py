"""Launch: the driver side of training, on Ray Train.

``run_training`` checks what it can before any worker starts (the latent data against the
model, the cluster's worker resources, a resumed checkpoint's world size), then starts a Ray Train
``TorchTrainer`` whose workers each run ``training.trainer.train_loop``. Ray Train creates the
process group (gloo on CPU, NCCL on GPU: the only difference between the two paths; see
``worker_resources``).

Checkpoints and metrics go through Ray Train's own API (``training.checkpoint``): the run's
storage path is the stage output (its ``checkpoints/`` is Ray Train's run directory, on a local
disk or straight in the bucket), so ``trainer.fit()``'s Result, ``Result.from_path`` and Ray Tune
(``pipeline.tune``) see every checkpoint with its metrics.

Failures: Ray Train restarts a dead worker group up to ``train.max_failures`` times; each
restart resumes from the latest registered checkpoint, as does a rerun of the stage. Preemption: SIGTERM to the driver is
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

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.trainable.trainable_fn_utils import _in_tune_session

from data.storage import Store
from training.checkpoint import RUN_DIR, RunCheckpoints, ray_storage
from training.memory import worker_env
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


def check_resume_world_size(ckpts: RunCheckpoints, num_workers: int,
                            sequence_parallel: int = 1) -> None:
    """The checkpoint training would resume from must have been written by as many workers, in
    sequence-parallel groups of the same degree: reader positions, generators and ZeRO
    partitions are per rank. Raises naming the key and both numbers."""
    latest = ckpts.latest()
    if latest is None:
        return
    record = latest[1]
    saved = record.get("world_size")
    if saved is not None and saved != num_workers:
        raise ValueError(
            f"the latest checkpoint in {ckpts.path} was written by {saved} training workers but "
            f"cluster.num_workers={num_workers}: resume with cluster.num_workers={saved}, or "
            f"start this stage over (spacetime run --only train)")
    saved_sp = int(record.get("sequence_parallel", 1))  # older checkpoints: no SP
    if saved_sp != sequence_parallel:
        raise ValueError(
            f"the latest checkpoint in {ckpts.path} was written at sequence parallel degree "
            f"{saved_sp} but cluster.sequence_parallel={sequence_parallel}: resume with "
            f"cluster.sequence_parallel={saved_sp}, or start this stage over (spacetime run --only train)")


def run_config(storage: str | Path, train_cfg: TrainConfig, callbacks=(), cpu: bool = True) -> RunConfig:
    """Ray Train's run: its directory is the stage output's ``checkpoints/`` (local, or in the
    bucket), keeping ``train.keep_checkpoints`` checkpoints, retrying ``train.max_failures``
    times. Inside a Ray Tune trial, Tune's report callback passes every report on to the trial.
    callbacks: more Ray Train callbacks. cpu: the workers train on CPUs, so they start with the
    allocator setting of ``training.memory`` (glibc reads it at process start: only a worker's
    runtime env can set it; RSS then follows live memory instead of glibc's retained heap)."""
    path, fs = ray_storage(storage)
    if _in_tune_session():  # a Ray Tune trial (pipeline.tune): every report is the trial's too
        callbacks = [*callbacks, TuneReportCallback()]
    return RunConfig(storage_path=path, storage_filesystem=fs, name=RUN_DIR,
                     checkpoint_config=CheckpointConfig(num_to_keep=train_cfg.keep_checkpoints),
                     failure_config=FailureConfig(max_failures=train_cfg.max_failures),
                     callbacks=list(callbacks),
                     worker_runtime_env={"env_vars": worker_env()} if cpu else None)


def run_training(*, train_cfg: TrainConfig, model_cfg, ds_cfg, cluster, out_dir: Path,
                 train_shards: list[str], tracker_spec, stage: str, stage_hash: str,
                 inputs: dict[str, str], latent: dict | None = None,
                 stage_url: str | None = None, init: dict | None = None,
                 callbacks=()) -> dict:
    """Driver side: start the workers, relay SIGTERM, wait, return rank 0's result.

    latent: for train.data.kind=latent, the latent shards' record (their ``latent_space.json``).
    stage_url: the stage output's URL when the run root is a bucket: Ray Train's storage path
    (workers on any node upload their checkpoints there, and a rerun anywhere resumes from it),
    and where rank 0 uploads the exports.
    init: start from another training output's weights (a recipe's later stage; see
    ``training.warm_start``).
    callbacks: Ray Train callbacks (see ``run_config``)."""
    check_latent_data(train_cfg, model_cfg, latent)  # before any worker starts
    out_dir = Path(out_dir).resolve()
    res = worker_resources(cluster)
    sp = int(getattr(cluster, "sequence_parallel", 1))
    check_init(init, cluster.num_workers, sp)
    check_sequence_parallel(model_cfg.dit.num_heads, sp, cluster.num_workers)
    micro_batch_size(train_cfg, cluster.num_workers, ds_cfg.grad_accum, sp)  # raises naming the keys
    storage = stage_url or out_dir
    check_resume_world_size(RunCheckpoints(storage), cluster.num_workers, sp)
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
        "latent": latent, "stage_url": stage_url, "sequence_parallel": sp, "init": init,
    }
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=res["num_workers"], use_gpu=res["use_gpu"],
                                     resources_per_worker=res["resources_per_worker"]),
        torch_config=TorchConfig(backend=res["backend"]),
        run_config=run_config(storage, train_cfg, callbacks, cpu=not res["use_gpu"]),
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
    if not result.exists() and stage_url:  # rank 0 ran on another node: fetch its exports
        stage = Store(stage_url)
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
