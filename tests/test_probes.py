"""The probe detectors, validated on ground truth: clips rendered by the synthetic source at the
demo's sizes (32x32, 64x64, 8-16 frames) and passed through mp4 like the eval samples are, and
64x64 clips decoded at 32x32 as the loader feeds training (anti-aliased, half-pixel speeds). Each
detector must be right on >= 98% of them, and must fail when the prompt (or the video) is wrong,
so a probe cannot pass by being lenient."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from data.synthetic import (BACKGROUNDS, COLORS, COUNTS, DIRECTIONS, SHAPES, ClipSpec, caption,
                            render, sample_spec)
from data.video_io import encode_mp4, read_frames
from data.prompts import Expected, parse_prompt, synthetic_prompts
from training.evaluation.probes import PROBES, judge, measure, probe_scores, probe_video, torus_components

N_CLIPS = 240
MIN_ACCURACY = 0.98


def mp4(video: np.ndarray, size: int | None = None) -> np.ndarray:
    """(T, H, W, 3) as a viewer decodes it, or resized to size x size as the loader decodes it."""
    return read_frames(encode_mp4(video, 8.0), size=(size, size) if size else None)


def expected_of(spec: ClipSpec) -> Expected:
    return Expected(spec.count, spec.color, spec.shape, spec.direction if spec.speed else None,
                    spec.background)


@pytest.fixture(scope="module")
def truth():
    """(spec, num_frames, how, decoded video, measurement) for N_CLIPS random clips: drawn at
    32 or 64 pixels, or drawn at 64 and decoded at 32."""
    rng = np.random.default_rng(2024)
    out = []
    for i in range(N_CLIPS):
        spec = sample_spec(rng)
        how, T = ("32", "64", "64->32")[i % 3], int(rng.integers(8, 17))
        drawn = 32 if how == "32" else 64
        video = mp4(render(spec, T, drawn, drawn), size=32 if how == "64->32" else None)
        out.append((spec, T, how, video, measure(video)))
    return out


def other(rng, values, current):
    return rng.choice([v for v in values if v != current])


def test_parse_prompt_inverts_the_source_captions():
    rng = np.random.default_rng(0)
    for _ in range(200):
        spec = sample_spec(rng)
        assert parse_prompt(caption(spec)) == expected_of(spec)
        still = replace(spec, speed=0)
        assert parse_prompt(caption(still)) == expected_of(still)  # no "moving": direction None
    assert parse_prompt("one red circle moving left on a dark green background").background == "dark green"
    for prompt in ("a cat playing piano", "two purple circles moving left on a black background",
                   "one red circle moving sideways on a black background",
                   "one red circle moving left on a pink background", ""):
        assert parse_prompt(prompt) is None


def test_synthetic_prompts_are_deterministic_and_balanced():
    p = synthetic_prompts(32, seed=7)
    assert p == synthetic_prompts(32, seed=7) and p != synthetic_prompts(32, seed=8)
    parsed = [parse_prompt(x) for x in p]
    assert all(parsed)
    colors = [e.color for e in parsed]
    assert all(colors.count(c) == 4 for c, _ in COLORS)
    directions = [e.direction for e in parsed]
    assert all(directions.count(d) == 8 for d, _ in DIRECTIONS)
    for c, _ in COLORS:  # every colour meets more than one direction
        assert len({e.direction for e in parsed if e.color == c}) > 1


@pytest.mark.parametrize("probe", PROBES)
def test_each_detector_is_right_on_ground_truth_clips(truth, probe):
    results = [judge(m, expected_of(spec))[probe] for spec, *_, m in truth]
    wrong = [f"{caption(t[0])} @{t[2]}" for t, ok in zip(truth, results) if not ok]
    assert np.mean(results) >= MIN_ACCURACY, wrong[:5]


def test_detectors_fail_against_wrong_prompts(truth):
    """The same clip against a prompt with one attribute changed fails that attribute's probe."""
    rng = np.random.default_rng(1)
    fails = {p: [] for p in ("background", "color", "shape", "direction", "count")}
    names = {"background": [b for b, _ in BACKGROUNDS], "color": [c for c, _ in COLORS],
             "shape": list(SHAPES), "direction": [d for d, _ in DIRECTIONS], "count": list(COUNTS)}
    for spec, *_, m in truth:
        e = expected_of(spec)
        for attr in fails:
            wrong = replace(e, **{attr: other(rng, names[attr], getattr(e, attr))})
            fails[attr].append(not judge(m, wrong)[attr])
        opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}[spec.direction]
        fails["direction"].append(not judge(m, replace(e, direction=opposite))["direction"])
        fails["direction"].append(not judge(m, replace(e, direction=None))["direction"])  # "still"
    for attr, f in fails.items():
        assert np.mean(f) >= MIN_ACCURACY, attr


