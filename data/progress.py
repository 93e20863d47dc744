"""Progress lines people can read, shared by the long stages (train steps, eval batches, shard clips):

    train: step 120/300 (40%) | 2.31 step/s | elapsed 52s | ETA 1m18s | loss 0.4123, 18.5 samples/s

A line at the first update (so the total shows as soon as the work is counted), then at most one
per ``every_s`` seconds, and always the last one (done reaches the total) or a forced one (a
stop). Plain lines, never a bar redrawn in place: the same in a terminal, in a Ray worker's output
forwarded to the driver, and in a CI log.

The rate is the average since counting started (``start`` units already done at time
``started``: a resumed run counts only what it did itself); the ETA is the work left at that rate.

Lines go straight to ``sys.stdout`` (looked up at each write) and are flushed, not through
``print``: Ray Train (v2) replaces ``print`` in its workers with one that writes every line twice
to the driver's console (to the worker's stdout, which Ray has replaced, and through the root
logger's console handler to stderr).
"""

from __future__ import annotations

import sys
import time
from typing import Callable


def duration(seconds: float) -> str:
    """``42s``, ``2m05s``, ``3h07m``: seconds rounded to what a person reads."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def rate_text(rate: float, unit: str) -> str:
    """``2.31 step/s``, or under one a second ``4.2 s/batch`` (as tqdm does)."""
    if rate <= 0:
        return f"? {unit}/s"
    return f"{rate:.2f} {unit}/s" if rate >= 1 else f"{1 / rate:.1f} s/{unit}"


def progress_line(stage: str, unit: str, done: int, total: int, elapsed: float, rate: float,
                  extra: str = "") -> str:
    """One progress line: stage, done/total (percent), rate, elapsed time, ETA, then `extra`."""
    pct = f" ({100 * done / total:.0f}%)" if total > 0 else ""
    left = max(0, total - done)
    eta = duration(left / rate) if rate > 0 else ("0s" if left == 0 else "?")
    line = (f"{stage}: {unit} {done}/{total}{pct} | {rate_text(rate, unit)} | "
            f"elapsed {duration(elapsed)} | ETA {eta}")
    return f"{line} | {extra}" if extra else line


def write_stdout(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class Progress:
    """Counts one stage's work towards `total` and writes a `progress_line` now and then.

    ``update(done)`` sets how much is done, ``advance(n)`` adds to it; each returns the line it
    wrote, or None when throttled. `clock` (seconds, monotonic) and `write` are injectable."""

    def __init__(self, stage: str, total: int, unit: str = "step", every_s: float = 10.0,
                 start: int = 0, started: float | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 write: Callable[[str], None] | None = None):
        self.stage, self.total, self.unit, self.every_s = stage, int(total), unit, every_s
        self.clock, self.write = clock, write or write_stdout
        self.start = self.done = int(start)
        self.started = clock() if started is None else started
        self.last_line: float | None = None  # when the last line was written
        self.last_done: int | None = None  # and at what count

    def rate(self, now: float) -> float:
        dt = now - self.started
        return (self.done - self.start) / dt if dt > 0 else 0.0

    def line(self, extra: str = "") -> str:
        now = self.clock()
        return progress_line(self.stage, self.unit, self.done, self.total, now - self.started,
                             self.rate(now), extra)

    def update(self, done: int, extra: str = "", force: bool = False) -> str | None:
        self.done = int(done)
        now = self.clock()
        due = force or self.done != self.last_done and (
            self.last_line is None or self.done >= self.total or now - self.last_line >= self.every_s)
        if not due:
            return None
        self.last_line, self.last_done = now, self.done
        line = self.line(extra)
        self.write(line)
        return line

    def advance(self, n: int = 1, extra: str = "", force: bool = False) -> str | None:
        return self.update(self.done + n, extra, force)
