"""Clip scores and filters: CPU scorers (motion/jitter/noise, blur, brightness, black frames,
text overlays, shape), the open_clip scorer (embeddings, aesthetics head, caption similarity)
on a tiny random model loaded through the real loading paths, and global near-dedup."""

import json
import math
from dataclasses import replace

import cv2
import numpy as np
import pytest
import torch

from data.synthetic import render, sample_spec
from data.video_io import encode_mp4, read_frames
from pipeline.curation.dedup import DedupConfig, find_near_duplicates, priority_order, thumbnail_embeddings
from pipeline.curation.scores import FILTERS, Bounds, ScoreConfig, apply_filters, cpu_scores, text_area

FPS = 8.0
META = {"width": 640, "height": 360}


def only(key: str, **bounds) -> ScoreConfig:
    """Every score recorded, only `key` filtering."""
    quiet = {k: Bounds(filter=False) for k, _, _ in FILTERS}
    return ScoreConfig(**{**quiet, key: Bounds(**bounds)})


def decoded(frames: np.ndarray, size: int = 64) -> np.ndarray:
    """Through H.264 and back at `size`, as curation sees a clip."""
    return read_frames(encode_mp4(frames, FPS), size=(size, size))


@pytest.fixture(scope="module")
def clips():
    """Kinds of clip -> 6 decoded 64 px clips each (24 frames)."""
    rng = np.random.default_rng(5)
    out = {k: [] for k in ("normal", "frozen", "noisy", "shuffled", "shaky")}
    for _ in range(6):
        base = render(sample_spec(rng), 24, 64, 64)  # (24, 64, 64, 3)
        out["normal"].append(decoded(base))
        out["frozen"].append(decoded(render(replace(sample_spec(rng), speed=0), 24, 64, 64)))
        noise = rng.normal(0, 15, base.shape)
        out["noisy"].append(decoded(np.clip(base + noise, 0, 255).astype(np.uint8)))
        out["shuffled"].append(decoded(base[rng.permutation(24)]))
        out["shaky"].append(decoded(np.stack([np.roll(f, tuple(rng.integers(-4, 5, 2)), axis=(0, 1)) for f in base])))
    return out


# ----------------------------------------------------------------------------- CPU scores


def test_motion_separates_frozen_normal_and_jittery(clips):
    cfg = ScoreConfig()
    verdict = {k: [apply_filters(cpu_scores(c, FPS, META, cfg), cfg) for c in v] for k, v in clips.items()}
    reasons = {k: [r[0] if r else "keep" for r in v] for k, v in verdict.items()}
    assert reasons["normal"] == ["keep"] * 6, verdict["normal"]
    assert reasons["frozen"] == ["low_motion"] * 6, verdict["frozen"]
    assert all(r in ("jittery", "noisy") for r in reasons["noisy"]), verdict["noisy"]
    assert reasons["shuffled"] == ["jittery"] * 6, verdict["shuffled"]
    assert reasons["shaky"] == ["jittery"] * 6, verdict["shaky"]
    s = [cpu_scores(c, FPS, META, cfg) for c in clips["normal"]]
    assert all(0.5 < x["motion"] < 50 and x["jitter"] < 0.25 and x["flow_residual"] < 1 for x in s), s


def test_motion_is_per_second_and_resolution_independent():
    spec = replace(sample_spec(np.random.default_rng(0)), speed=2, count=1)
    frames = render(spec, 24, 128, 128)  # 2 px/frame of 128 = 1.5625% of the width per frame
    m64 = cpu_scores(decoded(frames, 64), FPS, META, ScoreConfig())["motion"]
    m32 = cpu_scores(decoded(frames, 32), FPS, META, ScoreConfig())["motion"]
    m64_fast_fps = cpu_scores(decoded(frames, 64), 2 * FPS, META, ScoreConfig())["motion"]
    assert m64 == pytest.approx(m32, rel=0.35) and m64_fast_fps == pytest.approx(2 * m64)


def test_blur_lowers_sharpness(clips):
    cfg = ScoreConfig()
    for c in clips["normal"]:
        blurred = np.stack([cv2.GaussianBlur(f, (0, 0), 1.5) for f in c])
        assert cpu_scores(blurred, FPS, META, cfg)["sharpness"] < 0.5 * cpu_scores(c, FPS, META, cfg)["sharpness"]
    strict = only("sharpness", min=1e9)
    assert apply_filters(cpu_scores(clips["normal"][0], FPS, META, strict), strict)[0] == "blurry"


