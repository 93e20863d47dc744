"""The root config: one typed section per component, registered with Hydra's ConfigStore.

Each component owns its dataclass (next to its code); this module only assembles them. The
YAML tree in ``conf/`` picks group options and experiment presets on top of this schema, so
a misspelt key or a wrongly typed value fails when Hydra composes the config, naming the key,
before any stage starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from data.probe import ProbeConfig
from data.synthetic import SourceConfig
from pipeline.caption import CaptionConfig
from pipeline.curate import CurateConfig
from pipeline.dedup import DedupConfig
from pipeline.embed import EmbedConfig
from pipeline.ingest import IngestConfig
from pipeline.scores import ScoreConfig
from pipeline.shard import ShardConfig
from pipeline.shots import ShotConfig
from pipeline.tracking import TrackingConfig
from training.evaluate import EvalConfig
from training.latent_space import LatentConfig
from training.vae_train import VAETrainConfig
from training.model import ModelConfig
from training.trainer import TrainConfig
from training.zero import DeepSpeedConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@dataclass
class ClusterConfig:
    """Where and how wide things run. Never part of a stage hash."""

    name: str = "local"
    address: Optional[str] = None  # None: start a local Ray; "auto" or ray://host:port: join one
    num_workers: int = 2  # training workers (one per GPU on a GPU cluster)
    # GPUs each training worker reserves (Ray's resources_per_worker): 0 trains on CPU with
    # gloo; > 0 on GPU with NCCL. 1 is one rank per GPU; a fraction packs several per GPU.
    # (Model actor pools follow the cluster's GPUs, see embed.* and caption.*.)
    gpus_per_worker: float = 0.0
    cpus_per_worker: int = 1
    # Parallel curation CPU tasks. Model actor pools are sized by embed.concurrency and
    # caption.concurrency (default one per GPU), never by this.
    curate_concurrency: int = 2
    # Peak FLOP/s of one training worker for MFU (e.g. 989 for an H100 in bf16); unset: each
    # run measures the worker's dense matmul rate and uses that.
    peak_tflops_per_worker: Optional[float] = None
    dashboard_host: str = "127.0.0.1"  # keep the Ray dashboard on loopback

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0


@dataclass
class RunSection:
    name: str = "demo"  # experiment name; used for display and the W&B project tag
    root: str = "outputs"  # where stage outputs, run records and W&B files go (path or URL)
    # A URL root (s3://, gs://): stages run in, and inputs are cached in, this local directory
    # (default $TMPDIR/spacetime-cache); the bucket holds the outputs and the run state.
    local_cache: Optional[str] = None
    id: Optional[str] = None  # set by `spacetime run`; SPACETIME_RUN_ID overrides


@dataclass
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    source: SourceConfig = field(default_factory=SourceConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    shots: ShotConfig = field(default_factory=ShotConfig)
    scores: ScoreConfig = field(default_factory=ScoreConfig)
    curate: CurateConfig = field(default_factory=CurateConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    vae: VAETrainConfig = field(default_factory=VAETrainConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


GROUPS = {
    "source": SourceConfig,
    "ingest": IngestConfig,
    "probe": ProbeConfig,
    "shots": ShotConfig,
    "scores": ScoreConfig,
    "curate": CurateConfig,
    "embed": EmbedConfig,
    "dedup": DedupConfig,
    "caption": CaptionConfig,
    "shard": ShardConfig,
    "vae": VAETrainConfig,
    "latent": LatentConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "deepspeed": DeepSpeedConfig,
    "eval": EvalConfig,
    "tracking": TrackingConfig,
    "cluster": ClusterConfig,
}


def register() -> None:
    """Register the typed schema that conf/config.yaml extends (its first default)."""
    ConfigStore.instance().store(name="schema", node=RunConfig)


def to_object(cfg: DictConfig) -> RunConfig:
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


def to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore
