"""Sampling a trained model at any shape: (model, text conditioning, shape, sampler settings) -> video.

    prompts, negative prompt --encode_prompts--> Conditioning (text, mask, negative text, mask)
    seeds, (C, T, H, W) --initial_noise--> noise (B, C, T, H, W), one CPU generator per seed
    sample(dit, conditioning, noise, SamplerConfig) --euler_sample--> x0 (B, C, T, H, W)
    x0 --to_frames (through the latent space when there is one)--> uint8 (B, T', H', W', 3)

`generate_videos` chains them in batches. The shape is whatever the caller asks for (the DiT's
3D RoPE takes any token grid); checking that it fits the VAE and the patch is the caller's job
(`pipeline.generate`), before any weights are loaded. The guidance's unconditional branch is the
negative prompt ("" by default, what caption dropout trained). Noise is drawn on the CPU from
``torch.Generator().manual_seed(seed)`` per video, so a seed gives the same starting noise on any
device and in any batch.

`sample` is the piece a sequence-parallel path replaces or wraps (same inputs, the model's
attention split across ranks); everything here is pure (no file I/O, no logging).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from data.checks import check_ranges
from training.flow import euler_sample, text_model_fn


@dataclass
class SamplerConfig:
    steps: int = 20  # Euler steps from t = 1 to 0
    guidance: float = 3.0  # classifier-free guidance scale; 1 = conditional only
    shift: float = 1.0  # timestep shift: the training's ``shift_for(flow, tokens)`` at this shape
    prediction: str = "velocity"  # what the network outputs (the training's flow.prediction)
    x0_t_min: float = 0.05  # the training's flow.x0_t_min

    def __post_init__(self) -> None:
        check_ranges(self, steps=">= 1", guidance=">= 0", shift="> 0", x0_t_min="in [0, 1]")


class Conditioning(NamedTuple):
    """Encoded prompts (B, L, Dt) / (B, L) and the negative prompt (1, L', Dt) / (1, L')."""

    text: torch.Tensor
    mask: torch.Tensor
    negative: torch.Tensor
    negative_mask: torch.Tensor


@torch.no_grad()
def encode_prompts(model, tokenizer, prompts: list[str], negative: str = "", device=None) -> Conditioning:
    """The text conditioning of `prompts` and of the negative prompt, through `model.encode_text`."""
    ids, mask = tokenizer(list(prompts))  # (B, L), (B, L)
    text, text_mask = model.encode_text(ids.to(device), mask.to(device))  # (B, L, Dt), (B, L)
    nids, nmask = tokenizer([negative])  # (1, L')
    neg, neg_mask = model.encode_text(nids.to(device), nmask.to(device))  # (1, L', Dt), (1, L')
    return Conditioning(text, text_mask, neg, neg_mask)


def initial_noise(shape: tuple[int, int, int, int], seeds: list[int]) -> torch.Tensor:
    """Standard normal noise (B, C, T, H, W) on the CPU, video i from seed seeds[i]."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s)))
                        for s in seeds])  # (B, C, T, H, W)


@torch.no_grad()
def sample(dit, cond: Conditioning, noise: torch.Tensor, cfg: SamplerConfig) -> torch.Tensor:
    """Integrate the flow from `noise` (B, C, T, H, W) -> x0 (B, C, T, H, W), guided by `cond`
    (B prompts, one negative prompt broadcast over them)."""
    fn = text_model_fn(dit, cond.text, cond.mask, cond.negative, cond.negative_mask)
    return euler_sample(fn, noise.shape, cfg.steps, cfg.guidance, shift=cfg.shift, noise=noise,
                        prediction=cfg.prediction, x0_t_min=cfg.x0_t_min)  # (B, C, T, H, W)


@torch.no_grad()
def to_frames(x: torch.Tensor, space=None) -> torch.Tensor:
    """Samples (B, C, t, h, w) -> uint8 frames (B, T, H, W, 3) on the CPU: decoded through the
    latent space `space` when given, else read as pixels in [-1, 1]."""
    if space is not None:
        return space.decode_video(x)  # (B, T, H, W, 3)
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (B, 3, T, H, W)
    return x.permute(0, 2, 3, 4, 1).cpu()  # (B, T, H, W, 3)


@torch.no_grad()
def generate_videos(model, tokenizer, prompts: list[str], seeds: list[int], shape: tuple[int, int, int, int],
                    cfg: SamplerConfig, device, space=None, negative: str = "", batch_size: int = 1
                    ) -> torch.Tensor:
    """Video i of `prompts[i]` from the noise of `seeds[i]`, sampled at `shape` (C, T, H, W) of
    what the DiT makes (latents when `space` is given) -> uint8 (N, T, H, W, 3), in batches of
    `batch_size`. The same (prompt, seed, shape, cfg) gives the same video whatever the batch."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    out = []
    for i in range(0, len(prompts), batch_size):
        cond = encode_prompts(model, tokenizer, prompts[i : i + batch_size], negative, device)
        noise = initial_noise(shape, seeds[i : i + batch_size]).to(device)  # (B, C, T, H, W)
        out.append(to_frames(sample(model.dit, cond, noise, cfg), space))  # (B, T, H, W, 3)
    return torch.cat(out)  # (N, T, H, W, 3)
