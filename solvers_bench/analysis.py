"""Why greedy misses: split its gap into replica choice and token placement.

For every instance whose gap is known (certified or proven), rebuild the problem, run greedy
(k_max 16) and re-assign the tokens exactly for greedy's own replica set (the assignment LP of
the `lp` heuristic, integer-rounded; `reassign_greedy`). What the re-assignment recovers is lost
by greedy's token placement rules (a move only drains the single slowest rank into a strictly
faster one; tokens whose source holds the expert stay local); what is left is lost by its
replica choice (which expert, where, copied from whom).
"""

from __future__ import annotations

import numpy as np

from probe.planner.check import check_plan, evaluate_plan
from probe.planner.greedy_rules import GreedyRules
from probe.planner.problem import BalanceProblem, Plan
from probe.planner.solve import solve
from solvers_bench.instances import InstanceSpec, build_problem

__all__ = ["reassign_greedy", "split_greedy_gaps"]


def reassign_greedy(problem: BalanceProblem, plan: Plan) -> Plan:
    """`plan`'s replicas with the tokens re-assigned by the exact assignment LP (never worse).

    Uses `probe.planner.lp._assignment`, the lp heuristic's last step, as a measuring tool.
    """
    from probe.planner.highs_base import time_unit
    from probe.planner.lp import _assignment
    from probe.planner.static import static_plan

    if not plan.replicas.any():
        return plan
    base = evaluate_plan(problem, plan).objective
    other = _assignment(problem, static_plan(problem), plan.replicas, plan.sources,
                        time_unit(base), None)
    if other is None or check_plan(problem, other):
        return plan
    return other if evaluate_plan(problem, other).objective < base else plan


def split_greedy_gaps(records: list[dict], *, max_gap_unknown: float = 0.005) -> dict:
    """Per instance with a known gap: greedy gap, gap after exact re-assignment, lp gap.

    records: results.jsonl records. An instance counts when its optimum is proven or its best
    plan is within `max_gap_unknown` of the best bound. Gaps are to the best bound.
    """
    rows = []
    for rec in records:
        if rec.get("fatal") or rec.get("best_bound") is None:
            continue
        if not (rec["proven"] or (rec.get("certified_gap") is not None
                                  and rec["certified_gap"] <= max_gap_unknown)):
            continue
        spec = InstanceSpec.from_dict(rec)
        problem, _ = build_problem(spec)
        greedy = solve(problem, "greedy", rules=GreedyRules(k_max=16)).plan
        obj = evaluate_plan(problem, greedy).objective
        fixed = evaluate_plan(problem, reassign_greedy(problem, greedy)).objective
        bound = rec["best_bound"]
        lp = rec["methods"].get("lp", {}).get("objective")
        rows.append({
            "id": rec["id"], "family": rec["family"], "window": rec["window"],
            "gap_greedy": max(0.0, (obj - bound) / obj),
            "gap_reassigned": max(0.0, (fixed - bound) / fixed),
            "gap_lp": None if lp is None else max(0.0, (lp - bound) / lp),
        })
    out = {"n": len(rows), "rows": rows}
    if rows:
        for key in ("gap_greedy", "gap_reassigned", "gap_lp"):
            vals = np.array([r[key] for r in rows if r[key] is not None])
            out[key] = {"median": float(np.median(vals)), "p95": float(np.quantile(vals, 0.95)),
                        "share_gt_3pct": float(np.mean(vals > 0.03))}
        misses = [r for r in rows if r["gap_greedy"] > 0.03]
        out["misses"] = len(misses)
        out["misses_closed_by_reassign"] = sum(r["gap_reassigned"] <= 0.03 for r in misses)
    return out
