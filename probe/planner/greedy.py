"""The greedy balance planner (the paper's Algorithm 1, plus probe's rules), compiled with Numba.

Rank time T(g) = compute(g) + 2 * max(in(g), out(g)) as in cost.py. The plan starts from the
locality-first static split (static.py) and makes at most k_max moves; each move takes tokens
of one expert from the slowest rank to a faster one (copying the expert there if needed) when
that lowers the largest rank time. The rules are numbered 1-8 in docs/planner.md ("The
greedy's rules"), which also says why probe's defaults (`GreedyRules()`) differ from the
paper's (`GreedyRules.paper()`); the comments below refer to those numbers.

`greedy_ref.py` implements the same rules with lists and loops, in the same floating-point order;
tests require identical plans. The kernel runs in O(G * E) for the start plus, per move, one
O(E) expert selection and O(G log T) per tried candidate; nothing depends on S * E * G.

>>> import numpy as np
>>> from probe.planner.cost import CostModel
>>> from probe.planner.problem import BalanceProblem
>>> cost = CostModel.uniform(2, alpha=0.0, beta=1.0, token_time=0.0, transfer_time=1.0)
>>> prob = BalanceProblem.from_load(np.array([[6, 0], [2, 0]]), cost, slots=1, window=1.0)
>>> plan = greedy_plan(prob, GreedyRules.paper())
>>> plan.replicas.astype(int).tolist(), plan.tokens_per_rank_expert().tolist()
([[0, 0], [1, 0]], [[6, 0], [2, 0]])

Above (the paper's rules), rank 1 takes a replica of expert 0 but only its own 2 tokens move
there: source 0's 6 tokens originate on rank 0 and stay local. With the defaults (move_local),
rank 1 also takes 2 of them:

>>> greedy_plan(prob).tokens_per_rank_expert().tolist()
[[4, 0], [4, 0]]
"""

from __future__ import annotations

import time

import numba
import numpy as np

from probe.planner.greedy_rules import GreedyRules
from probe.planner.problem import MAX_TOKENS, BalanceProblem, Plan, SolveResult
from probe.planner.scalar import dmax, dmin, mul, rule
from probe.planner.static import static_assignment
from probe.planner.tolerance import WINDOW_ABS, WINDOW_REL

__all__ = ["GreedyRules", "bound_arrays", "greedy_arrays", "greedy_plan", "problem_arrays",
           "solve_greedy", "solve_greedy_ref"]

# Safety cap on moves when k_max is unlimited (0); the loop ends much earlier in practice.
UNLIMITED_MOVES = 1_000_000
# Rule 8's run of the paper's rules makes at most this many moves (the paper's fixed budget).
PAPER_MOVES = 16

# The scalar rules below (`@rule`) are compiled here for the CPU and again by greedy_cuda for the
# GPU: one source, the same float64 operations in the same order on both (probe.planner.scalar).


@rule(inline=True)
def _static_share(load, home, hpos, hcount, s, e, g):
    """Tokens of (s, e) on rank g in the static split (see static.py); hpos[g, e] is g's
    position among e's home holders, -1 if none."""
    n = load[s, e]
    if home[s, e]:
        return n if g == s else 0
    h = hcount[e]
    if h == 1:
        return n if hpos[g, e] == 0 else 0
    pos = hpos[g, e]
    if pos < 0:
        return 0
    q = n // h
    r = n - q * h
    return q + (1 if (pos + s) % h < r else 0)


@rule(inline=True)
def _static_block(blk_assign, b, e, load, home, hpos, hcount):  # pragma: no cover - compiled
    """Block b of blk_assign [B, S, G] <- expert e's static split, every source and rank."""
    for s in range(load.shape[0]):
        for g in range(home.shape[0]):
            blk_assign[b, s, g] = _static_share(load, home, hpos, hcount, s, e, g)


@numba.njit(cache=True, inline="always")
def _holds(home, rep_on, used, g, e):
    if home[g, e]:
        return True
    for j in range(used[g]):  # noqa: SIM110 (a plain loop compiles in Numba)
        if rep_on[g, j] == e:
            return True
    return False


@rule(inline=True)
def _src_after(x, e, src, dst, pool_s, pool_n, tok, comp, t_in, t_out, alpha, beta, tt):
    """T_src of `_after` alone (the same operations, for the x_mean search)."""
    left = x
    comp_src = comp[src] - mul(beta, x)
    if tok[src, e] == x:
        comp_src -= alpha
    d_in_src = 0.0
    d_out_src = 0.0
    i = 0
    while left > 0:
        s = pool_s[i]
        take = dmin(pool_n[i], left)
        left -= take
        d_in_src += mul(take, tt[s, src])
        if s == src:
            d_out_src += mul(take, tt[src, dst] - tt[src, src])
        i += 1
    return comp_src + 2.0 * dmax(t_in[src] - d_in_src, t_out[src] + d_out_src)


