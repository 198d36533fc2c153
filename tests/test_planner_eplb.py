"""EPLB maps (both directions consistent), the EPLB-style baseline and DeepSeek's EPLB proper."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import instances

from probe.placement import imbalance_ratio, sharded_home
from probe.planner.check import check_plan, evaluate_plan
from probe.planner.cost import CostModel
from probe.planner.deepseek_eplb import (
    balanced_packing,
    eplb_layout,
    eplb_problem,
    rebalance_experts,
    replicate_experts,
)
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
    for plan in (greedy_plan(problem), solve(problem, "eplb_addcopies").plan):
        assert_maps_consistent(problem, plan, to_eplb_maps(problem, plan))


@settings(max_examples=150, deadline=None)
@given(instances())
def test_eplb_plans_are_feasible_and_split_evenly(problem):
    plan = solve(problem, "eplb_addcopies").plan
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
    plan = solve(problem, "eplb_addcopies", history=history).plan
    assert plan.replicas.tolist() == [[False] * 4, [True, False, False, False]]
    oracle = solve(problem, "eplb_addcopies").plan  # no history: plans on the current load
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
        solve(problem, "eplb_addcopies", history=history)


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


# DeepSeek EPLB proper (probe.planner.deepseek_eplb): the whole layout is re-packed.

PUBLISHED_WEIGHT = np.array([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                             [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
PUBLISHED_PHY2LOG = [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                     [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]


def gpu_loads(weight, phy2log, logcnt, num_gpus):
    """float [G]: load of each GPU, an expert's load shared evenly over its copies."""
    per_slot = weight[phy2log] / logcnt[phy2log]
    return per_slot.reshape(num_gpus, -1).sum(axis=1)


