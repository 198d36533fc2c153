"""`probe plan`, `plan_step` and `plan_layers` on a small synthetic trace."""

from __future__ import annotations

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from probe.placement import sharded_home
from probe.planner.check import check_plan
from probe.planner.cli import register
from probe.planner.cost import CostModel
from probe.planner.layers import attention_time, plan_layers, plan_step
from probe.planner.problem import BalanceProblem
from probe.planner.window import default_window
from probe.specs import hardware_preset, model_preset
from probe.traces import generate


@pytest.fixture(scope="module")
def trace():
    return generate("decode", num_steps=3, tokens_per_step=512, num_layers=3, num_experts=16,
                    top_k=2, num_ranks=4, seed=1)


@pytest.fixture(scope="module")
def trace_file(trace, tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "small.probe"
    trace.save(path)
    return path


@pytest.fixture
def app():
    app = typer.Typer()

    @app.callback()
    def root() -> None:
        """test app"""

    register(app)
    return app


COST = CostModel.from_specs(model_preset("gpt-oss-120b"), hardware_preset("h200x8"), num_ranks=4)


def test_plan_step_plans_every_layer_feasibly(trace):
    results = plan_step(trace, 1, cost=COST, slots=2)
    assert len(results) == trace.num_layers
    loads = trace.load_counts(steps=[1])[0]
    home = sharded_home(16, 4)
    for load, result in zip(loads, results, strict=True):
        problem = BalanceProblem(load, home, 2, default_window(load, home, COST), COST)
        assert result.method == "greedy"
        assert check_plan(problem, result.plan) == []
        assert np.array_equal(result.plan.assignment.sum(axis=2), load)


def test_plan_step_eplb_is_deepseeks_layout_of_previous_steps(trace):
    from probe.planner.deepseek_eplb import eplb_layout

    results = plan_step(trace, 2, cost=COST, slots=1, window=1.0, method="eplb", eplb_history=2)
    past = trace.load_counts(steps=[0, 1])  # [H, L, S, E]
    load = trace.load_counts(steps=[2])[0]
    num_ranks, num_experts = load.shape[1:]
    per_rank = num_experts // num_ranks + 1
    for layer, result in enumerate(results):
        weight = past[:, layer].sum(axis=1).mean(axis=0)
        copies = eplb_layout(weight, per_rank, 1, 1, num_ranks)
        assert result.method == "eplb" and result.plan.num_replicas == 0
        tokens = result.plan.tokens_per_rank_expert()  # [G, E]: only where DeepSeek put copies
        assert np.all(tokens[copies == 0] == 0)
        assert np.array_equal(result.plan.assignment.sum(axis=2), load[layer])


def test_plan_step_eplb_addcopies_uses_previous_steps(trace):
    results = plan_step(trace, 2, cost=COST, slots=1, window=1.0, method="eplb_addcopies",
                        eplb_history=2)
    past = trace.load_counts(steps=[0, 1])  # [H, L, S, E]
    for layer, result in enumerate(results):
        weight = past[:, layer].sum(axis=1).mean(axis=0)
        hottest = int(np.argmax(weight))
        assert result.plan.replicas[:, hottest].any()


def test_plan_step_errors(trace):
    with pytest.raises(ValueError, match="step 7 out of range for a trace of 3 steps"):
        plan_step(trace, 7, cost=COST)
    with pytest.raises(ValueError, match="cost model is for 8 ranks, trace has 4"):
        plan_step(trace, 0, cost=CostModel.from_specs(model_preset("gpt-oss-120b"),
                                                     hardware_preset("h200x8")))
    with pytest.raises(ValueError, match="window must be 'auto', seconds"):
        plan_step(trace, 0, cost=COST, window="soon")


def test_plan_layers_window_and_attention():
    cost = CostModel.uniform(2, alpha=0.0, beta=1.0, token_time=0.0, transfer_time=1.0)
    loads = np.array([[[0, 0], [8, 0]]])
    # auto: rank 1 computes nothing under static EP, so it cannot receive a copy...
    assert plan_layers(loads, cost=cost, slots=1)[0].plan.num_replicas == 0
    # ...unless attention time opens its window.
    assert plan_layers(loads, cost=cost, slots=1, attention_s=1.0)[0].plan.num_replicas == 1
    with pytest.raises(ValueError, match=r"loads must be \[L, S, E\]"):
        plan_layers(loads[0], cost=cost)
    assert attention_time(model_preset("gpt-oss-120b"), hardware_preset("h200x8")) == (
        pytest.approx(4 * 2880**2 * 2 / 4.8e12))


@pytest.mark.parametrize("extra", [[], ["--paper"], ["--also-paper"]])
def test_cli_all_layers(app, trace_file, extra):
    result = CliRunner().invoke(app, ["plan", str(trace_file), "--step", "1", "--slots", "2",
                                      *extra], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "per layer" in result.output
    assert "method greedy, 2 slots/rank, window auto" in result.output
    assert result.output.count("feasible") == 3


def test_cli_lite_rules(app, trace_file):
    """--rounds and --hot-sixteenths reach the lite planner: capped at one round it stops
    after the round that moved (16 rounds: a second round finds no move)."""
    out = {}
    for rounds in (1, 16):
        result = CliRunner().invoke(app, ["plan", str(trace_file), "--method", "lite",
                                          "--rounds", str(rounds), "--hot-sixteenths", "16",
                                          "--layer", "0", "--window", "0.01"],
                                    env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        out[rounds] = result.output
    assert "feasible: 1 rounds, 1 moves" in out[1]
    assert "feasible: 2 rounds, 1 moves" in out[16]


def test_cli_one_layer_shows_replicas_and_metrics(app, trace_file):
    result = CliRunner().invoke(app, ["plan", str(trace_file), "--layer", "1", "--method",
                                      "static", "--window", "0.001"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "objective (eq. 8)" in result.output and "IR (tokens)" in result.output
    assert "replicas (0); moved tokens 0" in result.output


@pytest.mark.parametrize(("args", "message"), [
    (["--method", "simplex"], "unknown method 'simplex'"),
    (["--window", "soon"], "expected 'auto' or seconds"),
    (["--layer", "9"], "layer 9 out of range"),
    (["--step", "5"], "step 5 out of range"),
])
def test_cli_bad_arguments(app, trace_file, args, message):
    result = CliRunner().invoke(app, ["plan", str(trace_file), *args], env={"COLUMNS": "200"})
    assert result.exit_code != 0
    assert message in result.output


def test_cli_missing_file(app, tmp_path):
    result = CliRunner().invoke(app, ["plan", str(tmp_path / "none.probe")])
    assert result.exit_code == 1
    assert "error" in result.output


@pytest.mark.parametrize(("args", "option", "message"), [
    (["--method", "simplex"], "--method", "unknown method 'simplex'"),
    (["--window", "soon"], "--window", "expected 'auto' or seconds"),
    (["--window", "-1"], "--window", "window must be >= 0 seconds"),
    (["--window", "nan"], "--window", "window must be >= 0 seconds"),
    (["--layer", "9"], "--layer", "layer 9 out of range"),
    (["--layer", "-1"], "--layer", "layer -1 out of range"),
    (["--step", "5"], "--step", "step 5 out of range"),
    (["--step", "-4"], "--step", "step -4 out of range"),
    (["--slots", "-1"], "--slots", "Invalid value for '--slots'"),
    (["--k-max", "-3"], "--k-max", "Invalid value for '--k-max'"),
    (["--rounds", "0"], "--rounds", "Invalid value for '--rounds'"),
    (["--hot-sixteenths", "17"], "--hot-sixteenths", "Invalid value for '--hot-sixteenths'"),
    (["--time-limit", "0"], "--time-limit", "must be > 0, got 0.0"),
    (["--time-limit", "-1"], "--time-limit", "must be > 0, got -1.0"),
    (["--time-limit", "nan"], "--time-limit", "must be > 0, got nan"),
    (["--method", "cpsat", "--time-limit", "0"], "--time-limit", "must be > 0"),
    (["--attention-us", "-5"], "--attention-us", "must be >= 0, got -5.0"),
    (["--attention-us", "nan"], "--attention-us", "must be >= 0, got nan"),
    (["--model", "gpt-5"], "--model", "unknown model preset 'gpt-5'"),
    (["--hardware", "tpu"], "--hardware", "unknown hardware preset 'tpu'"),
    (["--hardware", "missing.json"], "--hardware", "spec file not found: missing.json"),
    (["--paper", "--also-paper"], "--also-paper", "--paper and --also-paper exclude each other"),
])
def test_cli_every_bad_option_is_a_usage_error(app, trace_file, args, option, message):
    # Exit code 2 (click's usage error) with one line naming the option; never a traceback.
    result = CliRunner().invoke(app, ["plan", str(trace_file), *args], env={"COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert option in result.output and message in result.output


@pytest.mark.parametrize(("args", "option", "message"), [
    (["--slots", "-1"], "--slots", "Invalid value for '--slots'"),
    (["--seed", "-2"], "--seed", "Invalid value for '--seed'"),
    (["--model", "gpt-5"], "--model", "unknown model preset 'gpt-5'"),
    (["--hardware", "tpu"], "--hardware", "unknown hardware preset 'tpu'"),
    (["--hardware", "h200x8-n32"], "--hardware", "at most 128 ranks"),
])
def test_demo_bad_option_is_a_usage_error(args, option, message):
    from probe.cli import app as main_app

    result = CliRunner().invoke(main_app, ["demo", *args], env={"COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert option in result.output and message in result.output
