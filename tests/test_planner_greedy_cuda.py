"""The CUDA greedy (probe.planner.greedy_cuda) against the CPU kernel (greedy.greedy_arrays).

Two ways to run the kernel here, without a GPU:
- Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1, in a subprocess: it must be set before
  numba.cuda is first imported), 32-64 threads per block: the parallel pruning of candidates,
  its atomic minimum, the block's rounds of a candidate's search (32-64 amounts side by side)
  and the barriers, on a few dozen layers (one or several layers per launch).
  The simulator runs each thread as a Python thread and costs about 0.5 s per layer.
- `run_sequential` (experiments.planner.kernel_stats): the same kernel source run as plain
  Python with one thread per block (the kernel's loops stride by the block size, so one thread
  does every thread's work, and the first gaining candidate is the first one tried), with one
  result slot per round of a search (the CPU kernel's chain) or several (the block's rounds,
  the one thread making every slot's evaluation). Fast enough for 1,000 layers.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from experiments.planner.gpu_greedy import plan_diff, random_batch, same_layer
from experiments.planner.cuda_sequential import _py
from experiments.planner.kernel_stats import run_sequential
from experiments.planner.kernel_stats import host_buffers as _host_buffers
from probe.planner.cost import CostModel
from tests.sm90 import compile_for_sm90
from probe.planner.greedy import greedy_arrays
from probe.planner.greedy_rules import GreedyRules

greedy_cuda = pytest.importorskip("probe.planner.greedy_cuda")
ROOT = Path(__file__).resolve().parents[1]


def _in_simulator(args: list[str], timeout: int) -> str:
    """stdout of `python args...` run in Numba's CUDA simulator with this checkout imported;
    fails the test with its stderr if the process fails."""
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def sequential_arrays(load, home, slots, window, alpha, beta, tt, xt, rules: GreedyRules, *,
                      in_shared: bool = False):
    """greedy_cuda_arrays' per-layer tuples, the kernel run by run_sequential."""
    num_layers, num_ranks, num_experts = load.shape
    runner_args = _host_buffers(load, home, slots, window, alpha, beta, tt, xt, rules)
    run_sequential(*runner_args, num_layers=num_layers, in_shared=in_shared)
    out = runner_args[-8:]
    rep, n_rep, blk_e, blk_a, n_blk, moves, objective, status = out
    assert not status.any()
    return [(rep[i, :n_rep[i]], blk_e[i, :n_blk[i]], blk_a[i, :n_blk[i]], int(moves[i]),
             float(objective[i])) for i in range(num_layers)]


@pytest.mark.slow
def test_sequential_kernel_equals_cpu_kernel_on_1000_layers():
    rng = np.random.default_rng(7)
    layers = 0
    while layers < 1000:
        batch = random_batch(rng, max_layers=4)
        load, home, slots, window, cost, rules = batch
        outs = sequential_arrays(load, home, slots, window, cost.alpha, cost.beta,
                                 cost.token_time, cost.transfer_time, rules)
        for layer, out in enumerate(outs):
            assert same_layer(batch, layer, out), (layers, layer, rules)
            layers += 1


@pytest.mark.slow
def test_simulator_equals_cpu_kernel():
    """The kernel in Numba's CUDA simulator (a subprocess with NUMBA_ENABLE_CUDASIM=1):
    30 launches of 1-3 layers at 32 and 64 threads per block, identical plans."""
    code = ("import numpy as np\n"
            "from experiments.planner.gpu_greedy import compare_random\n"
            "n = compare_random(np.random.default_rng(3), 30, max_layers=3, threads=(32, 64),"
            " max_experts=16)\n"
            "from probe.planner.cost import CostModel\n"
            "from probe.planner.greedy_cuda import CudaGreedy\n"
            "cost = CostModel.uniform(2, alpha=0.0, beta=1.0, token_time=0.0,"
            " transfer_time=1.0)\n"
            "runner = CudaGreedy(np.eye(2, dtype=bool), 1, cost, num_layers=1)\n"
            "for load in (np.zeros((1, 2, 2), np.int32), [[1, 2]], np.zeros((2, 2), np.int64)):\n"
            "    try:\n"
            "        runner.plan(load, np.zeros((1, 2)))\n"
            "    except (TypeError, ValueError) as exc:\n"
            "        assert 'load' in str(exc), exc\n"
            "    else:\n"
            "        raise AssertionError('bad load accepted')\n"
            "print('layers', n)\n")
    stdout = _in_simulator(["-c", code], 300)
    assert "layers" in stdout and int(stdout.split()[-1]) >= 30


