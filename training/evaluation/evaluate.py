"""Evaluation of one checkpoint or a series: validation loss, samples, probes, CLIP score, FVD.

    eval.checkpoint / eval.steps --resolve_checkpoints--> [CheckpointRef]
    each: load_checkpoint -> validation_loss (held-out shards; packed as training packed them)
                          -> sample_videos (fixed prompts, fixed noise) -> mp4s + grid.mp4
                          -> probes (synthetic prompts) / CLIP score / FVD (when configured)
    -> results.json, W&B (metrics per step, grid videos, a table of samples), stage summary

Progress: a line (``data.progress``) after the first batch (of validation clips or samples), at
most every ``eval.progress_every_s`` seconds and after the last, counting the batches of every
checkpoint (``eval_batches``).

Which weights: ``checkpoint: latest`` takes the training stage's final export (``model.pt``,
``model_ema.pt``, the same weights as its last checkpoint); a step number takes that step's
checkpoint as Ray Train registered it, ``checkpoints/stepNNNNNNNN`` (a DeepSpeed save directory,
converted to fp32 by DeepSpeed's own ``zero_to_fp32``, with the tag's ``ema.pt`` when
``use_ema``); a path takes such a save directory or a training output directory anywhere. ``steps: [...]`` evaluates a series of tags and logs every
metric with the checkpoint's step as the x axis (metric-vs-step curves); keep them with
``train.keep_checkpoints``.

Comparable numbers: the validation loss uses the first ``num_frames`` of each held-out clip,
the fixed timesteps ``val_timesteps`` (strata, not samples), and noise seeded per (clip,
timestep), so the same clip always meets the same noise whatever the batch size or clip count.
Samples are drawn from noise seeded per prompt index. Two checkpoints or two runs on the same
data therefore differ only by their weights.

Prompts: ``eval.prompts``, or (empty) ``num_prompts`` prompts in the synthetic source's caption
format, balanced over colours and directions (``probes.synthetic_prompts``), which is what makes
probe scores mean something. Probes run on every prompt that parses as a synthetic caption;
CLIP score and FVD run when their model is configured and are reported as skipped (with the
reason) otherwise, never silently absent.

Long clips (``eval.long``, off by default): the first ``long.num_prompts`` prompts are also
sampled at each of ``long.seconds`` (the DiT is shape-independent: RoPE is computed per grid),
decoded through the latent space like the other samples, written at the model's frame rate under
``samples/long/<L>s/`` and probed window by window (``consistency``): ``long/<L>s/*`` metrics,
per-window curves in results.json's ``long`` and the W&B table ``long_windows``. The lengths are
checked (``consistency.long_lengths``) before anything is loaded.

Output layout: the newest checkpoint of the run writes ``samples/sample-NN.mp4`` and
``samples/grid.mp4``; earlier ones of a series write under ``samples/stepNNNNNNNN/``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from data.checks import check_ranges, from_dict
from data.progress import Progress
from data.prompts import synthetic_prompts
from data.video_io import read_frames, write_mp4
from training.checkpoint import RunCheckpoints, tag_of, weights_only_loads
from training.evaluation.consistency import (
    WINDOW_COLUMNS,
    LongEvalConfig,
    long_lengths,
    long_scores,
    per_window,
    window_frames,
    window_probes,
    window_rows,
)
from training.clips import normalize, read_clips
from training.evaluation.parallel import on_sequence_parallel_workers
from training.evaluation.probes import probe_scores, probe_video, prompt_sensitivity
from training.evaluation.samples import grid_video, sample_table
from training.evaluation.video_metrics import ClipScoreConfig, FVDConfig, feature_stats, fvd
from training.flops import token_grid
from training.flow import FlowConfig, euler_sample, flow_loss, flow_loss_packed, shift_for, text_model_fn
from training.latent.recon_metrics import evaluate_reconstruction
from training.latent.space import load_latent_space
from training.model import ModelConfig
from training.patches import PackedClips, pack_clips, patch_grid
from training.text_separation import ATTRIBUTES, caption_pairs
from training.trainer import TrainConfig
from training.ulysses import apply_sequence_parallel


@dataclass
class EvalConfig:
    checkpoint: str = "latest"  # latest | a step number | a path (checkpoint tag or training output dir)
    steps: list[int] = field(default_factory=list)  # a series of checkpoint steps; empty = just `checkpoint`
    use_ema: bool = True  # evaluate the EMA weights (model_ema.pt / the tag's ema.pt) when present
    val_timesteps: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    val_max_clips: int = 64
    batch_size: int = 8
    seed: int = 1234
    prompts: list[str] = field(default_factory=list)  # empty: num_prompts synthetic prompts
    num_prompts: int = 16
    sample_steps: int = 20
    cfg_scale: float = 3.0
    fps: float = 8.0
    probes: bool = True  # probe samples of synthetic prompts (colour, shape, motion, count, flicker)
    # prompt sensitivity: this many base prompts, each sampled beside one variant per attribute
    # (colour, shape, direction, count) from the same noise; 0 = off
    sensitivity_prompts: int = 8
    clip: ClipScoreConfig = field(default_factory=ClipScoreConfig)
    fvd: FVDConfig = field(default_factory=FVDConfig)
    long: LongEvalConfig = field(default_factory=LongEvalConfig)  # long clips, probed per window
    progress_every_s: float = 10.0  # a progress line (batch/total, rate, ETA) at most this often

    def __post_init__(self) -> None:
        check_ranges(self, steps=">= 0", val_timesteps="in [0, 1]", val_max_clips=">= 1",
                     batch_size=">= 1", num_prompts=">= 1", sample_steps=">= 1", cfg_scale=">= 0",
                     fps="> 0", sensitivity_prompts=">= 0", progress_every_s=">= 0")


# ----- which weights --------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckpointRef:
    """One set of weights to evaluate: a training output's final export, or a DeepSpeed save
    directory (one of Ray Train's checkpoints: ``latest`` and the tag's directory in it)."""

    step: int
    path: Path  # the training output dir (kind "final") or the save dir (kind "deepspeed")
    kind: str  # final | deepspeed

    @property
    def train_dir(self) -> Path:
        return self.path if self.kind == "final" else self.path.parent.parent


def _step_of_save(save_dir: Path) -> int:
    tag = (save_dir / "latest").read_text().strip()
    digits = "".join(c for c in tag if c.isdigit())
    if not digits:
        raise ValueError(f"cannot tell the step of checkpoint {save_dir} (tag {tag!r})")
    return int(digits)


def _final_step(train_dir: Path) -> int:
    res = train_dir / "train_result.json"
    if res.exists():
        return int(json.loads(res.read_text())["steps"])
    return int(train_configs(train_dir)[1]["steps"])


def _tag_ref(train_dir: Path, step: int) -> CheckpointRef:
    """A registered checkpoint of the training output (Ray Train's run directory in it)."""
    return CheckpointRef(step, RunCheckpoints(train_dir).local_dir(step), "deepspeed")


def resolve_checkpoints(cfg: EvalConfig, train_dir: Path) -> list[CheckpointRef]:
    """The checkpoints `cfg` asks for, oldest first."""
    train_dir = Path(train_dir)
    if cfg.steps:
        return [_tag_ref(train_dir, int(s)) for s in sorted(set(cfg.steps))]
    ck = str(cfg.checkpoint).strip()
    if ck == "latest":
        return [CheckpointRef(_final_step(train_dir), train_dir, "final")]
    if ck.isdigit():
        return [_tag_ref(train_dir, int(ck))]
    path = Path(ck).expanduser().resolve()
    if (path / "model.pt").exists():
        return [CheckpointRef(_final_step(path), path, "final")]
    if (path / "latest").exists():
        return [CheckpointRef(_step_of_save(path), path, "deepspeed")]
    raise FileNotFoundError(
        f"eval.checkpoint={ck!r} is not 'latest', a step number, a training output directory "
        f"(with model.pt) or a DeepSpeed save directory (with latest: one of checkpoints/*)")


def train_configs(train_dir: Path) -> tuple:
    """(ModelConfig, train config dict) of a training output: its exported json files, or the
    resolved config in its info.json (a run still in progress has no exports yet). Fields the
    TrainConfig lacks (e.g. an older file's) take their defaults; extra records the trainer
    adds next to the config (e.g. ``latent``) are passed through."""
    train_dir = Path(train_dir)
    if (train_dir / "model_config.json").exists():
        model = json.loads((train_dir / "model_config.json").read_text())
        train = json.loads((train_dir / "train_config.json").read_text())
    else:
        info = json.loads((train_dir / "info.json").read_text())["config"]
        model, train = info["model"], info["train"]
    known = {f.name for f in fields(TrainConfig)}
    typed = asdict(from_dict(TrainConfig, {k: v for k, v in train.items() if k in known}))
    return from_dict(ModelConfig, model), {**train, **typed}


def _deepspeed_state_dict(save_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of a DeepSpeed save directory's latest tag: DeepSpeed's zero_to_fp32 for
    ZeRO 1-3 (it merges every rank's partitions); ZeRO-0 tags hold the whole module in the
    model-states file. Every file is unpickled as weights only
    (training.checkpoint.weights_only_loads): a tag holding anything else raises
    UnsafeCheckpoint, and nothing of it runs."""
    tag_dir = save_dir / (save_dir / "latest").read_text().strip()
    with weights_only_loads(tag_dir):
        if any(tag_dir.glob("*zero_pp_rank_*_optim_states.pt")):
            from deepspeed.utils.zero_to_fp32 import (
                get_fp32_state_dict_from_zero_checkpoint,  # lazy: deepspeed ~2.7 s to import, needed only here
            )

            return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        states = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu",
                            weights_only=True)
    return {k: v.float() for k, v in states["module"].items()}


def load_checkpoint(ref: CheckpointRef, device, use_ema: bool = True):
    """-> (model in eval mode on `device`, ModelConfig, train config dict, "ema" | "raw")."""
    mcfg, tcfg = train_configs(ref.train_dir)
    model = mcfg.build()
    if ref.kind == "final":
        sd = torch.load(ref.path / "model.pt", map_location="cpu", weights_only=True)
        ema_path = ref.path / "model_ema.pt"
        ema = torch.load(ema_path, map_location="cpu", weights_only=True) if ema_path.exists() else None
    else:
        sd = _deepspeed_state_dict(ref.path)
        ema_path = ref.path / (ref.path / "latest").read_text().strip() / "ema.pt"
        ema = (torch.load(ema_path, map_location="cpu", weights_only=True)["shadow"]
               if ema_path.exists() else None)
    weights = "raw"
    if use_ema and ema is not None:
        missing = {k for k, p in model.named_parameters() if p.requires_grad} - set(ema)
        if missing:
            raise KeyError(f"EMA weights of {ref.path} lack {sorted(missing)[:3]}")
        sd = {**sd, **ema}
        weights = "ema"
    model.load_state_dict(sd)
    return model.to(device).eval(), mcfg, tcfg, weights


def load_model(train_dir: Path, device, use_ema: bool = True):
    """The final weights of a training output (EMA when asked and present) -> (model, mcfg)."""
    model, mcfg, _, _ = load_checkpoint(CheckpointRef(0, Path(train_dir), "final"), device, use_ema)
    return model, mcfg


# ----- validation loss ------------------------------------------------------------------------
def _seeded(*key: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1)[0]))


@torch.no_grad()
def validation_loss(model, tokenizer, clips, cfg: EvalConfig, device, space=None, flow=None,
                    on_batch: Callable[[], None] | None = None, pack_tokens: int = 0) -> dict[str, float]:
    """Flow loss per fixed timestep over `clips` (from `training.clips.read_clips`), noise seeded per
    (clip index, timestep value) -> {"val/loss_t0.10": ..., "val/loss": mean, "val/clips": n}.
    Keyed by the timestep's value, not its position, so adding or removing a timestep leaves
    the others' numbers unchanged.
    With a latent `space` the clips are encoded (posterior mean) and the loss is in latents.
    `flow`: the training's FlowConfig (its ``prediction`` says what the network outputs); the
    timesteps and noise are fixed here, so only that field matters. `on_batch`: called after
    each batch of clips (progress). `pack_tokens` > 0 (a ``train.data.pack`` run): each batch
    goes through the model as the training saw it, packed (``pack_clips``, rows of at most that
    many tokens) through ``forward_packed``; the loss per clip is the same."""
    flow = flow or FlowConfig()
    patch = model.cfg.dit.patch_size

    def pack_rows(xs: list[torch.Tensor]) -> PackedClips:  # a clip over the budget: a row alone
        longest = max(math.prod(patch_grid(tuple(x.shape[1:]), patch)) for x in xs)
        return pack_clips(xs, patch, max_tokens=max(pack_tokens, longest))

    per_t: dict[float, list[float]] = {t: [] for t in cfg.val_timesteps}
    for i in range(0, len(clips), cfg.batch_size):
        chunk = clips[i : i + cfg.batch_size]
        x0 = normalize(torch.stack([c[0] for c in chunk]).to(device))  # (B, 3, T, H, W)
        if space is not None:
            x0 = space.encode(x0).to(device)  # (B, C, t, h, w)
        ids, mask = tokenizer([c[1] for c in chunk])
        ids, mask = ids.to(device), mask.to(device)
        for t in cfg.val_timesteps:
            key = round(float(t) * 10_000)  # the timestep's value in 1e-4 steps
            noise = torch.stack([torch.randn(x0.shape[1:], generator=_seeded(cfg.seed, i + j, key))
                                 for j in range(len(chunk))]).to(device)  # (B, 3, T, H, W)
            tt = torch.full((len(chunk),), float(t), device=device)  # (B,)
            if pack_tokens:
                _, per_sample, _ = flow_loss_packed(lambda xs, s: model(pack_rows(xs), s, ids, mask),
                                                    list(x0), flow, t=tt, noise=list(noise))
            else:
                _, per_sample, _ = flow_loss(lambda x, s: model(x, s, ids, mask), x0, flow,
                                             t=tt, noise=noise)
            per_t[t] += per_sample.tolist()
        if on_batch is not None:
            on_batch()
    out = {f"val/loss_t{t:.2f}": float(np.mean(v)) for t, v in per_t.items()}
    out["val/loss"] = float(np.mean([np.mean(v) for v in per_t.values()]))
    out["val/clips"] = len(clips)
    return out


def packed_tokens(tcfg: dict) -> int:
    """The token budget of a training run's packs (``train.data.pack``), 0 if it did not pack."""
    data = tcfg.get("data") or {}
    return int(data.get("token_budget") or 0) if data.get("pack") else 0


# ----- sampling -------------------------------------------------------------------------------
@torch.no_grad()
def sample_videos(model, tokenizer, prompts: list[str], cfg: EvalConfig, shape: tuple[int, ...],
                  shift: float, device, space=None, flow=None, seeds: list[int] | None = None,
                  on_batch: Callable[[], None] | None = None) -> torch.Tensor:
    """shape: (C, T, H, W) of what the DiT generates (latents when `space` is given, decoded
    through it). Returns uint8 videos (N, T, H, W, 3); prompt i starts from the noise seeded by
    (cfg.seed, seeds[i]) (seeds default to 0..N-1), in batches of cfg.batch_size. `flow`: the
    training's FlowConfig, whose ``prediction`` the sampler converts from. `on_batch`: called
    after each batch (progress)."""
    flow = flow or FlowConfig()
    seeds = list(range(len(prompts))) if seeds is None else list(seeds)
    null_ids, null_mask = tokenizer([""])
    null_text, null_mask = model.encode_text(null_ids.to(device), null_mask.to(device))  # (1, L, Dt)
    out = []
    for i in range(0, len(prompts), cfg.batch_size):
        chunk = prompts[i : i + cfg.batch_size]
        ids, mask = tokenizer(chunk)
        text, text_mask = model.encode_text(ids.to(device), mask.to(device))  # (B, L, Dt), (B, L)
        fn = text_model_fn(model.dit, text, text_mask, null_text, null_mask)
        noise = torch.stack([torch.randn(shape, generator=_seeded(cfg.seed, seeds[i + j]))
                             for j in range(len(chunk))]).to(device)  # (B, C, T, H, W)
        x = euler_sample(fn, noise.shape, cfg.sample_steps, cfg.cfg_scale, shift=shift, noise=noise,
                         prediction=flow.prediction, x0_t_min=flow.x0_t_min)
        if space is not None:
            out.append(space.decode_video(x))  # (B, T, H, W, 3) uint8
        else:
            x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (B, C, T, H, W)
            out.append(x.permute(0, 2, 3, 4, 1).cpu())  # (B, T, H, W, C)
        if on_batch is not None:
            on_batch()
    return torch.cat(out)  # (N, T, H, W, C)


# ----- the evaluation -------------------------------------------------------------------------
def evaluate(cfg: EvalConfig, train_dir: Path, val_shards: list[str], out_dir: Path,
             tracker, sequence_parallel: int = 1, ray_address: str | None = None) -> dict:
    """Evaluate the checkpoints `cfg` names; write results.json and samples under `out_dir`,
    log to `tracker`. Returns the results (see the module docstring for their layout).
    sequence_parallel > 1: the long clips (eval.long) are sampled on that many Ray workers in one
    sequence-parallel group (``training.evaluation.parallel``), the rest here."""
    out_dir = Path(out_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    refs = resolve_checkpoints(cfg, Path(train_dir))
    mcfg, tcfg = train_configs(refs[0].train_dir)
    fps = model_fps(tcfg, cfg)
    compression = (tcfg.get("latent") or {}).get("compression")
    lengths = long_lengths(cfg.long, fps, int(mcfg.dit.patch_size[0]),
                           int(compression[0]) if compression else None)  # before any work
    prompts = list(cfg.prompts) or synthetic_prompts(cfg.num_prompts, cfg.seed)
    skipped: dict[str, str] = {}
    if not cfg.clip.name:
        skipped["clip_score"] = "eval.clip.name is unset (an open_clip model name or local-dir:)"
    if not cfg.fvd.path:
        skipped["fvd"] = "eval.fvd.path is unset (VideoMAE directory / hub id, or I3D TorchScript file)"
    if not cfg.probes:
        skipped["probes"] = "eval.probes is false"
    clip_scorer = cfg.clip.build(device) if cfg.clip.name else None
    extractor = cfg.fvd.build(device) if cfg.fvd.path else None

    size = (tcfg["height"], tcfg["width"])
    clips = read_clips(val_shards, max(cfg.val_max_clips, cfg.fvd.num_real if extractor else 0),
                       tcfg["num_frames"], size, tcfg["data"]["target_fps"], required=False)
    # held-out stills: 1-frame clips, their own loss (val_image/*), when the DiT takes one frame
    stills = read_clips(val_shards, cfg.val_max_clips, 1, size, None, images=True, required=False) \
        if int(tcfg["num_frames"]) != 1 and int(mcfg.dit.patch_size[0]) == 1 else []
    if not clips and not stills:
        raise RuntimeError("no decodable clips for validation")
    real_stats, n_real = None, 0
    if extractor is not None:
        real = clips[: cfg.fvd.num_real]
        n_real = len(real)
        if len(real) < 2:
            skipped["fvd"] = f"FVD needs at least 2 real clips; the held-out shards gave {len(real)}"
        else:
            real_stats = feature_stats(extractor(np.stack([c[0].permute(1, 2, 3, 0).numpy() for c in real])))

    space = load_latent_space(tcfg["latent"], device) if tcfg.get("latent") else None
    recon = {}
    if space is not None:  # the VAE's own fidelity on the held-out clips
        recon = evaluate_reconstruction(space, val_shards, tcfg["num_frames"],
                                        (tcfg["height"], tcfg["width"]),
                                        tcfg["data"]["target_fps"], cfg.val_max_clips)
    checkpoints = []
    val_clips = clips[: cfg.val_max_clips]
    progress = Progress("eval", len(refs) * (eval_batches(cfg, len(val_clips), len(prompts), lengths)
                                             + -(-len(stills) // cfg.batch_size)),
                        unit="batch", every_s=cfg.progress_every_s)
    for n, ref in enumerate(refs):
        tick = partial(progress.advance, 1, f"checkpoint {n + 1}/{len(refs)} (step {ref.step})")
        model, mcfg, tcfg, weights = load_checkpoint(ref, device, cfg.use_ema)
        flow = from_dict(FlowConfig, tcfg["flow"])
        metrics = validation_loss(model, mcfg.text.build_tokenizer(), val_clips, cfg, device, space, flow, tick,
                                  pack_tokens=packed_tokens(tcfg)) if val_clips else {}
        if stills:
            metrics.update({k.replace("val/", "val_image/", 1): v for k, v in validation_loss(
                model, mcfg.text.build_tokenizer(), stills, cfg, device, space, flow, tick,
                pack_tokens=packed_tokens(tcfg)).items()})
        metrics.update(recon)
        videos = _sample(model, mcfg, tcfg, prompts, cfg, device, space, on_batch=tick)  # (N, T, H, W, 3)
        if cfg.probes and cfg.sensitivity_prompts:
            metrics.update(sensitivity(model, mcfg, tcfg, cfg, device, space, tick))
        newest = n == len(refs) - 1  # the newest writes samples/, earlier ones samples/stepNNNNNNNN/
        sample_dir = out_dir / "samples" if newest else out_dir / "samples" / tag_of(ref.step)
        sp = None if sequence_parallel <= 1 else (sequence_parallel, ref, ray_address)
        long_metrics, long = ({}, None) if not lengths else evaluate_long(
            model, mcfg, tcfg, prompts, cfg, lengths, fps, device, space, sample_dir, out_dir, sp,
            tick)
        del model
        samples, shown, grid = write_samples(videos, prompts, sample_dir, out_dir, cfg.fps)
        metrics.update(score_samples(samples, shown, cfg, clip_scorer, extractor, real_stats, skipped))
        metrics.update(long_metrics)
        tracker.log(metrics, step=ref.step)
        tracker.log_video("samples/grid", str(grid), caption=f"step {ref.step}: {len(prompts)} prompts",
                          step=ref.step)
        for ln in long["lengths"] if long else ():
            tracker.log_video(f"samples/long_{ln['seconds']:g}s", str(out_dir / ln["grid"]),
                              caption=f"step {ref.step}: {ln['seconds']:g} s", step=ref.step)
        checkpoints.append({"step": ref.step, "checkpoint": str(ref.path), "kind": ref.kind,
                            "weights": weights, "metrics": metrics,
                            "grid": str(grid.relative_to(out_dir)), "samples": samples,
                            **({"long": long} if long else {})})

    columns, rows = sample_table(checkpoints, out_dir)
    tracker.log_table("samples", columns, rows)
    if lengths:
        tracker.log_table("long_windows", WINDOW_COLUMNS,
                          [r for ck in checkpoints for r in window_rows(ck["step"], ck["long"]["lengths"])])
    final = checkpoints[-1]
    tracker.summary({**final["metrics"], "eval/step": final["step"], "eval/checkpoints": len(checkpoints)})
    results = {**final["metrics"], "step": final["step"], "weights": final["weights"],
               "samples": final["samples"], "grid": final["grid"], "prompts": prompts,
               "skipped": skipped, "fvd_real_clips": n_real, "checkpoints": checkpoints,
               **({"long": final["long"]} if "long" in final else {})}
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    return results


SENSITIVITY_SEED = 100_000  # noise seeds of the sensitivity samples: apart from the prompts' 0..N-1


def sensitivity(model, mcfg, tcfg: dict, cfg: EvalConfig, device, space=None,
                on_batch: Callable[[], None] | None = None) -> dict[str, float]:
    """Prompt sensitivity (``probes.prompt_sensitivity``) over cfg.sensitivity_prompts base
    prompts: base i and its one-attribute variants share the noise seed SENSITIVITY_SEED + i."""
    pairs = caption_pairs(cfg.sensitivity_prompts, cfg.seed)
    n = cfg.sensitivity_prompts
    prompts = [b for b, _ in pairs[ATTRIBUTES[0]]] + [v for a in ATTRIBUTES for _, v in pairs[a]]
    seeds = [SENSITIVITY_SEED + i for i in range(n)] * (1 + len(ATTRIBUTES))
    videos = _sample(model, mcfg, tcfg, prompts, cfg, device, space, seeds,
                     on_batch=on_batch)  # (5n, T, H, W, 3)
    base = videos[:n]
    return prompt_sensitivity({a: list(zip(base, videos[n * (k + 1): n * (k + 2)]))
                               for k, a in enumerate(ATTRIBUTES)})


LONG_SEED = 200_000  # noise seeds of the long clips: apart from the prompts' and sensitivity's


def model_fps(tcfg: dict, cfg: EvalConfig) -> float:
    """The frame rate the model samples at: the training's target_fps, else eval.fps."""
    return float(tcfg["data"].get("target_fps") or cfg.fps)


def evaluate_long(model, mcfg, tcfg: dict, prompts: list[str], cfg: EvalConfig,
                  lengths: list[tuple[float, int]], fps: float, device, space, sample_dir: Path,
                  out_dir: Path, sp: tuple | None = None, on_batch: Callable[[], None] | None = None
                  ) -> tuple[dict[str, float], dict]:
    """The first cfg.long.num_prompts prompts sampled at each (seconds, frames) of `lengths`
    (prompt i from the noise seeded LONG_SEED + i), written at `fps` under
    sample_dir/long/<L>s/ and probed window by window -> (long/<L>s/* metrics, {"fps",
    "window_seconds", "window_frames", "lengths": [{"seconds", "frames", "grid", "samples"
    (records with their window probes), "per_window"}]})."""
    prompts = prompts[: cfg.long.num_prompts]
    seeds = [LONG_SEED + i for i in range(len(prompts))]
    n = window_frames(cfg.long, fps)
    batched = replace(cfg, batch_size=cfg.long.batch_size)
    metrics, rec = {}, {"fps": fps, "window_seconds": cfg.long.window_seconds, "window_frames": n,
                        "lengths": []}
    for seconds, T in lengths:
        if sp is None:
            videos = _sample(model, mcfg, tcfg, prompts, batched, device, space, seeds, frames=T,
                             on_batch=on_batch)  # (N, T, H, W, 3)
        else:  # (degree, checkpoint, Ray address): the same sampling on sequence-parallel workers
            work = partial(_long_work, sp[1], cfg.use_ema, tcfg.get("latent"), prompts, batched, seeds, T)
            videos = on_sequence_parallel_workers(work, sp[0], str(device), sp[2])[0]
            if on_batch is not None:  # the workers' batches, counted once they are back
                for _ in range(0, len(prompts), batched.batch_size):
                    on_batch()
        samples, shown, grid = write_samples(videos, prompts, sample_dir / "long" / f"{seconds:g}s",
                                             out_dir, fps)
        for s, v in zip(samples, shown):
            s.update(window_probes(v, s["prompt"], n, fps))
        metrics.update(long_scores(samples, seconds))
        rec["lengths"].append({"seconds": seconds, "frames": T, "grid": str(grid.relative_to(out_dir)),
                               "samples": samples, "per_window": per_window(samples)})
    return metrics, rec


def _long_work(ref: CheckpointRef, use_ema: bool, latent: dict | None, prompts: list[str], cfg: EvalConfig,
               seeds: list[int], frames: int, device, group) -> tuple[np.ndarray, dict]:
    """A sequence-parallel worker's long-clip sampling: load, split the DiT over `group`, sample."""
    model, mcfg, tcfg, _ = load_checkpoint(ref, device, use_ema)
    apply_sequence_parallel(model.dit, group)
    space = load_latent_space(latent, device) if latent else None
    return _sample(model, mcfg, tcfg, prompts, cfg, device, space, seeds, frames=frames), {}


def _sample(model, mcfg, tcfg: dict, prompts: list[str], cfg: EvalConfig, device, space=None,
            seeds: list[int] | None = None, frames: int | None = None,
            on_batch: Callable[[], None] | None = None) -> np.ndarray:
    """Samples at the training shape (or `frames` frames long) with the timestep shift of their
    token count -> (N, T, H, W, 3); latent models sample latents of the encoded shape and decode
    them through `space`."""
    shape = (frames or tcfg["num_frames"], tcfg["height"], tcfg["width"])
    if space is not None:
        shape = tuple(space.latent_shape(shape))
    flow = from_dict(FlowConfig, tcfg["flow"])
    shift = shift_for(flow, math.prod(token_grid(mcfg.dit, shape)))
    return sample_videos(model, mcfg.text.build_tokenizer(), prompts, cfg,
                         (mcfg.dit.in_channels, *shape), shift, device, space, flow, seeds,
                         on_batch).numpy()


def eval_batches(cfg: EvalConfig, val_clips: int, prompts: int,
                 lengths: list[tuple[float, int]]) -> int:
    """The batches `evaluate` runs per checkpoint (its progress total): validation clips,
    samples, the prompt-sensitivity samples and the long clips at each length."""
    def batches(n: int, size: int) -> int:
        return -(-n // size)

    n = batches(val_clips, cfg.batch_size) + batches(prompts, cfg.batch_size)
    if cfg.probes and cfg.sensitivity_prompts:
        n += batches(cfg.sensitivity_prompts * (1 + len(ATTRIBUTES)), cfg.batch_size)
    return n + len(lengths) * batches(min(cfg.long.num_prompts, prompts), cfg.long.batch_size)


def write_samples(videos: np.ndarray, prompts: list[str], sample_dir: Path, out_dir: Path,
                  fps: float) -> tuple[list[dict], list[np.ndarray], Path]:
    """sample-NN.mp4 per video and grid.mp4 -> (sample records with paths relative to
    out_dir, the videos as decoded back from their mp4s, the grid's path). Metrics are taken
    on the decoded videos: what a viewer of the files sees."""
    sample_dir.mkdir(parents=True, exist_ok=True)
    samples, shown = [], []
    for i, (prompt, v) in enumerate(zip(prompts, videos)):
        path = sample_dir / f"sample-{i:02d}.mp4"
        write_mp4(path, v, fps=fps)
        shown.append(read_frames(path))  # (T, H, W, 3)
        samples.append({"index": i, "prompt": prompt, "path": str(path.relative_to(out_dir))})
    grid = sample_dir / "grid.mp4"
    write_mp4(grid, grid_video(videos), fps=fps)
    return samples, shown, grid


def score_samples(samples: list[dict], shown: list[np.ndarray], cfg: EvalConfig, clip_scorer,
                  extractor, real_stats, skipped: dict[str, str]) -> dict[str, float]:
    """Probe results, CLIP score and FVD of one checkpoint's samples: aggregate metrics are
    returned, per-sample results added to the sample records, reasons for skips to `skipped`."""
    metrics: dict[str, float] = {}
    if cfg.probes:
        for s, v in zip(samples, shown):
            r = probe_video(v, s["prompt"])
            s.update(probes=r["pass"], expected=r["expected"], measured=r["measured"])
        metrics.update(probe_scores([s["probes"] for s in samples]))
        if not metrics:
            skipped["probes"] = "no prompt is a synthetic-source caption"
    if clip_scorer is not None:
        per = clip_scorer(np.stack(shown), [s["prompt"] for s in samples])  # (N,)
        metrics["clip_score"] = float(per.mean())
        for s, c in zip(samples, per):
            s["clip_score"] = float(c)
    if real_stats is not None:
        if len(shown) < 2:
            skipped["fvd"] = "FVD needs at least 2 generated clips (eval.prompts / num_prompts)"
        else:
            metrics["fvd"] = fvd(real_stats, np.stack(shown), extractor)
            metrics["fvd/fake_clips"] = len(shown)
    return metrics
