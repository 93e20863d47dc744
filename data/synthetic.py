"""The built-in synthetic video source: coloured shapes sliding over a plain
background, with exact captions.

It is the project's default input (so the whole pipeline runs with no
downloads) and the tests' fixture factory, so everything is a pure function of
the config: the same `SourceConfig` gives the same manifest bytes and, with
x264 pinned to one thread (see `video_io`), the same mp4 bytes.

Design choices:
- A `ClipSpec` holds everything needed to re-render its clip, including the
  start positions (as fractions of the frame, so one spec renders at any
  size). The manifest stores the spec, so a row can be re-rendered with
  `render(ClipSpec.from_dict(row["attributes"]), ...)`.
- Motion wraps around the frame edges (a torus): objects never leave, and as
  all objects of a clip share direction and speed, objects that do not overlap
  at t=0 never overlap.
- Shots of a multi-shot video always change background, so every cut is a
  large jump in mean frame difference, far above motion between frames.
- A fixed fraction of videos are deliberately bad inputs, each labelled with
  the rejection curation is expected to produce, so curation can be scored.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Optional

import numpy as np

from data.checks import check_ranges
from data.video_io import encode_mp4

COLORS = (
    ("red", (255, 0, 0)),
    ("green", (0, 255, 0)),
    ("blue", (40, 80, 255)),
    ("yellow", (255, 255, 0)),
    ("magenta", (255, 0, 255)),
    ("cyan", (0, 255, 255)),
    ("white", (255, 255, 255)),
    ("orange", (255, 140, 0)),
)
# Dark, so every shape colour stands out; pairwise mean channel gap >= 46,
# so a background change is an unmistakable cut.
BACKGROUNDS = (
    ("black", (0, 0, 0)),
    ("gray", (110, 110, 110)),
    ("navy", (20, 20, 120)),
    ("maroon", (120, 20, 20)),
    ("dark green", (20, 100, 20)),
)
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = (("left", (0, -1)), ("right", (0, 1)), ("up", (-1, 0)), ("down", (1, 0)))  # (dy, dx)
COUNTS = (1, 2, 3)
SPEEDS = (1, 2, 3)  # pixels per frame
NUMBER_WORDS = ("zero", "one", "two", "three")

EXPECTED = (  # bad kind -> the label curation should give it
    ("zero_byte", "empty_file"),  # empty file
    ("truncated", "unreadable"),  # a valid mp4 cut to half its bytes
    ("random_bytes", "unreadable"),  # random bytes named .mp4
    ("frozen", "low_motion"),  # valid, every frame identical
    ("too_short", "too_short"),  # valid, 0.5 s
    ("tiny", "low_resolution"),  # valid, 16x16
)
BAD_KINDS = tuple(kind for kind, _ in EXPECTED)
TINY_SIZE = 16
MIN_SEPARATION = 0.25  # toroidal Chebyshev distance between start centres, in frame fractions


@dataclass
class SourceConfig:
    """The raw input. kind=synthetic generates videos; kind=directory lists `path` (the
    synthetic fields are then unused)."""

    kind: str = "synthetic"  # synthetic | directory
    path: Optional[str] = None  # kind=directory: a directory of videos
    num_videos: int = 48
    seed: int = 0
    width: int = 64
    height: int = 64
    fps: float = 8.0
    seconds: float = 3.0
    multishot_fraction: float = 0.15  # videos of 2-3 shots with hard cuts
    bad_fraction: float = 0.15  # videos that are bad inputs, see BAD_KINDS
    bad_kinds: list[str] = field(default_factory=lambda: list(BAD_KINDS))

    def __post_init__(self) -> None:
        check_ranges(self, num_videos=">= 1", width=">= 1", height=">= 1", fps="> 0",
                     seconds="> 0", multishot_fraction="in [0, 1]", bad_fraction="in [0, 1]")
        unknown = sorted(set(self.bad_kinds) - set(BAD_KINDS))
        if unknown:
            raise ValueError(f"bad_kinds: unknown {unknown}; valid: {', '.join(BAD_KINDS)}")


@dataclass(frozen=True)
class ClipSpec:
    shape: str
    color: str
    count: int
    direction: str
    speed: int  # pixels per frame; 0 renders a still clip
    background: str
    starts: tuple[tuple[float, float], ...]  # (y, x) object centres at t=0, fractions of H and W

    @classmethod
    def from_dict(cls, d: dict) -> ClipSpec:
        return cls(**{**d, "starts": tuple(tuple(p) for p in d["starts"])})

    def to_dict(self) -> dict:
        return {**asdict(self), "starts": [list(p) for p in self.starts]}


def sample_spec(rng: np.random.Generator, avoid_background: str | None = None) -> ClipSpec:
    """Draw a clip; start centres are at least MIN_SEPARATION apart where possible."""
    backgrounds = [name for name, _ in BACKGROUNDS if name != avoid_background]
    count = COUNTS[rng.integers(len(COUNTS))]
    starts: list[tuple[float, float]] = []
    for _ in range(count):
        for _attempt in range(100):
            p = (round(float(rng.random()), 4), round(float(rng.random()), 4))
            if all(_torus_dist(p, q) >= MIN_SEPARATION for q in starts):
                break
        starts.append(p)  # the last attempt if none was far enough
    return ClipSpec(
        shape=SHAPES[rng.integers(len(SHAPES))],
        color=COLORS[rng.integers(len(COLORS))][0],
        count=int(count),
        direction=DIRECTIONS[rng.integers(len(DIRECTIONS))][0],
        speed=int(SPEEDS[rng.integers(len(SPEEDS))]),
        background=backgrounds[rng.integers(len(backgrounds))],
        starts=tuple(starts),
    )


def _torus_dist(p: tuple[float, float], q: tuple[float, float]) -> float:
    d = [abs(a - b) % 1.0 for a, b in zip(p, q)]
    return max(min(x, 1.0 - x) for x in d)


def caption(spec: ClipSpec) -> str:
    """E.g. "two red circles moving left on a black background"."""
    noun = spec.shape + ("s" if spec.count > 1 else "")
    motion = f" moving {spec.direction}" if spec.speed else ""
    return f"{NUMBER_WORDS[spec.count]} {spec.color} {noun}{motion} on a {spec.background} background"


def render(spec: ClipSpec, num_frames: int, height: int, width: int) -> np.ndarray:
    """Draw the clip -> (T, H, W, 3) uint8. Objects are ~min(H, W)/5 across."""
    r = max(1.0, min(height, width) / 10)  # half extent in pixels
    dy, dx = dict(DIRECTIONS)[spec.direction]
    t = np.arange(num_frames, dtype=np.float64)  # (T,)
    ys = np.arange(height, dtype=np.float64)[None, :, None] + 0.5  # (1, H, 1) pixel centres
    xs = np.arange(width, dtype=np.float64)[None, None, :] + 0.5  # (1, 1, W)
    frames = np.empty((num_frames, height, width, 3), np.uint8)  # (T, H, W, 3)
    frames[:] = dict(BACKGROUNDS)[spec.background]
    color = dict(COLORS)[spec.color]
    for fy, fx in spec.starts:
        cy = (fy * height + dy * spec.speed * t)[:, None, None]  # (T, 1, 1)
        cx = (fx * width + dx * spec.speed * t)[:, None, None]  # (T, 1, 1)
        oy = (ys - cy + height / 2) % height - height / 2  # (T, H, 1) wrapped offset from centre
        ox = (xs - cx + width / 2) % width - width / 2  # (T, 1, W)
        if spec.shape == "circle":
            mask = oy**2 + ox**2 <= r**2  # (T, H, W)
        elif spec.shape == "square":
            mask = (np.abs(oy) <= r) & (np.abs(ox) <= r)  # (T, H, W)
        elif spec.shape == "triangle":  # apex up, base at the bottom
            mask = (np.abs(oy) <= r) & (np.abs(ox) <= (oy + r) / 2)  # (T, H, W)
        else:
            raise ValueError(f"unknown shape {spec.shape!r}")
        frames[mask] = color
    return frames


def _shot_lengths(rng: np.random.Generator, num_frames: int, num_shots: int) -> list[int]:
    """Split num_frames into shots of at least num_frames // (num_shots + 1) frames each."""
    min_len = num_frames // (num_shots + 1)
    extra = rng.multinomial(num_frames - min_len * num_shots, [1 / num_shots] * num_shots)
    return [int(min_len + e) for e in extra]