@rule(inline=True)
def _after(x, e, src, dst, pool_s, pool_n, tok, comp, t_in, t_out, alpha, beta, tt, parts):
    """Times of src and dst if x >= 1 tokens of e move, taken from the pool in order; fills
    parts[6]. Sums run in pool order and stop at the last entry touched (the twin's later
    entries add 0.0, which changes nothing)."""
    left = x
    comp_src = comp[src] - mul(beta, x)
    if tok[src, e] == x:
        comp_src -= alpha
    comp_dst = comp[dst] + mul(beta, x)
    if tok[dst, e] == 0:
        comp_dst += alpha
    d_in_src = 0.0
    d_in_dst = 0.0
    d_out_dst = 0.0
    d_out_src = 0.0
    i = 0
    while left > 0:
        s = pool_s[i]
        take = dmin(pool_n[i], left)
        left -= take
        i += 1
        d_in_src += mul(take, tt[s, src])
        if s == dst:
            d_out_dst += mul(take, tt[dst, src])
        else:
            d_in_dst += mul(take, tt[s, dst])
            if s == src:  # move_local: src's own tokens now leave it
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


@rule(inline=True)
def _worst(x, t_src, t_dst, src, dst, npool, pool_s, pool_n, comp, t_in, t_out, tt, takes,
           new_out):
    """max(t_src, t_dst, new times of the third-party sources touched) if x tokens move; fills
    takes[:npool] and new_out (for the third-party entries)."""
    left = x
    for i in range(npool):
        take = dmin(pool_n[i], left)
        takes[i] = take
        left -= take
    worst = dmax(t_src, t_dst)
    for i in range(npool):
        s = pool_s[i]
        if s != dst and s != src and takes[i] > 0:
            new_out[i] = t_out[s] + mul(takes[i], tt[s, dst] - tt[s, src])
            worst = dmax(worst, comp[s] + 2.0 * dmax(t_in[s], new_out[i]))
    return worst


@rule(inline=True)
def _water_fill(n, e, src, dst, pool_s, pool_n, tok, comp, t_in, t_out, alpha, beta, tt, parts,
                cap):
    """Rule 6's x over the first n pool tokens: min(x_eq, x_mean), x_mean measured against cap
    (the mean, or -inf without mean_cap: then x = x_eq)."""
    all_src, all_dst = _after(n, e, src, dst, pool_s, pool_n, tok, comp, t_in, t_out, alpha,
                              beta, tt, parts)
    x_eq = n
    if all_src <= all_dst:
        lo = 1
        while lo < x_eq:
            mid = (lo + x_eq) // 2
            t_src, t_dst = _after(mid, e, src, dst, pool_s, pool_n, tok, comp, t_in, t_out,
                                  alpha, beta, tt, parts)
            if t_src <= t_dst:
                x_eq = mid
            else:
                lo = mid + 1
    if x_eq > 1:
        a_src, a_dst = _after(x_eq - 1, e, src, dst, pool_s, pool_n, tok, comp, t_in, t_out,
                              alpha, beta, tt, parts)
        b_src, b_dst = _after(x_eq, e, src, dst, pool_s, pool_n, tok, comp, t_in, t_out,
                              alpha, beta, tt, parts)
        if dmax(a_src, a_dst) <= dmax(b_src, b_dst):
            x_eq -= 1
    x_mean = n
    if all_src <= cap:
        lo = 1
        while lo < x_mean:
            mid = (lo + x_mean) // 2
            if _src_after(mid, e, src, dst, pool_s, pool_n, tok, comp, t_in, t_out, alpha, beta,
                          tt) <= cap:
                x_mean = mid
            else:
                lo = mid + 1
    return dmin(x_eq, x_mean)


@rule(inline=True)
def _keep_move(npool, takes, outs, parts, into_takes, into_outs, into_parts):
    """Copy a candidate move's per-source takes and new out-times, and its 6 time parts."""
    for i in range(npool):
        into_takes[i] = takes[i]
        into_outs[i] = outs[i]
    for i in range(6):
        into_parts[i] = parts[i]


@rule(inline=True)
def _apply_parts(e, src, dst, x, parts, t_src, t_dst, tok, comp, t_in, t_out, times):
    """A move's own two ranks: x tokens of e from src to dst in the token counts, src's and
    dst's time parts from `_after`'s parts, and their times t_src, t_dst (shared with
    greedy_cuda's move)."""
    tok[src, e] -= x
    tok[dst, e] += x
    comp[src] = parts[0]
    comp[dst] = parts[1]
    t_in[src] -= parts[2]
    t_in[dst] += parts[3]
    t_out[dst] -= parts[4]
    t_out[src] += parts[5]
    times[src] = t_src
    times[dst] = t_dst


@rule(inline=True)
def _apply_move(b, e, src, dst, x, npool, pool_s, takes, outs, parts, t_src, t_dst, blk_assign,
                tok, comp, t_in, t_out, times):
    """Apply the chosen move of x tokens of e from src to dst (block b of the assignment): the
    pool's takes[:npool] in blk_assign, the token counts, src's and dst's time parts (from
    `_after`'s parts) and times, and the new out-times `outs` of the third-party sources."""
    for i in range(npool):
        s = pool_s[i]
        blk_assign[b, s, src] -= takes[i]
        blk_assign[b, s, dst] += takes[i]
    _apply_parts(e, src, dst, x, parts, t_src, t_dst, tok, comp, t_in, t_out, times)
    for i in range(npool):
        s = pool_s[i]
        if s != dst and s != src and takes[i] > 0:
            t_out[s] = outs[i]
            times[s] = comp[s] + 2.0 * dmax(t_in[s], t_out[s])


