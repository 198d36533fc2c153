"""Dispatch-time token assignment: split the TRUE load over the expert copies present.

When a layer's dispatch all-to-all starts, the routing counts are known and the replicas have
arrived; what remains is to send each (source rank, expert)'s tokens to the expert's copies so
that the slowest rank finishes first. A misprediction then costs only the replica choice,
never the token split.

Shape legend: S source ranks (= G), E experts, G ranks.

`assign_tokens(load, copies, cost)` works in two stages, the same for both methods, and
"waterfill" adds a third:

1. Per-rank totals (the stage-1 objective). Choose x[e, g] >= 0, the tokens of expert e
   processed on rank g, with sum_g x[e, g] = n_e (the expert's total) and x[e, g] = 0 where g
   holds no copy, to minimise the largest level
       L(g) = sum over experts e with x[e, g] > 0 of
              (alpha + beta * x[e, g] + hop[g] * max(x[e, g] - load[g, e], 0)),
   the compute term of eq. 8 plus its dispatch-in traffic: tokens beyond rank g's own
   load[g, e] come from other ranks, each costing hop[g] = 2 x the mean token_time into g
   (dispatch + combine). A rank that receives no tokens of an expert pays no alpha for it.
   Several copies of one expert on one rank count as one (as in `CostModel.compute_time`).
   Eq. 8's out-traffic and its max(in, out) are NOT in L: L is exact for compute and, on
   equal links, for the in-traffic of the locality-first split of stage 2.
   Experts with one holder are fixed; the others are
     "waterfill": water-filled, heaviest first: an expert's tokens raise the lowest levels
        among its holders to one common level (each holder's level rises at beta per token
        while it uses its own tokens, beta + hop[g] after, and only once the level passes its
        level + alpha); then `passes` rounds of taking every expert out and filling it again
        (coordinate descent; stops early when no level moves by 1 ns). A Numba kernel, with a
        plain-Python twin (`assign_tokens_ref`) that gives identical integers; its scalar
        rules (`@rule`) are compiled a second time for the GPU (`assign_cuda`), so the two
        add the same floats in the same order. One refill (`_refill`) reads and writes only
        its expert's split and its holders' levels, so experts with no rank in common
        commute: the GPU refills them side by side (assign_cuda's "waves" schedule). The
        descent runs from several starts (see `assign_tokens`) and the best by eq. 8 is
        kept. One start is the locality split (each holder its own tokens, the tokens of
        sources without a copy split evenly), descended with the experts whose holders are
        all their sources kept there (`_pinned`): the descent, one expert at a time, would
        move such an expert (e.g. one on every rank) away from its holders' own tokens, into a
        local optimum that the exchange step cannot leave (the worst ep=8 layers of
        results/assign_level.md before this start, +1.1% above the LP; the LP keeps those
        experts local). The fixed levels are summed expert by expert (`_fixed_level`), not
        by numpy, whose order follows the memory layout.
     "lp": the LP relaxation with every present copy ACTIVE (HiGHS):
            min z  s.t.  sum_g x[e, g] = n_e,  x >= 0,  r[e, g] >= x[e, g] - load[g, e], r >= 0,
                         fixed(g) + sum over multi-copy e held on g of
                             (alpha + beta x[e, g] + hop[g] r[e, g]) <= z,
        i.e. L with the alpha of every copy of a multi-copy expert charged whether or not it
        gets tokens. Its optimum z* is the exact optimum of that relaxation; water-filling can
        beat it by leaving a copy idle (saving its alpha), and lose to it by stopping in a
        local optimum of the non-convex (alpha) problem.
2. Integer split, shared by both methods (so their comparison isolates stage 1): each expert's
   totals are rounded by largest remainder (onto ranks with x > 0 only), then every source
   first keeps its own tokens on its own rank where that rank has a quota, and sends the rest
   to the holders in order of token_time[s, g] (ties: lower rank first). With equal links
   every rank's in and out traffic then depend only on what stays local; across nodes the
   order among remote holders is a greedy, not an optimum.

3. Exchange step ("waterfill" only; `moves`, default `default_moves(G)`: 20, or one per rank
   beyond 20 ranks): stage 1 leaves out eq. 8's
   out-traffic and its max(in, out), and charges the in-traffic at the mean link, so the best
   candidate of stages 1-2 can sit a few percent above the LP's (results/assign_level.md: up
   to +17% at ep=64 without this step), and the descent, one expert at a time, stops where
   only a joint change of several would lower the largest level. `_exchange` then works on
   eq. 8 itself, on the integer quotas of every start's candidate (each a different local
   optimum; from the even split, not descended, it often ends lowest): each move takes the
   slowest rank a, and tries moving part of one expert's quota between two of its holders:
   between a and its PARTNERS least loaded other holders b (a -> b when a's compute or
   in-traffic binds, b -> a when a keeps more of its own tokens: its out-traffic binds), and,
   when a's out-traffic binds, for each expert a sends tokens of, from the holder on a's
   dearest link to the one on its cheapest (a's tokens then take the cheap link: across
   nodes, where stage 1's mean link hides the difference, the cause of the worst ep=64
   layers). Each try re-routes the expert exactly as stage 2 does and re-scores every rank;
   the move that lowers (the largest rank time, then a's) the most is made. When none does
   (typically every rank within a hair of a's, where whatever a sheds lifts another rank
   above it), it tries swaps: a keeps its own tokens of one expert e that a partner b
   processed, and hands b part of another expert f's quota, as one move; a's in- and
   out-traffic both fall and b's compute stays about even (the ep=8 layers that single moves
   left 1.1-1.3% above the LP). The step stops when no move or swap helps. A bound on a's
   own time skips the exact look at moves that cannot help. Each exchanged candidate
   competes with the others by eq. 8 (`_objective`).

`probe.planner.check.evaluate_plan` scores the result as for any plan (docs/planner.md,
"Dispatch-time assignment").

>>> from probe.planner.cost import CostModel
>>> cost = CostModel.uniform(2, alpha=1.0, beta=1.0, token_time=0.0, transfer_time=1.0)
>>> load = np.array([[6, 2], [4, 0]])       # expert 0: 10 tokens, expert 1: 2 tokens
>>> copies = np.array([[1, 1], [1, 0]])     # expert 0 on both ranks, expert 1 on rank 0
>>> a = assign_tokens(load, copies, cost)   # rank 0: 1 + 2 for expert 1, so 4 of expert 0
>>> a.sum(axis=0).tolist()                  # [E, G] tokens of expert e on rank g
[[4, 6], [2, 0]]
>>> (a == assign_tokens_ref(load, copies, cost)).all()
np.True_
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import float64, int64

from probe.planner.cost import CostModel
from probe.planner.highs_base import highs_lp, new_highs
from probe.planner.problem import checked_load
from probe.planner.scalar import add_at, dmax, dmin, mul, rule

__all__ = ["assign_tokens", "assign_tokens_ref", "default_moves", "lp_totals"]

METHODS = ("waterfill", "lp")
# The exchange step's default number of moves (`assign_tokens`, `default_moves`): MOVES, or
# MOVES_PER_RANK per rank where that is more (each move lowers one rank, and at ep=64 dozens
# of ranks sit within 1% of the slowest).
MOVES = 20
MOVES_PER_RANK = 1
PARTNERS = 2  # `_exchange` tries the PARTNERS least loaded other holders of each expert


def _validated(load, copies, cost) -> tuple[np.ndarray, np.ndarray]:
    """load int64 [S, E] and holds bool [G, E]; ValueError/TypeError naming the argument."""
    if not isinstance(cost, CostModel):
        raise TypeError(f"cost must be a CostModel, got {type(cost).__name__}")
    load = checked_load(load)
    copies = np.asarray(copies)
    if copies.ndim != 2:
        raise ValueError(f"copies must be a 2-D [G, E] array, got shape {copies.shape}")
    if copies.dtype.kind not in "iub":
        raise TypeError(f"copies must be int or bool, got dtype {copies.dtype}")
    if np.any(copies < 0):
        raise ValueError("copies must be >= 0")
    num_ranks = cost.num_ranks
    if copies.shape[0] != num_ranks:
        raise ValueError(f"copies has {copies.shape[0]} ranks, the cost model {num_ranks}")
    if load.shape != copies.shape:
        raise ValueError(f"load shape {load.shape} does not match copies shape {copies.shape} "
                         "(load is [S, E] with S = G)")
    if not cost.beta > 0:
        raise ValueError(f"cost.beta must be > 0 to split tokens, got {cost.beta!r}")
    load = load.astype(np.int64)
    holds = copies > 0
    orphan = np.flatnonzero((load.sum(axis=0) > 0) & ~holds.any(axis=0))
    if orphan.size:
        e = orphan[0]
        raise ValueError(f"copies: expert {e} has {int(load[:, e].sum())} tokens but no copy "
                         f"({orphan.size} such expert(s) in all)")
    return load, holds


def remote_cost(cost: CostModel) -> np.ndarray:
    """float64 [G]: hop[g], seconds a token from another rank adds to rank g's level in
    stage 1: twice (dispatch + combine) the mean token_time into g from the other ranks."""
    num_ranks = cost.num_ranks
    if num_ranks == 1:
        return np.zeros(1)
    return 2.0 * cost.token_time.sum(axis=0) / (num_ranks - 1)


def _fixed_levels(load, holds, alpha, beta, hop):
    """Stage-1 inputs: levels float [G] of the single-holder experts (`_fixed_level`), totals
    float [E], and the multi-holder experts with tokens, heaviest first (stable), int64 [M]."""
    total = load.sum(axis=0)  # [E] int64
    num_holders = holds.sum(axis=0)
    fixed = _fixed_all(holds, num_holders, total.astype(np.float64), load, float(alpha),
                       float(beta), hop)
    multi = np.flatnonzero((num_holders > 1) & (total > 0))
    order = multi[np.argsort(-total[multi], kind="stable")].astype(np.int64)
    return fixed, total.astype(np.float64), order


# --- the Numba kernel (stage 1 water-filling + stage 2 split) ---------------------------------
# The scalar rules (`@rule`) are compiled here for the CPU and by assign_cuda for the GPU: one
# source, the same operations in the same order on both (probe.planner.scalar).

@rule(inline=True)
def _level_of(x, local, alpha, beta, hop):  # pragma: no cover - compiled
    """What x > 0 tokens of one expert add to a rank's level, `local` of them its own."""
    return alpha + mul(beta, x) + mul(hop, dmax(x - local, 0.0))


