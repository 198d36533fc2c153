"""A cheap lower bound on eq. 8's optimum: the online gap certificate of every planned layer.

`lower_bound(problem)` is at most the objective (eq. 8, as `evaluate_plan` computes it) of EVERY
feasible plan of `problem`, so `(objective - bound) / objective` bounds how far a plan (the
greedy's) can be from the optimum. It is the largest of three bounds; each uses only that a
plan's rank times are compute + 2 * max(in, out) with every term >= 0 (cost.py):

  mean:   max_g T(g) >= mean_g T(g). Summed over ranks, compute is beta * (all tokens) plus
          alpha per active (rank, expert) pair, and every expert with tokens is active on at
          least one rank. Communication: a token of (s, e) stays on s only if s holds e, at home
          or as a replica; s has at most slots[s] replicas, each of an expert that some home
          holder h != s can copy to s within both windows. So at least M_s tokens leave s:
          all its tokens of experts it does not hold at home, less its slots[s] largest such
          loads among the experts it could copy; each costs at least c_s = min_{g != s}
          token_time[s, g]. Likewise for a group N of ranks (the ranks joined by their cheapest
          links: a node of a multi-node machine): at least M_N tokens from N's sources leave N
          (those of experts with no home holder in N, less the largest loads among the experts
          N could copy, as many as N has slots), and each costs at least d_N more than c_s
          (d_N: the least extra of a link out of N over the source's cheapest link). So moved
          tokens cost W >= sum_s M_s c_s + sum_N M_N d_N in link time; a token sent s -> g adds
          its link time to both out(s) and in(g), and 2 * max(in, out) >= in + out, so the
          ranks' communication adds up to at least 2 W.
  source: T(s) >= 2 * out(s) >= 2 * M_s * c_s for each s, and a group's sources send at least
          sum_{s in N} M_s c_s + M_N d_N in all, so one of them T(s) >= 2 / |N| of that.
  expert: expert e's n_e tokens run on at most c_e ranks: its home holders plus every rank
          that has a slot and could receive a copy within the windows; some rank runs at least
          ceil(n_e / c_e) of them (token counts are whole), so T >= alpha + beta * ceil(n_e / c_e).

The result is scaled by (1 - BOUND_SLACK) so that floating-point summation order can never
lift it above an objective equal to it in exact arithmetic. The Numba kernel `bound_arrays`
lives in greedy.py (beside the kernel the lean path compiles it into, LeanGreedy computes it per
layer); docs/planner.md ("The gap certificate") has how tight it measured.

>>> import numpy as np
>>> from probe.planner.cost import CostModel
>>> from probe.planner.problem import BalanceProblem
>>> cost = CostModel.uniform(2, alpha=0.0, beta=1.0, token_time=0.0, transfer_time=1.0)
>>> prob = BalanceProblem.from_load(np.array([[0, 0], [8, 0]]), cost, slots=1, window=1.0)
>>> round(lower_bound(prob), 9)   # 8 tokens of expert 0 over at most 2 copies (greedy: 4.0)
4.0
"""

from __future__ import annotations


from probe.planner.greedy import BOUND_SLACK, bound_arrays, problem_arrays
from probe.planner.problem import BalanceProblem

__all__ = ["BOUND_SLACK", "bound_arrays", "bound_parts", "lower_bound"]

def bound_parts(problem: BalanceProblem) -> dict[str, float]:
    """The three bounds by name ("mean", "source", "expert"), scaled as `lower_bound`."""
    if not isinstance(problem, BalanceProblem):
        raise TypeError(f"problem must be a BalanceProblem, got {type(problem).__name__}")
    parts = bound_arrays(*problem_arrays(problem))
    return {name: float(v) * (1 - BOUND_SLACK)
            for name, v in zip(("mean", "source", "expert"), parts, strict=True)}


def lower_bound(problem: BalanceProblem) -> float:
    """A lower bound (seconds) on the eq. 8 objective of every feasible plan of `problem`."""
    return max(bound_parts(problem).values())
