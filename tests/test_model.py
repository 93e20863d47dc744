"""CPU unit tests for the DiT backbone, the text encoder and the rectified-flow objective/sampler."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tokenizer must never need the network

import pytest
import torch
from omegaconf import OmegaConf

from training.dit import (
    PRESETS,
    DiT,
    DiTConfig,
    apply_rope,
    count_params,
    grid_positions,
    patchify,
    timestep_embedding,
    rope_cos_sin,
    rope_dims,
    unpatchify,
)
from training.flow import (
    FlowConfig,
    drop_captions,
    euler_sample,
    flow_loss,
    sample_timesteps,
    sampling_schedule,
    text_model_fn,
)
from training.text import TextEncoderConfig, TinyTextEncoder, Tokenizer, tokenize

TEXT_DIM = 128


def perturb(model: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Add noise to every parameter so the zero-initialised (adaLN-Zero) branches are active."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def random_text(B: int, L: int, n_real: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(B, L, TEXT_DIM, generator=g)  # (B, L, Dt)
    mask = torch.arange(L)[None, :] < torch.tensor(n_real)[:, None]  # (B, L)
    return text, mask


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return perturb(DiT(DiTConfig.from_preset("tiny"))).eval()


# ------------------------------------------------------------------ patchify


@pytest.mark.parametrize(
    "shape,patch",
    [((2, 3, 4, 16, 16), (1, 4, 4)), ((1, 4, 8, 8, 12), (2, 4, 2)), ((3, 1, 1, 6, 10), (1, 3, 5)), ((2, 3, 6, 4, 4), (3, 2, 2))],
)
def test_patchify_unpatchify_exact_inverse(shape, patch):
    x = torch.randn(shape)
    tokens = patchify(x, patch)
    B, C, T, H, W = shape
    grid = (T // patch[0], H // patch[1], W // patch[2])
    assert tokens.shape == (B, grid[0] * grid[1] * grid[2], patch[0] * patch[1] * patch[2] * C)
    assert torch.equal(unpatchify(tokens, patch, grid), x)
    # token 0 is exactly the first (pt, ph, pw) cube, laid out as (pt, ph, pw, C)
    cube = x[0, :, : patch[0], : patch[1], : patch[2]].permute(1, 2, 3, 0).reshape(-1)
    assert torch.equal(tokens[0, 0], cube)


def test_patchify_rejects_indivisible():
    with pytest.raises(ValueError):
        patchify(torch.randn(1, 3, 3, 16, 16), (2, 4, 4))


# ------------------------------------------------------------------ DiT forward


def test_output_shapes_any_grid_same_model(tiny_model):
    text, mask = random_text(2, 7, [7, 3])
    for T, H, W in [(4, 16, 16), (8, 32, 32), (1, 32, 16)]:
        x = torch.randn(2, 3, T, H, W)
        with torch.no_grad():
            out = tiny_model(x, torch.rand(2), text, mask)
        assert out.shape == x.shape
        assert torch.isfinite(out).all()


def test_blocks_are_identity_at_init():
    torch.manual_seed(0)
    model = DiT(DiTConfig.from_preset("tiny")).eval()
    x = torch.randn(2, 3, 4, 16, 16)
    text, mask = random_text(2, 5, [5, 2])
    B, N, D = 2, 4 * 4 * 4, model.cfg.hidden_size
    tokens = torch.randn(B, N, D)
    c = model.condition(torch.rand(B), text, mask)
    rope = rope_cos_sin(grid_positions((4, 4, 4)), model.cfg.head_dim)
    with torch.no_grad():
        for block in model.blocks:
            assert torch.equal(block(tokens, c, text, mask, rope), tokens)
        assert torch.equal(model(x, torch.rand(B), text, mask), torch.zeros_like(x))
    # ...and perturbing the weights makes them non-identity (the check above is not vacuous)
    perturb(model)
    with torch.no_grad():
        assert not torch.allclose(model.blocks[0](tokens, c, text, mask, rope), tokens)


def test_timestep_scaled_by_1000(tiny_model):
    t = torch.tensor([0.0, 0.001, 0.5, 1.0])
    freq = timestep_embedding(t * 1000.0)  # (B, 256)
    # channel 0 has frequency 1, so t = 0.001 -> 1000 * 0.001 = 1 radian: (cos 1, sin 1)
    assert torch.allclose(freq[1, [0, 128]], torch.tensor([0.5403023, 0.8414710]))
    with torch.no_grad():
        assert torch.allclose(tiny_model.t_embed(t), tiny_model.t_embed.mlp(freq), atol=1e-6)


def test_padded_text_tokens_do_not_change_output(tiny_model):
    x = torch.randn(2, 3, 4, 16, 16)
    t = torch.tensor([0.3, 0.8])
    text, mask = random_text(2, 6, [6, 3])
    with torch.no_grad():
        ref = tiny_model(x, t, text, mask)
        # append 5 masked tokens with random values, and scribble over the existing padding
        g = torch.Generator().manual_seed(1)
        text2 = torch.cat([text, torch.randn(2, 5, TEXT_DIM, generator=g) * 10], dim=1)
        mask2 = torch.cat([mask, torch.zeros(2, 5, dtype=torch.bool)], dim=1)
        text2[1, 3:6] = torch.randn(3, TEXT_DIM, generator=g) * 10
        out = tiny_model(x, t, text2, mask2)
        assert (out - ref).abs().max() < 1e-5
        # changing a real token does change the output
        text3 = text.clone()
        text3[1, 0] += 1.0
        assert (tiny_model(x, t, text3, mask) - ref)[1].abs().max() > 1e-3


def test_all_false_text_mask_gives_no_nan(tiny_model):
    x = torch.randn(2, 3, 4, 8, 8)
    text, mask = random_text(2, 4, [0, 2])
    with torch.no_grad():
        out = tiny_model(x, torch.rand(2), text, mask)
    assert torch.isfinite(out).all()


def test_grad_checkpointing_same_gradients():
    torch.manual_seed(0)
    plain = perturb(DiT(DiTConfig.from_preset("tiny", depth=2))).train()
    ckpt = DiT(DiTConfig.from_preset("tiny", depth=2, grad_checkpointing=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 4, 8, 8)
    t = torch.rand(2)
    text, mask = random_text(2, 5, [5, 2])
    grads = []
    for model in (plain, ckpt):
        model.zero_grad()
        model(x, t, text, mask).pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    assert any(g.abs().max() > 0 for n, g in grads[0].items() if n.startswith("blocks.0.attn"))
    for n in grads[0]:
        assert (grads[0][n] - grads[1][n]).abs().max() < 1e-5, n


# ------------------------------------------------------------------ RoPE


@pytest.mark.parametrize("head_dim", [6, 8, 32, 64, 72, 128])
def test_rope_dims_split(head_dim):
    dims = rope_dims(head_dim)
    assert sum(dims) == head_dim and all(d > 0 and d % 2 == 0 for d in dims)


def test_rope_scores_depend_only_on_relative_position():
    head_dim, H = 32, 2
    g = torch.Generator().manual_seed(0)
    pos = grid_positions((3, 4, 5))  # (N, 3)
    N = pos.shape[0]
    q = torch.randn(1, H, N, head_dim, generator=g)
    k = torch.randn(1, H, N, head_dim, generator=g)

    def scores(p):
        cos, sin = rope_cos_sin(p, head_dim)
        return apply_rope(q, cos, sin) @ apply_rope(k, cos, sin).transpose(-1, -2)  # (1, H, N, N)

    base = scores(pos)
    for shift in ([7.0, 0.0, 0.0], [0.0, -3.0, 11.0], [5.0, 13.0, 2.0]):
        assert torch.allclose(scores(pos + torch.tensor(shift)), base, atol=1e-4)
    # but the positions do matter: no RoPE, or shifting only some tokens, changes the scores
    assert not torch.allclose(q @ k.transpose(-1, -2), base, atol=1e-2)
    moved = pos.clone()
    moved[: N // 2] += torch.tensor([1.0, 0.0, 0.0])
    assert not torch.allclose(scores(moved), base, atol=1e-2)
    # rotation preserves norms
    cos, sin = rope_cos_sin(pos, head_dim)
    assert torch.allclose(apply_rope(q, cos, sin).norm(dim=-1), q.norm(dim=-1), atol=1e-5)


# ------------------------------------------------------------------ presets and parameter counts


@pytest.mark.parametrize(
    "cfg",
    [
        DiTConfig.from_preset("tiny"),
        DiTConfig.from_preset("small"),
        DiTConfig.from_preset("tiny", qk_norm=False, patch_size=[2, 2, 2], in_channels=4, text_dim=64, mlp_ratio=2.5),
    ],
    ids=["tiny", "small", "tiny-variant"],
)
def test_count_params_matches_module(cfg):
    assert count_params(cfg) == sum(p.numel() for p in DiT(cfg).parameters())


def test_count_params_big_presets():
    counts = [count_params(DiTConfig.from_preset(name)) for name in PRESETS]
    assert counts == sorted(counts)
    assert count_params(DiTConfig.from_preset("3b")) > 2e9


def test_unknown_preset_names_valid_ones():
    with pytest.raises(ValueError) as err:
        DiTConfig.from_preset("huge")
    for name in PRESETS:
        assert name in str(err.value)
    with pytest.raises(ValueError):
        DiTConfig(preset="huge")


def test_configs_are_omegaconf_structured():
    for cls in (DiTConfig, TextEncoderConfig, FlowConfig):
        conf = OmegaConf.structured(cls)
        assert OmegaConf.to_object(conf) == cls()
    conf = OmegaConf.merge(OmegaConf.structured(DiTConfig), {"patch_size": [2, 4, 4], "depth": 2})
    assert OmegaConf.to_object(conf).patch_size == [2, 4, 4]


# ------------------------------------------------------------------ flow objective


def test_flow_loss_interpolation_and_target():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 3, 2, 4, 4, generator=g)
    noise = torch.randn(3, 3, 2, 4, 4, generator=g)
    t = torch.tensor([0.0, 0.25, 1.0])
    seen = {}

    def oracle(x_t, tt):
        seen["x_t"] = x_t
        return noise - x0

    loss, per_sample, t_out = flow_loss(oracle, x0, FlowConfig(), t=t, noise=noise)
    assert loss.item() == 0.0 and per_sample.shape == (3,) and torch.equal(t_out, t)
    assert torch.allclose(seen["x_t"][0], x0[0]) and torch.allclose(seen["x_t"][2], noise[2])
    assert torch.allclose(seen["x_t"][1], 0.75 * x0[1] + 0.25 * noise[1])
    loss, per_sample, _ = flow_loss(lambda x_t, tt: torch.zeros_like(x_t), x0, FlowConfig(), t=t, noise=noise)
    assert torch.allclose(per_sample, (noise - x0).pow(2).flatten(1).mean(1))


def test_sample_timesteps():
    for sampling in ("logit_normal", "uniform"):
        cfg = FlowConfig(timestep_sampling=sampling)
        a = sample_timesteps(cfg, 4096, torch.Generator().manual_seed(0))
        b = sample_timesteps(cfg, 4096, torch.Generator().manual_seed(0))
        assert torch.equal(a, b) and a.shape == (4096,) and ((a > 0) & (a < 1)).all()
        assert abs(a.mean().item() - 0.5) < 0.03
    shifted = sample_timesteps(FlowConfig(shift=3.0), 4096, torch.Generator().manual_seed(0))
    assert shifted.mean() > 0.6  # shift > 1 moves mass towards noise
    sched = sampling_schedule(5, shift=3.0)
    assert sched[0] == 1.0 and sched[-1] == 0.0 and (sched[1:] < sched[:-1]).all()
    with pytest.raises(ValueError):
        FlowConfig(timestep_sampling="cosine")


def test_drop_captions():
    caps = [f"caption {i}" for i in range(1000)]
    dropped = drop_captions(caps, FlowConfig(caption_dropout=0.1), torch.Generator().manual_seed(0))
    n = sum(c == "" for c in dropped)
    assert 50 < n < 150
    assert all(d in ("", c) for d, c in zip(dropped, caps))


def test_overfit_one_batch():
    torch.manual_seed(0)
    model = DiT(DiTConfig.from_preset("tiny")).train()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, 4, 16, 16, generator=g)
    noise = torch.randn(2, 3, 4, 16, 16, generator=g)  # fixed noise; timesteps still random
    text, mask = random_text(2, 6, [6, 4])
    fn = lambda x_t, t: model(x_t, t, text, mask)  # noqa: E731
    cfg = FlowConfig()
    t_eval = torch.tensor([0.2, 0.7])
    with torch.no_grad():
        initial = flow_loss(fn, x0, cfg, t=t_eval, noise=noise)[0].item()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(300):
        loss, _, _ = flow_loss(fn, x0, cfg, generator=g, noise=noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = flow_loss(fn, x0, cfg, t=t_eval, noise=noise)[0].item()
    assert initial > 1.0  # zero-init output: loss starts at E|noise - x0|^2 ~ 2
    assert final < 0.02 * initial, (initial, final)  # typically ~0.002x over seeds


# ------------------------------------------------------------------ sampler


def test_euler_sampler_exact_on_point_mass():
    """For data = a single point x*, v(x, t) = (x - x*) / t is exact and paths are straight, so
    Euler reaches x* for any step count and shift; CFG extrapolates between the two targets."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 3, 2, 4, 4, generator=g)
    b = torch.randn(2, 3, 2, 4, 4, generator=g)

    def fn(x, t, cond):
        target = a if cond else b
        return (x - target) / t.view(-1, 1, 1, 1, 1)

    for steps, shift in [(1, 1.0), (4, 3.0), (7, 0.5)]:
        out = euler_sample(fn, a.shape, steps, cfg_scale=1.0, generator=torch.Generator().manual_seed(1), shift=shift)
        assert torch.allclose(out, a, atol=1e-5)
        out = euler_sample(fn, a.shape, steps, cfg_scale=3.0, generator=torch.Generator().manual_seed(1), shift=shift)
        assert torch.allclose(out, b + 3.0 * (a - b), atol=1e-4)


def test_sampler_deterministic(tiny_model):
    text, mask = random_text(2, 6, [6, 3])
    null_text, null_mask = random_text(1, 2, [2], seed=5)
    fn = text_model_fn(tiny_model, text, mask, null_text, null_mask)
    shape = (2, 3, 2, 8, 8)
    run = lambda seed, steps=3: euler_sample(fn, shape, steps, 4.0, torch.Generator().manual_seed(seed), shift=2.0)  # noqa: E731
    a, b, c = run(0), run(0), run(1)
    assert a.shape == shape and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert run(0, steps=1).shape == shape


# ------------------------------------------------------------------ text


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
    cfg = TextEncoderConfig()
    enc = TinyTextEncoder(cfg)
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
