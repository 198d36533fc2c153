"""Exact MILP backends (CP-SAT, HiGHS) and the LP heuristic, judged by check_plan/evaluate_plan."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from probe.placement import sharded_home
from probe.planner.check import check_plan, evaluate_plan
from probe.planner.cost import CostModel
from probe.planner.cpsat import solve_cpsat
from probe.planner.highs import solve_highs
from probe.planner.lp import solve_lp
from probe.planner.milp import EXACT, MAKESPAN, build_milp, plan_from_values, plan_to_values
from probe.planner.problem import BalanceProblem, Plan
from probe.planner.result import largest_remainder
from probe.planner.warmstart import warm_start
from probe.specs import hardware_preset, model_preset

REL = 1e-6


def static_plan(problem: BalanceProblem) -> Plan:
    """No replicas; every token on its expert's (single) home rank."""
    num_ranks, num_experts = problem.num_ranks, problem.num_experts
    owner = np.argmax(problem.home, axis=0)
    assignment = np.zeros((num_ranks, num_experts, num_ranks), np.int64)
    assignment[:, np.arange(num_experts), owner] = problem.load
    return Plan(np.zeros((num_ranks, num_experts), bool),
                np.full((num_ranks, num_experts), -1), assignment)


def small_problem(seed: int, num_ranks: int = 3, num_experts: int = 6, *, slots: int = 1,
                  window: float = 1.0, cost: CostModel | None = None) -> BalanceProblem:
    rng = np.random.default_rng(seed)
    load = rng.integers(0, 6, (num_ranks, num_experts))
    load[:, rng.integers(num_experts)] += rng.integers(5, 15, num_ranks)  # one hot expert
    if cost is None:
        cost = CostModel.uniform(num_ranks, alpha=2.0, beta=1.0, token_time=0.25,
                                 transfer_time=1.0)
    return BalanceProblem(load, sharded_home(num_experts, num_ranks), slots, window, cost)


def ep8_problem(seed: int = 0) -> BalanceProblem:
    """ep=8, 128 experts, top-4 Zipf-skewed decode step of 768 tokens per rank (gpt-oss)."""
    rng = np.random.default_rng(seed)
    pop = (np.arange(128) + 1.0) ** -1.0
    pop = pop[rng.permutation(128)]
    load = np.zeros((8, 128), np.int64)
    for s in range(8):
        keys = np.log(pop)[None, :] + rng.gumbel(size=(768, 128))
        top = np.argpartition(-keys, 4, axis=1)[:, :4]
        load[s] = np.bincount(top.ravel(), minlength=128)
    cost = CostModel.from_specs(model_preset("gpt-oss-120b"), hardware_preset("h200x8"))
    return BalanceProblem(load, sharded_home(128, 8), 3, 3 * cost.transfer_time[0, 1], cost)


def objective(problem: BalanceProblem, plan: Plan) -> float:
    return evaluate_plan(problem, plan).objective


def assert_good(problem: BalanceProblem, result, reference: float) -> None:
    """Feasible plan, objective as evaluated, no worse than `reference`, bound below it."""
    assert result.plan is not None, result.message
    assert check_plan(problem, result.plan) == []
    assert result.objective == pytest.approx(objective(problem, result.plan), rel=1e-12)
    assert result.objective <= reference * (1 + 1e-12) + 1e-15
    if result.bound is not None:
        assert result.bound <= result.objective * (1 + 1e-9) + 1e-15
        assert 0.0 <= result.gap <= 1.0


# ------------------------------------------------------------------------- the formulation
def row_activity(milp, values: np.ndarray) -> np.ndarray:
    act = np.zeros(milp.num_rows)
    np.add.at(act, milp.coef_row, milp.coef_val * values[milp.coef_col])
    return act