@rule(inline=True)
def _tokens_at(w, a, b, local, beta, denom):  # pragma: no cover - compiled
    """Tokens a holder takes at water level w: none below a (its level + alpha), 1 / beta
    per second up to b (its own tokens used up), 1 / denom above (denom = beta + hop)."""
    if w <= a:
        return 0.0
    if w <= b:
        return (w - a) / beta
    return local + (w - b) / denom


@rule(inline=True)
def _fixed_level(g, holds, nhold, total, load, alpha, beta, hop):  # pragma: no cover
    """Rank g's level from the single-holder experts with tokens that it holds: the sum of
    their `_level_of` (all their tokens), in expert order, one after another. Written out
    (not numpy's sum, whose order depends on the array's memory layout and numpy's version)
    so that the CPU and the GPU add the same floats in the same order."""
    level = 0.0
    for e in range(nhold.shape[0]):
        if nhold[e] == 1 and total[e] > 0 and holds[g, e]:
            level += _level_of(float64(total[e]), float64(load[g, e]), alpha, beta, hop)
    return level


@numba.njit(cache=True)
def _fixed_all(holds, nhold, total, load, alpha, beta, hop):  # pragma: no cover - compiled
    """float [G]: `_fixed_level` of every rank."""
    fixed = np.empty(holds.shape[0])
    for g in range(holds.shape[0]):
        fixed[g] = _fixed_level(g, holds, nhold, total, load, alpha, beta, hop[g])
    return fixed


@rule(inline=True)
def _holder_lists_of(first, stop, holds, hlist, nhold):  # pragma: no cover - compiled
    """For experts first <= e < stop: the ranks holding e, ascending, into hlist[e, :n] and
    their number n into nhold[e]. (The rules that work expert by expert take a range of
    experts, so that the host makes one call, not one per expert, and a GPU thread one call
    per expert it is given.)"""
    for e in range(first, stop):
        n = 0
        for g in range(holds.shape[0]):
            if holds[g, e]:
                hlist[e, n] = g
                n += 1
        nhold[e] = n


@rule(inline=True)
def _level_at(g, fixed, order, num_order, x, load, alpha, beta, hop):  # pragma: no cover
    """Rank g's level under the split x float [E, G]: fixed[g], then the `_level_of` of each
    expert of order[:num_order] that has tokens on g, in that order. (x > 0 only on holders.)"""
    level = fixed[g]
    for i in range(num_order):
        e = order[i]
        if x[e, g] > 0:
            level += _level_of(x[e, g], float64(load[g, e]), alpha, beta, hop)
    return level


@rule(inline=True)
def _pinned(e, hlist, nhold, total, load):  # pragma: no cover - compiled
    """Whether expert e's holders hlist[e, :nhold[e]] hold all its total[e] tokens (float)
    themselves: every source with tokens of e holds a copy, so that each holder can keep its
    own and e sends nothing (the locality start's pinned experts, `_starts`)."""
    own = 0
    for h in range(nhold[e]):
        own += load[hlist[e, h], e]
    return float64(own) == total[e]


@rule(inline=True)
def _refill(first, stop, order, hlist, nhold, total, load, hop, alpha, beta, x, level, srt,
            hv, pin):  # pragma: no cover - compiled
    """Steps first <= i < stop of a descent pass, one after another: take expert
    e = order[i] out of the levels float [G] of its holders hlist[e, :nhold[e]] (ascending)
    and water-fill its total[e] tokens again, into row e of x float [E, G] and those levels.
    A step reads and writes only row e of x and its holders' levels. Returns the largest
    move, |new - old share| * beta (seconds), over the steps. Scratch: srt float [2 G], the
    sorted breakpoints; hv float [4, G], per holder h its level + alpha, the level where its
    own tokens run out, its own tokens, and beta + hop. With `pin`, an expert whose
    holders are every source of its tokens (`_pinned`) is left as it is. (A range, as the
    other rules that work expert by expert: the host makes one call per pass, a GPU thread
    one per expert.)"""
    moved = 0.0
    for i in range(first, stop):
        e = order[i]
        nh = nhold[e]
        if pin and _pinned(e, hlist, nhold, total, load):
            continue
        m = 0
        for h in range(nh):
            g = hlist[e, h]
            local = float64(load[g, e])
            if x[e, g] > 0:  # take e out of rank g
                level[g] -= _level_of(x[e, g], local, alpha, beta, hop[g])
            a = level[g] + alpha
            b = a + mul(beta, local)
            hv[0, h] = a
            hv[1, h] = b
            hv[2, h] = local
            hv[3, h] = beta + hop[g]
            for which in range(2):
                value = a if which == 0 else b
                j = m  # insertion sort into srt[:m + 1]
                while j > 0 and srt[j - 1] > value:
                    srt[j] = srt[j - 1]
                    j -= 1
                srt[j] = value
                m += 1
        # The water level w: past the last breakpoint where the holders take < total.
        lo = srt[m - 1]
        for k in range(m):
            taken = 0.0
            for h in range(nh):
                taken += _tokens_at(srt[k], hv[0, h], hv[1, h], hv[2, h], beta, hv[3, h])
            if taken >= total[e]:
                lo = srt[k - 1] if k > 0 else srt[0]
                break
        # Between breakpoints the holders take C + S w tokens.
        c_sum = 0.0
        s_sum = 0.0
        for h in range(nh):
            if lo >= hv[1, h]:
                c_sum += hv[2, h] - hv[1, h] / hv[3, h]
                s_sum += 1.0 / hv[3, h]
            elif lo >= hv[0, h]:
                c_sum -= hv[0, h] / beta
                s_sum += 1.0 / beta
        w = (total[e] - c_sum) / s_sum
        for h in range(nh):
            g = hlist[e, h]
            share = _tokens_at(w, hv[0, h], hv[1, h], hv[2, h], beta, hv[3, h])
            moved = dmax(moved, abs(share - x[e, g]) * beta)
            x[e, g] = share
            if share > 0:
                level[g] += _level_of(share, hv[2, h], alpha, beta, hop[g])
    return moved


@rule(inline=True)
def _descend(fixed, order, num_order, hlist, nhold, total, load, hop, alpha, beta, passes, x,
             level, srt, hv, pin):  # pragma: no cover - compiled
    """Stage 1 on x float [E, G], which holds the start on entry and the split on exit: the
    levels of the start (`_level_at`), then up to `passes` rounds of `_refill` of the experts
    of order[:num_order] in turn (stop once no level moves by 1 ns; with `pin` the pinned
    experts keep their start). Scratch: level float [G], and srt, hv of `_refill`.

    A step of `_refill` touches only its expert's row of x and its holders' levels, so two
    experts with no holder in common commute: assign_cuda's wave schedule runs them side by
    side and gets the same floats as this loop. (`_refill` takes a range of steps, and the
    host one call per pass: a call per expert made the host's descent about 2x slower.)"""
    num_ranks = level.shape[0]
    for g in range(num_ranks):
        level[g] = _level_at(g, fixed, order, num_order, x, load, alpha, beta, hop[g])
    for _ in range(passes):
        moved = _refill(0, num_order, order, hlist, nhold, total, load, hop, alpha, beta, x,
                        level, srt, hv, pin)
        if moved < 1e-9:
            break


