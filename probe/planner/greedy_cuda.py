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
the thread timing. Only when none of the T gains do they go on to the next T. The winning
thread then applies its move from its own pool (O(G) updates), after the threads together
have written the expert's new dense [S, G] block if it has none yet.

Floating point: every value that decides a choice is float64, computed in the CPU kernel's order
of operations: the scalar rules (the static split, applying the move) are greedy.py's own
functions, compiled a second time as device functions (`numba_cuda.device`,
probe.planner.scalar); `_after`, `_src_after` and `_worst` have twins here that read the same
sums from prefix arrays (`_prefix`: a sum that starts at 0.0 and adds the same terms in the
same order passes through the same floats), and `_eval_x` is `_after` and `_worst` in one
(tests compare the twins with greedy's rules bit for bit). Rule 6's searches (`_water_fill`,
phase 2's bisection, the caps, the evacuation) are one loop of steps in `_candidate`, each
step one `_eval_x`, making the CPU kernel's evaluations in its order. The products that feed
a sum are rounded on their own (libdevice's dmul_rn): the CUDA compiler would otherwise fuse
a * b + c into one FMA, which rounds once and can flip a tie (the only FMAs it makes
multiply by 2.0, which is exact; tests check the sm_90 PTX).

Memory (`CudaGreedy(memory=...)`, "auto" by default): the layer's [G, E] and [G, G] working
arrays (home holders and positions, tokens per rank and expert, replicas held, flows, the
expert-to-block map, the token and transfer times) live in shared memory when they fit
(`shared_bytes(G, E)` <= SHARED_LIMIT = 48 KiB: 40.7 KB at G = 8, E = 128), else in
preallocated global scratch (G = 64, E = 256 would need 531 KB). One kernel is compiled per
(G, E, memory): G and E are compile-time constants, so every shared and per-thread local array
has exactly G or E entries. Always shared: the rank arrays, the slowest rank's experts (20
bytes per expert), a bitmask of each rank's experts with tokens at the start (for the compute
sums) and the move's table of what each source can give of each of those experts
(`_share_table`, SHARE_TABLE entries, 8 KB). Per thread: its candidate's pool and prefix
sums, 7 local arrays of G entries, and the winner's takes, out-times and parts (576 B at
G = 8, 4.5 KB at G = 64; only an unpruned candidate touches them).

