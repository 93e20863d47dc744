"""`spacetime generate` on real files: a run root laid out as the graph writes it (stages/ with
markers, runs/<id>/lineage.json, runs/latest.json) holding a tiny "trained" pixel DiT (final
export and a ZeRO-0 checkpoint tag) and a latent one over a tiny random VAE (the vae stage's
layout); mp4s read back with PyAV; the CLI through `python -m pipeline.cli generate`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from ray_checkpoints import register

from data.storage import SUCCESS
from pipeline.cli import parse_generate_argv
from pipeline.generate import RESULT, GenerateConfig, GenerateError, generate, prepare
from training.checkpoint import tag_of
from training.latent.space import LatentConfig
from training.latent.vae import VAEConfig
from training.model import ModelConfig
from training.trainer import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

T, SIZE, FPS = 8, 32, 8.0
PROMPT = "two red squares moving left on a black background"
REPO = Path(__file__).resolve().parent.parent


def tiny_model_cfg(in_channels: int | None = None, patch=(2, 8, 8)) -> ModelConfig:
    cfg = ModelConfig()
    cfg.dit.patch_size, cfg.dit.hidden_size, cfg.dit.depth, cfg.dit.num_heads = list(patch), 32, 1, 2
    cfg.dit.text_dim = cfg.text.dim = 32
    cfg.dit.in_channels = in_channels or 3
    cfg.text.depth, cfg.text.num_heads, cfg.text.max_length = 1, 2, 16
    return ModelConfig(dit=cfg.dit, text=cfg.text)


def random_weights(mcfg: ModelConfig, seed: int) -> dict:
    """The model with every weight perturbed (adaLN-Zero would make an untrained DiT the identity)."""
    torch.manual_seed(seed)
    model = mcfg.build()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model.state_dict()


def write_train_output(d: Path, mcfg: ModelConfig, tcfg: TrainConfig, latent: dict | None, seed: int = 0) -> None:
    """What the trainer exports (model.pt, model_ema.pt, the two configs, train_result.json) and
    a ZeRO-0 checkpoint tag of step 1 with other weights; the stage's completion marker."""
    d.mkdir(parents=True)
    torch.save(random_weights(mcfg, seed), d / "model.pt")
    torch.save(random_weights(mcfg, seed + 1), d / "model_ema.pt")
    (d / "model_config.json").write_text(json.dumps(asdict(mcfg)))
    (d / "train_config.json").write_text(json.dumps({**asdict(tcfg), "latent": latent}))
    (d / "train_result.json").write_text(json.dumps({"steps": tcfg.steps}))
    (d / "info.json").write_text(json.dumps({"stage": "train", "config": {"model": {}, "train": {}}}))
    save = d / "save" / tag_of(1)
    save.mkdir(parents=True)
    torch.save({"module": random_weights(mcfg, seed + 100)}, save / "mp_rank_00_model_states.pt")
    (save.parent / "latest").write_text(tag_of(1))
    register(d, [(save.parent, {"step": 1})], move=True)
    (d / SUCCESS).write_text(json.dumps({"hash": "x"}))


def write_run(root: Path, run_id: str, stages: dict[str, Path], eval_cfg: dict | None = None) -> None:
    (root / "runs" / run_id).mkdir(parents=True)
    lineage = {"run_id": run_id, "config": {"eval": eval_cfg or {"sample_steps": 2, "cfg_scale": 2.0}},
               "stages": {n: {"path": str(p), "state": "done"} for n, p in stages.items()}}
    (root / "runs" / run_id / "lineage.json").write_text(json.dumps(lineage))
    (root / "runs" / "latest.json").write_text(json.dumps({"run_id": run_id}))


