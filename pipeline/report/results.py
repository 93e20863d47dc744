"""What ``results.json`` (an evaluation stage's output) means to the report: which stages are
evaluations, their metrics per checkpoint, their final samples, and probe results in either
shape (a list of dicts, or a dict name -> bool | dict; also carried on the samples)."""

from __future__ import annotations

import json
import re
from typing import Any, Optional

from pipeline.report.load import RunData, StageData, _finite, _flatten

TIMESTEP_BUCKET = re.compile(r"^(.*)_t(\d+(?:\.\d+)?)(?:-\d+(?:\.\d+)?)?$")  # loss_t0.25-0.50
RESULTS_NOT_METRICS = ("samples", "checkpoints", "probes", "step", "grid", "prompts", "skipped",
                       "weights", "long")
WINDOW_KEYS = ("window", "start_s", "end_s")  # a per-window row's place in time, not a measure
DRIFTS = ("color_drift", "background_drift")


def long_lengths(res: dict) -> list[dict]:
    """results.json's long clips (``long.lengths``: seconds, frames, samples, per_window), those
    that have a per-window curve."""
    long = res.get("long")
    lengths = long.get("lengths") if isinstance(long, dict) else None
    return [ln for ln in lengths or [] if isinstance(ln, dict) and _finite(ln.get("seconds"))
            and isinstance(ln.get("per_window"), list) and ln["per_window"]]


def window_series(rows: list[dict], keys) -> dict[str, list[tuple[float, float]]]:
    """key -> [(window start in seconds, value)] over per-window rows, finite values only."""
    out: dict[str, list[tuple[float, float]]] = {}
    for k in keys:
        pts = [(float(r["start_s"]), float(r[k])) for r in rows
               if isinstance(r, dict) and _finite(r.get("start_s")) and _finite(r.get(k))]
        if pts:
            out[k] = pts
    return out


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


def eval_stages(run: RunData) -> list[StageData]:
    return [s for s in run.stages if isinstance(s.results, dict)]


def eval_points(run: RunData) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """stage -> metric -> [(step, value)]: results.json checkpoints, then stepped metrics."""
    out = {}
    for s in eval_stages(run):
        m: dict[str, dict[int, float]] = {k: dict(v) for k, v in s.series.items()}
        for ck in s.results.get("checkpoints") or []:
            if isinstance(ck, dict) and isinstance(ck.get("step"), int):
                for k, v in _flatten(ck.get("metrics") or {}).items():
                    if _finite(v):
                        m.setdefault(k, {})[ck["step"]] = float(v)
        out[s.name] = {k: sorted(v.items()) for k, v in m.items()}
    return out
