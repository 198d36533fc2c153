"""The lite planner (probe.planner.lite) and its CUDA kernel (probe.planner.lite_cuda).

- The plain-Python core and the Numba host path make the same plan; every plan passes the
  independent checker, and the makespan the kernel reports equals the plan's rank times
  recomputed in ticks from its dense assignment (an independent count of the bookkeeping).
- The CUDA kernel without a GPU: its source run as plain Python, one thread per block
  (experiments.planner.cuda_sequential) on 1,000 random layers, and in Numba's CUDA simulator
  with several threads per block (barriers and atomics) through experiments.planner.gpu_lite.
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
from experiments.planner.gpu_harness import decode_layers
from experiments.planner.gpu_lite import cpu_layer, random_batch, same
from probe.planner import BalanceProblem, CostModel, check_plan, solve
from probe.planner.check import rank_times
from probe.planner.greedy import plan_from_arrays
from probe.planner.lite import (
    KEY_MAX_TOKENS,
    TICK,
    LiteRules,
    cost_ticks,
    home_lists,
    kernel_args,
    lite_arrays,
    lite_core,
    lite_plan,
    window_ticks,
)
from tests.sm90 import compile_for_sm90

lite_cuda = pytest.importorskip("probe.planner.lite_cuda")
ROOT = Path(__file__).resolve().parents[1]


def tick_makespan(problem: BalanceProblem, assignment: np.ndarray) -> int:
    """The largest rank time of a dense assignment [S, E, G], in ticks, counted directly."""
    a, b, tt, _ = cost_ticks(problem.cost.alpha, problem.cost.beta, problem.cost.token_time,
                             problem.cost.transfer_time)
    tokens = assignment.sum(axis=0).T  # [G, E]
    comp = ((tokens > 0) * (a + b * tokens)).sum(axis=1)
    flow = assignment.sum(axis=1)  # [S, G] tokens sent s -> g
    traffic = flow * tt
    np.fill_diagonal(traffic, 0)
    tin, tout = traffic.sum(axis=0), traffic.sum(axis=1)
    return int((comp + 2 * np.maximum(tin, tout)).max())


def problems(seed: int, count: int):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        load, home, slots, window, cost, rules = random_batch(rng, 1)
        yield BalanceProblem(load[0], home[0], slots, window[0], cost), rules


def test_core_and_host_path_agree_and_plans_are_feasible():
    """200 random layers: lite_core (plain Python) == lite_arrays (Numba), the plan passes
    check_plan, and the reported makespan is the plan's own in ticks."""
    moved = 0
    for problem, rules in problems(1, 200):
        args = kernel_args(problem, rules)
        ref = lite_core(*args)
        assert same(ref, lite_arrays(*args))
        assert ref[0] == 0
        plan = plan_from_arrays(problem, *ref[1:4])
        assert check_plan(problem, plan) == []
        assert ref[6] == tick_makespan(problem, plan.assignment)
        moved += ref[5] > 0
    assert moved > 50  # the instances do move tokens


def test_solve_lite_on_decode_layers_balances():
    """ep=8 decode layers: solve(..., "lite") lowers eq. 8 well below the static plan and
    "lite_ref" gives the same plan."""
    load, home, slots, window, cost = decode_layers("qwen3-235b-a22b", "h200x8", 8, 128, 2)
    for layer in range(2):
        problem = BalanceProblem(load[layer], home[layer], slots, window[layer], cost)
        fast, ref = solve(problem, "lite"), solve(problem, "lite_ref")
        static = solve(problem, "static")
        assert fast.status == "feasible" and np.array_equal(fast.plan.assignment,
                                                            ref.plan.assignment)
        comp, comm = rank_times(problem, fast.plan.assignment)
        assert (comp + comm).max() / (comp + comm).mean() < 1.02
        assert fast.objective < 0.8 * static.objective


def test_more_rounds_never_raise_the_makespan():
    for problem, _ in problems(2, 40):
        spans = [lite_core(*kernel_args(problem, LiteRules(max_rounds=r)))[6]
                 for r in (1, 2, 4, 16)]
        assert spans == sorted(spans, reverse=True)


