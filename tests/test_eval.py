"""The eval stage's parts on real objects: DeepSpeed ZeRO-2 checkpoints written by the trainer's
own `write_tag` (one gloo rank in a subprocess) and registered as Ray Train registers them, WebDataset shards of synthetic mp4 clips, a
tiny VideoMAE, I3D-style TorchScript file and open_clip model built from configs, saved and loaded
back through the paths real weights take. Then `evaluate` on a checkpoint series."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
from contextlib import closing, redirect_stdout
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import torch.distributed as dist

from data.shards import write_shard
from data.synthetic import SourceConfig, generate
from data.tracking import MemoryTracker
from data.video_io import read_frames
from training.checkpoint import UnsafeCheckpoint
from training.evaluation.evaluate import CheckpointRef, EvalConfig, evaluate, load_checkpoint, resolve_checkpoints
from training.evaluation.probes import PROBES
from training.evaluation.samples import grid_video
from training.evaluation.video_metrics import (
    ClipScoreConfig,
    FVDConfig,
    clip_score,
    feature_stats,
    frechet_distance,
    fvd,
)
from training.model import ModelConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

T, SIZE = 8, 32
SYNTH = "two red squares moving left on a black background"


def tiny_model_cfg() -> ModelConfig:
    cfg = ModelConfig()
    cfg.dit.patch_size, cfg.dit.hidden_size, cfg.dit.depth, cfg.dit.num_heads = [2, 8, 8], 32, 1, 2
    cfg.dit.text_dim = cfg.text.dim = 32
    cfg.text.depth, cfg.text.num_heads, cfg.text.max_length = 1, 2, 16
    return ModelConfig(dit=cfg.dit, text=cfg.text)


# ----- fixtures: a trained-for-two-steps DeepSpeed run, held-out shards, tiny metric models --
def in_subprocess(function: str, *paths: Path) -> None:
    """test_eval.<function>(*paths) in a fresh Python (DeepSpeed's process groups are module
    globals: an engine per process)."""
    args = ", ".join(f"Path({str(p)!r})" for p in paths)
    script = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
              f"from test_eval import {function}; from pathlib import Path; {function}({args})")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]


def solo_zero2_engine():
    """A one-rank gloo group and a ZeRO-2 DeepSpeed engine over the tiny model (AdamW, lr 3e-2),
    as the trainer builds it; for the subprocess helpers below. Returns (model, engine)."""
    import deepspeed  # lazy: only in the subprocesses that build an engine

    from training.parallelize import DeepSpeedConfig, build_ds_config

    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0",
                       "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    dist.init_process_group("gloo", rank=0, world_size=1)
    model = tiny_model_cfg().build()
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=3e-2),
        model_parameters=model.parameters(),
        config=build_ds_config(DeepSpeedConfig(zero_stage=2), 2, "fp32"), dist_init_required=False)
    return model, engine


def write_train_dir(out: Path) -> None:
    """Two optimizer steps of ZeRO-2 on one gloo rank with a checkpoint tag after each, the
    trainer's final exports, and snapshots.pt: {step: (raw weights, EMA weights)} at each save.
    Run in a subprocess: DeepSpeed keeps its process groups in module globals, so a second
    engine in the same process (another test file) would find the first one's dead groups."""
    from ray_checkpoints import register
    from training.checkpoint import write_tag
    from training.ema import EMA
    from training.flow import FlowConfig, flow_loss
    from training.trainer import TrainConfig

    torch.manual_seed(0)
    mcfg = tiny_model_cfg()
    model, engine = solo_zero2_engine()
    ema = EMA({k: p for k, p in model.named_parameters() if p.requires_grad}, decay=0.5)
    saves = []
    ids, mask = model.tokenize([SYNTH, "a cat"])
    snapshots = {}
    for step in (1, 2):
        x0 = torch.rand(2, 3, T, SIZE, SIZE) * 2 - 1  # (B, 3, T, H, W)
        loss, _, _ = flow_loss(lambda x, t: engine(x, t, ids, mask), x0, FlowConfig(),
                               generator=torch.Generator().manual_seed(step))
        engine.backward(loss)
        engine.step()
        ema.update({k: p for k, p in engine.module.named_parameters() if p.requires_grad})
        write_tag(engine, out / ".staging" / str(step), step, {"rng": {}, "loader": {}}, ema.state_dict())
        saves.append((out / ".staging" / str(step), {"step": step, "world_size": 1}))
        snapshots[step] = ({k: v.detach().clone() for k, v in engine.module.state_dict().items()},
                           {k: v.clone() for k, v in ema.shadow.items()})
    register(out, saves, move=True)
    torch.save(snapshots[2][0], out / "model.pt")
    torch.save(snapshots[2][1], out / "model_ema.pt")
    torch.save(snapshots, out / "snapshots.pt")
    (out / "model_config.json").write_text(json.dumps(asdict(mcfg)))
    tcfg = TrainConfig(steps=2, num_frames=T, height=SIZE, width=SIZE)
    (out / "train_config.json").write_text(json.dumps({**asdict(tcfg), "latent": None}))  # as the trainer
    (out / "train_result.json").write_text(json.dumps({"steps": 2}))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    in_subprocess("write_train_dir", out)
    return out, torch.load(out / "snapshots.pt", weights_only=True)


