"""Recipes: training as chained graph stages (``recipe=...``, pipeline/recipe.py), each starting
from the previous stage's weights (training/warm_start.py).

Graph construction, hashes and config checks are unit tests on the composed config; the weights
a stage starts from are checked exactly on the tiny model; the optimizer carry on a one-rank
DeepSpeed engine in a subprocess; and one real 2-stage run goes through the graph on Ray Train.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import Recorder
from hydra import compose, initialize_config_dir
from ray_checkpoints import register as register_checkpoints

from pipeline.config import CONF_DIR, ConfigError, register, to_dict, to_object
from pipeline.graph import Graph, Stage, StageContext
from pipeline.stages import STAGES, build_graph, graph_for
from training.model import ModelConfig
from training.trainer import TrainConfig
from training.warm_start import check_init, digest, initial_weights, load_initial_weights

try:
    from test_storage import s3  # noqa: F401 (the fixture: a local S3 endpoint, moto's server)
except pytest.skip.Exception:  # no moto: test_storage skips itself, and so does the bucket test
    s3 = None

register()
REPO = Path(__file__).resolve().parent.parent
THREE = ("+recipe.stages=[{name: train_a, train: {num_frames: 4, height: 16, width: 16}}, "
         "{name: train_b, train: {num_frames: 8}}, {name: train_c}]")


def composed(overrides=()):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        c = compose("config", overrides=list(overrides))
    return to_object(c), to_dict(c)


def hashes(overrides=()):
    cfg, d = composed(overrides)
    return graph_for(cfg).hashes(d)


# ----- the graph ------------------------------------------------------------------------------
def test_without_a_recipe_the_graph_and_its_train_hash_are_unchanged(tmp_path):
    # The default graph's train and eval stages, hashed on a fixed config behind a fixed
    # upstream: their own identities, as the code before recipes computed them (other stages'
    # version bumps do not reach these numbers; a change to train's or eval's entry does).
    g = build_graph(tmp_path)
    assert g.order == ["source", "curate", "filter", "caption", "shard", "train", "eval"]
    alone = Graph([Stage("shard", lambda ctx: {}), g.stages["train"], g.stages["eval"]], tmp_path)
    cfg = {s: {"value": s} for s in ("model", "deepspeed", "eval")}
    cfg["train"] = {"steps": 300, "num_frames": 8, "log_every": 1,
                    "data": {"prefetch": 2, "kind": "raw"}}
    h = alone.hashes(cfg)
    assert h["train"] == "3df5d288a4c4e2030da8ce7420d1727451fc179fdfd1e41e2d8bab3c6273f0fb"
    assert h["eval"] == "f0f6fc039fc71a4b3a66a31c46445aa1888d06646da95aab3e6d89798f73e46e"
    # The composed default (recipe=none) is the plain stage table, and so is a one-stage recipe
    # named train with no overrides: the same computation, the same hashes.
    base, d = composed()
    assert base.recipe.stages == []
    assert graph_for(base).hashes(d) == Graph(STAGES, tmp_path).hashes(d)
    assert hashes(["+recipe.stages=[{name: train}]"]) == graph_for(base).hashes(d)


def test_a_recipe_chains_training_stages_and_eval_takes_the_last(tmp_path):
    cfg, d = composed(["recipe=short_to_long", f"run.root={tmp_path}"])
    g = graph_for(cfg)
    assert g.order == ["source", "curate", "filter", "caption", "shard", "train_short",
                       "train_long", "eval"]
    assert g.stages["train_short"].inputs == ("shard",)
    assert g.stages["train_long"].inputs == ("shard", "train_short")
    assert g.stages["eval"].inputs == ("train_long", "shard")
    short = g.hashed_config("train_short", d)
    assert (short["train"]["num_frames"], short["train"]["height"], short["train"]["steps"]) == (4, 16, 200)
    assert "settings" not in short  # the first stage starts fresh
    long = g.hashed_config("train_long", d)
    assert (long["train"]["num_frames"], long["train"]["height"]) == (d["train"]["num_frames"],
                                                                      d["train"]["height"])
    assert long["settings"] == {"init": {"from": "train_short", "weights": "ema",
                                         "optimizer": "fresh"}}
    # Its excluded keys stay out of every stage's hash, as for train.
    assert "log_every" not in long["train"]
    # --only / --from / --until and status take the recipe's stages like any other.
    assert g.plan(d, only="train_long") == {**dict.fromkeys(g.order[:6], "run"),
                                            "train_long": "run", "eval": "skip"}
    assert [n for n, a in g.plan(d, from_="train_long").items() if a == "run"][-2:] == [
        "train_long", "eval"]
    assert g.plan(d, until="train_short")["train_long"] == "skip"
    assert [r.name for r in g.status(d)] == g.order


def test_changing_a_stage_changes_its_hash_and_the_later_ones_only():
    h = hashes([THREE])
    changed = hashes([THREE, "recipe.stages.1.train.num_frames=6"])
    assert changed["train_a"] == h["train_a"]
    assert all(changed[n] != h[n] for n in ("train_b", "train_c", "eval"))
    # How a stage starts from its predecessor is part of it too.
    raw = hashes([THREE, "recipe.stages.1.weights=raw"])
    assert raw["train_a"] == h["train_a"] and raw["train_b"] != h["train_b"]
    assert raw["train_c"] != h["train_c"]
    # A base train key that a stage overrides does not reach it; one that it does not, does.
    assert hashes([THREE, "train.height=16"])["train_a"] == h["train_a"]
    assert hashes([THREE, "train.height=16"])["train_b"] != h["train_b"]
    assert hashes([THREE, "train.log_every=7"]) == h  # excluded, as for train


def test_a_stage_reads_its_train_section_with_the_recipe_merged(tmp_path):
    cfg, d = composed(["recipe=short_to_long"])
    g = build_graph(tmp_path, recipe=[{"name": "s", "weights": "ema", "optimizer": "fresh",
                                       "train": {"num_frames": 4, "data": {"shuffle_buffer": 3}}}])
    st = g.stages["s"]
    ctx = StageContext(stage=st, run_id="r", out_dir=tmp_path, inputs={}, stage_hash="h",
                       hashed_config=g.hashed_config("s", d), cfg=cfg)
    t = ctx.section("train")
    assert isinstance(t, TrainConfig) and t.num_frames == 4 and t.data.shuffle_buffer == 3
    assert t.height == cfg.train.height and t.data.kind == cfg.train.data.kind
    assert ctx.section("train.data").shuffle_buffer == 3
    assert cfg.train.num_frames == 8  # the run's own section is untouched
    assert ctx.hashed_config["train"]["data"]["shuffle_buffer"] == 3


def test_only_the_changed_stage_and_what_follows_rerun(tmp_path):
    rec = Recorder(log=False)
    cfg_over = [THREE, f"run.root={tmp_path}"]

    def graph(overrides):
        cfg, d = composed(overrides)
        g = graph_for(cfg)
        keep = ["train_a", "train_b", "train_c", "eval"]
        stages = [Stage("shard", rec.stage("shard"))] + [
            dataclasses.replace(g.stages[n], fn=rec.stage(n)) for n in keep]
        return Graph(stages, tmp_path), cfg, d

    g, cfg, d = graph(cfg_over)
    g.run(cfg, d, "r1", log=lambda s: None)
    assert rec.calls == ["shard", "train_a", "train_b", "train_c", "eval"]
    rec.calls.clear()
    g, cfg, d = graph([*cfg_over, "+recipe.stages.2.train.steps=5"])
    assert {r.name: r.state for r in g.status(d)} == {
        "shard": "done", "train_a": "done", "train_b": "done", "train_c": "stale",
        "eval": "stale"}  # done: by the latest run
    g.run(cfg, d, "r2", log=lambda s: None)
    assert rec.calls == ["train_c", "eval"]


@pytest.mark.parametrize("override, named", [
    ("+recipe.stages=[{name: s, train: {num_framez: 4}}]", "recipe.stages[0].train.num_framez"),
    ("+recipe.stages=[{name: s}, {name: t, train: {data: {shufle_buffer: 4}}}]",
     "recipe.stages[1].train.data.shufle_buffer"),
    ("+recipe.stages=[{name: s, train: {steps: 0}}]", "recipe.stages[0].train.steps must be >= 1"),
    ("+recipe.stages=[{name: s, train: {lr: fast}}]", "recipe.stages[0].train.lr"),
    ("+recipe.stages=[{name: s, weights: best}]", "recipe.stages[0].weights must be one of ema, raw"),
    ("+recipe.stages=[{name: s, optimizer: carry}]", "recipe.stages[0].optimizer: carry needs weights: raw"),
    ("+recipe.stages=[{name: s}, {name: s}]", "recipe.stages[1].name: 's' names two stages"),
    ("+recipe.stages=[{name: eval}]", "recipe.stages[0].name 'eval' is another stage's"),
    ("+recipe.stages=[{name: Train-1}]", "recipe.stages[0].name must be lower-case"),
])
def test_a_bad_recipe_entry_is_named_by_its_key(override, named):
    with pytest.raises(ConfigError) as e:
        composed([override])
    assert named in str(e.value)


def test_the_cli_refuses_a_bad_recipe_key_before_any_stage(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "recipe=short_to_long",
                        "+recipe.stages.1.train.num_framez=4", f"run.root={tmp_path / 'out'}"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "recipe.stages[1].train.num_framez" in r.stderr
    assert not (tmp_path / "out").exists()


def test_preflight_checks_every_recipe_stage_and_names_it():
    from pipeline.cli import preflight

    preflight(composed(["recipe=short_to_long"])[0])
    cfg, _ = composed(["recipe=short_to_long", "recipe.stages.0.train.height=18"])
    with pytest.raises(SystemExit, match=r"recipe stage train_short: train shape \(4, 18, 16\)"):
        preflight(cfg)
    cfg, _ = composed(["recipe=short_to_long", "+recipe.stages.1.train.global_batch_size=3"])
    with pytest.raises(SystemExit, match="recipe stage train_long: train.global_batch_size=3"):
        preflight(cfg)
    # Latent shards hold clips at one height and width, and (latent.span=window) one window of
    # latent.num_frames: a stage at another size or a longer window is refused up front.
    cfg, _ = composed(["experiment=latent", "recipe=short_to_long"])
    with pytest.raises(SystemExit, match="recipe stage train_short: the latent shards .*height x width 32x32"):
        preflight(cfg)
    cfg, _ = composed(["experiment=latent", "recipe=short_to_long", "recipe.stages.0.train.height=32",
                       "recipe.stages.0.train.width=32", "recipe.stages.0.train.num_frames=5",
                       "+recipe.stages.1.train.num_frames=17"])
    with pytest.raises(SystemExit, match=r"recipe stage train_long: .*one window of 9 frames.*latent.span=whole"):
        preflight(cfg)


def test_the_images_first_recipe_trains_stills_then_short_video_then_both():
    from pipeline.cli import preflight

    cfg, d = composed(["experiment=images_first"])
    preflight(cfg)
    g = graph_for(cfg)
    assert g.order[5:] == ["train_images", "train_short", "train_long", "eval"]
    images, short, long = (g.hashed_config(n, d) for n in g.order[5:8])
    assert images["train"]["num_frames"] == 1 and images["train"]["data"]["mix"] == {"image": 1.0}
    assert short["train"]["num_frames"] == 4 and short["train"]["data"]["mix"] == {"video": 1.0}
    assert short["settings"]["init"]["from"] == "train_images" and long["settings"]["init"]["from"] == "train_short"
    assert long["train"]["data"]["mix"] == {"image": 0.25, "video": 0.75}
    assert sorted(b["num_frames"] for b in long["train"]["data"]["buckets"]) == [1, d["train"]["num_frames"]]
    assert cfg.source.stills > 0 and cfg.model.dit.patch_size[0] == 1
    # a still is one temporal patch: with two frames a patch the image stage is refused up front
    cfg, _ = composed(["experiment=images_first", "model.dit.patch_size=[2,4,4]"])
    with pytest.raises(SystemExit, match="recipe stage train_images"):
        preflight(cfg)


def test_submit_takes_a_recipes_stage_names():
    from pipeline.submit import SubmitError, build_submission

    s = build_submission(["recipe=short_to_long", "run.root=/shared/st"], "train_long", None,
                         "http://127.0.0.1:8265", run_id="20260101-000000-abcd")
    assert s["entrypoint"].startswith("python -m pipeline.cli run --only train_long")
    with pytest.raises(SubmitError, match="unknown stage 'train'; stages are: .*train_short"):
        build_submission(["recipe=short_to_long", "run.root=/x"], "train", None, "http://x")


# ----- the weights a stage starts from ----------------------------------------------------------
def tiny_model() -> torch.nn.Module:
    return ModelConfig().build()


@pytest.fixture
def previous_stage(tmp_path) -> Path:
    """A training output as the trainer exports it: raw weights and an EMA (of the trainable
    weights only) that differs from them."""
    torch.manual_seed(1)
    model = tiny_model()
    raw = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ema = {k: p.detach().clone() + 0.5 for k, p in model.named_parameters() if p.requires_grad}
    torch.save(raw, tmp_path / "model.pt")
    torch.save(ema, tmp_path / "model_ema.pt")
    return tmp_path


@pytest.mark.parametrize("weights", ["ema", "raw"])
def test_a_later_stage_starts_from_exactly_the_previous_weights(previous_stage, weights):
    raw = torch.load(previous_stage / "model.pt", weights_only=True)
    ema = torch.load(previous_stage / "model_ema.pt", weights_only=True)
    want = {**raw, **ema} if weights == "ema" else raw
    torch.manual_seed(2)
    model = tiny_model()  # other initial weights
    assert any(not torch.equal(model.state_dict()[k], want[k]) for k in want)
    init = {"dir": str(previous_stage), "weights": weights, "optimizer": "fresh", "from": "s"}
    rec = load_initial_weights(model, init)
    got = model.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert rec["digest"] == digest(want) and rec["weights"] == weights and rec["from"] == "s"
    assert load_initial_weights(tiny_model(), None) is None


def test_the_weights_transfer_across_clip_lengths_and_resolutions(previous_stage):
    """The DiT has no size-dependent parameter: one set of weights runs at any patchable shape."""
    model = tiny_model()
    load_initial_weights(model, {"dir": str(previous_stage), "weights": "ema",
                                 "optimizer": "fresh"})
    ids, mask = model.tokenize(["a red circle", "two squares"])
    for t, h, w in ((2, 8, 8), (4, 16, 12)):
        x = torch.randn(2, 3, t, h, w)  # (B, C, T, H, W)
        out = model(x, torch.rand(2), ids, mask)
        assert out.shape == x.shape and torch.isfinite(out).all()


def save_dir(root: Path, step: int) -> Path:
    """An (empty) DeepSpeed save directory of `step`: its `latest` and tag directory."""
    d = root / f"save{step}"
    (d / f"step{step:08d}").mkdir(parents=True)
    (d / "latest").write_text(f"step{step:08d}")
    (d / f"step{step:08d}" / "rank00000_state.pt").write_bytes(b"")
    return d


def test_the_driver_refuses_a_missing_start_before_any_worker(previous_stage, tmp_path):
    (previous_stage / "model_ema.pt").unlink()
    init = {"dir": str(previous_stage), "weights": "ema", "optimizer": "fresh", "from": "s"}
    with pytest.raises(FileNotFoundError, match="model_ema.pt is missing.*--only s"):
        check_init(init, 2)
    check_init({**init, "weights": "raw"}, 2)  # model.pt is there
    with pytest.raises(FileNotFoundError, match="optimizer: carry needs a checkpoint"):
        check_init({**init, "weights": "raw", "optimizer": "carry"}, 2)
    register_checkpoints(previous_stage, [(save_dir(tmp_path, 4), {"step": 4, "world_size": 1})])
    with pytest.raises(ValueError, match="written by 1 training workers, but cluster.num_workers=2"):
        check_init({**init, "weights": "raw", "optimizer": "carry"}, 2)
    check_init({**init, "weights": "raw", "optimizer": "carry"}, 1)
    with pytest.raises(ValueError, match="sequence parallel degree 1, but cluster.sequence_parallel=2"):
        check_init({**init, "weights": "raw", "optimizer": "carry"}, 1, 2)


@pytest.mark.skipif(s3 is None, reason="needs moto (tests/test_storage.py's S3 endpoint)")
def test_a_later_stage_starts_from_a_bucket_run_roots_previous_stage(previous_stage, s3, tmp_path):
    """With run.root=s3://... the workers read the previous stage's weights from the bucket."""
    from data.storage import Store

    url = s3("run") + "/stages/train_short-0123456789ab"
    store = Store(url)
    for name in ("model.pt", "model_ema.pt"):
        store.put_file(previous_stage / name, name)
    register_checkpoints(url, [(save_dir(tmp_path, 4), {"step": 4, "world_size": 2})])
    init = {"dir": url, "weights": "ema", "optimizer": "fresh", "from": "train_short"}
    check_init(init, 1)
    check_init({**init, "weights": "raw", "optimizer": "carry"}, 2)  # the mirror's world size
    with pytest.raises(ValueError, match="written by 2 training workers"):
        check_init({**init, "weights": "raw", "optimizer": "carry"}, 1)
    model = tiny_model()
    rec = load_initial_weights(model, init)
    assert rec["digest"] == digest(initial_weights(str(previous_stage), "ema"))


