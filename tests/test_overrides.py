"""Hydra overrides as Hydra users write them: ``+key=value`` only where a section is open (a
typo is named before any stage), mapping-valued overrides of open sections deep-merged, and a
whole DeepSpeed JSON (``deepspeed.config_file``) under the keys this project sets, hashed by
content."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from pipeline.config import CONF_DIR, ConfigError, register, to_dict, to_object
from pipeline.stages import graph_for
from training.parallelize import DeepSpeedConfig, build_ds_config

register()
REPO = Path(__file__).resolve().parent.parent


def composed(overrides=()):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        c = compose("config", overrides=list(overrides))
    return to_object(c), to_dict(c)


def test_plus_typo_is_rejected_naming_the_key_and_the_closest(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "experiment=tiny", "--until", "source",
                        "+train.lrr=1", f"run.root={tmp_path}/out"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "train.lrr: no such key" in r.stderr and "did you mean train.lr?" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()  # nothing started
    for override, named in (("+train.data.shufle_buffer=4", "train.data.shufle_buffer"),
                            ("+lr=1", "did you mean vae.lr or train.lr?"),
                            ("+deepspeed.zero_stagee=3", "deepspeed.zero_stage?")):
        with pytest.raises(ConfigError, match=named.replace(".", r"\.").replace("?", r"\?")):
            composed([override])


def test_open_sections_take_any_key_and_mapping_overrides_deep_merge():
    cfg, d = composed(["deepspeed=zero3", "+deepspeed.extra.zero_optimization.sub_group_size=7",
                       "deepspeed.extra={zero_optimization: {stage3_max_live_parameters: 1000}}",
                       "deepspeed.extra.wall_clock_breakdown=true",
                       "+ingest.storage_options.anon=true"])
    assert cfg.ingest.storage_options == {"anon": True}
    assert d["deepspeed"]["extra"] == {"zero_optimization": {"sub_group_size": 7,
                                                             "stage3_max_live_parameters": 1000},
                                       "wall_clock_breakdown": True}
    ds = build_ds_config(cfg.deepspeed, 2, "fp32")
    zero = ds["zero_optimization"]
    assert zero["stage3_max_live_parameters"] == 1000 and zero["sub_group_size"] == 7
    assert zero["stage"] == 3 and zero["stage3_prefetch_bucket_size"] == cfg.deepspeed.bucket_elements
    assert ds["wall_clock_breakdown"] is True


def write(path: Path, obj: dict) -> str:
    path.write_text(json.dumps(obj))
    return str(path)


FILE = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "zero_optimization": {"stage": "auto", "reduce_bucket_size": 1234, "contiguous_gradients": True},
        "fp16": {"enabled": False}, "flops_profiler": {"enabled": True, "profile_step": 3}}


def test_config_file_is_the_base_our_keys_set_and_its_content_is_hashed(tmp_path):
    base, base_d = composed()
    path = write(tmp_path / "ds.json", FILE)
    cfg, d = composed([f"deepspeed.config_file={path}", "deepspeed.grad_accum=2"])
    assert cfg.deepspeed.file_config == FILE and d["deepspeed"]["file_config"] == FILE
    ds = build_ds_config(cfg.deepspeed, 4, "bf16")
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1234, "contiguous_gradients": True,
                                       "allgather_bucket_size": cfg.deepspeed.bucket_elements,
                                       "reduce_scatter": False}
    assert ds["flops_profiler"] == {"enabled": True, "profile_step": 3} and ds["bf16"] == {"enabled": True}
    assert "auto" not in json.dumps(ds)
    # The content, not the path, is in the train stage's hash; the default's hash is untouched.
    h = graph_for(cfg).hashes(d)
    same = write(tmp_path / "copy.json", FILE)
    h_copy = graph_for(composed([f"deepspeed.config_file={same}", "deepspeed.grad_accum=2"])[0]).hashes(
        composed([f"deepspeed.config_file={same}", "deepspeed.grad_accum=2"])[1])
    assert h_copy["train"] == h["train"]
    other = write(tmp_path / "other.json", {**FILE, "flops_profiler": {"enabled": False}})
    c2, d2 = composed([f"deepspeed.config_file={other}", "deepspeed.grad_accum=2"])
    assert graph_for(c2).hashes(d2)["train"] != h["train"]
    assert h["shard"] == graph_for(base).hashes(base_d)["shard"]
    assert "file_config" not in graph_for(base).hashed_config("train", base_d)["deepspeed"]
    # Built in Python (a trainer test, a notebook) the file is read too.
    assert DeepSpeedConfig(config_file=path).file_config == FILE


@pytest.mark.parametrize("content, named", [
    ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps=4, but this project sets it from "
                                         "deepspeed.grad_accum (here 1)"),
    ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage=3, but this project sets it from "
                                          "deepspeed.zero_stage"),
    ({"train_micro_batch_size_per_gpu": 2}, "train_micro_batch_size_per_gpu=2"),
    ({"optimizer": {"type": "Adam"}}, "optimizer.type"),
    ({"bf16": {"enabled": True}}, "bf16.enabled=true, but this project sets it from train.precision"),
    ({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}, "deepspeed.offload_optimizer"),
    ({"activation_checkpointing": {"number_checkpoints": "auto"}}, "is 'auto', but this project does not"),
])
def test_config_file_contradicting_our_keys_is_named_when_loaded(tmp_path, content, named):
    path = write(tmp_path / "ds.json", content)
    with pytest.raises(ConfigError, match="deepspeed.config_file") as e:
        composed([f"deepspeed.config_file={path}"])
    assert named in str(e.value)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="deepspeed.config_file .*nope.json"):
        composed([f"deepspeed.config_file={tmp_path / 'nope.json'}"])
