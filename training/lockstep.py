"""Buckets in lock step: every data-parallel rank trains on the same bucket at every micro-step.

Each rank's loader (``training.loader``) fills its buckets from its own shards, so left alone
the ranks would emit batches of different shapes at the same step: every collective of the
step would see other shapes on other ranks, and each step would wait at the gradient
all-reduce for the rank running the longest clip. (The ranks of one sequence-parallel group
read the same samples, so their all-to-alls always match.) ``Lockstep`` holds the batches a
rank has pulled from its stream but not trained on yet (its *waiting room*) and, once per
micro-step, the ranks agree on a bucket with a tiny all-gather of what each holds (``agree``,
a pure function of the gathered rows, so every rank reaches the same decision):

1. a bucket in which every rank has a batch waiting: every rank takes its oldest one (the
   bucket whose oldest waiting batch, on any rank, was pulled first; ties: the first bucket);
2. else, while every waiting room holds fewer than ``train.data.max_waiting`` batches: every
   rank pulls one more batch from its stream, and they agree again;
3. else (some waiting room is full) the bucket with waiting batches on the most ranks (then the
   most in all, then the first): the ranks holding two or more hand their newest spares, one
   each, to the ranks holding none (a broadcast of one batch per rank lacking it), and every
   rank trains on a batch of that bucket. If no bucket has a batch for every rank, they pull.

So no rank waits on a bucket it cannot fill (a rank whose shards hold no clip of some shape
gets batches of it from the others, and never deadlocks), every sample is still trained on
once per epoch, by one rank, and a waiting room stays within about ``max_waiting`` + the number
of buckets batches. (Without hand-overs the rooms would grow without bound: the ranks' counts
per bucket drift apart like a random walk. Simulating this rule over 3 buckets, about 3% of
the batches a rank trains on come from another rank with 2 ranks and ``max_waiting`` 8, about
7% with 8 ranks; 16 halves that.) Ranks pull in step, so the pull counter (a batch's age) is
the same on every rank. Sequence-parallel ranks (one data-parallel rank: the same samples)
gather as one.

This follows Open-Sora-Plan's grouping (each global batch split over the ranks has one shape)
and Open-Sora 1.1's bucket sampler (every rank walks the buckets in one shared order), which
both index the whole dataset on every rank and pad a bucket by repeating its samples; a
streaming loader has only its own shards, hence the agreement and the hand-over instead of
repeats. With one rank the rule reduces to the stream's own order.

State: the waiting batches (reader, epoch, bucket and keys; the loader re-decodes them on a
restore) and the pull counter, saved with the loader position.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


class LocalPeers:
    """One data-parallel rank: nothing to agree with."""

    rank, world = 0, 1

    def gather(self, row: list[int]) -> list[list[int]]:
        return [list(row)]

    def share(self, obj, src: int):
        return obj


class TorchPeers:
    """The data-parallel ranks of a ``torch.distributed`` run (every rank of the default group
    calls each method in the same order). ``rank``/``world``: the data-parallel rank and count
    (the ranks of a sequence-parallel group share one). ``device``: where the gathered tensor
    lives (the accelerator under NCCL)."""

    def __init__(self, dp_rank: int, dp_world: int, device: torch.device):
        self.rank, self.world, self.device = dp_rank, dp_world, device
        self._first: dict[int, int] = {}  # data-parallel rank -> its lowest global rank

    def gather(self, row: list[int]) -> list[list[int]]:
        t = torch.tensor([self.rank, *row], dtype=torch.int64, device=self.device)  # (1 + L,)
        out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(out, t)
        rows: dict[int, list[int]] = {}
        for g, o in enumerate(out):
            dp, *r = o.tolist()
            rows.setdefault(dp, r)
            self._first.setdefault(dp, g)
        return [rows[d] for d in range(self.world)]

    def share(self, obj, src: int):
        box = [obj]
        dist.broadcast_object_list(box, src=self._first[src],
                                   device=self.device if self.device.type == "cuda" else None)
        return box[0]


@dataclass
class Decision:
    kind: str  # take | pull | share
    bucket: int = -1
    moves: list[tuple[int, int]] = field(default_factory=list)  # share: (giver, receiver) ranks


def agree(rows: list[list[int]], max_waiting: int) -> Decision:
    """The micro-step's decision from every data-parallel rank's row: for each of the B buckets
    its waiting batches, then for each the pull number of its oldest (-1: none). See the
    module docstring for the rule."""
    B = len(rows[0]) // 2
    counts = [r[:B] for r in rows]
    oldest = [r[B:] for r in rows]
    world = len(rows)
    common = [b for b in range(B) if all(c[b] > 0 for c in counts)]
    if common:
        return Decision("take", min(common, key=lambda b: (min(o[b] for o in oldest), b)))
    if max(sum(c) for c in counts) < max_waiting:
        return Decision("pull")
    totals = [sum(c[b] for c in counts) for b in range(B)]
    fillable = [b for b in range(B) if totals[b] >= world]
    if not fillable:
        return Decision("pull")
    b = max(fillable, key=lambda b: (sum(c[b] > 0 for c in counts), totals[b], -b))
    spare = [max(c[b] - 1, 0) for c in counts]
    moves = []
    for r in (r for r in range(world) if counts[r][b] == 0):
        giver = max(range(world), key=lambda d: (spare[d], -d))
        spare[giver] -= 1
        moves.append((giver, r))
    return Decision("share", b, moves)


def waiting_rounds(waiting: list[dict]) -> int:
    """The most waiting batches (of a saved ``Lockstep.state_dict``) any one reader makes again."""
    return max(Counter(int(e["reader"]) for e in waiting).values(), default=0)


class Lockstep:
    """One rank's waiting room and its side of the agreement. ``next(pull)`` returns the batch
    this rank trains on next; ``pull()`` gives ``(bucket, batch, meta)`` from the stream
    (meta: what a restore needs to make the batch again: reader, epoch, keys). A restore:
    ``pulls`` as saved, and the stream's first ``replays`` items are the waiting batches made
    again (``restore``)."""

    def __init__(self, num_buckets: int, peers=None, max_waiting: int = 8, pulls: int = 0,
                 replays: int = 0):
        self.B, self.peers, self.max_waiting = num_buckets, peers or LocalPeers(), max_waiting
        self.pulls = pulls  # batches pulled from the stream so far (every rank pulls in step)
        self.replays = replays
        self.waiting: list[list[tuple[int, object, dict]]] = [[] for _ in range(num_buckets)]
        self.shared = 0  # batches this rank gave to or got from another rank

    def restore(self, get) -> None:
        """Take the stream's remade waiting batches (``get()``: its next item; placeholders,
        which keep the round-robin over loader workers in place, are dropped)."""
        while self.replays:
            self.replays -= 1
            batch = get()
            st = batch[2]
            if not st.get("placeholder"):
                self.add(st["bucket"], batch, {k: st[k] for k in ("reader", "epoch", "keys")},
                         seq=st["replay"])

    def add(self, bucket: int, batch, meta: dict, seq: int | None = None) -> None:
        """A batch pulled from the stream (seq: its pull number, when restored)."""
        if seq is None:
            seq, self.pulls = self.pulls, self.pulls + 1
        self.waiting[bucket].append((seq, batch, meta))
        self.waiting[bucket].sort(key=lambda e: e[0])

    def row(self) -> list[int]:
        return ([len(w) for w in self.waiting]
                + [w[0][0] if w else -1 for w in self.waiting])

    def next(self, pull):
        while True:
            d = agree(self.peers.gather(self.row()), self.max_waiting)
            if d.kind == "take":
                return self.waiting[d.bucket].pop(0)[1]
            if d.kind == "pull":
                self.add(*pull())
                continue
            mine = None
            for giver, receiver in d.moves:
                obj = self.waiting[d.bucket].pop()[1] if giver == self.peers.rank else None
                got = self.peers.share(obj, giver)
                if receiver == self.peers.rank:
                    mine = got
                self.shared += self.peers.rank in (giver, receiver)
            return mine if mine is not None else self.waiting[d.bucket].pop(0)[1]

    def state_dict(self) -> dict:
        return {"pulls": self.pulls,
                "waiting": [{"seq": seq, "bucket": b, **meta}
                            for b, w in enumerate(self.waiting) for seq, _, meta in w]}
