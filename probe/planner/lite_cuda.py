"""The lite planner as a CUDA kernel (numba.cuda): one thread block per MoE layer.

The rules of probe.planner.lite (rounds of moves over disjoint rank pairs, decided in integer
ticks) and the plan of its CPU kernel `lite.lite_arrays`, entry for entry: a launch plans L
layers at once (inputs stacked [L, ...]) without host synchronisation, on the caller's stream,
so it can be captured in a CUDA graph. Integer sums do not depend on the order of their terms,
so every sum here is spread over the block's threads, and every choice is a maximum or minimum
over a packed key; a warp combines its lanes' values with shuffles and then makes one atomic
update, or none where the warp alone needs the result (numba_cuda.lanes_add / lanes_max,
warp_min / warp_max: a 64-bit atomic on shared memory is a compare-and-swap loop on sm_90;
Numba's CUDA simulator, without shuffles, keeps atomics).
The scalar rules (a candidate's copy source and expert, a grid point, an amount's f(x), a
token's static split) are lite.py's own functions compiled a second time as device functions
(probe.planner.lite_device, with the warp collectives both kernels share).
Loops are while loops stepping their indices (Numba's strided range loops, like every `k // G`,
cost a 64-bit division). The block needs a multiple of 32 threads.

A launch is three kernels on one stream. The start, over every layer's (source, expert) items
(a grid of layers x blocks): one zeroes what the other accumulates; the other adds each item's
static-split tokens into the holders' counts and the ranks' compute and traffic with native
64-bit atomics in global memory, sets the held experts and their bits, and flags a negative
load. Then the planner, one block per layer (T threads; barriers between the steps). Layers of
at most INLINE_START_ITEMS items (ep=8 / 128 experts) take one launch: the planner's block
does the start kernels' items itself first (`starts_inline`), and keeps the layer's counts,
held experts, held bits and expert blocks in shared memory rather than the global scratch
where they fit (`shared_state`: the start's count updates in shared memory, shared loads
after, and thread 0's admission without a global load).
- start: the windows in ticks and the checks (status 1 negative load, 2 bad window, 3 times or
  tokens past the kernel's integer keys); the rank arrays from the start's sums;
- each round: the rank times and their sum (a thread per rank), with the ranks a copy from each
  source rank fits, in bit words (a warp per (rank, word), one ballot a word); each rank's
  position, slowest first (a warp per rank counts the ranks ahead of it, a ballot per 32);
  which (hot rank, faster rank) pairs could move (lite.can_move), in bit words: per position
  the ranks that hold or can receive one of its rank's experts (an item per (position,
  expert), while the hot ranks are counted), then per hot position the faster positions that
  could gain (a warp per (position, word), one ballot); thread 0 matches them in the CPU
  kernel's order, one word operation per step (the fastest untaken candidate is the highest
  eligible bit not yet taken); then a warp per pair makes the pair's move with the pair's
  state in registers and no block barrier: its expert (a lane per expert h holds, maximum of
  (tokens, -expert)), its pool (a lane per source, each entry's place and prefix sums from the
  lanes' prefix sums), the amount's grid steps (a lane per grid point evaluates f(x), the warp's
  minimum of (f, x), every lane narrows the range alike) and the gain test; thread 0 admits
  the moves in pair order (copy sources, replica rows, new expert blocks); the threads write
  the new blocks' static split; a thread per (pair, pool entry) applies the takes.
kernel(stamps=True) stamps each step with the SM's cycle counter (`step_cycles`).

Measured on an H100 (results/h100/run11, experiments.planner.gpu_lite; one layer, graph replay,
default rules, best block size, 32fa7aa): 77.9 us at ep=8 / 128 experts (256 threads) and 688
us at ep=64 / 256 (512 threads); 11.3 us and 181 us per layer in an 8-layer launch. On the same
card run 10's kernel (e183ca1) took 85.8 and 791 us. With the small layers' state in shared
memory, on an H200 (results/h200/run4): 74.6 us at ep=8 against 78.7 for 8451a7a on the same
card. The 10 / 50 us targets are missed by 7.5x / 13.7x. The kernel is a chain of dependent
instructions on few warps (Nsight Compute: 10-13 cycles between a warp's issues, about 40% of
them waiting at a barrier), mostly 64-bit index arithmetic; a round's machine code is about 100
KB (experiments.planner.lite_code_size).

Entry points: `CudaLite(home, slots, cost, rules, num_layers=L)` validates once and keeps
device buffers; its `plan(load, window)` launches on the caller's stream (torch's current stream
for torch tensors) and returns device arrays (a `CudaLitePlan`) without synchronising.
`lite_cuda_arrays(...)`: numpy in, numpy out, for tests. Under NUMBA_ENABLE_CUDASIM=1 (set
before numba.cuda is first imported) both run in Numba's CUDA simulator.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import int64, uint8, uint32

from probe.planner import lite
from probe.planner.cost import CostModel
from probe.planner.cuda_common import LayerPlanner, is_torch
from probe.planner.lite import (
    KEY_MAX_TIME,
    KEY_MAX_TOKENS,
    LiteRules,
    cost_ticks,
    home_lists,
    plan_limits,
)
from probe.planner.numba_cuda import (
    LINEINFO,
    SIMULATOR,
    clock64,
    cuda,
    lanes_add,
    lanes_max,
)
from probe.planner.lite_device import (
    _pair_move,
    _EXPERT_BITS,
    _add_replica,
    _admit_source,
    _first_item,
    _next_item,
    _pool_entry,
    _share,
    _warp_bits,
    _warp_count,
    _window_ticks,
)
from probe.planner.lite_small import small_fits, small_kernel, small_shape

__all__ = ["INLINE_START_ITEMS", "MAX_RANKS", "SHARED_STATE_ITEMS", "STAMP_STEPS",
           "START_THREADS", "THREADS", "CudaLite", "CudaLitePlan", "blocks_as_rows",
           "host_arrays", "kernel", "kernel_ranks", "launch_args", "launch_start",
           "lite_cuda_arrays", "shared_state", "start_args", "starts_inline", "step_cycles"]

# Most ranks a layer may have (the shared rank arrays are at most this long).
MAX_RANKS = 256
# Threads per block unless the caller picks another multiple of 32.
THREADS = 128
# Slots of the block's shared integer scalars.
(_STATUS, _TOTAL, _NPAIRS, _NHOT, _APPLIED, _NREP, _NBLK, _NNEW, _MAKESPAN) = range(9)
_NINTS = 9
# kernel(upto=FULL): the planner itself (smaller: profiling variants).
FULL = 7




class CudaLitePlan(NamedTuple):
    """L layers' lite plans as device arrays (row l: layer l):
        replicas: int64 [L, R_max, 3], rows (rank, expert, source) in the order made, -1 past
        num_replicas[l]; num_replicas: int64 [L]; blk_expert: int64 [L, B_max], the experts
        whose tokens moved, -1 past num_blocks[l]; blk_assign: int64 [L, B_max, S, G], their
        assignment (blocks past num_blocks[l] are zero); num_blocks: int64 [L];
        rounds, moves: int64 [L]; makespan: int64 [L], the largest rank time in ticks (0 for a
        rejected layer); status: int64 [L], 0 fine or a code of lite.STATUS_ERRORS (the layer is
        left unplanned)."""

    replicas: object
    num_replicas: object
    blk_expert: object
    blk_assign: object
    num_blocks: object
    rounds: object
    moves: object
    makespan: object
    status: object


# Threads per block of the start kernels (their grid: layers x blocks of items).
START_THREADS = 256


@cuda.jit(device=True, inline=True, **LINEINFO)
def _zero_items(k, stride, layer, num_ranks, num_experts, cnt, held_bits, sums, start_status,
                blk_rows):  # pragma: no cover - device code
    """Items k, k + stride, ... of zeroing one layer's start (its slices of cnt [G, E], the held
    bits [E, W], the sums [3, G], blk_rows [B S, G]; and start_status[layer]). cnt and
    held_bits may be larger (shared arrays of a compile-time shape): their [G, E] and [E, W]
    are zeroed."""
    nw = held_bits.shape[1]
    g, e, dg, de = _first_item(k, stride, num_experts)
    while g < num_ranks:
        cnt[g, e] = 0
        g, e = _next_item(g, e, dg, de, num_experts)
    e, w, de, dw = _first_item(k, stride, nw)
    while e < num_experts:
        held_bits[e, w] = 0
        e, w = _next_item(e, w, de, dw, nw)
    j = k
    while j < 3 * num_ranks:
        sums[j // num_ranks, j % num_ranks] = 0
        j += stride
    if k == 0:
        start_status[layer] = 0
    r, g, dr, dg = _first_item(k, stride, num_ranks)
    while r < blk_rows.shape[0]:
        blk_rows[r, g] = 0
        r, g = _next_item(r, g, dr, dg, num_ranks)


@cuda.jit(device=True, inline=True, **LINEINFO)
def _split_items(k, stride, layer, load, home, hcount, hlist, hpos, tt, A, B, cnt, held,
                 held_bits, blk_of, sums, start_status):  # pragma: no cover - device code
    """Items k, k + stride, ... of one layer's (source s, expert e) pairs (its slices): the
    static split's tokens of (s, e) added into cnt[g, e] of each holder g and into the sums:
    compute (B per token, and A where the count leaves 0), traffic into g and out of s (64-bit
    atomics in global memory); held [G, E] and its bits set, blk_of cleared, a negative load
    flagged (start_status[layer] 1)."""
    num_ranks, num_experts = home.shape
    s, e, ds, de = _first_item(k, stride, num_experts)
    while s < num_ranks:
        if load[s, e] < 0:
            cuda.atomic.max(start_status, layer, 1)
        held[s, e] = 1 if home[s, e] else 0  # (S = G: row s is rank s too)
        if home[s, e]:
            cuda.atomic.or_(held_bits, (e, s >> 5), uint32(1 << (s & 31)))
        if s == 0:
            blk_of[e] = -1
        for j in range(hcount[e]):
            g = hlist[e, j]
            a = _share(load, home, hpos, hcount, s, e, g)
            if a != 0:
                before = cuda.atomic.add(cnt, (g, e), a)
                cuda.atomic.add(sums, (0, g), B * a + (A if before == 0 else 0))
                cuda.atomic.add(sums, (1, g), a * tt[s, g])
                cuda.atomic.add(sums, (2, s), a * tt[s, g])
        s, e = _next_item(s, e, ds, de, num_experts)


@cuda.jit(**LINEINFO)
def _zero_kernel(cnt, held_bits, sums, start_status,
                 blk_rows):  # pragma: no cover - device code
    """The start's first kernel: zero what the second one accumulates into (cnt [L, G, E], the
    held bits [L, E, W], the sums [L, 3, G], the start status [L]) and the plan's expert blocks
    (blk_rows: blk_assign as [L, B S, G]; a new block's static split then writes its holders'
    columns alone), a layer's items spread over its blocks (grid [L, blocks])."""
    layer = cuda.blockIdx.x
    _zero_items(cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x,
                cuda.gridDim.y * cuda.blockDim.x, layer, cnt.shape[1], cnt.shape[2],
                cnt[layer], held_bits[layer],
                sums[layer], start_status, blk_rows[layer])


