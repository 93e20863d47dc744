"""Probing and decoding untrusted still images (jpg/jpeg, png, webp) with Pillow.

The image counterpart of `data.probe` (videos): `probe_image(src, name)` never raises for a
bad file and returns ``(info, None)`` or ``(None, (reason, detail))``, reason one of
`IMAGE_REASONS`; `read_image(src, name, size=...)` decodes to ``(H, W, 3)`` uint8 RGB or
raises `ImageReject` with the same reasons. `src` is a path or the file's bytes (a
WebDataset member); `name` gives the extension when `src` is bytes.

Checks, cheapest first, so a hostile file is refused before any expensive work:
1. Size in bytes: `empty_file`, `too_large` (more than `max_bytes`).
2. Sniff: text (an HTML error page saved as ``.jpg``) is `mislabelled`; bytes Pillow cannot
   identify are `undecodable`.
3. Header only (`Image.open` reads no pixel data): frame size against `max_pixels` and
   `max_side` -> `too_large`, decided without decoding. Pillow's own decompression-bomb guard
   (`Image.MAX_IMAGE_PIXELS`, an error past twice it) also answers `too_large`; it is read,
   never changed, and its warning is silenced only inside the call
   (`warnings.catch_warnings`), so no global state is left changed. The stricter of the two
   limits wins.
4. Animation (an animated GIF, WebP or APNG) -> `animated` by default: a moving image is a
   video, and its first frame is often a title card or blank; ``animated="first_frame"``
   keeps frame 0 instead.
5. Format outside `formats` (BMP, TIFF, a still GIF, ...) -> `unsupported_format`; a supported
   format under another kind's extension (a PNG named ``.jpg`` or ``.mp4``) -> `mislabelled`
   (as `data.probe` does for a PNG named ``.mp4``; ``.jpg`` and ``.jpeg`` are one kind).
6. Shortest side < `min_side` (a 1x1 tracking pixel) -> `too_small`.
7. Full decode (`load`): a file cut short -> `truncated` (Pillow's "image file is truncated"
   and its kin), any other decoder error -> `undecodable`. This relies on Pillow's default
   ``ImageFile.LOAD_TRUNCATED_IMAGES = False``; this module never sets it.

Sizes: ``width``/``height`` are the stored pixels; ``display_width``/``display_height`` the
image as shown after its EXIF orientation (tags 5-8 swap them), which is what `read_image`
returns. Conversion to RGB: palette, greyscale (8 and 16 bit), CMYK and YCbCr become RGB;
alpha is flattened onto `background`, white by default (how the web pages these images come
from show a transparent PNG; black would turn dark line art on transparency into nothing).

Unlike the video probe this runs in the calling process: the pixel cap bounds what a decode
may allocate (about 3 bytes a pixel), so there is no FFmpeg-style unbounded allocation to
isolate. Wiring into curation may still run it in a `data.isolate.Isolated` child.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from data.checks import check_ranges
from data.probe import _looks_like_text

# Every reason an image can be rejected with (stable: dashboards and tests key on them).
IMAGE_REASONS = (
    "not_found",  # the path does not exist
    "empty_file",  # zero bytes
    "too_large",  # more than max_bytes, or a header past max_pixels / max_side (a bomb)
    "mislabelled",  # text, or an image whose extension names another kind (a PNG named .jpg)
    "unsupported_format",  # an image Pillow reads, but not one of `formats` (BMP, TIFF, GIF)
    "animated",  # more than one frame (animated GIF/WebP/APNG), unless animated="first_frame"
    "too_small",  # shortest side < min_side
    "truncated",  # the header is fine, the pixel data stops early
    "undecodable",  # not an image Pillow can identify, or the decoder fails
    "unreadable",  # an OS error reading the file
)

# Pillow format -> the extensions that name it.
FORMAT_EXTS = {"JPEG": (".jpg", ".jpeg"), "PNG": (".png",), "WEBP": (".webp",)}
_TRUNCATED_HINTS = ("truncated", "broken data stream", "unexpected end", "premature end")

Source = Union[str, os.PathLike, bytes]


@dataclass
class ImageProbeConfig:
    """Limits for one image; sizes are checked from the header before any decoding."""

    min_side: int = 32  # shortest side, pixels
    max_side: int = 16384  # longest side, pixels
    max_pixels: int = 8192 * 8192  # width * height (Pillow's own bomb error is ~179M)
    max_bytes: int = 256 * 2**20
    formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP")  # Pillow format names
    animated: str = "reject"  # "reject" -> `animated`; "first_frame" -> keep frame 0
    background: tuple[int, int, int] = (255, 255, 255)  # alpha is flattened onto this

    def __post_init__(self) -> None:
        check_ranges(self, min_side=">= 1", max_side=">= 1", max_pixels=">= 1", max_bytes=">= 1")
        if self.min_side > self.max_side:
            raise ValueError(f"min_side must be <= max_side, got {self.min_side} > {self.max_side}")
        unknown = [f for f in self.formats if f not in FORMAT_EXTS]
        if unknown:
            raise ValueError(f"formats: unknown {unknown}, known {sorted(FORMAT_EXTS)}")
        if self.animated not in ("reject", "first_frame"):
            raise ValueError(f"animated must be 'reject' or 'first_frame', got {self.animated!r}")
        if len(self.background) != 3 or not all(0 <= int(c) <= 255 for c in self.background):
            raise ValueError(f"background must be 3 values in 0..255, got {self.background}")


class ImageReject(Exception):
    """An image refused: `reason` is one of IMAGE_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


