"""Packing clips of several shapes into sequences of at most a token budget (``train.data.pack``).

The loader (``training.loader.ClipStream``) assigns each clip a bucket (its shape) as without
packing, then hands it to its reader's `Packer` instead of the bucket's batch; each pack it
emits is one micro-batch, which the training step lays out as one sequence (``pack_clips``) for
``DiT.forward_packed`` (block-diagonal, varlen attention: ``training.patches.Segments``).
"""

from __future__ import annotations

PACK_OPEN = 4  # packs a reader fills at once (train.data.pack)


class Packer:
    """First-fit packing of one reader's clips into packs of at most `budget` tokens
    (``train.data.pack``). A clip goes into the first open pack with room for it, else opens a
    new one. A pack is emitted when it has no room left for `smallest` tokens (the smallest
    bucket's clip), when opening a pack leaves more than `open_packs` open (the oldest goes)
    and at the end of an epoch (oldest first). A clip of more than `budget` tokens is a pack
    alone, at once. Items are ``(decoded sample, bucket, tokens)``, a decoded sample being
    ``(clip, caption, key, ...)``; `pending` and `put` save and restore the open packs (keys and
    buckets, oldest first) exactly."""

    def __init__(self, budget: int, smallest: int, open_packs: int = PACK_OPEN):
        self.budget, self.smallest, self.open_packs = budget, smallest, open_packs
        self.packs: list[list[tuple]] = []  # open packs, oldest first
        self.fill: list[int] = []  # tokens in each

    def add(self, item, bucket: int, tokens: int) -> list[tuple] | None:
        """Place a clip -> the pack to emit now, if any."""
        if tokens > self.budget:
            return [(item, bucket, tokens)]
        i = next((i for i, f in enumerate(self.fill) if f + tokens <= self.budget), len(self.packs))
        self.put(i, item, bucket, tokens)
        if self.budget - self.fill[i] < self.smallest:
            return self.pop(i)
        return self.pop(0) if len(self.packs) > self.open_packs else None

    def put(self, slot: int, item, bucket: int, tokens: int) -> None:
        """Add a clip to open pack `slot` (a restore replays the saved packs' clips in order)."""
        while len(self.packs) <= slot:
            self.packs.append([])
            self.fill.append(0)
        self.packs[slot].append((item, bucket, tokens))
        self.fill[slot] += tokens

    def pop(self, i: int) -> list[tuple]:
        """Take open pack `i` out (to emit it)."""
        self.fill.pop(i)
        return self.packs.pop(i)

    def pending(self) -> dict[str, list]:
        """The open packs as ``{slot: [[key, bucket], ...]}`` (JSON-able, for the position)."""
        return {str(i): [[x[2], b] for x, b, _ in p] for i, p in enumerate(self.packs)}
