"""The run report: a run made by the real Graph (tiny stage functions writing the real files:
parquet manifests, stats.json, metrics.jsonl through JsonlTracker, H.264 mp4s), rendered and
checked in the HTML, through the CLI, and in headless Chromium (charts drawn, videos decoded)."""

from __future__ import annotations

import html
import json
import os
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data.shards import write_parquet
from data.video_io import write_mp4
from pipeline.cli import cmd_report, versions
from pipeline.provenance import git_commit
from pipeline.curation.curate import REJECT_SCHEMA
from pipeline.graph import Graph, Stage, StageFailed
from pipeline.report import (ReportConfig, ReportError, _sample_checks, fmt_tick, load_run,
                             nice_ticks, probe_rows, thin, write_report)
from data.tracking import JsonlTracker

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
PROMPTS = ['a red <b>circle</b> & "friends"', "a green square"]
COLOURS = [(200, 30, 30), (30, 180, 60)]  # sample-00, sample-01
GRIDS = {10: (128, 128, 128), 20: (30, 40, 200)}  # each checkpoint's grid.mp4


# ----- a small run made by the real graph ------------------------------------------------------
def _curate(ctx):
    modern = ctx.section("curate")["modern"]
    rng = np.random.default_rng(0)
    clips = [{"clip_id": f"c{i}", "source_id": f"v{i}",
              "scores": json.dumps({"motion": float(rng.uniform(0, 10)),
                                    "aesthetic": float(rng.uniform(3, 7))})} for i in range(12)]
    kinds = [("probe", "unreadable")] * 3 + [("filter", "too_short")]
    rejects = [{"source_id": f"v{20 + i}", "path": f"videos/v{20 + i}.mp4", "stage": st,
                "reason": r, "detail": "<unreadable> & gone", "start": None, "end": None}
               for i, (st, r) in enumerate(kinds)]
    write_parquet(clips, ctx.out_dir / "clips.parquet")
    write_parquet(rejects, ctx.out_dir / "rejects.parquet", schema=REJECT_SCHEMA)
    stats = {"inputs": 16, "clips_kept": 12, "reject_reasons": {"unreadable": 3, "too_short": 1}}
    if modern:
        # pipeline/curation/funnel.py's shape (count + unit); the shard step below uses "clips".
        stats["funnel"] = [{"step": "ingest", "count": 8, "hours": 0.02, "unit": "videos"},
                           {"step": "split", "count": 14, "hours": 0.018, "unit": "clips"},
                           {"step": "score", "count": 12, "hours": 0.015, "unit": "clips"}]
        stats["histograms"] = {"motion": {"edges": [0, 2.5, 5, 7.5, 10], "counts": [3, 4, 3, 2]},
                               "aesthetic": {"edges": [3, 4, 5, 6, 7], "counts": [2, 5, 4, 1]}}
    (ctx.out_dir / "stats.json").write_text(json.dumps(stats))
    ctx.tracker.log({f"curate/rejects/{k}": v for k, v in stats["reject_reasons"].items()})
    return stats


def _shard(ctx):
    stats = json.loads((ctx.inputs["curate"] / "stats.json").read_text())
    if "funnel" in stats:
        stats["funnel"].append({"step": "shard", "clips": 11, "hours": 0.014})
    shutil.copy(ctx.inputs["curate"] / "rejects.parquet", ctx.out_dir / "rejects.parquet")
    (ctx.out_dir / "stats.json").write_text(json.dumps({**stats, "clips_sharded": 11}))
    return {"clips_sharded": 11}


