"""EPLB maps (both directions consistent) and the EPLB-style baseline."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from helpers import instances

from probe.placement import sharded_home
from probe.planner.check import check_plan, evaluate_plan
from probe.planner.cost import CostModel
from probe.planner.eplb import eplb_placement, even_split, to_eplb_maps
from probe.planner.greedy import greedy_plan
from probe.planner.layers import stack_eplb_maps
from probe.planner.problem import BalanceProblem
from probe.planner.solve import solve


def assert_maps_consistent(problem, plan, maps):
    phy2log, log2phy, logcnt = maps
    num_ranks, num_experts = problem.home.shape
    assert phy2log.shape[0] % num_ranks == 0
    per_rank = phy2log.shape[0] // num_ranks
    holds = problem.home | plan.replicas
    assert logcnt.tolist() == holds.sum(axis=0).tolist()
    assert log2phy.shape == (num_experts, logcnt.max())
    for e in range(num_experts):
        slots = log2phy[e, :logcnt[e]]
        assert np.all(log2phy[e, logcnt[e]:] == -1)
        assert np.all(np.diff(slots) > 0)
        assert np.all(phy2log[slots] == e)  # log2phy then phy2log is the identity
        assert sorted(slots // per_rank) == np.flatnonzero(holds[:, e]).tolist()
    for slot in np.flatnonzero(phy2log >= 0):  # phy2log then log2phy finds the slot again
        assert slot in log2phy[phy2log[slot]]
    for g in range(num_ranks):
        block = phy2log[g * per_rank:(g + 1) * per_rank]
        used = block[block >= 0]
        assert np.all(block[len(used):] == -1)  # padding only at the end of a rank's block
        assert used[:problem.home[g].sum()].tolist() == np.flatnonzero(problem.home[g]).tolist()


@settings(max_examples=150, deadline=None)
@given(instances())
def test_maps_of_greedy_and_eplb_plans_are_consistent(problem):
    for plan in (greedy_plan(problem), solve(problem, "eplb").plan):
        assert_maps_consistent(problem, plan, to_eplb_maps(problem, plan))


@settings(max_examples=150, deadline=None)
@given(instances())
def test_eplb_plans_are_feasible_and_split_evenly(problem):
    plan = solve(problem, "eplb").plan
    assert check_plan(problem, plan) == []
    counts = (problem.home | plan.replicas).sum(axis=0)
    share = plan.assignment  # [S, E, G]
    for s, e in zip(*np.nonzero(problem.load), strict=True):
        on = share[s, e][(problem.home | plan.replicas)[:, e]]
        assert on.max() - on.min() <= 1  # no locality: every copy gets n / copies
        assert on.size == counts[e]


def test_eplb_replicates_the_heaviest_expert_per_copy():
    cost = CostModel.uniform(4, alpha=0.0, beta=1.0, token_time=0.0, transfer_time=1.0)
    problem = BalanceProblem(np.zeros((4, 4), int), sharded_home(4, 4), 1, 10.0, cost)
    # Weights 90, 40, 10, 0: copies go 90 -> (45 per copy) 45 -> 40 -> 30 (90/3).
    replicas, sources = eplb_placement(np.array([90.0, 40.0, 10.0, 0.0]), problem)
    assert replicas.sum(axis=1).tolist() == [1, 1, 1, 1]
    assert replicas[:, 0].sum() == 3 and replicas[:, 1].sum() == 1
    assert np.all(sources[replicas] == np.argmax(problem.home, axis=0)[np.nonzero(replicas)[1]])


def test_eplb_uses_history_not_the_current_load():
    cost = CostModel.uniform(2, alpha=0.0, beta=1.0, token_time=0.0, transfer_time=1.0)
    problem = BalanceProblem(np.array([[0, 0, 0, 0], [0, 0, 9, 0]]), sharded_home(4, 2), 1,
                             1.0, cost)
    history = np.zeros((3, 2, 4), int)
    history[:, 0, 0] = 50  # the past said expert 0
    plan = solve(problem, "eplb", history=history).plan
    assert plan.replicas.tolist() == [[False] * 4, [True, False, False, False]]
    oracle = solve(problem, "eplb").plan  # no history: plans on the current load
    assert oracle.replicas[0, 2]
    assert evaluate_plan(problem, oracle).objective < evaluate_plan(problem, plan).objective


@pytest.mark.parametrize(("history", "message"), [
    (np.zeros((3, 2, 5)), r"history must be \[H, S, E\] or \[H, E\] with E = 4"),
    (np.zeros((0, 4)), "H >= 1"),
    (np.zeros(4), r"history must be \[H, S, E\] or \[H, E\]"),
    (-np.ones((2, 4)), "finite, non-negative"),
])
def test_eplb_history_errors(history, message):
    cost = CostModel.uniform(2, alpha=0.0, beta=1.0, token_time=0.0, transfer_time=1.0)
    problem = BalanceProblem(np.ones((2, 4), int), sharded_home(4, 2), 1, 1.0, cost)
    with pytest.raises(ValueError, match=message):
        solve(problem, "eplb", history=history)


def test_even_split_conserves_and_rotates_leftovers():
    holds = np.array([[1, 1], [1, 0], [1, 0]], bool)
    load = np.array([[4, 3], [4, 0], [1, 1]])
    split = even_split(load, holds)
    assert np.array_equal(split.sum(axis=2), load)
    assert split[0, 0].tolist() == [2, 1, 1]
    assert split[1, 0].tolist() == [1, 1, 2]  # source 1: leftover rotates to rank 2
    assert split[2, 0].tolist() == [0, 1, 0]  # (k + s) % 3 < 1 picks k = 1


def test_stacked_maps_have_a_layer_axis():
    cost = CostModel.uniform(2, alpha=0.0, beta=1.0, token_time=0.0, transfer_time=1.0)
    problems = [BalanceProblem(np.array([[0, 0], [8, 0]]), sharded_home(2, 2), 1, 1.0, cost),
                BalanceProblem(np.array([[0, 0], [0, 0]]), sharded_home(2, 2), 1, 1.0, cost)]
    plans = [greedy_plan(p) for p in problems]
    phy2log, log2phy, logcnt = stack_eplb_maps(problems, plans)
    assert phy2log.tolist() == [[0, -1, 1, 0], [0, -1, 1, -1]]
    assert log2phy.shape == (2, 2, 2)
    assert logcnt.tolist() == [[2, 1], [1, 1]]


def test_maps_reject_a_replica_on_its_home():
    cost = CostModel.uniform(2, alpha=0.0, beta=1.0, token_time=0.0, transfer_time=1.0)
    problem = BalanceProblem(np.zeros((2, 2), int), sharded_home(2, 2), 1, 1.0, cost)
    plan = greedy_plan(problem)
    bad = type(plan)(np.eye(2, dtype=bool), np.zeros((2, 2), int), plan.assignment)
    with pytest.raises(ValueError, match="replica of expert 0 on rank 0, its home"):
        to_eplb_maps(problem, bad)
    with pytest.raises(TypeError, match="plan must be a Plan"):
        to_eplb_maps(problem, "plan")
