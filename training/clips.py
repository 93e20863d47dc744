"""Shard samples -> clips: the decoding the loader, validation, precompute and the benchmarks share.

A raw sample (mp4 + .json + .txt) is decoded to (T, H, W, 3) uint8 frames at a bucket's shape
(`decode_frames`: a window drawn per epoch and key, resized and centre-cropped), turned into
(3, T, H, W) uint8 (`to_tensor`) and batched (`collate`, `as_batch`); `normalize` makes model
inputs on the device. `read_clips` reads a fixed validation set; `latent_frames` says which
windows a stored latent holds.

Images: a sample with no ``mp4`` and a ``jpg``/``jpeg``/``png``/``webp`` member (`image_member`;
its ``.json`` says ``"kind": "image"``, or is missing in LAION-style shards) is a 1-frame clip.
It is decoded with `data.images.read_image` (EXIF orientation applied, alpha flattened), resized
to cover the shape and centre-cropped by the rule video frames follow (`resize_crop_size`), and
no video decoder is involved. Its geometry comes from its ``.json``, else from the image header
(`image_size`: no pixels decoded). An image has only 1-frame windows: asking `decode_frames`
for more raises (the loader gives images only 1-frame buckets; `read_clips` skips them).
The content decides the format, not the member name (a PNG stored as ``.jpg`` decodes), and
the training decoder applies no ``min_side`` (the bucket and ``max_upscale`` decide that);
the probe's size caps (a decompression bomb) still hold. A corrupt image raises
`data.images.ImageReject`, which the callers count as a skip like a corrupt mp4.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import random

import numpy as np
import torch
from PIL import Image

from data.images import ImageProbeConfig, ImageReject, exif_orientation, read_image
from data.shards import read_shards
from data.video_io import probe, read_frames

IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")  # WebDataset member names of a still image
# The training decoder's limits: the probe's caps on size, no minimum side (buckets decide)
TRAIN_IMAGES = ImageProbeConfig(min_side=1)


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def to_tensor(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (3, T, H, W) uint8. Batches stay uint8 (4x smaller to move);
    `normalize` turns them into model inputs on the device."""
    # numpy, single-threaded: torch's parallel copy stalls when loader and trainer share cores
    return torch.from_numpy(np.ascontiguousarray(frames.transpose(3, 0, 1, 2)))  # (3, T, H, W)


