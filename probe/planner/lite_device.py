"""The lite planner's device-side helpers, shared by its two CUDA kernels.

probe.planner.lite_cuda (the generic kernel, one block per layer of up to 256 ranks) and
probe.planner.lite_small (layers whose whole state fits shared memory) both call these:
lite.py's scalar rules compiled a second time as device functions (`_device_twin`: the same
source serves the CPU kernel and the GPU), the warp collectives with the simulator's fallback
(`_lanes_in_scratch`: Numba's CUDA simulator has no shuffles or ballots), and the packed keys'
constants. Nothing here launches a kernel.
"""

from __future__ import annotations

import types

from numba import int64, uint32

from probe.planner import lite
from probe.planner.greedy import _static_share
from probe.planner.lite import GRID, KEY_MAX_TOKENS, KEY_TOKEN_BITS
from probe.planner.numba_cuda import (
    LINEINFO,
    WARP_SHUFFLES,
    cuda,
    device,
    warp_any,
    warp_bits,
    warp_count,
    warp_last,
    warp_max,
    warp_min,
    warp_scan,
    warp_sync,
)
from probe.planner.scalar import pool_entry

# Compiled with line information for a profiler (a branch between two loads then breaks NVVM).
LINES = bool(LINEINFO)

# The most arguments a call of an inlined device function may pass: CPython (3.11 and later)
# compiles a call of more than 30 arguments as a call with *args, and numba-cuda's inlining of
# `inline=True` device functions (at the Numba IR level) refuses such a call ("Calling a
# closure with *args is unsupported"; tests/test_cuda_inline_calls.py checks every call).
MAX_CALL_ARGS = 28
# A warp's 32 lanes are one pair's grid points in the amount's grid steps.
assert GRID == 32
_NONE = (1 << 62) + ((1 << 62) - 1)  # larger than every packed (f, x) key
_EXPERT_BITS = 16  # packed (tokens, -expert) keys: experts < 2**16


def _device_twin(fn, helpers: dict):
    """fn of lite.py compiled as a device function, its global names in helpers rebound."""
    names = dict(fn.__globals__)
    names.update(helpers)
    twin = types.FunctionType(fn.__code__, names, fn.__name__)
    return cuda.jit(device=True, **LINEINFO)(twin)


_HELPERS: dict = {"_static_share": device(_static_share, inline=True),
                  "pool_entry": device(pool_entry)}
for _fn in (*lite.HELPERS, lite.window_ticks):
    _py = getattr(_fn, "py_func", _fn)  # the helpers are Numba dispatchers
    _HELPERS[_py.__name__] = _device_twin(_py, _HELPERS)
_move_base = _HELPERS["move_base"]
_eval_amount = _HELPERS["eval_amount"]
_grid_point = _HELPERS["grid_point"]
_block_value = _HELPERS["block_value"]
_copy_source = _HELPERS["copy_source"]
_window_ticks = _HELPERS["window_ticks"]
_pool_entry = _HELPERS["pool_entry"]
_pool_source = _HELPERS["pool_source"]
_add_replica = _HELPERS["add_replica"]


@cuda.jit(device=True, inline=True, **LINEINFO)
def _first_item(tid, nt, width):  # pragma: no cover - device code
    """(row, column) of item tid of a loop over [rows, width] items, and the (rows, columns)
    that nt items add: the loop steps with `_next_item`, without a division per item."""
    row = tid // width
    step = nt // width
    return row, tid - row * width, step, nt - step * width


@cuda.jit(device=True, inline=True, **LINEINFO)
def _next_item(row, col, drow, dcol, width):  # pragma: no cover - device code
    """(row, column) of the item drow * width + dcol items after (row, col), dcol < width."""
    col += dcol
    if col >= width:
        return row + drow + 1, col - width
    return row + drow, col


# How the simulator's warps combine their lanes' values (`_lanes_in_scratch`).
_COMBINE_MAX, _COMBINE_MIN, _COMBINE_OR, _COMBINE_ADD = range(4)


@cuda.jit(device=True, inline=True, **LINEINFO)
def _lanes_in_scratch(v, scratch, w, lane, op):  # pragma: no cover - device code (simulator)
    """The simulator's warp collective (it has no shuffles or ballots): v of warp w's lanes
    combined by op (_COMBINE_*) through scratch[w] between block barriers, for every lane; so
    every thread of the block must call it as often. Lane 0 starts scratch[w] at its own v for
    a maximum or a minimum, at 0 for an OR or a sum."""
    cuda.syncthreads()
    if lane == 0:
        scratch[w] = v if op <= _COMBINE_MIN else 0  # a maximum or a minimum
    cuda.syncthreads()
    if op == _COMBINE_MAX:
        cuda.atomic.max(scratch, w, v)
    elif op == _COMBINE_MIN:
        cuda.atomic.min(scratch, w, v)
    elif op == _COMBINE_OR:
        cuda.atomic.or_(scratch, w, v)
    else:
        cuda.atomic.add(scratch, w, v)
    cuda.syncthreads()
    return scratch[w]


@cuda.jit(device=True, inline=True, **LINEINFO)
def _warp_best(v, scratch, w, lane, largest):  # pragma: no cover - device code
    """The maximum (largest) or the minimum of v over the lanes of warp w, for every lane:
    shuffles on a GPU; in the simulator `_lanes_in_scratch`."""
    if WARP_SHUFFLES:
        return warp_max(v) if largest else warp_min(v)
    return _lanes_in_scratch(v, scratch, w, lane, _COMBINE_MAX if largest else _COMBINE_MIN)


@cuda.jit(device=True, inline=True, **LINEINFO)
def _warp_bits(bits, scratch, w, lane):  # pragma: no cover - device code
    """The OR of bits over the lanes of warp w, for every lane, where each lane's bits are at
    most its own bit (1 << lane; a lane of a one-lane warp sets any): one ballot on a GPU; in
    the simulator `_lanes_in_scratch`."""
    if WARP_SHUFFLES:
        return warp_bits(bits)
    return uint32(_lanes_in_scratch(int64(bits), scratch, w, lane, _COMBINE_OR))


@cuda.jit(device=True, inline=True, **LINEINFO)
def _warp_count(flag, scratch, w, lane):  # pragma: no cover - device code
    """How many lanes of warp w have flag set, for every lane: a ballot and a population
    count on a GPU; in the simulator `_lanes_in_scratch`."""
    if WARP_SHUFFLES:
        return warp_count(flag)
    return _lanes_in_scratch(int64(1 if flag else 0), scratch, w, lane, _COMBINE_ADD)


@cuda.jit(device=True, inline=True, **LINEINFO)
def _key_expert(key):  # pragma: no cover - device code
    """The expert of a packed (tokens, -expert) key."""
    return ((1 << _EXPERT_BITS) - 1) - (key & ((1 << _EXPERT_BITS) - 1))
_share = _HELPERS["_static_share"]


@cuda.jit(device=True, inline=True, **LINEINFO)
def _best_amount(searching, n, n_a, pool_s, cum, pre_h, pre_c, e, h, c, cnt, comp, tin, tout,
                 A, B, tt, scratch, warp, lane, width):  # pragma: no cover - device code
    """Rule 4 on one warp: the amount's grid steps over a pair's pool of n entries and n_a
    tokens (a lane per grid point evaluates f(x), the warp's minimum of the packed (f, x),
    every lane narrows the range alike); returns the packed best (f << KEY_TOKEN_BITS) + x, or
    _NONE where the warp is not searching. Every warp of the block calls it (the simulator's
    warp_any and warp minimum are block barriers)."""
    lo = 1
    hi = n_a
    best = _NONE
    move = (0, 0, 0, 0, 0, 0, 0, 0, 0)
    if searching:  # what f(x) takes whatever x, once per pair
        move = _move_base(n, pool_s, cum, e, h, c, cnt, comp, tin, tout, A)
    while warp_any(searching):
        v = _NONE
        if searching:
            j = lane
            while j < GRID:
                x = _grid_point(j, lo, hi)
                f = _eval_amount(x, n, pool_s, cum, pre_h, pre_c, h, c, A, B, tt, move)
                k = (f << KEY_TOKEN_BITS) + x
                if k < v:
                    v = k
                j += width
        v = _warp_best(v, scratch, warp, lane, False)
        if searching:
            best = v
            if hi - lo < GRID:
                searching = False
            else:
                best_x = v & (KEY_MAX_TOKENS - 1)
                step = (hi - lo) // (GRID - 1) + 1
                lo = best_x - step if best_x - step > lo else lo
                hi = best_x + step if best_x + step < hi else hi
    return best


