"""Result assembly shared by the solver backends: `finish_result` judges a solver's plan against
a fallback plan and fills a SolveResult; `largest_remainder` rounds fractional token splits."""

from __future__ import annotations

import time

import numpy as np

from probe.planner.check import check_plan, evaluate_plan
from probe.planner.problem import BalanceProblem, Plan, SolveResult

__all__ = ["finish_result", "largest_remainder"]


def largest_remainder(target: np.ndarray, shares: np.ndarray) -> np.ndarray:
    """Round shares float [K, G] to ints whose rows sum to target int [K], largest remainder first.

    Negative shares are treated as 0; a row whose shares are all 0 puts its tokens on the
    column with the largest share index (callers avoid that case).

    >>> largest_remainder(np.array([3]), np.array([[2.2, 0.4, 0.4]])).tolist()
    [[2, 1, 0]]
    """
    shares = np.maximum(np.asarray(shares, dtype=np.float64), 0.0)
    target = np.asarray(target, dtype=np.int64)
    sums = shares.sum(axis=1, keepdims=True)
    scaled = np.where(sums > 0, shares * (target[:, None] / np.where(sums > 0, sums, 1.0)),
                      0.0)
    base = np.floor(scaled + 1e-9).astype(np.int64)
    base = np.minimum(base, target[:, None])
    short = target - base.sum(axis=1)
    remainder = scaled - base
    order = np.argsort(-remainder, axis=1, kind="stable")  # [K, G]
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(shares.shape[1])[None, :].repeat(len(order), 0),
                      axis=1)
    extra = rank < short[:, None]
    # Rows that still fall short (all shares 0, or short larger than G) take the rest on the
    # column with the largest share.
    result = base + extra
    rest = target - result.sum(axis=1)
    if np.any(rest != 0):
        idx = np.flatnonzero(rest)
        result[idx, np.argmax(shares[idx], axis=1)] += rest[idx]
    return result


def finish_result(problem: BalanceProblem, method: str, start: float, status: str,
                  candidate: Plan | None, fallback: Plan, fallback_name: str,
                  bound: float | None, message: str) -> SolveResult:
    """Judge `candidate` with check_plan, keep the better of it and `fallback`, fill a result.

    start: perf_counter() at the start of the solve. status: the solver's own outcome; an
    "optimal" whose plan the checker rejects becomes "feasible". The result's `fallback` field
    is `fallback_name` when the fallback plan is the one returned (no candidate, a rejected one,
    or a worse one), else None. bound (seconds) is clipped to the returned objective;
    gap = (objective - bound) / objective.
    """
    plan, notes = fallback, [message] if message else []
    objective = evaluate_plan(problem, fallback).objective
    kept: str | None = fallback_name
    if candidate is not None:
        violations = check_plan(problem, candidate)
        if violations:
            notes.append(f"solver plan rejected ({violations[0]}); kept the {fallback_name} plan")
            if status == "optimal":
                status = "feasible"
        else:
            cand_obj = evaluate_plan(problem, candidate).objective
            if cand_obj <= objective:
                plan, objective, kept = candidate, cand_obj, None
            else:
                notes.append(f"the {fallback_name} plan is better after exact evaluation; kept")
    else:
        notes.append(f"no solver plan; kept the {fallback_name} plan")
    gap = None
    if bound is not None:
        if bound > objective * (1 + 1e-6):
            notes.append(f"solver bound {bound:.6e} exceeded the objective; clipped")
        bound = min(float(bound), objective)
        gap = (objective - bound) / objective if objective > 0 else 0.0
    return SolveResult(status, plan, objective, bound, gap, time.perf_counter() - start,
                       "; ".join(notes), method, fallback=kept)
