"""Ray Tune over the training stage: ``spacetime tune --grid train.lr=1e-3,3e-3 [overrides]``.

Each trial is one run of the graph up to the training stage (a recipe's last) with the trial's
values as overrides: its own run id (``<sweep id>-<trial id>``, the sweep recorded in its
lineage), its own stage hash and output, and its own Ray Train run. ``training.launch`` adds
Tune's report callback to a Ray Train run started inside a trial, so every checkpoint's metrics
(``train/loss`` and the rest, ``step``) reach Tune as the trial's results; Tune picks the best
trial by ``--metric`` (default ``train/loss``, ``--mode min``).

The stages before training run once, in the driver, before the first trial (the trials find
them done), and trials run one at a time (``--concurrent`` more when the cluster has room for
several Ray Train worker groups). Tune's own experiment directory is ``<run.root>/tune/<sweep
id>`` (``ray.tune.Tuner.restore`` reads it); each trial's outputs are ordinary stages of the run
root, so ``spacetime status``/``report`` and ``eval`` read them like any other run's.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import ray
from hydra import compose, initialize_config_dir
from ray import tune

from data.tracking import make_tracker, spec_for
from pipeline.config import CONF_DIR, register, to_dict, to_object
from pipeline.graph import Graph
from pipeline.provenance import new_run_id
from pipeline.stages import graph_for, train_stage
from training.checkpoint import ray_storage
from training.memory import worker_env

USAGE = """usage: spacetime tune --grid KEY=V1,V2[,...] [--grid ...] [--metric NAME] [--mode min|max]
                      [--concurrent N] [overrides...]

