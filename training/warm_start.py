"""Warm start: a training stage that begins from another training output (a recipe's later stage,
``pipeline.recipe``) instead of fresh weights.

``init`` (``run_training``'s argument, passed on to every worker) is a dict::

    {"dir": <the previous stage's output: a path or a URL>, "weights": "ema" | "raw",
     "optimizer": "fresh" | "carry", "from": <its stage name>}

Every rank loads the weights into the pure model before the DeepSpeed engine is built
(:func:`load_initial_weights`), so ZeRO partitions them and the EMA starts from them. ``ema``:
the previous stage's ``model_ema.pt`` over its ``model.pt`` (the EMA holds the trainable
weights; a frozen text encoder's come from ``model.pt``), as evaluation loads them. ``raw``:
``model.pt``. The DiT has no parameter whose shape depends on the clip (RoPE is computed from the
patch grid), so the weights load whatever the new stage's frames and resolution.

``optimizer: carry`` then loads the previous stage's last DeepSpeed checkpoint into the engine
(:func:`carry_optimizer`): the raw weights and the AdamW state (moments, step counts; under ZeRO
each rank's partition, so the world size must be the one that wrote it, checked by the driver),
not its LR schedule: the new stage runs its own warmup and decay from step 0.

A stage that resumes from a checkpoint of its own restores over all of this (the checkpoint
holds the engine and the EMA), so a restarted stage continues where it stopped.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import torch

from data.storage import Store, has_scheme
from training.checkpoint import RunCheckpoints, tag_of, weights_only_loads

WEIGHT_FILES = {"raw": ("model.pt",), "ema": ("model.pt", "model_ema.pt")}


def check_init(init: dict | None, num_workers: int, sequence_parallel: int = 1) -> None:
    """Driver side, before any worker starts: the previous stage's files are there, and a
    carried optimizer state was written by as many workers, in sequence-parallel groups of the
    same degree. Raises naming what is missing or both numbers."""
    if init is None:
        return
    store = Store(init["dir"])
    for name in WEIGHT_FILES[init["weights"]]:
        if not store.exists(name):
            raise FileNotFoundError(
                f"cannot start from stage '{init.get('from')}': {store.url_of(name)} is missing "
                f"(its training did not finish; rerun it: spacetime run --only {init.get('from')})")
    if init["optimizer"] == "carry":
        latest = RunCheckpoints(init["dir"]).latest()
        record = None if latest is None else latest[1]
        if record is None:
            raise FileNotFoundError(f"optimizer: carry needs a checkpoint of stage "
                                    f"'{init.get('from')}' in {init['dir']}/checkpoints; none")
        saved, saved_sp = record.get("world_size"), int(record.get("sequence_parallel", 1))
        if saved_sp != sequence_parallel:
            raise ValueError(
                f"optimizer: carry loads the optimizer state of stage '{init.get('from')}', "
                f"written at sequence parallel degree {saved_sp}, but "
                f"cluster.sequence_parallel={sequence_parallel}: train with "
                f"cluster.sequence_parallel={saved_sp}, or use optimizer: fresh")
        if saved != num_workers:
            raise ValueError(
                f"optimizer: carry loads the optimizer state of stage '{init.get('from')}', "
                f"written by {saved} training workers, but cluster.num_workers={num_workers}: "
                f"train with cluster.num_workers={saved}, or use optimizer: fresh")


def initial_weights(src: str, weights: str) -> dict[str, torch.Tensor]:
    """The state dict a stage starting from `src` (a training output, path or URL) loads."""
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for name in WEIGHT_FILES[weights]:
            files[name] = _local(src, name, Path(tmp))
            files[name] = torch.load(files[name], map_location="cpu", weights_only=True)
    sd = files["model.pt"]
    if weights == "ema":
        sd = {**sd, **files["model_ema.pt"]}
    return sd


def digest(state_dict: dict[str, torch.Tensor]) -> str:
    """A content hash of a state dict (names, shapes, dtypes, values): the stage records the one
    it started from (``train_result.json``'s ``init.digest``)."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        t = state_dict[k].detach().float().cpu().contiguous()
        h.update(f"{k}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def load_initial_weights(model: torch.nn.Module, init: dict | None) -> dict | None:
    """Every rank, before the engine is built: load `init`'s weights into `model` (strictly:
    every parameter and buffer). Returns the record the result keeps, or None without init."""
    if init is None:
        return None
    sd = initial_weights(init["dir"], init["weights"])
    model.load_state_dict(sd)
    return {"from": init.get("from"), "dir": str(init["dir"]), "weights": init["weights"],
            "optimizer": init["optimizer"], "digest": digest(model.state_dict())}


def carry_optimizer(engine, init: dict | None) -> str | None:
    """Every rank, after the engine is built: with ``optimizer: carry``, load the previous
    stage's last checkpoint (weights and optimizer state, not its LR schedule) into `engine`
    and set the learning rates to the new schedule's first. Returns the tag, or None."""
    if init is None or init["optimizer"] != "carry":
        return None
    latest = RunCheckpoints(init["dir"]).latest()  # checked by the driver (check_init)
    checkpoint, record = latest
    tag = tag_of(record["step"])
    with checkpoint.as_directory() as d:  # a bucket's checkpoint: downloaded, then dropped
        with weights_only_loads(Path(d) / tag):
            engine.load_checkpoint(d, tag=tag, load_optimizer_states=True,
                                   load_lr_scheduler_states=False)
    sched = engine.lr_scheduler
    for group, lr in zip(engine.optimizer.param_groups, sched.get_last_lr()):
        group["lr"] = lr
    return tag


def _local(src: str, name: str, tmp: Path) -> Path:
    if not has_scheme(src):
        return Path(src) / name
    Store(src).get_file(name, tmp / name)
    return tmp / name
