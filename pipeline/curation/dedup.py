"""Near-duplicate clips across the whole dataset, from their embeddings.

    ids (N,), embeddings (N, D), priority (N,) --find_near_duplicates--> the clips to drop,
        each {"clip_id", "reason": "near_duplicate", "kept": id of the clip it duplicates, "similarity"}

Embeddings: the CLIP ``embedding`` from ``pipeline.curation.embed`` finds semantic near-duplicates
(the same scene re-shot, re-cut, re-encoded; compared at ``threshold``); without a model,
`thumbnail_embeddings` is a perceptual signature for copies (re-encodes in another codec or
quality, rescales, small crops, trims, brightness or contrast shifts; compared at
``thumb_threshold``): per keyframe and colour channel the lowest 8x8 DCT frequencies of a
16x16 thumbnail, the mean (DC) dropped, each magnitude compressed (``|c| ** 0.3``), each
plane's vector normalised. Dropping the DC cancels a brightness offset, the normalisation a
contrast gain, and the compression keeps what all frames share (a background colour,
letterbox bars, a sky's gradient) from outweighing what differs. The previous signature (the
thumbnails' pixels, centred) was dominated by exactly that: different videos on one
background scored up to 0.95-0.999, copies as low as 0.69. Measured on labelled pairs
(`data.duplicates`, `benchmarks/bench_dedup.py`; README "Near-duplicates"): copies >= 0.44,
different videos <= 0.45, and at the default 0.55 precision 1.000, recall 0.998.

Runs once, after every clip's embedding exists (not per batch: two copies of a video in
different batches, or different source files, must still meet).

The rule is greedy by priority, as in SemDeDup-style pipelines: clips are visited from the most
to the least wanted (higher ``priority`` first, e.g. the aesthetic score or the duration; ties
by clip id, so the result is deterministic), and a clip is dropped when its cosine similarity
to an already *kept* clip is at least ``threshold``. Unlike connected components (union-find),
this cannot chain: every dropped clip is within the threshold of the kept clip it names, and
no two kept clips are near-duplicates of each other.

Memory and time: the kept embeddings live in one matrix on the device (1M clips x 768 dims is
3 GB in float32, 1.5 GB in float16), and each block of ``block_size`` visited clips is compared
with them in column chunks of ``chunk_size``, so no N x N matrix is ever made. The work is
~N^2 D / 2 multiply-adds (1M CLIP-L clips: ~4e14, minutes on a GPU, about an hour on a CPU
node); beyond that, cluster first (k-means over the embeddings) and dedup within clusters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import cv2
import numpy as np

from data.checks import check_ranges


@dataclass
class DedupConfig:
    enabled: bool = True
    threshold: float = 0.95  # cosine of model (CLIP) embeddings at or above which clips are copies
    thumb_threshold: float = 0.55  # the same for the model-free thumbnail signatures (measured)
    block_size: int = 1024  # clips visited per step
    chunk_size: int = 65536  # kept clips compared at once (memory: block_size x chunk_size floats)
    device: str = "auto"  # auto = cuda when available
    dtype: str = "fp32"  # fp32 | fp16 (halves memory on GPU; similarities to ~1e-3)

    def __post_init__(self) -> None:
        check_ranges(self, threshold="in [0, 1]", block_size=">= 1", chunk_size=">= 1")
        if self.dtype not in ("fp32", "fp16"):
            raise ValueError(f"unknown dtype {self.dtype!r}; valid: fp32, fp16")


THUMB_SIZE = 16  # keyframes are area-downscaled to this square, per colour channel
THUMB_FREQS = 8  # the lowest THUMB_FREQS x THUMB_FREQS DCT frequencies, DC dropped
THUMB_POWER = 0.3  # magnitude compression: |c| ** THUMB_POWER, sign kept


def thumbnail_embeddings(frames, size: int = THUMB_SIZE) -> np.ndarray:
    """frames: (B, K, H, W, 3) uint8, or B arrays (K, H, W, 3) with the same K -> (B, K*3*63)
    float32 unit vectors: per keyframe and channel, the compressed low DCT frequencies of its
    thumbnail, normalised (see the module docstring)."""
    n = THUMB_FREQS
    out = []
    for clip in frames:
        planes = []
        for f in clip:  # (H, W, 3)
            t = cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32)  # (s, s, 3)
            for c in range(3):
                d = cv2.dct(np.ascontiguousarray(t[..., c]))[:n, :n].ravel()[1:]  # (n*n - 1,) no DC
                d = np.sign(d) * np.abs(d) ** THUMB_POWER
                planes.append(d / max(float(np.linalg.norm(d)), 1e-6))
        v = np.concatenate(planes)  # (K*3*(n*n - 1),)
        out.append(v / max(float(np.linalg.norm(v)), 1e-6))
    return np.stack(out).astype(np.float32)  # (B, K*3*(n*n - 1))


def priority_order(ids: Sequence[str], priority: Optional[np.ndarray]) -> np.ndarray:
    """Indices from the most to the least wanted: priority descending, then id ascending."""
    n = len(ids)
    p = np.zeros(n) if priority is None else np.nan_to_num(np.asarray(priority, np.float64), nan=-np.inf)
    by_id = np.argsort(np.asarray(ids, dtype=object), kind="stable")  # ids ascending
    return by_id[np.argsort(-p[by_id], kind="stable")]  # priority descending, id order within ties


def find_near_duplicates(ids: Sequence[str], embeddings: np.ndarray, cfg: DedupConfig,
                         priority: Optional[np.ndarray] = None) -> list[dict]:
    """ids: N clip ids; embeddings: (N, D) (normalised here); priority: (N,), higher is kept first
    (NaN = lowest). Returns one record per dropped clip, in visiting order."""
    import torch  # here, not at import: the media child uses `thumbnail_embeddings` only

    with torch.no_grad():
        return _near_duplicates(ids, embeddings, cfg, priority)


def _near_duplicates(ids, embeddings, cfg: DedupConfig, priority) -> list[dict]:
    import torch  # lazy: torch ~2 s to import, needed only here
    import torch.nn.functional as F

    n = len(ids)
    if embeddings.shape[0] != n:
        raise ValueError(f"{n} ids but {embeddings.shape[0]} embeddings")
    if n == 0 or not cfg.enabled:
        return []
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16}[cfg.dtype]
    order = priority_order(ids, priority)  # (N,)
    emb = F.normalize(torch.as_tensor(np.asarray(embeddings), dtype=torch.float32), dim=-1)  # (N, D)
    kept = torch.empty((n, emb.shape[1]), dtype=dtype, device=device)  # (N, D), first k rows used
    kept_idx = np.empty(n, dtype=np.int64)  # row -> clip index
    k = 0
    dropped = []
    for b0 in range(0, n, cfg.block_size):
        idx = order[b0 : b0 + cfg.block_size]  # (b,)
        x = emb[idx].to(device=device, dtype=dtype)  # (b, D)
        best = torch.full((len(idx),), -2.0, device=device)  # (b,) best similarity to a kept clip
        best_row = torch.zeros(len(idx), dtype=torch.long, device=device)  # (b,)
        for c0 in range(0, k, cfg.chunk_size):
            sim = (x @ kept[c0 : min(k, c0 + cfg.chunk_size)].T).float()  # (b, c)
            val, arg = sim.max(dim=1)  # (b,)
            better = val > best
            best = torch.where(better, val, best)
            best_row = torch.where(better, arg + c0, best_row)
        inner = (x @ x.T).float().cpu().numpy()  # (b, b) within the block
        best, best_row = best.cpu().numpy(), best_row.cpu().numpy()
        new_rows = []  # block positions kept so far
        for i in range(len(idx)):
            s, row = best[i], kept_idx[best_row[i]] if best[i] > -2 else -1
            if new_rows:  # earlier clips of this block that were kept
                j = int(np.argmax(inner[i, new_rows]))
                if inner[i, new_rows[j]] > s:
                    s, row = inner[i, new_rows[j]], idx[new_rows[j]]
            if s >= cfg.threshold:
                dropped.append({"clip_id": ids[idx[i]], "reason": "near_duplicate", "kept": ids[row],
                                "similarity": float(s)})
            else:
                new_rows.append(i)
        kept[k : k + len(new_rows)] = x[new_rows]
        kept_idx[k : k + len(new_rows)] = idx[new_rows]
        k += len(new_rows)
    return dropped
