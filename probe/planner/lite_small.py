"""The lite planner's CUDA kernel for small layers: the layer's state in shared memory, the
rank-level steps in every warp at once, few block barriers.

probe.planner.lite_cuda's kernel serves every shape up to 256 ranks: its steps spread items
over the block and meet at a barrier after each (nine a round), its counts and rank sums go
through 64-bit atomics, and thread 0 matches the pairs and admits the moves reading the
global scratch. At ep=8 / 128 experts (74.6 us on an H200, results/h200/run4) Nsight Compute
put about half of its warps' waiting at those barriers, behind a chain of dependent loads on
one warp. This kernel makes
the same plan (the rules of probe.planner.lite, entry for entry as `lite.lite_arrays`) for
layers of at most SMALL_RANKS ranks whose whole state fits the block's shared memory
(`small_fits`):
- the start copies the layer's load, home positions and lists, the cost matrices in ticks and
  the windows into shared memory, and counts the static split without atomics: a thread per
  expert copies it and makes its counts from the values in registers, a thread per (source,
  rank) flow and a thread per rank sum read the rank's home experts 8 at a time (three
  barriers);
- each round, every warp computes the rank times, their sum, the ranks' order, the hot
  ranks' count and the copy fits (a lane per rank, a loop over the ranks with no branch on a
  loaded value: no collective but the count's sum); the warps split the hot ranks
  by position and make each one's reach word (a lane per expert it holds OR-ing its holders'
  fit words in with a 32-bit shared atomic; one barrier); then every warp makes the pair
  matching itself: each (hot position, faster position) pair's eligibility as a bit, a lane
  per pair and a ballot per 32 pairs, then the hot positions in order, each taking the fastest
  eligible position not yet taken by bit operations on those words: every warp gets the same
  pairs, and warp 0 writes them down for the moves (one barrier);
- a warp per pair makes its move (rules 2-4: lite_device._pair_move, which lite_cuda calls too);
- rule 5: thread 0 admits the moves pair by pair in order (what it reads, no move's applying
  changes; each copy's source the one the pair move found, looked for again only where a copy
  admitted before it was sent from there: lite_device._admit_source); the block writes the
  new blocks' static splits; a warp per pair takes its pool's entries and updates its two
  ranks, each source's change of outgoing traffic in the pair's row; a thread per source adds
  the rows up (four barriers).
A round is thus seven block barriers (lite_cuda: nine, and the atomics of its counting steps).
Measured on H100s (one layer at ep=8 / 128 experts, graph replay, each revision beside the
previous one in one call): results/h100/run13, 51.1 / 49.3 us at 128 / 256 threads against 62.6
/ 59.9 for 52106d6 (every warp made every reach word, warp 0 applied rule 5 pair by pair, the
start stored before it loaded); run 14, the matching on eligibility words, 1.07x; run 15, the
loads of the positions and copy fits in one batch and a smaller kernel, 50.8 us against 56.3
on the same layer (1.11x), still 5.1x off the 10 us target. Nsight Compute (run 15) puts
instruction fetch first among the working warps' stalls (35%): the kernel's SASS is about
9,200 instructions (147 KB), and the code that runs once (the start, the write-back) or once
a round waits on its fetch, so unrolled copies of rarely taken code cost time (run 15's
60f4c42, 12,264 instructions, was no faster than the revision before it). Run 16 timed the
copy sources found in the pair moves (rule 5's admission without a copy_source per pair), the
hot ranks counted in the positions loop and the smaller write-back (8,296 SASS instructions):
50.0 us against 49.9 for 7bc313d, no gain at ep=8. Run 17 timed it chained on a stream (20
launches in one graph, per launch; the single replay above has a floor of 10-18 us even for
an empty kernel): 38.7 us, 3.9x off the target; the start and first round 15.6 us, each later
round 6-10 us.

`small_kernel(RP, EP)` is the kernel for layers of at most RP ranks (a power of two) and EP
experts; it takes `lite_cuda.launch_args` (and ignores the global scratch but for the clock
stamps) and writes the same outputs. `lite_cuda.CudaLite` launches it where `small_fits`
holds (`small=None`), and tests compare it with the CPU kernel as they do lite_cuda's.
"""

from __future__ import annotations

import numpy as np
from numba import int8, int16, int32, int64, uint8, uint32

