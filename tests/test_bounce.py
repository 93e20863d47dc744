"""Bouncing motion in the synthetic source (``source.motion=bounce``, ``source=long``): minute-long
32x32 clips whose objects move as one group and bounce off the walls, rendered to real mp4s; their
captions read back by ``parse_prompt``; the probes' direction reading on the prompt's axis; the
long-clip consistency probes holding across every window; and the wrap path's bytes unchanged."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import cv2
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from data import synthetic
from data.prompts import Expected, parse_prompt
from data.synthetic import (AXES, COUNTS, MIN_SEPARATION, ClipSpec, SourceConfig, bounce_offsets,
                            bounce_starts, caption, generate, render, sample_spec)
from data.video_io import encode_mp4, read_frames
from pipeline.config import CONF_DIR, register, to_object
from training.evaluation.consistency import HELD, window_probes
from training.evaluation.probes import judge, measure

FPS, SIZE = 8.0, 32
# The default-motion (wrap) source on main before bouncing existed: this config's manifest, and
# the manifest, json sidecars (name order) and every frame array handed to the H.264 encoder,
# computed with main's code. Frames, not mp4 bytes: the bytes change with PyAV's bundled x264.
WRAP_CFG = dict(num_videos=12, seconds=1.0, width=32, height=32, multishot_fraction=0.25, bad_fraction=0.5)
WRAP_MANIFEST_SHA = "eced76e4ff3fd9f084aa99666cc8827757ad1ee5a3015c2371b676cfdccf45da"
WRAP_ALL_SHA = "abd705709fd445aaa56277801ecd21756d7594a0ce5b9c6aeb870247e17f7257"


def long_cfg(**over) -> SourceConfig:
    """conf/source/long.yaml (what ``source=long`` selects) through the typed schema."""
    node = OmegaConf.merge(OmegaConf.structured(SourceConfig), OmegaConf.load(CONF_DIR / "source" / "long.yaml"),
                           over)
    return OmegaConf.to_object(node)


def spec_mask(spec: ClipSpec, T: int) -> np.ndarray:
    """(T, H, W) bool: the rendered objects' pixels (exact, before mp4)."""
    return (render(spec, T, SIZE, SIZE) != render(replace(spec, starts=()), T, SIZE, SIZE)).any(-1)


@pytest.fixture(scope="module")
def minute(tmp_path_factory):
    """4 one-minute clips of source=long (no bad inputs): rows, specs, decoded mp4 frames."""
    out = tmp_path_factory.mktemp("long")
    rows = generate(long_cfg(num_videos=4, bad_fraction=0.0), out)
    specs = [ClipSpec.from_dict(r["attributes"]) for r in rows]
    videos = [read_frames(str(out / r["path"])) for r in rows]  # (480, 32, 32, 3) each
    return out, rows, specs, videos


def test_long_config_is_a_minute_of_bouncing_at_low_resolution(minute):
    cfg = long_cfg()
    assert (cfg.kind, cfg.motion, cfg.seconds, cfg.width, cfg.height) == ("synthetic", "bounce", 60.0, 32, 32)
    assert cfg.multishot_fraction == 0.0
    _, rows, specs, videos = minute
    assert all(r["num_frames"] == 480 and not r["cuts"] and r["expected"] == "keep" for r in rows)
    assert all(s.motion == "bounce" for s in specs) and all(v.shape == (480, 32, 32, 3) for v in videos)
    assert {s.axis for s in specs} == {"horizontal", "vertical"} and max(s.count for s in specs) > 1


def test_a_bad_motion_is_named():
    with pytest.raises(ValueError, match=r"^motion: unknown 'sideways'; valid: wrap, bounce"):
        SourceConfig(motion="sideways")
    register()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        with pytest.raises(ValueError, match=r"^source\.motion: unknown 'sideways'"):
            to_object(compose("config", overrides=["source.motion=sideways"]))
        assert to_object(compose("config", overrides=["source=long"])).source.motion == "bounce"


