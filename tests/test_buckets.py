"""Duration buckets, bucket probabilities, the token budget and windows of whole-clip latents
(training/loader.py), the checks that keep latent training shapes to windows the shards hold
(training/trainer.py), the size limit of a bucket, and ranks kept on one bucket per step with
its exact resume (training/lockstep.py)."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

from data.shards import write_shard
from training.clips import latent_frames
from training.latent_format import LATENT, npy_bytes
from training.loader import Bucket, ClipStream, Loader, LoaderConfig, resolve_batch_sizes
from training.lockstep import agree
from training.model import ModelConfig
from training.trainer import TrainConfig, buckets_of, check_latent_buckets, clip_tokens


@pytest.fixture(scope="module")
def long_short_shards(tmp_path_factory) -> list[str]:
    """Square 32x32 clips at 8 fps: even ones 12 frames long, odd ones 24."""
    from data.synthetic import caption, render, sample_spec
    from data.video_io import encode_mp4

    root = tmp_path_factory.mktemp("durations")
    rng = np.random.default_rng(1)
    samples = []
    for i in range(12):
        spec, n = sample_spec(rng), 24 if i % 2 else 12
        samples.append({"__key__": f"clip{i:03d}", "mp4": encode_mp4(render(spec, n, 32, 32), fps=8),
                        "txt": caption(spec), "json": {"start": 0, "end": n, "fps": 8.0, "width": 32,
                                                       "height": 32}})
    urls = []
    for j in range(2):
        write_shard(str(root / f"d-{j}.tar"), samples[j::2])
        urls.append(str(root / f"d-{j}.tar"))
    return urls


def keys_by_frames(loader: Loader, batches: int) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for _ in range(batches):
        video, _, keys = next(loader)
        out.setdefault(video.shape[2], []).extend(keys)
    return out


def test_duration_buckets_take_long_clips_at_either_length_by_probability(long_short_shards):
    def make(prob: float, seed: int = 0) -> Loader:
        return Loader(ClipStream(long_short_shards, rank=0, world=1, seed=seed, cfg=LoaderConfig(prefetch=0),
                                 buckets=[Bucket(16, 16, 16, 2, prob=prob), Bucket(8, 16, 16, 2)]))

    # prob 1: the longest bucket a clip fills; 12-frame clips cannot fill 16 frames
    got = keys_by_frames(make(1.0), 6)
    assert {int(k[4:]) % 2 for k in got[16]} == {1} and {int(k[4:]) % 2 for k in got[8]} == {0}
    assert len(got[16]) == len(got[8]) == 6
    # prob 0: every clip falls through to the short bucket
    assert set(keys_by_frames(make(0.0), 6)) == {8}
    # prob 0.5: over 4 epochs the long clips come at both lengths, the short ones only at 8
    a = keys_by_frames(make(0.5), 24)
    long16 = set(a[16])
    long8 = {k for k in a[8] if int(k[4:]) % 2}
    assert long16 and long8 and all(int(k[4:]) % 2 for k in long16)
    assert 0.25 < len(a[16]) / (len(a[16]) + sum(int(k[4:]) % 2 for k in a[8])) < 0.75
    # the choice is the seed's, epoch's and key's, not luck: the same seed repeats it
    assert keys_by_frames(make(0.5), 24) == a
    assert keys_by_frames(make(0.5, seed=1), 24) != a


def test_token_budget_sets_batch_sizes_many_short_or_few_long(long_short_shards):
    mcfg = ModelConfig()
    mcfg.dit.patch_size = [2, 4, 4]
    tcfg = TrainConfig(data=LoaderConfig(token_budget=256, prefetch=0,
                                         buckets=[Bucket(16, 16, 16, 0), Bucket(8, 16, 16, 0)]))
    tokens = clip_tokens(tcfg, mcfg, None)
    assert tokens(Bucket(16, 16, 16, 1)) == 8 * 4 * 4 and tokens(Bucket(8, 16, 16, 1)) == 4 * 4 * 4
    buckets = buckets_of(tcfg, 99, tokens)
    assert [b.batch_size for b in buckets] == [2, 4]  # 256 // 128, 256 // 64
    assert [b.batch_size for b in buckets_of(tcfg, 99)] == [0, 0]  # shapes only, unresolved
    with pytest.raises(ValueError, match="batch_size 0"):
        ClipStream(long_short_shards, buckets=buckets_of(tcfg, 99), rank=0, world=1, seed=0)
    # a clip over the budget still trains, alone
    assert resolve_batch_sizes([Bucket(16, 16, 16, 0)], 10, tokens)[0].batch_size == 1
    loader = Loader(ClipStream(long_short_shards, buckets=buckets, rank=0, world=1, seed=0, cfg=tcfg.data))
    sizes: dict[int, set] = {}
    for _ in range(8):
        video, _, _ = next(loader)
        sizes.setdefault(video.shape[2], set()).add(video.shape[0])
        assert video.shape[0] * tokens(Bucket(video.shape[2], 16, 16, 1)) <= 256
    assert max(sizes[16]) == 2 and max(sizes[8]) == 4
    # latents: tokens of the latent grid (compression 4, 8, 8), patch [1, 2, 2]
    mcfg.dit.patch_size = [1, 2, 2]
    lat = TrainConfig(data=LoaderConfig(kind="latent"))
    assert clip_tokens(lat, mcfg, {"compression": [4, 8, 8]})(Bucket(33, 32, 32, 1)) == 9 * 2 * 2


def stored_latent(t: int) -> torch.Tensor:
    """(C=4, t, h=2, w=2) whose value at latent frame i is i (+ 1000 * channel): a window's
    first frame reads its start."""
    c = torch.arange(4).view(4, 1, 1, 1) * 1000.0
    return (torch.arange(t, dtype=torch.float32).view(1, t, 1, 1) + c).expand(4, t, 2, 2).contiguous()


@pytest.fixture(scope="module")
def whole_latent_shards(tmp_path_factory) -> list[str]:
    """Latent shards as latent.span=whole writes them: per clip its own video_shape and
    latent_shape (compression 4); clips 0-5 hold 33 frames (9 latent frames), clips 6-7 one
    9-frame window (3 latent frames)."""
    root = tmp_path_factory.mktemp("whole")
    samples = []
    for i in range(8):
        T = 33 if i < 6 else 9
        t = 1 + (T - 1) // 4
        samples.append({"__key__": f"lat{i:03d}", LATENT: npy_bytes(stored_latent(t).numpy()),
                        "txt": f"caption {i}",
                        "json": {"video_shape": [T, 16, 16], "latent_shape": [4, t, 2, 2]}})
    write_shard(str(root / "l-0.tar"), samples)
    return [str(root / "l-0.tar")]


def test_windows_of_whole_clip_latents_are_cut_without_decoding(whole_latent_shards):
    def make(state=None, prob=0.5) -> Loader:
        return Loader(ClipStream(whole_latent_shards, rank=0, world=1, seed=3, state=state,
                                 cfg=LoaderConfig(kind="latent", shuffle_buffer=4, prefetch=0),
                                 buckets=[Bucket(33, 16, 16, 2, prob=prob), Bucket(9, 16, 16, 2)]))

    assert latent_frames({"video_shape": [33, 16, 16], "latent_shape": [4, 9, 2, 2]}, 13) == 4
    assert latent_frames({"video_shape": [33, 16, 16], "latent_shape": [4, 9, 2, 2]}, 12) is None
    assert latent_frames({"video_shape": [9, 16, 16], "latent_shape": [4, 3, 2, 2]}, 33) is None
    loader = make()
    starts: dict[str, set] = {}
    for _ in range(16):  # 4 epochs
        z, caps, keys = next(loader)
        assert z.shape[0] == len(keys) and z.shape[1:] in ((4, 9, 2, 2), (4, 3, 2, 2))
        for zi, k in zip(z, keys):
            first = int(zi[0, 0, 0, 0])
            assert torch.equal(zi, stored_latent(9 if int(k[3:]) < 6 else 3)[:, first : first + zi.shape[1]])
            if zi.shape[1] == 9:
                assert int(k[3:]) < 6 and first == 0  # the whole clip
            else:
                starts.setdefault(k, set()).add(first)
    assert all(s == {0} for k, s in starts.items() if int(k[3:]) >= 6)  # a 9-frame window: itself
    long_starts = set().union(*(s for k, s in starts.items() if int(k[3:]) < 6))
    assert len(long_starts) > 2 and max(long_starts) <= 6  # windows start anywhere in 0..6

    a = make()
    for _ in range(3):
        next(a)
    b = make(Loader.restore_state(json.loads(json.dumps(a.state_dict())), 0))
    for _ in range(6):
        za, _, ka = next(a)
        zb, _, kb = next(b)
        assert ka == kb and torch.equal(za, zb)
    # a length no stored latent holds as 1 + k * 4 frames: nothing fits, said
    with pytest.raises(RuntimeError, match="fit a bucket"):
        next(Loader(ClipStream(whole_latent_shards, rank=0, world=1, seed=0, buckets=[Bucket(12, 16, 16, 2)],
                               cfg=LoaderConfig(kind="latent", prefetch=0))))


def test_latent_training_shapes_must_be_windows_the_shards_hold():
    b = [Bucket(9, 32, 32, 1), Bucket(33, 32, 32, 1)]
    check_latent_buckets(b, [9, 32, 32], "whole", 4, [1, 2, 2], [4, 8, 8])
    with pytest.raises(ValueError, match=r"one window of 9 frames per clip \(latent.span=window\).*\(33, 32, 32\)"):
        check_latent_buckets(b, [9, 32, 32], "window", 4, [1, 2, 2])
    with pytest.raises(ValueError, match=r"encoded at height x width 32x32.*\(9, 16, 16\)"):
        check_latent_buckets([Bucket(9, 16, 16, 1)], [9, 32, 32], "whole", 4, [1, 2, 2])
    with pytest.raises(ValueError, match=r"1 \+ k\*4 frames"):
        check_latent_buckets([Bucket(8, 32, 32, 1)], [9, 32, 32], "whole", 4, [1, 2, 2])
    check_latent_buckets([Bucket(8, 32, 32, 1)], [9, 32, 32], "whole", None, [1, 2, 2])  # tc unknown yet
    with pytest.raises(ValueError, match="patch_size"):
        check_latent_buckets([Bucket(17, 32, 32, 1)], [9, 32, 32], "whole", 4, [2, 2, 2], [4, 8, 8])


# ----- many shapes on several ranks --------------------------------------------------------
def synthetic_clip(rng, key: str, h: int, w: int, n: int = 12) -> dict:
    from data.synthetic import caption, render, sample_spec
    from data.video_io import encode_mp4

    spec = sample_spec(rng)
    return {"__key__": key, "mp4": encode_mp4(render(spec, n, h, w), fps=8), "txt": caption(spec),
            "json": {"start": 0, "end": n, "fps": 8.0, "width": w, "height": h}}


@pytest.fixture(scope="module")
def three_shape_shards(tmp_path_factory) -> list[str]:
    """Square (32x32), wide (32x64) and tall (64x32) clips in two shards; only the first holds
    tall clips (and an 8x8 one, too small for every bucket). Two readers take one shard each per
    epoch, so each epoch one rank has no clip of the tall bucket."""
    root = tmp_path_factory.mktemp("shapes")
    rng = np.random.default_rng(0)
    x = ([synthetic_clip(rng, f"sq{i}", 32, 32) for i in range(4)]
         + [synthetic_clip(rng, f"wd{i}", 32, 64) for i in range(2)]
         + [synthetic_clip(rng, f"tl{i}", 64, 32) for i in range(4)] + [synthetic_clip(rng, "tiny", 8, 8)])
    y = [synthetic_clip(rng, f"sq{i}", 32, 32) for i in range(4, 8)] + [
        synthetic_clip(rng, f"wd{i}", 32, 64) for i in range(2, 6)]
    write_shard(str(root / "x.tar"), x)
    write_shard(str(root / "y.tar"), y)
    return [str(root / "x.tar"), str(root / "y.tar")]


SHAPES = [Bucket(8, 32, 32, 2), Bucket(4, 16, 32, 2), Bucket(4, 32, 16, 3)]  # square, wide, tall


class ThreadGroup:
    """The ranks of one test as threads, with torch.distributed's blocking semantics: a call
    returns once every rank has made it (a rank that never comes breaks the barrier after 60 s
    instead of hanging the test)."""

    def __init__(self, n: int):
        self.n, self.barrier, self.slots, self.box = n, threading.Barrier(n, timeout=60), [None] * n, None


class ThreadPeers:
    """training.lockstep's peers over a ThreadGroup: all-gather and broadcast."""

    def __init__(self, group: ThreadGroup, rank: int):
        self.group, self.rank, self.world = group, rank, group.n

    def gather(self, row):
        self.group.slots[self.rank] = list(row)
        self.group.barrier.wait()
        out = list(self.group.slots)
        self.group.barrier.wait()
        return out

    def share(self, obj, src):
        if self.rank == src:
            self.group.box = obj
        self.group.barrier.wait()
        got = self.group.box
        self.group.barrier.wait()
        return got


