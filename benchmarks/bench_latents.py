"""Latent-space benchmarks, in one run on this machine (not a test; prints ratios).

(a) DiT training throughput on precomputed latents (latent shards through the latent loader)
    against on-the-fly encoding (clip shards -> decode mp4 -> VAE encode -> the same DiT step),
    same model, same clips, same batch, same steps, the two arms' steps in rounds
    (`benchmarks/paired.py`) so that a shared machine's background load hits both alike; the
    ratio is the median of the rounds' own ratios, with their range. Target: >= 2x.
(b) VAE encode (and decode) clips/s for the VAE presets, untiled and tiled, and the precompute
    stage's clips/s end to end (read, decode, encode, write).

Single process, plain AdamW on the DiT (no DeepSpeed: the DiT step is identical in both arms,
only the input path differs). Weights are random: speed does not depend on them.

``--text open_clip`` gives the model a frozen open_clip text tower (``--text-model``, random
weights from its config, nothing downloaded): the precompute then stores the caption
embeddings too, the precomputed arm takes its text from the shards and the on-the-fly arm runs
the tower on every batch (no embedding cache: what the first epoch costs). The default tiny
text encoder is trained, so both arms run it alike.

    python benchmarks/bench_latents.py [--vae small] [--dit small] [--steps 6] [--frames 17] [--size 64]
                                       [--parts ab] [--text tiny|open_clip] [--text-model ViT-B-32]

The ratio in (a) is 1 + (mp4 decode + VAE encode) / DiT step, so it grows with the VAE's size
relative to the DiT's (try --vae base).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paired import interleave, ratio  # noqa: E402


def make_shards(root: Path, n: int, frames: int, size: int) -> list[str]:
    from data.shards import write_shard
    from data.synthetic import caption, render, sample_spec
    from data.video_io import encode_mp4

    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        spec = sample_spec(rng)
        samples.append({"__key__": f"clip{i:04d}", "mp4": encode_mp4(render(spec, frames, size, size), fps=8),
                        "txt": caption(spec),
                        "json": {"start": 0, "end": frames, "fps": 8.0, "width": size, "height": size}})
    root.mkdir(parents=True, exist_ok=True)
    urls = []
    for j in range(0, n, 8):
        write_shard(root / f"train-{j // 8:06d}.tar", samples[j : j + 8])
        urls.append(str(root / f"train-{j // 8:06d}.tar"))
    return urls


def save_vae(path: Path, preset: str) -> None:
    from dataclasses import asdict

    from training.latent.vae import VAEConfig

    torch.manual_seed(0)
    vae = VAEConfig.from_preset(preset).build()
    path.mkdir(parents=True, exist_ok=True)
    torch.save(vae.state_dict(), path / "vae.pt")
    (path / "vae_config.json").write_text(json.dumps(asdict(vae.cfg)))


def text_config(kind: str, model_name: str, root: Path):
    """The text encoder: the tiny trained one, or a frozen open_clip tower whose random weights
    are saved once (model.text.pretrained), so precompute and training load the same encoder."""
    from training.text import TextEncoderConfig

    if kind == "tiny":
        return TextEncoderConfig()
    import open_clip

    width = open_clip.get_model_config(model_name)["text_cfg"]["width"]
    cfg = TextEncoderConfig(kind="open_clip", name=model_name, dim=width, max_length=77)
    torch.manual_seed(0)
    root.mkdir(parents=True, exist_ok=True)
    torch.save(cfg.build().tower.state_dict(), root / "text.pt")
    return TextEncoderConfig(kind="open_clip", name=model_name, dim=width, max_length=77,
                             pretrained=str(root / "text.pt"))


def dit_step_fn(dit_preset: str, channels: int, text_cfg):
    from training.dit import DiTConfig
    from training.flow import FlowConfig, flow_loss
    from training.model import ModelConfig

    torch.manual_seed(0)
    model = ModelConfig(dit=DiTConfig.from_preset(dit_preset, in_channels=channels, patch_size=[1, 2, 2],
                                                  text_dim=text_cfg.dim), text=text_cfg).build()
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    tok = model.tokenizer

    def step(x0: torch.Tensor, captions: list[str], text=None) -> float:
        """text: stored (text (B, L, D), mask (B, L)), or None to encode the captions here."""
        if text is None:
            ids, mask = tok(captions)
            fn = lambda x, t: model(x, t, ids, mask)  # noqa: E731
        else:
            fn = lambda x, t: model(x, t, text=text[0], text_mask=text[1])  # noqa: E731
        loss, _, _ = flow_loss(fn, x0, FlowConfig(), generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def interleaved(arms: dict, step, steps: int, text_record: dict | None = None) -> dict:
    """One step of each arm per round, in turn (``benchmarks.paired``: background load on a
    shared machine hits both alike). arms: name -> (loader, encode or None). Returns name ->
    samples/s and input-path share over the rounds, and "ratio": pre / fly samples/s, the
    median of the rounds' own ratios (``paired.Paired``).
    text_record: the latent shards' text entry; the precomputed arm then takes stored text."""
    from training.clips import normalize
    from training.latent_format import stored_text

    def one(loader, encode):
        td = time.time()
        batch, caps, _ = next(loader)
        x0 = encode(normalize(batch)) if encode else batch  # (B, C, t, h, w)
        text = None
        if encode is None and text_record is not None:
            text = stored_text(loader.last["text"], [False] * len(caps), text_record)  # (B, L, D), (B, L)
        data = time.time() - td
        step(x0, caps, text)
        return len(batch), data

    rec = {k: [] for k in arms}  # name -> [(samples, input s, wall s)] per round

    def arm(k):
        def run():
            t0 = time.time()
            n, data = one(*arms[k])
            rec[k].append((n, data, time.time() - t0))
        return run

    interleave({k: arm(k) for k in arms}, steps, warmup=1)  # warm-up: first decode, allocator
    rate = {k: [n / w for n, _, w in v[1:]] for k, v in rec.items()}  # samples/s per round
    out = {k: {"samples_per_s": sum(n for n, _, _ in v[1:]) / sum(w for _, _, w in v[1:]),
               "input_share": sum(d for _, d, _ in v[1:]) / sum(w for _, _, w in v[1:])}
           for k, v in rec.items()}
    if {"pre", "fly"} <= set(arms):
        out["ratio"] = ratio(rate["pre"], rate["fly"])
    return out


