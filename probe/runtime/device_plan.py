"""Planning and splitting on the device: the balancer's no-sync path (the paper's section 4.4).

With `PipelineOptions.plan_on = "device"` (`--plan-on device`) the PROBE policy predicts, plans
and splits with device tensors; at MoE layer l of a step, on every rank:

    main stream    router(h_l) -> this rank's TRUE counts [E] of l (scatter_add);
                   ONE all_gather of [counts_l | arrived_l] int64 [2E] -> [G, 2E];
                   the split of l's TRUE counts over the copies present (home + the replicas
                   that arrived) -> this rank's quota [E, G] (`DeviceSplit`); dispatch.
    side stream    after the router: layer l+1's predicted load [E] from h_l (the predictor's
                   top-k, or the history), ONE all_gather on the plan group -> [S, E]; the
                   greedy plans l+1 (`DeviceGreedy`) -> replica rows [R_max, 3]; a
                   non-blocking copy of the rows to pinned host memory; an event (`PendingPlan`).
    issuer thread  (layer l+1's transfer, `probe.runtime.transfer`): waits for that event, reads
                   the rows and posts the replica transfer.

The main thread never reads a device value inside a MoE layer: the plan reaches the host only
on the transfer's own thread (the host has to know which weights to post), and the replicas
that arrived are a host fact of the transfer. Every rank plans the same deterministic plan
from the same gathered loads and windows (the windows, one float per layer and rank, are
gathered once at the step's start), and splits with the same deterministic kernel on the same
gathered counts, so all ranks agree without a further collective.

On CUDA the planner is `probe.planner.greedy_cuda.CudaGreedy` and the split
`probe.planner.assign_cuda.DeviceAssigner`, both launched on torch's current stream with the
tensors taken through `__cuda_array_interface__` (no copy, no synchronisation). On CPU tensors
(host memory; the gloo tests) the same code path runs their CPU twins, `probe.planner.lean.
LeanGreedy` and `probe.planner.assign.assign_tokens`, on zero-copy numpy views of the tensors
(`host_view`), with the same data layout: replica rows (rank, expert, source) padded with -1
to R_max rows, the quota int64 [E, G]. Both pairs give identical integers (their own tests
require it), so the CPU path is the GPU path's obviously-correct twin.

Shape legend: E experts, G ranks, S source ranks (= G), R_max replica rows of one plan.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from probe.planner import CostModel
from probe.planner.greedy import UNLIMITED_MOVES
from probe.planner.greedy_rules import GreedyRules

__all__ = ["DISPATCH_MOVES", "DeviceGreedy", "DeviceSplit", "PendingPlan", "host_view",
           "plan_rows", "rows_to_plan"]

# The dispatch-time split runs without the assignment's exchange step (`moves=0`, on the GPU and
# in its host twin alike): it sits between the router and the dispatch, and on an H100 one
# layer's assignment as a replayed graph took 2,286 us with the exchange (20 moves) and 346 us
# without it (results/h100, run 5).
DISPATCH_MOVES = 0


def host_view(t: torch.Tensor) -> np.ndarray:
    """A numpy view (no copy) of a CPU tensor's memory, the CPU twin of handing a CUDA tensor
    to a kernel through `__cuda_array_interface__`: nothing is read, moved or synchronised.
    A CUDA tensor is refused (its values would have to be copied to the host)."""
    if t.device.type != "cpu":
        raise ValueError(f"host_view takes CPU tensors (host memory), got one on {t.device}")
    return np.from_dlpack(t.contiguous())


def rows_capacity(num_ranks: int, num_experts: int, num_slots: int,
                  rules: GreedyRules | None = None) -> int:
    """R_max: the replica rows a greedy plan can fill (at most one per move and per slot),
    the row count `CudaGreedy` allocates."""
    rules = rules or GreedyRules()
    limit = rules.max_moves(num_ranks)
    limit = limit if limit > 0 else UNLIMITED_MOVES
    return max(min(num_ranks * min(num_slots, num_experts), limit), 1)


def plan_rows(replicas: np.ndarray, sources: np.ndarray, num_rows: int) -> np.ndarray:
    """int64 [num_rows, 3]: a Plan's replicas bool [G, E] and sources int [G, E] as rows
    (rank, expert, source), row-major, padded with -1 (the layout of `DeviceGreedy.plan`)."""
    cells = np.argwhere(np.asarray(replicas, dtype=bool))  # [n, 2]
    if len(cells) > num_rows:
        raise ValueError(f"plan has {len(cells)} replicas, more than the {num_rows} rows")
    rows = np.full((num_rows, 3), -1, dtype=np.int64)
    rows[:len(cells), :2] = cells
    rows[:len(cells), 2] = np.asarray(sources)[cells[:, 0], cells[:, 1]]
    return rows


def rows_to_plan(rows: np.ndarray, num_ranks: int, num_experts: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(replicas bool [G, E], sources int64 [G, E], -1 where none) of rows int [R_max, 3]
    (rank, expert, source; rows with rank < 0 are padding)."""
    rows = np.asarray(rows, dtype=np.int64)
    rows = rows[rows[:, 0] >= 0]
    replicas = np.zeros((num_ranks, num_experts), dtype=bool)
    sources = np.full((num_ranks, num_experts), -1, dtype=np.int64)
    replicas[rows[:, 0], rows[:, 1]] = True
    sources[rows[:, 0], rows[:, 1]] = rows[:, 2]
    return replicas, sources


