"""Long-video consistency in evaluation (training/evaluation/consistency.py): the per-window
probes on clips rendered by the synthetic source and broken on purpose at a known window (an
object vanishes, one appears, the colour and the background drift, the motion turns around),
all through mp4; the length check; evaluate() sampling a long clip with tiny models (pixels and
through our VAE); and the report's plot of the probes over time."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from test_eval import write_val_shard

from data.synthetic import ClipSpec, caption, render
from data.tracking import JsonlTracker, MemoryTracker
from data.video_io import read_frames, write_mp4
from pipeline.graph import Graph, Stage
from pipeline.report import write_report
from training.evaluation.consistency import (
    HELD,
    WINDOW_COLUMNS,
    LongEvalConfig,
    check_long_eval,
    long_lengths,
    long_scores,
    per_window,
    window_bounds,
    window_probes,
)
from training.evaluation.evaluate import EvalConfig, evaluate
from training.latent.space import LatentConfig, OurVAE
from training.latent.vae import VAEConfig
from training.model import ModelConfig
from training.trainer import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

FPS, SIZE, T = 8.0, 32, 48  # 6 windows of 1 s
SPEC = ClipSpec(shape="square", color="red", count=2, direction="right", speed=1,
                background="black", starts=((0.25, 0.2), (0.7, 0.6)))
PROMPT = caption(SPEC)  # "two red squares moving right on a black background"


def through_mp4(video: np.ndarray, tmp: Path, name: str) -> np.ndarray:
    write_mp4(tmp / f"{name}.mp4", video, fps=FPS)
    return read_frames(tmp / f"{name}.mp4")  # (T, H, W, 3)


def probe(video: np.ndarray, tmp: Path, name: str) -> dict:
    return window_probes(through_mp4(video, tmp, name), PROMPT, int(FPS), FPS)


def base(spec: ClipSpec = SPEC, frames: int = T) -> np.ndarray:
    return render(spec, frames, SIZE, SIZE)  # (T, H, W, 3)


def recolour(video: np.ndarray, target: tuple[int, int, int], of: tuple[int, int, int]) -> np.ndarray:
    """Pixels of colour `of` drift linearly to `target` over the clip."""
    out = video.copy()
    for t in range(len(out)):
        a = t / (len(out) - 1)
        mask = (video[t] == of).all(-1)  # (H, W)
        out[t][mask] = np.round((1 - a) * np.array(of) + a * np.array(target)).astype(np.uint8)
    return out


@pytest.fixture(scope="module")
def broken(tmp_path_factory) -> dict[str, dict]:
    """Each constructed clip's window probes (all through mp4)."""
    tmp = tmp_path_factory.mktemp("clips")
    v = base()
    one = base(replace(SPEC, count=1, starts=SPEC.starts[:1]))
    three = base(replace(SPEC, count=3, starts=(*SPEC.starts, (0.25, 0.7))))
    vanish = np.concatenate([v[:24], one[24:]])  # an object gone from window 3 on
    appear = np.concatenate([v[:16], three[16:]])  # a third object from window 2 on
    reverse = np.concatenate([v[:24], v[:24][::-1]])  # right, then left from window 3
    bg_drift = recolour(v, (70, 70, 70), (0, 0, 0))  # black brightens to gray
    return {name: probe(x, tmp, name) for name, x in (
        ("consistent", v), ("vanish", vanish), ("appear", appear), ("reverse", reverse),
        ("color", recolour(v, (255, 140, 0), (255, 0, 0))), ("background", bg_drift))}


# ----- the per-window probes --------------------------------------------------------------
def test_a_consistent_clip_holds_every_probe_in_every_window(broken):
    r = broken["consistent"]
    assert [(w["start_s"], w["end_s"]) for w in r["windows"]] == [(i, i + 1) for i in range(6)]
    assert r["consistent"] and all(r["held"].values()) and set(r["held"]) == set(HELD)
    assert r["first_failure"] == dict.fromkeys(HELD)
    for w in r["windows"]:
        assert w["count"] == 2 and w["color"] == "red" and w["direction"] == "right"
        assert w["color_drift"] < 10 and w["background_drift"] < 5
        assert all(w["pass"].values())  # the prompt's probes too, window by window
    assert r["expected"]["count"] == 2


