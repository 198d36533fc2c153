"""The greedy for callers that plan every layer of every step: validate once, then arrays only.

`solve(problem, "greedy")` spends most of its time outside the kernel: it validates a
BalanceProblem, builds the dense Plan, re-checks it with check_plan and scores it with
evaluate_plan. A runtime that plans each MoE layer of each step with the same placement, slots
and cost model does not need that every time. `LeanGreedy(home, slots, cost, rules)` validates
those once (through a BalanceProblem, the same checks) and keeps them as the kernel's exact
dtypes; `LeanGreedy.plan(load, window)` then checks only the shape, dtype and layout of its two
arrays in Python, and the values inside one compiled call (no negative token counts, totals at
most MAX_TOKENS, rank times finite, no negative or NaN window), runs the same rules as
`greedy_arrays` and returns a `LeanPlan` of arrays. Its plan is the plan of
`solve(BalanceProblem.from_load(load, cost, slots, window, home), "greedy", rules=rules)`;
tests require them identical. `debug=True` also builds that problem, runs check_plan on the
plan and compares it with greedy_plan's (slow: for tests and bring-up).

A LeanPlan holds (n_rep replicas, n_blk changed experts):
    replicas: int64 [n_rep, 3], rows (rank, expert, source): expert replicas[i, 1] is copied
        from rank replicas[i, 2] to rank replicas[i, 0], in the order the greedy made them.
    blk_expert: int64 [n_blk], the experts whose tokens the greedy moved;
    blk_assign: int64 [n_blk, S, G], their assignment: tokens of (s, blk_expert[b]) run on g.
        Every other expert keeps the static split (static.py: a rank's own tokens of an expert
        it holds at home stay; others split evenly over the home holders).
    num_moves: moves applied. objective: the kernel's own eq. 8 value of the plan (its running
        rank times; equal to evaluate_plan's up to floating-point summation order).
    bound: `bound.lower_bound` of the layer (the gap certificate), NaN with bound=False.
`LeanGreedy.assignment(load, plan)` expands a LeanPlan to the dense int64 [S, E, G]
assignment (Plan.assignment's layout), `LeanGreedy.to_plan` to a Plan.

>>> import numpy as np
>>> from probe.placement import sharded_home
>>> from probe.planner.cost import CostModel
>>> cost = CostModel.uniform(2, alpha=0.0, beta=1.0, token_time=0.0, transfer_time=1.0)
>>> lean = LeanGreedy(sharded_home(2, 2), slots=1, cost=cost)
>>> out = lean.plan(np.array([[0, 0], [8, 0]]), np.ones(2))
>>> out.replicas.tolist(), out.objective, round(out.bound, 9)
([[1, 0, 0]], 4.0, 4.0)
>>> lean.assignment(np.array([[0, 0], [8, 0]]), out)[1].tolist()   # source 1: expert 0 split
[[4, 4], [0, 0]]
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from probe.planner.cost import CostModel
from probe.planner.greedy import (
    _kernel_args,
    _lean_run,
    _rules,
    greedy_plan,
    plan_from_arrays,
)
from probe.planner.greedy_rules import GreedyRules
from probe.planner.problem import MAX_TOKENS, BalanceProblem, Plan
from probe.planner.static import static_assignment

__all__ = ["LeanGreedy", "LeanPlan"]

# Error codes of the compiled value check (0: fine).
_ERRORS = {
    1: "load has a negative token count",
    2: f"load totals more than MAX_TOKENS = 2**62 = {MAX_TOKENS} tokens",
    3: "rank times of this load under this cost model overflow float64",
    4: "window must be >= 0 seconds on every rank (no NaN)",
}


class LeanPlan(NamedTuple):
    """One layer's greedy plan as arrays (the layout is in the module docstring)."""

    replicas: np.ndarray
    blk_expert: np.ndarray
    blk_assign: np.ndarray
    num_moves: int
    objective: float
    bound: float