@pytest.mark.parametrize("seed", range(4))
def test_milp_rows_accept_feasible_plans_and_z_is_the_objective(seed):
    problem = small_problem(seed, 4, 8, slots=2, window=2.0)
    milp = build_milp(problem)
    plans = [static_plan(problem), warm_start(problem)[0]]
    for plan in plans:
        assert check_plan(problem, plan) == []
        values = plan_to_values(milp, problem, plan)
        assert values is not None
        act = row_activity(milp, values)
        tol = 1e-9 * (1 + np.abs(milp.row_upper[np.isfinite(milp.row_upper)]).max())
        assert np.all(act <= milp.row_upper + tol)
        assert np.all(act >= milp.row_lower - tol)
        # z is the largest makespan row without z: the checker's objective, exactly.
        span = np.flatnonzero(milp.row_family == MAKESPAN)[:-1]  # last one is the mean row
        values_no_z = values.copy()
        values_no_z[milp.z_col] = 0.0
        need = row_activity(milp, values_no_z)[span] - milp.row_upper[span]
        assert need.max() == pytest.approx(objective(problem, plan), rel=1e-12)
        again = plan_from_values(milp, problem, values)
        assert np.array_equal(again.assignment, plan.assignment)


def test_milp_counting_rows_are_integral():
    milp = build_milp(small_problem(1, 4, 8, slots=2))
    exact = milp.row_family[milp.coef_row] == EXACT
    assert np.all(milp.coef_val[exact] == np.rint(milp.coef_val[exact]))


def test_milp_candidates_shape_is_validated():
    with pytest.raises(ValueError, match="candidates must have shape"):
        build_milp(small_problem(0), candidates=np.ones((2, 2), bool))


def test_largest_remainder_keeps_totals():
    shares = np.array([[0.5, 0.5, 0.0], [2.2, 0.4, 0.4], [0.0, 0.0, 0.0]])
    out = largest_remainder(np.array([1, 3, 2]), shares)
    assert out.sum(axis=1).tolist() == [1, 3, 2]
    assert out[1].tolist() == [2, 1, 0] or out[1].tolist() == [2, 0, 1]
    assert np.all(out >= 0)


