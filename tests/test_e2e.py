"""The whole graph on the `tiny` experiment through real Ray, DeepSpeed ZeRO-2 on 2 Ray Train
workers, WebDataset tars, mp4 files and W&B offline runs; then the caching behaviour of reruns.

One module-scoped run feeds several tests (a run costs about a minute and a half on 2 cores).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from data.shards import read_parquet, read_shards
from data.video_io import read_frames, read_frames_av
from training.checkpoint import RunCheckpoints
from training.memory import ALLOCATOR_ENV

STAGES = ["source", "curate", "filter", "caption", "shard", "train", "eval"]
CURATION = dict.fromkeys(["source", "curate", "filter", "caption", "shard"], "cached")


def spacetime(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    env["SPACETIME_RUN_ID"] = ""  # each call makes its own run id
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=900)
    (cwd / "last.log").write_text(r.stdout + "\n" + r.stderr)
    return r


def graph_status(overrides: list[str]) -> dict[str, str]:
    """What `spacetime status` prints (stage -> state), computed in this process."""
    from hydra import compose, initialize_config_dir

    from pipeline.config import CONF_DIR, register, to_dict, to_object
    from pipeline.stages import graph_for

    register()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    return {r.name: r.state for r in graph_for(to_object(cfg)).status(to_dict(cfg))}


def lineage_of(r: subprocess.CompletedProcess, root: Path) -> dict:
    line = next(s for s in r.stdout.splitlines() if s.strip().startswith("lineage :"))
    return json.loads(Path(line.split(":", 1)[1].strip()).read_text())


@pytest.fixture(scope="module")
def run1(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("e2e")
    r = spacetime("run", "experiment=tiny", cwd=cwd)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    root = cwd / "outputs"
    lin = lineage_of(r, root)
    dirs = {n: Path(s["path"]) for n, s in lin["stages"].items()}
    return {"cwd": cwd, "root": root, "lineage": lin, "dirs": dirs, "result": r}


def test_every_stage_ran_and_explains_itself(run1):
    lin = run1["lineage"]
    assert [n for n in lin["stages"]] == STAGES
    assert all(s["state"] == "done" for s in lin["stages"].values())
    assert lin["git"]["commit"] and lin["versions"]["deepspeed"]
    for name, d in run1["dirs"].items():
        info = json.loads((d / "info.json").read_text())
        assert info["run_id"] == lin["run_id"] and info["hash"] == lin["stages"][name]["hash"]
        assert (d / "_SUCCESS.json").exists() and not (d / "_RUNNING.json").exists()
        assert d.name == f"{name}-{info['hash'][:12]}"


def test_the_console_shows_progress_with_totals_and_etas_each_line_once(run1):
    """What a person watching `spacetime run` reads: the local Ray's dashboard URL, then for
    shard, train and eval progress lines with the stage, done/total, rate and ETA; and every
    training worker's line once (Ray Train's print patch sent each twice: to stdout and
    through its logger to stderr)."""
    r = run1["result"]
    console = (r.stdout + r.stderr).splitlines()
    assert any(ln.startswith("ray: started a local Ray; dashboard at http://127.0.0.1:")
               for ln in r.stdout.splitlines())
    steps = 6  # experiment=tiny
    train = [ln[ln.index("train: step "):] for ln in console if "train: step " in ln]
    done = [int(ln.split()[2].split("/")[0]) for ln in train]
    assert done[0] == 1 and done[-1] == steps and done == sorted(set(done))  # each once
    for ln in train:
        assert f"/{steps} (" in ln and " | ETA " in ln and "loss " in ln
        assert "step/s" in ln or "s/step" in ln
    # the print patch's signature: a worker's line both on stdout and (through the logger) stderr
    out, err = ({ln for ln in s.splitlines() if "RayTrainWorker pid=" in ln} for s in (r.stdout, r.stderr))
    assert out and out & err == set()
    for stage, unit in (("shard", "clip"), ("eval", "batch")):
        lines = [ln for ln in console if ln.startswith(f"{stage}: {unit} ")]
        n, total = lines[-1].split()[2].split("/")
        assert n == total and " | ETA 0s" in lines[-1], lines  # the last line: all done
        assert len(lines) == len(set(lines))


def test_every_input_is_sharded_or_rejected_with_its_reason(run1):
    d = run1["dirs"]
    manifest = [json.loads(s) for s in (d["source"] / "manifest.jsonl").read_text().splitlines()]
    clips = read_parquet(d["shard"] / "clips.parquet")
    rejects = read_parquet(d["shard"] / "rejects.parquet")
    kept = {c["source_id"] for c in clips}
    rejected = {r["source_id"]: r["reason"] for r in rejects}
    for row in manifest:
        assert row["id"] in kept or row["id"] in rejected, row["id"]
        if row["bad_kind"]:
            assert row["id"] not in kept
            assert rejected[row["id"]] == row["expected"], row
        elif len(row["shots"]) == 1:
            assert row["id"] in kept, row
    bad_kinds = {row["bad_kind"] for row in manifest} - {None}
    assert bad_kinds == {"zero_byte", "truncated", "random_bytes", "frozen", "too_short", "tiny"}
    # inputs = kept sources + rejected sources, counted from the files: every input not in a
    # shard has a reject row, and nothing else is there
    ids = {row["id"] for row in manifest}
    assert kept <= ids and set(rejected) <= ids and ids - kept <= set(rejected)
    stats = json.loads((d["shard"] / "stats.json").read_text())
    assert (stats["inputs"], stats["kept_sources"], stats["rejected_sources"]) == (
        len(ids), len(kept), len(ids - kept))
    # clips are conserved from stage to stage, each stage's manifests read on their own: the
    # clips a stage got = the clips it kept + the spans it rejected (its rejects less the ones
    # it was handed), and no stage loses an upstream reject.
    span = lambda r: (r["source_id"], r["start"], r["end"])  # noqa: E731
    row = lambda r: (r["source_id"], r["stage"], r["reason"], r["start"], r["end"])  # noqa: E731
    curation = ["curate", "filter", "caption", "shard"]
    for up, down in zip(curation, curation[1:]):
        clips_in = [span(c) for c in read_parquet(d[up] / "clips.parquet")]
        clips_out = [span(c) for c in read_parquet(d[down] / "clips.parquet")]
        rej_in = Counter(row(r) for r in read_parquet(d[up] / "rejects.parquet"))
        rej_out = Counter(row(r) for r in read_parquet(d[down] / "rejects.parquet"))
        assert not rej_in - rej_out, (down, "lost rejects", rej_in - rej_out)
        dropped = [(sid, a, b) for sid, _, _, a, b in (rej_out - rej_in).elements()]
        assert all(a is not None for _, a, _ in dropped), (down, dropped)  # spans, not sources
        assert sorted(clips_in) == sorted(clips_out + dropped), (up, down)
        assert len(set(clips_out + dropped)) == len(clips_out) + len(dropped)
    # and from the first to the last: the clips curate kept = sharded + filtered out downstream
    curated = read_parquet(d["curate"] / "clips.parquet")
    downstream = Counter(row(r) for r in rejects) - Counter(
        row(r) for r in read_parquet(d["curate"] / "rejects.parquet"))
    assert len(curated) == len(clips) + sum(downstream.values())
    assert stats["funnel"][-1] == {**stats["funnel"][-1], "step": "sharded",
                                   "count": len(clips)}


def test_shards_read_with_webdataset_and_tarfile_and_decode(run1):
    d = run1["dirs"]["shard"]
    index = json.loads((d / "index.json").read_text())
    clips = {c["key"]: c for c in read_parquet(d / "clips.parquet")}
    urls = [str(d / p) for split in ("train", "val") for p in index[split]]
    assert index["val"], "no validation shard"
    seen = []
    for s in read_shards(urls):
        seen.append(s["__key__"])
        meta, clip = s["json"], clips[s["__key__"]]
        assert s["txt"] == meta["caption"] == clip["caption"] and s["txt"]
        assert meta["caption_source"] == clip["caption_source"] == "source:synthetic"
        n = meta["end"] - meta["start"]
        assert read_frames(s["mp4"]).shape[0] == n == read_frames_av(s["mp4"]).shape[0]
    assert sorted(seen) == sorted(clips)  # every manifest clip is in exactly one shard
    for u in urls:
        with tarfile.open(u) as tf:
            names = tf.getnames()
        keys = {n.split(".", 1)[0] for n in names}
        assert sorted(names) == sorted(f"{k}.{e}" for k in keys for e in ("json", "mp4", "txt"))
    assert not list(d.rglob("*.tmp"))


def test_training_ran_deepspeed_on_two_workers_and_logged(run1):
    d = run1["dirs"]["train"]
    res = json.loads((d / "train_result.json").read_text())
    assert res["world_size"] == 2 and res["zero_stage"] == 2
    assert res["run_ids_seen"] == [run1["lineage"]["run_id"]] * 2  # via the environment
    assert res["allocator_seen"] == [ALLOCATOR_ENV] * 2  # in each rank's environment from its start
    checkpoint, last = RunCheckpoints(d).latest()  # Ray Train's
    ckpt = Path(checkpoint.path) / f"step{last['step']:08d}"
    assert last["world_size"] == 2 and {p.name for p in ckpt.iterdir()} >= {
        "mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    }
    steps = [json.loads(s) for s in (d / "metrics.jsonl").read_text().splitlines()]
    losses = [s["metrics"]["train/loss"] for s in steps if s["kind"] == "metrics"]
    assert len(losses) == 6 and all(0 < v < 10 for v in losses)
    assert (d / "model.pt").exists()


def test_text_conditioning_holds_through_training_and_the_prompt_changes_the_sample(run1):
    """Issue 17: the frozen default keeps one-word-apart captions apart for the whole run
    (logged as train/text_sep/*), and the trained model's samples depend on the prompt."""
    import torch

    from training.evaluation.evaluate import EvalConfig, load_model, sample_videos

    d = run1["dirs"]["train"]
    logged = [json.loads(s)["metrics"] for s in (d / "metrics.jsonl").read_text().splitlines()
              if json.loads(s)["kind"] == "metrics"]
    seps = [m for m in logged if "train/text_sep/direction" in m]
    assert len(seps) >= 2  # the first and the last step
    for a in ("color", "shape", "direction", "count"):
        assert all(m[f"train/text_sep/{a}"] > 0.2 for m in seps), a  # floor: ~0.3 at init
        assert seps[-1][f"train/text_sep/{a}"] == pytest.approx(seps[0][f"train/text_sep/{a}"])
    model, mcfg = load_model(d, torch.device("cpu"))
    prompts = ["one red circle moving right on a black background",
               "one green circle moving left on a black background"]
    v = sample_videos(model, mcfg.text.build_tokenizer(), prompts, EvalConfig(sample_steps=4),
                      (3, 8, 32, 32), 1.0, torch.device("cpu"), seeds=[7, 7])  # the same noise
    assert (v[0].int() - v[1].int()).abs().float().mean() > 0.5  # in 0-255 levels
    res = json.loads((run1["dirs"]["eval"] / "results.json").read_text())
    for a in ("color", "shape", "direction", "count", "all"):
        assert 0.0 <= res[f"sensitivity/{a}"] <= 1.0


def test_eval_wrote_val_loss_and_decodable_samples(run1):
    d = run1["dirs"]["eval"]
    res = json.loads((d / "results.json").read_text())
    assert 0 < res["val/loss"] < 10 and res["val/clips"] >= 1
    assert len(res["samples"]) == 2
    for s in res["samples"]:
        frames = read_frames(d / s["path"])
        assert frames.shape == (8, 32, 32, 3)


def test_the_report_renders_the_real_runs_files(run1):
    """`spacetime report` on the run the graph really made (not a hand-made one): every
    section has data, every video it plays is one eval wrote, and nothing is fetched from
    anywhere but the page's own directory tree."""
    import html
    import re

    lin = run1["lineage"]
    r = spacetime("report", lin["run_id"], cwd=run1["cwd"])
    assert r.returncode == 0, r.stderr[-2000:]
    page_path = Path(r.stdout.strip().splitlines()[-1])
    page = page_path.read_text()
    res = json.loads((run1["dirs"]["eval"] / "results.json").read_text())
    stats = json.loads((run1["dirs"]["shard"] / "stats.json").read_text())
    for s in stats["funnel"]:
        assert html.escape(s["step"]) in page  # the funnel's steps
    for s in res["samples"]:
        assert html.escape(s["prompt"], quote=False) in page
    videos = [html.unescape(v) for v in re.findall(r'<video [^>]*src="([^"]+)"', page)]
    want = {(run1["dirs"]["eval"] / s["path"]).resolve() for s in res["samples"]}
    assert want <= {(page_path.parent / v).resolve() for v in videos}
    assert "color" in page and lin["git"]["commit"][:12] in page
    assert lin["stages"]["train"]["hash"][:12] in page
    assert "<svg" in page and "train/loss" in page
    assert "sensitivity/direction" in page and "train/text_sep/direction" in page  # issue 17
    refs = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert refs and not [u for u in refs if re.match(r"[a-z]+://", u) or u.startswith("//")]


def test_wandb_offline_runs_one_per_stage_grouped_by_run_id(run1):
    """Each stage's offline run, read back record by record: its group and job type, and what
    a dashboard would show (training curves; each curation stage's funnel table, equal to its
    stats.json, and its score histograms as W&B histograms)."""
    from wandb_offline import logged, records, table

    lin = run1["lineage"]
    run_dirs = [Path(s["result"]["tracking"]["wandb_dir"]) for s in lin["stages"].values()]
    assert len(set(run_dirs)) == len(STAGES)
    for name, rd in zip(lin["stages"], run_dirs):
        assert rd.name.startswith("offline-run-")
        (run,) = [r.run for r in records(rd) if r.WhichOneof("record_type") == "run"]
        assert run.run_group == lin["run_id"] and run.job_type == name
    by_stage = dict(zip(lin["stages"], run_dirs))
    train = logged(by_stage["train"])
    assert 0 < train["train/loss"] < 10 and train["train/grad_norm"] > 0
    assert 0 < logged(by_stage["eval"])["val/loss"] < 10
    for name in ("curate", "filter", "caption", "shard"):
        got, d = logged(by_stage[name]), run1["dirs"][name]
        stats = json.loads((d / "stats.json").read_text())
        funnel = table(by_stage[name], got["funnel"])
        assert funnel["columns"] == ["step", "count", "unit", "hours"]
        assert [r[:2] for r in funnel["data"]] == [[s["step"], s["count"]]
                                                   for s in stats["funnel"]]
        assert len(table(by_stage[name], got["rejects"])["data"]) == len(
            read_parquet(d / "rejects.parquet"))
        assert {"motion", "sharpness", "brightness"} <= set(stats["histograms"])
        for score, h in stats["histograms"].items():
            w = got[f"{name}/hist/{score}"]
            assert w["_type"] == "histogram" and w["values"] == h["counts"]
            assert w["bins"] == pytest.approx(h["edges"])
        assert sum(got[f"{name}/hist/motion"]["values"]) == len(
            read_parquet(d / "clips.parquet"))
        assert (d / "funnel.png").stat().st_size > 10_000
        assert got["funnel_chart"]["_type"] == "image-file"
    # lineage as `wandb sync` uploads it: each stage's output artifact (its files, no marker
    # nor info.json), and per input the producer's artifact, same digest, flagged for use
    arts = {n: [r.artifact for r in records(rd) if r.WhichOneof("record_type") == "artifact"
                and r.artifact.type != "run_table"] for n, rd in by_stage.items()}
    outputs = {}
    for n, found in arts.items():
        (out,) = [a for a in found if not a.use_after_commit]
        assert out.name == f"{n}-{lin['stages'][n]['hash'][:12]}" and out.type == n
        assert not {e.path for e in out.manifest.contents} & {"_RUNNING.json", "_SUCCESS.json", "info.json"}
        outputs[n] = out
    for n, found in arts.items():
        used = {a.name: a for a in found if a.use_after_commit}
        assert set(used) == {outputs[i].name for i in lin["stages"][n]["upstream"]}, n
        for i in lin["stages"][n]["upstream"]:
            assert used[outputs[i].name].digest == outputs[i].digest, (n, i)  # sync finds its version


def test_rerun_is_all_cached_and_an_override_makes_only_train_and_eval_stale(run1):
    cwd = run1["cwd"]
    r = spacetime("run", "experiment=tiny", cwd=cwd)
    assert r.returncode == 0, r.stderr[-2000:]
    lin = lineage_of(r, run1["root"])
    assert {s["state"] for s in lin["stages"].values()} == {"cached"}
    assert "running" not in r.stdout  # nothing executed, so Ray was never started

    r = spacetime("status", "experiment=tiny", "train.lr=5e-4", cwd=cwd)
    states = {line.split()[0]: line.split()[1] for line in r.stdout.splitlines()[1:]}
    assert states == {**CURATION, "train": "stale", "eval": "stale"}
    # (the override's run, what status then says, and --only eval: the SIGTERM test below)


def test_a_ray_tune_sweep_runs_the_train_stage_as_trials(run1):
    """`spacetime tune --grid train.lr=...`: one Ray Tune trial per value, each the train stage
    under a run id of its own (curation reused, not rerun), reporting Ray Train's checkpoint
    metrics to Tune; Tune's results under run.root/tune/<sweep id>."""
    cwd, root = run1["cwd"], run1["root"]
    r = spacetime("tune", "--grid", "train.lr=1e-3,2e-3", "experiment=tiny", "train.steps=2",
                  "cluster.num_workers=1", cwd=cwd)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "sweep: 2 trials, 0 failed; best by train/loss (min)" in r.stdout
    (sweep,) = (root / "tune").iterdir()
    results = {}
    for trial in sorted(sweep.glob("trial_*")):
        rows = [json.loads(s) for s in (trial / "result.json").read_text().splitlines()]
        results[json.loads((trial / "params.json").read_text())["train.lr"]] = rows[-1]
    assert sorted(results) == ["1e-3", "2e-3"]
    train_dirs = set()
    for lr, last in results.items():
        assert last["step"] == 2 and math.isfinite(last["train/loss"]) and last["world_size"] == 1
        assert last["train/lr"] == pytest.approx(float(lr), rel=0.5)  # the trial's own rate
        ckpt = Path(last["checkpoint_path"])  # Ray Train's checkpoint, in the stage output
        train_dir = ckpt.parent.parent
        assert RunCheckpoints(train_dir).latest()[1]["step"] == 2 and train_dir.parent == root / "stages"
        train_dirs.add(train_dir)
        lin = json.loads((root / "runs" / f"{sweep.name}-{last['trial_id']}" / "lineage.json").read_text())
        assert lin["tune"] == {"sweep_id": sweep.name, "trial_id": last["trial_id"],
                               "params": {"train.lr": lr}}
        assert {n: st["state"] for n, st in lin["stages"].items()} == {
            **dict.fromkeys(CURATION, "cached"), "train": "done", "eval": "skipped"}
        assert lin["stages"]["train"]["path"] == str(train_dir)
    assert len(train_dirs) == 2  # a stage output per trial


def test_a_real_stage_that_raises_is_failed_and_redone(run1):
    cwd = run1["cwd"]
    clips = run1["dirs"]["caption"] / "clips.parquet"
    hidden = clips.with_name("clips.parquet.hidden")
    clips.rename(hidden)  # the shard stage will raise reading its input
    try:
        r = spacetime("run", "--only", "shard", "experiment=tiny", cwd=cwd)
    finally:
        hidden.rename(clips)
    assert r.returncode == 1 and "stage 'shard' failed" in r.stderr
    shard_dir = run1["dirs"]["shard"]
    assert not (shard_dir / "_SUCCESS.json").exists()
    assert "clips.parquet" in json.loads((shard_dir / "_FAILED.json").read_text())["error"]
    r = spacetime("status", "experiment=tiny", cwd=cwd)
    states = {line.split()[0]: line.split()[1] for line in r.stdout.splitlines()[1:]}
    assert states["shard"] == "failed" and states["caption"] == "cached"

    r = spacetime("run", "experiment=tiny", cwd=cwd)  # shard is missing: redone, and so is
    assert r.returncode == 0                          # nothing else (same hashes downstream)
    states = {n: s["state"] for n, s in lineage_of(r, run1["root"])["stages"].items()}
    assert states["shard"] == "done" and states["caption"] == "cached"
    assert (shard_dir / "_SUCCESS.json").exists()


def test_sigterm_checkpoints_then_the_rerun_resumes(run1):
    """Preemption: SIGTERM to `spacetime run` -> every rank checkpoints, the stage stops as
    failed; the next run resumes training from that checkpoint and finishes the graph. The
    run is a training override of run1's graph: only train and eval run, and `--only eval`
    then reruns eval alone."""
    import signal
    import time

    cwd = run1["cwd"]
    overrides = ["experiment=tiny", "train.steps=60", "train.ckpt_every=1000"]
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    env["SPACETIME_RUN_ID"] = ""
    log = cwd / "preempt.log"
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", *overrides], cwd=cwd,
                             env=env, stdout=f, stderr=subprocess.STDOUT)
    train_dir, deadline = None, time.time() + 400
    while p.poll() is None and time.time() < deadline:
        text = log.read_text()
        if train_dir is None and "[train] running -> " in text:
            train_dir = Path(text.split("[train] running -> ")[1].split()[0])
        metrics = train_dir / "metrics.jsonl" if train_dir else None
        if metrics is not None and metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            p.send_signal(signal.SIGTERM)
            break
        time.sleep(0.2)
    assert p.wait(timeout=400) == 1, log.read_text()[-3000:]
    assert train_dir is not None and not (train_dir / "_SUCCESS.json").exists()
    assert "preempted" in json.loads((train_dir / "_FAILED.json").read_text())["error"]
    step = RunCheckpoints(train_dir).latest()[1]["step"]  # Ray Train's latest checkpoint
    assert 3 <= step < 60

    r = spacetime("run", *overrides, cwd=cwd)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((train_dir / "train_result.json").read_text())
    assert res["resumed_from_step"] == step and res["steps"] == 60
    # the training override reran train and eval and nothing upstream
    states = {n: s["state"] for n, s in lineage_of(r, run1["root"])["stages"].items()}
    assert states == {**CURATION, "train": "done", "eval": "done"}
    root = f"run.root={run1['root']}"
    assert graph_status([*overrides, root]) == {**CURATION, "train": "done", "eval": "done"}
    assert graph_status(["experiment=tiny", root]) == dict.fromkeys(STAGES, "cached")

    r = spacetime("run", "--only", "eval", *overrides, cwd=cwd)  # one stage, forced
    states = {n: s["state"] for n, s in lineage_of(r, run1["root"])["stages"].items()}
    assert states == {**CURATION, "train": "cached", "eval": "done"}


def test_latent_experiment_reuses_curation_and_trains_on_vae_latents(run1):
    """experiment=latent on the same root, with a frozen (tiny, random, local) open_clip text
    encoder: curation is cached (same hashes), our VAE is trained, the shards are encoded once
    into latent shards with the captions' embeddings, the DiT trains on them (its channels
    follow the VAE, the text encoder never runs) and evaluation decodes its samples through the
    VAE. Then the precompute stage reruns alone: the VAE stays cached, training goes stale."""
    import numpy as np
    import webdataset as wds
    from test_text import write_open_clip_checkpoint, write_open_clip_dir

    from training.text import TextEncoderConfig, encode_captions

    cwd = run1["cwd"]
    name = write_open_clip_dir(cwd / "clip")
    text = TextEncoderConfig(kind="open_clip", name=name, dim=64, max_length=16,
                             pretrained=write_open_clip_checkpoint(cwd / "clip" / "text.pt", name))
    args = ["experiment=latent", "tracking=disabled", "model.text.kind=open_clip",
            f"model.text.name='{text.name}'", f"model.text.pretrained='{text.pretrained}'",
            "model.text.dim=64", "model.text.max_length=16", "model.dit.text_dim=64"]
    r = spacetime("run", *args, cwd=cwd)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lin = lineage_of(r, run1["root"])
    states = {n: s["state"] for n, s in lin["stages"].items()}
    assert states == {**CURATION, "vae": "done", "precompute": "done", "train": "done",
                      "eval": "done"}
    d = {n: Path(s["path"]) for n, s in lin["stages"].items()}
    vae = json.loads((d["vae"] / "results.json").read_text())
    assert vae["final"]["recon_loss"] < vae["step0"]["recon_loss"]
    stats = json.loads((d["precompute"] / "stats.json").read_text())
    shard_stats = json.loads((d["shard"] / "stats.json").read_text())
    assert stats["clips_in"] == shard_stats["clips_sharded"] == stats["clips_encoded"]
    info = json.loads((d["precompute"] / "info.json").read_text())
    assert info["config"]["model"] == {"text": {k: v for k, v in lin["config"]["model"]["text"].items()
                                                if k not in ("cache_size", "cache_dir")}}
    index = json.loads((d["precompute"] / "index.json").read_text())
    sample = next(iter(wds.WebDataset(str(d["precompute"] / index["train"][0]),
                                      shardshuffle=False).decode()))
    assert sample["latent.npy"].shape == (4, 3, 4, 4)  # (C, 1 + 8/4, 32/8, 32/8)
    enc = text.build()  # the stored embeddings are a fresh encode of the caption
    assert stats["text_encoder"] == enc.identity
    fresh, mask = encode_captions(enc, text.build_tokenizer(), [sample["txt"]])
    np.testing.assert_allclose(sample["text.npy"], fresh[0, mask[0]].numpy(), rtol=1e-5, atol=1e-6)
    tcfg = json.loads((d["train"] / "train_config.json").read_text())
    assert tcfg["latent"]["identity"] == stats["vae"]
    assert json.loads((d["train"] / "model_config.json").read_text())["dit"]["in_channels"] == 4
    tres = json.loads((d["train"] / "train_result.json").read_text())
    assert tres["text_from_shards"] and tres["text_encoder_calls"] == 0  # never ran in training
    res = json.loads((d["eval"] / "results.json").read_text())
    assert 0 < res["val/loss"] < 10 and 0 < res["recon/psnr"] < 60 and 0 < res["recon/ssim"] <= 1
    frames = read_frames(d["eval"] / res["samples"][0]["path"])
    assert frames.shape == (9, 32, 32, 3)

    # rerunnable alone: new latent shards (fp16) while the VAE is reused; training is now stale
    r = spacetime("run", "--only", "precompute", *args, "latent.store_dtype=fp16", cwd=cwd)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lin = lineage_of(r, run1["root"])
    states = {n: s["state"] for n, s in lin["stages"].items()}
    assert states == {**CURATION, "vae": "cached", "precompute": "done", "train": "skipped",
                      "eval": "skipped"}
    again = json.loads((Path(lin["stages"]["precompute"]["path"]) / "stats.json").read_text())
    assert again["clips_encoded"] == stats["clips_encoded"] and again["vae"] == stats["vae"]
    sample = next(iter(wds.WebDataset(str(Path(lin["stages"]["precompute"]["path"]) / index["train"][0]),
                                      shardshuffle=False).decode()))
    assert sample["latent.npy"].dtype == np.float16
    status = graph_status([*args, "latent.store_dtype=fp16", f"run.root={run1['root']}"])
    assert status == {**CURATION, "vae": "cached", "precompute": "done", "train": "stale",
                      "eval": "stale"}
