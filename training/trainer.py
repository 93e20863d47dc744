"""Training: DeepSpeed ZeRO inside Ray Train workers.

The driver (``run_training``) starts a Ray Train ``TorchTrainer``; Ray Train creates the
process group (gloo on CPU, NCCL on GPU — the only difference between the two paths) and each
worker runs ``train_loop``: build the model, wrap it with ``deepspeed.initialize`` using the
config generated from Hydra, resume from the latest complete checkpoint if there is one, stream
batches from the shards and optimise the flow-matching loss. Rank 0 alone logs.

Failures: Ray Train restarts a dead worker group up to ``train.max_failures`` times; each
restart resumes from the latest complete checkpoint. Preemption: SIGTERM to the driver (or to a
worker, where the signal can be caught) writes ``PREEMPT`` in the output directory; at the next
step boundary every rank saves a checkpoint and the stage stops as failed-but-resumable, and
the next ``spacetime run`` continues from there. Non-finite losses: a step with one on any rank
is skipped whole (every micro-batch of it); after ``train.max_nonfinite`` in a row the workers
write ``NONFINITE.json`` and return (so Ray Train does not retry a run that would diverge again)
and the driver raises the message.

Latent training (``train.data.kind=latent``): the shards are latent shards from
``training.latent.precompute`` and ``run_training`` gets their ``latent_space.json`` record; batches are
latents used as they are (no ``normalize``), the DiT's ``model.dit.in_channels`` follows the
VAE's latent channels (``null``; an explicit value must equal them), and one bucket must have
the clips' encoded (frames, height, width). When the shards hold a frozen text encoder's
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from data.checks import check_ranges, from_dict
from training.flow import FlowConfig
from training.loader import Bucket, LoaderConfig
from training.text_separation import caption_pairs, text_separation

PREEMPT = "PREEMPT"
NONFINITE = "NONFINITE.json"  # written by rank 0 when the non-finite guard stops the run


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
                     height=">= 1", width=">= 1", log_every=">= 1", ckpt_every=">= 1",
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


def micro_batch_size(cfg: TrainConfig, world: int, grad_accum: int) -> int:
    per = cfg.global_batch_size // (world * grad_accum)
    if per < 1 or per * world * grad_accum != cfg.global_batch_size:
        raise ValueError(
            f"train.global_batch_size={cfg.global_batch_size} must be a multiple of "
            f"workers ({world}) x deepspeed.grad_accum ({grad_accum})"
        )
    return per


def check_latent_data(tcfg: TrainConfig, mcfg, latent: dict | None) -> None:
    """Latent training: the data, the DiT and the VAE must agree (errors name the keys)."""
    if tcfg.data.kind != "latent":
        if latent is not None:
            raise ValueError("a latent space was given but train.data.kind is "
                             f"{tcfg.data.kind!r}; set train.data.kind=latent to train on latent shards")
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
    shape = list(latent["video_shape"])
    shapes = [[b.num_frames, b.height, b.width] for b in buckets_of(tcfg, 1)]
    if shape not in shapes:
        raise ValueError(f"the latent shards hold clips encoded at (frames, height, width)={tuple(shape)}, but "
                         f"the training shapes are {[tuple(s) for s in shapes]}: set train.num_frames, "
                         f"train.height, train.width (or train.data.buckets) to {tuple(shape)}")
    lt, lh, lw = latent["latent_shape"][1:]
    pt, ph, pw = mcfg.dit.patch_size
    if lt % pt or lh % ph or lw % pw:
        raise ValueError(f"latents of (t, h, w)=({lt}, {lh}, {lw}) are not divisible by model.dit.patch_size "
                         f"{list(mcfg.dit.patch_size)}")


def follow_data(tcfg: TrainConfig, mcfg, latent: dict | None):
    """The model config with ``model.dit.in_channels: null`` resolved from the data: the VAE's
    latent channels for latent shards, 3 (RGB) for raw clips."""
    from dataclasses import replace

    if mcfg.dit.in_channels is not None:
        return mcfg
    C = int(latent["channels"]) if tcfg.data.kind == "latent" and latent is not None else 3
    return replace(mcfg, dit=replace(mcfg.dit, in_channels=C))


def buckets_of(cfg: TrainConfig, micro: int) -> list[Bucket]:
    """The loader's buckets: the configured ones, or one of the train shape at the micro batch."""
    return list(cfg.data.buckets) or [Bucket(cfg.num_frames, cfg.height, cfg.width, micro)]