# ------------------------------------------------------------------------- exact backends
@pytest.mark.parametrize("seed", range(3))
def test_cpsat_and_highs_agree_on_small_instances(seed):
    problem = small_problem(seed, 3 + seed % 2, 6, slots=1 + seed // 2, window=1.0 + seed)
    reference = min(objective(problem, static_plan(problem)),
                    objective(problem, warm_start(problem)[0]))
    cp = solve_cpsat(problem, time_limit=30, num_workers=2)
    hi = solve_highs(problem, time_limit=30)
    assert cp.status == "optimal" and hi.status == "optimal", (cp.message, hi.message)
    assert_good(problem, cp, reference)
    assert_good(problem, hi, reference)
    assert cp.objective == pytest.approx(hi.objective, rel=1e-3)
    # Each one's proven bound holds for the other's plan too.
    assert cp.bound <= hi.objective * (1 + 1e-9)
    assert hi.bound <= cp.objective * (1 + 1e-6)


def test_exact_backends_match_brute_force_on_a_tiny_instance():
    cost = CostModel.uniform(2, alpha=1.5, beta=1.0, token_time=0.5, transfer_time=1.0)
    load = np.array([[2, 0, 1], [2, 1, 0]])
    home = np.array([[1, 1, 0], [0, 0, 1]], bool)
    problem = BalanceProblem(load, home, 1, 1.0, cost)
    best = np.inf
    owners = [np.flatnonzero(home[:, e])[0] for e in range(3)]
    options = [[(-1, -1)] + [(e, owners[e]) for e in range(3) if not home[g, e]]
               for g in range(2)]
    for choice in itertools.product(*options):
        replicas = np.zeros((2, 3), bool)
        sources = np.full((2, 3), -1)
        for g, (e, h) in enumerate(choice):
            if e >= 0:
                replicas[g, e], sources[g, e] = True, h
        pairs = [(s, e) for s in range(2) for e in range(3)]
        for splits in itertools.product(*[range(load[s, e] + 1) for s, e in pairs]):
            assignment = np.zeros((2, 3, 2), np.int64)
            for (s, e), on_rank0 in zip(pairs, splits, strict=True):
                assignment[s, e] = [on_rank0, load[s, e] - on_rank0]
            plan = Plan(replicas, sources, assignment)
            if not check_plan(problem, plan):
                best = min(best, objective(problem, plan))
    assert np.isfinite(best)
    assert best < objective(problem, static_plan(problem))  # replicas help here
    cp = solve_cpsat(problem, time_limit=10, num_workers=1)
    hi = solve_highs(problem, time_limit=10)
    assert cp.status == hi.status == "optimal"
    assert cp.objective == pytest.approx(best, rel=1e-9)
    assert hi.objective == pytest.approx(best, rel=1e-9)
    assert cp.bound <= best * (1 + 1e-12)
    assert hi.bound <= best * (1 + 1e-6)


def test_cpsat_bound_is_a_lower_bound_with_inexact_scaling():
    # Times that are no multiple of the quantum: rounding must keep the bound valid.
    cost = CostModel.uniform(3, alpha=1.0 / 3, beta=0.7071, token_time=0.1234567,
                             transfer_time=0.9)
    problem = small_problem(7, 3, 6, slots=1, window=1.0, cost=cost)
    cp = solve_cpsat(problem, time_limit=20, num_workers=2)
    hi = solve_highs(problem, time_limit=20)
    assert cp.status == "optimal" and hi.status == "optimal"
    assert cp.bound <= hi.objective * (1 + 1e-9)
    assert cp.objective == pytest.approx(hi.objective, rel=1e-3)


@pytest.mark.parametrize("case", ["zero_load", "one_expert", "window_0", "no_slots", "one_rank"])
def test_exact_backends_on_degenerate_instances(case):
    num_ranks, num_experts, slots, window = 3, 6, 1, 1.0
    load = np.random.default_rng(3).integers(0, 5, (num_ranks, num_experts))
    if case == "zero_load":
        load[:] = 0
    elif case == "one_expert":
        load[:] = 0
        load[:, 0] = 9
    elif case == "window_0":
        window = 0.0
    elif case == "no_slots":
        slots = 0
    else:
        num_ranks, load = 1, load[:1]
    cost = CostModel.uniform(num_ranks, alpha=2.0, beta=1.0, token_time=0.25, transfer_time=1.0)
    problem = BalanceProblem(load, sharded_home(num_experts, num_ranks), slots, window, cost)
    reference = objective(problem, static_plan(problem))
    for result in (solve_cpsat(problem, time_limit=10, num_workers=1),
                   solve_highs(problem, time_limit=10), solve_lp(problem, time_limit=10)):
        assert_good(problem, result, reference)
        if case in ("window_0", "no_slots", "one_rank"):
            assert result.plan.num_replicas == 0
        if case == "zero_load":
            assert result.objective == 0.0


def test_tiny_time_limit_keeps_the_warm_start():
    problem = ep8_problem(1)
    # Under a 1 ms limit the lp heuristic inside warm_start times out, so the reference is
    # the best of static and greedy (the lp plan found without a limit may be better).
    warm, _ = warm_start(problem, use_lp=False)
    warm_obj = objective(problem, warm)
    for solver in (solve_cpsat, solve_highs):
        result = solver(problem, time_limit=1e-3)
        assert result.status in ("timeout", "feasible"), result.message
        assert_good(problem, result, warm_obj)
    result = solve_lp(problem, time_limit=1e-6)
    assert result.status == "timeout"
    assert "greedy" in result.message or "static" in result.message
    assert_good(problem, result, warm_obj)


def test_cpsat_hint_is_used_on_a_short_run():
    problem = ep8_problem(2)
    warm, _ = warm_start(problem)
    result = solve_cpsat(problem, time_limit=3, num_workers=2)
    assert result.status in ("timeout", "optimal")
    assert_good(problem, result, objective(problem, warm))
    assert result.bound is not None  # (weak after 3 s on a busy machine; checked by assert_good)


@pytest.mark.parametrize("solver", [solve_cpsat, solve_highs, solve_lp])
def test_bad_time_limit_is_rejected(solver):
    with pytest.raises(ValueError, match="time_limit"):
        solver(small_problem(0), time_limit=0)


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="num_workers"):
        solve_cpsat(small_problem(0), num_workers=0)
    with pytest.raises(ValueError, match="num_candidates"):
        solve_lp(small_problem(0), num_candidates=-1)


# ------------------------------------------------------------------------- the LP heuristic
@pytest.mark.parametrize("seed", range(3))
def test_lp_is_feasible_and_never_worse_than_greedy(seed):
    problem = ep8_problem(seed)
    warm, _ = warm_start(problem, use_lp=False)
    result = solve_lp(problem)
    assert result.status == "feasible", result.message
    assert_good(problem, result, objective(problem, warm))
    assert result.objective < objective(problem, static_plan(problem))


