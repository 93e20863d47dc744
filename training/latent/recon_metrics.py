"""Reconstruction metrics on videos (B, 3, T, H, W): PSNR and SSIM, per clip.

Both take videos in [-1, 1] by default (``data_range=2``); pass ``data_range=255`` for uint8
values cast to float, or 1 for [0, 1]. Both return one value per clip (B,), so callers can
average over clips or report a spread.

``evaluate_reconstruction`` runs a latent space over held-out clip shards (the eval stage's
reconstruction metrics).

- PSNR = 10 log10(data_range^2 / MSE), the MSE over all channels, frames and pixels of a clip
  (a perfect reconstruction gives +inf).
- SSIM is the standard image SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5,
  K1 = 0.01, K2 = 0.03, valid windows only) computed per frame and channel and averaged over
  them, the usual way video VAEs report it. Frames smaller than the window use a window of
  the frame's size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.clips import normalize, read_clips


def _check(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.ndim != 5:
        raise ValueError(f"expected two videos of one shape (B, C, T, H, W), got {tuple(a.shape)} and {tuple(b.shape)}")


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """a, b (B, C, T, H, W) -> PSNR in dB per clip (B,)."""
    _check(a, b)
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)  # (B,)
    return (10 * torch.log10(data_range**2 / mse)).float()  # (B,), inf where mse == 0


def _gaussian(size: int, sigma: float, device) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2  # (size,)
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()  # (size,)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0, window: int = 11,
         sigma: float = 1.5) -> torch.Tensor:
    """a, b (B, C, T, H, W) -> mean SSIM per clip (B,)."""
    _check(a, b)
    B, C, T, H, W = a.shape
    win = min(window, H, W)
    x = a.double().permute(0, 2, 1, 3, 4).reshape(B * T * C, 1, H, W)  # (BTC, 1, H, W)
    y = b.double().permute(0, 2, 1, 3, 4).reshape(B * T * C, 1, H, W)
    g = _gaussian(win, sigma, a.device)
    gh, gw = g.view(1, 1, win, 1), g.view(1, 1, 1, win)

    def blur(v: torch.Tensor) -> torch.Tensor:  # separable Gaussian, valid windows
        return F.conv2d(F.conv2d(v, gh), gw)  # (BTC, 1, H - win + 1, W - win + 1)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))  # (BTC, 1, h, w)
    return s.flatten(1).mean(1).view(B, T * C).mean(1).float()  # (B,)


def psnr_ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> dict[str, float]:
    """Means over clips: {"psnr": dB, "ssim": [-1, 1]}; inf PSNR (exact clips) is capped at 100 dB."""
    p = psnr(a, b, data_range).clamp(max=100.0)
    return {"psnr": float(p.mean()), "ssim": float(ssim(a, b, data_range).mean())}



@torch.no_grad()
def evaluate_reconstruction(space, shard_urls: list[str], num_frames: int, size: tuple[int, int],
                            target_fps: float | None, max_clips: int = 16, batch_size: int = 4) -> dict[str, float]:
    """Encode and decode up to `max_clips` held-out clips (their first window, as evaluation
    does) through `space` (a `training.latent.space.LatentSpace`) -> {"recon/psnr",
    "recon/ssim", "recon/clips"}, means over clips against the clips as the loader gives them."""
    clips = [v for v, _ in read_clips(shard_urls, max_clips, num_frames, size, target_fps,
                                      "reconstruction metrics")]  # [(3, T, H, W)]
    ps, ss = [], []
    for i in range(0, len(clips), batch_size):
        x = normalize(torch.stack(clips[i : i + batch_size]))  # (B, 3, T, H, W)
        y = space.decode(space.encode(x)).clamp(-1, 1).cpu()  # (B, 3, T, H, W)
        ps.append(psnr(y, x).clamp(max=100.0))
        ss.append(ssim(y, x))
    return {"recon/psnr": float(torch.cat(ps).mean()), "recon/ssim": float(torch.cat(ss).mean()),
            "recon/clips": len(clips)}
