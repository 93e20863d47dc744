"""Rectified-flow objective and Euler sampler.

Convention (SD3 / Flux style):
    x_t = (1 - t) * x0 + t * noise,   t = 0 is data, t = 1 is pure noise,
    the velocity is v = dx_t/dt = noise - x0.
Sampling integrates dx/dt = v from t = 1 down to t = 0.

What the network outputs (``prediction``) is a choice; the loss and the sampler always work on
the velocity, through one conversion (``to_velocity``):
- ``velocity``: the output is v itself.
- ``x0``: the output is the clean sample x0_hat; since x_t - x0 = t * (noise - x0),
  v = (x_t - x0_hat) / max(t, x0_t_min). Exact for t >= x0_t_min; below it the velocity is
  scaled by t / x0_t_min, which bounds the 1/t blow-up near the data. Predicting x0 forms
  objects faster on raw pixel patches: at mid noise the velocity error of a v-predictor sits on
  the objects, the x0 error does not (issue 17's measurements).

Timestep shift (applied both when sampling training timesteps and in the sampler schedule):
    t' = s * t / (1 + (s - 1) * t)
s > 1 spends more steps/samples at high noise. Larger and longer clips need more of it: at
the same noise level, averaging over more correlated pixels recovers more of the signal, so
a clip of N tokens is "less noisy" than a small one at the same t (SD3: resolution-dependent
shifting of timestep schedules). With ``shift_mode: tokens`` the shift grows with the clip's
token count N = T'H'W' (after patchify):
    s(N) = shift * (N / shift_base_tokens) ** shift_exponent
i.e. log s is linear in log N. shift_exponent = 0.5 is SD3's sqrt(m / n) rule and Open-Sora's
sqrt(resolution ratio) * sqrt(frames ratio); shift_max caps it. `shift` is the value at
``shift_base_tokens``. The default ``shift_mode: constant`` uses s = shift everywhere (the
previous behaviour, identical numbers). ``shift_for(cfg, N)`` gives the shift for N tokens;
the sampler must be given the same value (``euler_sample(..., shift=shift_for(cfg, N))``).

All functions are pure (no logging or I/O); randomness only through an explicit torch.Generator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

TIMESTEP_SAMPLINGS = ("logit_normal", "uniform")
SHIFT_MODES = ("constant", "tokens")
PREDICTIONS = ("velocity", "x0")
LOSSES = ("velocity", "x0")


@dataclass
class FlowConfig:
    timestep_sampling: str = "logit_normal"  # or "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0  # the shift (constant), or the shift at shift_base_tokens (tokens)
    shift_mode: str = "constant"  # constant | tokens: s(N) = shift * (N / shift_base_tokens) ** shift_exponent
    shift_base_tokens: int = 1024  # token count (T'H'W' after patchify) at which s = shift
    shift_exponent: float = 0.5  # 0.5: SD3 / Open-Sora sqrt rule
    shift_max: float = 0.0  # cap on s(N); 0 = no cap
    caption_dropout: float = 0.1  # probability a training caption is replaced by "" (for CFG)
    prediction: str = "velocity"  # what the network outputs: velocity | x0 (see to_velocity)
    x0_t_min: float = 0.05  # prediction=x0: v = (x_t - x0_hat) / max(t, x0_t_min)
    loss: str = "velocity"  # the MSE's quantity: velocity | x0 (= t^2 * the velocity MSE, see to_x0)

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"unknown flow.loss {self.loss!r}; valid: {', '.join(LOSSES)}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown flow.prediction {self.prediction!r}; valid: {', '.join(PREDICTIONS)}")
        if not 0.0 < self.x0_t_min <= 1.0:
            raise ValueError(f"flow.x0_t_min must be in (0, 1], got {self.x0_t_min}")
        if self.timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"unknown timestep_sampling {self.timestep_sampling!r}; valid: {', '.join(TIMESTEP_SAMPLINGS)}")
        if self.shift <= 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")
        if not self.logit_std > 0:
            raise ValueError(f"logit_std must be > 0, got {self.logit_std}")
        if self.shift_mode not in SHIFT_MODES:
            raise ValueError(f"unknown shift_mode {self.shift_mode!r} (flow.shift_mode); valid: {', '.join(SHIFT_MODES)}")
        if self.shift_base_tokens < 1:
            raise ValueError(f"shift_base_tokens must be >= 1, got {self.shift_base_tokens}")
        if self.shift_max < 0:
            raise ValueError(f"shift_max must be >= 0 (0 = no cap), got {self.shift_max}")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {self.caption_dropout}")


def _gen_device(generator: torch.Generator | None, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    return generator.device if generator is not None else torch.device("cpu")


def _draw(fn, shape, generator: torch.Generator | None, device, **kw) -> torch.Tensor:
    """torch.randn / torch.rand of `shape` on `device`, drawn on the generator's own device
    (a generator draws only there: a CPU one for CUDA data, or the reverse, would raise) and
    moved. Same numbers as drawing in place when the devices agree."""
    target = _gen_device(generator, device)  # `device`, else the generator's, else the CPU
    src = generator.device if generator is not None else target
    return fn(shape, generator=generator, device=src, **kw).to(target)


def shift_for(cfg: FlowConfig, num_tokens: int | torch.Tensor | None = None) -> float | torch.Tensor:
    """The timestep shift for clips of `num_tokens` tokens (an int, or (B,) for mixed sizes).

    constant: cfg.shift (num_tokens is ignored). tokens: cfg.shift * (N / base) ** exponent,
    capped at cfg.shift_max when that is > 0.
    """
    if cfg.shift_mode == "constant":
        return float(cfg.shift)
    if num_tokens is None:
        raise ValueError("flow.shift_mode=tokens needs the clip's token count (num_tokens = T'*H'*W' after patchify)")
    if isinstance(num_tokens, torch.Tensor):
        s = cfg.shift * (num_tokens.double() / cfg.shift_base_tokens) ** cfg.shift_exponent  # (B,)
        return (s.clamp(max=cfg.shift_max) if cfg.shift_max > 0 else s).float()  # (B,)
    s = cfg.shift * (num_tokens / cfg.shift_base_tokens) ** cfg.shift_exponent
    return min(s, cfg.shift_max) if cfg.shift_max > 0 else s


def shift_timesteps(t: torch.Tensor, shift: float | torch.Tensor) -> torch.Tensor:
    """t' = shift * t / (1 + (shift - 1) * t); monotone, keeps 0 -> 0 and 1 -> 1.

    shift: a float, or a tensor broadcastable to t (one shift per sample).
    """
    if not isinstance(shift, torch.Tensor) and shift == 1.0:
        return t
    if isinstance(shift, torch.Tensor):
        shift = shift.to(t.device, t.dtype)
    return shift * t / (1 + (shift - 1) * t)  # (B,)


def sample_timesteps(
    cfg: FlowConfig,
    batch: int,
    generator: torch.Generator | None = None,
    device=None,
    num_tokens: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Training timesteps t (B,) in (0, 1), sampled per cfg and then shifted by shift_for(cfg, num_tokens)."""
    if cfg.timestep_sampling == "logit_normal":
        u = _draw(torch.randn, (batch,), generator, device) * cfg.logit_std + cfg.logit_mean  # (B,)
        t = torch.sigmoid(u)  # (B,)
    else:
        t = _draw(torch.rand, (batch,), generator, device)  # (B,)
    return shift_timesteps(t, shift_for(cfg, num_tokens))  # (B,)


