"""HiGHS backend: the MILP of milp.py as a HiGHS MIP, warm-started from the greedy plan.

Scaling (HiGHS compares rows with absolute tolerances near 1e-7, and plan times are of order
1e-4 s): makespan rows and z are measured in `unit` seconds, chosen so that the warm start's
objective is about 1000 units; each window row is divided by its window (right-hand side 1).
Coefficients stay real numbers: no rounding. The reported bound is HiGHS's MIP dual bound
converted back to seconds; it is proven up to HiGHS's feasibility tolerances.
"""

from __future__ import annotations

import math
import time

import numpy as np

from probe.planner.milp import MAKESPAN, WINDOW, Milp, finish_result, \
    plan_from_values, plan_to_values, start_exact
from probe.planner.problem import BalanceProblem, Plan, SolveResult

__all__ = ["DEFAULT_TIME_LIMIT", "highs_model", "lp_from_arrays", "solve_highs"]

# Seconds a solve may take when the caller gives no time limit.
DEFAULT_TIME_LIMIT = 60.0


def time_unit(objective: float) -> float:
    """Seconds per model time unit: the warm start's objective maps to about 1000 units."""
    return objective / 1000.0 if objective > 0 else 1.0


def highs_model(milp: Milp, unit: float, *, integer: bool):
    """A highspy.HighsLp of `milp` (scaled as the module docstring says), minimising z.

    integer=False gives the LP relaxation.
    """
    num_cols, num_rows = milp.num_cols, milp.num_rows
    row_scale = np.ones(num_rows)
    row_scale[milp.row_family == MAKESPAN] = 1.0 / unit
    window_rows = milp.row_family == WINDOW
    row_scale[window_rows] = 1.0 / milp.row_upper[window_rows]
    vals = milp.coef_val * row_scale[milp.coef_row]
    # z is itself measured in units, so its coefficient keeps its value (-1 or -G).
    is_z = milp.coef_col == milp.z_col
    vals[is_z] = milp.coef_val[is_z]
    cost = np.zeros(num_cols)
    cost[milp.z_col] = 1.0
    integrality = milp.col_integer if integer else None
    return lp_from_arrays(cost, milp.col_lower, milp.col_upper, milp.row_lower * row_scale,
                          milp.row_upper * row_scale, milp.coef_row, milp.coef_col, vals,
                          integrality)


def lp_from_arrays(col_cost: np.ndarray, col_lower: np.ndarray, col_upper: np.ndarray,
                   row_lower: np.ndarray, row_upper: np.ndarray, coef_row: np.ndarray,
                   coef_col: np.ndarray, coef_val: np.ndarray,
                   integrality: np.ndarray | None = None):
    """A highspy.HighsLp (minimise) from numpy arrays: float [N] column data, float [M] row
    bounds (+-inf allowed), coordinate coefficients [NNZ] without duplicates, and optionally
    bool [N] integrality."""
    import highspy

    inf = highspy.kHighsInf
    num_cols, num_rows = col_cost.size, row_lower.size
    order = np.lexsort((coef_row, coef_col))
    starts = np.zeros(num_cols + 1, np.int32)
    np.cumsum(np.bincount(coef_col, minlength=num_cols), out=starts[1:])
    lp = highspy.HighsLp()
    lp.num_col_ = num_cols
    lp.num_row_ = num_rows
    lp.col_cost_ = col_cost
    lp.col_lower_ = np.where(np.isneginf(col_lower), -inf, col_lower)
    lp.col_upper_ = np.where(np.isposinf(col_upper), inf, col_upper)
    lp.row_lower_ = np.where(np.isneginf(row_lower), -inf, row_lower)
    lp.row_upper_ = np.where(np.isposinf(row_upper), inf, row_upper)
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = starts
    lp.a_matrix_.index_ = coef_row[order].astype(np.int32)
    lp.a_matrix_.value_ = coef_val[order]
    if integrality is not None:
        lp.integrality_ = np.where(integrality, highspy.HighsVarType.kInteger,
                                   highspy.HighsVarType.kContinuous).tolist()
    return lp