@cuda.jit(**LINEINFO)
def _split_kernel(load, home, hcount, hlist, hpos, tt, a_tick, b_tick, cnt, held, held_bits,
                  blk_of, sums, start_status):  # pragma: no cover - device code
    """The start's second kernel: a thread per (source, expert) item of a layer
    (`_split_items`), a layer's items spread over its blocks (grid [L, blocks])."""
    layer = cuda.blockIdx.x
    _split_items(cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x,
                 cuda.gridDim.y * cuda.blockDim.x, layer, load[layer], home[layer],
                 hcount[layer], hlist[layer], hpos[layer], tt, a_tick, b_tick, cnt[layer],
                 held[layer], held_bits[layer], blk_of[layer], sums[layer], start_status)


# Layers of at most this many (source, expert) items start inside the planner's block (one
# launch; the start kernels' own launches cost about a round at ep=8, results/h100/run10).
INLINE_START_ITEMS = 2048


# A layer that starts inside the block keeps its counts and held experts in shared arrays of
# [RP, EP] (RP: G rounded up to a power of two, EP = min(SHARED_STATE_ITEMS / RP,
# SHARED_STATE_EXPERTS)) where its experts fit, its held bits in [EP, W] and its experts'
# blocks in [EP]: at most 21 KB of shared memory.
SHARED_STATE_ITEMS = 2048
SHARED_STATE_EXPERTS = 256


