"""The fused gate/up bias + nonlinearity kernel against the torch reference, on CPU through
Triton's interpreter (in a subprocess: TRITON_INTERPRET must be set before the kernel is
defined), and GroupedExperts with it against the per-expert loop."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from probe.runtime.glu import GluSpec  # noqa: E402

_CHECK = r"""
import json, sys, torch
from probe.runtime.glu import GluSpec, fused_glu
from probe.runtime.experts import GroupedExperts, loop_experts
from tests.test_runtime_experts import family_block, uneven_rows, _loop
out = []
g = torch.Generator().manual_seed(0)
for kind in ("silu", "clamped_swiglu"):
    spec = GluSpec(kind)
    for n, width, with_bias in ((7, 24, True), (5, 1100, False), (0, 8, True)):
        gate_up = torch.randn(n, 2 * width, generator=g) * 4  # reaches past the clamp at 7
        bias = torch.randn(3, 2 * width, generator=g) if with_bias else None
        slot = torch.randint(0, 3, (n,), generator=g) if with_bias else None
        got = fused_glu(gate_up, spec, bias, slot)
        want = spec(gate_up + (bias[slot] if with_bias else 0))
        err = float((got - want).abs().max()) if n else 0.0
        out.append([kind, n, width, with_bias, err, list(got.shape)])
# the fused path inside GroupedExperts (gpt-oss: biases, clamped SwiGLU) equals the loop
for family in ("gpt_oss", "qwen3_moe"):
    block = family_block(family, torch.float32)
    x, slot = uneven_rows([0, 7, 1, 0, 12, 3], 32, torch.float32)
    experts = GroupedExperts.from_block(block, grouped=True, fused=True)
    with torch.no_grad():
        got = experts(x, slot)
        want = _loop(block, x, slot)
    out.append([family, float((got - want).abs().max() / want.abs().max())])
json.dump(out, sys.stdout)
"""


def test_fused_glu_matches_the_reference_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", _CHECK], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(rows) == 8
    for kind, n, width, _, err, shape in rows[:6]:
        assert shape == [n, width]
        assert err < 1e-4, (kind, n, width, err)
    for family, rel in rows[6:]:
        assert rel < 1e-4, (family, rel)


def test_glu_spec_is_the_block_activation():
    from tests.test_runtime_experts import family_block

    g = torch.Generator().manual_seed(2)
    for family, kind in (("gpt_oss", "clamped_swiglu"), ("qwen3_moe", "silu")):
        block = family_block(family, torch.float32)
        spec = GluSpec.of_config(block.cfg)
        assert spec.kind == kind
        gate_up = torch.randn(9, 2 * 16, generator=g) * 5
        assert torch.equal(spec(gate_up), block.activate(gate_up))
    with pytest.raises(ValueError, match="GluSpec.kind must be one of"):
        GluSpec("gelu")
    from probe.runtime.glu import fused_glu
    if not os.environ.get("TRITON_INTERPRET"):
        with pytest.raises(RuntimeError, match="fused_glu needs triton and a CUDA tensor"):
            fused_glu(torch.zeros(2, 4), GluSpec())
