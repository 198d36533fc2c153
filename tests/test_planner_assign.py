"""Dispatch-time token assignment (probe.planner.assign): twin equality, feasibility checked
independently, objective against the LP, the even split and the home-only split."""

from __future__ import annotations

import numpy as np
import pytest

from experiments.planner.assign_speed import random_instance  # the benchmark's generator
from probe.planner.assign import assign_tokens, assign_tokens_ref, default_moves, lp_totals
from probe.planner.check import check_plan, evaluate_plan
from probe.planner.cost import CostModel
from probe.planner.eplb import even_split
from probe.planner.problem import BalanceProblem, Plan


def objective(load, copies, cost, assignment) -> float:
    """eq. 8 of `assignment` by the planner's scorer, on the layout copies > 0 as home."""
    problem = BalanceProblem(load, copies > 0, 0, 0.0, cost)
    g, e = problem.home.shape
    plan = Plan(np.zeros((g, e), bool), -np.ones((g, e), np.int64), assignment)
    assert check_plan(problem, plan) == []
    return evaluate_plan(problem, plan).objective


def assert_feasible(load, copies, assignment):
    """Conservation and placement, checked directly."""
    assert assignment.dtype == np.int64
    assert assignment.shape == (*load.shape, copies.shape[0])
    assert np.all(assignment >= 0)
    np.testing.assert_array_equal(assignment.sum(axis=2), load)
    assert not np.any((assignment > 0) & (copies.T[None] == 0))


def home_only(load, home):
    """Every token on its expert's home rank (home bool [G, E], one holder per expert)."""
    out = np.zeros((*load.shape, home.shape[0]), np.int64)
    out[:, np.arange(load.shape[1]), np.argmax(home, axis=0)] = load
    return out


def test_docstring_example_by_hand():
    cost = CostModel.uniform(2, alpha=1.0, beta=1.0, token_time=0.0, transfer_time=1.0)
    load = np.array([[6, 2], [4, 0]])
    copies = np.array([[1, 1], [1, 0]])
    a = assign_tokens(load, copies, cost)
    # Rank 0: expert 1 (1 + 2) plus 4 of expert 0 (1 + 4) = 8; rank 1: 6 of expert 0 = 7.
    assert a.sum(axis=0).tolist() == [[4, 6], [2, 0]]
    assert a[0, 0].tolist() == [4, 2] and a[1, 0].tolist() == [0, 4]  # locality first
    assert objective(load, copies, cost, a) == 8.0


def test_idle_copy_pays_no_alpha():
    # alpha = 10: rank 1 already runs expert 1 (10 + 3), so opening its copy of expert 0 is
    # not worth it; the LP, which charges every present copy, must pay 10 + 13 on rank 1.
    cost = CostModel.uniform(2, alpha=10.0, beta=1.0, token_time=0.0, transfer_time=1.0)
    load = np.array([[4, 0], [0, 3]])
    copies = np.array([[1, 0], [1, 1]])
    a = assign_tokens(load, copies, cost)
    assert a[0, 0].tolist() == [4, 0]
    assert objective(load, copies, cost, a) == 14.0
    _, z = lp_totals(load, copies, cost)
    assert z == pytest.approx(23.0)
    # Without expert 1 the two copies share the 4 tokens: 10 + 2 on each rank beats 10 + 4.
    a = assign_tokens(np.array([[4, 0], [0, 0]]), copies, cost)
    assert a[0, 0].tolist() == [2, 2]


@pytest.mark.parametrize("seed", range(60))
def test_kernel_equals_python_twin(seed):
    rng = np.random.default_rng(seed)
    load, copies, home, cost = random_instance(rng)
    passes = int(rng.integers(1, 9))
    base = home if seed % 2 else None
    fast = assign_tokens(load, copies, cost, passes=passes, home=base)
    slow = assign_tokens_ref(load, copies, cost, passes=passes, home=base)
    np.testing.assert_array_equal(fast, slow)
    assert_feasible(load, copies, fast)


