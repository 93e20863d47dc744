"""Ingest (listing, manifests, remote fetch, blocklist) and the hardened probe.

Real files throughout: synthetic mp4s, the hostile kinds of `data.bad_inputs`, a real HTTP
server on 127.0.0.1, fsspec's memory filesystem, and (when moto is installed) a local S3
server. One prober child serves the whole module, as one would serve a Ray worker.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
from conftest import QuietHandler, serve_http

from data import bad_inputs
from data.probe import REASONS, Prober, ProbeConfig, safe_probe
from data.synthetic import BAD_KINDS, SourceConfig, generate
from pipeline.curation.blocklist import BlocklistConfig, check_blocklist
from pipeline.curation.fetch import FetchError, fetch
from pipeline.curation.ingest import IngestConfig, fetch_item, list_inputs, make_id

# The synthetic source labels are coarse ("unreadable" for everything that fails to open);
# the probe names the exact reason. "frozen" is a good file for the probe (motion is scored
# later, in curation).
SYNTHETIC_PROBE_REASON = {"zero_byte": "empty_file", "truncated": "unreadable",
                          "random_bytes": "unreadable", "frozen": "keep",
                          "too_short": "too_short", "tiny": "low_resolution"}


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """Synthetic videos (2 good, one of each bad kind) and every hostile kind but the FIFO."""
    root = tmp_path_factory.mktemp("videos")
    generate(SourceConfig(num_videos=8, bad_fraction=0.75, multishot_fraction=0.0, seconds=2.0),
             root / "synthetic")
    bad_inputs.make_all(root / "hostile", [k for k in bad_inputs.KINDS if k != "fifo"])
    return root


@pytest.fixture(scope="module")
def prober():
    with Prober(ProbeConfig(timeout_s=5.0)) as p:
        yield p


@pytest.fixture
def http_root(tmp_path):
    """A real HTTP server on 127.0.0.1 serving tmp_path/www; yields (dir, base URL)."""
    www = tmp_path / "www"
    www.mkdir()

    with serve_http(QuietHandler, www) as url:
        yield www, url


def good_mp4(videos: Path) -> Path:
    rows = [json.loads(x) for x in (videos / "synthetic/manifest.jsonl").read_text().splitlines()]
    return videos / "synthetic" / next(r["path"] for r in rows if r["expected"] == "keep")


# ----- listing ------------------------------------------------------------------------------
def test_directory_listing_is_recursive_by_extension_with_sidecar_captions(tmp_path, videos):
    src = good_mp4(videos)
    (tmp_path / "raw/sub/deeper").mkdir(parents=True)
    shutil.copy(src, tmp_path / "raw/a.mp4")
    shutil.copy(src, tmp_path / "raw/sub/b.MKV")
    shutil.copy(src, tmp_path / "raw/sub/deeper/c.webm")
    (tmp_path / "raw/sub/b.txt").write_text("  a red ball bounces \n")
    (tmp_path / "raw/notes.md").write_text("not a video")
    (tmp_path / "raw/sub/d.mp3").write_bytes(b"ID3")

    items = list_inputs(IngestConfig(inputs=[str(tmp_path / "raw")]))
    names = [os.path.relpath(i["url"], tmp_path / "raw") for i in items]
    assert names == ["a.mp4", "sub/b.MKV", "sub/deeper/c.webm"]  # sorted, extension case-blind
    assert all(os.path.isabs(i["url"]) for i in items)
    assert [i["caption"] for i in items] == ["", "a red ball bounces", ""]
    assert items[0]["id"] == make_id(items[0]["url"])
    assert re.fullmatch(r"a-[0-9a-f]{12}", items[0]["id"])
    assert list_inputs(IngestConfig(inputs=[str(tmp_path / "raw")])) == items  # deterministic

    flat = list_inputs(IngestConfig(inputs=[str(tmp_path / "raw")], recursive=False))
    assert [os.path.basename(i["url"]) for i in flat] == ["a.mp4"]
    only_mkv = list_inputs(IngestConfig(inputs=[str(tmp_path / "raw")], extensions=["mkv"]))
    assert [os.path.basename(i["url"]) for i in only_mkv] == ["b.MKV"]

    # A glob, a file:// URL and a repeated directory: one item per URL, first listing wins.
    mixed = list_inputs(IngestConfig(inputs=[
        f"{tmp_path}/raw/sub/*/*.webm", f"file://{tmp_path}/raw/a.mp4", str(tmp_path / "raw")]))
    assert [os.path.basename(i["url"]) for i in mixed] == ["c.webm", "a.mp4", "b.MKV"]
    assert len({i["id"] for i in mixed}) == 3

    with pytest.raises(FileNotFoundError):
        list_inputs(IngestConfig(inputs=[str(tmp_path / "nope")]))
    with pytest.raises(ValueError, match="no files"):
        list_inputs(IngestConfig(inputs=[str(tmp_path / "raw")], extensions=[".flv"]))


def _write_manifest(path: Path, rows: list[dict]) -> None:
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.name.endswith(".csv"):
        import csv

        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    else:
        text = "".join(json.dumps(r) + "\n" for r in rows)
        if path.name.endswith(".gz"):
            path.write_bytes(gzip.compress(text.encode()))
        else:
            path.write_text(text)


@pytest.mark.parametrize("name", ["m.csv", "m.parquet", "m.jsonl", "m.jsonl.gz"])
def test_manifests_carry_caption_license_source_and_extra_columns(tmp_path, name):
    (tmp_path / "data/clips").mkdir(parents=True)
    rows = [
        {"path": "clips/a.mp4", "caption": "a cat", "license": "CC-BY-4.0",
         "source_url": "https://example.com/v/1", "creator": "alice", "year": "2021"},
        {"path": str(tmp_path / "elsewhere/b.mkv"), "caption": "", "license": "",
         "source_url": "", "creator": "bob", "year": "2022"},
        {"path": "s3://bucket/c.mp4", "caption": "a dog", "license": "CC0",
         "source_url": "https://other.org/2", "creator": "", "year": "2023"},
    ]
    _write_manifest(tmp_path / "data" / name, rows)
    items = list_inputs(IngestConfig(inputs=[str(tmp_path / "data" / name)],
                                     default_license="unknown"))
    assert [i["url"] for i in items] == [str(tmp_path / "data/clips/a.mp4"),
                                         str(tmp_path / "elsewhere/b.mkv"), "s3://bucket/c.mp4"]
    assert [i["caption"] for i in items] == ["a cat", "", "a dog"]
    assert [i["license"] for i in items] == ["CC-BY-4.0", "unknown", "CC0"]  # empty -> default
    assert [i["source_url"] for i in items] == [
        "https://example.com/v/1", None, "https://other.org/2"]
    assert [i["meta"] for i in items] == [{"creator": "alice", "year": "2021"},
                                          {"creator": "bob", "year": "2022"},
                                          {"creator": "", "year": "2023"}]
    json.dumps(items)  # everything is plain JSON, ready for the shards' .json

    renamed = tmp_path / "data" / name.replace("m.", "r.")
    _write_manifest(renamed, [{"file": "clips/a.mp4", "text": "a cat", "n": "1"}])
    cfg = IngestConfig(inputs=[str(renamed)], path_column="file", caption_column="text")
    (item,) = list_inputs(cfg)
    assert item["caption"] == "a cat" and item["meta"] == {"n": "1"} and item["license"] is None
    with pytest.raises(ValueError, match="no 'path'"):
        list_inputs(IngestConfig(inputs=[str(renamed)]))


def test_parquet_manifest_keeps_typed_columns(tmp_path):
    _write_manifest(tmp_path / "m.parquet", [
        {"path": "a.mp4", "score": 0.5, "tags": ["x", "y"], "n": 3},
        {"path": "b.mp4", "score": None, "tags": [], "n": 4},
    ])
    items = list_inputs(IngestConfig(inputs=[str(tmp_path / "m.parquet")]))
    assert [i["meta"] for i in items] == [{"score": 0.5, "tags": ["x", "y"], "n": 3},
                                          {"score": None, "tags": [], "n": 4}]


# ----- blocklist ----------------------------------------------------------------------------
def test_blocklist_excludes_by_source_licence_and_hash(tmp_path, videos):
    good = good_mp4(videos)
    other = videos / "hostile/mpeg4_avi.avi"
    digest = hashlib.sha256(good.read_bytes()).hexdigest()
    (tmp_path / "block.yaml").write_text(  # the file adds to the inline lists
        "sources: [optout.org, 'https://example.com/user/bob/']\n"
        f"sha256: ['SHA256:{digest.upper()}']\n")
    bl = BlocklistConfig(path=str(tmp_path / "block.yaml"),
                         sources=[str(tmp_path / "private") + "/"],
                         licenses=["CC BY-NC 4.0"]).build()

    def item(url="/data/x.mp4", source_url=None, license=None):
        return {"id": "x", "url": url, "caption": "", "license": license,
                "source_url": source_url, "meta": {}}

    assert check_blocklist(item(source_url="https://optout.org/v/1"), bl)[0] == "opted_out"
    assert check_blocklist(item(source_url="http://cdn.media.OPTOUT.org/a"), bl)[0] == "opted_out"
    assert check_blocklist(item(source_url="https://notoptout.org/a"), bl) is None
    assert check_blocklist(item(source_url="https://example.com/user/bob/v/2"),
                           bl)[0] == "opted_out"
    assert check_blocklist(item(source_url="https://example.com/user/alice/v/2"), bl) is None
    assert check_blocklist(item(url="https://optout.org/raw/1.mp4"), bl)[0] == "opted_out"
    assert check_blocklist(item(url=str(tmp_path / "private/a.mp4")), bl)[0] == "opted_out"
    assert check_blocklist(item(license="cc-by-nc-4.0"), bl) == (
        "license_not_allowed", "licence 'cc-by-nc-4.0' is blocked")
    assert check_blocklist(item(license="CC-BY-4.0"), bl) is None

    only_open = BlocklistConfig(allowed_licenses=["CC0", "CC-BY-4.0"]).build()
    assert check_blocklist(item(license="cc by 4.0"), only_open) is None
    assert check_blocklist(item(license="proprietary"), only_open)[0] == "license_not_allowed"
    assert check_blocklist(item(license=None), only_open)[0] == "license_not_allowed"

    # The hash rule needs the bytes: fetch_item hashes on the worker.
    cfg = IngestConfig()
    out, rej = fetch_item(item(url=str(good)), cfg, bl, tmp_path / "cache")
    assert out is None and rej == ("blocked_hash", f"sha256 {digest}")
    out, rej = fetch_item(item(url=str(other)), cfg, bl, tmp_path / "cache")
    assert rej is None and out["local_path"] == str(other) and len(out["sha256"]) == 64
    out, rej = fetch_item(item(url=str(other), license="CC BY-NC 4.0"), cfg, bl, tmp_path / "cache")
    assert rej[0] == "license_not_allowed"  # checked before any byte is read
    # No hashes listed and hash_files off: nothing is read.
    out, rej = fetch_item(item(url=str(good)), cfg, only_open, tmp_path / "cache")
    assert rej[0] == "license_not_allowed"
    out, _ = fetch_item(item(url=str(good), license="CC0"), cfg, only_open, tmp_path / "cache")
    assert "sha256" not in out
    # A sparse 64 GiB file is refused by size, never hashed.
    out, rej = fetch_item(item(url=str(videos / "hostile/sparse_64g.mp4")),
                          IngestConfig(hash_files=True), BlocklistConfig().build(),
                          tmp_path / "cache", max_bytes=2**30)
    assert rej == ("too_large", f"{64 * 2**30} bytes > {2**30}")


# ----- remote inputs ------------------------------------------------------------------------
def test_http_inputs_are_listed_fetched_and_probed(tmp_path, http_root, videos, prober):
    www, base = http_root
    (www / "clips").mkdir()
    shutil.copy(good_mp4(videos), www / "clips/good.mp4")
    shutil.copy(videos / "hostile/html_as_mp4.mp4", www / "clips/error.mp4")
    _write_manifest(www / "index.csv", [
        {"path": "clips/good.mp4", "caption": "shapes", "license": "", "source_url": "", "k": "1"},
        {"path": "clips/error.mp4", "caption": "", "license": "", "source_url": "", "k": "2"},
        {"path": "clips/missing.mp4", "caption": "", "license": "", "source_url": "", "k": "3"},
    ])
    items = list_inputs(IngestConfig(inputs=[f"{base}/index.csv", f"{base}/clips/good.mp4"]))
    assert [i["url"] for i in items] == [f"{base}/clips/good.mp4", f"{base}/clips/error.mp4",
                                         f"{base}/clips/missing.mp4"]  # the repeat is dropped
    assert items[0]["caption"] == "shapes" and items[0]["meta"] == {"k": "1"}

    cfg, bl, cache = IngestConfig(hash_files=True), BlocklistConfig().build(), tmp_path / "cache"
    results = [fetch_item(i, cfg, bl, cache, max_bytes=10**6) for i in items]
    (good, _), (error, _), (missing, miss_rej) = results
    assert good["local_path"].startswith(str(cache))
    assert Path(good["local_path"]).read_bytes() == (www / "clips/good.mp4").read_bytes()
    info, rej = safe_probe(good["local_path"], prober=prober)
    assert rej is None and info["width"] == 64 and info["duration"] == pytest.approx(2.0)
    assert safe_probe(error["local_path"], prober=prober)[1][0] == "mislabelled"
    assert missing is None and miss_rej[0] == "fetch_failed"

    # Cached: a second fetch does not touch the server.
    (www / "clips/good.mp4").unlink()
    assert fetch(f"{base}/clips/good.mp4", cache) == good["local_path"]
    # The byte cap holds before download (Content-Length) for remote files.
    shutil.copy(good_mp4(videos), www / "clips/big.mp4")
    with pytest.raises(FetchError) as e:
        fetch(f"{base}/clips/big.mp4", cache, max_bytes=100)
    assert e.value.reason == "too_large"
    assert not list(cache.glob("*.part"))


def test_memory_filesystem_directory_is_listed_fetched_and_probed(tmp_path, videos, prober):
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/ingest-test/raw/a/one.mp4", good_mp4(videos).read_bytes())
    fs.pipe("/ingest-test/raw/a/one.txt", b"a caption from a sidecar")
    fs.pipe("/ingest-test/raw/b/two.avi", (videos / "hostile/mpeg4_avi.avi").read_bytes())
    fs.pipe("/ingest-test/raw/readme.md", b"skip")
    try:
        items = list_inputs(IngestConfig(inputs=["memory://ingest-test/raw"]))
        assert [i["url"] for i in items] == ["memory:///ingest-test/raw/a/one.mp4",
                                             "memory:///ingest-test/raw/b/two.avi"]
        assert items[0]["caption"] == "a caption from a sidecar"
        for it in items:
            out, rej = fetch_item(it, IngestConfig(), BlocklistConfig().build(), tmp_path / "c")
            info, rej = safe_probe(out["local_path"], prober=prober)
            assert rej is None and info["num_frames"] == 16
    finally:
        fs.rm("/ingest-test", recursive=True)


def test_s3_bucket_listing_and_fetch(tmp_path, videos, monkeypatch):
    """s3:// through s3fs against moto's local S3 server (skipped if either is missing)."""
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        so = {"key": "test", "secret": "test", "endpoint_url": f"http://{host}:{port}"}
        import s3fs

        fs = s3fs.S3FileSystem(**so)
        fs.call_s3("create_bucket", Bucket="raw")
        fs.pipe("raw/2024/a.mp4", good_mp4(videos).read_bytes())
        fs.pipe("raw/2024/b.txt", b"x")
        fs.pipe("raw/m.jsonl", b'{"path": "2024/a.mp4", "caption": "from s3"}\n')
        cfg = IngestConfig(inputs=["s3://raw/2024/", "s3://raw/m.jsonl"], storage_options=so)
        (item,) = list_inputs(cfg)  # the manifest row resolves to the same URL
        assert item["url"] == "s3://raw/2024/a.mp4"
        out, rej = fetch_item(item, cfg, BlocklistConfig().build(), tmp_path / "cache")
        assert rej is None and Path(out["local_path"]).read_bytes() == good_mp4(videos).read_bytes()
    finally:
        server.stop()


