"""The latent space the DiT is trained in: our causal VAE, a pretrained diffusers VAE, or none.

    LatentConfig --build()--> LatentSpace
    video (B, 3, T, H, W) in [-1, 1] --encode--> z (B, C, t, h, w), ~unit variance per channel
    z --decode--> video (B, 3, T, H, W)

Every latent space has the same surface: ``encode``, ``decode``, ``channels``, ``compression``
(tc, hs, ws), ``latent_shape((T, H, W))`` and ``identity`` (a string naming the source,
options and a fingerprint of the weights: latent shards record it, so latents made by one VAE
are never decoded by another unnoticed). Latent spaces are frozen (no gradients, always in eval
mode) and return float32 whatever their weights' precision.

Kinds (``LatentConfig.kind``):

- ``none``: the DiT works on pixels (no latent space; ``build`` refuses).
- ``ours``: ``training.latent.vae.VAE`` loaded from a VAE-training output directory (``vae.pt`` +
  ``vae_config.json``, see ``training.latent.vae_train``), given as ``path`` or by the graph's VAE
  stage.
- ``diffusers``: a diffusers video VAE (``AutoencoderKLWan``, ``AutoencoderKLCogVideoX``, ...)
  from a hub id or a local directory (``path`` + ``subfolder``), see ``PretrainedVAE`` below.

The config also holds what latent shards hold and how they are written (the clip window
``num_frames``/``height``/``width``/``target_fps``, ``batch_size``, ``clips_per_shard``,
``store_dtype``): they belong to the latent data, so the precompute stage can hash this
section alone; training checks that its shape matches the shards'.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.nn as nn

from data.checks import check_ranges, from_dict
from training.latent.vae import VAEConfig, latent_shape
from training.text import weights_fingerprint

LATENT_KINDS = ("none", "ours", "diffusers")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
STORE_DTYPES = ("fp32", "fp16")
SPANS = ("window", "whole")
STREAM_CHUNK = 4  # latent frames per chunk of a whole-clip encode when chunk_frames is 0


@dataclass
class LatentConfig:
    kind: str = "none"  # none | ours | diffusers
    path: Optional[str] = None  # ours: VAE-training output dir; diffusers: hub id or local dir
    subfolder: Optional[str] = None  # diffusers: e.g. "vae" inside a pipeline repository
    class_name: str = "auto"  # diffusers: AutoencoderKLWan | AutoencoderKLCogVideoX | auto (config.json)
    revision: Optional[str] = None  # diffusers: hub revision (a commit hash pins the weights)
    precision: str = "fp32"  # weights: fp32 | bf16 | fp16 (latents come out float32)
    sample: bool = False  # encode to a posterior sample instead of its mean
    seed: int = 0  # for sample=True
    tile_size: int = 0  # spatial tiles of this many pixels (0: whole frames)
    tile_overlap: int = 0  # pixels shared by neighbouring tiles
    chunk_frames: int = 0  # ours: latent frames per temporal chunk (0: whole clip); diffusers chunk on their own
    # latent shards: the window encoded per clip (in the YAML, interpolate these from train.*,
    # e.g. num_frames: ${train.num_frames}, so the precompute stage hashes only these values)
    num_frames: int = 9  # 1 + k * the VAE's temporal compression
    height: int = 32
    width: int = 32
    target_fps: Optional[float] = None
    batch_size: int = 4  # clips per encode call (span=window; whole clips encode one at a time)
    clips_per_shard: int = 64
    store_dtype: str = "fp32"  # fp32 | fp16 (halves the shards; ~1e-3 relative rounding)
    # window: each clip's first num_frames frames | whole: every frame of the clip at target_fps
    # (trimmed to 1 + k * tc, padded to num_frames), streamed through the encoder in causal
    # chunks of chunk_frames latent frames (STREAM_CHUNK when 0), so training takes any window
    span: str = "window"
    max_frames: int = 0  # span=whole: at most this many frames per clip (0: all)

    def __post_init__(self) -> None:
        if self.kind not in LATENT_KINDS:
            raise ValueError(f"unknown latent kind {self.kind!r} (latent.kind); valid: {', '.join(LATENT_KINDS)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown latent.precision {self.precision!r}; valid: {', '.join(PRECISIONS)}")
        if self.store_dtype not in STORE_DTYPES:
            raise ValueError(f"unknown latent.store_dtype {self.store_dtype!r}; valid: {', '.join(STORE_DTYPES)}")
        if self.span not in SPANS:
            raise ValueError(f"unknown latent.span {self.span!r}; valid: {', '.join(SPANS)}")
        if self.span == "whole" and self.tile_size > 0:
            raise ValueError("latent.span=whole streams each clip through the encoder's causal cache, which "
                             "spatial tiles cannot share: set latent.tile_size=0 (or latent.span=window)")
        if self.kind == "diffusers" and not self.path:
            raise ValueError("latent.kind=diffusers needs latent.path (a hub id or a local directory)")
        if self.tile_size < 0 or not 0 <= self.tile_overlap < max(self.tile_size, 1):
            raise ValueError(f"latent.tile_overlap ({self.tile_overlap}) must be in [0, latent.tile_size "
                             f"({self.tile_size})); tile_size 0 turns tiling off")
        check_ranges(self, chunk_frames=">= 0", num_frames=">= 1", height=">= 1", width=">= 1",
                     target_fps="> 0", batch_size=">= 1", clips_per_shard=">= 1", max_frames=">= 0")

    @property
    def enabled(self) -> bool:
        return self.kind != "none"

    def build(self, vae_dir: Optional[str] = None, device=None) -> "LatentSpace":
        """The latent space. `vae_dir` (kind=ours) overrides `path`: the graph passes its VAE
        stage's output directory. Weights are loaded, never trained."""
        if self.kind == "none":
            raise ValueError("latent.kind=none: the model works on pixels, there is no latent space to build")
        if self.kind == "ours":
            path = vae_dir or self.path
            if not path:
                raise ValueError("latent.kind=ours needs a trained VAE: latent.path (a VAE-training output "
                                 "directory with vae.pt and vae_config.json) or the graph's vae stage")
            space: LatentSpace = OurVAE(self, str(path))
        else:
            space = PretrainedVAE(self)
        return space.to(device) if device is not None else space


