"""Media hardening, on real files made with PyAV, real decoders and the real media child:

- non-square pixels (a 704x576 frame with a 16:11 sample aspect ratio, shown at 16:9) are
  probed, curated and sharded at their displayed size, 1024x576, with square pixels;
- a whole-source clip is remuxed, not copied: no audio track (unless `shard.keep_audio`),
  none of the source's metadata (title, GPS location), the same video bitstream; a source
  whose pixel format the loader does not expect (yuv444p) is re-encoded to yuv420p;
- MKV/WebM timestamps in 1 ms ticks give the stream's declared rate (24 fps, not 23.81), so
  re-encoding keeps every frame.
"""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import webdataset as wds

from data import video_io
from data.probe import ProbeConfig, Reject, _timing, probe_file
from data.synthetic import render, sample_spec
from data.video_io import read_frames, read_frames_av
from pipeline.curation.curate import CurateConfig, CurateConfigs, curate_video
from pipeline.curation.ingest import IngestConfig
from pipeline.curation.scores import ScoreConfig
from pipeline.curation.shard import ShardConfig, encode_clip, whole_source, write_one_shard
from pipeline.curation.shots import ShotConfig
from training.clips import decode_frames

GPS = "+48.8584+002.2945/"


def write_video(path: Path, frames: np.ndarray, fps: int, *, fmt: str = "mp4",
                codec: str = "libx264", pix_fmt: str = "yuv420p", sar: Fraction | None = None,
                audio: bool = False, metadata: dict | None = None) -> Path:
    """Frames (T, H, W, 3) uint8 RGB -> a video file; optionally non-square pixels (set on the
    codec context), a mono AAC track and container metadata."""
    with av.open(str(path), mode="w", format=fmt) as c:
        c.metadata.update(metadata or {})
        v = c.add_stream(codec, rate=fps)
        v.height, v.width, v.pix_fmt = frames.shape[1], frames.shape[2], pix_fmt
        if sar is not None:
            v.codec_context.sample_aspect_ratio = sar
        a = None
        if audio:
            a = c.add_stream("aac", rate=16000)
            a.layout = "mono"
        for i, f in enumerate(frames):  # (H, W, 3)
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            vf.pts, vf.time_base = i, Fraction(1, fps)
            for p in v.encode(vf):
                c.mux(p)
        if a is not None:
            t = np.arange(16000 * len(frames) // fps) / 16000
            wave = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]  # (1, S)
            for k in range(0, wave.shape[1], 1024):
                af = av.AudioFrame.from_ndarray(np.ascontiguousarray(wave[:, k:k + 1024]),
                                                format="fltp", layout="mono")
                af.sample_rate, af.pts = 16000, k
                for p in a.encode(af):
                    c.mux(p)
            for p in a.encode():
                c.mux(p)
        for p in v.encode():
            c.mux(p)
    return path


def moving(seed: int, t: int, h: int, w: int) -> np.ndarray:
    """Shapes moving over a background: passes the curation filters."""
    return np.ascontiguousarray(render(sample_spec(np.random.default_rng(seed)), t, h, w))


def configs(tmp_path: Path) -> CurateConfigs:
    return CurateConfigs(ingest=IngestConfig(), probe=ProbeConfig(timeout_s=10),
                         shots=ShotConfig(), scores=ScoreConfig(), curate=CurateConfig(),
                         cache_dir=str(tmp_path / "cache"))


def curated(path: Path, c: CurateConfigs) -> list[dict]:
    item = {"id": path.stem, "url": str(path), "caption": "a clip", "license": None,
            "source_url": None, "meta": {}}
    recs = curate_video(item, c, c.ingest.blocklist.build())
    clips = [r for r in recs if r["kind"] == "clip"]
    assert clips, [r for r in recs if r["kind"] == "reject"]
    return clips


def clip_from_probe(path: Path) -> dict:
    """The clip curate makes of a whole source, from the probe alone (no scoring)."""
    i = probe_file(str(path), ProbeConfig(min_seconds=0.5))
    return {"clip_id": path.stem, "source_id": path.stem, "path": str(path),
            "abs_path": str(path), "start": 0, "end": i["num_frames"], "fps": i["fps"],
            "width": i["display_width"], "height": i["display_height"],
            "rotation": i["rotation"], "sar": i.get("sar"), "pix_fmt": i.get("pix_fmt"),
            "source_fps": i["fps"], "source_vfr": i["vfr"], "source_frames": i["num_frames"],
            "source_bytes": i["size_bytes"], "codec": i["codec"],
            "container": i["container"], "caption": "x", "scores": {}}


