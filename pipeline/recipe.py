"""Recipes: a run's training as a chain of stages (short low-resolution clips, then longer, then
the full length), picked with ``recipe=<name>`` (``conf/recipe/``).

Each entry of ``recipe.stages`` is one training stage of the graph, named by ``name``; its
``train`` mapping overrides keys of the run's ``train`` section for that stage alone (any key,
nested ones as mappings: ``{num_frames: 4, data: {target_fps: 8}}``; a list, such as
``data.buckets``, replaces the base list). The model and DeepSpeed sections are the run's, so the
weights of one stage fit the next (the DiT has no size-dependent parameters: RoPE is computed
from the patch grid, so the weights transfer across clip lengths and resolutions).

Every stage after the first starts from the previous stage's final weights, ``weights: ema``
(its ``model_ema.pt`` over ``model.pt``) or ``raw`` (``model.pt``), with a fresh optimizer and
LR schedule, or with ``optimizer: carry``: the previous stage's AdamW state (moments, step
counts) from its last checkpoint, with the raw weights it belongs to (so ``carry`` needs
``weights: raw``) and a fresh LR schedule. The EMA restarts from the starting weights.

An empty recipe (``recipe=none``, the default) is today's graph: one ``train`` stage, hashed as
before. Bad entries fail when the config is composed (``pipeline.config.to_object``), named by
their dotted key (``recipe.stages[1].train.num_framez``), before any stage starts
(``pipeline.config.check_recipe``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf

WEIGHTS = ("ema", "raw")
OPTIMIZERS = ("fresh", "carry")
NAME = re.compile(r"^[a-z][a-z0-9_]*$")
# The graph's other stages (pipeline.stages): a recipe stage may not take their names.
RESERVED = ("source", "curate", "filter", "caption", "shard", "vae", "precompute", "eval")


@dataclass
class RecipeStage:
    name: str = "train"
    weights: str = "ema"  # what a later stage starts from: ema | raw (the previous stage's)
    optimizer: str = "fresh"  # fresh | carry (needs weights: raw)
    train: dict[str, Any] = field(default_factory=dict)  # overrides of the train section

    def __post_init__(self) -> None:
        if not NAME.match(self.name):
            raise ValueError(f"name must be lower-case letters, digits and '_' (a stage "
                             f"directory's name), got {self.name!r}")
        if self.name in RESERVED:
            raise ValueError(f"name {self.name!r} is another stage's; reserved: "
                             f"{', '.join(RESERVED)}")
        if self.weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}, got {self.weights!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got "
                             f"{self.optimizer!r}")
        if self.optimizer == "carry" and self.weights != "raw":
            raise ValueError("optimizer: carry needs weights: raw (the optimizer's state "
                             "belongs to the raw weights, not to their EMA)")


@dataclass
class RecipeConfig:
    stages: list[RecipeStage] = field(default_factory=list)  # empty: one `train` stage


def entries(cfg) -> list[dict]:
    """The recipe's stages of a typed or plain config, as plain dicts."""
    recipe = cfg["recipe"] if isinstance(cfg, dict) else cfg.recipe
    stages = recipe["stages"] if isinstance(recipe, dict) else recipe.stages
    out = []
    for s in stages:
        if not isinstance(s, dict):
            s = {"name": s.name, "weights": s.weights, "optimizer": s.optimizer,
                 "train": s.train}
        out.append({"name": s["name"], "weights": s.get("weights", "ema"),
                    "optimizer": s.get("optimizer", "fresh"),
                    "train": OmegaConf.to_container(OmegaConf.create(dict(s.get("train") or {})))})
    return out


def train_sections(cfg) -> list[tuple[str, Any]]:
    """(stage name, its typed train section) of each training stage of a typed config: the
    recipe's, with their overrides merged, or ``[("train", cfg.train)]`` without one."""
    if not cfg.recipe.stages:
        return [("train", cfg.train)]
    return [(e.name, OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cfg.train),
                                                         e.train)) if e.train else cfg.train)
            for e in cfg.recipe.stages]