def _train(ctx):
    t = ctx.tracker
    # Steps 10..14 are logged twice: a resumed attempt re-logs them, and its values must win.
    for attempt, steps in ((0, range(0, 15)), (1, range(10, 20))):
        for s in steps:
            loss = 1.5 / (1 + s / 5) + attempt * 0.01
            t.log({"train/loss": loss, "train/lr": 1e-3 * min(1, (s + 1) / 5), "train/mfu": 0.3,
                   "train/step_time_s": 0.5, "train/compute_s": 0.45, "train/data_wait_s": 0.05,
                   "train/loss_t0.00-0.50": loss * 1.2, "train/loss_t0.50-1.00": loss * 0.8,
                   "train/grad_norm": 1.0 / (s + 1), "train/nonfinite": float("nan")}, step=s)
    t.summary({"final_loss": 0.3, "steps": 20})
    return {"steps": 20}


def _eval(ctx):
    """Modern: training/evaluation/evaluate.py's layout (per-checkpoint metrics, samples with their probe
    results, a grid per checkpoint, skipped metrics). Old: val loss and samples only."""
    cfg = ctx.section("eval")
    if cfg["fail"]:
        raise RuntimeError("sampler <exploded>")
    d = ctx.out_dir / "samples"
    d.mkdir()
    for i, c in enumerate(COLOURS):
        write_mp4(d / f"sample-{i:02d}.mp4", np.full((8, 32, 32, 3), c, np.uint8), fps=8)
        ctx.tracker.log_video(f"samples/{i:02d}", str(d / f"sample-{i:02d}.mp4"), PROMPTS[i])
    samples = [{"index": i, "prompt": p, "path": f"samples/sample-{i:02d}.mp4"}
               for i, p in enumerate(PROMPTS)]
    final = {"val/loss": 0.31, "val/loss_t0.10": 0.5, "val/loss_t0.50": 0.2,
             "val/loss_t0.90": 0.25}
    results = {**final, "samples": samples}
    if cfg["modern"]:
        samples[0].update(probes={"colour": True, "count": None}, clip_score=0.25,
                          measured={"color": "red", "counts": [1]})
        samples[1].update(probes={"colour": True, "count": False}, clip_score=0.19)
        checkpoints = []
        for step, colour in GRIDS.items():
            grid = "samples/grid.mp4" if step == 20 else f"samples/step{step:08d}/grid.mp4"
            (ctx.out_dir / grid).parent.mkdir(parents=True, exist_ok=True)
            write_mp4(ctx.out_dir / grid, np.full((8, 32, 64, 3), colour, np.uint8), fps=8)
            metrics = {**final, "clip_score": 0.22} if step == 20 else {
                "val/loss": 0.5, "val/loss_t0.10": 0.7, "clip_score": 0.18}
            ctx.tracker.log(metrics, step=step)
            checkpoints.append({"step": step, "kind": "deepspeed", "weights": "ema",
                                "metrics": metrics, "grid": grid, "samples": samples})
        results = {**checkpoints[-1]["metrics"], "step": 20, "weights": "ema",
                   "samples": samples, "grid": "samples/grid.mp4", "prompts": PROMPTS,
                   "skipped": {"fvd": "eval.fvd.model is not set"}, "checkpoints": checkpoints}
    (ctx.out_dir / "results.json").write_text(json.dumps(results))
    return {k: v for k, v in results.items() if k not in ("samples", "checkpoints")}


STAGES = [Stage("source", lambda ctx: {"videos": 16}, config_keys=("source",)),
          Stage("curate", _curate, inputs=("source",), config_keys=("curate",)),
          Stage("shard", _shard, inputs=("curate",), config_keys=("shard",)),
          Stage("train", _train, inputs=("shard",), config_keys=("train",)),
          Stage("eval", _eval, inputs=("train", "shard"), config_keys=("eval",))]


