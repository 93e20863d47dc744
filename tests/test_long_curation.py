"""Long videos through curation: a real 10-minute mp4 (14,400 frames, the length at which the
whole-video content detector ran out of memory) is split and scored in memory bounded by a
shot, not the video (measured with tracemalloc against a 1-minute one); the ``shots=long``
preset keeps a 60-second shot whole and windows only longer ones, and every clip names its
shot and window index, in the curated clips, the shard's sidecar and the shard manifest."""

import json
import tarfile
import tracemalloc
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import yaml

from data.probe import ProbeConfig, probe_file
from pipeline.curation.curate import CurateConfig, CurateConfigs, analyse_video, decode_bytes
from pipeline.curation.scores import ScoreConfig
from pipeline.curation.shard import ShardConfig, run_sharding
from pipeline.curation.shots import SHOT_KEYS, ShotConfig, ShotSplitter, buffer_frames

FPS = 24
H, W = 32, 40
CONF = Path(__file__).resolve().parents[1] / "conf" / "shots"
# Shots of 60 s, then one of 150 s and one of 90 s: 10 minutes, 14,400 frames.
SHOTS = [60] * 6 + [150, 90]


def write_shots(path: Path, seconds: list[float], fps: int = FPS) -> list[int]:
    """An H.264 mp4 of one shot per entry of `seconds` (each its own background, a square
    bouncing at 1 px per frame), encoded frame by frame -> the cut positions."""
    rng = np.random.default_rng(0)
    cuts, n = [], 0
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=Fraction(fps))
        s.height, s.width, s.pix_fmt = H, W, "yuv420p"
        s.options = {"preset": "ultrafast", "crf": "23"}
        for sec in seconds:
            if n:
                cuts.append(n)
            bg, fg = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
            for t in range(round(sec * fps)):
                frame = np.empty((H, W, 3), np.uint8)
                frame[:] = bg
                x, y = abs((t + 7 * len(cuts)) % 48 - 24), abs(t % 32 - 16)  # bouncing
                frame[y : y + 8, x : x + 8] = fg
                for p in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    c.mux(p)
                n += 1
        for p in s.encode():
            c.mux(p)
    return cuts


def shots_preset(name: str) -> ShotConfig:
    return ShotConfig(**yaml.safe_load((CONF / f"{name}.yaml").read_text()))


def configs(shots: ShotConfig) -> CurateConfigs:
    return CurateConfigs(ingest=None, probe=None, shots=shots, scores=ScoreConfig(),
                         curate=CurateConfig(), cache_dir="")


def analyse(path: Path, shots: ShotConfig) -> list[dict]:
    info = probe_file(str(path), ProbeConfig())
    item = {"id": path.stem, "url": str(path), "caption": "a square", "meta": {}}
    return analyse_video(item, str(path), info, configs(shots))["records"]


def peak_bytes(fn) -> tuple[int, object]:
    tracemalloc.start()
    try:
        out = fn()
        return tracemalloc.get_traced_memory()[1], out
    finally:
        tracemalloc.stop()


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("long")
    out = {"ten": d / "ten.mp4", "one": d / "one.mp4"}
    out["cuts"] = write_shots(out["ten"], SHOTS)
    write_shots(out["one"], [60])
    return out


@pytest.fixture(scope="module")
def long_records(videos) -> list[dict]:
    return analyse(videos["ten"], shots_preset("long"))


def test_ten_minutes_split_in_bounded_memory(videos):
    assert probe_file(str(videos["ten"]), ProbeConfig())["num_frames"] == 14_400
    cfg = shots_preset("default")
    one, _ = peak_bytes(lambda: analyse(videos["one"], cfg))
    ten, recs = peak_bytes(lambda: analyse(videos["ten"], cfg))
    (video,) = [r for r in recs if r["kind"] == "video"]
    assert video["cuts"] == videos["cuts"] and video["seconds"] == 600
    clips = [r for r in recs if r["kind"] == "clip"]
    rejects = [r for r in recs if r["kind"] == "reject"]
    assert not rejects, rejects[:3]
    assert len(clips) == 60  # shots over 20 s become 10 s windows: 600 s / 10
    # The whole 10-minute decode is 55 MB at this size: holding it (as before) made the peak
    # 10x the 1-minute one's (37 and 369 MB); streaming holds one shot's worth either way (5
    # and 7 MB: the rest is the keyframes of 32 clips at a time, which 1 minute never fills).
    assert ten < 2 * one, (ten / 2**20, one / 2**20)
    assert ten < 14_400 * H * W * 3 / 4, ten / 2**20


