"""Run the graph on a Ray cluster through Ray's Job Submission API, and watch it.

    spacetime submit [--address ADDR] [--only STAGE | --from STAGE] [--follow] [overrides...]
    spacetime submit --replay RUN [--only/--from STAGE] [--address ADDR] [--follow] [overrides...]
    spacetime jobs   [--address ADDR]
    spacetime logs JOB [--address ADDR] [--follow]
    spacetime stop JOB [--address ADDR]

ADDR is the HTTP address of the Ray dashboard, where the job API lives: ``--address``, else
``RAY_API_SERVER_ADDRESS``, else ``RAY_ADDRESS`` when it is an http(s) URL, else
``http://127.0.0.1:8265``, which is where an SSH tunnel or ``kubectl port-forward`` puts it
(every template in cluster/ keeps the dashboard on loopback or behind a token). A cluster with
Ray token authentication needs ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN`` (or
``RAY_AUTH_TOKEN_PATH``) in the submitter's environment; Ray's client sends it as a header.

A submission is ``python -m pipeline.cli run [--only/--from STAGE] overrides...`` with:

- ``working_dir``: this checkout (without .git, .venv, outputs, wandb and what .gitignore
  excludes), so the job runs the submitter's code, uncommitted changes included;
- ``env_vars``: ``SPACETIME_RUN_ID`` (made here, so the job id, the run id, the W&B group and
  ``<run.root>/runs/<run_id>/`` are known before the job starts), ``SPACETIME_SUBMIT`` (the
  submitter's git commit, dirty files and a digest of their changes, who, when, the job id;
  ``spacetime run`` copies it into lineage.json and every stage's info.json), the non-secret
  W&B settings the submitter has set, and the workers' allocator setting
  (``training.memory.worker_env``) (the driver's own ``ray.init`` sends only variables that
  differ from the job's, so Ray never sees a conflicting key);
- never ``WANDB_API_KEY`` or any other secret. Ray writes every ``env_vars`` value in plain
  text to each node's ``runtime_env_agent.log`` and serves it to anyone who can read the job
  API (ray-project/ray#39502). The key reaches the cluster through its own secret store,
  filled from the submitter's environment without a file (cluster/README.md, "W&B key").
  Nor in the command line: an override that sets a credential (``data.redact``, e.g.
  ``ingest.storage_options.secret=...``) is refused; ``'${oc.env:NAME}'`` passes it by name.

The job id is ``spacetime-<run id>``; ``logs``/``stop`` accept either.

``--replay RUN`` submits a recorded run again: RUN is its lineage.json (a path or URL) or its
run id under ``run.root`` (given as an override, else the configured one). The replay has the
run's stage selection (``--only``/``--from``/``--until``; an ``--only``/``--from`` given here
replaces it: one stage of that run again) and overrides, plus the overrides given here (which
win, e.g. another ``run.root`` or ``cluster.*``). It is refused, with the equivalent plain
``submit`` command, unless this checkout is the recorded commit with the same uncommitted
changes (equal digest; none if the run had none) and every stage hash equals the recorded
one. So a replay into the same ``run.root`` reruns only what the run forced.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import logging
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from data.redact import REDACTED, credential_overrides
from data.storage import Store, has_scheme, is_url
from pipeline.graph import GraphError
from pipeline.provenance import REPO, git_state, new_run_id
from training.memory import worker_env

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
JOB_PREFIX = "spacetime-"
# Never shipped, whatever the .gitignore says (gitignore-style patterns, as Ray reads them).
EXCLUDES = [".git", ".venv", "venv", "outputs", "wandb", "*.egg-info", "__pycache__",
            ".pytest_cache", "*.pyc"]
# Environment passed through to the job when the submitter has set it: settings, not secrets.
PASS_THROUGH = ("WANDB_ENTITY", "WANDB_PROJECT", "WANDB_MODE", "WANDB_BASE_URL", "HF_HUB_OFFLINE")
USAGE = __doc__


class SubmitError(Exception):
    """A problem to report in one line (exit code 2), before or instead of a traceback."""


# ----- arguments --------------------------------------------------------------------------
def parse_args(cmd: str, argv: list[str]) -> dict[str, Any]:
    """Our flags for each command; everything else of `submit` is a Hydra override."""
    out: dict[str, Any] = {"address": None, "only": None, "from_": None, "replay": None,
                           "follow": False, "job": None, "overrides": []}
    names = {"--address": "address", "--only": "only", "--from": "from_", "--replay": "replay"}
    it = iter(argv)
    for a in it:
        key, val = (a.split("=", 1) + [None])[:2] if a.startswith("--") else (a, None)
        if key in names:
            if val is None:
                val = next(it, None)
            if not val or val.startswith("-"):
                raise SubmitError(f"{key} needs a value")
            if key != "--address" and cmd != "submit":
                raise SubmitError(f"{key} belongs to 'submit'")
            out[names[key]] = val
        elif a == "--follow" and cmd in ("submit", "logs"):
            out["follow"] = True
        elif a in ("-h", "--help"):
            out["help"] = True
        elif a.startswith("-"):
            raise SubmitError(f"unknown option '{a}' for '{cmd}'")
        elif cmd == "submit":
            if "=" not in a:
                raise SubmitError(f"'{a}' is not an override (key=value or group=option)")
            out["overrides"].append(a)
        elif cmd in ("logs", "stop") and out["job"] is None:
            out["job"] = a
        else:
            raise SubmitError(f"unexpected argument '{a}' for '{cmd}'")
    if cmd in ("logs", "stop") and not out["job"] and not out.get("help"):
        raise SubmitError(f"'{cmd}' needs a job id (see `spacetime jobs`)")
    if out["only"] and out["from_"]:
        raise SubmitError("use either --only or --from, not both")
    return out


def resolve_address(flag: str | None) -> str:
    addr = flag or os.environ.get("RAY_API_SERVER_ADDRESS") or ""
    if not addr:
        env = os.environ.get("RAY_ADDRESS", "")
        addr = env if env.startswith(("http://", "https://")) else DEFAULT_ADDRESS
    if not has_scheme(addr):
        addr = "http://" + addr
    return addr.rstrip("/")


def compose_run_config(overrides: list[str]) -> tuple[Any, dict]:
    """The run config the job will see (object, plain dict), composed here so a typo fails
    before submitting."""
    from hydra import compose, initialize_config_dir  # lazy: hydra ~0.4 s; CLI start-up 0.1 s, 9 s with eager imports
    from hydra.core.global_hydra import GlobalHydra  # lazy: hydra ~0.4 s; CLI start-up 0.1 s, 9 s with eager imports

    from pipeline.config import (  # lazy: CLI start-up 0.1 s, 9 s with eager imports
        CONF_DIR,
        register,
        to_dict,
        to_object,
    )

    register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            dcfg = compose("config", overrides=overrides)
        return to_object(dcfg), to_dict(dcfg)
    except Exception as e:  # composition and the component configs' own checks
        cause = e.__cause__ or e
        raise SubmitError(f"invalid config: {type(e).__name__}: {e}"
                          + (f" ({cause})" if cause is not e else "")) from None


def check_run_root(root: str) -> None:
    if is_url(root):  # a bucket: every node reaches it through fsspec
        return
    if not Path(root).is_absolute():
        raise SubmitError(
            f"run.root={root!r} is relative: on the cluster it would resolve inside the job's "
            f"temporary copy of the working directory and vanish with it. Pass storage every "
            f"node sees, e.g. run.root=/shared/spacetime")


# ----- the client -------------------------------------------------------------------------
def client(address: str):
    from ray.job_submission import (
        JobSubmissionClient,  # lazy: ray ~1.7 s (ray.train ~4.7 s); CLI start-up 0.1 s, 9 s with eager imports
    )

    for name, level in (("ray.dashboard.modules", logging.WARNING),  # upload/websocket chatter
                        ("ray._private.runtime_env", logging.ERROR)):  # ".git is now ignored"
        logging.getLogger(name).setLevel(level)
    try:
        return JobSubmissionClient(address)
    except Exception as e:  # noqa: BLE001 - ConnectionError, AuthenticationError, ...
        raise SubmitError(explain(e, address)) from None


def explain(e: Exception, address: str) -> str:
    text = str(e)
    # an HTTP 401/403, not those digits inside the address's port (127.0.0.1:40193)
    status = re.search(r"(?<![\w.:])(401|403)(?!\w)", text.replace(address, ""))
    if type(e).__name__ == "AuthenticationError" or status:
        return (f"the Ray job API at {address} refused the request ({text.splitlines()[0]}). "
                f"It uses token authentication: export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN "
                f"(or RAY_AUTH_TOKEN_PATH) as given by whoever runs the cluster")
    if isinstance(e, ConnectionError) or "Failed to connect" in text or "Connection" in text:
        return (f"cannot reach the Ray job API at {address}. Is the tunnel up? "
                f"(ssh -N -L 8265:127.0.0.1:8265 <head>, or kubectl port-forward "
                f"svc/<cluster>-head-svc 8265:8265; see cluster/README.md)")
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def find_job(c, job: str) -> str:
    """Accept a job id or a run id; returns the job id."""
    for candidate in (job, JOB_PREFIX + job):
        try:
            c.get_job_info(candidate)
            return candidate
        except RuntimeError:
            continue
    raise SubmitError(f"no job '{job}' at this address (see `spacetime jobs`)")


# ----- commands ---------------------------------------------------------------------------
def build_submission(overrides: list[str], only: str | None, from_: str | None,
                     address: str, run_id: str | None = None, *, until: str | None = None,
                     replay_of: dict | None = None, git: dict | None = None) -> dict[str, Any]:
    """Everything `submit` sends, without sending it (tests read this)."""
    from pipeline.stages import graph_for  # lazy: CLI start-up 0.1 s, 9 s with eager imports

    literal = credential_overrides(overrides)
    if literal:
        raise SubmitError(
            f"{', '.join(literal)} would send a credential in the job's command line, which Ray "
            f"keeps in plain text; give the nodes the storage's own variables "
            f"(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS) or pass "
            f"it as '${{oc.env:NAME}}', with NAME set here and on the nodes")
    cfg, cfg_dict = compose_run_config(overrides)
    check_run_root(cfg.run.root)
    try:
        graph = graph_for(cfg)
        for stage in (only, from_, until):  # this config's stages (a recipe names its own)
            graph.check_stage(stage)
        hashes = graph.hashes(cfg_dict)
    except GraphError as e:
        raise SubmitError(str(e)) from None
    run_id = run_id or new_run_id()
    job_id = JOB_PREFIX + run_id
    git = git or git_state()
    stage_flags = [f for flag, v in (("--only", only), ("--from", from_), ("--until", until))
                   if v for f in (flag, v)]
    entrypoint = shlex.join(["python", "-m", "pipeline.cli", "run", *stage_flags, *overrides])
    submitted = {"job_id": job_id, "address": address, "time": time.time(),
                 "user": getpass.getuser(), "host": platform.node(), "git": git,
                 "argv": ["submit", *stage_flags, *overrides]}
    if replay_of:
        submitted["replay_of"] = replay_of
    env = {k: os.environ[k] for k in PASS_THROUGH if os.environ.get(k)}
    env.update({"SPACETIME_RUN_ID": run_id, "SPACETIME_SUBMIT": json.dumps(submitted), **worker_env()})
    metadata = {"spacetime_run_id": run_id, "spacetime_commit": git.get("commit") or "",
                "spacetime_dirty": str(git.get("dirty")).lower(),
                "spacetime_args": shlex.join([*stage_flags, *overrides]),
                "spacetime_run_root": cfg.run.root, "spacetime_submitter":
                f"{submitted['user']}@{submitted['host']}"}
    return {"entrypoint": entrypoint, "submission_id": job_id, "metadata": metadata,
            "runtime_env": {"working_dir": str(REPO), "excludes": list(EXCLUDES),
                            "env_vars": env},
            "run_id": run_id, "run_root": cfg.run.root, "git": git, "cluster": cfg.cluster,
            "hashes": hashes, "replay_of": replay_of}


# ----- replay -----------------------------------------------------------------------------
def load_lineage(ref: str, overrides: list[str]) -> tuple[dict, str]:
    """A run's lineage.json from its path or URL, or from its run id under run.root."""
    if ref.endswith(".json") or is_url(ref) or "/" in ref:
        path = ref if ref.endswith(".json") else ref.rstrip("/") + "/lineage.json"
        parent, name = path.rsplit("/", 1) if "/" in path else (".", path)
    else:
        roots = [o.split("=", 1)[1] for o in overrides if o.startswith("run.root=")]
        root = roots[-1] if roots else compose_run_config([])[0].run.root
        parent, name = f"{root.rstrip('/')}/runs/{ref}", "lineage.json"
    store = Store(parent)
    if not store.exists(name):
        raise SubmitError(f"no lineage at {parent}/{name} (a run id is looked up under "
                          f"run.root; pass run.root=... or the lineage.json itself)")
    return store.read_json(name), store.url_of(name)


