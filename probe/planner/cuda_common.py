"""What the CUDA planners (one thread block per MoE layer) share, on the host and in the kernels.

Host side: `LayerPlanner`, the base of a planner object that validates a placement, slot budget,
cost model, layer count and block size once, keeps them on the device and checks each launch's
load [L, S, E] and window [L, G] (device arrays or torch CUDA tensors, no copy, no
synchronisation); `array_inputs` and `host_plans`, the numpy-in, numpy-out path that tests use.
Kernel side: `start_layer`, the first step of a layer's block (home holders, held copies, zero
token counts, bad values flagged), and `mark_unused`, the last (fixed values in the output rows
past the plan, so that a replayed CUDA graph shows nothing of an earlier launch).

Used by probe.planner.parallel_cuda (host side and kernel steps) and probe.planner.greedy_cuda
(host side; its kernel still has its own start and end steps).
"""

from __future__ import annotations

import numpy as np

from probe.planner.cost import CostModel
from probe.planner.numba_cuda import SIMULATOR, cuda
from probe.planner.problem import BalanceProblem

__all__ = ["STATUS_ERRORS", "LayerPlanner", "array_inputs", "host_plans", "is_torch",
           "mark_unused", "start_layer"]

# A layer's status code (the kernels' status output) and what it means.
STATUS_ERRORS = {1: "load has a negative token count",
                 2: "window must be >= 0 seconds on every rank (no NaN)"}


def is_torch(obj) -> bool:
    """Whether obj is a torch object (tested without importing torch)."""
    return type(obj).__module__.startswith("torch")


def _c_contiguous(arr) -> bool:
    if isinstance(arr, np.ndarray):
        return arr.flags.c_contiguous
    return arr.is_c_contiguous()


@cuda.jit(device=True)
def start_layer(tid, nt, load, home, window, hcount, hlist, hpos, held, tok, blk_of, ints,
                bad):  # pragma: no cover - device code
    """A layer's start, the block's threads striding over ranks and experts: hlist[e, :hcount[e]]
    e's home holders in rank order, hpos[g, e] g's position there or -1, held[g, e] = home[g, e]
    (uint8), tok zero, blk_of -1 (no block yet). ints[bad] (atomic maximum) becomes 2 for a
    negative or NaN window entry, 1 for a negative load; the caller zeroes it first and reads it
    after a barrier. load int64 [S, E], home bool [G, E], window float64 [G] (the layer's)."""
    num_ranks, num_experts = home.shape
    for g in range(tid, num_ranks, nt):
        if not window[g] >= 0.0:
            cuda.atomic.max(ints, bad, 2)
    for e in range(tid, num_experts, nt):
        c = 0
        for g in range(num_ranks):
            if home[g, e]:
                hpos[g, e] = c
                hlist[e, c] = g
                c += 1
            else:
                hpos[g, e] = -1
            held[g, e] = 1 if home[g, e] else 0
            tok[g, e] = 0
            if load[g, e] < 0:
                cuda.atomic.max(ints, bad, 1)
        hcount[e] = c
        blk_of[e] = -1


