"""The Triton permutation and weighted combine against their torch twins, on CPU through
Triton's interpreter (in a subprocess: TRITON_INTERPRET must be set before the kernels are
defined)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from probe.runtime.permute import combine_ref, permute_ref  # noqa: E402

_CHECK = r"""
import json, sys, torch
from probe.runtime.permute import combine, combine_ref, permute, permute_ref
out = []
# (T, K, E, D): T = 1, K = 1 and 8, E up to 256, D not a power of two, several count blocks
# (E = 8: 128 pairs a block; E = 256: 32 pairs a block, 50 blocks scanned 32 at a time), no
# tokens at all
for t, k, e, d in [(1, 1, 1, 8), (1, 8, 256, 16), (5, 2, 3, 20), (33, 8, 256, 24),
                   (300, 4, 8, 40), (50, 1, 5, 3), (70, 8, 64, 1100), (200, 8, 256, 8),
                   (0, 2, 4, 8)]:
    g = torch.Generator().manual_seed(t + k + e)
    x = torch.randn(t, d, generator=g).to(torch.bfloat16)
    ids = torch.randint(0, e, (t, k), generator=g)
    if e > 3:
        ids[ids == 1] = 2  # expert 1 gets no rows
    got, want = permute(x, ids, e), permute_ref(x, ids, e)
    same = {f: getattr(got, f).dtype == getattr(want, f).dtype
            and torch.equal(getattr(got, f), getattr(want, f))
            for f in ("token", "slot", "offsets", "inv", "rows")}
    bare = permute(x, ids, e, gather_rows=False)
    same["no rows"] = bare.rows is None and torch.equal(bare.inv, want.inv)
    w = torch.rand(t, k, generator=g)
    y = torch.randn(t * k, d, generator=g)
    exact = torch.equal(combine(y, got.inv, w), combine_ref(y, want.inv, w))  # fp32 out
    yb = y.to(torch.bfloat16)
    a, b = combine(yb, got.inv, w).float(), combine_ref(yb, want.inv, w).float()
    ulp = bool(((a - b).abs() <= b.abs() * 2 ** -7).all())  # bf16 out: one rounding apart
    out.append([t, k, e, d, same, exact, ulp, list(a.shape)])
json.dump(out, sys.stdout)
"""


def test_kernels_match_the_twins_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", _CHECK], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(rows) == 9
    for t, k, e, d, same, exact, ulp, shape in rows:
        assert all(same.values()), (t, k, e, same)
        # the interpreter rounds fp32 -> bf16 by truncation, so bf16 outputs are compared
        # within one bf16 step; fp32 outputs bitwise
        assert exact and ulp, (t, k, e, exact, ulp)
        assert shape == [t, d]


def test_twin_sorts_stably_and_inverts():
    ids = torch.tensor([[2, 0], [0, 2], [1, 0]])
    x = torch.arange(3, dtype=torch.float32)[:, None].expand(3, 4).contiguous()
    p = permute_ref(x, ids, 4)
    # pairs (t, j) in flat order 0..5 have experts 2 0 0 2 1 0: sorted 1 2 5 | 4 | 0 3
    assert p.token.tolist() == [0, 1, 2, 2, 0, 1]
    assert p.slot.tolist() == [0, 0, 0, 1, 2, 2]
    assert p.offsets.tolist() == [0, 3, 4, 6, 6]  # expert 3 empty
    assert p.inv.tolist() == [[4, 0], [1, 5], [3, 2]]
    assert torch.equal(p.rows[:, 0], p.token.float())
    y = torch.arange(6, dtype=torch.float32)[:, None]  # row r holds r
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    assert combine_ref(y, p.inv, w).flatten().tolist() == [4 + 0, 3 + 20, 15 + 12]


@pytest.mark.parametrize("call, match", [
    (lambda: permute_ref(torch.zeros(3, 4), torch.zeros(2, 1, dtype=torch.int64), 2),
     r"topk_ids must be \[T, K\] with T = 3"),
    (lambda: permute_ref(torch.zeros(3, 4), torch.full((3, 1), 2), 2),
     r"topk_ids must lie in \[0, 2\)"),
    (lambda: permute_ref(torch.zeros(3), torch.zeros(3, 1, dtype=torch.int64), 2),
     r"x must be \[T, D\]"),
    (lambda: permute_ref(torch.zeros(3, 4), torch.zeros(3, 1), 2), r"integer tensor"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


_EXPERTS = r"""
import json, sys, torch
from probe.runtime import experts as ex
from probe.runtime.glu import GluSpec
from probe.runtime.quant import PackedWeight
out = {}
g = torch.Generator().manual_seed(4)
e, d, f, t, k = 6, 32, 16, 23, 3
spec = GluSpec("clamped_swiglu", 1.702, 7.0)
w = {"w_gate_up": torch.randn(e, 2 * f, d, generator=g) * d ** -0.5,
     "w_down": torch.randn(e, d, f, generator=g) * f ** -0.5,
     "b_gate_up": torch.randn(e, 2 * f, generator=g) * 0.1,
     "b_down": torch.randn(e, d, generator=g) * 0.1}
