"""The run graph: stages, their identities, and an executor that runs what is missing.

A stage's identity is ``name + hash(its config sections, its upstream identities, its code
version)``. Every field of the declared config sections is hashed; the only exclusions are the
dotted keys a stage lists in ``exclude`` (things that cannot change its output, such as worker
counts). Hashes are computed from configuration alone, so ``status`` can tell what is done,
stale or pending without running anything.

Each stage writes into ``<root>/stages/<name>-<hash12>/``. The directory explains itself:

- ``info.json``      resolved config, hashes, upstream paths, git commit, versions, timings
- ``_RUNNING.json``  present while a process works on it (pid, host, run id)
- ``_FAILED.json``   the traceback of the last failed attempt
- ``_SUCCESS.json``  written atomically, last: only its presence marks the output complete

A stage that crashes leaves no ``_SUCCESS.json``; the next run wipes the partial directory and
redoes it. Each ``spacetime run`` also writes ``<root>/runs/<run_id>/lineage.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

SUCCESS = "_SUCCESS.json"
FAILED = "_FAILED.json"
RUNNING = "_RUNNING.json"
INFO = "info.json"


class GraphError(Exception):
    """A problem with the graph or how it was asked to run (raised before any stage starts)."""


class StageFailed(Exception):
    def __init__(self, stage: str, cause: BaseException):
        super().__init__(f"stage '{stage}' failed: {type(cause).__name__}: {cause}")
        self.stage = stage
        self.cause = cause


@dataclass(frozen=True)
class Stage:
    """One node of the graph.

    fn: called with a :class:`StageContext`; returns a JSON-able dict of results (may be empty).
    inputs: names of upstream stages whose outputs it reads.
    config_keys: top-level config sections that define it; all their fields are hashed.
    exclude: dotted keys inside those sections left out of the hash (must not change output).
    version: bump when the stage's code changes what it writes.
    resumable: an unfinished output (crash, preemption) is kept for the stage to resume from,
        instead of being wiped; a forced rerun (--only/--from) still starts clean.
    """

    name: str
    fn: Callable[["StageContext"], Mapping[str, Any] | None]
    inputs: tuple[str, ...] = ()
    config_keys: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    version: int = 1
    resumable: bool = False
    description: str = ""


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def _drop(d: dict, dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        d = d.get(p)
        if not isinstance(d, dict):
            return
    d.pop(leaf, None)


def stable_hash(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class StageContext:
    """What a running stage sees: its config sections, its inputs and its output directory."""

    stage: Stage
    run_id: str
    out_dir: Path
    inputs: dict[str, Path]
    stage_hash: str
    hashed_config: dict
    cfg: Any  # the whole typed config; read it through section()
    tracker_factory: Callable[["StageContext"], Any] | None = None
    _tracker: Any = field(default=None, repr=False)

    # Sections any stage may read without hashing them: they cannot change outputs.
    UNHASHED = ("run", "tracking", "cluster")

    def section(self, key: str) -> Any:
        if key not in self.stage.config_keys and key not in self.UNHASHED:
            raise GraphError(
                f"stage '{self.stage.name}' reads config section '{key}' that is not in its "
                f"hash; add it to the stage's config_keys"
            )
        return getattr(self.cfg, key) if not isinstance(self.cfg, Mapping) else self.cfg[key]

    @property
    def tracker(self):
        """The stage's tracker on the driver, created on first use (one W&B run per execution)."""
        if self._tracker is None:
            if self.tracker_factory is None:
                from pipeline.tracking import NullTracker

                self._tracker = NullTracker()
            else:
                self._tracker = self.tracker_factory(self)
        return self._tracker


@dataclass
class StageStatus:
    name: str
    state: str  # done | cached | pending | stale | failed | running
    hash: str
    path: Path
    duration_s: float | None = None
    detail: str = ""


class Graph:
    def __init__(self, stages: list[Stage], root: str | Path):
        self.stages = {s.name: s for s in stages}
        if len(self.stages) != len(stages):
            raise GraphError("duplicate stage names")
        for s in stages:
            for i in s.inputs:
                if i not in self.stages:
                    raise GraphError(f"stage '{s.name}' has unknown input '{i}'")
        self.order = self._toposort()
        self.root = Path(root).absolute()  # workers in other directories read these paths

    def _toposort(self) -> list[str]:
        order, seen, visiting = [], set(), set()

        def visit(n):
            if n in seen:
                return
            if n in visiting:
                raise GraphError(f"cycle through stage '{n}'")
            visiting.add(n)
            for i in self.stages[n].inputs:
                visit(i)
            visiting.discard(n)
            seen.add(n)
            order.append(n)

        for n in self.stages:
            visit(n)
        return order

    def check_stage(self, name: str | None) -> None:
        if name is not None and name not in self.stages:
            raise GraphError(f"unknown stage '{name}'; stages are: {', '.join(self.order)}")

    def downstream(self, name: str) -> list[str]:
        out = {name}
        for n in self.order:
            if any(i in out for i in self.stages[n].inputs):
                out.add(n)
        return [n for n in self.order if n in out]

    def upstream(self, name: str) -> list[str]:
        out: set[str] = set()
        stack = list(self.stages[name].inputs)
        while stack:
            n = stack.pop()
            if n not in out:
                out.add(n)
                stack.extend(self.stages[n].inputs)
        return [n for n in self.order if n in out]

    # ----- identities -------------------------------------------------------------------
    def hashed_config(self, name: str, cfg: Mapping) -> dict:
        s = self.stages[name]
        section = {k: json.loads(json.dumps(cfg[k], default=str)) for k in s.config_keys}
        for dotted in s.exclude:
            _drop(section, dotted)
        return section

    def hashes(self, cfg: Mapping) -> dict[str, str]:
        """cfg: the resolved config as a plain dict. Returns stage name -> full sha256."""
        out: dict[str, str] = {}
        for n in self.order:
            s = self.stages[n]
            out[n] = stable_hash(
                {
                    "stage": n,
                    "version": s.version,
                    "config": self.hashed_config(n, cfg),
                    "upstream": {i: out[i] for i in s.inputs},
                }
            )
        return out

    def stage_dir(self, name: str, h: str) -> Path:
        return self.root / "stages" / f"{name}-{h[:12]}"

    # ----- status -----------------------------------------------------------------------
    def status(self, cfg: Mapping) -> list[StageStatus]:
        hashes = self.hashes(cfg)
        latest = latest_run(self.root)
        executed = set()
        if latest is not None:
            executed = {n for n, r in latest.get("stages", {}).items() if r.get("state") == "done"}
        rows = []
        for n in self.order:
            d = self.stage_dir(n, hashes[n])
            row = StageStatus(n, "pending", hashes[n], d)
            if (d / SUCCESS).exists():
                ok = read_json(d / SUCCESS)
                row.duration_s = ok.get("duration_s")
                same_run = latest is not None and ok.get("run_id") == latest.get("run_id")
                row.state = "done" if (same_run and n in executed) else "cached"
            elif (d / RUNNING).exists() and _alive(read_json(d / RUNNING)):
                row.state = "running"
            elif (d / FAILED).exists() or (d / RUNNING).exists():
                row.state = "failed"
                if (d / FAILED).exists():
                    row.detail = read_json(d / FAILED).get("error", "")
                else:
                    row.detail = "interrupted (process gone, no completion marker)"
            else:
                others = [
                    p for p in (self.root / "stages").glob(f"{n}-*") if (p / SUCCESS).exists()
                ]
                if others:
                    row.state = "stale"
                    row.detail = f"config or upstream changed since {max(others).name}"
            rows.append(row)
        return rows

    # ----- execution --------------------------------------------------------------------
    def plan(self, cfg: Mapping, only: str | None = None, from_: str | None = None) -> dict[str, str]:
        """Decide for each stage: 'run' (forced or missing), 'cached', or 'skip'."""
        self.check_stage(only)
        self.check_stage(from_)
        if only and from_:
            raise GraphError("use either --only or --from, not both")
        hashes = self.hashes(cfg)
        complete = {n: (self.stage_dir(n, hashes[n]) / SUCCESS).exists() for n in self.order}
        forced: set[str] = set()
        targets = set(self.order)
        if only:
            forced, targets = {only}, {only, *self.upstream(only)}
        elif from_:
            forced = set(self.downstream(from_))
            targets = forced | set(self.upstream(from_))
        plan: dict[str, str] = {}
        for n in self.order:
            if n not in targets:
                plan[n] = "skip"
            elif n in forced or not complete[n]:
                plan[n] = "run"
            else:
                plan[n] = "cached"
        return plan

    def run(
        self,
        cfg: Any,
        cfg_dict: Mapping,
        run_id: str,
        *,
        only: str | None = None,
        from_: str | None = None,
        tracker_factory: Callable[[StageContext], Any] | None = None,
        extra_info: Mapping[str, Any] | None = None,
        log: Callable[[str], None] = print,
    ) -> dict:
        """Run the plan. Returns the lineage record (also written under runs/<run_id>/)."""
        plan = self.plan(cfg_dict, only, from_)
        hashes = self.hashes(cfg_dict)
        run_dir = self.root / "runs" / run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        lineage: dict[str, Any] = {
            "run_id": run_id,
            "started": time.time(),
            "config": cfg_dict,
            **(extra_info or {}),
            "stages": {},
        }
        failure: StageFailed | None = None
        for n in self.order:
            s = self.stages[n]
            d = self.stage_dir(n, hashes[n])
            rec = {
                "hash": hashes[n],
                "path": str(d),
                "upstream": {i: str(self.stage_dir(i, hashes[i])) for i in s.inputs},
            }
            if failure is not None or plan[n] == "skip":
                rec["state"] = "blocked" if failure is not None and plan[n] == "run" else "skipped"
            elif plan[n] == "cached":
                rec["state"] = "cached"
                rec["duration_s"] = read_json(d / SUCCESS).get("duration_s")
                log(f"[{n}] cached  {d}")
            else:
                log(f"[{n}] running -> {d}")
                ctx = StageContext(
                    stage=s,
                    run_id=run_id,
                    out_dir=d,
                    inputs={i: self.stage_dir(i, hashes[i]) for i in s.inputs},
                    stage_hash=hashes[n],
                    hashed_config=self.hashed_config(n, cfg_dict),
                    cfg=cfg,
                    tracker_factory=tracker_factory,
                )
                try:
                    result = self._execute(ctx, extra_info or {}, forced=plan[n] == "run"
                                           and n in self._forced(only, from_))
                    rec.update(state="done", **result)
                    log(f"[{n}] done in {result['duration_s']:.1f}s")
                except StageFailed as e:
                    failure = e
                    rec.update(state="failed", error=str(e.cause))
                    log(f"[{n}] FAILED: {e.cause!r} (see {d / FAILED})")
            lineage["stages"][n] = rec
            write_json_atomic(run_dir / "lineage.json", lineage)
        lineage["finished"] = time.time()
        lineage["ok"] = failure is None
        write_json_atomic(run_dir / "lineage.json", lineage)
        write_json_atomic(self.root / "runs" / "latest.json", {"run_id": run_id})
        if failure is not None:
            raise failure
        return lineage

    def _forced(self, only: str | None, from_: str | None) -> set[str]:
        if only:
            return {only}
        return set(self.downstream(from_)) if from_ else set()

    def _execute(self, ctx: StageContext, extra_info: Mapping[str, Any], forced: bool) -> dict:
        d = ctx.out_dir
        for i, p in ctx.inputs.items():
            if not (p / SUCCESS).exists():
                raise GraphError(f"input '{i}' of stage '{ctx.stage.name}' is not complete: {p}")
        # Remove the marker first: from here on the directory is not complete.
        (d / SUCCESS).unlink(missing_ok=True)
        if d.exists() and (forced or not ctx.stage.resumable):
            shutil.rmtree(d)
        d.mkdir(parents=True, exist_ok=True)
        (d / FAILED).unlink(missing_ok=True)
        write_json_atomic(
            d / RUNNING, {"pid": os.getpid(), "host": socket.gethostname(), "run_id": ctx.run_id}
        )
        info = {
            "stage": ctx.stage.name,
            "hash": ctx.stage_hash,
            "version": ctx.stage.version,
            "run_id": ctx.run_id,
            "config": ctx.hashed_config,
            "excluded_from_hash": list(ctx.stage.exclude),
            "inputs": {i: str(p) for i, p in ctx.inputs.items()},
            "input_hashes": {
                i: read_json(p / SUCCESS).get("hash") for i, p in ctx.inputs.items()
            },
            **extra_info,
        }
        write_json_atomic(d / INFO, info)
        t0 = time.time()
        try:
            result = dict(ctx.stage.fn(ctx) or {})
            if ctx._tracker is not None:
                from pipeline.tracking import log_lineage

                log_lineage(ctx._tracker, ctx)
                result.setdefault("tracking", ctx._tracker.info())
                ctx._tracker.finish()
        except BaseException as e:  # noqa: BLE001 - we record and re-raise everything
            if ctx._tracker is not None:
                try:
                    ctx._tracker.finish(exit_code=1)
                except Exception:  # noqa: BLE001
                    pass
            write_json_atomic(
                d / FAILED,
                {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(),
                 "run_id": ctx.run_id},
            )
            (d / RUNNING).unlink(missing_ok=True)
            raise StageFailed(ctx.stage.name, e) from e
        duration = time.time() - t0
        info.update(started=t0, duration_s=duration, result=result)
        write_json_atomic(d / INFO, info)
        write_json_atomic(
            d / SUCCESS, {"hash": ctx.stage_hash, "run_id": ctx.run_id, "duration_s": duration}
        )
        (d / RUNNING).unlink(missing_ok=True)
        return {"duration_s": duration, "result": result}


def latest_run(root: Path) -> dict | None:
    p = Path(root) / "runs" / "latest.json"
    if not p.exists():
        return None
    lin = Path(root) / "runs" / read_json(p)["run_id"] / "lineage.json"
    return read_json(lin) if lin.exists() else None


def _alive(running: dict) -> bool:
    if running.get("host") != socket.gethostname():
        return True  # cannot tell from here; assume another machine works on it
    try:
        os.kill(int(running["pid"]), 0)
        return True
    except (OSError, ValueError, KeyError):
        return False
