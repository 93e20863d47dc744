"""Reading, writing and probing mp4 files.

Two decoders on purpose: PyAV (FFmpeg bindings) for writing and for container
inspection, decord for fast frame-indexed reading in the data loaders. Tests
decode every file this project writes with both, so a file that only one of
them accepts is caught early.

Encoding is deterministic by default: the same frames give the same bytes
(for a given libx264 build), which keeps stage outputs content-hashable. That
takes two settings. x264 runs on one thread: its bitstream depends on the
thread count (which is also stored in the SEI header) and FFmpeg's default
"auto" follows the machine's core count. And macroblock-tree rate control is
off (`mbtree=0`): with it on, the output for identical input planes varied
with what the process had encoded before (seen on 64x64 clips; it looks like a
read of uninitialised memory), with it off it never did in our stress runs.
The price is size: at CRF 20 our 256x256 synthetic clips came out ~45% larger
without mbtree. `deterministic=False` restores x264's defaults for bulk
re-encoding where byte-identity does not matter.

Files are written without `movflags=faststart` (FFmpeg cannot do the second
pass into an in-memory buffer); the index ("moov") therefore sits at the end,
and a file cut short loses it and fails to open at all. Files from elsewhere
may have the index first; `probe` handles those by comparing the indexed frame
count with the packets actually present.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from fractions import Fraction
from typing import BinaryIO

import av
import decord
import numpy as np

Source = str | os.PathLike | bytes


class VideoError(Exception):
    """A video that cannot be used; `reason` is a short machine-readable tag
    ("empty_file", "unreadable", "no_video_stream", "truncated", "decode_failed")."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class VideoProbe:
    container: str  # FFmpeg demuxer name, e.g. "mov,mp4,m4a,3gp,3g2,mj2"
    codec: str  # e.g. "h264"
    width: int
    height: int
    fps: float
    num_frames: int
    duration: float  # seconds
    has_audio: bool
    size_bytes: int


def _check_frames(frames: np.ndarray) -> None:
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    if frames.shape[0] == 0:
        raise ValueError("frames must hold at least one frame")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"H and W must be even for yuv420p, got {frames.shape[1]}x{frames.shape[2]}")


def _encode(out: str | BinaryIO, frames: np.ndarray, fps: float, crf: int, deterministic: bool) -> None:
    """Encode RGB frames (T, H, W, 3) uint8 as H.264/yuv420p into an mp4 at `out`."""
    _check_frames(frames)
    with av.open(out, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=_rate(fps))
        stream.height, stream.width = frames.shape[1], frames.shape[2]
        stream.pix_fmt = "yuv420p"
        options = {"crf": str(crf)}
        if deterministic:  # see module docstring
            options["x264-params"] = "mbtree=0"
            stream.codec_context.thread_count = 1
        stream.options = options
        for frame in frames:  # (H, W, 3) uint8
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush delayed frames
            container.mux(packet)


def _rate(fps: float) -> Fraction:
    """fps as the exact rational PyAV wants (8.0 -> 8, 29.97 -> 2997/100)."""
    return Fraction(fps).limit_denominator(1001)


def write_mp4(
    path: str | os.PathLike, frames: np.ndarray, fps: float, crf: int = 20, *, deterministic: bool = True
) -> None:
    """Write frames (T, H, W, 3) uint8 RGB to `path`; atomic via `path.tmp` + rename."""
    path = os.fspath(path)
    tmp = path + ".tmp"
    try:
        _encode(tmp, frames, fps, crf, deterministic)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def encode_mp4(frames: np.ndarray, fps: float, crf: int = 20, *, deterministic: bool = True) -> bytes:
    """Frames (T, H, W, 3) uint8 RGB -> mp4 bytes."""
    buf = io.BytesIO()
    _encode(buf, frames, fps, crf, deterministic)
    return buf.getvalue()


# Audio codecs an mp4 holds as they are (stream copy); others are left out of our mp4s.
MP4_AUDIO = ("aac", "mp3", "ac3", "eac3", "alac", "opus")


def remux_mp4(src: str | os.PathLike, audio: bool = False) -> tuple[bytes, int, bool]:
    """The first video stream of `src` stream-copied (nothing decoded or re-encoded) into a
    new mp4 that holds nothing else: no other stream, none of the source's metadata (title,
    GPS location, ...). With `audio`, its first audio stream too when its codec is one of
    `MP4_AUDIO`. -> (mp4 bytes, video packets, whether audio was kept)."""
    buf = io.BytesIO()
    with av.open(os.fspath(src), options={"protocol_whitelist": "file"}) as inp, \
            av.open(buf, mode="w", format="mp4") as out:
        video = inp.streams.video[0]
        outs = {video.index: out.add_stream_from_template(video)}
        sound = inp.streams.audio[0] if audio and inp.streams.audio else None
        if sound is not None and sound.codec_context is not None \
                and sound.codec_context.name in MP4_AUDIO:
            outs[sound.index] = out.add_stream_from_template(sound)
        frames = 0
        for packet in inp.demux(*[inp.streams[i] for i in outs]):
            if not packet.size:  # the demuxer's flush packets
                continue
            frames += packet.stream.index == video.index
            packet.stream = outs[packet.stream.index]
            out.mux(packet)
    return buf.getvalue(), frames, len(outs) > 1


def _open_arg(src: Source) -> str | io.BytesIO:
    return io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else os.fspath(src)


