"""Tests for data/: mp4 I/O, the synthetic source, shards and parquet."""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import replace

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from data.shards import read_parquet, read_shards, write_parquet, write_shard
from data.synthetic import (
    BACKGROUNDS,
    BAD_KINDS,
    COLORS,
    EXPECTED,
    ClipSpec,
    SourceConfig,
    caption,
    generate,
    render,
    sample_spec,
)
from data.video_io import VideoError, encode_mp4, probe, read_frames, read_frames_av, write_mp4

CUT_THRESHOLD = 30.0  # mean abs frame difference (0..255); motion stays < 13, cuts > 55


def flat_clip(num_frames: int, height: int, width: int) -> np.ndarray:
    """Flat background with a flat square sliding right by 2 px/frame -> (T, H, W, 3) uint8."""
    frames = np.empty((num_frames, height, width, 3), np.uint8)  # (T, H, W, 3)
    frames[:] = (200, 30, 60)
    for t in range(num_frames):
        frames[t, 8:24, 4 + 2 * t : 20 + 2 * t] = (0, 255, 0)
    return frames


def no_tmp_files(root) -> bool:
    return not [f for _, _, files in os.walk(root) for f in files if f.endswith(".tmp")]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    rows = generate(SourceConfig(), out)
    return out, rows


# --- video_io ---------------------------------------------------------------


@pytest.mark.parametrize("height,width", [(64, 64), (48, 80), (64, 48)])  # 48 wide hits decord's stride bug
def test_mp4_round_trip_decord_and_pyav(tmp_path, height, width):
    frames = flat_clip(12, height, width)  # (T, H, W, 3)
    path = tmp_path / "clip.mp4"
    write_mp4(path, frames, fps=8.0, crf=20)
    assert no_tmp_files(tmp_path)
    assert path.read_bytes() == encode_mp4(frames, 8.0, crf=20)  # deterministic encoder
    for decoded in (read_frames(str(path)), read_frames(path.read_bytes()), read_frames_av(str(path))):
        assert decoded.shape == frames.shape and decoded.dtype == np.uint8
        assert np.abs(decoded.astype(np.int16) - frames).mean() < 8
    picked = read_frames(str(path), indices=[9, 0, 4], size=(32, 40))  # (3, 32, 40, 3)
    assert picked.shape == (3, 32, 40, 3)
    np.testing.assert_array_equal(read_frames(str(path), [9, 0, 4]), read_frames_av(str(path), [9, 0, 4]))
    with pytest.raises(IndexError):
        read_frames(str(path), [12])


def test_read_frames_decodes_decords_misstrided_widths_with_pyav():
    """decord 0.6 garbles output widths 16, 24, 48 and 72 (its get_batch fails): those come
    from PyAV, every other width straight from decord, with no extra probing decode."""
    import decord

    mp4 = encode_mp4(flat_clip(12, 48, 80), fps=8.0)
    for w in (16, 24, 48, 72):
        got = read_frames(mp4, [5, 1, 9], size=(32, w))  # (3, 32, w, 3)
        assert got.shape == (3, 32, w, 3)
        np.testing.assert_array_equal(got, read_frames_av(mp4, [5, 1, 9], size=(32, w)))
    for w in (40, 64):  # decord's own scaler (not bit-equal to PyAV's when resizing)
        vr = decord.VideoReader(io.BytesIO(mp4), ctx=decord.cpu(0), width=w, height=32)
        np.testing.assert_array_equal(read_frames(mp4, [5, 1, 9], size=(32, w)),
                                      vr.get_batch([5, 1, 9]).asnumpy())


def test_write_mp4_rejects_odd_size(tmp_path):
    with pytest.raises(ValueError):
        write_mp4(tmp_path / "odd.mp4", np.zeros((4, 33, 64, 3), np.uint8), fps=8.0)
    assert not list(tmp_path.iterdir())


def test_probe_fields(tmp_path):
    path = tmp_path / "clip.mp4"
    write_mp4(path, flat_clip(20, 48, 80), fps=10.0)
    p = probe(str(path))
    assert (p.width, p.height, p.num_frames, p.codec, p.has_audio) == (80, 48, 20, "h264", False)
    assert p.fps == pytest.approx(10.0) and p.duration == pytest.approx(2.0)
    assert p.size_bytes == path.stat().st_size and "mp4" in p.container
    assert probe(path.read_bytes()) == p
    assert probe(encode_mp4(flat_clip(6, 32, 32), fps=29.97)).fps == pytest.approx(29.97)


