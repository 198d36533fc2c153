"""The GEMM tuning of experiments/runtime/moe_layer.py (`--tune`) and the configs it hands to
GroupedExperts (`GemmConfigs`): every candidate config's output against the default config's,
the winner is the fastest timed, and the tuned layer runs the winners and equals the untuned
one. Triton runs under its interpreter on the CPU (in a subprocess: TRITON_INTERPRET must be
set before the kernels are defined); the timings there mean nothing, so the selection is
checked with made-up times."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from experiments.runtime.moe_layer import QUICK_TUNE_CANDIDATES, TUNE_CANDIDATES
from probe.runtime.experts import GemmConfigs, GroupedExperts
from probe.runtime.quant_gemm import DEFAULT_CONFIGS, KernelConfig


def test_candidates_start_with_the_default_and_are_distinct():
    assert TUNE_CANDIDATES[0] == DEFAULT_CONFIGS["bf16"]
    assert len(set(TUNE_CANDIDATES)) == len(TUNE_CANDIDATES)
    assert len({c.label() for c in TUNE_CANDIDATES}) == len(TUNE_CANDIDATES)
    assert set(QUICK_TUNE_CANDIDATES) <= set(TUNE_CANDIDATES)
    assert QUICK_TUNE_CANDIDATES[0] == DEFAULT_CONFIGS["bf16"]


def test_gemm_configs_validate_and_label():
    cfg = KernelConfig(block_m=32, swap_ab=True)
    assert GemmConfigs(gate_up=cfg).label() == "gate/up 32x128x64/w4/s3/swap, down default"
    with pytest.raises(TypeError, match="GemmConfigs.down must be a KernelConfig or None"):
        GemmConfigs(down=(64, 128, 64))
    w_gu, w_dn = torch.zeros(2, 8, 4), torch.zeros(2, 4, 4)
    with pytest.raises(TypeError, match="gemm_configs must be a GemmConfigs or None, got"):
        GroupedExperts(w_gu, w_dn, torch.relu, gemm_configs=cfg)
    assert GroupedExperts(w_gu, w_dn, torch.relu).gemm_configs == GemmConfigs()


def test_gemm_configs_leave_the_torch_paths_alone():
    """Off the Triton kernel (the CPU) the configs change nothing: the same bits."""
    g = torch.Generator().manual_seed(3)
    w_gu, w_dn = torch.randn(4, 16, 8, generator=g), torch.randn(4, 8, 8, generator=g)
    x, slot = torch.randn(10, 8, generator=g), torch.randint(0, 4, (10,), generator=g)
    act = lambda gu: torch.nn.functional.silu(gu[:, :8]) * gu[:, 8:]  # noqa: E731
    tuned = GemmConfigs(KernelConfig(block_m=16), KernelConfig(block_n=64))
    want = GroupedExperts(w_gu, w_dn, act, backend="triton")(x, slot)
    got = GroupedExperts(w_gu, w_dn, act, backend="triton", gemm_configs=tuned)(x, slot)
    assert torch.equal(got, want)


_INTERPRETED = r"""
import json, sys, torch
import probe.runtime.experts as experts_mod
from experiments.runtime.moe_layer import (REL_TOL, TUNE_CANDIDATES, GROUPED_VARIANTS,
                                           experts_of, layer_weights, skewed_routing,
                                           tune_gemms, tuned_experts)
from probe.runtime.quant_gemm import DEFAULT_CONFIGS

# the layer's Triton GEMM runs on CUDA rows only: let it take these CPU rows (interpreter)
experts_mod.packed_kernel_applies = lambda x, w: x.dtype == torch.bfloat16
seen = []
kernel = experts_mod.grouped_matmul
def recording(*args, config=None, **kwargs):
    seen.append(None if config is None else config.label())
    return kernel(*args, config=config, **kwargs)
experts_mod.grouped_matmul = recording

out = {}
n_cand = len(TUNE_CANDIDATES)
for family in ("gpt_oss", "qwen3_moe"):
    w = layer_weights(family, 8, 64, 32, torch.bfloat16, "cpu")
    gen = torch.Generator().manual_seed(1)
    inputs = [(torch.randn(16, 64).to(torch.bfloat16), *skewed_routing(gen, 16, 8, 2, "cpu"))
              for _ in range(2)]
    calls = []
    def fake_time(step, staged):
        # made-up times: gate/up (first n_cand calls) fastest last, down fastest third
        i = len(calls)
        step(*staged[-1])  # runs on every staged input set
        calls.append(i)
        return 1.0 - 0.01 * i if i < n_cand else (0.5 if i == n_cand + 2 else 1.0)
    configs, record = tune_gemms(family, w, inputs, 2, TUNE_CANDIDATES, fake_time)
    x, ids, weights = inputs[0]
    fused, backend, permute = GROUPED_VARIANTS["triton gather"]
    seen.clear()
    untuned = experts_of(family, w, True, fused=fused, backend=backend,
                         permute=permute).moe(x, ids, weights)
    seen_untuned = list(seen)
    seen.clear()
    tuned = tuned_experts(family, w, configs).moe(x, ids, weights)
    out[family] = {
        "record": record, "gate_up": configs.gate_up.label(), "down": configs.down.label(),
        "seen_untuned": seen_untuned, "seen_tuned": list(seen),
        "rel": float((tuned.float() - untuned.float()).norm() / untuned.float().norm()),
        "labels": [c.label() for c in TUNE_CANDIDATES],
        "default": DEFAULT_CONFIGS["bf16"].label(), "tol": REL_TOL}