def assert_rebalance_consistent(weight, num_replicas, num_groups, num_nodes, num_gpus, maps):
    phy2log, log2phy, logcnt = maps
    num_layers, num_experts = weight.shape
    assert phy2log.shape == (num_layers, num_replicas)
    assert log2phy.shape == (num_layers, num_experts, num_replicas - num_experts + 1)
    assert logcnt.shape == (num_layers, num_experts)
    assert phy2log.dtype == log2phy.dtype == logcnt.dtype == np.int64
    hierarchical = num_groups % num_nodes == 0
    group_size = num_experts // num_groups
    slots_per_node = num_replicas // num_nodes
    for layer in range(num_layers):
        row = phy2log[layer]
        per_gpu = row.reshape(num_gpus, num_replicas // num_gpus)  # R / G slots a GPU
        assert per_gpu.min() >= 0 and per_gpu.max() < num_experts  # every slot is used
        assert logcnt[layer].min() >= 1 and logcnt[layer].sum() == num_replicas
        assert np.bincount(row, minlength=num_experts).tolist() == logcnt[layer].tolist()
        for e in range(num_experts):
            slots = log2phy[layer, e, :logcnt[layer, e]]
            assert np.all(log2phy[layer, e, logcnt[layer, e]:] == -1)
            assert sorted(slots.tolist()) == np.flatnonzero(row == e).tolist()
        if hierarchical:  # every replica of a group's experts on the group's node
            node_of_slot = np.arange(num_replicas) // slots_per_node
            group_of_slot = row // group_size
            nodes_per_group = [set(node_of_slot[group_of_slot == k]) for k in range(num_groups)]
            assert all(len(nodes) == 1 for nodes in nodes_per_group)
            groups_per_node = np.bincount([min(n) for n in nodes_per_group], minlength=num_nodes)
            assert groups_per_node.tolist() == [num_groups // num_nodes] * num_nodes
        # The slot counts are the greedy ones: an expert's last copy went to the highest
        # load per copy of its node at the time, so it beats every expert's final ratio there.
        node_of_expert = (np.zeros(num_experts, int) if not hierarchical else
                          np.array([row.tolist().index(e) // slots_per_node
                                    for e in range(num_experts)]))
        ratio = weight[layer] / logcnt[layer]
        for e in np.flatnonzero(logcnt[layer] > 1):
            same_node = node_of_expert == node_of_expert[e]
            last = weight[layer, e] / (logcnt[layer, e] - 1)
            assert last >= ratio[same_node].max() * (1 - 1e-12)


def test_rebalance_reproduces_the_published_example():
    maps = rebalance_experts(PUBLISHED_WEIGHT, 16, 4, 2, 8)
    assert maps[0].tolist() == PUBLISHED_PHY2LOG
    assert maps[2].tolist() == [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1],
                                [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]]
    assert_rebalance_consistent(PUBLISHED_WEIGHT, 16, 4, 2, 8, maps)
    # Float weights and a list give the same layout.
    assert rebalance_experts(PUBLISHED_WEIGHT.astype(float).tolist(), 16, 4, 2, 8)[0].tolist() \
        == PUBLISHED_PHY2LOG


def test_rebalance_global_policy_by_hand():
    # Weights 10, 6, 4, 2 over 2 GPUs x 3 slots. Extra slots: 10 -> expert 0 (5 per copy),
    # then 6 > 5 -> expert 1 (3 per copy). Physical loads 5, 3, 4, 2, 5, 3 packed heaviest
    # first: 5 -> GPU 0, 5 -> GPU 1, 4 -> GPU 0 (tie: lower), 3 -> GPU 1 (8 < 9),
    # 3 -> GPU 1 (8 < 9), 2 -> GPU 0 (GPU 1 full). Both of expert 1's copies share GPU 1.
    weight = np.array([[10.0, 6.0, 4.0, 2.0]])
    phy2log, log2phy, logcnt = rebalance_experts(weight, 6, 1, 1, 2)
    assert phy2log.tolist() == [[0, 2, 3, 0, 1, 1]]
    assert logcnt.tolist() == [[2, 2, 1, 1]]
    assert log2phy.tolist() == [[[0, 3, -1], [4, 5, -1], [1, -1, -1], [2, -1, -1]]]
    loads = gpu_loads(weight[0], phy2log[0], logcnt[0], 2)
    assert loads.tolist() == [11.0, 11.0]
    assert abs(imbalance_ratio(loads) - 1.0) < 1e-9


HAND_WEIGHT = np.array([[9.0, 1.0, 4.0, 4.0, 2.0, 2.0, 3.0, 1.0]])


def test_rebalance_hierarchical_policy_by_hand():
    # 8 experts in 4 groups of 2 (loads 10, 8, 4, 4) on 2 nodes of 2 GPUs, 12 slots (3 a GPU).
    # Groups onto nodes: 10 -> node 0, 8 -> node 1, 4 -> node 1, 4 -> node 0; node 0 holds
    # experts 0, 1, 6, 7 (loads 9, 1, 3, 1), node 1 holds 2, 3, 4, 5 (loads 4, 4, 2, 2).
    # Node 0's 2 extra slots both go to expert 0 (9, then 4.5 > 3): physical loads 3, 1, 3, 1,
    # 3, 3 -> GPU 0 {0, 0, 1} = 7, GPU 1 {6, 0, 7} = 7. Node 1's go to experts 2 and 3:
    # six loads of 2 alternate -> GPU 2 {2, 4, 2} = 6, GPU 3 {3, 5, 3} = 6.
    phy2log, log2phy, logcnt = rebalance_experts(HAND_WEIGHT, 12, 4, 2, 4)
    assert phy2log.tolist() == [[0, 0, 1, 6, 0, 7, 2, 4, 2, 3, 5, 3]]
    assert logcnt.tolist() == [[3, 1, 2, 2, 1, 1, 1, 1]]
    assert log2phy[0, 0].tolist() == [0, 1, 4, -1, -1]  # home copy, then in granted order
    loads = gpu_loads(HAND_WEIGHT[0], phy2log[0], logcnt[0], 4)
    assert loads.tolist() == [7.0, 7.0, 6.0, 6.0]
    assert abs(imbalance_ratio(loads) - 7.0 / 6.5) < 1e-9
    assert_rebalance_consistent(HAND_WEIGHT, 12, 4, 2, 4, (phy2log, log2phy, logcnt))


def test_rebalance_falls_back_to_the_global_policy():
    # 2 groups on 4 nodes: 4 does not divide 2, so the 8 experts are balanced globally.
    # The 4 extra slots go to experts 0 (9 > 4), 0 (4.5 > 4), 2 (4 > 3) and 3 (4 > 3).
    # Physical loads, heaviest first over 4 GPUs of 3: 3, 3, 3, 3 one a GPU; 2, 2, 2, 2 one
    # a GPU; 2, 2 to GPUs 0 and 1 (all at 5, lowest first); 1, 1 to GPUs 2 and 3 (0, 1 full).
    phy2log, _, logcnt = rebalance_experts(HAND_WEIGHT, 12, 2, 4, 4)
    assert phy2log.tolist() == [[0, 2, 2, 6, 3, 3, 0, 4, 1, 0, 5, 7]]
    assert logcnt.tolist() == [[3, 1, 2, 2, 1, 1, 1, 1]]
    loads = gpu_loads(HAND_WEIGHT[0], phy2log[0], logcnt[0], 4)
    assert loads.tolist() == [7.0, 7.0, 6.0, 6.0]
    assert abs(imbalance_ratio(loads) - 14.0 / 13.0) < 1e-9
    # groups = nodes = 1 is the same policy.
    assert rebalance_experts(HAND_WEIGHT, 12, 1, 1, 4)[0].tolist() == phy2log.tolist()


def test_rebalance_without_redundant_slots_only_packs():
    # R = E: one copy each, packed two a GPU: 5 + 1 and 4 + 2 (heaviest onto the lightest).
    phy2log, log2phy, logcnt = rebalance_experts(np.array([[1, 5, 2, 4]]), 4, 1, 1, 2)
    assert phy2log.tolist() == [[1, 0, 3, 2]]
    assert logcnt.tolist() == [[1, 1, 1, 1]] and log2phy.shape == (1, 4, 1)


@st.composite
def rebalance_inputs(draw):
    num_nodes = draw(st.integers(1, 3))
    num_gpus = num_nodes * draw(st.integers(1, 3))
    if draw(st.booleans()):  # hierarchical
        num_groups = num_nodes * draw(st.integers(1, 3))
    else:
        num_groups = draw(st.integers(1, 5))
    num_experts = num_groups * draw(st.integers(1, 3))
    slots_per_gpu = -(-num_experts // num_gpus) + draw(st.integers(0, 3))
    num_layers = draw(st.integers(1, 3))
    kind = draw(st.sampled_from(["int", "float", "zero", "skewed"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    weight = {"int": lambda: rng.integers(0, 50, (num_layers, num_experts)),
              "float": lambda: rng.random((num_layers, num_experts)) * 10,
              "zero": lambda: np.zeros((num_layers, num_experts)),
              "skewed": lambda: rng.pareto(1.0, (num_layers, num_experts))}[kind]()
    return weight, slots_per_gpu * num_gpus, num_groups, num_nodes, num_gpus


@settings(max_examples=200, deadline=None)
@given(rebalance_inputs())
def test_rebalance_maps_are_consistent(args):
    maps = rebalance_experts(*args)
    assert_rebalance_consistent(*args, maps)
    weight, num_replicas, num_groups, num_nodes, num_gpus = args
    again = rebalance_experts(*args)  # deterministic
    assert all(np.array_equal(a, b) for a, b in zip(maps, again, strict=True))


@pytest.mark.parametrize(("args", "error", "message"), [
    ((np.ones(4), 4, 1, 1, 1), ValueError, r"weight must be a numeric \[L, E\] array"),
    ((np.ones((1, 0)), 4, 1, 1, 1), ValueError, "E >= 1"),
    ((np.array([["a", "b"]]), 2, 1, 1, 1), ValueError, "weight must be a numeric"),
    ((np.array([[1.0, np.nan]]), 2, 1, 1, 1), ValueError, "finite, non-negative"),
    ((np.array([[1.0, -1.0]]), 2, 1, 1, 1), ValueError, "finite, non-negative"),
    ((np.ones((1, 4)), 3, 1, 1, 1), ValueError, r"num_replicas \(3\) must be >= .* E = 4"),
    ((np.ones((1, 4)), 6, 1, 1, 4), ValueError, r"num_replicas \(6\) must be a multiple of "
                                                r"num_gpus \(4\)"),
    ((np.ones((1, 4)), 8, 1, 3, 4), ValueError, r"num_gpus \(4\) must be a multiple of "
                                                r"num_nodes \(3\)"),
    ((np.ones((1, 4)), 8, 3, 1, 4), ValueError, r"num_groups \(3\) must divide"),
    ((np.ones((1, 4)), 0, 1, 1, 1), ValueError, "num_replicas must be >= 1"),
    ((np.ones((1, 4)), 4, 0, 1, 1), ValueError, "num_groups must be >= 1"),
    ((np.ones((1, 4)), 4, 1, 1, 2.0), TypeError, "num_gpus must be an int"),
    ((np.ones((1, 4)), True, 1, 1, 1), TypeError, "num_replicas must be an int"),
])
def test_rebalance_errors(args, error, message):
    with pytest.raises(error, match=message):
        rebalance_experts(*args)


def test_balanced_packing_and_replication_rules():
    pack, position = balanced_packing(np.array([3.0, 3.0, 1.0, 1.0]), 2)
    assert pack.tolist() == [0, 1, 0, 1] and position.tolist() == [0, 0, 1, 1]
    pack, position = balanced_packing(np.array([1.0, 9.0, 5.0]), 3)  # one item a pack: in place
    assert pack.tolist() == [0, 1, 2] and position.tolist() == [0, 0, 0]
    expert, rank, count = replicate_experts(np.array([4.0, 4.0, 0.0]), 5)  # ties: lowest id
    assert expert.tolist() == [0, 1, 2, 0, 1] and rank.tolist() == [0, 0, 0, 1, 1]
    assert count.tolist() == [2, 2, 1]


def test_eplb_layout_counts_copies_per_gpu():
    copies = eplb_layout(PUBLISHED_WEIGHT[1], 2, 4, 2, 8)
    assert copies.shape == (8, 12) and copies.sum(axis=1).tolist() == [2] * 8
    expected = np.zeros((8, 12), int)
    for slot, e in enumerate(PUBLISHED_PHY2LOG[1]):
        expected[slot // 2, e] += 1
    assert np.array_equal(copies, expected)
    with pytest.raises(ValueError, match=r"weight must be a 1-D \[E\] array"):
        eplb_layout(PUBLISHED_WEIGHT, 2, 4, 2, 8)


def published_problem(layer):
    """The published example's layer on 8 ranks of 2 slots: 12 experts sharded 2 or 1 a
    rank, plus extra slots so that every rank has 2 physical slots."""
    home = sharded_home(12, 8)
    slots = 2 - home.sum(axis=1)
    load = np.zeros((8, 12), int)
    load[np.arange(12) % 8, np.arange(12)] = PUBLISHED_WEIGHT[layer]  # tokens from one source
    cost = CostModel.uniform(8, alpha=0.0, beta=1.0, token_time=0.0, transfer_time=1.0)
    return BalanceProblem(load, home, slots, 1.0, cost)


@pytest.mark.parametrize("layer", [0, 1])
def test_eplb_problem_plans_the_published_layout_and_round_trips(layer):
    problem = published_problem(layer)
    new, copies = eplb_problem(problem, num_groups=4, num_nodes=2)
    assert np.array_equal(copies, eplb_layout(PUBLISHED_WEIGHT[layer], 2, 4, 2, 8))
    assert np.array_equal(new.home, copies > 0) and new.slots.tolist() == [0] * 8
    assert np.array_equal(new.load, problem.load)
    result = solve(new, "deepseek_eplb", copies=copies)
    assert result.status == "feasible" and result.plan.num_replicas == 0
    assert check_plan(new, result.plan) == []
    # Every copy gets its expert's tokens / copies (within one token), locality ignored.
    per_rank = result.plan.tokens_per_rank_expert()  # [G, E]
    logcnt = copies.sum(axis=0)
    share = PUBLISHED_WEIGHT[layer] / logcnt
    assert np.all(np.abs(per_rank - copies * share[None, :]) <= copies)
    # The layout round-trips through to_eplb_maps: same slots per rank, same counts.
    phy2log, log2phy, exported_cnt = to_eplb_maps(new, result.plan, copies)
    assert phy2log.shape == (16,)
    for g in range(8):
        assert sorted(phy2log[2 * g:2 * g + 2]) == sorted(PUBLISHED_PHY2LOG[layer][2 * g:2 * g + 2])
    assert exported_cnt.tolist() == rebalance_experts(PUBLISHED_WEIGHT, 16, 4, 2, 8)[2][layer]\
        .tolist()
    for e in range(12):
        assert np.all(phy2log[log2phy[e, :exported_cnt[e]]] == e)
        assert np.all(log2phy[e, exported_cnt[e]:] == -1)


def test_eplb_problem_uses_history_and_checks_the_slots():
    cost = CostModel.uniform(2, alpha=0.0, beta=1.0, token_time=0.0, transfer_time=1.0)
    problem = BalanceProblem(np.zeros((2, 4), int), sharded_home(4, 2), 1, 1.0, cost)
    history = np.zeros((3, 4), int)
    history[:, 3] = 30  # the past said expert 3: it gets both extra slots (3 copies)
    _, copies = eplb_problem(problem, history=history)
    assert copies[:, 3].sum() == 3 and copies.sum(axis=1).tolist() == [3, 3]
    uneven = BalanceProblem(np.zeros((2, 4), int), sharded_home(4, 2), [1, 2], 1.0, cost)
    with pytest.raises(ValueError, match=r"home experts \+ slots must be equal on every rank"):
        eplb_problem(uneven)
    with pytest.raises(ValueError, match="history must be"):
        eplb_problem(problem, history=np.zeros((2, 5)))
    with pytest.raises(TypeError, match="problem must be a BalanceProblem"):
        eplb_problem("problem")


def test_deepseek_eplb_rejects_bad_copies():
    cost = CostModel.uniform(2, alpha=0.0, beta=1.0, token_time=0.0, transfer_time=1.0)
    problem = BalanceProblem(np.ones((2, 2), int), sharded_home(2, 2), 0, 1.0, cost)
    for copies, message in ((np.ones((2, 3), int), "copies must be an int"),
                            (np.eye(2) * 1.5, "copies must be an int"),
                            (np.ones((2, 2), int), "exactly where problem.home is True")):
        with pytest.raises(ValueError, match=message):
            solve(problem, "deepseek_eplb", copies=copies)
    with pytest.raises(ValueError, match="copies must be an int"):
        to_eplb_maps(problem, solve(problem, "deepseek_eplb").plan, np.ones((2, 2), int))


def test_even_split_counts_copies_on_one_rank():
    # Expert 0 has 3 copies: 2 on rank 0, 1 on rank 1. 7 tokens: 2 a copy + 1 leftover.
    copies = np.array([[2, 1], [1, 0]])
    split = even_split(np.array([[7, 4], [7, 0]]), copies)
    assert split[0].tolist() == [[5, 2], [4, 0]]  # source 0: leftover to copy 0 (rank 0)
    assert split[1].tolist() == [[4, 3], [0, 0]]  # source 1: leftover to copy 2 (rank 1)
    assert np.array_equal(even_split(np.array([[7, 4], [7, 0]]), copies > 0).sum(axis=2),
                          np.array([[7, 4], [7, 0]]))


@st.composite
def sharded_problems(draw):
    num_ranks = draw(st.integers(1, 4))
    num_experts = num_ranks * draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    load = rng.integers(0, 30, (num_ranks, num_experts)) * (rng.random((num_ranks, num_experts))
                                                             < draw(st.sampled_from([0.3, 1.0])))
    cost = CostModel.uniform(num_ranks, alpha=0.0, beta=1.0, token_time=0.1, transfer_time=1.0)
    slots = draw(st.integers(0, 3))
    return BalanceProblem(load, sharded_home(num_experts, num_ranks), slots, 1.0, cost)


@settings(max_examples=100, deadline=None)
@given(sharded_problems())
def test_deepseek_eplb_plans_are_feasible_and_round_trip(problem):
    new, copies = eplb_problem(problem)
    result = solve(new, "deepseek_eplb", copies=copies)
    assert result.plan is not None and check_plan(new, result.plan) == []
    assert np.array_equal(result.plan.assignment.sum(axis=2), problem.load)
    weight = problem.load.sum(axis=0)
    physical = int(copies.sum(axis=1)[0])
    phy2log, _, logcnt = rebalance_experts(weight[None, :], physical * problem.num_ranks, 1, 1,
                                           problem.num_ranks)
    exported = to_eplb_maps(new, result.plan, copies)
    assert exported[2].tolist() == logcnt[0].tolist()
    for g in range(problem.num_ranks):
        block = slice(g * physical, (g + 1) * physical)
        assert sorted(exported[0][block]) == sorted(phy2log[0][block])
    # Without copies the method splits over the home holders (here: one each).
    plain = solve(problem, "deepseek_eplb")
    assert check_plan(problem, plain.plan) == []


@settings(max_examples=100, deadline=None)
@given(instances())
def test_deepseek_eplb_without_copies_splits_over_home_holders(problem):
    plan = solve(problem, "deepseek_eplb").plan
    assert check_plan(problem, plan) == [] and plan.num_replicas == 0
    assert np.array_equal(plan.assignment, even_split(problem.load, problem.home))
