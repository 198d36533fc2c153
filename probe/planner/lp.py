"""LP heuristic: relax the MILP, dive to whole replicas, then assign tokens exactly.

Steps (the deadline is checked between LP solves; past it the best plan found so far comes back
with status "timeout", at worst greedy's):
1. greedy plan (the fallback, and a candidate answer);
2. a compact LP relaxation (HiGHS) of the MILP over candidate experts: the heaviest experts
   homed on ranks slower than the mean under static EP (`num_candidates` of them), the
   `per_rank` heaviest experts homed on each rank (so that copies can form chains and cycles:
   a rank that receives load may pass some of its own on; default rule in `solve_lp`), and
   those greedy replicated. Other experts keep their static assignment (constants). The
   relaxation is aggregated over sources: per (candidate expert e, rank g) it has l[e, g]
   local tokens (<= load[g, e]) and r[e, g] tokens from other ranks; traffic is priced with
   each rank's mean token time, which is exact when all links are equal (one node). A pair
   that is not a whole copy counts as the fraction (l + r) / load[e] of a copy against the
   slots and both windows (copy source: the cheapest home holder that fits), and alpha is
   charged per token (alpha / load[e]);
3. dives: solve, make the free copy pair that carries the most LP tokens a whole copy (its
   coefficients leave the slot and window rows, whose bounds fall by one copy), drop every
   free pair that no longer fits a slot or a window (token bounds 0), re-solve warm, until no
   free replica pair carries tokens or `MAX_RUNS` LP solves are spent (then the rest are
   placed by decreasing LP tokens while they fit). Two dives share one model: (a) from the
   relaxation as it is, (b) with greedy's replicas placed first; on more than `TWO_DIVES_G`
   ranks only (b) (or (a) when greedy placed nothing). Up to `SMALL_G` ranks a dive may use
   `MAX_RUNS` LP solves, beyond `MAX_RUNS_LARGE`, to stay within about twice the time of the
   earlier single-rounding heuristic (results/lp_gap.md);
4. assignment for each dive's placement: the MILP's LP with the placement fixed, over
   a[s, e, g] of the replicated experts (exact per-source traffic); every holder pays alpha
   (an upper-bound model) except the home holders the dive's last LP left without tokens,
   which get none here either (alpha saved: an expert moved off its home, which the
   upper-bound model cannot find by itself; beyond `SMALL_G` ranks also with every home
   active, as idle-off can lose there); rounded to integer tokens per (source, expert)
   (largest remainder where the LP split is fractional), which keeps conservation; replicas
   left without tokens are dropped. One HiGHS model holds the union of the placements; each
   placement is a change of bounds and a warm re-solve;
5. the best of these plans and greedy's, by evaluate_plan.

A copy fits a window when tolerance.fits_window says so (the checker's own test).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

from probe.planner.check import rank_times
from probe.planner.highs_base import Rows, highs_lp, new_highs, time_unit
from probe.planner.problem import BalanceProblem, Plan, SolveResult
from probe.planner.result import finish_result, largest_remainder
from probe.planner.tolerance import fits_window

__all__ = ["solve_lp"]

# HiGHS options for the small LPs (presolve costs more than it saves on them).
LP_OPTIONS: dict[str, object] = {"presolve": "off"}
# LP solves per dive (the root included) on up to SMALL_G ranks, and beyond.
MAX_RUNS = 4
MAX_RUNS_LARGE = 3
SMALL_G = 4
# Ranks up to which both dives run (beyond: only the dive after greedy's replicas). At 8 the
# second dive made ep=8 decode steps (results/lp_speed.md's setup) markedly slower for the same
# median and p95 gap on solvers_bench's non-trivial proven instances.
TWO_DIVES_G = 4
# Heaviest experts of each home rank added to the candidates: on up to SMALL_G ranks, and on
# more when alpha is under 20% of an expert's compute (prefill-like batches).
PER_RANK = 2


_CACHE = threading.local()


def _solver(slot: str, model, verbose: bool = False):
    """A HiGHS instance of this thread for `slot` ("relax" or "assign") holding `model`,
    printing its log only if verbose.

    Creating a highspy.Highs is a large share of a small solve, so each thread keeps one per
    slot; passModel replaces the model (and drops the old basis).
    """
    solver = getattr(_CACHE, slot, None)
    if solver is None:
        solver = new_highs(None, **LP_OPTIONS)
        setattr(_CACHE, slot, solver)
    solver.setOptionValue("output_flag", bool(verbose))
    solver.passModel(model)
    return solver


class _Clock:
    """Seconds left of an optional time limit."""

    def __init__(self, time_limit: float | None) -> None:
        self.start = time.perf_counter()
        self.limit = time_limit

    def left(self) -> float | None:
        return None if self.limit is None else self.limit - (time.perf_counter() - self.start)

    def over(self) -> bool:
        left = self.left()
        return left is not None and left <= 0


def _objective(problem: BalanceProblem, plan: Plan) -> float:
    """evaluate_plan's objective (eq. 8) alone: max over ranks of compute + communication."""
    compute, comm = rank_times(problem, plan.assignment)
    return float((compute + comm).max())


