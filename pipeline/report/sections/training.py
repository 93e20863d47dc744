"""The Training section: loss (with the evaluation's loss overlaid), loss by timestep bucket,
learning rate, MFU, the step time split, every other stepped metric, and the summary."""

from __future__ import annotations

from pipeline.report.charts import line_chart
from pipeline.report.load import RunData, _finite, _flatten
from pipeline.report.markup import _kv_table, _note, esc
from pipeline.report.page import Page
from pipeline.report.results import TIMESTEP_BUCKET, _is_loss, eval_points, eval_stages


def training(page: Page) -> str:
    parts = ["<section id='training'><h2>Training</h2>"]
    trains = [s for s in page.run.stages
              if s.name == "train" or any(k.startswith("train/") for k in s.series)]
    if not trains:
        return parts[0] + _note("No training metrics recorded.") + "</section>"
    evals = eval_points(page.run)
    mp = page.cfg.max_points
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
        parts.append(line_chart("Loss", main, markers=val_loss_points(page.run, evals, last_step),
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


def val_loss_points(run: RunData, evals: dict, last_step: int) -> dict[str, list]:
    """Eval loss on the training-loss chart: per checkpoint, else the final value at the
    last training step (the eval stage evaluates the final weights)."""
    out = {}
    for s in eval_stages(run):
        stepped = {k: v for k, v in evals.get(s.name, {}).items() if _is_loss(k)}
        final = {k: [(last_step, float(v))] for k, v in s.results.items()
                 if _is_loss(k) and _finite(v)}
        for k, v in (stepped or final).items():
            out[f"{k} ({s.name}{'' if stepped else ', final'})"] = v
    return out


def _scalar_items(d: dict) -> dict:
    return {k: v for k, v in _flatten(d).items() if not isinstance(v, (list, dict))}
