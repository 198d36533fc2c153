"""The hypothesis strategies shared by the planner tests (tests/helpers.py): check they are
what they claim."""

from __future__ import annotations

import numpy as np
from helpers import instances
from hypothesis import given, settings

from probe.planner.problem import BalanceProblem


@settings(max_examples=60, deadline=None)
@given(instances())
def test_instances_are_valid_problems(problem):
    assert isinstance(problem, BalanceProblem)
    assert problem.home.any(axis=0).all()
    assert problem.load.shape == problem.home.shape
    assert np.all(problem.load >= 0)


def test_instances_cover_degenerate_cases():
    seen = set()

    @settings(max_examples=200, deadline=None, database=None)
    @given(instances())
    def collect(problem):
        if problem.total_tokens == 0:
            seen.add("zero")
        if problem.num_ranks == 1:
            seen.add("one rank")
        if np.all(problem.window == 0):
            seen.add("window 0")
        if np.all(problem.slots == 0):
            seen.add("no slots")
        if np.count_nonzero(problem.load.sum(axis=0)) == 1:
            seen.add("one expert")

    collect()
    assert seen == {"zero", "one rank", "window 0", "no slots", "one expert"}