def streams(mp4: bytes) -> tuple[list[str], dict, str]:
    """(stream kinds, container metadata, video pixel format) of an mp4."""
    with av.open(io.BytesIO(mp4)) as c:
        return [s.type for s in c.streams], dict(c.metadata), c.streams.video[0].format.name


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("media")
    frames = moving(3, 16, 576, 704)  # (16, 576, 704, 3)
    small = moving(4, 16, 96, 128)  # (16, 96, 128, 3)
    ramp = np.repeat(np.arange(80, dtype=np.uint8)[:, None, None, None] * 3, 48, 1)
    ramp = np.ascontiguousarray(np.repeat(np.repeat(ramp, 64, 2), 3, 3))  # (80, 48, 64, 3)
    return {
        "sar": write_video(d / "pal_wide.mp4", frames, 8, sar=Fraction(16, 11)),
        "tagged": write_video(d / "tagged.mp4", small, 8, audio=True,
                              metadata={"title": "secret title", "location": GPS}),
        "yuv444": write_video(d / "full_chroma.mp4", small, 8, pix_fmt="yuv444p"),
        "mkv": write_video(d / "film.mkv", ramp, 24, fmt="matroska"),
        "webm": write_video(d / "film.webm", ramp, 24, fmt="webm", codec="libvpx-vp9"),
    }


# ----- 6: non-square pixels ---------------------------------------------------------------------
def test_probe_reports_the_displayed_size_of_non_square_pixels(media):
    info = probe_file(str(media["sar"]), ProbeConfig())
    assert (info["display_width"], info["display_height"]) == (1024, 576)  # 16:9
    assert (info["width"], info["height"], info["sar"]) == (704, 576, "16:11")
    square = probe_file(str(media["tagged"]), ProbeConfig())
    assert square["sar"] == "1:1" and square["display_width"] == square["width"] == 128
    # The size caps see the displayed frame too: 1024 px wide passes 1000 px stored, not shown.
    with pytest.raises(Reject, match="high_resolution.*displayed 1024x576"):
        probe_file(str(media["sar"]), ProbeConfig(max_side=1000))


def test_non_square_pixels_are_curated_and_sharded_at_the_displayed_size(media, tmp_path):
    (clip,) = curated(media["sar"], configs(tmp_path))
    assert (clip["width"], clip["height"], clip.get("sar")) == (1024, 576, "16:11")
    assert not whole_source(clip)  # a copy would keep the squeezed 704x576 frame
    side = write_one_shard(str(tmp_path / "s.tar"), [clip], ShardConfig(preset="ultrafast",
                                                                          crf=10))
    assert side["failed"] == []
    (s,) = list(wds.WebDataset([str(tmp_path / "s.tar")], shardshuffle=False).decode())
    meta = s["json"]
    assert (meta["width"], meta["height"], meta["source_sar"]) == (1024, 576, "16:11")
    with av.open(io.BytesIO(s["mp4"])) as c:
        sar = c.streams.video[0].sample_aspect_ratio
        assert sar is None or sar == 1  # square pixels: nothing left for a reader to apply
    src = read_frames_av(media["sar"])  # (16, 576, 704, 3) as stored
    want = np.stack([cv2.resize(f, (1024, 576), interpolation=cv2.INTER_CUBIC)
                     for f in src]).astype(np.float32)  # (16, 576, 1024, 3)
    for frames in (read_frames(s["mp4"]), read_frames_av(s["mp4"])):
        assert frames.shape == (16, 576, 1024, 3) == (meta["num_frames"], 576, 1024, 3)
        assert np.abs(frames - want).mean() < 3  # stretched, not cropped or padded
    # The training loader reads it undistorted: 16:9 at 64x36.
    got, _ = decode_frames(s, 16, (36, 64), None, None)  # (16, 36, 64, 3)
    small = np.stack([cv2.resize(f, (64, 36), interpolation=cv2.INTER_AREA) for f in want])
    assert got.shape == (16, 36, 64, 3) and np.abs(got - small).mean() < 4


