"""Plain-Python twin of the Numba greedy (greedy.py): the same algorithm, written the obvious way.

Lists, loops and a dense assignment; no numpy in the algorithm itself. It follows the rules of
docs/planner.md ("The greedy's rules") step by step, in the same floating-point order as the
kernel, so that tests can demand identical plans from both. Slow: use it to check, not to plan.
"""

from __future__ import annotations

import numpy as np

from probe.planner.greedy_rules import GreedyRules
from probe.planner.problem import BalanceProblem, Plan
from probe.planner.static import static_assignment

__all__ = ["greedy_ref"]

# Safety cap on moves when k_max is unlimited (the loop ends much earlier in practice).
UNLIMITED_MOVES = 1_000_000
# Rule 8 runs the paper's rules with at most this many moves (the paper's fixed budget).
PAPER_MOVES = 16


def greedy_ref(problem: BalanceProblem, rules: GreedyRules | None = None) -> Plan:
    """The greedy plan of `problem` under `rules` (default `GreedyRules()`), computed slowly and
    obviously."""
    if rules is None:
        rules = GreedyRules()
    if not isinstance(rules, GreedyRules):
        raise TypeError(f"rules must be a GreedyRules, got {type(rules).__name__}")
    k_max = rules.max_moves(problem.num_ranks, problem.num_experts)  # 0: unlimited
    plan, makespan = _run(problem, k_max, rules.epsilon, rules.move_local, rules.evacuate,
                          rules.two_phase, rules.mean_cap)
    if rules.also_paper and not rules.is_paper:
        paper_k_max = min(k_max, PAPER_MOVES) if k_max else 0
        paper, paper_makespan = _run(problem, paper_k_max, rules.epsilon, False, False, False,
                                     True)
        if paper_makespan < makespan:  # rule 8: the paper's plan only when strictly better
            return paper
    return plan