def shape_loaders(urls, state=(None, None), nw: int = 0, max_waiting: int = 8, lockstep: bool = True):
    group = ThreadGroup(2)
    return [Loader(ClipStream(urls, buckets=SHAPES, rank=r, world=2, seed=0, state=state[r],
                              cfg=LoaderConfig(shuffle_buffer=3, max_waiting=max_waiting, num_workers=nw)),
                   peers=ThreadPeers(group, r) if lockstep else None) for r in range(2)]


def in_step(loaders, steps: int) -> list[list[tuple]]:
    """`steps` batches from each rank's loader, the ranks in threads (as on a cluster): per
    rank [(shape (T, H, W), keys, video, epoch of the batch)]."""
    out: list[list[tuple]] = [[] for _ in loaders]
    errors = []

    def rank(i):
        try:
            for _ in range(steps):
                v, _, k = next(loaders[i])
                out[i].append((tuple(v.shape[2:]), k, v, loaders[i].last["epoch"]))
        except BaseException as e:  # noqa: BLE001 - re-raised below, in the test's thread
            errors.append(e)
            if (group := getattr(loaders[i].lockstep.peers, "group", None)) is not None:
                group.barrier.abort()  # the other rank stops waiting

    threads = [threading.Thread(target=rank, args=(i,)) for i in range(len(loaders))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


def test_agreement_takes_a_common_bucket_pulls_or_hands_spares_over():
    # rows: per bucket the waiting batches, then the pull number of the oldest (-1: none)
    take = agree([[1, 2, 0, 2, 3, -1], [1, 1, 0, 4, 6, -1]], max_waiting=8)
    assert (take.kind, take.bucket) == ("take", 0)  # both common: bucket 0's batch #2 waited longest
    assert agree([[1, 2, 0, 5, 3, -1], [1, 1, 0, 4, 6, -1]], 8).bucket == 1  # now bucket 1's #3
    assert agree([[0, 2, 0, -1, 3, -1], [1, 0, 0, 4, -1, -1]], 8).kind == "pull"  # nothing common
    share = agree([[0, 3, 0, -1, 3, -1], [1, 0, 0, 4, -1, -1]], max_waiting=3)  # rank 0 is full
    assert (share.kind, share.bucket, share.moves) == ("share", 1, [(0, 1)])
    # three ranks: buckets 0 and 1 are held by two each (3 batches): the first; rank 2 has a spare
    share = agree([[0, 2, 0, -1, 1, -1], [1, 1, 0, 2, 3, -1], [2, 0, 1, 0, -1, 5]], max_waiting=3)
    assert (share.bucket, share.moves) == (0, [(2, 0)])
    # a full room, but no bucket has a batch for every rank: pull on
    assert agree([[2, 0, 0, 1, -1, -1], [0, 0, 1, -1, -1, 2], [0, 0, 1, -1, -1, 3]], 2).kind == "pull"
    assert agree([[0, 0, 1, -1, -1, 7]], 8) == agree([[0, 0, 1, -1, -1, 7]], 1)  # one rank: its own


def test_two_ranks_step_on_the_same_bucket_every_step_each_sample_once(three_shape_shards):
    alone = in_step(shape_loaders(three_shape_shards, lockstep=False), 8)  # what each rank's stream does
    assert any(a[0] != b[0] for a, b in zip(*alone))  # left alone, the ranks disagree
    loaders = shape_loaders(three_shape_shards, max_waiting=2)
    ranks = in_step(loaders, 24)
    assert [a[0] for a in ranks[0]] == [b[0] for b in ranks[1]]  # one shape per step, both ranks
    assert {a[0] for a in ranks[0]} == {(8, 32, 32), (4, 16, 32), (4, 32, 16)}
    assert all(loader.lockstep.shared > 0 for loader in loaders)  # talls handed to the rank without
    # every good clip once in epoch 0 (as the batch's reader counts it), on one rank or the other
    first = [k for r in ranks for shape, keys, _, epoch in r if epoch == 0 for k in keys]
    assert sorted(first) == sorted([f"sq{i}" for i in range(8)] + [f"wd{i}" for i in range(6)]
                                   + [f"tl{i}" for i in range(4)])
    assert sum(loader.skip_reasons.get("too_small", 0) for loader in loaders) >= 1  # the 8x8 clip
    for loader in loaders:
        loader.close()


@pytest.mark.parametrize("nw,after", [(0, 5), (2, 7)])
def test_two_ranks_in_lock_step_resume_exactly_with_batches_waiting(three_shape_shards, nw, after):
    a = shape_loaders(three_shape_shards, nw=nw)
    in_step(a, after)
    saved = [json.loads(json.dumps(loader.state_dict())) for loader in a]
    assert any(s["waiting"] for s in saved)  # batches were waiting for the other rank
    b = shape_loaders(three_shape_shards, tuple(Loader.restore_state(s, nw) for s in saved), nw=nw)
    went_on, resumed = in_step(a, 10), in_step(b, 10)
    for r in range(2):  # across the epoch boundaries: the same batches, rank by rank
        for (sa, ka, va, _), (sb, kb, vb, _) in zip(went_on[r], resumed[r]):
            assert sa == sb and ka == kb and torch.equal(va, vb)
    for loader in a + b:
        loader.close()


def test_a_clip_goes_to_the_largest_bucket_it_fits_never_upscaled_beyond_the_limit(tmp_path):
    rng = np.random.default_rng(2)
    write_shard(str(tmp_path / "s.tar"), [synthetic_clip(rng, "big", 32, 32), synthetic_clip(rng, "mid", 20, 20),
                                          synthetic_clip(rng, "small", 8, 8)])

    def shapes(max_upscale: float) -> tuple[dict, dict]:
        loader = Loader(ClipStream([str(tmp_path / "s.tar")], rank=0, world=1, seed=0,
                                   buckets=[Bucket(4, 16, 16, 1), Bucket(4, 32, 32, 1)],
                                   cfg=LoaderConfig(max_upscale=max_upscale, prefetch=0)))
        got = {}
        while len(got) < 3 - (max_upscale < 2):
            video, _, keys = next(loader)
            got[keys[0]] = tuple(video.shape[3:])
        return got, loader.skip_reasons

    assert shapes(1.0) == ({"big": (32, 32), "mid": (16, 16)}, {"too_small": 1})  # 8x8: skipped
    assert shapes(2.0) == ({"big": (32, 32), "mid": (32, 32), "small": (16, 16)}, {})
    with pytest.raises(ValueError, match="max_upscale must be >= 1"):
        LoaderConfig(max_upscale=0.5)
