"""Deciding where experts run: predict, gather, plan (the paper's section 4.4, first half).

A `Balancer` turns what one MoE layer saw into a `LayerPlan` for the next MoE layer. It never
moves a weight nor a token; the `probe.runtime.executor.Executor` follows its plans.

At MoE layer l of a step, on every rank:

    predict   layer l+1's load of this rank's tokens            (LoadPredictor or history)
    gather    ONE all_gather of a `RankReport` per rank         -> `GroupReport`
    plan      layer l+1 on the gathered [S, E] load and [G] windows -> `LayerPlan`

Every rank gathers the same reports and runs the same deterministic planner, so every rank
holds the same plan without a second collective. The report also carries this rank's arrived
bits for layer l (an execution fact the executor needs from every rank before dispatch; it
rides on the same collective to save one).

Prediction: with a `LoadPredictor` (e.g. a `probe.predictor.PredictorSet`; the frozen router
prior is `probe.predictor.router_prior(model)`), layer l+1's load is the top-k of the
predictor's logits on h_l; with `predictor="history"` it is the TRUE load this rank saw at layer
l+1 in the previous step (zero in the first step).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist

from probe.planner import BalanceProblem, CostModel, Plan, evaluate_plan
from probe.runtime.device_plan import (DEVICE_SPLITS, DevicePlanner, PendingPlan, device_planner,
                                       plan_rows)
from probe.runtime.dist import DistContext, guarded

__all__ = ["Balancer", "GroupReport", "LayerPlan", "LoadPredictor", "RankReport",
           "all_gather_fields", "solve_plan"]


class LoadPredictor(Protocol):
    """What the balancer asks of a predictor (`probe.predictor.PredictorSet` is one)."""

    def __call__(self, layer: int, h_prev: torch.Tensor) -> torch.Tensor:
        """Predicted router logits [T, E] of MoE layer `layer` from h_prev [T, D], the router
        input of MoE layer `layer` - 1."""
        ...


def solve_plan(problem: BalanceProblem, method: str = "greedy") -> Plan:
    """Plan one layer with `probe.planner.solve` (falls back to static if it finds none)."""
    from probe.planner.solve import solve

    result = solve(problem, method, check=False)
    if result.plan is None:
        from probe.planner.static import static_plan

        return static_plan(problem)
    return result.plan


def all_gather_fields(ctx: DistContext, fields: Mapping[str, np.ndarray],
                      name: str) -> dict[str, np.ndarray]:
    """All-gather named float64 arrays in one collective: {name: [*shape]} per rank ->
    {name: [G, *shape]}. The wire layout is the fields in the order given, flattened; every
    rank must pass the same names and shapes. A single process returns [1, *shape]."""
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in fields.items()}
    if ctx.group is None or ctx.world_size == 1:
        return {k: v[None, ...].copy() for k, v in arrays.items()}
    flat = np.concatenate([v.reshape(-1) for v in arrays.values()]) if arrays else np.zeros(0)
    local = torch.as_tensor(flat, dtype=torch.float64)
    if ctx.backend == "nccl":
        local = local.to(ctx.device)
    out = [torch.empty_like(local) for _ in range(ctx.world_size)]
    with guarded(name, ctx.rank, ctx.watchdog):
        dist.all_gather(out, local, group=ctx.group)
    rows = torch.stack(out).cpu().numpy()  # [G, n]
    result, pos = {}, 0
    for key, v in arrays.items():
        result[key] = rows[:, pos:pos + v.size].reshape((ctx.world_size, *v.shape))
        pos += v.size
    return result


@dataclass(frozen=True)
class RankReport:
    """What one rank tells the others at MoE layer l.

    arrived: bool [E], replicas of layer l complete on this rank (see `Executor.arrived`).
    predicted_load: float64 [E], predicted pairs of this rank's tokens at layer l+1.
    window_s: seconds this rank can hide layer l+1's transfer.
    counts: int [E] or None, this rank's TRUE pairs at layer l, sent only when the policy
        splits tokens at dispatch over every rank's counts (`probe.runtime.policies`).
    """

    arrived: np.ndarray
    predicted_load: np.ndarray
    window_s: float
    counts: np.ndarray | None = None


@dataclass(frozen=True)
class GroupReport:
    """Every rank's `RankReport`, stacked (identical on every rank after the gather).

    arrived: bool [G, E]. predicted_load: float64 [S, E]. window_s: float64 [G].
    counts: int64 [S, E] true pairs of layer l, or None when the reports carried none.
    """

    arrived: np.ndarray
    predicted_load: np.ndarray
    window_s: np.ndarray
    counts: np.ndarray | None = None


@dataclass(frozen=True)
class LayerPlan:
    """The balancer's decision for one MoE layer of one step (the same on every rank).

    layer: the MoE layer it is for. step: the step.
    plan: the planner's `Plan` (replicas bool [G, E], sources int64 [G, E], assignment int64
        [S, E, G]).
    hold_back: (g, e) replicas to make late on purpose (tests; empty in serving).
    planned_exposed_s: the cost model's exposed transfer time of the plan (eq. 6).
    predict_s: seconds this rank spent predicting this layer's load.
    plan_s: seconds this rank spent planning this layer.
    """

    layer: int
    step: int
    plan: Plan
    hold_back: tuple[tuple[int, int], ...] = ()
    planned_exposed_s: float = 0.0
    predict_s: float = 0.0
    plan_s: float = 0.0

    @property
    def num_replicas(self) -> int:
        return int(self.plan.replicas.sum())

    def quota(self, rank: int) -> np.ndarray:
        """int64 [E, G]: where rank `rank`'s pairs of each expert should run."""
        return self.plan.assignment[rank]


