"""Robustness and media correctness of curation, on real files, real decoders and real Ray:

- decoding after the probe runs isolated: a file that aborts the decoder (a frame array past
  the memory cap), one that takes too long and one corrupt mid-stream end as rejects with a
  reason, and the worker carries on;
- a Ray task whose worker dies is retried a bounded number of times and loses only its input;
  so is an actor of a model pool (restarted a bounded number of times), with no Ray
  deprecation warning on the way;
- a transient HTTP failure is retried, a permanent one is not;
- sources missing on the node that shards them (fetched by another node) are fetched again;
- text is scored on keyframes large enough to see subtitles, and always recorded; filtered
  spans keep their scores in the rejects;
- re-encoded clips are in display orientation at a constant frame rate (variable-rate
  sources resampled by timestamp), read the same with decord and PyAV, and are streamed
  through the encoder.
"""

from __future__ import annotations

import http.server
import io
import json
import os
import shutil
import socket
import time
import warnings
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
from conftest import serve_http
import webdataset as wds

from data import bad_inputs
from data.isolate import shared_isolated
from data.probe import ProbeConfig
from data.synthetic import SourceConfig, generate, render, sample_spec
from data.video_io import read_frames, read_frames_av, write_mp4
from pipeline.curation.curate import (CurateConfig, CurateConfigs, curate_group, curate_video,
                             read_rejects, write_rejects)
from pipeline.curation.fetch import FetchError, fetch
from pipeline.curation.ingest import IngestConfig, list_inputs
from pipeline.curation.media import PRELOAD, MediaError, MediaLimits, read_clip_frames, read_display, to_display
from pipeline.curation.scores import Bounds, ScoreConfig, cpu_scores
from pipeline.curation.retry import TransientError
from pipeline.curation.shard import ShardConfig, encode_clip, run_sharding, upload, whole_source
from pipeline.curation.shots import ShotConfig


def configs(tmp_path: Path, **kw) -> CurateConfigs:
    return CurateConfigs(ingest=kw.pop("ingest", IngestConfig()), probe=ProbeConfig(timeout_s=5),
                         shots=ShotConfig(), scores=kw.pop("scores", ScoreConfig()),
                         curate=CurateConfig(**kw), cache_dir=str(tmp_path / "cache"))


def item(path: Path) -> dict:
    return {"id": path.stem, "url": str(path), "caption": "", "license": None,
            "source_url": None, "meta": {}}


def curate(path: Path, c: CurateConfigs) -> list[dict]:
    return [r for r in curate_video(item(path), c, c.ingest.blocklist.build())
            if r["kind"] != "video"]


@pytest.fixture
def http_server(tmp_path):
    """A real HTTP server on 127.0.0.1 serving tmp_path/www. `state["fail"]` makes the next
    requests fail (`state["mode"]`: an HTTP status, or "reset" to drop the connection);
    `state["count"]` counts requests per path."""
    www = tmp_path / "www"
    www.mkdir()
    state = {"fail": 0, "mode": 503, "count": {}}

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding") == "chunked":  # aiohttp streams uploads
                body = b""
                while n := int(self.rfile.readline().strip(), 16):
                    body += self.rfile.read(n)
                    self.rfile.readline()
                self.rfile.readline()
                return body
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _fails(self) -> bool:
            state["count"][self.path] = state["count"].get(self.path, 0) + 1
            if state["fail"] <= 0:
                return False
            state["fail"] -= 1
            if state["mode"] == "reset":  # RST instead of an answer
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                           b"\x01\x00\x00\x00\x00\x00\x00\x00")
                self.connection.close()
            else:
                self.send_error(state["mode"])
            return True

        def do_GET(self):
            if not self._fails():
                super().do_GET()

        def do_HEAD(self):
            if not self._fails():
                super().do_HEAD()

        def do_POST(self):  # an upload: fsspec's HTTP filesystem puts files by POST
            body = self._body()
            if not self._fails():
                dest = www / self.path.lstrip("/")
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(body)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

    with serve_http(Handler, www) as url:
        yield www, url, state


