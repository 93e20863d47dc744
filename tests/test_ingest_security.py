"""Ingest against untrusted and broken inputs: remote manifests that name local files or
other servers, servers that never answer or trickle, files and directories the listing
cannot read, symlinks, and a missing input caught before any stage.

Real parts throughout: synthetic mp4s, real HTTP servers on 127.0.0.1 (one that counts
requests, one that accepts and never answers, one that trickles), real permission bits
(when the tests run as root, the listing runs in a child without the capabilities that let
root ignore them), a real Ray cluster for the curation of the refused items.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import QuietHandler, serve_http

from data.probe import Prober, ProbeConfig
from data.synthetic import SourceConfig, generate
from pipeline.curation.blocklist import BlocklistConfig, check_blocklist
from pipeline.curation.curate import CurateConfig, CurateConfigs, read_rejects, run_curate, write_rejects
from pipeline.curation.fetch import FetchError, fetch
from pipeline.curation.ingest import IngestConfig, RemoteManifestConfig, check_inputs, fetch_item, list_inputs
from pipeline.curation.shots import ShotConfig
from pipeline.curation.scores import ScoreConfig


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """A real, curatable mp4 (2 s, 64x64)."""
    root = tmp_path_factory.mktemp("good")
    generate(SourceConfig(num_videos=2, bad_fraction=0.0, multishot_fraction=0.0, seconds=2.0),
             root)
    rows = [json.loads(x) for x in (root / "manifest.jsonl").read_text().splitlines()]
    return root / rows[0]["path"]


@pytest.fixture
def http_root(tmp_path):
    """A real HTTP server on 127.0.0.1 serving tmp_path/www; yields (dir, base URL, requests),
    `requests` listing every path asked for."""
    www = tmp_path / "www"
    www.mkdir()
    seen: list[str] = []

    class Counting(QuietHandler):
        def send_head(self):
            seen.append(self.path)
            return super().send_head()

    with serve_http(Counting, www) as url:
        yield www, url, seen


@pytest.fixture
def silent_url():
    """A server that accepts connections (the kernel completes them) and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


