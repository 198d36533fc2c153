"""Fidelity metrics and history baselines against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from probe.placement import sharded_home
from probe.predictor.baselines import history_prediction, round_to_totals
from probe.predictor.metrics import (
    expert_load_error,
    full_recall_2k,
    rank_load_error,
    recall_2k,
    top_half_hit_rate,
    topk_accuracy,
)

# K = 3 (half = 2), four tokens; true ids best first.
TRUE = np.array([[0, 1, 2], [3, 4, 5], [6, 7, 0], [1, 2, 3]])
PRED = np.array([[2, 1, 0],   # 3 hits, top-2 {0, 1} covered
                 [3, 9, 8],   # 1 hit, top-2 {3, 4}: 4 missing
                 [7, 6, 5],   # 2 hits, top-2 {6, 7} covered
                 [5, 6, 7]])  # 0 hits
PRED_2K = np.array([[2, 1, 0, 9, 8, 7],        # 3 of 3
                    [3, 9, 8, 4, 1, 2],        # 2 of 3 (5 missing)
                    [7, 6, 5, 0, 1, 2],        # 3 of 3
                    [5, 6, 7, 8, 9, 1]])       # 1 of 3


def test_topk_accuracy_hand_computed():
    assert topk_accuracy(PRED, TRUE) == pytest.approx((3 + 1 + 2 + 0) / 12)
    assert topk_accuracy(TRUE, TRUE) == 1.0


def test_top_half_hit_rate_hand_computed():
    assert top_half_hit_rate(PRED, TRUE) == pytest.approx(2 / 4)
    # K = 1: ceil(1/2) = 1, so it is top-1 accuracy.
    assert top_half_hit_rate(np.array([[1], [2]]), np.array([[1], [3]])) == 0.5
    # Order of the predicted ids does not matter; order of the true ids does.
    assert top_half_hit_rate(PRED[:, ::-1], TRUE) == pytest.approx(0.5)


def test_recall_2k_hand_computed():
    assert recall_2k(PRED_2K, TRUE) == pytest.approx((3 + 2 + 3 + 1) / 12)
    assert full_recall_2k(PRED_2K, TRUE) == pytest.approx(2 / 4)


def test_metric_input_validation():
    with pytest.raises(ValueError, match="pred_ids"):
        topk_accuracy(np.zeros(3, int), TRUE)
    with pytest.raises(TypeError, match="integer"):
        topk_accuracy(PRED.astype(float), TRUE)
    with pytest.raises(ValueError, match="differ"):
        topk_accuracy(PRED[:, :2], TRUE)


def test_load_errors_hand_computed():
    true = np.array([[4, 0, 2, 2], [0, 0, 1, 1]])
    pred = np.array([[3, 1, 2, 2], [0, 0, 0, 2]])
    # |diff| = 1 + 1 + 1 + 1 = 4 over 10 pairs.
    assert expert_load_error(pred, true) == pytest.approx(0.4)
    home = sharded_home(4, 2)  # rank 0: experts 0, 1; rank 1: experts 2, 3
    # per-rank: true [4, 6], pred [4, 6] -> no error at rank level.
    assert rank_load_error(pred, true, home) == 0.0
    pred2 = np.array([[2, 0, 3, 3], [0, 0, 1, 1]])
    assert rank_load_error(pred2, true, home) == pytest.approx(4 / 10)


def test_round_to_totals_keeps_totals_and_proportions():
    out = round_to_totals(np.array([[1.0, 1.0, 2.0], [0.0, 0.0, 0.0]]), np.array([7, 3]))
    assert out.tolist() == [[2, 2, 3], [1, 1, 1]]
    assert out.dtype == np.int64
    rng = np.random.default_rng(0)
    vals = rng.random((5, 4, 9))
    tot = rng.integers(0, 50, (5, 4))
    assert np.array_equal(round_to_totals(vals, tot).sum(-1), tot)


def test_history_prediction_last_step_and_moving_average():
    loads = np.array([[[4, 0]], [[0, 4]], [[2, 2]], [[0, 8]]])  # [N=4, S=1, E=2]
    last = history_prediction(loads, window=1)
    assert last[1].tolist() == [[4, 0]]          # step 0's shares, 4 pairs
    assert last[3].tolist() == [[4, 4]]          # step 2's shares, scaled to 8 pairs
    assert last[0].tolist() == [[2, 2]]          # no history: uniform
    avg = history_prediction(loads, window=2)
    assert avg[2].tolist() == [[2, 2]]           # mean of [4,0] and [0,4]
    assert avg[3].tolist() == [[2, 6]]           # mean of [0,4] and [2,2] = [1,3] -> x2
    with pytest.raises(ValueError, match="window"):
        history_prediction(loads, window=0)


def test_plan_quality_perfect_prediction_matches_truth_and_replay_conserves():
    from probe.planner import BalanceProblem, CostModel, solve
    from probe.predictor.baselines import plan_quality, replay_plan

    home = sharded_home(4, 2)
    cost = CostModel.uniform(2, alpha=0.0, beta=1.0, token_time=0.0, transfer_time=1.0)
    true = np.array([[30, 2, 1, 1], [20, 2, 1, 1]])
    q = plan_quality(true, true, home=home, slots=1, window=1.0, cost=cost)
    assert q.ir_pred == pytest.approx(q.ir_truth)
    assert q.ir_static == pytest.approx(54 / 29)
    assert q.ir_truth < q.ir_static
    # A wrong prediction (hot expert 3 instead of 0) cannot beat the plan from the truth.
    wrong = np.array([[1, 2, 1, 30], [1, 2, 1, 20]])
    q2 = plan_quality(wrong, true, home=home, slots=1, window=1.0, cost=cost)
    assert q2.ir_pred >= q.ir_truth - 1e-12
    plan = solve(BalanceProblem(wrong, home, 1, 1.0, cost), method="greedy").plan
    replayed = replay_plan(plan, true, home)
    assert np.array_equal(replayed.assignment.sum(axis=2), true)
    holds = home | replayed.replicas
    assert not np.any((replayed.assignment > 0) & ~holds.T[None])


def test_report_segments_split_at_tag_changes_and_shift_window():
    from probe.predictor.report import _segments

    tags = ["a"] * 10 + ["b"] * 20
    assert _segments(tags, shift_window=4, longest=8) == [
        (0, 8), (8, 10), (10, 14), (14, 22), (22, 30)]
    assert _segments(["x"] * 3) == [(0, 3)]