@numba.njit(cache=True)
def _holder_lists(holds):  # pragma: no cover - compiled
    """(hlist int64 [E, G], nhold int64 [E]): `_holder_lists_of` every expert."""
    num_ranks, num_experts = holds.shape
    hlist = np.zeros((num_experts, num_ranks), np.int64)
    nhold = np.zeros(num_experts, np.int64)
    _holder_lists_of(0, num_experts, holds, hlist, nhold)
    return hlist, nhold


@numba.njit(cache=True)
def _waterfill(fixed, order, hlist, nhold, total, load, hop, alpha, beta, passes, start, level,
               srt, hv, pin):  # pragma: no cover - compiled
    """x float [E, G] of the multi-holder experts in `order` (other rows 0), descending from
    the split `start` float [E, G] (zeros: fill from empty); `_descend` does the work, with
    the holder lists of `_holder_lists` and its scratch level, srt, hv (`pin`: the pinned
    experts keep their start)."""
    x = start.copy()
    _descend(fixed, order, order.shape[0], hlist, nhold, total, load, hop, alpha, beta, passes,
             x, level, srt, hv, pin)
    return x


@rule(inline=True)
def _quotas_of(first, stop, x, hlist, nhold, total, quota, rem, cand):  # pragma: no cover
    """For each expert first <= e < stop, row e of quota int64 [E, G] (zeroed here): x[e]
    rounded by largest remainder (ties: lower rank), onto ranks with x > 0 only; a single
    holder (or no water) takes all of total[e] (int). Scratch: rem float [G], cand int64
    [G]."""
    for e in range(first, stop):
        for g in range(quota.shape[1]):
            quota[e, g] = 0
        tot = total[e]
        if tot == 0:
            continue
        m = 0
        base = 0
        for h in range(nhold[e]):
            g = hlist[e, h]
            if x[e, g] > 0:
                f = float64(math.floor(x[e, g] + 1e-9))
                quota[e, g] = dmin(int64(f), tot)
                rem[g] = x[e, g] - f
                base += quota[e, g]
                j = m  # stable insertion sort of the candidates by remainder, descending
                while j > 0 and rem[cand[j - 1]] < rem[g]:
                    cand[j] = cand[j - 1]
                    j -= 1
                cand[j] = g
                m += 1
        if m == 0:
            if nhold[e] > 0:
                quota[e, hlist[e, 0]] = tot
            continue
        short = tot - base
        k = 0
        while short > 0:
            quota[e, cand[k % m]] += 1
            short -= 1
            k += 1
        k = m - 1
        while short < 0:  # floors above the total (float error): take from the smallest
            g = cand[k]
            if quota[e, g] > 0:
                quota[e, g] -= 1
                short += 1
            k = k - 1 if k > 0 else m - 1


@numba.njit(cache=True)
def _quotas(x, hlist, nhold, whole, rem, cand):  # pragma: no cover - compiled
    """int64 [E, G]: `_quotas_of` every expert of x float [E, G], with the holder
    lists of `_holder_lists`, each expert's tokens whole int64 [E] and scratch rem, cand."""
    num_experts, num_ranks = x.shape
    quota = np.zeros((num_experts, num_ranks), np.int64)
    _quotas_of(0, num_experts, x, hlist, nhold, whole, quota, rem, cand)
    return quota


@rule(inline=True)
def _holders(e, quota, left, hold):  # pragma: no cover - compiled
    """Expert e's quota per rank into left int64 [G] and the ranks holding some, in rank
    order, into hold int64 [G]; returns how many hold."""
    m = 0
    for g in range(quota.shape[1]):
        left[g] = quota[e, g]
        if left[g] > 0:
            hold[m] = g
            m += 1
    return m


@rule(inline=True)
def _cheapest_holder(s, m, hold, left, token_time):  # pragma: no cover - compiled
    """The holder among hold[:m] with quota left (left > 0) on source s's cheapest link
    (ties: the first, i.e. lower rank), or -1 when none has any left."""
    best = -1
    for i in range(m):
        g = hold[i]
        if left[g] > 0 and (best < 0 or token_time[s, g] < token_time[s, best]):
            best = g
    return best


@rule(inline=True)
def _routes_of(first, stop, quota, load, token_time, left, hold, flow, out,
               write):  # pragma: no cover - compiled
    """Tokens of each (s, e), for experts first <= e < stop, onto the quotas int64 [E, G]:
    every source first keeps what it can on its own rank, then sends the rest to the holder
    with quota left over the cheapest link (ties: lower rank). Adds the tokens sent s -> g to
    flow [S, G] (`add_at`: atomic on the GPU; whole tokens, so the order of the experts does
    not matter), or with `write` writes them into out int64 [S, E, G] instead. Scratch: left,
    hold int64 [G]. Returns False when tokens found no holder (invalid input)."""
    num_sources = load.shape[0]
    ok = True
    for e in range(first, stop):
        m = _holders(e, quota, left, hold)
        for s in range(num_sources):  # local first
            k = dmin(load[s, e], left[s])
            if k > 0:
                left[s] -= k
                if write:
                    out[s, e, s] += k
                else:
                    add_at(flow, s, s, k)
        for s in range(num_sources):
            rest = load[s, e] - dmin(load[s, e], quota[e, s])
            while rest > 0:
                best = _cheapest_holder(s, m, hold, left, token_time)
                if best < 0:
                    ok = False
                    break
                k = dmin(rest, left[best])
                left[best] -= k
                rest -= k
                if write:
                    out[s, e, best] += k
                else:
                    add_at(flow, s, best, k)
    return ok


@numba.njit(cache=True)
def _route(quota, load, holds, token_time, write):  # pragma: no cover - compiled
    """`_routes_of` every expert. Returns (flow float [S, G] tokens sent s -> g, a
    [1, 1, 1] placeholder), or with `write` (zero flow, the assignment int64 [S, E, G])."""
    num_sources, num_experts = load.shape
    num_ranks = holds.shape[0]
    flow = np.zeros((num_sources, num_ranks))
    if write:
        out = np.zeros((num_sources, num_experts, num_ranks), np.int64)
    else:
        out = np.zeros((1, 1, 1), np.int64)
    left = np.zeros(num_ranks, np.int64)  # quota left per rank
    hold = np.zeros(num_ranks, np.int64)
    _routes_of(0, num_experts, quota, load, token_time, left, hold, flow, out, write)
    return flow, out


@rule(inline=True)
def _evens_of(first, stop, load, copies, hold, tokens, flow, out, write):  # pragma: no cover
    """DeepSeek's even split (probe.planner.eplb.even_split) of experts first <= e < stop: per
    (s, e), n // c tokens to each of e's c copies (numbered rank by rank) and the n % c
    leftover to the copies k with (k + s) % c < n % c. With `write` writes them into out int64
    [S, E, G]; without, writes row e of the rank totals tokens int64 [E, G] and adds to flow
    [S, G] (`add_at`). Scratch: hold int64 [G]."""
    for e in range(first, stop):
        num_sources = load.shape[0]
        num_ranks = copies.shape[0]
        count = 0
        m = 0
        for g in range(num_ranks):
            if not write:
                tokens[e, g] = 0
            if copies[g, e] > 0:
                count += copies[g, e]
                hold[m] = g
                m += 1
        if count == 0:
            continue
        for s in range(num_sources):
            n = load[s, e]
            if n == 0:
                continue
            quota = n // count
            leftover = n % count
            k = 0
            for i in range(m):
                g = hold[i]
                got = 0
                for _ in range(copies[g, e]):
                    got += quota + (1 if (k + s) % count < leftover else 0)
                    k += 1
                if got > 0:
                    if write:
                        out[s, e, g] = got
                    else:
                        tokens[e, g] += got
                        add_at(flow, s, g, got)


@numba.njit(cache=True)
def _even(load, copies, write):  # pragma: no cover - compiled
    """`_evens_of` every expert. Returns (rank totals int64 [E, G], flow float [S, G], a
    [1, 1, 1] placeholder), or with `write` (zero totals, zero flow, the assignment int64
    [S, E, G])."""
    num_sources, num_experts = load.shape
    num_ranks = copies.shape[0]
    tokens = np.zeros((num_experts, num_ranks), np.int64)
    flow = np.zeros((num_sources, num_ranks))
    if write:
        out = np.zeros((num_sources, num_experts, num_ranks), np.int64)
    else:
        out = np.zeros((1, 1, 1), np.int64)
    hold = np.zeros(num_ranks, np.int64)
    _evens_of(0, num_experts, load, copies, hold, tokens, flow, out, write)
    return tokens, flow, out


