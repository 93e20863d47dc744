"""Curation through the real graph (ingest -> curate -> filter -> caption -> shard) on real
files: synthetic videos listed by a jsonl manifest with licences and source URLs, plus every
hostile input kind in a directory. Checks that every input is accounted for with its reason,
that shards carry the metadata and read with plain tools, that a killed driver resumes without
redoing finished parts, and that sharding resumes shard by shard.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import psutil
import pytest
import webdataset as wds

from data import bad_inputs
from data.shards import read_parquet
from data.synthetic import SourceConfig, generate
from data.video_io import read_frames, read_frames_av

ARGS = ["source=ingest", "probe.timeout_s=2", "ingest.blocklist.licenses=[cc-by-nc]",
        "tracking=disabled", "curate.group_size=3"]


def spacetime(*args, cwd: Path, **kw):
    env = {**os.environ, "SPACETIME_RUN_ID": ""}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600, **kw)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("inputs")
    rows = generate(SourceConfig(num_videos=10, bad_fraction=0.6, multishot_fraction=0.2,
                                 seconds=3.0), root / "synthetic")
    manifest = root / "manifest.jsonl"
    with open(manifest, "w") as f:
        for i, r in enumerate(rows):
            lic = "cc-by-nc" if i == 0 else "cc-by-4.0"
            f.write(json.dumps({"path": f"synthetic/{r['path']}", "caption": r["caption"],
                                "license": lic, "source_url": f"https://example.org/v/{i}",
                                "origin": "test"}) + "\n")
    hostile = root / "hostile"
    hostile.mkdir()
    made = {kind: bad_inputs.make(kind, hostile) for kind in bad_inputs.KINDS}
    return {"root": root, "rows": rows, "manifest": manifest, "hostile": hostile, "made": made}


def overrides(inputs: dict) -> list[str]:
    return [*ARGS, f"ingest.inputs=[{inputs['manifest']},{inputs['hostile']}]"]


@pytest.fixture(scope="module")
def run(inputs, tmp_path_factory) -> dict:
    cwd = tmp_path_factory.mktemp("run")
    r = spacetime("run", "--only", "shard", *overrides(inputs), cwd=cwd)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lin = json.loads((cwd / "outputs/runs/latest.json").read_text())
    lineage = json.loads((cwd / f"outputs/runs/{lin['run_id']}/lineage.json").read_text())
    return {"cwd": cwd, "dirs": {n: Path(s["path"]) for n, s in lineage["stages"].items()}}


def by_path(run) -> tuple[dict, dict, list[dict]]:
    d = run["dirs"]
    items = [json.loads(s) for s in (d["source"] / "inputs.jsonl").read_text().splitlines()]
    rejects = read_parquet(d["shard"] / "rejects.parquet")
    clips = read_parquet(d["shard"] / "clips.parquet")
    return {i["url"]: i for i in items}, {r["source_id"]: r for r in rejects}, clips


def test_every_input_ends_in_a_shard_or_the_rejects_with_its_reason(inputs, run):
    items, rejects, clips = by_path(run)
    kept = {c["source_id"] for c in clips}
    reason = {sid: r["reason"] for sid, r in rejects.items() if sid not in kept}
    expected_synth = {"zero_byte": "empty_file", "truncated": "unreadable",
                      "random_bytes": "unreadable", "frozen": "low_motion",
                      "too_short": "too_short", "tiny": "low_resolution"}
    for i, row in enumerate(inputs["rows"]):
        item = items[str((inputs["root"] / "synthetic" / row["path"]).resolve())]
        if i == 0:
            assert reason[item["id"]] == "license_not_allowed"
        elif row["bad_kind"]:
            assert reason[item["id"]] == expected_synth[row["bad_kind"]], row
        elif len(row["shots"]) == 1:
            assert item["id"] in kept, row
    usable = 0
    for kind, path in inputs["made"].items():
        item = items[str(Path(path).resolve())]
        want = bad_inputs.KINDS[kind]
        if want == "keep":  # odd but usable: past the probe. They all show the same moving
            if item["id"] in kept:  # square, so the global dedup keeps one of them.
                usable += 1
            else:
                assert rejects[item["id"]]["stage"] in ("split", "filter", "dedup"), (
                    kind, rejects.get(item["id"]))
        else:
            assert reason[item["id"]] == want, (kind, rejects.get(item["id"]))
    assert usable >= 1
    stats = json.loads((run["dirs"]["shard"] / "stats.json").read_text())
    n = len(inputs["rows"]) + len(inputs["made"])
    assert stats["inputs"] == n == stats["kept_sources"] + stats["rejected_sources"]
    assert stats["kept_sources"] == len(kept)
    curated = read_parquet(run["dirs"]["curate"] / "clips.parquet")
    filtered = sum(r["start"] is not None for r in read_parquet(
        run["dirs"]["shard"] / "rejects.parquet"))
    split_spans = stats["funnel"][2]["count"]  # clips the shots became
    assert split_spans == len(clips) + filtered  # clips = sharded + filtered out
    assert len(curated) >= len(clips)
    assert [s["step"] for s in stats["funnel"]] == ["inputs", "probed", "shots", "cpu filters",
                                                    "dedup", "captioned", "sharded"]
    counts = [s["count"] for s in stats["funnel"][2:]]
    assert counts == sorted(counts, reverse=True)
    assert (run["dirs"]["shard"] / "funnel.png").stat().st_size > 10_000
    assert {"motion", "sharpness", "brightness"} <= set(stats["histograms"])


def test_shards_carry_metadata_and_read_with_plain_tools(run):
    d = run["dirs"]["shard"]
    index = json.loads((d / "index.json").read_text())
    urls = [str(d / p) for split in ("train", "val") for p in index[split]]
    rows = {c["key"]: c for c in read_parquet(d / "clips.parquet")}
    seen = []
    for s in wds.WebDataset(urls, shardshuffle=False).decode():
        meta = s["json"]
        seen.append(s["__key__"])
        assert s["txt"] == meta["caption"] == rows[s["__key__"]]["caption"]
        # where the caption came from: the manifest's rows; the directory's files have none
        want = "source:manifest" if meta["source"].get("source_url") else "source:none"
        assert meta["caption_source"] == want and bool(s["txt"]) == (want != "source:none")
        assert {"motion", "sharpness", "brightness", "black_fraction"} <= set(meta["scores"])
        if meta["source"].get("source_url"):  # from the manifest: carried through
            assert meta["source"]["license"] == "cc-by-4.0" and meta["source"]["origin"] == "test"
        n = meta["end"] - meta["start"]
        assert read_frames(s["mp4"]).shape[0] == n == read_frames_av(s["mp4"]).shape[0]
    assert sorted(seen) == sorted(rows)  # each clip once
    for u in urls:
        with tarfile.open(u) as tf:
            assert all(m.isfile() for m in tf.getmembers())
    assert not list(d.rglob("*.tmp"))


def test_each_split_has_a_wids_index_of_its_shards(run, tmp_path):
    """`<split>.wids.json` beside index.json: WebDataset's indexed-reader descriptor, urls
    relative to it, `nsamples` what plain webdataset reads from each tar."""
    d = run["dirs"]["shard"]
    index = json.loads((d / "index.json").read_text())
    for split in ("train", "val"):
        desc = json.loads((d / f"{split}.wids.json").read_text())
        assert desc["__kind__"] == "wids-shard-index-v1" and desc["wids_version"] == 1
        assert [e["url"] for e in desc["shardlist"]] == index[split] and index[split]
        for e in desc["shardlist"]:
            got = sum(1 for _ in wds.WebDataset(str(d / e["url"]), shardshuffle=False))
            assert e["nsamples"] == got > 0
        try:
            import wids  # webdataset's indexed reader, where installed
        except ImportError:
            continue
        ds = wids.ShardListDataset(str(d / f"{split}.wids.json"), cache_dir=str(tmp_path / "wids"))
        assert len(ds) == sum(e["nsamples"] for e in desc["shardlist"]) and ".mp4" in ds[0]


# Put on PYTHONPATH, this is imported by every Python process of a run (the driver and the
# Ray workers it starts): shard tasks past the first `SPACETIME_TEST_SHARDS_FREE` of each
# split never finish, so a driver killed once a shard is written always dies with shards
# still to write (the tiny run's shard tasks take milliseconds: no kill lands between them).
HOLD_SHARDS = """
import os
import threading