def _read_bytes(src: Source, cfg: ImageProbeConfig) -> bytes:
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
    else:
        try:
            size = os.stat(src).st_size
        except FileNotFoundError:
            raise ImageReject("not_found", os.fspath(src)) from None
        except OSError as e:
            raise ImageReject("unreadable", f"stat: {e}") from None
        if size > cfg.max_bytes:
            raise ImageReject("too_large", f"{size} bytes > {cfg.max_bytes}")
        try:
            with open(src, "rb") as f:
                data = f.read(cfg.max_bytes + 1)
        except OSError as e:
            raise ImageReject("unreadable", f"read: {e}") from None
    if not data:
        raise ImageReject("empty_file")
    if len(data) > cfg.max_bytes:
        raise ImageReject("too_large", f"{len(data)} bytes > {cfg.max_bytes}")
    return data


def _open(src: Source, name: Optional[str], cfg: ImageProbeConfig) -> tuple[Image.Image, int]:
    """Checks 1-7 of the module docstring -> (the loaded image, its size in bytes)."""
    data = _read_bytes(src, cfg)
    if _looks_like_text(data[:4096]):
        raise ImageReject("mislabelled", "text, not an image")  # never the bytes themselves
    try:
        with warnings.catch_warnings():  # our caps decide; restored on exit
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))  # the header only
    except Image.DecompressionBombError as e:
        raise ImageReject("too_large", f"decompression bomb: {str(e)[:200]}") from None
    except UnidentifiedImageError:
        raise ImageReject("undecodable", "not an image Pillow can identify") from None
    except (OSError, SyntaxError, ValueError) as e:  # a header Pillow chokes on
        raise ImageReject("undecodable", f"header: {str(e)[:200]}") from None
    w, h = im.size
    if w * h > cfg.max_pixels or max(w, h) > cfg.max_side:
        raise ImageReject("too_large", f"{w}x{h} > max side {cfg.max_side} or {cfg.max_pixels} pixels")
    if getattr(im, "is_animated", False) and cfg.animated == "reject":
        raise ImageReject("animated", f"{im.format} with more than one frame")
    if im.format not in cfg.formats:
        raise ImageReject("unsupported_format", f"{im.format} not in {list(cfg.formats)}")
    label = name if name is not None or isinstance(src, (bytes, bytearray, memoryview)) else os.fspath(src)
    ext = os.path.splitext(label)[1].lower() if label else ""  # no name: the content decides
    if ext and ext not in FORMAT_EXTS[im.format]:
        raise ImageReject("mislabelled", f"{im.format} content named {ext}")
    if min(w, h) < cfg.min_side:
        raise ImageReject("too_small", f"{w}x{h}, shortest side < {cfg.min_side}")
    try:
        im.seek(0)
        im.load()
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        msg = str(e)
        reason = "truncated" if any(k in msg.lower() for k in _TRUNCATED_HINTS) else "undecodable"
        raise ImageReject(reason, msg[:300]) from None
    return im, len(data)


