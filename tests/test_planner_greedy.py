"""Greedy planner (Numba kernel) against its plain-Python twin, the checker, and static EP."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_planner_instances import instances, same_plan

from probe.placement import sharded_home
from probe.planner.check import check_plan, evaluate_plan
from probe.planner.cost import CostModel
from probe.planner.greedy import greedy_arrays, greedy_plan, plan_from_arrays
from probe.planner.greedy_ref import greedy_ref
from probe.planner.problem import BalanceProblem
from probe.planner.static import static_assignment, static_plan

TOL = 1e-12


@settings(max_examples=400, deadline=None)
@given(instances(), st.sampled_from([None, 0, 1, 2, 16]), st.sampled_from([0.0, 0.01, 1.0]))
def test_numba_kernel_equals_python_twin(problem, k_max, epsilon):
    fast = greedy_plan(problem, k_max=k_max, epsilon=epsilon)
    slow = greedy_ref(problem, k_max=k_max, epsilon=epsilon)
    assert same_plan(fast, slow)


@settings(max_examples=300, deadline=None)
@given(instances(), st.sampled_from([None, 1, 16]), st.sampled_from([0.0, 0.01]),
       st.sampled_from([(True, False), (False, True), (True, True)]))
def test_numba_kernel_equals_python_twin_with_options(problem, k_max, epsilon, options):
    move_local, evacuate = options
    fast = greedy_plan(problem, k_max=k_max, epsilon=epsilon, move_local=move_local,
                       evacuate=evacuate)
    slow = greedy_ref(problem, k_max=k_max, epsilon=epsilon, move_local=move_local,
                      evacuate=evacuate)
    assert same_plan(fast, slow)


@settings(max_examples=200, deadline=None)
@given(instances(max_ranks=6, max_experts=14), st.booleans(), st.booleans())
def test_greedy_options_feasible_and_never_worse_than_static(problem, move_local, evacuate):
    plan = greedy_plan(problem, k_max=None, move_local=move_local, evacuate=evacuate)
    assert check_plan(problem, plan) == []
    assert np.array_equal(plan.assignment.sum(axis=2), problem.load)
    static = evaluate_plan(problem, static_plan(problem)).objective
    greedy = evaluate_plan(problem, plan).objective
    assert greedy <= static * (1 + 1e-9) + TOL


def test_move_local_moves_the_slow_ranks_own_tokens_last():
    # The module doctest: T = [8, 0]; rank 1 copies expert 0 and takes its own 2 tokens, then
    # (move_local) 2 of source 0's 6: T = 8 - x = x at x = 4, and x_mean = 4 too.
    cost = CostModel.uniform(2, alpha=0.0, beta=1.0, token_time=0.0, transfer_time=1.0)
    problem = BalanceProblem(np.array([[6, 0], [2, 0]]), sharded_home(2, 2), 1, 1.0, cost)
    assert greedy_plan(problem).assignment[0, 0].tolist() == [6, 0]
    plan = greedy_plan(problem, move_local=True)
    assert plan.assignment[:, 0].tolist() == [[4, 2], [0, 2]]
    assert evaluate_plan(problem, plan).objective == 4.0
    assert same_plan(plan, greedy_ref(problem, move_local=True))


def test_move_local_prices_the_outgoing_traffic():
    # As above with 1 s per token between ranks: T = [8 + 2 * 2, 2 * 2] = [12, 4], mean 8.
    # x <= 2 (rank 1's own): T0 = 12 - 3x, T1 = 4 - x. Then k = x - 2 of rank 0's own:
    # T0 = 6 + k (beta saved, 2 * 1 s of dispatch added), T1 = 2 + 3k. Bisection: x_eq = 4
    # (8 <= 8), moved back to 3 (max 7 <= 8); x_mean = pool (T0(8) = 12 > mean); x = 3, and no
    # later move pays: T = [7, 5]. (The plain plan, x = 2, reaches [6, 2]: T_src is not
    # monotone in x once r_src's own tokens add traffic, and the bisection assumes it is.)
    cost = CostModel.uniform(2, alpha=0.0, beta=1.0, token_time=1.0, transfer_time=1.0)
    problem = BalanceProblem(np.array([[6, 0], [2, 0]]), sharded_home(2, 2), 1, 1.0, cost)
    plan = greedy_plan(problem, k_max=None, move_local=True)
    assert plan.assignment[:, 0].tolist() == [[5, 1], [0, 2]]
    assert evaluate_plan(problem, plan).objective == 7.0
    assert evaluate_plan(problem, greedy_plan(problem, k_max=None)).objective == 6.0


def test_evacuate_moves_every_token_to_drop_alpha():
    # alpha = 1, beta = 1, no link cost. Rank 0: expert 0 with 4 tokens from source 1 and
    # expert 1 with 5 local ones (T0 = 5 + 6 = 11); rank 1: expert 2, 1 token (T1 = 2);
    # rank 2: expert 4, 10 tokens (T2 = 11). mean = 8. Moving x of expert 0 to rank 1:
    # T0 = 11 - x (- 1 at x = 4), T1 = 3 + x. x_mean = 3 (T0 = 8, T1 = 6); x_eq = 4.
    # Water-fill: x = 3, max 8. Evacuation: x = 4 gives T0 = 6, T1 = 7, max 7 < 8.
    cost = CostModel.uniform(3, alpha=1.0, beta=1.0, token_time=0.0, transfer_time=1.0)
    load = np.zeros((3, 6), np.int64)
    load[1, 0] = 4
    load[0, 1] = 5
    load[1, 2] = 1
    load[2, 4] = 10
    problem = BalanceProblem(load, sharded_home(6, 3), 1, 1.0, cost)
    plain = greedy_plan(problem, k_max=1)
    assert plain.assignment[1, 0].tolist() == [1, 3, 0]
    plan = greedy_plan(problem, k_max=1, evacuate=True)
    assert plan.assignment[1, 0].tolist() == [0, 4, 0]
    assert plan.sources[1, 0] == 0
    from probe.planner.check import rank_times

    compute, comm = rank_times(problem, plan.assignment)
    assert (compute + comm).tolist() == [6.0, 7.0, 11.0]
    assert same_plan(plan, greedy_ref(problem, k_max=1, evacuate=True))


def test_solve_passes_the_options():
    from probe.planner import solve

    cost = CostModel.uniform(2, alpha=0.0, beta=1.0, token_time=0.0, transfer_time=1.0)
    problem = BalanceProblem(np.array([[6, 0], [2, 0]]), sharded_home(2, 2), 1, 1.0, cost)
    for method in ("greedy", "greedy_ref"):
        result = solve(problem, method, move_local=True, evacuate=True)
        assert result.objective == 4.0
        assert solve(problem, method).objective == 6.0
    with pytest.raises(TypeError, match="move_local must be a bool"):
        greedy_plan(problem, move_local=1)


@settings(max_examples=300, deadline=None)
@given(instances(max_ranks=6, max_experts=14))
def test_greedy_feasible_conserving_and_never_worse_than_static(problem):
    plan = greedy_plan(problem)
    assert check_plan(problem, plan) == []
    assert np.array_equal(plan.assignment.sum(axis=2), problem.load)
    assert plan.replicas.sum(axis=1).max(initial=0) <= problem.slots.max(initial=0)
    static = evaluate_plan(problem, static_plan(problem)).objective
    greedy = evaluate_plan(problem, plan).objective
    assert greedy <= static * (1 + 1e-9) + TOL


@settings(max_examples=100, deadline=None)
@given(instances())
def test_more_moves_never_hurt(problem):
    # The first k moves are shared, and a move never raises the maximum rank time.
    objective = [evaluate_plan(problem, greedy_plan(problem, k_max=k)).objective
                 for k in (1, 4, 16, None)]
    for before, after in zip(objective, objective[1:], strict=False):
        assert after <= before * (1 + 1e-9) + TOL


@settings(max_examples=100, deadline=None)
@given(instances())
def test_k_max_bounds_replicas(problem):
    assert greedy_plan(problem, k_max=1).num_replicas <= 1
    assert greedy_plan(problem, k_max=2).num_replicas <= 2


def test_static_assignment_is_locality_first():
    home = np.array([[1, 0, 1], [0, 1, 1], [0, 0, 1]], bool)  # expert 2 everywhere
    load = np.array([[3, 4, 5], [6, 7, 8], [1, 1, 2]])
    a = static_assignment(load, home)
    assert a[0, 2].tolist() == [5, 0, 0]  # source holds expert 2: stays local
    assert a[2, 0].tolist() == [1, 0, 0]  # expert 0 only on rank 0
    assert a[0, 1].tolist() == [0, 4, 0]
    # E not divisible by G, several holders: even split with the leftover rotated by source.
    home2 = np.array([[1, 1, 0, 1, 0], [0, 1, 1, 0, 1], [1, 0, 1, 0, 0]], bool)
    load2 = np.full((3, 5), 5)
    a2 = static_assignment(load2, home2)
    assert np.array_equal(a2.sum(axis=2), load2)
    assert a2[1, 0].tolist() == [2, 0, 3]  # holders 0 and 2; source 1 gives the extra to 2
    assert a2[2, 1].tolist() == [3, 2, 0]


def test_hot_expert_from_remote_sources_is_split_with_a_replica():
    # Rank 0 holds expert 0, which every token wants; rank 1's tokens move to a replica there.
    cost = CostModel.uniform(2, alpha=0.0, beta=1.0, token_time=0.0, transfer_time=1.0)
    problem = BalanceProblem(np.array([[0, 0], [10, 0]]), sharded_home(2, 2), 1, 1.0, cost)
    plan = greedy_plan(problem)
    assert plan.replicas.tolist() == [[False, False], [True, False]]
    assert plan.sources[1, 0] == 0
    assert plan.tokens_per_rank_expert()[:, 0].tolist() == [5, 5]
    assert evaluate_plan(problem, plan).objective == 5.0


def test_tokens_originating_on_the_slow_rank_stay_local():
    cost = CostModel.uniform(2, alpha=0.0, beta=1.0, token_time=0.0, transfer_time=1.0)
    problem = BalanceProblem(np.array([[10, 0], [0, 0]]), sharded_home(2, 2), 1, 1.0, cost)
    plan = greedy_plan(problem)
    assert plan.num_replicas == 0
    assert plan.assignment[0, 0].tolist() == [10, 0]


def test_window_blocks_copies_on_both_sides():
    cost = CostModel.uniform(3, alpha=0.0, beta=1.0, token_time=0.0, transfer_time=1.0)
    home = np.array([[1, 1, 0], [0, 0, 1], [0, 0, 0]], bool)
    home[2, 2] = True
    load = np.zeros((3, 3), np.int64)
    load[1, 0] = load[2, 0] = 10  # expert 0 and 1 (both on rank 0) are hot for ranks 1 and 2
    load[1, 1] = load[2, 1] = 10
    # Receiving side: window below one copy -> nothing moves.
    assert greedy_plan(BalanceProblem(load, home, 3, 0.5, cost)).num_replicas == 0
    # Sending side: rank 0 may send one copy only, though ranks 1 and 2 could each take one.
    window = np.array([1.0, 5.0, 5.0])
    plan = greedy_plan(BalanceProblem(load, home, 3, window, cost))
    assert plan.num_replicas == 1
    assert (plan.sources == 0).sum() == 1


def test_existing_holder_is_used_without_a_slot():
    # Expert 0 lives on ranks 0 and 1; with no slots the greedy can still shift tokens.
    cost = CostModel.uniform(3, alpha=0.0, beta=1.0, token_time=0.0, transfer_time=1.0)
    home = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 1]], bool)
    load = np.zeros((3, 3), np.int64)
    load[2, 0] = 12
    load[0, 0] = 0
    problem = BalanceProblem(load, home, 0, 0.0, cost)
    static = evaluate_plan(problem, static_plan(problem)).objective
    plan = greedy_plan(problem)
    assert plan.num_replicas == 0
    assert check_plan(problem, plan) == []
    assert evaluate_plan(problem, plan).objective <= static


def test_alpha_makes_small_splits_unattractive():
    # Moving 1 token costs the destination alpha = 5 > the 1 s it saves: no move.
    cost = CostModel.uniform(2, alpha=5.0, beta=1.0, token_time=0.0, transfer_time=1.0)
    problem = BalanceProblem(np.array([[0, 1], [3, 0]]), sharded_home(2, 2), 1, 1.0, cost)
    assert greedy_plan(problem).num_replicas == 0


def test_communication_is_part_of_the_rank_time():
    # Source 1 sends 8 tokens of expert 0 to rank 0. Moving x of them to a replica on rank 1:
    # T0 = (8 - x) + 2 * 10 * (8 - x), T1 = x + 2 * 10 * (8 - x) (rank 1 still sends the rest).
    # They meet at x = 4 with T = 84 (by hand); without link costs also at x = 4, T = 4.
    for token_time, expected in ((10.0, 84.0), (0.0, 4.0)):
        cost = CostModel.uniform(2, alpha=0.0, beta=1.0, token_time=token_time,
                                 transfer_time=1.0)
        problem = BalanceProblem(np.array([[0, 0], [8, 0]]), sharded_home(2, 2), 1, 1.0, cost)
        plan = greedy_plan(problem, k_max=None)
        assert plan.assignment[1, 0].tolist() == [4, 4]
        assert evaluate_plan(problem, plan).objective == pytest.approx(expected)


def test_greedy_arrays_low_level_entry():
    cost = CostModel.uniform(2, alpha=0.0, beta=1.0, token_time=0.0, transfer_time=1.0)
    problem = BalanceProblem(np.array([[0, 0], [10, 0]]), sharded_home(2, 2), 1, 1.0, cost)
    rep, blk_expert, blk_assign, moves = greedy_arrays(
        problem.load, problem.home, problem.slots, problem.window, cost.alpha, cost.beta,
        cost.token_time, cost.transfer_time, 16, 0.0)
    assert rep.tolist() == [[1, 0, 0]]  # (rank, expert, source)
    assert blk_expert.tolist() == [0]
    assert blk_assign[0].tolist() == [[0, 0], [5, 5]]  # [S, G] for expert 0
    assert moves == 1
    assert same_plan(plan_from_arrays(problem, rep, blk_expert, blk_assign), greedy_plan(problem))


@pytest.mark.parametrize(("k_max", "epsilon", "message"), [
    (-1, 0.0, "k_max must be a non-negative int or None"),
    (2.5, 0.0, "k_max must be a non-negative int or None"),
    (16, -1.0, "epsilon must be finite and >= 0"),
    (16, float("nan"), "epsilon must be finite and >= 0"),
])
def test_bad_options(k_max, epsilon, message):
    cost = CostModel.uniform(2, alpha=0.0, beta=1.0, token_time=0.0, transfer_time=1.0)
    problem = BalanceProblem(np.array([[1, 0], [1, 0]]), sharded_home(2, 2), 1, 1.0, cost)
    with pytest.raises(ValueError, match=message):
        greedy_plan(problem, k_max=k_max, epsilon=epsilon)


@settings(max_examples=150, deadline=None)
@given(instances())
def test_static_assignment_matches_the_loop_definition(problem):
    load, home = problem.load, problem.home
    expected = np.zeros(load.shape + (problem.num_ranks,), np.int64)
    for s in range(problem.num_ranks):
        for e in range(problem.num_experts):
            if home[s, e]:
                expected[s, e, s] = load[s, e]
                continue
            holders = np.flatnonzero(home[:, e])
            quota, left = divmod(int(load[s, e]), len(holders))
            for k, g in enumerate(holders):
                expected[s, e, g] = quota + ((k + s) % len(holders) < left)
    assert np.array_equal(static_assignment(load, home), expected)