def write_val_shard(root: Path, num_videos: int, seconds: float, size: int = SIZE) -> list[str]:
    """One validation shard of `num_videos` whole synthetic videos, as the shard stage writes them."""
    rows = generate(SourceConfig(num_videos=num_videos, bad_fraction=0.0, multishot_fraction=0.0, seed=5,
                                 width=size, height=size, seconds=seconds), root / "src")
    samples = [{"__key__": r["id"], "mp4": (root / "src" / r["path"]).read_bytes(),
                "json": {"start": 0, "end": r["num_frames"], "fps": r["fps"], "width": r["width"],
                         "height": r["height"], "caption": r["caption"]}, "txt": r["caption"]}
               for r in rows]
    write_shard(str(root / "val-000000.tar"), samples)
    return [str(root / "val-000000.tar")]


@pytest.fixture(scope="module")
def val_shards(tmp_path_factory) -> list[str]:
    return write_val_shard(tmp_path_factory.mktemp("val"), 3, 1.0)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random open_clip model in open_clip's local-dir layout, weights included."""
    import open_clip

    d = tmp_path_factory.mktemp("open_clip")
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    torch.manual_seed(1)
    model = open_clip.create_model(f"local-dir:{d}")  # random: no weights in the dir yet
    torch.save(model.state_dict(), d / "open_clip_pytorch_model.bin")
    return d, cfg, model.eval()


@pytest.fixture(scope="module")
def videomae_dir(tmp_path_factory):
    from transformers import VideoMAEConfig, VideoMAEModel

    d = tmp_path_factory.mktemp("videomae")
    torch.manual_seed(2)
    VideoMAEModel(VideoMAEConfig(image_size=32, patch_size=8, num_frames=4, tubelet_size=2,
                                 hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64)).save_pretrained(d)
    return str(d)


def videos(n: int, seed: int, lo: int = 0, hi: int = 256) -> np.ndarray:
    return np.random.default_rng(seed).integers(lo, hi, (n, T, SIZE, SIZE, 3), dtype=np.uint8)


# ----- Frechet distance, FVD extractors, CLIP score ------------------------------------------
def test_frechet_distance_matches_closed_forms():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    d1, d2 = rng.uniform(0.5, 2, 6), rng.uniform(0.5, 2, 6)
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(d1) - np.sqrt(d2)) ** 2).sum()  # diagonal
    assert frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2)) == pytest.approx(want, rel=1e-9)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)
    tr = np.sqrt(np.linalg.eigvals(s1 @ s2).real).sum()  # Tr sqrt(s1 s2), another route
    want = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-8)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(want, rel=1e-8)
    f = rng.normal(size=(5, 20))  # fewer samples than dimensions: rank-deficient covariances
    mu, cov = feature_stats(f)
    assert 0 <= frechet_distance(mu, cov, mu, cov) < 1e-6 * np.trace(cov)


def test_videomae_fvd_from_a_saved_directory(videomae_dir):
    ex = FVDConfig(extractor="videomae", path=videomae_dir).build()
    real, same, other = videos(6, 0), videos(6, 0), videos(6, 1, hi=64)
    f = ex(real)
    assert f.shape == (6, 32) and np.isfinite(f).all()
    assert abs(fvd(real, same, ex)) < 1e-6
    stats = feature_stats(f)
    assert fvd(stats, other, ex) == pytest.approx(fvd(real, other, ex)) and fvd(stats, other, ex) > 1e-3