def test_splitter_holds_at_most_its_buffer():
    cfg = shots_preset("default")
    splitter = ShotSplitter(FPS, cfg)
    frames = np.zeros((64, H, W, 3), np.uint8)  # one endless still shot
    given = []
    for _ in range(14_400 // 64):
        given += splitter.push(frames)
    given += splitter.finish()
    assert splitter.peak <= buffer_frames(FPS, cfg) and splitter.peak < 1200
    assert [(a, b) for a, b, _ in given] == splitter.result.clips
    assert len(given) == 60 and all(f.shape == (b - a, H, W, 3) for a, b, f in given)


def test_long_preset_keeps_a_60_second_shot_whole(long_records):
    clips = [r for r in long_records if r["kind"] == "clip"]
    whole = [c for c in clips if c["window_count"] == 1]
    assert len(whole) == 6
    for k, c in enumerate(whole):
        assert (c["start"], c["end"]) == (1440 * k, 1440 * (k + 1))
        assert (c["end"] - c["start"]) / c["fps"] == 60.0 and c["scores"]["windowed"] is False
        assert (c["shot_start"], c["shot_end"], c["window_index"]) == (c["start"], c["end"], 0)
    # The default preset cuts the same shot into three 20 s windows.
    assert shots_preset("default").limits(FPS)[1] < 1440 <= shots_preset("long").limits(FPS)[1]


def test_long_preset_windows_longer_shots_and_names_them(long_records):
    clips = [r for r in long_records if r["kind"] == "clip"]
    windows = [c for c in clips if c["window_count"] > 1]
    got = [(c["start"], c["end"], c["shot_id"], c["window_index"], c["window_count"])
           for c in windows]
    a, b = 8640, 8640 + 3600  # the 150 s shot, then the 90 s one
    assert got == [(a, a + 1440, f"ten-{a:06d}-{b:06d}", 0, 3),
                   (a + 1440, a + 2880, f"ten-{a:06d}-{b:06d}", 1, 3),
                   (a + 2880, b, f"ten-{a:06d}-{b:06d}", 2, 3),
                   (b, b + 1440, f"ten-{b:06d}-014400", 0, 2),
                   (b + 1440, 14_400, f"ten-{b:06d}-014400", 1, 2)]
    assert all(c["scores"]["windowed"] for c in windows)


def test_shot_fields_reach_the_shard_sidecars_and_manifest(long_records, tmp_path, ray_local):
    clips = [r for r in long_records if r["kind"] == "clip"]
    picked = [c for c in clips if c["window_count"] > 1][:2] + [clips[0]]
    cfg = ShardConfig(val_fraction=0.0, min_val_clips=0)
    res = run_sharding(picked, cfg, tmp_path, concurrency=1, log=lambda *a: None)
    rows = {r["key"]: r for r in res["rows"]}
    assert len(rows) == 3 and not res["failed"]
    metas = {}
    for tar in (tmp_path / "shards").glob("*.tar"):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                if m.name.endswith(".json"):
                    meta = json.load(t.extractfile(m))
                    metas[meta["clip_id"]] = meta
    for c in picked:
        for k in SHOT_KEYS:
            assert rows[c["clip_id"]][k] == metas[c["clip_id"]][k] == c[k], k
    whole = metas[clips[0]["clip_id"]]
    assert whole["num_frames"] == 1440 and whole["window_count"] == 1


def test_the_decoders_memory_check_counts_the_splitters_frames_not_the_video():
    info = {"width": 1920, "height": 1080, "fps": 60.0, "num_frames": 36_000}  # 10 min at 60 fps
    held = decode_bytes(info, 160, ShotConfig())
    assert held == buffer_frames(60.0, ShotConfig()) * 90 * 160 * 3 < 100 * 2**20
    assert decode_bytes({**info, "num_frames": 3 * 36_000}, 160, ShotConfig()) == held
    assert decode_bytes({**info, "num_frames": 600}, 160, ShotConfig()) == 600 * 90 * 160 * 3


def test_shots_long_is_a_config_choice_and_the_default_is_unchanged():
    from pipeline.submit import compose_run_config

    obj, plain = compose_run_config(["shots=long"])
    assert isinstance(obj.shots, ShotConfig)
    assert (obj.shots.max_seconds, obj.shots.window_seconds, obj.shots.detector) == (60.0, 60.0, "adaptive")
    _, default = compose_run_config([])
    assert default["shots"] == {**plain["shots"], "max_seconds": 20.0, "window_seconds": 10.0}