Run the training stage once per combination of the grid values as Ray Tune trials (the stages
before it run once, first). Each trial is a run of its own (run id <sweep>-<trial>); Tune's
results go under <run.root>/tune/<sweep id>.
"""


def parse_tune_argv(argv: list[str]) -> tuple[dict, list[str]]:
    """(flags, Hydra overrides). Raises SystemExit naming a bad flag."""
    flags = {"grid": {}, "metric": "train/loss", "mode": "min", "concurrent": 1}
    rest, it = [], iter(argv)
    for a in it:
        if a in ("-h", "--help"):
            raise SystemExit(USAGE)
        if a in ("--grid", "--metric", "--mode", "--concurrent"):
            value = next(it, None)
            if value is None:
                raise SystemExit(f"spacetime tune: {a} needs a value\n{USAGE}")
            if a == "--grid":
                key, sep, values = value.partition("=")
                if not sep or not values:
                    raise SystemExit(f"spacetime tune: --grid {value!r} is not KEY=V1,V2")
                flags["grid"][key] = values.split(",")
            elif a == "--mode" and value not in ("min", "max"):
                raise SystemExit(f"spacetime tune: --mode must be min or max, got {value!r}")
            else:
                flags[a[2:]] = int(value) if a == "--concurrent" else value
        else:
            rest.append(a)
    if not flags["grid"]:
        raise SystemExit(f"spacetime tune: give at least one --grid KEY=V1,V2\n{USAGE}")
    return flags, rest


def load(overrides: list[str]):
    """The run's config from Hydra's compose API: (typed config, plain dict)."""
    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        dcfg = compose(config_name="config", overrides=overrides)
    return to_object(dcfg), to_dict(dcfg)


def training_stages(graph: Graph) -> list[str]:
    """The graph's training stages, in order (one, or a recipe's)."""
    return [n for n, s in graph.stages.items() if s.fn is train_stage]


def run_graph(cfg, cfg_dict, run_id: str, until: str, extra: dict) -> dict:
    """The graph up to `until` (what is done is skipped), trackers as `spacetime run` makes them."""
    graph = graph_for(cfg)

    def tracker_factory(ctx):
        return make_tracker(spec_for(ctx, cfg.tracking, cfg.run.root, cfg.run.local_cache))

    return graph.run(cfg, cfg_dict, run_id, until=until, tracker_factory=tracker_factory,
                     extra_info=extra)


def trial(params: dict, *, overrides: list[str], sweep_id: str) -> None:
    """One Tune trial (in a Tune actor): the graph up to the last training stage with `params`
    as overrides, under a run id of its own. Tune's metrics come from the training stage's Ray
    Train reports (``training.launch.run_config``)."""
    cfg, cfg_dict = load([*overrides, *(f"{k}={v}" for k, v in params.items())])
    trial_id = tune.get_context().get_trial_id()
    run_id = f"{sweep_id}-{trial_id}"
    os.environ["SPACETIME_RUN_ID"] = run_id
    target = training_stages(graph_for(cfg))[-1]
    run_graph(cfg, cfg_dict, run_id, target,
              {"tune": {"sweep_id": sweep_id, "trial_id": trial_id, "params": params}})


def sweep(grid: dict[str, list[str]], overrides: list[str], *, metric: str = "train/loss",
          mode: str = "min", concurrent: int = 1, sweep_id: str | None = None):
    """Run the trials; returns Tune's ResultGrid. The stages before training run first, once."""
    cfg, cfg_dict = load(overrides)
    if "://" not in str(cfg.run.root):  # the trials' run root, whatever their working directory
        overrides = [*overrides, f"run.root={Path(str(cfg.run.root)).resolve()}"]
    sweep_id = sweep_id or f"tune-{new_run_id()}"
    graph = graph_for(cfg)
    first = training_stages(graph)[0]
    os.environ["SPACETIME_RUN_ID"] = f"{sweep_id}-prepare"
    for name in graph.stages[first].inputs:  # the curated (or latent) shards, shared by all trials
        run_graph(cfg, cfg_dict, f"{sweep_id}-prepare", name, {"tune": {"sweep_id": sweep_id}})
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"  # trials keep the run's working directory
    if not ray.is_initialized():
        env = {k: os.environ[k] for k in ("WANDB_MODE", "HF_HUB_OFFLINE", "RAY_CHDIR_TO_TRIAL_DIR")
               if k in os.environ}
        env.update(worker_env())  # the training workers' allocator setting (training/memory.py)
        ray.init(address=cfg.cluster.address, configure_logging=False,
                 runtime_env={"env_vars": env})
    storage, fs = ray_storage(str(Path(str(cfg.run.root)) / "tune") if "://" not in str(cfg.run.root)
                              else f"{str(cfg.run.root).rstrip('/')}/tune")
    # the trial itself only waits on its Ray Train run: no CPU of its own (Tune wants some
    # resource in a trial's bundle: a byte of memory)
    trainable = tune.with_resources(partial(trial, overrides=overrides, sweep_id=sweep_id),
                                    {"CPU": 0, "memory": 1})
    tuner = tune.Tuner(
        trainable,
        param_space={k: tune.grid_search(v) for k, v in grid.items()},
        tune_config=tune.TuneConfig(metric=metric, mode=mode, max_concurrent_trials=concurrent),
        run_config=tune.RunConfig(name=sweep_id, storage_path=storage, storage_filesystem=fs),
    )
    return tuner.fit()


def main(argv: list[str]) -> int:
    flags, overrides = parse_tune_argv(argv)
    grid = sweep(flags["grid"], overrides, metric=flags["metric"], mode=flags["mode"],
                 concurrent=flags["concurrent"])
    best = grid.get_best_result()
    print(f"\nsweep: {len(grid)} trials, {grid.num_errors} failed; best by {flags['metric']} "
          f"({flags['mode']}):")
    for r in sorted(grid, key=lambda r: str(r.config)):
        mark = "*" if r.path == best.path else " "
        value = (r.metrics or {}).get(flags["metric"])
        print(f" {mark} {r.config}  {flags['metric']}={value}  {r.path}")
    if ray.is_initialized():
        ray.shutdown()
    return 1 if grid.num_errors else 0
