"""Registered Ray Train checkpoints without a Ray Train run, for tests that need a training
output with checkpoints in it (evaluation of ``eval.steps``, warm starts, the world-size check)
but not the 30 s of starting workers: DeepSpeed save directories are copied into the output's
``checkpoints/`` and registered by Ray Train's own checkpoint manager, as its controller does
when every rank has reported (its snapshot is what ``ray.train.Result.from_path`` reads).
Tests only: the classes are Ray Train's internals."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from ray.train import Checkpoint, CheckpointConfig
from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import CheckpointManager
from ray.train.v2._internal.execution.storage import StorageContext
from ray.train.v2._internal.execution.training_report import _TrainingReport

from data.storage import Store
from training.checkpoint import RUN_DIR, ray_storage, tag_of


def register(stage_root: str | Path, saves: list[tuple[Path, dict]], move: bool = False) -> None:
    """Each (DeepSpeed save directory, metrics with "step") becomes the checkpoint
    ``<stage_root>/checkpoints/step<N>`` (a local directory or a bucket URL), registered in
    that order."""
    path, fs = ray_storage(stage_root)
    storage = StorageContext(storage_path=path, experiment_dir_name=RUN_DIR, storage_filesystem=fs)

    async def go() -> None:
        manager = CheckpointManager(CheckpointConfig(), storage)
        for save_dir, metrics in saves:
            tag = tag_of(metrics["step"])
            dest = f"{storage.experiment_fs_path}/{tag}"
            if fs is not None:
                Store(str(stage_root)).put_dir(Path(save_dir), f"{RUN_DIR}/{tag}")
            else:
                (shutil.move if move else shutil.copytree)(str(save_dir), dest)
            manager.register_checkpoint(_TrainingReport(
                checkpoint=Checkpoint(dest, filesystem=storage.storage_filesystem),
                metrics=metrics, validation=False))

    asyncio.run(go())
