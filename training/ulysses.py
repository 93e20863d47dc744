"""Sequence parallelism for the DiT, DeepSpeed-Ulysses style: the pieces ``parallelize`` swaps in.

A sequence-parallel (SP) group of P ranks trains one sample together. Each rank holds N/P of its
spacetime tokens through the whole trunk; around each attention that must see the whole
sequence, DeepSpeed's ``DistributedAttention`` does an all-to-all from sequence shards to head
shards ((B, N/P, H, hd) -> (B, N, H/P, hd)), runs the local attention core, and an all-to-all
back. Everything else in a block (adaLN, cross-attention to the replicated text tokens, the
MLP) is per token and runs on the local shard unchanged.

    tokens (B, N, D) --SequenceSplit--> (B, N_pad/P, D)   [rope, masks and grid sliced alike]
        --blocks (attention cores: all-to-all around SDPA)--> FinalLayer (B, N_pad/P, P*C)
        --SequenceMerge (all-gather, drop padding)--> (B, N, P*C)

Splitting, per attention kind:
- ``full``: contiguous chunks of the N tokens; N padded to a multiple of P with tokens every
  real key masks out (``Layout.mask`` (1, 1, 1, N_pad)); padded queries are dropped at the merge.
- ``factorised``: whole frames: T' padded to a multiple of P, each rank holds T'_pad/P frames,
  so spatial attention is local (no communication) and only temporal attention goes through the
  all-to-all, with padded frames masked (``Layout.mask_temporal`` (1, 1, 1, T'_pad)).
RoPE is computed for the whole grid before the split and sliced, so every token keeps its
global (t, h, w) rotation.

Gradients: every rank of the group computes the same loss on the merged output. The merge's
backward is the adjoint of an all-gather (a sum over the group, then this rank's slice), so the
gradients of the group's ranks add up to SP x the gradient of one sample's loss; DeepSpeed
averages gradients over the whole world (data x sequence parallel, which is also what it
partitions ZeRO over), which divides that factor out again: the update equals SP=1 with the same
global batch. Packed batches (``DiT.forward_packed``) are refused under SP.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn

from training.dit import DiT, Layout


def sequence_groups(sequence_parallel: int) -> tuple[dist.ProcessGroup | None, int, int]:
    """Split the world into consecutive groups of `sequence_parallel` ranks (every rank calls
    this: ``new_group`` is collective). Returns (this rank's SP group or None when the degree
    is 1, the data-parallel rank, the data-parallel world size)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    sp = int(sequence_parallel)
    if sp < 1 or world % sp:
        raise ValueError(f"cluster.sequence_parallel={sp} must divide the {world} training workers")
    if sp == 1:
        return None, rank, world
    mine = None
    for g in range(world // sp):
        group = dist.new_group(list(range(g * sp, (g + 1) * sp)))
        if g == rank // sp:
            mine = group
    return mine, rank // sp, world // sp


def _pad_rows(x: torch.Tensor, dim: int, size: int, value) -> torch.Tensor:
    """x padded along `dim` to `size` with `value` (real or complex)."""
    extra = size - x.shape[dim]
    if extra <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, torch.full(shape, value, dtype=x.dtype, device=x.device)], dim=dim)


def _chunk(x: torch.Tensor, dim: int, rank: int, per: int) -> torch.Tensor:
    return x.narrow(dim, rank * per, per)


