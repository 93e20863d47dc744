"""Still images: probe and decode (data.images), on real files made with Pillow."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from data.bad_inputs import make
from data.images import IMAGE_REASONS, ImageProbeConfig, ImageReject, probe_image, read_image, resize_crop_size
from data.probe import ProbeConfig, Prober
from training.clips import resize_crop_size as clips_resize_crop_size


def _halves(h: int = 40, w: int = 60) -> np.ndarray:
    """Left half red, right half blue -> (H, W, 3) uint8."""
    a = np.zeros((h, w, 3), np.uint8)  # (H, W, 3)
    a[:, : w // 2] = (255, 0, 0)
    a[:, w // 2 :] = (0, 0, 255)
    return a


def _save(path, arr_or_im, fmt: str | None = None, **kw):
    im = Image.fromarray(arr_or_im) if isinstance(arr_or_im, np.ndarray) else arr_or_im
    im.save(path, format=fmt, **kw)
    return path


def _png_with_size(w: int, h: int) -> bytes:
    """A valid small PNG whose IHDR claims w x h (CRC fixed): only the header is big."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", w, h)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.mark.parametrize("fmt,ext", [("JPEG", ".jpg"), ("JPEG", ".jpeg"), ("PNG", ".png"), ("WEBP", ".webp")])
def test_supported_formats_probe_and_read(tmp_path, fmt, ext):
    path = _save(tmp_path / f"a{ext}", _halves(), fmt, **({"quality": 95} if fmt != "PNG" else {}))
    info, rej = probe_image(path)
    assert rej is None and (info["format"], info["width"], info["height"]) == (fmt, 60, 40)
    img = read_image(path)
    assert img.shape == (40, 60, 3) and img.dtype == np.uint8
    assert img[:, :25, 0].mean() > 200 and img[:, :25, 2].mean() < 60  # red left
    assert img[:, 35:, 2].mean() > 200 and img[:, 35:, 0].mean() < 60  # blue right
    # bytes with a member name (a WebDataset sample) give the same answer
    info_b, _ = probe_image(path.read_bytes(), f"000001{ext}")
    assert info_b == info
    assert np.array_equal(read_image(path.read_bytes(), f"x{ext}"), img)


def test_exif_orientation_is_honoured(tmp_path):
    """Stored 60 wide x 40 high, red left; EXIF 6 = turn 90 degrees clockwise to show: the
    shown image is 40 wide x 60 high with red on top."""
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _save(tmp_path / "phone.jpg", _halves(), "JPEG", quality=95, exif=exif)
    info, _ = probe_image(path)
    assert (info["width"], info["height"], info["orientation"]) == (60, 40, 6)
    assert (info["display_width"], info["display_height"]) == (40, 60)
    img = read_image(path)
    assert img.shape == (60, 40, 3)
    top, bottom = img[:25], img[35:]
    assert top[..., 0].mean() > 200 and top[..., 2].mean() < 60  # red on top
    assert bottom[..., 2].mean() > 200 and bottom[..., 0].mean() < 60  # blue below


def test_png_named_png_accepted_png_named_mp4_mislabelled_by_both_probes(tmp_path):
    png = _save(tmp_path / "still.png", _halves(), "PNG")
    assert probe_image(png)[1] is None
    as_mp4 = make("png_as_mp4", tmp_path)  # the video probe's own fixture
    with Prober(ProbeConfig()) as prober:
        info, rej = prober.probe(as_mp4)
    assert info is None and rej[0] == "mislabelled"
    assert probe_image(as_mp4)[1][0] == "mislabelled"  # a PNG under a video's name
    (tmp_path / "logo.jpg").write_bytes(png.read_bytes())
    info, rej = probe_image(tmp_path / "logo.jpg")
    assert rej == ("mislabelled", "PNG content named .jpg")


