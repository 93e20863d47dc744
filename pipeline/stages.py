"""The stages of the run graph and how they connect:

    source -> curate -> shard -> train -> eval

With a recipe (``recipe=<name>``, :mod:`pipeline.recipe`) ``train`` is a chain of training
stages named by the recipe, each starting from the one before it, and eval evaluates the last:
``shard -> train_short -> train_long -> eval``.

Each stage function reads only the config sections it declares (they make its hash), its
upstream stages' output directories, and writes into its own output directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from data.shards import write_parquet
from data.storage import has_scheme, local_root
from data.synthetic import generate
from data.tracking import spec_for
from pipeline.curation.caption import caption_clips
from pipeline.curation.curate import (
    CurateConfigs,
    account,
    clip_seconds,
    dedup_priority,
    read_clips,
    read_rejects,
    reject,
    run_curate,
    run_model_scores,
    write_outputs,
    write_rejects,
)
from pipeline.curation.dedup import find_near_duplicates
from pipeline.curation.funnel import histograms, render_png, step
from pipeline.curation.ingest import is_image_shard, is_manifest, list_inputs
from pipeline.curation.parts import actor_pool
from pipeline.curation.scores import apply_filters
from pipeline.curation.shard import run_sharding, wids_index
from pipeline.graph import Graph, GraphError, Stage, StageContext
from pipeline.recipe import entries
from training.evaluation.evaluate import evaluate
from training.latent.precompute import precompute_latents
from training.latent.vae_train import train_vae
from training.launch import run_training
from training.text import text_frozen


def ensure_ray(ctx: StageContext) -> None:
    """Start (or join) Ray once per process, passing the run id to every worker, and print
    where its dashboard is (`dashboard_line`).

    Ray Train's workers get ``RAY_TRAIN_ENABLE_PRINT_PATCH=0`` (unless it is set): Ray Train
    replaces ``print`` in its workers with one that writes each line both to the worker's
    stdout and through its logger to stderr, and Ray forwards both, so every line showed twice."""
    import ray  # lazy: ray ~1.7 s (ray.train ~4.7 s) to import, needed only here

    if ray.is_initialized():
        return
    cluster = ctx.section("cluster")
    env = {"SPACETIME_RUN_ID": ctx.run_id,
           "RAY_TRAIN_ENABLE_PRINT_PATCH": os.environ.get("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")}
    for k in ("WANDB_MODE", "HF_HUB_OFFLINE"):  # never the API key: workers inherit the env
        if k in os.environ:
            env[k] = os.environ[k]
    # Inside a submitted Ray job the job's runtime env already sets some of these; Ray refuses
    # to override a job's variables, so send only what differs.
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
    job_env = job.get("runtime_env", {}).get("env_vars", {})
    env = {k: v for k, v in env.items() if job_env.get(k) != v}
    info = ray.init(address=cluster.address, dashboard_host=cluster.dashboard_host,
                    runtime_env={"env_vars": env} if env else None, log_to_driver=True,
                    configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = True
    print(dashboard_line(cluster.address, info.dashboard_url), flush=True)


def dashboard_line(address: str | None, url: str | None) -> str:
    """What `ensure_ray` prints once Ray is up: the dashboard's URL (a local Ray's, started
    here, or the joined cluster's), or why there is none and how to get one."""
    where = "started a local Ray" if address is None else f"joined the Ray cluster at {address}"
    if url:
        return f"ray: {where}; dashboard at {url if '://' in url else 'http://' + url}"
    how = ("install ray[default] (pip install 'ray[default]') for a local one" if address is None
           else "start the head with `ray start --head --include-dashboard=true`")
    return f"ray: {where}; no dashboard: {how}"