def test_i3d_torchscript_file_gets_the_papers_input_convention(tmp_path):
    class FakeI3D(torch.nn.Module):
        """Stands in for i3d_torchscript.pt: same call, records what it was given."""

        def forward(self, x: torch.Tensor, rescale: bool = True, resize: bool = False,
                    return_features: bool = False) -> torch.Tensor:
            assert not rescale and resize and return_features
            return torch.stack([x.amin(dim=(1, 2, 3, 4)), x.amax(dim=(1, 2, 3, 4)),
                                torch.full(x.shape[:1], float(x.shape[1])),
                                torch.full(x.shape[:1], float(x.shape[2]))], dim=1)  # (B, 4)

    path = tmp_path / "i3d_torchscript.pt"
    torch.jit.save(torch.jit.script(FakeI3D()), str(path))
    ex = FVDConfig(extractor="i3d", path=str(path)).build()
    v = videos(3, 4)
    v[:, :, 0, 0] = (0, 0, 0)
    v[:, :, 1, 1] = (255, 255, 255)
    f = ex(v)
    assert f.tolist() == [[-1.0, 1.0, 3.0, 9.0]] * 3  # [-1, 1], channels first, padded to 9 frames
    with pytest.raises(FileNotFoundError, match="eval.fvd.path"):
        FVDConfig(extractor="i3d", path=str(tmp_path / "missing.pt")).build()
    with pytest.raises(ValueError, match="videomae, i3d"):
        FVDConfig(extractor="c3d")


def test_clip_score_loads_local_weights_and_matches_the_model(clip_dir):
    import open_clip
    import torch.nn.functional as F
    from PIL import Image

    d, _, ref = clip_dir
    v, prompts = videos(2, 5), ["a red circle", "a blue square"]
    got = clip_score(v, prompts, ClipScoreConfig(name=f"local-dir:{d}", frames=2))
    _, _, pre = open_clip.create_model_and_transforms(f"local-dir:{d}")
    with torch.no_grad():
        txt = F.normalize(ref.encode_text(open_clip.get_tokenizer(f"local-dir:{d}")(prompts)), dim=-1)
        want = []
        for i in range(2):
            img = torch.stack([pre(Image.fromarray(v[i, t])) for t in (0, T - 1)])
            cos = F.normalize(ref.encode_image(img), dim=-1) @ txt[i]  # (2,)
            want.append(float((100 * cos.clamp(min=0)).mean()))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)  # the saved weights, not a re-init
    assert got.shape == (2,) and ((0 <= got) & (got <= 100)).all()


