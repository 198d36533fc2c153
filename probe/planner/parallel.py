"""The parallel greedy, compiled with Numba: moves in rounds over disjoint rank pairs.

parallel_ref.py states the algorithm (pairs, one move per pair against the round's starting
state, exact rank times after each round) and why the pairs' moves are independent; this is the
same algorithm with arrays, in the same floating-point order, and tests demand identical plans.
The CPU kernel runs the pairs of a round one after the other; parallel_cuda.py runs them at once
(the point of the design: the rounds, not the moves, are sequential).

Per round: O(G log G) to sort the ranks, the pairing (for each hot rank, a scan of the colder
ranks, O(held experts) each), per pair one move search (O(held experts) candidates, each
O(G log T)), and the exact recomputation of the times of the ranks the moves touched.

>>> import numpy as np
>>> from probe.planner.cost import CostModel
>>> from probe.planner.problem import BalanceProblem
>>> cost = CostModel.uniform(4, alpha=0.0, beta=1.0, token_time=0.0, transfer_time=1.0)
>>> load = np.array([[8, 0, 0, 0], [0, 6, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
>>> prob = BalanceProblem.from_load(load, cost, slots=1, window=1.0)
>>> stats = {}
>>> plan = parallel_plan(prob, stats=stats)
>>> plan.tokens_per_rank_expert().tolist()
[[4, 0, 0, 0], [0, 3, 0, 0], [4, 0, 0, 0], [0, 3, 0, 0]]
>>> stats["rounds"], stats["moves"]
(1, 2)

Both hot ranks moved in the same round: rank 0 (8 tokens) took the coldest rank (2: ties go to
the lowest rank) and handed it half of expert 0 with a copy, rank 1 took rank 3.
"""

from __future__ import annotations

import time

import numba
import numpy as np

from probe.planner.greedy import _static_share, plan_from_arrays, problem_arrays
from probe.planner.kernel_rules import cannot_gain, copy_holder, home_lists, moved_compute
from probe.planner.parallel_ref import ParallelRules, checked_rules
from probe.planner.problem import BalanceProblem, Plan, SolveResult
from probe.planner.scalar import dmax, dmin, mul, rule

__all__ = ["ParallelRules", "kernel_args", "parallel_arrays", "parallel_plan", "plan_from_blocks",
           "solve_parallel_greedy", "solve_parallel_greedy_ref"]

# The scalar rules below (`@rule`) are compiled here for the CPU kernel and again by
# parallel_cuda for the GPU: one source, the same float64 operations in the same order on both
# (probe.planner.scalar). They index arrays as the GPU kernel lays them out: load [S, E], home
# and held [G, E], hpos [G, E], token_time [G, G], blk_assign [n_blk, G, S]. The CPU kernel
# keeps the [S, E], [G, E] and token-time arrays in Fortran order instead (the same indices,
# the sources of one expert adjacent in memory), so that its loops over sources read
# contiguous memory. The rules are compiled without reference counting (refcount=False): a
# candidate's rules take up to 30 arrays, and counting them per call doubled the kernel's time.
# `_static_share` is greedy.py's rule; `cannot_gain`, `copy_holder`, `home_lists` and
# `moved_compute` are shared with the greedy (probe.planner.kernel_rules). Numba's on-disk
# cache of `parallel_arrays` does not see edits to those files: clear it after changing them.


@rule(refcount=False)
def _prefix(npool, pool_s, pool_n, src, dst, tt, cum, pre):  # pragma: no cover - compiled
    """Running sums over the pool, in pool order: cum[i] tokens and pre[:, i] link seconds
    (in to src, in to dst, out of dst, out of src) of its first i entries. `_after` adds the
    partly taken entry to them, so its sums are the ones a loop over the pool would make,
    operation for operation, in O(log npool) instead of O(npool)."""
    cum[0] = 0
    for k in range(4):
        pre[k, 0] = 0.0
    for i in range(npool):
        s = pool_s[i]
        n = pool_n[i]
        cum[i + 1] = cum[i] + n
        pre[0, i + 1] = pre[0, i] + mul(n, tt[s, src])
        pre[1, i + 1] = pre[1, i]
        pre[2, i + 1] = pre[2, i]
        pre[3, i + 1] = pre[3, i]
        if s == dst:
            pre[2, i + 1] = pre[2, i] + mul(n, tt[dst, src])
        else:
            pre[1, i + 1] = pre[1, i] + mul(n, tt[s, dst])
            if s == src:
                pre[3, i + 1] = pre[3, i] + mul(n, tt[src, dst])


