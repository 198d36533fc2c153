"""Following a plan: transfer, dispatch, experts, combine (the paper's section 4.4, second half).

The `Executor` owns what moves: the replica `SlotPool`, the split-phase transfers (one per
planned layer, all sharing one `IssueGate`), and the expert-parallel layers. It takes
`LayerPlan`s from the `probe.runtime.balancer.Balancer` and never decides anything itself.

Per MoE layer l:

    arrived(l)            which of l's replicas are complete on this rank (non-blocking)
    prefetch(plan of l+1) a transfer into buffer (l+1) % 2; its issuer thread first waits
                          (off the main thread) for the previous transfer into that buffer
    run(l)                dispatch following plan_l and the gathered arrived bits (a replica
                          not complete on its rank is skipped: its pairs go home), expert
                          compute (l+1's phase 1 may be posted), pause, combine, resume (l+1's
                          phase 2 may be posted; it runs during l+1's attention)
    finish_layer(l)       forget l's transfer; pieces still in flight keep running and are
                          counted as late replicas, never waited for

Nothing on the main thread or the main stream waits for a transfer, except with
`wait_for_replicas=True` (then the wait is measured as exposed transfer time).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from probe.runtime.balancer import LayerPlan
from probe.runtime.device_plan import PendingPlan
from probe.runtime.dist import DistContext
from probe.runtime.ep import EPMoELayer, LayerStats, PhaseHooks
from probe.runtime.transfer import IssueGate, SlotPool, SplitPhaseTransfer

__all__ = ["Executor"]


class _TransferHooks(PhaseHooks):
    """The allowed phases of the next layer's transfer inside layer l's MoE."""

    def __init__(self, transfer: SplitPhaseTransfer | None, gate: IssueGate,
                 marks: PhaseHooks | None = None) -> None:
        self.transfer, self.gate, self.marks = transfer, gate, marks or PhaseHooks()

    def before_experts(self) -> None:
        self.marks.before_experts()
        if self.transfer is not None:
            self.transfer.start()

    def before_combine(self) -> None:
        self.marks.before_combine()
        self.gate.pause()  # no transfer posts a piece during the combine

    def after_combine(self) -> None:
        self.marks.after_combine()
        if self.transfer is not None:
            self.transfer.resume()
        else:
            self.gate.resume()


class Executor:
    """Transfers, dispatch, experts and combine of this rank, following `LayerPlan`s.

    Args:
        ctx: process groups and rank.
        layers: the EP layers, one per MoE layer.
        pool: this rank's replica slots (two buffers).
        num_pieces: pieces per weight tensor.
        max_in_flight: pieces a transfer has posted and not completed, at most.
        wait_for_replicas: block until a layer's (not held-back) replicas are in instead of
            skipping late ones; the wait counts as exposed transfer time.
        stream: the CUDA stream transfers post from (None on CPU).
        source_params: function (layer, e) -> weights of expert e that this rank sends as a
            replica source (None: its home experts; PROBE-on-EPLB also sends resident copies).
    """

    def __init__(self, ctx: DistContext, layers: list[EPMoELayer], pool: SlotPool, *,
                 num_pieces: int = 4, max_in_flight: int = 8, wait_for_replicas: bool = False,
                 stream: torch.cuda.Stream | None = None, source_params=None) -> None:
        self.ctx = ctx
        self.layers = layers
        self.pool = pool
        self.num_pieces = int(num_pieces)
        self.max_in_flight = int(max_in_flight)
        self.wait_for_replicas = bool(wait_for_replicas)
        self.stream = stream
        self.source_params = source_params
        self.gate = IssueGate()
        self.plans: dict[int, LayerPlan | PendingPlan] = {}
        self.transfers: dict[int, SplitPhaseTransfer] = {}
        self._last_in_buffer: dict[int, SplitPhaseTransfer] = {}
        self._held: list[SplitPhaseTransfer] = []
        self._done_events: dict[int, torch.cuda.Event] = {}

    def arrived(self, layer: int) -> tuple[np.ndarray, float]:
        """bool [E]: layer `layer`'s replicas complete on this rank, and the seconds waited
        for them (0 unless `wait_for_replicas`)."""
        transfer = self.transfers.get(layer)
        num_experts = self.layers[layer].num_experts
        if transfer is None:
            return np.zeros(num_experts, dtype=bool), 0.0
        if not self.wait_for_replicas:
            return transfer.arrived(), 0.0
        t0 = time.perf_counter()
        arrived = transfer.wait_posted()
        return arrived, time.perf_counter() - t0

    def prefetch(self, layer_plan: LayerPlan | PendingPlan) -> SplitPhaseTransfer:
        """Create the transfer of `layer_plan`'s replicas (its pieces wait for `start()`); a
        `PendingPlan` (made on the device) is read on the transfer's issuer thread."""
        layer = layer_plan.layer
        if isinstance(layer_plan, PendingPlan):  # made on the device: resolved by the issuer
            replicas, sources = layer_plan.resolve, None
        else:
            replicas, sources = layer_plan.plan.replicas, layer_plan.plan.sources
        buffer = self.pool.buffer_of(layer)
        send_from = (self.layers[layer].experts.get if self.source_params is None
                     else lambda e, layer=layer: self.source_params(layer, e))
        transfer = SplitPhaseTransfer(
            layer, replicas, sources, self.ctx.rank, send_from,
            self.pool, self.ctx.transfer_group, num_pieces=self.num_pieces, stream=self.stream,
            ready_event=self._ready_event(layer), hold_back=layer_plan.hold_back,
            gate=self.gate, after=self._last_in_buffer.get(buffer),
            max_in_flight=self.max_in_flight, num_experts=self.layers[layer].num_experts)
        self.plans[layer] = layer_plan
        self.transfers[layer] = transfer
        self._last_in_buffer[buffer] = transfer
        return transfer

    def run(self, layer: int, h: torch.Tensor, topk_ids: torch.Tensor,
            topk_weights: torch.Tensor, arrived: np.ndarray, *,
            next_transfer: SplitPhaseTransfer | None = None,
            marks: PhaseHooks | None = None, quota: np.ndarray | None = None,
            present: np.ndarray | None = None, resident_params=None,
            capacity: int | None = None, mine: np.ndarray | None = None,
            ) -> tuple[torch.Tensor, LayerStats]:
        """Dispatch, experts and combine of layer `layer` (see `EPMoELayer.forward`).

        arrived: bool [G, E], every rank's complete replicas of this layer (gathered).
        next_transfer: the next layer's transfer, posted in the allowed phases.
        marks: timing hooks called at the same points.
        quota: int [E, G], this rank's split computed at dispatch on the true counts
            (`probe.runtime.policies.dispatch_quota`), replacing the plan's.
        present: bool [G, E], non-home copies usable now (resident layout + arrived
            replicas), replacing `arrived` for the dispatch; resident_params: e -> weights
            of this rank's resident copy of e (used where no per-step replica arrived).
        capacity: C rows per peer: fixed-capacity dispatch (`probe.runtime.dispatch`); then
            `arrived` may be a device tensor, with `mine` bool [E] its row of this rank on the
            host (the replicas this rank runs).
        """
        layer_plan = self.plans.get(layer)
        transfer = self.transfers.get(layer)
        if quota is None and isinstance(layer_plan, PendingPlan):
            raise ValueError(f"MoE layer {layer}: a plan made on the device carries no split; "
                             "pass the dispatch-time quota")
        if quota is None:
            quota = layer_plan.quota(self.ctx.rank) if layer_plan is not None else None
        if mine is None:
            mine = np.asarray(arrived)[self.ctx.rank]
        runs = mine if present is None else np.asarray(present)[self.ctx.rank]  # non-home
        if transfer is not None:
            transfer.order_after(mine)
        replica_params = transfer.params if transfer is not None else None
        if resident_params is not None:
            mine = mine if transfer is not None else None

            def replica_params(e, mine=mine, transfer=transfer):
                if mine is not None and mine[e] and int(e) in transfer.slot_of:
                    return transfer.params(e)
                return resident_params(e)

        return self.layers[layer].forward(
            h, topk_ids, topk_weights, quota=quota,
            arrived=arrived if present is None else present,
            replica_params=replica_params,
            hooks=_TransferHooks(next_transfer, self.gate, marks), capacity=capacity,
            replica_ids=None if capacity is None else np.flatnonzero(runs).tolist())

    def finish_layer(self, layer: int) -> None:
        """Layer `layer` has dispatched: forget its plan and transfer without waiting (a late
        transfer keeps running; the next transfer into its buffer waits for it, off the main
        thread). Held-back pieces are released at `end_step`."""
        self.plans.pop(layer, None)
        transfer = self.transfers.pop(layer, None)
        if transfer is not None and transfer.holds_pieces:
            self._held.append(transfer)
        if self.stream is not None:
            event = torch.cuda.Event()
            event.record()
            self._done_events[layer] = event

    def end_step(self) -> None:
        """Release the held-back pieces of this step's transfers (tests' late replicas)."""
        for transfer in self._held:
            transfer.release_held()
        self._held = []

    def _ready_event(self, layer: int):
        """CUDA event after which layer `layer`'s buffer is no longer read: the end of the
        last layer that used the same buffer (earlier in this step, or in the previous)."""
        if self.stream is None:
            return None
        num_buffers = self.pool.num_buffers
        same = [j for j in self._done_events if j % num_buffers == layer % num_buffers]
        prev = layer - num_buffers
        if prev in self._done_events:
            return self._done_events[prev]
        return self._done_events[max(same)] if same else None

    def drain(self) -> None:
        """Block until every transfer (late and held-back pieces included) has finished; the
        weights they read may then be overwritten (an EPLB re-plan at a step boundary)."""
        for transfer in [*self.transfers.values(), *self._last_in_buffer.values(), *self._held]:
            transfer.join()

    def close(self) -> None:
        """Let every transfer finish (held pieces released) and drop them; a collective-free
        shutdown step: peers run the same transfers, so all complete."""
        for transfer in [*self.transfers.values(), *self._last_in_buffer.values(), *self._held]:
            transfer.join()
        self.transfers = {}
        self.plans = {}
        self._last_in_buffer = {}
        self._held = []
        self._done_events = {}