# ----- source -------------------------------------------------------------------------------
def source_stage(ctx: StageContext) -> dict:
    """The inputs as a manifest (inputs.jsonl): generated (synthetic) or listed (ingest)."""
    cfg = ctx.section("source")
    warnings: list[str] = []
    if cfg.kind == "synthetic":
        items = synthetic_items(generate(cfg, ctx.out_dir), ctx.out_dir)
    elif cfg.kind in ("ingest", "directory"):  # directory: source.path, the older spelling
        ing = ctx.section("ingest")
        if cfg.kind == "directory":
            ing = dataclasses.replace(ing, inputs=[cfg.path])
        items = ingest_items(ing, warnings)
    else:
        raise ValueError(f"unknown source.kind '{cfg.kind}' (synthetic | ingest)")
    with open(ctx.out_dir / "inputs.jsonl", "w") as f:
        f.writelines(json.dumps(i) + "\n" for i in items)
    for w in warnings:
        print(f"source: warning: {w}")
    refused = sum("reject" in i for i in items)
    ctx.tracker.summary({"source/videos": len(items), "source/refused": refused,
                         "source/warnings": len(warnings)})
    # Refused items stay inputs: the curate stage records each as a reject with its reason.
    return {"videos": len(items), "refused": refused, "warnings": warnings}


def synthetic_items(rows: list[dict], out_dir: Path) -> list[dict]:
    """The curation items of the synthetic source's manifest rows (`data.synthetic.generate`):
    its stills (``source.stills``) are items of kind image, as ingest makes of image files."""
    return [{"id": r["id"], "url": str((out_dir / r["path"]).resolve()),
             "caption": r["caption"], "license": "synthetic", "source_url": None,
             "shots": r["shots"],
             "meta": {"synthetic": {k: r[k] for k in ("bad_kind", "expected", "cuts")},
                      "caption_origin": "synthetic"},
             **({"kind": "image"} if r.get("kind") == "image" else {})}
            for r in rows]


def ingest_items(ing, warnings: list[str] | None = None) -> list[dict]:
    """`list_inputs`, input by input, recording in each captioned item's metadata where its
    caption came from (``caption_origin``: ``manifest`` or ``sidecar``, a ``.txt`` beside the
    video) unless its manifest row says so itself. Same items, same order (first listing of a
    URL wins). What the listings could not look into is appended to `warnings`."""
    if not ing.inputs:
        return list_inputs(ing)  # raises, naming the key
    items, seen = [], set()
    for spec in ing.inputs:
        origin = ("manifest" if is_manifest(spec) else "shard" if is_image_shard(spec)
                  else "sidecar")
        for it in list_inputs(dataclasses.replace(ing, inputs=[spec]), warnings):
            if it["url"] in seen:
                continue
            seen.add(it["url"])
            if it["caption"]:
                it["meta"].setdefault("caption_origin", origin)
            items.append(it)
    return items


def load_inputs(source_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (source_dir / "inputs.jsonl").read_text().splitlines()
            if line.strip()]


def _log_curation(ctx: StageContext, stats: dict, rejects: list[dict], clips: list[dict]) -> None:
    """What every curation stage (curate, filter, caption, shard) leaves: its kept clips' score
    histograms in ``stats``, ``funnel.png`` (the funnel so far and the histograms) in its
    output, and the same to its tracker: counts, reject reasons, the funnel and rejects tables,
    the histograms as real histograms (``<stage>/hist/<score>``) and the PNG
    (``funnel_chart``)."""
    stats["histograms"] = histograms(clips)
    render_png(stats["funnel"], stats["histograms"], ctx.out_dir / "funnel.png")
    t = ctx.tracker
    name = ctx.stage.name
    t.summary({f"{name}/{k}": v for k, v in stats.items() if isinstance(v, (int, float))})
    t.log({f"{name}/rejects/{k}": v for k, v in stats["reject_reasons"].items()})
    t.log_table("funnel", ["step", "count", "unit", "hours"],
                [[s["step"], s["count"], s["unit"], s["hours"]] for s in stats["funnel"]])
    t.log_table("rejects", ["source_id", "stage", "reason", "detail"],
                [[r["source_id"], r["stage"], r["reason"], r["detail"]] for r in rejects])
    t.log_histograms({f"{name}/hist/{k}": h for k, h in stats["histograms"].items()})
    t.log_image("funnel_chart", str(ctx.out_dir / "funnel.png"))  # not "funnel": the table


def _finish_curation(ctx: StageContext, clips: list[dict], rejects: list[dict],
                     stats: dict) -> dict:
    """Write a curate/filter/caption stage's clips, rejects and stats, log its funnel; returns
    the stage result (the numeric stats)."""
    _log_curation(ctx, stats, rejects, clips)
    write_outputs(ctx.out_dir, clips, rejects, stats)
    return {k: v for k, v in stats.items() if isinstance(v, (int, float))}