def test_clip_score_registered_name_with_a_pretrained_file(clip_dir, tmp_path):
    import open_clip

    d, cfg, ref = clip_dir
    (tmp_path / "spacetime-test-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path)  # a built-in style name, weights from `pretrained`
    v, prompts = videos(2, 6), ["one", "two"]
    by_file = clip_score(v, prompts, ClipScoreConfig(name="spacetime-test-clip",
                                                     pretrained=str(d / "open_clip_pytorch_model.bin")))
    by_dir = clip_score(v, prompts, ClipScoreConfig(name=f"local-dir:{d}"))
    np.testing.assert_allclose(by_file, by_dir, rtol=1e-6)


def test_grid_video_tiles_every_sample():
    v = videos(5, 7)
    g = grid_video(v, pad=2)
    assert g.shape == (T, 2 * 34 + 2, 3 * 34 + 2, 3)  # 3 columns, 2 rows
    assert (g[:, 2:34, 36:68] == v[1]).all() and (g[:, 36:68, 36:68] == v[4]).all()
    assert (g[:, 36:68, 70:102] == 128).all()  # the empty sixth tile


# ----- checkpoints ----------------------------------------------------------------------------
def test_resolve_checkpoints(train_dir):
    d, _ = train_dir
    assert resolve_checkpoints(EvalConfig(), d) == [CheckpointRef(2, d, "final")]
    tag1 = d / "checkpoints" / "step00000001"
    assert resolve_checkpoints(EvalConfig(checkpoint="1"), d) == [CheckpointRef(1, tag1, "deepspeed")]
    assert resolve_checkpoints(EvalConfig(checkpoint=str(tag1)), d) == [CheckpointRef(1, tag1, "deepspeed")]
    assert resolve_checkpoints(EvalConfig(checkpoint=str(d)), d / "elsewhere") == [CheckpointRef(2, d, "final")]
    assert [r.step for r in resolve_checkpoints(EvalConfig(steps=[2, 1, 2]), d)] == [1, 2]
    with pytest.raises(FileNotFoundError, match=r"step 7 .*step00000001.*keep_checkpoints"):
        resolve_checkpoints(EvalConfig(steps=[1, 7]), d)
    with pytest.raises(FileNotFoundError, match="not 'latest', a step number"):
        resolve_checkpoints(EvalConfig(checkpoint=str(d / "nothing")), d)


def test_a_deepspeed_tag_loads_as_it_was_saved(train_dir):
    d, snaps = train_dir
    ref = CheckpointRef(1, d / "checkpoints" / "step00000001", "deepspeed")
    raw, _, tcfg, w = load_checkpoint(ref, "cpu", use_ema=False)
    assert w == "raw" and tcfg["num_frames"] == T
    for k, v in raw.state_dict().items():
        torch.testing.assert_close(v, snaps[1][0][k], rtol=0, atol=1e-6)
    ema, *_, w = load_checkpoint(ref, "cpu", use_ema=True)
    params = dict(ema.named_parameters())
    assert w == "ema" and set(snaps[1][1]) == {k for k, p in params.items() if p.requires_grad}
    for k, v in snaps[1][1].items():
        torch.testing.assert_close(params[k].data, v, rtol=0, atol=0)
    assert not torch.equal(snaps[1][1]["dit.x_embed.weight"], snaps[1][0]["dit.x_embed.weight"])


# ----- checkpoints that would run code --------------------------------------------------------
class Payload:
    """Unpickled without weights_only, this creates the file `marker` (any code could run)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def crafted_copy(train_dir: Path, dest: Path, replace: str) -> Path:
    """A copy of the training output whose tag step00000002 has the files matching `replace`
    swapped for a payload (alongside the genuine rest); returns the marker the payload makes."""
    shutil.copytree(train_dir, dest)
    marker = dest.parent / f"{dest.name}-PAYLOAD-RAN"
    files = list((dest / "checkpoints" / "step00000002" / "step00000002").glob(replace))
    assert files
    for f in files:
        torch.save({"module": Payload(marker), "step": 2}, f)
    return marker


@pytest.mark.parametrize("layout,replace", [
    ("zero0", "mp_rank_00_model_states.pt"),  # no optimizer files: the model-states file alone
    ("zero2", "*optim_states.pt"),  # DeepSpeed's zero_to_fp32 reads these
    ("zero2", "mp_rank_00_model_states.pt")])  # ... and this
def test_a_crafted_deepspeed_tag_is_refused_and_runs_nothing(train_dir, tmp_path, layout, replace):
    """eval.checkpoint pointing at a tag (e.g. one in a shared bucket) whose pickles carry code."""
    d, _ = train_dir
    marker = crafted_copy(d, tmp_path / "train", replace)
    tag = tmp_path / "train" / "checkpoints" / "step00000002"
    if layout == "zero0":
        for f in (tag / "step00000002").glob("*optim_states.pt"):
            f.unlink()
    (ref,) = resolve_checkpoints(EvalConfig(checkpoint=str(tag)), tmp_path / "elsewhere")
    assert ref == CheckpointRef(2, tag, "deepspeed")
    with pytest.raises(UnsafeCheckpoint, match=r"step00000002.*io\.open"):
        load_checkpoint(ref, "cpu", use_ema=False)
    assert not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # put back as it was


def test_a_genuine_zero0_layout_loads_its_model_states(train_dir, tmp_path):
    """The model-states file DeepSpeed wrote, alone in a tag (as ZeRO-0 saves), loads weights only."""
    d, snaps = train_dir
    shutil.copytree(d, tmp_path / "train")
    tag = tmp_path / "train" / "checkpoints" / "step00000002"
    for f in (tag / "step00000002").glob("*optim_states.pt"):
        f.unlink()
    raw, *_ = load_checkpoint(CheckpointRef(2, tag, "deepspeed"), "cpu", use_ema=False)
    for k, v in raw.state_dict().items():
        torch.testing.assert_close(v, snaps[2][0][k], rtol=0, atol=0)


def resume_from_copies(train_dir: Path, work: Path) -> None:
    """In a subprocess (see write_train_dir): a ZeRO-2 engine resumes through the trainer's
    `load_tag` from each copy of the checkpoint under work/ (as a resumed worker loads Ray
    Train's checkpoint, downloaded from a bucket anyone may write); writes work/resumed.json:
    copy -> the step and whether the weights are the saved ones, or the refusal."""
    from training.checkpoint import load_tag

    model, engine = solo_zero2_engine()
    saved = torch.load(train_dir / "snapshots.pt", weights_only=True)[2][0]
    out = {}
    for copy in sorted(work.glob("copy-*")):
        try:
            step, _, ema = load_tag(engine, copy, 0)
        except UnsafeCheckpoint as e:
            out[copy.name] = {"refused": str(e)}
            continue
        same = all(torch.equal(v, saved[k]) for k, v in engine.module.state_dict().items())
        out[copy.name] = {"step": step, "weights_saved": same, "ema": ema is not None}
    (work / "resumed.json").write_text(json.dumps(out))
    dist.destroy_process_group()


def test_resume_from_a_shared_checkpoint_loads_weights_only(train_dir, tmp_path):
    d, _ = train_dir
    shutil.copytree(d / "checkpoints" / "step00000002", tmp_path / "copy-genuine")
    marker = crafted_copy(d, tmp_path / "crafted", "*optim_states.pt")
    shutil.copytree(tmp_path / "crafted" / "checkpoints" / "step00000002", tmp_path / "copy-crafted")
    in_subprocess("resume_from_copies", d, tmp_path)
    res = json.loads((tmp_path / "resumed.json").read_text())
    assert res["copy-genuine"] == {"step": 2, "weights_saved": True, "ema": True}
    assert "refusing to load checkpoint" in res["copy-crafted"]["refused"]
    assert not marker.exists()


# ----- the evaluation -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def series(train_dir, val_shards, clip_dir, videomae_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    cfg = EvalConfig(steps=[1, 2], prompts=[SYNTH, "a cat on a sofa"], sample_steps=2,
                     batch_size=2, val_timesteps=[0.3, 0.7],
                     clip=ClipScoreConfig(name=f"local-dir:{clip_dir[0]}", frames=2),
                     fvd=FVDConfig(path=videomae_dir, num_real=3), progress_every_s=0)
    tracker, console = MemoryTracker(), io.StringIO()
    with redirect_stdout(console):
        res = evaluate(cfg, train_dir[0], val_shards, out, tracker)
    return cfg, out, tracker, res, console.getvalue()


def test_series_results_metrics_and_files(series):
    cfg, out, _, res, _ = series
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(res))
    assert [c["step"] for c in res["checkpoints"]] == [1, 2] and res["step"] == 2
    assert {c["weights"] for c in res["checkpoints"]} == {"ema"} and res["skipped"] == {}
    last = res["checkpoints"][-1]["metrics"]
    assert {k: res[k] for k in last} == last  # the newest checkpoint's metrics on top
    for c in res["checkpoints"]:
        m = c["metrics"]
        assert 0 < m["val/loss"] < 10 and m["val/clips"] == 3
        assert set(m) >= {"val/loss_t0.30", "val/loss_t0.70", "clip_score", "fvd", "probe/all"}
        assert m["probe/samples"] == 1 and 0 <= m["clip_score"] <= 100 and np.isfinite(m["fvd"])
    assert res["checkpoints"][0]["metrics"]["val/loss"] != last["val/loss"]
    synth, free = res["samples"]
    assert set(synth["probes"]) == set(PROBES) and synth["expected"]["color"] == "red"
    assert free["probes"] == {} and free["expected"] is None and free["measured"]["background"]
    for sub, ck in (("samples/step00000001", res["checkpoints"][0]), ("samples", res["checkpoints"][1])):
        assert ck["grid"] == f"{sub}/grid.mp4"
        assert [s["path"] for s in ck["samples"]] == [f"{sub}/sample-00.mp4", f"{sub}/sample-01.mp4"]
        assert read_frames(out / ck["grid"]).shape == (T, 36, 70, 3)
        assert read_frames(out / ck["samples"][1]["path"]).shape == (T, SIZE, SIZE, 3)


def test_series_is_logged_against_the_checkpoint_step(series):
    _, out, tracker, res, _ = series
    assert [s for s, m in tracker.metrics] == [1, 2]
    assert [m["val/loss"] for _, m in tracker.metrics] == [c["metrics"]["val/loss"] for c in res["checkpoints"]]
    assert [(k, p) for k, p, _ in tracker.videos] == [
        ("samples/grid", str(out / "samples/step00000001/grid.mp4")), ("samples/grid", str(out / "samples/grid.mp4"))]
    cols, rows = tracker.tables["samples"]
    assert cols[:4] == ["step", "index", "prompt", "video"] and len(rows) == 4
    assert all(r[3].exists() for r in rows) and rows[2][2] == SYNTH
    assert rows[2][cols.index("color")] in (True, False) and rows[3][cols.index("color")] is None
    assert tracker.summaries["eval/step"] == 2 and tracker.summaries["val/loss"] == res["val/loss"]


def test_progress_counts_every_batch_of_every_checkpoint(series):
    """A line per batch here (eval.progress_every_s=0), out of a total that is the batches run:
    per checkpoint 3 validation clips and 2 prompts in batches of 2, and 8 sensitivity prompts
    with their 4 variants each (40 samples)."""
    lines = [ln for ln in series[4].splitlines() if ln.startswith("eval: ")]
    per = 2 + 1 + 20
    assert [ln.split(" | ")[0] for ln in lines] == [
        f"eval: batch {i}/{2 * per} ({100 * i / (2 * per):.0f}%)" for i in range(1, 2 * per + 1)]
    assert all(" | ETA " in ln and ("batch/s" in ln or "s/batch" in ln) for ln in lines)
    assert all(ln.endswith("checkpoint 1/2 (step 1)") for ln in lines[:per])
    assert all(ln.endswith("checkpoint 2/2 (step 2)") for ln in lines[per:])
    assert lines[-1].split(" | ")[3] == "ETA 0s"


def test_numbers_compare_across_batch_sizes_and_export_paths(series, train_dir, val_shards, tmp_path):
    """The same weights give the same val loss and samples through the final export (latest) and
    through the DeepSpeed tag, at another batch size; the raw weights give other numbers."""
    cfg, out, _, res, _ = series
    base = dict(prompts=cfg.prompts, sample_steps=2, val_timesteps=[0.3, 0.7])
    latest = evaluate(EvalConfig(batch_size=1, **base), train_dir[0], val_shards, tmp_path / "a",
                      MemoryTracker())
    assert latest["step"] == 2 and latest["val/loss"] == pytest.approx(res["val/loss"], rel=1e-6)
    assert latest["skipped"].keys() == {"clip_score", "fvd"}
    assert "eval.clip.name is unset" in latest["skipped"]["clip_score"]
    assert (read_frames(tmp_path / "a/samples/sample-00.mp4") == read_frames(out / "samples/sample-00.mp4")).all()
    raw = evaluate(EvalConfig(use_ema=False, probes=False, **base), train_dir[0], val_shards,
                   tmp_path / "b", MemoryTracker())
    assert raw["weights"] == "raw" and raw["val/loss"] != pytest.approx(res["val/loss"], rel=1e-3)
    assert "probe/color" not in raw and "probes" in raw["skipped"]
    # Noise is keyed by the timestep's value: dropping 0.3 leaves the loss at 0.7 unchanged.
    one = evaluate(EvalConfig(**{**base, "val_timesteps": [0.7], "probes": False}), train_dir[0],
                   val_shards, tmp_path / "c", MemoryTracker())
    assert one["val/loss_t0.70"] == pytest.approx(res["val/loss_t0.70"], rel=1e-6)
    assert "val/loss_t0.30" not in one


def test_eval_config_composes_with_hydra_overrides():
    from hydra import compose, initialize_config_dir

    from pipeline.config import CONF_DIR, register, to_object

    register()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = to_object(compose("config", overrides=[
            "eval.steps=[100,200]", "eval.checkpoint=200", "eval.clip.name=ViT-B-32",
            "eval.clip.pretrained=laion2b_s34b_b79k", "eval.fvd.extractor=i3d"]))
        assert cfg.eval.steps == [100, 200] and cfg.eval.checkpoint == "200"
        assert cfg.eval.clip.name == "ViT-B-32" and cfg.eval.fvd.extractor == "i3d"
        default = to_object(compose("config")).eval
        assert default.checkpoint == "latest" and default.steps == [] and default.prompts == []
        assert default.clip.name is None and default.fvd.path is None and default.num_prompts == 16
        with pytest.raises(Exception, match="c3d"):
            to_object(compose("config", overrides=["eval.fvd.extractor=c3d"]))
