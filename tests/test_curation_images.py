"""Still images through curation beside videos, on real files: jpg/png/webp images (good,
rotated by EXIF, with alpha, near-copies, bad in every way the issue lists) and real mp4s in one
directory plus a manifest, run once through the real graph (ingest -> curate -> filter ->
caption -> shard, Ray started by the CLI). Every input ends in a shard or in the rejects with
its reason; images are written as images (not 1-frame mp4s) beside the unchanged videos.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from data import bad_inputs
from data.shards import read_parquet
from data.video_io import encode_mp4, read_frames
from pipeline.curation.caption import decode_clip
from pipeline.curation.curate import IMAGE_FPS, clip_keyframes, clip_seconds, read_clips
from pipeline.curation.ingest import IngestConfig, list_inputs

FPS = 24


def picture(seed: int, h: int, w: int) -> np.ndarray:
    """A smooth random field with a few filled discs -> (h, w, 3) uint8; different seeds give
    pictures whose dedup signatures are far apart."""
    rng = np.random.default_rng(seed)
    small = rng.uniform(40, 210, (6, 8, 3)).astype(np.float32)  # (6, 8, 3)
    img = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)  # (h, w, 3)
    for _ in range(4):
        c = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        cv2.circle(img, c, int(rng.integers(h // 10, h // 4)),
                   tuple(float(v) for v in rng.uniform(30, 220, 3)), -1)
    return np.clip(img, 0, 255).astype(np.uint8)


def pan(big: np.ndarray, frames: int, offset: int = 0) -> np.ndarray:
    """A camera panning right over `big` (H, W, 3), 1/4 px a frame at the output's 96 x 128
    (frames `offset`...`offset + frames - 1`) -> (frames, 96, 128, 3)."""
    return np.stack([cv2.resize(big[:384, i : i + 512], (128, 96), interpolation=cv2.INTER_AREA)
                     for i in range(offset, offset + frames)])


def save(path: Path, arr: np.ndarray, fmt: str, **kw) -> Path:
    Image.fromarray(arr).save(path, format=fmt, **kw)
    return path


def gif(path: Path, frames: int) -> Path:
    ims = [Image.fromarray(picture(20 + i, 48, 48)) for i in range(frames)]
    ims[0].save(path, "GIF", save_all=frames > 1, append_images=ims[1:], duration=100, loop=0)
    return path


def png_with_size(w: int, h: int) -> bytes:
    """A valid small PNG whose IHDR claims w x h (CRC fixed): only the header is big."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", w, h)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def jpeg(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


# name in the input directory -> the reason it is rejected with ("keep": it is sharded)
EXPECT = {
    "pan_a.mp4": "keep", "pan_b.mp4": "keep",
    "photo.jpg": "keep", "rotated.jpg": "keep", "alpha.png": "keep", "photo.webp": "keep",
    "copy_of_photo.jpg": "near_duplicate",  # photo.jpg rescaled and re-encoded
    "frame_of_pan_a.jpg": "near_duplicate",  # a still of the video pan_a.mp4
    "truncated.jpg": "truncated", "pixel.png": "too_small", "huge_header.png": "too_large",
    "animated.webp": "animated", "png_named.jpg": "mislabelled", "png_as_mp4.mp4": "mislabelled",
    "empty.jpg": "empty_file", "html.jpg": "mislabelled", "white.png": "too_bright",
    "banner.jpg": "bad_aspect_ratio", "subtitled.jpg": "text_overlay", "folder.jpg": "not_a_file",
}
MANIFEST = {"anim.gif": "animated", "still.gif": "unsupported_format", "photo_m.jpg": "keep"}
STAGE = {"near_duplicate": "dedup", "too_bright": "filter", "bad_aspect_ratio": "filter",
         "text_overlay": "filter", "not_a_file": "ingest"}


def make_inputs(root: Path) -> dict:
    d = root / "mixed"
    d.mkdir()
    a, b = picture(1, 384, 560), picture(2, 384, 560)
    (d / "pan_a.mp4").write_bytes(encode_mp4(pan(a, 48), FPS))
    (d / "pan_b.mp4").write_bytes(encode_mp4(pan(b, 48), FPS))
    (d / "pan_a.txt").write_text("a pan over a field of colours")
    photo = picture(3, 150, 200)
    save(d / "photo.jpg", photo, "JPEG", quality=92)
    (d / "photo.txt").write_text("discs on a coloured field")
    small = cv2.resize(photo, (150, 112), interpolation=cv2.INTER_AREA)
    save(d / "copy_of_photo.jpg", small, "JPEG", quality=70)
    save(d / "frame_of_pan_a.jpg", pan(a, 1, 24)[0], "JPEG", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 120 x 80, shown 80 wide x 120 high
    save(d / "rotated.jpg", picture(4, 80, 120), "JPEG", quality=92, exif=exif)
    rgba = np.dstack([picture(5, 100, 140), np.full((100, 140), 255, np.uint8)])
    rgba[:, :20, 3] = 0  # a transparent strip, flattened onto white
    save(d / "alpha.png", rgba, "PNG")
    save(d / "photo.webp", picture(6, 90, 120), "WEBP", quality=90)
    whole = jpeg(picture(7, 120, 160))
    (d / "truncated.jpg").write_bytes(whole[: len(whole) * 2 // 3])
    save(d / "pixel.png", np.zeros((1, 1, 3), np.uint8), "PNG")
    (d / "huge_header.png").write_bytes(png_with_size(20000, 20000))
    frames = [Image.fromarray(picture(10 + i, 64, 64)) for i in range(3)]
    frames[0].save(d / "animated.webp", format="WEBP", save_all=True, append_images=frames[1:])
    save(d / "png_named.jpg", picture(8, 64, 64), "PNG")
    bad_inputs.make("png_as_mp4", d)
    (d / "empty.jpg").write_bytes(b"")
    (d / "html.jpg").write_text("<html><body>404 not found</body></html>")
    save(d / "white.png", np.full((80, 80, 3), 255, np.uint8), "PNG")
    save(d / "banner.jpg", picture(9, 40, 200), "JPEG", quality=90)
    sub = np.full((240, 320, 3), 90, np.uint8)
    for row in range(8):
        cv2.putText(sub, "SUBTITLES OVER EVERY LINE", (6, 24 + 28 * row),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 2)
    save(d / "subtitled.jpg", sub, "JPEG", quality=95)
    (d / "folder.jpg").mkdir()
    m = root / "gifs"
    m.mkdir()
    gif(m / "anim.gif", 3)
    gif(m / "still.gif", 1)
    save(m / "photo_m.jpg", picture(11, 100, 100), "JPEG", quality=92)
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"path": f"gifs/{n}", "caption": f"row {n}",
                                            "license": "cc-by-4.0"}) + "\n" for n in MANIFEST))
    return {"dir": d, "manifest": manifest, "gifs": m}


