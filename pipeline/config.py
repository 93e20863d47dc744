"""The root config: one typed section per component, registered with Hydra's ConfigStore.

Each component owns its dataclass (next to its code); this module only assembles them. The
YAML tree in ``conf/`` picks group options and experiment presets on top of this schema, so
a misspelt key or a wrongly typed value fails when Hydra composes the config, naming the key,
before any stage starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf

from data.checks import check_ranges
from data.storage import local_root
from data.probe import ProbeConfig
from data.synthetic import SourceConfig
from data.tracking import TrackingConfig
from pipeline.curation.caption import CaptionConfig
from pipeline.curation.curate import CurateConfig
from pipeline.curation.dedup import DedupConfig
from pipeline.curation.embed import EmbedConfig
from pipeline.curation.ingest import IngestConfig
from pipeline.curation.scores import ScoreConfig
from pipeline.curation.shard import ShardConfig
from pipeline.curation.shots import ShotConfig
from pipeline.provenance import new_run_id
from pipeline.recipe import RecipeConfig
from training.evaluation.evaluate import EvalConfig
from training.latent.space import LatentConfig
from training.latent.vae_train import VAETrainConfig
from training.model import ModelConfig
from training.trainer import TrainConfig
from training.parallelize import DeepSpeedConfig, build_ds_config, read_json_config

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@dataclass
class ClusterConfig:
    """Where and how wide things run. Never part of a stage hash."""

    name: str = "local"
    address: Optional[str] = None  # None: start a local Ray; "auto" or ray://host:port: join one
    num_workers: int = 2  # training workers (one per GPU on a GPU cluster)
    # Ulysses sequence-parallel degree: each sample's spacetime tokens split over groups of this
    # many workers (must divide num_workers and model.dit.num_heads); data parallel is the rest
    sequence_parallel: int = 1
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

    def __post_init__(self) -> None:
        check_ranges(self, num_workers=">= 1", gpus_per_worker=">= 0", cpus_per_worker=">= 0",
                     curate_concurrency=">= 1", peak_tflops_per_worker="> 0")

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
    recipe: RecipeConfig = field(default_factory=RecipeConfig)  # training as chained stages
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
    "recipe": RecipeConfig,
    "deepspeed": DeepSpeedConfig,
    "eval": EvalConfig,
    "tracking": TrackingConfig,
    "cluster": ClusterConfig,
}


def _read_json(path: Optional[str]) -> dict:
    try:
        return read_json_config(path)
    except ValueError as e:
        raise ValueError(f"deepspeed.{e}") from None


_SWEEP: dict[str, str] = {}  # this process's sweep (`spacetime run -m`): its id, made once


def sweep_id() -> str:
    """The id of this process's Hydra sweep: ``SPACETIME_RUN_ID`` when set (a submitted job's,
    then its jobs are ``<id>-<n>``), else a new run id; the same for every job of the sweep."""
    if "id" not in _SWEEP:
        _SWEEP["id"] = os.environ.get("SPACETIME_RUN_ID") or new_run_id()
    return _SWEEP["id"]


def reset_sweep() -> None:
    _SWEEP.clear()


def _sweep_dir(root: str, local_cache: Optional[str]) -> str:
    """Hydra's sweep directory: ``<run.root>/sweeps/<sweep id>`` (for a URL root, its local
    cache's; the sweep's records go to the bucket: pipeline.cli)."""
    return str(local_root(root, local_cache) / "sweeps" / sweep_id())


OmegaConf.register_new_resolver("spacetime.sweep_dir", _sweep_dir, replace=True)

# deepspeed.config_file's content, read when the config resolves: the hash (pipeline.graph) and
# the typed config both see it, the path itself is left out of the train stage's hash
OmegaConf.register_new_resolver("spacetime.json_file", _read_json, replace=True)
FILE_CONFIG = "${spacetime.json_file:${deepspeed.config_file}}"


def schema() -> DictConfig:
    """The typed root config, with its open sections (mapping-typed fields: deepspeed.extra,
    ingest.storage_options) accepting any key: set with or without ``+``, a mapping value
    deep-merged (``deepspeed.extra={zero_optimization: {stage3_max_live_parameters: 1000}}``).
    Every other key is the schema's (``check_keys``)."""
    node = OmegaConf.structured(RunConfig)
    _open_mappings(node)
    node.deepspeed.file_config = FILE_CONFIG
    return node


def _open_mappings(node: DictConfig) -> None:
    for key in node:
        child = node._get_node(key)
        if not isinstance(child, DictConfig) or child._is_none() or child._is_missing():
            continue
        if dataclasses.is_dataclass(OmegaConf.get_type(child)):
            _open_mappings(child)
        else:
            child._set_flag("struct", False)


def register() -> None:
    """Register the typed schema that conf/config.yaml extends (its first default)."""
    ConfigStore.instance().store(name="schema", node=schema())