@numba.njit(cache=True)
def greedy_arrays(load, home, slots, window, alpha, beta, token_time, transfer_time, k_max,
                  epsilon, move_local=True, evacuate=False, two_phase=True, mean_cap=False,
                  also_paper=False):
    """The greedy kernel: arrays in, arrays out (the low-level entry; see `greedy_plan`).

    Args (exact dtypes: other dtypes compile another specialisation):
        load: int64 [S, E]; home: bool [G, E] (S = G); slots: int64 [G]; window: float64 [G];
        alpha, beta: float; token_time, transfer_time: float64 [G, G];
        k_max: int, most moves (0 = until no move gains); epsilon: float, least gain (seconds);
        move_local, evacuate, two_phase, mean_cap, also_paper: bool, the flags of rules 4, 6
            and 8. The kernel takes GreedyRules' fields as scalars (`_kernel_args` unpacks
            them); its defaults are GreedyRules()'s, and tests keep the two equal.
    Returns (of the run kept by rule 8):
        replicas: int64 [n_rep, 3], rows (rank, expert, source) in the order they were made:
            expert replicas[i, 1] is copied from rank replicas[i, 2] to rank replicas[i, 0];
        blk_expert: int64 [n_blk], experts whose assignment changed;
        blk_assign: int64 [n_blk, S, G], their final assignment (tokens of (s, blk_expert[b])
            on g); every other expert keeps the static split;
        num_moves: int, moves applied.
    """
    out = _rules_run(load, home, slots, window, alpha, beta, token_time, transfer_time, k_max,
                     epsilon, move_local, evacuate, two_phase, mean_cap, also_paper)
    return out[0], out[1], out[2], out[3]


@numba.njit(cache=True)
def _rules_run(load, home, slots, window, alpha, beta, token_time, transfer_time, k_max,
               epsilon, move_local, evacuate, two_phase, mean_cap, also_paper):
    """_greedy_run with the given rules, and rule 8: with also_paper (and rules other than the
    paper's), also the paper's rules (at most PAPER_MOVES moves), keeping the run with the
    lower maximum rank time. Returns that run's _greedy_run tuple."""
    out = _greedy_run(load, home, slots, window, alpha, beta, token_time, transfer_time, k_max,
                      epsilon, move_local, evacuate, two_phase, mean_cap)
    if also_paper and (move_local or evacuate or two_phase or not mean_cap):
        paper_k_max = min(k_max, PAPER_MOVES) if k_max > 0 else 0
        paper = _greedy_run(load, home, slots, window, alpha, beta, token_time, transfer_time,
                            paper_k_max, epsilon, False, False, False, True)
        if paper[4] < out[4]:
            out = paper
    return out


