"""`spacetime plan`: what a training run and its videos will cost, before spending it.

    spacetime plan [--json] [overrides...]      e.g. model=3b gpu=h100 num_gpus=256 video.seconds=8

Inputs are a small Hydra tree of their own (``conf/plan/``: this module's ``PlanConfig`` plus
one file per GPU type in ``conf/plan/gpu/``), so the planner follows the rule of every other
subcommand: arguments after it are typed, checked overrides; ``spacetime plan --cfg job``
prints every assumption with its value. It is a separate tree, not part of the run config,
because it answers what-if questions the run config cannot express (a VAE, seconds and fps,
GPU type and price, MFU, sequence parallelism) and must never change a stage hash.

The DiT is the one ``spacetime run model=<model>`` builds: ``conf/model/<model>.yaml``'s
``dit`` section (sizes, adaln, qk_norm, mlp_ratio, grad_checkpointing), with the plan's data and
text (VAE channels, patch_size, attention, text_dim) and any option the plan sets (adaln,
qk_norm, mlp_ratio, train.grad_checkpointing; null keeps the file's). Its parameter count is
the "as configured" line of ``spacetime params`` with the same options (tests/test_plan.py).

How the figures are made (per sample = one clip of ``video.seconds``):

    frames         = seconds x fps
    latent grid    = (frames / vae.temporal, H / vae.spatial, W / vae.spatial)  (ceil; causal
                     VAEs keep the first frame: 1 + (frames - 1) / temporal)
    token grid     = latent grid / patch_size (ceil: padded); tokens = its product
    forward FLOPs  = training.flops.forward_flops(DiTConfig, token grid, text_len)  (the
                     model's own count; matmul FLOPs, 2 per multiply-add)
    train FLOPs    = 3 x forward per sample (backward = 2 x forward) x global batch; this is
                     the MFU numerator. Activation checkpointing recomputes the forward
                     (4 x forward of hardware work); the MFU you state must absorb that.
    step time      = train FLOPs per step / (num_gpus x peak bf16 FLOP/s x train.mfu)
    GPU-hours      = steps x step time x num_gpus / 3600;   cost = GPU-hours x $/GPU-hour
    per video      = sample.steps x (2 with classifier-free guidance) x forward FLOPs
                     / (peak x sample.mfu), per clip of `seconds`; a generated minute is
                     60 / seconds such clips (VAE decode and text encoding not counted).

Memory per GPU, with Psi = DiT parameters and ZeRO partitioning across all num_gpus ranks
(DeepSpeed-Ulysses shards model states over the data x sequence-parallel group):

    bf16 mixed precision (DeepSpeed bf16: bf16 weights and grads, fp32 master + Adam m, v):
        params 2 Psi, grads 2 Psi, optimizer 12 Psi            (ZeRO paper, K = 12)
    fp32:   params 4 Psi, grads 4 Psi, optimizer 8 Psi
    ZeRO-1 divides the optimizer by num_gpus, ZeRO-2 also the grads, ZeRO-3 also the params
    (plus two gathered blocks in flight).
    activations    = micro batch x tokens / sequence_parallel x per-token bytes of saved
                     tensors: every block (no checkpointing), or each block's input plus one
                     block being recomputed (checkpointing). Per-token bytes of one block are
                     measured from autograd for this DiT (see ACT_BYTES_PER_TOKEN and
                     tests/test_plan.py); attention is SDPA/flash, so no N x N scores. On CPU
                     this is the peak RSS a training step adds within 15% (measured, fp32,
                     tiny and small, with and without checkpointing), once the allocator gives
                     freed buffers back (training/memory.py; glibc's default adds 1.2-3x).
                     Backward's transients (a block's activation gradients, one parameter's
                     gradient before it is added to .grad) are not counted: a few percent.
    + frozen modules in bf16 (text encoder, VAE) and a fixed reserve (CUDA context, NCCL and
      ZeRO bucket buffers, allocator fragmentation).

Not modelled: communication time (folded into MFU), CPU offload, pipeline/tensor parallelism,
data loading, VAE/text-encoder compute, checkpoint I/O.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

GIB = 2**30
MODEL_CONF = Path(__file__).resolve().parent.parent / "conf" / "model"

# Saved activations of one DiTBlock, bytes per token: a * D + b * M for hidden size D and MLP
# width M, by self-attention kind and precision. Measured with autograd saved-tensor hooks on
# this repo's DiT (the M terms are fc1's and GELU's outputs; RoPE and QK-RMSNorm run in fp32
# even in bf16, which is much of the D coefficient; factorised blocks hold two attentions).
# tests/test_plan.py re-measures the model against these, so a model change that moves them
# fails a test instead of silently skewing the planner.
ACT_BYTES_PER_TOKEN = {
    "full": {"bf16": (65, 4), "fp32": (97, 8)},
    "factorised": {"bf16": (103, 4), "fp32": (149, 8)},
}
# Mixed-precision Adam bytes per parameter: (weights, grads, optimizer states)
STATE_BYTES = {"bf16": (2, 2, 12), "fp32": (4, 4, 8)}
WORD_BYTES = {"bf16": 2, "fp32": 4}


@dataclass
class GPUSpec:
    name: str = "H100 SXM 80GB"
    bf16_tflops: float = 989.0  # dense (no 2:4 sparsity) peak tensor-core BF16
    memory_gib: float = 80.0
    usd_per_hour: float = 2.99  # per GPU; override with your own rate
    source: str = ""


@dataclass
class VideoSpec:
    seconds: float = 4.0
    fps: float = 24.0
    height: int = 720
    width: int = 1280


@dataclass
class VAESpec:
    """Compression of the latent autoencoder. temporal=1, spatial=1, channels=3 is pixel
    space, which is what the repo trains today."""

    temporal: int = 4
    spatial: int = 8
    channels: int = 16
    causal: bool = False  # first frame encoded on its own (CogVideoX/Hunyuan/Wan-style)


@dataclass
class TrainSpec:
    steps: int = 100_000
    global_batch_size: int = 256  # clips per optimizer step
    micro_batch_size: int = 1  # clips per data-parallel rank per forward
    precision: str = "bf16"  # bf16 | fp32
    grad_checkpointing: Optional[bool] = None  # null: the preset's (model.dit.grad_checkpointing)
    mfu: float = 0.35  # model FLOPs utilisation you expect (communication included)


@dataclass
class SampleSpec:
    steps: int = 50  # sampler steps per clip
    cfg: bool = True  # classifier-free guidance: a conditional and an unconditional pass
    mfu: float = 0.35


@dataclass
class MemorySpec:
    frozen_params: float = 0.0  # parameters resident in bf16 on every GPU (text encoder, VAE)
    overhead_gib: float = 4.0  # CUDA context, NCCL + ZeRO buffers, fragmentation


@dataclass
class PlanConfig:
    """The model is the one `spacetime run model=<model>` builds (conf/model/<model>.yaml's
    `dit`), on the data and text encoder named here: the VAE's channels, `patch_size`,
    `attention` and `text_dim` are what-ifs for a latent run with a frozen T5 (as
    `experiment=latent +model/text=t5`); a null option below keeps the preset file's value."""

    model: str = "xl"  # preset: a file of conf/model/ (tiny, small, base, large, xl, 3b)
    patch_size: list[int] = field(default_factory=lambda: [1, 2, 2])  # (pt, ph, pw) on the latent
    attention: str = "full"  # full (all N tokens) | factorised (within frames, then across)
    text_dim: int = 4096  # width of the text tokens = model.text.dim (T5-XXL 4096, ViT-H-14 1024)
    text_len: int = 300  # text tokens per caption
    adaln: Optional[str] = None  # block | single; null: the preset's (model.dit.adaln)
    qk_norm: Optional[bool] = None  # null: the preset's (model.dit.qk_norm)
    mlp_ratio: Optional[float] = None  # null: the preset's (model.dit.mlp_ratio)
    video: VideoSpec = field(default_factory=VideoSpec)
    vae: VAESpec = field(default_factory=VAESpec)
    gpu: GPUSpec = field(default_factory=GPUSpec)
    num_gpus: int = 64
    zero_stage: int = 2
    sequence_parallel: int = 1  # Ulysses degree: each sample's tokens split over this many GPUs
    train: TrainSpec = field(default_factory=TrainSpec)
    sample: SampleSpec = field(default_factory=SampleSpec)
    memory: MemorySpec = field(default_factory=MemorySpec)