# ----- 7: whole-source clips are remuxed ----------------------------------------------------------
def test_whole_source_clip_is_remuxed_without_audio_or_metadata(media, tmp_path):
    src = media["tagged"]
    kinds, tags, _ = streams(src.read_bytes())
    assert kinds == ["video", "audio"] and tags["title"] and tags["location"] == GPS
    clips = curated(src, configs(tmp_path))
    assert len(clips) == 1

    mp4, got = encode_clip(clips[0], ShardConfig())
    kinds, tags, pix = streams(mp4)
    assert kinds == ["video"] and pix == "yuv420p"
    assert not {"title", "location", "location-eng"} & tags.keys(), tags
    assert got["has_audio"] is False
    assert whole_source(clips[0]) and clips[0]["pix_fmt"] == "yuv420p"  # remuxed, not encoded
    assert got["num_frames"] == 16 and len(mp4) < src.stat().st_size
    # Stream copy: the same bitstream, so the same pixels, with both decoders.
    np.testing.assert_array_equal(read_frames(mp4), read_frames(src))
    np.testing.assert_array_equal(read_frames_av(mp4), read_frames_av(src))
    assert video_io.remux_mp4(src)[0] == mp4  # deterministic: shard bytes stay content-hashable

    mp4, got = encode_clip(clips[0], ShardConfig(keep_audio=True))
    kinds, tags, _ = streams(mp4)
    assert kinds == ["video", "audio"] and got["has_audio"] is True
    assert not {"title", "location", "location-eng"} & tags.keys(), tags
    np.testing.assert_array_equal(read_frames(mp4), read_frames(src))
    meta = {"start": 0, "end": 16, "num_frames": 16, "fps": 8.0, "width": 128, "height": 96}
    frames, _ = decode_frames({"mp4": mp4, "json": meta}, 16, (96, 128), None, None)
    np.testing.assert_array_equal(frames, read_frames(src))  # the loader ignores the audio


def test_re_encoded_span_keeps_audio_over_the_span_only_when_asked(media):
    clip = {**clip_from_probe(media["tagged"]), "start": 4}  # frames 4..15: 1.5 s
    mp4, got = encode_clip(clip, ShardConfig(preset="ultrafast"))
    assert streams(mp4)[0] == ["video"] and got["has_audio"] is False
    mp4, got = encode_clip(clip, ShardConfig(preset="ultrafast", keep_audio=True))
    assert streams(mp4)[0] == ["video", "audio"] and got["has_audio"] is True
    with av.open(io.BytesIO(mp4)) as c:
        a = c.streams.audio[0]
        seconds = sum(p.duration for p in c.demux(a) if p.size) * float(a.time_base)
    assert seconds == pytest.approx(12 / 8, abs=0.07)  # ~20 ms AAC frames at both cuts


def test_pixel_format_the_loader_does_not_expect_is_re_encoded(media):
    clip = clip_from_probe(media["yuv444"])
    mp4, got = encode_clip(clip, ShardConfig(preset="ultrafast", crf=10))
    kinds, tags, pix = streams(mp4)
    assert kinds == ["video"] and pix == "yuv420p" and got["num_frames"] == 16
    assert clip["pix_fmt"] == "yuv444p" and not whole_source(clip)
    src = read_frames_av(media["yuv444"]).astype(np.float32)  # (16, 96, 128, 3)
    for frames in (read_frames(mp4), read_frames_av(mp4)):
        assert frames.shape == src.shape and np.abs(frames - src).mean() < 4


# ----- 10: frame rate in 1 ms ticks ---------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mkv", "webm"])
def test_millisecond_timestamps_give_the_declared_rate_and_keep_every_frame(media, kind):
    clip = clip_from_probe(media[kind])
    assert clip["fps"] == 24.0 and not clip["source_vfr"]  # 1 / median gap (42 ms) = 23.81
    mp4, got = encode_clip(clip, ShardConfig(preset="ultrafast", crf=0))
    assert got["num_frames"] == 80 and got["fps"] == 24.0
    with av.open(io.BytesIO(mp4)) as c:
        assert c.streams.video[0].average_rate == 24
    levels = read_frames(mp4).reshape(80, -1).mean(1) / 3  # frame i is grey level 3 i
    np.testing.assert_allclose(levels, np.arange(80), atol=0.5)  # none dropped or repeated


def test_timing_uses_a_declared_rate_only_when_the_timestamps_agree():
    ms = [round(i * 1000 / 24) for i in range(80)]  # 24 fps in 1 ms ticks: gaps 41 and 42
    assert _timing(ms, 1e-3)["fps"] == pytest.approx(24.0, abs=0.01)  # frames over time
    assert _timing(ms, 1e-3, (Fraction(24), None))["fps"] == 24.0
    # A rate the timestamps do not agree with is not taken.
    assert _timing(ms, 1e-3, (Fraction(25),))["fps"] == pytest.approx(24.0, abs=0.01)
    # A frame missing is not within a tick: measured (vfr), not declared.
    gappy = ms[:40] + ms[41:]
    t = _timing(gappy, 1e-3, (Fraction(24),))
    assert t["vfr"] and t["fps"] == pytest.approx(78 / (ms[-1] / 1000))
    # NTSC in 1 ms ticks: 24000/1001 and 30000/1001 are told apart from 24 and 30.
    ntsc = [round(i * 1001 / 24) for i in range(100)]
    assert _timing(ntsc, 1e-3, (Fraction(24), Fraction(24000, 1001)))["fps"] == 24000 / 1001
