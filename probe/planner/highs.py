"""HiGHS backend: the MILP of milp.py as a HiGHS MIP, warm-started from the best plan of
warmstart.py.

Scaling (HiGHS compares rows with absolute tolerances, and plan times are of order 1e-4 s):
makespan rows and z are measured in `unit` seconds, chosen so that the warm start's objective is
about 1000 units; each window row is divided by its window limit (tolerance.window_limit), so its
right-hand side is 1. Coefficients stay real numbers: no rounding.

Tolerances: the checker allows a window only WINDOW_REL (1e-9) of slack, while HiGHS accepts rows
violated by its feasibility tolerances (1e-7 and 1e-6 by default). So the MIP runs with
FEASIBILITY_TOL (1e-10) as primal and MIP feasibility tolerance, and each window row's bound is
lowered by WINDOW_MARGIN (two such tolerances, in window-limit units): a solution HiGHS accepts
then passes check_plan. The reported bound is HiGHS's MIP dual bound converted back to seconds;
it is proven up to those tolerances.
"""

from __future__ import annotations

import math
import time

import numpy as np

from probe.planner.highs_base import highs_lp, new_highs, time_unit
from probe.planner.milp import MAKESPAN, WINDOW, Milp, plan_from_values, plan_to_values
from probe.planner.problem import BalanceProblem, Plan, SolveResult
from probe.planner.result import finish_result
from probe.planner.warmstart import start_exact

__all__ = ["DEFAULT_TIME_LIMIT", "FEASIBILITY_TOL", "highs_model", "solve_highs"]

# Seconds a solve may take when the caller gives no time limit.
DEFAULT_TIME_LIMIT = 60.0
# Primal and MIP feasibility tolerance of the MIP (HiGHS's smallest allowed value).
FEASIBILITY_TOL = 1e-10
# Window rows' right-hand side is 1 - WINDOW_MARGIN: a row violated by up to FEASIBILITY_TOL,
# plus binaries off their integer value by up to FEASIBILITY_TOL, still fits the window limit.
WINDOW_MARGIN = 2 * FEASIBILITY_TOL


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
    row_upper = milp.row_upper * row_scale
    row_upper[window_rows] = 1.0 - WINDOW_MARGIN
    integrality = milp.col_integer if integer else None
    return highs_lp(cost, milp.col_lower, milp.col_upper, milp.row_lower * row_scale,
                    row_upper, milp.coef_row, milp.coef_col, vals, integrality)


def solve_highs(problem: BalanceProblem, *, time_limit: float | None = None,
                mip_rel_gap: float = 1e-6, warm: Plan | None = None,
                threads: int | None = None, verbose: bool = False) -> SolveResult:
    """Solve the balance MILP with HiGHS MIP.

    time_limit: seconds for the whole call, warm start and model building included (None:
        DEFAULT_TIME_LIMIT; math.inf: no limit).
    mip_rel_gap: HiGHS stops and reports "optimal" once its relative gap is below this.
    warm: a feasible plan to start from (default: the best of static, greedy and lp,
        warmstart.warm_start).
    threads: HiGHS threads (HiGHS's MIP search is mostly serial; None keeps its default).
    verbose: let HiGHS print its log (default: silent).
    Returns a SolveResult whose plan is never worse than the warm start; if HiGHS fails (an
    exception, or a model status without a solution) the warm start comes back with status
    "feasible", `fallback` set and the failure in the message.
    """
    import highspy

    setup = start_exact(problem, time_limit, warm, DEFAULT_TIME_LIMIT)
    start, time_limit, warm, warm_name = setup.start, setup.time_limit, setup.warm, setup.warm_name
    warm_obj, milp = setup.warm_objective, setup.milp
    unit = time_unit(warm_obj)
    options = {"mip_rel_gap": float(mip_rel_gap), "primal_feasibility_tolerance": FEASIBILITY_TOL,
               "mip_feasibility_tolerance": FEASIBILITY_TOL}
    if threads is not None:
        options["threads"] = int(threads)
    remaining = time_limit - (time.perf_counter() - start)
    if remaining <= 0:
        return finish_result(problem, "highs", start, "timeout", None, warm, warm_name, None,
                             "time limit reached before the MIP started")
    try:
        if threads is not None:
            # HiGHS keeps one thread scheduler per process, sized by the first solve (here often
            # the warm start's LP); a different `threads` is refused at run time unless reset.
            highspy.Highs.resetGlobalScheduler(True)
        solver = new_highs(remaining if math.isfinite(remaining) else None, verbose=verbose,
                           **options)
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
            candidate = plan_from_values(milp, problem,
                                         np.asarray(solver.getSolution().col_value))
    except Exception as err:  # any HiGHS failure keeps the warm start
        return finish_result(problem, "highs", start, "feasible", None, warm, warm_name, None,
                             f"HiGHS failed ({type(err).__name__}: {err})")
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
