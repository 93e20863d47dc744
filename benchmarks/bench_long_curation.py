"""Peak memory of curation against video length: shot detection alone (decode + cut detection
+ length rules, streamed through `ShotSplitter`), the whole curate step (`analyse_video`:
that plus scores, thumbnails and keyframes) and the shard encode of one clip of the whole
video (`encode_span`), for 1, 5 and 10 minute videos in one process, as ratios against the
1-minute run. Peak = tracemalloc's (every numpy array; the decoder's own C buffers are not
counted). For reference, "whole video" is what holding every decoded frame would take, as
curation did before it streamed.

    python benchmarks/bench_long_curation.py [--minutes 1 5 10] [--size 90x160] [--fps 24]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import tracemalloc
from fractions import Fraction
from functools import partial
from pathlib import Path

import av
import numpy as np

from data.probe import ProbeConfig, probe_file
from pipeline.curation.curate import CurateConfig, CurateConfigs, analyse_video
from pipeline.curation.media import iter_display
from pipeline.curation.scores import ScoreConfig
from pipeline.curation.shard import encode_span
from pipeline.curation.shots import ShotConfig, ShotSplitter


def write_video(path: Path, minutes: int, fps: int, h: int, w: int, shot_s: float = 60.0) -> None:
    """One shot per `shot_s` seconds (its own background, a bouncing square), frame by frame."""
    rng = np.random.default_rng(0)
    n = round(minutes * 60 * fps)
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=Fraction(fps))
        s.height, s.width, s.pix_fmt = h, w, "yuv420p"
        s.options = {"preset": "ultrafast", "crf": "23"}
        bg = fg = None
        for t in range(n):
            if t % round(shot_s * fps) == 0:
                bg, fg = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
            frame = np.empty((h, w, 3), np.uint8)
            frame[:] = bg
            x, y = abs(t % (2 * (w - 8)) - (w - 8)), abs(t % (2 * (h - 8)) - (h - 8))
            frame[y : y + 8, x : x + 8] = fg
            for p in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def peak(fn) -> tuple[float, float]:
    """(peak MiB traced while `fn` runs, seconds)."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 2**20, time.perf_counter() - t0
    finally:
        tracemalloc.stop()


def shot_detection(path: Path, fps: float, size: tuple[int, int], cfg: ShotConfig) -> None:
    splitter = ShotSplitter(fps, cfg)
    for chunk in iter_display(str(path), size, 0):
        splitter.push(chunk)
    splitter.finish()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=int, nargs="+", default=[1, 5, 10])
    ap.add_argument("--size", default="90x160", help="HxW: curation's 160 px frames of 16:9")
    ap.add_argument("--fps", type=int, default=24)
    args = ap.parse_args()
    h, w = map(int, args.size.split("x"))
    cfg = ShotConfig()
    curate = CurateConfigs(ingest=None, probe=None, shots=cfg, scores=ScoreConfig(),
                           curate=CurateConfig(), cache_dir="")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for m in args.minutes:
            path = Path(d) / f"{m}min.mp4"
            write_video(path, m, args.fps, h, w)
            info = probe_file(str(path), ProbeConfig(max_seconds=max(600, 60 * m)))
            item = {"id": path.stem, "url": str(path), "caption": "", "meta": {}}
            n = info["num_frames"]
            shots = peak(partial(shot_detection, path, args.fps, (h, w), cfg))
            whole = peak(partial(analyse_video, item, str(path), info, curate))
            enc = peak(partial(encode_span, str(path), 0, n, float(args.fps), 0, n, 23, "ultrafast"))
            rows.append((m, n, n * h * w * 3 / 2**20, shots, whole, enc))
    base = rows[0]
    print(f"{h}x{w} at {args.fps} fps; peak traced MiB (x the {base[0]}-minute run), seconds")
    print(f"{'minutes':>7} {'frames':>7} {'whole video':>11} {'shot detection':>22} "
          f"{'curate (split+score)':>24} {'shard encode':>22}")
    for m, n, full, shots, whole, enc in rows:
        cells = [f"{v[0]:7.1f} ({v[0] / b[0]:4.2f}x) {v[1]:5.1f}s"
                 for v, b in ((shots, base[3]), (whole, base[4]), (enc, base[5]))]
        print(f"{m:>7} {n:>7} {full:9.0f}MB {cells[0]:>22} {cells[1]:>24} {cells[2]:>22}")


if __name__ == "__main__":
    main()
