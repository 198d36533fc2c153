"""Input validation of BalanceProblem, CostModel and Plan, and the checker's verdicts."""

from __future__ import annotations

import numpy as np
import pytest

from probe.placement import sharded_home
from probe.planner.check import check_plan, evaluate_plan
from probe.planner.cost import CostModel
from probe.planner.problem import BalanceProblem, Plan
from probe.planner.static import static_plan

COST = CostModel.uniform(2, alpha=0.0, beta=1.0, token_time=0.0, transfer_time=1.0)
HOME = sharded_home(2, 2)


def make(load=None, home=None, slots=1, window=1.0, cost=COST):
    load = np.array([[1, 2], [3, 4]]) if load is None else load
    return BalanceProblem(load, HOME if home is None else home, slots, window, cost)


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"load": np.array([[1.0, np.nan], [0.0, 1.0]])}, ValueError, "load contains NaN"),
    ({"load": np.array([[1.0, np.inf], [0.0, 1.0]])}, ValueError, "NaN or infinite"),
    ({"load": np.array([[1, -2], [0, 1]])}, ValueError,
     "load has a negative count at source 0, expert 1"),
    ({"load": np.array([[1.5, 0.0], [0.0, 1.0]])}, ValueError, "whole token counts"),
    ({"load": np.array(["a", "b"])}, ValueError, r"load must be a 2-D \[S, E\] array"),
    ({"load": np.array([["a", "b"], ["c", "d"]])}, TypeError, "load must be numeric"),
    ({"load": np.ones(4, int)}, ValueError, r"load must be a 2-D \[S, E\] array"),
    ({"load": np.ones((3, 2), int)}, ValueError, r"load shape \(3, 2\) does not match home"),
    ({"home": np.array([[1, 0], [0, 0]], bool)}, ValueError, "expert 1 has no home rank"),
    ({"home": np.array([[2, 0], [0, 1]])}, ValueError, "home must be boolean"),
    ({"home": np.ones(2, bool)}, ValueError, r"home must be a 2-D \[G, E\] array"),
    ({"window": -1.0}, ValueError, "window must be >= 0 seconds"),
    ({"window": np.array([1.0, np.nan])}, ValueError, "window must be >= 0 seconds"),
    ({"window": np.ones(3)}, ValueError, r"window must be a number or a \[G\] array"),
    ({"slots": np.ones(3, dtype=int)}, ValueError, r"slots must be a number or a \[G\] array"),
    ({"slots": -1}, ValueError, "slots must be >= 0"),
    ({"slots": 1.5}, ValueError, "slots must be whole numbers"),
    ({"cost": "fast"}, TypeError, "cost must be a CostModel"),
    ({"cost": CostModel.uniform(3, alpha=0, beta=1, token_time=0, transfer_time=1)},
     ValueError, "cost model is for 3 ranks, problem has 2"),
])
def test_problem_validation_messages(kwargs, error, message):
    with pytest.raises(error, match=message):
        make(**kwargs)


def test_problem_normalises_and_freezes():
    problem = make(slots=2, window=0.5)
    assert problem.slots.tolist() == [2, 2]
    assert problem.window.tolist() == [0.5, 0.5]
    assert problem.load.dtype == np.int64
    with pytest.raises(ValueError, match="read-only"):
        problem.load[0, 0] = 9
    assert problem.with_load(np.zeros((2, 2), int)).total_tokens == 0


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"alpha": -1.0}, "CostModel.alpha must be finite and >= 0"),
    ({"beta": float("nan")}, "CostModel.beta must be finite and >= 0"),
    ({"token_time": np.ones((2, 3))}, r"CostModel.token_time must be a square \[G, G\]"),
    ({"transfer_time": -np.ones((2, 2))}, "CostModel.transfer_time must be finite and >= 0"),
    ({"transfer_time": np.ones((3, 3))}, "must have the same shape"),
])
def test_cost_model_validation_messages(kwargs, message):
    args = {"alpha": 0.0, "beta": 1.0, "token_time": np.zeros((2, 2)),
            "transfer_time": np.ones((2, 2)), **kwargs}
    with pytest.raises(ValueError, match=message):
        CostModel(**args)


