"""Curation on Ray: the ``curate`` stage (fetch, probe, split into shots, CPU scores and
filters) and the ``filter`` stage (model scores, global near-duplicates).

    source manifest --curate--> clips (spans + scores) + rejects --filter--> fewer clips
                                                                  --caption--> --shard-->

Every input ends either as one or more clips or in the rejects with the stage and reason that
stopped it; a clip that a filter drops is a reject too (with its span), so at every stage
``inputs = kept sources + rejected sources`` and ``clips = kept + filtered`` hold, and
`account` checks it. Clips stay spans ``(source, start, end)`` until the shard stage cuts them.

The ``curate`` stage decodes each video once, at ``curate.frame_long_side`` pixels (aspect
kept, as displayed: rotation and non-square pixels applied), and splits and scores those
frames; sharpness and text are scored on a few keyframes per clip decoded larger
(``curate.keyframe_long_side``). The decoding and
scoring run in an isolated child process (`pipeline.curation.media`): a file that crashes, hangs or
exhausts the decoder is a reject (``decode_crashed``, ``decode_timeout``, ...), not a dead
worker. The stage runs as resumable parts (`pipeline.curation.parts`): a killed driver loses only the
groups in flight.
"""

from __future__ import annotations

import dataclasses
import json
import time
import traceback
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from data.checks import check_ranges
from data.images import ImageProbeConfig, probe_image, read_image
from data.probe import safe_probe
from data.shards import read_parquet, write_parquet
from data.video_io import VideoError, decode_size
from pipeline.curation.dedup import thumbnail_embeddings
from pipeline.curation.fetch import FetchError
from pipeline.curation.ingest import fetch_item
from pipeline.curation.media import MediaError, MediaLimits, iter_display, read_clip_frames, read_display, run_isolated
from pipeline.curation.parts import read_parts, run_parts
from pipeline.curation.scores import TEXT_MIN_SIZE, Bounds, apply_filters, frame_scores, keyframe_scores
from pipeline.curation.shots import ShotSplitter, buffer_frames, shot_fields


@dataclass
class CurateConfig:
    frame_long_side: int = 160  # videos are decoded at this long side for splitting and scoring
    group_size: int = 4  # videos per part: the unit of progress a killed driver can lose
    model_scores: bool = False  # run the `embed` section's open_clip scorer in the filter stage
    fetch_cache: str = "cache/fetch"  # remote inputs are fetched here (relative: under run.root)
    # Clips are scored on frames sampled at about this rate, so motion between scored frames
    # is measurable at any source fps (a slow object at 60 fps barely moves in one frame).
    score_fps: float = 8.0
    # Sharpness and text are scored on `scores.sample_frames` keyframes per clip decoded at
    # this long side (capped at the source's): subtitles are a few pixels tall at 160 px.
    keyframe_long_side: int = 640
    # Decoding and scoring run in a child process under these limits (`pipeline.curation.media`).
    media: MediaLimits = field(default_factory=MediaLimits)
    # Still images (items of kind "image"): probed and decoded by `data.images` under these.
    images: ImageProbeConfig = field(default_factory=ImageProbeConfig)

    def __post_init__(self) -> None:
        check_ranges(self, frame_long_side=">= 1", group_size=">= 1", score_fps="> 0",
                     keyframe_long_side=">= 1")


# `scores`: JSON of a scored span's scores (filter, dedup and later rejects keep them).
REJECT_SCHEMA = {"source_id": "string", "path": "string", "stage": "string", "reason": "string",
                 "detail": "string", "start": "int64", "end": "int64", "scores": "string"}


def reject(item: dict, stage: str, reason: str, detail: str = "", start=None, end=None,
           scores: dict | None = None) -> dict:
    """A reject record; a span's (start, end) and, for a scored span, its scores."""
    return {"source_id": item["id"], "path": item.get("url") or item.get("path"), "stage": stage,
            "reason": reason, "detail": detail, "start": start, "end": end, "scores": scores}


def shot_caption(item: dict, start: int, end: int) -> str:
    """The source's caption for a span: its shot's caption when the source has per-shot ones."""
    mid = (start + end) // 2
    for shot in item.get("shots") or []:
        if shot["start"] <= mid < shot["end"] and shot.get("caption"):
            return shot["caption"]
    return item.get("caption") or ""


