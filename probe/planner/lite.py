"""The lite planner: rounds of moves over disjoint rank pairs in integer time, built for the GPU.

The greedy and the parallel greedy decide in float64 and their CUDA kernels must repeat the CPU
kernels' floating-point order bit for bit; that order is a chain of dependent operations, and
their one-layer latency on an H100 stayed at 350-720 us. The lite planner decides in integer
ticks of `TICK` seconds instead: every rank time is an int64 sum, sums do not depend on the order
of their terms, and the GPU kernel (probe.planner.lite_cuda) can spread every sum, maximum and
search over the block's threads and still make the CPU kernel's plan exactly (how fast that
is, measured: lite_cuda's docstring).

Costs in ticks: A = round(alpha / TICK), B = round(beta / TICK), TT = round(token_time / TICK),
XT = ceil(transfer_time / TICK) (rounded up, so that copies that fit a window in ticks fit it in
seconds), W[g] = floor(window[g] / TICK). Rank times follow eq. 8 on those integers:
comp[g] = sum over experts with tokens on g of (A + B * tokens), tin / tout the token traffic,
t[g] = comp[g] + 2 * max(tin[g], tout[g]).

The rules (one round; the rounds stop when a round applies no move, or after max_rounds):
1. **Pairs.** The ranks in order of time, slowest first (ties to the lowest rank). Each hot
   rank (time above mean + (1 - f) * (max - mean), f = hot_sixteenths / 16, 0.75 by default),
   in that order and unless an earlier pair took it, is a hot rank h and takes the fastest rank
   c not taken yet that could gain (t_c + A + B < t_h) and can receive one of h's experts
   (rule 2 finds one); the pairs are disjoint.
2. **Expert.** Of the experts h holds (its home experts, then its replicas) with tokens on h,
   the one with the most tokens there (ties to the lowest expert) that c already holds, or
   that a home holder of e can copy to c: c has a free slot, and the copy fits the holder's
   sent and c's received window (both in ticks); of the holders that fit, the one with the
   cheapest transfer to c (ties to the lowest rank). One expert per pair and round.
3. **Pool.** The tokens of e that h computes, source by source: c's own first, then the other
   sources in rank order, leaving out a source whose link to c is dearer than its link to h
   (TT[s, c] > TT[s, h]: then no move lengthens a third rank's outgoing traffic, so the pairs of
   one round cannot harm each other), then h's own.
4. **Amount.** x tokens from the front of the pool, 1 <= x <= the pool's total X, minimising
   f(x) = max(t_h(x), t_c(x)), the two ranks' times after the move (ties to the smallest x),
   found by a grid search: 32 amounts spread evenly over [lo, hi] (all of them once
   hi - lo < 32), keep the best, narrow [lo, hi] to its neighbours' spacing around it, again.
   The move is made when it gains: (t_h - f) * 10**6 > eps_ppm * t_h.
5. **Apply** every pair's move against the round's starting choices, in pair order: a copy
   (rank c, expert e, the copy's source chosen again against the copies admitted before it),
   the expert's token block (the static split, made the first time e moves), the takes moved
   from column h to column c, and the traffic updated. A move whose copy no longer fits, or
   that needs a replica row or a block when none is left, is dropped.

On the default decode workload (results/scale.md) the lite planner balances about as the
parallel greedy does up to ep=64 (IR 1.004 at ep=8, 1.132 at ep=64 / 256 experts with 16
rounds, against 1.003 and 1.111), less well at ep=256 with one expert per rank (1.70 against
1.35).

The plan is compact: replica rows (rank, expert, source), and for each expert that moved, its
[S, G] assignment block (every other expert keeps the static split).

`lite_core` is the algorithm in plain Python over numpy arrays; `lite_arrays` is the same
function compiled by Numba (the host path), and probe.planner.lite_cuda's kernel makes the same
plan on the GPU (tests compare all three).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numba
import numpy as np

from probe.planner.greedy import _static_block, _static_share, plan_from_arrays
from probe.planner.problem import BalanceProblem, Plan, SolveResult
from probe.planner.scalar import pool_entry

__all__ = ["GRID", "KEY_MAX_TIME", "KEY_MAX_TOKENS", "TICK", "LiteRules", "lite_arrays",
           "lite_core", "lite_plan", "problem_ticks", "solve_lite", "window_ticks",
           "windows_ticks"]

# Seconds per tick of the integer times (10 ps: an alpha of 12.4 us is 1,240,000 ticks, a token
# time of 12.8 ns 1,280; rounding moves a cost by at most 5 ps).
TICK = 1e-11
# Amounts one step of the amount's grid search tries side by side (one warp on the GPU).
GRID = 32
# The GPU kernel packs (time, tokens) into one int64 for its atomic minimum: an expert's tokens
# stay below 2**KEY_TOKEN_BITS and the rank times below KEY_MAX_TIME ticks (1.37 s).
KEY_TOKEN_BITS = 24
KEY_MAX_TOKENS = 1 << KEY_TOKEN_BITS
# A rank's starting time must stay below KEY_MAX_TIME, a quarter of the key's range: an
# amount's f(x) adds to the cold rank's time at most the moved tokens' compute (part of the hot
# rank's time) and their traffic, which stays in range unless one expert's millions of tokens
# cross the slowest links. Past that the GPU's key would wrap and it could pick another
# amount than the CPU kernel: a feasible plan still, not the same one.
KEY_MAX_TIME = 1 << (61 - KEY_TOKEN_BITS)
# Largest window in ticks (an infinite window counts as this one).
_WINDOW_CAP = 1 << 62

# Layer status codes (the kernels' status output) and what they mean.
STATUS_ERRORS = {1: "load has a negative token count",
                 2: "window must be >= 0 seconds on every rank (no NaN)",
                 3: f"a rank time reaches 2**{61 - KEY_TOKEN_BITS} ticks or an expert's tokens "
                    f"2**{KEY_TOKEN_BITS}: too large for the lite planner's integer keys"}


# Compiled once and cached on disk, as the greedy's kernels are.
_jit = numba.njit(cache=True)


@dataclass(frozen=True)
class LiteRules:
    """The lite planner's parameters.

    max_rounds: most rounds of moves (each hot rank moves at most once a round); eps_ppm: least
    gain of a move, in millionths of the hot rank's time (an int >= 0); hot_sixteenths: f / 16,
    the share of ranks' spread that counts as hot: a rank is hot when its time is above
    mean + (1 - f) * (max - mean) (16: above the mean; 12, the default, is the parallel
    greedy's hot_fraction 0.75).
    """

    max_rounds: int = 16
    eps_ppm: int = 1000
    hot_sixteenths: int = 12

    def __post_init__(self) -> None:
        for name in ("max_rounds", "eps_ppm", "hot_sixteenths"):
            value = getattr(self, name)
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"LiteRules.{name} must be an int, got {value!r}")
        if self.max_rounds < 1:
            raise ValueError(f"LiteRules.max_rounds must be >= 1, got {self.max_rounds}")
        if not 0 <= self.eps_ppm < 10**6:
            raise ValueError(f"LiteRules.eps_ppm must be in [0, 10**6), got {self.eps_ppm}")
        if not 1 <= self.hot_sixteenths <= 16:
            raise ValueError(f"LiteRules.hot_sixteenths must be in [1, 16], got "
                             f"{self.hot_sixteenths}")


def window_ticks(w):
    """A window in seconds as whole ticks, rounded down (capped at 2**62; -1 for a negative or
    NaN window, which the planners reject). The same function runs on the GPU."""
    if not w >= 0.0:
        return -1
    q = w / TICK
    if q >= 4.0e18:
        return _WINDOW_CAP
    return int(math.floor(q))


def windows_ticks(window) -> np.ndarray:
    """int64 [G]: each rank's window in seconds as `window_ticks` (the CPU kernel's `wt`)."""
    return np.array([window_ticks(float(w)) for w in window], np.int64)


def problem_ticks(problem: BalanceProblem) -> tuple:
    """(A, B, TT, XT) of the problem's cost model in ticks: int, int, int64 [G, G] twice."""
    return cost_ticks(problem.cost.alpha, problem.cost.beta, problem.cost.token_time,
                      problem.cost.transfer_time)