def normalize(video: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 video (..., 3, T, H, W) -> dtype in [-1, 1]."""
    return video.to(dtype).div_(127.5).sub_(1.0)


def clip_window(n: int, num_frames: int, stride: int, rng: random.Random | None) -> list[int]:
    """Indices of num_frames frames `stride` apart (random start if rng, else the first).
    Short clips lower the stride, then repeat their last frame."""
    while stride > 1 and (num_frames - 1) * stride + 1 > n:
        stride -= 1
    span = (num_frames - 1) * stride + 1
    if n >= span:
        start = rng.randrange(n - span + 1) if rng is not None else 0
        return list(range(start, start + span, stride))
    return [min(i, n - 1) for i in range(num_frames)]


def resize_crop_size(h: int, w: int, size: tuple[int, int]) -> tuple[int, int]:
    """The (h', w') to resize to so that a centre crop of `size` keeps the aspect ratio."""
    th, tw = size
    scale = max(th / h, tw / w)
    return max(th, math.ceil(h * scale)), max(tw, math.ceil(w * scale))


def image_member(sample: dict) -> str | None:
    """The member holding a still image sample's bytes (``jpg``, ``png``, ...), or None for a
    video sample (one with an ``mp4``) and for a sample with no image."""
    if "mp4" in sample:
        return None
    return next((m for m in IMAGE_MEMBERS if m in sample), None)


def sample_kind(sample: dict) -> str:
    """``image`` or ``video``, from a raw or parsed sample's members and metadata (no decoding):
    a still image member, or a latent whose ``.json`` says ``"kind": "image"`` or whose encoded
    clip is one frame (``video_shape`` (1, H, W)); else ``video``. A ``.json`` that is not JSON
    says nothing (the sample is a video, skipped as corrupt when it is decoded)."""
    if "mp4" in sample:
        return "video"
    if image_member(sample) is not None:
        return "image"
    meta = sample.get("json")
    if isinstance(meta, (bytes, bytearray)):
        try:
            meta = json.loads(meta)
        except ValueError:
            meta = None
    if isinstance(meta, dict) and (meta.get("kind") == "image" or (meta.get("video_shape") or [0])[0] == 1):
        return "image"
    return "video"


def image_size(data: bytes) -> tuple[int, int]:
    """(height, width) of an image as shown (EXIF orientation applied), from its header alone.
    Raises ImageReject("undecodable") for bytes Pillow cannot identify."""
    try:
        with Image.open(io.BytesIO(data)) as im:  # the header only
            w, h = im.size
            turned = exif_orientation(im) in (5, 6, 7, 8)  # rotated by 90 degrees
    except Exception as e:  # noqa: BLE001 - any header Pillow chokes on
        raise ImageReject("undecodable", f"header: {str(e)[:200]}") from None
    return (w, h) if turned else (h, w)


def decode_frames(sample: dict, num_frames: int, size: tuple[int, int],
                  target_fps: float | None, rng: random.Random | None
                  ) -> tuple[np.ndarray, str]:
    """One WebDataset sample -> ((T, H, W, 3) uint8, possibly a strided view; caption). An
    image sample is one frame: (1, H, W, 3); asking it for more frames raises."""
    if image_member(sample) is not None and num_frames != 1:
        raise ValueError(f"sample {sample.get('__key__')!r} is an image: it has 1 frame, not {num_frames}")
    n, fps, h, w = clip_geometry(sample)
    stride = max(1, round(fps / target_fps)) if target_fps else 1
    return read_resized(sample, clip_window(n, num_frames, stride, rng), (h, w), size), sample.get("txt") or ""


def clip_geometry(sample: dict) -> tuple[int, float, int, int]:
    """(frames the mp4 holds, fps, height, width) of a clip sample: from its ``.json`` (a
    variable-rate source's span is resampled: ``num_frames``), else probed. An image: (1, its
    fps or 1.0, height, width), from the ``.json``, else its header."""
    meta = sample.get("json") or {}
    member = image_member(sample)
    if member is not None:
        h, w = meta.get("height"), meta.get("width")
        if not h or not w:
            h, w = image_size(sample[member])
        return 1, float(meta.get("fps") or 1.0), int(h), int(w)
    if "end" in meta and "fps" in meta:
        n, fps = meta.get("num_frames") or meta["end"] - meta["start"], float(meta["fps"])
        h, w = meta.get("height"), meta.get("width")
    else:
        p = probe(sample["mp4"])
        n, fps, h, w = p.num_frames, p.fps, p.height, p.width
    if not h or not w:
        p = probe(sample["mp4"])
        h, w = p.height, p.width
    return int(n), fps, int(h), int(w)


def read_resized(sample: dict, indices: list[int], hw: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """Frames `indices` of a clip of (h, w) = `hw`, resized keeping the aspect ratio and
    centre-cropped to `size` -> (T, H, W, 3) uint8, possibly a strided view."""
    member = image_member(sample)
    if member is not None:  # a still: decoded once, its one frame taken as often as asked
        if any(i != 0 for i in indices):
            raise ValueError(f"sample {sample.get('__key__')!r} is an image: frame indices {indices}")
        frame = read_image(sample[member], size=size, cfg=TRAIN_IMAGES)  # (H, W, 3)
        return frame[None] if len(indices) == 1 else np.repeat(frame[None], len(indices), 0)  # (T, H, W, 3)
    rh, rw = resize_crop_size(*hw, size)
    frames = read_frames(sample["mp4"], indices=indices, size=(rh, rw))  # (T, rh, rw, 3)
    top, left = (rh - size[0]) // 2, (rw - size[1]) // 2
    return frames[:, top : top + size[0], left : left + size[1]]


def decode_sample(sample: dict, num_frames: int, size: tuple[int, int],
                  target_fps: float | None, rng: random.Random | None
                  ) -> tuple[torch.Tensor, str]:
    """One WebDataset sample -> ((3, T, H, W) uint8, caption)."""
    frames, caption = decode_frames(sample, num_frames, size, target_fps, rng)  # (T, H, W, 3)
    return to_tensor(frames), caption


def read_clips(shards: list[str], max_clips: int, num_frames: int, size: tuple[int, int],
               target_fps: float | None, purpose: str = "validation", images: bool | None = None,
               required: bool = True) -> list[tuple[torch.Tensor, str]]:
    """The first `max_clips` decodable clips of `shards` (held-out ones, for evaluation, the
    VAE's validation and reconstruction metrics), each its first window of `num_frames` frames
    (no RNG): [((3, T, H, W) uint8, caption)]. Corrupt clips are skipped, and so are images
    unless `num_frames` is 1 (an image is a 1-frame clip); none at all raises, naming the
    `purpose` (unless not `required`: then []). `images` True: only the image samples (1-frame
    clips); False: only the videos."""
    clips = []
    for s in read_shards(shards):
        if images is not None and (image_member(s) is not None) != images:
            continue
        try:
            clips.append(decode_sample(s, num_frames, size, target_fps, rng=None))
        except Exception:  # noqa: BLE001 - corrupt held-out clips are skipped
            continue
        if len(clips) >= max_clips:
            break
    if not clips and required:
        raise RuntimeError(f"no decodable clips for {purpose}")
    return clips


def collate(items: list) -> torch.Tensor:
    """Clips (T, H, W, 3) uint8 arrays -> (B, 3, T, H, W) uint8; latents (C, t, h, w) -> (B, C,
    t, h, w). One numpy copy into a preallocated batch: torch.stack's multi-threaded copy
    competes with decord's threads (and the trainer's) for the same cores."""
    if isinstance(items[0], np.ndarray):
        T, H, W, C = items[0].shape
        out = np.empty((len(items), C, T, H, W), np.uint8)  # (B, 3, T, H, W)
        for i, frames in enumerate(items):
            np.copyto(out[i], frames.transpose(3, 0, 1, 2))  # (3, T, H, W)
        return torch.from_numpy(out)
    return torch.from_numpy(np.stack([x.numpy() for x in items]))  # (B, C, t, h, w)


def as_batch(items: list[tuple], info: dict, data=None) -> tuple:
    """Decoded samples (data, caption, key[, stored text]) -> (collated data (or `data`: a
    pack's list of clips), captions, info with their keys and stored text)."""
    text = [x[3] for x in items] if len(items[0]) > 3 and items[0][3] is not None else None
    return collate([x[0] for x in items]) if data is None else data, [x[1] for x in items], {
        **info, "keys": [x[2] for x in items], "text": text}


def parse_sample(s: dict) -> dict:
    """A raw shard sample with its .json parsed and its .txt decoded (raises if either is bad)."""
    out = dict(s)
    if isinstance(out.get("json"), (bytes, bytearray)):
        out["json"] = json.loads(out["json"])
        if not isinstance(out["json"], dict):
            raise ValueError(f"sample {s.get('__key__')!r}: .json is not an object")
    if isinstance(out.get("txt"), (bytes, bytearray)):
        out["txt"] = out["txt"].decode("utf-8")
    return out


def latent_frames(meta: dict, num_frames: int) -> int | None:
    """The latent frames of a window of `num_frames` pixel frames of a stored latent (its
    ``.json`` ``video_shape`` (T, H, W) and ``latent_shape`` (C, t, h, w): the whole clip for
    ``latent.span=whole``, the encoded window otherwise), or None when the latent holds no such
    window: another height or width, longer than the clip, or not ``1 + k * tc`` frames."""
    shape, lat = meta.get("video_shape"), meta.get("latent_shape")
    if not shape or not lat:
        return None
    T, t = int(shape[0]), int(lat[1])
    if num_frames > T:
        return None
    if t == 1 or T == 1:  # one latent frame: only one-frame windows
        return 1 if num_frames == 1 else None
    tc = (T - 1) // (t - 1)
    return 1 + (num_frames - 1) // tc if (num_frames - 1) % tc == 0 else None