@rule(refcount=False)
def _after(x, e, src, dst, npool, pool_s, cum, pre, tok, comp, t_in, t_out, alpha, beta,
           tt):  # pragma: no cover - compiled
    """(T_src, T_dst) if x >= 1 tokens of e move src -> dst, taken from the pool in order (the
    twin's loop over the pool, through `_prefix`'s running sums)."""
    comp_src, comp_dst = moved_compute(x, e, src, dst, tok, comp, alpha, beta)
    lo = 0  # the entries taken whole: the last k with cum[k] <= x
    hi = npool
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cum[mid] <= x:
            lo = mid
        else:
            hi = mid - 1
    d_in_src = pre[0, lo]
    d_in_dst = pre[1, lo]
    d_out_dst = pre[2, lo]
    d_out_src = pre[3, lo]
    take = x - cum[lo]
    if take > 0:  # the entry taken in part
        s = pool_s[lo]
        d_in_src += mul(take, tt[s, src])
        if s == dst:
            d_out_dst += mul(take, tt[dst, src])
        else:
            d_in_dst += mul(take, tt[s, dst])
            if s == src:
                d_out_src += mul(take, tt[src, dst])
    t_src = comp_src + 2.0 * dmax(t_in[src] - d_in_src, t_out[src] + d_out_src)
    t_dst = comp_dst + 2.0 * dmax(t_in[dst] + d_in_dst, t_out[dst] - d_out_dst)
    return t_src, t_dst


@rule(refcount=False)
def _worst(x, e, src, dst, npool, pool_s, cum, pre, tok, comp, t_in, t_out, alpha, beta,
           tt):  # pragma: no cover - compiled
    """max(T_src, T_dst) of `_after`."""
    t_src, t_dst = _after(x, e, src, dst, npool, pool_s, cum, pre, tok, comp, t_in, t_out,
                          alpha, beta, tt)
    return dmax(t_src, t_dst)


@rule(refcount=False)
def _amount(e, src, dst, npool, pool_s, cum, pre, total, own_src, drops_alpha, tok, comp, t_in,
            t_out, alpha, beta, tt):  # pragma: no cover - compiled
    """parallel_ref._amount: tokens to move (two phases over the pool)."""
    n_other = total - own_src
    x = 0
    worst = 0.0
    if n_other > 0:
        a_src, a_dst = _after(n_other, e, src, dst, npool, pool_s, cum, pre, tok, comp, t_in,
                              t_out, alpha, beta, tt)
        x = n_other
        if a_src <= a_dst:
            lo = 1
            while lo < x:
                mid = (lo + x) // 2
                m_src, m_dst = _after(mid, e, src, dst, npool, pool_s, cum, pre, tok, comp, t_in,
                                      t_out, alpha, beta, tt)
                if m_src <= m_dst:
                    x = mid
                else:
                    lo = mid + 1
        if x > 1 and (_worst(x - 1, e, src, dst, npool, pool_s, cum, pre, tok, comp, t_in, t_out,
                             alpha, beta, tt)
                      <= _worst(x, e, src, dst, npool, pool_s, cum, pre, tok, comp, t_in, t_out,
                                alpha, beta, tt)):
            x -= 1
        t_src, t_dst = _after(x, e, src, dst, npool, pool_s, cum, pre, tok, comp, t_in, t_out,
                              alpha, beta, tt)
        worst = dmax(t_src, t_dst)
        if own_src == 0 or x < n_other or t_src <= t_dst:
            return x
    lo = n_other + 1
    hi = total - 1 if drops_alpha and total > lo else total
    while lo < hi:
        mid = (lo + hi) // 2
        if (_worst(mid + 1, e, src, dst, npool, pool_s, cum, pre, tok, comp, t_in, t_out, alpha,
                   beta, tt)
                >= _worst(mid, e, src, dst, npool, pool_s, cum, pre, tok, comp, t_in, t_out,
                          alpha, beta, tt)):
            hi = mid
        else:
            lo = mid + 1
    if n_other == 0 or _worst(lo, e, src, dst, npool, pool_s, cum, pre, tok, comp, t_in, t_out,
                              alpha, beta, tt) < worst:
        return lo
    return x