@pytest.mark.slow
def test_simulator_global_scratch_equals_cpu_kernel():
    """The kernel with its working arrays in global scratch (memory="global"), in the CUDA
    simulator at 32 threads per block (several rounds of candidates where a move has more than
    32): identical plans to the CPU kernel on 12 random launches of 1-2 layers."""
    code = ("import numpy as np\n"
            "from experiments.planner.gpu_greedy import random_batch, same_layer\n"
            "from probe.planner.greedy_cuda import greedy_cuda_arrays\n"
            "rng = np.random.default_rng(29)\n"
            "layers = moved = 0\n"
            "for _ in range(12):\n"
            "    batch = random_batch(rng, max_layers=2, max_experts=16)\n"
            "    load, home, slots, window, cost, rules = batch\n"
            "    outs = greedy_cuda_arrays(load, home, slots, window, cost.alpha, cost.beta,\n"
            "                              cost.token_time, cost.transfer_time,\n"
            "                              rules.max_moves(home.shape[1]), rules.epsilon,\n"
            "                              *rules.flags.values(), threads=32, memory='global')\n"
            "    for layer, out in enumerate(outs):\n"
            "        assert same_layer(batch, layer, out), (layer, rules)\n"
            "        layers += 1\n"
            "        moved += out[3] > 0\n"
            "print('layers', layers, moved)\n")
    stdout = _in_simulator(["-c", code], 600)
    _, layers, moved = stdout.split()
    assert int(layers) >= 12 and int(moved) >= 4


@pytest.mark.slow
def test_simulator_decode_layers_at_ep8_and_ep64_equal_cpu_kernel():
    """The kernel in the CUDA simulator on the decode layers the GPU scripts time (768 tokens
    per rank, default rules): ep=8 / 128 experts in shared memory at 32 and 128 threads per
    block (32 and 128 result slots per round) and ep=64 / 256 experts in global scratch at 128
    threads (two words of pool bits, a pool of up to 64 entries spread over the block):
    identical plans to the CPU kernel, with moves made."""
    code = ("from experiments.planner.gpu_greedy import decode_batch, run_batch, same_layer\n"
            "n = 0\n"
            "for model, hw, g, e, threads in (('qwen3-235b-a22b', 'h200x8', 8, 128, (32, 128)),\n"
            "                                 ('deepseek-v3', 'h200x8-n8', 64, 256, (128,))):\n"
            "    batch = decode_batch(model, hw, g, e, 1)\n"
            "    for t in threads:\n"
            "        out = run_batch(batch, t)[0]\n"
            "        assert same_layer(batch, 0, out), (g, t)\n"
            "        assert out[3] >= 4, out[3]\n"
            "        n += 1\n"
            "print('layers', n)\n")
    stdout = _in_simulator(["-c", code], 900)
    assert stdout.split()[-2:] == ["layers", "3"]


@pytest.mark.slow
def test_simulator_runner_sizes():
    """CudaGreedy in the CUDA simulator: `slots` stays the ranks' slot budget (the replica rows
    it allocates: sum of min(slots, E), at most k_max) and `search_slots`, the amounts a round
    of a search evaluates, is min(threads, SLOTS)."""
    code = ("import numpy as np\n"
            "from probe.planner.cost import CostModel\n"
            "from probe.planner.greedy_cuda import SLOTS, CudaGreedy\n"
            "from probe.planner.greedy_rules import GreedyRules\n"
            "cost = CostModel.uniform(4, alpha=0.0, beta=1.0, token_time=0.0,"
            " transfer_time=1.0)\n"
            "home = np.eye(4, 8, dtype=bool) | np.eye(4, 8, 4, dtype=bool)\n"
            "for threads in (32, 128):\n"
            "    runner = CudaGreedy(home, np.array([1, 2, 3, 9]), cost, GreedyRules(k_max=100),"
            " num_layers=1, threads=threads)\n"
            "    assert runner.slots.tolist() == [1, 2, 3, 9], runner.slots\n"
            "    assert runner.search_slots == min(threads, SLOTS) and SLOTS == 128\n"
            "    assert runner.out.replicas.shape[1] == 1 + 2 + 3 + 8, runner.out.replicas.shape\n"
            "print('sizes ok')\n")
    stdout = _in_simulator(["-c", code], 300)
    assert "sizes ok" in stdout


