"""A causal 3D video VAE: video (B, 3, T, H, W) in [-1, 1] <-> latents (B, C, t, h, w).

Data flow (compression tc in time, s in space; t = 1 + (T - 1) / tc, h = H / s, w = W / s):

    x (B, 3, T, H, W) --conv_in--> [ResBlock x n, Downsample] per level --> mid ResBlocks
      --> norm, SiLU, conv_out --> moments (B, 2C, t, h, w) --> DiagonalGaussian(mean, logvar)
    z (B, C, t, h, w) --conv_in--> mid ResBlocks --> [ResBlock x (n+1), Upsample] per level
      --> norm, SiLU, conv_out --> x' (B, 3, T, H, W)

Design decisions:

- **Causal in time.** Every 3D convolution pads only on the left in time (``CausalConv3d``), so
  an output frame sees only input frames at or before it. Temporal downsampling is a kernel-3,
  stride-2 causal convolution: 1 + 2n frames become 1 + n, output 0 sees frame 0 alone and
  output j sees frames 2j-2..2j. Hence the first frame always encodes alone: an image is a
  one-frame video, and images and videos share one latent space (as in MAGVIT-v2, CogVideoX
  and Wan). Temporal upsampling repeats each latent frame twice except the very first one.
- **Per-position channel RMSNorm** (as Wan), not GroupNorm: GroupNorm's statistics mix every
  frame (breaking causality) and every pixel of a tile (making tiles disagree). A per-position
  norm keeps both exact. There is no attention for the same reason.
- **Chunked encode/decode with a causal cache.** Long videos are processed as frame 0, then
  ``chunk`` latent frames (``chunk * tc`` pixel frames) at a time. Each causal convolution
  keeps the last ``kernel - stride`` frames of its (padded) input in a cache dict passed down
  the call, so a chunked pass equals the whole-clip pass up to float rounding, with
  activations for one chunk alive at a time.
- **Spatial tiling with overlap blending.** Large frames are cut into tiles of ``tile`` pixels
  overlapping by ``overlap``; each tile is encoded (or decoded) on its own and the overlaps are
  blended with linear ramps that start overlap/4 inside a tile's interior border (weights
  normalised by their sum), so the outputs nearest a tile's zero-padded border are never used.
  Tiling is exact once overlap/4 covers the receptive field and approximate below that: a
  trained VAE's effective field is far smaller than its nominal one (the deep 8x tiny preset
  has a nominal radius of ~80 px), so use tiles of a few hundred pixels with 64+ px overlap.
- **Normalised latents.** ``encode`` returns ``(mean - latent_mean) / latent_std`` per channel
  (``VAEConfig.latent_mean/latent_std``, measured on training clips after training by
  ``training.latent.vae_train``), so the DiT sees ~unit-variance latents; ``decode`` inverts it.

Pure ``nn.Module`` (no distributed calls, logging or I/O), but for `save_pretrained` /
`from_pretrained`: a diffusers-style folder (``config.json`` = this ``VAEConfig``, weights as
safetensors; `training.pretrained`), which VAE training writes as ``<out>/vae/``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from data.checks import check_ranges, from_dict
from training import pretrained

# Size presets; every preset compresses (4, 8, 8) like the pretrained video VAEs (Wan, CogVideoX).
PRESETS: dict[str, dict] = {
    "tiny": dict(base_channels=8, channel_mult=[1, 2, 2, 2], num_res_blocks=1, latent_channels=4),  # debug / CI
    "small": dict(base_channels=64, channel_mult=[1, 2, 4, 4], num_res_blocks=1, latent_channels=16),
    "base": dict(base_channels=128, channel_mult=[1, 2, 4, 4], num_res_blocks=2, latent_channels=16),
}

Cache = dict  # id(module) -> its causal state; one dict per chunked pass


def _check_preset(name: str) -> None:
    if name not in PRESETS:
        raise ValueError(f"unknown VAE preset {name!r}; valid presets: {', '.join(PRESETS)}")


@dataclass
class VAEConfig:
    """Config of the causal VAE. `preset` is a label; the size fields below are what is built.

    ``VAEConfig.from_preset("small")`` fills the size fields from a preset.
    """

    preset: str = "tiny"
    in_channels: int = 3
    latent_channels: int = 4
    base_channels: int = 8
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2, 2])  # one level each; s = 2^(levels-1)
    num_res_blocks: int = 1
    temporal_downsample: list[bool] = field(default_factory=lambda: [False, True, True])  # per downsample
    # Latent normalisation per channel (empty: 0 and 1); set by training from the latent statistics.
    latent_mean: list[float] = field(default_factory=list)
    latent_std: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check_preset(self.preset)
        check_ranges(self, in_channels=">= 1", latent_channels=">= 1", base_channels=">= 1",
                     num_res_blocks=">= 0")
        if len(self.channel_mult) < 1 or min(self.channel_mult) < 1:
            raise ValueError(f"channel_mult must be positive ints, got {self.channel_mult}")
        if len(self.temporal_downsample) != len(self.channel_mult) - 1:
            raise ValueError(f"temporal_downsample needs one entry per downsample "
                             f"(len(channel_mult) - 1 = {len(self.channel_mult) - 1}), got {self.temporal_downsample}")
        for name in ("latent_mean", "latent_std"):
            v = getattr(self, name)
            if v and len(v) != self.latent_channels:
                raise ValueError(f"{name} needs {self.latent_channels} values (one per latent channel), got {len(v)}")
        if self.latent_std and min(self.latent_std) <= 0:
            raise ValueError(f"latent_std must be > 0, got {self.latent_std}")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "VAEConfig":
        _check_preset(name)
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown VAEConfig fields: {sorted(unknown)}")
        return cls(**{"preset": name, **PRESETS[name], **overrides})

    def with_preset(self, name: str) -> "VAEConfig":
        _check_preset(name)
        return replace(self, preset=name, **PRESETS[name])

    @property
    def compression(self) -> tuple[int, int, int]:
        """(tc, hs, ws): frames and pixels per latent frame and latent pixel."""
        s = 2 ** (len(self.channel_mult) - 1)
        return 2 ** sum(bool(t) for t in self.temporal_downsample), s, s

    def build(self) -> "VAE":
        return VAE(self)


def latent_shape(shape: tuple[int, int, int], compression: tuple[int, int, int]) -> tuple[int, int, int]:
    """(T, H, W) pixels -> (t, h, w) latents: t = 1 + (T - 1) / tc, h = H / hs, w = W / ws."""
    (T, H, W), (tc, hs, ws) = shape, compression
    if T < 1 or (T - 1) % tc or H % hs or W % ws:
        raise ValueError(f"video (T, H, W)={tuple(shape)} does not fit compression {tuple(compression)}: "
                         f"need T = 1 + k*{tc} frames (e.g. {1 + tc}, {1 + 2 * tc}, {1 + 4 * tc}) and H, W "
                         f"multiples of {hs}, {ws}")
    return 1 + (T - 1) // tc, H // hs, W // ws


# --------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------


class CausalConv3d(nn.Module):
    """Conv3d padded only on the left in time (zeros), symmetrically in space.

    With a cache dict, the padded input's last ``kt - st`` frames are kept for the next chunk
    (the frames the next output window starts with), so chunks compose exactly. Each chunk
    after the first must bring a multiple of the temporal stride of frames.
    """

    def __init__(self, cin: int, cout: int, kernel=(3, 3, 3), stride=(1, 1, 1)):
        super().__init__()
        kt, kh, kw = kernel
        self.kt, self.st = kt, stride[0]
        self.conv = nn.Conv3d(cin, cout, kernel, stride, padding=(0, kh // 2, kw // 2))

    def forward(self, x: torch.Tensor, cache: Optional[Cache] = None) -> torch.Tensor:
        B, C, T, H, W = x.shape
        prev = cache.get(id(self)) if cache is not None else None
        if prev is None:  # start of the stream: kt - 1 zero frames
            prev = x.new_zeros(B, C, self.kt - 1, H, W)
        x = torch.cat([prev, x], dim=2)  # (B, C, P + T, H, W)
        if (x.shape[2] - self.kt) % self.st:
            raise ValueError(f"a chunk of {T} frames does not align with temporal stride {self.st}")
        if cache is not None:
            # a copy, not a view: a view would keep this chunk's whole padded input alive
            cache[id(self)] = x[:, :, x.shape[2] - (self.kt - self.st):].clone()  # (B, C, kt - st, H, W)
        return self.conv(x)  # (B, C', T', H', W')


class ChannelRMSNorm(nn.Module):
    """RMS over channels at each (t, h, w) position: causal and tile-invariant."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = math.sqrt(dim)
        self.gamma = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, b = self.gamma.view(1, -1, 1, 1, 1), self.bias.view(1, -1, 1, 1, 1)
        return F.normalize(x, dim=1, eps=1e-6) * self.scale * g + b  # (B, C, T, H, W)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = ChannelRMSNorm(cin), CausalConv3d(cin, cout)
        self.norm2, self.conv2 = ChannelRMSNorm(cout), CausalConv3d(cout, cout)
        self.skip = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, cache: Optional[Cache] = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)), cache)  # (B, C', T, H, W)
        h = self.conv2(F.silu(self.norm2(h)), cache)  # (B, C', T, H, W)
        return self.skip(x) + h


