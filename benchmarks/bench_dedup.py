"""Near-duplicate scores on labelled pairs: precision and recall of the thumbnail dedup, the
signature before and after issue 18 (not a test; prints a table).

The pairs come from `data.duplicates`: per seed, `--videos` synthetic videos over five
backgrounds (plain, static and temporal grey noise, letterbox bars, a bright gradient), each
with 8 renders of itself (x264 crf 35, MPEG-4, VP9, 96 and 48 px, a 10% crop, +15 brightness,
2 frames trimmed) against its reference: true pairs; the reference against every render of
every other video: false pairs. Keyframes are taken as the curate stage takes them.

For each signature: the score ranges, precision and recall at its threshold, and what the
whole-dataset greedy dedup (`find_near_duplicates`, all renders of all videos at once) does:
good clips dropped as copies of another video, and copies left in.

    python benchmarks/bench_dedup.py [--videos 30] [--seeds 2 3 4 5]
"""

from __future__ import annotations

import argparse

import numpy as np


def legacy_signature(clip: np.ndarray, size: int = 16) -> np.ndarray:
    """The signature before issue 18: the keyframes' 16x16 colour thumbnails, centred, normalised."""
    import cv2

    t = np.stack([cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA) for f in clip])
    t = t.astype(np.float32).ravel()
    t -= t.mean()
    return t / max(float(np.linalg.norm(t)), 1e-6)


def main() -> None:
    from data.duplicates import build_set, precision_recall
    from pipeline.curation.dedup import DedupConfig, find_near_duplicates, thumbnail_embeddings

    ap = argparse.ArgumentParser()
    ap.add_argument("--videos", type=int, default=30)
    ap.add_argument("--seeds", type=int, nargs="+", default=[2, 3, 4, 5])
    args = ap.parse_args()
    cfg = DedupConfig()
    signatures = {"before (pixels, 0.95)": (legacy_signature, cfg.threshold),
                  f"now (DCT, {cfg.thumb_threshold})": (lambda c: thumbnail_embeddings([c])[0],
                                                        cfg.thumb_threshold)}
    sets = [build_set(args.videos, seed) for seed in args.seeds]
    n_clips = sum(len(c) for c, _, _ in sets)
    print(f"{len(sets)} sets x {args.videos} videos: {n_clips} clips, "
          f"{sum(len(t) for _, t, _ in sets)} true pairs, {sum(len(f) for _, _, f in sets)} false pairs")
    print("| signature | copies score | different videos score | precision | recall | "
          "good clips dropped | copies kept |")
    print("|---|---|---|---|---|---|---|")
    for name, (sig, threshold) in signatures.items():
        st, sf, wrong, missed = [], [], 0, 0
        for clips, true, false in sets:
            emb = {c: sig(k) for c, k in clips.items()}
            st += [float(emb[a] @ emb[b]) for a, b in true]
            sf += [float(emb[a] @ emb[b]) for a, b in false]
            ids = sorted(clips)
            dropped = find_near_duplicates(ids, np.stack([emb[i] for i in ids]),
                                           DedupConfig(threshold=threshold, device="cpu"))
            video = lambda c: c.split("-")[0]  # noqa: E731
            wrong += sum(video(d["clip_id"]) != video(d["kept"]) for d in dropped)
            kept = set(ids) - {d["clip_id"] for d in dropped}
            missed += sum(len([c for c in kept if video(c) == v]) - 1 for v in {video(c) for c in ids})
        st, sf = np.array(st), np.array(sf)
        p, r = precision_recall(st, sf, threshold)
        print(f"| {name} | {st.min():.3f}-{st.max():.3f} (1%: {np.quantile(st, 0.01):.3f}) | "
              f"{sf.min():.3f}-{sf.max():.3f} (99.9%: {np.quantile(sf, 0.999):.3f}) | {p:.3f} | "
              f"{r:.3f} | {wrong} | {missed} |")


if __name__ == "__main__":
    main()