def _plan(cfg: SourceConfig) -> list[str | None]:
    """Per video: None (single shot), "multishot", or a bad kind. Bad kinds are
    dealt round-robin, so each appears once bad_fraction * num_videos >= len(bad_kinds)."""
    n = cfg.num_videos
    kinds = list(cfg.bad_kinds)
    unknown = set(kinds) - set(BAD_KINDS)
    if unknown:
        raise ValueError(f"unknown bad kinds {sorted(unknown)}; known: {BAD_KINDS}")
    n_bad = min(n, int(cfg.bad_fraction * n + 0.5)) if kinds else 0
    n_multi = min(n - n_bad, int(cfg.multishot_fraction * n + 0.5))
    order = np.random.default_rng(cfg.seed).permutation(n)
    plan: list[str | None] = [None] * n
    for j, i in enumerate(order[:n_bad]):
        plan[i] = kinds[j % len(kinds)]
    for i in order[n_bad : n_bad + n_multi]:
        plan[i] = "multishot"
    return plan


def _make_video(cfg: SourceConfig, index: int, kind: str | None) -> tuple[bytes, dict]:
    """One video's bytes and manifest row (without id/path)."""
    rng = np.random.default_rng([cfg.seed, index])
    num_frames = max(1, round(cfg.fps * cfg.seconds))
    height, width = cfg.height, cfg.width
    num_shots = int(rng.integers(2, 4)) if kind == "multishot" else 1
    specs = [sample_spec(rng)]
    for _ in range(num_shots - 1):
        specs.append(sample_spec(rng, avoid_background=specs[-1].background))
    if kind == "frozen":
        specs = [replace(specs[0], speed=0)]
    elif kind == "too_short":
        num_frames = max(2, int(cfg.fps * 0.5))
    elif kind == "tiny":
        height = width = TINY_SIZE
    lengths = _shot_lengths(rng, num_frames, num_shots) if num_shots > 1 else [num_frames]
    frames = np.concatenate([render(s, n, height, width) for s, n in zip(specs, lengths)])  # (T, H, W, 3)
    data = encode_mp4(frames, cfg.fps)
    if kind == "zero_byte":
        data = b""
    elif kind == "truncated":
        data = data[: len(data) // 2]
    elif kind == "random_bytes":
        data = rng.bytes(len(data))
    starts = np.cumsum([0, *lengths]).tolist()
    shots = [
        {"start": a, "end": b, "caption": caption(s), "attributes": s.to_dict()}
        for a, b, s in zip(starts[:-1], starts[1:], specs)
    ]
    row = {
        "caption": ", then ".join(shot["caption"] for shot in shots),
        "attributes": shots[0]["attributes"] if num_shots == 1 else [s["attributes"] for s in shots],
        "num_frames": num_frames,
        "fps": float(cfg.fps),
        "width": width,
        "height": height,
        "shots": shots,
        "cuts": starts[1:-1],
        "bad_kind": None if kind in (None, "multishot") else kind,
        "expected": dict(EXPECTED).get(kind, "keep"),
    }
    return data, row


def _write_atomic(path: str, data: bytes) -> None:
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def generate(cfg: SourceConfig, out_dir: str | os.PathLike) -> list[dict]:
    """Write out_dir/videos/vid-NNNNNN.{mp4,json} and out_dir/manifest.jsonl
    (written last, so its presence means the set is complete); return the rows.

    For unreadable bad kinds the row still describes the video that was
    rendered before it was broken; `bad_kind` and `expected` say what happened.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(os.path.join(out_dir, "videos"), exist_ok=True)
    rows = []
    for index, kind in enumerate(_plan(cfg)):
        data, row = _make_video(cfg, index, kind)
        vid = f"vid-{index:06d}"
        row = {"id": vid, "path": f"videos/{vid}.mp4", **row}
        _write_atomic(os.path.join(out_dir, row["path"]), data)
        _write_atomic(os.path.join(out_dir, "videos", f"{vid}.json"), json.dumps(row).encode())
        rows.append(row)
    lines = "".join(json.dumps(row) + "\n" for row in rows)
    _write_atomic(os.path.join(out_dir, "manifest.jsonl"), lines.encode())
    return rows
