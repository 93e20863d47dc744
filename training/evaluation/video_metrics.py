"""Distribution and alignment metrics for sampled videos: FVD and CLIP score.

- **FVD**: the Frechet distance between Gaussians fitted to video features of real clips and
  of generated ones. The feature network is pluggable (`VideoFeatureExtractor`): VideoMAE
  (any ``transformers`` VideoMAE checkpoint: a hub id or a local ``save_pretrained``
  directory) or the Kinetics-400 I3D TorchScript file that StyleGAN-V and most FVD papers use
  (a local file). Numbers are only comparable with the same extractor, clip length and
  sample counts; with fewer samples than feature dimensions the covariances are
  rank-deficient, which the distance handles but which makes FVD a coarse, biased number.
- **CLIP score**: ``100 * max(cos(image, text), 0)`` per frame (as in torchmetrics and the
  T2V papers), averaged over evenly spaced frames of each video, with an open_clip model from
  a name + pretrained tag, a local checkpoint file, ``hf-hub:`` id or ``local-dir:`` path.

Nothing is downloaded at import or build time unless a hub id / pretrained tag is given; the
tests build tiny random models from configs, save them and load them back through the same
paths real weights take.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from data.checks import check_ranges

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EXTRACTORS = ("videomae", "i3d")


# ----- Frechet distance -----------------------------------------------------------------------
def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> mean (D,), covariance (D, D) (unbiased; needs N >= 2)."""
    feats = np.asarray(feats, np.float64)
    if feats.ndim != 2 or len(feats) < 2:
        raise ValueError(f"need (N >= 2, D) features, got {feats.shape}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)  # (D,), (D, D)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # (D, D)


def frechet_distance(mu1, s1, mu2, s2) -> float:
    """||mu1 - mu2||^2 + Tr(s1 + s2 - 2 (s1 s2)^(1/2)) between two Gaussians.

    Tr((s1 s2)^(1/2)) is computed as the sum of square roots of the eigenvalues of
    s1^(1/2) s2 s1^(1/2), which is symmetric PSD and has the same eigenvalues as s1 s2: two
    `eigh` calls instead of a general matrix square root (no scipy), stable for the
    rank-deficient covariances of small sample sets (their zero eigenvalues leave rounding
    errors around 1e-8 of the traces)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(s1, np.float64)), np.atleast_2d(np.asarray(s2, np.float64))
    r1 = _sqrt_psd(s1)  # (D, D)
    m = r1 @ s2 @ r1  # (D, D)
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    d = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    return max(float(d), 0.0)  # >= 0 exactly; rounding can leave -1e-7 for equal Gaussians


# ----- video feature extractors ---------------------------------------------------------------
@runtime_checkable
class VideoFeatureExtractor(Protocol):
    """(N, T, H, W, 3) uint8 videos -> (N, D) float64 features."""

    name: str

    def __call__(self, videos: np.ndarray) -> np.ndarray: ...


def _frames(videos: np.ndarray, num_frames: int) -> torch.Tensor:
    """uint8 (N, T, H, W, 3) -> float (N, num_frames, 3, H, W) in [0, 1], frames evenly
    resampled (repeated when the clip is shorter)."""
    v = torch.as_tensor(np.asarray(videos))  # (N, T, H, W, 3)
    idx = torch.linspace(0, v.shape[1] - 1, num_frames).round().long()  # (F,)
    return v[:, idx].permute(0, 1, 4, 2, 3).float() / 255.0  # (N, F, 3, H, W)


def _resize_center(x: torch.Tensor, size: int) -> torch.Tensor:
    """(..., 3, H, W) -> (..., 3, size, size): short side to `size` (bilinear), centre crop."""
    lead, (h, w) = x.shape[:-3], x.shape[-2:]
    x = x.reshape(-1, 3, h, w)  # (B, 3, H, W)
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[:, :, top : top + size, left : left + size].reshape(*lead, 3, size, size)


class VideoMAEFeatures:
    """Mean-pooled last hidden states of a ``transformers`` VideoMAE encoder.

    `path`: a hub id or a local directory in ``save_pretrained`` layout (a
    VideoMAEForVideoClassification checkpoint loads its encoder). Frames are resampled to the
    model's ``num_frames``, resized to its ``image_size`` and normalised with the mean/std of
    the directory's ``preprocessor_config.json`` (ImageNet's when there is none)."""

    name = "videomae"

    def __init__(self, path: str, device: str | torch.device = "cpu", batch_size: int = 8):
        from transformers import VideoMAEModel  # lazy: transformers ~1 s to import, needed only here

        self.model = VideoMAEModel.from_pretrained(path).to(device).eval()
        self.device, self.batch_size = torch.device(device), batch_size
        cfg = self.model.config
        self.num_frames, self.size = cfg.num_frames, cfg.image_size
        pre = Path(path) / "preprocessor_config.json"
        meta = json.loads(pre.read_text()) if pre.is_file() else {}
        self.mean = torch.tensor(meta.get("image_mean", IMAGENET_MEAN)).view(3, 1, 1)
        self.std = torch.tensor(meta.get("image_std", IMAGENET_STD)).view(3, 1, 1)

    @torch.no_grad()
    def __call__(self, videos: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(videos), self.batch_size):
            x = _resize_center(_frames(videos[i : i + self.batch_size], self.num_frames), self.size)
            x = ((x - self.mean) / self.std).to(self.device)  # (B, F, 3, S, S)
            h = self.model(pixel_values=x).last_hidden_state  # (B, tokens, D)
            out.append(h.float().mean(dim=1).cpu().double().numpy())  # (B, D)
        return np.concatenate(out)


class I3DFeatures:
    """The Kinetics-400 I3D as the TorchScript file of StyleGAN-V / fvd-comparison
    (``i3d_torchscript.pt``), called the way those papers call it: (B, 3, T, H, W) in
    [-1, 1], ``rescale=False, resize=True, return_features=True`` -> (B, 400) logits before
    the softmax. Clips shorter than 9 frames (its temporal receptive field) are padded by
    repeating their end frames."""

    name = "i3d"
    MIN_FRAMES = 9

    def __init__(self, path: str, device: str | torch.device = "cpu", batch_size: int = 8):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"I3D TorchScript file not found: {path} (eval.fvd.path)")
        self.model = torch.jit.load(path, map_location=device).eval()
        self.device, self.batch_size = torch.device(device), batch_size

    @torch.no_grad()
    def __call__(self, videos: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(videos), self.batch_size):
            x = _frames(videos[i : i + self.batch_size], videos.shape[1])  # (B, T, 3, H, W)
            pad = self.MIN_FRAMES - x.shape[1]
            if pad > 0:
                x = torch.cat([x[:, :1].expand(-1, pad // 2, -1, -1, -1), x,
                               x[:, -1:].expand(-1, pad - pad // 2, -1, -1, -1)], dim=1)
            x = (x * 2 - 1).permute(0, 2, 1, 3, 4).contiguous().to(self.device)  # (B, 3, T, H, W)
            f = self.model(x, rescale=False, resize=True, return_features=True)  # (B, D)
            out.append(f.float().cpu().double().numpy())
        return np.concatenate(out)


@dataclass
class FVDConfig:
    extractor: str = "videomae"  # videomae | i3d
    path: Optional[str] = None  # videomae: hub id or local directory; i3d: TorchScript file; unset = FVD skipped
    num_real: int = 64  # held-out clips forming the real set
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.extractor not in EXTRACTORS:
            raise ValueError(f"unknown eval.fvd.extractor {self.extractor!r}; valid: {', '.join(EXTRACTORS)}")
        check_ranges(self, num_real=">= 2", batch_size=">= 1")

    def build(self, device: str | torch.device = "cpu") -> VideoFeatureExtractor:
        if not self.path:
            raise ValueError("eval.fvd.path is unset: no feature extractor to build")
        cls = VideoMAEFeatures if self.extractor == "videomae" else I3DFeatures
        return cls(self.path, device=device, batch_size=self.batch_size)


def fvd(real: np.ndarray | tuple[np.ndarray, np.ndarray], fake: np.ndarray,
        extractor: VideoFeatureExtractor) -> float:
    """FVD between uint8 videos (N, T, H, W, 3): real videos or their precomputed
    `feature_stats` (to reuse them across checkpoints), and generated videos."""
    real_stats = real if isinstance(real, tuple) else feature_stats(extractor(real))
    return frechet_distance(*real_stats, *feature_stats(extractor(fake)))


# ----- CLIP score -----------------------------------------------------------------------------
@dataclass
class ClipScoreConfig:
    name: Optional[str] = None  # open_clip model: ViT-B-32, hf-hub:org/repo, local-dir:/path; unset = skipped
    pretrained: Optional[str] = None  # with a built-in name: a tag (e.g. laion2b_s34b_b79k) or a local file
    frames: int = 4  # evenly spaced frames scored per video
    batch_size: int = 64

    def __post_init__(self) -> None:
        check_ranges(self, frames=">= 1", batch_size=">= 1")

    def build(self, device: str | torch.device = "cpu") -> "ClipScorer":
        if not self.name:
            raise ValueError("eval.clip.name is unset: no CLIP model to build")
        return ClipScorer(self, device)


class ClipScorer:
    """An open_clip model with its own validation transform and tokenizer."""

    def __init__(self, cfg: ClipScoreConfig, device: str | torch.device = "cpu"):
        import open_clip  # lazy: open_clip ~7 s to import, needed only here

        self.cfg, self.device = cfg, torch.device(device)
        model, _, self.preprocess = open_clip.create_model_and_transforms(
            cfg.name, pretrained=cfg.pretrained, device=self.device)
        self.model = model.eval()
        self.tokenizer = open_clip.get_tokenizer(cfg.name)

    @torch.no_grad()
    def __call__(self, videos: np.ndarray, prompts: list[str]) -> np.ndarray:
        """uint8 (N, T, H, W, 3) and N prompts -> (N,) CLIP scores in [0, 100]."""
        videos = np.asarray(videos)
        if len(videos) != len(prompts):
            raise ValueError(f"{len(videos)} videos but {len(prompts)} prompts")
        idx = np.linspace(0, videos.shape[1] - 1, min(self.cfg.frames, videos.shape[1])).round().astype(int)
        frames = videos[:, idx].reshape(-1, *videos.shape[2:])  # (N*F, H, W, 3)
        img = []
        for i in range(0, len(frames), self.cfg.batch_size):
            x = torch.stack([self.preprocess(Image.fromarray(f)) for f in frames[i : i + self.cfg.batch_size]])
            img.append(F.normalize(self.model.encode_image(x.to(self.device)).float(), dim=-1))  # (b, E)
        img = torch.cat(img).view(len(videos), len(idx), -1)  # (N, F, E)
        txt = F.normalize(self.model.encode_text(self.tokenizer(prompts).to(self.device)).float(), dim=-1)  # (N, E)
        cos = (img * txt[:, None, :]).sum(-1)  # (N, F)
        return (100 * cos.clamp(min=0)).mean(dim=1).cpu().double().numpy()  # (N,)


def clip_score(videos: np.ndarray, prompts: list[str], clip: ClipScoreConfig | ClipScorer) -> np.ndarray:
    """Per-video CLIP score (N,) of uint8 videos (N, T, H, W, 3) against their prompts."""
    scorer = clip if isinstance(clip, ClipScorer) else clip.build()
    return scorer(videos, prompts)