def _outputs_equal(a: tuple, b: tuple) -> bool:
    return all(np.array_equal(x, y, equal_nan=x.dtype.kind == "f")
               for x, y in zip(a, b, strict=True))


def test_sequential_launch_ignores_earlier_buffer_contents():
    """Every output entry is written and no scratch entry is read before the launch writes it:
    a launch over junk buffers, and one over the buffers of an earlier plan of other loads (a
    reused runner, a replayed CUDA graph), give exactly the buffers of a launch over zeroed
    ones, in which the rows past the plan are -1 and the blocks past it zero."""
    rng = np.random.default_rng(11)
    planned = 0
    for _ in range(25):
        load, home, slots, window, cost, rules = random_batch(rng, max_layers=3)
        num_layers = load.shape[0]
        rest = (home, slots, window, cost.alpha, cost.beta, cost.token_time, cost.transfer_time,
                rules)
        clean = _host_buffers(load, *rest)
        run_sequential(*clean, num_layers=num_layers)
        junk = _host_buffers(load, *rest)
        for buf in junk[14:21]:  # scratch
            buf[...] = 1
        for buf in junk[21:]:  # outputs
            buf[...] = np.nan if buf.dtype.kind == "f" else -7
        run_sequential(*junk, num_layers=num_layers)
        earlier = _host_buffers(np.ascontiguousarray(load[::-1, :, ::-1]), *rest)
        run_sequential(*earlier, num_layers=num_layers)
        reused = (load.astype(np.int64), *earlier[1:])
        run_sequential(*reused, num_layers=num_layers)
        assert _outputs_equal(junk[21:], clean[21:])
        assert _outputs_equal(reused[21:], clean[21:])
        rep, n_rep, blk_e, blk_a, n_blk = clean[21:26]
        for layer in range(num_layers):
            assert (rep[layer, n_rep[layer]:] == -1).all()
            assert (blk_e[layer, n_blk[layer]:] == -1).all()
            assert not blk_a[layer, n_blk[layer]:].any()
            planned += n_rep[layer] > 0 and n_blk[layer] > 0
    assert planned >= 10


def _small():
    cost = CostModel.uniform(2, alpha=0.0, beta=1.0, token_time=0.0, transfer_time=1.0)
    home = np.array([[True, False], [False, True]])
    return cost, home


