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

Every clip leaves with ``caption``, ``caption_source`` and, with ``keep_source_caption``,
``source_caption``. ``caption_source`` is ``vlm:Qwen/Qwen2.5-VL-3B-Instruct@<revision>`` for a
VLM caption, and for a passed-through one ``source:<origin>``: where the source stage found it
(``synthetic``, ``manifest``, ``sidecar``: a ``.txt`` beside the video; the clip's
``source.caption_origin``), or ``source:none`` when the source had no caption. A clip whose
captioning fails is not lost: it comes back as a reject with reason ``caption_failed`` and the
error in ``detail``.

The VLM path runs as resumable parts (`pipeline.curation.parts.run_parts`): the clips are cut into groups
of ``group_size``, and each group goes through two steps on Ray, a bounded number in flight, so
it streams with backpressure and runs unchanged on a multi-node cluster:

    groups ──CPU tasks──► sampled frames ──actor pool──► captions
             decode num_frames                   CaptionGroup: one model per actor,
             per clip                            batched generate, GPUs when there are any

and the driver writes each group's captions to ``parts/part-NNNNNN.jsonl`` atomically as it
arrives. A killed driver loses only the groups in flight: the graph keeps the caption stage's
unfinished directory (``resumable=True``) and the rerun captions only the groups with no part.

Decoding is a separate task so GPU actors never wait on video decoding. (On a CPU-only
cluster each actor decodes its own clips: no frames cross the object store, and the CPUs were
shared anyway.) The pool is
sized by `pipeline.curation.parts.actor_pool`: ``concurrency`` actors (default one per GPU), never more
than the cluster's GPUs hold. Each actor loads the model once. Failures, by kind:

- a worker or node dies: Ray restarts the actor and reruns the group it held, and reruns lost
  decode tasks, each up to `run_parts`' ``max_retries`` times (then the run fails);
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
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Optional, Protocol

import numpy as np

from data.checks import check_ranges
from pipeline.curation.media import read_clip_frames
from pipeline.curation.parts import (
    actor_pool,
    read_parts,
    resolve_num_gpus,  # noqa: F401 - part of this module's interface
    run_parts,
)

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
    group_size: int = 16  # clips per part: the unit of progress a killed driver can lose
    concurrency: Optional[int] = None  # model actors; None = one per GPU (1 without GPUs)
    num_gpus: Optional[float] = None  # per actor; None = 1 when the cluster has GPUs, else 0
    dtype: str = "auto"  # auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16 | float16
    keep_source_caption: bool = True  # keep the source's caption as source_caption
    max_retries: int = 3  # retries of a model load that raised (e.g. a hub timeout), per actor

    def __post_init__(self) -> None:
        check_ranges(self, num_frames=">= 1", frame_size=">= 1", max_new_tokens=">= 1",
                     batch_size=">= 1", group_size=">= 1", concurrency=">= 1", num_gpus=">= 0",
                     max_retries=">= 0")


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
    """A clip -> its sampled frames as raw bytes, or the error (in `decode_group`'s task)."""
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


def decode_group(clips: list[dict], num_frames: int, frame_size: int) -> list[dict]:
    """`run_parts`' prepare step (a CPU task): a group of clips -> their `decode_clip` rows."""
    return [decode_clip({"i": k, "clip": json.dumps(c)}, num_frames, frame_size)
            for k, c in enumerate(clips)]


# ----- the VLM ------------------------------------------------------------------------------
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
        import torch  # lazy: torch ~2 s to import, needed only here
        from transformers import (  # lazy: transformers ~1 s to import, needed only here
            AutoModelForImageTextToText,
            AutoProcessor,
        )

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
        import torch  # lazy: torch ~2 s to import, needed only here

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


def as_batch(rows: list[dict]) -> dict[str, np.ndarray]:
    """`decode_clip` rows -> the numpy batch `VLMCaptioner.__call__` takes."""
    batch = {}
    for k in ("clip", "frames", "shape", "error"):
        col = np.empty(len(rows), dtype=object)
        col[:] = [r[k] for r in rows]
        batch[k] = col
    batch["i"] = np.array([r["i"] for r in rows])
    return batch


