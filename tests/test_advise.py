"""`probe advise`: static placements scored on a trace, on a tiny synthetic trace."""

import json

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from probe.advise import advise, moe_time, phy2log_of
from probe.advise_cli import register
from probe.engines import check_placement, read_placement
from probe.planner.cost import CostModel
from probe.planner.eplb import even_split
from probe.specs import hardware_preset, model_preset
from probe.traces import generate

runner = CliRunner()


@pytest.fixture(scope="module")
def skewed(tmp_path_factory):
    trace = generate("repeat", num_steps=6, tokens_per_step=8192, num_layers=2,
                     num_experts=16, top_k=2, num_ranks=4, seed=1)
    path = tmp_path_factory.mktemp("advise") / "tiny.trace"
    trace.save(path)
    return trace, path


def test_moe_time_matches_the_cost_model_by_hand():
    cost = CostModel.uniform(2, alpha=1.0, beta=0.5, token_time=0.25, transfer_time=0.0)
    assign = np.zeros((2, 2, 2), np.int64)  # [S, E, G]
    assign[0, 0, 0] = 4  # local
    assign[1, 1, 0] = 2  # 1 -> 0
    assign[1, 1, 1] = 2  # local
    seconds, ir = moe_time(assign, cost)
    # GPU 0: experts 0 and 1 active: 2 + 0.5 * 6 = 5; receives 2 tokens: comm 2 * 0.5 = 1.
    assert seconds == pytest.approx(6.0) and ir == pytest.approx(6 / 4)
    # Two copies of expert 1 on GPU 0 pay alpha twice.
    copies = np.array([[1, 2], [0, 1]])
    assert moe_time(assign, cost, copies)[0] == pytest.approx(7.0)


def test_advise_scores_every_policy_on_the_traffic(skewed):
    trace, _ = skewed
    result = advise(trace, model_preset("gpt-oss-120b"), hardware_preset("h200x8"),
                    slots=(0, 2), milp_time=0.5)
    cost = CostModel.from_specs(
        model_preset("gpt-oss-120b").__class__(
            "x", num_layers=36, num_experts=16, top_k=2, hidden=2880, expert_ffn=2880),
        hardware_preset("h200x8").with_ranks(4))
    load = trace.load_counts()
    for k in (0, 2):
        for policy in ("deepseek", "greedy", "milp", "best"):
            copies = result.copies[policy][k]
            assert copies.shape == (2, 4, 16)
            assert np.all(copies.sum(axis=2) == 4 + k) and np.all(copies.sum(axis=1) >= 1)
            # Re-score one (step, layer) independently.
            t, _ = moe_time(even_split(load[3, 1], copies[1]), cost, copies[1])
            assert result.time[policy][k][3, 1] == pytest.approx(t)
        best = result.mean_time("best", k)
        for policy in ("deepseek", "greedy", "milp"):
            assert np.all(best <= result.mean_time(policy, k) + 1e-15)
        assert result.milp_gap[k].shape == (2,)
        phy2log, log2phy, logcnt = result.placement(k)
        check_placement(phy2log, log2phy, logcnt, num_gpus=4)
    # Skewed routing, large batches: replicas beat static EP despite the extra weight reads.
    assert result.overall("deepseek", 2) < result.overall("static", 2)
    data = result.to_json()
    assert set(data["by_slots"]) == {"0", "2"}
    assert data["by_slots"]["2"]["policies"]["static"]["speedup_vs_static"] == 1.0


def test_phy2log_of_lists_slots_gpu_by_gpu():
    assert phy2log_of(np.array([[1, 0, 1], [0, 2, 0]])).tolist() == [0, 2, 1, 1]


def test_advise_rejects_bad_arguments(skewed):
    trace, _ = skewed
    model, hw = model_preset("gpt-oss-120b"), hardware_preset("h200x8")
    with pytest.raises(ValueError, match="slots must be non-negative"):
        advise(trace, model, hw, slots=(-1,))
    with pytest.raises(ValueError, match="milp_time must be a positive"):
        advise(trace, model, hw, milp_time=0)
    with pytest.raises(TypeError, match="trace must be a RoutingTrace"):
        advise("x", model, hw)


@pytest.mark.parametrize("engine", ["sglang", "vllm"])
def test_cli_writes_json_plot_and_placement(skewed, tmp_path, engine):
    _, path = skewed
    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # a second command keeps `advise` a sub-command
    out = tmp_path / "out"
    res = runner.invoke(app, ["advise", str(path), "--out", str(out), "--max-slots", "1",
                              "--slots", "1", "--milp-time", "0.3", "--engine", engine])
    assert res.exit_code == 0, res.output
    assert "Gain over static EP" in res.output and "use it:" in res.output
    data = json.loads((out / "advise.json").read_text())
    assert data["meta"]["engine"] == engine and set(data["by_slots"]) == {"0", "1"}
    assert (out / "advise.png").stat().st_size > 0
    phy2log, _, logcnt = read_placement(out / f"placement.{engine}.json", num_experts=16)
    assert phy2log.shape == (2, 20) and logcnt.sum() == 40
    res = runner.invoke(app, ["advise", str(path), "--out", str(out), "--engine", "trt"])
    assert res.exit_code != 0
    res = runner.invoke(app, ["advise", str(tmp_path / "missing.trace"), "--out", str(out)])
    assert res.exit_code == 1 and "error" in res.output