@dataclass
class CurateConfigs:
    """Everything a curate worker needs, in one picklable bundle."""

    ingest: Any
    probe: Any
    shots: Any
    scores: Any
    curate: CurateConfig
    cache_dir: str


def decode_bytes(info: dict, long_side: int, shots=None) -> int:
    """Bytes of decoded frames at `long_side` that `analyse_video` holds at most: the frames
    the shot splitter keeps (`pipeline.curation.shots.buffer_frames` for `shots`, the
    ShotConfig), or with `shots` None the whole video."""
    h, w = decode_size(info["width"], info["height"], long_side)
    frames = int(info["num_frames"])
    if shots is not None:
        frames = min(frames, buffer_frames(float(info["fps"]), shots))
    return frames * h * w * 3


def curate_video(item: dict, c: CurateConfigs, blocklist) -> list[dict]:
    """Fetch, probe, split and score one input -> records {"kind": clip|reject|video, ...}.
    Never raises for a bad input. The probe and everything after it that decodes run in
    child processes with timeouts and memory caps (`data.probe`, `pipeline.curation.media`)."""
    max_bytes = c.curate.images.max_bytes if item.get("kind") == "image" else c.probe.max_bytes
    got, why = fetch_item(item, c.ingest, blocklist, c.cache_dir, max_bytes=max_bytes)
    if why:
        return [{"kind": "reject", **reject(item, "ingest", *why)}]
    path = got["local_path"]
    if item.get("kind") == "image":
        return curate_image(item, path, c)
    info, why = safe_probe(path, c.probe)
    if why:
        return [{"kind": "reject", **reject(item, "probe", *why)}]
    lim = c.curate.media
    need = decode_bytes(info, c.curate.frame_long_side, c.shots)
    if lim.max_memory_mb and need > MEMORY_SHARE * lim.max_memory_mb * 2**20:
        return [{"kind": "reject", **reject(
            item, "decode", "decode_too_large",
            f"the shot splitter holds up to {need / 2**20:.0f} MB of frames decoded at "
            f"{c.curate.frame_long_side} px; the decoder's limit is {lim.max_memory_mb} MB")}]
    work = dataclasses.replace(c, ingest=None, probe=None)  # what the child needs, no more
    try:
        res = run_isolated("pipeline.curation.curate:analyse_video",
                           {"item": item, "path": path, "info": info, "c": work}, lim,
                           lim.timeout_for(info["num_frames"], info["width"], info["height"]))
    except MediaError as e:
        return [{"kind": "reject", **reject(item, "decode", e.reason, e.detail)}]
    return res["records"]


# Of the media child's address-space limit, the share the shot splitter's decoded frames may
# take (the rest: the libraries, the decoder's buffers, the keyframes and the scorers' arrays).
MEMORY_SHARE = 0.5


def analyse_video(item: dict, path: str, info: dict, c: CurateConfigs) -> dict:
    """In the media child: decode, split and score one probed video -> {"records": [...]}.

    Streams the video once at ``curate.frame_long_side`` (for splitting, motion, brightness
    and the dedup thumbnails) through the shot splitter, which gives each clip's frames out as
    soon as the clip is known and then lets them go, so memory is bounded by the longest clip
    (`pipeline.curation.shots.ShotSplitter`), not the video; then decodes a few keyframes per
    clip at ``curate.keyframe_long_side`` (for sharpness and text, which small frames cannot
    see). Frames are turned to display orientation first."""

    cv2.setNumThreads(1)  # Ray gives the task that asked for this work one CPU
    t0 = time.perf_counter()
    try:
        return {"records": _split_and_score(item, path, info, c, t0)}
    except VideoError as e:  # the probe passed but the decoder did not
        return {"records": [{"kind": "reject", **reject(item, "decode", "decode_failed",
                                                        str(e)[:500])}]}
    except Exception:
        return {"records": [{"kind": "reject", **reject(item, "curate", "error",
                                                        traceback.format_exc(limit=3))}]}


