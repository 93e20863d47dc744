"""Spacetime-patch Diffusion Transformer (DiT) for text-to-video flow matching.

Data flow (shapes for one batch):

    x (B, C, T, H, W) --patchify--> (B, N, pt*ph*pw*C) --x_embed--> tokens (B, N, D)
    t (B,) --sinusoid(1000 t)--> MLP --+
    text (B, L, Dt), text_mask (B, L) --masked mean--> Linear --+--> c (B, D)   adaLN conditioning
    positions of the (T', H', W') token grid --> 3D RoPE rotations (N, 1, hd/2) complex
    tokens --[DiTBlock x depth]--> FinalLayer --> (B, N, pt*ph*pw*C) --unpatchify--> v (B, C, T, H, W)

A DiTBlock is: adaLN-Zero self-attention, cross-attention to the text tokens (padding masked
out), adaLN-Zero MLP. Every residual branch is zero-initialised, so each block is exactly the
identity at init. The adaLN shift/scale/gate come from (``DiTConfig.adaln``):

- ``block`` (DiT): each block has its own Linear(D, m D) of c; m D^2 parameters per block.
- ``single`` (PixArt-alpha's adaLN-single, as in Wan): one shared Linear(D, m D) of c for all
  blocks, plus a learned (m, D) offset per block; ~25% fewer parameters at equal FLOPs.

Self-attention is one of (``DiTConfig.attention``):

- ``full``: one attention over all N = T'H'W' spacetime tokens (cost ~ N^2).
- ``factorised``: spatial attention among the H'W' tokens of each frame, then temporal
  attention among the T' tokens at each spatial position, each with its own adaLN-Zero gate
  (cost ~ N (H'W' + T')). Same RoPE: within a frame the temporal rotation cancels, and vice versa.

Packing (``training.patches.pack_clips`` + ``DiT.forward_packed``): several clips of different
(T, H, W) laid end to end in one sequence (or a few rows of at most ``max_tokens``), with
block-diagonal attention so that each clip's tokens attend only to their own clip and caption,
and per-clip timestep and text conditioning. Each clip's output equals its unpacked forward (up
to float rounding). Attention is varlen (``training.patches.Segments``): the tokens of equal-length segments (whole
clips; frames and (h, w) positions when factorised) are gathered into one batch per length and
attended with SDPA and no mask, so a packed row costs sum_i n_i^2, not N^2, and holds index
tensors (8 bytes per token), not an (N, N) mask. The same code runs on CUDA (where mask-free
SDPA takes the flash / memory-efficient kernels). torch's ``flex_attention`` with a
block-diagonal ``create_block_mask`` would be the other way, but on torch 2.14 it has no
backward on the CPU ("FlexAttention does not support backward on CPU").

The tensor plumbing lives beside it: patchify, unpatchify and packing in training/patches.py,
the 3D RoPE in training/rope.py. The module is pure: no distributed calls, logging or I/O.
Parallelism and precision are applied from outside (training/parallelize.py), by swapping the
parameter-free modules that mark where a parallel plan acts (as torchtitan swaps its ``sdpa``):

- ``DiT.split`` / ``DiT.merge``: where the token sequence may be split across ranks after the
  embedding and gathered again before the final unpatchify (identities here).
- ``SelfAttention.attend``: the attention core over (B, N, H, hd) q, k, v (SDPA here); sequence
  parallelism wraps it in an all-to-all from sequence shards to head shards and back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from data.checks import check_ranges
from training.patches import PackedClips, Segments, packed_segments, patch_grid, patchify, unpack, unpatchify
from training.rope import grid_positions, rope_freqs, rotate

# Size presets. Only the transformer trunk changes; everything else comes from the config.
PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=128, depth=4, num_heads=4),  # debug / CI, ~1.6M params
    "small": dict(hidden_size=384, depth=12, num_heads=6),
    "base": dict(hidden_size=768, depth=12, num_heads=12),
    "large": dict(hidden_size=1024, depth=24, num_heads=16),
    "xl": dict(hidden_size=1152, depth=28, num_heads=16),
    "3b": dict(hidden_size=2304, depth=32, num_heads=18),  # ~3.4B params (4.0B with text_dim=4096)
}
ATTENTIONS = ("full", "factorised")
ADALNS = ("block", "single")

FREQ_EMBED_DIM = 256  # width of the sinusoidal timestep features
TIMESTEP_SCALE = 1000.0  # t in [0, 1] is scaled to [0, 1000] before the sinusoid


def _check_preset(name: str) -> None:
    if name not in PRESETS:
        raise ValueError(f"unknown DiT preset {name!r}; valid presets: {', '.join(PRESETS)}")


@dataclass
class DiTConfig:
    """Config of the DiT. `preset` is a label; the size fields below are what is built.

    Use `DiTConfig.from_preset("small", depth=6)` to fill the size fields from a preset, or
    `cfg.with_preset("base")` to resize a config and keep its other options. Constructing
    `DiTConfig(preset="small")` directly keeps the (tiny) field defaults.
    """

    preset: str = "tiny"
    in_channels: Optional[int] = 3  # latent / pixel channels C; null: follow the data (trainer.follow_data)
    patch_size: list[int] = field(default_factory=lambda: [1, 4, 4])  # (pt, ph, pw)
    hidden_size: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    text_dim: int = 128  # width of the text tokens cross-attended to (= the text encoder's width)
    qk_norm: bool = True
    attention: str = "full"  # full | factorised (spatial then temporal), see the module docstring
    adaln: str = "block"  # block (a modulation Linear per block, DiT) | single (one shared, PixArt-alpha / Wan)
    grad_checkpointing: bool = False
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        _check_preset(self.preset)
        if self.attention not in ATTENTIONS:
            raise ValueError(f"unknown attention {self.attention!r} (model.dit.attention); valid: {', '.join(ATTENTIONS)}")
        if self.adaln not in ADALNS:
            raise ValueError(f"unknown adaln {self.adaln!r} (model.dit.adaln); valid: {', '.join(ADALNS)}")
        if len(self.patch_size) != 3 or any(int(p) < 1 for p in self.patch_size):
            raise ValueError(f"patch_size must be 3 positive ints (pt, ph, pw), got {self.patch_size}")
        check_ranges(self, in_channels=">= 1", hidden_size=">= 1", depth=">= 1", num_heads=">= 1",
                     mlp_ratio="> 0", text_dim=">= 1", rope_theta="> 0")
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

    def with_preset(self, name: str) -> "DiTConfig":
        """This config resized to preset `name`; every non-size option is kept."""
        _check_preset(name)
        return replace(self, preset=name, **PRESETS[name])

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        if self.in_channels is None:
            raise ValueError("model.dit.in_channels is null (follow the data): the trainer sets it from the "
                             "shards (3 for clips, the VAE's latent channels for latents); set it to build alone")
        pt, ph, pw = self.patch_size
        return pt * ph * pw * self.in_channels

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def num_modulations(self) -> int:
        """adaLN outputs per block: (shift, scale, gate) per residual branch with a gate."""
        return 9 if self.attention == "factorised" else 6

    def build(self) -> "DiT":
        return DiT(self)


# --------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------


class Layout(NamedTuple):
    """Where every token sits and whom it may attend to; made once per forward, shared by all blocks.

    Unpacked (one clip per batch row): `grid` is set, masks are None, conditioning is per row.
    Packed: `grid` is None, the "masks" are `Segments` (varlen attention) that keep attention
    inside a clip (and a frame / a spatial position when factorised), `clips` the whole-clip
    segments that cross-attend to their own caption, `token_clip` maps tokens to their clip's
    conditioning.
    """

    rope: torch.Tensor  # complex rotations (rope_freqs) broadcastable to (B, N, H, hd/2)
    grid: Optional[tuple[int, int, int]] = None  # (T', H', W') when unpacked
    rope_spatial: Optional[torch.Tensor] = None  # (H'W', 1, hd/2): factorised, unpacked
    rope_temporal: Optional[torch.Tensor] = None  # (T', 1, hd/2): factorised, unpacked
    mask: Optional[torch.Tensor | Segments] = None  # clips (packed); (1, 1, 1, N) real keys (split)
    mask_spatial: Optional[Segments] = None  # frames of clips (packed, factorised)
    mask_temporal: Optional[torch.Tensor | Segments] = None  # (h, w) positions of clips (packed,
    # factorised); (1, 1, 1, T') real frames (split, factorised)
    clips: Optional[Segments] = None  # whole clips, for cross-attention to their captions (packed)
    token_clip: Optional[torch.Tensor] = None  # (R, N) long: clip of each token (packed; padding -> 0)


def per_token(mod: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Per-sample (B, k*D) or per-clip (K, k*D) modulation -> broadcastable to tokens."""
    if layout.token_clip is None:
        return mod.unsqueeze(1)  # (B, 1, k*D)
    return mod[layout.token_clip]  # (R, N, k*D)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift  # (B, N, D); shift/scale (B, 1, D) or (B, N, D)


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


