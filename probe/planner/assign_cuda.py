"""Dispatch-time assignment on the GPU: `probe.planner.assign`'s water-filling in numba.cuda.

The same candidates, the same arithmetic in the same order as the host kernel `assign._best`
(DeepSeek's even split, then the water-filling descents from each start, rounded by largest
remainder and routed locality-first, each also after the exchange step; the lowest eq. 8
wins, the first on ties), so the assignment is identical to
`assign_tokens(load, copies, cost, passes=passes, home=home, moves=moves)`,
integer for integer. One block (THREADS threads) runs one layer and several layers go in one
launch. The work of a layer is spread over the block, phase by phase (a barrier between):

1. parallel over experts: totals, holders and each expert's holder list (its ranks in
   order), the multi-holder experts heaviest first, and every start's x;
2. parallel over ranks: the single-holder levels `fixed`;
3. the descents (4 starts, or 6 with a home, of which 3 or 4 descend: the last, the
   locality start, with its pinned experts kept, `assign._starts`), by one of two
   schedules (SCHEDULES; the same floats, so the same assignment):
   - "waves" (the default): each pass refills the multi-copy experts wave by wave, every
     (descending start, expert) of a wave on its own thread, a barrier between waves. An
     expert's wave is one more than the largest wave of the experts before it in the
     descent's order (heaviest first) that share a rank with it, so the experts of a wave
     share no rank and every rank sees its experts refilled in the host's order
     (`assign._refill` touches only its expert's row of x and its holders' levels);
   - "serial": each descent a sequential coordinate descent over the experts, as on the
     host, run by one thread of its own warp, side by side;
4. parallel over (candidate, expert): the largest-remainder rounding and the even split; then
   the locality-first routing, whose flows are whole tokens added atomically (integers: the
   order does not matter);
5. parallel over (candidate, rank): each rank's eq. 8 time; a candidate's objective is the
   max over ranks (order-free);
6. the exchange step (`assign._exchange`, up to `moves` moves or swaps) from every start's
   candidate, each on the first thread of its own warp, side by side, on copies of the
   starts' quotas and flows in extra slots, which are then scored as in 5 (the step keeps
   their flows the routing of their quotas);
7. the best candidate (the even split first, then each start before and after its exchange
   step, strict <) is written into the dense [S, E, G] assignment in parallel over experts.

Critical path of one layer (one block of 256 threads; counts from the decode layers of
experiments/planner/gpu_assign.py, true loads on EPLB layouts, and from
experiments/planner/assign_level.py). Both schedules share everything but step 3:

- the exchange step: serial within a start (the starts side by side), up to `moves`
  (`assign.default_moves(G)`: 20 at ep=8, one per rank, 64, at ep=64) moves, each a scan of
  the slowest rank's experts (and, when its out-traffic binds on links of unequal cost, of
  the experts it sends tokens of) with the exact looks at the candidate moves that pass a
  bound (each one expert's routing, O(S x holders), and O(G)), then the traffic of the ranks
  the move touched again (S steps each); where no single move helps, the swaps between the
  slowest rank and each partner (two experts routed again per exact look, before and after);
  4 more barriers. On the host (all starts one after another) it adds about 1.2x the rest of
  the deciding kernel at ep=8 and 2-3x at ep=64 with 20 moves and no swaps
  (results/assign_speed.md has the present figures); on the GPU it is one more serial
  stretch (one ep=8 layer, replayed as a graph on an H100: 2,286 us with the 20-move step
  before the swaps, 346 us with `moves=0`, which leaves it out; results/h100 run 5). The swaps
  and the 64 moves at ep=64 lengthen that stretch (not yet timed on a GPU). Not done: the
  exact looks of a move spread over the block (each on its own thread, then the host's
  pruned scan replayed on one thread over their results, which keeps the choice bit for
  bit).
- barriers: 6 outside the descents and the exchange step. "serial" adds 1. "waves" adds 1,
  then (waves + 1) `syncthreads_or` to number the waves, then per pass one barrier per
  wave and three `syncthreads_or` (the host's early stop of each descending start, which
  these layers never reach: all 8 passes run): with 3 waves (+1 slot per rank) to 8 (+3; medians, at
  most 11) at both ep=8 / E=128 and ep=64 / E=256, about 8 x (3 + 3) + 11 = 60 to
  8 x (8 + 3) + 16 = 110 barriers in all.
- serial steps outside the descents, per thread: the loops over all experts (an expert's
  place in the heaviest-first order, a rank's single-copy level, a rank's eq. 8 time) are
  E = 128 / 256 long, over a rank's sources S = 8 / 64, and zeroing the dense output
  S E G / 256 = 32 stores at ep=8 but 4,096 at ep=64 (8 MiB from one block); about 600
  steps at ep=8 and 6,000 at ep=64, mostly independent loads and stores.
- the descents, the long dependent chain: a refill of an expert with n holders is
  O(n^2) dependent float steps (the insertion sort of its 2n breakpoints and the scan for
  the water level; about 4 n^2 + 4 n). "serial" runs passes x (the sum over the M
  multi-copy experts), "waves" passes x (the sum over the waves of the largest refill in
  the wave). Per pass, on the decode layers: ep=8, +1 slot per rank: M = 6, 3 waves,
  about 190 against 100 steps; +3: M = 14, 8 waves, 550 against 410; ep=64, +1: M = 30,
  3 waves, 2,080 against 760; +3: M = 70, 8 waves, 8,500 against 3,800. The refill count
  drops 2x at ep=8 and 9-10x at ep=64, the dependent steps 1.3-1.9x and 2.2-2.9x: the
  refill of the most replicated expert (up to 28 holders at ep=64: some 3,200 steps) is on
  both critical paths, and at ep=64 it is most of the "waves" one. Every step reads and
  writes global memory (levels, x, the breakpoints): the serial kernel's H200 one-layer
  times (350-570 us at ep=8, 5.7-11 ms at ep=64) come to 130-340 ns per dependent step of
  its descents, so "waves" should take roughly 0.5-0.75x of them at ep=8 and 0.35-0.45x
  at ep=64, plus its extra barriers (an expectation from these counts, not a measurement).
  What would shorten it further: the refill itself split over its holders (the 2n
  breakpoints ranked and the n-holder sum at each breakpoint computed side by side, each
  sum still in one thread: O(n) steps), and the scratch in shared memory.

Why the integers agree bit for bit with the host kernel's:

- One source. Every piece of arithmetic that decides a choice is a rule of `assign`
  (`_holder_lists_of`, `_fixed_level`, `_descend` or its parts `_level_at` and `_refill`,
  `_quotas_of`, `_routes_of`, `_evens_of`, `_rank_time`, `_exchange`, and `_level_of` / `_tokens_at`
  inside them), compiled for the CPU there and compiled again here by `numba_cuda.device`:
  the same Python function, the same float64 operations in the same order
  (probe.planner.scalar). What this module adds is only how the work is spread over threads.
- No sum depends on the thread layout. Every float sum runs inside one thread, in the rule's
  order; the parallel phases split work whose results do not interact (one expert, one rank,
  one candidate per thread) or combine it order-free: integer atomic adds, and maxima. The
  waves keep each rank's additions in the host's order (step 3); whether a descent goes on
  is an or over the threads (`syncthreads_or` of "some level moved by 1 ns").
- No fused products. A product that feeds a sum is `mul` (libdevice's dmul_rn on the GPU),
  never contracted into an FMA; divisions are IEEE (div.rn.f64). tests/test_planner_assign_cuda.py
  compiles the kernel for sm_90 and checks the PTX for both.
- No order hidden in numpy. The host computes `fixed` with the same rule, in a loop; it used to
  take numpy's sum over a [G, experts] array, whose order follows the array's memory layout
  (that array is column-major: numpy added one expert after another), while this kernel
  summed pairwise as numpy does along a contiguous row. The last bits of `fixed` then differed
  on ranks with 8 or more single-holder experts, moved every water level by an ulp and, where
  two remainders of the rounding were within an ulp, flipped which rank got the extra token:
  the 10 mismatching layers (of 396) of the first H200 run. The other inputs the host computes
  with numpy are exact whatever the order: totals (integers), the starts (a total times 1 or
  0, over a count), and hop, which both sides take from `assign.remote_cost`.

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

import numpy as np
from numba import config, float64

from probe.planner import assign
from probe.planner.assign import remote_cost
from probe.planner.cost import CostModel
from probe.planner.numba_cuda import cuda, device, dmax

__all__ = ["SCHEDULES", "THREADS", "DeviceAssigner", "descent_waves"]

# Threads per block (one block per layer), a multiple of the warp: 256 gives each descent its
# own warp and spreads the per-expert and per-rank phases.
THREADS = 256

# How a block runs the descents of its layer (the same floats either way; module docstring).
SCHEDULES = ("waves", "serial")

# The host kernel's rules as device functions (see the module docstring).
_holder_lists_of = device(assign._holder_lists_of)
_fixed_level = device(assign._fixed_level)
_descend = device(assign._descend)
_level_at = device(assign._level_at)
_refill = device(assign._refill)
_quotas_of = device(assign._quotas_of)
_routes_of = device(assign._routes_of)
_evens_of = device(assign._evens_of)
_rank_time = device(assign._rank_time)
_exchange = device(assign._exchange)


# --- the wave schedule of the descents ----------------------------------------------------------

@cuda.jit(device=True)
def _descending_start(j, num_starts):  # pragma: no cover - device code
    """The j-th of the num_starts // 2 + 1 starts that descend (`assign._starts`): 0, 2 (and 4
    with a home), then the last, the locality start (with its pinned experts kept)."""
    if 2 * j < num_starts - 1:
        return 2 * j
    return num_starts - 1


@cuda.jit(device=True)
def _descend_in_waves(layer, tid, nthreads, num_starts, num_order, num_ranks, fixed, order,
                      holds, hlist, nhold, total, load, hop, alpha, beta, passes, x_all,
                      level_all, prev, wave, srt, hv):  # pragma: no cover - device code
    """`assign._descend` of the descending starts (`_descending_start`: 0, 2, (4,) and the
    locality start, the last, with its pinned experts kept) by the whole block, with the
    same floats: a
    pass runs `_refill` of the experts wave by wave, every (start, expert) of a wave on its
    own thread, a barrier between waves. Expert order[i]'s wave is one more than the largest
    wave of the experts before it in `order` that share a holder with it (none: wave 0), so
    the experts of one wave share no rank, and on every rank the experts that hold it are
    refilled in `order`, as by the host's loop: each rank's level sees the same additions in
    the same order. Scratch: prev int64 [E, G] (prev[i, h]: the last position before i whose
    expert holds order[i]'s h-th holder, -1 for none), wave int64 [E]; srt, hv this
    thread's scratch of `_refill`. Ends with a barrier."""
    num_desc = num_starts // 2 + 1
    # Each descending start's levels, parallel over (start, rank), and the previous expert on
    # each holder of each position, parallel over ranks (one rank scans `order` once).
    for i in range(tid, num_desc * num_ranks, nthreads):
        k = _descending_start(i // num_ranks, num_starts)
        g = i % num_ranks
        level_all[layer, k, g] = _level_at(g, fixed, order, num_order, x_all[layer, k], load,
                                           alpha, beta, hop[g])
    for g in range(tid, num_ranks, nthreads):
        last = -1
        for i in range(num_order):
            e = order[i]
            if holds[g, e]:
                for h in range(nhold[e]):
                    if hlist[e, h] == g:
                        prev[i, h] = last
                last = i
    for i in range(tid, num_order, nthreads):
        wave[i] = -1
    cuda.syncthreads()
    # The waves, round by round: in round r a position whose previous experts all have a wave
    # below r gets wave r. A wave written in this round reads as -1 or r, both "not yet", so
    # the result does not depend on the timing of the threads.
    num_waves = 0
    pending = 1
    while pending != 0:
        left = 0
        for i in range(tid, num_order, nthreads):
            if wave[i] < 0:
                ready = True
                e = order[i]
                for h in range(nhold[e]):
                    p = prev[i, h]
                    if p >= 0 and (wave[p] < 0 or wave[p] >= num_waves):
                        ready = False
                if ready:
                    wave[i] = num_waves
                else:
                    left = 1
        num_waves += 1
        pending = cuda.syncthreads_or(left)
    # The passes. A start stops after the first pass in which no level moved by 1 ns (the
    # host's test); syncthreads_or tells every thread, so the loop stays uniform. Bit j of
    # `active` (`moved`): descent j still runs (moved a level by 1 ns in this pass).
    active = (1 << num_desc) - 1
    for _ in range(passes):
        if active == 0:
            break
        moved = 0
        for w in range(num_waves):
            for i in range(tid, num_desc * num_order, nthreads):
                j = i // num_order
                pos = i % num_order
                if wave[pos] != w or (active >> j) & 1 == 0:
                    continue
                k = _descending_start(j, num_starts)
                step = _refill(pos, pos + 1, order, hlist, nhold, total, load, hop, alpha,
                               beta, x_all[layer, k], level_all[layer, k], srt, hv,
                               k == num_starts - 1)
                if step >= 1e-9:
                    moved |= 1 << j
            cuda.syncthreads()
        for j in range(num_desc):
            if cuda.syncthreads_or((moved >> j) & 1) == 0:
                active &= ~(1 << j)


@cuda.jit(device=True)
def _route_and_score(layer, tid, nthreads, first, num_routed, num_scored, load, token_time,
                     alpha, beta, left, hold, quota_all, flow_all, part_all, obj_all, out_all,
                     status_all):  # pragma: no cover - device code
    """Candidates first <= k < first + num_routed of the layer: their quotas routed
    (`assign._routes_of`, parallel over (candidate, expert), whole tokens added atomically to
    their flows, which must be zero); then candidates first <= k < first + num_scored
    scored: every rank's eq. 8 time (`assign._rank_time`, parallel over (candidate, rank))
    and each one's largest (a max: any order gives the same float) into obj_all. Tokens
    that find no holder set the layer's status to 1. The routing and the rank times each
    end with a barrier, the maxima not (the caller's next barrier comes before any read of
    obj_all); left, hold are this thread's scratch."""
    num_experts = quota_all.shape[2]
    num_ranks = quota_all.shape[3]
    for i in range(tid, num_routed * num_experts, nthreads):
        k = first + i // num_experts
        e = i % num_experts
        if not _routes_of(e, e + 1, quota_all[layer, k], load, token_time, left, hold,
                          flow_all[layer, k], out_all[layer], False):
            status_all[layer] = 1
    cuda.syncthreads()
    for i in range(tid, num_scored * num_ranks, nthreads):
        k = first + i // num_ranks
        g = i % num_ranks
        part_all[layer, k, g] = _rank_time(g, quota_all[layer, k], flow_all[layer, k],
                                           token_time, alpha, beta)
    cuda.syncthreads()
    if tid < num_scored:
        worst = 0.0
        for g in range(num_ranks):
            worst = dmax(worst, part_all[layer, first + tid, g])
        obj_all[layer, first + tid] = worst


# --- the kernel: one block per layer -----------------------------------------------------------

@cuda.jit
def _assign_kernel(load_all, copies_all, home_all, use_home, waves, token_time, hop, alpha,
                   beta, passes, moves, total_all, holds_all, nhold_all, hlist_all, order_all,
                   norder_all, fixed_all, x_all, quota_all, flow_all, level_all, srt_all, hv_all,
                   part_all, obj_all, rem_all, cand_all, left_all, hold_all, prev_all, wave_all,
                   tsrt_all, thv_all, xi_all, xf_all, xs_all, out_all, objective_all,
                   status_all):  # pragma: no cover - device code
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
    num_starts = 6 if use_home else 4
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
        for g in range(num_ranks):
            holds[g, e] = copies[g, e] > 0
        _holder_lists_of(e, e + 1, holds, hlist, nhold)
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
            if multi and k == num_starts - 1:
                # the locality start: each holder its own tokens, the rest split evenly
                own = 0
                for h in range(nhold[e]):
                    own += load[hlist[e, h], e]
                for h in range(nhold[e]):
                    g = hlist[e, h]
                    x[e, g] = float64(load[g, e]) + float64(total[e] - own) / float64(nhold[e])
            elif multi and k > 0:
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
    # 3. fixed[g]: the single-holder experts' levels (one thread per rank, as on the host).
    for g in range(tid, num_ranks, nthreads):
        fixed[g] = _fixed_level(g, holds, nhold, total, load, alpha, beta, hop[g])
    # flow of every candidate to zero (the routes add to it atomically).
    for i in range(tid, num_cand * num_sources * num_ranks, nthreads):
        flow_all[layer, i // (num_sources * num_ranks), (i // num_ranks) % num_sources,
                 i % num_ranks] = 0
    cuda.syncthreads()
    num_order = norder_all[layer]

    # 4. The descents (starts 0, 2, (4,) and the last, the locality start, with its pinned
    # experts kept; starts 1 (and 3) are taken as they are).
    if not waves:
        # "serial": each on the first thread of its own warp (warp j descends the j-th).
        if tid % 32 == 0:
            for j in range(tid // 32, num_starts // 2 + 1, nthreads // 32):
                k = _descending_start(j, num_starts)
                _descend(fixed, order, num_order, hlist, nhold, total, load, hop, alpha, beta,
                         passes, x_all[layer, k], level_all[layer, k], srt_all[layer, k],
                         hv_all[layer, k], k == num_starts - 1)
        cuda.syncthreads()
    else:
        _descend_in_waves(layer, tid, nthreads, num_starts, num_order, num_ranks, fixed, order,
                          holds, hlist, nhold, total, load, hop, alpha, beta, passes, x_all,
                          level_all, prev_all[layer], wave_all[layer], tsrt_all[layer, tid],
                          thv_all[layer, tid])
    # 5. Rounding (the starts) and DeepSeek's even split: parallel over (candidate, expert).
    for i in range(tid, num_cand * num_experts, nthreads):
        k = i // num_experts
        e = i % num_experts
        if k == even:
            _evens_of(e, e + 1, load, copies, hold, quota_all[layer, k], flow_all[layer, k],
                      out_all[layer], False)
        else:
            _quotas_of(e, e + 1, x_all[layer, k], hlist, nhold, total, quota_all[layer, k],
                       rem, cand)
    cuda.syncthreads()
    # 6-7. Routing of the starts' quotas and eq. 8 of every candidate.
    _route_and_score(layer, tid, nthreads, 0, num_starts, num_cand, load, token_time, alpha,
                     beta, left, hold, quota_all, flow_all, part_all, obj_all, out_all,
                     status_all)
    # 8. The exchange step (`assign._exchange`) from every start's candidate, each on the
    # first thread of its own warp, on a copy of its quotas and flows in slot num_cand + k;
    # then those scored as in 7 (the same uniform branch on every thread).
    if moves > 0:
        for i in range(tid, num_starts * num_experts * num_ranks, nthreads):
            k = i // (num_experts * num_ranks)
            e = (i // num_ranks) % num_experts
            g = i % num_ranks
            quota_all[layer, num_cand + k, e, g] = quota_all[layer, k, e, g]
        for i in range(tid, num_starts * num_sources * num_ranks, nthreads):
            k = i // (num_sources * num_ranks)
            s = (i // num_ranks) % num_sources
            g = i % num_ranks
            flow_all[layer, num_cand + k, s, g] = flow_all[layer, k, s, g]
        cuda.syncthreads()
        if tid % 32 == 0 and tid // 32 < num_starts:
            k = tid // 32
            xs = xs_all[layer, k]
            xf = xf_all[layer, k]
            _exchange(moves, quota_all[layer, num_cand + k], flow_all[layer, num_cand + k],
                      load, hlist, nhold, token_time, alpha, beta, xi_all[layer, k, 0],
                      xi_all[layer, k, 1], xf[0], xf[1], xf[2], xf[3], left, hold, xs[0],
                      xs[1], xs[2], xs[3], xs[4], xs[5])
        cuda.syncthreads()
        # The step keeps each slot's flows the routing of its quotas (the s -> s entries,
        # which eq. 8 does not read, go stale): scored as they are, as on the host.
        _route_and_score(layer, tid, nthreads, num_cand, 0, num_starts, load, token_time,
                         alpha, beta, left, hold, quota_all, flow_all, part_all, obj_all,
                         out_all, status_all)
    out = out_all[layer]
    for i in range(tid, num_sources * num_experts * num_ranks, nthreads):
        out[i // (num_experts * num_ranks), (i // num_ranks) % num_experts, i % num_ranks] = 0
    cuda.syncthreads()
    # 9. The best candidate (the even split first, then each start, before and after its
    # exchange step; strict <), and its dense assignment, expert by expert.
    best = even
    best_obj = obj_all[layer, even]
    for k in range(num_starts):
        if obj_all[layer, k] < best_obj:
            best_obj = obj_all[layer, k]
            best = k
        if moves > 0 and obj_all[layer, num_cand + k] < best_obj:
            best_obj = obj_all[layer, num_cand + k]
            best = num_cand + k
    if tid == 0:
        objective_all[layer] = best_obj
    quota = quota_all[layer, best]
    for e in range(tid, num_experts, nthreads):
        if best == even:
            _evens_of(e, e + 1, load, copies, hold, quota, flow_all[layer, best], out, True)
        else:
            _routes_of(e, e + 1, quota, load, token_time, left, hold, flow_all[layer, best],
                       out, True)


# --- host side ---------------------------------------------------------------------------------

def descent_waves(load, copies, cost: CostModel) -> tuple[int, int]:
    """(M, waves) of one layer: the multi-copy experts with tokens that the descents refill,
    and the waves the "waves" schedule runs each pass in (M waves would be the "serial"
    schedule's one expert at a time). load int [S, E], copies int [G, E], as for
    `assign_tokens`; the waves as `_descend_in_waves` numbers them."""
    load, holds = assign._validated(load, copies, cost)
    _, _, order = assign._fixed_levels(load, holds, float(cost.alpha), float(cost.beta),
                                       remote_cost(cost))
    last = np.full(holds.shape[0], -1)  # per rank: the wave of its latest expert in order
    for e in order:
        ranks = np.flatnonzero(holds[:, e])
        last[ranks] = last[ranks].max() + 1
    return int(order.size), int(last.max() + 1)



def _is_torch(value) -> bool:
    return type(value).__module__.startswith("torch")


class DeviceAssigner:
    """`assign_tokens` for L layers at once on the GPU (module docstring).

    cost: the CostModel (alpha, beta, token_time of eq. 8), fixed for the assigner's life.
    num_experts, num_layers: the shape of every call (load [L, S, E], copies [L, G, E]).
    passes: water-filling rounds (>= 1), as in `assign_tokens`.
    schedule: how the block runs the descents, with the same result: "waves" (default; every
        descent by the whole block, the experts that share no rank side by side) or
        "serial" (each descent on one thread, expert after expert); SCHEDULES.
    with_home: calls pass `home` [L, G, E] (the base layout) and the home-only starts are
        tried too, as `assign_tokens(..., home=...)`.
    moves: the exchange step's most moves (>= 0; None: `assign.default_moves(G)`), as in
        `assign_tokens`.
    """

    def __init__(self, cost: CostModel, num_experts: int, num_layers: int, *, passes: int = 8,
                 schedule: str = "waves", with_home: bool = False,
                 moves: int | None = None) -> None:
        if not isinstance(cost, CostModel):
            raise TypeError(f"cost must be a CostModel, got {type(cost).__name__}")
        if moves is None:
            moves = assign.default_moves(cost.num_ranks)
        for name, value, low in (("num_experts", num_experts, 1), ("num_layers", num_layers, 1),
                                 ("passes", passes, 1), ("moves", moves, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if not cost.beta > 0:
            raise ValueError(f"cost.beta must be > 0 to split tokens, got {cost.beta!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if not isinstance(with_home, bool):
            raise TypeError(f"with_home must be a bool, got {with_home!r}")
        self.cost = cost
        self.num_ranks = cost.num_ranks
        self.num_experts = int(num_experts)
        self.num_layers = int(num_layers)
        self.passes = int(passes)
        self.moves = int(moves)
        self.schedule = schedule
        self.with_home = with_home
        self._num_cand = 7 if with_home else 5  # the starts and the even split
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
        X = 2 * C - 1  # the candidates, then each start after its exchange step
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
        # In the kernel's argument order: total, holds, nhold, hlist, order, norder, fixed;
        # per candidate x, quota, flow, level, srt, hv, part, obj (quota, flow, part and obj
        # also for each start after its exchange step); per thread rem, cand, left, hold;
        # prev, wave and per thread srt, hv of the wave schedule; per start the exchange
        # step's int and float [G] and int [2 G] scratch.
        scratch = (new((L, E), i64), new((L, G, E), np.bool_), new((L, E), i64),
                   new((L, E, G), i64), new((L, E), i64), new(L, i64), new((L, G), f64),
                   new((L, C, E, G), f64), new((L, X, E, G), i64), new((L, X, S, G), i64),
                   new((L, C, G), f64), new((L, C, 2 * G), f64), new((L, C, 4, G), f64),
                   new((L, X, G), f64), new((L, X), f64),
                   new((L, T, G), f64), new((L, T, G), i64), new((L, T, G), i64),
                   new((L, T, G), i64), new((L, E, G), i64), new((L, E), i64),
                   new((L, T, 2 * G), f64), new((L, T, 4, G), f64),
                   new((L, C - 1, 2, G), i64), new((L, C - 1, 4, G), f64),
                   new((L, C - 1, 6, 2 * G), i64))
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
            *inputs, self.with_home, self.schedule == "waves", *consts,
            float(self.cost.alpha), float(self.cost.beta), self.passes, self.moves, *views)
        return outs
