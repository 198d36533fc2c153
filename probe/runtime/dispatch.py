"""Fixed-capacity dispatch and combine: the EP layer with no host synchronisation.

The exact path of `probe.runtime.ep.EPMoELayer.forward` sizes every all-to-all by counts read
back to the host (`.cpu()`, `.tolist()` of split sizes), several times per MoE layer. This mode
sends a buffer of a fixed number of rows to every peer instead, so every `all_to_all_single`
has equal split sizes the host knows before the step, and every other step is a device op.

Shapes: T tokens on this rank, K top-k, D hidden, E experts, G ranks, P = T*K pairs, C rows per
peer (the capacity), N = G*C rows on the wire each way.

Per MoE layer, on every rank:
  1. destinations on the device (`device_destinations`): the contract of
     `probe.runtime.ep.split_counts` (quota of unusable ranks to the home rank, cumulative
     bounds floor(cumsum(q) * n / sum(q)), pairs cut in token order) with scatter_add, cumsum
     and comparisons; its slow twin is `EPMoELayer.destinations` on the host;
  2. pack: pairs ordered by (destination, expert, token); a pair's row is destination * C +
     its position in that destination's block; a position >= C is an OVERFLOW: the pair goes
     to a trash row that is never sent, and the largest block (the capacity this call needed)
     is kept in a device counter;
  3. two all-to-alls of equal splits: rows [N, D] and their experts int64 [N] (-1 on padding
     rows: the number of rows each peer sent rides along as the non-padding entries);
  4. experts on the received rows with static shapes (`fixed_experts`): the home experts as one
     grouped GEMM where `torch._grouped_mm` applies, else one masked pass per expert; replicas
     one masked pass each; a row whose expert this rank cannot run is counted (never silent);
  5. combine: the outputs go back in the same slots (equal splits) and are scattered to their
     (token, k) places; an overflowed pair reads a zero row.

Overflow is detected on the device and reported after the step, never on the critical path:
`FixedState.needed` is the largest block any call sent since the last `reset`, and
`probe.runtime.pipeline.EPRunner.end_step` raises `CapacityOverflow` (naming the layer, the
capacity and the capacity it needed) when it exceeds C. That step's output is wrong (the
overflowed pairs contributed zero) and the runner raises before the engine returns any result;
the exact path (`dispatch="exact"`) is the obviously correct twin, with no capacity at all.

The capacity C is the same on every rank (the all-to-alls need it): given (`capacity`), or
ceil(capacity_factor * T_max * K / G) with T_max the group's largest token count of the step
(`capacity_for`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.profiler import record_function

__all__ = ["DISPATCH_MODES", "CapacityOverflow", "DispatchOptions", "FixedState",
           "capacity_for", "device_destinations", "fixed_experts", "fixed_forward", "to_device"]

DISPATCH_MODES = ("exact", "fixed")


class CapacityOverflow(RuntimeError):
    """A fixed-capacity dispatch sent more rows to one peer than its capacity."""


@dataclass(frozen=True)
class DispatchOptions:
    """How the EP layer dispatches and combines.

    mode: "exact" (split sizes read back to the host; the default and the twin) or "fixed"
        (a buffer of C rows per peer; no host sync in the layer).
    capacity_factor: C = ceil(capacity_factor * T_max * K / G) when `capacity` is None.
    capacity: C rows per peer, fixed (then no per-step agreement on T_max is needed).
    """

    mode: str = "exact"
    capacity_factor: float = 2.0
    capacity: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in DISPATCH_MODES:
            raise ValueError(f"dispatch mode must be one of {DISPATCH_MODES}, got {self.mode!r}")
        if not (isinstance(self.capacity_factor, (int, float))
                and math.isfinite(self.capacity_factor) and self.capacity_factor > 0):
            raise ValueError(f"capacity_factor must be a finite number > 0, got "
                             f"{self.capacity_factor!r}")
        if self.capacity is not None and (not isinstance(self.capacity, (int, np.integer))
                                          or self.capacity < 1):
            raise ValueError(f"capacity must be an int >= 1 or None, got {self.capacity!r}")

    @property
    def fixed(self) -> bool:
        return self.mode == "fixed"


def capacity_for(options: DispatchOptions, max_tokens: int, top_k: int, num_ranks: int) -> int:
    """C, rows per peer: `options.capacity`, else ceil(factor * max_tokens * K / G), at least 1
    and at most max_tokens * K (a peer never gets more than every pair).

    >>> capacity_for(DispatchOptions("fixed", 2.0), 10, 2, 4)
    10
    >>> capacity_for(DispatchOptions("fixed", capacity=3), 10, 2, 4)
    3
    """
    if options.capacity is not None:
        return int(options.capacity)
    pairs = int(max_tokens) * int(top_k)
    return max(1, min(pairs, math.ceil(options.capacity_factor * pairs / num_ranks)))


def to_device(values, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Host values (numpy, list) or a tensor -> a tensor of `dtype` on `device`, without a host
    sync: torch's blocking host-to-device copy synchronises the stream on CUDA, so host data
    goes through a fresh pinned tensor and a non-blocking copy (the caching host allocator keeps
    it until the copy is done)."""
    if isinstance(values, torch.Tensor):
        return values.to(device=device, dtype=dtype)
    host = torch.from_numpy(np.array(values)).to(dtype)  # a copy (a plan's array is read-only)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


