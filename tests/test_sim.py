"""Tests of the simulator (probe.sim): hand-computed layer time, invariants between policies."""

from __future__ import annotations

import json

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from probe.planner.cost import CostModel
from probe.planner.problem import Plan
from probe.sim import AttentionModel, make_predictor, resplit_load, simulate
from probe.sim.calibration import calibrated_attention, calibrated_hardware
from probe.sim.cli import register
from probe.planner.eplb import eplb_placement
from probe.planner.problem import BalanceProblem
from probe.sim.policies import apply_plan, rebalance_transfer
from probe.specs import HardwareSpec, ModelSpec, hardware_preset, model_preset
from probe.traces import generate
from probe.traces.trace import RoutingTrace

TINY_MODEL = ModelSpec("tiny", num_layers=1, num_experts=2, top_k=1, hidden=64, expert_ffn=32)
TINY_HW = HardwareSpec("tiny-hw", num_ranks=2, ranks_per_node=2, intra_node_bw=1e9,
                       inter_node_bw=1e8, peak_flops=1e12, hbm_bw=1e11,
                       launch_overhead_s=1e-6, gemm_efficiency=((1, 0.5),))


def _tiny_trace() -> RoutingTrace:
    # One step, one layer, top-1: rank 0 sends 2 tokens to expert 0 and 1 to expert 1,
    # rank 1 sends 1 token to expert 0.
    experts = np.array([0, 0, 1, 0]).reshape(4, 1, 1)
    return RoutingTrace.from_arrays(num_experts=2, num_ranks=2, step_offsets=[0, 4],
                                    src_rank=[0, 0, 0, 1], experts=experts)


def test_layer_time_matches_hand_computation():
    attention = AttentionModel(decode=((1, 1e-5), (4, 4e-5)), prefill=((1, 1e-5),))
    result = simulate(_tiny_trace(), model=TINY_MODEL, hardware=TINY_HW, policies=("static",),
                      attention=attention, progress=False)
    weight_bytes = 3 * 64 * 32 * 2
    alpha = weight_bytes / 1e11 + 1e-6
    beta = (2 * 3 * 64 * 32) / (1e12 * 0.5)
    token_time = 64 * 2 / 1e9
    # Rank 0 runs expert 0 on 3 tokens (2 local, 1 from rank 1); rank 1 runs expert 1 on 1
    # token from rank 0. Each rank sends and receives one token: comm = 2 * token_time.
    moe = max(alpha + 3 * beta, alpha + beta) + 2 * token_time
    attn = 3e-5  # rank 0 holds 3 tokens, the slowest attention
    got = result.metrics["static"]
    assert got["moe"][0, 0] == pytest.approx(moe, rel=1e-12)
    assert got["attention"][0, 0] == pytest.approx(attn, rel=1e-12)
    assert got["layer_time"][0, 0] == pytest.approx(attn + moe, rel=1e-12)
    assert got["imbalance"][0, 0] == pytest.approx(3 / 2)
    assert result.step_time("static")[0] == pytest.approx(attn + moe)  # 1 model layer


def _balanced_trace(num_ranks=4, num_experts=8, top_k=2, steps=3, layers=2) -> RoutingTrace:
    # Every rank sends exactly one token to every expert in every layer.
    per_rank = num_experts // top_k
    experts = []
    for _ in range(steps):
        for _s in range(num_ranks):
            for j in range(per_rank):
                row = [(top_k * j + k) for k in range(top_k)]
                experts.append([row] * layers)
    experts = np.array(experts)
    tokens = num_ranks * per_rank
    src = np.tile(np.repeat(np.arange(num_ranks), per_rank), steps)
    return RoutingTrace.from_arrays(num_experts=num_experts, num_ranks=num_ranks,
                                    step_offsets=np.arange(steps + 1) * tokens, src_rank=src,
                                    experts=experts)


