"""LP heuristic: relax the MILP, round the replicas, then assign tokens exactly for that placement.

Steps (the deadline is checked between them; past it the greedy plan comes back with status
"timeout"):
1. greedy plan (the fallback, and a candidate answer);
2. a compact LP relaxation (HiGHS) of the MILP over a few candidate experts: the heaviest
   experts homed on ranks slower than the mean under static EP, plus those greedy replicated
   (`num_candidates` in all). Other experts keep their static assignment (constants). The
   relaxation is aggregated over sources: per (candidate expert e, rank g) it has l[e, g] local
   tokens (<= load[g, e]) and r[e, g] tokens from other ranks; traffic is priced with each
   rank's mean token time, which is exact when all links are equal (one node). y and x take
   their LP values, y = x = (l + r) / n_e, so alpha is charged per token (alpha / n_e) and
   slots and windows count fractional copies;
3. rounding: the greedy replicas first, then (g, e) pairs in decreasing LP tokens, kept while
   rank g has a slot and a home holder h of e can still send it within both windows (the h with
   most send budget left); the placement is feasible by construction;
4. assignment for that placement: the MILP's LP with the placement fixed, over a[s, e, g] of
   the replicated experts (exact per-source traffic), every holder active (alpha paid by each,
   an upper-bound model); rounded to integer tokens per (source, expert) by largest remainder,
   which keeps conservation; replicas left without tokens are dropped;
5. the better of this plan and greedy's, by evaluate_plan.
"""

from __future__ import annotations

import time

import numpy as np

from probe.planner.check import evaluate_plan, rank_times
from probe.planner.highs import lp_from_arrays, new_highs, time_unit
from probe.planner.milp import finish_result, largest_remainder
from probe.planner.problem import BalanceProblem, Plan, SolveResult

__all__ = ["round_replicas", "solve_lp"]

# HiGHS options for the two small LPs (measured fastest at ep=8; see results/exact_speed.md).
LP_OPTIONS: dict[str, object] = {"presolve": "off"}


def _start_plans(problem: BalanceProblem, time_limit: float | None) -> tuple[Plan, str, Plan]:
    """(greedy plan, its name, static plan)."""
    from probe.planner.greedy import solve_greedy
    from probe.planner.static import static_plan

    return solve_greedy(problem, time_limit=time_limit).plan, "greedy", static_plan(problem)