class PlanError(ValueError):
    pass


# ----- the pieces -------------------------------------------------------------------------
def latent_grid(video: VideoSpec, vae: VAESpec) -> tuple[int, int, int]:
    frames = max(1, round(video.seconds * video.fps))
    if vae.causal:
        t = 1 + math.ceil((frames - 1) / vae.temporal)
    else:
        t = math.ceil(frames / vae.temporal)
    return t, math.ceil(video.height / vae.spatial), math.ceil(video.width / vae.spatial)


def token_grid(latent: tuple[int, int, int], patch) -> tuple[int, int, int]:
    return tuple(math.ceil(s / int(p)) for s, p in zip(latent, patch))  # type: ignore[return-value]


def preset_dit(model: str) -> dict:
    """The `dit` section of conf/model/<model>.yaml: every option `spacetime run model=<model>`
    builds the DiT with (sizes, adaln, qk_norm, mlp_ratio, checkpointing, ...)."""
    from omegaconf import OmegaConf  # lazy: omegaconf ~0.15 s; CLI start-up 0.1 s, 9 s with eager imports

    path = MODEL_CONF / f"{model}.yaml"
    if not path.is_file():
        valid = ", ".join(sorted(p.stem for p in MODEL_CONF.glob("*.yaml")))
        raise PlanError(f"unknown model '{model}' (a file of conf/model/); valid: {valid}")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)["dit"]  # type: ignore[index]