# ----- curate -------------------------------------------------------------------------------
def curate_funnel(n_inputs: int, clips: list[dict], rejects: list[dict], videos: list[dict]
                  ) -> list[dict]:
    """The curate stage's funnel steps. ``probed``: the videos that passed the probe *and*
    decoded, i.e. those with a video record (the videos whose hours it shows): a file the
    decoder rejects after its probe passed is not counted. ``shots``: every span they split
    into (kept, too short or filtered)."""
    video_seconds = sum(v["seconds"] for v in videos)
    spans = len(clips) + sum(r["stage"] in ("split", "filter") for r in rejects)
    return [
        step("inputs", n_inputs, 0, "videos"),
        step("probed", len({v["source_id"] for v in videos}), video_seconds, "videos"),
        step("shots", spans, video_seconds, "clips"),
        step("cpu filters", len(clips), sum(map(clip_seconds, clips)), "clips"),
    ]


def curate_stage(ctx: StageContext) -> dict:
    """Fetch, probe, split into shots, CPU scores and filters: resumable parts on Ray."""
    ensure_ray(ctx)
    items = load_inputs(ctx.inputs["source"])
    cur = ctx.section("curate")
    cache = Path(cur.fetch_cache)
    if not cache.is_absolute():  # under the run root, or its local cache for a bucket root
        run = ctx.section("run")
        cache = local_root(run.root, run.local_cache) / cache
    c = CurateConfigs(ingest=ctx.section("ingest"), probe=ctx.section("probe"),
                      shots=ctx.section("shots"), scores=ctx.section("scores"), curate=cur,
                      cache_dir=str(cache))
    clips, rejects, videos = run_curate(items, c, ctx.out_dir,
                                        ctx.section("cluster").curate_concurrency)
    stats = account({i["id"] for i in items}, clips, rejects)
    stats["funnel"] = curate_funnel(len(items), clips, rejects, videos)
    stats["decode_seconds"] = float(sum(v["decode_s"] for v in videos))
    return _finish_curation(ctx, clips, rejects, stats)


# ----- filter -------------------------------------------------------------------------------
def filter_stage(ctx: StageContext) -> dict:
    """Model scores (open_clip embeddings, aesthetics, caption similarity; actor pool) when
    curate.model_scores, then near-duplicates across the whole dataset."""

    up = ctx.inputs["curate"]
    clips, rejects = read_clips(up), read_rejects(up)
    stats_up = json.loads((up / "stats.json").read_text())
    funnel = list(stats_up["funnel"])
    cur, embed = ctx.section("curate"), ctx.section("embed")
    scores_cfg = ctx.section("scores")
    emb = {c["clip_id"]: np.asarray(c["thumb"], np.float32) for c in clips}
    if cur.model_scores:
        import ray  # lazy: ray ~1.7 s (ray.train ~4.7 s) to import, needed only here

        ensure_ray(ctx)
        actors, gpus = actor_pool(embed.concurrency, embed.num_gpus, ray.cluster_resources(),
                                  "embed")
        print(f"model scores: {actors} actor(s), {gpus:g} GPU(s) each")
        res = run_model_scores(clips, embed, cur.frame_long_side, ctx.out_dir, actors, gpus,
                               limits=cur.media)
        kept = []
        for c in clips:
            r = res[c["clip_id"]]
            item = {"id": c["source_id"], "url": c["path"]}
            if "error" in r:
                rejects.append(reject(item, "filter", r.get("reason", "decode_failed"),
                                      r["error"], c["start"], c["end"], scores=c["scores"]))
                continue
            c["scores"].update({k: r[k] for k in ("aesthetic", "clip_score") if k in r})
            emb[c["clip_id"]] = np.asarray(r["embedding"], np.float32)
            failed = apply_filters(c["scores"], scores_cfg)
            if failed:
                rejects.append(reject(item, "filter", failed[0], failed[1], c["start"], c["end"],
                                      scores=c["scores"]))
            else:
                kept.append(c)
        clips = kept
        funnel.append(step("model filters", len(clips), sum(map(clip_seconds, clips)), "clips"))
    ids = [c["clip_id"] for c in clips]
    prio = np.asarray([dedup_priority(c) for c in clips], np.float64)
    matrix = np.stack([emb[i] for i in ids]) if ids else np.zeros((0, 1), np.float32)
    dedup = ctx.section("dedup")
    if not cur.model_scores:  # thumbnail signatures: their own, measured threshold
        dedup = dataclasses.replace(dedup, threshold=dedup.thumb_threshold)
    dropped = {d["clip_id"]: d for d in find_near_duplicates(ids, matrix, dedup, prio)}
    kept = []
    for c in clips:
        d = dropped.get(c["clip_id"])
        if d:
            rejects.append(reject({"id": c["source_id"], "url": c["path"]}, "dedup",
                                  "near_duplicate", f"of {d['kept']} (cosine "
                                  f"{d['similarity']:.4f})", c["start"], c["end"],
                                  scores=c["scores"]))
        else:
            kept.append(c)
    clips = kept
    funnel.append(step("dedup", len(clips), sum(map(clip_seconds, clips)), "clips"))
    stats = account({r["source_id"] for r in rejects} | {c["source_id"] for c in clips}, clips,
                    rejects)
    stats["inputs"] = stats_up["inputs"]
    if stats["kept_sources"] + stats["rejected_sources"] != stats["inputs"]:
        raise RuntimeError(f"filter lost sources: {stats}")
    stats["funnel"] = funnel
    return _finish_curation(ctx, clips, rejects, stats)


