"""Sharding: cut each kept clip out of its source, encode it, and pack WebDataset tars.

Per clip a tar holds ``<key>.mp4`` (H.264, the clip's span only), ``<key>.json`` (metadata,
scores, source metadata and which captioner made the caption) and ``<key>.txt`` (the caption).
Keys are the clip ids, so they are deterministic.

Image clips (``kind`` "image", from still-image inputs) are written as images, not 1-frame
mp4s: ``<key>.jpg`` (or ``.png``: ``image_format``), ``<key>.json``, ``<key>.txt``, in the
same shards as the videos. The image is the source as displayed (EXIF orientation applied,
alpha flattened onto white, as curation scored it) at its display size (a video clip keeps
its display size too: nothing is resized here), re-encoded, so no EXIF or GPS metadata
survives. Its ``.json`` holds what a video's does (``clip_id``, ``source_id``, ``path``,
``caption``, ``caption_source``, ``scores``, ``source``, the shot keys, ``source_fps``,
``source_vfr``, ``source_rotation``, ``source_sar``) with ``kind`` "image", ``start`` 0,
``end`` 1, ``fps`` 1.0, ``num_frames`` 1, ``width``, ``height`` (the written image's),
``has_audio`` false, ``image_format`` ("jpg" | "png") and ``source_format`` ("jpeg", "png",
"webp"). A video's ``.json`` has no ``kind``.

Plan: clips go to ``train`` or ``val`` by a hash of their key (stable when clips are added or
removed), then, in key order, into shards of about ``target_shard_bytes`` (estimated from each
source's bitrate and the clip's share of it; ``max_clips_per_shard`` caps the count too). The
plan is a pure function of the clips and the config.

Writing: one Ray task per shard encodes its clips and writes the tar under a temporary name,
renamed when complete, then a sidecar ``<shard>.rows.json`` listing what it holds (and which
clips failed to encode). Resuming: a shard whose sidecar exists is done and is not written
again, so a driver killed mid-stage and rerun ends with every planned clip exactly once.

Encoding: every clip's mp4 holds one H.264 yuv420p video stream with square pixels, upright,
at a constant frame rate, and none of the source's metadata (title, GPS location, ...); no
audio unless ``keep_audio``. A clip that spans its whole source, already such a stream in an
mp4 (H.264, yuv420p, constant rate, upright, square pixels), is remuxed (``passthrough``:
its video packets stream-copied into a new mp4, nothing decoded, `remux_source`); other clips
are re-encoded with x264 (``crf``, ``preset``), streaming frames from the decoder into the
encoder so memory stays flat whatever the clip's length (`encode_span`). Both run in the
media child (`pipeline.curation.media`: a timeout and a memory cap, so a file that breaks the demuxer
or decoder is an ``encode_*`` reject, not a dead task). Re-encoding applies the source's
rotation and sample aspect ratio to the pixels (no reader of ours applies a display matrix or
a pixel aspect: a 704x576 frame with 16:11 pixels becomes 1024x576) and resamples
variable-rate sources by timestamp. With ``keep_audio`` the source's first audio stream is
copied too (over the clip's span when re-encoding) when an mp4 holds its codec
(`data.video_io.MP4_AUDIO`). The ``.json`` records the mp4's ``num_frames``, ``fps``,
``width``, ``height`` and ``has_audio`` and the source's ``source_fps``, ``source_vfr``,
``source_rotation`` and ``source_sar``. A source missing on this node (fetched by another) is
fetched again (`pipeline.curation.media.source_path`). A transient upload failure (bucket roots) is
retried.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from data.checks import check_ranges
from data.images import read_image
from data.probe import display_size
from data.progress import Progress
from data.shards import write_shard, write_sidecar
from data.storage import Store
from data.video_io import MP4_AUDIO, _rate, remux_mp4
from pipeline.curation.fetch import FetchError
from pipeline.curation.media import (
    MediaError,
    MediaLimits,
    reread_config,
    run_isolated,
    source_path,
    stored_size,
    to_display,
    turned,
)
from pipeline.curation.retry import TransientError, is_transient, retry
from pipeline.curation.shots import SHOT_KEYS


@dataclass
class ShardConfig:
    target_shard_bytes: int = 10**9  # about this many bytes of mp4 per tar (~1 GB, WebDataset's usual)
    max_clips_per_shard: int = 0  # 0: no cap
    val_fraction: float = 0.1
    min_val_clips: int = 2
    crf: int = 18  # H.264 quality of re-encoded clips
    preset: str = "veryfast"  # x264 speed preset of re-encoded clips
    passthrough: bool = True  # remux whole-source H.264/mp4 clips without re-encoding
    keep_audio: bool = False  # copy the source's first audio stream into the clip's mp4
    # Image clips are written as images: "jpg" (every image, JPEG at `image_quality`), "png"
    # (every image, lossless) or "source" (png for png sources, jpg for the others).
    image_format: str = "jpg"
    image_quality: int = 95  # JPEG quality of image clips (4:4:4 chroma above 90)
    max_retries: int = 2  # Ray task retries of a shard (worker lost, upload still failing)
    upload_retries: int = 3  # retries of a transient upload failure, within the task
    upload_backoff_s: float = 1.0
    progress_every_s: float = 10.0  # a progress line at most this often
    # Re-encoding runs in a child process under these limits (`pipeline.curation.media`); x264 at full
    # resolution is slower than decoding, hence the larger allowance per megapixel.
    media: MediaLimits = field(default_factory=lambda: MediaLimits(s_per_mpx=0.2))

    def __post_init__(self) -> None:
        check_ranges(self, target_shard_bytes=">= 1", max_clips_per_shard=">= 0",
                     val_fraction="in [0, 1]", min_val_clips=">= 0", crf=">= 0", max_retries=">= 0",
                     upload_retries=">= 0", upload_backoff_s=">= 0", progress_every_s=">= 0",
                     image_quality=">= 1")
        if self.image_quality > 100:
            raise ValueError(f"shard.image_quality must be <= 100, got {self.image_quality}")
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"shard.image_format must be one of {list(IMAGE_FORMATS)}, got "
                             f"{self.image_format!r}")


IMAGE_FORMATS = ("jpg", "png", "source")


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


def interleaved(clips: list[dict]) -> list[dict]:
    """Videos and images each in clip-id order, interleaved in proportion (the i-th of n of a kind
    at (i + 0.5) / n of the way), so every shard holds both kinds in about their overall share
    and each loader reader (a slice of the shards) sees both (``train.data.mix``). Videos
    alone: clip-id order, as before."""
    kinds: dict[str, list[dict]] = {}
    for c in sorted(clips, key=lambda c: c["clip_id"]):
        kinds.setdefault(c.get("kind") or "video", []).append(c)
    placed = [((i + 0.5) / len(group), kind, c) for kind, group in sorted(kinds.items())
              for i, c in enumerate(group)]
    return [c for _, _, c in sorted(placed, key=lambda p: (p[0], p[1]))]


def plan_shards(clips: list[dict], cfg: ShardConfig) -> list[tuple[str, list[dict]]]:
    """[(shard name, clips)] in a deterministic order (`interleaved`)."""
    splits = assign_splits([c["clip_id"] for c in clips], cfg)
    plan = []
    for split in ("train", "val"):
        mine = interleaved([c for c in clips if splits[c["clip_id"]] == split])
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


# Pixel formats a whole-source clip is remuxed in; others are re-encoded to yuv420p.
PASSTHROUGH_PIX_FMTS = ("yuv420p",)


def whole_source(clip: dict) -> bool:
    """Remuxed, not re-encoded: the whole source, H.264 yuv420p in mp4, constant frame rate,
    upright, square pixels (a clip from before ``pix_fmt`` was recorded is re-encoded)."""
    return (clip["start"] == 0 and clip["end"] == clip.get("source_frames")
            and clip.get("codec") == "h264" and "mp4" in (clip.get("container") or "")
            and clip.get("pix_fmt") in PASSTHROUGH_PIX_FMTS
            and (clip.get("sar") or "1:1") == "1:1"
            and not clip.get("source_vfr") and not clip.get("rotation"))


def encode_clip(clip: dict, cfg: ShardConfig) -> tuple[bytes, dict]:
    """The clip's mp4 and what it holds ({"num_frames", "fps", "width", "height",
    "has_audio"}): the source remuxed (`remux_source`) or re-encoded (`encode_span`), in the
    media child. Fetches the source on a miss. Raises pipeline.curation.media.MediaError
    (``encode_*``) or pipeline.curation.fetch.FetchError."""
    path = source_path(clip)
    lim = cfg.media
    if cfg.passthrough and whole_source(clip):
        res = run_isolated(  # demuxing only: the time grows with the bytes, not the pixels
            "pipeline.curation.shard:remux_source", {"path": path, "keep_audio": cfg.keep_audio},
            lim, lim.timeout_s + (clip.get("source_bytes") or 0) / 50e6, stage="encode")
        return res.pop("payload"), {**res, "fps": clip["fps"], "width": clip["width"],
                                    "height": clip["height"]}
    preroll = min(clip["start"], 300)  # frames decoded from the keyframe before the start
    res = run_isolated(
        "pipeline.curation.shard:encode_span",
        {"path": path, "start": clip["start"], "end": clip["end"], "fps": clip["fps"],
         "rotation": clip.get("rotation") or 0, "source_frames": clip.get("source_frames"),
         "crf": cfg.crf, "preset": cfg.preset, "sar": clip.get("sar") or "1:1",
         "keep_audio": cfg.keep_audio},
        lim, lim.timeout_for(clip["end"] - clip["start"] + preroll, clip["width"],
                             clip["height"]), stage="encode")
    return res.pop("payload"), res


def image_member(clip: dict, cfg: ShardConfig) -> str:
    """The WebDataset member an image clip is written as: "jpg" or "png"."""
    if cfg.image_format == "source":
        return "png" if clip.get("codec") == "png" else "jpg"
    return cfg.image_format


def encode_image_clip(clip: dict, cfg: ShardConfig) -> tuple[bytes, str, dict]:
    """An image clip's bytes, its member name ("jpg" | "png") and what it holds ({"num_frames":
    1, "fps", "width", "height", "has_audio": False}): decoded in the media child as displayed
    (EXIF orientation applied, alpha flattened, as curation scored it) at its display size, the
    size a video clip keeps, and written without the source's metadata (EXIF, GPS, ...).
    Raises MediaError (``encode_*``) or FetchError."""
    path = source_path(clip)
    member = image_member(clip, cfg)
    res = run_isolated("pipeline.curation.shard:encode_image",
                       {"path": path, "name": clip.get("path") or path,
                        "cfg": reread_config(clip), "member": member,
                        "quality": cfg.image_quality},
                       cfg.media, cfg.media.timeout_for(1, clip["width"], clip["height"]),
                       stage="encode")
    data = res.pop("payload")
    return data, member, {"num_frames": 1, "fps": clip["fps"], **res, "has_audio": False}


def encode_image(path: str, name: str, cfg, member: str, quality: int) -> dict:
    """In the media child: the image at `path` (`data.images.read_image`) as `member` bytes ->
    {"payload", "width", "height"}."""

    rgb = read_image(path, name, cfg=cfg)  # (H, W, 3)
    buf = io.BytesIO()
    if member == "png":
        Image.fromarray(rgb).save(buf, format="PNG", optimize=False)
    else:
        Image.fromarray(rgb).save(buf, format="JPEG", quality=quality,
                                  subsampling=0 if quality > 90 else 2)
    return {"payload": buf.getvalue(), "width": int(rgb.shape[1]), "height": int(rgb.shape[0])}


def remux_source(path: str, keep_audio: bool) -> dict:
    """In the media child: the source's video stream (and with `keep_audio` its audio)
    stream-copied into a new mp4 without its metadata (`data.video_io.remux_mp4`)."""
    mp4, frames, has_audio = remux_mp4(path, audio=keep_audio)
    return {"payload": mp4, "num_frames": frames, "has_audio": has_audio}


def frame_times(path: str) -> tuple[list[int], float]:
    """Presentation timestamps of every video frame (demuxed, not decoded), sorted, and the
    stream's time base."""
    with av.open(path) as c:
        s = c.streams.video[0]
        ts = sorted({p.pts for p in c.demux(s) if p.size and p.pts is not None})
        return ts, float(s.time_base)


