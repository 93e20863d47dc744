"""Model-based clip scores: open_clip image embeddings, an aesthetics head, caption similarity.

    batch {"frames": (B, K, H, W, 3) uint8, "caption": (B,) str, ...}
        --ClipScorer--> batch + {"embedding": (B, D) float32, "aesthetic": (B,), "clip_score": (B,)}

`ClipScorer` is built to live in a Ray Data actor pool: it loads its models once in the
constructor and is then called on batches in ``map_batches``' numpy format::

    ds.map_batches(ClipScorer, fn_constructor_kwargs={"cfg": embed_cfg}, batch_size=64,
                   concurrency=n, num_gpus=1)  # num_gpus only on GPU nodes

Design decisions:

- One class computes all three scores: the aesthetic head and the caption similarity both
  consume the image embedding, so splitting them into separate actors would run the image
  tower twice or ship embeddings between actors.
- Frames are preprocessed in torch on the scorer's device (resize the short side to the
  model's image size with antialiased bicubic, centre crop, normalise with the model's own
  mean/std from its preprocess config), which matches open_clip's PIL transform closely and
  avoids a PIL round trip per frame.
- ``embedding`` is the mean of the K frames' L2-normalised embeddings, renormalised, so the
  dedup stage can compare clips with a dot product. ``aesthetic`` is the mean of the per-frame
  head outputs (the LAION heads were trained on single normalised image embeddings).
  ``clip_score`` is the CLIP-score cosine between the caption's normalised text embedding and
  each normalised frame embedding, averaged over frames, in [-1, 1]; NaN for an empty caption.
- Weights come from where real users keep them: ``model`` is an open_clip name with
  ``pretrained`` a tag (open_clip downloads and caches it once) or a local checkpoint file, or
  ``local-dir:/path`` (an ``open_clip_config.json`` plus weights), or ``hf-hub:org/repo``.
  The aesthetics head is a local file or a file on the Hugging Face hub
  (``org/repo/file.pth``, e.g. the LAION improved-aesthetic-predictor's
  ``sac+logos+ava1-l14-linearMSE.pth``, trained on ViT-L-14 ``openai`` embeddings).
  Nothing is downloaded when every path is local.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub import hf_hub_download
from safetensors.torch import load_file

from data.checks import check_ranges

ACTIVATIONS = {"none": nn.Identity, "relu": nn.ReLU, "gelu": nn.GELU}
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


@dataclass
class EmbedConfig:
    model: str = "ViT-L-14"  # open_clip name, local-dir:/path or hf-hub:org/repo
    pretrained: Optional[str] = "openai"  # tag or local checkpoint file (plain names only); None = random init
    aesthetic_head: Optional[str] = None  # local file or hub file org/repo/path (hf-hub: optional); None = no score
    aesthetic_activation: str = "none"  # between head layers: none (the LAION heads) | relu | gelu
    caption_similarity: bool = True  # clip_score, when the batch has captions
    device: str = "auto"  # auto = cuda when available, else cpu
    precision: str = "auto"  # auto = fp16 on cuda, fp32 on cpu | fp32 | fp16 | bf16
    frames_key: str = "frames"
    caption_key: str = "caption"
    keep_frames: bool = False  # frames are large: dropped from the output batch by default
    # The filter stage's actor pool (curate.model_scores): sized apart from the CPU tasks'
    # cluster.curate_concurrency, and never asking for more GPUs than the cluster has.
    concurrency: Optional[int] = None  # scorer actors; None = one per GPU (1 without GPUs)
    num_gpus: Optional[float] = None  # per actor; None = 1 when the cluster has GPUs, else 0

    def __post_init__(self) -> None:
        if self.aesthetic_activation not in ACTIVATIONS:
            raise ValueError(f"unknown aesthetic_activation {self.aesthetic_activation!r}; "
                             f"valid: {', '.join(ACTIVATIONS)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown embed precision {self.precision!r}; valid: {', '.join(PRECISIONS)}")
        check_ranges(self, concurrency=">= 1", num_gpus=">= 0")

    def resolved_device(self) -> str:
        return ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device

    def build(self) -> "ClipScorer":
        return ClipScorer(self)


# ----------------------------------------------------------------------------- aesthetics head


class AestheticHead(nn.Module):
    """A stack of linear layers over a normalised image embedding -> one score per row.

    ``dims`` = [embed_dim, hidden..., 1]. With ``activation="none"`` this is the LAION
    improved-aesthetic-predictor MLP (its ReLUs are commented out upstream; its dropouts are
    no-ops at inference) and, with dims [D, 1], the original LAION linear predictor."""

    def __init__(self, dims: list[int], activation: str = "none"):
        super().__init__()
        if len(dims) < 2 or dims[-1] != 1:
            raise ValueError(f"aesthetic head dims must run from the embedding width to 1, got {dims}")
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.act = ACTIVATIONS[activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, D) -> (N,)
        for i, layer in enumerate(self.linears):
            x = layer(x if i == 0 else self.act(x))  # (N, d_i)
        return x.squeeze(-1)  # (N,)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], activation: str = "none") -> "AestheticHead":
        """Any state dict of linear layers: ``weight``/``bias`` (one layer), ``layers.N.*`` (the
        LAION MLP, dropouts between), or our own ``linears.N.*``; layers in numeric order."""
        sd = sd.get("state_dict", sd)
        names = sorted((k[: -len("weight")] for k, v in sd.items() if k.endswith("weight") and v.ndim == 2),
                       key=lambda p: [int(n) for n in re.findall(r"\d+", p)])
        if not names:
            raise ValueError(f"no linear layers in the aesthetic head weights (keys: {sorted(sd)[:8]})")
        weights = [sd[p + "weight"] for p in names]
        dims = [weights[0].shape[1]] + [w.shape[0] for w in weights]
        for p, w, d_in in zip(names, weights, dims[:-1]):
            if w.shape[1] != d_in:
                raise ValueError(f"aesthetic head layer {p!r} takes {w.shape[1]} inputs, previous gives {d_in}")
        head = cls(dims, activation)
        head.load_state_dict({f"linears.{i}.{k}": sd[p + k] for i, p in enumerate(names) for k in ("weight", "bias")})
        return head


def resolve_weights(source: str) -> str:
    """A local file path, or a file on the Hugging Face hub (``[hf-hub:]org/repo/path/in/repo``),
    downloaded once into the hub cache. Returns a local path."""
    if os.path.isfile(source):
        return source
    spec = source.removeprefix("hf-hub:")
    parts = spec.split("/")
    if len(parts) < 3 or not all(parts) or os.path.isabs(source) or source.startswith("."):
        raise FileNotFoundError(f"aesthetic head weights {source!r}: no such file, and not a hub file "
                                f"(org/repo/path/in/repo)")
    return hf_hub_download(repo_id="/".join(parts[:2]), filename="/".join(parts[2:]))


def load_aesthetic_head(source: str, activation: str = "none") -> AestheticHead:
    path = resolve_weights(source)
    if path.endswith(".safetensors"):
        sd = load_file(path)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    return AestheticHead.from_state_dict(sd, activation).eval()


# ----------------------------------------------------------------------------- the scorer


def preprocess(frames: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, size, size) float: short side to `size` (bicubic,
    antialiased), centre crop, normalise."""
    x = frames.permute(0, 3, 1, 2).float() / 255.0  # (N, 3, H, W)
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)  # (N, 3, nh, nw)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top : top + size, left : left + size]  # (N, 3, size, size)
    mean = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class ClipScorer:
    """A Ray Data callable: construct once per actor, then call on batches (see module docstring)."""

    def __init__(self, cfg: EmbedConfig):
        import open_clip  # lazy: open_clip ~7 s to import, needed only here
        from open_clip.model import get_model_preprocess_cfg

        self.cfg = cfg
        self.device = torch.device(cfg.resolved_device())
        precision = cfg.precision
        if precision == "auto":
            precision = "fp16" if self.device.type == "cuda" else "fp32"
        self.model = open_clip.create_model(cfg.model, pretrained=cfg.pretrained, device=self.device,
                                            precision=precision).eval()
        pp = get_model_preprocess_cfg(self.model)
        size = pp["size"]
        self.size = size if isinstance(size, int) else int(size[0])
        self.mean, self.std = tuple(pp["mean"]), tuple(pp["std"])
        self.dtype = next(self.model.parameters()).dtype
        self.tokenizer = open_clip.get_tokenizer(cfg.model) if cfg.caption_similarity else None
        self.head = None
        if cfg.aesthetic_head:
            self.head = load_aesthetic_head(cfg.aesthetic_head, cfg.aesthetic_activation).to(self.device)
            width = self.head.linears[0].in_features
            if width != self.embed_dim:
                raise ValueError(f"aesthetic head takes {width}-d embeddings, model {cfg.model!r} gives "
                                 f"{self.embed_dim}-d (the LAION heads need ViT-L-14)")

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[-1]) if getattr(self.model, "text_projection", None) is not None \
            else int(self.model.visual.output_dim)

    @torch.no_grad()
    def frame_embeddings(self, clips: list[np.ndarray]) -> torch.Tensor:
        """clips: B arrays (K, H, W, 3) uint8 (shapes may differ) -> (B, K, D) normalised float32."""
        xs = [preprocess(torch.from_numpy(np.ascontiguousarray(c)).to(self.device), self.size, self.mean, self.std)
              for c in clips]  # B x (K, 3, S, S)
        counts = {len(x) for x in xs}
        if len(counts) != 1:
            raise ValueError(f"every clip needs the same number of frames, got {sorted(counts)}")
        x = torch.cat(xs).to(self.dtype)  # (B*K, 3, S, S)
        emb = F.normalize(self.model.encode_image(x).float(), dim=-1)  # (B*K, D)
        return emb.view(len(clips), -1, emb.shape[-1])  # (B, K, D)

    @torch.no_grad()
    def text_embeddings(self, captions: list[str]) -> torch.Tensor:
        """B captions -> (B, D) normalised float32."""
        ids = self.tokenizer(captions).to(self.device)  # (B, L)
        return F.normalize(self.model.encode_text(ids).float(), dim=-1)  # (B, D)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        frames = batch[self.cfg.frames_key]
        clips = list(frames)  # (B, K, H, W, 3) array, or an object array of (K, H, W, 3) arrays
        out = {k: v for k, v in batch.items() if k != self.cfg.frames_key or self.cfg.keep_frames}
        if not clips:
            return out
        per_frame = self.frame_embeddings(clips)  # (B, K, D)
        out["embedding"] = F.normalize(per_frame.mean(1), dim=-1).cpu().numpy()  # (B, D)
        if self.head is not None:
            with torch.no_grad():
                scores = self.head(per_frame.flatten(0, 1)).view(per_frame.shape[:2])  # (B, K)
            out["aesthetic"] = scores.mean(1).float().cpu().numpy()  # (B,)
        if self.tokenizer is not None and self.cfg.caption_key in batch:
            captions = [str(c) if c is not None else "" for c in batch[self.cfg.caption_key]]
            text = self.text_embeddings(captions)  # (B, D)
            sim = torch.einsum("bkd,bd->b", per_frame, text) / per_frame.shape[1]  # (B,)
            sim = sim.clamp(-1.0, 1.0).cpu().numpy()
            out["clip_score"] = np.where([c.strip() == "" for c in captions], math.nan, sim).astype(np.float32)
        return out