class FixedState:
    """Device counters of one layer's fixed-capacity calls since the last `reset`.

    needed: int64 0-d, the largest block (rows to one peer) any call of this rank sent.
    unrunnable: int64 0-d, received rows whose expert this rank could not run (ranks that
        disagree on the plan; the exact path raises at once, this one after the step).
    capacity: the capacity C of the last call (host int).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.needed = torch.zeros((), dtype=torch.int64, device=device)
        self.unrunnable = torch.zeros((), dtype=torch.int64, device=device)
        self.capacity = 0

    def reset(self) -> None:
        self.needed.zero_()
        self.unrunnable.zero_()


def device_destinations(flat_e: torch.Tensor, quota: torch.Tensor | None, usable: torch.Tensor,
                        owner: torch.Tensor, num_experts: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank that runs each pair and the fallback count, on the device (no host read).

    Args:
        flat_e: int64 [P], expert of each pair (token-major).
        quota: int64 [E, G] (this source's plan.assignment row) or None (static: all home).
        usable: bool [G, E], rank g can run expert e now.
        owner: int64 [E], home rank of every expert.
    Returns: (int64 [P] destination, int64 0-d pairs sent home because their planned rank
    could not run them). Equal to `EPMoELayer.destinations` (its host twin).
    """
    device = flat_e.device
    if quota is None:
        return owner[flat_e], torch.zeros((), dtype=torch.int64, device=device)
    num_ranks = usable.shape[0]
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat_e, torch.ones_like(flat_e))  # [E] (bincount syncs on CUDA)
    ranks = torch.arange(num_ranks, device=device)
    q_all = quota.clamp(min=0)  # [E, G]

    def bounds_of(q: torch.Tensor) -> torch.Tensor:
        """Cumulative split bounds [E, G] of a quota [E, G] whose total may be 0."""
        q = q.clone()
        dropped = q_all.sum(dim=1) - q.sum(dim=1)  # [E]
        q.scatter_add_(1, owner[:, None], dropped[:, None])
        total = q.sum(dim=1)  # [E]
        cum = torch.cumsum(q, dim=1) * counts[:, None] // total.clamp(min=1)[:, None]
        home_bounds = torch.where(ranks[None, :] >= owner[:, None], counts[:, None], 0)
        return torch.where(total[:, None] > 0, cum, home_bounds)  # [E, G]

    bounds = bounds_of(torch.where(usable.T, q_all, 0))
    ideal = bounds_of(q_all)  # every planned rank usable
    split = torch.diff(bounds, dim=1, prepend=torch.zeros_like(bounds[:, :1]))
    ideal_split = torch.diff(ideal, dim=1, prepend=torch.zeros_like(ideal[:, :1]))
    fallback = (ideal_split - split).clamp(min=0).sum()
    order = torch.argsort(flat_e, stable=True)  # pairs grouped by expert, token order inside
    sorted_e = flat_e[order]
    starts = torch.cumsum(counts, 0) - counts  # [E]
    rank_in_expert = torch.arange(flat_e.numel(), device=device) - starts[sorted_e]  # [P]
    dest_sorted = (rank_in_expert[:, None] >= bounds[sorted_e]).sum(dim=1)  # [P]
    dest = torch.empty_like(flat_e).index_copy_(0, order, dest_sorted)
    return dest, fallback


