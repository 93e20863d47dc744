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
- `motion="bounce"` instead moves the clip's objects as one rigid group that
  bounces off the frame's walls: when the group's extent reaches a wall its
  direction reverses (left <-> right, up <-> down). Objects never leave the
  frame and never wrap, so a clip of any length (a minute at 32x32) keeps its
  count; starts are drawn inside the frame, with the group narrow enough along
  its axis to travel at least half the frame. Captions say "bouncing left and
  right" / "bouncing up and down".
- Shots of a multi-shot video always change background, so every cut is a
  large jump in mean frame difference, far above motion between frames.
- A fixed fraction of videos are deliberately bad inputs, each labelled with
  the rejection curation is expected to produce, so curation can be scored.
- `stills` (a fraction of the items, off by default) are written as single-frame PNG
  images (``images/img-NNNNNN.png``, manifest ``"kind": "image"``, ``num_frames`` 1): one
  object set of the same vocabulary with speed 0, so the caption has no motion words ("two
  red circles on a black background", which `data.prompts.parse_prompt` reads with no
  direction). They are dealt from the good single-shot items after the bad and multi-shot
  ones, so the videos' plan and bytes do not change with stills=0.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Optional

import numpy as np
from PIL import Image

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
# Bouncing motion's axes: (axis, its two directions, the caption's words).
AXES = (("horizontal", ("left", "right"), "left and right"), ("vertical", ("up", "down"), "up and down"))
MOTIONS = ("wrap", "bounce")
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
# Bounce starts, in frame fractions: centres inside [MARGIN, 1 - MARGIN] on both axes (objects are
# at most 0.1 of a side across from the centre, so none touches a wall it is not bouncing off),
# and the group's spread along its axis at most BOUNCE_SPREAD, so it travels >= half the frame.
BOUNCE_MARGIN = 0.15
BOUNCE_SPREAD = 0.3
# Bounce speeds, pixels per frame. Each reversal is a pair of opposite flows, which curation's
# jitter score (scores.jitter <= 0.35) counts at 12 evenly spaced anchors; when the bounce's
# period aliases with their spacing they all land on reversals. Minute-long 32x32 clips: at
# speeds 1-3, 2 of 24 at speed 3 and 1 of 150 at speeds 1-2 scored 0.40-0.49 (rejected as
# jittery); at speed 1, the worst of 150 scored 0.22.
BOUNCE_SPEEDS = (1,)


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
    motion: str = "wrap"  # wrap (around the frame edges) | bounce (off the walls, as one group)
    # Items written as single-frame PNG stills (same vocabulary, no motion words), taken from
    # the good single-shot ones; 0: videos only (the output is then as it always was).
    stills: float = 0.0

    def __post_init__(self) -> None:
        check_ranges(self, num_videos=">= 1", width=">= 1", height=">= 1", fps="> 0",
                     seconds="> 0", multishot_fraction="in [0, 1]", bad_fraction="in [0, 1]",
                     stills="in [0, 1]")
        if self.motion not in MOTIONS:
            raise ValueError(f"motion: unknown {self.motion!r}; valid: {', '.join(MOTIONS)}")
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
    motion: str = "wrap"  # wrap | bounce; direction is then the direction at t=0

    @classmethod
    def from_dict(cls, d: dict) -> ClipSpec:
        return cls(**{**d, "starts": tuple(tuple(p) for p in d["starts"])})

    def to_dict(self) -> dict:
        """Wrap (the default) is left out, so wrap manifests keep their bytes."""
        d = {**asdict(self), "starts": [list(p) for p in self.starts]}
        if self.motion == "wrap":
            del d["motion"]
        return d

    @property
    def axis(self) -> str:
        """The axis of the direction: horizontal | vertical."""
        return axis_of(self.direction)


def axis_of(direction: str) -> str:
    return next(a for a, pair, _ in AXES if direction in pair)


def sample_spec(rng: np.random.Generator, avoid_background: str | None = None,
                motion: str = "wrap") -> ClipSpec:
    """Draw a clip; start centres are at least MIN_SEPARATION apart where possible."""
    if motion == "bounce":
        return _sample_bounce(rng, avoid_background)
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


def _sample_bounce(rng: np.random.Generator, avoid_background: str | None) -> ClipSpec:
    """A bouncing clip: the direction first, then starts that leave it room (`bounce_starts`)."""
    backgrounds = [name for name, _ in BACKGROUNDS if name != avoid_background]
    count = int(COUNTS[rng.integers(len(COUNTS))])
    direction = DIRECTIONS[rng.integers(len(DIRECTIONS))][0]
    return ClipSpec(
        shape=SHAPES[rng.integers(len(SHAPES))],
        color=COLORS[rng.integers(len(COLORS))][0],
        count=count,
        direction=direction,
        speed=int(BOUNCE_SPEEDS[rng.integers(len(BOUNCE_SPEEDS))]),
        background=backgrounds[rng.integers(len(backgrounds))],
        starts=bounce_starts(rng, count, axis_of(direction)),
        motion="bounce",
    )


def bounce_starts(rng: np.random.Generator, count: int, axis: str,
                  attempts: int = 1000) -> tuple[tuple[float, float], ...]:
    """Start centres inside [BOUNCE_MARGIN, 1 - BOUNCE_MARGIN]^2, at least MIN_SEPARATION apart
    (plain Chebyshev distance: nothing wraps) and spread at most BOUNCE_SPREAD along `axis`;
    after `attempts` draws, a line across the axis at one position along it."""
    along = 0 if axis == "vertical" else 1  # index of the motion axis in (y, x)
    lo, hi = BOUNCE_MARGIN, 1 - BOUNCE_MARGIN
    for _attempt in range(attempts):
        starts = [tuple(round(float(v), 4) for v in rng.uniform(lo, hi, 2)) for _ in range(count)]
        spread = max(p[along] for p in starts) - min(p[along] for p in starts)
        if spread <= BOUNCE_SPREAD and all(max(abs(a - b) for a, b in zip(p, q)) >= MIN_SEPARATION
                                           for i, p in enumerate(starts) for q in starts[:i]):
            return tuple(starts)
    at = round(float(rng.uniform(lo, hi)), 4)
    across = np.linspace(lo, hi, count) if count > 1 else [0.5]
    return tuple((at, round(float(c), 4)) if along == 0 else (round(float(c), 4), at) for c in across)


def _torus_dist(p: tuple[float, float], q: tuple[float, float]) -> float:
    d = [abs(a - b) % 1.0 for a, b in zip(p, q)]
    return max(min(x, 1.0 - x) for x in d)


def caption(spec: ClipSpec) -> str:
    """E.g. "two red circles moving left on a black background", or for a bouncing clip
    "one red circle bouncing left and right on a black background"."""
    noun = spec.shape + ("s" if spec.count > 1 else "")
    if spec.motion == "bounce":
        motion = f" bouncing {dict((a, w) for a, _, w in AXES)[spec.axis]}" if spec.speed else ""
    else:
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
    bounce = spec.motion == "bounce"
    if bounce:
        offset = bounce_offsets(spec, num_frames, height, width)  # (T,) the group's displacement
    elif spec.motion != "wrap":
        raise ValueError(f"unknown motion {spec.motion!r}; valid: {', '.join(MOTIONS)}")
    for fy, fx in spec.starts:
        if bounce:
            cy = (fy * height + abs(dy) * offset)[:, None, None]  # (T, 1, 1)
            cx = (fx * width + abs(dx) * offset)[:, None, None]  # (T, 1, 1)
            oy, ox = ys - cy, xs - cx  # (T, H, 1), (T, 1, W) offsets from the centre
        else:
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


def bounce_offsets(spec: ClipSpec, num_frames: int, height: int, width: int) -> np.ndarray:
    """A bouncing group's displacement along its axis at each frame, in pixels -> (T,) float.

    The group's extent is its objects' centres +- the half extent r; it may move by `lo` (its
    leading object at the low wall) to `hi` (its last one at the high wall). The path is the
    straight one folded into [lo, hi] (a triangle wave): it reverses wherever it meets a wall."""
    r = max(1.0, min(height, width) / 10)
    dy, dx = dict(DIRECTIONS)[spec.direction]
    size, sign = (height, dy) if dy else (width, dx)
    centres = [fy * height if dy else fx * width for fy, fx in spec.starts] or [size / 2]
    lo, hi = r - min(centres), size - r - max(centres)  # lo <= 0 <= hi when the group fits
    room = hi - lo
    t = np.arange(num_frames, dtype=np.float64)  # (T,)
    if room <= 0:
        return np.zeros(num_frames)  # wider than the frame: it cannot move
    u = np.clip(-lo, 0.0, room) + sign * spec.speed * t  # (T,) unfolded, 0 = at the low wall
    m = np.mod(u, 2 * room)  # (T,)
    return lo + np.where(m <= room, m, 2 * room - m)  # (T,)


def _shot_lengths(rng: np.random.Generator, num_frames: int, num_shots: int) -> list[int]:
    """Split num_frames into shots of at least num_frames // (num_shots + 1) frames each."""
    min_len = num_frames // (num_shots + 1)
    extra = rng.multinomial(num_frames - min_len * num_shots, [1 / num_shots] * num_shots)
    return [int(min_len + e) for e in extra]


def _plan(cfg: SourceConfig) -> list[str | None]:
    """Per item: None (single shot), "multishot", a bad kind, or "still" (an image). Bad
    kinds are dealt round-robin, so each appears once bad_fraction * num_videos >=
    len(bad_kinds); stills come from what is left after the bad and multi-shot ones."""
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
    n_still = min(n - n_bad - n_multi, int(cfg.stills * n + 0.5))
    for i in order[n_bad + n_multi : n_bad + n_multi + n_still]:
        plan[i] = "still"
    return plan


def _make_video(cfg: SourceConfig, index: int, kind: str | None) -> tuple[bytes, dict]:
    """One video's bytes and manifest row (without id/path)."""
    rng = np.random.default_rng([cfg.seed, index])
    num_frames = max(1, round(cfg.fps * cfg.seconds))
    height, width = cfg.height, cfg.width
    num_shots = int(rng.integers(2, 4)) if kind == "multishot" else 1
    specs = [sample_spec(rng, motion=cfg.motion)]
    for _ in range(num_shots - 1):
        specs.append(sample_spec(rng, avoid_background=specs[-1].background, motion=cfg.motion))
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


def _make_still(cfg: SourceConfig, index: int) -> tuple[bytes, dict]:
    """One still's PNG bytes and manifest row (without id/path): a motionless spec, one frame."""
    rng = np.random.default_rng([cfg.seed, index])
    spec = replace(sample_spec(rng, motion=cfg.motion), speed=0)
    frame = render(spec, 1, cfg.height, cfg.width)[0]  # (H, W, 3)
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, "PNG")
    shot = {"start": 0, "end": 1, "caption": caption(spec), "attributes": spec.to_dict()}
    row = {
        "kind": "image",
        "caption": shot["caption"],
        "attributes": shot["attributes"],
        "num_frames": 1,
        "fps": float(cfg.fps),
        "width": cfg.width,
        "height": cfg.height,
        "shots": [shot],
        "cuts": [],
        "bad_kind": None,
        "expected": "keep",
    }
    return buf.getvalue(), row


def _write_atomic(path: str, data: bytes) -> None:
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def generate(cfg: SourceConfig, out_dir: str | os.PathLike) -> list[dict]:
    """Write out_dir/videos/vid-NNNNNN.{mp4,json} (stills: out_dir/images/img-NNNNNN.{png,json})
    and out_dir/manifest.jsonl (written last, so its presence means the set is complete);
    return the rows.

    For unreadable bad kinds the row still describes the video that was
    rendered before it was broken; `bad_kind` and `expected` say what happened.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(os.path.join(out_dir, "videos"), exist_ok=True)
    rows = []
    for index, kind in enumerate(_plan(cfg)):
        if kind == "still":
            data, row = _make_still(cfg, index)
            sub, vid, ext = "images", f"img-{index:06d}", "png"
            os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
        else:
            data, row = _make_video(cfg, index, kind)
            sub, vid, ext = "videos", f"vid-{index:06d}", "mp4"
        row = {"id": vid, "path": f"{sub}/{vid}.{ext}", **row}
        _write_atomic(os.path.join(out_dir, row["path"]), data)
        _write_atomic(os.path.join(out_dir, sub, f"{vid}.json"), json.dumps(row).encode())
        rows.append(row)
    lines = "".join(json.dumps(row) + "\n" for row in rows)
    _write_atomic(os.path.join(out_dir, "manifest.jsonl"), lines.encode())
    return rows