def norm_fp32(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """QK-RMSNorm (or identity) computed in float32 whatever the weight / autocast dtype."""
    if isinstance(norm, nn.RMSNorm):
        return F.rms_norm(x.float(), norm.normalized_shape, norm.weight.float(), norm.eps)  # (..., hd)
    return x.float()


def scatter_segments(outs: list[torch.Tensor], segments: Segments, total: int) -> torch.Tensor:
    """Per-group outputs (G*n, ...) back to their tokens -> (total, ...); tokens in no segment
    (padding) get 0."""
    index = torch.cat([i.reshape(-1) for i in segments.index])  # (M,)
    src = torch.cat(outs)  # (M, ...)
    return src.new_zeros(total, *src.shape[1:]).index_copy(0, index, src)  # (total, ...)


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments) -> torch.Tensor:
    """Varlen attention: q, k, v (R, N, H, hd) -> (R, N, H, hd), each token attending only to
    the tokens of its segment; one mask-free SDPA per group of equal-length segments."""
    R, N, H, hd = q.shape
    flat = [x.reshape(R * N, H, hd) for x in (q, k, v)]  # each (R*N, H, hd)
    outs = []
    for idx in segments.index:  # (G, n)
        qg, kg, vg = (x[idx].transpose(1, 2) for x in flat)  # each (G, H, n, hd)
        out = F.scaled_dot_product_attention(qg, kg, vg)  # (G, H, n, hd)
        outs.append(out.transpose(1, 2).reshape(-1, H, hd))  # (G*n, H, hd)
    return scatter_segments(outs, segments, R * N).reshape(R, N, H, hd)  # (R, N, H, hd)