json.dump(out, sys.stdout)
"""


def _interpreted(code: str):
    """Run code in a fresh interpreter under Triton's interpreter; the JSON its last line
    prints."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.getcwd())
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # about a minute under the interpreter
def test_tuning_checks_every_candidate_and_the_layer_runs_the_winners():
    pytest.importorskip("triton")
    out = _interpreted(_INTERPRETED)
    for family, r in out.items():
        labels, rec = r["labels"], r["record"]
        for gemm in ("gate_up", "down"):
            trials = rec[gemm]["candidates"]
            # every candidate ran, matched the default config's output, and was timed
            assert list(trials) == labels, (family, gemm)
            assert all("seconds" in t and t["rel_err"] <= r["tol"] for t in trials.values()), \
                trials
            assert rec[gemm]["default"] == r["default"] == labels[0]
            fastest = min(trials, key=lambda c: trials[c]["seconds"])
            assert rec[gemm]["winner"] == fastest
            assert rec[gemm]["winner_seconds"] == trials[fastest]["seconds"]
        # the made-up times: gate/up's last candidate, down's third
        assert rec["gate_up"]["winner"] == r["gate_up"] == labels[-1]
        assert rec["down"]["winner"] == r["down"] == labels[2]
        # the untuned layer runs the default (None), the tuned one the winners, in order
        assert r["seen_untuned"] == [None, None]
        assert r["seen_tuned"] == [labels[-1], labels[2]]
        assert r["rel"] <= r["tol"], (family, r["rel"])


_BENCH = r"""
import json, sys, time, torch
import probe.runtime.experts as experts_mod
import experiments.runtime.moe_layer as ml
from experiments.calibration.calibrate_h200 import Timer

# What only CUDA does, stood in for on the CPU: the layer's Triton GEMM takes CPU rows (the
# interpreter runs it), the shape counts as tunable, and "graph replay" is an eager pass.
experts_mod.packed_kernel_applies = lambda x, w: x.dtype == torch.bfloat16
ml.tune_skipped = lambda name, device, candidates: None
def eager(step, staged, timer, eager_out=None):
    t = time.perf_counter()
    for s in staged:
        step(*s)
    return {"seconds": (time.perf_counter() - t) / len(staged)}
ml.time_graph = eager
device, timer = torch.device("cpu"), Timer(torch.device("cpu"), warmup=0, repeats=1)
hw = {"bandwidth": 1e11, "matmul_flops": 1e12}
name = "gpt-oss (tiny)"
rows = ml.bench_shape(name, ml.QUICK_SHAPES[name], (16,), timer, device, torch.bfloat16, hw,
                      None, ml.QUICK_TUNE_CANDIDATES, None)
meta = {"device_name": "cpu", "dtype": "bfloat16", "summary": ml.summary(rows, 16)}
json.dump({"rows": rows, "md": ml.markdown(rows, hw, meta), "summary": meta["summary"]},
          sys.stdout)
"""


@pytest.mark.slow  # a minute or two under the interpreter
def test_bench_shape_tunes_then_times_the_tuned_variant():
    """moe_layer's CUDA-only branch (tune, check the winners against the untuned kernel and the
    CPU twin, time `triton gather tuned` and its GEMM step, report), run on the CPU with the
    GPU-only pieces stood in for (see _BENCH)."""
    from experiments.runtime.moe_layer import QUICK_TUNE_CANDIDATES, REL_TOL, TUNED

    pytest.importorskip("triton")
    out = _interpreted(_BENCH)
    (row,) = out["rows"]
    tuning = row["tuning"]
    assert "skipped" not in tuning, tuning
    labels = [c.label() for c in QUICK_TUNE_CANDIDATES]
    for gemm in ("gate_up", "down"):
        assert list(tuning[gemm]["candidates"]) == labels
        assert tuning[gemm]["winner"] in labels
    assert tuning["configs"] == (f"gate/up {tuning['gate_up']['winner']}, "
                                 f"down {tuning['down']['winner']}")
    assert tuning["rel_err_vs_untuned"] <= REL_TOL and tuning["twin_rel_err"] <= REL_TOL
    assert TUNED in row["seconds"] and row["rel_err_vs_grouped"][TUNED] <= REL_TOL
    assert TUNED in row["ops_per_layer"] and TUNED not in row["errors"]
    assert "gemms triton gather tuned" in row["parts"]
    md = out["md"]
    assert f"| {row['shape']} | 16 | " in md.split("GEMM tuning")[1]
    assert f"| {row['shape']} | gate/up | {labels[1]} | " in md
    assert "GEMM configs tuned: " + tuning["configs"] in out["summary"][0]