def test_truncated_jpeg(tmp_path):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # the default this relies on
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)  # (H, W, 3): many bytes of scan
    full = _save(tmp_path / "full.jpg", noisy, "JPEG", quality=90).read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(full[: len(full) // 2])
    info, rej = probe_image(cut)
    assert info is None and rej[0] == "truncated", rej
    with pytest.raises(ImageReject) as e:
        read_image(cut)
    assert e.value.reason == "truncated"


def test_too_small_with_configurable_minimum(tmp_path):
    pixel = _save(tmp_path / "pixel.png", np.zeros((1, 1, 3), np.uint8), "PNG")
    assert probe_image(pixel)[1][0] == "too_small"
    small = _save(tmp_path / "small.png", np.zeros((20, 50, 3), np.uint8), "PNG")
    assert probe_image(small)[1] == ("too_small", "50x20, shortest side < 32")
    info, rej = probe_image(small, cfg=ImageProbeConfig(min_side=16))
    assert rej is None and info["height"] == 20


def test_decompression_bomb_decided_from_the_header(tmp_path):
    """20000x20000 (past Pillow's own bomb error) and 9000x9000 (past our cap, under
    Pillow's): both `too_large` from the header; the pixel data is that of 64x64, so any
    decoding would have failed as truncated instead. No global state changed."""
    before = (Image.MAX_IMAGE_PIXELS, list(warnings.filters))
    for side in (20000, 9000):
        path = tmp_path / f"bomb{side}.png"
        path.write_bytes(_png_with_size(side, side))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no DecompressionBombWarning leaks out either
            info, rej = probe_image(path)
            assert info is None and rej[0] == "too_large", rej
            with pytest.raises(ImageReject) as e:
                read_image(path)
            assert e.value.reason == "too_large"
    assert (Image.MAX_IMAGE_PIXELS, list(warnings.filters)) == before
    # the same header under a raised cap is read past the header, and fails at decode
    path = tmp_path / "bomb9000.png"
    rej = probe_image(path, cfg=ImageProbeConfig(max_pixels=10**8))[1]
    assert rej[0] in ("truncated", "undecodable")


def _gif(path, frames: int):
    ims = [Image.fromarray(np.full((48, 48, 3), 40 * i, np.uint8)) for i in range(frames)]
    ims[0].save(path, "GIF", save_all=frames > 1, append_images=ims[1:], duration=100, loop=0)
    return path


def test_animated_gif_rejected_or_first_frame(tmp_path):
    anim = _gif(tmp_path / "anim.gif", 3)
    info, rej = probe_image(anim)
    assert info is None and rej[0] == "animated"
    # with first_frame it is still a GIF, outside the default formats
    assert probe_image(anim, cfg=ImageProbeConfig(animated="first_frame"))[1][0] == "unsupported_format"
    cfg = ImageProbeConfig(animated="first_frame", formats=("JPEG", "PNG", "WEBP"))
    # animated WebP (a supported format): rejected by default, frame 0 on request
    ims = [Image.fromarray(np.full((48, 48, 3), v, np.uint8)) for v in (200, 30, 30)]
    webp = tmp_path / "anim.webp"
    ims[0].save(webp, "WEBP", save_all=True, append_images=ims[1:], duration=100, lossless=True)
    assert probe_image(webp)[1][0] == "animated"
    info, rej = probe_image(webp, cfg=cfg)
    assert rej is None and info["animated"] is True
    assert np.abs(read_image(webp, cfg=cfg).astype(int) - 200).max() <= 2  # frame 0, not 1


def test_unsupported_and_undecodable(tmp_path):
    bmp = _save(tmp_path / "a.bmp", _halves(), "BMP")
    assert probe_image(bmp)[1] == ("unsupported_format", "BMP not in ['JPEG', 'PNG', 'WEBP']")
    still_gif = _gif(tmp_path / "still.gif", 1)
    assert probe_image(still_gif)[1][0] == "unsupported_format"
    (tmp_path / "noise.jpg").write_bytes(np.random.default_rng(1).integers(0, 256, 4096, np.uint8).tobytes())
    assert probe_image(tmp_path / "noise.jpg")[1][0] == "undecodable"
    (tmp_path / "403.jpg").write_text("<html><body>Forbidden</body></html>\n")
    assert probe_image(tmp_path / "403.jpg")[1] == ("mislabelled", "text, not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    assert probe_image(tmp_path / "empty.png")[1][0] == "empty_file"
    assert probe_image(tmp_path / "gone.png")[1][0] == "not_found"
    big = _save(tmp_path / "big.png", _halves(), "PNG")
    assert probe_image(big, cfg=ImageProbeConfig(max_bytes=100))[1][0] == "too_large"
    # every reason used is a declared one
    for rej in (probe_image(p)[1] for p in (bmp, still_gif, tmp_path / "noise.jpg")):
        assert rej[0] in IMAGE_REASONS


def test_modes_are_converted_alpha_flattened_onto_white(tmp_path):
    rgba = np.zeros((40, 40, 4), np.uint8)  # (H, W, 4): left half opaque red, right transparent
    rgba[:, :20] = (255, 0, 0, 255)
    path = _save(tmp_path / "alpha.png", rgba, "PNG")
    assert probe_image(path)[0]["has_alpha"] is True
    img = read_image(path)
    assert img.shape == (40, 40, 3)
    assert (img[:, :20] == (255, 0, 0)).all() and (img[:, 20:] == 255).all()  # white behind
    black = read_image(path, cfg=ImageProbeConfig(background=(0, 0, 0)))
    assert (black[:, 20:] == 0).all()
    grey = _save(tmp_path / "grey.png", np.full((40, 40), 77, np.uint8), "PNG")
    assert (read_image(grey) == 77).all()
    grey16 = tmp_path / "grey16.png"
    Image.fromarray(np.full((40, 40), 65535, np.uint16)).save(grey16, "PNG")
    assert (read_image(grey16) == 255).all()
    pal = _save(tmp_path / "pal.png", Image.fromarray(_halves()).convert("P", palette=Image.Palette.ADAPTIVE), "PNG")
    assert (read_image(pal)[:, :25] == (255, 0, 0)).all()
    cmyk = _save(tmp_path / "cmyk.jpg", Image.fromarray(_halves()).convert("CMYK"), "JPEG", quality=95)
    assert probe_image(cmyk)[0]["mode"] == "CMYK"
    c = read_image(cmyk)
    assert c.shape == (40, 60, 3) and c[:, :25, 0].mean() > 200 and c[:, :25, 2].mean() < 60


def test_resize_and_centre_crop_like_the_video_path(tmp_path):
    for h, w, size in ((40, 60, (32, 32)), (100, 50, (24, 40)), (7, 9, (32, 48))):
        assert resize_crop_size(h, w, size) == clips_resize_crop_size(h, w, size)
    a = np.zeros((40, 120, 3), np.uint8)  # (H, W, 3): thirds red, green, blue
    a[:, :40], a[:, 40:80], a[:, 80:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    path = _save(tmp_path / "wide.png", a, "PNG")
    out = read_image(path, size=(20, 20))  # resized to 20x60, the middle 20 columns kept
    assert out.shape == (20, 20, 3)
    assert (out[:, 3:17, 1] > 200).all() and (out[:, 3:17, 0] < 50).all()
    up = read_image(path, size=(80, 60))  # upscaled to 80x240, centre 60 columns: green
    assert up.shape == (80, 60, 3) and (up[..., 1] > 200).all()


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="min_side"):
        ImageProbeConfig(min_side=0)
    with pytest.raises(ValueError, match="animated"):
        ImageProbeConfig(animated="loop")
    with pytest.raises(ValueError, match="formats"):
        ImageProbeConfig(formats=("JPEG", "TIFF"))
    with pytest.raises(ValueError, match="min_side must be <= max_side"):
        ImageProbeConfig(min_side=100, max_side=50)