def cost_ticks(alpha, beta, token_time, transfer_time) -> tuple:
    """(A, B, TT, XT): alpha, beta and token_time rounded to the nearest tick, transfer_time
    rounded up (module docstring)."""
    a = int(round(alpha / TICK))
    b = int(round(beta / TICK))
    tt = np.rint(np.asarray(token_time, np.float64) / TICK).astype(np.int64)
    xt = np.ceil(np.asarray(transfer_time, np.float64) / TICK).astype(np.int64)
    return a, b, tt, xt


def home_lists(home: np.ndarray) -> tuple:
    """(hcount [E], hlist [E, H], hpos [G, E], nhome [G], rank_home [G, M]) of a placement:
    e's home holders in rank order, g's position among them (-1 if none), and each rank's home
    experts in expert order (H, M: the longest lists, at least 1)."""
    home = np.asarray(home, dtype=np.bool_)
    num_ranks, num_experts = home.shape
    hcount = home.sum(axis=0).astype(np.int64)
    nhome = home.sum(axis=1).astype(np.int64)
    hlist = np.full((num_experts, max(1, int(hcount.max(initial=0)))), -1, np.int64)
    hpos = np.full((num_ranks, num_experts), -1, np.int64)
    rank_home = np.full((num_ranks, max(1, int(nhome.max(initial=0)))), -1, np.int64)
    for e in range(num_experts):
        holders = np.flatnonzero(home[:, e])
        hlist[e, :len(holders)] = holders
        hpos[holders, e] = np.arange(len(holders))
    for g in range(num_ranks):
        mine = np.flatnonzero(home[g])
        rank_home[g, :len(mine)] = mine
    return hcount, hlist, hpos, nhome, rank_home


