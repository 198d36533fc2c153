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
Floating point: every value that decides a choice is float64, in the CPU kernel's order: the
scalar rules (rank times, pairing test, candidate, pool, amount, applying a move) are
parallel.py's own functions compiled again as device functions (`numba_cuda.device`,
probe.planner.scalar), and the products that feed a sum are rounded on their own (`mul`, never
an FMA). The host side (validation, launch inputs, torch views) and the block's first and last
steps are probe.planner.cuda_common's.

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

from probe.planner import greedy, parallel
from probe.planner.cost import CostModel
from probe.planner.cuda_common import (
    STATUS_ERRORS,
    LayerPlanner,
    array_inputs,
    host_plans,
    is_torch,
    mark_unused,
    start_layer,
)
from probe.planner.numba_cuda import cuda, device, dmax
from probe.planner.parallel_ref import ParallelRules, checked_rules

__all__ = ["MAX_RANKS", "STATUS_ERRORS", "THREADS", "CudaParallel", "CudaParallelPlan",
           "parallel_cuda_arrays"]

# Most ranks a layer may have (shared rank arrays and each thread's pool are this long).
MAX_RANKS = 256
MAX_PAIRS = MAX_RANKS // 2
MAX_CUTS = MAX_RANKS + 1  # a module constant: shared arrays need a size known when compiling
# Threads per block (one block per layer) unless the caller picks another multiple of 32.
THREADS = 128
# "No gaining candidate yet" (larger than any index).
_NONE = 1 << 40
# Slots of the block's shared integer scalars.
_ROUNDS, _MOVES, _NREP, _NBLK, _NPAIRS, _KMAX, _STOP, _APPLIED, _NNEW, _BAD = range(10)
_THRESHOLD = 0

# The CPU kernel's scalar rules as device functions: the same Python functions (parallel.py,
# and greedy.py's static split), compiled again (probe.planner.scalar), so that every value
# that decides a choice is the CPU kernel's float.
_static_share = device(greedy._static_share, inline=True)
_held_expert = device(parallel._held_expert, inline=True)
_rank_compute = device(parallel._rank_compute)
_hot_threshold = device(parallel._hot_threshold)
_link_time = device(parallel._link_time)
_can_pair = device(parallel._can_pair)
_candidate = device(parallel._candidate)
_pool = device(parallel._pool)
_takes = device(parallel._takes)
_admit = device(parallel._admit)
_static_column = device(parallel._static_column)
_apply_pair = device(parallel._apply_pair)


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
    pair_src = cuda.shared.array(MAX_PAIRS, int64)
    pair_dst = cuda.shared.array(MAX_PAIRS, int64)
    best = cuda.shared.array(MAX_PAIRS, int64)
    new_blk = cuda.shared.array(MAX_PAIRS, int64)
    num_cand = cuda.shared.array(MAX_RANKS, int32)
    ints = cuda.shared.array(16, int64)
    flts = cuda.shared.array(4, float64)
    pool_s = cuda.local.array(MAX_RANKS, int64)
    pool_n = cuda.local.array(MAX_RANKS, int64)
    cum = cuda.local.array(MAX_CUTS, int64)
    pre = cuda.local.array((4, MAX_CUTS), float64)

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
    start_layer(tid, nt, ld, hm, win, hc, hl, hp, hd, tk, bo, ints, _BAD)
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
            comp[g] = _rank_compute(g, alpha, beta, rnh, rh, ro, used, tk)
            t_in[g] = _link_time(g, fl, tt, True)
            t_out[g] = _link_time(g, fl, tt, False)
            times[g] = comp[g] + 2.0 * dmax(t_in[g], t_out[g])
            taken[g] = 0
        cuda.syncthreads()
        if tid == 0:
            flts[_THRESHOLD] = _hot_threshold(times[:num_ranks], hot_fraction)
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
                and _can_pair(src, dst, slots, win, beta, epsilon, xt, hc, hl, rnh, rh, ro, tk,
                              hd, comp, t_in, times, recv, send, used)) else 0
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
                _takes(x, npool, pool_s, pool_n, mps[p], mt[p])
        cuda.syncthreads()
        # 7. Admit the moves in pair order (thread 0), start new blocks, apply (per pair).
        if tid == 0:
            for p in range(num_pairs):
                if mn[p] == 0:
                    continue
                e = me[p]
                admitted, n_rep = _admit(pair_dst[p], e, mh[p], xt, win, ro, used, hd, rp,
                                         ints[_NREP], recv, send)
                if not admitted:
                    mn[p] = 0
                    continue
                ints[_NREP] = n_rep
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
            _static_column(b, be[b], item % num_ranks, ld, hm, hp, hc, hl, ba)
        cuda.syncthreads()
        for p in range(tid, num_pairs, nt):
            if mn[p] > 0:
                src = pair_src[p]
                dst = pair_dst[p]
                e = me[p]
                _apply_pair(bo[e], e, src, dst, mx[p], mn[p], mps[p], mt[p], ba, fl, tk)
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
    mark_unused(tid, nt, n_rep, n_blk, rp, be)
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


class CudaParallel(LayerPlanner):
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
        super().__init__(home, slots, cost, num_layers=num_layers, threads=threads,
                         max_ranks=MAX_RANKS, name="parallel_cuda")
        L, (G, E) = self.num_layers, self.shape  # noqa: N806 (the shape letters)
        limit = self.rules.rounds_limit
        max_slots = max(int(np.minimum(self.slots, E).max(initial=0)), 1)
        total_slots = max(int(np.minimum(self.slots, E).sum()), 1)
        cap_blk = max(min(E, limit * max(G // 2, 1)), 1)
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

    def plan(self, load, window, stream=None) -> CudaParallelPlan:
        """Plan L layers: load int64 [L, S, E], window float64 [L, G] (seconds), device arrays
        (torch CUDA tensors are taken without a copy). Launches on `stream` (torch's current
        stream for torch tensors, else the default stream) and returns the preallocated
        buffers (torch tensors for torch inputs) without synchronising; negative loads and
        negative or NaN windows are reported per layer in `status`."""
        load_d, window_d, stream = self.launch_inputs(load, window, stream)
        alpha, beta, limit, epsilon, hot = self._scalars
        _parallel_kernel[self.num_layers, self.threads, stream](
            load_d, self._home, self._slots, window_d, alpha, beta, self._tt, self._xt, limit,
            epsilon, hot, *self.scratch, *self.out)
        return self.torch_out() if is_torch(load) else self.out


def parallel_cuda_arrays(load, home, slots, window, alpha, beta, token_time, transfer_time,
                         rules: ParallelRules | None = None, *, threads: int = THREADS) -> list:
    """`parallel.parallel_arrays` for L layers at once on the GPU, numpy in and out (copies both
    ways; for tests). load int64 [L, S, E]; home bool [L, G, E] or [G, E]; window float64
    [L, G]; one cost model and slot budget for every layer. Returns one tuple per layer:
    (replicas, blk_expert, blk_assign, rounds, moves, makespan), parallel_arrays' outputs."""
    load, num_layers, cost = array_inputs(load, alpha, beta, token_time, transfer_time)
    runner = CudaParallel(home, slots, cost, rules, num_layers=num_layers, threads=threads)
    host = host_plans(runner, load, window)
    return [(host.replicas[i, :host.num_replicas[i]], host.blk_expert[i, :host.num_blocks[i]],
             host.blk_assign[i, :host.num_blocks[i]], int(host.num_rounds[i]),
             int(host.num_moves[i]), float(host.objective[i]))
            for i in range(num_layers)]
