"""The greedy planner as a CUDA kernel (numba.cuda): one thread block per MoE layer.

The same rules 1-7 as `greedy.greedy_arrays` (docs/planner.md, "The greedy's rules") and the same
plan, bit for bit: a launch plans L layers at once (inputs stacked [L, ...]), so that a runtime
can plan inside its dispatch on the GPU, with no host synchronisation, and capture the launch in
a CUDA graph. Rule 8 (`also_paper`) is not supported (the kernel raises ValueError for it);
every other GreedyRules option is (k_max, epsilon, move_local, evacuate, two_phase, mean_cap).

How a block works (T threads, THREADS by default): the start (home holders, the static split,
rank times) is spread over experts and ranks; then each move is found as the CPU kernel finds
it, after the ranks are ordered by time (each rank's comparisons with the others split over
T // G threads, the counts summed with integer atomics). The CPU kernel tries candidates
(destination rank, expert) in a fixed order (destinations fastest first, ties to the lowest
rank; experts of the slowest rank heaviest first, ties to the lowest id) and applies the FIRST
one that gains. Here the T threads put T consecutive candidates
of that order through the CPU kernel's cheap tests at once (`_prune`: lower bounds, a free slot,
a copy source), and an atomic minimum over the candidate index picks the first that passes: the
same candidate, whatever the thread timing. The whole block then searches it (rule 6: how many
tokens to move, `_search`). Its pool (dst's own tokens, the other sources holding no copy of the
expert in rank order, src's own) is built one source per thread: each thread works out what its
source can give, the joining sources become bits of a mask and their tokens an integer atomic
sum, and after a barrier each entry goes to its place (the population count of the joining
sources before it) with its terms of the prefix sums, computed there; the first lanes of the
warps then run the prefix sums over the terms (`_prefix_sums`), in pool order. The search runs
in rounds, each evaluating up to min(T, SLOTS) amounts x side by side, one per thread
(`_eval_x`), each thread putting its result slot into the round's hash table (`_insert`), then
a barrier, then every thread walks the CPU kernel's steps (the same walk: the same data) as far
as the round's results reach: down a bisection's tree in the round it reads each node's results
at the node's own slot, and any other amount it finds in the table (`_lookup`). A
bisection's next probes depend on its tests, but the tree of all its possible midpoints does
not: a round evaluates the next levels of that tree whole, with the amounts later steps will
ask for where they are known already (the ends of the bisection under way, the next
bisection's tree, the evacuation's total), and the walk takes the CPU kernel's path down them,
so it asks for the very amounts the CPU kernel asks for; an amount a round lacks costs another
round, never a different answer. If the candidate gains, it is the move: thread 0 makes the
replica and the expert's block (the threads together write its new dense [S, G] block if it
has none yet), then the pool's entries are applied side by side, one per thread (its source's
row of the block and, for a third-party source, its out-time and time), and the block's last
thread applies src's and dst's parts; else the rounds of pruning go on after it.

Floating point: every value that decides a choice is float64, computed in the CPU kernel's order
of operations: the static split is greedy.py's own function, compiled a second time as a
device function (`numba_cuda.device`, probe.planner.scalar), and the move's application is
greedy._apply_move's statements, spread over the pool's entries (each entry's updates touch
its own source alone); `_after`, `_src_after` and `_worst` have twins here that read the same
sums from prefix arrays (`_prefix_sums`: a sum that starts at 0.0 and adds the same terms in the
same order passes through the same floats; `_worst`'s running maximum over the third-party
sources becomes a prefix maximum, the same value: a maximum of values that are not NaN does
not depend on the order it takes them in, and the worst time is only compared), and `_eval_x`
is `_after` and `_worst` in one (tests compare the twins with greedy's rules bit for bit).
Rule 6's searches (`_water_fill`, phase 2's bisection, the caps, the evacuation) are one loop
of steps in `_search`, a bisection's step written once for all four (`_S_BIS`). The products
that feed a sum are rounded on their own (libdevice's dmul_rn): the CUDA compiler would
otherwise fuse a * b + c into one FMA, which rounds once and can flip a tie (the only FMAs it
makes multiply by 2.0, which is exact; tests check the sm_90 PTX).

Memory (`CudaGreedy(memory=...)`, "auto" by default): the layer's [G, E] and [G, G] working
arrays (home holders and positions, tokens per rank and expert, replicas held, flows, the
expert-to-block map, the token and transfer times) live in shared memory when they fit
(`shared_bytes(G, E)` <= SHARED_LIMIT = 48 KiB: 43.6 KB at G = 8, E = 128; the home holders
and positions as int32 there), else in preallocated global scratch (G = 64, E = 256 would need
416 KB). One kernel is compiled per (G, E, memory,
result slots): G and E are compile-time constants, so every shared and per-thread local array
has exactly G or E entries. Always shared: the rank arrays, the slowest rank's experts (20 bytes
per expert), a bitmask of each rank's experts with tokens at the start (for the compute sums),
the searched candidate's shares per source, pool bits, pool, prefix and term arrays (12 arrays
of G entries), its search's results (2 x slots x 3 floats: 6 KB for SLOTS = 128) and the rounds'
hash tables (3 x `_buckets(slots)` integers: 12 KB for 128 slots). Per thread: a round's plan
(13 integers) and one thread's parts of the move (ptxas: 104 B of stack, no spills; 192
registers at G = 8, 238 at G = 64).

Where one layer's time goes, counted without a GPU (none of these numbers is a GPU timing):
experiments.planner.kernel_stats counts the work of the synthetic decode layers of
experiments.planner.gpu_latency (default rules, k_max 16; results/kernel_stats): in every move the
FIRST candidate that passes the cheap pruning gains, and its search takes 1.9-2.1 rounds at ep=8
and 2.1-2.2 at ep=64 (at most 3; 2.9-3.0 there with 64 result slots), where one thread once made
15.6-18.6 evaluations of x one after another. experiments.planner.kernel_trace
(results/kernel_trace) runs one such layer in the CUDA simulator and counts the Python lines each
thread runs between barriers, a warp's lines divergence-aware: per move, the critical path (the
costliest warp's lines per barrier interval, summed) went from 2,188 to 1,476 lines at ep=8 and
from 4,177 to 2,119 at ep=64 when the pool, its prefix sums' layout, the move's application, the
walk's lookups and the ranks' order changed to a layout spread over the block, then to 1,306 and
1,721 (docs/planner.md has the table) when the walk read a bisection's nodes at their slots instead
of looking each up, SLOTS went from 64 to 128 (ep=64's searches from 3 rounds to 2.1), src's
experts were ranked by the whole block instead of one thread per expert, a new block's static split
was written by more threads and the move's parts were computed from the entry already found (and
the prefix sums now read their terms from arrays of their own, so that a term's load need not wait
for the store of the sum before it). What is left is mostly the search: its rounds
(their plan, evaluations and the walk: some 730 lines at ep=8, 810 at ep=64) and the walk's last
steps after its last round (some 250), then at ep=64 the prefix sums (dependent additions over the
pool, which must stay in pool order for the CPU kernel's floats) and the ranks' order (32
comparisons per thread). The walk runs on every thread, the same steps on the same data: on one
warp it would not be shorter, and the block's few warps each have a scheduler of their own on an
SM, so the copies cost no issue slots the critical path needs. The sm_90 PTX has 9,774 instructions
at ep=8 and 10,470 at ep=64 (11,021 and 11,068 before the layout above, 8,958 and 9,450 before the
walk's direct reads: more code, fewer instructions on the path). On an H100 the kernel before the
layout above took 522 us at ep=8 and 1,200 us at ep=64 for one layer (graph replay; 446 us at ep=8
before the search's rounds), latency-bound on long chains of dependent instructions; no GPU has
timed this kernel yet: experiments.planner.gpu_latency measures the start, the per-move time and
the threads and memory variants on the GPU.

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
from probe.planner.scalar import pool_entry

__all__ = ["MAX_EXPERTS", "MAX_RANKS", "SHARED_LIMIT", "SLOTS", "THREADS", "CudaGreedy",
           "CudaPlan", "choose_memory", "greedy_cuda_arrays", "kernel", "shared_bytes"]

# Most ranks a layer may have (the per-thread pool and the shared rank arrays are this long).
MAX_RANKS = 64
# Most experts a layer may have (the slowest rank's token counts are staged in shared memory).
MAX_EXPERTS = 1024
# Threads per block (one block per layer) unless the caller picks another multiple of 32.
THREADS = 128
# Most amounts x one round of a candidate's search evaluates side by side (`_search`): a block
# of T threads has min(T, SLOTS) result slots (48 bytes each in shared memory).
SLOTS = 128
# Most shared memory a block's arrays may take: the static limit of a block (48 KiB).
SHARED_LIMIT = 48 * 1024
# "No candidate gained yet" (larger than any candidate index: MAX_RANKS * experts < 2**40).
_NONE = 1 << 40
# Slots of the block's shared integers (_WIN and _WIN + 1: two rounds' first candidates).
_NE, _WIN, _B, _NEWB, _NBLK, _NREP, _MOVES, _BAD, _HOLDER, _TOTAL = 0, 1, 3, 4, 5, 6, 7, 8, 9, 10


# The CPU kernel's static split and a move's updates of its own two ranks as device functions:
# the same Python functions, compiled again (probe.planner.scalar), so the candidates' pools
# and the moved ranks' floats are the CPU kernel's.
_static_share = device(greedy._static_share, inline=True)
_apply_parts = device(greedy._apply_parts, inline=True)


# `_after`, `_src_after` and `_water_fill` of the CPU kernel, on prefix sums. The CPU kernel's
# `_after(x)` walks the pool from entry 0, adding each entry's take times a token time into four
# sums, and stops at the entry where the x tokens run out: O(npool) dependent steps per call,
# some 30 calls per candidate. A sum that starts at 0.0 and adds the same terms in the same order
# passes through the same floats, so `_prefix_sums` records each sum before every entry once per
# candidate, and `_after_p(x)` takes the sums before the last entry touched (found by a binary
# search over the cumulative counts) and adds that entry's partial take: the CPU kernel's floats,
# bit for bit, in O(log npool) per call. `_worst`'s maximum over the third-party sources is
# recorded the same way (p_worst: the maximum over the entries before i, all taken whole), so
# that one evaluation of x (`_eval_x`) is O(log npool) with the worst time too.
@cuda.jit(device=True)
def _scan_sum(terms, sums, npool):
    """sums[i] <- the sum of terms[:i] (in order, from 0.0). Two arrays, not one in place: a
    load of the next term never waits for the store of the sum before it, so the loads can
    run ahead of the chain of additions."""
    acc = 0.0
    for i in range(npool):
        sums[i] = acc
        acc += terms[i]


@cuda.jit(device=True)
def _terms(i, s, take, own_dst, src, dst, tt, comp, t_in, t_out, q_in_src, q_in_dst, p_out_dst,
           p_out_src, q_worst):
    """Pool entry i (source s, take tokens; own_dst: dst's take, the pool's first entry, 0 where
    dst gives none): the terms of `_prefix_sums`' sums written at i (q_*), `_after`'s d_in_src
    and d_in_dst terms (0.0 where `_after` skips the sum: it leaves the sum unchanged, a sum
    that starts at +0.0 is never -0.0: these terms are >= 0) and `_worst`'s time of a
    third-party source (-inf where `_worst` skips the entry: it leaves the maximum unchanged);
    and the two sums whose terms all come from one entry, written as the sums before i already:
    d_out_dst's one term comes from dst's entry, the first (the sum before entry i > 0 is that
    term: 0.0 plus a term >= 0, then 0.0 added, is the term), d_out_src's from src's, the last
    (the sum before every entry is 0.0). One thread per entry, side by side."""
    q_in_src[i] = mul(take, tt[s, src])
    q_in_dst[i] = 0.0 if s == dst else mul(take, tt[s, dst])
    p_out_dst[i] = mul(own_dst, tt[dst, src]) if i > 0 else 0.0
    p_out_src[i] = 0.0
    out = t_out[s] + mul(take, tt[s, dst] - tt[s, src])
    t = comp[s] + 2.0 * dmax(t_in[s], out)
    q_worst[i] = t if s != dst and s != src else -math.inf


@cuda.jit(device=True)
def _prefix_sums(tid, nt, npool, pool_n, cum, q_in_src, q_in_dst, q_worst, p_in_src, p_in_dst,
                 p_worst):
    """cum[i]: the pool's tokens before entry i; p_in_src[i], p_in_dst[i]: `_after`'s sums
    d_in_src and d_in_dst over the entries before i, taken whole, in pool order; p_worst[i]: the
    largest time of a third-party source (not src, not dst) among the entries before i, each
    taken whole (`_worst`'s terms; -inf where there is none). The terms are in q_in_src,
    q_in_dst and q_worst already (`_terms`, one entry per thread; a barrier after them). Every
    thread of the block calls it (it ends with a barrier): the first threads of the block's
    warps run the four sums over the terms, in pool order (the sequential sums' floats), sum k
    on warp k % warps: on different warps, not on four lanes of one warp, which would run them
    one after the other (lanes that branch apart take turns)."""
    warps = (nt + 31) // 32
    for k in range(tid // 32 if tid % 32 == 0 else 4, 4, warps):
        if k == 0:
            c = 0
            for i in range(npool):
                cum[i] = c
                c += pool_n[i]
        elif k == 1:
            _scan_sum(q_in_src, p_in_src, npool)
        elif k == 2:
            _scan_sum(q_in_dst, p_in_dst, npool)
        else:
            worst = -math.inf
            for i in range(npool):
                p_worst[i] = worst
                worst = dmax(worst, q_worst[i])
    cuda.syncthreads()


# The pool entry where x >= 1 tokens run out (the last i with cum[i] < x): the rule of
# probe.planner.scalar, compiled for the GPU (the lite planner's kernels use it too).
_entry = device(pool_entry)


@cuda.jit(device=True)
def _after_p(x, e, src, dst, pool_s, npool, cum, p_in_src, p_in_dst, p_out_dst, p_out_src, tok,
             comp, t_in, t_out, alpha, beta, tt, parts):
    """greedy._after(x, ...) from `_prefix_sums`' sums: the same floats; fills parts[6]."""
    return _after_k(_entry(x, npool, cum), x, e, src, dst, pool_s, cum, p_in_src, p_in_dst,
                    p_out_dst, p_out_src, tok, comp, t_in, t_out, alpha, beta, tt, parts)


@cuda.jit(device=True)
def _after_k(k, x, e, src, dst, pool_s, cum, p_in_src, p_in_dst, p_out_dst, p_out_src, tok,
             comp, t_in, t_out, alpha, beta, tt, parts):
    """`_after_p` with x's pool entry k (`_entry(x, npool, cum)`) known already."""
    comp_src = comp[src] - mul(beta, x)
    if tok[src, e] == x:
        comp_src -= alpha
    comp_dst = comp[dst] + mul(beta, x)
    if tok[dst, e] == 0:
        comp_dst += alpha
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
def _eval_x(x, src, dst, pool_s, npool, cum, p_in_src, p_in_dst, p_out_dst, p_out_src, p_worst,
            tok_src, tok_dst, comp_src, comp_dst, in_src, out_src, in_dst, out_dst, tt_ds,
            tt_src, comp, t_in, t_out, alpha, beta, tt):
    """One evaluation of a candidate's search: (t_src, t_dst, worst) if x >= 1 tokens move.
    t_src and t_dst are greedy._after's two times (and t_src is greedy._src_after's), worst
    is greedy._worst's float: the same operations in the same order as `_after_p`, with one
    search for x's pool entry and nothing stored (the winner's move recomputes its parts,
    takes and out-times). The worst time is the maximum of max(t_src, t_dst), p_worst at x's
    entry (the third-party sources before it, taken whole) and that entry's partial take:
    the same value as `_worst`'s running maximum over the same terms (a maximum of values
    that are not NaN does not depend on the order it takes them in). What every evaluation
    of the candidate reads comes in once, as scalars: tok_src = tok[src, e], tok_dst =
    tok[dst, e], comp_src = comp[src], comp_dst = comp[dst], in_src = t_in[src], out_src =
    t_out[src], in_dst = t_in[dst], out_dst = t_out[dst], tt_ds = tt[dst, src], tt_src =
    tt[src, dst] - tt[src, src] (the difference `_after` takes)."""
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
    worst = dmax(dmax(t_src, t_dst), p_worst[k])
    if s != dst and s != src:
        out = t_out[s] + mul(take, tt[s, dst] - tt[s, src])
        worst = dmax(worst, comp[s] + 2.0 * dmax(t_in[s], out))
    return t_src, t_dst, worst


@cuda.jit(device=True)
def _prune(e, src, dst, load, home, slots, window, alpha, beta, tt, xt, epsilon, hcount, hlist,
           hpos, tok, held, blk_of, blk_assign, times, comp, t_in, t_out, recv, send, used):
    """The cheap tests greedy._greedy_run makes of a candidate (moving tokens of e from src
    to dst) before its pool: dst's lower bounds against src's time, dst's free slot and a
    copy source within both transfer windows. Returns (passes, own, holder): own is what dst
    itself sends src of e (the pool's first entry), holder the copy's source (-1 where dst
    holds e already)."""
    floor = times[src] - epsilon
    lb_dst = comp[dst] + beta + 2.0 * t_in[dst]
    if lb_dst >= floor + mul(1e-9, abs(floor) + lb_dst):
        return False, 0, -1
    on_dst = held[dst, e] != 0
    if not on_dst and used[dst] >= slots[dst]:
        return False, 0, -1
    b = blk_of[e]
    own = (blk_assign[b, dst, src] if b >= 0
           else _static_share(load, home, hpos, hcount, dst, e, src))
    slope = beta - 2.0 * tt[dst, src]
    lb_out = 2.0 * t_out[dst] + (dmin(slope, mul(own, slope)) if own > 0 else beta)
    lb = comp[dst] + dmax(beta + 2.0 * t_in[dst], lb_out)
    if tok[dst, e] == 0:
        lb += alpha
    if lb >= floor + mul(1e-9, abs(floor) + lb):
        return False, 0, -1
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
            return False, 0, -1
    return True, own, holder


# A candidate's search (`_search`): rule 6's searches as greedy._greedy_run makes them, in
# steps. The steps before _S_EVAL need the evaluation of one x (_S_ADJ and the steps of
# phase 2's bisection two: x and x + 1); the others only decide the next step.
_S_ALL, _S_BIS, _S_ADJ, _S_ONE, _S_X2, _S_W2, _S_FIN, _S_EV = range(8)
_S_EVAL = 8
_S_EQ_DONE, _S_ADJ_DONE, _S_MEAN_DONE, _S_ONE_DONE, _S_DONE = range(8, 13)
# The bisections (step _S_BIS), in the order a search makes them: the water fill's x_eq
# (T_src <= T_dst) and x_mean (T_src <= cap), phase 2's minimum of max(T_src, T_dst) (its
# steps compare x and x + 1) and phase 2's cap (T_src <= cap). Each halves [lo, hi] the same
# way: to [lo, mid] where its test holds at mid = (lo + hi) // 2, else to [mid + 1, hi], until
# lo == hi, its amount.
_B_EQ, _B_MEAN, _B_TWO, _B_CAP = range(4)
# A round's plan (`_plan_round`, a local int64 array): the number of single amounts, 4 of them,
# then two bisection trees of 4 entries each (lo, hi, levels, width: 2 where a node holds mid
# and mid + 1). A round's result slots: the singles, then tree 1's nodes, then tree 2's.
_P_LEN = 13
_P_TREES = (5, 9)


@cuda.jit(device=True)
def _node_x(j, lo, hi):
    """mid at node j of a bisection over [lo, hi] (its tree in heap order: root 0; node j's
    children 2j + 1 where the test held, [lo, mid], and 2j + 2, [mid + 1, hi]); 0 where the
    bisection ends above node j."""
    p = j + 1
    top = 31 - cuda.clz(int32(p))  # j's depth: floor(log2(j + 1))
    for level in range(top - 1, -1, -1):  # the path from the root: the bits of j + 1
        if lo >= hi:
            return 0
        mid = (lo + hi) // 2
        if (p >> level) & 1:
            lo = mid + 1
        else:
            hi = mid
    return (lo + hi) // 2 if lo < hi else 0


@cuda.jit(device=True, inline=True)
def _tree_size(plan, t):
    return ((1 << plan[t + 2]) - 1) * plan[t + 3]


@cuda.jit(device=True)
def _slot_x(plan, i):
    """The amount x that result slot i of the round planned in plan holds (0: none)."""
    n = plan[0]
    if i < n:
        return plan[1 + i]
    i -= n
    for t in _P_TREES:
        size = _tree_size(plan, t)
        if i < size:
            w = plan[t + 3]
            x = _node_x(i // w, plan[t], plan[t + 1])
            return x + i % w if x > 0 else 0
        i -= size
    return 0


@cuda.jit(device=True, inline=True)
def _bucket(x, mask):
    """x's first bucket in a round's table of result slots (`_lookup`): a multiplicative hash,
    so that a bisection tree's evenly spaced midpoints spread over the buckets."""
    return ((x * 2654435761) >> 16) & mask


@cuda.jit(device=True)
def _insert(tab, base, mask, x, nslots, slot):
    """Puts x * nslots + slot into the round's table tab[base:base + mask + 1] at x's
    first free bucket from `_bucket(x)` on (an atomic compare-and-swap: the round's threads
    insert side by side); where x is there already (another slot of the same amount: the
    same results), it stays."""
    h = _bucket(x, mask)
    key = x * nslots + slot
    while True:
        old = cuda.atomic.cas(tab, base + h, 0, key)
        if old == 0 or old // nslots == x:
            return
        h = (h + 1) & mask


@cuda.jit(device=True)
def _lookup(tab, base, mask, x, nslots):
    """The result slot of x in the round whose table is tab[base:base + mask + 1], -1 where
    the round did not evaluate it: the buckets from `_bucket(x)` on, up to x's entry or an
    empty bucket (a table at most a quarter full: a probe or two)."""
    h = _bucket(x, mask)
    while True:
        entry = tab[base + h]
        if entry == 0:
            return -1
        if entry // nslots == x:
            return entry % nslots
        h = (h + 1) & mask


@cuda.jit(device=True, inline=True)
def _put(plan, x, room):
    """Adds x (x >= 1, not there yet) to the plan's singles while they are fewer than room
    (and than 4)."""
    n = plan[0]
    if x < 1 or n >= room or n >= 4:
        return
    for i in range(n):
        if plan[1 + i] == x:
            return
    plan[1 + n] = x
    plan[0] = n + 1


@cuda.jit(device=True)
def _add_tree(plan, t, used, nslots, lo, hi, width):
    """Puts a bisection over [lo, hi] at plan[t:t + 4] with as many levels as it can take
    (ceil(log2(hi - lo + 1))) and the slots left hold; returns the slots used after it."""
    # levels: the least with 2**levels >= hi - lo + 1 (n, clamped to [1, 2**30]: more than any
    # slot count takes), at most the most that fit, floor(log2(room // width + 1)).
    n = hi - lo + 1
    n = 1 if n < 1 else (1 << 30 if n > 1 << 30 else n)
    room = nslots - used
    room = (0 if room < 0 else room) // width + 1
    levels = 32 - cuda.clz(int32(n - 1))
    fit = 31 - cuda.clz(int32(room))
    levels = fit if fit < levels else levels
    plan[t] = lo
    plan[t + 1] = hi
    plan[t + 2] = levels
    plan[t + 3] = width
    return used + ((1 << levels) - 1) * width


@cuda.jit(device=True)
def _plan_round(plan, nslots, step, kind, lo, hi, need, also, spec_x, spec_total, n_other,
                mean_cap, second, lo2, hi2, x2):
    """Which amounts a round evaluates, side by side in nslots result slots, in this order of
    priority: need (the amount the search waits for) and also (the second of a pair step, 0
    if none); the current bisection's tree (or the water fill's first, at the start), as many
    levels as fit; the amounts at the ends of the bisection under way, which its tree lacks
    and its end may ask for (its hi and, for the water fill's adjustment, lo - 1; lo for
    phase 2's); the trees of the next bisections whose ranges are known already (the mean
    cap's, phase 2's, phase 2's cap); spec_x and spec_total (the evacuation's). At most 4
    single amounts."""
    plan[0] = 0
    room = 4 if nslots > 4 else nslots
    _put(plan, need, room)
    _put(plan, also, room)
    used = plan[0]
    t = _P_TREES[0]
    stage = _B_CAP  # the bisections up to this one are done or under way
    if step == _S_BIS or step == _S_ALL:  # noqa: SIM109 (a plain comparison for CUDA)
        stage = kind if step == _S_BIS else _B_EQ
        used = _add_tree(plan, t, used, nslots, lo if step == _S_BIS else 1,
                         hi if step == _S_BIS else n_other,
                         2 if step == _S_BIS and kind == _B_TWO else 1)
        t += 4
    elif step == _S_ADJ:
        stage = _B_EQ
    elif step == _S_ONE:
        stage = _B_MEAN
    if step == _S_BIS:
        n = plan[0]
        _put(plan, hi if kind <= _B_MEAN else lo, n + (1 if used < nslots else 0))
        used += plan[0] - n
        n = plan[0]
        _put(plan, lo - 1 if kind == _B_EQ else 0, n + (1 if used < nslots else 0))
        used += plan[0] - n
    if t < _P_LEN and mean_cap and stage < _B_MEAN and n_other > 1:
        used = _add_tree(plan, t, used, nslots, 1, n_other, 1)
        t += 4
    if t < _P_LEN and second and stage < _B_TWO and lo2 < hi2:
        used = _add_tree(plan, t, used, nslots, lo2, hi2, 2)
        t += 4
    if t < _P_LEN and mean_cap and step == _S_X2 and n_other + 1 < x2:
        used = _add_tree(plan, t, used, nslots, n_other + 1, x2, 1)
        t += 4
    while t < _P_LEN:  # the trees left: none (no levels, no slots)
        plan[t + 2] = 0
        t += 4
    n = plan[0]
    room = n + nslots - used
    room = 4 if room > 4 else room
    _put(plan, spec_x, room)
    _put(plan, spec_total, room)


@cuda.jit(device=True)
def _search(tid, nt, nslots, res, tab, rnd, src, dst, tok_src, tok_dst, npool, total, pool_s,
            pool_n, cum, p_in_src, p_in_dst, p_out_dst, p_out_src, p_worst, comp, t_in, t_out,
            times, alpha, beta, tt, epsilon, move_local, evacuate, two_phase, mean_cap, mean):
    """Rule 6's search for one candidate (greedy._greedy_run's water fill, phase 2, caps and
    evacuation), by the whole block. Every thread of the block calls it with the same
    arguments (it has barriers) and gets the same (gains, x, t_src, t_dst).

    The steps are the CPU kernel's, in its order, each deciding from the times at one amount
    x (or two) what comes next, and every thread walks them (the same walk: the same data).
    The evaluations come in rounds: a round evaluates up to nslots amounts side by side, one
    per thread (`_eval_x` into res[parity, slot], float64 [2, nslots, 3]: t_src, t_dst,
    worst), then a barrier, then the walk goes on for as long as the amounts its steps ask for
    are in the round, and the next round is planned from where it stopped (`_plan_round`).
    Which amounts a bisection asks for next depends on its tests, but the tree of all its
    possible midpoints does not: a round evaluates the next levels of that tree whole (31
    nodes for 5 levels), and the walk then takes its path down them, asking for the very
    amounts the CPU kernel asks for. So the result is the CPU kernel's, bit for bit, whatever
    a round holds (an amount it lacks costs another round, never a different answer), and a
    search of 16-19 evaluations one after another takes a few rounds. The pool arrays are
    the candidate's (shared, the kernel's pool and `_prefix_sums`').

    The walk finds an amount's result slot in a hash table that the round's threads fill as
    they evaluate (`_insert`, `_lookup`: a probe or two, where walking the plan's singles and
    trees took some 40 steps). Round r of the block (rnd counts them over the whole launch;
    the search returns the count after its rounds) writes its results to res[r % 2] and its
    table to the third r % 3 of tab (int64 [3 x buckets], all zeros at the launch's start),
    and clears the third (r + 1) % 3 for the next round: the walk of round r - 2 read it last,
    before round r - 1's barrier, and round r + 1 writes it after round r's barrier.
    Returns (gains, x, t_src, t_dst, rnd)."""
    if total == 0:
        return False, 0, 0.0, 0.0, rnd
    cap = mean if mean_cap else -math.inf
    own_src = pool_n[npool - 1] if move_local and pool_s[npool - 1] == src else 0
    # greedy._greedy_run's two branches: two_phase with own tokens (phase 1 over the other
    # sources' tokens, then phase 2 over src's own), else one water fill over the whole pool.
    phase_one = two_phase and own_src > 0
    n_other = total - own_src if phase_one else total
    second = phase_one
    lo2 = n_other + 1  # phase 2's range
    hi2 = total - 1 if total == tok_src and total > lo2 else total
    spec_total = total if evacuate and total == tok_src else 0
    comp_src = comp[src]  # what every evaluation reads, read once
    comp_dst = comp[dst]
    in_src = t_in[src]
    out_src = t_out[src]
    in_dst = t_in[dst]
    out_dst = t_out[dst]
    tt_ds = tt[dst, src]
    tt_src = tt[src, dst] - tt[src, src]
    worst = 0.0  # phase 1's worst time (0.0 when phase 1 is empty, as on the CPU)
    x = 0  # the amount chosen so far
    x_eq = 0  # the water fill's equal-times amount ...
    x_mean = 0  # ... and its mean-cap amount
    all_src = 0.0  # T_src if all n_other tokens move
    kind = _B_EQ  # the bisection under way and its range
    lo = 0
    hi = 0
    x2 = 0  # phase 2's amount
    t_fin = 0.0  # the chosen move's T_src ...
    d_fin = 0.0  # ... and T_dst
    xa = 0  # the amounts the step needs
    xb = 0
    have_a = False  # xa's times came in a round before xb's (a round of one slot)
    a_src = 0.0
    a_dst = 0.0
    a_w = 0.0
    b_src = 0.0
    b_dst = 0.0
    parity = rnd % 2  # this round's results (none yet: fresh)
    t_cur = rnd % 3
    fresh = True
    mask = tab.shape[0] // 3 - 1  # (buckets per table: a power of two)
    plan = cuda.local.array(_P_LEN, int64)  # (read only once a round has planned it: fresh)
    step = _S_ALL if n_other > 0 else _S_ONE_DONE  # (else phase 2 alone: second is True)
    while True:
        while step != _S_DONE:  # the walk, while this round holds what the steps need
            if step == _S_BIS:  # a bisection's steps, one after another (module comment: _B_*)
                # This round's tree of the bisection from where it stands (root [lo, hi], the
                # bisection's width), if the round has one: the walk reads node j's results at
                # their slot, t_slot + j * width (+ 1: mid + 1), for its t_lev levels, with no
                # lookup (node j's mid is the bisection's mid on the path to j: the same
                # amount); past them, or with no such tree, it looks the amounts up.
                t_lev = 0
                t_slot = 0
                j = 0
                if not fresh and not have_a:
                    t_slot = plan[0]
                    for t in _P_TREES:
                        if (plan[t + 2] > 0 and plan[t] == lo and plan[t + 1] == hi
                                and (plan[t + 3] == 2) == (kind == _B_TWO)):
                            t_lev = plan[t + 2]
                            break
                        t_slot += _tree_size(plan, t)
                while lo < hi:
                    xa = (lo + hi) // 2
                    xb = xa + 1 if kind == _B_TWO else 0
                    if t_lev > 0:  # node j of the round's tree
                        t_lev -= 1
                        i = t_slot + j * (2 if xb > 0 else 1)
                        a_src = res[parity, i, 0]
                        a_dst = res[parity, i, 1]
                        if xb > 0:
                            b_src = res[parity, i + 1, 0]
                            b_dst = res[parity, i + 1, 1]
                    else:  # (the tree's levels are done, or none: looked up from here)
                        if not have_a:
                            i = -1 if fresh else _lookup(tab, t_cur * (mask + 1), mask, xa,
                                                         nslots)
                            if i < 0:
                                break
                            a_src = res[parity, i, 0]
                            a_dst = res[parity, i, 1]
                        if xb > 0:
                            have_a = True
                            i = -1 if fresh else _lookup(tab, t_cur * (mask + 1), mask, xb,
                                                         nslots)
                            if i < 0:
                                break
                            b_src = res[parity, i, 0]
                            b_dst = res[parity, i, 1]
                            have_a = False
                    if kind == _B_TWO:
                        holds = dmax(b_src, b_dst) >= dmax(a_src, a_dst)
                    elif kind == _B_EQ:
                        holds = a_src <= a_dst
                    else:
                        holds = a_src <= cap
                    if holds:
                        hi = xa
                        j = 2 * j + 1
                    else:
                        lo = xa + 1
                        j = 2 * j + 2
                if lo < hi:  # the round lacks the step's amounts (xa, xb; have_a)
                    break
                if kind == _B_EQ:  # its end: lo == hi
                    x_eq = lo
                    step = _S_EQ_DONE
                elif kind == _B_MEAN:
                    x_mean = lo
                    step = _S_MEAN_DONE
                elif kind == _B_TWO:
                    x2 = lo
                    step = _S_X2
                else:
                    x2 = lo
                    step = _S_W2
                continue
            if step < _S_EVAL:
                xb = 0
                if step == _S_ALL:
                    xa = n_other
                elif step == _S_ADJ:
                    xa = x_eq - 1
                    xb = x_eq
                elif step == _S_X2 or step == _S_W2:  # noqa: SIM109 (for CUDA)
                    xa = x2
                elif step == _S_EV:
                    xa = total
                else:  # _S_ONE, _S_FIN
                    xa = x
                if not have_a:
                    i = -1 if fresh else _lookup(tab, t_cur * (mask + 1), mask, xa, nslots)
                    if i < 0:
                        break
                    a_src = res[parity, i, 0]
                    a_dst = res[parity, i, 1]
                    a_w = res[parity, i, 2]
                if xb > 0:
                    have_a = True
                    i = -1 if fresh else _lookup(tab, t_cur * (mask + 1), mask, xb, nslots)
                    if i < 0:
                        break
                    b_src = res[parity, i, 0]
                    b_dst = res[parity, i, 1]
                have_a = False
            if step == _S_ALL:  # greedy._water_fill: all n_other tokens, then bisect x_eq
                all_src = a_src
                x_eq = n_other
                step = _S_EQ_DONE
                if a_src <= a_dst and n_other > 1:
                    step = _S_BIS
                    kind = _B_EQ
                    lo = 1
                    hi = n_other
            elif step == _S_EQ_DONE:  # one token less when that is no worse
                step = _S_ADJ if x_eq > 1 else _S_ADJ_DONE
            elif step == _S_ADJ:
                if dmax(a_src, a_dst) <= dmax(b_src, b_dst):
                    x_eq -= 1
                step = _S_ADJ_DONE
            elif step == _S_ADJ_DONE:  # x_mean: bisect T_src against the cap
                x_mean = n_other
                step = _S_MEAN_DONE
                if all_src <= cap and n_other > 1:
                    step = _S_BIS
                    kind = _B_MEAN
                    lo = 1
                    hi = n_other
            elif step == _S_MEAN_DONE:  # the water fill's x; phase 1's times and worst time
                x = dmin(x_eq, x_mean)
                step = _S_ONE if phase_one else _S_ONE_DONE
            elif step == _S_ONE:
                worst = a_w
                if x < n_other or a_src <= a_dst or a_src <= cap:
                    second = False
                step = _S_ONE_DONE
            elif step == _S_ONE_DONE:  # phase 2 (max(T_src, T_dst) is convex), or the end
                step = _S_FIN
                if second:
                    lo = lo2
                    hi = hi2
                    x2 = lo
                    step = _S_X2
                    if lo < hi:
                        step = _S_BIS
                        kind = _B_TWO
            elif step == _S_X2:  # under the cap, bisect T_src against it
                step = _S_W2
                if a_src <= cap and n_other + 1 < x2:
                    step = _S_BIS
                    kind = _B_CAP
                    lo = n_other + 1
                    hi = x2
            elif step == _S_W2:  # phase 2's move replaces phase 1's when strictly better
                if n_other == 0 or a_w < worst:
                    x = x2
                step = _S_FIN
            elif step == _S_FIN:  # the move's times and worst time; rule 6's evacuation
                t_fin = a_src
                d_fin = a_dst
                worst = a_w
                step = _S_DONE
                if evacuate and x < total and total == tok_src:
                    step = _S_EV
            else:  # _S_EV
                if a_w < worst:
                    x = total
                    t_fin = a_src
                    d_fin = a_dst
                    worst = a_w
                step = _S_DONE
        if step == _S_DONE:
            break
        # The next round: what the walk waits for, and what later steps may ask for.
        spec_x = 0
        if step == _S_BIS and kind == _B_MEAN:
            spec_x = x_eq  # phase 1's x when x_mean >= x_eq
        elif (step == _S_BIS and kind >= _B_TWO) or step == _S_X2 or step == _S_W2:  # noqa: SIM109
            spec_x = x  # the final evaluation's x when phase 2 does not win
        _plan_round(plan, nslots, step, kind, lo, hi, xb if have_a else xa,
                    0 if have_a else xb, spec_x, spec_total, n_other, mean_cap, second, lo2,
                    hi2, x2)
        rnd += 1  # (two result buffers and three tables: one barrier per round)
        parity = rnd % 2
        t_cur = rnd % 3
        fresh = False
        t_next = (rnd + 1) % 3 * (mask + 1)
        for i in range(tid, mask + 1, nt):
            tab[t_next + i] = 0
        for i in range(tid, nslots, nt):
            xe = _slot_x(plan, i)
            if xe > 0:
                _insert(tab, t_cur * (mask + 1), mask, xe, nslots, i)
                t_s, t_d, w = _eval_x(xe, src, dst, pool_s, npool, cum, p_in_src, p_in_dst,
                                      p_out_dst, p_out_src, p_worst, tok_src, tok_dst,
                                      comp_src, comp_dst, in_src, out_src, in_dst, out_dst,
                                      tt_ds, tt_src, comp, t_in, t_out, alpha, beta, tt)
                res[parity, i, 0] = t_s
                res[parity, i, 1] = t_d
                res[parity, i, 2] = w
        cuda.syncthreads()
    if times[src] - worst > epsilon:
        return True, x, t_fin, d_fin, rnd
    return False, 0, 0.0, 0.0, rnd


def shared_bytes(num_ranks: int, num_experts: int, slots: int = SLOTS) -> int:
    """Bytes of shared memory a block takes for G ranks and E experts when its [G, E] and
    [G, G] working arrays live there (`memory="shared"`), with `slots` result slots per round
    of a search (SLOTS, the most a block uses, by default)."""
    G, E = num_ranks, num_experts  # noqa: N806 (the shape letters)
    return _fixed_bytes(G, E, slots) + 8 * (2 * E + G * E + 3 * G * G) + 4 * 2 * G * E + G * E


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


def _buckets(slots: int) -> int:
    """Buckets of a round's table of result slots (`_lookup`): the power of two at least 4x
    the slots, so that few amounts of a round share a bucket."""
    return 1 << max(2, (4 * int(slots) - 1).bit_length())


def _fixed_bytes(num_ranks: int, num_experts: int, slots: int = SLOTS) -> int:
    """Shared bytes a block always takes: rank arrays (and the ranks' order counts), the expert
    lists, block scalars, the ranks' expert bitmasks, the searched candidate's shares per
    source, pool bits, pool, prefix sums and their terms (12 arrays of G), its search's result
    slots (2 x slots x 3 floats) and the rounds' hash tables (3 x `_buckets(slots)`
    integers)."""
    G, E = num_ranks, num_experts  # noqa: N806
    return (8 * 7 * G + 16 * G + E * (4 + 8 + 4 + 4) + 8 * 16 + 4 * G * ((E + 31) // 32)
            + 8 * G + 4 * ((G + 31) // 32) + 8 * 11 * G + 8 * 2 * 3 * slots
            + 8 * 3 * _buckets(slots))


def _kernel_source(num_ranks: int, num_experts: int, in_shared: bool, slots: int = SLOTS):
    """The kernel's Python function for G ranks and E experts (compile-time constants: array
    sizes), its [G, E] and [G, G] working arrays in shared memory (in_shared) or in the global
    scratch arguments, `slots` result slots per round of a search (any count >= 1, whatever
    the block size: the threads stride over them)."""
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    G, E = num_ranks, num_experts  # noqa: N806 (the shape letters)
    SL = int(slots)  # noqa: N806 (result slots of a search's round)
    GS, ES = (G, E) if in_shared else (1, 1)  # noqa: N806 (the shared working arrays' shape)
    EW = (E + 31) // 32  # noqa: N806 (32-bit words of an expert bitmask)
    PW = (G + 31) // 32  # noqa: N806 (32-bit words of a bitmask of ranks)
    HS = _buckets(SL)  # noqa: N806 (buckets of a round's table of result slots)
    TS = 3 * HS  # noqa: N806 (the three tables' entries)

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
        sh_hl = cuda.shared.array((ES, GS), int32)
        sh_hp = cuda.shared.array((GS, ES), int32)
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
        n_faster = cuda.shared.array(G, int32)  # (their counts, summed over the threads)
        n_ties = cuda.shared.array(G, int32)
        src_e = cuda.shared.array(E, int32)  # src's experts with tokens, in any order ...
        src_n = cuda.shared.array(E, int64)  # ... and their token counts on src
        exp_order = cuda.shared.array(E, int32)  # the same experts, heaviest first ...
        heavier = cuda.shared.array(E, int32)  # ... and how many are heavier than each
        ints = cuda.shared.array(16, int64)
        busy = cuda.shared.array((G, EW), uint32)  # per rank: experts with tokens, as bits

        # The searched candidate's pool and its prefix sums (`_terms`, `_prefix_sums`), the
        # results of its search's rounds (`_search`: t_src, t_dst, worst per slot, two
        # buffers) and their hash tables.
        pool_s = cuda.shared.array(G, int64)
        pool_n = cuda.shared.array(G, int64)
        cum = cuda.shared.array(G, int64)
        p_in_src = cuda.shared.array(G, float64)
        p_in_dst = cuda.shared.array(G, float64)
        p_out_dst = cuda.shared.array(G, float64)
        p_out_src = cuda.shared.array(G, float64)
        p_worst = cuda.shared.array(G, float64)
        q_in_src = cuda.shared.array(G, float64)  # (their terms, `_terms`')
        q_in_dst = cuda.shared.array(G, float64)
        q_worst = cuda.shared.array(G, float64)
        res = cuda.shared.array((2, SL, 3), float64)
        tab = cuda.shared.array(TS, int64)  # their slots by amount (`_lookup`)
        s_rnd = 0  # the searches' rounds so far
        share_s = cuda.shared.array(G, int64)  # what each source can give (the pool's)
        pmask = cuda.shared.array(PW, uint32)  # the other sources in the pool, as bits
        parts = cuda.local.array(6, float64)  # the winner's move: src's and dst's parts

        # The start: home holders (hl[e, :hc[e]] in rank order, hp[g, e] = g's position there
        # or -1), replicas held (none yet), zero flows; bad values flag the layer.
        if tid == 0:
            ints[_NBLK] = 0
            ints[_NREP] = 0
            ints[_MOVES] = 0
            ints[_BAD] = 0
            ints[_NE] = 0
            ints[_WIN] = _NONE
            ints[_WIN + 1] = _NONE
        for g in range(tid, G, nt):
            used[g] = 0
            recv[g] = 0.0
            send[g] = 0.0
            n_faster[g] = 0
            n_ties[g] = 0
        for i in range(tid, TS, nt):
            tab[i] = 0
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
            heavier[e] = 0
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

        # One move per pass: 4 barriers to rank the ranks and src's experts, one per round of
        # candidates, 3 per searched candidate (its pool, its prefix sums) plus one per round
        # of its search, 2 for the move (3 when the expert gets its first block).
        # ints[_NE] == 0 and ints[_WIN] == ints[_WIN + 1] == _NONE on entry.
        while bad == 0:
            if ints[_MOVES] >= limit:
                break
            # The ranks fastest first, ties to the lowest rank, and how many are faster than
            # each: the comparisons of rank g with the others split over the block's threads
            # (parts of the ranks h, counts summed with integer atomics: exact), then thread g
            # places g.
            n_parts = nt // G if nt >= 2 * G else 1
            for i in range(tid, G * n_parts, nt):
                g = i % G
                t = times[g]
                r = 0
                c = 0
                for h in range(i // G, G, n_parts):
                    if times[h] < t:
                        c += 1
                    elif times[h] == t and h < g:
                        r += 1
                cuda.atomic.add(n_faster, g, c)
                cuda.atomic.add(n_ties, g, r)
            cuda.syncthreads()
            for g in range(tid, G, nt):
                c = n_faster[g]
                rank_order[c + n_ties[g]] = g
                faster[g] = c
                n_faster[g] = 0  # (for the next move: read again only after two barriers)
                n_ties[g] = 0
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
            # ... then ranked heaviest first (ties to the lowest id), each among the ne listed:
            # its comparisons with the others split over the block's threads (parts of the
            # list, the counts of heavier experts summed with integer atomics: exact), then
            # each placed by one thread.
            ne = ints[_NE]
            n_parts = nt // ne if ne > 0 and nt >= 2 * ne else 1
            for i in range(tid, ne * n_parts, nt):
                k = i % ne
                n = src_n[k]
                e = src_e[k]
                r = 0
                for j in range(i // ne, ne, n_parts):
                    m = src_n[j]
                    if m > n or (m == n and src_e[j] < e):
                        r += 1
                cuda.atomic.add(heavier, k, r)
            cuda.syncthreads()
            for i in range(tid, ne, nt):
                exp_order[heavier[i]] = src_e[i]
                heavier[i] = 0  # (for the next move: read again only after two barriers)
            cuda.syncthreads()
            # Rounds of candidates in the CPU kernel's order, nt side by side: each thread
            # prunes one (`_prune`), an atomic minimum over the indices of those that pass
            # picks the first, and the whole block searches it (its pool one source per
            # thread, `_terms`, `_prefix_sums`, then `_search`); the first that gains is the
            # move, else the rounds go on after it. (Round rnd's minimum is in
            # ints[_WIN + rnd % 2]; thread 0 clears the other slot for the next round, and the
            # pool's token sum and bits, before this one's barrier, after all read them.)
            num_cand = nd * ne
            base = 0
            rnd = 0
            first = _NONE
            gains = False
            e = 0
            dst = 0
            x = 0
            c_src = 0.0
            c_dst = 0.0
            holder = -1
            npool = 0
            while base < num_cand:
                k = base + tid
                if k < num_cand:
                    ok, own, holder = _prune(exp_order[k % ne], src, rank_order[k // ne], ld, hm,
                                             slots, win, alpha, beta, tts, xts, epsilon, hc, hl,
                                             hp, tk, hd, bo, ba, times, comp, t_in, t_out, recv,
                                             send, used)
                    if ok:
                        cuda.atomic.min(ints, _WIN + rnd % 2, k)
                if tid == 0:  # (the searched candidate's shared integers, cleared)
                    ints[_WIN + (rnd + 1) % 2] = _NONE
                    ints[_TOTAL] = 0
                    for w in range(PW):
                        pmask[w] = 0
                cuda.syncthreads()
                first = ints[_WIN + rnd % 2]
                rnd += 1
                if first == _NONE:
                    base += nt
                    continue
                dst = rank_order[first // ne]
                e = exp_order[first % ne]
                if k == first:  # its copy source, from the thread that pruned it
                    ints[_HOLDER] = holder
                # Its pool (greedy._greedy_run's: dst's own tokens, the other sources holding
                # no copy of e in rank order, src's own when move_local), one source per
                # thread: what s can give (the expert's block, else the static split), the
                # other sources that join as bits of pmask, the pool's tokens summed with
                # integer atomics (exact) ...
                b_e = bo[e]
                for s in range(tid, G, nt):
                    a = ba[b_e, s, src] if b_e >= 0 else _static_share(ld, hm, hp, hc, s, e,
                                                                       src)
                    share_s[s] = a
                    if a > 0:
                        if s == dst or (s == src and move_local):
                            cuda.atomic.add(ints, _TOTAL, a)
                        elif s != src and hd[s, e] == 0:
                            cuda.atomic.add(ints, _TOTAL, a)
                            cuda.atomic.or_(pmask, s // 32, uint32(1 << (s % 32)))
                cuda.syncthreads()
                # ... then each entry at its place (the joining sources before it: a
                # population count) with its terms of the prefix sums.
                total = ints[_TOTAL]
                n_own = 1 if share_s[dst] > 0 else 0
                n_mid = n_own
                for w in range(PW):
                    n_mid += cuda.popc(int64(pmask[w]))
                npool = n_mid + (1 if move_local and share_s[src] > 0 else 0)
                for s in range(tid, G, nt):
                    pos = -1
                    if s == dst:
                        pos = 0 if n_own == 1 else -1
                    elif s == src:
                        pos = n_mid if npool > n_mid else -1
                    else:
                        word = int64(pmask[s // 32])
                        if (word >> (s % 32)) & 1:
                            pos = n_own + cuda.popc(word & ((int64(1) << (s % 32)) - 1))
                            for w in range(s // 32):
                                pos += cuda.popc(int64(pmask[w]))
                    if pos >= 0:
                        a = share_s[s]
                        pool_s[pos] = s
                        pool_n[pos] = a
                        _terms(pos, s, a, share_s[dst] * n_own, src, dst, tts, comp, t_in,
                               t_out, q_in_src, q_in_dst, p_out_dst, p_out_src, q_worst)
                cuda.syncthreads()
                _prefix_sums(tid, nt, npool, pool_n, cum, q_in_src, q_in_dst, q_worst, p_in_src,
                             p_in_dst, p_worst)
                gains, x, c_src, c_dst, s_rnd = _search(
                    tid, nt, SL, res, tab, s_rnd, src, dst, tk[src, e], tk[dst, e], npool,
                    total, pool_s, pool_n, cum, p_in_src, p_in_dst, p_out_dst, p_out_src,
                    p_worst, comp, t_in, t_out, times, alpha, beta, tts, epsilon, move_local,
                    evacuate, two_phase, mean_cap, mean)
                if gains:
                    break
                base = first + 1
            if not gains:
                break
            # The move: thread 0 makes the replica and the expert's block (nobody reads them
            # until the barrier), the block's threads its new dense block, then the pool's
            # entries side by side and thread 0 the rest.
            if tid == 0:
                holder = ints[_HOLDER]
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
            cuda.syncthreads()
            b = ints[_B]
            if ints[_NEWB] == 1:  # a new block starts from the static split (all threads)
                # Row s split over n_cols threads, entry (s, g) on part g % n_cols: zeros,
                # then s's tokens on e's holders (greedy._static_share's values), each entry
                # written by one thread, in that order.
                n_cols = nt // G if nt >= 2 * G else 1
                n_cols = G if n_cols > G else n_cols
                for i in range(tid, G * n_cols, nt):
                    s = i % G
                    part = i // G
                    for g in range(part, G, n_cols):
                        ba[b, s, g] = 0
                    n = ld[s, e]
                    if hm[s, e]:
                        if s % n_cols == part:
                            ba[b, s, s] = n
                    else:
                        h = hc[e]
                        q = n // h
                        r = n - q * h
                        for j in range(h):  # the holder at position j
                            g = hl[e, j]
                            if g % n_cols == part:
                                ba[b, s, g] = q + (1 if (j + s) % h < r else 0)
                cuda.syncthreads()
            # The move applied: greedy._apply_move's updates, from the pool, the same floats.
            # Each entry up to the one where x runs out (those after take 0 tokens: the CPU
            # kernel's updates of them change nothing) by its own thread: its source's row
            # of the block and, for a third-party source, its out-time and time (`_worst`'s
            # new out-time); the block's last thread (one with no entry, where the pool has
            # fewer than nt entries) src's and dst's parts (`_after`'s) and times. Every
            # entry has another source, and src's and dst's entries touch only their rows.
            last = _entry(x, npool, cum)
            for i in range(tid, last + 1, nt):
                s = pool_s[i]
                take = pool_n[i] if i < last else x - cum[last]
                ba[b, s, src] -= take
                ba[b, s, dst] += take
                if s != dst and s != src and take > 0:
                    t_out[s] = t_out[s] + mul(take, tts[s, dst] - tts[s, src])
                    times[s] = comp[s] + 2.0 * dmax(t_in[s], t_out[s])
            if tid == nt - 1:
                _after_k(last, x, e, src, dst, pool_s, cum, p_in_src, p_in_dst, p_out_dst,
                         p_out_src, tk, comp, t_in, t_out, alpha, beta, tts, parts)
                _apply_parts(e, src, dst, x, parts, c_src, c_dst, tk, comp, t_in, t_out, times)
                ints[_MOVES] += 1
                ints[_NE] = 0
                ints[_WIN] = _NONE
                ints[_WIN + 1] = _NONE
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


def kernel(num_ranks: int, num_experts: int, in_shared: bool, slots: int = SLOTS):
    """The compiled kernel for G ranks and E experts (one per shape, memory and slot count,
    made on the first request; numba compiles it at its first launch)."""
    key = (int(num_ranks), int(num_experts), bool(in_shared), int(slots))
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
    multiple of 32, at most 1024; 1 for tests; the sm_90 kernel takes 192-238 registers per
    thread, so the GPU may refuse launches of more than 256; a candidate's search evaluates
    min(threads, SLOTS) amounts per round, `search_slots`); memory: where a block keeps its
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
        self.search_slots = min(self.threads, SLOTS)  # a search's amounts per round
        self.kernel = kernel(num_ranks, num_experts, self.memory == "shared", self.search_slots)
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
