"""Expert-parallel MoE layer: dispatch and combine with all_to_all_single, following a Plan.

Attention is data parallel: every rank has its own tokens. Experts are sharded over the G ranks
by `probe.placement.sharded_home` (each expert has one home rank). A `Plan` adds replicas and
says, for every (source rank s, expert e), how many of s's tokens of e run on each rank g
(`plan.assignment[s, e, g]`). The TRUE router always decides experts and gate weights; the plan
only decides where a token's expert runs, so the output is the same for every plan.

Shapes: T tokens on this rank, K top-k, D hidden, E experts, G ranks, P = T*K token-expert pairs.

Deterministic split (documented contract, `split_counts`): for source s and expert e with n
actual pairs (taken in token order, then k order),
  1. quota q[g] = assignment[s, e, g] where rank g can run e now (home, or a replica that has
     ARRIVED), else 0; the quota of unusable ranks is added to e's home rank;
  2. if sum(q) == 0 all n pairs go home; otherwise the n pairs are cut at the cumulative bounds
     floor(cumsum(q) * n / sum(q)): the first pairs to the lowest rank with a quota, and so on.
  When the prediction was right (n == sum(q)) rank g gets exactly q[g] pairs.
So a replica that has not arrived is never used: its pairs fall back to the home rank.

Dispatch (dedup, the default): a token goes once to each rank that runs any of its pairs, in
(destination, token) order, with one int64 per pair saying which of those rows it uses; the
receiver expands the rows back to one per pair (source order, then expert, then token), so
everything after dispatch is the same with dedup on or off.

Combine: each executing rank returns expert outputs to the source in the order it received
them (one row per pair); the source puts them back at their (token, k) position and sums over
k with the gate weights with the model's own `combine` function, the one the single-process
model uses.

Everything above reads counts back to the host (the exact path, the default). `forward(...,
capacity=C)` runs the fixed-capacity twin instead (`probe.runtime.dispatch`): C rows per peer,
equal all-to-all sizes, the same split rule on the device, no host sync.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch.profiler import record_function

from probe.placement import sharded_home
from probe.runtime.dispatch import FixedState, fixed_forward, to_device
from probe.runtime.dist import DistContext, guarded
from probe.runtime.experts import GroupedExperts, grouped_default
from probe.runtime.quant import join_packed

__all__ = [
    "EPMoELayer",
    "ExpertFn",
    "LayerExperts",
    "LayerStats",
    "default_combine",
    "home_owner",
    "split_counts",
]

ExpertFn = Callable[[Mapping[str, torch.Tensor], torch.Tensor], torch.Tensor]
"""Forward of ONE expert: (its weights {name: tensor}, x [N, D]) -> [N, D] (no gate weight)."""


def default_combine(expert_out: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """Sum over k of gate weight x expert output. expert_out [T, K, D], topk_weights [T, K]."""
    return (expert_out * topk_weights.unsqueeze(-1).to(expert_out.dtype)).sum(dim=1)  # [T, D]


def home_owner(home: np.ndarray) -> np.ndarray:
    """int64 [E]: the home rank of every expert (the lowest rank holding it). home bool [G, E]."""
    home = np.asarray(home, dtype=bool)
    if not home.any(axis=0).all():
        raise ValueError("home: every expert needs a home rank")
    return np.argmax(home, axis=0).astype(np.int64)


def split_counts(quota: np.ndarray, usable: np.ndarray, owner: np.ndarray,
                 counts: np.ndarray) -> np.ndarray:
    """Pairs of each expert this source sends to each rank (the contract in the module doc).

    Args:
        quota: int [E, G], the plan's assignment for this source (plan.assignment[s]).
        usable: bool [G, E], rank g can run expert e now (home or arrived replica).
        owner: int [E], home rank of every expert.
        counts: int [E], actual pairs of this source per expert.
    Returns: int64 [E, G], rows summing to `counts`.

    >>> split_counts(np.array([[3, 1]]), np.array([[True], [True]]), np.array([0]),
    ...              np.array([8])).tolist()
    [[6, 2]]
    >>> split_counts(np.array([[3, 1]]), np.array([[True], [False]]), np.array([0]),
    ...              np.array([8])).tolist()
    [[8, 0]]
    """
    quota = np.asarray(quota, dtype=np.int64)
    num_experts, num_ranks = quota.shape
    counts = np.asarray(counts, dtype=np.int64)
    q = np.where(np.asarray(usable, dtype=bool).T, np.maximum(quota, 0), 0)  # [E, G]
    dropped = np.maximum(quota, 0).sum(axis=1) - q.sum(axis=1)
    q[np.arange(num_experts), owner] += dropped
    total = q.sum(axis=1)  # [E]
    out = np.zeros((num_experts, num_ranks), dtype=np.int64)
    nz = total > 0
    cum = np.cumsum(q[nz], axis=1) * counts[nz, None] // total[nz, None]  # [E', G]
    out[nz] = np.diff(cum, axis=1, prepend=0)
    out[~nz, owner[~nz]] = counts[~nz]
    return out


@dataclass
class LayerExperts:
    """The experts of one MoE layer that one rank holds at home.

    Attributes:
        expert_ids: int64 [E_local], global ids, increasing.
        params: weight name -> stacked tensor [E_local, *shape] (row i is expert_ids[i]).
            Experts kept packed (MXFP4 / FP8) hold their stored tensors under the names of
            `probe.runtime.quant.split_packed`, so one expert's weights are its packed bytes.
    """

    expert_ids: np.ndarray
    params: dict[str, torch.Tensor]

    def __post_init__(self) -> None:
        self.expert_ids = np.asarray(self.expert_ids, dtype=np.int64)
        if np.any(np.diff(self.expert_ids) <= 0):
            raise ValueError("expert_ids must be strictly increasing")
        for name, t in self.params.items():
            if t.shape[0] != len(self.expert_ids):
                raise ValueError(f"params[{name!r}] has {t.shape[0]} rows, expected "
                                 f"{len(self.expert_ids)} (one per expert)")
        self._index = {int(e): i for i, e in enumerate(self.expert_ids)}

    def get(self, expert: int) -> dict[str, torch.Tensor]:
        i = self._index[int(expert)]
        return {name: t[i] for name, t in self.params.items()}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(t.shape[1:]) for name, t in self.params.items()}

    @property
    def expert_bytes(self) -> int:
        """W: bytes of one expert."""
        return sum(t[0].numel() * t.element_size() for t in self.params.values()) \
            if len(self.expert_ids) else 0


@dataclass
class LayerStats:
    """What one EP layer call did on this rank.

    pairs_sent: int64 [G], pairs this rank dispatched to each rank.
    rows_sent: int64 [G], token rows this rank dispatched to each rank (with dedup a token
        goes once to a rank however many of its pairs run there; else rows_sent == pairs_sent).
    pairs_processed: pairs this rank ran (home + replicas).
    With fixed-capacity dispatch (`probe.runtime.dispatch`) the counts are device tensors
    (int64 [G] and 0-d), read after the step, and expert_seconds is 0.
    pairs_on_replicas: of those, pairs run on replica weights.
    pairs_fallback: pairs of this rank sent home because the planned rank could not run them.
    replicas_used: replicas (not home experts) this rank ran at least one pair on.
    expert_seconds: time of the local expert compute (CPU clock; on GPU see pipeline timers).
    """

    pairs_sent: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    rows_sent: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    pairs_processed: int = 0
    pairs_on_replicas: int = 0
    pairs_fallback: int = 0
    replicas_used: int = 0
    expert_seconds: float = 0.0


class PhaseHooks:
    """Points in the layer where the split-phase transfer of the NEXT layer acts (no-ops here)."""

    def before_experts(self) -> None:  # start phase 1
        pass

    def before_combine(self) -> None:  # pause
        pass

    def after_combine(self) -> None:  # resume
        pass


class EPMoELayer:
    """One MoE layer executed expert-parallel over `ctx.group` (or alone when G == 1).

    Args:
        ctx: process groups, rank, device (`ctx.group` None means a single process).
        layer: MoE layer index l (for messages and the replica pool buffer).
        num_experts: E.
        experts: this rank's home experts of this layer (static sharded placement).
        expert_fn: forward of one expert.
        combine: (expert_out [T, K, D], topk_weights [T, K]) -> [T, D]; the single-process
            model's own combine so that summation order matches.
        activate: the experts' nonlinearity (`MoEBlock.activate`). Given, the home experts run
            as one grouped GEMM per projection (`probe.runtime.experts.GroupedExperts`, params
            named w_gate_up, w_down, or their packed parts, and optionally b_gate_up, b_down);
            replicas still run one `expert_fn` call each. None: every expert runs through
            `expert_fn`.
        grouped: with activate, use the grouped path (None: `grouped_default()`).
        dedup: dispatch a token once per destination rank (with an index per pair), not once
            per pair; the combine still returns one row per pair.
    """

    def __init__(self, ctx: DistContext, layer: int, num_experts: int, experts: LayerExperts,
                 expert_fn: ExpertFn, combine: Callable = default_combine, *,
                 activate: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 grouped: bool | None = None, dedup: bool = True) -> None:
        self.ctx = ctx
        self.layer = int(layer)
        self.num_experts = int(num_experts)
        self.num_ranks = ctx.world_size
        self.home = sharded_home(num_experts, self.num_ranks)  # [G, E]
        self.owner = home_owner(self.home)
        mine = np.flatnonzero(self.home[ctx.rank])
        if not np.array_equal(mine, experts.expert_ids):
            raise ValueError(f"rank {ctx.rank} layer {layer}: experts hold ids "
                             f"{experts.expert_ids.tolist()}, sharded placement says "
                             f"{mine.tolist()}")
        self.experts = experts
        self.expert_fn = expert_fn
        self.combine = combine
        self.dedup = bool(dedup)
        self.grouped: GroupedExperts | None = None
        if activate is not None and (grouped_default() if grouped is None else grouped):
            p = join_packed(experts.params)  # packed experts: their PackedWeights
            missing = {"w_gate_up", "w_down"} - set(p)
            if missing:
                raise ValueError(f"grouped experts need params {sorted(missing)}; "
                                 f"experts hold {sorted(p)}")
            self.grouped = GroupedExperts(p["w_gate_up"], p["w_down"], activate,
                                          b_gate_up=p.get("b_gate_up"), b_down=p.get("b_down"))
        self._fixed: FixedState | None = None
        self._maps: dict[str, torch.Tensor] | None = None

    def fixed_state(self, device: torch.device) -> FixedState:
        """The device counters of this layer's fixed-capacity calls (created on first use)."""
        if self._fixed is None:
            self._fixed = FixedState(device)
        return self._fixed

    def device_maps(self, device: torch.device) -> dict[str, torch.Tensor]:
        """On the device, made once: owner int64 [E] (home rank of each expert), home_slot
        int64 [E] (local index of this rank's home experts, -1 elsewhere), home bool [G, E]."""
        if self._maps is None:
            slot = np.full(self.num_experts, -1, dtype=np.int64)
            slot[self.experts.expert_ids] = np.arange(len(self.experts.expert_ids))
            self._maps = {"owner": to_device(self.owner, device, torch.int64),
                          "home_slot": to_device(slot, device, torch.int64),
                          "home": to_device(self.home, device, torch.bool)}
        return self._maps

    # -------------------------------------------------------------------------------------
    def _home_grouped(self, x_recv: torch.Tensor, y_recv: torch.Tensor, row_expert: torch.Tensor,
                      by_expert: torch.Tensor | None, per_expert: list[int]) -> None:
        """Rows of this rank's home experts through `self.grouped` (one grouped GEMM per
        projection); writes their outputs into y_recv. row_expert [N] (host) is each received
        row's expert, by_expert [N] (host) the rows sorted by expert (None: already sorted)."""
        ids = self.experts.expert_ids  # [E_local]
        counts = np.asarray(per_expert, dtype=np.int64)[ids]  # [E_local]
        n_home = int(counts.sum())
        if n_home == 0:
            return
        device = x_recv.device
        offs = torch.as_tensor(np.cumsum(counts), dtype=torch.int32).to(device)  # [E_local]
        slot_of = np.full(self.num_experts, -1, dtype=np.int64)
        slot_of[ids] = np.arange(len(ids))
        order = torch.arange(row_expert.numel()) if by_expert is None else by_expert  # [N]
        slot_sorted = torch.as_tensor(slot_of)[row_expert[order]]  # [N], -1 on replicas
        if n_home == row_expert.numel() and by_expert is None:  # all home, already grouped
            y_recv.copy_(self.grouped.forward_sorted(x_recv, offs, slot_sorted.to(device)))
            return
        rows = order[slot_sorted >= 0].to(device)  # [n_home], grouped by expert
        y_recv[rows] = self.grouped.forward_sorted(
            x_recv.index_select(0, rows), offs, slot_sorted[slot_sorted >= 0].to(device))

    def _a2a(self, out: torch.Tensor, inp: torch.Tensor, out_splits, in_splits, name: str):
        ctx = self.ctx
        with guarded(f"{name} (MoE layer {self.layer})", ctx.rank, ctx.watchdog):
            dist.all_to_all_single(out, inp, out_splits, in_splits, group=ctx.group)

    def destinations(self, flat: torch.Tensor, quota: np.ndarray | None,
                     usable: np.ndarray) -> tuple[torch.Tensor, int]:
        """Rank that runs each pair: int64 [P] (pairs in token-major order), and fallbacks.

        flat: int64 [P] expert of each pair (topk_ids [T, K] flattened, on the CPU);
        quota: int [E, G] or None (static: all home); usable: bool [G, E].
        """
        num_experts = self.num_experts
        counts = torch.bincount(flat, minlength=num_experts).numpy()  # [E]
        owner = self.owner
        if quota is None:
            return torch.as_tensor(owner)[flat], 0
        split = split_counts(quota, usable, owner, counts)  # [E, G]
        fallback = int(_fallback_pairs(quota, usable, owner, counts, split))
        order = torch.argsort(flat, stable=True)  # pairs grouped by expert, token order inside
        sorted_e = flat[order]
        starts = torch.zeros(num_experts, dtype=torch.int64)
        starts[1:] = torch.as_tensor(np.cumsum(counts)[:-1])
        rank_in_expert = torch.arange(flat.numel()) - starts[sorted_e]  # [P]
        bounds = torch.as_tensor(np.cumsum(split, axis=1))  # [E, G]
        dest_sorted = (rank_in_expert[:, None] >= bounds[sorted_e]).sum(dim=1)  # [P]
        dest = torch.empty_like(flat)
        dest[order] = dest_sorted
        return dest, fallback

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, *,
                quota: np.ndarray | None = None, arrived: np.ndarray | None = None,
                replica_params: Callable[[int], Mapping[str, torch.Tensor]] | None = None,
                hooks: PhaseHooks | None = None, capacity: int | None = None,
                replica_ids=None, state: FixedState | None = None,
                valid: torch.Tensor | None = None) -> tuple[torch.Tensor, LayerStats]:
        """Run the MoE experts of this rank's tokens wherever the plan puts them.

        Args:
            x: [T, D] expert input (post-attention-norm hidden states) of this rank's tokens.
            topk_ids: int64 [T, K], the true router's experts.
            topk_weights: [T, K], the true router's gate weights.
            quota: int [E, G], plan.assignment[this rank] (None: static, everything home).
            arrived: bool [G, E], replicas that arrived in time on every rank (all ranks pass
                the same array; None: no replicas).
            replica_params: expert -> weights of this rank's arrived replica.
            hooks: split-phase transfer points of the next layer.
            capacity: C rows per peer: fixed-capacity dispatch (`probe.runtime.dispatch`, no
                host sync; quota and arrived may then be device tensors, the same on every
                rank); None: the exact path below.
            replica_ids: with `capacity`, the non-home experts this rank may run (host
                ints; default: this rank's row of `arrived`, which must then be numpy).
            state: with `capacity`, the overflow counters to update (default the layer's
                own; the decode step of `probe.runtime.decode.EPDecodeRunner` keeps its own).
            valid: with `capacity`, bool [T] on the device: rows whose pairs are dispatched
                (False: padding rows, which send nothing and get a zero output); None: all.
        Returns: ([T, D] output, LayerStats).
        """
        hooks = hooks or PhaseHooks()
        num_tokens, top_k = topk_ids.shape
        num_ranks, num_experts = self.num_ranks, self.num_experts
        if x.shape[0] != num_tokens or topk_weights.shape != topk_ids.shape:
            raise ValueError(f"x [T, D] {tuple(x.shape)}, topk_ids [T, K] {tuple(topk_ids.shape)}"
                             f" and topk_weights {tuple(topk_weights.shape)} disagree")
        if capacity is not None:
            device = x.device
            home = self.device_maps(device)["home"]
            if arrived is None:
                usable, replica_ids = home, ()
            else:
                if replica_ids is None:
                    if isinstance(arrived, torch.Tensor):
                        raise ValueError("replica_ids is needed when arrived is a tensor")
                    replica_ids = np.flatnonzero(np.asarray(arrived)[self.ctx.rank]).tolist()
                usable = home | to_device(arrived, device, torch.bool)
            out, fields = fixed_forward(self, x, topk_ids, topk_weights, capacity=capacity,
                                        quota=quota, usable=usable, replica_ids=replica_ids,
                                        replica_params=replica_params, hooks=hooks,
                                        state=state, valid=valid)
            return out, LayerStats(**fields)
        if arrived is None:
            arrived = np.zeros((num_ranks, num_experts), dtype=bool)
        usable = self.home | np.asarray(arrived, dtype=bool)  # [G, E]
        stats = LayerStats()
        dispatch_range = record_function("probe.ep.dispatch")
        dispatch_range.__enter__()
        flat_e = topk_ids.reshape(-1).to(torch.int64).cpu()  # [P] (one host copy per layer)
        dest, stats.pairs_fallback = self.destinations(flat_e, quota, usable)  # [P]

        # Order pairs by (destination, expert), token order inside: the wire layout.
        key = dest * num_experts + flat_e
        send_order = torch.argsort(key, stable=True)  # [P]
        send_counts = torch.bincount(key, minlength=num_ranks * num_experts)  # [G*E]
        stats.pairs_sent = send_counts.view(num_ranks, num_experts).sum(dim=1).numpy()
        token_of_pair = send_order // top_k  # [P]
        device = x.device
        num_pairs = token_of_pair.numel()

        if self.ctx.group is None or num_ranks == 1:
            recv_counts = send_counts.view(1, num_experts)  # [S=1, E]
            x_recv = x.index_select(0, token_of_pair.to(device))  # [P, D]
            stats.rows_sent = stats.pairs_sent.copy()
        elif not self.dedup:
            x_send = x.index_select(0, token_of_pair.to(device))  # [P, D]
            stats.rows_sent = stats.pairs_sent.copy()
            counts_dev = send_counts.to(device)
            recv_counts_dev = torch.empty_like(counts_dev)
            self._a2a(recv_counts_dev, counts_dev, None, None, "dispatch counts")
            recv_counts = recv_counts_dev.cpu().view(num_ranks, num_experts)  # [S, E]
            in_splits = stats.pairs_sent.tolist()
            out_splits = recv_counts.sum(dim=1).tolist()
            x_recv = x.new_empty((sum(out_splits), x.shape[1]))
            self._a2a(x_recv, x_send, out_splits, in_splits, "dispatch")
        else:
            # Each token goes once to each rank that runs any of its pairs: rows [U, D] in
            # (destination, token) order, plus for every pair on the wire the index of its
            # token's row within that destination's block.
            stride = max(num_tokens, 1)
            dest_tok = dest * stride + torch.arange(num_pairs) // top_k  # [P]
            uniq, inverse = torch.unique(dest_tok, return_inverse=True)  # [U], [P]
            rows_to = torch.bincount(uniq // stride, minlength=num_ranks)  # [G]
            stats.rows_sent = rows_to.numpy()
            first_row = torch.cumsum(rows_to, 0) - rows_to  # [G]
            wire_index = inverse[send_order] - first_row[dest[send_order]]  # [P]
            x_send = x.index_select(0, (uniq % stride).to(device))  # [U, D]
            counts = torch.cat((send_counts.view(num_ranks, num_experts), rows_to[:, None]), 1)
            counts_dev = counts.reshape(-1).to(device)  # [G * (E + 1)]
            recv_counts_dev = torch.empty_like(counts_dev)
            self._a2a(recv_counts_dev, counts_dev, None, None, "dispatch counts")
            recv_all = recv_counts_dev.cpu().view(num_ranks, num_experts + 1)  # [S, E + 1]
            recv_counts, rows_from = recv_all[:, :num_experts], recv_all[:, num_experts]
            in_splits = stats.pairs_sent.tolist()
            out_splits = recv_counts.sum(dim=1).tolist()
            index_recv = torch.empty(sum(out_splits), dtype=torch.int64, device=device)
            self._a2a(index_recv, wire_index.to(device), out_splits, in_splits,
                      "dispatch index")
            rows_recv = x.new_empty((int(rows_from.sum()), x.shape[1]))
            self._a2a(rows_recv, x_send, rows_from.tolist(), stats.rows_sent.tolist(),
                      "dispatch")
            source_first = torch.cumsum(rows_from, 0) - rows_from  # [S]
            source_of_pair = torch.repeat_interleave(torch.arange(num_ranks),
                                                     torch.as_tensor(out_splits))
            x_recv = rows_recv.index_select(
                0, index_recv + source_first[source_of_pair].to(device))  # [N_recv, D]

        received = recv_counts.sum(dim=0).numpy() > 0  # [E]
        stats.replicas_used = int((received & ~self.home[self.ctx.rank]).sum())
        dispatch_range.__exit__(None, None, None)
        # Expert compute: rows of the same expert from all sources, source order then token.
        hooks.before_experts()
        t0 = time.perf_counter()
        single_source = recv_counts.shape[0] == 1  # rows already grouped by expert
        row_expert = torch.repeat_interleave(
            torch.arange(num_experts).repeat(recv_counts.shape[0]), recv_counts.reshape(-1))
        per_expert = torch.bincount(row_expert, minlength=num_experts).tolist()
        by_expert_host = None if single_source else torch.argsort(row_expert, stable=True)
        by_expert = None if single_source else by_expert_host.to(device)
        y_recv = torch.empty_like(x_recv)
        pos = 0
        with record_function("probe.ep.experts"):
            if self.grouped is not None:  # all home experts in one grouped GEMM per projection
                self._home_grouped(x_recv, y_recv, row_expert, by_expert_host, per_expert)
            for e, n in enumerate(per_expert):
                if n == 0:
                    continue
                if self.home[self.ctx.rank, e]:
                    if self.grouped is not None:
                        pos += n
                        continue
                    params = self.experts.get(e)
                else:
                    if replica_params is None or not arrived[self.ctx.rank, e]:
                        raise RuntimeError(
                            f"rank {self.ctx.rank} layer {self.layer}: received tokens of "
                            f"expert {e}, which it neither holds nor has a replica of (ranks "
                            "disagree on the plan)")
                    params = replica_params(e)
                    stats.pairs_on_replicas += n
                if single_source:
                    y_recv[pos:pos + n] = self.expert_fn(params, x_recv[pos:pos + n])
                else:
                    rows = by_expert[pos:pos + n]
                    y_recv[rows] = self.expert_fn(params, x_recv.index_select(0, rows))
                pos += n
        stats.pairs_processed = int(x_recv.shape[0])
        stats.expert_seconds = time.perf_counter() - t0

        hooks.before_combine()
        with record_function("probe.ep.combine"):
            if self.ctx.group is None or num_ranks == 1:
                y_send = y_recv
            else:
                y_send = y_recv.new_empty((num_pairs, y_recv.shape[1]))
                self._a2a(y_send, y_recv, in_splits, out_splits, "combine")
            hooks.after_combine()
            y_pairs = torch.empty_like(y_send)
            y_pairs[send_order.to(device)] = y_send
            out = self.combine(y_pairs.view(num_tokens, top_k, x.shape[1]),
                               topk_weights)  # [T, D]
        return out, stats


def _fallback_pairs(quota: np.ndarray, usable: np.ndarray, owner: np.ndarray,
                    counts: np.ndarray, split: np.ndarray) -> int:
    """Pairs sent home only because their planned rank could not run them."""
    ideal = split_counts(quota, np.ones_like(usable, dtype=bool), owner, counts)
    return int(np.maximum(ideal - split, 0).sum())
