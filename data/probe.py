"""Probing untrusted video files without letting one hang or exhaust a worker.

`Prober` runs the probe in a long-lived child process (a `data.isolate.Isolated` worker) and
talks to it over a pipe, one request per file. The parent enforces a wall-clock timeout per
file: on timeout the child is killed and a fresh one starts for the next file. The child
limits its own address space (`RLIMIT_AS`), so a file that makes FFmpeg allocate without
bound fails inside the child (a reject) instead of taking the worker's memory. Reusing the
child keeps the cost per file to one pipe round trip (~1 ms) instead of a process start with
PyAV's import (~130 ms); `shared_prober(cfg)` gives one child per worker process, which is
what Ray task pools want. The decoding after the probe runs isolated the same way (see
`pipeline.curation.media`).

What the child does for one file, cheapest checks first, so a hostile file is refused
before any expensive work:
1. `stat`: missing, empty, or more bytes than `max_bytes` (a sparse 64 GiB file costs
   nothing to refuse).
2. Sniff the first 4 KiB: text (an HTML error page or an HLS playlist saved as `.mp4`) is
   `mislabelled`. FFmpeg is never shown text, and it is only allowed the `file` protocol,
   so a playlist cannot make it open URLs or other local files.
3. Open with FFmpeg: no video stream (audio-only) -> `no_video_stream`; an image demuxer
   (a PNG named `.mp4`) -> `mislabelled`; a codec FFmpeg has no decoder for, or one outside
   `allowed_codecs` -> `unsupported_codec`.
4. Caps from the container's own metadata, before reading any packet: frame size, stored and
   as displayed with the sample aspect ratio (`low_resolution`, `high_resolution`), and
   declared duration (`too_long`). The caps hold even when the header lies: no frame is
   decoded before step 6.
5. Demux (no decoding) every video packet: counts the frames actually present (an index
   promising more is `truncated`), and gives the timestamps from which fps, variable frame
   rate and the true duration come. Demuxing stops as soon as the timestamps pass
   `max_seconds` or the packet count passes `max_seconds * max_fps`, so a file whose
   metadata understates its length is still `too_long` after bounded work.
6. Decode the first frame (one thread): proves the stream decodes (`decode_failed`
   otherwise) and gives the rotation from the display matrix, which PyAV exposes on frames
   only.

Sizes. ``width``/``height`` are the stored frame; ``display_width``/``display_height`` what a
player shows: non-square pixels (``sar``, the sample aspect ratio, e.g. "16:11" for a 704x576
frame shown at 16:9) widen the frame to ``round(width * sar)`` at the same height, then the
rotation turns it.

A file whose extension disagrees with its content (an mp4 named `.mkv`) is kept: FFmpeg
and decord both go by content. `ext_mismatch` in the info records it. A file that opens
but is not a video (text, an image) is `mislabelled`.

The parent never interprets file bytes itself; everything that touches the file runs in
the child, including `stat` and `open` (a stalled network mount, or in tests a FIFO, blocks
right there and is caught by the timeout).
"""

from __future__ import annotations

import atexit
import functools
import json
import math
import os
import stat
import time
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Optional

import av

from data.checks import check_ranges
from data.isolate import Isolated, IsolatedError

# Every reason a probe can reject a file with (stable: dashboards and tests key on them).
REASONS = (
    "not_found",  # the path does not exist (listed, then gone)
    "empty_file",  # zero bytes
    "too_large",  # more than max_bytes
    "mislabelled",  # not a video at all: text or a still image under a video name
    "unreadable",  # FFmpeg cannot open it (random bytes, an mp4 cut before its index, ...)
    "no_video_stream",  # audio-only or data-only container
    "unsupported_codec",  # no decoder, or not in allowed_codecs
    "low_resolution",  # shortest side < min_side
    "high_resolution",  # longest side > max_side or pixels > max_pixels
    "too_long",  # declared or demuxed duration > max_seconds
    "too_short",  # duration < min_seconds
    "truncated",  # opens, but fewer frames present than indexed, or none
    "decode_failed",  # the first frame does not decode
    "timeout",  # the probe took longer than timeout_s (killed)
    "probe_failed",  # the prober crashed or raised (a bug or an FFmpeg crash)
)

