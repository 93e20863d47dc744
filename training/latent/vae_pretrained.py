"""Pretrained diffusers video VAEs behind the same surface as ours (`LatentSpace`).

    PretrainedVAE(LatentConfig(kind="diffusers", path="Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
                               subfolder="vae"))

Loading is diffusers' own ``from_pretrained(path, subfolder=..., revision=...)``, so ``path`` is
a hub id (resolved through the Hugging Face cache; set ``HF_HUB_OFFLINE=1`` on machines without
internet) or a local ``save_pretrained`` directory. ``class_name`` picks the class
(``AutoencoderKLWan``, ``AutoencoderKLCogVideoX``, or any diffusers autoencoder by name);
``auto`` lets ``diffusers.AutoModel`` read it from ``config.json``.

Normalisation follows each model's own pipeline, so the DiT sees what the model's authors'
DiT saw:

- per-channel ``latents_mean`` / ``latents_std`` in the config (Wan): z = (mu - mean) / std;
- otherwise ``scaling_factor`` and optional ``shift_factor`` (CogVideoX, SD-style):
  z = (mu - shift) * scaling_factor.

(CogVideoX 1.5's ``invert_scale_latents`` only concerns its image-to-video conditioning and is
not applied.) Compression comes from the config: Wan's ``scale_factor_temporal/spatial`` (or
its ``temperal_downsample``), CogVideoX's ``temporal_compression_ratio`` and block count, or a
model's ``temporal/spatial_compression_ratio``. Temporal chunking is built into these models
(their causal caches); spatial tiling maps onto their ``enable_tiling``.
"""

from __future__ import annotations

from typing import Optional

import torch

from training.latent.space import LatentConfig, LatentSpace


def load_diffusers_vae(cfg: LatentConfig):
    """The diffusers model named by cfg (path, subfolder, revision, class_name)."""
    import diffusers

    kw = dict(subfolder=cfg.subfolder, revision=cfg.revision)
    if cfg.class_name == "auto":
        return diffusers.AutoModel.from_pretrained(cfg.path, **kw)
    cls = getattr(diffusers, cfg.class_name, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ValueError(f"latent.class_name={cfg.class_name!r} is not a diffusers model class "
                         f"(e.g. AutoencoderKLWan, AutoencoderKLCogVideoX, or auto)")
    return cls.from_pretrained(cfg.path, **kw)


def vae_compression(model) -> tuple[int, int, int]:
    """(tc, hs, ws) of a diffusers video VAE, from its config."""
    c = model.config
    name = type(model).__name__
    if name == "AutoencoderKLWan":
        tc = c.get("scale_factor_temporal") or 2 ** sum(bool(t) for t in c["temperal_downsample"])
        s = c.get("scale_factor_spatial") or 2 ** len(c["temperal_downsample"])
        return int(tc), int(s), int(s)
    if name == "AutoencoderKLCogVideoX":
        s = 2 ** (len(c["block_out_channels"]) - 1)
        return int(c["temporal_compression_ratio"]), s, s
    tc = c.get("temporal_compression_ratio") or getattr(model, "temporal_compression_ratio", None)
    s = c.get("spatial_compression_ratio") or getattr(model, "spatial_compression_ratio", None)
    if not (tc and s):
        raise ValueError(f"cannot tell the compression of diffusers {name}; supported: AutoencoderKLWan, "
                         f"AutoencoderKLCogVideoX, or a model with temporal/spatial_compression_ratio")
    return int(tc), int(s), int(s)


def vae_channels(model) -> int:
    c = model.config
    for k in ("z_dim", "latent_channels"):
        if c.get(k):
            return int(c[k])
    raise ValueError(f"cannot tell the latent channels of diffusers {type(model).__name__}")


class PretrainedVAE(LatentSpace):
    """A frozen diffusers video VAE: normalised latents in and out, float32."""

    def __init__(self, cfg: LatentConfig):
        super().__init__(cfg)
        self.model = load_diffusers_vae(cfg)
        self.channels, self.compression = vae_channels(self.model), vae_compression(self.model)
        c, C = self.model.config, self.channels
        if c.get("latents_mean") is not None and c.get("latents_std") is not None:
            mean, std = torch.tensor(c["latents_mean"]), torch.tensor(c["latents_std"])
            if mean.numel() != C or std.numel() != C:
                raise ValueError(f"latents_mean/std of {cfg.path!r} have {mean.numel()}/{std.numel()} values "
                                 f"for {C} channels")
        else:
            scale, shift = float(c.get("scaling_factor") or 1.0), float(c.get("shift_factor") or 0.0)
            mean, std = torch.full((C,), shift), torch.full((C,), 1.0 / scale)
        # registered after _freeze: they stay float32 and out of the weights' fingerprint
        self._freeze(type(self.model).__name__)
        self.register_buffer("latent_mean", mean.float().view(1, C, 1, 1, 1), persistent=False)
        self.register_buffer("latent_std", std.float().view(1, C, 1, 1, 1), persistent=False)
        if cfg.tile_size > 0:
            self._enable_tiling(cfg.tile_size, cfg.tile_overlap)

    def _enable_tiling(self, tile: int, overlap: int) -> None:
        m = self.model
        if type(m).__name__ == "AutoencoderKLCogVideoX":
            f = overlap / tile
            m.enable_tiling(tile_sample_min_height=tile, tile_sample_min_width=tile,
                            tile_overlap_factor_height=f, tile_overlap_factor_width=f)
        else:  # Wan and most others: a minimum tile size and a stride
            m.enable_tiling(tile_sample_min_height=tile, tile_sample_min_width=tile,
                            tile_sample_stride_height=tile - overlap, tile_sample_stride_width=tile - overlap)

    def _encode(self, video: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        q = self.model.encode(video).latent_dist
        mu = q.sample(generator=generator) if self.cfg.sample else q.mode()  # (B, C, t, h, w)
        return (mu.float() - self.latent_mean) / self.latent_std  # (B, C, t, h, w)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        mu = z * self.latent_std + self.latent_mean  # (B, C, t, h, w) raw
        return self.model.decode(mu.to(self.dtype)).sample  # (B, 3, T, H, W)
