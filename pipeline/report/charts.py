"""The SVG chart kit: round axis ticks, thinned series, and line, bar and histogram charts, each
a ``<figure>`` with an inline ``<svg class="chart" data-chart=KIND data-marks=N>``."""

from __future__ import annotations

import math
from typing import Iterable

from pipeline.report.load import _finite
from pipeline.report.markup import esc, fmt

PALETTE = ("#3b6fd4", "#e0663a", "#3aa26b", "#9b59b6", "#c9a227", "#17a2b8", "#d6457a",
           "#6c757d", "#8c564b", "#2f4f4f")


def fmt_tick(v: float) -> str:
    """Axis labels stay short: 1.72G, 25k, 8000, 0.0003."""
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= max(div, 1e4):
            return f"{v / div:.3g}{suffix}"
    return f"{v:.4g}"


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