def shared_state(num_ranks: int, num_experts: int) -> tuple[int, int] | None:
    """The compile-time shape [RP, EP] of the shared arrays that hold a layer's counts and held
    experts when it starts inside the planner's block (`kernel(state=...)`), or None where
    they stay in the global scratch (too many experts, or the start kernels write them). One
    shape per power of two of ranks, so few kernels are compiled."""
    rows = 1 << (num_ranks - 1).bit_length()
    cols = min(SHARED_STATE_ITEMS // rows, SHARED_STATE_EXPERTS)
    if not starts_inline(num_ranks, num_experts) or num_experts > cols:
        return None
    return rows, cols


def starts_inline(num_ranks: int, num_experts: int) -> bool:
    """Whether a launch for layers of this shape zeroes and splits inside the planner's block
    (`kernel(inline_start=True)`) rather than in the two start kernels first."""
    return num_ranks * num_experts <= INLINE_START_ITEMS


def blocks_as_rows(outputs: tuple):
    """The plan's expert blocks blk_assign [L, B, S, G] as rows [L, B S, G] (a view)."""
    num_layers, blocks, sources, ranks = outputs[3].shape
    return outputs[3].reshape(num_layers, blocks * sources, ranks)


def launch_args(load, home, window, consts: tuple, scratch: tuple, outputs: tuple) -> tuple:
    """`kernel`'s arguments for a launch."""
    return (load, home, window, *consts, *scratch, blocks_as_rows(outputs), *outputs)


def start_args(load, home, consts: tuple, scratch: tuple, outputs: tuple) -> tuple:
    """The arguments of the two start kernels (`_zero_kernel`, `_split_kernel`) of a launch
    whose `kernel` takes (load, home, window, *consts, *scratch, *outputs)."""
    cnt, held, blk_of, _, held_bits, _, _, sums, start_status = scratch[:9]
    _, a, b, tt, _, hcount, hlist, hpos = consts[:8]
    return ((cnt, held_bits, sums, start_status, blocks_as_rows(outputs)),
            (load, home, hcount, hlist, hpos, tt, a, b, cnt, held, held_bits, blk_of, sums,
             start_status))


def launch_start(load, home, consts: tuple, scratch: tuple, outputs: tuple, num_layers: int,
                 stream) -> None:
    """The two start kernels of a launch (before `kernel`'s), on `stream`: a grid of the layers
    by blocks of START_THREADS threads, an item per thread for the split, about four for the
    zeroing (the expert blocks are most of it)."""
    num_ranks, num_experts = home.shape[1:]
    zero, split = start_args(load, home, consts, scratch, outputs)
    items = max(num_ranks * num_experts, zero[-1].shape[1] * num_ranks // 4)
    _zero_kernel[(num_layers, max(1, -(-items // START_THREADS))), START_THREADS, stream](*zero)
    grid = (num_layers, max(1, -(-num_ranks * num_experts // START_THREADS)))
    _split_kernel[grid, START_THREADS, stream](*split)


_KERNELS: dict = {}


def kernel(max_ranks: int, upto: int = FULL, stamps: bool = False, threads: int = THREADS,
           inline_start: bool = False, state: tuple[int, int] | None = None):
    """The kernel for layers of at most `max_ranks` ranks (a multiple of 32, made once).
    upto < FULL makes a profiling variant (experiments.planner.gpu_lite --profile) whose rounds
    end after step `upto` (0: the start alone; 1 rank order, 2 pair tests, 3 matching, 4 pair
    moves, 5 admission, 6 new blocks): it applies no move, so every round repeats the first
    round's work, and its plans mean nothing. stamps=True (GPU only) makes a kernel whose thread
    0 writes the SM's cycle counter into the scratch `stamps` [L, 2 + 9 R] after every step:
    the launch, the start, then each round's STAMP_STEPS (`step_cycles`). Past 256 threads
    per block the kernel is compiled with at most 65,536 / threads registers a thread (else
    such a block could not launch). inline_start=True makes a kernel that zeroes and splits its
    layer itself (the start kernels' items, `_zero_items` and `_split_items`, over its block)
    instead of reading what `launch_start`'s kernels left (`starts_inline`); with it, state
    (RP, EP) keeps the layer's counts and held experts in shared arrays of that shape, its held
    bits in [EP, W] and its experts' blocks in [EP] (its layers have at most RP ranks and EP
    experts; `shared_state`) instead of the global scratch."""
    if state is not None and not inline_start:
        raise ValueError("state needs inline_start: the start kernels write the global scratch")
    regs = None if threads <= 256 or SIMULATOR else 65536 // threads
    key = (max_ranks, upto, stamps, regs, inline_start, state)
    if key in _KERNELS:
        return _KERNELS[key]
    UPTO = upto  # noqa: N806 (a compile-time constant)
    STAMPS = stamps  # noqa: N806
    INLINE = inline_start  # noqa: N806
    GM = max_ranks  # noqa: N806 (compile-time sizes of the shared arrays)
    STATE = state is not None  # noqa: N806
    RP, EP = state if STATE else (1, 1)  # noqa: N806
    WP = (RP + 31) // 32  # noqa: N806
    PM = GM // 2  # noqa: N806
    WM = GM // 32  # noqa: N806
    # Up to 32 ranks the pools live in shared memory (17 KB); beyond, in the global scratch.
    SMALL = GM <= 32  # noqa: N806
    PS, GS = (PM, GM + 1) if SMALL else (1, 1)  # noqa: N806
    # Up to 128 ranks the pair tests' bit words live in shared memory; beyond, global scratch.
    BS, BW = (GM, WM) if GM <= 128 else (1, 1)  # noqa: N806

    @cuda.jit(**LINEINFO, **({} if regs is None else {"max_registers": regs}))
    def _lite_kernel(load, home, window, slots, a_tick, b_tick, tt, xt, hcount, hlist, hpos,
                     nhome, rank_home, max_rounds, eps_ppm, hot, max_reps, max_blocks,
                     cnt, held, blk_of, rep_on, held_bits, fits, reach, sums, start_status,
                     pool_s, pool_n, cum, pre_h, pre_c, stamps, blk_rows, rep, n_rep_out,
                     blk_expert, blk_assign, n_blk_out, rounds_out, moves_out, makespan_out,
                     status_out):  # pragma: no cover - device code
        layer = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        nt = cuda.blockDim.x
        load = load[layer]
        home = home[layer]
        hcount = hcount[layer]
        hlist = hlist[layer]
        hpos = hpos[layer]
        nhome = nhome[layer]
        rank_home = rank_home[layer]
        cnt = cnt[layer]
        held = held[layer]
        blk_of = blk_of[layer]
        rep_on = rep_on[layer]
        held_bits = held_bits[layer]
        fits = fits[layer]
        reach = reach[layer]
        sums = sums[layer]
        stamps = stamps[layer]
        if STAMPS and tid == 0:
            stamps[0] = clock64()
        cnt_sh = cuda.shared.array((RP, EP), int64)
        held_sh = cuda.shared.array((RP, EP), uint8)
        held_bits_sh = cuda.shared.array((EP, WP), uint32)
        blk_of_sh = cuda.shared.array(EP, int64)
        if STATE:  # the counts, held experts, held bits and blocks in shared memory (the
            # rank sums stay global: every item adds into them, and a 64-bit atomic add on
            # shared memory is a compare-and-swap loop that contending lanes repeat)
            cnt = cnt_sh
            held = held_sh
            held_bits = held_bits_sh
            blk_of = blk_of_sh
        if INLINE:  # the start kernels' work, over this block
            _zero_items(tid, nt, layer, home.shape[0], home.shape[1], cnt, held_bits, sums,
                        start_status, blk_rows[layer])
            cuda.syncthreads()
            _split_items(tid, nt, layer, load, home, hcount, hlist, hpos, tt, a_tick, b_tick,
                         cnt, held, held_bits, blk_of, sums, start_status)
            cuda.syncthreads()
        pool_s = pool_s[layer]
        pool_n = pool_n[layer]
        cum = cum[layer]
        pre_h = pre_h[layer]
        pre_c = pre_c[layer]
        rep = rep[layer]
        blk_expert = blk_expert[layer]
        blk_assign = blk_assign[layer]
        num_ranks, num_experts = home.shape
        ranks32 = (num_ranks + 31) // 32 * 32  # the ranks in whole warps
        # Loops over [rows, width] items step a (row, column) pair from item tid by nt items
        # (a 64-bit division per item, and Numba's strided range loops, cost about a hundred
        # instructions each: the loops are while loops without divisions).
        row_g, col_g, drow_g, dcol_g = _first_item(tid, nt, num_ranks)
        nw = (num_ranks + 31) >> 5  # bit words over the ranks
        # Items (hot position, one of the experts its rank holds): home lists and replica rows.
        span = rank_home.shape[1] + rep_on.shape[1]
        row_x, col_x, drow_x, dcol_x = _first_item(tid, nt, span)
        # A warp per pair in rules 2-4 (with one thread, as the sequential run has, a warp of
        # one lane).
        width = 32 if nt >= 32 else 1
        lane = tid & 31 if nt >= 32 else 0
        warp = tid >> 5 if nt >= 32 else 0
        nwarps = nt >> 5 if nt >= 32 else 1
        # Loops over [rows, words] items, a warp per item (the bit words of fits and elig).
        row_w, col_w, drow_w, dcol_w = _first_item(warp, nwarps, nw)
        A = a_tick  # noqa: N806 (the cost model's letters)
        B = b_tick  # noqa: N806

        comp = cuda.shared.array(GM, int64)
        tin = cuda.shared.array(GM, int64)
        tout = cuda.shared.array(GM, int64)
        times = cuda.shared.array(GM, int64)
        order = cuda.shared.array(GM, int64)
        wt = cuda.shared.array(GM, int64)
        used = cuda.shared.array(GM, int64)
        sent = cuda.shared.array(GM, int64)
        recv = cuda.shared.array(GM, int64)
        elig = cuda.shared.array((GM, WM), uint32)
        fits_s = cuda.shared.array((BS, BW), uint32)
        reach_s = cuda.shared.array((BS, BW), uint32)
        if GM <= 128:
            fits = fits_s
            reach = reach_s
        pair_h = cuda.shared.array(PM, int64)
        pair_c = cuda.shared.array(PM, int64)
        pair_e = cuda.shared.array(PM, int64)
        pair_x = cuda.shared.array(PM, int64)
        wbest = cuda.shared.array(32, int64)  # the simulator's warp minima and maxima
        pair_len = cuda.shared.array(PM, int64)
        pair_src = cuda.shared.array(PM, int64)  # the copy source at the pair move (-2: none)
        pair_sent = cuda.shared.array(PM, int64)  # that source's sent window then
        new_blk = cuda.shared.array(PM, int64)
        ints = cuda.shared.array(_NINTS, int64)
        # One allocation per line: the simulator tells shared arrays apart by their line.
        pool_s_s = cuda.shared.array((PS, GS), int64)
        pool_n_s = cuda.shared.array((PS, GS), int64)
        cum_s = cuda.shared.array((PS, GS), int64)
        pre_h_s = cuda.shared.array((PS, GS), int64)
        pre_c_s = cuda.shared.array((PS, GS), int64)
        if SMALL:
            pool_s, pool_n, cum, pre_h, pre_c = pool_s_s, pool_n_s, cum_s, pre_h_s, pre_c_s

        # The start: checks, windows in ticks, zero state.
        if tid == 0:
            for k in range(_NINTS):
                ints[k] = 0
        g = tid
        while g < num_ranks:
            wt[g] = _window_ticks(window[layer, g])
            used[g] = 0
            sent[g] = 0
            recv[g] = 0
            g += nt
        cuda.syncthreads()
        # The static split's counts, held experts and sums came from the start kernels.
        g = tid
        while g < num_ranks:
            if wt[g] < 0:
                cuda.atomic.max(ints, _STATUS, 2)
            g += nt
        if tid == 0 and start_status[layer] != 0:
            cuda.atomic.max(ints, _STATUS, start_status[layer])
        cuda.syncthreads()
        if ints[_STATUS] == 0:
            e = tid
            while e < num_experts:
                total = 0  # e's tokens: the static split gives each one to one holder
                for j in range(hcount[e]):
                    total += cnt[hlist[e, j], e]
                if total >= KEY_MAX_TOKENS:
                    cuda.atomic.max(ints, _STATUS, 3)
                e += nt
            g = tid
            while g < num_ranks:
                t = sums[0, g]
                into = sums[1, g]
                out = sums[2, g]
                comp[g] = t
                tin[g] = into
                tout[g] = out
                if t + 2 * (into if into > out else out) >= KEY_MAX_TIME:
                    cuda.atomic.max(ints, _STATUS, 3)
                g += nt
        cuda.syncthreads()
        if STAMPS and tid == 0:
            stamps[1] = clock64()
        status = ints[_STATUS]
        rounds = 0
        moves = 0
        while status == 0 and rounds < max_rounds:
            if UPTO == 0:  # a profiling variant: the start alone
                break
            rounds += 1
            sbase = 2 + _NSTAMPS * (rounds - 1)  # this round's clock stamps (STAMPS)
            # Rank times, their sum, and each rank's position (slowest first).
            if tid == 0:
                ints[_TOTAL] = 0
                ints[_NHOT] = 0
                ints[_NPAIRS] = 0
                ints[_NNEW] = 0
            g = tid
            while g < num_ranks:
                it = tin[g] if tin[g] > tout[g] else tout[g]
                times[g] = comp[g] + 2 * it
                for w in range(nw):
                    reach[g, w] = 0
                g += nt
            # Bit c of fits[g]: a copy from g to c fits (c has a free slot; g's sent and c's
            # received window hold it: lite.copy_source's test). A warp per (rank g, word w), a
            # lane per rank c of the word; the warp's ballot is the word. The test is bitwise
            # (a lane past the ranks reads rank 0's entries and is masked), so its loads go out
            # together rather than each behind a branch on the one before.
            g, w = row_w, col_w
            base = 0
            while base < num_ranks * nw:  # the same trip count in every warp (simulator)
                bits = uint32(0)
                if g < num_ranks:
                    j = lane
                    while j < 32:
                        c = (w << 5) + j
                        inside = c < num_ranks
                        c = c if inside else 0
                        x = xt[g, c]
                        fit = inside & (used[c] < slots[c]) & (sent[g] + x <= wt[g]) & (
                            recv[c] + x <= wt[c])
                        if fit:
                            bits = uint32(bits | uint32(1 << j))
                        j += width
                bits = _warp_bits(bits, wbest, warp, lane)
                if g < num_ranks and lane == 0:
                    fits[g, w] = bits
                g, w = _next_item(g, w, drow_w, dcol_w, nw)
                base += nwarps
            cuda.syncthreads()
            if STAMPS and tid == 0:
                stamps[sbase + 0] = clock64()
            g = tid  # whole warps (lanes past the ranks add 0)
            while g < ranks32:
                lanes_add(ints, _TOTAL, times[g] if g < num_ranks else 0)
                g += nt
            # Each rank's position: a warp per rank g counts the ranks ahead of it (slower, or
            # as slow with a lower index), a ballot per 32 of them.
            g = warp
            base = 0
            while base < num_ranks:  # the same trip count in every warp (simulator)
                t_g = times[g] if g < num_ranks else 0
                p = 0
                q = lane
                while q - lane < num_ranks:
                    p += _warp_count(g < num_ranks and q < num_ranks and (
                        times[q] > t_g or (times[q] == t_g and q < g)), wbest, warp, lane)
                    q += width
                if g < num_ranks and lane == 0:
                    order[p] = g
                g += nwarps
                base += nwarps
            cuda.syncthreads()
            if STAMPS and tid == 0:
                stamps[sbase + 1] = clock64()
            if UPTO == 1:  # a profiling variant: the round ends here
                continue
            # Which (hot position i, faster position p > i) pairs could move (lite.can_move), in
            # bit words over ranks: bit c of reach[i], c holds or can receive one of the experts
            # with tokens on h = order[i] (its held bits, or the fits of one of its home
            # holders), for every position while the hot ranks are counted (an item per
            # (position, expert), OR-ed atomically: a warp's items cover few positions); then
            # bit p of elig[i] for the hot positions (a warp per (position, word), a lane per p).
            total = ints[_TOTAL]
            t_top = times[order[0]]
            g = tid
            while g < ranks32:
                is_hot = g < num_ranks and (16 * num_ranks * times[g]
                                            > (16 - hot) * num_ranks * t_top + hot * total)
                lanes_add(ints, _NHOT, 1 if is_hot else 0)
                g += nt
            i = row_x  # an item per (position, expert its rank holds)
            j = col_x
            while i < num_ranks:
                h = order[i]
                if j < nhome[h] + used[h]:
                    e = rank_home[h, j] if j < nhome[h] else rep_on[h, j - nhome[h]]
                    if cnt[h, e] > 0:
                        for w in range(nw):
                            bits = held_bits[e, w]
                            for k in range(hcount[e]):
                                bits = uint32(bits | fits[hlist[e, k], w])
                            if bits != 0:
                                cuda.atomic.or_(reach, (i, w), uint32(bits))
                i, j = _next_item(i, j, drow_x, dcol_x, span)
            cuda.syncthreads()
            if STAMPS and tid == 0:
                stamps[sbase + 2] = clock64()
            num_hot = ints[_NHOT]
            i, w = row_w, col_w
            base = 0
            while base < num_hot * nw:  # the same trip count in every warp (simulator)
                bits = uint32(0)
                if i < num_hot:
                    t_h = times[order[i]]
                    j = lane
                    while j < 32:
                        p = (w << 5) + j
                        if p > i and p < num_ranks:
                            c = order[p]
                            if times[c] + A + B < t_h and (reach[i, c >> 5] >> (c & 31)) & 1:
                                bits = uint32(bits | uint32(1 << j))
                        j += width
                bits = _warp_bits(bits, wbest, warp, lane)
                if i < num_hot and lane == 0:
                    elig[i, w] = bits
                i, w = _next_item(i, w, drow_w, dcol_w, nw)
                base += nwarps
            cuda.syncthreads()
            if STAMPS and tid == 0:
                stamps[sbase + 3] = clock64()
            if UPTO == 2:  # a profiling variant: the round ends here
                continue
            if tid == 0:  # the CPU kernel's matching: hot ranks in order, fastest untaken first
                taken = cuda.local.array(WM, uint32)  # bit p: position p is in a pair
                for w in range(nw):
                    taken[w] = 0
                n_pairs = 0
                for i in range(num_hot):
                    if (taken[i >> 5] >> (i & 31)) & 1:
                        continue
                    taken[i >> 5] = uint32(taken[i >> 5] | uint32(1 << (i & 31)))
                    for w in range(nw - 1, -1, -1):
                        # uint32 ^ uint32 and & type as uint64 in Numba: cast back, or clz
                        # would count 64 bits and `top` go negative.
                        bits = uint32(elig[i, w] & uint32(taken[w] ^ uint32(0xFFFFFFFF)))
                        if bits != 0:  # the fastest untaken candidate: the highest bit left
                            top = 31 - cuda.clz(bits)
                            taken[w] = uint32(taken[w] | uint32(1 << top))
                            pair_h[n_pairs] = order[i]
                            pair_c[n_pairs] = order[w * 32 + top]
                            n_pairs += 1
                            break
                ints[_NPAIRS] = n_pairs
            cuda.syncthreads()
            if STAMPS and tid == 0:
                stamps[sbase + 4] = clock64()
            if UPTO == 3:  # a profiling variant: the round ends here
                continue
            n_pairs = ints[_NPAIRS]
            # Rules 2-4, a warp per pair from its expert to its amount, with no block barrier
            # between them: every lane holds the pair's state (h, c, e, the pool's length and
            # totals, the grid's range and best), and the lanes combine their values with
            # shuffles. Every warp runs the same number of pair slots (the simulator's
            # warp_sync and warp_any are block barriers).
            first = 0  # the pair slots: every warp runs as many (no division)
            while first < n_pairs:
                i = first + warp
                first += nwarps
                live = i < n_pairs
                h = pair_h[i] if live else 0
                c = pair_c[i] if live else 0
                # Rules 2-4 and the gain test (lite_device._pair_move: a lane per expert h
                # holds, the pool laid out from the lanes' prefix sums, a lane per grid point).
                _pair_move(i, live, h, c, times[h], nhome[h], rank_home, rep_on, cnt, held,
                           blk_of, (used, slots, sent, recv, wt, xt, hcount, hlist), num_ranks,
                           tt, blk_assign, load, home, hpos, (comp, tin, tout), A, B, eps_ppm,
                           (pool_s, pool_n, cum, pre_h, pre_c),
                           (pair_len, pair_e, pair_x, pair_src, pair_sent), wbest, warp, lane,
                           width)
            cuda.syncthreads()
            if STAMPS and tid == 0:
                stamps[sbase + 5] = clock64()
            if UPTO == 4:  # a profiling variant: the round ends here
                continue
            # Thread 0 admits the moves in pair order (the copy sources came with the pair
            # moves: lite_device._admit_source).
            if tid == 0:
                n_rep = ints[_NREP]
                n_blk = ints[_NBLK]
                n_new = 0
                admitted = 0
                for i in range(n_pairs):
                    e = pair_e[i]
                    if e < 0:
                        continue
                    c = pair_c[i]
                    src = _admit_source(i, e, c, pair_src, pair_sent,
                                       (used, slots, sent, recv, wt, xt, hcount, hlist))
                    if src != -2 and (src < 0 or n_rep >= max_reps):  # a copy, refused
                        pair_e[i] = -1
                        continue
                    if blk_of[e] < 0:
                        if n_blk >= max_blocks:
                            pair_e[i] = -1
                            continue
                        blk_of[e] = n_blk
                        blk_expert[n_blk] = e
                        new_blk[n_new] = n_blk
                        n_new += 1
                        n_blk += 1
                    if src >= 0:
                        held_bits[e, c >> 5] |= uint32(1 << (c & 31))
                        n_rep = _add_replica(c, e, src, n_rep, rep, held, rep_on, used, sent,
                                             recv, xt)
                    admitted += 1
                ints[_NREP] = n_rep
                ints[_APPLIED] = admitted  # the moves the apply step makes
                ints[_NBLK] = n_blk
                ints[_NNEW] = n_new
            cuda.syncthreads()
            if STAMPS and tid == 0:
                stamps[sbase + 6] = clock64()
            if UPTO == 5:  # a profiling variant: the round ends here
                continue
            n_new = ints[_NNEW]
            q = row_g  # a row (block q, source s) per item; the start zeroed every block
            s = col_g
            while q < n_new:
                b = new_blk[q]
                e = blk_expert[b]
                for j in range(hcount[e]):  # the static split has tokens on holders alone
                    g = hlist[e, j]
                    blk_assign[b, s, g] = _share(load, home, hpos, hcount, s, e, g)
                q, s = _next_item(q, s, drow_g, dcol_g, num_ranks)
            cuda.syncthreads()
            if STAMPS and tid == 0:
                stamps[sbase + 7] = clock64()
            if UPTO == 6:  # a profiling variant: the round ends here
                continue
            # Apply the takes: a thread per (pair, pool entry); integer atomics.
            i = row_g
            q = col_g
            while i < n_pairs:
                e = pair_e[i]
                if e >= 0 and q < pair_len[i]:
                    x = pair_x[i]
                    take = x - cum[i, q]
                    if take > pool_n[i, q]:
                        take = pool_n[i, q]
                    if take > 0:
                        h = pair_h[i]
                        c = pair_c[i]
                        s = pool_s[i, q]
                        b = blk_of[e]
                        blk_assign[b, s, h] -= take
                        blk_assign[b, s, c] += take
                        cuda.atomic.add(tout, s, take * (tt[s, c] - tt[s, h]))
                i, q = _next_item(i, q, drow_g, dcol_g, num_ranks)
            i = tid
            while i < n_pairs:
                e = pair_e[i]
                if e >= 0:
                    h = pair_h[i]
                    c = pair_c[i]
                    x = pair_x[i]
                    # The traffic into h and c from the prefix sums, as _eval_amount counts it.
                    lo = _pool_entry(x, pair_len[i], cum[i])
                    r = x - cum[i, lo]
                    s = pool_s[i, lo]
                    cuda.atomic.add(tin, h, -(pre_h[i, lo] + r * tt[s, h]))
                    cuda.atomic.add(tin, c, pre_c[i, lo] + r * tt[s, c])
                    d_h = -B * x
                    if cnt[h, e] == x:
                        d_h -= A
                    d_c = B * x
                    if cnt[c, e] == 0:
                        d_c += A
                    cuda.atomic.add(comp, h, d_h)
                    cuda.atomic.add(comp, c, d_c)
                    cnt[h, e] -= x
                    cnt[c, e] += x
                i += nt
            cuda.syncthreads()
            if STAMPS and tid == 0:
                stamps[sbase + 8] = clock64()
            applied = ints[_APPLIED]
            moves += applied
            cuda.syncthreads()
            if applied == 0:
                break

        # The outputs.
        if tid == 0:
            ints[_MAKESPAN] = 0
        cuda.syncthreads()
        n_rep = ints[_NREP]
        n_blk = ints[_NBLK]
        if status == 0:
            g = tid
            while g < ranks32:
                t = 0
                if g < num_ranks:
                    t = comp[g] + 2 * (tin[g] if tin[g] > tout[g] else tout[g])
                lanes_max(ints, _MAKESPAN, t)
                g += nt
        k = n_rep * 3 + tid
        while k < rep.shape[0] * 3:
            rep[k // 3, k % 3] = -1
            k += nt
        k = n_blk + tid
        while k < blk_expert.shape[0]:
            blk_expert[k] = -1
            k += nt
        cuda.syncthreads()
        if tid == 0:
            n_rep_out[layer] = n_rep
            n_blk_out[layer] = n_blk
            rounds_out[layer] = rounds if status == 0 else 0
            moves_out[layer] = moves
            makespan_out[layer] = ints[_MAKESPAN]
            status_out[layer] = status

    _KERNELS[key] = _lite_kernel
    return _lite_kernel


def kernel_ranks(num_ranks: int) -> int:
    """The kernel (its shared arrays' length) that plans layers of num_ranks ranks: the next
    multiple of 32."""
    return max(32, -(-num_ranks // 32) * 32)


class HostArrays(NamedTuple):
    """What a launch takes besides load, home and window, as numpy arrays: consts (slots, the
    cost model in ticks, the home lists, the rules and plan limits, in the kernel's order),
    scratch and outputs as (shape, dtype) pairs, and the plan limits."""

    consts: tuple
    scratch: tuple
    outputs: tuple
    max_reps: int
    max_blocks: int


def host_arrays(home: np.ndarray, slots: np.ndarray, cost: CostModel,
                rules: LiteRules) -> HostArrays:
    """The kernel's other arguments for home bool [L, G, E] (validated), slots int64 [G]."""
    num_layers, num_ranks, num_experts = home.shape
    a, b, tt, xt = cost_ticks(cost.alpha, cost.beta, cost.token_time, cost.transfer_time)
    lists = [home_lists(h) for h in home]

    def stack(k):
        width = max(x[k].shape[-1] for x in lists)
        rows = [np.pad(x[k], ((0, 0), (0, width - x[k].shape[-1])), constant_values=-1)
                if x[k].ndim == 2 else x[k] for x in lists]
        return np.ascontiguousarray(np.stack(rows), np.int64)

    max_reps, max_blocks = plan_limits(slots, num_experts, num_ranks)
    consts = (np.ascontiguousarray(slots, np.int64), a, b, tt, xt, stack(0), stack(1),
              stack(2), stack(3), stack(4), rules.max_rounds, rules.eps_ppm,
              rules.hot_sixteenths, max_reps,
              max_blocks)
    L, G, E = num_layers, num_ranks, num_experts  # noqa: N806 (the shape letters)
    pairs = max(G // 2, 1)
    words = -(-G // 32)
    i64 = np.int64
    scratch = (((L, G, E), i64), ((L, G, E), np.uint8), ((L, E), i64),  # cnt, held, blk_of
               ((L, G, max(int(np.max(slots, initial=0)), 1)), i64),  # rep_on
               ((L, E, words), np.uint32), ((L, G, words), np.uint32),  # held_bits, fits
               ((L, G, words), np.uint32), ((L, 3, G), i64), ((L,), i64),  # reach, sums,
               # start_status
               ((L, pairs, G), i64), ((L, pairs, G), i64),  # pool_s, pool_n
               ((L, pairs, G + 1), i64), ((L, pairs, G + 1), i64),
               ((L, pairs, G + 1), i64),  # cum, pre_h, pre_c
               ((L, 2 + _NSTAMPS * rules.max_rounds + 3), i64))  # stamps (the last three:
               # lite_small's start parts)
    reps, blocks = max(max_reps, 1), max(max_blocks, 1)
    outputs = (((L, reps, 3), i64), ((L,), i64), ((L, blocks), i64), ((L, blocks, G, G), i64),
               ((L,), i64), ((L,), i64), ((L,), i64), ((L,), i64), ((L,), i64))
    return HostArrays(consts, scratch, outputs, max_reps, max_blocks)


class CudaLite(LayerPlanner):
    """The lite planner on the GPU for one placement, slot budget and cost model (home bool
    [G, E] or [L, G, E], slots int or int [G]; rules: LiteRules; threads per block: a multiple
    of 32). Validates all of it once and keeps the cost model in ticks, the home
    lists, the scratch and the output buffers on the device; `plan(load, window)` launches.
    small: plan with probe.planner.lite_small's kernel (None: wherever `small_fits` holds, for
    the full planner; True where it does not: ValueError; False: this module's kernel);
    `self.small` says which one a launch runs."""

    def __init__(self, home: np.ndarray, slots: np.ndarray | int, cost: CostModel,
                 rules: LiteRules | None = None, *, num_layers: int = 1,
                 threads: int = THREADS, upto: int = FULL, stamps: bool = False,
                 inline_start: bool | None = None, small: bool | None = None) -> None:
        if threads == 1:  # the kernel's warp collectives need whole warps
            raise ValueError("lite_cuda needs a multiple of 32 threads per block, got 1")
        super().__init__(home, slots, cost, num_layers=num_layers, threads=threads,
                         max_ranks=MAX_RANKS, name="lite_cuda")
        self.rules = lite._rules(rules)
        self.upto = upto  # FULL, or a profiling variant of `kernel`
        if stamps and SIMULATOR:
            raise ValueError("lite_cuda's clock stamps need a GPU (the simulator has no clock)")
        self.stamps = stamps  # the kernel that stamps its steps (`step_cycles`)
        # Whether the planner's block starts its layer itself (None: `starts_inline`'s choice),
        # and where it then keeps the layer's state (`shared_state`): decided once, not per plan.
        self._inline = starts_inline(*self.shape) if inline_start is None else inline_start
        self._state = shared_state(*self.shape) if self._inline else None
        self.max_ranks = kernel_ranks(self.shape[0])
        # Whether layers of this shape take the small-layer kernel (probe.planner.lite_small;
        # None: wherever it fits, for the full planner, not a profiling variant).
        fits = upto == FULL and small_fits(*self.shape, self.slots, threads)
        if small and not fits:
            raise ValueError(f"lite_cuda: the small-layer kernel does not plan layers of "
                             f"{self.shape[0]} ranks and {self.shape[1]} experts with "
                             f"{threads} threads (lite_small.small_fits)")
        self.small = fits if small is None else bool(small)
        host = host_arrays(self._home.copy_to_host(), self.slots, cost, self.rules)
        self.max_reps, self.max_blocks = host.max_reps, host.max_blocks
        dev = cuda.to_device
        self._consts = tuple(dev(a) if isinstance(a, np.ndarray) else a for a in host.consts)
        self._scratch = tuple(cuda.device_array(shape, dtype) for shape, dtype in host.scratch)
        self.out = CudaLitePlan(*(cuda.to_device(np.zeros(shape, dtype))
                                  for shape, dtype in host.outputs))

    def _fit_shape(self, num_ranks: int, num_experts: int) -> None:
        if num_experts >= 1 << _EXPERT_BITS:
            raise ValueError(f"lite_cuda plans fewer than {1 << _EXPERT_BITS} experts, got "
                             f"{num_experts}")

    def plan(self, load, window, stream=None) -> CudaLitePlan:
        """Launch on `stream` (torch's current stream for torch tensors; else the default) and
        return the output buffers (device arrays; torch CUDA tensors for torch inputs), without
        synchronising. load int64 [L, S, E], window float64 [L, G] (seconds)."""
        load_d, window_d, stream = self.launch_inputs(load, window, stream)
        args = launch_args(load_d, self._home, window_d, self._consts, self._scratch, self.out)
        if self.small:
            small_kernel(*small_shape(*self.shape), self.stamps)[
                self.num_layers, self.threads, stream](*args)
            return self.torch_out() if is_torch(load) else self.out
        if not self._inline:
            launch_start(load_d, self._home, self._consts, self._scratch, self.out,
                         self.num_layers, stream)
        kernel(self.max_ranks, self.upto, self.stamps, self.threads, self._inline, self._state)[
            self.num_layers, self.threads, stream](*args)
        return self.torch_out() if is_torch(load) else self.out


def lite_cuda_arrays(load, home, slots, window, cost: CostModel,
                     rules: LiteRules | None = None, threads: int = THREADS) -> list[tuple]:
    """numpy in, numpy out (copies both ways), for tests: load int64 [L, S, E], window float64
    [L, G]. Returns each layer's (status, rep, blk_expert, blk_assign, rounds, moves, makespan)
    as `lite.lite_core` returns them."""
    load = np.ascontiguousarray(load, dtype=np.int64)
    if load.ndim != 3:
        raise ValueError(f"load must be a 3-D [L, S, E] array, got shape {load.shape}")
    runner = CudaLite(home, slots, cost, rules, num_layers=load.shape[0], threads=threads)
    window = np.ascontiguousarray(window, dtype=np.float64)
    out = runner.plan(cuda.to_device(load), cuda.to_device(window))
    host = CudaLitePlan(*(a.copy_to_host() for a in out))
    layers = []
    for layer in range(load.shape[0]):
        n_rep, n_blk = int(host.num_replicas[layer]), int(host.num_blocks[layer])
        layers.append((int(host.status[layer]), host.replicas[layer, :n_rep],
                       host.blk_expert[layer, :n_blk], host.blk_assign[layer, :n_blk],
                       int(host.rounds[layer]), int(host.moves[layer]),
                       int(host.makespan[layer])))
    return layers


# A round's stamped steps: the rank order in two (the times and the copies' fits, then the
# positions), the pair tests in two (the hot count and reach words, then the eligible pairs),
# then the matching, the pair moves, the admission, the new blocks and the apply.
STAMP_STEPS = ("times and fits", "positions", "hot and reach", "eligible pairs", "matching",
               "pair moves", "admission", "new blocks", "apply")
_NSTAMPS = len(STAMP_STEPS)


def step_cycles(runner: CudaLite) -> list[dict]:
    """Each layer's cycles per step of the last launch of a runner made with stamps=True:
    {"start": cycles, "rounds": n, step: cycles summed over the rounds for each of
    STAMP_STEPS, "total": cycles from the launch to the last round's end, "per_round": each
    round's cycles}."""
    if not runner.stamps:
        raise ValueError("step_cycles needs a CudaLite made with stamps=True")
    stamps = runner._scratch[-1].copy_to_host()
    rounds = runner.out.rounds.copy_to_host()
    layers = []
    for layer in range(runner.num_layers):
        row, n = stamps[layer], int(rounds[layer])
        steps = (row[2:2 + _NSTAMPS * n].reshape(n, _NSTAMPS) if n
                 else np.zeros((0, _NSTAMPS), np.int64))
        ends = np.concatenate([[row[1]], steps.reshape(-1)])  # every step's end, in order
        took = np.diff(ends).reshape(n, _NSTAMPS) if n else steps
        cycles = {"start": int(row[1] - row[0]), "rounds": n}
        cycles.update({name: int(took[:, k].sum()) for k, name in enumerate(STAMP_STEPS)})
        cycles["total"] = int(ends[-1] - row[0])
        cycles["per_round"] = [int(v) for v in took.sum(axis=1)]
        layers.append(cycles)
    return layers
