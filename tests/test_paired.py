"""benchmarks/paired.py: the one way the benchmarks compare A with B (in rounds, side by side in
time, the median of the per-round ratios and their range)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import paired  # noqa: E402


class DriftingMachine:
    """A fake clock for `paired.interleave`: every call of an arm costs its work times the
    machine's slowness, which grows by `drift` per call (a shared machine getting busier)."""

    def __init__(self, drift: float):
        self.now, self.slowness, self.drift, self.calls = 0.0, 1.0, drift, []

    def perf_counter(self) -> float:
        return self.now

    def arm(self, name: str, work: float):
        def run():
            self.calls.append(name)
            self.now += work * self.slowness
            self.slowness += self.drift
        return run


def test_rounds_alternate_and_cancel_the_drift_that_sequential_timing_keeps(monkeypatch):
    m = DriftingMachine(drift=0.05)
    monkeypatch.setattr(paired.time, "perf_counter", m.perf_counter)
    arms = {"a": m.arm("a", 1.0), "b": m.arm("b", 1.2)}  # b truly costs 1.2x a
    times = paired.interleave(arms, rounds=6, warmup=1)
    assert m.calls[:6] == ["a", "b", "b", "a", "a", "b"]  # warm-up, then reversed every other round
    assert len(times["a"]) == len(times["b"]) == 6
    r = paired.ratio(times["b"], times["a"])
    assert r.median == pytest.approx(1.2, rel=0.01)
    assert r.lo < 1.2 < r.hi and len(r.per_round) == 6
    # the same drift, timed A first and B after (what the benchmarks did before): far off
    seq = DriftingMachine(drift=0.05)
    a = [seq.arm("a", 1.0) for _ in range(6)]
    b = [seq.arm("b", 1.2) for _ in range(6)]
    ta = []
    for f in a:
        t0 = seq.now
        f()
        ta.append(seq.now - t0)
    tb = []
    for f in b:
        t0 = seq.now
        f()
        tb.append(seq.now - t0)
    assert sorted(tb)[3] / sorted(ta)[3] > 1.4


def test_summaries_format_and_refuse_unpaired_input():
    r = paired.summarize([1.1, 1.3, 1.2])
    assert (r.median, r.lo, r.hi) == (1.2, 1.1, 1.3)
    assert str(r) == "1.20x (1.10-1.30, 3 rounds)"
    assert r.as_dict(2) == {"median": 1.2, "lo": 1.1, "hi": 1.3, "per_round": [1.1, 1.3, 1.2]}
    with pytest.raises(ValueError, match="unpaired: 2 rounds against 3"):
        paired.ratio([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        paired.interleave({"a": lambda: None}, rounds=0)
    with pytest.raises(ValueError, match="no rounds"):
        paired.summarize([])


def test_every_benchmark_comparing_timings_uses_the_paired_helper():
    """The benchmarks whose figures are timing ratios (README) take them from benchmarks/paired.py."""
    root = Path(paired.__file__).parent
    for name in ("bench_training", "bench_model", "bench_latents", "bench_sp"):
        src = (root / f"{name}.py").read_text()
        assert "from paired import" in src and "interleave(" in src, name
