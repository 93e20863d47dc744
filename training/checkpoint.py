"""Checkpoints that survive failures, through Ray Train's checkpoint API.

Saving: every rank writes the files it owns into a staging directory of its own
(``<out>/.staging/rank<r>/``): DeepSpeed's ``save_checkpoint`` (tag ``stepNNNNNNNN``), ours
``rank<r>_state.pt`` (RNG states and loader position) and, on rank 0, ``ema.pt``. Then every rank
calls ``ray.train.report(metrics, checkpoint=Checkpoint.from_directory(staging))``. Ray Train
merges the ranks' directories into one checkpoint in the run's storage (the stage output: a local
directory, or a bucket prefix written straight from the workers), registers it only once every
rank's upload has finished (so a checkpoint a rank died writing is never resumed from), records
it with rank 0's metrics in its snapshot and keeps the newest ``train.keep_checkpoints``.

Layout under ``<train output>/checkpoints/`` (Ray Train's run directory)::

    checkpoint_manager_snapshot.json   Ray Train: the registered checkpoints and their metrics
    step00000100/                      one Ray checkpoint per save, a DeepSpeed save directory
        latest                         DeepSpeed's: the tag inside (zero_to_fp32.py runs as is)
        zero_to_fp32.py                DeepSpeed's converter
        step00000100/
            mp_rank_00_model_states.pt, zero_pp_rank_<r>_..._optim_states.pt   DeepSpeed
            rank<r>_state.pt           ours: RNG states and loader position of rank r
            ema.pt                     ours: EMA weights (rank 0)

Reading: ``ray.train.get_checkpoint()`` in the workers (a restarted worker group, or a rerun of
the stage: Ray Train restores its snapshot from the storage path), ``ray.train.Result.from_path``
anywhere else (:class:`RunCheckpoints`: evaluation of ``eval.steps``, a recipe's warm start, the
driver's world-size check). A directory in ``checkpoints/`` that the snapshot does not list was
being written when something failed; nothing reads it.

**What loading trusts.** A checkpoint is a set of pickles, and unpickling can run any code, so
every file is loaded with ``torch.load(weights_only=True)``: tensors, plain containers and
numbers, and the few DeepSpeed records its optimizer states hold (:func:`deepspeed_globals`),
whose unpickling sets fields and runs none of their code. :func:`weights_only_loads` imposes it
on DeepSpeed's own loads too (they ask for ``weights_only=False``). A file holding anything else
(a crafted payload) fails to load, naming the tag, and runs nothing. The files' values are
trusted: whoever can write the checkpoint storage decides the weights, optimizer state, RNG and
loader position a resume continues from.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from data.storage import Store, is_url

RUN_DIR = "checkpoints"  # Ray Train's run directory (RunConfig name) in the training output
STAGING = ".staging"  # each rank's directory for the checkpoint it is writing
FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"  # torch's own switch, read by every load


def tag_of(step: int) -> str:
    return f"step{step:08d}"


class UnsafeCheckpoint(Exception):
    """A checkpoint file holds objects that are not weights; it was not loaded."""


def deepspeed_globals() -> list:
    """The classes in DeepSpeed's checkpoint files besides tensors and containers (ZeRO 1-3
    optimizer states, fp32 or bf16, with or without offload; DeepSpeed 0.16-0.19): plain records
    (a loss scaler's numbers, a stage enum, a fragment's offset and size)."""
    from deepspeed.runtime.fp16.loss_scaler import (  # lazy: deepspeed ~2.7 s to import, needed only here
        DynamicLossScaler,
        LossScaler,
    )
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_loads(what: str | Path):
    """Within the block every ``torch.load`` of this process unpickles only weights (see the
    module docstring), DeepSpeed's included: torch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` overrides
    their ``weights_only=False``. A file holding anything else raises UnsafeCheckpoint naming
    `what` (the tag) and the object refused; none of it ran."""
    before = os.environ.get(FORCE_WEIGHTS_ONLY)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(deepspeed_globals()):
            yield
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)|Unsupported operand \S+", str(e))
        raise UnsafeCheckpoint(
            f"refusing to load checkpoint {what}: a file in it holds "
            f"{found.group(1) or found.group(0) if found else 'objects'} besides weights; "
            f"nothing of it was run (only tensors, containers and DeepSpeed's state records are "
            f"unpickled)") from None
    finally:
        if before is None:
            os.environ.pop(FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = before


def ray_storage(stage_root: str | os.PathLike) -> tuple[str, object | None]:
    """Ray Train's ``(storage_path, storage_filesystem)`` for a training output: a local
    directory as it is; a URL root (s3://, gs://) as its path on the store's own fsspec
    filesystem (credentials and endpoint from the environment, as for every other file of the
    run), wrapped for pyarrow, which Ray Train uploads and downloads with."""
    if not is_url(stage_root):
        return str(Path(Store(stage_root).path).resolve()), None
    import pyarrow.fs  # lazy: only bucket runs need it (the config layer imports this module)

    store = Store(stage_root)
    return store.path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(store.fs))


class RunCheckpoints:
    """The registered checkpoints of a training output (a path or a URL): Ray Train's
    ``Result.from_path`` of its run directory, oldest first, each with the metrics rank 0
    reported with it (``step``, ``world_size``, ``sequence_parallel``, the latest train/*)."""

    def __init__(self, stage_root: str | os.PathLike):
        self.stage_root = stage_root
        path, self.fs = ray_storage(stage_root)
        self.path = f"{path.rstrip('/')}/{RUN_DIR}"

    def records(self) -> list[tuple[object, dict]]:
        """[(ray.train.Checkpoint, metrics)] oldest first; [] before the first save."""
        from ray.train import Result  # lazy: ray.train ~3.7 s to import; the config layer imports this module

        quiet = logging.getLogger("ray.train.v2._internal.execution.checkpoint.checkpoint_manager")
        level, quiet.level = quiet.level, logging.WARNING  # not "a run snapshot was found" per read
        try:
            result = Result.from_path(self.path, storage_filesystem=self.fs)
        except RuntimeError:  # no run directory, or no snapshot in it yet: nothing registered
            return []
        finally:
            quiet.setLevel(level)
        return sorted(result.best_checkpoints or [], key=lambda cm: cm[1]["step"])

    def tags(self) -> list[str]:
        return [tag_of(m["step"]) for _, m in self.records()]

    def latest(self) -> tuple[object, dict] | None:
        recs = self.records()
        return recs[-1] if recs else None

    def local_dir(self, step: int) -> Path:
        """The directory of the checkpoint registered at `step` (a local training output)."""
        for ck, m in self.records():
            if m["step"] == step:
                return Path(ck.path)
        raise FileNotFoundError(
            f"no registered checkpoint for step {step} in {self.path}; registered: "
            f"{self.tags() or 'none'} "
            f"(train.ckpt_every sets when they are saved, train.keep_checkpoints how many are kept)")


def write_tag(engine, save_dir: Path, step: int, rank_state: dict, ema_state: dict | None) -> Path:
    """Collectively: this rank's files of the checkpoint at `step` into `save_dir`, a DeepSpeed
    save directory (``latest`` and ``zero_to_fp32.py`` from rank 0). Returns the tag's dir."""
    tag = tag_of(step)
    engine.save_checkpoint(str(save_dir), tag=tag, client_state={"step": step}, save_latest=True)
    rank = dist.get_rank()
    (save_dir / tag).mkdir(parents=True, exist_ok=True)
    torch.save(rank_state, save_dir / tag / f"rank{rank:05d}_state.pt")
    if rank == 0 and ema_state is not None:
        torch.save(ema_state, save_dir / tag / "ema.pt")
    return save_dir / tag


def report_checkpoint(engine, out: Path, step: int, rank_state: dict, ema_state: dict | None,
                      metrics: dict) -> None:
    """Every rank: write this rank's files (:func:`write_tag`) into its own staging directory and
    hand them to Ray Train (``ray.train.report``: a barrier; the checkpoint is registered once
    every rank's upload is done; the staging copy is deleted after the upload)."""
    import ray.train  # lazy: ray.train ~3.7 s to import; the config layer imports this module

    staging = Path(out) / STAGING / f"rank{dist.get_rank():05d}"
    shutil.rmtree(staging, ignore_errors=True)  # a save that died halfway
    staging.mkdir(parents=True)
    write_tag(engine, staging, step, rank_state, ema_state)
    ray.train.report({**metrics, "step": step}, checkpoint=ray.train.Checkpoint.from_directory(str(staging)),
                     checkpoint_dir_name=tag_of(step), delete_local_checkpoint_after_upload=True)


def load_tag(engine, save_dir: Path, rank: int) -> tuple[int, dict, dict | None]:
    """Restore the engine from a DeepSpeed save directory (a checkpoint's local copy); returns
    (step, this rank's state, EMA state or None). Raises UnsafeCheckpoint for a tag with anything
    but weights in it (nothing of it runs)."""
    save_dir = Path(save_dir)
    tag = (save_dir / "latest").read_text().strip()
    with weights_only_loads(save_dir / tag):
        _, client = engine.load_checkpoint(str(save_dir), tag=tag)
        rank_state = torch.load(save_dir / tag / f"rank{rank:05d}_state.pt",
                                map_location="cpu", weights_only=True)
        ema_path = save_dir / tag / "ema.pt"
        ema = (torch.load(ema_path, map_location="cpu", weights_only=True)
               if rank == 0 and ema_path.exists() else None)
    return int(client["step"]), rank_state, ema


def rng_state(gen: torch.Generator) -> dict:
    st = {"torch": torch.get_rng_state(), "gen": gen.get_state(),
          "python": list(_flatten_py(random.getstate()))}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: dict, gen: torch.Generator) -> None:
    torch.set_rng_state(st["torch"])
    gen.set_state(st["gen"])
    v, *internal, gauss = st["python"]
    random.setstate((v, tuple(internal), None if gauss == -1 else gauss))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def _flatten_py(state) -> list:
    """random.getstate() as a flat list of ints (weights_only-loadable)."""
    version, internal, gauss = state
    return [version, *internal, -1 if gauss is None else gauss]
