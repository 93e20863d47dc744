"""Probes: does a sampled video show what its synthetic prompt asked for?

The built-in synthetic source (``data.synthetic``) captions every clip exactly ("two red
circles moving left on a black background"), so a sample drawn for such a prompt can be
checked attribute by attribute, which is what the critiques of video models are about:
the colour, the shape, the motion direction, the number of objects and whether it stays
constant across frames, and temporal flicker.

    prompt --parse_prompt--> Expected(count, color, shape, direction, background)
    video (T, H, W, 3) uint8 --measure--> Measurement --compare--> pass/fail per probe

How each attribute is measured, and why that way:

- **Background**: the per-frame median colour (objects cover under 15% of a frame), nearest
  colour of the source's background palette.
- **Object colour**: the per-channel median of the pixels far from the background (the upper
  half of the pixels more than ``FG_MIN_DIST`` away), nearest colour of the shape palette.
  Medians keep the blended edge pixels of small objects (and mp4's chroma subsampling) out.
- **Foreground**: each pixel's position on the line from the background to the object colour,
  ``s in [0, 1]`` (a soft coverage map); ``s > 0.5`` is foreground. Halfway between the two
  colours is where an edge pixel is half covered, so the mask keeps the drawn geometry. The
  line is taken in YCbCr with chroma weighted 10x less than luma: samples are read back from
  mp4 (yuv420), whose chroma has half the resolution, so chroma edges are two pixels wide
  and move in two-pixel steps; where an object differs from its background mostly in chroma
  (magenta on gray) chroma still carries the signal.
- **Objects per frame**: 4-connected components of the mask on the torus (the source's motion
  wraps around the frame edges, so an object leaving on the right is the same object as the
  part entering on the left), ignoring blobs below ``MIN_AREA_FRAC`` of the smallest object.
  ``count`` passes when every frame shows the prompt's number; ``count_constant`` when every
  frame shows the same, non-zero number (the "objects that change number mid-clip" critique).
- **Shape**: each component is compared (soft IoU) with the three shapes drawn by the
  source's own equations at the component's centroid, over a small grid of sub-pixel offsets
  and scales, rendered both as the source draws (pixel centres) and anti-aliased (what a
  larger clip resized down looks like, as training sees 64-pixel clips at 32), each put
  through the same yuv420 chroma loss as the video; the components of up to
  ``SHAPE_FRAMES`` frames vote. Templates beat hand-made features (fill ratio, corners) at
  32 pixels, where a 6-pixel circle and square differ by four corners.
- **Motion direction**: the circular cross-correlation of coverage maps k = 1 and 2 frames
  apart (summed over all such pairs) peaks at k times the per-frame shift; the peaks are
  refined to sub-pixel and fitted. The source moves every object by the same shift and
  wraps around, so frame t+k is frame t circularly shifted: exactly what the FFT correlation
  measures, with no tracking or matching of objects. (Unnormalised: phase correlation
  whitens every frequency and lets mp4's static noise pattern win.) A prompt without
  "moving" expects less than ``MIN_SPEED`` pixels per frame.
- **Motion axis** (for bouncing prompts, "bouncing left and right"): the same correlation per
  pair of frames 2 apart, alone; the axis whose mean |shift| is larger (``still`` below
  ``MIN_SPEED``). A bouncing clip's pairs before and after a reversal shift in opposite
  directions, so their sum (the direction above) can read ``still`` or pick either side; each
  pair alone still moves along the axis. A bouncing prompt's direction probe passes when the
  clip's reading is on its axis: the direction, or the axis where the direction is ambiguous
  (``still`` / ``diagonal``). A still clip or motion along the other axis fails.
- **Flicker**: the mean absolute frame-to-frame change of the background's mean luminance
  (0-255). A static scene's background does not change at all; mp4 adds well under a level.

`tests/test_probes.py` validates every detector on ground-truth clips rendered by the source
at 32x32 and 64x64, and at 64x64 decoded at 32x32 as the loader does (half-pixel speeds),
all passed through mp4 (>= 98% correct each), and checks they fail on the same clips against
wrong prompts and on videos that break them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import cv2
import numpy as np

from data.prompts import Expected, parse_prompt
from data.synthetic import BACKGROUNDS, COLORS, SHAPES, axis_of

PROBES = ("background", "color", "shape", "direction", "count", "count_constant", "flicker")
FG_MIN_DIST = 40.0  # RGB distance from the background beyond which a pixel may be an object
MIN_AREA_FRAC = 0.3  # components smaller than this fraction of a triangle's area are noise
MIN_SPEED = 0.25  # pixels per frame below which a clip counts as still
SHAPE_FRAMES = 8  # frames (evenly spaced) whose components vote on the shape
MAX_FLICKER = 3.0  # mean |frame-to-frame change| of background luminance, in 0-255 levels
_LUMA = np.array([0.299, 0.587, 0.114])
_YCBCR = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
# Coverage weighs chroma differences 10x less than luma ones: mp4 (yuv420) keeps chroma at half
# resolution, so a chroma edge is two pixels wide and moves in 2-pixel steps. Where an object
# and its background differ mostly in chroma (magenta on gray), chroma still dominates.
_COVERAGE_WEIGHTS = np.array([1.0, 0.1, 0.1])

# ----- measuring ------------------------------------------------------------------------------
def _nearest(rgb: np.ndarray, palette) -> str:
    names, colors = zip(*palette)
    d = np.linalg.norm(np.asarray(colors, np.float64) - rgb, axis=1)  # (P,)
    return names[int(np.argmin(d))]


def torus_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a (H, W) bool mask whose edges wrap around.
    Returns labels (H, W) int (0 = background, 1..n) and n."""
    n, lab = cv2.connectedComponents(mask.astype(np.uint8), connectivity=4)  # (H, W) int32
    parent = list(range(n))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in [*zip(lab[0], lab[-1]), *zip(lab[:, 0], lab[:, -1])]:  # pixels across the seams
        if a and b:
            parent[find(int(a))] = find(int(b))
    roots = np.array([find(i) for i in range(n)])  # (n,)
    uniq = np.unique(roots[1:])
    remap = np.zeros(n, np.int32)
    remap[1:] = np.searchsorted(uniq, roots[1:]) + 1
    return remap[lab], len(uniq)  # (H, W)