class SequenceSplit(nn.Module):
    """Replaces ``DiT.split``: this rank's share of the tokens and the matching layout."""

    def __init__(self, group: dist.ProcessGroup, factorised: bool):
        super().__init__()
        self.group, self.factorised = group, factorised

    def forward(self, tokens: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, Layout]:
        if layout.grid is None:
            raise ValueError("packed clips (DiT.forward_packed) are not supported under sequence "
                             "parallelism: train with cluster.sequence_parallel=1")
        sp, r = dist.get_world_size(self.group), dist.get_rank(self.group)
        B, N, D = tokens.shape
        gt, gh, gw = layout.grid
        if self.factorised:  # whole frames per rank: spatial attention stays local
            t_pad = math.ceil(gt / sp) * sp
            per_t = t_pad // sp
            unit = gh * gw
            tokens = _chunk(_pad_rows(tokens, 1, t_pad * unit, 0.0), 1, r, per_t * unit)  # (B, per_t*H'W', D)
            rope_t = _chunk(_pad_rows(layout.rope_temporal, 0, t_pad, 1.0), 0, r, per_t)  # (per_t, 1, hd/2)
            rope = _chunk(_pad_rows(layout.rope, 0, t_pad * unit, 1.0), 0, r, per_t * unit)
            mask_t = None
            if t_pad > gt:
                mask_t = (torch.arange(t_pad, device=tokens.device) < gt).view(1, 1, 1, t_pad)
            return tokens, layout._replace(grid=(per_t, gh, gw), rope=rope, rope_temporal=rope_t,
                                      mask_temporal=mask_t)
        n_pad = math.ceil(N / sp) * sp
        per = n_pad // sp
        tokens = _chunk(_pad_rows(tokens, 1, n_pad, 0.0), 1, r, per)  # (B, N_pad/P, D)
        rope = _chunk(_pad_rows(layout.rope, 0, n_pad, 1.0), 0, r, per)  # (N_pad/P, 1, hd/2)
        mask = None
        if n_pad > N:
            mask = (torch.arange(n_pad, device=tokens.device) < N).view(1, 1, 1, n_pad)
        return tokens, layout._replace(rope=rope, mask=mask)


class _GatherTokens(torch.autograd.Function):
    """All-gather along the token axis; backward: the group's summed gradient, this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        sp = dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(sp)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=1)  # (B, N_pad, E)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        sp, r = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        per = grad.shape[1] // sp
        return grad.narrow(1, r * per, per).contiguous(), None


class SequenceMerge(nn.Module):
    """Replaces ``DiT.merge``: every rank gets all tokens' outputs, padding dropped."""

    def __init__(self, group: dist.ProcessGroup):
        super().__init__()
        self.group = group

    def forward(self, out: torch.Tensor, num_tokens: int) -> torch.Tensor:
        return _GatherTokens.apply(out, self.group)[:, :num_tokens]  # (B, N, P*C)


class UlyssesAttend(nn.Module):
    """Replaces an ``Attend``: DeepSpeed's all-to-all around it, (B, N/P, H, hd) in and out."""

    def __init__(self, local: nn.Module, group: dist.ProcessGroup):
        super().__init__()
        from deepspeed.sequence.layer import DistributedAttention  # lazy: deepspeed import ~1.2 s

        # scatter heads (dim 2), gather the sequence (dim 1); the batch is dim 0
        self.dist = DistributedAttention(local, group, scatter_idx=2, gather_idx=1)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
        return self.dist(q, k, v, 0, None, mask)  # batch_dim_idx=0, no DeepSpeed rotary (ours is applied)


def check_sequence_parallel(num_heads: int, sequence_parallel: int, num_workers: int) -> None:
    """Before any stage runs: the SP degree must divide the heads and the workers."""
    sp = int(sequence_parallel)
    if sp < 1:
        raise ValueError(f"cluster.sequence_parallel must be >= 1, got {sp}")
    bad = []
    if num_workers % sp:
        bad.append(f"the {num_workers} training workers (cluster.num_workers)")
    if num_heads % sp:
        bad.append(f"the {num_heads} attention heads (model.dit.num_heads)")
    if bad:
        valid = [d for d in range(1, num_heads + 1) if num_heads % d == 0 and num_workers % d == 0]
        raise ValueError(f"cluster.sequence_parallel={sp} must divide " + " and ".join(bad)
                         + f" (Ulysses splits the sequence over workers and the heads over the "
                           f"group): valid degrees here are {valid}")


def apply_sequence_parallel(dit: DiT, group: dist.ProcessGroup) -> DiT:
    """Swap the DiT's split/merge points and the attention cores that need the whole sequence
    (every full attention; the temporal one when factorised) for their sequence-parallel forms.
    The parameters are untouched, so checkpoints and exports keep their names."""
    import deepspeed  # lazy: deepspeed import ~1.2 s

    deepspeed.init_distributed(dist_backend=dist.get_backend())  # its comm layer over our group
    sp = dist.get_world_size(group)
    check_sequence_parallel(dit.cfg.num_heads, sp, dist.get_world_size())
    factorised = dit.cfg.attention == "factorised"
    dit.split, dit.merge = SequenceSplit(group, factorised), SequenceMerge(group)
    for block in dit.blocks:
        attn = block.temporal_attn if factorised else block.attn
        attn.attend = UlyssesAttend(attn.attend, group)
    return dit
