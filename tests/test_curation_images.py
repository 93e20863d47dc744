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
import torch
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
# samples of an image WebDataset shard (LAION-style: key.jpg + key.txt or key.json)
TAR = {"images.tar#s1.jpg": "keep", "images.tar#s2.png": "keep", "images.tar#s3.jpg": "no_caption",
       "images.tar#s4.txt": "no_image", "images.tar#s5.jpg": "truncated"}
ALL = {**EXPECT, **MANIFEST, **TAR}
STAGE = {"near_duplicate": "dedup", "too_bright": "filter", "bad_aspect_ratio": "filter",
         "text_overlay": "filter", "not_a_file": "ingest", "no_caption": "ingest",
         "no_image": "ingest"}


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


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
    png = io.BytesIO()
    Image.fromarray(picture(31, 100, 100)).save(png, format="PNG")
    cut = jpeg(picture(32, 90, 120))
    write_tar(root / "images.tar", {
        "s1.jpg": jpeg(picture(30, 90, 160)), "s1.txt": b"a shard sample",
        "s2.png": png.getvalue(), "s2.json": json.dumps({
            "caption": "from the json", "url": "https://example.org/s2.png",
            "similarity": 0.31}).encode(),
        "s3.jpg": jpeg(picture(33, 90, 120)), "s4.txt": b"a caption without its image",
        "s5.jpg": cut[: len(cut) // 2], "s5.txt": b"cut short"})
    return {"dir": d, "manifest": manifest, "gifs": m, "tar": root / "images.tar"}


def test_listing_marks_images_by_extension_and_reads_their_captions(tmp_path):
    """Images are listed from directories, globs and manifests beside the videos, kind decided
    by the extension; a same-named .txt is an image's caption as it is a video's."""
    inp = make_inputs(tmp_path)
    items = {Path(i["url"]).name: i for i in list_inputs(
        IngestConfig(inputs=[str(inp["dir"]), str(inp["manifest"]), str(inp["tar"])]))}
    assert set(items) == set(ALL)
    tar = {n: items.pop(n) for n in TAR}
    assert tar["images.tar#s1.jpg"]["caption"] == "a shard sample"
    s2 = tar["images.tar#s2.png"]
    assert (s2["caption"], s2["source_url"], s2["meta"]["shard"]) == (
        "from the json", "https://example.org/s2.png", {"key": "s2", "similarity": 0.31})
    assert s2["kind"] == "image" and s2["tar"]["size"] == len(Path(inp["tar"]).read_bytes()[
        s2["tar"]["offset"]: s2["tar"]["offset"] + s2["tar"]["size"]])
    assert {n: (t.get("reject") or ["keep"])[0] for n, t in tar.items()} == {
        **TAR, "images.tar#s5.jpg": "keep"}  # truncation shows at the probe
    loose = list_inputs(IngestConfig(inputs=[str(inp["tar"])], tar_require_caption=False))
    assert sum("reject" in i for i in loose) == 1  # only the sample without an image
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


# ----- one run of the real graph over the mixed inputs ----------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("inputs")
    inp = make_inputs(root)
    cwd = tmp_path_factory.mktemp("run")
    env = {**os.environ, "SPACETIME_RUN_ID": ""}
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "--only", "shard",
                        "source=ingest", "tracking=disabled", "curate.group_size=6",
                        f"ingest.inputs=[{inp['dir']},{inp['manifest']},{inp['tar']}]"],
                       cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    latest = json.loads((cwd / "outputs/runs/latest.json").read_text())
    lineage = json.loads((cwd / f"outputs/runs/{latest['run_id']}/lineage.json").read_text())
    dirs = {n: Path(s["path"]) for n, s in lineage["stages"].items()}
    items = [json.loads(s) for s in (dirs["source"] / "inputs.jsonl").read_text().splitlines()]
    name = {i["id"]: Path(i["url"]).name for i in items}
    d = dirs["shard"]
    index = json.loads((d / "index.json").read_text())
    samples: dict[str, dict] = {}
    for split in ("train", "val"):
        for p in index[split]:
            with tarfile.open(d / p) as tf:
                for m in tf.getmembers():
                    key, ext = m.name.split(".", 1)
                    samples.setdefault(key, {"__split__": split})[ext] = tf.extractfile(m).read()
    return {"inputs": inp, "dirs": dirs, "items": items, "name": name, "samples": samples,
            "rows": read_parquet(d / "clips.parquet"),
            "rejects": read_parquet(d / "rejects.parquet"),
            "stats": json.loads((d / "stats.json").read_text())}


def test_every_input_is_sharded_or_rejected_with_its_reason(run):
    name, rows = run["name"], run["rows"]
    sharded = {name[r["source_id"]] for r in rows}
    rejected = {name[r["source_id"]]: r for r in run["rejects"]}
    assert set(name.values()) == set(ALL)
    for n, want in ALL.items():
        if want == "keep":
            assert n in sharded and n not in rejected, (n, rejected.get(n))
        else:
            r = rejected[n]
            assert n not in sharded and r["reason"] == want, (n, r)
            assert r["stage"] == STAGE.get(want, "probe"), r
    # the image near-copies name what they duplicate: the photo, and the video's clip
    by = {n: rejected[n] for n in ("copy_of_photo.jpg", "frame_of_pan_a.jpg")}
    pan_a = next(r["key"] for r in rows if name[r["source_id"]] == "pan_a.mp4")
    photo = next(r["key"] for r in rows if name[r["source_id"]] == "photo.jpg")
    assert pan_a in by["frame_of_pan_a.jpg"]["detail"] and photo in by["copy_of_photo.jpg"]["detail"]
    assert by["frame_of_pan_a.jpg"]["start"] == 0 and by["frame_of_pan_a.jpg"]["end"] == 1
    s = run["stats"]
    assert s["inputs"] == len(name) == s["kept_sources"] + s["rejected_sources"]
    kept = sum(v == "keep" for v in ALL.values())
    assert s["clips_sharded"] == len(rows) == kept == len(run["samples"])
    assert s["clips_per_kind"] == {"video": 2, "image": kept - 2}
    assert s["kept_seconds"] == pytest.approx(2 * 48 / FPS)  # images add no seconds
    assert [f["step"] for f in s["funnel"]] == ["inputs", "probed", "shots", "cpu filters",
                                                 "dedup", "captioned", "sharded"]


# shown (width, height) of the kept images: EXIF orientation applied, not resized
SIZES = {"photo.jpg": (200, 150), "rotated.jpg": (80, 120), "alpha.png": (140, 100),
         "photo.webp": (120, 90), "photo_m.jpg": (100, 100), "images.tar#s1.jpg": (160, 90),
         "images.tar#s2.png": (100, 100)}


def test_images_are_written_as_images_and_videos_as_before(run):
    name = run["name"]
    rows = {r["key"]: r for r in run["rows"]}
    for key, s in run["samples"].items():
        meta = json.loads(s["json"])
        n = name[meta["source_id"]]
        assert s["txt"].decode() == meta["caption"] == rows[key]["caption"]
        assert meta["clip_id"] == key and meta["path"].endswith(n)
        assert {"brightness", "sharpness", "short_side", "aspect"} <= set(meta["scores"])
        if n.endswith(".mp4"):  # unchanged: an mp4 of the clip's frames, no "kind"
            assert set(s) == {"__split__", "mp4", "json", "txt"} and "kind" not in meta
            assert read_frames(s["mp4"]).shape == (48, 96, 128, 3)
            assert (meta["start"], meta["end"], meta["fps"], meta["num_frames"]) == (0, 48, FPS, 48)
            assert "motion" in meta["scores"]
            assert rows[key]["kind"] == "video" and rows[key]["member"] == "mp4"
            continue
        assert set(s) == {"__split__", "jpg", "json", "txt"}, n  # not a 1-frame mp4
        im = Image.open(io.BytesIO(s["jpg"]))
        assert im.format == "JPEG" and im.mode == "RGB" and im.size == SIZES[n]
        assert not im.getexif()  # re-encoded: no EXIF (orientation, GPS) survives
        assert {k: meta[k] for k in ("kind", "start", "end", "fps", "num_frames", "has_audio",
                                     "image_format")} == {
            "kind": "image", "start": 0, "end": 1, "fps": IMAGE_FPS, "num_frames": 1,
            "has_audio": False, "image_format": "jpg"}
        assert (meta["width"], meta["height"]) == SIZES[n]
        assert not {"motion", "jitter", "noise", "seconds"} & set(meta["scores"])
        assert meta["source"]["license"] == ("cc-by-4.0" if n == "photo_m.jpg" else None)
        if n == "images.tar#s2.png":  # a shard sample's .json rides along
            assert meta["source"]["source_url"] == "https://example.org/s2.png"
            assert meta["source"]["shard"] == {"key": "s2", "similarity": 0.31}
            assert meta["caption_source"] == "source:shard"
        assert rows[key]["kind"] == "image" and rows[key]["member"] == "jpg"
        assert rows[key]["num_frames"] == 1 and rows[key]["bytes"] == len(s["jpg"])
        px = np.asarray(im)  # (H, W, 3)
        if n == "alpha.png":  # the transparent strip flattened onto white
            assert px[:, :16].min() > 240 and px[:, 30:].mean() < 230
        if n == "rotated.jpg":  # shown upright: the stored top row is now the right column
            stored = picture(4, 80, 120)
            assert np.abs(px[:, -1].astype(int) - stored[0, :, :].astype(int)).mean() < 12
    caps = {name[json.loads(s["json"])["source_id"]]: s["txt"].decode()
            for s in run["samples"].values()}
    assert caps["photo.jpg"] == "discs on a coloured field" and caps["alpha.png"] == ""
    assert caps["photo_m.jpg"] == "row photo_m.jpg"
    assert caps["pan_a.mp4"] == "a pan over a field of colours"
    assert caps["images.tar#s1.jpg"] == "a shard sample"
    assert caps["images.tar#s2.png"] == "from the json"


def test_manifest_counts_match_the_tars(run):
    d = run["dirs"]["shard"]
    for split in ("train", "val"):
        desc = json.loads((d / f"{split}.wids.json").read_text())
        for e in desc["shardlist"]:
            side = json.loads((d / f"{e['url']}.rows.json").read_text())
            keys = {k for k, s in run["samples"].items() if s["__split__"] == split}
            assert e["nsamples"] == len(side["rows"]) and {r["key"] for r in side["rows"]} <= keys
    assert sum(r["split"] == "val" for r in run["rows"]) == run["stats"]["clips_per_split"]["val"]


def test_model_scores_and_captions_read_an_image_clip_as_its_image(run):
    """Where a stage reads a clip's frames (the filter's model scores, the VLM captioner), an
    image clip gives its image, repeated, decoded in the media child: no video decoding."""
    clips = read_clips(run["dirs"]["caption"])
    (clip,) = [c for c in clips if run["name"][c["source_id"]] == "photo.jpg"]
    assert clip["kind"] == "image" and clip_seconds(clip) == 0.0
    frames = clip_keyframes(clip, 4, 160)  # (4, h, w, 3)
    assert frames.shape == (4, 120, 160, 3) and (frames == frames[:1]).all()
    want = cv2.resize(np.asarray(Image.open(clip["abs_path"]).convert("RGB")), (160, 120),
                      interpolation=cv2.INTER_AREA)
    assert np.abs(frames[0].astype(int) - want.astype(int)).mean() < 1
    row = decode_clip({"i": 0, "clip": json.dumps(clip)}, num_frames=8, frame_size=112)
    assert not row["error"] and row["shape"] == [8, 112, 150, 3]
    (video,) = [c for c in clips if run["name"][c["source_id"]] == "pan_b.mp4"]
    assert video["kind"] == "video" and clip_keyframes(video, 4, 128).shape == (4, 96, 128, 3)


def test_the_training_loader_reads_the_curated_shards_images_as_one_frame_clips(run):
    """The shards the curation wrote, as training reads them: every image a (3, 1, H, W) clip
    of the 1-frame bucket equal to its shard image resized and cropped, every video a clip of
    the video bucket; nothing skipped."""
    from data.images import read_image
    from training.loader import Bucket, ClipStream, Loader, LoaderConfig

    d = run["dirs"]["shard"]
    index = json.loads((d / "index.json").read_text())
    urls = [str(d / p) for split in ("train", "val") for p in index[split]]
    buckets = [Bucket(8, 48, 64, 2), Bucket(1, 48, 64, 2)]
    loader = Loader(ClipStream(urls, buckets=buckets, rank=0, world=1, seed=0,
                               cfg=LoaderConfig(buckets=buckets, shuffle_buffer=2, prefetch=0)))
    got: dict[str, torch.Tensor] = {}
    while len(got) < len(run["samples"]):
        video, _, keys = next(loader)
        assert loader.last["epoch"] == 0, sorted(set(run["samples"]) - set(got))
        got.update(zip(keys, video))
    assert loader.skipped_total == 0
    loader.close()
    for key, s in run["samples"].items():
        if "mp4" in s:
            assert got[key].shape == (3, 8, 48, 64)
        else:
            want = read_image(s["jpg"], size=(48, 64))  # (48, 64, 3)
            assert got[key].shape == (3, 1, 48, 64) and torch.equal(got[key][:, 0], torch.from_numpy(want).permute(2, 0, 1))


def test_shards_interleave_images_and_videos_in_proportion():
    """Clips are planned in clip-id order per kind, the kinds interleaved, so with 3 clips a shard
    each of the 3 shards holds an image (sorted by id alone, the img- ids would fill the first
    shard and a loader reader given only the others would see no image); videos alone keep
    clip-id order."""
    from pipeline.curation.shard import ShardConfig, plan_shards

    def clip(cid: str, kind: str) -> dict:
        return {"clip_id": cid, "kind": kind, "start": 0, "end": 1 if kind == "image" else 8,
                "width": 32, "height": 32}

    clips = [clip(f"vid-{i}", "video") for i in range(6)] + [clip(f"img-{i}", "image") for i in range(3)]
    cfg = ShardConfig(max_clips_per_shard=3, val_fraction=0.0, min_val_clips=0)
    plan = plan_shards(clips, cfg)
    assert [len(g) for _, g in plan] == [3, 3, 3]
    assert all(sum(c["kind"] == "image" for c in g) == 1 for _, g in plan)
    assert [c["clip_id"] for _, g in plan for c in g if c["kind"] == "video"] == [f"vid-{i}" for i in range(6)]
    alone = plan_shards(clips[:6], cfg)
    assert [c["clip_id"] for _, g in alone for c in g] == [f"vid-{i}" for i in range(6)]
