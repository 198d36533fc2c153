"""Rules that the greedy's and the parallel greedy's kernels share.

Both planners start from the home holders of every expert and search moves of tokens of one
expert e from a hot rank src to a faster rank dst; four steps are the same in both: the holder
lists (`home_lists`), whether dst can gain at all (`cannot_gain`, a lower bound on dst's time
after any move of e), which home holder of e copies it to dst when dst holds no copy yet
(`copy_holder`), and the two ranks' compute times after a move (`moved_compute`). They are
written once here as rules (probe.planner.scalar): Numba compiles them for the CPU kernels,
`numba_cuda.device` compiles the same functions for the CUDA kernels.

The move rules take scalars and the [E, G] holder lists, which every kernel keeps in the same
layout, so that kernels that keep their [S, E] arrays in another memory order can call them.

Numba's on-disk cache of a calling kernel is not invalidated when this file changes (only when
the caller's own file does): after editing a rule here, delete the __pycache__ entries of its
callers (probe/planner/parallel.py) before timing or testing them.
"""

from __future__ import annotations

from probe.planner.scalar import dmax, dmin, mul, rule

__all__ = ["cannot_gain", "copy_holder", "home_lists", "moved_compute"]


@rule
def home_lists(home, hcount, hlist, hpos, rank_nhome, rank_home):  # pragma: no cover - compiled
    """Fill the home holders of every expert and the home experts of every rank from home
    bool [G, E]: hlist[e, :hcount[e]] e's holders in rank order, hpos[g, e] g's position there
    or -1 (int64 [E], [E, G], [G, E]); rank_home[g, :rank_nhome[g]] g's home experts in id
    order (int64 [G], [G, E]). Any values before."""
    num_ranks, num_experts = home.shape
    hcount[:] = 0
    rank_nhome[:] = 0
    for g in range(num_ranks):
        for e in range(num_experts):
            hpos[g, e] = hcount[e] if home[g, e] else -1
            if home[g, e]:
                hlist[e, hcount[e]] = g
                hcount[e] += 1
                rank_home[g, rank_nhome[g]] = e
                rank_nhome[g] += 1


@rule(inline=True)
def cannot_gain(own, new_expert, floor, alpha, beta, tt_dst_src, comp_dst, t_in_dst,
                t_out_dst):  # pragma: no cover - compiled
    """Whether no move of e from src to dst can bring dst below floor (src's time less the
    least gain), with slack for rounding: after any move of x >= 1 tokens, dst's time is at
    least comp + max(beta + 2 * in, 2 * out + min over 1 <= x <= own of x * (beta - 2 tt)),
    plus alpha when e is new on dst (new_expert). own: tokens of (dst, e) on src, which the
    move would send home; tt_dst_src: token_time[dst, src]; comp_dst, t_in_dst, t_out_dst:
    dst's compute time and link times now."""
    slope = beta - 2.0 * tt_dst_src
    lb_out = 2.0 * t_out_dst + (dmin(slope, mul(own, slope)) if own > 0 else beta)
    lb = comp_dst + dmax(beta + 2.0 * t_in_dst, lb_out)
    if new_expert:
        lb += alpha
    return lb >= floor + mul(1e-9, abs(floor) + lb)


@rule(inline=True)
def moved_compute(x, e, src, dst, tok, comp, alpha, beta):  # pragma: no cover - compiled
    """(compute time of src, of dst) if x >= 1 tokens of e move from src to dst: beta per
    token, and alpha off src when all its tokens of e leave, onto dst when e is new there.
    tok int64 [G, E] tokens per (rank, expert) now; comp float64 [G] compute seconds now."""
    comp_src = comp[src] - mul(beta, x)
    if tok[src, e] == x:
        comp_src -= alpha
    comp_dst = comp[dst] + mul(beta, x)
    if tok[dst, e] == 0:
        comp_dst += alpha
    return comp_src, comp_dst


@rule(inline=True)
def copy_holder(e, dst, hcount, hlist, transfer_time, window, recv, send):  # pragma: no cover
    """The home holder of e to copy it to dst from, -1 if no copy fits both windows: the
    cheapest transfer, then the least already sent, then the lowest rank. hcount int64 [E],
    hlist int64 [E, G] (e's home holders in rank order); transfer_time float64 [G, G];
    window, recv, send float64 [G] (seconds: the copy budget, copies received, copies sent)."""
    holder = -1
    best_t = 0.0
    best_send = 0.0
    for k in range(hcount[e]):
        h = hlist[e, k]
        t = transfer_time[h, dst]
        if recv[dst] + t <= window[dst] and send[h] + t <= window[h] and (
                holder < 0 or t < best_t or (t == best_t and send[h] < best_send)):
            holder = h
            best_t = t
            best_send = send[h]
    return holder
