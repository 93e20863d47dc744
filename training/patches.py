"""Spacetime patches: the tensor plumbing between clips and the DiT's token sequences.

    x (B, C, T, H, W) --patchify--> tokens (B, N, pt*ph*pw*C), N = T'H'W' in (t, h, w) raster order
    tokens (B, N, pt*ph*pw*C) --unpatchify--> x (B, C, T, H, W)   (exact inverse)
    K clips (C, T_i, H_i, W_i) --pack_clips--> PackedClips: R rows of N tokens --unpack--> K clips
    PackedClips --packed_segments--> Segments: which tokens attend to which (varlen attention)

`check_patchable` is the one check that a (T, H, W) shape cuts into (pt, ph, pw) patches: the
DiT, the CLI's preflight and the trainer all raise its error, naming the config key to change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import torch

from training.rope import grid_positions


def check_patchable(shape, patch, what: str = "clip size", key: str = "patch") -> None:
    """Raise ValueError unless each of `shape` (T, H, W) is a multiple of `patch` (pt, ph, pw).

    `what` names the shape ("train shape", "the grid of latents") and `key` where the patch
    comes from ("model.dit.patch_size"), so the error says what to change.
    """
    shape, patch = tuple(int(s) for s in shape), [int(p) for p in patch]
    if any(s % p for s, p in zip(shape, patch)):
        raise ValueError(f"{what} {shape} is not divisible by {key} {patch} "
                         f"(T, H, W must be multiples of (pt, ph, pw))")


def patch_grid(shape: tuple[int, int, int], patch, what: str = "clip size", key: str = "patch") -> tuple[int, int, int]:
    """Token grid (T', H', W') for a clip of (T, H, W) frames/pixels; raises `check_patchable`'s error."""
    check_patchable(shape, patch, what, key)
    return tuple(int(s) // int(p) for s, p in zip(shape, patch))  # type: ignore[return-value]


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


@dataclass
class PackedClips:
    """K clips of different (T, H, W), patchified and laid end to end in R rows of N tokens.

    Made by `pack_clips`; consumed by `DiT.forward_packed` and `unpack`.
    """

    tokens: torch.Tensor  # (R, N, P*C) patchified clips, zero padding at the end of each row
    positions: torch.Tensor  # (R, N, 3) float (t, h, w) of each token inside its own clip
    clip: torch.Tensor  # (R, N) long: index of the token's clip, -1 for padding
    row_clips: torch.Tensor  # (R, Kmax) long: the clips in each row, -1 padded
    grids: list[tuple[int, int, int]]  # (T', H', W') per clip
    rows: list[int]  # row of each clip
    offsets: list[int]  # first token of each clip in its row
    patch: tuple[int, int, int]

    @property
    def num_clips(self) -> int:
        return len(self.grids)


def pack_clips(videos: Sequence[torch.Tensor], patch, max_tokens: Optional[int] = None) -> PackedClips:
    """Pack clips (C, T_i, H_i, W_i) into rows; first fit in the given order.

    max_tokens None: one row holding every clip. Otherwise each row holds at most max_tokens
    tokens and a clip never spans two rows. Rows are zero padded to the longest row.
    """
    if not videos:
        raise ValueError("pack_clips needs at least one clip")
    patch = tuple(int(p) for p in patch)
    channels = {v.shape[0] for v in videos}
    if len(channels) != 1 or any(v.ndim != 4 for v in videos):
        raise ValueError(f"clips must be (C, T, H, W) with one C, got {[tuple(v.shape) for v in videos]}")
    grids = [patch_grid(tuple(v.shape[1:]), patch) for v in videos]
    sizes = [math.prod(g) for g in grids]
    fill: list[int] = []  # tokens used per row
    rows, offsets = [], []
    for k, n in enumerate(sizes):
        if max_tokens is not None and n > max_tokens:
            raise ValueError(f"clip {k} has {n} tokens (grid {grids[k]}) > max_tokens {max_tokens}")
        r = next((i for i, used in enumerate(fill) if max_tokens is None or used + n <= max_tokens), len(fill))
        if r == len(fill):
            fill.append(0)
        rows.append(r)
        offsets.append(fill[r])
        fill[r] += n
    R, N = len(fill), max(fill)
    ref = videos[0]
    tokens = ref.new_zeros(R, N, math.prod(patch) * ref.shape[0])  # (R, N, P*C)
    positions = torch.zeros(R, N, 3, device=ref.device)  # (R, N, 3)
    clip = torch.full((R, N), -1, dtype=torch.long, device=ref.device)  # (R, N)
    per_row: list[list[int]] = [[] for _ in range(R)]
    for k, (v, g, r, o, n) in enumerate(zip(videos, grids, rows, offsets, sizes)):
        tokens[r, o : o + n] = patchify(v.unsqueeze(0), patch)[0]  # (n, P*C)
        positions[r, o : o + n] = grid_positions(g, ref.device)  # (n, 3)
        clip[r, o : o + n] = k
        per_row[r].append(k)
    kmax = max(len(p) for p in per_row)
    row_clips = torch.tensor([p + [-1] * (kmax - len(p)) for p in per_row], dtype=torch.long, device=ref.device)  # (R, Kmax)
    return PackedClips(tokens, positions, clip, row_clips, grids, rows, offsets, patch)


def unpack(tokens: torch.Tensor, packed: PackedClips) -> list[torch.Tensor]:
    """(R, N, P*C) packed tokens -> list of K clips (C, T_i, H_i, W_i)."""
    out = []
    for g, r, o in zip(packed.grids, packed.rows, packed.offsets):
        n = math.prod(g)
        out.append(unpatchify(tokens[r : r + 1, o : o + n], packed.patch, g)[0])  # (C, T, H, W)
    return out


class Segments(NamedTuple):
    """Varlen attention over packed rows: segments of tokens that attend only among themselves
    (a whole clip, one frame of a clip, or one (h, w) position of a clip across its frames),
    grouped by length so that each group is one batched attention of (G, n) tokens.

    Made by `packed_segments`; consumed by the DiT's attention (training/dit.py). Holds
    indices only (8 bytes per token and grouping), never an (N, N) mask.
    """

    index: tuple[torch.Tensor, ...]  # per group (G, n) long: tokens in the flattened (R*N) rows
    clip: tuple[torch.Tensor, ...]  # per group (G,) long: the clip of each segment


SEGMENT_UNITS = ("clip", "frame", "position")


def packed_segments(packed: PackedClips, unit: str = "clip") -> Segments:
    """The attention segments of packed clips: each `unit` of each clip (clip: all its T'H'W'
    tokens; frame: the H'W' tokens of one of its frames; position: the T' tokens at one of its
    (h, w)), grouped by length. Padding tokens belong to no segment."""
    if unit not in SEGMENT_UNITS:
        raise ValueError(f"unknown segment unit {unit!r}; valid: {', '.join(SEGMENT_UNITS)}")
    N, device = packed.tokens.shape[1], packed.tokens.device
    groups: dict[int, list[tuple[torch.Tensor, int]]] = {}
    for k, ((gt, gh, gw), r, o) in enumerate(zip(packed.grids, packed.rows, packed.offsets)):
        idx = r * N + o + torch.arange(gt * gh * gw, device=device)  # (n,) raster (t, h, w)
        seg = {"clip": idx[None], "frame": idx.view(gt, gh * gw),
               "position": idx.view(gt, gh * gw).T}[unit]  # (S, n_seg)
        groups.setdefault(seg.shape[1], []).append((seg, k))
    index = tuple(torch.cat([s for s, _ in g]) for g in groups.values())  # each (G, n)
    clip = tuple(torch.cat([torch.full((s.shape[0],), k, dtype=torch.long, device=device)
                            for s, k in g]) for g in groups.values())  # each (G,)
    return Segments(index, clip)
