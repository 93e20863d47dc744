"""Shot splitting: cut accuracy on synthetic multi-shot videos, parity with PySceneDetect's own
detector classes, no false cuts under fast motion, fades, and the min/max/window length rules."""

from dataclasses import replace

import cv2
import numpy as np
import pytest

from data.synthetic import SourceConfig, generate, render, sample_spec
from data.video_io import encode_mp4, read_frames
from pipeline.curation.curate import CurateConfig, decode_size
from pipeline.curation.shots import ShotConfig, content_scores, detect_cuts, split_shots, windows

FPS = 8.0
SRC = SourceConfig(num_videos=48, multishot_fraction=1.0, bad_fraction=0.0, seed=3)
# The size curation decodes at: the long side capped at curate.frame_long_side (160), so the
# 64x64 synthetic videos are split at their full 64x64.
SIZE = decode_size(SRC.width, SRC.height, CurateConfig().frame_long_side)


@pytest.fixture(scope="module")
def multishot(tmp_path_factory):
    """48 multi-shot synthetic videos decoded as curation decodes them: (rows, frames)."""
    out = tmp_path_factory.mktemp("multishot")
    rows = generate(SRC, out)
    return rows, [read_frames(out / r["path"], size=SIZE) for r in rows]


@pytest.fixture(scope="module")
def fast_single_shots():
    """Single shots much faster than the source's (4-8 px per frame of a 64 px frame, 3 objects),
    decoded as curation decodes them."""
    rng = np.random.default_rng(7)
    clips = []
    for _ in range(20):
        spec = replace(sample_spec(rng), speed=int(rng.integers(4, 9)), count=3,
                       starts=((0.1, 0.1), (0.4, 0.5), (0.7, 0.8)))
        clips.append(read_frames(encode_mp4(render(spec, 40, 64, 64), FPS), size=SIZE))
    return clips


def precision_recall(truth: list[list[int]], found: list[list[int]], tol: int = 1) -> tuple[float, float]:
    tp_truth = sum(any(abs(f - t) <= tol for f in fs) for ts, fs in zip(truth, found) for t in ts)
    tp_found = sum(any(abs(f - t) <= tol for t in ts) for ts, fs in zip(truth, found) for f in fs)
    n_truth, n_found = sum(map(len, truth)), sum(map(len, found))
    return tp_found / max(n_found, 1), tp_truth / max(n_truth, 1)


@pytest.mark.parametrize("detector", ["adaptive", "content"])
def test_cuts_found_within_one_frame(multishot, detector):
    rows, videos = multishot
    assert len(rows) >= 40 and all(r["cuts"] for r in rows)
    assert SIZE == (64, 64) and videos[0].shape[1:] == (64, 64, 3)
    cfg = ShotConfig(detector=detector)
    found = [detect_cuts(v, FPS, cfg) for v in videos]
    precision, recall = precision_recall([r["cuts"] for r in rows], found)
    assert precision >= 0.95 and recall >= 0.95, (precision, recall)


