"""Captioning: give every kept clip a caption and record which captioner made it.

Three captioners, picked by ``CaptionConfig.kind``:

- ``source``: pass the source's own caption through (a synthetic clip's exact caption, or the
  ``.txt`` beside a video). No model, no Ray: it runs in the driver.
- ``vlm``: recaption with a vision-language model loaded through transformers'
  ``AutoProcessor`` / ``AutoModelForImageTextToText`` from a hub id or a local path. Anything
  those Auto classes load and whose processor takes ``videos=`` works; the default is
  Qwen2.5-VL, the model most open video curation pipelines use, because it reads a video
  natively (frames become spacetime patches at each clip's own aspect ratio, with its frame
  rate in the temporal positions) instead of a grid of stills.
- ``none``: empty captions (an unconditional dataset).

Every clip leaves with ``caption``, ``caption_source`` (e.g. ``source:synthetic`` or
``vlm:Qwen/Qwen2.5-VL-3B-Instruct@<revision>``) and, with ``keep_source_caption``,
``source_caption``. A clip whose captioning fails is not lost: it comes back as a reject with
reason ``caption_failed`` and the error in ``detail``.

The VLM path is a two-operator Ray Data pipeline, so it streams with backpressure and runs
unchanged on a multi-node cluster:

    clips ──map (CPU tasks)──► sampled frames ──map_batches (actor pool)──► captions
            decode num_frames                   VLMCaptioner: one model per actor,
            per clip                            batched generate, GPUs when there are any

Decoding is a separate task stage so GPU actors never wait on video decoding. (On a CPU-only
cluster both operators ask for the same resources and Ray Data fuses them, so each actor decodes
its own clips: no frames cross the object store, and the CPUs were shared anyway.) Each actor
loads the model once. Failures, by kind:

- a worker or node dies: Ray Data restarts the actor (its default: without limit) and reruns the
  batches it held; lost decode tasks are rerun by Ray;
- the model load raises (a hub timeout, say): retried in the actor up to ``max_retries`` times,
  then the run fails (a wrong model id is a config error, not a bad clip);
- one clip's error (a missing or corrupt file, a generate call that fails for that clip only):
  caught and recorded for that clip. A batch whose generate raises is retried clip by clip, so
  one bad clip does not take its batch-mates down with it.

Decoding is greedy (``do_sample=False``), so a given model, prompt and clip always give the
same caption.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Optional, Protocol

import numpy as np

DEFAULT_PROMPT = ("Describe this video in one detailed paragraph: the main subjects and their "
                  "appearance, what they do and how they move, the setting, and the camera motion.")


@dataclass
class CaptionConfig:
    kind: str = "source"  # source | vlm | none
    model: str = "Qwen/Qwen2.5-VL-3B-Instruct"  # kind=vlm: a hub id or a local directory
    revision: Optional[str] = None  # hub revision (branch, tag or commit); None = the default
    prompt: str = DEFAULT_PROMPT
    num_frames: int = 8  # sampled evenly over each clip's span
    frame_size: int = 336  # shorter side of the decoded frames (aspect kept); the processor
    #                        then applies the model's own pixel budget
    max_new_tokens: int = 128
    batch_size: int = 4  # clips per generate call
    concurrency: int = 1  # model actors
    num_gpus: Optional[float] = None  # per actor; None = 1 when the cluster has GPUs, else 0
    dtype: str = "auto"  # auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16 | float16
    keep_source_caption: bool = True  # keep the source's caption as source_caption
    max_retries: int = 3  # retries of a model load that raised (e.g. a hub timeout), per actor


class Captioner(Protocol):
    """Turns clips into captions.

    ``name`` is recorded with every caption it makes (``caption_source``). ``frames[i]`` is
    clip i's sampled frames (T, H, W, 3) uint8 when ``needs_frames``, else ``frames`` is None.
    Raises if it cannot caption the batch; callers isolate failures per clip.
    """

    name: str
    needs_frames: bool

    def caption(self, clips: list[dict], frames: list[np.ndarray] | None) -> list[str]: ...


class SourceCaptioner:
    """The source's own caption, unchanged. ``origin`` names where it came from."""

    needs_frames = False

    def __init__(self, origin: str = "manifest"):
        self.name = f"source:{origin}"

    def caption(self, clips: list[dict], frames=None) -> list[str]:
        return [c.get("caption") or "" for c in clips]


class NullCaptioner:
    """Empty captions, for unconditional training."""

    name = "none"
    needs_frames = False

    def caption(self, clips: list[dict], frames=None) -> list[str]:
        return ["" for _ in clips]


# ----- frames -------------------------------------------------------------------------------
def sample_indices(start: int, end: int, n: int) -> list[int]:
    """n frame indices spread evenly over [start, end), the middle of each of n equal parts.
    Spans shorter than n repeat frames, so every clip gives exactly n."""
    span = max(1, end - start)
    return [start + min(span - 1, int((k + 0.5) * span / n)) for k in range(n)]


