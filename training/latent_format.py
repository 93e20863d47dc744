"""The latent shard's sample format: what `training.latent.precompute` writes and the loader
and trainer read back, per clip ``<key>.latent.npy`` (the normalised latent, float32 or
float16) and, with a frozen text encoder, ``<key>.text.npy`` (the caption's tokens (n, D)).
Plain numpy files, loaded with ``allow_pickle=False`` (no code runs on load). Here, below both
the training loop and the latent package, so neither imports the other for it.
"""

from __future__ import annotations

import io
from typing import Optional

import numpy as np
import torch

LATENT = "latent.npy"
TEXT = "text.npy"
STORE = {"fp32": np.float32, "fp16": np.float16}


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def npy_load(b: bytes) -> np.ndarray:
    return np.load(io.BytesIO(b), allow_pickle=False)


def decode_latent_sample(sample: dict) -> tuple[torch.Tensor, str, str]:
    """One latent-shard sample (from `data.shards.read_shards`) -> (latent (C, t, h, w) float32,
    caption, key)."""
    raw = sample.get(LATENT)
    if raw is None:
        raise KeyError(f"sample {sample.get('__key__')!r} has no .{LATENT}: not a latent shard")
    z = torch.from_numpy(npy_load(raw).astype(np.float32, copy=False))  # (C, t, h, w)
    if z.ndim != 4:
        raise ValueError(f"latent of {sample.get('__key__')!r} has shape {tuple(z.shape)}, expected (C, t, h, w)")
    return z, sample.get("txt") or "", sample.get("__key__", "?")


def latent_text(sample: dict) -> Optional[torch.Tensor]:
    """The stored caption tokens (n, D) float32 of a latent sample, or None."""
    raw = sample.get(TEXT)
    return None if raw is None else torch.from_numpy(npy_load(raw).astype(np.float32, copy=False))


def stored_text(tokens: Optional[list[torch.Tensor]], dropped: list[bool], record: dict
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's text from the shards: the stored tokens of each caption, or the empty
    caption's (``record["null"]``) where caption dropout dropped it.

    tokens: per sample (n_i, D); record: ``latent_space.json``'s ``text`` entry. Returns text
    (B, L, D) float32 zero-padded to the encoder's max_length, mask (B, L): what
    ``training.text.encode_captions`` returns for the same captions."""
    if tokens is None:
        raise ValueError("the latent shards' record has caption tokens but this batch's samples have no .text.npy")
    null = torch.tensor(record["null"], dtype=torch.float32)  # (n0, D)
    L, D = int(record["max_length"]), int(record["dim"])
    text = torch.zeros(len(tokens), L, D)  # (B, L, D)
    mask = torch.zeros(len(tokens), L, dtype=torch.bool)  # (B, L)
    for i, (emb, drop) in enumerate(zip(tokens, dropped)):
        emb = null if drop else emb  # (n, D)
        if emb is None:
            raise ValueError("a latent sample has no stored caption tokens (.text.npy) while its batch has")
        if emb.ndim != 2 or emb.shape[1] != D or not 1 <= emb.shape[0] <= L:
            raise ValueError(f"stored caption tokens of shape {tuple(emb.shape)} do not fit the text "
                             f"encoder's (<= {L}, {D}): the latent shards were made for another encoder")
        text[i, : emb.shape[0]] = emb
        mask[i, : emb.shape[0]] = True
    return text, mask