class LeanGreedy:
    """The greedy for one placement, slot budget and cost model; see the module docstring.

    home: bool [G, E] static placement (every expert on at least one rank). slots: int or
    int [G] extra replica slots. cost: CostModel for G ranks. rules: GreedyRules (None: the
    defaults). bound: also compute the gap certificate per call (a few microseconds).
    debug: validate every call in full and check the plan against greedy_plan (slow).
    """

    def __init__(self, home: np.ndarray, slots: np.ndarray | int, cost: CostModel,
                 rules: GreedyRules | None = None, *, bound: bool = True,
                 debug: bool = False) -> None:
        rules = _rules(rules)
        if not isinstance(cost, CostModel):
            raise TypeError(f"cost must be a CostModel, got {type(cost).__name__}")
        home = np.asarray(home)
        if home.ndim != 2:
            raise ValueError(f"home must be a 2-D [G, E] array, got shape {home.shape}")
        # Validate home, slots and cost once, exactly as a BalanceProblem does (zero load).
        probe_problem = BalanceProblem(np.zeros(home.shape, np.int64), home, slots, 0.0, cost)
        self.shape = probe_problem.load.shape
        self.rules = rules
        self.cost = cost
        self.bound = bool(bound)
        self.debug = bool(debug)
        self.home = probe_problem.home
        self.slots = probe_problem.slots
        args = _kernel_args(probe_problem, rules)
        # Kernel arguments but load (0) and window (3), in the kernel's exact dtypes.
        self._args = args
        num_ranks, num_experts = self.shape
        max_tt = float(cost.token_time.max(initial=0.0))
        self._time_per_token = float(num_ranks * (cost.beta + 2.0 * max_tt))
        self._alpha_all = float(num_ranks * num_experts * cost.alpha)

    def plan(self, load: np.ndarray, window: np.ndarray) -> LeanPlan:
        """Plan one layer: load int64 [S, E] (C-contiguous), window float64 [G] (seconds)."""
        if (type(load) is not np.ndarray or load.dtype != np.int64
                or load.shape != self.shape or not load.flags.c_contiguous):
            raise ValueError(f"load must be a C-contiguous int64 array of shape {self.shape}, "
                             f"got {_describe(load)}")
        if (type(window) is not np.ndarray or window.dtype != np.float64
                or window.shape != self.shape[:1] or not window.flags.c_contiguous):
            raise ValueError(f"window must be a C-contiguous float64 array of shape "
                             f"{self.shape[:1]}, got {_describe(window)}")
        a = self._args
        code, rep, blk_e, blk_a, moves, objective, bound = _lean_run(
            load, a[1], a[2], window, a[4], a[5], a[6], a[7], a[8], a[9], a[10], a[11], a[12],
            a[13], a[14], self.bound, self._time_per_token, self._alpha_all)
        if code:
            raise ValueError(_ERRORS[code])
        out = LeanPlan(rep, blk_e, blk_a, moves, objective, bound)
        if self.debug:
            self._debug_check(load, window, out)
        return out

    def problem(self, load: np.ndarray, window: np.ndarray) -> BalanceProblem:
        """The BalanceProblem that `plan(load, window)` solves (validated in full)."""
        return BalanceProblem(load, self.home, self.slots, window, self.cost)

    def assignment(self, load: np.ndarray, plan: LeanPlan) -> np.ndarray:
        """int64 [S, E, G]: the dense token assignment of `plan` (Plan.assignment's layout)."""
        assignment = static_assignment(load, self.home)
        if len(plan.blk_expert):
            assignment[:, plan.blk_expert, :] = np.transpose(plan.blk_assign, (1, 0, 2))
        return assignment

    def to_plan(self, load: np.ndarray, window: np.ndarray, plan: LeanPlan) -> Plan:
        """`plan` as a Plan of `problem(load, window)`."""
        return plan_from_arrays(self.problem(load, window), plan.replicas, plan.blk_expert,
                                plan.blk_assign)

    def _debug_check(self, load: np.ndarray, window: np.ndarray, out: LeanPlan) -> None:
        from probe.planner.check import check_plan, evaluate_plan

        problem = self.problem(load, window)
        plan = self.to_plan(load, window, out)
        violations = check_plan(problem, plan)
        if violations:
            raise AssertionError(f"lean plan is infeasible: {'; '.join(violations[:3])}")
        ref = greedy_plan(problem, self.rules)
        if not (np.array_equal(ref.replicas, plan.replicas)
                and np.array_equal(ref.sources, plan.sources)
                and np.array_equal(ref.assignment, plan.assignment)):
            raise AssertionError("lean plan differs from greedy_plan's")
        objective = evaluate_plan(problem, plan).objective
        if self.bound and out.bound > objective:
            raise AssertionError(f"bound {out.bound!r} exceeds the objective {objective!r}")


def _describe(arr) -> str:
    if isinstance(arr, np.ndarray):
        layout = "C-contiguous" if arr.flags.c_contiguous else "non-contiguous"
        return f"{layout} {arr.dtype} of shape {arr.shape}"
    return type(arr).__name__
