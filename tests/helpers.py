"""Plain helpers shared by the tests (fixtures live in conftest.py).

`instances` is a hypothesis strategy, so it must be importable where `@given` is written:
`from helpers import instances, same_plan` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from probe.planner.cost import CostModel
from probe.planner.problem import BalanceProblem

LOAD_KINDS = ("random", "sparse", "one_expert", "zero", "one_source", "uniform")


@st.composite
def instances(draw, max_ranks: int = 5, max_experts: int = 10, max_tokens: int = 40):
    """A BalanceProblem: random homes (sometimes several holders), loads of several shapes,
    slots and windows including 0, uniform or random link costs."""
    num_ranks = draw(st.integers(1, max_ranks))
    num_experts = draw(st.integers(1, max_experts))
    kind = draw(st.sampled_from(LOAD_KINDS))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)

    home = np.zeros((num_ranks, num_experts), bool)
    home[rng.integers(0, num_ranks, num_experts), np.arange(num_experts)] = True
    if draw(st.booleans()):
        home |= rng.random((num_ranks, num_experts)) < 0.2  # static redundant experts

    if kind == "random":
        load = rng.integers(0, max_tokens, (num_ranks, num_experts))
    elif kind == "sparse":
        load = rng.integers(0, max_tokens, (num_ranks, num_experts)) * (
            rng.random((num_ranks, num_experts)) < 0.3)
    elif kind == "one_expert":
        load = np.zeros((num_ranks, num_experts), np.int64)
        load[:, rng.integers(num_experts)] = rng.integers(1, max_tokens, num_ranks)
    elif kind == "zero":
        load = np.zeros((num_ranks, num_experts), np.int64)
    elif kind == "one_source":
        load = np.zeros((num_ranks, num_experts), np.int64)
        load[rng.integers(num_ranks)] = rng.integers(0, max_tokens, num_experts)
    else:
        load = np.full((num_ranks, num_experts), int(rng.integers(0, max_tokens)))

    slots = draw(st.sampled_from(["zero", "three", "random"]))
    slots = {"zero": 0, "three": 3, "random": rng.integers(0, 4, num_ranks)}[slots]
    window = draw(st.sampled_from(["zero", "inf", "random"]))
    window = {"zero": 0.0, "inf": np.inf, "random": rng.random(num_ranks) * 3}[window]

    alpha = draw(st.sampled_from([0.0, 0.3, 5.0]))
    beta = draw(st.sampled_from([0.0, 1.0, 0.37]))
    link = draw(st.sampled_from(["none", "uniform", "random"]))
    if link == "none":
        token_time = np.zeros((num_ranks, num_ranks))
    elif link == "uniform":
        token_time = np.full((num_ranks, num_ranks), 0.2)
    else:
        token_time = rng.random((num_ranks, num_ranks)) * draw(st.sampled_from([0.1, 1.0, 3.0]))
    transfer_time = rng.random((num_ranks, num_ranks)) + 0.1
    cost = CostModel(alpha=alpha, beta=beta, token_time=token_time, transfer_time=transfer_time)
    return BalanceProblem(load, home, slots, window, cost)


def same_plan(a, b) -> bool:
    """Whether plans a and b are identical (replicas, their sources and the assignment)."""
    return (np.array_equal(a.replicas, b.replicas) and np.array_equal(a.sources, b.sources)
            and np.array_equal(a.assignment, b.assignment))