@cuda.jit(device=True, inline=True, **LINEINFO)
def _lay_pool(b, e, h, c, num_ranks, tt, blk, load, home, hpos, hcount, pool_s, pool_n, cum,
              pre_h, pre_c, lane, width):  # pragma: no cover - device code
    """Rule 3 on one warp: the pool of a pair's move of expert e from h to c (c's tokens, the
    other sources in rank order, h's), each entry's source, tokens and prefix sums (tokens,
    token-times to h, to c) written into the pair's rows; returns (entries, tokens). On a GPU a
    lane per source, each entry's place from the lanes' prefix sums; in the simulator (no
    shuffles) every lane lays the pool out and lane 0 writes it. b: e's block in blk, or -1
    (the static split of load)."""
    n = 0
    n_a = 0
    if WARP_SHUFFLES:
        n_h = 0
        n_c = 0
        base = 0
        while base <= num_ranks:
            q = base + lane
            a = 0
            s = 0
            if q <= num_ranks:
                s = _pool_source(q, h, c, num_ranks, tt)
                if s >= 0 and LINES:  # read both and select: NVVM refuses the branch
                    # between the two loads with line information ("Symbol name with
                    # unsupported characters")
                    a_blk = blk[b if b >= 0 else 0, s, h]
                    a_split = _share(load, home, hpos, hcount, s, e, h)
                    a = int64(a_blk if b >= 0 else a_split)
                elif s >= 0:
                    a = int64(_block_value(blk, b, s, e, h, load, home, hpos, hcount))
            v_h = a * tt[s, h] if a > 0 else 0
            v_c = a * tt[s, c] if a > 0 else 0
            at = warp_scan(1 if a > 0 else 0)
            sum_a = warp_scan(a)
            sum_h = warp_scan(v_h)
            sum_c = warp_scan(v_c)
            if a > 0:
                pool_s[n + at - 1] = s
                pool_n[n + at - 1] = a
                cum[n + at] = n_a + sum_a
                pre_h[n + at] = n_h + sum_h
                pre_c[n + at] = n_c + sum_c
            n += warp_last(at)
            n_a += warp_last(sum_a)
            n_h += warp_last(sum_h)
            n_c += warp_last(sum_c)
            base += width
        if lane == 0:
            cum[0] = 0
            pre_h[0] = 0
            pre_c[0] = 0
    else:
        for q in range(num_ranks + 1):
            s = _pool_source(q, h, c, num_ranks, tt)
            a = 0
            if s >= 0:
                a = int64(_block_value(blk, b, s, e, h, load, home, hpos, hcount))
            if a > 0:
                if lane == 0:
                    if n == 0:
                        cum[0] = 0
                        pre_h[0] = 0
                        pre_c[0] = 0
                    pool_s[n] = s
                    pool_n[n] = a
                    cum[n + 1] = cum[n] + a
                    pre_h[n + 1] = pre_h[n] + a * tt[s, h]
                    pre_c[n + 1] = pre_c[n] + a * tt[s, c]
                n += 1
                n_a += a
    return n, n_a


