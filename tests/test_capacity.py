"""The pool's cap against the cluster's GPUs, from tables worked by hand."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rollout.capacity import cap_desired, pool_limit, replicas_fitting, step_room, surge_limit
from rollout.planner import surge_count
from rollout.policy import RolloutPolicy

SURGE_50 = RolloutPolicy(max_surge_percent=50)
SURGE_25 = RolloutPolicy(max_surge_percent=25)
UNAVAILABLE_25 = RolloutPolicy(max_unavailable_percent=25)


@pytest.mark.parametrize(
    "gpus,per_replica,fits",
    [(8, 1, 8), (8, 0.5, 16), (7, 2, 3), (0, 1, 0), (0.9999999999, 1, 1), (8, 0, None)],
)
def test_replicas_fitting(gpus: float, per_replica: float, fits: int | None) -> None:
    assert replicas_fitting(gpus, per_replica) == fits


@pytest.mark.parametrize(
    "capacity,percent,limit",
    [
        (8, 50, 5),  # 5 + ceil(2.5) = 8; 6 + 3 = 9
        (8, 25, 6),  # 6 + ceil(1.5) = 8; 7 + 2 = 9
        (10, 25, 8),  # 8 + 2 = 10
        (12, 50, 8),  # 8 + 4 = 12
        (8, 10, 7),  # 7 + 1 = 8
        (100, 10, 90),  # 90 + 9 = 99; 91 + ceil(9.1) = 101
        (2, 50, 1),  # 1 + 1
        (1, 50, 0),  # not even one replica and its surge
        (0, 25, 0),
    ],
)
def test_surge_limit(capacity: int, percent: int, limit: int) -> None:
    assert surge_limit(capacity, percent) == limit


@given(capacity=st.integers(0, 500), percent=st.integers(1, 50))
def test_surge_limit_is_the_largest_pool_that_fits(capacity: int, percent: int) -> None:
    n = surge_limit(capacity, percent)
    assert n == 0 or n + surge_count(percent, n) <= capacity
    assert n + 1 + surge_count(percent, n + 1) > capacity


@pytest.mark.parametrize(
    "desired,capacity,policy,allowed,capped,words",
    [
        (8, 8, SURGE_50, 5, True, "desired 8 capped at 5: 5 + a surge of 3 use the 8"),
        (4, 8, SURGE_50, 4, False, ""),  # 4 + 2 = 6 fits
        (5, 8, SURGE_50, 5, False, ""),  # exactly full
        (12, 10, SURGE_25, 8, True, "capped at 8: 8 + a surge of 2 use the 10"),
        (10, 8, UNAVAILABLE_25, 8, True, "capped at 8: the cluster can hold 8 replicas"),
        (6, 8, UNAVAILABLE_25, 6, False, ""),
        (3, 1, SURGE_25, 3, False, "even 1 replicas need room for 2 and the cluster can hold 1"),
        (9, None, SURGE_50, 9, False, ""),  # the backend does not know: no cap
    ],
)
def test_cap_desired(
    desired: int,
    capacity: int | None,
    policy: RolloutPolicy,
    allowed: int,
    capped: bool,
    words: str,
) -> None:
    cap = cap_desired(desired, capacity, policy)
    assert (cap.allowed, cap.capped) == (allowed, capped)
    assert words in cap.reason and bool(cap.reason) == bool(words)
    if capacity is not None and cap.capped:
        assert step_room(policy, cap.allowed) <= capacity  # never more than the cluster gives


def test_the_minimum_is_the_callers() -> None:
    """With a floor of 6 (say min_replicas) and room for 5 + 3, the pool is not shrunk below
    what it needs anyway: the desired size stays, and the reason says the step will wait."""
    cap = cap_desired(8, 8, SURGE_50, minimum=6)
    assert cap.allowed == 8 and not cap.capped
    assert "even 6 replicas need room for 9" in cap.reason


def test_pool_limit_by_mode() -> None:
    assert pool_limit(SURGE_25, 12) == 9  # 9 + 3
    assert pool_limit(UNAVAILABLE_25, 12) == 12
