"""What makes a GroupedExperts forward capturable in a CUDA graph (no host read, host-known
shapes), checked on the CPU: which GEMM path runs, the reads each variant makes (counted by
`experiments.runtime.moe_layer.count_ops`), the device permutation against its twin, and the
[G + 1] offsets form of `grouped_linear`. The Triton variants run under Triton's interpreter in
a subprocess (TRITON_INTERPRET must be set before the kernels are defined)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from experiments.runtime.moe_layer import (
    GROUPED_VARIANTS,
    count_ops,
    experts_of,
    layer_weights,
    skewed_routing,
)
from probe.runtime.experts import GroupedExperts, gemm_path, grouped_linear
from probe.runtime.permute import permute_ref


def _layer(family="qwen3_moe", e=8, d=64, f=32, dtype=torch.float32):
    w = layer_weights(family, e, d, f, dtype, "cpu")
    x = torch.randn(12, d).to(dtype)
    ids, weights = skewed_routing(torch.Generator().manual_seed(3), 12, e, 2, "cpu")
    ids[ids == 1] = 2  # expert 1 gets no rows
    return w, x, ids, weights


def test_gemm_path_names_the_loop_that_reads_the_host():
    w, x, _, _ = _layer()
    assert gemm_path(x, w["w_gate_up"]) == "grouped_mm"  # float32 on this build's CPU
    assert gemm_path(x, w["w_gate_up"], use_grouped_mm=False) == "loop"
    assert gemm_path(x.double(), w["w_gate_up"].double()) == "loop"  # _grouped_mm: no fp64
    assert gemm_path(x[:, :60], w["w_gate_up"][:, :, :60].contiguous()) == "grouped_mm"
    odd = torch.randn(4, 2, 3, 7)[..., 0]  # [4, 2, 3] with strides that are not 16-byte rows
    assert gemm_path(torch.randn(5, 3), odd) == "loop"


def test_why_not_capturable_on_the_cpu_and_for_the_loop():
    w, x, _, _ = _layer()
    ex = experts_of("qwen3_moe", w, True)
    assert "CUDA" in ex.why_not_capturable(x)
    loop = experts_of("qwen3_moe", w, False)
    assert "CUDA" in loop.why_not_capturable(x)  # the device is the first reason


def test_grouped_variants_read_nothing_but_the_cpu_range_check():
    """The grouped forward's only host reads on the CPU are the slot range check's min and
    max (skipped for CUDA tensors); the per-expert loop also reads the group sizes."""
    w, x, ids, weights = _layer()
    ex = experts_of("qwen3_moe", w, True)
    ex.moe(x, ids, weights)  # warm-up: the one-time torch._grouped_mm probe reads its result
    counted = count_ops(lambda: ex.moe(x, ids, weights))
    assert counted["host_reads"] == 2, counted
    assert counted["ops"].get("_local_scalar_dense") == 2
    # the permutation: one sort and one searchsorted (no scatter_add / cumsum / cast chain)
    assert counted["ops"]["sort"] == 1 and counted["ops"]["searchsorted"] == 1
    assert "scatter_add_" not in counted["ops"] and "cumsum" not in counted["ops"]
    loop = experts_of("qwen3_moe", w, False)
    looped = count_ops(lambda: loop.moe(x, ids, weights))
    assert looped["host_reads"] == 4 and looped["ops"]["tolist"] == 2, looped  # per GEMM
    assert torch.allclose(loop.moe(x, ids, weights), ex.moe(x, ids, weights), atol=1e-5)


def test_permutation_equals_the_twin():
    e = 8
    for t, k in [(12, 2), (1, 1), (0, 2), (40, 4)]:
        ids = torch.randint(0, e, (t, k), generator=torch.Generator().manual_seed(t))
        ids[ids == 1] = 2
        ex = GroupedExperts(torch.zeros(e, 4, 8), torch.zeros(e, 8, 2), lambda g: g[:, :2])
        order, slot_sorted, offsets = ex._permutation(ids.reshape(-1), torch.device("cpu"))
        want = permute_ref(torch.zeros(t, 8), ids, e)
        assert torch.equal(order // max(k, 1), want.token)
        assert torch.equal(slot_sorted, want.slot)
        assert offsets.dtype == want.offsets.dtype == torch.int32
        assert torch.equal(offsets, want.offsets)


@pytest.mark.parametrize("use", [True, False])
def test_grouped_linear_takes_offsets_with_a_leading_zero(use):
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([3, 0, 5, 2])
    x = torch.randn(10, 16, generator=g)
    w = torch.randn(4, 8, 16, generator=g)
    b = torch.randn(4, 8, generator=g)
    slot = torch.repeat_interleave(torch.arange(4), counts)
    ends = counts.cumsum(0).to(torch.int32)
    full = torch.cat((torch.zeros(1, dtype=torch.int32), ends))
    want = grouped_linear(x, w, ends, b, slot, use_grouped_mm=use)
    assert torch.equal(grouped_linear(x, w, full, b, slot, use_grouped_mm=use), want)
    with pytest.raises(ValueError, match="offs must be"):
        grouped_linear(x, w, full[:3], use_grouped_mm=use)


_INTERPRETED = r"""
import json, sys, torch
from experiments.runtime.moe_layer import (GROUPED_VARIANTS, count_ops, experts_of,
                                           layer_weights, skewed_routing)
out = {}
for family in ("gpt_oss", "qwen3_moe"):
    w = layer_weights(family, 8, 64, 32, torch.bfloat16, "cpu")
    x = torch.randn(16, 64).to(torch.bfloat16)
    ids, weights = skewed_routing(torch.Generator().manual_seed(0), 16, 8, 2, "cpu")
    ref = experts_of(family, w, True).moe(x, ids, weights)
    for label, (fused, backend, permute) in GROUPED_VARIANTS.items():
        ex = experts_of(family, w, True, fused=fused, backend=backend, permute=permute)
        got = ex.moe(x, ids, weights)
        c = count_ops(lambda: ex.moe(x, ids, weights))
        again = ex.moe(x, ids, weights)
        out[f"{family} {label}"] = {
            "reads": c["host_reads"], "ops": c["device_ops"], "triton": c["triton"],
            "same_twice": bool(torch.equal(got, again)),
            "rel": float((got.float() - ref.float()).norm() / ref.float().norm())}
json.dump(out, sys.stdout)
"""


def test_triton_variants_read_nothing_but_the_cpu_range_check():
    """Under the interpreter: every variant's host reads are the two of the CPU range check,
    the Triton permutation is three launches plus the combine (and the fused GLU one), and a
    repeated call gives the same bits."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.getcwd())
    run = subprocess.run([sys.executable, "-c", _INTERPRETED], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout)
    assert len(out) == 2 * len(GROUPED_VARIANTS)
    for label, c in out.items():
        assert c["reads"] == 2, (label, c)
        assert c["same_twice"] and c["rel"] < 2e-2, (label, c)
    for family in ("gpt_oss", "qwen3_moe"):
        assert out[f"{family} grouped"]["triton"] == 0
        assert out[f"{family} grouped fused"]["triton"] == 1  # the fused GLU
        # count + scan + place, the fused GLU, the combine
        assert out[f"{family} fused + triton permute"]["triton"] == 5
        # fewer torch ops than the torch permutation and combine
        assert (out[f"{family} fused + triton permute"]["ops"]
                < out[f"{family} grouped fused"]["ops"])