def fixed_experts(x: torch.Tensor, row_e: torch.Tensor, *, home_ids: np.ndarray,
                  home_params: Mapping[str, torch.Tensor], home_slot: torch.Tensor,
                  expert_fn: Callable, grouped=None, replica_ids: Sequence[int] = (),
                  replica_params: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every received row through its expert with static shapes: x [N, D], row_e int64 [N]
    (global expert, -1 on padding rows) -> ([N, D] unweighted outputs, zero on rows no
    expert here runs; int64 0-d count of non-padding rows no expert here runs).

    home_ids [E_local] and home_params (stacked [E_local, ...]) are this rank's home experts,
    home_slot int64 [E] (device) their local index or -1; replica_ids (host) the non-home
    experts this rank may run, with weights `replica_params(e)`. `grouped` (a
    `GroupedExperts` of the home experts) runs them as one grouped GEMM where
    `torch._grouped_mm` applies; otherwise each expert runs on every row, masked.
    """
    valid = row_e >= 0  # [N]
    slot = torch.where(valid, home_slot[row_e.clamp(min=0)], -1)  # [N] local index or -1
    y = torch.zeros_like(x)
    if home_ids.size and grouped is not None and grouped.uses_grouped_mm(x.dtype):
        s = slot.clamp(min=0)  # rows of no home expert run through expert 0, then dropped
        order = torch.argsort(s, stable=True)  # [N]
        s_sorted = s.index_select(0, order)
        counts = torch.zeros(len(home_ids), dtype=torch.int64, device=x.device)
        counts.scatter_add_(0, s_sorted, torch.ones_like(s_sorted))
        offs = torch.cumsum(counts, 0).to(torch.int32)  # [E_local]
        y_sorted = grouped.forward_sorted(x.index_select(0, order), offs, s_sorted)
        y_home = torch.empty_like(y_sorted).index_copy_(0, order, y_sorted)  # [N, D]
        y = torch.where((slot >= 0)[:, None], y_home, y)
    else:
        for i in range(len(home_ids)):
            params = {name: t[i] for name, t in home_params.items()}
            y = torch.where((slot == i)[:, None], expert_fn(params, x), y)
    runnable = slot >= 0
    for e in replica_ids:
        mine = row_e == int(e)  # [N]
        y = torch.where(mine[:, None], expert_fn(replica_params(int(e)), x), y)
        runnable = runnable | mine
    return y, (valid & ~runnable).sum()


def fixed_forward(layer, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                  *, capacity: int, quota, usable, replica_ids: Sequence[int],
                  replica_params: Callable | None, hooks, state: FixedState | None = None,
                  valid: torch.Tensor | None = None):
    """`EPMoELayer.forward` with fixed-capacity dispatch (the module doc); no host sync.

    quota: int [E, G] (numpy or tensor) or None; usable: bool [G, E] (numpy or tensor), the
    same on every rank. state: the counters to update (default the layer's own,
    `layer.fixed_state`). valid: bool [T] or None, rows whose pairs are sent (the others,
    padding, go to a virtual destination past the last rank: never sent, never counted, zero
    output). Returns ([T, D] output, the `LayerStats` fields as device tensors).
    """
    num_tokens, top_k = topk_ids.shape
    num_ranks, num_experts = layer.num_ranks, layer.num_experts
    device = x.device
    state = layer.fixed_state(device) if state is None else state
    state.capacity = int(capacity)
    cap = state.capacity
    owner = layer.device_maps(device)["owner"]
    usable = to_device(usable, device, torch.bool)
    if quota is not None:
        quota = to_device(quota, device, torch.int64)
    single = layer.ctx.group is None or num_ranks == 1
    with record_function("probe.ep.dispatch"):
        flat_e = topk_ids.reshape(-1).to(torch.int64)  # [P]
        dest, fallback = device_destinations(flat_e, quota, usable, owner, num_experts)
        if valid is not None:  # padding pairs: destination G, past the last rank
            valid_pairs = valid[:, None].expand(num_tokens, top_k).reshape(-1)  # [P]
            dest = torch.where(valid_pairs, dest, num_ranks)
        key = dest * num_experts + flat_e  # wire order: destination, expert, token
        order = torch.argsort(key, stable=True)  # [P]
        dest_sorted = dest.index_select(0, order)
        sent_all = torch.zeros(num_ranks + 1, dtype=torch.int64, device=device)
        sent_all.scatter_add_(0, dest, torch.ones_like(dest))  # [G + 1] pairs to each rank
        sent = sent_all[:num_ranks]  # [G] (the last bin: padding pairs)
        torch.maximum(state.needed, sent.max(), out=state.needed)
        first = torch.cumsum(sent_all, 0) - sent_all  # [G + 1]
        pos = torch.arange(order.numel(), device=device) - first[dest_sorted]  # [P]
        trash = num_ranks * cap
        row = torch.where((pos < cap) & (dest_sorted < num_ranks), dest_sorted * cap + pos,
                          trash)  # [P] wire row
        x_send = x.new_zeros((trash + 1, x.shape[1]))
        x_send.index_copy_(0, row, x.index_select(0, order // top_k))
        e_send = torch.full((trash + 1,), -1, dtype=torch.int64, device=device)
        e_send.index_copy_(0, row, flat_e.index_select(0, order))
        x_send, e_send = x_send[:trash], e_send[:trash]  # [N, D], [N] (trash row dropped)
        if single:
            x_recv, e_recv = x_send, e_send
        else:
            x_recv, e_recv = torch.empty_like(x_send), torch.empty_like(e_send)
            layer._a2a(e_recv, e_send, None, None, "dispatch experts (fixed)")
            layer._a2a(x_recv, x_send, None, None, "dispatch (fixed)")
    hooks.before_experts()
    maps = layer.device_maps(device)
    with record_function("probe.ep.experts"):
        y_recv, unrunnable = fixed_experts(
            x_recv, e_recv, home_ids=layer.experts.expert_ids, home_params=layer.experts.params,
            home_slot=maps["home_slot"], expert_fn=layer.expert_fn, grouped=layer.grouped,
            replica_ids=replica_ids, replica_params=replica_params)
        state.unrunnable.add_(unrunnable)
    hooks.before_combine()
    with record_function("probe.ep.combine"):
        if single:
            y_back = y_recv
        else:
            y_back = torch.empty_like(y_recv)
            layer._a2a(y_back, y_recv, None, None, "combine (fixed)")
        hooks.after_combine()
        y_back = torch.cat((y_back, y_back.new_zeros((1, y_back.shape[1]))))  # + a zero row
        y_pairs = torch.empty((order.numel(), x.shape[1]), dtype=y_back.dtype, device=device)
        y_pairs.index_copy_(0, order, y_back.index_select(0, row))  # overflow reads zero
        out = layer.combine(y_pairs.view(num_tokens, top_k, x.shape[1]), topk_weights)
    received = torch.zeros(num_experts, dtype=torch.int64, device=device)
    received.scatter_add_(0, e_recv.clamp(min=0), (e_recv >= 0).to(torch.int64))  # [E]
    replica_mask = torch.zeros(num_experts, dtype=torch.bool, device=device)
    if len(replica_ids):
        replica_mask[to_device(list(replica_ids), device, torch.int64)] = True
    stats = {"pairs_sent": sent, "rows_sent": sent, "pairs_processed": (e_recv >= 0).sum(),
             "pairs_on_replicas": (received * replica_mask).sum(), "pairs_fallback": fallback,
             "replicas_used": ((received > 0) & replica_mask).sum()}
    return out, stats