@rule(inline=True)
def _held_expert(g, i, rank_nhome, rank_home, rep_on):  # pragma: no cover - compiled
    """The i-th expert rank g holds: its home experts in id order, then its replicas."""
    return rank_home[g, i] if i < rank_nhome[g] else rep_on[g, i - rank_nhome[g]]


@rule(refcount=False)
def _rank_compute(g, alpha, beta, rank_nhome, rank_home, rep_on, used,
                  tok):  # pragma: no cover - compiled
    """Rank g's compute time: its held experts with tokens, in `_held_expert`'s order."""
    c = 0.0
    for i in range(rank_nhome[g] + used[g]):
        e = _held_expert(g, i, rank_nhome, rank_home, rep_on)
        if tok[g, e] > 0:
            c += alpha + mul(beta, tok[g, e])
    return c


@rule(refcount=False)
def _link_time(g, flow, tt, incoming):  # pragma: no cover - compiled
    """Rank g's incoming (flow[s, g] over s) or outgoing (flow[g, d] over d) link seconds,
    summed in rank order."""
    t = 0.0
    for s in range(flow.shape[0]):
        if incoming:
            t += mul(flow[s, g], tt[s, g])
        else:
            t += mul(flow[g, s], tt[g, s])
    return t


@rule(refcount=False)
def _hot_threshold(times, hot_fraction):  # pragma: no cover - compiled
    """The time above which a rank is hot: mean + (1 - hot_fraction) * (max - mean) of times
    float64 [G] (summed in rank order)."""
    total_time = 0.0
    top = times[0]
    for g in range(times.shape[0]):
        total_time += times[g]
        top = dmax(top, times[g])
    mean = total_time / times.shape[0]
    return mean + mul(1.0 - hot_fraction, top - mean)


@rule(refcount=False)
def _can_pair(src, dst, slots, window, beta, epsilon, xt, hcount, hlist, rank_nhome, rank_home,
              rep_on, tok, held, comp, t_in, times, recv, send,
              used):  # pragma: no cover - compiled
    """The pairing test for a rank dst faster than src: dst could still gain (its compute
    plus one token's, plus its incoming traffic, below src's time less epsilon) and some
    expert with tokens on src could move to it (held there, or a free slot and a copy that
    fits the windows)."""
    if not comp[dst] + beta + 2.0 * t_in[dst] < times[src] - epsilon:
        return False
    for k in range(rank_nhome[src] + used[src]):
        e = _held_expert(src, k, rank_nhome, rank_home, rep_on)
        if tok[src, e] > 0 and (held[dst, e] or (
                used[dst] < slots[dst] and copy_holder(e, dst, hcount, hlist, xt, window, recv,
                                                       send) >= 0)):
            return True
    return False


@rule(refcount=False)
def _pool(e, src, dst, load, home, hcount, hpos, held, blk_of, blk_assign, tt, pool_s,
          pool_n):  # pragma: no cover - compiled
    """The movable tokens of e on src, in order (dst's own, other sources that hold no copy of
    e and whose link to dst is no dearer, src's own): fills the pool; returns (npool, total)."""
    num_ranks = hpos.shape[0]
    b = blk_of[e]
    npool = 0
    total = 0
    for i in range(num_ranks + 2):
        s = dst if i == 0 else (src if i == num_ranks + 1 else i - 1)
        if 0 < i <= num_ranks and (s == src or s == dst or held[s, e]  # noqa: SIM109
                                   or tt[s, dst] > tt[s, src]):
            continue
        a = (blk_assign[b, src, s] if b >= 0
             else _static_share(load, home, hpos, hcount, s, e, src))
        if a > 0:
            pool_s[npool] = s
            pool_n[npool] = a
            npool += 1
            total += a
    return npool, total


