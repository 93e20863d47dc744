"""The analytic FLOPs agree with torch's FlopCounterMode on the DiT's forward pass."""

import contextlib

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from training.dit import ATTENTIONS, DiT, DiTConfig
from training.flops import (
    forward_flops,
    forward_flops_breakdown,
    matmul_flops_per_s,
    mfu,
    sdpa_flop_mapping,
    token_grid,
    train_flops,
)

GRIDS = [(2, 4, 4), (4, 8, 6), (1, 8, 8)]  # (T', H', W') after patchify
TEXT_LEN = 7


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def counted_forward_flops(model: DiT, grid, text_len: int, batch: int = 2, math_sdpa: bool = False) -> int:
    cfg = model.cfg
    pt, ph, pw = cfg.patch_size
    x = torch.randn(batch, cfg.in_channels, grid[0] * pt, grid[1] * ph, grid[2] * pw)
    text = torch.randn(batch, text_len, cfg.text_dim)
    mask = torch.ones(batch, text_len, dtype=torch.bool)
    mask[-1, text_len // 2 :] = False  # padded text is still computed, hence counted
    # CPU SDPA runs a fused kernel FlopCounterMode does not know: either count the math
    # backend's matmuls (independent of our formulas) or add torch's SDPA formula for it
    ctx = sdpa_kernel(SDPBackend.MATH) if math_sdpa else contextlib.nullcontext()
    with torch.no_grad(), ctx, FlopCounterMode(display=False, custom_mapping=sdpa_flop_mapping()) as counter:
        model(x, torch.rand(batch), text, mask)
    return counter.get_total_flops() // batch


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize(
    "preset,overrides",
    [("tiny", {}), ("small", {}), ("small", {"adaln": "single"}), ("base", {"depth": 2})],
    ids=["tiny", "small", "small-adaln-single", "base-depth2"],
)
def test_forward_flops_match_flop_counter(preset, overrides, attention):
    cfg = DiTConfig.from_preset(preset, attention=attention, patch_size=[1, 2, 2], in_channels=4, **overrides)
    model = DiT(cfg).eval()
    for grid in GRIDS:
        analytic = forward_flops(cfg, grid, TEXT_LEN)
        for math_sdpa in (False, True):
            counted = counted_forward_flops(model, grid, TEXT_LEN, math_sdpa=math_sdpa)
            assert counted == pytest.approx(analytic, rel=0.05), (grid, math_sdpa)


def test_flops_other_options_and_text_length():
    cfg = DiTConfig.from_preset("tiny", qk_norm=False, mlp_ratio=2.5, text_dim=48, patch_size=[2, 4, 4], in_channels=3)
    model = DiT(cfg).eval()
    for text_len in (1, 20):
        analytic = forward_flops(cfg, (2, 3, 5), text_len)
        assert counted_forward_flops(model, (2, 3, 5), text_len) == pytest.approx(analytic, rel=0.05)


def test_breakdown_and_scaling():
    cfg = DiTConfig.from_preset("base")
    parts = forward_flops_breakdown(cfg, (8, 16, 16), 77)
    assert set(parts) == {"embed", "adaln", "self_proj", "self_attn", "cross", "mlp", "final"}
    assert sum(parts.values()) == forward_flops(cfg, (8, 16, 16), 77)
    assert train_flops(cfg, (8, 16, 16), 77) == 3 * forward_flops(cfg, (8, 16, 16), 77)
    # full attention is quadratic in the token count N; factorised costs N (H'W' + T')
    fact = DiTConfig.from_preset("base", attention="factorised")
    small, big = (4, 16, 16), (16, 32, 32)  # 16x the tokens
    full_small, full_big = forward_flops_breakdown(cfg, small, 77), forward_flops_breakdown(cfg, big, 77)
    assert full_big["self_attn"] == 16**2 * full_small["self_attn"]
    n, keys = 16 * 32 * 32, 32 * 32 + 16
    assert forward_flops_breakdown(fact, big, 77)["self_attn"] * n == full_big["self_attn"] * keys
    assert forward_flops(fact, big, 77) < 0.5 * forward_flops(cfg, big, 77)
    assert token_grid(cfg, (8, 64, 64)) == (8, 16, 16)
    with pytest.raises(ValueError):
        forward_flops(cfg, (0, 4, 4), 7)


def test_backward_is_about_twice_the_forward():
    """The 3x rule of train_flops, checked on the counted forward + backward."""
    cfg = DiTConfig.from_preset("small", depth=2, patch_size=[1, 2, 2], in_channels=4)
    model = DiT(cfg).train()
    x, text = torch.randn(2, 4, 4, 16, 16), torch.randn(2, TEXT_LEN, cfg.text_dim)
    mask = torch.ones(2, TEXT_LEN, dtype=torch.bool)
    with FlopCounterMode(display=False, custom_mapping=sdpa_flop_mapping()) as counter:
        model(x, torch.rand(2), text, mask).pow(2).mean().backward()
    ratio = counter.get_total_flops() / 2 / forward_flops(cfg, (4, 8, 8), TEXT_LEN)
    assert 2.8 < ratio < 3.2, ratio


def test_mfu_and_matmul_rate():
    rate = matmul_flops_per_s(n=256, seconds=0.05)
    assert rate > 1e8  # any machine does 0.1 GFLOP/s
    assert mfu(10**9, 2.0, 4e9) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        mfu(1, 1.0, 0.0)
