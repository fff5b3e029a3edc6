"""Kubernetes' own deployment-controller test tables, held against our arithmetic.

Rows come from kubernetes/kubernetes `pkg/controller/deployment/` — `rolling_test.go`,
`sync_test.go` and `util/deployment_util_test.go` — where they fit our model: two versions (old =
current, new = candidate) and one non-zero percentage (an absolute maxSurge or maxUnavailable of
2 on 10 replicas is our 20 %; Kubernetes' maxSurge 0 is our unavailable mode, whose headroom is
0). Rows with three replica sets, both values zero, percentages above our 50 %, a desired size
of 0, or feature-gated terminating-pod accounting do not fit and are left out. A few rows whose
Kubernetes deployment has both values set are kept where the function under test reads only the
counts the row passes in (marked so).

Each row names its source test function and row (`t.Run` name, or the scenario index where the
table has no names) and expects the value Kubernetes' test asserts, except the one documented
difference (docs/controller.md, "Where this differs"): Kubernetes fills a surge at once, we add
one step.
"""

from dataclasses import replace

import pytest

from rollout import controller as c
from rollout.planner import (
    outgoing_removal,
    proportion,
    proportional_resize,
    ready_floor,
    surge_count,
    unavailable_count,
)
from rollout.policy import RolloutPolicy

ROLLING = "rolling_test.go"
SYNC = "sync_test.go"
UTIL = "util/deployment_util_test.go"

SURGE_20 = RolloutPolicy(max_surge_percent=20)  # maxSurge 2 of 10
UNAVAIL_20 = RolloutPolicy(max_unavailable_percent=20)  # maxUnavailable 2 of 10 (maxSurge 0)


def observe(n: int, cur_ready: int, cand_ready: int, cur_starting=0, cand_starting=0, t=1.0):
    return c.Observation(
        time=t,
        desired=n,
        current=c.VersionObservation(ready=cur_ready, starting=cur_starting),
        candidate=c.VersionObservation(ready=cand_ready, starting=cand_starting),
    )


def state(policy, n, old, new, stage=c.Stage.BOUNDARY) -> c.RolloutState:
    started, _ = c.start(policy, n, 0.0)
    return replace(started, current_target=old, candidate_target=new, stage=stage)


def targets_after(s: c.RolloutState, obs: c.Observation) -> tuple[int, int]:
    """(old, new) targets once the controller has acted on this one observation."""
    d = c.decide(s, obs)
    return d.state.current_target, d.state.candidate_target


# ---- rolling_test.go: one sync's scale-up and scale-down ------------------------------------