from probe.planner.lite import KEY_MAX_TIME, KEY_MAX_TOKENS, plan_limits
from probe.planner.lite_device import (
    _COMBINE_ADD,
    _add_replica,
    _admit_source,
    _lanes_in_scratch,
    _pair_move,
    _pool_entry,
    _share,
    _warp_bits,
    _window_ticks,
)
from probe.planner.numba_cuda import (
    LINEINFO,
    WARP_SHUFFLES,
    clock64,
    cuda,
    warp_sum,
    warp_sync,
)

__all__ = ["MAX_THREADS", "SHARED_BYTES", "SLOT_CAP", "SMALL_RANKS", "block_cap", "small_fits",
           "small_kernel", "small_shape", "start_cycles"]

# Most ranks of a small layer, replicas a rank may take, threads a block may have (the
# per-warp arrays have room for MAX_THREADS / 32 warps), and the shared memory the layer's
# arrays may take (Numba's static shared memory is at most 48 KB a block).
SMALL_RANKS = 16
SLOT_CAP = 8
MAX_THREADS = 256
SHARED_BYTES = 46 * 1024
_NWM = MAX_THREADS // 32
# Slots of the block's shared integer scalars.
(_STATUS, _BIG, _APPLIED, _NREP, _NBLK) = range(5)
_NINTS = 5