# Extension -> the FFmpeg demuxer its content should open with (for `ext_mismatch` only).
_EXT_DEMUXER = {
    ".mp4": "mov,mp4,m4a,3gp,3g2,mj2", ".m4v": "mov,mp4,m4a,3gp,3g2,mj2",
    ".mov": "mov,mp4,m4a,3gp,3g2,mj2", ".3gp": "mov,mp4,m4a,3gp,3g2,mj2",
    ".mkv": "matroska,webm", ".webm": "matroska,webm", ".avi": "avi", ".ts": "mpegts",
    ".flv": "flv", ".mpg": "mpeg", ".mpeg": "mpeg", ".gif": "gif",
}
_SNIFF_BYTES = 4096


@dataclass
class ProbeConfig:
    """Limits for one probe. Sizes are checked from metadata before any decoding."""

    timeout_s: float = 10.0  # wall clock per file; the child is killed past it
    startup_timeout_s: float = 60.0  # the child's start (imports); not charged to a file
    max_memory_mb: int = 2048  # the child's address-space limit (RLIMIT_AS); 0 = none
    max_bytes: int = 16 * 2**30
    min_side: int = 32  # shortest side, pixels
    max_side: int = 4096  # longest side, pixels
    max_pixels: int = 4096 * 2304  # width * height
    min_seconds: float = 1.0
    max_seconds: float = 600.0
    max_fps: float = 240.0  # demuxing stops past max_seconds * max_fps packets
    allowed_codecs: Optional[list[str]] = None  # FFmpeg decoder names; None = any decodable
    decode_first_frame: bool = True  # proves decodability and gives the rotation

    def __post_init__(self) -> None:
        check_ranges(self, timeout_s="> 0", startup_timeout_s="> 0", max_memory_mb=">= 0",
                     max_bytes=">= 1", min_side=">= 1", max_side=">= 1", max_pixels=">= 1",
                     min_seconds=">= 0", max_seconds="> 0", max_fps="> 0")
        for lo, hi in (("min_side", "max_side"), ("min_seconds", "max_seconds")):
            if getattr(self, lo) > getattr(self, hi):
                raise ValueError(f"{lo} must be <= {hi}, got {getattr(self, lo)} > {getattr(self, hi)}")

    def build(self) -> Prober:
        return Prober(self)


