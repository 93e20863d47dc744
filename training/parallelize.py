"""Parallelism, applied from outside the model: the one place that wraps a pure ``nn.Module``.

``parallelize`` takes the model built by ``ModelConfig.build()`` and the configs and returns the
DeepSpeed engine the training loop drives: the ZeRO stage and its buckets, offload, gradient
accumulation and clipping, bf16 and the optimizer (DeepSpeed's CPU Adam under ZeRO-Offload)
all come from ``DeepSpeedConfig``, turned into DeepSpeed's own config by ``build_ds_config``.
The model files and the loop hold no distributed code besides the collectives of the step
itself; Ray Train (``training.launch``) makes the process group before this runs.

Sequence parallelism (DeepSpeed Ulysses: the token axis of the DiT split across the ranks of a
group, all-to-all around each attention; the pieces in ``training.ulysses``) is applied here too,
before the engine is built, so that the DiT stays a pure module and the loop does not change.

``config_file`` is a whole DeepSpeed JSON, the base of what DeepSpeed gets (as the HF Trainer
takes one): every key this project does not set passes through, and its values for the keys
set here only as defaults (bucket sizes, ``pin_memory``, ``steps_per_print``) win. The keys
this project owns (``OWNED``: batch sizes, accumulation, clipping, ZeRO stage, offload devices,
precision, optimizer and scheduler) come from its config: the file may leave them out, say
``"auto"`` (filled in here) or give the same value; a different one is an error naming the
key to set instead, raised when the config is loaded. The file's content, not its path, is in
the train stage's hash (``file_config``, read when the config resolves).

``extra`` is the escape hatch: any raw DeepSpeed keys, deep-merged last (over ours and the
file's), so users can reach options ``DeepSpeedConfig`` does not name without editing code.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from data.checks import check_ranges
from training.ulysses import apply_sequence_parallel


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2  # 0, 1, 2 or 3
    grad_clip: float = 1.0
    grad_accum: int = 1
    offload_optimizer: bool = False  # ZeRO-Offload of optimizer states to CPU
    offload_param: bool = False  # ZeRO-3 parameter offload to CPU
    # Communication bucket size in elements (reduce / all-gather / ZeRO-3 prefetch).
    # DeepSpeed's default (5e8) allocates GBs of buffers per rank, far more than small models
    # need; raise it on large GPU runs for fewer, larger collectives.
    bucket_elements: int = 50_000_000
    extra: dict[str, Any] = field(default_factory=dict)  # raw DeepSpeed keys, merged last
    config_file: Optional[str] = None  # a DeepSpeed JSON, the base (module docstring); not hashed
    # config_file's content: filled in when the config resolves (pipeline.config), or here when
    # built in Python; hashed in the path's place
    file_config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.config_file and not self.file_config:
            self.file_config = read_json_config(self.config_file)
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0-3, got {self.zero_stage}")
        check_ranges(self, grad_clip=">= 0", grad_accum=">= 1", bucket_elements=">= 1")
        if self.offload_param and self.zero_stage != 3:
            raise ValueError("offload_param needs zero_stage=3")


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_json_config(path: str | None) -> dict:
    """A DeepSpeed JSON config file's content ({} for no path), or ValueError naming it."""
    if not path:
        return {}
    try:
        out = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"config_file {path!r}: {e}") from None
    if not isinstance(out, dict):
        raise ValueError(f"config_file {path!r}: a DeepSpeed config is a JSON object, got "
                         f"{type(out).__name__}")
    return out


BATCH = "train.global_batch_size, cluster.num_workers and deepspeed.grad_accum"
# DeepSpeed keys this project owns (a prefix owns what is under it) -> the config keys they come
# from. A config_file leaves them out, says "auto" or agrees; anything else is an error.
OWNED = {
    "train_micro_batch_size_per_gpu": BATCH,
    "train_batch_size": BATCH,
    "gradient_accumulation_steps": "deepspeed.grad_accum",
    "gradient_clipping": "deepspeed.grad_clip",
    "zero_optimization.stage": "deepspeed.zero_stage",
    "zero_optimization.offload_optimizer.device": "deepspeed.offload_optimizer",
    "zero_optimization.offload_param.device": "deepspeed.offload_param",
    "bf16.enabled": "train.precision",
    "fp16.enabled": "train.precision (fp32 or bf16)",
    "amp": "train.precision (fp32 or bf16)",
    "optimizer": "train.lr and train.weight_decay (the trainer's AdamW)",
    "scheduler": "train's LR schedule (the trainer's LambdaLR)",
}
ALWAYS_OURS = ("train_micro_batch_size_per_gpu", "train_batch_size", "optimizer", "scheduler", "amp")
OFF = (False, None, "none")  # a file's value for an owned key this project leaves unset


def _leaves(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict) and v:
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _lookup(d: dict, dotted: str) -> Any:
    for k in dotted.split("."):
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _owner(dotted: str) -> str | None:
    return next((p for p in OWNED if dotted == p or dotted.startswith(p + ".")), None)


def merge_file_config(file: dict, ours: dict) -> dict:
    """`ours` (the keys this project sets) over a DeepSpeed config file's content: the file's
    "auto" values dropped (ours fill them), its other keys kept, its values for our default-only
    keys winning. ValueError naming the first owned key the file gives another value."""
    clean = copy.deepcopy(file)
    for key, value in list(_leaves(file)):
        owner = _owner(key)
        if value == "auto":
            *parents, leaf = key.split(".")
            node = clean
            for p in parents:
                node = node[p]
            node.pop(leaf)
            if owner is None and _lookup(ours, key) is None:
                raise ValueError(f"config_file: {key} is 'auto', but this project does not set it; "
                                 f"give it a value")
            continue
        if owner is None:
            continue
        have = _lookup(ours, key)
        if owner in ALWAYS_OURS or not (value == have or (have is None and value in OFF)):
            raise ValueError(f"config_file sets {key}={json.dumps(value)}, but this project sets it "
                             f"from {OWNED[owner]}"
                             + (f" (here {json.dumps(have)})" if owner not in ALWAYS_OURS else "")
                             + f"; set that instead, or leave {key} out of the file (or 'auto')")
    return _merge(ours, clean)


def build_ds_config(cfg: DeepSpeedConfig, micro_batch: int, precision: str) -> dict:
    """precision: fp32 | bf16. Returns the dict handed to deepspeed.initialize: ours over
    ``cfg.file_config`` (``merge_file_config``), ``cfg.extra`` over both."""
    if cfg.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"deepspeed.zero_stage must be 0-3, got {cfg.zero_stage}")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"train.precision must be fp32 or bf16, got '{precision}'")
    b = int(cfg.bucket_elements)
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage in (1, 2):
        # reduce_scatter off: DeepSpeed then all-reduces each gradient bucket in place and keeps
        # its own partition. On (its default) it all-reduces too (use_multi_rank_bucket_allreduce),
        # but first slices the bucket per rank, copies the slices into a new flat tensor and copies
        # the result back: two more passes over every gradient for the same communication
        # (benchmarks/bench_training.py (c), README "Training benchmarks").
        zero.update(reduce_bucket_size=b, allgather_bucket_size=b, reduce_scatter=False)
    if cfg.zero_stage == 3:
        zero.update(reduce_bucket_size=b, stage3_prefetch_bucket_size=b,
                    stage3_param_persistence_threshold=min(b, 100_000),
                    stage3_max_live_parameters=b, stage3_max_reuse_distance=b)
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if cfg.offload_param:
        if cfg.zero_stage != 3:
            raise ValueError("deepspeed.offload_param needs zero_stage=3")
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    ds = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _merge(merge_file_config(dict(cfg.file_config), ds), dict(cfg.extra))


def adamw(params: list[dict], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """torch's AdamW over the parameter groups, with its fused kernel where every parameter's
    device has one (cpu, cuda): one pass over each tensor instead of the default loop's dozen
    elementwise ops. On a ZeRO partition (one flat fp32 tensor) on this CPU it steps 4.8x faster
    than the default and 3x faster than foreach (benchmarks/bench_training.py (c))."""
    devices = {p.device.type for g in params for p in (g["params"] if isinstance(g, dict) else [g])}
    fused = bool(devices) and devices <= {"cpu", "cuda"}
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def parallelize(model: nn.Module, cfg: DeepSpeedConfig, *, params: list[dict], lr: float,
                weight_decay: float, schedule: Callable[[int], float], micro_batch: int,
                precision: str, sequence_group=None):
    """The DeepSpeed engine around `model` (already on this rank's device, with identical weights
    on every rank): an AdamW over `params` (the optimizer's parameter groups; torch's fused
    kernel, ``adamw``; DeepSpeed's CPU Adam when the optimizer states are offloaded), its rate scaled by `schedule` (LambdaLR),
    and ZeRO as `cfg` says. Every rank must call it (it partitions collectively).

    sequence_group: this rank's sequence-parallel group (``ulysses.sequence_groups``), or None.
    Its DiT is made sequence-parallel first (``ulysses.apply_sequence_parallel``). DeepSpeed is
    not told about the groups: it averages gradients and partitions ZeRO over the whole world
    (data x sequence parallel), which with the merge's adjoint gives the SP=1 update."""
    import deepspeed  # lazy: deepspeed import ~1.2 s; the config layer imports this module
    from deepspeed.utils import logger as ds_logger  # lazy: deepspeed, as above

    ds_logger.setLevel("WARNING")
    if sequence_group is not None:
        apply_sequence_parallel(model.dit, sequence_group)
    ds_config = build_ds_config(cfg, micro_batch, precision)
    if cfg.offload_optimizer:  # ZeRO-Offload steps the optimizer on the CPU: DeepSpeed's CPU Adam
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # lazy: deepspeed, as above

        opt = DeepSpeedCPUAdam(params, lr=lr, weight_decay=weight_decay, adamw_mode=True)
    else:
        opt = adamw(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                           model_parameters=params, config=ds_config,
                                           dist_init_required=False)
    return engine


def checks_overflow(engine) -> bool:
    """Whether DeepSpeed's optimizer drops a step with non-finite gradients and records the
    gradient norm. ZeRO-0 in fp32 hands the optimizer over as it is, with neither: the trainer
    does both for it."""
    return hasattr(engine.optimizer, "overflow")


class full_params:
    """Context manager yielding {name: full tensor} of the engine's module on every rank
    (ZeRO-3 gathers the partitions first; every rank must enter)."""

    def __init__(self, engine, zero_stage: int):
        self.engine, self.stage, self._ctx = engine, zero_stage, None

    def __enter__(self) -> dict[str, torch.Tensor]:
        module = self.engine.module
        if self.stage == 3:
            import deepspeed  # lazy: deepspeed import ~1.2 s; the config layer imports this module

            self._ctx = deepspeed.zero.GatheredParameters(list(module.parameters()),
                                                          modifier_rank=None)
            self._ctx.__enter__()
        return {k: p for k, p in module.named_parameters() if p.requires_grad}  # not frozen ones

    def __exit__(self, *exc):
        if self._ctx is not None:
            self._ctx.__exit__(*exc)
