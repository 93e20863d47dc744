"""The Hydra config tree: every group option composes into the typed schema; bad input fails
early and names the problem; the CLI surface is frozen."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from pipeline.cli import SUBCOMMANDS, parse_argv, preflight
from pipeline.config import CONF_DIR, GROUPS, RunConfig, register, to_object
from pipeline.tune import parse_tune_argv

register()


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def compose_cfg(overrides=()):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("group", [*GROUPS, "experiment"])
def test_every_group_option_composes(group):
    opts = options(group)
    assert opts, f"conf/{group} has no options"
    for opt in opts:
        extra = {("source", "directory"): ["source.path=/tmp"],
                 ("latent", "diffusers"): ["latent.path=/tmp"]}.get((group, opt), [])
        cfg = to_object(compose_cfg([f"{group}={opt}", *extra]))
        assert isinstance(cfg, RunConfig)


def test_group_yaml_matches_its_option_name():
    for opt in options("deepspeed"):
        assert to_object(compose_cfg([f"deepspeed={opt}"])).deepspeed.zero_stage == int(opt[-1])
    from training.dit import PRESETS

    for opt in options("model"):
        dit = to_object(compose_cfg([f"model={opt}"])).model.dit
        assert dit.preset == opt
        for k, v in PRESETS[opt].items():
            assert getattr(dit, k) == v, (opt, k)


def test_tiny_experiment_overrides_demo():
    demo = to_object(compose_cfg())
    tiny = to_object(compose_cfg(["experiment=tiny"]))
    assert demo.run.name == "demo" and tiny.run.name == "tiny"
    assert tiny.train.steps < demo.train.steps
    assert tiny.source.num_videos < demo.source.num_videos


def test_misspelt_key_is_named():
    with pytest.raises(ConfigCompositionException) as e:
        compose_cfg(["train.lrr=0.1"])
    assert "lrr" in str(e.value.__cause__) or "lrr" in str(e.value)


def test_wrong_type_is_named():
    with pytest.raises(ConfigCompositionException) as e:
        compose_cfg(["train.steps=many"])
    text = str(e.value) + str(e.value.__cause__)
    assert "train.steps" in text


def test_unknown_preset_lists_choices():
    with pytest.raises(Exception) as e:
        compose_cfg(["model=enormous"])
    text = str(e.value)
    assert "model/enormous" in text and "tiny" in text and "small" in text


def test_invalid_values_fail_in_component_checks():
    with pytest.raises((ValueError, ValidationError)) as e:
        to_object(compose_cfg(["train.flow.timestep_sampling=sideways"]))
    assert "sideways" in str(e.value)


# A bad value in each kind of section, and how the error names it (the field, by its dotted key).
OUT_OF_RANGE = {
    "train.lr=-1": "train.lr must be > 0, got -1.0",
    "train.steps=0": "train.steps must be >= 1, got 0",
    "train.lr=nan": "train.lr must be > 0, got nan",
    "train.flow.caption_dropout=1.5": "train.flow.caption_dropout must be in [0, 1], got 1.5",
    "train.data.shuffle_buffer=0": "train.data.shuffle_buffer must be >= 1, got 0",
    "train.data.target_fps=0": "train.data.target_fps must be > 0, got 0.0",  # not vae.*, which follows it
    "train.data.buckets=[{num_frames:8,height:8,width:8,batch_size:1},{num_frames:8,height:8,width:8,batch_size:-1}]":
        "train.data.buckets[1].batch_size must be >= 0, got -1",
    "train.data.buckets=[{num_frames:8,height:8,width:8,batch_size:1,prob:1.5}]":
        "train.data.buckets[0].prob must be in [0, 1], got 1.5",
    "train.data.buckets=[{num_frames:8,height:8,width:8,batch_size:0}]":  # 0: from the token budget
        "train.data.buckets[0].batch_size is 0 (from the token budget) but train.data.token_budget is 0",
    "train.data.max_upscale=0.5": "train.data.max_upscale must be >= 1, got 0.5",
    "train.data.max_waiting=0": "train.data.max_waiting must be >= 1, got 0",
    "source.bad_fraction=-0.1": "source.bad_fraction must be in [0, 1], got -0.1",
    "source.fps=0": "source.fps must be > 0, got 0.0",
    "probe.min_side=5000": "probe.min_side must be <= max_side, got 5000 > 4096",
    "scores.aspect.min=3": "scores.aspect.min must be <= max, got min=3.0, max=2.5",
    "curate.media.timeout_s=0": "curate.media.timeout_s must be > 0, got 0.0",
    "dedup.threshold=1.2": "dedup.threshold must be in [0, 1], got 1.2",
    "caption.batch_size=0": "caption.batch_size must be >= 1, got 0",
    "shard.val_fraction=2": "shard.val_fraction must be in [0, 1], got 2.0",
    "vae.lr=0": "vae.lr must be > 0, got 0.0",
    "latent.batch_size=0": "latent.batch_size must be >= 1, got 0",
    "model.dit.depth=0": "model.dit.depth must be >= 1, got 0",
    "model.text.num_heads=0": "model.text.num_heads must be >= 1, got 0",
    "deepspeed.grad_accum=0": "deepspeed.grad_accum must be >= 1, got 0",
    "eval.fps=0": "eval.fps must be > 0, got 0.0",
    "eval.val_timesteps=[0.5,1.5]": "eval.val_timesteps must be in [0, 1], got [0.5, 1.5]",
    "eval.fvd.num_real=1": "eval.fvd.num_real must be >= 2, got 1",
    "cluster.num_workers=0": "cluster.num_workers must be >= 1, got 0",
    "train.flow.timestep_sampling=sideways": "train.flow: unknown timestep_sampling 'sideways'",
}


@pytest.mark.parametrize("override", OUT_OF_RANGE)
def test_out_of_range_values_are_named_by_their_dotted_key(override):
    with pytest.raises(ValueError) as e:
        to_object(compose_cfg([override]))
    assert str(e.value).startswith(OUT_OF_RANGE[override])


def test_a_bad_value_stops_the_cli_and_submit_before_any_stage(tmp_path):
    r = run_cli("run", "train.lr=-1", f"run.root={tmp_path}/out", cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == "spacetime: invalid config: train.lr must be > 0, got -1.0"
    assert not (tmp_path / "out").exists()  # nothing started
    from pipeline.submit import SubmitError, build_submission

    with pytest.raises(SubmitError, match=r"train\.flow\.caption_dropout must be in \[0, 1\], got 1\.5"):
        build_submission(["run.root=/shared/st", "train.flow.caption_dropout=1.5"], None, None,
                         "http://127.0.0.1:8265")


def test_preflight_rejects_missing_input_directory(tmp_path):
    cfg = to_object(compose_cfg(["source=directory", f"source.path={tmp_path / 'nope'}"]))
    with pytest.raises(SystemExit, match="is not a directory"):
        preflight(cfg)


def test_preflight_rejects_indivisible_batch():
    cfg = to_object(compose_cfg(["train.global_batch_size=3"]))
    with pytest.raises(SystemExit, match="^spacetime: train.global_batch_size=3"):
        preflight(cfg)
    # under sequence parallelism the batch divides over data-parallel ranks only: 2 workers in
    # one SP group are one data-parallel rank, so 3 samples per step is fine there
    preflight(to_object(compose_cfg(["train.global_batch_size=3", "cluster.sequence_parallel=2"])))


def test_preflight_names_a_long_eval_length_the_vae_cannot_sample():
    cfg = to_object(compose_cfg(["experiment=latent", "eval.long.seconds=[10]"]))
    with pytest.raises(SystemExit, match=r"^spacetime: eval\.long\.seconds: 10 s.*10\.125 \(81 frames\)"):
        preflight(cfg)


def test_preflight_rejects_a_sequence_parallel_degree_that_does_not_divide(tmp_path):
    cfg = to_object(compose_cfg(["cluster.sequence_parallel=3"]))
    with pytest.raises(SystemExit, match=r"^spacetime: cluster.sequence_parallel=3 must divide the 2 training "
                                         r"workers .* valid degrees here are \[1, 2\]"):
        preflight(cfg)
    r = run_cli("run", "cluster.sequence_parallel=3", f"run.root={tmp_path}/out", cwd=tmp_path)
    assert r.returncode == 1 and "cluster.sequence_parallel=3 must divide" in r.stderr
    assert not (tmp_path / "out").exists()  # nothing started


def test_preflight_names_the_train_shape_the_patch_cannot_cut():
    """Pixel training shapes go through the one shape check (training.patches.check_patchable)."""
    cfg = to_object(compose_cfg(["model.dit.patch_size=[3,4,4]"]))
    with pytest.raises(SystemExit, match=r"^spacetime: train shape \(\d+, \d+, \d+\) is not divisible by "
                                         r"model.dit.patch_size \[3, 4, 4\]"):
        preflight(cfg)


def test_cli_surface_is_frozen():
    # Changing the surface is deliberate: update this test with the README.
    assert SUBCOMMANDS == ("run", "status", "params", "report", "generate", "tune", "submit", "jobs",
                           "logs", "stop", "plan")
    # tune: its own flags (pipeline/tune.py), then the run's overrides
    assert parse_tune_argv(["--grid", "train.lr=1e-3,2e-3", "--grid", "train.seed=1,2", "--mode", "max",
                            "experiment=tiny"]) == (
        {"grid": {"train.lr": ["1e-3", "2e-3"], "train.seed": ["1", "2"]}, "metric": "train/loss",
         "mode": "max", "concurrent": 1}, ["experiment=tiny"])
    for bad, why in ((["experiment=tiny"], "at least one --grid"), (["--grid", "train.lr"], "not KEY=V1,V2"),
                     (["--grid", "a=1", "--mode", "up"], "min or max"), (["--grid"], "needs a value")):
        with pytest.raises(SystemExit, match=why):
            parse_tune_argv(bad)
    assert parse_argv(["run", "--only", "train", "train.lr=1"]) == (
        "run", {"only": "train", "from_": None, "until": None}, ["train.lr=1"])
    assert parse_argv(["--from=eval"]) == ("run", {"only": None, "from_": "eval", "until": None},
                                           [])
    assert parse_argv(["run", "--until", "shard"])[1]["until"] == "shard"
    assert parse_argv(["status", "experiment=tiny"]) == (
        "status", {"only": None, "from_": None, "until": None, "sweep": None}, ["experiment=tiny"])
    assert parse_argv(["status", "--sweep", "x"])[1]["sweep"] == "x"  # a sweep's jobs side by side
    with pytest.raises(SystemExit):
        parse_argv(["status", "--only", "train"])
    # report: a run id only as its first argument (so `--cfg job` keeps its value).
    assert parse_argv(["report"]) == ("report", {"run_id": None, "embed_videos": False}, [])
    assert parse_argv(["report", "20260101-000000-ab12", "--embed-videos", "run.root=x"]) == (
        "report", {"run_id": "20260101-000000-ab12", "embed_videos": True}, ["run.root=x"])
    assert parse_argv(["report", "--cfg", "job"]) == (
        "report", {"run_id": None, "embed_videos": False}, ["--cfg", "job"])
    with pytest.raises(SystemExit):
        parse_argv(["frobnicate"])
    # The cluster commands own their flags (pipeline/submit.py; plan's inputs are conf/plan/).
    from pipeline.submit import parse_args

    assert parse_argv(["submit", "--only", "train", "a=1"]) == (
        "submit", {}, ["--only", "train", "a=1"])
    assert parse_args("submit", ["--address", "h:1", "--from", "train", "--follow", "a=1"]) == {
        "address": "h:1", "only": None, "from_": "train", "replay": None, "follow": True,
        "job": None, "overrides": ["a=1"]}
    # --replay RUN (a lineage.json or a run id): the recorded selection + overrides, then these.
    assert parse_args("submit", ["--replay", "runs/x/lineage.json", "run.root=/y"])["replay"] == (
        "runs/x/lineage.json")
    assert parse_args("logs", ["j", "--follow"])["job"] == "j"
    assert parse_args("stop", ["j"])["job"] == "j" and parse_args("jobs", [])["job"] is None
    # Where and how wide training runs (conf/cluster/): GPUs per worker is a number.
    from dataclasses import fields

    from pipeline.config import ClusterConfig

    assert [f.name for f in fields(ClusterConfig)] == [
        "name", "address", "num_workers", "sequence_parallel", "gpus_per_worker", "cpus_per_worker",
        "curate_concurrency", "peak_tflops_per_worker", "dashboard_host"]
    assert to_object(compose_cfg(["cluster=ray"])).cluster.gpus_per_worker == 1
    assert to_object(compose_cfg()).cluster.gpus_per_worker == 0


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_cli_reports_bad_override_before_work(tmp_path):
    r = run_cli("run", "train.lrr=1", f"run.root={tmp_path}/out", cwd=tmp_path)
    assert r.returncode != 0
    assert "lrr" in r.stderr + r.stdout
    assert not (tmp_path / "out").exists()  # nothing started


def test_cli_hydra_flags_still_work(tmp_path):
    r = run_cli("run", "--cfg", "job", "experiment=tiny", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "num_videos: 16" in r.stdout
    r = run_cli("status", "--help", cwd=tmp_path)
    assert r.returncode == 0 and "spacetime" in r.stdout


def test_cli_missing_directory_is_named(tmp_path):
    r = run_cli("run", "source=directory", f"source.path={tmp_path}/missing",
                f"run.root={tmp_path}/out", cwd=tmp_path)
    assert r.returncode != 0 and "missing' is not a directory" in r.stderr
    assert not (tmp_path / "out").exists()


def test_latent_experiment_follows_the_vae_and_checks_shapes_before_work():
    """experiment=latent: in_channels null (follows the VAE); a mismatching explicit value, a
    frame count the VAE cannot encode or latents the patch cannot cut fail in preflight; a
    frozen text encoder puts model.text (not its cache) into the precompute stage's hash."""
    import copy
    from dataclasses import replace

    from pipeline.config import to_dict
    from pipeline.stages import graph_for
    from training.trainer import follow_data

    cfg = to_object(compose_cfg(["experiment=latent"]))
    assert cfg.model.dit.in_channels is None
    preflight(cfg)
    assert follow_data(cfg.train, cfg.model, {"channels": 16}).dit.in_channels == 16
    raw = replace(cfg.train, data=replace(cfg.train.data, kind="raw"))
    assert follow_data(raw, cfg.model, None).dit.in_channels == 3

    def dit(**kw):
        return replace(cfg, model=replace(cfg.model, dit=replace(cfg.model.dit, **kw)))

    for bad, match in ((dit(in_channels=16), r"in_channels \(16\) must equal the VAE's latent channels"),
                       (replace(cfg, train=replace(cfg.train, num_frames=8)),
                        r"training shape \(8, 32, 32\): a window of latents is 1 \+ k\*4 frames"),
                       (dit(patch_size=[2, 2, 2]), r"latents \(3, 4, 4\).*patch_size \[2, 2, 2\]")):
        with pytest.raises(SystemExit, match=match):
            preflight(bad)
    preflight(dit(in_channels=4))  # explicit and right

    # the tiny encoder is frozen by default (issue 17), so precompute stores its embeddings and
    # hashes it; trained (lr_scale > 0) its embeddings go stale, so they are neither
    assert "model.text" in graph_for(cfg).stages["precompute"].config_keys
    trained = compose_cfg(["experiment=latent", "model.text.lr_scale=0.1"])
    assert "model.text" not in graph_for(to_object(trained)).stages["precompute"].config_keys
    clip = compose_cfg(["experiment=latent", "+model/text=open_clip"])
    d = to_dict(clip)
    g = graph_for(to_object(clip))
    hashed = g.hashed_config("precompute", d)
    assert hashed["model"]["text"]["kind"] == "open_clip" and "cache_size" not in hashed["model"]["text"]
    assert set(hashed["model"]) == {"text"}  # not the DiT: latents and embeddings do not depend on it
    h = g.hashes(d)
    for section, k, v, same in (("text", "cache_size", 7, True), ("text", "max_length", 32, False),
                                ("dit", "hidden_size", 64, True)):
        d2 = copy.deepcopy(d)
        d2["model"][section][k] = v
        assert (g.hashes(d2)["precompute"] == h["precompute"]) is same, k
        assert g.hashes(d2)["train"] != h["train"]