def recorded_invocation(lineage: dict) -> tuple[list[str], list[str]]:
    """The stage flags and the overrides a run was started with."""
    if "stage_flags" in lineage:  # written by `spacetime run`
        return list(lineage["stage_flags"]), list(lineage.get("argv") or [])
    argv = (lineage.get("submit") or {}).get("argv")
    if argv:  # a submitted run from before `spacetime run` recorded its flags
        a = parse_args("submit", argv[1:])
        flags = ["--only", a["only"]] if a["only"] else ["--from", a["from_"]] if a["from_"] else []
        return flags, a["overrides"]
    raise SubmitError("the lineage does not record which stages the run forced (it was made "
                      "by an older spacetime); submit its overrides by hand")


def code_difference(recorded: dict, current: dict) -> str | None:
    """Why this checkout (`current`, a git_state()) is not the code a run recorded, or None."""
    rec, cur = recorded.get("commit"), current.get("commit")
    if not rec:
        return "the lineage records no git commit, so its code cannot be identified"
    if not cur:
        return f"this directory is not a git checkout ({current.get('error', 'no commit')})"
    if rec != cur:
        return (f"the run ran at commit {rec[:12]} and this checkout is at {cur[:12]}; check it "
                f"out (git worktree add ../replay-{rec[:8]} {rec}) and replay from there")
    if recorded.get("dirty"):
        digest = recorded.get("diff_sha256")
        if not digest:
            return ("the run had uncommitted changes and the lineage has no digest of them, so "
                    "its code cannot be identified")
        if current.get("diff_sha256") != digest:
            mine = (f"differ (digest {current['diff_sha256'][:12]})" if current.get("dirty")
                    else "are none")
            return (f"the run shipped {recorded.get('changed_count', '?')} uncommitted file(s) "
                    f"(digest {digest[:12]}), which the lineage names but does not contain; "
                    f"this checkout's uncommitted changes {mine}")
    elif current.get("dirty"):
        more = ", ..." if current["changed_count"] > 3 else ""
        return (f"this checkout has {current['changed_count']} uncommitted file(s) "
                f"({', '.join(current['changed'][:3])}{more}) that would ship with the replay; "
                f"commit or stash them")
    return None