def test_black_frames_and_brightness(clips):
    cfg = ScoreConfig()
    c = clips["normal"][0].copy()
    c[:12] = 3  # half the clip is black (codec-level noise, not exact zeros)
    s = cpu_scores(c, FPS, META, cfg)
    assert s["black_fraction"] == pytest.approx(0.5)
    assert apply_filters(s, only("black_fraction", max=0.25))[0] == "black_frames"
    # a small bright shape on a black background is not a black frame
    rng = np.random.default_rng(1)
    dark = replace(sample_spec(rng), background="black", count=1, shape="triangle")
    assert cpu_scores(decoded(render(dark, 24, 64, 64)), FPS, META, cfg)["black_fraction"] == 0.0
    washed = np.full((24, 64, 64, 3), 252, np.uint8)
    washed[:, ::8] = 240
    assert apply_filters(cpu_scores(washed, FPS, META, cfg), cfg)[0] == "too_bright"


def caption_frames(n: int, seed: int, size: int = 256) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """n plain synthetic frames and the same frames with a cv2.putText caption."""
    words = "the quick brown fox jumps over lazy dog breaking news live 2024 hello world subscribe".split()
    rng = np.random.default_rng(seed)
    plain, texted = [], []
    for _ in range(n):
        f = render(sample_spec(rng), 1, size, size)[0]  # (S, S, 3)
        t = f.copy()
        text = " ".join(rng.choice(words, int(rng.integers(1, 4))))
        scale, thick = float(rng.uniform(0.45, 0.9)), int(rng.integers(1, 3))
        (w, h), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
        x = int(rng.integers(0, max(1, size - w)))
        y = int(rng.integers(int(0.75 * size), size - 6))  # subtitle band
        color = (255, 255, 255) if rng.random() < 0.5 else (255, 255, 0)
        cv2.putText(t, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, color, thick, cv2.LINE_AA)
        plain.append(f)
        texted.append(t)
    return plain, texted


def test_text_overlay_detection():
    plain, texted = caption_frames(40, seed=0)
    gray = lambda f: cv2.cvtColor(f, cv2.COLOR_RGB2GRAY)  # noqa: E731
    correct = sum(text_area(gray(f)) == 0 for f in plain) + sum(text_area(gray(f)) > 0.002 for f in texted)
    assert correct >= 0.95 * 80, correct
    # through cpu_scores: keyframes carry the text, the 64 px frames would be too small for it
    cfg = only("text", max=0.002)
    small = np.stack([cv2.resize(f, (64, 64), interpolation=cv2.INTER_AREA) for f in texted[:4]])
    s = cpu_scores(small, FPS, META, cfg, keyframes=np.stack(texted[:4]))
    assert s["text"] > 0.002 and apply_filters(s, cfg)[0] == "text_overlay"
    assert "text" not in cpu_scores(small, FPS, META, cfg)  # too small to score: left out, not 0
    assert apply_filters(cpu_scores(small, FPS, META, cfg, keyframes=np.stack(plain[:4])), cfg) is None


def test_shape_scores_and_every_score_recorded(clips):
    c = clips["normal"][0]
    quiet = only("text")  # nothing filters at 64 px: text is not scored there
    s = cpu_scores(c, FPS, {"width": 20, "height": 90}, quiet)
    assert s["seconds"] == 3.0 and s["num_frames"] == 24 and s["short_side"] == 20 and s["aspect"] == pytest.approx(2 / 9)
    expected = {"seconds", "short_side", "long_side", "aspect", "black_fraction", "brightness", "motion",
                "jitter", "flow_residual", "noise", "sharpness", "num_frames", "width", "height"}
    assert set(s) == expected  # text needs >= 96 px frames
    assert apply_filters(s, quiet) is None  # recorded, not filtered
    strict = ScoreConfig()
    assert apply_filters(s, strict) == ("low_resolution", "short_side 20 < 32")
    assert apply_filters({**s, "short_side": 64}, strict)[0] == "bad_aspect_ratio"
    assert apply_filters(cpu_scores(c[:4], FPS, META, strict), strict)[0] == "too_short"
    off = ScoreConfig(motion=Bounds(enabled=False), jitter=Bounds(enabled=False), flow_residual=Bounds(enabled=False))
    assert not {"motion", "jitter", "flow_residual"} & set(cpu_scores(c, FPS, META, off))


