"""What the eval stage shows people: a grid video of all samples, and the W&B samples table
(prompt, video and probe results side by side, one row per sample per checkpoint)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import numpy as np

from training.evaluation.probes import PROBES


def grid_video(videos: np.ndarray, cols: Optional[int] = None, pad: int = 2,
               pad_value: int = 128) -> np.ndarray:
    """Tile uint8 videos (N, T, H, W, 3) into one (T, H', W', 3) video, row-major,
    `cols` per row (default: a near-square grid), `pad` gray pixels around every tile.
    With even H, W and pad the grid stays even-sized, as yuv420 mp4 needs."""
    n, T, H, W, C = videos.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    out = np.full((T, rows * (H + pad) + pad, cols * (W + pad) + pad, C), pad_value, np.uint8)
    for i, v in enumerate(videos):
        r, c = divmod(i, cols)
        y, x = pad + r * (H + pad), pad + c * (W + pad)
        out[:, y : y + H, x : x + W] = v  # (T, H, W, 3)
    return out


def describe(measured: dict) -> str:
    """A measurement in a few words: "red circle x[1,1,2] left bg=black flicker=0.1"."""
    counts = measured.get("counts") or []
    count = str(counts[0]) if counts and len(set(counts)) == 1 else f"[{','.join(map(str, counts))}]"
    return (f"{count} {measured.get('color')} {measured.get('shape')} {measured.get('direction')}"
            f" bg={measured.get('background')} flicker={measured.get('flicker')}")


def sample_table(checkpoints: list[dict], out_dir: Path) -> tuple[list[str], list[list[Any]]]:
    """Columns and rows of the samples table. The video cell is a Path (W&B trackers log it
    as a video); probe cells are True/False, or None where the prompt was not probed."""
    columns = ["step", "index", "prompt", "video", *PROBES, "measured", "clip_score"]
    rows = []
    for ck in checkpoints:
        for s in ck["samples"]:
            probes = s.get("probes") or {}
            rows.append([ck["step"], s["index"], s["prompt"], Path(out_dir) / s["path"],
                         *[probes.get(p) for p in PROBES],
                         describe(s["measured"]) if s.get("measured") else None,
                         s.get("clip_score")])
    return columns, rows