def build_replay(ref: str, overrides: list[str], address: str, run_id: str | None = None,
                 only: str | None = None, from_: str | None = None) -> dict[str, Any]:
    """The submission that reruns a recorded run (refused if it would not reproduce it);
    `only`/`from_` replace the run's own stage selection."""
    lineage, where = load_lineage(ref, overrides)
    flags, recorded = recorded_invocation(lineage)
    # A credential the run was given on its command line was not recorded: the job gets it
    # from its environment (or from an override given here).
    recorded = [o for o in recorded if REDACTED not in o]
    if only or from_:
        flags = ["--only", only] if only else ["--from", from_]
    by_hand = shlex.join(["spacetime", "submit", *flags, *recorded, *overrides])
    orig = lineage.get("run_id", "?")
    git = git_state()
    why = code_difference((lineage.get("submit") or {}).get("git") or lineage.get("git") or {},
                          git)
    if why:
        raise SubmitError(f"not replaying run {orig}: {why}. To submit its overrides on this "
                          f"code anyway: {by_hand}")
    given = dict(zip(flags[::2], flags[1::2]))
    sub = build_submission([*recorded, *overrides], given.get("--only"), given.get("--from"),
                           address, run_id, until=given.get("--until"),
                           replay_of={"run_id": orig, "lineage": where}, git=git)
    old = {n: rec.get("hash") for n, rec in (lineage.get("stages") or {}).items()}
    differ = [n for n, h in sub["hashes"].items() if old.get(n) != h]
    if differ:
        raise SubmitError(f"not replaying run {orig}: with these overrides the stage hashes of "
                          f"{', '.join(differ)} differ from the recorded ones, so it would be "
                          f"another run. To submit it anyway: {by_hand}")
    return sub