def keyframe_size(width: int, height: int, long_side: int) -> tuple[int, int]:
    """(h, w) of the keyframes: the long side at `long_side`, or the source's when smaller,
    but never under the text detector's minimum (small sources are upscaled to it)."""
    target = max(TEXT_MIN_SIZE, min(long_side, max(width, height)))
    s = target / max(width, height)
    return max(2, round(height * s / 2) * 2), max(2, round(width * s / 2) * 2)


KEYFRAME_CHUNK = 32  # clips whose keyframes are decoded together (bounds their memory)


def _split_and_score(item: dict, path: str, info: dict, c: CurateConfigs, t0: float
                     ) -> list[dict]:
    fps = float(info["fps"])
    rot = info.get("rotation")
    width, height = info.get("display_width", info["width"]), info.get(
        "display_height", info["height"])
    meta = {"width": width, "height": height}
    stride = max(1, round(fps / c.curate.score_fps))
    splitter = ShotSplitter(fps, c.shots)
    scored: dict[tuple[int, int], tuple[dict, list]] = {}  # span -> (frame scores, thumb)

    def score(given: list) -> None:
        for start, end, span in given:  # span: (t, h, w, 3), let go after this
            scores = frame_scores(span[::stride], fps / stride, meta, c.scores)
            thumbs = span[np.linspace(0, len(span) - 1, 4).round().astype(int)]  # (4, h, w, 3)
            scored[(start, end)] = scores, thumbnail_embeddings([thumbs])[0].round(5).tolist()

    size = decode_size(width, height, c.curate.frame_long_side)
    decode_s, frames = 0.0, iter_display(path, size, rot)
    while True:
        chunk = next(frames, None)  # (t, h, w, 3)
        decode_s += time.perf_counter() - t0
        if chunk is None:
            break
        score(splitter.push(chunk))
        t0 = time.perf_counter()
    score(splitter.finish())
    split = splitter.result
    out: list[dict] = [{"kind": "video", "source_id": item["id"],
                        "seconds": splitter.detector.seen / fps, "decode_s": decode_s,
                        "cuts": split.cuts}]
    for start, end in split.too_short:
        out.append({"kind": "reject", **reject(item, "split", "too_short",
                                               f"{end - start} frames < {split.min_len}",
                                               start, end)})
    n_keys = c.scores.sample_frames
    ksize = keyframe_size(width, height, c.curate.keyframe_long_side)
    clips = list(zip(split.clips, split.windowed, split.shots, split.window_index,
                     split.window_count))
    for k0 in range(0, len(clips), KEYFRAME_CHUNK):
        chunk = clips[k0 : k0 + KEYFRAME_CHUNK]
        picks = [start + _sample(end - start, n_keys) for (start, end), *_ in chunk]
        wanted = sorted({int(i) for p in picks for i in p})
        big = dict(zip(wanted, read_display(path, wanted, ksize, rot)))
        for ((start, end), windowed, shot, index, count), pick in zip(chunk, picks):
            scores, thumb = scored.pop((start, end))
            keyframes = np.stack([big[int(i)] for i in pick])  # (K, H, W, 3)
            scores.update(keyframe_scores(keyframes, c.scores))
            scores.update(num_frames=end - start, windowed=bool(windowed))
            if "seconds" in scores:
                scores["seconds"] = (end - start) / fps
            failed = apply_filters(scores, c.scores)
            if failed:
                out.append({"kind": "reject", **reject(item, "filter", failed[0], failed[1],
                                                       start, end, scores=scores)})
                continue
            out.append({
                "kind": "clip",
                "clip_id": f"{item['id']}-{start:06d}-{end:06d}", "source_id": item["id"],
                "path": item["url"], "abs_path": path, "start": start, "end": end, "fps": fps,
                "width": width, "height": height, "rotation": rot or 0,
                "sar": info.get("sar") or "1:1", "pix_fmt": info.get("pix_fmt"),
                "source_fps": fps, "source_vfr": bool(info.get("vfr")),
                "caption": shot_caption(item, start, end), "scores": scores,
                **shot_fields(item["id"], shot, index, count),
                "source": {"license": item.get("license"), "source_url": item.get("source_url"),
                           **(item.get("meta") or {})},
                "source_frames": info["num_frames"], "source_bytes": info["size_bytes"],
                "codec": info["codec"], "container": info["container"],
                "thumb": thumb,
            })
    return out


