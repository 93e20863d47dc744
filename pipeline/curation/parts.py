"""Resumable, streaming work over many items on Ray: the unit of progress is a *part*.

A curation stage over millions of videos must not redo finished work when its driver dies.
Items are cut into fixed groups (in a deterministic order, so the same inputs always give the
same groups); each group is one Ray task (CPU work) or one call on a pool of Ray actors
(model work), returned to the driver, which writes the group's records to
``parts/part-NNNNNN.jsonl`` atomically as they stream in. When the stage runs again (the graph
keeps a resumable stage's unfinished directory), groups whose part file exists are skipped,
so finished work is not redone and, since a part is written whole or not at all, no record is
duplicated or lost. ``parts/_groups.json`` records how the items were cut (group size and a
digest of the items); parts cut another way (say ``curate.group_size`` changed, which is not in
the stage hash) are discarded rather than mixed in.

Model work can have a CPU step in front (``prepare``, e.g. decoding frames) run as tasks, so
GPU actors never wait on decoding; its result travels to the actor with the group. Actor pools
are sized by `actor_pool`: as configured, capped by the GPUs the cluster has.

Records go back to the driver rather than being written by the workers, so the workers need no
shared filesystem for this (only the bulky outputs, shards, are written where they run).
A bounded number of groups is in flight at a time (backpressure), and a task or actor lost to a
worker or node failure is retried a bounded number of times (Ray Core's ``max_retries``,
``max_restarts``/``max_task_retries``; Ray Data's map calls take those only through their
``**ray_remote_args``, deprecated since Ray 2.60).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional


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


def resolve_num_gpus(requested: float | None, cluster_resources: dict) -> float:
    """GPUs per model actor: as configured, else one when the cluster has any GPU."""
    if requested is not None:
        return float(requested)
    return 1.0 if cluster_resources.get("GPU", 0) > 0 else 0.0


def actor_pool(concurrency: Optional[int], num_gpus: Optional[float], cluster_resources: dict,
               key: str = "model") -> tuple[int, float]:
    """(actors, GPUs per actor) of a model actor pool.

    concurrency: actors wanted; None = as many as the cluster's GPUs hold (1 without GPUs).
    num_gpus: per actor; None = 1 when the cluster has GPUs, else 0. A GPU pool never asks for
    more GPUs than the cluster has (Ray Data would wait for them forever); ``key`` names the
    config section in the error when not even one actor fits. The cluster is read now, so an
    autoscaling cluster's GPU nodes must be up.
    """
    gpus = resolve_num_gpus(num_gpus, cluster_resources)
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"{key}.concurrency must be >= 1 (or null), got {concurrency}")
    if gpus <= 0:
        return (concurrency or 1), 0.0
    fit = int(cluster_resources.get("GPU", 0) // gpus)
    if fit < 1:
        raise ValueError(f"{key}.num_gpus={gpus:g} per actor, but the cluster has "
                         f"{cluster_resources.get('GPU', 0):g} GPUs")
    return (fit if concurrency is None else min(concurrency, fit)), gpus


def _run_group(row: dict, fn: Callable[[list[dict]], list[dict]]) -> dict:
    return {"index": row["index"], "out": json.dumps(fn(json.loads(row["items"])))}


def _prepare_group(row: dict, fn: Callable[[list[dict]], Any]) -> Any:
    return fn(json.loads(row["items"]))


class _GroupActor:
    """A Ray actor: builds its callable once (``factory()``, retried ``init_retries`` times when
    it raises, e.g. a hub timeout loading a model) and runs it over one group per call:
    ``fn(items)``, or ``fn(items, prepared)`` after a ``prepare`` step (run by a task before,
    or, given `prepare`, here)."""

    def __init__(self, factory: Callable[[], Callable[..., list[dict]]], init_retries: int,
                 prepare: Callable[[list[dict]], Any] | None = None):
        self.prepare = prepare
        for attempt in range(init_retries + 1):
            try:
                self.fn = factory()
                break
            except Exception:
                if attempt == init_retries:
                    raise

    def run(self, row: dict, *prepared: Any) -> dict:
        items = json.loads(row["items"])
        if self.prepare is not None:
            prepared = (self.prepare(items),)
        return {"index": row["index"], "out": json.dumps(self.fn(items, *prepared))}


def _check_groups(parts_dir: Path, items: list[dict], group_size: int, log) -> None:
    """Keep the finished parts only if they were cut from the same items the same way."""
    digest = hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()
    want = {"group_size": group_size, "items": len(items), "digest": digest}
    meta = parts_dir / "_groups.json"
    if meta.exists() and json.loads(meta.read_text()) != want:
        old = list(parts_dir.glob("part-*.jsonl"))
        log(f"parts in {parts_dir} were cut differently ({json.loads(meta.read_text())}); "
            f"discarding {len(old)}")
        for p in old:
            p.unlink()
    if not meta.exists() or json.loads(meta.read_text()) != want:
        tmp = meta.with_name(f".{meta.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(want))
        os.replace(tmp, meta)


def run_parts(
    items: list[dict],
    fn: Callable[[list[dict]], list[dict]] | None,
    parts_dir: Path,
    *,
    group_size: int,
    concurrency: int,
    actor_factory: Callable[[], Callable[..., list[dict]]] | None = None,
    prepare: Callable[[list[dict]], Any] | None = None,
    num_gpus: float = 0,
    actor_init_retries: int = 0,
    log: Callable[[str], None] = print,
    name: str = "parts",
    unit: str = "items",
    max_retries: int = 3,
    on_lost: Callable[[dict, str], dict] | None = None,
) -> dict[str, Any]:
    """Process `items` in groups; returns counts. Records are read back with `read_parts`.

    fn: a plain function (CPU work, run as Ray tasks), or actor_factory: builds a callable once
    per actor of a pool of `concurrency` actors (model work; `num_gpus` per actor), called as
    ``fn(group)``, or as ``fn(group, prepare(group))`` with `prepare`, which runs first as CPU
    tasks. actor_init_retries: how often an actor whose constructor raised (a hub timeout
    loading a model, say) is retried before the run fails.

    A task whose worker dies is retried `max_retries` times (Ray Data's default is forever,
    which turns one input that kills its worker into a run that never ends). With `on_lost`
    (tasks only), a group that still fails is run again one item per task, and an item that
    fails alone too becomes ``on_lost(item, why)``, a record like the ones `fn` returns; the
    run goes on. Without it, such a group stops the run with an error.
    """
    parts_dir.mkdir(parents=True, exist_ok=True)
    _check_groups(parts_dir, items, group_size, log)
    groups = groups_of(items, group_size)
    todo = [i for i in range(len(groups)) if not part_path(parts_dir, i).exists()]
    done_before = len(groups) - len(todo)
    if done_before:
        log(f"{name}: {done_before} of {len(groups)} parts already done, resuming")
    t0 = time.time()
    if todo:
        rows = [{"index": i, "items": json.dumps(groups[i])} for i in todo]
        total = sum(len(groups[i]) for i in todo)
        done, every = 0, max(1, len(todo) // 10)
        stream = _stream(rows, fn, concurrency, actor_factory, prepare, num_gpus,
                         actor_init_retries, max_retries,
                         tolerate=on_lost is not None and actor_factory is None)
        for k, row in enumerate(stream, 1):  # streams: each part written on arrival
            i = int(row["index"])
            write_part(part_path(parts_dir, i), json.loads(row["out"]))
            done += len(groups[i])
            if k % every == 0 or k == len(todo):
                log(f"{name}: {done}/{total} {unit}, {done / max(time.time() - t0, 1e-9):.2f} "
                    f"{unit}/s")
    missing = [i for i in range(len(groups)) if not part_path(parts_dir, i).exists()]
    if missing and on_lost is not None and actor_factory is None:
        _recover(groups, missing, fn, parts_dir, concurrency, max_retries, on_lost, log, name)
        missing = [i for i in range(len(groups)) if not part_path(parts_dir, i).exists()]
    if missing:
        raise RuntimeError(f"{name}: {len(missing)} parts never came back: {missing[:5]}")
    log(f"{name}: {len(todo)} parts ({sum(len(groups[i]) for i in todo)} {unit}) in "
        f"{time.time() - t0:.1f}s; {done_before} reused")
    return {"parts": len(groups), "parts_run": len(todo), "parts_reused": done_before}


def tasks_in_flight(concurrency: int) -> int:
    """Tasks submitted at once for a CPU task pool of `concurrency`.

    When the pool is as wide as the cluster (or wider), the cluster's CPUs already cap the
    tasks that run, so twice as many are submitted: the extra ones wait in the raylet's queue
    and start the moment a CPU frees, instead of after a round trip through the driver
    (measured on 2 CPUs, 1.2 s tasks, when Ray Data's streaming executor was that driver:
    ~0.3 s idle between tasks, 13% of the run, against ~0.02 s queued). On a larger cluster
    the pool's own size is the cap.
    """
    import ray  # lazy: ray ~1.7 s (ray.train ~4.7 s) to import, needed only here

    cpus = int(ray.cluster_resources().get("CPU", 0)) if ray.is_initialized() else 0
    return 2 * concurrency if 0 < cpus <= concurrency else concurrency


def _stream(rows: list[dict], fn, concurrency: int, actor_factory, prepare, num_gpus: float,
            actor_init_retries: int, max_retries: int, tolerate: bool) -> Iterator[dict]:
    """The groups as Ray tasks (or calls on a pool of actors), streamed back as they finish.
    With `tolerate`, groups that fail after their retries are left out instead of failing.

    Ray Core, not Ray Data: the retry bound on a lost worker is a Ray Core task/actor option
    (``max_retries``, ``max_restarts``/``max_task_retries``) that Ray Data's map calls accept
    only through ``**ray_remote_args``, deprecated in Ray 2.60 and removed in 2.64, and no named
    parameter or DataContext setting replaces it (Ray Data's own default retries forever)."""
    import ray  # lazy: ray ~1.7 s (ray.train ~4.7 s) to import, needed only here

    if actor_factory is None:
        task = ray.remote(num_cpus=1, max_retries=max_retries)(_run_group)
        fn_ref = ray.put(fn)
        yield from _bounded(rows, lambda row, _: task.remote(row, fn_ref),
                            [None] * tasks_in_flight(concurrency), tolerate)
        return
    actor = ray.remote(num_cpus=1, num_gpus=num_gpus, max_restarts=max_retries,
                       max_task_retries=max_retries)(_GroupActor)
    # Without GPUs the actors prepare their own groups: a separate CPU task would compete with
    # the actors for the same CPUs (and never start when the actors hold them all).
    fused = prepare if num_gpus == 0 else None
    pool = [actor.remote(actor_factory, actor_init_retries, fused) for _ in range(concurrency)]
    prep = ray.remote(num_cpus=1, max_retries=max_retries)(_prepare_group)
    prep_ref = ray.put(prepare) if prepare is not None and fused is None else None

    def submit(row: dict, a):
        # the prepared group travels to the actor as an object ref: Ray runs the CPU task
        # first and hands the actor its result, so GPU actors never wait on decoding
        extra = () if prep_ref is None else (prep.remote(row, prep_ref),)
        return a.run.remote(row, *extra)

    try:
        # two groups per actor: the next one's inputs arrive while the current one runs
        yield from _bounded(rows, submit, [a for _ in range(2) for a in pool], tolerate)
    finally:
        for a in pool:
            ray.kill(a)  # frees the models' (GPU) memory now, not when the driver exits


def _bounded(rows: list[dict], submit, slots: list, tolerate: bool) -> Iterator[dict]:
    """Submit each row to a free slot (a worker: None for plain tasks, or an actor), at most
    one in flight per slot, and yield the results as they finish."""
    import ray  # lazy, as above

    free, flight, todo = list(slots), {}, iter(rows)
    try:
        while True:
            while free and (row := next(todo, None)) is not None:
                slot = free.pop(0)
                flight[submit(row, slot)] = slot
            if not flight:
                return
            [ref], _ = ray.wait(list(flight), num_returns=1)
            free.append(flight.pop(ref))
            try:
                out = ray.get(ref)
            except ray.exceptions.RayError:  # a worker lost more often than retried, or fn raised
                if not tolerate:
                    raise
                continue
            yield out
    finally:  # failed, or the caller stopped reading: nothing left running for this run
        for ref in flight:
            ray.cancel(ref)


def _recover(groups, missing, fn, parts_dir: Path, concurrency: int, max_retries: int,
             on_lost, log, name: str) -> None:
    """Groups that failed as a whole, again one item per task: one bad item loses only
    itself."""
    log(f"{name}: {len(missing)} parts failed after {max_retries} retries; "
        "running their items one by one")
    singles = [{"index": k, "items": json.dumps([item])}
               for k, item in enumerate(it for i in missing for it in groups[i])]
    got: dict[int, list[dict]] = {}
    for row in _stream(singles, fn, concurrency, None, None, 0, 0, max_retries, tolerate=True):
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