class full_params:
    """Context manager yielding {name: full tensor} of the module on every rank
    (ZeRO-3 gathers the partitions first; every rank must enter)."""

    def __init__(self, engine, zero_stage: int):
        self.engine, self.stage, self._ctx = engine, zero_stage, None

    def __enter__(self) -> dict[str, torch.Tensor]:
        module = self.engine.module
        if self.stage == 3:
            import deepspeed

            self._ctx = deepspeed.zero.GatheredParameters(list(module.parameters()),
                                                          modifier_rank=None)
            self._ctx.__enter__()
        return {k: p for k, p in module.named_parameters() if p.requires_grad}  # not frozen ones

    def __exit__(self, *exc):
        if self._ctx is not None:
            self._ctx.__exit__(*exc)


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


def global_grad_norm(params) -> float:
    """The L2 norm of all gradients (already reduced across ranks), before clipping."""
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


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


def train_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    from training.prebuild import use_venv_ninja

    use_venv_ninja()  # before DeepSpeed loads (and maybe builds) its ops
    import deepspeed
    import ray.train
    import torch.distributed as dist
    from deepspeed.utils import logger as ds_logger

    from data.tracking import TrackerSpec, log_lineage_paths, make_tracker
    from training.checkpoint import Checkpoints, rng_state, set_rng_state
    from training.ema import EMA
    from training.flow import drop_captions, flow_loss
    from training.loader import ClipStream, Loader, normalize
    from training.model import ModelConfig
    from training.zero import DeepSpeedConfig, build_ds_config

    ds_logger.setLevel("WARNING")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tcfg: TrainConfig = from_dict(TrainConfig, config["train"])
    mcfg: ModelConfig = from_dict(ModelConfig, config["model"])
    dcfg: DeepSpeedConfig = from_dict(DeepSpeedConfig, config["deepspeed"])
    latent = config.get("latent")
    check_latent_data(tcfg, mcfg, latent)
    out = Path(config["out_dir"])
    device = ray.train.torch.get_device()
    _install_sigterm(out / PREEMPT)

    torch.manual_seed(tcfg.seed)  # identical initial weights on every rank
    model = mcfg.build().to(device)
    micro = micro_batch_size(tcfg, world, dcfg.grad_accum)
    ds_config = build_ds_config(dcfg, micro, tcfg.precision)
    params = param_groups(model, tcfg.lr, mcfg.text.lr_scale)  # a frozen text encoder is not optimised
    if dcfg.offload_optimizer:  # ZeRO-Offload steps the optimizer on the CPU: DeepSpeed's CPU Adam
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        opt = DeepSpeedCPUAdam(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay,
                               adamw_mode=True)
    else:
        opt = torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tcfg))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                           model_parameters=params, config=ds_config,
                                           dist_init_required=False)
    dtype = torch.bfloat16 if tcfg.precision == "bf16" else torch.float32
    # Noise, timesteps and caption dropout draw from this generator on the training device (the
    # flow functions draw on the generator's device and move the result to the data's).
    gen = torch.Generator(device=device).manual_seed(tcfg.seed * 1000 + rank)
    # ZeRO-0 in fp32 hands the optimizer to DeepSpeed as it is: no overflow check that drops a
    # step with non-finite gradients, and no recorded gradient norm. We do both for it.
    plain = not hasattr(engine.optimizer, "overflow")

    ckpts = Checkpoints(out / "checkpoints", tcfg.keep_checkpoints,
                        mirror=config.get("ckpt_mirror"))
    with full_params(engine, dcfg.zero_stage) as named:
        ema = EMA(named, tcfg.ema_decay) if rank == 0 else None
    start, loader_state = 0, None
    tag = ckpts.restore()
    if tag is not None:
        start, rank_state, ema_state = ckpts.load(engine, tag, rank)
        set_rng_state(rank_state["rng"], gen)
        loader_state = rank_state["loader"]
        if ema is not None and ema_state is not None:
            ema.load_state_dict(ema_state)
        if rank == 0:
            print(f"resumed from {tag} at step {start}", flush=True)

    from training.flops import matmul_flops_per_s, token_grid, train_flops

    # MFU's denominator: the worker's peak FLOP/s from the cluster config, or (unset, e.g. on a
    # CPU) this worker's measured dense matmul rate in the training precision (measured before
    # the loader's prefetch thread starts decoding).
    peak = config.get("peak_flops_per_worker") or (
        matmul_flops_per_s(n=1024, seconds=0.5, dtype=dtype, device=device) if rank == 0 else 0.0)
    stream = ClipStream(config["train_shards"], buckets=buckets_of(tcfg, micro), rank=rank,
                        world=world, seed=tcfg.seed, cfg=tcfg.data,
                        state=Loader.restore_state(loader_state, tcfg.data.num_workers))
    data = Loader(stream)
    spec = TrackerSpec(**config["tracker"])
    tracker = make_tracker(spec, rank)
    tokenizer = mcfg.text.build_tokenizer()  # the text encoder's own (CLIP BPE, T5, ...)
    # A frozen encoder's embeddings are cached (encoded once per distinct caption) outside the
    # engine; under ZeRO-3 its weights are partitioned, so it runs inside the engine instead.
    frozen = not any(p.requires_grad for p in engine.module.text_encoder.parameters())
    # Latent shards may hold that frozen encoder's caption tokens: then it never runs at all.
    stored = (latent or {}).get("text") if frozen else None
    if stored is not None and stored["identity"] != engine.module.text_encoder.identity:
        raise ValueError(f"the latent shards' caption tokens were made by text encoder {stored['identity']!r}, "
                         f"model.text builds {engine.module.text_encoder.identity!r}: precompute them again")
    cache = mcfg.text.build_cache() if frozen and stored is None and dcfg.zero_stage < 3 else None
    text_calls = 0  # text-encoder forwards, reported in the result

    measuring = False  # the separation metric's encodes are not training's

    def count_text_call(module, args) -> None:
        nonlocal text_calls
        text_calls += not measuring

    engine.module.text_encoder.register_forward_pre_hook(count_text_call)
    guard = NonFiniteGuard(tcfg.max_nonfinite)
    text_len = mcfg.text.max_length
    sep_pairs = caption_pairs()

    def save(step: int) -> None:
        ckpts.save(engine, step, {"rng": rng_state(gen), "loader": data.state_dict()},
                   ema.state_dict() if ema is not None else None)

    t_start = time.time()
    history: list[dict] = []
    stopped: str | None = None  # the non-finite guard's message
    nan = torch.tensor(float("nan"), device=device)
    step = start
    for step in range(start, tcfg.steps):
        preempt = torch.tensor(float((out / PREEMPT).exists()), device=device)
        dist.all_reduce(preempt)
        if preempt.item() > 0:
            save(step)
            data.close()
            if rank == 0:
                print(f"preempted: checkpoint at step {step}", flush=True)
                tracker.summary({"preempted_at": step})
                tracker.finish()
            dist.barrier()
            return
        t0 = time.time()
        lr = float(engine.get_lr()[0])  # the rate this step applies (the scheduler moves in step())
        wait, n_samples, n_tokens, n_flops = 0.0, 0, 0, 0
        losses, per_t = [], []
        bad, grad_norm = False, None
        for _ in range(dcfg.grad_accum):
            tw = time.time()
            video, captions, _keys = next(data)  # (B, 3, T, H, W)
            wait += time.time() - tw
            B, _, T, H, W = video.shape
            grid = token_grid(mcfg.dit, (T, H, W))
            n_samples, n_tokens = n_samples + B, n_tokens + B * math.prod(grid)
            n_flops += B * train_flops(mcfg.dit, grid, text_len)
            if latent is None:
                video = normalize(video.to(device, non_blocking=True), dtype)  # (B, 3, T, H, W)
            else:  # latents are model inputs already
                video = video.to(device, dtype, non_blocking=True)  # (B, C, t, h, w)
            kept, captions = captions, drop_captions(captions, tcfg.flow, gen)
            if stored is not None:
                from training.latent_format import stored_text

                dropped = [c != k for c, k in zip(captions, kept)]  # replaced by "" for guidance
                text, tmask = stored_text(data.last["text"], dropped, stored)  # (B, L, Dt), (B, L)

                def fwd(x, tt, text=text.to(device), tmask=tmask.to(device)):
                    return engine(x, tt, text=text, text_mask=tmask)
            elif cache is not None:
                with torch.no_grad():
                    text, tmask = engine.module.encode_captions(captions, cache)  # (B, L, Dt)

                def fwd(x, tt, text=text, tmask=tmask):
                    return engine(x, tt, text=text, text_mask=tmask)
            else:
                ids, mask = tokenizer(captions)  # (B, L)

                def fwd(x, tt, ids=ids.to(device), mask=mask.to(device)):
                    return engine(x, tt, ids, mask)
            loss, per_sample, t = flow_loss(fwd, video, tcfg.flow, generator=gen,
                                            num_tokens=math.prod(grid))
            finite = torch.isfinite(loss.detach()).float()
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            bad = bad or not finite.item()
            if bad:
                # A non-finite loss on any rank loses the whole optimizer step, not one
                # micro-batch: every rank still runs backward and step() for every micro-batch
                # (DeepSpeed's accumulation boundary stays where it is) with gradients made
                # non-finite, and at the boundary DeepSpeed's overflow check drops everything
                # accumulated in this step.
                loss = loss * nan
            else:
                losses.append(loss.detach().float())
                per_t.append((t.detach().cpu(), per_sample.detach().float().cpu()))
            engine.backward(loss)
            if plain and engine.is_gradient_accumulation_boundary():
                if bad:
                    engine.zero_grad()  # the optimizer then steps over no gradients
                else:
                    grad_norm = global_grad_norm(engine.module.parameters())
            engine.step()
        if bad:
            if not plain and engine.was_step_applied():
                raise RuntimeError("DeepSpeed applied an optimizer step with non-finite gradients; "
                                   "is its overflow check off (deepspeed.extra)?")
            if not engine.was_step_applied():  # the scheduler did not move: keep lr on the schedule
                engine.lr_scheduler.step()
            losses, per_t = [], []  # the step is skipped on every rank
        try:
            guard.check(not bad, step)
        except FloatingPointError as e:
            stopped = str(e)
        if (step + 1) % tcfg.ema_every == 0:
            with full_params(engine, dcfg.zero_stage) as named:
                if ema is not None:
                    ema.update(named)
        step_time = time.time() - t0
        loss_sum = torch.stack(losses).sum() if losses else torch.zeros(())
        stats = torch.tensor([float(loss_sum), float(len(losses)), n_samples, n_tokens, n_flops],
                             device=device, dtype=torch.float64)
        dist.all_reduce(stats)  # SUM over ranks (gloo has no AVG)
        if (step + 1) % tcfg.ckpt_every == 0 and step + 1 < tcfg.steps:
            save(step + 1)
        m = None
        if rank == 0 and (step % tcfg.log_every == 0 or step == tcfg.steps - 1):
            m = {
                "train/loss": float(stats[0] / stats[1]) if stats[1] > 0 else float("nan"),
                "train/lr": lr,
                "train/grad_norm": float(grad_norm if grad_norm is not None
                                         else engine.get_global_grad_norm() or 0.0),
                "train/step_time_s": step_time,
                "train/data_wait_s": wait,
                "train/compute_s": step_time - wait,
                "train/samples_per_s": float(stats[2]) / step_time,
                "train/tokens_per_s": float(stats[3]) / step_time,
                "train/tflops_per_worker": float(stats[4]) / step_time / world / 1e12,
                "train/mfu": float(stats[4]) / step_time / world / peak,
                "train/skipped_samples": data.skipped_total,
                "train/nonfinite_steps": guard.total,
                "train/epoch": data.epochs,
                "train/peak_memory_bytes": peak_memory_bytes(device),
            }
            if per_t:
                ts = torch.cat([a for a, _ in per_t])  # (B,)
                ls = torch.cat([b for _, b in per_t])  # (B,)
                for lo, hi in ((0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0)):
                    sel = (ts >= lo) & (ts < hi)
                    if sel.any():
                        m[f"train/loss_t{lo:.2f}-{hi:.2f}"] = float(ls[sel].mean())
        if step % tcfg.text_sep_every == 0 or step == tcfg.steps - 1:
            # every rank encodes (under ZeRO-3 the encoder's weights are gathered collectively)
            measuring = True
            sep = text_separation(lambda c: engine.module.encode_captions(c), sep_pairs)
            measuring = False
            if m is not None:
                m.update({f"train/text_sep/{a}": v for a, v in sep.items()})
        if m is not None:
            tracker.log(m, step=step)
            history.append({"step": step, **m})
            if step % 10 == 0 or step == tcfg.steps - 1 or stopped:
                print(f"step {step:5d} loss {m['train/loss']:.4f} "
                      f"{m['train/samples_per_s']:.1f} samples/s", flush=True)
        if stopped:
            break

    data.close()
    if stopped:  # not an error of this worker (Ray Train would retry it): the driver raises
        if rank == 0:
            print(stopped, flush=True)
            (out / NONFINITE).write_text(json.dumps({"message": stopped, "step": step}))
            tracker.summary({"stopped": stopped, "nonfinite_steps": guard.total})
            tracker.finish()
        dist.barrier()
        return
    save(tcfg.steps)
    with full_params(engine, dcfg.zero_stage) as named:
        sd = {k: v.detach().float().cpu().clone() for k, v in engine.module.state_dict().items()}
    run_ids: list = [None] * world
    dist.all_gather_object(run_ids, os.environ.get("SPACETIME_RUN_ID"))
    if rank == 0:
        torch.save(sd, out / "model.pt")
        torch.save(ema.shadow, out / "model_ema.pt")
        (out / "model_config.json").write_text(json.dumps(config["model"], indent=2))
        (out / "train_config.json").write_text(json.dumps({**config["train"], "latent": latent}, indent=2))
        summary = {"final_loss": history[-1]["train/loss"] if history else None,
                   "steps": tcfg.steps, "resumed_from_step": start,
                   "train_seconds": time.time() - t_start, "skipped_samples": data.skipped_total,
                   "nonfinite_steps": guard.total, "world_size": world, "micro_batch": micro,
                   "zero_stage": dcfg.zero_stage, "run_ids_seen": run_ids,
                   "text_encoder_calls": text_calls, "text_from_shards": stored is not None}
        tracker.summary(summary)
        log_lineage_paths(tracker, config["stage"], config["stage_hash"], str(out),
                          config["inputs"])
        result = {**summary, "tracking": tracker.info()}
        tracker.finish()
        (out / "train_result.json").write_text(json.dumps(result, indent=2))
        if config.get("ckpt_mirror"):  # rank 0 may run on a node that does not hold `out`
            from data.storage import Store

            stage = Store(config["ckpt_mirror"].rsplit("/checkpoints", 1)[0])
            for name in EXPORTS:
                stage.put_file(out / name, name)
    dist.barrier()


