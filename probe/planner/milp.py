"""The balance-planning MILP (docs/planner.md, "The problem"), written once for all backends.

`build_milp(problem)` returns a `Milp`: columns, rows in coordinate form and index maps, with
every time in seconds. The CP-SAT backend (cpsat.py) scales it to integers, the HiGHS backends
(highs.py, lp.py) pass it as a sparse matrix; both read the same rows, so they solve one model.

Variables (columns):
    a[s, e, g]  integer tokens of (source s, expert e) processed on rank g, only where g could
                hold e (home, or a replica candidate) and load[s, e] > 0.
    u[h, e, g]  binary: a replica of e on g copied from home holder h (candidates only: g not a
                home of e, g has a slot, the copy fits both windows on its own, e has load).
    y[g, e]     binary: expert e is active on g (pays alpha).
    f[s, g]     tokens sent from s to g (f[g, g] counts local tokens), a sum of integers.
    z           the makespan, in seconds.
The replica indicator x[g, e] of docs/planner.md is the expression sum_h u[h, e, g], not a column.
Experts with load whose only possible holder is a single home rank ("fixed" experts) have no
columns: their tokens and alpha enter as constants (flow lower bounds, row constants).

Minimise z subject to the row families built in `build_milp` (each preceded by one sentence).
Rows carry a family tag, because backends round them differently:
    EXACT     integer coefficients and bounds (counting rows);
    WINDOW    replica transfer seconds against a rank's window limit (tolerance.window_limit:
              the checker's own test, so the model admits exactly the plans check_plan accepts);
    MAKESPAN  time terms (seconds) minus a multiple of z, upper bound = -(constant seconds).
The objective z is the paper's eq. 8.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from probe.planner.check import evaluate_plan
from probe.planner.highs_base import Rows
from probe.planner.problem import BalanceProblem, Plan
from probe.planner.result import largest_remainder
from probe.planner.tolerance import fits_window, window_limit

__all__ = ["EXACT", "MAKESPAN", "WINDOW", "Milp", "build_milp", "plan_from_values",
           "plan_to_values"]

EXACT, WINDOW, MAKESPAN = 0, 1, 2


@dataclass(frozen=True, eq=False)
class Milp:
    """One MILP instance in coordinate form. Column and row arrays share their lengths.

    col_lower, col_upper: float64 [N]; col_integer: bool [N]; col_kind: int8 [N] with
    0 = a, 1 = u, 2 = y, 3 = f, 4 = z. Rows: row_lower, row_upper float64 [M] (+-inf where
    open), row_family int8 [M]; coefficients (row, col, val) as int64, int64, float64 [NNZ].
    Index maps (-1 where there is no column): a_col int64 [S, E, G], u_col int64 [G, E, G]
    (h, e, g), y_col int64 [G, E], f_col int64 [G, G]; z_col int. fixed_holder int64 [E]: the
    single rank of a fixed expert (-1 otherwise).
    """

    col_lower: np.ndarray
    col_upper: np.ndarray
    col_integer: np.ndarray
    col_kind: np.ndarray
    row_lower: np.ndarray
    row_upper: np.ndarray
    row_family: np.ndarray
    coef_row: np.ndarray
    coef_col: np.ndarray
    coef_val: np.ndarray
    a_col: np.ndarray
    u_col: np.ndarray
    y_col: np.ndarray
    f_col: np.ndarray
    z_col: int
    fixed_holder: np.ndarray

    @property
    def num_cols(self) -> int:
        return self.col_lower.size

    @property
    def num_rows(self) -> int:
        return self.row_lower.size

    def col_names(self) -> list[str]:
        """Column names: a_{s}_{e}_{g}, u_{h}_{e}_{g}, y_{g}_{e}, f_{s}_{g} and z."""
        names = [""] * self.num_cols
        for letter, table in zip("auyf", (self.a_col, self.u_col, self.y_col, self.f_col),
                                 strict=True):
            idx = np.argwhere(table >= 0)
            for col, ids in zip(table[table >= 0].tolist(), idx.tolist(), strict=True):
                names[col] = letter + "".join(f"_{i}" for i in ids)
        names[self.z_col] = "z"
        return names


def _replica_candidates(problem: BalanceProblem, candidates: np.ndarray | None) -> np.ndarray:
    """bool [G(h), E, G(g)]: copies h -> g of e that the model may choose."""
    home, cost = problem.home, problem.cost
    expert_load = problem.load.sum(axis=0)  # [E]
    fits = (fits_window(cost.transfer_time, problem.window[None, :])
            & fits_window(cost.transfer_time, problem.window[:, None]))  # [H, G]
    np.fill_diagonal(fits, False)
    target = ~home & (problem.slots[:, None] > 0) & (expert_load[None, :] > 0)  # [G, E]
    if candidates is not None:
        target &= candidates
    return home[:, :, None] & target.T[None, :, :] & fits[:, None, :]


def build_milp(problem: BalanceProblem, *, candidates: np.ndarray | None = None,
               per_source_activation: bool = True, all_active: bool = False) -> Milp:
    """The MILP of `problem` (module docstring).

    candidates: optional bool [G, E], the (rank, expert) pairs where replicas may go (default:
        every pair the window, slot and load filters allow); a smaller set gives a restricted
        model (used by the LP heuristic).
    per_source_activation: link a[s, e, g] <= load[s, e] * y[g, e] per source (tighter LP
        relaxation) rather than once per (g, e) with the expert's total load.
    all_active: fix every y to 1, so each possible holder of a multi-holder expert pays alpha:
        an upper-bound model whose LP is exact when every holder gets tokens (used to assign
        tokens for a fixed placement).
    """
    if candidates is not None:
        candidates = np.asarray(candidates, dtype=bool)
        if candidates.shape != problem.home.shape:
            raise ValueError(f"candidates must have shape {problem.home.shape}, "
                             f"got {candidates.shape}")
    load, home, cost = problem.load, problem.home, problem.cost
    num_ranks, num_experts = home.shape
    expert_load = load.sum(axis=0)  # [E]
    u_mask = _replica_candidates(problem, candidates)  # [H, E, G]
    holds = home | u_mask.any(axis=0).T  # [G, E]: g could hold e
    num_holders = holds.sum(axis=0)  # [E]
    free = (expert_load > 0) & (num_holders > 1)  # [E]
    fixed = (expert_load > 0) & (num_holders == 1)
    fixed_holder = np.where(fixed, np.argmax(holds, axis=0), -1)

    # Columns, in the order a, u, y, f, z.
    a_mask = (load > 0)[:, :, None] & (free[None, :, None] & holds.T[None, :, :])  # [S, E, G]
    y_mask = holds & free[None, :]  # [G, E]
    counts = [int(a_mask.sum()), int(u_mask.sum()), int(y_mask.sum()), num_ranks * num_ranks, 1]
    offsets = np.concatenate([[0], np.cumsum(counts)])
    a_col = np.full(a_mask.shape, -1, np.int64)
    a_col[a_mask] = np.arange(offsets[0], offsets[1])
    u_col = np.full(u_mask.shape, -1, np.int64)
    u_col[u_mask] = np.arange(offsets[1], offsets[2])
    y_col = np.full(y_mask.shape, -1, np.int64)
    y_col[y_mask] = np.arange(offsets[2], offsets[3])
    f_col = np.arange(offsets[3], offsets[4]).reshape(num_ranks, num_ranks)
    z_col = int(offsets[4])
    num_cols = int(offsets[5])

    # Fixed experts contribute constant flows and a constant count of active experts per rank.
    fixed_flow = np.zeros((num_ranks, num_ranks), np.int64)  # [S, G]
    fixed_active = np.zeros(num_ranks, np.int64)  # [G]
    fixed_e = np.flatnonzero(fixed)
    if fixed_e.size:
        np.add.at(fixed_flow.T, fixed_holder[fixed_e], load[:, fixed_e].T)
        np.add.at(fixed_active, fixed_holder[fixed_e], 1)

    s_a, e_a, g_a = np.nonzero(a_mask)  # same order as the a columns
    h_u, e_u, g_u = np.nonzero(u_mask)
    g_y, e_y = np.nonzero(y_mask)
    total = float(expert_load.sum())
    col_lower = np.zeros(num_cols)
    col_upper = np.empty(num_cols)
    col_upper[offsets[0]:offsets[1]] = load[s_a, e_a]
    col_upper[offsets[1]:offsets[3]] = 1.0
    if all_active:
        col_lower[offsets[2]:offsets[3]] = 1.0
    col_lower[offsets[3]:offsets[4]] = fixed_flow.ravel()
    col_upper[offsets[3]:offsets[4]] = total
    col_upper[z_col] = np.inf
    col_integer = np.ones(num_cols, bool)
    col_integer[offsets[3]:] = False  # f is implied integer, z is continuous
    col_kind = np.repeat(np.arange(5, dtype=np.int8), counts)

    rows = Rows()
    # Every token of (s, e) is processed somewhere: sum_g a[s, e, g] = load[s, e].
    se_ids = np.flatnonzero((load > 0) & free[None, :])  # flat s * E + e
    se_row = np.full(num_ranks * num_experts, -1, np.int64)
    se_row[se_ids] = np.arange(se_ids.size)
    rhs = load.ravel()[se_ids]
    rows.add(se_row[s_a * num_experts + e_a], a_col[a_mask], 1.0, rhs, rhs, family=EXACT)

    # Tokens run only where the expert is active: a[s, e, g] <= load[s, e] * y[g, e].
    if per_source_activation:
        k = s_a.size
        rows.add(np.concatenate([np.arange(k), np.arange(k)]),
                 np.concatenate([a_col[a_mask], y_col[g_a, e_a]]),
                 np.concatenate([np.ones(k), -load[s_a, e_a].astype(np.float64)]),
                 np.full(k, -np.inf), np.zeros(k), family=EXACT)
    else:
        ge_row = np.full(y_mask.shape, -1, np.int64)
        ge_row[y_mask] = np.arange(g_y.size)
        rows.add(np.concatenate([ge_row[g_a, e_a], np.arange(g_y.size)]),
                 np.concatenate([a_col[a_mask], y_col[y_mask]]),
                 np.concatenate([np.ones(s_a.size), -expert_load[e_y].astype(np.float64)]),
                 np.full(g_y.size, -np.inf), np.zeros(g_y.size), family=EXACT)

    # An expert is active off its home ranks only where a replica was copied:
    # y[g, e] <= sum_h u[h, e, g].
    rep_ge = y_mask & ~home  # [G, E]
    ge_row = np.full(rep_ge.shape, -1, np.int64)
    ge_row[rep_ge] = np.arange(int(rep_ge.sum()))
    g_r, e_r = np.nonzero(rep_ge)
    rows.add(np.concatenate([ge_row[g_r, e_r], ge_row[g_u, e_u]]),
             np.concatenate([y_col[g_r, e_r], u_col[u_mask]]),
             np.concatenate([np.ones(g_r.size), -np.ones(h_u.size)]),
             np.full(g_r.size, -np.inf), np.zeros(g_r.size), family=EXACT)

    # A rank receives at most one copy of an expert: sum_h u[h, e, g] <= 1 (only needed when e
    # has several home holders).
    copies = u_mask.sum(axis=0)  # [E, G]
    multi = copies > 1
    if multi.any():
        eg_row = np.full(multi.shape, -1, np.int64)
        eg_row[multi] = np.arange(int(multi.sum()))
        pick = multi[e_u, g_u]
        rows.add(eg_row[e_u[pick], g_u[pick]], u_col[u_mask][pick], 1.0,
                 np.full(int(multi.sum()), -np.inf), np.ones(int(multi.sum())), family=EXACT)

    # Each rank holds at most slots[g] extra replicas (rows that cannot bind are left out).
    incoming = u_mask.sum(axis=(0, 1))  # [G]
    tight = np.flatnonzero(incoming > problem.slots)
    g_row = np.full(num_ranks, -1, np.int64)
    g_row[tight] = np.arange(tight.size)
    pick = incoming[g_u] > problem.slots[g_u]
    rows.add(g_row[g_u[pick]], u_col[u_mask][pick], 1.0,
             np.full(tight.size, -np.inf), problem.slots[tight].astype(np.float64), family=EXACT)

    # Weight copies fit each rank's window, receiving and sending (eq. 6), up to the checker's
    # slack (tolerance.window_limit); rows that cannot bind (every candidate copy together
    # fits) are left out.
    t_u = cost.transfer_time[h_u, g_u]  # [U]
    for side in (g_u, h_u):
        need = np.bincount(side, weights=t_u, minlength=num_ranks)
        tight = np.flatnonzero(~fits_window(need, problem.window) & np.isfinite(problem.window))
        g_row = np.full(num_ranks, -1, np.int64)
        g_row[tight] = np.arange(tight.size)
        pick = (g_row[side] >= 0) & (t_u > 0)
        rows.add(g_row[side[pick]], u_col[u_mask][pick], t_u[pick],
                 np.full(tight.size, -np.inf), window_limit(problem.window[tight]), family=WINDOW)

    # Flows add up the assignment: f[s, g] - sum_e a[s, e, g] = tokens of fixed experts s -> g.
    rhs = fixed_flow.ravel().astype(np.float64)
    rows.add(np.concatenate([np.arange(num_ranks * num_ranks), s_a * num_ranks + g_a]),
             np.concatenate([f_col.ravel(), a_col[a_mask]]),
             np.concatenate([np.ones(num_ranks * num_ranks), -np.ones(s_a.size)]),
             rhs, rhs, family=EXACT)

    # The makespan covers compute plus twice the dispatch time into and out of every rank:
    # alpha * active(g) + beta * sum_s f[s, g] + 2 * comm_in(g) <= z, and the same with comm_out.
    tt = cost.token_time
    off = ~np.eye(num_ranks, dtype=bool)
    s_f, g_f = np.nonzero(np.ones((num_ranks, num_ranks), bool))
    comm = 2.0 * np.where(off, tt, 0.0)[s_f, g_f]  # [G * G], 0 on the diagonal
    for direction in ("in", "out"):
        if direction == "in":  # f[s, g] is compute and incoming traffic of g: one coefficient
            f_rows, f_cols, f_vals = g_f, f_col[s_f, g_f], cost.beta + comm
        else:  # f[s, g] is compute of g, and f[g, d] outgoing traffic of g
            pick = comm > 0
            f_rows = np.concatenate([g_f, s_f[pick]])
            f_cols = np.concatenate([f_col[s_f, g_f], f_col[s_f[pick], g_f[pick]]])
            f_vals = np.concatenate([np.full(s_f.size, cost.beta), comm[pick]])
        rows.add(np.concatenate([g_y, f_rows, np.arange(num_ranks)]),
                 np.concatenate([y_col[y_mask], f_cols, np.full(num_ranks, z_col)]),
                 np.concatenate([np.full(g_y.size, cost.alpha), f_vals,
                                 np.full(num_ranks, -1.0)]),
                 np.full(num_ranks, -np.inf), -cost.alpha * fixed_active, family=MAKESPAN)

    # Redundant, kept to tighten the relaxation: every expert with load is active somewhere.
    e_row = np.full(num_experts, -1, np.int64)
    free_e = np.flatnonzero(free)
    e_row[free_e] = np.arange(free_e.size)
    rows.add(e_row[e_y], y_col[y_mask], 1.0, np.ones(free_e.size), np.full(free_e.size, np.inf),
             family=EXACT)

    # Redundant, kept to tighten the relaxation: the makespan is at least the mean compute,
    # alpha * (active pairs) + beta * (all tokens) <= G * z.
    rows.add(np.zeros(g_y.size + num_ranks * num_ranks + 1, np.int64),
             np.concatenate([y_col[y_mask], f_col.ravel(), [z_col]]),
             np.concatenate([np.full(g_y.size, cost.alpha),
                             np.full(num_ranks * num_ranks, cost.beta), [-float(num_ranks)]]),
             -np.inf, -cost.alpha * float(fixed_active.sum()), family=MAKESPAN)

    row_lower, row_upper, row_family, coef_row, coef_col, coef_val = rows.arrays()
    keep = coef_val != 0
    return Milp(col_lower, col_upper, col_integer, col_kind, row_lower, row_upper, row_family,
                coef_row[keep], coef_col[keep], coef_val[keep], a_col, u_col, y_col, f_col,
                z_col, fixed_holder)


def plan_to_values(milp: Milp, problem: BalanceProblem, plan: Plan) -> np.ndarray | None:
    """Column values float64 [N] of `plan` (z from the plan's true objective, in seconds).

    None when the plan uses a replica or an assignment the model has no column for.
    """
    values = np.zeros(milp.num_cols)
    assignment = plan.assignment
    allowed = milp.a_col >= 0  # [S, E, G]
    fixed_e = np.flatnonzero(milp.fixed_holder >= 0)
    allowed[:, fixed_e, milp.fixed_holder[fixed_e]] = True
    if np.any((assignment > 0) & ~allowed):
        return None
    has = milp.a_col >= 0
    values[milp.a_col[has]] = assignment[has]
    g_r, e_r = np.nonzero(plan.replicas)
    h_r = plan.sources[g_r, e_r]
    cols = milp.u_col[h_r, e_r, g_r]
    # A replica the model has no column for is harmless only when it carries no tokens.
    tokens = plan.tokens_per_rank_expert()
    if np.any((cols < 0) & (tokens[g_r, e_r] > 0)):
        return None
    values[cols[cols >= 0]] = 1.0
    ym = milp.y_col >= 0
    values[milp.y_col[ym]] = tokens[ym] > 0
    values[milp.f_col.ravel()] = assignment.sum(axis=1).ravel()
    values[milp.z_col] = evaluate_plan(problem, plan).objective
    return values


def plan_from_values(milp: Milp, problem: BalanceProblem, values: np.ndarray) -> Plan:
    """The plan of solver column values (rounded; conservation restored by largest remainder).

    Replicas that end up with no tokens are dropped (they would cost a transfer for nothing).
    """
    num_ranks, num_experts = problem.num_ranks, problem.num_experts
    replicas = np.zeros((num_ranks, num_experts), bool)
    sources = np.full((num_ranks, num_experts), -1, np.int64)
    has_u = milp.u_col >= 0
    chosen = np.zeros(milp.u_col.shape, bool)
    chosen[has_u] = values[milp.u_col[has_u]] > 0.5
    h_c, e_c, g_c = np.nonzero(chosen)
    replicas[g_c, e_c] = True
    sources[g_c, e_c] = h_c
    holds = problem.home | replicas  # [G, E]
    assignment = np.zeros((num_ranks, num_experts, num_ranks), np.float64)
    has_a = milp.a_col >= 0
    assignment[has_a] = values[milp.a_col[has_a]]
    assignment *= holds.T[None, :, :]
    for e in np.flatnonzero(milp.fixed_holder >= 0):
        assignment[:, e, milp.fixed_holder[e]] = problem.load[:, e]
    flat = assignment.reshape(-1, num_ranks)
    rounded = np.rint(flat).astype(np.int64)
    target = problem.load.ravel()
    bad = np.flatnonzero((rounded.sum(axis=1) != target) | np.any(rounded < 0, axis=1))
    if bad.size:
        rounded[bad] = largest_remainder(target[bad], flat[bad])
    assignment = rounded.reshape(num_ranks, num_experts, num_ranks)
    unused = replicas & (assignment.sum(axis=0).T == 0)
    replicas &= ~unused
    sources[unused] = -1
    return Plan(replicas, sources, assignment)
