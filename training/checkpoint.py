"""Checkpoints that survive failures.

Layout under ``<train output>/checkpoints/``::

    step00000100/                      one tag per save
        mp_rank_00_model_states.pt     DeepSpeed (module, client state)
        zero_pp_rank_<r>_..._optim_states.pt   DeepSpeed (ZeRO partitions, one per rank)
        rank<r>_state.pt               ours: RNG states and loader position of rank r
        ema.pt                         ours: EMA weights (rank 0)
        _COMPLETE.json                 ours: written after every rank has finished writing
    latest                             the newest complete tag (DeepSpeed's own format)
    zero_to_fp32.py                    DeepSpeed's converter, copied in by DeepSpeed

A tag without ``_COMPLETE.json`` was interrupted while saving and is never taken as the
latest. ``latest`` is replaced atomically, and only after ``_COMPLETE.json`` exists, so
DeepSpeed's own tools (``zero_to_fp32.py``) read the same tag we resume from.

**Mirror.** With ``mirror`` (a URL such as ``s3://bucket/run/stages/train-<hash>/checkpoints``,
or a path) every tag is also copied there, so training survives losing the machine and its
disk. The protocol extends the one above: once every rank's files are on disk, each rank
uploads the files it wrote (its ``rank<r>_state.pt`` and ZeRO partition ``*pp_rank_<r>_*``;
rank 0 the rest), a barrier, then rank 0 writes the mirror's ``_COMPLETE.json`` and ``latest``
(in that order, each one atomic PUT) and prunes the mirror as it prunes the local directory;
only then the local ``_COMPLETE.json``. So a ``_COMPLETE.json``, local or mirrored, means every
rank's files are in the mirror. :meth:`restore` resumes from the mirror's newest complete tag,
downloading what this disk lacks (all of the tag's files: DeepSpeed's ZeRO loader reads every
rank's partition); every rank reads the same mirror, so all ranks pick the same tag even when
their disks differ. Local tags newer than it are dropped.

**What loading trusts.** A checkpoint is a set of pickles, and unpickling can run any code, so
every file is loaded with ``torch.load(weights_only=True)``: tensors, plain containers and
numbers, and the few DeepSpeed records its optimizer states hold (:func:`deepspeed_globals`),
whose unpickling sets fields and runs none of their code. :func:`weights_only_loads` imposes it
on DeepSpeed's own loads too (they ask for ``weights_only=False``). A file holding anything else
(a crafted payload) fails to load, naming the tag, and runs nothing. The files' values are
trusted: whoever can write the checkpoint directory or its mirror decides the weights, optimizer
state, RNG and loader position a resume continues from, and which tag is the latest.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from data.storage import Store

COMPLETE = "_COMPLETE.json"
FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"  # torch's own switch, read by every load
_OWNER = re.compile(r"(?:^|_)pp_rank_(\d+)_|^rank(\d+)_state\.pt$")


def owner_of(filename: str) -> int:
    """The rank that writes (and mirrors) a checkpoint file: the dp rank in DeepSpeed's ZeRO
    partition names and in ours, rank 0 for everything else."""
    m = _OWNER.search(filename)
    return int(m.group(1) or m.group(2)) if m else 0


def _doomed(tags: list[str], complete: list[str], keep: int) -> list[str]:
    """Tags pruning removes: complete ones beyond the newest `keep`, partial ones older than
    the newest complete tag (a newer partial one may still be being written)."""
    newest = complete[-1] if complete else ""
    kept = set(complete[-keep:])
    return [t for t in tags if t not in kept and (t in complete or t < newest)]


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


class Checkpoints:
    """root: the local checkpoint directory. keep: complete tags kept. mirror: optional URL (or
    path) every complete tag is copied to, and restored from when this disk lacks it."""

    def __init__(self, root: str | Path, keep: int, mirror: str | None = None,
                 layout: dict | None = None):
        """layout: how the ranks were arranged ({"sequence_parallel": 2}), recorded with the
        world size in each tag's completion marker, since a resume must match it."""
        if keep < 1:
            raise ValueError(f"train.keep_checkpoints must be >= 1, got {keep}")
        self.root = Path(root)
        self.keep = keep
        self.layout = dict(layout or {})
        self.mirror = None
        if mirror:
            self.mirror = Store(mirror)

    def complete_tags(self) -> list[str]:
        if not self.root.exists():
            return []
        return sorted(p.name for p in self.root.glob("step*") if (p / COMPLETE).exists())

    def latest(self) -> str | None:
        tags = self.complete_tags()
        return tags[-1] if tags else None

    # ----- saving: every rank calls save(); collectives inside ---------------------------
    def save(self, engine, step: int, rank_state: dict, ema_state: dict | None) -> str:
        tag = tag_of(step)
        engine.save_checkpoint(str(self.root), tag=tag, client_state={"step": step},
                               save_latest=False)
        rank = dist.get_rank()
        torch.save(rank_state, self.root / tag / f"rank{rank:05d}_state.pt")
        if rank == 0 and ema_state is not None:
            torch.save(ema_state, self.root / tag / "ema.pt")
        dist.barrier()  # every rank's files are on disk
        complete = {"step": step, "world_size": dist.get_world_size(), **self.layout}
        if self.mirror is not None:
            self.mirror.put_dir(self.root / tag, tag,
                                select=lambda f: f != COMPLETE and owner_of(f) == rank)
            dist.barrier()  # every rank's files are in the mirror
            if rank == 0:
                self._publish(tag, complete)
            else:  # a disk of its own holds only this rank's files of older tags: drop them
                for p in self.root.glob("step*"):
                    if p.name < tag and not (p / COMPLETE).exists():
                        shutil.rmtree(p, ignore_errors=True)
        if rank == 0:
            (self.root / tag / COMPLETE).write_text(json.dumps(complete))
            tmp = self.root / ".latest.tmp"
            tmp.write_text(tag)
            os.replace(tmp, self.root / "latest")
            self.prune()
        dist.barrier()
        return tag

    def prune(self) -> None:
        """Keep the newest `keep` complete tags; drop older complete and stale partial ones."""
        tags = [p.name for p in self.root.glob("step*")]
        for t in _doomed(tags, self.complete_tags(), self.keep):
            shutil.rmtree(self.root / t, ignore_errors=True)

    # ----- the mirror --------------------------------------------------------------------
    def _publish(self, tag: str, complete: dict) -> None:
        """Rank 0, once every rank's files of `tag` are mirrored: mark it complete there, point
        `latest` at it (last), prune the mirror."""
        m = self.mirror
        script = self.root / "zero_to_fp32.py"
        if script.exists() and not m.exists(script.name):
            m.put_file(script, script.name)
        m.write_json_atomic(f"{tag}/{COMPLETE}", complete)
        m.write_bytes_atomic("latest", tag.encode())
        tags = [t for t in m.list() if t.startswith("step")]
        for t in _doomed(tags, self.mirror_tags(), self.keep):
            m.rm(t)

    def mirror_tags(self) -> list[str]:
        """Complete tags in the mirror, oldest first."""
        if self.mirror is None:
            return []
        return [t for t in self.mirror.list() if t.startswith("step")
                and self.mirror.exists(f"{t}/{COMPLETE}")]

    def restore(self) -> str | None:
        """The tag to resume from, complete on this disk; None to start afresh.

        Without a mirror (or with an empty one) that is :meth:`latest`. With one it is the
        mirror's newest complete tag, downloaded first if this disk lacks any of its files.
        Every rank calls it; ranks sharing a disk may download at once (files land by rename).
        """
        remote = self.mirror_tags()
        if not remote:
            return self.latest()
        tag = remote[-1]
        for p in self.root.glob("step*"):
            if p.name > tag:  # saved after the mirror's newest: not on every rank's disk
                shutil.rmtree(p, ignore_errors=True)
        if not (self.root / tag / COMPLETE).exists():
            self.mirror.get_dir(tag, self.root / tag, select=lambda f: f != COMPLETE)
            script = self.root / "zero_to_fp32.py"
            if not script.exists() and self.mirror.exists(script.name):
                self.mirror.get_file(script.name, script)
            _write_atomic(self.root / tag / COMPLETE,
                          json.dumps(self.mirror.read_json(f"{tag}/{COMPLETE}")))
        _write_atomic(self.root / "latest", tag)
        return tag

    def resume_world_size(self) -> int | None:
        """The number of ranks that wrote the tag :meth:`restore` would pick (read from its
        ``_COMPLETE.json``, nothing downloaded); None when training would start afresh."""
        record = self.resume_record()
        return None if record is None else record.get("world_size")

    def resume_record(self) -> dict | None:
        """The completion marker of the tag :meth:`restore` would pick: step, world size and
        layout (nothing downloaded); None when training would start afresh."""
        remote = self.mirror_tags()
        if remote:
            return self.mirror.read_json(f"{remote[-1]}/{COMPLETE}")
        tag = self.latest()
        if tag is None:
            return None
        return json.loads((self.root / tag / COMPLETE).read_text())

    # ----- loading -----------------------------------------------------------------------
    def load(self, engine, tag: str, rank: int) -> tuple[int, dict, dict | None]:
        """Restore the engine; returns (step, this rank's state, EMA state or None). Raises
        UnsafeCheckpoint for a tag with anything but weights in it (nothing of it runs)."""
        with weights_only_loads(self.root / tag):
            _, client = engine.load_checkpoint(str(self.root), tag=tag)
            rank_state = torch.load(self.root / tag / f"rank{rank:05d}_state.pt",
                                    map_location="cpu", weights_only=True)
            ema_path = self.root / tag / "ema.pt"
            ema = (torch.load(ema_path, map_location="cpu", weights_only=True)
                   if rank == 0 and ema_path.exists() else None)
        return int(client["step"]), rank_state, ema


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


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