# ----- still images -------------------------------------------------------------------------
# An image is one clip of one frame: start 0, end 1, at IMAGE_FPS. `clip_seconds` counts it as 0
# seconds (an image adds no footage to the funnel's hours); fps 1 keeps every (end - start) /
# fps finite and says "one frame, one second" to readers that need a rate.
IMAGE_FPS = 1.0
# Scores that need motion or a duration: not computed on (nor applied to) stills.
MOTION_SCORES = ("seconds", "motion", "jitter", "flow_residual", "noise")


def still_scores_config(cfg):
    """The ScoreConfig for stills: `cfg` without the motion and duration scores."""
    return dataclasses.replace(cfg, **{k: Bounds(enabled=False) for k in MOTION_SCORES})


def curate_image(item: dict, path: str, c: CurateConfigs) -> list[dict]:
    """Probe, decode and score one still image (`analyse_image`) in the media child -> its
    records: a per-source record and one clip, or one reject. Never raises for a bad file."""
    lim, cfg = c.curate.media, c.curate.images
    work = dataclasses.replace(c, ingest=None, probe=None)
    try:  # the probe decodes the pixels (truncation shows only there): isolated too
        res = run_isolated("pipeline.curation.curate:analyse_image",
                           {"item": item, "path": path, "c": work}, lim,
                           lim.timeout_for(1, min(cfg.max_pixels, cfg.max_side**2), 1))
    except MediaError as e:
        return [{"kind": "reject", **reject(item, "decode", e.reason, e.detail)}]
    return res["records"]


def analyse_image(item: dict, path: str, c: CurateConfigs) -> dict:
    """In the media child: `data.images.probe_image` (a bad file -> a reject of stage
    ``probe`` with its `data.images.IMAGE_REASONS` reason), then the still's scores as a
    video's are computed (shape, brightness and black frames at ``curate.frame_long_side``,
    sharpness and text on one keyframe of `keyframe_size`; no motion) and filtered, and its
    dedup signature (`thumbnail_embeddings` of the image as 4 identical keyframes, so a copy in
    a video's keyframes meets it) -> {"records": [...]}."""
    cv2.setNumThreads(1)
    t0 = time.perf_counter()
    try:
        return {"records": _score_image(item, path, c, t0)}
    except Exception:
        return {"records": [{"kind": "reject", **reject(item, "curate", "error",
                                                        traceback.format_exc(limit=3))}]}


def _score_image(item: dict, path: str, c: CurateConfigs, t0: float) -> list[dict]:
    icfg = c.curate.images
    name = item["url"]  # its extension: a PNG named .jpg is mislabelled
    info, why = probe_image(path, name, icfg)
    if why:
        return [{"kind": "reject", **reject(item, "probe", *why)}]
    rgb = read_image(path, name, cfg=icfg)  # (H, W, 3) as displayed (EXIF orientation applied)
    height, width = rgb.shape[:2]
    decode_s = time.perf_counter() - t0
    h, w = decode_size(width, height, c.curate.frame_long_side)
    small = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA)[None]  # (1, h, w, 3)
    kh, kw = keyframe_size(width, height, c.curate.keyframe_long_side)
    interp = cv2.INTER_AREA if kh * kw < height * width else cv2.INTER_CUBIC
    key = cv2.resize(rgb, (kw, kh), interpolation=interp)[None]  # (1, kh, kw, 3)
    still = still_scores_config(c.scores)
    scores = frame_scores(small, IMAGE_FPS, {"width": width, "height": height}, still)
    scores.update(keyframe_scores(key, still))
    scores.update(num_frames=1, windowed=False)
    out: list[dict] = [{"kind": "video", "source_id": item["id"], "seconds": 0.0,
                        "decode_s": decode_s, "cuts": [], "image": True}]
    failed = apply_filters(scores, still)
    if failed:
        return out + [{"kind": "reject", **reject(item, "filter", failed[0], failed[1], 0, 1,
                                                  scores=scores)}]
    thumb = thumbnail_embeddings([np.repeat(small, 4, axis=0)])[0]  # as a still video's
    return out + [{
        "kind": "image",  # a clip (run_curate files it with the clips, kind kept)
        "clip_id": f"{item['id']}-000000-000001", "source_id": item["id"],
        "path": item["url"], "abs_path": path, "start": 0, "end": 1, "fps": IMAGE_FPS,
        "width": width, "height": height, "rotation": 0, "sar": "1:1",
        "pix_fmt": info["mode"], "source_fps": IMAGE_FPS, "source_vfr": False,
        "caption": item.get("caption") or "", "scores": scores,
        **shot_fields(item["id"], (0, 1), 0, 1),
        "source": {"license": item.get("license"), "source_url": item.get("source_url"),
                   **(item.get("meta") or {})},
        "source_frames": 1, "source_bytes": info["size_bytes"],
        "codec": info["format"].lower(), "container": "image",
        "thumb": thumb.round(5).tolist(),
    }]


