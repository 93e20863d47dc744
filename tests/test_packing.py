"""Packing (train.data.pack): clips of several shapes in one sequence with varlen
(block-diagonal) attention, from the loader (training/packing.py `Packer`) through the training
step (training/step.py, `flow_loss_packed`) and the validation loss (training/evaluation)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data.shards import write_shard
from test_buckets import stored_latent, whole_latent_shards  # noqa: F401 - a fixture
from training.dit import DiTConfig, segment_attention
from training.evaluation.evaluate import EvalConfig, packed_tokens, validation_loss
from training.flow import FlowConfig, flow_loss, flow_loss_packed
from training.loader import Bucket, ClipStream, Loader, LoaderConfig
from training.packing import Packer
from training.model import ModelConfig
from training.text import TextEncoderConfig
from training.patches import pack_clips, packed_segments, patch_grid
from training.trainer import TrainConfig, buckets_of, clip_tokens, micro_batch_size

REPO = Path(__file__).resolve().parents[1]
PATCH = (1, 4, 4)
# (frames, height, width) of the clips of the loss tests: an image, short and longer clips,
# two aspect ratios; tokens 4, 36, 8, 132 under PATCH
SHAPES = [(1, 8, 8), (9, 8, 8), (1, 8, 16), (33, 8, 8)]


def perturbed_model(attention: str = "full", adaln: str = "block", seed: int = 0):
    """A tiny text-to-video model whose zero-initialised branches are active (noise on every
    parameter), so that every parameter gets a gradient."""
    torch.manual_seed(seed)
    dit = DiTConfig(patch_size=list(PATCH), hidden_size=64, depth=2, num_heads=2, text_dim=32,
                    attention=attention, adaln=adaln)
    model = ModelConfig(dit=dit, text=TextEncoderConfig(dim=32, depth=1, num_heads=2, max_length=16)).build()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def clips_and_noise(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = [torch.rand((3, *s), generator=g) * 2 - 1 for s in SHAPES]  # K (3, T, H, W)
    noise = [torch.randn(x.shape, generator=g) for x in x0]
    t = torch.tensor([0.15, 0.5, 0.8, 0.35])  # (K,)
    return x0, noise, t


# ----- the loss and its gradients -----------------------------------------------------------
@pytest.mark.parametrize("attention,adaln,prediction,loss", [
    ("full", "block", "velocity", "velocity"),
    ("factorised", "single", "x0", "x0"),
])
def test_packed_loss_and_gradients_equal_the_per_clip_loss(attention, adaln, prediction, loss):
    """The packed loss (rows of at most 140 tokens: two rows, padding in one) is the mean of the
    clips' own unpacked losses, and so are the gradients of every parameter."""
    model = perturbed_model(attention, adaln).train()
    flow = FlowConfig(prediction=prediction, loss=loss)
    x0, noise, t = clips_and_noise()
    g = torch.Generator().manual_seed(1)
    text = torch.randn(4, 6, 32, generator=g)  # (K, L, Dt) encoded captions
    mask = torch.arange(6)[None] < torch.tensor([6, 2, 0, 4])[:, None]  # (K, L); clip 2: none ("")

    packs = []
    def fwd(xs, s):
        packs.append(pack_clips(xs, PATCH, max_tokens=140))
        return model(packs[-1], s, text=text, text_mask=mask)

    model.zero_grad()
    packed_loss, per_clip, _ = flow_loss_packed(fwd, x0, flow, t=t, noise=noise)
    packed_loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert len(packs[0].tokens) == 2 and (packs[0].clip == -1).any()  # rows, with padding

    model.zero_grad()
    ref = []
    for k in range(len(x0)):
        lk, _, _ = flow_loss(lambda x, s: model(x, s, text=text[k : k + 1], text_mask=mask[k : k + 1]),
                             x0[k][None], flow, t=t[k : k + 1], noise=noise[k][None])
        ref.append(lk.detach())
        (lk / len(x0)).backward()  # the mean over clips, as over a batch's samples
    torch.testing.assert_close(per_clip.detach(), torch.stack(ref), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(packed_loss.detach(), torch.stack(ref).mean(), rtol=1e-5, atol=1e-6)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == packed_grads.keys() == {n for n, _ in model.dit.named_parameters(prefix="dit")}
    for n in grads:
        torch.testing.assert_close(packed_grads[n], grads[n], rtol=1e-4, atol=1e-6, msg=n)
    # not vacuous: the clips' losses differ, and a mean over tokens (not clips) would not match
    by_tokens = sum(per_clip.detach()[k] * math.prod(patch_grid(SHAPES[k], PATCH)) for k in range(4)) / sum(
        math.prod(patch_grid(s, PATCH)) for s in SHAPES)
    assert abs(float(by_tokens) - float(packed_loss.detach())) > 1e-3


def test_packed_timesteps_follow_each_clips_tokens():
    """shift_mode=tokens: each packed clip's timestep is shifted by its own token count."""
    flow = FlowConfig(timestep_sampling="uniform", shift_mode="tokens", shift=1.0, shift_base_tokens=4)
    x0 = [torch.zeros(3, 1, 8, 8), torch.zeros(3, 33, 8, 8)]  # 4 and 132 tokens
    seen = {}

    def fwd(xs, s):
        seen["t"] = s
        return [torch.zeros_like(x) for x in xs]

    gen = torch.Generator().manual_seed(0)
    flow_loss_packed(fwd, x0, flow, generator=gen, num_tokens=torch.tensor([4, 132]))
    u = torch.rand(2, generator=torch.Generator().manual_seed(0))  # the draws before the shift
    s = torch.tensor([1.0, math.sqrt(132 / 4)])
    torch.testing.assert_close(seen["t"], s * u / (1 + (s - 1) * u))


# ----- varlen attention ----------------------------------------------------------------------
def test_segment_attention_is_block_diagonal_attention_without_an_n_by_n_mask():
    clips = [torch.randn(3, *s) for s in SHAPES]
    packed = pack_clips(clips, PATCH, max_tokens=140)  # rows [4 + 36 + 8 + ...], padded
    R, N = packed.clip.shape
    H, hd = 2, 8
    q, k, v = (torch.randn(R, N, H, hd) for _ in range(3))
    same = (packed.clip[:, :, None] == packed.clip[:, None, :]) & (packed.clip[:, :, None] >= 0)
    dense = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)),
                                           attn_mask=same[:, None] | ~same.any(-1)[:, None, :, None])
    real = packed.clip >= 0  # (R, N)
    clip_segments = packed_segments(packed, "clip")
    out = segment_attention(q, k, v, clip_segments)  # (R, N, H, hd)
    torch.testing.assert_close(out[real], dense.transpose(1, 2)[real])
    assert out[~real].abs().max() == 0  # padding attends to nothing
    # frames and positions: within a clip's frame / at a clip's (h, w)
    pos = packed.positions
    for unit, keep in (("frame", pos[..., 0]), ("position", pos[..., 1] * 1000 + pos[..., 2])):
        m = same & (keep[:, :, None] == keep[:, None, :])
        ref = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)),
                                             attn_mask=m[:, None] | ~m.any(-1)[:, None, :, None])
        got = segment_attention(q, k, v, packed_segments(packed, unit))
        torch.testing.assert_close(got[real], ref.transpose(1, 2)[real])
    # what the layout holds: indices, 8 bytes a token, not an (N, N) mask
    for attention in ("full", "factorised"):
        layout = DiTConfig(patch_size=list(PATCH), attention=attention).build().packed_layout(packed)
        held = [t for f in ("mask", "mask_spatial", "mask_temporal", "clips") if getattr(layout, f) is not None
                for group in getattr(layout, f) for t in group]
        assert held and all(t.dtype == torch.long for t in held)
        assert sum(t.nbytes for t in held) <= 4 * 16 * R * N < R * N * N  # (index + clip) x units