def _start_plans(problem: BalanceProblem, time_limit: float | None) -> tuple[Plan, str, Plan]:
    """(greedy plan, its name, static plan)."""
    from probe.planner.greedy import solve_greedy
    from probe.planner.static import static_plan

    return solve_greedy(problem, time_limit=time_limit).plan, "greedy", static_plan(problem)


@dataclass(eq=False)
class _Static:
    """The static plan's per-rank constants, computed once per solve."""

    plan: Plan
    tokens: np.ndarray  # float [G, E] tokens of expert e processed on rank g
    compute: np.ndarray  # float [G] compute seconds
    flow: np.ndarray  # float [S, G] tokens sent s -> g


def _static(problem: BalanceProblem, plan: Plan) -> _Static:
    tokens = plan.assignment.sum(axis=0).T.astype(np.float64)
    compute = problem.cost.compute_time(tokens)
    return _Static(plan, tokens, compute, plan.assignment.sum(axis=1).astype(np.float64))


def _static_rest(problem: BalanceProblem, static: _Static, experts: np.ndarray):
    """Constants of the experts outside `experts` (static assignment): compute seconds [G],
    token seconds into and out of each rank [G]."""
    cost = problem.cost
    tokens = static.tokens[:, experts]
    compute = static.compute - cost.compute_time(tokens)
    flow = static.flow - static.plan.assignment[:, experts, :].sum(axis=1)  # [S, G]
    tt = cost.token_time
    return compute, (flow * tt).sum(axis=0), (flow * tt).sum(axis=1)


def _candidate_experts(problem: BalanceProblem, static: _Static, greedy: Plan,
                       num_candidates: int, per_rank: int = 0) -> np.ndarray:
    """int [C]: heaviest experts homed on ranks slower than the mean, the `per_rank` heaviest
    experts homed on each rank, and greedy's replicated experts."""
    traffic = static.flow * problem.cost.token_time
    busy = static.compute + 2.0 * np.maximum(traffic.sum(axis=0), traffic.sum(axis=1))
    slow = busy > busy.mean()
    expert_load = problem.load.sum(axis=0)
    eligible = (problem.home & slow[:, None]).any(axis=0) & (expert_load > 0)
    order = np.flatnonzero(eligible)
    order = order[np.argsort(-expert_load[order], kind="stable")][:num_candidates]
    chosen = np.zeros(problem.num_experts, bool)
    chosen[order] = True
    if per_rank > 0:
        # Rank the experts of each home rank by load (stable: lower index first on ties).
        homed = problem.home & (expert_load > 0)[None, :]
        key = np.where(homed, -expert_load[None, :].astype(np.float64), np.inf)
        top = np.argsort(key, axis=1, kind="stable")[:, :per_rank]  # [G, per_rank]
        chosen[top[np.take_along_axis(homed, top, axis=1)]] = True
    chosen |= greedy.replicas.any(axis=0)
    return np.flatnonzero(chosen)


def _any_copy_fits(problem: BalanceProblem) -> bool:
    """Whether some rank with a slot can receive a copy from another rank within both windows."""
    t = problem.cost.transfer_time
    fits = fits_window(t, problem.window[None, :]) & fits_window(t, problem.window[:, None])
    np.fill_diagonal(fits, False)
    return bool((fits & (problem.slots > 0)[None, :]).any())


