"""Sharding: cut each kept clip out of its source, encode it, and pack WebDataset tars.

Per clip a tar holds ``<key>.mp4`` (H.264, the clip's span only), ``<key>.json`` (metadata,
scores, source metadata and which captioner made the caption) and ``<key>.txt`` (the caption).
Keys are the clip ids, so they are deterministic.

Plan: clips go to ``train`` or ``val`` by a hash of their key (stable when clips are added or
removed), then, in key order, into shards of about ``target_shard_bytes`` (estimated from each
source's bitrate and the clip's share of it; ``max_clips_per_shard`` caps the count too). The
plan is a pure function of the clips and the config.

Writing: one Ray task per shard encodes its clips and writes the tar under a temporary name,
renamed when complete, then a sidecar ``<shard>.rows.json`` listing what it holds (and which
clips failed to encode). Resuming: a shard whose sidecar exists is done and is not written
again, so a driver killed mid-stage and rerun ends with every planned clip exactly once.

Encoding: a clip that spans its whole source, already H.264 in mp4, is copied byte for byte
(``passthrough``); other clips are decoded at full resolution and re-encoded with x264
(``crf``, ``preset``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class ShardConfig:
    target_shard_bytes: int = 256 * 2**20  # about this many bytes of mp4 per tar
    max_clips_per_shard: int = 0  # 0: no cap
    val_fraction: float = 0.1
    min_val_clips: int = 2
    crf: int = 18  # H.264 quality of re-encoded clips
    preset: str = "veryfast"  # x264 speed preset of re-encoded clips
    passthrough: bool = True  # copy whole-source H.264/mp4 clips without re-encoding
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


def estimate_bytes(clip: dict) -> int:
    """The clip's share of its source's bytes (re-encoding at similar quality keeps bitrate)."""
    frames = clip["end"] - clip["start"]
    src_bytes, src_frames = clip.get("source_bytes"), clip.get("source_frames")
    if src_bytes and src_frames:
        return max(1, int(src_bytes * frames / src_frames))
    return max(1, int(clip["width"] * clip["height"] * frames * 0.05))


def plan_shards(clips: list[dict], cfg: ShardConfig) -> list[tuple[str, list[dict]]]:
    """[(shard name, clips)] in a deterministic order."""
    splits = assign_splits([c["clip_id"] for c in clips], cfg)
    plan = []
    for split in ("train", "val"):
        mine = sorted((c for c in clips if splits[c["clip_id"]] == split),
                      key=lambda c: c["clip_id"])
        groups: list[list[dict]] = []
        size = 0
        for c in mine:
            full = groups and (size >= cfg.target_shard_bytes or
                               0 < cfg.max_clips_per_shard <= len(groups[-1]))
            if not groups or full:
                groups.append([])
                size = 0
            groups[-1].append(c)
            size += estimate_bytes(c)
        plan += [(f"{split}-{i:06d}.tar", g) for i, g in enumerate(groups)]
    return plan


def whole_source(clip: dict) -> bool:
    return (clip["start"] == 0 and clip["end"] == clip.get("source_frames")
            and clip.get("codec") == "h264" and "mp4" in (clip.get("container") or ""))


def encode_clip(clip: dict, cfg: ShardConfig) -> bytes:
    from data.video_io import read_frames

    if cfg.passthrough and whole_source(clip):
        return Path(clip["abs_path"]).read_bytes()
    frames = read_frames(clip["abs_path"], indices=list(range(clip["start"], clip["end"])),
                         threads=1)  # the task holds one CPU
    h, w = frames.shape[1] // 2 * 2, frames.shape[2] // 2 * 2
    return encode_h264(frames[:, :h, :w], clip["fps"], cfg.crf, cfg.preset)


def encode_h264(frames, fps: float, crf: int, preset: str) -> bytes:
    """(T, H, W, 3) uint8 -> mp4 bytes; one x264 thread (Ray gives each task one CPU)."""
    import io

    import av

    from data.video_io import _rate

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=_rate(fps))
        stream.height, stream.width = frames.shape[1], frames.shape[2]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        stream.options = {"crf": str(crf), "preset": preset}
        for frame in frames:  # (H, W, 3) uint8
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


META_KEYS = ("clip_id", "source_id", "path", "start", "end", "fps", "width", "height",
             "caption", "caption_source", "scores", "source")


def write_one_shard(path: str, clips: list[dict], cfg: ShardConfig,
                    upload_url: str | None = None) -> dict:
    """Runs as a Ray task: the tar, then its sidecar. Returns the sidecar's content.

    With `upload_url` (a bucket run root, where the driver's directory is not shared), the tar
    is written to this node's temporary directory and uploaded to ``<upload_url>/shards/``."""
    import tempfile

    from data.shards import write_shard

    final = path
    if upload_url:
        path = str(Path(tempfile.mkdtemp(prefix="shard-")) / Path(final).name)
    samples, rows, failed = [], [], []
    for c in clips:
        try:
            mp4 = encode_clip(c, cfg)
        except Exception as e:  # noqa: BLE001 - one bad clip must not lose the shard
            failed.append({"source_id": c["source_id"], "path": c["path"], "stage": "shard",
                           "reason": "encode_failed", "detail": f"{type(e).__name__}: {e}",
                           "start": c["start"], "end": c["end"]})
            continue
        meta = {k: c.get(k) for k in META_KEYS}
        samples.append({"__key__": c["clip_id"], "mp4": mp4, "json": meta, "txt": c["caption"]})
        rows.append({"key": c["clip_id"], "shard": Path(path).name, "bytes": len(mp4)})
    nbytes = write_shard(path, samples) if samples else 0
    side = {"shard": Path(path).name, "rows": rows, "failed": failed, "bytes": nbytes}
    if upload_url:
        from pipeline.storage import Store

        if samples:
            Store(upload_url).put_file(path, f"shards/{Path(path).name}")
            os.remove(path)
        os.rmdir(Path(path).parent)
        return side
    write_sidecar(final, side)
    return side


def write_sidecar(path: str, side: dict) -> None:
    tmp = f"{path}.rows.json.tmp"
    Path(tmp).write_text(json.dumps(side))
    os.replace(tmp, f"{path}.rows.json")


def run_sharding(clips: list[dict], cfg: ShardConfig, out: Path, concurrency: int = 2,
                 log=print, upload_url: str | None = None) -> dict:
    import ray

    shard_dir = out / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    plan = plan_shards(clips, cfg)
    done = {name for name, _ in plan if (shard_dir / f"{name}.rows.json").exists()}
    if done:
        log(f"shard: {len(done)} of {len(plan)} shards already written, resuming")
    task = ray.remote(num_cpus=1, max_retries=cfg.max_retries)(write_one_shard)
    t0 = time.time()
    pending = [(name, group) for name, group in plan if name not in done]
    refs: list = []

    def finish(ready) -> None:  # sidecars of uploaded shards are written here, by the driver
        for side in ray.get(ready):
            if upload_url:
                write_sidecar(str(shard_dir / side["shard"]), side)

    for name, group in pending:  # at most 2 x concurrency in flight: backpressure
        if len(refs) >= 2 * concurrency:
            ready, refs = ray.wait(refs, num_returns=1)
            finish(ready)
        refs.append(task.remote(str(shard_dir / name), group, cfg, upload_url))
    finish(refs)
    log(f"shard: wrote {len(pending)} shards in {time.time() - t0:.1f}s, reused {len(done)}")
    by_key = {c["clip_id"]: c for c in clips}
    rows, failed, shards = [], [], {"train": [], "val": []}
    for name, _ in plan:
        side = json.loads((shard_dir / f"{name}.rows.json").read_text())
        split = name.split("-")[0]
        failed += side["failed"]
        if side["rows"]:
            shards[split].append(name)
        for row in side["rows"]:
            c = by_key[row["key"]]
            rows.append({**row, "split": split, "source_id": c["source_id"], "path": c["path"],
                         "start": c["start"], "end": c["end"], "caption": c["caption"],
                         "caption_source": c.get("caption_source") or "",
                         "scores": json.dumps(c["scores"]),
                         "source": json.dumps(c.get("source") or {})})
    return {"rows": rows, "failed": failed, "shards": shards, "written": len(pending),
            "reused": len(done)}
