"""Experiment tracking: a small Tracker interface with W&B, null, in-memory and JSONL backends.

W&B is the dashboard: one W&B run per stage execution, ``group`` = the run id, ``job_type`` =
the stage, ``config`` = the stage's hashed config. Every tracker made by :func:`make_tracker`
also appends to ``metrics.jsonl`` in the stage output, so the run can be read from the files
alone (reports, tests) whatever the W&B mode.

Mode ``auto`` is online when ``WANDB_API_KEY`` is set in the environment and offline otherwise.
The key is read by wandb itself from the environment; it is never written to a file or a log.

Lineage: each stage's output is a reference artifact ``<stage>-<hash12>`` (type: the stage),
its files without the graph's bookkeeping (``BOOKKEEPING``: the markers and ``info.json``), so
a stage's files are the same artifact whoever logs them. Online, a stage declares its inputs
with ``use_artifact``. W&B refuses ``use_artifact`` offline (wandb 0.31 raises TypeError), so
offline a stage logs each input as that same reference artifact flagged the way
``use_artifact`` flags a draft (``user_created``, ``use_after_commit``): ``wandb sync`` finds the
producer's version by its digest and records the use (wandb-core's artifact saver calls
``useArtifact`` for it), so synced runs show stage-to-stage edges. The inputs stay in the run
config too (``_inputs``).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from data.redact import redact
from data.storage import INFO, MARKERS, has_scheme, local_root

# What the run graph writes into a stage directory about the stage, not as its output; left
# out of the stage's artifact (a stage logged while running would otherwise hold _RUNNING.json)
BOOKKEEPING = MARKERS | {INFO}
# Folders of a stage directory that another system keeps, changing after the stage's own files
# are final: Ray Train's run directory of a training stage (it registers the last checkpoint
# and prunes older ones after rank 0's exports; Ray Train's Result reads them) and its staging.
KEPT_BY_OTHERS = ("checkpoints/", ".staging/")


@dataclass
class TrackingConfig:
    mode: str = "auto"  # auto | online | offline | disabled
    project: str = "spacetime"
    entity: Optional[str] = None
    dir: Optional[str] = None  # W&B writes <dir>/wandb/; default <run.root>
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")


MODES = ("auto", "online", "offline", "disabled")


def resolve_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"tracking.mode must be one of {MODES}, got '{mode}'")
    if mode == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return mode


class Tracker:
    """Interface. Implementations may ignore what they cannot store."""

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None: ...

    def summary(self, values: dict[str, Any]) -> None: ...

    def log_video(self, key: str, path: str, caption: str = "", step: int | None = None) -> None: ...

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None: ...

    def log_image(self, key: str, path: str, caption: str = "") -> None: ...

    def log_histograms(self, hists: dict[str, dict], step: int | None = None) -> None:
        """Histograms already binned: ``{key: {"edges": [n + 1 floats], "counts": [n ints]}}``,
        logged together (one W&B step), so dashboards can plot score distributions."""

    def log_artifact(self, name: str, type: str, path: str) -> None: ...

    def use_artifact(self, name: str, type: str, path: str) -> None: ...

    def info(self) -> dict[str, Any]:
        return {}

    def finish(self, exit_code: int = 0) -> None: ...


class NullTracker(Tracker):
    pass


class MemoryTracker(Tracker):
    """Keeps everything in lists: for tests that assert on what was logged."""

    def __init__(self):
        self.metrics: list[tuple[int | None, dict]] = []
        self.summaries: dict[str, Any] = {}
        self.videos: list[tuple[str, str, str]] = []
        self.images: list[tuple[str, str, str]] = []
        self.tables: dict[str, tuple[list, list]] = {}
        self.histograms: dict[str, dict] = {}
        self.artifacts: list[tuple[str, str, str]] = []
        self.used: list[tuple[str, str, str]] = []
        self.finished = False

    def log(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))

    def summary(self, values):
        self.summaries.update(values)

    def log_video(self, key, path, caption="", step=None):
        self.videos.append((key, path, caption))

    def log_table(self, key, columns, rows):
        self.tables[key] = (columns, rows)

    def log_image(self, key, path, caption=""):
        self.images.append((key, str(path), caption))

    def log_histograms(self, hists, step=None):
        self.histograms.update({k: {"edges": list(h["edges"]), "counts": list(h["counts"])}
                                for k, h in hists.items()})

    def log_artifact(self, name, type, path):
        self.artifacts.append((name, type, path))

    def use_artifact(self, name, type, path):
        self.used.append((name, type, path))

    def finish(self, exit_code=0):
        self.finished = True


class JsonlTracker(Tracker):
    """Appends every call as one JSON line; the file is the offline record of a stage. Not the
    artifact calls: lineage is logged once the output is complete (``_SUCCESS.json``), which it
    must not change; the stage's ``info.json`` holds its inputs and their hashes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _write(self, kind: str, **rec):
        with open(self.path, "a") as f:
            f.write(json.dumps({"kind": kind, "time": time.time(), **rec}, default=str) + "\n")

    def log(self, metrics, step=None):
        self._write("metrics", step=step, metrics=metrics)

    def summary(self, values):
        self._write("summary", values=values)

    def log_video(self, key, path, caption="", step=None):
        self._write("video", key=key, path=str(path), caption=caption, step=step)

    def log_table(self, key, columns, rows):
        self._write("table", key=key, columns=columns, rows=rows)

    def log_image(self, key, path, caption=""):
        self._write("image", key=key, path=str(path), caption=caption)

    def log_histograms(self, hists, step=None):
        self._write("histograms", step=step, histograms=hists)