def test_the_group_stays_inside_never_overlaps_and_reverses_at_walls(minute):
    _, _, specs, _ = minute
    T = 480
    r = SIZE / 10
    for spec in specs:
        mask = spec_mask(spec, T)  # (T, H, W)
        whole = min(spec_mask(replace(spec, starts=((0.5 + a / SIZE, 0.5 + b / SIZE),), speed=0), 1).sum()
                    for a in np.linspace(0, 1, 9) for b in np.linspace(0, 1, 9))  # smallest uncut area
        for t in range(T):  # every object its own blob (none overlap or touch), none cut by a wall
            n, lab = cv2.connectedComponents(mask[t].astype(np.uint8), connectivity=4)
            assert n - 1 == spec.count, (spec, t)
            assert np.bincount(lab.ravel())[1:].min() >= whole, (spec, t)
        along = 1 if spec.axis == "vertical" else 0  # mask axis summed away to get the motion axis
        profile = mask.any(axis=1 + along)  # (T, L) occupied positions along the motion axis
        assert not (profile[:, 0] & profile[:, -1]).any(), spec  # never across the seam (no wrap)
        # the exact group extent from the offsets, and the reversals
        off = bounce_offsets(spec, T, SIZE, SIZE)  # (T,)
        centres = np.array([p[0 if spec.axis == "vertical" else 1] for p in spec.starts]) * SIZE
        lo, hi = centres.min() - r + off, centres.max() + r + off  # (T,)
        assert lo.min() >= -1e-9 and hi.max() <= SIZE + 1e-9, spec
        step = np.diff(off)  # (T-1,)
        assert np.abs(step).max() <= spec.speed + 1e-9
        turns = np.flatnonzero(np.sign(step[1:]) != np.sign(step[:-1])) + 1  # frames it turned at
        assert len(turns) >= 4, spec  # a minute bounces many times
        for t in turns:  # each turn is at a wall: the group's extent is within one step of it
            assert min(lo[t], SIZE - hi[t]) <= spec.speed + 1e-9, (spec, t)
        # and the rendered pixels show the same: at every turn the occupied span is within a step
        # of a wall (frames are discrete: the group reaches the wall between two of them)
        first = profile.argmax(axis=1)  # (T,)
        last = SIZE - 1 - profile[:, ::-1].argmax(axis=1)  # (T,)
        for t in turns:
            near = slice(max(0, t - 1), t + 2)
            assert first[near].min() <= spec.speed or last[near].max() >= SIZE - 1 - spec.speed, (spec, t)
            assert max(first[t], SIZE - 1 - last[t]) > spec.speed + 1, (spec, t)  # not both walls
        # it starts in its stated direction
        sign = dict(left=-1, right=1, up=-1, down=1)[spec.direction]
        assert np.sign(step[0]) == sign or min(lo[0], SIZE - hi[0]) <= spec.speed, spec


def test_probes_read_the_count_and_axis_of_a_minute_through_mp4(minute):
    _, rows, specs, videos = minute
    for row, spec, video in zip(rows, specs, videos):
        m = measure(video)
        assert set(m.counts) == {spec.count}, (spec, set(m.counts))
        assert m.axis == spec.axis and m.color == spec.color and m.shape == spec.shape
        ok = judge(m, parse_prompt(row["caption"]))
        assert all(ok.values()), (row["caption"], ok)


def test_bounce_specs_rerender_from_the_manifest(minute):
    out, rows, specs, _ = minute
    for row, spec in zip(rows, specs):
        assert row["attributes"]["motion"] == "bounce" and caption(spec) == row["caption"]
        assert encode_mp4(render(spec, row["num_frames"], row["height"], row["width"]), FPS) == \
            (out / row["path"]).read_bytes()


def test_wrap_bytes_are_unchanged(tmp_path, monkeypatch):
    frames = hashlib.sha256()

    def encode(video, fps, *args, **kwargs):  # what the generator renders, before the encoder
        video = np.ascontiguousarray(video)
        frames.update(f"{video.shape}{float(fps)!r}".encode() + video.tobytes())
        return encode_mp4(video, fps, *args, **kwargs)

    monkeypatch.setattr(synthetic, "encode_mp4", encode)
    generate(SourceConfig(**WRAP_CFG), tmp_path)
    manifest = (tmp_path / "manifest.jsonl").read_bytes()
    assert hashlib.sha256(manifest).hexdigest() == WRAP_MANIFEST_SHA
    h = hashlib.sha256(manifest)
    for f in sorted((tmp_path / "videos").glob("*.json")):
        h.update(f.read_bytes())
    h.update(frames.digest())
    assert h.hexdigest() == WRAP_ALL_SHA
    assert b'"motion"' not in manifest  # wrap specs are stored as before
    old = sample_spec(np.random.default_rng(0)).to_dict()
    assert "motion" not in old and ClipSpec.from_dict(old).motion == "wrap"  # old manifests load


def test_bounce_starts_leave_room_and_separate():
    rng = np.random.default_rng(7)
    drawn = [(s.starts, s.axis) for s in (sample_spec(rng, motion="bounce") for _ in range(300))]
    fallback = [(bounce_starts(rng, n, axis, attempts=0), axis) for n in COUNTS for axis in ("horizontal", "vertical")]
    for starts, axis in drawn + fallback:
        along = 0 if axis == "vertical" else 1
        pos = np.array(starts)  # (N, 2)
        assert ((pos >= 0.15) & (pos <= 0.85)).all()
        assert np.ptp(pos[:, along]) <= 0.3  # the group travels >= half the frame
        for i in range(len(pos)):
            for j in range(i):
                assert np.abs(pos[i] - pos[j]).max() >= MIN_SEPARATION - 1e-9