def test_detectors_fail_on_wrong_videos():
    """Videos that break the prompt the way the critiques describe: objects that change number
    mid-clip, motion reversed or absent, a flickering background, nothing drawn at all."""
    rng = np.random.default_rng(3)
    n, failed = 40, {k: 0 for k in ("count_constant", "reversed", "still", "flicker", "empty")}
    for i in range(n):
        spec = sample_spec(rng)
        while spec.count < 2:
            spec = sample_spec(rng)
        size, T = (32, 64)[i % 2], int(rng.integers(8, 17))
        e = expected_of(spec)
        clip = render(spec, T, size, size)  # (T, H, W, 3)
        fewer = render(replace(spec, count=spec.count - 1, starts=spec.starts[1:]), T, size, size)
        vanishing = np.concatenate([clip[: T // 2], fewer[T // 2 :]])  # one object disappears
        r = judge(measure(mp4(vanishing)), e)
        failed["count_constant"] += not r["count_constant"] and not r["count"]
        failed["reversed"] += not judge(measure(mp4(clip[::-1].copy())), e)["direction"]
        failed["still"] += not judge(measure(mp4(render(replace(spec, speed=0), T, size, size))), e)["direction"]
        jitter = np.where(np.arange(T) % 2, 6, -6)[:, None, None, None]  # +-6 levels per frame
        flickering = np.clip(clip.astype(int) + jitter, 0, 255).astype(np.uint8)
        failed["flicker"] += not judge(measure(mp4(flickering)), e)["flicker"]
        empty = np.broadcast_to(dict(BACKGROUNDS)[spec.background], clip.shape).astype(np.uint8)
        r = judge(measure(mp4(empty)), e)
        failed["empty"] += not (r["color"] or r["shape"] or r["count"] or r["count_constant"])
    assert failed == dict.fromkeys(failed, n), failed


def test_an_object_across_the_frame_edge_is_one_object():
    mask = np.zeros((16, 16), bool)
    mask[6:9, 14:] = mask[6:9, :2] = True  # one square split by the left/right seam
    mask[15, 5:8] = mask[0, 5:8] = True  # another split by the top/bottom seam
    mask[10, 10] = True
    labels, n = torus_components(mask)
    assert n == 3
    assert labels[7, 15] == labels[7, 0] and labels[15, 6] == labels[0, 6]
    spec = ClipSpec("square", "red", 1, "right", 2, "black", ((0.5, 0.97),))  # starts on the seam
    m = measure(mp4(render(spec, 10, 32, 32)))
    assert m.counts == [1] * 10 and m.direction == "right"
    assert m.shift == pytest.approx([0, 2], abs=0.1)


def test_probe_video_and_scores():
    spec = ClipSpec("circle", "yellow", 2, "up", 1, "navy", ((0.2, 0.3), (0.7, 0.6)))
    video = mp4(render(spec, 12, 32, 32))
    good = probe_video(video, caption(spec))
    assert good["expected"]["color"] == "yellow" and all(good["pass"].values())
    bad = probe_video(video, caption(replace(spec, color="red", direction="left")))
    assert not bad["pass"]["color"] and not bad["pass"]["direction"] and bad["pass"]["shape"]
    free = probe_video(video, "a yellow thing")
    assert free["expected"] is None and free["pass"] == {} and free["measured"]["color"] == "yellow"
    scores = probe_scores([good["pass"], bad["pass"], free["pass"]])
    assert scores["probe/samples"] == 2 and scores["probe/color"] == 0.5
    assert scores["probe/shape"] == 1.0 and scores["probe/all"] == 0.5
    assert probe_scores([free["pass"]]) == {}
