"""One optimizer step of the flow-matching loss, and how captions condition it.

``TrainStep`` runs ``deepspeed.grad_accum`` micro-batches through the engine (from
``training.parallelize``): a batch from the loader, caption dropout and the text
(``TextConditioning``), the loss, backward, the engine's step, and the skip of a whole step when
a loss is non-finite on any rank. ``training.trainer.train_loop`` calls it once per step.
A packed batch (``train.data.pack``: a list of clips of any shapes) is one ``pack_clips``
sequence through ``forward_packed``, with a timestep and noise per clip and the loss averaged
per clip as over a batch's samples (``flow_loss_packed``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from training.clips import normalize
from training.flops import token_grid, train_flops
from training.flow import FlowConfig, drop_captions, flow_loss, flow_loss_packed
from training.latent_format import stored_text
from training.loader import Loader
from training.model import ModelConfig
from training.parallelize import checks_overflow
from training.patches import pack_clips
from training.text_separation import text_separation


class TextConditioning:
    """How a micro-batch's captions reach the model, after caption dropout (for guidance):

    - a frozen encoder's caption tokens stored in latent shards (the encoder never runs);
    - a frozen encoder's embeddings from the cache, encoded once per distinct caption outside
      the engine (not under ZeRO-3, where its weights are partitioned);
    - otherwise token ids from the encoder's own tokenizer, encoded inside the engine.

    ``calls`` counts the text encoder's forwards in training (the separation metric's are not)."""

    def __init__(self, engine, mcfg: ModelConfig, latent: dict | None, zero_stage: int,
                 flow: FlowConfig, gen: torch.Generator, device: torch.device):
        self.engine, self.flow, self.gen, self.device = engine, flow, gen, device
        encoder = engine.module.text_encoder
        self.tokenizer = mcfg.text.build_tokenizer()  # the text encoder's own (CLIP BPE, T5, ...)
        frozen = not any(p.requires_grad for p in encoder.parameters())
        self.stored = (latent or {}).get("text") if frozen else None
        if self.stored is not None and self.stored["identity"] != encoder.identity:
            raise ValueError(f"the latent shards' caption tokens were made by text encoder "
                             f"{self.stored['identity']!r}, model.text builds "
                             f"{encoder.identity!r}: precompute them again")
        self.cache = (mcfg.text.build_cache() if frozen and self.stored is None and zero_stage < 3
                      else None)
        self.calls, self._measuring = 0, False
        encoder.register_forward_pre_hook(self._count)

    def _count(self, module, args) -> None:
        self.calls += not self._measuring

    def __call__(self, captions: list[str], batch: dict) -> Callable:
        """The model's forward (x, t) -> prediction for these captions, some dropped to "".
        batch: the loader's ``last`` (stored caption tokens under "text")."""
        engine, device = self.engine, self.device
        kept, captions = captions, drop_captions(captions, self.flow, self.gen)
        if self.stored is not None:
            dropped = [c != k for c, k in zip(captions, kept)]  # replaced by "" for guidance
            text, tmask = stored_text(batch["text"], dropped, self.stored)  # (B, L, Dt), (B, L)
            text, tmask = text.to(device), tmask.to(device)
        elif self.cache is not None:
            with torch.no_grad():
                text, tmask = engine.module.encode_captions(captions, self.cache)  # (B, L, Dt)
        else:
            ids, mask = self.tokenizer(captions)  # (B, L)
            ids, mask = ids.to(device), mask.to(device)
            return lambda x, t: engine(x, t, ids, mask)
        return lambda x, t: engine(x, t, text=text, text_mask=tmask)

    def separation(self, pairs) -> dict[str, float]:
        """How far the text features keep one-attribute-apart captions (train/text_sep/*).
        Every rank must call it (under ZeRO-3 the encoder's weights are gathered collectively)."""
        self._measuring = True
        try:
            return text_separation(lambda c: self.engine.module.encode_captions(c), pairs)
        finally:
            self._measuring = False


@dataclass
class StepResult:
    """One optimizer step on this rank."""

    lr: float  # the rate the step applied (the scheduler moves in engine.step())
    applied: bool = True  # False: a non-finite loss on some rank skipped the whole step
    losses: list = field(default_factory=list)  # each micro-batch's loss () (none if skipped)
    per_t: list = field(default_factory=list)  # each micro-batch's (t (B,), loss per sample (B,))
    grad_norm: float | None = None  # measured here for a plain optimizer; else DeepSpeed's
    wait: float = 0.0  # seconds spent waiting for batches
    samples: int = 0
    tokens: int = 0
    flops: int = 0


class TrainStep:
    """One optimizer step: ``deepspeed.grad_accum`` micro-batches of the flow-matching loss.

    A non-finite loss on any rank loses the whole optimizer step, not one micro-batch: every
    rank still runs backward and step() for every micro-batch (DeepSpeed's accumulation
    boundary stays where it is) with gradients made non-finite, and at the boundary DeepSpeed's
    overflow check drops everything accumulated in this step (for a plain optimizer, see
    ``checks_overflow``, the step zeroes the gradients and measures their norm itself)."""

    def __init__(self, engine, data: Loader, text: TextConditioning, flow: FlowConfig,
                 mcfg: ModelConfig, grad_accum: int, gen: torch.Generator, device: torch.device,
                 dtype: torch.dtype, latents: bool):
        self.engine, self.data, self.text, self.flow, self.mcfg = engine, data, text, flow, mcfg
        self.grad_accum, self.gen, self.device, self.dtype = grad_accum, gen, device, dtype
        self.latents = latents  # latent shards: batches are model inputs already
        self.plain = not checks_overflow(engine)
        self.nan = torch.tensor(float("nan"), device=device)

    def __call__(self) -> StepResult:
        engine = self.engine
        r = StepResult(lr=float(engine.get_lr()[0]))
        for _ in range(self.grad_accum):
            tw = time.time()
            video, captions, _keys = next(self.data)  # (B, 3, T, H, W), or a pack: K clips
            r.wait += time.time() - tw
            packed = isinstance(video, list)
            shapes = [c.shape[1:] for c in video] if packed else [video.shape[2:]] * len(video)
            grids = [token_grid(self.mcfg.dit, tuple(sh)) for sh in shapes]  # (T', H', W') per sample
            r.samples, r.tokens = r.samples + len(grids), r.tokens + sum(math.prod(g) for g in grids)
            r.flops += sum(train_flops(self.mcfg.dit, g, self.mcfg.text.max_length) for g in grids)
            fwd = self.text(captions, self.data.last)
            if packed:  # train.data.pack: one sequence, each clip its own t and noise
                x0 = [self.inputs(c) for c in video]  # K (C, T_k, H_k, W_k)
                patch = self.mcfg.dit.patch_size
                loss, per_sample, t = flow_loss_packed(
                    lambda xs, t: fwd(pack_clips(xs, patch), t), x0, self.flow, generator=self.gen,
                    num_tokens=torch.tensor([math.prod(g) for g in grids]))
            else:
                loss, per_sample, t = flow_loss(fwd, self.inputs(video), self.flow, generator=self.gen,
                                                num_tokens=math.prod(grids[0]))
            finite = torch.isfinite(loss.detach()).float()
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            r.applied = r.applied and bool(finite.item())
            if not r.applied:
                loss = loss * self.nan  # the step is lost: see the class docstring
            else:
                r.losses.append(loss.detach().float())
                r.per_t.append((t.detach().cpu(), per_sample.detach().float().cpu()))
            engine.backward(loss)
            if self.plain and engine.is_gradient_accumulation_boundary():
                if not r.applied:
                    engine.zero_grad()  # the optimizer then steps over no gradients
                else:
                    r.grad_norm = global_grad_norm(engine.module.parameters())
            engine.step()
        if not r.applied:
            self.skipped()
            r.losses, r.per_t = [], []  # the step is skipped on every rank
        return r

    def inputs(self, video: torch.Tensor) -> torch.Tensor:
        """A batch (B, 3, T, H, W) uint8 or a clip (3, T, H, W) -> the model's input on the device
        in [-1, 1]; latents (B or none, C, t, h, w) are inputs already."""
        if self.latents:
            return video.to(self.device, self.dtype, non_blocking=True)  # (B, C, t, h, w)
        return normalize(video.to(self.device, non_blocking=True), self.dtype)  # (B, 3, T, H, W)

    def skipped(self) -> None:
        """After a skipped step: nothing may have been applied; the lr stays on its schedule."""
        engine = self.engine
        if not self.plain and engine.was_step_applied():
            raise RuntimeError("DeepSpeed applied an optimizer step with non-finite gradients; "
                               "is its overflow check off (deepspeed.extra)?")
        if not engine.was_step_applied():  # the scheduler did not move: keep lr on the schedule
            engine.lr_scheduler.step()


def reduce_counts(r: StepResult, device: torch.device, share: float = 1.0) -> torch.Tensor:
    """[loss sum, losses, samples, tokens, FLOPs] of the step, summed over ranks (gloo has no
    AVG). ``share``: this rank's part of its samples (1 / the sequence-parallel degree: the
    group's ranks each do that share of the same samples, so the sums count each sample once)."""
    loss_sum = torch.stack(r.losses).sum() if r.losses else torch.zeros(())
    stats = torch.tensor([float(loss_sum) * share, float(len(r.losses)) * share, r.samples * share,
                          r.tokens * share, r.flops * share],
                         device=device, dtype=torch.float64)
    dist.all_reduce(stats)
    return stats


def global_grad_norm(params) -> float:
    """The L2 norm of all gradients (already reduced across ranks), before clipping."""
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