@rule(refcount=False)
def _candidate(e, src, dst, load, home, slots, window, alpha, beta, tt, xt, epsilon, hcount,
               hlist, hpos, tok, held, blk_of, blk_assign, times, comp, t_in, t_out, recv,
               send, used, pool_s, pool_n, cum, pre):  # pragma: no cover - compiled
    """One candidate of a pair's move search, expert e from src to dst: (gains, x, holder,
    npool), and the pool (pool_s, pool_n, and its running sums cum, pre) of the move. The
    pruning (the kernels'; the twin tries every expert) is the greedy's lower bound on T_dst."""
    gains = False
    x = 0
    holder = -1
    npool = 0
    floor = times[src] - epsilon
    b = blk_of[e]
    own = (blk_assign[b, src, dst] if b >= 0
           else _static_share(load, home, hpos, hcount, dst, e, src))
    if not cannot_gain(own, tok[dst, e] == 0, floor, alpha, beta, tt[dst, src], comp[dst],
                       t_in[dst], t_out[dst]) and (held[dst, e] or used[dst] < slots[dst]):
        if not held[dst, e]:
            holder = copy_holder(e, dst, hcount, hlist, xt, window, recv, send)
        if holder >= 0 or held[dst, e]:
            npool, total = _pool(e, src, dst, load, home, hcount, hpos, held, blk_of, blk_assign,
                                 tt, pool_s, pool_n)
            if total > 0:
                own_src = pool_n[npool - 1] if pool_s[npool - 1] == src else 0
                _prefix(npool, pool_s, pool_n, src, dst, tt, cum, pre)
                x = _amount(e, src, dst, npool, pool_s, cum, pre, total, own_src,
                            total == tok[src, e], tok, comp, t_in, t_out, alpha, beta, tt)
                gains = times[src] - _worst(x, e, src, dst, npool, pool_s, cum, pre, tok, comp,
                                            t_in, t_out, alpha, beta, tt) > epsilon
    return gains, x, holder, npool


@rule(refcount=False)
def _takes(x, npool, pool_s, pool_n, into_s, into_take):  # pragma: no cover - compiled
    """The move of x tokens from the pool, taken in order: its sources into into_s[:npool], the
    tokens taken from each into into_take[:npool]."""
    left = x
    for i in range(npool):
        take = dmin(pool_n[i], left)
        into_s[i] = pool_s[i]
        into_take[i] = take
        left -= take


@rule(refcount=False)
def _admit(dst, e, holder, xt, window, rep_on, used, held, rep, n_rep, recv,
           send):  # pragma: no cover - compiled
    """Admit a pair's move of e to dst, in pair order: (admitted, replica rows). A move that
    needs no copy (holder < 0) is admitted; one whose copy no longer fits the holder's window
    (an earlier pair's copy filled it) is dropped; else e is copied from holder to dst: dst's
    replica list, held, the replica row n_rep and both ranks' copy seconds."""
    if holder < 0:
        return True, n_rep
    t = xt[holder, dst]
    if send[holder] + t > window[holder]:
        return False, n_rep
    rep_on[dst, used[dst]] = e
    used[dst] += 1
    held[dst, e] = True
    rep[n_rep, 0] = dst
    rep[n_rep, 1] = e
    rep[n_rep, 2] = holder
    recv[dst] += t
    send[holder] += t
    return True, n_rep + 1


@rule(refcount=False)
def _static_column(b, e, s, load, home, hpos, hcount, hlist,
                   blk_assign):  # pragma: no cover - compiled
    """Source s's tokens of e in the static split into block b (blk_assign[b, g, s] for e's
    home holders g; the other ranks' entries are left as they are)."""
    if load[s, e] > 0:
        for k in range(hcount[e]):
            g = hlist[e, k]
            blk_assign[b, g, s] = _static_share(load, home, hpos, hcount, s, e, g)