def frame_hw(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(h, w) with the shorter side at short_side, aspect kept, both even."""
    scale = short_side / min(width, height)
    return max(2, round(height * scale / 2) * 2), max(2, round(width * scale / 2) * 2)


def sampled_fps(clip: dict, num_frames: int) -> float:
    """Frames per second of the sampled frames: the model's temporal positions use it."""
    seconds = max(1, clip["end"] - clip["start"]) / clip["fps"]
    return num_frames / seconds


def decode_clip(row: dict, num_frames: int, frame_size: int) -> dict:
    """Ray Data map (a CPU task): a clip -> its sampled frames as raw bytes, or the error."""
    from pipeline.media import read_clip_frames

    clip = json.loads(row["clip"])
    out = {"i": row["i"], "clip": row["clip"], "frames": b"", "shape": [0, 0, 0, 0], "error": ""}
    try:
        idx = sample_indices(clip["start"], clip["end"], num_frames)
        size = frame_hw(clip["width"], clip["height"], frame_size)
        frames = read_clip_frames(clip, idx, size)  # (T, h, w, 3) uint8; isolated, fetch on miss
        out["frames"], out["shape"] = frames.tobytes(), list(frames.shape)
    except Exception as e:  # noqa: BLE001 - a bad file fails its clip, not the run
        out["error"] = f"decode: {type(e).__name__}: {e}"[:1000]
    return out


# ----- the VLM ------------------------------------------------------------------------------
def resolve_num_gpus(requested: float | None, cluster_resources: dict) -> float:
    """GPUs per model actor: as configured, else one when the cluster has any GPU."""
    if requested is not None:
        return float(requested)
    return 1.0 if cluster_resources.get("GPU", 0) > 0 else 0.0


def model_version(model: str, revision: str | None, config) -> str:
    """What identifies the weights: the hub revision asked for, else the commit the hub served,
    else (a local directory) a hash of its config.json and its weight files' names and sizes.
    The last is cheap, not a content hash: two checkpoints of one architecture with the same
    file sizes would collide."""
    if revision:
        return revision[:12]
    commit = getattr(config, "_commit_hash", None)
    if commit:
        return commit[:12]
    h = hashlib.sha256(config.to_json_string(use_diff=False).encode())
    if os.path.isdir(model):
        for name in sorted(os.listdir(model)):
            if name.endswith((".safetensors", ".bin", ".pt")):
                h.update(f"{name}:{os.path.getsize(os.path.join(model, name))}".encode())
    return h.hexdigest()[:12]


def model_label(model: str) -> str:
    """A hub id as is; a local directory by its basename (no machine paths in the outputs)."""
    return os.path.basename(os.path.normpath(model)) if os.path.isdir(model) else model


class VLMCaptioner:
    """A vision-language model that captions videos; one instance per Ray actor.

    Built for ``Dataset.map_batches(VLMCaptioner, fn_constructor_kwargs=vlm_kwargs(cfg), ...)``:
    the constructor loads the model once, ``__call__`` captions a batch of decoded clips. Also
    usable directly through ``caption(clips, frames)``.
    """

    needs_frames = True

    def __init__(self, model: str, prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 128,
                 dtype: str = "auto", revision: str | None = None):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if dtype == "auto":
            dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        self.dtype = getattr(torch, dtype)
        self.processor = AutoProcessor.from_pretrained(model, revision=revision)
        self.processor.tokenizer.padding_side = "left"  # decoder-only batched generation
        self.model = AutoModelForImageTextToText.from_pretrained(
            model, revision=revision, dtype=self.dtype).to(self.device).eval()
        self.name = f"vlm:{model_label(model)}@{model_version(model, revision, self.model.config)}"
        self.max_new_tokens = max_new_tokens
        content = [{"type": "video"}, {"type": "text", "text": prompt}]
        messages = [{"role": "user", "content": content}]
        self.text = self.processor.apply_chat_template(messages, add_generation_prompt=True,
                                                       tokenize=False)

    def caption(self, clips: list[dict], frames: list[np.ndarray] | None) -> list[str]:
        import torch

        assert frames is not None and len(frames) == len(clips)
        meta = [{"fps": sampled_fps(c, len(f)), "total_num_frames": len(f),
                 "height": f.shape[1], "width": f.shape[2]} for c, f in zip(clips, frames)]
        inputs = self.processor(text=[self.text] * len(clips), videos=list(frames),
                                video_metadata=meta, do_sample_frames=False, padding=True,
                                return_tensors="pt")
        inputs = inputs.to(self.device)
        for k, v in inputs.items():  # pixels in the model's dtype; ids and grids stay integers
            if torch.is_tensor(v) and v.is_floating_point():
                inputs[k] = v.to(self.dtype)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens,
                                      do_sample=False)  # (B, L + new)
        new = out[:, inputs["input_ids"].shape[1]:]  # (B, new) left padding: prompts end together
        return [t.strip() for t in self.processor.batch_decode(new, skip_special_tokens=True)]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["i"])
        clips = [json.loads(s) for s in batch["clip"]]
        captions, errors = [""] * n, [str(e) for e in batch["error"]]
        ok = [k for k in range(n) if not errors[k]]
        frames = {k: np.frombuffer(batch["frames"][k], np.uint8).reshape(batch["shape"][k]).copy()
                  for k in ok}  # (T, h, w, 3) uint8 each
        groups = [ok] if ok else []
        while groups:
            group = groups.pop()
            try:
                got = self.caption([clips[k] for k in group], [frames[k] for k in group])
                for k, c in zip(group, got):
                    captions[k] = c
                    errors[k] = "" if c else "caption: empty"
            except Exception as e:  # noqa: BLE001 - retry alone, so one clip fails alone
                if len(group) > 1:
                    groups.extend([k] for k in group)
                else:
                    errors[group[0]] = f"caption: {type(e).__name__}: {e}"[:1000]
        return {"i": np.asarray(batch["i"]), "caption": np.array(captions, dtype=object),
                "captioner": np.array([self.name] * n, dtype=object),
                "error": np.array(errors, dtype=object)}