@rule(inline=True)
def _rank_time(g, tokens, flow, token_time, alpha, beta):  # pragma: no cover - compiled
    """Rank g's term of eq. 8 for rank totals tokens int64 [E, G] and flows [S, G] (whole
    tokens, int or float): comp + 2 max(t_in, t_out), each sum in ascending order (experts,
    then sources)."""
    comp = 0.0
    for e in range(tokens.shape[0]):
        if tokens[e, g] > 0:
            comp += alpha + mul(beta, tokens[e, g])
    t_in = 0.0
    t_out = 0.0
    for s in range(flow.shape[0]):
        if s != g:
            t_in += mul(float64(flow[s, g]), token_time[s, g])
            t_out += mul(float64(flow[g, s]), token_time[g, s])
    return comp + mul(2.0, dmax(t_in, t_out))


@numba.njit(cache=True)
def _objective(tokens, flow, token_time, alpha, beta):  # pragma: no cover - compiled
    """eq. 8 of rank totals int64 [E, G] and flows float [S, G], as evaluate_plan: the
    largest `_rank_time`."""
    worst = 0.0
    for g in range(tokens.shape[1]):
        worst = dmax(worst, _rank_time(g, tokens, flow, token_time, alpha, beta))
    return worst


@rule(inline=True)
def _remote_sends(e, quota, load, token_time, left, hold, src, dst, cnt):  # pragma: no cover
    """The remote sends of expert e under the quotas int64 [E, G], exactly as `_routes_of`
    routes them (local first, then the cheapest link with quota left): writes them into
    src, dst, cnt int64 [2 G] (tokens cnt[i] from rank src[i] to rank dst[i]) and returns
    their number (at most S + G: each send ends a source's rest or a holder's quota).
    Scratch: left, hold int64 [G]."""
    num_sources = load.shape[0]
    m = _holders(e, quota, left, hold)
    for s in range(num_sources):
        left[s] -= dmin(load[s, e], left[s])
    n = 0
    for s in range(num_sources):
        rest = load[s, e] - dmin(load[s, e], quota[e, s])
        while rest > 0:
            best = _cheapest_holder(s, m, hold, left, token_time)
            if best < 0:
                break
            k = dmin(rest, left[best])
            left[best] -= k
            rest -= k
            src[n] = s
            dst[n] = best
            cnt[n] = k
            n += 1
    return n


@rule(inline=True)
def _count_time(act, tok, t_in, t_out, alpha, beta):  # pragma: no cover - compiled
    """A rank's eq. 8 time from its active experts act and tokens tok (ints) and its traffic
    t_in, t_out (seconds, one way): alpha act + beta tok + 2 max(t_in, t_out) (the compute
    summed as counts)."""
    return mul(alpha, float64(act)) + mul(beta, float64(tok)) + mul(2.0, dmax(t_in, t_out))


@rule(inline=True)
def _traffic_of(g, flow, token_time, tin, tout):  # pragma: no cover - compiled
    """Rank g's traffic under flow [S, G] (whole tokens sent s -> g) into tin[g] and tout[g]
    (seconds, one way): summed over the other ranks in ascending order."""
    t_in = 0.0
    t_out = 0.0
    for s in range(flow.shape[0]):
        if s != g:
            t_in += mul(float64(flow[s, g]), token_time[s, g])
            t_out += mul(float64(flow[g, s]), token_time[g, s])
    tin[g] = t_in
    tout[g] = t_out


@rule(inline=True)
def _move_time(e, a, b, delta, watch, quota, load, token_time, alpha, beta, tok, act, tin, tout,
               n_old, src, dst, cnt, t_in, t_out, left, hold, src2, dst2,
               cnt2):  # pragma: no cover - compiled
    """(the largest rank time, rank watch's time) of eq. 8 after moving `delta` of expert e's
    quota from rank a to rank b (quota int64 [E, G], restored on return), from the ranks'
    tokens tok, active experts act int64 [G] and traffic tin, tout float [G] (seconds, one
    way) before the move, and e's remote sends before it (src, dst, cnt [:n_old],
    `_remote_sends`). Rank g's time is alpha act + beta tok + 2 max(in, out) (eq. 8 with the
    compute summed as counts). Scratch: t_in, t_out float [G], left, hold int64 [G], src2,
    dst2, cnt2 int64 [2 G]."""
    num_ranks = quota.shape[1]
    quota[e, a] -= delta
    quota[e, b] += delta
    n_new = _remote_sends(e, quota, load, token_time, left, hold, src2, dst2, cnt2)
    quota[e, a] += delta
    quota[e, b] -= delta
    for g in range(num_ranks):
        t_in[g] = tin[g]
        t_out[g] = tout[g]
    for i in range(n_old):
        t = mul(float64(cnt[i]), token_time[src[i], dst[i]])
        t_in[dst[i]] -= t
        t_out[src[i]] -= t
    for i in range(n_new):
        t = mul(float64(cnt2[i]), token_time[src2[i], dst2[i]])
        t_in[dst2[i]] += t
        t_out[src2[i]] += t
    worst = 0.0
    at_a = 0.0
    for g in range(num_ranks):
        ntok = tok[g]
        nact = act[g]
        if g == a:
            ntok -= delta
            nact -= 1 if quota[e, a] == delta else 0
        elif g == b:
            ntok += delta
            nact += 1 if quota[e, b] == 0 else 0
        time = _count_time(nact, ntok, t_in[g], t_out[g], alpha, beta)
        worst = dmax(worst, time)
        if g == watch:
            at_a = time
    return worst, at_a


@rule(inline=True)
def _shift_sends(e, sign, quota, load, token_time, left, hold, src, dst, cnt, t_in,
                 t_out):  # pragma: no cover - compiled
    """Add (sign > 0) or take away (sign < 0) the traffic of expert e's remote sends under the
    quotas int64 [E, G] (`_remote_sends`, in their order) to or from t_in, t_out float [G]
    (seconds, one way). Scratch: left, hold int64 [G], src, dst, cnt int64 [2 G]."""
    n = _remote_sends(e, quota, load, token_time, left, hold, src, dst, cnt)
    for i in range(n):
        t = mul(float64(cnt[i]), token_time[src[i], dst[i]])
        if sign > 0:
            t_in[dst[i]] += t
            t_out[src[i]] += t
        else:
            t_in[dst[i]] -= t
            t_out[src[i]] -= t


@rule(inline=True)
def _swap_time(e, f, a, b, d_e, d_f, quota, load, token_time, alpha, beta, tok, act, tin, tout,
               t_in, t_out, left, hold, src, dst, cnt):  # pragma: no cover - compiled
    """(the largest rank time, rank a's time) of eq. 8 after a swap between ranks a and b:
    d_e of expert e's quota from b to a and d_f of expert f's (f != e) from a to b (quota
    int64 [E, G], restored on return), from the ranks' tokens tok, active experts act int64
    [G] and traffic tin, tout float [G] before it, as `_move_time` (each expert routed again,
    `_shift_sends`: e's and f's sends before taken away, after added). Scratch: t_in, t_out
    float [G], left, hold int64 [G], src, dst, cnt int64 [2 G]."""
    num_ranks = quota.shape[1]
    for g in range(num_ranks):
        t_in[g] = tin[g]
        t_out[g] = tout[g]
    _shift_sends(e, -1, quota, load, token_time, left, hold, src, dst, cnt, t_in, t_out)
    _shift_sends(f, -1, quota, load, token_time, left, hold, src, dst, cnt, t_in, t_out)
    quota[e, b] -= d_e
    quota[e, a] += d_e
    quota[f, a] -= d_f
    quota[f, b] += d_f
    _shift_sends(e, 1, quota, load, token_time, left, hold, src, dst, cnt, t_in, t_out)
    _shift_sends(f, 1, quota, load, token_time, left, hold, src, dst, cnt, t_in, t_out)
    worst = 0.0
    at_a = 0.0
    for g in range(num_ranks):
        ntok = tok[g]
        nact = act[g]
        if g == a:
            ntok += d_e - d_f
            nact += (1 if quota[e, a] == d_e else 0) - (1 if quota[f, a] == 0 else 0)
        elif g == b:
            ntok += d_f - d_e
            nact += (1 if quota[f, b] == d_f else 0) - (1 if quota[e, b] == 0 else 0)
        time = _count_time(nact, ntok, t_in[g], t_out[g], alpha, beta)
        worst = dmax(worst, time)
        if g == a:
            at_a = time
    quota[e, b] += d_e
    quota[e, a] -= d_e
    quota[f, a] += d_f
    quota[f, b] -= d_f
    return worst, at_a


