"""Whole-clip latents (latent.span=whole): the streaming encode, the precompute that stores every
frame of each clip, and training's loader cutting windows of them (tiny random VAE from its
config, real mp4 shards)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from test_vae import SIZE, save_vae, video

from data.shards import read_shards, write_shard
from data.synthetic import caption, render, sample_spec
from data.video_io import encode_mp4
from training.clips import decode_sample, normalize
from training.latent.precompute import precompute_latents
from training.latent.space import LatentConfig, load_latent_space
from training.latent.vae import VAEConfig
from training.latent_format import decode_latent_sample
from training.loader import Bucket, ClipStream, Loader, LoaderConfig

pytestmark = pytest.mark.usefixtures("one_thread")
LENGTHS = (37, 21, 6, 30)  # frames per clip at 8 fps: trimmed to 37, 21, padded to 9, trimmed to 29


def test_a_streamed_clip_encodes_as_the_whole_clip():
    torch.manual_seed(0)
    vae = VAEConfig().build().eval()
    x = video(3, (1, 3, 25, *SIZE))  # (1, 3, 25, 32, 32)
    with torch.no_grad():
        whole = vae.posterior(x).mode()  # (1, C, 7, 4, 4)
        chunks = [x[:, :, :1]] + [x[:, :, s : s + 8] for s in range(1, 25, 8)]
        streamed = vae.posterior_stream(iter(chunks)).mode()
    assert streamed.shape == whole.shape == (1, 4, 7, 4, 4)
    torch.testing.assert_close(streamed, whole, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="first frame alone"):
        vae.posterior_stream(iter([x[:, :, :5]]))


@pytest.fixture(scope="module")
def varied_shards(tmp_path_factory) -> dict[str, list[str]]:
    """4 clips of LENGTHS frames (32x32 at 8 fps) and a corrupt one, in one train shard."""
    root = tmp_path_factory.mktemp("varied")
    rng = np.random.default_rng(3)
    samples = []
    for i, n in enumerate(LENGTHS):
        spec = sample_spec(rng)
        samples.append({"__key__": f"clip{i:03d}", "mp4": encode_mp4(render(spec, n, *SIZE), fps=8),
                        "txt": caption(spec), "json": {"start": 0, "end": n, "fps": 8.0,
                                                       "width": SIZE[1], "height": SIZE[0]}})
    samples.append({**samples[0], "__key__": "bad", "mp4": os.urandom(800)})
    write_shard(root / "train-000000.tar", samples)
    return {"train": [str(root / "train-000000.tar")]}


@pytest.fixture(scope="module")
def whole_dir(varied_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("whole")
    vae_dir = save_vae(root / "vae")
    out = {}
    for span, extra in (("whole", {}), ("window", {}), ("capped", {"max_frames": 14})):
        cfg = LatentConfig(kind="ours", span="window" if span == "window" else "whole", chunk_frames=2,
                           clips_per_shard=8, **extra)
        stats = precompute_latents(cfg, varied_shards, root / span, 9, SIZE, None, vae_dir=str(vae_dir),
                                   log=lambda s: None)
        samples = {s["__key__"]: s for s in read_shards(
            [str(root / span / p) for p in json.loads((root / span / "index.json").read_text())["train"]])}
        out[span] = (root / span, stats, samples)
    return out


def test_precompute_stores_every_frame_of_each_clip(whole_dir):
    root, stats, samples = whole_dir["whole"]
    # every clip in is encoded or failed with its reason
    assert stats["clips_in"] == 5 and stats["clips_encoded"] == 4 and stats["clips_failed"] == 1
    assert stats["failed"][0]["key"] == "bad" and stats["failed"][0]["reason"] == "decode_failed"
    assert stats["span"] == "whole"
    rec = json.loads((root / "latent_space.json").read_text())
    assert rec["span"] == "whole" and rec["video_shape"] == [9, *SIZE]  # the least a clip holds
    for i, want_T in enumerate((37, 21, 9, 29)):  # 1 + 4k frames; the 6-frame clip padded to 9
        s = samples[f"clip{i:03d}"]
        z, _, _ = decode_latent_sample(s)
        t = 1 + (want_T - 1) // 4
        assert s["json"]["video_shape"] == [want_T, *SIZE]
        assert s["json"]["latent_shape"] == [4, t, 4, 4] and tuple(z.shape) == (4, t, 4, 4)
    # max_frames caps what is stored: 14 frames -> 13 (1 + 4k)
    _, _, capped = whole_dir["capped"]
    assert capped["clip000"]["json"]["video_shape"][0] == 13


def test_whole_clip_latents_equal_the_window_encode_at_their_start(whole_dir, varied_shards):
    """The causal VAE: a clip's first latent frames do not depend on the frames after them, so
    the first 3 latent frames of the whole clip are the 9-frame window's latents; and the whole
    latent equals encoding the decoded clip at once (the stream changes memory, not values)."""
    _, _, whole = whole_dir["whole"]
    root, _, window = whole_dir["window"]
    for k in ("clip000", "clip001", "clip003"):
        zw, _, _ = decode_latent_sample(whole[k])
        z9, _, _ = decode_latent_sample(window[k])
        assert z9.shape == (4, 3, 4, 4)
        torch.testing.assert_close(zw[:, :3], z9, rtol=1e-4, atol=1e-4)
    space = load_latent_space(root)
    src = next(s for s in read_shards(varied_shards["train"]) if s["__key__"] == "clip001")
    clip, _ = decode_sample(src, 21, SIZE, None, None)  # (3, 21, 32, 32) uint8, all its frames
    at_once = space.encode(normalize(clip[None]))[0]  # (4, 6, 4, 4)
    zw, _, _ = decode_latent_sample(whole["clip001"])
    torch.testing.assert_close(zw, at_once, rtol=1e-4, atol=1e-4)


def test_the_loader_trains_on_windows_of_whole_clip_latents(whole_dir):
    root, _, samples = whole_dir["whole"]
    urls = [str(root / p) for p in json.loads((root / "index.json").read_text())["train"]]
    loader = Loader(ClipStream(urls, rank=0, world=1, seed=0, cfg=LoaderConfig(kind="latent", prefetch=0),
                               buckets=[Bucket(21, *SIZE, 1, prob=0.5), Bucket(9, *SIZE, 2)]))
    seen = set()
    for _ in range(12):
        z, _, keys = next(loader)
        for zi, k in zip(z, keys):
            full, _, _ = decode_latent_sample(samples[k])
            t = zi.shape[1]
            assert t in (3, 6)
            starts = [s for s in range(full.shape[1] - t + 1) if torch.equal(full[:, s : s + t], zi)]
            assert starts, k  # every window is a slice of the stored latent
            seen.add((k, t))
    assert ("clip000", 6) in seen and ("clip000", 3) in seen  # a 37-frame clip at both lengths
    assert ("clip002", 6) not in seen  # a 9-frame clip never fills 21 frames


def test_span_is_checked_by_name():
    with pytest.raises(ValueError, match="unknown latent.span 'all'; valid: window, whole"):
        LatentConfig(span="all")
    with pytest.raises(ValueError, match="latent.tile_size=0"):
        LatentConfig(span="whole", tile_size=64, tile_overlap=16)
