"""Tests of solvers_bench: instance grid, runner cross-checks, report, CLI (tiny grid)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from probe.planner.check import check_plan
from probe.planner.cost import CostModel
from probe.planner.problem import Plan, SolveResult
from probe.planner.solve import solve
from probe.planner.window import default_window
from solvers_bench import run as bench_run
from solvers_bench.cli import register
from solvers_bench.instances import InstanceSpec, build_problem, sample_grid
from solvers_bench.report import flat_rows, summarize


def _spec(**kw) -> InstanceSpec:
    base = dict(family="decode", ep=4, num_experts=64, top_k=4, slots=2, window="x1",
                hardware="h200x8", model="gpt-oss-120b", step=5, layer=0, seed=0, tier="proof")
    base.update(kw)
    return InstanceSpec(**base)


def test_grid_is_seeded_and_reproducible():
    a = sample_grid(num_proof=20, num_scale=3, seed=3)
    b = sample_grid(num_proof=20, num_scale=3, seed=3)
    c = sample_grid(num_proof=20, num_scale=3, seed=4)
    assert [s.id for s in a] == [s.id for s in b]
    assert [s.id for s in a] != [s.id for s in c]
    assert len({s.id for s in a}) == len(a) == 23
    assert sum(s.tier == "scale" for s in a) == 3
    assert {"decode", "prefill", "shift", "repeat"} <= {s.family for s in a}
    # Same recipe, same problem.
    p1, h1 = build_problem(a[0])
    p2, h2 = build_problem(InstanceSpec.from_dict(json.loads(json.dumps(a[0].as_dict()))))
    assert np.array_equal(p1.load, p2.load) and np.array_equal(p1.window, p2.window)


def test_grid_rejects_bad_counts():
    with pytest.raises(ValueError, match="num_proof"):
        sample_grid(num_proof=-1, num_scale=0)
    with pytest.raises(ValueError, match="num_scale"):
        sample_grid(num_proof=1, num_scale=1.5)


def test_build_problem_sizes_and_windows():
    problem, history = build_problem(_spec(window="x1"))
    assert problem.load.shape == (4, 64)
    # Real decode batch size: 1024 tokens per rank, top-4 -> 4096 token-expert pairs per rank.
    assert problem.load.sum(axis=1).tolist() == [4096] * 4
    assert history is not None and history.shape == (4, 4, 64)  # 4 previous steps of the layer
    assert np.allclose(problem.window, default_window(problem.load, problem.home, problem.cost))
    tight, _ = build_problem(_spec(window="tight"))
    off = ~np.eye(4, dtype=bool)
    assert np.all(tight.window < tight.cost.transfer_time[off].min())  # no copy fits
    one, _ = build_problem(_spec(window="1copy"))
    assert np.all(one.window >= one.cost.transfer_time[off].min())
    assert np.all(one.window < 2 * one.cost.transfer_time[off].min())
    multi, _ = build_problem(_spec(ep=8, hardware="h200x4-n2"))
    tt = multi.cost.transfer_time
    assert tt[0, 7] > tt[0, 1]  # across nodes is slower
    with pytest.raises(ValueError, match="window kind"):
        build_problem(_spec(window="huge"))


def test_tight_window_makes_static_optimal_and_is_proven():
    rec = bench_run.run_instance(_spec(window="tight"), 2.0,
                                 methods=("static", "greedy", "lp", "cpsat"))
    assert rec["proven"]
    for name in ("static", "greedy", "lp"):
        assert rec["methods"][name]["gap"] <= 1e-4
        assert rec["methods"][name]["num_replicas"] == 0


def test_run_instance_reports_infeasible_plans_loudly(monkeypatch):
    real_solve = bench_run.solve

    def broken(problem, method, **kw):
        result = real_solve(problem, method, **kw)
        if method != "greedy":
            return result
        bad = result.plan.assignment.copy()
        bad[0, 0, 0] += 1  # one token too many: breaks conservation
        plan = Plan(result.plan.replicas, result.plan.sources, bad)
        return SolveResult("feasible", plan, result.objective, None, None, 0.0, "", "greedy")

    monkeypatch.setattr(bench_run, "solve", broken)
    rec = bench_run.run_instance(_spec(), 1.0, methods=("static", "greedy"))
    assert rec["methods"]["greedy"]["num_violations"] >= 1
    assert any(a.startswith("INFEASIBLE PLAN from greedy") for a in rec["anomalies"])
    # An infeasible plan never counts as the best plan.
    assert rec["best_method"] == "static"
    summary = summarize([rec])
    assert len(summary["anomalies"]["infeasible"]) == 1


def test_run_instance_gaps_are_consistent():
    rec = bench_run.run_instance(_spec(window="x2"), 1.0)
    best_bound, best_obj = rec["best_bound"], rec["best_objective"]
    assert best_bound is not None and best_bound <= best_obj * (1 + 1e-9)
    for name, row in rec["methods"].items():
        assert row["violations"] == [], name
        assert row["objective"] >= best_obj * (1 - 1e-12)
        assert 0.0 <= row["gap_inc"] <= row["gap"] + 1e-12  # lower <= upper bound on the gap
    # Heuristics cannot beat the static plan's worst-case: every planner is at least as good.
    assert rec["methods"]["greedy"]["objective"] <= rec["methods"]["static"]["objective"] + 1e-12
    problem, _ = build_problem(_spec(window="x2"))
    for name in ("greedy", "lp"):
        assert check_plan(problem, solve(problem, bench_run.METHODS[name][0]).plan) == []


@pytest.mark.slow
def test_cli_tiny_grid_writes_results_report_and_resumes(tmp_path):
    app = typer.Typer()
    register(app)

    @app.callback()
    def _root() -> None:
        """probe"""

    runner = CliRunner()
    out = tmp_path / "bench"
    args = ["bench", "solvers", "--tiny", "--out", str(out), "--workers", "1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 3
    assert all(not r.get("fatal") for r in records)
    assert all(set(r["methods"]) == set(bench_run.METHODS) for r in records)
    report = (out / "report.md").read_text()
    for heading in ("## Targets", "## Solve time per size", "## Cross-checks", "IR before"):
        assert heading in report
    assert (out / "gap_by_family.png").exists() or (out / "gap_cdf.png").exists()
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 * len(bench_run.METHODS)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["instances"] == 3
    # Resume: nothing left to run, the records stay.
    result = runner.invoke(app, [*args, "--no-plots"])
    assert result.exit_code == 0, result.output
    assert len((out / "results.jsonl").read_text().splitlines()) == 3


def test_run_all_stops_at_the_deadline_while_a_solve_runs(tmp_path, monkeypatch):
    """max_seconds cuts the run even while every worker is still inside a slow solve."""
    import time

    def slow(spec, time_limit, methods):
        time.sleep(30)
        raise AssertionError("the deadline should have stopped the run first")

    monkeypatch.setattr(bench_run, "run_instance", slow)
    specs = [_spec(seed=s) for s in range(4)]
    start = time.perf_counter()
    records = bench_run.run_all(specs, tmp_path / "r.jsonl", time_limit=1.0, workers=2,
                                max_seconds=1.0)
    assert records == []
    assert time.perf_counter() - start < 15


def test_run_all_keeps_records_of_another_grid(tmp_path):
    path = tmp_path / "r.jsonl"
    other = {"id": "from-another-grid", "methods": {}}
    path.write_text(json.dumps(other) + "\n" + '{"id": "torn')
    spec = _spec(window="tight")
    records = bench_run.run_all([spec], path, time_limit=0.5, methods=("static",))
    assert [r["id"] for r in records] == [spec.id]
    assert [r["id"] for r in bench_run.load_results(path)] == ["from-another-grid", spec.id]
    with pytest.raises(FileExistsError, match="resume is off"):
        bench_run.run_all([spec], path, time_limit=0.5, methods=("static",), resume=False)
    assert len(bench_run.load_results(path)) == 2


def test_load_results_skips_a_torn_last_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"id": "a"}) + "\n" + '{"id": "b", "meth')
    assert [r["id"] for r in bench_run.load_results(path)] == ["a"]


def test_flat_rows_one_per_method():
    rec = bench_run.run_instance(_spec(window="tight"), 0.5, methods=("static", "greedy"))
    rows = flat_rows([rec])
    assert [r["method"] for r in rows] == ["static", "greedy"]
    assert all(r["feasible"] and math.isfinite(r["objective_us"]) for r in rows)


# --- Solver problems found by the benchmark (reproducers). ---

def test_highs_threads_option_runs_the_mip():
    problem, _ = build_problem(_spec(ep=4, window="x1", top_k=2))
    result = solve(problem, "highs", time_limit=1.0, threads=1)
    assert "Not Set" not in result.message


def test_highs_optimal_reports_a_matching_bound():
    cost = CostModel.uniform(2, alpha=1.0, beta=1.0, token_time=0.0, transfer_time=10.0)
    from probe.placement import sharded_home
    from probe.planner.problem import BalanceProblem

    problem = BalanceProblem(np.array([[5, 1], [3, 0]]), sharded_home(2, 2), 1, 1.0, cost)
    result = solve(problem, "highs", time_limit=5.0)
    assert result.status == "optimal"
    assert result.bound is not None and result.bound >= result.objective * (1 - 1e-6)