class Downsample(nn.Module):
    """2x in space; 2x causally in time when `temporal` (1 + 2n frames -> 1 + n)."""

    def __init__(self, dim: int, temporal: bool):
        super().__init__()
        kt = 3 if temporal else 1
        self.conv = CausalConv3d(dim, dim, (kt, 3, 3), (2 if temporal else 1, 2, 2))

    def forward(self, x: torch.Tensor, cache: Optional[Cache] = None) -> torch.Tensor:
        return self.conv(x, cache)  # (B, C, T', H/2, W/2)


class Upsample(nn.Module):
    """2x nearest in space; in time (when `temporal`) every frame twice except the stream's
    first (1 + n frames -> 1 + 2n), then a causal conv."""

    def __init__(self, dim: int, temporal: bool):
        super().__init__()
        self.temporal = temporal
        self.conv = CausalConv3d(dim, dim)

    def forward(self, x: torch.Tensor, cache: Optional[Cache] = None) -> torch.Tensor:
        if self.temporal:
            start = cache is None or id(self) not in cache
            x = x.repeat_interleave(2, dim=2)  # (B, C, 2T, H, W)
            if start:
                x = x[:, :, 1:]  # (B, C, 2T - 1, H, W): the first frame stays one frame
            if cache is not None:
                cache[id(self)] = True
        x = F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest")  # (B, C, T', 2H, 2W)
        return self.conv(x, cache)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chans = [cfg.base_channels * m for m in cfg.channel_mult]
        self.conv_in = CausalConv3d(cfg.in_channels, chans[0])
        blocks: list[nn.Module] = []
        cin = chans[0]
        for i, c in enumerate(chans):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(cin, c))
                cin = c
            if i < len(chans) - 1:
                blocks.append(Downsample(c, cfg.temporal_downsample[i]))
        blocks += [ResBlock(cin, cin), ResBlock(cin, cin)]  # mid
        self.blocks = nn.ModuleList(blocks)
        self.norm_out = ChannelRMSNorm(cin)
        self.conv_out = CausalConv3d(cin, 2 * cfg.latent_channels)

    def forward(self, x: torch.Tensor, cache: Optional[Cache] = None) -> torch.Tensor:
        """x (B, 3, T, H, W) -> moments (B, 2C, t, h, w) = mean, logvar."""
        h = self.conv_in(x, cache)  # (B, c0, T, H, W)
        for blk in self.blocks:
            h = blk(h, cache)
        return self.conv_out(F.silu(self.norm_out(h)), cache)  # (B, 2C, t, h, w)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chans = [cfg.base_channels * m for m in cfg.channel_mult][::-1]
        temporal = list(cfg.temporal_downsample)[::-1]
        self.conv_in = CausalConv3d(cfg.latent_channels, chans[0])
        blocks: list[nn.Module] = [ResBlock(chans[0], chans[0]), ResBlock(chans[0], chans[0])]  # mid
        cin = chans[0]
        for i, c in enumerate(chans):
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResBlock(cin, c))
                cin = c
            if i < len(chans) - 1:
                blocks.append(Upsample(c, temporal[i]))
        self.blocks = nn.ModuleList(blocks)
        self.norm_out = ChannelRMSNorm(cin)
        self.conv_out = CausalConv3d(cin, cfg.in_channels)

    def forward(self, z: torch.Tensor, cache: Optional[Cache] = None) -> torch.Tensor:
        """z (B, C, t, h, w) raw (unnormalised) latents -> x (B, 3, T, H, W)."""
        h = self.conv_in(z, cache)  # (B, c, t, h, w)
        for blk in self.blocks:
            h = blk(h, cache)
        return self.conv_out(F.silu(self.norm_out(h)), cache)  # (B, 3, T, H, W)