def test_bad_input_errors():
    cost, home = _small()
    with pytest.raises(ValueError, match="also_paper"):
        greedy_cuda.CudaGreedy(home, 1, cost, GreedyRules(also_paper=True), num_layers=1)
    with pytest.raises(ValueError, match="num_layers"):
        greedy_cuda.CudaGreedy(home, 1, cost, num_layers=0)
    with pytest.raises(ValueError, match="threads"):
        greedy_cuda.CudaGreedy(home, 1, cost, num_layers=1, threads=48)
    with pytest.raises(TypeError, match="cost"):
        greedy_cuda.CudaGreedy(home, 1, "cost", num_layers=1)
    with pytest.raises(ValueError, match="memory"):
        greedy_cuda.CudaGreedy(home, 1, cost, num_layers=1, memory="texture")
    with pytest.raises(ValueError, match="max_moves"):
        greedy_cuda.CudaGreedy(home, 1, cost, num_layers=1, max_moves=-1)
    wide_cost = CostModel.uniform(64, alpha=0.0, beta=1.0, token_time=0.0, transfer_time=1.0)
    wide_home = np.zeros((64, 256), bool)
    wide_home[np.arange(256) % 64, np.arange(256)] = True
    with pytest.raises(ValueError, match="SHARED_LIMIT"):
        greedy_cuda.CudaGreedy(wide_home, 1, wide_cost, num_layers=1, memory="shared")
    with pytest.raises(TypeError, match="rules"):
        greedy_cuda.CudaGreedy(home, 1, cost, "paper", num_layers=1)
    with pytest.raises(ValueError, match="home"):
        greedy_cuda.CudaGreedy(np.zeros((2, 2, 2, 2), bool), 1, cost, num_layers=2)
    with pytest.raises(ValueError):  # an expert with no home rank (BalanceProblem's check)
        greedy_cuda.CudaGreedy(np.array([[True, False], [False, False]]), 1, cost, num_layers=1)
    big = CostModel.uniform(greedy_cuda.MAX_RANKS + 1, alpha=0.0, beta=1.0, token_time=0.0,
                            transfer_time=1.0)
    with pytest.raises(ValueError, match="MAX_RANKS"):
        greedy_cuda.CudaGreedy(np.eye(greedy_cuda.MAX_RANKS + 1, dtype=bool), 1, big,
                               num_layers=1)
    wide = np.zeros((2, greedy_cuda.MAX_EXPERTS + 1), bool)
    wide[0] = True
    with pytest.raises(ValueError, match="MAX_EXPERTS"):
        greedy_cuda.CudaGreedy(wide, 1, cost, num_layers=1)
    with pytest.raises(ValueError, match="also_paper"):
        greedy_cuda.greedy_cuda_arrays(np.zeros((1, 2, 2), np.int64), home[None], 1,
                                       np.zeros((1, 2)), 0.0, 1.0, np.zeros((2, 2)),
                                       np.ones((2, 2)), 16, 0.0, also_paper=True)


def test_sequential_flags_bad_values_per_layer():
    cost, home = _small()
    rules = GreedyRules()
    load = np.array([[[0, 0], [8, 0]], [[0, -1], [8, 0]], [[0, 0], [8, 0]]])
    window = np.array([[1.0, 1.0], [1.0, 1.0], [np.nan, 1.0]])
    args = _host_buffers(load, np.stack([home] * 3), np.ones(2), window, 0.0, 1.0,
                         cost.token_time, cost.transfer_time, rules)
    run_sequential(*args, num_layers=3)
    status, objective, moves = args[-1], args[-2], args[-3]
    assert status.tolist() == [0, 1, 2]
    assert np.isnan(objective[1:]).all() and moves[1:].tolist() == [0, 0]
    # writable int64/float64 copies and every flag given, as gpu_greedy.cpu_args passes them:
    # the kernel specialisation the other tests here compile already (another would cost a
    # compile of the whole kernel, about 45 s of CPU)
    ref = greedy_arrays(load[0].copy(), home.copy(), np.ones(2, np.int64), window[0].copy(),
                        0.0, 1.0, cost.token_time.copy(), cost.transfer_time.copy(), 16, 0.0,
                        *(bool(v) for v in rules.flags.values()))
    assert moves[0] == ref[3] == 1 and objective[0] == 4.0


@pytest.mark.slow
def test_gpu_greedy_script_runs_in_the_simulator(tmp_path):
    """experiments.planner.gpu_greedy --device cpu --quick: its correctness part in the CUDA
    simulator, and its outputs."""
    _in_simulator(["-m", "experiments.planner.gpu_greedy", "--device", "cpu", "--quick", "--out",
                   str(tmp_path)], 600)
    report = json.loads((tmp_path / "gpu_greedy.json").read_text())
    assert report["status"] == "finished" and not report["errors"]
    assert report["random_layers"] >= 3 and report["random"]["ok"]
    row = report["rows"][0]
    assert row["identical_layers"] == row["layers"] == 1
    names = [check["check"] for check in row["checks"] if check["ok"]]
    assert names == ["decode plans == CPU kernel", "launch over junk buffers == first launch",
                     "runner reused on new loads == fresh runner"]
    assert not report["checks_failed"]
    assert (tmp_path / "gpu_greedy.md").exists()
    assert (tmp_path / "gpu_greedy.manifest.json").exists()