# ----- probe --------------------------------------------------------------------------------
def test_every_bad_input_gets_its_reason_and_none_raises(videos, prober):
    rows = [json.loads(x) for x in (videos / "synthetic/manifest.jsonl").read_text().splitlines()]
    assert {r["bad_kind"] for r in rows} - {None} == set(BAD_KINDS)
    got, want = {}, {}
    for r in rows:
        info, rej = prober.probe(videos / "synthetic" / r["path"])
        key = r["bad_kind"] or r["id"]
        got[key] = rej[0] if rej else "keep"
        want[key] = SYNTHETIC_PROBE_REASON.get(r["bad_kind"], "keep")
    for kind in bad_inputs.KINDS:
        if kind == "fifo":
            continue
        path = next((videos / "hostile").glob(kind + ".*"))
        info, rej = prober.probe(path)
        got[kind], want[kind] = (rej[0] if rej else "keep"), bad_inputs.probe_outcome(kind)
        if rej:
            assert rej[0] in REASONS and isinstance(rej[1], str)
        else:
            assert info["width"] >= 64 and info["duration"] >= 1.0
    assert got == want
    assert prober.starts == 1  # no crash, no restart


def test_rotation_vfr_codecs_and_extension_mismatch_are_reported(videos, prober):
    info, _ = prober.probe(videos / "hostile/rotated.mp4")
    assert (info["width"], info["height"], info["rotation"]) == (96, 64, 90)
    assert (info["display_width"], info["display_height"]) == (64, 96)
    info, _ = prober.probe(videos / "hostile/vfr.mp4")
    assert info["vfr"] and info["num_frames"] == 16
    assert info["fps_min"] == pytest.approx(1 / 0.3, rel=0.02)
    assert info["fps_max"] == pytest.approx(30, rel=0.05)
    assert info["duration"] == pytest.approx(1.1 + 1 / 30, abs=0.02)
    info, _ = prober.probe(good_mp4(videos))
    assert not info["vfr"] and info["fps"] == 8.0 and info["rotation"] == 0
    codecs = {k: prober.probe(next((videos / "hostile").glob(k + ".*")))[0]
              for k in ("mpeg4_avi", "mjpeg_mkv", "vp9_webm", "mp4_as_mkv")}
    assert {k: (v["codec"], v["ext_mismatch"]) for k, v in codecs.items()} == {
        "mpeg4_avi": ("mpeg4", False), "mjpeg_mkv": ("mjpeg", False),
        "vp9_webm": ("vp9", False), "mp4_as_mkv": ("h264", True)}
    assert codecs["mp4_as_mkv"]["container"].startswith("mov,mp4")


