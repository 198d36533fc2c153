"""Advice from a recorded trace: the best static placement for vLLM / SGLang, and what PROBE adds.

Shape legend: N steps, L MoE layers, S source ranks (= G GPUs), E experts, k extra slots per
GPU (the replica budget), p per-step replica slots of PROBE.

`advise(trace, model, hardware, slots=(0, 1, 2, 3, 4))` plans, per MoE layer and per budget k,
a static placement of P = ceil(E / G) + k physical slots per GPU three ways:

    deepseek  DeepSeek's EPLB (`probe.planner.deepseek_eplb.eplb_layout`, global policy) on
              the trace's mean expert load;
    greedy    probe's planner (method "greedy") on the trace's mean load [S, E], rounded to
              whole tokens, from the packed home of `probe.engines` (one copy of every expert,
              heaviest first onto the lightest GPU) with P minus the home experts as extra
              slots, an unlimited window; free slots then filled as `probe.engines` does;
    milp      the same problem solved exactly (HiGHS, method "highs") on the mean load of a
              small sample of steps, with a time limit per layer; its proven gap is reported.
              Skipped (with a message) when highspy is not installed.

Every placement is then replayed on the recorded traffic as the engines run it: each
(source, expert)'s tokens split evenly over the expert's copies (`even_split`). Per step and
layer the modelled MoE time is the planner's cost model (probe.planner.cost, eq. 8: max over
GPUs of compute + 2 max(dispatch in, out), alpha paid per physical copy with tokens) for
`model` on `hardware`, with the trace's E and K; IR = largest GPU token load / mean. The
reference is static EP (sharded home, locality first, no replicas).

PROBE on top: the best static layout of each layer (per k) plus p per-step replica slots,
planned per step by the greedy on the TRUE load (a perfect predictor, so an upper bound on
PROBE's gain), its own token split executed, the replica transfers within the static compute
window (`default_window`); charged per layer with the planner's host time and, where the model
has a measured predictor cost, the predictor's (probe.sim.costs; both in series, the fair
simulator's host mode).
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, replace

import numpy as np

from probe.engines import _home, _maps
from probe.placement import sharded_home
from probe.planner.cost import CostModel
from probe.planner.deepseek_eplb import eplb_layout
from probe.planner.eplb import even_split
from probe.planner.problem import BalanceProblem
from probe.planner.solve import solve
from probe.planner.static import static_assignment
from probe.planner.window import default_window
from probe.specs import HardwareSpec, ModelSpec
from probe.traces.trace import RoutingTrace

__all__ = ["POLICIES", "AdviceResult", "advise", "moe_time", "phy2log_of"]

POLICIES = ("deepseek", "greedy", "milp")


def moe_time(assignment: np.ndarray, cost: CostModel,
             copies: np.ndarray | None = None) -> tuple[float, float]:
    """(seconds, IR) of one layer: assignment int [S, E, G] scored with the planner's cost
    model (eq. 8); IR = largest GPU token load / mean GPU token load (1.0 when idle).
    copies: int [G, E] physical copies per GPU (None: one wherever tokens run); a GPU pays
    alpha once per copy of an expert that has tokens (its tokens split over the copies)."""
    tokens = assignment.sum(axis=0).T  # [G, E]
    count = 1 if copies is None else np.maximum(copies, 1)
    compute = ((tokens > 0) * (cost.alpha * count + cost.beta * tokens)).sum(axis=1)  # [G]
    flow = assignment.sum(axis=1).astype(np.float64)  # [S, G]
    timed = flow * cost.token_time  # diagonal is 0
    comm = 2.0 * np.maximum(timed.sum(axis=0), timed.sum(axis=1))
    per_gpu = tokens.sum(axis=1)
    mean = per_gpu.mean()
    return float((compute + comm).max()), float(per_gpu.max() / mean) if mean > 0 else 1.0


def _fill(held: list[list[int]], weight: np.ndarray, per_gpu: int) -> np.ndarray:
    """copies int64 [G, E]: the experts each GPU holds, free slots filled one by one with a
    further copy of the expert of highest load per copy, on the GPU with a free slot whose
    even-split load is lowest and that does not hold the expert yet, when there is one
    (`probe.engines`' fill rule, which allows a second copy on the same GPU)."""
    num_experts = weight.shape[0]
    copies = np.zeros((len(held), num_experts), np.int64)
    for g, experts in enumerate(held):
        np.add.at(copies[g], experts, 1)
    count = copies.sum(axis=0)
    free = per_gpu - copies.sum(axis=1)
    while free.sum() > 0:
        e = int(np.argmax(weight / count))
        count[e] += 1
        share = weight / count
        loads = np.where(free > 0, copies @ share, np.inf)
        if np.any((free > 0) & (copies[:, e] == 0)):  # a second copy on one GPU helps nothing
            loads = np.where(copies[:, e] == 0, loads, np.inf)
        g = int(np.argmin(loads))
        copies[g, e] += 1
        free[g] -= 1
    return copies


def phy2log_of(copies: np.ndarray) -> np.ndarray:
    """phy2log int64 [R]: one layer's copies int [G, E] as slots, GPU by GPU, experts in
    increasing id within a GPU (R = copies.sum(), equal on every GPU)."""
    return np.concatenate([np.repeat(np.arange(copies.shape[1]), row) for row in copies])


@dataclass
class AdviceResult:
    """Everything `advise` measured (seconds; arrays over the evaluated steps).

    slots: the budgets k. layers: L. per_gpu[k]: physical slots per GPU.
    time[policy][k]: float64 [N, L] modelled MoE seconds per (step, layer); ir likewise.
    Policies: "static" (k = 0 only, stored under every k), "deepseek", "greedy", "milp"
    (absent when skipped), "best" (per layer the static policy with the lowest mean time)
    and "probe" (best + p per-step slots, overhead charged in `probe_overhead_s`).
    copies[policy][k]: int64 [L, G, E] physical copies per GPU. milp_gap[k]: [L] proven
    relative gaps (NaN where HiGHS gave no bound). best_policy[k]: [L] names.
    """

    slots: list[int]
    per_gpu: dict[int, int]
    time: dict[str, dict[int, np.ndarray]]
    ir: dict[str, dict[int, np.ndarray]]
    copies: dict[str, dict[int, np.ndarray]]
    milp_gap: dict[int, np.ndarray]
    milp_status: dict[int, list[str]]
    best_policy: dict[int, list[str]]
    probe_overhead_s: float
    notes: list[str]
    meta: dict

    def mean_time(self, policy: str, k: int) -> np.ndarray:
        """float64 [L]: mean seconds per layer over the steps (PROBE with its overhead)."""
        extra = self.probe_overhead_s if policy == "probe" else 0.0
        return self.time[policy][k].mean(axis=0) + extra

    def overall(self, policy: str, k: int) -> float:
        """Mean modelled MoE seconds per layer over steps and layers."""
        return float(self.mean_time(policy, k).mean())

    def placement(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(phy2log [L, R], log2phy [L, E, X], logcnt [L, E]) of the best static layout."""
        copies = self.copies["best"][k]
        phy2log = np.stack([phy2log_of(c) for c in copies])
        log2phy, logcnt = _maps(phy2log, copies.shape[2])
        return phy2log, log2phy, logcnt

    def to_json(self) -> dict:
        policies = [p for p in ("static", *POLICIES, "best", "probe") if p in self.time]
        out = {"meta": self.meta, "notes": self.notes, "slots": self.slots,
               "per_gpu": {str(k): v for k, v in self.per_gpu.items()},
               "probe_overhead_us": 1e6 * self.probe_overhead_s, "by_slots": {}}
        for k in self.slots:
            entry = {"best_policy": self.best_policy[k], "policies": {}}
            if k in self.milp_gap:
                entry["milp_gap"] = [None if math.isnan(g) else float(g)
                                     for g in self.milp_gap[k]]
                entry["milp_status"] = self.milp_status[k]
            for p in policies:
                entry["policies"][p] = {
                    "moe_us_per_layer": (1e6 * self.mean_time(p, k)).round(3).tolist(),
                    "ir_per_layer": self.ir[p][k].mean(axis=0).round(4).tolist(),
                    "moe_us": round(1e6 * self.overall(p, k), 3),
                    "ir": round(float(self.ir[p][k].mean()), 4),
                    "speedup_vs_static": round(self.overall("static", k)
                                               / self.overall(p, k), 4),
                }
            out["by_slots"][str(k)] = entry
        return out


def _routing_model(model: ModelSpec, trace: RoutingTrace) -> ModelSpec:
    """`model`'s shapes with the trace's E and K (a recorded small model costed as `model`)."""
    if (model.num_experts, model.top_k) == (trace.num_experts, trace.top_k):
        return model
    return replace(model, name=f"{model.name}-shape@E{trace.num_experts}K{trace.top_k}",
                   num_experts=trace.num_experts, top_k=trace.top_k)


def _planned_copies(load: np.ndarray, weight: np.ndarray, per_gpu: int, cost: CostModel,
                    method: str, time_limit: float | None):
    """(copies int64 [G, E], SolveResult) of the planner on one layer's load int [S, E]."""
    num_gpus = load.shape[0]
    home = _home(weight, num_gpus, "packed")
    slots = per_gpu - home.sum(axis=1)
    problem = BalanceProblem(load, home, slots, math.inf, cost)
    result = solve(problem, method, time_limit=time_limit)
    if result.plan is None:
        raise RuntimeError(f"planner method {method!r} returned no plan: {result.message}")
    held = [list(np.flatnonzero(home[g])) + list(np.flatnonzero(result.plan.replicas[g]))
            for g in range(num_gpus)]
    return _fill(held, weight, per_gpu), result


def advise(trace: RoutingTrace, model: ModelSpec, hardware: HardwareSpec, *,
           slots=(0, 1, 2, 3, 4), steps: int | None = None, milp_steps: int = 4,
           milp_time: float = 3.0, use_milp: bool = True, probe_slots: int = 1,
           progress=None) -> AdviceResult:
    """Static placements from `trace` at each budget in `slots`, scored on its traffic.

    trace: the recorded RoutingTrace (S = G GPUs). model, hardware: specs for the cost model
    (the model's widths with the trace's E and K; the hardware resized to S GPUs).
    slots: extra slots per GPU k (ints >= 0). steps: evaluate at most this many steps,
    evenly spaced (None: all). milp_steps: steps (evenly spaced) whose mean load the MILP
    plans. milp_time: HiGHS seconds per (layer, k). use_milp: False skips it.
    probe_slots: PROBE's per-step replica slots p per GPU. progress: callable(str) or None.
    """
    if not isinstance(trace, RoutingTrace):
        raise TypeError(f"trace must be a RoutingTrace, got {type(trace).__name__}")
    slots = sorted({int(k) for k in slots})
    if not slots or slots[0] < 0:
        raise ValueError(f"slots must be non-negative ints, got {slots}")
    for name, value, low in (("milp_steps", milp_steps, 1), ("probe_slots", probe_slots, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if not (isinstance(milp_time, (int, float)) and milp_time > 0):
        raise ValueError(f"milp_time must be a positive number of seconds, got {milp_time!r}")
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be an int >= 1 or None, got {steps!r}")
    num_gpus, num_experts = trace.num_ranks, trace.num_experts
    if num_experts < num_gpus:
        raise ValueError(f"the trace has {num_experts} experts for {num_gpus} GPUs: every "
                         "GPU needs an expert")
    say = progress or (lambda _msg: None)
    notes: list[str] = []
    routing = _routing_model(model, trace)
    if routing is not model:
        notes.append(f"costed as {model.name} with the trace's E = {num_experts}, "
                     f"K = {trace.top_k}")
    cost = CostModel.from_specs(routing, hardware.with_ranks(num_gpus))
    chosen = np.arange(trace.num_steps)
    if steps is not None and steps < trace.num_steps:
        chosen = np.unique(np.linspace(0, trace.num_steps - 1, steps).round().astype(int))
    load = trace.load_counts(chosen).astype(np.int64)  # [N, L, S, E]
    num_steps, num_layers = load.shape[:2]
    mean_load = np.rint(load.mean(axis=0)).astype(np.int64)  # [L, S, E]
    weight = load.sum(axis=2).mean(axis=0)  # [L, E]
    sample = np.unique(np.linspace(0, num_steps - 1, min(milp_steps, num_steps))
                       .round().astype(int))
    sample_load = np.rint(load[sample].mean(axis=0)).astype(np.int64)  # [L, S, E]
    if use_milp and importlib.util.find_spec("highspy") is None:
        use_milp = False
        notes.append("MILP skipped: highspy is not installed (pip install highspy)")
    elif not use_milp:
        notes.append("MILP skipped (--no-milp)")
    policies = ["deepseek", "greedy", *(["milp"] if use_milp else [])]
    base = math.ceil(num_experts / num_gpus)
    per_gpu = {k: base + k for k in slots}

    # Static EP reference: sharded home, locality first, no replicas.
    home = sharded_home(num_experts, num_gpus)
    static_t = np.zeros((num_steps, num_layers))
    static_ir = np.zeros((num_steps, num_layers))
    for n in range(num_steps):
        for layer in range(num_layers):
            static_t[n, layer], static_ir[n, layer] = moe_time(
                static_assignment(load[n, layer], home), cost)
    times = {p: {} for p in ("static", *policies, "best", "probe")}
    irs = {p: {} for p in times}
    copies_all = {p: {} for p in (*policies, "best")}
    gaps, statuses, best_policy = {}, {}, {}
    for k in slots:
        times["static"][k], irs["static"][k] = static_t, static_ir
        for p in policies:
            copies_all[p][k] = np.zeros((num_layers, num_gpus, num_experts), np.int64)
        gaps[k] = np.full(num_layers, np.nan)
        statuses[k] = [""] * num_layers
        for layer in range(num_layers):
            say(f"k={k} layer {layer}: planning")
            copies_all["deepseek"][k][layer] = eplb_layout(weight[layer], per_gpu[k], 1, 1,
                                                           num_gpus)
            copies_all["greedy"][k][layer], _ = _planned_copies(
                mean_load[layer], weight[layer], per_gpu[k], cost, "greedy", None)
            if use_milp:
                copies, result = _planned_copies(sample_load[layer], weight[layer],
                                                 per_gpu[k], cost, "highs", milp_time)
                copies_all["milp"][k][layer] = copies
                gaps[k][layer] = np.nan if result.gap is None else result.gap
                statuses[k][layer] = result.status
        for p in policies:
            t = np.zeros((num_steps, num_layers))
            r = np.zeros((num_steps, num_layers))
            for n in range(num_steps):
                for layer in range(num_layers):
                    copies = copies_all[p][k][layer]
                    t[n, layer], r[n, layer] = moe_time(even_split(load[n, layer], copies),
                                                        cost, copies)
            times[p][k], irs[p][k] = t, r
        # Best static policy per layer (lowest mean modelled time on the recorded traffic).
        mean = np.stack([times[p][k].mean(axis=0) for p in policies])  # [P, L]
        pick = np.argmin(mean, axis=0)
        best_policy[k] = [policies[i] for i in pick]
        cols = np.arange(num_layers)
        times["best"][k] = np.stack([times[p][k] for p in policies])[pick, :, cols].T
        irs["best"][k] = np.stack([irs[p][k] for p in policies])[pick, :, cols].T
        copies_all["best"][k] = np.stack([copies_all[policies[pick[layer]]][k][layer]
                                          for layer in range(num_layers)])
        # PROBE: best static layout + p per-step replicas planned on the true load.
        say(f"k={k}: PROBE per step")
        t = np.zeros((num_steps, num_layers))
        r = np.zeros((num_steps, num_layers))
        for layer in range(num_layers):
            held = copies_all["best"][k][layer] > 0
            for n in range(num_steps):
                true = load[n, layer]
                window = default_window(true, held, cost)
                result = solve(BalanceProblem(true, held, probe_slots, window, cost), "greedy",
                               check=False)
                if result.plan is None:
                    raise RuntimeError(f"greedy returned no plan: {result.message}")
                t[n, layer], r[n, layer] = moe_time(result.plan.assignment, cost)
        times["probe"][k], irs["probe"][k] = t, r
    overhead = _probe_overhead(model, load, trace.top_k, notes)
    meta = {"trace_steps": trace.num_steps, "evaluated_steps": int(num_steps),
            "layers": num_layers, "experts": num_experts, "top_k": trace.top_k,
            "gpus": num_gpus, "model": model.name, "cost_model": routing.name,
            "hardware": hardware.name, "milp_steps": [int(chosen[i]) for i in sample],
            "milp_time_s": milp_time, "probe_slots": probe_slots,
            "alpha_us": 1e6 * cost.alpha, "beta_ns": 1e9 * cost.beta}
    return AdviceResult(slots=slots, per_gpu=per_gpu, time=times, ir=irs, copies=copies_all,
                        milp_gap=gaps if use_milp else {}, milp_status=statuses,
                        best_policy=best_policy, probe_overhead_s=overhead, notes=notes,
                        meta=meta)


def _probe_overhead(model: ModelSpec, load: np.ndarray, top_k: int, notes: list) -> float:
    """Seconds per layer charged to PROBE: the planner's host time and, where the model has a
    measured predictor cost, the predictor's (probe.sim.costs)."""
    from probe.sim.costs import CONSTANTS, predictor_seconds

    planner = CONSTANTS["planner_kernel_s"]["value"] * CONSTANTS["planner_host_factor"]["value"]
    tokens_per_rank = float(load.sum(axis=3).mean()) / top_k
    try:
        predictor = predictor_seconds(model.name, tokens_per_rank)
    except ValueError:
        predictor = 0.0
        notes.append(f"no measured predictor cost for {model.name}: PROBE is charged the "
                     "planner's time only")
    return planner + predictor
