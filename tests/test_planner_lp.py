"""The lp planning heuristic (probe/planner/lp.py): feasibility, never worse than greedy, time
limits, and the relaxation dive against the earlier single rounding (its recorded objective)."""

from __future__ import annotations

import time

import numpy as np
import pytest

import probe.planner.lp as lp_module
from probe.placement import sharded_home
from probe.planner.check import check_plan, evaluate_plan
from probe.planner.cost import CostModel
from probe.planner.greedy import solve_greedy
from probe.planner.highs import solve_highs
from probe.planner.lp import solve_lp
from probe.planner.problem import BalanceProblem
from test_planner_exact import ep8_problem  # the same ep=8 decode step


def objective(problem: BalanceProblem, plan) -> float:
    return evaluate_plan(problem, plan).objective


def random_problem(seed: int) -> BalanceProblem:
    """A random instance: 2-8 ranks, 2-4 experts per rank, skewed loads, 0-3 slots, windows
    from none to several copies, one node or two nodes (slower links between them)."""
    rng = np.random.default_rng(seed)
    num_ranks = int(rng.choice([2, 3, 4, 6, 8]))
    num_experts = num_ranks * int(rng.integers(2, 5))
    load = rng.integers(0, 6, (num_ranks, num_experts))
    hot = rng.permutation(num_experts)[:num_ranks]
    load[:, hot] += rng.integers(0, 30, (num_ranks, hot.size))
    alpha = float(rng.choice([0.0, 0.5, 4.0]))
    if rng.random() < 0.5:
        cost = CostModel.uniform(num_ranks, alpha=alpha, beta=1.0, token_time=0.2,
                                 transfer_time=1.0)
    else:
        node = np.arange(num_ranks) >= num_ranks // 2
        far = node[:, None] != node[None, :]
        off = ~np.eye(num_ranks, dtype=bool)
        cost = CostModel(alpha=alpha, beta=1.0, token_time=off * np.where(far, 0.6, 0.1),
                         transfer_time=off * np.where(far, 2.5, 1.0))
    slots = int(rng.integers(0, 4))
    window = float(rng.choice([0.0, 1.0, 1.5, 2.0, 3.0, 10.0]))
    return BalanceProblem(load, sharded_home(num_experts, num_ranks), slots, window, cost)


def cycle_problem() -> BalanceProblem:
    """Four ranks, two experts each; every rank may send one copy and receive one (window of
    one transfer, one slot). Rank 3's expert 7 and rank 1's expert 2 are hot, rank 0 is
    light: the optimum moves load around a cycle of copies (7: 3->0, 1: 0->1, 2: 1->2,
    4: 2->3), which a single copy from the slowest rank cannot reach."""
    load = np.array([[3, 6, 12, 1, 13, 2, 1, 31],
                     [0, 5, 31, 2, 5, 0, 0, 40],
                     [0, 10, 18, 0, 7, 3, 0, 41],
                     [1, 17, 15, 0, 13, 3, 3, 40]])
    cost = CostModel.uniform(4, alpha=1.0, beta=1.0, token_time=0.1, transfer_time=1.0)
    return BalanceProblem(load, sharded_home(8, 4), 1, 1.0, cost)


@pytest.mark.parametrize("seed", range(24))
def test_lp_plans_are_feasible_and_never_worse_than_greedy(seed):
    problem = random_problem(seed)
    greedy = objective(problem, solve_greedy(problem).plan)
    result = solve_lp(problem)
    assert result.status == "feasible", result.message
    assert check_plan(problem, result.plan) == []
    assert result.objective == pytest.approx(objective(problem, result.plan), rel=1e-12)
    assert result.objective <= greedy * (1 + 1e-12)
    assert result.method == "lp"


# Objective of the earlier single-rounding heuristic (one relaxation, LP tokens rounded after
# greedy's replicas, one assignment) on cycle_problem, recorded before it was removed.
SINGLE_ROUNDING_OBJECTIVE = 113.4


def test_dive_finds_the_cycle_of_copies_that_single_rounding_misses():
    problem = cycle_problem()
    new = solve_lp(problem)
    best = solve_highs(problem, time_limit=30)
    assert check_plan(problem, new.plan) == []
    assert new.objective < SINGLE_ROUNDING_OBJECTIVE * (1 - 1e-6)
    assert new.plan.num_replicas >= 3  # copies that chain load from rank to rank
    assert best.status == "optimal"
    assert new.objective <= best.objective * 1.01