@numba.njit(cache=True)
def _greedy_run(load, home, slots, window, alpha, beta, token_time, transfer_time, k_max,
                epsilon, move_local, evacuate, two_phase, mean_cap):
    """One run of rules 1-7 with the given options; greedy_arrays' outputs plus the final
    maximum rank time (from the run's own bookkeeping)."""
    num_ranks, num_experts = home.shape
    limit = k_max if k_max > 0 else UNLIMITED_MOVES

    # Home holders of every expert (hlist[e, :hcount[e]] in rank order; hpos[g, e] = g's
    # position there or -1) and home experts of every rank (rank_home[g, :rank_nhome[g]]).
    hcount = np.zeros(num_experts, np.int64)
    hlist = np.empty((num_experts, num_ranks), np.int64)
    rank_nhome = np.zeros(num_ranks, np.int64)
    rank_home = np.empty((num_ranks, num_experts), np.int64)
    hpos = np.empty((num_ranks, num_experts), np.int64)
    for g in range(num_ranks):
        for e in range(num_experts):
            hpos[g, e] = hcount[e] if home[g, e] else -1
            if home[g, e]:
                hlist[e, hcount[e]] = g
                hcount[e] += 1
                rank_home[g, rank_nhome[g]] = e
                rank_nhome[g] += 1

    # Static split: tokens per (rank, expert) and per (source, rank); then compute per rank
    # (in expert order, over its home experts: the only ones with static tokens).
    tok = np.zeros((num_ranks, num_experts), np.int64)
    flow = np.zeros((num_ranks, num_ranks), np.int64)
    for s in range(num_ranks):
        for e in range(num_experts):
            n = load[s, e]
            if n == 0:
                continue
            if home[s, e]:
                tok[s, e] += n
                flow[s, s] += n
            elif hcount[e] == 1:
                g = hlist[e, 0]
                tok[g, e] += n
                flow[s, g] += n
            else:
                h = hcount[e]
                q = n // h
                r = n - q * h
                for k in range(h):
                    c = q + (1 if (k + s) % h < r else 0)
                    g = hlist[e, k]
                    tok[g, e] += c
                    flow[s, g] += c
    # (CostModel.compute_time's formula, written as a loop so that it stays compiled.)
    comp = np.zeros(num_ranks)
    for g in range(num_ranks):
        for i in range(rank_nhome[g]):
            e = rank_home[g, i]
            if tok[g, e] > 0:
                comp[g] += alpha + beta * tok[g, e]
    t_in = np.zeros(num_ranks)
    t_out = np.zeros(num_ranks)
    for s in range(num_ranks):
        for g in range(num_ranks):
            t_in[g] += flow[s, g] * token_time[s, g]
            t_out[s] += flow[s, g] * token_time[s, g]
    times = np.empty(num_ranks)
    for g in range(num_ranks):
        times[g] = comp[g] + 2.0 * max(t_in[g], t_out[g])

    # Replicas: per-rank lists and the output lists.
    max_slots = 0
    total_slots = 0
    for g in range(num_ranks):
        max_slots = max(max_slots, min(slots[g], num_experts))
        total_slots += min(slots[g], num_experts)
    cap_rep = min(total_slots, limit)
    rep_on = np.empty((num_ranks, max(max_slots, 1)), np.int64)
    used = np.zeros(num_ranks, np.int64)
    recv = np.zeros(num_ranks)
    send = np.zeros(num_ranks)
    rep = np.empty((cap_rep, 3), np.int64)
    n_rep = 0

    # Changed experts keep a dense [S, G] block each.
    cap_blk = min(limit, num_experts)
    blk_of = np.full(num_experts, -1, np.int64)
    blk_expert = np.empty(cap_blk, np.int64)
    blk_assign = np.empty((cap_blk, num_ranks, num_ranks), np.int64)
    n_blk = 0

    pool_s = np.empty(num_ranks, np.int64)
    pool_n = np.empty(num_ranks, np.int64)
    takes = np.empty(num_ranks, np.int64)
    best_takes = np.empty(num_ranks, np.int64)
    new_out = np.empty(num_ranks)
    best_out = np.empty(num_ranks)
    parts = np.empty(6)
    best_parts = np.empty(6)
    ev_parts = np.empty(6)
    ev_takes = np.empty(num_ranks, np.int64)
    ev_out = np.empty(num_ranks)
    dst_tried = np.empty(num_ranks, np.bool_)
    taken_at = np.full(num_experts, -1, np.int64)  # move in which e joined the order
    exp_order = np.empty(num_experts, np.int64)

    num_moves = 0
    while num_moves < limit:
        src = 0
        for g in range(1, num_ranks):
            if times[g] > times[src]:
                src = g
        total_time = 0.0
        for g in range(num_ranks):
            total_time += times[g]
        mean = total_time / num_ranks
        dst_tried[:] = False
        n_order = 0
        found = False
        best_e = -1
        best_dst = -1
        best_holder = -1
        best_npool = 0
        best_x = 0
        best_tsrc = 0.0
        best_tdst = 0.0
        while not found:
            dst = -1
            for g in range(num_ranks):
                if (g != src and not dst_tried[g] and times[g] < times[src]
                        and (dst < 0 or times[g] < times[dst])):
                    dst = g
            if dst < 0:
                break
            dst_tried[dst] = True
            # Pruning (kernel only; the twin tries everything and tests compare them): any
            # move to dst leaves dst at >= comp + beta + 2 * in (+ alpha for a new expert).
            floor = times[src] - epsilon
            lb_dst = comp[dst] + beta + 2.0 * t_in[dst]
            if lb_dst >= floor + 1e-9 * (abs(floor) + lb_dst):
                continue
            j = 0
            while True:
                if j == n_order:  # extend the heaviest-first order lazily
                    # Only experts src holds can have tokens there: its home experts, then
                    # its replicas (heaviest first, ties to the lowest id).
                    e = -1
                    for i in range(rank_nhome[src] + used[src]):
                        c = (rank_home[src, i] if i < rank_nhome[src]
                             else rep_on[src, i - rank_nhome[src]])
                        if taken_at[c] != num_moves and tok[src, c] > 0 and (
                                e < 0 or tok[src, c] > tok[src, e]
                                or (tok[src, c] == tok[src, e] and c < e)):
                            e = c
                    if e < 0:
                        break
                    taken_at[e] = num_moves
                    exp_order[n_order] = e
                    n_order += 1
                e = exp_order[j]
                j += 1
                on_dst = _holds(home, rep_on, used, dst, e)
                if not on_dst and used[dst] >= slots[dst]:
                    continue
                b = blk_of[e]
                own = (blk_assign[b, dst, src] if b >= 0
                       else _static_share(load, home, hpos, hcount, dst, e, src))
                # Lower bound on T_dst after any move: beta*x + 2*max(in, out - own_moved*tt)
                # is at least max(beta + 2*in, 2*out + min over 1 <= x <= own of x*(beta-2tt)).
                slope = beta - 2.0 * token_time[dst, src]
                lb_out = 2.0 * t_out[dst] + (min(slope, own * slope) if own > 0 else beta)
                lb = comp[dst] + max(beta + 2.0 * t_in[dst], lb_out)
                if tok[dst, e] == 0:
                    lb += alpha
                if lb >= floor + 1e-9 * (abs(floor) + lb):
                    continue
                # Copy source (checked before the pool: it is cheaper).
                holder = -1
                if not on_dst:
                    best_t = 0.0
                    best_send = 0.0
                    for k in range(hcount[e]):
                        h = hlist[e, k]
                        t = transfer_time[h, dst]
                        if recv[dst] + t <= window[dst] and send[h] + t <= window[h] and (
                                holder < 0 or t < best_t
                                or (t == best_t and send[h] < best_send)):
                            holder = h
                            best_t = t
                            best_send = send[h]
                    if holder < 0:
                        continue
                # Pool: dst's own tokens first, then other sources holding no copy of e.
                npool = 0
                total = 0
                a = own
                if a > 0:
                    pool_s[0] = dst
                    pool_n[0] = a
                    npool = 1
                    total += a
                for s in range(num_ranks):
                    if s == src or s == dst:  # noqa: SIM109
                        continue
                    a = (blk_assign[b, s, src] if b >= 0
                         else _static_share(load, home, hpos, hcount, s, e, src))
                    if a > 0 and not _holds(home, rep_on, used, s, e):
                        pool_s[npool] = s
                        pool_n[npool] = a
                        npool += 1
                        total += a
                if move_local:  # src's own tokens last
                    a = (blk_assign[b, src, src] if b >= 0
                         else _static_share(load, home, hpos, hcount, src, e, src))
                    if a > 0:
                        pool_s[npool] = src
                        pool_n[npool] = a
                        npool += 1
                        total += a
                if total == 0:
                    continue
                cap = mean if mean_cap else -np.inf
                own_src = 0
                if move_local and pool_s[npool - 1] == src:
                    own_src = pool_n[npool - 1]
                if two_phase and own_src > 0:
                    n_other = total - own_src
                    second = True
                    worst = 0.0
                    x = 0
                    if n_other > 0:  # phase 1: the other sources' tokens alone
                        x = _water_fill(n_other, e, src, dst, pool_s, pool_n, tok, comp, t_in,
                                        t_out, alpha, beta, token_time, parts, cap)
                        t_src, t_dst = _after(x, e, src, dst, pool_s, pool_n, tok, comp, t_in,
                                              t_out, alpha, beta, token_time, parts)
                        worst = _worst(x, t_src, t_dst, src, dst, npool, pool_s, pool_n, comp,
                                       t_in, t_out, token_time, ev_takes, ev_out)
                        if x < n_other or t_src <= t_dst or t_src <= cap:
                            second = False
                    if second:  # phase 2: r_src's own tokens; max(T_src, T_dst) is convex
                        lo = n_other + 1
                        hi = total - 1 if total == tok[src, e] and total > lo else total
                        while lo < hi:
                            mid = (lo + hi) // 2
                            a_src, a_dst = _after(mid, e, src, dst, pool_s, pool_n, tok, comp,
                                                  t_in, t_out, alpha, beta, token_time, parts)
                            b_src, b_dst = _after(mid + 1, e, src, dst, pool_s, pool_n, tok,
                                                  comp, t_in, t_out, alpha, beta, token_time,
                                                  parts)
                            if max(b_src, b_dst) >= max(a_src, a_dst):
                                hi = mid
                            else:
                                lo = mid + 1
                        x2 = lo
                        a_src, a_dst = _after(x2, e, src, dst, pool_s, pool_n, tok, comp, t_in,
                                              t_out, alpha, beta, token_time, parts)
                        if a_src <= cap:
                            lo = n_other + 1
                            hi = x2
                            while lo < hi:
                                mid = (lo + hi) // 2
                                if _src_after(mid, e, src, dst, pool_s, pool_n, tok, comp, t_in,
                                              t_out, alpha, beta, token_time) <= cap:
                                    hi = mid
                                else:
                                    lo = mid + 1
                            x2 = lo
                        a_src, a_dst = _after(x2, e, src, dst, pool_s, pool_n, tok, comp, t_in,
                                              t_out, alpha, beta, token_time, parts)
                        w2 = _worst(x2, a_src, a_dst, src, dst, npool, pool_s, pool_n, comp,
                                    t_in, t_out, token_time, ev_takes, ev_out)
                        if n_other == 0 or w2 < worst:
                            x = x2
                else:
                    x = _water_fill(total, e, src, dst, pool_s, pool_n, tok, comp, t_in, t_out,
                                    alpha, beta, token_time, parts, cap)
                t_src, t_dst = _after(x, e, src, dst, pool_s, pool_n, tok, comp, t_in,
                                      t_out, alpha, beta, token_time, parts)
                worst = _worst(x, t_src, t_dst, src, dst, npool, pool_s, pool_n, comp, t_in,
                               t_out, token_time, takes, new_out)
                if evacuate and x < total and total == tok[src, e]:
                    ev_src, ev_dst = _after(total, e, src, dst, pool_s, pool_n, tok, comp, t_in,
                                            t_out, alpha, beta, token_time, ev_parts)
                    ev_worst = _worst(total, ev_src, ev_dst, src, dst, npool, pool_s, pool_n,
                                      comp, t_in, t_out, token_time, ev_takes, ev_out)
                    if ev_worst < worst:
                        x = total
                        t_src = ev_src
                        t_dst = ev_dst
                        worst = ev_worst
                        _keep_move(npool, ev_takes, ev_out, ev_parts, takes, new_out, parts)
                if times[src] - worst > epsilon:
                    found = True
                    best_e = e
                    best_dst = dst
                    best_holder = holder
                    best_npool = npool
                    best_x = x
                    best_tsrc = t_src
                    best_tdst = t_dst
                    _keep_move(npool, takes, new_out, parts, best_takes, best_out, best_parts)
                    break
        if not found:
            break

        # Apply the move.
        e = best_e
        dst = best_dst
        if best_holder >= 0:
            rep_on[dst, used[dst]] = e
            used[dst] += 1
            rep[n_rep, 0] = dst
            rep[n_rep, 1] = e
            rep[n_rep, 2] = best_holder
            n_rep += 1
            recv[dst] += transfer_time[best_holder, dst]
            send[best_holder] += transfer_time[best_holder, dst]
        b = blk_of[e]
        if b < 0:
            b = n_blk
            n_blk += 1
            blk_of[e] = b
            blk_expert[b] = e
            _static_block(blk_assign, b, e, load, home, hpos, hcount)
        _apply_move(b, e, src, dst, best_x, best_npool, pool_s, best_takes, best_out, best_parts,
                    best_tsrc, best_tdst, blk_assign, tok, comp, t_in, t_out, times)
        num_moves += 1

    makespan = 0.0
    for g in range(num_ranks):
        makespan = max(makespan, times[g])
    return rep[:n_rep], blk_expert[:n_blk], blk_assign[:n_blk], num_moves, makespan