def _run(problem: BalanceProblem, k_max: int, epsilon: float, move_local: bool,
         evacuate: bool, two_phase: bool, mean_cap: bool) -> tuple[Plan, float]:
    """One run of rules 1-7: the plan and its maximum rank time (the run's own bookkeeping)."""
    num_ranks, num_experts, home, slots, window, alpha, beta, tt, tx = problem_lists(problem)
    moves_left = UNLIMITED_MOVES if not k_max else int(k_max)

    # assign[s][e][g]: tokens of (s, e) processed on g, starting from the static split.
    assign = static_assignment(problem.load, problem.home).tolist()
    replicas = [[] for _ in range(num_ranks)]  # replicas[g] = experts copied to g, in order
    sources = {}  # (g, e) -> rank the copy comes from
    recv = [0.0] * num_ranks
    send = [0.0] * num_ranks

    def holds(g: int, e: int) -> bool:
        return home[g][e] or e in replicas[g]

    tok = [[sum(assign[s][e][g] for s in range(num_ranks)) for e in range(num_experts)]
           for g in range(num_ranks)]
    # CostModel.compute_time's formula, summed in the kernel's order (expert by expert).
    comp = [0.0] * num_ranks
    for g in range(num_ranks):
        for e in range(num_experts):
            if tok[g][e] > 0:
                comp[g] += alpha + beta * tok[g][e]
    flow = [[sum(assign[s][e][g] for e in range(num_experts)) for g in range(num_ranks)]
            for s in range(num_ranks)]
    t_in = [0.0] * num_ranks
    t_out = [0.0] * num_ranks
    for s in range(num_ranks):
        for g in range(num_ranks):
            t_in[g] += flow[s][g] * tt[s][g]
            t_out[s] += flow[s][g] * tt[s][g]
    times = [comp[g] + 2.0 * max(t_in[g], t_out[g]) for g in range(num_ranks)]

    def after_move(e, src, dst, pool, x):
        """Times of src and dst, and the takes per pool source, if x tokens of e move."""
        takes = []
        left = x
        for _, avail in pool:
            take = min(avail, left)
            takes.append(take)
            left -= take
        comp_src, comp_dst = moved_compute(comp, tok, e, src, dst, x, alpha, beta)
        d_in_src = 0.0
        d_in_dst = 0.0
        d_out_dst = 0.0
        d_out_src = 0.0
        for (s, _), take in zip(pool, takes, strict=True):
            d_in_src += take * tt[s][src]
            if s == dst:
                d_out_dst += take * tt[dst][src]
            else:
                d_in_dst += take * tt[s][dst]
                if s == src:  # move_local: src's own tokens now leave it
                    d_out_src += take * (tt[src][dst] - tt[src][src])
        t_src = comp_src + 2.0 * max(t_in[src] - d_in_src, t_out[src] + d_out_src)
        t_dst = comp_dst + 2.0 * max(t_in[dst] + d_in_dst, t_out[dst] - d_out_dst)
        return t_src, t_dst, takes, (comp_src, comp_dst, d_in_src, d_in_dst, d_out_dst,
                                     d_out_src)

    def worst_of(e, src, dst, pool, x):
        """after_move plus the third-party sources: (worst time, t_src, t_dst, takes, parts,
        new_out)."""
        t_src, t_dst, takes, parts = after_move(e, src, dst, pool, x)
        worst = max(t_src, t_dst)
        new_out = {}
        for (s, _), take in zip(pool, takes, strict=True):
            if s != dst and s != src and take > 0:
                new_out[s] = t_out[s] + take * (tt[s][dst] - tt[s][src])
                worst = max(worst, comp[s] + 2.0 * max(t_in[s], new_out[s]))
        return worst, t_src, t_dst, takes, parts, new_out

    for _ in range(moves_left):
        src = max(range(num_ranks), key=lambda g: (times[g], -g))
        total_time = 0.0
        for t in times:  # in rank order (the kernel's order; sum() may compensate)
            total_time += t
        mean = total_time / num_ranks
        cap = mean if mean_cap else float("-inf")  # x_mean's target (-inf: x = x_eq)
        dst_order = sorted((g for g in range(num_ranks) if g != src and times[g] < times[src]),
                           key=lambda g: (times[g], g))
        expert_order = [e for e in sorted(range(num_experts), key=lambda e: (-tok[src][e], e))
                        if tok[src][e] > 0]
        move = None
        for dst in dst_order:
            for e in expert_order:
                # The pool: tokens of e now on src from other sources holding no copy of e;
                # dst's own tokens first (they become local), then sources in rank order,
                # then (move_local) src's own.
                order = [dst] + [s for s in range(num_ranks) if s != dst]
                pool = [(s, assign[s][e][src]) for s in order
                        if s != src and assign[s][e][src] > 0
                        and (s == dst or not holds(s, e))]
                if move_local and assign[src][e][src] > 0:
                    pool.append((src, assign[src][e][src]))
                total = sum(avail for _, avail in pool)
                if total == 0:
                    continue
                holder = -1
                if not holds(dst, e):
                    if len(replicas[dst]) >= slots[dst]:
                        continue
                    best = None
                    for h in range(num_ranks):
                        if not home[h][e]:
                            continue
                        t = tx[h][dst]
                        if recv[dst] + t <= window[dst] and send[h] + t <= window[h]:
                            key = (t, send[h], h)
                            if best is None or key < best:
                                best = key
                    if best is None:
                        continue
                    holder = best[2]
                own_src = pool[-1][1] if move_local and pool[-1][0] == src else 0
                if two_phase and own_src > 0:
                    x, worst, t_src, t_dst, takes, parts, new_out = _two_phase(
                        lambda x, e=e, s=src, d=dst, p=pool: worst_of(e, s, d, p, x),
                        total - own_src, total, cap, total == tok[src][e])
                else:
                    x = _amount(lambda x, e=e, s=src, d=dst, p=pool: after_move(e, s, d, p, x),
                                total, cap)
                    worst, t_src, t_dst, takes, parts, new_out = worst_of(e, src, dst, pool, x)
                if evacuate and x < total and total == tok[src][e]:
                    evac = worst_of(e, src, dst, pool, total)
                    if evac[0] < worst:
                        x = total
                        worst, t_src, t_dst, takes, parts, new_out = evac
                if times[src] - worst > epsilon:
                    move = (e, dst, holder, pool, x, takes, parts, new_out, t_src, t_dst)
                    break
            if move is not None:
                break
        if move is None:
            break
        e, dst, holder, pool, x, takes, parts, new_out, t_src, t_dst = move
        if holder >= 0:
            replicas[dst].append(e)
            sources[dst, e] = holder
            recv[dst] += tx[holder][dst]
            send[holder] += tx[holder][dst]
        for (s, _), take in zip(pool, takes, strict=True):
            assign[s][e][src] -= take
            assign[s][e][dst] += take
        tok[src][e] -= x
        tok[dst][e] += x
        comp_src, comp_dst, d_in_src, d_in_dst, d_out_dst, d_out_src = parts
        comp[src] = comp_src
        comp[dst] = comp_dst
        t_in[src] -= d_in_src
        t_in[dst] += d_in_dst
        t_out[dst] -= d_out_dst
        t_out[src] += d_out_src
        times[src] = t_src
        times[dst] = t_dst
        for s, out in new_out.items():
            t_out[s] = out
            times[s] = comp[s] + 2.0 * max(t_in[s], t_out[s])

    rep = [[False] * num_experts for _ in range(num_ranks)]
    src_of = [[-1] * num_experts for _ in range(num_ranks)]
    for (g, e), h in sources.items():
        rep[g][e] = True
        src_of[g][e] = h
    makespan = 0.0
    for t in times:
        makespan = max(makespan, t)
    plan = Plan(np.array(rep, dtype=bool).reshape(num_ranks, num_experts),
                np.array(src_of, dtype=np.int64).reshape(num_ranks, num_experts),
                np.array(assign, dtype=np.int64).reshape(num_ranks, num_experts, num_ranks))
    return plan, makespan


