"""Reading a clip's source after the probe: isolated decoding, display orientation and
fetch-on-miss. Used by every stage that decodes sources (curate, filter, caption, shard).

Isolation. The probe only proves that a file opens and that its first frame decodes; the full
decode, the scoring and the shard encode meet the rest of the file. They run in a reused child
process (`data.isolate`) with a wall-clock timeout and an address-space cap, so a file that
crashes, hangs or exhausts the decoder becomes a reject with a reason (``<stage>_crashed``,
``<stage>_timeout``, ``<stage>_out_of_memory``, ``<stage>_failed``) instead of a dead Ray worker
that Ray retries. The timeout grows with the work: `MediaLimits.timeout_for` allows
``timeout_s`` plus ``s_per_mpx`` seconds per megapixel of source frames decoded (0.05 s is a
floor of 20 Mpx/s, 5-20x slower than one core decodes H.264), so a long legitimate video is
not cut off and a stuck one is.

Orientation. Phone videos are stored sideways with a display matrix (the probe's
``rotation``, degrees counter-clockwise). PyAV returns the stored pixels; decord 0.6 turns
90 and 270 degree sources itself (taking the size asked for as the displayed size) but a 180
degree one only when it does not also resize. `read_display` hides that: frames always come
back as displayed (decord where it is right, PyAV + `to_display` for 180 degrees), every width
and height in the manifests is the display size, and sizes are asked for in display
orientation. Non-square pixels (the probe's ``sar``) need no more than that: the display size
already has the width scaled by the sample aspect ratio, and the decoders resize to it.

Fetch-on-miss. A remote source is fetched into the fetch cache of the node that curates it,
and the clip records that path (``abs_path``). On another node of a cluster that path does
not exist: `source_path` fetches the clip's URL again into the same place on this node
(through `pipeline.curation.fetch.fetch`, at most the probed number of bytes, which it must match).
Credentials and endpoints then come from the environment and fsspec's config, as for the
run's storage.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import av
import decord
import numpy as np

from data.checks import check_ranges
from data.images import ImageProbeConfig, read_image
from data.isolate import IsolatedError, shared_isolated
from data.video_io import VideoError, read_frames, read_frames_av
from pipeline.curation.fetch import FetchError, fetch, is_remote

# Imported by the media child before it answers: every call then pays only its own work.
PRELOAD = ("numpy", "cv2", "av", "decord", "data.video_io", "data.images", "pipeline.curation.media",
           "pipeline.curation.scores", "pipeline.curation.shots", "pipeline.curation.curate", "pipeline.curation.shard")


@dataclass
class MediaLimits:
    """Limits of the child process that decodes (and encodes) sources."""

    timeout_s: float = 60.0  # wall clock per call, plus:
    s_per_mpx: float = 0.05  # seconds per megapixel of source frames the call decodes
    max_memory_mb: int = 4096  # the child's address space (RLIMIT_AS); 0 = none
    startup_timeout_s: float = 60.0  # the child's start (imports); not charged to a call

    def __post_init__(self) -> None:
        check_ranges(self, timeout_s="> 0", s_per_mpx=">= 0", max_memory_mb=">= 0",
                     startup_timeout_s="> 0")

    def timeout_for(self, frames: int, width: int, height: int) -> float:
        return self.timeout_s + self.s_per_mpx * frames * width * height / 1e6


class MediaError(Exception):
    """Decoding or encoding a source failed: `reason` is ``<stage>_<failure>``."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


def run_isolated(fn: str, kwargs: dict, limits: MediaLimits, timeout_s: float,
                 stage: str = "decode"):
    """``fn(**kwargs)`` in this process's media child; raises MediaError with a reason
    ``<stage>_timeout | <stage>_crashed | <stage>_out_of_memory | <stage>_failed``."""
    worker = shared_isolated(limits.max_memory_mb, limits.startup_timeout_s, PRELOAD)
    try:
        return worker.call(fn, kwargs, timeout_s)
    except IsolatedError as e:
        detail = e.detail
        if e.reason in ("crashed", "out_of_memory") and limits.max_memory_mb:
            detail += f" (memory limit {limits.max_memory_mb} MB)"
        reason = "failed" if e.reason == "error" else e.reason
        raise MediaError(f"{stage}_{reason}", detail[:500]) from None