def _sample(n: int, k: int) -> np.ndarray:
    """Up to k evenly spaced offsets in range(n)."""
    return np.unique(np.linspace(0, n - 1, min(k, n)).round().astype(int))


def curate_group(items: list[dict], c: CurateConfigs) -> list[dict]:
    """A Ray task: one group of inputs. A bug on one input is recorded, not fatal."""
    blocklist = c.ingest.blocklist.build()
    out = []
    for item in items:
        try:
            out += curate_video(item, c, blocklist)
        except Exception:
            out.append({"kind": "reject", **reject(item, "curate", "error",
                                                   traceback.format_exc(limit=3))})
    return out


def lost_input(item: dict, why: str) -> dict:
    """The record of an input whose worker kept dying (the media work is isolated, so this is
    a bug or the node's trouble, never a file's)."""
    return {"kind": "reject", **reject(item, "curate", "worker_lost", why)}


def run_curate(items: list[dict], c: CurateConfigs, out: Path, concurrency: int, log=print
               ) -> tuple[list[dict], list[dict], list[dict]]:
    """-> (clips, rejects, per-video records), all sorted."""
    run_parts(items, partial(curate_group, c=c), out / "parts", group_size=c.curate.group_size,
              concurrency=concurrency, log=log, name="curate", on_lost=lost_input)
    clips, rejects, videos = [], [], []
    for r in read_parts(out / "parts"):
        kind = r.pop("kind")
        if kind in ("clip", "image"):  # every clip says what it is: "video" or "image"
            r["kind"] = "image" if kind == "image" else "video"
        {"clip": clips, "image": clips, "reject": rejects, "video": videos}[kind].append(r)
    clips.sort(key=lambda r: r["clip_id"])
    rejects.sort(key=lambda r: (r["source_id"], r["start"] or -1))
    return clips, rejects, videos


# ----- the filter stage: model scores and global dedup ---------------------------------------
def clip_keyframes(clip: dict, k: int, long_side: int, limits: MediaLimits | None = None
                   ) -> np.ndarray:
    """k frames spread over the clip at `long_side`, decoded in the media child."""
    idx = np.linspace(clip["start"], clip["end"] - 1, k).round().astype(int).tolist()
    return read_clip_frames(clip, idx, decode_size(clip["width"], clip["height"], long_side),
                            limits)  # (k, h, w, 3)


class ModelScorer:
    """Built once per actor: open_clip embeddings, aesthetics and caption similarity."""

    def __init__(self, embed_cfg, frame_long_side: int, limits: MediaLimits | None = None):
        self.scorer = embed_cfg.build()
        self.long_side = frame_long_side
        self.limits = limits

    def __call__(self, clips: list[dict]) -> list[dict]:
        ok, out = [], []
        for c in clips:
            try:
                ok.append((c, clip_keyframes(c, 4, self.long_side, self.limits)))
            except (MediaError, FetchError) as e:
                out.append({"clip_id": c["clip_id"], "reason": e.reason, "error": e.detail[:300]})
            except Exception as e:
                out.append({"clip_id": c["clip_id"], "error": f"{type(e).__name__}: {e}"[:300]})
        if ok:
            res = self.scorer({"frames": [f for _, f in ok],
                               "caption": [c["caption"] for c, _ in ok]})
            for i, (c, _) in enumerate(ok):
                rec = {"clip_id": c["clip_id"], "embedding": np.asarray(
                    res["embedding"][i], np.float32).round(5).tolist()}
                for k in ("aesthetic", "clip_score"):
                    if k in res:
                        rec[k] = float(res[k][i])
                out.append(rec)
        return out