Where one layer's time goes (experiments.planner.kernel_stats counts it on the synthetic
decode layers of experiments.planner.gpu_latency, default rules, k_max 16): in every move the
FIRST candidate that passes the cheap pruning (lower bounds, slots, copy source) gains, so a
move is its preamble (the slowest rank, the destinations and experts ranked, the share
table: 6 barriers, 7 for a new block) plus ONE candidate's evaluation on one thread: its pool
and prefix sums (O(G) dependent steps) and 16-19 evaluations of x one after another (each a
binary search over the pool, a dozen loads and flops; the worst time, three of them, walks
the pool up to x's entry). The 127 other threads prune the other candidates meanwhile. One
layer of 16 moves therefore chains some 300 evaluations, 16 pools and ~100 barriers after the
start; at a few hundred cycles per evaluation (loads from L1 and shared memory) that is some
30-60 us at ep=8, while the measured time of the kernel before these changes (results/h200/
gpu_latency: 397 us at ep=8, 2,894 us at ep=64 for one layer) was several times that: code
size (the searches inlined at ~15 call sites: 273 KB of cubin, a straight-line region walked
once per candidate, instruction-cache misses), divergence between lanes at different points
of their searches, and at ep=64 the O(G) loops over global memory (the pool, the start's
sums: 64-256 dependent L2 loads each). The changes aim at those: one evaluation site, the
pool from a shared table, the start's sums side by side and over marked experts only.
What is left, and would take the layer under the 10 us target only with a different
parallelisation: the evaluations of one candidate are one dependent chain; a warp per
candidate could evaluate the next levels of the bisections side by side (reproducing the
CPU kernel's probes exactly: each lane one node of the bisection tree, the walk by ballot),
cutting the ~17 evaluations to ~5 rounds. experiments.planner.gpu_latency measures the start,
the per-move time and the threads and memory variants on the GPU.

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
from numba import float64, int32, int64, uint8, uint32

from probe.planner import greedy
from probe.planner.cost import CostModel
from probe.planner.cuda_common import (
    LayerPlanner,
    array_inputs,
    host_plans,
    is_torch,
)
from probe.planner.greedy import UNLIMITED_MOVES, _rules
from probe.planner.greedy_rules import GreedyRules
from probe.planner.numba_cuda import cuda, device, dmax, dmin, mul

__all__ = ["MAX_EXPERTS", "MAX_RANKS", "SHARED_LIMIT", "THREADS", "CudaGreedy", "CudaPlan",
           "choose_memory", "greedy_cuda_arrays", "kernel", "shared_bytes"]

# Most ranks a layer may have (the per-thread pool and the shared rank arrays are this long).
MAX_RANKS = 64
# Most experts a layer may have (the slowest rank's token counts are staged in shared memory).
MAX_EXPERTS = 1024
# Threads per block (one block per layer) unless the caller picks another multiple of 32.
THREADS = 128
# Most shared memory a block's arrays may take: the static limit of a block (48 KiB).
SHARED_LIMIT = 48 * 1024
# Entries of the per-move table of what each source can give of each of src's experts
# (`_share_table`, 8 KB of shared memory): used when ne experts x G sources fit.
SHARE_TABLE = 1024
# "No candidate gained yet" (larger than any candidate index: MAX_RANKS * experts < 2**40).
_NONE = 1 << 40
# Slots of the block's shared integer and float scalars.
_NE, _WIN, _E, _B, _NEWB, _NBLK, _NREP, _MOVES, _BAD = range(9)


# The CPU kernel's scalar rules as device functions: the same Python functions, compiled again
# (probe.planner.scalar), so the candidates' times are the CPU kernel's floats.
_static_share = device(greedy._static_share, inline=True)
_apply_move = device(greedy._apply_move)


# `_after`, `_src_after` and `_water_fill` of the CPU kernel, on prefix sums. The CPU kernel's
# `_after(x)` walks the pool from entry 0, adding each entry's take times a token time into four
# sums, and stops at the entry where the x tokens run out: O(npool) dependent steps per call,
# some 30 calls per candidate. A sum that starts at 0.0 and adds the same terms in the same order
# passes through the same floats, so `_prefix` records each sum before every entry once per
# candidate, and `_after_p(x)` takes the sums before the last entry touched (found by a binary
# search over the cumulative counts) and adds that entry's partial take: the CPU kernel's floats,
# bit for bit, in O(log npool) per call.
@cuda.jit(device=True)
def _prefix(src, dst, npool, pool_s, pool_n, tt, cum, p_in_src, p_in_dst, p_out_dst, p_out_src):
    """cum[i]: the pool's tokens before entry i; p_*[i]: `_after`'s four sums (d_in_src,
    d_in_dst, d_out_dst, d_out_src) over the entries before i, taken whole, in pool order.

    The loop has no branch (its loads do not wait for the entry before, so the compiler can
    overlap the entries' loads): where `_after` skips a sum, 0.0 is added instead, which
    leaves it unchanged (a sum that starts at +0.0 is never -0.0: its terms are >= 0, but
    d_out_src's, whose one term comes from src, the pool's last entry)."""
    c = 0
    in_src = 0.0
    in_dst = 0.0
    out_dst = 0.0
    out_src = 0.0
    tt_ds = tt[dst, src]
    tt_src = tt[src, dst] - tt[src, src]
    for i in range(npool):
        cum[i] = c
        p_in_src[i] = in_src
        p_in_dst[i] = in_dst
        p_out_dst[i] = out_dst
        p_out_src[i] = out_src
        s = pool_s[i]
        take = pool_n[i]
        c += take
        in_src += mul(take, tt[s, src])
        to_dst = mul(take, tt[s, dst])
        out_dst += mul(take, tt_ds) if s == dst else 0.0
        in_dst += 0.0 if s == dst else to_dst
        out_src += mul(take, tt_src) if s == src else 0.0


@cuda.jit(device=True)
def _entry(x, npool, cum):
    """The pool entry where x >= 1 tokens run out: the last i with cum[i] < x."""
    lo = 0
    hi = npool - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cum[mid] < x:
            lo = mid
        else:
            hi = mid - 1
    return lo


@cuda.jit(device=True)
def _after_p(x, e, src, dst, pool_s, npool, cum, p_in_src, p_in_dst, p_out_dst, p_out_src, tok,
             comp, t_in, t_out, alpha, beta, tt, parts):
    """greedy._after(x, ...) from `_prefix`'s sums: the same floats; fills parts[6]."""
    comp_src = comp[src] - mul(beta, x)
    if tok[src, e] == x:
        comp_src -= alpha
    comp_dst = comp[dst] + mul(beta, x)
    if tok[dst, e] == 0:
        comp_dst += alpha
    k = _entry(x, npool, cum)
    s = pool_s[k]
    take = x - cum[k]
    d_in_src = p_in_src[k] + mul(take, tt[s, src])
    d_in_dst = p_in_dst[k]
    d_out_dst = p_out_dst[k]
    d_out_src = p_out_src[k]
    if s == dst:
        d_out_dst += mul(take, tt[dst, src])
    else:
        d_in_dst += mul(take, tt[s, dst])
        if s == src:
            d_out_src += mul(take, tt[src, dst] - tt[src, src])
    t_src = comp_src + 2.0 * dmax(t_in[src] - d_in_src, t_out[src] + d_out_src)
    t_dst = comp_dst + 2.0 * dmax(t_in[dst] + d_in_dst, t_out[dst] - d_out_dst)
    parts[0] = comp_src
    parts[1] = comp_dst
    parts[2] = d_in_src
    parts[3] = d_in_dst
    parts[4] = d_out_dst
    parts[5] = d_out_src
    return t_src, t_dst


@cuda.jit(device=True)
def _worst_p(x, t_src, t_dst, src, dst, npool, pool_s, pool_n, cum, comp, t_in, t_out, tt, takes,
             new_out):
    """greedy._worst(x, ...): the same takes[:npool], new_out entries and float, its max over
    the third-party sources run only up to the entry where x runs out (those after take 0).
    (The winner's move only: a candidate's search takes the float alone from `_eval_x`.)"""
    k = _entry(x, npool, cum)
    for i in range(npool):
        takes[i] = pool_n[i] if i < k else (x - cum[k] if i == k else 0)
    worst = dmax(t_src, t_dst)
    for i in range(k + 1):
        s = pool_s[i]
        if s != dst and s != src and takes[i] > 0:
            new_out[i] = t_out[s] + mul(takes[i], tt[s, dst] - tt[s, src])
            worst = dmax(worst, comp[s] + 2.0 * dmax(t_in[s], new_out[i]))
    return worst


@cuda.jit(device=True)
def _eval_x(x, with_worst, src, dst, pool_s, pool_n, npool, cum, p_in_src, p_in_dst, p_out_dst,
            p_out_src, tok_src, tok_dst, comp_src, comp_dst, in_src, out_src, in_dst, out_dst,
            tt_ds, tt_src, comp, t_in, t_out, alpha, beta, tt):
    """One evaluation of a candidate's search: (t_src, t_dst, worst) if x >= 1 tokens move.
    t_src and t_dst are greedy._after's two times (and t_src is greedy._src_after's), worst
    is greedy._worst's float when with_worst (else max(t_src, t_dst)): the same operations in
    the same order as `_after_p` and `_worst_p`, with one search for x's pool entry and
    nothing stored (the winner's move recomputes its parts, takes and out-times). What every
    evaluation of the candidate reads comes in once, as scalars: tok_src = tok[src, e],
    tok_dst = tok[dst, e], comp_src = comp[src], comp_dst = comp[dst], in_src = t_in[src],
    out_src = t_out[src], in_dst = t_in[dst], out_dst = t_out[dst], tt_ds = tt[dst, src],
    tt_src = tt[src, dst] - tt[src, src] (the difference `_after` takes)."""
    c_src = comp_src - mul(beta, x)
    if tok_src == x:
        c_src -= alpha
    c_dst = comp_dst + mul(beta, x)
    if tok_dst == 0:
        c_dst += alpha
    k = _entry(x, npool, cum)
    s = pool_s[k]
    take = x - cum[k]
    d_in_src = p_in_src[k] + mul(take, tt[s, src])
    d_in_dst = p_in_dst[k]
    d_out_dst = p_out_dst[k]
    d_out_src = p_out_src[k]
    if s == dst:
        d_out_dst += mul(take, tt_ds)
    else:
        d_in_dst += mul(take, tt[s, dst])
        if s == src:
            d_out_src += mul(take, tt_src)
    t_src = c_src + 2.0 * dmax(in_src - d_in_src, out_src + d_out_src)
    t_dst = c_dst + 2.0 * dmax(in_dst + d_in_dst, out_dst - d_out_dst)
    worst = dmax(t_src, t_dst)
    if with_worst:  # (no branch in the loop: each entry's time is computed, then kept or not)
        for i in range(k + 1):
            s = pool_s[i]
            a = pool_n[i] if i < k else take
            out = t_out[s] + mul(a, tt[s, dst] - tt[s, src])
            t = comp[s] + 2.0 * dmax(t_in[s], out)
            worst = dmax(worst, t) if s != dst and s != src and a > 0 else worst
    return t_src, t_dst, worst


@cuda.jit(device=True, inline=True)
def _share_to_src(load, home, h_e, pos_src, s, e, src):
    """greedy._static_share(load, home, hpos, hcount, s, e, src) with hcount[e] = h_e and
    hpos[src, e] = pos_src read once per candidate, not once per source (integers: exact)."""
    n = load[s, e]
    if home[s, e]:
        return n if src == s else 0
    if h_e == 1:
        return n if pos_src == 0 else 0
    if pos_src < 0:
        return 0
    q = n // h_e
    r = n - q * h_e
    return q + (1 if (pos_src + s) % h_e < r else 0)


# The steps of a candidate's search (`_candidate`): rule 6's searches as greedy._greedy_run
# makes them, one evaluation of x (`_eval_x`) per step. Steps below _S_WORST evaluate the two
# times, those from _S_WORST to _S_EVAL also the worst time; the others only decide the next.
_S_ALL, _S_EQ, _S_ADJ_A, _S_ADJ_B, _S_MEAN, _S_TWO_A, _S_TWO_B, _S_X2, _S_CAP = range(9)
_S_WORST = 9
_S_ONE, _S_W2, _S_FIN, _S_EV = range(9, 13)
_S_EVAL = 13
_S_EQ_DONE, _S_ADJ_DONE, _S_MEAN_DONE, _S_ONE_DONE, _S_DONE = range(13, 18)


@cuda.jit(device=True)
def _share_table(tid, nt, ne, src, src_e, load, home, hpos, hcount, held, blk_of, blk_assign,
                 shares):
    """shares[i * G + s]: the tokens of (s, src_e[i]) that the pool of a candidate moving
    expert src_e[i] off src can take from source s: its assignment to src (the expert's
    block, else the static split), 0 where s != src holds a copy of the expert (the CPU
    kernel's pool leaves those sources out). The threads of the block fill it side by side
    once per move; every candidate's pool then reads it instead of G blocks or splits."""
    num_ranks = hpos.shape[0]
    for i in range(tid, ne * num_ranks, nt):
        s = i % num_ranks
        e = src_e[i // num_ranks]
        b = blk_of[e]
        a = blk_assign[b, s, src] if b >= 0 else _static_share(load, home, hpos, hcount, s, e,
                                                               src)
        if s != src and held[s, e] != 0:
            a = 0
        shares[i] = a


@cuda.jit(device=True)
def _candidate(e, src, dst, load, home, slots, window, alpha, beta, tt, xt, epsilon, move_local,
               evacuate, two_phase, mean_cap, mean, hcount, hlist, hpos, tok, held, blk_of,
               blk_assign, times, comp, t_in, t_out, recv, send, used, pool_s, pool_n, cum,
               p_in_src, p_in_dst, p_out_dst, p_out_src, shares, row):
    """One candidate of greedy._greedy_run's search (the body of its expert loop, the dst
    pruning included): moving tokens of e from src to dst. Returns (gains, x, t_src, t_dst,
    holder, npool); pool_s and pool_n hold its pool, cum and p_* `_prefix`'s sums (G entries
    each). shares[row + s] (row >= 0) is what source s can give of e (`_share_table`), else
    (row < 0) the pool reads the block or the static split itself.

    Rule 6's searches (the water fill's bisections, phase 2's, the evacuation) run as one loop
    of steps with a single evaluation of x per step (`_eval_x`), the CPU kernel's evaluations in
    its order: the same x and the same floats, and one copy of the evaluation in the code (not
    one per call site of the CPU kernel's), which lanes of a warp at different points of their
    searches run together."""
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
    h_e = hcount[e]
    pos_src = hpos[src, e]
    if row >= 0:  # from the table, without a branch: each source is written at npool,
        for s in range(num_ranks):  # which moves on only when the source joins the pool
            a = shares[row + s]  # (0 where s holds e)
            pool_s[npool] = s
            pool_n[npool] = a
            joins = a > 0 and s != src and s != dst
            npool += 1 if joins else 0
            total += a if joins else 0
    else:
        for s in range(num_ranks):
            if s == src or s == dst:  # noqa: SIM109 (a plain comparison compiles for CUDA)
                continue
            a = blk_assign[b, s, src] if b >= 0 else _share_to_src(load, home, h_e, pos_src, s,
                                                                   e, src)
            if a > 0 and held[s, e] == 0:
                pool_s[npool] = s
                pool_n[npool] = a
                npool += 1
                total += a
    if move_local:
        if row >= 0:
            a = shares[row + src]
        else:
            a = (blk_assign[b, src, src] if b >= 0
                 else _static_share(load, home, hpos, hcount, src, e, src))
        if a > 0:
            pool_s[npool] = src
            pool_n[npool] = a
            npool += 1
            total += a
    if total == 0:
        return no
    _prefix(src, dst, npool, pool_s, pool_n, tt, cum, p_in_src, p_in_dst, p_out_dst, p_out_src)
    cap = mean if mean_cap else -math.inf
    own_src = 0
    if move_local and pool_s[npool - 1] == src:
        own_src = pool_n[npool - 1]
    # greedy._greedy_run's two branches: two_phase with own tokens (phase 1 over the other
    # sources' tokens, then phase 2 over src's own), else one water fill over the whole pool.
    phase_one = two_phase and own_src > 0
    n_other = total - own_src if phase_one else total
    second = phase_one
    worst = 0.0  # phase 1's worst time (0.0 when phase 1 is empty, as on the CPU)
    x = 0  # the amount chosen so far
    x_eq = 0  # the water fill's equal-times amount ...
    x_mean = 0  # ... and its mean-cap amount
    all_src = 0.0  # T_src if all n_other tokens move
    a_max = 0.0  # max(T_src, T_dst) at the step before (x_eq - 1; phase 2's mid)
    lo = 0
    hi = 0
    mid = 0
    x2 = 0  # phase 2's amount
    t_fin = 0.0  # the chosen move's T_src ...
    d_fin = 0.0  # ... and T_dst
    t_src = 0.0
    t_dst = 0.0
    w = 0.0
    tok_src = tok[src, e]  # what every evaluation reads, read once
    tok_dst = tok[dst, e]
    comp_src = comp[src]
    comp_dst = comp[dst]
    in_src = t_in[src]
    out_src = t_out[src]
    in_dst = t_in[dst]
    out_dst = t_out[dst]
    tt_ds = tt[dst, src]
    tt_src = tt[src, dst] - tt[src, src]
    if n_other > 0:
        step = _S_ALL  # the water fill over the first n_other pool tokens
        xe = n_other
    else:  # phase 1 is empty: phase 2 alone (second is True here)
        step = _S_ONE_DONE
        xe = 0
    while step != _S_DONE:
        if step < _S_EVAL:  # the search's one evaluation of x
            t_src, t_dst, w = _eval_x(xe, step >= _S_WORST, src, dst, pool_s, pool_n, npool,
                                      cum, p_in_src, p_in_dst, p_out_dst, p_out_src, tok_src,
                                      tok_dst, comp_src, comp_dst, in_src, out_src, in_dst,
                                      out_dst, tt_ds, tt_src, comp, t_in, t_out, alpha, beta,
                                      tt)
        if step == _S_ALL:  # greedy._water_fill: all n_other tokens, then bisect x_eq
            all_src = t_src
            x_eq = n_other
            lo = 1
            step = _S_EQ_DONE
            if t_src <= t_dst and lo < x_eq:
                step = _S_EQ
                xe = (lo + x_eq) // 2
        elif step == _S_EQ:
            if t_src <= t_dst:
                x_eq = xe
            else:
                lo = xe + 1
            step = _S_EQ_DONE
            if lo < x_eq:
                step = _S_EQ
                xe = (lo + x_eq) // 2
        elif step == _S_EQ_DONE:  # one token less when that is no worse
            step = _S_ADJ_DONE
            if x_eq > 1:
                step = _S_ADJ_A
                xe = x_eq - 1
        elif step == _S_ADJ_A:
            a_max = dmax(t_src, t_dst)
            step = _S_ADJ_B
            xe = x_eq
        elif step == _S_ADJ_B:
            if a_max <= dmax(t_src, t_dst):
                x_eq -= 1
            step = _S_ADJ_DONE
        elif step == _S_ADJ_DONE:  # x_mean: bisect T_src against the cap
            x_mean = n_other
            step = _S_MEAN_DONE
            if all_src <= cap:
                lo = 1
                if lo < x_mean:
                    step = _S_MEAN
                    xe = (lo + x_mean) // 2
        elif step == _S_MEAN:
            if t_src <= cap:
                x_mean = xe
            else:
                lo = xe + 1
            step = _S_MEAN_DONE
            if lo < x_mean:
                step = _S_MEAN
                xe = (lo + x_mean) // 2
        elif step == _S_MEAN_DONE:  # the water fill's x; phase 1's times and worst time
            x = dmin(x_eq, x_mean)
            step = _S_ONE_DONE
            if phase_one:
                step = _S_ONE
                xe = x
        elif step == _S_ONE:
            worst = w
            if x < n_other or t_src <= t_dst or t_src <= cap:
                second = False
            step = _S_ONE_DONE
        elif step == _S_ONE_DONE:  # phase 2 (max(T_src, T_dst) is convex), or the end
            step = _S_FIN
            xe = x
            if second:
                lo = n_other + 1
                hi = total - 1 if total == tok_src and total > lo else total
                step = _S_X2
                xe = lo
                if lo < hi:
                    mid = (lo + hi) // 2
                    step = _S_TWO_A
                    xe = mid
        elif step == _S_TWO_A:
            a_max = dmax(t_src, t_dst)
            step = _S_TWO_B
            xe = mid + 1
        elif step == _S_TWO_B:
            if dmax(t_src, t_dst) >= a_max:
                hi = mid
            else:
                lo = mid + 1
            step = _S_X2
            xe = lo
            if lo < hi:
                mid = (lo + hi) // 2
                step = _S_TWO_A
                xe = mid
        elif step == _S_X2:  # x2 = lo; under the cap, bisect T_src against it
            x2 = xe
            step = _S_W2
            if t_src <= cap:
                lo = n_other + 1
                hi = x2
                if lo < hi:
                    step = _S_CAP
                    xe = (lo + hi) // 2
                else:
                    xe = lo
                    x2 = lo
        elif step == _S_CAP:
            if t_src <= cap:
                hi = xe
            else:
                lo = xe + 1
            step = _S_W2
            x2 = lo
            xe = lo
            if lo < hi:
                step = _S_CAP
                xe = (lo + hi) // 2
        elif step == _S_W2:  # phase 2's move replaces phase 1's when strictly better
            if n_other == 0 or w < worst:
                x = x2
            step = _S_FIN
            xe = x
        elif step == _S_FIN:  # the move's times and worst time; rule 6's evacuation
            t_fin = t_src
            d_fin = t_dst
            worst = w
            step = _S_DONE
            if evacuate and x < total and total == tok_src:
                step = _S_EV
                xe = total
        elif step == _S_EV:
            if w < worst:
                x = total
                t_fin = t_src
                d_fin = t_dst
                worst = w
            step = _S_DONE
    if times[src] - worst > epsilon:
        return True, x, t_fin, d_fin, holder, npool
    return no


def shared_bytes(num_ranks: int, num_experts: int) -> int:
    """Bytes of shared memory a block takes for G ranks and E experts when its [G, E] and
    [G, G] working arrays live there (`memory="shared"`)."""
    G, E = num_ranks, num_experts  # noqa: N806 (the shape letters)
    return _fixed_bytes(G, E) + 8 * (2 * E + 3 * G * E + 3 * G * G) + G * E


def choose_memory(num_ranks: int, num_experts: int, memory: str = "auto") -> str:
    """Where a block keeps its working arrays for G ranks and E experts: "shared" or
    "global". memory: "auto" (shared when `shared_bytes` is at most SHARED_LIMIT), "shared"
    (ValueError when it does not fit) or "global"."""
    if memory not in ("auto", "shared", "global"):
        raise ValueError(f"memory must be 'auto', 'shared' or 'global', got {memory!r}")
    need = shared_bytes(num_ranks, num_experts)
    if memory == "shared" and need > SHARED_LIMIT:
        raise ValueError(f"memory='shared' needs {need} bytes of shared memory per block for "
                         f"{num_ranks} ranks and {num_experts} experts, more than "
                         f"SHARED_LIMIT = {SHARED_LIMIT}; use 'global' or 'auto'")
    if memory == "auto":
        return "shared" if need <= SHARED_LIMIT else "global"
    return memory


def _fixed_bytes(num_ranks: int, num_experts: int) -> int:
    """Shared bytes a block always takes: rank arrays, the expert lists, block scalars, the
    ranks' expert bitmasks."""
    G, E = num_ranks, num_experts  # noqa: N806
    return (8 * 7 * G + 8 * G + E * (4 + 8 + 4 + 4) + 8 * 16 + 4 * G * ((E + 31) // 32)
            + 8 * min(SHARE_TABLE, G * E))


def _kernel_source(num_ranks: int, num_experts: int, in_shared: bool):
    """The kernel's Python function for G ranks and E experts (compile-time constants: array
    sizes), its [G, E] and [G, G] working arrays in shared memory (in_shared) or in the global
    scratch arguments."""
    G, E = num_ranks, num_experts  # noqa: N806 (the shape letters)
    GS, ES = (G, E) if in_shared else (1, 1)  # noqa: N806 (the shared working arrays' shape)
    EW = (E + 31) // 32  # noqa: N806 (32-bit words of an expert bitmask)
    SC = min(SHARE_TABLE, G * E)  # noqa: N806 (entries of the shares table)

    def _greedy_kernel(load, home, slots, window, alpha, beta, tt, xt, limit, epsilon,
                       move_local, evacuate, two_phase, mean_cap, hcount, hlist, hpos, tok,
                       flow, held, blk_of, rep, n_rep_out, blk_expert, blk_assign, n_blk_out,
                       moves_out, objective_out, status_out):
        """Block l plans layer l (greedy._greedy_run's rules 1-7). Inputs: load int64
        [L, S, E], home bool [L, G, E], slots int64 [G], window float64 [L, G], tt/xt float64
        [G, G] (token_time, transfer_time), limit int64 (> 0 moves), epsilon float64, four
        flags. Global scratch (any values; unread when the working arrays are shared):
        hcount [L, E], hlist [L, E, G], hpos [L, G, E], tok [L, G, E], flow [L, G, G], held
        uint8 [L, G, E], blk_of [L, E], int64 but held. Outputs (any values before; every
        entry is written): see CudaPlan."""
        layer = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        nt = cuda.blockDim.x
        ld = load[layer]
        hm = home[layer]
        win = window[layer]
        rp = rep[layer]
        be = blk_expert[layer]
        ba = blk_assign[layer]

        # The layer's working arrays: shared (sized GS x ES) or the global scratch rows.
        sh_hc = cuda.shared.array(ES, int64)
        sh_hl = cuda.shared.array((ES, GS), int64)
        sh_hp = cuda.shared.array((GS, ES), int64)
        sh_tk = cuda.shared.array((GS, ES), int64)
        sh_fl = cuda.shared.array((GS, GS), int64)
        sh_hd = cuda.shared.array((GS, ES), uint8)
        sh_bo = cuda.shared.array(ES, int64)
        sh_tt = cuda.shared.array((GS, GS), float64)
        sh_xt = cuda.shared.array((GS, GS), float64)
        if in_shared:
            hc = sh_hc
            hl = sh_hl
            hp = sh_hp
            tk = sh_tk
            fl = sh_fl
            hd = sh_hd
            bo = sh_bo
            tts = sh_tt
            xts = sh_xt
        else:
            hc = hcount[layer]
            hl = hlist[layer]
            hp = hpos[layer]
            tk = tok[layer]
            fl = flow[layer]
            hd = held[layer]
            bo = blk_of[layer]
            tts = tt
            xts = xt

        times = cuda.shared.array(G, float64)
        comp = cuda.shared.array(G, float64)
        t_in = cuda.shared.array(G, float64)
        t_out = cuda.shared.array(G, float64)
        recv = cuda.shared.array(G, float64)
        send = cuda.shared.array(G, float64)
        used = cuda.shared.array(G, int64)
        rank_order = cuda.shared.array(G, int32)  # the ranks by time, fastest first ...
        faster = cuda.shared.array(G, int32)  # ... and how many ranks are faster than each
        src_e = cuda.shared.array(E, int32)  # src's experts with tokens, in any order ...
        src_n = cuda.shared.array(E, int64)  # ... and their token counts on src
        exp_order = cuda.shared.array(E, int32)  # the same experts, heaviest first ...
        exp_at = cuda.shared.array(E, int32)  # ... and their places in src_e
        shares = cuda.shared.array(SC, int64)  # `_share_table`: [ne, G] where it fits
        ints = cuda.shared.array(16, int64)
        busy = cuda.shared.array((G, EW), uint32)  # per rank: experts with tokens, as bits

        pool_s = cuda.local.array(G, int64)
        pool_n = cuda.local.array(G, int64)
        cum = cuda.local.array(G, int64)
        p_in_src = cuda.local.array(G, float64)
        p_in_dst = cuda.local.array(G, float64)
        p_out_dst = cuda.local.array(G, float64)
        p_out_src = cuda.local.array(G, float64)
        takes = cuda.local.array(G, int64)  # the winner's move: its takes, out-times, parts
        new_out = cuda.local.array(G, float64)
        parts = cuda.local.array(6, float64)

        # The start: home holders (hl[e, :hc[e]] in rank order, hp[g, e] = g's position there
        # or -1), replicas held (none yet), zero flows; bad values flag the layer.
        if tid == 0:
            ints[_NBLK] = 0
            ints[_NREP] = 0
            ints[_MOVES] = 0
            ints[_BAD] = 0
            ints[_NE] = 0
            ints[_WIN] = _NONE
        for g in range(tid, G, nt):
            used[g] = 0
            recv[g] = 0.0
            send[g] = 0.0
        if in_shared:
            for i in range(tid, G * G, nt):
                tts[i // G, i % G] = tt[i // G, i % G]
                xts[i // G, i % G] = xt[i // G, i % G]
        cuda.syncthreads()
        for g in range(tid, G, nt):
            if not win[g] >= 0.0:
                cuda.atomic.max(ints, _BAD, 2)
        for e in range(tid, E, nt):
            c = 0
            for g in range(G):
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
        for i in range(tid, G * G, nt):
            fl[i // G, i % G] = 0
        for i in range(tid, G * EW, nt):
            busy[i // EW, i % EW] = 0
        cuda.syncthreads()
        bad = ints[_BAD]
        # Static split (one thread per expert; flows summed with integer atomics: exact).
        for e in range(tid, E, nt):
            for s in range(G):
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
            # Only home holders got tokens: mark those that did (bit e % 32 of word e // 32).
            for k in range(hc[e]):
                g = hl[e, k]
                if tk[g, e] > 0:
                    cuda.atomic.or_(busy, (g, e // 32), uint32(1 << (e % 32)))
        cuda.syncthreads()
        # Rank times, in the CPU kernel's summation orders (experts ascending, sources
        # ascending): compute, in and out of every rank summed by 3G threads side by side,
        # compute over the marked experts alone (the terms the CPU kernel adds, in its order).
        for i in range(tid, 3 * G, nt):
            g = i % G
            if i < G:
                c = 0.0
                for w in range(EW):
                    bits = int64(busy[g, w])
                    while bits != 0:
                        low = bits & ~(bits - 1)  # the lowest expert left in the word
                        bits -= low
                        e = w * 32 + cuda.popc(low - 1)
                        c += alpha + mul(beta, tk[g, e])
                comp[g] = c
            elif i < 2 * G:
                a_in = 0.0
                for s in range(G):
                    a_in += mul(fl[s, g], tts[s, g])
                t_in[g] = a_in
            else:
                a_out = 0.0
                for h in range(G):
                    a_out += mul(fl[g, h], tts[g, h])
                t_out[g] = a_out
        cuda.syncthreads()
        for g in range(tid, G, nt):
            times[g] = comp[g] + 2.0 * dmax(t_in[g], t_out[g])
        cuda.syncthreads()

        # One move per pass, 6 barriers (7 when the expert gets its first block) plus one per
        # further round of candidates. ints[_NE] == 0 and ints[_WIN] == _NONE on entry.
        while bad == 0:
            if ints[_MOVES] >= limit:
                break
            # The ranks fastest first, ties to the lowest rank (thread g places g), and how
            # many are faster than each.
            for g in range(tid, G, nt):
                t = times[g]
                r = 0
                c = 0
                for h in range(G):
                    if times[h] < t:
                        c += 1
                    elif times[h] == t and h < g:
                        r += 1
                rank_order[c + r] = g
                faster[g] = c
            cuda.syncthreads()
            # The slowest rank is the lowest of the last tie group (the CPU kernel's first
            # largest time), and the destinations are the nd ranks before that group (faster
            # than src), in order: the CPU kernel's destination order. (Both orders agree
            # for times that are not NaN: CostModel's costs are finite, and a NaN time would
            # need a product of a cost and a token count past 1.8e308.)
            nd = faster[rank_order[G - 1]]
            src = rank_order[nd]
            mean = 0.0  # (read by rule 6's cap only: summed only when mean_cap is on)
            if mean_cap:  # (every thread, the CPU kernel's order: the same float)
                total_time = 0.0
                for g in range(G):
                    total_time += times[g]
                mean = total_time / G
            # src's experts with tokens collected (any order) ...
            for e in range(tid, E, nt):
                n = tk[src, e]
                if n > 0:
                    i = cuda.atomic.add(ints, _NE, 1)
                    src_e[i] = e
                    src_n[i] = n
            cuda.syncthreads()
            # ... then ranked heaviest first (ties to the lowest id), each among the ne listed.
            ne = ints[_NE]
            for i in range(tid, ne, nt):
                n = src_n[i]
                e = src_e[i]
                r = 0
                for j in range(ne):
                    m = src_n[j]
                    if m > n or (m == n and src_e[j] < e):
                        r += 1
                exp_order[r] = e
                exp_at[r] = i
            # What each source can give of each listed expert, for every candidate's pool.
            table = ne * G <= SC
            if table:
                _share_table(tid, nt, ne, src, src_e, ld, hm, hp, hc, hd, bo, ba, shares)
            cuda.syncthreads()
            num_cand = nd * ne
            first = _NONE
            base = 0
            k = -1
            ok = False
            dst = 0
            e = 0
            x = 0
            c_src = 0.0
            c_dst = 0.0
            holder = -1
            npool = 0
            while base < num_cand:
                k = base + tid
                ok = False
                if k < num_cand:
                    dst = rank_order[k // ne]
                    e = exp_order[k % ne]
                    row = exp_at[k % ne] * G if table else -1
                    ok, x, c_src, c_dst, holder, npool = _candidate(
                        e, src, dst, ld, hm, slots, win, alpha, beta, tts, xts, epsilon,
                        move_local, evacuate, two_phase, mean_cap, mean, hc, hl, hp, tk, hd, bo,
                        ba, times, comp, t_in, t_out, recv, send, used, pool_s, pool_n, cum,
                        p_in_src, p_in_dst, p_out_dst, p_out_src, shares, row)
                    if ok:
                        cuda.atomic.min(ints, _WIN, k)
                cuda.syncthreads()
                first = ints[_WIN]
                if first < _NONE:
                    if k == first:  # the first gaining candidate's thread: the replica and
                        ints[_E] = e  # the expert's block (nobody reads them until the barrier)
                        if holder >= 0:
                            hd[dst, e] = 1
                            used[dst] += 1
                            n_rep = ints[_NREP]
                            rp[n_rep, 0] = dst
                            rp[n_rep, 1] = e
                            rp[n_rep, 2] = holder
                            ints[_NREP] = n_rep + 1
                            recv[dst] += xts[holder, dst]
                            send[holder] += xts[holder, dst]
                        b = bo[e]
                        ints[_NEWB] = 0
                        if b < 0:
                            b = ints[_NBLK]
                            ints[_NBLK] = b + 1
                            bo[e] = b
                            be[b] = e
                            ints[_NEWB] = 1
                        ints[_B] = b
                    break
                base += nt
            if first == _NONE:
                break
            cuda.syncthreads()
            b = ints[_B]
            if ints[_NEWB] == 1:  # a new block starts from the static split (all threads)
                e_new = ints[_E]
                for s in range(tid, G, nt):  # row s: zeros, then s's tokens on e's holders
                    for g in range(G):  # (greedy._static_share's values, row by row)
                        ba[b, s, g] = 0
                    n = ld[s, e_new]
                    if hm[s, e_new]:
                        ba[b, s, s] = n
                    else:
                        h = hc[e_new]
                        q = n // h
                        r = n - q * h
                        for j in range(h):  # the holder at position j
                            ba[b, s, hl[e_new, j]] = q + (1 if (j + s) % h < r else 0)
                cuda.syncthreads()
            if k == first:  # the winner applies its move (the CPU kernel's order) from its
                # own pool: parts, takes and out-times of x recomputed (the same floats), over
                # the entries up to the one where x runs out (those after take 0 tokens: the
                # CPU kernel's updates of them change nothing)
                n_take = _entry(x, npool, cum) + 1
                _after_p(x, e, src, dst, pool_s, n_take, cum, p_in_src, p_in_dst, p_out_dst,
                         p_out_src, tk, comp, t_in, t_out, alpha, beta, tts, parts)
                _worst_p(x, c_src, c_dst, src, dst, n_take, pool_s, pool_n, cum, comp, t_in,
                         t_out, tts, takes, new_out)
                _apply_move(b, e, src, dst, x, n_take, pool_s, takes, new_out, parts, c_src,
                            c_dst, ba, tk, comp, t_in, t_out, times)
                ints[_MOVES] += 1
                ints[_NE] = 0
                ints[_WIN] = _NONE
            cuda.syncthreads()

        # The entries past the plan (replicas rows from n_rep, blocks from n_blk) get fixed
        # values, -1 and a zero assignment, so that every output entry is a function of this
        # launch's inputs alone: a reused runner or a replayed CUDA graph shows nothing of an
        # earlier call. (Every thread left the loop after a barrier that followed the last
        # change to _NREP and _NBLK.)
        n_rep = ints[_NREP]
        n_blk = ints[_NBLK]
        for i in range(n_rep * 3 + tid, rp.shape[0] * 3, nt):
            rp[i // 3, i % 3] = -1
        for i in range(n_blk + tid, be.shape[0], nt):
            be[i] = -1
        per_blk = G * G
        for i in range(n_blk * per_blk + tid, ba.shape[0] * per_blk, nt):
            r = i % per_blk
            ba[i // per_blk, r // G, r % G] = 0
        if tid == 0:
            makespan = 0.0
            for g in range(G):
                makespan = dmax(makespan, times[g])
            n_rep_out[layer] = ints[_NREP]
            n_blk_out[layer] = ints[_NBLK]
            moves_out[layer] = ints[_MOVES]
            objective_out[layer] = makespan if bad == 0 else math.nan
            status_out[layer] = bad

    return _greedy_kernel


_KERNELS: dict = {}


def kernel(num_ranks: int, num_experts: int, in_shared: bool):
    """The compiled kernel for G ranks and E experts (one per shape and memory, made on the
    first request; numba compiles it at its first launch)."""
    key = (int(num_ranks), int(num_experts), bool(in_shared))
    if key not in _KERNELS:
        _KERNELS[key] = cuda.jit(_kernel_source(*key))
    return _KERNELS[key]


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


def _check_rules(rules: GreedyRules | None) -> GreedyRules:
    rules = _rules(rules)
    if rules.also_paper:
        raise ValueError("greedy_cuda does not support GreedyRules.also_paper (rule 8); run "
                         "the CPU kernel for it")
    return rules


class CudaGreedy(LayerPlanner):
    """The greedy on the GPU for one placement, slot budget, cost model and layer count.

    home: bool [G, E] (every layer) or [L, G, E] static placement; slots: int or int [G];
    cost: CostModel for G ranks; rules: GreedyRules (None: the defaults; also_paper is not
    supported); num_layers: L, the layers one `plan` call plans; threads: threads per block (a
    multiple of 32, at most 1024; 1 for tests; the sm_90 kernel takes 150-175 registers per
    thread, so the GPU may refuse launches of more than 352); memory: where a block keeps its
    layer's [G, E] and [G, G] working arrays, "shared" (shared memory: `shared_bytes(G, E)`
    must be at most SHARED_LIMIT), "global" (preallocated global scratch) or "auto" (shared
    when it fits; the same plans either way); max_moves: most moves per layer instead of the
    rules' k_max (0: the start alone, no move: what a benchmark takes to time the start
    phase). Validates all of it once; `plan` only checks its arrays' shape, dtype and layout
    (host side, no synchronisation) and launches one kernel.
    Attributes: `out`, the CudaPlan buffers (numba device arrays) every launch overwrites whole;
    `memory`, "shared" or "global" as chosen; `scratch`, the kernel's global working buffers
    (hcount, hlist, hpos, tok, flow, held, blk_of as `_kernel_source` names them; one entry per
    axis when memory is "shared": unused), which each launch initialises itself, so their
    contents between calls are irrelevant.
    """

    def __init__(self, home: np.ndarray, slots: np.ndarray | int, cost: CostModel,
                 rules: GreedyRules | None = None, *, num_layers: int,
                 threads: int = THREADS, memory: str = "auto",
                 max_moves: int | None = None) -> None:
        self.rules = _check_rules(rules)
        if max_moves is not None and (isinstance(max_moves, (bool, np.bool_)) or not isinstance(
                max_moves, (int, np.integer)) or max_moves < 0):
            raise ValueError(f"max_moves must be None or an int >= 0, got {max_moves!r}")
        if memory not in ("auto", "shared", "global"):  # (checked again with the shape)
            raise ValueError(f"memory must be 'auto', 'shared' or 'global', got {memory!r}")
        self.memory = memory  # resolved by _fit_shape, before anything goes to the device
        super().__init__(home, slots, cost, num_layers=num_layers, threads=threads,
                         max_ranks=MAX_RANKS, max_experts=MAX_EXPERTS, name="greedy_cuda")
        num_ranks, num_experts = self.shape
        self.kernel = kernel(num_ranks, num_experts, self.memory == "shared")
        limit = self.rules.max_moves(num_ranks, num_experts)
        limit = limit if limit > 0 else UNLIMITED_MOVES
        if max_moves is not None:  # 0: the start alone (timing the start phase)
            limit = int(max_moves)
        self._limit = int(limit)
        total_slots = int(np.minimum(self.slots, num_experts).sum())
        cap_rep = max(min(total_slots, limit), 1)
        cap_blk = max(min(limit, num_experts), 1)
        L, G, E = num_layers, num_ranks, num_experts  # noqa: N806 (the shape letters)
        self._scalars = (float(cost.alpha), float(cost.beta))
        empty = cuda.device_array
        if self.memory == "shared":  # unread placeholders of the right dimensions
            L, G, E = 1, 1, 1  # noqa: N806
        self.scratch = (empty((L, E), np.int64), empty((L, E, G), np.int64),
                         empty((L, G, E), np.int64), empty((L, G, E), np.int64),
                         empty((L, G, G), np.int64), empty((L, G, E), np.uint8),
                         empty((L, E), np.int64))
        L, (G, E) = num_layers, self.shape  # noqa: N806
        self.out = CudaPlan(empty((L, cap_rep, 3), np.int64), empty(L, np.int64),
                            empty((L, cap_blk), np.int64), empty((L, cap_blk, G, G), np.int64),
                            empty(L, np.int64), empty(L, np.int64), empty(L, np.float64),
                            empty(L, np.int64))

    def _fit_shape(self, num_ranks: int, num_experts: int) -> None:
        self.memory = choose_memory(num_ranks, num_experts, self.memory)

    def plan(self, load, window, stream=None) -> CudaPlan:
        """Plan L layers on the GPU: load int64 [L, S, E], window float64 [L, G] (seconds),
        device arrays (torch CUDA tensors are taken without a copy). Launches on `stream`, or
        for torch tensors on torch's current stream (so it can be captured in a CUDA graph),
        else on the default stream. Returns the preallocated `CudaPlan` buffers (overwritten by
        the next call; torch tensors for torch inputs) without synchronising. Negative loads
        and negative or NaN windows are reported per layer in `status`, not raised (that would
        need a synchronisation)."""
        load_d, window_d, stream = self.launch_inputs(load, window, stream)
        rules = self.rules
        self.kernel[self.num_layers, self.threads, stream](
            load_d, self._home, self._slots, window_d, *self._scalars, self._tt, self._xt,
            self._limit, float(rules.epsilon), bool(rules.move_local), bool(rules.evacuate),
            bool(rules.two_phase), bool(rules.mean_cap), *self.scratch, *self.out)
        return self.torch_out() if is_torch(load) else self.out

def greedy_cuda_arrays(load, home, slots, window, alpha, beta, token_time, transfer_time,
                       k_max, epsilon, move_local=True, evacuate=False, two_phase=True,
                       mean_cap=False, also_paper=False, *, threads: int = THREADS,
                       memory: str = "auto") -> list:
    """`greedy.greedy_arrays` for L layers at once on the GPU, numpy in and out (copies both
    ways; for tests). load int64 [L, S, E]; home bool [L, G, E]; window float64 [L, G]; the
    other arguments as in greedy_arrays (one cost model and slot budget for every layer).
    Returns one tuple per layer: (replicas, blk_expert, blk_assign, num_moves, objective),
    greedy_arrays' outputs plus the run's largest rank time. also_paper=True raises
    ValueError (rule 8 is not supported)."""
    if also_paper:
        raise ValueError("greedy_cuda does not support also_paper (rule 8); run the CPU kernel")
    load, num_layers, cost = array_inputs(load, alpha, beta, token_time, transfer_time)
    rules = GreedyRules(k_max=int(k_max), epsilon=float(epsilon), move_local=bool(move_local),
                        evacuate=bool(evacuate), two_phase=bool(two_phase),
                        mean_cap=bool(mean_cap))
    runner = CudaGreedy(home, slots, cost, rules, num_layers=num_layers, threads=threads,
                        memory=memory)
    host = host_plans(runner, load, window)
    return [(host.replicas[i, :host.num_replicas[i]], host.blk_expert[i, :host.num_blocks[i]],
             host.blk_assign[i, :host.num_blocks[i]], int(host.num_moves[i]),
             float(host.objective[i]))
            for i in range(num_layers)]
