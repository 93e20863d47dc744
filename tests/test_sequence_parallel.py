"""Sequence parallelism (DeepSpeed-Ulysses, training/ulysses.py) on CPU: 2 gloo processes.

The model-level checks: the DiT's output and every parameter gradient at SP=2 equal SP=1 within
fp32 tolerance, for full and factorised attention, adaLN block and single, text padding masks,
gradient checkpointing, and token counts that do not divide by the degree (padding of the last
shard). The training-level checks (Ray Train, DeepSpeed, resume) are in test_training_sp.py.
"""

from __future__ import annotations

import json
import socket
from contextlib import closing
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from training.dit import DiTConfig
from training.ulysses import apply_sequence_parallel, check_sequence_parallel, sequence_groups

# (attention, adaln, grad checkpointing, (T, H, W) in pixels); patch (1, 2, 2):
# full 3x3x3 = 27 tokens (odd: the last shard is padded), factorised T'=3 frames (padded to 4)
CASES = [
    ("full", "block", False, (3, 6, 6)),
    ("full", "single", True, (4, 4, 4)),
    ("factorised", "block", False, (3, 4, 6)),
    ("factorised", "single", True, (4, 6, 4)),
]


def tiny(attention: str, adaln: str, ckpt: bool) -> DiTConfig:
    return DiTConfig(hidden_size=32, depth=2, num_heads=4, patch_size=[1, 2, 2], in_channels=3,
                     text_dim=16, attention=attention, adaln=adaln, grad_checkpointing=ckpt)


def sp_worker(rank: int, port: int, out: str) -> None:
    """Each case: SP=1 reference (this process alone) then SP=2 over both processes; rank 0
    writes the largest differences of the output and of the group-averaged gradients."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    group, dp_rank, dp_world = sequence_groups(2)
    results = {"dp": [dp_rank, dp_world]}
    for attention, adaln, ckpt, (T, H, W) in CASES:
        torch.manual_seed(0)
        cfg = tiny(attention, adaln, ckpt)
        ref, sp = cfg.build(), cfg.build()
        for p in ref.parameters():  # non-zero everywhere (adaLN-Zero would hide the branches)
            torch.nn.init.normal_(p, std=0.2)
        sp.load_state_dict(ref.state_dict())
        ref.train(), sp.train()
        apply_sequence_parallel(sp, group)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(2, 3, T, H, W, generator=g)  # (B, C, T, H, W)
        t = torch.rand(2, generator=g)
        text = torch.randn(2, 5, 16, generator=g)  # (B, L, Dt)
        mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)  # padded captions
        target = torch.randn(2, 3, T, H, W, generator=g)
        out_ref = ref(x, t, text, mask)
        ((out_ref - target) ** 2).mean().backward()
        out_sp = sp(x, t, text, mask)
        ((out_sp - target) ** 2).mean().backward()
        grad_diff, n = 0.0, 0
        for (name, p_ref), (_, p_sp) in zip(ref.named_parameters(), sp.named_parameters()):
            g_sp = p_sp.grad.clone()
            dist.all_reduce(g_sp)
            g_sp /= 2  # what DeepSpeed's gradient averaging over the 2 ranks gives
            scale = p_ref.grad.abs().max().item() + 1e-12
            grad_diff = max(grad_diff, (g_sp - p_ref.grad).abs().max().item() / scale)
            n += 1
        results[f"{attention}-{adaln}-{ckpt}-{T}x{H}x{W}"] = {
            "out": (out_sp - out_ref).abs().max().item(), "grad_rel": grad_diff, "params": n,
            "out_scale": out_ref.abs().max().item()}
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def sp_results(tmp_path_factory) -> dict:
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path_factory.mktemp("sp") / "results.json"
    mp.start_processes(sp_worker, args=(port, str(out)), nprocs=2, start_method="spawn")
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", [f"{a}-{d}-{c}-{'x'.join(map(str, s))}" for a, d, c, s in CASES])
def test_sp2_output_and_gradients_equal_sp1(sp_results, case):
    r = sp_results[case]
    assert r["out_scale"] > 0.1  # the comparison is not between zeros
    assert r["out"] < 1e-5 * max(1.0, r["out_scale"])
    assert r["grad_rel"] < 1e-4, f"largest relative gradient difference {r['grad_rel']:.2e}"
    assert r["params"] > 20


def test_sp_groups_make_one_data_parallel_rank(sp_results):
    assert sp_results["dp"] == [0, 1]  # both ranks of the SP group read as data-parallel rank 0


def test_degrees_that_do_not_divide_are_refused_naming_the_valid_ones():
    check_sequence_parallel(num_heads=4, sequence_parallel=2, num_workers=4)
    with pytest.raises(ValueError, match=r"cluster.sequence_parallel=3 must divide the 2 training workers "
                                         r"\(cluster.num_workers\) and the 4 attention heads.*valid degrees here are \[1, 2\]"):
        check_sequence_parallel(num_heads=4, sequence_parallel=3, num_workers=2)
    with pytest.raises(ValueError, match=r"the 6 attention heads \(model.dit.num_heads\).*\[1, 2\]"):
        check_sequence_parallel(num_heads=6, sequence_parallel=4, num_workers=4)
