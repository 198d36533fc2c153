"""The CUDA parallel greedy (probe.planner.parallel_cuda) against the CPU kernel
(parallel.parallel_arrays), without a GPU:
- `run_sequential`: the kernel's source run as plain Python with one thread per block (its
  loops stride by the block size, so one thread does every thread's work): hundreds of layers.
- Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1, in a subprocess: it must be set before
  numba.cuda is first imported), 32 threads per block, through experiments.planner.gpu_parallel
  --device cpu --quick: the barriers and atomics of several threads, on a few small layers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments.planner.gpu_parallel import cpu_args, random_batch, same_layer
from probe.planner.cost import CostModel
from tests.sm90 import compile_for_sm90
from probe.planner.parallel import parallel_arrays
from probe.planner.parallel_ref import ParallelRules
from experiments.planner.cuda_sequential import sequential

parallel_cuda = pytest.importorskip("probe.planner.parallel_cuda")
ROOT = Path(__file__).resolve().parents[1]
# parallel_cuda's kernel run as plain Python, one thread per block (tests/cuda_sequential.py).
run_sequential = sequential(parallel_cuda._parallel_kernel)


def host_buffers(load, home, slots, window, cost, rules: ParallelRules, junk: int = 0) -> tuple:
    """_parallel_kernel's arguments as numpy arrays (scratch and outputs filled with junk)."""
    L, G, E = load.shape  # noqa: N806 (the shape letters)
    limit = rules.rounds_limit
    max_slots = max(int(np.minimum(slots, E).max(initial=0)), 1)
    cap_rep = max(int(np.minimum(slots, E).sum()), 1)
    cap_blk = max(min(E, limit * max(G // 2, 1)), 1)
    i64 = np.int64

    def full(shape, dtype=i64):
        return np.full(shape, junk, dtype)

    scratch = (full((L, E)), full((L, E, G)), full((L, G, E)), full((L, G)), full((L, G, E)),
               full((L, G, E), np.uint8), full((L, G, E)), full((L, G, G)),
               full((L, G, max_slots)), full((L, E)), full((L, G, E + max_slots)), full((L, G)),
               full((L, G)), full((L, G)), full((L, G)), full((L, G, G)), full((L, G, G)),
               full((L, G, G), np.uint8), full((L, G, E + max_slots)),
               full((L, G, E + max_slots)))
    out = (full((L, cap_rep, 3)), full(L), full((L, cap_blk)), full((L, cap_blk, G, G)),
           full(L), full(L), full(L), np.full(L, np.nan), full(L))
    return (load.astype(i64), np.asarray(home, bool), slots.astype(i64),
            window.astype(np.float64), float(cost.alpha), float(cost.beta),
            np.ascontiguousarray(cost.token_time), np.ascontiguousarray(cost.transfer_time),
            limit, rules.epsilon, rules.hot_fraction, *scratch, *out)


def layer_outputs(args: tuple, layer: int) -> tuple:
    rep, n_rep, blk_e, blk_a, n_blk, rounds, moves, objective, _ = args[-9:]
    return (rep[layer, :n_rep[layer]], blk_e[layer, :n_blk[layer]],
            blk_a[layer, :n_blk[layer]], int(rounds[layer]), int(moves[layer]),
            float(objective[layer]))


def test_sequential_kernel_equals_cpu_kernel():
    """300 random layers (launches of 1-3), any junk in the buffers beforehand: identical plans,
    rounds, moves and objective."""
    rng = np.random.default_rng(5)
    layers = moved = 0
    while layers < 300:
        batch = random_batch(rng, max_layers=3, max_ranks=10, max_experts=16)
        args = host_buffers(*batch, junk=int(rng.choice([0, 1, 3])))
        num_layers = batch[0].shape[0]
        run_sequential(*args, num_layers=num_layers)
        for layer in range(num_layers):
            ref = parallel_arrays(*cpu_args(batch, layer))
            assert same_layer(ref, layer_outputs(args, layer)), (layers, layer, batch[5])
            moved += ref[4] > 1
            layers += 1
        assert not args[-1].any()  # status
    assert moved >= 50


def test_sequential_kernel_on_a_decode_layer():
    """ep=16 / 64 experts, a skewed decode-like load on two nodes: several rounds, identical."""
    from experiments.planner.gpu_parallel import decode_batch

    batch = decode_batch("qwen3-235b-a22b", "h200x8-n2", 16, 64, 1, tokens_per_rank=96)
    args = host_buffers(*batch)
    run_sequential(*args, num_layers=1)
    ref = parallel_arrays(*cpu_args(batch, 0))
    assert ref[3] >= 2 and ref[4] > ref[3]
    assert same_layer(ref, layer_outputs(args, 0))


def test_sequential_flags_bad_values_per_layer():
    cost = CostModel.uniform(2, alpha=0.0, beta=1.0, token_time=0.0, transfer_time=1.0)
    home = np.stack([np.eye(2, dtype=bool)] * 3)
    load = np.array([[[0, 0], [8, 0]], [[0, -1], [8, 0]], [[0, 0], [8, 0]]])
    window = np.array([[1.0, 1.0], [1.0, 1.0], [np.nan, 1.0]])
    args = host_buffers(load, home, np.ones(2, np.int64), window, cost, ParallelRules())
    run_sequential(*args, num_layers=3)
    status, objective, moves = args[-1], args[-2], args[-3]
    assert status.tolist() == [0, 1, 2]
    assert np.isnan(objective[1:]).all() and moves[1:].tolist() == [0, 0]
    assert moves[0] == 1 and objective[0] == 4.0


def test_bad_input_errors():
    cost = CostModel.uniform(2, alpha=0.0, beta=1.0, token_time=0.0, transfer_time=1.0)
    home = np.eye(2, dtype=bool)
    with pytest.raises(ValueError, match="num_layers"):
        parallel_cuda.CudaParallel(home, 1, cost, num_layers=0)
    with pytest.raises(ValueError, match="threads"):
        parallel_cuda.CudaParallel(home, 1, cost, num_layers=1, threads=48)
    with pytest.raises(TypeError, match="cost"):
        parallel_cuda.CudaParallel(home, 1, "cost", num_layers=1)
    with pytest.raises(TypeError, match="rules"):
        parallel_cuda.CudaParallel(home, 1, cost, {"max_rounds": 2}, num_layers=1)
    with pytest.raises(ValueError, match="home"):
        parallel_cuda.CudaParallel(np.zeros((2, 2, 2, 2), bool), 1, cost, num_layers=2)
    big = CostModel.uniform(parallel_cuda.MAX_RANKS + 1, alpha=0.0, beta=1.0, token_time=0.0,
                            transfer_time=1.0)
    with pytest.raises(ValueError, match="MAX_RANKS"):
        parallel_cuda.CudaParallel(np.eye(parallel_cuda.MAX_RANKS + 1, dtype=bool), 1, big,
                                   num_layers=1)
    with pytest.raises(ValueError, match="load must be a 3-D"):
        parallel_cuda.parallel_cuda_arrays(np.zeros((2, 2)), home, 1, np.zeros((1, 2)), 0.0,
                                           1.0, cost.token_time, cost.transfer_time)


def test_gpu_parallel_script_runs_in_the_simulator(tmp_path):
    """experiments.planner.gpu_parallel --device cpu --quick: its correctness part in the CUDA
    simulator (random layers and a small decode layer, 32 threads per block), and its files."""
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "experiments.planner.gpu_parallel", "--device",
                           "cpu", "--quick", "--out", str(tmp_path)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_parallel.json").read_text())
    assert report["status"] == "finished" and not report["errors"]
    assert report["random"]["layers"] >= 2 and report["random"]["ok"]
    row = report["rows"][0]
    assert row["identical_layers"] == row["layers"] == 1 and row["moves"] >= 1
    assert not report["checks_failed"]
    assert "| ep=4, E=16 (simulator) | 1 / 1 |" in (tmp_path / "gpu_parallel.md").read_text()
    assert (tmp_path / "gpu_parallel.manifest.json").exists()


@pytest.mark.slow
def test_compiled_kernel_for_sm90():
    """The kernel compiles for an H200 (sm_90) without a GPU, where NVVM is installed (the
    simulator types shared arrays of non-constant size that the real compiler refuses); every
    product that feeds a sum is rounded on its own (mul.rn), and the only FMAs multiply by 2.0."""
    code = """
from probe.planner.cost import CostModel
from tests.sm90 import compile_for_sm90
from probe.planner.parallel_ref import ParallelRules
from probe.planner import parallel_cuda as pc
from tests.test_planner_parallel_cuda import host_buffers
L, G, E = 2, 8, 32
cost = CostModel(alpha=1e-5, beta=1e-7, token_time=np.full((G, G), 1e-8),
                 transfer_time=np.full((G, G), 1e-4))
home = np.zeros((L, G, E), bool)
for g in range(G):
    home[:, g, g * (E // G):(g + 1) * (E // G)] = True
args = host_buffers(np.ones((L, G, E), np.int64), home, np.full(G, 2), np.ones((L, G)), cost,
                    ParallelRules())
print(json.dumps(f64_ops(ptx_of(pc._parallel_kernel.py_func, args))))
"""
    found = compile_for_sm90(code)
    assert found["fma"] == found["fma_by_2"] and found["mul_rn"] > 10
