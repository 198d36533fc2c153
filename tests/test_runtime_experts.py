"""Grouped experts (one grouped GEMM per projection) equal the per-expert loop, for every family.

The loop (`loop_experts`, one F.linear pair per expert) is the obviously correct twin. Inputs are
random with uneven expert loads and empty experts; float64 runs the per-group fallback (no
`torch._grouped_mm` for float64 on the CPU), float32 and bfloat16 run `torch._grouped_mm` where
this torch build has it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from probe.placement import sharded_home
from probe.runtime.config import MoEConfig, RopeConfig
from probe.runtime.dist import DistContext
from probe.runtime.ep import EPMoELayer, LayerExperts
from probe.runtime.experts import (
    GroupedExperts,
    grouped_default,
    grouped_linear,
    grouped_mm_available,
    loop_experts,
)
from probe.runtime.model import MoEBlock
from probe.runtime.pipeline import _expert_fn, _expert_params

FAMILIES = {
    "qwen3_moe": dict(router_scoring="softmax_topk", norm_topk_prob=True),
    "gpt_oss": dict(router_scoring="topk_softmax", router_bias=True, expert_act="clamped_swiglu",
                    expert_bias=True),
    "deepseek_v3": dict(router_scoring="sigmoid_group", n_group=2, topk_group=1,
                        norm_topk_prob=True, score_correction_bias=True),
}
NUM_EXPERTS = 6
HIDDEN, INTER = 32, 16


def family_block(family: str, dtype: torch.dtype, *, hidden: int = HIDDEN, inter: int = INTER,
                 expert_ids=None, seed: int = 0) -> MoEBlock:
    cfg = MoEConfig(model_type=family, vocab_size=16, hidden_size=hidden, num_layers=1,
                    num_heads=2, num_kv_heads=1, head_dim=8, num_experts=NUM_EXPERTS, top_k=2,
                    moe_intermediate_size=inter, rope=RopeConfig(theta=10000.0),
                    moe_layers=(0,), **FAMILIES[family])
    block = MoEBlock(cfg, 0, expert_ids)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            # std 0.7: gate/up values reach beyond GPT-OSS's clamp limit of 7 on some rows.
            p.copy_(torch.randn(p.shape, generator=g) * 0.7)
    return block.to(dtype)


def uneven_rows(counts: list[int], hidden: int, dtype: torch.dtype, seed: int = 1):
    """x [n, D] and a shuffled slot per row with exactly counts[i] rows of slot i."""
    g = torch.Generator().manual_seed(seed)
    slot = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    slot = slot[torch.randperm(slot.numel(), generator=g)]
    x = (torch.randn(slot.numel(), hidden, generator=g) * 2).to(dtype)
    return x, slot


def _loop(block: MoEBlock, x, slot):
    bias = block.cfg.expert_bias
    return loop_experts(x, slot, block.w_gate_up, block.w_down, block.activate,
                        block.b_gate_up if bias else None, block.b_down if bias else None)


TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 3e-2}


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max())


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("counts", [[0, 7, 1, 0, 12, 3], [5, 0, 0, 0, 0, 0], [1] * 6])
def test_grouped_equals_loop(family, dtype, counts):
    block = family_block(family, dtype)
    x, slot = uneven_rows(counts, HIDDEN, dtype)
    experts = GroupedExperts.from_block(block, grouped=True)
    with torch.no_grad():
        got = experts(x, slot)
        want = _loop(block, x, slot)
    assert got.dtype == dtype and got.shape == x.shape
    assert _rel(got, want) <= TOL[dtype], f"{family} {dtype}: rel diff {_rel(got, want)}"
    # The path really taken: _grouped_mm where this build has it for the dtype.
    assert experts.uses_grouped_mm() == grouped_mm_available(dtype, "cpu")
    if family == "gpt_oss":  # the clamp really acted on these inputs
        with torch.no_grad():
            gate_up = torch.einsum("nd,nfd->nf", x.double(), block.w_gate_up[slot].double())
        assert float(gate_up.abs().max()) > block.cfg.swiglu_limit


def test_grouped_mm_on_this_build():
    """What torch._grouped_mm does here, as the module doc states it for torch 2.13 on CPU."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    assert not grouped_mm_available(torch.float64, "cpu")
    if torch.__version__.startswith("2.13") and "+cpu" in torch.__version__:
        assert grouped_mm_available(torch.float32, "cpu")
        assert grouped_mm_available(torch.bfloat16, "cpu")


