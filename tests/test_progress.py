"""Progress lines (data/progress.py): totals, rate, ETA, throttling on an injected clock, and
where they are written; the Ray dashboard line `spacetime run` prints."""

from __future__ import annotations

import builtins

from data.progress import Progress, duration, progress_line, rate_text
from pipeline.stages import dashboard_line


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_durations_and_rates_read_as_a_person_would():
    assert [duration(s) for s in (0, 42.4, 59.6, 125, 3599, 3600 + 7 * 60 + 20)] == [
        "0s", "42s", "1m00s", "2m05s", "59m59s", "1h07m"]
    assert rate_text(2.314, "step") == "2.31 step/s"
    assert rate_text(0.25, "batch") == "4.0 s/batch"  # under one a second: seconds per unit
    assert rate_text(0.0, "clip") == "? clip/s"
    assert progress_line("train", "step", 120, 300, 52, 2.0, "loss 0.41") == (
        "train: step 120/300 (40%) | 2.00 step/s | elapsed 52s | ETA 1m30s | loss 0.41")
    assert progress_line("eval", "batch", 0, 8, 0, 0.0).endswith("| ETA ?")  # no rate yet


def test_lines_carry_the_total_and_an_eta_from_the_rate_and_are_throttled():
    clock, lines = Clock(), []
    p = Progress("train", 100, unit="step", every_s=10, clock=clock, write=lines.append)
    clock.t = 2
    first = p.update(1, "loss 1.5")  # the first update always shows: the total is known at once
    assert first == "train: step 1/100 (1%) | 2.0 s/step | elapsed 2s | ETA 3m18s | loss 1.5"
    clock.t = 5
    assert p.update(2) is None  # within every_s of the last line
    clock.t = 11.9
    assert p.update(8) is None
    clock.t = 12
    assert p.update(10) == "train: step 10/100 (10%) | 1.2 s/step | elapsed 12s | ETA 1m48s"
    clock.t = 13
    assert p.update(50) is None
    clock.t = 14
    last = p.update(100)  # the end always shows, however soon
    assert last.startswith("train: step 100/100 (100%) |") and last.endswith("ETA 0s")
    assert p.update(100) is None  # ... once
    assert p.update(100, "stopped", force=True).endswith("| stopped")  # a forced line always
    assert lines == [first, lines[1], last, lines[3]] and len(lines) == 4


def test_a_resumed_run_rates_only_its_own_work():
    clock, lines = Clock(), []
    clock.t = 100
    p = Progress("train", 300, every_s=0, start=200, started=90, clock=clock, write=lines.append)
    assert p.advance(10) == "train: step 210/300 (70%) | 1.00 step/s | elapsed 10s | ETA 1m30s"
    clock.t = 110
    assert p.advance(10).endswith("ETA 1m20s") and p.done == 220  # 20 steps in 20 s: 80 left
    assert len(lines) == 2


def test_lines_go_to_stdout_once_whatever_print_has_become(capsys, monkeypatch):
    """Ray Train's workers replace ``print`` with one that writes every line twice (stdout and
    the logger's stderr); progress lines do not go through it."""
    printed = []
    monkeypatch.setattr(builtins, "print", lambda *a, **k: printed.append(a))
    p = Progress("shard", 3, unit="clip", every_s=0)
    p.update(1)
    p.update(3)
    out = capsys.readouterr()
    assert printed == [] and out.err == ""
    assert [ln.split(" |")[0] for ln in out.out.splitlines()] == [
        "shard: clip 1/3 (33%)", "shard: clip 3/3 (100%)"]


def test_the_dashboard_line_gives_its_url_or_how_to_get_one():
    assert dashboard_line(None, "127.0.0.1:8265") == (
        "ray: started a local Ray; dashboard at http://127.0.0.1:8265")
    assert dashboard_line("auto", "http://10.0.0.1:8265").endswith("dashboard at http://10.0.0.1:8265")
    assert "ray[default]" in dashboard_line(None, None)
    assert "--include-dashboard=true" in dashboard_line("ray://head:10001", "")
