"""One entry point for every planner backend: `solve(problem, method, time_limit=..., **options)`.

Backends live one per module and are imported only when asked for, so a missing optional
solver (or a broken one) never breaks `import probe.planner`. Each backend is a function
`solve_<name>(problem, *, time_limit=None, **options) -> SolveResult`; `solve` validates the
method name, runs the backend, re-checks the plan with the independent checker and fills the
objective (eq. 8) from `evaluate_plan`, so every backend is scored the same way.

>>> import numpy as np
>>> from probe.planner.cost import CostModel
>>> from probe.planner.greedy_rules import GreedyRules
>>> from probe.planner.problem import BalanceProblem
>>> cost = CostModel.uniform(2, alpha=0.0, beta=1.0, token_time=0.0, transfer_time=1.0)
>>> prob = BalanceProblem.from_load(np.array([[0, 0], [8, 0]]), cost, slots=1, window=1.0)
>>> solve(prob, "static").objective, solve(prob, "greedy").objective
(8.0, 4.0)
>>> solve(prob, "greedy", rules=GreedyRules.paper(k_max=1)).plan.num_replicas
1
>>> solve(prob, "simplex")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
ValueError: unknown method 'simplex'; choose one of: cpsat, deepseek_eplb, eplb, eplb_addcopies, ...
"""

from __future__ import annotations

import importlib
import math
import time

from probe.planner.check import check_plan, evaluate_plan
from probe.planner.problem import BalanceProblem, SolveResult

__all__ = ["METHODS", "solve"]

# method -> (module, function). Modules are imported on first use.
METHODS: dict[str, tuple[str, str]] = {
    "static": ("probe.planner.static", "solve_static"),
    "greedy": ("probe.planner.greedy", "solve_greedy"),
    "greedy_ref": ("probe.planner.greedy", "solve_greedy_ref"),
    # The greedy in rounds of moves over disjoint rank pairs (parallel_ref.py has the rules).
    "parallel_greedy": ("probe.planner.parallel", "solve_parallel_greedy"),
    "parallel_greedy_ref": ("probe.planner.parallel", "solve_parallel_greedy_ref"),
    # "eplb" is DeepSeek's EPLB (token routing over a layout from eplb_problem);
    # "deepseek_eplb" is its former name, kept as an alias; "eplb_addcopies" is the older
    # EPLB-style baseline that keeps the home layout and adds copies (named "eplb" in results
    # written before the rename: results/solvers_bench, results/sim).
    # Rounds over rank pairs in integer time, built for the GPU (lite.py has the rules).
    "lite": ("probe.planner.lite", "solve_lite"),
    "lite_ref": ("probe.planner.lite", "solve_lite_ref"),
    "eplb": ("probe.planner.deepseek_eplb", "solve_deepseek_eplb"),
    "deepseek_eplb": ("probe.planner.deepseek_eplb", "solve_deepseek_eplb"),
    "eplb_addcopies": ("probe.planner.eplb", "solve_eplb_addcopies"),
    "lp": ("probe.planner.lp", "solve_lp"),
    "cpsat": ("probe.planner.cpsat", "solve_cpsat"),
    "highs": ("probe.planner.highs", "solve_highs"),
    "hierarchical": ("probe.planner.hierarchical", "solve_hierarchical"),
}


def backend(method: str):
    """The backend function registered as `method` (imported now)."""
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(sorted(METHODS))}")
    module_name, func_name = METHODS[method]
    try:
        module = importlib.import_module(module_name)
        return getattr(module, func_name)
    except (ImportError, AttributeError) as err:
        raise ImportError(f"planner method {method!r} is unavailable: {err}") from err


def solve(problem: BalanceProblem, method: str = "greedy", *, time_limit: float | None = None,
          check: bool = True, **options) -> SolveResult:
    """Plan one layer with `method`; the result's plan is feasible or absent.

    problem: the BalanceProblem. method: one of METHODS. time_limit: seconds (None: the
    backend's default); a backend that hits it returns status "timeout" with its best plan.
    check: re-check the plan with `check_plan` (a plan that fails becomes status "error",
    plan None, with the violations in `message`). options: passed to the backend (e.g.
    rules=GreedyRules(...) for greedy and greedy_ref, rules=ParallelRules(...) for
    parallel_greedy and parallel_greedy_ref, copies for eplb (DeepSeek's EPLB, on a
    problem from probe.planner.deepseek_eplb.eplb_problem), history for eplb_addcopies,
    ranks_per_node, rules and node_rules for hierarchical).
    """
    if not isinstance(problem, BalanceProblem):
        raise TypeError(f"problem must be a BalanceProblem, got {type(problem).__name__}")
    if time_limit is not None and (isinstance(time_limit, bool) or not isinstance(
            time_limit, (int, float)) or not time_limit > 0 or math.isnan(time_limit)):
        raise ValueError(f"time_limit must be a positive number of seconds or None, "
                         f"got {time_limit!r}")
    func = backend(method)
    start = time.perf_counter()
    result = func(problem, time_limit=time_limit, **options)
    wall = result.wall_time if math.isfinite(result.wall_time) else time.perf_counter() - start
    if result.plan is None:
        return SolveResult(result.status, None, math.inf, result.bound, None, wall,
                           result.message, method, fallback=result.fallback)
    if check:
        violations = check_plan(problem, result.plan)
        if violations:
            shown = "; ".join(violations[:3])
            more = f" (+{len(violations) - 3} more)" if len(violations) > 3 else ""
            return SolveResult("error", None, math.inf, result.bound, None, wall,
                               f"{method} returned an infeasible plan: {shown}{more}", method)
    objective = evaluate_plan(problem, result.plan).objective
    bound = result.bound
    gap = None
    if bound is not None:
        gap = (objective - bound) / objective if objective > 0 else 0.0
        gap = max(gap, 0.0)
    return SolveResult(result.status, result.plan, objective, bound, gap, wall, result.message,
                       method, fallback=result.fallback)