def test_a_vanished_object_is_found_in_its_window(broken):
    r = broken["vanish"]
    assert not r["consistent"]
    assert r["first_failure"]["none_vanished"] == 3 and r["first_failure"]["count_held"] == 3
    assert [w["vanished"] for w in r["windows"]] == [0, 0, 0, 1, 1, 1]
    assert r["held"]["none_appeared"] and r["held"]["color_held"] and r["held"]["direction_held"]
    assert [w["pass"]["count"] for w in r["windows"]] == [True] * 3 + [False] * 3


def test_an_appearing_object_is_found_in_its_window(broken):
    r = broken["appear"]
    assert r["first_failure"]["none_appeared"] == 2 and r["first_failure"]["count_held"] == 2
    assert [w["appeared"] for w in r["windows"]] == [0, 0, 1, 1, 1, 1]
    assert [w["count"] for w in r["windows"]] == [2, 2, 3, 3, 3, 3]
    assert r["held"]["none_vanished"] and r["held"]["background_held"]


def test_a_reversed_motion_is_found_in_its_window(broken):
    r = broken["reverse"]
    assert [w["direction"] for w in r["windows"]] == ["right"] * 3 + ["left"] * 3
    assert r["first_failure"]["direction_held"] == 3
    held = {p for p, ok in r["held"].items() if ok}
    assert held == set(HELD) - {"direction_held"}


def test_colour_and_background_drift_grow_from_the_first_window(broken):
    for name, key, probe_name, other in (("color", "color_drift", "color_held", "background_held"),
                                         ("background", "background_drift", "background_held",
                                          "color_held")):
        r = broken[name]
        drift = [w[key] for w in r["windows"]]
        assert drift[0] == 0 and all(b > a for a, b in zip(drift, drift[1:])), drift
        first = r["first_failure"][probe_name]
        assert first is not None and 1 <= first <= 4, drift  # drifted, but not from the start
        assert all(w["held"][probe_name] for w in r["windows"][:first])
        assert r["held"][other] and r["held"]["count_held"] and r["held"]["direction_held"]
    assert broken["color"]["windows"][0]["color"] == "red"
    assert broken["color"]["windows"][-1]["color"] == "orange"


def test_scores_and_curves_across_clips(broken):
    records = [broken["consistent"], broken["vanish"]]
    m = long_scores(records, 6.0)
    assert m["long/6s/none_vanished"] == 0.5 and m["long/6s/none_appeared"] == 1.0
    assert m["long/6s/consistent"] == 0.5 and m["long/6s/samples"] == 2
    assert m["long/6s/color_drift_max"] < 10
    curve = per_window(records)
    assert [row["none_vanished"] for row in curve] == [1, 1, 1, 0.5, 0.5, 0.5]
    assert [row["prompt/count"] for row in curve] == [1, 1, 1, 0.5, 0.5, 0.5]
    assert [row["start_s"] for row in curve] == [0, 1, 2, 3, 4, 5]


def test_window_bounds_give_the_remainder_to_the_last():
    assert window_bounds(25, 8) == [(0, 8), (8, 16), (16, 25)]
    assert window_bounds(16, 8) == [(0, 8), (8, 16)]


# ----- which lengths ----------------------------------------------------------------------
def test_lengths_must_be_frame_counts_the_model_takes():
    assert long_lengths(LongEvalConfig(seconds=[3.0]), 8.0, 2) == [(3.0, 24)]
    assert long_lengths(LongEvalConfig(seconds=[60.125]), 8.0, 1, 4) == [(60.125, 481)]
    with pytest.raises(ValueError, match=re.escape("nearest valid seconds: 3 (24 frames) or 3.25 (26 frames)")):
        long_lengths(LongEvalConfig(seconds=[3.125]), 8.0, 2)  # 25 frames: odd, patch 2
    with pytest.raises(ValueError, match=r"eval\.long\.seconds: 60 s at 8 fps is 480 frames.*temporal "
                                         r"compression 4.*59\.625 \(477 frames\) or 60\.125 \(481 frames\)"):
        long_lengths(LongEvalConfig(seconds=[60]), 8.0, 1, 4)
    with pytest.raises(ValueError, match=r"1\.05 s at 8 fps is 8\.4 frames.*1 \(8 frames\) or 1\.125"):
        long_lengths(LongEvalConfig(seconds=[1.05]), 8.0, 1)
    # latent frames 1 + k must divide by the patch: 2 -> 1 + k even -> 5, 13, 21 ... frames
    with pytest.raises(ValueError, match=r"1\.625 \(13 frames\) or 2\.625 \(21 frames\)"):
        long_lengths(LongEvalConfig(seconds=[2.0]), 8.0, 2, 4)
    with pytest.raises(ValueError, match=r"eval\.long\.window_seconds=2 is 16 frames.*24 frames.*"
                                         r"valid: 0\.25 to 1\.5 s"):
        long_lengths(LongEvalConfig(seconds=[3.0], window_seconds=2.0), 8.0, 1)
    assert long_lengths(LongEvalConfig(), 8.0, 1, 4) == []  # off: nothing to check