# ----- isolation -----------------------------------------------------------------------------
def test_files_that_break_the_decoder_after_the_probe_are_rejects(tmp_path):
    c = configs(tmp_path)
    corrupt = bad_inputs.make("corrupt_midstream", tmp_path)
    (r,) = curate(corrupt, c)  # the probe passes it: only its first frame is decoded there
    assert (r["stage"], r["reason"]) == ("decode", "decode_failed")

    # Decoding hangs (here: takes far longer than allowed): killed, a reject, and the next
    # file gets a fresh child.
    slow = tmp_path / "slow.mp4"
    bad_inputs.write_flood(slow, 3000, 1920, 1080)  # ~80 KB that decode like 100 s of 1080p
    quick = configs(tmp_path, media=MediaLimits(timeout_s=1.0, s_per_mpx=0.0))
    t0 = time.monotonic()
    (r,) = curate(slow, quick)
    assert (r["stage"], r["reason"]) == ("decode", "decode_timeout")
    assert time.monotonic() - t0 < 8
    good = tmp_path / "good.mp4"
    write_mp4(good, bad_inputs._frames(24), 8.0)
    worker = shared_isolated(4096, 60.0, PRELOAD)
    starts = worker.starts
    assert {r["kind"] for r in curate(good, quick)} == {"clip"}
    assert worker.starts == starts + 1

    # Decoding blows the memory cap: decord aborts on std::bad_alloc, in the child only.
    flood = tmp_path / "flood.mp4"
    bad_inputs.write_flood(flood, 25_000, 160, 96)  # 1.15 GB of frames at full size
    clip = {"path": str(flood), "abs_path": str(flood), "start": 0, "end": 25_000,
            "width": 160, "height": 96}
    capped = MediaLimits(max_memory_mb=1200)
    with pytest.raises(MediaError) as e:
        read_clip_frames(clip, list(range(25_000)), None, capped)
    assert e.value.reason == "decode_crashed" and "SIGABRT" in e.value.detail
    assert "1200 MB" in e.value.detail
    frames = read_clip_frames({**clip, "end": 16}, list(range(16)), (48, 80), capped)
    assert frames.shape == (16, 48, 80, 3)  # the same limits, a fresh child


def test_a_worker_killing_input_is_retried_finitely_and_loses_only_itself(tmp_path, ray_local):
    from pipeline.curation.parts import read_parts, run_parts

    def work(items):
        out = []
        for it in items:
            if it["id"] == "killer":
                os.kill(os.getpid(), 9)  # as a segfault in a library would
            out.append({"id": it["id"], "ok": True})
        return out

    items = [{"id": f"v{i}"} for i in range(5)] + [{"id": "killer"}]
    res = run_parts(items, work, tmp_path / "parts", group_size=3, concurrency=2,
                    log=lambda *a: None, max_retries=0,
                    on_lost=lambda it, why: {"id": it["id"], "ok": False, "why": why})
    got = {r["id"]: r for r in read_parts(tmp_path / "parts")}
    assert sorted(got) == sorted(i["id"] for i in items) and res["parts"] == 2
    assert [k for k, r in got.items() if not r["ok"]] == ["killer"]
    assert "died or failed 1 time," in got["killer"]["why"]


def test_task_pools_queue_a_task_per_cpu_only_when_the_cluster_caps_them(tmp_path, ray_local):
    from pipeline.curation.parts import read_parts, run_parts, tasks_in_flight

    # 2 CPUs: a pool as wide as the cluster submits twice its size (the extra tasks wait in
    # the raylet's queue); a narrower pool is its own cap.
    assert (tasks_in_flight(2), tasks_in_flight(3), tasks_in_flight(1)) == (4, 6, 1)

    def work(items):
        t0 = time.time()
        time.sleep(0.2)  # the work
        return [{"id": it["id"], "span": [t0, time.time()]} for it in items]

    items = [{"id": f"v{i}"} for i in range(4)]
    run_parts(items, work, tmp_path / "parts", group_size=1, concurrency=1, log=lambda *a: None)
    spans = sorted(r["span"] for r in read_parts(tmp_path / "parts"))
    assert len(spans) == 4
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans  # never two at once