# ----- caption ------------------------------------------------------------------------------
def caption_stage(ctx: StageContext) -> dict:
    """Caption the kept clips: source captions passed through, or a VLM actor pool as
    resumable parts (a killed driver redoes only the groups in flight)."""
    up = ctx.inputs["filter"]
    clips, rejects = read_clips(up), read_rejects(up)
    stats_up = json.loads((up / "stats.json").read_text())
    cfg = ctx.section("caption")
    if cfg.kind == "vlm":
        ensure_ray(ctx)
    kept, failed = caption_clips(clips, cfg, out_dir=ctx.out_dir)
    rejects += failed
    stats = account({r["source_id"] for r in rejects} | {c["source_id"] for c in kept}, kept,
                    rejects)
    stats["inputs"] = stats_up["inputs"]
    stats["funnel"] = stats_up["funnel"] + [
        step("captioned", len(kept), sum(map(clip_seconds, kept)), "clips")]
    stats["captioners"] = sorted({c["caption_source"] for c in kept})
    stats["clips_caption_failed"] = len(failed)
    ctx.tracker.log_table("captions", ["clip_id", "caption", "captioner"],
                          [[c["clip_id"], c["caption"], c["caption_source"]] for c in kept[:200]])
    return _finish_curation(ctx, kept, rejects, stats)


# ----- shard --------------------------------------------------------------------------------
def shard_stage(ctx: StageContext) -> dict:
    """Cut, encode and pack the captioned clips; resumable (finished shards are kept)."""
    ensure_ray(ctx)
    up = ctx.inputs["caption"]
    clips, rejects = read_clips(up), read_rejects(up)
    stats_up = json.loads((up / "stats.json").read_text())
    res = run_sharding(clips, ctx.section("shard"), ctx.out_dir,
                       ctx.section("cluster").curate_concurrency,
                       upload_url=ctx.out_url if has_scheme(ctx.out_url) else None)
    if len(res["rows"]) + len(res["failed"]) != len(clips):
        raise RuntimeError(f"sharding lost clips: {len(clips)} in, {len(res['rows'])} sharded, "
                           f"{len(res['failed'])} failed")
    rejects += res["failed"]
    sharded = {r["key"] for r in res["rows"]}
    kept = [c for c in clips if c["clip_id"] in sharded]
    stats = account({r["source_id"] for r in rejects} | {c["source_id"] for c in kept}, kept,
                    rejects)
    stats["inputs"] = stats_up["inputs"]
    if stats["kept_sources"] + stats["rejected_sources"] != stats["inputs"]:
        raise RuntimeError(f"sharding lost sources: {stats}")
    secs = sum(map(clip_seconds, kept))
    stats.update({
        "funnel": stats_up["funnel"] + [step("sharded", len(kept), secs, "clips")],
        "clips_sharded": len(res["rows"]),
        "clips_encode_failed": len(res["failed"]),
        "shards": {k: len(v) for k, v in res["shards"].items()},
        "shards_reused": res["reused"],
        "clips_per_split": {s: sum(r["split"] == s for r in res["rows"])
                            for s in ("train", "val")},
        "bytes": int(sum(r["bytes"] for r in res["rows"])),
        "clips_per_kind": {k: sum(r["kind"] == k for r in res["rows"]) for k in ("video", "image")},
        "captioners": stats_up.get("captioners", []),
    })
    write_parquet(res["rows"], ctx.out_dir / "clips.parquet")
    write_rejects(rejects, ctx.out_dir / "rejects.parquet")
    _log_curation(ctx, stats, rejects, kept)
    (ctx.out_dir / "stats.json").write_text(json.dumps(stats, indent=2))
    (ctx.out_dir / "index.json").write_text(json.dumps(
        {k: [f"shards/{n}" for n in v] for k, v in res["shards"].items()}, indent=2))
    for split, names in res["shards"].items():  # wids: WebDataset's indexed reader opens these
        (ctx.out_dir / f"{split}.wids.json").write_text(
            json.dumps(wids_index(split, names, res["nsamples"]), indent=2))
    ctx.tracker.summary({"shard/clips": stats["clips_sharded"], "shard/bytes": stats["bytes"],
                         "shard/train_shards": stats["shards"]["train"],
                         "shard/val_shards": stats["shards"]["val"]})
    return {k: v for k, v in stats.items() if isinstance(v, (int, float))}


