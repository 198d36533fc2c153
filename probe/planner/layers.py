"""Plan every MoE layer of one trace step, and the default hiding window.

Default window ("auto"): expert weights for a layer are copied while the ranks run the
layer's non-communication kernels (PAPER.md section 4.4: the copy starts during the expert
GEMM, pauses for the combine, and finishes during the next layer's attention). `auto_window`
therefore gives every rank the static plan's largest per-rank compute time under the cost
model (the GEMM phase lasts as long as its slowest rank) plus an attention estimate; by
default the attention estimate is `attention_time(model, hardware)`, the time to read the
attention projection weights (4 * D^2 weights) from HBM, a lower bound on attention. Pass
an explicit number of seconds to override.

>>> import numpy as np
>>> from probe.placement import sharded_home
>>> from probe.planner.cost import CostModel
>>> cost = CostModel.uniform(2, alpha=1.0, beta=0.5, token_time=0.0, transfer_time=1.0)
>>> load = np.array([[4, 0], [2, 2]])
>>> auto_window(load, sharded_home(2, 2), cost, attention_s=0.25).tolist()   # 1 + 0.5 * 6
[4.25, 4.25]
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from probe.placement import sharded_home
from probe.planner.check import rank_times
from probe.planner.cost import CostModel
from probe.planner.problem import BalanceProblem, Plan, SolveResult
from probe.planner.static import static_assignment

__all__ = ["attention_time", "auto_window", "plan_layers", "plan_step", "stack_eplb_maps"]


def attention_time(model, hardware) -> float:
    """Seconds to read one layer's attention projections (4 x hidden^2 weights) from HBM."""
    return 4.0 * model.hidden ** 2 * model.bytes_per_weight / hardware.hbm_bw


def auto_window(load: np.ndarray, home: np.ndarray, cost: CostModel, *,
                attention_s: float = 0.0) -> np.ndarray:
    """Default window float64 [G]: max per-rank static compute time + attention_s, every rank.

    load: int [S, E]; home: bool [G, E].
    """
    if not (np.isfinite(attention_s) and attention_s >= 0):
        raise ValueError(f"attention_s must be finite and >= 0, got {attention_s!r}")
    base = BalanceProblem(load, home, 0, 0.0, cost)  # validates the inputs
    compute, _ = rank_times(base, static_assignment(base.load, base.home))
    return np.full(cost.num_ranks, float(compute.max()) + attention_s)


def _window_for(window, load, home, cost, attention_s):
    if isinstance(window, str):
        if window != "auto":
            raise ValueError(f"window must be 'auto', seconds, or a [G] array, got {window!r}")
        return auto_window(load, home, cost, attention_s=attention_s)
    return window


def plan_layers(loads: np.ndarray, *, cost: CostModel, home: np.ndarray | None = None,
                slots=3, window="auto", method: str = "greedy", attention_s: float = 0.0,
                histories: Sequence[np.ndarray | None] | None = None,
                time_limit: float | None = None, **options) -> list[SolveResult]:
    """Solve one problem per layer.

    loads: int [L, S, E]; home: bool [G, E] (default: static sharding); slots: per rank (int
    or [G]); window: "auto" (see module docstring), seconds, or float [G]; method and options
    go to `solve`. histories: per-layer `history` for method "eplb" (None entries use the
    current load).
    """
    from probe.planner.solve import solve

    loads = np.asarray(loads)
    if loads.ndim != 3:
        raise ValueError(f"loads must be [L, S, E], got shape {loads.shape}")
    num_layers, num_sources, num_experts = loads.shape
    if home is None:
        home = sharded_home(num_experts, num_sources)
    results = []
    for layer in range(num_layers):
        load = loads[layer]
        win = _window_for(window, load, home, cost, attention_s)
        problem = BalanceProblem(load, home, slots, win, cost)
        extra = dict(options)
        if method == "eplb" and histories is not None and histories[layer] is not None:
            extra["history"] = histories[layer]
        results.append(solve(problem, method, time_limit=time_limit, **extra))
    return results


def plan_step(trace, step: int, *, cost: CostModel, home: np.ndarray | None = None, slots=3,
              window="auto", method: str = "greedy", attention_s: float = 0.0,
              eplb_history: int = 16, time_limit: float | None = None,
              **options) -> list[SolveResult]:
    """Plan every MoE layer of step `step` of a RoutingTrace; one SolveResult per layer.

    For method "eplb" the history is the previous `eplb_history` steps of each layer (the
    current step's load at step 0). Other arguments as in `plan_layers`.
    """
    num_steps = trace.num_steps
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise TypeError(f"step must be an int, got {type(step).__name__}")
    if not -num_steps <= step < num_steps:
        raise ValueError(f"step {step} out of range for a trace of {num_steps} steps")
    step = int(step) % num_steps
    if cost.num_ranks != trace.num_ranks:
        raise ValueError(f"cost model is for {cost.num_ranks} ranks, trace has "
                         f"{trace.num_ranks} source ranks")
    loads = trace.load_counts(steps=[step])[0]  # [L, S, E]
    histories = None
    if method == "eplb" and "history" not in options and step > 0:
        past = trace.load_counts(steps=range(max(0, step - eplb_history), step))  # [H, L, S, E]
        histories = [past[:, layer] for layer in range(loads.shape[0])]
    return plan_layers(loads, cost=cost, home=home, slots=slots, window=window, method=method,
                       attention_s=attention_s, histories=histories, time_limit=time_limit,
                       **options)


def stack_eplb_maps(problems: Sequence[BalanceProblem], plans: Sequence[Plan]):
    """Per-layer `to_eplb_maps`, stacked with a leading layer axis as DeepSeek EPLB returns them:
    phy2log [L, G*P], log2phy [L, E, X], logcnt [L, E]; log2phy is padded with -1 to the
    largest X. Every layer must have the same P (home experts + slots per rank)."""
    from probe.planner.eplb import to_eplb_maps

    maps = [to_eplb_maps(p, q) for p, q in zip(problems, plans, strict=True)]
    if not maps:
        raise ValueError("need at least one layer")
    width = maps[0][0].shape[0]
    if any(m[0].shape[0] != width for m in maps):
        raise ValueError("layers have different physical slot counts (home + slots per rank)")
    depth = max(m[1].shape[1] for m in maps)
    phy2log = np.full((len(maps), width), -1, np.int64)
    log2phy = np.full((len(maps), maps[0][1].shape[0], depth), -1, np.int64)
    for i, (p2l, l2p, _) in enumerate(maps):
        phy2log[i, :p2l.shape[0]] = p2l
        log2phy[i, :, :l2p.shape[1]] = l2p
    logcnt = np.stack([m[2] for m in maps])
    return phy2log, log2phy, logcnt