@pytest.fixture(scope="module")
def pixel_root(tmp_path_factory) -> Path:
    """A run root with one run whose train stage made a pixel model (8 frames, 32x32, 8 fps)."""
    root = tmp_path_factory.mktemp("pixel")
    train = root / "stages" / "train-0123456789ab"
    tcfg = TrainConfig(steps=2, num_frames=T, height=SIZE, width=SIZE)
    tcfg.data.target_fps = FPS
    write_train_output(train, tiny_model_cfg(), tcfg, None)
    (root / "stages" / "shard-aaaaaaaaaaaa").mkdir()
    write_run(root, "20260101-000000-ab12", {"shard": root / "stages" / "shard-aaaaaaaaaaaa", "train": train})
    return root


@pytest.fixture(scope="module")
def latent_root(tmp_path_factory) -> Path:
    """A run root whose model was trained on latents of a tiny random VAE (compression (4, 8, 8))
    saved as the vae stage saves it; 9-frame 32x32 clips are (4, 3, 4, 4) latents."""
    root = tmp_path_factory.mktemp("latent")
    vae_dir = root / "stages" / "vae-bbbbbbbbbbbb"
    vae_dir.mkdir(parents=True)
    torch.manual_seed(0)
    vae = VAEConfig().build()
    torch.save(vae.state_dict(), vae_dir / "vae.pt")
    (vae_dir / "vae_config.json").write_text(json.dumps(asdict(vae.cfg)))
    (vae_dir / SUCCESS).write_text("{}")
    space = LatentConfig(kind="ours").build(vae_dir=str(vae_dir))
    latent = {**space.describe(), "video_shape": [9, SIZE, SIZE], "latent_shape": [space.channels, 3, 4, 4],
              "target_fps": FPS, "store_dtype": "fp32", "text": None}
    tcfg = TrainConfig(steps=3, num_frames=9, height=SIZE, width=SIZE)
    tcfg.data.target_fps, tcfg.data.kind = FPS, "latent"
    train = root / "stages" / "train-cccccccccccc"
    write_train_output(train, tiny_model_cfg(space.channels, patch=(1, 2, 2)), tcfg, latent)
    write_run(root, "20260102-000000-cd34", {"vae": vae_dir, "train": train})
    return root


def probe_mp4(path: Path) -> tuple[int, float, int, int, np.ndarray]:
    """(decoded frame count, the stream's fps, height, width, the frames) with PyAV."""
    with av.open(str(path)) as f:
        s = f.streams.video[0]
        frames = np.stack([fr.to_ndarray(format="rgb24") for fr in f.decode(s)])  # (T, H, W, 3)
        return len(frames), float(s.average_rate), s.height, s.width, frames


def corrupt_copy(root: Path, dst: Path) -> Path:
    """A copy of the run root (its records pointing into the copy) with every weights file
    (model, EMA, tag, VAE) replaced by garbage."""
    shutil.copytree(root, dst)
    for p in dst.rglob("*.json"):
        p.write_text(p.read_text().replace(str(root), str(dst)))
    for p in dst.rglob("*.pt"):
        p.write_bytes(b"not a checkpoint")
    return dst


# ----- the sampling, written and recorded ------------------------------------------------------
def test_writes_the_requested_video_and_records_the_request(pixel_root, tmp_path):
    out = tmp_path / "gen"
    cfg = GenerateConfig(prompts=[PROMPT], seconds=2.0, height=24, width=40, fps=6.0, steps=2, guidance=2.5,
                         seed=3, num_samples=2, negative_prompt="blurry", out=str(out))
    rec = generate(cfg, pixel_root, log=lambda s: None)
    assert sorted(p.name for p in out.iterdir()) == [RESULT, "sample-00.mp4", "sample-01.mp4"]
    for s in rec["samples"]:
        n, fps, h, w, _ = probe_mp4(out / s["path"])
        assert (n, fps, h, w) == (12, 6.0, 24, 40), (n, fps, h, w)
    saved = json.loads((out / RESULT).read_text())
    assert saved["request"] == {**asdict(cfg)}
    r = saved["resolved"]
    assert (r["frames"], r["height"], r["width"], r["fps"]) == (12, 24, 40, 6.0)
    assert r["run_id"] == "20260101-000000-ab12" and r["stage"] == "train"
    assert r["checkpoint"]["kind"] == "final" and r["checkpoint"]["step"] == 2 and r["weights"] == "ema"
    assert r["sampler"]["steps"] == 2 and r["sampler"]["guidance"] == 2.5 and not r["latent"]
    assert [s["seed"] for s in saved["samples"]] == [3, 4]
    assert r["beyond_training"] is True  # 12 frames > the 8 trained