# ----- the loader ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mixed_length_shards(tmp_path_factory) -> list[str]:
    """16x16 clips at 8 fps, 2 shards: 3 frames (an image's bucket), 12 (the 9-frame one) and 36
    (the 33-frame one), in turn; one wide (16x32) clip."""
    from data.synthetic import caption, render, sample_spec
    from data.video_io import encode_mp4

    root = tmp_path_factory.mktemp("lengths")
    rng = np.random.default_rng(2)
    samples = []
    for i in range(15):
        spec, n = sample_spec(rng), (3, 12, 36)[i % 3]
        w = 32 if i == 4 else 16
        samples.append({"__key__": f"clip{i:03d}", "mp4": encode_mp4(render(spec, n, 16, w), fps=8),
                        "txt": caption(spec), "json": {"start": 0, "end": n, "fps": 8.0, "width": w,
                                                       "height": 16}})
    urls = []
    for j in range(2):
        write_shard(str(root / f"l-{j}.tar"), samples[j::2])
        urls.append(str(root / f"l-{j}.tar"))
    return urls


BUDGET = 700
PACK_BUCKETS = [Bucket(33, 16, 16, 0), Bucket(9, 16, 16, 0), Bucket(1, 16, 16, 0), Bucket(9, 16, 32, 0)]


