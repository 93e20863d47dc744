"""Sequence parallelism in training: real Ray Train, real DeepSpeed, 2 gloo ranks on CPU.

Two runs shared by every test here: SP=1 on one worker (the reference) and SP=2 on two workers
under ZeRO-3, one of whose workers is SIGKILLed mid-run (Ray Train restarts the group, which
resumes from the last complete checkpoint). Same seed, same data, same global batch: the SP=2
run must give the SP=1 loss curve. Model-level equality (outputs, every gradient) is in
test_sequence_parallel.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_training import NUM_FRAMES, SIZE, losses, metrics, run_killing_a_worker, train_cfg, write_training_shards

from data.tracking import TrackerSpec
from training.checkpoint import RunCheckpoints
from training.launch import check_resume_world_size, run_training
from training.model import ModelConfig
from training.parallelize import DeepSpeedConfig

STEPS = 20


class Cluster:
    gpus_per_worker, cpus_per_worker, peak_tflops_per_worker = 0, 1, None

    def __init__(self, num_workers: int, sequence_parallel: int):
        self.num_workers, self.sequence_parallel = num_workers, sequence_parallel


def model_cfg(attention: str = "full") -> ModelConfig:
    mcfg = ModelConfig()
    mcfg.dit.patch_size = [2, 4, 4]
    mcfg.dit.attention = attention
    return mcfg


def train_sp(shards, out: Path, *, workers: int, sp: int, zero: int, ckpt_every: int = 100,
             max_failures: int = 0) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    spec = TrackerSpec(mode="disabled", project="t", entity=None, dir=str(out), group="g",
                       job_type="train", name="train", config={}, tags=[],
                       jsonl=str(out / "metrics.jsonl"))
    return run_training(train_cfg=train_cfg(STEPS, ckpt_every=ckpt_every, max_failures=max_failures),
                        model_cfg=model_cfg(), ds_cfg=DeepSpeedConfig(zero_stage=zero),
                        cluster=Cluster(workers, sp), out_dir=out, train_shards=shards,
                        tracker_spec=spec, stage="train", stage_hash="0" * 64, inputs={})


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    return write_training_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def sp1(ray_local, shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sp1")
    train_sp(shards, out, workers=1, sp=1, zero=2)
    return out


@pytest.fixture(scope="module")
def sp2_killed(ray_local, shards, sp1, tmp_path_factory) -> tuple[Path, dict, int | None]:
    """SP=2 over 2 workers, ZeRO-3, a checkpoint every 4 steps; a worker SIGKILLed after step 6."""
    out = tmp_path_factory.mktemp("sp2")
    res, killed = run_killing_a_worker(
        lambda: train_sp(shards, out, workers=2, sp=2, zero=3, ckpt_every=4, max_failures=2), out, after_step=6)
    return out, res, killed


def test_sp2_gives_the_sp1_loss_curve_through_a_killed_worker(sp1, sp2_killed):
    out, res, killed = sp2_killed
    assert killed is not None, "training finished before a worker could be killed"
    assert res["resumed_from_step"] in (4, 8, 12) and res["sequence_parallel"] == 2
    assert res["zero_stage"] == 3 and res["world_size"] == 2 and res["micro_batch"] == 4
    a, b = losses(sp1), losses(out)
    assert sorted(a) == sorted(b) == list(range(STEPS))
    assert sum(a[s] for s in range(-4 + STEPS, STEPS)) < 0.9 * sum(a[s] for s in range(4))  # it learns
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4), step
    # the final weights too (SP leaves the parameters' names and values as SP=1 would)
    wa, wb = (torch.load(o / "model.pt", weights_only=True) for o in (sp1, out))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-3, atol=1e-5)


def test_sp2_counts_each_sample_once(sp1, sp2_killed):
    """Throughput counts a sample once although both ranks of its group work on it."""
    out, _, _ = sp2_killed
    for m in metrics(out):
        samples = round(m["train/samples_per_s"] * m["train/step_time_s"])
        assert samples in (3, 4)  # the global batch, 3 at an epoch's end
    assert json.loads((sp1 / "train_result.json").read_text())["sequence_parallel"] == 1


def test_a_checkpoint_resumes_only_at_its_sequence_parallel_degree(sp2_killed):
    out, _, _ = sp2_killed
    ckpts = RunCheckpoints(out)
    assert ckpts.latest()[1]["sequence_parallel"] == 2
    check_resume_world_size(ckpts, 2, 2)  # the same layout: fine
    with pytest.raises(ValueError, match=r"written at sequence parallel degree 2 but "
                                         r"cluster.sequence_parallel=1: resume with cluster.sequence_parallel=2"):
        check_resume_world_size(ckpts, 2, 1)


def test_indivisible_degrees_fail_before_any_worker_starts(shards, tmp_path):
    with pytest.raises(ValueError, match=r"cluster.sequence_parallel=3 must divide the 2 training workers"):
        train_sp(shards, tmp_path, workers=2, sp=3, zero=2)
    assert not (tmp_path / "ray_train").exists()


def test_the_plan_of_this_run_is_what_the_trainer_ran(sp2_killed):
    """`spacetime plan` for the SP=2 run's shape and layout: its data-parallel width, gradient
    accumulation, micro-batch and tokens per GPU are the trainer's."""
    from pipeline.plan import GIB, PlanConfig, TrainSpec, VAESpec, VideoSpec, activation_bytes, dit_config, make_plan

    out, res, _ = sp2_killed
    mcfg = model_cfg()
    cfg = PlanConfig(
        model="tiny", patch_size=mcfg.dit.patch_size, text_dim=mcfg.dit.text_dim,
        text_len=mcfg.text.max_length, video=VideoSpec(seconds=1, fps=NUM_FRAMES, height=SIZE[0], width=SIZE[1]),
        vae=VAESpec(temporal=1, spatial=1, channels=3), num_gpus=2, zero_stage=3, sequence_parallel=2,
        train=TrainSpec(global_batch_size=4, micro_batch_size=res["micro_batch"], precision="fp32",
                        grad_checkpointing=False))
    plan = make_plan(cfg)
    tokens = (NUM_FRAMES // 2) * (SIZE[0] // 4) * (SIZE[1] // 4)
    assert plan["compute"]["data_parallel"] == 1 and plan["compute"]["grad_accum"] == 1
    assert plan["tokens"]["per_sample"] == tokens
    full = [m for m in metrics(out) if round(m["train/samples_per_s"] * m["train/step_time_s"]) == 4]
    assert full and all(m["train/tokens_per_s"] * m["train/step_time_s"] == pytest.approx(4 * tokens) for m in full)
    # each rank holds micro x tokens / sp of them: what the planner's memory model charges per GPU
    # (its per-token bytes are checked against SP=2's measured activations in benchmarks/bench_sp.py)
    assert plan["memory_gib"]["activations_no_ckpt"] * GIB == pytest.approx(
        activation_bytes(dit_config(cfg), res["micro_batch"] * tokens / 2, "fp32", False))