def test_plan_diff_counts_entries_and_the_plans_own():
    """The benchmark's comparison: differing entries per output, and how many of them lie in
    the plan (replicas rows before num_replicas, blocks before num_blocks, per-layer values)."""
    plan = greedy_cuda.CudaPlan(
        replicas=np.full((2, 3, 3), -1), num_replicas=np.array([1, 0]),
        blk_expert=np.array([[4, -1], [-1, -1]]), blk_assign=np.zeros((2, 2, 2, 2), np.int64),
        num_blocks=np.array([1, 0]), num_moves=np.array([1, 0]),
        objective=np.array([2.0, np.nan]), status=np.array([0, 1]))
    same = plan_diff("same", plan, plan)
    assert same["ok"] and same["differing_entries"] == {} and same["differing_in_plan"] == 0
    tail = plan._replace(replicas=plan.replicas.copy(), blk_assign=plan.blk_assign + 1)
    tail.replicas[0, 2] = 9  # past num_replicas: in the buffer, not in the plan
    diff = plan_diff("tail", tail, plan)
    assert not diff["ok"]
    assert diff["differing_entries"] == {"replicas": 3, "blk_assign": 16}
    assert diff["differing_in_plan"] == 4  # layer 0's one block
    assert diff["examples"][0] == {"output": "replicas", "index": [0, 2, 0], "got": 9,
                                   "want": -1}
    wider = plan._replace(blk_expert=np.zeros((2, 3), np.int64))
    assert plan_diff("shape", wider, plan)["differing_entries"] == {
        "blk_expert": "shape [2, 3] != [2, 2]"}


def test_memory_is_shared_where_it_fits():
    """"auto" keeps the working arrays in shared memory at ep=8 / 128 experts (40.7 KB)
    and in global scratch at ep=64 / 256 experts (far over the 48 KB a block may take)."""
    assert greedy_cuda.shared_bytes(8, 128) <= greedy_cuda.SHARED_LIMIT
    assert greedy_cuda.shared_bytes(64, 256) > greedy_cuda.SHARED_LIMIT
    assert greedy_cuda.choose_memory(8, 128) == "shared"
    assert greedy_cuda.choose_memory(8, 128, "global") == "global"
    assert greedy_cuda.choose_memory(64, 256) == "global"
    assert greedy_cuda.choose_memory(64, 256, "global") == "global"
    with pytest.raises(ValueError, match="SHARED_LIMIT"):
        greedy_cuda.choose_memory(64, 256, "shared")


def test_sequential_shared_and_global_equal_cpu_kernel():
    """The kernel with its working arrays in (simulated) shared memory and in global scratch:
    both the CPU kernel's plans, on 150 random launches."""
    rng = np.random.default_rng(19)
    moved = 0
    for _ in range(150):
        batch = random_batch(rng, max_layers=3)
        load, home, slots, window, cost, rules = batch
        for in_shared in (True, False):
            outs = sequential_arrays(load, home, slots, window, cost.alpha, cost.beta,
                                     cost.token_time, cost.transfer_time, rules,
                                     in_shared=in_shared)
            for layer, out in enumerate(outs):
                assert same_layer(batch, layer, out), (layer, in_shared, rules)
                moved += out[3] > 0
    assert moved >= 100


def test_round_table_finds_every_evaluated_amount():
    """`_insert` and `_lookup` (a round's hash table of result slots, in the sequential
    runner's stand-in for the atomics): every amount a round evaluated is found at a slot that
    holds it (an amount in two slots at either), amounts it did not evaluate are not found;
    tables of 4 to 256 buckets filled up to a quarter, so that amounts share buckets."""
    from experiments.planner.cuda_sequential import _Atomic

    env = dict(vars(greedy_cuda))
    env["cuda"] = types.SimpleNamespace(atomic=_Atomic)
    fns = {}
    for name in ("_bucket", "_insert", "_lookup"):
        fn = _py(getattr(greedy_cuda, name))
        fns[name] = env[name] = types.FunctionType(fn.__code__, env, name, fn.__defaults__)
    rng = np.random.default_rng(41)
    found = 0
    for _ in range(300):
        nslots = int(rng.integers(1, 65))
        buckets = greedy_cuda._buckets(nslots)
        assert buckets >= 4 * nslots and buckets & (buckets - 1) == 0
        tab = np.zeros(3 * buckets, np.int64)
        base = int(rng.integers(0, 3)) * buckets
        amounts = rng.integers(1, int(rng.choice([8, 100, 10**6])), nslots)
        for slot in rng.permutation(nslots):  # any order: the threads race
            fns["_insert"](tab, base, buckets - 1, int(amounts[slot]), nslots, int(slot))
        assert not tab[:base].any() and not tab[base + buckets:].any()
        for x in range(1, 120):
            slot = fns["_lookup"](tab, base, buckets - 1, x, nslots)
            if x in amounts:
                assert amounts[slot] == x
                found += 1
            else:
                assert slot == -1
        for x in amounts:
            assert amounts[fns["_lookup"](tab, base, buckets - 1, int(x), nslots)] == x
    assert found > 1000


