"""Numeric precision of the forward pass, chosen by config (``train.precision``).

    fp32: everything in float32 (autocast off, even inside an enclosing autocast).
    bf16: weights, optimizer state and gradients stay float32; matmuls, attention and
          the MLP run in bfloat16 under ``torch.autocast`` (CPU and CUDA alike). The DiT keeps
          the parts that need range in float32 itself: timestep sinusoids, RoPE angles and
          rotation, the loss (``flow_loss`` casts to float32).

Use it around the forward and the loss, not the backward or the optimizer step:

    with autocast_context(cfg.precision, device):
        loss, _, _ = flow_loss(model_fn, x0, flow_cfg, generator=gen)
    loss.backward()

(DeepSpeed's own ``bf16`` mode instead stores the weights in bfloat16; that is the trainer's
choice through the DeepSpeed config.)
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "bf16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    return precision


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype matmuls run in for `precision`."""
    return _DTYPES[check_precision(precision)]


def autocast_context(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """A context manager running the forward pass in `precision` on `device` (cpu or cuda)."""
    check_precision(precision)
    device_type = torch.device(device).type
    if precision == "fp32":  # explicit: also switches off an enclosing autocast
        return torch.autocast(device_type=device_type, enabled=False)
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