def bench_encode(presets: list[str], frames: int, size: int, reps: int = 2) -> None:
    from training.latent.vae import VAEConfig

    x = torch.rand(2, 3, frames, size, size) * 2 - 1
    print(f"\n(b) VAE clips/s at {frames}x{size}x{size}, batch 2, {torch.get_num_threads()} threads")
    for p in presets:
        torch.manual_seed(0)
        vae = VAEConfig.from_preset(p).build().eval()
        with torch.no_grad():
            z = vae.encode(x)
            for name, kw in (("whole", {}), ("tiled", dict(tile=size // 2 + 16, overlap=16)),
                             ("chunked", dict(chunk=1))):
                t0 = time.time()
                for _ in range(reps):
                    vae.encode(x, **kw)
                enc = 2 * reps / (time.time() - t0)
                t0 = time.time()
                for _ in range(reps):
                    vae.decode(z, **kw)
                dec = 2 * reps / (time.time() - t0)
                print(f"  {p:6s} {name:8s} encode {enc:7.2f} clips/s   decode {dec:7.2f} clips/s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vae", default="small")
    ap.add_argument("--dit", default="small")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--clips", type=int, default=24)
    ap.add_argument("--parts", default="ab", help="which parts to run: a, b or ab")
    ap.add_argument("--chunk", type=int, default=0, help="latent frames per encode chunk (0: whole clip)")
    ap.add_argument("--text", default="tiny", choices=["tiny", "open_clip"], help="text encoder (see above)")
    ap.add_argument("--text-model", default="ViT-B-32", help="open_clip model of --text open_clip")
    args = ap.parse_args()

    from training.latent.precompute import precompute_latents
    from training.latent.space import LatentConfig
    from training.loader import Bucket, ClipStream, Loader, LoaderConfig

    if "a" not in args.parts:
        bench_encode(["tiny", args.vae] if args.vae != "tiny" else ["tiny"], args.frames, args.size)
        return
    root = Path(tempfile.mkdtemp(prefix="bench_latents_"))
    urls = make_shards(root / "clips", args.clips, args.frames, args.size)
    save_vae(root / "vae", args.vae)
    cfg = LatentConfig(kind="ours", batch_size=args.batch, chunk_frames=args.chunk)  # both arms encode alike
    text_cfg = text_config(args.text, args.text_model, root / "text")
    t0 = time.time()
    stats = precompute_latents(cfg, {"train": urls}, root / "latents", args.frames, (args.size, args.size), None,
                               text=text_cfg if text_cfg.frozen else None, vae_dir=str(root / "vae"),
                               log=lambda *a: None)
    pre_s = time.time() - t0
    lat_urls = [str(root / "latents" / p) for p in json.loads((root / "latents" / "index.json").read_text())["train"]]
    space = cfg.build(vae_dir=str(root / "vae"))
    bucket = [Bucket(args.frames, args.size, args.size, args.batch)]

    def loader(kind: str, u: list[str]) -> Loader:
        return Loader(ClipStream(u, buckets=bucket, rank=0, world=1, seed=0,
                                 cfg=LoaderConfig(kind=kind, shuffle_buffer=16)))

    step = dit_step_fn(args.dit, space.channels, text_cfg)
    text_record = json.loads((root / "latents" / "latent_space.json").read_text())["text"]
    print(f"(a) DiT '{args.dit}' on VAE '{args.vae}' latents {stats['latent_shape']} of "
          f"{args.frames}x{args.size}x{args.size} clips, batch {args.batch}, {args.steps} steps, "
          f"text {args.text}{f' {args.text_model} (stored in the shards)' if text_record else ''}, "
          f"{torch.get_num_threads()} threads")
    res = interleaved({"fly": (loader("raw", urls), space.encode), "pre": (loader("latent", lat_urls), None)},
                      step, args.steps, text_record)
    fly, pre = res["fly"], res["pre"]
    print(f"  on-the-fly encoding   {fly['samples_per_s']:7.2f} samples/s (input path {fly['input_share']:.0%} of step time)")
    print(f"  precomputed latents   {pre['samples_per_s']:7.2f} samples/s (input path {pre['input_share']:.0%} of step time)")
    r = res["ratio"]
    print(f"  ratio {r} (target >= 2x: {'met' if r.median >= 2 else 'missed'})")
    print(f"  precompute: {stats['clips_in']} clips in {pre_s:.1f} s = {stats['clips_in'] / pre_s:.2f} clips/s "
          f"end to end; {stats['bytes'] / stats['clips_in'] / 1024:.1f} KiB per clip")
    if "b" in args.parts:
        bench_encode(["tiny", args.vae] if args.vae != "tiny" else ["tiny"], args.frames, args.size)


if __name__ == "__main__":
    main()
