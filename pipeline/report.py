"""The run report: one static HTML page per run, built from the run's files alone.

``spacetime report`` writes ``<run.root>/runs/<run_id>/report.html``: the run header and its
stages, the curation funnel and rejects, score histograms, training curves, evaluation metrics
over steps, the sampled videos with their prompts, and each stage's lineage.

Design decisions:

- **Files only.** Everything is read from what the graph and the stages already write
  (``lineage.json``; per stage ``info.json``, ``_SUCCESS.json``/``_FAILED.json``,
  ``metrics.jsonl``, ``stats.json``, the parquet manifests, ``results.json``). No W&B, Ray or
  torch: a report can be made on a laptop from a copied run root.
- **Stages are recognised by what they wrote, not by their names**: ``stats.json`` means
  curation, stepped metrics mean curves, ``results.json`` means evaluation. A new stage shows
  up without touching this file; a missing piece becomes a note in the page, never an error.
- **Inline SVG charts drawn here**, inline CSS, and a few lines of JavaScript that only mark
  each video loaded or unplayable. Nothing is fetched: the page works offline, forever.
- **Videos by relative path** from the HTML file, so the page keeps working when the run root
  is copied or moved as a whole; ``embed_videos_max_bytes`` embeds small videos as ``data:``
  URIs instead, for a single portable file.
- **Stage directories are looked up under ``<root>/stages/`` first**: ``lineage.json`` records
  absolute paths, which are stale after a copy.
- **Credentials are redacted** (:mod:`data.redact`) from everything shown, also for runs
  whose files were written before redaction existed.
- **Repeated steps keep the last value**: a resumed training stage appends to the same
  ``metrics.jsonl`` and re-logs the steps after its checkpoint.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from data.storage import FAILED, INFO, SUCCESS
from data.redact import redact

PALETTE = ("#3b6fd4", "#e0663a", "#3aa26b", "#9b59b6", "#c9a227", "#17a2b8", "#d6457a",
           "#6c757d", "#8c564b", "#2f4f4f")
TIMESTEP_BUCKET = re.compile(r"^(.*)_t(\d+(?:\.\d+)?)(?:-\d+(?:\.\d+)?)?$")  # loss_t0.25-0.50
EMBED_VIDEOS_MAX_BYTES = 8 << 20  # `spacetime report --embed-videos`: inline each video up to this
CONFIG_SUMMARY = ("run.name", "source.kind", "source.num_videos", "model.dit.preset",
                  "model.dit.attention", "model.text.kind", "train.steps",
                  "train.global_batch_size", "train.lr", "train.num_frames", "train.height",
                  "train.width", "train.precision", "deepspeed.zero_stage", "cluster.name",
                  "cluster.num_workers", "cluster.gpus_per_worker")


@dataclass
class ReportConfig:
    """What to report and how; ``spacetime report [RUN_ID] [--embed-videos]`` fills it."""

    run_id: Optional[str] = None  # None: the latest run under run.root
    out: Optional[str] = None  # default: <run.root>/runs/<run_id>/report.html
    embed_videos_max_bytes: int = 0  # videos up to this size go inline as data: URIs (0: none)
    max_points: int = 1500  # per plotted series; longer ones are thinned evenly (last kept)
    max_reject_rows: int = 50  # rows of the rejects manifest listed in the page


# ----- reading a run --------------------------------------------------------------------------
@dataclass
class StageData:
    """One stage of the run as its directory describes it."""

    name: str
    record: dict  # the stage's entry in lineage.json
    dir: Path
    info: dict = field(default_factory=dict)
    success: Optional[dict] = None
    failure: Optional[dict] = None
    series: dict[str, dict[int, float]] = field(default_factory=dict)  # key -> step -> value
    scalars: dict[str, float] = field(default_factory=dict)  # metrics logged without a step
    summary: dict[str, Any] = field(default_factory=dict)
    videos: list[dict] = field(default_factory=list)  # kind=video records
    stats: Optional[dict] = None
    results: Optional[dict] = None


@dataclass
class RunData:
    root: Path
    run_id: str
    lineage: dict
    stages: list[StageData]


class ReportError(Exception):
    """No run to report (no runs yet, or an unknown run id)."""


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def resolve_run_id(root: Path, run_id: str | None) -> str:
    runs = root / "runs"
    known = sorted(p.name for p in runs.glob("*") if (p / "lineage.json").exists())
    if run_id is None:
        if not (runs / "latest.json").exists():
            raise ReportError(f"no runs under {runs} (run `spacetime run` first)")
        run_id = read_json(runs / "latest.json")["run_id"]
    if run_id not in known:
        raise ReportError(f"no run '{run_id}' under {runs}; runs: {', '.join(known) or 'none'}")
    return run_id


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def read_metrics(path: Path, stage: StageData) -> None:
    """Fold a JsonlTracker file (data/tracking.py) into the stage's series and scalars."""
    if not path.exists():
        return
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line of a killed process
        kind = rec.get("kind")
        if kind == "metrics":
            step = rec.get("step")
            for k, v in _flatten(rec.get("metrics") or {}).items():
                if not _finite(v):
                    continue
                if isinstance(step, int):
                    stage.series.setdefault(k, {})[step] = float(v)  # a rerun step wins
                else:
                    stage.scalars[k] = v
        elif kind == "summary":
            stage.summary.update(rec.get("values") or {})
        elif kind == "video":
            stage.videos.append(rec)