def _compare(num_instances: int, seed: int) -> np.ndarray:
    """Relative gap (waterfill - lp) / lp of eq. 8 over random instances; also checks
    feasibility and the even / home-only bounds on each."""
    rng = np.random.default_rng(seed)
    gaps = []
    for _ in range(num_instances):
        load, copies, home, cost = random_instance(rng)
        wf = assign_tokens(load, copies, cost, home=home)
        lp = assign_tokens(load, copies, cost, method="lp")
        assert_feasible(load, copies, wf)
        assert_feasible(load, copies, lp)
        ours = objective(load, copies, cost, wf)
        ref = objective(load, copies, cost, lp)
        even = objective(load, copies, cost, even_split(load, copies))
        local = objective(load, copies, cost, home_only(load, home))
        tol = 1e-9 * max(1.0, ours)
        assert ours <= even + tol, (ours, even)
        assert ours <= local + tol, (ours, local)
        gaps.append((ours - ref) / ref if ref > 0 else 0.0)
    return np.array(gaps)


# Both methods optimise the same stage-1 objective, but water-filling is a descent that can stop
# in a local optimum (alpha makes the problem non-convex) and eq. 8's out-traffic is outside
# stage 1; the exchange step repairs most of that, yet a few instances land more than 1% above
# the LP (results/assign_speed.md has the distribution: 99.9% within 1%, worst +3.2% on the
# same generator and seed). The bounds below leave a little margin on these seeded samples.
def test_objective_near_lp_small_sample():
    gaps = _compare(100, seed=1)
    assert np.mean(gaps <= 0.01) >= 0.97, np.sort(gaps)[-5:]
    assert gaps.max() <= 0.05, gaps.max()


def test_objective_near_lp_1000_instances():
    gaps = _compare(1000, seed=2)
    assert np.mean(gaps <= 0.01) >= 0.985, np.sort(gaps)[-20:]
    assert np.median(gaps) <= 0.0
    assert gaps.max() <= 0.08, gaps.max()


def test_exchange_step_at_full_size():
    # ep=8 / 128 experts, the layers of experiments/planner/assign_level.py: the exchange
    # step's candidates join the others, so it is never worse than without it (moves=0), and
    # it brings the gap to the LP under 1% on all but the odd layer (without it the p99 there
    # is +2.8%, results/assign_level.md).
    from experiments.planner.assign_level import CONFIGS, random_layer
    from probe.specs import hardware_preset, model_preset

    _, model, hardware, num_ranks, num_experts = CONFIGS[0]
    cost = CostModel.from_specs(model_preset(model), hardware_preset(hardware),
                                num_ranks=num_ranks)
    rng = np.random.default_rng(5)
    gaps, gains = [], []
    for i in range(30):
        load, copies = random_layer(rng, num_ranks, num_experts, 2 + i % 2)
        ours = objective(load, copies, cost, assign_tokens(load, copies, cost))
        plain = objective(load, copies, cost, assign_tokens(load, copies, cost, moves=0))
        ref = objective(load, copies, cost, assign_tokens(load, copies, cost, method="lp"))
        assert ours <= plain * (1 + 1e-12), (i, ours, plain)
        gaps.append((ours - ref) / ref)
        gains.append((plain - ours) / plain)
    gaps = np.array(gaps)
    assert np.median(gaps) < 0.0 and np.mean(gaps <= 0.01) >= 0.9, np.sort(gaps)[-5:]
    assert max(gains) > 0.005  # it does move something


def test_lp_method_and_single_holders():
    # Every expert on one rank: both methods give the home-only split.
    cost = CostModel.uniform(3, alpha=1.0, beta=1.0, token_time=0.5, transfer_time=1.0)
    load = np.array([[1, 2, 3], [4, 5, 6], [0, 0, 7]])
    copies = np.eye(3, dtype=np.int64)
    for method in ("waterfill", "lp"):
        a = assign_tokens(load, copies, cost, method=method)
        np.testing.assert_array_equal(a, home_only(load, copies > 0))