@_jit
def pool_source(q, h, c, num_ranks, TT):
    """Rule 3's order: the source at place q of h -> c's pool (q = 0 .. G: c, the others in rank
    order, h), or -1 where the pool leaves the source out."""
    if q == 0:
        return c
    if q == num_ranks:
        return h
    s = q - 1
    if s == c or s == h or TT[s, c] > TT[s, h]:  # noqa: SIM109 (compiled for the GPU too)
        return -1
    return s


@_jit
def move_base(npool, pool_s, cum, e, h, c, cnt, comp, tin, tout, A):
    """What rule 4's f(x) of one pair's move takes whatever the amount x (`eval_amount`): the
    two ranks' compute (c's with e's fixed cost when c has none of e's tokens yet), h's count
    of e, their traffic in and out, the cap of c's own tokens taken (the pool's first entry when
    c gives any, else 0) and where h's own tokens start (the last entry when h gives any, else
    past the pool's end)."""
    own_c_cap = cum[1] if pool_s[0] == c else 0
    own_h_from = cum[npool - 1] if pool_s[npool - 1] == h else cum[npool]
    comp_c = comp[c] + (A if cnt[c, e] == 0 else 0)
    return (comp[h], cnt[h, e], comp_c, tin[h], tout[h], tin[c], tout[c], own_c_cap, own_h_from)


@_jit
def eval_amount(x, npool, pool_s, cum, pre_h, pre_c, h, c, A, B, TT, base):
    """f(x) of rule 4 from the pair's `move_base`: max(t_h, t_c), the two ranks' times after x
    tokens move from h to c, taken from the front of the pool (pool_s: sources; cum[k],
    pre_h[k], pre_c[k]: the tokens, token-times to h and token-times to c of the entries
    before k)."""
    comp_h0, n_he, comp_c0, tin_h, tout_h, tin_c, tout_c, own_c_cap, own_h_from = base
    k = pool_entry(x, npool, cum)
    r = x - cum[k]
    s = pool_s[k]
    to_h = pre_h[k] + r * TT[s, h]
    to_c = pre_c[k] + r * TT[s, c]
    own_c = x if x < own_c_cap else own_c_cap  # c's own tokens taken
    own_h = x - own_h_from if x > own_h_from else 0  # h's own tokens taken
    comp_h = comp_h0 - B * x
    if n_he == x:
        comp_h -= A
    comp_c = comp_c0 + B * x
    in_h = tin_h - to_h
    out_h = tout_h + own_h * TT[h, c]
    in_c = tin_c + to_c
    out_c = tout_c - own_c * TT[c, h]
    t_h = comp_h + 2 * (in_h if in_h > out_h else out_h)
    t_c = comp_c + 2 * (in_c if in_c > out_c else out_c)
    return t_h if t_h > t_c else t_c


