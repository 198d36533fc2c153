"""The parallel greedy's rules and its plain-Python twin: moves in rounds over disjoint rank pairs.

The greedy (greedy.py) makes one move at a time, from the slowest rank; at ep=64 and beyond it
needs hundreds of moves, each one a step that cannot start before the last has been applied.
The parallel greedy makes many moves per round instead:

1. **Pairs.** With the rank times T and their mean, a rank is *hot* when
   T(g) > mean + (1 - hot_fraction) * (max T - mean). Hot ranks, hottest first (ties to the
   lowest rank), each take the coldest rank (ties to the lowest rank) that is not taken yet
   (neither paired nor a hot rank already served), is faster than the hot rank and could
   still gain (its compute plus one token's, plus its incoming traffic, stays below the hot
   rank's time), and can receive one of the hot rank's experts: some expert e with tokens on
   the hot rank that it already holds, or that a home holder of e can copy to it (a free slot,
   and the copy fits the holder's and its windows). Call it the cold rank of the pair. The
   pairs are disjoint.
2. **One move per pair**, found against the round's starting state, as the greedy finds a move
   for its slowest rank with the cold rank as the only destination (probe's default rules:
   move_local and two_phase on, no mean cap, no evacuation): the hot rank's experts heaviest
   first; a copy from the home holder with the cheapest transfer (then the least already sent,
   then the lowest rank); the pool of movable tokens of e on the hot rank (the cold rank's own
   first, then other sources in rank order, then the hot rank's own); the amount that balances
   the pair; the first expert whose move lowers max(T_hot, T_cold) by more than epsilon.
3. **Apply** every pair's move, in pair order; a copy whose holder's window an earlier pair of
   the round has filled is dropped with its move. Rank times are then recomputed exactly from
   the token counts. The rounds stop when no move is applied, or after max_rounds.

Why the moves are independent: a pair changes compute and incoming traffic only on its own
two ranks, and outgoing traffic on its two ranks and on the third-party sources whose tokens
it moves. The pool leaves out a third-party source s when the move would lengthen its link
(token_time[s, cold] > token_time[s, hot]), so other pairs' moves only ever shorten a rank's
outgoing traffic. Each rank's time after the round is then at most what its own pair predicted
(or its old time), and the largest rank time never rises. What is given up: tokens of sources
whose link to the cold rank is dearer (a hot rank's node-mates, when the cold rank is in
another node) stay put; the cold rank's and hot rank's own tokens still move.

Rounds: a hot rank moves once per round, so the rounds needed grow with the moves one rank
needs (its hot experts and how many times each must be split), not with the total number of
moves; results/scale.md has the counts.

This module is the twin: lists and loops, the same floating-point order as the Numba kernel
(parallel.py) and the CUDA kernel (parallel_cuda.py); tests demand identical plans.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from probe.planner.greedy_ref import _bisect, moved_compute, problem_lists
from probe.planner.problem import BalanceProblem, Plan
from probe.planner.static import static_assignment

__all__ = ["ParallelRules", "parallel_ref"]

# max_rounds=0 ("until no move is applied") still stops here; real runs end far earlier.
UNLIMITED_ROUNDS = 100_000


@dataclass(frozen=True)
class ParallelRules:
    """The parallel greedy's options (module docstring).

    Attributes:
        max_rounds: most rounds, an int >= 0 (0: until a round applies no move). Default 16:
            on the default decode load at ep=32-256, later rounds gain little
            (results/scale.md).
        epsilon: least gain of a move, seconds (finite, >= 0).
        hot_fraction: which ranks count as hot, in (0, 1]: those above
            mean + (1 - hot_fraction) * (max - mean); 1 makes every rank above the mean hot.
            Default 0.75: ranks just above the mean wait, so that they do not take the slots
            and windows the hottest ranks need (with 1.0, ep=256 ends at IR 1.82 instead of
            1.35; with 0.5, ep=64 / 256 experts converges more slowly).
    """

    max_rounds: int = 16
    epsilon: float = 0.0
    hot_fraction: float = 0.75

    def __post_init__(self) -> None:
        rounds = self.max_rounds
        if (isinstance(rounds, (bool, np.bool_)) or not isinstance(rounds, (int, np.integer))
                or rounds < 0):
            raise ValueError(f"ParallelRules.max_rounds must be an int >= 0, got {rounds!r}")
        object.__setattr__(self, "max_rounds", int(rounds))
        for name in ("epsilon", "hot_fraction"):
            value = getattr(self, name)
            if isinstance(value, (bool, np.bool_)) or not isinstance(
                    value, (int, float, np.integer, np.floating)):
                raise TypeError(f"ParallelRules.{name} must be a number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if not math.isfinite(self.epsilon) or self.epsilon < 0:
            raise ValueError(f"ParallelRules.epsilon must be finite and >= 0 seconds, got "
                             f"{self.epsilon!r}")
        if not 0.0 < self.hot_fraction <= 1.0:
            raise ValueError(f"ParallelRules.hot_fraction must be in (0, 1], got "
                             f"{self.hot_fraction!r}")

    @property
    def rounds_limit(self) -> int:
        """max_rounds as the kernels take it (0 resolved to UNLIMITED_ROUNDS)."""
        return self.max_rounds if self.max_rounds > 0 else UNLIMITED_ROUNDS


def checked_rules(rules: ParallelRules | None) -> ParallelRules:
    """`rules`, or the defaults for None; TypeError for anything else."""
    if rules is None:
        return ParallelRules()
    if not isinstance(rules, ParallelRules):
        raise TypeError(f"rules must be a ParallelRules, got {type(rules).__name__}")
    return rules


def parallel_ref(problem: BalanceProblem, rules: ParallelRules | None = None,
                 stats: dict | None = None) -> Plan:
    """The parallel greedy's plan of `problem`, computed slowly and obviously. stats, when a
    dict, receives "rounds" (rounds that applied a move), "moves", "makespan" (the largest
    rank time after the last round) and "history" (the largest rank time at the start and
    after each round)."""
    rules = checked_rules(rules)
    num_ranks, num_experts, home, slots, window, alpha, beta, tt, xt = problem_lists(problem)

    assign = static_assignment(problem.load, problem.home).tolist()  # [S][E][G]
    held = [list(row) for row in home]
    replicas = [[] for _ in range(num_ranks)]  # experts copied to g, in the order made
    sources = {}  # (g, e) -> the rank it is copied from
    recv = [0.0] * num_ranks
    send = [0.0] * num_ranks
    tok = [[sum(assign[s][e][g] for s in range(num_ranks)) for e in range(num_experts)]
           for g in range(num_ranks)]
    flow = [[sum(assign[s][e][g] for e in range(num_experts)) for g in range(num_ranks)]
            for s in range(num_ranks)]

    def rank_times():
        """(comp, t_in, t_out, times), recomputed from tok and flow. Compute sums a rank's
        home experts in id order, then its replicas in the order made."""
        comp = [0.0] * num_ranks
        for g in range(num_ranks):
            for e in [e for e in range(num_experts) if home[g][e]] + replicas[g]:
                if tok[g][e] > 0:
                    comp[g] += alpha + beta * tok[g][e]
        t_in = [0.0] * num_ranks
        t_out = [0.0] * num_ranks
        for g in range(num_ranks):
            for s in range(num_ranks):
                t_in[g] += flow[s][g] * tt[s][g]
                t_out[g] += flow[g][s] * tt[g][s]
        times = [comp[g] + 2.0 * max(t_in[g], t_out[g]) for g in range(num_ranks)]
        return comp, t_in, t_out, times

    def copy_holder(e, dst):
        """The home holder of e to copy it to dst from (-1: none fits the windows)."""
        best = None
        for h in range(num_ranks):
            if home[h][e]:
                t = xt[h][dst]
                if recv[dst] + t <= window[dst] and send[h] + t <= window[h]:
                    key = (t, send[h], h)
                    if best is None or key < best:
                        best = key
        return -1 if best is None else best[2]

    def can_receive(src, dst):
        """Whether some expert with tokens on src could take a move to dst (pairing)."""
        for e in range(num_experts):
            if held[src][e] and tok[src][e] > 0 and (
                    held[dst][e] or (len(replicas[dst]) < slots[dst] and copy_holder(e, dst) >= 0)):
                return True
        return False

    def pair_move(src, dst, comp, t_in, t_out, times):
        """The pair's move (e, holder, pool, takes, x) against the current state, or None."""
        experts = sorted((e for e in range(num_experts) if held[src][e] and tok[src][e] > 0),
                         key=lambda e: (-tok[src][e], e))
        for e in experts:
            holder = -1
            if not held[dst][e]:
                if len(replicas[dst]) >= slots[dst]:
                    continue
                holder = copy_holder(e, dst)
                if holder < 0:
                    continue
            pool = []
            if assign[dst][e][src] > 0:
                pool.append((dst, assign[dst][e][src]))
            for s in range(num_ranks):
                if (s != src and s != dst and assign[s][e][src] > 0 and not held[s][e]
                        and tt[s][dst] <= tt[s][src]):
                    pool.append((s, assign[s][e][src]))
            if assign[src][e][src] > 0:
                pool.append((src, assign[src][e][src]))
            total = sum(n for _, n in pool)
            if total == 0:
                continue

            def after(x, e=e, pool=pool):
                """(T_src, T_dst) if x tokens of e move, taken from the pool in order."""
                left = x
                comp_src, comp_dst = moved_compute(comp, tok, e, src, dst, x, alpha, beta)
                d_in_src = d_in_dst = d_out_dst = d_out_src = 0.0
                for s, n in pool:
                    if left == 0:
                        break
                    take = min(n, left)
                    left -= take
                    d_in_src += take * tt[s][src]
                    if s == dst:
                        d_out_dst += take * tt[dst][src]
                    else:
                        d_in_dst += take * tt[s][dst]
                        if s == src:
                            d_out_src += take * tt[src][dst]
                t_src = comp_src + 2.0 * max(t_in[src] - d_in_src, t_out[src] + d_out_src)
                t_dst = comp_dst + 2.0 * max(t_in[dst] + d_in_dst, t_out[dst] - d_out_dst)
                return t_src, t_dst

            x = _amount(after, total, pool[-1][1] if pool[-1][0] == src else 0,
                        total == tok[src][e])
            if times[src] - max(after(x)) > rules.epsilon:
                left = x
                takes = []
                for s, n in pool:
                    takes.append((s, min(n, left)))
                    left -= takes[-1][1]
                return e, holder, takes, x
        return None

    limit = rules.rounds_limit
    rounds = moves = 0
    comp, t_in, t_out, times = rank_times()
    history = [max(times)]
    while rounds < limit:
        total_time = 0.0
        for t in times:
            total_time += t
        mean = total_time / num_ranks
        top = max(times)
        threshold = mean + (1.0 - rules.hot_fraction) * (top - mean)
        hot = sorted((g for g in range(num_ranks) if times[g] > threshold),
                     key=lambda g: (-times[g], g))
        coldest = sorted(range(num_ranks), key=lambda g: (times[g], g))
        pairs = []
        taken = set()
        for src in hot:
            if src in taken:
                continue
            taken.add(src)
            for dst in coldest:
                if times[dst] >= times[src]:
                    break
                # (No move to dst can gain unless dst stays below src even with one more
                # token's compute and its incoming traffic.)
                if (dst not in taken and comp[dst] + beta + 2.0 * t_in[dst]
                        < times[src] - rules.epsilon and can_receive(src, dst)):
                    pairs.append((src, dst))
                    taken.add(dst)
                    break
        found = [(src, dst, pair_move(src, dst, comp, t_in, t_out, times))
                 for src, dst in pairs]
        applied = 0
        for src, dst, move in found:
            if move is None:
                continue
            e, holder, takes, x = move
            if holder >= 0:
                t = xt[holder][dst]
                if send[holder] + t > window[holder]:  # an earlier pair filled its window
                    continue
                replicas[dst].append(e)
                held[dst][e] = True
                sources[dst, e] = holder
                recv[dst] += t
                send[holder] += t
            for s, take in takes:
                assign[s][e][src] -= take
                assign[s][e][dst] += take
                flow[s][src] -= take
                flow[s][dst] += take
            tok[src][e] -= x
            tok[dst][e] += x
            applied += 1
        if applied == 0:
            break
        rounds += 1
        moves += applied
        comp, t_in, t_out, times = rank_times()
        history.append(max(times))

    if stats is not None:
        stats.update(rounds=rounds, moves=moves, makespan=max(times), history=history)
    rep = np.zeros((num_ranks, num_experts), bool)
    src_of = np.full((num_ranks, num_experts), -1, np.int64)
    for (g, e), h in sources.items():
        rep[g, e] = True
        src_of[g, e] = h
    return Plan(rep, src_of, np.array(assign, dtype=np.int64).reshape(
        num_ranks, num_experts, num_ranks))


