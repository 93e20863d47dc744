"""Hostile and odd input files, each with the outcome the probe must give it.

Complements the synthetic source's bad kinds (zero-byte, truncated, random bytes, frozen, too
short, tiny) with the ones real crawls produce. Every file is small and made in milliseconds:
the "huge" and "long" ones only claim to be (a header patched to 8000x8000, two frames ten
hours apart, a sparse file), which is exactly what the caps must catch before decoding.

`KINDS` maps kind -> the reason curation must reject it with (for most, a reason from
`data.probe.REASONS`), or "keep" for files that are odd but usable (other codecs and
containers, an mp4 named .mkv, rotation, variable frame rate). The kinds in `AFTER_PROBE` pass
the probe, which decodes only their first frame, and break later: the probe says "keep" and
the decode stage rejects them. `make(kind, directory)` writes one and returns its path.
`write_flood` writes a legitimate but heavy file (many frames from a few bytes each), for
tests of the decoder's timeout and memory cap.
"""

from __future__ import annotations

import os
import struct
import zlib
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

KINDS = {
    "audio_only": "no_video_stream",  # AAC in mp4, no video
    "mpeg4_avi": "keep",  # MPEG-4 Part 2 in AVI
    "mjpeg_mkv": "keep",  # Motion JPEG in Matroska
    "vp9_webm": "keep",  # VP9 in WebM
    "unknown_fourcc": "unsupported_codec",  # AVI whose codec tag no decoder knows
    "huge_header": "high_resolution",  # header claims 8000x8000 (frames are 64x64: undecodable)
    "ten_hours": "too_long",  # two frames, ten hours apart
    "sparse_64g": "too_large",  # a sparse 64 GiB file: costs no disk, must not be read
    "png_as_mp4": "mislabelled",  # a PNG image named .mp4
    "html_as_mp4": "mislabelled",  # an HTTP error page saved as .mp4
    "mp4_as_mkv": "keep",  # an mp4 named .mkv: content decides, recorded as ext_mismatch
    "rotated": "keep",  # phone video: stored 96x64, a display matrix turns it by 90 degrees
    "vfr": "keep",  # variable frame rate
    "faststart_truncated": "truncated",  # index first, cut in half: opens, frames missing
    "fifo": "timeout",  # a named pipe: open() blocks (stands in for a stalled mount)
    "corrupt_midstream": "decode_failed",  # garbage over the middle of the mdat: first frame fine
    # 48,000 frames of 160x96 from 10 bytes each (2.2 GB decoded): curation streams them in
    # bounded memory, so the grey still that they show is what rejects it.
    "frame_flood": "low_motion",
}
# Kinds the probe passes ("keep") and a later stage rejects: kind -> that stage.
AFTER_PROBE = {"corrupt_midstream": "decode", "frame_flood": "filter"}


def probe_outcome(kind: str) -> str:
    """What the probe alone says about `kind`."""
    return "keep" if kind in AFTER_PROBE else KINDS[kind]

_EXT = {"audio_only": ".mp4", "mpeg4_avi": ".avi", "mjpeg_mkv": ".mkv", "vp9_webm": ".webm",
        "unknown_fourcc": ".avi", "huge_header": ".avi", "mp4_as_mkv": ".mkv"}
SIZE, FPS, FRAMES = 64, 8, 16  # the usable ones: 64x64, 2 seconds


def _frames(n: int = FRAMES, size: int = SIZE) -> np.ndarray:
    """A bright square moving right over grey -> (T, H, W, 3) uint8."""
    frames = np.full((n, size, size, 3), 90, np.uint8)  # (T, H, W, 3)
    for t in range(n):
        x = (4 * t) % (size - 16)
        frames[t, 24:40, x : x + 16] = (250, 200, 40)
    return frames