def test_static_on_balanced_trace_has_ir_one():
    model = ModelSpec("bal", num_layers=2, num_experts=8, top_k=2, hidden=64, expert_ffn=32)
    hw = hardware_preset("h200x8").with_ranks(4)
    hw = HardwareSpec("bal-hw", num_ranks=4, ranks_per_node=4, intra_node_bw=hw.intra_node_bw,
                      inter_node_bw=hw.inter_node_bw, peak_flops=hw.peak_flops,
                      hbm_bw=hw.hbm_bw)
    result = simulate(_balanced_trace(), model=model, hardware=hw,
                      policies=("static", "probe", "oracle"), progress=False)
    for policy in ("static", "probe", "oracle"):
        np.testing.assert_array_equal(result.metrics[policy]["imbalance"], 1.0)
    # Nothing to balance: the planner adds no replica.
    assert result.metrics["oracle"]["replicas"].sum() == 0


@pytest.fixture(scope="module")
def skewed():
    trace = generate("repeat", num_steps=12, tokens_per_step=8 * 256, num_layers=3,
                     num_experts=128, top_k=4, num_ranks=8, seed=3)
    model = model_preset("gpt-oss-120b")
    hw = hardware_preset("h200x8")
    attention = AttentionModel.roofline(model, hw)
    return trace, model, hw, attention


def test_oracle_never_slower_than_static_and_perfect_probe_equals_oracle(skewed):
    trace, model, hw, attention = skewed
    result = simulate(trace, model=model, hardware=hw, attention=attention, progress=False,
                      policies=("static", "probe", "oracle"), predictor="perfect")
    static = result.metrics["static"]["layer_time"]
    oracle = result.metrics["oracle"]["layer_time"]
    assert np.all(oracle <= static * (1 + 1e-12))
    assert oracle.mean() < 0.95 * static.mean()  # the repeat workload is skewed
    for name in ("layer_time", "imbalance", "bytes_moved", "replicas", "exposed"):
        np.testing.assert_array_equal(result.metrics["probe"][name],
                                      result.metrics["oracle"][name])


def test_probe_with_noisy_prediction_still_balances_and_eplb_rebalances(skewed):
    trace, model, hw, attention = skewed
    result = simulate(trace, model=model, hardware=hw, attention=attention, progress=False,
                      policies=("static", "eplb", "eplb_addcopies", "probe",
                                "probe-unbounded"),
                      predictor="topk:0.8", eplb_interval=5, eplb_window=5)
    ir = {p: result.metrics[p]["imbalance"].mean() for p in result.policies}
    assert ir["probe"] < ir["static"] - 0.2
    for policy in ("eplb", "eplb_addcopies"):
        eplb = result.metrics[policy]
        # Static before the first rebalance at step 5 (add-copies: bit for bit; DeepSeek's
        # routing sums its terms in another order); bytes only at rebalances.
        np.testing.assert_allclose(eplb["layer_time"][:5], result.metrics["static"]
                                   ["layer_time"][:5], rtol=1e-12 if policy == "eplb" else 0)
        moved_steps = np.flatnonzero(eplb["bytes_moved"].sum(axis=1) > 0)
        assert set(moved_steps.tolist()) <= {5, 10} and 5 in moved_steps
        assert np.all(eplb["exposed"][5] > 0)
    # add-copies: replicas after the first rebalance; DeepSeek's EPLB re-packs the layout
    # (no replicas on top of it) and balances better than static once it has one.
    assert np.all(result.metrics["eplb_addcopies"]["replicas"][5:] > 0)
    assert result.metrics["eplb"]["imbalance"][5:].mean() \
        < result.metrics["static"]["imbalance"][5:].mean() - 0.1
    # The window-bounded plan never exposes transfer; the unbounded one is never slower in MoE.
    assert result.metrics["probe"]["exposed"].max() == 0.0
    assert result.metrics["probe-unbounded"]["replicas"].mean() >= \
        result.metrics["probe"]["replicas"].mean()


def test_resplit_preserves_tokens_and_matches_trace_ranks(skewed):
    trace = skewed[0]
    same = resplit_load(trace, 8, slice(0, 2))
    np.testing.assert_array_equal(same, trace.load_counts(slice(0, 2)))
    four = resplit_load(trace, 4, slice(0, 2))
    assert four.shape == (2, 3, 4, 128)
    np.testing.assert_array_equal(four.sum(axis=2), same.sum(axis=2))
    # Contiguous blocks: new rank r holds old ranks 2r and 2r+1.
    np.testing.assert_array_equal(four, same.reshape(2, 3, 4, 2, 128).sum(axis=3))