def test_the_run_config_is_checked_before_any_stage():
    from hydra import compose, initialize_config_dir

    from pipeline.config import CONF_DIR, ConfigError, register, to_object

    register()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        default = to_object(compose("config"))
        assert default.eval.long == LongEvalConfig() and check_long_eval(default) == []
        latent = to_object(compose("config", overrides=["experiment=latent", "eval.long.seconds=[10]"]))
        with pytest.raises(ValueError, match=r"eval\.long\.seconds: 10 s.*10\.125 \(81 frames\)"):
            check_long_eval(latent)
        ok = to_object(compose("config", overrides=["experiment=latent", "eval.long.seconds=[10.125]",
                                                    "eval.long.window_seconds=2.5"]))
        assert check_long_eval(ok) == [(10.125, 81)]
        with pytest.raises(ConfigError, match=r"eval\.long\.seconds must be > 0"):
            to_object(compose("config", overrides=["eval.long.seconds=[-1]"]))
        with pytest.raises(ConfigError, match=r"eval\.long\.window_seconds must be > 0"):
            to_object(compose("config", overrides=["eval.long.window_seconds=0"]))


# ----- evaluate() with tiny models --------------------------------------------------------
def tiny_model_cfg(in_channels: int = 3, patch=(2, 8, 8)) -> ModelConfig:
    cfg = ModelConfig()
    cfg.dit.in_channels, cfg.dit.patch_size = in_channels, list(patch)
    cfg.dit.hidden_size, cfg.dit.depth, cfg.dit.num_heads = 32, 1, 2
    cfg.dit.text_dim = cfg.text.dim = 32
    cfg.text.depth, cfg.text.num_heads, cfg.text.max_length = 1, 2, 16
    return ModelConfig(dit=cfg.dit, text=cfg.text)


def write_train_dir(out: Path, latent: dict | None = None) -> Path:
    """A training output's final exports (what evaluate's checkpoint=latest reads), random weights."""
    out.mkdir(parents=True)
    mcfg = tiny_model_cfg(latent["channels"], (1, 2, 2)) if latent else tiny_model_cfg()
    torch.manual_seed(0)
    torch.save(mcfg.build().state_dict(), out / "model.pt")
    (out / "model_config.json").write_text(json.dumps(asdict(mcfg)))
    tcfg = TrainConfig(steps=1, num_frames=9 if latent else 8, height=SIZE, width=SIZE)
    (out / "train_config.json").write_text(json.dumps({**asdict(tcfg), "latent": latent}))
    (out / "train_result.json").write_text(json.dumps({"steps": 1}))
    return out


@pytest.fixture(scope="module")
def val_shards(tmp_path_factory) -> list[str]:
    return write_val_shard(tmp_path_factory.mktemp("val"), 2, 1.5, SIZE)


BASE = dict(prompts=[PROMPT, "a cat on a sofa"], sample_steps=2, batch_size=2, val_timesteps=[0.5],
            val_max_clips=2, sensitivity_prompts=0)


@pytest.fixture(scope="module")
def pixel_eval(tmp_path_factory, val_shards):
    tmp = tmp_path_factory.mktemp("pixel")
    train = write_train_dir(tmp / "train")
    cfg = EvalConfig(**BASE, long=LongEvalConfig(seconds=[3.0], window_seconds=1.0, num_prompts=2))
    tracker = MemoryTracker()
    return train, tmp / "eval", tracker, evaluate(cfg, train, val_shards, tmp / "eval", tracker)