def _json_or_none(path: Path) -> Any:
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def load_run(root: str | Path, run_id: str | None = None) -> RunData:
    if "://" in str(root):
        raise ReportError(f"run.root {root} is a URL: the report reads local files; copy the run "
                          f"root down (runs/ and stages/ without shards) and point run.root at it")
    root = Path(root).absolute()
    run_id = resolve_run_id(root, run_id)
    lineage = redact(read_json(root / "runs" / run_id / "lineage.json"))  # (older runs: unredacted)
    stages = []
    for name, rec in lineage.get("stages", {}).items():
        recorded = Path(rec.get("path", ""))
        local = root / "stages" / recorded.name
        d = local if local.exists() else recorded
        s = StageData(name=name, record=rec, dir=d)
        s.info = redact(_json_or_none(d / INFO) or {})
        s.success = _json_or_none(d / SUCCESS)
        s.failure = redact(_json_or_none(d / FAILED))
        read_metrics(d / "metrics.jsonl", s)
        s.stats = _json_or_none(d / "stats.json")
        s.results = _json_or_none(d / "results.json")
        stages.append(s)
    return RunData(root=root, run_id=run_id, lineage=lineage, stages=stages)


def read_table(path: Path, columns: list[str] | None = None):
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=columns)


# ----- formatting and SVG charts -------------------------------------------------------------
def esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


def fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v == int(v) and abs(v) < 1e15:
            return f"{int(v):,}"
        return f"{v:,.0f}" if abs(v) >= 1e4 else f"{v:.4g}"
    return str(v)


def fmt_tick(v: float) -> str:
    """Axis labels stay short: 1.72G, 25k, 8000, 0.0003."""
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= max(div, 1e4):
            return f"{v / div:.3g}{suffix}"
    return f"{v:.4g}"


def fmt_time(t: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t)) if _finite(t) else "-"


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values covering [lo, hi] (1, 2, 2.5, 5 x 10^k steps)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0]
    if hi <= lo:
        return [lo]
    mag = 10 ** math.floor(math.log10((hi - lo) / max(n - 1, 1)))

    def count(step: float) -> int:
        return math.floor(hi / step + 1e-9) - math.ceil(lo / step - 1e-9) + 1

    # The round step whose tick count is closest to n (ties: the larger step).
    step = min((m * mag * f for m in (1, 2, 2.5, 5) for f in (0.1, 1, 10)),
               key=lambda st: (abs(count(st) - n), -st))
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 12) for i in range(count(step))]


def thin(points: list[tuple[float, float]], max_points: int) -> list[tuple[float, float]]:
    """Every k-th point so at most max_points remain; the last point is always kept."""
    if len(points) <= max_points:
        return points
    k = math.ceil(len(points) / max_points)
    out = points[::k]
    return out if out[-1] == points[-1] else out + [points[-1]]


class Frame:
    """Maps data coordinates into a width x height SVG with margins for the axes."""

    L, R, T, B = 58, 14, 10, 34

    def __init__(self, width: int, height: int, x: tuple[float, float], y: tuple[float, float]):
        self.w, self.h = width, height
        self.x0, self.x1 = x if x[1] > x[0] else (x[0] - 0.5, x[0] + 0.5)
        pad = abs(y[0]) * 0.1 + 0.5  # a flat series gets a band around its value
        self.y0, self.y1 = y if y[1] > y[0] else (y[0] - pad, y[0] + pad)

    def px(self, x: float) -> float:
        return self.L + (x - self.x0) / (self.x1 - self.x0) * (self.w - self.L - self.R)

    def py(self, y: float) -> float:
        return self.h - self.B - (y - self.y0) / (self.y1 - self.y0) * (self.h - self.T - self.B)

    def axes(self, xlabel: str, xticks: Iterable[float], yticks: Iterable[float]) -> list[str]:
        parts, base = [], self.h - self.B
        for t in yticks:
            if self.y0 <= t <= self.y1:
                y = self.py(t)
                parts.append(f'<line class="grid" x1="{self.L}" x2="{self.w - self.R}" '
                             f'y1="{y:.1f}" y2="{y:.1f}"/><text x="{self.L - 6}" y="{y + 4:.1f}" '
                             f'text-anchor="end">{esc(fmt_tick(t))}</text>')
        for t in xticks:
            if self.x0 <= t <= self.x1:
                x = self.px(t)
                parts.append(f'<line class="tick" x1="{x:.1f}" x2="{x:.1f}" y1="{base}" '
                             f'y2="{base + 4}"/><text x="{x:.1f}" y="{base + 16}" '
                             f'text-anchor="middle">{esc(fmt_tick(t))}</text>')
        parts.append(f'<line class="axis" x1="{self.L}" x2="{self.w - self.R}" y1="{base}" '
                     f'y2="{base}"/><line class="axis" x1="{self.L}" x2="{self.L}" '
                     f'y1="{self.T}" y2="{base}"/>')
        if xlabel:
            parts.append(f'<text x="{(self.L + self.w - self.R) / 2:.0f}" y="{self.h - 2}" '
                         f'text-anchor="middle" class="label">{esc(xlabel)}</text>')
        return parts


def _svg(kind: str, width: int, height: int, body: list[str], n: int) -> str:
    return (f'<svg class="chart" data-chart="{kind}" data-marks="{n}" width="{width}" '
            f'height="{height}" viewBox="0 0 {width} {height}" role="img">{"".join(body)}</svg>')


def _figure(title: str, svg: str, legend: list[tuple[str, str]] = (), note: str = "") -> str:
    items = "".join(f'<span><i style="background:{c}"></i>{esc(n)}</span>' for n, c in legend)
    return (f'<figure><figcaption>{esc(title)}</figcaption>{svg}'
            + (f'<div class="legend">{items}</div>' if items else "")
            + (f'<p class="note">{esc(note)}</p>' if note else "") + "</figure>")


