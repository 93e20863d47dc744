"""The Consistency section: long clips (``eval.long``) probed window by window, plotted against
time: the fraction of clips whose object count, colours, background and direction held from
the first window, the mean colour and background drift, the prompt's probes per window; then
each clip with where it first failed, per stage that wrote long clips into ``results.json``."""

from __future__ import annotations

from pathlib import Path

from pipeline.report.charts import line_chart
from pipeline.report.load import _finite
from pipeline.report.markup import _badge, _kv_table, _note, esc, fmt
from pipeline.report.page import Page
from pipeline.report.results import DRIFTS, WINDOW_KEYS, eval_stages, long_lengths, window_series


def consistency(page: Page) -> str:
    parts = ["<section id='consistency'><h2>Consistency</h2>"]
    stages = [(s, long_lengths(s.results)) for s in eval_stages(page.run)]
    stages = [(s, lengths) for s, lengths in stages if lengths]
    if not stages:
        return parts[0] + _note("No long clips evaluated (eval.long.seconds is empty).") + "</section>"
    for s, lengths in stages:
        long = s.results["long"]
        parts.append(f"<p class='note'>{esc(s.name)}: windows of {esc(fmt(long.get('window_seconds')))} s"
                     f" at {esc(fmt(long.get('fps')))} fps; each point is a window's start. Held: "
                     f"the window agrees with the first one.</p>")
        for ln in lengths:
            parts.append(length_part(page, s.dir, s.results, ln))
    return "".join(parts) + "</section>"


def length_part(page: Page, stage_dir: Path, res: dict, ln: dict) -> str:
    L = f"{ln['seconds']:g}"
    rows = ln["per_window"]
    keys = sorted({k for r in rows if isinstance(r, dict) for k in r})
    held = [k for k in keys if k not in WINDOW_KEYS and k not in DRIFTS and not k.startswith("prompt/")]
    prompt = [k for k in keys if k.startswith("prompt/")]
    charts = [line_chart(f"{L} s: probes held, fraction of clips, by window",
                         window_series(rows, held), xlabel="seconds", width=480, height=240),
              line_chart(f"{L} s: drift from the first window (RGB distance)",
                         window_series(rows, DRIFTS), xlabel="seconds", width=480, height=240)]
    if prompt:
        charts.append(line_chart(f"{L} s: probes of the prompt, fraction of clips, by window",
                                 window_series(rows, prompt), xlabel="seconds", width=480,
                                 height=240))
    metrics = {k: v for k, v in res.items() if k.startswith(f"long/{L}s/") and _finite(v)}
    frames = f", {fmt(ln['frames'])} frames" if _finite(ln.get("frames")) else ""
    return (f"<h3>{esc(L)} s clips{esc(frames)}</h3><div class='cols'>{_kv_table(metrics)}</div>"
            f"<div class='multiples'>{''.join(charts)}</div>{clip_cards(page, stage_dir, ln)}")


def clip_cards(page: Page, stage_dir: Path, ln: dict) -> str:
    """One card per long clip: its video, prompt, whether it stayed consistent and, for each
    probe that failed, the time of the first window where it did."""
    cards = []
    for smp in ln.get("samples") or []:
        if not isinstance(smp, dict):
            continue
        path = Path(str(smp.get("path") or ""))
        path = path if path.is_absolute() else stage_dir / path
        windows = {w.get("window"): w for w in smp.get("windows") or [] if isinstance(w, dict)}
        first = smp.get("first_failure") if isinstance(smp.get("first_failure"), dict) else {}
        failed = [f"{p}: {fmt(windows.get(w, {}).get('start_s', w))} s" for p, w in first.items()
                  if isinstance(w, int)]
        prompt = str(smp.get("prompt") or "")
        cards.append(f"<div class='card'>{page.video(path, prompt)}<p class='prompt'>{esc(prompt)}</p>"
                     f"<span class='probe'>consistent {_badge(smp.get('consistent'))}</span>"
                     + (f"<p class='note'>first failed at {esc('; '.join(failed))}</p>" if failed else "")
                     + "</div>")
    return f"<div class='cards'>{''.join(cards)}</div>" if cards else ""