class Attend(nn.Module):
    """The attention core: q, k, v (B, N, H, hd), and a mask broadcastable to (B, H, N, N) bool,
    None, or the `Segments` of packed rows (varlen) -> (B, N, H, hd). Flash / memory-efficient
    SDPA kernels on GPU when the mask allows (always for segments: they need none)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: Optional[torch.Tensor | Segments] = None) -> torch.Tensor:
        if isinstance(mask, Segments):
            return segment_attention(q, k, v, mask)  # (B, N, H, hd)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask)  # (B, H, N, hd)
        return out.transpose(1, 2)  # (B, N, H, hd)


class TokenSplit(nn.Module):
    """Where the token sequence may be split across ranks: (patches (B, N, P*C), layout) -> the
    same here; sequence parallelism swaps in a split of both (training/parallelize.py)."""

    def forward(self, tokens: torch.Tensor, layout: "Layout") -> tuple[torch.Tensor, "Layout"]:
        return tokens, layout


class TokenMerge(nn.Module):
    """The inverse of TokenSplit: this rank's outputs (B, N_local, P*C) -> all N tokens (B, N, P*C)."""

    def forward(self, out: torch.Tensor, num_tokens: int) -> torch.Tensor:
        return out


class SelfAttention(nn.Module):
    """Attention among the tokens of each row of x, with 3D RoPE, optional QK-RMSNorm and mask."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.attend = Attend()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: torch.Tensor,
                mask: Optional[torch.Tensor | Segments] = None) -> torch.Tensor:
        # x (B, N, D); rope complex, broadcastable to (B, N, H, hd/2); mask: see Attend
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads)  # (B, N, 3, H, hd)
        q, k, v = qkv.unbind(2)  # each (B, N, H, hd)
        q = rotate(norm_fp32(self.q_norm, q), rope).to(v.dtype)  # (B, N, H, hd)
        k = rotate(norm_fp32(self.k_norm, k), rope).to(v.dtype)  # (B, N, H, hd)
        out = self.attend(q, k, v, mask)  # (B, N, H, hd)
        return self.proj(out.reshape(B, N, D))  # (B, N, D)


def text_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
    """q (B, n, H, hd) attends to k, v (B, L, H, hd) where text_mask (B, L) -> (B, n, H, hd); a
    row with no text token gets 0 (instead of NaN)."""
    has_text = text_mask.any(dim=-1)[:, None, None, None]  # (B, 1, 1, 1)
    safe_mask = (text_mask | ~text_mask.any(dim=-1, keepdim=True))[:, None, None, :]  # (B, 1, 1, L) never all False
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=safe_mask)  # (B, H, n, hd)
    return (out * has_text.to(out.dtype)).transpose(1, 2)  # (B, n, H, hd)


class CrossAttention(nn.Module):
    """Video tokens attend to text tokens; padded text tokens are masked out.

    Unpacked: text (B, L, Dt), text_mask (B, L), every token of a row sees its caption. Packed
    (`clips`, the whole-clip segments): text (K, L, Dt), text_mask (K, L) per clip, each clip's
    tokens see only its own caption (one attention per group of equal-size clips). A token that
    sees no text token gets a zero cross-attention output (instead of NaN).
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

    def forward(self, x: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                clips: Optional[Segments] = None) -> torch.Tensor:
        B, N, D = x.shape
        Bt, L, _ = text.shape  # Bt = B, or K clips when packed
        H, hd = self.num_heads, D // self.num_heads
        q = self.q(x).reshape(B, N, H, hd)  # (B, N, H, hd)
        k, v = self.kv(text).reshape(Bt, L, 2, H, hd).unbind(2)  # each (Bt, L, H, hd)
        q = norm_fp32(self.q_norm, q).to(v.dtype)  # (B, N, H, hd)
        k = norm_fp32(self.k_norm, k).to(v.dtype)  # (Bt, L, H, hd)
        if clips is None:
            out = text_attention(q, k, v, text_mask)  # (B, N, H, hd)
        else:
            qf = q.reshape(B * N, H, hd)  # (R*N, H, hd)
            outs = [text_attention(qf[idx], k[c], v[c], text_mask[c]).reshape(-1, H, hd)  # (G*n, H, hd)
                    for idx, c in zip(clips.index, clips.clip)]
            out = scatter_segments(outs, clips, B * N).reshape(B, N, H, hd)  # (R, N, H, hd)
        return self.proj(out.reshape(B, N, D))  # (B, N, D)