def check_long_results(out: Path, res: dict, tracker: MemoryTracker, seconds: float, frames: int,
                       windows: list[tuple[float, float]]) -> None:
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(res))
    (ln,) = res["long"]["lengths"]
    assert ln["seconds"] == seconds and ln["frames"] == frames and res["long"]["fps"] == FPS
    key = f"{seconds:g}s"
    assert ln["grid"] == f"samples/long/{key}/grid.mp4" and (out / ln["grid"]).is_file()
    assert [(r["start_s"], r["end_s"]) for r in ln["per_window"]] == windows
    for i, s in enumerate(ln["samples"]):
        assert s["path"] == f"samples/long/{key}/sample-{i:02d}.mp4"
        assert read_frames(out / s["path"]).shape == (frames, SIZE, SIZE, 3)
        assert len(s["windows"]) == len(windows) and set(s["held"]) == set(HELD)
        assert isinstance(s["consistent"], bool)
    assert ln["samples"][0]["expected"]["color"] == "red" and ln["samples"][1]["expected"] is None
    assert ln["samples"][0]["windows"][0]["pass"] and ln["samples"][1]["windows"][0]["pass"] == {}
    for k in (*HELD, "consistent", "samples"):
        assert f"long/{key}/{k}" in res and f"long/{key}/{k}" in tracker.metrics[-1][1]
    assert res["checkpoints"][-1]["long"] == res["long"]
    cols, rows = tracker.tables["long_windows"]
    assert cols == WINDOW_COLUMNS and [r[:3] for r in rows] == [[res["step"], seconds, w]
                                                                for w in range(len(windows))]
    assert ("samples/long_" + key, str(out / ln["grid"])) in [(k, p) for k, p, _ in tracker.videos]


def test_evaluate_samples_a_long_clip_and_probes_its_windows(pixel_eval):
    _, out, tracker, res = pixel_eval
    check_long_results(out, res, tracker, 3.0, 24, [(0, 1), (1, 2), (2, 3)])
    assert read_frames(out / "samples/sample-00.mp4").shape == (8, SIZE, SIZE, 3)  # training shape


def test_default_eval_is_unchanged_by_long_clips(pixel_eval, val_shards, tmp_path):
    """Off (the default), the results and the training-shape samples are what they were; on,
    they are the same plus the long clips."""
    train, out, _, res = pixel_eval
    plain = evaluate(EvalConfig(**BASE), train, val_shards, tmp_path, MemoryTracker())
    assert "long" not in plain and not (tmp_path / "samples/long").exists()
    assert not any(k.startswith("long/") for k in plain)
    assert {k: v for k, v in res.items() if k not in ("long", "checkpoints") and not k.startswith("long/")} \
        == {k: v for k, v in plain.items() if k != "checkpoints"}
    assert (read_frames(tmp_path / "samples/sample-00.mp4") == read_frames(out / "samples/sample-00.mp4")).all()


def test_a_bad_length_fails_before_any_work(pixel_eval, val_shards, tmp_path):
    train = pixel_eval[0]
    cfg = EvalConfig(**BASE, long=LongEvalConfig(seconds=[3.125]))
    with pytest.raises(ValueError, match=r"eval\.long\.seconds: 3\.125 s.*patch_size\[0\]=2.*3 \(24 frames\)"):
        evaluate(cfg, train, val_shards, tmp_path / "eval", MemoryTracker())
    assert not (tmp_path / "eval").exists()


def test_a_latent_model_samples_long_clips_through_its_vae(tmp_path, val_shards):
    torch.manual_seed(0)
    vae_dir = tmp_path / "vae"
    vae_dir.mkdir()
    vcfg = VAEConfig()
    torch.save(vcfg.build().state_dict(), vae_dir / "vae.pt")
    (vae_dir / "vae_config.json").write_text(json.dumps(asdict(vcfg)))
    latent = OurVAE(LatentConfig(kind="ours", num_frames=9), str(vae_dir)).describe()
    train = write_train_dir(tmp_path / "train", latent)
    bad = EvalConfig(**{**BASE, "val_max_clips": 1}, long=LongEvalConfig(seconds=[3.0], num_prompts=2))
    with pytest.raises(ValueError, match=r"temporal compression 4.*2\.625 \(21 frames\) or 3\.125 \(25 frames\)"):
        evaluate(bad, train, val_shards, tmp_path / "bad", MemoryTracker())
    cfg = replace(bad, long=LongEvalConfig(seconds=[3.125], num_prompts=2))
    tracker = MemoryTracker()
    res = evaluate(cfg, train, val_shards, tmp_path / "eval", tracker)
    check_long_results(tmp_path / "eval", res, tracker, 3.125, 25, [(0, 1), (1, 2), (2, 3.125)])


