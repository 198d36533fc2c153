"""Replay a runtime run's routing through the simulator, under the policy the run used.

Shape legend: N steps, L MoE layers, S source ranks (= G), G ranks, E experts.

The runtime (`python -m probe.runtime --step-log`) records every step's TRUE counts int
[N, L, S, E]; `replay_policy` places them as the simulator models the run's policy, with the
run's own inputs where the runtime had them:

    policy         layout / replicas                               split of the true counts
    static         sharded home                                    all home (locality first)
    eplb           EPLB layout, b = extra slots                    even over copies, each
                                                                   source rank on its own
    eplb-lp        the same layout                                 LP (HiGHS) on all counts
    probe          home + per-step replicas, planned at layer l-1  the plan's proportions on
                   on the history prediction (layer 0: static)     the true counts (apply_plan)
    probe-on-eplb  EPLB-b layout + p per-step replicas (planned    water-filling over layout +
                   as probe, on the layout; those at home dropped) replicas, on all counts

Mirrored from the runtime: the EPLB layout starts from uniform weights and is re-planned when
the runner's step (`step_offset` + n) is a positive multiple of `replan_interval`, from the mean
group-wide counts of the last `replan_window` logged steps (the runtime's window also holds
warm-up steps, which are not logged); the history predictor (a source rank's true counts at the
same layer one step earlier; none at the first logged step); the planner's CostModel (the
datasheet preset the run named) and method; the planning window of every rank (its measured
dispatch + expert time of layer l-1 plus attention before layer l, one step earlier, from the
log's phase times; `default_window_s` at the first step). Assumed, as the simulator does: every
planned replica arrives (transfer beyond the window is charged as exposed time, not skipped).

`score` prices each step and layer with a `probe.sim.costs.FairCosts` (the calibrated simulator:
measured expert table, all-to-all latency + bytes / bandwidth).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from probe.placement import sharded_home
from probe.planner.check import transfer_times
from probe.planner.cost import CostModel
from probe.planner.deepseek_eplb import eplb_copies
from probe.planner.eplb import even_split
from probe.planner.problem import BalanceProblem
from probe.planner.static import static_assignment
from probe.sim.policies import apply_plan
from probe.specs import ModelSpec, hardware_preset

__all__ = ["RUNTIME_POLICIES", "Placement", "ReplayConfig", "planning_windows", "replay_policy",
           "runtime_cost_model", "score"]

RUNTIME_POLICIES = ("static", "eplb", "eplb-lp", "probe", "probe-on-eplb")


@dataclass(frozen=True)
class ReplayConfig:
    """The run's balancing settings (its summary JSON: policy, resident_slots, per_step_slots,
    args.replan_interval, args.replan_window, args.method, step_offset)."""

    policy: str
    resident_slots: int = 0
    per_step_slots: int = 0
    replan_interval: int = 50
    replan_window: int = 50
    method: str = "greedy"
    step_offset: int = 0
    default_window_s: float = 1e-3

    def __post_init__(self) -> None:
        if self.policy not in RUNTIME_POLICIES:
            raise ValueError(f"policy must be one of {RUNTIME_POLICIES}, got {self.policy!r}")
        for name, low in (("resident_slots", 0), ("per_step_slots", 0), ("replan_interval", 1),
                          ("replan_window", 1), ("step_offset", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"ReplayConfig.{name} must be an int >= {low}, got {value!r}")


@dataclass
class Placement:
    """Where one step's layer ran in the replay: assignment int64 [S, E, G], copies int64
    [G, E], replicas added this step, seconds of the split's solve (the replay's own wall
    time, the run's median),
    and exposed transfer seconds (replicas beyond the planning window)."""

    assignment: np.ndarray
    copies: np.ndarray
    replicas: int = 0
    solve_s: float = 0.0
    transfer_s: float = 0.0
    planned: bool = False


def runtime_cost_model(config: dict, *, bytes_per_value: int, hardware: str,
                       num_ranks: int) -> CostModel:
    """The planner's CostModel the runtime built (`probe.runtime.pipeline.cost_model_for`)
    from its summary's config dict, dtype size and --hardware preset."""
    num_layers = len(config.get("moe_layers") or ()) or int(config["num_layers"])
    spec = ModelSpec(name=str(config.get("model_type", "runtime")), num_layers=num_layers,
                     num_experts=int(config["num_experts"]), top_k=int(config["top_k"]),
                     hidden=int(config["hidden_size"]),
                     expert_ffn=int(config["moe_intermediate_size"]),
                     bytes_per_weight=bytes_per_value, bytes_per_activation=bytes_per_value)
    hw = hardware_preset(hardware)
    return CostModel.from_specs(spec, hw if hw.num_ranks == num_ranks
                                else hw.with_ranks(num_ranks))


