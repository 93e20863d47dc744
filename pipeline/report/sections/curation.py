"""The Curation section: the funnel (counts and hours per step), the counts of ``stats.json``,
the rejects (by stage / reason, and the first rows), and the score histograms (from
``stats.json``, else binned here from ``clips.parquet``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from pipeline.report.charts import bar_chart, histogram_chart
from pipeline.report.load import RunData, StageData, _finite, _flatten, read_table
from pipeline.report.markup import _kv_table, _note, esc, fmt
from pipeline.report.page import Page


def _last(run: RunData, pred) -> Optional[StageData]:
    found = [s for s in run.stages if pred(s)]
    return found[-1] if found else None


def curation(page: Page) -> str:
    parts = ["<section id='curation'><h2>Curation</h2>"]
    funnel_st = _last(page.run, lambda s: isinstance((s.stats or {}).get("funnel"), list))
    if funnel_st:
        parts.append(funnel_chart(funnel_st))
    else:
        parts.append(_note("No curation funnel recorded (no stats.json with a 'funnel')."))
    stats_st = _last(page.run, lambda s: isinstance(s.stats, dict))
    if stats_st:
        flat = {k: v for k, v in _flatten(stats_st.stats).items()
                if not isinstance(v, (list, dict)) and not k.startswith("histograms/")}
        parts.append(f"<details><summary>Counts ({esc(stats_st.name)}/stats.json)</summary>"
                     f"{_kv_table(flat)}</details>")
    parts.append(rejects(page))
    parts.append(histograms(page))
    return "".join(parts) + "</section>"


def rejects(page: Page) -> str:
    st = _last(page.run, lambda s: (s.dir / "rejects.parquet").exists())
    if st is None:
        st2 = _last(page.run, lambda s: isinstance((s.stats or {}).get("reject_reasons"), dict))
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
    n = page.cfg.max_reject_rows
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


def histograms(page: Page) -> str:
    out = ["<h3>Score histograms</h3>"]
    st = _last(page.run, lambda s: isinstance((s.stats or {}).get("histograms"), dict))
    hists: dict[str, tuple[list, list]] = {}
    source = ""
    if st:
        source = f"{st.name}/stats.json"
        for k, h in st.stats["histograms"].items():
            if isinstance(h, dict):
                hists[k] = (list(h.get("edges") or []), list(h.get("counts") or []))
    else:
        st = _last(page.run, lambda s: (s.dir / "clips.parquet").exists())
        if st:
            source = f"{st.name}/clips.parquet (binned here)"
            hists = histograms_from_clips(st.dir / "clips.parquet")
    if not hists:
        return out[0] + _note("No score histograms (no stats.json 'histograms' and no "
                              "clips.parquet with a 'scores' column).")
    out.append(_note(f"From {source}."))
    out.append("<div class='multiples'>" + "".join(
        histogram_chart(k, e, c) for k, (e, c) in sorted(hists.items())) + "</div>")
    return "".join(out)


def histograms_from_clips(path: Path, bins: int = 20) -> dict[str, tuple[list, list]]:
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
