"""Shot splitting: cut detection on downscaled frames, then minimum / maximum clip lengths.

    frames (T, h, w, 3) uint8 RGB --detect_cuts--> cuts [first frame of each new shot]
        --split_shots--> clips [(start, end)] (end exclusive) + too_short [(start, end)]
    chunks of frames --ShotSplitter.push / finish--> each clip's (start, end, frames) once known

Detection runs on the frames curation decodes at scoring size, so a video is decoded once for
splitting and scoring. It streams: `ShotSplitter` takes the frames chunk by chunk and gives
each clip's frames out as soon as its span is final, holding at most one shot (or three
windows of a longer one) plus the detector's lag (`buffer_frames`), so memory is bounded by
the shot length limit, not the video (the whole-video detector it replaces kept int16 HSV
copies of every frame and ran out of memory at 14,400 frames of 160 px). `split_shots` is
the same splitter fed a whole array. The detectors are PySceneDetect's: ``content`` and
``adaptive`` compute exactly the library's scores and rules (``ContentDetector``,
``AdaptiveDetector``; the tests check cut-for-cut equality with the library classes), but for
chunks of frames in a few array operations: the library's per-frame Python calls cost about as
much as decoding the 64 px frames. ``threshold`` (fades to black) runs the library's
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
  Windows are cut at frame boundaries the shard stage can seek to; they carry no cut. Each
  clip records its shot and its window index (`shot_fields`); ``shots=long`` keeps shots up
  to 60 s whole.
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
    # Per clip: the shot it comes from (start, end), its window index in that shot and the
    # shot's window count ((start, end), 0, 1 for a shot kept whole).
    shots: list[tuple[int, int]] = field(default_factory=list)
    window_index: list[int] = field(default_factory=list)
    window_count: list[int] = field(default_factory=list)


class ContentScorer:
    """PySceneDetect's content score (`content_scores`), frame by frame: holds the previous
    frame's HSV only, so its memory does not grow with the video."""

    def __init__(self) -> None:
        self.prev: Optional[np.ndarray] = None  # (h, w, 3) int16 HSV of the last frame

    def push(self, frames: np.ndarray) -> np.ndarray:
        """frames: (t, h, w, 3) uint8 RGB, the next ones -> (t,) scores (0 for the video's first)."""
        t, h, w, _ = frames.shape
        if t == 0:
            return np.zeros(0)
        hsv = cv2.cvtColor(np.ascontiguousarray(frames).reshape(t * h, w, 3), cv2.COLOR_RGB2HSV)
        hsv = hsv.reshape(t, h, w, 3).astype(np.int16)  # (t, h, w, 3)
        scores = np.zeros(t)  # (t,)
        if self.prev is not None:
            scores[0] = np.abs(hsv[0] - self.prev).mean()
        if t > 1:
            scores[1:] = np.abs(hsv[1:] - hsv[:-1]).mean(axis=(1, 2, 3))
        self.prev = hsv[-1].copy()
        return scores


SCORE_CHUNK = 256  # frames converted to HSV at once (bounds the detector's memory)


def content_scores(frames: np.ndarray) -> np.ndarray:
    """frames: (T, h, w, 3) uint8 RGB -> (T,) PySceneDetect's content score (mean absolute HSV
    difference to the previous frame, hue, saturation and value weighted equally; 0 for frame
    0), SCORE_CHUNK frames per colour conversion and subtraction instead of a Python call
    per frame. The score is a mean of integers, exact in float64 whatever the chunking."""
    scorer = ContentScorer()
    parts = [scorer.push(frames[i : i + SCORE_CHUNK]) for i in range(0, len(frames), SCORE_CHUNK)]
    return np.concatenate(parts) if parts else np.zeros(0)


def adaptive_cut_at(padded: np.ndarray, threshold: float, window: int, min_content: float) -> bool:
    """AdaptiveDetector's rule for the middle frame of `padded` (2 * window + 1 content
    scores): a cut when its score is at least `min_content` and at least `threshold` times the
    mean score of the `window` frames on each side."""
    score = padded[window]
    mean = (np.convolve(padded, np.ones(2 * window + 1), mode="valid")[0] - score) / (2 * window)
    if abs(mean) < 1e-5:
        ratio = 255.0 if score >= min_content else 0.0
    else:
        ratio = min(score / mean, 255.0)
    return bool(ratio >= threshold and score >= min_content)


def adaptive_cuts(scores: np.ndarray, threshold: float, window: int, min_content: float) -> list[int]:
    """AdaptiveDetector's rule (`adaptive_cut_at`) on content scores (T,). The ends are padded
    with `window` zero scores (copies of the first / last frame)."""
    padded = np.concatenate([np.zeros(window), scores, np.zeros(window)])  # (T + 2w,)
    return [k for k in range(1, len(scores))
            if adaptive_cut_at(padded[k : k + 2 * window + 1], threshold, window, min_content)]