def test_plan_shape_messages():
    with pytest.raises(ValueError, match=r"replicas must be \[G, E\]"):
        Plan(np.zeros(2, bool), np.zeros(2, int), np.zeros((2, 2, 2), int))
    with pytest.raises(ValueError, match="sources shape"):
        Plan(np.zeros((2, 2), bool), np.zeros((2, 3), int), np.zeros((2, 2, 2), int))
    with pytest.raises(ValueError, match=r"assignment must be \[S, E, G\]"):
        Plan(np.zeros((2, 2), bool), np.zeros((2, 2), int), np.zeros((2, 2, 3), int))


def test_checker_names_each_violation():
    problem = make(load=np.array([[0, 0], [4, 0]]), slots=1, window=0.5)
    replicas = np.array([[True, False], [True, True]])  # home clash on rank 0, 2 on rank 1
    sources = np.array([[1, -1], [0, 0]])
    assignment = np.zeros((2, 2, 2), int)
    assignment[1, 0, 1] = 3  # one token of (1, 0) missing
    found = check_plan(problem, Plan(replicas, sources, assignment))
    text = "\n".join(found)
    assert "replica: rank 0 already holds expert 0 at home" in text
    assert "slots: rank 1 has 2 replicas, 1 slots" in text
    assert "source: replica of expert 1 on rank 1 copied from rank 0" in text
    assert "conservation: source 1, expert 0 assigns 3 of 4 tokens" in text
    assert "window: rank 1 receives for 2.000e+00 s > window 5.000e-01" in text
    assert "window: rank 0 sends for 2.000e+00 s > window 5.000e-01" in text


def test_checker_accepts_static_and_metrics_are_consistent():
    problem = make(load=np.array([[3, 1], [5, 1]]))
    plan = static_plan(problem)
    assert check_plan(problem, plan) == []
    metrics = evaluate_plan(problem, plan)
    assert metrics.objective == 8.0  # rank 0 computes 3 + 5 tokens at beta = 1
    assert metrics.imbalance == pytest.approx(8 / 5)
    assert metrics.num_replicas == 0
    assert metrics.exposed_transfer == 0.0


def test_from_load_defaults_to_static_sharding_and_the_auto_window():
    from probe.planner.window import default_window

    cost = CostModel.uniform(4, alpha=1.0, beta=0.5, token_time=0.1, transfer_time=1.0)
    load = np.arange(32).reshape(4, 8)
    home = sharded_home(8, 4)
    auto = BalanceProblem.from_load(load, cost, slots=2)
    assert np.array_equal(auto.home, home) and auto.slots.tolist() == [2] * 4
    assert np.array_equal(auto.window, default_window(load, home, cost))
    attention = np.array([0.0, 1.0, 2.0, 3.0])
    per_rank = BalanceProblem.from_load(load, cost, 2, "auto", attention_time=attention)
    assert np.array_equal(per_rank.window, default_window(load, home, cost) + attention)
    assert BalanceProblem.from_load(load, cost, 2, 0.5).window.tolist() == [0.5] * 4
    other = np.roll(home, 1, axis=0)
    given = BalanceProblem.from_load(load, cost, 1, np.ones(4), home=other)
    assert np.array_equal(given.home, other) and given.window.tolist() == [1.0] * 4
    with pytest.raises(ValueError, match="window must be 'auto', seconds, or a"):
        BalanceProblem.from_load(load, cost, 1, "soon")
    with pytest.raises(ValueError, match="attention_time must be a number or a"):
        BalanceProblem.from_load(load, cost, 1, attention_time=np.ones(3))
    with pytest.raises(ValueError, match="attention_time must be finite and >= 0"):
        BalanceProblem.from_load(load, cost, 1, attention_time=-1.0)
    with pytest.raises(TypeError, match="cost must be a CostModel"):
        BalanceProblem.from_load(load, "fast", 1)
    with pytest.raises(ValueError, match=r"load must be a 2-D \[S, E\] array"):
        BalanceProblem.from_load(load[0], cost, 1)


