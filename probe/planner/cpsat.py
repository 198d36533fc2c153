"""OR-Tools CP-SAT backend: the MILP of milp.py in scaled integers, hinted with the warm start.

CP-SAT needs integer coefficients. Each row family is rounded so that (1) every plan feasible
for the true problem stays feasible in the integer model with a makespan no larger than its
true one, which makes CP-SAT's proven bound, converted back to seconds, a true lower bound; and
(2) every plan feasible in the integer model passes check_plan:
- counting rows (conservation, activation, slots, flows) already have integer coefficients;
- makespan rows measure time in quanta of q seconds, q = (smallest positive alpha, beta or
  token time) / 1e4 (but at least warm objective / 1e12, to bound z's domain): time coefficients
  and constants are rounded down, so the integer makespan of a plan is at most its true
  makespan / q (relative error per coefficient <= 1e-4 of the smallest one). The plan CP-SAT
  returns is re-evaluated exactly in floating point with evaluate_plan;
- a window row with n copy terms and limit L (tolerance.window_limit: the checker's test) uses
  its own quantum q_w = L * WINDOW_REL / (4 n): transfer times are rounded down and the bound is
  floor(L / q_w) - n. A set of copies that is feasible in the integer model takes less than
  L (each term loses less than q_w), so it passes check_plan; every set within
  L - n * q_w = L * (1 - WINDOW_REL / 4) stays feasible, which is all of the checker's slack
  but its last quarter.
If CP-SAT fails (an exception, an invalid model, e.g. overflowing products of huge loads and
time coefficients, or a status without a solution), the warm start comes back with status
"feasible", `fallback` set and the failure in the message.
"""

from __future__ import annotations

import math
import os
import time

import numpy as np

from probe.planner.milp import EXACT, MAKESPAN, WINDOW, Milp, plan_from_values, plan_to_values
from probe.planner.problem import BalanceProblem, Plan, SolveResult
from probe.planner.result import finish_result
from probe.planner.tolerance import WINDOW_REL
from probe.planner.warmstart import start_exact

__all__ = ["DEFAULT_TIME_LIMIT", "scale_milp", "solve_cpsat", "time_quantum"]

# Seconds a solve may take when the caller gives no time limit.
DEFAULT_TIME_LIMIT = 60.0

# Relative precision of the makespan quantum against the smallest positive time coefficient.
_QUANTUM_DIVISOR = 1e4
# Most quanta z may span (keeps products of coefficients and domains far from 2**63).
_MAX_Z_QUANTA = 1e12
# Full-problem workers, in order, when there are fewer than 8 (CP-SAT uses the first ones).
_SMALL_PORTFOLIO = ("max_lp", "default_lp", "quick_restart", "reduced_costs", "pseudo_costs",
                    "no_lp", "core")
# A window row's quantum is its share of WINDOW_REL (the checker's slack) divided by this.
_WINDOW_SPLIT = 4


def time_quantum(problem: BalanceProblem, upper_bound: float) -> float:
    """Seconds per integer time unit of the makespan rows (module docstring)."""
    cost = problem.cost
    times = np.concatenate([[cost.alpha, cost.beta], cost.token_time.ravel()])
    positive = times[times > 0]
    if positive.size == 0:
        return 1.0
    quantum = float(positive.min()) / _QUANTUM_DIVISOR
    return max(quantum, upper_bound / _MAX_Z_QUANTA)


