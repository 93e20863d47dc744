"""Analytic FLOPs of the DiT, for MFU in training logs and for cost planning.

Counting rules (the ones ``torch.utils.flop_counter.FlopCounterMode`` uses, so the two agree):
a matmul of (m, k) by (k, n) is 2*m*k*n FLOPs; attention adds its two matmuls, Q K^T and
A V, each 2 * n_q * n_k * head_dim per head. Norms, activations, RoPE, softmax and
elementwise ops are not counted (they are memory-bound and small next to the matmuls).

Per sample, for a token grid (T', H', W') after patchify, N = T'H'W' tokens, width D, text
length L (as fed, padding included) of width Dt, MLP width M, patch P = pt*ph*pw*C:

    embed       2 N P D + 2 (256 D + D D + Dt D)            patch, timestep MLP, text pool
    adaLN       2 D (m D) per block, or once (adaln=single)  (m = 6, or 9 factorised)
    per block   a * (2 N D 3D + 2 N D D)                    qkv + out proj (a = 1, or 2 factorised)
                4 N N D         (full)                      Q K^T and A V over all N tokens
                4 N (H'W') D + 4 N T' D  (factorised)       within frames + across frames
                2 N D D + 2 L Dt 2D + 2 N D D + 4 N L D     cross-attention q, kv, proj, attention
                4 N D M                                     MLP
    final       2 D 2D + 2 N D P

The text encoder is not included (a frozen encoder's cost is one forward per caption, or
nothing with the embedding cache). A training step is 3x the forward (backward = 2x
forward); activation checkpointing recomputes the forward but does not count as useful work,
so MFU is computed from ``train_flops`` either way.
"""

from __future__ import annotations

import time

from training.dit import FREQ_EMBED_DIM, DiTConfig
from training.patches import patch_grid


def _mm(m: int, k: int, n: int) -> int:
    return 2 * m * k * n


def forward_flops_breakdown(cfg: DiTConfig, grid: tuple[int, int, int], text_len: int) -> dict[str, int]:
    """Forward FLOPs per sample by part: embed, adaln, self_proj, self_attn, cross, mlp, final."""
    gt, gh, gw = (int(g) for g in grid)
    if min(gt, gh, gw) < 1 or text_len < 0:
        raise ValueError(f"grid must be positive (T', H', W'), text_len >= 0; got {grid}, {text_len}")
    N, D, Dt, P, M, L = gt * gh * gw, cfg.hidden_size, cfg.text_dim, cfg.patch_dim, cfg.mlp_hidden, int(text_len)
    factorised = cfg.attention == "factorised"
    n_self = 2 if factorised else 1
    attn_keys = gh * gw + gt if factorised else N  # keys each query attends to, summed over the attentions
    adaln = _mm(1, D, cfg.num_modulations * D)  # one modulation Linear: per block, or shared (single)
    per_block = {
        "self_proj": n_self * (_mm(N, D, 3 * D) + _mm(N, D, D)),
        "self_attn": 2 * _mm(N, D, attn_keys),  # Q K^T + A V, summed over heads (H * hd = D)
        "cross": _mm(N, D, D) + _mm(L, Dt, 2 * D) + _mm(N, D, D) + 2 * _mm(N, D, L),
        "mlp": _mm(N, D, M) + _mm(N, M, D),
    }
    out = {"embed": _mm(N, P, D) + _mm(1, FREQ_EMBED_DIM, D) + _mm(1, D, D) + _mm(1, Dt, D)}
    out["adaln"] = cfg.depth * adaln if cfg.adaln == "block" else adaln
    out.update({k: cfg.depth * v for k, v in per_block.items()})
    out["final"] = _mm(1, D, 2 * D) + _mm(N, D, P)
    return out


def forward_flops(cfg: DiTConfig, grid: tuple[int, int, int], text_len: int) -> int:
    """Forward FLOPs of the DiT for one sample with token grid (T', H', W') and text_len text tokens."""
    return sum(forward_flops_breakdown(cfg, grid, text_len).values())


def train_flops(cfg: DiTConfig, grid: tuple[int, int, int], text_len: int) -> int:
    """FLOPs of one training step per sample (forward + backward = 3x forward)."""
    return 3 * forward_flops(cfg, grid, text_len)


def token_grid(cfg: DiTConfig, shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """(T, H, W) of a clip -> its token grid (T', H', W') under cfg.patch_size."""
    return patch_grid(tuple(shape), cfg.patch_size, key="model.dit.patch_size")


def mfu(flops_per_sample: int, samples_per_s: float, peak_flops_per_s: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the hardware's peak FLOP/s."""
    if peak_flops_per_s <= 0:
        raise ValueError("peak_flops_per_s must be > 0")
    return flops_per_sample * samples_per_s / peak_flops_per_s


def sdpa_flop_mapping() -> dict:
    """Extra FlopCounterMode formulas for the CPU attention kernel, which it does not count.

    ``FlopCounterMode(custom_mapping=sdpa_flop_mapping())`` then counts CPU SDPA (the fused
    flash kernel used on CPU) with torch's own formulas for the CUDA kernels.
    """
    import torch  # lazy: torch ~2 s to import, needed only here
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten

    def fwd(query, key, value, *args, **kwargs) -> int:
        return sdpa_flop_count(query, key, value)

    def bwd(grad_out, query, key, value, *args, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out, query, key, value)

    mapping = {}
    for name, fn in (("_scaled_dot_product_flash_attention_for_cpu", fwd),
                     ("_scaled_dot_product_flash_attention_for_cpu_backward", bwd)):
        op = getattr(aten, name, None)
        if op is not None:
            mapping[op] = fn
    return mapping


def matmul_flops_per_s(n: int = 2048, seconds: float = 2.0, dtype=None, device=None) -> float:
    """Measured dense matmul rate of this machine: (n x n) @ (n x n) for `seconds`, current threads."""
    import torch  # lazy: torch ~2 s to import, needed only here

    dtype = dtype or torch.float32
    device = torch.device(device or "cpu")
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.mm(a, b)  # warm-up
    sync()
    reps, t0 = 0, time.perf_counter()
    while True:
        torch.mm(a, b)
        reps += 1
        sync()
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return reps * 2 * n**3 / elapsed


__all__ = [
    "forward_flops",
    "forward_flops_breakdown",
    "train_flops",
    "token_grid",
    "mfu",
    "sdpa_flop_mapping",
    "matmul_flops_per_s",
]
