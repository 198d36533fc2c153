"""EPLB maps and the EPLB-style add-copies baseline.

`to_eplb_maps` exports any Plan in DeepSeek EPLB's map convention so that vLLM/SGLang users can
consume it; `solve_eplb_addcopies` (method "eplb_addcopies"; called "eplb" before method "eplb"
became DeepSeek's algorithm, and so named in results/solvers_bench and results/sim written
before the rename) is an EPLB-style baseline: it keeps the problem's home layout and adds
replicas chosen from a moving window of past load with EPLB's "highest load per copy" rule,
tokens split evenly over an expert's copies. DeepSeek's EPLB proper re-packs every expert,
home copies too, over the physical slots; that algorithm is `probe.planner.deepseek_eplb`
(method "eplb", alias "deepseek_eplb").

Map convention (one layer; DeepSeek's `rebalance_experts` returns the same three maps with a
leading layer axis, which `probe.planner.layers.stack_eplb_maps` adds):
    Physical slots: rank g owns slots [g * P, (g + 1) * P), with P = max over ranks of home
    experts + extra slots (capped at E). In each rank's block come its home experts in
    increasing id (an expert with c copies on the rank, as `copies` may say, c times), then its
    replicas in increasing id, then -1 for unused slots (DeepSeek fills every slot; here a rank
    may leave extra slots empty).
    phy2log: int64 [G * P], logical expert of each physical slot, -1 if empty.
    log2phy: int64 [E, X], physical slots of each logical expert in increasing order, padded
        with -1; X = max replica count.
    logcnt: int64 [E], copies of each expert (home + replicas).

>>> import numpy as np
>>> from probe.placement import sharded_home
>>> from probe.planner.cost import CostModel
>>> from probe.planner.problem import BalanceProblem, Plan
>>> cost = CostModel.uniform(2, alpha=0.0, beta=1.0, token_time=0.0, transfer_time=1.0)
>>> prob = BalanceProblem(np.ones((2, 4), int), sharded_home(4, 2), slots=1, window=1.0,
...                       cost=cost)
>>> replicas = np.array([[0, 0, 1, 0], [0, 0, 0, 0]], bool)     # rank 0 gets a copy of 2
>>> sources = np.where(replicas, 1, -1)
>>> plan = Plan(replicas, sources, np.zeros((2, 4, 2), int))
>>> phy2log, log2phy, logcnt = to_eplb_maps(prob, plan)
>>> phy2log.tolist()                  # P = 3 slots per rank
[0, 1, 2, 2, 3, -1]
>>> log2phy.tolist(), logcnt.tolist()
([[0, -1], [1, -1], [2, 3], [4, -1]], [1, 1, 2, 1])
"""

from __future__ import annotations

import time

import numpy as np

from probe.planner.problem import BalanceProblem, Plan, SolveResult

__all__ = ["eplb_placement", "even_split", "history_weight", "solve_eplb_addcopies",
           "to_eplb_maps"]


