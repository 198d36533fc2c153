"""The one independent judge of plans: feasibility (`check_plan`) and metrics (`evaluate_plan`).

Written straight from the problem statement with plain numpy and no solver code, so that every
backend is checked against the same definition.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from probe.placement import imbalance_ratio
from probe.planner.problem import BalanceProblem, Plan
from probe.planner.tolerance import fits_window

__all__ = ["PlanMetrics", "check_plan", "evaluate_plan", "transfer_times"]

def transfer_times(problem: BalanceProblem, plan: Plan) -> tuple[np.ndarray, np.ndarray]:
    """Seconds each rank spends receiving and sending replica weights: two float64 [G]."""
    num_ranks = problem.num_ranks
    recv = np.zeros(num_ranks)
    send = np.zeros(num_ranks)
    for g, e in np.argwhere(plan.replicas):
        h = int(plan.sources[g, e])
        if 0 <= h < num_ranks:
            t = problem.cost.transfer_time[h, g]
            recv[g] += t
            send[h] += t
    return recv, send


def check_plan(problem: BalanceProblem, plan: Plan) -> list[str]:
    """Every way `plan` breaks `problem`'s constraints, as sentences. Empty means feasible.

    >>> import numpy as np
    >>> from probe.placement import sharded_home
    >>> from probe.planner.cost import CostModel
    >>> cost = CostModel.uniform(2, alpha=0.0, beta=1.0, token_time=0.0, transfer_time=1.0)
    >>> prob = BalanceProblem(np.array([[3, 0], [1, 0]]), sharded_home(2, 2), 1, 1.0, cost)
    >>> bad = Plan(np.zeros((2, 2), bool), -np.ones((2, 2), int), np.zeros((2, 2, 2), int))
    >>> for line in check_plan(prob, bad):
    ...     print(line)
    conservation: source 0, expert 0 assigns 0 of 3 tokens
    conservation: source 1, expert 0 assigns 0 of 1 tokens
    """
    num_ranks, num_experts = problem.num_ranks, problem.num_experts
    if plan.replicas.shape != (num_ranks, num_experts):
        return [f"shape: replicas {plan.replicas.shape} != problem {(num_ranks, num_experts)}"]
    problems: list[str] = []
    home = problem.home

    on_home = np.argwhere(plan.replicas & home)
    problems += [f"replica: rank {g} already holds expert {e} at home" for g, e in on_home]
    per_rank = plan.replicas.sum(axis=1)
    problems += [f"slots: rank {g} has {per_rank[g]} replicas, {problem.slots[g]} slots"
                 for g in np.flatnonzero(per_rank > problem.slots)]

    for g, e in np.argwhere(plan.replicas):
        h = int(plan.sources[g, e])
        if not (0 <= h < num_ranks) or h == g or not home[h, e]:
            problems.append(f"source: replica of expert {e} on rank {g} copied from rank {h}, "
                            "which does not hold it at home")
    stray = np.argwhere(~plan.replicas & (plan.sources != -1))
    problems += [f"source: rank {g}, expert {e} names a source but has no replica"
                 for g, e in stray]

    assignment = plan.assignment
    if np.any(assignment < 0):
        s, e, g = np.argwhere(assignment < 0)[0]
        problems.append(f"assignment: negative count at source {s}, expert {e}, rank {g}")
    assigned = assignment.sum(axis=2)
    for s, e in np.argwhere(assigned != problem.load):
        problems.append(f"conservation: source {s}, expert {e} assigns {assigned[s, e]} of "
                        f"{problem.load[s, e]} tokens")
    holds = home | plan.replicas  # [G, E]
    misplaced = (assignment > 0) & ~holds.T[None, :, :]
    for s, e, g in np.argwhere(misplaced):
        problems.append(f"placement: {assignment[s, e, g]} tokens of expert {e} from source "
                        f"{s} sent to rank {g}, which does not hold it")

    recv, send = transfer_times(problem, plan)
    problems += [f"window: rank {g} receives for {recv[g]:.3e} s > window {problem.window[g]:.3e}"
                 for g in np.flatnonzero(~fits_window(recv, problem.window))]
    problems += [f"window: rank {g} sends for {send[g]:.3e} s > window {problem.window[g]:.3e}"
                 for g in np.flatnonzero(~fits_window(send, problem.window))]
    return problems


@dataclass(frozen=True)
class PlanMetrics:
    """What a plan costs, under the problem's cost model (times in seconds).

    objective: eq. 8, max over ranks of compute + communication time.
    imbalance: IR (eq. 1) of tokens processed per rank.
    compute_skew: max / mean of per-rank compute time.
    max_traffic_bytes: largest per-rank dispatch volume, max(in, out) (combine is the mirror).
    bytes_moved: replica weights transferred.
    exposed_transfer: max over ranks of transfer time beyond its window.
    """

    objective: float
    imbalance: float
    compute_skew: float
    max_compute: float
    max_comm: float
    max_traffic_bytes: float
    bytes_moved: float
    exposed_transfer: float
    num_replicas: int

    def as_dict(self) -> dict:
        return asdict(self)


def rank_times(problem: BalanceProblem, assignment: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-rank compute and communication seconds of an assignment int [S, E, G]: two [G]."""
    cost = problem.cost
    tokens = assignment.sum(axis=0).T.astype(np.float64)  # [G, E]
    compute = cost.compute_time(tokens)
    flow = assignment.sum(axis=1).astype(np.float64)  # [S, G] tokens sent s -> g
    time_in = (flow * cost.token_time).sum(axis=0)
    time_out = (flow * cost.token_time).sum(axis=1)
    return compute, 2.0 * np.maximum(time_in, time_out)


def evaluate_plan(problem: BalanceProblem, plan: Plan) -> PlanMetrics:
    """Objective and balance metrics of `plan` on `problem` (feasible or not)."""
    compute, comm = rank_times(problem, plan.assignment)
    flow = plan.assignment.sum(axis=1).astype(np.float64)  # [S, G]
    np.fill_diagonal(flow, 0.0)
    traffic = np.maximum(flow.sum(axis=0), flow.sum(axis=1)) * problem.cost.token_bytes
    recv, send = transfer_times(problem, plan)
    exposed = np.maximum(np.maximum(recv, send) - problem.window, 0.0)
    per_rank_tokens = plan.assignment.sum(axis=(0, 1))
    return PlanMetrics(
        objective=float((compute + comm).max()),
        imbalance=float(imbalance_ratio(per_rank_tokens)),
        compute_skew=float(imbalance_ratio(compute)),
        max_compute=float(compute.max()),
        max_comm=float(comm.max()),
        max_traffic_bytes=float(traffic.max()),
        bytes_moved=float(plan.num_replicas * problem.cost.expert_bytes),
        exposed_transfer=float(exposed.max()),
        num_replicas=plan.num_replicas,
    )