def dit_config(cfg: PlanConfig):
    """The DiTConfig of the preset's file with this plan's data, text width and options."""
    from training.dit import DiTConfig  # lazy: CLI start-up 0.1 s, 9 s with eager imports

    opts = preset_dit(cfg.model)
    opts.update(patch_size=[int(p) for p in cfg.patch_size], in_channels=cfg.vae.channels,
                text_dim=cfg.text_dim, attention=cfg.attention)
    for key in ("adaln", "qk_norm", "mlp_ratio"):
        if getattr(cfg, key) is not None:
            opts[key] = getattr(cfg, key)
    if cfg.train.grad_checkpointing is not None:
        opts["grad_checkpointing"] = cfg.train.grad_checkpointing
    return DiTConfig(**opts)


def block_params(dit) -> int:
    from training.dit import count_params  # lazy: CLI start-up 0.1 s, 9 s with eager imports

    return count_params(replace(dit, depth=2)) - count_params(replace(dit, depth=1))


def state_bytes(psi: int, precision: str, zero_stage: int, shards: int) -> dict[str, float]:
    """Parameters, gradients and optimizer states per GPU, in bytes (ZeRO paper, Sec. 3/5)."""
    p, g, o = STATE_BYTES[precision]
    return {
        "params": p * psi / (shards if zero_stage >= 3 else 1),
        "grads": g * psi / (shards if zero_stage >= 2 else 1),
        "optimizer": o * psi / (shards if zero_stage >= 1 else 1),
    }


def activation_bytes(dit, tokens_per_gpu: float, precision: str, checkpointing: bool) -> float:
    """Saved activations per GPU for `tokens_per_gpu` tokens (micro batch x tokens / sp).

    Outside the blocks, per token: the final layer's three D-wide inputs and RoPE's cos/sin
    tables (fp32, head_dim / 2 each, shared by every block): 3 * word * D + 4 * head_dim.
    """
    a, b = ACT_BYTES_PER_TOKEN[dit.attention][precision]
    word, D = WORD_BYTES[precision], dit.hidden_size
    per_block = (a * D + b * dit.mlp_hidden) * tokens_per_gpu
    outside = (3 * word * D + 4 * dit.head_dim) * tokens_per_gpu
    if not checkpointing:
        return dit.depth * per_block + outside
    block_inputs = dit.depth * word * D * tokens_per_gpu
    return block_inputs + per_block + outside  # per_block: the one block recomputed in backward


