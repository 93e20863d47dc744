"""The Evaluation section: final metrics (and by timestep), metrics over training steps, skipped
metrics and the probes table, per stage that wrote ``results.json``."""

from __future__ import annotations

import json

from pipeline.report.charts import line_chart
from pipeline.report.load import _finite, _flatten
from pipeline.report.markup import _badge, _kv_table, _note, esc, fmt
from pipeline.report.page import Page
from pipeline.report.results import (
    RESULTS_NOT_METRICS,
    TIMESTEP_BUCKET,
    _sample_checks,
    eval_points,
    eval_stages,
    final_samples,
    probe_rows,
)


def evaluation(page: Page) -> str:
    parts = ["<section id='evaluation'><h2>Evaluation</h2>"]
    stages = eval_stages(page.run)
    if not stages:
        return (parts[0] + _note("No evaluation results (no stage wrote results.json).")
                + "</section>")
    points = eval_points(page.run)
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
                                        max_points=page.cfg.max_points)
                             for t, g in groups.items())
            parts.append(f"<h3>Metrics over training steps</h3>"
                         f"<div class='multiples'>{charts}</div>")
        else:
            parts.append(_note("No per-checkpoint metrics "
                               "(results.json has no 'checkpoints')."))
        parts.append(probes_table(res))
    return "".join(parts) + "</section>"


def probes_table(res: dict) -> str:
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