def round_replicas(problem: BalanceProblem, score: np.ndarray, *, threshold: float = 0.0,
                   keep: tuple[np.ndarray, np.ndarray] | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Feasible replicas from fractional scores float [G, E] (e.g. LP tokens per pair).

    keep: replicas bool [G, E] and sources int [G, E] of a feasible plan, placed first.
    Then pairs are taken in decreasing score (> threshold) while slots and both windows allow.
    Returns replicas bool [G, E] and sources int64 [G, E] (-1 where none).
    """
    home, cost = problem.home, problem.cost
    num_ranks, num_experts = home.shape
    replicas = np.zeros((num_ranks, num_experts), bool)
    sources = np.full((num_ranks, num_experts), -1, np.int64)
    slots_left = problem.slots.astype(np.int64).copy()
    recv_left = problem.window.astype(np.float64).copy()
    send_left = recv_left.copy()
    if keep is not None:
        for g, e in np.argwhere(keep[0]).tolist():
            h = int(keep[1][g, e])
            replicas[g, e], sources[g, e] = True, h
            slots_left[g] -= 1
            recv_left[g] -= cost.transfer_time[h, g]
            send_left[h] -= cost.transfer_time[h, g]
    score = np.where(home | replicas, 0.0, score)
    flat = np.flatnonzero(score.ravel() > threshold)
    for idx in flat[np.argsort(-score.ravel()[flat], kind="stable")].tolist():
        g, e = divmod(idx, num_experts)
        if slots_left[g] <= 0:
            continue
        holders = np.flatnonzero(home[:, e])
        t = cost.transfer_time[holders, g]
        ok = (t <= recv_left[g]) & (t <= send_left[holders])
        if not ok.any():
            continue
        pick = np.flatnonzero(ok)
        h_i = pick[np.argmax(send_left[holders[pick]] - t[pick])]
        h = int(holders[h_i])
        replicas[g, e], sources[g, e] = True, h
        slots_left[g] -= 1
        recv_left[g] -= t[h_i]
        send_left[h] -= t[h_i]
    return replicas, sources


def _candidate_experts(problem: BalanceProblem, static: Plan, greedy: Plan,
                       num_candidates: int) -> np.ndarray:
    """int [C]: heaviest experts homed on ranks slower than the mean, plus greedy's replicas."""
    compute, comm = rank_times(problem, static.assignment)
    busy = compute + comm
    slow = busy > busy.mean()
    expert_load = problem.load.sum(axis=0)
    eligible = (problem.home & slow[:, None]).any(axis=0) & (expert_load > 0)
    order = np.flatnonzero(eligible)
    order = order[np.argsort(-expert_load[order], kind="stable")][:num_candidates]
    chosen = np.zeros(problem.num_experts, bool)
    chosen[order] = True
    chosen |= greedy.replicas.any(axis=0)
    return np.flatnonzero(chosen)


def _relaxation_tokens(problem: BalanceProblem, static: Plan, experts: np.ndarray, unit: float,
                       time_left: float | None) -> np.ndarray | None:
    """LP tokens float [G, E] of candidate experts per rank (module docstring, step 2)."""
    import highspy

    load, home, cost = problem.load, problem.home, problem.cost
    num_ranks = problem.num_ranks
    expert_load = load.sum(axis=0).astype(np.float64)  # [E]
    fits = ((cost.transfer_time <= problem.window[None, :])
            & (cost.transfer_time <= problem.window[:, None]))  # [H, G]
    np.fill_diagonal(fits, False)
    # Copy source of e to g: the home holder with the cheapest transfer that fits.
    t_copy = np.where(fits[:, None, :] & home[:, experts, None], cost.transfer_time[:, None, :],
                      np.inf)  # [H, C, G]
    src = np.argmin(t_copy, axis=0)  # [C, G]
    t_best = np.min(t_copy, axis=0)  # [C, G]
    target = (np.isfinite(t_best) & (problem.slots[None, :] > 0)) | home[:, experts].T
    c_idx, g_idx = np.nonzero(target)  # pairs (candidate, rank): one l and one r column each
    e_idx = experts[c_idx]
    num_pairs = c_idx.size
    replica = ~home[g_idx, e_idx]

    # Constants: static assignment of the other experts.
    rest = static.assignment.copy()
    rest[:, experts, :] = 0
    comp_const, _ = rank_times(problem, rest)
    flow = rest.sum(axis=1).astype(np.float64)  # [S, G]
    tt = cost.token_time
    in_const = (flow * tt).sum(axis=0)
    out_const = (flow * tt).sum(axis=1)
    off = ~np.eye(num_ranks, dtype=bool)
    tt_in = np.where(off, tt, 0).sum(axis=0) / max(num_ranks - 1, 1)  # mean token time into g
    tt_out = np.where(off, tt, 0).sum(axis=1) / max(num_ranks - 1, 1)

    num_cols = 2 * num_pairs + 1  # l columns, r columns, z
    z_col = num_cols - 1
    l_col = np.arange(num_pairs)
    r_col = num_pairs + l_col
    col_lower = np.zeros(num_cols)
    col_upper = np.concatenate([load[g_idx, e_idx], expert_load[e_idx] - load[g_idx, e_idx],
                                [np.inf]]).astype(np.float64)
    share = 1.0 / expert_load[e_idx]  # fraction of the expert per token
    rows, cols, vals, lower, upper = [], [], [], [], []

    def add(row_ids, col_ids, values, lo, hi):
        base = len(lower)
        rows.append(np.asarray(row_ids) + base)
        cols.append(np.asarray(col_ids))
        vals.append(np.asarray(values, np.float64))
        lower.extend(np.atleast_1d(lo).tolist())
        upper.extend(np.atleast_1d(hi).tolist())

    both_cols = np.concatenate([l_col, r_col])
    both = np.concatenate([np.arange(num_pairs)] * 2)  # pair of each column in both_cols
    # Every token of a candidate expert runs somewhere.
    add(c_idx[both], both_cols, np.ones(both.size), expert_load[experts],
        expert_load[experts])
    # Fractional copies fit the slots of each rank.
    rep = replica[both]
    add(g_idx[both][rep], both_cols[rep], share[both][rep], np.full(num_ranks, -np.inf),
        problem.slots.astype(np.float64))
    # Fractional copies fit the receiving and the sending windows (rows divided by the window).
    t_pair = np.where(replica, t_best[c_idx, g_idx], 0.0)
    for side in (g_idx, src[c_idx, g_idx]):
        window = problem.window[side]
        ok = rep & (t_pair[both] > 0) & np.isfinite(window[both])
        scale = np.where(ok, t_pair[both] * share[both] / np.where(ok, window[both], 1.0), 0.0)
        add(side[both][ok], both_cols[ok], scale[ok], np.full(num_ranks, -np.inf),
            np.ones(num_ranks))
    # The makespan covers compute and twice the traffic in (resp. out) of every rank.
    work = (cost.alpha * share + cost.beta) / unit  # seconds per token, in units
    local_total = np.zeros(num_ranks)
    np.add.at(local_total, g_idx, load[g_idx, e_idx])
    rhs_in = -(comp_const + 2.0 * in_const) / unit
    rhs_out = -(comp_const + 2.0 * out_const + 2.0 * tt_out * local_total) / unit
    # in: remote tokens r arrive at g; out: every token of g not kept local (l) leaves it.
    for l_val, r_val, rhs in ((work, work + 2.0 * tt_in[g_idx] / unit, rhs_in),
                              (work - 2.0 * tt_out[g_idx] / unit, work, rhs_out)):
        add(np.concatenate([g_idx, g_idx, np.arange(num_ranks)]),
            np.concatenate([l_col, r_col, np.full(num_ranks, z_col)]),
            np.concatenate([l_val, r_val, -np.ones(num_ranks)]), np.full(num_ranks, -np.inf),
            rhs)
    coef_row = np.concatenate(rows)
    coef_col = np.concatenate(cols)
    coef_val = np.concatenate(vals)
    keep = coef_val != 0
    col_cost = np.zeros(num_cols)
    col_cost[z_col] = 1.0
    lp = lp_from_arrays(col_cost, col_lower, col_upper, np.array(lower), np.array(upper),
                        coef_row[keep], coef_col[keep], coef_val[keep])
    solver = new_highs(time_left, **LP_OPTIONS)
    solver.passModel(lp)
    solver.run()
    if solver.getModelStatus() != highspy.HighsModelStatus.kOptimal:
        return None
    values = np.asarray(solver.getSolution().col_value)
    tokens = np.zeros(home.shape)
    tokens[g_idx, e_idx] = values[l_col] + values[r_col]
    return tokens


def _assignment(problem: BalanceProblem, static: Plan, replicas: np.ndarray,
                sources: np.ndarray, unit: float, time_left: float | None) -> Plan | None:
    """Integer assignment for a fixed placement (module docstring, step 4); None if unsolved.

    Columns a[s, e, g] for the replicated experts only (every holder g of e, every source s
    with load); the other experts keep their static assignment, which is their only choice
    when they have one home rank. Every holder of a replicated expert pays alpha (constant).
    """
    import highspy

    load, cost = problem.load, problem.cost
    num_ranks, num_experts = problem.home.shape
    replicated = np.flatnonzero(replicas.any(axis=0))
    holds = problem.home | replicas  # [G, E]
    mask = np.zeros((num_ranks, num_experts, num_ranks), bool)  # [S, E, G]
    mask[:, replicated, :] = (load[:, replicated] > 0)[:, :, None] & holds[:, replicated].T[None]
    s_a, e_a, g_a = np.nonzero(mask)
    num_a = s_a.size
    z_col = num_a
    rest = static.assignment.copy()
    rest[:, replicated, :] = 0
    comp_const, _ = rank_times(problem, rest)
    comp_const = comp_const + cost.alpha * holds[:, replicated].sum(axis=1)
    flow = rest.sum(axis=1).astype(np.float64)  # [S, G]
    tt = cost.token_time
    in_const = (flow * tt).sum(axis=0)
    out_const = (flow * tt).sum(axis=1)

    # Every token of (s, e) runs on one of e's holders.
    se_key = s_a * num_experts + e_a
    uniq, se_row = np.unique(se_key, return_inverse=True)
    num_se = uniq.size
    cons_rhs = load.ravel()[uniq].astype(np.float64)
    # The makespan covers compute plus twice the traffic into (rows num_se + g) and out of
    # (rows num_se + G + g) every rank.
    remote = s_a != g_a
    in_rows = num_se + g_a
    out_rows = num_se + num_ranks + g_a
    out_comm_rows = num_se + num_ranks + s_a[remote]
    rank_ids = np.arange(num_ranks)
    coef_row = np.concatenate([se_row, in_rows, out_rows, out_comm_rows,
                               num_se + rank_ids, num_se + num_ranks + rank_ids])
    coef_col = np.concatenate([np.arange(num_a)] * 3 + [np.flatnonzero(remote),
                                                         np.full(2 * num_ranks, z_col)])
    coef_val = np.concatenate([np.ones(num_a),
                               (cost.beta + 2.0 * tt[s_a, g_a] * remote) / unit,
                               np.full(num_a, cost.beta / unit),
                               2.0 * tt[s_a[remote], g_a[remote]] / unit,
                               -np.ones(2 * num_ranks)])
    keep = coef_val != 0
    row_upper = np.concatenate([cons_rhs, -(comp_const + 2.0 * in_const) / unit,
                                -(comp_const + 2.0 * out_const) / unit])
    row_lower = np.concatenate([cons_rhs, np.full(2 * num_ranks, -np.inf)])
    col_cost = np.zeros(num_a + 1)
    col_cost[z_col] = 1.0
    col_upper = np.concatenate([load[s_a, e_a].astype(np.float64), [np.inf]])
    solver = new_highs(time_left, **LP_OPTIONS)
    solver.passModel(lp_from_arrays(col_cost, np.zeros(num_a + 1), col_upper, row_lower,
                                    row_upper, coef_row[keep], coef_col[keep], coef_val[keep]))
    solver.run()
    if solver.getModelStatus() != highspy.HighsModelStatus.kOptimal:
        return None
    values = np.asarray(solver.getSolution().col_value)[:num_a]
    shares = np.zeros((num_se, num_ranks))
    shares[se_row, g_a] = values
    # Integer tokens per (s, e), summing to its load: largest remainder of the LP split.
    rounded = largest_remainder(load.ravel()[uniq], shares)
    assignment = rest
    assignment[uniq // num_experts, uniq % num_experts, :] = rounded
    unused = replicas & (assignment.sum(axis=0).T == 0)
    return Plan(replicas & ~unused, np.where(unused, -1, sources), assignment)


def solve_lp(problem: BalanceProblem, *, time_limit: float | None = None,
             num_candidates: int | None = None) -> SolveResult:
    """LP-relaxation heuristic (module docstring), never worse than greedy.

    time_limit: seconds for the whole call; past it the greedy plan is returned with status
        "timeout" (greedy itself always runs to completion).
    num_candidates: experts the relaxation may replicate, heaviest first (default: the total
        number of slots, at least G); experts greedy replicated are always included.
    """
    if time_limit is not None and not time_limit > 0:
        raise ValueError(f"time_limit must be > 0 seconds or None, got {time_limit!r}")
    if num_candidates is not None and (isinstance(num_candidates, bool) or not isinstance(
            num_candidates, (int, np.integer)) or num_candidates < 0):
        raise ValueError(f"num_candidates must be an int >= 0, got {num_candidates!r}")
    start = time.perf_counter()

    def time_left() -> float | None:
        return None if time_limit is None else time_limit - (time.perf_counter() - start)

    greedy, greedy_name, static = _start_plans(problem, time_limit)

    def stop(stage: str) -> SolveResult | None:
        left = time_left()
        if left is not None and left <= 0:
            return finish_result(problem, "lp", start, "timeout", None, greedy, greedy_name,
                                 None, f"time limit reached during {stage}; greedy plan kept")
        return None

    if (late := stop("greedy")) is not None:
        return late
    if num_candidates is None:
        num_candidates = max(int(problem.slots.sum()), problem.num_ranks)
    experts = _candidate_experts(problem, static, greedy, num_candidates)
    if experts.size == 0 or not problem.slots.any():
        return finish_result(problem, "lp", start, "feasible", None, greedy, greedy_name, None,
                             "nothing to replicate")
    unit = time_unit(evaluate_plan(problem, greedy).objective)
    tokens = _relaxation_tokens(problem, static, experts, unit, time_left())
    if (late := stop("the relaxation")) is not None:
        return late
    if tokens is None:
        return finish_result(problem, "lp", start, "feasible", None, greedy, greedy_name, None,
                             "LP relaxation not solved to optimality")
    replicas, sources = round_replicas(problem, tokens, threshold=0.5,
                                       keep=(greedy.replicas, greedy.sources))
    candidate = _assignment(problem, static, replicas, sources, unit, time_left())
    if (late := stop("the assignment")) is not None:
        return late
    if candidate is None:
        return finish_result(problem, "lp", start, "feasible", None, greedy, greedy_name, None,
                             "assignment LP not solved to optimality")
    return finish_result(problem, "lp", start, "feasible", candidate, greedy, greedy_name, None,
                         f"LP rounding placed {candidate.num_replicas} replicas")
