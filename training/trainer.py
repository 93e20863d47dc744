"""Training: one Ray Train worker's loop (``train_loop``), DeepSpeed ZeRO around a pure DiT.

The driver (``training.launch.run_training``) starts the workers; each runs ``train_loop``,
which reads as its steps: build (the configs, the model, identical on every rank), parallelize
(``training.parallelize``: the DeepSpeed engine, the one place parallelism is applied), restore
(Ray Train's latest registered checkpoint, if any), then the step loop (``TrainStep``: caption
dropout and ``TextConditioning``, forward, backward, optimizer step; the ``NonFiniteGuard``; the
EMA; ``StepLogger``'s metrics; checkpoints, reported to Ray Train with those metrics) and the export of the weights, configs and result. Rank 0
alone logs and exports.

Preemption: SIGTERM to the driver (or to a worker, where the signal can be caught) writes
``PREEMPT`` in the output directory; at the next step boundary every rank saves a checkpoint and
the stage stops as failed-but-resumable, and the next ``spacetime run`` continues from there.
Non-finite losses: a step with one on any rank is skipped whole (every micro-batch of it); after
``train.max_nonfinite`` in a row the workers write ``NONFINITE.json`` and return (so Ray Train
does not retry a run that would diverge again) and the driver raises the message.

Latent training (``train.data.kind=latent``): the shards are latent shards from
``training.latent.precompute`` and ``run_training`` gets their ``latent_space.json`` record; batches are
latents used as they are (no ``normalize``), the DiT's ``model.dit.in_channels`` follows the
VAE's latent channels (``null``; an explicit value must equal them), and every bucket must be
a window the shards hold (``check_latent_buckets``: the encoded height and width, ``1 + k * tc``
frames, at most the encoded window unless ``latent.span=whole`` stored whole clips). When the shards hold a frozen text encoder's
caption tokens (the record's ``text``), batches bring their text and the encoder never runs
(the model's encoder must be the one that made them: same identity). The record is saved under
``latent`` in ``train_config.json`` so that evaluation decodes samples through the same VAE
(``training.latent.space.load_latent_space(train_dir)``).
"""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from data.checks import check_ranges, from_dict
from data.progress import Progress
from data.storage import Store
from data.tracking import TrackerSpec, log_lineage_paths, make_tracker
from training.checkpoint import load_tag, report_checkpoint, rng_state, set_rng_state, tag_of
from training.ema import EMA
from training.flops import matmul_flops_per_s
from training.flow import FlowConfig
from training.loader import ClipStream, Loader
from training.loader_config import Bucket, LoaderConfig, resolve_batch_sizes
from training.lockstep import TorchPeers
from training.memory import started_with
from training.model import ModelConfig, save_pretrained
from training.parallelize import DeepSpeedConfig, full_params, parallelize
from training.patches import check_patchable
from training.prebuild import use_venv_ninja
from training.pretrained import FILES as PRETRAINED_FILES
from training.step import StepResult, TextConditioning, TrainStep, reduce_counts
from training.text_separation import caption_pairs
from training.ulysses import sequence_groups
from training.warm_start import carry_optimizer, load_initial_weights

PREEMPT = "PREEMPT"
NONFINITE = "NONFINITE.json"  # written by rank 0 when the non-finite guard stops the run
# What rank 0 writes into the stage output besides checkpoints (train_result.json last).
EXPORTS = ("model.pt", "model_ema.pt", "model_config.json", "train_config.json",
           *(f"{d}/{f}" for d in ("dit", "dit_ema") for f in PRETRAINED_FILES),
           "train_result.json")


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
    log_every: int = 1  # steps between metric logs (a log costs ~3 ms: W&B offline + jsonl)
    progress_every_s: float = 10.0  # a progress line (step/total, rate, ETA) at most this often
    ckpt_every: int = 100  # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 2
    ema_decay: float = 0.999
    ema_every: int = 1  # steps between EMA updates (each gathers the weights under ZeRO-3)
    max_nonfinite: int = 5  # consecutive non-finite losses before the run stops
    max_failures: int = 2  # worker-group restarts Ray Train may make
    text_sep_every: int = 50  # steps between logs of the text features' separation (train/text_sep/*)
    flow: FlowConfig = field(default_factory=FlowConfig)
    data: LoaderConfig = field(default_factory=LoaderConfig)

    def __post_init__(self) -> None:
        check_ranges(self, steps=">= 1", global_batch_size=">= 1", lr="> 0", weight_decay=">= 0",
                     warmup_steps=">= 0", min_lr_ratio="in [0, 1]", num_frames=">= 1",
                     height=">= 1", width=">= 1", log_every=">= 1", progress_every_s=">= 0",
                     ckpt_every=">= 1",
                     keep_checkpoints=">= 1", ema_decay="in [0, 1]", ema_every=">= 1",
                     max_nonfinite=">= 1", max_failures=">= 0", text_sep_every=">= 1")