class WandbTracker(Tracker):
    def __init__(self, *, mode: str, project: str, entity: str | None, dir: str, group: str,
                 job_type: str, name: str, config: dict, tags: list[str], run_id: str):
        import wandb  # lazy: wandb ~1.5 s; CLI start-up 0.1 s, 9 s with eager imports

        self._wandb = wandb
        self.mode = mode
        Path(dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            mode=mode, project=project, entity=entity, dir=dir, group=group, job_type=job_type,
            name=name, config=config, tags=tags, reinit="create_new",
            id=run_id, resume="allow",  # a restarted training worker group continues the run
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
        )

    def log(self, metrics, step=None):
        self.run.log(metrics, step=step)

    def summary(self, values):
        for k, v in values.items():
            self.run.summary[k] = v

    def log_video(self, key, path, caption="", step=None):
        self.run.log({key: self._wandb.Video(str(path), caption=caption, format="mp4")}, step=step)

    def log_table(self, key, columns, rows):
        cols = list(columns)
        data = [[self._wandb.Video(str(c), format="mp4") if isinstance(c, Path) else c for c in r]
                for r in rows]
        self.run.log({key: self._wandb.Table(columns=cols, data=data)})

    def log_image(self, key, path, caption=""):
        self.run.log({key: self._wandb.Image(str(path), caption=caption)})

    def log_histograms(self, hists, step=None):
        import numpy as np  # lazy: numpy ~0.2 s; CLI start-up 0.1 s, 9 s with eager imports

        self.run.log({k: self._wandb.Histogram(np_histogram=(np.asarray(h["counts"]),
                                                             np.asarray(h["edges"])))
                      for k, h in hists.items()}, step=step)

    def _reference(self, name, type, path):
        """A reference artifact of a stage directory's files, without ``BOOKKEEPING`` and
        ``KEPT_BY_OTHERS`` (one reference per file, named by its relative path); a URL is
        referenced whole."""
        art = self._wandb.Artifact(name, type=type)
        if has_scheme(path):
            art.add_reference(str(path), max_objects=100_000)
            return art
        root = Path(path).resolve()
        for f in sorted(p for p in root.rglob("*") if p.is_file()):
            rel = f.relative_to(root).as_posix()
            if rel not in BOOKKEEPING and not rel.startswith(KEPT_BY_OTHERS):
                art.add_reference(f.as_uri(), name=rel)
        return art

    def log_artifact(self, name, type, path):
        self.run.log_artifact(self._reference(name, type, path))

    def use_artifact(self, name, type, path):
        if self.mode == "online":
            self.run.use_artifact(f"{name}:latest")
            return
        # Offline: what use_artifact does with a draft artifact, which it refuses offline. The
        # same files make the same digest as the producer's, so sync links its version.
        self.run._log_artifact(self._reference(name, type, path), is_user_created=True,
                               use_after_commit=True)
        inputs = dict(self.run.config.get("_inputs", {}))
        inputs[name] = str(path)
        self.run.config.update({"_inputs": inputs}, allow_val_change=True)

    def info(self):
        return {"wandb_id": self.run.id, "wandb_dir": str(Path(self.run.dir).parent),
                "wandb_mode": self.mode, "wandb_url": self.run.url if self.mode == "online" else None}

    def finish(self, exit_code=0):
        self.run.finish(exit_code=exit_code)
        # wandb 0.31's finish() can return before its core service has written the run's
        # transaction log (seen on a loaded machine: only the file header). teardown() waits
        # for it, so a worker that exits right after, or a reader in this process, sees the
        # whole run. A process holds one run at a time (one per stage execution, rank 0 only).
        self._wandb.teardown()


