"""The Numba kernels of the simulator's token splits against their numpy twins: the same
integers (probe.sim.rounding.split_by_fractions, probe.planner.eplb.even_split)."""

from __future__ import annotations

import numpy as np
import pytest

from probe.planner.eplb import _even_split_numpy, even_split
from probe.sim.rounding import _split_by_fractions_numpy, split_by_fractions


def test_split_by_fractions_matches_its_numpy_twin():
    rng = np.random.default_rng(0)
    for trial in range(200):
        num_sources, num_experts, num_ranks = rng.integers(1, 12), rng.integers(1, 30), \
            rng.integers(1, 10)
        load = rng.integers(0, rng.choice([3, 50, 5000]), (num_sources, num_experts))
        if trial % 3 == 0:  # small integer weights: exact ties among the remainders
            frac = rng.integers(0, 3, (num_experts, num_ranks)).astype(np.float64)
        else:
            frac = rng.random((num_experts, num_ranks)) * (rng.random((num_experts,
                                                                        num_ranks)) < 0.4)
        frac[frac.sum(axis=1) == 0, 0] = 1.0
        frac /= frac.sum(axis=1, keepdims=True)
        got = split_by_fractions(load, frac)
        np.testing.assert_array_equal(got, _split_by_fractions_numpy(load, frac))
        np.testing.assert_array_equal(got.sum(axis=2), load)
        assert not np.any(got[:, frac == 0])
    with pytest.raises(ValueError, match="frac"):
        split_by_fractions(np.ones((2, 3), int), np.ones((4, 2)))


def test_even_split_matches_its_numpy_twin():
    rng = np.random.default_rng(1)
    for trial in range(300):
        num_sources, num_experts, num_ranks = rng.integers(1, 12), rng.integers(1, 30), \
            rng.integers(1, 10)
        load = rng.integers(0, rng.choice([2, 40, 3000]), (num_sources, num_experts))
        holds = (rng.integers(0, 3, (num_ranks, num_experts)) if trial % 2
                 else rng.random((num_ranks, num_experts)) < 0.3)
        if trial % 5:  # every expert held (even_split's contract); else some held nowhere
            holds = np.asarray(holds).astype(np.int64)
            holds[0, holds.sum(axis=0) == 0] = 1
        with np.errstate(divide="ignore", invalid="ignore"):
            want = _even_split_numpy(load, holds)
        np.testing.assert_array_equal(even_split(load, holds), want)
    with pytest.raises(ValueError, match="holds"):
        even_split(np.ones((2, 3), int), np.ones((4, 2), bool))