class CutDetector:
    """One video's cuts, frame by frame, in memory that does not grow with the video.

    `push(frames)` takes the next frames and returns the cuts it can now confirm; `finish()`
    returns the rest. `horizon`: every cut not returned yet is at or after this frame, so
    frames before it can be released once the spans they belong to are known. ``adaptive``
    judges a frame once the `window` frames after it are scored (a lag of `window` frames);
    ``threshold`` cannot place a cut until a fade-out ends, so its horizon stays at the
    fade-out while the frames are dark."""

    def __init__(self, fps: float, cfg: ShotConfig):
        self.fps, self.cfg = fps, cfg
        self.threshold = cfg.threshold if cfg.threshold is not None else DEFAULT_THRESHOLDS.get(
            cfg.detector, 0.0)
        self.seen = 0  # frames pushed
        self.scorer = ContentScorer()
        w = cfg.window
        self.recent = np.zeros(2 * w + 1)  # adaptive: the last 2w + 1 scores, zero-padded
        self.judged = 0  # adaptive: frames whose cut decision is made
        self.fade = None
        if cfg.detector == "threshold":
            from scenedetect import FrameTimecode  # lazy: scenedetect ~0.6 s to import, needed only here
            from scenedetect.detectors import ThresholdDetector

            self.fade = ThresholdDetector(threshold=self.threshold, min_scene_len=0)
            self.timecode = FrameTimecode

    @property
    def horizon(self) -> int:
        if self.cfg.detector == "adaptive":
            return self.judged
        if self.fade is not None and self.fade.last_fade["type"] == "out":
            return self.fade.last_fade["frame"].frame_num
        return self.seen

    def _adaptive(self, scores: np.ndarray) -> list[int]:
        w, cuts = self.cfg.window, []
        for s in scores:  # frame `seen` enters the window; frame `seen - w` is judged
            self.recent = np.append(self.recent[1:], s)
            k = self.seen - w
            self.seen += 1
            if k >= 0:
                if k > 0 and adaptive_cut_at(self.recent, self.threshold, w, self.cfg.min_content):
                    cuts.append(k)
                self.judged = k + 1
        return cuts

    def push(self, frames: np.ndarray) -> list[int]:
        """frames: (t, h, w, 3) uint8 RGB, the video's next frames -> newly confirmed cuts."""
        det = self.cfg.detector
        if det == "window" or len(frames) == 0:
            self.seen += len(frames)
            return []
        if det == "threshold":
            found = []
            for frame in frames:
                found += self.fade.process_frame(self.timecode(self.seen, fps=self.fps),
                                                 cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
                self.seen += 1
            return [c.frame_num for c in found if c.frame_num > 0]
        scores = self.scorer.push(frames)
        if det == "content":
            first, self.seen = self.seen, self.seen + len(frames)
            return [first + int(k) for k in np.flatnonzero(scores >= self.threshold) if first + k > 0]
        return self._adaptive(scores)

    def finish(self) -> list[int]:
        """The cuts left once every frame is pushed (the ends padded as `adaptive_cuts` does)."""
        n, cuts = self.seen, []
        if self.cfg.detector == "adaptive":
            w, v = self.cfg.window, n
            while self.judged < n:  # zero scores after the last frame
                self.recent = np.append(self.recent[1:], 0.0)
                k, v = v - w, v + 1
                if k >= 0:
                    if k > 0 and adaptive_cut_at(self.recent, self.threshold, w, self.cfg.min_content):
                        cuts.append(k)
                    self.judged = k + 1
        elif self.fade is not None and n:
            cuts = [c.frame_num for c in self.fade.post_process(self.timecode(n - 1, fps=self.fps))]
        self.seen = n
        return cuts


def detect_cuts(frames: np.ndarray, fps: float, cfg: ShotConfig) -> list[int]:
    """frames: (T, h, w, 3) uint8 RGB, consecutive. Returns sorted cut positions in (0, T)."""
    if cfg.detector == "window" or len(frames) < 2:
        return []
    det = CutDetector(fps, cfg)
    cuts = []
    for i in range(0, len(frames), SCORE_CHUNK):
        cuts += det.push(frames[i : i + SCORE_CHUNK])
    cuts += det.finish()
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


class ShotSplitter:
    """`split_shots` over a stream of frames, holding only the frames of the shot (or, in a
    shot longer than the maximum, the windows) not yet given out.

    `push(frames)` takes the video's next frames and returns the clips it has finished, as
    ``(start, end, frames)`` with frames (end - start, h, w, 3); `finish()` returns the rest
    and `result` is then the same ShotSplit as `split_shots` on all frames. A window of a long
    shot is given out as soon as two more windows' worth of the shot have been seen (only the
    last two windows of a shot can change: the remainder may join the one before it), so the
    frames held stay under ``max(max_len, 3 * window_len)`` plus the detector's lag
    (`buffer_frames`), whatever the video's length."""

    def __init__(self, fps: float, cfg: ShotConfig):
        self.cfg = cfg
        self.min_len, self.max_len, self.window_len = cfg.limits(fps)
        self.detector = CutDetector(fps, cfg)
        self.buf: list[np.ndarray] = []  # frames base, base + 1, ... (h, w, 3) each
        self.base = 0  # index of buf[0]
        self.start = 0  # the current shot's first frame
        self.given = 0  # windows of the current shot given out so far
        self.cuts: list[int] = []
        self.result = ShotSplit(cuts=self.cuts, clips=[], windowed=[], min_len=self.min_len,
                                max_len=self.max_len)
        self.pending: list[int] = []  # indices into result.clips of the current shot's clips
        self.peak = 0  # most frames held at once

    def _take(self, start: int, end: int) -> np.ndarray:
        return np.stack(self.buf[start - self.base : end - self.base])  # (end - start, h, w, 3)

    def _drop(self, upto: int) -> None:
        if upto > self.base:
            del self.buf[: upto - self.base]
            self.base = upto

    def _emit(self, span: tuple[int, int], windowed: bool) -> tuple[int, int, np.ndarray]:
        r = self.result
        r.clips.append(span)
        r.windowed.append(windowed)
        self.pending.append(len(r.clips) - 1)
        return (*span, self._take(*span))

    def _end_shot(self, end: int) -> list:
        """The current shot ends before `end`: its remaining clips."""
        start, length, out = self.start, end - self.start, []
        if length < self.min_len:
            self.result.too_short.append((start, end))
        elif length <= self.max_len and self.cfg.detector != "window":
            out.append(self._emit((start, end), False))
        else:
            spans, short = windows(start, end, self.min_len, self.max_len, self.window_len)
            out += [self._emit(s, True) for s in spans[self.given:]]
            self.result.too_short += short
        r = self.result
        for i, k in enumerate(self.pending):
            r.shots.append((start, end))
            r.window_index.append(i)
            r.window_count.append(len(self.pending))
        self.pending, self.given, self.start = [], 0, end
        self._drop(end)
        return out

    def _early_windows(self) -> list:
        """Windows of a long current shot that no later frame can change."""
        seen = self.detector.horizon - self.start  # the shot is at least this long
        windowing = self.cfg.detector == "window" or seen > self.max_len
        if not windowing or seen <= 0:
            return []
        out = []
        while self.given + 2 < -(-seen // self.window_len):  # span `given` is not one of the last two
            a = self.start + self.given * self.window_len
            out.append(self._emit((a, a + self.window_len), True))
            self.given += 1
            self._drop(a + self.window_len)
        return out

    def push(self, frames: np.ndarray) -> list:
        self.buf.extend(frames)
        self.peak = max(self.peak, len(self.buf))
        out = []
        for cut in self.detector.push(frames):
            self.cuts.append(cut)
            out += self._end_shot(cut)
        return out + self._early_windows()

    def finish(self) -> list:
        n, out = self.detector.seen, []
        for cut in self.detector.finish():
            if 0 < cut < n and cut not in self.cuts:
                self.cuts.append(cut)
                out += self._end_shot(cut)
        out += self._end_shot(n)
        self.cuts.sort()
        return out


def buffer_frames(fps: float, cfg: ShotConfig) -> int:
    """The most frames `ShotSplitter` holds (fade detection aside: a dark stretch is held
    until the fade ends): a shot up to the maximum, or three windows, plus the lag."""
    _, max_len, window_len = cfg.limits(fps)
    return max(max_len, 3 * window_len) + cfg.window + SCORE_CHUNK + 1


def split_shots(frames: np.ndarray, fps: float, cfg: ShotConfig) -> ShotSplit:
    """frames: (T, h, w, 3) uint8 RGB, all frames of one video. Detects cuts, then applies the
    length rules: shots shorter than the minimum go to `too_short`, longer than the maximum are
    cut into windows (`windowed` marks them). The same as `ShotSplitter` fed the frames."""
    splitter = ShotSplitter(fps, cfg)
    for i in range(0, len(frames), SCORE_CHUNK):
        splitter.push(frames[i : i + SCORE_CHUNK])
    splitter.finish()
    return splitter.result


# What a clip says of the shot it comes from; a shot kept whole is its own window 0 of 1.
SHOT_KEYS = ("shot_id", "shot_start", "shot_end", "window_index", "window_count")


def shot_fields(source_id: str, shot: tuple[int, int], index: int, count: int) -> dict:
    """A clip's parent shot (its id names the source and the shot's frame span, like a clip
    id) and its place among the shot's windows."""
    return {"shot_id": f"{source_id}-{shot[0]:06d}-{shot[1]:06d}", "shot_start": int(shot[0]),
            "shot_end": int(shot[1]), "window_index": int(index), "window_count": int(count)}
