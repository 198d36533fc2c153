"""Balance planning: problem, plan, cost model, feasibility checker and solvers (numpy only)."""

from probe.planner.check import PlanMetrics, check_plan, evaluate_plan
from probe.planner.cost import CostModel, topology_graph
from probe.planner.problem import BalanceProblem, Plan, SolveResult

__all__ = [
    "BalanceProblem",
    "CostModel",
    "Plan",
    "PlanMetrics",
    "SolveResult",
    "check_plan",
    "evaluate_plan",
    "topology_graph",
]
