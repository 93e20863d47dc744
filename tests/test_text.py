"""Text encoders (tiny, open_clip, T5), their tokenizers, freezing, the text-embedding cache and
the text-width checks. Every encoder here is random-initialised from a local config; a socket
guard proves nothing reaches the network."""

import json
import os
import socket

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from training.dit import DiTConfig
from training.model import ModelConfig
from training.text import (
    OpenCLIPTextEncoder,
    T5TextEncoder,
    TextEmbeddingCache,
    TextEncoderConfig,
    TinyTextEncoder,
    Tokenizer,
    encode_captions,
    tokenize,
)

CAPTIONS = ["", "a red car driving on the road", "a blue dog runs", "a red car driving on the road"]
T5_WORDS = ["<pad>", "</s>", "<unk>"] + "a red car driving on the road blue dog runs".split()


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] or kwargs}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def write_open_clip_dir(path, width: int = 64) -> str:
    """A tiny open_clip model config in open_clip's local-dir layout; returns its model name."""
    cfg = {"model_cfg": {"embed_dim": 32,
                         "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
                         "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": width, "heads": 2, "layers": 2}}}
    path.mkdir(parents=True, exist_ok=True)
    (path / "open_clip_config.json").write_text(json.dumps(cfg))
    return f"local-dir:{path}"


def write_open_clip_checkpoint(path, name: str, seed: int = 0) -> str:
    """Random weights for the text tower of open_clip model `name`, saved as a local checkpoint
    file (model.text.pretrained): every build from it has the same weights and identity."""
    torch.manual_seed(seed)
    enc = TextEncoderConfig(kind="open_clip", name=name, dim=64, max_length=16).build()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(enc.tower.state_dict(), path)
    return str(path)


