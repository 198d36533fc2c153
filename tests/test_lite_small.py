"""The lite planner's small-layer CUDA kernel (probe.planner.lite_small).

- Its source run as plain Python, one thread per block (experiments.planner.cuda_sequential),
  on 1,000 random layers in launches of 1-4: every layer's plan, rounds, moves and makespan
  equal the CPU kernel's (lite.lite_arrays), and bad layers get the CPU kernel's status.
- In Numba's CUDA simulator with two and four warps a block (its barriers, warp collectives
  and atomics): random layers equal the CPU kernel.
- It compiles for an H200 (sm_90) within the static shared memory a block may have, with
  native shared-memory atomics.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments.planner.cuda_sequential import sequential
from experiments.planner.gpu_lite import cpu_layer, random_batch, same
from tests.sm90 import compile_for_sm90
from tests.test_planner_lite import SM90_SETUP_OF, sequential_args, sequential_layers

lite_small = pytest.importorskip("probe.planner.lite_small")
ROOT = Path(__file__).resolve().parents[1]
_RUNS: dict = {}


def run_small(load, home, slots, window, cost, rules, junk: int = 0) -> tuple:
    """One launch of the small kernel, run sequentially (its buffers filled with junk first):
    (each layer's result as lite_arrays returns it, the kernel's arguments)."""
    num_layers = load.shape[0]
    launch, _ = sequential_args(load, home, slots, window, cost, rules, junk=junk)
    shape = lite_small.small_shape(*home.shape[1:])
    if shape not in _RUNS:
        _RUNS[shape] = sequential(lite_small.small_kernel(*shape))
    _RUNS[shape](*launch, num_layers=num_layers)
    return sequential_layers(launch, num_layers), launch


def test_sequential_small_kernel_equals_cpu_kernel_on_1000_layers():
    """1,000 random layers (2-8 ranks, up to 32 experts, 0-3 slots, random rules and costs),
    junk in the buffers beforehand: each layer's plan, rounds, moves and makespan equal the CPU
    kernel's, and the rows and blocks past the plan are -1 and zero."""
    rng = np.random.default_rng(21)
    layers = moved = 0
    while layers < 1000:
        num_layers = int(rng.integers(1, 5))
        load, home, slots, window, cost, rules = random_batch(rng, num_layers,
                                                               ranks=(2, 3, 4, 8))
        assert lite_small.small_fits(*home.shape[1:], int(slots.max(initial=0)), 128)
        got_layers, launch = run_small(load, home, slots, window, cost, rules,
                                       junk=int(rng.choice([0, 1, 3])))
        rep, n_rep, _, blk_a, n_blk = launch[-9:-4]
        for i, got in enumerate(got_layers):
            ref = cpu_layer(load[i], home[i], slots, window[i], cost, rules)
            assert same(ref, got), (layers, i)
            assert (rep[i, n_rep[i]:] == -1).all() and (blk_a[i, n_blk[i]:] == 0).all()
            moved += ref[5] > 0
        layers += num_layers
    assert moved > 400


def test_small_kernel_on_decode_layers_and_bad_layers():
    """ep=8 decode layers (128 experts, the shape the kernel is for) equal the CPU kernel; a
    negative load, a NaN window and an expert with 2**40 tokens get statuses 1, 2 and 3, and
    the other layers of the launch are planned."""
    from experiments.planner.gpu_harness import decode_layers
    from probe.planner.lite import LiteRules

    load, home, slots, window, cost = decode_layers("qwen3-235b-a22b", "h200x8", 8, 128, 3)
    rules = LiteRules()
    got, _ = run_small(load, home, slots, window, cost, rules, junk=1)
    for i in range(3):
        ref = cpu_layer(load[i], home[i], slots, window[i], cost, rules)
        assert same(ref, got[i]) and ref[5] > 0
    rng = np.random.default_rng(9)
    load, home, slots, window, cost, rules = random_batch(rng, 4, ranks=(4,))
    load[0, 1, 2] = -5
    window[2, 0] = np.nan
    load[3, 0, 1] = 1 << 40
    got, _ = run_small(load, home, slots, window, cost, rules, junk=3)
    assert [g[0] for g in got] == [1, 0, 2, 3]
    assert same(got[1], cpu_layer(load[1], home[1], slots, window[1], cost, rules))
    assert all(g[4:] == (0, 0, 0) and len(g[1]) == 0 for k, g in enumerate(got) if k != 1)


