"""Evaluation: validation loss at fixed timesteps and noise, and sampled videos as mp4.

The validation loss uses the first ``num_frames`` of every held-out clip, the timesteps in
``val_timesteps`` (stratified, not sampled) and noise drawn from ``seed``, so the number is
comparable across runs and checkpoints of the same data.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch


@dataclass
class EvalConfig:
    val_timesteps: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    val_max_clips: int = 64
    batch_size: int = 8
    seed: int = 1234
    prompts: list[str] = field(default_factory=lambda: [
        "one red circle moving right on a black background",
        "two blue squares moving up on a gray background",
        "one yellow triangle moving left on a navy background",
        "three green circles moving down on a black background",
    ])
    use_ema: bool = True  # evaluate the EMA weights (model_ema.pt) rather than the raw ones
    sample_steps: int = 20
    cfg_scale: float = 3.0
    fps: float = 8.0


def load_model(train_dir: Path, device: torch.device, use_ema: bool = True):
    """The trained model, with the EMA weights when asked (and present)."""
    from training.model import ModelConfig
    from training.trainer import from_dict

    mcfg = from_dict(ModelConfig, json.loads((train_dir / "model_config.json").read_text()))
    model = mcfg.build()
    sd = torch.load(train_dir / "model.pt", map_location="cpu", weights_only=True)
    ema_path = train_dir / "model_ema.pt"
    if use_ema and ema_path.exists():
        ema = torch.load(ema_path, map_location="cpu", weights_only=True)
        missing = {k for k, p in model.named_parameters() if p.requires_grad} - set(ema)
        if missing:
            raise KeyError(f"EMA weights lack {sorted(missing)[:3]}")
        sd.update(ema)
    model.load_state_dict(sd)
    return model.to(device).eval(), mcfg


@torch.no_grad()
def validation_loss(model, tokenizer, shards: list[str], cfg: EvalConfig, num_frames: int,
                    size: tuple[int, int], target_fps: float | None, device) -> dict[str, float]:
    from data.shards import read_shards
    from training.flow import FlowConfig, flow_loss
    from training.loader import decode_sample, normalize

    clips = []
    for s in read_shards(shards):
        try:
            clips.append(decode_sample(s, num_frames, size, target_fps, rng=None))
        except Exception:  # noqa: BLE001 - corrupt held-out clips are skipped
            continue
        if len(clips) >= cfg.val_max_clips:
            break
    if not clips:
        raise RuntimeError("no decodable validation clips")
    gen = torch.Generator().manual_seed(cfg.seed)
    per_t: dict[float, list[float]] = {t: [] for t in cfg.val_timesteps}
    for i in range(0, len(clips), cfg.batch_size):
        chunk = clips[i : i + cfg.batch_size]
        x0 = normalize(torch.stack([c[0] for c in chunk]).to(device))  # (B, 3, T, H, W)
        ids, mask = tokenizer([c[1] for c in chunk])
        ids, mask = ids.to(device), mask.to(device)
        for t in cfg.val_timesteps:
            noise = torch.randn(x0.shape, generator=gen).to(device)  # (B, 3, T, H, W)
            tt = torch.full((len(chunk),), float(t), device=device)  # (B,)
            _, per_sample, _ = flow_loss(lambda x, s: model(x, s, ids, mask), x0, FlowConfig(),
                                         t=tt, noise=noise)
            per_t[t] += per_sample.tolist()
    out = {f"val/loss_t{t:.2f}": float(np.mean(v)) for t, v in per_t.items()}
    out["val/loss"] = float(np.mean([np.mean(v) for v in per_t.values()]))
    out["val/clips"] = len(clips)
    return out


@torch.no_grad()
def sample_videos(model, tokenizer, prompts: list[str], cfg: EvalConfig, shape: tuple[int, ...],
                  shift: float, device) -> torch.Tensor:
    """shape: (C, T, H, W). Returns uint8 videos (N, T, H, W, 3)."""
    from training.flow import euler_sample, text_model_fn

    ids, mask = tokenizer(prompts)
    text, text_mask = model.encode_text(ids.to(device), mask.to(device))  # (N, L, Dt), (N, L)
    null_ids, null_mask = tokenizer([""])
    null_text, null_mask = model.encode_text(null_ids.to(device), null_mask.to(device))
    fn = text_model_fn(model.dit, text, text_mask, null_text, null_mask)
    gen = torch.Generator().manual_seed(cfg.seed)
    noise = torch.randn((len(prompts), *shape), generator=gen).to(device)  # (N, C, T, H, W)
    x = euler_sample(fn, noise.shape, cfg.sample_steps, cfg.cfg_scale, shift=shift, noise=noise)
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (N, C, T, H, W)
    return x.permute(0, 2, 3, 4, 1).cpu()  # (N, T, H, W, C)


def evaluate(cfg: EvalConfig, train_dir: Path, val_shards: list[str], out_dir: Path,
             tracker) -> dict:
    from data.video_io import write_mp4
    from training.flops import token_grid
    from training.flow import FlowConfig, shift_for
    from training.trainer import from_dict

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, mcfg = load_model(train_dir, device, cfg.use_ema)
    tcfg = json.loads((train_dir / "train_config.json").read_text())
    size = (tcfg["height"], tcfg["width"])
    tokenizer = mcfg.text.build_tokenizer()
    metrics = validation_loss(model, tokenizer, val_shards, cfg, tcfg["num_frames"], size,
                              tcfg["data"]["target_fps"], device)
    videos = sample_videos(model, tokenizer, list(cfg.prompts), cfg,
                           (mcfg.dit.in_channels, tcfg["num_frames"], *size),
                           shift_for(from_dict(FlowConfig, tcfg["flow"]), math.prod(
                               token_grid(mcfg.dit, (tcfg["num_frames"], *size)))),
                           device)  # (N, T, H, W, 3)
    sample_dir = out_dir / "samples"
    sample_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (prompt, v) in enumerate(zip(cfg.prompts, videos)):
        path = sample_dir / f"sample-{i:02d}.mp4"
        write_mp4(path, v.numpy(), fps=cfg.fps)
        tracker.log_video(f"samples/{i:02d}", str(path), caption=prompt)
        rows.append([i, prompt, path])
    tracker.log_table("samples", ["index", "prompt", "video"], rows)
    tracker.log(metrics)
    tracker.summary(metrics)
    results = {**metrics, "samples": [{"prompt": p, "path": str(r[2].relative_to(out_dir))}
                                      for p, r in zip(cfg.prompts, rows)]}
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    return results
