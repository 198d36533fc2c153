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

from probe.planner.greedy import plan_from_arrays, problem_arrays
from probe.planner.parallel_ref import ParallelRules, checked_rules
from probe.planner.problem import BalanceProblem, Plan, SolveResult

__all__ = ["ParallelRules", "kernel_args", "parallel_arrays", "parallel_plan", "plan_from_blocks",
           "solve_parallel_greedy", "solve_parallel_greedy_ref"]


@numba.njit(cache=True, inline="always")
def _static_share(load_t, home_t, hpos_t, hcount, s, e, g):
    """Tokens of (s, e) on rank g in the static split (static.py), from the transposed load
    [E, S], home [E, G] and home positions [E, G] (hpos_t[e, g]: g's position among e's home
    holders, -1 if none): greedy.py's function on the kernel's layout."""
    n = load_t[e, s]
    if home_t[e, s]:
        return n if g == s else 0
    h = hcount[e]
    if h == 1:
        return n if hpos_t[e, g] == 0 else 0
    pos = hpos_t[e, g]
    if pos < 0:
        return 0
    q = n // h
    r = n - q * h
    return q + (1 if (pos + s) % h < r else 0)


@numba.njit(cache=True)
def _prefix(npool, pool_s, pool_n, src, dst, tt_t, cum, pre):
    """Running sums over the pool, in pool order: cum[i] tokens and pre[:, i] link seconds
    (in to src, in to dst, out of dst, out of src) of its first i entries. `_after` adds the
    partly taken entry to them, so its sums are the ones a loop over the pool would make,
    operation for operation, in O(log npool) instead of O(npool)."""
    cum[0] = 0
    pre[:, 0] = 0.0
    for i in range(npool):
        s = pool_s[i]
        n = pool_n[i]
        cum[i + 1] = cum[i] + n
        pre[0, i + 1] = pre[0, i] + n * tt_t[src, s]  # tt_t[a, b] = token_time[b, a]
        pre[1, i + 1] = pre[1, i]
        pre[2, i + 1] = pre[2, i]
        pre[3, i + 1] = pre[3, i]
        if s == dst:
            pre[2, i + 1] = pre[2, i] + n * tt_t[src, dst]
        else:
            pre[1, i + 1] = pre[1, i] + n * tt_t[dst, s]
            if s == src:
                pre[3, i + 1] = pre[3, i] + n * tt_t[dst, src]


@numba.njit(cache=True)
def _after(x, e, src, dst, npool, pool_s, cum, pre, tok, comp, t_in, t_out, alpha, beta, tt_t):
    """(T_src, T_dst) if x >= 1 tokens of e move src -> dst, taken from the pool in order (the
    twin's loop over the pool, through `_prefix`'s running sums)."""
    comp_src = comp[src] - beta * x
    if tok[src, e] == x:
        comp_src -= alpha
    comp_dst = comp[dst] + beta * x
    if tok[dst, e] == 0:
        comp_dst += alpha
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
        d_in_src += take * tt_t[src, s]
        if s == dst:
            d_out_dst += take * tt_t[src, dst]
        else:
            d_in_dst += take * tt_t[dst, s]
            if s == src:
                d_out_src += take * tt_t[dst, src]
    t_src = comp_src + 2.0 * max(t_in[src] - d_in_src, t_out[src] + d_out_src)
    t_dst = comp_dst + 2.0 * max(t_in[dst] + d_in_dst, t_out[dst] - d_out_dst)
    return t_src, t_dst


@numba.njit(cache=True)
def _worst(x, e, src, dst, npool, pool_s, cum, pre, tok, comp, t_in, t_out, alpha, beta,
           tt_t):
    t_src, t_dst = _after(x, e, src, dst, npool, pool_s, cum, pre, tok, comp, t_in, t_out,
                          alpha, beta, tt_t)
    return max(t_src, t_dst)


@numba.njit(cache=True)
def _amount(e, src, dst, npool, pool_s, cum, pre, total, own_src, drops_alpha, tok, comp, t_in,
            t_out, alpha, beta, tt_t):
    """parallel_ref._amount: tokens to move (two phases over the pool)."""
    n_other = total - own_src
    x = 0
    worst = 0.0
    if n_other > 0:
        a_src, a_dst = _after(n_other, e, src, dst, npool, pool_s, cum, pre, tok, comp, t_in,
                              t_out, alpha, beta, tt_t)
        x = n_other
        if a_src <= a_dst:
            lo = 1
            while lo < x:
                mid = (lo + x) // 2
                m_src, m_dst = _after(mid, e, src, dst, npool, pool_s, cum, pre, tok, comp, t_in,
                                      t_out, alpha, beta, tt_t)
                if m_src <= m_dst:
                    x = mid
                else:
                    lo = mid + 1
        if x > 1 and (_worst(x - 1, e, src, dst, npool, pool_s, cum, pre, tok, comp, t_in, t_out,
                             alpha, beta, tt_t)
                      <= _worst(x, e, src, dst, npool, pool_s, cum, pre, tok, comp, t_in, t_out,
                                alpha, beta, tt_t)):
            x -= 1
        t_src, t_dst = _after(x, e, src, dst, npool, pool_s, cum, pre, tok, comp, t_in, t_out,
                              alpha, beta, tt_t)
        worst = max(t_src, t_dst)
        if own_src == 0 or x < n_other or t_src <= t_dst:
            return x
    lo = n_other + 1
    hi = total - 1 if drops_alpha and total > lo else total
    while lo < hi:
        mid = (lo + hi) // 2
        if (_worst(mid + 1, e, src, dst, npool, pool_s, cum, pre, tok, comp, t_in, t_out, alpha,
                   beta, tt_t)
                >= _worst(mid, e, src, dst, npool, pool_s, cum, pre, tok, comp, t_in, t_out,
                          alpha, beta, tt_t)):
            hi = mid
        else:
            lo = mid + 1
    if n_other == 0 or _worst(lo, e, src, dst, npool, pool_s, cum, pre, tok, comp, t_in, t_out,
                              alpha, beta, tt_t) < worst:
        return lo
    return x


