"""The greedy planner as a CUDA kernel (numba.cuda): one thread block per MoE layer.

The same rules 1-7 as `greedy.greedy_arrays` (docs/planner.md, "The greedy's rules") and the same
plan, bit for bit: a launch plans L layers at once (inputs stacked [L, ...]), so that a runtime
can plan inside its dispatch on the GPU, with no host synchronisation, and capture the launch in
a CUDA graph. Rule 8 (`also_paper`) is not supported (the kernel raises ValueError for it);
every other GreedyRules option is (k_max, epsilon, move_local, evacuate, two_phase, mean_cap).

How a block works (T threads, THREADS by default): the start (home holders, the static split,
rank times) is spread over experts and ranks; then each move is found as the CPU kernel finds
it. The CPU kernel tries candidates (destination rank, expert) in a fixed order (destinations
fastest first, ties to the lowest rank; experts of the slowest rank heaviest first, ties to the
lowest id) and applies the FIRST one that gains. Here the T threads evaluate T consecutive
candidates of that order at once, each with the CPU kernel's arithmetic (`_candidate`), and an
atomic minimum over the candidate index picks the first gaining one: the same move, whatever
the thread timing. Only when none of the T gains do they go on to the next T. The move is then
applied by thread 0 (O(G) updates) and the threads together (a new dense [S, G] block).

Floating point: every value that decides a choice is float64, computed in the CPU kernel's order
of operations: the scalar rules (a candidate's times, rule 6's water fill, applying the move)
are greedy.py's own functions, compiled a second time as device functions
(`numba_cuda.device`, probe.planner.scalar). The products that feed a sum are rounded on their
own (libdevice's dmul_rn):
the CUDA compiler would otherwise fuse a * b + c into one FMA, which rounds once and can flip
a tie. Shared memory per block: about 14 KB (rank arrays of MAX_RANKS entries, the slowest
rank's token counts: MAX_EXPERTS entries); the [G, E] and [G, G] working arrays live in global
scratch (preallocated per shape); each thread keeps its
candidate's pool in local arrays of MAX_RANKS entries.

Entry points:
    `CudaGreedy(home, slots, cost, rules, num_layers=L)`: validates once, keeps device
        buffers; `plan(load, window)` launches on the caller's stream (torch's current stream
        for torch tensors) and returns device arrays (a `CudaPlan`), without synchronising.
    `greedy_cuda_arrays(...)`: numpy in, numpy out (copies both ways), for tests.

Under NUMBA_ENABLE_CUDASIM=1 (set before numba.cuda is first imported) both run in Numba's
CUDA simulator, with numpy arrays standing in for device arrays.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numba import float64, int32, int64

from probe.planner import greedy
from probe.planner.cost import CostModel
from probe.planner.greedy import UNLIMITED_MOVES, _rules
from probe.planner.greedy_rules import GreedyRules
from probe.planner.numba_cuda import SIMULATOR, cuda, device, dmax, dmin, mul
from probe.planner.problem import BalanceProblem

__all__ = ["MAX_EXPERTS", "MAX_RANKS", "THREADS", "CudaGreedy", "CudaPlan", "greedy_cuda_arrays"]

# Most ranks a layer may have (the per-thread pool and the shared rank arrays are this long).
MAX_RANKS = 64
# Most experts a layer may have (the slowest rank's token counts are staged in shared memory).
MAX_EXPERTS = 1024
# Threads per block (one block per layer) unless the caller picks another multiple of 32.
THREADS = 128
# "No candidate gained yet" (larger than any candidate index: MAX_RANKS * experts < 2**40).
_NONE = 1 << 40
# Slots of the block's shared integer and float scalars.
_SRC, _NE, _WIN, _E, _DST, _HOLDER, _NPOOL, _X, _B, _NEWB, _NBLK, _NREP, _MOVES, _BAD = range(14)
_MEAN, _TSRC, _TDST = range(3)


# The CPU kernel's scalar rules as device functions: the same Python functions, compiled again
# (probe.planner.scalar), so the candidates' times are the CPU kernel's floats.
_static_share = device(greedy._static_share, inline=True)
_src_after = device(greedy._src_after)
_after = device(greedy._after)
_worst = device(greedy._worst)
_water_fill = device(greedy._water_fill)
_keep_move = device(greedy._keep_move)
_apply_move = device(greedy._apply_move)


@cuda.jit(device=True)
def _candidate(e, src, dst, load, home, slots, window, alpha, beta, tt, xt, epsilon, move_local,
               evacuate, two_phase, mean_cap, mean, hcount, hlist, hpos, tok, held, blk_of,
               blk_assign, times, comp, t_in, t_out, recv, send, used, pool_s, pool_n, takes,
               new_out, parts, ev_takes, ev_out, ev_parts):
    """One candidate of greedy._greedy_run's search (the body of its expert loop, the dst
    pruning included): moving tokens of e from src to dst. Returns (gains, x, t_src, t_dst,
    holder, npool); the pool, takes, new_out and parts describe the move."""
    no = (False, 0, 0.0, 0.0, -1, 0)
    floor = times[src] - epsilon
    lb_dst = comp[dst] + beta + 2.0 * t_in[dst]
    if lb_dst >= floor + mul(1e-9, abs(floor) + lb_dst):
        return no
    on_dst = held[dst, e] != 0
    if not on_dst and used[dst] >= slots[dst]:
        return no
    b = blk_of[e]
    own = (blk_assign[b, dst, src] if b >= 0
           else _static_share(load, home, hpos, hcount, dst, e, src))
    slope = beta - 2.0 * tt[dst, src]
    lb_out = 2.0 * t_out[dst] + (dmin(slope, mul(own, slope)) if own > 0 else beta)
    lb = comp[dst] + dmax(beta + 2.0 * t_in[dst], lb_out)
    if tok[dst, e] == 0:
        lb += alpha
    if lb >= floor + mul(1e-9, abs(floor) + lb):
        return no
    holder = -1
    if not on_dst:
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
        if holder < 0:
            return no
    num_ranks = hpos.shape[0]
    npool = 0
    total = 0
    a = own
    if a > 0:
        pool_s[0] = dst
        pool_n[0] = a
        npool = 1
        total += a
    for s in range(num_ranks):
        if s == src or s == dst:  # noqa: SIM109 (a plain comparison compiles for CUDA)
            continue
        a = (blk_assign[b, s, src] if b >= 0
             else _static_share(load, home, hpos, hcount, s, e, src))
        if a > 0 and held[s, e] == 0:
            pool_s[npool] = s
            pool_n[npool] = a
            npool += 1
            total += a
    if move_local:
        a = (blk_assign[b, src, src] if b >= 0
             else _static_share(load, home, hpos, hcount, src, e, src))
        if a > 0:
            pool_s[npool] = src
            pool_n[npool] = a
            npool += 1
            total += a
    if total == 0:
        return no
    cap = mean if mean_cap else -math.inf
    own_src = 0
    if move_local and pool_s[npool - 1] == src:
        own_src = pool_n[npool - 1]
    # greedy._greedy_run's two branches (two_phase with own tokens: phase 1 over the other
    # sources' tokens, then phase 2; else one fill over the whole pool), with one _water_fill
    # call site between them (the compiler inlines each site).
    phase_one = two_phase and own_src > 0
    n_other = total - own_src if phase_one else total
    second = phase_one
    worst = 0.0
    x = 0
    if n_other > 0:
        x = _water_fill(n_other, e, src, dst, pool_s, pool_n, tok, comp, t_in, t_out, alpha,
                        beta, tt, parts, cap)
        if phase_one:
            t_src, t_dst = _after(x, e, src, dst, pool_s, pool_n, tok, comp, t_in, t_out, alpha,
                                  beta, tt, parts)
            worst = _worst(x, t_src, t_dst, src, dst, npool, pool_s, pool_n, comp, t_in, t_out,
                           tt, ev_takes, ev_out)
            if x < n_other or t_src <= t_dst or t_src <= cap:
                second = False
    if second:
        lo = n_other + 1
        hi = total - 1 if total == tok[src, e] and total > lo else total
        while lo < hi:
            mid = (lo + hi) // 2
            a_src, a_dst = _after(mid, e, src, dst, pool_s, pool_n, tok, comp, t_in, t_out,
                                  alpha, beta, tt, parts)
            b_src, b_dst = _after(mid + 1, e, src, dst, pool_s, pool_n, tok, comp, t_in,
                                  t_out, alpha, beta, tt, parts)
            if dmax(b_src, b_dst) >= dmax(a_src, a_dst):
                hi = mid
            else:
                lo = mid + 1
        x2 = lo
        a_src, a_dst = _after(x2, e, src, dst, pool_s, pool_n, tok, comp, t_in, t_out, alpha,
                              beta, tt, parts)
        if a_src <= cap:
            lo = n_other + 1
            hi = x2
            while lo < hi:
                mid = (lo + hi) // 2
                if _src_after(mid, e, src, dst, pool_s, pool_n, tok, comp, t_in, t_out,
                              alpha, beta, tt) <= cap:
                    hi = mid
                else:
                    lo = mid + 1
            x2 = lo
        a_src, a_dst = _after(x2, e, src, dst, pool_s, pool_n, tok, comp, t_in, t_out, alpha,
                              beta, tt, parts)
        w2 = _worst(x2, a_src, a_dst, src, dst, npool, pool_s, pool_n, comp, t_in, t_out, tt,
                    ev_takes, ev_out)
        if n_other == 0 or w2 < worst:
            x = x2
    t_src, t_dst = _after(x, e, src, dst, pool_s, pool_n, tok, comp, t_in, t_out, alpha, beta, tt,
                          parts)
    worst = _worst(x, t_src, t_dst, src, dst, npool, pool_s, pool_n, comp, t_in, t_out, tt,
                   takes, new_out)
    if evacuate and x < total and total == tok[src, e]:
        ev_src, ev_dst = _after(total, e, src, dst, pool_s, pool_n, tok, comp, t_in, t_out,
                                alpha, beta, tt, ev_parts)
        ev_worst = _worst(total, ev_src, ev_dst, src, dst, npool, pool_s, pool_n, comp, t_in,
                          t_out, tt, ev_takes, ev_out)
        if ev_worst < worst:
            x = total
            t_src = ev_src
            t_dst = ev_dst
            worst = ev_worst
            _keep_move(npool, ev_takes, ev_out, ev_parts, takes, new_out, parts)
    if times[src] - worst > epsilon:
        return True, x, t_src, t_dst, holder, npool
    return no


@cuda.jit
def _greedy_kernel(load, home, slots, window, alpha, beta, tt, xt, limit, epsilon, move_local,
                   evacuate, two_phase, mean_cap, hcount, hlist, hpos, tok, flow, held, blk_of,
                   exp_order, rep, n_rep_out, blk_expert, blk_assign, n_blk_out, moves_out,
                   objective_out, status_out):
    """Block l plans layer l (greedy._greedy_run's rules 1-7). Inputs: load int64 [L, S, E],
    home bool [L, G, E], slots int64 [G], window float64 [L, G], tt/xt float64 [G, G]
    (token_time, transfer_time), limit int64 (> 0 moves), epsilon float64, four flags. Scratch
    (any values): hcount [L, E], hlist [L, E, G], hpos [L, G, E], tok [L, G, E], flow [L, G, G],
    held uint8 [L, G, E], blk_of [L, E], exp_order [L, E], all int64 but held. Outputs (any
    values before; every entry is written): see CudaPlan."""
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
    tk = tok[layer]
    fl = flow[layer]
    hd = held[layer]
    bo = blk_of[layer]
    eo = exp_order[layer]
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
    dst_order = cuda.shared.array(MAX_RANKS, int32)
    best_s = cuda.shared.array(MAX_RANKS, int64)
    best_takes = cuda.shared.array(MAX_RANKS, int64)
    best_out = cuda.shared.array(MAX_RANKS, float64)
    best_parts = cuda.shared.array(6, float64)
    src_tok = cuda.shared.array(MAX_EXPERTS, int64)
    ints = cuda.shared.array(16, int64)
    flts = cuda.shared.array(4, float64)

    pool_s = cuda.local.array(MAX_RANKS, int64)
    pool_n = cuda.local.array(MAX_RANKS, int64)
    takes = cuda.local.array(MAX_RANKS, int64)
    new_out = cuda.local.array(MAX_RANKS, float64)
    ev_takes = cuda.local.array(MAX_RANKS, int64)
    ev_out = cuda.local.array(MAX_RANKS, float64)
    parts = cuda.local.array(6, float64)
    ev_parts = cuda.local.array(6, float64)

    # The start: home holders (hlist[e, :hcount[e]] in rank order, hpos[g, e] = g's position
    # there or -1), replicas held (none yet), zero flows; bad values flag the layer.
    if tid == 0:
        ints[_NBLK] = 0
        ints[_NREP] = 0
        ints[_MOVES] = 0
        ints[_BAD] = 0
    for g in range(tid, num_ranks, nt):
        used[g] = 0
        recv[g] = 0.0
        send[g] = 0.0
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
    for i in range(tid, num_ranks * num_ranks, nt):
        fl[i // num_ranks, i % num_ranks] = 0
    cuda.syncthreads()
    bad = ints[_BAD]
    # Static split (one thread per expert; flows summed with integer atomics: exact).
    for e in range(tid, num_experts, nt):
        for s in range(num_ranks):
            n = ld[s, e]
            if n <= 0:
                continue
            if hm[s, e]:
                tk[s, e] += n
                cuda.atomic.add(fl, (s, s), n)
            elif hc[e] == 1:
                g = hl[e, 0]
                tk[g, e] += n
                cuda.atomic.add(fl, (s, g), n)
            else:
                h = hc[e]
                q = n // h
                r = n - q * h
                for k in range(h):
                    c = q + (1 if (k + s) % h < r else 0)
                    g = hl[e, k]
                    tk[g, e] += c
                    cuda.atomic.add(fl, (s, g), c)
    cuda.syncthreads()
    # Rank times, in the CPU kernel's summation orders (experts ascending, sources ascending).
    for g in range(tid, num_ranks, nt):
        c = 0.0
        for e in range(num_experts):
            if hm[g, e] and tk[g, e] > 0:
                c += alpha + mul(beta, tk[g, e])
        comp[g] = c
        a_in = 0.0
        for s in range(num_ranks):
            a_in += mul(fl[s, g], tt[s, g])
        a_out = 0.0
        for h in range(num_ranks):
            a_out += mul(fl[g, h], tt[g, h])
        t_in[g] = a_in
        t_out[g] = a_out
        times[g] = c + 2.0 * dmax(a_in, a_out)
    cuda.syncthreads()

    while bad == 0:
        if tid == 0:
            src = 0
            for g in range(1, num_ranks):
                if times[g] > times[src]:
                    src = g
            total_time = 0.0
            for g in range(num_ranks):
                total_time += times[g]
            ints[_SRC] = src
            flts[_MEAN] = total_time / num_ranks
            ints[_NE] = 0
            ints[_WIN] = _NONE
        cuda.syncthreads()
        if ints[_MOVES] >= limit:
            break
        src = ints[_SRC]
        mean = flts[_MEAN]
        # Destinations fastest first (ties to the lowest rank), experts of src heaviest first
        # (ties to the lowest id): each thread ranks its own entries (src's counts staged in
        # shared memory first).
        for e in range(tid, num_experts, nt):
            src_tok[e] = tk[src, e]
        cuda.syncthreads()
        t_src = times[src]
        for g in range(tid, num_ranks, nt):
            if g != src and times[g] < t_src:
                r = 0
                for h in range(num_ranks):
                    if h != src and times[h] < t_src and (
                            times[h] < times[g] or (times[h] == times[g] and h < g)):
                        r += 1
                dst_order[r] = g
        for e in range(tid, num_experts, nt):
            n = src_tok[e]
            if n > 0:
                r = 0
                for f in range(num_experts):
                    m = src_tok[f]
                    if m > n or (m == n and f < e):
                        r += 1
                eo[r] = e
                cuda.atomic.add(ints, _NE, 1)
        nd = 0
        for g in range(num_ranks):
            if g != src and times[g] < t_src:
                nd += 1
        cuda.syncthreads()
        ne = ints[_NE]
        num_cand = nd * ne
        found = False
        base = 0
        while base < num_cand:
            k = base + tid
            ok = False
            dst = 0
            e = 0
            x = 0
            c_src = 0.0
            c_dst = 0.0
            holder = -1
            npool = 0
            if k < num_cand:
                dst = dst_order[k // ne]
                e = eo[k % ne]
                ok, x, c_src, c_dst, holder, npool = _candidate(
                    e, src, dst, ld, hm, slots, win, alpha, beta, tt, xt, epsilon, move_local,
                    evacuate, two_phase, mean_cap, mean, hc, hl, hp, tk, hd, bo, ba, times, comp,
                    t_in, t_out, recv, send, used, pool_s, pool_n, takes, new_out, parts,
                    ev_takes, ev_out, ev_parts)
                if ok:
                    cuda.atomic.min(ints, _WIN, k)
            cuda.syncthreads()
            first = ints[_WIN]
            cuda.syncthreads()
            if first < _NONE:
                found = True
                if k == first:  # the first gaining candidate: its thread publishes the move
                    ints[_E] = e
                    ints[_DST] = dst
                    ints[_HOLDER] = holder
                    ints[_NPOOL] = npool
                    ints[_X] = x
                    flts[_TSRC] = c_src
                    flts[_TDST] = c_dst
                    for i in range(npool):
                        best_s[i] = pool_s[i]
                        best_takes[i] = takes[i]
                        best_out[i] = new_out[i]
                    for i in range(6):
                        best_parts[i] = parts[i]
                break
            base += nt
        if not found:
            break
        cuda.syncthreads()

        # Apply the move: the replica and the expert's block first (thread 0) ...
        if tid == 0:
            e = ints[_E]
            dst = ints[_DST]
            holder = ints[_HOLDER]
            if holder >= 0:
                hd[dst, e] = 1
                used[dst] += 1
                n_rep = ints[_NREP]
                rp[n_rep, 0] = dst
                rp[n_rep, 1] = e
                rp[n_rep, 2] = holder
                ints[_NREP] = n_rep + 1
                recv[dst] += xt[holder, dst]
                send[holder] += xt[holder, dst]
            b = bo[e]
            ints[_NEWB] = 0
            if b < 0:
                b = ints[_NBLK]
                ints[_NBLK] = b + 1
                bo[e] = b
                be[b] = e
                ints[_NEWB] = 1
            ints[_B] = b
        cuda.syncthreads()
        b = ints[_B]
        e = ints[_E]
        if ints[_NEWB] == 1:  # ... a new block starts from the static split (all threads) ...
            for i in range(tid, num_ranks * num_ranks, nt):
                s = i // num_ranks
                g = i % num_ranks
                ba[b, s, g] = _static_share(ld, hm, hp, hc, s, e, g)
        cuda.syncthreads()
        if tid == 0:  # ... then the tokens and times (thread 0, the CPU kernel's order).
            dst = ints[_DST]
            npool = ints[_NPOOL]
            x = ints[_X]
            _apply_move(b, e, src, dst, x, npool, best_s, best_takes, best_out, best_parts,
                        flts[_TSRC], flts[_TDST], ba, tk, comp, t_in, t_out, times)
            ints[_MOVES] += 1
        cuda.syncthreads()

    # The entries past the plan (replicas rows from n_rep, blocks from n_blk) get fixed values,
    # -1 and a zero assignment, so that every output entry is a function of this launch's inputs
    # alone: a reused runner or a replayed CUDA graph shows nothing of an earlier call. (Every
    # thread left the loop after a barrier that followed the last change to _NREP and _NBLK.)
    n_rep = ints[_NREP]
    n_blk = ints[_NBLK]
    for i in range(n_rep * 3 + tid, rp.shape[0] * 3, nt):
        rp[i // 3, i % 3] = -1
    for i in range(n_blk + tid, be.shape[0], nt):
        be[i] = -1
    per_blk = num_ranks * num_ranks
    for i in range(n_blk * per_blk + tid, ba.shape[0] * per_blk, nt):
        r = i % per_blk
        ba[i // per_blk, r // num_ranks, r % num_ranks] = 0
    if tid == 0:
        makespan = 0.0
        for g in range(num_ranks):
            makespan = dmax(makespan, times[g])
        n_rep_out[layer] = ints[_NREP]
        n_blk_out[layer] = ints[_NBLK]
        moves_out[layer] = ints[_MOVES]
        objective_out[layer] = makespan if bad == 0 else math.nan
        status_out[layer] = bad


class CudaPlan(NamedTuple):
    """L layers' greedy plans as device arrays (row l: layer l; n_rep = num_replicas[l] rows of
    replicas[l] and n_blk = num_blocks[l] entries of blk_expert[l] / blk_assign[l] are valid,
    as in lean.LeanPlan):
        replicas: int64 [L, R_max, 3], rows (rank, expert, source) in the order made;
        num_replicas: int64 [L]; blk_expert: int64 [L, B_max], experts whose tokens moved;
        blk_assign: int64 [L, B_max, S, G], their assignment; num_blocks: int64 [L];
        num_moves: int64 [L]; objective: float64 [L], the largest rank time (eq. 8), NaN for a
        rejected layer; status: int64 [L], 0 fine, 1 negative load, 2 negative or NaN window
        (2 when both)
        (a rejected layer is left unplanned).
    Every entry is written by each launch: the rows of replicas past num_replicas and the entries
    of blk_expert past num_blocks are -1, the blocks of blk_assign past num_blocks are zero. So
    the buffers depend on the launch's inputs alone, never on an earlier call's plan (what a
    replayed CUDA graph needs).
    """

    replicas: object
    num_replicas: object
    blk_expert: object
    blk_assign: object
    num_blocks: object
    num_moves: object
    objective: object
    status: object


STATUS_ERRORS = {1: "load has a negative token count",
                 2: "window must be >= 0 seconds on every rank (no NaN)"}


def _check_rules(rules: GreedyRules | None) -> GreedyRules:
    rules = _rules(rules)
    if rules.also_paper:
        raise ValueError("greedy_cuda does not support GreedyRules.also_paper (rule 8); run "
                         "the CPU kernel for it")
    return rules


def _is_torch(obj) -> bool:
    return type(obj).__module__.startswith("torch")


class CudaGreedy:
    """The greedy on the GPU for one placement, slot budget, cost model and layer count.

    home: bool [G, E] (every layer) or [L, G, E] static placement; slots: int or int [G];
    cost: CostModel for G ranks; rules: GreedyRules (None: the defaults; also_paper is not
    supported); num_layers: L, the layers one `plan` call plans; threads: threads per block (a
    multiple of 32, at most 1024; 1 for tests). Validates all of it once; `plan` only checks its
    arrays' shape, dtype and layout (host side, no synchronisation) and launches one kernel.
    Attributes: `out`, the CudaPlan buffers (numba device arrays) every launch overwrites whole;
    `scratch`, the kernel's working buffers (hcount, hlist, hpos, tok, flow, held, blk_of,
    exp_order as `_greedy_kernel` names them), which each launch initialises itself, so their
    contents between calls are irrelevant.
    """

    def __init__(self, home: np.ndarray, slots: np.ndarray | int, cost: CostModel,
                 rules: GreedyRules | None = None, *, num_layers: int,
                 threads: int = THREADS) -> None:
        self.rules = _check_rules(rules)
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
            raise ValueError(f"greedy_cuda plans at most MAX_RANKS = {MAX_RANKS} ranks, got "
                             f"{num_ranks}")
        if num_experts > MAX_EXPERTS:
            raise ValueError(f"greedy_cuda plans at most MAX_EXPERTS = {MAX_EXPERTS} experts, "
                             f"got {num_experts}")
        self.num_layers = int(num_layers)
        self.shape = (num_ranks, num_experts)
        self.threads = int(threads)
        self.cost = cost
        self.slots = p.slots
        limit = self.rules.max_moves(num_ranks)
        limit = limit if limit > 0 else UNLIMITED_MOVES
        self._limit = int(limit)
        total_slots = int(np.minimum(p.slots, num_experts).sum())
        cap_rep = max(min(total_slots, limit), 1)
        cap_blk = max(min(limit, num_experts), 1)
        L, G, E = num_layers, num_ranks, num_experts  # noqa: N806 (the shape letters)
        dev = cuda.to_device
        self._home = dev(np.ascontiguousarray(np.stack(homes), dtype=np.bool_))
        self._slots = dev(np.ascontiguousarray(p.slots, dtype=np.int64))
        self._tt = dev(np.ascontiguousarray(cost.token_time, dtype=np.float64))
        self._xt = dev(np.ascontiguousarray(cost.transfer_time, dtype=np.float64))
        self._scalars = (float(cost.alpha), float(cost.beta))
        empty = cuda.device_array
        self.scratch = (empty((L, E), np.int64), empty((L, E, G), np.int64),
                         empty((L, G, E), np.int64), empty((L, G, E), np.int64),
                         empty((L, G, G), np.int64), empty((L, G, E), np.uint8),
                         empty((L, E), np.int64), empty((L, E), np.int64))
        self.out = CudaPlan(empty((L, cap_rep, 3), np.int64), empty(L, np.int64),
                            empty((L, cap_blk), np.int64), empty((L, cap_blk, G, G), np.int64),
                            empty(L, np.int64), empty(L, np.int64), empty(L, np.float64),
                            empty(L, np.int64))
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

    def plan(self, load, window, stream=None) -> CudaPlan:
        """Plan L layers on the GPU: load int64 [L, S, E], window float64 [L, G] (seconds),
        device arrays (torch CUDA tensors are taken without a copy). Launches on `stream`, or
        for torch tensors on torch's current stream (so it can be captured in a CUDA graph),
        else on the default stream. Returns the preallocated `CudaPlan` buffers (overwritten by
        the next call; torch tensors for torch inputs) without synchronising. Negative loads
        and negative or NaN windows are reported per layer in `status`, not raised (that would
        need a synchronisation)."""
        L, (G, E) = self.num_layers, self.shape  # noqa: N806 (the shape letters)
        use_torch = _is_torch(load)
        load_d = self._device(load, "load", (L, G, E), np.int64)
        window_d = self._device(window, "window", (L, G), np.float64)
        if stream is None:
            stream = 0
            if use_torch and not SIMULATOR:
                import torch

                stream = cuda.external_stream(torch.cuda.current_stream().cuda_stream)
        rules = self.rules
        _greedy_kernel[L, self.threads, stream](
            load_d, self._home, self._slots, window_d, *self._scalars, self._tt, self._xt,
            self._limit, float(rules.epsilon), bool(rules.move_local), bool(rules.evacuate),
            bool(rules.two_phase), bool(rules.mean_cap), *self.scratch, *self.out)
        if use_torch:
            return self.torch_out()
        return self.out

    def torch_out(self) -> CudaPlan:
        """The output buffers as torch CUDA tensors (views, made once)."""
        if self._torch_out is None:
            import torch

            views = CudaPlan(*(torch.as_tensor(a, device="cuda") for a in self.out))
            for name, a, t in zip(CudaPlan._fields, self.out, views, strict=True):
                # A copy instead of a view would hold the first plan forever: refuse it.
                if t.data_ptr() != a.__cuda_array_interface__["data"][0]:
                    raise RuntimeError(f"torch.as_tensor copied the output buffer {name} "
                                       "instead of viewing it")
            self._torch_out = views
        return self._torch_out


def _c_contiguous(arr) -> bool:
    if isinstance(arr, np.ndarray):
        return arr.flags.c_contiguous
    return arr.is_c_contiguous()


def greedy_cuda_arrays(load, home, slots, window, alpha, beta, token_time, transfer_time,
                       k_max, epsilon, move_local=True, evacuate=False, two_phase=True,
                       mean_cap=False, also_paper=False, *, threads: int = THREADS) -> list:
    """`greedy.greedy_arrays` for L layers at once on the GPU, numpy in and out (copies both
    ways; for tests). load int64 [L, S, E]; home bool [L, G, E]; window float64 [L, G]; the
    other arguments as in greedy_arrays (one cost model and slot budget for every layer).
    Returns one tuple per layer: (replicas, blk_expert, blk_assign, num_moves, objective),
    greedy_arrays' outputs plus the run's largest rank time. also_paper=True raises
    ValueError (rule 8 is not supported)."""
    if also_paper:
        raise ValueError("greedy_cuda does not support also_paper (rule 8); run the CPU kernel")
    load = np.asarray(load)
    if load.ndim != 3:
        raise ValueError(f"load must be a 3-D [L, S, E] array, got shape {load.shape}")
    num_layers = load.shape[0]
    cost = CostModel(float(alpha), float(beta), np.asarray(token_time, dtype=np.float64),
                     np.asarray(transfer_time, dtype=np.float64))
    rules = GreedyRules(k_max=int(k_max), epsilon=float(epsilon), move_local=bool(move_local),
                        evacuate=bool(evacuate), two_phase=bool(two_phase),
                        mean_cap=bool(mean_cap))
    runner = CudaGreedy(home, slots, cost, rules, num_layers=num_layers, threads=threads)
    window = np.asarray(window, dtype=np.float64)
    if window.shape != (num_layers, runner.shape[0]):
        raise ValueError(f"window must be [L, G] = {(num_layers, runner.shape[0])}, got shape "
                         f"{window.shape}")
    if load.shape[1:] != runner.shape:
        raise ValueError(f"load must be [L, S, E] = {(num_layers, *runner.shape)}, got shape "
                         f"{load.shape}")
    out = runner.plan(cuda.to_device(np.ascontiguousarray(load, dtype=np.int64)),
                      cuda.to_device(np.ascontiguousarray(window)))
    host = CudaPlan(*(a.copy_to_host() for a in out))
    for layer, code in enumerate(host.status):
        if code:
            raise ValueError(f"layer {layer}: {STATUS_ERRORS[int(code)]}")
    return [(host.replicas[i, :host.num_replicas[i]], host.blk_expert[i, :host.num_blocks[i]],
             host.blk_assign[i, :host.num_blocks[i]], int(host.num_moves[i]),
             float(host.objective[i]))
            for i in range(num_layers)]
