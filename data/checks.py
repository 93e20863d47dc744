"""The config dataclasses' shared helpers: range checks, called from their ``__post_init__``,
and ``from_dict``, which rebuilds a (nested) config dataclass from the plain dict a stage stored.

    check_ranges(self, lr="> 0", steps=">= 1", caption_dropout="in [0, 1]")

raises ``ValueError("lr must be > 0, got -1.0")`` for the first field out of range. The field
is named relative to its dataclass; ``pipeline.config.to_object`` adds the section's dotted
path (``train.lr must be > 0, got -1.0``). A field that is None (an Optional left unset) passes;
a list passes when every element does. NaN is in no range. This module lives in ``data/``, the
package every component may import, and imports nothing of the project.
"""

from __future__ import annotations

from typing import Any, Callable

from omegaconf import OmegaConf

RULES: dict[str, Callable[[Any], bool]] = {
    "> 0": lambda v: v > 0,
    ">= 0": lambda v: v >= 0,
    ">= 1": lambda v: v >= 1,
    ">= 2": lambda v: v >= 2,
    "in [0, 1]": lambda v: 0 <= v <= 1,
}


def check_ranges(cfg: Any, **rules: str) -> None:
    """rules: field name -> one of RULES' keys."""
    for name, rule in rules.items():
        value = getattr(cfg, name)
        if value is None:
            continue
        ok = RULES[rule]
        if not all(ok(v) for v in (value if isinstance(value, (list, tuple)) else [value])):
            raise ValueError(f"{name} must be {rule}, got {value}")


def from_dict(cls, d: dict):
    """Rebuild a (nested) config dataclass from a plain dict, type-checked by OmegaConf."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), d))