def test_apply_plan_conserves_tokens_and_respects_placement():
    rng = np.random.default_rng(0)
    home = np.eye(4, dtype=bool).repeat(2, axis=1)  # [4, 8]
    replicas = np.zeros((4, 8), bool)
    replicas[1, 0] = replicas[2, 0] = True
    sources = np.where(replicas, 0, -1)
    for _ in range(20):
        pred = rng.integers(0, 6, size=(4, 8))
        holders = home | replicas
        planned = np.zeros((4, 8, 4), np.int64)
        for s in range(4):
            for e in range(8):
                ranks = np.flatnonzero(holders[:, e])
                planned[s, e] = np.bincount(rng.choice(ranks, pred[s, e]), minlength=4)
        true = rng.integers(0, 9, size=(4, 8))
        out = apply_plan(Plan(replicas, sources, planned), true, home)
        np.testing.assert_array_equal(out.assignment.sum(axis=2), true)
        assert not np.any((out.assignment > 0) & ~holders.T[None])


def test_rebalance_transfer_of_eplb_placement():
    home = np.eye(4, dtype=bool).repeat(2, axis=1)
    load = np.array([100.0, 1, 1, 1, 1, 1, 1, 1])
    cost = CostModel.uniform(4, alpha=0.0, beta=1.0, token_time=0.0, transfer_time=1.0)
    problem = BalanceProblem(np.zeros((4, 8), int), home, 1, np.inf, cost)
    replicas, sources = eplb_placement(load, problem)
    assert replicas[:, 0].sum() == 3 and not np.any(replicas & home)  # hot expert copied 3x
    assert np.all(sources[replicas[:, 0], 0] == 0)
    tt = 1.0 - np.eye(4)
    seconds, moved = rebalance_transfer(np.zeros_like(replicas), replicas, sources, tt)
    assert moved == replicas.sum() and seconds == pytest.approx(3.0)  # rank 0 sends 3
    only_hot = replicas.copy()
    only_hot[:, 1:] = False
    # Keeping the hot expert's copies, only the others move.
    assert rebalance_transfer(only_hot, replicas, sources, tt)[1] == replicas.sum() - 3
    assert rebalance_transfer(replicas, replicas, sources, tt) == (0.0, 0)


def test_predictors():
    true = np.array([[5, 3, 0, 2], [0, 0, 7, 1]])
    prev = np.array([[1, 1, 1, 1], [2, 0, 0, 0]])
    for spec in ("topk:0.7", "previous", "perfect"):
        pred = make_predictor(spec, seed=2)(true, prev, 0, 0)
        np.testing.assert_array_equal(pred.sum(axis=1), true.sum(axis=1))
    np.testing.assert_array_equal(make_predictor("previous")(true, prev, 1, 0),
                                  [[3, 3, 2, 2], [8, 0, 0, 0]])
    np.testing.assert_array_equal(make_predictor("topk:1.0")(true, prev, 1, 0), true)
    with pytest.raises(ValueError, match="unknown predictor"):
        make_predictor("oracle")
    with pytest.raises(ValueError, match="accuracy"):
        make_predictor("topk:1.5")


def test_simulate_validates_arguments():
    trace = _tiny_trace()
    with pytest.raises(ValueError, match="experts"):
        simulate(trace, model=model_preset("gpt-oss-120b"), hardware=TINY_HW, progress=False)
    with pytest.raises(ValueError, match="policies"):
        simulate(trace, model=TINY_MODEL, hardware=TINY_HW, policies=("lru",), progress=False)
    with pytest.raises(ValueError, match="ep"):
        simulate(trace, model=TINY_MODEL, hardware=TINY_HW, ep=4, progress=False)
    with pytest.raises(ValueError, match="predicted loads"):
        simulate(trace, model=TINY_MODEL, hardware=TINY_HW, policies=("probe",),
                 predictor=np.zeros((2, 1, 2, 2)), progress=False)