def _rows_to_host(rows: torch.Tensor, stream) -> tuple[torch.Tensor, object]:
    """(rows on the host, the CUDA event after their copy) of plan rows made on `stream`: a
    non-blocking copy into pinned memory and an event recorded after it on CUDA (the caller
    is inside `torch.cuda.stream(stream)`); on the CPU (stream None) the rows and no event."""
    if stream is None:
        return rows, None
    host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
    host.copy_(rows, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record(stream)
    return host, ready


class Balancer:
    """Predict, gather and plan, one MoE layer ahead.

    Args:
        ctx: process groups and rank (the gather runs on `ctx.group`).
        num_experts: E. top_k: K.
        home: bool [G, E], the static sharded placement.
        cost: the planner's CostModel.
        num_slots: R, replica slots per rank.
        predictor: "history" or a `LoadPredictor`.
        method: planner method for `probe.planner.solve`.
        planner: optional function BalanceProblem -> Plan replacing `method`.
        plan_override: optional function (moe layer, step) -> Plan | None forcing a plan.
        hold_back: optional function (moe layer, step) -> [(g, e)] made late on purpose.
        dtype: dtype the predictor is fed.
    """

    def __init__(self, ctx: DistContext, *, num_experts: int, top_k: int, home: np.ndarray,
                 cost: CostModel, num_slots: int, predictor="history", method: str = "greedy",
                 planner: Callable[[BalanceProblem], Plan] | None = None,
                 plan_override: Callable[[int, int], Plan | None] | None = None,
                 hold_back: Callable[[int, int], list[tuple[int, int]]] | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        if isinstance(predictor, str) and predictor != "history":
            raise ValueError(f"predictor must be 'history' or a LoadPredictor (the frozen router "
                             f"prior: probe.predictor.router_prior(model)), got {predictor!r}")
        self.ctx = ctx
        self.num_experts = int(num_experts)
        self.top_k = int(top_k)
        self.home = np.asarray(home, dtype=bool)
        self.cost = cost
        self.num_slots = int(num_slots)
        self.predictor: LoadPredictor | None = None if isinstance(predictor, str) else predictor
        self.method = method
        self.planner = planner
        self.plan_override = plan_override
        self.hold_back = hold_back
        self.dtype = dtype
        self.history: dict[int, np.ndarray] = {}  # layer -> this rank's true load last step
        self._this_step: dict[int, np.ndarray] = {}
        self._this_step_dev: dict[int, torch.Tensor] = {}  # the same, kept on the device
        self.history_dev: dict[int, torch.Tensor] = {}  # `history` on the device (device path)
        self.device_planner: DevicePlanner | None = None  # set by enable_device_plans
        self.side_stream: torch.cuda.Stream | None = None
        self.device_split = "plan"  # set by enable_device_plans
        self.plan_group = ctx.group

    # -- predict ------------------------------------------------------------------------------
    def observe(self, layer: int, topk_ids: torch.Tensor) -> None:
        """Record this rank's true load [E] at `layer` (the history predictor's next input)."""
        self._this_step[layer] = torch.bincount(topk_ids.reshape(-1).cpu(),
                                                minlength=self.num_experts).numpy()

    def observe_device(self, layer: int, topk_ids: torch.Tensor) -> None:
        """`observe` without a host read: the counts [E] stay on the device until `end_step`
        (scatter_add, not bincount, which reads the largest id back on CUDA)."""
        flat = topk_ids.reshape(-1).to(torch.int64)
        counts = torch.zeros(self.num_experts, dtype=torch.int64, device=flat.device)
        self._this_step_dev[layer] = counts.scatter_add_(0, flat, torch.ones_like(flat))

    def end_step(self) -> None:
        """This step's true loads become the history of the next (the loads observed on the
        device are read back here, once per step)."""
        if self._this_step_dev:
            layers = sorted(self._this_step_dev)
            rows = torch.stack([self._this_step_dev[k] for k in layers]).cpu().numpy()
            self._this_step.update(dict(zip(layers, rows, strict=True)))
            self.history_dev.update(self._this_step_dev)
            self._this_step_dev = {}
        self.history.update(self._this_step)
        self._this_step = {}

    def predict(self, next_layer: int, h: torch.Tensor) -> np.ndarray:
        """float64 [E]: predicted pairs of this rank's tokens at `next_layer`, from h [T, D]
        (the router input of the layer before)."""
        num_experts = self.num_experts
        if self.predictor is not None:
            if h.shape[0] == 0:
                return np.zeros(num_experts)
            logits = self.predictor(next_layer, h.to(self.dtype))  # [T, E]
            ids = torch.topk(logits, self.top_k, dim=-1).indices  # [T, K]
            return torch.bincount(ids.reshape(-1).cpu(),
                                  minlength=num_experts).numpy().astype(np.float64)
        hist = self.history.get(next_layer)
        return np.zeros(num_experts) if hist is None else hist.astype(np.float64)

    # -- gather -------------------------------------------------------------------------------
    def gather(self, layer: int, report: RankReport) -> GroupReport:
        """One all_gather of every rank's report."""
        fields = {"arrived": report.arrived.astype(np.float64),
                  "predicted_load": report.predicted_load,
                  "window_s": np.array(report.window_s)}
        if report.counts is not None:
            fields["counts"] = np.asarray(report.counts, dtype=np.float64)
        got = all_gather_fields(self.ctx, fields, f"plan all_gather (MoE layer {layer})")
        counts = got["counts"].round().astype(np.int64) if "counts" in got else None
        return GroupReport(arrived=got["arrived"] > 0.5, predicted_load=got["predicted_load"],
                           window_s=got["window_s"], counts=counts)

    def gather_arrived(self, layer: int, arrived: np.ndarray, device: torch.device
                       ) -> torch.Tensor:
        """Every rank's arrived bits of `layer`, kept on the device: bool [G, E] (no host
        read; arrived bool [E] is this rank's, a host fact of its transfer)."""
        from probe.runtime.dispatch import to_device

        local = to_device(np.asarray(arrived, dtype=np.uint8), device, torch.uint8)  # [E]
        ctx = self.ctx
        if ctx.group is None or ctx.world_size == 1:
            return local[None].to(torch.bool)
        out = [torch.empty_like(local) for _ in range(ctx.world_size)]
        with guarded(f"arrived all_gather (MoE layer {layer})", ctx.rank, ctx.watchdog):
            dist.all_gather(out, local, group=ctx.group)
        return torch.stack(out).to(torch.bool)  # [G, E]

    def plan_ahead(self, step: int, windows: np.ndarray, num_layers: int
                   ) -> dict[int, LayerPlan]:
        """The plans of MoE layers 1 .. L-1 of this step, made at its start from the history
        (the previous step's true loads) and this rank's windows float [L], with ONE
        all_gather of every rank's [L, E] history and [L] windows. With the history predictor
        these are the plans `decide` makes layer by layer (the same inputs), but no layer
        waits for a host read. Plans are on the sharded home. A `LoadPredictor` needs this
        step's hidden states: use `decide`."""
        if self.predictor is not None:
            raise ValueError("plan_ahead plans from the history; a LoadPredictor needs this "
                             "step's hidden states (decide, layer by layer)")
        zeros = np.zeros(self.num_experts)
        load = np.stack([self.history.get(k, zeros).astype(np.float64)
                         for k in range(num_layers)])  # [L, E]
        got = all_gather_fields(self.ctx, {"load": load,
                                           "window": np.asarray(windows, dtype=np.float64)},
                                f"plan all_gather (step {step})")  # [G, L, E], [G, L]
        plans = {}
        for layer in range(1, num_layers):
            group = GroupReport(arrived=np.zeros((self.ctx.world_size, self.num_experts), bool),
                                predicted_load=got["load"][:, layer],
                                window_s=got["window"][:, layer])
            plans[layer], _ = self.plan(layer, step, group)
        return plans

    # -- the device path (probe.runtime.device_plan) -------------------------------------------
    def enable_device_plans(self, device: torch.device,
                            plan_group: dist.ProcessGroup | None = None, *,
                            graph: bool = False, split: str = "plan") -> None:
        """Plan on the device (`plan_device`): the planner of `method` on `device` (the
        greedy, or the lite planner: `device_plan.DEVICE_PLANNERS`) and, on CUDA, a side
        stream for predicting and planning; the predicted loads are gathered on `plan_group`
        (default `ctx.group`; on NCCL a group of its own keeps that gather from queueing
        behind the dispatch's all-to-alls on one communicator); graph: on CUDA, replay the
        planner's launches from CUDA graphs (`device_plan.Replay`); split: the dispatch-time
        split (`device_plan.DEVICE_SPLITS`; "plan": every `PendingPlan` carries this rank's
        quota of the plan's split)."""
        if split not in DEVICE_SPLITS:
            raise ValueError(f"device split must be one of {DEVICE_SPLITS}, got {split!r}")
        self.device_split = split
        self.device_planner = device_planner(
            self.method, self.home, self.num_slots, self.cost, device, graph=graph,
            split_rank=self.ctx.rank if split == "plan" else None)
        self.side_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        if plan_group is not None:
            self.plan_group = plan_group

    def gather_device(self, local: torch.Tensor, name: str,
                      group: dist.ProcessGroup | None = None) -> torch.Tensor:
        """Every rank's `local` [n] stacked: [G, n] on `local`'s device (one all_gather; no
        host read)."""
        ctx = self.ctx
        if ctx.group is None or ctx.world_size == 1:
            return local[None]
        out = [torch.empty_like(local) for _ in range(ctx.world_size)]
        with guarded(name, ctx.rank, ctx.watchdog):
            dist.all_gather(out, local, group=group if group is not None else ctx.group)
        return torch.stack(out)

    def predict_device(self, next_layer: int, h: torch.Tensor) -> torch.Tensor:
        """`predict` as a device tensor: int64 [E] predicted pairs of this rank's tokens at
        `next_layer` (the predictor's top-k counted with scatter_add, or the history kept on
        the device)."""
        counts = torch.zeros(self.num_experts, dtype=torch.int64, device=h.device)
        if self.predictor is not None:
            if h.shape[0] == 0:
                return counts
            logits = self.predictor(next_layer, h.to(self.dtype))  # [T, E]
            ids = torch.topk(logits, self.top_k, dim=-1).indices.reshape(-1)  # [T K]
            return counts.scatter_add_(0, ids, torch.ones_like(ids))
        return self._history_device(next_layer, h.device)

    def _history_device(self, layer: int, device: torch.device) -> torch.Tensor:
        """int64 [E] on `device`: this rank's true counts of `layer` last step (zeros before
        the first step ends)."""
        hist = self.history_dev.get(layer)
        if hist is None:
            return torch.zeros(self.num_experts, dtype=torch.int64, device=device)
        return hist.to(device=device, dtype=torch.int64)

    def _forced_or_held(self, layer: int, step: int) -> tuple[tuple, PendingPlan | None]:
        """(the replicas `hold_back` makes late at (layer, step), the `PendingPlan` of the plan
        `plan_override` forces there or None): the tests' hooks of the device path."""
        hold = tuple((int(g), int(e)) for g, e in (
            self.hold_back(layer, step) if self.hold_back is not None else ()))
        forced = self.plan_override(layer, step) if self.plan_override is not None else None
        if forced is None:
            return hold, None
        rows = torch.from_numpy(plan_rows(forced.replicas, forced.sources,
                                          self.device_planner.num_rows))
        quota = None
        if self.device_split == "plan":
            quota = torch.as_tensor(np.ascontiguousarray(forced.assignment[self.ctx.rank]),
                                    dtype=torch.int64, device=self.device_planner.device)
        return hold, PendingPlan(layer, step, rows, None, self.ctx.world_size,
                                 self.num_experts, hold, quota=quota)

    def _side_stream(self):
        """The context the device path's planning runs in: on CUDA the side stream, ordered
        after everything the current stream has queued; on the CPU nothing."""
        stream = self.side_stream
        if stream is None:
            return contextlib.nullcontext()
        stream.wait_stream(torch.cuda.current_stream(stream.device))
        return torch.cuda.stream(stream)

    def plan_device(self, layer: int, step: int, h: torch.Tensor,
                    window: torch.Tensor) -> PendingPlan:
        """Predict and plan MoE layer `layer` from h [T, D] (the router input of the layer
        before) with device tensors: on CUDA on the side stream, ordered after everything
        the current stream has queued (the router); one all_gather of the predicted loads
        [E] -> [S, E] on the plan group; the device planner on them and window float64 [G]
        (the gathered windows of `layer`). Returns the `PendingPlan` (the rows reach the host by a
        non-blocking copy; nothing here waits for the device). Plans are on the sharded
        home; `plan_override` (tests) replaces prediction and planning."""
        if self.device_planner is None:
            raise RuntimeError("plan_device needs enable_device_plans(device) first")
        num_ranks = self.ctx.world_size
        hold, forced = self._forced_or_held(layer, step)
        if forced is not None:
            return forced
        stream = self.side_stream
        if stream is not None:
            h.record_stream(stream)  # read there: not freed before the side stream is done
        with self._side_stream():
            t0 = time.perf_counter()
            pred = self.predict_device(layer, h)  # [E]
            t1 = time.perf_counter()
            load = self.gather_device(pred, f"plan all_gather (MoE layer {layer - 1})",
                                      self.plan_group)  # [S, E]
            rows, quota = self.device_planner.plan_split(load, window)  # [R_max, 3]
            rows, ready = _rows_to_host(rows, stream)
            t2 = time.perf_counter()
        return PendingPlan(layer, step, rows, ready, num_ranks, self.num_experts, hold,
                           quota=quota, plan_s=t2 - t1, predict_s=t1 - t0)

    def plan_ahead_device(self, step: int, windows: torch.Tensor, *,
                          from_this_step: bool = False) -> dict[int, PendingPlan]:
        """The device path's plans of MoE layers 1 .. L-1 of step `step` from the history (the
        previous step's true counts, kept on the device) and the gathered
        windows float64 [L, G]: on CUDA on the side stream, ONE all_gather of this rank's
        [L-1, E] history on the plan group -> [S, L-1, E], ONE launch of the device planner
        for the L-1 layers (`plan_layers`), ONE non-blocking copy of the rows to pinned host
        memory and one event that every layer's `PendingPlan` waits for. These are the plans
        `plan_device` makes layer by layer with the history predictor (the same inputs), with
        one gather, launch and copy a step instead of one a layer (the host time of the
        launch is counted on layer 1). `plan_override` and `hold_back` apply per layer as
        there. A `LoadPredictor` needs this step's hidden states: use `plan_device`.
        from_this_step: plan from the counts observed so far this step (each layer's, else its
        history): what the history will be at the next step, so that the next step's plans
        can be launched at this step's last MoE layer (`step` is then the next step's)."""
        if self.predictor is not None:
            raise ValueError("plan_ahead_device plans from the history; a LoadPredictor needs "
                             "this step's hidden states (plan_device, layer by layer)")
        if self.device_planner is None:
            raise RuntimeError("plan_ahead_device needs enable_device_plans(device) first")
        num_ranks, num_experts = self.ctx.world_size, self.num_experts
        layers = range(1, int(windows.shape[0]))
        if not layers:
            return {}
        with self._side_stream():
            t0 = time.perf_counter()
            hist = torch.stack([self._this_step_dev[k].to(windows.device, torch.int64)
                                if from_this_step and k in self._this_step_dev
                                else self._history_device(k, windows.device)
                                for k in layers])  # [L-1, E]
            load = self.gather_device(hist.reshape(-1), f"plan all_gather (step {step})",
                                      self.plan_group)  # [S, (L-1) E]
            load = load.reshape(num_ranks, len(layers), num_experts).permute(1, 0, 2)
            rows, quotas = self.device_planner.plan_layers_split(
                load.contiguous(), windows[1:].contiguous())  # [L-1, R, 3], [L-1, E, G]
            rows, ready = _rows_to_host(rows, self.side_stream)
            plan_s = time.perf_counter() - t0
        plans = {}
        for i, layer in enumerate(layers):
            hold, forced = self._forced_or_held(layer, step)
            plans[layer] = forced if forced is not None else PendingPlan(
                layer, step, rows[i], ready, num_ranks, num_experts, hold,
                quota=None if quotas is None else quotas[i], plan_s=plan_s if i == 0 else 0.0)
        return plans

    # -- plan ---------------------------------------------------------------------------------
    def problem(self, load: np.ndarray, window: np.ndarray,
                base: np.ndarray | None = None) -> BalanceProblem:
        """The planning instance of one layer: load [S, E] (whole counts), window [G], on the
        base layout bool [G, E] (None: the sharded home)."""
        return BalanceProblem.from_load(np.asarray(load).astype(np.int64), self.cost,
                                        self.num_slots, np.asarray(window, dtype=np.float64),
                                        self.home if base is None else base)

    def solve(self, problem: BalanceProblem) -> Plan:
        return self.planner(problem) if self.planner is not None \
            else solve_plan(problem, self.method)

    def plan(self, layer: int, step: int, group: GroupReport,
             base: np.ndarray | None = None) -> tuple[LayerPlan, float]:
        """The plan of MoE layer `layer` from the gathered reports, on the base layout bool
        [G, E] (None: the sharded home). Returns it and the seconds spent planning."""
        t0 = time.perf_counter()
        problem = self.problem(group.predicted_load.round(), group.window_s, base)
        plan = self.plan_override(layer, step) if self.plan_override is not None else None
        if plan is None:
            plan = self.solve(problem)
        exposed = evaluate_plan(problem, plan).exposed_transfer
        hold = self.hold_back(layer, step) if self.hold_back is not None else ()
        plan_s = time.perf_counter() - t0
        return LayerPlan(layer=layer, step=step, plan=plan,
                         hold_back=tuple((int(g), int(e)) for g, e in hold),
                         planned_exposed_s=float(exposed), plan_s=plan_s), plan_s

    def decide(self, layer: int, step: int, h: torch.Tensor, arrived: np.ndarray,
               window_s: float, *, has_next: bool, counts: np.ndarray | None = None,
               base: np.ndarray | None = None) -> tuple[GroupReport, LayerPlan | None]:
        """At MoE layer `layer`: predict and plan layer `layer` + 1 (when `has_next`) on the
        base layout bool [G, E] (None: the sharded home), and gather every rank's arrived
        bits of `layer` (and, given, its true counts int [E] of `layer`). arrived: bool [E]
        of this rank."""
        t0 = time.perf_counter()
        pred = self.predict(layer + 1, h) if has_next else np.zeros(self.num_experts)
        predict_s = time.perf_counter() - t0
        group = self.gather(layer, RankReport(arrived=np.asarray(arrived, dtype=bool),
                                              predicted_load=pred,
                                              window_s=window_s if has_next else 0.0,
                                              counts=counts))
        if not has_next:
            return group, None
        layer_plan, _ = self.plan(layer + 1, step, group, base)
        return group, replace(layer_plan, predict_s=predict_s)
