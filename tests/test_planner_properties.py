"""Every planner method on random and degenerate instances (hypothesis): feasible, conserving,
never worse than static EP, and the exact backends never worse than the heuristics."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from helpers import instances

from probe.planner import check_plan, evaluate_plan, solve

HEURISTICS = ("static", "greedy", "greedy_ref", "eplb_addcopies", "eplb", "lp")
EXACT = ("cpsat", "highs")
# Relative slack for objectives computed from different float sums of the same plan.
TOL = 1e-9


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances(max_ranks=4, max_experts=6, max_tokens=12))
def test_every_method_is_feasible_and_never_worse_than_static(problem):
    static = solve(problem, "static").objective
    objectives = {}
    for method in HEURISTICS + EXACT:
        limit = 5.0 if method in EXACT else None
        result = solve(problem, method, time_limit=limit, check=False)
        assert result.plan is not None, f"{method}: {result.message}"
        assert check_plan(problem, result.plan) == [], method
        assert np.array_equal(result.plan.assignment.sum(axis=2), problem.load), method
        objective = evaluate_plan(problem, result.plan).objective
        objectives[method] = objective
        if method not in ("eplb", "eplb_addcopies"):  # no locality: not bound by static
            assert objective <= static * (1 + TOL) + 1e-12, (method, objective, static)
    best_heuristic = min(objectives[m] for m in HEURISTICS)
    for method in EXACT:
        assert objectives[method] <= best_heuristic * (1 + TOL) + 1e-12, (method, objectives)