def to_velocity(out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, prediction: str = "velocity",
                t_min: float = 0.05) -> torch.Tensor:
    """The network's output `out` (B, ...) at (x_t (B, ...), t (B,)) as a velocity (B, ...).

    velocity: `out` as it is. x0: v = (x_t - out) / max(t, t_min). The one conversion used by
    both the objective (`flow_loss`) and the sampler (`euler_sample`), so they always agree.
    """
    if prediction == "velocity":
        return out
    if prediction != "x0":
        raise ValueError(f"unknown prediction {prediction!r}; valid: {', '.join(PREDICTIONS)}")
    t_b = t.to(out.device, out.dtype).clamp(min=t_min).view(-1, *([1] * (out.ndim - 1)))  # (B, 1, 1, 1, 1)
    return (x_t - out) / t_b  # (B, C, T, H, W)


def to_x0(out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, prediction: str = "velocity") -> torch.Tensor:
    """The network's output `out` (B, ...) at (x_t, t (B,)) as a clean-sample estimate x0_hat.

    x0: `out` itself. velocity: x0_hat = x_t - t * v (exact: x_t - x0 = t * (noise - x0)).
    A loss on x0_hat weights the velocity error by t^2: it spends the gradient at high noise,
    where the layout (and so the prompt) is decided, instead of on the fine detail near t = 0
    that the velocity loss of an x0-predictor weights by 1/t^2.
    """
    if prediction == "x0":
        return out
    if prediction != "velocity":
        raise ValueError(f"unknown prediction {prediction!r}; valid: {', '.join(PREDICTIONS)}")
    return x_t - t.to(out.device, out.dtype).view(-1, *([1] * (out.ndim - 1))) * out  # (B, C, T, H, W)