# What rank 0 writes into the stage output besides checkpoints (train_result.json last).
EXPORTS = ("model.pt", "model_ema.pt", "model_config.json", "train_config.json",
           "train_result.json")


def worker_resources(cluster) -> dict:
    """Ray Train's per-worker scaling from the cluster config: CPUs and GPUs per worker
    (``cluster.gpus_per_worker``; 0 runs on CPU with gloo, > 0 on GPU with NCCL)."""
    gpus = float(cluster.gpus_per_worker or 0)
    if gpus < 0:
        raise ValueError(f"cluster.gpus_per_worker must be >= 0, got {gpus}")
    res = {"CPU": cluster.cpus_per_worker, **({"GPU": gpus} if gpus else {})}
    return {"num_workers": cluster.num_workers, "use_gpu": gpus > 0, "resources_per_worker": res,
            "backend": "nccl" if gpus > 0 else "gloo"}


def check_resume_world_size(ckpts, num_workers: int) -> None:
    """The checkpoint training would resume from must have been written by as many workers:
    reader positions and ZeRO partitions are per rank. Raises naming the key."""
    saved = ckpts.resume_world_size()
    if saved is not None and saved != num_workers:
        raise ValueError(
            f"the latest checkpoint in {ckpts.root} was written by {saved} training workers but "
            f"cluster.num_workers={num_workers}: resume with cluster.num_workers={saved}, or "
            f"start this stage over (spacetime run --only train)")


def run_training(*, train_cfg: TrainConfig, model_cfg, ds_cfg, cluster, out_dir: Path,
                 train_shards: list[str], tracker_spec, stage: str, stage_hash: str,
                 inputs: dict[str, str], latent: dict | None = None,
                 ckpt_mirror: str | None = None) -> dict:
    """Driver side: start the workers, relay SIGTERM, wait, return rank 0's result.

    latent: for train.data.kind=latent, the latent shards' record (their ``latent_space.json``).
    ckpt_mirror: a URL every checkpoint is uploaded to (a bucket run root), so workers on any
    node, or a later run on another machine, resume from it."""
    from training.checkpoint import Checkpoints

    check_latent_data(train_cfg, model_cfg, latent)  # before any worker starts
    out_dir = Path(out_dir).resolve()
    res = worker_resources(cluster)
    check_resume_world_size(Checkpoints(out_dir / "checkpoints", train_cfg.keep_checkpoints,
                                        mirror=ckpt_mirror), cluster.num_workers)
    model_cfg = follow_data(train_cfg, model_cfg, latent)  # what model_config.json records
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

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
        "latent": latent, "ckpt_mirror": ckpt_mirror,
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
        from data.storage import Store

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
