"""The latent space: our causal VAE, pretrained diffusers VAEs, latent shards, the latent loader.

Everything runs on tiny models built from configs (random weights, saved to tmp and loaded back
through the real loading paths) and 32-px synthetic clips.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from data.shards import read_shards, write_shard
from data.synthetic import caption, render, sample_spec
from data.video_io import encode_mp4
from data.tracking import MemoryTracker
from training.clips import decode_sample, normalize
from training.latent.precompute import precompute_latents
from training.latent.recon_metrics import evaluate_reconstruction, psnr, ssim
from training.latent.space import LatentConfig, load_latent_space
from training.latent.vae import VAEConfig, from_pretrained
from training.latent.vae_train import PerceptualLoss, VAETrainConfig, train_vae
from training.latent_format import decode_latent_sample
from training.loader import Bucket, ClipStream, Loader, LoaderConfig

T, SIZE = 9, (32, 32)
pytestmark = pytest.mark.usefixtures("one_thread")


def video(seed: int, shape=(1, 3, T, *SIZE)) -> torch.Tensor:
    """Smooth random video in [-1, 1] (B, 3, T, H, W)."""
    g = torch.Generator().manual_seed(seed)
    B, C, t, h, w = shape
    x = torch.randn(B, C, t, max(1, h // 8), max(1, w // 8), generator=g)
    return torch.nn.functional.interpolate(x, size=(t, h, w), mode="trilinear").clamp(-1, 1)


def save_vae(path: Path, cfg: VAEConfig | None = None, seed: int = 0) -> Path:
    """A random VAE in the VAE-training output layout (vae.pt + vae_config.json)."""
    from dataclasses import asdict

    torch.manual_seed(seed)
    vae = (cfg or VAEConfig()).build()
    path.mkdir(parents=True, exist_ok=True)
    torch.save(vae.state_dict(), path / "vae.pt")
    (path / "vae_config.json").write_text(json.dumps(asdict(vae.cfg)))
    return path


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, list[str]]:
    """train: 2 shards of 6 synthetic clips (12 frames, 32x32), the last one corrupt; val: 3 clips."""
    root = tmp_path_factory.mktemp("clips")
    rng = np.random.default_rng(0)
    samples = []
    for i in range(15):
        spec = sample_spec(rng)
        samples.append({"__key__": f"clip{i:03d}", "mp4": encode_mp4(render(spec, 12, *SIZE), fps=8),
                        "txt": caption(spec),
                        "json": {"start": 0, "end": 12, "fps": 8.0, "width": SIZE[1], "height": SIZE[0]}})
    samples[11] = {**samples[11], "mp4": os.urandom(1500)}  # corrupt
    urls: dict[str, list[str]] = {"train": [], "val": []}
    for name, part in (("train-000000", samples[:6]), ("train-000001", samples[6:12]), ("val-000000", samples[12:])):
        write_shard(root / f"{name}.tar", part)
        urls[name.split("-")[0]].append(str(root / f"{name}.tar"))
    return urls


# ----- the VAE ------------------------------------------------------------------------------
def test_latent_frames_follow_causal_compression():
    vae = VAEConfig().build().eval()
    assert vae.compression == (4, 8, 8) and vae.channels == 4
    with torch.no_grad():
        for frames, latent_frames in ((1, 1), (5, 2), (9, 3), (17, 5)):
            z = vae.encode(video(frames, (2, 3, frames, *SIZE)))
            assert z.shape == (2, 4, latent_frames, 4, 4)
            assert vae.decode(z).shape == (2, 3, frames, *SIZE)
    with pytest.raises(ValueError, match=r"T = 1 \+ k\*4"):
        vae.encode(video(0, (1, 3, 8, *SIZE)))
    assert VAEConfig.from_preset("small").compression == (4, 8, 8)
    assert VAEConfig(channel_mult=[1, 2], temporal_downsample=[True]).compression == (2, 2, 2)


def test_changing_frame_k_leaves_earlier_latents_unchanged():
    torch.manual_seed(0)
    vae = VAEConfig().build().eval()
    x = video(1, (1, 3, 17, *SIZE))
    with torch.no_grad():
        z = vae.encode(x)  # (1, 4, 5, 4, 4): latent j covers frames 4j-3..4j (j >= 1), latent 0 frame 0
        for k in (1, 6, 9, 16):
            x2 = x.clone()
            x2[:, :, k] = -x2[:, :, k]
            z2 = vae.encode(x2)
            first = (k + 3) // 4  # the first latent frame that sees frame k
            torch.testing.assert_close(z2[:, :, :first], z[:, :, :first], rtol=0, atol=1e-6)
            assert (z2[:, :, first] - z[:, :, first]).abs().max() > 1e-3
        # the decoder too: latent frame j reaches pixel frames 4j-3 onwards
        zz = z.clone()
        zz[:, :, 3] += 1.0
        y, y2 = vae.decode(z), vae.decode(zz)
        torch.testing.assert_close(y2[:, :, :9], y[:, :, :9], rtol=0, atol=1e-6)
        assert (y2[:, :, 9] - y[:, :, 9]).abs().max() > 1e-4


def test_chunked_encode_and_decode_equal_the_whole_clip():
    torch.manual_seed(0)
    vae = VAEConfig().build().eval()
    x = video(2, (1, 3, 17, *SIZE))
    with torch.no_grad():
        z = vae.encode(x)
        for chunk in (1, 2, 3):  # 3 leaves a shorter last chunk
            torch.testing.assert_close(vae.encode(x, chunk=chunk), z, rtol=0, atol=1e-5)
            torch.testing.assert_close(vae.decode(z, chunk=chunk), vae.decode(z), rtol=0, atol=1e-5)


def test_tiled_and_untiled_agree():
    """Tiles use only their output from overlap/4 inside their borders: exact once that margin
    covers the receptive field (one level, radius 8 px), close for a deeper 2x2x2 model."""
    x = video(3, (1, 3, 5, 96, 96))
    torch.manual_seed(0)
    flat = VAEConfig(channel_mult=[1], temporal_downsample=[]).build().eval()
    deep = VAEConfig(channel_mult=[1, 2], temporal_downsample=[True]).build().eval()
    with torch.no_grad():
        torch.testing.assert_close(flat.encode(x, tile=64, overlap=32), flat.encode(x), rtol=0, atol=1e-5)
        for vae in (flat, deep):
            z = vae.encode(x)
            zt = vae.encode(x, tile=64, overlap=32)
            assert (zt - z).abs().max() < 0.05 * z.abs().max()
            y, yt = vae.decode(z), vae.decode(z, tile=64, overlap=32)
            assert (yt - y).abs().max() < 0.05 * y.abs().max()
            assert ((yt - y).abs().mean() / y.abs().mean()) < 0.01
        # tiles and chunks together (the memory-bounded path) keep the shapes
        tiny = VAEConfig().build().eval()
        x = video(4, (1, 3, 9, 64, 96))
        assert tiny.encode(x, tile=32, overlap=16, chunk=1).shape == (1, 4, 3, 8, 12)
        assert tiny.decode(tiny.encode(x), tile=32, overlap=16, chunk=1).shape == x.shape


def test_psnr_and_ssim():
    a = video(5, (2, 3, 3, 24, 24))
    off = (a + 0.1).clamp(-1, 1)
    torch.testing.assert_close(psnr(a, a + 0.1), torch.full((2,), 10 * np.log10(4 / 0.01)), rtol=1e-5, atol=1e-4)
    assert torch.isinf(psnr(a, a)).all()
    torch.testing.assert_close(ssim(a, a), torch.ones(2))
    # constant frames: SSIM = (2 m1 m2 + c1) / (m1^2 + m2^2 + c1), c1 = (0.01 * 2)^2
    c1 = 0.02**2
    s = ssim(torch.full((1, 3, 2, 16, 16), 0.5), torch.full((1, 3, 2, 16, 16), -0.25))
    assert s.item() == pytest.approx((2 * 0.5 * -0.25 + c1) / (0.25 + 0.0625 + c1), rel=1e-5)
    assert ssim(a, off).mean() < 1.0 and psnr(a, off).mean() > psnr(a, a + 0.3).mean()


def test_perceptual_loss_from_a_local_torchvision_file(tmp_path):
    import torchvision

    torch.manual_seed(0)
    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), tmp_path / "sq.pth")
    loss = PerceptualLoss("squeezenet1_1", str(tmp_path / "sq.pth"))
    a = video(6, (1, 3, 2, 32, 32))
    b = video(7, (1, 3, 2, 32, 32)).requires_grad_(True)
    assert loss(a, a).item() == pytest.approx(0.0, abs=1e-6)
    d = loss(b, a)
    d.backward()
    assert d.item() > 0 and b.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in loss.parameters())
    with pytest.raises(ValueError, match="perceptual_path"):
        VAETrainConfig(perceptual_weight=0.1)


def test_vae_training_reconstructs_better_than_step0(shards, tmp_path):
    cfg = VAETrainConfig(steps=12, batch_size=2, lr=3e-3, warmup_steps=2, shuffle_buffer=4, val_max_clips=3,
                         stats_clips=6, log_every=4)
    tracker = MemoryTracker()
    res = train_vae(cfg, shards["train"], shards["val"], tmp_path, tracker)
    assert res["final"]["recon_loss"] < 0.75 * res["step0"]["recon_loss"]
    assert res["final"]["psnr"] > res["step0"]["psnr"] + 2 and res["final"]["ssim"] > res["step0"]["ssim"]
    assert res["skipped_samples"] >= 1  # the corrupt clip
    assert json.loads((tmp_path / "results.json").read_text())["final"] == res["final"]
    assert any("vae/recon" in m for _, m in tracker.metrics)
    # the same weights and config as a safetensors folder (tests/test_safetensors.py)
    folder = from_pretrained(tmp_path / "vae")
    assert folder.cfg.latent_std == res["latent_std"]
    pt = torch.load(tmp_path / "vae.pt", weights_only=True)
    assert all(torch.equal(v, pt[k]) for k, v in folder.state_dict().items()) and folder.state_dict().keys() == pt.keys()
    # loaded back through the latent-space factory: normalised latents, the same encoder
    space = LatentConfig(kind="ours", path=str(tmp_path)).build()
    assert space.channels == 4 and space.compression == (4, 8, 8)
    clips = torch.stack([decode_sample(s, T, SIZE, None, None)[0] for s in read_shards(shards["train"][:1])])
    z = space.encode(normalize(clips))  # (6, 4, 3, 4, 4)
    assert z.shape == (6, 4, 3, 4, 4)
    assert 0.5 < z.std().item() < 2.0 and abs(z.mean().item()) < 0.5  # ~unit variance after normalisation
    assert space.decode(z).shape == clips.shape
    assert not any(p.requires_grad for p in space.parameters())
    frames = space.decode_video(z[:2])  # what eval writes as mp4
    assert frames.shape == (2, T, *SIZE, 3) and frames.dtype == torch.uint8
    # the eval stage's reconstruction metrics: the same numbers as the training stage's
    rec = evaluate_reconstruction(space, shards["val"], T, SIZE, None, max_clips=3)
    assert rec["recon/clips"] == 3
    assert rec["recon/psnr"] == pytest.approx(res["final"]["psnr"], rel=1e-3)
    assert rec["recon/ssim"] == pytest.approx(res["final"]["ssim"], rel=1e-3, abs=1e-4)


# ----- pretrained diffusers VAEs -------------------------------------------------------------
def test_diffusers_wan_vae_through_the_loader(tmp_path):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    mean, std = [0.1, -0.2, 0.3, 0.0], [2.0, 1.0, 0.5, 1.5]
    ref = AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=mean, latents_std=std)
    ref.save_pretrained(tmp_path / "repo" / "vae")
    space = LatentConfig(kind="diffusers", path=str(tmp_path / "repo"), subfolder="vae").build()
    assert type(space.model).__name__ == "AutoencoderKLWan"
    assert space.channels == 4 and space.compression == (4, 8, 8)
    x = video(8, (2, 3, T, *SIZE))
    z = space.encode(x)
    assert z.shape == (2, 4, 3, 4, 4) and z.dtype == torch.float32
    with torch.no_grad():  # Wan's own normalisation: (mu - latents_mean) / latents_std
        mu = ref.eval().encode(x).latent_dist.mode()
    torch.testing.assert_close(z, (mu - torch.tensor(mean).view(1, 4, 1, 1, 1)) / torch.tensor(std).view(1, 4, 1, 1, 1),
                               rtol=1e-4, atol=1e-5)
    assert space.decode(z).shape == x.shape
    again = load_latent_space(space.describe())  # what a latent shard or a training run records
    assert again.identity == space.identity


def test_diffusers_cogvideox_vae_uses_its_scaling_factor(tmp_path):
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(0)
    ref = AutoencoderKLCogVideoX(block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1,
                                 norm_num_groups=2, down_block_types=("CogVideoXDownBlock3D",) * 4,
                                 up_block_types=("CogVideoXUpBlock3D",) * 4, scaling_factor=0.7)
    ref.save_pretrained(tmp_path / "cog")
    space = LatentConfig(kind="diffusers", path=str(tmp_path / "cog"), class_name="AutoencoderKLCogVideoX").build()
    assert space.compression == (4, 8, 8)
    x = video(9, (1, 3, T, *SIZE))
    with torch.no_grad():
        mu = ref.eval().encode(x).latent_dist.mode()
    torch.testing.assert_close(space.encode(x), mu * 0.7, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="not a diffusers model class"):
        LatentConfig(kind="diffusers", path=str(tmp_path / "cog"), class_name="NoSuchVAE").build()


def test_diffusers_wan_vae_precomputes_shards_that_train_and_evaluate(shards, tmp_path):
    """latent=diffusers as the precompute stage calls it: a tiny 16-channel Wan VAE from a local
    directory encodes latent shards; a DiT whose in_channels follow the shards takes a training
    step on them, and evaluation's val loss and samples go through the same VAE."""
    from diffusers import AutoencoderKLWan

    from training.evaluation.evaluate import EvalConfig, sample_videos, validation_loss
    from training.clips import read_clips
    from training.flow import FlowConfig, flow_loss
    from training.model import ModelConfig
    from training.trainer import TrainConfig, check_latent_data, follow_data

    torch.manual_seed(0)
    AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                     temperal_downsample=[False, True, True]).save_pretrained(tmp_path / "wan")
    cfg = LatentConfig(kind="diffusers", path=str(tmp_path / "wan"), clips_per_shard=8, batch_size=4)
    stats = precompute_latents(cfg, {"train": shards["train"][:1]}, tmp_path / "out", T, SIZE, None,
                               log=lambda *a: None)
    assert stats["clips_in"] == 6 == stats["clips_encoded"] and stats["latent_shape"] == [16, 3, 4, 4]
    rec = json.loads((tmp_path / "out" / "latent_space.json").read_text())
    assert rec["channels"] == 16 and rec["config"]["kind"] == "diffusers" and rec["text"] is None

    tcfg = TrainConfig(num_frames=T, height=SIZE[0], width=SIZE[1], data=LoaderConfig(kind="latent"))
    mcfg = ModelConfig()
    mcfg.dit.patch_size, mcfg.dit.in_channels = [1, 2, 2], None
    check_latent_data(tcfg, mcfg, rec)
    mcfg = follow_data(tcfg, mcfg, rec)
    assert mcfg.dit.in_channels == 16
    torch.manual_seed(0)
    model = mcfg.build()
    urls = [str(tmp_path / "out" / p) for p in json.loads((tmp_path / "out" / "index.json").read_text())["train"]]
    z, caps, _ = next(Loader(ClipStream(urls, buckets=[Bucket(T, *SIZE, 3)], rank=0, world=1, seed=0,
                                        cfg=LoaderConfig(kind="latent"))))
    assert z.shape == (3, 16, 3, 4, 4)
    ids, mask = model.tokenize(caps)
    loss, _, _ = flow_loss(lambda x, t: model(x, t, ids, mask), z, FlowConfig(), generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and model.dit.final.linear.weight.grad.abs().sum() > 0  # adaLN-Zero: the last layer first

    space = load_latent_space(rec)  # what evaluation rebuilds from train_config.json's `latent`
    ecfg = EvalConfig(val_timesteps=[0.5], sample_steps=2, batch_size=2)
    clips = read_clips(shards["val"], 2, T, SIZE, None)
    val = validation_loss(model.eval(), model.tokenizer, clips, ecfg, torch.device("cpu"), space)
    assert val["val/clips"] == 2 and np.isfinite(val["val/loss"])
    frames = sample_videos(model, model.tokenizer, ["a red circle"], ecfg, (16, 3, 4, 4), 1.0,
                           torch.device("cpu"), space)
    assert frames.shape == (1, T, *SIZE, 3) and frames.dtype == torch.uint8


# ----- latent shards and the latent loader ---------------------------------------------------
@pytest.fixture(scope="module")
def clip_text(tmp_path_factory):
    """A tiny frozen open_clip text tower with fixed random weights (a local checkpoint file)."""
    from test_text import write_open_clip_checkpoint, write_open_clip_dir

    from training.text import TextEncoderConfig

    root = tmp_path_factory.mktemp("clip")
    name = write_open_clip_dir(root / "clip")
    return TextEncoderConfig(kind="open_clip", name=name, dim=64, max_length=16,
                             pretrained=write_open_clip_checkpoint(root / "text.pt", name))


@pytest.fixture(scope="module")
def latent_dir(shards, clip_text, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("latents")
    vae_dir = save_vae(root / "vae")
    cfg = LatentConfig(kind="ours", clips_per_shard=4, batch_size=3)
    precompute_latents(cfg, shards, root / "out", T, SIZE, None, text=clip_text, vae_dir=str(vae_dir))
    return root / "out"


def test_latent_shards_round_trip_and_account_for_every_clip(shards, latent_dir):
    stats = json.loads((latent_dir / "stats.json").read_text())
    assert stats["clips_in"] == 15 == stats["clips_encoded"] + stats["clips_failed"]
    assert stats["per_split"]["train"] == {"clips_in": 12, "encoded": 11, "failed": 1, "shards": 3}
    assert [(f["key"], f["reason"]) for f in stats["failed"]] == [("clip011", "decode_failed")]
    index = json.loads((latent_dir / "index.json").read_text())
    assert index == {"train": [f"shards/train-00000{i}.tar" for i in range(3)], "val": ["shards/val-000000.tar"]}
    # read back with plain WebDataset: the values are the VAE's encoding of the same clips
    urls = [str(latent_dir / p) for p in index["train"]]
    got = {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode()}
    assert len(got) == 11
    space = load_latent_space(latent_dir)  # checks the identity recorded with the shards
    src = {s["__key__"]: s for s in read_shards(shards["train"]) if s["__key__"] != "clip011"}
    keys = sorted(src)[:4]
    clips = torch.stack([decode_sample(src[k], T, SIZE, None, None)[0] for k in keys])
    z = space.encode(normalize(clips))  # (4, 4, 3, 4, 4)
    for i, k in enumerate(keys):
        np.testing.assert_array_equal(got[k]["latent.npy"], z[i].numpy())
        assert got[k]["txt"] == src[k]["txt"]
        meta = got[k]["json"]
        assert meta["video_shape"] == [T, *SIZE] and meta["latent_shape"] == [4, 3, 4, 4]
        assert meta["vae"] == space.identity and meta["start"] == 0
        assert got[k]["text.npy"].ndim == 2 and got[k]["text.npy"].shape[1] == 64  # (n, D) real tokens
    lat, cap, key = decode_latent_sample(next(read_shards(urls[:1])))
    assert lat.shape == (4, 3, 4, 4) and lat.dtype == torch.float32 and cap and key


def test_latent_loader_batches_and_resumes_exactly(latent_dir):
    urls = [str(latent_dir / p) for p in json.loads((latent_dir / "index.json").read_text())["train"]]

    def make(state=None, buckets=(Bucket(T, *SIZE, 3),)):
        return Loader(ClipStream(urls, buckets=list(buckets), rank=0, world=1, seed=4,
                                 cfg=LoaderConfig(kind="latent", shuffle_buffer=3), state=state))

    a = make()
    z, caps, keys = next(a)
    assert z.shape == (3, 4, 3, 4, 4) and z.dtype == torch.float32 and len(caps) == 3
    for _ in range(2):
        next(a)
    b = make(Loader.restore_state(json.loads(json.dumps(a.state_dict())), 0))
    for _ in range(6):  # across the epoch boundary (11 latents: batches of 3, 3, 3, 2)
        za, ca, ka = next(a)
        zb, cb, kb = next(b)
        assert ka == kb and ca == cb and torch.equal(za, zb)
    with pytest.raises(RuntimeError, match="fit a bucket"):  # shards encoded at another shape
        next(make(buckets=(Bucket(T + 4, *SIZE, 2),)))  # longer than the encoded window


def test_garbled_shards_lose_nothing_silently_in_the_latent_path(shards, latent_dir, tmp_path):
    """A garbled member header ends a tar without an error in tarfile. The latent shards carry
    sidecars, so the latent loader counts what was lost; a garbled clip shard stops the
    precompute with an error naming it instead of encoding what was left of it."""
    import shutil

    from data.shards import ShardIncomplete, write_sidecar
    from tar_damage import garble_header

    index = json.loads((latent_dir / "index.json").read_text())
    copies = []
    for p in index["train"]:  # sidecars list exactly the tars' samples
        side = json.loads((latent_dir / f"{p}.rows.json").read_text())
        keys = [s["__key__"] for s in read_shards([str(latent_dir / p)], verify=False)]
        assert [r["key"] for r in side["rows"]] == keys
        shutil.copy(latent_dir / p, tmp_path / Path(p).name)
        shutil.copy(latent_dir / f"{p}.rows.json", tmp_path / f"{Path(p).name}.rows.json")
        copies.append(str(tmp_path / Path(p).name))
    first = [s["__key__"] for s in read_shards(copies[:1], verify=False)]  # 4 latents
    garble_header(copies[0], first[1])  # 3 of its 4 latents lost
    loader = Loader(ClipStream(copies, buckets=[Bucket(T, *SIZE, 1)], rank=0, world=1, seed=0,
                               cfg=LoaderConfig(kind="latent", shuffle_buffer=2)))
    seen, counts = [], []
    while not seen or loader.last["epoch"] == 0:
        seen += next(loader)[2]
        counts.append(loader.skipped_total)
    assert len(set(seen[:-1])) == 11 - 3 and counts[-2] == 3
    loader.close()

    clip_shard = tmp_path / "clips-000000.tar"
    shutil.copy(shards["train"][0], clip_shard)
    rows = [{"key": s["__key__"]} for s in read_shards([str(clip_shard)])]
    write_sidecar(clip_shard, {"shard": clip_shard.name, "rows": rows})
    garble_header(clip_shard, rows[2]["key"])
    with pytest.raises(ShardIncomplete, match="clips-000000.tar: read 2 of the 6"):
        precompute_latents(LatentConfig(kind="ours", clips_per_shard=4, batch_size=3),
                           {"train": [str(clip_shard)]}, tmp_path / "out", T, SIZE, None,
                           vae_dir=str(save_vae(tmp_path / "vae")))


def test_stored_caption_tokens_equal_a_fresh_encode(latent_dir, clip_text):
    """The latent loader brings each clip's stored caption tokens; assembled with caption
    dropout (the empty caption's tokens from the record) they are what the frozen encoder
    gives for the same captions, so the trainer never runs it."""
    from training.latent_format import stored_text
    from training.text import encode_captions

    rec = json.loads((latent_dir / "latent_space.json").read_text())["text"]
    enc, tok = clip_text.build(), clip_text.build_tokenizer()
    assert rec["identity"] == enc.identity and (rec["dim"], rec["max_length"]) == (64, 16)
    urls = [str(latent_dir / p) for p in json.loads((latent_dir / "index.json").read_text())["train"]]
    loader = Loader(ClipStream(urls, buckets=[Bucket(T, *SIZE, 4)], rank=0, world=1, seed=0,
                               cfg=LoaderConfig(kind="latent")))
    _, caps, _ = next(loader)
    tokens = loader.last["text"]  # one (n, 64) per clip
    assert len(tokens) == 4 and all(t.shape[1] == 64 for t in tokens)
    dropped = [False, True, False, True]
    text, mask = stored_text(tokens, dropped, rec)  # (4, 16, 64), (4, 16)
    fresh, fmask = encode_captions(enc, tok, ["" if d else c for c, d in zip(caps, dropped)])
    assert text.shape == fresh.shape == (4, 16, 64) and torch.equal(mask, fmask)
    # Stored tokens were encoded in other batches than this one: float32 matmuls of another
    # batch shape round differently (1.3e-6 seen on O(1) LayerNorm outputs).
    torch.testing.assert_close(text, fresh, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="no .text.npy"):
        stored_text(None, dropped, rec)


def test_latent_training_checks_channels_and_shapes(latent_dir):
    from dataclasses import replace

    from training.model import ModelConfig
    from training.text import TextEncoderConfig
    from training.trainer import TrainConfig, check_latent_data, follow_data

    rec = json.loads((latent_dir / "latent_space.json").read_text())
    tcfg = TrainConfig(num_frames=T, height=SIZE[0], width=SIZE[1], data=LoaderConfig(kind="latent"))
    # a trained tiny encoder ignores the shards' stored tokens; a frozen one must match them
    with pytest.raises(ValueError, match="caption tokens of the open_clip encoder.*precompute them again"):
        check_latent_data(tcfg, replace(ModelConfig(), dit=replace(ModelConfig().dit, in_channels=None,
                                                                     patch_size=[1, 2, 2])), rec)
    mcfg = ModelConfig(text=TextEncoderConfig(lr_scale=0.1))
    mcfg.dit.patch_size = [1, 2, 2]
    with pytest.raises(ValueError, match=r"model.dit.in_channels \(3\) must equal the VAE's latent channels \(4"):
        check_latent_data(tcfg, mcfg, rec)
    mcfg.dit.in_channels = None  # follow the VAE
    check_latent_data(tcfg, mcfg, rec)
    assert follow_data(tcfg, mcfg, rec).dit.in_channels == 4
    mcfg.dit.in_channels = 4
    check_latent_data(tcfg, mcfg, rec)
    assert follow_data(tcfg, mcfg, rec) is mcfg
    clip = replace(mcfg, text=TextEncoderConfig(kind="open_clip", name="ViT-B-32", dim=64, max_length=32),
                   dit=replace(mcfg.dit, text_dim=64))
    with pytest.raises(ValueError, match="caption tokens of the open_clip encoder.*precompute them again"):
        check_latent_data(tcfg, clip, rec)  # the shards' tokens are 16 long
    with pytest.raises(ValueError, match="train.num_frames"):
        check_latent_data(TrainConfig(num_frames=8, data=LoaderConfig(kind="latent")), mcfg, rec)
    with pytest.raises(ValueError, match="needs the latent shards' record"):
        check_latent_data(tcfg, mcfg, None)
