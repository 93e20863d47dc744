"""Quality benchmark (issue 6): what the demo's sampled videos reach on the probes, and the CPU
training minutes it took. Not a test; prints scores against two baselines measured in the same
run: the probes on the real sharded clips at the training size (the ceiling: what the probes
give on data that is right by construction) and chance (1/8 colours, 1/4 directions).

Target: on the built-in synthetic source, colour correct in >= 90% of samples and motion
direction in >= 80%, within 15 minutes of CPU training.

    python benchmarks/bench_quality.py [--root DIR] [hydra overrides ...]

It runs the real graph (`spacetime run`: synthetic source, Ray curation, shards, DeepSpeed on
Ray Train, eval) with experiment=quality (conf/experiment/quality.yaml: 400 videos, ~15 min of
training on one 2-core worker, eval at three checkpoints) and the given overrides (e.g.
`train.steps=1500`), W&B off, in a fresh run root unless --root reuses one (then cached stages
are reused and their recorded training time is reported).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGETS = {"color": 0.90, "direction": 0.80}
TARGET_MINUTES = 15.0
CHANCE = {"background": 1 / 5, "color": 1 / 8, "shape": 1 / 3, "direction": 1 / 4, "count": 1 / 3}


def run_graph(root: Path, overrides: list[str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    env["SPACETIME_RUN_ID"] = ""
    cmd = [sys.executable, "-m", "pipeline.cli", "run", f"run.root={root}", "tracking=disabled",
           *overrides]
    print("running:", " ".join(cmd[2:]), flush=True)
    t0 = time.time()
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    (root / "bench_quality.log").write_text(r.stdout + "\n" + r.stderr)
    if r.returncode != 0:
        sys.exit(f"the graph failed ({r.returncode}); see {root / 'bench_quality.log'}\n"
                 + r.stderr[-2000:])
    line = next(s for s in r.stdout.splitlines() if s.strip().startswith("lineage :"))
    lineage = json.loads(Path(line.split(":", 1)[1].strip()).read_text())
    lineage["wall_s"] = time.time() - t0
    return lineage


def ceiling(shard_dir: Path, train_cfg: dict) -> dict[str, float]:
    """Probe scores of the sharded real clips, decoded like training decodes them."""
    import numpy as np

    from data.shards import read_shards
    from training.clips import decode_sample
    from training.evaluation.probes import probe_scores, probe_video

    index = json.loads((shard_dir / "index.json").read_text())
    urls = [str(shard_dir / p) for split in ("train", "val") for p in index[split]]
    size = (train_cfg["height"], train_cfg["width"])
    passes = []
    for s in read_shards(urls):
        video, caption = decode_sample(s, train_cfg["num_frames"], size,
                                       train_cfg["data"]["target_fps"], rng=None)
        passes.append(probe_video(np.ascontiguousarray(video.permute(1, 2, 3, 0).numpy()), caption)["pass"])
    return probe_scores(passes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=None, help="run root (default: a fresh temp dir)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides on top of experiment=quality")
    args = ap.parse_args()
    root = (args.root or Path(tempfile.mkdtemp(prefix="bench_quality-"))).resolve()
    root.mkdir(parents=True, exist_ok=True)
    overrides = ["experiment=quality", *args.overrides]
    lineage = run_graph(root, overrides)
    dirs = {n: Path(s["path"]) for n, s in lineage["stages"].items()}

    train = json.loads((dirs["train"] / "train_result.json").read_text())
    tcfg = json.loads((dirs["train"] / "train_config.json").read_text())
    res = json.loads((dirs["eval"] / "results.json").read_text())
    real = ceiling(dirs["shard"], tcfg)
    minutes = train["train_seconds"] / 60
    states = ", ".join(f"{n}={s['state']}" for n, s in lineage["stages"].items())
    print(f"\nroot {root}  (graph wall time {lineage['wall_s'] / 60:.1f} min; {states})")
    print(f"training: {train['steps']} steps, {minutes:.1f} min on {train['world_size']} CPU "
          f"workers, final loss {train['final_loss']:.3f}; val loss {res['val/loss']:.3f}")
    print(f"samples: {res['probe/samples']} prompts, {res['checkpoints'][-1]['weights']} weights\n")
    print(f"{'probe':16s} {'samples':>8s} {'real clips':>11s} {'ratio':>6s} {'chance':>7s} {'target':>7s}")
    for probe in ("background", "color", "shape", "direction", "count", "count_constant",
                  "flicker", "all"):
        got, ceil = res[f"probe/{probe}"], real.get(f"probe/{probe}", float("nan"))
        target = TARGETS.get(probe)
        verdict = "" if target is None else f"{target:6.0%} {'met' if got >= target else 'missed'}"
        chance = f"{CHANCE[probe]:6.0%}" if probe in CHANCE else ""
        print(f"{probe:16s} {got:8.1%} {ceil:11.1%} {got / ceil if ceil else float('nan'):6.2f}x "
              f"{chance:>7s} {verdict}")
    if len(res["checkpoints"]) > 1:
        print("\nby checkpoint (eval.steps):  step  colour  direction  shape  count  all  val loss")
        for ck in res["checkpoints"]:
            m = ck["metrics"]
            print(f"{'':28s} {ck['step']:5d} {m['probe/color']:7.1%} {m['probe/direction']:10.1%} "
                  f"{m['probe/shape']:6.1%} {m['probe/count']:6.1%} {m['probe/all']:4.0%} {m['val/loss']:9.3f}")
    met = all(res[f"probe/{p}"] >= t for p, t in TARGETS.items()) and minutes <= TARGET_MINUTES
    print(f"\ntarget (colour >= 90%, direction >= 80%, <= {TARGET_MINUTES:.0f} min of training): "
          f"{'met' if met else 'missed'} ({minutes:.1f} min)")
    print(f"samples: {dirs['eval'] / 'samples' / 'grid.mp4'}")


if __name__ == "__main__":
    main()
