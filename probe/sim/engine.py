"""Replay a RoutingTrace through the cost model, policy by policy, step by step, layer by layer.

Shape legend: N steps, L MoE layers of the trace, S source ranks (= G = ep), E experts, K top-k.

Layer time (seconds) of one policy at step i, layer l:
    attention  = max over ranks of AttentionModel.seconds(tokens of the rank, phase)
    moe        = evaluate_plan(true problem, plan).objective
               = max_g (expert compute(g) + 2 max(dispatch in(g), out(g)))  (probe.planner.check;
                 dispatch + expert compute + combine, on the TRUE load)
    exposed    = evaluate_plan(...).exposed_transfer: replica transfer beyond the rank's real
                 window, plus for EPLB the whole rebalance transfer at a rebalance step
    layer_time = attention + moe + exposed
Ranks synchronise at the dispatch All-to-All, so the slowest rank's attention is on the critical
path. The trace's L layers stand for the model's layers: step time = mean layer time x
model.num_layers (dense layers, embedding and LM head are not modelled). Decode throughput =
tokens of the step / step time; prefill latency of a chunk = its step time.

Hiding window of rank g (what PROBE's replica transfer may overlap): its attention time plus
its expert-compute time under the static plan of the layer (probe.planner.window), computed
from the load the planner sees (the prediction) for planning and from the true load for
scoring. Transfers that exceed the real window are charged as exposed time.

Policies:
    static          sharded EP (probe.placement.sharded_home), no replicas, locality first.
    eplb            DeepSeek's EPLB (probe.planner.deepseek_eplb, global policy): every rank's
                    E / ep home slots + `eplb_slots` redundant slots re-packed with
                    rebalance_experts from the mean load of the last `eplb_window` steps,
                    re-planned every `eplb_interval` steps (first at step eplb_interval: static
                    before); tokens split evenly over an expert's physical copies (DeepSeek's
                    routing, solve(..., "eplb", copies=...)). The layout persists between
                    re-plans; the copies a rank gains (from a rank that held the expert) are
                    charged in full as exposed time at the re-plan step (blocking shuffle).
    eplb_addcopies  the add-copies baseline (this simulator's "eplb" before "eplb" became
                    DeepSeek's algorithm; results/sim was written with it under the name
                    "eplb"): the home layout kept, `eplb_slots` replicas per layer per rank
                    added from the window's mean load (probe.planner.eplb.eplb_placement), tokens
                    locality-first, else split evenly over the expert's copies (what SGLang's
                    static dispatch does; kinder to the baseline). Replicas persist between
                    rebalances; new copies charged in full at the rebalance step.
    probe           the planner (`planner`, default the greedy with probe's rules) on the
                    PREDICTED load, `slots` replicas per rank, hiding-window constraint; the
                    plan is applied to the true load with `apply_plan` (same replicas, same
                    per-(s, e) split fractions, unseen (s, e) go home) and checked with
                    check_plan on the true load. Replicas are fetched every step (slots are
                    shared by layers).
    probe-unbounded as probe, planned with an unlimited window: shows what the window costs
                    (its transfer beyond the real window is exposed).
    oracle          the planner on the TRUE load (same planner, so "oracle" means perfect
                    prediction, not an optimal plan).
Re-splitting (ep != trace.num_ranks): the tokens of each step, in stored order, are dealt into
ep contiguous blocks (token j of T goes to rank j * ep // T): a rank keeps a contiguous run of
the original ranks' requests, and the per-rank batch is T / ep.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, is_dataclass

import numpy as np

from probe.placement import imbalance_ratio, sharded_home
from probe.planner.check import check_plan, evaluate_plan, rank_times
from probe.planner.cost import CostModel
from probe.planner.problem import BalanceProblem, Plan
from probe.planner.solve import solve
from probe.planner.static import static_plan
from probe.sim.attention import AttentionModel
from probe.planner.deepseek_eplb import eplb_layout
from probe.planner.eplb import eplb_placement
from probe.sim.policies import apply_plan, rebalance_transfer
from probe.sim.predict import describe_predictor, make_predictor, replay_predictor
from probe.specs import HardwareSpec, ModelSpec
from probe.traces.trace import RoutingTrace

__all__ = ["METRICS", "POLICIES", "SimResult", "resplit_load", "simulate"]

POLICIES = ("static", "eplb", "eplb_addcopies", "probe", "probe-unbounded", "oracle")
# Per (step, layer) metrics recorded for every policy.
METRICS = ("layer_time", "attention", "moe", "compute", "comm", "exposed", "imbalance",
           "compute_skew", "bytes_moved", "planner_time", "replicas")


def resplit_load(trace: RoutingTrace, ep: int, steps=None) -> np.ndarray:
    """int64 [N', L, ep, E] tokens per (step, layer, source rank, expert) over `ep` ranks.

    ep == trace.num_ranks: the trace's own source ranks. Otherwise every step's tokens, in
    stored order, go to ep contiguous blocks (token j of T to rank j * ep // T).
    """
    if ep == trace.num_ranks:
        return trace.load_counts(steps).astype(np.int64)
    idx = range(trace.num_steps) if steps is None else list(np.arange(trace.num_steps)[steps])
    num_layers, num_experts = trace.num_layers, trace.num_experts
    out = np.zeros((len(idx), num_layers, ep, num_experts), dtype=np.int64)
    layer_base = (np.arange(num_layers) * ep * num_experts)[None, :, None]  # [1, L, 1]
    for n, i in enumerate(idx):
        _, experts, _ = trace.step(int(i))  # [T, L, K]
        num_tok = experts.shape[0]
        rank = np.arange(num_tok, dtype=np.int64) * ep // max(num_tok, 1)  # [T]
        flat = layer_base + (rank * num_experts)[:, None, None] + experts.astype(np.int64)
        counts = np.bincount(flat.ravel(), minlength=num_layers * ep * num_experts)
        out[n] = counts.reshape(num_layers, ep, num_experts)
    return out


@dataclass
class SimResult:
    """What `simulate` returns: per-policy metrics per (step, layer), plus step facts.

    metrics[policy][name]: float64 [N, L] for name in METRICS (seconds, bytes, ratios).
    tokens: int64 [N] tokens per step (all ranks); tokens_per_rank: int64 [N, G];
    phase: uint8 [N]; step_tags: N strings. layer_scale: model layers / trace layers.
    meta: model, hardware, ep, knobs and provenance (JSON-serialisable).
    """

    policies: tuple[str, ...]
    metrics: dict[str, dict[str, np.ndarray]]
    tokens: np.ndarray
    tokens_per_rank: np.ndarray
    phase: np.ndarray
    step_tags: list[str]
    layer_scale: float
    meta: dict = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return len(self.tokens)

    def step_time(self, policy: str) -> np.ndarray:
        """float64 [N]: seconds of one forward step (mean layer time x model layers)."""
        return self.metrics[policy]["layer_time"].mean(axis=1) * self.meta["model_layers"]

    def throughput(self, policy: str) -> np.ndarray:
        """float64 [N]: tokens per second of each step (decode throughput for decode steps)."""
        return self.tokens / self.step_time(policy)

    def prefill_latency(self, policy: str, total_tokens: int) -> float:
        """Seconds to prefill `total_tokens` tokens: the step times of the first chunks (whole
        steps) that hold them. ValueError when the trace is too short."""
        need = np.searchsorted(np.cumsum(self.tokens), total_tokens) + 1
        if need > self.num_steps:
            raise ValueError(f"total_tokens {total_tokens} exceeds the trace's "
                             f"{int(self.tokens.sum())} tokens")
        return float(self.step_time(policy)[:need].sum())

    def summary(self, policy: str, steps: slice | None = None) -> dict:
        """Means over the chosen steps (all by default) of the headline numbers."""
        sel = slice(None) if steps is None else steps
        m = {k: v[sel] for k, v in self.metrics[policy].items()}
        step_time = self.step_time(policy)[sel]
        ir = m["imbalance"].ravel()
        return {
            "policy": policy,
            "layer_time_us": 1e6 * float(m["layer_time"].mean()),
            "attention_us": 1e6 * float(m["attention"].mean()),
            "moe_us": 1e6 * float(m["moe"].mean()),
            "step_time_ms": 1e3 * float(step_time.mean()),
            "throughput_tok_s": float((self.tokens[sel] / step_time).mean()),
            "ir_mean": float(ir.mean()),
            "ir_p95": float(np.percentile(ir, 95)),
            "compute_skew": float(m["compute_skew"].mean()),
            "bytes_moved_gb_per_step": float(m["bytes_moved"].sum(axis=1).mean()
                                             * self.layer_scale / 1e9),
            "exposed_us": 1e6 * float(m["exposed"].mean()),
            "planner_ms": 1e3 * float(m["planner_time"].mean()),
            "replicas": float(m["replicas"].mean()),
        }


def simulate(
    trace: RoutingTrace,
    *,
    model: ModelSpec,
    hardware: HardwareSpec,
    policies=("static", "eplb", "probe", "oracle"),
    ep: int | None = None,
    slots: int = 3,
    eplb_slots: int = 2,
    eplb_interval: int = 100,
    eplb_window: int = 100,
    predictor="topk:0.9",
    attention: AttentionModel | None = None,
    planner: str = "greedy",
    planner_options: dict | None = None,
    steps=None,
    seed: int = 0,
    progress: bool = True,
) -> SimResult:
    """Simulate `trace` on `model` x `hardware` at `ep` ranks under each policy.

    trace: the RoutingTrace (its num_experts must equal model.num_experts).
    policies: names from POLICIES. ep: EP ranks (default trace.num_ranks; tokens re-split when
    different, see the module docstring); the hardware is resized with with_ranks(ep).
    slots: PROBE replica slots per rank per layer; eplb_*: the EPLB baseline's knobs.
    predictor: a prediction-error model spec (probe.sim.predict; None = "topk:0.9") or
    predicted loads int [N, L, S, E] aligned with the simulated steps.
    attention: an AttentionModel (default: no attention time, AttentionModel.zero()).
    planner: solve() method for probe and oracle; planner_options: its keyword options (e.g.
    rules=GreedyRules(k_max=0) for the greedy; default: probe's rules).
    steps: indices or a slice of the trace's steps (default all). progress: a rich progress bar.
    """
    if not isinstance(trace, RoutingTrace):
        raise TypeError(f"trace must be a RoutingTrace, got {type(trace).__name__}")
    if not isinstance(model, ModelSpec):
        raise TypeError(f"model must be a ModelSpec, got {type(model).__name__}")
    if not isinstance(hardware, HardwareSpec):
        raise TypeError(f"hardware must be a HardwareSpec, got {type(hardware).__name__}")
    if trace.num_experts != model.num_experts:
        raise ValueError(f"trace has {trace.num_experts} experts, model {model.name} has "
                         f"{model.num_experts}")
    policies = tuple(policies)
    unknown = [p for p in policies if p not in POLICIES]
    if unknown or not policies:
        raise ValueError(f"policies must be a non-empty subset of {POLICIES}, got {policies}")
    ep = trace.num_ranks if ep is None else ep
    if isinstance(ep, bool) or not isinstance(ep, (int, np.integer)) or ep < 1:
        raise ValueError(f"ep must be a positive int, got {ep!r}")
    ep = int(ep)
    if ep > model.num_experts:
        raise ValueError(f"ep ({ep}) exceeds the model's {model.num_experts} experts: static "
                         "sharding needs at least one expert per rank")
    for name, value, low in (("slots", slots, 0), ("eplb_slots", eplb_slots, 0),
                             ("eplb_interval", eplb_interval, 1), ("eplb_window", eplb_window, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    attention = AttentionModel.zero() if attention is None else attention
    if not isinstance(attention, AttentionModel):
        raise TypeError(f"attention must be an AttentionModel, got {type(attention).__name__}")
    if hardware.num_ranks != ep:
        hardware = hardware.with_ranks(ep)
    cost = CostModel.from_specs(model, hardware)
    home = sharded_home(model.num_experts, ep)  # [G, E]

    step_idx = np.arange(trace.num_steps)[slice(None) if steps is None else steps]
    step_idx = np.atleast_1d(step_idx)
    load = resplit_load(trace, ep, step_idx)  # [N, L, S, E]
    num_steps, num_layers = load.shape[:2]
    if isinstance(predictor, np.ndarray):
        predict = replay_predictor(predictor, load.shape)
    else:
        predictor = "topk:0.9" if predictor is None else predictor
        predict = make_predictor(predictor, seed=seed)
    options = dict(planner_options or {})
    tokens_per_rank = load[:, 0].sum(axis=2) // trace.top_k  # [N, G]
    phase = trace.phase[step_idx].astype(np.uint8)

    metrics = {p: {m: np.zeros((num_steps, num_layers)) for m in METRICS} for p in policies}
    eplb_replicas = np.zeros((num_layers, ep, model.num_experts), dtype=bool)
    eplb_sources = np.full((num_layers, ep, model.num_experts), -1, dtype=np.int64)
    eplb_copies = np.repeat(home[None].astype(np.int64), num_layers, axis=0)  # [L, G, E]
    per_gpu = min(model.num_experts, model.num_experts // ep + eplb_slots)
    inf_window = np.full(ep, np.inf)

    if {"probe", "probe-unbounded", "oracle"} & set(policies) and num_steps:
        # Warm-up solve (JIT compilation, imports) so that planner times are steady-state.
        solve(BalanceProblem.from_load(load[0, 0], cost, slots, inf_window, home), planner,
              **options)
    bar = _progress(progress, num_steps, f"simulate {model.name} ep={ep}")
    try:
        for n in range(num_steps):
            rebalance = n > 0 and n % eplb_interval == 0
            for layer in range(num_layers):
                true = load[n, layer]  # [S, E]
                attn_rank = attention.seconds_per_rank(tokens_per_rank[n], int(phase[n]))  # [G]
                attn = float(attn_rank.max())
                # Scored with the real window: static expert compute + attention, per rank.
                scored = BalanceProblem.from_load(true, cost, slots, "auto", home,
                                                  attention_time=attn_rank)
                previous = load[n - 1, layer] if n > 0 else None
                pred = None
                for policy in policies:
                    extra, planner_time = 0.0, 0.0
                    if policy == "static":
                        plan = static_plan(scored)
                    elif policy == "oracle":
                        result = solve(scored, planner, **options)
                        plan, planner_time = _plan_of(result, policy), result.wall_time
                    elif policy in ("probe", "probe-unbounded"):
                        if pred is None:
                            pred = np.asarray(predict(true, previous, n, layer), np.int64)
                        planned = BalanceProblem.from_load(
                            pred, cost, slots, "auto" if policy == "probe" else inf_window,
                            home, attention_time=attn_rank)
                        result = solve(planned, planner, **options)
                        plan = apply_plan(_plan_of(result, policy), true, home)
                        planner_time = result.wall_time
                        violations = check_plan(planned.with_load(true), plan)
                        if violations:
                            raise RuntimeError(f"{policy}: plan applied to the true load is "
                                               f"infeasible: {violations[:3]}")
                    elif policy == "eplb":  # DeepSeek's EPLB
                        if rebalance:
                            t0 = time.perf_counter()
                            hist = load[max(0, n - eplb_window):n, layer].sum(axis=1)  # [H, E]
                            new = eplb_layout(hist.mean(axis=0), per_gpu, 1, 1, ep)
                            planner_time = time.perf_counter() - t0
                            old = eplb_copies[layer] > 0
                            holder = np.argmax(old, axis=0)  # [E] a rank that had the expert
                            src = np.where(new > 0, holder[None, :], -1)
                            extra, moved = rebalance_transfer(old, new > 0, src,
                                                              cost.transfer_time)
                            metrics[policy]["bytes_moved"][n, layer] = moved * cost.expert_bytes
                            eplb_copies[layer] = new
                        copies = eplb_copies[layer]
                        scored_eplb = BalanceProblem(true, copies > 0, 0, inf_window, cost)
                        plan = solve(scored_eplb, "eplb", copies=copies).plan
                        mets = evaluate_plan(scored_eplb, plan)
                        _record(metrics[policy], n, layer, attn, mets, extra, planner_time,
                                scored_eplb, plan, count_bytes=False)
                        continue
                    else:  # eplb_addcopies
                        if rebalance:
                            t0 = time.perf_counter()
                            hist = load[max(0, n - eplb_window):n, layer].sum(axis=1)  # [H, E]
                            new, src = eplb_placement(
                                hist.mean(axis=0),
                                BalanceProblem.from_load(true, cost, eplb_slots, inf_window,
                                                         home))
                            planner_time = time.perf_counter() - t0
                            extra, moved = rebalance_transfer(eplb_replicas[layer], new, src,
                                                              cost.transfer_time)
                            metrics[policy]["bytes_moved"][n, layer] = moved * cost.expert_bytes
                            eplb_replicas[layer], eplb_sources[layer] = new, src
                        plan = _eplb_plan(true, home, eplb_replicas[layer], eplb_sources[layer])
                        scored_eplb = BalanceProblem.from_load(true, cost, eplb_slots,
                                                               inf_window, home)
                        mets = evaluate_plan(scored_eplb, plan)
                        _record(metrics[policy], n, layer, attn, mets, extra, planner_time,
                                scored_eplb, plan, count_bytes=False)
                        continue
                    mets = evaluate_plan(scored, plan)
                    _record(metrics[policy], n, layer, attn, mets, extra, planner_time, scored,
                            plan, count_bytes=True)
            if bar is not None:
                bar[0].advance(bar[1])
    finally:
        if bar is not None:
            bar[0].stop()

    meta = {
        "model": model.name, "hardware": hardware.name, "hardware_source": hardware.source,
        "ep": ep, "slots": slots, "eplb_slots": eplb_slots, "eplb_interval": eplb_interval,
        "eplb_window": eplb_window, "predictor": describe_predictor(predictor),
        "attention": attention.source, "planner": planner,
        "planner_options": {name: asdict(value) if is_dataclass(value) else value
                            for name, value in options.items()},
        "trace_layers": num_layers, "model_layers": model.num_layers,
        "trace_ranks": trace.num_ranks, "trace_meta": trace.meta, "seed": seed,
        "alpha": cost.alpha, "beta": cost.beta,
    }
    return SimResult(policies=policies, metrics=metrics, tokens=tokens_per_rank.sum(axis=1),
                     tokens_per_rank=tokens_per_rank, phase=phase,
                     step_tags=[trace.step_tags[i] for i in step_idx] if trace.step_tags
                     else [""] * num_steps,
                     layer_scale=model.num_layers / num_layers, meta=meta)


def _plan_of(result, policy: str) -> Plan:
    if result.plan is None:
        raise RuntimeError(f"{policy}: planner {result.method!r} returned no plan "
                           f"({result.status}: {result.message})")
    return result.plan


def _eplb_plan(true: np.ndarray, home: np.ndarray, replicas: np.ndarray,
               sources: np.ndarray) -> Plan:
    from probe.planner.static import static_assignment

    return Plan(replicas, sources, static_assignment(true, home | replicas))


def _record(store, n, layer, attn, mets, extra, planner_time, problem, plan, *,
            count_bytes: bool) -> None:
    compute, _ = rank_times(problem, plan.assignment)
    exposed = mets.exposed_transfer + extra
    store["layer_time"][n, layer] = attn + mets.objective + exposed
    store["attention"][n, layer] = attn
    store["moe"][n, layer] = mets.objective
    store["compute"][n, layer] = mets.max_compute
    store["comm"][n, layer] = mets.max_comm
    store["exposed"][n, layer] = exposed
    store["imbalance"][n, layer] = mets.imbalance
    store["compute_skew"][n, layer] = float(imbalance_ratio(compute))
    if count_bytes:
        store["bytes_moved"][n, layer] = mets.bytes_moved
    store["planner_time"][n, layer] = planner_time
    store["replicas"][n, layer] = mets.num_replicas
    assert math.isfinite(store["layer_time"][n, layer])


def _progress(enabled: bool, total: int, label: str):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    bar = Progress("[progress.description]{task.description}", BarColumn(),
                   MofNCompleteColumn(), TimeElapsedColumn(), transient=True)
    task = bar.add_task(label, total=total)
    bar.start()
    return bar, task