class Reject(Exception):
    """A file refused by the probe: `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


# ----- the probe itself (runs in the child) -------------------------------------------------
def _looks_like_text(head: bytes) -> bool:
    """UTF-8 without NULs and almost all printable: no video container starts like that
    (mp4, mkv, avi, ts, flv and ogg headers all hold NULs or bytes invalid in UTF-8)."""
    if b"\x00" in head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3:  # only a multi-byte character cut at the end is allowed
            return False
        text = head[: e.start].decode("utf-8")
    printable = sum(c.isprintable() or c in "\r\n\t" for c in text)
    return printable >= 0.95 * max(1, len(text))


def _timing(ts: list[int], tb: float, declared: tuple = ()) -> dict:
    """Frame timing from packet timestamps (any order; B-frames reorder them).

    A stream is variable-frame-rate when some gap between consecutive frames differs from
    the median gap by more than one tick (timestamp rounding) plus 2%. A constant-rate
    stream's fps is the first `declared` rate (the stream's average, then its guessed rate)
    that its timestamps agree with (`_agrees`), else frames over time, which rounding to
    ticks cannot bias the way it biases the median gap (24 fps in 1 ms ticks: gaps of 41 and
    42 ms, median 42, 23.81 fps).
    """
    ts = sorted(set(ts))
    gaps = [b - a for a, b in zip(ts[:-1], ts[1:])]
    if not gaps:
        return {}
    gaps_sorted = sorted(gaps)
    median = gaps_sorted[len(gaps) // 2]
    tol = 1 + 0.02 * median
    vfr = gaps_sorted[-1] - median > tol or median - gaps_sorted[0] > tol
    span = (ts[-1] - ts[0]) * tb
    fps = (len(ts) - 1) / span
    if not vfr:
        fps = next((float(r) for r in declared if r and _agrees(ts, float(r) * tb)), fps)
    return {
        "fps": fps,
        "fps_min": 1.0 / (gaps_sorted[-1] * tb),
        "fps_max": 1.0 / (gaps_sorted[0] * tb),
        "vfr": vfr,
        # the last frame lasts a typical gap
        "duration": span + (median * tb if vfr else 1.0 / fps),
    }


def _agrees(ts: list[int], rate_ticks: float) -> bool:
    """Sorted timestamps are those of a constant `rate_ticks` (frames per tick) rounded to
    ticks: every gap within a tick of the period, and so the whole span (no drift)."""
    period = 1.0 / rate_ticks  # ticks per frame
    tol = 1.0 + 1e-6
    return (abs(ts[-1] - ts[0] - (len(ts) - 1) * period) <= tol
            and all(abs(b - a - period) <= tol for a, b in zip(ts[:-1], ts[1:])))


def sample_aspect(stream) -> Fraction:
    """A video stream's sample aspect ratio (FFmpeg's guess: the container's, else the
    codec's); 1 when unset or meaningless."""
    sar = stream.sample_aspect_ratio
    return Fraction(sar) if sar and sar > 0 else Fraction(1)


def display_size(width: int, height: int, sar: str | Fraction = "1:1",
                 rotation: int | None = 0) -> tuple[int, int]:
    """Stored (width, height) -> displayed (width, height): the width scaled by the sample
    aspect ratio (``"16:11"``, the height kept, as players do), then turned by `rotation`."""
    sar = Fraction(sar.replace(":", "/")) if isinstance(sar, str) else Fraction(sar)
    w = max(1, round(width * sar))
    return (height, w) if (rotation or 0) % 180 == 90 else (w, height)


