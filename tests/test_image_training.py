"""Images train as 1-frame clips: real PNG/JPEG members and real mp4s in real shards, through
the loader's buckets, lockstep, packing and exact resume, and the validation reader."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

import training.clips
from data.images import read_image
from data.shards import read_shards, write_shard
from test_buckets import ThreadGroup, ThreadPeers, in_step, synthetic_clip
from training.clips import _seed, decode_sample, image_size, normalize, read_clips
from training.loader import Bucket, ClipStream, Loader, LoaderConfig
from training.model import ModelConfig
from training.trainer import TrainConfig, buckets_of, clip_tokens

# 8-frame square clips, square and wide stills
BUCKETS = [Bucket(8, 32, 32, 2), Bucket(1, 32, 32, 2), Bucket(1, 32, 64, 2)]


def still(rng, h: int, w: int) -> np.ndarray:  # (h, w, 3) uint8, a synthetic frame
    from data.synthetic import render, sample_spec

    return render(sample_spec(rng), 1, h, w)[0]


def image_bytes(frame: np.ndarray, fmt: str, orientation: int = 1) -> bytes:
    buf, im = io.BytesIO(), Image.fromarray(frame)
    kw = {"quality": 95} if fmt == "JPEG" else {}
    if orientation != 1:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def image_sample(rng, key: str, h: int, w: int, fmt: str = "PNG", meta: bool = True) -> dict:
    member = "png" if fmt == "PNG" else "jpg"
    s = {"__key__": key, member: image_bytes(still(rng, h, w), fmt), "txt": f"a still {key}"}
    if meta:
        s["json"] = {"kind": "image", "width": w, "height": h, "start": 0, "end": 1, "fps": 8.0}
    return s


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> dict:
    """Two shards of videos (12-frame 32x32 mp4s) and images: square PNGs (48x48), wide JPEGs
    (40x80), LAION-style JPEGs without a .json (one stored wide with EXIF orientation 6: shown
    tall), and one PNG cut short."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    samples = ([synthetic_clip(rng, f"vid{i}", 32, 32) for i in range(6)]
               + [image_sample(rng, f"sq{i}", 48, 48) for i in range(5)]
               + [image_sample(rng, f"wd{i}", 40, 80, "JPEG") for i in range(4)]
               + [image_sample(rng, f"laion{i}", 64, 64, "JPEG", meta=False) for i in range(2)])
    turned = {"__key__": "exif6", "jpg": image_bytes(still(rng, 40, 80), "JPEG", orientation=6),
              "txt": "a turned still"}
    bad = image_sample(rng, "broken", 48, 48)
    bad["png"] = bad["png"][: len(bad["png"]) // 2]
    samples += [turned, bad]
    urls = [str(root / "m-0.tar"), str(root / "m-1.tar")]
    for j, url in enumerate(urls):
        write_shard(url, samples[j::2])
    return {"urls": urls, "samples": {s["__key__"]: s for s in samples}}


def loader(urls, buckets=BUCKETS, rank=0, world=1, state=None, peers=None, **kw) -> Loader:
    cfg = LoaderConfig(buckets=buckets, shuffle_buffer=3, prefetch=0, **kw)
    return Loader(ClipStream(urls, buckets=buckets, rank=rank, world=world, seed=0, cfg=cfg, state=state),
                  peers=peers)


def epoch0(ld: Loader) -> dict[str, torch.Tensor]:
    """key -> its clip (3, T, H, W) uint8, for every batch of epoch 0."""
    out = {}
    while True:
        video, _, keys = next(ld)
        if ld.last["epoch"] > 0:
            return out
        assert video.dtype == torch.uint8 and video.ndim == 5 and len(keys) == video.shape[0]
        out.update(zip(keys, video))


def expected_still(sample: dict, size) -> torch.Tensor:  # (3, 1, H, W) uint8, read_image directly
    data = sample.get("png") or sample.get("jpg")
    return torch.from_numpy(read_image(data, size=size)).permute(2, 0, 1)[:, None]


def test_images_come_out_as_one_frame_batches_with_their_pixels_videos_unchanged(mixed):
    ld = loader(mixed["urls"])
    got = epoch0(ld)
    src = mixed["samples"]
    assert set(got) == set(src) - {"broken"}  # every good sample once
    for k in ("sq0", "laion1"):
        assert got[k].shape == (3, 1, 32, 32) and torch.equal(got[k], expected_still(src[k], (32, 32)))
    for k in ("wd0", "wd3"):  # wide stills: the wide 1-frame bucket
        assert got[k].shape == (3, 1, 32, 64) and torch.equal(got[k], expected_still(src[k], (32, 64)))
    # EXIF orientation 6: stored 80 wide, shown 80 tall: no tall bucket, so the square one
    assert image_size(src["exif6"]["jpg"]) == (80, 40)
    assert torch.equal(got["exif6"], expected_still(src["exif6"], (32, 32)))
    for k in ("vid0", "vid5"):  # videos: their 8-frame window, as decode_sample cuts it
        want, _ = decode_sample(src[k], 8, (32, 32), None, random.Random(_seed(0, 0, k)))
        assert torch.equal(got[k], want)
    assert ld.skipped_total == 1 and ld.skip_reasons == {}  # the PNG cut short: a counted skip
    ld.close()


def test_without_a_one_frame_bucket_images_are_skipped_as_no_bucket(mixed):
    ld = loader(mixed["urls"], buckets=[Bucket(8, 32, 32, 2)])
    got = epoch0(ld)
    assert sorted(got) == [f"vid{i}" for i in range(6)]
    n_images = len(mixed["samples"]) - 6
    assert ld.skip_reasons == {"no_bucket": n_images} and ld.skipped_total == n_images
    ld.close()


def test_images_never_touch_the_video_decoder(mixed, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("an image went to the video decoder")

    monkeypatch.setattr(training.clips, "read_frames", refuse)
    monkeypatch.setattr(training.clips, "probe", refuse)
    ld = loader(mixed["urls"], buckets=[Bucket(1, 32, 32, 2), Bucket(1, 32, 64, 2)])
    got = epoch0(ld)  # videos reach the decoder and are skipped; every still comes out
    assert set(got) == {k for k in mixed["samples"] if not k.startswith("vid")} - {"broken"}
    ld.close()


def test_two_ranks_in_lock_step_resume_exactly_with_images_waiting(mixed):
    def pair(state=(None, None)):
        group = ThreadGroup(2)
        return [loader(mixed["urls"], rank=r, world=2, state=state[r], peers=ThreadPeers(group, r))
                for r in range(2)]

    a = pair()
    first = in_step(a, 3)
    assert [x[0] for x in first[0]] == [x[0] for x in first[1]]  # one shape per step
    saved = [json.loads(json.dumps(ld.state_dict())) for ld in a]
    held = [k for s in saved for p in s["positions"].values() for keys in p["pending"].values() for k in keys]
    held += [k for s in saved for e in s["waiting"] for k in e["keys"]]
    assert any(not k.startswith("vid") for k in held)  # stills wait in the saved position
    b = pair(tuple(Loader.restore_state(s, 0) for s in saved))
    went_on, resumed = in_step(a, 8), in_step(b, 8)
    shapes = set()
    for r in range(2):  # across the epoch boundary: the same batches, rank by rank
        for (sa, ka, va, _), (sb, kb, vb, _) in zip(went_on[r], resumed[r]):
            assert sa == sb and ka == kb and torch.equal(va, vb)
            shapes.add(sa)
    assert {(1, 32, 32), (8, 32, 32)} <= shapes
    for ld in a + b:
        ld.close()


def test_packs_mix_stills_and_clips(mixed):
    tcfg = TrainConfig(data=LoaderConfig(pack=True, token_budget=700, buckets=BUCKETS, shuffle_buffer=4,
                                         prefetch=0))
    tokens = clip_tokens(tcfg, ModelConfig(), None)  # patch (1, 4, 4): 64 tokens a 32x32 frame
    ld = Loader(ClipStream(mixed["urls"], buckets=buckets_of(tcfg, 1, tokens), rank=0, world=1, seed=3,
                           cfg=tcfg.data, tokens=tokens))
    seen, mixed_pack = {}, False
    while True:
        clips, _, keys = next(ld)
        if ld.last["epoch"] > 0:
            break
        assert isinstance(clips, list) and all(c.dtype == torch.uint8 for c in clips)
        frames = {c.shape[1] for c in clips}
        mixed_pack |= {1, 8} <= frames
        seen.update(zip(keys, clips))
    assert mixed_pack  # a pack holds a still and a clip
    assert set(seen) == set(mixed["samples"]) - {"broken"}
    assert torch.equal(seen["wd1"], expected_still(mixed["samples"]["wd1"], (32, 64)))
    ld.close()


def test_validation_reads_images_as_one_frame_clips_only(mixed):
    one = read_clips(mixed["urls"], 100, 1, (32, 32), None)
    assert len(one) == len(mixed["samples"]) - 1  # the broken PNG is skipped
    assert all(v.shape == (3, 1, 32, 32) for v, _ in one)
    eight = read_clips(mixed["urls"], 100, 8, (32, 32), None)
    assert len(eight) == 6 and all(v.shape == (3, 8, 32, 32) for v, _ in eight)  # the videos only


def test_the_synthetic_source_writes_stills_as_pngs_with_motionless_captions(tmp_path):
    from data.prompts import parse_prompt
    from data.synthetic import ClipSpec, SourceConfig, generate, render

    kw = dict(num_videos=8, width=32, height=32, seconds=1.0, bad_fraction=0.25, multishot_fraction=0.0)
    rows = generate(SourceConfig(stills=0.5, **kw), tmp_path / "s")
    videos = generate(SourceConfig(**kw), tmp_path / "v")
    stills = [r for r in rows if r.get("kind") == "image"]
    assert len(stills) == 4 and not any(r.get("kind") for r in videos)
    for r in stills:
        assert r["path"].endswith(".png") and r["num_frames"] == 1 and r["bad_kind"] is None
        spec = ClipSpec.from_dict(r["attributes"])
        assert spec.speed == 0 and " moving " not in r["caption"] and " bouncing " not in r["caption"]
        want = parse_prompt(r["caption"])
        assert want is not None and want.direction is None and want.color == spec.color
        got = read_image(str(tmp_path / "s" / r["path"]))  # (32, 32, 3)
        assert np.array_equal(got, render(spec, 1, 32, 32)[0])
    for r, v in zip(rows, videos):  # the items left videos are the same videos
        if r.get("kind") != "image":
            assert r == v and (tmp_path / "s" / r["path"]).read_bytes() == (tmp_path / "v" / v["path"]).read_bytes()
    # the source stage's items: the stills are curated as images (not probed as videos)
    from pipeline.stages import synthetic_items

    items = synthetic_items(rows, tmp_path / "s")
    assert [i.get("kind") for i in items] == ["image" if r.get("kind") == "image" else None for r in rows]


def test_held_out_stills_and_videos_are_read_apart(mixed):
    """Evaluation's held-out sets: the videos at the training length (stills skipped), the stills
    as 1-frame clips of their own (videos skipped); a split without any is [] when not required."""
    videos = read_clips(mixed["urls"], 20, 8, (32, 32), None, required=False)
    stills = read_clips(mixed["urls"], 20, 1, (32, 32), None, images=True)
    assert len(videos) == 6 and all(v.shape == (3, 8, 32, 32) for v, _ in videos)
    assert len(stills) == 12 and all(v.shape == (3, 1, 32, 32) for v, _ in stills)  # the broken one skipped
    assert len(read_clips(mixed["urls"], 20, 1, (32, 32), None, images=False)) == 6
    assert read_clips(mixed["urls"][:0], 5, 8, (32, 32), None, required=False) == []
    with pytest.raises(RuntimeError, match="no decodable clips for validation"):
        read_clips(mixed["urls"][:0], 5, 8, (32, 32), None)


def test_a_one_frame_bucket_must_cut_into_the_dits_patches():
    from training.dit import DiTConfig
    from training.trainer import check_latent_data

    tcfg = TrainConfig(data=LoaderConfig(buckets=BUCKETS))
    check_latent_data(tcfg, ModelConfig(dit=DiTConfig(patch_size=[1, 4, 4])), None)
    with pytest.raises(ValueError, match=r"train.data.buckets\[1\].*model.dit.patch_size"):
        check_latent_data(tcfg, ModelConfig(dit=DiTConfig(patch_size=[2, 4, 4])), None)


@pytest.mark.parametrize("span", ["window", "whole"])
def test_precompute_encodes_images_as_one_frame_and_the_latent_loader_trains_them(tmp_path, span):
    """Latent space: precompute stores each still as a 1-frame latent (the causal VAE's
    single-frame path, equal to encoding the decoded image alone) whatever the span, videos as
    before, a corrupt image as a failure with its reason; the latent loader puts the stills in
    the 1-frame bucket and the clips in the 9-frame one."""
    from test_vae import save_vae

    from training.latent.precompute import precompute_latents
    from training.latent.space import LatentConfig
    from training.latent_format import decode_latent_sample

    rng = np.random.default_rng(4)
    samples = ([synthetic_clip(rng, f"vid{i}", 32, 32) for i in range(3)]
               + [image_sample(rng, f"sq{i}", 32, 32) for i in range(2)] + [image_sample(rng, "wd", 40, 80, "JPEG")])
    bad = image_sample(rng, "broken", 32, 32)
    samples.append({**bad, "png": bad["png"][:40]})
    write_shard(str(tmp_path / "train-000000.tar"), samples)
    written = {s["__key__"]: s for s in samples}
    vae_dir = save_vae(tmp_path / "vae")
    cfg = LatentConfig(kind="ours", span=span, clips_per_shard=8, batch_size=2)
    stats = precompute_latents(cfg, {"train": [str(tmp_path / "train-000000.tar")]}, tmp_path / "out", 9, (32, 32),
                               None, vae_dir=str(vae_dir), log=lambda s: None)
    assert (stats["clips_in"], stats["clips_encoded"], stats["clips_failed"]) == (7, 6, 1)
    assert stats["failed"][0]["key"] == "broken" and stats["failed"][0]["reason"] == "decode_failed"
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    stored = {s["__key__"]: s for s in read_shards([str(tmp_path / "out" / p) for p in index["train"]])}
    space = cfg.build(vae_dir=str(vae_dir))
    for k in ("sq0", "sq1", "wd"):
        z, _, _ = decode_latent_sample(stored[k])
        assert stored[k]["json"]["video_shape"] == [1, 32, 32] and tuple(z.shape) == (4, 1, 4, 4)
        alone = decode_sample(written[k], 1, (32, 32), None, rng=None)[0]  # (3, 1, 32, 32)
        with torch.no_grad():
            want = space.encode(normalize(alone[None]))[0]  # (4, 1, 4, 4)
        torch.testing.assert_close(z.float(), want.float(), rtol=1e-3, atol=1e-3)
    assert all(stored[f"vid{i}"]["json"]["latent_shape"][1] == 3 for i in range(3))  # 9 frames: 3 latents
    latent = LoaderConfig(kind="latent", buckets=[Bucket(9, 32, 32, 2), Bucket(1, 32, 32, 2)], prefetch=0)
    loader = Loader(ClipStream([str(tmp_path / "out" / p) for p in index["train"]], buckets=latent.buckets,
                               rank=0, world=1, seed=0, cfg=latent))
    shapes = {}
    for _ in range(6):
        z, _, keys = next(loader)
        shapes.update({k: tuple(z.shape[1:]) for k in keys})
    loader.close()
    assert {shapes[k] for k in ("sq0", "sq1", "wd") if k in shapes} == {(4, 1, 4, 4)}
    assert {shapes[k] for k in shapes if k.startswith("vid")} <= {(4, 3, 4, 4), (4, 1, 4, 4)}
    assert {"sq0", "sq1", "wd"} <= set(shapes)