# ----- orientation ---------------------------------------------------------------------------
def turned(rotation: int | None) -> bool:
    return (rotation or 0) % 180 == 90


def stored_size(size: tuple[int, int] | None, rotation: int | None) -> tuple[int, int] | None:
    """A display (h, w) -> the (h, w) to ask the decoder for."""
    return (size[1], size[0]) if size is not None and turned(rotation) else size


def to_display(frames: np.ndarray, rotation: int | None) -> np.ndarray:
    """(T, h, w, 3) stored -> (T, h', w', 3) as displayed: turned `rotation` degrees
    counter-clockwise, as FFmpeg's autorotate does; contiguous."""
    k = ((rotation or 0) % 360) // 90
    return np.ascontiguousarray(np.rot90(frames, k, axes=(1, 2))) if k else frames


# ----- sources -------------------------------------------------------------------------------
def source_path(clip: dict) -> str:
    """A local path holding the clip's source bytes: the curating node's copy when this node
    has it, else the clip's URL fetched again into this node's fetch cache.
    Raises pipeline.curation.fetch.FetchError."""
    local = clip.get("abs_path")
    if local and os.path.exists(local):
        return local
    url = clip["path"]
    if not local or not is_remote(url):
        raise FetchError("fetch_failed", f"{local or url} does not exist on this node")
    size = clip.get("source_bytes")
    got = fetch(url, os.path.dirname(local), max_bytes=size)  # the same name as `local`
    if size is not None and os.path.getsize(got) != size:
        os.remove(got)
        raise FetchError("fetch_failed", f"{url} changed since it was probed "
                                         f"({os.path.getsize(got)} bytes, probed {size})")
    return got


def read_display(path: str, indices: list[int] | None, size: tuple[int, int] | None,
                 rotation: int | None, threads: int = 1) -> np.ndarray:
    """Frames `indices` (None: all) of `path` as displayed, at display size `size` (h, w)
    (None: the stored size, turned; non-square pixels not applied) -> (T, h, w, 3) uint8 RGB.
    Raises data.video_io.VideoError. `threads`: decord's decoder threads; 1, as the media
    child works for a Ray task holding one CPU."""
    rot = (rotation or 0) % 360
    if rot in (0, 90, 270):  # decord turns 90 and 270 itself, `size` being the displayed size
        return read_frames(path, indices=indices, size=size, threads=threads)
    return to_display(read_frames_av(path, indices, stored_size(size, rot)), rot)


STREAM_CHUNK = 64  # frames `iter_display` decodes at once


def iter_display(path: str, size: tuple[int, int] | None, rotation: int | None,
                 chunk: int = STREAM_CHUNK, threads: int = 1) -> Iterator[np.ndarray]:
    """All frames of `path` as `read_display(path, None, size, rotation)` gives them, in
    consecutive chunks of up to `chunk` frames (each (t, h, w, 3) uint8 RGB), so a caller that
    streams holds one chunk, not the video. decord where `read_display` uses it (falling back
    to PyAV from the frame where decord fails, as `data.video_io.read_frames` does for the
    whole video), PyAV + `to_display` for 180 degrees. Raises data.video_io.VideoError."""
    rot = (rotation or 0) % 360
    start = 0
    if rot in (0, 90, 270):
        h, w = size if size is not None else (-1, -1)
        try:
            reader = decord.VideoReader(path, ctx=decord.cpu(0), width=w, height=h,
                                        num_threads=threads)
            n = len(reader)
        except (RuntimeError, decord.DECORDError) as e:
            raise VideoError("decode_failed", str(e)[:500]) from e
        if n == 0:
            raise VideoError("decode_failed", "no frames")
        while start < n:
            idx = list(range(start, min(start + chunk, n)))
            try:
                frames = reader.get_batch(idx).asnumpy()  # (t, H, W, 3) uint8
            except (RuntimeError, decord.DECORDError):  # mis-strided width, or a bad file
                break
            if frames.ndim != 4 or frames.shape[0] != len(idx) or frames.shape[-1] != 3:
                break
            yield frames
            start += len(idx)
        else:
            return
        del reader
        yield from _iter_av(path, stored_size(size, rot), rot, start, chunk, n)
        return
    yield from _iter_av(path, stored_size(size, rot), rot, 0, chunk, None)