def line_chart(title: str, series: dict[str, list[tuple[float, float]]], *, xlabel: str = "step",
               width: int = 560, height: int = 240, max_points: int = 1500,
               markers: dict[str, list[tuple[float, float]]] | None = None) -> str:
    """Lines (thinned to max_points) plus optional marker-only series (e.g. eval points)."""
    series = {k: thin(sorted(v), max_points) for k, v in series.items() if v}
    markers = {k: sorted(v) for k, v in (markers or {}).items() if v}
    pts = [p for v in (*series.values(), *markers.values()) for p in v]
    if not pts:
        return _figure(title, "", note="no data")
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    xt, yt = nice_ticks(min(xs), max(xs)), nice_ticks(min(ys), max(ys))
    f = Frame(width, height, (min(xs + xt), max(xs + xt)), (min(ys + yt), max(ys + yt)))
    body = f.axes(xlabel, xt, yt)
    legend, marks = [], 0
    for i, (name, p) in enumerate(series.items()):
        c = PALETTE[i % len(PALETTE)]
        legend.append((name, c))
        coords = " ".join(f"{f.px(x):.1f},{f.py(y):.1f}" for x, y in p)
        body.append(f'<polyline class="line" fill="none" stroke="{c}" points="{coords}">'
                    f'<title>{esc(name)}</title></polyline>')
        if len(p) <= 30:
            body += [f'<circle cx="{f.px(x):.1f}" cy="{f.py(y):.1f}" r="2.5" fill="{c}">'
                     f'<title>{esc(name)} @ {fmt(x)}: {fmt(y)}</title></circle>' for x, y in p]
        marks += len(p)
    for j, (name, p) in enumerate(markers.items()):
        c = PALETTE[(len(series) + j) % len(PALETTE)]
        legend.append((name, c))
        body += [f'<rect x="{f.px(x) - 4:.1f}" y="{f.py(y) - 4:.1f}" width="8" height="8" '
                 f'fill="{c}"><title>{esc(name)} @ {fmt(x)}: {fmt(y)}</title></rect>' for x, y in p]
        marks += len(p)
    return _figure(title, _svg("line", width, height, body, marks), legend)


def bar_chart(title: str, rows: list[tuple[str, list[float]]], measures: list[str], *,
              width: int = 620, texts: list[list[str]] | None = None) -> str:
    """Horizontal bars: one row per label, one bar per measure, each measure scaled on its own.
    texts: what to print after each bar (default: the value)."""
    if not rows:
        return _figure(title, "", note="no data")
    label_w, bar_h, gap = 170, 14, 10
    row_h = bar_h * len(measures) + gap
    height = row_h * len(rows) + 8
    span = width - label_w - 150
    peaks = [max((r[1][m] for r in rows if _finite(r[1][m])), default=0) or 1
             for m in range(len(measures))]
    body, marks = [], 0
    for i, (label, vals) in enumerate(rows):
        y = 4 + i * row_h
        body.append(f'<text x="{label_w - 8}" y="{y + row_h / 2 + 2:.0f}" text-anchor="end">'
                    f'{esc(label)}</text>')
        for m, v in enumerate(vals):
            if not _finite(v):
                continue
            w = max(v / peaks[m] * span, 1.0)
            yy = y + m * bar_h
            text = texts[i][m] if texts else fmt(v)
            body.append(f'<rect x="{label_w}" y="{yy}" width="{w:.1f}" height="{bar_h - 2}" '
                        f'fill="{PALETTE[m % len(PALETTE)]}"><title>{esc(label)}: {esc(text)}'
                        f'</title></rect><text x="{label_w + w + 4:.1f}" y="{yy + bar_h - 4}">'
                        f'{esc(text)}</text>')
            marks += 1
    legend = [(m, PALETTE[i % len(PALETTE)]) for i, m in enumerate(measures)]
    return _figure(title, _svg("bar", width, height, body, marks),
                   legend if len(measures) > 1 else [])


def histogram_chart(title: str, edges: list[float], counts: list[float], *, width: int = 400,
                    height: int = 200) -> str:
    if not counts or len(edges) != len(counts) + 1:
        return _figure(title, "", note="no data (edges must be one longer than counts)")
    yt = nice_ticks(0, max(counts) or 1, 4)
    xt = nice_ticks(edges[0], edges[-1], 5)
    f = Frame(width, height, (edges[0], edges[-1]), (0, max(yt + [max(counts)])))
    body = f.axes("", xt, yt)
    for a, b, c in zip(edges, edges[1:], counts):
        x0, x1, y = f.px(a), f.px(b), f.py(c)
        body.append(f'<rect x="{x0 + 0.5:.1f}" y="{y:.1f}" width="{max(x1 - x0 - 1, 0.5):.1f}" '
                    f'height="{f.py(0) - y:.1f}" fill="{PALETTE[0]}"><title>[{fmt(a)}, {fmt(b)}): '
                    f'{fmt(c)}</title></rect>')
    return _figure(title, _svg("hist", width, height, body, len(counts)))


# ----- sections --------------------------------------------------------------------------------
def _note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def _kv_table(d: dict, cls: str = "kv") -> str:
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(fmt(v))}</td></tr>" for k, v in d.items())
    return f'<table class="{cls}">{rows}</table>'


def _pre_json(obj: Any) -> str:
    return f"<pre>{esc(json.dumps(obj, indent=2, default=str))}</pre>"