def test_frames_must_fit_the_patch(pixel_root):
    """patch_size pt=2: odd frame counts fail, naming the nearest durations that work."""
    with pytest.raises(GenerateError, match=r"--seconds 1.125 at 8 fps = 9 frames, which this model cannot "
                                            r"take: it needs a multiple of the patch's 2 frames.*"
                                            r"--seconds 1 \(8 frames\) or --seconds 1.25 \(10 frames\)"):
        prepare(GenerateConfig(prompts=[PROMPT], seconds=1.125), pixel_root)


def test_same_seed_same_video_other_seed_other_video(pixel_root, tmp_path):
    def run(seed, name):
        out = tmp_path / name
        generate(GenerateConfig(prompts=[PROMPT], frames=4, steps=2, seed=seed, out=str(out)), pixel_root,
                 log=lambda s: None)
        return probe_mp4(out / "sample-00.mp4")[4]

    a, b, c = run(7, "a"), run(7, "b"), run(8, "c")
    assert np.array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 1.0


def test_longer_than_trained_is_allowed_and_said(pixel_root, tmp_path):
    lines: list[str] = []
    rec = generate(GenerateConfig(prompts=[PROMPT], seconds=3, steps=1, out=str(tmp_path / "long")), pixel_root,
                   log=lines.append)
    assert rec["resolved"]["frames"] == 24 and rec["resolved"]["beyond_training"] is True
    assert rec["resolved"]["trained"] == {"frames": T, "height": SIZE, "width": SIZE, "fps": FPS, "seconds": 1.0}
    warn = [s for s in lines if s.startswith("spacetime: warning:")]
    assert len(warn) == 1 and "longer than the model was trained on (8 frames, 1 s at 8 fps)" in warn[0]
    assert probe_mp4(tmp_path / "long" / "sample-00.mp4")[0] == 24
    _, plan = prepare(GenerateConfig(prompts=[PROMPT]), pixel_root)  # the training's own shape
    assert plan["beyond_training"] is False and plan["warnings"] == [] and plan["frames"] == T


def test_defaults_come_from_the_run_and_the_training(pixel_root):
    _, plan = prepare(GenerateConfig(prompts=[PROMPT]), pixel_root)
    assert (plan["frames"], plan["height"], plan["width"], plan["fps"]) == (T, SIZE, SIZE, FPS)
    assert plan["sampler"]["steps"] == 2 and plan["sampler"]["guidance"] == 2.0  # the lineage's eval section


# ----- which weights ---------------------------------------------------------------------------
def test_checkpoint_step_stage_and_path(pixel_root, tmp_path):
    src, plan = prepare(GenerateConfig(prompts=[PROMPT], checkpoint="1"), pixel_root)
    assert src.ref.kind == "deepspeed" and src.ref.step == 1 and plan["checkpoint"]["step"] == 1
    train = pixel_root / "stages" / "train-0123456789ab"
    src, _ = prepare(GenerateConfig(prompts=[PROMPT], checkpoint=str(train)), "/nonexistent")
    assert src.ref.path == train and src.run_id is None
    src, _ = prepare(GenerateConfig(prompts=[PROMPT], stage="train-0123456789ab"), pixel_root)
    assert src.ref.train_dir == train and src.stage == "train"
    with pytest.raises(GenerateError, match=r"no registered checkpoint for step 5 .*registered: \['step00000001'\]"):
        prepare(GenerateConfig(prompts=[PROMPT], checkpoint="5"), pixel_root)
    a = generate(GenerateConfig(prompts=[PROMPT], frames=2, steps=1, checkpoint="1", out=str(tmp_path / "s1")),
                 pixel_root, log=lambda s: None)
    b = generate(GenerateConfig(prompts=[PROMPT], frames=2, steps=1, out=str(tmp_path / "s2")), pixel_root,
                 log=lambda s: None)
    assert a["resolved"]["weights"] == "raw" and b["resolved"]["weights"] == "ema"
    assert not np.array_equal(probe_mp4(tmp_path / "s1" / "sample-00.mp4")[4],
                              probe_mp4(tmp_path / "s2" / "sample-00.mp4")[4])