def test_small_fits_decides_where_the_kernel_runs():
    """ep=8 / 128 experts with up to 7 slots a rank fits (its plans use at most 64 expert
    blocks: one per slot and one per rank); 16 ranks, more blocks, more than 256 threads or a
    block of a partial warp do not (the generic kernel plans those)."""
    assert lite_small.small_shape(8, 128) == (8, 128)
    assert lite_small.small_shape(5, 100) == (8, 128)
    assert lite_small.small_fits(8, 128, 3, 128) and lite_small.small_fits(8, 128, 7, 256)
    assert lite_small.small_fits(4, 32, np.array([0, 3, 1, 2]), 64)
    assert not lite_small.small_fits(8, 128, 8, 128)  # 72 blocks
    assert not lite_small.small_fits(16, 64, 3, 128)  # its shared arrays are too large
    assert not lite_small.small_fits(32, 32, 3, 128)
    assert not lite_small.small_fits(8, 128, 9, 128)
    assert not lite_small.small_fits(8, 128, 3, 512)
    assert not lite_small.small_fits(8, 128, 3, 48)


def test_simulator_runs_the_small_kernel_with_several_warps():
    """Numba's CUDA simulator (a subprocess: it must be on before numba.cuda is imported),
    64 and 128 threads a block through lite_cuda.CudaLite, which picks the small kernel: random
    layers equal the CPU kernel, also with 2 ranks (one pair slot, more warps than slots)."""
    code = """
import json
import numpy as np
from experiments.planner.gpu_lite import cpu_layer, random_batch, same
from probe.planner.lite_cuda import CudaLite, CudaLitePlan
from probe.planner.numba_cuda import cuda
done = differ = small = 0

def check(batch, threads):
    global done, differ, small
    load, home, slots, window, cost, rules = batch
    runner = CudaLite(home, slots, cost, rules, num_layers=len(load), threads=threads)
    small += runner.small
    out = CudaLitePlan(*(a.copy_to_host() for a in runner.plan(cuda.to_device(load),
                                                                cuda.to_device(window))))
    for i in range(len(load)):
        n_rep, n_blk = int(out.num_replicas[i]), int(out.num_blocks[i])
        got = (int(out.status[i]), out.replicas[i, :n_rep], out.blk_expert[i, :n_blk],
               out.blk_assign[i, :n_blk], int(out.rounds[i]), int(out.moves[i]),
               int(out.makespan[i]))
        differ += not same(cpu_layer(load[i], home[i], slots, window[i], cost, rules), got)
        done += 1

rng = np.random.default_rng(5)
for threads in (64, 128, 64):
    check(random_batch(rng, 2, ranks=(4, 8)), threads)
# 2 ranks, 2 experts: one pair slot, fewer than the block's two warps (a layer moves)
check(random_batch(np.random.default_rng(11), 4), 64)
print(json.dumps([done, differ, small]))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NUMBA_ENABLE_CUDASIM": "1"}
    ran = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert json.loads(ran.stdout.strip().splitlines()[-1]) == [10, 0, 4]


def test_small_kernel_compiles_for_sm90_within_the_shared_memory():
    """The ep=8 / 128-expert kernel compiles for sm_90; its shared arrays take what
    small_fits counts (under the 48 KB a block may have), and its shared atomics are native
    ones (no 64-bit OR, which sm_90 runs as a compare-and-swap loop)."""
    code = SM90_SETUP_OF.format(ranks=8, experts=128) + """
from probe.planner.lite_cuda import launch_args
from probe.planner.lite_small import _shared_bytes, small_kernel, small_shape
args = launch_args(np.zeros((L, G, E), np.int64), home, np.zeros((L, G)), host.consts, scratch,
                   outputs)
ptx = ptx_of(small_kernel(*small_shape(G, E)).py_func, args)
print(json.dumps([sum(int(n) for n in re.findall(r"[.]shared [^;]*\\[(\\d+)\\];", ptx)),
                  _shared_bytes(*small_shape(G, E)),
                  sorted(set(re.findall(r"atom[.]shared[.][a-z.0-9]+", ptx)))]))
"""
    used, counted, atomics = compile_for_sm90(code)
    assert used <= counted <= lite_small.SHARED_BYTES < 48 * 1024
    assert "atom.shared.or.b64" not in atomics and "atom.shared.or.b32" in atomics
