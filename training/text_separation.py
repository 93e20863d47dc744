"""How far apart a text encoder keeps captions that differ in one attribute.

The failure this watches for (issue 17): a text encoder trained jointly with the DiT can pull
captions that differ only in one word ("... moving left ..." vs "... moving right ...") onto
the same features, after which no DiT can follow that word. For caption pairs in the synthetic
source's vocabulary that differ in exactly one attribute (colour, shape, direction, count), the
separation is the distance between the two captions' mean-pooled token features relative to
their size:

    sep(a, b) = ||f(a) - f(b)|| / ((||f(a)|| + ||f(b)||) / 2),   f = mean of the real tokens

0 means the encoder cannot tell the pair apart; the tiny encoder at its random init gives
~0.3. ``text_separation`` averages it per attribute; the trainer logs it as
``train/text_sep/<attribute>``.
"""

from __future__ import annotations

import numpy as np
import torch

from data.prompts import parse_prompt, synthetic_prompts
from data.synthetic import COLORS, COUNTS, DIRECTIONS, SHAPES, ClipSpec, caption

ATTRIBUTES = ("color", "shape", "direction", "count")


def vary(spec: ClipSpec, attribute: str, rng: np.random.Generator) -> ClipSpec:
    """`spec` with `attribute` changed to another value of the source's vocabulary."""
    values = {"color": [c for c, _ in COLORS], "shape": list(SHAPES),
              "direction": [d for d, _ in DIRECTIONS], "count": list(COUNTS)}[attribute]
    current = getattr(spec, attribute)
    other = [v for v in values if v != current][rng.integers(len(values) - 1)]
    return ClipSpec(**{**spec.__dict__, attribute: other})


def caption_pairs(n: int = 8, seed: int = 0) -> dict[str, list[tuple[str, str]]]:
    """{attribute: n (caption, caption) pairs differing only in it}; deterministic in (n, seed)."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[tuple[str, str]]] = {a: [] for a in ATTRIBUTES}
    for prompt in synthetic_prompts(n, seed):
        e = parse_prompt(prompt)
        spec = ClipSpec(shape=e.shape, color=e.color, count=e.count, direction=e.direction or "left",
                        speed=1, background=e.background, starts=())
        for a in ATTRIBUTES:
            out[a].append((caption(spec), caption(vary(spec, a, rng))))
    return out


@torch.no_grad()
def text_separation(encode, pairs: dict[str, list[tuple[str, str]]]) -> dict[str, float]:
    """encode(captions) -> (tokens (B, L, D), mask (B, L)); -> {attribute: mean separation}."""
    flat = [c for a in ATTRIBUTES for pair in pairs[a] for c in pair]
    tokens, mask = encode(flat)  # (2P, L, D), (2P, L)
    m = mask.to(tokens.dtype).unsqueeze(-1)  # (2P, L, 1)
    f = ((tokens.float() * m).sum(1) / m.sum(1).clamp(min=1)).view(-1, 2, tokens.shape[-1])  # (P, 2, D)
    norm = f.norm(dim=-1)  # (P, 2)
    sep = (f[:, 0] - f[:, 1]).norm(dim=-1) / norm.mean(dim=-1).clamp(min=1e-12)  # (P,)
    out, i = {}, 0
    for a in ATTRIBUTES:
        k = len(pairs[a])
        out[a] = float(sep[i : i + k].mean())
        i += k
    return out
