"""Training our causal VAE on the curated clip shards (a single-process torch loop).

    shards --ClipStream (one bucket)--> uint8 clips --normalize--> x (B, 3, T, H, W) in [-1, 1]
      --VAE--> reconstruction, posterior --> recon (L1 | MSE) + kl_weight KL
                                             + perceptual_weight perceptual (optional) --> AdamW

The VAE is small next to the DiT and trains on one device, so there is no DeepSpeed or Ray
Train here: the stage runs wherever the graph runs it (a GPU when present). Clips come through
the same loader as DiT training (shuffle buffer, aspect-preserving resize and crop, corrupt
clips skipped and counted). The frame count must be 1 + k*tc; single frames (images) go
through the same network, so ``num_frames=1`` trains an image autoencoder of the same space.

Outputs (``out_dir``): ``vae.pt`` (state dict), ``vae_config.json`` (the ``VAEConfig``
including the measured latent normalisation), ``vae/`` (both again as a diffusers-style folder:
``config.json`` + ``diffusion_pytorch_model.safetensors``), ``results.json`` (the validation reconstruction
loss, PSNR and SSIM at step 0 and at the end, the latent statistics, timings).

Latent normalisation: after training, the posterior means of ``stats_clips`` training clips
give a per-channel mean and std, stored in the config, so ``VAE.encode`` returns ~unit-variance
latents (what Stable Diffusion's scaling factor and Wan's latents_mean/std do).

Perceptual loss (off by default): LPIPS-style distances between unit-normalised features of a
torchvision network (``perceptual_net``: vgg16, alexnet or squeezenet1_1) at each pooling
stage, per frame, with weights from a local file (``perceptual_path``, e.g. torchvision's own
checkpoint): nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from data.checks import check_ranges
from training.clips import normalize, read_clips
from training.latent.recon_metrics import psnr, ssim
from training.latent.vae import VAEConfig, save_pretrained
from training.loader import ClipStream, Loader
from training.loader_config import Bucket, LoaderConfig

RECON_LOSSES = ("l1", "mse")
PERCEPTUAL_NETS = ("vgg16", "alexnet", "squeezenet1_1")


@dataclass
class VAETrainConfig:
    model: VAEConfig = field(default_factory=VAEConfig)  # the VAE to train
    steps: int = 300
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    grad_clip: float = 1.0
    num_frames: int = 9  # 1 + k * temporal compression
    height: int = 32
    width: int = 32
    target_fps: Optional[float] = None
    shuffle_buffer: int = 64
    recon_loss: str = "l1"  # l1 | mse
    kl_weight: float = 1e-4  # on the KL averaged over latent elements
    perceptual_weight: float = 0.0  # 0: off
    perceptual_net: str = "vgg16"  # vgg16 | alexnet | squeezenet1_1 (torchvision)
    perceptual_path: Optional[str] = None  # local torchvision state dict of perceptual_net
    val_max_clips: int = 16
    stats_clips: int = 64  # training clips whose latents set the normalisation
    seed: int = 0
    log_every: int = 10

    def __post_init__(self) -> None:
        check_ranges(self, steps=">= 1", batch_size=">= 1", lr="> 0", weight_decay=">= 0",
                     warmup_steps=">= 0", grad_clip=">= 0", num_frames=">= 1", height=">= 1",
                     width=">= 1", target_fps="> 0", shuffle_buffer=">= 1", kl_weight=">= 0",
                     perceptual_weight=">= 0", val_max_clips=">= 1", stats_clips=">= 1",
                     log_every=">= 1")
        tc = self.model.compression[0]
        if (self.num_frames - 1) % tc:
            raise ValueError(f"num_frames={self.num_frames} must be 1 + k*{tc} (the VAE's temporal "
                             f"compression), e.g. {1 + tc} or {1 + 2 * tc}")
        if self.recon_loss not in RECON_LOSSES:
            raise ValueError(f"unknown recon_loss {self.recon_loss!r}; valid: {', '.join(RECON_LOSSES)}")
        if self.perceptual_net not in PERCEPTUAL_NETS:
            raise ValueError(f"unknown perceptual_net {self.perceptual_net!r}; valid: {', '.join(PERCEPTUAL_NETS)}")
        if self.perceptual_weight > 0 and not self.perceptual_path:
            raise ValueError("perceptual_weight > 0 needs perceptual_path: a local torchvision state dict of "
                             f"{self.perceptual_net} (nothing is downloaded)")


class PerceptualLoss(nn.Module):
    """LPIPS-style feature distance with a frozen torchvision network, per frame.

    Features are taken before every max-pool and at the end of the network's ``features``;
    each is normalised to unit length over channels and the squared differences are averaged
    (no learned per-channel weights, so no LPIPS checkpoint is needed)."""

    MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet

    def __init__(self, net: str, path: str):
        super().__init__()
        import torchvision  # lazy: torchvision ~7 s to import, needed only here

        model = getattr(torchvision.models, net)(weights=None)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.features = model.features.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(self.MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "PerceptualLoss":
        return super().train(False)

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for m in self.features:
            if isinstance(m, nn.MaxPool2d):
                taps.append(x)
            x = m(x)
        return taps + [x]

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a, b (B, 3, T, H, W) in [-1, 1] -> scalar."""
        B, C, T, H, W = a.shape
        frames = torch.cat([a, b]).transpose(1, 2).reshape(2 * B * T, C, H, W)  # (2BT, 3, H, W)
        x = ((frames + 1) / 2 - self.mean) / self.std
        loss = a.new_zeros(())
        taps = self._taps(x)
        for f in taps:
            f = F.normalize(f, dim=1, eps=1e-8)  # (2BT, c, h, w)
            fa, fb = f.chunk(2)
            loss = loss + (fa - fb).pow(2).sum(1).mean()
        return loss / len(taps)