def test_filters_order_missing_scores_and_dict_config():
    cfg = ScoreConfig(aesthetic={"min": 5.0}, clip_score={"min": 0.2})  # as plain YAML gives them
    assert isinstance(cfg.aesthetic, Bounds) and cfg.aesthetic.min == 5.0
    assert apply_filters({"seconds": 3.0}, cfg) is None  # scores not computed yet are skipped
    assert apply_filters({"seconds": 3.0, "aesthetic": 4.0}, cfg) == ("low_aesthetic", "aesthetic 4 < 5.0")
    assert apply_filters({"aesthetic": 6.0, "clip_score": 0.1}, cfg)[0] == "caption_mismatch"
    assert apply_filters({"clip_score": math.nan}, cfg) is None  # no caption: nothing to judge
    # the most basic reason wins: a 0.5 s frozen clip is too short, not low-motion
    assert apply_filters({"seconds": 0.5, "motion": 0.0}, cfg)[0] == "too_short"


MEDIA = __import__("pathlib").Path(__file__).parent / "media"


def test_real_clips_pass_the_default_filters_and_synthetic_noise_does_not(clips):
    """The real clips shipped in tests/media (hand-held, fast pans, animation; see its README)
    through the curation path with the default config: every span of 1 s or more is kept.
    The old defaults kept 3 of these 9 (flow_residual > 2 took the hand-held clips as noisy,
    grass read as text). Noise added to synthetic clips stays over the noise bound."""
    from data.probe import probe_file
    from pipeline.curation.curate import CurateConfigs, analyse_video
    from pipeline.submit import compose_run_config

    cfg, _ = compose_run_config([])
    c = CurateConfigs(ingest=cfg.ingest, probe=cfg.probe, shots=cfg.shots, scores=cfg.scores,
                      curate=cfg.curate, cache_dir="")
    files = sorted(MEDIA.glob("*.mp4"))
    assert len(files) == 4
    records = []
    for f in files:
        info = probe_file(str(f), cfg.probe)
        records += [r for r in analyse_video({"id": f.stem, "url": str(f)}, str(f), info, c)["records"]
                    if r["kind"] != "video"]
    kept = [r for r in records if r["kind"] == "clip"]
    rejected = [(r["source_id"], r["reason"], r["detail"]) for r in records if r["kind"] == "reject"]
    assert rejected == [("bikes", "too_short", "8 frames < 25")], rejected  # its last 0.3 s shot
    assert len(kept) == 9 and {r["source_id"] for r in kept} == {f.stem for f in files}
    assert max(r["scores"]["flow_residual"] for r in kept) > 2.0  # what the old bound rejected
    assert max(r["scores"]["noise"] for r in kept) < cfg.scores.noise.max
    noisy = [cpu_scores(x, FPS, META, cfg.scores) for x in clips["noisy"]]
    assert all(x["noise"] > cfg.scores.noise.max for x in noisy), [x["noise"] for x in noisy]


# ----------------------------------------------------------------------------- open_clip scorer

