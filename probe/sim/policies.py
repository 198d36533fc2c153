"""Helpers the simulator's policies share: applying a plan to another load, rebalance cost.

Shape legend: S source ranks (= G), E experts, G ranks.
"""

from __future__ import annotations

import numpy as np

from probe.planner.problem import Plan
from probe.planner.static import static_assignment
from probe.sim.rounding import split_by_fractions

__all__ = ["apply_plan", "rebalance_transfer"]


def apply_plan(plan: Plan, true_load: np.ndarray, home: np.ndarray) -> Plan:
    """The plan's replicas with the TRUE tokens assigned by the plan's per-(s, e) split.

    plan: a Plan made for a predicted load (its assignment int [S, E, G] sums to that load).
    true_load: int [S, E] the tokens that actually arrive. home: bool [G, E].
    For every (s, e) the plan gave tokens to, the true tokens are split over the same ranks in
    the same proportions (largest remainder rounding, so counts stay whole and conserved).
    Where the plan expected no token of (s, e) the true tokens take the static locality-first
    route over the HOME ranks (`static_assignment`), never a replica the plan did not size.
    Replicas and their sources are kept, so transfer cost and feasibility do not change.
    Returns a Plan whose assignment sums to true_load.

    >>> home = np.array([[1, 0], [0, 1]], bool)
    >>> plan = Plan(np.array([[0, 0], [1, 0]], bool), np.array([[-1, -1], [0, -1]]),
    ...             np.array([[[2, 2], [0, 0]], [[0, 0], [0, 1]]]))
    >>> apply_plan(plan, np.array([[5, 0], [1, 3]]), home).assignment.tolist()
    [[[3, 2], [0, 0]], [[1, 0], [0, 3]]]
    """
    true_load = np.asarray(true_load, dtype=np.int64)
    home = np.asarray(home, dtype=bool)
    planned = plan.assignment  # [S, E, G]
    predicted = planned.sum(axis=2)  # [S, E]
    known = predicted > 0
    spread = (planned > 0).sum(axis=2)  # [S, E] ranks the plan used per (s, e)
    assignment = np.zeros_like(planned)
    # (s, e) the plan sent to one rank: all true tokens go there.
    s1, e1 = np.nonzero(spread == 1)
    g1 = np.argmax(planned[s1, e1] > 0, axis=1)
    assignment[s1, e1, g1] = true_load[s1, e1]
    # (s, e) the plan split: same fractions, largest remainder (rows [M, G]).
    sm, em = np.nonzero(spread > 1)
    if sm.size:
        rows = planned[sm, em].astype(np.float64)  # [M, G]
        frac = rows / rows.sum(axis=1, keepdims=True)
        # never tops up a rank with no share
        assignment[sm, em] = split_by_fractions(true_load[sm, em][None, :], frac)[0]
    # (s, e) the plan did not expect: the static route over the home ranks.
    unseen = np.where(known, 0, true_load)
    if unseen.any():
        if np.all(home.sum(axis=0) == 1):
            su, eu = np.nonzero(unseen)
            owner = np.argmax(home, axis=0)  # [E]
            local = home[su, eu] if home.shape[0] == planned.shape[0] else False
            dest = np.where(local, su, owner[eu])
            assignment[su, eu, dest] += unseen[su, eu]
        else:
            assignment += static_assignment(unseen, home)
    assert np.array_equal(assignment.sum(axis=2), true_load), "apply_plan lost tokens"
    return Plan(plan.replicas, plan.sources, assignment)


def rebalance_transfer(old: np.ndarray, new: np.ndarray, sources: np.ndarray,
                       transfer_time: np.ndarray) -> tuple[float, int]:
    """Seconds (max over ranks of max(received, sent)) and count of replicas that must move.

    old, new: bool [G, E] replica placements before and after; sources: int [G, E] of `new`;
    transfer_time: float [G, G] seconds per expert copied h -> g.
    """
    moved = np.argwhere(new & ~old)
    num_ranks = new.shape[0]
    recv = np.zeros(num_ranks)
    send = np.zeros(num_ranks)
    for g, e in moved:
        h = int(sources[g, e])
        recv[g] += transfer_time[h, g]
        send[h] += transfer_time[h, g]
    seconds = float(max(recv.max(initial=0.0), send.max(initial=0.0)))
    return seconds, len(moved)