def probe_file(path: str, cfg: ProbeConfig) -> dict:
    """Probe one file in this process; raises Reject. Runs in the prober child: call it
    directly only on trusted files (see the module docstring for the order of checks)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise Reject("not_found", path) from None
    except OSError as e:
        raise Reject("unreadable", f"stat: {e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise Reject("unreadable", "a directory")
    if stat.S_ISREG(st.st_mode) and st.st_size == 0:
        raise Reject("empty_file")
    if st.st_size > cfg.max_bytes:
        raise Reject("too_large", f"{st.st_size} bytes > {cfg.max_bytes}")
    try:
        with open(path, "rb") as f:  # blocks on a FIFO or a stalled mount: the parent's timeout
            head = f.read(_SNIFF_BYTES)
    except OSError as e:
        raise Reject("unreadable", f"read: {e}") from None
    if not head:
        raise Reject("empty_file")
    if _looks_like_text(head):
        # Never the bytes themselves: a reject's detail travels to manifests, reports and W&B.
        raise Reject("mislabelled", "text, not a video")
    try:
        container = av.open(path, options={"protocol_whitelist": "file"})
    except av.FFmpegError as e:
        raise Reject("unreadable", str(e)[:300]) from None
    with container:
        fmt = container.format.name
        ext = os.path.splitext(path)[1].lower()
        audio = container.streams.audio
        if fmt == "image2" or fmt.endswith("_pipe"):
            raise Reject("mislabelled", f"a still image ({fmt}), not a video")
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise Reject("no_video_stream", f"streams: {', '.join(kinds)}")
        stream = container.streams.video[0]
        cc = stream.codec_context
        if cc is None:  # FFmpeg knows no decoder for this stream
            raise Reject("unsupported_codec", "FFmpeg has no decoder for this stream")
        codec = cc.name
        if cfg.allowed_codecs is not None and codec not in cfg.allowed_codecs:
            raise Reject("unsupported_codec", f"{codec} not in {list(cfg.allowed_codecs)}")
        w, h = cc.width, cc.height
        if w <= 0 or h <= 0:
            raise Reject("unreadable", f"no frame size ({w}x{h})")
        sar = sample_aspect(stream)
        sar_w, _ = display_size(w, h, sar)  # non-square pixels: the width as displayed
        size = f"{w}x{h}" + (f" (displayed {sar_w}x{h})" if sar_w != w else "")
        if min(w, h, sar_w) < cfg.min_side:
            raise Reject("low_resolution", f"{size}, shortest side < {cfg.min_side}")
        if max(w, h, sar_w) > cfg.max_side or max(w, sar_w) * h > cfg.max_pixels:
            raise Reject("high_resolution", f"{size} > max side {cfg.max_side} or "
                                            f"{cfg.max_pixels} pixels")
        tb = float(stream.time_base) if stream.time_base else 0.0
        declared = None
        if stream.duration is not None and tb:
            declared = stream.duration * tb
        elif container.duration is not None:
            declared = container.duration / av.time_base
        if declared is not None and declared > cfg.max_seconds:
            raise Reject("too_long", f"declared {declared:.1f}s > {cfg.max_seconds}s")

        # Demux (and decode only the first frame); bounded by the caps whatever the header says.
        max_packets = math.ceil(cfg.max_seconds * cfg.max_fps) + 1
        if cfg.decode_first_frame:
            cc.thread_count = 1
        first_frame, decode_error = None, None
        ts: list[int] = []
        present = 0
        t_min = t_max = None
        try:
            for packet in container.demux(stream):
                if cfg.decode_first_frame and first_frame is None and decode_error is None:
                    try:
                        frames = stream.decode(packet)  # packet None (flush) at the end
                        first_frame = frames[0] if frames else None
                    except av.FFmpegError as e:
                        decode_error = str(e)
                if not packet.size:
                    continue
                present += 1
                t = packet.pts if packet.pts is not None else packet.dts
                if t is not None:
                    ts.append(t)
                    t_min = t if t_min is None else min(t_min, t)
                    t_max = t if t_max is None else max(t_max, t)
                    if (t_max - t_min) * tb > cfg.max_seconds:
                        raise Reject("too_long", f"timestamps pass {cfg.max_seconds}s")
                if present > max_packets:
                    raise Reject("too_long", f"more than {max_packets} frames")
        except av.FFmpegError as e:
            if present == 0:
                raise Reject("unreadable", f"demux: {str(e)[:300]}") from None
            raise Reject("truncated",
                         f"demux stopped after {present} frames: {str(e)[:200]}") from None
        indexed = stream.frames
        if present == 0 or (indexed > 0 and present < indexed):
            raise Reject("truncated", f"{present} of {indexed} frames present")

        timing = _timing(ts, tb, (stream.average_rate, stream.guessed_rate)) if tb else {}
        if not timing:
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            fps = float(rate) if rate else 0.0
            if declared is None:
                declared = present / fps if fps else 0.0
            timing = {"fps": fps, "fps_min": fps, "fps_max": fps, "vfr": False,
                      "duration": declared}
        if timing["duration"] < cfg.min_seconds:
            raise Reject("too_short", f"{timing['duration']:.2f}s < {cfg.min_seconds}s")

        rotation = None
        if cfg.decode_first_frame:
            if first_frame is None and decode_error is None:
                try:
                    frames = stream.decode(None)  # flush: frames held back by decoder delay
                    first_frame = frames[0] if frames else None
                except av.FFmpegError as e:
                    decode_error = str(e)
            if first_frame is None:
                raise Reject("decode_failed", (decode_error or "no frame decoded")[:300])
            rotation = int(first_frame.rotation) % 360
        disp_w, disp_h = display_size(w, h, sar, rotation)
        return {
            "container": fmt,
            "codec": codec,
            "pix_fmt": cc.format.name if cc.format is not None else None,
            "width": w,
            "height": h,
            "rotation": rotation,  # display matrix, degrees counter-clockwise; None: not read
            "sar": f"{sar.numerator}:{sar.denominator}",  # sample (pixel) aspect ratio
            "display_width": disp_w,  # as shown: widened by the sar, then turned
            "display_height": disp_h,
            "num_frames": present,
            **timing,  # fps, fps_min, fps_max, vfr, duration
            "has_audio": bool(audio),
            "audio_codec": (audio[0].codec_context.name
                            if audio and audio[0].codec_context else None),
            "size_bytes": st.st_size,
            "ext_mismatch": ext in _EXT_DEMUXER and _EXT_DEMUXER[ext] != fmt,
        }


def probe_request(path: str, cfg: ProbeConfig) -> dict:
    """What the prober child runs for one file: {"info": ...} or {"reject": [reason, detail]}."""
    try:
        return {"info": probe_file(path, cfg)}
    except Reject as e:
        return {"reject": [e.reason, e.detail]}


# ----- the parent side ----------------------------------------------------------------------
class Prober:
    """A reusable probe child (a `data.isolate.Isolated` worker) with a per-file timeout;
    `probe(path)` never raises for a bad file. Use as a context manager, or call `close()`;
    restarts its child after a timeout or a crash."""

    def __init__(self, cfg: ProbeConfig | None = None):
        self.cfg = cfg or ProbeConfig()
        self._worker = Isolated(self.cfg.max_memory_mb, self.cfg.startup_timeout_s,
                                preload=("av", "data.probe"))

    def __enter__(self) -> Prober:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def starts(self) -> int:
        """Children started: 1 + restarts after timeouts and crashes."""
        return self._worker.starts

    @property
    def _proc(self):
        return self._worker._proc

    def probe(self, path: str | os.PathLike) -> tuple[dict | None, tuple[str, str] | None]:
        """-> (info, None) for a usable video, or (None, (reason, detail))."""
        t0 = time.monotonic()
        try:
            reply = self._worker.call("data.probe:probe_request",
                                      {"path": os.path.abspath(path), "cfg": self.cfg},
                                      self.cfg.timeout_s)
        except IsolatedError as e:
            if e.reason == "timeout":
                return None, ("timeout", f"no answer in {self.cfg.timeout_s}s")
            if e.reason == "crashed":
                return None, ("probe_failed", f"prober died ({e.detail})")
            if e.reason == "out_of_memory":
                return None, ("probe_failed", f"out of memory (limit {self.cfg.max_memory_mb} MB)")
            return None, ("probe_failed", e.detail[:300])
        if "reject" in reply:
            return None, tuple(reply["reject"])
        return {**reply["info"], "probe_ms": round(1000 * (time.monotonic() - t0), 2)}, None

    def close(self) -> None:
        self._worker.close()


@functools.lru_cache(maxsize=4)
def _shared(cfg_json: str) -> Prober:
    prober = Prober(ProbeConfig(**json.loads(cfg_json)))
    atexit.register(prober.close)
    return prober


def shared_prober(cfg: ProbeConfig) -> Prober:
    """One prober per process and config, kept for the life of the process: Ray reuses
    worker processes across tasks, so a task pool pays the child's start once per worker."""
    return _shared(json.dumps(asdict(cfg), sort_keys=True))


def safe_probe(path: str | os.PathLike, cfg: ProbeConfig | None = None,
               prober: Prober | None = None) -> tuple[dict | None, tuple[str, str] | None]:
    """Probe one file in a separate process with a timeout and caps.

    -> (info, None) or (None, (reason, detail)), reason one of REASONS; never raises for a
    bad file. Uses `prober` if given, else this process's shared prober for `cfg`."""
    if prober is None:
        prober = shared_prober(cfg or ProbeConfig())
    return prober.probe(path)