def make_run(root: Path, run_id: str, *, modern: bool = True, eval_fails: bool = False) -> Path:
    cfg = {"run": {"name": "test", "root": str(root)}, "source": {"kind": "synthetic"},
           "curate": {"modern": modern}, "shard": {}, "train": {"steps": 20, "lr": 1e-3},
           "eval": {"modern": modern, "fail": eval_fails}}
    extra = {"git": git_commit(REPO), "versions": versions(), "argv": ["experiment=tiny"],
             "host": "testhost"}
    try:
        Graph(STAGES, root).run(
            cfg, cfg, run_id, extra_info=extra, log=lambda m: None,
            tracker_factory=lambda ctx: JsonlTracker(ctx.out_dir / "metrics.jsonl"))
    except StageFailed:
        assert eval_fails
    return root


@pytest.fixture(scope="module")
def run_root(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("report") / "out", "run-modern")


def srcs(page: str) -> list[str]:
    return [html.unescape(s) for s in re.findall(r'<video [^>]*src="([^"]+)"', page)]


# ----- the page --------------------------------------------------------------------------------
def test_report_has_every_section_from_the_files(run_root):
    out = write_report(run_root)
    assert out == run_root / "runs" / "run-modern" / "report.html"
    page = out.read_text()
    assert page.count('data-chart="bar"') == 2  # funnel, rejects by stage / reason
    assert re.search(r">ingest \(videos\)<.*>split \(clips\)<.*>score \(clips\)<.*>shard<",
                     page)  # the shard stage's funnel: the curate steps and its own
    assert "11 clips (79%)" in page  # of the first step counted in clips (14), not in videos
    assert ">probe / unreadable<" in page and "&lt;unreadable&gt; &amp; gone" in page
    assert page.count('data-chart="hist"') == 2 and "shard/stats.json" in page
    for title in ("Loss", "Loss by timestep bucket", "Learning rate", "MFU", "Step time split (s)",
                  "train/grad_norm", "val/loss by timestep", "clip_score"):
        assert f"<figcaption>{title}</figcaption>" in page, title
    assert "train/nonfinite" not in page.split("id='evaluation'")[0]  # NaN-only series dropped
    assert "val/loss (eval)" in page  # eval checkpoints overlaid on the training loss
    assert "Final metrics (step 20)" in page and "<th>step</th><td>" not in page
    assert "<b>fvd</b>: eval.fvd.model is not set" in page
    assert "Probes: 2 of 3 passed" in page  # "count": None did not apply to sample 0
    # Prompts are escaped; videos are linked relative to the page and exist there.
    assert html.escape(PROMPTS[0]) in page and PROMPTS[0] not in page
    assert len(srcs(page)) == 5  # the final grid, 2 samples, the grid of each checkpoint
    for s in srcs(page):
        assert s.startswith("../../stages/eval-") and (out.parent / s).is_file()
    card0 = page.split("sample-00.mp4")[2].split("class='card'")[0]
    assert "colour <span class='badge pass'>" in card0 and "count" not in card0
    assert "clip_score 0.25" in card0
    # Header and lineage: commit, config summary, hashes, input hashes matched to upstream.
    lineage = json.loads((out.parent / "lineage.json").read_text())
    assert lineage["git"]["commit"] and lineage["git"]["commit"] in page
    assert "train.steps" in page and "testhost" in page
    for rec in lineage["stages"].values():
        assert rec["hash"] in page
    assert page.count(" ✓</td>") == 5  # curate, shard, train, eval (x2) inputs verified


def test_resumed_steps_keep_the_last_value(run_root):
    train = next(s for s in load_run(run_root).stages if s.name == "train")
    loss = train.series["train/loss"]
    assert sorted(loss) == list(range(20))
    assert loss[12] == pytest.approx(1.5 / (1 + 12 / 5) + 0.01)  # the second attempt's value
    assert "train/nonfinite" not in train.series and train.summary["steps"] == 20


def test_old_shapes_and_a_failed_stage_say_what_is_missing(tmp_path):
    root = make_run(tmp_path / "out", "run-old", modern=False, eval_fails=True)
    page = write_report(root).read_text()
    assert "No curation funnel recorded" in page
    assert "curate/clips.parquet (binned here)" in page and page.count('data-chart="hist"') == 2
    assert "No evaluation results" in page and "No sampled videos recorded" in page
    assert "<span class='state failed'>failed</span>" in page
    assert "RuntimeError: sampler &lt;exploded&gt;" in page
    assert "<figcaption>Loss</figcaption>" in page  # training still reported