def check_keys(node: DictConfig, prefix: str = "", root: DictConfig | None = None) -> None:
    """ConfigError naming the first key of a typed section its dataclass does not have (Hydra's
    ``+key=value`` adds one silently: ``+train.lrr=1``), with the closest valid key. Mapping-typed
    fields are open (any key); a recipe stage's ``train`` mapping is checked by check_recipe."""
    root = node if root is None else root
    typ = OmegaConf.get_type(node)
    if dataclasses.is_dataclass(typ):
        names = [f.name for f in dataclasses.fields(typ)]
        for key in node:
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
                if not close:
                    close = [k for k in _dotted_keys(root)  # +lr=1: train.lr
                             if k.rsplit(".", 1)[-1] == key and k != f"{prefix}{key}"]
                    hint = f"; did you mean {' or '.join(close[:3])}?" if close else ""
                else:
                    hint = f"; did you mean {prefix}{close[0]}?"
                raise ConfigError(f"{prefix}{key}: no such key in the config schema{hint}")
    for key in node:
        child = node._get_node(key)
        if isinstance(child, ListConfig) and not child._is_none() and not child._is_missing():
            for i in range(len(child)):
                item = child._get_node(i)
                if isinstance(item, DictConfig) and not item._is_none() and not item._is_missing():
                    check_keys(item, f"{prefix}{key}[{i}].", root)
        elif (isinstance(child, DictConfig) and not child._is_none() and not child._is_missing()
              and dataclasses.is_dataclass(OmegaConf.get_type(child))):
            check_keys(child, f"{prefix}{key}.", root)


def _dotted_keys(node: DictConfig, prefix: str = "") -> list[str]:
    out = []
    for key in node:
        child = node._get_node(key)
        out.append(f"{prefix}{key}")
        if (isinstance(child, DictConfig) and not child._is_none() and not child._is_missing()
                and dataclasses.is_dataclass(OmegaConf.get_type(child))):
            out += _dotted_keys(child, f"{prefix}{key}.")
    return out


class ConfigError(ValueError):
    """A value a component's ``__post_init__`` refused, named by its dotted key."""


def to_object(cfg: DictConfig) -> RunConfig:
    """The typed config. A component's ``__post_init__`` check names the field relative to its
    dataclass (``lr must be > 0, got -1.0``); the error raised here names the dotted key
    (``train.lr must be > 0, got -1.0``). A recipe's stages are checked against the train
    section they override (``recipe.stages[1].train.num_framez``: :mod:`pipeline.recipe`). A key
    no section has (``+train.lrr=1``) is named first (check_keys); a deepspeed.config_file that
    contradicts the keys this project sets is named last."""
    check_keys(cfg)
    try:
        obj = OmegaConf.to_object(cfg)
    except Exception as e:  # noqa: BLE001 - whatever the check raised, named and re-raised
        raise ConfigError(named_error(cfg, e)) from e
    try:
        check_recipe(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if obj.deepspeed.file_config:  # the file against ours (its batch keys: "auto" or absent)
        try:
            build_ds_config(obj.deepspeed, 1, obj.train.precision)
        except ValueError as e:
            raise ConfigError(f"deepspeed.{e}") from None
    return obj  # type: ignore[return-value]


def failures(node: DictConfig, prefix: str = "") -> list[tuple[str, DictConfig, str]]:
    """(dotted key, node, message) of each deepest typed section under `node` that fails to
    build (its own ``__post_init__`` raised, not a subsection's)."""
    out: list[tuple[str, DictConfig, str]] = []
    for key in node:
        child = node._get_node(key)
        items = []  # a list of sections: train.data.buckets
        if isinstance(child, ListConfig) and not child._is_none() and not child._is_missing():
            items = [(f"{key}[{i}]", child._get_node(i)) for i in range(len(child))]
        for name, sub in [(key, child), *items]:
            if isinstance(sub, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(sub)):
                try:
                    OmegaConf.to_object(sub)
                except Exception:  # noqa: BLE001
                    out += failures(sub, f"{prefix}{name}.")
    if not out and prefix:
        try:
            OmegaConf.to_object(node)
        except Exception as e:  # noqa: BLE001
            out.append((prefix.rstrip("."), node, str(e)))
    return out


def named_error(cfg: DictConfig, e: BaseException) -> str:
    """`e`'s message naming the dotted key of the section that raised it: prefixed to the field
    the message starts with, else before it (unless the message names the section already).
    A value set where it fails is named before one that only follows it by interpolation
    (``vae.target_fps: ${train.data.target_fps}``)."""
    named = []
    for key, node, msg in failures(cfg):
        first = re.match(r"\w+", msg)
        if first and first.group(0) in node:
            named.append((f"{key}.{msg}", OmegaConf.is_interpolation(node, first.group(0))))
        elif re.search(rf"(?<![\w.]){re.escape(key)}\b", msg):
            named.append((msg, False))
        else:
            named.append((f"{key}: {msg}", False))
    return next((m for m, follows in named if not follows), named[0][0] if named else str(e))


def to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore


def check_recipe(cfg: DictConfig) -> None:
    """The recipe of a composed config, checked against its train section: unique names, and
    each entry's ``train`` overrides merge into the train schema and pass its checks. Raises
    ValueError naming the dotted key (``recipe.stages[1].train.steps must be >= 1, got 0``)."""
    seen: set[str] = set()
    for i, entry in enumerate(cfg.recipe.stages):
        key = f"recipe.stages[{i}]"
        if entry.name in seen:
            raise ValueError(f"{key}.name: {entry.name!r} names two stages of the recipe")
        seen.add(entry.name)
        schema = OmegaConf.structured(OmegaConf.get_type(cfg.train))
        base = OmegaConf.to_container(cfg.train, resolve=True)
        try:
            merged = OmegaConf.merge(schema, base, OmegaConf.to_container(entry.train, resolve=True))
        except Exception as e:  # noqa: BLE001 - an unknown key or a wrongly typed value
            full = getattr(e, "full_key", None) or ""
            raise ValueError(f"{key}.train.{full}: {_first_line(e)}" if full else
                             f"{key}.train: {_first_line(e)}") from None
        try:
            OmegaConf.to_object(merged)
        except Exception as e:  # noqa: BLE001 - the TrainConfig's own checks
            msg = named_error(OmegaConf.create({"train": merged}), e)
            raise ValueError(f"{key}.{msg}") from None


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__