class Tee(Tracker):
    """Sends every call to several trackers; info() merges theirs."""

    def __init__(self, *trackers: Tracker):
        self.trackers = trackers

    def log(self, metrics, step=None):
        for t in self.trackers:
            t.log(metrics, step)

    def summary(self, values):
        for t in self.trackers:
            t.summary(values)

    def log_video(self, key, path, caption="", step=None):
        for t in self.trackers:
            t.log_video(key, path, caption, step)

    def log_table(self, key, columns, rows):
        for t in self.trackers:
            t.log_table(key, columns, rows)

    def log_image(self, key, path, caption=""):
        for t in self.trackers:
            t.log_image(key, path, caption)

    def log_histograms(self, hists, step=None):
        for t in self.trackers:
            t.log_histograms(hists, step)

    def log_artifact(self, name, type, path):
        for t in self.trackers:
            t.log_artifact(name, type, path)

    def use_artifact(self, name, type, path):
        for t in self.trackers:
            t.use_artifact(name, type, path)

    def info(self):
        out: dict[str, Any] = {}
        for t in self.trackers:
            out.update(t.info())
        return out

    def finish(self, exit_code=0):
        for t in self.trackers:
            t.finish(exit_code)


@dataclass
class TrackerSpec:
    """Everything needed to open a stage's tracker in another process (e.g. training rank 0)."""

    mode: str
    project: str
    entity: Optional[str]
    dir: str
    group: str
    job_type: str
    name: str
    config: dict
    tags: list[str]
    jsonl: Optional[str]
    run_id: Optional[str] = None  # the W&B run id: stable per stage execution


def make_tracker(spec: TrackerSpec, rank: int = 0) -> Tracker:
    """Rank 0 gets the real tracker; other ranks get a NullTracker (only rank 0 logs)."""
    if rank != 0:
        return NullTracker()
    mode = resolve_mode(spec.mode)
    parts: list[Tracker] = []
    if spec.jsonl:
        parts.append(JsonlTracker(spec.jsonl))
    if mode != "disabled":
        parts.append(WandbTracker(mode=mode, project=spec.project, entity=spec.entity,
                                  dir=spec.dir, group=spec.group, job_type=spec.job_type,
                                  name=spec.name, config=spec.config, tags=spec.tags,
                                  run_id=spec.run_id or f"{spec.name}-{spec.group}"))
    return Tee(*parts) if len(parts) != 1 else parts[0]


def spec_for(ctx, tracking: TrackingConfig, root: str, local_cache: str | None = None
             ) -> TrackerSpec:
    """The tracker spec of a stage execution (``ctx`` is a graph.StageContext). W&B writes
    under the run root, or its local cache when the root is a bucket."""
    return TrackerSpec(
        mode=tracking.mode,
        project=tracking.project,
        entity=tracking.entity,
        dir=str(Path(tracking.dir or local_root(root, local_cache)).resolve()),  # + wandb/
        group=ctx.run_id,
        job_type=ctx.stage.name,
        name=f"{ctx.stage.name}-{ctx.stage_hash[:8]}",
        config=redact({**ctx.hashed_config, "_stage_hash": ctx.stage_hash, "_run_id": ctx.run_id}),
        tags=list(tracking.tags),
        jsonl=str(ctx.out_dir / "metrics.jsonl"),
    )


def log_lineage_paths(tracker: Tracker, stage: str, stage_hash: str, out_dir: str,
                      inputs: dict[str, str]) -> None:
    """Declare a stage's inputs and its output as W&B reference artifacts."""
    for name, path in inputs.items():
        h = json.loads((Path(path) / "_SUCCESS.json").read_text())["hash"]
        tracker.use_artifact(f"{name}-{h[:12]}", name, str(path))
    tracker.log_artifact(f"{stage}-{stage_hash[:12]}", stage, str(out_dir))


def log_lineage(tracker: Tracker, ctx) -> None:
    log_lineage_paths(tracker, ctx.stage.name, ctx.stage_hash, str(ctx.out_dir),
                      {k: str(v) for k, v in ctx.inputs.items()})
