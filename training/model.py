"""The trainable text-to-video model: a text encoder feeding a spacetime-patch DiT.

    captions --tokenize--> ids, mask --text_encoder--> text (B, L, Dt), text_mask (B, L)
    x_t (B, C, T, H, W), t (B,), text, text_mask --dit--> velocity (B, C, T, H, W)

The DiT's ``text_dim`` must equal the encoder's output width (``model.dit.text_dim`` ==
``model.text.dim`` == the encoder's width; checked with an error naming the keys). Frozen
encoders (open_clip, t5) have no trainable parameters: build the optimizer from
``trainable_parameters()``.

Pure ``nn.Module`` (no distributed calls, logging or I/O): DeepSpeed wraps it from outside.
The text-embedding cache, which may touch disk, is passed in by the caller
(``encode_captions(captions, cache=cfg.text.build_cache())``).

Exported weights (a training output's ``dit/`` and ``dit_ema/``) are diffusers-style folders
(`training.pretrained`): `from_pretrained` rebuilds the model from their ``config.json`` (this
``ModelConfig``) and loads their safetensors. A frozen hub encoder (open_clip, t5) is built as
configured first (its name must resolve, as for training), then its weights are the file's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from data.checks import from_dict
from training import pretrained
from training.dit import DiTConfig
from training.patches import PackedClips
from training.text import TextEmbeddingCache, TextEncoderConfig, encode_captions


@dataclass
class ModelConfig:
    dit: DiTConfig = field(default_factory=DiTConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        if self.dit.text_dim != self.text.dim:
            raise ValueError(
                f"model.dit.text_dim ({self.dit.text_dim}) must equal model.text.dim ({self.text.dim}), "
                f"the width of the {self.text.kind} text encoder's tokens"
            )

    def build(self) -> "TextToVideo":
        return TextToVideo(self)


class TextToVideo(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.check()
        self.cfg = cfg
        self.text_encoder = cfg.text.build()
        if self.text_encoder.out_dim != cfg.dit.text_dim:
            raise ValueError(
                f"model.dit.text_dim ({cfg.dit.text_dim}) must equal the output width of the text encoder "
                f"model.text (kind={cfg.text.kind}, name={cfg.text.name}): {self.text_encoder.out_dim}"
            )
        self.dit = cfg.dit.build()
        self._tokenizer = None  # built on first use (not a module; nothing to save)

    @property
    def tokenizer(self):
        """The encoder's own tokenizer: captions -> ids (B, L), mask (B, L)."""
        if self._tokenizer is None:
            self._tokenizer = self.cfg.text.build_tokenizer()
        return self._tokenizer

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer gets: everything but a frozen text encoder."""
        return [p for p in self.parameters() if p.requires_grad]

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokenizer(captions)  # (B, L), (B, L)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor):
        return self.text_encoder(ids, mask)  # (B, L, Dt), (B, L)

    def encode_captions(self, captions: list[str], cache: Optional[TextEmbeddingCache] = None):
        """captions -> text (B, L, Dt), text_mask (B, L); a cache (frozen encoders) skips repeats."""
        return encode_captions(self.text_encoder, self.tokenizer, captions, cache)

    def forward(self, x_t: torch.Tensor | PackedClips, t: torch.Tensor, ids: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None, *, text: Optional[torch.Tensor] = None,
                text_mask: Optional[torch.Tensor] = None):
        """x_t (B, C, T, H, W), t (B,), and either ids/mask (B, L) or encoded text (B, L, Dt) /
        text_mask (B, L) -> velocity (B, C, T, H, W). x_t may be K packed clips (`PackedClips`,
        t (K,), one caption per clip) -> K velocities: `forward_packed`, so that a DeepSpeed
        engine (which calls the module) runs packed batches too."""
        if isinstance(x_t, PackedClips):
            return self.forward_packed(x_t, t, ids, mask, text=text, text_mask=text_mask)
        text, text_mask = self._text(ids, mask, text, text_mask)  # (B, L, Dt), (B, L)
        return self.dit(x_t, t, text, text_mask)  # (B, C, T, H, W)

    def forward_packed(self, packed: PackedClips, t: torch.Tensor, ids: Optional[torch.Tensor] = None,
                       mask: Optional[torch.Tensor] = None, *, text: Optional[torch.Tensor] = None,
                       text_mask: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
        """K clips packed by `training.patches.pack_clips`, t (K,), one caption per clip -> K velocities."""
        text, text_mask = self._text(ids, mask, text, text_mask)  # (K, L, Dt), (K, L)
        return self.dit.forward_packed(packed, t, text, text_mask)

    def _text(self, ids, mask, text, text_mask):
        if (ids is None) == (text is None):
            raise ValueError("pass either ids/mask (token ids) or text/text_mask (encoded text), not both")
        if text is None:
            text, text_mask = self.encode_text(ids, mask)  # (B, L, Dt), (B, L)
        # frozen encoders return float32; the DiT may hold bf16 weights (DeepSpeed bf16)
        return text.to(self.dit.x_embed.weight.dtype), text_mask


def save_pretrained(folder: str | Path, cfg: ModelConfig | dict,
                    state_dict: dict[str, torch.Tensor]) -> Path:
    """A model's weights as a diffusers-style folder: config.json (the ModelConfig) and
    diffusion_pytorch_model.safetensors."""
    config = asdict(cfg) if isinstance(cfg, ModelConfig) else dict(cfg)
    return pretrained.save_pretrained(folder, TextToVideo.__name__, config, state_dict)


def from_pretrained(folder: str | Path) -> TextToVideo:
    """The model of a `save_pretrained` folder (e.g. a training output's ``dit`` or
    ``dit_ema``), in eval mode on the CPU; every weight of the module comes from the file."""
    config, state = pretrained.load_pretrained(folder, TextToVideo.__name__)
    model = from_dict(ModelConfig, config).build()
    model.load_state_dict(state)  # strict: a key missing or extra is an error
    return model.eval()