def test_grouped_linear_fallbacks_and_empty_input():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(3, 5, 6, generator=g)  # rows of 6 floats: not 16-byte aligned
    x = torch.randn(9, 6, generator=g)
    offs = torch.tensor([2, 2, 9], dtype=torch.int32)
    slot = torch.tensor([0, 0, 2, 2, 2, 2, 2, 2, 2])
    b = torch.randn(3, 5, generator=g)
    want = torch.cat([x[:2] @ w[0].T + b[0], x[2:] @ w[2].T + b[2]])
    for use in (True, False):
        got = grouped_linear(x, w, offs, b, slot, use_grouped_mm=use)
        assert torch.allclose(got, want, atol=1e-5)
    empty = grouped_linear(x[:0], w, torch.zeros(3, dtype=torch.int32))
    assert empty.shape == (0, 5)
    with pytest.raises(ValueError, match="bias needs slot"):
        grouped_linear(x, w, offs, b)
    experts = GroupedExperts(torch.randn(3, 8, 4), torch.randn(3, 4, 4), torch.relu)
    assert experts(torch.randn(0, 4), torch.zeros(0, dtype=torch.int64)).shape == (0, 4)


def test_grouped_experts_rejects_bad_input():
    act = torch.relu
    with pytest.raises(ValueError, match="must be 3-d"):
        GroupedExperts(torch.randn(8, 4), torch.randn(3, 4, 4), act)
    with pytest.raises(ValueError, match="does not fit"):
        GroupedExperts(torch.randn(3, 8, 4), torch.randn(3, 4, 5), act)
    with pytest.raises(ValueError, match="go together"):
        GroupedExperts(torch.randn(3, 8, 4), torch.randn(3, 4, 4), act, b_down=torch.randn(3, 4))
    experts = GroupedExperts(torch.randn(3, 8, 4), torch.randn(3, 4, 4), act)
    with pytest.raises(ValueError, match=r"slot must lie in \[0, 3\)"):
        experts(torch.randn(2, 4), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="one entry per row"):
        experts(torch.randn(2, 4), torch.tensor([0]))
    with pytest.raises(ValueError, match="one end per expert"):
        experts.forward_sorted(torch.randn(2, 4), torch.tensor([2], dtype=torch.int32))


def test_switch_from_environment(monkeypatch):
    monkeypatch.setenv("PROBE_GROUPED_EXPERTS", "0")
    assert grouped_default() is False
    assert family_block("qwen3_moe", torch.float32).grouped is False
    monkeypatch.setenv("PROBE_GROUPED_EXPERTS", "1")
    assert grouped_default() is True
    monkeypatch.setenv("PROBE_GROUPED_EXPERTS", "maybe")
    with pytest.raises(ValueError, match="PROBE_GROUPED_EXPERTS"):
        grouped_default()


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_block_grouped_forward_equals_loop(family, dtype):
    ids = (4, 1, 2, 5)
    block = family_block(family, dtype, expert_ids=ids)
    x, local = uneven_rows([3, 0, 9, 4], HIDDEN, dtype, seed=2)
    expert_of_row = torch.tensor(ids)[local]  # global ids
    with torch.no_grad():
        block.grouped = True
        got = block.grouped_forward(x, expert_of_row)
        block.grouped = False
        want = block.grouped_forward(x, expert_of_row)
        assert _rel(got, want) <= TOL[dtype]
        block.grouped = True
        with pytest.raises(ValueError, match="expert 0 is not held"):
            block.grouped_forward(x, torch.zeros_like(expert_of_row))
        # The whole block (router, top-k, experts, combine) agrees too.
        full = family_block(family, dtype)
        h = torch.randn(11, HIDDEN, generator=torch.Generator().manual_seed(4), dtype=dtype)
        got, _ = full(h)
        full.grouped = False
        want, _ = full(h)
        assert _rel(got, want) <= TOL[dtype]


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_ep_layer_single_process_grouped_equals_loop(family):
    """EPMoELayer alone (G = 1): grouped home experts equal the expert_fn loop."""
    dtype = torch.float32
    block = family_block(family, dtype)
    ctx = DistContext(0, 1, None, None, torch.device("cpu"))
    experts = LayerExperts(np.arange(NUM_EXPERTS), _expert_params(block))
    g = torch.Generator().manual_seed(6)
    x = torch.randn(13, HIDDEN, generator=g)
    topk_ids = torch.stack([torch.randperm(NUM_EXPERTS, generator=g)[:2] for _ in range(13)])
    topk_ids[:6] = torch.tensor([3, 5])  # skew; experts 0 / 1 may get no rows
    topk_w = torch.softmax(torch.randn(13, 2, generator=g), dim=-1)
    outs = []
    with torch.no_grad():
        for grouped in (True, False):
            layer = EPMoELayer(ctx, 0, NUM_EXPERTS, experts, _expert_fn(block),
                               combine=block.combine, activate=block.activate, grouped=grouped)
            assert (layer.grouped is not None) == grouped
            out, stats = layer.forward(x, topk_ids, topk_w)
            assert stats.pairs_processed == 26
            outs.append(out)
        want = block.combine(_loop(block, x.repeat_interleave(2, 0), topk_ids.reshape(-1))
                             .view(13, 2, -1), topk_w)
    assert _rel(outs[0], outs[1]) <= TOL[dtype]
    assert _rel(outs[0], want) <= TOL[dtype]