def vlm_kwargs(cfg: CaptionConfig) -> dict:
    return {"model": cfg.model, "prompt": cfg.prompt, "max_new_tokens": cfg.max_new_tokens,
            "dtype": cfg.dtype, "revision": cfg.revision}


# ----- the stage ----------------------------------------------------------------------------
def caption_reject(clip: dict, detail: str) -> dict:
    """A rejects row (curate's schema) for a clip whose captioning failed."""
    return {"source_id": clip["source_id"], "path": clip["path"], "stage": "caption",
            "reason": "caption_failed", "detail": detail, "start": clip["start"],
            "end": clip["end"]}


def _with_caption(clip: dict, caption: str, captioner: str, keep_source: bool) -> dict:
    out = {**clip, "caption": caption, "caption_source": captioner}
    if keep_source:
        out["source_caption"] = clip.get("caption") or ""
    return out


def caption_clips(clips: list[dict], cfg: CaptionConfig, log=print, origin: str = "manifest"
                  ) -> tuple[list[dict], list[dict]]:
    """Caption clips (curate's clip dicts). Returns (captioned clips in input order, rejects).

    ``origin`` names the source captions' provenance in ``caption_source`` (``source:<origin>``),
    e.g. the source kind. kind=vlm needs Ray initialised (``ray.init`` or a cluster address).
    """
    if cfg.kind in ("source", "none"):
        cap = SourceCaptioner(origin) if cfg.kind == "source" else NullCaptioner()
        captions = cap.caption(clips)
        return [_with_caption(c, t, cap.name, cfg.keep_source_caption)
                for c, t in zip(clips, captions)], []
    if cfg.kind != "vlm":
        raise ValueError(f"unknown caption.kind '{cfg.kind}'; choose source, vlm or none")
    if not clips:
        return [], []
    rows = _run_vlm(clips, cfg, log)
    kept, rejects = [], []
    for k, clip in enumerate(clips):
        r = rows[k]
        if r["error"]:
            rejects.append(caption_reject(clip, f"{r['captioner']}: {r['error']}"))
        else:
            kept.append(_with_caption(clip, r["caption"], r["captioner"], cfg.keep_source_caption))
    log(f"captioned {len(kept)} clips with {rows[0]['captioner']}; {len(rejects)} failed")
    return kept, rejects


def _run_vlm(clips: list[dict], cfg: CaptionConfig, log) -> dict[int, dict]:
    import ray

    num_gpus = resolve_num_gpus(cfg.num_gpus, ray.cluster_resources())
    log(f"captioning {len(clips)} clips with {cfg.model}: {cfg.concurrency} actor(s), "
        f"{num_gpus:g} GPU(s) each, batches of {cfg.batch_size}")
    ds = ray.data.from_items([{"i": k, "clip": json.dumps(c)} for k, c in enumerate(clips)])
    # This dataset's own context (later operators copy it), so no global setting changes.
    ds.context.actor_init_retry_on_errors = cfg.max_retries > 0
    ds.context.actor_init_max_retries = cfg.max_retries
    ds = ds.map(decode_clip, fn_kwargs={"num_frames": cfg.num_frames, "frame_size": cfg.frame_size},
                num_cpus=1)
    ds = ds.map_batches(VLMCaptioner, fn_constructor_kwargs=vlm_kwargs(cfg),
                        batch_size=cfg.batch_size, batch_format="numpy",
                        concurrency=cfg.concurrency, num_cpus=1, num_gpus=num_gpus)
    rows: dict[int, dict] = {}
    t0, every = time.time(), max(1, len(clips) // 10)
    for r in ds.iter_rows():  # streams: captions arrive while later clips still decode
        rows[int(r["i"])] = {"caption": str(r["caption"]), "captioner": str(r["captioner"]),
                             "error": str(r["error"])}
        if len(rows) % every == 0 or len(rows) == len(clips):
            dt = time.time() - t0
            log(f"captioned {len(rows)}/{len(clips)} clips, {len(rows) / max(dt, 1e-9):.2f} "
                "clips/s")
    missing = set(range(len(clips))) - set(rows)
    if missing:  # a bug, not a bad clip: the pipeline must return every row it was given
        raise RuntimeError(f"captioning lost {len(missing)} clips")
    return rows