def new_highs(time_limit: float | None, **options):
    """A silent highspy.Highs with a time limit and extra options set."""
    import highspy

    solver = highspy.Highs()
    solver.setOptionValue("output_flag", False)
    if time_limit is not None:
        solver.setOptionValue("time_limit", max(float(time_limit), 1e-3))
    for key, value in options.items():
        solver.setOptionValue(key, value)
    return solver


def solve_highs(problem: BalanceProblem, *, time_limit: float | None = None,
                mip_rel_gap: float = 1e-6, warm: Plan | None = None,
                threads: int | None = None) -> SolveResult:
    """Solve the balance MILP with HiGHS MIP.

    time_limit: seconds for the whole call, warm start and model building included (None:
        DEFAULT_TIME_LIMIT; math.inf: no limit).
    mip_rel_gap: HiGHS stops and reports "optimal" once its relative gap is below this.
    warm: a feasible plan to start from (default: the better of greedy and static).
    threads: HiGHS threads (HiGHS's MIP search is mostly serial; None keeps its default).
    Returns a SolveResult whose plan is never worse than the warm start.
    """
    import highspy

    setup = start_exact(problem, time_limit, warm, DEFAULT_TIME_LIMIT)
    start, time_limit, warm, warm_name = setup.start, setup.time_limit, setup.warm, setup.warm_name
    warm_obj, milp = setup.warm_objective, setup.milp
    unit = time_unit(warm_obj)
    options = {"mip_rel_gap": float(mip_rel_gap)}
    if threads is not None:
        options["threads"] = int(threads)
    remaining = time_limit - (time.perf_counter() - start)
    if remaining <= 0:
        return finish_result(problem, "highs", start, "timeout", None, warm, warm_name, None,
                             "time limit reached before the MIP started")
    if threads is not None:
        # HiGHS keeps one thread scheduler per process, sized by the first solve (here often the
        # warm start's LP); a different `threads` is refused at run time unless it is reset.
        highspy.Highs.resetGlobalScheduler(True)
    solver = new_highs(remaining if math.isfinite(remaining) else None, **options)
    solver.passModel(highs_model(milp, unit, integer=True))
    values = plan_to_values(milp, problem, warm)
    if values is not None:
        values[milp.z_col] = warm_obj / unit * (1 + 1e-9) + 1e-9
        hint = highspy.HighsSolution()
        hint.col_value = values.tolist()
        hint.value_valid = True
        solver.setSolution(hint)
    solver.run()
    status = solver.getModelStatus()
    info = solver.getInfo()
    bound = None
    if np.isfinite(info.mip_dual_bound) and abs(info.mip_dual_bound) < highspy.kHighsInf:
        bound = max(float(info.mip_dual_bound), 0.0) * unit
    candidate = None
    if info.primal_solution_status == 2:  # a feasible solution exists
        candidate = plan_from_values(milp, problem, np.asarray(solver.getSolution().col_value))
    if status == highspy.HighsModelStatus.kOptimal:
        outcome, message = "optimal", f"HiGHS optimal within mip_rel_gap={mip_rel_gap:g}"
        # When presolve solves the whole model HiGHS leaves mip_dual_bound at 0; "optimal"
        # itself proves the optimum is within mip_rel_gap of the incumbent.
        proven = float(info.objective_function_value) * unit * (1 - mip_rel_gap)
        bound = proven if bound is None else max(bound, proven)
    elif status in (highspy.HighsModelStatus.kTimeLimit, highspy.HighsModelStatus.kInterrupt):
        outcome, message = "timeout", "HiGHS hit the time limit; best incumbent kept"
    else:
        outcome, message = "feasible", f"HiGHS stopped: {solver.modelStatusToString(status)}"
    return finish_result(problem, "highs", start, outcome, candidate, warm, warm_name, bound,
                         message)
