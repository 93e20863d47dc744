"""Labelled near-duplicate pairs from the synthetic source, to measure and calibrate dedup.

    build_set(n_videos, seed) -> clips {name: (4, h, w, 3) uint8 keyframes, as curation takes
        them}, true pairs [(a, b)] (two renders of one video), false pairs [(a, b)] (renders of
        two different videos)

A *video* is one `sample_spec` clip (3 s at 8 fps, 64 px) over one of five backgrounds in turn:
plain, grey noise fixed in time, grey noise new in every frame, black letterbox bars, or a
bright gradient; the last two are the same in every video, as bars and skies are in real
footage (what made the old thumbnail signature call different videos copies). Its *renders*
are what a re-upload of the same footage looks like: the reference (x264 crf 20 at 64 px),
x264 crf 35, MPEG-4 part 2, VP9, resized to 96 and 48 px, a ~10% crop, +15 brightness, and
two frames trimmed off the start. Every render is decoded and its keyframes
taken as the curate stage does (`pipeline.curation.curate`: the whole span decoded at up to
``frame_long_side`` px, 4 frames evenly spaced), so a score measured here is the score dedup
sees.

True pairs: the reference against each other render of the same video. False pairs: the
reference against every render of every other video, so each false pair shares the vocabulary
(colours, shapes, backgrounds, noise) and often the background.
"""

from __future__ import annotations

import io
from dataclasses import replace

import av
import cv2
import numpy as np

from data.synthetic import render, sample_spec
from data.video_io import decode_size, encode_mp4, probe, read_frames

FPS = 8.0
NUM_FRAMES = 24
SIZE = 64
BACKGROUNDS = ("plain", "static_noise", "temporal_noise", "letterbox", "gradient")
RENDERS = ("crf35", "mpeg4", "vp9", "size96", "size48", "crop", "bright", "trim")


def _encode(frames: np.ndarray, codec: str) -> bytes:
    """(T, H, W, 3) uint8 -> bytes of `codec` in its usual container (mp4 or webm)."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="webm" if codec == "libvpx-vp9" else "mp4") as out:
        stream = out.add_stream(codec, rate=int(FPS))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        if codec == "mpeg4":
            stream.codec_context.bit_rate = 200_000
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def keyframes(video: bytes, long_side: int = 160, k: int = 4) -> np.ndarray:
    """The keyframes curation takes from a whole-video clip -> (k, h, w, 3) uint8."""
    p = probe(video)
    frames = read_frames(video, size=decode_size(p.width, p.height, long_side))  # (T, h, w, 3)
    return frames[np.linspace(0, len(frames) - 1, k).round().astype(int)]


def _video(seed: int, background: str, spec) -> np.ndarray:
    """The video at 64 px -> (T, 64, 64, 3) uint8."""
    frames = render(spec, NUM_FRAMES, SIZE, SIZE).astype(np.float32)  # (T, S, S, 3)
    rng = np.random.default_rng([seed, 1])
    if background == "letterbox":  # the picture squeezed to 2.4:1 between black bars
        band = round(SIZE / 2.4)
        top = (SIZE - band) // 2
        boxed = np.zeros_like(frames)
        boxed[:, top : top + band] = [cv2.resize(f, (SIZE, band), interpolation=cv2.INTER_AREA)
                                     for f in frames]
        frames = boxed
    elif background == "gradient":  # a bright sky fading down, the same for every video
        frames += np.linspace(120, 0, SIZE, dtype=np.float32)[None, :, None, None]
    elif background == "static_noise":  # grey noise, fixed in time
        frames += rng.normal(0, 25, (1, SIZE, SIZE, 1)).astype(np.float32)
    elif background == "temporal_noise":  # grey noise, new in every frame
        frames += rng.normal(0, 10, (NUM_FRAMES, SIZE, SIZE, 1)).astype(np.float32)
    return np.clip(frames, 0, 255).astype(np.uint8)


def _resized(frames: np.ndarray, size: int) -> np.ndarray:
    """(T, S, S, 3) -> (T, size, size, 3), area-downscaled or bicubic-upscaled."""
    interp = cv2.INTER_AREA if size < frames.shape[1] else cv2.INTER_CUBIC
    return np.stack([cv2.resize(f, (size, size), interpolation=interp) for f in frames])


def renders(seed: int, background: str) -> dict[str, bytes]:
    """One video's reference and its renders -> {render name: video bytes}."""
    spec = sample_spec(np.random.default_rng(seed))
    spec = replace(spec, speed=max(1, spec.speed))
    base = _video(seed, background, spec)  # (T, 64, 64, 3)
    out = {"ref": encode_mp4(base, FPS, crf=20), "crf35": encode_mp4(base, FPS, crf=35),
           "mpeg4": _encode(base, "mpeg4"), "vp9": _encode(base, "libvpx-vp9")}
    for size in (96, 48):
        out[f"size{size}"] = encode_mp4(_resized(base, size), FPS, crf=20)
    out["crop"] = encode_mp4(np.ascontiguousarray(base[:, 3:-3, 3:-3]), FPS, crf=20)
    out["bright"] = encode_mp4(np.clip(base.astype(int) + 15, 0, 255).astype(np.uint8), FPS, crf=20)
    out["trim"] = encode_mp4(base[2:], FPS, crf=20)
    return out


def build_set(n_videos: int, seed: int = 0) -> tuple[dict[str, np.ndarray], list, list]:
    """n_videos videos (backgrounds in turn) -> (keyframes by clip name, true pairs, false pairs)."""
    clips: dict[str, np.ndarray] = {}
    for v in range(n_videos):
        for name, data in renders(seed * 100_003 + v, BACKGROUNDS[v % len(BACKGROUNDS)]).items():
            clips[f"v{v:03d}-{name}"] = keyframes(data)
    true = [(f"v{v:03d}-ref", f"v{v:03d}-{r}") for v in range(n_videos) for r in RENDERS]
    false = [(f"v{a:03d}-ref", f"v{b:03d}-{r}") for a in range(n_videos) for b in range(n_videos)
             if a != b for r in ("ref", *RENDERS)]
    return clips, true, false


def precision_recall(scores_true: np.ndarray, scores_false: np.ndarray, threshold: float
                     ) -> tuple[float, float]:
    """Pairs at or above `threshold` are called duplicates -> (precision, recall)."""
    tp = int((scores_true >= threshold).sum())
    fp = int((scores_false >= threshold).sum())
    return (tp / (tp + fp) if tp + fp else 1.0), tp / len(scores_true)
