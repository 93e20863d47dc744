"""Latent shards: the curated clips encoded once through a VAE, for training without decoding.

    clip shards (mp4) --decode_sample--> (3, T, H, W) uint8 --VAE--> latent (C, t, h, w)
      --> shards/{train,val}-NNNNNN.tar with, per clip:
            <key>.latent.npy   the normalised latent, float32 (or float16: latent.store_dtype)
            <key>.txt          the caption
            <key>.json         the clip's metadata + video_shape, latent_shape, the VAE identity
            <key>.text.npy     with a frozen text encoder: the caption's real tokens (n, D) float32

Each latent shard has a ``<shard>.rows.json`` sidecar listing its samples (as the shard stage's
tars do), so a reader tells a damaged shard from a whole one (`data.shards.read_shards`); a
damaged input shard stops the precompute with an error naming it (`ShardIncomplete`), rather
than encoding what was left of it.

Images (a sample with a ``jpg``/``png``/``webp`` member, `training.clips.image_member`) are
encoded as one frame, whatever the span: ``video_shape`` (1, H, W), ``latent_shape`` (C, 1, h,
w), the causal VAE's single-frame path; they train in the 1-frame buckets.

What is stored per clip (``latent.span``): ``window`` (the default) encodes its first window of
``num_frames`` frames at ``target_fps`` (``decode_sample`` with no RNG), resized keeping the
aspect ratio and centre-cropped to ``size``: one fixed window per clip, where raw training
draws a random window each epoch. ``whole`` stores every frame of the clip at ``target_fps``
(trimmed to ``1 + k * tc``, at most ``max_frames``, short clips padded to ``num_frames``), each
sample's ``.json`` then giving its own ``video_shape`` and ``latent_shape``, and the loader
cuts windows of any bucket's length from it (`training.clips.latent_frames`). A whole clip is
streamed (`whole_clip`): frame 0, then ``chunk_frames * tc`` frames at a time are read from
the mp4 and go through our VAE's causal cache (``LatentSpace.encode_stream``), so memory is
that of a chunk whatever the clip's length (``benchmarks/bench_latent_memory.py``); a
diffusers VAE takes the decoded clip at once (its own encode chunks inside), so its memory
grows with the clip. The ``.npy`` members are plain numpy files (loaded with
``allow_pickle=False``: no code runs on load), so any WebDataset reader can use them.

The output directory mirrors the shard stage's: ``index.json`` (``{"train": [...], "val":
[...]}`` relative paths), ``stats.json`` where clips in = encoded + failed for every split,
with every failure listed with its key and reason, and ``latent_space.json`` (the VAE's
config, identity, channels, compression, the shapes), which ``load_latent_space`` reads back.
With a text encoder its ``text`` entry names the encoder (``identity``, ``dim``, ``max_length``)
and holds the empty caption's tokens (``null``, what caption dropout trains on), so a trainer
can assemble every batch's text from the shards alone (`training.latent_format.stored_text`) and never run the
encoder. Only frozen encoders (open_clip, t5) can be stored: a trained one changes every step.
Shards are written atomically and the same inputs give the same shards, so the precompute can
be rerun on its own at any time.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from data.shards import SIDECAR, read_shards, write_shard, write_sidecar
from training.clips import clip_geometry, decode_sample, image_member, normalize, read_resized, to_tensor
from training.latent.space import STREAM_CHUNK
from training.latent_format import LATENT, STORE, TEXT, npy_bytes
from training.text import encode_captions


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


class ClipUnreadable(Exception):
    """A clip's frames could not be read (span=whole reads them while encoding)."""