@pytest.mark.parametrize(
    "source,row,policy,n,old,new,old_ready,new_ready,stage,want,k8s",
    [
        # TestDeploymentController_reconcileNewReplicaSet (maxUnavailable 0: surge mode)
        (
            ROLLING,
            "reconcileNewReplicaSet: should scale up according to the maxSurge when old "
            "replica set is fully saturated",
            SURGE_20, 10, 10, 0, 10, 0, c.Stage.BOUNDARY, (10, 2), (10, 2),
        ),
        (
            ROLLING,
            "reconcileNewReplicaSet: should scale up according to the maxSurge",
            # the documented difference: Kubernetes fills to N + surge − total = 7 at once;
            # a step of ours adds one step's surge
            SURGE_20, 10, 5, 0, 5, 0, c.Stage.BOUNDARY, (5, 2), (5, 7),
        ),
        (
            ROLLING,
            "reconcileNewReplicaSet: should not scale when maxSurge is fully saturated",
            # the saturated state is ours mid-step: 2 candidates starting
            SURGE_20, 10, 10, 2, 10, 0, c.Stage.WAIT_HEALTHY, (10, 2), (10, 2),
        ),
        (
            ROLLING,
            "reconcileNewReplicaSet: should scale down when there are replicas above maxSurge",
            # the new version is scaled to N (and the old one, all replaced, to 0)
            SURGE_20, 10, 2, 11, 2, 11, c.Stage.BOUNDARY, (0, 10), (0, 10),
        ),
        # TestDeploymentController_reconcileOldReplicaSets (maxSurge 0: unavailable mode)
        (
            ROLLING,
            "reconcileOldReplicaSets: scenario 1",
            UNAVAIL_20, 10, 10, 0, 10, 0, c.Stage.BOUNDARY, (8, 0), (8, 0),
        ),
        (
            ROLLING,
            "reconcileOldReplicaSets: scenario 2, expect unhealthy replicas from old replica "
            "sets been cleaned up",
            UNAVAIL_20, 10, 10, 0, 8, 0, c.Stage.BOUNDARY, (8, 0), (8, 0),
        ),
        (
            ROLLING,
            "reconcileOldReplicaSets: scenario 3, expect 1 unhealthy replica from old replica "
            "sets been cleaned up, and 1 ready pod been scaled down",
            UNAVAIL_20, 10, 10, 0, 9, 0, c.Stage.BOUNDARY, (8, 0), (8, 0),
        ),
        (
            ROLLING,
            "reconcileOldReplicaSets: scenario 4, the unavailable pods from the newRS would "
            "not make us scale down old RSs in a further step",
            UNAVAIL_20, 10, 8, 2, 8, 0, c.Stage.BOUNDARY, (8, 2), (8, 2),
        ),
    ],
)  # fmt: skip
def test_one_sync(source, row, policy, n, old, new, old_ready, new_ready, stage, want, k8s):
    obs = observe(n, old_ready, new_ready, old - old_ready, new - new_ready)
    assert targets_after(state(policy, n, old, new, stage), obs) == want
    if want != k8s:  # only the documented difference may disagree
        assert row == "reconcileNewReplicaSet: should scale up according to the maxSurge"


@pytest.mark.parametrize(
    "source,row,budget,old,ready,unready,floor,want",
    [
        # TestDeploymentController_cleanupUnhealthyReplicas: maxCleanupCount is the budget (the
        # row's deployment sets both values to 2; the function reads only the counts)
        (ROLLING, "cleanupUnhealthyReplicas: scenario 0", 1, 10, 8, 2, 10, (1, 0)),
        (ROLLING, "cleanupUnhealthyReplicas: scenario 1", 3, 10, 8, 2, 10, (2, 0)),
        (ROLLING, "cleanupUnhealthyReplicas: scenario 2", 0, 10, 8, 2, 10, (0, 0)),
        (ROLLING, "cleanupUnhealthyReplicas: scenario 3", 3, 10, 10, 0, 10, (0, 0)),
        # TestDeploymentController_scaleDownOldReplicaSetsForRollingUpdate: only ready ones
        # are scaled down there, down to MinAvailable = 10 − 2
        (ROLLING, "scaleDownOldReplicaSetsForRollingUpdate: scenario 1", 2, 10, 10, 0, 8, (0, 2)),
        (ROLLING, "scaleDownOldReplicaSetsForRollingUpdate: scenario 2", 2, 10, 8, 2, 8, (2, 0)),
        (ROLLING, "scaleDownOldReplicaSetsForRollingUpdate: scenario 4", 2, 10, 1, 9, 8, (2, 0)),
    ],
)
def test_outgoing_removal(source, row, budget, old, ready, unready, floor, want):
    assert outgoing_removal(budget, old, unready, ready, floor) == want


# ---- sync_test.go TestScale: proportional scaling -------------------------------------------


@pytest.mark.parametrize(
    "source,row,n_from,n_to,old,new,want",
    [
        (SYNC, "normal scaling event: 10 -> 12", 10, 12, 10, 0, (12, 0)),
        (SYNC, "normal scaling event: 10 -> 5", 10, 5, 10, 0, (5, 0)),
        (SYNC, "proportional scaling: 5 -> 10", 5, 10, 3, 2, (6, 4)),
        (SYNC, "proportional scaling: 5 -> 3", 5, 3, 3, 2, (2, 1)),
        (SYNC, "proportional scaling: 9 -> 4", 9, 4, 1, 8, (0, 4)),
        (SYNC, "proportional scaling (no new rs): 4 -> 5", 4, 5, 2, 2, (2, 3)),
        (SYNC, "change both size and template", 10, 14, 3, 7, (4, 10)),
    ],
)
def test_resize_keeps_the_split(source, row, n_from, n_to, old, new, want):
    # maxSurge 0 there: our unavailable mode, whose bound is N
    s = state(UNAVAIL_20, n_from, old, new)
    d = c.decide(s, observe(n_to, old, new))
    (resized,) = [e for e in d.events if e.kind == "resized"]
    assert (resized.current_replicas, resized.candidate_replicas) == want