def pack_config(**kw) -> TrainConfig:
    return TrainConfig(data=LoaderConfig(pack=True, token_budget=BUDGET, buckets=PACK_BUCKETS,
                                         shuffle_buffer=4, prefetch=0, **kw))


def packed_loader(urls, rank=0, world=1, state=None, **kw) -> Loader:
    tcfg = pack_config(**kw)
    tokens = clip_tokens(tcfg, ModelConfig(), None)  # patch (1, 4, 4): 16 tokens a 16x16 frame
    return Loader(ClipStream(urls, buckets=buckets_of(tcfg, 1, tokens), rank=rank, world=world,
                             seed=3, cfg=tcfg.data, state=state, tokens=tokens))


def tokens_of(clip: torch.Tensor) -> int:
    return math.prod(patch_grid(tuple(clip.shape[1:]), PATCH))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_packed_batches_hold_every_clip_once_per_epoch_within_the_budget(mixed_length_shards, num_workers):
    seen, mixed = {}, False
    for rank in (0, 1):
        loader = packed_loader(mixed_length_shards, rank, 2, num_workers=num_workers)
        done = set()
        while len(done) < max(num_workers, 1):  # until every reader has moved on to epoch 1
            clips, captions, keys = next(loader)
            if loader.last["epoch"] > 0:
                done.add(loader.last["reader"])
                continue
            assert isinstance(clips, list) and len(clips) == len(captions) == len(keys)
            assert sum(tokens_of(c) for c in clips) <= BUDGET
            assert all(c.dtype == torch.uint8 and c.shape[0] == 3 for c in clips)
            mixed |= len({tuple(c.shape) for c in clips}) > 1
            for c, k in zip(clips, keys):
                assert k not in seen, k  # once: not twice in an epoch, nor on both ranks
                seen[k] = tuple(c.shape[1:])
        loader.close()
    assert len(seen) == 15
    frames = {int(k[4:]): s[0] for k, s in seen.items()}
    assert {frames[i] for i in range(0, 15, 3)} == {1} and {frames[i] for i in range(1, 15, 3)} == {9}
    assert {frames[i] for i in range(2, 15, 3)} == {33}
    assert seen["clip004"] == (9, 16, 32)  # the wide clip: the wide bucket
    assert mixed  # packs mix shapes (first fit), they are not buckets


@pytest.mark.timeout(120)
def test_loader_workers_start_clean_after_the_trainer_has_decoded(mixed_length_shards):
    # The parent decodes with PyAV first, in its main thread (prefetch=0), so its thread-local
    # swscale context has started slice threads; DataLoader workers forked from that thread
    # inherited the context without its threads and hung on their first resize.
    def clips(num_workers: int) -> dict[str, torch.Tensor]:  # key -> its clip, epoch 0
        loader, out = packed_loader(mixed_length_shards, num_workers=num_workers), {}
        for _ in range(4):
            clips, _, keys = next(loader)
            out.update(zip(keys, clips) if loader.last["epoch"] == 0 else {})
        loader.close()
        return out

    alone = clips(0)
    workers = clips(2)
    assert workers and all(torch.equal(v, alone[k]) for k, v in workers.items() if k in alone)
    assert set(workers) & set(alone)  # the same clips, decoded the same in the workers


