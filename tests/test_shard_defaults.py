"""Shard sizes as WebDataset users expect: by bytes (~1 GB) for real data; the built-in
synthetic source (the demo, tiny, latent and quality experiments) caps its own at 8 clips, so
its shard plans are what they were."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from pipeline.config import CONF_DIR, register, to_object
from pipeline.curation.shard import ShardConfig, plan_shards

register()


def shard_cfg(overrides=()) -> ShardConfig:
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return to_object(compose("config", overrides=list(overrides))).shard


def clips(n: int, source_bytes: int) -> list[dict]:
    return [{"clip_id": f"c{i:04d}", "start": 0, "end": 10, "source_frames": 10,
             "source_bytes": source_bytes, "width": 64, "height": 64} for i in range(n)]


@pytest.mark.parametrize("source", [["source=directory", "source.path=/tmp"], ["source=ingest"]])
def test_real_data_shards_by_bytes_without_a_clip_cap(source):
    cfg = shard_cfg(source)
    assert cfg.max_clips_per_shard == 0 and cfg.target_shard_bytes == 10**9
    assert ShardConfig().target_shard_bytes == 10**9  # the dataclass agrees with the YAML
    plan = plan_shards(clips(200, 50 * 2**20), cfg)  # 50 MiB clips: 20 reach 1 GB
    sizes = [len(g) for name, g in plan if name.startswith("train")]
    assert len(sizes) > 1 and all(n == 20 for n in sizes[:-1])


@pytest.mark.parametrize("experiment", ["demo", "tiny", "latent", "quality"])
def test_synthetic_experiments_keep_their_small_shards(experiment):
    cfg = shard_cfg([f"experiment={experiment}"])
    assert cfg.max_clips_per_shard == 8
    old = ShardConfig(target_shard_bytes=256 * 2**20, max_clips_per_shard=8)  # the old default
    few = clips(120, 40_000)  # synthetic-sized clips: the cap, not the bytes, cuts them
    assert plan_shards(few, cfg) == plan_shards(few, old)
    assert max(len(g) for _, g in plan_shards(few, cfg)) == 8
    # an explicit override still wins over the source's cap
    assert shard_cfg([f"experiment={experiment}", "shard.max_clips_per_shard=3"]).max_clips_per_shard == 3