def problem_arrays(problem: BalanceProblem) -> tuple:
    """The problem's arrays in the exact dtypes the kernels take: (load, home, slots, window,
    alpha, beta, token_time, transfer_time), the leading arguments of `greedy_arrays` and
    `bound_arrays` alike."""
    cost = problem.cost
    return (np.ascontiguousarray(problem.load, dtype=np.int64),
            np.ascontiguousarray(problem.home, dtype=np.bool_),
            np.ascontiguousarray(problem.slots, dtype=np.int64),
            np.ascontiguousarray(problem.window, dtype=np.float64),
            float(cost.alpha), float(cost.beta),
            np.ascontiguousarray(cost.token_time, dtype=np.float64),
            np.ascontiguousarray(cost.transfer_time, dtype=np.float64))


def _kernel_args(problem: BalanceProblem, rules: GreedyRules | None) -> tuple:
    """`greedy_arrays`' arguments for `problem` under `rules` (None: GreedyRules())."""
    rules = _rules(rules)
    return (*problem_arrays(problem), rules.max_moves(problem.num_ranks, problem.num_experts),
            rules.epsilon, *rules.flags.values())


def _rules(rules: GreedyRules | None) -> GreedyRules:
    """`rules`, or the defaults for None; TypeError for anything else."""
    if rules is None:
        return GreedyRules()
    if not isinstance(rules, GreedyRules):
        raise TypeError(f"rules must be a GreedyRules, got {type(rules).__name__}")
    return rules


