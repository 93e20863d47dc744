"""The training loader's configuration (``train.data``): the buckets (shapes to batch by, Open-Sora's
``bucket_config`` form), the loader's keys, and batch sizes from a token budget. `training.loader`
streams the batches they describe."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from data.checks import check_ranges


@dataclass
class Bucket:
    num_frames: int
    height: int
    width: int
    batch_size: int  # per rank; 0: from train.data.token_budget (`resolve_batch_sizes`)
    # Chance that a clip which fits this bucket is taken at its length; otherwise it tries the
    # next shorter bucket of its aspect ratio (Open-Sora's bucket_config probabilities), so
    # long clips also give short windows. The shortest fitting bucket always takes it.
    prob: float = 1.0

    def __post_init__(self) -> None:
        check_ranges(self, num_frames=">= 1", height=">= 1", width=">= 1", batch_size=">= 0",
                     prob="in [0, 1]")


LOADER_KINDS = ("raw", "latent")
MIX_KINDS = ("image", "video")  # train.data.mix's keys (`training.clips.sample_kind`)
@dataclass
class LoaderConfig:
    kind: str = "raw"  # raw: mp4 clip shards | latent: precomputed latent shards (training.latent.precompute)
    target_fps: Optional[float] = None  # sample frames at this rate; None keeps the clip's fps
    shuffle_buffer: int = 64  # raw samples per reader
    num_workers: int = 0  # DataLoader worker processes per rank
    prefetch: int = 2  # batches decoded ahead in a background thread; 0: decode in the loop
    # Shapes to batch by; empty: one bucket of train.num_frames x height x width at the
    # micro batch size. Image samples go only to buckets of num_frames 1 (none: skipped, no_bucket).
    buckets: list[Bucket] = field(default_factory=list)
    # Spacetime tokens (the DiT's patches) per rank per micro-batch for the buckets whose
    # batch_size is 0: each takes max(1, token_budget // its tokens per clip) clips, so a step
    # holds many short clips or one long one (0: off, every bucket names its batch size).
    token_budget: int = 0
    # How far a raw clip may be scaled up to reach a bucket (1.0: never; 2.0: up to twice its
    # height or width). A clip too small for every bucket is skipped, counted as too_small.
    max_upscale: float = 1.0
    # Batches a rank may hold waiting for the other ranks to fill the same bucket before ranks
    # with spares hand them over (training.lockstep; several buckets on several ranks).
    max_waiting: int = 8
    # Packing: each micro-batch is one pack of clips of any of the buckets' shapes, at most
    # token_budget tokens in all (first fit, `Packer`), trained as one sequence with
    # block-diagonal attention (DiT.forward_packed); the buckets' batch sizes are not used.
    pack: bool = False
    # Mixing weights per kind of sample ({image: 0.25, video: 0.75}): the share of micro-batches
    # of each kind (each batch is one kind), drawn per reader; empty: the data's own mix.
    mix: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in LOADER_KINDS:
            raise ValueError(f"unknown train.data.kind {self.kind!r}; valid: {', '.join(LOADER_KINDS)}")
        self.mix = dict(self.mix or {})
        unknown = sorted(set(self.mix) - set(MIX_KINDS))
        if unknown:
            raise ValueError(f"unknown kind {unknown[0]!r} in train.data.mix; valid: {', '.join(MIX_KINDS)}")
        bad = [k for k, w in self.mix.items() if not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0]
        if bad:
            raise ValueError(f"train.data.mix.{bad[0]} is {self.mix[bad[0]]!r}: weights are numbers >= 0")
        if self.mix and sum(self.mix.values()) <= 0:
            raise ValueError("train.data.mix: every weight is 0; give one kind a positive weight "
                             "(or leave train.data.mix empty: the data's own mix)")
        check_ranges(self, target_fps="> 0", shuffle_buffer=">= 1", num_workers=">= 0", prefetch=">= 0",
                     token_budget=">= 0", max_upscale=">= 1", max_waiting=">= 1")
        if self.pack and self.token_budget == 0:
            raise ValueError("train.data.pack=true packs clips into train.data.token_budget tokens, "
                             "but train.data.token_budget is 0: set a token budget")
        unsized = [i for i, b in enumerate(self.buckets) if b.batch_size == 0]
        if unsized and self.token_budget == 0:
            raise ValueError(f"train.data.buckets[{unsized[0]}].batch_size is 0 (from the token budget) "
                             f"but train.data.token_budget is 0: set a token budget or a batch size")


def resolve_batch_sizes(buckets: list[Bucket], token_budget: int, tokens_per_clip) -> list[Bucket]:
    """The buckets with every batch_size 0 set from the token budget: max(1, budget // the
    bucket's tokens per clip). `tokens_per_clip(bucket) -> int` counts the DiT's spacetime
    patches of one clip of that shape (pixels or latents: the caller knows the model)."""
    out = []
    for b in buckets:
        if b.batch_size == 0:
            b = Bucket(b.num_frames, b.height, b.width, max(1, token_budget // tokens_per_clip(b)), b.prob)
        out.append(b)
    return out