def whole_clip(sample: dict, size: tuple[int, int], target_fps: Optional[float], tc: int, chunk: int,
               min_frames: int, max_frames: int = 0):
    """Every frame of a clip at `target_fps` as a stream for ``LatentSpace.encode_stream``.

    Frames: the clip's at stride round(fps / target_fps), at most `max_frames` (0: all),
    trimmed to 1 + k * tc, and padded by repeating the last to `min_frames` (as a short clip's
    window is). Returns (frame count, an iterator of normalised chunks (1, 3, T_i, H, W): the
    first frame alone, then ``chunk * tc`` frames at a time, each read from the mp4 only when
    the encoder asks for it). A read error surfaces as ClipUnreadable."""
    try:
        n, fps, h, w = clip_geometry(sample)
    except Exception as e:  # noqa: BLE001 - an unreadable clip is recorded, never fatal
        raise ClipUnreadable(f"{type(e).__name__}: {e}") from e
    stride = max(1, round(fps / target_fps)) if target_fps else 1
    idx = list(range(0, n, stride))[: max_frames or None]
    if not idx:
        raise ClipUnreadable("the clip has no frames")
    idx = idx[: 1 + (len(idx) - 1) // tc * tc]
    idx += [idx[-1]] * max(0, min_frames - len(idx))
    step = chunk * tc
    bounds = [(0, 1)] + [(a, a + step) for a in range(1, len(idx), step)]

    def chunks():
        for a, b in bounds:
            try:
                frames = read_resized(sample, idx[a:b], (h, w), size)  # (T_i, H, W, 3)
            except Exception as e:  # noqa: BLE001 - recorded as the clip's failure
                raise ClipUnreadable(f"{type(e).__name__}: {e}") from e
            yield normalize(to_tensor(frames)[None])  # (1, 3, T_i, H, W)

    return len(idx), chunks()


def precompute_latents(latent_cfg, shard_urls_by_split: dict[str, list[str]], out_dir, num_frames: int,
                       size: tuple[int, int], target_fps: Optional[float], text=None, *,
                       vae_dir: Optional[str] = None, device=None, log=print) -> dict:
    """Encode every clip of the given shards into latent shards under `out_dir`; return the stats.

    latent_cfg: `training.latent.space.LatentConfig` (which VAE, how to encode, how to store).
    shard_urls_by_split: e.g. {"train": [...], "val": [...]} (``pipeline.stages.shard_urls``).
    text: optionally a frozen `training.text.TextEncoderConfig`; each caption's tokens are stored.
    vae_dir: for latent.kind=ours, the VAE-training output directory (else latent_cfg.path).
    """
    out = Path(out_dir)
    shard_dir = out / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    for old in [*shard_dir.glob("*.tar"), *shard_dir.glob(f"*.tar{SIDECAR}")]:  # a rerun replaces everything
        old.unlink()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    space = latent_cfg.build(vae_dir=vae_dir, device=device)
    video_shape = (int(num_frames), int(size[0]), int(size[1]))
    try:
        lat_shape = (space.channels, *space.latent_shape(video_shape))
    except ValueError as e:  # before anything is encoded, naming the keys
        raise ValueError(f"latent.num_frames/height/width (the training shape, train.num_frames/height/"
                         f"width): {e}") from None
    encoder = tokenizer = cache = None
    text_record = None
    if text is not None:
        if not text.frozen:
            raise ValueError(f"storing text embeddings needs a frozen text encoder (model.text.kind open_clip "
                             f"or t5, or tiny with lr_scale 0), not a trained {text.kind!r}: a trained encoder's embeddings go stale")
        encoder, tokenizer, cache = text.build().to(device), text.build_tokenizer(), text.build_cache()
        null, nmask = encode_captions(encoder, tokenizer, [""], cache)  # (1, L, D), (1, L)
        text_record = {"identity": encoder.identity, "kind": text.kind, "name": text.name,
                       "dim": encoder.out_dim, "max_length": tokenizer.max_length,
                       "null": null[0, nmask[0]].cpu().tolist()}  # (n0, D): caption dropout's tokens
    store_as = STORE[latent_cfg.store_dtype]
    whole = latent_cfg.span == "whole"
    chunk = latent_cfg.chunk_frames or STREAM_CHUNK
    # span=whole: the shapes are the least a clip holds (shorter clips are padded to them)
    record = {**space.describe(), "video_shape": list(video_shape), "latent_shape": list(lat_shape),
              "target_fps": target_fps, "store_dtype": latent_cfg.store_dtype, "text": text_record,
              "span": latent_cfg.span}

    t0 = time.time()
    index: dict[str, list[str]] = {}
    per_split: dict[str, dict] = {}
    failed: list[dict] = []
    total_bytes = 0
    for split, urls in shard_urls_by_split.items():
        names: list[str] = []
        pending: list[dict] = []  # encoded samples waiting for their shard
        n_in = n_ok = 0

        def flush(final: bool = False) -> None:
            nonlocal pending, total_bytes
            while len(pending) >= latent_cfg.clips_per_shard or (final and pending):
                name = f"{split}-{len(names):06d}.tar"
                chunk = pending[: latent_cfg.clips_per_shard]
                nbytes = write_shard(shard_dir / name, chunk)
                write_sidecar(shard_dir / name, {"shard": name, "bytes": nbytes, "rows": [
                    {"key": c["__key__"], "source_shard": c["json"]["source_shard"]} for c in chunk]})
                total_bytes += nbytes
                names.append(f"shards/{name}")
                pending = pending[latent_cfg.clips_per_shard :]

        def encode(batch: list[tuple]) -> None:
            video = normalize(torch.stack([b[1] for b in batch]).to(device))  # (B, 3, T, H, W)
            keys = [b[0]["__key__"] for b in batch]
            gen = torch.Generator().manual_seed(_seed(latent_cfg.seed, keys)) if latent_cfg.sample else None
            vshape = tuple(video.shape[2:])  # the clips' (T, H, W); images: (1, H, W)
            z = space.encode(video, generator=gen).cpu()  # (B, C, t, h, w)
            store(batch, z, vshape, tuple(z.shape[1:]))

        def encode_whole(s: dict) -> None:
            """One clip whole, streamed chunk by chunk through the encoder (span=whole)."""
            T, chunks = whole_clip(s, size, target_fps, space.compression[0], chunk, video_shape[0],
                                   latent_cfg.max_frames)
            gen = torch.Generator().manual_seed(_seed(latent_cfg.seed, [s["__key__"]])) if latent_cfg.sample else None
            z = space.encode_stream((c.to(device) for c in chunks), generator=gen).cpu()  # (1, C, t, h, w)
            store([(s, None, s.get("txt") or "")], z, (T, *video_shape[1:]), tuple(z.shape[1:]))

        def store(batch: list[tuple], z: torch.Tensor, vshape, lshape) -> None:
            nonlocal n_ok
            keys = [b[0]["__key__"] for b in batch]
            caps = [b[2] for b in batch]
            if encoder is not None:
                emb, emask = encode_captions(encoder, tokenizer, caps, cache)  # (B, L, D), (B, L)
                emb, emask = emb.cpu(), emask.cpu()
            for i, (s, _, cap) in enumerate(batch):
                if not torch.isfinite(z[i]).all():
                    failed.append({"key": keys[i], "split": split, "shard": Path(s["__url__"]).name,
                                   "reason": "nonfinite_latent", "detail": ""})
                    continue
                meta = s.get("json") if isinstance(s.get("json"), dict) else {}
                meta = {**meta, "video_shape": list(vshape), "latent_shape": list(lshape),
                        "target_fps": target_fps, "vae": space.identity,
                        "source_shard": Path(s["__url__"]).name}
                out_s = {"__key__": keys[i], LATENT: npy_bytes(z[i].numpy().astype(store_as)), "txt": cap,
                         "json": meta}
                if encoder is not None:
                    out_s[TEXT] = npy_bytes(emb[i, emask[i]].numpy().astype(np.float32))  # (n, D)
                    meta["text_encoder"] = encoder.identity
                pending.append(out_s)
                n_ok += 1
            flush()

        batches: dict[bool, list[tuple]] = {False: [], True: []}  # clips, images: one shape each
        for s in read_shards(urls):
            n_in += 1
            still = image_member(s) is not None
            try:
                if whole and not still:
                    encode_whole(s)
                    continue
                # an image is one frame, through the VAE's single-frame (causal first-frame) path
                video, cap = decode_sample(s, 1 if still else num_frames, size, target_fps, rng=None)  # (3, T, H, W)
            except (ClipUnreadable if whole and not still else Exception) as e:  # noqa: BLE001 - one bad clip is recorded, never fatal
                failed.append({"key": s.get("__key__", "?"), "split": split,
                               "shard": Path(s.get("__url__", "?")).name, "reason": "decode_failed",
                               "detail": f"{type(e).__name__}: {e}"})
                continue
            batches[still].append((s, video, cap))
            if len(batches[still]) == latent_cfg.batch_size:
                encode(batches[still])
                batches[still] = []
        for batch in batches.values():
            if batch:
                encode(batch)
        flush(final=True)
        index[split] = names
        n_failed = sum(f["split"] == split for f in failed)
        if n_in != n_ok + n_failed:
            raise RuntimeError(f"precompute lost clips in {split}: {n_in} in, {n_ok} encoded, {n_failed} failed")
        per_split[split] = {"clips_in": n_in, "encoded": n_ok, "failed": n_failed, "shards": len(names)}
        log(f"latents {split}: {n_ok}/{n_in} clips encoded into {len(names)} shards, {n_failed} failed")

    seconds = time.time() - t0
    n_in = sum(v["clips_in"] for v in per_split.values())
    n_ok = sum(v["encoded"] for v in per_split.values())
    reasons: dict[str, int] = {}
    for f in failed:
        reasons[f["reason"]] = reasons.get(f["reason"], 0) + 1
    stats = {"clips_in": n_in, "clips_encoded": n_ok, "clips_failed": len(failed), "per_split": per_split,
             "fail_reasons": reasons, "failed": failed, "bytes": int(total_bytes), "seconds": seconds,
             "clips_per_s": n_in / seconds if seconds > 0 else 0.0, "vae": space.identity,
             "text_encoder": encoder.identity if encoder is not None else None,
             "video_shape": list(video_shape), "latent_shape": list(lat_shape), "span": latent_cfg.span}
    (out / "index.json").write_text(json.dumps(index, indent=2))
    (out / "latent_space.json").write_text(json.dumps(record, indent=2))
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    return stats