def run_cost(steps: int, step_time_s: float, num_gpus: int, usd_per_hour: float) -> dict:
    gpu_hours = steps * step_time_s * num_gpus / 3600
    return {"gpu_hours": gpu_hours, "wall_days": steps * step_time_s / 86400,
            "usd": gpu_hours * usd_per_hour}


# ----- the plan ---------------------------------------------------------------------------
def make_plan(cfg: PlanConfig) -> dict[str, Any]:
    """Every figure of the report, as plain numbers (units in the key names)."""
    from training.dit import count_params  # lazy: CLI start-up 0.1 s, 9 s with eager imports
    from training.flops import forward_flops  # lazy: CLI start-up 0.1 s, 9 s with eager imports

    t, s, g = cfg.train, cfg.sample, cfg.gpu
    sp = cfg.sequence_parallel
    if t.precision not in STATE_BYTES:
        raise PlanError(f"train.precision must be one of {list(STATE_BYTES)}, got '{t.precision}'")
    if cfg.zero_stage not in (0, 1, 2, 3):
        raise PlanError(f"zero_stage must be 0-3, got {cfg.zero_stage}")
    if cfg.num_gpus < 1 or sp < 1 or cfg.num_gpus % sp:
        raise PlanError(f"num_gpus ({cfg.num_gpus}) must be a positive multiple of "
                        f"sequence_parallel ({sp})")
    for name, v in (("train.mfu", t.mfu), ("sample.mfu", s.mfu)):
        if not 0 < v <= 1:
            raise PlanError(f"{name} must be in (0, 1], got {v}")
    dit = dit_config(cfg)
    if dit.num_heads % sp:
        raise PlanError(f"sequence_parallel ({sp}) must divide the {dit.num_heads} attention "
                        f"heads of preset '{cfg.model}' (Ulysses splits heads across GPUs)")
    dp = cfg.num_gpus // sp
    per_step = t.micro_batch_size * dp
    if t.micro_batch_size < 1 or t.global_batch_size % per_step:
        raise PlanError(f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
                        f"micro_batch_size x data-parallel ranks ({t.micro_batch_size} x {dp})")
    accum = t.global_batch_size // per_step

    latent = latent_grid(cfg.video, cfg.vae)
    grid = token_grid(latent, cfg.patch_size)
    tokens = math.prod(grid)
    fwd = int(forward_flops(dit, grid, cfg.text_len))
    psi = count_params(dit)
    peak = g.bf16_tflops * 1e12

    # Compute and time
    train_per_sample = 3 * fwd
    step_flops = train_per_sample * t.global_batch_size
    step_time = step_flops / (cfg.num_gpus * peak * t.mfu)
    run = run_cost(t.steps, step_time, cfg.num_gpus, g.usd_per_hour)

    # Memory per GPU
    tokens_per_gpu = t.micro_batch_size * math.ceil(tokens / sp)
    states = state_bytes(psi, t.precision, cfg.zero_stage, cfg.num_gpus)
    zero3 = (2 * block_params(dit) * STATE_BYTES[t.precision][0]) if cfg.zero_stage == 3 else 0
    frozen = 2 * cfg.memory.frozen_params
    overhead = cfg.memory.overhead_gib * GIB
    static = sum(states.values()) + zero3 + frozen + overhead
    act = {ck: activation_bytes(dit, tokens_per_gpu, t.precision, ck) for ck in (False, True)}
    chosen = act[dit.grad_checkpointing]
    total = static + chosen
    capacity = g.memory_gib * GIB
    per_sample_act = chosen / t.micro_batch_size
    max_micro = int((capacity - static) // per_sample_act) if capacity > static else 0

    # Generation
    passes = 2 if s.cfg else 1
    clip_flops = s.steps * passes * fwd
    clip_gpu_s = clip_flops / (peak * s.mfu)
    clips_per_min = 60.0 / cfg.video.seconds
    frames = max(1, round(cfg.video.seconds * cfg.video.fps))

    return {
        "inputs": asdict(cfg),
        "model": {"preset": cfg.model, "params": psi, "hidden_size": dit.hidden_size,
                  "depth": dit.depth, "num_heads": dit.num_heads, "mlp_ratio": dit.mlp_ratio,
                  "adaln": dit.adaln, "qk_norm": dit.qk_norm,
                  "grad_checkpointing": dit.grad_checkpointing,
                  "block_params": block_params(dit)},
        "tokens": {"frames": frames, "latent_grid": list(latent), "token_grid": list(grid),
                   "per_sample": tokens, "text": cfg.text_len,
                   "padded": any(a % int(p) for a, p in zip(latent, cfg.patch_size))},
        "compute": {"forward_flops_per_sample": fwd,
                    "train_flops_per_sample": train_per_sample,
                    "hardware_flops_per_sample": (4 if dit.grad_checkpointing else 3) * fwd,
                    "train_flops_per_step": step_flops,
                    "data_parallel": dp, "grad_accum": accum,
                    "step_time_s": step_time,
                    "tokens_per_s_per_gpu":
                        t.global_batch_size * tokens / step_time / cfg.num_gpus},
        "run": {"steps": t.steps, **run, "usd_per_gpu_hour": g.usd_per_hour,
                "train_flops_total": step_flops * t.steps},
        "memory_gib": {**{k: v / GIB for k, v in states.items()}, "zero3_gathered": zero3 / GIB,
                       "frozen": frozen / GIB, "overhead": overhead / GIB,
                       "activations_no_ckpt": act[False] / GIB,
                       "activations_ckpt": act[True] / GIB,
                       "total": total / GIB, "capacity": g.memory_gib,
                       "total_no_ckpt": (static + act[False]) / GIB,
                       "total_ckpt": (static + act[True]) / GIB},
        "fits": total <= capacity,
        "max_micro_batch_that_fits": max_micro,
        "generation": {"flops_per_clip": clip_flops, "gpu_s_per_clip": clip_gpu_s,
                       "gpu_s_per_minute": clip_gpu_s * clips_per_min,
                       "usd_per_minute": clip_gpu_s * clips_per_min / 3600 * g.usd_per_hour,
                       "clip_seconds": cfg.video.seconds},
    }


# ----- the report -------------------------------------------------------------------------
def _si(x: float, unit: str = "") -> str:
    for div, suffix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g} {suffix}{unit}"
    return f"{x:.3g} {unit}".rstrip()