def _amount(after, total: int, own_src: int, drops_alpha: bool) -> int:
    """Tokens to move (the greedy's rule 6 with two_phase, no mean cap), f = max(after(x)).

    Phase 1, over the n_other = total - own_src tokens of the cold rank and third parties:
    x_eq = the first x in [1, n_other] with T_src <= T_dst (bisection; n_other if none), one
    less when that is no worse. Phase 2 runs when own_src > 0 and either n_other is 0 or
    phase 1 took all n_other tokens with T_src still above T_dst: over x in [lo, hi]
    (lo = n_other + 1; hi = total, or total - 1 when all the tokens would leave the hot rank's
    copy and drop its alpha, which breaks convexity) f is convex: x2 = the first x in
    [lo, hi - 1] with f(x + 1) >= f(x), else hi; x2 is taken when n_other is 0 or it is
    strictly better than phase 1.
    """

    def f(x):
        return max(after(x))

    n_other = total - own_src
    x = 0
    worst = 0.0
    if n_other > 0:
        x = _bisect(lambda x: after(x)[0] <= after(x)[1], 1, n_other) if (
            after(n_other)[0] <= after(n_other)[1]) else n_other
        if x > 1 and f(x - 1) <= f(x):
            x -= 1
        t_src, t_dst = after(x)
        worst = max(t_src, t_dst)
        if own_src == 0 or x < n_other or t_src <= t_dst:
            return x
    lo = n_other + 1
    hi = total - 1 if drops_alpha and total > lo else total
    x2 = _bisect(lambda x: f(x + 1) >= f(x), lo, hi)
    if n_other == 0 or f(x2) < worst:
        return x2
    return x