@rule(refcount=False)
def _apply_pair(b, e, src, dst, x, npool, pool_s, takes, blk_assign, flow,
                tok):  # pragma: no cover - compiled
    """Apply a pair's move of x tokens of e (block b): takes[i] tokens of source pool_s[i]
    leave src for dst in the block, the flows and the token counts."""
    for i in range(npool):
        s = pool_s[i]
        take = takes[i]
        blk_assign[b, src, s] -= take
        blk_assign[b, dst, s] += take
        flow[s, src] -= take
        flow[s, dst] += take
    tok[src, e] -= x
    tok[dst, e] += x


@numba.njit(cache=True)
def parallel_arrays(load, home, slots, window, alpha, beta, token_time, transfer_time,
                    max_rounds, epsilon, hot_fraction):
    """The parallel greedy's kernel: arrays in, arrays out (see `parallel_plan`).

    Args (exact dtypes): load int64 [S, E]; home bool [G, E]; slots int64 [G]; window float64
        [G]; alpha, beta: float; token_time, transfer_time float64 [G, G]; max_rounds: int > 0
        (ParallelRules.rounds_limit); epsilon, hot_fraction: float (ParallelRules' fields).
    Returns (replicas int64 [n_rep, 3] rows (rank, expert, source) in the order made;
    blk_expert int64 [n_blk], the experts whose tokens moved; blk_assign int64 [n_blk, G, S],
    their final assignment TRANSPOSED (blk_assign[b, g, s]: tokens of (s, blk_expert[b]) on g;
    `plan_from_blocks` builds the Plan); rounds, moves: int; makespan: float, the largest rank
    time after the last round). The kernel keeps every [., S]-indexed array with S last in
    memory (blk_assign; load, home, held, hpos and the token times in Fortran order), so that
    its loops over the sources read contiguous memory.
    """
    num_ranks, num_experts = home.shape
    load_f = np.asfortranarray(load)  # [S, E], the sources of an expert adjacent
    home_f = np.asfortranarray(home)  # [G, E]
    tt_f = np.asfortranarray(token_time)  # [G, G], tt_f[s, g] = token_time[s, g]
    hcount = np.empty(num_experts, np.int64)
    hlist = np.empty((num_experts, num_ranks), np.int64)
    hpos = np.empty((num_experts, num_ranks), np.int64).T  # [G, E] in Fortran order
    rank_nhome = np.empty(num_ranks, np.int64)
    rank_home = np.empty((num_ranks, num_experts), np.int64)
    home_lists(home, hcount, hlist, hpos, rank_nhome, rank_home)
    held = np.empty((num_experts, num_ranks), np.bool_).T  # home or a replica, [G, E]
    held[:, :] = home
    tok = np.zeros((num_ranks, num_experts), np.int64)
    flow = np.zeros((num_ranks, num_ranks), np.int64)
    for s in range(num_ranks):
        for e in range(num_experts):
            if load[s, e] > 0:
                for k in range(hcount[e]):
                    g = hlist[e, k]
                    n = _static_share(load_f, home_f, hpos, hcount, s, e, g)
                    tok[g, e] += n
                    flow[s, g] += n

    max_slots = 1
    total_slots = 0
    for g in range(num_ranks):
        max_slots = max(max_slots, min(slots[g], num_experts))
        total_slots += min(slots[g], num_experts)
    rep_on = np.empty((num_ranks, max_slots), np.int64)
    used = np.zeros(num_ranks, np.int64)
    recv = np.zeros(num_ranks)
    send = np.zeros(num_ranks)
    rep = np.empty((max(total_slots, 1), 3), np.int64)
    n_rep = 0
    blk_of = np.full(num_experts, -1, np.int64)
    blk_expert = np.empty(num_experts, np.int64)
    blk_assign = np.empty((num_experts, num_ranks, num_ranks), np.int64)
    n_blk = 0

    comp = np.zeros(num_ranks)
    t_in = np.zeros(num_ranks)
    t_out = np.zeros(num_ranks)
    times = np.zeros(num_ranks)
    dirty = np.ones(num_ranks, np.bool_)  # compute and incoming traffic to recompute
    dirty_out = np.ones(num_ranks, np.bool_)  # outgoing traffic to recompute

    taken = np.zeros(num_ranks, np.bool_)
    pair_src = np.empty(num_ranks, np.int64)
    pair_dst = np.empty(num_ranks, np.int64)
    mv_e = np.empty(num_ranks, np.int64)
    mv_holder = np.empty(num_ranks, np.int64)
    mv_x = np.empty(num_ranks, np.int64)
    mv_npool = np.zeros(num_ranks, np.int64)
    mv_pool_s = np.empty((num_ranks, num_ranks), np.int64)
    mv_take = np.empty((num_ranks, num_ranks), np.int64)
    pool_s = np.empty(num_ranks, np.int64)
    pool_n = np.empty(num_ranks, np.int64)
    cum = np.empty(num_ranks + 1, np.int64)
    pre = np.empty((4, num_ranks + 1))
    order = np.empty(num_experts + max_slots, np.int64)

    rounds = 0
    moves = 0
    while True:
        # Exact rank times of the ranks the last round touched (all of them at the start).
        for g in range(num_ranks):
            if dirty[g]:
                comp[g] = _rank_compute(g, alpha, beta, rank_nhome, rank_home, rep_on, used, tok)
                t_in[g] = _link_time(g, flow, token_time, True)
            if dirty_out[g]:
                t_out[g] = _link_time(g, flow, token_time, False)
            if dirty[g] or dirty_out[g]:
                times[g] = comp[g] + 2.0 * max(t_in[g], t_out[g])
            dirty[g] = False
            dirty_out[g] = False
        if rounds >= max_rounds:
            break

        # Pairs: hot ranks hottest first, each with the coldest free rank that can receive.
        threshold = _hot_threshold(times, hot_fraction)
        hottest = np.argsort(-times, kind="mergesort")
        coldest = np.argsort(times, kind="mergesort")
        taken[:] = False
        num_pairs = 0
        for i in range(num_ranks):
            src = hottest[i]
            if not times[src] > threshold:
                break
            if taken[src]:
                continue
            taken[src] = True
            for j in range(num_ranks):
                dst = coldest[j]
                if times[dst] >= times[src]:
                    break
                if not taken[dst] and _can_pair(src, dst, slots, window, beta, epsilon,
                                                transfer_time, hcount, hlist, rank_nhome,
                                                rank_home, rep_on, tok, held, comp, t_in, times,
                                                recv, send, used):
                    pair_src[num_pairs] = src
                    pair_dst[num_pairs] = dst
                    num_pairs += 1
                    taken[dst] = True
                    break

        # One move per pair, against the round's starting state: the first gaining expert of
        # the hot rank's, heaviest first (ties to the lowest id).
        for p in range(num_pairs):
            src = pair_src[p]
            dst = pair_dst[p]
            mv_npool[p] = 0
            n_order = 0
            for k in range(rank_nhome[src] + used[src]):
                e = _held_expert(src, k, rank_nhome, rank_home, rep_on)
                if tok[src, e] == 0:
                    continue
                i = n_order
                while i > 0 and (tok[src, order[i - 1]] < tok[src, e] or (
                        tok[src, order[i - 1]] == tok[src, e] and order[i - 1] > e)):
                    order[i] = order[i - 1]
                    i -= 1
                order[i] = e
                n_order += 1
            for k in range(n_order):
                e = order[k]
                ok, x, holder, npool = _candidate(
                    e, src, dst, load_f, home_f, slots, window, alpha, beta, tt_f, transfer_time,
                    epsilon, hcount, hlist, hpos, tok, held, blk_of, blk_assign, times, comp,
                    t_in, t_out, recv, send, used, pool_s, pool_n, cum, pre)
                if ok:
                    mv_e[p] = e
                    mv_holder[p] = holder
                    mv_x[p] = x
                    mv_npool[p] = npool
                    _takes(x, npool, pool_s, pool_n, mv_pool_s[p], mv_take[p])
                    break

        # Apply in pair order; a copy an earlier pair left no room for is dropped.
        applied = 0
        for p in range(num_pairs):
            if mv_npool[p] == 0:
                continue
            src = pair_src[p]
            dst = pair_dst[p]
            e = mv_e[p]
            admitted, n_rep = _admit(dst, e, mv_holder[p], transfer_time, window, rep_on, used,
                                     held, rep, n_rep, recv, send)
            if not admitted:
                continue
            b = blk_of[e]
            if b < 0:
                b = n_blk
                n_blk += 1
                blk_of[e] = b
                blk_expert[b] = e
                blk_assign[b] = 0  # the static split: only home holders get tokens
                for s in range(num_ranks):
                    _static_column(b, e, s, load_f, home_f, hpos, hcount, hlist, blk_assign)
            _apply_pair(b, e, src, dst, mv_x[p], mv_npool[p], mv_pool_s[p], mv_take[p],
                        blk_assign, flow, tok)
            for i in range(mv_npool[p]):
                if mv_take[p, i] > 0:
                    dirty_out[mv_pool_s[p, i]] = True
            dirty[src] = True
            dirty[dst] = True
            applied += 1
        if applied == 0:
            break
        rounds += 1
        moves += applied

    makespan = 0.0
    for g in range(num_ranks):
        makespan = max(makespan, times[g])
    return rep[:n_rep], blk_expert[:n_blk], blk_assign[:n_blk], rounds, moves, makespan


