"""The continuous lookahead pipeline: at MoE layer l, predict l+1, all-gather, plan, prefetch.

`EPRunner` turns a loaded `MoETransformer` (this rank's slice of experts) into an
expert-parallel one: it replaces every MoE block's forward with `_EPBlock`, whose
`run_layer` composes two parts (the paper's section 4.4):

    decide  (`probe.runtime.balancer.Balancer`):   predict l+1, gather, plan l+1 -> LayerPlan
    execute (`probe.runtime.executor.Executor`):   transfer, dispatch, experts, combine

Per MoE layer l and step:

    router(h_l) -> true top-k ids and gate weights            (the plan never changes these)
    executor.arrived(l): which of l's replicas are complete on this rank (non-blocking)
    balancer.decide: predict l+1 from h_l, ONE all_gather of every rank's RankReport
        (arrived bits of l, predicted load of l+1, window of l+1), plan l+1 -> LayerPlan
    executor.prefetch(plan of l+1): a transfer whose pieces wait for the allowed phases
    executor.run(l): dispatch following plan_l and the arrived replicas (late ones skipped,
        their pairs go home) | l+1 phase 1 during expert compute | pause, combine | resume:
        l+1 phase 2 during l+1's attention
    executor.finish_layer(l): no wait; replicas still in flight are counted late

Layer 0 has no earlier layer in the step: it always runs static (everything home), which is
also the state before any plan exists.

Policies (`PipelineOptions.policy`, `probe.runtime.policies`, docs/runtime.md "Policies"):
"probe" (the default) is the flow above; "static" is sharded EP with no collective beyond the
dispatch; "eplb" and "eplb-lp" keep a DeepSeek EPLB layout resident (`ResidentExperts`,
re-planned at step boundaries) and split the true counts at dispatch (even split, or the LP
over the counts of one extra all_gather per layer); "probe-on-eplb" plans per-step replicas as
above on the EPLB layout instead of the sharded home, and splits the true counts (gathered on
the balancer's all_gather) by water-filling over the layout + the replicas that arrived.

Window: the seconds rank g can hide layer l+1's transfer = expert compute of layer l plus the
non-MoE work before layer l+1's MoE (attention, norms), both measured in the previous step
(CUDA events on GPU, perf_counter on CPU); `default_window_s` before the first measurement.
The gathered windows are identical on every rank, so every rank solves the same problem.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.profiler import record_function

from probe.placement import imbalance_ratio, sharded_home
from probe.planner import BalanceProblem, CostModel, Plan
from probe.runtime.balancer import (Balancer, LayerPlan, LoadPredictor, all_gather_fields,
                                    solve_plan)
from probe.runtime.device_plan import DEVICE_SPLITS, DeviceSplit, PendingPlan
from probe.runtime.dispatch import CapacityOverflow, DispatchOptions, capacity_for, to_device
from probe.runtime.dist import DistContext
from probe.runtime.ep import EPMoELayer, LayerExperts, PhaseHooks
from probe.runtime.executor import Executor
from probe.runtime.model import packed_format
from probe.runtime.policies import POLICIES, SPLITS, ResidentExperts, dispatch_quota
from probe.runtime.quant import join_packed, split_packed
from probe.runtime.transfer import SlotPool

__all__ = ["PHASES", "PLAN_ON", "EPRunner", "LayerPlan", "LoadPredictor", "PipelineOptions",
           "StepStats", "cost_model_for", "solve_plan"]

# The phases of one MoE layer on a rank, in the order of `StepStats.layer_phase_s`'s last axis
# and of `EPRunner.breakdown()` (attention: the non-MoE work before the layer's MoE block).
PHASES = ("attention", "route_plan", "dispatch", "experts", "combine")
# Where PROBE's per-layer plans are made (`PipelineOptions.plan_on`).
PLAN_ON = ("host", "device")


def cost_model_for(cfg, world_size: int, dtype: torch.dtype,
                   hardware: str = "h200x8", *, weight_format: str | None = None) -> CostModel:
    """Cost model of a runtime `MoEConfig` on `world_size` ranks of `hardware`; the expert
    weights are `dtype`, or kept in `weight_format` ("mxfp4", "fp8_block": a replica then moves
    that format's bytes, `probe.specs.weight_bytes`)."""
    from probe.specs import ModelSpec, hardware_preset

    bytes_per = torch.tensor([], dtype=dtype).element_size()
    spec = ModelSpec(name=cfg.model_type, num_layers=cfg.num_moe_layers,
                     num_experts=cfg.num_experts, top_k=cfg.top_k, hidden=cfg.hidden_size,
                     expert_ffn=cfg.moe_intermediate_size, bytes_per_weight=bytes_per,
                     bytes_per_activation=bytes_per, weight_format=weight_format)
    hw = hardware_preset(hardware)
    if world_size != hw.num_ranks:
        hw = hw.with_ranks(world_size)
    return CostModel.from_specs(spec, hw)


@dataclass
class PipelineOptions:
    """How the runner balances.

    balance: plan and prefetch replicas (False: static sharded EP, no extra collectives).
    num_slots: R, replica slots per rank per buffer (two buffers).
    predictor: "history" or a LoadPredictor (e.g. a PredictorSet, or the frozen router prior
        `probe.predictor.router_prior(model)`).
    method: planner method for `probe.planner.solve` ("greedy"; "greedy_ref" avoids the JIT).
    planner: optional function BalanceProblem -> Plan replacing `method` (tests).
    plan_override: optional function (moe layer, step) -> Plan | None forcing a plan (tests).
    hold_back: optional function (moe layer, step) -> [(g, e)] replicas made late on purpose:
        their phase-2 pieces are posted only when the step ends (tests).
    default_window_s: window before the first measurement.
    wait_for_replicas: block until a layer's replicas are in instead of falling back (the
        waiting counts as exposed transfer time); default False: late replicas are skipped.
    num_pieces: pieces per weight tensor (split-phase granularity).
    max_in_flight: pieces one transfer has posted and not completed, at most (bounds what
        can still be moving when a combine starts).
    hardware: HardwareSpec preset for the cost model.
    policy: one of `probe.runtime.policies.POLICIES` ("probe" by default; balance=False
        makes any policy static).
    resident_slots: b, redundant EPLB slots per rank (policies with a resident layout).
    replan_interval: steps between EPLB re-plans. replan_window: steps of load a re-plan
        averages.
    record_steps: also gather, at every step's end, every rank's true counts per MoE layer and
        its per-layer phase seconds into `StepStats.routing_counts` / `layer_phase_s` (what a
        replay through the simulator needs, `python -m probe.runtime --step-log`); off by
        default: it adds G L (E + 5) values to the step's all_gather.
    dispatch: `probe.runtime.dispatch.DispatchOptions`: "exact" (default) or "fixed"
        (fixed-capacity all-to-alls, no host sync in the EP layer). With "fixed", the
        policies "static" and "probe" with the history predictor also take no host sync
        per MoE layer: PROBE's plans of the step are made at `begin_step` (`no_sync_layers`).
    plan_on: "host" (default: the host planner, as above) or "device" (policy "probe" only):
        predict, gather and plan each next layer with device tensors (on CUDA the GPU kernel
        of `method`, "greedy" or "lite" (or their twins' names), on a side stream; on CPU its
        Numba twin on the same tensors) and split each layer's pairs as `device_split` says
        (`probe.runtime.device_plan`). With "fixed" dispatch that is no host read per MoE
        layer for either predictor.
    device_split: the device path's dispatch-time split (`device_plan.DEVICE_SPLITS`):
        "plan" (default: the plan's own split, this rank's row made with the plan on the side
        stream and scaled by the dispatch to the true counts, as the host path runs PROBE's
        plans: nothing solved at dispatch) or "waterfill" (the TRUE counts over the copies
        present, a solve between the router and the dispatch).
    """

    balance: bool = True
    num_slots: int = 3
    predictor: str | LoadPredictor = "history"
    method: str = "greedy"
    planner: Callable[[BalanceProblem], Plan] | None = None
    plan_override: Callable[[int, int], Plan | None] | None = None
    hold_back: Callable[[int, int], list[tuple[int, int]]] | None = None
    default_window_s: float = 1e-3
    wait_for_replicas: bool = False
    num_pieces: int = 4
    max_in_flight: int = 8
    hardware: str = "h200x8"
    policy: str = "probe"
    resident_slots: int = 0
    replan_interval: int = 50
    replan_window: int = 50
    record_steps: bool = False
    dispatch: DispatchOptions = DispatchOptions()
    plan_on: str = "host"
    device_split: str = "plan"


@dataclass
class StepStats:
    """One step of the whole EP group (identical on every rank after `end_step`).

    layer_ir: float [L], IR of pairs processed per rank (eq. 1) at every MoE layer.
    pairs_per_rank: int [L, G].
    replicas_planned / replicas_arrived / replicas_used: int [L], summed over ranks; a planned
        replica that was not complete when its layer dispatched is late (planned - arrived)
        and skipped; an arrived one is used when at least one pair ran on it.
    fallback_pairs: int [L], pairs sent home because their replica had not arrived.
    bytes_prefetched_per_rank: float [G], weight bytes of the replicas that ARRIVED in time on
        each rank (late replicas are not counted).
    bytes_prefetched: their sum over ranks (the group's total, counted once).
    exposed_transfer_s: max over ranks of the time the main thread waited for transfers
        (only `wait_for_replicas` waits; 0 otherwise).
    layer_exposed_s: float [L], the same per layer (max over ranks).
    planned_exposed_s: max over layers of the plan's modelled exposed transfer (eq. 6).
    plan_seconds: planner wall time summed over layers (max over ranks).
    layer_plan_s / layer_predict_s: float [L], planner and predictor seconds spent on each
        layer's plan (max over ranks; spent at the layer before).
    predict_seconds: predictor wall time summed over layers (max over ranks).
    layer_split_s: float [L], seconds of the dispatch-time split on the true counts (even,
        LP or water-filling; max over ranks; 0 where the policy has none).
    replicas_resident: int [L], resident redundant copies of the EPLB layout (b G).
    replan_seconds: seconds of the EPLB re-plan's weight moves at this step's start (max
        over ranks; 0 when there was none). replan_bytes: bytes they moved (all ranks).
    routing_counts: int64 [L, S, E] or None, every source rank's TRUE token-expert pairs per
        expert at every MoE layer (only with `PipelineOptions.record_steps`).
    layer_phase_s: float64 [L, G, 5] or None, every rank's seconds of each `PHASES` entry at
        every MoE layer of this step (only with `PipelineOptions.record_steps`).
    """

    layer_ir: np.ndarray
    pairs_per_rank: np.ndarray
    replicas_planned: np.ndarray
    replicas_arrived: np.ndarray
    fallback_pairs: np.ndarray
    bytes_prefetched_per_rank: np.ndarray
    bytes_prefetched: float
    exposed_transfer_s: float
    planned_exposed_s: float
    plan_seconds: float
    replicas_used: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    layer_exposed_s: np.ndarray = field(default_factory=lambda: np.zeros(0))
    layer_plan_s: np.ndarray = field(default_factory=lambda: np.zeros(0))
    layer_predict_s: np.ndarray = field(default_factory=lambda: np.zeros(0))
    predict_seconds: float = 0.0
    layer_split_s: np.ndarray = field(default_factory=lambda: np.zeros(0))
    replicas_resident: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    replan_seconds: float = 0.0
    replan_bytes: float = 0.0
    routing_counts: np.ndarray | None = None
    layer_phase_s: np.ndarray | None = None

    def as_dict(self) -> dict:
        """The stats as a dict of plain lists and numbers; with `record_steps`, also
        "routing_counts", "layer_phase_s" and "pairs_per_rank" as numpy arrays (they go to the
        --step-log file, not the JSON summary)."""
        out = self._plain()
        if self.routing_counts is not None:
            out["routing_counts"] = self.routing_counts.copy()
        if self.layer_phase_s is not None:
            out["layer_phase_s"] = self.layer_phase_s.copy()
            out["pairs_per_rank"] = self.pairs_per_rank.copy()
        return out

    def _plain(self) -> dict:
        return {"layer_ir": self.layer_ir.round(4).tolist(),
                "mean_ir": float(self.layer_ir.mean()) if self.layer_ir.size else 1.0,
                "replicas_planned": self.replicas_planned.tolist(),
                "replicas_arrived": self.replicas_arrived.tolist(),
                "replicas_late": (self.replicas_planned - self.replicas_arrived).tolist(),
                "replicas_used": self.replicas_used.tolist(),
                "fallback_pairs": self.fallback_pairs.tolist(),
                "bytes_prefetched_per_rank": self.bytes_prefetched_per_rank.tolist(),
                "bytes_prefetched": self.bytes_prefetched,
                "exposed_transfer_s": self.exposed_transfer_s,
                "layer_exposed_s": self.layer_exposed_s.tolist(),
                "planned_exposed_s": self.planned_exposed_s,
                "plan_seconds": self.plan_seconds,
                "layer_plan_s": self.layer_plan_s.tolist(),
                "predict_seconds": self.predict_seconds,
                "layer_predict_s": self.layer_predict_s.tolist(),
                "layer_split_s": self.layer_split_s.tolist(),
                "split_seconds": float(self.layer_split_s.sum()),
                "replicas_resident": self.replicas_resident.tolist(),
                "replan_seconds": self.replan_seconds,
                "replan_bytes": self.replan_bytes}


class _Clock:
    """Marks on the main track: perf_counter on CPU, CUDA events on GPU (read a step later)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: dict[str, object] = {}

    def mark(self, key: str) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks[key] = ev
        else:
            self.marks[key] = time.perf_counter()

    def seconds(self, a: str, b: str) -> float | None:
        if a not in self.marks or b not in self.marks:
            return None
        if self.cuda:
            ea, eb = self.marks[a], self.marks[b]
            if not (ea.query() and eb.query()):
                eb.synchronize()
            return ea.elapsed_time(eb) / 1e3
        return float(self.marks[b] - self.marks[a])


@dataclass
class _LayerRecord:
    """What this rank saw at one MoE layer in the current step."""

    pairs: int = 0
    fallback: int = 0
    arrived: int = 0  # replicas of this layer complete on this rank at dispatch
    used: int = 0  # of those, replicas that ran at least one pair
    planned: int = 0  # replicas of this layer's plan, all ranks
    planned_exposed_s: float = 0.0
    exposed_s: float = 0.0
    plan_s: float = 0.0
    predict_s: float = 0.0
    split_s: float = 0.0
    counts: np.ndarray | None = None  # int [E], this rank's true pairs (record_steps)


class _Marks(PhaseHooks):
    """Clock marks at the executor's phase points."""

    def __init__(self, clock: _Clock, layer: int) -> None:
        self.clock, self.layer = clock, layer

    def before_experts(self) -> None:
        self.clock.mark(f"compute{self.layer}")

    def before_combine(self) -> None:
        self.clock.mark(f"combine{self.layer}")


class _EPBlock(nn.Module):
    """Stands in for a MoEBlock's forward inside the model: same inputs and outputs."""

    def __init__(self, runner: EPRunner, index: int, block: nn.Module) -> None:
        super().__init__()
        self._runner = [runner]  # not a submodule
        self.index = index
        self.block = block

    def forward(self, h: torch.Tensor):
        return self._runner[0].run_layer(self.index, h)


class EPRunner:
    """Expert-parallel execution of a `MoETransformer` whose MoE blocks hold this rank's experts.

    Args:
        model: the model, loaded with `expert_ids = flatnonzero(sharded_home(E, G)[rank])`.
            Experts loaded with keep_format (MXFP4 / FP8, one format in every MoE layer) stay
            packed: home shard, replica slots and transfers hold their stored tensors
            (`_expert_params`), and a replica costs that format's bytes (`replica_bytes`).
        ctx: process groups and rank.
        options: PipelineOptions.
        cost: CostModel for the planner (default: `cost_model_for(model.cfg, G, dtype)`).
    After construction the model's forward runs expert-parallel; call `begin_step()` before
    and `end_step()` after every forward (or `idle_step()` on a rank with no tokens).
    `balancer` decides, `executor` executes; `run_layer` composes them.
    """

    def __init__(self, model: nn.Module, ctx: DistContext, options: PipelineOptions | None = None,
                 cost: CostModel | None = None) -> None:
        self.model = model
        self.ctx = ctx
        self.opts = options or PipelineOptions()
        if self.opts.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.opts.policy!r}")
        # balance=False is static EP whatever the policy (the --no-balance of the CLI)
        self.policy = self.opts.policy if self.opts.balance else "static"
        self.plans_replicas = self.policy in ("probe", "probe-on-eplb")
        cfg = model.cfg
        self.cfg = cfg
        self.num_experts = cfg.num_experts
        self.num_ranks = ctx.world_size
        self.home = sharded_home(cfg.num_experts, ctx.world_size)
        for layer in model.layers:  # a model wrapped by an earlier runner: unwrap first
            if layer.is_moe and isinstance(layer.moe, _EPBlock):
                layer.moe = layer.moe.block
        if isinstance(self.opts.predictor, str) and self.opts.predictor != "history":
            raise ValueError(f"predictor must be 'history' or a LoadPredictor (the frozen router "
                             f"prior: probe.predictor.router_prior(model)), got "
                             f"{self.opts.predictor!r}")
        self.predictors: LoadPredictor | None = (None if isinstance(self.opts.predictor, str)
                                                 else self.opts.predictor)
        decoder_layers = [layer for layer in model.layers if layer.is_moe]
        self.weight_format = packed_format([layer.moe for layer in decoder_layers])
        self.blocks = []
        for i, layer in enumerate(decoder_layers):
            block = layer.moe
            self.blocks.append(block)
            layer.moe = _EPBlock(self, i, block)
        first = self.blocks[0]
        self.dtype = first.w_gate_up.dtype  # activations (a meta tensor's dtype when packed)
        self.device = (first.packed[0].data[0].device if first.packed is not None
                       else first.w_gate_up.device)
        self.layers: list[EPMoELayer] = []
        for i, block in enumerate(self.blocks):
            experts = LayerExperts(np.array(block.expert_ids), _expert_params(block))
            self.layers.append(EPMoELayer(ctx, i, cfg.num_experts, experts,
                                          _expert_fn(block), combine=block.combine,
                                          activate=block.activate, grouped=block.grouped))
        shapes = self.layers[0].experts.shapes()
        dtypes = {name: t.dtype for name, t in self.layers[0].experts.params.items()}
        for layer in self.layers[1:]:  # one slot layout serves every layer
            if layer.experts.shapes() != shapes or {
                    n: t.dtype for n, t in layer.experts.params.items()} != dtypes:
                raise ValueError(f"MoE layer {layer.layer}'s expert tensors differ from layer "
                                 f"0's; the replica slots hold one layout for every layer")
        self.pool = SlotPool(shapes, self.opts.num_slots, dtype=dtypes, device=self.device)
        self.cost = cost if cost is not None else cost_model_for(
            cfg, ctx.world_size, self.dtype, self.opts.hardware, weight_format=self.weight_format)
        self.replica_bytes = self.pool.slot_bytes  # W: one replica's bytes, as stored and sent
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.resident: ResidentExperts | None = None
        if self.policy in ("eplb", "eplb-lp", "probe-on-eplb"):
            self.resident = ResidentExperts(
                ctx, self.home, lambda layer, e: self.layers[layer].experts.get(e), shapes,
                len(self.layers), self.opts.resident_slots,
                interval=self.opts.replan_interval, window=self.opts.replan_window,
                dtype=dtypes, device=self.device)
        self._free: dict[int, np.ndarray] = {}  # layer -> replicas planned where home is
        self._replan = (0.0, 0.0)  # this step's re-plan: (seconds, bytes received here)
        self.balancer = Balancer(
            ctx, num_experts=cfg.num_experts, top_k=cfg.top_k, home=self.home, cost=self.cost,
            num_slots=self.opts.num_slots, predictor=self.opts.predictor,
            method=self.opts.method, planner=self._solve,
            plan_override=self.opts.plan_override, hold_back=self.opts.hold_back,
            dtype=self.dtype)
        self.executor = Executor(ctx, self.layers, self.pool, num_pieces=self.opts.num_pieces,
                                 max_in_flight=self.opts.max_in_flight,
                                 wait_for_replicas=self.opts.wait_for_replicas,
                                 stream=self.stream,
                                 source_params=(self.resident.params
                                                if self.policy == "probe-on-eplb" else None))
        self.records = [_LayerRecord() for _ in self.blocks]
        self.step = 0
        self.clock = _Clock(self.device)
        self.prev_clock: _Clock | None = None
        self.planner_warmup_s = 0.0
        if not isinstance(self.opts.dispatch, DispatchOptions):
            raise TypeError(f"dispatch must be a DispatchOptions, got "
                            f"{type(self.opts.dispatch).__name__}")
        self.dispatch = self.opts.dispatch
        self.capacity: int | None = None  # C of this step (fixed dispatch)
        self._ahead: dict[int, LayerPlan] = {}
        if self.opts.plan_on not in PLAN_ON:
            raise ValueError(f"plan_on must be one of {PLAN_ON}, got {self.opts.plan_on!r}")
        if self.opts.device_split not in DEVICE_SPLITS:
            raise ValueError(f"device_split must be one of {DEVICE_SPLITS}, got "
                             f"{self.opts.device_split!r}")
        if self.opts.plan_on == "device" and self.policy not in ("probe", "static"):
            raise ValueError(f"plan_on='device' plans the 'probe' policy's replicas; policy "
                             f"{self.policy!r} plans on the host (plan_on='host')")
        # the device planning path (probe.runtime.device_plan)
        self.device_plans = self.opts.plan_on == "device" and self.policy == "probe"
        self.splitter: DeviceSplit | None = None
        self._windows_dev: torch.Tensor | None = None  # float64 [L, G], gathered per step
        self._pending: list[PendingPlan] = []  # this step's device plans
        self._ahead_dev: dict[int, PendingPlan] = {}  # the history's plans of the step
        self._split_dev: dict[int, PendingPlan] = {}  # layer -> its plan (device_split "plan")
        self._next_ahead_dev: dict[int, PendingPlan] = {}  # the next step's, made early
        if self.device_plans:
            plan_group = None
            if ctx.backend == "nccl" and ctx.world_size > 1:  # collective: every rank builds
                plan_group = dist.new_group(ranks=list(range(ctx.world_size)))
            # On CUDA the planner's and the split's launches replay from CUDA graphs
            # captured at the warm-up (device_plan.Replay: a graph launch a layer on the host
            # instead of Numba's argument handling).
            graph = self.device.type == "cuda"
            self.balancer.enable_device_plans(self.device, plan_group, graph=graph,
                                              split=self.opts.device_split)
            if self.opts.device_split == "waterfill":
                self.splitter = DeviceSplit(self.cost, self.num_experts, ctx.rank,
                                            self.device, graph=graph)
            self._home_dev = torch.as_tensor(self.home.astype(np.int64)).to(self.device)
        if self.plans_replicas or self.resident is not None:
            self.warm_up_planner()

    def _solve(self, problem: BalanceProblem) -> Plan:
        if self.opts.planner is not None:
            return self.opts.planner(problem)
        return solve_plan(problem, self.opts.method)

    def warm_up_planner(self) -> float:
        """Plan one synthetic problem of the real shapes and dtypes now, so that the planner's
        one-time cost (loading or compiling its Numba code, about 1.5 s for "greedy") is paid
        at start-up and not inside the first measured step. Returns (and keeps in
        `planner_warmup_s`) the seconds it took; the plan is thrown away."""
        num_ranks, num_experts = self.num_ranks, self.num_experts
        load = np.zeros((num_ranks, num_experts), dtype=np.int64)  # [S, E]
        load[:, 0] = 4 * num_experts  # one hot expert, so that the planner adds replicas
        load[:, 1:] = 1
        window = np.full(num_ranks, self.opts.default_window_s)  # [G]
        t0 = time.perf_counter()
        if self.device_plans:  # the device kernels' one-time compile (and graph capture)
            on_cuda = self.device.type == "cuda"
            load_d = torch.as_tensor(load).to(self.device)
            window_d = torch.as_tensor(window).to(self.device)
            planner = self.balancer.device_planner
            planner.plan(load_d, window_d)
            if on_cuda and self.predictors is None and len(self.blocks) > 1:
                steps = len(self.blocks) - 1  # the history's launch of a step's layers
                planner.plan_layers(load_d.expand(steps, -1, -1), window_d.expand(steps, -1))
            if self.splitter is not None:
                self.splitter.quota(load_d, self._home_dev)
            if on_cuda:
                torch.cuda.synchronize(self.device)
        elif self.plans_replicas:
            self._solve(self.balancer.problem(load, window))
        split = self._split_kind()
        if split is not None:  # the dispatch split's one-time cost (Numba, HiGHS import)
            copies = self.resident.copies(0)
            dispatch_quota(split, self.ctx.rank, load, copies, self.cost, layout=copies > 0)
        self.planner_warmup_s = time.perf_counter() - t0
        return self.planner_warmup_s

    def _split_kind(self) -> str | None:
        return SPLITS.get(self.policy)

    @property
    def no_sync_layers(self) -> bool:
        """Whether the MoE layers run with no host sync: fixed-capacity dispatch under the
        static policy, PROBE with the history predictor (plans made at `begin_step`), or
        PROBE planning on the device (`plan_on="device"`, either predictor)."""
        return self.dispatch.fixed and (self.policy == "static" or (
            self.policy == "probe" and (self.predictors is None or self.device_plans)))

    # -- step bookkeeping ----------------------------------------------------------------------
    def begin_step(self, num_tokens: int | None = None) -> None:
        """Start a step: an EPLB re-plan when due (every in-flight replica transfer finishes
        first, then the weights move synchronously; timed), then fresh clocks and records.

        With fixed-capacity dispatch: this step's capacity C (`dispatch.capacity`, else from
        the group's largest `num_tokens`, agreed by one all_gather) and, when
        `no_sync_layers` and PROBE plans on the host, the plans of every MoE layer of the step.
        Planning on the device: every rank's windows of the step (one all_gather) and, with
        the history predictor, the plans of MoE layers 1 .. L-1 launched on the side stream
        (`Balancer.plan_ahead_device`: one gather and one launch for the step)."""
        self._replan = (0.0, 0.0)
        if self.dispatch.fixed:
            self._begin_fixed(num_tokens)
        res = self.resident
        if res is not None and self.step > 0 and self.step % res.interval == 0 \
                and res.history:
            self.executor.drain()  # a late replica may still be read from a resident slot
            if res.maybe_replan(self.step):
                self._replan = (res.last_move_s, float(res.last_move_bytes))
        self.prev_clock, self.clock = self.clock, _Clock(self.device)
        self.records = [_LayerRecord() for _ in self.blocks]
        self._pending = []
        self._split_dev = {}
        if self.device_plans:  # every rank's windows, once a step: float64 [L, G]
            windows = np.array([self._window(k) for k in range(len(self.blocks))])  # [L]
            got = all_gather_fields(self.ctx, {"window": windows},
                                    f"window all_gather (step {self.step})")["window"]
            self._windows_dev = to_device(np.ascontiguousarray(got.T), self.device,
                                          torch.float64)
            if self.predictors is None:  # the history: the step's plans in one launch
                early, self._next_ahead_dev = self._next_ahead_dev, {}
                # launched at the last step's last MoE layer; the first step's here
                self._ahead_dev = early or self.balancer.plan_ahead_device(self.step,
                                                                           self._windows_dev)
        elif self.no_sync_layers and self.plans_replicas:
            windows = np.array([self._window(k) for k in range(len(self.blocks))])  # [L]
            self._ahead = self.balancer.plan_ahead(self.step, windows, len(self.blocks))
        self.clock.mark("begin")

    def _begin_fixed(self, num_tokens: int | None) -> None:
        opts = self.dispatch
        if opts.capacity is None:
            if num_tokens is None:
                raise ValueError("fixed-capacity dispatch without a fixed capacity needs "
                                 "begin_step(num_tokens=...) (this rank's tokens this step)")
            if int(num_tokens) < 0:
                raise ValueError(f"num_tokens must be >= 0, got {num_tokens!r}")
            most = all_gather_fields(self.ctx, {"tokens": np.array(float(num_tokens))},
                                     "step tokens all_gather")["tokens"].max()
            self.capacity = capacity_for(opts, int(most), self.cfg.top_k, self.num_ranks)
        else:
            self.capacity = capacity_for(opts, 0, self.cfg.top_k, self.num_ranks)
        for layer in self.layers:
            layer.fixed_state(self.device).reset()

    def _window(self, layer: int) -> float:
        """Seconds to hide layer `layer`'s transfer, from the previous step's marks."""
        clock = self.prev_clock
        if clock is None or layer == 0:
            return self.opts.default_window_s
        expert = clock.seconds(f"experts{layer - 1}", f"combine{layer - 1}")
        attn = clock.seconds(f"end{layer - 1}", f"start{layer}")
        if expert is None or attn is None:
            return self.opts.default_window_s
        return max(expert + attn, 0.0)

    # -- one MoE layer -------------------------------------------------------------------------
    def run_layer(self, layer: int, h: torch.Tensor):
        """Decide (balancer) then execute (executor) MoE layer `layer` on h [T, D]."""
        from probe.runtime.model import LayerRouting

        rec, block = self.records[layer], self.blocks[layer]
        self.clock.mark(f"start{layer}")
        quota = present = mine = None
        with record_function("probe.moe.route_predict_plan"):
            logits = block.router(h)  # [T, E]
            topk_ids, topk_weights = block.select(logits)  # [T, K] x2
            if self.device_plans:
                arrived, mine, next_transfer, quota = self._route_device(layer, h, topk_ids,
                                                                         rec)
            elif self.no_sync_layers:
                arrived, mine, next_transfer = self._route_no_sync(layer, topk_ids, rec)
            else:
                arrived, next_transfer, quota, present = self._route(layer, h, topk_ids, rec)
        self.clock.mark(f"experts{layer}")
        out, stats = self.executor.run(
            layer, h, topk_ids, topk_weights, arrived, next_transfer=next_transfer,
            marks=_Marks(self.clock, layer), quota=quota, present=present,
            resident_params=(None if self.resident is None
                             else lambda e, layer=layer: self.resident.params(layer, e)),
            capacity=self.capacity if self.dispatch.fixed else None, mine=mine)
        shared = block.shared_forward(h)  # [T, D] or None; shared experts run on every rank
        if shared is not None:
            out = out + shared
        rec.fallback = stats.pairs_fallback
        rec.pairs = stats.pairs_processed
        rec.used = stats.replicas_used
        self.executor.finish_layer(layer)
        self.clock.mark(f"end{layer}")
        return out, LayerRouting(block.layer, h, logits, topk_ids, topk_weights)

    def _route_no_sync(self, layer: int, topk_ids: torch.Tensor, rec: _LayerRecord):
        """The balancing of one MoE layer with no host read (`no_sync_layers`): the true
        counts stay on the device; the arrived bits are gathered into a device tensor; the
        next layer's plan was made at `begin_step`. Returns (arrived bool [G, E] on the
        device, this rank's arrived bool [E] on the host, the next layer's transfer)."""
        self.balancer.observe_device(layer, topk_ids)
        if not self.plans_replicas:
            return np.zeros((self.num_ranks, self.num_experts), dtype=bool), None, None
        arrived_here, rec.exposed_s = self.executor.arrived(layer)  # [E], host
        arrived = self.balancer.gather_arrived(layer, arrived_here, self.device)  # [G, E]
        rec.arrived = int(arrived_here.sum())
        next_transfer = None
        next_plan = self._ahead.pop(layer + 1, None)
        if next_plan is not None:
            nrec = self.records[layer + 1]
            nrec.planned = next_plan.num_replicas
            nrec.planned_exposed_s = next_plan.planned_exposed_s
            nrec.plan_s, nrec.predict_s = next_plan.plan_s, next_plan.predict_s
            next_transfer = self.executor.prefetch(next_plan)
        return arrived, arrived_here, next_transfer

    def _route_device(self, layer: int, h: torch.Tensor, topk_ids: torch.Tensor,
                      rec: _LayerRecord):
        """The balancing of one MoE layer on the device (`plan_on="device"`,
        `probe.runtime.device_plan`): ONE all_gather of every rank's true counts and arrived
        bits of this layer, this rank's quota (the layer's plan's own split, or the split of
        the true counts over the copies present: `device_split`), and the next layer's
        prediction and plan launched on the side stream. No host read with fixed
        dispatch; the exact path reads the quota and arrived bits back (it reads counts
        anyway). Returns (arrived bool [G, E], this rank's arrived bool [E] on the host, the
        next layer's transfer, this rank's quota int64 [E, G])."""
        bal, num_experts = self.balancer, self.num_experts
        bal.observe_device(layer, topk_ids)
        arrived_here, rec.exposed_s = self.executor.arrived(layer)  # [E], host
        rec.arrived = int(arrived_here.sum())
        local = to_device(arrived_here.astype(np.int64), self.device, torch.int64)  # [E]
        if self.splitter is not None:  # the true counts ride along for the water-filling
            local = torch.cat((bal._this_step_dev[layer], local))  # [2E]
        got = bal.gather_device(local, f"counts all_gather (MoE layer {layer})")  # [G, 2E | E]
        arrived = got[:, -num_experts:] > 0  # [G, E]
        t0 = time.perf_counter()
        if self.splitter is not None:
            quota = self.splitter.quota(got[:, :num_experts].contiguous(),
                                        self._home_dev + arrived.to(torch.int64))  # [E, G]
        else:  # device_split "plan": the plan's own split (None: no plan, all home)
            planned = self._split_dev.pop(layer, None)
            quota = planned.split() if planned is not None else None
        rec.split_s = time.perf_counter() - t0
        if self.predictors is None and layer > 0 and layer == len(self.blocks) - 1:
            # The next step's plans (history predictor): every count they read is observed
            # now, so they are launched here, behind this layer, the step's end and the next
            # step's first attention, rather than at the next step's start.
            self._next_ahead_dev = bal.plan_ahead_device(self.step + 1, self._windows_dev,
                                                         from_this_step=True)
        next_transfer = None
        if layer + 1 < len(self.blocks):
            pending = self._ahead_dev.pop(layer + 1, None)  # the history's, made before
            if pending is None:
                pending = bal.plan_device(layer + 1, self.step, h, self._windows_dev[layer + 1])
            self._pending.append(pending)
            if pending.quota is not None:
                self._split_dev[layer + 1] = pending
            next_transfer = self.executor.prefetch(pending)
        if not self.dispatch.fixed:  # the exact path takes host arrays
            arrived = arrived.cpu().numpy()
            quota = quota.cpu().numpy() if quota is not None else None
        return arrived, arrived_here, next_transfer, quota

    def _route(self, layer: int, h: torch.Tensor, topk_ids: torch.Tensor, rec: _LayerRecord):
        """Predict, gather and plan one MoE layer ahead, and the dispatch-time split (host
        reads per layer). Returns (arrived bool [G, E], the next layer's transfer, quota,
        present)."""
        arrived = np.zeros((self.num_ranks, self.num_experts), dtype=bool)  # [G, E]
        next_transfer = quota = present = None
        split = self._split_kind()
        self.balancer.observe(layer, topk_ids)
        counts_here = torch.bincount(topk_ids.reshape(-1).cpu(),
                                     minlength=self.num_experts).numpy()  # [E]
        rec.counts = counts_here
        if self.resident is not None:
            self.resident.observe(layer, counts_here)
        group = None
        if self.plans_replicas:
            arrived_here, rec.exposed_s = self.executor.arrived(layer)  # [E]
            has_next = layer + 1 < len(self.blocks)
            on_eplb = self.policy == "probe-on-eplb"
            group, next_plan = self.balancer.decide(
                layer, self.step, h, arrived_here,
                self._window(layer + 1) if has_next else 0.0, has_next=has_next,
                counts=counts_here if on_eplb else None,
                base=self.resident.copies(layer + 1) > 0 if on_eplb and has_next else None)
            arrived = group.arrived
            rec.arrived = int(arrived[self.ctx.rank].sum())
            if next_plan is not None:
                if on_eplb:
                    next_plan = self._strip_home_replicas(next_plan)
                nrec = self.records[layer + 1]
                nrec.planned = next_plan.num_replicas
                nrec.planned_exposed_s = next_plan.planned_exposed_s
                nrec.plan_s, nrec.predict_s = next_plan.plan_s, next_plan.predict_s
                next_transfer = self.executor.prefetch(next_plan)
        if split is not None:
            quota, present, rec.split_s = self._dispatch_split(
                layer, split, counts_here, arrived,
                group.counts if group is not None else None)
        return arrived, next_transfer, quota, present

    def _strip_home_replicas(self, layer_plan: LayerPlan) -> LayerPlan:
        """PROBE-on-EPLB plans on the EPLB layout, which may leave out an expert that this
        runtime still holds at its sharded home; a replica planned there needs no transfer:
        it is dropped from the transfer and counted present at dispatch (`_free`)."""
        from dataclasses import replace

        plan = layer_plan.plan
        free = plan.replicas & self.home  # [G, E]
        self._free[layer_plan.layer] = free
        if not free.any():
            return layer_plan
        kept = Plan(plan.replicas & ~self.home, np.where(free, -1, plan.sources),
                    plan.assignment)
        return replace(layer_plan, plan=kept)

    def _dispatch_split(self, layer: int, split: str, counts_here: np.ndarray,
                        arrived: np.ndarray, gathered: np.ndarray | None):
        """This rank's quota [E, G] on the TRUE counts over the copies present, the non-home
        copies present bool [G, E], and the split's solve seconds."""
        layout = self.resident.copies(layer)  # [G, E]
        copies = layout.copy()
        if self.policy == "probe-on-eplb":
            copies += arrived.astype(np.int64)  # per-step replicas complete on their rank
            copies += self._free.pop(layer, np.zeros_like(self.home)).astype(np.int64)
        if split == "even":
            counts = np.zeros((self.num_ranks, self.num_experts), np.int64)
            counts[self.ctx.rank] = counts_here  # the even split reads only its own row
        elif gathered is not None:
            counts = gathered  # rode on the balancer's all_gather
        else:  # eplb-lp: one all_gather of every rank's counts
            counts = all_gather_fields(self.ctx, {"counts": counts_here},
                                       f"dispatch counts all_gather (MoE layer {layer})"
                                       )["counts"].round().astype(np.int64)  # [S, E]
        quota, seconds = dispatch_quota(split, self.ctx.rank, counts, copies, self.cost,
                                        layout=layout > 0)
        return quota, (copies > 0) & ~self.home, seconds

    def close(self) -> None:
        """Give the model its own MoE blocks back, let the transfers finish and drop them and
        the pool (safe to call twice). The wrapped model and the runner reference each other;
        closing breaks that cycle, so the runner (and the process groups it holds through
        `ctx`) is freed at once, not by a later garbage collection, e.g. during interpreter
        exit."""
        for layer in self.model.layers:
            if layer.is_moe and isinstance(layer.moe, _EPBlock):
                layer.moe = layer.moe.block
        self.executor.close()
        self.layers = []
        self.executor.layers = []

    def idle_step(self) -> None:
        """Take part in every MoE layer's collectives with no tokens of this rank."""
        h = torch.zeros((0, self.cfg.hidden_size), dtype=self.dtype, device=self.device)
        for i in range(len(self.blocks)):
            self.run_layer(i, h)

    def breakdown(self) -> dict[str, float]:
        """Seconds per phase summed over the MoE layers of the last step (call after the
        device is synchronised): attention (and norms, dense MLPs) before each MoE layer,
        router + prediction + planning, dispatch, expert compute, combine."""
        phases = self._layer_phases(self.clock).sum(axis=0)  # [5]
        return {key: float(sec) for key, sec in zip(PHASES, phases, strict=True)}

    def _layer_phases(self, clock: _Clock) -> np.ndarray:
        """float64 [L, 5]: seconds of each of `PHASES` at every MoE layer on `clock`'s marks
        (0 where a mark is missing)."""
        out = np.zeros((len(self.blocks), len(PHASES)))
        for i in range(len(self.blocks)):
            marks = ((f"end{i - 1}" if i else "begin", f"start{i}"),
                     (f"start{i}", f"experts{i}"), (f"experts{i}", f"compute{i}"),
                     (f"compute{i}", f"combine{i}"), (f"combine{i}", f"end{i}"))
            for j, (a, b) in enumerate(marks):
                out[i, j] = clock.seconds(a, b) or 0.0
        return out

    def end_step(self) -> StepStats:
        """Close the step: history for the predictor, held-back pieces released, and
        group-wide stats (one all_gather)."""
        self.balancer.end_step()
        self.executor.end_step()
        for pending in self._pending:  # device plans: their replica counts, read back now
            nrec = self.records[pending.layer]
            nrec.planned = pending.num_replicas
            nrec.plan_s, nrec.predict_s = pending.plan_s, pending.predict_s
        self._pending = []
        if self.resident is not None:
            self.resident.end_step()
        recs = self.records
        record = self.opts.record_steps
        extra = {}
        if record:  # the step's marks are complete here: the engine has sampled its tokens
            if self.no_sync_layers or self.device_plans:  # counts stayed on the device
                for layer, r in enumerate(recs):
                    r.counts = self.balancer.history.get(layer)
            extra = {"counts": np.array([np.zeros(self.num_experts) if r.counts is None
                                         else r.counts for r in recs]),  # [L, E]
                     "phases": self._layer_phases(self.clock)}  # [L, 5]
        fixed = [layer.fixed_state(self.device) for layer in self.layers] \
            if self.dispatch.fixed else []
        # fixed dispatch: the layers' device counters and stats are read here, once a step
        needed = np.array([int(f.needed) for f in fixed])  # [L] largest block sent
        unrunnable = np.array([int(f.unrunnable) for f in fixed])  # [L]
        g = all_gather_fields(self.ctx, {
            "pairs": np.array([int(r.pairs) for r in recs]),
            "fallback": np.array([int(r.fallback) for r in recs]),
            "arrived": np.array([r.arrived for r in recs]),
            "used": np.array([int(r.used) for r in recs]),
            "needed": needed, "unrunnable": unrunnable,
            "planned_exposed_s": np.array([r.planned_exposed_s for r in recs]),
            "exposed_s": np.array([r.exposed_s for r in recs]),
            "plan_s": np.array([r.plan_s for r in recs]),
            "predict_s": np.array([r.predict_s for r in recs]),
            "split_s": np.array([r.split_s for r in recs]),
            "bytes_arrived": np.array(sum(r.arrived for r in recs) * self.replica_bytes),
            "replan": np.array(self._replan),
            **extra,
        }, "step stats all_gather")  # each [G, L] (bytes_arrived [G], replan [G, 2]; with
        # record_steps counts [G, L, E] and phases [G, L, 5])
        pairs = g["pairs"].T  # [L, G]
        self.step += 1
        if fixed:
            self._check_fixed(g["needed"].max(axis=0), g["unrunnable"].sum(axis=0))
        return StepStats(
            layer_ir=imbalance_ratio(pairs),
            pairs_per_rank=pairs.astype(np.int64),
            replicas_planned=np.array([r.planned for r in recs], dtype=np.int64),
            replicas_arrived=g["arrived"].sum(axis=0).astype(np.int64),
            replicas_used=g["used"].sum(axis=0).astype(np.int64),
            fallback_pairs=g["fallback"].sum(axis=0).astype(np.int64),
            bytes_prefetched_per_rank=g["bytes_arrived"].copy(),
            bytes_prefetched=float(g["bytes_arrived"].sum()),
            exposed_transfer_s=float(g["exposed_s"].sum(axis=1).max()),
            layer_exposed_s=g["exposed_s"].max(axis=0),
            planned_exposed_s=float(g["planned_exposed_s"].max()),
            plan_seconds=float(g["plan_s"].sum(axis=1).max()),
            layer_plan_s=g["plan_s"].max(axis=0),
            predict_seconds=float(g["predict_s"].sum(axis=1).max()),
            layer_predict_s=g["predict_s"].max(axis=0),
            layer_split_s=g["split_s"].max(axis=0),
            replicas_resident=np.full(len(recs), 0 if self.resident is None
                                      else self.resident.resident_copies, dtype=np.int64),
            replan_seconds=float(g["replan"][:, 0].max()),
            replan_bytes=float(g["replan"][:, 1].sum()),
            routing_counts=(g["counts"].round().astype(np.int64).transpose(1, 0, 2)
                            if record else None),  # [L, S, E]
            layer_phase_s=g["phases"].transpose(1, 0, 2).copy() if record else None)


    def _check_fixed(self, needed: np.ndarray, unrunnable: np.ndarray) -> None:
        """Raise (on every rank: the inputs are gathered) when a fixed-capacity layer of the
        step overflowed (needed int [L] > C) or received rows it could not run."""
        bad = np.flatnonzero(unrunnable > 0)
        if bad.size:
            raise RuntimeError(f"MoE layer {int(bad[0])}: {int(unrunnable[bad[0]])} rows "
                               "reached a rank that neither holds their expert nor has a "
                               "replica of it (ranks disagree on the plan)")
        over = np.flatnonzero(needed > self.capacity)
        if over.size:
            layer, most = int(over[0]), int(needed[over].max())
            raise CapacityOverflow(
                f"fixed-capacity dispatch overflowed at MoE layer {layer} (step "
                f"{self.step - 1}): a rank sent {int(needed[layer])} rows to one peer, the "
                f"capacity is {self.capacity} rows per peer; the step's output is wrong and "
                f"was discarded. Rerun with --capacity {most} or more, a larger "
                "--capacity-factor, or --dispatch exact")


