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
        (3, 1, SURGE_25, 3, False, "even a pool of 1 needs room for 2 and the cluster can hold 1"),
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
    assert "even a pool of 6 needs room for 9" in cap.reason


def test_pool_limit_by_mode() -> None:
    assert pool_limit(SURGE_25, 12) == 9  # 9 + 3
    assert pool_limit(UNAVAILABLE_25, 12) == 12


# ---- the controller applies the cap -----------------------------------------------------------


def _bounded(capacity: int):
    """A check that the controller never asks for more replicas than `capacity`."""

    def check(d, cl, decision, seen, weight) -> None:
        s = d.state
        assert s.current_target + s.candidate_target <= capacity

    return check


def test_the_autoscaler_raising_desired_mid_surge_is_capped_so_the_step_fits() -> None:
    """8 replicas' worth of GPUs, surge 50 %, a pool of 4 asked to grow to 8 at t=12: the
    controller drives 5 (5 + ceil(2.5) = 8 fit; 8 + 4 would need 12) and records why once."""
    from fake_cluster import FakeCluster
    from sim_loop import Script, run

    cl = FakeCluster(desired=4, start_delay=(5, 5), capacity=8)
    d = run(SURGE_50, cl, Script(desired=[(12.0, 8)]), _bounded(8))
    capped = [e for e in d.history if e.kind == "capped"]
    assert [(e.desired, e.allowed, e.capacity) for e in capped] == [(8, 5, 8)]
    assert capped[0].reason == (
        "desired 8 capped at 5: 5 + a surge of 3 use the 8 replicas the cluster can hold"
    )
    assert d.state.phase.value == "succeeded"
    assert (d.state.desired, d.state.candidate_target) == (5, 5)


def test_unavailable_mode_never_grows_past_what_the_cluster_holds() -> None:
    from fake_cluster import FakeCluster
    from sim_loop import Script, run

    cl = FakeCluster(desired=6, start_delay=(5, 5), capacity=8)
    d = run(UNAVAILABLE_25, cl, Script(desired=[(1.0, 12)]), _bounded(8))
    assert [(e.desired, e.allowed) for e in d.history if e.kind == "capped"] == [(12, 8)]
    assert d.state.candidate_target == 8


def test_a_pool_whose_smallest_step_does_not_fit_keeps_its_size_and_says_why() -> None:
    """One replica's worth of GPUs: even 1 + 1 does not fit, so nothing is capped; the step
    waits for GPUs (and fails at its deadline, as without a cap)."""
    from fake_cluster import FakeCluster
    from sim_loop import run

    from rollout import controller as c

    cl = FakeCluster(desired=1, start_delay=(5, 5), capacity=1)
    state, _ = c.start(SURGE_25, 1, 0.0)
    d = c.decide(state, cl.observe())
    capped = [e for e in d.events if e.kind == "capped"]
    assert [(e.desired, e.allowed) for e in capped] == [(1, 1)]
    assert capped[0].reason.startswith("even a pool of 1 needs room for 2")
    assert run(SURGE_25, cl).state.desired == 1