x = torch.randn(t, d, generator=g)
ids = torch.randint(0, e, (t, k), generator=g)
ids[ids == 4] = 5  # an empty expert
tw = torch.softmax(torch.randn(t, k, generator=g), -1)

def make(dtype, **opts):
    return ex.GroupedExperts(*(w[n].to(dtype) for n in ("w_gate_up", "w_down")), spec,
                             b_gate_up=w["b_gate_up"].to(dtype), b_down=w["b_down"].to(dtype),
                             **opts)

def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())

with torch.no_grad():
    torch_path, triton_path = make(torch.float32), make(torch.float32, permute="triton")
    slot = ids[:, 0]
    out["call exact"] = torch.equal(triton_path(x, slot), torch_path(x, slot))
    out["moe"] = rel(triton_path.moe(x, ids, tw), torch_path.moe(x, ids, tw))
    custom = lambda y, wt: y[:, 0] * 2  # a combine of its own: un-permuted rows
    out["moe custom exact"] = torch.equal(triton_path.moe(x, ids, tw, custom),
                                          torch_path.moe(x, ids, tw, custom))
    # "gather": the gate/up GEMM (the Triton kernel, let run on the CPU here) gathers the rows
    calls = []
    real = ex.grouped_matmul
    ex.grouped_matmul = lambda *a, **kw: calls.append(kw.get("x_index")) or real(*a, **kw)
    ex.packed_kernel_applies = lambda xx, ww: xx.dtype == torch.bfloat16
    xb = x.to(torch.bfloat16)
    gather = make(torch.bfloat16, backend="triton", permute="gather", glu=spec)
    ref = make(torch.float32).moe(x, ids, tw)
    out["gather"] = rel(gather.moe(xb, ids, tw), ref)
    out["gather x_index"] = [c is not None for c in calls]
json.dump(out, sys.stdout)
"""


def test_grouped_experts_triton_permute_equals_torch():
    """GroupedExperts with permute "triton" and "gather" against the torch permutation."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", _EXPERTS], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["call exact"] and out["moe custom exact"]
    assert out["moe"] < 1e-6  # the fp32 sum over K in another order at most
    assert out["gather"] < 2e-2  # bf16 weights and activations against fp32
    assert out["gather x_index"] == [True, False]  # gate/up gathers, down does not


def test_grouped_experts_rejects_an_unknown_permute():
    from probe.runtime.experts import GroupedExperts

    with pytest.raises(ValueError, match=r"permute must be one of \('torch', 'triton', "
                                         r"'gather'\), got 'fast'"):
        GroupedExperts(torch.randn(2, 8, 4), torch.randn(2, 4, 4), torch.relu, permute="fast")
