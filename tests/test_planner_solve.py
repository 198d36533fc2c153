"""solve(): dispatch, validation, objective filling, deadlines, and the checker as gatekeeper."""

from __future__ import annotations

import math
import sys
import types

import numpy as np
import pytest
from hypothesis import given, settings
from helpers import instances, same_plan

from probe.placement import sharded_home

from probe.planner.check import check_plan, evaluate_plan
from probe.planner.cost import CostModel
from probe.planner.greedy_rules import GreedyRules
from probe.planner.problem import BalanceProblem, Plan, SolveResult
from probe.planner.solve import METHODS, backend, solve

COST = CostModel.uniform(2, alpha=0.0, beta=1.0, token_time=0.0, transfer_time=1.0)
PROBLEM = BalanceProblem(np.array([[0, 0], [10, 0]]), sharded_home(2, 2), 1, 1.0, COST)


@settings(max_examples=150, deadline=None)
@given(instances())
def test_every_local_method_returns_a_checked_plan(problem):
    static = solve(problem, "static")
    for method in ("static", "greedy", "greedy_ref", "eplb_addcopies", "eplb"):
        result = solve(problem, method)
        assert result.method == method
        assert result.plan is not None, result.message
        assert check_plan(problem, result.plan) == []
        assert np.array_equal(result.plan.assignment.sum(axis=2), problem.load)
        assert result.objective == evaluate_plan(problem, result.plan).objective
        if method not in ("eplb", "eplb_addcopies"):  # EPLB ignores locality: may lose to static
            assert result.objective <= static.objective * (1 + 1e-9) + 1e-12
    assert same_plan(solve(problem, "greedy").plan, solve(problem, "greedy_ref").plan)


def test_unknown_method_lists_the_methods():
    with pytest.raises(ValueError, match="unknown method 'simplex'; choose one of: cpsat, "
                                         "deepseek_eplb, eplb, eplb_addcopies, greedy, "
                                         "greedy_ref, hierarchical, highs, lite, "
                                         "lite_ref, lp, parallel_greedy, "
                                         "parallel_greedy_ref, static"):
        solve(PROBLEM, "simplex")
    assert set(METHODS) == {"static", "greedy", "greedy_ref", "eplb", "deepseek_eplb",
                            "eplb_addcopies", "lp", "cpsat", "highs", "hierarchical",
                            "parallel_greedy", "parallel_greedy_ref", "lite", "lite_ref"}
    # "eplb" is DeepSeek's EPLB; "deepseek_eplb" its former name; the add-copies baseline apart
    assert METHODS["eplb"] == METHODS["deepseek_eplb"] != METHODS["eplb_addcopies"]


@pytest.mark.parametrize("limit", [0, -1.0, float("nan"), "1s", True])
def test_bad_time_limit(limit):
    with pytest.raises(ValueError, match="time_limit must be a positive number of seconds"):
        solve(PROBLEM, "greedy", time_limit=limit)


def test_problem_type_is_checked():
    with pytest.raises(TypeError, match="problem must be a BalanceProblem, got dict"):
        solve({}, "greedy")


def test_unknown_option_reaches_the_backend():
    with pytest.raises(TypeError, match="k_maximum"):
        solve(PROBLEM, "greedy", k_maximum=3)


def test_greedy_result_fields():
    result = solve(PROBLEM, "greedy", rules=GreedyRules(k_max=4))
    assert result.status == "feasible" and result.success
    assert result.objective == 5.0
    assert result.bound is None and result.gap is None
    assert result.wall_time >= 0
    assert "1 replicas" in result.message


def test_time_limit_hit_keeps_the_plan():
    result = solve(PROBLEM, "greedy", time_limit=1e-12)
    assert result.status == "timeout"
    assert result.plan is not None and check_plan(PROBLEM, result.plan) == []
    assert result.objective == 5.0


@pytest.fixture
def fake_backend(monkeypatch):
    """Register method 'fake' served by a module whose plan the test sets."""
    module = types.ModuleType("probe_fake_backend")
    monkeypatch.setitem(sys.modules, "probe_fake_backend", module)
    monkeypatch.setitem(METHODS, "fake", ("probe_fake_backend", "solve_fake"))
    return module


def test_infeasible_backend_plan_becomes_an_error(fake_backend):
    def solve_fake(problem, *, time_limit=None):
        bad = Plan(np.zeros((2, 2), bool), -np.ones((2, 2), int), np.zeros((2, 2, 2), int))
        return SolveResult("feasible", bad, 0.0, None, None, 0.001)

    fake_backend.solve_fake = solve_fake
    result = solve(PROBLEM, "fake")
    assert result.status == "error" and result.plan is None
    assert math.isinf(result.objective)
    assert "fake returned an infeasible plan: conservation: source 1, expert 0 assigns 0 of 10" \
        in result.message


def test_bound_gives_gap(fake_backend):
    def solve_fake(problem, *, time_limit=None):
        plan = backend("static")(problem).plan
        return SolveResult("feasible", plan, 0.0, 5.0, None, 0.001)

    fake_backend.solve_fake = solve_fake
    result = solve(PROBLEM, "fake")
    assert result.objective == 10.0
    assert result.gap == pytest.approx(0.5)


def test_missing_backend_is_an_import_error_naming_the_method(monkeypatch):
    monkeypatch.setitem(METHODS, "ghost", ("probe.planner.no_such_module", "solve_ghost"))
    with pytest.raises(ImportError, match="planner method 'ghost' is unavailable"):
        solve(PROBLEM, "ghost")


def test_importing_the_package_does_not_import_numba_or_backends():
    code = ("import sys, probe.planner; "
            "assert 'numba' not in sys.modules, 'numba'; "
            "assert 'probe.planner.cpsat' not in sys.modules; "
            "assert 'probe.planner.lp' not in sys.modules")
    import subprocess

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
