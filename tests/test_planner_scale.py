"""Balance at scale: the growing move budget (k_max="scale") and the hierarchical planner
(probe.planner.hierarchical): independent checker, balance against the default greedy, errors."""

from __future__ import annotations

import numpy as np
import pytest

from probe.placement import sharded_home
from probe.planner import BalanceProblem, GreedyRules, check_plan, greedy_plan, solve
from probe.planner.check import rank_times
from probe.planner.cost import CostModel
from probe.planner.greedy_ref import greedy_ref
from probe.planner.hierarchical import hierarchical_plan, node_problem
from probe.specs import hardware_preset, model_preset
from probe.traces import generate


def ir(problem, plan) -> float:
    compute, comm = rank_times(problem, plan.assignment)
    times = compute + comm
    return float(times.max() / times.mean())


def two_level_cost(num_ranks, per_node, *, inter=8.0, transfer=4.0):
    """Equal links inside a node (token time 0.05, copy 1.0), dearer between nodes."""
    node = np.arange(num_ranks) // per_node
    same = node[:, None] == node[None, :]
    return CostModel(1.0, 0.1, np.where(same, 0.05, 0.05 * inter),
                     np.where(same, 1.0, transfer))


def random_problem(rng, num_nodes=None, per_node=None):
    per_node = per_node or int(rng.integers(2, 5))
    num_nodes = num_nodes or int(rng.integers(2, 4))
    num_ranks = per_node * num_nodes
    num_experts = num_ranks * int(rng.integers(1, 4))
    weight = rng.pareto(1.0, num_experts) + 0.05
    load = np.stack([rng.multinomial(int(rng.integers(50, 400)), weight / weight.sum())
                     for _ in range(num_ranks)])
    cost = two_level_cost(num_ranks, per_node, transfer=float(rng.choice([2.0, 8.0])))
    window = rng.uniform(1.0, 12.0, num_ranks)
    return BalanceProblem(load, sharded_home(num_experts, num_ranks), int(rng.integers(1, 4)),
                          window, cost), per_node


def test_scale_budget_grows_with_ranks_and_experts():
    rules = GreedyRules(k_max="scale")
    assert [rules.max_moves(g, e) for g, e in ((2, 4), (8, 128), (64, 256), (256, 256))] == [
        16, 136, 320, 512]
    with pytest.raises(ValueError, match="needs num_experts"):
        rules.max_moves(8)
    with pytest.raises(ValueError, match="'auto' or 'scale'"):
        GreedyRules(k_max="grow")


def test_scale_budget_is_the_resolved_budget_in_kernel_and_twin():
    problem, _ = random_problem(np.random.default_rng(4), num_nodes=2, per_node=3)
    moves = GreedyRules(k_max="scale").max_moves(problem.num_ranks, problem.num_experts)
    plan = greedy_plan(problem, GreedyRules(k_max="scale"))
    same = greedy_plan(problem, GreedyRules(k_max=moves))
    twin = greedy_ref(problem, GreedyRules(k_max="scale"))
    for other in (same, twin):
        np.testing.assert_array_equal(plan.assignment, other.assignment)
        np.testing.assert_array_equal(plan.replicas, other.replicas)


@pytest.mark.parametrize("seed", range(12))
def test_hierarchical_plan_passes_the_checker(seed):
    problem, per_node = random_problem(np.random.default_rng(seed))
    timings: dict = {}
    plan = hierarchical_plan(problem, per_node, GreedyRules(k_max="scale"), timings=timings)
    assert check_plan(problem, plan) == []
    assert timings["node_s"] >= 0 and timings["gpu_s"] > 0
    # Never worse than the static plan (both stages only take moves that lower the max).
    result = solve(problem, "static")
    assert ir(problem, plan) * plan_mean(problem, plan) <= result.objective * (1 + 1e-9)


def plan_mean(problem, plan):
    compute, comm = rank_times(problem, plan.assignment)
    return float((compute + comm).mean())


def test_node_problem_aggregates_the_ranks():
    problem, per_node = random_problem(np.random.default_rng(1), num_nodes=3, per_node=2)
    nodes = node_problem(problem, per_node)
    assert nodes.num_ranks == 3
    np.testing.assert_array_equal(nodes.load, problem.load.reshape(3, 2, -1).sum(axis=1))
    np.testing.assert_array_equal(nodes.home, problem.home.reshape(3, 2, -1).any(axis=1))
    np.testing.assert_array_equal(nodes.slots, problem.slots.reshape(3, 2).sum(axis=1))
    assert nodes.cost.beta == pytest.approx(problem.cost.beta / 2)
    assert nodes.cost.token_time[0, 1] == pytest.approx(0.4)  # the inter-node token time


def test_cross_node_copy_balances_nodes():
    # Two nodes of two GPUs; node 0 holds the one hot expert (expert 0), node 1 idles. With a
    # window that takes a cross-node copy, the node stage copies it to node 1.
    cost = two_level_cost(4, 2, inter=1.0, transfer=2.0)
    load = np.zeros((4, 4), np.int64)
    load[:, 0] = 200
    problem = BalanceProblem(load, sharded_home(4, 4), 1, 10.0, cost)
    plan = hierarchical_plan(problem, 2)
    assert check_plan(problem, plan) == []
    assert plan.replicas[2:, 0].any()  # a copy on node 1
    assert ir(problem, plan) < ir(problem, solve(problem, "static").plan)