def _dedup_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=30))
    ctx = DistContext(rank, world, dist.group.WORLD, None, torch.device("cpu"))
    block = family_block("gpt_oss", torch.float64)  # biases and the clamp
    x, topk_ids, topk_w = _dedup_inputs(rank)
    out = {}
    with torch.no_grad():
        ids = np.flatnonzero(sharded_home(NUM_EXPERTS, world)[rank])
        params = {n: t[torch.as_tensor(ids)] for n, t in _expert_params(block).items()}
        for dedup in (True, False):
            layer = EPMoELayer(ctx, 0, NUM_EXPERTS, LayerExperts(ids, params), _expert_fn(block),
                               combine=block.combine, activate=block.activate, dedup=dedup)
            y, stats = layer.forward(x, topk_ids, topk_w)
            out[dedup] = (y, stats.pairs_sent, stats.rows_sent)
    torch.save(out, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def _dedup_inputs(rank: int):
    g = torch.Generator().manual_seed(40 + rank)
    x = torch.randn(9, HIDDEN, generator=g, dtype=torch.float64) * 2
    topk_ids = torch.stack([torch.randperm(NUM_EXPERTS, generator=g)[:2] for _ in range(9)])
    topk_ids[:4] = torch.tensor([[0, 1], [1, 2], [4, 5], [5, 3]])  # both pairs on one rank
    topk_w = torch.softmax(torch.randn(9, 2, generator=g, dtype=torch.float64), dim=-1)
    return x, topk_ids, topk_w


def test_dispatch_dedup_two_ranks(tmp_path):
    """A token goes once to a rank that runs several of its experts; outputs are unchanged."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_dedup_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    block = family_block("gpt_oss", torch.float64)
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        x, topk_ids, topk_w = _dedup_inputs(rank)
        with torch.no_grad():
            want = block.combine(_loop(block, x.repeat_interleave(2, 0), topk_ids.reshape(-1))
                                 .view(9, 2, -1), topk_w)
        y_on, pairs_on, rows_on = out[True]
        y_off, pairs_off, rows_off = out[False]
        assert torch.equal(y_on, y_off)
        assert float((y_on - want).abs().max()) <= 1e-12
        assert pairs_on.tolist() == pairs_off.tolist() == rows_off.tolist()
        assert pairs_on.sum() == 18
        assert (rows_on <= pairs_on).all() and rows_on.sum() < pairs_on.sum()
        # rows_sent counts distinct tokens per destination
        home = np.argmax(sharded_home(NUM_EXPERTS, 2), axis=0)
        dest = torch.as_tensor(home)[topk_ids]
        want_rows = [len({t for t in range(9) if (dest[t] == g).any()}) for g in range(2)]
        assert rows_on.tolist() == want_rows