def small_shape(num_ranks: int, num_experts: int) -> tuple[int, int]:
    """(RP, EP): the compile-time shape of a small kernel for layers of this size (RP the
    ranks rounded up to a power of two, EP the experts rounded up to a multiple of 32), so that
    few kernels are compiled."""
    return 1 << max(num_ranks - 1, 0).bit_length(), -(-num_experts // 32) * 32


def block_cap(rp: int, ep: int) -> int:
    """Expert blocks the small kernel keeps in shared memory (its plans may use no more)."""
    return min(ep, 4096 // (rp * rp))


def _shared_bytes(rp: int, ep: int) -> int:
    """The shared memory of small_kernel(rp, ep), bytes."""
    pm = max(rp // 2, 1)
    return (2 * 4 * rp * ep  # load and counts
            + 4 * block_cap(rp, ep) * rp * rp  # the plan's expert blocks
            + 3 * rp * ep  # home positions, held, home
            + 2 * rp * ep  # home lists of the ranks
            + 8 * ep + ep * rp + ep + 8 * ep  # held bits, holders, their count, blocks
            + 3 * 8 * rp * rp  # token and transfer times, the start's flows
            + 8 * rp * SLOT_CAP  # replicas on each rank
            + 9 * 8 * rp  # rank arrays
            + 3 * 8 * _NWM * rp + 4 * _NWM * rp  # per-warp times, order, fits, reach
            + 4 * _NWM * max(rp * rp // 32, 1)  # per-warp eligible pairs
            + 8 * 8 * pm + 5 * 8 * pm * (rp + 1)  # pairs and pools
            + 8 * pm * rp  # the pairs' changes of traffic out
            + 8 * 32 + 8 * _NINTS)


def small_fits(num_ranks: int, num_experts: int, slots, threads: int) -> bool:
    """Whether small_kernel plans layers of this shape with this slot budget (per rank: an int
    or an int array [G]) and block size."""
    rp, ep = small_shape(num_ranks, num_experts)
    slots = np.broadcast_to(np.asarray(slots, np.int64), (num_ranks,))
    _, max_blocks = plan_limits(slots, num_experts, num_ranks)
    return (num_ranks <= SMALL_RANKS and int(slots.max(initial=0)) <= SLOT_CAP
            and max_blocks <= block_cap(rp, ep) and threads <= MAX_THREADS
            and threads % 32 == 0 and _shared_bytes(rp, ep) <= SHARED_BYTES)


@cuda.jit(device=True, inline=True, **LINEINFO)
def _warp_total(v, scratch, w, lane):  # pragma: no cover - device code
    """The sum of int64 v over the lanes of warp w, for every lane."""
    if WARP_SHUFFLES:
        return warp_sum(v)
    return _lanes_in_scratch(v, scratch, w, lane, _COMBINE_ADD)


_KERNELS: dict = {}


def small_kernel(rp: int, ep: int, stamps: bool = False):
    """The small-layer kernel for layers of at most rp ranks (a power of two) and ep experts
    (made once per shape). stamps=True (GPU only) writes the SM's cycle counter after the start
    and after each step of a round into the scratch `stamps` as lite_cuda.kernel does, in its
    STAMP_STEPS slots: 'times and fits' the rank times, 'positions' the order and the copy
    fits, 'hot and reach' the hot ranks' reach words, 'eligible pairs' the matching's
    eligibility words, then the matching, the pair moves, the admission, the new blocks, and
    in 'apply' the takes and the sum of the traffic rows."""
    key = (rp, ep, stamps)
    if key in _KERNELS:
        return _KERNELS[key]
    RP, EP = rp, ep  # noqa: N806 (compile-time sizes of the shared arrays)
    PM = max(RP // 2, 1)  # noqa: N806
    RP1 = RP + 1  # noqa: N806 (a shared array's size is a constant, not an expression)
    EW = max(RP * RP // 32, 1)  # noqa: N806 (words of a warp's eligible-pair bits)
    BM = block_cap(RP, EP)  # noqa: N806
    NWM = _NWM  # noqa: N806
    SC = SLOT_CAP  # noqa: N806
    STAMPS = stamps  # noqa: N806
    NST = 9  # noqa: N806 (lite_cuda's stamps a round)
    HC = 8  # noqa: N806 (home experts a thread reads at once; EP is a multiple)

    @cuda.jit(**LINEINFO)
    def _small_kernel(load, home, window, slots, a_tick, b_tick, tt, xt, hcount, hlist, hpos,
                      nhome, rank_home, max_rounds, eps_ppm, hot, max_reps, max_blocks,
                      cnt_g, held_g, blk_of_g, rep_on_g, held_bits_g, fits_g, reach_g, sums_g,
                      start_status, pool_s_g, pool_n_g, cum_g, pre_h_g, pre_c_g, stamps,
                      blk_rows, rep, n_rep_out, blk_expert, blk_assign, n_blk_out, rounds_out,
                      moves_out, makespan_out, status_out):  # pragma: no cover - device code
        layer = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        nt = cuda.blockDim.x
        stamps = stamps[layer]
        if STAMPS and tid == 0:
            stamps[0] = clock64()
        load = load[layer]
        hcount = hcount[layer]
        hlist = hlist[layer]
        hpos = hpos[layer]
        nhome = nhome[layer]
        rank_home = rank_home[layer]
        rep = rep[layer]
        blk_expert = blk_expert[layer]
        blk_assign = blk_assign[layer]
        num_ranks, num_experts = home.shape[1], home.shape[2]
        width = 32 if nt >= 32 else 1
        lane = tid & 31 if nt >= 32 else 0
        warp = tid >> 5 if nt >= 32 else 0
        nwarps = nt >> 5 if nt >= 32 else 1
        A = a_tick  # noqa: N806 (the cost model's letters)
        B = b_tick  # noqa: N806

        # One allocation per line: the simulator tells shared arrays apart by their line.
        # Token counts in 32 bits: an expert's tokens stay below KEY_MAX_TOKENS (2**24) in a
        # layer that is planned (status 3 otherwise).
        load_s = cuda.shared.array((RP, EP), int32)
        cnt = cuda.shared.array((RP, EP), int32)
        blk_s = cuda.shared.array((BM, RP, RP), int32)  # the plan's expert blocks
        hpos_s = cuda.shared.array((RP, EP), int8)
        held = cuda.shared.array((RP, EP), uint8)
        home_b = cuda.shared.array((RP, EP), uint8)  # the layer's home placement
        home_s = cuda.shared.array((RP, EP), int16)  # each rank's home experts
        hbits = cuda.shared.array(EP, int64)  # bit g: g holds the expert
        hlist_s = cuda.shared.array((EP, RP), int8)
        hcount_s = cuda.shared.array(EP, int8)
        blk_of = cuda.shared.array(EP, int64)
        tt_s = cuda.shared.array((RP, RP), int64)
        xt_s = cuda.shared.array((RP, RP), int64)
        flow = cuda.shared.array((RP, RP), int64)  # the start's tokens s -> g
        rep_on = cuda.shared.array((RP, SC), int64)
        comp = cuda.shared.array(RP, int64)
        tin = cuda.shared.array(RP, int64)
        tout = cuda.shared.array(RP, int64)
        wt = cuda.shared.array(RP, int64)
        used = cuda.shared.array(RP, int64)
        sent = cuda.shared.array(RP, int64)
        recv = cuda.shared.array(RP, int64)
        slots_s = cuda.shared.array(RP, int64)
        nhome_s = cuda.shared.array(RP, int64)
        times_w = cuda.shared.array((NWM, RP), int64)  # each warp's own copy
        order_w = cuda.shared.array((NWM, RP), int64)
        fits_w = cuda.shared.array((NWM, RP), int64)
        reach_w = cuda.shared.array((NWM, RP), uint32)  # 32-bit: a native shared atomic OR
        elig_w = cuda.shared.array((NWM, EW), uint32)  # the matching's eligible pairs
        pair_h = cuda.shared.array(PM, int64)
        pair_c = cuda.shared.array(PM, int64)
        pair_e = cuda.shared.array(PM, int64)
        pair_x = cuda.shared.array(PM, int64)
        pair_len = cuda.shared.array(PM, int64)
        pair_new = cuda.shared.array(PM, int64)  # the block a pair's admission made, or -1
        pair_src = cuda.shared.array(PM, int64)  # its copy source at the pair move (-2: none)
        pair_sent = cuda.shared.array(PM, int64)  # that source's sent window then
        out_d = cuda.shared.array((PM, RP), int64)  # a pair's change of sources' traffic out
        pool_s = cuda.shared.array((PM, RP1), int64)
        pool_n = cuda.shared.array((PM, RP1), int64)
        cum = cuda.shared.array((PM, RP1), int64)
        pre_h = cuda.shared.array((PM, RP1), int64)
        pre_c = cuda.shared.array((PM, RP1), int64)
        wbest = cuda.shared.array(32, int64)  # the simulator's warp collectives
        ints = cuda.shared.array(_NINTS, int64)

        # The start, 1: the layer's inputs into shared memory, the checks. Each thread reads
        # every global value of an item before it stores any: Numba's arrays are generic
        # pointers, so a load written after a store to shared memory may not pass it, and each
        # store waits for its value (one memory latency per load written between stores).
        if tid == 0:
            for k in range(_NINTS):
                ints[k] = 0
        g = tid  # (the ranks past the layer: zero, no slot)
        while g < RP:
            w_in = window[layer, g] if g < num_ranks else 0.0
            slots_g = slots[g] if g < num_ranks else 0
            nhome_g = nhome[g] if g < num_ranks else 0
            w = _window_ticks(w_in)
            wt[g] = w
            if w < 0:
                cuda.atomic.max(ints, _STATUS, 2)
            used[g] = 0
            sent[g] = 0
            recv[g] = 0
            comp[g] = 0  # (the start's sums set the layer's ranks)
            tin[g] = 0
            tout[g] = 0
            slots_s[g] = slots_g
            nhome_s[g] = nhome_g
            g += nt
        # Loops over ranks run to the constant RP (unrolled: their loads go out together).
        # Item loops index [RP, ...] shapes: their divisions are by constants (a 64-bit
        # division by a variable is a long subroutine on the GPU).
        width_h = rank_home.shape[1]
        vals = cuda.local.array(RP, int64)  # an item's global values, read first
        ex = cuda.local.array(HC, int64)  # a batch of a rank's home experts
        hc = cuda.local.array(HC, int64)
        ld = cuda.local.array(HC, int64)
        poss = cuda.local.array(RP, int64)
        lst = cuda.local.array(RP, int64)
        j = tid
        while j < width_h:  # a column of the home lists, every rank
            for g in range(RP):
                if g < num_ranks:
                    vals[g] = rank_home[g, j]
            for g in range(RP):
                if g < num_ranks:
                    home_s[g, j] = vals[g]  # (-1 past the rank's list: never read)
            j += nt
        k = tid
        while k < RP * RP:
            s = k // RP
            g = k - s * RP
            inside = s < num_ranks and g < num_ranks
            t_sg = tt[s, g] if inside else 0
            x_sg = xt[s, g] if inside else 0
            tt_s[s, g] = t_sg  # (zero past the layer's ranks)
            xt_s[s, g] = x_sg
            k += nt
        width_l = hlist.shape[1]
        e = tid
        while e < num_experts:
            n_e = hcount[e]
            for s in range(RP):
                if s < num_ranks:
                    vals[s] = load[s, e]
                    poss[s] = hpos[s, e]
                if s < width_l:
                    lst[s] = hlist[e, s]  # (-1 past the expert's holders)
            total = 0
            negative = False
            for s in range(RP):
                if s < num_ranks:
                    v = vals[s]
                    p = poss[s]
                    negative = negative or v < 0
                    total += v
                    load_s[s, e] = v if 0 <= v < KEY_MAX_TOKENS else 0  # (else: rejected)
                    hpos_s[s, e] = p
                    held[s, e] = 1 if p >= 0 else 0
                    home_b[s, e] = 1 if p >= 0 else 0
            if negative:
                cuda.atomic.max(ints, _STATUS, 1)
            if total >= KEY_MAX_TOKENS:
                ints[_BIG] = 1
            bits = int64(0)
            for j in range(RP):
                if j < n_e:
                    g = lst[j]
                    hlist_s[e, j] = g
                    bits |= int64(1) << g
            hcount_s[e] = n_e
            hbits[e] = bits
            blk_of[e] = -1
            # The static split's counts of e (from the values in registers; an expert of
            # several holders through _share on the column this thread just wrote). A layer
            # with a negative or too large load is not planned: its counts stay zero.
            planned = not negative and total < KEY_MAX_TOKENS
            one = planned and n_e == 1  # the one holder gets every token
            for g in range(RP):
                if g < num_ranks:
                    cnt[g, e] = total if one and poss[g] >= 0 else 0
            if planned and n_e > 1:  # (loops not unrolled: one copy of _share in the code)
                for g in range(num_ranks):
                    n = 0
                    if hpos_s[g, e] >= 0:
                        for s in range(num_ranks):
                            n += int64(_share(load_s, home_b, hpos_s, hcount_s, s, e, g))
                    cnt[g, e] = n
            e += nt
        cuda.syncthreads()
        if STAMPS and tid == 0:
            stamps[stamps.shape[0] - 3] = clock64()
        status = ints[_STATUS]
        if status == 0 and ints[_BIG] != 0:
            status = 3
        # The start, 2: the static split's flows [S, G], HC home experts of g at a time (their
        # list entries, then their holder counts and loads, each batch of loads at once).
        if status == 0:
            k = tid
            while k < RP * RP:
                s = k // RP
                g = k - s * RP
                if s < num_ranks and g < num_ranks:
                    n = 0
                    nh = nhome_s[g]
                    several = False
                    for j0 in range(0, nh, HC):  # (EP, a multiple of HC, bounds j0 + HC)
                        for jj in range(HC):
                            v = int64(home_s[g, j0 + jj])
                            ex[jj] = v if j0 + jj < nh else 0
                        for jj in range(HC):
                            hc[jj] = hcount_s[ex[jj]]
                            ld[jj] = load_s[s, ex[jj]]
                        for jj in range(HC):  # g, the one holder, gets s's tokens
                            one = j0 + jj < nh and hc[jj] == 1
                            several = several or (j0 + jj < nh and hc[jj] != 1)
                            n += int64(ld[jj]) if one else 0
                    if several:  # experts of several holders (one copy of _share in the code)
                        for j in range(nh):
                            e = int64(home_s[g, j])
                            if hcount_s[e] != 1:
                                n += int64(_share(load_s, home_b, hpos_s, hcount_s, s, e, g))
                    flow[s, g] = n
                k += nt
        cuda.syncthreads()
        if STAMPS and tid == 0:
            stamps[stamps.shape[0] - 2] = clock64()
        # The start, 3: the rank sums.
        if status == 0:
            g = tid
            while g < num_ranks:
                c_sum = 0
                nh = nhome_s[g]
                for j0 in range(0, nh, HC):  # HC home experts at a time, as the flows
                    for jj in range(HC):
                        v = int64(home_s[g, j0 + jj])
                        ex[jj] = v if j0 + jj < nh else 0
                    for jj in range(HC):
                        n = int64(cnt[g, ex[jj]])
                        if j0 + jj < nh and n > 0:
                            c_sum += A + B * n
                into = 0
                out = 0
                for s in range(RP):
                    if s < num_ranks:
                        into += flow[s, g] * tt_s[s, g]
                        out += flow[g, s] * tt_s[g, s]
                comp[g] = c_sum
                tin[g] = into
                tout[g] = out
                if c_sum + 2 * (into if into > out else out) >= KEY_MAX_TIME:
                    cuda.atomic.max(ints, _STATUS, 3)
                g += nt
        cuda.syncthreads()
        if status == 0:
            status = ints[_STATUS]
        if STAMPS and tid == 0:
            stamps[1] = clock64()

        rounds = 0
        moves = 0
        while status == 0 and rounds < max_rounds:
            rounds += 1
            sbase = 2 + NST * (rounds - 1)
            # Every warp: the rank times and their sum (a lane per rank).
            part = 0
            g = lane
            while g < num_ranks:
                it = tin[g] if tin[g] > tout[g] else tout[g]
                t = comp[g] + 2 * it
                times_w[warp, g] = t
                part += t
                g += width
            total = _warp_total(part, wbest, warp, lane)
            warp_sync()
            if STAMPS and tid == 0:
                stamps[sbase + 0] = clock64()
            # Every warp: each rank's position (slowest first, ties to the lowest rank) and the
            # ranks a copy from it fits (bit c: c has a free slot, the sent and received
            # windows hold the copy; lite.copy_source's test).
            # No branch on a loaded value in these loops (bitwise tests, the ranks past the
            # layer masked: a padding rank has no slot), so all their loads go out together.
            # The same loop counts the hot ranks (16 G t above the bar, from the top time and
            # the sum; they take the first positions).
            n_hot = 0
            g = lane
            while g < num_ranks:
                t_g = times_w[warp, g]
                p = 0
                t_top = 0  # (times are not negative)
                for q in range(RP):
                    t_q = times_w[warp, q]
                    inside = q < num_ranks
                    p += int64(inside & ((t_q > t_g) | ((t_q == t_g) & (q < g))))
                    t_top = t_q if inside & (t_q > t_top) else t_top
                order_w[warp, p] = g
                hot_bar = (16 - hot) * num_ranks * t_top + hot * total
                n_hot += int64(16 * num_ranks * t_g > hot_bar)
                bits = int64(0)
                sent_g = sent[g]
                wt_g = wt[g]
                for c in range(RP):
                    x = xt_s[g, c]
                    fit = ((used[c] < slots_s[c]) & (sent_g + x <= wt_g)
                           & (recv[c] + x <= wt[c]))
                    bits |= int64(fit) << c
                fits_w[warp, g] = bits
                reach_w[warp, g] = uint32(0)
                g += width
            warp_sync()
            if STAMPS and tid == 0:
                stamps[sbase + 1] = clock64()
            # Rule 1. First the reach word of every hot rank h (bit c: c holds or can receive
            # one of the experts with tokens on h): the hot ranks split over the warps by
            # position (warp w the positions w, w + nwarps, ...; the hot ranks come first), a
            # lane per expert of h OR-ing its holders' fit words into the owner's row; then
            # (one barrier) the matching in every warp (below).
            n_hot = _warp_total(n_hot, wbest, warp, lane)
            p = warp
            while p < n_hot:
                h = order_w[warp, p]
                nh = nhome_s[h]
                j = lane
                while j < nh + used[h]:
                    e = int64(home_s[h, j]) if j < nh else rep_on[h, j - nh]
                    if cnt[h, e] > 0:
                        bits = hbits[e]
                        for k in range(hcount_s[e]):
                            bits |= fits_w[warp, hlist_s[e, k]]
                        if bits != 0:
                            cuda.atomic.or_(reach_w, (warp, h), uint32(bits))
                    j += width
                p += nwarps
            cuda.syncthreads()  # every hot rank's word, for every warp
            if STAMPS and tid == 0:
                stamps[sbase + 2] = clock64()
            # The matching: first every (hot position i, position q) pair's eligibility in
            # bit i * RP + q of the warp's words (q faster than i, its rank could gain and i's
            # reach word holds it), a lane per pair and one ballot per 32 pairs; then the hot
            # positions in order, each taking the fastest eligible position not yet taken
            # (bit operations on the words, the same in every lane).
            n_items = n_hot * RP
            base = 0
            while base < n_items:  # the same trip count in every warp (simulator)
                bits = uint32(0)
                k = base + lane
                while k < base + 32:  # one item a lane (a one-lane warp: all 32)
                    i = k // RP
                    q = k - i * RP
                    if k < n_items and q > i and q < num_ranks:
                        h = order_w[warp, i]
                        c = order_w[warp, q]
                        own = int32(i) % int32(nwarps)  # the warp that made i's reach word
                        if (times_w[warp, c] + A + B < times_w[warp, h]
                                and (reach_w[own, h] >> c) & 1):
                            bits = uint32(bits | uint32(1 << (k - base)))
                    k += width
                bits = _warp_bits(bits, wbest, warp, lane)
                if lane == 0:
                    elig_w[warp, base >> 5] = bits
                base += 32
            warp_sync()
            if STAMPS and tid == 0:
                stamps[sbase + 3] = clock64()
            taken = uint32(0)  # bit p: position p is in a pair
            row_mask = uint32((1 << RP) - 1)
            n_pairs = 0
            for i in range(n_hot):
                if (taken >> i) & 1 == 0:
                    taken = uint32(taken | uint32(1 << i))
                    k = i * RP  # (RP divides 32: a row lies in one word)
                    free = uint32((elig_w[warp, k >> 5] >> (k & 31)) & row_mask) & ~taken
                    if free != 0:  # the fastest candidate: the highest position
                        q = 31 - cuda.clz(uint32(free))
                        taken = uint32(taken | uint32(1 << q))
                        if lane == 0 and warp == 0:
                            pair_h[n_pairs] = order_w[warp, i]
                            pair_c[n_pairs] = order_w[warp, q]
                        n_pairs += 1
            cuda.syncthreads()  # the pairs (written by warp 0) for every warp
            if STAMPS and tid == 0:
                stamps[sbase + 4] = clock64()
            # Rules 2-4, a warp per pair (lite_cuda's pair step on the shared arrays).
            first = 0
            while first < n_pairs:
                i = first + warp
                first += nwarps
                live = i < n_pairs
                h = pair_h[i] if live else 0
                c = pair_c[i] if live else 0
                t_h = comp[h] + 2 * (tin[h] if tin[h] > tout[h] else tout[h])
                _pair_move(i, live, h, c, t_h, nhome_s[h], home_s, rep_on, cnt, held, blk_of,
                           (used, slots_s, sent, recv, wt, xt_s, hcount_s, hlist_s), num_ranks,
                           tt_s, blk_s, load_s, home_b, hpos_s, (comp, tin, tout), A, B, eps_ppm,
                           (pool_s, pool_n, cum, pre_h, pre_c),
                           (pair_len, pair_e, pair_x, pair_src, pair_sent),
                           wbest, warp, lane, width)
            cuda.syncthreads()
            if STAMPS and tid == 0:
                stamps[sbase + 5] = clock64()
            # Rule 5. Thread 0 admits the moves pair by pair in the CPU kernel's order (the
            # copy's source against the copies admitted before it, the replica row, a new
            # block); admitting reads nothing that applying a move changes, so the moves are
            # applied after every admission. Then (a barrier) the block writes the new blocks'
            # static splits and clears the pairs' traffic rows; then (a barrier) a warp per
            # pair takes its pool's entries (a lane per entry: the pool's sources differ) and
            # lane 0 updates the pair's two ranks (the pairs' ranks, hence their columns of a
            # block, differ), each source's change of outgoing traffic going into the pair's
            # row; then (a barrier) a thread per source adds the rows up. The sums are of
            # integers: their order does not change them.
            if tid == 0:
                # The copy sources came with the pair moves (_admit_source).
                applied = 0
                n_rep = ints[_NREP]
                n_blk = ints[_NBLK]
                for i in range(n_pairs):
                    e = pair_e[i]
                    c = pair_c[i]
                    ok = e >= 0
                    src = -1
                    if ok:
                        src = _admit_source(i, e, c, pair_src, pair_sent, (
                            used, slots_s, sent, recv, wt, xt_s, hcount_s, hlist_s))
                        if src != -2:  # c does not hold e: it needs a copy
                            ok = src >= 0 and n_rep < max_reps
                    fresh = -1
                    if ok and blk_of[e] < 0:
                        if n_blk >= max_blocks:
                            ok = False
                        else:
                            fresh = n_blk
                            blk_of[e] = fresh
                            blk_expert[fresh] = e
                            n_blk += 1
                    if ok and src >= 0:
                        hbits[e] |= int64(1) << c
                        n_rep = _add_replica(c, e, src, n_rep, rep, held, rep_on, used, sent,
                                             recv, xt_s)
                    pair_new[i] = fresh
                    if ok:
                        applied += 1
                    else:
                        pair_e[i] = -1
                ints[_NREP] = n_rep
                ints[_NBLK] = n_blk
                ints[_APPLIED] = applied
            cuda.syncthreads()
            if STAMPS and tid == 0:
                stamps[sbase + 6] = clock64()
            k = tid
            while k < n_pairs * (RP * RP):
                i = k // (RP * RP)
                r = k - i * (RP * RP)
                s = r // RP
                g = r - s * RP
                if g == 0:
                    out_d[i, s] = 0
                fresh = pair_new[i]
                if fresh >= 0 and s < num_ranks and g < num_ranks:
                    blk_s[fresh, s, g] = _share(load_s, home_b, hpos_s, hcount_s, s, pair_e[i],
                                                g)
                k += nt
            cuda.syncthreads()
            if STAMPS and tid == 0:
                stamps[sbase + 7] = clock64()
            first = 0
            while first < n_pairs:
                i = first + warp
                first += nwarps
                e = pair_e[i] if i < n_pairs else -1
                if e >= 0:
                    h = pair_h[i]
                    c = pair_c[i]
                    x = pair_x[i]
                    b = blk_of[e]
                    q = lane
                    while q < pair_len[i]:
                        take = x - cum[i, q]
                        if take > pool_n[i, q]:
                            take = pool_n[i, q]
                        if take > 0:
                            s = pool_s[i, q]
                            blk_s[b, s, h] -= take
                            blk_s[b, s, c] += take
                            out_d[i, s] = take * (tt_s[s, c] - tt_s[s, h])
                        q += width
                    if lane == 0:
                        lo = _pool_entry(x, pair_len[i], cum[i])
                        r = x - cum[i, lo]
                        s = pool_s[i, lo]
                        tin[h] -= pre_h[i, lo] + r * tt_s[s, h]
                        tin[c] += pre_c[i, lo] + r * tt_s[s, c]
                        comp[h] -= B * x
                        if cnt[h, e] == x:
                            comp[h] -= A
                        if cnt[c, e] == 0:
                            comp[c] += A
                        comp[c] += B * x
                        cnt[h, e] -= x
                        cnt[c, e] += x
            cuda.syncthreads()
            s = tid
            while s < num_ranks:
                d = 0
                for i in range(n_pairs):
                    d += out_d[i, s]
                tout[s] += d
                s += nt
            cuda.syncthreads()
            if STAMPS and tid == 0:
                stamps[sbase + 8] = clock64()
            applied = ints[_APPLIED]
            moves += applied
            if applied == 0:
                break

        # The outputs.
        n_rep = ints[_NREP]
        n_blk = ints[_NBLK]
        # Little code here: it runs once, and its time is mostly the fetch of its
        # instructions (results/h100/run15).
        if tid == 0:
            span = 0
            for g in range(RP):  # (zero past the layer's ranks)
                t = comp[g] + 2 * (tin[g] if tin[g] > tout[g] else tout[g])
                span = t if t > span else span
            span = span if status == 0 else 0
            n_rep_out[layer] = n_rep
            n_blk_out[layer] = n_blk
            rounds_out[layer] = rounds if status == 0 else 0
            moves_out[layer] = moves
            makespan_out[layer] = span
            status_out[layer] = status
        k = tid  # the rows past the plan's replicas and blocks: -1
        while k < rep.shape[0] or k < blk_expert.shape[0]:
            if n_rep <= k < rep.shape[0]:
                rep[k, 0] = -1
                rep[k, 1] = -1
                rep[k, 2] = -1
            if n_blk <= k < blk_expert.shape[0]:
                blk_expert[k] = -1
            k += nt
        k = tid  # the plan's blocks out of shared memory, zero past them: a thread per row
        while k < blk_assign.shape[0] * RP:
            q = k // RP
            s = k - q * RP
            live = q < n_blk
            b = q if live else 0
            if s < num_ranks:
                for g in range(RP):
                    v = int64(blk_s[b, s, g])
                    if g < num_ranks:
                        blk_assign[q, s, g] = v if live else 0
            k += nt

    _KERNELS[key] = _small_kernel
    return _small_kernel


def start_cycles(runner) -> list[dict]:
    """The start's three parts (inputs into shared memory and checks; counts and flows; rank
    sums), cycles per layer, of the last launch of a CudaLite on the small-layer kernel made
    with stamps=True (the kernel stamps them in the last three slots of its stamps row)."""
    if not (runner.stamps and runner.small):
        raise ValueError("start_cycles needs a CudaLite on the small-layer kernel, stamps=True")
    stamps = runner._scratch[-1].copy_to_host()
    return [{"inputs": int(row[-3] - row[0]), "counts": int(row[-2] - row[-3]),
             "sums": int(row[1] - row[-2])} for row in stamps]
