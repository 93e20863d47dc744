"""Reading a run root: ``runs/<run_id>/lineage.json`` and, per stage, its info and markers
(``info.json``, ``_SUCCESS.json``/``_FAILED.json``), ``metrics.jsonl``, ``stats.json`` and
``results.json``; parquet manifests are read on demand (:func:`read_table`)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pyarrow.parquet as pq

from data.redact import redact
from data.storage import FAILED, INFO, SUCCESS, has_scheme


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
    if has_scheme(root):
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
    return pq.read_table(path, columns=columns)