class DiTBlock(nn.Module):
    """adaLN-Zero self-attention (full, or spatial then temporal) -> cross-attention -> adaLN-Zero MLP.

    Identity at init (the adaLN gates and the cross-attention output projection start at 0).
    """

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        D = cfg.hidden_size
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(D, cfg.num_heads, cfg.qk_norm)  # full, or spatial when factorised
        if cfg.attention == "factorised":
            self.norm_temporal = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
            self.temporal_attn = SelfAttention(D, cfg.num_heads, cfg.qk_norm)
        else:
            self.temporal_attn = None
        self.norm_cross = nn.LayerNorm(D, eps=1e-6)
        self.cross_attn = CrossAttention(D, cfg.text_dim, cfg.num_heads, cfg.qk_norm)
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(D, cfg.mlp_hidden)
        self.num_modulations = cfg.num_modulations
        if cfg.adaln == "block":
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, cfg.num_modulations * D))
        else:  # the shared DiT.adaLN_single output arrives as c; this block adds its own offsets
            self.adaLN_modulation = None
            self.modulation_table = nn.Parameter(torch.zeros(cfg.num_modulations * D))

    def modulation(self, c: torch.Tensor) -> torch.Tensor:
        """c (B, D) (block), or the shared modulation (B, m*D) (single) -> this block's (B, m*D)."""
        if self.adaLN_modulation is not None:
            return self.adaLN_modulation(c)  # (B, m*D)
        return c + self.modulation_table  # (B, m*D)

    def spatial(self, h: torch.Tensor, layout: Layout) -> torch.Tensor:
        """Attention within each frame: (B, N, D) -> (B, N, D)."""
        if layout.grid is None:
            return self.attn(h, layout.rope, layout.mask_spatial)  # (R, N, D)
        B, N, D = h.shape
        gt, gh, gw = layout.grid
        out = self.attn(h.reshape(B * gt, gh * gw, D), layout.rope_spatial)  # (B*T', H'W', D)
        return out.reshape(B, N, D)  # (B, N, D)

    def temporal(self, h: torch.Tensor, layout: Layout) -> torch.Tensor:
        """Attention across frames at each spatial position: (B, N, D) -> (B, N, D)."""
        if layout.grid is None:
            return self.temporal_attn(h, layout.rope, layout.mask_temporal)  # (R, N, D)
        B, N, D = h.shape
        gt, gh, gw = layout.grid
        h = h.reshape(B, gt, gh * gw, D).transpose(1, 2).reshape(B * gh * gw, gt, D)  # (B*H'W', T', D)
        out = self.temporal_attn(h, layout.rope_temporal, layout.mask_temporal)  # (B*H'W', T', D)
        return out.reshape(B, gh * gw, gt, D).transpose(1, 2).reshape(B, N, D)  # (B, N, D)

    def forward(self, x, c, text, text_mask, layout: Layout):
        # x (B, N, D), c (B, D) or per clip (K, D) [(.., m*D) with adaln=single], text (B, L, Dt)
        # and text_mask (B, L), or per clip (K, L, Dt), (K, L) when packed
        mod = per_token(self.modulation(c), layout).chunk(self.num_modulations, dim=-1)  # each (B, 1 or N, D)
        if self.temporal_attn is None:
            shift_sa, scale_sa, gate_sa, shift_mlp, scale_mlp, gate_mlp = mod
            x = x + gate_sa * self.attn(modulate(self.norm1(x), shift_sa, scale_sa), layout.rope, layout.mask)  # (B, N, D)
        else:
            shift_s, scale_s, gate_s, shift_t, scale_t, gate_t, shift_mlp, scale_mlp, gate_mlp = mod
            x = x + gate_s * self.spatial(modulate(self.norm1(x), shift_s, scale_s), layout)  # (B, N, D)
            x = x + gate_t * self.temporal(modulate(self.norm_temporal(x), shift_t, scale_t), layout)  # (B, N, D)
        x = x + self.cross_attn(self.norm_cross(x), text, text_mask, layout.clips)  # (B, N, D)
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (B, N, D)
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.linear = nn.Linear(hidden_size, out_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor, layout: Layout) -> torch.Tensor:
        shift, scale = per_token(self.adaLN_modulation(c), layout).chunk(2, dim=-1)  # each (B, 1 or N, D)
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
        if cfg.adaln == "single":
            self.adaLN_single = nn.Sequential(nn.SiLU(), nn.Linear(D, cfg.num_modulations * D))
        self.blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg.depth)])
        self.final = FinalLayer(D, cfg.patch_dim)
        self.split, self.merge = TokenSplit(), TokenMerge()  # identities unless sequence-parallel
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
        if self.cfg.adaln == "single":  # the per-block tables start at zero too
            zero.append(self.adaLN_single[-1])
        for block in self.blocks:
            zero += [block.cross_attn.proj] + ([block.adaLN_modulation[-1]] if block.adaLN_modulation is not None else [])
        for lin in zero:  # adaLN-Zero: every residual branch and the output start at 0
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def condition(self, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """adaLN conditioning vector from timestep and masked-mean pooled text -> (B, D)."""
        m = text_mask.to(text.dtype).unsqueeze(-1)  # (B, L, 1)
        pooled = (text * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)  # (B, Dt)
        return self.t_embed(t) + self.text_pool(pooled)  # (B, D)

    def grid_layout(self, grid: tuple[int, int, int], device=None) -> Layout:
        """Layout of a batch of clips that all have the token grid (T', H', W')."""
        hd, theta = self.cfg.head_dim, self.cfg.rope_theta
        gt, gh, gw = grid
        rope = rope_freqs(grid_positions(grid, device), hd, theta)  # (N, 1, hd/2)
        if self.cfg.attention == "full":
            return Layout(rope=rope, grid=grid)
        return Layout(
            rope=rope,
            grid=grid,
            rope_spatial=rope_freqs(grid_positions((1, gh, gw), device), hd, theta),  # (H'W', 1, hd/2)
            rope_temporal=rope_freqs(grid_positions((gt, 1, 1), device), hd, theta),  # (T', 1, hd/2)
        )

    def packed_layout(self, packed: PackedClips) -> Layout:
        """Block-diagonal layout of packed clips: attention never crosses a clip boundary."""
        rope = rope_freqs(packed.positions, self.cfg.head_dim, self.cfg.rope_theta)  # (R, N, 1, hd/2)
        clips = packed_segments(packed, "clip")
        layout = dict(rope=rope, token_clip=packed.clip.clamp(min=0), clips=clips)  # (R, N)
        if self.cfg.attention == "full":
            layout["mask"] = clips
        else:
            layout["mask_spatial"] = packed_segments(packed, "frame")
            layout["mask_temporal"] = packed_segments(packed, "position")
        return Layout(**layout)

    def trunk(self, tokens, c, text, text_mask, layout: Layout) -> torch.Tensor:
        """DiT blocks and the final layer: tokens (B, N, D), c (B, D) -> (B, N, P*C)."""
        c_blocks = self.adaLN_single(c) if self.cfg.adaln == "single" else c  # (B, m*D) or (B, D)
        for block in self.blocks:
            if self.cfg.grad_checkpointing and self.training and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, c_blocks, text, text_mask, layout, use_reentrant=False)  # (B, N, D)
            else:
                tokens = block(tokens, c_blocks, text, text_mask, layout)  # (B, N, D)
        return self.final(tokens, c, layout)  # (B, N, P*C)

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """x (B, C, T, H, W), t (B,) in [0, 1], text (B, L, Dt), text_mask (B, L) bool -> velocity (B, C, T, H, W)."""
        B, C, T, H, W = x.shape
        if t.ndim == 0:
            t = t.expand(B)
        grid = patch_grid((T, H, W), self.patch, key="model.dit.patch_size")  # (T', H', W')
        text_mask = text_mask.bool()
        patches = patchify(x, self.patch)  # (B, N, P*C)
        n = patches.shape[1]
        patches, layout = self.split(patches, self.grid_layout(grid, x.device))  # (B, N_local, P*C)
        c = self.condition(t, text, text_mask)  # (B, D)
        out = self.trunk(self.x_embed(patches), c, text, text_mask, layout)  # (B, N_local, P*C)
        return unpatchify(self.merge(out, n), self.patch, grid)  # (B, C, T, H, W)

    def forward_packed(self, packed: PackedClips, t: torch.Tensor, text: torch.Tensor,
                       text_mask: torch.Tensor) -> list[torch.Tensor]:
        """K packed clips, t (K,), text (K, L, Dt), text_mask (K, L) -> K velocities (C, T_i, H_i, W_i).

        Clip k's output equals forward(clip_k[None], t[k:k+1], text[k:k+1], text_mask[k:k+1]).
        """
        K = packed.num_clips
        if t.ndim == 0:
            t = t.expand(K)
        if t.shape[0] != K or text.shape[0] != K or text_mask.shape[0] != K:
            raise ValueError(f"{K} packed clips need K timesteps and captions; got t {tuple(t.shape)}, text {tuple(text.shape)}")
        text_mask = text_mask.bool()
        patches, layout = self.split(packed.tokens, self.packed_layout(packed))  # (R, N_local, P*C)
        c = self.condition(t, text, text_mask)  # (K, D)
        out = self.trunk(self.x_embed(patches), c, text, text_mask, layout)  # (R, N_local, P*C)
        out = self.merge(out, packed.tokens.shape[1])  # (R, N, P*C)
        return unpack(out, packed)


