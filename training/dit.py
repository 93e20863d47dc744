"""Spacetime-patch Diffusion Transformer (DiT) for text-to-video flow matching.

Data flow (shapes for one batch):

    x (B, C, T, H, W) --patchify--> (B, N, pt*ph*pw*C) --x_embed--> tokens (B, N, D)
    t (B,) --sinusoid(1000 t)--> MLP --+
    text (B, L, Dt), text_mask (B, L) --masked mean--> Linear --+--> c (B, D)   adaLN conditioning
    positions of the (T', H', W') token grid --> 3D RoPE (cos, sin) (N, hd/2)
    tokens --[DiTBlock x depth]--> FinalLayer --> (B, N, pt*ph*pw*C) --unpatchify--> v (B, C, T, H, W)

A DiTBlock is: adaLN-Zero self-attention over all spacetime tokens (RoPE, QK-RMSNorm),
cross-attention to the text tokens (padding masked out), adaLN-Zero MLP. Every residual
branch is zero-initialised, so each block is exactly the identity at init.

The module is pure: no distributed calls, logging or I/O. Parallelism and precision are
applied from outside (training/).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# Size presets. Only the transformer trunk changes; everything else comes from the config.
PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=128, depth=4, num_heads=4),  # debug / CI, ~1.6M params
    "small": dict(hidden_size=384, depth=12, num_heads=6),
    "base": dict(hidden_size=768, depth=12, num_heads=12),
    "large": dict(hidden_size=1024, depth=24, num_heads=16),
    "xl": dict(hidden_size=1152, depth=28, num_heads=16),
    "3b": dict(hidden_size=2304, depth=32, num_heads=18),  # ~3.4B params (4.0B with text_dim=4096)
}

FREQ_EMBED_DIM = 256  # width of the sinusoidal timestep features
TIMESTEP_SCALE = 1000.0  # t in [0, 1] is scaled to [0, 1000] before the sinusoid


def _check_preset(name: str) -> None:
    if name not in PRESETS:
        raise ValueError(f"unknown DiT preset {name!r}; valid presets: {', '.join(PRESETS)}")


@dataclass
class DiTConfig:
    """Config of the DiT. `preset` is a label; the size fields below are what is built.

    Use `DiTConfig.from_preset("small", depth=6)` to fill the size fields from a preset.
    Constructing `DiTConfig(preset="small")` directly keeps the (tiny) field defaults.
    """

    preset: str = "tiny"
    in_channels: int = 3  # latent / pixel channels C
    patch_size: list[int] = field(default_factory=lambda: [1, 4, 4])  # (pt, ph, pw)
    hidden_size: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    text_dim: int = 128  # width of the text tokens cross-attended to
    qk_norm: bool = True
    grad_checkpointing: bool = False
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        _check_preset(self.preset)
        if len(self.patch_size) != 3 or any(int(p) < 1 for p in self.patch_size):
            raise ValueError(f"patch_size must be 3 positive ints (pt, ph, pw), got {self.patch_size}")
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        head_dim = self.hidden_size // self.num_heads
        if head_dim % 2 != 0 or head_dim < 6:
            raise ValueError(f"head_dim {head_dim} must be even and >= 6 for 3D RoPE")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "DiTConfig":
        _check_preset(name)
        known = {f.name for f in fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"unknown DiTConfig fields: {sorted(unknown)}")
        return cls(**{"preset": name, **PRESETS[name], **overrides})

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        pt, ph, pw = self.patch_size
        return pt * ph * pw * self.in_channels

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def build(self) -> "DiT":
        return DiT(self)


# --------------------------------------------------------------------------------------
# Patchify / unpatchify (pure functions)
# --------------------------------------------------------------------------------------


def patch_grid(shape: tuple[int, int, int], patch) -> tuple[int, int, int]:
    """Token grid (T', H', W') for a clip of (T, H, W) frames/pixels; raises if not divisible."""
    if any(s % p for s, p in zip(shape, patch)):
        raise ValueError(f"clip size (T, H, W)={tuple(shape)} is not divisible by patch {tuple(patch)}")
    return tuple(s // p for s, p in zip(shape, patch))  # type: ignore[return-value]


def patchify(x: torch.Tensor, patch) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, N, pt*ph*pw*C), tokens in (t, h, w) raster order."""
    pt, ph, pw = patch
    B, C, T, H, W = x.shape
    gt, gh, gw = patch_grid((T, H, W), patch)
    x = x.reshape(B, C, gt, pt, gh, ph, gw, pw)  # (B, C, T', pt, H', ph, W', pw)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # (B, T', H', W', pt, ph, pw, C)
    return x.reshape(B, gt * gh * gw, pt * ph * pw * C)  # (B, N, P*C)


def unpatchify(tokens: torch.Tensor, patch, grid) -> torch.Tensor:
    """(B, N, pt*ph*pw*C) -> (B, C, T, H, W); exact inverse of `patchify`."""
    pt, ph, pw = patch
    gt, gh, gw = grid
    B, N, PC = tokens.shape
    if N != gt * gh * gw or PC % (pt * ph * pw):
        raise ValueError(f"tokens {tuple(tokens.shape)} do not match grid {tuple(grid)} and patch {tuple(patch)}")
    C = PC // (pt * ph * pw)
    x = tokens.reshape(B, gt, gh, gw, pt, ph, pw, C)  # (B, T', H', W', pt, ph, pw, C)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, T', pt, H', ph, W', pw)
    return x.reshape(B, C, gt * pt, gh * ph, gw * pw)  # (B, C, T, H, W)


# --------------------------------------------------------------------------------------
# 3D rotary position embedding
# --------------------------------------------------------------------------------------


def rope_dims(head_dim: int) -> tuple[int, int, int]:
    """Split of the head dim into (t, h, w) rotary parts, each even (Wan-style: h = w = 2*(d//6))."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def grid_positions(grid, device=None) -> torch.Tensor:
    """Integer (t, h, w) coordinates of every token of a (T', H', W') grid, raster order -> (N, 3)."""
    axes = [torch.arange(g, device=device, dtype=torch.float32) for g in grid]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)  # (N, 3)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float = 10000.0):
    """Rotation angles for positions (..., N, 3) -> cos, sin each (..., N, head_dim // 2).

    Computed on the fly, so any T x H x W (or any per-sample positions, for packing) works.
    """
    angles = []
    for axis, dim in enumerate(rope_dims(head_dim)):
        inv_freq = theta ** (-torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim)  # (dim/2,)
        angles.append(positions[..., axis : axis + 1].float() * inv_freq)  # (..., N, dim/2)
    angles = torch.cat(angles, dim=-1)  # (..., N, hd/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x (B, H, N, hd) by angles cos/sin broadcastable to (B, H, N, hd/2)."""
    xf = x.float().unflatten(-1, (-1, 2))  # (B, H, N, hd/2, 2)
    x1, x2 = xf[..., 0], xf[..., 1]  # (B, H, N, hd/2)
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (B, H, N, hd/2, 2)
    return out.flatten(-2).type_as(x)  # (B, H, N, hd)


# --------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)  # (B, N, D)


def timestep_embedding(t: torch.Tensor, dim: int = FREQ_EMBED_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of t (B,) already scaled to [0, 1000] -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)  # (half,)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQ_EMBED_DIM, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(t.float() * TIMESTEP_SCALE)  # (B, 256) in float32 even for bf16 t
        return self.mlp(freq.to(self.mlp[0].weight.dtype))  # (B, D)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))  # (B, N, D)


class SelfAttention(nn.Module):
    """Full attention over all spacetime tokens, with 3D RoPE and optional QK-RMSNorm."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads)  # (B, N, 3, H, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, hd)
        q, k = self.q_norm(q), self.k_norm(k)  # (B, H, N, hd)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)  # (B, H, N, hd)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, hd)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))  # (B, N, D)


class CrossAttention(nn.Module):
    """Video tokens attend to text tokens; padded text tokens are masked out.

    A sample whose mask is all False gets a zero cross-attention output (instead of NaN).
    """

    def __init__(self, dim: int, text_dim: int, num_heads: int, qk_norm: bool):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(text_dim, 2 * dim)
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        L = text.shape[1]
        hd = D // self.num_heads
        q = self.q(x).reshape(B, N, self.num_heads, hd).transpose(1, 2)  # (B, H, N, hd)
        kv = self.kv(text).reshape(B, L, 2, self.num_heads, hd)  # (B, L, 2, H, hd)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, hd)
        q, k = self.q_norm(q), self.k_norm(k)  # (B, H, N, hd), (B, H, L, hd)
        has_text = text_mask.any(dim=-1)  # (B,)
        safe_mask = text_mask | ~has_text[:, None]  # (B, L) never an all-False row
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=safe_mask[:, None, None, :])  # (B, H, N, hd)
        out = out * has_text[:, None, None, None].to(out.dtype)  # (B, H, N, hd)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))  # (B, N, D)


class DiTBlock(nn.Module):
    """adaLN-Zero self-attention -> cross-attention -> adaLN-Zero MLP. Identity at init."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        D = cfg.hidden_size
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(D, cfg.num_heads, cfg.qk_norm)
        self.norm_cross = nn.LayerNorm(D, eps=1e-6)
        self.cross_attn = CrossAttention(D, cfg.text_dim, cfg.num_heads, cfg.qk_norm)
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(D, cfg.mlp_hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))

    def forward(self, x, c, text, text_mask, rope):
        # x (B, N, D), c (B, D), text (B, L, Dt), text_mask (B, L)
        shift_sa, scale_sa, gate_sa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)  # each (B, D)
        x = x + gate_sa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_sa, scale_sa), rope)  # (B, N, D)
        x = x + self.cross_attn(self.norm_cross(x), text, text_mask)  # (B, N, D)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (B, N, D)
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.linear = nn.Linear(hidden_size, out_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)  # each (B, D)
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, N, P*C)


# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden_size
        self.patch = tuple(int(p) for p in cfg.patch_size)
        self.x_embed = nn.Linear(cfg.patch_dim, D)  # == Conv3d(kernel=stride=patch) on patchified tokens
        self.t_embed = TimestepEmbedder(D)
        self.text_pool = nn.Linear(cfg.text_dim, D)
        self.blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg.depth)])
        self.final = FinalLayer(D, cfg.patch_dim)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        def _basic(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        self.apply(_basic)
        for lin in (self.t_embed.mlp[0], self.t_embed.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        zero = [self.final.adaLN_modulation[-1], self.final.linear]
        for block in self.blocks:
            zero += [block.adaLN_modulation[-1], block.cross_attn.proj]
        for lin in zero:  # adaLN-Zero: every residual branch and the output start at 0
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def condition(self, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """adaLN conditioning vector from timestep and masked-mean pooled text -> (B, D)."""
        m = text_mask.to(text.dtype).unsqueeze(-1)  # (B, L, 1)
        pooled = (text * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)  # (B, Dt)
        return self.t_embed(t) + self.text_pool(pooled)  # (B, D)

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """x (B, C, T, H, W), t (B,) in [0, 1], text (B, L, Dt), text_mask (B, L) bool -> velocity (B, C, T, H, W)."""
        B, C, T, H, W = x.shape
        if t.ndim == 0:
            t = t.expand(B)
        grid = patch_grid((T, H, W), self.patch)
        tokens = self.x_embed(patchify(x, self.patch))  # (B, N, D)
        rope = rope_cos_sin(grid_positions(grid, x.device), self.cfg.head_dim, self.cfg.rope_theta)  # 2x (N, hd/2)
        c = self.condition(t, text, text_mask)  # (B, D)
        text_mask = text_mask.bool()
        for block in self.blocks:
            if self.cfg.grad_checkpointing and self.training and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, c, text, text_mask, rope, use_reentrant=False)  # (B, N, D)
            else:
                tokens = block(tokens, c, text, text_mask, rope)  # (B, N, D)
        out = self.final(tokens, c)  # (B, N, P*C)
        return unpatchify(out, self.patch, grid)  # (B, C, T, H, W)


def count_params(cfg: DiTConfig) -> int:
    """Analytic parameter count; equals sum(p.numel() for p in DiT(cfg).parameters())."""
    D, Dt, P, M, hd = cfg.hidden_size, cfg.text_dim, cfg.patch_dim, cfg.mlp_hidden, cfg.head_dim
    lin = lambda i, o: i * o + o  # noqa: E731
    qk = 2 * hd if cfg.qk_norm else 0
    embed = lin(P, D) + lin(FREQ_EMBED_DIM, D) + lin(D, D) + lin(Dt, D)
    self_attn = lin(D, 3 * D) + lin(D, D) + qk
    cross_attn = 2 * D + lin(D, D) + lin(Dt, 2 * D) + lin(D, D) + qk  # norm_cross affine + q, kv, proj
    block = lin(D, 6 * D) + self_attn + cross_attn + lin(D, M) + lin(M, D)
    final = lin(D, 2 * D) + lin(D, P)
    return embed + cfg.depth * block + final
