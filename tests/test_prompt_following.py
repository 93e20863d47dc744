"""Issue 17: text conditioning that survives training, the prediction target, prompt sensitivity.

Unit level, on the tiny model; the trained-run assertions (separation logged during the demo's
training, eval's sensitivity figures) live in tests/test_e2e.py, which shares its trained run.
"""

import pytest
import torch

from data.synthetic import ClipSpec, render
from training.dit import DiTConfig
from training.flow import FlowConfig, euler_sample, flow_loss, to_velocity, to_x0
from training.model import ModelConfig
from training.evaluation.probes import prompt_sensitivity
from training.text import TextEncoderConfig, TinyTextEncoder
from training.text_separation import ATTRIBUTES, caption_pairs, text_separation
from training.trainer import param_groups


def _encode(enc, tok):
    return lambda captions: enc(*tok(captions))


def test_tiny_encoder_is_frozen_by_default_and_seeded():
    cfg = TextEncoderConfig()
    assert cfg.frozen
    torch.manual_seed(1)
    a = TinyTextEncoder(cfg)
    torch.manual_seed(2)  # the caller's RNG does not change its weights
    b = TinyTextEncoder(cfg)
    assert not a.trainable and not any(p.requires_grad for p in a.parameters())
    assert a.identity is not None and a.identity == b.identity
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    c = TinyTextEncoder(TextEncoderConfig(seed=1))
    assert c.identity != a.identity
    # the caller's RNG stream is left where it was
    torch.manual_seed(3)
    x = torch.rand(1)
    torch.manual_seed(3)
    TinyTextEncoder(cfg)
    assert torch.equal(torch.rand(1), x)
    # trained variant: an own learning rate, no cache identity
    t = TextEncoderConfig(lr_scale=0.1)
    assert not t.frozen and TinyTextEncoder(t).identity is None
    with pytest.raises(ValueError, match="lr_scale"):
        TextEncoderConfig(lr_scale=-1.0)
    with pytest.raises(ValueError, match="cache"):
        TextEncoderConfig(lr_scale=0.1, cache_size=8)
    TextEncoderConfig(cache_size=8)  # a frozen tiny encoder may be cached


def test_param_groups_give_the_text_encoder_its_own_rate():
    dit = DiTConfig.from_preset("tiny", depth=1)
    frozen = ModelConfig(dit=dit, text=TextEncoderConfig()).build()
    groups = param_groups(frozen, 1e-3, 0.0)
    assert len(groups) == 1 and {id(p) for p in groups[0]["params"]} == {id(p) for p in frozen.dit.parameters()}
    trained = ModelConfig(dit=dit, text=TextEncoderConfig(lr_scale=0.1)).build()
    g = param_groups(trained, 1e-3, 0.1)
    assert [x["lr"] for x in g] == [1e-3, pytest.approx(1e-4)]
    assert {id(p) for p in g[1]["params"]} == {id(p) for p in trained.text_encoder.parameters()}


def test_separation_falls_when_the_encoder_collapses_and_holds_when_frozen():
    pairs = caption_pairs(8, 0)
    assert set(pairs) == set(ATTRIBUTES) and all(len(v) == 8 for v in pairs.values())
    for a, ps in pairs.items():  # each pair differs in exactly its attribute's words
        for x, y in ps:
            assert x != y and len(set(x.split()) ^ set(y.split())) in (2, 3, 4)
    cfg = TextEncoderConfig()
    enc = TinyTextEncoder(cfg)
    tok = cfg.build_tokenizer()
    before = text_separation(_encode(enc, tok), pairs)
    assert all(v > 0.2 for v in before.values()), before
    # a trained encoder pushed to map every caption to the same features: separation collapses
    trained = TinyTextEncoder(TextEncoderConfig(lr_scale=1.0))
    opt = torch.optim.Adam(trained.parameters(), lr=3e-3)
    caps = [c for ps in pairs.values() for pair in ps for c in pair]
    for _ in range(60):
        x, m = trained(*tok(caps))
        loss = (x - x.detach().mean(0, keepdim=True)).pow(2).mean()
        opt.zero_grad(), loss.backward(), opt.step()
    after = text_separation(_encode(trained, tok), pairs)
    assert all(after[a] < 0.5 * before[a] for a in ATTRIBUTES), (before, after)
    # the frozen default cannot move
    assert text_separation(_encode(enc, tok), pairs) == before