def write_t5_dir(path, seed: int = 0, d_model: int = 32) -> str:
    """A tiny random T5 encoder + a word-level tokenizer, saved as `save_pretrained` would for a real one."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    raw = RawTokenizer(models.WordLevel({w: i for i, w in enumerate(T5_WORDS)}, unk_token="<unk>"))
    raw.normalizer = normalizers.Lowercase()
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])  # like T5
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(seed)
    model = T5EncoderModel(T5Config(vocab_size=len(T5_WORDS), d_model=d_model, d_kv=8, d_ff=64, num_layers=2,
                                    num_heads=4, dropout_rate=0.1))
    tok.save_pretrained(path)
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def clip_name(tmp_path_factory):
    return write_open_clip_dir(tmp_path_factory.mktemp("open_clip"))


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return write_t5_dir(tmp_path_factory.mktemp("t5"))


def clip_cfg(name, **kw) -> TextEncoderConfig:
    return TextEncoderConfig(**{"kind": "open_clip", "name": name, "dim": 64, "max_length": 16, **kw})


def t5_cfg(name, **kw) -> TextEncoderConfig:
    return TextEncoderConfig(**{"kind": "t5", "name": name, "dim": 32, "max_length": 8, **kw})


def assert_frozen(enc):
    assert not enc.trainable and enc.identity
    assert all(not p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training and not any(m.training for m in enc.modules())


# ------------------------------------------------------------------ tiny encoder and CLIP tokenizer


def test_tokenizer_empty_and_long_captions():
    tok = Tokenizer(max_length=16)
    ids, mask = tok(["", "a red car", "word " * 100])
    assert ids.shape == mask.shape == (3, 16) and ids.dtype == torch.long and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [2, 5, 16]
    assert ids[0, 0] == tok.sot_id and ids[0, 1] == tok.eot_id and ids[2, -1] == tok.eot_id
    assert tok.vocab_size == 49408
    ids2, mask2 = tokenize(["a red car"], max_length=16)
    assert torch.equal(ids2[0], ids[1]) and torch.equal(mask2[0], mask[1])


def test_text_encoder_empty_caption_and_padding():
    torch.manual_seed(0)
    cfg = TextEncoderConfig(lr_scale=0.1)  # the trained variant: gradients must flow
    enc = TinyTextEncoder(cfg)
    assert enc.trainable and enc.out_dim == cfg.dim
    ids, mask = tokenize(["", "a dog running on the beach"], max_length=cfg.max_length)
    out, out_mask = enc(ids, mask)
    assert out.shape == (2, cfg.max_length, cfg.dim) and torch.equal(out_mask, mask)
    assert torch.isfinite(out).all()
    out.pow(2).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in enc.parameters() if p.grad is not None)
    # an all-False mask is guarded too
    out_none, _ = enc(ids, torch.zeros_like(mask))
    assert torch.isfinite(out_none).all()
    # padding length does not change the real tokens' features
    ids16, mask16 = tokenize(["", "a dog running on the beach"], max_length=16)
    with torch.no_grad():
        short, _ = enc(ids16, mask16)
        full, _ = enc(ids, mask)
    assert torch.allclose(short[mask16], full[mask], atol=1e-5)


# ------------------------------------------------------------------ open_clip


def test_open_clip_builtin_model_random_init_offline(no_network):
    cfg = TextEncoderConfig(kind="open_clip", name="ViT-B-32", dim=512, max_length=77)
    torch.manual_seed(0)
    enc = cfg.build()
    assert isinstance(enc, OpenCLIPTextEncoder) and enc.out_dim == 512
    assert not hasattr(enc, "visual") and sum(p.numel() for p in enc.parameters()) < 70e6  # text tower only
    assert_frozen(enc)
    ids, mask = cfg.build_tokenizer()(CAPTIONS[:2])
    assert ids.shape == (2, 77) and mask.sum(1).tolist()[0] == 2
    out, out_mask = enc(ids, mask)
    assert out.shape == (2, 77, 512) and out.dtype == torch.float32 and not out.requires_grad
    assert out[~mask].abs().max() == 0 and out[mask].abs().mean() > 0.1


def test_open_clip_local_checkpoint_file(tmp_path, clip_name, no_network):
    torch.manual_seed(0)
    source = clip_cfg(clip_name).build()
    # a full CLIP checkpoint as training scripts write it: wrapped, DDP "module." prefix, vision keys too
    sd = {f"module.{k}": v for k, v in source.tower.state_dict().items()}
    sd.update({"module.visual.proj": torch.randn(64, 32), "module.logit_scale": torch.tensor(4.6)})
    ckpt = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "state_dict": sd}, ckpt)
    torch.manual_seed(123)  # a different random init is overwritten by the checkpoint
    loaded = clip_cfg(clip_name, pretrained=str(ckpt)).build()
    torch.manual_seed(123)
    other = clip_cfg(clip_name).build()
    ids, mask = clip_cfg(clip_name).build_tokenizer()(CAPTIONS)
    a, b, c = source(ids, mask)[0], loaded(ids, mask)[0], other(ids, mask)[0]
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert loaded.identity.endswith(source.identity.split("|")[-1])  # same weights, same fingerprint
    assert other.identity.split("|")[-1] != source.identity.split("|")[-1]


def test_open_clip_config_errors(clip_name):
    with pytest.raises(ValueError, match="model.text.name"):
        TextEncoderConfig(kind="open_clip", dim=64)
    with pytest.raises(ValueError, match="unknown open_clip model"):
        TextEncoderConfig(kind="open_clip", name="ViT-Q-99", dim=64).build()
    with pytest.raises(ValueError, match="model.text.max_length=100"):
        clip_cfg(clip_name, max_length=100).build()
    with pytest.raises(ValueError, match="model.text.dim=128.*64-wide.*model.dit.text_dim=64"):
        clip_cfg(clip_name, dim=128).build()


# ------------------------------------------------------------------ T5


def test_t5_from_local_directory(t5_dir, no_network):
    cfg = t5_cfg(t5_dir)
    enc = cfg.build()
    assert isinstance(enc, T5TextEncoder) and enc.out_dim == 32
    assert_frozen(enc)
    ids, mask = cfg.build_tokenizer()(["", "a red car driving on the road blue dog runs", "a RED zebra"])
    assert ids.shape == (3, 8) and mask.sum(1).tolist() == [1, 8, 4]  # "" -> </s>; truncated; unknown word
    assert ids[0, 0] == 1 and ids[1, -1] == 1 and ids[2].tolist()[:4] == [3, 4, 2, 1]  # </s> kept when truncating
    out, _ = enc(ids, mask)
    again, _ = enc(ids, mask)  # dropout 0.1 in the config: identical only because eval mode sticks
    assert out.shape == (3, 8, 32) and torch.equal(out, again) and out[~mask].abs().max() == 0


@pytest.mark.parametrize("kind", ["open_clip", "t5"])
def test_frozen_token_features_do_not_depend_on_padding(kind, clip_name, t5_dir):
    cfg = clip_cfg(clip_name) if kind == "open_clip" else t5_cfg(t5_dir)
    enc, tok = cfg.build(), cfg.build_tokenizer()
    caps = ["a red car", "a blue dog runs"]
    short, m_short = enc(*tok(caps, max_length=6))
    long, m_long = enc(*tok(caps, max_length=8))
    assert m_short.sum() == m_long.sum()
    assert torch.allclose(short[m_short], long[m_long], atol=1e-5)


# ------------------------------------------------------------------ the model with a frozen encoder


def test_frozen_encoder_gets_no_gradient_and_no_optimizer_state(t5_dir):
    torch.manual_seed(0)
    mcfg = ModelConfig(dit=DiTConfig.from_preset("tiny", depth=1, text_dim=32), text=t5_cfg(t5_dir))
    model = mcfg.build().train()
    assert not model.text_encoder.training and model.dit.training
    trainable = model.trainable_parameters()
    assert {id(p) for p in trainable} == {id(p) for p in model.dit.parameters()}
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    enc_before = {k: v.clone() for k, v in model.text_encoder.state_dict().items()}
    dit_before = {k: v.clone() for k, v in model.dit.state_dict().items()}
    ids, mask = model.tokenize(CAPTIONS[:2])
    x = torch.randn(2, 3, 2, 8, 8)
    model(x, torch.rand(2), ids, mask).pow(2).mean().backward()
    assert all(p.grad is None for p in model.text_encoder.parameters())
    opt.step()
    assert all(torch.equal(v, model.text_encoder.state_dict()[k]) for k, v in enc_before.items())
    assert any(not torch.equal(v, model.dit.state_dict()[k]) for k, v in dit_before.items())
    assert len(opt.state) == sum(p.grad is not None for p in trainable)
    # encoded text passed directly gives the same velocity as ids
    model.eval()
    text, text_mask = model.encode_captions(CAPTIONS[:2])
    t = torch.tensor([0.3, 0.6])
    assert torch.equal(model(x, t, ids, mask), model(x, t, text=text, text_mask=text_mask))
    with pytest.raises(ValueError, match="either ids/mask"):
        model(x, t, ids, mask, text=text, text_mask=text_mask)


def test_text_width_mismatch_names_both_keys(t5_dir):
    with pytest.raises(ValueError, match=r"model.dit.text_dim \(64\) must equal model.text.dim \(32\)"):
        ModelConfig(dit=DiTConfig(text_dim=64), text=t5_cfg(t5_dir))
    with pytest.raises(ValueError, match="model.text.dim=64.*32-wide.*model.dit.text_dim=32"):
        ModelConfig(dit=DiTConfig(text_dim=64), text=t5_cfg(t5_dir, dim=64)).build()


def test_config_errors():
    with pytest.raises(ValueError, match="valid kinds: tiny, open_clip, t5"):
        TextEncoderConfig(kind="bert")
    with pytest.raises(ValueError, match="model.text.pretrained is for open_clip"):
        TextEncoderConfig(kind="t5", name="x", pretrained="y")
    with pytest.raises(ValueError, match="cache needs a frozen encoder"):
        TextEncoderConfig(kind="tiny", lr_scale=0.1, cache_size=10)
    with pytest.raises(ValueError, match="model.text.precision"):
        TextEncoderConfig(kind="t5", name="x", precision="int8")


def test_hydra_text_options_set_both_widths():
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException

    from pipeline.config import CONF_DIR, register, to_object

    register()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        for option, kind, dim in (("open_clip", "open_clip", 1024), ("t5", "t5", 4096)):
            cfg = to_object(compose("config", overrides=["model=small", f"+model/text={option}"]))
            assert cfg.model.text.kind == kind and cfg.model.text.dim == cfg.model.dit.text_dim == dim
            assert cfg.model.dit.hidden_size == 384  # the size preset is kept
        with pytest.raises((ValueError, ConfigCompositionException)):
            to_object(compose("config", overrides=["model=small", "+model/text=t5", "model.dit.text_dim=512"]))


# ------------------------------------------------------------------ text-embedding cache


def count_calls(enc):
    calls = []
    enc.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    return calls


def test_cache_matches_uncached_and_skips_repeats(t5_dir):
    cfg = t5_cfg(t5_dir, cache_size=16)
    enc, tok = cfg.build(), cfg.build_tokenizer()
    cache = cfg.build_cache()
    calls = count_calls(enc)
    ref, ref_mask = encode_captions(enc, tok, CAPTIONS)
    assert calls == [4]
    got, got_mask = encode_captions(enc, tok, CAPTIONS, cache)
    assert calls == [4, 3]  # the repeated caption is encoded once
    assert torch.equal(got_mask, ref_mask) and torch.allclose(got, ref, atol=1e-6)
    again, _ = encode_captions(enc, tok, list(reversed(CAPTIONS)), cache)
    assert calls == [4, 3] and torch.allclose(again, ref.flip(0), atol=1e-6)
    assert cache.hits == 3 and cache.misses == 3  # per distinct caption


def test_cache_lru_eviction_and_disk(tmp_path, t5_dir):
    cfg = t5_cfg(t5_dir)
    enc, tok = cfg.build(), cfg.build_tokenizer()
    calls = count_calls(enc)
    cache = TextEmbeddingCache(capacity=2, directory=str(tmp_path / "cache"))
    encode_captions(enc, tok, ["a red car", "a blue dog", "the road"], cache)
    assert len(cache) == 2 and cache.get(cache.key(enc.identity, "a red car")) is not None  # from disk
    mem_only = TextEmbeddingCache(capacity=2)
    encode_captions(enc, tok, ["a red car", "a blue dog", "the road"], mem_only)
    assert mem_only.get(mem_only.key(enc.identity, "a red car")) is None  # evicted, least recently used
    fresh = TextEmbeddingCache(capacity=8, directory=str(tmp_path / "cache"))  # a new process, same dir
    n = len(calls)
    text, mask = encode_captions(enc, tok, ["the road", "a red car"], fresh)
    assert len(calls) == n and fresh.hits == 2 and mask.sum(1).tolist() == [3, 4]


def test_cache_never_mixes_encoders(tmp_path, t5_dir):
    other_dir = write_t5_dir(tmp_path / "t5b", seed=1)
    a, b = t5_cfg(t5_dir).build(), t5_cfg(other_dir).build()
    assert a.identity != b.identity  # different weights
    assert t5_cfg(t5_dir).build().identity == a.identity  # same source, same weights
    assert t5_cfg(t5_dir, max_length=6).build().identity != a.identity  # truncation changes embeddings
    tok = t5_cfg(t5_dir).build_tokenizer()
    cache = TextEmbeddingCache(8)
    ea, _ = encode_captions(a, tok, ["a red car"], cache)
    eb, _ = encode_captions(b, tok, ["a red car"], cache)
    assert cache.hits == 0 and not torch.allclose(ea, eb)
    with pytest.raises(ValueError, match="frozen encoder"):
        encode_captions(TinyTextEncoder(TextEncoderConfig(lr_scale=0.1)), Tokenizer(), ["x"], cache)