def test_lp_on_small_instances_stays_above_the_exact_optimum():
    problem = small_problem(5, 4, 8, slots=2, window=2.0)
    lp = solve_lp(problem)
    hi = solve_highs(problem, time_limit=30)
    assert_good(problem, lp, objective(problem, warm_start(problem, use_lp=False)[0]))
    assert hi.objective <= lp.objective * (1 + 1e-9)


def test_registry_runs_the_backends():
    from probe.planner.solve import solve

    problem = small_problem(2)
    for method in ("lp", "highs", "cpsat"):
        result = solve(problem, method, time_limit=10)
        assert result.plan is not None and check_plan(problem, result.plan) == []
        assert result.method == method


def test_no_time_limit_means_the_default_and_inf_means_none():
    from probe.planner.cpsat import DEFAULT_TIME_LIMIT

    assert DEFAULT_TIME_LIMIT == 60.0
    problem = small_problem(4)
    default = solve_cpsat(problem, num_workers=1)
    unlimited = solve_cpsat(problem, time_limit=float("inf"), num_workers=1)
    highs = solve_highs(problem, time_limit=float("inf"))
    assert default.status == unlimited.status == highs.status == "optimal"
    assert unlimited.objective == pytest.approx(highs.objective, rel=1e-3)


def test_backends_agree_with_non_uniform_links():
    # Two "nodes": ranks 0-1 close, rank 2 far (slower tokens and copies).
    token_time = np.array([[0.0, 0.1, 0.6], [0.1, 0.0, 0.6], [0.6, 0.6, 0.0]])
    transfer = np.array([[0.0, 1.0, 3.0], [1.0, 0.0, 3.0], [3.0, 3.0, 0.0]])
    cost = CostModel(alpha=1.0, beta=0.5, token_time=token_time, transfer_time=transfer)
    problem = small_problem(11, 3, 6, slots=1, window=3.0, cost=cost)
    cp = solve_cpsat(problem, time_limit=20, num_workers=2)
    hi = solve_highs(problem, time_limit=20)
    lp = solve_lp(problem)
    reference = objective(problem, static_plan(problem))
    for result in (cp, hi, lp):
        assert_good(problem, result, reference)
    assert cp.status == hi.status == "optimal"
    assert cp.objective == pytest.approx(hi.objective, rel=1e-3)
    assert hi.objective <= lp.objective * (1 + 1e-9)


# ------------------------------------------------------------ the window's edge, failures
def two_copy_problem(window: float) -> BalanceProblem:
    """Three ranks; rank 0's two experts are hot, so copies of both pay off; a copy takes 1 s."""
    cost = CostModel.uniform(3, alpha=1.0, beta=1.0, token_time=0.0, transfer_time=1.0)
    return BalanceProblem(np.array([[30, 30, 1, 1, 1, 1]] * 3), sharded_home(6, 3), 2, window,
                          cost)


def test_highs_keeps_its_own_plan_when_a_window_is_just_under_whole_copies():
    # Two copies take 2 s: 1e-8 over this window, within HiGHS's default tolerances but not
    # the checker's. HiGHS must not take them (its plan would be rejected and the warm start
    # returned in its place).
    problem = two_copy_problem(2.0 * (1 - 1e-8))
    hi = solve_highs(problem, time_limit=30)
    cp = solve_cpsat(problem, time_limit=30, num_workers=1)
    assert hi.status == "optimal" and hi.fallback is None, hi.message
    assert check_plan(problem, hi.plan) == []
    assert hi.objective == pytest.approx(cp.objective, rel=1e-9)
    assert np.bincount(hi.plan.sources[hi.plan.replicas], minlength=3).max() <= 1