def test_caps_refuse_before_decoding_and_bound_demuxing(videos):
    huge = videos / "hostile/huge_header.avi"
    with Prober(ProbeConfig(max_side=10_000, max_pixels=10**8)) as p:
        # Past the caps the same file reaches the decoder and fails there (its frames are
        # 64x64): so the default caps refused it from the header alone.
        assert p.probe(huge)[1][0] == "decode_failed"
    with Prober(ProbeConfig(allowed_codecs=["h264", "vp9"])) as p:
        assert p.probe(huge)[1][0] == "unsupported_codec"
        assert p.probe(videos / "hostile/mpeg4_avi.avi")[1] == (
            "unsupported_codec", "mpeg4 not in ['h264', 'vp9']")
        assert p.probe(videos / "hostile/vp9_webm.webm")[1] is None
    # Demuxing stops at max_seconds * max_fps packets even when the header is not consulted.
    with Prober(ProbeConfig(max_seconds=3.0, max_fps=2.0)) as p:
        assert p.probe(videos / "hostile/mjpeg_mkv.mkv")[1] == ("too_long", "more than 7 frames")
        assert p.probe(videos / "hostile/ten_hours.mp4")[1][1].startswith("declared 36000")


def test_hanging_file_times_out_and_the_prober_recovers(tmp_path, videos):
    fifo = bad_inputs.make("fifo", tmp_path)
    with Prober(ProbeConfig(timeout_s=1.0)) as p:
        assert p.probe(good_mp4(videos))[1] is None  # child started and warm
        t0 = time.monotonic()
        info, rej = p.probe(fifo)
        elapsed = time.monotonic() - t0
        assert rej == ("timeout", "no answer in 1.0s") and 1.0 <= elapsed < 4.0
        info, rej = p.probe(good_mp4(videos))  # a fresh child takes over
        assert rej is None and p.starts == 2


def test_prober_child_runs_under_a_memory_limit(videos):
    with Prober(ProbeConfig(max_memory_mb=768)) as p:
        assert p.probe(good_mp4(videos))[1] is None
        limits = Path(f"/proc/{p._proc.pid}/limits").read_text()
    line = next(x for x in limits.splitlines() if x.startswith("Max address space"))
    assert line.split()[3:5] == [str(768 * 2**20)] * 2