def flow_loss(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    cfg: FlowConfig,
    generator: torch.Generator | None = None,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    num_tokens: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rectified-flow MSE on the velocity (cfg.loss = velocity) or on the clean sample (x0).
    model_fn(x_t (B, ...), t (B,)) -> the network's output (B, ...), converted by
    `to_velocity` / `to_x0` per cfg.prediction.

    `t` and `noise` may be given to fix them (tests, loss-parity checks); otherwise they are
    drawn from `generator`. `num_tokens` (the clips' T'H'W') sets the shift when
    cfg.shift_mode == "tokens". Returns (loss scalar, per-sample loss (B,), t (B,)); the loss is
    computed in float32 and averaged over all non-batch dims.
    """
    B = x0.shape[0]
    if t is None:
        t = sample_timesteps(cfg, B, generator, device=x0.device, num_tokens=num_tokens)  # (B,)
    if noise is None:
        noise = _draw(torch.randn, x0.shape, generator, x0.device, dtype=x0.dtype)  # (B, C, T, H, W)
    t = t.to(x0.device)
    t_b = t.view(B, *([1] * (x0.ndim - 1))).to(x0.dtype)  # (B, 1, 1, 1, 1)
    x_t = (1 - t_b) * x0 + t_b * noise  # (B, C, T, H, W)
    out = model_fn(x_t, t)  # (B, C, T, H, W)
    per_sample = _per_sample(out, x_t, t, x0, noise, cfg)  # (B,)
    return per_sample.mean(), per_sample, t


def _per_sample(out, x_t, t, x0, noise, cfg: FlowConfig) -> torch.Tensor:
    """The MSE of each sample: out, x_t, x0, noise (B, ...), t (B,) -> (B,) float32."""
    if cfg.loss == "x0":
        pred, target = to_x0(out, x_t, t, cfg.prediction), x0  # (B, C, T, H, W)
    else:
        pred, target = to_velocity(out, x_t, t, cfg.prediction, cfg.x0_t_min), noise - x0  # (B, C, T, H, W)
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)  # (B,)


def flow_loss_packed(
    model_fn: Callable[[list[torch.Tensor], torch.Tensor], list[torch.Tensor]],
    x0: Sequence[torch.Tensor],
    cfg: FlowConfig,
    generator: torch.Generator | None = None,
    t: torch.Tensor | None = None,
    noise: Sequence[torch.Tensor] | None = None,
    num_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`flow_loss` over K clips of different shapes x0[k] (C, T_k, H_k, W_k) in one forward:
    model_fn(K noisy clips, t (K,)) -> K outputs (the DiT's ``forward_packed`` on
    ``pack_clips`` of them). Clip k's loss is `flow_loss`'s per-sample loss of that clip alone
    (its own MSE mean, whatever its size) and the loss is their mean, as over a batch's samples.

    t (K,) and noise (K tensors) may be given; otherwise t, then each clip's noise in turn, are
    drawn from `generator`. num_tokens (K,): each clip's T'H'W' (its shift when
    cfg.shift_mode == "tokens"). Returns (loss scalar, per-clip loss (K,), t (K,))."""
    K, device = len(x0), x0[0].device
    if t is None:
        t = sample_timesteps(cfg, K, generator, device=device, num_tokens=num_tokens)  # (K,)
    if noise is None:
        noise = [_draw(torch.randn, x.shape, generator, device, dtype=x.dtype) for x in x0]  # K (C, T, H, W)
    t = t.to(device)
    x_t = [(1 - t[k].to(x.dtype)) * x + t[k].to(x.dtype) * n for k, (x, n) in enumerate(zip(x0, noise))]
    outs = model_fn(x_t, t)  # K (C, T_k, H_k, W_k)
    per_clip = torch.cat([_per_sample(o[None], xt[None], t[k : k + 1], x[None], n[None], cfg)
                          for k, (o, xt, x, n) in enumerate(zip(outs, x_t, x0, noise))])  # (K,)
    return per_clip.mean(), per_clip, t


def drop_captions(captions: list[str], cfg: FlowConfig, generator: torch.Generator | None = None) -> list[str]:
    """Replace each caption by "" with probability cfg.caption_dropout (unconditional branch of CFG)."""
    drop = torch.rand(len(captions), generator=generator, device=_gen_device(generator, None)) < cfg.caption_dropout  # (B,)
    return ["" if d else c for c, d in zip(captions, drop.tolist())]


def sampling_schedule(steps: int, shift: float = 1.0, device=None) -> torch.Tensor:
    """Decreasing timesteps 1 = t_0 > t_1 > ... > t_steps = 0 -> (steps + 1,)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return shift_timesteps(torch.linspace(1.0, 0.0, steps + 1, device=device), shift)  # (S+1,)


@torch.no_grad()
def euler_sample(
    model_fn: Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor],
    shape: tuple[int, ...],
    steps: int,
    cfg_scale: float = 1.0,
    generator: torch.Generator | None = None,
    shift: float = 1.0,
    device=None,
    dtype: torch.dtype = torch.float32,
    noise: torch.Tensor | None = None,
    prediction: str = "velocity",
    x0_t_min: float = 0.05,
) -> torch.Tensor:
    """Integrate dx/dt = v from t = 1 (noise) to t = 0 with `steps` Euler steps -> x0 `shape`.

    `shift` must be the one training used for this clip size: ``shift_for(flow_cfg, T'*H'*W')``.

    model_fn(x (B, ...), t (B,), cond: bool) -> v (B, ...): one callable, with cond=True for
    the text-conditioned prediction and cond=False for the unconditional (empty caption) one;
    see `text_model_fn` to build it from a DiT. Its output is converted by `to_velocity` with
    `prediction` / `x0_t_min`, which must be the training's (``flow.prediction``, ``flow.x0_t_min``).
    Guidance: v = v_u + cfg_scale * (v_c - v_u) on the converted velocities;
    with cfg_scale == 1 only the conditional branch is evaluated. Deterministic given the
    generator (the only randomness is the initial noise).
    """
    device = _gen_device(generator, device)
    if noise is None:
        noise = _draw(torch.randn, shape, generator, device, dtype=dtype)  # (B, C, T, H, W)
    x = noise
    ts = sampling_schedule(steps, shift, device=x.device)  # (S+1,)
    B = x.shape[0]
    for i in range(steps):
        t = ts[i].expand(B)  # (B,)
        v = to_velocity(model_fn(x, t, True), x, t, prediction, x0_t_min)  # (B, C, T, H, W)
        if cfg_scale != 1.0:
            v_u = to_velocity(model_fn(x, t, False), x, t, prediction, x0_t_min)  # (B, C, T, H, W)
            v = v_u + cfg_scale * (v - v_u)  # (B, C, T, H, W)
        x = x + (ts[i + 1] - ts[i]) * v  # (B, C, T, H, W)  dt < 0
    return x


def text_model_fn(model, text, text_mask, null_text, null_mask):
    """Bind a DiT-like model(x, t, text, mask) to conditional / unconditional text for euler_sample.

    text (B, L, Dt), text_mask (B, L); null_text / null_mask: the encoded empty caption, either
    (B, L', Dt) / (B, L') or (1, L', Dt) / (1, L') (broadcast over the batch).
    """

    def fn(x: torch.Tensor, t: torch.Tensor, cond: bool) -> torch.Tensor:
        if cond:
            return model(x, t, text, text_mask)  # (B, C, T, H, W)
        B = x.shape[0]
        return model(x, t, null_text.expand(B, -1, -1), null_mask.expand(B, -1))  # (B, C, T, H, W)

    return fn