@rule(inline=True)
def _apply_move(e, frm, to, delta, quota, flow, load, token_time, tok, act, tin, tout, left,
                hold, src, dst, cnt, src2, dst2, cnt2):  # pragma: no cover - compiled
    """Move delta of expert e's quota from rank frm to rank to (quota int64 [E, G]) and keep
    the exchange step's state the routing of the quotas: flow [S, G] (e's remote sends
    before taken away, after added), tok, act int64 [G] and the traffic tin, tout of the
    ranks whose flows changed, summed again (`_traffic_of`). Scratch: left, hold int64 [G],
    src, dst, cnt, src2, dst2, cnt2 int64 [2 G]."""
    num_ranks = quota.shape[1]
    n_old = _remote_sends(e, quota, load, token_time, left, hold, src, dst, cnt)
    for i in range(n_old):
        flow[src[i], dst[i]] -= cnt[i]
    if quota[e, frm] == delta:
        act[frm] -= 1
    if quota[e, to] == 0:
        act[to] += 1
    tok[frm] -= delta
    tok[to] += delta
    quota[e, frm] -= delta
    quota[e, to] += delta
    n_new = _remote_sends(e, quota, load, token_time, left, hold, src2, dst2, cnt2)
    for i in range(n_new):
        flow[src2[i], dst2[i]] += cnt2[i]
    # The traffic again of the ranks whose flows changed (left: a mark per rank).
    for g in range(num_ranks):
        left[g] = 0
    for i in range(n_old):
        left[src[i]] = 1
        left[dst[i]] = 1
    for i in range(n_new):
        left[src2[i]] = 1
        left[dst2[i]] = 1
    for g in range(num_ranks):
        if left[g] > 0:
            _traffic_of(g, flow, token_time, tin, tout)


@rule(inline=True)
def _holds(e, g, hlist, nhold):  # pragma: no cover - compiled
    """Whether rank g is among expert e's holders hlist[e, :nhold[e]]."""
    found = False  # a loop, not any(): a device function takes no generator
    for h in range(nhold[e]):
        if hlist[e, h] == g:
            found = True
    return found


@rule(inline=True)
def _move_size(k, step, avail):  # pragma: no cover - compiled
    """The k-th size (k < 3) an exchange move tries, or 0 to skip it: step (the size that
    evens the two ranks out, in [1, avail]), half of it, and all that can move (avail)
    when that is more than step and at most twice it."""
    if k == 0:
        return step
    if k == 1:
        return step // 2
    if avail == step or avail > 2 * step:
        return 0
    return avail


@rule(inline=True)
def _exchange(moves, quota, flow, load, hlist, nhold, token_time, alpha, beta, tok, act, tin,
              tout, t_in, t_out, left, hold, src, dst, cnt, src2, dst2,
              cnt2):  # pragma: no cover - compiled
    """Local search on eq. 8 itself, after rounding and routing (module docstring, step 3):
    up to `moves` times, make the move that lowers (the largest rank time, then the slowest
    rank a's) the most (the first found on ties; a: the first slowest rank), and stop when
    none does. The moves tried, each one expert e's quota moved between two of its holders:
      - between a and another holder b of e (either way: from a when its compute or
        in-traffic binds, to a when its own tokens leave); only the PARTNERS least loaded
        other holders b of each expert are tried (ties: lower rank);
      - when a's out-traffic binds (out > in) and its links differ in cost, for each
        expert e that a sends tokens of: from the holder with quota on a's dearest link
        (ties: the most quota above its own tokens, then lower rank) to the holder on a's
        cheapest link (ties: the least loaded, then lower rank; never a), so that a's
        tokens take the cheaper link (across nodes; the water-filling charges every link
        at the mean);
      - only when none of those lowers it, swaps (`_swap_time`): for each expert e that a
        holds and sends tokens of, each other holder b of e with quota of it, and each
        other multi-holder expert f with quota on a that b holds too: d_e of e's quota from
        b to a (at most what a sends, so a keeps its own tokens) and d_f of f's from a to
        b, sized (step, step), (all, all) when they differ, (step // 2, step // 2), with
        step the smaller of the two amounts that can move; scored, chosen and counted as
        one move (a bound on a's time first, as for single moves).
    quota int64 [E, G] and flow [S, G] (whole tokens sent s -> g, `_route`; the entries
    s -> s go stale) are updated in place. Rank times are `_count_time`, the traffic of each
    rank summed over the sources in ascending order (`_traffic_of`): once, then after each
    move again for the ranks whose flows it changed (the same floats as summing all again).
    The sizes tried per (expert, pair, way) (`_move_size`): the tokens that would even out
    a's time and the receiver's (at the receiver's cost per token against a's gain; at
    least 1, at most what can move), half of that, and all that can move when that is at
    most twice as many. Marks: `left` after each move. A bound on a's own time after a move
    skips the exact look (`_move_time`) at moves that cannot beat the best found. Returns
    the moves made. Scratch: tok, act int64 [G], tin, tout, t_in, t_out float [G], left,
    hold int64 [G], src, dst, cnt, src2, dst2, cnt2 int64 [2 G]."""
    num_sources = load.shape[0]
    num_experts, num_ranks = quota.shape
    for g in range(num_ranks):
        tok[g] = 0
        act[g] = 0
    for e in range(num_experts):
        for g in range(num_ranks):
            if quota[e, g] > 0:
                tok[g] += quota[e, g]
                act[g] += 1
    for g in range(num_ranks):
        _traffic_of(g, flow, token_time, tin, tout)
    made = 0
    for _ in range(moves):
        a = 0
        cur = -1.0
        times_b = 0.0
        for g in range(num_ranks):
            time = _count_time(act[g], tok[g], tin[g], tout[g], alpha, beta)
            if time > cur:
                cur = time
                a = g
        best_worst = cur
        best_a = cur
        in_max = 0.0  # a's dearest link in, cheapest and dearest out
        out_min = -1.0
        out_max = 0.0
        for s in range(num_sources):
            if s != a:
                in_max = dmax(in_max, token_time[s, a])
                out_max = dmax(out_max, token_time[a, s])
                out_min = token_time[a, s] if out_min < 0 else dmin(out_min, token_time[a, s])
        best_e = -1
        best_frm = -1
        best_to = -1
        best_delta = 0
        for e in range(num_experts):
            nh = nhold[e]
            if nh < 2:
                continue
            on_a = False
            for h in range(nh):
                if hlist[e, h] == a:
                    on_a = True
            if not on_a:
                continue
            n_old = -1  # e's sends, found at its first exact look
            last_time = -1.0
            last_b = -1
            for _pick in range(PARTNERS):  # e's other holders, least loaded first
                b = -1
                times_b = 0.0
                for h in range(nh):
                    g = hlist[e, h]
                    if g == a:
                        continue
                    time = _count_time(act[g], tok[g], tin[g], tout[g], alpha, beta)
                    after = time > last_time or (time == last_time and g > last_b)
                    if after and (b < 0 or time < times_b):
                        b = g
                        times_b = time
                if b < 0:
                    break
                last_time = times_b
                last_b = b
                link = dmax(token_time[a, b], token_time[b, a])
                rate = mul(2.0, beta + mul(2.0, link))
                even = int64((cur - times_b) / rate)
                for way in range(2):
                    if way == 0:  # from a to b
                        avail = quota[e, a]
                        frm = a
                        to = b
                    else:  # from b to a: a keeps more of its own tokens
                        avail = dmin(quota[e, b], load[a, e] - dmin(load[a, e], quota[e, a]))
                        frm = b
                        to = a
                    if avail <= 0:
                        continue
                    step = dmin(avail, dmax(even, 1))
                    for k in range(3):
                        delta = _move_size(k, step, avail)
                        if delta < 1:
                            continue
                        # a's time after the move, at best (its traffic over its dearest
                        # link in, cheapest out): not below the best found, no exact look
                        if way == 0:
                            recv = quota[e, a] - dmin(load[a, e], quota[e, a])
                            t_a = mul(alpha, float64(act[a] - (1 if delta == avail else 0)))
                            t_a += mul(beta, float64(tok[a] - delta))
                            t_a += mul(2.0, dmax(
                                tin[a] - mul(float64(dmin(delta, recv)), in_max),
                                tout[a] + mul(float64(delta - dmin(delta, recv)), out_min)))
                        else:
                            t_a = mul(alpha, float64(act[a] + (1 if quota[e, a] == 0 else 0)))
                            t_a += mul(beta, float64(tok[a] + delta))
                            t_a += mul(2.0, dmax(tin[a], tout[a] - mul(float64(delta),
                                                                       out_max)))
                        if t_a >= best_worst:
                            continue
                        if n_old < 0:
                            n_old = _remote_sends(e, quota, load, token_time, left, hold, src,
                                                  dst, cnt)
                        worst, at_a = _move_time(e, frm, to, delta, a, quota, load,
                                                 token_time, alpha, beta, tok, act, tin, tout,
                                                 n_old, src, dst, cnt, t_in, t_out, left,
                                                 hold, src2, dst2, cnt2)
                        if worst < best_worst or (worst == best_worst and at_a < best_a):
                            best_worst = worst
                            best_a = at_a
                            best_e = e
                            best_frm = frm
                            best_to = to
                            best_delta = delta
        # a's out-traffic binds and its links differ: its tokens onto cheaper links
        if tout[a] > tin[a] and out_max > out_min:
            comp_a = _count_time(act[a], tok[a], 0.0, 0.0, alpha, beta)
            for e in range(num_experts):
                nh = nhold[e]
                sent = load[a, e] - dmin(load[a, e], quota[e, a])
                if nh < 2 or sent <= 0:
                    continue
                to = -1
                times_to = 0.0
                for h in range(nh):
                    g = hlist[e, h]
                    if g == a:
                        continue
                    time = _count_time(act[g], tok[g], tin[g], tout[g], alpha, beta)
                    if to < 0 or token_time[a, g] < token_time[a, to] or (
                            token_time[a, g] == token_time[a, to] and time < times_to):
                        to = g
                        times_to = time
                frm = -1
                surplus = 0
                for h in range(nh):
                    g = hlist[e, h]
                    if g == a or quota[e, g] <= 0 or not token_time[a, g] > token_time[a, to]:
                        continue
                    more = quota[e, g] - load[g, e]
                    if frm < 0 or token_time[a, g] > token_time[a, frm] or (
                            token_time[a, g] == token_time[a, frm] and more > surplus):
                        frm = g
                        surplus = more
                if frm < 0:
                    continue
                saved = token_time[a, frm] - token_time[a, to]  # per token, one way
                rate = mul(2.0, saved) + beta + mul(2.0, token_time[a, to])
                even = int64((cur - times_to) / rate)
                avail = dmin(quota[e, frm], sent)
                step = dmin(avail, dmax(even, 1))
                n_old = -1
                for k in range(3):
                    delta = _move_size(k, step, avail)
                    if delta < 1:
                        continue
                    t_a = comp_a + mul(2.0, dmax(tin[a], tout[a] - mul(float64(delta), saved)))
                    if t_a >= best_worst:
                        continue
                    if n_old < 0:
                        n_old = _remote_sends(e, quota, load, token_time, left, hold, src, dst,
                                              cnt)
                    worst, at_a = _move_time(e, frm, to, delta, a, quota, load, token_time,
                                             alpha, beta, tok, act, tin, tout, n_old, src,
                                             dst, cnt, t_in, t_out, left, hold, src2, dst2,
                                             cnt2)
                    if worst < best_worst or (worst == best_worst and at_a < best_a):
                        best_worst = worst
                        best_a = at_a
                        best_e = e
                        best_frm = frm
                        best_to = to
                        best_delta = delta
        best_f = -1  # a swap (below), when no single move helps
        best_b = -1
        best_df = 0
        if best_e < 0:
            # Swaps between a and another holder b of an expert e that a sends tokens of:
            # d_e of e's quota from b to a (a keeps its own tokens) and d_f of another
            # expert f's from a to b (a sheds compute and in-traffic), as one move.
            for e in range(num_experts):
                sent = load[a, e] - dmin(load[a, e], quota[e, a])
                if nhold[e] < 2 or sent <= 0 or not _holds(e, a, hlist, nhold):
                    continue
                for h in range(nhold[e]):
                    b = hlist[e, h]
                    if b == a or quota[e, b] <= 0:
                        continue
                    avail_e = dmin(quota[e, b], sent)
                    for f in range(num_experts):
                        if f == e or nhold[f] < 2 or quota[f, a] <= 0 or not _holds(
                                f, b, hlist, nhold):
                            continue
                        avail_f = quota[f, a]
                        step = dmin(avail_e, avail_f)
                        for k in range(3):  # (step, step), (all, all), (step / 2, step / 2)
                            d_e = step
                            d_f = step
                            if k == 1:
                                if avail_e == avail_f:
                                    continue
                                d_e = avail_e
                                d_f = avail_f
                            elif k == 2:
                                d_e = step // 2
                                d_f = step // 2
                                if d_e < 1:
                                    continue
                            # a's time after it, at best: not below the best found, no look
                            t_a = mul(alpha, float64(act[a] + (1 if quota[e, a] == 0 else 0)
                                                     - (1 if d_f == avail_f else 0)))
                            t_a += mul(beta, float64(tok[a] + d_e - d_f))
                            t_a += mul(2.0, dmax(tin[a] - mul(float64(d_f), in_max),
                                                 tout[a] - mul(float64(d_e), out_max)))
                            if t_a >= best_worst:
                                continue
                            worst, at_a = _swap_time(e, f, a, b, d_e, d_f, quota, load,
                                                     token_time, alpha, beta, tok, act, tin,
                                                     tout, t_in, t_out, left, hold, src, dst,
                                                     cnt)
                            if worst < best_worst or (worst == best_worst and at_a < best_a):
                                best_worst = worst
                                best_a = at_a
                                best_e = e
                                best_f = f
                                best_b = b
                                best_delta = d_e
                                best_df = d_f
        if best_e < 0:
            break
        if best_f >= 0:
            _apply_move(best_e, best_b, a, best_delta, quota, flow, load, token_time, tok, act,
                        tin, tout, left, hold, src, dst, cnt, src2, dst2, cnt2)
            _apply_move(best_f, a, best_b, best_df, quota, flow, load, token_time, tok, act,
                        tin, tout, left, hold, src, dst, cnt, src2, dst2, cnt2)
        else:
            _apply_move(best_e, best_frm, best_to, best_delta, quota, flow, load, token_time,
                        tok, act, tin, tout, left, hold, src, dst, cnt, src2, dst2, cnt2)
        made += 1
    return made


