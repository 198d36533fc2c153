"""History baselines and plan quality: what a prediction buys over planning from the past.

Shape legend: N steps, S source ranks, E experts, G ranks (S = G).

History baselines (what EPLB-style balancers see): the load of step n is guessed from the loads
of earlier steps, as each source rank's share of tokens per expert, scaled to the pairs that rank
really sends at step n (the runtime knows its own token count before routing):

    share[s, e] = mean over steps n-m..n-1 of load[., s, e], normalised over e
    pred[n, s, e] = share[s, e] * sum_e load[n, s, e]        (largest-remainder rounded)

m = 1 is "last step"; m > 1 a moving average. A source rank with no history tokens takes the
all-rank share; step 0 (no history at all) takes a uniform share.

Plan quality: a plan made from a predicted load is replayed on the true load (each (s, e)'s true
tokens split in the plan's proportions; a pair the plan did not foresee stays local if rank s
holds the expert, else goes to its home) and scored with `probe.planner.evaluate_plan`, next to
the plan made from the true load itself and the static placement with no replicas.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

__all__ = [
    "PlanQuality",
    "history_prediction",
    "plan_quality",
    "replay_plan",
    "round_to_totals",
]


def round_to_totals(values: np.ndarray, totals: np.ndarray) -> np.ndarray:
    """Round non-negative values [..., E] to int64 whose last-axis sums equal totals [...].

    Largest-remainder rounding after scaling each row to its total (rows of zeros spread their
    total uniformly).
    """
    values = np.asarray(values, dtype=np.float64)
    totals = np.asarray(totals, dtype=np.int64)
    if np.any(values < 0):
        raise ValueError("values must be >= 0")
    width = values.shape[-1]
    row_sum = values.sum(axis=-1, keepdims=True)
    share = np.where(row_sum > 0, values / np.where(row_sum > 0, row_sum, 1.0), 1.0 / width)
    raw = share * totals[..., None]
    base = np.floor(raw).astype(np.int64)
    missing = totals - base.sum(axis=-1)  # [...] in [0, width)
    order = np.argsort(-(raw - base), axis=-1, kind="stable")
    position = np.empty_like(order)
    np.put_along_axis(position, order, np.arange(width).reshape((1,) * (order.ndim - 1) + (-1,)),
                      axis=-1)
    return base + (position < missing[..., None])


def history_prediction(loads: np.ndarray, window: int = 1) -> np.ndarray:
    """Predicted loads int64 [N, S, E] of every step from the `window` steps before it.

    loads: int [N, S, E] true token counts of consecutive steps of one layer.
    """
    loads = np.asarray(loads)
    if loads.ndim != 3:
        raise ValueError(f"loads must be [N, S, E], got shape {loads.shape}")
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int >= 1, got {window!r}")
    num_steps = loads.shape[0]
    totals = loads.sum(axis=2)  # [N, S]
    csum = np.concatenate([np.zeros((1, *loads.shape[1:])), np.cumsum(loads, axis=0)])
    out = np.zeros(loads.shape, dtype=np.int64)
    for n in range(num_steps):
        lo = max(0, n - window)
        hist = csum[n] - csum[lo]  # [S, E]
        if n == 0 or hist.sum() == 0:
            hist = np.ones(loads.shape[1:])
        empty = hist.sum(axis=1) == 0
        hist[empty] = hist.sum(axis=0)
        out[n] = round_to_totals(hist, totals[n])
    return out


def replay_plan(plan, true_load: np.ndarray, home: np.ndarray):
    """The plan's replicas with the true tokens split in the plan's proportions: a Plan.

    plan: probe.planner Plan made from a predicted load; true_load: int [S, E]; home: bool [G, E].
    """
    from probe.planner import Plan

    true_load = np.asarray(true_load, dtype=np.int64)
    assignment = np.asarray(plan.assignment, dtype=np.float64)  # [S, E, G]
    num_ranks, num_experts = true_load.shape
    planned = assignment.sum(axis=2)  # [S, E]
    holders = np.asarray(home, bool) | plan.replicas  # [G, E]
    fallback = np.zeros_like(assignment)
    s_idx, e_idx = np.meshgrid(np.arange(num_ranks), np.arange(num_experts), indexing="ij")
    local = holders[s_idx, e_idx]  # [S, E]: rank s holds e
    home_rank = np.argmax(home, axis=0)  # [E]
    target = np.where(local, s_idx, home_rank[None, :])
    fallback[s_idx, e_idx, target] = 1.0
    weights = np.where(planned[..., None] > 0, assignment, fallback)
    new = round_to_totals(weights, true_load)
    return Plan(plan.replicas, plan.sources, new)


@dataclass(frozen=True)
class PlanQuality:
    """IR (eq. 1) and objective (eq. 8, seconds) of three plans, all scored on the true load."""

    ir_static: float
    ir_truth: float
    ir_pred: float
    objective_static: float
    objective_truth: float
    objective_pred: float

    def as_dict(self) -> dict:
        return asdict(self)


def plan_quality(pred_load: np.ndarray, true_load: np.ndarray, *, home: np.ndarray, slots,
                 window, cost, method: str = "greedy") -> PlanQuality:
    """Plan from pred_load [S, E] and from true_load [S, E], both scored on the true load."""
    from probe.planner import BalanceProblem, Plan, evaluate_plan, solve

    truth = BalanceProblem.from_load(np.asarray(true_load, np.int64), cost, slots, window, home)
    predicted = truth.with_load(np.asarray(pred_load, np.int64))
    res_truth = solve(truth, method=method)
    res_pred = solve(predicted, method=method)
    if res_truth.plan is None or res_pred.plan is None:
        raise RuntimeError(f"planner returned no plan: {res_truth.message or res_pred.message}")
    m_truth = evaluate_plan(truth, res_truth.plan)
    m_pred = evaluate_plan(truth, replay_plan(res_pred.plan, true_load, home))
    num_ranks, num_experts = truth.load.shape
    static_assign = np.zeros((num_ranks, num_experts, num_ranks), dtype=np.int64)
    home_rank = np.argmax(home, axis=0)
    static_assign[:, np.arange(num_experts), home_rank] = truth.load
    static = Plan(np.zeros_like(home, bool), -np.ones(home.shape, np.int64), static_assign)
    m_static = evaluate_plan(truth, static)
    return PlanQuality(m_static.imbalance, m_truth.imbalance, m_pred.imbalance,
                       m_static.objective, m_truth.objective, m_pred.objective)