import pipeline.curation.shard as shard

FREE = int(os.environ["SPACETIME_TEST_SHARDS_FREE"])
real = shard.write_one_shard


def write_one_shard(path, clips, cfg, upload_url=None):
    index = int(os.path.basename(path).split(".")[0].rsplit("-", 1)[1])  # train-NNNNNN.tar
    if index >= FREE:
        threading.Event().wait()  # held until the test kills the run
    return real(path, clips, cfg, upload_url)


write_one_shard.__module__, write_one_shard.__qualname__ = shard.__name__, "write_one_shard"
shard.write_one_shard = write_one_shard
"""


def kill_when(args: list[str], cwd: Path, log: Path, pattern: str,
              env: dict | None = None) -> list[Path]:
    """Start `spacetime *args`, SIGKILL it (the driver and the Ray it started) as soon as a
    file matching `pattern` (under cwd/outputs/stages) appears; returns the files seen then."""
    env = {**os.environ, "SPACETIME_RUN_ID": "", **(env or {})}
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=env,
                             stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        deadline, found = time.time() + 300, []
        while time.time() < deadline and p.poll() is None:
            found = list((cwd / "outputs/stages").glob(pattern))
            if found:
                break
            time.sleep(0.05)  # polling for the file, not waiting for luck
        assert found and p.poll() is None, log.read_text()[-3000:]
        # Every process of the run, Ray's workers included (not all stay in the driver's
        # process group): killed, and gone before the caller looks at what was written.
        procs = [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
        os.killpg(p.pid, signal.SIGKILL)
        for q in procs:
            try:
                q.kill()
            except psutil.NoSuchProcess:
                pass
        p.wait()
        psutil.wait_procs(procs, timeout=60)
    return found


def test_killed_driver_resumes_without_redoing_finished_parts(inputs, run, tmp_path):
    """SIGKILL the driver during curate, rerun: it resumes curate and continues; SIGKILL it
    again during shard, rerun: the final shards hold every clip exactly once."""
    shard_args = [*overrides(inputs), "shard.max_clips_per_shard=1"]  # a shard per clip
    parts = kill_when(["run", "--only", "curate", *overrides(inputs)], tmp_path,
                      tmp_path / "first.log", "curate-*/parts/part-*.jsonl")
    stage = parts[0].parent.parent
    assert not (stage / "_SUCCESS.json").exists()
    done = sorted(q.name for q in (stage / "parts").glob("part-*.jsonl"))

    # resume curate, then die while the shard stage is writing shards
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOLD_SHARDS)
    held = {"PYTHONPATH": os.pathsep.join([str(hook), *filter(None, [os.environ.get("PYTHONPATH")])]),
            "SPACETIME_TEST_SHARDS_FREE": "1"}  # train-000000 and val-000000 get written
    sides = kill_when(["run", "--until", "shard", *shard_args], tmp_path, tmp_path / "second.log",
                      "shard-*/shards/*.rows.json", env=held)
    out = (tmp_path / "second.log").read_text()
    assert f"curate: {len(done)} of " in out and "resuming" in out
    assert (stage / "_SUCCESS.json").exists()
    shard_dir = sides[0].parent.parent
    assert not (shard_dir / "_SUCCESS.json").exists()
    sidecars = sorted((shard_dir / "shards").glob("*.rows.json"))  # once the driver is dead
    finished = {p.name: p.stat().st_mtime_ns for p in sidecars + [
        p.with_name(p.name[:-len(".rows.json")]) for p in sidecars]}  # and their tars

    r = spacetime("run", "--until", "shard", *shard_args, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert "[curate] cached" in out and "[caption] cached" in out
    assert f"shard: {len(sidecars)} of " in out and "already written, resuming" in out
    assert (shard_dir / "_SUCCESS.json").exists()
    # finished shards were not written again, and the kill came with shards still to write
    assert {n: (shard_dir / "shards" / n).stat().st_mtime_ns for n in finished} == finished
    stats = json.loads((shard_dir / "stats.json").read_text())
    assert 0 < stats["shards_reused"] <= 2 < sum(stats["shards"].values())  # only the free ones

    # The same clips and rejects as the uninterrupted run, none twice.
    got = read_parquet(stage / "clips.parquet")
    want = read_parquet(run["dirs"]["curate"] / "clips.parquet")
    assert [c["clip_id"] for c in got] == [c["clip_id"] for c in want]
    assert len({c["clip_id"] for c in got}) == len(got)
    rej = lambda d: sorted((r["source_id"], r["reason"], r["start"] or -1)  # noqa: E731
                           for r in read_parquet(d / "rejects.parquet"))
    assert rej(stage) == rej(run["dirs"]["curate"])
    # The final shards, read with plain webdataset and tarfile: every expected clip once.
    index = json.loads((shard_dir / "index.json").read_text())
    urls = [str(shard_dir / p) for split in ("train", "val") for p in index[split]]
    keys = [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False)]
    members = []
    for u in urls:
        with tarfile.open(u) as tf:
            members += [m.name for m in tf.getmembers() if m.name.endswith(".mp4")]
    expected = sorted(c["key"] for c in read_parquet(run["dirs"]["shard"] / "clips.parquet"))
    assert sorted(keys) == expected and sorted(m[:-4] for m in members) == expected
    assert len(urls) == len(expected)  # one clip per shard, as configured


def test_sharding_resumes_shard_by_shard(run, tmp_path):
    import ray

    from pipeline.curation.curate import read_clips
    from pipeline.curation.shard import ShardConfig, run_sharding

    clips = read_clips(run["dirs"]["caption"])
    cfg = ShardConfig(max_clips_per_shard=2, target_shard_bytes=10**9)
    ray.init(num_cpus=2, include_dashboard=True, configure_logging=False)
    try:
        first = run_sharding(clips, cfg, tmp_path, concurrency=2)
        names = sorted(p.name for p in (tmp_path / "shards").glob("*.tar"))
        assert len(names) >= 3 and first["reused"] == 0
        victim = tmp_path / "shards" / names[1]
        victim.unlink()  # as if the driver died while this shard was in flight
        Path(f"{victim}.rows.json").unlink()
        before = {n: (tmp_path / "shards" / n).stat().st_mtime_ns for n in names if n != victim.name}
        second = run_sharding(clips, cfg, tmp_path, concurrency=2)
    finally:
        ray.shutdown()
    assert second["written"] == 1 and second["reused"] == len(names) - 1
    after = {n: (tmp_path / "shards" / n).stat().st_mtime_ns for n in before}
    assert after == before  # finished shards were not rewritten
    assert sorted(r["key"] for r in second["rows"]) == sorted(r["key"] for r in first["rows"])
    assert len({r["key"] for r in second["rows"]}) == len(clips)


def test_shard_plan_targets_bytes_and_is_deterministic():
    from pipeline.curation.shard import ShardConfig, plan_shards

    clips = [{"clip_id": f"c{i:03d}", "start": 0, "end": 10, "source_frames": 10,
              "source_bytes": 1000, "width": 64, "height": 64} for i in range(40)]
    cfg = ShardConfig(target_shard_bytes=3000, val_fraction=0.2, min_val_clips=2)
    plan = plan_shards(clips, cfg)
    assert plan == plan_shards(list(reversed(clips)), cfg)
    for split in ("train", "val"):  # 3 x 1000 bytes reaches the target: only a last is short
        sizes = [len(g) for name, g in plan if name.startswith(split)]
        assert sizes and all(n == 3 for n in sizes[:-1]) and 1 <= sizes[-1] <= 3, (split, sizes)
    assert [name for name, _ in plan] == sorted(name for name, _ in plan)
    assert sorted(c["clip_id"] for _, g in plan for c in g) == [c["clip_id"] for c in clips]


def test_funnel_counts_a_decode_failure_as_not_probed():
    from pipeline.stages import curate_funnel

    rej = lambda sid, stage, start=None: {"source_id": sid, "stage": stage,  # noqa: E731
                                          "start": start}
    clips = [{"source_id": "ok", "start": 0, "end": 16, "fps": 8.0},
             {"source_id": "ok", "start": 16, "end": 40, "fps": 8.0}]
    rejects = [rej("bad", "probe"), rej("broken", "decode"), rej("ok", "split", 40)]
    videos = [{"source_id": "ok", "seconds": 5.5}]
    funnel = {s["step"]: s for s in curate_funnel(3, clips, rejects, videos)}
    assert funnel["inputs"]["count"] == 3
    assert funnel["probed"]["count"] == 1  # the file the decoder rejected is not probed
    assert funnel["probed"]["hours"] == round(5.5 / 3600, 6)
    assert funnel["shots"]["count"] == 3 and funnel["cpu filters"]["count"] == 2


def test_model_scores_and_vlm_captions_through_the_graph(inputs, run, tmp_path):
    """curate.model_scores=true runs the open_clip actor pool (a tiny random model from a local
    directory, with a LAION-format aesthetics head) in the filter stage; caption=vlm recaptions
    with a tiny random Qwen2.5-VL from a local directory in the caption stage. The curate stage
    is reused from the fixture's run (same hash)."""
    import open_clip
    import torch

    from pipeline.curation.curate import read_clips, read_rejects
    from vlm_fixture import save_tiny_vlm

    clip_dir = tmp_path / "clip"
    clip_dir.mkdir()
    (clip_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": {
        "embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64,
                                        "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2,
                     "layers": 2}}}))
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{clip_dir}")
    torch.save(model.state_dict(), clip_dir / "open_clip_pytorch_model.bin")
    head = {}
    dims = [32, 64, 16, 8, 4, 1]
    for idx, (a, b) in zip((0, 2, 4, 6, 7), zip(dims[:-1], dims[1:])):
        head[f"layers.{idx}.weight"], head[f"layers.{idx}.bias"] = torch.randn(b, a), torch.randn(b)
    torch.save(head, tmp_path / "head.pth")
    vlm = save_tiny_vlm(tmp_path / "vlm")

    r = spacetime("run", "--until", "caption", *overrides(inputs), "curate.model_scores=true",
                  f"embed.model=local-dir:{clip_dir}", "embed.pretrained=null",
                  f"embed.aesthetic_head={tmp_path / 'head.pth'}", "caption=vlm",
                  f"caption.model={vlm}", "caption.max_new_tokens=6", "caption.batch_size=2",
                  cwd=run["cwd"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "[curate] cached" in r.stdout
    lin = json.loads((run["cwd"] / "outputs/runs/latest.json").read_text())
    lineage = json.loads((run["cwd"] / f"outputs/runs/{lin['run_id']}/lineage.json").read_text())
    d = {n: Path(s["path"]) for n, s in lineage["stages"].items()}
    filtered = read_clips(d["filter"])
    assert filtered and all({"aesthetic", "clip_score"} <= set(c["scores"]) for c in filtered)
    captioned = read_clips(d["caption"])
    rejects = read_rejects(d["caption"])
    assert len(captioned) + sum(r["stage"] == "caption" for r in rejects) == len(filtered)
    assert captioned and all(c["caption_source"].startswith("vlm:") and c["caption"].strip()
                             for c in captioned)
    stats = json.loads((d["caption"] / "stats.json").read_text())
    assert stats["kept_sources"] + stats["rejected_sources"] == stats["inputs"]
    assert [s["step"] for s in stats["funnel"]][-3:] == ["model filters", "dedup", "captioned"]