def to_eplb_maps(problem: BalanceProblem, plan: Plan, copies: np.ndarray | None = None,
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(phy2log [G*P], log2phy [E, X], logcnt [E]), int64, in the convention above.

    copies: int [G, E], physical copies of each home expert per rank (> 0 exactly where
    problem.home is), for a home that holds an expert twice on one rank as DeepSeek EPLB's
    layouts may (`probe.planner.deepseek_eplb.eplb_problem`); each copy is a slot of its own.
    None: one copy per home holder.
    """
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a Plan, got {type(plan).__name__}")
    home, replicas = problem.home, plan.replicas
    num_ranks, num_experts = home.shape
    if replicas.shape != home.shape:
        raise ValueError(f"plan.replicas shape {replicas.shape} != problem {home.shape}")
    if np.any(replicas & home):
        g, e = np.argwhere(replicas & home)[0]
        raise ValueError(f"plan puts a replica of expert {e} on rank {g}, its home")
    if copies is None:
        copies = home.astype(np.int64)
    else:
        copies = np.asarray(copies)
        if copies.shape != home.shape or copies.dtype.kind not in "iu" or np.any(copies < 0) \
                or not np.array_equal(copies > 0, home):
            raise ValueError(f"copies must be an int [G, E] array of shape {home.shape}, > 0 "
                             "exactly where problem.home is True")
        copies = copies.astype(np.int64)
    num_home = copies.sum(axis=1)
    distinct = home.sum(axis=1)
    per_rank = int(np.max(num_home + np.minimum(problem.slots, num_experts - distinct)))
    per_rank = max(per_rank, int((num_home + replicas.sum(axis=1)).max()))
    phy2log = np.full(num_ranks * per_rank, -1, np.int64)
    for g in range(num_ranks):
        experts = np.concatenate([np.repeat(np.arange(num_experts), copies[g]),
                                  np.flatnonzero(replicas[g])])
        phy2log[g * per_rank:g * per_rank + experts.size] = experts
    logcnt = (copies + replicas).sum(axis=0).astype(np.int64)
    log2phy = np.full((num_experts, int(logcnt.max())), -1, np.int64)
    filled = np.zeros(num_experts, np.int64)
    for slot in np.flatnonzero(phy2log >= 0):  # increasing slot order
        e = phy2log[slot]
        log2phy[e, filled[e]] = slot
        filled[e] += 1
    return phy2log, log2phy, logcnt


def even_split(load: np.ndarray, holds: np.ndarray) -> np.ndarray:
    """Tokens of every (s, e) split evenly over e's copies, ignoring locality.

    load: int [S, E]; holds: bool [G, E], or int [G, E] physical copies per rank (every
    expert held somewhere). Returns int64 [S, E, G]. With c copies of e, numbered k = 0..c-1
    rank by rank, each copy gets n // c tokens and the n % c leftover tokens go to the copies
    with (k + s) % c < n % c, as in static.py; a rank gets the sum over its copies.
    """
    load = np.ascontiguousarray(load, dtype=np.int64)
    copies = np.ascontiguousarray(np.asarray(holds).astype(np.int64))
    if load.ndim != 2 or copies.ndim != 2 or copies.shape[1] != load.shape[1]:
        raise ValueError(f"load must be int [S, E] and holds [G, E], got {load.shape} and "
                         f"{copies.shape}")
    out = np.empty((load.shape[0], load.shape[1], copies.shape[0]), np.int64)
    _even_split_jit()(load, copies, out)
    return out


def _even_split_kernel(load, copies, out):  # pragma: no cover (run compiled)
    """Fill out int64 [S, E, G] as even_split's rule says (an expert with no copy gets no
    token); `_even_split_numpy` is its numpy twin, same integers."""
    num_sources, num_experts = load.shape
    num_ranks = copies.shape[0]
    for e in range(num_experts):
        count = 0
        for g in range(num_ranks):
            count += copies[g, e]
        for s in range(num_sources):
            if count == 0:
                for g in range(num_ranks):
                    out[s, e, g] = 0
                continue
            quota = load[s, e] // count
            left = load[s, e] - quota * count
            first = 0
            for g in range(num_ranks):
                if copies[g, e] == 0:  # k1 = k0: no token
                    out[s, e, g] = 0
                    continue
                k0 = first + s
                k1 = k0 + copies[g, e]
                out[s, e, g] = (quota * copies[g, e] + (k1 // count) * left + min(k1 % count, left)
                                - (k0 // count) * left - min(k0 % count, left))
                first += copies[g, e]


_KERNEL = {}


def _even_split_jit():
    if "even" not in _KERNEL:
        import numba

        _KERNEL["even"] = numba.njit(cache=True)(_even_split_kernel)
    return _KERNEL["even"]


def _even_split_numpy(load: np.ndarray, holds: np.ndarray) -> np.ndarray:
    """The numpy twin of even_split (the reference its kernel is tested against)."""
    load = np.asarray(load, dtype=np.int64)
    copies = np.asarray(holds).astype(np.int64)
    num_sources = load.shape[0]
    count = copies.sum(axis=0)  # [E]
    first = np.cumsum(copies, axis=0) - copies  # [G, E], number of g's first copy
    quota, left = np.divmod(load, count[None, :])  # [S, E]

    def lucky(k):  # copies numbered below k, counted from source s, that get a leftover token
        c = count[None, :, None]
        return (k // c) * left[:, :, None] + np.minimum(k % c, left[:, :, None])

    src = np.arange(num_sources)[:, None, None]
    start = first.T[None, :, :] + src  # [S, E, G]
    extra = lucky(start + copies.T[None, :, :]) - lucky(start)
    return (quota[:, :, None] * copies.T[None, :, :] + extra).astype(np.int64)


def eplb_placement(weight: np.ndarray, problem: BalanceProblem) -> tuple[np.ndarray, np.ndarray]:
    """EPLB-style replicas for expert weights `weight` float [E] (e.g. mean past load).

    Replicas go one at a time to the expert with the largest weight per copy (ties: lowest id),
    DeepSeek EPLB's rule; each lands on the rank with the smallest estimated load (sum over
    held experts of weight / copies; ties: lowest rank) that has a free slot, does not hold the
    expert, and can receive a copy within both window budgets (source: the home holder with
    the smallest transfer time, then least already sent, then lowest rank). An expert whose
    next copy fits nowhere, or of weight 0, gets no more copies.
    Returns (replicas bool [G, E], sources int64 [G, E]).
    """
    weight = np.asarray(weight, dtype=np.float64)
    home = problem.home
    num_ranks, num_experts = home.shape
    if weight.shape != (num_experts,):
        raise ValueError(f"weight must have shape ({num_experts},), got {weight.shape}")
    tx = problem.cost.transfer_time
    window = problem.window
    replicas = np.zeros_like(home)
    sources = np.full(home.shape, -1, np.int64)
    free = problem.slots.copy()
    recv = np.zeros(num_ranks)
    send = np.zeros(num_ranks)
    count = home.sum(axis=0).astype(np.float64)
    blocked = np.zeros(num_experts, bool)
    while np.any(free > 0):
        per_copy = np.where(blocked, -np.inf, weight / count)
        e = int(np.argmax(per_copy))
        if not per_copy[e] > 0:  # only unplaceable or unused experts are left
            break
        holds = home | replicas
        est = (holds * (weight / count)[None, :]).sum(axis=1)
        placed = False
        for g in np.argsort(est, kind="stable"):
            if free[g] <= 0 or holds[g, e]:
                continue
            holders = np.flatnonzero(home[:, e])
            fits = [(tx[h, g], send[h], h) for h in holders
                    if recv[g] + tx[h, g] <= window[g] and send[h] + tx[h, g] <= window[h]]
            if not fits:
                continue
            _, _, h = min(fits)
            replicas[g, e] = True
            sources[g, e] = h
            recv[g] += tx[h, g]
            send[h] += tx[h, g]
            free[g] -= 1
            count[e] += 1
            placed = True
            break
        if not placed:
            blocked[e] = True
    return replicas, sources


def history_weight(problem: BalanceProblem, history: np.ndarray | None) -> np.ndarray:
    """Expert weights float64 [E] for EPLB: mean load over `history`, summed over sources.

    history: past loads of this layer, int [H, S, E] or [H, E]; None uses the problem's own
    load (an oracle that knows the current step).
    """
    num_experts = problem.num_experts
    if history is None:
        return problem.load.sum(axis=0).astype(np.float64)
    hist = np.asarray(history)
    if hist.ndim == 3:
        if hist.shape[2] != num_experts:
            raise ValueError(f"history must be [H, S, E] or [H, E] with E = {num_experts}, "
                             f"got shape {hist.shape}")
        hist = hist.sum(axis=1)
    if hist.ndim != 2 or hist.shape[1] != num_experts or hist.shape[0] == 0:
        raise ValueError(f"history must be [H, S, E] or [H, E] with H >= 1 and "
                         f"E = {num_experts}, got shape {np.shape(history)}")
    if not np.all(np.isfinite(hist)) or np.any(hist < 0):
        raise ValueError("history must hold finite, non-negative loads")
    return hist.mean(axis=0).astype(np.float64)


def solve_eplb_addcopies(problem: BalanceProblem, *, time_limit: float | None = None,
                         history: np.ndarray | None = None) -> SolveResult:
    """Backend for `solve(problem, "eplb_addcopies", history=...)`.

    history: past loads of this layer, int [H, S, E] or [H, E] (a moving window of steps; the
    caller chooses its length and how often to re-plan). None uses the problem's own load,
    i.e. an oracle EPLB that knows the current step. Weight of expert e = its mean load over
    the window. Replica copies are charged like any plan's: each must fit the windows (eq. 6),
    so EPLB gets the same transfer budget as the other methods. Tokens are split evenly over
    all copies (no locality). time_limit is accepted and ignored.
    """
    del time_limit
    start = time.perf_counter()
    weight = history_weight(problem, history)
    replicas, sources = eplb_placement(weight, problem)
    assignment = even_split(problem.load, problem.home | replicas)
    plan = Plan(replicas, sources, assignment)
    return SolveResult("feasible", plan, float("nan"), None, None, time.perf_counter() - start,
                       f"EPLB-style add-copies, {plan.num_replicas} replicas",
                       "eplb_addcopies")