def probe(src: Source) -> VideoProbe:
    """Inspect a container without decoding pixels.

    The frame count comes from demuxing every video packet (cheap: no
    decoding), not from the container index alone: an index can promise more
    frames than a truncated file holds. If the index promises more than is
    present the file is rejected as "truncated"; containers without an index
    count report the packets present. A missing file raises FileNotFoundError
    (a pipeline bug, not a bad input).
    """
    size = len(src) if isinstance(src, (bytes, bytearray)) else os.path.getsize(src)
    if size == 0:
        raise VideoError("empty_file")
    try:
        container = av.open(_open_arg(src))
    except av.FFmpegError as e:
        raise VideoError("unreadable", str(e)) from e
    with container:
        if not container.streams.video:
            raise VideoError("no_video_stream")
        stream = container.streams.video[0]
        indexed = stream.frames
        try:
            present = sum(1 for p in container.demux(stream) if p.size)
        except av.FFmpegError as e:
            raise VideoError("unreadable", f"demux: {e}") from e
        if present == 0 or (indexed > 0 and present < indexed):
            raise VideoError("truncated", f"{present} of {indexed} frames present")
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        else:
            duration = present / fps if fps else 0.0
        return VideoProbe(
            container=container.format.name,
            codec=stream.codec_context.name,
            width=stream.codec_context.width,
            height=stream.codec_context.height,
            fps=fps,
            num_frames=present,
            duration=duration,
            has_audio=bool(container.streams.audio),
            size_bytes=size,
        )


def read_frames(
    src: Source, indices: list[int] | None = None, size: tuple[int, int] | None = None,
    threads: int = 0,
) -> np.ndarray:
    """Decode frames with decord -> (T, H, W, 3) uint8 RGB.

    `indices` selects frames (default all); `size=(h, w)` resizes in decord's
    scaler. `threads`: decoder threads, 0 = FFmpeg's automatic count (about one
    per core); a Ray task that holds one CPU passes 1. Out-of-range indices raise
    IndexError (a caller bug); anything the decoder rejects raises
    VideoError("decode_failed").

    decord 0.6 mis-strides frames of some output widths (16, 24, 48 and 72 px
    among the even widths 16..256): the row padding is folded into channels
    (`reader[i]` comes back as (H, W, 4) or (H, W, 6)) and `get_batch` fails
    its size check with a DECORDError. We call `get_batch` directly, with no
    probing decode first, and decode with PyAV when it fails or returns
    anything but (T, H, W, 3) (at every other width the two decoders agree bit
    for bit). A file decord cannot read at all therefore also goes to PyAV,
    which raises VideoError("decode_failed") in turn.
    """
    h, w = size if size is not None else (-1, -1)
    try:
        reader = decord.VideoReader(_open_arg(src), ctx=decord.cpu(0), width=w, height=h,
                                    num_threads=threads)
        n = len(reader)
        idx = list(range(n)) if indices is None else [int(i) for i in indices]
        if any(i < 0 or i >= n for i in idx):
            raise IndexError(f"frame indices out of range for {n} frames: {idx}")
        if n == 0:
            raise VideoError("decode_failed", "no frames")
        if not idx:
            first = reader[0]  # (H, W, 3), or (H, W, 4|6) when mis-strided
            if first.shape[-1] != 3:
                return read_frames_av(src, idx, size)
            return np.zeros((0, *first.shape), np.uint8)  # (0, H, W, 3)
    except (RuntimeError, decord.DECORDError) as e:
        raise VideoError("decode_failed", str(e)[:500]) from e
    try:
        frames = reader.get_batch(idx).asnumpy()  # (T, H, W, 3) uint8
        if frames.ndim == 4 and frames.shape[0] == len(idx) and frames.shape[-1] == 3:
            return frames
        why = f"decord returned {frames.shape}"
    except (RuntimeError, decord.DECORDError) as e:  # mis-strided width, or a bad file
        why = str(e)[:300]
    try:
        return read_frames_av(src, idx, size)
    except IndexError as e:  # decord indexed frames the stream does not hold
        raise VideoError("decode_failed", f"decord: {why}; PyAV: {e}") from e


def read_frames_av(
    src: Source, indices: list[int] | None = None, size: tuple[int, int] | None = None
) -> np.ndarray:
    """Decode with PyAV -> (T, H, W, 3) uint8 RGB; same arguments as `read_frames`.

    Decodes sequentially from the start (no seeking): exact for any index
    list, at the cost of decoding everything up to the last wanted frame.
    """
    h, w = size if size is not None else (None, None)
    want = None if indices is None else [int(i) for i in indices]
    wanted = None if want is None else set(want)
    last = None if want is None else max(want, default=0)
    kept: dict[int, np.ndarray] = {}  # frame index -> (H, W, 3) uint8
    shape = None
    try:
        with av.open(_open_arg(src)) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if wanted is None or i in wanted or shape is None:
                    rgb = frame.reformat(width=w, height=h, format="rgb24").to_ndarray()  # (H, W, 3)
                    shape = rgb.shape
                    if wanted is None or i in wanted:
                        kept[i] = rgb
                if last is not None and i >= last:
                    break
    except (av.FFmpegError, IndexError) as e:  # IndexError: no video stream
        raise VideoError("decode_failed", str(e)) from e
    if shape is None:
        raise VideoError("decode_failed", "no frames decoded")
    if want is None:
        return np.stack([kept[i] for i in sorted(kept)])  # (T, H, W, 3) uint8
    missing = [i for i in want if i not in kept]
    if missing:
        raise IndexError(f"frame indices out of range: {missing}")
    if not want:
        return np.zeros((0, *shape), np.uint8)  # (0, H, W, 3)
    return np.stack([kept[i] for i in want])  # (T, H, W, 3) uint8


def decode_size(width: int, height: int, long_side: int) -> tuple[int, int]:
    """(h, w) with the long side at most `long_side`, aspect kept, both even."""
    s = min(1.0, long_side / max(width, height))
    return max(2, round(height * s / 2) * 2), max(2, round(width * s / 2) * 2)
