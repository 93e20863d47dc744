"""Paired measurement, the one way every benchmark here compares A with B.

A shared machine's speed drifts (by up to 30% over a quarter of an hour on the 2-core box these
figures come from), so timing A first and B after puts the drift straight into A / B. Instead
A and B run in rounds, side by side in time (A, B, then B, A, so that drift within a round
cancels over two), and a comparison is the median of the per-round ratios, with their range:

    times = interleave({"ddp": ddp_step, "zero2": zero2_step}, rounds=6)
    r = ratio(times["zero2"], times["ddp"])      # Paired: median, lo, hi, per_round
    print(f"ZeRO-2 / DDP {r}")                   # "1.08x (1.02-1.15, 6 rounds)"

An arm is a callable taking no arguments; the seconds of one call are measured around it.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence


@dataclass(frozen=True)
class Paired:
    """Per-round values of one comparison (ratios, or any per-round figure) and their summary."""

    per_round: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.per_round)

    @property
    def lo(self) -> float:
        return min(self.per_round)

    @property
    def hi(self) -> float:
        return max(self.per_round)

    def fmt(self, digits: int = 2, unit: str = "x") -> str:
        f = f"{{:.{digits}f}}"
        return (f"{f.format(self.median)}{unit} ({f.format(self.lo)}-{f.format(self.hi)}, "
                f"{len(self.per_round)} rounds)")

    def __str__(self) -> str:
        return self.fmt()

    def as_dict(self, digits: int = 4) -> dict:
        return {"median": round(self.median, digits), "lo": round(self.lo, digits),
                "hi": round(self.hi, digits), "per_round": [round(x, digits) for x in self.per_round]}


def summarize(per_round: Sequence[float]) -> Paired:
    if not per_round:
        raise ValueError("no rounds to summarize")
    return Paired(tuple(float(x) for x in per_round))


def ratio(num: Sequence[float], den: Sequence[float]) -> Paired:
    """num[i] / den[i] per round (both measured in round i), summarized."""
    if len(num) != len(den):
        raise ValueError(f"unpaired: {len(num)} rounds against {len(den)}")
    return summarize([a / b for a, b in zip(num, den)])


def interleave(arms: Mapping[str, Callable[[], object]], rounds: int, warmup: int = 1,
               before: Optional[Callable[[], None]] = None) -> dict[str, list[float]]:
    """Seconds of each arm per round: `warmup` untimed rounds, then `rounds` timed ones, every arm
    once per round, the order reversed every other round (A B, B A, A B...). `before` runs
    ahead of every call, untimed (a barrier between ranks, a device synchronize)."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    names = list(arms)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(warmup + rounds):
        for k in (names if r % 2 == 0 else names[::-1]):
            if before is not None:
                before()
            t0 = time.perf_counter()
            arms[k]()
            elapsed = time.perf_counter() - t0
            if r >= warmup:
                times[k].append(elapsed)
    return times


__all__ = ["Paired", "interleave", "ratio", "summarize"]