def test_sequential_search_rounds_equal_cpu_kernel():
    """A search's rounds with 2, 3, 7 and 64 result slots (the bisections' trees cut at every
    depth, pair steps split over two rounds, speculation on and off): the CPU kernel's plans
    on 80 random launches, shared and global memory; and with 64 slots a search takes fewer
    than half the rounds it takes with one (one evaluation per round, the CPU kernel's
    chain)."""
    rng = np.random.default_rng(31)
    moved = 0
    rounds = {1: 0, 64: 0}

    def wrap(name, fn):
        if name != "_plan_round":
            return fn

        def counted(*a):
            rounds[a[1]] = rounds.get(a[1], 0) + 1
            return fn(*a)
        return counted

    for i in range(80):
        batch = random_batch(rng, max_layers=2)
        load, home, slots, window, cost, rules = batch
        for num_slots in (1, 2, 3, 7, 64):
            in_shared = bool((i + num_slots) % 2)
            args = _host_buffers(load, home, slots, window, cost.alpha, cost.beta,
                                 cost.token_time, cost.transfer_time, rules)
            run_sequential(*args, num_layers=load.shape[0], in_shared=in_shared,
                           slots=num_slots, wrap=wrap)
            rep, n_rep, blk_e, blk_a, n_blk, moves, objective, status = args[-8:]
            assert not status.any()
            for layer in range(load.shape[0]):
                out = (rep[layer, :n_rep[layer]], blk_e[layer, :n_blk[layer]],
                       blk_a[layer, :n_blk[layer]], int(moves[layer]), float(objective[layer]))
                assert same_layer(batch, layer, out), (i, layer, num_slots, rules)
                moved += out[3] > 0
    assert moved >= 150
    assert 0 < rounds[64] < rounds[1] / 2, rounds


def _tree_find(x, lo, hi, levels, width):
    """The slot of x in a tree of `levels` levels over [lo, hi] (node j's mid at slot
    j * width, its mid + 1 at j * 2 + 1 where width is 2), -1 where x is not there: the path of
    a search for x (every left mid is below its parent's, every right one above)."""
    j = 0
    for _ in range(levels):
        if lo >= hi:
            return -1
        mid = (lo + hi) // 2
        if x == mid:
            return j * width
        if width == 2 and x == mid + 1:
            return j * 2 + 1
        if x < mid:
            hi = mid
            j = 2 * j + 1
        else:
            lo = mid + 1
            j = 2 * j + 2
    return -1