def scale_milp(milp: Milp, quantum: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integer coefficients int64 [NNZ] and row bounds int64-or-None lists [M] of `milp`."""
    vals = np.zeros(milp.coef_val.size, np.int64)
    lower: list[int | None] = [None] * milp.num_rows
    upper: list[int | None] = [None] * milp.num_rows
    family = milp.row_family[milp.coef_row]
    is_z = milp.coef_col == milp.z_col

    exact = family == EXACT
    vals[exact] = np.rint(milp.coef_val[exact]).astype(np.int64)
    span = (family == MAKESPAN) & ~is_z
    vals[span] = np.floor(milp.coef_val[span] / quantum).astype(np.int64)
    vals[is_z] = np.rint(milp.coef_val[is_z]).astype(np.int64)  # z counts quanta already
    window_rows = np.flatnonzero(milp.row_family == WINDOW)
    terms = np.bincount(milp.coef_row, minlength=milp.num_rows)
    window_quantum = np.zeros(milp.num_rows)
    window_quantum[window_rows] = (milp.row_upper[window_rows] * WINDOW_REL
                                   / (_WINDOW_SPLIT * np.maximum(terms[window_rows], 1)))
    win = family == WINDOW
    vals[win] = np.floor(milp.coef_val[win] / window_quantum[milp.coef_row[win]]).astype(np.int64)

    for r in range(milp.num_rows):
        lo, hi, fam = milp.row_lower[r], milp.row_upper[r], milp.row_family[r]
        if fam == EXACT:
            lower[r] = None if np.isneginf(lo) else int(round(lo))
            upper[r] = None if np.isposinf(hi) else int(round(hi))
        elif fam == MAKESPAN:  # hi = -(constant seconds): the constant rounds down
            upper[r] = math.ceil(hi / quantum - 1e-12)
        else:  # the limit, less one quantum per term (module docstring)
            upper[r] = math.floor(hi / window_quantum[r]) - int(terms[r])
    return vals, np.array(lower, dtype=object), np.array(upper, dtype=object)


def _cp_model(problem: BalanceProblem, milp: Milp, warm: Plan, quantum: float, z_max: int):
    """The CP-SAT model of `milp` (scaled by `quantum`) hinted with `warm`, and its variables."""
    from ortools.sat.python import cp_model

    coef, row_lower, row_upper = scale_milp(milp, quantum)
    model = cp_model.CpModel()
    variables = []
    for col, name in enumerate(milp.col_names()):
        kind = int(milp.col_kind[col])
        if kind == 4:
            variables.append(model.new_int_var(0, z_max, name))
        elif kind in (1, 2):
            variables.append(model.new_bool_var(name))
        else:
            variables.append(model.new_int_var(int(milp.col_lower[col]),
                                               int(milp.col_upper[col]), name))
    # The constraint families are those of milp.build_milp (see the sentences there); here each
    # row becomes one linear constraint over its scaled integer coefficients.
    order = np.argsort(milp.coef_row, kind="stable")
    bounds = np.searchsorted(milp.coef_row[order], np.arange(milp.num_rows + 1))
    cols_sorted = milp.coef_col[order].tolist()
    vals_sorted = coef[order].tolist()
    for r in range(milp.num_rows):
        lo, hi = row_lower[r], row_upper[r]
        span = slice(bounds[r], bounds[r + 1])
        expr = cp_model.LinearExpr.weighted_sum([variables[c] for c in cols_sorted[span]],
                                                vals_sorted[span])
        if lo is not None and hi is not None and lo == hi:
            model.add(expr == lo)
        else:
            if lo is not None:
                model.add(expr >= lo)
            if hi is not None:
                model.add(expr <= hi)
    model.minimize(variables[milp.z_col])

    # The warm plan is the hint; z's hint is the largest integer makespan row of that plan.
    values = plan_to_values(milp, problem, warm)
    if values is not None:
        ints = np.rint(values).astype(np.int64)
        ints[milp.z_col] = 0
        row_sum = np.bincount(milp.coef_row, weights=(coef * ints[milp.coef_col]).astype(float),
                              minlength=milp.num_rows)
        z_hint = 0
        for r in np.flatnonzero(milp.row_family == MAKESPAN):
            z_coef = -int(coef[(milp.coef_row == r) & (milp.coef_col == milp.z_col)][0])
            z_hint = max(z_hint, math.ceil((row_sum[r] - row_upper[r]) / z_coef))
        ints[milp.z_col] = min(z_hint, z_max)
        for col, var in enumerate(variables):
            model.add_hint(var, int(ints[col]))
    return model, variables


def solve_cpsat(problem: BalanceProblem, *, time_limit: float | None = None,
                num_workers: int | None = None, warm: Plan | None = None,
                relative_gap_limit: float = 0.0, max_lp_first: bool = True,
                verbose: bool = False) -> SolveResult:
    """Solve the balance MILP with CP-SAT.

    time_limit: seconds for the whole call (None: DEFAULT_TIME_LIMIT; math.inf: no limit).
    num_workers: CP-SAT search workers (default: CPU count, at most 8).
    warm: a feasible plan to hint (default: the best of static, greedy and lp,
        warmstart.warm_start).
    relative_gap_limit: stop once CP-SAT's own relative gap is below this.
    max_lp_first: with fewer than 8 workers, put CP-SAT's "max_lp" worker (full linearisation)
        first in the portfolio. CP-SAT presolve turns a[s, e, g] <= load[s, e] * y[g, e] into
        "y = 0 implies a = 0", which the default worker leaves out of its LP: its bound then
        loses every alpha term and stays far below the optimum on ep=8 decode steps.
    verbose: print CP-SAT's search log (log_search_progress; default: silent).
    Status "optimal" means CP-SAT proved the scaled model optimal; `gap` is recomputed from the
    exact objective and the bound, so it also shows what the scaling costs. A CP-SAT failure
    returns the warm start (module docstring).
    """
    from ortools.sat.python import cp_model

    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1)
    if not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"num_workers must be a positive int, got {num_workers!r}")
    setup = start_exact(problem, time_limit, warm, DEFAULT_TIME_LIMIT)
    start, time_limit, warm, warm_name = setup.start, setup.time_limit, setup.warm, setup.warm_name
    warm_obj, milp = setup.warm_objective, setup.milp
    quantum = time_quantum(problem, warm_obj)
    z_max = math.ceil(warm_obj / quantum) + 2

    def failed(why: str) -> SolveResult:
        return finish_result(problem, "cpsat", start, "feasible", None, warm, warm_name, None,
                             f"CP-SAT failed ({why})")

    try:
        model, variables = _cp_model(problem, milp, warm, quantum, z_max)
        solver = cp_model.CpSolver()
        solver.parameters.num_workers = num_workers
        solver.parameters.log_search_progress = bool(verbose)
        solver.parameters.relative_gap_limit = float(relative_gap_limit)
        if max_lp_first and num_workers < 8:
            solver.parameters.subsolvers.extend(_SMALL_PORTFOLIO)
        if math.isfinite(time_limit):
            remaining = time_limit - (time.perf_counter() - start)
            if remaining <= 0:
                return finish_result(problem, "cpsat", start, "timeout", None, warm, warm_name,
                                     None, "time limit reached before the search started")
            solver.parameters.max_time_in_seconds = remaining
        code = solver.solve(model)
        status_name = solver.status_name(code)
        if code == cp_model.MODEL_INVALID:
            return failed(f"status {status_name}: {model.validate()}")
        if code not in (cp_model.OPTIMAL, cp_model.FEASIBLE, cp_model.UNKNOWN):
            return failed(f"status {status_name}: {solver.solution_info()}")
        candidate = None
        if code in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            solution = np.array([solver.value(v) for v in variables], dtype=np.float64)
            candidate = plan_from_values(milp, problem, solution)
        bound = max(float(solver.best_objective_bound), 0.0) * quantum
    except Exception as err:  # any CP-SAT failure keeps the warm start
        return failed(f"{type(err).__name__}: {err}")
    if code == cp_model.OPTIMAL:
        outcome = "optimal"
        message = f"CP-SAT proved the scaled model optimal (quantum {quantum:.3e} s)"
    else:
        outcome = "timeout" if math.isfinite(time_limit) else "feasible"
        message = f"CP-SAT stopped with status {status_name}; best incumbent kept"
    return finish_result(problem, "cpsat", start, outcome, candidate, warm, warm_name, bound,
                         message)