def _dotted(cfg: dict, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(cfg, dict) or part not in cfg:
            return None
        cfg = cfg[part]
    return cfg


class Page:
    """Builds the sections of one run's page; paths in it are relative to ``out_dir``."""

    def __init__(self, run: RunData, cfg: ReportConfig, out_dir: Path):
        self.run, self.cfg, self.out_dir = run, cfg, out_dir

    def rel(self, path: Path) -> str:
        return os.path.relpath(Path(path).absolute(), self.out_dir.absolute())

    def video(self, path: Path, label: str) -> str:
        if not path.exists():
            return _note(f"missing video file: {self.rel(path)}")
        href = self.rel(path)
        src = href
        if 0 < path.stat().st_size <= self.cfg.embed_videos_max_bytes:
            src = "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()
        return (f'<video controls muted loop playsinline preload="auto" src="{esc(src)}" '
                f'title="{esc(label)}"></video><p class="video-error" hidden>This browser could '
                f'not play the video; <a href="{esc(href)}">open the file</a>.</p>')

    # -- header and stages --
    def header(self) -> str:
        lin = self.run.lineage
        git = lin.get("git") or {}
        commit = git.get("commit") or "unknown"
        meta = {
            "run id": self.run.run_id,
            "status": {True: "ok", False: "FAILED"}.get(lin.get("ok"), "unfinished"),
            "started": fmt_time(lin.get("started")),
            "finished": fmt_time(lin.get("finished")),
            "commit": commit + (" (dirty)" if git.get("dirty") else ""),
            "host": lin.get("host", "-"),
            "command": "spacetime run " + " ".join([*(lin.get("stage_flags") or []),
                                                    *(lin.get("argv") or [])]),
            "run root": str(self.run.root),
        }
        config = lin.get("config") or {}
        summary = {k: _dotted(config, k) for k in CONFIG_SUMMARY}
        summary = {k: v for k, v in summary.items() if v is not None}
        versions = lin.get("versions") or {}
        return (f"<section id='run'><h2>Run</h2><div class='cols'>{_kv_table(meta)}"
                f"{_kv_table(summary) if summary else _note('no config recorded')}</div>"
                f"<details><summary>Package versions</summary>{_kv_table(versions)}</details>"
                f"<details><summary>Full resolved config</summary>{_pre_json(config)}</details>"
                f"{self.stages_table()}</section>")

    def stages_table(self) -> str:
        run_commit = (self.run.lineage.get("git") or {}).get("commit")
        rows = []
        for s in self.run.stages:
            rec = s.record
            state = rec.get("state", "-")
            dur = rec.get("duration_s", s.info.get("duration_s"))
            commit = (s.info.get("git") or {}).get("commit") or "-"
            cls = "other" if commit not in ("-", run_commit) else ""
            made_by = s.info.get("run_id")
            made = "" if made_by in (None, self.run.run_id) else f" (made by run {made_by})"
            rows.append(
                f"<tr><td>{esc(s.name)}</td><td><span class='state {esc(state)}'>{esc(state)}"
                f"</span>{esc(made)}</td><td><code>{esc(rec.get('hash', '')[:12])}</code></td>"
                f"<td>{esc(f'{dur:.1f} s' if _finite(dur) else '-')}</td>"
                f"<td><a href='{esc(self.rel(s.dir))}'>{esc(s.dir.name)}</a></td>"
                f"<td>{esc(', '.join(rec.get('upstream') or {}) or '-')}</td>"
                f"<td class='{cls}'><code>{esc(commit[:10])}</code></td></tr>")
        head = "".join(f"<th>{h}</th>" for h in
                       ("stage", "state", "hash", "duration", "output", "inputs", "commit"))
        return f"<h3>Stages</h3><table class='grid'><tr>{head}</tr>{''.join(rows)}</table>"

    # -- curation --
    def _last(self, pred) -> Optional[StageData]:
        found = [s for s in self.run.stages if pred(s)]
        return found[-1] if found else None

    def curation(self) -> str:
        parts = ["<section id='curation'><h2>Curation</h2>"]
        funnel_st = self._last(lambda s: isinstance((s.stats or {}).get("funnel"), list))
        if funnel_st:
            parts.append(funnel_chart(funnel_st))
        else:
            parts.append(_note("No curation funnel recorded (no stats.json with a 'funnel')."))
        stats_st = self._last(lambda s: isinstance(s.stats, dict))
        if stats_st:
            flat = {k: v for k, v in _flatten(stats_st.stats).items()
                    if not isinstance(v, (list, dict)) and not k.startswith("histograms/")}
            parts.append(f"<details><summary>Counts ({esc(stats_st.name)}/stats.json)</summary>"
                         f"{_kv_table(flat)}</details>")
        parts.append(self.rejects())
        parts.append(self.histograms())
        return "".join(parts) + "</section>"

    def rejects(self) -> str:
        st = self._last(lambda s: (s.dir / "rejects.parquet").exists())
        if st is None:
            st2 = self._last(lambda s: isinstance((s.stats or {}).get("reject_reasons"), dict))
            if st2 is None:
                return "<h3>Rejects</h3>" + _note("No rejects recorded.")
            reasons = st2.stats["reject_reasons"]
            rows = [(k, [v]) for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])]
            return "<h3>Rejects</h3>" + bar_chart("Rejects by reason", rows, ["rejects"])
        try:  # counted in Arrow: a production rejects manifest has millions of rows
            table = read_table(st.dir / "rejects.parquet")
            n_rows = table.num_rows
            keys = [c for c in ("stage", "reason") if c in table.column_names]
            grouped = table.group_by(keys).aggregate([([], "count_all")]).to_pylist()
        except Exception as e:  # noqa: BLE001 - a bad file is a note, not a failed report
            return "<h3>Rejects</h3>" + _note(f"Could not read {st.name}/rejects.parquet: {e}")
        counts = {f"{g.get('stage') or '?'} / {g.get('reason') or '?'}": g["count_all"]
                  for g in grouped}
        rows = [(k, [v]) for k, v in sorted(counts.items(), key=lambda kv: -kv[1])]
        out = ["<h3>Rejects</h3>"]
        if not n_rows:
            return out[0] + _note(f"No rejects ({st.name}/rejects.parquet is empty).")
        out.append(bar_chart(f"Rejects by stage / reason ({st.name}/rejects.parquet, "
                             f"{n_rows} rows)", rows, ["rejects"]))
        n = self.cfg.max_reject_rows
        body = "".join(
            f"<tr><td>{esc(r.get('source_id'))}</td><td>{esc(r.get('stage'))}</td>"
            f"<td>{esc(r.get('reason'))}</td>"
            f"<td class='detail'>{esc(str(r.get('detail') or '')[:240])}</td></tr>"
            for r in table.slice(0, n).to_pylist())
        more = f" (first {n} of {n_rows})" if n_rows > n else ""
        out.append(f"<details><summary>Rejected items{esc(more)}</summary><table class='grid'>"
                   f"<tr><th>source</th><th>stage</th><th>reason</th><th>detail</th></tr>{body}"
                   f"</table></details>")
        return "".join(out)

    def histograms(self) -> str:
        out = ["<h3>Score histograms</h3>"]
        st = self._last(lambda s: isinstance((s.stats or {}).get("histograms"), dict))
        hists: dict[str, tuple[list, list]] = {}
        source = ""
        if st:
            source = f"{st.name}/stats.json"
            for k, h in st.stats["histograms"].items():
                if isinstance(h, dict):
                    hists[k] = (list(h.get("edges") or []), list(h.get("counts") or []))
        else:
            st = self._last(lambda s: (s.dir / "clips.parquet").exists())
            if st:
                source = f"{st.name}/clips.parquet (binned here)"
                hists = self.histograms_from_clips(st.dir / "clips.parquet")
        if not hists:
            return out[0] + _note("No score histograms (no stats.json 'histograms' and no "
                                  "clips.parquet with a 'scores' column).")
        out.append(_note(f"From {source}."))
        out.append("<div class='multiples'>" + "".join(
            histogram_chart(k, e, c) for k, (e, c) in sorted(hists.items())) + "</div>")
        return "".join(out)

    @staticmethod
    def histograms_from_clips(path: Path, bins: int = 20) -> dict[str, tuple[list, list]]:
        import numpy as np

        try:
            column = read_table(path, columns=["scores"]).column("scores").to_pylist()
        except Exception:  # noqa: BLE001 - no scores column (or a bad file): no histograms
            return {}
        values: dict[str, list[float]] = {}
        for scores in column:
            if isinstance(scores, str):
                try:
                    scores = json.loads(scores)
                except ValueError:
                    continue
            for k, v in _flatten(scores or {}).items():
                if _finite(v):
                    values.setdefault(k, []).append(float(v))
        out = {}
        for k, vs in values.items():
            counts, edges = np.histogram(np.asarray(vs), bins=bins)
            out[k] = (edges.tolist(), counts.tolist())
        return out

    # -- training --
    def training(self) -> str:
        parts = ["<section id='training'><h2>Training</h2>"]
        trains = [s for s in self.run.stages
                  if s.name == "train" or any(k.startswith("train/") for k in s.series)]
        if not trains:
            return parts[0] + _note("No training metrics recorded.") + "</section>"
        evals = self.eval_points()
        mp = self.cfg.max_points
        for s in trains:
            ser = {k: sorted(v.items()) for k, v in s.series.items()}
            if not ser:
                parts.append(_note(f"{s.name}: no stepped metrics in metrics.jsonl."))
                continue
            if len(trains) > 1:
                parts.append(f"<h3>{esc(s.name)}</h3>")
            used: set[str] = set()

            def take(*keys: str) -> dict[str, list]:
                got = {k: ser[k] for k in keys if k in ser}
                used.update(got)
                return got

            main = take("train/loss")
            last_step = max(x for v in ser.values() for x, _ in v)
            parts.append("<div class='multiples'>")
            parts.append(line_chart("Loss", main, markers=self.val_loss_points(evals, last_step),
                                    max_points=mp))
            buckets = {k.split("/", 1)[-1]: v for k, v in sorted(ser.items())
                       if TIMESTEP_BUCKET.match(k) and k.startswith("train/")}
            used.update(f"train/{k}" for k in buckets)
            if buckets:
                parts.append(line_chart("Loss by timestep bucket", buckets, max_points=mp))
            for title, keys in (("Learning rate", ("train/lr",)), ("MFU", ("train/mfu",)),
                                ("Step time split (s)", ("train/step_time_s", "train/compute_s",
                                                          "train/data_wait_s"))):
                got = take(*keys)
                if got:
                    parts.append(line_chart(title, got, max_points=mp))
            parts.append("</div>")
            rest = {k: v for k, v in ser.items() if k not in used}
            if rest:
                parts.append("<h3>Other metrics</h3><div class='multiples'>" + "".join(
                    line_chart(k, {k: v}, width=400, height=200, max_points=mp)
                    for k, v in sorted(rest.items())) + "</div>")
            if s.summary:
                parts.append(f"<details><summary>Summary ({esc(s.name)})</summary>"
                             f"{_kv_table(_scalar_items(s.summary))}</details>")
        return "".join(parts) + "</section>"

    def val_loss_points(self, evals: dict, last_step: int) -> dict[str, list]:
        """Eval loss on the training-loss chart: per checkpoint, else the final value at the
        last training step (the eval stage evaluates the final weights)."""
        out = {}
        for s in self.eval_stages():
            stepped = {k: v for k, v in evals.get(s.name, {}).items() if _is_loss(k)}
            final = {k: [(last_step, float(v))] for k, v in s.results.items()
                     if _is_loss(k) and _finite(v)}
            for k, v in (stepped or final).items():
                out[f"{k} ({s.name}{'' if stepped else ', final'})"] = v
        return out

    # -- evaluation --
    def eval_stages(self) -> list[StageData]:
        return [s for s in self.run.stages if isinstance(s.results, dict)]

    def eval_points(self) -> dict[str, dict[str, list[tuple[int, float]]]]:
        """stage -> metric -> [(step, value)]: results.json checkpoints, then stepped metrics."""
        out = {}
        for s in self.eval_stages():
            m: dict[str, dict[int, float]] = {k: dict(v) for k, v in s.series.items()}
            for ck in s.results.get("checkpoints") or []:
                if isinstance(ck, dict) and isinstance(ck.get("step"), int):
                    for k, v in _flatten(ck.get("metrics") or {}).items():
                        if _finite(v):
                            m.setdefault(k, {})[ck["step"]] = float(v)
            out[s.name] = {k: sorted(v.items()) for k, v in m.items()}
        return out

    def evaluation(self) -> str:
        parts = ["<section id='evaluation'><h2>Evaluation</h2>"]
        stages = self.eval_stages()
        if not stages:
            return (parts[0] + _note("No evaluation results (no stage wrote results.json).")
                    + "</section>")
        points = self.eval_points()
        for s in stages:
            res = s.results
            if len(stages) > 1:
                parts.append(f"<h3>{esc(s.name)}</h3>")
            top = {k: v for k, v in res.items() if k not in RESULTS_NOT_METRICS}
            final = {k: v for k, v in _flatten(top).items() if _finite(v)}
            if final:
                by_t: dict[str, list] = {}
                for k, v in final.items():
                    mt = TIMESTEP_BUCKET.match(k)
                    if mt:
                        by_t.setdefault(mt.group(1), []).append((float(mt.group(2)), v))
                chart = "".join(line_chart(f"{k} by timestep (final)", {k: v}, xlabel="t",
                                           width=400, height=200) for k, v in by_t.items())
                at = f" (step {fmt(res['step'])})" if _finite(res.get("step")) else ""
                parts.append(f"<h3>Final metrics{esc(at)}</h3><div class='cols'>"
                             f"{_kv_table(final)}{chart}</div>")
            skipped = res.get("skipped")
            if isinstance(skipped, dict) and skipped:
                parts.append("<p class='note'>Skipped: " + "; ".join(
                    f"<b>{esc(k)}</b>: {esc(v)}" for k, v in skipped.items()) + "</p>")
            ser = points.get(s.name, {})
            if ser:
                groups: dict[str, dict[str, list]] = {}
                for k, v in sorted(ser.items()):
                    mt = TIMESTEP_BUCKET.match(k)
                    groups.setdefault(f"{mt.group(1)} by timestep" if mt else k, {})[k] = v
                charts = "".join(line_chart(t, g, width=400, height=200,
                                            max_points=self.cfg.max_points)
                                 for t, g in groups.items())
                parts.append(f"<h3>Metrics over training steps</h3>"
                             f"<div class='multiples'>{charts}</div>")
            else:
                parts.append(_note("No per-checkpoint metrics "
                                   "(results.json has no 'checkpoints')."))
            parts.append(self.probes_table(res))
        return "".join(parts) + "</section>"

    def probes_table(self, res: dict) -> str:
        probes = probe_rows(res)
        samples = final_samples(res)
        for p in probes:  # a probe that names its sample by index shows that sample's prompt
            i = p["index"]
            if not p["prompt"] and isinstance(i, int) and 0 <= i < len(samples):
                p["prompt"] = str(samples[i].get("prompt", ""))
        for i, smp in enumerate(samples):  # probes carried on the samples themselves
            probes += [{"name": n, "prompt": str(smp.get("prompt", "")), "passed": ok,
                        "detail": json.dumps(smp["measured"], default=str)
                        if isinstance(smp.get("measured"), dict) else ""}
                       for n, ok in _sample_checks(smp)]
        if not probes:
            return ""
        passed = sum(p["passed"] is True for p in probes)
        body = "".join(
            f"<tr><td>{esc(p['name'])}</td><td>{esc(p['prompt'])}</td>"
            f"<td>{_badge(p['passed'])}</td><td class='detail'>{esc(p['detail'])}</td></tr>"
            for p in probes)
        head = "".join(f"<th>{h}</th>" for h in ("probe", "prompt", "result", "detail"))
        return (f"<h3>Probes: {passed} of {len(probes)} passed</h3><details><summary>Each probe"
                f"</summary><table class='grid'><tr>{head}</tr>{body}</table></details>")

    # -- samples --
    def samples(self) -> str:
        parts = ["<section id='samples'><h2>Samples</h2>"]
        any_video = False
        for s in self.eval_stages() or [x for x in self.run.stages if x.videos]:
            res = s.results or {}
            samples = final_samples(res) or [  # else what the tracker saw
                {"prompt": v.get("caption", ""), "path": v.get("path")} for v in s.videos
                if not str(v.get("path", "")).endswith("grid.mp4")]
            grid = s.dir / str(res.get("grid") or "samples/grid.mp4")
            if grid.exists():
                parts.append(f"<div class='grid-video'><h3>All prompts "
                             f"({esc(s.name)}/{esc(self.rel_to(grid, s.dir))})</h3>"
                             f"{self.video(grid, 'grid')}</div>")
                any_video = True
            probes = probe_rows(res)
            cards = []
            for i, smp in enumerate(samples):
                path = Path(str(smp.get("path") or ""))
                path = path if path.is_absolute() else s.dir / path
                prompt = str(smp.get("prompt") or smp.get("caption") or "")
                checks = [(p["name"], p["passed"]) for p in probes
                          if _probe_matches(p, i, smp, prompt)] + _sample_checks(smp)
                badges = "".join(f"<span class='probe'>{esc(n)} {_badge(ok)}</span>"
                                 for n, ok in checks)
                nums = "".join(f"<span class='step'>{esc(k)} {esc(fmt(v))}</span>"
                               for k, v in smp.items() if k != "index" and _finite(v))
                cards.append(f"<div class='card'>{self.video(path, prompt)}<p class='prompt'>"
                             f"{esc(prompt)}</p>{nums}{badges}</div>")
            if cards:
                any_video = True
                parts.append(f"<div class='cards'>{''.join(cards)}</div>")
            grids = [(ck["step"], s.dir / str(ck["grid"])) for ck in res.get("checkpoints") or []
                     if isinstance(ck, dict) and ck.get("grid") and "step" in ck]
            if len(grids) > 1:
                parts.append("<h3>Over training steps</h3><div class='cards'>" + "".join(
                    f"<div class='card'>{self.video(g, f'step {st}')}<p class='prompt'>step "
                    f"{esc(fmt(st))}</p></div>" for st, g in grids) + "</div>")
        if not any_video:
            parts.append(_note("No sampled videos recorded."))
        return "".join(parts) + "</section>"

    @staticmethod
    def rel_to(path: Path, base: Path) -> str:
        return os.path.relpath(path, base)

    # -- lineage --
    def lineage(self) -> str:
        parts = ["<section id='lineage'><h2>Lineage</h2>"]
        by_name = {s.name: s for s in self.run.stages}
        for s in self.run.stages:
            info = s.info
            rows = {"hash": s.record.get("hash", info.get("hash", "-")),
                    "code version": info.get("version", "-"),
                    "state in this run": s.record.get("state", "-"),
                    "made by run": info.get("run_id", "-"),
                    "started": fmt_time(info.get("started")),
                    "duration": (f"{info['duration_s']:.1f} s"
                                 if _finite(info.get("duration_s")) else "-"),
                    "commit": ((info.get("git") or {}).get("commit") or "-")
                    + (" (dirty)" if (info.get("git") or {}).get("dirty") else ""),
                    "host": info.get("host", "-"),
                    "excluded from hash": ", ".join(info.get("excluded_from_hash") or []) or "-",
                    "versions": ", ".join(f"{k} {v}" for k, v in
                                          (info.get("versions") or {}).items() if v) or "-"}
            track = (info.get("result") or {}).get("tracking") or {}
            for k in ("wandb_id", "wandb_mode", "wandb_url"):
                if track.get(k):
                    rows[k.replace("_", " ")] = track[k]
            inputs = []
            for name, path in (info.get("inputs") or s.record.get("upstream") or {}).items():
                h = (info.get("input_hashes") or {}).get(name)
                up = by_name.get(name)
                ok = up is not None and h is not None and up.record.get("hash") == h
                d = up.dir if up is not None else Path(path)
                inputs.append(f"<tr><td>{esc(name)}</td><td><a href='{esc(self.rel(d))}'>"
                              f"{esc(Path(path).name)}</a></td><td><code>{esc((h or '-')[:12])}"
                              f"</code>{' ✓' if ok else ''}</td></tr>")
            inp = (f"<table class='grid'><tr><th>input</th><th>directory</th><th>hash</th></tr>"
                   f"{''.join(inputs)}</table>" if inputs else _note("no inputs"))
            fail = ""
            if s.failure and s.record.get("state") == "failed":
                fail = (f"<p class='error'>{esc(s.failure.get('error', ''))}</p>"
                        f"<details><summary>Traceback</summary><pre>"
                        f"{esc(s.failure.get('traceback', ''))}</pre></details>")
            missing = "" if s.info else _note(f"no {INFO} in {s.dir}")
            state = s.record.get("state", "-")
            parts.append(
                f"<details class='stage'{' open' if fail or missing else ''}><summary>"
                f"<b>{esc(s.name)}</b> <code>{esc(s.dir.name)}</code> <span class='state "
                f"{esc(state)}'>{esc(state)}</span> {esc(rows['duration'])}, commit "
                f"<code>{esc(rows['commit'][:10])}</code></summary>{missing}{fail}"
                f"<div class='cols'>{_kv_table(rows)}{inp}</div>"
                f"<details><summary>Hashed config</summary>{_pre_json(info.get('config', {}))}"
                f"</details><details><summary>Result</summary>"
                f"{_pre_json(info.get('result', s.record.get('result', {})))}</details></details>")
        return "".join(parts) + "</section>"

    def render(self) -> str:
        sections = [self.header(), self.curation(), self.training(), self.evaluation(),
                    self.samples(), self.lineage()]
        nav = "".join(f"<a href='#{k}'>{k.title()}</a>" for k in
                      ("run", "curation", "training", "evaluation", "samples", "lineage"))
        title = f"spacetime run {self.run.run_id}"
        return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
                f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
                f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
                f"<header><h1>{esc(title)}</h1><nav>{nav}</nav></header><main>"
                f"{''.join(sections)}</main><footer>Written by <code>spacetime report</code> "
                f"at {esc(fmt_time(time.time()))} from the files under {esc(str(self.run.root))}."
                f"</footer><script>{JS}</script></body></html>")