# ----- the report -------------------------------------------------------------------------
def test_the_report_plots_the_probes_over_time(broken, tmp_path):
    """A run whose eval stage wrote results.json with long clips: the Consistency section draws
    the held probes and the drifts against seconds, and lists where each clip first failed."""
    records = [broken["consistent"], broken["vanish"]]
    samples = [{"index": i, "prompt": PROMPT, "path": f"samples/long/6s/sample-{i:02d}.mp4", **r}
               for i, r in enumerate(records)]
    long = {"fps": FPS, "window_seconds": 1.0, "window_frames": 8,
            "lengths": [{"seconds": 6.0, "frames": T, "grid": "samples/long/6s/grid.mp4",
                         "samples": samples, "per_window": per_window(records)}]}

    def stage(ctx):
        d = ctx.out_dir / "samples/long/6s"
        d.mkdir(parents=True)
        for i in range(2):
            write_mp4(d / f"sample-{i:02d}.mp4", base(), fps=FPS)
        res = {"val/loss": 0.5, **long_scores(records, 6.0), "step": 3, "long": long,
               "checkpoints": [{"step": 3, "metrics": {"val/loss": 0.5}, "long": long}]}
        (ctx.out_dir / "results.json").write_text(json.dumps(res))
        return {}

    root = tmp_path / "out"
    Graph([Stage("eval", stage, config_keys=("eval",))], root).run(
        {"eval": {}}, {"eval": {}}, "run-long", log=lambda m: None,
        tracker_factory=lambda ctx: JsonlTracker(ctx.out_dir / "metrics.jsonl"))
    page = write_report(root).read_text()
    section = page.split("<section id='consistency'>")[1].split("</section>")[0]
    charts = re.findall(r'<figure><figcaption>([^<]*)</figcaption><svg class="chart" data-chart="line" '
                        r'data-marks="(\d+)"', section)
    titles = dict(charts)
    assert titles["6 s: probes held, fraction of clips, by window"] == str(6 * len(HELD))
    assert titles["6 s: drift from the first window (RGB distance)"] == str(6 * 2)
    assert titles["6 s: probes of the prompt, fraction of clips, by window"] == str(6 * 7)
    assert section.count(">seconds</text>") == 3  # all plotted against time
    assert "none_vanished: 3 s" in section  # the vanished object's window, in seconds
    assert section.count("<video ") == 2 and "long/6s/consistent" in section
    assert "<a href='#consistency'>Consistency</a>" in page
    ev = page.split("<section id='evaluation'>")[1].split("</section>")[0]
    assert "long/fps" not in ev and "window_frames" not in ev  # the record is not a metric


def test_long_clips_sample_on_sequence_parallel_workers(pixel_eval, val_shards, tmp_path, ray_local,
                                                        capsys):
    """sequence_parallel=2 (cluster.sequence_parallel, which the eval stage passes): the long clips
    are sampled by 2 Ray Train workers splitting each clip's tokens, every rank running the whole
    sampler (no hang); the clips, and so their window probes, are those of one process."""
    train, out, _, res = pixel_eval
    cfg = EvalConfig(**BASE, long=LongEvalConfig(seconds=[3.0], window_seconds=1.0, num_prompts=2))
    sp = evaluate(cfg, train, val_shards, tmp_path / "eval", MemoryTracker(), sequence_parallel=2)
    for a, b in zip(res["long"]["lengths"][0]["samples"], sp["long"]["lengths"][0]["samples"]):
        fa, fb = (read_frames(o / s["path"]).astype(int) for o, s in ((out, a), (tmp_path / "eval", b)))
        assert fa.shape == fb.shape == (24, SIZE, SIZE, 3) and np.abs(fa - fb).mean() < 0.5
    assert {k: v for k, v in sp.items() if k.startswith("long/")} == {k: v for k, v in res.items()
                                                                      if k.startswith("long/")}
    # progress counts the workers' batches too: 2 prompts of 1 clip (eval.long.batch_size) at the
    # one length, after a batch of validation clips and one of samples
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("eval: ")]
    assert lines[-1].startswith("eval: batch 4/4 (100%) |")