class DeviceGreedy:
    """The greedy planner (GreedyRules() defaults, the runtime's "greedy") for one placement,
    slot budget and cost model, on the device of its inputs.

    home: bool [G, E]; num_slots: R per rank; cost: the CostModel; device: where the plans'
    inputs live ("cuda": `CudaGreedy`, one layer per launch; "cpu": `LeanGreedy`).
    """

    def __init__(self, home: np.ndarray, num_slots: int, cost: CostModel,
                 device: torch.device) -> None:
        self.home = np.asarray(home, dtype=bool)
        self.num_ranks, self.num_experts = self.home.shape
        self.device = torch.device(device)
        self.num_rows = rows_capacity(self.num_ranks, self.num_experts, int(num_slots))
        if self.device.type == "cuda":
            from probe.planner.greedy_cuda import CudaGreedy

            self._cuda = CudaGreedy(self.home, int(num_slots), cost, num_layers=1)
            got = self._cuda.out.replicas.shape[1]
            if got != self.num_rows:
                raise RuntimeError(f"CudaGreedy allocates {got} replica rows, expected "
                                   f"{self.num_rows}")
            self._lean = None
        else:
            from probe.planner.lean import LeanGreedy

            self._lean = LeanGreedy(self.home, int(num_slots), cost, bound=False)
            self._cuda = None

    def plan(self, load: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
        """Replica rows int64 [R_max, 3] (rank, expert, source; -1 rows past the plan's) of
        load int64 [S, E] and window float64 [G] seconds, on their device; on CUDA launched on
        the current stream, not synchronised (the rows are a fresh tensor, so the next call
        does not overwrite them)."""
        if self._cuda is not None:
            out = self._cuda.plan(load.contiguous()[None], window.contiguous()[None])
            return out.replicas[0].clone()
        out = self._lean.plan(host_view(load.to(torch.int64)),
                              host_view(window.to(torch.float64)))
        rows = np.full((self.num_rows, 3), -1, dtype=np.int64)
        rows[:len(out.replicas)] = out.replicas
        return torch.from_numpy(rows)


class DeviceSplit:
    """The dispatch-time split of the TRUE counts over the copies present (water-filling, the
    `assign_tokens` default), on the device of its inputs.

    cost: the CostModel; num_experts: E; rank: this rank (its quota row is returned);
    device: "cuda" (`DeviceAssigner`, one layer per launch) or "cpu" (`assign_tokens`).
    """

    def __init__(self, cost: CostModel, num_experts: int, rank: int,
                 device: torch.device) -> None:
        self.cost = cost
        self.rank = int(rank)
        self.device = torch.device(device)
        self._assigner = None
        if self.device.type == "cuda":
            from probe.planner.assign_cuda import DeviceAssigner

            self._assigner = DeviceAssigner(cost, int(num_experts), 1, moves=DISPATCH_MOVES)

    def quota(self, counts: torch.Tensor, copies: torch.Tensor) -> torch.Tensor:
        """int64 [E, G]: this rank's pairs of each expert to run on each rank, from counts
        int64 [S, E] (every rank's true pairs) and copies int64 [G, E] (> 0: present), on
        their device (on CUDA: the assigner's buffer, valid until its next call, which comes
        after this layer's dispatch in stream order)."""
        if self._assigner is not None:
            out, _objective, _status = self._assigner(counts.contiguous()[None],
                                                      copies.contiguous()[None])
            return out[0, self.rank]
        from probe.planner.assign import assign_tokens

        out = assign_tokens(host_view(counts), host_view(copies), self.cost,
                            moves=DISPATCH_MOVES)  # [S, E, G]
        return torch.from_numpy(np.ascontiguousarray(out[self.rank]))


@dataclass
class PendingPlan:
    """One layer's plan made on the device, not yet on the host.

    layer, step: the MoE layer and step it is for. rows: int64 [R_max, 3] on the host (CPU
    memory; on CUDA pinned, written by a non-blocking copy that `ready` follows). ready: the
    CUDA event after that copy (None on CPU: the rows are written already). num_ranks,
    num_experts: G, E. hold_back: (g, e) replicas made late on purpose (tests).
    plan_s / predict_s: host seconds spent planning / predicting it (on CUDA: launching).
    `resolve()` returns (replicas bool [G, E], sources int64 [G, E]) once the rows are in,
    blocking the calling thread (the transfer's issuer thread, or `end_step`) until then.
    """

    layer: int
    step: int
    rows: torch.Tensor
    ready: object
    num_ranks: int
    num_experts: int
    hold_back: tuple[tuple[int, int], ...] = ()
    plan_s: float = 0.0
    predict_s: float = 0.0
    planned_exposed_s: float = 0.0
    _resolved: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    def resolve(self) -> tuple[np.ndarray, np.ndarray]:
        if self._resolved is None:
            if self.ready is not None:
                while not self.ready.query():  # polling: no stream or device synchronisation
                    time.sleep(2e-5)
            self._resolved = rows_to_plan(host_view(self.rows), self.num_ranks,
                                          self.num_experts)
        return self._resolved

    @property
    def num_replicas(self) -> int:
        """Replicas of the plan (resolves it: call off the critical path)."""
        return int(self.resolve()[0].sum())