@pytest.mark.parametrize("load, copies, match", [
    (np.zeros((2, 2, 1)), np.ones((2, 2)), "load must be a 2-D"),
    (np.array([[1.0, np.nan], [0, 0]]), np.ones((2, 2)), "NaN"),
    (np.array([[1.5, 0], [0, 0]]), np.ones((2, 2)), "whole"),
    (np.array([[1, -1], [0, 0]]), np.ones((2, 2)), "negative count at source 0, expert 1"),
    (np.zeros((2, 2)), np.ones(2), "copies must be a 2-D"),
    (np.zeros((2, 2)), -np.ones((2, 2), int), "copies must be >= 0"),
    (np.zeros((2, 2)), np.ones((3, 2), int), "copies has 3 ranks"),
    (np.zeros((2, 3)), np.ones((2, 2), int), "load shape"),
    (np.array([[0, 5], [0, 0]]), np.array([[1, 0], [1, 0]]), "expert 1 has 5 tokens but no"),
])
def test_bad_input(load, copies, match):
    cost = CostModel.uniform(2, alpha=1.0, beta=1.0, token_time=0.0, transfer_time=1.0)
    with pytest.raises(ValueError, match=match):
        assign_tokens(load, copies, cost)


def test_bad_moves():
    load, copies = np.array([[1, 1], [1, 1]]), np.ones((2, 2), np.int64)
    cost = CostModel.uniform(2, alpha=1.0, beta=1.0, token_time=0.1, transfer_time=1.0)
    for moves in (-1, 1.5, True):
        with pytest.raises(ValueError, match="moves"):
            assign_tokens(load, copies, cost, moves=moves)
    assert assign_tokens(load, copies, cost, moves=0).sum() == 4


def test_bad_options():
    cost = CostModel.uniform(2, alpha=1.0, beta=1.0, token_time=0.0, transfer_time=1.0)
    load, copies = np.ones((2, 2), int), np.ones((2, 2), int)
    with pytest.raises(ValueError, match="method must be one of"):
        assign_tokens(load, copies, cost, method="greedy")
    with pytest.raises(ValueError, match="passes must be an int >= 1"):
        assign_tokens(load, copies, cost, passes=0)
    with pytest.raises(TypeError, match="cost must be a CostModel"):
        assign_tokens(load, copies, "h200")
    with pytest.raises(TypeError, match="copies must be int or bool"):
        assign_tokens(load, copies * 1.0, cost)
    flat = CostModel.uniform(2, alpha=1.0, beta=0.0, token_time=0.0, transfer_time=1.0)
    with pytest.raises(ValueError, match="cost.beta must be > 0"):
        assign_tokens(load, copies, flat)


def assign_level_layer(config: int, index: int):
    """(load, copies, cost) of layer `index` of experiments/planner/assign_level.py (seed 0)
    in its configuration `config` (0: ep=8 / 128 experts, 1: ep=64 / 256)."""
    from experiments.planner.assign_level import CONFIGS, random_layer
    from probe.specs import hardware_preset, model_preset

    _, model, hardware, num_ranks, num_experts = CONFIGS[config]
    cost = CostModel.from_specs(model_preset(model), hardware_preset(hardware),
                                num_ranks=num_ranks)
    rng = np.random.default_rng(0)
    for i in range(index + 1):
        load, copies = random_layer(rng, num_ranks, num_experts, 1 + i % 3)
    return load, copies, cost


def test_exchange_swaps_out_of_a_plateau():
    # ep=8, layer 593 of experiments/planner/assign_level.py (seed 0): the single moves end
    # with every rank within 0.1% of the slowest, where any move from the slowest rank
    # raises another above it: +1.09% above the LP, the worst but one of the 1,000 layers
    # before the swap move. The swap (rank a keeps its own tokens of one expert and hands
    # another expert's quota to the same partner, as one move) lowers a's traffic both ways
    # and brings it below the LP; the twin agrees.
    load, copies, cost = assign_level_layer(0, 593)
    ours = assign_tokens(load, copies, cost)
    ref = objective(load, copies, cost, assign_tokens(load, copies, cost, method="lp"))
    assert objective(load, copies, cost, ours) < ref, (objective(load, copies, cost, ours), ref)
    np.testing.assert_array_equal(ours, assign_tokens_ref(load, copies, cost))


