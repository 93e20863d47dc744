"""3D rotary position embedding (RoPE) for spacetime tokens, as the DiT's attention uses it.

The head dim splits into (t, h, w) parts (``rope_dims``); each part rotates by its own axis'
integer coordinate. Angles are computed on the fly from positions (``grid_positions`` of a
(T', H', W') token grid, or any per-token positions for packed clips), so any T x H x W works.

    positions (..., N, 3) --rope_freqs--> unit complex rotations (..., N, 1, hd/2)
    q or k (B, N, H, hd) --rotate(., freqs)--> (B, N, H, hd) float32
"""

from __future__ import annotations

import torch


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


def rope_freqs(positions: torch.Tensor, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Unit complex rotations for positions (..., N, 3) -> (..., N, 1, hd/2) complex64.

    Shaped to broadcast over the heads of q/k laid out as (B, N, H, hd), as the DiT uses them.
    """
    cos, sin = rope_cos_sin(positions, head_dim, theta)  # (..., N, hd/2)
    return torch.complex(cos, sin).unsqueeze(-2)  # (..., N, 1, hd/2)


def rotate(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x (..., hd) by complex freqs broadcastable to (..., hd/2).

    One complex multiply in float32 (fewer passes over memory than cos/sin arithmetic);
    returns float32, the caller casts.
    """
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())  # (..., hd/2) complex
    return torch.view_as_real(xc * freqs).flatten(-2)  # (..., hd) float32


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x (..., N, hd) by angles cos/sin broadcastable to (..., N, hd/2)."""
    return rotate(x, torch.complex(cos, sin)).type_as(x)  # (..., N, hd)