def _val_clips(urls: list[str], cfg: VAETrainConfig) -> torch.Tensor:
    clips = read_clips(urls, cfg.val_max_clips, cfg.num_frames, (cfg.height, cfg.width), cfg.target_fps,
                       "the VAE's validation")
    return torch.stack([v for v, _ in clips])  # (N, 3, T, H, W) uint8


@torch.no_grad()
def evaluate_vae(vae, clips: torch.Tensor, cfg: VAETrainConfig, device) -> dict[str, float]:
    """Reconstruction of uint8 clips (N, 3, T, H, W) through the posterior mean: the recon loss
    (cfg.recon_loss), PSNR and SSIM, averaged over clips."""
    was = vae.training
    vae.eval()
    loss, ps, ss = [], [], []
    for i in range(0, len(clips), cfg.batch_size):
        x = normalize(clips[i : i + cfg.batch_size].to(device))  # (B, 3, T, H, W)
        y = vae.decoder(vae.posterior(x).mode())  # (B, 3, T, H, W)
        loss.append(_recon(y, x, cfg.recon_loss).item() * len(x))
        ps.append(psnr(y.clamp(-1, 1), x).clamp(max=100.0))
        ss.append(ssim(y.clamp(-1, 1), x))
    vae.train(was)
    return {"recon_loss": sum(loss) / len(clips), "psnr": float(torch.cat(ps).mean()),
            "ssim": float(torch.cat(ss).mean()), "clips": len(clips)}


def _recon(y: torch.Tensor, x: torch.Tensor, kind: str) -> torch.Tensor:
    return F.l1_loss(y, x) if kind == "l1" else F.mse_loss(y, x)