def test_listing_marks_images_by_extension_and_reads_their_captions(tmp_path):
    """Images are listed from directories, globs and manifests beside the videos, kind decided
    by the extension; a same-named .txt is an image's caption as it is a video's."""
    inp = make_inputs(tmp_path)
    items = {Path(i["url"]).name: i for i in list_inputs(
        IngestConfig(inputs=[str(inp["dir"]), str(inp["manifest"])]))}
    assert set(items) == set(EXPECT) | set(MANIFEST)
    for name, it in items.items():
        video = name.endswith(".mp4")
        assert it.get("kind") == (None if video else "image"), name
    assert items["photo.jpg"]["caption"] == "discs on a coloured field"
    assert items["pan_a.mp4"]["caption"] == "a pan over a field of colours"
    assert items["anim.gif"]["caption"] == "row anim.gif"
    glob = list_inputs(IngestConfig(inputs=[str(inp["dir"] / "p*.jp*g")]))
    assert sorted(Path(i["url"]).name for i in glob) == ["photo.jpg", "png_named.jpg"]
    videos_only = list_inputs(IngestConfig(inputs=[str(inp["dir"])], image_extensions=[]))
    assert {Path(i["url"]).suffix for i in videos_only} == {".mp4"}
    with pytest.raises(ValueError, match="image_extensions"):
        IngestConfig(extensions=[".mp4", ".png"])
