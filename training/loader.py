"""Streams training clips from WebDataset shards: decode with decord, window, resize, batch.

Two kinds of shards (``LoaderConfig.kind``): ``raw`` clip shards (mp4, decoded here; batches are
uint8 video (B, 3, T, H, W)) and ``latent`` shards from ``training.latent.precompute`` (a stored latent
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

Buckets: every batch has one (frames, height, width) shape. A raw clip goes to the largest
bucket (pixels, then frames) of the aspect ratio closest to its own that it reaches scaled up
at most ``max_upscale`` times (else it is skipped: ``too_small``) and can fill, or with that
bucket's ``prob`` falls through to the next smaller one (Open-Sora's ``bucket_config``
probabilities), so a minute-long clip gives sometimes a minute, sometimes a few seconds. Each
bucket has its own batch size, or takes it from ``token_budget`` (the DiT's spacetime tokens
per rank per micro-batch: many short clips or one long one per step, as Open-Sora-Plan and
Open-Sora batch). Latent samples go to the buckets of their encoded height and width and any
frame count ``1 + k * tc`` their stored latent holds: a ``latent.span=whole`` shard stores the
whole clip, and a window of it (its first latent frame drawn per epoch and key) is cut here
without decoding video; a latent that fits no bucket is skipped (``no_bucket``). ``Loader``
keeps the data-parallel ranks on one bucket per micro-step (``training.lockstep``).

Images: a raw shard may hold still images (``jpg``/``png``/``webp`` + ``txt``, with a ``json``
of ``"kind": "image"`` or, LAION-style, none). Each is a 1-frame clip: it goes only to the
1-frame buckets (``train.data.buckets`` entries with ``num_frames: 1``), the one of the closest
aspect ratio it covers (``max_upscale``), and is skipped as ``no_bucket`` when none is
configured (``too_small`` when it covers none); decoded with Pillow (`training.clips`), never a
video decoder, to (3, 1, H, W) uint8 like a 1-frame window of a video. Buckets, the lockstep,
packing and the saved position treat it as any other sample; a corrupt image is a counted
skip, like a corrupt mp4.

Mixing (``mix``, e.g. ``{image: 0.25, video: 0.75}``): the share of batches of each kind
(`training.clips.sample_kind`), each batch one kind. Each reader runs one pass over its shards
per kind of positive weight, each keeping only that kind, with its own epoch, shuffle position
and buckets; the kind of the reader's next batch is drawn by an RNG of (seed, reader, its batch
number), so it does not depend on timing and a restore draws the same kinds. The lockstep is
unchanged. A kind a whole epoch of a reader's shards holds no usable sample of is dropped on
that reader, with a warning (`ClipStream._mixed`).

Packing (``pack``): clips still go to a bucket (their shape), then into packs of at most
``token_budget`` tokens of any of the buckets' shapes (``training.packing.Packer``, first fit);
a batch is one pack, a list of clips, trained as one sequence with block-diagonal attention.

State (saved with checkpoints): per reader, the epoch, how many raw samples it has taken out
of its shuffle buffer in that epoch, the keys waiting in partly filled buckets (or open packs)
and its counts of skipped samples; which loader worker's batch comes next; the batches waiting
for the other ranks (``training.lockstep``). Restoring replays the buffer without decoding
(except the waiting samples and batches) up to that point, so the batches after a restore are
exactly the batches an uninterrupted run would have produced (granularity: one batch). The
DataLoader takes batches from its workers round-robin starting at worker 0, so a restore
rotates the worker -> reader mapping to make worker 0 the reader whose batch was next.

Corrupt samples are skipped and counted, never fatal; the batch is filled from the next
samples. That covers an mp4 that does not decode, a ``.json`` member that is not JSON, a
``.txt`` that is not UTF-8 and a damaged tar: truncated, or with a garbled member header, which
Python's tarfile takes for the end of the archive without an error. The rest of that shard is
lost and every lost sample is counted, from the shard's ``.rows.json`` sidecar (the samples it
holds; the shard and precompute stages write one per tar); a damaged shard without a sidecar
counts as one skip, and a garbled header there goes unseen. A missing shard file still raises:
the shard list is wrong.

Prefetch: ``Loader`` decodes ``prefetch`` batches ahead in a background thread (decord and
torch release the GIL), so decoding overlaps the training step. The saved position is always
that of the batches the trainer has taken, never of those decoded ahead.

Workers: DataLoader workers start from a forkserver (``WORKER_CONTEXT``), not by forking the
trainer. A forked child inherits native state whose threads it does not get: PyAV keeps a
thread-local swscale context with a slice-thread pool (FFmpeg 8), so after the parent has
decoded once a forked worker's first resize waits forever on threads that are not there (seen
as a hang or a segfault in the worker). The forkserver has ``training.loader`` imported already,
so a worker starts in about the time a fork takes.
"""