def test_bad_values_give_a_status_or_a_clear_error():
    problem, rules = next(problems(3, 1))
    args = list(kernel_args(problem, rules))
    bad_load = args[0].copy()
    bad_load[0, 0] = -1
    assert lite_core(bad_load, *args[1:])[0] == 1
    bad_window = args[3].copy()
    bad_window[0] = window_ticks(float("nan"))
    assert lite_core(*args[:3], bad_window, *args[4:])[0] == 2
    huge = args[0].copy()
    huge[0, 0] = KEY_MAX_TOKENS
    assert lite_core(huge, *args[1:])[0] == 3
    with pytest.raises(ValueError, match="too large"):
        slow = BalanceProblem(problem.load * 0 + 10**6, problem.home, problem.slots,
                              problem.window, CostModel(1.0, 1.0, problem.cost.token_time,
                                                        problem.cost.transfer_time))
        lite_plan(slow)
    for bad in ({"max_rounds": 0}, {"eps_ppm": -1}, {"eps_ppm": 10**6}, {"hot_sixteenths": 0},
                {"hot_sixteenths": 17}):
        with pytest.raises(ValueError):
            LiteRules(**bad)
    with pytest.raises(TypeError):
        LiteRules(max_rounds=2.0)
    assert window_ticks(float("inf")) == 1 << 62 and window_ticks(1e-9) == round(1e-9 / TICK)


def sequential_args(load, home, slots, window, cost, rules, junk: int = 0) -> tuple:
    """The planner kernel's arguments as numpy arrays for a launch (scratch and outputs filled
    with junk, so that nothing depends on their earlier contents), and the two start kernels'
    (lite_cuda.start_args)."""
    host = lite_cuda.host_arrays(np.asarray(home, bool), slots, cost, rules)
    scratch = [np.full(shape, junk, dtype) for shape, dtype in host.scratch]
    outputs = [np.full(shape, junk, dtype) for shape, dtype in host.outputs]
    load = np.ascontiguousarray(load, np.int64)
    home = np.asarray(home, bool)
    window = np.ascontiguousarray(window, np.float64)
    return (lite_cuda.launch_args(load, home, window, host.consts, scratch, outputs),
            lite_cuda.start_args(load, home, host.consts, scratch, outputs))


_RUNS: dict = {}


def run_sequential(launch: tuple, num_layers: int, inline: bool | None = None,
                   shared: bool = True) -> tuple:
    """A launch run sequentially on the arrays of `sequential_args`: the planner's kernel
    alone when it starts inline (inline None: as CudaLite chooses for the shape), with the
    layer's counts in shared memory where they fit (shared, as CudaLite does) or in the global
    scratch, else the two start kernels first; returns the planner's arguments (outputs
    filled in)."""
    args, (zero, split) = launch
    ranks, experts = args[1].shape[1:]
    if inline is None:
        inline = lite_cuda.starts_inline(ranks, experts)
    gm = lite_cuda.kernel_ranks(ranks)
    state = lite_cuda.shared_state(ranks, experts) if inline and shared else None
    planner = (gm, inline, state)
    for key, fn in (("zero", lite_cuda._zero_kernel), ("split", lite_cuda._split_kernel),
                    (planner, lite_cuda.kernel(gm, inline_start=inline, state=state))):
        if key not in _RUNS:
            _RUNS[key] = sequential(fn)
    if not inline:
        _RUNS["zero"](*zero, num_layers=num_layers)
        _RUNS["split"](*split, num_layers=num_layers)
    _RUNS[planner](*args, num_layers=num_layers)
    return args


def sequential_layers(args: tuple, num_layers: int) -> list:
    rep, n_rep, blk_e, blk_a, n_blk, rounds, moves, makespan, status = args[-9:]
    return [(int(status[i]), rep[i, :n_rep[i]], blk_e[i, :n_blk[i]], blk_a[i, :n_blk[i]],
             int(rounds[i]), int(moves[i]), int(makespan[i])) for i in range(num_layers)]


def test_sequential_kernel_equals_cpu_kernel_on_1000_layers():
    """The CUDA kernel's source, one thread per block, on 1,000 random layers in launches of
    1-8 (junk in the buffers beforehand; at random the start inside the planner's block, with
    the counts in shared memory or in the global scratch, or in the start kernels): each
    layer's plan, rounds, moves and makespan equal the CPU kernel's."""
    rng = np.random.default_rng(7)
    layers = moved = 0
    while layers < 1000:
        num_layers = int(rng.integers(1, 9))
        load, home, slots, window, cost, rules = random_batch(rng, num_layers)
        args = run_sequential(sequential_args(load, home, slots, window, cost, rules,
                                              junk=int(rng.choice([0, 1, 3]))), num_layers,
                              inline=bool(rng.integers(2)),  # both ways to start
                              shared=bool(rng.integers(2)))
        for i, got in enumerate(sequential_layers(args, num_layers)):
            ref = cpu_layer(load[i], home[i], slots, window[i], cost, rules)
            assert same(ref, got), (layers, i)
            moved += ref[5] > 0
        layers += num_layers
    assert moved > 300


