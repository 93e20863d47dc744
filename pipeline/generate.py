"""`spacetime generate`: videos from a trained model of a run, at any length and size.

    GenerateConfig (what was asked)
      --resolve_source--> which weights: a run's latest complete train stage, a named stage,
                          a checkpoint step of it, or a path (reads JSON records only)
      --plan_shape------> frames, size, fps, the latent grid, the timestep shift, whether the
                          duration is beyond training; a bad request raises GenerateError here,
                          naming what would work, before any weights are loaded
      --load, sample----> training.evaluation.generate.generate_videos (decoded through the
                          run's VAE when the model was trained on latents)
      --write-----------> <out>/sample-NN.mp4 + generation.json (request, resolution, samples)

Which run: ``--run RUN_ID`` under ``run.root`` (``runs/<id>/lineage.json``), default the
latest (``runs/latest.json``). A train stage is one whose output holds a model's
configuration (``model_config.json``, or ``info.json`` with ``model`` and ``train``
sections); the latest is the last of them in the lineage's (topological) order with a
``_SUCCESS.json``, so a chain of training stages yields its final one. ``--stage NAME`` picks a
stage of the run by name (or a ``stages/<name>-<hash12>`` directory by its name),
``--checkpoint STEP`` one of its DeepSpeed tags, ``--checkpoint PATH`` a training output or a
tag anywhere (no run needed).

Defaults: the training's frame count, size and fps (``train.data.target_fps``, else the run's
``eval.fps``), and the run's eval sampler settings (``eval.sample_steps``, ``eval.cfg_scale``).
Video j of a prompt starts from the noise of seed ``seed + j``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from data.checks import check_ranges, from_dict
from data.storage import SUCCESS, has_scheme, write_json_atomic
from data.video_io import write_mp4
from pipeline.provenance import new_run_id
from training.evaluation.evaluate import CheckpointRef, EvalConfig, load_checkpoint, resolve_checkpoints, train_configs
from training.evaluation.generate import SamplerConfig, generate_videos
from training.evaluation.parallel import on_sequence_parallel_workers
from training.flops import token_grid
from training.flow import FlowConfig, shift_for
from training.latent.space import load_latent_space
from training.latent.vae import latent_shape
from training.ulysses import apply_sequence_parallel

RESULT = "generation.json"


class GenerateError(ValueError):
    """A request that cannot be served; raised before any weights are loaded."""


@dataclass
class GenerateConfig:
    """What `spacetime generate` was asked (None: the model's or the run's default)."""

    prompts: list[str] = field(default_factory=list)
    seconds: Optional[float] = None  # duration; frames = round(seconds * fps)
    frames: Optional[int] = None  # or the frame count itself
    height: Optional[int] = None
    width: Optional[int] = None
    fps: Optional[float] = None
    guidance: Optional[float] = None  # classifier-free guidance scale
    steps: Optional[int] = None  # sampler steps
    seed: int = 0
    negative_prompt: str = ""  # the guidance's unconditional branch
    num_samples: int = 1  # videos per prompt (seeds seed, seed + 1, ...)
    run: Optional[str] = None  # a run id under run.root; None: the latest run
    stage: Optional[str] = None  # a train stage of the run (name, or a stages/ directory name)
    checkpoint: str = "latest"  # latest | a step number | a path (training output or tag)
    use_ema: bool = True
    out: Optional[str] = None  # output directory; None: <run.root>/generated/<id>
    batch_size: int = 1
    device: Optional[str] = None  # None: cuda when available, else cpu
    decode_chunk: Optional[int] = None  # latent frames per VAE decode chunk (None: as trained)
    # > 1: sample on this many Ray workers, each sample's tokens split across them (Ulysses)
    sequence_parallel: int = 1

    def __post_init__(self) -> None:
        check_ranges(self, seconds="> 0", frames=">= 1", height=">= 1", width=">= 1", fps="> 0",
                     guidance=">= 0", steps=">= 1", num_samples=">= 1", batch_size=">= 1",
                     decode_chunk=">= 0", sequence_parallel=">= 1")
        if not self.prompts or not all(isinstance(p, str) and p.strip() for p in self.prompts):
            raise GenerateError("generate needs a prompt: spacetime generate \"a red ball bouncing\" [flags]")
        if self.seconds is not None and self.frames is not None:
            raise GenerateError("give --seconds or --frames, not both")


@dataclass(frozen=True)
class Source:
    """Which weights: the checkpoint and where it was found."""

    ref: CheckpointRef
    run_id: Optional[str] = None
    stage: Optional[str] = None
    run_config: Optional[dict] = None  # the run's resolved config (lineage), for defaults


# ----- which weights ----------------------------------------------------------------------------
def _is_train_output(path: Path) -> bool:
    if (path / "model_config.json").exists():
        return True
    info = path / "info.json"
    if not info.exists():
        return False
    return {"model", "train"} <= set(json.loads(info.read_text()).get("config", {}))


def _ref(checkpoint: str, train_dir: Path, where: str) -> CheckpointRef:
    try:
        return resolve_checkpoints(EvalConfig(checkpoint=checkpoint), train_dir)[0]
    except FileNotFoundError as e:
        raise GenerateError(f"{where}: {str(e).replace('eval.checkpoint', '--checkpoint')}") from None


def _here(root: Path, recorded: str) -> Path:
    """A stage directory the lineage recorded, or the same one under `root` (moved or copied since)."""
    p = Path(recorded)
    return p if p.exists() or not (root / "stages" / p.name).exists() else root / "stages" / p.name


def _runs(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "runs").glob("*") if (p / "lineage.json").exists())


def resolve_source(cfg: GenerateConfig, root: str | Path) -> Source:
    """The checkpoint `cfg` names under the run root `root`; reads JSON records only."""
    ck = str(cfg.checkpoint).strip()
    if ck != "latest" and not ck.isdigit():  # a path: no run needed
        if cfg.run or cfg.stage:
            raise GenerateError(f"--checkpoint {ck} is a path and names the weights itself; drop --run/--stage")
        return Source(_ref(ck, Path(ck), "--checkpoint"))
    if has_scheme(root):
        raise GenerateError(f"run.root={root} is a bucket: generate reads a local run root; copy the train "
                            f"stage's output here and pass --checkpoint PATH")
    root = Path(root)
    if cfg.stage and "-" in cfg.stage and (root / "stages" / cfg.stage).is_dir():  # a stage directory
        d = root / "stages" / cfg.stage
        if not _is_train_output(d):
            raise GenerateError(f"{d} is not a training stage's output (no model_config.json)")
        _complete(d, ck, cfg.stage)
        return Source(_ref(ck, d, f"stage {cfg.stage}"), stage=cfg.stage.rsplit("-", 1)[0])
    runs = _runs(root)
    run_id = cfg.run
    if run_id is None:
        if not (root / "runs" / "latest.json").exists():
            raise GenerateError(f"no runs under run.root={root} (no runs/latest.json): train one with "
                                f"`spacetime run`, set run.root, or pass --checkpoint PATH")
        run_id = json.loads((root / "runs" / "latest.json").read_text())["run_id"]
    if run_id not in runs:
        raise GenerateError(f"unknown run {run_id!r} under run.root={root}; runs: "
                            f"{', '.join(runs[-10:]) or 'none'}")
    lineage = json.loads((root / "runs" / run_id / "lineage.json").read_text())
    trains = [(n, _here(root, rec["path"])) for n, rec in lineage.get("stages", {}).items()
              if _is_train_output(_here(root, rec["path"]))]
    if cfg.stage:
        named = [t for t in trains if t[0] == cfg.stage]
        if not named:
            raise GenerateError(f"run {run_id} has no train stage {cfg.stage!r}; its train stages: "
                                f"{', '.join(n for n, _ in trains) or 'none'} (stages: "
                                f"{', '.join(lineage.get('stages', {}))})")
        name, d = named[0]
        _complete(d, ck, name)
    else:
        done = [t for t in trains if (t[1] / SUCCESS).exists()]
        if not done and not (ck.isdigit() and trains):
            states = ", ".join(f"{n}={lineage['stages'][n].get('state')}" for n, _ in trains)
            raise GenerateError(f"run {run_id} has no complete train stage ({states or 'none ran'}); finish it "
                                f"(`spacetime run`) or pass --checkpoint STEP for one of its saved tags")
        name, d = (done or trains)[-1]
    return Source(_ref(ck, d, f"run {run_id} stage {name}"), run_id=run_id, stage=name,
                  run_config=lineage.get("config"))


def _complete(d: Path, ck: str, name: str) -> None:
    if ck == "latest" and not (d / SUCCESS).exists():
        raise GenerateError(f"train stage {name} ({d}) is not complete (no {SUCCESS}); pass --checkpoint STEP "
                            f"for one of its saved tags")


# ----- the request, checked against the model -------------------------------------------------
def frame_rule(tc: int, pt: int, latent: bool):
    """(does a frame count fit, what the rule is) for VAE temporal compression `tc` (latent)
    and the DiT's temporal patch `pt`."""
    if not latent:
        return (lambda n: n >= pt and n % pt == 0), f"a multiple of the patch's {pt} frames (model.dit.patch_size)"

    def ok(n: int) -> bool:
        return n >= 1 and (n - 1) % tc == 0 and (1 + (n - 1) // tc) % pt == 0

    rule = f"1 + k*{tc} frames (the VAE's temporal compression {tc})"
    return ok, rule + (f" with 1 + k a multiple of the patch's {pt} latent frames" if pt > 1 else "")


def nearest(n: int, ok, limit: int = 100_000) -> tuple[Optional[int], Optional[int]]:
    """The valid values just below and just above `n`."""
    below = next((m for m in range(n - 1, 0, -1) if ok(m)), None)
    above = next((m for m in range(n + 1, n + limit) if ok(m)), None)
    return below, above


def _secs(frames: int, fps: float) -> str:
    return f"{round(frames / fps, 4):g}"


def plan_shape(cfg: GenerateConfig, mcfg, tcfg: dict, defaults: EvalConfig) -> dict:
    """The resolved shape and sampler settings of `cfg` for a model (`mcfg`, `tcfg` as
    `train_configs` gives them); raises GenerateError naming what would work."""
    latent = tcfg.get("latent")
    tc, hs, ws = (int(c) for c in latent["compression"]) if latent else (1, 1, 1)
    pt, ph, pw = (int(p) for p in mcfg.dit.patch_size)
    fps = float(cfg.fps or tcfg["data"].get("target_fps") or defaults.fps)
    if cfg.frames is not None:
        frames = int(cfg.frames)
        asked = f"--frames {frames}"
    elif cfg.seconds is not None:
        frames = round(cfg.seconds * fps)
        asked = f"--seconds {cfg.seconds:g} at {fps:g} fps = {frames} frames"
        if frames < 1:
            raise GenerateError(f"--seconds {cfg.seconds:g} at {fps:g} fps is less than one frame")
    else:
        frames = int(tcfg["num_frames"])
        asked = f"the training's {frames} frames"
    ok, rule = frame_rule(tc, pt, latent is not None)
    if not ok(frames):
        lo, hi = nearest(frames, ok)
        alts = [f"--seconds {_secs(m, fps)} ({m} frames)" for m in (lo, hi) if m is not None]
        raise GenerateError(f"{asked}, which this model cannot take: it needs {rule}. "
                            f"Nearest that work at {fps:g} fps: {' or '.join(alts)}"
                            + (f"; or --frames {hi}" if hi is not None else ""))
    size = {}
    for key, value, s, p in (("height", cfg.height, hs, ph), ("width", cfg.width, ws, pw)):
        v = int(value or tcfg[key])
        m = s * p
        if v % m:
            what = f"the VAE's spatial compression {s} x the patch's {p}" if latent else f"the patch's {p}"
            lo, hi = (v // m) * m, (v // m + 1) * m
            raise GenerateError(f"--{key} {v} is not a multiple of {m} ({what}); nearest that work: "
                                + " or ".join(str(x) for x in (lo, hi) if x > 0))
        size[key] = v
    H, W = size["height"], size["width"]
    channels = int(latent["channels"]) if latent else int(mcfg.dit.in_channels or 3)
    grid = latent_shape((frames, H, W), (tc, hs, ws)) if latent else (frames, H, W)
    tokens = math.prod(token_grid(mcfg.dit, grid))
    flow = from_dict(FlowConfig, tcfg["flow"])
    shapes = [(tcfg["num_frames"], tcfg["height"], tcfg["width"])] + [
        (b["num_frames"], b["height"], b["width"]) for b in tcfg["data"].get("buckets") or []]
    trained_frames = max(s[0] for s in shapes)
    train_fps = tcfg["data"].get("target_fps")
    trained_seconds = trained_frames / train_fps if train_fps else None
    seconds = frames / fps
    beyond = frames > trained_frames or (trained_seconds is not None and seconds > trained_seconds + 1e-9)
    warnings = []
    if beyond:
        at = f", {trained_seconds:g} s at {train_fps:g} fps" if trained_seconds else ""
        warnings.append(f"{seconds:g} s ({frames} frames at {fps:g} fps) is longer than the model was trained on "
                        f"({trained_frames} frames{at}): sampling beyond the training length")
    if H * W > max(s[1] * s[2] for s in shapes):
        warnings.append(f"{H}x{W} is larger than the model was trained on ({tcfg['height']}x{tcfg['width']})")
    sampler = SamplerConfig(steps=int(cfg.steps or defaults.sample_steps),
                            guidance=float(defaults.cfg_scale if cfg.guidance is None else cfg.guidance),
                            shift=float(shift_for(flow, tokens)), prediction=flow.prediction,
                            x0_t_min=flow.x0_t_min)
    return {"frames": frames, "height": H, "width": W, "fps": fps, "seconds": seconds,
            "latent": latent is not None, "shape": [channels, *grid], "tokens": tokens,
            "sampler": asdict(sampler), "beyond_training": beyond,
            "trained": {"frames": trained_frames, "height": tcfg["height"], "width": tcfg["width"],
                        "fps": train_fps, "seconds": trained_seconds},
            "warnings": warnings}


def run_vae(latent: dict, root: str | Path) -> dict:
    """The latent record with our VAE's directory checked: as recorded, or the same stage
    directory under this run root (a root copied or moved since); the VAE's own identity check
    (`load_latent_space`) still refuses other weights."""
    c = latent["config"]
    if c.get("kind") != "ours":
        return latent
    recorded = Path(c.get("path") or "")
    for d in (recorded, Path(root) / "stages" / recorded.name):
        if (d / "vae_config.json").exists():
            return {**latent, "config": {**c, "path": str(d)}}
    raise GenerateError(f"the model was trained on latents of the VAE at {recorded}, which is gone (no "
                        f"vae_config.json there or in {Path(root) / 'stages' / recorded.name}): rerun the vae stage "
                        f"or restore that directory")


def pick_device(name: Optional[str]) -> torch.device:
    """`name` (cpu, cuda, cuda:N), or cuda when there is a GPU; GenerateError for one that is not here."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(name)
    except RuntimeError:
        raise GenerateError(f"--device {name!r} is not a device (cpu, cuda, cuda:N)") from None
    if d.type == "cuda" and (not torch.cuda.is_available() or (d.index or 0) >= torch.cuda.device_count()):
        raise GenerateError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s); use --device cpu")
    return d


def prepare(cfg: GenerateConfig, root: str | Path) -> tuple[Source, dict]:
    """Everything short of loading weights: the source and the resolved request."""
    src = resolve_source(cfg, root)
    try:
        mcfg, tcfg = train_configs(src.ref.train_dir)
    except FileNotFoundError as e:
        raise GenerateError(f"{src.ref.train_dir} has neither model_config.json nor info.json: {e}") from None
    eval_cfg = (src.run_config or {}).get("eval")
    known = {f.name for f in fields(EvalConfig)}
    defaults = from_dict(EvalConfig, {k: v for k, v in eval_cfg.items() if k in known}) if eval_cfg else EvalConfig()
    plan = plan_shape(cfg, mcfg, tcfg, defaults)
    heads = mcfg.dit.num_heads  # the degree splits the heads (one worker per rank of the group)
    if heads % cfg.sequence_parallel:
        valid = [d for d in range(1, heads + 1) if heads % d == 0]
        raise GenerateError(f"--sequence-parallel {cfg.sequence_parallel} must divide the model's {heads} "
                            f"attention heads (Ulysses splits them over the workers): use one of {valid}")
    plan["sequence_parallel"] = cfg.sequence_parallel
    plan["vae"] = run_vae(tcfg["latent"], root)["config"].get("path") if tcfg.get("latent") else None
    plan.update(device=str(pick_device(cfg.device)), run_id=src.run_id, stage=src.stage, train_dir=str(src.ref.train_dir),
                checkpoint={"kind": src.ref.kind, "path": str(src.ref.path), "step": src.ref.step},
                defaults_from="the run's eval config" if eval_cfg else "EvalConfig defaults")
    return src, plan


# ----- the generation -------------------------------------------------------------------------
def _generate_work(job: dict, device, group) -> tuple[np.ndarray, dict]:
    """One sequence-parallel worker's share of a generation (every rank runs it alike)."""
    videos, weights = generate_here(job, device, group)
    return videos, {"weights": weights}


def generate_here(job: dict, device: torch.device, sequence_group=None) -> tuple[np.ndarray, str]:
    """Load the weights (and the VAE) on `device` and sample `job`'s videos -> uint8 (N, T, H, W, 3)
    and which weights. Under a sequence-parallel group every rank of it runs this alike."""
    model, mcfg, tcfg, weights = load_checkpoint(job["ref"], device, job["use_ema"])
    if sequence_group is not None:
        apply_sequence_parallel(model.dit, sequence_group)
    space = load_latent_space(job["vae"], device) if job["vae"] else None
    videos = generate_videos(model, mcfg.text.build_tokenizer(), job["prompts"], job["seeds"], job["shape"],
                             SamplerConfig(**job["sampler"]), device, space, job["negative"],
                             job["batch_size"])  # (N, T, H, W, 3)
    return videos.numpy(), weights


def generate(cfg: GenerateConfig, root: str | Path, log=print, cluster=None) -> dict:
    """Validate, load, sample, write. Returns the record written to <out>/generation.json.
    cluster: where sequence-parallel generation finds Ray (``cluster.address``)."""
    t0 = time.time()
    src, plan = prepare(cfg, root)
    for w in plan["warnings"]:
        log(f"spacetime: warning: {w}")
    out = Path(cfg.out) if cfg.out else Path(root) / "generated" / new_run_id()
    device = torch.device(plan["device"])
    log(f"generate: {len(cfg.prompts)} prompt(s) x {cfg.num_samples} from {src.ref.kind} weights of "
        f"{plan['train_dir']} (step {src.ref.step}): {plan['frames']} frames {plan['height']}x{plan['width']} at "
        f"{plan['fps']:g} fps ({plan['seconds']:g} s), {plan['tokens']} tokens, on {device}")
    vae, latent = None, train_configs(src.ref.train_dir)[1].get("latent")
    if latent:
        vae = run_vae(latent, root)
        if cfg.decode_chunk is not None:
            vae["config"] = {**vae["config"], "chunk_frames": cfg.decode_chunk}
    prompts = [p for p in cfg.prompts for _ in range(cfg.num_samples)]
    seeds = [cfg.seed + j for _ in cfg.prompts for j in range(cfg.num_samples)]
    job = {"ref": src.ref, "use_ema": cfg.use_ema, "vae": vae, "prompts": prompts, "seeds": seeds,
           "shape": tuple(plan["shape"]), "sampler": plan["sampler"], "negative": cfg.negative_prompt,
           "batch_size": cfg.batch_size}
    if cfg.sequence_parallel > 1:
        videos, rec = on_sequence_parallel_workers(partial(_generate_work, job), cfg.sequence_parallel,
                                                   plan["device"], getattr(cluster, "address", None))
        weights = rec["weights"]
    else:
        videos, weights = generate_here(job, device)
    out.mkdir(parents=True, exist_ok=True)
    samples = []
    for i, (prompt, seed, v) in enumerate(zip(prompts, seeds, videos)):
        path = out / f"sample-{i:02d}.mp4"
        write_mp4(path, v, fps=plan["fps"])
        samples.append({"index": i, "prompt": prompt, "seed": seed, "path": path.name,
                        "frames": int(v.shape[0]), "height": int(v.shape[1]), "width": int(v.shape[2])})
    record = {"request": asdict(cfg), "resolved": {**plan, "weights": weights},
              "samples": samples, "duration_s": time.time() - t0}
    write_json_atomic(out / RESULT, record)
    log(f"generate: {len(samples)} video(s) in {out} ({RESULT}) in {record['duration_s']:.1f}s")
    return {**record, "out": str(out)}
