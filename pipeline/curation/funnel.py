"""The curation funnel: how many clips (and hours) survive each step, and score histograms.

Every curation stage (curate, filter, caption, shard) appends its step to the funnel it got
from upstream, so the shard stage's ``stats.json`` holds the whole funnel. ``render_png`` draws
the funnel and the histograms into one PNG for each stage's output; the same numbers go to W&B
(the funnel as a table, the histograms as W&B histograms) and to the run report.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def step(name: str, count: int, seconds: float, unit: str = "clips") -> dict:
    return {"step": name, "count": int(count), "hours": round(float(seconds) / 3600, 6),
            "unit": unit}


def histograms(clips: list[dict], bins: int = 20) -> dict[str, dict]:
    """Per numeric score in ``clip["scores"]``: {"edges": [...], "counts": [...]}."""
    values: dict[str, list[float]] = {}
    for c in clips:
        for k, v in (c.get("scores") or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                values.setdefault(k, []).append(float(v))
    out = {}
    for k, vs in sorted(values.items()):
        counts, edges = np.histogram(np.asarray(vs), bins=bins)
        out[k] = {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}
    return out


def render_png(funnel: list[dict], hists: dict[str, dict], path: Path) -> None:
    import matplotlib  # lazy: matplotlib ~1 s to import, needed only here

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: matplotlib ~1 s to import, needed only here

    n = len(hists)
    cols = 4
    rows = 1 + math.ceil(n / cols)
    fig = plt.figure(figsize=(4 * cols, 3 * rows))
    ax = fig.add_subplot(rows, 1, 1)
    names = [f"{s['step']} ({s['unit']})" for s in funnel]
    counts = [s["count"] for s in funnel]
    bars = ax.barh(names[::-1], counts[::-1], color="#4c72b0")
    for b, s in zip(bars, funnel[::-1]):
        ax.text(b.get_width(), b.get_y() + b.get_height() / 2,
                f" {s['count']} · {s['hours'] * 60:.1f} min", va="center", fontsize=8)
    ax.set_title("curation funnel")
    ax.set_xlim(0, max(counts + [1]) * 1.3)
    for i, (k, h) in enumerate(hists.items()):
        a = fig.add_subplot(rows, cols, cols + i + 1)
        e = np.asarray(h["edges"])
        a.bar(e[:-1], h["counts"], width=np.diff(e), align="edge", color="#55a868")
        a.set_title(k, fontsize=9)
        a.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
