"""Plan every MoE layer of one trace step.

Window "auto" is `probe.planner.window.default_window`: each rank hides transfers behind its
own static expert-compute time under the cost model plus an attention time (the paper's
section 4.4: the copy starts during the expert GEMM, pauses for the combine, and finishes
during the next layer's attention). `attention_time(model, hardware)` estimates the latter as
the time to read the attention projection weights (4 * D^2) from HBM, a lower bound; the CLI
passes it. Pass seconds (or a [G] array) to set the window explicitly.

>>> import numpy as np
>>> from probe.planner.cost import CostModel
>>> cost = CostModel.uniform(2, alpha=0.0, beta=1.0, token_time=0.1, transfer_time=1.0)
>>> results = plan_layers(np.array([[[0, 0], [8, 0]]]), cost=cost, slots=1, window=1.0)
>>> [(r.method, r.plan.num_replicas, round(r.objective, 2)) for r in results]
[('greedy', 1, 4.8)]
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from probe.planner.cost import CostModel
from probe.planner.problem import BalanceProblem, Plan, SolveResult

__all__ = ["attention_time", "plan_layers", "plan_step", "stack_eplb_maps"]


def attention_time(model, hardware) -> float:
    """Seconds to read one layer's attention projections (4 x hidden^2 weights) from HBM."""
    return 4.0 * model.hidden ** 2 * model.bytes_per_weight / hardware.hbm_bw


def plan_layers(loads: np.ndarray, *, cost: CostModel, home: np.ndarray | None = None,
                slots=3, window="auto", method: str = "greedy", attention_s: float = 0.0,
                histories: Sequence[np.ndarray | None] | None = None,
                time_limit: float | None = None, planned: list | None = None,
                **options) -> list[SolveResult]:
    """Solve one problem per layer.

    loads: int [L, S, E]; home: bool [G, E] (default: static sharding); slots: per rank (int
    or [G]); window: "auto" (see module docstring), seconds, or float [G]; method and options
    go to `solve` (e.g. rules=GreedyRules.paper() for the greedy methods). histories:
    per-layer `history` for methods "eplb" and "eplb_addcopies" (None entries use the current
    load). Method "eplb" (DeepSeek's EPLB, alias "deepseek_eplb") is planned end to end: each
    layer's problem is rebuilt on DeepSeek's layout of its home + slots (`eplb_problem`, from
    the history's mean load) and its tokens routed over that layout; the returned results
    refer to the rebuilt problems (home = the layout, no extra slots). planned: a list to
    which each layer's problem as solved is appended (the rebuilt one for "eplb").
    """
    from probe.planner.deepseek_eplb import eplb_problem
    from probe.planner.solve import solve

    loads = np.asarray(loads)
    if loads.ndim != 3:
        raise ValueError(f"loads must be [L, S, E], got shape {loads.shape}")
    results = []
    for layer in range(loads.shape[0]):
        problem = BalanceProblem.from_load(loads[layer], cost, slots, window, home,
                                           attention_time=attention_s)
        extra = dict(options)
        history = None if histories is None else histories[layer]
        if method in ("eplb", "deepseek_eplb") and "copies" not in extra:
            problem, extra["copies"] = eplb_problem(problem, history=history)
        elif method == "eplb_addcopies" and history is not None:
            extra["history"] = history
        results.append(solve(problem, method, time_limit=time_limit, **extra))
        if planned is not None:
            planned.append(problem)
    return results


def plan_step(trace, step: int, *, cost: CostModel, home: np.ndarray | None = None, slots=3,
              window="auto", method: str = "greedy", attention_s: float = 0.0,
              eplb_history: int = 16, time_limit: float | None = None,
              planned: list | None = None, **options) -> list[SolveResult]:
    """Plan every MoE layer of step `step` of a RoutingTrace; one SolveResult per layer.

    For methods "eplb" (DeepSeek's EPLB) and "eplb_addcopies" the history is the previous
    `eplb_history` steps of each layer (the current step's load at step 0). Other arguments
    as in `plan_layers`.
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
    if method in ("eplb", "deepseek_eplb", "eplb_addcopies") and "history" not in options \
            and step > 0:
        past = trace.load_counts(steps=range(max(0, step - eplb_history), step))  # [H, L, S, E]
        histories = [past[:, layer] for layer in range(loads.shape[0])]
    return plan_layers(loads, cost=cost, home=home, slots=slots, window=window, method=method,
                       attention_s=attention_s, histories=histories, time_limit=time_limit,
                       planned=planned, **options)


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
