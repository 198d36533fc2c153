"""probe.engines: the EPLB-compatible policy backed by the planner, and placement files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from probe.engines import (
    check_placement,
    gpu_load,
    placement_imbalance,
    probe_rebalance_experts,
    read_placement,
    write_placement,
)
from probe.planner.cost import CostModel
from probe.planner.deepseek_eplb import rebalance_experts

# DeepSeek's published example: 2 layers, 12 experts in 4 groups, 16 slots, 2 nodes of 4 GPUs.
EXAMPLE = np.array([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                    [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])


def assert_valid(weight, phy2log, log2phy, logcnt, num_replicas, num_gpus):
    num_layers, num_experts = np.asarray(weight).shape
    assert phy2log.shape == (num_layers, num_replicas)
    assert log2phy.shape == (num_layers, num_experts, num_replicas - num_experts + 1)
    assert logcnt.shape == (num_layers, num_experts)
    assert phy2log.dtype == log2phy.dtype == logcnt.dtype == np.int64
    assert np.all(logcnt >= 1)
    assert np.all(logcnt.sum(axis=1) == num_replicas)
    check_placement(phy2log, log2phy, logcnt, num_gpus=num_gpus)
    for layer in range(num_layers):  # log2phy lists each expert's slots in increasing order
        for e in range(num_experts):
            listed = log2phy[layer, e][log2phy[layer, e] >= 0]
            assert listed.tolist() == np.flatnonzero(phy2log[layer] == e).tolist()


@pytest.mark.parametrize("method", ["greedy", "lp"])
@pytest.mark.parametrize("home", ["packed", "sharded"])
def test_published_example_gives_a_valid_layout(method, home):
    phy2log, log2phy, logcnt = probe_rebalance_experts(EXAMPLE, 16, 4, 2, 8, method=method,
                                                       home=home)
    assert_valid(EXAMPLE, phy2log, log2phy, logcnt, 16, 8)
    ir = placement_imbalance(EXAMPLE, phy2log, 8)
    assert np.all(ir >= 1.0) and np.all(ir < 1.5)


def test_sharded_home_keeps_static_ep_experts_first_on_each_gpu():
    phy2log, _, _ = probe_rebalance_experts(EXAMPLE, 16, 4, 2, 8, home="sharded")
    # Sharded home of 12 experts on 8 GPUs (expert e on GPU e * 8 // 12): 2, 1, 2, 1, ...
    starts = [[0, 1], [2], [3, 4], [5], [6, 7], [8], [9, 10], [11]]
    for layer in range(2):
        blocks = phy2log[layer].reshape(8, 2)
        for g, home in enumerate(starts):
            assert blocks[g, :len(home)].tolist() == home


def test_packed_home_puts_heaviest_experts_on_distinct_gpus():
    weight = np.array([[100, 90, 80, 70, 1, 1, 1, 1]])
    phy2log, _, logcnt = probe_rebalance_experts(weight, 8, 1, 1, 4, home="packed")
    # R = E: no redundant slot, so the layout is the packing itself, one heavy expert a GPU.
    assert logcnt.tolist() == [[1] * 8]
    blocks = phy2log[0].reshape(4, 2)
    assert sorted(blocks[:, 0].tolist()) == [0, 1, 2, 3]
    assert gpu_load(weight, phy2log, 4).tolist() == [[101.0, 91.0, 81.0, 71.0]]


def test_unused_slots_are_filled_by_load_per_copy():
    # An idle layer: the planner adds nothing, all 4 redundant slots come from the fill rule.
    weight = np.array([[0, 0, 0, 0], [8, 0, 0, 0]])
    phy2log, log2phy, logcnt = probe_rebalance_experts(weight, 8, 1, 1, 2)
    assert_valid(weight, phy2log, log2phy, logcnt, 8, 2)
    # Layer 1: expert 0 has all the load, so it takes every redundant slot it is offered.
    assert logcnt[1, 0] >= 3
    assert placement_imbalance(weight, phy2log, 2)[0] == 1.0


@pytest.mark.parametrize("seed", range(6))
def test_random_weights_give_valid_layouts(seed):
    rng = np.random.default_rng(seed)
    num_gpus = int(rng.choice([2, 4, 8]))
    num_experts = num_gpus * int(rng.integers(1, 6)) + int(rng.integers(0, num_gpus))
    per_gpu = -(-num_experts // num_gpus) + int(rng.integers(0, 3))
    weight = rng.pareto(1.5, (3, num_experts)) * 50
    weight[0, rng.integers(num_experts)] = 0.0
    for home in ("packed", "sharded"):
        out = probe_rebalance_experts(weight, per_gpu * num_gpus, 1, 1, num_gpus, home=home)
        assert_valid(weight, *out, per_gpu * num_gpus, num_gpus)


def test_cost_model_is_used_and_checked():
    cost = CostModel.uniform(8, alpha=1.0, beta=1.0, token_time=0.0, transfer_time=0.0)
    out = probe_rebalance_experts(EXAMPLE, 16, 4, 2, 8, cost=cost)
    assert_valid(EXAMPLE, *out, 16, 8)
    with pytest.raises(ValueError, match="cost is for 4 ranks"):
        probe_rebalance_experts(EXAMPLE, 16, 4, 2, 8, cost=CostModel.uniform(
            4, alpha=0.0, beta=1.0, token_time=0.0, transfer_time=0.0))
    with pytest.raises(TypeError, match="cost must be a CostModel"):
        probe_rebalance_experts(EXAMPLE, 16, 4, 2, 8, cost="h200")


@pytest.mark.parametrize("args, kwargs, error, match", [
    ((np.ones(4), 4, 1, 1, 2), {}, ValueError, "weight must be a numeric"),
    ((np.array([[1.0, np.nan]]), 2, 1, 1, 2), {}, ValueError, "finite, non-negative"),
    ((np.array([[1.0, -1.0]]), 2, 1, 1, 2), {}, ValueError, "finite, non-negative"),
    ((EXAMPLE, 10, 4, 2, 2), {}, ValueError, "num_replicas .* >= the number of experts"),
    ((EXAMPLE, 15, 4, 2, 8), {}, ValueError, "multiple of num_gpus"),
    ((EXAMPLE, 16, 4, 3, 8), {}, ValueError, "num_gpus .* multiple of num_nodes"),
    ((EXAMPLE, 16, 5, 2, 8), {}, ValueError, "num_groups .* must divide"),
    ((EXAMPLE, 16, 4, 2, 16), {}, ValueError, "num_gpus .* <= the number of experts"),
    ((EXAMPLE, 16, 4, 2, 8), {"home": "random"}, ValueError, "home must be one of"),
    ((EXAMPLE, True, 4, 2, 8), {}, TypeError, "num_replicas must be an int"),
    ((EXAMPLE, 16, 4, 2, 8.0), {}, TypeError, "num_gpus must be an int"),
    ((EXAMPLE, 16, 0, 2, 8), {}, ValueError, "num_groups must be >= 1"),
])
def test_bad_inputs_name_the_argument(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        probe_rebalance_experts(*args, **kwargs)


def test_imbalance_matches_the_documented_deepseek_example():
    phy2log, _, _ = rebalance_experts(EXAMPLE, 16, 4, 2, 8)
    # docs/eplb.md: layer 0's GPU loads and IR 1.21.
    assert gpu_load(EXAMPLE, phy2log, 8)[0].tolist() == [121.5, 86.5, 125.0, 113.0, 147.5,
                                                         131.5, 156.0, 152.0]
    assert placement_imbalance(EXAMPLE, phy2log, 8)[0] == pytest.approx(156.0 / 129.125)


# ----------------------------------------------------------------- placement files


@pytest.mark.parametrize("engine", ["sglang", "vllm", "json"])
def test_round_trip_of_probe_layout(tmp_path, engine):
    maps = probe_rebalance_experts(EXAMPLE, 16, 4, 2, 8)
    path = write_placement(tmp_path / "placement.json", *maps, engine=engine)
    back = read_placement(path, num_experts=12)
    for a, b in zip(maps, back, strict=True):
        assert a.dtype == b.dtype == np.int64
        assert np.array_equal(a, b)


def test_sglang_file_holds_only_the_physical_to_logical_map(tmp_path):
    phy2log, log2phy, logcnt = rebalance_experts(EXAMPLE, 16, 4, 2, 8)
    path = write_placement(tmp_path / "p.json", phy2log, log2phy, logcnt, engine="sglang")
    data = json.loads(path.read_text())
    assert list(data) == ["physical_to_logical_map"]
    assert data["physical_to_logical_map"] == phy2log.tolist()
    back_phy, back_log, back_cnt = read_placement(path)
    assert np.array_equal(back_phy, phy2log) and np.array_equal(back_cnt, logcnt)
    # DeepSeek's log2phy lists copies in grant order; the rebuilt one in slot order.
    assert np.array_equal(np.sort(np.where(back_log < 0, 99, back_log), axis=2),
                          np.sort(np.where(log2phy < 0, 99, log2phy), axis=2))


def test_probe_json_keeps_deepseek_replica_order(tmp_path):
    maps = rebalance_experts(EXAMPLE, 16, 4, 2, 8)
    path = write_placement(tmp_path / "p.json", *maps, engine="json")
    for a, b in zip(maps, read_placement(path), strict=True):
        assert np.array_equal(a, b)


def test_vllm_file_keeps_deepseek_order_under_vllm_names(tmp_path):
    maps = rebalance_experts(EXAMPLE, 16, 4, 2, 8)
    path = write_placement(tmp_path / "p.json", *maps, engine="vllm")
    data = json.loads(path.read_text())
    assert list(data) == ["physical_to_logical_map", "logical_to_physical_map",
                          "logical_replica_count"]
    for a, b in zip(maps, read_placement(path, num_experts=12), strict=True):
        assert np.array_equal(a, b)
    data["logical_replica_count"][0][0] += 1
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="logcnt"):
        read_placement(path)
    with pytest.raises(ValueError, match="holds 12 experts, expected 13"):
        read_placement(write_placement(path, *maps, engine="vllm"), num_experts=13)


def test_sglang_reader_needs_num_experts_for_an_unused_top_expert(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"physical_to_logical_map": [[0, 1, 2, 0]]}))
    assert read_placement(path)[2].tolist() == [[2, 1, 1]]
    with pytest.raises(ValueError, match="expert 3 has no slot"):
        read_placement(path, num_experts=4)


def test_write_rejects_bad_engine_and_inconsistent_maps(tmp_path):
    phy2log, log2phy, logcnt = rebalance_experts(EXAMPLE, 16, 4, 2, 8)
    with pytest.raises(ValueError, match="engine must be one of"):
        write_placement(tmp_path / "p.json", phy2log, log2phy, logcnt, engine="tensorrt")
    bad_count = logcnt.copy()
    bad_count[0, 0] += 1
    with pytest.raises(ValueError, match=r"logcnt\[0\] = 2 but phy2log has 1"):
        write_placement(tmp_path / "p.json", phy2log, log2phy, bad_count)
    # log2phy of expert 0 (layer 0, slot 12) pointing at slot 13, which holds expert 1.
    bad_log = log2phy.copy()
    bad_log[0, 0, 0] = 13
    with pytest.raises(ValueError, match=r"log2phy\[0\] = \[13"):
        write_placement(tmp_path / "p.json", phy2log, bad_log, logcnt)
    with pytest.raises(ValueError, match="shapes disagree"):
        write_placement(tmp_path / "p.json", phy2log, log2phy[:1], logcnt)
    with pytest.raises(ValueError, match="integer array with 2 dimensions"):
        write_placement(tmp_path / "p.json", phy2log[0], log2phy, logcnt)
    with pytest.raises(ValueError, match="not a multiple of num_gpus"):
        check_placement(phy2log, log2phy, logcnt, num_gpus=3)
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize("text, match", [
    ("not json", "cannot read as JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"logical_count": [[1]]}', "expected a JSON object"),
    ('{"physical_to_logical_map": [[0, 1], [0]]}', "not a rectangular array"),
    ('{"physical_to_logical_map": [0, 1]}', "must be a 2-D array"),
    ('{"physical_to_logical_map": [[0.5, 1]]}', "array of integers"),
    ('{"physical_to_logical_map": [[0, -1]]}', "expert ids >= 0"),
    ('{"physical_to_logical_map": [[0, 1]], "num_layers": 1}', "holds only"),
    ('{"format": "probe-placement", "version": 2, "physical_to_logical_map": [[0]]}',
     "unsupported probe-placement version 2"),
    ('{"format": "probe-placement", "version": 1, "physical_to_logical_map": [[0]]}',
     "has no 'logical_to_physical_map'"),
    ('{"format": "probe-placement", "version": 1, "physical_to_logical_map": [[0, 0]], '
     '"logical_to_physical_map": [[[0, 1]]], "logical_count": [[1]]}',
     r"logcnt\[0\] = 1 but phy2log has 2"),
    ('{"format": "probe-placement", "version": 1, "physical_to_logical_map": [[0, 1]], '
     '"logical_to_physical_map": [[[1]], [[0]]], "logical_count": [[1, 1]]}',
     "shapes disagree"),
    ('{"format": "probe-placement", "version": 1, "physical_to_logical_map": [[0, 1]], '
     '"logical_to_physical_map": [[[1], [0]]], "logical_count": [[1, 1]]}',
     r"log2phy\[0\] = \[1\] does not list exactly expert 0's slots \[0\]"),
])
def test_malformed_files_are_rejected(tmp_path, text, match):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        read_placement(path)


def test_reader_checks_expected_expert_count(tmp_path):
    path = write_placement(tmp_path / "p.json", *rebalance_experts(EXAMPLE, 16, 4, 2, 8),
                           engine="json")
    with pytest.raises(ValueError, match="holds 12 experts, expected 13"):
        read_placement(path, num_experts=13)
    sg = write_placement(tmp_path / "s.json", *rebalance_experts(EXAMPLE, 16, 4, 2, 8))
    with pytest.raises(ValueError, match="R >= E"):
        read_placement(sg, num_experts=17)


# ----------------------------------------------------------------- command line


def test_cli_write_and_compare(tmp_path):
    import typer
    from typer.testing import CliRunner

    from probe.engines_cli import register

    app = typer.Typer()
    register(app)
    runner = CliRunner()
    weights = tmp_path / "w.npy"
    np.save(weights, EXAMPLE)
    out = tmp_path / "placement.json"
    result = runner.invoke(app, ["placement", "write", str(weights), "--out", str(out),
                                 "--replicas", "16", "--gpus", "8", "--groups", "4",
                                 "--nodes", "2", "--policy", "deepseek"])
    assert result.exit_code == 0, result.output
    assert "mean IR 1.225" in result.output  # (1.208 + 1.242) / 2, docs/eplb.md's layouts
    phy2log, _, _ = read_placement(out)
    assert np.array_equal(phy2log, rebalance_experts(EXAMPLE, 16, 4, 2, 8)[0])
    history = tmp_path / "history.json"
    history.write_text(json.dumps({"load_history": [
        {"logical_expert_load": EXAMPLE.tolist()}]}))
    result = runner.invoke(app, ["placement", "write", str(history), "--out", str(out),
                                 "--replicas", "16", "--gpus", "8", "--engine", "json"])
    assert result.exit_code == 0, result.output
    assert len(read_placement(out)) == 3
    result = runner.invoke(app, ["placement", "write", str(weights), "--out", str(out),
                                 "--replicas", "15", "--gpus", "8"])
    assert result.exit_code != 0 and "multiple of num_gpus" in result.output
    result = runner.invoke(app, ["placement", "compare", "--experts", "16", "--gpus", "4",
                                 "--replicas", "20", "--layers", "2"])
    assert result.exit_code == 0, result.output
    assert [line.split()[0] for line in result.output.splitlines()] == ["deepseek", "greedy",
                                                                        "lp"]