def test_parts_bound_actor_restarts_without_deprecated_ray_args(tmp_path, ray_local):
    """Tasks and actor pools (with a prepare step, an actor whose model load fails once) run
    with Ray's deprecation warnings as errors; an input that kills its actor is tried
    max_retries + 1 times, then the run fails (not an endless restart loop)."""
    import ray
    from ray.util.annotations import RayDeprecationWarning

    from pipeline.curation.parts import read_parts, run_parts

    calls, flaky = tmp_path / "calls", tmp_path / "flaky"

    def load():  # a model load that times out on the first try of the first actor
        if not flaky.exists():
            flaky.touch()
            raise TimeoutError("hub timeout")

        def model(items, prepared):
            out = []
            for it, p in zip(items, prepared):
                if it["id"] == "killer":
                    with open(calls, "a") as f:
                        f.write("x")
                    os.kill(os.getpid(), 9)
                out.append({"id": it["id"], "prep": p, "pid": os.getpid()})
            return out
        return model

    def prepare(items):
        return [it["id"].upper() for it in items]

    def work(items):
        return [{"id": it["id"], "n": len(items)} for it in items]

    items = [{"id": f"v{i}"} for i in range(5)]
    quiet = lambda *a: None  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error", RayDeprecationWarning)
        run_parts(items, work, tmp_path / "tasks", group_size=2, concurrency=2, log=quiet)
        run_parts(items, None, tmp_path / "actors", group_size=2, concurrency=2, log=quiet,
                  actor_factory=lambda: load(), prepare=prepare, actor_init_retries=1)
    assert sorted((r["id"], r["n"]) for r in read_parts(tmp_path / "tasks")) == [
        ("v0", 2), ("v1", 2), ("v2", 2), ("v3", 2), ("v4", 1)]
    got = sorted(read_parts(tmp_path / "actors"), key=lambda r: r["id"])
    assert [(r["id"], r["prep"]) for r in got] == [(f"v{i}", f"V{i}") for i in range(5)]
    assert flaky.exists()  # the load failed once and was retried in the actor

    with pytest.raises(ray.exceptions.RayActorError):
        run_parts([{"id": "v0"}, {"id": "killer"}], None, tmp_path / "killed", group_size=1,
                  concurrency=1, log=quiet, actor_factory=lambda: load(), prepare=prepare,
                  max_retries=1)
    assert calls.read_text() == "xx"  # the first try and one retry on a restarted actor
    # (v0's part may be lost with it: a call queued on the dying actor shares its restarts)
    assert "killer" not in {r["id"] for r in read_parts(tmp_path / "killed")}


