"""Peak memory of encoding one whole clip into latents, against the clip's length.

    python benchmarks/bench_latent_memory.py [--seconds 10 30 60 120] [--size 64] [--fps 8]

For each length, one synthetic clip (an mp4 made here first) is encoded by our VAE (the tiny
preset, random weights: memory does not depend on the values) in a fresh subprocess, three
ways:

- ``stream``: ``latent.span=whole`` as the precompute runs it (`training.latent.precompute.
  whole_clip` + ``LatentSpace.encode_stream``): frames read chunk by chunk (4 latent frames =
  16 frames) and encoded through the causal cache;
- ``decoded``: the whole clip decoded at once, then encoded in the same chunks (what a chunked
  encode alone saves);
- ``at_once``: the whole clip decoded and encoded in one pass (no chunks).

Each figure is the subprocess's peak RSS (``ru_maxrss``) minus its RSS after imports, the
model and the mp4 bytes are loaded and one chunk-sized encode has run (the first call's
one-off allocations), so it counts what encoding the clip adds. The ratios
printed are peak at the longest / peak at the shortest length, per mode (~1: memory bounded by
the chunk, not the clip), and stream / at_once at the longest. Each figure is the median of
``--repeat`` subprocesses (the allocator's peaks vary by tens of MiB from run to run). With
glibc's default allocator the streamed peak still creeps up with length: decord's and torch's
buffers interleave on the heap and freed chunks are not returned (fragmentation, not live
memory); ``--mmap-threshold 131072`` (``MALLOC_MMAP_THRESHOLD_``) gives large buffers their own
mappings and shows the live memory alone.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def child(a) -> None:
    import torch

    from training.clips import decode_sample, normalize
    from training.latent.precompute import whole_clip
    from training.latent.space import LatentConfig
    from training.latent.vae import VAEConfig

    torch.set_num_threads(1)
    torch.manual_seed(0)
    vae_dir = Path(a.vae_dir)
    if not (vae_dir / "vae.pt").exists():
        vae = VAEConfig.from_preset("tiny").build()
        vae_dir.mkdir(parents=True, exist_ok=True)
        torch.save(vae.state_dict(), vae_dir / "vae.pt")
        (vae_dir / "vae_config.json").write_text(json.dumps(asdict(vae.cfg)))
    chunk = 4
    space = LatentConfig(kind="ours", chunk_frames=0 if a.mode == "at_once" else chunk).build(vae_dir=str(vae_dir))
    n = int(a.frames)
    sample = {"__key__": "clip", "mp4": Path(a.mp4).read_bytes(),
              "json": {"start": 0, "end": n, "fps": a.fps, "width": a.size, "height": a.size}}
    space.encode_stream(iter([torch.zeros(1, 3, 1, a.size, a.size), torch.zeros(1, 3, 4 * chunk, a.size, a.size)]))
    space.encode(torch.zeros(1, 3, 1 + 4 * chunk, a.size, a.size))  # warm-up: first-call allocations
    base = rss_peak()
    if a.mode == "stream":
        T, chunks = whole_clip(sample, (a.size, a.size), None, 4, chunk, 9)
        z = space.encode_stream(chunks)
    else:
        clip, _ = decode_sample(sample, n, (a.size, a.size), None, None)  # (3, T, H, W) uint8
        z = space.encode(normalize(clip[None]))
        T = clip.shape[1]
    print(json.dumps({"frames": T, "latent": list(z.shape), "peak_bytes": rss_peak() - base}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, nargs="+", default=[10, 30, 60, 120])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--fps", type=float, default=8.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--mmap-threshold", type=int, default=0,
                    help="glibc MALLOC_MMAP_THRESHOLD_ for the subprocesses (0: glibc's default)")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--mode", default="stream")
    ap.add_argument("--mp4")
    ap.add_argument("--frames", type=int)
    ap.add_argument("--vae-dir")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.child:
        return child(a)
    sys.path.insert(0, str(ROOT))
    import numpy as np

    from data.synthetic import render, sample_spec
    from data.video_io import encode_mp4

    out: dict = {"size": a.size, "fps": a.fps, "chunk_latent_frames": 4, "mmap_threshold": a.mmap_threshold,
                 "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for sec in a.seconds:
            n = int(sec * a.fps) + 1  # 1 + 4k frames at 8 fps
            mp4 = Path(tmp) / f"clip{sec:g}.mp4"
            mp4.write_bytes(encode_mp4(render(sample_spec(np.random.default_rng(0)), n, a.size, a.size), a.fps))
            for mode in ("stream", "decoded", "at_once"):
                runs = []
                for _ in range(a.repeat):  # the allocator's peaks vary by tens of MiB: the median
                    r = subprocess.run([sys.executable, __file__, "--child", "--mode", mode, "--mp4", str(mp4),
                                        "--frames", str(n), "--size", str(a.size), "--fps", str(a.fps),
                                        "--vae-dir", str(Path(tmp) / "vae")],
                                       capture_output=True, text=True, cwd=ROOT,
                                       env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "",
                                            **({"MALLOC_MMAP_THRESHOLD_": str(a.mmap_threshold)}
                                               if a.mmap_threshold else {})})
                    if r.returncode:
                        raise SystemExit(r.stderr[-2000:])
                    runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
                res = sorted(runs, key=lambda x: x["peak_bytes"])[len(runs) // 2]
                out["runs"].setdefault(f"{sec:g}s", {})[mode] = res
                print(f"{sec:>6g} s ({res['frames']} frames) {mode:>8}: +{res['peak_bytes'] / 2**20:7.1f} MiB",
                      flush=True)
    lo, hi = f"{min(a.seconds):g}s", f"{max(a.seconds):g}s"
    out["ratio_longest_over_shortest"] = {
        m: out["runs"][hi][m]["peak_bytes"] / max(1, out["runs"][lo][m]["peak_bytes"])
        for m in ("stream", "decoded", "at_once")}
    out["stream_over_at_once_longest"] = (out["runs"][hi]["stream"]["peak_bytes"]
                                          / out["runs"][hi]["at_once"]["peak_bytes"])
    print(json.dumps({k: out[k] for k in ("ratio_longest_over_shortest", "stream_over_at_once_longest")},
                     indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