def _shape_sdf(shape: str, oy: np.ndarray, ox: np.ndarray, r) -> np.ndarray:
    """Signed distance (pixels, negative inside) to the source's shapes (`data.synthetic.render`:
    circle, square, triangle with its apex up), from offsets to the shape's centre. ``<= 0`` is
    exactly the source's mask."""
    if shape == "circle":
        return np.sqrt(oy**2 + ox**2) - r
    if shape == "square":
        return np.maximum(np.abs(oy), np.abs(ox)) - r
    return np.maximum(np.abs(oy) - r, (2 * np.abs(ox) - oy - r) / np.sqrt(5))  # triangle


_OFFSETS = np.linspace(-0.5, 0.5, 5)  # sub-pixel offsets searched around the centroid
_SCALES = np.array([0.85, 1.0, 1.15])  # object sizes searched around the source's


def _chroma_420(x: np.ndarray) -> np.ndarray:
    """What yuv420 does to a chroma plane: 2x2 block means, repeated back to full size.
    x: (..., K, K) with K even and the window aligned to even frame coordinates."""
    blocks = (x[..., 0::2, 0::2] + x[..., 1::2, 0::2] + x[..., 0::2, 1::2] + x[..., 1::2, 1::2]) / 4
    out = np.empty_like(x)  # (..., K, K)
    for a in (0, 1):
        for b in (0, 1):
            out[..., a::2, b::2] = blocks  # (..., K/2, K/2)
    return out


def _templates(shape: str, K: int, cy: float, cx: float, r: float) -> np.ndarray:
    """The shape around window position (cy, cx) (pixel indices), over the offset and scale
    grid, in two renderings: sampled at pixel centres (as the source draws it) and as area
    coverage, ``clip(0.5 - distance)`` (a clip drawn larger and resized down, as the loader
    feeds training) -> (2, O, O, S, K, K) in [0, 1]."""
    down = 1 / 3 if shape == "triangle" else 0.0  # a triangle's centroid is r/3 below its centre
    g = np.arange(K, dtype=np.float64) + 0.5  # pixel centres
    dy = _OFFSETS[:, None, None, None, None]  # (O, 1, 1, 1, 1)
    dx = _OFFSETS[None, :, None, None, None]  # (1, O, 1, 1, 1)
    rr = (r * _SCALES)[None, None, :, None, None]  # (1, 1, S, 1, 1)
    sd = _shape_sdf(shape, g[:, None] - (cy + 0.5 + dy - down * rr), g[None, :] - (cx + 0.5 + dx),
                    rr)  # (O, O, S, K, K)
    return np.stack([(sd <= 0).astype(np.float64), np.clip(0.5 - sd, 0.0, 1.0)])  # (2, O, O, S, K, K)


