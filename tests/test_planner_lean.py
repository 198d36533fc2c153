"""The lean greedy path (probe/planner/lean.py) and the gap certificate (probe/planner/bound.py).

The slow twins: `solve(problem, "greedy", rules=...)` for the plan (identical), and the proven
optima of CP-SAT plus the objectives of feasible plans for the bound (never above them).
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import instances, same_plan
from hypothesis import given, settings
from hypothesis import strategies as st

from probe.placement import sharded_home
from probe.planner import BalanceProblem, CostModel, GreedyRules, evaluate_plan, solve
from probe.planner.bound import bound_parts, lower_bound
from probe.planner.lean import LeanGreedy
from probe.planner.static import static_plan

RULES = [GreedyRules(), GreedyRules.paper(), GreedyRules(k_max=0, evacuate=True),
         GreedyRules(also_paper=False, mean_cap=True)]


def _lean_of(problem: BalanceProblem, rules: GreedyRules, **kw) -> LeanGreedy:
    return LeanGreedy(problem.home, problem.slots, problem.cost, rules, **kw)


def _arrays(problem: BalanceProblem):
    return (np.ascontiguousarray(problem.load, dtype=np.int64),
            np.ascontiguousarray(problem.window, dtype=np.float64))


def _assert_same(problem: BalanceProblem, rules: GreedyRules) -> None:
    lean = _lean_of(problem, rules)
    load, window = _arrays(problem)
    out = lean.plan(load, window)
    ref = solve(problem, "greedy", rules=rules)
    assert ref.status == "feasible"
    assert same_plan(lean.to_plan(load, window, out), ref.plan)
    assert np.array_equal(lean.assignment(load, out), ref.plan.assignment)
    assert out.objective == pytest.approx(ref.objective, rel=1e-9, abs=1e-12)
    assert out.bound <= ref.objective
    assert out.bound == lower_bound(problem)


@settings(max_examples=250, deadline=None)
@given(instances(), st.sampled_from(range(len(RULES))))
def test_lean_plan_is_solve_greedy_plan(problem, which):
    _assert_same(problem, RULES[which])


@pytest.mark.parametrize("seed", range(6))
def test_lean_plan_matches_on_decode_sized_instances(ep8_problem, seed):
    problem = ep8_problem(seed)
    for rules in (GreedyRules(), GreedyRules.paper(), GreedyRules(k_max="auto")):
        _assert_same(problem, rules)


def test_lean_reuses_one_instance_across_loads(ep8_problem):
    base = ep8_problem(0)
    lean = _lean_of(base, GreedyRules(), debug=True)  # debug: check_plan + greedy_plan per call
    rng = np.random.default_rng(3)
    for _ in range(5):
        load = rng.integers(0, 60, base.load.shape).astype(np.int64)
        window = rng.random(8) * 3e-4
        out = lean.plan(load, window)
        ref = solve(BalanceProblem.from_load(load, base.cost, base.slots, window, base.home),
                    "greedy")
        assert same_plan(lean.to_plan(load, window, out), ref.plan)


def test_lean_rejects_bad_arrays():
    cost = CostModel.uniform(2, alpha=0.0, beta=1.0, token_time=0.0, transfer_time=1.0)
    lean = LeanGreedy(sharded_home(2, 2), 1, cost)
    window = np.ones(2)
    load = np.array([[1, 2], [3, 4]], np.int64)
    with pytest.raises(ValueError, match="load must be a C-contiguous int64"):
        lean.plan(load.astype(np.int32), window)
    with pytest.raises(ValueError, match="shape"):
        lean.plan(np.zeros((2, 3), np.int64), window)
    with pytest.raises(ValueError, match="load must be"):
        lean.plan(np.asfortranarray(np.arange(4, dtype=np.int64).reshape(2, 2) + 1)[:, ::-1],
                  window)
    with pytest.raises(ValueError, match="window must be"):
        lean.plan(load, np.ones(2, np.float32))
    with pytest.raises(ValueError, match="negative token count"):
        lean.plan(np.array([[1, -2], [3, 4]], np.int64), window)
    with pytest.raises(ValueError, match="MAX_TOKENS"):
        lean.plan(np.full((2, 2), 2**61, np.int64), window)
    with pytest.raises(ValueError, match="window must be >= 0"):
        lean.plan(load, np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="window must be >= 0"):
        lean.plan(load, np.array([1.0, -1.0]))
    with pytest.raises(ValueError, match="expert 1 has no home"):
        LeanGreedy(np.array([[True, False], [True, False]]), 1, cost)
    with pytest.raises(TypeError, match="cost must be a CostModel"):
        LeanGreedy(sharded_home(2, 2), 1, "cost")
    with pytest.raises(TypeError, match="rules must be a GreedyRules"):
        LeanGreedy(sharded_home(2, 2), 1, cost, rules="paper")
    big = CostModel.uniform(2, alpha=0.0, beta=1e300, token_time=0.0, transfer_time=1.0)
    with pytest.raises(ValueError, match="overflow float64"):
        LeanGreedy(sharded_home(2, 2), 1, big).plan(np.full((2, 2), 10**9, np.int64), window)


def test_lean_without_bound_reports_nan(ep8_problem):
    problem = ep8_problem(1)
    out = _lean_of(problem, GreedyRules(), bound=False).plan(*_arrays(problem))
    assert np.isnan(out.bound)


# The gap certificate.

@settings(max_examples=300, deadline=None)
@given(instances())
def test_bound_never_exceeds_feasible_plans(problem):
    bound = lower_bound(problem)
    assert bound >= 0.0
    for plan in (static_plan(problem), solve(problem, "greedy").plan,
                 solve(problem, "greedy", rules=GreedyRules.paper()).plan,
                 solve(problem, "eplb_addcopies").plan):
        assert bound <= evaluate_plan(problem, plan).objective


@pytest.mark.slow
@settings(max_examples=40, deadline=None)
@given(instances(max_ranks=3, max_experts=4, max_tokens=12))
def test_bound_never_exceeds_the_proven_optimum(problem):
    result = solve(problem, "cpsat", time_limit=10.0, num_workers=1)
    if result.status == "optimal":
        assert lower_bound(problem) <= result.objective


def test_bound_below_proven_optima_on_seeded_instances():
    # Non-trivial tiny instances (random links, one slot, several windows): CP-SAT proves each.
    rng = np.random.default_rng(0)
    gaps = []
    for _ in range(12):
        cost = CostModel(alpha=0.3, beta=1.0, token_time=rng.random((3, 3)) * 0.3,
                         transfer_time=rng.random((3, 3)) + 0.1)
        window = float(rng.choice([0.5, 2.0, np.inf]))
        problem = BalanceProblem.from_load(rng.integers(0, 12, (3, 4)), cost, 1, window)
        result = solve(problem, "cpsat", time_limit=10.0, num_workers=1)
        if result.status == "optimal":
            bound = lower_bound(problem)
            assert bound <= result.objective
            gaps.append((result.objective - bound) / result.objective)
    assert len(gaps) >= 10
    assert max(gaps) > 0.0  # the instances are not all trivially tight


def test_bound_parts_hand_computed():
    # Expert 0 (home on rank 0) gets 6 tokens from rank 0 and 2 from rank 1; one slot each,
    # window fits one copy. mean: (1*8 + 0.5*1 + 2*(2*0.25)) / 2 = 4.75 (rank 1's 2 tokens
    # could stay if it copies expert 0, so M_1 = 0: comm 0) -> (8 + 0.5) / 2 = 4.25.
    # expert: 8 tokens over at most 2 copies: 0.5 + 4 = 4.5. source: 0.
    cost = CostModel.uniform(2, alpha=0.5, beta=1.0, token_time=0.25, transfer_time=1.0)
    prob = BalanceProblem.from_load(np.array([[6, 0], [2, 0]]), cost, slots=1, window=1.0)
    parts = bound_parts(prob)
    assert parts["mean"] == pytest.approx(4.25)
    assert parts["expert"] == pytest.approx(4.5)
    assert parts["source"] == 0.0
    # No slots: expert 0 is pinned to rank 0 (one copy possible). mean: rank 1's 2 tokens must
    # move (0.25 s each): (8.5 + 2 * 0.5) / 2 = 4.75; expert: 0.5 + 8 = 8.5; source (the pinned
    # rank bound): rank 0 runs all 8 tokens and receives 2: 8.5 + 2 * 0.5 = 9.5, the optimum.
    prob = BalanceProblem.from_load(np.array([[6, 0], [2, 0]]), cost, slots=0, window=1.0)
    parts = bound_parts(prob)
    assert parts["mean"] == pytest.approx(4.75)
    assert parts["source"] == pytest.approx(9.5)
    assert parts["expert"] == pytest.approx(8.5)
    assert lower_bound(prob) <= solve(prob, "greedy").objective == pytest.approx(9.5)


def test_lower_bound_rejects_non_problems():
    with pytest.raises(TypeError, match="BalanceProblem"):
        lower_bound(np.zeros((2, 2)))