def encode_span(path: str, start: int, end: int, fps: float, rotation: int,
                source_frames: int | None, crf: int, preset: str, sar: str = "1:1",
                keep_audio: bool = False) -> dict:
    """In the media child: frames [start, end) of `path` re-encoded at a constant `fps`, as
    displayed (turned by `rotation`, resampled to square pixels by the sample aspect ratio
    `sar`), streamed frame by frame from the decoder into x264 (memory does not grow with the
    clip's length or resolution). With `keep_audio`, the source's first audio stream's packets
    over the span are copied in (`copy_audio`).

    Frames are chosen by timestamp, as video2dataset does: output frame k shows the source
    frame on screen at ``t(start) + k / fps``, over ``[t(start), t(end))`` (``t(n)`` is the last
    frame's time plus the mean frame gap). A constant-rate source gives back exactly its
    frames ``start..end-1``; a variable-rate one has frames repeated where it was slower
    than `fps` and dropped where it was faster. Without usable timestamps, frames are taken
    by count. -> {"payload": mp4 bytes, "num_frames", "fps", "width", "height",
    "has_audio"}."""



    ts, tb = frame_times(path)
    by_time = len(ts) >= 2 and (source_frames is None or len(ts) == source_frames)
    if by_time:
        gap = (ts[-1] - ts[0]) / (len(ts) - 1)
        t0 = ts[start]
        t_end = ts[end] if end < len(ts) else ts[-1] + gap
        n_out = max(1, round((t_end - t0) * tb * fps))
        step = 1.0 / (fps * tb)  # output frame period, in source ticks
        targets = [t0 + k * step for k in range(n_out)]
        eps = 0.25 * step
    else:
        n_out = end - start
    buf = io.BytesIO()
    out = av.open(buf, mode="w", format="mp4")
    enc = out.add_stream("libx264", rate=_rate(fps))
    enc.pix_fmt = "yuv420p"
    enc.codec_context.thread_count = 1  # Ray gives each task one CPU
    enc.options = {"crf": str(crf), "preset": preset}
    audio = open_audio(path, out) if keep_audio and by_time else None
    written = sounds = 0
    shape = resample = None

    def emit(frame) -> None:
        nonlocal written, shape, resample
        if shape is None:
            w, h = display_size(frame.width, frame.height, sar, rotation)
            shape = (h // 2 * 2, w // 2 * 2)
            enc.height, enc.width = shape
            enc.codec_context.time_base = Fraction(1, 1) / _rate(fps)
            if sar != "1:1":  # non-square pixels: resample to the displayed size, as stored
                resample = stored_size(shape, rotation)  # (h, w)
        if resample is not None:
            frame = frame.reformat(width=resample[1], height=resample[0],
                                   interpolation="BICUBIC")
        h, w = frame.height, frame.width
        if turned(rotation):
            h, w = w, h
        if rotation or (h, w) != shape:  # turn or crop the pixels (odd sizes: yuv420p)
            rgb = to_display(frame.to_ndarray(format="rgb24")[None], rotation)[0]  # (H, W, 3)
            vf = av.VideoFrame.from_ndarray(
                np.ascontiguousarray(rgb[: shape[0], : shape[1]]), format="rgb24")
        else:  # as decoded: no RGB round trip
            vf = frame if frame.format.name == "yuv420p" else frame.reformat(format="yuv420p")
        vf.pts, vf.time_base = written, enc.codec_context.time_base
        for packet in enc.encode(vf):
            out.mux(packet)
        written += 1

    try:
        with av.open(path) as src:
            stream = src.streams.video[0]
            stream.codec_context.thread_count = 1
            if by_time:
                src.seek(int(t0), stream=stream, backward=True, any_frame=False)
                prev = None
                for frame in src.decode(stream):
                    t = frame.pts
                    if t is None:
                        raise ValueError("a decoded frame has no timestamp")
                    while written < n_out and t > targets[written] + eps:
                        emit(prev if prev is not None else frame)
                    if written >= n_out:
                        break
                    prev = frame
                while prev is not None and written < n_out:
                    emit(prev)
            else:
                for i, frame in enumerate(src.decode(stream)):
                    if i >= end:
                        break
                    if i >= start:
                        emit(frame)
        for packet in enc.encode():
            out.mux(packet)
        if audio is not None:
            sounds = copy_audio(*audio, out, t0 * tb, t_end * tb)
    finally:
        out.close()
        if audio is not None:
            audio[0].close()
    if written != n_out:
        raise ValueError(f"encoded {written} of {n_out} frames")
    return {"payload": buf.getvalue(), "num_frames": written, "fps": fps,
            "width": shape[1], "height": shape[0], "has_audio": sounds > 0}


def open_audio(path: str, out) -> tuple | None:
    """(source container, its first audio stream, the stream added to `out`) when `path` has
    an audio stream an mp4 holds as it is (`data.video_io.MP4_AUDIO`), else None."""

    src = av.open(path, options={"protocol_whitelist": "file"})
    sound = src.streams.audio[0] if src.streams.audio else None
    if sound is None or sound.codec_context is None or sound.codec_context.name not in MP4_AUDIO:
        src.close()
        return None
    return src, sound, out.add_stream_from_template(sound)


def copy_audio(src, sound, dest, out, t0: float, t1: float) -> int:
    """Audio packets of `sound` presented in [t0, t1) seconds, moved to start at 0 (the
    re-encoded video's start) and muxed into `out` as `dest` -> how many. Stream copy: the cut
    falls on the codec's frame boundaries (~20 ms for AAC)."""
    tb = float(sound.time_base)
    shift = round(t0 / tb)
    copied = 0
    for packet in src.demux(sound):
        if not packet.size or packet.pts is None:
            continue
        if packet.pts * tb >= t1:
            break
        if packet.pts * tb < t0:
            continue
        packet.pts -= shift
        if packet.dts is not None:
            packet.dts -= shift
        packet.stream = dest
        out.mux(packet)
        copied += 1
    return copied


META_KEYS = ("clip_id", "kind", "source_id", "path", "start", "end", "fps", "width", "height",
             "caption", "caption_source", "scores", "source", "source_fps", "source_vfr",
             *SHOT_KEYS)


def write_one_shard(path: str, clips: list[dict], cfg: ShardConfig,
                    upload_url: str | None = None) -> dict:
    """Runs as a Ray task: the tar, then its sidecar. Returns the sidecar's content.

    With `upload_url` (a bucket run root, where the driver's directory is not shared), the tar
    is written to this node's temporary directory and uploaded to ``<upload_url>/shards/``;
    a transient upload failure is retried with backoff, then raised as
    `pipeline.curation.retry.TransientError`, which Ray retries the task on."""

    final = path
    if upload_url:
        path = str(Path(tempfile.mkdtemp(prefix="shard-")) / Path(final).name)
    samples, rows, failed = [], [], []
    for c in clips:
        image = c.get("kind") == "image"
        try:
            if image:
                data, member, got = encode_image_clip(c, cfg)
            else:
                (data, got), member = encode_clip(c, cfg), "mp4"
        except (MediaError, FetchError) as e:
            failed.append(_failed(c, e.reason, e.detail))
            continue
        except Exception as e:  # noqa: BLE001 - one bad clip must not lose the shard
            failed.append(_failed(c, "encode_failed", f"{type(e).__name__}: {e}"))
            continue
        # What the mp4 holds: display size, constant frame rate; the source's rate,
        # orientation and pixel aspect are kept beside it.
        meta = {**{k: c.get(k) for k in META_KEYS}, **got,
                "source_rotation": c.get("rotation") or 0, "source_sar": c.get("sar") or "1:1"}
        if image:  # kind "image", start 0, end 1, fps 1 (curate.IMAGE_FPS), num_frames 1
            meta.update(kind="image", image_format=member, source_format=c.get("codec"))
        else:
            meta.pop("kind", None)  # a video sample's json is as before images came
        samples.append({"__key__": c["clip_id"], member: data, "json": meta,
                        "txt": c["caption"]})
        rows.append({"key": c["clip_id"], "shard": Path(path).name, "bytes": len(data),
                     "num_frames": got["num_frames"], "kind": "image" if image else "video",
                     "member": member})
    nbytes = write_shard(path, samples) if samples else 0
    side = {"shard": Path(path).name, "rows": rows, "failed": failed, "bytes": nbytes}
    if upload_url:
        if samples:
            upload(path, upload_url, f"shards/{Path(path).name}", cfg)
            os.remove(path)
        os.rmdir(Path(path).parent)
        return side
    write_sidecar(final, side)
    return side


def _failed(c: dict, reason: str, detail: str) -> dict:
    return {"source_id": c["source_id"], "path": c["path"], "stage": "shard", "reason": reason,
            "detail": detail[:1000], "start": c["start"], "end": c["end"],
            "scores": c.get("scores")}


def upload(local: str, url: str, rel: str, cfg: ShardConfig) -> None:
    """Put one file under a bucket root, retrying transient failures."""
    try:
        retry(lambda: Store(url).put_file(local, rel), attempts=cfg.upload_retries + 1,
              backoff_s=cfg.upload_backoff_s)
    except Exception as e:
        if is_transient(e):  # outlasted the retries: let Ray run the task again
            raise TransientError(f"uploading {rel}: {type(e).__name__}: {e}") from e
        raise


def run_sharding(clips: list[dict], cfg: ShardConfig, out: Path, concurrency: int = 2,
                 log=print, upload_url: str | None = None) -> dict:
    """Write the planned shards that are not written yet, as Ray tasks (at most 2 x
    `concurrency` in flight), logging progress (``data.progress``: clips written / total, rate,
    ETA) after the first shard, at most every `cfg.progress_every_s` seconds, and at the end."""
    import ray  # lazy: ray ~1.7 s (ray.train ~4.7 s) to import, needed only here

    shard_dir = out / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    plan = plan_shards(clips, cfg)
    done = {name for name, _ in plan if (shard_dir / f"{name}.rows.json").exists()}
    if done:
        log(f"shard: {len(done)} of {len(plan)} shards already written, resuming")
    # Worker deaths are retried max_retries times (not Ray's default of forever: the media
    # work is isolated, so a death is the node's, not a file's); so are uploads that stayed
    # transiently failing through their own retries.
    task = ray.remote(num_cpus=1, max_retries=cfg.max_retries,
                      retry_exceptions=[TransientError])(write_one_shard)
    t0 = time.time()
    pending = [(name, group) for name, group in plan if name not in done]
    total_clips = sum(len(g) for _, g in pending)
    counts = {"shards": 0, "clips": 0, "failed": 0}
    progress = Progress("shard", total_clips, unit="clip", every_s=cfg.progress_every_s, write=log)
    refs: list = []

    def finish(ready) -> None:  # sidecars of uploaded shards are written here, by the driver
        for side in ray.get(ready):
            if upload_url:
                write_sidecar(str(shard_dir / side["shard"]), side)
            counts["shards"] += 1
            counts["clips"] += len(side["rows"]) + len(side["failed"])
            counts["failed"] += len(side["failed"])
        progress.update(counts["clips"], f"shard {counts['shards']}/{len(pending)}, "
                                         f"{counts['failed']} failed")

    for name, group in pending:  # at most 2 x concurrency in flight: backpressure
        if len(refs) >= 2 * concurrency:
            ready, refs = ray.wait(refs, num_returns=1)
            finish(ready)
        refs.append(task.remote(str(shard_dir / name), group, cfg, upload_url))
    while refs:
        ready, refs = ray.wait(refs, num_returns=1)
        finish(ready)
    dt = time.time() - t0
    log(f"shard: wrote {len(pending)} shards ({total_clips} clips, "
        f"{total_clips / max(dt, 1e-9):.2f} clips/s) in {dt:.1f}s, reused {len(done)}")
    by_key = {c["clip_id"]: c for c in clips}
    rows, failed, shards, nsamples = [], [], {"train": [], "val": []}, {}
    for name, _ in plan:
        side = json.loads((shard_dir / f"{name}.rows.json").read_text())
        split = name.split("-")[0]
        failed += side["failed"]
        if side["rows"]:
            shards[split].append(name)
            nsamples[name] = len(side["rows"])
        for row in side["rows"]:
            c = by_key[row["key"]]
            rows.append({**row, "kind": row.get("kind") or c.get("kind") or "video",
                         "member": row.get("member") or "mp4", "split": split, "source_id": c["source_id"], "path": c["path"],
                         "start": c["start"], "end": c["end"], "caption": c["caption"],
                         "caption_source": c.get("caption_source") or "",
                         **{k: c.get(k) for k in SHOT_KEYS},
                         "scores": json.dumps(c["scores"]),
                         "source": json.dumps(c.get("source") or {})})
    return {"rows": rows, "failed": failed, "shards": shards, "nsamples": nsamples,
            "written": len(pending), "reused": len(done)}


def wids_index(split: str, names: list[str], nsamples: dict[str, int]) -> dict:
    """A split's shards as WebDataset's indexed reader (``wids.ShardListDataset``) opens them: its
    shard-index JSON, urls relative to the file (written beside ``index.json``)."""
    return {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": split,
            "shardlist": [{"url": f"shards/{n}", "nsamples": nsamples[n]} for n in names]}