@numba.njit(cache=True, inline="always")
def _copy_holder(e, dst, hcount, hlist, transfer_time, window, recv, send):
    """The home holder of e to copy it to dst from (cheapest transfer, then least sent, then
    lowest rank), -1 if no copy fits both windows."""
    holder = -1
    best_t = 0.0
    best_send = 0.0
    for k in range(hcount[e]):
        h = hlist[e, k]
        t = transfer_time[h, dst]
        if recv[dst] + t <= window[dst] and send[h] + t <= window[h] and (
                holder < 0 or t < best_t or (t == best_t and send[h] < best_send)):
            holder = h
            best_t = t
            best_send = send[h]
    return holder


@numba.njit(cache=True, inline="always")
def _held_expert(g, i, rank_nhome, rank_home, rep_on):
    """The i-th expert rank g holds: its home experts in id order, then its replicas."""
    return rank_home[g, i] if i < rank_nhome[g] else rep_on[g, i - rank_nhome[g]]


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
    time after the last round). The kernel keeps every [., S]-indexed array with S last, so
    that its loops over the sources read contiguous memory.
    """
    num_ranks, num_experts = home.shape
    load_t = np.ascontiguousarray(load.T)  # [E, S]
    home_t = np.ascontiguousarray(home.T)  # [E, G]
    tt_t = np.ascontiguousarray(token_time.T)  # tt_t[a, b] = token_time[b, a]
    hcount = np.zeros(num_experts, np.int64)
    hlist = np.empty((num_experts, num_ranks), np.int64)
    hpos_t = np.empty((num_experts, num_ranks), np.int64)
    rank_nhome = np.zeros(num_ranks, np.int64)
    rank_home = np.empty((num_ranks, num_experts), np.int64)
    for g in range(num_ranks):
        for e in range(num_experts):
            hpos_t[e, g] = hcount[e] if home[g, e] else -1
            if home[g, e]:
                hlist[e, hcount[e]] = g
                hcount[e] += 1
                rank_home[g, rank_nhome[g]] = e
                rank_nhome[g] += 1
    held = home.copy()  # [G, E]: home or a replica
    held_t = home_t.copy()  # the same, [E, G]
    tok = np.zeros((num_ranks, num_experts), np.int64)
    flow = np.zeros((num_ranks, num_ranks), np.int64)
    for s in range(num_ranks):
        for e in range(num_experts):
            if load[s, e] > 0:
                for k in range(hcount[e]):
                    g = hlist[e, k]
                    n = _static_share(load_t, home_t, hpos_t, hcount, s, e, g)
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
                c = 0.0
                for i in range(rank_nhome[g] + used[g]):
                    e = _held_expert(g, i, rank_nhome, rank_home, rep_on)
                    if tok[g, e] > 0:
                        c += alpha + beta * tok[g, e]
                comp[g] = c
                t = 0.0
                for s in range(num_ranks):
                    t += flow[s, g] * token_time[s, g]
                t_in[g] = t
            if dirty_out[g]:
                t = 0.0
                for d in range(num_ranks):
                    t += flow[g, d] * token_time[g, d]
                t_out[g] = t
            if dirty[g] or dirty_out[g]:
                times[g] = comp[g] + 2.0 * max(t_in[g], t_out[g])
            dirty[g] = False
            dirty_out[g] = False
        if rounds >= max_rounds:
            break

        # Pairs: hot ranks hottest first, each with the coldest free rank that can receive.
        total_time = 0.0
        top = times[0]
        for g in range(num_ranks):
            total_time += times[g]
            top = max(top, times[g])
        mean = total_time / num_ranks
        threshold = mean + (1.0 - hot_fraction) * (top - mean)
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
                if taken[dst] or not (comp[dst] + beta + 2.0 * t_in[dst]
                                      < times[src] - epsilon):
                    continue
                ok = False
                for k in range(rank_nhome[src] + used[src]):
                    e = _held_expert(src, k, rank_nhome, rank_home, rep_on)
                    if tok[src, e] > 0 and (held[dst, e] or (
                            used[dst] < slots[dst] and _copy_holder(
                                e, dst, hcount, hlist, transfer_time, window, recv,
                                send) >= 0)):
                        ok = True
                        break
                if ok:
                    pair_src[num_pairs] = src
                    pair_dst[num_pairs] = dst
                    num_pairs += 1
                    taken[dst] = True
                    break

        # One move per pair, against the round's starting state.
        for p in range(num_pairs):
            src = pair_src[p]
            dst = pair_dst[p]
            mv_npool[p] = 0
            n_order = 0
            for k in range(rank_nhome[src] + used[src]):  # heaviest first, ties to lowest id
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
            pool_s = mv_pool_s[p]
            # Pruning (this kernel and the CUDA one; the twin tries every expert): greedy.py's
            # lower bound on T_dst after any move of e, with slack for rounding.
            floor = times[src] - epsilon
            for k in range(n_order):
                e = order[k]
                b = blk_of[e]
                own = (blk_assign[b, src, dst] if b >= 0
                       else _static_share(load_t, home_t, hpos_t, hcount, dst, e, src))
                slope = beta - 2.0 * token_time[dst, src]
                lb_out = 2.0 * t_out[dst] + (min(slope, own * slope) if own > 0 else beta)
                lb = comp[dst] + max(beta + 2.0 * t_in[dst], lb_out)
                if tok[dst, e] == 0:
                    lb += alpha
                if lb >= floor + 1e-9 * (abs(floor) + lb):
                    continue
                holder = -1
                if not held[dst, e]:
                    if used[dst] >= slots[dst]:
                        continue
                    holder = _copy_holder(e, dst, hcount, hlist, transfer_time, window, recv,
                                          send)
                    if holder < 0:
                        continue
                npool = 0
                total = 0
                for i in range(num_ranks + 2):  # dst's own, other sources, src's own
                    s = dst if i == 0 else (src if i == num_ranks + 1 else i - 1)
                    if 0 < i <= num_ranks and (s == src or s == dst  # noqa: SIM109
                                               or held_t[e, s] or tt_t[dst, s] > tt_t[src, s]):
                        continue
                    a = (blk_assign[b, src, s] if b >= 0
                         else _static_share(load_t, home_t, hpos_t, hcount, s, e, src))
                    if a > 0:
                        pool_s[npool] = s
                        pool_n[npool] = a
                        npool += 1
                        total += a
                if total == 0:
                    continue
                own_src = pool_n[npool - 1] if pool_s[npool - 1] == src else 0
                _prefix(npool, pool_s, pool_n, src, dst, tt_t, cum, pre)
                x = _amount(e, src, dst, npool, pool_s, cum, pre, total, own_src,
                            total == tok[src, e], tok, comp, t_in, t_out, alpha, beta, tt_t)
                if times[src] - _worst(x, e, src, dst, npool, pool_s, cum, pre, tok, comp, t_in,
                                       t_out, alpha, beta, tt_t) > epsilon:
                    mv_e[p] = e
                    mv_holder[p] = holder
                    mv_x[p] = x
                    mv_npool[p] = npool
                    left = x
                    for i in range(npool):
                        mv_take[p, i] = min(pool_n[i], left)
                        left -= mv_take[p, i]
                    break

        # Apply in pair order; a copy an earlier pair left no room for is dropped.
        applied = 0
        for p in range(num_pairs):
            if mv_npool[p] == 0:
                continue
            src = pair_src[p]
            dst = pair_dst[p]
            e = mv_e[p]
            holder = mv_holder[p]
            if holder >= 0:
                t = transfer_time[holder, dst]
                if send[holder] + t > window[holder]:
                    continue
                rep_on[dst, used[dst]] = e
                used[dst] += 1
                held[dst, e] = True
                held_t[e, dst] = True
                rep[n_rep, 0] = dst
                rep[n_rep, 1] = e
                rep[n_rep, 2] = holder
                n_rep += 1
                recv[dst] += t
                send[holder] += t
            b = blk_of[e]
            if b < 0:
                b = n_blk
                n_blk += 1
                blk_of[e] = b
                blk_expert[b] = e
                blk_assign[b] = 0  # the static split: only home holders get tokens
                for s in range(num_ranks):
                    if load[s, e] > 0:
                        for k in range(hcount[e]):
                            g = hlist[e, k]
                            blk_assign[b, g, s] = _static_share(load_t, home_t, hpos_t, hcount,
                                                                s, e, g)
            for i in range(mv_npool[p]):
                s = mv_pool_s[p, i]
                take = mv_take[p, i]
                blk_assign[b, src, s] -= take
                blk_assign[b, dst, s] += take
                flow[s, src] -= take
                flow[s, dst] += take
                if take > 0:
                    dirty_out[s] = True
            tok[src, e] -= mv_x[p]
            tok[dst, e] += mv_x[p]
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
