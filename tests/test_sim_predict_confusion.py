"""The confusion replay of a real predictor's sampled errors (probe.sim.predict)."""

from __future__ import annotations

import numpy as np
import pytest

from probe.sim.predict import confusion_matrix, confusion_predictor


def test_confusion_rows_and_hits():
    pred = np.array([[0, 1], [0, 2], [3, 1]])
    true = np.array([[0, 1], [0, 1], [0, 1]])
    c = confusion_matrix(pred, true, 4, smoothing=0.0)
    np.testing.assert_allclose(c.sum(axis=1), 1.0)
    assert c[0, 0] == pytest.approx(2 / 3) and c[0, 3] == pytest.approx(1 / 3)
    assert c[1, 1] == pytest.approx(2 / 3) and c[1, 2] == pytest.approx(1 / 3)
    # Unseen experts take the layer-wide row: hit rate 4/6 on the diagonal plus the misses
    # spread like the wrong predictions (half on 2, half on 3).
    assert c[2, 2] == pytest.approx(4 / 6 + 2 / 6 * 0.5)
    assert c[2, 3] == pytest.approx(2 / 6 * 0.5) and c[2, 0] == 0.0
    smooth = confusion_matrix(pred, true, 4, smoothing=8.0)
    # row 1 (3 pairs) moves towards the layer row: 1/3 -> (1 + 8/6) / 11
    assert smooth[1, 2] == pytest.approx((1 + 8 / 6) / 11)
    with pytest.raises(ValueError, match="pred_ids and true_ids"):
        confusion_matrix(pred, true[:2], 4)


def test_confusion_predictor_keeps_totals_and_uses_fallback():
    c = {1: np.eye(3)}
    p = confusion_predictor(c, seed=0)
    true = np.array([[3, 0, 2], [1, 1, 1]])
    np.testing.assert_array_equal(p(true, None, 0, 1), true)  # identity: perfect
    mixed = confusion_predictor({1: np.full((3, 3), 1 / 3)}, seed=0)(true, None, 0, 1)
    np.testing.assert_array_equal(mixed.sum(axis=1), true.sum(axis=1))
    # layer 0 has no matrix: the previous step's load rescaled to this step's totals
    prev = np.array([[1, 0, 0], [0, 0, 3]])
    np.testing.assert_array_equal(p(true, prev, 1, 0), [[5, 0, 0], [0, 0, 3]])