def test_sequential_kernel_reports_bad_layers_and_plans_the_others():
    rng = np.random.default_rng(9)
    load, home, slots, window, cost, rules = random_batch(rng, 3, ranks=(4,))
    load[0, 1, 2] = -5
    window[2, 0] = np.nan
    args = run_sequential(sequential_args(load, home, slots, window, cost, rules), 3)
    got = sequential_layers(args, 3)
    assert [g[0] for g in got] == [1, 0, 2]
    assert same(got[1], cpu_layer(load[1], home[1], slots, window[1], cost, rules))


def test_simulator_runs_the_kernel_with_many_threads(tmp_path):
    """Numba's CUDA simulator (a subprocess: it must be on before numba.cuda is imported),
    32 threads per block: ep=8 decode layers and 20 random layers equal the CPU kernel, and
    every profiling variant (rounds cut after each step) ends: its barriers match."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "experiments.planner.gpu_lite", "--device",
                           "cpu", "--quick", "--profile", "--out", str(tmp_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_lite.json").read_text())
    assert report["checks_failed"] == [] and report["random"]["layers"] == 20
    assert report["random"]["differing_layers"] == 0
    assert report["profile"][0]["ended"]["statuses"] == [0] * 8


# The kernels' arguments for an sm_90 compile: one layer of G ranks and E experts (SM90_SETUP:
# ep=8, 16 experts).
SM90_SETUP_OF = """
import re
from probe.planner.cost import CostModel
from probe.planner.lite import LiteRules
from probe.planner.lite_cuda import host_arrays, kernel, start_args, _zero_kernel, _split_kernel
G, E, L = {ranks}, {experts}, 1
home = np.zeros((L, G, E), bool)
home[0, np.arange(E) % G, np.arange(E)] = True
cost = CostModel.uniform(G, alpha=1e-5, beta=1e-8, token_time=1e-8, transfer_time=1e-4)
host = host_arrays(home, np.full(G, 2), cost, LiteRules())
scratch = [np.zeros(s, d) for s, d in host.scratch]
outputs = [np.zeros(s, d) for s, d in host.outputs]
"""
SM90_SETUP = SM90_SETUP_OF.format(ranks=8, experts=16)


def test_kernel_compiles_for_sm90_with_32_bit_bit_scans():
    """The kernel compiles for an H200 (sm_90); its matching's bit scan counts 32-bit words
    (clz.b32: Numba types uint32 ^ uint32 as uint64, and a 64-bit clz made the index negative
    and the kernel never end on an H100, which neither the simulator nor the sequential run
    can show); off the simulator its warps combine values with shuffles."""
    code = SM90_SETUP + """
from probe.planner.lite_cuda import launch_args
args = launch_args(np.zeros((L, G, E), np.int64), home, np.zeros((L, G)), host.consts, scratch,
                   outputs)
