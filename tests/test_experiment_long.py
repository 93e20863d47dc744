"""`experiment=long` at test scale (issue 22, part 6): the same graph as the minute-long run
(bouncing long shots kept whole, our VAE, whole-clip latents, the short-to-long recipe in latent
space at sequence parallelism 2 on 2 Ray Train workers, long samples on SP workers, the
consistency probes, the report), on 10-second clips with a few steps, through the real CLI. It
also stands for a two-stage recipe through the graph (stage chaining, warm start, hashes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from data.shards import read_shards
from training.warm_start import digest, initial_weights

REPO = Path(__file__).resolve().parents[1]
SECONDS = 10.125  # 81 frames at 8 fps: 1 + 4k, one whole shot per video


@pytest.fixture(scope="module")
def long_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("long") / "out"
    args = ["experiment=long", f"run.root={root}", "tracking=disabled",
            "source.num_videos=6", f"source.seconds={SECONDS}", "vae.steps=2", "vae.stats_clips=2",
            "recipe.stages.0.train.steps=3", "recipe.stages.1.train.steps=2",
            # the minute's buckets do not fit 10 s clips: 5 s and the whole 10 s instead
            "recipe.stages.1.train.data.buckets=[{num_frames:81,height:32,width:32,batch_size:0,prob:0.5},"
            "{num_frames:41,height:32,width:32,batch_size:0}]",
            f"eval.long.seconds=[{SECONDS}]", "eval.long.window_seconds=5", "eval.long.num_prompts=1",
            "eval.val_max_clips=2", "eval.sample_steps=2", "eval.num_prompts=2"]
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", *args], cwd=REPO,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "report", f"run.root={root}"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return root


def stage(root: Path, name: str) -> Path:
    (path,) = (root / "stages").glob(f"{name}-*")
    return path


def test_long_shots_stay_whole_and_latents_hold_every_frame(long_run):
    shard = stage(long_run, "shard")
    clips = [s["json"] for s in read_shards([str(shard / p) for p in
                                             json.loads((shard / "index.json").read_text())["train"]])]
    assert clips and all(c["end"] - c["start"] == 81 and c.get("window_count", 1) == 1 for c in clips)
    pre = stage(long_run, "precompute")
    stats = json.loads((pre / "stats.json").read_text())
    assert stats["span"] == "whole" and stats["clips_encoded"] >= len(clips)
    lat = [s["json"] for s in read_shards([str(pre / p) for p in json.loads((pre / "index.json").read_text())["train"]])]
    assert all(m["video_shape"] == [81, 32, 32] and m["latent_shape"][1] == 21 for m in lat)


def test_the_recipe_trains_at_sequence_parallel_2_from_the_short_stage(long_run):
    short, long = stage(long_run, "train_short"), stage(long_run, "train_long")
    rs = json.loads((short / "train_result.json").read_text())
    rl = json.loads((long / "train_result.json").read_text())
    for r in (rs, rl):
        assert r["world_size"] == 2 and r["sequence_parallel"] == 2 and r["skipped_samples"] == 0
    assert rs["init"] is None and rl["init"]["from"] == "train_short"
    # the long stage's step 0 had exactly the short stage's final EMA weights
    assert rl["init"]["digest"] == digest(initial_weights(str(short), "ema"))
    cfg = json.loads((long / "train_config.json").read_text())
    assert [b["num_frames"] for b in cfg["data"]["buckets"]] == [81, 41] and cfg["data"]["token_budget"] == 512
    info = json.loads((long / "info.json").read_text())
    assert info["input_hashes"]["train_short"] == json.loads((short / "info.json").read_text())["hash"]


def test_long_samples_are_probed_window_by_window_and_reported(long_run):
    ev = stage(long_run, "eval")
    m = json.loads((ev / "results.json").read_text())
    key = f"long/{SECONDS:g}s"
    assert m[f"{key}/samples"] == 1
    for probe in ("count_held", "none_vanished", "color_held", "background_held", "direction_held"):
        assert 0.0 <= m[f"{key}/{probe}"] <= 1.0
    (length,) = m["long"]["lengths"]
    assert length["frames"] == 81 and len(m["long"]["lengths"][0]["samples"][0]["windows"]) == 2
    assert (ev / length["samples"][0]["path"]).exists()
    (report,) = long_run.rglob("*.html")
    assert "<h2>Consistency</h2>" in report.read_text()
