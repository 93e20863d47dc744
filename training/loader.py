"""Streams training clips from WebDataset shards: decode with decord, window, resize, batch.

Ranks split the shards when there are at least as many shards as ranks, otherwise they split
the samples (index modulo world size), so no sample is seen twice across ranks in an epoch.
The order is a deterministic function of (seed, epoch, rank). Corrupt samples are skipped and
counted, never fatal. Every batch has one shape (frames x height x width from the config).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch


@dataclass
class LoaderStats:
    samples: int = 0
    skipped: int = 0
    epochs: int = 0
    skipped_keys: list[str] = field(default_factory=list)


def to_tensor(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (3, T, H, W) float in [-1, 1]."""
    x = torch.from_numpy(frames).float().div_(127.5).sub_(1.0)  # (T, H, W, 3)
    return x.permute(3, 0, 1, 2).contiguous()  # (3, T, H, W)


def clip_window(n: int, num_frames: int, rng: random.Random | None) -> list[int]:
    """Frame indices of a num_frames window (random start if rng, else the first);
    short clips repeat their last frame."""
    if n >= num_frames:
        start = rng.randrange(n - num_frames + 1) if rng is not None else 0
        return list(range(start, start + num_frames))
    return [min(i, n - 1) for i in range(num_frames)]


def decode_sample(sample: dict, num_frames: int, size: tuple[int, int],
                  rng: random.Random | None) -> tuple[torch.Tensor, str]:
    from data.video_io import probe, read_frames

    meta = sample.get("json") or {}
    n = meta["end"] - meta["start"] if "end" in meta else probe(sample["mp4"]).num_frames
    frames = read_frames(sample["mp4"], indices=clip_window(n, num_frames, rng), size=size)
    return to_tensor(frames), sample.get("txt") or ""  # (3, T, H, W)


def iter_samples(urls: list[str], rank: int, world: int, seed: int, epoch: int) -> Iterator[dict]:
    from data.shards import read_shards

    order = list(urls)
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    if len(order) >= world:
        yield from read_shards(order[rank::world])
    else:
        for i, s in enumerate(read_shards(order)):
            if i % world == rank:
                yield s


def batches(urls: list[str], *, batch_size: int, num_frames: int, size: tuple[int, int],
            rank: int, world: int, seed: int, stats: LoaderStats | None = None,
            shuffle_buffer: int = 32) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """Endless batches of (video (B, 3, T, H, W) in [-1, 1], captions)."""
    if not urls:
        raise ValueError("no training shards")
    stats = stats or LoaderStats()
    rng = random.Random(seed * 7919 + rank)
    buf: list[tuple[torch.Tensor, str]] = []
    batch: list[tuple[torch.Tensor, str]] = []
    epoch = 0
    while True:
        produced = 0
        for sample in iter_samples(urls, rank, world, seed, epoch):
            try:
                item = decode_sample(sample, num_frames, size, rng)
            except Exception:  # noqa: BLE001 - a corrupt sample is skipped, not fatal
                stats.skipped += 1
                stats.skipped_keys.append(sample.get("__key__", "?"))
                continue
            produced += 1
            stats.samples += 1
            buf.append(item)
            if len(buf) < shuffle_buffer:
                continue
            batch.append(buf.pop(rng.randrange(len(buf))))
            if len(batch) == batch_size:
                yield torch.stack([b[0] for b in batch]), [b[1] for b in batch]
                batch = []
        epoch += 1
        stats.epochs = epoch
        if produced == 0 and not buf:
            raise RuntimeError(f"rank {rank}: no decodable samples in {len(urls)} shards")
        while buf:  # end of an epoch: drain the buffer so every sample is used
            batch.append(buf.pop(rng.randrange(len(buf))))
            if len(batch) == batch_size:
                yield torch.stack([b[0] for b in batch]), [b[1] for b in batch]
                batch = []