def _fake_calibration(path):
    model = model_preset("gpt-oss-120b")
    peak, hbm, alpha, beta = 8e14, 4e12, 3e-5, 8e-8
    rows = [{"tokens_per_expert": n, "seconds_per_expert": alpha + beta * n,
             "eta": n * model.flops_per_token / ((alpha + beta * n) * peak)}
            for n in (1, 64, 1024, 8192)]
    data = {"command": "python3 benchmarks/calibrate_h200.py --device cuda", "device": "fake",
            "copy": {"bandwidth": hbm}, "matmul": {"flops": peak},
            "models": {"gpt-oss-120b": {
                "experts": rows,
                "fit": {"alpha": alpha, "beta": beta,
                        "eta_inf": model.flops_per_token / (beta * peak)},
                "attention": {"decode": [{"batch": 512, "kv_len": 2048, "seconds": 1e-4},
                                         {"batch": 1024, "kv_len": 2048, "seconds": 2e-4}],
                              "prefill": [{"chunk": 8192, "seconds": 2e-3}]}}}}
    path.write_text(json.dumps(data))
    return alpha, beta


def test_calibrated_hardware_reproduces_fit(tmp_path):
    path = tmp_path / "cal.json"
    alpha, beta = _fake_calibration(path)
    hw = calibrated_hardware("h200x8-n2", "gpt-oss-120b", path=path)
    assert hw.num_ranks == 16 and hw.source.startswith("measured: python3 benchmarks")
    cost = CostModel.from_specs(model_preset("gpt-oss-120b"), hw)
    assert cost.alpha == pytest.approx(alpha) and cost.beta == pytest.approx(beta)
    att = calibrated_attention("gpt-oss-120b", path=path)
    assert att.seconds(768, 1) == pytest.approx(1.5e-4)
    with pytest.raises(ValueError, match="no calibration"):
        calibrated_hardware("h200x8", "qwen3-235b-a22b", path=path)
    with pytest.raises(ValueError, match="H200"):
        calibrated_hardware("h100x8", "gpt-oss-120b", path=path)


@pytest.mark.slow
def test_cli_simulate_writes_table_and_files(tmp_path):
    trace = generate("decode", num_steps=4, tokens_per_step=8 * 64, num_layers=2,
                     num_experts=128, top_k=4, num_ranks=8, seed=1)
    path = tmp_path / "t.trace.safetensors"
    trace.save(path)
    app = typer.Typer()
    register(app)

    @app.callback()
    def _root() -> None:
        """test app"""

    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["simulate", str(path), "--policies", "static,probe",
                                   "--no-progress", "--no-calibration", "--out", str(out)],
                           env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "static" in res.output and "probe" in res.output and "IR mean" in res.output
    assert (out / "t.csv").exists()
    assert (out / "t_timeline.png").exists()  # matplotlib is in the test extra
    summary = json.loads((out / "t.summary.json").read_text())
    assert [s["policy"] for s in summary["summary"]] == ["static", "probe"]
    bad = CliRunner().invoke(app, ["simulate", str(path), "--policies", "nope",
                                   "--no-progress"])
    assert bad.exit_code == 2 and "policies" in bad.output


def test_given_predictions_and_unbounded_window_across_nodes():
    # Two nodes (ep = 16): copies across the 50 GB/s NIC do not fit the window. The bounded
    # plan never exposes transfer; the unbounded one does, and pays for it.
    model = model_preset("gpt-oss-120b")
    trace = generate("repeat", num_steps=2, tokens_per_step=16 * 256, num_layers=1,
                     num_experts=128, top_k=4, num_ranks=16, seed=5)
    hw = hardware_preset("h200x8-n2")
    att = AttentionModel.roofline(model, hw)
    truth = trace.load_counts()
    result = simulate(trace, model=model, hardware=hw, attention=att, progress=False,
                      policies=("probe", "probe-unbounded", "oracle"), predictor=truth)
    probe, unbounded = result.metrics["probe"], result.metrics["probe-unbounded"]
    np.testing.assert_array_equal(probe["layer_time"], result.metrics["oracle"]["layer_time"])
    assert probe["exposed"].max() == 0.0
    assert unbounded["exposed"].min() > 0.0
    assert np.all(unbounded["layer_time"] > probe["layer_time"])
