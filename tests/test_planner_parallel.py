"""The parallel greedy (probe.planner.parallel, parallel_ref): the Numba kernel against its
plain-Python twin, feasibility, the never-worse guarantee of independent pair moves, rounds,
the solve() entry and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import instances
from hypothesis import given, settings
from hypothesis import strategies as st

from probe.placement import sharded_home
from probe.planner import BalanceProblem, check_plan, solve
from probe.planner.check import rank_times
from probe.planner.cost import CostModel
from probe.planner.parallel import parallel_arrays, parallel_plan
from probe.planner.parallel_ref import ParallelRules, parallel_ref
from probe.specs import hardware_preset, model_preset
from probe.traces import generate

RULES = st.builds(ParallelRules, max_rounds=st.sampled_from([0, 1, 2, 5, 16]),
                  epsilon=st.sampled_from([0.0, 0.01, 1.0]),
                  hot_fraction=st.sampled_from([1.0, 0.75, 0.5, 0.1]))


def makespan(problem, plan) -> float:
    compute, comm = rank_times(problem, plan.assignment)
    return float((compute + comm).max())


def ir(problem, plan) -> float:
    compute, comm = rank_times(problem, plan.assignment)
    times = compute + comm
    return float(times.max() / times.mean())


@settings(max_examples=300, deadline=None)
@given(instances(max_ranks=7, max_experts=12), RULES)
def test_numba_kernel_equals_python_twin(problem, rules):
    ref_stats, stats = {}, {}
    ref = parallel_ref(problem, rules, ref_stats)
    plan = parallel_plan(problem, rules, stats=stats)
    np.testing.assert_array_equal(plan.assignment, ref.assignment)
    np.testing.assert_array_equal(plan.replicas, ref.replicas)
    np.testing.assert_array_equal(plan.sources, ref.sources)
    assert (stats["rounds"], stats["moves"]) == (ref_stats["rounds"], ref_stats["moves"])
    assert stats["makespan"] == ref_stats["makespan"]


@settings(max_examples=200, deadline=None)
@given(instances(max_ranks=7, max_experts=12), RULES)
def test_plans_are_feasible_and_never_worse_than_static(problem, rules):
    stats: dict = {}
    plan = parallel_plan(problem, rules, stats=stats)
    assert check_plan(problem, plan) == []
    static = solve(problem, "static").objective
    assert makespan(problem, plan) <= static * (1 + 1e-12) + 1e-12
    assert stats["makespan"] == pytest.approx(makespan(problem, plan), rel=1e-9, abs=1e-12)
    assert stats["rounds"] <= rules.rounds_limit
    assert stats["moves"] >= stats["rounds"]
    # Each pair moves once per round: at most G // 2 moves a round.
    assert stats["moves"] <= stats["rounds"] * max(problem.num_ranks // 2, 1)


@settings(max_examples=60, deadline=None)
@given(instances(max_ranks=8, max_experts=14), st.sampled_from([1.0, 0.75, 0.3]))
def test_no_round_raises_the_largest_rank_time(problem, hot_fraction):
    """The pairs' moves are judged independently against the round's start; the pool keeps
    out sources whose link would lengthen, so after each round (exact times) the largest rank
    time is never above the one before."""
    before = np.inf
    for rounds in range(1, 7):
        stats: dict = {}
        parallel_plan(problem, ParallelRules(max_rounds=rounds, hot_fraction=hot_fraction),
                      stats=stats)
        assert stats["makespan"] <= before * (1 + 1e-12) + 1e-15
        before = stats["makespan"]


def test_pairs_move_in_the_same_round():
    # Two hot ranks, two idle ones: both hot ranks hand half their load over in round one.
    cost = CostModel.uniform(4, alpha=0.0, beta=1.0, token_time=0.0, transfer_time=1.0)
    load = np.array([[8, 0, 0, 0], [0, 6, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    problem = BalanceProblem.from_load(load, cost, slots=1, window=1.0)
    stats: dict = {}
    plan = parallel_plan(problem, stats=stats)
    assert plan.tokens_per_rank_expert().tolist() == [[4, 0, 0, 0], [0, 3, 0, 0],
                                                      [4, 0, 0, 0], [0, 3, 0, 0]]
    assert (stats["rounds"], stats["moves"]) == (1, 2)
    assert plan.sources[2, 0] == 0 and plan.sources[3, 1] == 1


def test_third_party_sources_on_dearer_links_stay():
    # Rank 0 is hot with expert 0; its tokens come from rank 1 (cheap link to 0, dear to 2)
    # and rank 3 (equal links). Moving to rank 2 takes rank 3's tokens, never rank 1's.
    tt = np.array([[0, 0.1, 0.1, 0.1], [0.1, 0, 1.0, 0.1], [0.1, 1.0, 0, 0.1],
                   [0.1, 0.1, 0.1, 0]])
    cost = CostModel(0.0, 1.0, tt, np.ones((4, 4)))
    load = np.zeros((4, 4), np.int64)
    load[1, 0] = 20
    load[3, 0] = 20
    problem = BalanceProblem(load, sharded_home(4, 4), 1, 10.0, cost)
    plan = parallel_plan(problem, ParallelRules(max_rounds=1))
    assert plan.replicas[:, 0].any()
    dst = int(np.flatnonzero(plan.replicas[:, 0])[0])
    assert tt[1, dst] <= tt[1, 0] or plan.assignment[1, 0, dst] == 0
    assert check_plan(problem, plan) == []


def test_copy_window_shared_by_two_pairs():
    # Expert 0 lives on rank 0 only (send window: one copy); it sits hot on ranks 0 and 1
    # (rank 1 holds a static home copy of it too): a second copy in one round is dropped.
    cost = CostModel.uniform(4, alpha=0.0, beta=1.0, token_time=0.0, transfer_time=1.0)
    home = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], bool)
    load = np.array([[9, 0, 0, 0], [0, 9, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    window = np.array([1.0, 1.0, 5.0, 5.0])
    problem = BalanceProblem(load, home, 1, window, cost)
    for plan in (parallel_plan(problem), parallel_ref(problem)):
        assert check_plan(problem, plan) == []
        assert plan.num_replicas == 2


def test_ep64_decode_balances_in_few_rounds():
    """ep=64 / 256 experts on 8 nodes (one decode layer): far fewer rounds than the moves they
    make, and an IR close to what the sequential greedy reaches with hundreds of moves."""
    cost = CostModel.from_specs(model_preset("deepseek-v3"), hardware_preset("h200x8-n8"))
    trace = generate("decode", num_steps=2, tokens_per_step=768 * 64, num_layers=1,
                     num_experts=256, top_k=8, num_ranks=64, seed=1)
    problem = BalanceProblem.from_load(trace.load_counts()[1, 0], cost, slots=3)
    stats: dict = {}
    plan = parallel_plan(problem, stats=stats)
    assert check_plan(problem, plan) == []
    assert ir(problem, solve(problem, "static").plan) > 4
    assert ir(problem, plan) < 1.25
    assert stats["rounds"] <= ParallelRules().max_rounds
    assert stats["moves"] >= 5 * stats["rounds"]


def test_solve_entries_and_stats():
    cost = CostModel.uniform(4, alpha=0.0, beta=1.0, token_time=0.0, transfer_time=1.0)
    load = np.array([[8, 0, 0, 0], [0, 6, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    problem = BalanceProblem.from_load(load, cost, slots=1, window=1.0)
    fast = solve(problem, "parallel_greedy", rules=ParallelRules(max_rounds=4))
    slow = solve(problem, "parallel_greedy_ref", rules=ParallelRules(max_rounds=4))
    for result in (fast, slow):
        assert result.status == "feasible" and result.objective == 4.0
        assert "1 rounds, 2 moves, 2 replicas" in result.message
    np.testing.assert_array_equal(fast.plan.assignment, slow.plan.assignment)
    out = parallel_arrays(*[np.ascontiguousarray(a) for a in (
        problem.load, problem.home, problem.slots, problem.window)], 0.0, 1.0,
        np.ascontiguousarray(cost.token_time), np.ascontiguousarray(cost.transfer_time), 4,
        0.0, 0.5)
    assert out[3:] == (1, 2, 4.0)


@pytest.mark.parametrize(("changes", "error", "message"), [
    ({"max_rounds": -1}, ValueError, "max_rounds must be an int >= 0"),
    ({"max_rounds": 2.0}, ValueError, "max_rounds must be an int >= 0"),
    ({"max_rounds": True}, ValueError, "max_rounds must be an int >= 0"),
    ({"epsilon": -1.0}, ValueError, "epsilon must be finite and >= 0"),
    ({"epsilon": float("nan")}, ValueError, "epsilon must be finite and >= 0"),
    ({"epsilon": "0"}, TypeError, "epsilon must be a number"),
    ({"hot_fraction": 0.0}, ValueError, r"hot_fraction must be in \(0, 1\]"),
    ({"hot_fraction": 1.5}, ValueError, r"hot_fraction must be in \(0, 1\]"),
])
def test_bad_rules(changes, error, message):
    with pytest.raises(error, match=message):
        ParallelRules(**changes)


def test_rules_type_is_checked():
    cost = CostModel.uniform(2, alpha=0.0, beta=1.0, token_time=0.0, transfer_time=1.0)
    problem = BalanceProblem.from_load(np.array([[1, 0], [0, 1]]), cost, slots=1, window=1.0)
    for entry in (parallel_plan, parallel_ref):
        with pytest.raises(TypeError, match="rules must be a ParallelRules"):
            entry(problem, {"max_rounds": 3})
    assert ParallelRules(max_rounds=0).rounds_limit > 1000