@torch.no_grad()
def latent_statistics(vae, batches, max_clips: int, device) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the posterior means of up to `max_clips` clips."""
    s = s2 = None
    n, clips = 0, 0
    for video in batches:
        mu = vae.posterior(normalize(video.to(device))).mode().double()  # (B, C, t, h, w)
        v = mu.transpose(0, 1).flatten(1)  # (C, B t h w)
        s = v.sum(1) if s is None else s + v.sum(1)
        s2 = v.pow(2).sum(1) if s2 is None else s2 + v.pow(2).sum(1)
        n, clips = n + v.shape[1], clips + len(video)
        if clips >= max_clips:
            break
    mean = s / n  # (C,)
    std = (s2 / n - mean.pow(2)).clamp(min=1e-12).sqrt()  # (C,)
    return mean.tolist(), std.clamp(min=1e-4).tolist()


def train_vae(cfg: VAETrainConfig, train_urls: list[str], val_urls: list[str], out_dir, tracker) -> dict:
    """Train the VAE of `cfg.model` on `train_urls`, evaluate on `val_urls` (the first training
    clips when empty); write vae.pt, vae_config.json, vae/, results.json into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    vae = cfg.model.build().to(device)
    perceptual = (PerceptualLoss(cfg.perceptual_net, cfg.perceptual_path).to(device)
                  if cfg.perceptual_weight > 0 else None)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)

    def stream(seed: int) -> Loader:
        return Loader(ClipStream(train_urls, buckets=[Bucket(cfg.num_frames, cfg.height, cfg.width, cfg.batch_size)],
                                 rank=0, world=1, seed=seed,
                                 cfg=LoaderConfig(target_fps=cfg.target_fps, shuffle_buffer=cfg.shuffle_buffer)))

    val = _val_clips(val_urls or train_urls, cfg)  # (N, 3, T, H, W) uint8
    t0 = time.time()
    before = evaluate_vae(vae, val, cfg, device)
    tracker.log({f"vae/val_{k}": v for k, v in before.items()}, step=0)
    data = stream(cfg.seed)
    vae.train()
    history = []
    wait = 0.0
    for step in range(cfg.steps):
        tw = time.time()
        video, _, _ = next(data)  # (B, 3, T, H, W) uint8
        wait += time.time() - tw
        x = normalize(video.to(device))  # (B, 3, T, H, W)
        y, q = vae(x, gen)  # (B, 3, T, H, W), posterior
        rec = _recon(y, x, cfg.recon_loss)
        kl = q.kl().mean()
        loss = rec + cfg.kl_weight * kl
        perc = perceptual(y, x) if perceptual is not None else None
        if perc is not None:
            loss = loss + cfg.perceptual_weight * perc
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite VAE loss at step {step}; lower vae_train.lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            m = {"vae/loss": loss.item(), "vae/recon": rec.item(), "vae/kl": kl.item(),
                 "vae/grad_norm": float(gnorm), "vae/lr": sched.get_last_lr()[0],
                 "vae/skipped_samples": data.skipped_total}
            if perc is not None:
                m["vae/perceptual"] = perc.item()
            tracker.log(m, step=step)
            history.append({"step": step, **m})
    train_seconds = time.time() - t0

    vae.eval()
    stats_data = stream(cfg.seed + 1)
    mean, std = latent_statistics(vae, (next(stats_data)[0] for _ in range(math.ceil(cfg.stats_clips / cfg.batch_size))),
                                  cfg.stats_clips, device)
    vae.set_normalization(mean, std)
    after = evaluate_vae(vae, val, cfg, device)
    tracker.log({f"vae/val_{k}": v for k, v in after.items()}, step=cfg.steps)
    torch.save({k: v.detach().cpu() for k, v in vae.state_dict().items()}, out / "vae.pt")
    (out / "vae_config.json").write_text(json.dumps(asdict(vae.cfg), indent=2))
    save_pretrained(out / "vae", vae)  # the same as safetensors: training.latent.vae.from_pretrained
    results = {"step0": before, "final": after, "steps": cfg.steps, "latent_mean": mean, "latent_std": std,
               "compression": list(vae.compression), "channels": vae.channels,
               "params": sum(p.numel() for p in vae.parameters()), "train_seconds": train_seconds,
               "data_wait_s": wait, "skipped_samples": data.skipped_total,
               "final_train_loss": history[-1]["vae/loss"] if history else None}
    summary = {"vae/val_recon_loss_step0": before["recon_loss"], "vae/val_recon_loss": after["recon_loss"],
               "vae/val_psnr": after["psnr"], "vae/val_ssim": after["ssim"]}
    tracker.summary(summary)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results
