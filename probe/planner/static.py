"""Static expert parallelism: no replicas, locality-first token assignment.

Tokens of (source s, expert e) stay on s when s holds e at home; otherwise they are split
evenly over e's home holders. With h holders and n tokens, each holder gets n // h and the
n % h leftover tokens go to the holders whose position k (0-based, holders in increasing
rank order) satisfies (k + s) % h < n % h: the leftover rotates with the source so that no
holder is favoured. The greedy kernel (greedy.py) and its twin start from exactly this split.

>>> import numpy as np
>>> home = np.array([[1, 0], [0, 1], [0, 1]], bool)   # expert 1 lives on ranks 1 and 2
>>> load = np.array([[4, 5], [2, 3], [1, 1]])         # [S, E]
>>> a = static_assignment(load, home)                 # [S, E, G]
>>> a[0].tolist(), a[1].tolist(), a[2].tolist()
([[4, 0, 0], [0, 3, 2]], [[2, 0, 0], [0, 3, 0]], [[1, 0, 0], [0, 0, 1]])
"""

from __future__ import annotations

import time

import numpy as np

from probe.planner.problem import BalanceProblem, Plan, SolveResult

__all__ = ["solve_static", "static_assignment", "static_plan"]


def static_assignment(load: np.ndarray, home: np.ndarray) -> np.ndarray:
    """Locality-first assignment without replicas.

    load: int [S, E] tokens per (source, expert); home: bool [G, E] with S = G.
    Returns int64 [S, E, G].
    """
    load = np.asarray(load, dtype=np.int64)
    home = np.asarray(home, dtype=bool)
    num_sources, num_experts = load.shape
    num_holders = home.sum(axis=0)  # [E]
    if np.any(num_holders == 0):
        raise ValueError(f"expert {int(np.flatnonzero(num_holders == 0)[0])} has no home rank")
    assignment = np.zeros((num_sources, num_experts, home.shape[0]), np.int64)
    # Experts with one holder: every token goes there (locality holds trivially).
    single = np.flatnonzero(num_holders == 1)
    owner = np.argmax(home, axis=0)  # [E]
    assignment[:, single, owner[single]] = load[:, single]
    multi = np.flatnonzero(num_holders > 1)
    if multi.size:
        sub_home = home[:, multi]  # [G, M]
        count = num_holders[multi]
        position = np.cumsum(sub_home, axis=0) - 1  # [G, M], position of g among holders
        quota, left = np.divmod(load[:, multi], count[None, :])  # [S, M]
        src = np.arange(num_sources)[:, None, None]  # [S, 1, 1]
        rotated = (position.T[None, :, :] + src) % count[None, :, None]  # [S, M, G]
        share = quota[:, :, None] + (rotated < left[:, :, None])
        share = np.where(sub_home.T[None, :, :], share, 0)
        local = home[:num_sources, multi]  # [S, M]: source s holds e at home (S = G)
        share = np.where(local[:, :, None], 0, share)
        s_idx, m_idx = np.nonzero(local)
        share[s_idx, m_idx, s_idx] = load[s_idx, multi[m_idx]]
        assignment[:, multi, :] = share
    return assignment


def static_plan(problem: BalanceProblem) -> Plan:
    """The static EP plan of `problem`: no replicas, `static_assignment` of its load."""
    num_ranks, num_experts = problem.num_ranks, problem.num_experts
    return Plan(np.zeros((num_ranks, num_experts), bool),
                np.full((num_ranks, num_experts), -1, np.int64),
                static_assignment(problem.load, problem.home))


def solve_static(problem: BalanceProblem, *, time_limit: float | None = None) -> SolveResult:
    """Backend for `solve(problem, "static")` (time_limit is accepted and ignored)."""
    del time_limit
    start = time.perf_counter()
    plan = static_plan(problem)
    return SolveResult("feasible", plan, float("nan"), None, None,
                       time.perf_counter() - start, "static EP, no replicas", "static")
