"""Text side: tokenisers and text encoders producing tokens for DiT cross-attention.

    captions list[str] --tokenizer--> ids (B, L) long, mask (B, L) bool (True = real token)
    ids, mask --encoder--> tokens (B, L, dim) (zero at padding), mask (B, L)

Encoders, chosen by ``TextEncoderConfig.kind``:

- ``tiny``: a small transformer over open_clip's CLIP BPE tokenizer (its vocabulary ships
  inside the open_clip package, so nothing is downloaded). For offline / debug runs. Its weights
  are drawn from ``seed`` alone, and by default (``lr_scale: 0``) it stays frozen there: trained
  jointly at the DiT's learning rate it collapses the captions onto each other (the feature
  distance of captions that differ only in the direction word fell from 0.31 to 0.006-0.018 in
  ~400 steps) before the DiT learns to use them, because the caption only lowers the loss at
  high noise. ``lr_scale > 0`` trains it at ``train.lr * lr_scale``.
- ``open_clip``: the frozen text tower of an open_clip model (``name``, e.g. ViT-H-14), with
  ``pretrained`` a tag (open_clip resolves and caches it), a local checkpoint file, or None
  for random init (tests). Only the text tower is built. Tokens are the final-LayerNorm
  outputs of every position (width = the tower's width), before CLIP's pooled projection.
- ``t5``: a frozen ``transformers`` T5 encoder and its tokenizer from ``name``, a model id or
  a local directory (``save_pretrained`` layout); tokens are ``last_hidden_state``.

Frozen encoders have ``requires_grad=False`` everywhere, stay in eval mode (no dropout) even
under ``model.train()``, run under ``no_grad`` and return float32 tokens. Their embeddings
can be cached (``TextEmbeddingCache``), keyed by caption + the encoder's ``identity``.

Every caption, including the empty caption "" used for classifier-free guidance, keeps at
least one real token (start/end for CLIP, </s> for T5), so no mask row is ever all False.
The real tokens of a caption are a prefix of its row, and a token's features do not depend on
the padding after it (CLIP: causal attention; T5: padding mask), which the cache relies on.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB_SIZE = 49408  # open_clip / CLIP BPE vocabulary
TEXT_ENCODER_KINDS = ("tiny", "open_clip", "t5")
FROZEN_KINDS = ("open_clip", "t5")
ENCODER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

TokenizerFn = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]  # captions -> ids (B, L), mask (B, L)


@dataclass
class TextEncoderConfig:
    kind: str = "tiny"  # tiny | open_clip | t5
    dim: int = 128  # width of the output tokens; open_clip / t5: must equal the encoder's (checked at build)
    depth: int = 2  # tiny only
    num_heads: int = 4  # tiny only
    max_length: int = 32  # tokens per caption, including start/end tokens
    name: Optional[str] = None  # open_clip: model name (ViT-H-14, local-dir:/path); t5: model id or local directory
    pretrained: Optional[str] = None  # open_clip: pretrained tag or local checkpoint file; None = random init
    precision: str = "fp32"  # weights of a frozen encoder: fp32 | bf16 | fp16 (tokens come out float32)
    cache_size: int = 0  # text-embedding cache: captions kept in memory (frozen encoders); 0 = off
    cache_dir: Optional[str] = None  # text-embedding cache on disk as well (shared across runs)
    lr_scale: float = 0.0  # tiny only: trained at train.lr * lr_scale; 0 = frozen at its random init
    seed: int = 0  # tiny only: its weights are drawn from this seed (the same in every process)

    def __post_init__(self) -> None:
        if self.kind not in TEXT_ENCODER_KINDS:
            raise ValueError(f"unknown text encoder kind {self.kind!r}; valid kinds: {', '.join(TEXT_ENCODER_KINDS)}")
        if self.max_length < 2:
            raise ValueError("max_length must be >= 2 (start and end tokens)")
        for name in ("dim", "depth", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.precision not in ENCODER_DTYPES:
            raise ValueError(f"unknown model.text.precision {self.precision!r}; valid: {', '.join(ENCODER_DTYPES)}")
        if self.cache_size < 0:
            raise ValueError(f"model.text.cache_size must be >= 0, got {self.cache_size}")
        if self.lr_scale < 0:
            raise ValueError(f"model.text.lr_scale must be >= 0 (0 = frozen), got {self.lr_scale}")
        if self.kind != "tiny" and self.lr_scale:
            raise ValueError(f"model.text.lr_scale is for kind tiny; a {self.kind} encoder is always frozen")
        if self.kind == "tiny":
            if self.dim % self.num_heads != 0:
                raise ValueError(f"dim {self.dim} not divisible by num_heads {self.num_heads}")
            if self.name or self.pretrained:
                raise ValueError("model.text.name / model.text.pretrained are for kind open_clip or t5, not tiny")
            if (self.cache_size or self.cache_dir) and not self.frozen:
                raise ValueError("the text-embedding cache needs a frozen encoder (kind open_clip or t5, "
                                 "or tiny with model.text.lr_scale=0); this tiny encoder is trained")
        elif not self.name:
            what = "an open_clip model name, e.g. ViT-H-14" if self.kind == "open_clip" else "a T5 model id or local directory"
            raise ValueError(f"model.text.kind={self.kind} needs model.text.name ({what})")
        if self.kind == "t5" and self.pretrained:
            raise ValueError("model.text.pretrained is for open_clip; a t5 encoder's weights come from model.text.name")

    @property
    def frozen(self) -> bool:
        return text_frozen(self.kind, self.lr_scale)

    def build(self) -> nn.Module:
        if self.kind == "open_clip":
            return OpenCLIPTextEncoder(self)
        if self.kind == "t5":
            return T5TextEncoder(self)
        return TinyTextEncoder(self)

    def build_tokenizer(self) -> TokenizerFn:
        """The tokenizer that goes with this encoder: captions -> ids (B, max_length), mask (B, max_length)."""
        if self.kind == "open_clip":
            return open_clip_tokenizer(self.name, self.max_length)
        if self.kind == "t5":
            return HFTokenizer(self.name, self.max_length)
        return Tokenizer(self.max_length)

    def build_cache(self) -> Optional["TextEmbeddingCache"]:
        """The configured text-embedding cache, or None when it is off."""
        if not (self.cache_size or self.cache_dir):
            return None
        return TextEmbeddingCache(self.cache_size, self.cache_dir)


# --------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------


def text_frozen(kind: str, lr_scale: float = 0.0) -> bool:
    """Whether the encoder of `kind` is frozen: the pretrained kinds always, tiny at lr_scale 0."""
    return kind in FROZEN_KINDS or (kind == "tiny" and not lr_scale)


class Tokenizer:
    """open_clip BPE tokenizer returning (ids, mask) padded/truncated to max_length."""

    def __init__(self, max_length: int = 32, bpe=None):
        from open_clip.tokenizer import SimpleTokenizer  # lazy: importing open_clip takes seconds

        self._bpe = bpe if bpe is not None else SimpleTokenizer()
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


def open_clip_tokenizer(name: str, max_length: int) -> Tokenizer:
    """The CLIP BPE tokenizer of open_clip model `name` (its text cleaning included)."""
    import open_clip  # lazy: open_clip ~7 s to import, needed only here
    from open_clip.tokenizer import SimpleTokenizer

    bpe = open_clip.get_tokenizer(name)
    if not isinstance(bpe, SimpleTokenizer):
        raise ValueError(f"open_clip model {name!r} (model.text.name) uses a {type(bpe).__name__}; only "
                         f"CLIP-BPE text towers are supported (use kind=t5 for Hugging Face encoders)")
    return Tokenizer(max_length, bpe=bpe)


class HFTokenizer:
    """A transformers tokenizer (model id or local directory) -> (ids, mask) padded to max_length."""

    def __init__(self, name: str, max_length: int):
        from transformers import AutoTokenizer  # lazy: transformers ~1 s to import, needed only here

        self._tok = AutoTokenizer.from_pretrained(name)
        self.max_length = max_length
        if self._tok.pad_token_id is None:
            raise ValueError(f"tokenizer of {name!r} (model.text.name) has no pad token")

    def __call__(self, captions: list[str], max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self._tok(list(captions), padding="max_length", truncation=True,
                        max_length=max_length or self.max_length, return_tensors="pt")
        return enc["input_ids"].long(), enc["attention_mask"].bool()  # (B, L), (B, L)


# --------------------------------------------------------------------------------------
# Encoders
# --------------------------------------------------------------------------------------


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
    """Small text transformer for debugging and tiny experiments; frozen at its seeded random
    init unless ``lr_scale > 0`` (see the module docstring for why)."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.out_dim = cfg.dim
        self.trainable = not cfg.frozen
        with torch.random.fork_rng(devices=[]):  # weights from cfg.seed alone; the caller's RNG untouched
            torch.manual_seed(cfg.seed)
            self.token_embed = nn.Embedding(VOCAB_SIZE, cfg.dim)
            self.pos_embed = nn.Parameter(torch.zeros(cfg.max_length, cfg.dim))
            self.layers = nn.ModuleList([TextLayer(cfg.dim, cfg.num_heads) for _ in range(cfg.depth)])
            self.norm = nn.LayerNorm(cfg.dim)
            nn.init.normal_(self.token_embed.weight, std=0.02)
            nn.init.normal_(self.pos_embed, std=0.01)
        # A trained encoder's embeddings change every step: never cached (identity None). A frozen
        # one is keyed like the pretrained encoders, by what it is and its weights.
        self.identity = None
        if not self.trainable:
            self.requires_grad_(False)
            self.identity = f"tiny|seed{cfg.seed}|L{cfg.max_length}|{weights_fingerprint(self)}"

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (B, L) long, mask (B, L) bool -> tokens (B, L, dim) (zero at padding), mask (B, L)."""
        L = ids.shape[1]
        if L > self.cfg.max_length:
            raise ValueError(f"sequence length {L} exceeds max_length {self.cfg.max_length}")
        mask = mask.bool()
        attn_mask = mask | ~mask.any(dim=-1, keepdim=True)  # (B, L) guard: no all-False rows -> no NaN
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            x = self.token_embed(ids) + self.pos_embed[:L]  # (B, L, D)
            for layer in self.layers:
                x = layer(x, attn_mask)  # (B, L, D)
            x = self.norm(x) * mask.unsqueeze(-1).to(x.dtype)  # (B, L, D)
        return x, mask


def weights_fingerprint(module: nn.Module, samples: int = 64) -> str:
    """A cheap hash of a module's weights: names, shapes and `samples` strided values of each tensor."""
    h = hashlib.sha256()
    for name, p in sorted(module.state_dict().items()):
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // samples)
        h.update(f"{name}{tuple(p.shape)}".encode())
        h.update(flat[::step][:samples].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class FrozenTextEncoder(nn.Module):
    """Base of the pretrained encoders: frozen, always in eval mode, float32 tokens out.

    Subclasses build their network in __init__, set `out_dim`, then call `_freeze()`, and
    implement `encode(ids, mask) -> (B, L, out_dim)`.
    """

    trainable = False

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.out_dim = 0
        self.identity = ""

    def _freeze(self) -> None:
        self.to(ENCODER_DTYPES[self.cfg.precision])
        self.requires_grad_(False)
        self.train(False)
        if self.cfg.dim != self.out_dim:
            raise ValueError(
                f"model.text.dim={self.cfg.dim} but the {self.cfg.kind} encoder {self.cfg.name!r} outputs "
                f"{self.out_dim}-wide tokens; set model.text.dim={self.out_dim} and model.dit.text_dim={self.out_dim}")
        # what the cache keys on: the source, the truncation length, the precision and the weights themselves
        c = self.cfg
        self.identity = f"{c.kind}|{c.name}|{c.pretrained}|L{c.max_length}|{c.precision}|{weights_fingerprint(self)}"

    def train(self, mode: bool = True) -> "FrozenTextEncoder":
        return super().train(False)  # frozen: never dropout, whatever the parent asks

    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (B, L) long, mask (B, L) bool -> tokens (B, L, out_dim) float32 (zero at padding), mask (B, L)."""
        mask = mask.bool()
        with torch.no_grad():
            x = self.encode(ids, mask).float()  # (B, L, D)
        return x * mask.unsqueeze(-1).to(x.dtype), mask  # (B, L, D), (B, L)


class OpenCLIPTextEncoder(FrozenTextEncoder):
    """The text tower of an open_clip CLIP model; per-token features after the final LayerNorm."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__(cfg)
        import open_clip  # lazy: open_clip ~7 s to import, needed only here
        from open_clip.model import _build_text_tower

        model_cfg = open_clip.get_model_config(cfg.name)
        if model_cfg is None:
            examples = [m for m in open_clip.list_models() if m.startswith("ViT-")][:6]
            raise ValueError(f"unknown open_clip model {cfg.name!r} (model.text.name); e.g. {', '.join(examples)}")
        text_cfg = model_cfg["text_cfg"]
        if text_cfg.get("hf_model_name"):
            raise ValueError(f"open_clip model {cfg.name!r} has a Hugging Face text tower; use kind=t5 or a CLIP text tower")
        tower = _build_text_tower(model_cfg["embed_dim"], text_cfg, quick_gelu=model_cfg.get("quick_gelu", False))
        if tower.cls_emb is not None or tower.attn_mask is None:
            raise ValueError(f"open_clip model {cfg.name!r} (model.text.name) has no causal text tower; "
                             f"only CLIP-style causal text towers are supported")
        if cfg.max_length > tower.context_length:
            raise ValueError(f"model.text.max_length={cfg.max_length} exceeds the context length "
                             f"{tower.context_length} of open_clip model {cfg.name!r}")
        if cfg.pretrained:
            tower.load_state_dict(open_clip_text_state_dict(cfg.name, cfg.pretrained))
        self.tower = tower
        self.out_dim = tower.width
        self._freeze()

    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        tw = self.tower
        L = ids.shape[1]
        x = tw.token_embedding(ids) + tw.positional_embedding[:L].to(tw.token_embedding.weight.dtype)  # (B, L, W)
        x = tw.transformer(x, attn_mask=tw.attn_mask[:L, :L].to(x.dtype))  # (B, L, W) causal
        return tw.ln_final(x)  # (B, L, W)


_TEXT_TOWER_KEYS = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")


def open_clip_text_state_dict(name: str, pretrained: str) -> dict[str, torch.Tensor]:
    """Text-tower weights of open_clip model `name` from a local checkpoint file or a pretrained tag."""
    import open_clip  # lazy: open_clip ~7 s to import, needed only here

    if os.path.isfile(pretrained):
        from open_clip.factory import load_state_dict  # lazy: open_clip ~7 s to import, needed only here

        sd = load_state_dict(pretrained)  # handles safetensors, {"state_dict": ...}, "module." prefixes
    else:  # a tag: open_clip resolves it (from its cache, or downloading once) and builds the full model
        sd = open_clip.create_model(name, pretrained=pretrained).state_dict()
    if any(k.startswith("text.") for k in sd):  # CustomTextCLIP layout
        return {k[len("text."):]: v for k, v in sd.items() if k.startswith("text.")}
    return {k: v for k, v in sd.items() if k.split(".", 1)[0] in _TEXT_TOWER_KEYS}  # CLIP layout


class T5TextEncoder(FrozenTextEncoder):
    """A transformers T5 encoder (model id or local directory); tokens = last_hidden_state."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__(cfg)
        from transformers import T5EncoderModel  # lazy: transformers ~1 s to import, needed only here

        self.model = T5EncoderModel.from_pretrained(cfg.name, dtype=ENCODER_DTYPES[cfg.precision])
        self.out_dim = self.model.config.d_model
        self._freeze()

    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state  # (B, L, d_model)


# --------------------------------------------------------------------------------------
# Text-embedding cache
# --------------------------------------------------------------------------------------


class TextEmbeddingCache:
    """LRU of a frozen encoder's per-caption embeddings, in memory and optionally on disk.

    Keys are sha256(encoder identity, caption): a different model, checkpoint, precision,
    max_length or set of weights never hits another's entries. Values are the caption's real
    tokens (n, D) float32 on CPU. The disk layer (``directory``) is shared safely by several
    processes: files are written to a temporary name and renamed into place.
    """

    def __init__(self, capacity: int = 4096, directory: Optional[str] = None):
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self.directory = directory
        self._mem: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0
        if directory:
            os.makedirs(directory, exist_ok=True)

    @staticmethod
    def key(identity: str, caption: str) -> str:
        return hashlib.sha256(f"{identity}\x00{caption}".encode()).hexdigest()

    def _path(self, key: str) -> str:
        return os.path.join(self.directory, key[:2], key + ".pt")

    def __len__(self) -> int:
        return len(self._mem)

    def get(self, key: str) -> Optional[torch.Tensor]:
        if key in self._mem:
            self._mem.move_to_end(key)
            self.hits += 1
            return self._mem[key]
        if self.directory and os.path.exists(self._path(key)):
            value = torch.load(self._path(key), map_location="cpu", weights_only=True)
            self._remember(key, value)
            self.hits += 1
            return value
        self.misses += 1
        return None

    def put(self, key: str, value: torch.Tensor) -> None:
        value = value.detach().float().cpu().contiguous()  # (n, D)
        self._remember(key, value)
        if self.directory and not os.path.exists(self._path(key)):
            os.makedirs(os.path.dirname(self._path(key)), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self._path(key)), suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                torch.save(value.clone(), f)
            os.replace(tmp, self._path(key))

    def _remember(self, key: str, value: torch.Tensor) -> None:
        if self.capacity == 0:
            return
        self._mem[key] = value
        self._mem.move_to_end(key)
        while len(self._mem) > self.capacity:
            self._mem.popitem(last=False)


def encode_captions(encoder: nn.Module, tokenizer: TokenizerFn, captions: list[str],
                    cache: Optional[TextEmbeddingCache] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """captions -> text (B, L, D) float32, mask (B, L) on the encoder's device, through the cache.

    Only the distinct captions the cache misses are tokenised and encoded (in one batch). Without a
    cache this is tokenizer + encoder. A cache with a trainable encoder is an error.
    """
    device = next(encoder.parameters()).device
    if cache is None:
        ids, mask = tokenizer(captions)  # (B, L), (B, L)
        return encoder(ids.to(device), mask.to(device))
    if getattr(encoder, "trainable", True) or not encoder.identity:
        raise ValueError("the text-embedding cache needs a frozen encoder (kind open_clip or t5)")
    keys = [cache.key(encoder.identity, c) for c in captions]
    found: dict[str, Optional[torch.Tensor]] = {k: None for k in keys}  # each distinct caption once
    for k in found:
        found[k] = cache.get(k)
    missing = [k for k, v in found.items() if v is None]
    if missing:
        first = {k: captions[i] for i, k in reversed(list(enumerate(keys)))}  # key -> its caption
        ids, mask = tokenizer([first[k] for k in missing])  # (M, L), (M, L)
        out, mask = encoder(ids.to(device), mask.to(device))  # (M, L, D), (M, L)
        for j, k in enumerate(missing):
            found[k] = out[j, mask[j]].cpu()  # (n, D) the real tokens, a prefix of the row
            cache.put(k, found[k])
    L, D = tokenizer.max_length, encoder.out_dim
    text = torch.zeros(len(captions), L, D)  # (B, L, D)
    text_mask = torch.zeros(len(captions), L, dtype=torch.bool)  # (B, L)
    for i, k in enumerate(keys):
        emb = found[k]  # (n, D)
        text[i, : emb.shape[0]] = emb
        text_mask[i, : emb.shape[0]] = True
    return text.to(device), text_mask.to(device)