def test_packer_first_fit_emits_full_packs_and_lone_oversized_clips():
    def keys(pack):
        return None if pack is None else [x[2] for x, _, _ in pack]

    def clip(key):  # a decoded sample: (clip, caption, key)
        return (None, "", key)

    p = Packer(budget=10, smallest=2, open_packs=2)
    assert keys(p.add(clip("a"), 0, 6)) is None and keys(p.add(clip("b"), 0, 6)) is None  # [6], [6]
    assert keys(p.add(clip("c"), 0, 3)) == ["a", "c"]  # first fit into the first; 1 left < 2: out
    assert keys(p.add(clip("d"), 0, 12)) == ["d"]  # over the budget: alone, at once
    assert keys(p.add(clip("e"), 0, 2)) is None  # [b 6 + e 2]
    assert keys(p.add(clip("f"), 0, 5)) is None  # [b, e], [f]
    assert keys(p.add(clip("g"), 0, 5)) == ["f", "g"]  # the first with room is the second: full
    assert keys(p.add(clip("h"), 0, 7)) is None  # [b, e], [h]
    assert keys(p.add(clip("i"), 1, 6)) == ["b", "e"]  # a third pack opens: the oldest goes
    assert p.pending() == {"0": [["h", 0]], "1": [["i", 1]]}
    q = Packer(budget=10, smallest=2, open_packs=2)  # a restore puts the clips back in their packs
    q.put(1, clip("i"), 1, 6)
    q.put(0, clip("h"), 0, 7)
    assert q.pending() == p.pending() and q.fill == p.fill == [7, 6]


def test_packed_loader_resumes_exactly(mixed_length_shards):
    a = packed_loader(mixed_length_shards)
    for _ in range(3):
        next(a)
    saved = json.loads(json.dumps(a.state_dict()))
    assert any(p["pending"] for p in saved["positions"].values())  # open packs wait
    b = packed_loader(mixed_length_shards, state=Loader.restore_state(saved, 0))
    for _ in range(12):  # across epoch boundaries and end-of-epoch flushes
        ca, pa, ka = next(a)
        cb, pb, kb = next(b)
        assert ka == kb and pa == pb and all(torch.equal(x, y) for x, y in zip(ca, cb))
    # a position saved while packing does not restore into bucket batches (or the reverse)
    unpacked = ClipStream(mixed_length_shards, buckets=[Bucket(9, 16, 16, 2)], rank=0, world=1, seed=3,
                          state=Loader.restore_state(saved, 0))
    with pytest.raises(ValueError, match="train.data.pack=True"):
        next(iter(unpacked))


def test_latent_shards_pack_windows_of_several_lengths(whole_latent_shards):  # noqa: F811 - the fixture
    """kind=latent: packs of stored latents (windows of whole clips, cut without decoding) of
    both lengths, within the budget of latent tokens, restored exactly."""
    mcfg = ModelConfig()
    mcfg.dit.patch_size = [1, 2, 2]
    tcfg = TrainConfig(data=LoaderConfig(kind="latent", pack=True, token_budget=12, shuffle_buffer=4,
                                         prefetch=0, buckets=[Bucket(33, 16, 16, 0, prob=0.5), Bucket(9, 16, 16, 0)]))
    tokens = clip_tokens(tcfg, mcfg, {"compression": [4, 8, 8]})  # 33 frames: 9 tokens, 9 frames: 3

    def make(state=None) -> Loader:
        return Loader(ClipStream(whole_latent_shards, buckets=buckets_of(tcfg, 1, tokens), rank=0, world=1,
                                 seed=3, cfg=tcfg.data, state=state, tokens=tokens))

    a, mixed = make(), False
    for _ in range(8):
        zs, _, keys = next(a)
        assert sum(z.shape[1] for z in zs) <= 12 and len(zs) == len(keys)  # 1 token a latent frame
        mixed |= len({z.shape for z in zs}) > 1
        for z, k in zip(zs, keys):
            first = int(z[0, 0, 0, 0])
            assert torch.equal(z, stored_latent(9 if int(k[3:]) < 6 else 3)[:, first : first + z.shape[1]])
    assert mixed
    saved = json.loads(json.dumps(a.state_dict()))
    b = make(Loader.restore_state(saved, 0))
    for _ in range(6):
        za, _, ka = next(a)
        zb, _, kb = next(b)
        assert ka == kb and all(torch.equal(x, y) for x, y in zip(za, zb))


