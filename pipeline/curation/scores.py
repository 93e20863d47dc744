"""Per-clip CPU scores and the filters over them.

    frames (T, h, w, 3) uint8 RGB, the clip's consecutive low-res frames
    keyframes (K, H, W, 3) uint8 RGB, optional: a few larger frames (e.g. the ones decoded for CLIP)
        --cpu_scores--> {"seconds", "motion", "jitter", ...: float}
        --apply_filters--> (reason, detail) or None

Every enabled score is computed and returned whether or not it filters, so the manifest holds
all of them and a threshold can be changed later without rescoring. Model-based scores
(``aesthetic``, ``clip_score``, from ``pipeline.curation.embed``) are filtered here too: `apply_filters`
checks whichever configured scores the dict holds.

What each score measures (the unit is part of the name's contract):

- ``seconds``, ``num_frames``; ``width``, ``height``, ``short_side``, ``long_side`` (source pixels);
  ``aspect`` = width / height of the source.
- ``motion``: mean Farneback optical-flow magnitude over all pixels, in percent of the frame
  width per second (so it does not depend on the scoring resolution or the frame rate; frames
  decoded square measure vertical motion against the height).
  Frozen clips score ~0 (their frame pairs are still, see below), our slowest synthetic clips
  (1 px/frame of a 64 px frame at 8 fps, one small object) ~2.
- ``jitter``: how much consecutive flow fields disagree in direction, 0-1: for each pair of
  consecutive flows a, b, averaged over 4 x 4 cells of the frame,
  ``sum(|a||b| - a.b) / (2 * (sum(|a||b|) + eps))`` (magnitude-weighted over cells), averaged
  over pairs. Smooth motion scores < 0.1 (our synthetic clips, fast ones, 1 px/frame ones and
  objects wrapping around the frame edge included); camera shake and shuffled frames point the
  flow back and forth (0.3-0.85). The eps floor keeps frozen clips, whose flow is codec noise,
  near 0. The cells average out the flow's own noise inside flat regions and still keep
  regions that move in different directions apart.
- ``flow_residual``: median absolute difference (0-255) between a frame and the next frame
  warped back by the flow, i.e. the change that motion does not explain. The median ignores
  edges the flow misplaces (a mean does not: it mixes contrast into the score) and measures
  what happens everywhere: added noise and flicker score > 2 at 64 px, clean synthetic motion
  ~0, but so does real motion the flow gets wrong (fast pans past near objects, motion blur,
  occlusion: 2-6 on the real clips in ``tests/media``). Recorded, not filtered by default.
- ``noise``: the noise level (sigma-like, 0-255): the smaller of two upper bounds on it, the
  flow residual (inflated by motion the flow gets wrong) and `flat_noise` of the flow frames
  (the high-frequency level of their flattest blocks; inflated by texture everywhere). Added
  noise raises both; real footage rarely raises both at once. Real clips score 0.4-2.5,
  sigma-15 noise added to our 64 px synthetic clips 4.3-7.7 (after H.264).
- ``sharpness``: variance of the Laplacian of the luma (the classic blur measure; content- and
  resolution-dependent, so it is computed on the keyframes when given and has no default
  threshold).
- ``brightness``: mean luma 0-255. ``black_fraction``: fraction of frames in which at least
  ``black_pixels`` of the pixels are darker than ``black_luma`` (ffmpeg blackdetect's rule).
  99% by default rather than blackdetect's 98%: a small shape on a black background is content.
- ``text``: fraction of the frame covered by text-like blocks (mean over keyframes). Text is
  thin high-contrast strokes with thin gaps, in horizontal runs. The top-hat and black-hat
  transforms (a ~w/32 px square) keep exactly the structures thinner than that, bright or
  dark: strokes *and* the gaps between letters, so a word becomes a dense block, while a
  filled shape, wider than the kernel, disappears but for slivers at its corners. Blocks
  closed horizontally into words count when they are wider than tall and at least 38% filled
  (word blocks fill >= 0.39 on our captions, corner slivers <= 0.36). Caption text is a few
  percent of the frame height, so it needs keyframes of >= ~128 px; blocks under 6 px high are
  ignored, and so are blocks cut by the frame's top or bottom edge (texture such as grass at
  the bottom of a shot, which scored 0.2 of the frame; captions and tickers are inset), and
  frames under TEXT_MIN_SIZE px get no text score at all. It is a heuristic: real footage
  scores up to ~0.03 (texture, in-scene signs), one subtitle line 0.0035-0.012, so the
  default bound drops dense overlays only. Curation therefore
  scores text on keyframes decoded at up to 640 px (and small sources upscaled to
  TEXT_MIN_SIZE), never on its 160 px scoring frames, so every clip's manifest has it.

A pair of frames whose mean absolute difference is under STILL_DIFF (0.3 levels: codec noise
on a still image, <= 0.15 on our frozen clips) counts as still, with zero flow: Farneback
invents flow from such faint changes in flat regions (a frozen clip read 1.45 at 32 px, more
than our slowest real motion). Optical flow runs on max(R, G, B) (`value_channel`, not luma: see there) at ``flow_size`` px
(frames are area-downscaled to it), on ``flow_anchors`` evenly spaced frame triplets (two
consecutive flows each, which jitter compares), so the cost is fixed per clip instead of
growing with its length. 64 px is the intended size: at 32 px noise is averaged away (the
residual of sigma-10 noise drops from >2.5 to ~1-3) and slow motion gets jittery. Cost on a
10 s 360p clip (300 frames at 64 px): ~0.2-0.4x of decoding those frames, most of it the
24 Farneback flows; `flow_anchors` trades it against jitter's reliability (8 anchors missed
1 in 12 shaken clips).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional

import cv2
import numpy as np

from data.checks import check_ranges


@dataclass
class Bounds:
    """One score: computed and recorded when `enabled`; a clip outside [min, max] is rejected
    when `filter` is on (None = no bound on that side)."""

    enabled: bool = True
    filter: bool = True
    min: Optional[float] = None
    max: Optional[float] = None

    def __post_init__(self) -> None:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min must be <= max, got min={self.min}, max={self.max}")


STILL_DIFF = 0.3  # frame pairs differing by less (mean abs, 0-255) are still: codec noise, no motion
STILL_MAX = 24  # ... unless some pixel changes by at least this much (a small moving object)
JITTER_GRID = 4  # jitter compares the mean flow of 4 x 4 cells (regions moving apart stay apart)
TEXT_MIN_SIZE = 96  # text is not scored on smaller frames (and is then absent from the scores)


def _b(**kw):
    return field(default_factory=lambda: Bounds(**kw))


@dataclass
class ScoreConfig:
    # ---- scores and their filters (see the module docstring for units)
    seconds: Bounds = _b(min=1.0)
    short_side: Bounds = _b(min=32)
    long_side: Bounds = _b(max=4096)
    aspect: Bounds = _b(min=0.4, max=2.5)
    black_fraction: Bounds = _b(max=0.5)
    brightness: Bounds = _b(max=245.0)
    motion: Bounds = _b(min=0.5)
    # Where each default comes from: README, Curation, the scores table. Real clips
    # (tests/media) must pass, the synthetic bad inputs must not.
    jitter: Bounds = _b(max=0.35)
    flow_residual: Bounds = _b()  # recorded; `noise` filters (real motion inflates the residual)
    noise: Bounds = _b(max=3.5)
    sharpness: Bounds = _b()
    text: Bounds = _b(max=0.05)
    aesthetic: Bounds = _b()  # from pipeline.curation.embed
    clip_score: Bounds = _b()  # from pipeline.curation.embed
    # ---- how the scorers run
    flow_size: int = 64  # optical flow on frames area-downscaled to this long side
    flow_anchors: int = 12  # frame triplets per clip (2 consecutive flows each)
    black_luma: float = 24.0  # a pixel darker than this is black
    black_pixels: float = 0.99  # a frame with at least this fraction of black pixels is black
    # Text detection on keyframes downscaled to this long side: one subtitle line (cv2 font
    # scale 0.5 on 640x360) scored 0.0035-0.012 at 640 px, sometimes 0 at 384 and always 0 at 160.
    text_size: int = 640
    sample_frames: int = 4  # frames for sharpness/text when no keyframes are given

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, dict):  # from YAML without structured configs
                setattr(self, f.name, Bounds(**v))
        check_ranges(self, flow_size=">= 1", flow_anchors=">= 1", black_luma=">= 0",
                     black_pixels="in [0, 1]", text_size=">= 1", sample_frames=">= 1")


# (score, reason below min, reason above max), in the order filters are checked: cheap and
# structural first, so a clip gets the most basic reason that applies.
FILTERS = (
    ("seconds", "too_short", "too_long"),
    ("short_side", "low_resolution", "low_resolution"),
    ("long_side", "high_resolution", "high_resolution"),
    ("aspect", "bad_aspect_ratio", "bad_aspect_ratio"),
    ("black_fraction", "black_frames", "black_frames"),
    ("brightness", "too_dark", "too_bright"),
    ("motion", "low_motion", "high_motion"),
    ("jitter", "jittery", "jittery"),
    ("flow_residual", "noisy", "noisy"),
    ("noise", "noisy", "noisy"),
    ("sharpness", "blurry", "oversharpened"),
    ("text", "text_overlay", "text_overlay"),
    ("aesthetic", "low_aesthetic", "high_aesthetic"),
    ("clip_score", "caption_mismatch", "caption_mismatch"),
)


def apply_filters(scores: dict[str, float], cfg: ScoreConfig) -> Optional[tuple[str, str]]:
    """The first failed filter as (reason, detail), or None when the clip passes. Scores that
    are missing from `scores` (not computed yet, e.g. before the embedding stage) are skipped."""
    for key, low, high in FILTERS:
        b: Bounds = getattr(cfg, key)
        if not (b.enabled and b.filter) or scores.get(key) is None:
            continue
        v = float(scores[key])
        if b.min is not None and v < b.min:
            return low, f"{key} {v:.4g} < {b.min}"
        if b.max is not None and v > b.max:
            return high, f"{key} {v:.4g} > {b.max}"
    return None


# ----------------------------------------------------------------------------- scorers


def luma(frames: np.ndarray) -> np.ndarray:
    """(T, h, w, 3) uint8 RGB -> (T, h, w) uint8 luma (BT.601, as cv2)."""
    t, h, w, _ = frames.shape
    return cv2.cvtColor(np.ascontiguousarray(frames).reshape(t * h, w, 3), cv2.COLOR_RGB2GRAY).reshape(t, h, w)


def downscale(gray: np.ndarray, size: int) -> np.ndarray:
    """(T, h, w) -> (T, h', w') with the long side at most `size` (area interpolation)."""
    t, h, w = gray.shape
    if max(h, w) <= size:
        return gray
    s = size / max(h, w)
    hw = (max(1, round(w * s)), max(1, round(h * s)))  # cv2 wants (width, height)
    return np.stack([cv2.resize(g, hw, interpolation=cv2.INTER_AREA) for g in gray])


def farneback(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Dense flow a -> b, (h, w) uint8 each -> (h, w, 2) float32 (dx, dy): a(y, x) ~ b(y+dy, x+dx).
    The averaging window is a quarter of the frame (so the result does not depend on the
    resolution): flat-coloured objects give the flow nothing to hold on to inside them, and a
    w/8 window left their flow wandering from frame to frame (jitter up to 0.35 on smooth
    1 px/frame motion at 64 px, against <= 0.11 with w/4)."""
    win = max(5, (max(a.shape) // 4) | 1)
    return cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, win, 3, 5, 1.1, 0)


def motion_scores(frames: np.ndarray, fps: float, size: int = 64, anchors: int = 12) -> dict[str, float]:
    """frames: (T, h, w, 3) uint8 RGB, consecutive -> motion, jitter, flow_residual, noise. Only the
    frames the anchors use are converted (`value_channel`) and downscaled to `size`."""
    t = len(frames)
    if t < 2:
        return {"motion": 0.0, "jitter": 0.0, "flow_residual": 0.0, "noise": 0.0}
    starts = np.unique(np.linspace(0, max(t - 3, 0), anchors).round().astype(int))
    used = sorted({int(j) for i in starts for j in (i, i + 1, i + 2) if j < t})
    value = dict(zip(used, downscale(value_channel(frames[used]), size)))  # j -> (h', w') uint8
    h, w = value[used[0]].shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)  # (h, w) each
    flows: dict[int, np.ndarray] = {}  # j -> flow j -> j+1, (h, w, 2)
    residual: list[float] = []

    def flow(j: int) -> np.ndarray:
        if j not in flows:
            a, b = value[j], value[j + 1]
            d = cv2.absdiff(a, b)
            # Still: only codec noise. The max catches a small slow object that moves the
            # frame's mean difference by less than noise does.
            if d.mean() < STILL_DIFF and d.max() < STILL_MAX:
                flows[j] = np.zeros((h, w, 2), np.float32)
                residual.append(float(np.median(cv2.absdiff(a, b))))
                return flows[j]
            f = flows[j] = farneback(a, b)  # (h, w, 2)
            warped = cv2.remap(b, xs + f[..., 0], ys + f[..., 1], cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_REPLICATE)  # (h, w) ~ a
            residual.append(float(np.median(np.abs(warped.astype(np.float32) - a))))
        return flows[j]

    cells = (JITTER_GRID, JITTER_GRID)
    eps = 0.01 * JITTER_GRID**2  # (0.1 px)^2 per cell: flow below this is codec noise, not a direction
    jitter = []
    for i in starts:
        a = flow(i)
        if i + 2 < t:
            a = cv2.resize(a, cells, interpolation=cv2.INTER_AREA)  # (g, g, 2) mean flow per cell
            b = cv2.resize(flow(i + 1), cells, interpolation=cv2.INTER_AREA)  # (g, g, 2)
            ab = float((np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)).sum())
            jitter.append((ab - float((a * b).sum())) / (2.0 * (ab + eps)))
    mean_mag = float(np.mean([np.linalg.norm(f, axis=-1).mean() for f in flows.values()]))  # px/frame
    res = float(np.mean(residual))
    return {
        "motion": 100.0 * mean_mag / w * fps,
        "jitter": float(np.mean(jitter)) if jitter else 0.0,
        "flow_residual": res,
        "noise": min(res, float(np.median([flat_noise(value[int(i)]) for i in starts]))),
    }


NOISE_BLOCK = 8  # px blocks (of the flow frames) whose high-frequency level estimates the noise
NOISE_QUANTILE = 0.1  # ... in the flattest tenth of them
_IMMERKAER = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)


def flat_noise(gray: np.ndarray) -> float:
    """(h, w) uint8 -> the noise level (sigma, 0-255) of the flattest blocks of the frame.

    Immerkaer's fast estimator (the mean absolute response to a mask that cancels flat and
    linear intensity, x sqrt(pi/2) / 6, per NOISE_BLOCK px block), read in the flattest
    NOISE_QUANTILE of the blocks: texture raises a block's value like noise does, but few real
    frames are textured everywhere, while added noise is."""
    r = np.abs(cv2.filter2D(gray.astype(np.float32), -1, _IMMERKAER))[1:-1, 1:-1]  # (h-2, w-2)
    b = NOISE_BLOCK
    h, w = (r.shape[0] // b) * b, (r.shape[1] // b) * b
    if h == 0 or w == 0:
        return float(r.mean() * np.sqrt(np.pi / 2) / 6) if r.size else 0.0
    blocks = r[:h, :w].reshape(h // b, b, w // b, b).mean(axis=(1, 3))  # (h/b, w/b)
    return float(np.quantile(blocks, NOISE_QUANTILE) * np.sqrt(np.pi / 2) / 6)


def value_channel(frames: np.ndarray) -> np.ndarray:
    """(T, h, w, 3) uint8 RGB -> (T, h, w) uint8 max(R, G, B) (HSV's V), the image optical flow
    runs on. Not luma: a saturated object can have the luma of its background (magenta on our
    synthetic gray differs by 5 levels) and would be invisible to the flow."""
    return np.maximum(np.maximum(frames[..., 0], frames[..., 1]), frames[..., 2])  # (T, h, w)


def sharpness(gray: np.ndarray) -> float:
    """(K, h, w) uint8 -> mean variance of the Laplacian."""
    return float(np.mean([cv2.meanStdDev(cv2.Laplacian(g, cv2.CV_16S))[1][0, 0] ** 2 for g in gray]))


def black_fraction(gray: np.ndarray, black_luma: float, black_pixels: float) -> float:
    """(T, h, w) uint8 -> fraction of frames with >= black_pixels of their pixels below black_luma."""
    dark = (gray < black_luma).mean(axis=(1, 2))  # (T,)
    return float((dark >= black_pixels).mean())


def text_area(gray: np.ndarray) -> float:
    """(h, w) uint8 luma -> fraction of the frame covered by text-like blocks."""
    h, w = gray.shape
    k = cv2.getStructuringElement(cv2.MORPH_RECT, (max(5, w // 32) | 1,) * 2)
    detail = np.maximum(cv2.morphologyEx(gray, cv2.MORPH_TOPHAT, k),
                        cv2.morphologyEx(gray, cv2.MORPH_BLACKHAT, k))  # (h, w) thin structures
    marks = (detail > 60).astype(np.uint8)  # strokes and the gaps between them
    join = cv2.getStructuringElement(cv2.MORPH_RECT, (max(3, w // 40), 1))
    words = cv2.morphologyEx(marks, cv2.MORPH_CLOSE, join)  # letters joined into words
    _, _, stats, _ = cv2.connectedComponentsWithStats(words, connectivity=8)
    area = 0
    for _, y, bw, bh, pixels in stats[1:]:
        if y == 0 or y + bh == h:  # cut by the top or bottom edge: texture (grass), not a caption
            continue
        if max(6, 0.015 * h) <= bh <= 0.25 * h and bw >= 1.5 * bh and pixels >= 0.38 * bw * bh:
            area += bw * bh
    return area / (h * w)


def _sample(n: int, k: int) -> np.ndarray:
    return np.unique(np.linspace(0, n - 1, min(k, n)).round().astype(int))


def cpu_scores(frames: np.ndarray, fps: float, meta: dict, cfg: ScoreConfig,
               keyframes: Optional[np.ndarray] = None) -> dict[str, float]:
    """All enabled CPU scores of one clip: `frame_scores`, then `keyframe_scores`.

    frames: (T, h, w, 3) uint8 RGB, consecutive frames of the clip at `fps` (if you decode every
    k-th frame, pass fps / k). meta: the source's ``width`` and ``height`` (pixels) and optionally
    the clip's ``num_frames`` at `fps` (default T). keyframes: (K, H, W, 3) uint8, optional larger
    frames for sharpness and text; by default `sample_frames` of `frames` are used. Text needs
    frames of at least TEXT_MIN_SIZE px and is left out of the result on smaller ones.
    """
    out = frame_scores(frames, fps, meta, cfg)
    keys = keyframes if keyframes is not None else frames[_sample(len(frames), cfg.sample_frames)]
    out.update(keyframe_scores(keys, cfg))
    return out


def frame_scores(frames: np.ndarray, fps: float, meta: dict, cfg: ScoreConfig) -> dict[str, float]:
    """The scores of `cpu_scores` that need the clip's frames (shape, brightness, black frames,
    motion), not its keyframes."""
    on = lambda key: getattr(cfg, key).enabled  # noqa: E731
    out: dict[str, float] = {}
    num_frames = int(meta.get("num_frames", len(frames)))
    width, height = int(meta["width"]), int(meta["height"])
    shape = {"seconds": num_frames / fps, "short_side": min(width, height),
             "long_side": max(width, height), "aspect": width / height}
    out.update({"num_frames": num_frames, "width": width, "height": height})
    out.update({k: float(v) for k, v in shape.items() if on(k)})
    if on("brightness") or on("black_fraction"):
        gray = luma(frames)  # (T, h, w)
        if on("brightness"):
            out["brightness"] = float(gray.mean())
        if on("black_fraction"):
            out["black_fraction"] = black_fraction(gray, cfg.black_luma, cfg.black_pixels)
    if on("motion") or on("jitter") or on("flow_residual") or on("noise"):
        m = motion_scores(frames, fps, cfg.flow_size, cfg.flow_anchors)
        out.update({k: v for k, v in m.items() if on(k)})
    return out


def keyframe_scores(keyframes: np.ndarray, cfg: ScoreConfig) -> dict[str, float]:
    """keyframes: (K, H, W, 3) uint8 RGB -> the enabled sharpness and text scores."""
    on = lambda key: getattr(cfg, key).enabled  # noqa: E731
    out: dict[str, float] = {}
    if on("sharpness") or on("text"):
        keys = luma(keyframes)  # (K, H, W)
        if on("sharpness"):
            out["sharpness"] = sharpness(keys)
        if on("text") and max(keys.shape[1:]) >= TEXT_MIN_SIZE:
            out["text"] = float(np.mean([text_area(g) for g in downscale(keys, cfg.text_size)]))
    return out
