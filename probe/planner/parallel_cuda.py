"""The parallel greedy as a CUDA kernel (numba.cuda): one thread block per MoE layer.

The algorithm of parallel_ref.py (rounds of moves over disjoint rank pairs) and the plan of the
CPU kernel `parallel.parallel_arrays`, bit for bit: a launch plans L layers at once (inputs
stacked [L, ...]) without host synchronisation, so it can be captured in a CUDA graph.

A round in a block of T threads (barriers between the steps):
1. every rank's time, recomputed from the token counts (a thread per rank, the CPU kernel's
   summation orders); thread 0 sums them in rank order for the mean;
2. the ranks' hottest-first and coldest-first orders (a thread per rank counts the ranks
   ahead of it);
3. the pairs: which (hot rank, colder rank) pairs could move at all, every pair tested at
   once (a thread per pair), each hot rank's receivers listed coldest first (a thread per hot
   rank); then thread 0 matches them in the CPU kernel's order, reading only those lists;
4. the hot ranks' experts ordered heaviest first (a thread per (pair, expert));
5. the candidates of every pair at once, a thread per (pair, expert): each evaluates the CPU
   kernel's candidate (pruning, copy source, pool, amount, gain) and keeps its amount; an
   atomic minimum per pair keeps the heaviest gaining expert, which is what the CPU kernel's
   first-gaining scan finds;
6. a thread per pair rebuilds its winner's pool and keeps the move (pool and takes);
7. thread 0 admits the moves in pair order (a copy whose holder's window an earlier pair
   filled is dropped) and starts the blocks of newly moved experts; the threads fill those
   blocks from the static split; a thread per pair applies its move (pairs touch disjoint
   columns of the token and flow arrays, so no two threads write one entry).
Floating point: every value that decides a choice is float64, in the CPU kernel's order; the
products that feed a sum are rounded on their own (`mul`, never an FMA).

Memory: shared about 13 KB (rank arrays of MAX_RANKS entries); the [G, E], [G, G] and
per-pair arrays in global scratch (one set per shape); each thread's pool in local arrays of
MAX_RANKS entries and its running sums over the pool (`_prefix`: each amount probe is then a
binary search, O(log G), with the additions a loop over the pool would make, in its order).

Entry points: `CudaParallel(home, slots, cost, rules, num_layers=L)` validates once and keeps
device buffers; its `plan(load, window)` launches on the caller's stream (torch's current
stream for torch tensors) and returns device arrays (a `CudaParallelPlan`) without
synchronising. `parallel_cuda_arrays(...)`: numpy in, numpy out, for tests. Under
NUMBA_ENABLE_CUDASIM=1 (set before numba.cuda is first imported) both run in Numba's CUDA
simulator.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numba import float64, int32, int64

from probe.planner.cost import CostModel
from probe.planner.numba_cuda import SIMULATOR, cuda, dmax, dmin, mul
from probe.planner.parallel_ref import ParallelRules, checked_rules
from probe.planner.problem import BalanceProblem

__all__ = ["MAX_RANKS", "THREADS", "CudaParallel", "CudaParallelPlan", "parallel_cuda_arrays"]

# Most ranks a layer may have (shared rank arrays and each thread's pool are this long).
MAX_RANKS = 256
# Threads per block (one block per layer) unless the caller picks another multiple of 32.
THREADS = 128
# "No gaining candidate yet" (larger than any index).
_NONE = 1 << 40
# Slots of the block's shared integer scalars.
_ROUNDS, _MOVES, _NREP, _NBLK, _NPAIRS, _KMAX, _STOP, _APPLIED, _NNEW, _BAD = range(10)
_MEAN, _THRESHOLD = range(2)


@cuda.jit(device=True, inline=True)
def _static_share(load, home, hpos, hcount, s, e, g):
    """parallel._static_share: tokens of (s, e) on rank g in the static split."""
    n = load[s, e]
    if home[s, e]:
        return n if g == s else 0
    h = hcount[e]
    if h == 1:
        return n if hpos[g, e] == 0 else 0
    pos = hpos[g, e]
    if pos < 0:
        return 0
    q = n // h
    r = n - q * h
    return q + (1 if (pos + s) % h < r else 0)


@cuda.jit(device=True)
def _prefix(npool, pool_s, pool_n, src, dst, tt, cum, pre):
    """parallel._prefix: running sums over the pool (tokens in cum, link seconds in pre)."""
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


@cuda.jit(device=True)
def _after(x, e, src, dst, npool, pool_s, cum, pre, tok, comp, t_in, t_out, alpha, beta, tt):
    """parallel._after: (T_src, T_dst) if x tokens of e move src -> dst."""
    comp_src = comp[src] - mul(beta, x)
    if tok[src, e] == x:
        comp_src -= alpha
    comp_dst = comp[dst] + mul(beta, x)
    if tok[dst, e] == 0:
        comp_dst += alpha
    lo = 0
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
    if take > 0:
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


@cuda.jit(device=True)
def _worst(x, e, src, dst, npool, pool_s, cum, pre, tok, comp, t_in, t_out, alpha, beta, tt):
    t_src, t_dst = _after(x, e, src, dst, npool, pool_s, cum, pre, tok, comp, t_in, t_out, alpha,
                          beta, tt)
    return dmax(t_src, t_dst)


@cuda.jit(device=True)
def _amount(e, src, dst, npool, pool_s, cum, pre, total, own_src, drops_alpha, tok, comp, t_in,
            t_out, alpha, beta, tt):
    """parallel._amount: tokens to move (two phases over the pool)."""
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


@cuda.jit(device=True)
def _copy_holder(e, dst, hcount, hlist, xt, window, recv, send):
    """parallel._copy_holder: the home holder to copy e to dst from, -1 if none fits."""
    holder = -1
    best_t = 0.0
    best_send = 0.0
    for k in range(hcount[e]):
        h = hlist[e, k]
        t = xt[h, dst]
        if recv[dst] + t <= window[dst] and send[h] + t <= window[h] and (
                holder < 0 or t < best_t or (t == best_t and send[h] < best_send)):
            holder = h
            best_t = t
            best_send = send[h]
    return holder


@cuda.jit(device=True, inline=True)
def _held_expert(g, i, rank_nhome, rank_home, rep_on):
    """The i-th expert rank g holds: home experts in id order, then replicas as made."""
    return rank_home[g, i] if i < rank_nhome[g] else rep_on[g, i - rank_nhome[g]]


@cuda.jit(device=True)
def _pool(e, src, dst, load, home, hcount, hpos, held, blk_of, blk_assign, tt, pool_s, pool_n):
    """The movable tokens of e on src, in order (dst's own, other sources that hold no copy of
    e and whose link to dst is no dearer, src's own): fills the pool; returns (npool, total)."""
    num_ranks = hpos.shape[0]
    b = blk_of[e]
    npool = 0
    total = 0
    for i in range(num_ranks + 2):
        s = dst if i == 0 else (src if i == num_ranks + 1 else i - 1)
        if 0 < i <= num_ranks and (s == src or s == dst or held[s, e] != 0  # noqa: SIM109
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


@cuda.jit(device=True)
def _receives(src, dst, slots, window, xt, hcount, hlist, rank_nhome, rank_home, rep_on, tok,
              held, recv, send, used):
    """Whether some expert with tokens on src could move to dst (held there, or a free slot and
    a copy that fits the windows): the CPU kernel's pairing test."""
    for k in range(rank_nhome[src] + used[src]):
        e = _held_expert(src, k, rank_nhome, rank_home, rep_on)
        if tok[src, e] > 0 and (held[dst, e] != 0 or (
                used[dst] < slots[dst] and _copy_holder(e, dst, hcount, hlist, xt, window, recv,
                                                        send) >= 0)):
            return True
    return False


@cuda.jit(device=True)
def _candidate(e, src, dst, load, home, slots, window, alpha, beta, tt, xt, epsilon, hcount,
               hlist, hpos, tok, held, blk_of, blk_assign, times, comp, t_in, t_out, recv,
               send, used, pool_s, pool_n, cum, pre):
    """One candidate of the CPU kernel's per-pair search: (gains, x, holder, npool); fills the
    pool."""
    no = (False, 0, -1, 0)
    floor = times[src] - epsilon
    b = blk_of[e]
    own = (blk_assign[b, src, dst] if b >= 0
           else _static_share(load, home, hpos, hcount, dst, e, src))
    slope = beta - 2.0 * tt[dst, src]
    lb_out = 2.0 * t_out[dst] + (dmin(slope, mul(own, slope)) if own > 0 else beta)
    lb = comp[dst] + dmax(beta + 2.0 * t_in[dst], lb_out)
    if tok[dst, e] == 0:
        lb += alpha
    if lb >= floor + mul(1e-9, abs(floor) + lb):
        return no
    holder = -1
    if held[dst, e] == 0:
        if used[dst] >= slots[dst]:
            return no
        holder = _copy_holder(e, dst, hcount, hlist, xt, window, recv, send)
        if holder < 0:
            return no
    npool, total = _pool(e, src, dst, load, home, hcount, hpos, held, blk_of, blk_assign, tt,
                         pool_s, pool_n)
    if total == 0:
        return no
    own_src = pool_n[npool - 1] if pool_s[npool - 1] == src else 0
    _prefix(npool, pool_s, pool_n, src, dst, tt, cum, pre)
    x = _amount(e, src, dst, npool, pool_s, cum, pre, total, own_src, total == tok[src, e], tok,
                comp, t_in, t_out, alpha, beta, tt)
    if times[src] - _worst(x, e, src, dst, npool, pool_s, cum, pre, tok, comp, t_in, t_out, alpha,
                           beta, tt) > epsilon:
        return True, x, holder, npool
    return no


@cuda.jit
def _parallel_kernel(load, home, slots, window, alpha, beta, tt, xt, limit, epsilon,
                     hot_fraction, hcount, hlist, hpos, rank_nhome, rank_home, held, tok, flow,
                     rep_on, blk_of, order, mv_e, mv_holder, mv_x, mv_npool, mv_pool_s, mv_take,
                     can_pair, cand_x, cand_holder, rep, n_rep_out, blk_expert, blk_assign,
                     n_blk_out, rounds_out, moves_out, objective_out, status_out):
    """Block l plans layer l (module docstring). Inputs: load int64 [L, S, E], home bool
    [L, G, E], slots int64 [G], window float64 [L, G], tt/xt float64 [G, G], limit int64
    (> 0 rounds), epsilon and hot_fraction float64. Scratch (any values; per layer): hcount
    [E], hlist [E, G], hpos [G, E], rank_nhome [G], rank_home [G, E], held uint8 [G, E], tok
    [G, E], flow [G, G], rep_on [G, max slots], blk_of [E], order [G, E + max slots], mv_e,
    mv_holder, mv_x, mv_npool [G], mv_pool_s, mv_take [G, G], can_pair uint8 [G, G], cand_x,
    cand_holder [G, E + max slots]. Outputs: see CudaParallelPlan."""
    layer = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    num_ranks = home.shape[1]
    num_experts = home.shape[2]
    ld = load[layer]
    hm = home[layer]
    win = window[layer]
    hc = hcount[layer]
    hl = hlist[layer]
    hp = hpos[layer]
    rnh = rank_nhome[layer]
    rh = rank_home[layer]
    hd = held[layer]
    tk = tok[layer]
    fl = flow[layer]
    ro = rep_on[layer]
    bo = blk_of[layer]
    od = order[layer]
    me = mv_e[layer]
    mh = mv_holder[layer]
    mx = mv_x[layer]
    mn = mv_npool[layer]
    mps = mv_pool_s[layer]
    mt = mv_take[layer]
    cm = can_pair[layer]
    cx = cand_x[layer]
    ch = cand_holder[layer]
    rp = rep[layer]
    be = blk_expert[layer]
    ba = blk_assign[layer]

    times = cuda.shared.array(MAX_RANKS, float64)
    comp = cuda.shared.array(MAX_RANKS, float64)
    t_in = cuda.shared.array(MAX_RANKS, float64)
    t_out = cuda.shared.array(MAX_RANKS, float64)
    recv = cuda.shared.array(MAX_RANKS, float64)
    send = cuda.shared.array(MAX_RANKS, float64)
    used = cuda.shared.array(MAX_RANKS, int64)
    hottest = cuda.shared.array(MAX_RANKS, int64)
    coldest = cuda.shared.array(MAX_RANKS, int64)
    taken = cuda.shared.array(MAX_RANKS, int64)
    pair_src = cuda.shared.array(MAX_RANKS // 2, int64)
    pair_dst = cuda.shared.array(MAX_RANKS // 2, int64)
    best = cuda.shared.array(MAX_RANKS // 2, int64)
    new_blk = cuda.shared.array(MAX_RANKS // 2, int64)
    num_cand = cuda.shared.array(MAX_RANKS, int32)
    ints = cuda.shared.array(16, int64)
    flts = cuda.shared.array(4, float64)
    pool_s = cuda.local.array(MAX_RANKS, int64)
    pool_n = cuda.local.array(MAX_RANKS, int64)
    cum = cuda.local.array(MAX_RANKS + 1, int64)
    pre = cuda.local.array((4, MAX_RANKS + 1), float64)

    # The start: home holders and home experts, nothing copied, the static split; bad values
    # flag the layer.
    if tid == 0:
        for i in range(16):
            ints[i] = 0
    for g in range(tid, num_ranks, nt):
        used[g] = 0
        recv[g] = 0.0
        send[g] = 0.0
        c = 0
        for e in range(num_experts):
            if hm[g, e]:
                rh[g, c] = e
                c += 1
        rnh[g] = c
    cuda.syncthreads()
    for g in range(tid, num_ranks, nt):
        if not win[g] >= 0.0:
            cuda.atomic.max(ints, _BAD, 2)
    for e in range(tid, num_experts, nt):
        c = 0
        for g in range(num_ranks):
            if hm[g, e]:
                hp[g, e] = c
                hl[e, c] = g
                c += 1
            else:
                hp[g, e] = -1
            hd[g, e] = 1 if hm[g, e] else 0
            tk[g, e] = 0
            if ld[g, e] < 0:
                cuda.atomic.max(ints, _BAD, 1)
        hc[e] = c
        bo[e] = -1
    cuda.syncthreads()
    bad = ints[_BAD]
    for e in range(tid, num_experts, nt):  # tokens per (rank, expert): one thread per expert
        for s in range(num_ranks):
            if ld[s, e] > 0:
                for k in range(hc[e]):
                    g = hl[e, k]
                    tk[g, e] += _static_share(ld, hm, hp, hc, s, e, g)
    for s in range(tid, num_ranks, nt):  # tokens per (source, rank): one thread per source
        for g in range(num_ranks):
            fl[s, g] = 0
        for e in range(num_experts):
            if ld[s, e] > 0:
                for k in range(hc[e]):
                    g = hl[e, k]
                    fl[s, g] += _static_share(ld, hm, hp, hc, s, e, g)
    cuda.syncthreads()

    while bad == 0:
        # 1. Exact rank times (the CPU kernel's orders), then the mean and the hot threshold.
        for g in range(tid, num_ranks, nt):
            c = 0.0
            for i in range(rnh[g] + used[g]):
                e = _held_expert(g, i, rnh, rh, ro)
                if tk[g, e] > 0:
                    c += alpha + mul(beta, tk[g, e])
            comp[g] = c
            a_in = 0.0
            a_out = 0.0
            for s in range(num_ranks):
                a_in += mul(fl[s, g], tt[s, g])
                a_out += mul(fl[g, s], tt[g, s])
            t_in[g] = a_in
            t_out[g] = a_out
            times[g] = c + 2.0 * dmax(a_in, a_out)
            taken[g] = 0
        cuda.syncthreads()
        if tid == 0:
            total_time = 0.0
            top = times[0]
            for g in range(num_ranks):
                total_time += times[g]
                top = dmax(top, times[g])
            mean = total_time / num_ranks
            flts[_MEAN] = mean
            flts[_THRESHOLD] = mean + mul(1.0 - hot_fraction, top - mean)
            ints[_STOP] = 1 if ints[_ROUNDS] >= limit else 0
            ints[_NPAIRS] = 0
            ints[_KMAX] = 0
            ints[_APPLIED] = 0
            ints[_NNEW] = 0
        # 2. Hottest-first and coldest-first orders (ties to the lowest rank).
        for g in range(tid, num_ranks, nt):
            hot_pos = 0
            cold_pos = 0
            for h in range(num_ranks):
                if times[h] > times[g] or (times[h] == times[g] and h < g):
                    hot_pos += 1
                if times[h] < times[g] or (times[h] == times[g] and h < g):
                    cold_pos += 1
            hottest[hot_pos] = g
            coldest[cold_pos] = g
        cuda.syncthreads()
        if ints[_STOP] != 0:
            break
        threshold = flts[_THRESHOLD]

        # 3. Pairs: which (hot, colder) ranks could pair, all at once; then thread 0 matches
        # them in the CPU kernel's order (hot ranks hottest first, each taking the coldest free
        # rank it could pair with).
        num_hot = 0
        for g in range(num_ranks):
            if times[g] > threshold:
                num_hot += 1
        for item in range(tid, num_hot * num_ranks, nt):
            src = hottest[item // num_ranks]
            dst = coldest[item % num_ranks]
            cm[item // num_ranks, item % num_ranks] = 1 if (
                times[dst] < times[src]
                and comp[dst] + beta + 2.0 * t_in[dst] < times[src] - epsilon
                and _receives(src, dst, slots, win, xt, hc, hl, rnh, rh, ro, tk, hd, recv, send,
                              used)) else 0
        cuda.syncthreads()
        for i in range(tid, num_hot, nt):  # each row compacted in place: the receivers' j
            k = 0
            for j in range(num_ranks):
                if cm[i, j] != 0:
                    cm[i, k] = j  # < MAX_RANKS = 256: fits uint8
                    k += 1
            num_cand[i] = k
        cuda.syncthreads()
        if tid == 0:
            num_pairs = 0
            kmax = 0
            for i in range(num_hot):
                src = hottest[i]
                if taken[src] != 0:
                    continue
                taken[src] = 1
                for k in range(num_cand[i]):
                    dst = coldest[cm[i, k]]
                    if taken[dst] == 0:
                        pair_src[num_pairs] = src
                        pair_dst[num_pairs] = dst
                        best[num_pairs] = _NONE
                        num_pairs += 1
                        if rnh[src] + used[src] > kmax:
                            kmax = rnh[src] + used[src]
                        taken[dst] = 1
                        break
            ints[_NPAIRS] = num_pairs
            ints[_KMAX] = kmax
        cuda.syncthreads()
        num_pairs = ints[_NPAIRS]
        kmax = ints[_KMAX]

        # 4. Each pair's hot-rank experts, heaviest first (ties to the lowest id).
        for item in range(tid, num_pairs * kmax, nt):
            src = pair_src[item // kmax]
            k = item % kmax
            if k < rnh[src] + used[src]:
                e = _held_expert(src, k, rnh, rh, ro)
                n = tk[src, e]
                if n > 0:
                    pos = 0
                    for k2 in range(rnh[src] + used[src]):
                        f = _held_expert(src, k2, rnh, rh, ro)
                        m = tk[src, f]
                        if m > n or (m == n and f < e):
                            pos += 1
                    od[src, pos] = e
        cuda.syncthreads()
        # 5. Every candidate of every pair at once; the heaviest gaining expert per pair.
        for item in range(tid, num_pairs * kmax, nt):
            p = item // kmax
            pos = item % kmax
            src = pair_src[p]
            n_order = 0
            for k in range(rnh[src] + used[src]):
                if tk[src, _held_expert(src, k, rnh, rh, ro)] > 0:
                    n_order += 1
            if pos < n_order:
                ok, x, holder, npool = _candidate(
                    od[src, pos], src, pair_dst[p], ld, hm, slots, win, alpha, beta, tt, xt,
                    epsilon, hc, hl, hp, tk, hd, bo, ba, times, comp, t_in, t_out, recv, send,
                    used, pool_s, pool_n, cum, pre)
                if ok:
                    cx[p, pos] = x
                    ch[p, pos] = holder
                    cuda.atomic.min(best, p, pos)
        cuda.syncthreads()
        # 6. A thread per pair rebuilds its winner's pool and keeps the move.
        for p in range(tid, num_pairs, nt):
            mn[p] = 0
            if best[p] < _NONE:
                src = pair_src[p]
                dst = pair_dst[p]
                e = od[src, best[p]]
                x = cx[p, best[p]]
                holder = ch[p, best[p]]
                npool, total = _pool(e, src, dst, ld, hm, hc, hp, hd, bo, ba, tt, pool_s, pool_n)
                me[p] = e
                mh[p] = holder
                mx[p] = x
                mn[p] = npool
                left = x
                for i in range(npool):
                    take = dmin(pool_n[i], left)
                    mps[p, i] = pool_s[i]
                    mt[p, i] = take
                    left -= take
        cuda.syncthreads()
        # 7. Admit the moves in pair order (thread 0), start new blocks, apply (per pair).
        if tid == 0:
            for p in range(num_pairs):
                if mn[p] == 0:
                    continue
                dst = pair_dst[p]
                e = me[p]
                holder = mh[p]
                if holder >= 0:
                    t = xt[holder, dst]
                    if send[holder] + t > win[holder]:
                        mn[p] = 0
                        continue
                    ro[dst, used[dst]] = e
                    used[dst] += 1
                    hd[dst, e] = 1
                    n_rep = ints[_NREP]
                    rp[n_rep, 0] = dst
                    rp[n_rep, 1] = e
                    rp[n_rep, 2] = holder
                    ints[_NREP] = n_rep + 1
                    recv[dst] += t
                    send[holder] += t
                if bo[e] < 0:
                    b = ints[_NBLK]
                    ints[_NBLK] = b + 1
                    bo[e] = b
                    be[b] = e
                    new_blk[ints[_NNEW]] = b
                    ints[_NNEW] += 1
                ints[_APPLIED] += 1
        cuda.syncthreads()
        per_blk = num_ranks * num_ranks
        for item in range(tid, ints[_NNEW] * per_blk, nt):  # zeros, then the home holders'
            r = item % per_blk
            ba[new_blk[item // per_blk], r // num_ranks, r % num_ranks] = 0
        cuda.syncthreads()
        for item in range(tid, ints[_NNEW] * num_ranks, nt):
            b = new_blk[item // num_ranks]
            s = item % num_ranks
            e = be[b]
            if ld[s, e] > 0:
                for k in range(hc[e]):
                    g = hl[e, k]
                    ba[b, g, s] = _static_share(ld, hm, hp, hc, s, e, g)
        cuda.syncthreads()
        for p in range(tid, num_pairs, nt):
            if mn[p] > 0:
                src = pair_src[p]
                dst = pair_dst[p]
                e = me[p]
                b = bo[e]
                for i in range(mn[p]):
                    s = mps[p, i]
                    take = mt[p, i]
                    ba[b, src, s] -= take
                    ba[b, dst, s] += take
                    fl[s, src] -= take
                    fl[s, dst] += take
                tk[src, e] -= mx[p]
                tk[dst, e] += mx[p]
        cuda.syncthreads()
        if ints[_APPLIED] == 0:
            break
        cuda.syncthreads()
        if tid == 0:
            ints[_ROUNDS] += 1
            ints[_MOVES] += ints[_APPLIED]
        cuda.syncthreads()

    # Rows past the plan get -1 (replicas, blk_expert), so that those outputs depend on this
    # launch alone; blk_assign is valid for the first num_blocks blocks only.
    n_rep = ints[_NREP]
    n_blk = ints[_NBLK]
    for i in range(n_rep * 3 + tid, rp.shape[0] * 3, nt):
        rp[i // 3, i % 3] = -1
    for i in range(n_blk + tid, be.shape[0], nt):
        be[i] = -1
    if tid == 0:
        makespan = 0.0
        for g in range(num_ranks):
            makespan = dmax(makespan, times[g])
        n_rep_out[layer] = n_rep
        n_blk_out[layer] = n_blk
        rounds_out[layer] = ints[_ROUNDS]
        moves_out[layer] = ints[_MOVES]
        objective_out[layer] = makespan if bad == 0 else math.nan
        status_out[layer] = bad


class CudaParallelPlan(NamedTuple):
    """L layers' plans as device arrays (row l: layer l): replicas int64 [L, R_max, 3], rows
    (rank, expert, source) in the order made, -1 past num_replicas; num_replicas int64 [L];
    blk_expert int64 [L, B_max], experts whose tokens moved, -1 past num_blocks; blk_assign int64
    [L, B_max, G, S], their assignment transposed as parallel_arrays returns it (tokens of
    (s, e) on g at [l, b, g, s]; valid for the first num_blocks blocks); num_blocks int64
    [L]; num_rounds, num_moves int64 [L]; objective float64 [L], the largest rank time (NaN
    for a rejected layer); status int64 [L]: 0 fine, 1 negative load, 2 negative or NaN
    window (a rejected layer is left unplanned)."""

    replicas: object
    num_replicas: object
    blk_expert: object
    blk_assign: object
    num_blocks: object
    num_rounds: object
    num_moves: object
    objective: object
    status: object


STATUS_ERRORS = {1: "load has a negative token count",
                 2: "window must be >= 0 seconds on every rank (no NaN)"}


def _is_torch(obj) -> bool:
    return type(obj).__module__.startswith("torch")


class CudaParallel:
    """The parallel greedy on the GPU for one placement, slot budget, cost model and layer count.

    home: bool [G, E] (every layer) or [L, G, E]; slots: int or int [G]; cost: CostModel for G
    ranks; rules: ParallelRules (None: the defaults); num_layers: L, the layers one `plan`
    call plans; threads: threads per block (1, or a multiple of 32 up to 1024). Validates all
    of it once; `plan` only checks its arrays and launches one kernel. `out` holds the
    CudaParallelPlan buffers every launch overwrites.
    """

    def __init__(self, home: np.ndarray, slots: np.ndarray | int, cost: CostModel,
                 rules: ParallelRules | None = None, *, num_layers: int,
                 threads: int = THREADS) -> None:
        self.rules = checked_rules(rules)
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
        if num_ranks > MAX_RANKS:
            raise ValueError(f"parallel_cuda plans at most MAX_RANKS = {MAX_RANKS} ranks, got "
                             f"{num_ranks}")
        self.num_layers = int(num_layers)
        self.shape = (num_ranks, num_experts)
        self.threads = int(threads)
        limit = self.rules.rounds_limit
        max_slots = max(int(np.minimum(p.slots, num_experts).max(initial=0)), 1)
        total_slots = max(int(np.minimum(p.slots, num_experts).sum()), 1)
        cap_blk = max(min(num_experts, limit * max(num_ranks // 2, 1)), 1)
        L, G, E = num_layers, num_ranks, num_experts  # noqa: N806 (the shape letters)
        dev = cuda.to_device
        self._home = dev(np.ascontiguousarray(np.stack(homes), dtype=np.bool_))
        self._slots = dev(np.ascontiguousarray(p.slots, dtype=np.int64))
        self._tt = dev(np.ascontiguousarray(cost.token_time, dtype=np.float64))
        self._xt = dev(np.ascontiguousarray(cost.transfer_time, dtype=np.float64))
        self._scalars = (float(cost.alpha), float(cost.beta), int(limit),
                         float(self.rules.epsilon), float(self.rules.hot_fraction))
        empty = cuda.device_array
        self.scratch = (empty((L, E), np.int64), empty((L, E, G), np.int64),
                        empty((L, G, E), np.int64), empty((L, G), np.int64),
                        empty((L, G, E), np.int64), empty((L, G, E), np.uint8),
                        empty((L, G, E), np.int64), empty((L, G, G), np.int64),
                        empty((L, G, max_slots), np.int64), empty((L, E), np.int64),
                        empty((L, G, E + max_slots), np.int64), empty((L, G), np.int64),
                        empty((L, G), np.int64), empty((L, G), np.int64),
                        empty((L, G), np.int64), empty((L, G, G), np.int64),
                        empty((L, G, G), np.int64), empty((L, G, G), np.uint8),
                        empty((L, G, E + max_slots), np.int64),
                        empty((L, G, E + max_slots), np.int64))
        self.out = CudaParallelPlan(empty((L, total_slots, 3), np.int64), empty(L, np.int64),
                                    empty((L, cap_blk), np.int64),
                                    empty((L, cap_blk, G, G), np.int64), empty(L, np.int64),
                                    empty(L, np.int64), empty(L, np.int64),
                                    empty(L, np.float64), empty(L, np.int64))
        self._torch_out = None

    def _device(self, arr, name: str, shape: tuple, dtype):
        if _is_torch(arr):
            import torch

            want = {np.int64: torch.int64, np.float64: torch.float64}[dtype]
            if (arr.dtype != want or tuple(arr.shape) != shape or not arr.is_contiguous()
                    or arr.device.type != "cuda"):
                raise ValueError(f"{name} must be a contiguous CUDA torch.{str(want)[6:]} tensor "
                                 f"of shape {shape}, got {arr.dtype} {tuple(arr.shape)} on "
                                 f"{arr.device}")
            return cuda.as_cuda_array(arr, sync=False)
        ok = (cuda.is_cuda_array(arr) if not SIMULATOR
              else hasattr(arr, "copy_to_host") or isinstance(arr, np.ndarray))
        if not ok:
            raise TypeError(f"{name} must be a CUDA array (a torch CUDA tensor or a numba "
                            f"device array), got {type(arr).__name__}")
        if not SIMULATOR and not hasattr(arr, "copy_to_host"):
            arr = cuda.as_cuda_array(arr, sync=False)
        contiguous = (arr.flags.c_contiguous if isinstance(arr, np.ndarray)
                      else arr.is_c_contiguous())
        if arr.dtype != dtype or tuple(arr.shape) != shape or not contiguous:
            raise ValueError(f"{name} must be a C-contiguous {np.dtype(dtype)} array of shape "
                             f"{shape}, got {arr.dtype} {tuple(arr.shape)}")
        return arr

    def plan(self, load, window, stream=None) -> CudaParallelPlan:
        """Plan L layers: load int64 [L, S, E], window float64 [L, G] (seconds), device arrays
        (torch CUDA tensors are taken without a copy). Launches on `stream` (torch's current
        stream for torch tensors, else the default stream) and returns the preallocated
        buffers (torch tensors for torch inputs) without synchronising; negative loads and
        negative or NaN windows are reported per layer in `status`."""
        L, (G, E) = self.num_layers, self.shape  # noqa: N806 (the shape letters)
        use_torch = _is_torch(load)
        load_d = self._device(load, "load", (L, G, E), np.int64)
        window_d = self._device(window, "window", (L, G), np.float64)
        if stream is None:
            stream = 0
            if use_torch and not SIMULATOR:
                import torch

                stream = cuda.external_stream(torch.cuda.current_stream().cuda_stream)
        alpha, beta, limit, epsilon, hot = self._scalars
        _parallel_kernel[L, self.threads, stream](
            load_d, self._home, self._slots, window_d, alpha, beta, self._tt, self._xt, limit,
            epsilon, hot, *self.scratch, *self.out)
        if use_torch:
            return self.torch_out()
        return self.out

    def torch_out(self) -> CudaParallelPlan:
        """The output buffers as torch CUDA tensors (views, made once)."""
        if self._torch_out is None:
            import torch

            self._torch_out = CudaParallelPlan(*(torch.as_tensor(a, device="cuda")
                                                 for a in self.out))
        return self._torch_out


def parallel_cuda_arrays(load, home, slots, window, alpha, beta, token_time, transfer_time,
                         rules: ParallelRules | None = None, *, threads: int = THREADS) -> list:
    """`parallel.parallel_arrays` for L layers at once on the GPU, numpy in and out (copies both
    ways; for tests). load int64 [L, S, E]; home bool [L, G, E] or [G, E]; window float64
    [L, G]; one cost model and slot budget for every layer. Returns one tuple per layer:
    (replicas, blk_expert, blk_assign, rounds, moves, makespan), parallel_arrays' outputs."""
    load = np.asarray(load)
    if load.ndim != 3:
        raise ValueError(f"load must be a 3-D [L, S, E] array, got shape {load.shape}")
    num_layers = load.shape[0]
    cost = CostModel(float(alpha), float(beta), np.asarray(token_time, dtype=np.float64),
                     np.asarray(transfer_time, dtype=np.float64))
    runner = CudaParallel(home, slots, cost, rules, num_layers=num_layers, threads=threads)
    window = np.asarray(window, dtype=np.float64)
    if window.shape != (num_layers, runner.shape[0]):
        raise ValueError(f"window must be [L, G] = {(num_layers, runner.shape[0])}, got shape "
                         f"{window.shape}")
    if load.shape[1:] != runner.shape:
        raise ValueError(f"load must be [L, S, E] = {(num_layers, *runner.shape)}, got shape "
                         f"{load.shape}")
    out = runner.plan(cuda.to_device(np.ascontiguousarray(load, dtype=np.int64)),
                      cuda.to_device(np.ascontiguousarray(window)))
    host = CudaParallelPlan(*(a.copy_to_host() for a in out))
    for layer, code in enumerate(host.status):
        if code:
            raise ValueError(f"layer {layer}: {STATUS_ERRORS[int(code)]}")
    return [(host.replicas[i, :host.num_replicas[i]], host.blk_expert[i, :host.num_blocks[i]],
             host.blk_assign[i, :host.num_blocks[i]], int(host.num_rounds[i]),
             int(host.num_moves[i]), float(host.objective[i]))
            for i in range(num_layers)]