@_jit
def copy_source(e, c, used, slots, sent, recv, wt, XT, hcount, hlist):
    """The home holder of e that copies it to rank c (-1 if none can): c needs a free slot; of
    e's home holders whose sent window and c's received window fit the copy, the one with the
    cheapest transfer to c (ties to the lowest rank)."""
    if used[c] >= slots[c]:
        return -1
    best = -1
    best_x = 0  # XT[best, c]
    room_c = wt[c] - recv[c]  # what c's received window still holds (integer ticks)
    for j in range(hcount[e]):
        g = hlist[e, j]
        x = XT[g, c]
        if sent[g] + x <= wt[g] and x <= room_c and (best < 0 or x < best_x):
            best = g
            best_x = x
    return best


@_jit
def add_replica(c, e, src, n_rep, rep, held, rep_on, used, sent, recv, XT):
    """Replica row n_rep: a copy of e on rank c read from src, with the slot and the windows it
    takes; returns the next row."""
    rep[n_rep, 0] = c
    rep[n_rep, 1] = e
    rep[n_rep, 2] = src
    held[c, e] = 1
    rep_on[c, used[c]] = e
    used[c] += 1
    sent[src] += XT[src, c]
    recv[c] += XT[src, c]
    return n_rep + 1


@_jit
def pick_expert(h, c, cnt, held, used, slots, sent, recv, wt, XT, hcount, hlist, nhome,
                rank_home, rep_on):
    """Rule 2: the expert hot rank h moves to cold rank c (-1 if none can move): of the experts
    h holds (its home experts in expert order, then its replicas in the order made) with tokens
    on h, the one with the most tokens there (ties to the lowest expert) that c holds or that a
    home holder can copy to c (`copy_source`)."""
    best = -1
    for j in range(nhome[h] + used[h]):
        e = rank_home[h, j] if j < nhome[h] else rep_on[h, j - nhome[h]]
        if cnt[h, e] <= 0:
            continue
        if not held[c, e] and copy_source(e, c, used, slots, sent, recv, wt, XT, hcount,
                                          hlist) < 0:
            continue
        if best < 0 or cnt[h, e] > cnt[h, best] or (cnt[h, e] == cnt[h, best] and e < best):
            best = e
    return best


@_jit
def can_move(h, c, cnt, held, used, slots, sent, recv, wt, XT, hcount, hlist, nhome,
             rank_home, rep_on):
    """Whether hot rank h has an expert to move to cold rank c (rule 1's test: pick_expert
    would find one), stopping at the first."""
    for j in range(nhome[h] + used[h]):
        e = rank_home[h, j] if j < nhome[h] else rep_on[h, j - nhome[h]]
        if cnt[h, e] > 0 and (held[c, e] or copy_source(e, c, used, slots, sent, recv, wt, XT,
                                                         hcount, hlist) >= 0):
            return True
    return False


@_jit
def grid_point(j, lo, hi):
    """The j-th of GRID amounts of a grid step over [lo, hi] (rule 4)."""
    if hi - lo < GRID:
        return lo + j if lo + j < hi else hi
    return lo + (j * (hi - lo)) // (GRID - 1)


@_jit
def block_value(blk_assign, b, s, e, g, load, home, hpos, hcount):
    """Tokens of (s, e) on rank g: e's block when it has one (b >= 0), else the static split."""
    if b >= 0:
        return blk_assign[b, s, g]
    return _static_share(load, home, hpos, hcount, s, e, g)