ptx = ptx_of(kernel(32, inline_start=True).py_func, args)
print(json.dumps(sorted(set(re.findall(r"clz[.]b[0-9]+|shfl[.]sync[.]bfly[.]b32", ptx)))))
"""
    assert compile_for_sm90(code) == ["clz.b32", "shfl.sync.bfly.b32"]


def test_kernel_compiles_with_line_information(monkeypatch):
    """With PROBE_CUDA_LINEINFO=1 (what Nsight Compute's per-line counters need) the kernel,
    starting inside its block or not, compiles for sm_90 and carries source lines (NVVM once
    refused it: a branch between two loads in the pool layout)."""
    monkeypatch.setenv("PROBE_CUDA_LINEINFO", "1")
    code = SM90_SETUP + """
from probe.planner.lite_cuda import launch_args
from probe.planner.numba_cuda import LINEINFO
args = launch_args(np.zeros((L, G, E), np.int64), home, np.zeros((L, G)), host.consts, scratch,
                   outputs)
types = tuple(numba.typeof(a) for a in args)
lines = [len(re.findall(r"[.]loc\\s", cuda.compile_ptx(kernel(32, inline_start=inline).py_func,
                                                       types, cc=(9, 0), lineinfo=True)[0]))
         for inline in (True, False)]
print(json.dumps([LINEINFO.get("lineinfo", False), min(lines) > 100]))
"""
    assert compile_for_sm90(code) == [True, True]


def test_shared_state_fits_the_static_shared_memory():
    """A layer that starts inside its block keeps its counts and held experts in shared arrays
    of one shape per power of two of ranks (few kernels to compile), where they fit; the
    largest such kernel (8 ranks and 256 experts: at most 32 ranks, so the pools are in shared
    memory too) compiles for sm_90 within the 48 KB of static shared memory a block may
    have."""
    assert lite_cuda.shared_state(8, 128) == (8, 256) == lite_cuda.shared_state(5, 256)
    assert lite_cuda.shared_state(3, 32) == (4, 256) and lite_cuda.shared_state(32, 64) == (32, 64)
    assert lite_cuda.starts_inline(4, 300) and lite_cuda.shared_state(4, 300) is None
    assert lite_cuda.shared_state(64, 256) is None  # the start kernels write the counts
    with pytest.raises(ValueError, match="inline_start"):
        lite_cuda.kernel(32, state=(8, 256))
    code = SM90_SETUP_OF.format(ranks=8, experts=256) + """
from probe.planner.lite_cuda import launch_args, shared_state
args = launch_args(np.zeros((L, G, E), np.int64), home, np.zeros((L, G)), host.consts, scratch,
                   outputs)
assert shared_state(G, E) == (8, 256)
ptx = ptx_of(kernel(32, inline_start=True, state=shared_state(G, E)).py_func, args)
print(json.dumps(sum(int(n) for n in re.findall(r"[.]shared [^;]*\\[(\\d+)\\];", ptx))))
"""
    assert 21 * 1024 < compile_for_sm90(code) <= 48 * 1024


def test_runner_rejects_shapes_it_cannot_plan():
    cost = CostModel.uniform(300, alpha=1e-5, beta=1e-8, token_time=1e-8, transfer_time=1e-4)
    home = np.zeros((300, 300), bool)
    home[np.arange(300), np.arange(300)] = True
    with pytest.raises(ValueError, match="MAX_RANKS"):
        lite_cuda.CudaLite(home, 1, cost)


def test_home_lists_of_a_multi_holder_placement():
    home = np.array([[1, 0, 1], [1, 1, 0]], bool)
    hcount, hlist, hpos, nhome, rank_home = home_lists(home)
    assert hcount.tolist() == [2, 1, 1] and hlist[0].tolist() == [0, 1]
    assert hpos.tolist() == [[0, -1, 0], [1, 0, -1]] and nhome.tolist() == [2, 2]
    assert rank_home.tolist() == [[0, 2], [0, 1]]


def test_sequential_kernel_with_pools_in_global_memory():
    """Past 32 ranks the pools live in global scratch, past 128 the pair tests' bit words too:
    the kernel's source equals the CPU kernel there as well (40, 70 and 150 ranks)."""
    moves = 0
    for seed in (13, 14):
        rng = np.random.default_rng(seed)
        for ranks in (40, 70, 150):
            load, home, slots, window, cost, rules = random_batch(rng, 2, ranks=(ranks,))
            args = run_sequential(sequential_args(load, home, slots, window, cost, rules), 2)
            for i, got in enumerate(sequential_layers(args, 2)):
                ref = cpu_layer(load[i], home[i], slots, window[i], cost, rules)
                assert same(ref, got)
                moves += ref[5]
    assert moves > 300


def test_sequential_kernel_matches_past_the_fastest_32_positions():
    """The matching reads the pair tests' bit words from the fastest positions down: with 40
    ranks whose 36 fastest have no free slot (and hold none of the hot ranks' experts), every
    cold partner sits in the second word (below the 32 fastest positions), and the plan still
    equals the CPU kernel's."""
    ranks, experts = 40, 80
    home = np.zeros((ranks, experts), bool)
    home[np.arange(experts) % ranks, np.arange(experts)] = True
    load = np.zeros((ranks, experts), np.int64)
    load[:, :2] = 400  # experts 0 and 1 (homes 0 and 1) run hot
    load[:, 2:4] = 150  # ranks 2 and 3: busy, below the hot threshold, with free slots
    load[:, 4:ranks] = 1
    slots = np.zeros(ranks, np.int64)
    slots[:4] = 2
    cost = CostModel.uniform(ranks, alpha=1e-5, beta=1e-8, token_time=1e-9, transfer_time=1e-5)
    window = np.full(ranks, 1e-3)
    rules = LiteRules()
    ref = cpu_layer(load, home, slots, window, cost, rules)
    args = run_sequential(sequential_args(load[None], home[None], slots, window[None], cost,
                                          rules), 1)
    (got,) = sequential_layers(args, 1)
    assert same(ref, got)
    status, rep = ref[0], ref[1]
    assert status == 0 and len(rep) > 0 and set(rep[:, 0].tolist()) <= {2, 3}


def test_strided_range_loops_divide_and_while_loops_do_not():
    """Why the kernel's loops are while loops: for sm_90, Numba's `for k in range(tid, n, nt)`
    computes its trip count with 64-bit divisions; the same loop written as a while loop has
    none."""
    code = """
from numba import int64
def strided(a, n):
    for k in range(cuda.threadIdx.x, n, cuda.blockDim.x):
        a[k] = k
def stepped(a, n):
    k = cuda.threadIdx.x
    while k < n:
        a[k] = k
        k += cuda.blockDim.x
out = {}
for f in (strided, stepped):
    ptx = cuda.compile_ptx(f, (int64[:], int64), cc=(9, 0))[0]
    out[f.__name__] = len(re.findall(r"\\b(?:div|rem)[.](?:s|u)64", ptx))
print(json.dumps(out))
"""
    counts = compile_for_sm90(code)
    assert counts["strided"] >= 1 and counts["stepped"] == 0


def test_start_kernels_compile_for_sm90_with_native_atomics():
    """The start kernels compile for an H200 (sm_90), and their sums are native 64-bit atomic
    adds on global memory (a 64-bit add on shared memory is a compare-and-swap loop there)."""
    code = SM90_SETUP + """
zero, split = start_args(np.zeros((L, G, E), np.int64), home, host.consts, scratch, outputs)
ptx = ptx_of(_split_kernel.py_func, split) + ptx_of(_zero_kernel.py_func, zero)
print(json.dumps(sorted(set(re.findall(r"atom[.][a-z.0-9]+|red[.][a-z.0-9]+|atom[.]cas", ptx)))))
"""
    assert compile_for_sm90(code) == ["atom.global.add.u64", "atom.global.max.s64",
                                      "atom.global.or.b32"]


def test_step_cycles_sums_each_step_over_the_rounds():
    """step_cycles reads a stamped launch's cycle counters: the start from the launch's stamp,
    each step from the stamp before it (the last step of a round before the next round's
    first), summed over the rounds a layer ran; a layer rejected before its rounds has none."""
    import types

    class Host:
        def __init__(self, a):
            self.a = np.asarray(a, np.int64)

        def copy_to_host(self):
            return self.a

    rounds, steps = 2, len(lite_cuda.STAMP_STEPS)
    stamps = np.zeros((2, 2 + steps * 3), np.int64)
    stamps[0, :2 + steps * rounds] = [100, 150] + [150 + 10 * (k + 1) for k in range(steps)] + [
        150 + 10 * steps + 5 * (k + 1) for k in range(steps)]
    stamps[1, :2] = [7, 9]
    runner = types.SimpleNamespace(stamps=True, num_layers=2, _scratch=(Host(stamps),),
                                   out=types.SimpleNamespace(rounds=Host([rounds, 0])))
    first, second = lite_cuda.step_cycles(runner)
    last = 150 + 15 * steps
    assert first["start"] == 50 and first["rounds"] == 2 and first["total"] == last - 100
    assert all(first[name] == 15 for name in lite_cuda.STAMP_STEPS)
    assert first["per_round"] == [10 * steps, 5 * steps]
    assert second == {"start": 2, "rounds": 0, **dict.fromkeys(lite_cuda.STAMP_STEPS, 0),
                      "total": 2, "per_round": []}
    with pytest.raises(ValueError, match="stamps=True"):
        lite_cuda.step_cycles(types.SimpleNamespace(stamps=False))