def _classify_shape(cov: np.ndarray, cy: float, cx: float, r: float, luma_share: float) -> tuple[str, float]:
    """cov: (K, K) soft coverage of one component, in a window aligned to even frame
    coordinates; (cy, cx): its centroid in window pixel indices. Each template goes through
    the same loss as the video did (yuv420 chroma, weighted by 1 - luma_share, the chroma
    share of the coverage signal). Returns the best-matching shape and its soft IoU."""
    best, best_iou = SHAPES[0], -1.0
    for shape in SHAPES:
        tmpl = _templates(shape, cov.shape[0], cy, cx, r)  # (2, O, O, S, K, K)
        tmpl = luma_share * tmpl + (1 - luma_share) * _chroma_420(tmpl)  # (2, O, O, S, K, K)
        inter = np.minimum(tmpl, cov).reshape(*tmpl.shape[:4], -1).sum(-1)  # (2, O, O, S)
        union = np.maximum(tmpl, cov).reshape(*tmpl.shape[:4], -1).sum(-1)  # (2, O, O, S)
        iou = float((inter / np.maximum(union, 1e-9)).max())
        if iou > best_iou:
            best, best_iou = shape, iou
    return best, best_iou


@dataclass
class Measurement:
    background: str
    background_rgb: list[float]
    color: Optional[str]  # None: nothing stands out from the background
    color_rgb: Optional[list[float]]
    counts: list[int]  # objects per frame
    shape: Optional[str]  # majority vote of the components
    shape_votes: dict[str, int]
    shift: Optional[list[float]]  # (dy, dx) pixels per frame; None for a single frame
    direction: Optional[str]  # left | right | up | down | still | diagonal | None
    axis: Optional[str]  # horizontal | vertical | still | diagonal, frame pair by pair; None: 1 frame
    flicker: float  # mean |change| of background luminance between frames (0-255)
    flicker_global: float  # the same for the whole frame's mean luminance


def measure(video: np.ndarray) -> Measurement:
    """Measure a (T, H, W, 3) uint8 video's attributes (see the module docstring)."""
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"video must be (T, H, W, 3), got {video.shape}")
    v = video.astype(np.float64)  # (T, H, W, 3)
    T, H, W, _ = v.shape
    bg_t = np.median(v.reshape(T, H * W, 3), axis=1)  # (T, 3) per-frame background
    bg = np.median(bg_t, axis=0)  # (3,)
    dist = np.linalg.norm(v - bg_t[:, None, None, :], axis=-1)  # (T, H, W)
    far = dist > FG_MIN_DIST  # (T, H, W)
    color = color_rgb = None
    s = np.zeros((T, H, W))  # soft coverage by the object colour
    luma_share = 1.0
    if far.any():
        strong = far & (dist >= np.median(dist[far]))  # (T, H, W) object cores, not edges
        obj = np.median(v[strong], axis=0)  # (3,)
        color, color_rgb = _nearest(obj, COLORS), obj.round(1).tolist()
        axis = _YCBCR @ (obj - bg)  # (3,) in YCbCr
        diff = (v - bg_t[:, None, None, :]) @ _YCBCR.T  # (T, H, W, 3)
        wa = _COVERAGE_WEIGHTS * axis  # (3,)
        s = np.clip((diff @ wa) / max(wa @ axis, 1e-9), 0, 1)  # (T, H, W)
        luma_share = float(wa[0] * axis[0] / max(wa @ axis, 1e-9))

    r = max(1.0, min(H, W) / 10)  # the source's half extent
    min_area = MIN_AREA_FRAC * 2 * r * r  # a fraction of the triangle, the smallest shape
    counts, votes, fit = [], dict.fromkeys(SHAPES, 0), dict.fromkeys(SHAPES, 0.0)
    k = int(np.ceil(r * max(_SCALES))) + 3
    shape_frames = set(np.linspace(0, T - 1, min(T, SHAPE_FRAMES)).round().astype(int).tolist())
    for t in range(T):
        lab, n = torus_components(s[t] > 0.5)  # (H, W)
        areas = np.bincount(lab.ravel(), minlength=n + 1)  # (n+1,)
        kept = [i for i in range(1, n + 1) if areas[i] >= min_area]
        counts.append(len(kept))
        for i in kept if t in shape_frames else ():
            ys, xs = np.nonzero(lab == i)
            ys, xs = _unwrap(ys, H), _unwrap(xs, W)
            w = s[t][ys % H, xs % W]  # (P,)
            cy, cx = float((ys * w).sum() / w.sum()), float((xs * w).sum() / w.sum())
            y0, x0 = (int(cy) - k) // 2 * 2, (int(cx) - k) // 2 * 2  # even: chroma-block aligned
            iy, ix = (y0 + np.arange(2 * k + 2)) % H, (x0 + np.arange(2 * k + 2)) % W  # (K,), (K,)
            win_lab = lab[np.ix_(iy, ix)]  # (K, K)
            cov = s[t][np.ix_(iy, ix)] * ((win_lab == i) | (win_lab == 0))  # (K, K) others cut out
            shape, iou = _classify_shape(cov, cy - y0, cx - x0, r, luma_share)
            votes[shape] += 1
            fit[shape] += iou
    shape = (max(SHAPES, key=lambda name: (votes[name], fit[name]))  # ties: the better fit
             if any(votes.values()) else None)

    shift = direction = axis = None
    if T > 1:
        shift = _velocity(s)
        direction = _direction(*shift)
        axis = _axis(s)

    luma = v @ _LUMA  # (T, H, W)
    bg_px = s < 0.25  # (T, H, W)
    bg_luma = np.array([luma[t][bg_px[t]].mean() if bg_px[t].any() else luma[t].mean()
                        for t in range(T)])  # (T,)
    flicker = float(np.abs(np.diff(bg_luma)).mean()) if T > 1 else 0.0
    flicker_global = float(np.abs(np.diff(luma.mean(axis=(1, 2)))).mean()) if T > 1 else 0.0
    return Measurement(background=_nearest(bg, BACKGROUNDS), background_rgb=bg.round(1).tolist(),
                       color=color, color_rgb=color_rgb, counts=counts, shape=shape,
                       shape_votes=votes, shift=shift, direction=direction, axis=axis,
                       flicker=round(flicker, 3), flicker_global=round(flicker_global, 3))


