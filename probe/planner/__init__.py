"""Balance planning: problem, plan, cost model, feasibility checker and solvers (numpy only).

`solve(problem, method)` runs any backend ("static", "greedy", "greedy_ref",
"parallel_greedy", "parallel_greedy_ref", "lite", "lite_ref", "eplb" = DeepSeek's EPLB (alias
"deepseek_eplb"), "eplb_addcopies", "lp", "cpsat", "highs", "hierarchical"); backends
and Numba are imported on first use, so importing this package stays light and a missing
optional solver never breaks it.
docs/planner.md describes the problem, every solver and the greedy's rules (`GreedyRules`).
"""

from probe.planner.check import PlanMetrics, check_plan, evaluate_plan
from probe.planner.cost import CostModel, topology_graph
from probe.planner.eplb import even_split, solve_eplb_addcopies, to_eplb_maps
from probe.planner.greedy_rules import GreedyRules
from probe.planner.layers import (
    attention_time,
    plan_layers,
    plan_step,
    stack_eplb_maps,
)
from probe.planner.problem import BalanceProblem, Plan, SolveResult
from probe.planner.solve import METHODS, solve
from probe.planner.static import static_assignment, static_plan
from probe.planner.window import default_window

# Names served lazily (they import Numba, which costs ~0.5 s).
_LAZY = {
    "greedy_arrays": "probe.planner.greedy",
    "greedy_plan": "probe.planner.greedy",
    "greedy_ref": "probe.planner.greedy_ref",
    "LiteRules": "probe.planner.lite",
}

__all__ = [
    "METHODS",
    "BalanceProblem",
    "CostModel",
    "GreedyRules",
    "LiteRules",
    "Plan",
    "PlanMetrics",
    "SolveResult",
    "attention_time",
    "default_window",
    "check_plan",
    "evaluate_plan",
    "even_split",
    "greedy_arrays",
    "greedy_plan",
    "greedy_ref",
    "plan_layers",
    "plan_step",
    "solve",
    "solve_eplb_addcopies",
    "stack_eplb_maps",
    "static_assignment",
    "static_plan",
    "to_eplb_maps",
    "topology_graph",
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'probe.planner' has no attribute {name!r}")
