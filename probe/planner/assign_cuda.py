"""Dispatch-time assignment on the GPU: `probe.planner.assign`'s water-filling in numba.cuda.

The same candidates, the same arithmetic in the same order as the host kernel `assign._best`
(DeepSeek's even split, then the water-filling descents from each start, rounded by largest
remainder and routed locality-first; the lowest eq. 8 wins, the first on ties), so the
assignment is identical to `assign_tokens(load, copies, cost, passes=passes, home=home)`,
integer for integer. One block (THREADS threads) runs one layer and several layers go in one
launch. The work of a layer is spread over the block, phase by phase (a barrier between):

1. parallel over experts: totals, holders and each expert's holder list (its ranks in
   order), the multi-holder experts heaviest first, and every start's x;
2. parallel over ranks: the single-holder levels `fixed`, summed in numpy's pairwise order
   (`_np_sum`), so they are the same floats as `assign._fixed_levels`;
3. the descents (3 starts, or 5 with a home, of which 2 or 3 descend): each a sequential
   coordinate descent over the experts, as on the host, run by one thread of its own warp,
   side by side; the loops over an expert's holders run over its holder list (O(holders),
   not O(ranks)), in rank order, so every sum is the host's;
4. parallel over (candidate, expert): the largest-remainder rounding and the even split; then
   the locality-first routing, whose flows are whole tokens added atomically (integers: the
   order does not matter);
5. parallel over (candidate, rank): each rank's eq. 8 time, its sums over experts and sources
   in the host's order; a candidate's objective is the max over ranks (order-free);
6. the best candidate (the even split first, then the starts in order, strict <) is written
   into the dense [S, E, G] assignment in parallel over experts.

Floating point: every value that decides a choice is float64 and computed with the host's
operations in the host's order; every product that feeds a sum is rounded on its own
(libdevice's dmul_rn), since the CUDA compiler would otherwise fuse a * b + c into one FMA,
which rounds once, and a last-bit difference can flip a tie. Under the simulator a plain
multiply is the same thing.

`DeviceAssigner` is the host side: built once per cost model and shape (it checks shapes and
dtypes on the first call of each shape, allocates the output and scratch buffers once, and
reuses them), it takes device arrays or torch CUDA tensors (through
`__cuda_array_interface__`, no copy) and launches on the caller's torch stream via
`numba.cuda.external_stream`, so a call can be captured in a CUDA graph. It does not look at
the values on the device (that would synchronise): an expert with tokens and no copy sets the
layer's `status` to 1 (the host kernel raises ValueError there) and its tokens are dropped.
Under the simulator (NUMBA_ENABLE_CUDASIM=1) it takes numpy arrays.

Use (on a GPU, or with NUMBA_ENABLE_CUDASIM=1 set before Numba is first imported):

    assigner = DeviceAssigner(cost, num_experts=E, num_layers=L)   # once
    out, objective, status = assigner(load, copies)   # [L, S, E] and [L, G, E], every step

experiments/planner/gpu_assign.py checks it against the host kernel and times it.
"""

from __future__ import annotations

import math

import numpy as np
from numba import config, float64, int64

from probe.planner.assign import remote_cost
from probe.planner.cost import CostModel
from probe.planner.numba_cuda import cuda, dmax, dmin, mul

__all__ = ["THREADS", "DeviceAssigner"]

# Threads per block (one block per layer), a multiple of the warp: 256 gives each descent its
# own warp and spreads the per-expert and per-rank phases.
THREADS = 256
# numpy's pairwise summation: blocks of up to 128 values, 8 partial sums each; the depth of
# `_np_sum`'s stack.
_PW_BLOCK = 128
_PW_DEPTH = 24


# --- numpy's float64 sum, in numpy's order -----------------------------------------------------

