"""`spacetime`: run and inspect the graph. Arguments after the subcommand are Hydra overrides.

    spacetime run [--only S | --from S | --until S] [overrides...]  run what is missing (or force)
    spacetime status [overrides...]                               the graph's state for a config
    spacetime status --sweep [ID] [overrides...]                  a sweep's jobs side by side
    spacetime params [overrides...]                               parameter counts of the presets
    spacetime report [RUN_ID] [--embed-videos] [overrides...]     the run's static HTML page
    spacetime generate PROMPT... [--seconds S] [flags] [overrides...]  videos from a trained model
                                                  (flags: spacetime generate --usage)

On a Ray cluster (pipeline/submit.py) and before one (pipeline/plan.py):

    spacetime submit [--address ADDR] [--only/--from STAGE] [--follow] [overrides...]
    spacetime jobs [--address ADDR]                               submitted jobs and their runs
    spacetime logs JOB [--address ADDR] [--follow]                a job's output
    spacetime stop JOB [--address ADDR]                           stop a job
    spacetime plan [--json] [overrides...]                        tokens, memory, time and cost

Hydra's own flags work after the subcommand (``spacetime run --cfg job``, ``--hydra-help``);
``--help`` is ours (``HELP``). Shell completion is Hydra's, the subcommand and our flags skipped
(``completion_line``): ``eval "$(spacetime -sc install=bash)"``, then ``spacetime run train.l<TAB>``.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from data.redact import credential_overrides, redact, scrub, secret_values
from data.tracking import make_tracker, resolve_mode, spec_for
from pipeline.graph import GraphError, StageFailed
from pipeline.plan import main as plan_main
from pipeline.provenance import git_commit
from pipeline.submit import main as submit_main

CLUSTER_COMMANDS = ("submit", "jobs", "logs", "stop", "plan")  # parse their own flags
# Credentials a run may take from its environment; lineage.json records which were present
# (names only), so "why was W&B offline / why did S3 refuse" has an answer after the fact.
SECRET_NAMES = ("WANDB_API_KEY", "HF_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                "GOOGLE_APPLICATION_CREDENTIALS", "RAY_AUTH_TOKEN")
SUBCOMMANDS = ("run", "status", "params", "report", "generate", "tune", *CLUSTER_COMMANDS)
USAGE = __doc__
# `generate`'s flags: --name VALUE or --name=VALUE -> (GenerateConfig field, type)
GENERATE_FLAGS = {"--prompt": ("prompts", str), "--seconds": ("seconds", float), "--frames": ("frames", int),
                  "--height": ("height", int), "--width": ("width", int), "--fps": ("fps", float),
                  "--guidance": ("guidance", float), "--steps": ("steps", int), "--seed": ("seed", int),
                  "--negative": ("negative_prompt", str), "--num": ("num_samples", int),
                  "--batch-size": ("batch_size", int), "--run": ("run", str), "--stage": ("stage", str),
                  "--checkpoint": ("checkpoint", str), "--out": ("out", str), "--device": ("device", str),
                  "--decode-chunk": ("decode_chunk", int), "--sequence-parallel": ("sequence_parallel", int)}
# Hydra's own flags that take a value (`--cfg job`); --info takes one of its topics, or none
HYDRA_VALUE_FLAGS = ("--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                     "--config-dir", "-cd", "--experimental-rerun")
HYDRA_INFO = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")
GENERATE_USAGE = """spacetime generate PROMPT... [flags] [overrides...]

  --seconds S | --frames N   duration (default: the training's frame count); bad counts fail
                             before any weights load, naming the nearest that work
  --height H --width W       size (default: the training's)
  --fps F                    frame rate (default: train.data.target_fps, else the run's eval.fps)
  --guidance G --steps N     classifier-free guidance scale, sampler steps (default: the run's eval)
  --seed S --num K           video j of a prompt from seed S + j (default 0, 1 video)
  --negative TEXT            negative prompt (the guidance's unconditional branch; default "")
  --run RUN_ID               a run under run.root (default: the latest)
  --stage NAME               a train stage of the run (default: its last complete one)
  --checkpoint latest|STEP|PATH   final weights, a saved step, or a training output / tag path
  --raw                      the raw weights, not the EMA
  --out DIR                  output directory (default: <run.root>/generated/<id>)
  --batch-size B --device D --decode-chunk N   videos per batch, cpu/cuda, VAE decode chunk
  --sequence-parallel P      sample on P Ray workers, each video's tokens split across them
                             (long clips; Ray from cluster.address, else a local one)
  --prompt TEXT              a prompt (also positional); Hydra overrides (run.root=...) follow
"""


HELP = """usage: spacetime [COMMAND] [FLAGS] [OVERRIDES...]          (COMMAND defaults to run)

commands:
  run [--only S | --from S | --until S]  run what is missing of the graph (or force stages)
  status [--sweep [ID]]                  each stage's state, hash and output for a config;
                                         --sweep: a sweep's jobs side by side (default: latest)
  params                                 parameter counts of the model presets
  report [RUN_ID] [--embed-videos]       the run's static HTML page (default: the latest run)
  generate PROMPT... [flags]             videos from a trained model (spacetime generate --usage)
  plan [--json] [overrides...]           tokens, memory, time and cost (its own config: conf/plan)
  tune --grid KEY=V1,V2 [--metric M]     the training stage as Ray Tune trials (spacetime tune -h)
  submit [--address ADDR] [--only/--from S] [--follow]   the run as a job on a Ray cluster
  jobs | logs JOB [--follow] | stop JOB  [--address ADDR]  submitted jobs, a job's output, stop

stage flags (run; S: a stage name, as `spacetime status` lists them):
  --only S     force S alone (what is missing upstream of it runs first)
  --from S     force S and everything downstream of it
  --until S    run what is missing up to S, forcing nothing (an unfinished stage resumes)

overrides (Hydra): key=value | group=option | ~key | +key=value (new keys only in open
  sections: deepspeed.extra, ingest.storage_options) | -m key=a,b (a sweep: one run per job,
  ids <sweep>-<n>, Hydra's sweep dir <run.root>/sweeps/<sweep>)
config groups (group=option):
{groups}
Hydra's own flags, after the command:
  --cfg job            the composed config (--cfg hydra, --cfg all; --package KEY for a part)
  --info [TOPIC]       defaults tree, search path, plugins
  --hydra-help         Hydra's own help (its flags and plugins)
  -sc install=bash     shell completion: eval "$(spacetime -sc install=bash)" (README)
"""


def help_text() -> str:
    """HELP with the config groups and their options (read from conf/, no imports)."""
    conf = Path(__file__).resolve().parent.parent / "conf"
    dirs = sorted(d for d in conf.glob("**/") if d != conf and "plan" not in d.relative_to(conf).parts
                  and any(d.glob("*.yaml")))
    groups = [f"  {d.relative_to(conf).as_posix()}: {', '.join(sorted(p.stem for p in d.glob('*.yaml')))}"
              for d in dirs]
    return HELP.format(groups="\n".join(groups))


def parse_argv(argv: list[str]) -> tuple[str, dict, list[str]]:
    """Split our own arguments from Hydra's. Returns (command, flags, hydra_argv). ``--help``
    (``-h``) prints our help (commands, stage flags, config groups), not Hydra's config dump
    (that is ``--hydra-help``); a cluster command's --help is its own."""
    cmd = "run"
    if argv and argv[0] in SUBCOMMANDS:
        cmd, argv = argv[0], argv[1:]
    elif argv and not argv[0].startswith("-") and "=" not in argv[0]:
        raise SystemExit(f"spacetime: unknown command '{argv[0]}'; commands: "
                         f"{', '.join(SUBCOMMANDS)}\n\n{USAGE}")
    if cmd not in CLUSTER_COMMANDS and ("--help" in argv or "-h" in argv):
        print(help_text(), end="")
        raise SystemExit(0)
    if cmd in CLUSTER_COMMANDS:
        return cmd, {}, list(argv)
    if cmd == "report":
        return cmd, *parse_report_argv(argv)
    if cmd == "generate":
        return cmd, *parse_generate_argv(argv)
    flags: dict = {"only": None, "from_": None, "until": None}
    names = {"--only": "only", "--from": "from_", "--until": "until"}
    rest: list[str] = []
    it = iter(argv)
    for a in it:
        if a in names:
            val = next(it, None)
            if val is None or val.startswith("-"):
                raise SystemExit(f"spacetime: {a} needs a stage name")
            flags[names[a]] = val
        elif a.split("=", 1)[0] in names:
            k, v = a.split("=", 1)
            flags[names[k]] = v
        else:
            rest.append(a)
    if cmd != "run" and any(flags.values()):
        raise SystemExit("spacetime: --only/--from/--until belong to 'run'")
    if cmd == "status":
        flags["sweep"], rest = parse_sweep_flag(rest)
    return cmd, flags, rest


def parse_sweep_flag(argv: list[str]) -> tuple[str | None, list[str]]:
    """`--sweep [ID]` or `--sweep=ID` (`status`): the sweep id ("latest" without one), or None;
    and the other arguments. An ID is a word that is no override and no flag."""
    sweep, rest = None, []
    it = iter(range(len(argv)))
    for i in it:
        a = argv[i]
        if a == "--sweep":
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is not None and not nxt.startswith("-") and not _is_override(nxt):
                sweep = nxt
                next(it)
            else:
                sweep = "latest"
        elif a.startswith("--sweep="):
            sweep = a.split("=", 1)[1] or "latest"
        else:
            rest.append(a)
    return sweep, rest


COMPLETION_FLAGS = ("--only", "--from", "--until", "--sweep", "--help", "--cfg", "--info", "--hydra-help",
                    "--multirun")


def completion_line(line: str) -> tuple[str | None, list[str], str]:
    """A shell's completion line (``COMP_LINE``: ``spacetime run --only train train.l``) as
    Hydra's completion reads it: the app name, then Hydra's arguments alone (the subcommand and
    our flags dropped, as ``parse_argv`` drops them). Returns (that line, the subcommands that
    complete the word being typed when it is the first, the command); a flag being typed: (None,
    the flags it may be, "run")."""
    app, _, args = line.lstrip().partition(" ")
    words = [w for w in args.split() if w not in ("--help", "-h", "--usage")]  # they print
    ends = not args or args[-1] == " "  # a new word starts at the cursor
    typing = "" if ends else (words.pop() if words else "")
    commands = [c for c in SUBCOMMANDS if c.startswith(typing)] if not words and "=" not in typing else []
    if typing.startswith("-"):  # a flag, ours or Hydra's (its completion parses, not completes, them)
        return None, [f for f in COMPLETION_FLAGS if f.startswith(typing)], "run"
    cmd = words[0] if words and words[0] in SUBCOMMANDS else "run"
    try:
        _, _, rest = parse_argv(words)
    except SystemExit:  # an unfinished flag (--only<TAB>) or an unknown word: what parses
        rest = [w for w in words[1 if words[:1] == [cmd] else 0:] if _is_override(w)]
    if cmd in CLUSTER_COMMANDS:  # their own flags (--address ADDR, --follow, JOB): overrides only
        rest = [w for w in rest if _is_override(w)]
    rest = [w for w in rest if w not in ("-sc", "--shell-completion") and not w.startswith("query=")]
    return " ".join([app, *rest, typing]), commands, cmd  # typing "": a trailing space, a new word


def parse_report_argv(argv: list[str]) -> tuple[dict, list[str]]:
    """`report [RUN_ID] [--embed-videos] [overrides...]`: the run id only as the first argument,
    so a Hydra flag's value (`--cfg job`) is never taken for one."""
    flags: dict = {"run_id": None, "embed_videos": False}
    rest: list[str] = []
    for i, a in enumerate(argv):
        if a == "--embed-videos":
            flags["embed_videos"] = True
        elif i == 0 and not a.startswith("-") and "=" not in a:
            flags["run_id"] = a
        else:
            rest.append(a)
    return flags, rest


def _is_override(a: str) -> bool:
    """`key=value`, `+key=value`, `~key` (Hydra) as opposed to a prompt."""
    head = a.split("=", 1)[0]
    return (("=" in a or a.startswith("~")) and bool(head) and " " not in head
            and all(c.isalnum() or c in "._-/@+~" for c in head))


def parse_generate_argv(argv: list[str]) -> tuple[dict, list[str]]:
    """`generate PROMPT... [--flag VALUE | --flag=VALUE | --raw] [overrides...]` -> (the given
    GenerateConfig fields, Hydra's arguments). Other --flags go to Hydra (--cfg job, --help)."""
    flags: dict = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        a, i = argv[i], i + 1
        name, eq, val = a.partition("=")
        if a == "--usage":
            print(GENERATE_USAGE)
            raise SystemExit(0)
        if a == "--raw":
            flags["use_ema"] = False
        elif name in GENERATE_FLAGS:
            if not eq:
                if i == len(argv):
                    raise SystemExit(f"spacetime: {name} needs a value\n\n{GENERATE_USAGE}")
                val, i = argv[i], i + 1
            key, kind = GENERATE_FLAGS[name]
            try:
                value = kind(val)
            except ValueError:
                raise SystemExit(f"spacetime: {name} needs a {kind.__name__}, got {val!r}") from None
            if key == "prompts":
                flags.setdefault("prompts", []).append(value)
            else:
                flags[key] = value
        elif a.startswith("-") or _is_override(a):
            rest.append(a)
            takes = a in HYDRA_VALUE_FLAGS or (a in ("--info", "-i") and i < len(argv) and argv[i] in HYDRA_INFO)
            if takes and i < len(argv):
                rest.append(argv[i])
                i += 1
        else:
            flags.setdefault("prompts", []).append(a)
    return flags, rest


def cmd_generate(root: str, flags: dict, cluster=None) -> int:
    from pipeline.generate import GenerateConfig, generate  # lazy: CLI start-up 0.1 s, 9 s with eager imports

    try:
        generate(GenerateConfig(**flags), root, cluster=cluster)
    except ValueError as e:  # GenerateError: a request the model cannot take, said before loading
        raise SystemExit(f"spacetime: {e}") from None
    return 0


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("spacetime", "torch", "ray", "deepspeed", "webdataset", "decord", "av",
                "open-clip-torch", "wandb", "hydra-core"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def preflight(cfg) -> None:
    """Checks that need more than types; raise before any stage starts."""
    from training.trainer import micro_batch_size  # lazy: CLI start-up 0.1 s, 9 s with eager imports

    src = cfg.source
    if src.kind == "directory":
        if not src.path:
            raise SystemExit("spacetime: source.kind=directory needs source.path")
        if not Path(src.path).is_dir():
            raise SystemExit(f"spacetime: source.path '{src.path}' is not a directory")
    if src.kind == "ingest":
        from pipeline.curation.ingest import check_inputs  # lazy: CLI start-up 0.1 s, 9 s with eager imports

        check_inputs(cfg.ingest)  # ValueError naming ingest.inputs[i]
    from pipeline.recipe import train_sections  # lazy: CLI start-up 0.1 s, 9 s with eager imports
    from training.patches import check_patchable  # lazy: CLI start-up 0.1 s, 9 s with eager imports
    from training.trainer import buckets_of, check_latent_buckets  # lazy: CLI start-up 0.1 s, 9 s with eager imports
    from training.ulysses import check_sequence_parallel  # lazy: CLI start-up 0.1 s, 9 s with eager imports

    try:
        check_sequence_parallel(cfg.model.dit.num_heads, cfg.cluster.sequence_parallel,
                                cfg.cluster.num_workers)
    except ValueError as e:
        raise SystemExit(f"spacetime: {e}") from None
    for stage, tcfg in train_sections(cfg):  # train, or each stage of a recipe
        at = f"recipe stage {stage}: " if cfg.recipe.stages else ""
        try:
            micro = micro_batch_size(tcfg, cfg.cluster.num_workers, cfg.deepspeed.grad_accum,
                                     cfg.cluster.sequence_parallel)
        except ValueError as e:
            raise SystemExit(f"spacetime: {at}{e}") from None
        shapes = [(b.num_frames, b.height, b.width) for b in buckets_of(tcfg, micro)]
        latent = tcfg.data.kind == "latent"
        if latent:  # every shape a window the latent shards will hold (latent.*, latent.span)
            lat = (cfg.latent.num_frames, cfg.latent.height, cfg.latent.width)
            tc = cfg.vae.model.compression[0] if cfg.latent.kind == "ours" else None  # diffusers: once loaded
            try:
                check_latent_buckets(buckets_of(tcfg, micro), lat, cfg.latent.span, tc,
                                     cfg.model.dit.patch_size)
            except ValueError as e:
                raise SystemExit(f"spacetime: {at}the latent shards (latent.num_frames/height/width="
                                 f"{lat}): {e}") from None
        if latent and cfg.latent.kind == "ours":  # our VAE's latent space is known from its config
            check_our_latents(cfg, shapes)
        for shape in shapes if not latent else ():  # latents: checked in latent space
            try:
                check_patchable(shape, cfg.model.dit.patch_size, what=f"{at}train shape",
                                key="model.dit.patch_size")
            except ValueError as e:
                raise SystemExit(f"spacetime: {e}") from None
    from training.evaluation.consistency import check_long_eval  # lazy: CLI start-up 0.1 s, 9 s with eager imports

    try:
        check_long_eval(cfg)  # eval.long lengths the model can sample
    except ValueError as e:
        raise SystemExit(f"spacetime: {e}") from None
    resolve_mode(cfg.tracking.mode)


def check_our_latents(cfg, shapes: list[tuple[int, int, int]]) -> None:
    """latent=ours: the training shapes fit the VAE's compression, their latents the DiT's patch,
    and an explicit model.dit.in_channels is the VAE's (before the vae stage spends its time).
    A diffusers VAE is checked when it is loaded (precompute) and before training starts."""
    from training.latent.vae import latent_shape  # lazy: CLI start-up 0.1 s, 9 s with eager imports
    from training.patches import check_patchable  # lazy: CLI start-up 0.1 s, 9 s with eager imports

    vae, dit = cfg.vae.model, cfg.model.dit
    if dit.in_channels not in (None, vae.latent_channels):
        raise SystemExit(f"spacetime: model.dit.in_channels ({dit.in_channels}) must equal the VAE's latent "
                         f"channels (vae.model.latent_channels={vae.latent_channels}); or null to follow it")
    for shape in shapes:
        try:
            t, h, w = latent_shape(shape, vae.compression)
        except ValueError as e:
            raise SystemExit(f"spacetime: train.num_frames/height/width: {e}") from None
        try:
            check_patchable((t, h, w), dit.patch_size, what="the grid of latents", key="model.dit.patch_size")
        except ValueError as e:
            raise SystemExit(f"spacetime: train shape {shape}: {e}") from None


def cmd_status(graph, cfg_dict) -> int:
    from pipeline.graph import latest_run  # lazy: CLI start-up 0.1 s, 9 s with eager imports

    rows = graph.status(cfg_dict)
    w = max(8, *(len(r.name) for r in rows))  # a recipe's stage names may be longer
    print(f"{'stage':<{w}} {'state':<8} {'hash':<12} {'duration':>9}  output")
    for r in rows:
        dur = f"{r.duration_s:.1f}s" if r.duration_s is not None else "-"
        print(f"{r.name:<{w}} {r.state:<8} {r.hash[:12]:<12} {dur:>9}  {r.path}"
              + (f"  ({r.detail})" if r.detail else ""))
    sweep = (latest_run(graph.store) or {}).get("sweep")
    if sweep:  # "done" is the latest run's: one job of a sweep
        print(f"(the latest run is job {sweep['job']} of sweep {sweep['id']}: "
              f"spacetime status --sweep {sweep['id']})")
    return 0


def cmd_sweep_status(root: str, sweep: str) -> int:
    from data.storage import Store  # lazy: fsspec ~0.2 s; CLI start-up 0.1 s, 9 s with eager imports
    from pipeline.sweep import table  # lazy: CLI start-up 0.1 s, 9 s with eager imports

    try:
        print(table(Store(root), sweep))
    except ValueError as e:
        raise SystemExit(f"spacetime: {e}") from None
    return 0


def cmd_params(cfg) -> int:
    from training.dit import PRESETS, count_params  # lazy: CLI start-up 0.1 s, 9 s with eager imports

    base = cfg.model.dit  # the chosen model's options (attention, patch, channels, text width)
    if base.in_channels is None:  # follows the data; known here only for our VAE
        ours = cfg.train.data.kind == "latent" and cfg.latent.kind == "ours"
        base = replace(base, in_channels=cfg.vae.model.latent_channels if ours else 3)
        print(f"(model.dit.in_channels follows the data: counted with {base.in_channels})")
    print(f"{'preset':<7} {'adaln=block':>12} {'adaln=single':>13}   (DiT parameters)")
    for name in PRESETS:
        c = base.with_preset(name)
        counts = [count_params(replace(c, adaln=a)) / 1e6 for a in ("block", "single")]
        print(f"{name:<7} {counts[0]:11.2f}M {counts[1]:12.2f}M")
    n = count_params(base)  # what `spacetime run` with these overrides builds (= spacetime plan's)
    print(f"as configured: {base.preset}, adaln={base.adaln}, {base.attention} attention, patch "
          f"{tuple(int(p) for p in base.patch_size)}, {base.in_channels} channels, text_dim={base.text_dim}, "
          f"qk_norm={base.qk_norm}, mlp_ratio={base.mlp_ratio:g}: {n / 1e6:.2f}M ({n:,}) DiT parameters")
    return 0


def cmd_report(root: str, flags: dict) -> int:
    from pipeline.report import (  # lazy: CLI start-up 0.1 s, 9 s with eager imports
        EMBED_VIDEOS_MAX_BYTES,
        ReportConfig,
        ReportError,
        write_report,
    )

    cfg = ReportConfig(run_id=flags["run_id"],
                       embed_videos_max_bytes=EMBED_VIDEOS_MAX_BYTES if flags["embed_videos"] else 0)
    try:
        path = write_report(root, cfg)
    except ReportError as e:
        raise SystemExit(f"spacetime: {e}") from None
    print(path)
    return 0


def cmd_run(graph, cfg, cfg_dict, flags, sweep: dict | None = None) -> int:
    """One run (one job of a sweep: its own run id, ``<sweep id>-<n>``). The run id reaches
    subprocesses through ``SPACETIME_RUN_ID``, restored afterwards for the sweep's next job."""
    before = os.environ.get("SPACETIME_RUN_ID")
    try:
        return _run(graph, cfg, cfg_dict, flags, sweep)
    finally:
        if before is None:
            os.environ.pop("SPACETIME_RUN_ID", None)
        else:
            os.environ["SPACETIME_RUN_ID"] = before


def _run(graph, cfg, cfg_dict, flags, sweep: dict | None) -> int:
    from pipeline.sweep import record_job, run_id_for  # lazy: CLI start-up 0.1 s, 9 s with eager imports

    try:
        run_id = run_id_for(sweep, cfg.run.id, os.environ.get("SPACETIME_RUN_ID"))
    except ValueError as e:
        raise SystemExit(f"spacetime: {e}") from None
    os.environ["SPACETIME_RUN_ID"] = run_id
    repo = Path(__file__).resolve().parent.parent
    stage_flags = [f for flag, k in (("--only", "only"), ("--from", "from_"), ("--until", "until"))
                   if flags[k] for f in (flag, flags[k])]
    extra = {"git": git_commit(repo), "versions": versions(), "argv": sys.argv[1:],
             "stage_flags": stage_flags, "host": platform.node(),
             "secrets_seen": sorted(k for k in SECRET_NAMES if os.environ.get(k))}
    if os.environ.get("SPACETIME_SUBMIT"):  # set by `spacetime submit`: the submitter's commit
        extra["submit"] = json.loads(os.environ["SPACETIME_SUBMIT"])
    try:
        plan = graph.plan(cfg_dict, flags["only"], flags["from_"], flags["until"])
    except GraphError as e:
        raise SystemExit(f"spacetime: {e}") from None
    if sweep is not None:  # in the lineage and info.json; W&B runs tagged with it
        extra["sweep"] = sweep
        cfg.tracking.tags = [*cfg.tracking.tags, f"sweep-{sweep['id']}"]
        record_job(graph.store, sweep, run_id)
        print(f"sweep {sweep['id']} job {sweep['job']}: {' '.join(sweep['overrides'])}")
    print(f"run {run_id}: " + ", ".join(f"{n}={a}" for n, a in plan.items()))

    def tracker_factory(ctx):
        return make_tracker(spec_for(ctx, cfg.tracking, cfg.run.root, cfg.run.local_cache))

    t0 = time.time()
    code = 0
    try:
        lineage = graph.run(cfg, cfg_dict, run_id, only=flags["only"], from_=flags["from_"],
                            until=flags["until"],
                            tracker_factory=tracker_factory, extra_info=extra)
    except StageFailed as e:
        print(f"spacetime: {scrub(str(e), secret_values(cfg_dict))}", file=sys.stderr)
        lineage, code = None, 1
    finally:
        if "ray" in sys.modules:
            import ray  # lazy: ray ~1.7 s (ray.train ~4.7 s); CLI start-up 0.1 s, 9 s with eager imports

            if ray.is_initialized():
                ray.shutdown()
    root = graph.root
    print(f"\nrun {run_id} {'finished' if code == 0 else 'FAILED'} in {time.time() - t0:.1f}s")
    print(f"  lineage : {root / 'runs' / run_id / 'lineage.json'}")
    if lineage:
        for n, rec in lineage["stages"].items():
            print(f"  {n:<7} : {rec['state']:<7} {rec['path']}")
        wandb_dirs = sorted({rec.get("result", {}).get("tracking", {}).get("wandb_dir")
                             for rec in lineage["stages"].values()} - {None})
        for d in wandb_dirs:
            print(f"  wandb   : {d}")
        if not wandb_dirs:
            print(f"  wandb   : {cfg.tracking.dir or root / 'wandb'} (no stage ran)")
    return code


def main(argv: list[str] | None = None) -> None:
    from training.prebuild import use_venv_ninja  # lazy: CLI start-up 0.1 s, 9 s with eager imports

    use_venv_ninja()  # one ninja for DeepSpeed's op builds here and in the Ray workers it starts
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["tune"]:  # its own flags, then the run's overrides
        from pipeline.tune import main as tune_main  # lazy: ray.tune and the graph; CLI start-up 0.1 s

        sys.exit(tune_main(argv[1:]))
    cmd, flags, rest = parse_argv(argv)
    if any(a.startswith("query=") for a in rest) and "COMP_LINE" in os.environ:  # -sc query=bash
        line, commands, cmd = completion_line(os.environ["COMP_LINE"])
        if commands:
            print(" ".join(commands))
        if line is None:
            sys.exit(0)
        os.environ["COMP_LINE"] = line
        rest = [a for a in rest if a in ("-sc", "--shell-completion") or a.startswith("query=")]
        cmd = "plan" if cmd == "plan" else "run"  # the cluster commands take the run's overrides
    if cmd == "plan":
        sys.exit(plan_main(rest))
    if cmd in CLUSTER_COMMANDS:
        sys.exit(submit_main(cmd, rest))

    import hydra  # lazy: hydra ~0.4 s; CLI start-up 0.1 s, 9 s with eager imports
    from omegaconf import DictConfig  # lazy: omegaconf ~0.15 s; CLI start-up 0.1 s, 9 s with eager imports

    from pipeline.config import (  # lazy: CLI start-up 0.1 s, 9 s with eager imports
        CONF_DIR,
        register,
        reset_sweep,
        to_dict,
        to_object,
    )
    register()
    reset_sweep()  # a sweep's id is made once per `spacetime` command
    sys.argv = [sys.argv[0], *rest]
    outcome = {"code": 0}

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def entry(dcfg: DictConfig) -> None:
        from pipeline.stages import graph_for  # lazy: CLI start-up 0.1 s, 9 s with eager imports

        try:
            cfg = to_object(dcfg)
        except Exception as e:  # __post_init__ checks of the component configs
            raise SystemExit(f"spacetime: invalid config: {e}") from None
        # The config keeps a credential given as an override; what records the command line
        # (lineage.json, info.json, W&B's run metadata) sees it redacted.
        literal = credential_overrides(rest)
        sys.argv = [sys.argv[0], *redact(rest)]
        if literal and cmd == "run":
            print(f"spacetime: {', '.join(literal)} set on the command line: redacted in what the run "
                  f"writes, but visible to anyone who lists this machine's processes; pass it as "
                  f"'${{oc.env:NAME}}' with NAME in the environment", file=sys.stderr)
        if cmd == "params":
            outcome["code"] = cmd_params(cfg)
            return
        if cmd == "status" and flags["sweep"]:
            outcome["code"] = cmd_sweep_status(cfg.run.root, flags["sweep"])
            return
        if cmd == "report":
            outcome["code"] = cmd_report(cfg.run.root, flags)
            return
        if cmd == "generate":
            outcome["code"] = cmd_generate(cfg.run.root, flags, cfg.cluster)
            return
        cfg_dict = to_dict(dcfg)
        try:
            graph = graph_for(cfg)
        except GraphError as e:
            raise SystemExit(f"spacetime: {e}") from None
        if cmd == "status":
            outcome["code"] = cmd_status(graph, cfg_dict)
            return
        try:
            preflight(cfg)
        except ValueError as e:
            raise SystemExit(f"spacetime: {e}") from None
        from pipeline.sweep import current_job  # lazy: CLI start-up 0.1 s, 9 s with eager imports

        code = cmd_run(graph, cfg, cfg_dict, flags, current_job())
        outcome["code"] = max(outcome["code"], code)  # a sweep fails if one of its jobs did

    entry()
    sys.exit(outcome["code"])


if __name__ == "__main__":
    main()