def test_latest_complete_train_stage_of_a_chain(tmp_path, pixel_root):
    """Of two train stages the last complete one is taken; an incomplete one is skipped."""
    root = tmp_path / "root"
    shutil.copytree(pixel_root, root)
    first = root / "stages" / "train-0123456789ab"
    second = root / "stages" / "train_long-ffffffffffff"
    shutil.copytree(first, second)
    third = root / "stages" / "train_min-eeeeeeeeeeee"
    shutil.copytree(first, third)
    (third / SUCCESS).unlink()
    write_run(root, "20260103-000000-ef56", {"train": first, "train_long": second, "train_min": third})
    src, _ = prepare(GenerateConfig(prompts=[PROMPT]), root)
    assert src.stage == "train_long" and src.ref.train_dir == second and src.run_id == "20260103-000000-ef56"
    src, _ = prepare(GenerateConfig(prompts=[PROMPT], stage="train", run="20260103-000000-ef56"), root)
    assert src.ref.train_dir == first
    with pytest.raises(GenerateError, match="train stage train_min .* is not complete"):
        prepare(GenerateConfig(prompts=[PROMPT], stage="train_min"), root)
    moved = tmp_path / "moved"  # a root moved since: its lineage's paths name the old place
    shutil.move(root, moved)
    src, _ = prepare(GenerateConfig(prompts=[PROMPT]), moved)
    assert src.ref.train_dir == moved / "stages" / "train_long-ffffffffffff"


# ----- bad requests fail before any weights are loaded ----------------------------------------
@pytest.mark.parametrize("kw, message", [
    ({"frames": 9}, (r"--frames 9, which this model cannot take.*--seconds 1 \(8 frames\) or "
                     r"--seconds 1.25 \(10 frames\); or --frames 10")),
    ({"height": 30}, r"--height 30 is not a multiple of 8 \(the patch's 8\); nearest that work: 24 or 32"),
    ({"width": 4}, r"--width 4 is not a multiple of 8 .*nearest that work: 8$"),
    ({"run": "nope"}, r"unknown run 'nope' under run.root=.*; runs: 20260101-000000-ab12"),
    ({"stage": "trian"}, (r"run 20260101-000000-ab12 has no train stage 'trian'; its train stages: train "
                          r"\(stages: shard, train\)")),
])
def test_bad_requests_fail_before_loading_weights(pixel_root, tmp_path, kw, message):
    root = corrupt_copy(pixel_root, tmp_path / "root")
    cfg = GenerateConfig(prompts=[PROMPT], out=str(tmp_path / "out"), **kw)
    with pytest.raises(GenerateError, match=message):
        generate(cfg, root, log=lambda s: None)
    assert not (tmp_path / "out").exists()
    # the same root with a good request does reach the (corrupt) weights
    with pytest.raises(Exception, match="(?i)pickle|invalid load key|weights"):
        generate(GenerateConfig(prompts=[PROMPT], frames=2, steps=1, out=str(tmp_path / "ok")), root,
                 log=lambda s: None)


def test_no_runs_and_config_checks(tmp_path):
    with pytest.raises(GenerateError, match=r"no runs under run.root=.*runs/latest.json"):
        prepare(GenerateConfig(prompts=[PROMPT]), tmp_path)
    with pytest.raises(GenerateError, match="needs a prompt"):
        GenerateConfig(prompts=[])
    with pytest.raises(GenerateError, match="--seconds or --frames, not both"):
        GenerateConfig(prompts=[PROMPT], seconds=1, frames=8)
    with pytest.raises(ValueError, match="seconds must be > 0"):
        GenerateConfig(prompts=[PROMPT], seconds=-1)


def test_a_device_that_is_not_here_fails_before_loading(pixel_root, tmp_path):
    root = corrupt_copy(pixel_root, tmp_path / "root")
    with pytest.raises(GenerateError, match="'tpu0' is not a device"):
        prepare(GenerateConfig(prompts=[PROMPT], device="tpu0"), root)
    if not torch.cuda.is_available():
        with pytest.raises(GenerateError, match="--device cuda: this machine has 0 GPU"):
            prepare(GenerateConfig(prompts=[PROMPT], device="cuda"), root)


# ----- latent models: through the run's VAE ---------------------------------------------------
def test_latent_model_decodes_through_the_vae(latent_root, tmp_path):
    out = tmp_path / "lat"
    rec = generate(GenerateConfig(prompts=[PROMPT], frames=17, steps=2, seed=1, out=str(out)), latent_root,
                   log=lambda s: None)
    r = rec["resolved"]
    assert r["latent"] and r["shape"] == [4, 5, 4, 4] and r["tokens"] == 5 * 2 * 2
    assert r["beyond_training"] is True and r["trained"]["frames"] == 9
    n, fps, h, w, frames = probe_mp4(out / "sample-00.mp4")
    assert (n, fps, h, w) == (17, FPS, SIZE, SIZE)
    assert frames.std() > 1.0  # a decoded video, not a constant
    # decoded one latent frame at a time (bounded memory for long clips): the same video
    generate(GenerateConfig(prompts=[PROMPT], frames=17, steps=2, seed=1, decode_chunk=1, out=str(tmp_path / "c")),
             latent_root, log=lambda s: None)
    chunked = probe_mp4(tmp_path / "c" / "sample-00.mp4")[4]
    assert np.abs(chunked.astype(int) - frames.astype(int)).mean() < 0.5


def test_latent_frame_counts_follow_the_vae(latent_root, tmp_path):
    root = corrupt_copy(latent_root, tmp_path / "root")
    with pytest.raises(GenerateError, match=r"--seconds 2 at 8 fps = 16 frames, which this model cannot take: "
                                            r"it needs 1 \+ k\*4 frames \(the VAE's temporal compression 4\)\. "
                                            r"Nearest that work at 8 fps: --seconds 1.625 \(13 frames\) or "
                                            r"--seconds 2.125 \(17 frames\); or --frames 17"):
        prepare(GenerateConfig(prompts=[PROMPT], seconds=2), root)
    with pytest.raises(GenerateError, match=r"--seconds 59.625 \(477 frames\) or --seconds 60.125 \(481 frames\)"):
        prepare(GenerateConfig(prompts=[PROMPT], seconds=60), root)  # the README's example
    with pytest.raises(GenerateError, match=r"--height 36 is not a multiple of 16 \(the VAE's spatial compression "
                                            r"8 x the patch's 2\); nearest that work: 32 or 48"):
        prepare(GenerateConfig(prompts=[PROMPT], height=36), root)
    # a root moved since training: the VAE is found as the same stage directory under it
    tc = root / "stages" / "train-cccccccccccc" / "train_config.json"
    tc.write_text(tc.read_text().replace(str(root / "stages"), "/moved/away"))
    assert prepare(GenerateConfig(prompts=[PROMPT]), root)[1]["vae"] == str(root / "stages" / "vae-bbbbbbbbbbbb")
    shutil.rmtree(root / "stages" / "vae-bbbbbbbbbbbb")
    with pytest.raises(GenerateError, match="trained on latents of the VAE at .* which is gone"):
        prepare(GenerateConfig(prompts=[PROMPT]), root)


# ----- the command line -----------------------------------------------------------------------
def test_parse_generate_argv():
    flags, rest = parse_generate_argv(["a red ball", "--seconds", "60", "--fps=24", "--raw", "cat",
                                       "run.root=/x", "+a.b=1", "--cfg", "job", "--prompt", "x=y z",
                                       "--negative", "blurry, dark", "--seed", "-3"])
    assert flags == {"prompts": ["a red ball", "cat", "x=y z"], "seconds": 60.0, "fps": 24.0, "use_ema": False,
                     "negative_prompt": "blurry, dark", "seed": -3}
    assert rest == ["run.root=/x", "+a.b=1", "--cfg", "job"]
    with pytest.raises(SystemExit, match="--frames needs a int, got 'ten'"):
        parse_generate_argv(["p", "--frames", "ten"])
    with pytest.raises(SystemExit, match="--steps needs a value"):
        parse_generate_argv(["p", "--steps"])
    with pytest.raises(SystemExit) as usage:
        parse_generate_argv(["--usage"])
    assert usage.value.code == 0
    assert parse_generate_argv(["p", "--info", "x=1"]) == ({"prompts": ["p"]}, ["--info", "x=1"])
    assert parse_generate_argv(["--info", "config", "p"]) == ({"prompts": ["p"]}, ["--info", "config"])


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "generate", *args], check=False,
                          capture_output=True,
                          text=True, timeout=300, cwd=REPO, env=env)


def test_cli_end_to_end(pixel_root, tmp_path):
    out = tmp_path / "cli"
    r = cli(PROMPT, "--seconds", "2", "--steps", "1", "--seed", "5", "--out", str(out), f"run.root={pixel_root}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "spacetime: warning: 2 s (16 frames at 8 fps) is longer than the model was trained on" in r.stdout
    assert probe_mp4(out / "sample-00.mp4")[:4] == (16, FPS, SIZE, SIZE)
    rec = json.loads((out / RESULT).read_text())
    assert rec["request"]["seconds"] == 2.0 and rec["request"]["seed"] == 5 and rec["samples"][0]["seed"] == 5
    bad = cli(PROMPT, "--frames", "7", f"run.root={pixel_root}")
    assert bad.returncode != 0
    assert "spacetime: --frames 7, which this model cannot take" in bad.stderr
    assert "or --frames 8" in bad.stderr


def test_sequence_parallel_generation_on_ray_workers_matches_one_process(latent_root, tmp_path, ray_local):
    """--sequence-parallel 2: two Ray Train workers (gloo) sample each video together, its tokens
    split between them; every rank runs the whole sampler (no hang), rank 0 hands the videos back.
    The same video as one process, decoded through the VAE."""
    kw = dict(prompts=[PROMPT], frames=17, steps=2, seed=1, guidance=2.0)
    one = generate(GenerateConfig(**kw, out=str(tmp_path / "one")), latent_root, log=lambda s: None)
    two = generate(GenerateConfig(**kw, sequence_parallel=2, out=str(tmp_path / "two")), latent_root,
                   log=lambda s: None)
    assert two["resolved"]["sequence_parallel"] == 2 and two["resolved"]["weights"] == one["resolved"]["weights"]
    a = probe_mp4(tmp_path / "one" / "sample-00.mp4")[4].astype(int)
    b = probe_mp4(tmp_path / "two" / "sample-00.mp4")[4].astype(int)
    assert a.shape == b.shape and a.std() > 1.0
    assert np.abs(a - b).mean() < 0.5


def test_a_sequence_parallel_degree_that_splits_no_heads_fails_before_loading(latent_root, tmp_path):
    root = corrupt_copy(latent_root, tmp_path / "root")
    with pytest.raises(GenerateError, match=r"--sequence-parallel 3 must divide the model's 2 attention heads .*use one of \[1, 2\]"):
        generate(GenerateConfig(prompts=[PROMPT], frames=17, sequence_parallel=3), root, log=lambda s: None)