def exif_orientation(im: Image.Image) -> int:
    """The EXIF orientation tag (1-8; 1: as stored) of an opened image, its header only."""
    try:
        return int(im.getexif().get(0x0112, 1) or 1)
    except Exception:  # a broken EXIF block: shown as stored (exif_transpose does the same)
        return 1


def probe_image(src: Source, name: Optional[str] = None,
                cfg: ImageProbeConfig | None = None) -> tuple[dict | None, tuple[str, str] | None]:
    """-> (info, None) for a usable image, or (None, (reason, detail)); never raises for a bad
    file. `name` (the file or member name) gives the extension; defaults to the path."""
    cfg = cfg or ImageProbeConfig()
    try:
        im, nbytes = _open(src, name, cfg)
    except ImageReject as e:
        return None, (e.reason, e.detail)
    with im:
        w, h = im.size
        orientation = exif_orientation(im)
        turned = orientation in (5, 6, 7, 8)
        return {
            "format": im.format,
            "mode": im.mode,
            "width": w,  # stored
            "height": h,
            "orientation": orientation,  # EXIF tag 274; 1 = as stored
            "display_width": h if turned else w,  # as shown, what read_image returns
            "display_height": w if turned else h,
            "has_alpha": im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info,
            "animated": bool(getattr(im, "is_animated", False)),
            "size_bytes": nbytes,
        }, None


def resize_crop_size(h: int, w: int, size: tuple[int, int]) -> tuple[int, int]:
    """The (h', w') to resize to so that a centre crop of `size` keeps the aspect ratio (the
    rule of `training.clips.resize_crop_size`, repeated here so `data` needs no torch)."""
    th, tw = size
    scale = max(th / h, tw / w)
    return max(th, math.ceil(h * scale)), max(tw, math.ceil(w * scale))


def _to_rgb(im: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any mode -> RGB: alpha flattened onto `background`, 16-bit and float greys scaled."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)  # (H, W)
        hi = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(a * (255.0 / hi) + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info or im.mode in ("PA", "LA", "La", "RGBa"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        flat = Image.new("RGB", im.size, tuple(int(c) for c in background))
        flat.paste(im, mask=im.getchannel("A"))
        return flat
    return im.convert("RGB")  # P, L, 1, CMYK, YCbCr, LAB, RGB


def read_image(src: Source, name: Optional[str] = None, size: tuple[int, int] | None = None,
               cfg: ImageProbeConfig | None = None) -> np.ndarray:
    """Decode an image -> (H, W, 3) uint8 RGB, EXIF orientation applied. With `size`
    (height, width): resized keeping the aspect ratio so it covers `size` (Pillow's bicubic,
    with its antialiasing when shrinking), then centre-cropped, as the video path does.
    Raises ImageReject (reason one of IMAGE_REASONS) for a bad file."""
    cfg = cfg or ImageProbeConfig()
    im, _ = _open(src, name, cfg)
    with im:
        im = ImageOps.exif_transpose(im)
        rgb = _to_rgb(im, cfg.background)
    if size is not None:
        rh, rw = resize_crop_size(rgb.height, rgb.width, size)
        if (rh, rw) != (rgb.height, rgb.width):
            rgb = rgb.resize((rw, rh), Image.Resampling.BICUBIC)
        top, left = (rh - size[0]) // 2, (rw - size[1]) // 2
        rgb = rgb.crop((left, top, left + size[1], top + size[0]))
    out = np.asarray(rgb, dtype=np.uint8)  # (H, W, 3)
    return out if out.flags.writeable else out.copy()