@numba.njit(cache=True)
def _best(fixed, order, holds, copies, total, alpha, beta, load, token_time, hop, starts,
          start_passes, start_pin, moves, dense=True):  # pragma: no cover - compiled
    """The assignment with the lowest eq. 8 objective (the first on ties) among DeepSeek's
    even split and, for each k, the descent of `start_passes[k]` passes from `starts[k]`
    (the pinned experts kept where start_pin[k] is 1),
    rounded and routed, then (moves > 0) that improved by the exchange step (`_exchange`),
    in that order. Returns (assignment int64 [S, E, G], its objective); with
    dense=False only the objective (and a [1, 1, 1] placeholder): the decision without
    writing the dense array, for timing."""
    tokens, flow, _ = _even(load, copies, False)
    best_obj = _objective(tokens, flow, token_time, alpha, beta)
    best_quota = tokens
    from_even = True
    num_ranks = holds.shape[0]
    hlist, nhold = _holder_lists(holds)
    whole = np.zeros(load.shape[1], np.int64)  # [E] each expert's tokens
    for s in range(load.shape[0]):
        for e in range(load.shape[1]):
            whole[e] += load[s, e]
    level, srt, hv = np.empty(num_ranks), np.empty(2 * num_ranks), np.empty((4, num_ranks))
    rem, cand = np.zeros(num_ranks), np.zeros(num_ranks, np.int64)
    g2 = 2 * num_ranks  # the exchange step's scratch
    tok, act = np.zeros(num_ranks, np.int64), np.zeros(num_ranks, np.int64)
    tin, tout = np.zeros(num_ranks), np.zeros(num_ranks)
    t_in, t_out = np.zeros(num_ranks), np.zeros(num_ranks)
    left, hold = np.zeros(num_ranks, np.int64), np.zeros(num_ranks, np.int64)
    sends = np.zeros((6, g2), np.int64)
    for k in range(starts.shape[0]):
        x = _waterfill(fixed, order, hlist, nhold, total, load, hop, alpha, beta,
                       start_passes[k], starts[k], level, srt, hv, start_pin[k] != 0)
        quota = _quotas(x, hlist, nhold, whole, rem, cand)
        flow, _ = _route(quota, load, holds, token_time, False)
        obj = _objective(quota, flow, token_time, alpha, beta)
        if obj < best_obj:
            best_obj, best_quota, from_even = obj, quota, False
        if moves > 0:  # the exchange step from this candidate
            quota = quota.copy()
            # The step keeps flow the routing of its quotas (but for the stale s -> s
            # entries, which eq. 8 does not read): scored as it is, not routed again.
            _exchange(moves, quota, flow, load, hlist, nhold, token_time, alpha, beta, tok,
                      act, tin, tout, t_in, t_out, left, hold, sends[0], sends[1], sends[2],
                      sends[3], sends[4], sends[5])
            obj = _objective(quota, flow, token_time, alpha, beta)
            if obj < best_obj:
                best_obj, best_quota, from_even = obj, quota, False
    if from_even:
        _, _, out = _even(load, copies, dense)
    else:
        _, out = _route(best_quota, load, holds, token_time, dense)
    return out, best_obj