def cmd_submit(args: dict) -> int:
    address = resolve_address(args["address"])
    if args["replay"]:
        sub = build_replay(args["replay"], args["overrides"], address, only=args["only"],
                           from_=args["from_"])
    else:
        sub = build_submission(args["overrides"], args["only"], args["from_"], address)
    c = client(address)
    try:
        job_id = c.submit_job(entrypoint=sub["entrypoint"], submission_id=sub["submission_id"],
                              runtime_env=sub["runtime_env"], metadata=sub["metadata"])
    except Exception as e:  # noqa: BLE001
        raise SubmitError(f"submission failed: {explain(e, address)}") from None
    git, at = sub["git"], ("" if address == DEFAULT_ADDRESS else f" --address {address}")
    commit = (git.get("commit") or "unknown")[:12]
    if git.get("dirty"):
        commit += (f" + {git['changed_count']} uncommitted file(s), shipped and recorded "
                   f"(digest {git['diff_sha256'][:12]}); commit them for a reproducible run")
    print(f"submitted job {job_id} to {address}")
    print(f"  run id  : {sub['run_id']}")
    print(f"  commit  : {commit}")
    print(f"  command : {sub['entrypoint']}")
    if sub["replay_of"]:
        print(f"  replay  : of run {sub['replay_of']['run_id']} ({sub['replay_of']['lineage']}): "
              f"same code, same {len(sub['hashes'])} stage hashes")
    cl = sub["cluster"]
    hint = ")" if cl.use_gpu else ", add cluster=ray for one GPU each)"
    print(f"  workers : {cl.num_workers} training workers on {'GPU' if cl.use_gpu else 'CPU'} "
          f"(cluster={cl.name}{hint}")
    print(f"  lineage : {sub['run_root']}/runs/{sub['run_id']}/lineage.json (cluster storage)")
    if os.environ.get("WANDB_API_KEY"):
        print("  wandb   : WANDB_API_KEY is not sent with the job (Ray would log it); runs are "
              "online if the cluster's nodes have the key (cluster/README.md, 'W&B key')")
    print(f"follow  : spacetime logs {job_id} --follow{at}")
    print(f"status  : spacetime jobs{at}")
    print(f"stop    : spacetime stop {job_id}{at}")
    sys.stdout.flush()
    if args["follow"]:
        return follow(c, job_id)
    return 0