@_jit
def lite_arrays(load, home, slots, wt, A, B, TT, XT, hcount, hlist, hpos, nhome, rank_home,
              max_rounds, eps_ppm, hot, max_reps, max_blocks):
    """The lite planner on arrays, compiled by Numba (module docstring; `lite_core` is the same
    function run as plain Python): load int64 [S, E], home bool [G, E],
    slots int64 [G], wt int64 [G] (windows in ticks), A, B ints, TT and XT int64 [G, G] (ticks),
    the home lists of `home_lists`, max_rounds, eps_ppm, hot (LiteRules.hot_sixteenths), and
    the replica rows and blocks the plan may use. Returns (status, rep [n_rep, 3], blk_expert
    [n_blk], blk_assign [n_blk, S, G], rounds, moves, makespan in ticks); status 0, or a code of
    STATUS_ERRORS (then nothing is planned)."""
    num_ranks, num_experts = home.shape
    rep = np.full((max(max_reps, 1), 3), -1, np.int64)
    blk_expert = np.full(max(max_blocks, 1), -1, np.int64)
    blk_assign = np.zeros((max(max_blocks, 1), num_ranks, num_ranks), np.int64)
    status = 0
    for g in range(num_ranks):
        if wt[g] < 0:
            status = 2
    for s in range(num_ranks):
        for e in range(num_experts):
            if load[s, e] < 0 and status == 0:
                status = 1
    if status != 0:
        return status, rep[:0], blk_expert[:0], blk_assign[:0], 0, 0, 0

    # The start: the static split's token counts and traffic.
    cnt = np.zeros((num_ranks, num_experts), np.int64)
    tin = np.zeros(num_ranks, np.int64)
    tout = np.zeros(num_ranks, np.int64)
    for e in range(num_experts):
        total = 0
        for s in range(num_ranks):
            total += load[s, e]
            for j in range(hcount[e]):
                g = hlist[e, j]
                a = _static_share(load, home, hpos, hcount, s, e, g)
                cnt[g, e] += a
                tin[g] += a * TT[s, g]
                tout[s] += a * TT[s, g]
        if total >= KEY_MAX_TOKENS:
            status = 3
    comp = np.zeros(num_ranks, np.int64)
    for g in range(num_ranks):
        for e in range(num_experts):
            if cnt[g, e] > 0:
                comp[g] += A + B * cnt[g, e]
    times = np.zeros(num_ranks, np.int64)
    for g in range(num_ranks):
        times[g] = comp[g] + 2 * max(tin[g], tout[g])
        if times[g] >= KEY_MAX_TIME:
            status = 3
    if status != 0:
        return status, rep[:0], blk_expert[:0], blk_assign[:0], 0, 0, 0

    held = np.zeros((num_ranks, num_experts), np.bool_)
    for g in range(num_ranks):
        for e in range(num_experts):
            held[g, e] = home[g, e]
    max_slots = 1
    for g in range(num_ranks):
        max_slots = max(max_slots, slots[g])
    rep_on = np.full((num_ranks, max_slots), -1, np.int64)
    used = np.zeros(num_ranks, np.int64)
    sent = np.zeros(num_ranks, np.int64)
    recv = np.zeros(num_ranks, np.int64)
    blk_of = np.full(num_experts, -1, np.int64)
    n_rep = 0
    n_blk = 0
    moves = 0
    rounds = 0

    num_pairs = num_ranks // 2
    order = np.zeros(num_ranks, np.int64)
    taken = np.zeros(num_ranks, np.bool_)
    pair_h = np.zeros(max(num_pairs, 1), np.int64)
    pair_c = np.zeros(max(num_pairs, 1), np.int64)
    pair_e = np.full(max(num_pairs, 1), -1, np.int64)
    pair_x = np.zeros(max(num_pairs, 1), np.int64)
    pool_s = np.zeros((max(num_pairs, 1), num_ranks), np.int64)
    pool_n = np.zeros((max(num_pairs, 1), num_ranks), np.int64)
    pool_len = np.zeros(max(num_pairs, 1), np.int64)
    cum = np.zeros(num_ranks + 1, np.int64)
    pre_h = np.zeros(num_ranks + 1, np.int64)
    pre_c = np.zeros(num_ranks + 1, np.int64)

    for _ in range(max_rounds):
        rounds += 1
        total = 0
        for g in range(num_ranks):
            times[g] = comp[g] + 2 * max(tin[g], tout[g])
            total += times[g]
        for g in range(num_ranks):  # position of g, slowest first, ties to the lowest rank
            p = 0
            for q in range(num_ranks):
                if times[q] > times[g] or (times[q] == times[g] and q < g):
                    p += 1
            order[p] = g

        # Rule 1: hot ranks (above the hot_sixteenths threshold), slowest first, each take the
        # fastest rank not taken yet that could gain and can receive one of their experts.
        n_pairs = 0
        for g in range(num_ranks):
            taken[g] = False
        for i in range(num_ranks):
            h = order[i]
            if 16 * num_ranks * times[h] <= ((16 - hot) * num_ranks * times[order[0]]
                                             + hot * total):
                break
            if taken[h]:
                continue
            taken[h] = True
            for p in range(num_ranks - 1, i, -1):
                c = order[p]
                if taken[c] or times[c] + A + B >= times[h]:  # c could not gain
                    continue
                if can_move(h, c, cnt, held, used, slots, sent, recv, wt, XT, hcount, hlist,
                            nhome, rank_home, rep_on):
                    taken[c] = True
                    pair_h[n_pairs] = h
                    pair_c[n_pairs] = c
                    n_pairs += 1
                    break

        # Rules 2-4: each pair's move, against the round's starting state.
        for i in range(n_pairs):
            pair_e[i] = -1
            h = pair_h[i]
            c = pair_c[i]
            best = pick_expert(h, c, cnt, held, used, slots, sent, recv, wt, XT, hcount,
                               hlist, nhome, rank_home, rep_on)
            e = best
            b = blk_of[e]
            n = 0
            for q in range(num_ranks + 1):
                s = pool_source(q, h, c, num_ranks, TT)
                if s < 0:
                    continue
                a = block_value(blk_assign, b, s, e, h, load, home, hpos, hcount)
                if a > 0:
                    pool_s[i, n] = s
                    pool_n[i, n] = a
                    n += 1
            pool_len[i] = n
            if n == 0:
                continue
            cum[0] = 0
            pre_h[0] = 0
            pre_c[0] = 0
            for k in range(n):
                s = pool_s[i, k]
                cum[k + 1] = cum[k] + pool_n[i, k]
                pre_h[k + 1] = pre_h[k] + pool_n[i, k] * TT[s, h]
                pre_c[k + 1] = pre_c[k] + pool_n[i, k] * TT[s, c]
            lo = 1
            hi = cum[n]
            best_f = 0
            best_x = 0
            move = move_base(n, pool_s[i], cum, e, h, c, cnt, comp, tin, tout, A)  # once a pair
            while True:
                best_f = -1
                for j in range(GRID):
                    x = grid_point(j, lo, hi)
                    f = eval_amount(x, n, pool_s[i], cum, pre_h, pre_c, h, c, A, B, TT, move)
                    if best_f < 0 or f < best_f or (f == best_f and x < best_x):
                        best_f = f
                        best_x = x
                if hi - lo < GRID:
                    break
                step = (hi - lo) // (GRID - 1) + 1
                lo = max(lo, best_x - step)
                hi = min(hi, best_x + step)
            if (times[h] - best_f) * 1000000 > eps_ppm * times[h]:
                pair_e[i] = e
                pair_x[i] = best_x

        # Rule 5: apply the moves in pair order.
        applied = 0
        for i in range(n_pairs):
            e = pair_e[i]
            if e < 0:
                continue
            h = pair_h[i]
            c = pair_c[i]
            src = -1
            if not held[c, e]:  # the copy's source, against the copies admitted so far
                src = copy_source(e, c, used, slots, sent, recv, wt, XT, hcount, hlist)
                if src < 0 or n_rep >= max_reps:
                    continue
            if blk_of[e] < 0:
                if n_blk >= max_blocks:
                    continue
                b = n_blk
                n_blk += 1
                blk_of[e] = b
                blk_expert[b] = e
                _static_block(blk_assign, b, e, load, home, hpos, hcount)
            if src >= 0:
                n_rep = add_replica(c, e, src, n_rep, rep, held, rep_on, used, sent, recv, XT)
            b = blk_of[e]
            left = pair_x[i]
            to_h = 0
            to_c = 0
            for k in range(pool_len[i]):
                if left == 0:
                    break
                s = pool_s[i, k]
                take = min(left, pool_n[i, k])
                left -= take
                blk_assign[b, s, h] -= take
                blk_assign[b, s, c] += take
                tout[s] += take * (TT[s, c] - TT[s, h])
                to_h += take * TT[s, h]
                to_c += take * TT[s, c]
            tin[h] -= to_h
            tin[c] += to_c
            x = pair_x[i]
            comp[h] -= B * x
            if cnt[h, e] == x:
                comp[h] -= A
            if cnt[c, e] == 0:
                comp[c] += A
            comp[c] += B * x
            cnt[h, e] -= x
            cnt[c, e] += x
            applied += 1
        moves += applied
        if applied == 0:
            break

    makespan = 0
    for g in range(num_ranks):
        makespan = max(makespan, comp[g] + 2 * max(tin[g], tout[g]))
    return status, rep[:n_rep], blk_expert[:n_blk], blk_assign[:n_blk], rounds, moves, makespan