def test_scale_and_hierarchical_beat_the_default_at_ep64():
    # The default decode load at ep=64 / 256 experts on 8 nodes (one layer): the default
    # 16 moves leave IR ~1.56; the growing budget and the hierarchical planner go lower.
    cost = CostModel.from_specs(model_preset("deepseek-v3"), hardware_preset("h200x8-n8"))
    trace = generate("decode", num_steps=2, tokens_per_step=768 * 64, num_layers=1,
                     num_experts=256, top_k=8, num_ranks=64, seed=1)
    problem = BalanceProblem.from_load(trace.load_counts()[1, 0], cost, slots=2)
    default = greedy_plan(problem)
    scale = greedy_plan(problem, GreedyRules(k_max="scale"))
    hier = hierarchical_plan(problem, 8, GreedyRules(k_max="scale"))
    for plan in (default, scale, hier):
        assert check_plan(problem, plan) == []
    assert ir(problem, default) > 1.4
    assert ir(problem, scale) < 1.15
    assert ir(problem, hier) < ir(problem, default) - 0.1


def test_solve_hierarchical():
    problem, per_node = random_problem(np.random.default_rng(7), num_nodes=2, per_node=4)
    result = solve(problem, "hierarchical", ranks_per_node=per_node)
    assert result.status == "feasible" and result.plan is not None
    assert "replicas" in result.message
    small = BalanceProblem(problem.load[:4, :4], sharded_home(4, 4), 1, 1.0,
                           CostModel.uniform(4, alpha=1.0, beta=0.1, token_time=0.1,
                                             transfer_time=1.0))
    flat = greedy_plan(small)  # fewer than 8 ranks: one node, the flat greedy
    np.testing.assert_array_equal(solve(small, "hierarchical").plan.assignment, flat.assignment)


def test_hierarchical_bad_arguments():
    problem, per_node = random_problem(np.random.default_rng(2), num_nodes=2, per_node=3)
    for bad in (0, 4, -3):
        with pytest.raises(ValueError, match="ranks_per_node must be >= 1 and divide"):
            hierarchical_plan(problem, bad)
    for bad in (True, 2.0, "3"):
        with pytest.raises(TypeError, match="ranks_per_node must be an int"):
            hierarchical_plan(problem, bad)
    with pytest.raises(TypeError, match="problem must be a BalanceProblem"):
        hierarchical_plan("problem", 3)
    with pytest.raises(TypeError, match="rules must be a GreedyRules or a ParallelRules"):
        hierarchical_plan(problem, 3, rules={"k_max": 4})
    with pytest.raises(TypeError, match="node_rules must be a GreedyRules or a ParallelRules"):
        hierarchical_plan(problem, 3, node_rules=16)
    with pytest.raises(TypeError, match="timings must be a dict"):
        hierarchical_plan(problem, 3, timings=[])


def test_scale_study_quick(tmp_path):
    import json

    from experiments.planner.scale import PLANNERS, main

    out = tmp_path / "scale.json"
    main(["--quick", "--out", str(out)])
    data = json.loads(out.read_text())
    assert [r["ranks"] for r in data["results"]] == [8, 16, 16]
    for res in data["results"]:
        assert [row["planner"] for row in res["rows"]] == list(PLANNERS)
        static, default = res["rows"][0], res["rows"][1]
        assert default["ir"] < static["ir"]
    assert "Against the target" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".manifest.json").exists()
    for res in data["results"]:  # the parallel greedy's rows carry their rounds
        rows = {row["planner"]: row for row in res["rows"]}
        assert 1 <= rows["parallel greedy, 16 rounds"]["rounds"] <= 16
        assert rows["greedy k_max=16"]["rounds"] is None
    # --only parallel reruns those rows alone and keeps the others as they were.
    main(["--quick", "--only", "parallel", "--out", str(out)])
    again = json.loads(out.read_text())
    assert again["machine"]["only"] == "parallel"
    for old, new in zip(data["results"], again["results"], strict=True):
        assert [row["planner"] for row in new["rows"]] == list(PLANNERS)
        for before, after in zip(old["rows"], new["rows"], strict=True):
            if not after["planner"].startswith("parallel"):
                assert after == before
            else:
                assert after["ir"] == before["ir"]  # the same plans, timed again
    assert "--only parallel" in out.with_suffix(".md").read_text()


@pytest.mark.parametrize("seed", range(6))
def test_hierarchical_with_the_parallel_greedy(seed):
    """ParallelRules run the parallel greedy in the node and GPU stages: checked plans, never
    worse than static, and the kernel that ran is the parallel one (its plan on one node)."""
    from probe.planner.parallel import parallel_plan
    from probe.planner.parallel_ref import ParallelRules

    problem, per_node = random_problem(np.random.default_rng(seed))
    rules = ParallelRules(max_rounds=8)
    plan = hierarchical_plan(problem, per_node, rules, node_rules=ParallelRules(max_rounds=4))
    assert check_plan(problem, plan) == []
    static = solve(problem, "static").objective
    assert ir(problem, plan) * plan_mean(problem, plan) <= static * (1 + 1e-9)
    flat = hierarchical_plan(problem, problem.num_ranks, rules)
    np.testing.assert_array_equal(flat.assignment, parallel_plan(problem, rules).assignment)