def _unwrap(c: np.ndarray, n: int) -> np.ndarray:
    """Coordinates of a component that crosses the seam, made contiguous (beyond n)."""
    if c.min() == 0 and c.max() == n - 1:
        return np.where(c < n // 2, c + n, c)
    return c


def _peak(corr: np.ndarray) -> np.ndarray:
    """Sub-pixel (dy, dx) of a circular correlation's maximum: the argmax, refined by a
    parabola through it and its two neighbours along each axis (wrapping around)."""
    H, W = corr.shape
    py, px = np.unravel_index(int(np.argmax(corr)), corr.shape)
    out = []
    for p, n, line in ((py, H, corr[:, px]), (px, W, corr[py, :])):
        a, b, c = line[(p - 1) % n], line[p], line[(p + 1) % n]
        den = a - 2 * b + c
        off = 0.5 * (a - c) / den if den < 0 else 0.0
        out.append((p + off + n / 2) % n - n / 2)
    return np.array(out)  # (2,)


def _velocity(s: np.ndarray) -> list[float]:
    """(dy, dx) pixels per frame of a coverage video (T, H, W): the shift between frames t and
    t+k (k = 1, 2: correlations summed over all such pairs), fitted as v * k. Lag 2 turns the
    half-pixel steps of a 64-pixel clip shown at 32 pixels into whole ones."""
    F = np.fft.fft2(s)  # (T, H, W)
    lags = [k for k in (1, 2) if k < len(s)]
    shifts = [_peak(np.fft.ifft2((F[k:] * np.conj(F[:-k])).sum(axis=0)).real) for k in lags]  # (2,) each
    v = sum(k * sh for k, sh in zip(lags, shifts)) / sum(k * k for k in lags)  # least squares
    return [round(float(x), 2) for x in v]


def _axis(s: np.ndarray) -> str:
    """The axis a coverage video (T, H, W) moves along, pair by pair: the mean |(dy, dx)| of the
    shifts between frames t and t+k (k = 2, or 1 for two frames), each pair on its own, so
    motion that reverses (a bounce) does not cancel out."""
    k = 2 if len(s) > 2 else 1
    F = np.fft.fft2(s)  # (T, H, W)
    corr = np.fft.ifft2(F[k:] * np.conj(F[:-k])).real  # (T-k, H, W)
    mean = np.abs([_peak(c) for c in corr]).mean(axis=0) / k  # (2,) mean |dy|, |dx| per frame
    if mean.max() < MIN_SPEED:
        return "still"
    if mean[1] > mean[0]:
        return "horizontal"
    return "vertical" if mean[0] > mean[1] else "diagonal"


def motion_axis(m: Measurement) -> Optional[str]:
    """The axis a measurement moves along: its direction's, or where the direction is ambiguous
    (still, diagonal: a bounce's two directions can balance out) the pair-by-pair axis."""
    if m.direction in ("left", "right", "up", "down"):
        return axis_of(m.direction)
    return m.axis


def _direction(dy: float, dx: float) -> str:
    if max(abs(dy), abs(dx)) < MIN_SPEED:
        return "still"
    if abs(dx) > abs(dy):
        return "right" if dx > 0 else "left"
    if abs(dy) > abs(dx):
        return "down" if dy > 0 else "up"
    return "diagonal"


# ----- judging --------------------------------------------------------------------------------
def judge(m: Measurement, e: Expected) -> dict[str, bool]:
    """Pass/fail of every probe in PROBES for a measurement against what was asked."""
    return {
        "background": m.background == e.background,
        "color": m.color == e.color,
        "shape": m.shape == e.shape,
        "direction": (motion_axis(m) == e.axis if e.bounce
                      else m.direction == (e.direction or "still")),
        "count": all(c == e.count for c in m.counts),
        "count_constant": len(set(m.counts)) == 1 and m.counts[0] > 0,
        "flicker": m.flicker <= MAX_FLICKER,
    }


def probe_video(video: np.ndarray, prompt: str) -> dict:
    """Probe a (T, H, W, 3) uint8 video against its prompt.

    Returns {"prompt", "expected" (None when the prompt is not a synthetic caption),
    "measured", "pass" ({probe: bool} for PROBES; empty when there is nothing to compare)}."""
    m = measure(np.asarray(video))
    e = parse_prompt(prompt)
    return {"prompt": prompt, "expected": None if e is None else asdict(e), "measured": asdict(m),
            "pass": {} if e is None else judge(m, e)}


def probe_scores(passes: list[dict[str, bool]]) -> dict[str, float]:
    """Fraction of probed samples passing each probe ("probe/<name>") and all of them
    ("probe/all"), from each sample's `probe_video(...)["pass"]`; empty dicts (prompts that
    are not synthetic captions) are left out."""
    judged = [p for p in passes if p]
    if not judged:
        return {}
    out = {f"probe/{p}": float(np.mean([j[p] for j in judged])) for p in PROBES}
    out["probe/all"] = float(np.mean([all(j.values()) for j in judged]))
    out["probe/samples"] = len(judged)
    return out


# ----- prompt sensitivity ---------------------------------------------------------------------
SENSITIVITY_ATTRIBUTES = ("color", "shape", "direction", "count")


def measured_attribute(m: Measurement, attribute: str):
    """The value of `attribute` a measurement read: colour, shape, direction, or the most
    common per-frame object count."""
    if attribute == "count":
        return max(set(m.counts), key=m.counts.count) if m.counts else None
    return getattr(m, attribute)


def prompt_sensitivity(pairs: dict[str, list[tuple[np.ndarray, np.ndarray]]]) -> dict[str, float]:
    """How much samples follow a change of prompt: for each attribute, the fraction of sample
    pairs (same noise, prompts differing only in that attribute) whose measured attribute
    differs -> {"sensitivity/<attribute>": fraction, "sensitivity/all": their mean}.
    A model that ignores its prompt scores 0 (the same noise gives the same video)."""
    out = {}
    for a, videos in pairs.items():
        diff = [measured_attribute(measure(x), a) != measured_attribute(measure(y), a) for x, y in videos]
        out[f"sensitivity/{a}"] = float(np.mean(diff)) if diff else float("nan")
    out["sensitivity/all"] = float(np.mean([out[f"sensitivity/{a}"] for a in pairs]))
    return out