def plan_from_arrays(problem: BalanceProblem, rep: np.ndarray, blk_expert: np.ndarray,
                     blk_assign: np.ndarray) -> Plan:
    """Build the dense Plan from `greedy_arrays`' compact output."""
    num_ranks, num_experts = problem.num_ranks, problem.num_experts
    replicas = np.zeros((num_ranks, num_experts), bool)
    sources = np.full((num_ranks, num_experts), -1, np.int64)
    replicas[rep[:, 0], rep[:, 1]] = True
    sources[rep[:, 0], rep[:, 1]] = rep[:, 2]
    assignment = static_assignment(problem.load, problem.home)
    if len(blk_expert):
        assignment[:, blk_expert, :] = np.transpose(blk_assign, (1, 0, 2))
    return Plan(replicas, sources, assignment)


def greedy_plan(problem: BalanceProblem, rules: GreedyRules | None = None) -> Plan:
    """The greedy plan of `problem` under `rules` (default: `GreedyRules()`, probe's rules;
    `GreedyRules.paper()` is the paper's Algorithm 1). Numba kernel; docs/planner.md has the
    rules."""
    out = greedy_arrays(*_kernel_args(problem, rules))
    return plan_from_arrays(problem, *out[:3])


def solve_greedy(problem: BalanceProblem, *, time_limit: float | None = None,
                 rules: GreedyRules | None = None) -> SolveResult:
    """Backend for `solve(problem, "greedy", rules=...)` (rules as in `greedy_plan`). The kernel
    has no deadline check: it is bounded by k_max moves; time_limit is only reported against."""
    args = _kernel_args(problem, rules)
    start = time.perf_counter()
    out = greedy_arrays(*args)
    plan = plan_from_arrays(problem, *out[:3])
    wall = time.perf_counter() - start
    status = "timeout" if time_limit is not None and wall > time_limit else "feasible"
    return SolveResult(status, plan, float("nan"), None, None, wall,
                       f"{out[3]} moves, {len(out[0])} replicas", "greedy")


def solve_greedy_ref(problem: BalanceProblem, *, time_limit: float | None = None,
                     rules: GreedyRules | None = None) -> SolveResult:
    """Backend for `solve(problem, "greedy_ref", rules=...)`: the plain-Python twin."""
    from probe.planner.greedy_ref import greedy_ref

    rules = _rules(rules)
    start = time.perf_counter()
    plan = greedy_ref(problem, rules)
    wall = time.perf_counter() - start
    status = "timeout" if time_limit is not None and wall > time_limit else "feasible"
    return SolveResult(status, plan, float("nan"), None, None, wall,
                       f"{plan.num_replicas} replicas", "greedy_ref")


# The lean path's kernels (lean.py, bound.py) live here, beside `_greedy_run` which they call:
# Numba's on-disk cache is invalidated only when the file defining a function changes, so a
# compiled caller in another module would keep a stale copy of this file's kernel.

# Relative slack taken off the gap certificate (floating-point order of the objective's sums).
BOUND_SLACK = 1e-12


@numba.njit(cache=True, inline="always")
def _keep_largest(top, nk, keep, n):
    """top[:nk] holds the largest values seen so far, descending (at most keep of them): insert
    n where it belongs, dropping the smallest when full; returns the new count."""
    if nk == keep and n <= top[nk - 1]:
        return nk
    i = min(nk, keep - 1)
    while i > 0 and top[i - 1] < n:
        top[i] = top[i - 1]
        i -= 1
    top[i] = n
    return min(nk + 1, keep)


@numba.njit(cache=True)
def bound_arrays(load, home, slots, window, alpha, beta, token_time, transfer_time):
    """The three bounds (mean, source, expert) of lower_bound, unscaled; exact dtypes as in
    `greedy_arrays` (load int64 [S, E], home bool [G, E], slots int64 [G], window float64 [G],
    token_time and transfer_time float64 [G, G]). O(G * G * E) with contiguous inner loops."""
    num_ranks, num_experts = home.shape
    limit = np.empty(num_ranks)
    for g in range(num_ranks):  # tolerance.window_limit, written out to stay compiled
        limit[g] = window[g] * (1 + WINDOW_REL) + WINDOW_ABS
    # can_copy[g, e]: g may hold a replica of e (a slot, not at home, and a home holder h != g
    # whose copy to g fits both windows, as tolerance.fits_window judges it).
    can_copy = np.zeros((num_ranks, num_experts), np.bool_)
    link_ok = np.zeros((num_ranks, num_ranks), np.bool_)  # a copy h -> g fits both windows
    for h in range(num_ranks):
        for g in range(num_ranks):
            t = transfer_time[h, g]
            link_ok[h, g] = h != g and slots[g] > 0 and t <= limit[g] and t <= limit[h]
    holders = np.empty(num_ranks, np.int64)
    for e in range(num_experts):
        nh = 0
        for h in range(num_ranks):
            if home[h, e]:
                holders[nh] = h
                nh += 1
        for g in range(num_ranks):
            if not home[g, e]:
                for k in range(nh):
                    if link_ok[holders[k], g]:
                        can_copy[g, e] = True
                        break
    tokens = np.zeros(num_experts, np.int64)
    copies = np.zeros(num_experts, np.int64)
    for g in range(num_ranks):
        for e in range(num_experts):
            tokens[e] += load[g, e]
            if home[g, e] or can_copy[g, e]:
                copies[e] += 1
    total_tokens = 0.0
    active = 0
    expert_bound = 0.0
    for e in range(num_experts):
        n = tokens[e]
        if n > 0:
            active += 1
            total_tokens += n
            per_copy = (n + copies[e] - 1) // copies[e]
            expert_bound = max(expert_bound, alpha + beta * per_copy)
    # Pinned experts: one copy possible (its only home holder pin[e], no replica fits). All
    # their tokens run there: compute and the exact link times of those tokens are forced.
    pin = np.full(num_experts, -1, np.int64)
    for g in range(num_ranks):
        for e in range(num_experts):
            if copies[e] == 1 and home[g, e]:
                pin[e] = g
    pin_comp = np.zeros(num_ranks)
    pin_in = np.zeros(num_ranks)
    pin_out = np.zeros(num_ranks)
    for e in range(num_experts):
        h = pin[e]
        if h >= 0 and tokens[e] > 0:
            pin_comp[h] += alpha + beta * tokens[e]
    for s in range(num_ranks):
        for e in range(num_experts):
            h = pin[e]
            if h >= 0 and h != s and load[s, e] > 0:
                pin_in[h] += load[s, e] * token_time[s, h]
                pin_out[s] += load[s, e] * token_time[s, h]
    # Groups: ranks joined by each rank's cheapest links (the nodes of a multi-node machine);
    # any partition gives a valid bound, this one makes the crossing term count.
    cheapest = np.full(num_ranks, np.inf)  # min over g != s of token_time[s, g]
    for s in range(num_ranks):
        for g in range(num_ranks):
            if g != s:
                cheapest[s] = min(cheapest[s], token_time[s, g])
    group = np.arange(num_ranks)
    for s in range(num_ranks):
        for g in range(num_ranks):
            if g != s and token_time[s, g] <= cheapest[s]:
                a = s
                while group[a] != a:
                    a = group[a]
                b = g
                while group[b] != b:
                    b = group[b]
                group[max(a, b)] = min(a, b)
    for s in range(num_ranks):
        a = s
        while group[a] != a:
            a = group[a]
        group[s] = a
    # crossing[s]: min token_time from s to a rank outside its group, less cheapest[s].
    crossing = np.full(num_ranks, np.inf)
    for s in range(num_ranks):
        for g in range(num_ranks):
            if group[g] != group[s]:
                crossing[s] = min(crossing[s], token_time[s, g] - cheapest[s])
    # Per source: tokens that must leave it (M_s) and their least cost.
    top = np.empty(max(num_experts, 1), np.int64)  # the largest copyable loads, descending
    moved_cost = np.zeros(num_ranks)
    for s in range(num_ranks):
        if num_ranks == 1:
            break
        keep = min(slots[s], num_experts)
        nk = 0
        away = 0
        for e in range(num_experts):
            n = load[s, e]
            if home[s, e] or n == 0 or pin[e] >= 0:  # pinned tokens: pin_out, exactly
                continue
            away += n
            if keep > 0 and can_copy[s, e]:
                nk = _keep_largest(top, nk, keep, n)
        for i in range(nk):
            away -= top[i]
        moved_cost[s] = pin_out[s] + away * cheapest[s]
    # Per group N: tokens from N's sources of experts N cannot hold (no home holder in N, and
    # beyond the sum of N's slots among the experts N could copy) must cross to another group.
    group_cost = np.zeros(num_ranks)  # indexed by the group's root rank
    group_size = np.zeros(num_ranks, np.int64)
    group_load = np.zeros(num_experts, np.int64)
    homed = np.zeros(num_experts, np.bool_)
    copyable = np.zeros(num_experts, np.bool_)
    for root in range(num_ranks):
        if group[root] != root:
            continue
        group_load[:] = 0
        homed[:] = False
        copyable[:] = False
        keep = 0
        delta = np.inf
        for s in range(num_ranks):
            if group[s] != root:
                continue
            group_size[root] += 1
            keep += min(slots[s], num_experts)
            delta = min(delta, crossing[s])
            for e in range(num_experts):
                group_load[e] += load[s, e]
                homed[e] |= home[s, e]
                copyable[e] |= can_copy[s, e]
        if not np.isfinite(delta) or delta <= 0.0:
            continue
        keep = min(keep, num_experts)
        nk = 0
        away = 0
        for e in range(num_experts):
            n = group_load[e]
            if homed[e] or n == 0 or pin[e] >= 0:  # pinned crossings: already in pin_out
                continue
            away += n
            if keep > 0 and copyable[e]:
                nk = _keep_largest(top, nk, keep, n)
        for i in range(nk):
            away -= top[i]
        group_cost[root] = away * delta
    # Every moved token adds its link time to one rank's out and another's in; the ranks'
    # 2 * max(in, out) add up to at least in + out summed, twice the moved tokens' link times.
    comm = 0.0
    source_bound = 0.0
    for s in range(num_ranks):
        comm += moved_cost[s]
        source_bound = max(source_bound, 2.0 * moved_cost[s])
    for root in range(num_ranks):
        if group[root] == root:
            out_sum = group_cost[root]
            for s in range(num_ranks):
                if group[s] == root:
                    out_sum += moved_cost[s]
            comm += group_cost[root]
            # A group's sources send at least out_sum in all: one of them 1/|N| of it.
            source_bound = max(source_bound, 2.0 * out_sum / group_size[root])
    mean_bound = (beta * total_tokens + alpha * active + 2.0 * comm) / num_ranks
    # Each rank: its pinned compute, and in/out at least the pinned tokens' (out: and M_s's).
    for g in range(num_ranks):
        source_bound = max(source_bound,
                           pin_comp[g] + 2.0 * max(pin_in[g], moved_cost[g]))
    return mean_bound, source_bound, expert_bound