def test_default_moves_scale_with_ranks():
    # ep=64, layer 257 of experiments/planner/assign_level.py (seed 0): 28 ranks within 1% of
    # the slowest after 20 moves, each move lowering one; 20 moves left it +2.6% above the
    # LP, the default (one move per rank, 64) brings it below.
    assert default_moves(8) == 20 and default_moves(64) == 64
    load, copies, cost = assign_level_layer(1, 257)
    ref = objective(load, copies, cost, assign_tokens(load, copies, cost, method="lp"))
    short = objective(load, copies, cost, assign_tokens(load, copies, cost, moves=20))
    ours = objective(load, copies, cost, assign_tokens(load, copies, cost))
    assert short > ref * 1.02, (short, ref)
    assert ours < ref, (ours, ref)


def test_idle_experts_without_copies_are_fine():
    cost = CostModel.uniform(2, alpha=1.0, beta=1.0, token_time=0.0, transfer_time=1.0)
    load = np.array([[3, 0], [1, 0]])
    copies = np.array([[1, 0], [1, 0]])
    a = assign_tokens(load, copies, cost)
    assert_feasible(load, copies, a)
    assert a[:, 1].sum() == 0


def test_exchange_reroutes_out_traffic_across_nodes():
    # ep=64 over 8 nodes, layer 195 of experiments/planner/assign_level.py (seed 0): the
    # slowest ranks (61-63) hold none of the hot expert's 61 copies, so their out-traffic
    # binds, and stages 1-2 (which charge every link at the mean) leave their tokens on
    # links to other nodes: +4.7% above the LP without the exchange step, +3.0% with the
    # earlier one, which only moved quota to or from the slowest rank. The move that shifts
    # the hot expert's quota from a holder on the slowest rank's dearest link to one on its
    # cheapest (its node-mates) brings it well below the LP.
    from experiments.planner.assign_level import CONFIGS, random_layer
    from probe.specs import hardware_preset, model_preset

    _, model, hardware, num_ranks, num_experts = CONFIGS[1]
    cost = CostModel.from_specs(model_preset(model), hardware_preset(hardware),
                                num_ranks=num_ranks)
    rng = np.random.default_rng(0)
    for i in range(196):
        load, copies = random_layer(rng, num_ranks, num_experts, 1 + i % 3)
    ours = objective(load, copies, cost, assign_tokens(load, copies, cost))
    plain = objective(load, copies, cost, assign_tokens(load, copies, cost, moves=0))
    ref = objective(load, copies, cost, assign_tokens(load, copies, cost, method="lp"))
    assert plain > ref * 1.03, (plain, ref)
    assert ours < ref * 0.95, (ours, ref)


# A small instance (4 ranks, 12 experts; expert 0 on every rank, the rest on one to three
# ranks; alpha 40, beta 1, token_time 0.4) where the candidates before the locality start
# ended +1.56% above the LP: the locality start, descended with expert 0 kept where every
# rank holds its own tokens, then exchanged, ends just below it.
SMALL_LOAD = np.array([[258, 106, 0, 31, 0, 0, 0, 0, 1, 4, 0, 0],
                       [255, 117, 0, 24, 0, 0, 0, 0, 1, 1, 1, 1],
                       [235, 119, 0, 40, 0, 0, 1, 1, 0, 4, 0, 0],
                       [256, 116, 0, 24, 0, 0, 0, 0, 0, 4, 0, 0]])
SMALL_COPIES = np.array([[1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0],
                         [1, 1, 0, 1, 0, 1, 0, 0, 0, 1, 0, 0],
                         [1, 0, 1, 0, 0, 1, 1, 0, 0, 0, 1, 0],
                         [1, 1, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1]])


def _without_locality_start(args: tuple) -> tuple:
    """`assign.kernel_args`' tuple without its last start (the locality start): the
    candidates of the code before that start was added."""
    args = list(args)
    assert args[12][-1] == 1 and not args[12][:-1].any()  # only the last start pins
    args[10], args[11], args[12] = args[10][:-1], args[11][:-1], args[12][:-1]
    return tuple(args)