def test_bisection_trees_hold_the_probes_of_every_path():
    """`_node_x`: a tree of d levels over [lo, hi] holds, for every outcome of the tests, the
    first d midpoints the bisection probes (and mid + 1 in a pair tree), each found again at
    its slot by a search down the tree (`_tree_find`); amounts the tree does not hold are not
    found."""
    from experiments.planner.cuda_sequential import _clz

    env = dict(vars(greedy_cuda))
    env["cuda"] = types.SimpleNamespace(clz=_clz)
    fn = _py(greedy_cuda._node_x)
    node_x = types.FunctionType(fn.__code__, env, "_node_x", fn.__defaults__)
    tree_find = _tree_find
    rng = np.random.default_rng(37)
    checked = 0
    for _ in range(300):
        lo0 = int(rng.integers(1, 50))
        hi0 = lo0 + int(rng.integers(0, 200))
        levels = int(rng.integers(0, 7))
        width = int(rng.integers(1, 3))
        held = {}
        for j in range(2 ** levels - 1):
            x = node_x(j, lo0, hi0)
            if x > 0:
                held[j * width] = x
                if width == 2:
                    held[j * width + 1] = x + 1
        for x in held.values():
            assert held[tree_find(x, lo0, hi0, levels, width)] == x
        outcomes = rng.random(levels) < 0.5
        lo, hi = lo0, hi0
        for level in range(levels):  # one path: the bisection's own probes
            if lo >= hi:
                break
            mid = (lo + hi) // 2
            for want in ((mid, mid + 1) if width == 2 else (mid,)):
                assert held.get(tree_find(want, lo0, hi0, levels, width)) == want, (level,)
                checked += 1
            if outcomes[level]:
                hi = mid
            else:
                lo = mid + 1
        for x in range(lo0 - 2, hi0 + 3):
            if x not in held.values():
                assert tree_find(x, lo0, hi0, levels, width) == -1
    assert checked > 500


def test_prefix_after_equals_the_cpu_rules():
    """`_after_p` and the search's `_eval_x` (prefix sums, and the prefix maximum of the worst
    time's terms: `_terms` per entry, then `_prefix_sums`) against greedy's `_after`,
    `_src_after` and `_worst` (the pool walked from the start): the same floats, bit for bit,
    for every x of random pools, token times of mixed magnitudes; and the move's new out-times
    of the third-party sources, as the kernel's threads compute them from the pool and the
    cumulative counts, are `_worst`'s."""
    from probe.planner import greedy

    rng = np.random.default_rng(5)
    env = dict(vars(greedy_cuda))
    env["mul"] = lambda a, b: a * b
    env["dmax"], env["dmin"] = _py(greedy_cuda.dmax), _py(greedy_cuda.dmin)
    env["cuda"] = types.SimpleNamespace(syncthreads=lambda: None)  # one thread: no barrier
    fns = {}
    for name in ("_scan_sum", "_terms", "_prefix_sums", "_entry", "_after_k", "_after_p",
                 "_eval_x"):
        fn = _py(getattr(greedy_cuda, name))
        fns[name] = env[name] = types.FunctionType(fn.__code__, env, name, fn.__defaults__)
    checked = 0
    for _ in range(60):
        g = int(rng.integers(3, 10))
        src, dst = (int(v) for v in rng.choice(g, 2, replace=False))
        others = [s for s in range(g) if s not in (src, dst)]
        pool = ([dst] if rng.random() < 0.5 else []) + list(rng.permutation(others))
        pool += [src] if rng.random() < 0.7 else []
        npool = len(pool)
        pool_s = np.array(pool + [0] * (g - npool), np.int64)
        pool_n = np.array(list(rng.integers(1, 40, npool)) + [0] * (g - npool), np.int64)
        tt = rng.random((g, g)) * 10.0 ** rng.integers(-9, 1, (g, g))
        tok = rng.integers(0, 100, (g, 4))
        e = 1
        tok[src, e] = int(pool_n[:npool].sum()) + int(rng.integers(0, 2))
        comp, t_in, t_out = rng.random(g), rng.random(g) * 1e-3, rng.random(g) * 1e-3
        alpha, beta = 1e-5, 3e-7
        cum, pre, p_worst = np.zeros(g, np.int64), np.zeros((4, g)), np.zeros(g)
        terms, w_terms = np.zeros((2, g)), np.zeros(g)  # (the sums' terms)
        own_dst = int(pool_n[0]) if pool[0] == dst else 0
        for i in range(npool):
            fns["_terms"](i, pool_s[i], pool_n[i], own_dst, src, dst, tt, comp, t_in, t_out,
                          terms[0], terms[1], pre[2], pre[3], w_terms)
        fns["_prefix_sums"](0, 1, npool, pool_n, cum, terms[0], terms[1], w_terms, pre[0],
                            pre[1], p_worst)
        for x in range(1, int(pool_n.sum()) + 1):
            parts, parts_p = np.zeros(6), np.zeros(6)
            want = greedy._after.py_func(x, e, src, dst, pool_s, pool_n, tok, comp, t_in,
                                         t_out, alpha, beta, tt, parts)
            got = fns["_after_p"](x, e, src, dst, pool_s, npool, cum, *pre, tok, comp, t_in,
                                  t_out, alpha, beta, tt, parts_p)
            assert got == want and np.array_equal(parts, parts_p), (x, got, want)
            assert got[0] == greedy._src_after.py_func(x, e, src, dst, pool_s, pool_n, tok,
                                                       comp, t_in, t_out, alpha, beta, tt)
            takes, outs = np.full(g, -1, np.int64), np.zeros(g)
            w = greedy._worst.py_func(x, *want, src, dst, npool, pool_s, pool_n, comp, t_in,
                                      t_out, tt, takes, outs)
            last = fns["_entry"](x, npool, cum)  # the kernel's move, entry by entry
            for i in range(last + 1):
                s = pool_s[i]
                take = pool_n[i] if i < last else x - cum[last]
                assert take == takes[i] > 0, (x, i)
                if s != dst and s != src:
                    assert t_out[s] + take * (tt[s, dst] - tt[s, src]) == outs[i]
            assert not takes[last + 1:npool].any()
            # the search's evaluation: the same floats (its worst time always computed)
            ev = fns["_eval_x"](x, src, dst, pool_s, npool, cum, *pre, p_worst, tok[src, e],
                                tok[dst, e], comp[src], comp[dst], t_in[src], t_out[src],
                                t_in[dst], t_out[dst], tt[dst, src],
                                tt[src, dst] - tt[src, src], comp, t_in, t_out, alpha, beta,
                                tt)
            assert ev == (*want, w), (x, ev, want, w)
            checked += 1
    assert checked > 500