def test_resize_rounds_halves_away_from_zero():
    """sync.go `scale()` with Go's math.Round: 3 old / 2 new mid-step, N = 4, 25 % surge (1),
    resized to 2: allowed 2 + 1 = 3; old round(3·3/5 = 1.8) = 2, new round(2·3/5 = 1.2) = 1.
    Python's round() (halves to even) took round(5·2/4 = 2.5) = 2 for the total: 1/1."""
    s = state(RolloutPolicy(max_surge_percent=25), 4, 3, 2, c.Stage.WAIT_HEALTHY)
    d = c.decide(s, observe(2, 3, 0, cand_starting=2))
    (resized,) = [e for e in d.events if e.kind == "resized"]
    assert (resized.current_replicas, resized.candidate_replicas) == (2, 1)


@pytest.mark.parametrize(
    "source,row,sizes,old_allowed,new_allowed,want",
    [
        # absolute surges that no single percentage gives at both sizes: the arithmetic only
        (SYNC, "deployment with surge pods", (6, 6), 10 + 2, 20 + 2, (11, 11)),
        (SYNC, "change both surge and size", (8, 5), 10 + 3, 50 + 6, (34, 22)),
    ],
)
def test_proportional_resize(source, row, sizes, old_allowed, new_allowed, want):
    got = proportional_resize(
        {"current": sizes[0], "candidate": sizes[1]}, old_allowed, new_allowed
    )
    assert (got["current"], got["candidate"]) == want


# ---- util/deployment_util_test.go ----------------------------------------------------------


@pytest.mark.parametrize(
    "source,row,fn,percent,n,want",
    [
        (UTIL, "TestResolveFenceposts: 4 (maxSurge nil, maxUnavailable 39%)", "unavail", 39, 10, 3),
        (UTIL, "TestResolveFenceposts: 5 (maxSurge 39%, maxUnavailable nil)", "surge", 39, 10, 4),
        # the rows' deployments also set maxSurge 1, which MaxUnavailable does not read
        (UTIL, "TestMaxUnavailable: maxUnavailable less than replicas", "unavail", 50, 10, 5),
        (
            UTIL,
            "TestMaxUnavailable: maxUnavailable less than replicas with percents",
            "unavail",
            50,
            10,
            5,
        ),
        (UTIL, "TestMinAvailable: replicas greater than maxUnavailable", "floor", 50, 10, 5),
    ],
)
def test_rounding(source, row, fn, percent, n, want):
    got = {
        "surge": lambda: surge_count(percent, n),
        "unavail": lambda: unavailable_count(percent, n),
        "floor": lambda: ready_floor(RolloutPolicy(max_unavailable_percent=percent), n),
    }[fn]()
    assert got == want


@pytest.mark.parametrize(
    "source,row,size,old_allowed,new_allowed,want",
    [
        # TestGetReplicaSetFraction: (D + maxSurge) over the max-replicas annotation (the rows'
        # deployments set maxUnavailable 1, which the fraction does not read)
        (UTIL, "scale up by 1/5 should increase RS replicas by 1/5", 50, 100, 120, 10),
        (
            UTIL,
            "scale up with maxSurge by 1/5 should increase RS replicas approximately by 1/5",
            50, 110, 120 + 10, 9,
        ),
        (UTIL, "scale down by 1/6 should decrease RS replicas by 1/6", 6, 12, 10, -1),
        (
            UTIL,
            "scale down with maxSurge by 1/6 should decrease RS replicas approximately by 1/6",
            50, 130, 100 + 10, -8,
        ),
    ],
)  # fmt: skip
def test_replica_set_fraction(source, row, size, old_allowed, new_allowed, want):
    assert proportion(size, old_allowed, new_allowed) == want
