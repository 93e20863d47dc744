"""CPU unit tests for the DiT (full and factorised attention, packing), the rectified-flow
objective and sampler (with the resolution-dependent shift), and bf16 autocast.
Text encoders: tests/test_text.py. FLOPs: tests/test_flops.py."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may need the network

import pytest
import torch
from omegaconf import OmegaConf

from training.dit import ADALNS, ATTENTIONS, PRESETS, DiT, DiTConfig, count_params, timestep_embedding
from training.flops import token_grid
from training.flow import (
    FlowConfig,
    drop_captions,
    euler_sample,
    flow_loss,
    sample_timesteps,
    sampling_schedule,
    shift_for,
    shift_timesteps,
    text_model_fn,
)
from training.patches import check_patchable, pack_clips, patchify, unpack, unpatchify
from training.rope import apply_rope, grid_positions, rope_cos_sin, rope_dims, rope_freqs
from training.text import TextEncoderConfig

TEXT_DIM = 128
VARIANTS = [(a, ad) for a in ATTENTIONS for ad in ADALNS]  # (attention, adaln)
VARIANT_IDS = [f"{a}-{ad}" for a, ad in VARIANTS]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


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


@pytest.fixture(scope="module", params=VARIANTS, ids=VARIANT_IDS)
def tiny_model(request):
    """The tiny preset with perturbed weights, once per attention x adaLN variant."""
    attention, adaln = request.param
    torch.manual_seed(0)
    return perturb(DiT(DiTConfig.from_preset("tiny", attention=attention, adaln=adaln))).eval()


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


def test_one_shape_check_names_the_shape_and_the_key():
    """check_patchable is the one divisibility check: the DiT, the FLOP counter (its grid) and
    the preflight raise its error, which names the config key that sets the patch."""
    check_patchable((4, 16, 16), [2, 4, 4])  # divisible: no error
    with pytest.raises(ValueError, match=r"^train shape \(3, 16, 16\) is not divisible by model.dit.patch_size \[2, 4, 4\]"):
        check_patchable((3, 16, 16), [2, 4, 4], what="train shape", key="model.dit.patch_size")
    with pytest.raises(ValueError, match=r"^clip size \(4, 16, 18\) is not divisible by patch \[1, 4, 4\]"):
        patchify(torch.randn(1, 3, 4, 16, 18), (1, 4, 4))
    cfg = DiTConfig(patch_size=[2, 4, 4])
    text, mask = random_text(1, 3, [3])
    with pytest.raises(ValueError, match=r"clip size \(3, 16, 16\) is not divisible by model.dit.patch_size \[2, 4, 4\]"):
        cfg.build()(torch.randn(1, 3, 3, 16, 16), torch.rand(1), text, mask)
    assert token_grid(cfg, (4, 16, 16)) == (2, 4, 4)
    with pytest.raises(ValueError, match=r"clip size \(5, 16, 16\) is not divisible by model.dit.patch_size"):
        token_grid(cfg, (5, 16, 16))


# ------------------------------------------------------------------ DiT forward


def test_output_shapes_any_grid_same_model(tiny_model):
    text, mask = random_text(2, 7, [7, 3])
    for T, H, W in [(4, 16, 16), (8, 32, 32), (1, 32, 16)]:
        x = torch.randn(2, 3, T, H, W)
        with torch.no_grad():
            out = tiny_model(x, torch.rand(2), text, mask)
        assert out.shape == x.shape
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("attention,adaln", VARIANTS, ids=VARIANT_IDS)
def test_blocks_are_identity_at_init(attention, adaln):
    torch.manual_seed(0)
    model = DiT(DiTConfig.from_preset("tiny", attention=attention, adaln=adaln)).eval()
    x = torch.randn(2, 3, 4, 16, 16)
    text, mask = random_text(2, 5, [5, 2])
    B, N, D = 2, 4 * 4 * 4, model.cfg.hidden_size
    tokens = torch.randn(B, N, D)
    c = model.condition(torch.rand(B), text, mask)
    if adaln == "single":
        c = model.adaLN_single(c)  # what the blocks receive
    layout = model.grid_layout((4, 4, 4))
    with torch.no_grad():
        for block in model.blocks:
            assert torch.equal(block(tokens, c, text, mask, layout), tokens)
        assert torch.equal(model(x, torch.rand(B), text, mask), torch.zeros_like(x))
    # ...and perturbing the weights makes them non-identity (the check above is not vacuous)
    perturb(model)
    with torch.no_grad():
        assert not torch.allclose(model.blocks[0](tokens, c, text, mask, layout), tokens)


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


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_grad_checkpointing_same_gradients(attention):
    torch.manual_seed(0)
    plain = perturb(DiT(DiTConfig.from_preset("tiny", depth=2, attention=attention))).train()
    ckpt = DiT(DiTConfig.from_preset("tiny", depth=2, attention=attention, grad_checkpointing=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    t = torch.rand(2)
    text, mask = random_text(2, 5, [5, 2])
    for shape in [(2, 3, 4, 8, 8), (2, 3, 2, 16, 12)]:  # consecutive batches of different (T, H, W)
        x = torch.randn(shape)
        grads = []
        for model in (plain, ckpt):
            model.zero_grad()
            model(x, t, text, mask).pow(2).mean().backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        assert grads[0].keys() == grads[1].keys()
        assert any(g.abs().max() > 0 for n, g in grads[0].items() if n.startswith("blocks.0.attn"))
        if attention == "factorised":
            assert any(g.abs().max() > 0 for n, g in grads[0].items() if n.startswith("blocks.0.temporal_attn"))
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
    # rotation preserves norms, and is the explicit rotation of interleaved pairs
    cos, sin = rope_cos_sin(pos, head_dim)
    assert torch.allclose(apply_rope(q, cos, sin).norm(dim=-1), q.norm(dim=-1), atol=1e-5)
    x1, x2 = q[..., 0::2], q[..., 1::2]
    explicit = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    assert torch.allclose(apply_rope(q, cos, sin), explicit, atol=1e-5)


# ------------------------------------------------------------------ presets and parameter counts


@pytest.mark.parametrize(
    "cfg",
    [
        DiTConfig.from_preset("tiny"),
        DiTConfig.from_preset("small"),
        DiTConfig.from_preset("tiny", qk_norm=False, patch_size=[2, 2, 2], in_channels=4, text_dim=64, mlp_ratio=2.5),
        DiTConfig.from_preset("tiny", attention="factorised"),
        DiTConfig.from_preset("small", attention="factorised"),
        DiTConfig.from_preset("tiny", attention="factorised", qk_norm=False, patch_size=[2, 2, 2], in_channels=4,
                              text_dim=64, mlp_ratio=2.5, grad_checkpointing=True),
        DiTConfig.from_preset("tiny", adaln="single"),
        DiTConfig.from_preset("small", adaln="single"),
        DiTConfig.from_preset("small", adaln="single", attention="factorised"),
    ],
    ids=["tiny", "small", "tiny-variant", "tiny-factorised", "small-factorised", "tiny-factorised-variant",
         "tiny-single", "small-single", "small-factorised-single"],
)
def test_count_params_matches_module(cfg):
    assert count_params(cfg) == sum(p.numel() for p in DiT(cfg).parameters())


def test_count_params_big_presets():
    counts = [count_params(DiTConfig.from_preset(name)) for name in PRESETS]
    assert counts == sorted(counts)
    assert count_params(DiTConfig.from_preset("3b")) > 2e9
    # factorised adds one self-attention (4 D^2) and 3 D^2 of adaLN per block
    for name in PRESETS:
        full, fact = DiTConfig.from_preset(name), DiTConfig.from_preset(name, attention="factorised")
        D, hd = full.hidden_size, full.head_dim
        assert count_params(fact) - count_params(full) == full.depth * (4 * D * D + 4 * D + 2 * hd + 3 * D * D + 3 * D)


def test_with_preset_keeps_options():
    base = DiTConfig.from_preset("tiny", attention="factorised", patch_size=[2, 2, 2], in_channels=16, text_dim=512)
    big = base.with_preset("xl")
    assert (big.preset, big.hidden_size, big.depth, big.num_heads) == ("xl", 1152, 28, 16)
    assert (big.attention, big.patch_size, big.in_channels, big.text_dim) == ("factorised", [2, 2, 2], 16, 512)
    assert count_params(big) > count_params(DiTConfig.from_preset("xl", patch_size=[2, 2, 2], in_channels=16, text_dim=512))
    with pytest.raises(ValueError, match="valid presets"):
        base.with_preset("huge")
    with pytest.raises(ValueError, match="model.dit.attention"):
        DiTConfig(attention="axial")
    with pytest.raises(ValueError, match="model.dit.adaln"):
        DiTConfig(adaln="shared")


def test_adaln_single_saves_the_per_block_linears():
    for name in PRESETS:
        block, single = DiTConfig.from_preset(name), DiTConfig.from_preset(name, adaln="single")
        D, m = block.hidden_size, block.num_modulations
        # per block a Linear(D, mD) becomes an (mD,) table; one shared Linear(D, mD) is added
        assert count_params(block) - count_params(single) == (block.depth - 1) * D * m * D - m * D


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


@pytest.mark.parametrize("attention,depth", [("full", 4), ("factorised", 2)])
def test_overfit_one_batch(attention, depth):
    torch.manual_seed(0)
    model = DiT(DiTConfig.from_preset("tiny", attention=attention, depth=depth)).train()
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
    for _ in range(150):
        loss, _, _ = flow_loss(fn, x0, cfg, generator=g, noise=noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = flow_loss(fn, x0, cfg, t=t_eval, noise=noise)[0].item()
    assert initial > 1.0  # zero-init output: loss starts at E|noise - x0|^2 ~ 2
    assert final < 0.02 * initial, (initial, final)  # typically ~0.001-0.002x


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




# ------------------------------------------------------------------ factorised attention


def test_factorised_attention_is_spatial_then_temporal():
    """With the temporal branch gated off, frames do not see each other; with it on, they do."""
    torch.manual_seed(0)
    model = perturb(DiT(DiTConfig.from_preset("tiny", attention="factorised", depth=2))).eval()
    D = model.cfg.hidden_size
    x = torch.randn(1, 3, 3, 16, 16)
    x2 = x.clone()
    x2[:, :, 2] += 1.0  # change the last frame only
    t = torch.tensor([0.5])
    text, mask = random_text(1, 4, [4])
    with torch.no_grad():
        on = model(x, t, text, mask), model(x2, t, text, mask)
        assert (on[0][:, :, 0] - on[1][:, :, 0]).abs().max() > 1e-3  # temporal attention mixes frames
        for block in model.blocks:  # gate_t is the 6th chunk of the 9 adaLN outputs
            block.adaLN_modulation[-1].weight[5 * D : 6 * D] = 0
            block.adaLN_modulation[-1].bias[5 * D : 6 * D] = 0
        off = model(x, t, text, mask), model(x2, t, text, mask)
    assert (off[0][:, :, :2] - off[1][:, :, :2]).abs().max() < 1e-5  # frames 0, 1 untouched
    assert (off[0][:, :, 2] - off[1][:, :, 2]).abs().max() > 1e-3


# ------------------------------------------------------------------ packing


PACK_CLIPS = [(3, 2, 8, 12), (3, 3, 16, 8), (3, 1, 4, 4), (3, 4, 8, 8)]  # (C, T, H, W), patch (1, 4, 4)


def _clips_and_text(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    clips = [torch.randn(s, generator=g) for s in PACK_CLIPS]
    K, L = len(clips), 6
    text = torch.randn(K, L, TEXT_DIM, generator=g)
    mask = torch.arange(L)[None] < torch.tensor([6, 2, 4, 1])[:, None]  # (K, L)
    return clips, torch.tensor([0.1, 0.5, 0.9, 0.3]), text, mask


def test_pack_unpack_roundtrip_and_rows():
    clips, _, _, _ = _clips_and_text()
    sizes = [2 * 2 * 3, 3 * 4 * 2, 1, 4 * 2 * 2]  # tokens per clip: 12, 24, 1, 16
    one = pack_clips(clips, (1, 4, 4))
    assert one.tokens.shape == (1, sum(sizes), 48) and one.offsets == [0, 12, 36, 37]
    rows = pack_clips(clips, (1, 4, 4), max_tokens=30)  # first fit: [12 + 1 + 16], [24]
    assert rows.rows == [0, 1, 0, 0] and rows.tokens.shape == (2, 29, 48)
    assert rows.clip[1, 24:].eq(-1).all() and rows.row_clips.tolist() == [[0, 2, 3], [1, -1, -1]]
    for packed in (one, rows):
        assert all(torch.equal(a, b) for a, b in zip(unpack(packed.tokens, packed), clips))
    with pytest.raises(ValueError, match="max_tokens"):
        pack_clips(clips, (1, 4, 4), max_tokens=20)
    with pytest.raises(ValueError, match="not divisible"):
        pack_clips([torch.randn(3, 2, 6, 8)], (1, 4, 4))


@pytest.mark.parametrize("max_tokens", [None, 30])
def test_packed_forward_equals_unpacked(tiny_model, max_tokens):
    clips, t, text, mask = _clips_and_text()
    packed = pack_clips(clips, (1, 4, 4), max_tokens=max_tokens)
    with torch.no_grad():
        outs = tiny_model.forward_packed(packed, t, text, mask)
        for k, clip in enumerate(clips):
            ref = tiny_model(clip[None], t[k : k + 1], text[k : k + 1], mask[k : k + 1])[0]
            assert outs[k].shape == clip.shape
            assert (outs[k] - ref).abs().max() < 1e-4 * (1 + ref.abs().max()), k
        # and packing is not vacuous: another clip's caption or content changes nothing of clip 0...
        text2 = text.clone()
        text2[1] += 1.0
        clips2 = [clips[0], clips[1] + 1.0, *clips[2:]]
        again = tiny_model.forward_packed(pack_clips(clips2, (1, 4, 4), max_tokens), t, text2, mask)
        assert (again[0] - outs[0]).abs().max() < 1e-5
        assert (again[1] - outs[1]).abs().max() > 1e-3


@pytest.mark.parametrize("attention,adaln", VARIANTS, ids=VARIANT_IDS)
def test_packed_gradients_equal_unpacked(attention, adaln):
    torch.manual_seed(0)
    model = perturb(DiT(DiTConfig.from_preset("tiny", attention=attention, adaln=adaln, depth=2))).train()
    clips, t, text, mask = _clips_and_text(1)
    model.zero_grad()
    sum(o.pow(2).mean() for o in model.forward_packed(pack_clips(clips, (1, 4, 4)), t, text, mask)).backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    for k, clip in enumerate(clips):
        model(clip[None], t[k : k + 1], text[k : k + 1], mask[k : k + 1]).pow(2).mean().backward()
    for n, p in model.named_parameters():
        assert torch.allclose(packed_grads[n], p.grad, atol=1e-5, rtol=1e-4), n
    modulation = "modulation_table" if adaln == "single" else "adaLN_modulation"
    assert packed_grads[f"blocks.1.{modulation}" + ("" if adaln == "single" else ".1.weight")].abs().max() > 0


# ------------------------------------------------------------------ RoPE in the model


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_model_output_invariant_to_rope_offset(attention):
    """Only relative positions matter: the same clip placed at (t, h, w) + offset gives the same output."""
    torch.manual_seed(0)
    model = perturb(DiT(DiTConfig.from_preset("tiny", attention=attention, depth=2))).eval()
    x, t = torch.randn(2, 3, 3, 8, 12), torch.tensor([0.3, 0.6])
    text, mask = random_text(2, 4, [4, 2])
    grid, hd = (3, 2, 3), model.cfg.head_dim
    tokens = model.x_embed(patchify(x, model.patch))
    c = model.condition(t, text, mask)  # (B, D)
    base = model.grid_layout(grid)
    offset = torch.tensor([7.0, -3.0, 11.0])
    moved = base._replace(rope=rope_freqs(grid_positions(grid) + offset, hd))
    if attention == "factorised":
        moved = moved._replace(rope_spatial=rope_freqs(grid_positions((1, 2, 3)) + offset, hd),
                               rope_temporal=rope_freqs(grid_positions((3, 1, 1)) + offset, hd))
    with torch.no_grad():
        a = model.trunk(tokens, c, text, mask, base)
        b = model.trunk(tokens, c, text, mask, moved)
        swapped = base._replace(rope=rope_freqs(grid_positions(grid).flip(0), hd))  # not a shift
        if attention == "factorised":
            swapped = swapped._replace(rope_spatial=rope_freqs(grid_positions((1, 2, 3)).flip(0), hd))
        d = model.trunk(tokens, c, text, mask, swapped)
    assert (a - b).abs().max() < 1e-4
    assert (a - d).abs().max() > 1e-3


# ------------------------------------------------------------------ resolution-dependent shift


def test_default_shift_is_constant_and_unchanged():
    cfg = FlowConfig()
    assert cfg.shift_mode == "constant" and shift_for(cfg, 10**6) == 1.0
    for shift in (1.0, 3.0):
        c = FlowConfig(shift=shift)
        got = sample_timesteps(c, 512, torch.Generator().manual_seed(0))
        u = torch.randn(512, generator=torch.Generator().manual_seed(0))
        expected = shift_timesteps(torch.sigmoid(u), shift)
        assert torch.equal(got, expected)
        assert shift_for(c, 64) == shift_for(c, 10**5) == shift


def test_token_shift_grows_with_resolution_and_duration():
    cfg = FlowConfig(shift_mode="tokens", shift=1.0, shift_base_tokens=1024, shift_exponent=0.5)
    assert shift_for(cfg, 1024) == pytest.approx(1.0)
    assert shift_for(cfg, 4 * 1024) == pytest.approx(2.0)  # sqrt rule: 4x tokens -> 2x shift
    small, wide, long = 4 * 16 * 16, 4 * 32 * 32, 16 * 16 * 16  # (T', H', W') = (4,16,16), (4,32,32), (16,16,16)
    assert shift_for(cfg, small) < shift_for(cfg, wide) and shift_for(cfg, small) < shift_for(cfg, long)
    capped = FlowConfig(shift_mode="tokens", shift_base_tokens=16, shift_max=3.0)
    assert shift_for(capped, 10**6) == 3.0
    per_sample = shift_for(cfg, torch.tensor([1024, 4096]))
    assert torch.allclose(per_sample, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="num_tokens"):
        sample_timesteps(cfg, 4)
    with pytest.raises(ValueError, match="flow.shift_mode"):
        FlowConfig(shift_mode="resolution")


def test_training_and_sampler_use_the_same_shift():
    """The median training timestep (logit-normal, mean 0: median 0.5 before the shift) and the
    sampler's midpoint are both s / (1 + s) for s = shift_for(cfg, N), for every clip size N."""
    cfg = FlowConfig(shift_mode="tokens", shift=1.5, shift_base_tokens=256)
    g = torch.Generator().manual_seed(0)
    medians = []
    for n in (256, 1024, 8192):
        s = shift_for(cfg, n)
        t = sample_timesteps(cfg, 20000, g, num_tokens=n)
        assert t.median().item() == pytest.approx(s / (1 + s), abs=0.01)
        assert sampling_schedule(2, s)[1].item() == pytest.approx(s / (1 + s), abs=1e-6)
        medians.append(t.median().item())
    assert medians == sorted(medians) and medians[-1] - medians[0] > 0.15  # bigger clips: noisier
    mixed = sample_timesteps(cfg, 4, torch.Generator().manual_seed(1), num_tokens=torch.tensor([256, 256, 8192, 8192]))
    u = torch.sigmoid(torch.randn(4, generator=torch.Generator().manual_seed(1)) * cfg.logit_std)
    assert torch.allclose(mixed, shift_timesteps(u, shift_for(cfg, torch.tensor([256, 256, 8192, 8192]))))
    # flow_loss passes num_tokens through
    x0 = torch.zeros(3, 1, 1, 2, 2)
    _, _, t_small = flow_loss(lambda x, tt: x, x0, cfg, torch.Generator().manual_seed(2), num_tokens=256)
    _, _, t_big = flow_loss(lambda x, tt: x, x0, cfg, torch.Generator().manual_seed(2), num_tokens=8192)
    assert (t_big > t_small).all()


# ------------------------------------------------------------------ precision


def test_bf16_autocast_forward_backward_cpu():
    torch.manual_seed(0)
    model = perturb(DiT(DiTConfig.from_preset("tiny", depth=2))).train()
    x, t = torch.randn(2, 3, 2, 16, 16), torch.tensor([0.3, 0.7])
    text, mask = random_text(2, 5, [5, 3])
    seen = {}
    model.blocks[0].mlp.fc1.register_forward_hook(lambda m, i, o: seen.__setitem__("dtype", o.dtype))
    with torch.autocast("cpu", enabled=False):
        ref = model(x, t, text, mask)
    assert seen["dtype"] == torch.float32 and ref.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, text, mask)
        loss, _, _ = flow_loss(lambda xx, tt: model(xx, tt, text, mask), x, FlowConfig(), torch.Generator().manual_seed(0))
    assert seen["dtype"] == torch.bfloat16
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    rel = (out.float() - ref).norm() / ref.norm()
    assert 0 < rel < 0.05, rel  # bf16 rounding, not a different function
    loss.backward()
    assert all(p.grad is None or (p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()) for p in model.parameters())
    assert model.blocks[0].mlp.fc1.weight.grad.abs().max() > 0