def shard_urls(ctx: StageContext, split: str, stage: str = "shard") -> list[str]:
    """A shard-writing stage's tars of a split, by URL when the run root is a bucket (streamed
    from there, never downloaded: their readers declare ``stream=("shards/*",)``)."""
    index = json.loads((ctx.inputs[stage] / "index.json").read_text())
    base = ctx.input_urls[stage]
    if not has_scheme(base):
        base = str(Path(base).resolve())
    return [f"{base}/{p}" for p in index[split]]


# ----- latent space (train.data.kind=latent) -------------------------------------------------
def vae_stage(ctx: StageContext) -> dict:
    """Train our causal video VAE on the curated shards (latent.kind=ours)."""
    res = train_vae(ctx.section("vae"), shard_urls(ctx, "train"), shard_urls(ctx, "val"),
                    ctx.out_dir, ctx.tracker)
    return {k: v for k, v in res.items() if not isinstance(v, (list, dict))}


def precompute_stage(ctx: StageContext) -> dict:
    """Encode the curated shards into latent shards once, so training never runs the VAE; with
    a frozen text encoder (its config is then in this stage's hash) the captions' embeddings
    go into the shards too, so training never runs the encoder either."""
    lat = ctx.section("latent")
    text = ctx.section("model.text") if "model.text" in ctx.stage.config_keys else None
    stats = precompute_latents(
        lat, {sp: shard_urls(ctx, sp) for sp in ("train", "val")}, ctx.out_dir, lat.num_frames,
        (lat.height, lat.width), lat.target_fps, text=text,
        vae_dir=str(ctx.inputs["vae"]) if lat.kind == "ours" else None)
    ctx.tracker.summary({f"precompute/{k}": v for k, v in stats.items()
                         if isinstance(v, (int, float))})
    return {k: v for k, v in stats.items() if k != "failed"}


# ----- train --------------------------------------------------------------------------------
def train_stage(ctx: StageContext) -> dict:
    ensure_ray(ctx)
    run = ctx.section("run")
    latent = None
    if "precompute" in ctx.inputs:  # latent shards, and the VAE that made them
        urls = shard_urls(ctx, "train", "precompute")
        latent = json.loads((ctx.inputs["precompute"] / "latent_space.json").read_text())
    else:
        urls = shard_urls(ctx, "train")
    init = ctx.stage.settings.get("init")  # a recipe's later stage: its predecessor's output
    if init is not None:
        init = {**init, "dir": ctx.input_urls[init["from"]]}
    res = run_training(
        train_cfg=ctx.section("train"), model_cfg=ctx.section("model"),
        ds_cfg=ctx.section("deepspeed"), cluster=ctx.section("cluster"), out_dir=ctx.out_dir,
        train_shards=urls, tracker_spec=spec_for(ctx, ctx.section("tracking"), run.root,
                                                 run.local_cache),
        stage=ctx.stage.name, stage_hash=ctx.stage_hash,
        inputs={k: str(v) for k, v in ctx.inputs.items()}, latent=latent,
        stage_url=str(ctx.out_url) if has_scheme(ctx.out_url) else None,
        init=init,
    )
    res.pop("history", None)
    return res