def _encode(path, codec: str, fmt: str | None = None, pts_ms: list[int] | None = None,
            pix_fmt: str = "yuv420p", rotation: int = 0, options: dict | None = None,
            container_options: dict | None = None, width: int = SIZE) -> None:
    """Write _frames() with `codec`; `pts_ms` gives each frame's time in milliseconds."""
    frames = _frames(len(pts_ms) if pts_ms else FRAMES)  # (T, H, W, 3)
    if width != SIZE:
        frames = np.concatenate([frames, frames[:, :, : width - SIZE]], axis=2)  # (T, H, width, 3)
    tb = Fraction(1, 1000)
    with av.open(os.fspath(path), "w", format=fmt, options=container_options or {}) as c:
        s = c.add_stream(codec, rate=FPS)
        s.width, s.height, s.pix_fmt = width, SIZE, pix_fmt
        if pts_ms:
            s.time_base = s.codec_context.time_base = tb
        if rotation:
            s.set_display_rotation(rotation)
        if options:
            s.options = options
        for i, rgb in enumerate(frames):  # (H, W, 3)
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            if pts_ms:
                frame.pts, frame.time_base = pts_ms[i], tb
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def _png(size: int = SIZE) -> bytes:
    """A grey RGB PNG, by hand (zlib + CRCs), so no image library is needed."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    raw = b"".join(b"\x00" + b"\x80" * (3 * size) for _ in range(size))
    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def write_flood(path, frames: int, width: int, height: int, fps: int = 30) -> None:
    """An H.264 mp4 of `frames` frames: one grey keyframe, then the same skipped P-frame
    (~10-25 bytes) over and over. Valid and cheap to write, but its decoding costs as much as
    any video of that size and length."""
    enc = av.CodecContext.create("libx264", "w")
    enc.width, enc.height, enc.pix_fmt = width, height, "yuv420p"
    enc.time_base, enc.framerate = Fraction(1, fps), fps
    enc.options = {"preset": "ultrafast", "bframes": "0",
                   "x264-params": "keyint=1000000:scenecut=0"}
    grey = np.full((height, width, 3), 90, np.uint8)
    packets = []
    for i in range(3):
        f = av.VideoFrame.from_ndarray(grey, format="rgb24")
        f.pts = i
        packets += enc.encode(f)
    packets += enc.encode(None)
    key, skip = bytes(packets[0]), bytes(packets[-1])
    with av.open(os.fspath(path), "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        s.codec_context.extradata = enc.extradata
        s.time_base = Fraction(1, fps)
        for i in range(frames):
            p = av.Packet(key if i == 0 else skip)
            p.pts = p.dts = i
            p.time_base, p.stream, p.is_keyframe = Fraction(1, fps), s, i == 0
            c.mux(p)


def make(kind: str, directory: str | os.PathLike) -> Path:
    """Write the file for `kind` into `directory` (named `<kind><ext>`) and return its path."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; known: {sorted(KINDS)}")
    path = Path(directory) / f"{kind}{_EXT.get(kind, '.mp4')}"
    if kind == "audio_only":
        with av.open(os.fspath(path), "w") as c:
            s = c.add_stream("aac", rate=16000)
            s.layout = "mono"
            for i in range(20):  # 1.3 s of silence
                f = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp",
                                               layout="mono")
                f.sample_rate, f.pts = 16000, i * 1024
                for p in s.encode(f):
                    c.mux(p)
            for p in s.encode():
                c.mux(p)
    elif kind in ("mpeg4_avi", "unknown_fourcc"):
        _encode(path, "mpeg4")
        if kind == "unknown_fourcc":  # the tag sits in the stream header and the BITMAPINFOHEADER
            path.write_bytes(path.read_bytes().replace(b"FMP4", b"QQQQ"))
    elif kind == "mjpeg_mkv":
        _encode(path, "mjpeg", pix_fmt="yuvj420p")
    elif kind == "vp9_webm":
        _encode(path, "libvpx-vp9", options={"deadline": "realtime", "cpu-used": "8"})
    elif kind == "huge_header":
        _encode(path, "rawvideo")
        data = bytearray(path.read_bytes())
        avih, strf = data.find(b"avih"), data.find(b"strf")
        data[avih + 40 : avih + 48] = struct.pack("<II", 8000, 8000)  # main header dwWidth/Height
        data[strf + 12 : strf + 20] = struct.pack("<ii", 8000, 8000)  # BITMAPINFOHEADER
        path.write_bytes(bytes(data))
    elif kind == "ten_hours":
        _encode(path, "libx264", pts_ms=[0, 10 * 3600 * 1000])
    elif kind == "sparse_64g":
        with open(path, "wb") as f:
            f.truncate(64 * 2**30)
    elif kind == "png_as_mp4":
        path.write_bytes(_png())
    elif kind == "html_as_mp4":
        path.write_text("<!DOCTYPE html>\n<html><head><title>403 Forbidden</title></head>\n"
                        "<body><h1>Forbidden</h1><p>Access denied.</p></body></html>\n")
    elif kind == "mp4_as_mkv":
        _encode(path, "libx264", fmt="mp4")
    elif kind == "rotated":  # stored 96x64, displayed 64x96
        _encode(path, "libx264", rotation=90, width=96)
    elif kind == "vfr":  # 30 fps, then 10 fps, then 30 fps again
        _encode(path, "libx264", pts_ms=[0, 33, 67, 100, 200, 300, 400, 500, 600, 633, 667, 700,
                                         733, 767, 800, 1100])
    elif kind == "faststart_truncated":
        _encode(path, "libx264", pts_ms=[125 * i for i in range(24)],
                container_options={"movflags": "faststart"})
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "corrupt_midstream":  # the moov is intact: the probe counts every frame
        _encode(path, "libx264", pts_ms=[125 * i for i in range(32)])
        data = bytearray(path.read_bytes())
        at = data.find(b"mdat")
        start, end = at + 4, at - 4 + struct.unpack(">I", data[at - 4 : at])[0]
        a, b = start + 6 * (end - start) // 10, start + 7 * (end - start) // 10
        data[a:b] = np.random.default_rng(0).integers(0, 256, b - a, dtype=np.uint8).tobytes()
        path.write_bytes(bytes(data))
    elif kind == "frame_flood":  # 200 s at 240 fps: within every probe cap
        write_flood(path, 48_000, 160, 96, fps=240)
    return path


def make_all(directory: str | os.PathLike, kinds=None) -> dict[str, Path]:
    """Write every kind (or `kinds`) into `directory`; kind -> path."""
    os.makedirs(directory, exist_ok=True)
    return {k: make(k, directory) for k in (kinds or KINDS)}