def funnel_chart(stage: StageData) -> str:
    """Counts and hours per curation step. Count percentages are against the first step of the
    same unit (a funnel may start in videos and continue in clips); hours against the first."""
    steps = [r for r in stage.stats["funnel"] if isinstance(r, dict)]
    rows, texts, first = [], [], {}
    first_hours = next((r.get("hours") for r in steps), None)
    for r in steps:
        unit = str(r.get("unit") or "clips")
        count, hours = r.get("count", r.get("clips")), r.get("hours")
        count = count if _finite(count) else float("nan")
        hours = hours if _finite(hours) else float("nan")
        ref_c, ref_h = first.setdefault(unit, count), first_hours
        pct = [f" ({a / b * 100:.0f}%)" if _finite(a) and _finite(b) and b else ""
               for a, b in ((count, ref_c), (hours, ref_h))]
        rows.append((f"{r.get('step', '?')} ({unit})" if "unit" in r else str(r.get("step", "?")),
                     [count, hours]))
        texts.append([f"{fmt(count)} {unit}{pct[0]}", f"{hours:.3g} h{pct[1]}"])
    return bar_chart(f"Funnel ({stage.name}/stats.json)", rows, ["count", "hours"], texts=texts)


RESULTS_NOT_METRICS = ("samples", "checkpoints", "probes", "step", "grid", "prompts", "skipped",
                       "weights")