@pytest.mark.slow
def test_compiled_kernel_for_sm90():
    """Both memory variants compile for an H200 (sm_90) without a GPU, where NVVM is
    installed: every product that feeds a sum is rounded on its own (mul.rn), and the only
    fused multiply-adds the compiler makes multiply by the constant 2.0 (exact: the FMA rounds
    as the plain product and sum do); no division decides anything (none in the PTX but the
    mean's div.rn); the shared variant declares its arrays in shared memory."""
    code = """
from probe.planner import greedy_cuda as gc
L, G, E = 2, 8, 128
i, f = np.int64, np.float64
args = [np.zeros((L, G, E), i), np.zeros((L, G, E), np.bool_), np.zeros(G, i),
        np.zeros((L, G), f), 1.0, 1.0, np.zeros((G, G), f), np.zeros((G, G), f), 8, 0.0, True,
        False, True, False, np.zeros((L, E), i), np.zeros((L, E, G), i), np.zeros((L, G, E), i),
        np.zeros((L, G, E), i), np.zeros((L, G, G), i), np.zeros((L, G, E), np.uint8),
        np.zeros((L, E), i), np.zeros((L, 4, 3), i), np.zeros(L, i), np.zeros((L, 4), i),
        np.zeros((L, 4, G, G), i), np.zeros(L, i), np.zeros(L, i), np.zeros(L, f),
        np.zeros(L, i)]
out = {}
for shared in (True, False):
    ptx = ptx_of(gc._kernel_source(G, E, shared), args)
    out[str(shared)] = {**f64_ops(ptx), "shared": sum(
        int(n) for n in re.findall(r"[.]shared .*?[[](\\d+)[]]", ptx))}
print(json.dumps(out))
"""
    found = compile_for_sm90(code)
    source = Path(greedy_cuda.__file__).read_text()
    mul_sites = len(re.findall(r"[^d_a-z]mul[(]", source))
    for variant in found.values():
        # (each `mul(` call site of the module's device code is at least one mul.rn)
        assert variant["fma"] == variant["fma_by_2"] and variant["mul_rn"] >= mul_sites > 20
        assert variant["div"] in ([], ["div.rn.f64"])
    assert found["True"]["shared"] >= greedy_cuda.shared_bytes(8, 128) - 1024
    # (the global variant keeps the [G, E] and [G, G] working arrays out: 21 KB less here)
    assert found["False"]["shared"] <= found["True"]["shared"] - 16 * 1024