def _starts(load, holds, total, order, home, passes):
    """Candidate starts float [K, E, G], their pass counts and pin flags int64 [K]: fill from
    empty (`passes`), the even split over all copies (as is, and descended), with `home` the
    home-only split (as is, and descended), and last the locality start, descended with the
    pinned experts kept (`_pinned`; pin flag 1): each holder of an expert takes its own
    tokens, and the rest (from sources without a copy) is split evenly over the holders.
    Rows outside `order` are 0."""
    num_ranks, num_experts = holds.shape
    even = np.zeros((num_experts, num_ranks))
    share = holds[:, order].T.astype(np.float64)  # [M, G]
    even[order] = total[order, None] * share / share.sum(axis=1, keepdims=True)
    starts, start_passes = [np.zeros((num_experts, num_ranks)), even, even], [passes, 0, passes]
    if home is not None:
        at_home = (home & holds)[:, order].T.astype(np.float64)  # [M, G]
        at_home[at_home.sum(axis=1) == 0] = share[at_home.sum(axis=1) == 0]
        local = np.zeros((num_experts, num_ranks))
        local[order] = total[order, None] * at_home / at_home.sum(axis=1, keepdims=True)
        starts += [local, local]
        start_passes += [0, passes]
    own = np.where(holds[:, order], load[:, order], 0).T.astype(np.float64)  # [M, G]
    rest = (total[order] - own.sum(axis=1))[:, None]  # [M, 1] whole tokens
    locality = np.zeros((num_experts, num_ranks))
    locality[order] = np.where(share > 0, own + rest / share.sum(axis=1, keepdims=True), 0.0)
    starts.append(locality)
    start_passes.append(passes)
    pins = np.zeros(len(starts), np.int64)
    pins[-1] = 1
    return np.stack(starts), np.array(start_passes, np.int64), pins


def _checked_home(home, holds):
    if home is None:
        return None
    home = np.asarray(home)
    if home.shape != holds.shape:
        raise ValueError(f"home must be a [G, E] array like copies {holds.shape}, got shape "
                         f"{home.shape}")
    return home.astype(bool)


def default_moves(num_ranks: int) -> int:
    """The exchange step's default number of moves for num_ranks ranks:
    max(MOVES, MOVES_PER_RANK x num_ranks)."""
    return max(MOVES, MOVES_PER_RANK * int(num_ranks))


def kernel_args(load, copies, cost: CostModel, *, passes: int = 8, home=None,
                moves: int | None = None) -> tuple:
    """Validated arguments of the compiled kernel `_best`, for timing it alone."""
    load, holds = _validated(load, copies, cost)
    home = _checked_home(home, holds)
    alpha, beta = float(cost.alpha), float(cost.beta)
    hop = remote_cost(cost)
    fixed, total, order = _fixed_levels(load, holds, alpha, beta, hop)
    starts, start_passes, start_pin = _starts(load, holds, total, order, home, passes)
    counts = np.ascontiguousarray(np.asarray(copies), dtype=np.int64)
    return (fixed, order, holds, counts, total, alpha, beta, load, cost.token_time, hop, starts,
            start_passes, start_pin, _checked_moves(moves, cost.num_ranks))


def lp_totals(load, copies, cost: CostModel) -> tuple[np.ndarray, float]:
    """Stage 1 by the LP (module docstring): totals x float [E, G] of the multi-holder
    experts (other rows 0) and the LP optimum z* (seconds; max fixed level when none)."""
    import highspy

    load, holds = _validated(load, copies, cost)
    hop = remote_cost(cost)
    fixed, total, multi = _fixed_levels(load, holds, cost.alpha, cost.beta, hop)
    num_ranks, num_experts = holds.shape
    x = np.zeros((num_experts, num_ranks))
    if multi.size == 0:
        return x, float(fixed.max(initial=0.0))
    pair_g, pair_m = np.nonzero(holds[:, multi])  # (rank, index into multi) of each copy
    num_pairs, num_multi = pair_g.size, multi.size
    local = load[pair_g, multi[pair_m]].astype(np.float64)  # [P] the rank's own tokens
    # Columns: x[pair], then r[pair] (tokens of the pair from other ranks), then z (cost 1).
    # Rows: conservation per multi-holder expert (= its tokens); one level row per rank,
    # beta x + hop r - z <= -fixed - alpha * (multi-holder copies on the rank); one row per
    # pair, x - r <= local (r >= x - local, r >= 0).
    pairs = np.arange(num_pairs)
    col_x, col_r, col_z = pairs, num_pairs + pairs, 2 * num_pairs
    row_rank = num_multi + np.arange(num_ranks)
    row_pair = num_multi + num_ranks + pairs
    coef_row = np.concatenate([pair_m, num_multi + pair_g, num_multi + pair_g, row_rank,
                               row_pair, row_pair])
    coef_col = np.concatenate([col_x, col_x, col_r, np.full(num_ranks, col_z), col_x, col_r])
    coef_val = np.concatenate([np.ones(num_pairs), np.full(num_pairs, cost.beta), hop[pair_g],
                               -np.ones(num_ranks), np.ones(num_pairs), -np.ones(num_pairs)])
    num_cols = 2 * num_pairs + 1
    active = np.bincount(pair_g, minlength=num_ranks)
    lp = highs_lp(np.concatenate([np.zeros(2 * num_pairs), [1.0]]), np.zeros(num_cols),
                  np.full(num_cols, np.inf),
                  np.concatenate([total[multi], np.full(num_ranks + num_pairs, -np.inf)]),
                  np.concatenate([total[multi], -(fixed + cost.alpha * active), local]),
                  coef_row, coef_col, coef_val)
    solver = new_highs()  # silent unless asked: no banner, no log
    solver.passModel(lp)
    solver.run()
    if solver.getModelStatus() != highspy.HighsModelStatus.kOptimal:
        raise RuntimeError(f"HiGHS did not solve the assignment LP: {solver.getModelStatus()}")
    sol = np.maximum(np.asarray(solver.getSolution().col_value), 0.0)
    x[multi[pair_m], pair_g] = sol[:num_pairs]
    return x, float(sol[col_z])


