"""Text side: caption tokenisation and text encoders producing tokens for DiT cross-attention.

    captions list[str] --Tokenizer--> ids (B, L) long, mask (B, L) bool
    ids, mask --TinyTextEncoder--> tokens (B, L, dim), mask (B, L)

The tokenizer is open_clip's CLIP BPE tokenizer; its vocabulary ships inside the open_clip
package (bpe_simple_vocab_16e6.txt.gz), so nothing is downloaded. Every caption, including
the empty caption "" used for classifier-free guidance, keeps its start- and end-of-text
tokens real, so no mask row is ever all False.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB_SIZE = 49408  # open_clip / CLIP BPE vocabulary
TEXT_ENCODER_KINDS = ("tiny",)  # later: "open_clip", "t5"


@dataclass
class TextEncoderConfig:
    kind: str = "tiny"
    dim: int = 128
    depth: int = 2
    num_heads: int = 4
    max_length: int = 32  # tokens per caption, including start/end tokens

    def __post_init__(self) -> None:
        if self.kind not in TEXT_ENCODER_KINDS:
            raise ValueError(f"unknown text encoder kind {self.kind!r}; valid kinds: {', '.join(TEXT_ENCODER_KINDS)}")
        if self.dim % self.num_heads != 0:
            raise ValueError(f"dim {self.dim} not divisible by num_heads {self.num_heads}")
        if self.max_length < 2:
            raise ValueError("max_length must be >= 2 (start and end tokens)")

    def build(self) -> nn.Module:
        return TinyTextEncoder(self)


class Tokenizer:
    """open_clip BPE tokenizer returning (ids, mask) padded/truncated to max_length."""

    def __init__(self, max_length: int = 32):
        from open_clip.tokenizer import SimpleTokenizer  # lazy: importing open_clip takes seconds

        self._bpe = SimpleTokenizer()
        self.max_length = max_length
        self.sot_id = self._bpe.sot_token_id
        self.eot_id = self._bpe.eot_token_id
        self.pad_id = 0
        self.vocab_size = len(self._bpe.encoder)
        assert self.vocab_size == VOCAB_SIZE, self.vocab_size

    def __call__(self, captions: list[str], max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        L = max_length or self.max_length
        ids = torch.full((len(captions), L), self.pad_id, dtype=torch.long)  # (B, L)
        mask = torch.zeros(len(captions), L, dtype=torch.bool)  # (B, L)
        for i, caption in enumerate(captions):
            toks = [self.sot_id] + self._bpe.encode(caption)[: L - 2] + [self.eot_id]
            ids[i, : len(toks)] = torch.tensor(toks)
            mask[i, : len(toks)] = True
        return ids, mask


@functools.lru_cache(maxsize=1)
def _default_tokenizer() -> Tokenizer:
    return Tokenizer()


def tokenize(captions: list[str], max_length: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """captions -> ids (B, L) long, mask (B, L) bool (True = real token, incl. start/end)."""
    return _default_tokenizer()(captions, max_length)


class TextLayer(nn.Module):
    """Pre-norm transformer layer with a key padding mask."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(B, L, 3, self.num_heads, D // self.num_heads)  # (B, L, 3, H, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, hd)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])  # (B, H, L, hd)
        x = x + self.proj(attn.transpose(1, 2).reshape(B, L, D))  # (B, L, D)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="tanh"))  # (B, L, D)


class TinyTextEncoder(nn.Module):
    """Trainable small text transformer for debugging and tiny experiments."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embed = nn.Embedding(VOCAB_SIZE, cfg.dim)
        self.pos_embed = nn.Parameter(torch.zeros(cfg.max_length, cfg.dim))
        self.layers = nn.ModuleList([TextLayer(cfg.dim, cfg.num_heads) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.dim)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (B, L) long, mask (B, L) bool -> tokens (B, L, dim) (zero at padding), mask (B, L)."""
        L = ids.shape[1]
        if L > self.cfg.max_length:
            raise ValueError(f"sequence length {L} exceeds max_length {self.cfg.max_length}")
        mask = mask.bool()
        attn_mask = mask | ~mask.any(dim=-1, keepdim=True)  # (B, L) guard: no all-False rows -> no NaN
        x = self.token_embed(ids) + self.pos_embed[:L]  # (B, L, D)
        for layer in self.layers:
            x = layer(x, attn_mask)  # (B, L, D)
        x = self.norm(x) * mask.unsqueeze(-1).to(x.dtype)  # (B, L, D)
        return x, mask