def test_lp_beats_greedy_on_a_decode_step():
    problem = ep8_problem(0)
    greedy = objective(problem, solve_greedy(problem).plan)
    result = solve_lp(problem)
    assert check_plan(problem, result.plan) == []
    assert result.objective < greedy


def test_tiny_time_limit_returns_greedy_with_status_timeout():
    problem = ep8_problem(0)
    greedy = objective(problem, solve_greedy(problem).plan)
    result = solve_lp(problem, time_limit=1e-6)
    assert result.status == "timeout"
    assert "greedy" in result.message
    assert check_plan(problem, result.plan) == []
    assert result.objective <= greedy * (1 + 1e-12)


def test_deadline_during_the_dives_keeps_the_best_plan_so_far(monkeypatch):
    # Every LP solve takes 30 ms more: any two solves (a dive and an assignment at least)
    # pass the 50 ms limit.
    run = lp_module._run

    def slow_run(solver, time_left):
        time.sleep(0.03)
        return run(solver, time_left)

    monkeypatch.setattr(lp_module, "_run", slow_run)
    problem = ep8_problem(2)
    greedy = objective(problem, solve_greedy(problem).plan)
    start = time.perf_counter()
    result = solve_lp(problem, time_limit=0.05)
    wall = time.perf_counter() - start
    assert result.status == "timeout", result.message
    assert "time limit" in result.message
    assert check_plan(problem, result.plan) == []
    assert result.objective <= greedy * (1 + 1e-12)
    assert wall < 0.05 + 0.5  # one slowed LP solve past the deadline at most, plus slack


def test_generous_time_limit_changes_nothing():
    problem = cycle_problem()
    free = solve_lp(problem)
    limited = solve_lp(problem, time_limit=30.0)
    assert limited.status == "feasible"
    assert limited.objective == free.objective
    assert np.array_equal(limited.plan.assignment, free.plan.assignment)


def test_nothing_to_replicate_returns_greedy():
    problem = random_problem(0)
    no_window = BalanceProblem(problem.load, problem.home, 2, 0.0, problem.cost)
    result = solve_lp(no_window)
    assert result.plan.num_replicas == 0
    assert "nothing to replicate" in result.message


@pytest.mark.parametrize(("option", "value"), [("per_rank", -1), ("per_rank", 1.5),
                                                ("num_candidates", -2)])
def test_bad_options_are_rejected(option, value):
    with pytest.raises(ValueError, match=option):
        solve_lp(cycle_problem(), **{option: value})


def test_registry_passes_options_through():
    from probe.planner.solve import solve

    problem = cycle_problem()
    new = solve(problem, "lp")
    narrow = solve(problem, "lp", per_rank=0, num_candidates=1)
    assert new.objective == solve_lp(problem).objective
    assert narrow.objective == solve_lp(problem, per_rank=0, num_candidates=1).objective


def test_assignment_for_a_fixed_placement_is_feasible_and_keeps_its_replicas():
    # The step-4 LP alone (solvers_bench.analysis re-assigns greedy's tokens with it).
    from probe.planner.highs_base import time_unit
    from probe.planner.static import static_plan

    problem = ep8_problem(0)
    greedy = solve_greedy(problem).plan
    plan = lp_module._assignment(problem, static_plan(problem), greedy.replicas, greedy.sources,
                                 time_unit(objective(problem, greedy)), None)
    assert check_plan(problem, plan) == []
    assert not (plan.replicas & ~greedy.replicas).any()


def test_a_reused_highs_instance_gets_the_whole_time_left():
    # The LP instances are cached per thread, and HiGHS compares time_limit with the run time
    # an instance has accumulated over all its runs: after enough earlier solves a short limit
    # must still allow a full (fast) solve, not stop at once.
    problem = cycle_problem()
    solve_lp(problem)
    solver = lp_module._CACHE.relax
    for _ in range(100000):
        if solver.getRunTime() > 0.05:
            break
        lp_module._run(solver, None)
    assert solver.getRunTime() > 0.05
    assert lp_module._run(solver, 0.04) is not None
    result = solve_lp(problem, time_limit=0.5)
    assert result.status == "feasible" and result.fallback is None, result.message


def test_fallback_names_greedy_only_when_greedy_comes_back():
    problem = random_problem(0)
    no_window = BalanceProblem(problem.load, problem.home, 2, 0.0, problem.cost)
    assert solve_lp(no_window).fallback == "greedy"
    assert solve_lp(cycle_problem()).fallback is None
