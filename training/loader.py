"""Streams training clips from WebDataset shards: decode with decord, window, resize, batch.

Two kinds of shards (``LoaderConfig.kind``): ``raw`` clip shards (mp4, decoded here; batches are
uint8 video (B, 3, T, H, W)) and ``latent`` shards from ``training.latents`` (a stored latent
per clip; batches are float32 latents (B, C, t, h, w), nothing to decode or normalise; when the
shards hold a frozen text encoder's caption tokens, the batch info carries them as ``text``, one
(n, D) tensor per sample). Both go through the same readers, shuffle buffer, buckets and
exact-resume state below.

Readers: every (rank, loader worker) pair is one reader, ``g = rank * W + worker`` of
``G = world * W``. Each epoch the shard list is shuffled by ``(seed, epoch)``; with at least
``G`` shards, reader ``g`` takes shards ``g::G``, otherwise every reader reads all shards and
keeps samples ``i % G == g``. Either way one epoch sees each sample exactly once, with no
duplicates across ranks.

Order: raw (undecoded) samples go through a shuffle buffer driven by an RNG seeded by
``(seed, epoch, g)``; a sample's clip window is drawn from an RNG seeded by ``(seed, epoch,
key)``, so it does not depend on order. Decoding happens only when a batch is assembled.

Buckets: every batch has one (frames, height, width) shape; samples go to the bucket of the
closest aspect ratio that their clip can fill, each bucket with its own batch size. Latent
samples were encoded at one pixel shape (their ``video_shape``) and go to the bucket of exactly
that (frames, height, width); a latent that fits no bucket is skipped and counted.

State (saved with checkpoints): per reader, the epoch, how many raw samples it has taken out
of its shuffle buffer in that epoch, and the keys waiting in partly filled buckets. Restoring
replays the buffer without decoding (except the waiting samples) up to that point, so the
batches after a restore are exactly the batches an uninterrupted run would have produced
(granularity: one batch). Corrupt samples are skipped and counted, never fatal; the batch is
filled from the next samples.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info


@dataclass
class Bucket:
    num_frames: int
    height: int
    width: int
    batch_size: int  # per rank


LOADER_KINDS = ("raw", "latent")


@dataclass
class LoaderConfig:
    kind: str = "raw"  # raw: mp4 clip shards | latent: precomputed latent shards (training.latents)
    target_fps: Optional[float] = None  # sample frames at this rate; None keeps the clip's fps
    shuffle_buffer: int = 64  # raw samples per reader
    num_workers: int = 0  # DataLoader worker processes per rank
    # Shapes to batch by; empty: one bucket of train.num_frames x height x width at the
    # micro batch size.
    buckets: list[Bucket] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind not in LOADER_KINDS:
            raise ValueError(f"unknown train.data.kind {self.kind!r}; valid: {', '.join(LOADER_KINDS)}")


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def to_tensor(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (3, T, H, W) uint8. Batches stay uint8 (4x smaller to move);
    `normalize` turns them into model inputs on the device."""
    # numpy, single-threaded: torch's parallel copy stalls when loader and trainer share cores
    return torch.from_numpy(np.ascontiguousarray(frames.transpose(3, 0, 1, 2)))  # (3, T, H, W)


def normalize(video: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 video (..., 3, T, H, W) -> dtype in [-1, 1]."""
    return video.to(dtype).div_(127.5).sub_(1.0)


def clip_window(n: int, num_frames: int, stride: int, rng: random.Random | None) -> list[int]:
    """Indices of num_frames frames `stride` apart (random start if rng, else the first).
    Short clips lower the stride, then repeat their last frame."""
    while stride > 1 and (num_frames - 1) * stride + 1 > n:
        stride -= 1
    span = (num_frames - 1) * stride + 1
    if n >= span:
        start = rng.randrange(n - span + 1) if rng is not None else 0
        return list(range(start, start + span, stride))
    return [min(i, n - 1) for i in range(num_frames)]


def resize_crop_size(h: int, w: int, size: tuple[int, int]) -> tuple[int, int]:
    """The (h', w') to resize to so that a centre crop of `size` keeps the aspect ratio."""
    th, tw = size
    scale = max(th / h, tw / w)
    return max(th, math.ceil(h * scale)), max(tw, math.ceil(w * scale))


def decode_sample(sample: dict, num_frames: int, size: tuple[int, int],
                  target_fps: float | None, rng: random.Random | None
                  ) -> tuple[torch.Tensor, str]:
    """One WebDataset sample -> ((3, T, H, W) uint8, caption)."""
    from data.video_io import probe, read_frames

    meta = sample.get("json") or {}
    if "end" in meta and "fps" in meta:
        n, fps = meta["end"] - meta["start"], float(meta["fps"])
        h, w = meta.get("height"), meta.get("width")
    else:
        p = probe(sample["mp4"])
        n, fps, h, w = p.num_frames, p.fps, p.height, p.width
    if not h or not w:
        p = probe(sample["mp4"])
        h, w = p.height, p.width
    stride = max(1, round(fps / target_fps)) if target_fps else 1
    rh, rw = resize_crop_size(h, w, size)
    frames = read_frames(sample["mp4"], indices=clip_window(n, num_frames, stride, rng),
                         size=(rh, rw))  # (T, rh, rw, 3)
    top, left = (rh - size[0]) // 2, (rw - size[1]) // 2
    frames = frames[:, top : top + size[0], left : left + size[1]]  # (T, H, W, 3)
    return to_tensor(frames), sample.get("txt") or ""


class ClipStream(IterableDataset):
    """Endless batches ``(video (B, 3, T, H, W) uint8, captions, reader_state)`` for one rank
    (kind=latent: ``(latents (B, C, t, h, w) float32, captions, reader_state)``).

    Buckets: each sample goes to the bucket of the closest aspect ratio among those whose
    frame count its clip can fill (at the target fps); a batch is emitted when its bucket holds
    the bucket's batch size, so every batch has one shape. At the end of an epoch the partly
    filled buckets are emitted as smaller batches, so no sample waits across epochs.
    """

    def __init__(self, urls: list[str], *, buckets: list[Bucket], rank: int, world: int,
                 seed: int, cfg: LoaderConfig | None = None, state: dict | None = None):
        if not urls:
            raise ValueError("no training shards")
        if not buckets:
            raise ValueError("no buckets")
        self.urls, self.buckets = list(urls), list(buckets)
        self.rank, self.world, self.seed = rank, world, seed
        self.cfg = cfg or LoaderConfig()
        self.state = dict(state or {})  # reader g -> {"epoch", "consumed", "pending"}

    def _reader(self) -> tuple[int, int]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.rank * nw + wid, self.world * nw

    def _raw(self, g: int, G: int, epoch: int) -> Iterator[dict]:
        from data.shards import read_shards

        order = list(self.urls)
        random.Random(_seed(self.seed, epoch, "shards")).shuffle(order)
        if len(order) >= G:
            yield from read_shards(order[g::G])
        else:
            for i, s in enumerate(read_shards(order)):
                if i % G == g:
                    yield s

    def _shuffled(self, g: int, G: int, epoch: int) -> Iterator[dict]:
        """Raw samples of one epoch in shuffle-buffer order (no decoding)."""
        rng = random.Random(_seed(self.seed, epoch, g))
        buf: list[dict] = []
        for s in self._raw(g, G, epoch):
            buf.append(s)
            if len(buf) >= self.cfg.shuffle_buffer:
                yield buf.pop(rng.randrange(len(buf)))
        while buf:
            yield buf.pop(rng.randrange(len(buf)))

    def assign(self, sample: dict) -> int | None:
        """The bucket of a sample, from its metadata alone (no decoding); None: no bucket fits."""
        meta = sample.get("json") or {}
        if self.cfg.kind == "latent":  # encoded at one pixel shape: the bucket of exactly that shape
            shape = list(meta.get("video_shape") or [])
            return next((i for i, b in enumerate(self.buckets)
                         if [b.num_frames, b.height, b.width] == shape), None)
        if not {"start", "end", "fps", "width", "height"} <= meta.keys():
            return 0  # no metadata: the first bucket; decode_sample probes the file
        n, fps = meta["end"] - meta["start"], float(meta["fps"])
        stride = max(1, round(fps / self.cfg.target_fps)) if self.cfg.target_fps else 1
        aspect = math.log(meta["width"] / meta["height"])
        fits = [i for i, b in enumerate(self.buckets) if (b.num_frames - 1) * stride + 1 <= n]
        if not fits:  # too short for every bucket: the one needing fewest frames
            return min(range(len(self.buckets)), key=lambda i: self.buckets[i].num_frames)
        return min(fits, key=lambda i: (abs(math.log(self.buckets[i].width
                                                     / self.buckets[i].height) - aspect),
                                        -self.buckets[i].num_frames))

    def _decode(self, s: dict, b: int | None, epoch: int):
        if b is None:
            raise ValueError(f"sample {s.get('__key__')!r} fits no bucket")
        if self.cfg.kind == "latent":
            from training.latents import decode_latent_sample, latent_text

            return (*decode_latent_sample(s), latent_text(s))  # (C, t, h, w) float32, caption, key, (n, D) or None
        bk = self.buckets[b]
        key = s.get("__key__", "?")
        v, cap = decode_sample(s, bk.num_frames, (bk.height, bk.width), self.cfg.target_fps,
                               random.Random(_seed(self.seed, epoch, key)))
        return v, cap, key  # (3, T, H, W)

    def __iter__(self):
        g, G = self._reader()
        st = self.state.get(g) or {"epoch": 0, "consumed": 0, "pending": {}}
        epoch, skip = st["epoch"], st["consumed"]
        restore = {k: int(b) for b, keys in st.get("pending", {}).items() for k in keys}
        skipped = 0
        while True:
            consumed = emitted = 0
            held: dict[int, list] = {i: [] for i in range(len(self.buckets))}

            def emit(b: int):
                items, held[b] = held[b], []
                return (torch.stack([x[0] for x in items]),  # (B, 3, T, H, W)
                        [x[1] for x in items],
                        {"reader": g, "epoch": epoch, "consumed": consumed, "skipped": skipped,
                         "keys": [x[2] for x in items],
                         "text": [x[3] for x in items] if len(items[0]) > 3 and items[0][3] is not None else None,
                         "pending": {str(i): [x[2] for x in v] for i, v in held.items() if v}})

            for s in self._shuffled(g, G, epoch):
                consumed += 1
                key = s.get("__key__", "?")
                if consumed <= skip:  # fast-forward without decoding, refilling the buckets
                    if key in restore:
                        held[restore[key]].append(self._decode(s, restore[key], epoch))
                    continue
                try:
                    b = self.assign(s)
                    held[b].append(self._decode(s, b, epoch))
                except Exception:  # noqa: BLE001 - a corrupt (or bucketless) sample is skipped and counted
                    skipped += 1
                    continue
                if len(held[b]) == self.buckets[b].batch_size:
                    emitted += 1
                    yield emit(b)
            if consumed == 0:
                raise RuntimeError(f"reader {g}: no samples in {len(self.urls)} shards")
            for b in range(len(self.buckets)):  # end of epoch: flush partial buckets
                if held[b]:
                    emitted += 1
                    yield emit(b)
            if emitted == 0 and skip == 0:  # a whole epoch and not one usable sample: never loop on
                raise RuntimeError(
                    f"reader {g}: none of its {consumed} samples decoded or fit a bucket "
                    f"(buckets (frames, height, width): "
                    f"{[(b.num_frames, b.height, b.width) for b in self.buckets]}; kind={self.cfg.kind})")
            epoch, skip, restore = epoch + 1, 0, {}


class Loader:
    """Wraps ClipStream in a DataLoader and tracks the position of every reader."""

    def __init__(self, stream: ClipStream):
        self.stream = stream
        nw = stream.cfg.num_workers
        self.dl = DataLoader(stream, batch_size=None, num_workers=nw,
                             persistent_workers=nw > 0, prefetch_factor=2 if nw else None)
        self.positions: dict[int, dict] = dict(stream.state)
        self.skipped: dict[int, int] = {}
        self.epochs = 0
        self.last: dict = {}  # the latest batch's reader state and info (keys, stored text)
        self._it = iter(self.dl)

    def __next__(self) -> tuple[torch.Tensor, list[str], list[str]]:
        video, captions, st = next(self._it)
        self.last = st
        self.positions[st["reader"]] = {k: st[k] for k in ("epoch", "consumed", "pending")}
        self.skipped[st["reader"]] = st["skipped"]
        self.epochs = max(p["epoch"] for p in self.positions.values())
        return video, captions, st["keys"]

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def state_dict(self) -> dict:
        return {"positions": {str(k): v for k, v in self.positions.items()},
                "num_workers": self.stream.cfg.num_workers}

    @staticmethod
    def restore_state(d: dict | None, num_workers: int) -> dict:
        if not d:
            return {}
        if d.get("num_workers") != num_workers:
            raise ValueError("the loader position was saved with "
                             f"{d.get('num_workers')} workers per rank, not {num_workers}")
        return {int(k): v for k, v in d["positions"].items()}