def planning_windows(phase_s: np.ndarray, default_s: float) -> np.ndarray:
    """float64 [N, L, G]: the window each rank offered for layer l's replicas at step n, as
    the runtime measures it (`EPRunner._window`): layer l-1's time from its dispatch to its
    combine (dispatch + experts phases) + the attention before layer l, one step earlier
    (phase_s float [N, L, G, 5] in probe.sim.measured.PHASES order); `default_s` at step 0
    and layer 0."""
    num_steps, num_layers, num_ranks, _ = phase_s.shape
    out = np.full((num_steps, num_layers, num_ranks), float(default_s))
    if num_steps > 1 and num_layers > 1:
        out[1:, 1:] = (phase_s[:-1, :-1, :, 2] + phase_s[:-1, :-1, :, 3]
                       + phase_s[:-1, 1:, :, 0])
    return out


def _solve(problem: BalanceProblem, method: str):
    from probe.planner.solve import solve
    from probe.planner.static import static_plan

    result = solve(problem, method, check=False)
    return result.plan if result.plan is not None else static_plan(problem)


def replay_policy(counts: np.ndarray, config: ReplayConfig, cost: CostModel, *,
                  windows: np.ndarray | None = None) -> list[list[Placement]]:
    """Placements [N][L] of `counts` int [N, L, S, E] under `config` (module doc). cost: the
    planner's CostModel (`runtime_cost_model`); windows: float [N, L, G] planning windows
    (`planning_windows`; None: `config.default_window_s` everywhere)."""
    counts = np.asarray(counts)
    if counts.ndim != 4 or counts.shape[2] == 0:
        raise ValueError(f"counts must be int [N, L, S, E], got shape {counts.shape}")
    num_steps, num_layers, num_ranks, num_experts = counts.shape
    if cost.num_ranks != num_ranks:
        raise ValueError(f"cost model is for {cost.num_ranks} ranks, counts have {num_ranks}")
    if windows is None:
        windows = np.full((num_steps, num_layers, num_ranks), config.default_window_s)
    windows = np.asarray(windows, dtype=np.float64)
    if windows.shape != (num_steps, num_layers, num_ranks):
        raise ValueError(f"windows must be [N, L, G] = {(num_steps, num_layers, num_ranks)}, "
                         f"got {windows.shape}")
    policy = config.policy
    home = sharded_home(num_experts, num_ranks)  # bool [G, E]
    home_int = home.astype(np.int64)
    resident = config.resident_slots if policy in ("eplb", "eplb-lp", "probe-on-eplb") else 0
    layout = (eplb_copies(np.ones((num_layers, num_experts)), resident, num_ranks)
              if policy in ("eplb", "eplb-lp", "probe-on-eplb") else None)  # [L, G, E]
    out: list[list[Placement]] = []
    for n in range(num_steps):
        step = config.step_offset + n
        if layout is not None and step > 0 and step % config.replan_interval == 0 and n > 0:
            recent = counts[max(0, n - config.replan_window):n].sum(axis=2)  # [w, L, E]
            layout = eplb_copies(recent.mean(axis=0).astype(np.float64), resident, num_ranks)
        row = []
        for layer in range(num_layers):
            true = counts[n, layer].astype(np.int64)  # [S, E]
            row.append(_place(policy, true, counts, n, layer, layout, home, home_int, cost,
                              config, windows[n, layer]))
        out.append(row)
    # Every split is charged the median of its wall times over the run: the first call may
    # compile (Numba) or import (HiGHS), and a shared host makes single timings noisy.
    timed = [p.solve_s for row in out for p in row if p.solve_s > 0]
    if timed:
        median = float(np.median(timed))
        for row in out:
            for p in row:
                if p.solve_s > 0:
                    p.solve_s = median
    return out


def _place(policy, true, counts, n, layer, layout, home, home_int, cost, config,
           window) -> Placement:
    if policy == "static":
        return Placement(static_assignment(true, home), home_int)
    if policy in ("eplb", "eplb-lp"):
        copies = layout[layer]
        t0 = time.perf_counter()
        if policy == "eplb":  # each source rank splits its own counts (no collective)
            assign = np.zeros((*true.shape, copies.shape[0]), dtype=np.int64)
            for s in range(true.shape[0]):
                own = np.zeros_like(true)
                own[s] = true[s]
                assign[s] = even_split(own, copies)[s]
        else:
            from probe.planner.assign import assign_tokens

            assign = assign_tokens(true, copies, cost, method="lp")
        return Placement(assign, copies, solve_s=time.perf_counter() - t0)
    # probe and probe-on-eplb: replicas for layer l were planned at layer l-1 (none at layer 0)
    base = home if policy == "probe" else layout[layer] > 0
    replicas = np.zeros_like(home)
    plan = problem = None
    if layer > 0 and config.per_step_slots > 0:
        pred = counts[n - 1, layer] if n > 0 else np.zeros_like(true)
        problem = BalanceProblem.from_load(np.asarray(pred, dtype=np.int64), cost,
                                           config.per_step_slots, window, base)
        plan = _solve(problem, config.method)
        replicas = plan.replicas
    if policy == "probe":
        if plan is None:
            return Placement(static_assignment(true, home), home_int)
        applied = apply_plan(plan, true, home)
        recv, send = transfer_times(problem.with_load(true), applied)
        exposed = float(np.maximum(np.maximum(recv, send) - window, 0.0).max())
        return Placement(applied.assignment, home_int + applied.replicas,
                         int(applied.replicas.sum()), transfer_s=exposed, planned=True)
    from probe.planner.assign import assign_tokens

    # a replica planned where the expert is at home moves nothing and is present at dispatch
    copies = layout[layer] + replicas.astype(np.int64)
    t0 = time.perf_counter()
    assign = assign_tokens(true, copies, cost, method="waterfill", home=layout[layer] > 0)
    solve_s = time.perf_counter() - t0
    exposed = 0.0
    if plan is not None:
        moving = replicas & ~home
        if moving.any():
            kept = type(plan)(moving, np.where(moving, plan.sources, -1), assign)
            recv, send = transfer_times(problem.with_load(true), kept)
            exposed = float(np.maximum(np.maximum(recv, send) - window, 0.0).max())
    return Placement(assign, copies, int((replicas & ~home).sum()), solve_s, exposed,
                     planned=plan is not None)


def score(placements: list[list[Placement]], costs, *, planner_s: float) -> dict:
    """Simulated seconds float64 [N, L] of every placement under `costs` (a FairCosts):
    moe (dispatch + max-rank compute + combine), compute, comm (dispatch + combine),
    imbalance (IR of pairs per rank), overhead (the replay's split solve and exposed transfer
    at the layer, plus the host planner's `planner_s` for layer l's plan charged at layer l-1,
    where the runtime makes it), replicas."""
    num_steps, num_layers = len(placements), len(placements[0])
    out = {k: np.zeros((num_steps, num_layers)) for k in
           ("moe", "compute", "comm", "imbalance", "overhead", "replicas")}
    for n, row in enumerate(placements):
        for layer, p in enumerate(row):
            s = costs.moe_seconds(p.assignment, p.copies)
            out["moe"][n, layer] = s["moe"]
            out["compute"][n, layer] = s["compute"]
            out["comm"][n, layer] = s["dispatch"] + s["combine"]
            out["imbalance"][n, layer] = s["imbalance"]
            out["overhead"][n, layer] += p.solve_s + p.transfer_s
            if p.planned:
                out["overhead"][n, layer - 1] += planner_s
            out["replicas"][n, layer] = p.replicas
    return out
