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
