"""Long-video consistency: sample clips far longer than the training shape and probe them window
by window, for what critics of Sora-style models point at in long shots: objects that change
number, vanish or appear mid-clip, colours and backgrounds that drift away from the opening,
motion that turns around.

    eval.long.seconds --long_lengths--> [(seconds, frames)]   (checked before any work)
    video (T, H, W, 3) --windows of window_seconds--> measure() each (the probes' own detector)
        -> per window: the prompt's probes (``probes.judge``) and "held" probes against window 0
        -> per clip: each held probe in every window?, the first window where it failed
    clips of one length --long_scores--> long/<L>s/<probe> metrics, per_window curves

Held probes, each window against the first (the clip's own reference, so they need no
synthetic prompt and work on any prompt):

- ``count_held``: every frame of the window shows the first window's object count (its most
  common per-frame count, which must be non-zero).
- ``none_vanished`` / ``none_appeared``: no frame shows fewer / more objects than that; the
  window records how many (``vanished``, ``appeared``).
- ``color_held`` / ``background_held``: the window's median object / background colour is
  within ``MAX_COLOR_DRIFT`` / ``MAX_BACKGROUND_DRIFT`` (RGB distance) of the first window's;
  the distances are recorded (``color_drift``, ``background_drift``) and plotted. The
  thresholds are well under half the closest pair of the source's palette (yellow-orange 115,
  black-dark green 104), so a drift that fails is one a viewer reads as another colour.
- ``direction_held``: the window's motion direction is the first window's. For a bouncing
  prompt ("bouncing left and right"), whose direction reverses at every wall, the window's
  motion axis is the first window's (``probes.motion_axis``: the direction's axis, or where a
  reversal inside the window balances the direction out to still, the axis its frame pairs
  move along); motion along the other axis, or none, fails.

Frame counts: the model samples at the training's frame rate (``train.data.target_fps``; when
that is unset, ``eval.fps``), so ``seconds * fps`` must be a whole number of frames the model
can take: a multiple of the DiT's temporal patch for pixels; ``1 + k * tc`` frames for a latent
space of temporal compression ``tc``, with ``1 + k`` latent frames a multiple of the patch.
`long_lengths` says which nearby durations would do, before any model is loaded.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np

from data.checks import check_ranges
from data.prompts import parse_prompt
from training.evaluation.probes import Measurement, judge, measure, motion_axis

HELD = ("count_held", "none_vanished", "none_appeared", "color_held", "background_held",
        "direction_held")
MAX_COLOR_DRIFT = 40.0  # RGB distance of a window's object colour from the first window's
MAX_BACKGROUND_DRIFT = 20.0  # the same for the background colour
MIN_WINDOW_FRAMES = 2  # a direction needs two frames


@dataclass
class LongEvalConfig:
    """Long clips sampled beside the training-shape samples (``eval.long``); off when empty."""

    seconds: list[float] = field(default_factory=list)  # clip lengths; empty: no long clips
    window_seconds: float = 1.0  # the probes run on each window of this length
    num_prompts: int = 4  # the first this many of the eval prompts, at each length
    batch_size: int = 1  # long clips sampled per batch

    def __post_init__(self) -> None:
        check_ranges(self, seconds="> 0", window_seconds="> 0", num_prompts=">= 1",
                     batch_size=">= 1")


# ----- which lengths ----------------------------------------------------------------------
def valid_frames(T: int, patch_t: int, compression_t: Optional[int]) -> bool:
    """Can the model sample T frames? Pixels: T a multiple of the temporal patch. Latents of
    temporal compression tc: T = 1 + k * tc and 1 + k a multiple of the patch."""
    if T < 1:
        return False
    if compression_t is None:
        return T % patch_t == 0
    return (T - 1) % compression_t == 0 and (1 + (T - 1) // compression_t) % patch_t == 0


def _rule(patch_t: int, compression_t: Optional[int]) -> str:
    if compression_t is None:
        return f"pixel frames must be a multiple of model.dit.patch_size[0]={patch_t}"
    return (f"the VAE (temporal compression {compression_t}) takes 1 + k*{compression_t} frames, "
            f"and its 1 + k latent frames must be a multiple of model.dit.patch_size[0]={patch_t}")


def long_lengths(cfg: LongEvalConfig, fps: float, patch_t: int, compression_t: Optional[int] = None
                 ) -> list[tuple[float, int]]:
    """[(seconds, frames)] of ``cfg.seconds`` at `fps`; ValueError naming ``eval.long.seconds``
    and the nearest valid durations when one is not a frame count the model can take, or naming
    ``eval.long.window_seconds`` when a clip would not hold two windows of at least 2 frames."""
    out = []
    for s in cfg.seconds:
        exact = float(s) * fps
        T = int(round(exact))
        if abs(exact - T) > 1e-6 or not valid_frames(T, patch_t, compression_t):
            lo = next((t for t in range(int(np.floor(exact)), 0, -1)
                       if t < exact and valid_frames(t, patch_t, compression_t)), None)
            hi = next(t for t in range(int(np.floor(exact)) + 1, int(exact) + 10_000)
                      if valid_frames(t, patch_t, compression_t))
            near = " or ".join(f"{t / fps:g} ({t} frames)" for t in (lo, hi) if t is not None)
            raise ValueError(f"eval.long.seconds: {s:g} s at {fps:g} fps is {exact:g} frames, which "
                             f"the model cannot sample ({_rule(patch_t, compression_t)}); "
                             f"nearest valid seconds: {near}")
        n = window_frames(cfg, fps)
        if n < MIN_WINDOW_FRAMES or T < 2 * n:
            raise ValueError(
                f"eval.long.window_seconds={cfg.window_seconds:g} is {n} frames at {fps:g} fps: "
                f"windows need >= {MIN_WINDOW_FRAMES} frames and the {s:g} s clip ({T} frames) at "
                f"least two of them; valid: {MIN_WINDOW_FRAMES / fps:g} to {T // 2 / fps:g} s")
        out.append((float(s), T))
    return out


def window_frames(cfg: LongEvalConfig, fps: float) -> int:
    return int(round(cfg.window_seconds * fps))


def check_long_eval(cfg) -> list[tuple[float, int]]:
    """The run config's long-clip lengths, checked before any stage runs (``spacetime run``'s
    preflight): the frame rate and patch from ``train``/``model``, the temporal compression of
    our VAE (``latent=ours``; a diffusers VAE's is known when it is loaded, and evaluate checks
    it then, before sampling)."""
    fps = cfg.train.data.target_fps or cfg.eval.fps
    latent = cfg.train.data.kind == "latent"
    if latent and cfg.latent.kind != "ours":
        return []
    tc = int(cfg.vae.model.compression[0]) if latent else None
    return long_lengths(cfg.eval.long, fps, int(cfg.model.dit.patch_size[0]), tc)


# ----- probing one clip -------------------------------------------------------------------
def window_bounds(T: int, n: int) -> list[tuple[int, int]]:
    """[start, end) frames of windows of n frames; the last takes the remainder (< n)."""
    k = max(1, T // n)
    return [(i * n, (i + 1) * n if i < k - 1 else T) for i in range(k)]


def _mode(counts: list[int]) -> int:
    return Counter(counts).most_common(1)[0][0] if counts else 0


def _drift(a: Optional[list[float]], b: Optional[list[float]]) -> Optional[float]:
    return None if a is None or b is None else round(float(np.linalg.norm(np.subtract(a, b))), 2)


def _direction_held(m: Measurement, ref: Measurement, bounce: bool) -> bool:
    if bounce:
        return motion_axis(m) is not None and motion_axis(m) == motion_axis(ref)
    return m.direction is not None and m.direction == ref.direction


def _window(m: Measurement, ref: Measurement, ref_count: int, bounce: bool = False) -> dict:
    lo, hi = min(m.counts), max(m.counts)
    color_drift = _drift(m.color_rgb, ref.color_rgb)
    bg_drift = _drift(m.background_rgb, ref.background_rgb)
    held = {
        "count_held": ref_count > 0 and lo == hi == ref_count,
        "none_vanished": ref_count > 0 and lo >= ref_count,
        "none_appeared": ref_count > 0 and hi <= ref_count,
        "color_held": color_drift is not None and color_drift <= MAX_COLOR_DRIFT,
        "background_held": bg_drift is not None and bg_drift <= MAX_BACKGROUND_DRIFT,
        "direction_held": _direction_held(m, ref, bounce),
    }
    return {"count": _mode(m.counts), "vanished": max(0, ref_count - lo),
            "appeared": max(0, hi - ref_count), "color": m.color, "color_rgb": m.color_rgb,
            "color_drift": color_drift, "background": m.background,
            "background_rgb": m.background_rgb, "background_drift": bg_drift,
            "direction": m.direction, "axis": m.axis, "shift": m.shift, "held": held}


def window_probes(video: np.ndarray, prompt: str, frames_per_window: int, fps: float) -> dict:
    """Probe a long (T, H, W, 3) uint8 video window by window.

    Returns {"expected" (the prompt's attributes, or None), "windows": [{"window", "start_s",
    "end_s", the window's measured attributes and drifts, "held": {HELD probe: bool}, "pass":
    {PROBES probe: bool} against the prompt (empty for a non-synthetic prompt)}],
    "held": {probe: held in every window}, "first_failure": {probe: first window that failed,
    or None}, "consistent": every held probe in every window}."""
    video = np.asarray(video)
    e = parse_prompt(prompt)
    bounds = window_bounds(len(video), frames_per_window)
    ms = [measure(video[a:b]) for a, b in bounds]
    ref, ref_count = ms[0], _mode(ms[0].counts)
    windows = []
    for w, ((a, b), m) in enumerate(zip(bounds, ms)):
        windows.append({"window": w, "start_s": round(a / fps, 4), "end_s": round(b / fps, 4),
                        **_window(m, ref, ref_count, e is not None and e.bounce),
                        "pass": {} if e is None else judge(m, e)})
    first = {p: next((x["window"] for x in windows if not x["held"][p]), None) for p in HELD}
    held = {p: first[p] is None for p in HELD}
    return {"expected": None if e is None else asdict(e), "windows": windows,
            "held": held, "first_failure": first, "consistent": all(held.values())}


# ----- many clips of one length -----------------------------------------------------------
def _mean(xs: list) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return round(float(np.mean(xs)), 4) if xs else None


def per_window(records: list[dict]) -> list[dict]:
    """Across the clips of one length (their `window_probes` results), per window: the fraction
    of clips where each held probe passed, the mean drifts, and the fraction passing each of
    the prompt's probes ("prompt/<probe>", over the synthetic prompts only)."""
    out = []
    for w in range(min(len(r["windows"]) for r in records)):
        ws = [r["windows"][w] for r in records]
        row = {"window": w, "start_s": ws[0]["start_s"], "end_s": ws[0]["end_s"]}
        row.update({p: float(np.mean([x["held"][p] for x in ws])) for p in HELD})
        row.update(color_drift=_mean([x["color_drift"] for x in ws]),
                   background_drift=_mean([x["background_drift"] for x in ws]))
        judged = [x["pass"] for x in ws if x["pass"]]
        for p in judged[0] if judged else ():
            row[f"prompt/{p}"] = float(np.mean([j[p] for j in judged]))
        out.append(row)
    return out