def final_samples(res: dict) -> list[dict]:
    """results.json's samples, else those of its last checkpoint that has any."""
    samples = [x for x in res.get("samples") or [] if isinstance(x, dict)]
    for ck in reversed(res.get("checkpoints") or []):
        if samples:
            break
        if isinstance(ck, dict):
            samples = [x for x in ck.get("samples") or [] if isinstance(x, dict)]
    return samples


def _is_loss(key: str) -> bool:
    """An overall loss (val/loss), not a per-timestep bucket (val/loss_t0.10)."""
    return key.endswith("loss") and not TIMESTEP_BUCKET.match(key)


def _scalar_items(d: dict) -> dict:
    return {k: v for k, v in _flatten(d).items() if not isinstance(v, (list, dict))}


def _badge(ok: Any) -> str:
    if ok is True:
        return "<span class='badge pass'>pass</span>"
    if ok is False:
        return "<span class='badge fail'>fail</span>"
    return "<span class='badge'>n/a</span>"


def _passed(d: dict) -> Optional[bool]:
    for k in ("passed", "pass", "ok", "success"):
        if isinstance(d.get(k), bool):
            return d[k]
    return None


def probe_rows(results: dict) -> list[dict]:
    """Normalise ``results['probes']``: a list of dicts, or a dict name -> bool | dict."""
    raw = results.get("probes")
    items: list[tuple[str, Any]] = []
    if isinstance(raw, dict):
        items = list(raw.items())
    elif isinstance(raw, list):
        items = [(str(p.get("name") or p.get("probe") or p.get("check") or f"probe {i}")
                  if isinstance(p, dict) else f"probe {i}", p) for i, p in enumerate(raw)]
    rows = []
    for name, p in items:
        d = p if isinstance(p, dict) else {"passed": p}
        detail = {k: v for k, v in d.items() if k not in
                  ("name", "probe", "check", "prompt", "passed", "pass", "ok", "success", "path",
                   "sample", "index")}
        rows.append({"name": str(name), "prompt": str(d.get("prompt") or ""), "passed": _passed(d),
                     "detail": json.dumps(detail, default=str) if detail else "",
                     "index": d.get("index", d.get("sample")), "path": d.get("path")})
    return rows