def _usd(x: float) -> str:
    return f"${x:,.0f}" if x >= 100 else f"${x:,.2f}"


def format_plan(p: dict) -> str:
    i, m, tk, c, r, mem, gen = (p["inputs"], p["model"], p["tokens"], p["compute"], p["run"],
                                p["memory_gib"], p["generation"])
    v, vae, g, t, s = i["video"], i["vae"], i["gpu"], i["train"], i["sample"]
    ck = m["grad_checkpointing"]
    lines = [
        f"model     DiT-{m['preset']}: {m['params'] / 1e9:.3f}B params (D={m['hidden_size']}, "
        f"depth={m['depth']}, heads={m['num_heads']}, {i['attention']} attention, "
        f"adaln={m['adaln']}), "
        f"patch {tuple(i['patch_size'])}, "
        f"text {i['text_len']} x {i['text_dim']}",
        f"video     {v['seconds']:g} s x {v['fps']:g} fps = {tk['frames']} frames at "
        f"{v['width']}x{v['height']}; VAE {vae['temporal']}x{vae['spatial']}x{vae['spatial']}, "
        f"{vae['channels']} ch{' (causal)' if vae['causal'] else ''}",
        f"tokens    latent {tuple(tk['latent_grid'])} -> grid {tuple(tk['token_grid'])} = "
        f"{tk['per_sample']:,} tokens per clip"
        + (" (padded to the patch)" if tk["padded"] else ""),
        f"cluster   {i['num_gpus']} x {g['name']} ({g['bf16_tflops']:g} TFLOP/s bf16 dense, "
        f"{g['memory_gib']:g} GiB, ${g['usd_per_hour']:.2f}/GPU-h); ZeRO-{i['zero_stage']}, "
        f"sequence parallel {i['sequence_parallel']}, data parallel {c['data_parallel']}",
        "",
        "compute per step",
        f"  forward          {_si(c['forward_flops_per_sample'], 'FLOP')} per clip",
        f"  train            {_si(c['train_flops_per_sample'], 'FLOP')} per clip (3x forward)"
        + (f"; {_si(c['hardware_flops_per_sample'], 'FLOP')} executed with recomputation"
           if ck else ""),
        f"  step             {_si(c['train_flops_per_step'], 'FLOP')} = {t['global_batch_size']} "
        f"clips (micro batch {t['micro_batch_size']} x {c['data_parallel']} ranks x "
        f"{c['grad_accum']} accumulation)",
        "",
        f"memory per GPU (GiB, {t['precision']})",
        f"  params {mem['params']:.2f} + grads {mem['grads']:.2f} + optimizer "
        f"{mem['optimizer']:.2f}" + (f" + gathered {mem['zero3_gathered']:.2f}"
                                     if mem["zero3_gathered"] else "")
        + (f" + frozen {mem['frozen']:.2f}" if mem["frozen"] else "")
        + f" + reserve {mem['overhead']:.1f}",
        f"  activations      {mem['activations_no_ckpt']:.2f} without checkpointing -> total "
        f"{mem['total_no_ckpt']:.2f}",
        f"                   {mem['activations_ckpt']:.2f} with checkpointing    -> total "
        f"{mem['total_ckpt']:.2f}",
        f"  chosen ({'checkpointing' if ck else 'no checkpointing'}): {mem['total']:.2f} of "
        f"{mem['capacity']:g} GiB -> {'FITS' if p['fits'] else 'DOES NOT FIT'}; largest micro "
        f"batch that fits: {p['max_micro_batch_that_fits']}",
        "",
        f"training at {t['mfu']:.0%} MFU",
        f"  step time        {c['step_time_s']:.3g} s ({c['tokens_per_s_per_gpu']:,.0f} tokens/s "
        f"per GPU)",
        f"  {r['steps']:,} steps    {r['gpu_hours']:,.0f} GPU-hours, {r['wall_days']:.3g} days "
        f"wall-clock, {_usd(r['usd'])}",
        "",
        f"generation at {s['mfu']:.0%} MFU, {s['steps']} steps"
        + (" with classifier-free guidance (2 passes)" if s["cfg"] else ""),
        f"  per {gen['clip_seconds']:g} s clip     {gen['gpu_s_per_clip']:,.1f} GPU-s, "
        f"{_si(gen['flops_per_clip'], 'FLOP')}",
        f"  per minute       {gen['gpu_s_per_minute']:,.0f} GPU-s "
        f"({gen['gpu_s_per_minute'] / 3600:.3g} GPU-h), {_usd(gen['usd_per_minute'])} "
        f"(VAE decode and text encoding not counted)",
    ]
    return "\n".join(lines)