TINY_CLIP = {"embed_dim": 32,
             "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random open_clip model saved in open_clip's local-dir layout (config + weights)."""
    import open_clip

    d = tmp_path_factory.mktemp("tiny_clip")
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{d}")  # random init: no weights in the dir yet
    torch.save(model.state_dict(), d / "open_clip_pytorch_model.bin")
    return d, model.eval()


@pytest.fixture(scope="module")
def laion_head(tmp_path_factory):
    """A random head in the LAION improved-aesthetic-predictor layout (linears at 0, 2, 4, 6, 7)."""
    torch.manual_seed(1)
    dims = [32, 64, 16, 8, 4, 1]
    sd = {}
    for idx, (a, b) in zip((0, 2, 4, 6, 7), zip(dims[:-1], dims[1:])):
        sd[f"layers.{idx}.weight"], sd[f"layers.{idx}.bias"] = torch.randn(b, a) / a**0.5, torch.randn(b)
    path = tmp_path_factory.mktemp("head") / "sac+logos+ava1-tiny-linearMSE.pth"
    torch.save(sd, path)
    return path, sd


def _frames_batch(n: int, k: int = 3, size: int = 48, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([render(sample_spec(rng), 8, size, size)[::8 // k][:k] for _ in range(n)])  # (n, k, S, S, 3)


def test_clip_scorer_local_dir_shapes_head_and_similarity(clip_dir, laion_head, one_thread):
    from pipeline.curation.embed import EmbedConfig, preprocess

    d, model = clip_dir
    head_path, sd = laion_head
    cfg = EmbedConfig(model=f"local-dir:{d}", pretrained=None, aesthetic_head=str(head_path), device="cpu")
    scorer = cfg.build()
    frames = _frames_batch(4)  # (4, 3, 48, 48, 3)
    captions = np.array(["one red circle moving left", "", "two blue squares", "three white triangles"], dtype=object)
    out = scorer({"frames": frames, "caption": captions, "clip_id": np.array(["a", "b", "c", "d"])})
    assert set(out) == {"caption", "clip_id", "embedding", "aesthetic", "clip_score"}  # frames dropped
    assert out["embedding"].shape == (4, 32) and out["embedding"].dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out["embedding"], axis=1), 1.0, rtol=1e-5)
    # the weights are the saved ones, loaded back through local-dir (not a fresh random init)
    with torch.no_grad():
        x = preprocess(torch.from_numpy(frames.reshape(-1, 48, 48, 3)), 32, scorer.mean, scorer.std)
        ref = torch.nn.functional.normalize(model.encode_image(x), dim=-1).view(4, 3, 32)  # (4, 3, 32)
    np.testing.assert_allclose(out["embedding"], torch.nn.functional.normalize(ref.mean(1), dim=-1).numpy(), atol=1e-5)
    # aesthetic = the LAION MLP (no activations) on each normalised frame embedding, averaged
    h = ref
    for idx in (0, 2, 4, 6, 7):
        h = h @ sd[f"layers.{idx}.weight"].T + sd[f"layers.{idx}.bias"]
    np.testing.assert_allclose(out["aesthetic"], h.squeeze(-1).mean(1).numpy(), atol=1e-5)
    # caption similarity: a cosine, NaN without a caption, deterministic
    cs = out["clip_score"]
    assert cs.shape == (4,) and math.isnan(cs[1]) and np.all(np.abs(cs[[0, 2, 3]]) <= 1.0)
    again = scorer({"frames": frames, "caption": captions})
    np.testing.assert_array_equal(again["clip_score"], cs)
    np.testing.assert_array_equal(again["embedding"], out["embedding"])
    # clips of different sizes arrive as an object array; each is preprocessed on its own
    ragged = np.empty(2, dtype=object)
    ragged[0], ragged[1] = frames[0], _frames_batch(1, size=80, seed=0)[0]
    emb = scorer({"frames": ragged})["embedding"]
    assert emb.shape == (2, 32) and np.allclose(emb[0], out["embedding"][0], atol=1e-5)


def test_clip_scorer_named_model_with_local_checkpoint(clip_dir, tmp_path, one_thread):
    """A registered model name + `pretrained` = a local checkpoint file (the built-in-name path)."""
    import open_clip

    from pipeline.curation.embed import EmbedConfig

    d, model = clip_dir
    cfg_file = tmp_path / "spacetime-tiny-clip.json"
    cfg_file.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(cfg_file)
    ckpt = tmp_path / "weights.pt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    frames = _frames_batch(2)
    named = EmbedConfig(model="spacetime-tiny-clip", pretrained=str(ckpt), caption_similarity=False).build()
    local = EmbedConfig(model=f"local-dir:{d}", pretrained=None, caption_similarity=False).build()
    out = named({"frames": frames})
    assert set(out) == {"embedding"}
    np.testing.assert_allclose(out["embedding"], local({"frames": frames})["embedding"], atol=1e-6)


def test_aesthetic_head_formats_and_hub_resolution(tmp_path, monkeypatch, laion_head):
    import huggingface_hub.constants as hub

    from pipeline.curation.embed import AestheticHead, load_aesthetic_head, resolve_weights

    x = torch.nn.functional.normalize(torch.randn(5, 32), dim=-1)
    # the original LAION linear predictor: a bare nn.Linear state dict, here as safetensors
    from safetensors.torch import save_file

    w, b = torch.randn(1, 32), torch.randn(1)
    save_file({"weight": w, "bias": b}, tmp_path / "linear.safetensors")
    head = load_aesthetic_head(str(tmp_path / "linear.safetensors"))
    torch.testing.assert_close(head(x), (x @ w.T + b).squeeze(-1))
    # our MLP with activations round-trips through its own state dict
    mlp = AestheticHead([32, 16, 1], "relu")
    again = AestheticHead.from_state_dict(mlp.state_dict(), "relu")
    torch.testing.assert_close(again(x), mlp(x))
    with pytest.raises(ValueError, match="no linear layers"):
        AestheticHead.from_state_dict({"scale": torch.ones(3)})
    # a hub file: resolved through huggingface_hub's cache, offline (a pre-filled cache, no network)
    path, _ = laion_head
    commit = "0" * 40
    snap = tmp_path / "hub" / "models--laion--tiny-aesthetic" / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / path.name).write_bytes(path.read_bytes())
    (tmp_path / "hub" / "models--laion--tiny-aesthetic" / "refs").mkdir()
    (tmp_path / "hub" / "models--laion--tiny-aesthetic" / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    for spec in (f"laion/tiny-aesthetic/{path.name}", f"hf-hub:laion/tiny-aesthetic/{path.name}"):
        assert resolve_weights(spec) == str(snap / path.name)
    assert load_aesthetic_head(f"laion/tiny-aesthetic/{path.name}").linears[0].in_features == 32
    with pytest.raises(FileNotFoundError, match="not a hub file"):
        resolve_weights(str(tmp_path / "missing.pth"))


def test_embed_config_errors(clip_dir, tmp_path):
    from pipeline.curation.embed import AestheticHead, EmbedConfig

    with pytest.raises(ValueError, match="aesthetic_activation"):
        EmbedConfig(aesthetic_activation="tanh")
    torch.save(AestheticHead([768, 1]).state_dict(), tmp_path / "l14.pth")
    d, _ = clip_dir
    with pytest.raises(ValueError, match="768-d embeddings, model .* gives 32-d"):
        EmbedConfig(model=f"local-dir:{d}", pretrained=None, aesthetic_head=str(tmp_path / "l14.pth")).build()


# ----------------------------------------------------------------------------- near-duplicates


def greedy_reference(ids, emb, priority, threshold):
    """The rule, written the slow obvious way."""
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    kept, dropped = [], {}
    for i in priority_order(ids, priority):
        sims = [(float(emb[i] @ emb[j]), j) for j in kept]
        best = max(sims, default=(-2.0, -1))
        if best[0] >= threshold:
            dropped[ids[i]] = ids[best[1]]
        else:
            kept.append(i)
    return dropped


@pytest.mark.parametrize("block,chunk", [(1024, 65536), (3, 2), (7, 5)])
def test_dedup_blocked_equals_reference(block, chunk):
    rng = np.random.default_rng(block)
    centres = rng.normal(size=(12, 16))
    emb = np.concatenate([centres, centres[rng.integers(0, 12, 40)] + rng.normal(0, 0.12, (40, 16))])  # (52, 16)
    ids = [f"c{i:03d}" for i in rng.permutation(len(emb))]
    priority = rng.integers(0, 4, len(emb)).astype(float)  # many ties: broken by id
    got = find_near_duplicates(ids, emb, DedupConfig(threshold=0.97, block_size=block, chunk_size=chunk), priority)
    ref = greedy_reference(ids, emb, priority, 0.97)
    assert {d["clip_id"]: d["kept"] for d in got} == ref and len(ref) >= 10
    assert all(d["similarity"] >= 0.97 and d["reason"] == "near_duplicate" for d in got)


def test_dedup_finds_copies_across_batches(tmp_path):
    """Re-encoded, brightened and exact copies of clips, spread over different batches, are found by
    one global pass; exactly one clip per group is kept, the highest-priority one."""
    rng = np.random.default_rng(11)
    originals = [render(sample_spec(rng), 16, 64, 64)[::4] for _ in range(24)]  # 24 x (4, 64, 64, 3)
    clips = {f"orig-{i:02d}": c for i, c in enumerate(originals)}
    groups = {}
    for i in range(0, 6):
        clips[f"reenc-{i:02d}"] = read_frames(encode_mp4(originals[i], FPS, crf=32))
        groups[f"orig-{i:02d}"] = [f"orig-{i:02d}", f"reenc-{i:02d}"]
    for i in range(6, 12):
        clips[f"bright-{i:02d}"] = np.clip(originals[i].astype(int) + 12, 0, 255).astype(np.uint8)
        groups[f"orig-{i:02d}"] = [f"orig-{i:02d}", f"bright-{i:02d}"]
    for i in range(12, 15):
        clips[f"copy-{i:02d}"] = originals[i].copy()
        clips[f"copy2-{i:02d}"] = originals[i].copy()
        groups[f"orig-{i:02d}"] = [f"orig-{i:02d}", f"copy-{i:02d}", f"copy2-{i:02d}"]
    ids = list(clips)
    order = rng.permutation(len(ids))  # copies land in other batches than their originals
    ids = [ids[i] for i in order]
    batches = [ids[i : i + 8] for i in range(0, len(ids), 8)]
    emb = np.concatenate([thumbnail_embeddings(np.stack([clips[c] for c in b])) for b in batches])
    ids = [c for b in batches for c in b]
    priority = np.array([2.0 if c.startswith(("reenc", "bright")) else 1.0 for c in ids])  # prefer the copies
    dropped = find_near_duplicates(ids, emb, DedupConfig(threshold=DedupConfig().thumb_threshold, block_size=5), priority)
    by_id = {d["clip_id"]: d["kept"] for d in dropped}
    kept = set(ids) - set(by_id)
    for members in groups.values():
        assert len(kept & set(members)) == 1, members
        winner = (kept & set(members)).pop()
        assert all(by_id[m] == winner for m in members if m != winner)
    assert {by_id[f"orig-{i:02d}"] for i in range(12)} == {f"reenc-{i:02d}" for i in range(6)} | {
        f"bright-{i:02d}" for i in range(6, 12)}
    # equal priority: the smallest id wins ("copy-" < "copy2-" < "orig-")
    assert {f"copy-{i:02d}" for i in range(12, 15)} | {f"orig-{i:02d}" for i in range(15, 24)} <= kept
    assert len(dropped) == 6 + 6 + 6
    assert find_near_duplicates(ids, emb, DedupConfig(enabled=False)) == []


def test_default_thumbnail_dedup_separates_labelled_copies_from_different_videos():
    """Labelled pairs (`data.duplicates`): re-encodes (other codec, quality, size), crops, trims
    and brightened copies of a video against renders of other videos on the same backgrounds
    (bars, gradients, noise). At the default threshold every different-video pair stays apart
    and nearly every copy is found; the whole-dataset pass drops no good clip."""
    from data.duplicates import build_set, precision_recall

    cfg = DedupConfig()
    clips, true, false = build_set(10, seed=7)
    ids = sorted(clips)
    emb = dict(zip(ids, thumbnail_embeddings([clips[i] for i in ids])))
    st = np.array([emb[a] @ emb[b] for a, b in true])
    sf = np.array([emb[a] @ emb[b] for a, b in false])
    precision, recall = precision_recall(st, sf, cfg.thumb_threshold)
    assert precision == 1.0 and recall >= 0.95, (precision, recall, sf.max(), np.sort(st)[:3])
    assert sf.max() < cfg.thumb_threshold - 0.05  # a margin on the side of keeping good clips
    dropped = find_near_duplicates(ids, np.stack([emb[i] for i in ids]),
                                   replace(cfg, threshold=cfg.thumb_threshold))
    assert all(d["clip_id"].split("-")[0] == d["kept"].split("-")[0] for d in dropped)
    assert len(dropped) >= 0.95 * len(true)


def test_clip_scorer_in_a_ray_actor_pool(clip_dir):
    """The scorer as curation runs it: constructed once per actor, fed Ray Data numpy batches."""
    import ray

    from pipeline.curation.embed import ClipScorer, EmbedConfig

    d, _ = clip_dir
    cfg = EmbedConfig(model=f"local-dir:{d}", pretrained=None, device="cpu")
    frames = _frames_batch(6)  # (6, 3, 48, 48, 3)
    rows = [{"clip_id": f"c{i}", "frames": frames[i], "caption": f"clip {i}" if i % 2 else ""} for i in range(6)]
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ds = ray.data.from_items(rows).map_batches(
            ClipScorer, fn_constructor_kwargs={"cfg": cfg}, batch_size=4, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1)
        out = sorted(ds.take_all(), key=lambda r: r["clip_id"])
    finally:
        if started:
            ray.shutdown()
    local = cfg.build()({"frames": frames, "caption": np.array([r["caption"] for r in rows], dtype=object)})
    assert [r["clip_id"] for r in out] == [f"c{i}" for i in range(6)] and "frames" not in out[0]
    np.testing.assert_allclose(np.stack([r["embedding"] for r in out]), local["embedding"], atol=1e-5)
    got = np.array([r["clip_score"] for r in out])
    assert np.isnan(got[::2]).all() and np.allclose(got[1::2], local["clip_score"][1::2], atol=1e-5)
