"""Hydra sweeps (``spacetime run -m train.lr=1e-3,2e-3``): each job a run of its own.

Hydra's basic launcher runs a sweep's jobs one after another in one process. Each job gets its
own run id, ``<sweep id>-<job number>`` (the sweep id: ``SPACETIME_RUN_ID`` when set, else a new
one: :func:`pipeline.config.sweep_id`), so its ``lineage.json`` is its own and records the
sweep (``sweep``: id, job, overrides). Hydra's sweep directory is ``<run.root>/sweeps/<sweep
id>/`` (its ``multirun.yaml``, credentials redacted; for a URL root, in the local cache), and
each job writes ``sweeps/<sweep id>/<job>/job.json`` under ``run.root`` (the bucket too) when it
starts.
``spacetime status --sweep [ID]`` reads those back: one row per job with its stages' states
side by side, then the overrides and results that differ between the jobs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from data.redact import redact
from data.storage import INFO, Store
from pipeline.config import sweep_id
from pipeline.provenance import new_run_id

LATEST = "sweeps/latest.json"


def current_job() -> dict | None:
    """This Hydra job's place in its sweep (None outside a multirun): the sweep id, the job
    number, its overrides (credentials redacted) and Hydra's sweep directory."""
    from hydra.core.hydra_config import HydraConfig  # lazy: hydra ~0.4 s; only inside a Hydra job
    from hydra.types import RunMode  # lazy: as above

    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    sweep_dir = Path(hc.runtime.output_dir).parent
    if int(hc.job.num) == 0:
        redact_multirun_yaml(sweep_dir / "multirun.yaml")
    return {"id": sweep_id(), "job": int(hc.job.num), "overrides": redact(list(hc.overrides.task)),
            "dir": str(sweep_dir)}


def redact_multirun_yaml(path: Path) -> None:
    """Hydra saves the sweep's config, as given, before its first job: credentials redacted in
    it as in everything a run writes (data.redact; ``${oc.env:NAME}`` references kept)."""
    if path.exists():
        cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        OmegaConf.save(OmegaConf.create(redact(cfg)), path)


def run_id_for(sweep: dict | None, configured: str | None, env: str | None) -> str:
    """A run's id: a sweep job's ``<sweep id>-<n>``; else ``SPACETIME_RUN_ID`` (`env`), else
    ``run.id`` (`configured`), else a new one. ``run.id`` names one run: refused in a sweep."""
    if sweep is None:
        return env or configured or new_run_id()
    if configured:
        raise ValueError(f"run.id={configured} names one run; a sweep's jobs are <sweep id>-<n> "
                         f"(the sweep id from SPACETIME_RUN_ID, else a new one)")
    return f"{sweep['id']}-{sweep['job']}"


def record_job(store: Store, sweep: dict, run_id: str) -> None:
    """The job's entry in the sweep (written as it starts) and the sweep as the latest."""
    store.write_json_atomic(f"sweeps/{sweep['id']}/{sweep['job']}/job.json",
                            {"sweep_id": sweep["id"], "job": sweep["job"], "run_id": run_id,
                             "overrides": sweep["overrides"]})
    store.write_json_atomic(LATEST, {"sweep_id": sweep["id"]})


def jobs(store: Store, sid: str | None) -> tuple[str, list[dict]]:
    """(the sweep id, its jobs in order, each ``job.json`` with the run's ``lineage`` or None);
    ``sid`` None or "latest": the latest sweep. ValueError naming the known sweeps if none."""
    if sid in (None, "latest"):
        if not store.exists(LATEST):
            raise ValueError(f"no sweeps under {store.url_of('sweeps')} (run `spacetime run -m ...`)")
        sid = store.read_json(LATEST)["sweep_id"]
    nums = sorted((n for n in store.list(f"sweeps/{sid}") if n.isdigit()
                   and store.exists(f"sweeps/{sid}/{n}/job.json")), key=int)
    if not nums:
        known = [s for s in store.list("sweeps") if s != "latest.json"]
        raise ValueError(f"no sweep '{sid}' under {store.url_of('sweeps')}; sweeps: "
                         f"{', '.join(known) or 'none'}")
    out = []
    for n in nums:
        job = store.read_json(f"sweeps/{sid}/{n}/job.json")
        lin = f"runs/{job['run_id']}/lineage.json"
        out.append({**job, "lineage": store.read_json(lin) if store.exists(lin) else None})
    return sid, out