def test_a_copied_root_links_its_own_files(run_root, tmp_path):
    moved = shutil.copytree(run_root, tmp_path / "elsewhere")
    out = write_report(moved, ReportConfig(run_id="run-modern"))
    for s in srcs(out.read_text()):
        assert (out.parent / s).resolve().is_relative_to(moved)


def test_run_selection_and_errors(run_root, tmp_path, capsys):
    assert cmd_report(str(run_root), {"run_id": "run-modern", "embed_videos": True}) == 0
    out = Path(capsys.readouterr().out.strip())
    assert all(s.startswith("data:video/mp4;base64,") for s in srcs(out.read_text()))
    with pytest.raises(SystemExit, match="no run 'nope'.*run-modern"):
        cmd_report(str(run_root), {"run_id": "nope", "embed_videos": False})
    with pytest.raises(ReportError, match="no runs under"):
        write_report(tmp_path)


def test_cli_writes_the_latest_runs_report(run_root, tmp_path):
    (run_root / "runs" / "run-modern" / "report.html").unlink(missing_ok=True)
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "report", f"run.root={run_root}"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    page = run_root / "runs" / "run-modern" / "report.html"
    assert r.stdout.strip().splitlines()[-1] == str(page) and page.exists()


def test_probe_results_in_either_shape():
    rows = probe_rows({"probes": [{"name": "colour", "index": 0, "passed": True, "score": 0.9},
                                  {"probe": "count", "prompt": "p", "ok": False}]})
    assert [(r["name"], r["passed"], r["index"], r["prompt"]) for r in rows] == [
        ("colour", True, 0, ""), ("count", False, None, "p")]
    assert rows[0]["detail"] == '{"score": 0.9}'
    assert [(r["name"], r["passed"]) for r in probe_rows({"probes": {"a": True, "b": {"pass": 0}}})
            ] == [("a", True), ("b", None)]
    assert _sample_checks({"probes": {"colour": True, "count": None, "motion": False}}) == [
        ("colour", True), ("motion", False)]


def test_chart_helpers():
    assert nice_ticks(0, 1) == [0, 0.25, 0.5, 0.75, 1.0]
    assert nice_ticks(0.13, 0.91, 4) == [0.2, 0.4, 0.6, 0.8]
    assert nice_ticks(3, 3) == [3]
    pts = [(i, float(i)) for i in range(1001)]
    assert len(thin(pts, 100)) <= 101 and thin(pts, 100)[-1] == (1000, 1000.0)
    assert thin(pts[:5], 100) == pts[:5]
    ticks = [fmt_tick(v) for v in (1.72e9, 25000, 8000, 0.0003)]
    assert ticks == ["1.72G", "25k", "8000", "0.0003"]


# ----- in a real browser -----------------------------------------------------------------------
# Evaluated in the loaded page: waits (in real time) until the page's own script has marked
# every video loaded or failed, then reads each video's first frame back through a canvas and
# measures every chart's box and its drawn marks.
PROBE = """(async () => {
  const vids = [...document.querySelectorAll('video')];
  while (vids.some(v => !v.dataset.state)) await new Promise(r => setTimeout(r, 50));
  const videos = vids.map(v => {
    const r = {state: v.dataset.state, width: v.videoWidth, height: v.videoHeight,
               src: v.src.slice(0, 30)};
    if (v.dataset.state === 'loaded') {
      const c = document.createElement('canvas'); c.width = v.videoWidth; c.height = v.videoHeight;
      const x = c.getContext('2d'); x.drawImage(v, 0, 0);
      const d = x.getImageData(0, 0, c.width, c.height).data; const s = [0, 0, 0];
      for (let i = 0; i < d.length; i += 4) { s[0] += d[i]; s[1] += d[i + 1]; s[2] += d[i + 2]; }
      r.rgb = s.map(a => a / (d.length / 4));
    }
    return r;
  });
  const charts = [...document.querySelectorAll('svg.chart')].map(s => {
    const b = s.getBoundingClientRect();
    const drawn = [...s.querySelectorAll('polyline,rect,circle')].filter(e => {
      const bb = e.getBBox(); return bb.width > 0 || bb.height > 0; }).length;
    return {kind: s.dataset.chart, w: b.width, h: b.height, drawn: drawn};
  });
  return {videos, charts};
})()"""