def test_pack_config_errors_name_the_keys():
    with pytest.raises(ValueError, match="train.data.pack=true .* train.data.token_budget is 0"):
        LoaderConfig(pack=True)
    with pytest.raises(ValueError, match="train.data.pack=true is not supported with cluster.sequence_parallel=2"):
        micro_batch_size(pack_config(), world=2, grad_accum=1, sequence_parallel=2)
    assert micro_batch_size(pack_config(), world=2, grad_accum=1) == 8


def test_the_cli_preflight_refuses_packing_under_sequence_parallelism():
    from hydra import compose, initialize_config_dir

    from pipeline.cli import preflight
    from pipeline.config import CONF_DIR, register, to_object

    register()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        ok = compose("config", overrides=["train.data.pack=true", "train.data.token_budget=512"])
        bad = compose("config", overrides=["train.data.pack=true", "train.data.token_budget=512",
                                           "cluster.sequence_parallel=2"])
    assert to_object(ok).train.data.pack is True
    preflight(to_object(ok))
    with pytest.raises(SystemExit, match="train.data.pack=true is not supported"):
        preflight(to_object(bad))


# ----- evaluation ------------------------------------------------------------------------------
def test_validation_loss_of_a_packed_run_goes_packed_and_matches():
    model = perturbed_model().eval()
    g = torch.Generator().manual_seed(4)
    clips = [(torch.randint(0, 256, (3, 9, 8, 8), generator=g, dtype=torch.uint8), c)
             for c in ("a red circle", "two squares", "a blue cat")]
    cfg = EvalConfig(val_timesteps=[0.2, 0.7], batch_size=3)
    tok = model.cfg.text.build_tokenizer()
    calls = []
    dit_packed = model.dit.forward_packed
    model.dit.forward_packed = lambda packed, *a: calls.append(packed.tokens.shape) or dit_packed(packed, *a)
    plain = validation_loss(model, tok, clips, cfg, "cpu")
    assert not calls
    train = {"data": {"pack": True, "token_budget": 80}}
    assert packed_tokens(train) == 80 and packed_tokens({"data": {"token_budget": 80}}) == 0
    packed = validation_loss(model, tok, clips, cfg, "cpu", pack_tokens=packed_tokens(train))
    assert calls and all(shape[1] <= 80 for shape in calls) and calls[0][0] == 2  # 36 + 36, 36
    assert packed.keys() == plain.keys()
    for k in plain:
        assert packed[k] == pytest.approx(plain[k], rel=1e-5), k


# ----- a training run's steps ------------------------------------------------------------------
TRAIN = """
import json, os, socket, sys
from contextlib import closing
import torch, torch.distributed as dist
sys.path.insert(0, sys.argv[2])
from test_packing import packed_loader, pack_config
from training.flow import FlowConfig
from training.model import ModelConfig
from training.parallelize import DeepSpeedConfig, parallelize
from training.step import TextConditioning, TrainStep
from training.trainer import lr_lambda, param_groups

with closing(socket.socket()) as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
dist.init_process_group("gloo", rank=0, world_size=1)
torch.manual_seed(0)
mcfg = ModelConfig()
tcfg = pack_config()
model = mcfg.build()
engine = parallelize(model, DeepSpeedConfig(zero_stage=int(sys.argv[3])), lr=3e-3, weight_decay=0.0,
                     params=param_groups(model, 3e-3, mcfg.text.lr_scale), schedule=lambda s: 1.0,
                     micro_batch=1, precision="fp32")
gen = torch.Generator().manual_seed(1)
flow = FlowConfig(caption_dropout=0.1)
data = packed_loader(json.loads(sys.argv[1]))
text = TextConditioning(engine, mcfg, None, int(sys.argv[3]), flow, gen, torch.device("cpu"))
step = TrainStep(engine, data, text, flow, mcfg, 1, gen, torch.device("cpu"), torch.float32, latents=False)
out = []
for i in range(14):
    r = step()
    out.append({"loss": float(r.losses[0]), "samples": r.samples, "tokens": r.tokens,
                "per_t": len(r.per_t[0][0]), "keys": data.last["keys"]})
print(json.dumps(out))
dist.destroy_process_group()
"""


