"""Curation on Ray: probe every input, split it into shots, score and filter the shots.

Every input video ends either as one or more kept clips or in the rejects with a reason; clips
that a filter drops are rejects too (stage ``filter``), so ``inputs = kept sources + rejected
sources`` and ``clips = kept + filtered`` always hold. Clips stay spans ``(source, start, end)``
here; the shard stage cuts and re-encodes them.

The work runs as a Ray Data pipeline (one task per video, ``cluster.curate_concurrency`` at a
time), so it streams with backpressure and runs unchanged on a multi-node cluster.
"""

from __future__ import annotations

import json
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class CurateConfig:
    min_seconds: float = 1.0
    max_seconds: float = 600.0
    min_side: int = 32  # shortest side in pixels
    max_side: int = 4096
    score_size: int = 32  # frames are scored at score_size x score_size
    cut_threshold: float = 30.0  # mean abs difference (0-255) between frames that marks a cut
    min_clip_frames: int = 8
    min_motion: float = 0.5  # mean abs frame difference (0-255) below which a clip is frozen
    max_motion: float = 60.0  # above: jitter / noise


def reject(item: dict, stage: str, reason: str, detail: str = "", start=None, end=None) -> dict:
    return {"source_id": item["id"], "path": item["path"], "stage": stage, "reason": reason,
            "detail": detail, "start": start, "end": end}


def find_cuts(diffs: np.ndarray, threshold: float) -> list[int]:
    """diffs: (T-1,) mean abs difference between frame i and i+1. Returns first frames of shots."""
    return [int(i) + 1 for i in np.flatnonzero(diffs > threshold)]


def shot_caption(item: dict, start: int, end: int) -> str:
    """The source's caption for a span: its shot's caption when the source has per-shot ones."""
    mid = (start + end) // 2
    for shot in item.get("shots") or []:
        if shot["start"] <= mid < shot["end"] and shot.get("caption"):
            return shot["caption"]
    return item.get("caption") or ""


def curate_video(item: dict, cfg: CurateConfig) -> tuple[list[dict], list[dict]]:
    """Probe, split and score one input. Returns (clips, rejects). Never raises for bad input."""
    from data.video_io import VideoError, probe, read_frames

    path = item["abs_path"]
    try:
        p = probe(path)
    except VideoError as e:
        return [], [reject(item, "probe", "unreadable", f"{e.reason}: {e}")]
    except Exception as e:  # noqa: BLE001 - a hostile file must not stop the run
        return [], [reject(item, "probe", "unreadable", f"{type(e).__name__}: {e}")]
    if p.duration < cfg.min_seconds:
        return [], [reject(item, "probe", "too_short", f"{p.duration:.2f}s < {cfg.min_seconds}s")]
    if p.duration > cfg.max_seconds:
        return [], [reject(item, "probe", "too_long", f"{p.duration:.2f}s > {cfg.max_seconds}s")]
    if min(p.width, p.height) < cfg.min_side:
        return [], [reject(item, "probe", "low_resolution", f"{p.width}x{p.height}")]
    if max(p.width, p.height) > cfg.max_side:
        return [], [reject(item, "probe", "high_resolution", f"{p.width}x{p.height}")]
    try:
        frames = read_frames(path, size=(cfg.score_size, cfg.score_size))  # (T, s, s, 3) uint8
    except Exception as e:  # noqa: BLE001
        return [], [reject(item, "decode", "decode_failed", f"{type(e).__name__}: {e}")]
    x = frames.astype(np.float32)  # (T, s, s, 3)
    diffs = np.abs(x[1:] - x[:-1]).mean(axis=(1, 2, 3))  # (T-1,)
    bounds = [0, *find_cuts(diffs, cfg.cut_threshold), len(frames)]
    clips, rejects = [], []
    for start, end in zip(bounds[:-1], bounds[1:]):
        inner = diffs[start : end - 1]  # differences inside the shot, not across its cut
        motion = float(inner.mean()) if len(inner) else 0.0
        scores = {"motion": motion, "num_frames": end - start, "seconds": (end - start) / p.fps}
        if end - start < cfg.min_clip_frames:
            reason, detail = "too_short", f"{end - start} frames < {cfg.min_clip_frames}"
        elif motion < cfg.min_motion:
            reason, detail = "low_motion", f"motion {motion:.3f} < {cfg.min_motion}"
        elif motion > cfg.max_motion:
            reason, detail = "high_motion", f"motion {motion:.3f} > {cfg.max_motion}"
        else:
            clips.append({
                "clip_id": f"{item['id']}-{start:06d}-{end:06d}", "source_id": item["id"],
                "path": item["path"], "abs_path": path, "start": start, "end": end,
                "fps": p.fps, "width": p.width, "height": p.height,
                "caption": shot_caption(item, start, end), "scores": scores,
                "source": item.get("meta", {}),
            })
            continue
        rejects.append(reject(item, "filter", reason, json.dumps(scores), start, end))
    return clips, rejects


