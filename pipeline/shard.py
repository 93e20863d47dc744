"""Sharding: cut each kept clip out of its source, re-encode it, and pack WebDataset tars.

Per clip a tar holds ``<key>.mp4`` (H.264, the clip's span only), ``<key>.json`` (metadata and
scores) and ``<key>.txt`` (the caption). Keys are the clip ids, so they are deterministic.
Clips go to the ``train`` or ``val`` split by a hash of their key (stable when clips are added
or removed), then into shards of ``clips_per_shard`` in key order. Each shard is written under
a temporary name and renamed when complete. Shards are written by Ray tasks in parallel.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass
class ShardConfig:
    clips_per_shard: int = 8
    val_fraction: float = 0.1
    min_val_clips: int = 2
    crf: int = 18  # H.264 quality of the re-encoded clips
    max_retries: int = 2


def split_of(key: str, val_fraction: float) -> str:
    u = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "val" if u < val_fraction else "train"


def assign_splits(keys: list[str], cfg: ShardConfig) -> dict[str, str]:
    """Hash split, topped up to min_val_clips (the lowest hashes move to val) when possible."""
    splits = {k: split_of(k, cfg.val_fraction) for k in keys}
    n_val = sum(s == "val" for s in splits.values())
    if n_val < cfg.min_val_clips and len(keys) > cfg.min_val_clips:
        by_hash = sorted(keys, key=lambda k: hashlib.sha256(k.encode()).hexdigest())
        for k in by_hash[: cfg.min_val_clips]:
            splits[k] = "val"
    return splits


def encode_clip(clip: dict, crf: int) -> bytes:
    from data.video_io import encode_mp4, read_frames

    frames = read_frames(clip["abs_path"], indices=list(range(clip["start"], clip["end"])))
    h, w = frames.shape[1] // 2 * 2, frames.shape[2] // 2 * 2
    return encode_mp4(frames[:, :h, :w], fps=clip["fps"], crf=crf)  # (T, H, W, 3) uint8


def write_one_shard(path: str, clips: list[dict], crf: int) -> dict:
    """Runs as a Ray task. Returns the manifest rows of the clips it wrote and its failures."""
    from data.shards import write_shard

    samples, rows, failed = [], [], []
    for c in clips:
        try:
            mp4 = encode_clip(c, crf)
        except Exception as e:  # noqa: BLE001 - one bad clip must not lose the shard
            failed.append({"source_id": c["source_id"], "path": c["path"], "stage": "shard",
                           "reason": "encode_failed", "detail": f"{type(e).__name__}: {e}",
                           "start": c["start"], "end": c["end"]})
            continue
        meta = {k: c[k] for k in ("clip_id", "source_id", "path", "start", "end", "fps", "width",
                                  "height", "caption", "scores", "source")}
        samples.append({"__key__": c["clip_id"], "mp4": mp4, "json": meta, "txt": c["caption"]})
        rows.append({"key": c["clip_id"], "shard": Path(path).name, "bytes": len(mp4)})
    nbytes = write_shard(path, samples) if samples else 0
    return {"rows": rows, "failed": failed, "bytes": nbytes, "shard": Path(path).name}


def plan_shards(clips: list[dict], cfg: ShardConfig) -> dict[str, list[list[dict]]]:
    splits = assign_splits([c["clip_id"] for c in clips], cfg)
    out: dict[str, list[list[dict]]] = {"train": [], "val": []}
    for split in out:
        mine = sorted((c for c in clips if splits[c["clip_id"]] == split),
                      key=lambda c: c["clip_id"])
        n = cfg.clips_per_shard
        out[split] = [mine[i : i + n] for i in range(0, len(mine), n)]
    return out


def run_sharding(clips: list[dict], cfg: ShardConfig, out: Path, log=print) -> dict:
    import ray

    shard_dir = out / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    plan = plan_shards(clips, cfg)
    task = ray.remote(num_cpus=1, max_retries=cfg.max_retries)(write_one_shard)
    refs, names = [], []
    for split, groups in plan.items():
        for i, group in enumerate(groups):
            name = f"{split}-{i:06d}.tar"
            names.append((split, name))
            refs.append(task.remote(str(shard_dir / name), group, cfg.crf))
    results = ray.get(refs)
    by_key = {c["clip_id"]: c for c in clips}
    rows, failed, shards = [], [], {"train": [], "val": []}
    for (split, name), r in zip(names, results):
        failed += r["failed"]
        if r["rows"]:
            shards[split].append(name)
        for row in r["rows"]:
            c = by_key[row["key"]]
            rows.append({**row, "split": split, "source_id": c["source_id"], "path": c["path"],
                         "start": c["start"], "end": c["end"], "caption": c["caption"],
                         "scores": json.dumps(c["scores"])})
    log(f"wrote {sum(map(len, shards.values()))} shards, {len(rows)} clips, "
        f"{len(failed)} encode failures")
    return {"rows": rows, "failed": failed, "shards": shards}
