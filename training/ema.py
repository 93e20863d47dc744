"""Exponential moving average of model weights (fp32 shadow copy).

The decay warms up as ``min(decay, (1 + n) / (10 + n))`` over the first updates, so early
weights (far from the trained ones) are forgotten quickly. Pure torch; the trainer decides
where the full weights come from (under ZeRO-3 they are gathered first).
"""

from __future__ import annotations

import torch


class EMA:
    def __init__(self, named_params: dict[str, torch.Tensor], decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().float().cpu().clone() for k, v in named_params.items()}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, named_params: dict[str, torch.Tensor]) -> None:
        d = self.current_decay()
        for k, v in named_params.items():
            self.shadow[k].lerp_(v.detach().float().cpu(), 1.0 - d)  # s = d*s + (1-d)*v
        self.updates += 1

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, d: dict) -> None:
        self.decay, self.updates = d["decay"], d["updates"]
        self.shadow = {k: v.float() for k, v in d["shadow"].items()}
