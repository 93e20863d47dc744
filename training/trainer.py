"""Training: DeepSpeed ZeRO inside Ray Train workers.

The driver (``run_training``) starts a Ray Train ``TorchTrainer``; Ray Train creates the
process group (gloo on CPU, NCCL on GPU — the only difference between the two paths) and each
worker runs ``train_loop``: build the model, wrap it with ``deepspeed.initialize`` using the
config generated from Hydra, stream batches from the shards, and optimise the flow-matching
loss. Rank 0 alone logs to the tracker and writes the consolidated weights for evaluation.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from training.flow import FlowConfig


@dataclass
class TrainConfig:
    steps: int = 300
    global_batch_size: int = 16  # across all workers and accumulation steps
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio
    num_frames: int = 8
    height: int = 32
    width: int = 32
    precision: str = "fp32"  # fp32 | bf16
    seed: int = 0
    log_every: int = 10
    flow: FlowConfig = field(default_factory=FlowConfig)


def from_dict(cls, d: dict):
    """Rebuild a (nested) config dataclass from a plain dict, type-checked by OmegaConf."""
    from omegaconf import OmegaConf

    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), d))


def lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        cos = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cos

    return f


def micro_batch_size(cfg: TrainConfig, world: int, grad_accum: int) -> int:
    per = cfg.global_batch_size // (world * grad_accum)
    if per < 1 or per * world * grad_accum != cfg.global_batch_size:
        raise ValueError(
            f"train.global_batch_size={cfg.global_batch_size} must be a multiple of "
            f"workers ({world}) x deepspeed.grad_accum ({grad_accum})"
        )
    return per


def consolidated_state_dict(engine, zero_stage: int) -> dict[str, torch.Tensor] | None:
    """Full fp32 weights on rank 0 (None elsewhere). Every rank must call it (ZeRO-3 gathers)."""
    import deepspeed
    import torch.distributed as dist

    module = engine.module
    if zero_stage == 3:
        params = list(module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            sd = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
    else:
        sd = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
    return sd if dist.get_rank() == 0 else None


def train_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import deepspeed
    import ray.train
    import torch.distributed as dist
    from deepspeed.utils import logger as ds_logger

    from pipeline.tracking import TrackerSpec, log_lineage_paths, make_tracker
    from training.flow import drop_captions, flow_loss
    from training.loader import LoaderStats, batches
    from training.model import ModelConfig
    from training.text import Tokenizer
    from training.zero import DeepSpeedConfig, build_ds_config

    ds_logger.setLevel("WARNING")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tcfg: TrainConfig = from_dict(TrainConfig, config["train"])
    mcfg: ModelConfig = from_dict(ModelConfig, config["model"])
    dcfg: DeepSpeedConfig = from_dict(DeepSpeedConfig, config["deepspeed"])
    out = Path(config["out_dir"])
    device = ray.train.torch.get_device()

    torch.manual_seed(tcfg.seed)  # identical initial weights on every rank
    model = mcfg.build().to(device)
    micro = micro_batch_size(tcfg, world, dcfg.grad_accum)
    ds_config = build_ds_config(dcfg, micro, tcfg.precision)
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tcfg))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                           config=ds_config, dist_init_required=False)
    dtype = torch.bfloat16 if tcfg.precision == "bf16" else torch.float32

    tracker = make_tracker(TrackerSpec(**config["tracker"]), rank)
    tokenizer = Tokenizer(mcfg.text.max_length)
    stats = LoaderStats()
    data = batches(config["train_shards"], batch_size=micro, num_frames=tcfg.num_frames,
                   size=(tcfg.height, tcfg.width), rank=rank, world=world, seed=tcfg.seed,
                   stats=stats)
    gen = torch.Generator(device="cpu").manual_seed(tcfg.seed * 1000 + rank)
    patch = mcfg.dit.patch_size
    tokens_per_sample = (tcfg.num_frames // patch[0]) * (tcfg.height // patch[1]) * (
        tcfg.width // patch[2])
    history: list[dict] = []
    t_start = time.time()
    for step in range(tcfg.steps):
        t0 = time.time()
        wait = 0.0
        losses, per_t = [], []
        for _ in range(dcfg.grad_accum):
            tw = time.time()
            video, captions = next(data)  # (B, 3, T, H, W)
            wait += time.time() - tw
            video = video.to(device, dtype)
            ids, mask = tokenizer(drop_captions(captions, tcfg.flow, gen))  # (B, L)
            ids, mask = ids.to(device), mask.to(device)
            loss, per_sample, t = flow_loss(lambda x, tt: engine(x, tt, ids, mask),
                                            video, tcfg.flow, generator=gen)
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach().float())
            per_t.append((t.detach().cpu(), per_sample.detach().float().cpu()))
        step_time = time.time() - t0
        loss_mean = torch.stack(losses).mean().to(device)  # ()
        dist.all_reduce(loss_mean)  # SUM: gloo has no AVG
        loss_mean /= world
        if not torch.isfinite(loss_mean):
            raise FloatingPointError(f"non-finite loss at step {step}")
        if rank == 0 and (step % tcfg.log_every == 0 or step == tcfg.steps - 1):
            ts = torch.cat([a for a, _ in per_t])  # (B,)
            ls = torch.cat([b for _, b in per_t])  # (B,)
            m = {
                "train/loss": float(loss_mean),
                "train/lr": float(engine.get_lr()[0]),
                "train/grad_norm": float(engine.get_global_grad_norm() or 0.0),
                "train/step_time_s": step_time,
                "train/data_wait_s": wait,
                "train/samples_per_s": micro * world * dcfg.grad_accum / step_time,
                "train/tokens_per_s": tokens_per_sample * micro * world * dcfg.grad_accum
                / step_time,
                "train/skipped_samples": stats.skipped,
                "train/epoch": stats.epochs,
            }
            for lo, hi in ((0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0)):
                sel = (ts >= lo) & (ts < hi)
                if sel.any():
                    m[f"train/loss_t{lo:.2f}-{hi:.2f}"] = float(ls[sel].mean())
            tracker.log(m, step=step)
            history.append({"step": step, **m})
            print(f"step {step:5d} loss {m['train/loss']:.4f} "
                  f"{m['train/samples_per_s']:.1f} samples/s", flush=True)

    engine.save_checkpoint(str(out / "checkpoints"), tag=f"step{tcfg.steps:08d}")
    sd = consolidated_state_dict(engine, dcfg.zero_stage)
    run_ids: list = [None] * world
    dist.all_gather_object(run_ids, os.environ.get("SPACETIME_RUN_ID"))
    if rank == 0:
        torch.save(sd, out / "model.pt")
        (out / "model_config.json").write_text(json.dumps(config["model"], indent=2))
        (out / "train_config.json").write_text(json.dumps(config["train"], indent=2))
        summary = {"final_loss": history[-1]["train/loss"], "steps": tcfg.steps,
                   "train_seconds": time.time() - t_start, "skipped_samples": stats.skipped,
                   "world_size": world, "micro_batch": micro, "zero_stage": dcfg.zero_stage,
                   "run_ids_seen": run_ids}
        tracker.summary(summary)
        log_lineage_paths(tracker, config["stage"], config["stage_hash"], str(out),
                          config["inputs"])
        result = {**summary, "tracking": tracker.info(), "history": history}
        tracker.finish()
        (out / "train_result.json").write_text(json.dumps(result, indent=2))
    dist.barrier()


def run_training(*, train_cfg: TrainConfig, model_cfg, ds_cfg, cluster, out_dir: Path,
                 train_shards: list[str], tracker_spec, stage: str, stage_hash: str,
                 inputs: dict[str, str]) -> dict:
    """Driver side: start the workers, wait, return rank 0's result."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    out_dir = Path(out_dir).resolve()
    config = {
        "train": asdict(train_cfg), "model": asdict(model_cfg), "deepspeed": asdict(ds_cfg),
        "out_dir": str(out_dir), "train_shards": train_shards, "tracker": asdict(tracker_spec),
        "stage": stage, "stage_hash": stage_hash, "inputs": inputs,
    }
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=cluster.num_workers, use_gpu=cluster.use_gpu,
                                     resources_per_worker={"CPU": cluster.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if cluster.use_gpu else "gloo"),
        run_config=RunConfig(storage_path=str(out_dir / "ray_train"), name="train"),
    )
    trainer.fit()
    return json.loads((out_dir / "train_result.json").read_text())