# What a model-score worker needs of a clip: its span, size and where its source is.
READ_KEYS = ("clip_id", "kind", "path", "abs_path", "start", "end", "width", "height",
             "rotation", "source_bytes", "caption")


def run_model_scores(clips: list[dict], embed_cfg, long_side: int, out: Path, concurrency: int,
                     num_gpus: float, log=print, limits: MediaLimits | None = None
                     ) -> dict[str, dict]:
    run_parts([{k: c.get(k) for k in READ_KEYS} for c in clips],
              None, out / "parts", group_size=16, concurrency=concurrency, num_gpus=num_gpus,
              actor_factory=partial(ModelScorer, embed_cfg, long_side, limits), log=log,
              name="model scores")
    return {r["clip_id"]: r for r in read_parts(out / "parts")}


def dedup_priority(c: dict) -> float:
    """Which of two near-duplicates is kept (the higher): the aesthetic score when model
    scores ran, else a video clip's frame count; an image scores just under 1, larger images
    higher, so a video beats a still of it and a full-size photo beats its thumbnail."""
    if "aesthetic" in c["scores"]:
        return float(c["scores"]["aesthetic"])
    if c.get("kind") == "image":
        return 1.0 - 1.0 / (1.0 + c["width"] * c["height"])
    return float(c["end"] - c["start"])


# ----- accounting ----------------------------------------------------------------------------
def account(source_ids: set[str], clips: list[dict], rejects: list[dict]) -> dict[str, Any]:
    """Conservation check: every input is kept or rejected; raises if one went missing."""
    kept = {c["source_id"] for c in clips}
    seen = kept | {r["source_id"] for r in rejects}
    missing = source_ids - seen
    if missing:
        raise RuntimeError(f"curation lost {len(missing)} inputs: {sorted(missing)[:5]}")
    extra = seen - source_ids
    if extra:
        raise RuntimeError(f"curation produced unknown sources: {sorted(extra)[:5]}")
    reasons: dict[str, int] = {}
    for r in rejects:
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    return {
        "inputs": len(source_ids),
        "kept_sources": len(kept),
        "rejected_sources": len(source_ids - kept),
        "clips_kept": len(clips),
        "clips_filtered": sum(1 for r in rejects if r["start"] is not None),
        "reject_reasons": reasons,
        "kept_seconds": float(sum(clip_seconds(c) for c in clips)),
    }


def clip_seconds(c: dict) -> float:
    """A clip's duration; 0 for an image (it adds a frame, not footage)."""
    return 0.0 if c.get("kind") == "image" else (c["end"] - c["start"]) / c["fps"]


def write_outputs(out: Path, clips: list[dict], rejects: list[dict], stats: dict) -> None:
    write_parquet([{**c, "scores": json.dumps(c["scores"]), "source": json.dumps(c["source"]),
                    "thumb": json.dumps(c.get("thumb"))} for c in clips], out / "clips.parquet")
    write_rejects(rejects, out / "rejects.parquet")
    (out / "stats.json").write_text(json.dumps(stats, indent=2))


def write_rejects(rejects: list[dict], path: Path) -> None:
    def row(r: dict) -> dict:
        out = {k: r.get(k) for k in REJECT_SCHEMA}
        if out["scores"] is not None and not isinstance(out["scores"], str):
            out["scores"] = json.dumps(out["scores"])
        return out

    write_parquet([row(r) for r in rejects], path, schema=REJECT_SCHEMA)


def read_clips(stage_dir: Path) -> list[dict]:
    clips = read_parquet(stage_dir / "clips.parquet")
    for c in clips:
        for k in ("scores", "source", "thumb"):
            if isinstance(c.get(k), str):
                c[k] = json.loads(c[k])
    return clips


def read_rejects(stage_dir: Path) -> list[dict]:
    rejects = read_parquet(stage_dir / "rejects.parquet")
    for r in rejects:
        if isinstance(r.get("scores"), str):
            r["scores"] = json.loads(r["scores"])
    return rejects