@cuda.jit(device=True, inline=True, **LINEINFO)
def _pair_move(i, live, h, c, t_h, nhome_h, rank_home, rep_on, cnt, held, blk_of, fit,
               num_ranks, tt, blk, load, home, hpos, times, A, B, eps_ppm, pool, out, scratch,
               warp, lane, width):  # pragma: no cover - device code
    """Rules 2-4 of pair i (hot rank h, time t_h, and cold rank c) on one warp, with no block
    barrier: its expert (a lane per expert h holds, the warp's maximum of (tokens, -expert)),
    its pool (`_lay_pool`), its amount (`_best_amount`) and the gain test; lane 0 writes
    pair_len[i], and pair_e[i] (-1: no move), pair_x[i]; the lane that chose the expert writes
    pair_src[i], the home holder that would copy it to c as things stand (-2: c holds it), and
    pair_sent[i], that holder's sent window then, so that rule 5 looks for a source again only
    where a copy admitted before this pair's was sent from it (`_admit_source`). A warp whose
    pair slot is past the pairs (live False) runs along: every warp makes as many calls (the
    simulator's collectives are block barriers). The arrays come in tuples (fit: copy_source's
    (used, slots, sent, recv, wt, xt, hcount, hlist); times: (comp, tin, tout); pool: the
    pairs' rows (pool_s, pool_n, cum, pre_h, pre_c); out: (pair_len, pair_e, pair_x, pair_src,
    pair_sent)) so that a call passes at most MAX_CALL_ARGS arguments."""
    used, slots, sent, recv, wt, xt, hcount, hlist = fit
    comp, tin, tout = times
    pool_s, pool_n, cum, pre_h, pre_c = pool
    pair_len, pair_e, pair_x, pair_src, pair_sent = out
    own = -1  # this lane's best candidate's key, and its copy source (-2: c holds it)
    own_src = -2
    if live:
        j = lane
        while j < nhome_h + used[h]:
            e = int64(rank_home[h, j]) if j < nhome_h else rep_on[h, j - nhome_h]
            n = int64(cnt[h, e])
            if n > 0:
                src = -2 if held[c, e] != 0 else _copy_source(e, c, used, slots, sent, recv,
                                                               wt, xt, hcount, hlist)
                k = (n << _EXPERT_BITS) + ((1 << _EXPERT_BITS) - 1 - e)
                if src != -1 and k > own:
                    own = k
                    own_src = src
            j += width
    key = _warp_best(own, scratch, warp, lane, True)
    if live and key >= 0 and own == key:  # the lane of the pair's expert (keys differ)
        pair_src[i] = own_src
        pair_sent[i] = sent[own_src] if own_src >= 0 else 0
    e = _key_expert(key) if key >= 0 else 0
    # The pair's pool rows; a warp past the pairs reads row 0 and writes nothing (its slot
    # may be past the rows: more warps than pair slots).
    row = i if live else 0
    n = 0
    n_a = 0
    if key >= 0:
        n, n_a = _lay_pool(blk_of[e], e, h, c, num_ranks, tt, blk, load, home, hpos, hcount,
                           pool_s[row], pool_n[row], cum[row], pre_h[row], pre_c[row], lane,
                           width)
    warp_sync()
    best = _best_amount(key >= 0 and n > 0, n, n_a, pool_s[row], cum[row], pre_h[row],
                        pre_c[row], e, h, c, cnt, comp, tin, tout, A, B, tt, scratch, warp, lane,
                        width)
    if live and lane == 0:
        pair_len[i] = n
        pair_e[i] = -1
        if key >= 0 and n > 0:
            best_f = best >> KEY_TOKEN_BITS
            if (t_h - best_f) * 1000000 > eps_ppm * t_h:
                pair_e[i] = e
                pair_x[i] = best & (KEY_MAX_TOKENS - 1)


@cuda.jit(device=True, inline=True, **LINEINFO)
def _admit_source(i, e, c, pair_src, pair_sent, fit):  # pragma: no cover - device code
    """Rule 5's copy source of pair i's expert e to its cold rank c (-2: c holds e, no copy;
    -1: none can copy it), from what the pair move found (`_pair_move`'s pair_src, pair_sent):
    a pair's c and its slot and received window are its own (the pairs' ranks differ) and a
    sent window only fills up, so that source is still copy_source's answer unless its sent
    window changed since (a copy admitted before this pair's in the round was sent from it);
    then it is looked for again. fit: copy_source's (used, slots, sent, recv, wt, xt, hcount,
    hlist)."""
    used, slots, sent, recv, wt, xt, hcount, hlist = fit
    src = pair_src[i]
    if src >= 0 and sent[src] != pair_sent[i]:
        src = _copy_source(e, c, used, slots, sent, recv, wt, xt, hcount, hlist)
    return src