class LatentSpace(nn.Module):
    """Base of the latent spaces: frozen, eval mode, float32 in and out.

    Subclasses set `model`, `channels`, `compression`, call `_freeze()`, and implement
    `_encode(video) -> z` and `_decode(z) -> video` on the model's device and dtype."""

    def __init__(self, cfg: LatentConfig):
        super().__init__()
        self.cfg = cfg
        self.channels = 0
        self.compression: tuple[int, int, int] = (1, 1, 1)
        self.identity = ""

    def _freeze(self, source: str) -> None:
        """Cast, freeze, and fix `identity` (`source` names the architecture, e.g. a class)."""
        self.to(PRECISIONS[self.cfg.precision])
        self.requires_grad_(False)
        self.train(False)
        c = self.cfg
        # not the path: the weights' fingerprint names them wherever they are stored
        self.identity = (f"{c.kind}|{source}|{c.precision}|sample={c.sample}|tile={c.tile_size}/{c.tile_overlap}"
                         f"|{weights_fingerprint(self)}")

    def train(self, mode: bool = True) -> "LatentSpace":
        return super().train(False)  # frozen: whatever the parent asks

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def latent_shape(self, shape: tuple[int, int, int]) -> tuple[int, int, int]:
        return latent_shape(tuple(shape), self.compression)

    @torch.no_grad()
    def encode(self, video: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """video (B, 3, T, H, W) in [-1, 1] -> normalised latents (B, C, t, h, w) float32."""
        self.latent_shape(tuple(video.shape[2:]))  # a clear error for a wrong frame count
        z = self._encode(video.to(self.device, self.dtype), generator)  # (B, C, t, h, w)
        return z.float()

    @torch.no_grad()
    def encode_stream(self, chunks: Iterable[torch.Tensor], generator: Optional[torch.Generator] = None
                      ) -> torch.Tensor:
        """A clip given as consecutive chunks (B, 3, T_i, H, W) in [-1, 1] (the first frame
        alone, then multiples of the temporal compression) -> normalised latents (B, C, t, h, w)
        float32: ``encode`` of the whole clip, with (for our VAE) one chunk in memory at a time."""
        return self._encode_stream((c.to(self.device, self.dtype) for c in chunks), generator).float()

    def _encode_stream(self, chunks, generator) -> torch.Tensor:
        # default: gather the clip and encode it whole (diffusers VAEs chunk inside their own
        # encode, but take the whole clip: their memory grows with its length)
        return self._encode(torch.cat(list(chunks), dim=2), generator)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """normalised latents (B, C, t, h, w) -> video (B, 3, T, H, W) float32, ~[-1, 1]."""
        if z.shape[1] != self.channels:
            raise ValueError(f"latents have {z.shape[1]} channels, this VAE {self.channels}")
        return self._decode(z.to(self.device, torch.float32)).float()

    def _encode(self, video: torch.Tensor, generator) -> torch.Tensor:
        raise NotImplementedError

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode_video(self, z: torch.Tensor) -> torch.Tensor:
        """normalised latents (N, C, t, h, w) -> uint8 frames (N, T, H, W, 3) on the CPU, for mp4."""
        x = self.decode(z)  # (N, 3, T, H, W)
        x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (N, 3, T, H, W)
        return x.permute(0, 2, 3, 4, 1).cpu()  # (N, T, H, W, 3)

    def describe(self) -> dict:
        """What a latent shard or a training run records to rebuild this latent space."""
        return {"config": asdict(self.cfg), "channels": self.channels,
                "compression": list(self.compression), "identity": self.identity}


class OurVAE(LatentSpace):
    """`training.latent.vae.VAE` from a VAE-training output directory (vae.pt, vae_config.json)."""

    def __init__(self, cfg: LatentConfig, path: str):
        super().__init__(cfg)
        root = Path(path)
        for f in ("vae.pt", "vae_config.json"):
            if not (root / f).exists():
                raise FileNotFoundError(f"{root / f} not found: latent.kind=ours needs a VAE-training output "
                                        f"directory (vae.pt, vae_config.json)")
        vcfg = from_dict(VAEConfig, json.loads((root / "vae_config.json").read_text()))
        self.model = vcfg.build()
        self.model.load_state_dict(torch.load(root / "vae.pt", map_location="cpu", weights_only=True))
        self.cfg = LatentConfig(**{**asdict(cfg), "path": str(root.resolve())})  # what was loaded
        self.channels, self.compression = vcfg.latent_channels, vcfg.compression
        self._freeze(f"VAE-{vcfg.preset}")

    def _opts(self) -> dict:
        return dict(tile=self.cfg.tile_size, overlap=self.cfg.tile_overlap, chunk=self.cfg.chunk_frames)

    def _encode(self, video, generator):
        return self.model.encode(video, sample=self.cfg.sample, generator=generator, **self._opts())

    def _decode(self, z):
        return self.model.decode(z.to(self.dtype), **self._opts())

    def _encode_stream(self, chunks, generator):
        q = self.model.posterior_stream(chunks)
        return self.model.normalize(q.sample(generator) if self.cfg.sample else q.mode())


def load_latent_space(source, device=None) -> Optional[LatentSpace]:
    """The latent space a training run (or a latent-shard directory) used, or None for pixels.

    `source`: a training output directory (its ``train_config.json`` has ``latent``), a latent
    shard directory (``latent_space.json``), the recorded dict itself, or a `LatentConfig`."""
    if isinstance(source, LatentConfig):
        return source.build(device=device) if source.enabled else None
    if isinstance(source, dict):
        rec = source
    else:
        root = Path(source)
        if (root / "latent_space.json").exists():
            rec = json.loads((root / "latent_space.json").read_text())
        else:
            rec = json.loads((root / "train_config.json").read_text()).get("latent")
        if rec is None:
            return None
    cfg = from_dict(LatentConfig, rec["config"] if "config" in rec else rec)
    if not cfg.enabled:
        return None
    space = cfg.build(device=device)
    if "identity" in rec and rec["identity"] != space.identity:
        raise ValueError(f"the VAE at {cfg.path!r} is not the one the latents were made with: "
                         f"recorded {rec['identity']!r}, loaded {space.identity!r}")
    return space


# ----- pretrained diffusers video VAEs -------------------------------------------------------
# Pretrained diffusers video VAEs behind the same surface as ours (`LatentSpace`).
#
#     PretrainedVAE(LatentConfig(kind="diffusers", path="Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
#                                subfolder="vae"))
#
# Loading is diffusers' own ``from_pretrained(path, subfolder=..., revision=...)``, so ``path`` is
# a hub id (resolved through the Hugging Face cache; set ``HF_HUB_OFFLINE=1`` on machines without
# internet) or a local ``save_pretrained`` directory. ``class_name`` picks the class
# (``AutoencoderKLWan``, ``AutoencoderKLCogVideoX``, or any diffusers autoencoder by name);
# ``auto`` lets ``diffusers.AutoModel`` read it from ``config.json``.
#
# Normalisation follows each model's own pipeline, so the DiT sees what the model's authors'
# DiT saw:
#
# - per-channel ``latents_mean`` / ``latents_std`` in the config (Wan): z = (mu - mean) / std;
# - otherwise ``scaling_factor`` and optional ``shift_factor`` (CogVideoX, SD-style):
#   z = (mu - shift) * scaling_factor.
#
# (CogVideoX 1.5's ``invert_scale_latents`` only concerns its image-to-video conditioning and is
# not applied.) Compression comes from the config: Wan's ``scale_factor_temporal/spatial`` (or
# its ``temperal_downsample``), CogVideoX's ``temporal_compression_ratio`` and block count, or a
# model's ``temporal/spatial_compression_ratio``. Temporal chunking is built into these models
# (their causal caches); spatial tiling maps onto their ``enable_tiling``.


def load_diffusers_vae(cfg: LatentConfig):
    """The diffusers model named by cfg (path, subfolder, revision, class_name)."""
    import diffusers  # lazy: ~5 s to import, and only kind=diffusers needs it

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