def test_training_steps_on_packed_batches_learn(mixed_length_shards):
    """The trainer's step (TrainStep over a ZeRO-2 DeepSpeed engine on one gloo rank, in a fresh
    Python: DeepSpeed keeps its process groups in module globals) trains on the packs."""
    r = subprocess.run([sys.executable, "-c", TRAIN, json.dumps(mixed_length_shards),
                        str(Path(__file__).parent), "2"], capture_output=True, text=True, timeout=600,
                       cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    steps = json.loads(r.stdout.strip().splitlines()[-1])
    assert all(s["tokens"] <= BUDGET and s["samples"] == s["per_t"] == len(s["keys"]) for s in steps)
    assert len({s["samples"] for s in steps}) > 1  # packs of several sizes
    assert sum(s["samples"] for s in steps) > 15  # more than an epoch's clips
    losses = [s["loss"] for s in steps]
    assert all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-4:]) < 0.9 * np.mean(losses[:4])


def test_a_ray_train_run_trains_on_packs(ray_with_state_api, mixed_length_shards, tmp_path):
    """train_loop in packing mode on 2 Ray Train workers (ZeRO-2), a few steps, on the clips and
    a shard of PNG/JPEG stills (1-frame clips): each rank's packs of its clips, read by a
    DataLoader worker (from the loader's forkserver, inside the Ray worker), are exactly the
    packs its loader gives offline, stills among them, and the step's samples are counted per clip."""
    from test_image_training import image_sample
    from test_training import metrics, train

    rng = np.random.default_rng(5)
    stills = str(tmp_path / "stills.tar")
    write_shard(stills, [image_sample(rng, f"still{i}", 16, 16 * (1 + i % 2), "PNG" if i % 3 else "JPEG")
                         for i in range(8)])
    urls = [*mixed_length_shards, stills]
    mcfg = ModelConfig(dit=DiTConfig(patch_size=list(PATCH)))
    tcfg = pack_config(num_workers=1)
    res = train(urls, tmp_path / "run", zero=2, steps=4, mcfg=mcfg, height=16, width=16,
                num_frames=9, data=tcfg.data)
    ms = metrics(tmp_path / "run")
    assert [m["step"] for m in ms] == list(range(4)) and res["steps"] == 4
    assert res["skip_reasons"] == {}
    samples = [round(m["train/samples_per_s"] * m["train/step_time_s"]) for m in ms]  # both ranks
    tokens = [m["train/tokens_per_s"] * m["train/step_time_s"] for m in ms]
    assert all(2 <= s and t <= 2 * BUDGET + 1e-6 for s, t in zip(samples, tokens))
    assert len(set(samples)) > 1 and all(math.isfinite(m["train/loss"]) for m in ms)
    # what each rank's loader packs (the trainer's seed and buckets): the steps' sample counts
    offline = []
    for rank in (0, 1):
        loader = Loader(ClipStream(urls, buckets=buckets_of(tcfg, 1, clip_tokens(tcfg, mcfg, None)), rank=rank,
                                   world=2, seed=1, cfg=tcfg.data, tokens=clip_tokens(tcfg, mcfg, None)))
        offline.append([next(loader)[2] for _ in range(4)])
        loader.close()
    assert samples == [len(a) + len(b) for a, b in zip(*offline)]
    assert any(k.startswith("still") for packs in offline for keys in packs for k in keys)
