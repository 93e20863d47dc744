"""The synthetic source's caption grammar, read back: `parse_prompt` inverts
`data.synthetic.caption` (what a prompt asks for), `synthetic_prompts` gives a balanced prompt
set in the same format. Used by the probes (evaluation) and by the text-separation metric
(training), so it lives here, below both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import numpy as np

from data.synthetic import (AXES, BACKGROUNDS, COLORS, COUNTS, DIRECTIONS, NUMBER_WORDS, SHAPES,
                            ClipSpec, caption)

_PROMPT = re.compile(
    r"^(?P<count>\w+) (?P<color>[a-z]+) (?P<shape>[a-z]+?)s?"
    r"(?: moving (?P<direction>[a-z]+)| bouncing (?P<bounce>[a-z]+ and [a-z]+))?"
    r" on a (?P<background>[a-z ]+) background$")


@dataclass(frozen=True)
class Expected:
    """What a synthetic prompt asks for. direction None: a still clip, or a bouncing one
    (bounce True: it moves back and forth along `axis`, horizontal | vertical)."""

    count: int
    color: str
    shape: str
    direction: Optional[str]
    background: str
    bounce: bool = False
    axis: Optional[str] = None  # bouncing prompts only


def parse_prompt(prompt: str) -> Optional[Expected]:
    """The inverse of `data.synthetic.caption`; None for any other prompt."""
    m = _PROMPT.match(prompt.strip().lower())
    if m is None:
        return None
    g = m.groupdict()
    if (g["count"] not in NUMBER_WORDS or g["color"] not in dict(COLORS) or g["shape"] not in SHAPES
            or g["background"] not in dict(BACKGROUNDS)
            or (g["direction"] is not None and g["direction"] not in dict(DIRECTIONS))):
        return None
    if g["bounce"] is not None:
        axis = next((a for a, _, words in AXES if words == g["bounce"]), None)
        if axis is None:
            return None
        return Expected(NUMBER_WORDS.index(g["count"]), g["color"], g["shape"], None,
                        g["background"], bounce=True, axis=axis)
    return Expected(NUMBER_WORDS.index(g["count"]), g["color"], g["shape"], g["direction"],
                    g["background"])


def synthetic_prompts(n: int, seed: int = 0) -> list[str]:
    """`n` prompts in the source's caption format, balanced so probe scores mean something:
    colours cycle (every colour appears n/8 times), directions cycle shifted by one each
    round of colours (each colour meets different directions); shape, count and background
    are drawn from `seed`. Deterministic: the same (n, seed) gives the same list."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        spec = ClipSpec(shape=SHAPES[rng.integers(len(SHAPES))], color=COLORS[i % len(COLORS)][0],
                        count=int(COUNTS[rng.integers(len(COUNTS))]),
                        direction=DIRECTIONS[(i + i // len(COLORS)) % len(DIRECTIONS)][0],
                        speed=1, background=BACKGROUNDS[rng.integers(len(BACKGROUNDS))][0],
                        starts=())
        out.append(caption(spec))
    return out
