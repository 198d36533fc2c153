"""Balancing policies of the runtime: static EP, DeepSeek EPLB, EPLB + LP, PROBE, PROBE-on-EPLB.

The same definitions as the simulator's (docs/fair.md), executed for real. Every policy gets
k extra expert slots per rank (`PolicySlots`); what differs is what the slots hold and how the
TRUE tokens are split over the copies at dispatch:

    policy         resident layout (b slots)            per-step (p slots)   split at dispatch
    static         sharded home (b = 0)                 none                 all home
    eplb           DeepSeek EPLB, b = k                 none                 even over copies
    eplb-lp        DeepSeek EPLB, b = k                 none                 LP on true counts
    probe          sharded home (b = 0)                 p = k, predicted     the plan's split
    probe-on-eplb  DeepSeek EPLB, b (default k - p)     p, predicted         water-filling

Shape legend: L MoE layers, E experts, G ranks, S source ranks (= G), C resident slots.

Resident layout (`ResidentExperts`): `rebalance_experts` (global policy) packs E + b G physical
experts, E / G + b per rank, from the mean group-wide load of the last `window` steps, and is
re-planned every `interval` steps at a step boundary. The re-plan's weight moves run
synchronously there (every rank waits for them; timed). This runtime keeps every rank's sharded
home experts loaded (they are PROBE's transfer sources and the weights the checkpoint loader
gives each rank), so the resident storage holds the layout's experts that are NOT at home on
the rank, at most E / G + b per layer; tokens are routed only to the layout's copies (and to
arrived per-step replicas), never to a home expert that the layout left out.

Splits (`dispatch_quota`), all on the TRUE counts of this step:
    even       DeepSeek's even split over physical copies (`probe.planner.eplb.even_split`):
               needs only this rank's own counts, no collective.
    lp         `probe.planner.assign.assign_tokens(..., method="lp")` (HiGHS) on the gathered
               [S, E] counts over the copies present: one all_gather of every rank's [E]
               counts per MoE layer (G x E int64 values on the wire), then the LP on every rank.
    waterfill  `assign_tokens(..., method="waterfill", home=layout)` (Numba kernel) on the
               gathered counts over the layout plus the per-step replicas that ARRIVED; the
               counts ride on the balancer's per-layer all_gather (no extra collective).
Every rank computes the same split from the same inputs; a rank only ever sends to ranks that
hold a copy, so even a split that differed between ranks would stay correct (the receivers
learn their counts from the dispatch's own counts exchange).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from probe.planner.deepseek_eplb import eplb_copies
from probe.runtime.dist import DistContext, guarded

__all__ = ["POLICIES", "SPLITS", "PolicySlots", "ResidentExperts", "dispatch_quota", "eplb_copies",
           "policy_slots"]

POLICIES = ("static", "eplb", "eplb-lp", "probe", "probe-on-eplb")
SPLITS = {"eplb": "even", "eplb-lp": "lp", "probe-on-eplb": "waterfill"}


@dataclass(frozen=True)
class PolicySlots:
    """Extra expert slots per rank of one policy: resident (EPLB layout) and per-step."""

    policy: str
    resident: int  # b: redundant EPLB slots per rank, every MoE layer, permanently filled
    per_step: int  # p: PROBE replica slots per rank per buffer (two buffers)

    @property
    def balance(self) -> bool:
        """The policy predicts and plans per-step replicas (the Balancer runs)."""
        return self.policy in ("probe", "probe-on-eplb")

    @property
    def split(self) -> str | None:
        """Dispatch-time split on the true counts ("even", "lp", "waterfill"), or None."""
        return SPLITS.get(self.policy)


def policy_slots(policy: str, extra_slots: int, resident_slots: int | None = None
                 ) -> PolicySlots:
    """Share `extra_slots` (k) among resident and per-step slots for `policy`.

    probe-on-eplb: b = resident_slots, default max(k - max(1, k // 2), 0) (the simulator's
    `rule_split`); the others ignore resident_slots except that it must not contradict them.

    >>> policy_slots("probe-on-eplb", 3)
    PolicySlots(policy='probe-on-eplb', resident=2, per_step=1)
    >>> policy_slots("eplb", 2).resident, policy_slots("probe", 2).per_step
    (2, 2)
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if isinstance(extra_slots, bool) or not isinstance(extra_slots, int) or extra_slots < 0:
        raise ValueError(f"extra_slots must be an int >= 0, got {extra_slots!r}")
    k = extra_slots
    if policy == "probe-on-eplb":
        b = max(k - max(1, k // 2), 0) if resident_slots is None else resident_slots
        if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b <= k:
            raise ValueError(f"resident_slots must be an int in [0, extra_slots = {k}], "
                             f"got {resident_slots!r}")
        return PolicySlots(policy, b, k - b)
    fixed = {"static": (0, 0), "eplb": (k, 0), "eplb-lp": (k, 0), "probe": (0, k)}[policy]
    if resident_slots is not None and resident_slots != fixed[0]:
        raise ValueError(f"resident_slots={resident_slots} contradicts policy {policy!r} "
                         f"(resident slots {fixed[0]}); only probe-on-eplb takes a split")
    return PolicySlots(policy, *fixed)


def dispatch_quota(split: str, rank: int, counts: np.ndarray, copies: np.ndarray, cost, *,
                   layout: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """This rank's quota int64 [E, G] of its TRUE pairs over the copies present, and the
    seconds the split's solve took.

    split: "even", "lp" or "waterfill" (module doc).
    counts: int [S, E] true pairs per source rank ("even" reads only row `rank`).
    copies: int [G, E] copies present (resident layout + arrived per-step replicas).
    cost: the planner's CostModel (alpha, beta, token_time). layout: bool [G, E], the
        resident layout ("waterfill" then never does worse than the layout-only split).
    """
    from probe.planner.assign import assign_tokens
    from probe.planner.eplb import even_split

    counts = np.asarray(counts, dtype=np.int64)
    copies = np.asarray(copies, dtype=np.int64)
    t0 = time.perf_counter()
    if split == "even":
        own = np.zeros_like(counts)
        own[rank] = counts[rank]
        quota = even_split(own, copies)[rank]
    elif split in ("lp", "waterfill"):
        method = "lp" if split == "lp" else "waterfill"
        quota = assign_tokens(counts, copies, cost, method=method,
                              home=layout if split == "waterfill" else None)[rank]
    else:
        raise ValueError(f"split must be 'even', 'lp' or 'waterfill', got {split!r}")
    return quota.astype(np.int64), time.perf_counter() - t0


class ResidentExperts:
    """The EPLB layout of every MoE layer, kept resident in this rank's own storage.

    Args:
        ctx: process groups and rank (re-plan moves run on `ctx.group`, at step boundaries).
        home: bool [G, E], the sharded home (always loaded).
        home_params: function (layer, e) -> {name: tensor [*shape]} of a home expert here.
        shapes: weight name -> shape of one expert's tensor.
        num_layers: L. resident: b, redundant slots per rank. interval: steps between
        re-plans. window: steps of load history a re-plan averages.
        dtype: storage dtype, one for all or a mapping weight name -> dtype (packed experts,
            as `probe.runtime.transfer.SlotPool`). device: storage.
    The first layout (at construction, before any load was seen) is planned on uniform
    weights; `observe` records this rank's true load, `end_step` closes a step, and
    `maybe_replan(step)` re-plans when `step` is a positive multiple of `interval`.
    """

    def __init__(self, ctx: DistContext, home: np.ndarray, home_params, shapes: dict,
                 num_layers: int, resident: int, *, interval: int, window: int,
                 dtype: torch.dtype | dict[str, torch.dtype], device: torch.device) -> None:
        for name, value, low in (("interval", interval, 1), ("window", window, 1),
                                 ("resident", resident, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        self.ctx = ctx
        self.home = np.asarray(home, dtype=bool)
        self.num_ranks, self.num_experts = self.home.shape
        if self.num_experts % self.num_ranks:
            raise ValueError(f"EPLB needs E ({self.num_experts}) divisible by the ranks "
                             f"({self.num_ranks})")
        self.home_params = home_params
        self.num_layers = int(num_layers)
        self.resident = int(resident)
        self.interval, self.window = int(interval), int(window)
        self.capacity = self.num_experts // self.num_ranks + self.resident  # C
        dtypes = dtype if isinstance(dtype, dict) else dict.fromkeys(shapes, dtype)
        self.storage = {name: torch.zeros((self.num_layers, self.capacity, *shape),
                                          dtype=dtypes[name], device=device)
                        for name, shape in shapes.items()}
        # slot_of[l]: expert -> slot of this rank's resident copy (experts not at home here)
        self.slot_of: list[dict[int, int]] = [{} for _ in range(self.num_layers)]
        self.layout = np.zeros((self.num_layers, self.num_ranks, self.num_experts), np.int64)
        self.history: deque[np.ndarray] = deque(maxlen=self.window)
        self._this_step = np.zeros((self.num_layers, self.num_experts))
        self.replans = 0
        self.last_move_s = 0.0  # seconds of the last re-plan's weight moves on this rank
        self.last_move_bytes = 0  # bytes this rank received in the last re-plan
        self.replan(np.ones((self.num_layers, self.num_experts)))

    # -- load history -------------------------------------------------------------------------
    def observe(self, layer: int, counts: np.ndarray) -> None:
        """This rank's true pairs [E] at `layer` in the current step."""
        self._this_step[layer] = counts

    def end_step(self) -> None:
        self.history.append(self._this_step)
        self._this_step = np.zeros_like(self._this_step)

    def maybe_replan(self, step: int) -> bool:
        """Re-plan from the window's group-wide load when `step` is a positive multiple of
        `interval` (one all_gather of [L, E] float64, then the moves). Returns whether it did."""
        if step <= 0 or step % self.interval or not self.history:
            return False
        from probe.runtime.balancer import all_gather_fields

        local = np.mean(np.stack(self.history), axis=0)  # [L, E] this rank's mean load
        got = all_gather_fields(self.ctx, {"load": local}, "EPLB re-plan all_gather")
        self.replan(got["load"].sum(axis=0))
        return True

    # -- layout and moves ---------------------------------------------------------------------
    def copies(self, layer: int) -> np.ndarray:
        """int64 [G, E]: the layout's physical copies of layer `layer` per rank."""
        return self.layout[layer]

    @property
    def resident_copies(self) -> int:
        """Copies in every layer's layout beyond one per expert (b G)."""
        return self.resident * self.num_ranks

    def params(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """Weights of `expert` of `layer` on this rank: home, else its resident slot."""
        if self.home[self.ctx.rank, expert]:
            return self.home_params(layer, expert)
        slot = self.slot_of[layer][int(expert)]
        return {name: t[layer, slot] for name, t in self.storage.items()}

    def replan(self, weight: np.ndarray) -> None:
        """New layout from weights float [L, E]; moves the weights synchronously (timed).

        A resident copy that the new layout keeps on the same rank stays in its slot; every
        new one comes from the expert's sharded home rank. Every rank derives the same list
        of moves from the old and new layouts (identical on every rank)."""
        new = eplb_copies(np.asarray(weight, dtype=np.float64), self.resident, self.num_ranks)
        rank, owner = self.ctx.rank, np.argmax(self.home, axis=0)
        moves: list[tuple[int, int, int]] = []  # (layer, g, e): a new resident copy on g
        for layer in range(self.num_layers):
            was = (self.layout[layer] > 0) & ~self.home  # [G, E]
            need = (new[layer] > 0) & ~self.home  # [G, E]
            moves += [(layer, int(g), int(e)) for g, e in np.argwhere(need & ~was)]
            kept = {e: s for e, s in self.slot_of[layer].items() if need[rank, e]}
            free = [s for s in range(self.capacity) if s not in kept.values()]
            for e in np.flatnonzero(need[rank] & ~was[rank]):
                kept[int(e)] = free.pop(0)
            self.slot_of[layer] = kept
        self._move(moves, owner)
        self.layout = new
        self.replans += 1

    def _move(self, moves: list[tuple[int, int, int]], owner: np.ndarray) -> None:
        """Post every send and receive of the re-plan at once, then wait for all (timed)."""
        rank = self.ctx.rank
        t0 = time.perf_counter()
        ops, received = [], 0
        for layer, g, e in moves:
            h = int(owner[e])
            if rank not in (g, h):
                continue
            tensors = self.home_params(layer, e) if rank == h else self.params(layer, e)
            for i, name in enumerate(sorted(tensors)):
                t = tensors[name]
                tag = ((layer * self.num_ranks + g) * self.num_experts + e) * 8 + i
                if rank == g:
                    received += t.numel() * t.element_size()
                ops.append(("send" if rank == h else "recv", t, g if rank == h else h, tag))
        if ops and self.ctx.group is not None:
            use_nccl = dist.get_backend(self.ctx.group) == "nccl"
            with guarded("EPLB re-plan weight moves", rank, self.ctx.watchdog):
                if use_nccl:
                    works = dist.batch_isend_irecv([
                        dist.P2POp(dist.isend if kind == "send" else dist.irecv, t, peer,
                                   self.ctx.group) for kind, t, peer, _ in ops])
                else:
                    works = [(dist.isend if kind == "send" else dist.irecv)(
                        t, peer, group=self.ctx.group, tag=tag) for kind, t, peer, tag in ops]
                for w in works:
                    w.wait()
                if use_nccl:
                    torch.cuda.synchronize(self.ctx.device)
        self.last_move_s = time.perf_counter() - t0
        self.last_move_bytes = received

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.storage.values())