def _iter_av(path: str, size: tuple[int, int] | None, rot: int, first: int, chunk: int,
             expect: int | None) -> Iterator[np.ndarray]:
    """PyAV's frames `first`, `first + 1`, ... of `path` at stored size `size`, turned by `rot`,
    in chunks; `expect`: the frame count the stream must reach (decord's)."""
    h, w = size if size is not None else (None, None)
    got, count = [], 0
    try:
        with av.open(path) as container:
            for i, frame in enumerate(container.decode(video=0)):
                count = i + 1
                if i < first:
                    continue
                got.append(frame.reformat(width=w, height=h, format="rgb24").to_ndarray())
                if len(got) == chunk:
                    yield to_display(np.stack(got), rot)
                    got = []
    except (av.FFmpegError, IndexError) as e:  # IndexError: no video stream
        raise VideoError("decode_failed", str(e)) from e
    if got:
        yield to_display(np.stack(got), rot)
    if count == 0:
        raise VideoError("decode_failed", "no frames decoded")
    if expect is not None and count < expect:
        raise VideoError("decode_failed", f"decoded {count} of {expect} frames")


def decode_frames(path: str, indices: list[int], size: tuple[int, int] | None,
                  rotation: int | None) -> dict:
    """In the media child: frames `indices` of `path` at display size `size` (h, w)."""
    return {"payload": read_display(path, indices, size, rotation)}  # (T, h, w, 3) uint8


def reread_config(clip: dict) -> ImageProbeConfig:
    """Limits for decoding an image clip again (its probe passed at curation): its own size,
    any number of bytes, frame 0 of an animation that curation let through."""
    side = max(int(clip.get("width") or 1), int(clip.get("height") or 1))
    return ImageProbeConfig(min_side=1, max_side=max(side, 1), max_pixels=max(side * side, 1),
                            max_bytes=max(int(clip.get("source_bytes") or 1), 1),
                            animated="first_frame")


def decode_image(path: str, name: str, size: tuple[int, int] | None, cfg: ImageProbeConfig
                 ) -> dict:
    """In the media child: the still at `path` as displayed (EXIF orientation applied), area-
    resized to display size `size` (h, w) (None: as it is) -> {"payload": (1, h, w, 3) uint8}.
    Raises data.images.ImageReject."""
    import cv2  # preloaded by the media child

    rgb = read_image(path, name, cfg=cfg)  # (H, W, 3)
    if size is not None and tuple(size) != rgb.shape[:2]:
        shrink = size[0] * size[1] < rgb.shape[0] * rgb.shape[1]
        rgb = cv2.resize(rgb, (size[1], size[0]),
                         interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
    return {"payload": rgb[None]}


def read_clip_frames(clip: dict, indices: list[int], size: tuple[int, int] | None,
                     limits: MediaLimits | None = None) -> np.ndarray:
    """Frames `indices` of the clip's source, at display size `size` (h, w) (None: full),
    decoded in the media child -> (T, h, w, 3) uint8 RGB. Fetches the source on a miss.
    An image clip (``kind`` "image") gives its one image, repeated len(indices) times, with no
    video decoding. Raises MediaError or pipeline.curation.fetch.FetchError."""
    limits = limits or MediaLimits()
    path = source_path(clip)
    if clip.get("kind") == "image":
        res = run_isolated("pipeline.curation.media:decode_image",
                           {"path": path, "name": clip.get("path") or path,
                            "size": None if size is None else tuple(size),
                            "cfg": reread_config(clip)},
                           limits, limits.timeout_for(1, clip.get("width", 0),
                                                      clip.get("height", 0)))
        return np.repeat(res["payload"], len(indices), axis=0)  # (T, h, w, 3)
    span = max(1, clip.get("end", 1) - clip.get("start", 0))
    timeout = limits.timeout_for(span, clip.get("width", 0), clip.get("height", 0))
    res = run_isolated("pipeline.curation.media:decode_frames",
                       {"path": path, "indices": [int(i) for i in indices],
                        "size": None if size is None else tuple(size),
                        "rotation": clip.get("rotation")}, limits, timeout)
    return res["payload"]