@cuda.jit(device=True)
def mark_unused(tid, nt, n_rep, n_blk, rep, blk_expert):  # pragma: no cover - device code
    """-1 in the replica rows from n_rep on and in blk_expert from n_blk on (the layer's rep
    [R_max, 3] and blk_expert [B_max]), so that those outputs depend on this launch alone."""
    for i in range(n_rep * 3 + tid, rep.shape[0] * 3, nt):
        rep[i // 3, i % 3] = -1
    for i in range(n_blk + tid, blk_expert.shape[0], nt):
        blk_expert[i] = -1


class LayerPlanner:
    """The host side of a CUDA planner for one placement, slot budget, cost model and layer
    count (a subclass adds its rules, scratch and output buffers, and its launch).

    home: bool [G, E] (every layer) or [L, G, E]; slots: int or int [G]; cost: CostModel for
    G ranks; num_layers: L, the layers one launch plans; threads: threads per block (1, or a
    multiple of 32 up to 1024); max_ranks (and max_experts, None for no limit): the kernel's
    limits; name: the planner's name in error messages. Validates all of it once (home and
    slots as a BalanceProblem does) and keeps home [L, G, E], slots [G], token_time and
    transfer_time [G, G] on the device. `out` (set by the subclass): the output NamedTuple of
    device buffers every launch overwrites.
    """

    def __init__(self, home: np.ndarray, slots: np.ndarray | int, cost: CostModel, *,
                 num_layers: int, threads: int, max_ranks: int, max_experts: int | None = None,
                 name: str) -> None:
        if not isinstance(cost, CostModel):
            raise TypeError(f"cost must be a CostModel, got {type(cost).__name__}")
        if (isinstance(num_layers, (bool, np.bool_))
                or not isinstance(num_layers, (int, np.integer)) or num_layers < 1):
            raise ValueError(f"num_layers must be an int >= 1, got {num_layers!r}")
        if (isinstance(threads, (bool, np.bool_)) or not isinstance(threads, (int, np.integer))
                or not (threads == 1 or (32 <= threads <= 1024 and threads % 32 == 0))):
            raise ValueError(f"threads must be 1 or a multiple of 32 in [32, 1024], got "
                             f"{threads!r}")
        home = np.asarray(home)
        if home.ndim == 2:
            home = np.broadcast_to(home, (num_layers, *home.shape))
        if home.ndim != 3 or home.shape[0] != num_layers:
            raise ValueError(f"home must be [G, E] or [num_layers={num_layers}, G, E], got shape "
                             f"{home.shape}")
        homes = []
        for layer in range(num_layers):  # validated as a BalanceProblem does (zero load)
            p = BalanceProblem(np.zeros(home.shape[1:], np.int64), home[layer], slots, 0.0, cost)
            homes.append(p.home)
        num_ranks, num_experts = p.load.shape
        if num_ranks > max_ranks:
            raise ValueError(f"{name} plans at most MAX_RANKS = {max_ranks} ranks, got "
                             f"{num_ranks}")
        if max_experts is not None and num_experts > max_experts:
            raise ValueError(f"{name} plans at most MAX_EXPERTS = {max_experts} experts, got "
                             f"{num_experts}")
        self._fit_shape(num_ranks, num_experts)
        self.num_layers = int(num_layers)
        self.shape = (num_ranks, num_experts)
        self.threads = int(threads)
        self.cost = cost
        self.slots = p.slots
        dev = cuda.to_device
        self._home = dev(np.ascontiguousarray(np.stack(homes), dtype=np.bool_))
        self._slots = dev(np.ascontiguousarray(p.slots, dtype=np.int64))
        self._tt = dev(np.ascontiguousarray(cost.token_time, dtype=np.float64))
        self._xt = dev(np.ascontiguousarray(cost.transfer_time, dtype=np.float64))
        self._torch_out = None

    def _fit_shape(self, num_ranks: int, num_experts: int) -> None:
        """A subclass's own checks of the shape (G, E), made before anything goes to the
        device; nothing by default."""

    def _device(self, arr, name: str, shape: tuple, dtype):
        if is_torch(arr):
            import torch

            want = {np.int64: torch.int64, np.float64: torch.float64}[dtype]
            if (arr.dtype != want or tuple(arr.shape) != shape or not arr.is_contiguous()
                    or arr.device.type != "cuda"):
                raise ValueError(f"{name} must be a contiguous CUDA torch.{str(want)[6:]} tensor "
                                 f"of shape {shape}, got {arr.dtype} {tuple(arr.shape)} on "
                                 f"{arr.device}")
            # sync=False: no stream synchronisation (the launch is ordered on the same stream).
            return cuda.as_cuda_array(arr, sync=False)
        ok = (cuda.is_cuda_array(arr) if not SIMULATOR
              else hasattr(arr, "copy_to_host") or isinstance(arr, np.ndarray))
        if not ok:
            raise TypeError(f"{name} must be a CUDA array (a torch CUDA tensor or a numba "
                            f"device array), got {type(arr).__name__}")
        if not SIMULATOR and not hasattr(arr, "copy_to_host"):
            arr = cuda.as_cuda_array(arr, sync=False)
        if arr.dtype != dtype or tuple(arr.shape) != shape or not _c_contiguous(arr):
            raise ValueError(f"{name} must be a C-contiguous {np.dtype(dtype)} array of shape "
                             f"{shape}, got {arr.dtype} {tuple(arr.shape)}")
        return arr

    def launch_inputs(self, load, window, stream=None) -> tuple:
        """(load, window, stream) for a launch: load int64 [L, S, E] and window float64 [L, G]
        checked and taken as device arrays (torch CUDA tensors without a copy); the stream is
        `stream`, or torch's current stream for torch tensors, else the default stream."""
        L, (G, E) = self.num_layers, self.shape  # noqa: N806 (the shape letters)
        load_d = self._device(load, "load", (L, G, E), np.int64)
        window_d = self._device(window, "window", (L, G), np.float64)
        if stream is None:
            stream = 0
            if is_torch(load) and not SIMULATOR:
                import torch

                stream = cuda.external_stream(torch.cuda.current_stream().cuda_stream)
        return load_d, window_d, stream

    def torch_out(self):
        """The output buffers as torch CUDA tensors (views, made once)."""
        if self._torch_out is None:
            import torch

            plan_type = type(self.out)
            views = plan_type(*(torch.as_tensor(a, device="cuda") for a in self.out))
            for name, a, t in zip(plan_type._fields, self.out, views, strict=True):
                # A copy instead of a view would hold the first plan forever: refuse it.
                if t.data_ptr() != a.__cuda_array_interface__["data"][0]:
                    raise RuntimeError(f"torch.as_tensor copied the output buffer {name} "
                                       "instead of viewing it")
            self._torch_out = views
        return self._torch_out


def array_inputs(load, alpha, beta, token_time, transfer_time) -> tuple:
    """(load, num_layers, cost) of the numpy path: load as an array (ValueError unless 3-D
    [L, S, E]) and its layer count, and the CostModel of alpha, beta and the two [G, G]
    matrices."""
    load = np.asarray(load)
    if load.ndim != 3:
        raise ValueError(f"load must be a 3-D [L, S, E] array, got shape {load.shape}")
    cost = CostModel(float(alpha), float(beta), np.asarray(token_time, dtype=np.float64),
                     np.asarray(transfer_time, dtype=np.float64))
    return load, load.shape[0], cost


def host_plans(runner: LayerPlanner, load: np.ndarray, window) -> tuple:
    """Launch `runner` on numpy load [L, S, E] and window [L, G] (copied to the device) and
    return its outputs copied back (its output NamedTuple of numpy arrays); ValueError for a
    shape that does not fit the runner or a layer the kernel rejected."""
    num_layers, shape = runner.num_layers, runner.shape
    window = np.asarray(window, dtype=np.float64)
    if window.shape != (num_layers, shape[0]):
        raise ValueError(f"window must be [L, G] = {(num_layers, shape[0])}, got shape "
                         f"{window.shape}")
    if load.shape[1:] != shape:
        raise ValueError(f"load must be [L, S, E] = {(num_layers, *shape)}, got shape "
                         f"{load.shape}")
    out = runner.plan(cuda.to_device(np.ascontiguousarray(load, dtype=np.int64)),
                      cuda.to_device(np.ascontiguousarray(window)))
    host = type(out)(*(a.copy_to_host() for a in out))
    for layer, code in enumerate(host.status):
        if code:
            raise ValueError(f"layer {layer}: {STATUS_ERRORS[int(code)]}")
    return host