def _faststart_mp4(path) -> None:
    """An mp4 with its index at the front, as many downloaded files are."""
    frames = flat_clip(16, 32, 48)  # (T, H, W, 3)
    with av.open(str(path), "w", format="mp4", options={"movflags": "+faststart"}) as c:
        s = c.add_stream("libx264", rate=8)
        s.width, s.height, s.pix_fmt = 48, 32, "yuv420p"
        for f in frames:
            for pkt in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)


def _audio_only_mp4() -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for pkt in [*s.encode(frame), *s.encode()]:
            c.mux(pkt)
    return buf.getvalue()


def test_probe_and_read_reject_bad_files(tmp_path):
    good = encode_mp4(flat_clip(16, 32, 48), fps=8.0)
    fast = tmp_path / "fast.mp4"
    _faststart_mp4(fast)
    assert probe(str(fast)).num_frames == 16
    cases = [
        ("empty_file", b""),
        ("unreadable", good[: len(good) // 2]),  # our files keep the index at the end
        ("unreadable", np.random.default_rng(0).bytes(4096)),
        ("truncated", fast.read_bytes()[: fast.stat().st_size // 2]),  # index survives, frames don't
        ("no_video_stream", _audio_only_mp4()),
    ]
    for i, (reason, data) in enumerate(cases):
        path = tmp_path / f"bad-{i}.mp4"
        path.write_bytes(data)
        with pytest.raises(VideoError) as err:
            probe(str(path))
        assert err.value.reason == reason
        with pytest.raises(VideoError) as err:
            read_frames(str(path))
        assert err.value.reason == "decode_failed"
        with pytest.raises(VideoError):
            read_frames_av(data)


# --- synthetic --------------------------------------------------------------


def test_caption_wording():
    spec = ClipSpec("circle", "red", 2, "left", 2, "black", ((0.2, 0.2), (0.7, 0.7)))
    assert caption(spec) == "two red circles moving left on a black background"
    one = replace(spec, count=1, starts=((0.5, 0.5),))
    assert caption(one) == "one red circle moving left on a black background"
    assert caption(replace(spec, speed=0)) == "two red circles on a black background"


def test_objects_do_not_overlap_at_start():
    """Union of the objects' pixels == sum of each object's pixels <=> no overlap."""
    for seed in range(40):
        spec = sample_spec(np.random.default_rng(seed))
        union = (render(spec, 1, 64, 64) != render(replace(spec, starts=()), 1, 64, 64)).any(-1).sum()
        alone = sum(
            (render(replace(spec, starts=(p,)), 1, 64, 64) != render(replace(spec, starts=()), 1, 64, 64))
            .any(-1)
            .sum()
            for p in spec.starts
        )
        assert union == alone, spec


def test_generate_is_deterministic(tmp_path, synth):
    out, rows = synth
    rows2 = generate(SourceConfig(), tmp_path)
    assert (tmp_path / "manifest.jsonl").read_bytes() == (out / "manifest.jsonl").read_bytes()
    assert rows2 == rows
    for row in rows:
        assert (tmp_path / row["path"]).read_bytes() == (out / row["path"]).read_bytes(), row["id"]
    assert no_tmp_files(tmp_path)


def test_manifest_matches_files(synth):
    out, rows = synth
    lines = (out / "manifest.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == rows and len(rows) == 48
    for row in rows:
        assert json.loads((out / row["path"]).with_suffix(".json").read_text()) == row
        assert row["shots"][0]["start"] == 0 and row["shots"][-1]["end"] == row["num_frames"]
        assert row["cuts"] == [s["start"] for s in row["shots"][1:]]


def test_every_bad_kind_labelled_and_behaves(synth):
    out, rows = synth
    expected = dict(EXPECTED)
    assert {r["bad_kind"] for r in rows} - {None} == set(BAD_KINDS)
    for row in rows:
        path = str(out / row["path"])
        assert row["expected"] == expected.get(row["bad_kind"], "keep")
        if row["expected"] in ("unreadable", "empty_file"):
            with pytest.raises(VideoError):
                probe(path)
            continue
        p = probe(path)
        assert (p.num_frames, p.width, p.height) == (row["num_frames"], row["width"], row["height"])
        frames = read_frames(path).astype(np.int16)  # (T, H, W, 3)
        motion = np.abs(np.diff(frames, axis=0)).mean()
        if row["bad_kind"] == "frozen":
            assert motion < 0.5
        else:
            assert motion > 0.5, row["id"]
        assert (p.duration < 1.0) == (row["bad_kind"] == "too_short")
        assert (min(p.width, p.height) <= 16) == (row["bad_kind"] == "tiny")


def test_each_bad_kind_once_when_fraction_allows(tmp_path):
    cfg = SourceConfig(num_videos=12, bad_fraction=0.5, multishot_fraction=0.25, seed=3)
    rows = generate(cfg, tmp_path)
    assert sorted(r["bad_kind"] for r in rows if r["bad_kind"]) == sorted(BAD_KINDS)
    assert sum(bool(r["cuts"]) for r in rows) == 3


def test_structured_config_drives_generate(tmp_path):
    cfg = OmegaConf.structured(SourceConfig(num_videos=4, bad_fraction=0.0))
    cfg.bad_kinds = ["frozen"]
    rows = generate(cfg, tmp_path)
    assert len(rows) == 4 and all(r["expected"] == "keep" for r in rows)


def test_cuts_exactly_at_recorded_frames(synth):
    out, rows = synth
    multishot = [r for r in rows if r["cuts"]]
    assert len(multishot) >= 5 and all(2 <= len(r["shots"]) <= 3 for r in multishot)
    for row in rows:
        if row["expected"] != "keep":
            continue
        frames = read_frames(str(out / row["path"])).astype(np.float32)  # (T, H, W, 3)
        diff = np.abs(frames[1:] - frames[:-1]).mean(axis=(1, 2, 3))  # (T-1,) diff[i] is frame i -> i+1
        spikes = [i + 1 for i in np.flatnonzero(diff > CUT_THRESHOLD)]
        assert spikes == row["cuts"], row["id"]


def test_objects_move_in_stated_direction(synth):
    """Centroid of the shape-colour mask, decoded from the mp4, shifts by
    3 * speed along the stated direction between frames 0 and 3.

    The mask is soft: each pixel's projection onto the background->shape colour
    axis. A hard colour-distance threshold snaps to the 2x2 chroma grid of
    yuv420p and misses 1 px/frame motion by up to 1.2 px; the projection also
    uses full-resolution luma.
    """
    out, rows = synth
    colors, backgrounds = dict(COLORS), dict(BACKGROUNDS)
    steps = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}  # (dy, dx), image y points down
    checked = set()
    for row in rows:
        if row["expected"] != "keep" or row["cuts"]:
            continue
        spec = ClipSpec.from_dict(row["attributes"])
        dy, dx = steps[spec.direction]
        axis, sign = (0, dy) if dy else (1, dx)
        size = (row["height"], row["width"])[axis]
        r = min(row["height"], row["width"]) / 10
        centres = [p[axis] * size + sign * spec.speed * t for p in spec.starts for t in (0, 3)]
        if any(c - r < 1 or c + r > size - 1 for c in centres):
            continue  # an object wraps around the edge within frames 0..3
        frames = read_frames(str(out / row["path"]), indices=[0, 3]).astype(np.float32)  # (2, H, W, 3)
        bg = np.array(backgrounds[spec.background], np.float32)  # (3,)
        axis_rgb = np.array(colors[spec.color], np.float32) - bg  # (3,)
        weight = np.clip((frames - bg) @ axis_rgb / (axis_rgb @ axis_rgb), 0, 1)  # (2, H, W)
        weight[weight < 0.25] = 0
        grid = np.stack(np.mgrid[: row["height"], : row["width"]]).astype(np.float32)  # (2, H, W) y, x
        c0, c3 = ((grid * w).sum(axis=(1, 2)) / w.sum() for w in weight)  # (y, x) centroids
        assert (c3 - c0)[axis] == pytest.approx(sign * 3 * spec.speed, abs=0.5), row["id"]
        assert abs((c3 - c0)[1 - axis]) < 0.5, row["id"]
        checked.add(spec.direction)
    assert checked == set(steps)  # every direction seen on at least one clip


# --- shards and parquet ------------------------------------------------------


def _samples(out, rows):
    keep = [r for r in rows if r["expected"] == "keep"][:3]
    return [
        {"__key__": r["id"], "mp4": (out / r["path"]).read_bytes(), "json": r, "txt": r["caption"]}
        for r in keep
    ]


def test_shard_round_trip(tmp_path, synth):
    samples = _samples(*synth)
    path = tmp_path / "shard-000000.tar"
    size = write_shard(str(path), samples)
    assert size == path.stat().st_size and no_tmp_files(tmp_path)

    got = list(read_shards([str(path)]))
    assert [g["__key__"] for g in got] == [s["__key__"] for s in samples]
    for g, s in zip(got, samples):
        assert g["mp4"] == s["mp4"] and g["json"] == s["json"] and g["txt"] == s["txt"]
        assert read_frames(g["mp4"]).shape == (s["json"]["num_frames"], 64, 64, 3)
    assert json.loads(next(read_shards(str(path), decode_json=False))["json"]) == samples[0]["json"]

    with tarfile.open(path) as tar:
        names = tar.getnames()
        assert names == [f"{s['__key__']}.{ext}" for s in samples for ext in ("json", "mp4", "txt")]
        first = samples[0]["__key__"]
        assert tar.extractfile(f"{first}.mp4").read() == samples[0]["mp4"]
        assert json.loads(tar.extractfile(f"{first}.json").read()) == samples[0]["json"]
        assert tar.extractfile(f"{first}.txt").read().decode() == samples[0]["txt"]

    again = tmp_path / "again.tar"
    write_shard(str(again), samples)
    assert again.read_bytes() == path.read_bytes()  # reproducible shard bytes


def test_shard_rejects_dotted_keys_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError):
        write_shard(str(tmp_path / "s.tar"), [{"__key__": "a.b", "txt": "x"}])
    assert not list(tmp_path.iterdir())
    write_shard(str(tmp_path / "empty.tar"), [])
    assert list(read_shards(str(tmp_path / "empty.tar"))) == []


def test_parquet_round_trip_and_empty_schema(tmp_path):
    rows = [
        {"id": "vid-000001", "reason": "too_short", "score": 0.5},
        {"id": "vid-000002", "reason": "", "score": None},
    ]
    write_parquet(rows, tmp_path / "rows.parquet")
    assert read_parquet(tmp_path / "rows.parquet") == rows
    schema = {"id": pa.string(), "reason": pa.string(), "score": pa.float64()}
    write_parquet([], tmp_path / "empty.parquet", schema=schema)
    assert read_parquet(tmp_path / "empty.parquet") == []
    assert pq.read_schema(tmp_path / "empty.parquet").names == ["id", "reason", "score"]
    aliases = {"id": "string", "reason": "string", "score": "double", "start": "int64"}
    write_parquet(rows, tmp_path / "typed.parquet", schema=aliases)
    assert read_parquet(tmp_path / "typed.parquet") == [{**r, "start": None} for r in rows]
    with pytest.raises(ValueError):
        write_parquet(rows, tmp_path / "narrow.parquet", schema={"id": "string"})
    assert no_tmp_files(tmp_path)


def test_shards_stream_from_fsspec_urls(tmp_path):
    """Remote shards (s3://, gs://, ...) are read through fsspec; memory:// stands in here."""
    import fsspec

    from data.shards import read_shards, write_shard

    local = tmp_path / "a.tar"
    write_shard(str(local), [{"__key__": "k1", "mp4": b"\x00" * 10, "json": {"a": 1},
                              "txt": "hello"}])
    with fsspec.open("memory://bucket/a.tar", "wb") as f:
        f.write(local.read_bytes())
    (s,) = list(read_shards(["memory://bucket/a.tar"]))
    assert s["__key__"] == "k1" and s["txt"] == "hello" and s["json"] == {"a": 1}


def test_a_garbled_header_mid_shard_is_detected_from_the_sidecar(tmp_path):
    """tarfile takes a garbled member header for the end of the archive and raises nothing: 7
    of 8 samples vanish. The sidecar's count makes it an error (or, with a handler, a count)."""
    from data.shards import ShardIncomplete, sidecar_count, write_sidecar
    from tar_damage import garble_header

    samples = [{"__key__": f"k{i}", "mp4": os.urandom(3000), "json": {"i": i}, "txt": "x"}
               for i in range(8)]
    path = tmp_path / "train-000000.tar"
    write_shard(path, samples)
    write_sidecar(path, {"shard": path.name, "rows": [{"key": s["__key__"]} for s in samples]})
    garble_header(path, "k1")
    assert [s["__key__"] for s in read_shards([path], verify=False)] == ["k0"]  # silently short
    assert sidecar_count(path) == 8 and sidecar_count(tmp_path / "none.tar") is None
    with pytest.raises(ShardIncomplete, match="read 1 of the 8 samples"):
        list(read_shards([path]))
    seen = []
    got = list(read_shards([path, path], handler=lambda e: seen.append(e) or True))
    assert [s["__key__"] for s in got] == ["k0", "k0"] and [e.missing for e in seen] == [7, 7]
    got = list(read_shards([path, path], handler=lambda e: False))  # False stops, as in webdataset
    assert [s["__key__"] for s in got] == ["k0"]
    # a brace pattern still reads as WebDataset would
    assert len(list(read_shards(str(tmp_path / "train-{000000..000000}.tar"), verify=False))) == 1
    # a sidecar that lists fewer samples than the tar holds belongs to another tar
    whole = tmp_path / "whole.tar"
    write_shard(whole, samples)
    write_sidecar(whole, {"shard": whole.name, "rows": [{"key": "k0"}]})
    with pytest.raises(ValueError, match="more samples than the 1"):
        list(read_shards([whole]))