def _probe_matches(p: dict, i: int, smp: dict, prompt: str) -> bool:
    if p["path"] is not None:
        return str(p["path"]) == str(smp.get("path"))
    if isinstance(p["index"], int):
        return p["index"] == i
    return bool(p["prompt"]) and p["prompt"] == prompt


def _sample_checks(smp: dict) -> list[tuple[str, Optional[bool]]]:
    """Probe results carried on a sample itself: ``passed`` or ``probes`` (dict or list)."""
    out = []
    if isinstance(smp.get("passed"), bool):
        out.append(("probe", smp["passed"]))
    probes = smp.get("probes")
    if isinstance(probes, dict):
        out += [(k, v if isinstance(v, bool) else _passed(v) if isinstance(v, dict) else None)
                for k, v in probes.items()]
    elif isinstance(probes, list):
        out += [(str(p.get("name", "probe")), _passed(p)) for p in probes if isinstance(p, dict)]
    return [(n, ok) for n, ok in out if ok is not None]  # None: the probe did not apply


CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#1f2937;color:#fff;padding:12px 24px;position:sticky;top:0;z-index:1}
header h1{margin:0;font-size:18px}
nav a{color:#cbd5e1;margin-right:16px;text-decoration:none}
main{padding:0 24px 24px}
section{background:#fff;border:1px solid #e5e7eb;border-radius:6px;margin:16px 0;
        padding:8px 16px 16px}
h2{font-size:17px;border-bottom:1px solid #eee;padding-bottom:4px}
h3{font-size:15px;margin:14px 0 6px}
table{border-collapse:collapse;margin:6px 0}
td,th{padding:3px 8px;text-align:left;vertical-align:top}
table.kv th{color:#555;font-weight:500}
table.grid td,table.grid th{border:1px solid #e5e7eb}
table.grid th{background:#f3f4f6}
td.detail{max-width:520px;word-break:break-all;font-size:12px;color:#555}
td.other{background:#fff4e5}
.cols{display:flex;gap:32px;flex-wrap:wrap;align-items:flex-start}
.multiples{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:6px 0}
figcaption{font-weight:600;margin-bottom:2px}
svg.chart{display:block;background:#fff}
svg.chart text{font-size:11px;fill:#444}
svg.chart .label{fill:#777}
svg.chart .grid{stroke:#eee}
svg.chart .axis,svg.chart .tick{stroke:#999}
svg.chart .line{stroke-width:1.6}
.legend span{margin-right:12px;font-size:12px}
.legend i{display:inline-block;width:10px;height:10px;margin-right:4px;vertical-align:middle}
.note{color:#777;font-style:italic}
.error{color:#b91c1c}
.state{padding:1px 6px;border-radius:3px;background:#e5e7eb}
.state.done{background:#d1fae5}
.state.cached{background:#dbeafe}
.state.failed,.state.blocked{background:#fee2e2}
.cards{display:flex;flex-wrap:wrap;gap:14px}
.card{width:260px}
video{width:256px;background:#000;image-rendering:pixelated}
.grid-video video{width:512px}
.prompt{margin:4px 0}
.probe{display:inline-block;margin-right:6px;font-size:12px}
.badge{padding:0 5px;border-radius:3px;background:#e5e7eb;font-size:12px}
.badge.pass{background:#d1fae5;color:#065f46}
.badge.fail{background:#fee2e2;color:#991b1b}
.step{color:#555;font-size:12px;margin-right:6px}
pre{background:#f6f8fa;padding:8px;overflow:auto;max-height:360px;font-size:12px}
details{margin:6px 0}
details.stage{border-top:1px solid #eee;padding-top:4px}
summary{cursor:pointer}
footer{color:#888;font-size:12px;padding:0 24px 24px}
"""

# Marks each video loaded (data-state, data-width) or unplayable (and shows a link to the file).
JS = """
for (const v of document.querySelectorAll('video')) {
  const loaded = () => { v.dataset.state = 'loaded'; v.dataset.width = v.videoWidth; };
  const failed = () => { v.dataset.state = 'error'; const n = v.nextElementSibling;
                         if (n) n.hidden = false; };
  if (v.readyState >= 2) loaded(); else v.addEventListener('loadeddata', loaded);
  if (v.error) failed(); else v.addEventListener('error', failed);
}
"""


def write_report(root: str | Path, cfg: Optional[ReportConfig] = None) -> Path:
    """Write the run's report.html (default under runs/<run_id>/) and return its path."""
    cfg = cfg or ReportConfig()
    run = load_run(root, cfg.run_id)
    out = Path(cfg.out) if cfg.out else run.root / "runs" / run.run_id / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    page = Page(run, cfg, out.parent).render()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    return out