def count_params(cfg: DiTConfig) -> int:
    """Analytic parameter count; equals sum(p.numel() for p in DiT(cfg).parameters())."""
    D, Dt, P, M, hd = cfg.hidden_size, cfg.text_dim, cfg.patch_dim, cfg.mlp_hidden, cfg.head_dim
    lin = lambda i, o: i * o + o  # noqa: E731
    qk = 2 * hd if cfg.qk_norm else 0
    embed = lin(P, D) + lin(FREQ_EMBED_DIM, D) + lin(D, D) + lin(Dt, D)
    self_attn = lin(D, 3 * D) + lin(D, D) + qk
    n_self = 2 if cfg.attention == "factorised" else 1  # spatial + temporal
    cross_attn = 2 * D + lin(D, D) + lin(Dt, 2 * D) + lin(D, D) + qk  # norm_cross affine + q, kv, proj
    mD = cfg.num_modulations * D
    modulation = lin(D, mD) if cfg.adaln == "block" else mD  # per block: a Linear, or an offset table
    shared = lin(D, mD) if cfg.adaln == "single" else 0  # adaLN-single's shared Linear
    block = modulation + n_self * self_attn + cross_attn + lin(D, M) + lin(M, D)
    final = lin(D, 2 * D) + lin(D, P)
    return embed + shared + cfg.depth * block + final
