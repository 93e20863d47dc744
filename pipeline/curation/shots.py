"""Shot splitting: cut detection on downscaled frames, then minimum / maximum clip lengths.

    frames (T, h, w, 3) uint8 RGB --detect_cuts--> cuts [first frame of each new shot]
        --split_shots--> clips [(start, end)] (end exclusive) + too_short [(start, end)]

Detection runs on the frames curation has already decoded at scoring size, so a video is
decoded once for splitting and scoring. The detectors are PySceneDetect's: ``content`` and
``adaptive`` compute exactly the library's scores and rules (``ContentDetector``,
``AdaptiveDetector``; the tests check cut-for-cut equality with the library classes), but for
all frames in a few array operations: the library's per-frame Python calls cost about as much
as decoding the 64 px frames. ``threshold`` (fades to black) runs the library's
``ThresholdDetector`` itself. Design decisions:

- ``adaptive`` is the default. ``content`` cuts wherever the HSV frame difference passes a fixed
  threshold, and fast motion passes it too: objects moving 4-8 px per frame over a 64 px frame
  score up to ~37 at 32 px, above content's default 27, while our synthetic cuts score from
  ~30. ``adaptive`` compares each frame's score to the average of its neighbours (``window``
  frames each side), so steady fast motion is not a cut and a one-frame jump is.
- There is no ``min_scene_len`` (the library's is 0 here): we keep every cut and apply our own
  length rules afterwards, so a shot that is too short is *reported* (the caller rejects it with a reason)
  instead of being silently merged into its neighbour, which would put a cut inside a clip.
- ``adaptive`` needs ``window`` frames on each side of a frame before it can judge it, so the
  clip is padded with copies of its first and last frames (a copy scores 0, which only makes a
  real cut stand out more). The library, unpadded, never reports a cut in the first or last
  ``window`` frames.
- Shots longer than the maximum are cut into fixed windows of ``window_seconds``; a remainder
  shorter than the minimum joins the last window when that stays within the maximum, and is
  reported as too short otherwise. ``detector=window`` skips detection: fixed windows only.
  Windows are cut at frame boundaries the shard stage can seek to; they carry no cut.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import cv2
import numpy as np

from data.checks import check_ranges

DETECTORS = ("content", "adaptive", "threshold", "window")
DEFAULT_THRESHOLDS = {"content": 27.0, "adaptive": 3.0, "threshold": 12.0}  # PySceneDetect's defaults


@dataclass
class ShotConfig:
    detector: str = "adaptive"  # content | adaptive | threshold (fades to black) | window (no detection)
    threshold: Optional[float] = None  # None = the detector's default (DEFAULT_THRESHOLDS)
    window: int = 2  # adaptive: frames each side averaged for the rolling baseline
    min_content: float = 15.0  # adaptive: a cut also needs this content score (0-255 scale)
    min_seconds: float = 1.0  # shots shorter than this are too short (both limits apply)
    min_frames: int = 8
    max_seconds: float = 20.0  # shots longer than this are cut into windows (both limits apply)
    max_frames: Optional[int] = None
    window_seconds: float = 10.0  # fixed-window length for long shots and detector=window

    def __post_init__(self) -> None:
        if self.detector not in DETECTORS:
            raise ValueError(f"unknown shot detector {self.detector!r}; valid: {', '.join(DETECTORS)}")
        check_ranges(self, threshold="> 0", window=">= 1", min_content=">= 0", min_frames=">= 1",
                     max_frames=">= 1")
        if not 0 < self.min_seconds <= self.window_seconds <= self.max_seconds:
            raise ValueError("shot lengths must satisfy 0 < min_seconds <= window_seconds <= max_seconds, got "
                             f"{self.min_seconds}, {self.window_seconds}, {self.max_seconds}")
        if self.max_frames is not None and self.max_frames < self.min_frames:
            raise ValueError(f"shots.max_frames {self.max_frames} < shots.min_frames {self.min_frames}")

    def limits(self, fps: float) -> tuple[int, int, int]:
        """(min_len, max_len, window_len) in frames at `fps`; the stricter of seconds and frames."""
        min_len = max(1, self.min_frames, math.ceil(self.min_seconds * fps - 1e-6))
        max_len = math.floor(self.max_seconds * fps + 1e-6)
        if self.max_frames is not None:
            max_len = min(max_len, self.max_frames)
        max_len = max(max_len, min_len)
        window_len = min(max(round(self.window_seconds * fps), min_len), max_len)
        return min_len, max_len, window_len


@dataclass
class ShotSplit:
    """The result for one video. Spans are (start, end) frame indices, end exclusive."""

    cuts: list[int]  # detected cuts: the first frame of each new shot
    clips: list[tuple[int, int]]  # usable clips, in order
    windowed: list[bool]  # per clip: cut from a longer shot by the fixed window (not at a cut)
    too_short: list[tuple[int, int]] = field(default_factory=list)  # shots or remainders below min_len
    min_len: int = 0
    max_len: int = 0


def content_scores(frames: np.ndarray) -> np.ndarray:
    """frames: (T, h, w, 3) uint8 RGB -> (T,) PySceneDetect's content score (mean absolute HSV
    difference to the previous frame, hue, saturation and value weighted equally; 0 for frame
    0), for all frames at once: one colour conversion and one subtraction instead of a Python
    call per frame."""
    t, h, w, _ = frames.shape
    hsv = cv2.cvtColor(np.ascontiguousarray(frames).reshape(t * h, w, 3), cv2.COLOR_RGB2HSV)
    hsv = hsv.reshape(t, h, w, 3).astype(np.int16)  # (T, h, w, 3)
    scores = np.zeros(t)  # (T,)
    scores[1:] = np.abs(hsv[1:] - hsv[:-1]).mean(axis=(1, 2, 3))
    return scores


def adaptive_cuts(scores: np.ndarray, threshold: float, window: int, min_content: float) -> list[int]:
    """AdaptiveDetector's rule on content scores (T,): frame k is a cut when its score is at least
    `min_content` and at least `threshold` times the mean score of the `window` frames on each
    side. The ends are padded with `window` zero scores (copies of the first / last frame)."""
    padded = np.concatenate([np.zeros(window), scores, np.zeros(window)])  # (T + 2w,)
    sums = np.convolve(padded, np.ones(2 * window + 1), mode="valid") - scores  # (T,) neighbours only
    mean = sums / (2 * window)  # (T,)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(np.abs(mean) < 1e-5, np.where(scores >= min_content, 255.0, 0.0),
                         np.minimum(scores / mean, 255.0))  # (T,)
    return [int(k) for k in np.flatnonzero((ratio >= threshold) & (scores >= min_content)) if k > 0]


def fade_cuts(frames: np.ndarray, fps: float, threshold: float) -> list[int]:
    """PySceneDetect's ThresholdDetector (fades to and from black), run frame by frame: it is a
    small state machine with no vectorised form, and cheap (a mean per frame)."""
    from scenedetect import FrameTimecode  # lazy: scenedetect ~0.6 s to import, needed only here
    from scenedetect.detectors import ThresholdDetector

    detector = ThresholdDetector(threshold=threshold, min_scene_len=0)
    found = []
    for i, frame in enumerate(frames):
        found += detector.process_frame(FrameTimecode(i, fps=fps), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    found += detector.post_process(FrameTimecode(len(frames) - 1, fps=fps))
    return [c.frame_num for c in found]


def detect_cuts(frames: np.ndarray, fps: float, cfg: ShotConfig) -> list[int]:
    """frames: (T, h, w, 3) uint8 RGB, consecutive. Returns sorted cut positions in (0, T)."""
    if cfg.detector == "window" or len(frames) < 2:
        return []
    threshold = cfg.threshold if cfg.threshold is not None else DEFAULT_THRESHOLDS[cfg.detector]
    if cfg.detector == "threshold":
        cuts = fade_cuts(frames, fps, threshold)
    elif cfg.detector == "content":
        cuts = [int(k) for k in np.flatnonzero(content_scores(frames) >= threshold)]
    else:
        cuts = adaptive_cuts(content_scores(frames), threshold, cfg.window, cfg.min_content)
    return sorted(set(cuts) & set(range(1, len(frames))))


def windows(start: int, end: int, min_len: int, max_len: int, window_len: int
            ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Cut [start, end) into fixed windows -> (clips, too_short); see the module docstring."""
    bounds = list(range(start, end, window_len)) + [end]
    spans = list(zip(bounds[:-1], bounds[1:]))
    tail = spans[-1]
    if len(spans) > 1 and tail[1] - tail[0] < min_len:
        if tail[1] - spans[-2][0] <= max_len:
            spans[-2:] = [(spans[-2][0], tail[1])]
        else:
            return spans[:-1], [tail]
    if spans[-1][1] - spans[-1][0] < min_len:
        return spans[:-1], [spans[-1]]
    return spans, []


def split_shots(frames: np.ndarray, fps: float, cfg: ShotConfig) -> ShotSplit:
    """frames: (T, h, w, 3) uint8 RGB, all frames of one video. Detects cuts, then applies the
    length rules: shots shorter than the minimum go to `too_short`, longer than the maximum are
    cut into windows (`windowed` marks them)."""
    num_frames = len(frames)
    min_len, max_len, window_len = cfg.limits(fps)
    cuts = detect_cuts(frames, fps, cfg)
    bounds = [0, *cuts, num_frames]
    out = ShotSplit(cuts=cuts, clips=[], windowed=[], min_len=min_len, max_len=max_len)
    for start, end in zip(bounds[:-1], bounds[1:]):
        length = end - start
        if length < min_len:
            out.too_short.append((start, end))
        elif length <= max_len and cfg.detector != "window":
            out.clips.append((start, end))
            out.windowed.append(False)
        else:
            spans, short = windows(start, end, min_len, max_len, window_len)
            out.clips += spans
            out.windowed += [True] * len(spans)
            out.too_short += short
    return out