def _task(row: dict, cfg: dict) -> list[dict]:
    item = json.loads(row["item"])
    try:
        clips, rejects = curate_video(item, CurateConfig(**cfg))
    except Exception:  # noqa: BLE001 - a bug on one file must not lose the others
        clips, rejects = [], [reject(item, "curate", "error", traceback.format_exc(limit=3))]
    return [{"kind": "clip", "rec": json.dumps(c)} for c in clips] + [
        {"kind": "reject", "rec": json.dumps(r)} for r in rejects
    ]


def run_curation(items: list[dict], cfg: CurateConfig, concurrency: int, log=print
                 ) -> tuple[list[dict], list[dict]]:
    """items: dicts with id, path (relative), abs_path, optional caption/shots/meta."""
    import ray

    cfg_d = asdict(cfg)
    ds = ray.data.from_items([{"item": json.dumps(i)} for i in items])
    # Ray Data retries tasks lost to worker or node failures by itself.
    ds = ds.flat_map(_task, fn_kwargs={"cfg": cfg_d}, num_cpus=1,
                     compute=ray.data.TaskPoolStrategy(size=concurrency))
    t0 = time.time()
    rows = ds.take_all()
    clips = [json.loads(r["rec"]) for r in rows if r["kind"] == "clip"]
    rejects = [json.loads(r["rec"]) for r in rows if r["kind"] == "reject"]
    clips.sort(key=lambda c: c["clip_id"])
    rejects.sort(key=lambda r: (r["source_id"], r["start"] or -1))
    log(f"curated {len(items)} videos in {time.time() - t0:.1f}s: {len(clips)} clips kept, "
        f"{len(rejects)} rejects")
    return clips, rejects


def account(items: list[dict], clips: list[dict], rejects: list[dict]) -> dict[str, Any]:
    """Conservation check: every input is kept or rejected; raises if one went missing."""
    ids = {i["id"] for i in items}
    kept = {c["source_id"] for c in clips}
    rejected_whole = {r["source_id"] for r in rejects if r["start"] is None}
    filtered_only = {r["source_id"] for r in rejects} - kept - rejected_whole
    missing = ids - kept - rejected_whole - filtered_only
    if missing:
        raise RuntimeError(f"curation lost {len(missing)} inputs: {sorted(missing)[:5]}")
    reasons: dict[str, int] = {}
    for r in rejects:
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    return {
        "inputs": len(ids),
        "kept_sources": len(kept),
        "rejected_sources": len(ids - kept),
        "clips_kept": len(clips),
        "clips_filtered": sum(1 for r in rejects if r["start"] is not None),
        "reject_reasons": reasons,
        "kept_seconds": float(sum(c["scores"]["seconds"] for c in clips)),
    }


def write_outputs(out: Path, clips: list[dict], rejects: list[dict], stats: dict) -> None:
    from data.shards import write_parquet

    write_parquet([{**c, "scores": json.dumps(c["scores"]), "source": json.dumps(c["source"])}
                   for c in clips], out / "clips.parquet")
    write_parquet(rejects, out / "rejects.parquet", schema=REJECT_SCHEMA)
    (out / "stats.json").write_text(json.dumps(stats, indent=2))


REJECT_SCHEMA = {"source_id": "string", "path": "string", "stage": "string", "reason": "string",
                 "detail": "string", "start": "int64", "end": "int64"}


def load_items(source_dir: Path) -> list[dict]:
    """The source stage's manifest.jsonl, with absolute paths added."""
    items = []
    for line in (source_dir / "manifest.jsonl").read_text().splitlines():
        if line.strip():
            it = json.loads(line)
            it["abs_path"] = str((source_dir / it["path"]).resolve())
            items.append(it)
    return items
