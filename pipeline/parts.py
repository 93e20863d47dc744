"""Resumable, streaming work over many items on Ray: the unit of progress is a *part*.

A curation stage over millions of videos must not redo finished work when its driver dies.
Items are cut into fixed groups (in a deterministic order, so the same inputs always give the
same groups); each group is one Ray Data row, processed by a task (CPU work) or an actor
(model work) and returned to the driver, which writes the group's records to
``parts/part-NNNNNN.jsonl`` atomically as they stream in. When the stage runs again (the graph
keeps a resumable stage's unfinished directory), groups whose part file exists are skipped,
so finished work is not redone and, since a part is written whole or not at all, no record is
duplicated or lost.

Records go back to the driver rather than being written by the workers, so the workers need no
shared filesystem for this (only the bulky outputs, shards, are written where they run).
Ray Data streams the groups with backpressure, retries tasks lost to worker or node failures
(a bounded number of times) and shows progress bars.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator


def groups_of(items: list[dict], size: int) -> list[list[dict]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def part_path(parts_dir: Path, index: int) -> Path:
    return parts_dir / f"part-{index:06d}.jsonl"


def write_part(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)


def read_parts(parts_dir: Path) -> Iterator[dict]:
    for p in sorted(parts_dir.glob("part-*.jsonl")):
        for line in p.read_text().splitlines():
            if line:
                yield json.loads(line)


def _run_group(row: dict, fn: Callable[[list[dict]], list[dict]]) -> dict:
    return {"index": row["index"], "out": json.dumps(fn(json.loads(row["items"])))}


class _ActorGroup:
    """Runs an actor's callable (built once per actor) over one group per call."""

    def __init__(self, factory: Callable[[], Callable[[list[dict]], list[dict]]]):
        self.fn = factory()

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        outs = [json.dumps(self.fn(json.loads(s))) for s in batch["items"]]
        return {"index": batch["index"], "out": np.array(outs, dtype=object)}


def run_parts(
    items: list[dict],
    fn: Callable[[list[dict]], list[dict]] | None,
    parts_dir: Path,
    *,
    group_size: int,
    concurrency: int,
    actor_factory: Callable[[], Callable[[list[dict]], list[dict]]] | None = None,
    num_gpus: float = 0,
    log: Callable[[str], None] = print,
    name: str = "parts",
    max_retries: int = 3,
    on_lost: Callable[[dict, str], dict] | None = None,
) -> dict[str, Any]:
    """Process `items` in groups; returns counts. Records are read back with `read_parts`.

    fn: a plain function (CPU work, run as Ray tasks), or actor_factory: builds a callable once
    per actor of a pool of `concurrency` actors (model work; `num_gpus` per actor).

    A task whose worker dies is retried `max_retries` times (Ray Data's default is forever,
    which turns one input that kills its worker into a run that never ends). With `on_lost`
    (tasks only), a group that still fails is run again one item per task, and an item that
    fails alone too becomes ``on_lost(item, why)``, a record like the ones `fn` returns; the
    run goes on. Without it, such a group stops the run with an error.
    """
    parts_dir.mkdir(parents=True, exist_ok=True)
    groups = groups_of(items, group_size)
    todo = [i for i in range(len(groups)) if not part_path(parts_dir, i).exists()]
    done_before = len(groups) - len(todo)
    if done_before:
        log(f"{name}: {done_before} of {len(groups)} parts already done, resuming")
    t0 = time.time()
    if todo:
        rows = [{"index": i, "items": json.dumps(groups[i])} for i in todo]
        for row in _stream(rows, fn, concurrency, actor_factory, num_gpus, max_retries,
                           tolerate=on_lost is not None and actor_factory is None):
            write_part(part_path(parts_dir, int(row["index"])), json.loads(row["out"]))
    missing = [i for i in range(len(groups)) if not part_path(parts_dir, i).exists()]
    if missing and on_lost is not None and actor_factory is None:
        _recover(groups, missing, fn, parts_dir, concurrency, max_retries, on_lost, log, name)
        missing = [i for i in range(len(groups)) if not part_path(parts_dir, i).exists()]
    if missing:
        raise RuntimeError(f"{name}: {len(missing)} parts never came back: {missing[:5]}")
    log(f"{name}: {len(todo)} parts ({sum(len(groups[i]) for i in todo)} items) in "
        f"{time.time() - t0:.1f}s; {done_before} reused")
    return {"parts": len(groups), "parts_run": len(todo), "parts_reused": done_before}


def _stream(rows: list[dict], fn, concurrency: int, actor_factory, num_gpus: float,
            max_retries: int, tolerate: bool) -> Iterator[dict]:
    """The groups through Ray Data, streamed back as they finish. With `tolerate`, groups
    that fail after their retries are left out instead of failing the whole dataset."""
    import ray

    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    if tolerate:  # this dataset's own context (later operators copy it): nothing global
        ds.context.max_errored_blocks = len(rows)
    if actor_factory is not None:
        ds = ds.map_batches(_ActorGroup, fn_constructor_kwargs={"factory": actor_factory},
                            batch_size=1, num_gpus=num_gpus,
                            compute=ray.data.ActorPoolStrategy(size=concurrency),
                            max_restarts=max_retries, max_task_retries=max_retries)
    else:
        ds = ds.map(_run_group, fn_kwargs={"fn": fn}, num_cpus=1,
                    compute=ray.data.TaskPoolStrategy(size=concurrency),
                    max_retries=max_retries)
    yield from ds.iter_rows()  # streams: each part is written as soon as it arrives


def _recover(groups, missing, fn, parts_dir: Path, concurrency: int, max_retries: int,
             on_lost, log, name: str) -> None:
    """Groups that failed as a whole, again one item per task: one bad item loses only
    itself."""
    log(f"{name}: {len(missing)} parts failed after {max_retries} retries; "
        "running their items one by one")
    singles = [{"index": k, "items": json.dumps([item])}
               for k, item in enumerate(it for i in missing for it in groups[i])]
    got: dict[int, list[dict]] = {}
    for row in _stream(singles, fn, concurrency, None, 0, max_retries, tolerate=True):
        got[int(row["index"])] = json.loads(row["out"])
    k = 0
    n = max_retries + 1
    why = f"its worker died or failed {n} time{'s' if n > 1 else ''}, alone and in its group"
    for i in missing:
        records = []
        for item in groups[i]:
            records += got[k] if k in got else [on_lost(item, why)]
            k += 1
        write_part(part_path(parts_dir, i), records)