@numba.njit(cache=True)
def _check_values(load, window, time_per_token, alpha_all):
    """0 when load and window hold valid values, else a lean._ERRORS code. time_per_token:
    G * (beta + 2 * max token_time); alpha_all: G * E * alpha (problem.py's overflow test)."""
    total = 0
    num_sources, num_experts = load.shape
    for s in range(num_sources):
        for e in range(num_experts):
            n = load[s, e]
            if n < 0:
                return 1
            if n > MAX_TOKENS - total:
                return 2
            total += n
    if not np.isfinite(alpha_all + time_per_token * float(total)):
        return 3
    for g in range(window.shape[0]):
        if not window[g] >= 0.0:
            return 4
    return 0


@numba.njit(cache=True)
def _lean_run(load, home, slots, window, alpha, beta, token_time, transfer_time, k_max,
              epsilon, move_local, evacuate, two_phase, mean_cap, also_paper, with_bound,
              time_per_token, alpha_all):
    """_check_values, then greedy_arrays' rules (rule 8 included), then the bound: one call."""
    code = _check_values(load, window, time_per_token, alpha_all)
    if code != 0:
        num_ranks = home.shape[0]
        return (code, np.empty((0, 3), np.int64), np.empty(0, np.int64),
                np.empty((0, num_ranks, num_ranks), np.int64), 0, np.nan, np.nan)
    out = _rules_run(load, home, slots, window, alpha, beta, token_time, transfer_time, k_max,
                     epsilon, move_local, evacuate, two_phase, mean_cap, also_paper)
    bound = np.nan
    if with_bound:
        mean_b, source_b, expert_b = bound_arrays(load, home, slots, window, alpha, beta,
                                                  token_time, transfer_time)
        bound = max(mean_b, source_b, expert_b) * (1 - BOUND_SLACK)
    return 0, out[0], out[1], out[2], out[3], out[4], bound