class DiagonalGaussian:
    """The posterior q(z | x) = N(mean, exp(logvar)) per latent element."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.float().chunk(2, dim=1)  # (B, C, t, h, w) each
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator,
                            device=generator.device if generator is not None else self.mean.device)
        return self.mean + self.std * noise.to(self.mean.device)  # (B, C, t, h, w)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, averaged (not summed) over latent elements -> (B,).
        Averaging makes `kl_weight` independent of the clip size."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).flatten(1).mean(1)


# --------------------------------------------------------------------------------------
# Tiling
# --------------------------------------------------------------------------------------


def _starts(n: int, tile: int, stride: int) -> list[int]:
    """Tile starts covering [0, n); the last tile ends at n."""
    if n <= tile:
        return [0]
    return sorted(set(list(range(0, n - tile, stride)) + [n - tile]))


def _ramp(n: int, ov: int, first: bool, last: bool, like: torch.Tensor) -> torch.Tensor:
    """Blend weights (n,) of one tile along one axis: over each interior overlap of `ov`, 0 for
    the outer quarter (where zero padding at the tile's border errs most), then a linear ramp
    over the middle half, then 1. Two tiles overlapping by `ov` get weights summing to 1."""
    w = torch.ones(n, dtype=like.dtype, device=like.device)  # (n,)
    if ov > 0:
        i = torch.arange(ov, dtype=like.dtype, device=like.device) + 0.5  # (ov,)
        r = ((i - ov / 4) / (ov / 2)).clamp(0.0, 1.0)  # (ov,)
        if not first:
            w[:ov] = torch.minimum(w[:ov], r)
        if not last:
            w[-ov:] = torch.minimum(w[-ov:], r.flip(0))
    return w


def tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: int,
          scale: float) -> torch.Tensor:
    """Apply `fn` to overlapping spatial tiles of x (B, C, T, H, W) and blend.

    `tile`/`overlap` are in x's pixels; fn maps a (h, w) tile to (h*scale, w*scale). Overlaps
    are blended by `_ramp` over `overlap * scale` output pixels, normalised by the sum of
    weights, so any coverage (including the end tile's larger overlap) is a convex blend. Each
    tile's output is used only from overlap/4 inside its interior borders: when that margin
    covers the network's receptive field, tiling is exact.
    """
    H, W = x.shape[-2:]
    if H <= tile and W <= tile:
        return fn(x)
    stride = tile - overlap
    out = weight = None
    hs, ws = _starts(H, tile, stride), _starts(W, tile, stride)
    ov = int(round(overlap * scale))
    for i, h0 in enumerate(hs):
        for j, w0 in enumerate(ws):
            y = fn(x[..., h0 : h0 + tile, w0 : w0 + tile])  # (B, C', T', th', tw')
            if out is None:
                shape = (*y.shape[:3], int(round(H * scale)), int(round(W * scale)))
                out = y.new_zeros(shape)  # (B, C', T', H', W')
                weight = y.new_zeros(shape[-2:])  # (H', W')
            th, tw = y.shape[-2:]
            oh, ow = int(round(h0 * scale)), int(round(w0 * scale))
            wgt = torch.outer(_ramp(th, ov, i == 0, i == len(hs) - 1, y),
                              _ramp(tw, ov, j == 0, j == len(ws) - 1, y))  # (th', tw')
            out[..., oh : oh + th, ow : ow + tw] += y * wgt
            weight[oh : oh + th, ow : ow + tw] += wgt
    return out / weight


# --------------------------------------------------------------------------------------
# The VAE
# --------------------------------------------------------------------------------------


class VAE(nn.Module):
    """The causal video VAE. `encode`/`decode` work on normalised latents (what the DiT sees);
    `forward` returns the reconstruction of a posterior sample and the posterior (training)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        C = cfg.latent_channels
        mean = torch.tensor(cfg.latent_mean or [0.0] * C).view(1, C, 1, 1, 1)
        std = torch.tensor(cfg.latent_std or [1.0] * C).view(1, C, 1, 1, 1)
        self.register_buffer("latent_mean", mean, persistent=False)  # from the config, not the state dict
        self.register_buffer("latent_std", std, persistent=False)

    @property
    def channels(self) -> int:
        return self.cfg.latent_channels

    @property
    def compression(self) -> tuple[int, int, int]:
        return self.cfg.compression

    def set_normalization(self, mean: list[float], std: list[float]) -> None:
        """Set the per-channel latent statistics (also in self.cfg, so they are saved with it)."""
        self.cfg = replace(self.cfg, latent_mean=[float(m) for m in mean], latent_std=[float(s) for s in std])
        C = self.channels
        self.latent_mean.copy_(torch.tensor(self.cfg.latent_mean).view(1, C, 1, 1, 1))
        self.latent_std.copy_(torch.tensor(self.cfg.latent_std).view(1, C, 1, 1, 1))

    # -- chunked passes (exact) ----------------------------------------------------------
    def _encode_chunked(self, x: torch.Tensor, chunk: int) -> torch.Tensor:
        """x (B, 3, T, H, W) -> moments (B, 2C, t, h, w); frame 0, then chunk*tc frames at a time."""
        step = chunk * self.compression[0]
        if chunk <= 0 or x.shape[2] <= 1 + step:
            return self.encoder(x)
        cache: Cache = {}
        outs = [self.encoder(x[:, :, :1], cache)]
        for s in range(1, x.shape[2], step):
            outs.append(self.encoder(x[:, :, s : s + step], cache))
        return torch.cat(outs, dim=2)  # (B, 2C, t, h, w)

    def _decode_chunked(self, z: torch.Tensor, chunk: int) -> torch.Tensor:
        """raw z (B, C, t, h, w) -> x (B, 3, T, H, W); latent frame 0, then chunk at a time."""
        if chunk <= 0 or z.shape[2] <= 1 + chunk:
            return self.decoder(z)
        cache: Cache = {}
        outs = [self.decoder(z[:, :, :1], cache)]
        for s in range(1, z.shape[2], chunk):
            outs.append(self.decoder(z[:, :, s : s + chunk], cache))
        return torch.cat(outs, dim=2)  # (B, 3, T, H, W)

    # -- public API ------------------------------------------------------------------------
    def posterior(self, x: torch.Tensor, *, tile: int = 0, overlap: int = 0, chunk: int = 0) -> DiagonalGaussian:
        """x (B, 3, T, H, W) in [-1, 1] -> q(z | x) over raw latents (B, C, t, h, w).

        tile > 0: spatial tiles of `tile` pixels overlapping by `overlap` (multiples of the
        spatial compression); chunk > 0: `chunk` latent frames per temporal chunk."""
        latent_shape(tuple(x.shape[2:]), self.compression)  # validates
        _, hs, _ = self.compression
        if tile > 0:
            if tile % hs or overlap % hs or not 0 <= overlap < tile:
                raise ValueError(f"tile ({tile}) and overlap ({overlap}) must be multiples of {hs}, overlap < tile")
            moments = tiled(lambda v: self._encode_chunked(v, chunk), x, tile, overlap, 1 / hs)
        else:
            moments = self._encode_chunked(x, chunk)  # (B, 2C, t, h, w)
        return DiagonalGaussian(moments)

    def posterior_stream(self, chunks: Iterable[torch.Tensor]) -> DiagonalGaussian:
        """q(z | x) of a clip given as consecutive chunks (B, 3, T_i, H, W) in [-1, 1]: the
        first of one frame, every later one of a multiple of the temporal compression frames
        (``chunk * tc``). Each chunk goes through the encoder with the causal cache and is then
        dropped, so only one chunk's activations (and the small moments) are ever alive: the
        memory of a minute is the memory of a chunk. Equal to ``posterior`` of the whole clip
        up to float rounding."""
        cache: Cache = {}
        outs = []
        for i, x in enumerate(chunks):
            if i == 0 and x.shape[2] != 1:
                raise ValueError(f"the first chunk of a stream is the first frame alone, got {x.shape[2]} frames")
            outs.append(self.encoder(x, cache))  # (B, 2C, t_i, h, w)
        if not outs:
            raise ValueError("an empty stream of chunks")
        return DiagonalGaussian(torch.cat(outs, dim=2))  # (B, 2C, t, h, w)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.latent_mean) / self.latent_std  # (B, C, t, h, w)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.latent_std + self.latent_mean  # (B, C, t, h, w)

    def encode(self, x: torch.Tensor, *, sample: bool = False, generator: Optional[torch.Generator] = None,
               tile: int = 0, overlap: int = 0, chunk: int = 0) -> torch.Tensor:
        """x (B, 3, T, H, W) in [-1, 1] -> normalised latents (B, C, t, h, w): the posterior
        mean, or a sample when `sample`."""
        q = self.posterior(x, tile=tile, overlap=overlap, chunk=chunk)
        return self.normalize(q.sample(generator) if sample else q.mode())

    def decode(self, z: torch.Tensor, *, tile: int = 0, overlap: int = 0, chunk: int = 0) -> torch.Tensor:
        """normalised latents (B, C, t, h, w) -> video (B, 3, T, H, W), roughly in [-1, 1].
        tile/overlap are in pixels (as for encode); chunk in latent frames."""
        z = self.denormalize(z.to(self.latent_std.dtype))  # (B, C, t, h, w) raw
        _, hs, _ = self.compression
        if tile > 0:
            if tile % hs or overlap % hs or not 0 <= overlap < tile:
                raise ValueError(f"tile ({tile}) and overlap ({overlap}) must be multiples of {hs}, overlap < tile")
            return tiled(lambda v: self._decode_chunked(v, chunk), z, tile // hs, overlap // hs, hs)
        return self._decode_chunked(z, chunk)

    def forward(self, x: torch.Tensor, generator: Optional[torch.Generator] = None):
        """Training: x (B, 3, T, H, W) -> (reconstruction (B, 3, T, H, W), posterior)."""
        q = self.posterior(x)
        return self.decoder(q.sample(generator)), q


def save_pretrained(folder: str | Path, vae: VAE) -> Path:
    """The VAE as a diffusers-style folder: config.json (its VAEConfig, with the latent
    normalisation) and diffusion_pytorch_model.safetensors."""
    return pretrained.save_pretrained(folder, VAE.__name__, asdict(vae.cfg), vae.state_dict())


def from_pretrained(folder: str | Path) -> VAE:
    """The VAE of a `save_pretrained` folder (a VAE-training output's ``vae``), in eval mode
    on the CPU."""
    config, state = pretrained.load_pretrained(folder, VAE.__name__)
    vae = from_dict(VAEConfig, config).build()
    vae.load_state_dict(state)  # strict
    return vae.eval()
