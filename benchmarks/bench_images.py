"""Images joined to a video run: training steps on image samples vs on 1-frame video samples.

Two real shards hold the same N frames (synthetic, ``--src`` px square): one as image members
(``--format`` jpg or png, ``.json`` ``"kind": "image"``), one as 1-frame mp4s. Each arm is the
raw loader (`training.loader`: ClipStream over its shard, one 1-frame bucket of ``--size`` px
at ``--batch`` clips, decoded in the loop: ``prefetch`` 0, so decoding is inside the measured
step) followed by one DiT training step (normalize, flow loss, backward, AdamW). Images decode
with Pillow (`data.images.read_image`), the mp4s with decord/PyAV, both resized and
centre-cropped to the bucket.

Arms run in paired rounds (`benchmarks/paired.py`, ``--steps`` steps per arm per round); the
figure is the median of the per-round ratios of samples/s, image / video (issue 20's target:
>= 0.9x, images must not pay video decoding). The loaders alone (batches without the DiT step)
are compared the same way, to show the decoding cost itself.

    python benchmarks/bench_images.py                          # tiny DiT, 64 px sources, 32 px bucket
    python benchmarks/bench_images.py --format png --src 256 --size 64 --json out.json

Not a test: numbers depend on the machine and on whatever else runs on it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from paired import interleave, ratio, summarize  # noqa: E402
from data.shards import write_shard  # noqa: E402
from data.synthetic import caption, render, sample_spec  # noqa: E402
from data.video_io import encode_mp4  # noqa: E402
from training.clips import normalize  # noqa: E402
from training.dit import DiT, DiTConfig  # noqa: E402
from training.flow import FlowConfig, flow_loss  # noqa: E402
from training.loader import Bucket, ClipStream, Loader, LoaderConfig  # noqa: E402


def write_shards(root: str, n: int, src: int, fmt: str) -> dict[str, str]:
    """The same n frames as an image shard and a 1-frame mp4 shard -> {arm: url}."""
    rng = np.random.default_rng(0)
    images, videos = [], []
    for i in range(n):
        spec = sample_spec(rng)
        frame = render(spec, 1, src, src)  # (1, src, src, 3)
        buf = io.BytesIO()
        Image.fromarray(frame[0]).save(buf, "JPEG" if fmt == "jpg" else "PNG", **({"quality": 90} if fmt == "jpg" else {}))
        meta = {"start": 0, "end": 1, "fps": 8.0, "width": src, "height": src}
        images.append({"__key__": f"s{i:05d}", fmt: buf.getvalue(), "txt": caption(spec), "json": {"kind": "image", **meta}})
        videos.append({"__key__": f"s{i:05d}", "mp4": encode_mp4(frame, fps=8.0), "txt": caption(spec), "json": meta})
    urls = {"image": os.path.join(root, "images.tar"), "video": os.path.join(root, "videos.tar")}
    write_shard(urls["image"], images)
    write_shard(urls["video"], videos)
    return urls


class Arm:
    """One arm: `steps` batches from its loader, each trained on (train=True) or just taken."""

    def __init__(self, url: str, args, dit: DiT | None, cfg: DiTConfig):
        bucket = Bucket(1, args.size, args.size, args.batch)
        lcfg = LoaderConfig(buckets=[bucket], shuffle_buffer=16, prefetch=0)
        self.loader = Loader(ClipStream([url], buckets=[bucket], rank=0, world=1, seed=0, cfg=lcfg))
        self.dit, self.steps, self.flow = dit, args.steps, FlowConfig()
        self.opt = torch.optim.AdamW(dit.parameters(), lr=1e-4) if dit is not None else None
        g = torch.Generator().manual_seed(1)
        self.text = torch.randn(args.batch, args.text_len, cfg.text_dim, generator=g)  # (B, L, Dt)
        self.mask = torch.ones(args.batch, args.text_len, dtype=torch.bool)  # (B, L)
        self.gen = torch.Generator().manual_seed(2)
        self.samples = 0

    def __call__(self) -> None:
        for _ in range(self.steps):
            video, _, _ = next(self.loader)  # (B, 3, 1, H, W) uint8
            self.samples += video.shape[0]
            if self.dit is None:
                continue
            x0 = normalize(video)  # (B, 3, 1, H, W) in [-1, 1]
            B = x0.shape[0]
            self.opt.zero_grad(set_to_none=True)
            loss, _, _ = flow_loss(lambda x, t: self.dit(x, t, self.text[:B], self.mask[:B]), x0, self.flow,
                                   generator=self.gen)
            loss.backward()
            self.opt.step()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--patch", nargs=3, type=int, default=[1, 4, 4])
    p.add_argument("--format", default="jpg", choices=["jpg", "png"], help="the image members' format")
    p.add_argument("--src", type=int, default=64, help="height = width of the stored frames")
    p.add_argument("--size", type=int, default=32, help="height = width of the bucket")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--samples", type=int, default=64, help="samples in each shard")
    p.add_argument("--steps", type=int, default=4, help="steps per arm per round")
    p.add_argument("--text-len", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = DiTConfig.from_preset(args.preset, patch_size=list(args.patch))
    header = (f"CPU ({os.cpu_count()} cores), torch {torch.__version__}, threads {torch.get_num_threads()}; "
              f"DiT {args.preset} (D={cfg.hidden_size}, depth {cfg.depth}), patch {tuple(cfg.patch_size)}; "
              f"{args.samples} {args.src}x{args.src} samples a shard ({args.format} vs 1-frame mp4), "
              f"bucket 1x{args.size}x{args.size}, batch {args.batch}, {args.steps} steps per arm per round")
    print(header, flush=True)
    torch.manual_seed(0)
    base = DiT(cfg).train()
    with torch.no_grad():  # active adaLN-Zero branches: a trained model's cost, not the identity's
        for prm in base.parameters():
            prm.add_(torch.randn_like(prm) * 0.02)

    def clone() -> DiT:
        d = DiT(cfg).train()
        d.load_state_dict(base.state_dict())
        return d

    with tempfile.TemporaryDirectory() as root:
        urls = write_shards(root, args.samples, args.src, args.format)
        sizes = {k: os.path.getsize(u) for k, u in urls.items()}
        res = {"header": header, "shard_bytes": sizes}
        for what, train in (("step", True), ("loader", False)):
            arms = {k: Arm(u, args, clone() if train else None, cfg) for k, u in urls.items()}
            times = interleave(arms, args.rounds, warmup=args.warmup)
            n = args.steps * args.batch
            rate = {k: [n / s for s in v] for k, v in times.items()}  # samples/s per round
            res[what] = {"samples_per_s": {k: summarize(v).as_dict(2) for k, v in rate.items()},
                         "image_vs_video": ratio(rate["image"], rate["video"]).as_dict()}
            for a in arms.values():
                a.loader.close()
    fmt = lambda d: f"{d['median']:.2f}x ({d['lo']:.2f}-{d['hi']:.2f}, {len(d['per_round'])} rounds)"  # noqa: E731
    for what, label in (("step", "loader + DiT step"), ("loader", "loader alone")):
        r = res[what]
        print(f"{label}: samples/s (median) image {r['samples_per_s']['image']['median']:.1f}, "
              f"1-frame video {r['samples_per_s']['video']['median']:.1f}; image / video "
              f"{fmt(r['image_vs_video'])}" + ("  [target >= 0.9x]" if what == "step" else ""))
    print(f"shard bytes: image {sizes['image']}, video {sizes['video']}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
