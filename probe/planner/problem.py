"""The balance-planning problem of one MoE layer in one step, and its solution type.

A `BalanceProblem` holds what the planner knows before a layer runs: predicted tokens per
(source rank, expert), where each expert lives, how many extra replicas each rank may take,
and how long each rank can hide weight transfers. A `Plan` says which extra replicas go where
(and from whom they are copied) and how many tokens of each (source, expert) run on each rank.
docs/planner.md states the objective and constraints a plan is judged by.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from probe.planner.cost import CostModel

__all__ = ["MAX_TOKENS", "BalanceProblem", "Plan", "SolveResult"]

# Token counts and their totals must stay at or below this, so that any total, and the sum of
# two (a bisection's lo + hi), fits int64. (Past 2**53 float64 times round the counts, the same
# way in every solver and in the checker.)
MAX_TOKENS = 2**62


def _readonly(arr: np.ndarray) -> np.ndarray:
    """A read-only view (the caller's own array stays writable)."""
    view = arr.view()
    view.setflags(write=False)
    return view


def _per_rank(name: str, value, num_ranks: int) -> np.ndarray:
    """A scalar or a [G] array as a [G] array; ValueError naming `name` otherwise."""
    arr = np.asarray(value)
    if arr.ndim == 0 or arr.shape == (num_ranks,):
        return np.broadcast_to(arr, (num_ranks,))
    raise ValueError(f"{name} must be a number or a [G] array with G = {num_ranks}, "
                     f"got shape {arr.shape}")


def checked_load(value) -> np.ndarray:
    """`value` as an int64 [S, E] load: whole, non-negative counts whose total is at most
    MAX_TOKENS. ValueError/TypeError naming the problem otherwise."""
    load = np.asarray(value)
    if load.ndim != 2:
        raise ValueError(f"load must be a 2-D [S, E] array, got shape {load.shape}")
    if load.dtype.kind == "f":
        if not np.all(np.isfinite(load)):
            raise ValueError("load contains NaN or infinite values")
        if np.any(load != np.round(load)):
            raise ValueError("load must hold whole token counts")
    elif load.dtype.kind not in "iub":
        raise TypeError(f"load must be numeric, got dtype {load.dtype}")
    if np.any(load < 0):
        s, e = np.argwhere(load < 0)[0]
        raise ValueError(f"load has a negative count at source {s}, expert {e}")
    if load.size and load.max() > MAX_TOKENS:
        s, e = np.unravel_index(np.argmax(load), load.shape)
        raise ValueError(f"load has {load[s, e]} tokens at source {s}, expert {e}: more than "
                         f"MAX_TOKENS = 2**62 = {MAX_TOKENS} (token counts, their totals and "
                         "the sum of two totals must fit int64)")
    # Every entry is <= 2**62 now. The float64 sum is within a tiny relative error of the true
    # total: far above MAX_TOKENS it is over for sure; otherwise the int64 sum cannot overflow
    # and is exact. The total bounds every partial sum (per expert, per source, per rank).
    if float(load.sum(dtype=np.float64)) > 1.5 * MAX_TOKENS:
        total = "more than 2**62"
    else:
        load = load.astype(np.int64)
        total = int(load.sum())
        if total <= MAX_TOKENS:
            return load
    raise ValueError(f"load totals {total} tokens: more than MAX_TOKENS = 2**62 = {MAX_TOKENS} "
                     "(token counts, their totals and the sum of two totals must fit int64; "
                     "per-expert, per-source and per-rank sums are bounded by the total)")


def _check_times_finite(load: np.ndarray, cost: CostModel) -> None:
    """ValueError when some time the planner or the checker forms could overflow float64: the
    sum over G ranks of (E * alpha + (beta + 2 * max token_time) * total tokens), or all
    G * E possible replica copies at the largest transfer time."""
    num_ranks, num_experts = load.shape
    total = float(load.sum())
    with np.errstate(over="ignore", invalid="ignore"):
        rank_bound = (num_experts * cost.alpha
                      + (cost.beta + 2.0 * float(cost.token_time.max(initial=0.0))) * total)
        times = num_ranks * rank_bound
        copies = num_ranks * num_experts * float(cost.transfer_time.max(initial=0.0))
    if not (np.isfinite(times) and np.isfinite(copies)):
        raise ValueError(f"rank times of this load under this cost model overflow float64 "
                         f"(bound {times:.3g} s over {num_ranks} ranks, {copies:.3g} s of "
                         "copies): use smaller loads or costs")


@dataclass(frozen=True, eq=False)
class BalanceProblem:
    """One layer's planning instance. Validated on construction.

    Attributes:
        load: int64 [S, E], predicted tokens of expert e arriving from source rank s (S = G).
        home: bool [G, E], static placement P' (every expert on at least one rank).
        slots: int64 [G], extra replica slots per rank (an int is broadcast).
        window: float64 [G], seconds of transfer each rank can hide (a number is broadcast).
        cost: the CostModel (its G must match).

    >>> import numpy as np
    >>> from probe.placement import sharded_home
    >>> cost = CostModel.uniform(2, alpha=0.0, beta=1.0, token_time=0.0, transfer_time=1.0)
    >>> p = BalanceProblem(np.array([[6, 0], [2, 0]]), sharded_home(2, 2), slots=1,
    ...                    window=1.0, cost=cost)
    >>> p.num_ranks, p.num_experts, int(p.total_tokens)
    (2, 2, 8)
    """

    load: np.ndarray
    home: np.ndarray
    slots: np.ndarray | int
    window: np.ndarray | float
    cost: CostModel

    def __post_init__(self) -> None:
        if not isinstance(self.cost, CostModel):
            raise TypeError(f"cost must be a CostModel, got {type(self.cost).__name__}")
        load = checked_load(self.load)
        home = np.asarray(self.home)
        if home.ndim != 2:
            raise ValueError(f"home must be a 2-D [G, E] array, got shape {home.shape}")
        if home.dtype != bool:
            if not np.all(np.isin(home, (0, 1))):
                raise ValueError("home must be boolean (0/1)")
            home = home.astype(bool)
        num_ranks, num_experts = home.shape
        if load.shape != (num_ranks, num_experts):
            raise ValueError(f"load shape {load.shape} does not match home shape {home.shape} "
                             "(load is [S, E] with S = G)")
        homeless = np.flatnonzero(~home.any(axis=0))
        if homeless.size:
            raise ValueError(f"expert {homeless[0]} has no home rank "
                             f"({homeless.size} homeless expert(s) in all)")
        if self.cost.num_ranks != num_ranks:
            raise ValueError(f"cost model is for {self.cost.num_ranks} ranks, problem has "
                             f"{num_ranks}")
        slots = _per_rank("slots", self.slots, num_ranks)
        if slots.dtype.kind == "f" and np.any(slots != np.round(slots)):
            raise ValueError("slots must be whole numbers")
        if np.any(slots < 0):
            raise ValueError("slots must be >= 0")
        window = _per_rank("window", np.asarray(self.window, dtype=np.float64), num_ranks)
        if np.any(np.isnan(window)) or np.any(window < 0):
            raise ValueError("window must be >= 0 seconds on every rank (no NaN)")
        _check_times_finite(load, self.cost)
        object.__setattr__(self, "load", _readonly(load))
        object.__setattr__(self, "home", _readonly(home.copy()))
        object.__setattr__(self, "slots", _readonly(slots.astype(np.int64)))
        object.__setattr__(self, "window", _readonly(window.copy()))

    @property
    def num_ranks(self) -> int:
        return self.home.shape[0]

    @property
    def num_experts(self) -> int:
        return self.home.shape[1]

    @property
    def total_tokens(self) -> int:
        return int(self.load.sum())

    @classmethod
    def from_load(cls, load: np.ndarray, cost: CostModel, slots: np.ndarray | int,
                  window: str | float | np.ndarray = "auto", home: np.ndarray | None = None, *,
                  attention_time: float | np.ndarray = 0.0) -> BalanceProblem:
        """The problem of `load` under `cost`: how every caller builds one from a load.

        load: int [S, E] tokens per source rank and expert. cost: the CostModel (its G ranks).
        slots: extra replica slots per rank (int or int [G]). window: "auto" (each rank's
        expert compute under static EP plus `attention_time`, see `default_window`), seconds,
        or float [G]. home: bool [G, E] placement (None: `sharded_home(E, S)`, static EP).
        attention_time: seconds (a number or float [G]) added to the "auto" window only.

        >>> cost = CostModel.uniform(2, alpha=1.0, beta=0.5, token_time=0.0, transfer_time=1.0)
        >>> p = BalanceProblem.from_load(np.array([[4, 0], [4, 2]]), cost, slots=1)
        >>> p.home.astype(int).tolist(), p.window.tolist()
        ([[1, 0], [0, 1]], [5.0, 2.0])
        """
        from probe.placement import sharded_home
        from probe.planner.window import default_window

        if not isinstance(cost, CostModel):
            raise TypeError(f"cost must be a CostModel, got {type(cost).__name__}")
        load = checked_load(load)
        if home is None:
            home = sharded_home(load.shape[1], load.shape[0])
        if isinstance(window, str):
            if window != "auto":
                raise ValueError(f"window must be 'auto', seconds, or a [G] array, got "
                                 f"{window!r}")
            window = default_window(load, home, cost, attention_time=attention_time)
        return cls(load, home, slots, window, cost)

    def with_load(self, load: np.ndarray) -> BalanceProblem:
        """The same placement, budgets and costs with another load (e.g. the true one)."""
        return BalanceProblem(load, self.home, self.slots, self.window, self.cost)


@dataclass(frozen=True, eq=False)
class Plan:
    """A solution: extra replicas, where each copy comes from, and the token assignment.

    Attributes:
        replicas: bool [G, E], extra copies of expert e placed on rank g (never where home is).
        sources: int64 [G, E], the rank each replica is copied from (-1 where no replica).
        assignment: int64 [S, E, G], tokens of (s, e) processed on rank g.
    """

    replicas: np.ndarray
    sources: np.ndarray
    assignment: np.ndarray

    def __post_init__(self) -> None:
        replicas = np.asarray(self.replicas)
        sources = np.asarray(self.sources)
        assignment = np.asarray(self.assignment)
        if replicas.ndim != 2:
            raise ValueError(f"replicas must be [G, E], got shape {replicas.shape}")
        if sources.shape != replicas.shape:
            raise ValueError(f"sources shape {sources.shape} != replicas shape {replicas.shape}")
        num_ranks, num_experts = replicas.shape
        if assignment.shape != (num_ranks, num_experts, num_ranks):
            raise ValueError(f"assignment must be [S, E, G] = {(num_ranks, num_experts, num_ranks)}"
                             f", got {assignment.shape}")
        object.__setattr__(self, "replicas", _readonly(replicas.astype(bool, copy=False)))
        object.__setattr__(self, "sources", _readonly(sources.astype(np.int64, copy=False)))
        object.__setattr__(self, "assignment",
                           _readonly(assignment.astype(np.int64, copy=False)))

    @property
    def num_replicas(self) -> int:
        return int(self.replicas.sum())

    def tokens_per_rank_expert(self) -> np.ndarray:
        """int64 [G, E]: tokens of expert e processed on rank g (summed over sources)."""
        return self.assignment.sum(axis=0).T


@dataclass(frozen=True, eq=False)
class SolveResult:
    """What every solver returns.

    status: "optimal" (proven), "feasible" (a plan, optimality unproven), "timeout" (time
    limit hit, best plan kept), or "error" (no plan; see message). A backend whose own solver
    fails (an invalid model, a numerical breakdown) still returns its best plan so far, with
    status "feasible", `fallback` set and the failure in `message`.
    objective: eq. 8 value of `plan` in seconds; bound: a proven lower bound (or None);
    gap: (objective - bound) / objective, or None.
    fallback: None when `plan` is the backend's own; else the name of the fallback or
    warm-start plan returned instead (e.g. "greedy", "static", "lp": the solver found none, or
    none better, or its plan failed the checker).
    """

    status: str
    plan: Plan | None
    objective: float
    bound: float | None
    gap: float | None
    wall_time: float
    message: str = ""
    method: str = ""
    fallback: str | None = None

    @property
    def success(self) -> bool:
        return self.plan is not None