# The helpers in the order they call each other (a later one calls earlier ones).
HELPERS = (pool_source, move_base, eval_amount, grid_point, block_value, copy_source,
           add_replica, pick_expert, can_move)


def plain(fn, names: dict | None = None):
    """The Python function behind the Numba dispatcher fn, its calls of the helpers (and of the
    static split) rebound to their Python functions too: the plain-Python twin."""
    import types

    if names is None:
        names = {"_static_share": _static_share.py_func, "pool_entry": pool_entry.py_func}
        names["_static_block"] = plain(_static_block, names)
        for helper in HELPERS:
            names[helper.py_func.__name__] = plain(helper, names)
    env = dict(fn.py_func.__globals__)
    env.update(names)
    return types.FunctionType(fn.py_func.__code__, env, fn.py_func.__name__)


# `lite_arrays` run as plain Python (tests, `lite_ref`).
lite_core = plain(lite_arrays)


def plan_limits(slots: np.ndarray, num_experts: int, num_ranks: int) -> tuple[int, int]:
    """(max_reps, max_blocks): replica rows and expert blocks a plan may use: every slot, and
    an expert block for each slot plus one per rank (moves onto existing holders), at most E."""
    total = int(np.sum(slots))
    return total, min(num_experts, total + num_ranks)


def kernel_args(problem: BalanceProblem, rules: LiteRules | None) -> tuple:
    """`lite_core`'s arguments for `problem` under `rules` (None: LiteRules())."""
    rules = _rules(rules)
    a, b, tt, xt = problem_ticks(problem)
    wt = windows_ticks(problem.window)
    max_reps, max_blocks = plan_limits(problem.slots, problem.num_experts, problem.num_ranks)
    return (np.ascontiguousarray(problem.load, np.int64), np.ascontiguousarray(problem.home),
            np.ascontiguousarray(problem.slots, np.int64), wt, a, b, tt, xt,
            *home_lists(problem.home), rules.max_rounds, rules.eps_ppm, rules.hot_sixteenths,
            max_reps, max_blocks)


