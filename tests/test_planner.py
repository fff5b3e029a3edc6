"""Table tests for the step arithmetic; rows copy the worked numbers in the docstrings."""

import pytest

from rollout.planner import (
    candidate_share,
    proportional_resize,
    ready_floor,
    step_count,
    step_size,
    surge_count,
    unavailable_count,
)
from rollout.policy import RolloutPolicy


@pytest.mark.parametrize(
    "percent,n,want",
    [
        (25, 10, 3),  # 2.5 rounds up (Kubernetes maxSurge)
        (10, 8, 1),  # 0.8 rounds up
        (50, 1, 1),
        (1, 1, 1),  # 0.01 rounds up to one replica
        (30, 10, 3),
        (25, 200, 50),
        (33, 100, 33),
        (0, 10, 0),
    ],
)
def test_surge_rounds_up(percent, n, want):
    assert surge_count(percent, n) == want


@pytest.mark.parametrize(
    "percent,n,want",
    [
        (25, 10, 2),  # 2.5 rounds down (Kubernetes maxUnavailable)
        (10, 8, 1),  # 0.8 rounds down to 0, then the one-replica floor
        (50, 3, 1),  # 1.5 rounds down
        (50, 1, 1),
        (30, 10, 3),
        (25, 200, 50),
        (0, 10, 0),
    ],
)
def test_unavailable_rounds_down_with_floor_of_one(percent, n, want):
    assert unavailable_count(percent, n) == want


@pytest.mark.parametrize(
    "fields,n,step,steps,floor",
    [
        ({"max_surge_percent": 25}, 10, 3, 4, 10),
        ({"max_unavailable_percent": 25}, 10, 2, 5, 8),
        ({"max_surge_percent": 50}, 4, 2, 2, 4),
        ({"max_unavailable_percent": 50}, 1, 1, 1, 0),
        ({"max_surge_percent": 10}, 200, 20, 10, 200),
        ({"max_unavailable_percent": 33}, 7, 2, 4, 5),
    ],
)
def test_step_size_count_and_floor(fields, n, step, steps, floor):
    p = RolloutPolicy(**fields)
    assert step_size(p, n) == step
    assert step_count(p, n) == steps
    assert ready_floor(p, n) == floor


@pytest.mark.parametrize(
    "cand,cur,want",
    [(0, 10, 0.0), (3, 10, 3 / 13), (10, 0, 1.0), (5, 5, 0.5), (0, 0, None)],
)
def test_candidate_share(cand, cur, want):
    assert candidate_share(cand, cur) == want


@pytest.mark.parametrize(
    "sizes,old,new,want",
    [
        # the Kubernetes docs example: 8 old / 5 new, surge 3, desired 10 → 15
        ({"current": 8, "candidate": 5}, 13, 18, {"current": 11, "candidate": 7}),
        # scaling down keeps the split: 6/4 of 10 → 3/2 of 5
        ({"current": 6, "candidate": 4}, 10, 5, {"current": 3, "candidate": 2}),
        # a version at zero stays at zero
        ({"current": 10, "candidate": 0}, 10, 15, {"current": 15, "candidate": 0}),
        # rounding leftovers go to the largest version
        ({"current": 5, "candidate": 5}, 10, 11, {"current": 5, "candidate": 6}),
        ({"current": 1, "candidate": 1}, 2, 3, {"current": 1, "candidate": 2}),
        # no change
        ({"current": 3, "candidate": 2}, 5, 5, {"current": 3, "candidate": 2}),
    ],
)
def test_proportional_resize(sizes, old, new, want):
    got = proportional_resize(sizes, old, new)
    assert got == want
    assert sum(got.values()) == new
