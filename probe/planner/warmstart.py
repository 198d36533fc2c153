"""The exact backends' common start: the warm-start plan, the clock and the MILP.

`warm_start` picks the best feasible plan of static, greedy and the LP heuristic (lp.py);
`start_exact` validates the time limit, starts the clock, takes that plan (or the caller's) and
builds the MILP of milp.py. cpsat.py and highs.py both begin with it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from probe.planner.check import check_plan, evaluate_plan
from probe.planner.lp import solve_lp
from probe.planner.milp import Milp, build_milp
from probe.planner.problem import BalanceProblem, Plan
from probe.planner.static import static_plan

__all__ = ["ExactStart", "start_exact", "warm_start"]


def warm_start(problem: BalanceProblem, *, time_limit: float | None = None,
               use_lp: bool = True) -> tuple[Plan, str]:
    """The best feasible plan of static, greedy and (use_lp) the LP heuristic, and its name.

    The LP heuristic's plan counts only when it is its own (its result's `fallback` is None),
    not greedy's plan handed back.
    """
    from probe.planner.greedy import solve_greedy  # imports Numba: only when a solve needs it

    candidates: list[tuple[str, Plan]] = [("static", static_plan(problem))]
    result = solve_greedy(problem, time_limit=time_limit)
    if result.plan is not None:
        candidates.append(("greedy", result.plan))
    if use_lp:
        result = solve_lp(problem, time_limit=time_limit)
        if result.plan is not None and result.fallback is None:
            candidates.append(("lp", result.plan))
    best_name, best_plan, best_obj = "", None, np.inf
    for name, plan in candidates:
        if check_plan(problem, plan):
            continue
        obj = evaluate_plan(problem, plan).objective
        if obj < best_obj * (1 - 1e-12) or best_plan is None:
            best_name, best_plan, best_obj = name, plan, obj
    assert best_plan is not None, "the static plan is always feasible"
    return best_plan, best_name


@dataclass(frozen=True, eq=False)
class ExactStart:
    """What both exact backends start from: the clock, the time limit, the warm start, the MILP."""

    start: float
    time_limit: float
    warm: Plan
    warm_name: str
    warm_objective: float
    milp: Milp


def start_exact(problem: BalanceProblem, time_limit: float | None, warm: Plan | None,
                default_time_limit: float) -> ExactStart:
    """Validate the time limit, start the clock, pick the warm start and build the MILP.

    time_limit: seconds for the whole solve (None: default_time_limit; math.inf: no limit).
    warm: a feasible plan to start from (None: the best of static, greedy and lp).
    """
    if time_limit is not None and not time_limit > 0:
        raise ValueError(f"time_limit must be > 0 seconds or None, got {time_limit!r}")
    if time_limit is None:
        time_limit = default_time_limit
    start = time.perf_counter()
    warm_name = "warm start"
    if warm is None:
        warm, warm_name = warm_start(problem, time_limit=time_limit)
    return ExactStart(start, time_limit, warm, warm_name, evaluate_plan(problem, warm).objective,
                      build_milp(problem))
