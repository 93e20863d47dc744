"""The stages of the run graph and how they connect:

    source -> curate -> shard -> train -> eval

Each stage function reads only the config sections it declares (they make its hash), its
upstream stages' output directories, and writes into its own output directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.graph import Graph, Stage, StageContext

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")


def ensure_ray(ctx: StageContext) -> None:
    """Start (or join) Ray once per process, passing the run id to every worker."""
    import ray

    if ray.is_initialized():
        return
    cluster = ctx.section("cluster")
    env = {"SPACETIME_RUN_ID": ctx.run_id}
    for k in ("WANDB_MODE", "HF_HUB_OFFLINE"):  # never the API key: workers inherit the env
        if k in os.environ:
            env[k] = os.environ[k]
    # Inside a submitted Ray job the job's runtime env already sets some of these; Ray refuses
    # to override a job's variables, so send only what differs.
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
    job_env = job.get("runtime_env", {}).get("env_vars", {})
    env = {k: v for k, v in env.items() if job_env.get(k) != v}
    ray.init(address=cluster.address, dashboard_host=cluster.dashboard_host,
             runtime_env={"env_vars": env} if env else None, log_to_driver=True,
             configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = True


# ----- source -------------------------------------------------------------------------------
def source_stage(ctx: StageContext) -> dict:
    cfg = ctx.section("source")
    if cfg.kind == "synthetic":
        from data.synthetic import generate

        rows = generate(cfg, ctx.out_dir)
    elif cfg.kind == "directory":
        root = Path(cfg.path).resolve()
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS)
        rows = []
        for i, p in enumerate(files):
            cap = p.with_suffix(".txt")
            rows.append({"id": f"{p.stem}-{i:06d}", "path": str(p),
                         "caption": cap.read_text().strip() if cap.exists() else ""})
        with open(ctx.out_dir / "manifest.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    else:
        raise ValueError(f"unknown source.kind '{cfg.kind}'")
    ctx.tracker.summary({"source/videos": len(rows)})
    return {"videos": len(rows)}


# ----- curate -------------------------------------------------------------------------------
def curate_stage(ctx: StageContext) -> dict:
    from pipeline.curate import account, load_items, run_curation, write_outputs

    ensure_ray(ctx)
    items = load_items(ctx.inputs["source"])
    clips, rejects = run_curation(items, ctx.section("curate"),
                                  ctx.section("cluster").curate_concurrency)
    stats = account(items, clips, rejects)
    write_outputs(ctx.out_dir, clips, rejects, stats)
    t = ctx.tracker
    t.summary({f"curate/{k}": v for k, v in stats.items() if not isinstance(v, dict)})
    t.log({f"curate/rejects/{k}": v for k, v in stats["reject_reasons"].items()})
    t.log_table("rejects", ["source_id", "stage", "reason", "detail"],
                [[r["source_id"], r["stage"], r["reason"], r["detail"]] for r in rejects])
    return stats


# ----- shard --------------------------------------------------------------------------------
def shard_stage(ctx: StageContext) -> dict:
    from data.shards import read_parquet, write_parquet
    from pipeline.curate import REJECT_SCHEMA
    from pipeline.shard import run_sharding

    ensure_ray(ctx)
    cur = ctx.inputs["curate"]
    clips = read_parquet(cur / "clips.parquet")
    for c in clips:
        c["scores"], c["source"] = json.loads(c["scores"]), json.loads(c["source"])
    res = run_sharding(clips, ctx.section("shard"), ctx.out_dir)
    rejects = read_parquet(cur / "rejects.parquet") + res["failed"]
    if len(res["rows"]) + len(res["failed"]) != len(clips):
        raise RuntimeError(f"sharding lost clips: {len(clips)} in, {len(res['rows'])} sharded, "
                           f"{len(res['failed'])} failed")
    write_parquet(res["rows"], ctx.out_dir / "clips.parquet")
    write_parquet(rejects, ctx.out_dir / "rejects.parquet", schema=REJECT_SCHEMA)
    curate_stats = json.loads((cur / "stats.json").read_text())
    stats = {
        **curate_stats,
        "clips_sharded": len(res["rows"]),
        "clips_encode_failed": len(res["failed"]),
        "shards": {k: len(v) for k, v in res["shards"].items()},
        "clips_per_split": {s: sum(r["split"] == s for r in res["rows"]) for s in ("train", "val")},
        "bytes": int(sum(r["bytes"] for r in res["rows"])),
    }
    (ctx.out_dir / "stats.json").write_text(json.dumps(stats, indent=2))
    (ctx.out_dir / "index.json").write_text(json.dumps(
        {k: [f"shards/{n}" for n in v] for k, v in res["shards"].items()}, indent=2))
    ctx.tracker.summary({"shard/clips": stats["clips_sharded"], "shard/bytes": stats["bytes"],
                         "shard/train_shards": stats["shards"]["train"],
                         "shard/val_shards": stats["shards"]["val"]})
    return stats


def shard_urls(shard_dir: Path, split: str) -> list[str]:
    index = json.loads((shard_dir / "index.json").read_text())
    return [str((shard_dir / p).resolve()) for p in index[split]]


# ----- train --------------------------------------------------------------------------------
def train_stage(ctx: StageContext) -> dict:
    from pipeline.tracking import spec_for
    from training.trainer import run_training

    ensure_ray(ctx)
    run = ctx.section("run")
    urls = shard_urls(ctx.inputs["shard"], "train")
    res = run_training(
        train_cfg=ctx.section("train"), model_cfg=ctx.section("model"),
        ds_cfg=ctx.section("deepspeed"), cluster=ctx.section("cluster"), out_dir=ctx.out_dir,
        train_shards=urls, tracker_spec=spec_for(ctx, ctx.section("tracking"), run.root),
        stage=ctx.stage.name, stage_hash=ctx.stage_hash,
        inputs={k: str(v) for k, v in ctx.inputs.items()},
    )
    res.pop("history", None)
    return res


# ----- eval ---------------------------------------------------------------------------------
def eval_stage(ctx: StageContext) -> dict:
    from training.evaluate import evaluate

    res = evaluate(ctx.section("eval"), ctx.inputs["train"],
                   shard_urls(ctx.inputs["shard"], "val"), ctx.out_dir, ctx.tracker)
    return {k: v for k, v in res.items() if k != "samples"}


# Keys that cannot change a stage's output, excluded from its hash (listed, not implied).
STAGES = [
    Stage("source", source_stage, config_keys=("source",),
          description="generate or list the raw input videos"),
    Stage("curate", curate_stage, inputs=("source",), config_keys=("curate",),
          description="probe, split into shots, score and filter on Ray"),
    Stage("shard", shard_stage, inputs=("curate",), config_keys=("shard",),
          exclude=("shard.max_retries",),
          description="cut, re-encode and pack clips into WebDataset tars"),
    Stage("train", train_stage, inputs=("shard",), config_keys=("model", "train", "deepspeed"),
          exclude=("train.log_every", "train.max_failures"), resumable=True,
          description="train the DiT with DeepSpeed ZeRO on Ray Train workers"),
    Stage("eval", eval_stage, inputs=("train", "shard"), config_keys=("eval",),
          description="validation loss and sampled videos"),
]


def build_graph(root: str | Path) -> Graph:
    return Graph(STAGES, root)
