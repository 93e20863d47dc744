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
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch

COMPLETE = "_COMPLETE.json"


def tag_of(step: int) -> str:
    return f"step{step:08d}"


class Checkpoints:
    def __init__(self, root: str | Path, keep: int):
        if keep < 1:
            raise ValueError(f"train.keep_checkpoints must be >= 1, got {keep}")
        self.root = Path(root)
        self.keep = keep

    def complete_tags(self) -> list[str]:
        if not self.root.exists():
            return []
        return sorted(p.name for p in self.root.glob("step*") if (p / COMPLETE).exists())

    def latest(self) -> str | None:
        tags = self.complete_tags()
        return tags[-1] if tags else None

    # ----- saving: every rank calls save(); collectives inside ---------------------------
    def save(self, engine, step: int, rank_state: dict, ema_state: dict | None) -> str:
        import torch.distributed as dist

        tag = tag_of(step)
        engine.save_checkpoint(str(self.root), tag=tag, client_state={"step": step},
                               save_latest=False)
        rank = dist.get_rank()
        torch.save(rank_state, self.root / tag / f"rank{rank:05d}_state.pt")
        if rank == 0 and ema_state is not None:
            torch.save(ema_state, self.root / tag / "ema.pt")
        dist.barrier()  # every rank's files are on disk
        if rank == 0:
            (self.root / tag / COMPLETE).write_text(json.dumps(
                {"step": step, "world_size": dist.get_world_size()}))
            tmp = self.root / ".latest.tmp"
            tmp.write_text(tag)
            os.replace(tmp, self.root / "latest")
            self.prune()
        dist.barrier()
        return tag

    def prune(self) -> None:
        """Keep the newest `keep` complete tags; drop older complete and stale partial ones."""
        complete = self.complete_tags()
        newest = complete[-1] if complete else ""
        for p in self.root.glob("step*"):
            if p.name in complete[-self.keep:]:
                continue
            if p.name in complete or p.name < newest:
                shutil.rmtree(p, ignore_errors=True)

    # ----- loading -----------------------------------------------------------------------
    def load(self, engine, tag: str, rank: int) -> tuple[int, dict, dict | None]:
        """Restore the engine; returns (step, this rank's state, EMA state or None)."""
        _, client = engine.load_checkpoint(str(self.root), tag=tag)
        rank_state = torch.load(self.root / tag / f"rank{rank:05d}_state.pt",
                                map_location="cpu", weights_only=True)
        ema_path = self.root / tag / "ema.pt"
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