# ----- eval ---------------------------------------------------------------------------------
def eval_stage(ctx: StageContext) -> dict:
    """Rerun alone with `spacetime run --only eval eval.checkpoint=200` or, for metric-vs-step
    curves, `eval.steps=[100,200,300]` (the training stage must have kept those tags). Its
    first input is the training stage it evaluates (a recipe's last)."""
    cluster = ctx.section("cluster")  # not hashed: where long clips are sampled, not what
    if cluster.sequence_parallel > 1 and ctx.section("eval").long.seconds:
        ensure_ray(ctx)
    res = evaluate(ctx.section("eval"), ctx.inputs[ctx.stage.inputs[0]],
                   shard_urls(ctx, "val"), ctx.out_dir, ctx.tracker,
                   sequence_parallel=cluster.sequence_parallel, ray_address=cluster.address)
    return {"step": res["step"], "weights": res["weights"], "skipped": res["skipped"],
            **res["checkpoints"][-1]["metrics"]}


# Keys that cannot change a stage's output, excluded from its hash (listed, not implied).
STAGES = [
    Stage("source", source_stage, config_keys=("source", "ingest"), version=4,
          exclude=("ingest.storage_options", "ingest.fetch_retries", "ingest.fetch_backoff_s",
                   "ingest.fetch_timeout_s", "ingest.fetch_read_timeout_s",
                   "ingest.fetch_max_bytes"),
          description="generate the synthetic videos or list the inputs (dirs, URLs, manifests)"),
    Stage("curate", curate_stage, inputs=("source",),
          config_keys=("ingest", "probe", "shots", "scores", "curate"), version=4,
          exclude=("ingest.storage_options", "ingest.fetch_retries", "ingest.fetch_backoff_s",
                   "ingest.fetch_timeout_s", "ingest.fetch_read_timeout_s",
                   "ingest.remote_manifests", "probe.startup_timeout_s", "curate.group_size",
                   "curate.fetch_cache", "curate.model_scores",
                   "curate.media.startup_timeout_s"), resumable=True,
          description="fetch, probe, split into shots, CPU scores and filters (Ray tasks)"),
    Stage("filter", filter_stage, inputs=("curate",), config_keys=("curate", "embed", "scores",
                                                                   "dedup"),
          exclude=("curate.group_size", "curate.fetch_cache", "curate.media.startup_timeout_s",
                   "dedup.device", "dedup.block_size", "dedup.chunk_size", "embed.device",
                   "embed.concurrency", "embed.num_gpus"),
          resumable=True,
          description="model scores (open_clip actor pool) and global near-duplicates"),
    Stage("caption", caption_stage, inputs=("filter",), config_keys=("caption",),
          exclude=("caption.concurrency", "caption.max_retries", "caption.num_gpus",
                   "caption.group_size"), resumable=True,
          description="pass source captions through or recaption with a VLM (actor pool)"),
    Stage("shard", shard_stage, inputs=("caption",), config_keys=("shard",), version=5,
          exclude=("shard.max_retries", "shard.upload_retries", "shard.upload_backoff_s",
                   "shard.progress_every_s", "shard.media.startup_timeout_s"), resumable=True,
          description="cut, encode and pack clips into WebDataset tars"),
    Stage("train", train_stage, inputs=("shard",), config_keys=("model", "train", "deepspeed"),
          exclude=("train.log_every", "train.progress_every_s", "train.max_failures",
                   "train.data.prefetch", "train.text_sep_every",
                   "deepspeed.config_file"),  # its content is hashed: deepspeed.file_config
          unset=("deepspeed.file_config",),
          resumable=True,
          stream=("shards/*",),
          description="train the DiT with DeepSpeed ZeRO on Ray Train workers"),
    Stage("eval", eval_stage, inputs=("train", "shard"), config_keys=("eval",), version=2,
          exclude=("eval.progress_every_s",),
          description="validation loss, sampled videos, probes, CLIP score and FVD"),
]


