"""The run graph: stages, their identities, and an executor that runs what is missing.

A stage's identity is ``name + hash(its config sections, its upstream identities, its code
version)``. Every field of the declared config sections is hashed; the only exclusions are the
dotted keys a stage lists in ``exclude`` (things that cannot change its output, such as worker
counts). A stage may also carry ``overrides`` merged over its sections and ``settings`` of its
own, both hashed (a recipe's training stages: :mod:`pipeline.recipe`). Hashes are computed from
configuration alone, so ``status`` can tell what is done, stale or pending without running
anything.

Each stage writes into ``<root>/stages/<name>-<hash12>/``. The directory explains itself:

- ``info.json``      resolved config, hashes, upstream paths, git commit, versions, timings
                     (credentials redacted, as in lineage.json: :mod:`data.redact`)
- ``_RUNNING.json``  present while a process works on it (pid, host, run id)
- ``_FAILED.json``   the traceback of the last failed attempt
- ``_SUCCESS.json``  written atomically, last: only its presence marks the output complete

A stage that crashes leaves no ``_SUCCESS.json``; the next run wipes the partial directory and
redoes it. Each ``spacetime run`` also writes ``<root>/runs/<run_id>/lineage.json``.

``root`` is a local (or shared) directory, or an object-store URL (``s3://bucket/prefix``,
``gs://...``; see :mod:`data.storage`). With a URL the same layout lives in the bucket: the
graph keeps its state there (markers, info, lineage, latest) and a stage still reads and writes
local files. It runs in a staging directory ``<local_cache>/<scheme>/<bucket/prefix>/stages/
<name>-<hash12>/``, and on success its files are uploaded first, ``info.json`` next and
``_SUCCESS.json`` last, each marker in one atomic PUT, so nothing in the bucket looks complete
before it is. Upstream outputs are downloaded into the same cache when the cached copy is not
the one the bucket's ``_SUCCESS.json`` names (the copy carries that marker, written last).
``StageContext.input_urls`` gives stages the upstream locations in the bucket, to stream large
data (shards) from there instead. A resumable stage whose staging directory is empty (a new
machine) starts from what its last attempt uploaded: it uploads its files when it fails.
"""

from __future__ import annotations

import dataclasses
import fnmatch
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

from omegaconf import OmegaConf

from data.redact import redact, scrub, secret_values
from data.storage import (  # noqa: F401 (re-exported)
    FAILED,
    FETCHING,
    INFO,
    MARKERS,
    PARTIAL,
    RUNNING,
    SUCCESS,
    URL,
    Store,
    local_root,
    read_json,
    write_json_atomic,
)
from data.tracking import NullTracker, log_lineage


class GraphError(Exception):
    """A problem with the graph or how it was asked to run (raised before any stage starts)."""


class StageFailed(Exception):
    def __init__(self, stage: str, cause: BaseException):
        super().__init__(f"stage '{stage}' failed: {type(cause).__name__}: {cause}")
        self.stage = stage
        self.cause = cause

    def __reduce__(self):  # copied and pickled whole (Ray Tune copies a trial's error)
        return (type(self), (self.stage, self.cause))

@dataclass(frozen=True)
class Stage:
    """One node of the graph.

    fn: called with a :class:`StageContext`; returns a JSON-able dict of results (may be empty).
    inputs: names of upstream stages whose outputs it reads.
    config_keys: config sections that define it; all their fields are hashed. A dotted key
        (``"model.text"``) declares a subsection alone: the stage hashes, and may read, only
        that part of its section (it appears nested in the hashed config, ``{"model": {"text":
        ...}}``).
    exclude: dotted keys inside those sections left out of the hash (must not change output).
    unset: dotted keys left out of the hash while unset (None or empty): an option added later
        leaves the hash of every config that does not use it as it was.
    version: bump when the stage's code changes what it writes.
    resumable: an unfinished output (crash, preemption) is kept for the stage to resume from,
        instead of being wiped; a forced rerun (--only/--from) still starts clean.
    stream: fnmatch patterns of upstream files (relative to an input's directory, e.g.
        ``"shards/*"``) the stage reads from ``ctx.input_urls`` instead of ``ctx.inputs``;
        with a URL root they are not downloaded.
    overrides: nested values merged over the config's sections for this stage alone, keyed by
        section (``{"train": {"num_frames": 4}}``, a recipe's stage: :mod:`pipeline.recipe`);
        its hash and ``ctx.section()`` see the merged sections (a list replaces a list). Only
        sections in ``config_keys`` may be overridden.
    settings: the stage's own parameters (JSON-able), hashed with its config (under
        ``"settings"``; none: nothing added, so a stage without any hashes as before); read
        them as ``ctx.stage.settings``.
    """

    name: str
    fn: Callable[["StageContext"], Mapping[str, Any] | None]
    inputs: tuple[str, ...] = ()
    config_keys: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    unset: tuple[str, ...] = ()
    version: int = 1
    resumable: bool = False
    description: str = ""
    stream: tuple[str, ...] = ()
    overrides: Mapping[str, Any] = field(default_factory=dict, hash=False)
    settings: Mapping[str, Any] = field(default_factory=dict, hash=False)


def _drop(d: dict, dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        d = d.get(p)
        if not isinstance(d, dict):
            return
    d.pop(leaf, None)


def _get(cfg: Any, dotted: str) -> Any:
    """cfg.a.b for "a.b", on a typed config or a plain mapping."""
    for k in dotted.split("."):
        cfg = cfg[k] if isinstance(cfg, Mapping) else getattr(cfg, k)
    return cfg


def _get_or_none(d: Any, dotted: str) -> Any:
    for k in dotted.split("."):
        if not isinstance(d, Mapping) or k not in d:
            return None
        d = d[k]
    return d


def _put(d: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        d = d.setdefault(p, {})
    d[leaf] = value


def _sub(overrides: Mapping, dotted: str) -> Any:
    """The part of a stage's overrides that falls on a (sub)section, or None."""
    for k in dotted.split("."):
        if not isinstance(overrides, Mapping) or k not in overrides:
            return None
        overrides = overrides[k]
    return overrides


def _deep_merge(base: Any, over: Any) -> Any:
    """`over` merged into a plain `base`: mappings key by key, anything else (lists) replaced."""
    if not (isinstance(base, Mapping) and isinstance(over, Mapping)):
        return over
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if k in out else v
    return out


def _merged(value: Any, over: Any) -> Any:
    """A typed config section (a dataclass: rebuilt and checked by OmegaConf) or a plain value
    with `over` merged in."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(value), over))
    return _deep_merge(value, over)


def _plain(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def stable_hash(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class StageContext:
    """What a running stage sees: its config sections, its inputs and its output directory.

    ``out_dir`` and ``inputs`` are always local directories. ``out_url`` and ``input_urls`` are
    where they live in the run's storage: the same paths (as strings) for a local root, URLs in
    the bucket for a URL root (stream big inputs from there; files written to ``out_url``
    directly are part of the output too).
    """

    stage: Stage
    run_id: str
    out_dir: Path
    inputs: dict[str, Path]
    stage_hash: str
    hashed_config: dict
    cfg: Any  # the whole typed config; read it through section()
    tracker_factory: Callable[["StageContext"], Any] | None = None
    _tracker: Any = field(default=None, repr=False)
    input_urls: dict[str, str] = field(default_factory=dict)
    out_url: str = ""

    def __post_init__(self):
        self.out_url = self.out_url or str(self.out_dir)
        self.input_urls = self.input_urls or {k: str(v) for k, v in self.inputs.items()}

    # Sections any stage may read without hashing them: they cannot change outputs.
    UNHASHED = ("run", "tracking", "cluster")

    def section(self, key: str) -> Any:
        """A config section (``"latent"``) or subsection (``"model.text"``) the stage hashes."""
        parts = key.split(".")
        prefixes = {".".join(parts[: i + 1]) for i in range(len(parts))}
        if not prefixes & {*self.stage.config_keys, *self.UNHASHED}:
            raise GraphError(
                f"stage '{self.stage.name}' reads config section '{key}' that is not in its "
                f"hash; add it to the stage's config_keys"
            )
        value = _get(self.cfg, key)
        over = _sub(self.stage.overrides, key)
        return value if over is None else _merged(value, over)

    @property
    def tracker(self):
        """The stage's tracker on the driver, created on first use (one W&B run per execution)."""
        if self._tracker is None:
            if self.tracker_factory is None:
                self._tracker = NullTracker()
            else:
                self._tracker = self.tracker_factory(self)
        return self._tracker


@dataclass
class StageStatus:
    name: str
    state: str  # done | cached | pending | stale | failed | running
    hash: str
    path: Path | URL
    duration_s: float | None = None
    detail: str = ""


class Graph:
    """stages: the nodes. root: a directory or URL for outputs and run records. local_cache:
    where a URL root's stages run and its outputs are cached (default $TMPDIR/spacetime-cache).
    """

    def __init__(self, stages: list[Stage], root: str | Path,
                 local_cache: str | Path | None = None):
        self.stages = {s.name: s for s in stages}
        if len(self.stages) != len(stages):
            raise GraphError("duplicate stage names")
        for s in stages:
            for i in s.inputs:
                if i not in self.stages:
                    raise GraphError(f"stage '{s.name}' has unknown input '{i}'")
            for k in s.overrides:
                if not any(c == k or c.startswith(f"{k}.") for c in s.config_keys):
                    raise GraphError(f"stage '{s.name}' overrides section '{k}' that is not in "
                                     f"its config_keys")
        self.order = self._toposort()
        self.store = Store(root)
        # Workers in other directories read these paths: a local root is made absolute.
        self.root = URL(self.store.url) if self.store.remote else Path(self.store.path)
        self.local_root = local_root(self.store, local_cache)
        self._secrets: set[str] = set()  # the running config's credentials (data.redact)

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
        section: dict = {}
        for k in s.config_keys:  # a dotted key nests: "model.text" -> {"model": {"text": ...}}
            value = _plain(_get(cfg, k))
            over = _sub(s.overrides, k)
            _put(section, k, value if over is None else _deep_merge(value, _plain(over)))
        for dotted in s.exclude:
            _drop(section, dotted)
        for dotted in s.unset:
            if _get_or_none(section, dotted) in (None, {}, []):
                _drop(section, dotted)
        if s.settings:
            section["settings"] = _plain(s.settings)
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

    @staticmethod
    def stage_key(name: str, h: str) -> str:
        return f"stages/{name}-{h[:12]}"

    def stage_dir(self, name: str, h: str) -> Path | URL:
        """Where a stage's output lives in the run's storage (a Path, or a URL)."""
        return self.root / self.stage_key(name, h)

    def local_dir(self, name: str, h: str) -> Path:
        """Where a stage runs and its output is read locally (stage_dir for a local root)."""
        return self.local_root / self.stage_key(name, h)

    # ----- status -----------------------------------------------------------------------
    def status(self, cfg: Mapping) -> list[StageStatus]:
        hashes = self.hashes(cfg)
        st = self.store
        latest = latest_run(st)
        executed = set()
        if latest is not None:
            executed = {n for n, r in latest.get("stages", {}).items() if r.get("state") == "done"}
        stage_dirs = st.list("stages")
        rows = []
        for n in self.order:
            key = self.stage_key(n, hashes[n])
            row = StageStatus(n, "pending", hashes[n], self.stage_dir(n, hashes[n]))
            if st.exists(f"{key}/{SUCCESS}"):
                ok = st.read_json(f"{key}/{SUCCESS}")
                row.duration_s = ok.get("duration_s")
                same_run = latest is not None and ok.get("run_id") == latest.get("run_id")
                row.state = "done" if (same_run and n in executed) else "cached"
            elif st.exists(f"{key}/{RUNNING}") and _alive(st.read_json(f"{key}/{RUNNING}")):
                row.state = "running"
            elif st.exists(f"{key}/{FAILED}") or st.exists(f"{key}/{RUNNING}"):
                row.state = "failed"
                if st.exists(f"{key}/{FAILED}"):
                    row.detail = st.read_json(f"{key}/{FAILED}").get("error", "")
                else:
                    row.detail = "interrupted (process gone, no completion marker)"
            else:
                others = [d for d in stage_dirs
                          if d.startswith(f"{n}-") and st.exists(f"stages/{d}/{SUCCESS}")]
                if others:
                    row.state = "stale"
                    row.detail = f"config or upstream changed since {max(others)}"
            rows.append(row)
        return rows

    # ----- execution --------------------------------------------------------------------
    def plan(self, cfg: Mapping, only: str | None = None, from_: str | None = None,
             until: str | None = None) -> dict[str, str]:
        """Decide for each stage: 'run' (forced or missing), 'cached', or 'skip'.

        only: force one stage (and run what is missing upstream); from_: force a stage and
        everything downstream; until: run what is missing up to a stage, forcing nothing (so
        an unfinished resumable stage resumes)."""
        for s in (only, from_, until):
            self.check_stage(s)
        if sum(x is not None for x in (only, from_, until)) > 1:
            raise GraphError("use one of --only, --from and --until")
        hashes = self.hashes(cfg)
        complete = {n: self.store.exists(f"{self.stage_key(n, hashes[n])}/{SUCCESS}")
                    for n in self.order}
        forced: set[str] = set()
        targets = set(self.order)
        if only:
            forced, targets = {only}, {only, *self.upstream(only)}
        elif from_:
            forced = set(self.downstream(from_))
            targets = forced | set(self.upstream(from_))
        elif until:
            targets = {until, *self.upstream(until)}
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
        until: str | None = None,
        tracker_factory: Callable[[StageContext], Any] | None = None,
        extra_info: Mapping[str, Any] | None = None,
        log: Callable[[str], None] = print,
    ) -> dict:
        """Run the plan. Returns the lineage record (also written under runs/<run_id>/)."""
        plan = self.plan(cfg_dict, only, from_, until)
        hashes = self.hashes(cfg_dict)
        self._secrets = secret_values(cfg_dict)  # scrubbed from error messages it writes
        lineage_key = f"runs/{run_id}/lineage.json"
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
                rec["duration_s"] = self.store.read_json(
                    f"{self.stage_key(n, hashes[n])}/{SUCCESS}").get("duration_s")
                log(f"[{n}] cached  {d}")
            else:
                log(f"[{n}] running -> {d}")
                ctx = StageContext(
                    stage=s,
                    run_id=run_id,
                    out_dir=self.local_dir(n, hashes[n]),
                    inputs={i: self.local_dir(i, hashes[i]) for i in s.inputs},
                    stage_hash=hashes[n],
                    hashed_config=self.hashed_config(n, cfg_dict),
                    cfg=cfg,
                    tracker_factory=tracker_factory,
                    input_urls={i: str(self.stage_dir(i, hashes[i])) for i in s.inputs},
                    out_url=str(d),
                )
                try:
                    result = self._execute(ctx, extra_info or {}, hashes,
                                           forced=n in self._forced(only, from_))
                    rec.update(state="done", **result)
                    log(f"[{n}] done in {result['duration_s']:.1f}s")
                except StageFailed as e:
                    failure = e
                    rec.update(state="failed", error=scrub(str(e.cause), self._secrets))
                    log(f"[{n}] FAILED: {scrub(repr(e.cause), self._secrets)} (see {d / FAILED})")
            lineage["stages"][n] = rec
            self.store.write_json_atomic(lineage_key, redact(lineage))
        lineage["finished"] = time.time()
        lineage["ok"] = failure is None
        self.store.write_json_atomic(lineage_key, redact(lineage))
        self.store.write_json_atomic("runs/latest.json", {"run_id": run_id})
        if failure is not None:
            raise failure
        return lineage

    def _forced(self, only: str | None, from_: str | None) -> set[str]:
        if only:
            return {only}
        return set(self.downstream(from_)) if from_ else set()

    def _execute(self, ctx: StageContext, extra_info: Mapping[str, Any],
                 hashes: Mapping[str, str], forced: bool) -> dict:
        st, remote = self.store, self.store.remote
        key = self.stage_key(ctx.stage.name, ctx.stage_hash)
        d = ctx.out_dir
        input_keys = {i: self.stage_key(i, hashes[i]) for i in ctx.stage.inputs}
        for i, k in input_keys.items():
            if not st.exists(f"{k}/{SUCCESS}"):
                raise GraphError(f"input '{i}' of stage '{ctx.stage.name}' is not complete: "
                                 f"{ctx.input_urls[i]}")
        # Remove the marker first: from here on the output is not complete.
        st.rm(f"{key}/{SUCCESS}")
        fresh = forced or not ctx.stage.resumable
        if fresh:
            st.rm(key)
        if remote:
            for m in MARKERS:
                (d / m).unlink(missing_ok=True)
            if fresh:
                shutil.rmtree(d, ignore_errors=True)
            elif not (d.is_dir() and any(d.iterdir())):  # resume on a new machine
                st.get_dir(key, d, select=lambda f: f not in MARKERS and f != INFO)
            for i, k in input_keys.items():
                self._fetch(k, ctx.inputs[i], ctx.stage.stream)
        d.mkdir(parents=True, exist_ok=True)
        st.rm(f"{key}/{FAILED}")
        st.write_json_atomic(
            f"{key}/{RUNNING}",
            {"pid": os.getpid(), "host": socket.gethostname(), "run_id": ctx.run_id},
        )
        info = {
            "stage": ctx.stage.name,
            "hash": ctx.stage_hash,
            "version": ctx.stage.version,
            "run_id": ctx.run_id,
            "config": ctx.hashed_config,
            "excluded_from_hash": list(ctx.stage.exclude),
            "inputs": dict(ctx.input_urls),
            "input_hashes": {
                i: st.read_json(f"{k}/{SUCCESS}").get("hash") for i, k in input_keys.items()
            },
            **extra_info,
        }
        st.write_json_atomic(f"{key}/{INFO}", redact(info))
        t0 = time.time()
        try:
            result = dict(ctx.stage.fn(ctx) or {})
            if ctx._tracker is not None:
                result.setdefault("tracking", ctx._tracker.info())
        except BaseException as e:  # noqa: BLE001 - we record and re-raise everything
            if ctx._tracker is not None:
                try:
                    ctx._tracker.finish(exit_code=1)
                except Exception:  # noqa: BLE001
                    pass
            failed = {"error": scrub(f"{type(e).__name__}: {e}", self._secrets),
                      "traceback": scrub(traceback.format_exc(), self._secrets),
                      "run_id": ctx.run_id}
            if remote and ctx.stage.resumable:  # what the next attempt, anywhere, resumes from
                try:
                    st.put_dir(d, key, select=lambda f: f not in MARKERS and f != INFO)
                except Exception as up:  # noqa: BLE001 - the stage's own error comes first
                    failed["upload_error"] = f"{type(up).__name__}: {up}"
            st.write_json_atomic(f"{key}/{FAILED}", redact(failed))
            st.rm(f"{key}/{RUNNING}")
            raise StageFailed(ctx.stage.name, e) from e
        duration = time.time() - t0
        info.update(started=t0, duration_s=duration, result=result)
        ok = {"hash": ctx.stage_hash, "run_id": ctx.run_id, "duration_s": duration}
        if remote:  # files first, then info.json, then the marker
            st.put_dir(d, key, select=lambda f: f not in MARKERS and f != INFO)
            write_json_atomic(d / INFO, redact(info))
        st.write_json_atomic(f"{key}/{INFO}", redact(info))
        st.write_json_atomic(f"{key}/{SUCCESS}", ok)
        if remote:
            # The local copy is that output, or (if the stage wrote files to out_url directly)
            # a part of it that a later download completes.
            whole = not st.missing(key, d, select=lambda f: f not in MARKERS)
            write_json_atomic(d / (SUCCESS if whole else FETCHING), ok)
        st.rm(f"{key}/{RUNNING}")
        if ctx._tracker is not None:  # the output is complete: its artifact is what it holds
            self._log_lineage(ctx)
        return {"duration_s": duration, "result": result}

    def _log_lineage(self, ctx: StageContext) -> None:
        """The stage's inputs and output as W&B artifacts, then its tracker closed. The output
        is complete and stays so: a tracking error is printed, it does not fail the stage."""
        try:
            log_lineage(ctx._tracker, ctx)
        except Exception as e:  # noqa: BLE001 - W&B's own errors, whatever they are
            print(f"[{ctx.stage.name}] W&B lineage not logged: {scrub(repr(e), self._secrets)}")
        ctx._tracker.finish()

    def _fetch(self, key: str, local: Path, stream: tuple[str, ...] = ()) -> None:
        """Make ``local`` a copy of the complete output at ``key`` (a URL root's upstream),
        leaving out the files matching ``stream``.

        The copy is identified by the ``_SUCCESS.json`` it was made from (written last): kept
        if it matches the bucket's and left out nothing now needed, completed if it or an
        unfinished download is of the same output, else replaced.
        """
        ok = self.store.read_json(f"{key}/{SUCCESS}")
        done, pending, partial = local / SUCCESS, local / FETCHING, local / PARTIAL
        if done.exists() and read_json(done) == ok:
            left_out = read_json(partial) if partial.exists() else []
            if set(left_out) <= set(stream):
                return
        elif local.exists() and not (pending.exists() and read_json(pending) == ok):
            shutil.rmtree(local)
        local.mkdir(parents=True, exist_ok=True)
        write_json_atomic(pending, ok)
        self.store.get_dir(key, local, select=lambda f: f not in MARKERS
                           and not any(fnmatch.fnmatch(f, p) for p in stream))
        if self.store.read_json(f"{key}/{SUCCESS}") != ok:
            raise GraphError(f"{self.store.url_of(key)} was rewritten while being downloaded")
        if stream:
            write_json_atomic(partial, sorted(stream))
        else:
            partial.unlink(missing_ok=True)
        write_json_atomic(done, ok)
        pending.unlink()


def latest_run(root: str | Path | Store) -> dict | None:
    st = root if isinstance(root, Store) else Store(root)
    if not st.exists("runs/latest.json"):
        return None
    lin = f"runs/{st.read_json('runs/latest.json')['run_id']}/lineage.json"
    return st.read_json(lin) if st.exists(lin) else None


def _alive(running: dict) -> bool:
    if running.get("host") != socket.gethostname():
        return True  # cannot tell from here; assume another machine works on it
    try:
        os.kill(int(running["pid"]), 0)
        return True
    except (OSError, ValueError, KeyError):
        return False