class CaptionGroup:
    """Built once per actor of `run_parts`' pool: the VLM. Called on one group of clips and
    their decoded rows; captions them ``batch_size`` at a time."""

    def __init__(self, kwargs: dict, batch_size: int):
        self.captioner = VLMCaptioner(**kwargs)
        self.batch_size = batch_size

    def __call__(self, clips: list[dict], decoded: list[dict]) -> list[dict]:
        out = []
        for s in range(0, len(decoded), self.batch_size):
            rows = decoded[s:s + self.batch_size]
            res = self.captioner(as_batch(rows))
            out += [{"clip_id": clips[r["i"]]["clip_id"], "caption": str(res["caption"][k]),
                     "captioner": str(res["captioner"][k]), "error": str(res["error"][k])}
                    for k, r in enumerate(rows)]
        return out


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


def caption_clips(clips: list[dict], cfg: CaptionConfig, log=print, origin: str = "manifest",
                  out_dir: str | Path | None = None) -> tuple[list[dict], list[dict]]:
    """Caption clips (curate's clip dicts). Returns (captioned clips in input order, rejects).

    kind=source: ``caption_source`` is ``source:<origin>`` with the clip's own
    ``source.caption_origin`` when it has one, else ``origin``; ``source:none`` for an empty
    caption. kind=vlm needs Ray initialised (``ray.init`` or a cluster address); its parts go
    to ``out_dir/parts`` (a stage's output: resumed when they exist), else to a temporary
    directory.
    """
    if cfg.kind in ("source", "none"):
        out = []
        for c in clips:
            if cfg.kind == "none":
                cap = NullCaptioner()
            else:
                where = (c.get("source") or {}).get("caption_origin") or origin
                cap = SourceCaptioner(where if c.get("caption") else "none")
            out.append(_with_caption(c, cap.caption([c])[0], cap.name, cfg.keep_source_caption))
        return out, []
    if cfg.kind != "vlm":
        raise ValueError(f"unknown caption.kind '{cfg.kind}'; choose source, vlm or none")
    if not clips:
        return [], []
    if out_dir is None:
        with tempfile.TemporaryDirectory(prefix="caption-") as tmp:
            rows = _run_vlm(clips, cfg, log, Path(tmp))
    else:
        rows = _run_vlm(clips, cfg, log, Path(out_dir))
    kept, rejects = [], []
    for clip in clips:
        r = rows[clip["clip_id"]]
        if r["error"]:
            rejects.append(caption_reject(clip, f"{r['captioner']}: {r['error']}"))
        else:
            kept.append(_with_caption(clip, r["caption"], r["captioner"], cfg.keep_source_caption))
    log(f"captioned {len(kept)} clips with {rows[clips[0]['clip_id']]['captioner']}; "
        f"{len(rejects)} failed")
    return kept, rejects


VLM_KEYS = ("clip_id", "kind", "path", "abs_path", "start", "end", "fps", "width", "height",
            "source_bytes")  # what it reads (an image clip: its image, repeated)


def _run_vlm(clips: list[dict], cfg: CaptionConfig, log, out_dir: Path) -> dict[str, dict]:
    """-> {clip_id: {"caption", "captioner", "error"}}, as resumable parts in out_dir/parts."""
    import ray  # lazy: ray ~1.7 s (ray.train ~4.7 s) to import, needed only here

    actors, num_gpus = actor_pool(cfg.concurrency, cfg.num_gpus, ray.cluster_resources(),
                                  "caption")
    log(f"captioning {len(clips)} clips with {cfg.model}: {actors} actor(s), "
        f"{num_gpus:g} GPU(s) each, batches of {cfg.batch_size}, parts of {cfg.group_size}")
    run_parts([{k: c.get(k) for k in VLM_KEYS} for c in clips], None, out_dir / "parts",
              group_size=cfg.group_size, concurrency=actors, num_gpus=num_gpus,
              actor_factory=partial(CaptionGroup, vlm_kwargs(cfg), cfg.batch_size),
              prepare=partial(decode_group, num_frames=cfg.num_frames,
                              frame_size=cfg.frame_size),
              actor_init_retries=cfg.max_retries, log=log, name="caption", unit="clips")
    rows = {r.pop("clip_id"): r for r in read_parts(out_dir / "parts")}
    missing = {c["clip_id"] for c in clips} - set(rows)
    if missing:  # a bug, not a bad clip: the pipeline must return every row it was given
        raise RuntimeError(f"captioning lost {len(missing)} clips")
    return rows