# ----- CLI --------------------------------------------------------------------------------
def register() -> None:
    from hydra.core.config_store import ConfigStore  # lazy: hydra ~0.4 s; CLI start-up 0.1 s, 9 s with eager imports

    ConfigStore.instance().store(name="plan_schema", node=PlanConfig)


def main(argv: list[str]) -> int:
    import hydra  # lazy: hydra ~0.4 s; CLI start-up 0.1 s, 9 s with eager imports
    from omegaconf import DictConfig, OmegaConf  # lazy: omegaconf ~0.15 s; CLI start-up 0.1 s, 9 s with eager imports

    conf_dir = Path(__file__).resolve().parent.parent / "conf" / "plan"
    as_json = "--json" in argv
    rest = [a for a in argv if a != "--json"]
    register()
    sys.argv = [sys.argv[0], *rest]
    outcome = {"code": 0}

    @hydra.main(config_path=str(conf_dir), config_name="config", version_base="1.3")
    def entry(dcfg: DictConfig) -> None:
        cfg: PlanConfig = OmegaConf.to_object(dcfg)  # type: ignore[assignment]
        try:
            plan = make_plan(cfg)
        except (PlanError, ValueError) as e:
            print(f"spacetime plan: {e}", file=sys.stderr)
            outcome["code"] = 2
            return
        print(json.dumps(plan, indent=2) if as_json else format_plan(plan))

    entry()
    return outcome["code"]