LATENT_STAGES = [
    Stage("vae", vae_stage, inputs=("shard",), config_keys=("vae",), stream=("shards/*",),
          exclude=("vae.log_every",),
          description="train the causal video VAE on the curated shards"),
    Stage("precompute", precompute_stage, inputs=("shard", "vae"), config_keys=("latent",),
          stream=("shards/*",),
          description="encode the curated shards into latent shards"),
]


# With a frozen text encoder the precompute stage stores caption embeddings: it hashes the
# encoder's config too (not its cache settings, which cannot change an embedding).
TEXT_KEYS = dict(config_keys=("latent", "model.text"),
                 exclude=("model.text.cache_size", "model.text.cache_dir"))


def recipe_stages(train: Stage, recipe: list[dict]) -> list[Stage]:
    """A recipe's training stages (``pipeline.recipe.entries``; none: ``[train]``): one per
    entry, in order, each `train` renamed, with the entry's ``train`` overrides merged over the
    train section (its hash and what it reads). After the first, a stage's inputs add its
    predecessor, and how it starts from it (``init``: from, weights, optimizer) is in its
    settings, so its hash holds both (the graph chains upstream hashes): changing a stage
    reruns it and the stages after it, never the ones before. The predecessor's checkpoints are
    never downloaded (a URL root): a carried optimizer state is read from the bucket."""
    if not recipe:
        return [train]
    out: list[Stage] = []
    for e in recipe:
        s = dataclasses.replace(train, name=e["name"], overrides={"train": e["train"]} if e["train"] else {},
                                description=f"{train.description} (recipe stage {len(out) + 1} of "
                                            f"{len(recipe)})")
        if out:
            init = {"from": out[-1].name, "weights": e["weights"], "optimizer": e["optimizer"]}
            # its checkpoints are read where they are (a carried optimizer state), never copied
            s = dataclasses.replace(s, inputs=(*train.inputs, out[-1].name),
                                    settings={"init": init}, stream=(*train.stream, "checkpoints/*"))
        out.append(s)
    return out


def build_graph(root: str | Path, local_cache: str | None = None, *, data_kind: str = "raw",
                latent_kind: str = "none", text_frozen: bool = False,
                recipe: list[dict] = ()) -> Graph:
    """The graph for a config: with ``train.data.kind=latent`` the DiT trains on latent shards,
    ``shard -> [vae ->] precompute -> train`` (the vae stage only for ``latent.kind=ours``;
    ``text_frozen``: the model's text encoder is frozen, so precompute embeds the captions).
    recipe: its entries (``pipeline.recipe.entries``): the training stages, eval on the last."""
    extra: list[Stage] = []
    if data_kind == "latent":
        if latent_kind == "none":
            raise GraphError("train.data.kind=latent needs a VAE: set latent=ours (train one) or "
                             "latent=diffusers latent.path=<hub id or directory>")
        extra = [s for s in LATENT_STAGES if s.name != "vae" or latent_kind == "ours"]
        if latent_kind != "ours":
            extra = [dataclasses.replace(s, inputs=("shard",)) for s in extra]
        if text_frozen:
            extra = [dataclasses.replace(s, **TEXT_KEYS) if s.name == "precompute" else s
                     for s in extra]
    stages: list[Stage] = []
    last_train = "train"
    for s in STAGES:
        if s.name == "train":
            stages += extra
            if extra:
                s = dataclasses.replace(s, inputs=("precompute",))
            trains = recipe_stages(s, list(recipe))
            stages += trains
            last_train = trains[-1].name
            continue
        if s.name == "eval":
            s = dataclasses.replace(s, inputs=(last_train, *s.inputs[1:]))
        stages.append(s)
    return Graph(stages, root, local_cache=local_cache)


def graph_for(cfg) -> Graph:
    """The graph of a (typed or dict) config."""
    get = (lambda o, k: o[k]) if isinstance(cfg, dict) else getattr
    run, train, latent = get(cfg, "run"), get(cfg, "train"), get(cfg, "latent")
    text = get(get(cfg, "model"), "text")
    has_recipe = (isinstance(cfg, dict) and "recipe" in cfg) or hasattr(cfg, "recipe")
    return build_graph(get(run, "root"), get(run, "local_cache"),
                       data_kind=get(get(train, "data"), "kind"), latent_kind=get(latent, "kind"),
                       text_frozen=text_frozen(get(text, "kind"), get(text, "lr_scale")),
                       recipe=entries(cfg) if has_recipe else [])