# ----- transient failures --------------------------------------------------------------------
def test_fetch_retries_transient_failures_and_not_permanent_ones(tmp_path, http_server):
    www, base, state = http_server
    (www / "a.mp4").write_bytes(b"\x00" * 5000)
    cache = tmp_path / "cache"

    def attempt(path, mode, fails, retries):
        shutil.rmtree(cache, ignore_errors=True)
        state.update(fail=fails, mode=mode, count={})
        try:
            got = fetch(base + path, cache, retries=retries, backoff_s=0.01)
            return Path(got).read_bytes() == (www / "a.mp4").read_bytes(), state["count"][path]
        except FetchError as e:
            return e.detail, state["count"][path]

    assert attempt("/a.mp4", 503, 2, 3)[0] is True  # a 503 twice, then the file
    assert attempt("/a.mp4", "reset", 2, 3)[0] is True  # connections reset, then the file
    detail, _ = attempt("/a.mp4", 503, 2, 0)
    assert "HTTP 503" in detail  # no retries: the transient failure is the reject
    detail, _ = attempt("/a.mp4", 503, 100, 2)
    assert "HTTP 503" in detail and "after 3 attempts" in detail
    _, one_try = attempt("/missing.mp4", 404, 0, 0)
    for mode, path in ((404, "/missing.mp4"), (403, "/a.mp4")):
        detail, requests = attempt(path, mode, 100 if mode == 403 else 0, 3)
        assert f"HTTP {mode}" in detail and requests == one_try  # one attempt, no retry
    assert not list(cache.glob("*.part"))

    # Shard uploads: retried within the task, then raised as TransientError for Ray to retry
    # the task; a permanent refusal is raised at once.
    tar = tmp_path / "x.tar"
    tar.write_bytes(os.urandom(3000))
    cfg = ShardConfig(upload_retries=3, upload_backoff_s=0.01)
    state.update(fail=2, mode=503, count={})
    upload(str(tar), f"{base}/bucket", "shards/x.tar", cfg)
    assert (www / "bucket/shards/x.tar").read_bytes() == tar.read_bytes()
    assert state["count"]["/bucket/shards/x.tar"] == 3
    state.update(fail=100, mode=503, count={})
    with pytest.raises(TransientError):
        upload(str(tar), f"{base}/bucket", "shards/y.tar", cfg)
    assert state["count"]["/bucket/shards/y.tar"] == 4
    state.update(fail=100, mode=403, count={})
    with pytest.raises(Exception) as e:
        upload(str(tar), f"{base}/bucket", "shards/z.tar", cfg)
    assert not isinstance(e.value, TransientError) and state["count"]["/bucket/shards/z.tar"] == 1


# ----- multi-node sources, progress ------------------------------------------------------------
def test_sharding_fetches_sources_missing_on_this_node_and_shows_progress(tmp_path,
                                                                          http_server,
                                                                          ray_local):
    """Curate remote inputs, delete the fetch cache (as on another node of a cluster), then
    shard: every clip is still sharded, from a fresh fetch."""
    from pipeline.curation.caption import decode_clip

    www, base, state = http_server
    generate(SourceConfig(num_videos=3, bad_fraction=0.0, multishot_fraction=0.34, seconds=2.0),
             www / "syn")
    shutil.copy(bad_inputs.make("rotated", tmp_path), www / "rotated.mp4")
    c = configs(tmp_path)
    names = sorted(p.name for p in (www / "syn/videos").glob("*.mp4"))
    items = list_inputs(IngestConfig(inputs=[f"{base}/syn/videos/{n}" for n in names]
                                     + [f"{base}/rotated.mp4"]))
    clips = [r for r in curate_group(items, c) if r["kind"] == "clip"]
    assert len(clips) >= 3 and any(x["rotation"] == 90 for x in clips)
    assert any(whole_source(x) for x in clips) and not all(whole_source(x) for x in clips)
    assert all(x["abs_path"].startswith(c.cache_dir) for x in clips)
    shutil.rmtree(c.cache_dir)

    lines: list[str] = []
    cfg = ShardConfig(max_clips_per_shard=1, progress_every_s=0.0)
    res = run_sharding(clips, cfg, tmp_path / "out", concurrency=2, log=lines.append)
    assert res["failed"] == [] and len(res["rows"]) == len(clips)
    assert len(os.listdir(c.cache_dir)) == len({x["source_id"] for x in clips})  # fetched again
    progress = [ln for ln in lines if ln.startswith("shard: clip ")]
    assert progress and "| shard 1/" in progress[0]  # while it ran, not only at the end
    assert all(f"/{len(clips)} (" in ln and "ETA" in ln for ln in progress)

    urls = sorted(str(p) for p in (tmp_path / "out/shards").glob("*.tar"))
    for s in wds.WebDataset(urls, shardshuffle=False).decode():
        meta = s["json"]
        a, b = read_frames(s["mp4"]), read_frames_av(s["mp4"])
        assert a.shape == b.shape == (meta["num_frames"], meta["height"], meta["width"], 3)
        if meta["source_rotation"]:  # stored 96x64, shown 64x96: the mp4 is upright
            assert (meta["width"], meta["height"]) == (64, 96)

    shutil.rmtree(c.cache_dir)  # the caption stage's reader fetches on a miss too
    row = decode_clip({"i": 0, "clip": json.dumps(clips[0])}, 4, 32)
    assert row["error"] == "" and row["shape"][0] == 4


