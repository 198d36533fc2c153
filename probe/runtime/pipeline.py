"""The continuous lookahead pipeline: at MoE layer l, predict l+1, all-gather, plan, prefetch.

`EPRunner` turns a loaded `MoETransformer` (this rank's slice of experts) into an
expert-parallel one: it replaces every MoE block's forward with `_EPBlock`, which runs, per
layer l and step (the paper's section 4.4):

    router(h_l) -> true top-k ids and gate weights            (the plan never changes these)
    poll: which replicas of layer l arrived (non-blocking)
    predict layer l+1's load from h_l, then ONE all_gather of
        [arrived_l (E) | predicted load of l+1 (E) | window of l+1 (1)] per rank
    plan layer l+1 (greedy by default) on the gathered [S, E] load; same plan on every rank
    dispatch l (all_to_all_single), following plan_l and the arrived replicas
    start transfer of l+1's replicas (phase 1)  | expert compute of l
    pause                                        | combine all_to_all of l
    resume (phase 2); drain l's stragglers       | layer l+1's attention runs next

Prediction: with a `LoadPredictor` (e.g. a `probe.predictor.PredictorSet`; the frozen router
prior is `probe.predictor.router_prior(model)`), layer l+1's load is the top-k of the
predictor's logits on h_l; with `predictor="history"` it is the TRUE load this rank saw at layer
l+1 in the previous step (zero in the first step). Layer 0 has no earlier layer in the step: it
always runs static (everything home), which is also the state before any plan exists.

Window: the seconds rank g can hide layer l+1's transfer = expert compute of layer l plus the
non-MoE work before layer l+1's MoE (attention, norms), both measured in the previous step
(CUDA events on GPU, perf_counter on CPU); `default_window_s` before the first measurement.
The gathered windows are identical on every rank, so every rank solves the same problem.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.profiler import record_function

from probe.placement import imbalance_ratio, sharded_home
from probe.planner import BalanceProblem, CostModel, Plan, evaluate_plan
from probe.runtime.dist import DistContext, guarded
from probe.runtime.ep import EPMoELayer, LayerExperts, PhaseHooks
from probe.runtime.transfer import SlotPool, SplitPhaseTransfer

__all__ = ["EPRunner", "LoadPredictor", "PipelineOptions", "StepStats", "cost_model_for",
           "solve_plan"]


def solve_plan(problem: BalanceProblem, method: str = "greedy") -> Plan:
    """Plan one layer with `probe.planner.solve` (falls back to static if it finds none)."""
    from probe.planner.solve import solve

    result = solve(problem, method, check=False)
    if result.plan is None:
        from probe.planner.static import static_plan

        return static_plan(problem)
    return result.plan


def cost_model_for(cfg, world_size: int, dtype: torch.dtype,
                   hardware: str = "h200x8") -> CostModel:
    """Cost model of a runtime `MoEConfig` on `world_size` ranks of `hardware`."""
    from probe.specs import ModelSpec, hardware_preset

    bytes_per = torch.tensor([], dtype=dtype).element_size()
    spec = ModelSpec(name=cfg.model_type, num_layers=cfg.num_moe_layers,
                     num_experts=cfg.num_experts, top_k=cfg.top_k, hidden=cfg.hidden_size,
                     expert_ffn=cfg.moe_intermediate_size, bytes_per_weight=bytes_per,
                     bytes_per_activation=bytes_per)
    hw = hardware_preset(hardware)
    if world_size != hw.num_ranks:
        hw = hw.with_ranks(world_size)
    return CostModel.from_specs(spec, hw)


class LoadPredictor(Protocol):
    """What the runner asks of a predictor (`probe.predictor.PredictorSet` is one)."""

    def __call__(self, layer: int, h_prev: torch.Tensor) -> torch.Tensor:
        """Predicted router logits [T, E] of MoE layer `layer` from h_prev [T, D], the router
        input of MoE layer `layer` - 1."""
        ...


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
    hold_back: optional function (moe layer, step) -> [(g, e)] replicas made late on purpose.
    default_window_s: window before the first measurement.
    wait_for_replicas: block until a layer's replicas are in instead of falling back (the
        waiting counts as exposed transfer time); default False: late replicas are skipped.
    num_pieces: pieces per weight tensor (split-phase granularity).
    hardware: HardwareSpec preset for the cost model.
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
    hardware: str = "h200x8"


@dataclass
class StepStats:
    """One step of the whole EP group (identical on every rank after `end_step`).

    layer_ir: float [L], IR of pairs processed per rank (eq. 1) at every MoE layer.
    pairs_per_rank: int [L, G].
    replicas_planned / replicas_arrived: int [L], summed over ranks; a planned replica that
        did not arrive in time (before its layer's MoE) is late: planned - arrived.
    fallback_pairs: int [L], pairs sent home because their replica had not arrived.
    bytes_prefetched_per_rank: float [G], weight bytes of the replicas that ARRIVED in time on
        each rank (late replicas, drained after their layer, are not counted).
    bytes_prefetched: their sum over ranks (the group's total, counted once).
    exposed_transfer_s: max over ranks of host time blocked waiting for transfers.
    planned_exposed_s: max over layers of the plan's modelled exposed transfer (eq. 6).
    plan_seconds: planner wall time summed over layers (max over ranks).
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

    def as_dict(self) -> dict:
        return {"layer_ir": self.layer_ir.round(4).tolist(),
                "mean_ir": float(self.layer_ir.mean()) if self.layer_ir.size else 1.0,
                "replicas_planned": self.replicas_planned.tolist(),
                "replicas_arrived": self.replicas_arrived.tolist(),
                "replicas_late": (self.replicas_planned - self.replicas_arrived).tolist(),
                "fallback_pairs": self.fallback_pairs.tolist(),
                "bytes_prefetched_per_rank": self.bytes_prefetched_per_rank.tolist(),
                "bytes_prefetched": self.bytes_prefetched,
                "exposed_transfer_s": self.exposed_transfer_s,
                "planned_exposed_s": self.planned_exposed_s,
                "plan_seconds": self.plan_seconds}


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
class _LayerState:
    plan: Plan | None = None
    transfer: SplitPhaseTransfer | None = None
    arrived: np.ndarray | None = None
    fallback: int = 0
    pairs: int = 0
    planned_exposed: float = 0.0
    history_load: np.ndarray | None = None  # [E] this rank's true load last step
    this_load: np.ndarray | None = None
    window: float | None = None
    num_planned: int = 0
    done_event: object = None
    extra: dict = field(default_factory=dict)


class _Hooks(PhaseHooks):
    def __init__(self, transfer: SplitPhaseTransfer | None) -> None:
        self.transfer = transfer

    def before_experts(self) -> None:
        if self.transfer is not None:
            self.transfer.start()

    def before_combine(self) -> None:
        if self.transfer is not None:
            self.transfer.pause()

    def after_combine(self) -> None:
        if self.transfer is not None:
            self.transfer.resume()


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
        ctx: process groups and rank.
        options: PipelineOptions.
        cost: CostModel for the planner (default: `cost_model_for(model.cfg, G, dtype)`).
    After construction the model's forward runs expert-parallel; call `begin_step()` before
    and `end_step()` after every forward (or `idle_step()` on a rank with no tokens).
    """

    def __init__(self, model: nn.Module, ctx: DistContext, options: PipelineOptions | None = None,
                 cost: CostModel | None = None) -> None:
        self.model = model
        self.ctx = ctx
        self.opts = options or PipelineOptions()
        cfg = model.cfg
        self.cfg = cfg
        self.num_experts = cfg.num_experts
        self.num_ranks = ctx.world_size
        self.home = sharded_home(cfg.num_experts, ctx.world_size)
        for layer in model.layers:  # a model wrapped by an earlier runner: unwrap first
            if layer.is_moe and isinstance(layer.moe, _EPBlock):
                layer.moe = layer.moe.block
        self.predictors: LoadPredictor | None = None
        if not isinstance(self.opts.predictor, str):
            self.predictors = self.opts.predictor
        elif self.opts.predictor != "history":
            raise ValueError(f"predictor must be 'history' or a LoadPredictor (the frozen router "
                             f"prior: probe.predictor.router_prior(model)), got "
                             f"{self.opts.predictor!r}")
        self.blocks = []
        decoder_layers = [layer for layer in model.layers if layer.is_moe]
        for i, layer in enumerate(decoder_layers):
            block = layer.moe
            self.blocks.append(block)
            layer.moe = _EPBlock(self, i, block)
        first = self.blocks[0]
        self.dtype = first.w_gate_up.dtype
        self.device = first.w_gate_up.device
        self.layers: list[EPMoELayer] = []
        for i, block in enumerate(self.blocks):
            experts = LayerExperts(np.array(block.expert_ids), _expert_params(block))
            self.layers.append(EPMoELayer(ctx, i, cfg.num_experts, experts,
                                          _expert_fn(block), combine=block.combine,
                                          activate=block.activate, grouped=block.grouped))
        self.state = [_LayerState() for _ in self.blocks]
        shapes = self.layers[0].experts.shapes()
        self.pool = SlotPool(shapes, self.opts.num_slots, dtype=self.dtype, device=self.device)
        self.cost = cost if cost is not None else cost_model_for(cfg, ctx.world_size, self.dtype,
                                                                 self.opts.hardware)
        self.replica_bytes = sum(math.prod(shape) for shape in shapes.values()) \
            * self.pool.storage[next(iter(shapes))].element_size()  # W: one replica's bytes
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.step = 0
        self.clock = _Clock(self.device)
        self.prev_clock: _Clock | None = None
        self.exposed_s = 0.0
        self.plan_s = 0.0
        self.bytes_arrived = 0
        self.planner_warmup_s = 0.0
        if self.opts.balance:
            self.warm_up_planner()

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
        problem = self._problem(load, window)
        if self.opts.planner is not None:
            self.opts.planner(problem)
        else:
            solve_plan(problem, self.opts.method)
        self.planner_warmup_s = time.perf_counter() - t0
        return self.planner_warmup_s

    # -- step bookkeeping ----------------------------------------------------------------------
    def begin_step(self) -> None:
        self.prev_clock, self.clock = self.clock, _Clock(self.device)
        self.exposed_s = 0.0
        self.plan_s = 0.0
        self.bytes_arrived = 0
        for st in self.state:
            st.fallback = 0
            st.pairs = 0
            st.planned_exposed = 0.0
            st.num_planned = 0
            st.arrived = None
        self.clock.mark("begin")

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

    def _all_gather(self, vec: np.ndarray, name: str) -> np.ndarray:
        """float64 [n] per rank -> [G, n]."""
        if self.ctx.group is None or self.num_ranks == 1:
            return vec[None, :]
        local = torch.as_tensor(vec, dtype=torch.float64)
        if self.ctx.backend == "nccl":
            local = local.to(self.ctx.device)
        out = [torch.empty_like(local) for _ in range(self.num_ranks)]
        with guarded(name, self.ctx.rank, self.ctx.watchdog):
            dist.all_gather(out, local, group=self.ctx.group)
        return torch.stack(out).cpu().numpy()

    def _problem(self, load: np.ndarray, window: np.ndarray) -> BalanceProblem:
        """The planning instance of one layer: load [S, E] (whole counts), window [G]."""
        return BalanceProblem.from_load(load.astype(np.int64), self.cost, self.opts.num_slots,
                                        window, self.home)

    def _plan(self, layer: int, load: np.ndarray, window: np.ndarray) -> Plan:
        problem = self._problem(load, window)
        plan = None
        if self.opts.plan_override is not None:
            plan = self.opts.plan_override(layer, self.step)
        if plan is None:
            plan = (self.opts.planner(problem) if self.opts.planner is not None
                    else solve_plan(problem, self.opts.method))
        self.state[layer].planned_exposed = evaluate_plan(problem, plan).exposed_transfer
        self.state[layer].num_planned = plan.num_replicas
        return plan

    def _predict(self, layer: int, h: torch.Tensor, next_layer: int) -> np.ndarray:
        """Predicted load [E] of this rank's tokens at `next_layer`."""
        E = self.num_experts
        if self.predictors is not None:
            if h.shape[0] == 0:
                return np.zeros(E)
            logits = self.predictors(next_layer, h.to(self.dtype))  # [T, E]
            ids = torch.topk(logits, self.cfg.top_k, dim=-1).indices
            return torch.bincount(ids.reshape(-1).cpu(), minlength=E).numpy().astype(np.float64)
        hist = self.state[next_layer].history_load
        return np.zeros(E) if hist is None else hist.astype(np.float64)

    # -- one MoE layer -------------------------------------------------------------------------
    def run_layer(self, layer: int, h: torch.Tensor):
        from probe.runtime.model import LayerRouting

        opts, st, E = self.opts, self.state[layer], self.num_experts
        block = self.blocks[layer]
        self.clock.mark(f"start{layer}")
        with record_function("probe.moe.route_predict_plan"):
            logits = block.router(h)  # [T, E]
            topk_ids, topk_weights = block.select(logits)  # [T, K] x2
            st.this_load = torch.bincount(topk_ids.reshape(-1).cpu(), minlength=E).numpy()
            num_layers = len(self.blocks)
            hooks = _Hooks(None)
            arrived = np.zeros((self.num_ranks, E), dtype=bool)
            quota = None
            if opts.balance:
                if st.transfer is None:
                    arrived_local = np.zeros(E, dtype=bool)
                elif opts.wait_for_replicas:
                    t0 = time.perf_counter()
                    arrived_local = st.transfer.wait_posted()
                    self.exposed_s += time.perf_counter() - t0
                else:
                    arrived_local = st.transfer.poll()
                nxt = layer + 1
                has_next = nxt < num_layers
                pred = self._predict(layer, h, nxt) if has_next else np.zeros(E)
                window = self._window(nxt) if has_next else 0.0
                gathered = self._all_gather(
                    np.concatenate([arrived_local.astype(np.float64), pred, [window]]),
                    f"plan all_gather (MoE layer {layer})")  # [G, 2E+1]
                arrived = gathered[:, :E] > 0.5  # [G, E]
                self.bytes_arrived += int(arrived[self.ctx.rank].sum()) * self.replica_bytes
                if st.transfer is not None:
                    st.transfer.wait_arrived(arrived[self.ctx.rank])
                if st.plan is not None:
                    quota = st.plan.assignment[self.ctx.rank]  # [E, G]
                if has_next:
                    t0 = time.perf_counter()
                    plan = self._plan(nxt, gathered[:, E:2 * E].round(), gathered[:, 2 * E])
                    self.plan_s += time.perf_counter() - t0
                    nst = self.state[nxt]
                    nst.plan = plan
                    hold = opts.hold_back(nxt, self.step) if opts.hold_back is not None else ()
                    ready = self._buffer_ready_event(nxt)
                    nst.transfer = SplitPhaseTransfer(
                        nxt, plan.replicas, plan.sources, self.ctx.rank,
                        self.layers[nxt].experts.get, self.pool, self.ctx.transfer_group,
                        num_pieces=opts.num_pieces, stream=self.stream, ready_event=ready,
                        hold_back=hold)
                    hooks = _Hooks(nst.transfer)
        st.arrived = arrived
        replica_params = st.transfer.params if st.transfer is not None else None
        self.clock.mark(f"experts{layer}")
        out, stats = self.layers[layer].forward(
            h, topk_ids, topk_weights, quota=quota, arrived=arrived,
            replica_params=replica_params, hooks=_ClockHooks(hooks, self.clock, layer))
        shared = block.shared_forward(h)  # [T, D] or None; shared experts run on every rank
        if shared is not None:
            out = out + shared
        st.fallback = stats.pairs_fallback
        st.pairs = stats.pairs_processed
        if st.transfer is not None:
            t0 = time.perf_counter()
            st.transfer.drain()
            self.exposed_s += time.perf_counter() - t0
            st.transfer = None
            st.plan = None
        if self.device.type == "cuda":
            st.done_event = torch.cuda.Event()
            st.done_event.record()
        self.clock.mark(f"end{layer}")
        return out, LayerRouting(block.layer, h, logits, topk_ids, topk_weights)

    def _buffer_ready_event(self, layer: int):
        """CUDA event after which layer `layer`'s pool buffer is free: the end of the last
        layer that used the same buffer (earlier in this step, or late in the previous one)."""
        if self.device.type != "cuda":
            return None
        nb = self.pool.num_buffers
        prev = layer - nb
        if prev < 0:  # the last layer of the previous step with the same buffer
            prev = max(j for j in range(len(self.blocks)) if j % nb == layer % nb)
        return self.state[prev].done_event

    def close(self) -> None:
        """Give the model its own MoE blocks back and drop transfers and the pool (safe to call
        twice). The wrapped model and the runner reference each other; closing breaks that
        cycle, so the runner (and the process groups it holds through `ctx`) is freed at once,
        not by a later garbage collection, e.g. during interpreter exit."""
        for layer in self.model.layers:
            if layer.is_moe and isinstance(layer.moe, _EPBlock):
                layer.moe = layer.moe.block
        for st in self.state:
            if st.transfer is not None:
                st.transfer.drain()
            st.transfer = None
            st.plan = None
            st.done_event = None
        self.layers = []

    def idle_step(self) -> None:
        """Take part in every MoE layer's collectives with no tokens of this rank."""
        h = torch.zeros((0, self.cfg.hidden_size), dtype=self.dtype, device=self.device)
        for i in range(len(self.blocks)):
            self.run_layer(i, h)

    def breakdown(self) -> dict[str, float]:
        """Seconds per phase summed over the MoE layers of the last step (call after the
        device is synchronised): attention (and norms, dense MLPs) before each MoE layer,
        router + prediction + planning, dispatch, expert compute, combine + drain."""
        c = self.clock
        out = {"attention": 0.0, "route_plan": 0.0, "dispatch": 0.0, "experts": 0.0,
               "combine": 0.0}
        for i in range(len(self.blocks)):
            parts = {"attention": (f"end{i - 1}" if i else "begin", f"start{i}"),
                     "route_plan": (f"start{i}", f"experts{i}"),
                     "dispatch": (f"experts{i}", f"compute{i}"),
                     "experts": (f"compute{i}", f"combine{i}"),
                     "combine": (f"combine{i}", f"end{i}")}
            for key, (a, b) in parts.items():
                sec = c.seconds(a, b)
                out[key] += sec or 0.0
        return out

    def end_step(self) -> StepStats:
        """Close the step: history for the predictor, and group-wide stats (one all_gather)."""
        for st in self.state:
            st.history_load = st.this_load
        L = len(self.blocks)
        local = np.concatenate([
            [st.pairs for st in self.state],
            [st.fallback for st in self.state],
            [0 if st.arrived is None else int(st.arrived[self.ctx.rank].sum())
             for st in self.state],
            [st.planned_exposed for st in self.state],
            [self.bytes_arrived, self.exposed_s, self.plan_s]]).astype(np.float64)
        g = self._all_gather(local, "step stats all_gather")  # [G, 4L+3]
        pairs = g[:, :L].T  # [L, G]
        self.step += 1
        return StepStats(
            layer_ir=imbalance_ratio(pairs),
            pairs_per_rank=pairs.astype(np.int64),
            replicas_planned=np.array([st.num_planned for st in self.state], dtype=np.int64),
            replicas_arrived=g[:, 2 * L:3 * L].sum(axis=0).astype(np.int64),
            fallback_pairs=g[:, L:2 * L].sum(axis=0).astype(np.int64),
            bytes_prefetched_per_rank=g[:, 4 * L].copy(),
            bytes_prefetched=float(g[:, 4 * L].sum()),
            exposed_transfer_s=float(g[:, 4 * L + 1].max()),
            planned_exposed_s=float(g[:, 3 * L:4 * L].max()),
            plan_seconds=float(g[:, 4 * L + 2].max()))


class _ClockHooks(PhaseHooks):
    def __init__(self, inner: PhaseHooks, clock: _Clock, layer: int) -> None:
        self.inner, self.clock, self.layer = inner, clock, layer

    def before_experts(self) -> None:
        self.clock.mark(f"compute{self.layer}")
        self.inner.before_experts()

    def before_combine(self) -> None:
        self.clock.mark(f"combine{self.layer}")
        self.inner.before_combine()

    def after_combine(self) -> None:
        self.inner.after_combine()


def _expert_params(block) -> dict[str, torch.Tensor]:
    params = {"w_gate_up": block.w_gate_up, "w_down": block.w_down}
    if block.cfg.expert_bias:
        params["b_gate_up"] = block.b_gate_up
        params["b_down"] = block.b_down
    return params


def _expert_fn(block):
    """One expert's forward from explicit weights: the same ops as MoEBlock.expert_forward."""
    import torch.nn.functional as F

    def fn(params, x: torch.Tensor) -> torch.Tensor:
        gate_up = F.linear(x, params["w_gate_up"], params.get("b_gate_up"))  # [n, 2F]
        return F.linear(block.activate(gate_up), params["w_down"],
                        params.get("b_down")).to(x.dtype)  # [n, D]

    return fn