def plan_from_blocks(problem: BalanceProblem, rep: np.ndarray, blk_expert: np.ndarray,
                     blk_assign: np.ndarray) -> Plan:
    """The dense Plan from `parallel_arrays`' compact output (blk_assign [n_blk, G, S])."""
    return plan_from_arrays(problem, rep, blk_expert, np.transpose(blk_assign, (0, 2, 1)))


def kernel_args(problem: BalanceProblem, rules: ParallelRules | None) -> tuple:
    """`parallel_arrays`' arguments for `problem` under `rules` (None: ParallelRules())."""
    rules = checked_rules(rules)
    return (*problem_arrays(problem), rules.rounds_limit, rules.epsilon, rules.hot_fraction)


def parallel_plan(problem: BalanceProblem, rules: ParallelRules | None = None, *,
                  stats: dict | None = None) -> Plan:
    """The parallel greedy's plan of `problem` (Numba kernel; parallel_ref.py has the
    algorithm). stats, when a dict, receives "rounds", "moves" and "makespan"."""
    out = parallel_arrays(*kernel_args(problem, rules))
    if stats is not None:
        stats.update(rounds=out[3], moves=out[4], makespan=out[5])
    return plan_from_blocks(problem, *out[:3])


def solve_parallel_greedy(problem: BalanceProblem, *, time_limit: float | None = None,
                          rules: ParallelRules | None = None) -> SolveResult:
    """Backend for `solve(problem, "parallel_greedy", rules=ParallelRules(...))`. The kernel has
    no deadline check (it is bounded by max_rounds); time_limit is only reported against."""
    args = kernel_args(problem, rules)
    start = time.perf_counter()
    out = parallel_arrays(*args)
    plan = plan_from_blocks(problem, *out[:3])
    wall = time.perf_counter() - start
    status = "timeout" if time_limit is not None and wall > time_limit else "feasible"
    return SolveResult(status, plan, float("nan"), None, None, wall,
                       f"{out[3]} rounds, {out[4]} moves, {len(out[0])} replicas",
                       "parallel_greedy")


def solve_parallel_greedy_ref(problem: BalanceProblem, *, time_limit: float | None = None,
                              rules: ParallelRules | None = None) -> SolveResult:
    """Backend for `solve(problem, "parallel_greedy_ref", rules=...)`: the plain-Python twin."""
    from probe.planner.parallel_ref import parallel_ref

    stats: dict = {}
    start = time.perf_counter()
    plan = parallel_ref(problem, rules, stats)
    wall = time.perf_counter() - start
    status = "timeout" if time_limit is not None and wall > time_limit else "feasible"
    return SolveResult(status, plan, float("nan"), None, None, wall,
                       f"{stats['rounds']} rounds, {stats['moves']} moves, "
                       f"{plan.num_replicas} replicas", "parallel_greedy_ref")