# ----- text ------------------------------------------------------------------------------------
def subtitled(path: Path, seed: int, text: bool, size=(360, 640)) -> Path:
    """Shapes over a background with (or without) one line of subtitles at cv2 scale 0.5."""
    frames = render(sample_spec(np.random.default_rng(seed)), 16, *size).copy()  # (T, H, W, 3)
    if text:
        for t, f in enumerate(frames):
            line = ["Where are we going now?", "Nobody knows the way back"][t // 8]
            (w, _), _ = cv2.getTextSize(line, cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1)
            cv2.putText(f, line, ((size[1] - w) // 2, size[0] - 30), cv2.FONT_HERSHEY_SIMPLEX,
                        0.5, (255, 255, 255), 1, cv2.LINE_AA)
    write_mp4(path, frames, 8.0)
    return path


def test_text_is_scored_on_keyframes_always_recorded_and_kept_in_rejects(tmp_path):
    cfg = ScoreConfig(text=Bounds(max=0.002), motion=Bounds(filter=False))
    c = configs(tmp_path, scores=cfg)
    texted, plain = [], []
    for seed in range(3):
        texted += curate(subtitled(tmp_path / f"t{seed}.mp4", seed, True), c)
        plain += curate(subtitled(tmp_path / f"p{seed}.mp4", seed, False), c)
    assert [(r["kind"], r["reason"]) for r in texted] == [("reject", "text_overlay")] * 3
    assert all(r["kind"] == "clip" and r["scores"]["text"] < 0.002 for r in plain)
    # The 160 px scoring frames alone do not see these subtitles.
    small = read_frames(tmp_path / "t0.mp4", size=(90, 160))
    assert cpu_scores(small, 8.0, {"width": 640, "height": 360}, cfg)["text"] < 0.002
    # Recorded for sources too small to read text on (keyframes are upscaled to 96 px).
    (tiny,) = curate(subtitled(tmp_path / "tiny.mp4", 0, False, (48, 64)), c)
    assert "text" in tiny["scores"]
    # A filtered span keeps its scores in the rejects manifest.
    write_rejects(texted, tmp_path / "rejects.parquet")
    back = read_rejects(tmp_path)
    assert [r["scores"]["text"] for r in back] == [r["scores"]["text"] for r in texted]
    assert all(r["scores"]["text"] > 0.002 and "motion" in r["scores"] for r in back)


# ----- orientation, frame rate, streaming -------------------------------------------------------
def levels(n: int, size: int = 64) -> np.ndarray:
    """n flat frames whose grey level encodes the frame index -> (n, size, size, 3)."""
    return np.repeat((20 + 12 * np.arange(n, dtype=np.uint8))[:, None, None, None],
                     size * size * 3).reshape(n, size, size, 3)


def index_of(frames: np.ndarray) -> list[int]:
    return [int(round((f.mean() - 20) / 12)) for f in frames]


def test_reencoded_clips_are_upright_and_constant_rate_in_both_decoders(tmp_path):
    # VFR: frames at 0..3 at 20 fps, 4..7 at 5 fps, 8..15 at 20 fps (ms timestamps).
    pts = [0, 50, 100, 150, 350, 550, 750, 950, 1000, 1050, 1100, 1150, 1200, 1250, 1300, 1350]
    vfr = tmp_path / "vfr.mp4"
    with av.open(str(vfr), "w") as out:
        s = out.add_stream("libx264", rate=20)
        s.width = s.height = 64
        s.pix_fmt = "yuv420p"
        s.time_base = s.codec_context.time_base = Fraction(1, 1000)
        s.options = {"crf": "0"}
        for t, f in zip(pts, levels(len(pts))):
            frame = av.VideoFrame.from_ndarray(f, format="rgb24")
            frame.pts = t
            for p in s.encode(frame):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    fps = 15 / 1.35  # what the probe reports for it: frames over the span
    base = {"clip_id": "v", "path": str(vfr), "abs_path": str(vfr), "fps": fps, "width": 64,
            "height": 64, "rotation": 0, "source_frames": 16, "source_vfr": True,
            "codec": "h264", "container": "mov,mp4,m4a,3gp,3g2,mj2"}
    for start, end in ((0, 16), (2, 10)):
        mp4, got = encode_clip({**base, "start": start, "end": end}, ShardConfig(crf=0))
        t0 = pts[start] / 1000
        t_end = pts[end] / 1000 if end < 16 else 1.35 + 1.35 / 15
        n = round((t_end - t0) * fps)
        want = [max(i for i in range(16) if pts[i] / 1000 <= t0 + k / fps + 0.25 / fps)
                for k in range(n)]
        for frames in (read_frames(mp4), read_frames_av(mp4)):
            assert index_of(frames) == want  # repeated where the source was slow
        assert got["num_frames"] == n and (end - start != 16 or n == 16)
        with av.open(io.BytesIO(mp4)) as cc:
            st = cc.streams.video[0]
            assert float(st.average_rate) == pytest.approx(fps, rel=1e-3)
            assert float(st.duration * st.time_base) == pytest.approx(n / fps, abs=0.01)

    # Rotated sources: decoded upright everywhere (decord turns 90/270 but not a resized 180)
    # and re-encoded upright, even when the clip spans the whole H.264 source.
    for rot in (90, 180, 270):
        src = tmp_path / f"rot{rot}.mp4"
        bad_inputs._encode(src, "libx264", rotation=rot, width=96)
        upright = to_display(read_frames_av(src), rot).astype(np.float32)  # (16, H, W, 3)
        h, w = upright.shape[1:3]
        np.testing.assert_array_equal(read_display(str(src), None, None, rot), upright)
        small = read_display(str(src), [3], (h // 2, w // 2), rot).astype(np.float32)
        ref = cv2.resize(upright[3], (w // 2, h // 2), interpolation=cv2.INTER_AREA)
        assert np.abs(small[0] - ref).mean() < 4
        clip = {**base, "path": str(src), "abs_path": str(src), "start": 0, "end": 16,
                "fps": 8.0, "width": w, "height": h, "rotation": rot, "source_vfr": False}
        mp4, got = encode_clip(clip, ShardConfig(crf=0))
        assert (got["width"], got["height"]) == (w, h)
        for frames in (read_frames(mp4), read_frames_av(mp4)):
            assert frames.shape == upright.shape and np.abs(frames - upright).mean() < 3


def test_encoding_streams_frames_instead_of_holding_the_clip(tmp_path):
    src = tmp_path / "long720.mp4"
    bad_inputs.write_flood(src, 150, 1280, 720)  # 150 x 2.8 MB = 415 MB as RGB frames
    lim = MediaLimits(max_memory_mb=4000)  # its own child, so its peak is this test's
    read_clip_frames({"path": str(src), "abs_path": str(src), "start": 0, "end": 2,
                      "width": 1280, "height": 720}, [0], (36, 64), lim)  # start it
    pid = shared_isolated(4000, 60.0, PRELOAD).pid
    status = lambda key: int(next(ln.split()[1] for ln in Path(f"/proc/{pid}/status")  # noqa: E731
                                  .read_text().splitlines() if ln.startswith(key)))
    before = status("VmRSS:")
    clip = {"clip_id": "x", "path": str(src), "abs_path": str(src), "start": 0, "end": 150,
            "fps": 30.0, "width": 1280, "height": 720, "rotation": 0, "source_frames": 150}
    mp4, got = encode_clip(clip, ShardConfig(preset="ultrafast", passthrough=False, media=lim))
    assert got["num_frames"] == 150 and shared_isolated(4000, 60.0, PRELOAD).pid == pid
    grew_mb = (status("VmHWM:") - before) / 1024
    assert grew_mb < 150, grew_mb  # a fraction of the 415 MB the clip's frames take