def test_same_scores_and_cuts_as_pyscenedetect(multishot, fast_single_shots):
    """Our vectorised content/adaptive detectors equal the library's classes run frame by frame
    (adaptive with the same end padding), cut for cut, at thresholds low enough to fire."""
    from scenedetect import FrameTimecode
    from scenedetect.detectors import AdaptiveDetector, ContentDetector

    def library(detector, frames, pad):
        seq = [frames[0]] * pad + list(frames) + [frames[-1]] * pad
        cuts, scores = [], []
        for i, f in enumerate(seq):
            cuts += detector.process_frame(FrameTimecode(i, fps=FPS), cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
            scores.append(detector._frame_score)
        return sorted(c.frame_num - pad for c in cuts), np.array(scores)

    fired = 0
    for frames in multishot[1][:16] + fast_single_shots[:8]:
        cuts, scores = library(ContentDetector(threshold=20.0, min_scene_len=0), frames, 0)
        np.testing.assert_allclose(content_scores(frames), scores, rtol=1e-9)
        assert detect_cuts(frames, FPS, ShotConfig(detector="content", threshold=20.0)) == cuts
        cuts, _ = library(AdaptiveDetector(adaptive_threshold=2.0, min_scene_len=0), frames, 2)
        assert detect_cuts(frames, FPS, ShotConfig(threshold=2.0)) == cuts
        fired += bool(cuts)
    assert fired >= 16


def test_no_false_cuts_in_fast_motion(fast_single_shots):
    adaptive = [detect_cuts(v, FPS, ShotConfig()) for v in fast_single_shots]
    assert all(c == [] for c in adaptive), adaptive
    # the reason adaptive is the default: a fixed content threshold cuts inside some of these
    assert any(detect_cuts(v, FPS, ShotConfig(detector="content")) for v in fast_single_shots)


def test_cuts_next_to_the_ends_are_found():
    rng = np.random.default_rng(0)
    a = sample_spec(rng)
    b = sample_spec(rng, avoid_background=a.background)
    c = sample_spec(rng, avoid_background=b.background)
    frames = np.concatenate([render(a, 1, 32, 32), render(b, 20, 32, 32), render(c, 1, 32, 32)])  # (22, 32, 32, 3)
    assert detect_cuts(frames, FPS, ShotConfig()) == [1, 21]
    split = split_shots(frames, FPS, ShotConfig(min_frames=2, min_seconds=0.25))
    assert split.clips == [(1, 21)] and split.too_short == [(0, 1), (21, 22)] and split.windowed == [False]


def test_fade_to_black_detector():
    rng = np.random.default_rng(1)
    a, b = render(sample_spec(rng), 12, 32, 32), render(sample_spec(rng), 12, 32, 32)
    ramp = np.linspace(1, 0, 6)[:, None, None, None]
    frames = np.concatenate([a, (a[-1] * ramp).astype(np.uint8), (b[0] * ramp[::-1]).astype(np.uint8), b])  # (36, ...)
    cuts = detect_cuts(frames, FPS, ShotConfig(detector="threshold"))
    assert len(cuts) == 1 and 14 <= cuts[0] <= 22, cuts
    assert detect_cuts(a, FPS, ShotConfig(detector="threshold")) == []


def test_long_shots_are_cut_into_windows():
    spec = sample_spec(np.random.default_rng(2))
    frames = render(spec, 80, 16, 16)  # one 10 s shot at 8 fps
    cfg = ShotConfig(min_seconds=1.0, window_seconds=3.0, max_seconds=4.0)
    assert cfg.limits(FPS) == (8, 32, 24)
    split = split_shots(frames, FPS, cfg)
    assert split.cuts == [] and split.clips == [(0, 24), (24, 48), (48, 72), (72, 80)]
    assert split.windowed == [True] * 4 and split.too_short == []
    # a remainder below the minimum joins the last window when that fits the maximum...
    assert windows(0, 52, 8, 32, 24) == ([(0, 24), (24, 52)], [])
    # ...and is reported as too short when it does not
    assert windows(0, 52, 8, 24, 24) == ([(0, 24), (24, 48)], [(48, 52)])
    # detector=window: fixed windows everywhere, even across a cut
    other = replace(spec, background="navy" if spec.background != "navy" else "gray")
    two = np.concatenate([frames[:40], render(other, 40, 16, 16)])  # a cut at 40
    split = split_shots(two, FPS, ShotConfig(detector="window", window_seconds=2.0, max_seconds=4.0))
    assert split.cuts == [] and split.clips == [(i, i + 16) for i in range(0, 80, 16)]
    split = split_shots(two, FPS, ShotConfig(max_seconds=4.0, window_seconds=4.0))
    assert split.cuts == [40] and split.clips == [(0, 32), (32, 40), (40, 72), (72, 80)]


def test_short_shots_reported_and_frame_limits():
    rng = np.random.default_rng(4)
    a = sample_spec(rng)
    b = sample_spec(rng, avoid_background=a.background)
    frames = np.concatenate([render(a, 5, 32, 32), render(b, 30, 32, 32)])  # a 5-frame shot, then 30 frames
    split = split_shots(frames, FPS, ShotConfig())
    assert split.cuts == [5] and split.too_short == [(0, 5)] and split.clips == [(5, 35)]
    assert split.min_len == 8 and split.max_len == 160
    assert ShotConfig(min_frames=12, max_frames=20, max_seconds=30).limits(30.0) == (30, 30, 30)
    assert ShotConfig(min_frames=2, min_seconds=0.1, max_frames=20).limits(FPS) == (2, 20, 20)


def test_config_errors():
    with pytest.raises(ValueError, match="unknown shot detector"):
        ShotConfig(detector="hist")
    with pytest.raises(ValueError, match="min_seconds <= window_seconds <= max_seconds"):
        ShotConfig(window_seconds=30.0)
    with pytest.raises(ValueError, match="max_frames"):
        ShotConfig(min_frames=10, max_frames=5)