def test_parse_prompt_reads_bouncing_captions():
    rng = np.random.default_rng(3)
    for _ in range(200):
        spec = sample_spec(rng, motion="bounce")
        words = dict((a, w) for a, _, w in AXES)[spec.axis]
        assert f" bouncing {words} on a " in caption(spec)
        assert parse_prompt(caption(spec)) == Expected(spec.count, spec.color, spec.shape, None, spec.background,
                                                       bounce=True, axis=spec.axis)
        still = replace(spec, speed=0)  # a frozen bouncer is captioned (and parsed) as still
        assert parse_prompt(caption(still)) == Expected(spec.count, spec.color, spec.shape, None, spec.background)
    assert caption(ClipSpec("circle", "red", 1, "right", 2, "black", ((0.5, 0.5),), "bounce")) == \
        "one red circle bouncing left and right on a black background"
    assert parse_prompt("two red squares bouncing up and down on a dark green background").axis == "vertical"
    assert parse_prompt("one red circle bouncing left and up on a black background") is None
    old = parse_prompt("one red circle moving left on a black background")
    assert old == Expected(1, "red", "circle", "left", "black") and not old.bounce and old.axis is None


def test_the_direction_probe_wants_the_prompts_axis():
    spec = ClipSpec("square", "yellow", 2, "right", 2, "navy", ((0.3, 0.3), (0.7, 0.4)), "bounce")
    video = read_frames(encode_mp4(render(spec, 48, SIZE, SIZE), FPS))
    horizontal, vertical = caption(spec), caption(replace(spec, direction="up"))
    m = measure(video)
    assert judge(m, parse_prompt(horizontal))["direction"]
    assert not judge(m, parse_prompt(vertical))["direction"]
    # forth then exactly back: the summed shift balances out, the pairs still move on the axis
    there_and_back = np.concatenate([video[:12], video[:12][::-1]])
    mb = measure(there_and_back)
    assert mb.direction in ("still", "diagonal", "left", "right") and mb.axis == "horizontal"
    assert judge(mb, parse_prompt(horizontal))["direction"]
    assert not judge(mb, parse_prompt(vertical))["direction"]
    still = read_frames(encode_mp4(render(replace(spec, speed=0), 48, SIZE, SIZE), FPS))
    ms = measure(still)
    assert ms.direction == "still" and ms.axis == "still"
    assert not judge(ms, parse_prompt(horizontal))["direction"]
    # motion on the axis that does not turn is on the axis too; the other axis is not
    wrap = measure(read_frames(encode_mp4(render(replace(spec, motion="wrap"), 24, SIZE, SIZE), FPS)))
    assert wrap.direction == "right" and judge(wrap, parse_prompt(horizontal))["direction"]
    assert not judge(wrap, parse_prompt(vertical))["direction"]


def test_direction_holds_across_a_bouncing_minute(minute):
    _, rows, _, videos = minute
    for row, video in zip(rows, videos):
        r = window_probes(video, row["caption"], int(FPS), FPS)
        assert len(r["windows"]) == 60
        assert r["consistent"] and all(r["held"].values()), (row["caption"], r["first_failure"])
        # the direction turns around (the wrap rule, the first window's direction, would fail)
        assert len({w["direction"] for w in r["windows"]}) >= 2
        assert all(w["pass"]["direction"] and w["pass"]["count"] for w in r["windows"])


def test_direction_held_fails_when_a_bouncer_changes_axis():
    spec = ClipSpec("circle", "white", 2, "left", 2, "black", ((0.3, 0.5), (0.7, 0.6)), "bounce")
    T = 240  # 30 s
    turned = replace(spec, direction="up", starts=((0.4, 0.3), (0.6, 0.7)))  # bouncing up and down
    video = read_frames(encode_mp4(np.concatenate([render(spec, T, SIZE, SIZE), render(turned, T, SIZE, SIZE)]), FPS))
    r = window_probes(video, caption(spec), int(FPS), FPS)
    assert not r["held"]["direction_held"] and r["first_failure"]["direction_held"] == 30
    assert all(not w["held"]["direction_held"] for w in r["windows"][31:])
    assert all(w["held"]["direction_held"] for w in r["windows"][:30])
    assert {p for p, ok in r["held"].items() if ok} == set(HELD) - {"direction_held"}
    # the prompt's own probe fails on the vertical half too
    assert not any(w["pass"]["direction"] for w in r["windows"][31:])