def _alpha_share(problem: BalanceProblem) -> float:
    """alpha / (alpha + beta x mean tokens of an expert with load): the share of an expert's
    compute that is fixed cost (near 1 for small decode batches, near 0 for prefill)."""
    expert_load = problem.load.sum(axis=0)
    loaded = expert_load[expert_load > 0]
    if loaded.size == 0:
        return 1.0
    cost = problem.cost
    work = cost.alpha + cost.beta * float(loaded.mean())
    return cost.alpha / work if work > 0 else 1.0


def _copy_sources(problem: BalanceProblem, experts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For candidate experts int [C]: copy source int [C, G] (the home holder with the cheapest
    transfer to g that fits both windows) and its transfer seconds float [C, G] (inf: none)."""
    cost, home = problem.cost, problem.home
    fits = (fits_window(cost.transfer_time, problem.window[None, :])
            & fits_window(cost.transfer_time, problem.window[:, None]))  # [H, G]
    np.fill_diagonal(fits, False)
    t_copy = np.where(fits[:, None, :] & home[:, experts, None], cost.transfer_time[:, None, :],
                      np.inf)  # [H, C, G]
    return np.argmin(t_copy, axis=0), np.min(t_copy, axis=0)


def _mean_token_times(problem: BalanceProblem) -> tuple[np.ndarray, np.ndarray]:
    """Mean token seconds into and out of each rank over the other ranks: two float [G]."""
    num_ranks = problem.num_ranks
    tt = problem.cost.token_time
    off = ~np.eye(num_ranks, dtype=bool)
    return (np.where(off, tt, 0).sum(axis=0) / max(num_ranks - 1, 1),
            np.where(off, tt, 0).sum(axis=1) / max(num_ranks - 1, 1))


# ----------------------------------------------------------------------- relaxation and dives
@dataclass(eq=False)
class _Relaxation:
    """The step-2 LP in a HiGHS instance, with its pairs (candidate expert, rank).

    Rows, in this order: one conservation row per candidate, then G slot rows, G receiving
    window rows, G sending window rows, G makespan-in and G makespan-out rows.
    """

    solver: object
    g_idx: np.ndarray  # int [P] rank of each pair
    e_idx: np.ndarray  # int [P] expert of each pair
    src: np.ndarray  # int [P] copy source of a replica pair
    t_copy: np.ndarray  # float [P] its transfer seconds (0 for home pairs)
    replica: np.ndarray  # bool [P] g is not a home of e
    windowed: np.ndarray  # bool [P] a copy with a transfer time (in the finite window rows)
    share: np.ndarray  # float [P] 1 / load of the pair's expert (copies per token)
    col_upper: np.ndarray  # float [2P] token bounds of the l then the r columns
    slot_row: int  # first slot row; window rows follow (G each)
    num_pairs: int

    def tokens(self, values: np.ndarray) -> np.ndarray:
        """LP tokens float [P] of each pair."""
        return values[:self.num_pairs] + values[self.num_pairs:2 * self.num_pairs]


def _build_relaxation(problem: BalanceProblem, static: _Static, experts: np.ndarray, unit: float,
                      *, verbose: bool = False) -> _Relaxation:
    """The step-2 relaxation (module docstring), ready to run (HiGHS logs only if verbose)."""
    load, home, cost = problem.load, problem.home, problem.cost
    num_ranks = problem.num_ranks
    expert_load = load.sum(axis=0).astype(np.float64)  # [E]
    src, t_best = _copy_sources(problem, experts)
    target = (np.isfinite(t_best) & (problem.slots[None, :] > 0)) | home[:, experts].T
    c_idx, g_idx = np.nonzero(target)  # pairs (candidate, rank): one l and one r column each
    e_idx = experts[c_idx]
    num_pairs = c_idx.size
    replica = ~home[g_idx, e_idx]
    comp_const, in_const, out_const = _static_rest(problem, static, experts)
    tt_in, tt_out = _mean_token_times(problem)

    z_col = 2 * num_pairs
    l_col = np.arange(num_pairs)
    r_col = num_pairs + l_col
    col_upper = np.concatenate([load[g_idx, e_idx], expert_load[e_idx] - load[g_idx, e_idx]]
                               ).astype(np.float64)
    share = 1.0 / expert_load[e_idx]  # fraction of the expert per token
    rows = Rows()
    both_cols = np.concatenate([l_col, r_col])
    both = np.concatenate([np.arange(num_pairs)] * 2)  # pair of each column in both_cols
    # Every token of a candidate expert runs somewhere.
    rows.add(c_idx[both], both_cols, np.ones(both.size), expert_load[experts],
             expert_load[experts])
    # Fractional copies (tokens / load of the expert) fit the slots of each rank.
    slot_row = rows.count
    rep = replica[both]
    rows.add(g_idx[both][rep], both_cols[rep], share[both][rep], np.full(num_ranks, -np.inf),
             problem.slots.astype(np.float64))
    # ... and the receiving and the sending windows (rows divided by the window).
    t_pair = np.where(replica, t_best[c_idx, g_idx], 0.0)
    src_pair = src[c_idx, g_idx]
    windowed = replica & (t_pair > 0)
    for side in (g_idx, src_pair):
        window = problem.window[side]
        ok = windowed & np.isfinite(window)
        scale = np.where(ok, t_pair * share / np.where(ok, window, 1.0), 0.0)
        rows.add(side[both][ok[both]], both_cols[ok[both]], scale[both][ok[both]],
                 np.full(num_ranks, -np.inf), np.ones(num_ranks))
    # The makespan covers compute (alpha charged per token: alpha / load of the expert) and
    # twice the traffic in (resp. out) of every rank. in: remote tokens r arrive at g;
    # out: every token of g not kept local (l) leaves it.
    work = (cost.alpha * share + cost.beta) / unit  # seconds per token, in units
    local_total = load[:, experts].sum(axis=1).astype(np.float64)  # [G]
    rhs_in = -(comp_const + 2.0 * in_const) / unit
    rhs_out = -(comp_const + 2.0 * out_const + 2.0 * tt_out * local_total) / unit
    for l_val, r_val, rhs in ((work, work + 2.0 * tt_in[g_idx] / unit, rhs_in),
                              (work - 2.0 * tt_out[g_idx] / unit, work, rhs_out)):
        rows.add(np.concatenate([g_idx, g_idx, np.arange(num_ranks)]),
                 np.concatenate([l_col, r_col, np.full(num_ranks, z_col)]),
                 np.concatenate([l_val, r_val, -np.ones(num_ranks)]),
                 np.full(num_ranks, -np.inf), rhs)
    col_cost = np.zeros(z_col + 1)
    col_cost[z_col] = 1.0
    solver = _solver("relax", rows.lp(col_cost, np.zeros(col_cost.size),
                                      np.append(col_upper, np.inf)), verbose)
    return _Relaxation(solver, g_idx, e_idx, src_pair, t_pair, replica, windowed, share,
                       col_upper, slot_row, num_pairs)


def _run(solver, time_left: float | None) -> np.ndarray | None:
    """Run a HiGHS instance for at most time_left seconds (None: no limit); its column values,
    or None unless solved to optimality.

    HiGHS compares time_limit with the run time its instance has accumulated over all its runs
    (getRunTime), not with this run's: the instances are reused (`_solver`), so the limit is
    that total plus the time left.
    """
    import highspy

    solver.setOptionValue("time_limit", np.inf if time_left is None
                          else solver.getRunTime() + max(float(time_left), 1e-3))
    solver.run()
    if solver.getModelStatus() != highspy.HighsModelStatus.kOptimal:
        return None
    return np.asarray(solver.getSolution().col_value)


class _Dive:
    """Step 3 on one relaxation: whole copies fixed one at a time (module docstring).

    A whole copy of pair p leaves the slot and window rows (its coefficients become 0 and the
    rows' bounds fall by one copy); a dropped pair gets token bounds 0. `reset` undoes both,
    so several dives share one model (and HiGHS's basis).
    """

    def __init__(self, problem: BalanceProblem, relax: _Relaxation) -> None:
        self.problem, self.relax = problem, relax
        num_ranks = problem.num_ranks
        window = problem.window.astype(np.float64)
        self.scale = np.where(np.isfinite(window) & (window > 0), 1.0 / np.where(
            window > 0, window, 1.0), 0.0)
        base = relax.slot_row
        self.rank_rows = np.arange(base, base + 3 * num_ranks, dtype=np.int32)
        self.whole: list[int] = []
        self.dropped = np.zeros(relax.num_pairs, bool)
        self.root_basis = None

    def root(self, clock: _Clock) -> np.ndarray | None:
        """Solve the relaxation as built; its column values (None if unsolved). Its basis
        warm-starts every later dive."""
        values = _run(self.relax.solver, clock.left())
        if values is not None:
            self.root_basis = self.relax.solver.getBasis()
        return values

    def _coeffs(self, p: int, whole: bool) -> None:
        """Set pair p's slot and window coefficients: 0 for a whole copy, else the LP's."""
        relax, solver = self.relax, self.relax.solver
        num_ranks, num_pairs = self.problem.num_ranks, relax.num_pairs
        g, h = int(relax.g_idx[p]), int(relax.src[p])
        share = relax.share[p]
        entries = [(relax.slot_row + g, share)]
        t = relax.t_copy[p]
        if relax.windowed[p] and self.scale[g] > 0:
            entries.append((relax.slot_row + num_ranks + g, t * share * self.scale[g]))
        if relax.windowed[p] and self.scale[h] > 0:
            entries.append((relax.slot_row + 2 * num_ranks + h, t * share * self.scale[h]))
        for col in (p, num_pairs + p):
            for row, value in entries:
                solver.changeCoeff(int(row), int(col), 0.0 if whole else float(value))

    def reset(self) -> None:
        relax = self.relax
        for p in self.whole:
            self._coeffs(p, whole=False)
        self.whole = []
        out = np.flatnonzero(self.dropped)
        if out.size:
            cols = np.concatenate([out, relax.num_pairs + out]).astype(np.int32)
            relax.solver.changeColsBounds(cols.size, cols, np.zeros(cols.size),
                                          relax.col_upper[cols])
        self.dropped[:] = False
        if self.root_basis is not None:
            relax.solver.setBasis(self.root_basis)

    def run(self, keep: Plan | None, clock: _Clock, max_runs: int,
            root: np.ndarray | None = None
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Replicas bool [G, E], sources int64 [G, E] and idle homes bool [G, E] (home holders
        of a replicated expert to which the last LP gave no tokens), or None (LP unsolved or
        no time).

        keep: a plan whose replicas are placed (and fixed whole) first. root: the values of
        `root()` (keep None only), used instead of the first solve. After `max_runs` LP
        solves the free pairs still carrying tokens are placed by decreasing LP tokens.
        """
        problem, relax = self.problem, self.relax
        cost, solver = problem.cost, relax.solver
        self.reset()
        window = problem.window.astype(np.float64)
        slots_left = problem.slots.astype(np.int64).copy()
        recv_used = np.zeros(problem.num_ranks)  # transfer seconds placed so far
        send_used = np.zeros(problem.num_ranks)
        replicas = np.zeros(problem.home.shape, bool)
        sources = np.full(problem.home.shape, -1, np.int64)
        free = relax.replica.copy()  # pairs neither whole nor dropped

        def fits(p: int) -> bool:
            g, h, t = relax.g_idx[p], relax.src[p], relax.t_copy[p]
            return bool(slots_left[g] >= 1 and fits_window(recv_used[g] + t, window[g])
                        and fits_window(send_used[h] + t, window[h]))

        def place(g: int, e: int, h: int, p: int | None) -> None:
            t = cost.transfer_time[h, g]
            replicas[g, e], sources[g, e] = True, h
            slots_left[g] -= 1
            recv_used[g] += t
            send_used[h] += t
            if p is not None:
                free[p] = False
                self._coeffs(p, whole=True)
                self.whole.append(p)

        def update() -> None:
            """Drop every free pair that no longer fits; row bounds = what is left."""
            idx = np.flatnonzero(free)
            g, h, t = relax.g_idx[idx], relax.src[idx], relax.t_copy[idx]
            out = idx[(slots_left[g] < 1) | ~fits_window(recv_used[g] + t, window[g])
                      | ~fits_window(send_used[h] + t, window[h])]
            if out.size:
                free[out] = False
                self.dropped[out] = True
                cols = np.concatenate([out, relax.num_pairs + out]).astype(np.int32)
                solver.changeColsBounds(cols.size, cols, np.zeros(cols.size),
                                        np.zeros(cols.size))
            with np.errstate(invalid="ignore"):
                upper = np.concatenate([
                    slots_left.astype(np.float64),
                    np.where(self.scale > 0, (window - recv_used) * self.scale, 1.0),
                    np.where(self.scale > 0, (window - send_used) * self.scale, 1.0)])
            rows = self.rank_rows
            solver.changeRowsBounds(rows.size, rows, np.full(rows.size, -np.inf),
                                    np.maximum(upper, 0.0))

        if keep is not None:
            pair_of = {(int(relax.g_idx[p]), int(relax.e_idx[p])): int(p)
                       for p in np.flatnonzero(relax.replica)}
            for g, e in np.argwhere(keep.replicas).tolist():
                place(g, e, int(keep.sources[g, e]), pair_of.get((g, e)))
        update()
        runs = 0
        while True:
            if clock.over():
                return None
            if root is not None and runs == 0 and keep is None:
                values = root
            else:
                values = _run(solver, clock.left())
            runs += 1
            if values is None:
                return None
            tokens = relax.tokens(values)
            busy = np.flatnonzero(free & (tokens > 0.5))
            if busy.size == 0:
                break
            busy = busy[np.argsort(-tokens[busy], kind="stable")]
            if runs < max_runs:
                p = int(busy[0])
                place(int(relax.g_idx[p]), int(relax.e_idx[p]), int(relax.src[p]), p)
                update()
                continue
            for p in busy.tolist():  # out of LP solves: the rest by decreasing tokens
                if fits(p):
                    place(int(relax.g_idx[p]), int(relax.e_idx[p]), int(relax.src[p]), None)
            break
        # Home pairs the last LP left without tokens although their expert has a copy.
        idle = np.zeros(problem.home.shape, bool)
        home_pair = ~relax.replica & (tokens < 0.5)
        idle[relax.g_idx[home_pair], relax.e_idx[home_pair]] = True
        idle &= replicas.any(axis=0)[None, :]
        return replicas, sources, idle


# ------------------------------------------------------------------------------- assignment
@dataclass(eq=False)
class _Assignment:
    """The step-4 LP over the union of several placements, in one HiGHS instance."""

    solver: object
    s_a: np.ndarray  # int [A] source of each a column
    e_a: np.ndarray  # int [A] expert
    g_a: np.ndarray  # int [A] rank
    uniq: np.ndarray  # int [K] the (s, e) keys s * E + e with columns
    se_row: np.ndarray  # int [A] index into uniq of each column
    replicated: np.ndarray  # int [R] experts replicated in the union
    rest: np.ndarray  # int [S, E, G] static assignment of the other experts
    rhs_in: np.ndarray  # float [G] makespan row bounds without the replicated experts' alpha
    rhs_out: np.ndarray
    unit: float


def _build_assignment(problem: BalanceProblem, static: _Static, union: np.ndarray, unit: float,
                      *, verbose: bool = False) -> _Assignment:
    """Step 4's LP for every holder in home | union (bool [G, E]); no placement chosen yet
    (HiGHS logs only if verbose).

    Columns a[s, e, g] for the replicated experts only (every holder g of e, every source s
    with load); the other experts keep their static assignment, which is their only choice
    when they have one home rank. Rows: conservation per (s, e), then the makespan rows into
    (G rows) and out of (G rows) every rank.
    """
    load, cost = problem.load, problem.cost
    num_ranks, num_experts = problem.home.shape
    replicated = np.flatnonzero(union.any(axis=0))
    holds = problem.home | union  # [G, E]
    mask = (load[:, replicated] > 0)[:, :, None] & holds[:, replicated].T[None]  # [S, R, G]
    s_a, r_a, g_a = np.nonzero(mask)
    e_a = replicated[r_a]
    num_a = s_a.size
    z_col = num_a
    comp_const, in_const, out_const = _static_rest(problem, static, replicated)
    rest = static.plan.assignment.copy()
    rest[:, replicated, :] = 0
    tt = cost.token_time

    # (s, e) pairs in the order of the columns (np.nonzero is lexicographic in s, then e).
    se_key = s_a * num_experts + e_a
    first = np.ones(num_a, bool)
    first[1:] = se_key[1:] != se_key[:-1]
    se_row = np.cumsum(first) - 1
    uniq = se_key[first]
    num_se = uniq.size
    cons_rhs = load.ravel()[uniq].astype(np.float64)
    remote = s_a != g_a
    ranks = np.arange(num_ranks)
    cols = np.arange(num_a)
    coef_row = np.concatenate([se_row, num_se + g_a, num_se + num_ranks + g_a,
                               num_se + num_ranks + s_a[remote],
                               num_se + ranks, num_se + num_ranks + ranks])
    coef_col = np.concatenate([cols, cols, cols, cols[remote], np.full(2 * num_ranks, z_col)])
    coef_val = np.concatenate([np.ones(num_a),
                               (cost.beta + 2.0 * tt[s_a, g_a] * remote) / unit,
                               np.full(num_a, cost.beta / unit),
                               2.0 * tt[s_a[remote], g_a[remote]] / unit,
                               -np.ones(2 * num_ranks)])
    rhs_in = -(comp_const + 2.0 * in_const) / unit
    rhs_out = -(comp_const + 2.0 * out_const) / unit
    col_cost = np.zeros(num_a + 1)
    col_cost[z_col] = 1.0
    col_upper = np.append(load[s_a, e_a].astype(np.float64), np.inf)
    solver = _solver("assign", highs_lp(
        col_cost, np.zeros(num_a + 1), col_upper,
        np.concatenate([cons_rhs, np.full(2 * num_ranks, -np.inf)]),
        np.concatenate([cons_rhs, rhs_in, rhs_out]), coef_row, coef_col, coef_val), verbose)
    return _Assignment(solver, s_a, e_a, g_a, uniq, se_row, replicated, rest, rhs_in, rhs_out,
                       unit)


def _assign(problem: BalanceProblem, model: _Assignment, replicas: np.ndarray,
            sources: np.ndarray, time_left: float | None,
            off: np.ndarray | None = None) -> Plan | None:
    """Integer assignment for one placement inside the union model (module docstring, step 4);
    None if the LP is not solved. Every holder of a replicated expert pays alpha, except
    holders in `off` (bool [G, E]: home holders given no tokens at all)."""
    load, alpha = problem.load, problem.cost.alpha
    num_ranks, num_experts = problem.home.shape
    holds = problem.home | replicas
    if off is not None:
        holds = holds & ~off
    active = holds[model.g_a, model.e_a]
    upper = np.where(active, load[model.s_a, model.e_a], 0).astype(np.float64)
    num_a = model.s_a.size
    model.solver.changeColsBounds(num_a, np.arange(num_a, dtype=np.int32), np.zeros(num_a),
                                  upper)
    # Alpha of every holder of an expert that has columns (constant for this placement).
    alpha_g = alpha * holds[:, model.replicated].sum(axis=1) / model.unit
    num_se = model.uniq.size
    rows = np.arange(num_se, num_se + 2 * num_ranks, dtype=np.int32)
    model.solver.changeRowsBounds(rows.size, rows, np.full(rows.size, -np.inf),
                                  np.concatenate([model.rhs_in - alpha_g,
                                                  model.rhs_out - alpha_g]))
    values = _run(model.solver, time_left)
    if values is None:
        return None
    shares = np.zeros((num_se, num_ranks))
    shares[model.se_row, model.g_a] = np.where(active, values[:num_a], 0.0)
    # Integer tokens per (s, e), summing to its load: the LP's values where they are whole
    # numbers that add up, else the largest remainder of the LP split.
    target = load.ravel()[model.uniq]
    rounded = np.rint(shares).astype(np.int64)
    bad = np.flatnonzero((rounded.sum(axis=1) != target) | (rounded < 0).any(axis=1))
    if bad.size:
        rounded[bad] = largest_remainder(target[bad], shares[bad])
    assignment = model.rest.copy()
    assignment[model.uniq // num_experts, model.uniq % num_experts, :] = rounded
    unused = replicas & (assignment.sum(axis=0).T == 0)
    return Plan(replicas & ~unused, np.where(unused, -1, sources), assignment)


def _assignment(problem: BalanceProblem, static: Plan, replicas: np.ndarray,
                sources: np.ndarray, unit: float, time_left: float | None) -> Plan | None:
    """Step 4 for one placement (replicas bool [G, E], sources int [G, E]) given the static
    plan, every holder active; None if the LP is not solved. (Kept with this signature for
    solvers_bench.analysis, which re-assigns greedy's tokens with it.)"""
    model = _build_assignment(problem, _static(problem, static), replicas, unit)
    return _assign(problem, model, replicas, sources, time_left)


# ------------------------------------------------------------------------------------ solve
def solve_lp(problem: BalanceProblem, *, time_limit: float | None = None,
             num_candidates: int | None = None, per_rank: int | None = None,
             verbose: bool = False) -> SolveResult:
    """LP-relaxation heuristic (module docstring), never worse than greedy.

    time_limit: seconds for the whole call; past it the best plan found so far (at least
        greedy's) is returned with status "timeout" (greedy itself always runs to completion).
    num_candidates: experts on slow ranks the relaxation may replicate, heaviest first
        (default: the total number of slots, at least G); experts greedy replicated are
        always included.
    per_rank: also the `per_rank` heaviest experts homed on each rank (default PER_RANK on
        up to SMALL_G ranks, and on more when alpha is under 20% of an expert's compute, else
        0: there the many extra copies the relaxation then spreads cost more alpha than they
        save, measured on ep=8 decode steps).
    verbose: let HiGHS print the log of each LP solve (default: silent).
    The result's `fallback` is "greedy" when greedy's plan comes back (nothing better found).
    """
    if time_limit is not None and not time_limit > 0:
        raise ValueError(f"time_limit must be > 0 seconds or None, got {time_limit!r}")
    if num_candidates is not None and (isinstance(num_candidates, bool) or not isinstance(
            num_candidates, (int, np.integer)) or num_candidates < 0):
        raise ValueError(f"num_candidates must be an int >= 0, got {num_candidates!r}")
    if per_rank is not None and (isinstance(per_rank, bool) or not isinstance(
            per_rank, (int, np.integer)) or per_rank < 0):
        raise ValueError(f"per_rank must be an int >= 0, got {per_rank!r}")
    clock = _Clock(time_limit)
    greedy, greedy_name, static_plan = _start_plans(problem, time_limit)
    static = _static(problem, static_plan)
    if clock.over():
        return finish_result(problem, "lp", clock.start, "timeout", None, greedy, greedy_name,
                             None, "time limit reached during greedy; greedy plan kept")
    if num_candidates is None:
        num_candidates = max(int(problem.slots.sum()), problem.num_ranks)
    if per_rank is None:
        per_rank = PER_RANK if problem.num_ranks <= SMALL_G or _alpha_share(problem) < 0.2 else 0
    experts = _candidate_experts(problem, static, greedy, num_candidates, per_rank)
    if experts.size == 0 or not problem.slots.any() or not _any_copy_fits(problem):
        return finish_result(problem, "lp", clock.start, "feasible", None, greedy, greedy_name,
                             None, "nothing to replicate")
    unit = time_unit(_objective(problem, greedy))

    best: Plan | None = None
    best_obj = np.inf
    best_name = ""
    status, note = "feasible", ""

    def result() -> SolveResult:
        message = note or f"best LP plan from {best_name or 'none'}"
        return finish_result(problem, "lp", clock.start, status, best, greedy, greedy_name, None,
                             message)

    placements: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []
    small = problem.num_ranks <= SMALL_G
    relax = _build_relaxation(problem, static, experts, unit, verbose=verbose)
    dive = _Dive(problem, relax)
    dives = [("dive after greedy", greedy)] if greedy.replicas.any() else []
    root = None
    if problem.num_ranks <= TWO_DIVES_G or not dives:
        dives.insert(0, ("dive", None))
        root = dive.root(clock)
    for name, keep in dives:
        dived = dive.run(keep, clock, MAX_RUNS if small else MAX_RUNS_LARGE, root)
        if clock.over():
            status, note = "timeout", f"time limit reached during the {name}; best plan kept"
            break
        if dived is None:
            continue
        replicas, sources, idle = dived
        variants = [(name, idle)]
        if not small and idle.any():  # on more ranks idle homes off can lose: try both
            variants.append((name + ", every home active", np.zeros_like(idle)))
        for label, off in variants:
            if not any(np.array_equal(replicas, r) and np.array_equal(off, i)
                       for _, r, _, i in placements):
                placements.append((label, replicas, sources, off))
    if not placements or clock.over():
        if clock.over():
            status = "timeout"
            note = note or "time limit reached during the relaxation; greedy plan kept"
        return result()
    union = np.zeros(problem.home.shape, bool)
    for _, replicas, _, _ in placements:
        union |= replicas
    model = _build_assignment(problem, static, union, unit, verbose=verbose)
    for name, replicas, sources, off in placements:
        if clock.over():
            status, note = "timeout", "time limit reached during the assignments; best plan kept"
            break
        plan = _assign(problem, model, replicas, sources, clock.left(), off)
        if plan is None:
            continue
        obj = _objective(problem, plan)
        if obj < best_obj:
            best, best_obj, best_name = plan, obj, name
    if status == "feasible" and clock.over():
        status, note = "timeout", "time limit reached during the assignments; best plan kept"
    return result()