from __future__ import annotations

import math
import multiprocessing
import queue
import random
import threading
import warnings
from collections import Counter
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.shards import read_shards, sidecar_count
from training.clips import (_seed, as_batch, clip_geometry, decode_frames, image_member, latent_frames,
                            parse_sample, sample_kind, to_tensor)
from training.latent_format import decode_latent_sample, latent_text
from training.loader_config import LOADER_KINDS, MIX_KINDS, Bucket, LoaderConfig, resolve_batch_sizes  # noqa: F401 - also importable from here, as before the split
from training.lockstep import Lockstep, waiting_rounds
from training.packing import Packer


POSITION = ("epoch", "consumed", "pending", "skipped", "reasons")  # a reader's (or kind pass's) position

# DataLoader workers are forked from a clean single-threaded server (see the module docstring)
WORKER_CONTEXT = multiprocessing.get_context("forkserver")
WORKER_CONTEXT.set_forkserver_preload(["training.loader"])


class ClipStream(IterableDataset):
    """Endless batches ``(video (B, 3, T, H, W) uint8, captions, reader_state)`` for one rank
    (kind=latent: ``(latents (B, C, t, h, w) float32, captions, reader_state)``).

    Buckets: each sample goes to the bucket of the closest aspect ratio among those whose
    frame count its clip can fill (at the target fps); a batch is emitted when its bucket holds
    the bucket's batch size, so every batch has one shape. At the end of an epoch the partly
    filled buckets are emitted as smaller batches, so no sample waits across epochs.

    Packing (``cfg.pack``): clips still go to a bucket (their shape), then into packs of at
    most ``cfg.token_budget`` tokens (`Packer`; `tokens` counts a bucket's clip); a batch is one
    pack, ``(list of clips (3, T_i, H_i, W_i) uint8 or latents (C, t_i, h_i, w_i), captions,
    reader_state)``, its position holding the open packs' keys and buckets.
    """

    def __init__(self, urls: list[str], *, buckets: list[Bucket], rank: int, world: int,
                 seed: int, cfg: LoaderConfig | None = None, state: dict | None = None,
                 tokens: Callable[[Bucket], int] | None = None):
        if not urls:
            raise ValueError("no training shards")
        if not buckets:
            raise ValueError("no buckets")
        if any(b.batch_size < 1 for b in buckets):
            raise ValueError("a bucket has batch_size 0: resolve it from the token budget first "
                             "(resolve_batch_sizes)")
        self.urls, self.buckets = list(urls), list(buckets)
        self.rank, self.world, self.seed = rank, world, seed
        self.cfg = cfg or LoaderConfig()
        if self.cfg.pack and tokens is None:
            raise ValueError("train.data.pack needs the tokens of each bucket's clip (tokens=)")
        self.tokens = [tokens(b) for b in self.buckets] if self.cfg.pack else None
        if self.cfg.mix.get("image", 0) > 0 and not any(b.num_frames == 1 for b in self.buckets):
            raise ValueError(f"train.data.mix.image is {self.cfg.mix['image']} but no bucket has num_frames 1 "
                             "(train.data.buckets): images train only in 1-frame buckets")
        state = state or {}
        # reader g -> {"epoch", "consumed", "pending", "skipped"}
        self.state = {int(k): v for k, v in (state.get("positions") or {}).items()}
        self.next_worker = int(state.get("next_worker", 0))  # the loader worker whose batch is next
        # batches handed to the Loader and not trained on yet (training.lockstep), made again first
        self.waiting: list[dict] = list(state.get("waiting") or [])
        self.pulls = int(state.get("pulls", 0))
        self._counts: dict[str, int | None] = {}  # url -> samples its sidecar lists (None: none)

    def _reader(self) -> tuple[int, int]:
        info = get_worker_info()
        if info is None:
            return self.rank, self.world
        wid = (info.id + self.next_worker) % info.num_workers  # DataLoader worker -> reader
        return self.rank * info.num_workers + wid, self.world * info.num_workers

    def _count(self, url: str) -> int | None:
        """The samples a shard holds, from its sidecar (read once per process); None without."""
        if url not in self._counts:
            self._counts[url] = sidecar_count(url)
        return self._counts[url]

    def _raw(self, g: int, G: int, epoch: int, errors: list[int]) -> Iterator[dict]:
        """This reader's raw samples of one epoch, shard by shard. A damaged shard (truncated,
        or a garbled member header, which tarfile takes for the end of the archive) ends where
        the damage is; what it lost counts in `errors` for the readers the lost samples belong
        to: every sample its sidecar lists and it did not yield (the one cut short included),
        or once for a damaged shard without a sidecar."""
        order = list(self.urls)
        random.Random(_seed(self.seed, epoch, "shards")).shuffle(order)
        mine = len(order) >= G
        i = 0
        for j, url in enumerate(order[g::G] if mine else order):
            failed = []

            def handler(exn: Exception) -> bool:
                if isinstance(exn, FileNotFoundError):  # the shard list is wrong: not data damage
                    raise exn
                failed.append(exn)
                return True  # go on: the shard ends here

            n, got = self._count(url), 0
            # verify=False: the sidecar was read once (`_count`), the comparison is here
            for s in read_shards([url], decode_json=False, decode_text=False, handler=handler,
                                 verify=False):
                if mine or i % G == g:
                    yield s
                i += 1
                got += 1
            if n is None:  # no sidecar: a damaged shard counts once, for the reader it is
                errors[0] += int(bool(failed) and (mine or j % G == g))
            elif got > n:
                raise ValueError(f"shard {url} holds more samples than the {n} its sidecar "
                                 f"lists: the sidecar belongs to another tar")
            elif got < n:  # the lost samples had the indices i .. i + lost - 1 of this epoch
                lost = n - got
                errors[0] += lost if mine else sum(k % G == g for k in range(i, i + lost))
                i += lost

    def _shuffled(self, g: int, G: int, epoch: int, errors: list[int]) -> Iterator[dict]:
        """Raw samples of one epoch in shuffle-buffer order (no decoding)."""
        rng = random.Random(_seed(self.seed, epoch, g))
        buf: list[dict] = []
        for s in self._raw(g, G, epoch, errors):
            buf.append(s)
            if len(buf) >= self.cfg.shuffle_buffer:
                yield buf.pop(rng.randrange(len(buf)))
        while buf:
            yield buf.pop(rng.randrange(len(buf)))

    def assign(self, sample: dict, epoch: int = 0) -> int | None:
        """The bucket of a sample, from its metadata alone (no decoding); None: no bucket fits
        (`place` says why)."""
        return self.place(sample, epoch)[0]

    def place(self, sample: dict, epoch: int = 0) -> tuple[int | None, str | None]:
        """(the bucket of a sample, from its metadata alone (no decoding), None) or (None, the
        reason no bucket fits: ``too_small``, ``no_bucket``).

        Raw clips: of the buckets the clip covers scaled up at most ``max_upscale`` times, those
        whose frame count it can fill at the target fps (too short for all: the one needing
        fewest frames), of the aspect ratio closest to the clip's. Images (1-frame clips): the
        same among the 1-frame buckets only (none configured: ``no_bucket``), so a still never
        becomes a frozen video. Latents: the buckets of the encoded height and width whose frame
        count is a whole number of latent frames (``1 + k * tc``) no longer than the stored
        latent. Among those, largest first (pixels, then frames), each bucket takes the clip
        with its ``prob`` (an RNG of the seed, epoch and key, so the choice does not depend on
        order); the smallest always."""
        meta = sample.get("json") or {}
        key = sample.get("__key__", "?")
        if self.cfg.kind == "latent":
            hw = list((meta.get("video_shape") or [0, 0, 0])[1:])
            fits = [i for i, b in enumerate(self.buckets)
                    if [b.height, b.width] == hw and latent_frames(meta, b.num_frames) is not None]
            return (self._pick(fits, epoch, key), None) if fits else (None, "no_bucket")
        if image_member(sample) is not None:
            ones = [i for i, b in enumerate(self.buckets) if b.num_frames == 1]
            if not ones:
                return None, "no_bucket"
            _, _, h, w = clip_geometry(sample)  # the .json, else the image header
            sized = self._sized(ones, h, w)
            return (self._closest(sized, h, w, epoch, key), None) if sized else (None, "too_small")
        if not {"start", "end", "fps", "width", "height"} <= meta.keys():
            return 0, None  # no metadata: the first bucket; decode_sample probes the file
        # num_frames: what the mp4 holds (a variable-rate source's span is resampled)
        n, fps = meta.get("num_frames") or meta["end"] - meta["start"], float(meta["fps"])
        h, w = int(meta["height"]), int(meta["width"])
        stride = max(1, round(fps / self.cfg.target_fps)) if self.cfg.target_fps else 1
        sized = self._sized(range(len(self.buckets)), h, w)
        if not sized:
            return None, "too_small"  # too small for every bucket
        fits = [i for i in sized if (self.buckets[i].num_frames - 1) * stride + 1 <= n]
        if not fits:  # too short for every bucket: the one needing fewest frames
            return min(sized, key=lambda i: self.buckets[i].num_frames), None
        return self._closest(fits, h, w, epoch, key), None

    def _sized(self, candidates, h: int, w: int) -> list[int]:
        """The buckets of `candidates` a clip of (h, w) covers scaled up at most max_upscale."""
        return [i for i in candidates
                if max(self.buckets[i].height / h, self.buckets[i].width / w) <= self.cfg.max_upscale + 1e-9]

    def _closest(self, fits: list[int], h: int, w: int, epoch: int, key: str) -> int:
        """Of `fits`, the buckets of the aspect ratio closest to (h, w)'s, picked (`_pick`)."""
        aspect = math.log(w / h)
        gap = {i: abs(math.log(self.buckets[i].width / self.buckets[i].height) - aspect) for i in fits}
        best = min(gap.values())
        return self._pick([i for i in fits if gap[i] <= best + 1e-9], epoch, key)

    def _pick(self, fits: list[int], epoch: int, key: str) -> int:
        """Largest bucket first (pixels, then frames), each taking the clip with its `prob`;
        the last one always."""
        order = sorted(fits, key=lambda i: (-self.buckets[i].height * self.buckets[i].width,
                                            -self.buckets[i].num_frames))  # stable: config order on ties
        rng = random.Random(_seed(self.seed, epoch, key, "bucket"))
        for i in order[:-1]:
            p = self.buckets[i].prob
            if p >= 1.0 or (p > 0.0 and rng.random() < p):
                return i
        return order[-1]

    def _restore_map(self, pending: dict) -> dict[str, tuple[int, int]]:
        """A saved position's waiting samples -> {key: (bucket, pack slot)}: buckets (``{bucket:
        [key, ...]}``) or, packing, the open packs (``{slot: [[key, bucket], ...]}``)."""
        packed = any(isinstance(x, list) for v in pending.values() for x in v)
        if pending and packed != self.cfg.pack:
            raise ValueError(f"the loader position was saved with train.data.pack={packed}, not "
                             f"{self.cfg.pack}: resume with the same setting")
        if packed:
            return {k: (int(b), int(slot)) for slot, items in pending.items() for k, b in items}
        return {k: (int(b), 0) for b, keys in pending.items() for k in keys}

    def _decode(self, s: dict, b: int | None, epoch: int):
        if b is None:
            raise ValueError(f"sample {s.get('__key__')!r} fits no bucket")
        bk = self.buckets[b]
        key = s.get("__key__", "?")
        rng = random.Random(_seed(self.seed, epoch, key))
        if self.cfg.kind == "latent":
            z, cap, key = decode_latent_sample(s)  # (C, t_clip, h, w)
            t = latent_frames(s.get("json") or {}, bk.num_frames)
            if t is None:
                raise ValueError(f"latent {key!r} does not hold a window of {bk.num_frames} frames")
            if t < z.shape[1]:  # a window of the whole-clip latent, its start drawn per epoch
                first = rng.randrange(z.shape[1] - t + 1)
                z = z[:, first : first + t].contiguous()  # (C, t, h, w)
            return z, cap, key, latent_text(s)
        v, cap = decode_frames(s, bk.num_frames, (bk.height, bk.width), self.cfg.target_fps, rng)
        return v, cap, key  # (T, H, W, 3)

    def _replay(self, g: int) -> Iterator[tuple]:
        """A restore: first reader `g`'s batches that waited (``waiting``), decoded again from
        a pass over their epochs that stops at their last key; then placeholders up to the most
        any reader of this rank has, so that the DataLoader's round-robin over its workers comes
        back to the reader whose batch was next."""
        mine = [e for e in self.waiting if int(e["reader"]) == g]
        found: dict[tuple[int, str], tuple] = {}
        for epoch in sorted({int(e["epoch"]) for e in mine}):
            need = {k: int(e["bucket"]) for e in mine if int(e["epoch"]) == epoch for k in e["keys"]}
            for s in self._shuffled(g, self._reader()[1], epoch, [0]):
                if s.get("__key__") in need:
                    found[(epoch, s["__key__"])] = self._decode(parse_sample(s), need.pop(s["__key__"]), epoch)
                if not need:
                    break
            if need:
                raise RuntimeError(f"reader {g}: restoring the loader position, samples "
                                   f"{sorted(need)} of epoch {epoch} are gone from the shards")
        for e in mine:
            yield as_batch([found[(int(e["epoch"]), k)] for k in e["keys"]],
                           {"reader": g, "epoch": int(e["epoch"]), "bucket": int(e["bucket"]),
                            "replay": int(e["seq"])})
        for _ in range(waiting_rounds(self.waiting) - len(mine)):
            yield None, None, {"reader": g, "placeholder": True}

    def __iter__(self):
        g, G = self._reader()
        yield from self._replay(g)
        st = self.state.get(g) or {"epoch": 0, "consumed": 0, "pending": {}}
        yield from (self._mixed(g, G, st) if self.cfg.mix else self._epochs(g, G, st))

    def _mixed(self, g: int, G: int, st: dict) -> Iterator[tuple]:
        """Mixing (``cfg.mix``): one pass over this reader's shards per kind of positive weight
        (`_epochs` keeping that kind only, each with its own position), the kind of each batch
        drawn by an RNG of (seed, reader, its batch number). A kind a whole epoch of this
        reader's shards holds no usable batch of is dropped for this reader, with a warning
        (the rest renormalised); none left is an error. Its position: every pass's (``mix``),
        the batches drawn (``drawn``), the kinds dropped; ``epoch``, ``consumed`` and
        ``pending`` are the batch's pass's, ``skipped`` and ``reasons`` the sums."""
        weights = self.cfg.mix
        kinds = [k for k in MIX_KINDS if weights.get(k, 0) > 0]
        saved = st.get("mix") or {}
        last = {k: saved.get(k) or {"epoch": 0, "consumed": 0, "pending": {}} for k in kinds}
        # lost shard tails are seen by every pass: the first kind's counts them
        passes = {k: self._epochs(g, G, last[k], k, own_errors=k == kinds[0]) for k in kinds}
        drawn, dropped = int(st.get("drawn", 0)), list(st.get("dropped") or [])
        while True:
            live = [k for k in kinds if k not in dropped]
            if not live:
                raise RuntimeError(f"reader {g}: its shards hold no usable sample of any kind "
                                   f"train.data.mix weighs ({weights})")
            x = random.Random(_seed(self.seed, "mix", g, drawn)).random() * sum(weights[k] for k in live)
            kind = live[-1]
            for k in live[:-1]:
                if x < weights[k]:
                    kind = k
                    break
                x -= weights[k]
            try:
                video, captions, info = next(passes[kind])
            except StopIteration:
                warnings.warn(f"reader {g}: a whole epoch of its shards held no usable {kind} sample; "
                              f"train.data.mix.{kind}={weights[kind]} goes to the other kinds on this reader",
                              stacklevel=2)
                dropped.append(kind)
                continue
            drawn += 1
            last[kind] = {k: info[k] for k in POSITION}
            reasons = sum((Counter(p.get("reasons") or {}) for p in last.values()), Counter())
            yield video, captions, {
                **info, "skipped": sum(int(p.get("skipped", 0)) for p in last.values()),
                "reasons": dict(reasons), "mix": {k: dict(p) for k, p in last.items()},
                "drawn": drawn, "dropped": list(dropped)}

    def _epochs(self, g: int, G: int, st: dict, kind: str | None = None,
                own_errors: bool = True) -> Iterator[tuple]:
        """Reader `g`'s batches from position `st`, epoch after epoch. `kind`: only samples of
        that kind (`sample_kind`; the others are read and passed over), and an epoch without a
        batch ends the pass; `own_errors`: whether unreadable shard tails count in ``skipped``
        here."""
        epoch, skip = st["epoch"], st["consumed"]
        restore = self._restore_map(st.get("pending", {}))
        # Skipped samples: corrupt ones (`skipped`) + unreadable shard tails (`errors`, counted
        # while reading ahead). A restore replays the same reads up to the saved position and
        # sets the count there to the saved one. `reasons`: the skipped samples that fit no
        # bucket (too_small, no_bucket: see `assign`), counted as they come: restored as saved.
        saved_skipped: int | None = int(st.get("skipped", 0))
        reasons = dict(st.get("reasons") or {})
        skipped, errors = 0, [0]
        while True:
            consumed = emitted = 0
            held: dict[int, list] = {i: [] for i in range(len(self.buckets))}
            packer = Packer(self.cfg.token_budget, min(self.tokens)) if self.tokens else None

            def emit(b: int | None, pack: list | None = None):
                # ((B, 3, T, H, W) uint8 | (B, C, t, h, w), or a pack's list of clips, captions, info)
                if pack is not None:  # a pack: clips of any shapes, listed
                    items = [x for x, _, _ in pack]
                    batch = [to_tensor(x[0]) if isinstance(x[0], np.ndarray) else x[0] for x in items]
                    pending = packer.pending()
                else:
                    items, held[b], batch = held[b], [], None
                    pending = {str(i): [x[2] for x in v] for i, v in held.items() if v}
                return as_batch(items, {
                    "reader": g, "epoch": epoch, "consumed": consumed, "bucket": b,
                    "skipped": skipped + errors[0] * own_errors, "reasons": dict(reasons), "pending": pending}, batch)

            if saved_skipped is not None and skip == 0:
                skipped, saved_skipped = saved_skipped, None
            for s in self._shuffled(g, G, epoch, errors):
                consumed += 1
                key = s.get("__key__", "?")
                if consumed <= skip:  # fast-forward without decoding, refilling the buckets
                    if key in restore:
                        b, slot = restore[key]
                        item = self._decode(parse_sample(s), b, epoch)
                        if packer is not None:
                            packer.put(slot, item, b, self.tokens[b])
                        else:
                            held[b].append(item)
                    if consumed == skip:
                        skipped, saved_skipped = saved_skipped - errors[0] * own_errors, None
                    continue
                if kind is not None and sample_kind(s) != kind:
                    continue
                try:
                    s = parse_sample(s)
                    b, unfit = self.place(s, epoch)
                    if b is None:
                        reasons[unfit] = reasons.get(unfit, 0) + 1
                        raise ValueError(f"sample {key!r} fits no bucket ({unfit})")
                    item = self._decode(s, b, epoch)
                except Exception:  # noqa: BLE001 - a corrupt (or bucketless) sample is skipped and counted
                    skipped += 1
                    continue
                if packer is not None:
                    pack = packer.add(item, b, self.tokens[b])
                    if pack is not None:
                        emitted += 1
                        yield emit(None, pack)
                    continue
                held[b].append(item)
                if len(held[b]) == self.buckets[b].batch_size:
                    emitted += 1
                    yield emit(b)
            if consumed == 0 and errors[0] == 0:
                raise RuntimeError(f"reader {g}: no samples in {len(self.urls)} shards")
            for b in range(len(self.buckets)):  # end of epoch: flush partial buckets
                if held[b]:
                    emitted += 1
                    yield emit(b)
            while packer is not None and packer.packs:  # and the open packs, oldest first
                emitted += 1
                yield emit(None, packer.pop(0))
            if emitted == 0 and skip == 0 and kind is not None:  # none of this kind: `_mixed` drops it
                return
            if emitted == 0 and skip == 0:  # a whole epoch and not one usable sample: never loop on
                raise RuntimeError(
                    f"reader {g}: none of its {consumed} samples decoded or fit a bucket "
                    f"({errors[0]} unreadable shard reads; unfit: {reasons or 'none'}; buckets "
                    f"(frames, height, width): "
                    f"{[(b.num_frames, b.height, b.width) for b in self.buckets]}; kind={self.cfg.kind}; "
                    f"train.data.max_upscale={self.cfg.max_upscale})")
            epoch, skip, restore = epoch + 1, 0, {}


def _produce(it, q: queue.Queue, stop: threading.Event) -> None:
    """The prefetch thread: batches from `it` into `q` (an exception ends it, handed over in
    the queue to be raised by the consumer) until `stop` is set."""

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        while not stop.is_set() and put(next(it)):
            pass
    except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
        put(e)


class Loader:
    """Wraps ClipStream in a DataLoader, decodes ahead in a background thread (``prefetch``
    batches), keeps the ranks on one bucket per micro-step (``training.lockstep``: `peers`, the
    data-parallel ranks; None: this rank alone) and tracks the position of every reader from
    the batches it has pulled."""

    def __init__(self, stream: ClipStream, peers=None):
        self.stream = stream
        nw = stream.cfg.num_workers
        self.dl = DataLoader(stream, batch_size=None, num_workers=nw, persistent_workers=nw > 0,
                             prefetch_factor=2 if nw else None, multiprocessing_context=WORKER_CONTEXT if nw else None)
        self.positions: dict[int, dict] = dict(stream.state)
        self.next_worker = stream.next_worker
        self.epochs = 0
        self.last: dict = {}  # the latest batch's reader state and info (keys, stored text)
        # packs hold clips of any shape: one "bucket" (the trainer gives packing no peers)
        self.lockstep = Lockstep(1 if stream.cfg.pack else len(stream.buckets), peers, stream.cfg.max_waiting, stream.pulls,
                                 replays=waiting_rounds(stream.waiting) * max(nw, 1))  # a restore
        self._it = iter(self.dl)
        self._queue: queue.Queue | None = None
        self._error: BaseException | None = None
        if stream.cfg.prefetch > 0:
            self._queue = queue.Queue(maxsize=stream.cfg.prefetch)
            self._stop = threading.Event()
            # The thread holds the iterator, not the Loader: a Loader dropped without close()
            # is still collected (and its __del__ stops the thread and the DataLoader workers).
            self._thread = threading.Thread(target=_produce, name="loader-prefetch", daemon=True,
                                            args=(self._it, self._queue, self._stop))
            self._thread.start()

    def _get(self) -> tuple:  # the stream's next item
        if self._error is not None:
            raise self._error
        if self._queue is None:
            return next(self._it)
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._error = item
            raise item
        return item

    def _pull(self) -> tuple[int, tuple, dict]:
        """The stream's next batch, its reader's position taken: (bucket, batch, meta)."""
        st = (batch := self._get())[2]
        self.positions[st["reader"]] = {k: st[k] for k in (*POSITION, "mix", "drawn", "dropped") if k in st}
        nw = self.stream.cfg.num_workers
        self.next_worker = (st["reader"] % nw + 1) % nw if nw else 0
        self.epochs = max(p["epoch"] for p in self.positions.values())
        return st["bucket"] or 0, batch, {k: st[k] for k in ("reader", "epoch", "keys")}

    def __next__(self) -> tuple[torch.Tensor, list[str], list[str]]:
        self.lockstep.restore(self._get)
        video, captions, st = self.lockstep.next(self._pull)
        self.last = st
        return video, captions, st["keys"]

    def close(self) -> None:
        """Stop the prefetch thread and the DataLoader workers."""
        if self._queue is not None:
            self._stop.set()
            while not self._queue.empty():
                self._queue.get_nowait()
            self._thread.join(timeout=30)
            self._queue = None
        self._error = self._error or RuntimeError("the loader is closed")
        self._it = None

    def __del__(self):
        if getattr(self, "_queue", None) is not None:
            self._stop.set()

    @property
    def skipped_total(self) -> int:
        return sum(p.get("skipped", 0) for p in self.positions.values())

    @property
    def skip_reasons(self) -> dict[str, int]:
        """Skipped samples that fit no bucket, by reason (too_small, no_bucket), all readers."""
        return dict(sum((Counter(p.get("reasons") or {}) for p in self.positions.values()), Counter()))

    def state_dict(self) -> dict:
        self.lockstep.restore(self._get)  # a restored loader saved before its first batch
        return {"positions": {str(k): v for k, v in self.positions.items()},
                "num_workers": self.stream.cfg.num_workers, "next_worker": self.next_worker,
                **self.lockstep.state_dict()}

    @staticmethod
    def restore_state(d: dict | None, num_workers: int) -> dict:
        """A saved `state_dict` -> the `state` for ClipStream (checks the worker count)."""
        if not d:
            return {}
        if d.get("num_workers") != num_workers:
            raise ValueError("the loader position was saved with "
                             f"{d.get('num_workers')} workers per rank (train.data.num_workers), "
                             f"not {num_workers}")
        return {"positions": {int(k): v for k, v in d["positions"].items()},
                "next_worker": int(d.get("next_worker", 0)),
                "waiting": list(d.get("waiting") or []), "pulls": int(d.get("pulls", 0))}