def test_x0_conversion_is_exact_on_a_point_mass_and_at_the_clamp():
    torch.manual_seed(0)
    x0 = torch.randn(1, 3, 2, 8, 8).expand(4, -1, -1, -1, -1).contiguous()  # one point: the data
    noise = torch.randn_like(x0)
    t = torch.tensor([0.9, 0.5, 0.05, 0.01])
    tb = t.view(-1, 1, 1, 1, 1)
    x_t = (1 - tb) * x0 + tb * noise
    v = to_velocity(x0, x_t, t, "x0", 0.05)  # the optimal x0 predictor of a point mass is the point
    assert torch.allclose(v[:3], (noise - x0)[:3], atol=1e-5)  # exact at and above the clamp
    assert torch.allclose(v[3], (x_t[3] - x0[3]) / 0.05, atol=1e-6)  # the clamp: t / t_min of the true v
    assert torch.allclose(v[3], (0.01 / 0.05) * (noise - x0)[3], atol=1e-5)
    assert to_velocity(v, x_t, t, "velocity") is v
    # the objective: zero loss for the exact predictor at t >= t_min, under either target
    cfg = FlowConfig(prediction="x0")
    loss, per, _ = flow_loss(lambda x, s: x0[: x.shape[0]], x0[:3], cfg, t=t[:3], noise=noise[:3])
    assert float(per.max()) < 1e-9
    oracle_v = lambda x, s: noise[: x.shape[0]] - x0[: x.shape[0]]  # noqa: E731
    assert float(flow_loss(oracle_v, x0[:3], FlowConfig(), t=t[:3], noise=noise[:3])[0]) < 1e-9
    # training and sampling agree: the sampler, converting the same way, lands on the point
    fn = lambda x, s, cond: x0[:1].expand(x.shape[0], -1, -1, -1, -1)  # noqa: E731
    out = euler_sample(fn, (2, 3, 2, 8, 8), steps=20, cfg_scale=3.0, shift=3.0,
                       generator=torch.Generator().manual_seed(0), prediction="x0", x0_t_min=0.05)
    assert torch.allclose(out, x0[:2], atol=1e-4)
    with pytest.raises(ValueError, match="prediction"):
        FlowConfig(prediction="eps")


def test_x0_loss_is_the_velocity_loss_weighted_by_t_squared():
    torch.manual_seed(1)
    x0, noise = torch.randn(3, 3, 2, 8, 8), torch.randn(3, 3, 2, 8, 8)
    t = torch.tensor([0.9, 0.5, 0.2])
    tb = t.view(-1, 1, 1, 1, 1)
    x_t = (1 - tb) * x0 + tb * noise
    assert torch.allclose(to_x0(noise - x0, x_t, t, "velocity"), x0, atol=1e-5)  # exact inverse
    wrong = torch.randn_like(x0)  # one arbitrary network output, read under both predictions
    for prediction in ("velocity", "x0"):
        net = lambda x, s: wrong  # noqa: E731
        _, per_v, _ = flow_loss(net, x0, FlowConfig(prediction=prediction), t=t, noise=noise)
        _, per_x, _ = flow_loss(net, x0, FlowConfig(prediction=prediction, loss="x0"), t=t, noise=noise)
        assert torch.allclose(per_x, per_v * t**2, rtol=1e-4)  # t >= x0_t_min: the same error, reweighted
        assert not torch.allclose(per_x, per_v, rtol=1e-2)
    with pytest.raises(ValueError, match="flow.loss"):
        FlowConfig(loss="eps")


def _clip(**kw):
    spec = dict(shape="square", color="red", count=1, direction="left", speed=2, background="black",
                starts=((0.5, 0.5),))
    spec.update(kw)
    if "count" in kw:
        spec["starts"] = ((0.2, 0.2), (0.7, 0.6), (0.4, 0.85))[: kw["count"]]
    return render(ClipSpec(**spec), 8, 32, 32)


def test_prompt_sensitivity_is_zero_for_an_ignored_prompt_and_one_for_a_followed_one():
    base = _clip()
    variants = {"color": _clip(color="green"), "shape": _clip(shape="circle"),
                "direction": _clip(direction="up"), "count": _clip(count=2)}
    followed = prompt_sensitivity({a: [(base, v)] for a, v in variants.items()})
    assert followed == {"sensitivity/color": 1.0, "sensitivity/shape": 1.0, "sensitivity/direction": 1.0,
                        "sensitivity/count": 1.0, "sensitivity/all": 1.0}
    ignored = prompt_sensitivity({a: [(base, base.copy())] for a in variants})
    assert ignored["sensitivity/all"] == 0.0
    mixed = prompt_sensitivity({"color": [(base, variants["color"]), (base, variants["direction"])]})
    assert mixed["sensitivity/color"] == 0.5