def test_compute_time_is_the_linearised_cost():
    cost = CostModel.uniform(2, alpha=3.0, beta=0.5, token_time=0.0, transfer_time=1.0)
    tokens = np.array([[0, 4, 1], [2, 0, 0]])  # [G, E]
    # Rank 0: experts 1 and 2 active: (3 + 2) + (3 + 0.5); rank 1: expert 0: 3 + 1.
    assert cost.compute_time(tokens).tolist() == [8.5, 4.0]
    assert cost.compute_time(tokens.astype(float) / 2).tolist() == [7.25, 3.5]
    with pytest.raises(ValueError, match=r"tokens must be a \[G, E\] array"):
        cost.compute_time(np.ones(3))


@pytest.mark.parametrize("load", [
    np.array([[2**61] + [0] * 7] * 4, dtype=np.int64),  # the totals overflow int64
    np.array([[2**61 + 1, 2**61], [0, 0]], dtype=np.int64),  # the total passes 2**62
    np.array([[2**63, 0], [0, 0]], dtype=np.uint64),  # does not fit int64 at all
    np.array([[1e300, 0.0], [0.0, 0.0]]),  # finite, but no token count
    np.array([[2.0**62 + 2.0**53, 0.0], [0.0, 0.0]]),
])
def test_load_totals_must_fit_float64_exactly(load):
    num_ranks, num_experts = load.shape
    cost = CostModel.uniform(num_ranks, alpha=1e-5, beta=1e-8, token_time=1e-9,
                             transfer_time=1e-4)
    with pytest.raises(ValueError, match=r"MAX_TOKENS = 2\*\*62"):
        BalanceProblem(load, sharded_home(num_experts, num_ranks), 1, 1.0, cost)
    with pytest.raises(ValueError, match=r"MAX_TOKENS = 2\*\*62"):
        BalanceProblem.from_load(load, cost, 1)


def test_largest_load_is_accepted_and_exact():
    from probe.planner.problem import MAX_TOKENS

    cost = CostModel.uniform(2, alpha=0.0, beta=1.0, token_time=0.0, transfer_time=1.0)
    load = np.array([[MAX_TOKENS - 8, 0], [8, 0]], dtype=np.int64)
    problem = BalanceProblem(load, HOME, 1, 1.0, cost)
    assert problem.total_tokens == MAX_TOKENS
    plan = static_plan(problem)
    assert check_plan(problem, plan) == []
    assert evaluate_plan(problem, plan).objective == 2.0**62


@pytest.mark.parametrize(("costs", "load"), [
    ({"alpha": 0.0, "beta": 1e300, "token_time": 0.0}, [[10**9, 0], [0, 0]]),
    ({"alpha": 0.0, "beta": 1.0, "token_time": 1e300}, [[0, 10**9], [0, 0]]),
    ({"alpha": 1e308, "beta": 0.0, "token_time": 0.0}, [[1, 1], [1, 1]]),
])
def test_rank_times_must_stay_finite(costs, load):
    cost = CostModel.uniform(2, transfer_time=1.0, **costs)
    with pytest.raises(ValueError, match="overflow float64"):
        BalanceProblem(np.array(load), HOME, 1, 1.0, cost)


def test_huge_transfer_times_are_rejected():
    cost = CostModel.uniform(2, alpha=0.0, beta=1.0, token_time=0.0, transfer_time=1e308)
    with pytest.raises(ValueError, match="overflow float64"):
        BalanceProblem(np.ones((2, 2), int), HOME, 1, np.inf, cost)