CARRY = textwrap.dedent("""
    import json, os, socket, sys
    from contextlib import closing
    from pathlib import Path
    import torch, torch.distributed as dist
    sys.path.insert(0, sys.argv[2])  # the tests' directory
    from ray_checkpoints import register
    from training.checkpoint import write_tag
    from training.flow import FlowConfig, flow_loss
    from training.model import ModelConfig
    from training.parallelize import DeepSpeedConfig, parallelize
    from training.trainer import param_groups
    from training.warm_start import carry_optimizer, load_initial_weights

    out = Path(sys.argv[1])
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)
    mcfg = ModelConfig()

    def engine(seed, init=None):
        torch.manual_seed(seed)
        model = mcfg.build()
        load_initial_weights(model, init)  # before the engine, as the trainer does
        return parallelize(model, DeepSpeedConfig(zero_stage=2), lr=1e-2, weight_decay=0.0,
                           params=param_groups(model, 1e-2, mcfg.text.lr_scale),
                           schedule=lambda s: 1.0, micro_batch=2, precision="fp32")

    def step(e, seed):
        g = torch.Generator().manual_seed(seed)
        x0 = torch.rand(2, 3, 2, 8, 8, generator=g) * 2 - 1  # (B, C, T, H, W)
        ids, mask = e.module.tokenize(["a red circle", "two squares"])
        loss, _, _ = flow_loss(lambda x, t: e(x, t, ids, mask), x0, FlowConfig(), generator=g)
        e.backward(loss); e.step()

    def weights(e):
        return {k: v.detach().clone() for k, v in e.module.state_dict().items()}

    a = engine(0)
    for i in range(2):
        step(a, i)
    write_tag(a, out / "save", 2, {}, None)
    register(out, [(out / "save", {"step": 2, "world_size": 1})], move=True)
    torch.save(weights(a), out / "model.pt")
    step(a, 10)  # stage one, continued by one step
    init = {"dir": str(out), "weights": "raw", "optimizer": "carry", "from": "a"}
    res = {}
    for mode in ("carry", "fresh"):
        b = engine(5, {**init, "optimizer": mode})  # other initial weights, then stage one's
        carry_optimizer(b, {**init, "optimizer": mode})
        step(b, 10)
        res[mode] = max(float((weights(a)[k] - v).abs().max()) for k, v in weights(b).items())
    print(json.dumps(res))
""")


def test_a_carried_optimizer_continues_the_previous_stage_exactly(tmp_path):
    """One step after carrying the AdamW state is the previous engine's next step (to the bit);
    with a fresh optimizer the same step lands elsewhere."""
    r = subprocess.run([sys.executable, "-c", CARRY, str(tmp_path), str(Path(__file__).parent)],
                       capture_output=True,
                       text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["carry"] == 0.0
    assert res["fresh"] > 1e-4


# A two-stage recipe through the real graph: tests/test_experiment_long.py (experiment=long).
