"""The trainable text-to-video model: a text encoder feeding a spacetime-patch DiT.

Pure ``nn.Module`` (no distributed calls, logging or I/O): DeepSpeed wraps it from outside.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from training.dit import DiTConfig
from training.text import TextEncoderConfig


@dataclass
class ModelConfig:
    dit: DiTConfig = field(default_factory=DiTConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)

    def build(self) -> "TextToVideo":
        return TextToVideo(self)


class TextToVideo(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.dit.text_dim != cfg.text.dim:
            raise ValueError(
                f"model.dit.text_dim ({cfg.dit.text_dim}) must equal model.text.dim ({cfg.text.dim})"
            )
        self.cfg = cfg
        self.text_encoder = cfg.text.build()
        self.dit = cfg.dit.build()

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor):
        return self.text_encoder(ids, mask)  # (B, L, Dt), (B, L)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor):
        """x_t (B, C, T, H, W), t (B,), ids/mask (B, L) -> velocity (B, C, T, H, W)."""
        text, text_mask = self.encode_text(ids, mask)  # (B, L, Dt), (B, L)
        return self.dit(x_t, t, text, text_mask)  # (B, C, T, H, W)