def assign_tokens(load, copies, cost: CostModel, *, method: str = "waterfill",
                  passes: int = 8, home=None, moves: int | None = None) -> np.ndarray:
    """int64 [S, E, G]: tokens of (source s, expert e) processed on rank g.

    load: int [S, E] true tokens per source rank and expert (S = G, whole, >= 0).
    copies: int or bool [G, E], copies of expert e on rank g (> 0: present); every expert
        with tokens needs at least one.
    cost: the CostModel (alpha, beta, token_time) of eq. 8.
    method: "waterfill" (Numba kernel) or "lp" (HiGHS, the relaxation in the module
        docstring); both share the integer split of stage 2.
    passes: water-filling rounds (>= 1; the kernel stops early once the levels settle).
    home: optional bool [G, E], the base layout (copies present before any replica arrived):
        "waterfill" then also tries the home-only split, so it is never worse than it.
    moves: "waterfill"'s exchange step (`_exchange`): at most this many moves from each
        start's candidate (>= 0; 0: none; None: `default_moves(G)`, 20 up to 20 ranks and
        one per rank beyond).

    Every (s, e)'s tokens are conserved and land only on ranks with copies[g, e] > 0.
    "waterfill" returns the best, by eq. 8 on the integer split, of these candidates:
    DeepSeek's even split (`probe.planner.eplb.even_split`), filling from empty, the even
    split over all copies as it is and descended from, (with `home`) the home-only split as
    it is and descended from, and the locality start (each holder its own tokens) descended
    with the experts whose holders are all their sources kept local, each of the last also
    after the exchange step on eq. 8 itself (`moves`). So it is never worse than the even
    split, nor, given `home`, than the home-only split.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(passes, bool) or not isinstance(passes, (int, np.integer)) or passes < 1:
        raise ValueError(f"passes must be an int >= 1, got {passes!r}")
    _checked_moves(moves, cost.num_ranks if isinstance(cost, CostModel) else 1)
    if method == "lp":
        load, holds = _validated(load, copies, cost)
        _checked_home(home, holds)
        x, _ = lp_totals(load, holds, cost)
        num_ranks = holds.shape[0]
        hlist, nhold = _holder_lists(holds)
        quota = _quotas(x, hlist, nhold, load.sum(axis=0), np.zeros(num_ranks),
                        np.zeros(num_ranks, np.int64))
        _, out = _route(quota, load, holds, cost.token_time, True)
        return out
    out, _ = _best(*kernel_args(load, copies, cost, passes=passes, home=home, moves=moves))
    return out


def _checked_moves(moves, num_ranks: int) -> int:
    """moves as an int (None: `default_moves(num_ranks)`); ValueError unless an int >= 0."""
    if moves is None:
        return default_moves(num_ranks)
    if isinstance(moves, bool) or not isinstance(moves, (int, np.integer)) or moves < 0:
        raise ValueError(f"moves must be an int >= 0 or None, got {moves!r}")
    return int(moves)


# --- the plain-Python twin ---------------------------------------------------------------------

def assign_tokens_ref(load, copies, cost: CostModel, *, passes: int = 8,
                      home=None, moves: int | None = None) -> np.ndarray:
    """Plain-Python twin of `assign_tokens(..., method="waterfill")`: the same arithmetic in
    the same order, written for reading; tests require identical output. The exchange step
    runs `_exchange`'s own Python source (its `py_func`), not a second version of it."""
    from probe.planner.eplb import even_split

    load, holds = _validated(load, copies, cost)
    home = _checked_home(home, holds)
    alpha, beta = float(cost.alpha), float(cost.beta)
    hop = remote_cost(cost)
    fixed, total, order = _fixed_levels(load, holds, alpha, beta, hop)
    starts, start_passes, start_pin = _starts(load, holds, total, order, home, passes)
    moves = _checked_moves(moves, cost.num_ranks)
    best = even_split(load, np.asarray(copies).astype(np.int64))
    best_obj = _objective_ref(best, cost.token_time, alpha, beta)
    hlist, nhold = _holder_lists(holds)
    num_ranks = holds.shape[0]

    def ints(size):
        return np.zeros(size, np.int64)

    for start, rounds, pin in zip(starts, start_passes, start_pin, strict=True):
        x = _waterfill_ref(fixed, order, holds, total, load, hop, alpha, beta, int(rounds),
                           start, bool(pin))
        out = _split_ref(x, load, holds, cost.token_time)
        obj = _objective_ref(out, cost.token_time, alpha, beta)
        if obj < best_obj:
            best, best_obj = out, obj
        if moves > 0:
            quota = out.sum(axis=0)  # [E, G]: the routing fills every quota
            flow = out.sum(axis=1).astype(np.float64)  # [S, G]
            _exchange.py_func(moves, quota, flow, load, hlist, nhold, cost.token_time, alpha,
                              beta, ints(num_ranks), ints(num_ranks),
                              *[np.zeros(num_ranks) for _ in range(4)], ints(num_ranks),
                              ints(num_ranks), *[ints(2 * num_ranks) for _ in range(6)])
            out = _route_ref(quota, load, cost.token_time)
            obj = _objective_ref(out, cost.token_time, alpha, beta)
            if obj < best_obj:
                best, best_obj = out, obj
    return best


def _objective_ref(assignment, token_time, alpha, beta) -> float:
    """eq. 8 of an assignment int [S, E, G], summed in the kernel's order."""
    num_sources, num_experts, num_ranks = assignment.shape
    tokens = assignment.sum(axis=0)  # [E, G]
    flow = assignment.sum(axis=1)  # [S, G]
    worst = 0.0
    for g in range(num_ranks):
        comp = 0.0
        for e in range(num_experts):
            if tokens[e, g] > 0:
                comp += alpha + beta * int(tokens[e, g])
        t_in = sum(float(flow[s, g]) * token_time[s, g] for s in range(num_sources) if s != g)
        t_out = sum(float(flow[g, s]) * token_time[g, s] for s in range(num_sources) if s != g)
        worst = max(worst, comp + 2.0 * max(t_in, t_out))
    return worst


def _waterfill_ref(fixed, order, holds, total, load, hop, alpha, beta, passes, start,
                   pin=False) -> np.ndarray:
    """Plain-Python twin of stage 1 (`_waterfill`); with `pin`, the experts whose holders
    hold all their tokens themselves are not refilled."""
    num_ranks, num_experts = holds.shape
    x = [[float(v) for v in row] for row in start]
    level = [float(v) for v in fixed]
    experts = [int(v) for v in order]

    def adds(share, g, e):  # what `share` tokens of e add to rank g's level
        return alpha + beta * share + hop[g] * max(share - load[g, e], 0.0)

    def takes(w, g, e):  # tokens rank g takes at water level w
        opened = level[g] + alpha
        own = opened + beta * load[g, e]
        if w <= opened:
            return 0.0
        if w <= own:
            return (w - opened) / beta
        return load[g, e] + (w - own) / (beta + hop[g])

    for e in experts:  # the start's levels
        for g in range(num_ranks):
            if holds[g, e] and x[e][g] > 0:
                level[g] += adds(x[e][g], g, e)
    for _ in range(passes):
        moved = 0.0
        for e in experts:
            holders = [g for g in range(num_ranks) if holds[g, e]]
            if pin and sum(int(load[g, e]) for g in holders) == total[e]:
                continue  # pinned: every source of its tokens holds a copy
            for g in holders:  # take e out
                if x[e][g] > 0:
                    level[g] -= adds(x[e][g], g, e)
            points = sorted([level[g] + alpha for g in holders]
                            + [level[g] + alpha + beta * load[g, e] for g in holders])
            # w lies past the last breakpoint at which the holders take fewer than total[e].
            lo = points[-1]
            for k, point in enumerate(points):
                taken = 0.0
                for g in holders:
                    taken += takes(point, g, e)
                if taken >= total[e]:
                    lo = points[k - 1] if k > 0 else points[0]
                    break
            # Past lo the holders take C + S w tokens, linear up to the next breakpoint.
            c_sum = 0.0
            s_sum = 0.0
            for g in holders:
                opened = level[g] + alpha
                own = opened + beta * load[g, e]
                if lo >= own:
                    c_sum += load[g, e] - own / (beta + hop[g])
                    s_sum += 1.0 / (beta + hop[g])
                elif lo >= opened:
                    c_sum -= opened / beta
                    s_sum += 1.0 / beta
            w = (total[e] - c_sum) / s_sum
            shares = [takes(w, g, e) for g in holders]
            for g, share in zip(holders, shares, strict=True):
                moved = max(moved, abs(share - x[e][g]) * beta)
                x[e][g] = share
                if share > 0:
                    level[g] += adds(share, g, e)
        if moved < 1e-9:
            break
    return np.array(x).reshape(num_experts, num_ranks)


def _split_ref(x, load, holds, token_time) -> np.ndarray:
    """Plain-Python twin of stage 2 (`_quotas`, then `_route`)."""
    num_sources, num_experts = load.shape
    num_ranks = holds.shape[0]
    out = np.zeros((num_sources, num_experts, num_ranks), np.int64)
    for e in range(num_experts):
        total = int(load[:, e].sum())
        if total == 0:
            continue
        quota = [0] * num_ranks
        rem = {}
        for g in range(num_ranks):
            if holds[g, e] and x[e, g] > 0:
                f = np.floor(x[e, g] + 1e-9)
                quota[g] = min(int(f), total)
                rem[g] = x[e, g] - f
        if not rem:
            quota[int(np.flatnonzero(holds[:, e])[0])] = total
        else:
            by_rem = sorted(rem, key=lambda g: -rem[g])  # stable: lower rank first on ties
            short = total - sum(quota)
            for k in range(max(short, 0)):
                quota[by_rem[k % len(by_rem)]] += 1
            k = len(by_rem) - 1
            while short < 0:
                g = by_rem[k]
                if quota[g] > 0:
                    quota[g] -= 1
                    short += 1
                k = k - 1 if k > 0 else len(by_rem) - 1
        _route_expert_ref(out, e, quota, load, token_time)
    return out


def _route_ref(quota, load, token_time) -> np.ndarray:
    """Plain-Python twin of `_route` (write): the assignment int64 [S, E, G] of the quotas
    int [E, G]."""
    num_sources, num_experts = load.shape
    out = np.zeros((num_sources, num_experts, quota.shape[1]), np.int64)
    for e in range(num_experts):
        _route_expert_ref(out, e, [int(v) for v in quota[e]], load, token_time)
    return out


def _route_expert_ref(out, e, quota, load, token_time) -> None:
    """Expert e's tokens onto its quotas (list, consumed): local first, then the cheapest
    link with quota left (ties: lower rank), into out [S, E, G]."""
    num_sources = load.shape[0]
    holders = [g for g in range(len(quota)) if quota[g] > 0]
    left = [int(v) for v in load[:, e]]
    for s in range(num_sources):  # local first
        k = min(left[s], quota[s])
        out[s, e, s] += k
        quota[s] -= k
        left[s] -= k
    for s in range(num_sources):  # then the cheapest link with quota left
        while left[s] > 0:
            best = min((g for g in holders if quota[g] > 0),
                       key=lambda g, s=s: token_time[s, g])
            k = min(left[s], quota[best])
            out[s, e, best] += k
            quota[best] -= k
            left[s] -= k
