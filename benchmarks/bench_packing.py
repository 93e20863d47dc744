"""Packing benchmark: packed vs padded-to-bucket training steps on mixed-length clips (CPU or GPU).

The same K clips a step, a mix of 1, 9 and 33 frames in equal thirds (an image, a short and a
longer clip; ``--frames``), all at one small size, train through the DiT (forward, flow loss,
backward, AdamW step) in three ways:

- ``padded``: padded to the longest bucket (33 frames; the loader repeats a short clip's last
  frame) and batched by the token budget (``budget // tokens of a 33-frame clip`` clips a
  micro-batch), one forward and backward per micro-batch;
- ``packed``: the loader's packs (``training.packing.Packer``, first fit into ``--budget``
  tokens), one ``pack_clips`` sequence per micro-batch through ``forward_packed`` with its
  varlen attention (``training.patches.Segments``: one mask-free SDPA per group of equal-length
  clips);
- ``packed-mask``: the same packs with the previous attention, SDPA over the whole row with a
  boolean (R, 1, N, N) block-diagonal mask (for reference: it pays N^2 per row).

Arms run in paired rounds (`benchmarks/paired.py`); a ratio is the median of the per-round
ratios of clips/s (target: packed / padded >= 1.5x). Attention-mask memory per pack is
reported from the tensors each way needs: the varlen index tensors, a boolean (R, 1, N, N)
block mask, and a dense float (R, H, N, N) additive mask per head; on CUDA also the measured
peak memory of one attention forward + backward at the largest pack.

    python benchmarks/bench_packing.py                       # tiny DiT, 16x16 clips, 12 a step
    python benchmarks/bench_packing.py --size 32 --clips 6 --rounds 3 --json out.json

Not a test: numbers depend on the machine and on whatever else runs on it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from paired import interleave, ratio, summarize  # noqa: E402
from training.dit import DiT, DiTConfig, Layout, segment_attention  # noqa: E402
from training.flow import FlowConfig, flow_loss, flow_loss_packed  # noqa: E402
from training.packing import Packer  # noqa: E402
from training.patches import pack_clips, packed_segments, patch_grid  # noqa: E402


def mask_layout(dit: DiT, packed) -> Layout:
    """The previous packed layout: boolean (R, 1, N, N) block-diagonal masks over whole rows for
    self-attention (cross-attention stays per clip)."""
    layout = DiT.packed_layout(dit, packed)
    same = packed.clip[:, :, None] == packed.clip[:, None, :]  # (R, N, N)
    if dit.cfg.attention == "full":
        return layout._replace(mask=same[:, None])  # (R, 1, N, N)
    pos = packed.positions
    eq = pos[:, :, None, :] == pos[:, None, :, :]  # (R, N, N, 3)
    return layout._replace(mask_spatial=(same & eq[..., 0])[:, None],
                           mask_temporal=(same & eq[..., 1] & eq[..., 2])[:, None])


class Arm:
    """One way to train on the step's clips: micro-batches, forward + loss + backward each, one
    AdamW step."""

    def __init__(self, name: str, dit: DiT, batches: list, packed: bool, flow: FlowConfig, device):
        self.name, self.dit, self.batches, self.packed, self.flow = name, dit, batches, packed, flow
        self.opt = torch.optim.AdamW(dit.parameters(), lr=1e-4)
        self.device = device
        self.clips = sum(len(b["x0"]) for b in batches)

    def __call__(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        for b in self.batches:
            if self.packed:
                loss, _, _ = flow_loss_packed(
                    lambda xs, t: self.dit.forward_packed(pack_clips(xs, self.dit.patch), t, b["text"],
                                                          b["mask"]),
                    b["x0"], self.flow, t=b["t"], noise=b["noise"])
            else:
                loss, _, _ = flow_loss(lambda x, t: self.dit(x, t, b["text"], b["mask"]), b["x0"], self.flow,
                                       t=b["t"], noise=b["noise"])
            (loss * len(b["x0"]) / self.clips).backward()  # the mean over all the step's clips
        self.opt.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def step_data(args, cfg: DiTConfig, device) -> tuple[list[torch.Tensor], list[int]]:
    """The K clips (3, T_k, S, S) of a step, in a shuffled (fixed) order, and their tokens."""
    g = torch.Generator().manual_seed(0)
    frames = [args.frames[k % len(args.frames)] for k in range(args.clips)]
    order = torch.randperm(args.clips, generator=g).tolist()
    clips = [torch.rand(3, frames[k], args.size, args.size, generator=g).mul(2).sub(1).to(device) for k in order]
    tokens = [math.prod(patch_grid(tuple(c.shape[1:]), cfg.patch_size)) for c in clips]
    return clips, tokens


def batches_of(groups: list[list[torch.Tensor]], args, cfg: DiTConfig, device, stack: bool) -> list[dict]:
    """Micro-batches with fixed text, timesteps and noise (the same for every arm's clip k)."""
    out = []
    for i, xs in enumerate(groups):
        g = torch.Generator().manual_seed(100 + i)
        K = len(xs)
        text = torch.randn(K, args.text_len, cfg.text_dim, generator=g).to(device)  # (K, L, Dt)
        mask = torch.ones(K, args.text_len, dtype=torch.bool, device=device)  # (K, L)
        t = torch.rand(K, generator=g).to(device)  # (K,)
        noise = [torch.randn(x.shape, generator=g).to(device) for x in xs]
        x0 = torch.stack(xs) if stack else xs  # (B, 3, T, H, W) | K (3, T_k, H, W)
        out.append({"x0": x0, "noise": torch.stack(noise) if stack else noise, "t": t, "text": text, "mask": mask})
    return out


def pad_to(clip: torch.Tensor, frames: int) -> torch.Tensor:
    """(3, T, H, W) -> (3, frames, H, W), the last frame repeated (as the loader does)."""
    idx = torch.tensor([min(i, clip.shape[1] - 1) for i in range(frames)], device=clip.device)
    return clip.index_select(1, idx)


def mask_memory(cfg: DiTConfig, packs: list[list[torch.Tensor]], device) -> dict:
    """Bytes of the attention masks of the largest pack: varlen indices, boolean block mask,
    dense float mask per head (and, on CUDA, the measured peak of one attention fwd + bwd)."""
    pack = max(packs, key=lambda p: sum(math.prod(patch_grid(tuple(c.shape[1:]), cfg.patch_size)) for c in p))
    packed = pack_clips(pack, cfg.patch_size)
    R, N = packed.clip.shape
    H = cfg.num_heads
    dit = DiT(cfg).to(device)
    layout = dit.packed_layout(packed)
    varlen = sum(t.nbytes for f in ("mask", "mask_spatial", "mask_temporal", "clips")
                 if getattr(layout, f) is not None for group in getattr(layout, f) for t in group)
    res = {"pack_tokens": N, "pack_clips": len(pack), "heads": H, "varlen_index_bytes": varlen,
           "bool_block_mask_bytes": R * N * N, "dense_float_mask_bytes": R * H * N * N * 4}
    if device.type == "cuda":
        segments = packed_segments(packed, "clip")
        hd = cfg.head_dim

        def peak(fn) -> int:
            q, k, v = (torch.randn(R, N, H, hd, device=device, requires_grad=True) for _ in range(3))
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn(q, k, v).sum().backward()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base

        def sdpa(mask_fn):
            def fn(q, k, v):
                m = mask_fn()
                return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                      attn_mask=m)
            return fn

        res["measured_peak_bytes"] = {
            "varlen": peak(lambda q, k, v: segment_attention(q, k, v, segments)),
            "bool_block_mask": peak(sdpa(lambda: (packed.clip[:, :, None] == packed.clip[:, None, :])[:, None])),
            "dense_float_mask": peak(sdpa(lambda: torch.zeros(R, H, N, N, device=device).masked_fill_(
                ~(packed.clip[:, :, None] == packed.clip[:, None, :])[:, None], float("-inf")))),
        }
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--attention", default="full", choices=["full", "factorised"])
    p.add_argument("--patch", nargs=3, type=int, default=[1, 4, 4])
    p.add_argument("--size", type=int, default=16, help="height = width of every clip")
    p.add_argument("--frames", nargs="+", type=int, default=[1, 9, 33], help="the mix of clip lengths")
    p.add_argument("--clips", type=int, default=12, help="clips a training step")
    p.add_argument("--budget", type=int, default=0, help="tokens a micro-batch (0: two of the longest clips)")
    p.add_argument("--text-len", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = DiTConfig.from_preset(args.preset, patch_size=list(args.patch), attention=args.attention)
    clips, tokens = step_data(args, cfg, device)
    longest = max(args.frames)
    per_long = math.prod(patch_grid((longest, args.size, args.size), cfg.patch_size))
    budget = args.budget or 2 * per_long
    packer = Packer(budget, min(tokens))
    packs = [pk for c, n in zip(clips, tokens) if (pk := packer.add(c, 0, n)) is not None]
    packs = [[c for c, _, _ in pk] for pk in packs + [packer.pop(0) for _ in range(len(packer.packs))]]
    per_batch = max(1, budget // per_long)
    padded = [pad_to(c, longest) for c in clips]
    padded_groups = [padded[i : i + per_batch] for i in range(0, len(padded), per_batch)]
    header = (f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else f'{os.cpu_count()} CPUs'}), "
              f"torch {torch.__version__}, threads {torch.get_num_threads()}; DiT {args.preset} "
              f"(D={cfg.hidden_size}, depth {cfg.depth}, {cfg.attention}), patch {tuple(cfg.patch_size)}, "
              f"{args.clips} clips of {args.frames} frames at {args.size}x{args.size}, budget {budget} tokens")
    print(header, flush=True)

    flow = FlowConfig()
    torch.manual_seed(0)
    base = DiT(cfg).to(device).train()
    with torch.no_grad():  # active adaLN-Zero branches: a trained model's cost, not the identity's
        for prm in base.parameters():
            prm.add_(torch.randn_like(prm) * 0.02)

    def clone() -> DiT:
        d = DiT(cfg).to(device).train()
        d.load_state_dict(base.state_dict())
        return d

    masked = clone()
    masked.packed_layout = types.MethodType(mask_layout, masked)
    arms = {
        "padded": Arm("padded", clone(), batches_of(padded_groups, args, cfg, device, True), False, flow, device),
        "packed": Arm("packed", clone(), batches_of(packs, args, cfg, device, False), True, flow, device),
        "packed-mask": Arm("packed-mask", masked, batches_of(packs, args, cfg, device, False), True, flow, device),
    }
    times = interleave(arms, args.rounds, warmup=args.warmup)
    rate = {k: [args.clips / s for s in v] for k, v in times.items()}  # clips/s per round
    res = {
        "header": header, "budget": budget, "pack_sizes": [len(pk) for pk in packs],
        "tokens_per_step": {"padded": per_long * args.clips, "packed": sum(tokens)},
        "micro_batches": {"padded": len(padded_groups), "packed": len(packs)},
        "clips_per_s": {k: summarize(v).as_dict(2) for k, v in rate.items()},
        "packed_vs_padded": ratio(rate["packed"], rate["padded"]).as_dict(),
        "packed_mask_vs_padded": ratio(rate["packed-mask"], rate["padded"]).as_dict(),
        "packed_vs_packed_mask": ratio(rate["packed"], rate["packed-mask"]).as_dict(),
        "memory": mask_memory(cfg, packs, device),
    }
    fmt = lambda d: f"{d['median']:.2f}x ({d['lo']:.2f}-{d['hi']:.2f}, {len(d['per_round'])} rounds)"  # noqa: E731
    print("clips/s (median): " + ", ".join(f"{k} {v['median']:.2f}" for k, v in res["clips_per_s"].items()))
    print(f"tokens a step: padded {res['tokens_per_step']['padded']}, packed {res['tokens_per_step']['packed']}; "
          f"micro-batches: padded {len(padded_groups)} of {per_batch}, packed {len(packs)} "
          f"(clips each {res['pack_sizes']})")
    print(f"packed / padded-to-bucket clips/s: {fmt(res['packed_vs_padded'])}  [target >= 1.5x]")
    print(f"packed with boolean block masks / padded: {fmt(res['packed_mask_vs_padded'])}; "
          f"varlen / boolean masks: {fmt(res['packed_vs_packed_mask'])}")
    m = res["memory"]
    kib = lambda b: f"{b / 1024:.1f} KiB" if b < 2**20 else f"{b / 2**20:.1f} MiB"  # noqa: E731
    print(f"attention masks of the largest pack ({m['pack_tokens']} tokens, {m['pack_clips']} clips, "
          f"{m['heads']} heads): varlen indices {kib(m['varlen_index_bytes'])}, boolean block mask "
          f"{kib(m['bool_block_mask_bytes'])}, dense float mask per head {kib(m['dense_float_mask_bytes'])} "
          f"({m['dense_float_mask_bytes'] / max(1, m['varlen_index_bytes']):.0f}x the indices)")
    if "measured_peak_bytes" in m:
        print("measured peak of one attention fwd+bwd: " + ", ".join(
            f"{k} {kib(v)}" for k, v in m["measured_peak_bytes"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
