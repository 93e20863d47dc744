"""train.data.mix: per-kind mixing weights over real mp4s and PNGs in real shards: the share of
image and video batches, each kind's epoch, exact resume (one rank, two ranks in lock step,
packing) and the config's checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data.shards import write_shard
from test_buckets import ThreadGroup, ThreadPeers, in_step, synthetic_clip
from test_image_training import image_sample
from training.loader import Bucket, ClipStream, Loader, LoaderConfig

# videos go to the 4-frame bucket (the largest they fill), stills to the 1-frame one
ONE = [Bucket(4, 16, 16, 1), Bucket(1, 16, 16, 1)]
# half the videos as 1-frame windows: the video pass holds two buckets, partly filled
TWO = [Bucket(4, 16, 16, 2, prob=0.5), Bucket(1, 16, 16, 2)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict:
    """Two shards, each of 3 videos (8-frame 16x16 mp4s) and 3 PNG stills (16x16): half the
    samples are images; and one shard of videos only."""
    root = tmp_path_factory.mktemp("mix")
    rng = np.random.default_rng(0)
    vids = [synthetic_clip(rng, f"vid{i}", 16, 16, n=8) for i in range(6)]
    imgs = [image_sample(rng, f"img{i}", 16, 16) for i in range(6)]
    urls = [str(root / "m-0.tar"), str(root / "m-1.tar")]
    for j, url in enumerate(urls):
        write_shard(url, vids[j::2] + imgs[j::2])
    write_shard(str(root / "v.tar"), vids)
    return {"urls": urls, "videos": [str(root / "v.tar")],
            "images": {s["__key__"] for s in imgs}, "clips": {s["__key__"] for s in vids}}


def make(urls, mix, buckets=ONE, rank=0, world=1, state=None, peers=None, **kw) -> Loader:
    cfg = LoaderConfig(buckets=buckets, shuffle_buffer=3, prefetch=0, mix=mix, **kw)
    return Loader(ClipStream(urls, buckets=buckets, rank=rank, world=world, seed=0, cfg=cfg, state=state,
                             tokens=lambda b: b.num_frames * 16 if kw.get("pack") else None),
                  peers=peers)


def kind_of(keys: list[str], images: set[str]) -> str:
    kinds = {"image" if k in images else "video" for k in keys}
    assert len(kinds) == 1, keys  # every batch is one kind
    return kinds.pop()


@pytest.mark.parametrize("share", [0.25, 0.8])
def test_the_image_share_of_batches_follows_the_weights_each_kind_a_whole_epoch(shards, share):
    ld = make(shards["urls"], {"image": share, "video": 1 - share})
    got, epoch0 = [], {"image": [], "video": []}
    for _ in range(240):
        video, _, keys = next(ld)
        kind = kind_of(keys, shards["images"])
        assert video.shape[2] == (1 if kind == "image" else 4)
        got.append(kind)
        if ld.last["epoch"] == 0:
            epoch0[kind] += keys
    assert abs(got.count("image") / len(got) - share) < 0.07  # the data itself holds half images
    # each kind's first epoch: every sample of that kind once
    assert sorted(epoch0["image"]) == sorted(shards["images"])
    assert sorted(epoch0["video"]) == sorted(shards["clips"])
    assert ld.positions[0]["mix"]["image"]["epoch"] != ld.positions[0]["mix"]["video"]["epoch"]
    ld.close()


def test_an_empty_mix_is_the_data_as_it_is(shards):
    a, b = make(shards["urls"], {}), make(shards["urls"], None)
    c = Loader(ClipStream(shards["urls"], buckets=ONE, rank=0, world=1, seed=0,
                          cfg=LoaderConfig(buckets=ONE, shuffle_buffer=3, prefetch=0)))
    runs = [[next(ld)[2] for _ in range(14)] for ld in (a, b, c)]
    assert runs[0] == runs[1] == runs[2]
    assert "mix" not in a.positions[0]
    for ld in (a, b, c):
        ld.close()


@pytest.mark.parametrize("nw", [0, 2])
def test_resume_mid_epoch_gives_the_same_batches(shards, nw):
    a = make(shards["urls"], {"image": 0.3, "video": 0.7}, buckets=TWO, num_workers=nw)
    for steps in range(1, 13):  # on to a position where a partly filled bucket waits
        next(a)
        pos = a.state_dict()["positions"]
        if steps >= 3 and any(q["pending"] for p in pos.values() for q in p["mix"].values()):
            break
    assert steps < 12
    saved = json.loads(json.dumps(a.state_dict()))
    pos = saved["positions"]
    assert sum(p["drawn"] for p in pos.values()) == steps and all(set(p["mix"]) == {"image", "video"}
                                                                  for p in pos.values())
    b = make(shards["urls"], {"image": 0.3, "video": 0.7}, buckets=TWO, num_workers=nw,
             state=Loader.restore_state(saved, nw))
    for _ in range(12):  # across both kinds' epoch boundaries
        va, _, ka = next(a)
        vb, _, kb = next(b)
        assert ka == kb and torch.equal(va, vb)
    for ld in (a, b):
        ld.close()


def test_two_ranks_in_lock_step_with_mix_resume_exactly(shards):
    mix = {"image": 0.25, "video": 0.75}

    def pair(state=(None, None)):
        group = ThreadGroup(2)
        return [make(shards["urls"], mix, buckets=TWO, rank=r, world=2, state=state[r],
                     peers=ThreadPeers(group, r)) for r in range(2)]

    a = pair()
    first = in_step(a, 4)
    saved = [json.loads(json.dumps(ld.state_dict())) for ld in a]
    b = pair(tuple(Loader.restore_state(s, 0) for s in saved))
    went_on, resumed = in_step(a, 20), in_step(b, 20)
    kinds = []
    for r in range(2):
        for step, ((sa, ka, va, _), (sb, kb, vb, _)) in enumerate(zip(went_on[r], resumed[r])):
            assert sa == sb and ka == kb and torch.equal(va, vb)
            assert sa == went_on[1 - r][step][0]  # one shape per step on both ranks
            kinds.append(kind_of(ka, shards["images"]))
    assert first[0][0][0] == first[1][0][0]
    assert 0.1 < kinds.count("image") / len(kinds) < 0.45
    for ld in a + b:
        ld.close()


def test_packs_are_one_kind_each_and_resume_exactly(shards):
    mix = {"image": 0.5, "video": 0.5}
    a = make(shards["urls"], mix, pack=True, token_budget=160)  # a pack: 10 stills or 2 clips + 2 stills
    for _ in range(3):
        next(a)
    saved = json.loads(json.dumps(a.state_dict()))
    b = make(shards["urls"], mix, pack=True, token_budget=160, state=Loader.restore_state(saved, 0))
    for _ in range(10):
        ca, _, ka = next(a)
        cb, _, kb = next(b)
        kind_of(ka, shards["images"])
        assert ka == kb and all(torch.equal(x, y) for x, y in zip(ca, cb))
    for ld in (a, b):
        ld.close()


def test_a_kind_the_data_lacks_is_dropped_with_a_warning(shards):
    ld = make(shards["videos"], {"image": 0.5, "video": 0.5})
    with pytest.warns(UserWarning, match=r"no usable image sample.*train\.data\.mix\.image"):
        keys = [k for _ in range(8) for k in next(ld)[2]]
    assert set(keys) <= shards["clips"] and ld.positions[0]["dropped"] == ["image"]
    ld.close()
    only = make(shards["videos"], {"image": 1.0})
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="no usable sample of any kind train.data.mix"):
        next(only)
    only.close()


@pytest.mark.parametrize("mix, match", [
    ({"audio": 1.0}, "unknown kind 'audio' in train.data.mix"),
    ({"image": -0.5, "video": 1.0}, r"train\.data\.mix\.image is -0\.5"),
    ({"image": 0, "video": 0.0}, r"train\.data\.mix: every weight is 0"),
])
def test_bad_weights_are_named(mix, match):
    with pytest.raises(ValueError, match=match):
        LoaderConfig(mix=mix)


def test_an_image_weight_needs_a_one_frame_bucket(shards):
    with pytest.raises(ValueError, match=r"train\.data\.mix\.image is 0\.5 but no bucket has num_frames 1"):
        make(shards["urls"], {"image": 0.5, "video": 0.5}, buckets=ONE[:1])