def problem_lists(problem: BalanceProblem) -> tuple:
    """The problem as the twins read it: (num_ranks, num_experts, home, slots, window, alpha,
    beta, token_time, transfer_time), the arrays as nested lists, alpha and beta as floats."""
    cost = problem.cost
    return (problem.num_ranks, problem.num_experts, problem.home.tolist(),
            problem.slots.tolist(), problem.window.tolist(), float(cost.alpha),
            float(cost.beta), cost.token_time.tolist(), cost.transfer_time.tolist())


def moved_compute(comp: list, tok: list, e: int, src: int, dst: int, x: int, alpha: float,
                  beta: float) -> tuple[float, float]:
    """Compute times of src and dst if x >= 1 tokens of e move from src to dst: beta per token,
    and alpha off src when e leaves it, alpha onto dst when e is new there."""
    comp_src = comp[src] - beta * x
    if tok[src][e] == x:
        comp_src -= alpha
    comp_dst = comp[dst] + beta * x
    if tok[dst][e] == 0:
        comp_dst += alpha
    return comp_src, comp_dst


def _amount(after, total: int, mean: float) -> int:
    """Tokens to move: the balance point of src and dst, no further than src reaching the mean
    (mean = -inf without mean_cap: then x_mean = total and the answer is x_eq).

    after(x) -> (t_src, t_dst, ...). x_eq is the smallest x in [1, total] with
    t_src(x) <= t_dst(x) (found by bisection; `total` if none), moved back by one when x_eq - 1
    gives a max(t_src, t_dst) no larger; x_mean is the smallest x with t_src(x) <= mean
    (bisection; `total` if none). The answer is min(x_eq, x_mean).
    """

    def crossed(x):
        t_src, t_dst = after(x)[:2]
        return t_src <= t_dst

    x_eq = _first_true(crossed, total)
    if x_eq > 1:
        a = after(x_eq - 1)
        b = after(x_eq)
        if max(a[0], a[1]) <= max(b[0], b[1]):
            x_eq -= 1
    x_mean = _first_true(lambda x: after(x)[0] <= mean, total)
    return min(x_eq, x_mean)


def _first_true(pred, total: int) -> int:
    """Bisection over x in [1, total] for the first pred(x); `total` when pred(total) fails."""
    if not pred(total):
        return total
    lo, hi = 1, total
    while lo < hi:
        mid = (lo + hi) // 2
        if pred(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _two_phase(worst_of, n_other: int, total: int, mean: float, drops_alpha: bool) -> tuple:
    """Rule 6's two_phase option: x when the pool ends with r_src's own tokens (n_other
    tokens of other sources before them).

    worst_of(x) -> (worst, t_src, t_dst, ...). Phase 1 is `_amount` over the other sources'
    tokens alone (x in [1, n_other], where T_src falls as x grows). Phase 2 runs when n_other is
    0, or when phase 1 took all n_other tokens and T_src is still above both T_dst and the mean:
    over x in [lo, hi] (lo = n_other + 1; hi = total, or total - 1 when x = total would empty
    r_src of the expert, whose alpha drop breaks convexity) f(x) = max(T_src, T_dst) is convex;
    x2
    = the first x in [lo, hi - 1] with f(x + 1) >= f(x) (bisection; hi if none); then, when
    T_src(x2) <= mean, x2 = the first x in [lo, x2] with T_src(x) <= mean (bisection). The answer
    is x2 if n_other is 0 or x2's worst time is strictly below n_other's, else n_other.
    Returns worst_of(answer) with the answer in front.
    """
    if n_other > 0:
        x1 = _amount(lambda x: worst_of(x)[1:3], n_other, mean)
        first = worst_of(x1)
        if x1 < n_other or first[1] <= first[2] or first[1] <= mean:
            return (x1, *first)
    lo = n_other + 1
    hi = total - 1 if drops_alpha and total > lo else total

    def rising(x):
        a = worst_of(x)
        b = worst_of(x + 1)
        return max(b[1], b[2]) >= max(a[1], a[2])

    x2 = _bisect(rising, lo, hi)
    if worst_of(x2)[1] <= mean:
        x2 = _bisect(lambda x: worst_of(x)[1] <= mean, lo, x2)
    second = worst_of(x2)
    if n_other > 0 and not second[0] < first[0]:
        return (n_other, *first)
    return (x2, *second)


def _bisect(pred, lo: int, hi: int) -> int:
    """The first x in [lo, hi - 1] with pred(x) (pred monotone), else hi; pred(hi) is never
    called."""
    while lo < hi:
        mid = (lo + hi) // 2
        if pred(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo
