"""DeepSpeed configuration, generated from the Hydra config (one source of truth).

``extra`` is the escape hatch: any raw DeepSpeed keys, deep-merged last, so users can reach
options this dataclass does not name without editing code.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from data.checks import check_ranges


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
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
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


def build_ds_config(cfg: DeepSpeedConfig, micro_batch: int, precision: str) -> dict:
    """precision: fp32 | bf16. Returns the dict handed to deepspeed.initialize."""
    if cfg.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"deepspeed.zero_stage must be 0-3, got {cfg.zero_stage}")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"train.precision must be fp32 or bf16, got '{precision}'")
    b = int(cfg.bucket_elements)
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage in (1, 2):
        zero.update(reduce_bucket_size=b, allgather_bucket_size=b)
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
    return _merge(ds, dict(cfg.extra))