@cuda.jit(device=True)
def _np_block(a, lo, n):  # pragma: no cover - device code
    """numpy's pairwise_sum of a[lo:lo + n] for n <= 128: sequential below 8, else 8
    running sums combined as a tree, then the rest."""
    if n < 8:
        res = 0.0
        for i in range(n):
            res += a[lo + i]
        return res
    r0 = a[lo]
    r1 = a[lo + 1]
    r2 = a[lo + 2]
    r3 = a[lo + 3]
    r4 = a[lo + 4]
    r5 = a[lo + 5]
    r6 = a[lo + 6]
    r7 = a[lo + 7]
    i = 8
    while i < n - (n % 8):
        r0 += a[lo + i]
        r1 += a[lo + i + 1]
        r2 += a[lo + i + 2]
        r3 += a[lo + i + 3]
        r4 += a[lo + i + 4]
        r5 += a[lo + i + 5]
        r6 += a[lo + i + 6]
        r7 += a[lo + i + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += a[lo + i]
        i += 1
    return res


@cuda.jit(device=True)
def _np_sum(a, lo, n):  # pragma: no cover - device code
    """numpy's pairwise_sum of a[lo:lo + n]: above 128 values, the sum of the first half (n / 2
    rounded down to a multiple of 8) plus the sum of the rest, recursively. Device functions
    cannot recurse, so the recursion runs on a small stack (depth log2(n / 128) + 1): each
    entry a segment, its state (0: split it, 1: its left half is being summed, 2: its right
    half is) and its left half's sum."""
    seg_lo = cuda.local.array(_PW_DEPTH, int64)
    seg_n = cuda.local.array(_PW_DEPTH, int64)
    state = cuda.local.array(_PW_DEPTH, int64)
    left = cuda.local.array(_PW_DEPTH, float64)
    top = 0
    seg_lo[0] = lo
    seg_n[0] = n
    state[0] = 0
    while True:
        if seg_n[top] > _PW_BLOCK and state[top] == 0:  # descend into the left half
            half = seg_n[top] // 2
            half -= half % 8
            state[top] = 1
            seg_lo[top + 1] = seg_lo[top]
            seg_n[top + 1] = half
            state[top + 1] = 0
            top += 1
            continue
        value = _np_block(a, seg_lo[top], seg_n[top])
        top -= 1
        while top >= 0 and state[top] == 2:  # both halves done: left + right
            value = left[top] + value
            top -= 1
        if top < 0:
            return value
        left[top] = value  # the left half is done: the right half next
        state[top] = 2
        half = seg_n[top] // 2
        half -= half % 8
        seg_lo[top + 1] = seg_lo[top] + half
        seg_n[top + 1] = seg_n[top] - half
        state[top + 1] = 0
        top += 1


# The stack of _np_sum holds 24 segments: exact for up to 128 * 2**23 values.
MAX_EXPERTS = 1 << 20


# --- the host kernel's pieces as device functions (same operations, same order) ---------------



@cuda.jit(device=True)
def _level_of(x, local, alpha, beta, hop):  # pragma: no cover - device code
    return alpha + mul(beta, x) + mul(hop, dmax(x - local, 0.0))


@cuda.jit(device=True)
def _tokens_at(w, a, b, local, beta, denom):  # pragma: no cover - device code
    """assign._tokens_at with denom = beta + hop (the same float as the host's)."""
    if w <= a:
        return 0.0
    if w <= b:
        return (w - a) / beta
    return local + (w - b) / denom


@cuda.jit(device=True)
def _waterfill(fixed, order, num_order, hlist, nhold, total, load, hop, alpha, beta, passes,
               x, level, srt, hv):  # pragma: no cover - device code
    """assign._waterfill on x [E, G], which holds the start on entry and the split on exit.
    The loops over the ranks holding e run over its holder list hlist[e, :nhold[e]] (rank
    order, as the host's `if holds[g, e]` skips the others), so the sums are the host's.
    Once e is taken out, the values the host recomputes per holder h (level + alpha, the
    level where its own tokens run out, its own tokens, beta + hop) sit in hv [4, G]: the
    same floats, read from one place."""
    num_ranks = level.shape[0]
    for g in range(num_ranks):
        level[g] = fixed[g]
    for i in range(num_order):
        e = order[i]
        for j in range(nhold[e]):
            g = hlist[e, j]
            if x[e, g] > 0:
                level[g] += _level_of(x[e, g], load[g, e], alpha, beta, hop[g])
    for _ in range(passes):
        moved = 0.0
        for i in range(num_order):
            e = order[i]
            nh = nhold[e]
            m = 0
            for h in range(nh):
                g = hlist[e, h]
                local = float64(load[g, e])
                if x[e, g] > 0:
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
        if moved < 1e-9:
            break


@cuda.jit(device=True)
def _quota_expert(e, x, hlist, nhold, total, quota, rem, cand):  # pragma: no cover
    """assign._quotas for expert e: row e of quota int64 [E, G] (zeroed here)."""
    num_ranks = quota.shape[1]
    for g in range(num_ranks):
        quota[e, g] = 0
    tot = total[e]
    if tot == 0:
        return
    m = 0
    base = 0
    for h in range(nhold[e]):
        g = hlist[e, h]
        if x[e, g] > 0:
            f = math.floor(x[e, g] + 1e-9)
            quota[e, g] = dmin(f, tot)
            rem[g] = x[e, g] - f
            base += quota[e, g]
            j = m
            while j > 0 and rem[cand[j - 1]] < rem[g]:
                cand[j] = cand[j - 1]
                j -= 1
            cand[j] = g
            m += 1
    if m == 0:
        if nhold[e] > 0:
            quota[e, hlist[e, 0]] = tot
        return
    short = tot - base
    k = 0
    while short > 0:
        quota[e, cand[k % m]] += 1
        short -= 1
        k += 1
    k = m - 1
    while short < 0:
        g = cand[k]
        if quota[e, g] > 0:
            quota[e, g] -= 1
            short += 1
        k = k - 1 if k > 0 else m - 1


@cuda.jit(device=True)
def _route_expert(e, quota, load, token_time, left, hold, flow, out,
                  write):  # pragma: no cover - device code
    """assign._route for expert e: adds to flow int64 [S, G] atomically (when not `write`;
    integer adds, so the order of the experts does not matter) or writes out [S, E, G] (when
    `write`). Returns False when tokens found no holder (invalid input)."""
    num_sources = load.shape[0]
    num_ranks = quota.shape[1]
    m = 0
    for g in range(num_ranks):
        left[g] = quota[e, g]
        if left[g] > 0:
            hold[m] = g
            m += 1
    for s in range(num_sources):
        k = dmin(load[s, e], left[s])
        if k > 0:
            left[s] -= k
            if write:
                out[s, e, s] += k
            else:
                cuda.atomic.add(flow, (s, s), k)
    for s in range(num_sources):
        rest = load[s, e] - dmin(load[s, e], quota[e, s])
        while rest > 0:
            best = -1
            for i in range(m):
                g = hold[i]
                if left[g] > 0 and (best < 0 or token_time[s, g] < token_time[s, best]):
                    best = g
            if best < 0:
                return False
            k = dmin(rest, left[best])
            left[best] -= k
            rest -= k
            if write:
                out[s, e, best] += k
            else:
                cuda.atomic.add(flow, (s, best), k)
    return True


@cuda.jit(device=True)
def _even_expert(e, load, copies, hold, tokens, flow, out, write):  # pragma: no cover
    """assign._even for expert e: row e of tokens [E, G] (zeroed here) and atomic adds to
    flow int64 [S, G], or writes out [S, E, G] when `write`."""
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
        return
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
                    cuda.atomic.add(flow, (s, g), got)


@cuda.jit(device=True)
def _rank_time(g, tokens, flow, token_time, alpha, beta):  # pragma: no cover - device code
    """Rank g's term of assign._objective: comp[g] + 2 max(t_in, t_out), each sum in the
    host's order (experts, then sources, ascending); flow int64 [S, G] holds whole tokens,
    which float64 represents exactly, as the host's float flow."""
    num_experts = tokens.shape[0]
    comp = 0.0
    for e in range(num_experts):
        if tokens[e, g] > 0:
            comp += alpha + mul(beta, tokens[e, g])
    t_in = 0.0
    t_out = 0.0
    for s in range(flow.shape[0]):
        if s != g:
            t_in += mul(float64(flow[s, g]), token_time[s, g])
            t_out += mul(float64(flow[g, s]), token_time[g, s])
    return comp + mul(2.0, dmax(t_in, t_out))


# --- the kernel: one block per layer -----------------------------------------------------------

@cuda.jit
def _assign_kernel(load_all, copies_all, home_all, use_home, token_time, hop, alpha, beta,
                   passes, total_all, holds_all, nhold_all, hlist_all, order_all, norder_all,
                   fixed_all, terms_all, x_all, quota_all, flow_all, level_all, srt_all,
                   hv_all, part_all, obj_all, rem_all, cand_all, left_all, hold_all, out_all,
                   objective_all, status_all):  # pragma: no cover - device code
    layer = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    nthreads = cuda.blockDim.x
    load = load_all[layer]
    copies = copies_all[layer]
    total = total_all[layer]
    holds = holds_all[layer]
    nhold = nhold_all[layer]
    hlist = hlist_all[layer]
    order = order_all[layer]
    fixed = fixed_all[layer]
    num_sources, num_experts = load.shape
    num_ranks = copies.shape[0]
    num_starts = 5 if use_home else 3
    num_cand = num_starts + 1  # the starts, then DeepSeek's even split
    even = num_starts
    # Per-thread scratch.
    rem = rem_all[layer, tid]
    cand = cand_all[layer, tid]
    left = left_all[layer, tid]
    hold = hold_all[layer, tid]

    # 1. Totals, holders and holder lists (parallel over experts), the layer's error flag.
    if tid == 0:
        status_all[layer] = 0
    for e in range(tid, num_experts, nthreads):
        tot = 0
        for s in range(num_sources):
            tot += load[s, e]
        total[e] = tot
        n = 0
        for g in range(num_ranks):
            holds[g, e] = copies[g, e] > 0
            if holds[g, e]:
                hlist[e, n] = g
                n += 1
        nhold[e] = n
    cuda.syncthreads()
    # 2. Multi-holder experts heaviest first (stable: a rank count per expert), their number;
    # the starts x (every candidate, parallel over experts).
    for e in range(tid, num_experts, nthreads):
        multi = nhold[e] > 1 and total[e] > 0
        if multi:
            pos = 0
            for f in range(num_experts):
                if nhold[f] > 1 and total[f] > 0 and (
                        total[f] > total[e] or (total[f] == total[e] and f < e)):
                    pos += 1
            order[pos] = e
        if total[e] > 0 and nhold[e] == 0:
            status_all[layer] = 1
        for k in range(num_starts):
            x = x_all[layer, k]
            for g in range(num_ranks):
                x[e, g] = 0.0
            if multi and k > 0:
                # 1-2: even over the copies; 3-4: over the home holders (all when none).
                count = 0
                if k >= 3:
                    for h in range(nhold[e]):
                        if home_all[layer, hlist[e, h], e]:
                            count += 1
                at_home = count > 0
                if not at_home:
                    count = nhold[e]
                for h in range(nhold[e]):
                    g = hlist[e, h]
                    share = 0.0
                    if not at_home or home_all[layer, g, e]:
                        share = 1.0
                    x[e, g] = float64(total[e]) * share / float64(count)
    if tid == 0:
        count = 0
        for e in range(num_experts):
            if nhold[e] > 1 and total[e] > 0:
                count += 1
        norder_all[layer] = count
    # 3. fixed[g]: the single-holder experts' levels, summed as numpy sums them.
    for g in range(tid, num_ranks, nthreads):
        terms = terms_all[layer, g]
        n = 0
        for e in range(num_experts):
            if nhold[e] == 1 and total[e] > 0:
                tokens = float64(total[e])
                value = 0.0
                if holds[g, e]:
                    value = (alpha + mul(beta, tokens)) + mul(hop[g], tokens - load[g, e])
                terms[n] = value
                n += 1
        fixed[g] = _np_sum(terms, 0, n)
    # flow of every candidate to zero (the routes add to it atomically).
    for i in range(tid, num_cand * num_sources * num_ranks, nthreads):
        flow_all[layer, i // (num_sources * num_ranks), (i // num_ranks) % num_sources,
                 i % num_ranks] = 0
    cuda.syncthreads()
    num_order = norder_all[layer]

    # 4. The descents (starts 0, 2, 4; starts 1 and 3 are taken as they are): each on the
    # first thread of its own warp (warp w descends start 2w), side by side.
    if tid % 32 == 0:
        for k in range(2 * (tid // 32), num_starts, 2 * (nthreads // 32)):
            _waterfill(fixed, order, num_order, hlist, nhold, total, load, hop, alpha, beta,
                       passes, x_all[layer, k], level_all[layer, k], srt_all[layer, k],
                       hv_all[layer, k])
    cuda.syncthreads()
    # 5. Rounding (the starts) and DeepSeek's even split: parallel over (candidate, expert).
    for i in range(tid, num_cand * num_experts, nthreads):
        k = i // num_experts
        e = i % num_experts
        if k == even:
            _even_expert(e, load, copies, hold, quota_all[layer, k], flow_all[layer, k],
                         out_all[layer], False)
        else:
            _quota_expert(e, x_all[layer, k], hlist, nhold, total, quota_all[layer, k], rem,
                          cand)
    cuda.syncthreads()
    # 6. Routing of the starts' quotas: parallel over (start, expert), integer flows.
    for i in range(tid, num_starts * num_experts, nthreads):
        k = i // num_experts
        e = i % num_experts
        if not _route_expert(e, quota_all[layer, k], load, token_time, left, hold,
                             flow_all[layer, k], out_all[layer], False):
            status_all[layer] = 1
    cuda.syncthreads()
    # 7. eq. 8: every rank's time (parallel over (candidate, rank)), then each candidate's
    # largest (a max: any order gives the same float).
    for i in range(tid, num_cand * num_ranks, nthreads):
        k = i // num_ranks
        g = i % num_ranks
        part_all[layer, k, g] = _rank_time(g, quota_all[layer, k], flow_all[layer, k],
                                           token_time, alpha, beta)
    cuda.syncthreads()
    if tid < num_cand:
        worst = 0.0
        for g in range(num_ranks):
            worst = dmax(worst, part_all[layer, tid, g])
        obj_all[layer, tid] = worst
    out = out_all[layer]
    for i in range(tid, num_sources * num_experts * num_ranks, nthreads):
        out[i // (num_experts * num_ranks), (i // num_ranks) % num_experts, i % num_ranks] = 0
    cuda.syncthreads()
    # 8. The best candidate (the even split first, then the starts in order; strict <), and
    # its dense assignment, expert by expert.
    best = even
    best_obj = obj_all[layer, even]
    for k in range(num_starts):
        if obj_all[layer, k] < best_obj:
            best_obj = obj_all[layer, k]
            best = k
    if tid == 0:
        objective_all[layer] = best_obj
    quota = quota_all[layer, best]
    for e in range(tid, num_experts, nthreads):
        if best == even:
            _even_expert(e, load, copies, hold, quota, flow_all[layer, best], out, True)
        else:
            _route_expert(e, quota, load, token_time, left, hold, flow_all[layer, best], out,
                          True)


# --- host side ---------------------------------------------------------------------------------

def _is_torch(value) -> bool:
    return type(value).__module__.startswith("torch")


class DeviceAssigner:
    """`assign_tokens` for L layers at once on the GPU (module docstring).

    cost: the CostModel (alpha, beta, token_time of eq. 8), fixed for the assigner's life.
    num_experts, num_layers: the shape of every call (load [L, S, E], copies [L, G, E]).
    passes: water-filling rounds (>= 1), as in `assign_tokens`.
    with_home: calls pass `home` [L, G, E] (the base layout) and the home-only starts are
        tried too, as `assign_tokens(..., home=...)`.
    """

    def __init__(self, cost: CostModel, num_experts: int, num_layers: int, *, passes: int = 8,
                 with_home: bool = False) -> None:
        if not isinstance(cost, CostModel):
            raise TypeError(f"cost must be a CostModel, got {type(cost).__name__}")
        for name, value, low in (("num_experts", num_experts, 1), ("num_layers", num_layers, 1),
                                 ("passes", passes, 1)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if num_experts > MAX_EXPERTS:
            raise ValueError(f"num_experts must be <= {MAX_EXPERTS}, got {num_experts}")
        if not cost.beta > 0:
            raise ValueError(f"cost.beta must be > 0 to split tokens, got {cost.beta!r}")
        if not isinstance(with_home, bool):
            raise TypeError(f"with_home must be a bool, got {with_home!r}")
        self.cost = cost
        self.num_ranks = cost.num_ranks
        self.num_experts = int(num_experts)
        self.num_layers = int(num_layers)
        self.passes = int(passes)
        self.with_home = with_home
        self._num_cand = 6 if with_home else 4  # the starts and the even split
        self._checked: set = set()
        self._buffers: dict = {}

    def _check(self, name: str, value, shape: tuple, kinds: str) -> None:
        """Shape and dtype of one input, checked on the first call with its shape and dtype."""
        if not hasattr(value, "shape") or not hasattr(value, "dtype"):
            raise TypeError(f"{name} must be a CUDA array (torch CUDA tensor or numba device "
                            f"array), got {type(value).__name__}")
        key = (name, tuple(value.shape), str(value.dtype))
        if key in self._checked:
            return
        if tuple(value.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(value.shape)}")
        kind = np.dtype(str(value.dtype).replace("torch.", "")).kind
        if kind not in kinds:
            raise TypeError(f"{name} must have an integer{' or bool' if 'b' in kinds else ''} "
                            f"dtype, got {value.dtype}")
        self._checked.add(key)

    @staticmethod
    def _device(value):
        """A kernel argument: CUDA arrays by __cuda_array_interface__ (no copy); numpy arrays
        only under the simulator."""
        if config.ENABLE_CUDASIM:
            if isinstance(value, np.ndarray) or hasattr(value, "copy_to_host"):
                return value
        elif hasattr(value, "__cuda_array_interface__"):
            # sync=False: no wait on the producer's stream (the launch is on that stream
            # already, and a synchronisation would break a CUDA graph capture).
            return cuda.from_cuda_array_interface(value.__cuda_array_interface__, owner=value,
                                                  sync=False)
        raise TypeError(f"expected a CUDA array (torch CUDA tensor or numba device array), got "
                        f"{type(value).__name__}")

    def _alloc(self, torch_device):
        """(outputs, scratch, constants) for outputs as torch tensors on `torch_device` or
        (None) numba device arrays; allocated on the first call of each kind, then reused."""
        key = str(torch_device)
        if key in self._buffers:
            return self._buffers[key]
        L, E, G = self.num_layers, self.num_experts, self.num_ranks
        S, C, T = G, self._num_cand, THREADS
        if torch_device is not None:
            import torch

            def new(shape, dtype):
                return torch.zeros(shape, dtype=getattr(torch, np.dtype(dtype).name),
                                   device=torch_device)
        else:
            def new(shape, dtype):
                return cuda.to_device(np.zeros(shape, dtype))
        f64, i64 = np.float64, np.int64
        outs = (new((L, S, E, G), i64), new(L, f64), new(L, np.int32))
        # In the kernel's argument order: total, holds, nhold, hlist, order, norder, fixed,
        # terms; per candidate x, quota, flow, level, srt, hv, part, obj; per thread rem, cand,
        # left, hold.
        scratch = (new((L, E), i64), new((L, G, E), np.bool_), new((L, E), i64),
                   new((L, E, G), i64), new((L, E), i64), new(L, i64), new((L, G), f64),
                   new((L, G, E), f64),
                   new((L, C, E, G), f64), new((L, C, E, G), i64), new((L, C, S, G), i64),
                   new((L, C, G), f64), new((L, C, 2 * G), f64), new((L, C, 4, G), f64),
                   new((L, C, G), f64), new((L, C), f64),
                   new((L, T, G), f64), new((L, T, G), i64), new((L, T, G), i64),
                   new((L, T, G), i64))
        consts = (cuda.to_device(np.ascontiguousarray(self.cost.token_time, f64)),
                  cuda.to_device(np.ascontiguousarray(remote_cost(self.cost), f64)))
        self._buffers[key] = (outs, [self._device(v) for v in (*scratch, *outs)], consts)
        return self._buffers[key]

    def __call__(self, load, copies, home=None):
        """(assignment int64 [L, S, E, G], objective float64 [L] (eq. 8 of each layer's
        assignment), status int32 [L] (0 ok, 1 an expert had tokens but no copy)): torch
        tensors when `load` is a torch tensor, else device arrays. load int [L, S, E],
        copies int [L, G, E], home int or bool [L, G, E] (only with with_home). The outputs
        are the assigner's own buffers, overwritten by the next call."""
        L, E, G = self.num_layers, self.num_experts, self.num_ranks
        self._check("load", load, (L, G, E), "iu")
        self._check("copies", copies, (L, G, E), "iu")
        if self.with_home:
            if home is None:
                raise ValueError("home is required: the assigner was built with_home=True")
            self._check("home", home, (L, G, E), "iub")
        elif home is not None:
            raise ValueError("home given but the assigner was built with_home=False")
        torch_device = load.device if _is_torch(load) else None
        outs, views, consts = self._alloc(torch_device)
        inputs = [self._device(v) for v in (load, copies, copies if home is None else home)]
        if torch_device is not None:
            import torch

            stream = cuda.external_stream(torch.cuda.current_stream(torch_device).cuda_stream)
        else:
            stream = 0
        _assign_kernel[L, THREADS, stream](
            *inputs, self.with_home, *consts, float(self.cost.alpha), float(self.cost.beta),
            self.passes, *views)
        return outs