def test_locality_start_on_a_small_instance():
    from probe.planner.assign import _best, kernel_args

    cost = CostModel.uniform(4, alpha=40.0, beta=1.0, token_time=0.4, transfer_time=1.0)
    load, copies = SMALL_LOAD, SMALL_COPIES
    ref = objective(load, copies, cost, assign_tokens(load, copies, cost, method="lp"))
    ours = assign_tokens(load, copies, cost)
    assert_feasible(load, copies, ours)
    old, _ = _best(*_without_locality_start(kernel_args(load, copies, cost)))
    assert objective(load, copies, cost, old) > ref * 1.015, (old, ref)
    assert objective(load, copies, cost, ours) <= ref * 1.01, (ours, ref)
    np.testing.assert_array_equal(ours, assign_tokens_ref(load, copies, cost))
    home = copies > 0
    home[1:, 0] = False  # expert 0's home on rank 0 only: the home starts join in, same end
    with_home = assign_tokens(load, copies, cost, home=home)
    np.testing.assert_array_equal(with_home, assign_tokens_ref(load, copies, cost, home=home))
    assert objective(load, copies, cost, with_home) <= ref * 1.01


def test_locality_start_keeps_pinned_experts():
    # The start: each holder its own tokens, the rest (sources without a copy) split evenly;
    # its descent refills every expert but those whose holders are all their sources (here
    # expert 0, on every rank), which keep their start. The twin's descent agrees.
    from probe.planner.assign import (_fixed_levels, _holder_lists, _starts, _waterfill,
                                      _waterfill_ref, remote_cost)

    cost = CostModel.uniform(4, alpha=40.0, beta=1.0, token_time=0.4, transfer_time=1.0)
    load, holds = SMALL_LOAD, SMALL_COPIES > 0
    hop = remote_cost(cost)
    fixed, total, order = _fixed_levels(load, holds, cost.alpha, cost.beta, hop)
    starts, passes, pins = _starts(load, holds, total, order, None, 8)
    assert passes.tolist() == [8, 0, 8, 8] and pins.tolist() == [0, 0, 0, 1]
    start = starts[-1]
    np.testing.assert_array_equal(start[0], load[:, 0])  # expert 0: every rank its own
    # expert 3 on ranks 1 and 3: each its own (24, 24), the 71 of ranks 0 and 2 halved
    assert start[3].tolist() == [0.0, 24 + 35.5, 0.0, 24 + 35.5]
    hlist, nhold = _holder_lists(holds)
    scratch = (np.empty(4), np.empty(8), np.empty((4, 4)))
    pinned = _waterfill(fixed, order, hlist, nhold, total, load, hop, cost.alpha, cost.beta,
                        8, start, *scratch, True)
    free = _waterfill(fixed, order, hlist, nhold, total, load, hop, cost.alpha, cost.beta, 8,
                      start, *scratch, False)
    np.testing.assert_array_equal(pinned[0], load[:, 0])
    assert not np.array_equal(free[0], load[:, 0])  # without the pin the descent moves it
    assert not np.array_equal(pinned[3], start[3])  # the other experts descend
    np.testing.assert_array_equal(pinned, _waterfill_ref(fixed, order, holds, total, load, hop,
                                                         cost.alpha, cost.beta, 8, start,
                                                         True))


def test_locality_start_at_full_size():
    # ep=8, layer 590 of experiments/planner/assign_level.py (seed 0), the worst of its 1,000
    # layers before the locality start (+1.13% above the LP): every rank tied with the
    # slowest, the expert on all 8 ranks split far from where its tokens are. The locality
    # start keeps that expert local and descends the rest: below the LP; the twin agrees.
    from probe.planner.assign import _best, kernel_args

    load, copies, cost = assign_level_layer(0, 590)
    ref = objective(load, copies, cost, assign_tokens(load, copies, cost, method="lp"))
    old, _ = _best(*_without_locality_start(kernel_args(load, copies, cost)))
    assert objective(load, copies, cost, old) > ref * 1.01
    ours = assign_tokens(load, copies, cost)
    assert objective(load, copies, cost, ours) < ref, (objective(load, copies, cost, ours), ref)
    np.testing.assert_array_equal(ours, assign_tokens_ref(load, copies, cost))