def _state(lineage: dict | None) -> str:
    if lineage is None or "ok" not in lineage:
        return "running"  # or killed: the lineage is written when the run ends
    return "ok" if lineage["ok"] else "failed"


def _numbers(d: Any, prefix: str = "") -> dict[str, float]:
    """The finite numbers of a stage's result, by dotted key (nested dicts flattened)."""
    out: dict[str, float] = {}
    for k, v in (d or {}).items() if isinstance(d, dict) else ():
        if isinstance(v, dict):
            out.update(_numbers(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[f"{prefix}{k}"] = v
    return out


def _results(store: Store, job: dict, stages: list[str]) -> dict[str, float]:
    """`stage.key` -> value of the job's complete stages (their info.json's result)."""
    out: dict[str, float] = {}
    for n in stages:
        rec = ((job["lineage"] or {}).get("stages") or {}).get(n) or {}
        if rec.get("state") not in ("done", "cached"):
            continue
        key = f"stages/{Path(rec['path']).name}/{INFO}"
        if store.exists(key):
            for k, v in _numbers(store.read_json(key).get("result")).items():
                out[f"{n}.{k}"] = v
    return out


def _fmt(v: float) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def table(store: Store, sid: str | None, max_results: int = 8) -> str:
    """The sweep's jobs side by side (what ``spacetime status --sweep`` prints)."""
    sid, js = jobs(store, sid)
    stages: list[str] = []
    for j in js:
        stages += [n for n in ((j["lineage"] or {}).get("stages") or {}) if n not in stages]
    hashes = {n: {((j["lineage"] or {}).get("stages") or {}).get(n, {}).get("hash") for j in js}
              for n in stages}
    changed = [n for n in stages if len(hashes[n]) > 1]
    common = [o for o in js[0]["overrides"] if all(o in j["overrides"] for j in js)]
    lines = [f"sweep {sid}: {len(js)} job{'s' * (len(js) != 1)}  ({store.url_of(f'sweeps/{sid}')})"]
    if common:
        lines.append(f"common overrides: {' '.join(common)}")
    runs = [j["run_id"] for j in js]
    w = max(4, *(len(r) for r in runs))
    cols = [max(len(n) + 1, 8) for n in stages]
    lines.append(f"{'job':<4} {'run':<{w}} {'state':<8} {'time':>8}  "
                 + "".join(f"{n + ('*' if n in changed else ''):<{c}} " for n, c in zip(stages, cols))
                 + "overrides")
    for j in js:
        lin = j["lineage"] or {}
        recs = lin.get("stages") or {}
        took = lin["finished"] - lin["started"] if "finished" in lin else None
        lines.append(f"{j['job']:<4} {j['run_id']:<{w}} {_state(j['lineage']):<8} "
                     f"{f'{took:.1f}s' if took is not None else '-':>8}  "
                     + "".join(f"{recs.get(n, {}).get('state', '-'):<{c}} " for n, c in zip(stages, cols))
                     + " ".join(o for o in j["overrides"] if o not in common))
    if changed:
        lines.append(f"* differs between the jobs (its hash): {', '.join(changed)}")
    res = [_results(store, j, changed) for j in js]
    keys = sorted({k for r in res for k in r})
    differ = [k for k in keys if len({r.get(k) for r in res}) > 1][:max_results]
    if differ:
        lines.append("results that differ:")
        for j, r in zip(js, res):
            lines.append(f"{j['job']:<4} " + "  ".join(f"{k}={_fmt(r[k]) if k in r else '-'}"
                                                       for k in differ))
    return "\n".join(lines)