@pytest.fixture
def trickle_url():
    """A server that answers every request with 10 MB promised and 64 bytes every 50 ms: it
    never goes quiet long enough for a read timeout."""
    stop = threading.Event()

    class Trickle(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _head(self):
            self.send_response(200)
            self.send_header("Content-Length", str(10**7))
            self.end_headers()

        def do_HEAD(self):
            self._head()

        def do_GET(self):
            self._head()
            while not stop.is_set():
                try:
                    self.wfile.write(b"x" * 64)
                    self.wfile.flush()
                except OSError:
                    return
                stop.wait(0.05)  # the server's pace, not a test waiting

    with serve_http(Trickle) as url:
        yield url
        stop.set()


def reasons(items: list[dict]) -> list:
    return [it.get("reject", [None])[0] for it in items]


# ----- remote manifests ----------------------------------------------------------------------
def test_remote_manifest_entries_stay_on_its_own_scheme_and_host(tmp_path, http_root, good):
    www, base, seen = http_root
    port = int(base.rsplit(":", 1)[1])
    (www / "clips").mkdir()
    shutil.copy(good, www / "clips/good.mp4")
    secret = tmp_path / "secret.mp4"  # a video on the worker's disk, not on the server
    shutil.copy(good, secret)
    entries = [
        "clips/good.mp4",  # relative: the manifest's own location
        f"{base}/clips/good.mp4",  # the same, absolute (one item)
        "/etc/passwd",  # local paths and file:// URLs: the worker's disk
        f"file://{secret}",
        str(secret),
        "s3://bucket/x.mp4",  # another scheme
        "zip://a.mp4::file:///tmp/x.zip",  # fsspec chaining
        f"http://localhost:{port}/clips/good.mp4",  # the same server under another name
        "//169.254.169.254/latest/meta-data/x.mp4",  # scheme-relative: another host
        f"http://127.0.0.1:{port + 1}/x.mp4",  # another port
    ]
    (www / "index.jsonl").write_text("".join(json.dumps({"path": p}) + "\n" for p in entries))
    items = list_inputs(IngestConfig(inputs=[f"{base}/index.jsonl"]))
    assert [(it["url"], it.get("reject", [None])[0]) for it in items] == [
        (f"{base}/clips/good.mp4", None),
        ("/etc/passwd", "not_allowed_scheme"),
        (f"file://{secret}", "not_allowed_scheme"),
        (str(secret), "not_allowed_scheme"),
        ("s3://bucket/x.mp4", "not_allowed_scheme"),
        ("zip://a.mp4::file:///tmp/x.zip", "not_allowed_scheme"),
        (f"http://localhost:{port}/clips/good.mp4", "not_allowed_host"),
        ("http://169.254.169.254/latest/meta-data/x.mp4", "not_allowed_host"),
        (f"http://127.0.0.1:{port + 1}/x.mp4", "not_allowed_host"),
    ]
    assert "local path" in items[1]["reject"][1] and "remote_manifests" in items[1]["reject"][1]
    assert not any("index.jsonl" in it["reject"][1] for it in items[1:])  # (it may be signed)

    # A refused item is refused on the worker without a byte read or a request sent.
    cfg, bl = IngestConfig(), BlocklistConfig().build()
    seen.clear()
    for it in items[1:]:
        out, why = fetch_item(it, cfg, bl, tmp_path / "cache")
        assert out is None and why == tuple(it["reject"])
    assert seen == [] and not (tmp_path / "cache").exists()

    # What the user allows, in config: local paths, another host; a denied host never.
    allowed = list_inputs(IngestConfig(inputs=[f"{base}/index.jsonl"],
                                       remote_manifests=RemoteManifestConfig(
                                           allow_schemes=["file"], allow_hosts=["localhost"])))
    by_url = {it["url"]: it.get("reject", [None])[0] for it in allowed}
    assert by_url[str(secret)] is None and by_url["/etc/passwd"] is None  # resolved paths
    assert by_url[f"http://localhost:{port}/clips/good.mp4"] is None
    assert by_url["s3://bucket/x.mp4"] == "not_allowed_scheme"
    denied = list_inputs(IngestConfig(inputs=[f"{base}/index.jsonl"],
                                      remote_manifests=RemoteManifestConfig(
                                          allow_hosts=["*"], deny_hosts=["127.0.0.1"])))
    assert denied[0]["reject"][0] == "not_allowed_host"  # its own host, denied
    assert reasons(denied)[-3:-1] == [None, None]  # "*": localhost and the metadata host


def test_local_manifests_and_inputs_are_trusted(tmp_path, good):
    """The policy is for remote manifests only: the user's own manifest names anything."""
    (tmp_path / "m.jsonl").write_text(
        json.dumps({"path": str(good)}) + "\n" + json.dumps({"path": "s3://b/x.mp4"}) + "\n")
    items = list_inputs(IngestConfig(inputs=[str(tmp_path / "m.jsonl")]))
    assert [it["url"] for it in items] == [str(good), "s3://b/x.mp4"]
    assert reasons(items) == [None, None]


def test_reject_details_never_carry_file_contents(tmp_path):
    text = tmp_path / "passwd.mp4"
    text.write_text("root:x:0:0:root:/root:/bin/bash\nsecret-token-123\n" * 20)
    with Prober(ProbeConfig(timeout_s=5.0)) as p:
        info, why = p.probe(text)
    assert why[0] == "mislabelled"
    assert "root" not in why[1] and "secret" not in why[1] and "bash" not in why[1]


def test_refused_and_timed_out_items_are_rejects_of_a_ray_curation(tmp_path, http_root, good,
                                                                 silent_url, ray_local):
    """Through the curate stage's own code on Ray: the remote manifest's local entries are
    rejects with their reason (the local video is not curated, /etc/passwd's lines appear
    nowhere), a server that never answers is a fetch_timeout, the good file is curated."""
    www, base, _ = http_root
    shutil.copy(good, www / "good.mp4")
    secret = tmp_path / "secret.mp4"
    shutil.copy(good, secret)
    (www / "m.csv").write_text(f"path\ngood.mp4\n/etc/passwd\n{secret}\nfile://{secret}\n")
    (tmp_path / "raw/dir.mp4").mkdir(parents=True)  # a directory named like a video
    (tmp_path / "local.csv").write_text(f"path\n{silent_url}/hang.mp4\n")  # never answers
    ing = IngestConfig(inputs=[f"{base}/m.csv", str(tmp_path / "local.csv"), str(tmp_path / "raw")],
                       fetch_timeout_s=2.0, fetch_read_timeout_s=0.5, fetch_backoff_s=0.01)
    items = list_inputs(ing)
    c = CurateConfigs(ingest=ing, probe=ProbeConfig(timeout_s=5), shots=ShotConfig(),
                      scores=ScoreConfig(), curate=CurateConfig(group_size=2),
                      cache_dir=str(tmp_path / "cache"))
    t0 = time.monotonic()
    clips, rejects, _ = run_curate(items, c, tmp_path / "out", concurrency=2, log=lambda s: None)
    assert time.monotonic() - t0 < 90
    write_rejects(rejects, tmp_path / "out/rejects.parquet")
    got = {r["path"]: (r["stage"], r["reason"]) for r in read_rejects(tmp_path / "out")}
    assert got == {
        "/etc/passwd": ("ingest", "not_allowed_scheme"),
        str(secret): ("ingest", "not_allowed_scheme"),
        f"file://{secret}": ("ingest", "not_allowed_scheme"),
        f"{silent_url}/hang.mp4": ("ingest", "fetch_timeout"),
        str(tmp_path / "raw/dir.mp4"): ("ingest", "not_a_file"),
    }
    assert clips and {x["path"] for x in clips} == {f"{base}/good.mp4"}
    blob = (tmp_path / "out/rejects.parquet").read_bytes()
    assert b"root:" not in blob and b"/bin/" not in blob


# ----- remote fetches: deadlines and caps -----------------------------------------------------
def test_fetch_gives_up_on_a_server_that_never_answers(tmp_path, silent_url):
    # The read timeout: connecting works, no byte ever comes.
    t0 = time.monotonic()
    with pytest.raises(FetchError) as e:
        fetch(f"{silent_url}/a.mp4", tmp_path, retries=0, read_timeout_s=0.5, timeout_s=60)
    assert e.value.reason == "fetch_failed" and "Timeout" in e.value.detail
    assert time.monotonic() - t0 < 10
    # The deadline: retries of read timeouts would take 6 x 1 s; the file gets 1.5 s in all.
    t0 = time.monotonic()
    with pytest.raises(FetchError) as e:
        fetch(f"{silent_url}/a.mp4", tmp_path, retries=5, backoff_s=0.01, read_timeout_s=0.5,
              timeout_s=1.5)
    elapsed = time.monotonic() - t0
    assert e.value.reason == "fetch_timeout" and "ingest.fetch_timeout_s" in e.value.detail
    assert 1.5 <= elapsed < 5


def test_fetch_deadline_holds_against_a_trickle_and_the_next_fetch_works(tmp_path, trickle_url,
                                                                        http_root):
    t0 = time.monotonic()
    with pytest.raises(FetchError) as e:
        fetch(f"{trickle_url}/slow.mp4", tmp_path / "c", retries=5, backoff_s=0.01,
              read_timeout_s=5, timeout_s=1.5)
    assert e.value.reason == "fetch_timeout" and time.monotonic() - t0 < 5
    www, base, _ = http_root
    (www / "ok.mp4").write_bytes(os.urandom(3000))
    got = fetch(f"{base}/ok.mp4", tmp_path / "c", timeout_s=30)
    assert Path(got).read_bytes() == (www / "ok.mp4").read_bytes()


def test_remote_files_have_their_own_smaller_byte_cap(tmp_path, http_root, good):
    www, base, _ = http_root
    shutil.copy(good, www / "v.mp4")
    size = good.stat().st_size
    cfg, bl = IngestConfig(fetch_max_bytes=size - 1), BlocklistConfig().build()
    assert IngestConfig().fetch_max_bytes < ProbeConfig().max_bytes
    remote = {"id": "r", "url": f"{base}/v.mp4", "caption": "", "license": None,
              "source_url": None, "meta": {}}
    out, why = fetch_item(remote, cfg, bl, tmp_path / "cache", max_bytes=16 * 2**30)
    assert out is None and why == ("too_large",
                                   f"{size} bytes > {size - 1} (ingest.fetch_max_bytes)")
    out, why = fetch_item({**remote, "url": str(good)}, cfg, bl, tmp_path / "cache",
                          max_bytes=16 * 2**30)
    assert why is None and out["local_path"] == str(good)  # local files: probe.max_bytes
    out, why = fetch_item(remote, IngestConfig(), bl, tmp_path / "cache", max_bytes=size - 1)
    assert why == ("too_large", f"{size} bytes > {size - 1}")  # the smaller cap wins


# ----- files the listing cannot read ----------------------------------------------------------
LIST = """
import json, sys
from pipeline.stages import ingest_items
from pipeline.curation.ingest import IngestConfig
try:
    open(sys.argv[2]).read()
    readable = True
except PermissionError:
    readable = False
warnings = []
items = ingest_items(IngestConfig(inputs=[sys.argv[1]]), warnings)
print(json.dumps({"readable": readable, "items": items, "warnings": warnings}))
"""


def run_bound_by_permissions(code: str, *args: str) -> subprocess.CompletedProcess:
    """`python -c code args` in a child that file permissions bind. As root (tests run as
    root here and in CI) the child runs under util-linux's `setpriv` without
    CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH in its bounding set: it keeps uid 0, but mode
    000 denies it like anyone else."""
    cmd = [sys.executable, "-c", code, *args]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without util-linux's setpriv to drop its capabilities")
        cmd = [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--", *cmd]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if r.returncode and "setpriv:" in r.stderr:
        pytest.skip(f"cannot drop root's file capabilities here: {r.stderr.strip()}")
    return r


def test_unreadable_sidecar_subdirectory_and_directory_named_like_a_video(tmp_path, good):
    raw = tmp_path / "raw"
    (raw / "secret").mkdir(parents=True)
    (raw / "x.mp4").mkdir()
    for name in ("a.mp4", "ok.mp4", "secret/hidden.mp4", "x.mp4/inner.mp4"):
        shutil.copy(good, raw / name)
    (raw / "a.txt").write_text("a caption nobody may read")
    (raw / "ok.txt").write_text("a readable caption")
    os.chmod(raw / "a.txt", 0)
    os.chmod(raw / "secret", 0)
    try:
        r = run_bound_by_permissions(LIST, str(raw), str(raw / "a.txt"))
    finally:
        os.chmod(raw / "a.txt", 0o644)
        os.chmod(raw / "secret", 0o755)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["readable"] is False  # the child really is bound by the mode bits
    got = [(os.path.relpath(it["url"], raw), it["caption"], it.get("reject", [None])[0])
           for it in out["items"]]
    assert got == [("a.mp4", "", "sidecar_unreadable"), ("ok.mp4", "a readable caption", None),
                   ("x.mp4", "", "not_a_file"), ("x.mp4/inner.mp4", "", None)]
    assert "a.txt" in out["items"][0]["reject"][1] and "Permission" in out["items"][0]["reject"][1]
    assert len(out["warnings"]) == 1
    assert str(raw / "secret") in out["warnings"][0] and "unreadable" in out["warnings"][0]


# ----- symlinks -------------------------------------------------------------------------------
def test_symlinks_resolve_to_one_input(tmp_path, good):
    real = tmp_path / "store"
    real.mkdir()
    shutil.copy(good, real / "a.mp4")
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "link.mp4").symlink_to(real / "a.mp4")
    (raw / "same.mp4").symlink_to("../store/a.mp4")
    (raw / "more").symlink_to(real, target_is_directory=True)
    (tmp_path / "m.csv").write_text("path\nraw/link.mp4\nstore/a.mp4\n")
    warnings: list[str] = []
    items = list_inputs(IngestConfig(inputs=[str(raw), str(real), str(tmp_path / "m.csv"),
                                             str(raw / "link.mp4")]), warnings)
    assert [it["url"] for it in items] == [str(real / "a.mp4")]  # one file, decoded once
    assert warnings == [f"{raw / 'more'}: a symlink to a directory, not followed"]
    # A blocklisted path prefix still matches an item reached through a symlinked directory.
    (tmp_path / "alias").symlink_to(real, target_is_directory=True)
    bl = BlocklistConfig(sources=[f"{tmp_path / 'alias'}/"]).build()
    assert check_blocklist(items[0], bl)[0] == "opted_out"


# ----- a missing input, before any stage ------------------------------------------------------
def test_missing_ingest_input_is_named_before_any_stage(tmp_path):
    (tmp_path / "raw").mkdir()
    check_inputs(IngestConfig(inputs=[str(tmp_path / "raw"), f"{tmp_path}/raw/*.mp4",
                                      "https://example.com/list.csv"]))  # remote: not looked up
    with pytest.raises(ValueError, match=r"ingest.inputs\[1\]: .*nope does not exist"):
        check_inputs(IngestConfig(inputs=[str(tmp_path / "raw"), str(tmp_path / "nope")]))
    with pytest.raises(ValueError, match=r"ingest.inputs\[0\]: the directory of the glob"):
        check_inputs(IngestConfig(inputs=[f"{tmp_path}/gone/*/clips/*.mp4"]))
    with pytest.raises(ValueError, match="ingest.inputs is empty"):
        check_inputs(IngestConfig())

    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "source=ingest",
                        f"ingest.inputs=[{tmp_path}/raw,{tmp_path}/missing]",
                        f"run.root={tmp_path}/out", "tracking=disabled"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "ingest.inputs[1]" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "out").exists()  # no stage started
