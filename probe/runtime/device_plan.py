"""Planning and splitting on the device: the balancer's no-sync path (the paper's section 4.4).

With `PipelineOptions.plan_on = "device"` (`--plan-on device`) the PROBE policy predicts, plans
and splits with device tensors; at MoE layer l of a step, on every rank:

    main stream    router(h_l) -> this rank's TRUE counts [E] of l (scatter_add);
                   ONE all_gather of [counts_l | arrived_l] int64 [2E] -> [G, 2E] (the
                   arrived bits alone, [E], with the plan's split);
                   this rank's quota [E, G]: the plan of l's own split (device_split "plan",
                   the default: made with the plan, the stream waits for its event on the
                   device) or the split of l's TRUE counts over the copies present (home +
                   the replicas that arrived; "waterfill", `DeviceSplit`); dispatch.
    side stream    after the router: layer l+1's predicted load [E] from h_l (the predictor's
                   top-k, or the history), ONE all_gather on the plan group -> [S, E]; the
                   planner plans l+1 (`DeviceGreedy`, or `DeviceLite` with method "lite")
                   -> replica rows [R_max, 3] (and with the plan's split this rank's quota of
                   it, `plan_quota`); a non-blocking copy of the rows to pinned host memory;
                   an event (`PendingPlan`).
    issuer thread  (layer l+1's transfer, `probe.runtime.transfer`): waits for that event, reads
                   the rows and posts the replica transfer.

The main thread never reads a device value inside a MoE layer: the plan reaches the host only
on the transfer's own thread (the host has to know which weights to post), and the replicas
that arrived are a host fact of the transfer. Every rank plans the same deterministic plan
from the same gathered loads and windows (the windows, one float per layer and rank, are
gathered once at the step's start), and splits with the same deterministic kernel on the same
gathered counts, so all ranks agree without a further collective.

On CUDA the planner is `probe.planner.greedy_cuda.CudaGreedy` (method "greedy", the default) or
`probe.planner.lite_cuda.CudaLite` (method "lite": the same kind of plan by the lite planner's
rules; one ep=8 layer replayed from a graph took 49.5 us on an H100 against 370 us for the
greedy's kernel, docs/planner.md) and the split `probe.planner.assign_cuda.DeviceAssigner`,
all launched on torch's current stream with the tensors taken through
`__cuda_array_interface__` (no copy, no synchronisation). On CPU tensors (host memory; the gloo
tests) the same code path runs their CPU twins, `probe.planner.lean.LeanGreedy` (or
`probe.planner.lite.lite_arrays`) and `probe.planner.assign.assign_tokens`, on zero-copy numpy
views of the tensors
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

__all__ = ["DEVICE_PLANNERS", "DEVICE_SPLITS", "DISPATCH_MOVES", "DeviceGreedy", "DeviceLite",
           "DevicePlanner", "DeviceSplit", "PendingPlan", "Replay", "device_planner",
           "host_view", "plan_quota", "plan_rows", "rows_to_plan"]

# The dispatch-time split runs without the assignment's exchange step (`moves=0`, on the GPU and
# in its host twin alike): it sits between the router and the dispatch, and on an H100 one
# layer's assignment as a replayed graph took 2,286 us with the exchange (20 moves) and 346 us
# without it (results/h100, run 5).
DISPATCH_MOVES = 0

# The device path's dispatch-time split (`PipelineOptions.device_split`): "plan" (the default),
# the plan's own token split (this rank's row, `plan_quota`, made with the plan on the side
# stream and scaled to the true counts by the dispatch, as the host path's PROBE policy runs
# its plans: no solve between the router and the dispatch), or "waterfill", the TRUE counts
# split over the copies present (`DeviceSplit`; one ep=8 layer took 346 us on an H100 as a
# replayed graph, results/h100 run 5, for a median IR 1% lower on plans made a step ahead,
# results/split_choice).
DEVICE_SPLITS = ("plan", "waterfill")


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


class Replay:
    """A CUDA launch captured once into a CUDA graph and replayed: `fn(*inputs)` on static
    input buffers of the given (shape, dtype) pairs, zero at the capture (the graph does not
    depend on their values); each call copies its arguments into them, replays the graph on
    the current stream and returns fn's output (its own buffer, rewritten by the next call).
    The capture (a warm-up launch and the capture on a side stream) synchronises the device
    once: make it before the steps run."""

    def __init__(self, fn, inputs: list[tuple[tuple[int, ...], torch.dtype]],
                 device: torch.device) -> None:
        from probe.planner.numba_cuda import capture_graph

        self.inputs = [torch.zeros(shape, dtype=dtype, device=device) for shape, dtype in inputs]
        self.graph = torch.cuda.CUDAGraph()
        self.output = capture_graph(self.graph, lambda: fn(*self.inputs), device)

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        for buf, arg in zip(self.inputs, args, strict=True):
            buf.copy_(arg)
        self.graph.replay()
        return self.output


def plan_quota(load: torch.Tensor, owner: torch.Tensor, blk_expert: torch.Tensor,
               blk_assign: torch.Tensor, rank: int) -> torch.Tensor:
    """Rank `rank`'s row of L plans' token split: int64 [L, E, G], where the rank's pairs of
    each expert should run, from the planners' compact output on any device, with no host
    read: load int64 [L, S, E] (what was planned), owner int64 [E] (each expert's one home),
    blk_expert int64 [L, B] (the experts whose tokens moved, -1 past the plan's) and
    blk_assign int64 [L, B, S, G] (their [S, G] blocks). An expert that did not move keeps the
    static split: all of its pairs at its home; a moved one, its block's row `rank`. The
    plan's `Plan.assignment[rank]` (a host plan's `LayerPlan.quota`), entry for entry."""
    num_layers, _, num_experts = load.shape
    num_ranks = blk_assign.shape[-1]
    quota = torch.zeros((num_layers, num_experts + 1, num_ranks), dtype=torch.int64,
                        device=load.device)  # row E: the padding blocks' sink
    quota[:, :num_experts].scatter_(2, owner.expand(num_layers, num_experts)[..., None],
                                    load[:, rank, :, None].to(torch.int64))
    where = torch.where(blk_expert >= 0, blk_expert, num_experts)  # [L, B]
    quota.scatter_(1, where[..., None].expand(-1, -1, num_ranks),
                   blk_assign[:, :, rank, :].to(torch.int64))
    return quota[:, :num_experts]


class DevicePlanner:
    """What the device planners share: `plan(load, window)` on the device of the inputs, and on
    CUDA the launch either made eagerly from Python at every call or replayed from a CUDA graph
    (`graph=True`, `Replay`: captured at `capture` or the first plan), so that the host pays a
    graph launch instead of Numba's argument handling (gpu_lite's "eager" column: about 400 us
    a plan at ep=8 against 46 us on the GPU, H100 run 18). The graph's plans are the eager
    launch's (the same kernel on the same values). With `split_rank` set (a rank), every plan
    also gives that rank's row of the plan's token split (`plan_split`, `plan_quota`, made in
    the same launch or graph), the dispatch's quota under `PipelineOptions.device_split`
    "plan".

    Subclasses set num_ranks, num_experts, num_rows, home, split_rank and call `_set_cuda`
    (which makes `_cuda` on CUDA), and define `_new_cuda(num_layers)` (the CUDA planner) and
    `_host_plan(load, window)` (CPU: the CPU twin's numpy replica rows [n, 3], blk_expert [B]
    and blk_assign [B, S, G])."""

    num_ranks: int
    num_experts: int
    num_rows: int
    home: np.ndarray
    device: torch.device
    graph: bool = False
    split_rank: int | None = None
    _cuda = None
    _replay: Replay | None = None
    _multi: dict
    _owner: torch.Tensor | None = None

    def _set_cuda(self, split_rank: int | None) -> None:
        """The split's rank and owners checked; on CUDA, the one-layer planner and its row
        count checked; the L-layer launches (`plan_layers`) are made when first asked for."""
        self._multi = {}
        if split_rank is not None:
            if isinstance(split_rank, bool) or not isinstance(split_rank, (int, np.integer)) \
                    or not 0 <= split_rank < self.num_ranks:
                raise ValueError(f"split_rank must be a rank in [0, {self.num_ranks}), got "
                                 f"{split_rank!r}")
            holders = self.home.sum(axis=0)
            if (holders != 1).any():
                e = int(np.flatnonzero(holders != 1)[0])
                raise ValueError(f"the plan's split needs one home per expert; expert {e} has "
                                 f"{int(holders[e])}")
            self.split_rank = int(split_rank)
            self._owner = torch.as_tensor(self.home.argmax(axis=0).astype(np.int64),
                                          device=self.device)
        if self.device.type != "cuda":
            return
        self._cuda = self._new_cuda(1)
        got = self._cuda.out.replicas.shape[1]
        if got != self.num_rows:
            raise RuntimeError(f"{type(self._cuda).__name__} allocates {got} replica rows, "
                               f"expected {self.num_rows}")

    def plan(self, load: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
        """Replica rows int64 [R_max, 3] (rank, expert, source; -1 rows past the plan's) of
        load int64 [S, E] and window float64 [G] seconds, on their device; on CUDA launched on
        the current stream, not synchronised (the rows are a fresh tensor, so the next call
        does not overwrite them)."""
        return self.plan_split(load, window)[0]

    def plan_split(self, load: torch.Tensor, window: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(`plan`'s rows, `split_rank`'s quota int64 [E, G] of the plan's split or None when
        split_rank is None), fresh tensors on the inputs' device."""
        if self._cuda is None:
            load = load.to(torch.int64)
            rep, blk_e, blk_a = self._host_plan(host_view(load),
                                                host_view(window.to(torch.float64)))
            rows = np.full((self.num_rows, 3), -1, dtype=np.int64)
            rows[:len(rep)] = rep
            quota = None
            if self.split_rank is not None:
                quota = plan_quota(load[None], self._owner, torch.as_tensor(blk_e)[None],
                                   torch.as_tensor(blk_a)[None], self.split_rank)[0]
            return torch.from_numpy(rows), quota
        if not self.graph:
            out = self._launch(load.contiguous(), window.contiguous())
        else:
            self.capture()
            out = self._replay(load, window)
        return out[0].clone(), None if out[1] is None else out[1].clone()

    def capture(self) -> None:
        """Capture the launch into a CUDA graph (graph=True on CUDA; once; see `Replay`)."""
        if self._cuda is None or not self.graph or self._replay is not None:
            return
        self._replay = Replay(self._launch, [((self.num_ranks, self.num_experts), torch.int64),
                                             ((self.num_ranks,), torch.float64)], self.device)

    def plan_layers(self, load: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
        """`plan` of L layers at once: rows int64 [L, R_max, 3] of load int64 [L, S, E] and
        window float64 [L, G]; on CUDA ONE launch of the kernel with a block per layer (the
        blocks run side by side), eager or replayed from a graph of its own per L as `plan`,
        not synchronised; on the CPU the CPU twin layer by layer (the same rows as `plan`)."""
        return self.plan_layers_split(load, window)[0]

    def plan_layers_split(self, load: torch.Tensor, window: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(`plan_layers`' rows, the quotas int64 [L, E, G] of `split_rank` or None), as
        `plan_split` layer by layer."""
        num_layers = int(load.shape[0])
        if self._cuda is None:
            got = [self.plan_split(load[k], window[k]) for k in range(num_layers)]
            rows = torch.stack([r for r, _ in got])
            return rows, None if self.split_rank is None else torch.stack([q for _, q in got])
        multi = self._multi.get(num_layers)
        if multi is None:
            kernel = self._new_cuda(num_layers)

            def launch(x, w, kernel=kernel):
                return self._outputs(kernel.plan(x, w), x)

            multi = launch
            if self.graph:
                multi = Replay(launch, [((num_layers, self.num_ranks, self.num_experts),
                                         torch.int64),
                                        ((num_layers, self.num_ranks), torch.float64)],
                               self.device)
            self._multi[num_layers] = multi
        rows, quota = multi(load.contiguous(), window.contiguous())
        return rows.clone(), None if quota is None else quota.clone()

    def _new_cuda(self, num_layers: int):
        """The CUDA planner (CudaGreedy or CudaLite) for num_layers layers a launch."""
        raise NotImplementedError

    def _outputs(self, out, load: torch.Tensor) -> tuple:
        """(rows [L, R_max, 3], quotas [L, E, G] or None) of a CUDA planner's output `out` for
        load [L, S, E] (its buffers, and the quotas computed on the current stream)."""
        if self.split_rank is None:
            return out.replicas, None
        return out.replicas, plan_quota(load, self._owner, out.blk_expert, out.blk_assign,
                                        self.split_rank)

    def _launch(self, load: torch.Tensor, window: torch.Tensor) -> tuple:
        """One layer's launch on CUDA: (the kernel's replica rows [R_max, 3], the quota [E, G]
        or None)."""
        rows, quota = self._outputs(self._cuda.plan(load[None], window[None]), load[None])
        return rows[0], None if quota is None else quota[0]


class DeviceGreedy(DevicePlanner):
    """The greedy planner (GreedyRules() defaults, the runtime's "greedy") for one placement,
    slot budget and cost model, on the device of its inputs.

    home: bool [G, E]; num_slots: R per rank; cost: the CostModel; device: where the plans'
    inputs live ("cuda": `CudaGreedy`, one layer per launch, or L with `plan_layers`; "cpu":
    `LeanGreedy`); graph: on CUDA, replay the launch from a CUDA graph (`DevicePlanner`).
    """

    def __init__(self, home: np.ndarray, num_slots: int, cost: CostModel,
                 device: torch.device, *, graph: bool = False,
                 split_rank: int | None = None) -> None:
        self.home = np.asarray(home, dtype=bool)
        self.num_ranks, self.num_experts = self.home.shape
        self.device = torch.device(device)
        self.graph = bool(graph)
        self.num_rows = rows_capacity(self.num_ranks, self.num_experts, int(num_slots))
        self.num_slots, self.cost = int(num_slots), cost
        self._lean = None
        if self.device.type != "cuda":
            from probe.planner.lean import LeanGreedy

            self._lean = LeanGreedy(self.home, int(num_slots), cost, bound=False)
        self._set_cuda(split_rank)

    def _new_cuda(self, num_layers: int):
        from probe.planner.greedy_cuda import CudaGreedy

        return CudaGreedy(self.home, self.num_slots, self.cost, num_layers=num_layers)

    def _host_plan(self, load: np.ndarray, window: np.ndarray) -> tuple:
        got = self._lean.plan(load, window)
        return got.replicas, got.blk_expert, got.blk_assign


def lite_threads(num_ranks: int) -> int:
    """CudaLite's threads per block for a layer of num_ranks ranks: the fastest of the block
    sizes gpu_lite timed on an H100 (results/h100/run18: 128 at ep=8, where the small-layer
    kernel plans; 512 at ep=64, 625 against 1,208 us at 128)."""
    return 128 if num_ranks <= 16 else 512


class DeviceLite(DevicePlanner):
    """The lite planner (`LiteRules()` defaults, the runtime's method "lite") for one placement,
    slot budget and cost model, on the device of its inputs: the same replica rows as
    `DeviceGreedy`, made by the rules of probe.planner.lite.

    home: bool [G, E]; num_slots: R per rank; cost: the CostModel; device: "cuda" (`CudaLite`,
    one layer per launch, or L with `plan_layers`; the small-layer kernel where it fits) or
    "cpu" (`lite.lite_arrays`, the CPU kernel the GPU kernels' tests compare with, entry for
    entry); graph: on CUDA, replay the launch from a CUDA graph (`DevicePlanner`). On an H100
    one layer took 38-46 us at ep=8 / 128 experts chained on a stream, against about 370 us
    for the greedy's kernel (docs/planner.md, "The lite planner"). A layer the kernel rejects
    (a negative count, a window below 0: `lite.STATUS_ERRORS`) gets no replica on CUDA and a
    ValueError on the CPU.
    """

    def __init__(self, home: np.ndarray, num_slots: int, cost: CostModel,
                 device: torch.device, *, graph: bool = False,
                 split_rank: int | None = None) -> None:
        from probe.planner import lite
        from probe.planner.problem import BalanceProblem

        # Validate home, slots and cost once, as a BalanceProblem does (zero load).
        shape = BalanceProblem(np.zeros(np.shape(home), np.int64), home, int(num_slots), 0.0,
                               cost)
        self.home = shape.home
        self.num_ranks, self.num_experts = self.home.shape
        self.device = torch.device(device)
        self.graph = bool(graph)
        self.rules = lite.LiteRules()
        # The CPU kernel's arguments but load (0) and windows (3), in its exact dtypes.
        self._args = lite.kernel_args(shape, self.rules)
        self.num_rows = max(int(self._args[-2]), 1)  # every slot: lite.plan_limits
        self.num_slots, self.cost = int(num_slots), cost
        self._set_cuda(split_rank)

    def _new_cuda(self, num_layers: int):
        from probe.planner.lite_cuda import CudaLite

        return CudaLite(self.home, self.num_slots, self.cost, self.rules,
                        num_layers=num_layers, threads=lite_threads(self.num_ranks))

    def _host_plan(self, load: np.ndarray, window: np.ndarray) -> tuple:
        from probe.planner import lite

        args = list(self._args)
        args[0] = np.ascontiguousarray(load)
        args[3] = lite.windows_ticks(window)
        status, rep, blk_expert, blk_assign = lite.lite_arrays(*args)[:4]
        if status:
            raise ValueError(f"lite planner: {lite.STATUS_ERRORS[int(status)]}")
        return rep, blk_expert, blk_assign


# The device planners by the runtime's planner method (`PipelineOptions.method`; a method's
# plain-Python twin plans what the method plans, so it takes the same device planner).
DEVICE_PLANNERS = {"greedy": DeviceGreedy, "greedy_ref": DeviceGreedy, "lite": DeviceLite,
                   "lite_ref": DeviceLite}


def device_planner(method: str, home: np.ndarray, num_slots: int, cost: CostModel,
                   device: torch.device, *, graph: bool = False,
                   split_rank: int | None = None) -> DevicePlanner:
    """The device planner of planner method `method` (a key of DEVICE_PLANNERS); graph: on
    CUDA, replay its launch from a CUDA graph; split_rank: also give that rank's quota of
    each plan's token split (`DevicePlanner.plan_split`)."""
    if method not in DEVICE_PLANNERS:
        raise ValueError(f"plan_on='device' plans with method {sorted(DEVICE_PLANNERS)}, got "
                         f"{method!r}")
    return DEVICE_PLANNERS[method](home, num_slots, cost, device, graph=graph,
                                   split_rank=split_rank)


class DeviceSplit:
    """The dispatch-time split of the TRUE counts over the copies present (water-filling, the
    `assign_tokens` default), on the device of its inputs.

    cost: the CostModel (G ranks: its token_time is [G, G]); num_experts: E; rank: this rank
    (its quota row is returned); device: "cuda" (`DeviceAssigner`, one layer per launch) or
    "cpu" (`assign_tokens`); graph: on CUDA, replay the launch from a CUDA graph (`Replay`,
    captured at `capture` or the first split).
    """

    def __init__(self, cost: CostModel, num_experts: int, rank: int,
                 device: torch.device, *, graph: bool = False) -> None:
        self.cost = cost
        self.rank = int(rank)
        self.device = torch.device(device)
        self.num_ranks = int(np.shape(cost.token_time)[0])
        self.num_experts = int(num_experts)
        self.graph = bool(graph)
        self._assigner = None
        self._replay: Replay | None = None
        if self.device.type == "cuda":
            from probe.planner.assign_cuda import DeviceAssigner

            self._assigner = DeviceAssigner(cost, int(num_experts), 1, moves=DISPATCH_MOVES)

    def _launch(self, counts: torch.Tensor, copies: torch.Tensor) -> torch.Tensor:
        out, _objective, _status = self._assigner(counts[None], copies[None])
        return out[0, self.rank]

    def capture(self) -> None:
        """Capture the split's launch into a CUDA graph (graph=True on CUDA; once)."""
        if self._assigner is None or not self.graph or self._replay is not None:
            return
        shape = (self.num_ranks, self.num_experts)
        self._replay = Replay(self._launch, [(shape, torch.int64), (shape, torch.int64)],
                              self.device)

    def quota(self, counts: torch.Tensor, copies: torch.Tensor) -> torch.Tensor:
        """int64 [E, G]: this rank's pairs of each expert to run on each rank, from counts
        int64 [S, E] (every rank's true pairs) and copies int64 [G, E] (> 0: present), on
        their device (on CUDA: the assigner's buffer, valid until its next call, which comes
        after this layer's dispatch in stream order)."""
        if self._assigner is not None:
            if not self.graph:
                return self._launch(counts.contiguous(), copies.contiguous())
            self.capture()
            return self._replay(counts, copies)
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
    num_experts: G, E. hold_back: (g, e) replicas made late on purpose (tests). quota: this
    rank's row of the plan's split, int64 [E, G] on the device (device_split "plan"; made
    before `ready` on the side stream: the dispatch's stream waits for `ready`), or None.
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
    quota: torch.Tensor | None = None
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

    def split(self) -> torch.Tensor | None:
        """`quota`, ready for the current stream: on CUDA that stream waits on the device for
        `ready` (after the quota was made on the side stream; no host wait)."""
        if self.quota is not None and self.ready is not None:
            stream = torch.cuda.current_stream(self.quota.device)
            stream.wait_event(self.ready)
            self.quota.record_stream(stream)
        return self.quota

    @property
    def num_replicas(self) -> int:
        """Replicas of the plan (resolves it: call off the critical path)."""
        return int(self.resolve()[0].sum())