class Chromium:
    """Headless Chromium driven over the DevTools protocol on --remote-debugging-pipe (fd 3 in,
    fd 4 out, NUL-terminated JSON): load a page, wait for its load event, evaluate a promise."""

    def __init__(self, profile: Path):
        to_chrome, self._w = os.pipe()
        self._r, from_chrome = os.pipe()

        def fds():  # in the child: the pipe ends become fds 3 and 4
            os.dup2(to_chrome, 3)
            os.dup2(from_chrome, 4)

        self.proc = subprocess.Popen(
            [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={profile}", "--allow-file-access-from-files",
             "--remote-debugging-pipe", "about:blank"],
            preexec_fn=fds, pass_fds=(3, 4), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome)
        os.close(from_chrome)
        self._buf, self._id = b"", 0

    def _recv(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            ready, _, _ = select.select([self._r], [], [], max(deadline - time.monotonic(), 0))
            chunk = os.read(self._r, 1 << 16) if ready else b""
            assert chunk, "Chromium went silent (timed out or exited)"
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 60) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        os.write(self._w, json.dumps({**msg, **({"sessionId": session} if session else {})})
                 .encode() + b"\0")
        deadline = time.monotonic() + timeout
        while (reply := self._recv(deadline)).get("id") != self._id:
            self.events.append(reply)
        assert "error" not in reply, reply
        return reply["result"]

    def evaluate_in(self, url: str, expression: str, timeout: float = 60) -> dict:
        self.events: list[dict] = []
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        sid = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.call("Page.enable", session=sid)
        self.call("Page.navigate", {"url": url}, session=sid)
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            self.events.append(self._recv(deadline))
        res = self.call("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                             "returnByValue": True}, session=sid, timeout=timeout)
        assert "exceptionDetails" not in res, res
        return res["result"]["value"]

    def close(self):
        try:
            self.call("Browser.close", timeout=10)
        except (AssertionError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._w)
        os.close(self._r)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                    "(`make test` installs it when run as root)")
def test_chromium_draws_the_charts_and_decodes_the_videos(run_root, tmp_path):
    browser = Chromium(tmp_path / "profile")
    try:
        for embed in (False, True):
            cfg = ReportConfig(embed_videos_max_bytes=1 << 20 if embed else 0,
                               out=str(run_root / "runs" / "run-modern" / f"embed-{embed}.html"))
            page = write_report(run_root, cfg)
            got = browser.evaluate_in(page.as_uri(), PROBE)
            assert len(got["charts"]) == page.read_text().count('<svg class="chart"') >= 12
            for c in got["charts"]:
                assert c["w"] > 100 and c["h"] > 50 and c["drawn"] > 0, c
            assert len(got["videos"]) == 5
            # The final grid, the two samples, then the grid of each checkpoint.
            expected = [GRIDS[20], *COLOURS, GRIDS[10], GRIDS[20]]
            for v, rgb in zip(got["videos"], expected):
                assert v["state"] == "loaded" and v["height"] == 32, v  # H.264 decoded
                assert np.allclose(v["rgb"], rgb, atol=12), (v, rgb)
                assert v["src"].startswith("data:video/mp4") == embed
    finally:
        browser.close()