def follow(c, job_id: str) -> int:
    async def tail():
        async for chunk in c.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        print(f"\n(stopped following; the job goes on: spacetime stop {job_id})")
        return 130
    status = wait_terminal(c, job_id, timeout=60)
    print(f"job {job_id}: {status}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


def wait_terminal(c, job_id: str, timeout: float) -> str:
    deadline = time.time() + timeout
    while True:
        status = c.get_job_status(job_id)
        if status.is_terminal() or time.time() > deadline:
            return str(status.value)
        time.sleep(1)


def _when(t_ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t_ms / 1000)) if t_ms else "-"


def cmd_jobs(args: dict) -> int:
    address = resolve_address(args["address"])
    c = client(address)
    try:
        jobs = sorted(c.list_jobs(), key=lambda j: j.start_time or 0)
    except Exception as e:  # noqa: BLE001
        raise SubmitError(explain(e, address)) from None
    print(f"{'JOB':<36} {'STATUS':<10} {'STARTED':<19} {'DURATION':>9}  RUN / WHAT")
    now = time.time() * 1000
    for j in jobs:
        md = j.metadata or {}
        job = j.submission_id or j.job_id or "-"
        dur = ((j.end_time or now) - j.start_time) / 1000 if j.start_time else None
        what = (f"{md['spacetime_run_id']}  {md.get('spacetime_args', '')}".rstrip()
                if "spacetime_run_id" in md else j.entrypoint)
        print(f"{job:<36} {j.status.value:<10} {_when(j.start_time):<19} "
              f"{(f'{dur:.0f}s' if dur is not None else '-'):>9}  {what}")
    return 0


def cmd_logs(args: dict) -> int:
    address = resolve_address(args["address"])
    c = client(address)
    job_id = find_job(c, args["job"])
    if args["follow"]:
        return follow(c, job_id)
    sys.stdout.write(c.get_job_logs(job_id))
    return 0


def cmd_stop(args: dict) -> int:
    address = resolve_address(args["address"])
    c = client(address)
    job_id = find_job(c, args["job"])
    if c.get_job_status(job_id).is_terminal():
        print(f"job {job_id} already {c.get_job_status(job_id).value}")
        return 0
    c.stop_job(job_id)
    status = wait_terminal(c, job_id, timeout=60)
    print(f"job {job_id}: {status}")
    return 0 if status == "STOPPED" else 1


COMMANDS = {"submit": cmd_submit, "jobs": cmd_jobs, "logs": cmd_logs, "stop": cmd_stop}


def main(cmd: str, argv: list[str]) -> int:
    try:
        args = parse_args(cmd, argv)
        if args.get("help"):
            print(USAGE)
            return 0
        return COMMANDS[cmd](args)
    except SubmitError as e:
        print(f"spacetime {cmd}: {e}", file=sys.stderr)
        return 2