class Preempted(Exception):
    pass


def lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        cos = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cos

    return f


def param_groups(model, lr: float, text_lr_scale: float) -> list[dict]:
    """The optimizer's parameter groups: the DiT at `lr`; a trained text encoder at
    lr * text_lr_scale in its own group (LambdaLR scales each group's rate alike); a frozen
    encoder has no trainable parameters and no group."""
    text_ids = {id(p) for p in model.text_encoder.parameters()}
    params = model.trainable_parameters()
    groups = [{"params": [p for p in params if id(p) not in text_ids], "lr": lr}]
    text = [p for p in params if id(p) in text_ids]
    if text:
        groups.append({"params": text, "lr": lr * text_lr_scale})
    return groups


def micro_batch_size(cfg: TrainConfig, world: int, grad_accum: int, sequence_parallel: int = 1) -> int:
    """Samples per data-parallel rank per micro-step: the ranks of one sequence-parallel group
    share their samples, so the data-parallel world is workers / sequence_parallel."""
    if cfg.data.pack and sequence_parallel > 1:  # here: the CLI's preflight and run_training ask
        raise ValueError(f"train.data.pack=true is not supported with cluster.sequence_parallel="
                         f"{sequence_parallel}: packed rows are not split across ranks; set "
                         f"train.data.pack=false or cluster.sequence_parallel=1")
    dp = world // sequence_parallel
    per = cfg.global_batch_size // (dp * grad_accum)
    if per < 1 or per * dp * grad_accum != cfg.global_batch_size:
        sp = f" / cluster.sequence_parallel ({sequence_parallel})" if sequence_parallel > 1 else ""
        raise ValueError(
            f"train.global_batch_size={cfg.global_batch_size} must be a multiple of "
            f"workers ({world}){sp} x deepspeed.grad_accum ({grad_accum})"
        )
    return per


def check_latent_data(tcfg: TrainConfig, mcfg, latent: dict | None) -> None:
    """Latent training: the data, the DiT and the VAE must agree (errors name the keys). Raw
    clips: every configured bucket must cut into the DiT's patches."""
    if tcfg.data.kind != "latent":
        if latent is not None:
            raise ValueError("a latent space was given but train.data.kind is "
                             f"{tcfg.data.kind!r}; set train.data.kind=latent to train on latent shards")
        for i, b in enumerate(tcfg.data.buckets):  # e.g. a 1-frame (image) bucket under pt = 2
            check_patchable((b.num_frames, b.height, b.width), mcfg.dit.patch_size,
                            what=f"train.data.buckets[{i}] (frames, height, width)", key="model.dit.patch_size")
        return
    if latent is None:
        raise ValueError("train.data.kind=latent needs the latent shards' record (latent_space.json of "
                         "the precompute output): pass latent= to run_training")
    C = int(latent["channels"])
    if mcfg.dit.in_channels not in (None, C):
        raise ValueError(f"model.dit.in_channels ({mcfg.dit.in_channels}) must equal the VAE's latent channels "
                         f"({C}, latent.kind={latent['config']['kind']}, latent.path={latent['config']['path']}); "
                         f"set model.dit.in_channels={C}, or null to follow the VAE")
    text = latent.get("text")
    if text and mcfg.text.frozen and (text["dim"], text["max_length"]) != (mcfg.text.dim, mcfg.text.max_length):
        raise ValueError(f"the latent shards hold caption tokens of the {text['kind']} encoder {text['name']!r} "
                         f"(dim {text['dim']}, max_length {text['max_length']}), not of model.text (dim "
                         f"{mcfg.text.dim}, max_length {mcfg.text.max_length}): precompute them again")
    try:
        check_latent_buckets(buckets_of(tcfg, 1), latent["video_shape"], latent.get("span", "window"),
                             int(latent["compression"][0]), mcfg.dit.patch_size, latent["compression"])
    except ValueError as e:
        raise ValueError(f"the latent shards ({latent['config']['kind']} VAE): {e}") from None


def check_latent_buckets(buckets: list[Bucket], video_shape, span: str, tc: int | None, patch,
                         compression=None) -> None:
    """Every training shape must be a window the latent shards hold: their encoded height and
    width, ``1 + k * tc`` frames (``tc`` None: not known yet, a diffusers VAE before it loads),
    and for ``latent.span=window`` no more frames than were encoded; with `compression`, its
    grid of latents must fit the DiT's patch. Errors name the keys."""
    T0, H, W = (int(v) for v in video_shape)
    for b in buckets:
        shape = (b.num_frames, b.height, b.width)
        if (b.height, b.width) != (H, W):
            raise ValueError(f"they hold clips encoded at height x width {H}x{W}, but a training shape is "
                             f"(frames, height, width)={shape}: in latent space every shape has the encoded "
                             f"size (train.height/width, train.data.buckets, latent.height/width)")
        if tc and (b.num_frames - 1) % tc:
            raise ValueError(f"training shape {shape}: a window of latents is 1 + k*{tc} frames "
                             f"(e.g. {1 + tc}, {1 + 4 * tc}, {1 + 8 * tc}); set train.num_frames or the "
                             f"buckets' num_frames to one")
        if span != "whole" and b.num_frames > T0:
            raise ValueError(f"they hold one window of {T0} frames per clip (latent.span=window), "
                             f"but a training shape is {shape}: set latent.span=whole to store whole "
                             f"clips, or train on at most {T0} frames")
        if compression is not None:
            grid = (1 + (b.num_frames - 1) // int(compression[0]), H // int(compression[1]),
                    W // int(compression[2]))
            check_patchable(grid, patch, what=f"the grid of latents of {shape}", key="model.dit.patch_size")


def clip_tokens(tcfg: TrainConfig, mcfg, latent: dict | None):
    """`bucket -> the DiT's spacetime tokens per clip of its shape` (pixels, or the latents of
    the record's compression): what ``train.data.token_budget`` counts."""
    patch = mcfg.dit.patch_size
    comp = [int(c) for c in latent["compression"]] if tcfg.data.kind == "latent" and latent else [1, 1, 1]

    def tokens(b: Bucket) -> int:
        grid = (1 + (b.num_frames - 1) // comp[0], b.height // comp[1], b.width // comp[2])
        return math.prod(-(-g // p) for g, p in zip(grid, patch))

    return tokens


def follow_data(tcfg: TrainConfig, mcfg, latent: dict | None):
    """The model config with ``model.dit.in_channels: null`` resolved from the data: the VAE's
    latent channels for latent shards, 3 (RGB) for raw clips."""
    if mcfg.dit.in_channels is not None:
        return mcfg
    C = int(latent["channels"]) if tcfg.data.kind == "latent" and latent is not None else 3
    return replace(mcfg, dit=replace(mcfg.dit, in_channels=C))


def buckets_of(cfg: TrainConfig, micro: int, tokens=None) -> list[Bucket]:
    """The loader's buckets: the configured ones, or one of the train shape at the micro batch.
    With `tokens` (``clip_tokens``), batch sizes 0 are resolved from ``train.data.token_budget``;
    without, they stay 0 (shapes only)."""
    buckets = list(cfg.data.buckets) or [Bucket(cfg.num_frames, cfg.height, cfg.width, micro)]
    return resolve_batch_sizes(buckets, cfg.data.token_budget, tokens) if tokens else buckets


class NonFiniteGuard:
    """Counts consecutive non-finite losses; raises after `limit` in a row."""

    def __init__(self, limit: int):
        self.limit, self.run, self.total = limit, 0, 0

    def check(self, finite: bool, step: int) -> bool:
        """Returns True when the step should be applied."""
        if finite:
            self.run = 0
            return True
        self.run += 1
        self.total += 1
        if self.run >= self.limit:
            raise FloatingPointError(
                f"{self.run} consecutive non-finite losses (last at step {step}); stopping. "
                f"Lower train.lr, check the data, or raise train.max_nonfinite")
        return False

    def stop_reason(self, finite: bool, step: int) -> str | None:
        """``check`` with the message returned, not raised: the workers finish the step (its
        metrics) and return, so that Ray Train does not retry a run that would diverge again."""
        try:
            self.check(finite, step)
        except FloatingPointError as e:
            return str(e)
        return None


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def _install_sigterm(flag_path: Path) -> None:
    """Workers: turn SIGTERM into a preemption request when we own the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return  # Ray Train runs the loop in a thread; the driver relays SIGTERM instead

    def handler(signum, frame):
        flag_path.touch()

    signal.signal(signal.SIGTERM, handler)


# ----- the steps of train_loop --------------------------------------------------------------
def worker_configs(config: dict[str, Any]) -> tuple[TrainConfig, ModelConfig, DeepSpeedConfig]:
    """The run's config sections, as the driver resolved them (``run_training``'s ``config``)."""
    return (from_dict(TrainConfig, config["train"]), from_dict(ModelConfig, config["model"]),
            from_dict(DeepSpeedConfig, config["deepspeed"]))


def make_ema(engine, decay: float, zero_stage: int, rank: int) -> EMA | None:
    """Rank 0's EMA of the trainable weights (every rank gathers them under ZeRO-3)."""
    with full_params(engine, zero_stage) as named:
        return EMA(named, decay) if rank == 0 else None


def peak_flops(config: dict[str, Any], dtype: torch.dtype, device: torch.device,
               rank: int) -> float:
    """MFU's denominator: the cluster config's peak FLOP/s per worker, or (unset, e.g. on a
    CPU) rank 0's measured dense matmul rate in the training precision."""
    return config.get("peak_flops_per_worker") or (
        matmul_flops_per_s(n=1024, seconds=0.5, dtype=dtype, device=device) if rank == 0 else 0.0)


def restore(engine, gen: torch.Generator, tcfg: TrainConfig, zero_stage: int,
            rank: int) -> tuple[int, dict | None, EMA | None]:
    """Resume from Ray Train's latest registered checkpoint, if there is one (a restarted worker
    group, or a rerun of the stage: Ray restores its snapshot from the storage path): the engine
    (weights, optimizer, scheduler), this rank's generator and rank 0's EMA.
    Returns (the first step to run, this rank's loader position or None, rank 0's EMA).

    The EMA is made after the engine is loaded: under ZeRO-3, gathering the weights before
    ``load_checkpoint`` leaves DeepSpeed's parameter-fetch trace out of step with the next
    iterations ("tracing error ... expected the next parameters in the fetch queue")."""
    import ray.train  # lazy: see train_loop

    checkpoint = ray.train.get_checkpoint()
    start, rank_state, ema_state = 0, None, None
    if checkpoint is not None:
        with checkpoint.as_directory() as d:  # a bucket's checkpoint: downloaded, then dropped
            start, rank_state, ema_state = load_tag(engine, Path(d), rank)
        set_rng_state(rank_state["rng"], gen)
    ema = make_ema(engine, tcfg.ema_decay, zero_stage, rank)
    if ema is not None and ema_state is not None:
        ema.load_state_dict(ema_state)
    if checkpoint is not None and rank == 0:
        print(f"resumed from {tag_of(start)} at step {start}", flush=True)
    return start, None if rank_state is None else rank_state["loader"], ema


def update_ema(engine, ema: EMA | None, zero_stage: int) -> None:
    """Every rank gathers the full weights (under ZeRO-3); rank 0 holds the EMA."""
    with full_params(engine, zero_stage) as named:
        if ema is not None:
            ema.update(named)


class StepLogger:
    """A step's metrics (train/*), logged by rank 0 every ``train.log_every`` steps and at the
    last, with the text features' separation (train/text_sep/*) every ``train.text_sep_every``
    steps, which every rank measures. ``last_loss``: the latest logged train/loss.
    Rank 0 also writes a progress line (``data.progress``: step/total, rate, ETA, the latest
    loss) after the first step, at most every ``train.progress_every_s`` seconds, after the last
    and when the run stops."""

    def __init__(self, tracker, tcfg: TrainConfig, engine, data: Loader, guard: NonFiniteGuard,
                 text: TextConditioning, *, rank: int, world: int, peak: float,
                 device: torch.device, stage: str = "train"):
        self.tracker, self.tcfg, self.engine, self.data = tracker, tcfg, engine, data
        self.guard, self.text, self.rank, self.world = guard, text, rank, world
        self.peak, self.device = peak, device
        self.sep_pairs = caption_pairs()
        self.last_loss: float | None = None
        self.last_metrics: dict[str, float] = {}  # reported to Ray Train with each checkpoint
        self.last_rate = 0.0  # the latest logged train/samples_per_s
        self.stage = stage
        self.progress: Progress | None = None  # rank 0's progress lines

    def __call__(self, step: int, r: StepResult, stats: torch.Tensor, step_time: float,
                 stopped: str | None) -> None:
        last = step == self.tcfg.steps - 1
        m = None
        if self.rank == 0 and (step % self.tcfg.log_every == 0 or last):
            m = self.metrics(r, stats, step_time)
        if step % self.tcfg.text_sep_every == 0 or last:
            sep = self.text.separation(self.sep_pairs)
            if m is not None:
                m.update({f"train/text_sep/{a}": v for a, v in sep.items()})
        if m is not None:
            self.tracker.log(m, step=step)
            self.last_loss = m["train/loss"]
            self.last_metrics = {**m, "train/step": step}
            self.last_rate = m["train/samples_per_s"]
        if self.rank == 0:
            if self.progress is None:  # counted from this run's first step (a resume starts later)
                self.progress = Progress(self.stage, self.tcfg.steps, unit="step",
                                         every_s=self.tcfg.progress_every_s, start=step,
                                         started=time.monotonic() - step_time)
            loss = "" if self.last_loss is None else (
                f"loss {self.last_loss:.4f}, {self.last_rate:.1f} samples/s")
            self.progress.update(step + 1, loss, force=bool(stopped))

    def metrics(self, r: StepResult, stats: torch.Tensor, step_time: float) -> dict[str, float]:
        world, data = self.world, self.data
        m = {
            "train/loss": float(stats[0] / stats[1]) if stats[1] > 0 else float("nan"),
            "train/lr": r.lr,
            "train/grad_norm": float(r.grad_norm if r.grad_norm is not None
                                     else self.engine.get_global_grad_norm() or 0.0),
            "train/step_time_s": step_time,
            "train/data_wait_s": r.wait,
            "train/compute_s": step_time - r.wait,
            "train/samples_per_s": float(stats[2]) / step_time,
            "train/tokens_per_s": float(stats[3]) / step_time,
            "train/tflops_per_worker": float(stats[4]) / step_time / world / 1e12,
            "train/mfu": float(stats[4]) / step_time / world / self.peak,
            "train/skipped_samples": data.skipped_total,
            **{f"train/skipped/{k}": v for k, v in data.skip_reasons.items()},
            "train/shared_batches": data.lockstep.shared,
            "train/nonfinite_steps": self.guard.total,
            "train/epoch": data.epochs,
            "train/peak_memory_bytes": peak_memory_bytes(self.device),
        }
        if r.per_t:  # the loss by timestep quartile
            ts = torch.cat([a for a, _ in r.per_t])  # (B,)
            ls = torch.cat([b for _, b in r.per_t])  # (B,)
            for lo, hi in ((0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0)):
                sel = (ts >= lo) & (ts < hi)
                if sel.any():
                    m[f"train/loss_t{lo:.2f}-{hi:.2f}"] = float(ls[sel].mean())
        return m


def preempt_requested(out: Path, device: torch.device) -> bool:
    """Whether any rank sees ``PREEMPT`` (every rank asks at every step boundary)."""
    flag = torch.tensor(float((out / PREEMPT).exists()), device=device)
    dist.all_reduce(flag)
    return flag.item() > 0


def stop_early(tracker, rank: int, message: str, summary: dict) -> None:
    """Rank 0 prints why the run stops before train.steps and closes the tracker; all wait."""
    if rank == 0:
        print(message, flush=True)
        tracker.summary(summary)
        tracker.finish()
    dist.barrier()


def gather_final(engine, zero_stage: int, world: int) -> tuple[dict[str, torch.Tensor], list, list]:
    """Collectively: the full float32 state dict on CPU (gathered under ZeRO-3), every
    rank's run id (``SPACETIME_RUN_ID``: one run, whatever restarted) and the allocator
    variables each rank's process started with (``training.memory.worker_env``)."""
    with full_params(engine, zero_stage):
        weights = {k: v.detach().float().cpu().clone()
                   for k, v in engine.module.state_dict().items()}
    run_ids: list = [None] * world
    dist.all_gather_object(run_ids, os.environ.get("SPACETIME_RUN_ID"))
    allocators: list = [None] * world
    dist.all_gather_object(allocators, started_with())
    return weights, run_ids, allocators


def export(out: Path, weights: dict, ema: EMA, config: dict, summary: dict, tracker) -> None:
    """Rank 0: the weights, the EMA, the configs and the result (``EXPORTS``) into the stage
    output, and to the stage's bucket location when it has one (rank 0 may run on a node
    that does not hold `out`)."""
    torch.save(weights, out / "model.pt")
    torch.save(ema.shadow, out / "model_ema.pt")
    # the same weights as safetensors folders (training.model.from_pretrained); the EMA one
    # complete: the raw weights with the EMA's (the trainable ones) over them
    save_pretrained(out / "dit", config["model"], weights)
    save_pretrained(out / "dit_ema", config["model"], {**weights, **ema.shadow})
    (out / "model_config.json").write_text(json.dumps(config["model"], indent=2))
    train = {**config["train"], "latent": config.get("latent")}  # evaluation reads the latent space
    (out / "train_config.json").write_text(json.dumps(train, indent=2))
    tracker.summary(summary)
    result = {**summary, "tracking": tracker.info()}
    (out / "train_result.json").write_text(json.dumps(result, indent=2))
    # the output artifact once every file of it is written (the graph's markers and info.json
    # are not part of it: data.tracking.BOOKKEEPING), so it is what downstream stages use
    log_lineage_paths(tracker, config["stage"], config["stage_hash"], str(out), config["inputs"])
    tracker.finish()
    if config.get("stage_url"):
        stage = Store(config["stage_url"])
        for name in EXPORTS:
            stage.put_file(out / name, name)


def train_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: build, parallelize, restore, the step loop, export."""
    use_venv_ninja()  # before DeepSpeed loads (and maybe builds) its ops
    import ray.train  # lazy: ray.train import ~3.7 s; the config layer imports this module

    # build: the configs, then the pure model, with identical initial weights on every rank
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tcfg, mcfg, dcfg = worker_configs(config)
    latent = config.get("latent")
    check_latent_data(tcfg, mcfg, latent)
    out = Path(config["out_dir"])
    device = ray.train.torch.get_device()
    _install_sigterm(out / PREEMPT)
    torch.manual_seed(tcfg.seed)
    model = mcfg.build().to(device)
    init = load_initial_weights(model, config.get("init"))  # a recipe's later stage: warm_start
    sp = int(config.get("sequence_parallel", 1))
    # the ranks of a sequence-parallel group read, noise and sample alike: data-parallel rank
    sp_group, dp_rank, dp_world = sequence_groups(sp)
    micro = micro_batch_size(tcfg, world, dcfg.grad_accum, sp)

    # parallelize: sequence parallelism on the DiT, then the DeepSpeed engine (ZeRO, the
    # optimizer, its schedule) around the module
    engine = parallelize(model, dcfg, params=param_groups(model, tcfg.lr, mcfg.text.lr_scale),
                         lr=tcfg.lr, weight_decay=tcfg.weight_decay, schedule=lr_lambda(tcfg),
                         micro_batch=micro, precision=tcfg.precision, sequence_group=sp_group)
    carry_optimizer(engine, config.get("init"))  # optimizer: carry (before the EMA copies weights)
    dtype = torch.bfloat16 if tcfg.precision == "bf16" else torch.float32
    # Noise, timesteps and caption dropout draw from this generator on the training device.
    gen = torch.Generator(device=device).manual_seed(tcfg.seed * 1000 + dp_rank)

    # restore: Ray Train's latest registered checkpoint, if any (the EMA lives on rank 0)
    start, loader_state, ema = restore(engine, gen, tcfg, dcfg.zero_stage, rank)
    peak = peak_flops(config, dtype, device, rank)  # before the loader's threads start
    tokens = clip_tokens(tcfg, mcfg, latent)
    buckets = buckets_of(tcfg, micro, tokens)
    # several shapes on several ranks: every rank steps on the same bucket (training.lockstep);
    # packs hold clips of any shape, so packing needs no agreement
    lockstep = len(buckets) > 1 and dp_world > 1 and not tcfg.data.pack
    peers = TorchPeers(dp_rank, dp_world, device) if lockstep else None
    data = Loader(ClipStream(config["train_shards"], buckets=buckets, rank=dp_rank,
                             world=dp_world, seed=tcfg.seed, cfg=tcfg.data,
                             state=Loader.restore_state(loader_state, tcfg.data.num_workers),
                             tokens=tokens),
                  peers=peers)
    tracker = make_tracker(TrackerSpec(**config["tracker"]), rank)
    text = TextConditioning(engine, mcfg, latent, dcfg.zero_stage, tcfg.flow, gen, device)
    train_step = TrainStep(engine, data, text, tcfg.flow, mcfg, dcfg.grad_accum, gen, device, dtype,
                           latents=latent is not None)
    guard = NonFiniteGuard(tcfg.max_nonfinite)
    log = StepLogger(tracker, tcfg, engine, data, guard, text, rank=rank, world=world, peak=peak,
                     device=device, stage=config["stage"])

    def save(step: int) -> None:  # what a resume must match rides with the checkpoint's metrics
        report_checkpoint(engine, out, step, {"rng": rng_state(gen), "loader": data.state_dict()},
                          ema.state_dict() if ema is not None else None,
                          {**log.last_metrics, "world_size": world, "sequence_parallel": sp})

    # the step loop: text conditioning -> step -> non-finite guard -> EMA -> metrics -> checkpoint
    t_start, stopped, step = time.time(), None, start
    for step in range(start, tcfg.steps):
        if preempt_requested(out, device):
            save(step)
            data.close()
            stop_early(tracker, rank, f"preempted: checkpoint at step {step}",
                       {"preempted_at": step})
            return
        t0 = time.time()
        r = train_step()
        stopped = guard.stop_reason(r.applied, step)
        if (step + 1) % tcfg.ema_every == 0:
            update_ema(engine, ema, dcfg.zero_stage)
        step_time = time.time() - t0
        stats = reduce_counts(r, device, share=1 / sp)
        log(step, r, stats, step_time, stopped)
        if (step + 1) % tcfg.ckpt_every == 0 and step + 1 < tcfg.steps:
            save(step + 1)  # with the metrics just logged
        if stopped:
            break
    data.close()
    if stopped:  # not an error of this worker (Ray Train would retry it): the driver raises
        if rank == 0:
            (out / NONFINITE).write_text(json.dumps({"message": stopped, "step": step}))
        stop_early(tracker, rank, stopped, {"stopped": stopped, "nonfinite_steps": guard.total})
        return

    # export: the last checkpoint, then the weights, EMA, configs and result (rank 0)
    save(tcfg.steps)
    weights, run_ids, allocators = gather_final(engine, dcfg.zero_stage, world)
    if rank == 0:
        export(out, weights, ema, config, {
            "final_loss": log.last_loss, "steps": tcfg.steps, "resumed_from_step": start,
            "train_seconds": time.time() - t_start, "skipped_samples": data.skipped_total,
            "skip_reasons": data.skip_reasons, "shared_batches": data.lockstep.shared,
            "nonfinite_steps": guard.total, "world_size": world, "sequence_parallel": sp,
            "micro_batch": micro,
            "zero_stage": dcfg.zero_stage, "run_ids_seen": run_ids, "allocator_seen": allocators,
            "text_encoder_calls": text.calls, "text_from_shards": text.stored is not None,
            "init": init},
            tracker)
    dist.barrier()