def long_scores(records: list[dict], seconds: float) -> dict[str, float]:
    """Metrics of the clips of one length: "long/<L>s/<held probe>" (fraction of clips where it
    held in every window), ".../consistent", the worst drift per clip averaged over clips
    (".../color_drift_max", ".../background_drift_max") and ".../samples"."""
    pre = f"long/{seconds:g}s"
    out = {f"{pre}/{p}": float(np.mean([r["held"][p] for r in records])) for p in HELD}
    out[f"{pre}/consistent"] = float(np.mean([r["consistent"] for r in records]))
    for k in ("color_drift", "background_drift"):
        worst = [max((x[k] for x in r["windows"] if x[k] is not None), default=None) for r in records]
        if any(v is not None for v in worst):
            out[f"{pre}/{k}_max"] = _mean(worst)
    out[f"{pre}/samples"] = len(records)
    return out


WINDOW_COLUMNS = ["step", "seconds", "window", "start_s", "end_s", *HELD, "color_drift",
                  "background_drift"]


def window_rows(step: int, lengths: list[dict]) -> list[list]:
    """Rows of the W&B table of per-window results (WINDOW_COLUMNS), for plotting over time."""
    return [[step, ln["seconds"], *[row.get(c) for c in WINDOW_COLUMNS[2:]]]
            for ln in lengths for row in ln["per_window"]]