def _rules(rules: LiteRules | None) -> LiteRules:
    if rules is None:
        return LiteRules()
    if not isinstance(rules, LiteRules):
        raise TypeError(f"rules must be a LiteRules, got {type(rules).__name__}")
    return rules


def lite_plan(problem: BalanceProblem, rules: LiteRules | None = None, *, compiled: bool = True,
              stats: dict | None = None) -> Plan:
    """The lite planner's plan of `problem` (compiled=False: the plain-Python `lite_core`).
    stats, when a dict, receives "rounds", "moves" and "makespan_ticks"."""
    run = lite_arrays if compiled else lite_core
    status, rep, blk_expert, blk_assign, rounds, moves, makespan = run(*kernel_args(problem,
                                                                                    rules))
    if status:
        raise ValueError(f"lite planner: {STATUS_ERRORS[int(status)]}")
    if stats is not None:
        stats.update(rounds=int(rounds), moves=int(moves), makespan_ticks=int(makespan))
    return plan_from_arrays(problem, rep, blk_expert, blk_assign)


def solve_lite(problem: BalanceProblem, *, time_limit: float | None = None,
               rules: LiteRules | None = None, compiled: bool = True) -> SolveResult:
    """Backend for `solve(problem, "lite", rules=LiteRules(...))` ("lite_ref": compiled=False).
    The kernel is bounded by max_rounds; time_limit is only reported against."""
    stats: dict = {}
    start = time.perf_counter()
    plan = lite_plan(problem, rules, compiled=compiled, stats=stats)
    wall = time.perf_counter() - start
    status = "timeout" if time_limit is not None and wall > time_limit else "feasible"
    return SolveResult(status, plan, float("nan"), None, None, wall,
                       f"{stats['rounds']} rounds, {stats['moves']} moves, "
                       f"{plan.num_replicas} replicas", "lite" if compiled else "lite_ref")


def solve_lite_ref(problem: BalanceProblem, *, time_limit: float | None = None,
                   rules: LiteRules | None = None) -> SolveResult:
    """Backend for `solve(problem, "lite_ref")`: `lite_core` run as plain Python."""
    return solve_lite(problem, time_limit=time_limit, rules=rules, compiled=False)