def test_a_copy_within_the_checker_slack_is_in_the_model():
    # The copy takes 1 s, the window is 1 s less a relative 5e-10: check_plan accepts the
    # copy, so the MILP must have its column and no backend may prove a bound above it.
    cost = CostModel.uniform(2, alpha=0.0, beta=1.0, token_time=0.0, transfer_time=1.0)
    problem = BalanceProblem(np.array([[8, 0], [8, 0]]), sharded_home(2, 2), 1,
                             1.0 / (1 + 5e-10), cost)
    replicas = np.array([[False, False], [True, False]])
    sources = np.array([[-1, -1], [0, -1]])
    assignment = np.zeros((2, 2, 2), np.int64)
    assignment[0, 0, 0] = assignment[1, 0, 1] = 8  # every token stays local
    plan = Plan(replicas, sources, assignment)
    assert check_plan(problem, plan) == []
    best = objective(problem, plan)  # 8 s, against 16 s without the copy
    assert build_milp(problem).u_col[0, 0, 1] >= 0
    for result in (solve_highs(problem, time_limit=30),
                   solve_cpsat(problem, time_limit=30, num_workers=1), solve_lp(problem)):
        assert_good(problem, result, best)
        assert result.objective == pytest.approx(best, rel=1e-12), result.method
    for result in (solve_highs(problem, time_limit=30),
                   solve_cpsat(problem, time_limit=30, num_workers=1)):
        assert result.status == "optimal" and result.bound <= best * (1 + 1e-12)


def huge_load_problem() -> BalanceProblem:
    """G = 2, E = 2 with 2**60 tokens per source: CP-SAT's domains overflow int64."""
    cost = CostModel.uniform(2, alpha=0.0, beta=1.0, token_time=0.0, transfer_time=1.0)
    return BalanceProblem(np.array([[2**60, 0], [2**60, 0]], np.int64), sharded_home(2, 2), 1,
                          1.0, cost)


def test_cpsat_failure_on_huge_loads_keeps_the_warm_start():
    from probe.planner.solve import solve

    problem = huge_load_problem()
    warm, warm_name = warm_start(problem)
    for result in (solve_cpsat(problem, time_limit=10, num_workers=1),
                   solve(problem, "cpsat", time_limit=10, num_workers=1)):
        assert result.status == "feasible", result.message
        assert result.fallback == warm_name
        assert "CP-SAT failed" in result.message and "MODEL_INVALID" in result.message
        assert_good(problem, result, objective(problem, warm))
    result = solve_highs(problem, time_limit=10)
    assert result.plan is not None and result.fallback is not None, result.message
    assert_good(problem, result, objective(problem, warm))


@pytest.mark.parametrize("method", ["cpsat", "highs"])
def test_a_solver_exception_keeps_the_warm_start(monkeypatch, method):
    import probe.planner.cpsat as cpsat_module
    import probe.planner.highs as highs_module

    def broken(*args, **kwargs):
        raise RuntimeError("solver broke")

    if method == "cpsat":
        monkeypatch.setattr(cpsat_module, "scale_milp", broken)
        result = solve_cpsat(small_problem(0), time_limit=10, num_workers=1)
    else:
        monkeypatch.setattr(highs_module, "highs_model", broken)
        result = solve_highs(small_problem(0), time_limit=10)
    warm, warm_name = warm_start(small_problem(0))
    assert result.status == "feasible" and result.fallback == warm_name
    assert "solver broke" in result.message
    assert_good(small_problem(0), result, objective(small_problem(0), warm))


# ------------------------------------------------------------------------- solver output
def test_lp_and_highs_print_nothing_unless_verbose(capfd):
    problem = small_problem(3)
    capfd.readouterr()
    solve_lp(problem)
    solve_highs(problem, time_limit=10)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    solve_highs(problem, time_limit=10, verbose=True)
    solve_lp(problem, verbose=True)
    out, _ = capfd.readouterr()
    assert "HiGHS" in out
    solve_lp(problem)  # the cached LP instances are silent again
    assert capfd.readouterr() == ("", "")


def test_a_fresh_process_prints_no_highs_banner():
    # HiGHS prints its banner from the first highspy.Highs() of a process only.
    import subprocess
    import sys

    code = ("import numpy as np\n"
            "from probe.placement import sharded_home\n"
            "from probe.planner.cost import CostModel\n"
            "from probe.planner.problem import BalanceProblem\n"
            "from probe.planner.solve import solve\n"
            "cost = CostModel.uniform(2, alpha=1.0, beta=1.0, token_time=0.1, transfer_time=1.0)\n"
            "p = BalanceProblem(np.array([[9, 1], [7, 0]]), sharded_home(2, 2), 1, 1.0, cost)\n"
            "for m in ('lp', 'highs'):\n"
            "    assert solve(p, m, time_limit=10).plan is not None\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""