def _expert_params(block) -> dict[str, torch.Tensor]:
    """The weights a rank holds and moves for its home experts: name -> [E_local, ...]. Packed
    experts stay packed: their stored tensors, named by `probe.runtime.quant.split_packed`
    ("w_gate_up.blocks", "w_gate_up.scales", ... for MXFP4)."""
    if block.packed is not None:
        params = {**split_packed("w_gate_up", block.packed[0]),
                  **split_packed("w_down", block.packed[1])}
    else:
        params = {"w_gate_up": block.w_gate_up, "w_down": block.w_down}
    if block.cfg.expert_bias:
        params["b_gate_up"] = block.b_gate_up
        params["b_down"] = block.b_down
    return params


def _expert_fn(block):
    """One expert's forward from explicit weights: the same ops as MoEBlock.expert_forward.
    Packed weights (a replica slot of MXFP4 / FP8 tensors) run as a one-expert grouped GEMM
    (`probe.runtime.experts.GroupedExperts`: the Triton kernel on a GPU, dequantised on CPU),
    as the single-process model runs them."""
    import torch.nn.functional as F

    from probe.runtime.experts import GroupedExperts

    def fn(params, x: torch.Tensor) -> torch.Tensor:
        if "w_gate_up" in params:
            gate_up = F.linear(x, params["w_gate_up"], params.get("b_gate_up"))  # [n, 2F]
            return F.linear(block.activate(gate_up), params["w_down"],
                            params.get("b_down")).to(x.dtype)  # [n, D]
        w = join_packed(params, stacked=False)  # one expert: PackedWeight [1, ...]
        bias = block.cfg.expert_bias
        experts = GroupedExperts(w["w_gate_up"], w["w_down"], block.activate,
                                 b_gate_up=w["b_gate_up"][None] if bias else None,
                                 b_down=w["b_down"][None] if bias else None,
                                 grouped=block.grouped)
        n = x.shape[0]
        offs = torch.full((1,), n, dtype=torch.int32, device=x.device)
        slot = torch.zeros(n, dtype=torch.int64, device=x.device)
        return experts.forward_sorted(x, offs, slot).to(x.dtype)  # [n, D]

    return fn
