"""Rollouts on a steady fleet with deterministic cold starts: the timeline must show the mode's
replica bounds exactly, the planned number of steps, the analytic duration, and weights equal
to the candidate's share of ready replicas."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import pytest

from rollout import history as h
from rollout.planner import step_count, step_size
from rollout.policy import RolloutPolicy
from rollout.scenario import Scenario
from sim.api import SimResult, simulate

N = 10
COLD_S = 115.0  # not a multiple of the period: the health check adds 5 s
PERIOD_S = 10.0
STAB_S = 60.0
AT_S = 300.0


def steady(policy: dict[str, Any], **changes: Any) -> Scenario:
    """A steady fleet of N replicas, light Poisson load, short deterministic requests."""
    raw: dict[str, Any] = {
        "name": "steady",
        "seed": 3,
        "trace": {"synthetic": {"process": "poisson", "rate_per_s": 4.0, "duration_s": 2400}},
        "service": {"kind": "deterministic", "mean_s": 0.5},
        "fleet": {"replicas": N, "gpu_capacity": 16, "max_ongoing_requests": 2},
        "cold_start": {"kind": "deterministic", "seconds": COLD_S},
        "health_check": {"period_s": PERIOD_S},
        "rollout": {
            "at_s": AT_S,
            "policy": {"stabilization_time_seconds": STAB_S, **policy},
        },
    }
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            raw[section] = {**raw.get(section, {}), field: value}
        else:
            raw[section] = value
    return Scenario.model_validate(raw)


def holding(tl: pd.DataFrame) -> pd.Series:
    cols = [f"{v}_{s}" for v in ("current", "candidate") for s in ("ready", "starting", "draining")]
    return tl[cols].sum(axis=1)


def ready(tl: pd.DataFrame) -> pd.Series:
    return tl["current_ready"] + tl["candidate_ready"]


def at(tl: pd.DataFrame, t: float) -> pd.Series:
    """The timeline row in effect just after everything that happened at time t."""
    return tl[tl["t_s"] <= t + 1e-9].iloc[-1]


def analytic_duration(steps: int) -> float:
    """Per step: cold start, then the wait for the next health check; stabilization between
    steps (the last step has none)."""
    health_wait = math.ceil(COLD_S / PERIOD_S) * PERIOD_S - COLD_S
    return steps * (COLD_S + health_wait) + (steps - 1) * STAB_S


@pytest.fixture(scope="module")
def surge() -> SimResult:
    return simulate(steady({"max_surge_percent": 25}))


@pytest.fixture(scope="module")
def unavailable() -> SimResult:
    return simulate(steady({"max_unavailable_percent": 25}))


def test_surge_bounds_are_exact(surge):
    tl = surge.timeline
    surge_n = step_size(RolloutPolicy(max_surge_percent=25), N)  # ceil(2.5) = 3
    assert holding(tl).max() == N + surge_n == 13
    assert tl["gpus_in_use"].max() == 13
    assert ready(tl).min() == N  # never below the target while the fleet is steady
    assert surge.summary["peak_gpus"] == 13
    assert surge.summary["min_ready_replicas"] == N


def test_unavailable_bounds_are_exact(unavailable):
    tl = unavailable.timeline
    assert holding(tl).max() == N  # never above the target, although 6 GPUs are spare
    assert tl["gpus_in_use"].max() == N
    assert ready(tl).min() == N - 2  # floor(2.5) = 2 unavailable
    assert unavailable.summary["min_ready_replicas"] == N - 2


@pytest.mark.parametrize(
    "fixture,policy",
    [
        ("surge", RolloutPolicy(max_surge_percent=25)),
        ("unavailable", RolloutPolicy(max_unavailable_percent=25)),
    ],
)
def test_steps_and_duration_match_the_plan(request, fixture, policy):
    result: SimResult = request.getfixturevalue(fixture)
    steps = step_count(policy, N)  # 4 for surge (3 per step), 5 for unavailable (2 per step)
    assert steps == {"surge": 4, "unavailable": 5}[fixture]
    s = result.summary
    assert s["outcome"] == "succeeded"
    assert s["steps"] == steps
    assert len([e for e in result.events if isinstance(e, h.StepCompleted)]) == steps
    assert s["rollout_start_s"] == AT_S
    expected = analytic_duration(steps)
    # drains of in-flight requests (0.5 s each) are the only extra time
    assert expected <= s["rollout_duration_s"] <= expected + steps * PERIOD_S
    assert s["rollout_duration_s"] == pytest.approx(expected, abs=steps * 0.5 + 1e-6)


def test_a_step_finishes_at_the_first_health_check_after_cold_start(surge):
    done = [e.t for e in surge.events if isinstance(e, h.StepCompleted)]
    # step k starts at AT_S + (k−1)·(120 + 60); its replicas turn ready 120 s later
    assert done == pytest.approx([AT_S + 120 + k * (120 + STAB_S) for k in range(4)])
    reps = surge.replicas[surge.replicas["version"] == "candidate"]
    assert ((reps["ready_s"] - reps["gpu_s"]) == 120.0).all()


@pytest.mark.parametrize("fixture", ["surge", "unavailable"])
def test_weights_equal_the_ready_share(request, fixture):
    result: SimResult = request.getfixturevalue(fixture)
    tl = result.timeline
    steps = [e for e in result.events if isinstance(e, h.StepCompleted)]
    for e in steps:
        row = at(tl, e.t)
        share = row["candidate_ready"] / (row["candidate_ready"] + row["current_ready"])
        assert e.candidate_weight == pytest.approx(share)
        assert row["candidate_weight"] == pytest.approx(share)
    # at no instant does the candidate get more than its share, nor traffic without replicas
    total = ready(tl)
    assert (total > 0).all()
    assert (tl["candidate_weight"] <= tl["candidate_ready"] / total + 1e-9).all()
    weights = [w for w in tl["candidate_weight"].unique()]
    assert weights == sorted(weights)  # only forward moves
    assert weights[-1] == 1.0


@pytest.mark.parametrize("fixture", ["surge", "unavailable"])
def test_router_follows_the_weight(request, fixture):
    """While a weight holds, the candidate serves that share of the arriving requests."""
    result: SimResult = request.getfixturevalue(fixture)
    req, tl = result.requests, result.timeline
    changes = tl[tl["candidate_weight"].diff().fillna(1.0) != 0]
    bounds = [*changes["t_s"], np.inf]
    checked = 0
    pairs = zip(changes[["t_s", "candidate_weight"]].to_numpy(), bounds[1:], strict=True)
    for (t0, w), t1 in pairs:
        window = req[(req["arrival_s"] > t0 + 1) & (req["arrival_s"] < t1)]
        if len(window) < 100:
            continue
        share = (window["version"] == "candidate").mean()
        sigma = math.sqrt(w * (1 - w) / len(window))
        assert abs(share - w) <= 4 * sigma
        checked += 1
    assert checked >= 4  # before, at least two partial weights, after


@pytest.mark.parametrize("fixture", ["surge", "unavailable"])
def test_requests_only_run_on_ready_replicas_within_their_slots(request, fixture):
    result: SimResult = request.getfixturevalue(fixture)
    req = result.requests[~result.requests["dropped"]]
    reps = result.replicas.set_index("replica_id")
    ready_at = reps.loc[req["replica_id"], "ready_s"].to_numpy()
    stopped = reps.loc[req["replica_id"], "stopped_s"].fillna(np.inf).to_numpy()
    assert (req["start_s"].to_numpy() >= ready_at).all()
    assert (req["end_s"].to_numpy() <= stopped).all()  # a replica stops after draining
    # concurrency per replica never exceeds max_ongoing_requests
    for _, group in req.groupby("replica_id"):
        times = np.concatenate([group["start_s"], group["end_s"]])
        delta = np.concatenate([np.ones(len(group)), -np.ones(len(group))])
        order = np.lexsort((delta, times))  # ends before starts at equal times
        assert np.cumsum(delta[order]).max() <= 2


def test_gpus_count_every_replica_that_holds_one(surge, unavailable):
    for result in (surge, unavailable):
        tl = result.timeline
        assert (tl["gpus_in_use"] == holding(tl) - tl["pending_gpu"]).all()


def test_same_seed_same_numbers():
    scenario = steady(
        {"max_surge_percent": 25},
        trace__synthetic={"process": "poisson", "rate_per_s": 6.0, "duration_s": 1200},
    )
    a, b = simulate(scenario), simulate(scenario)
    assert a.summary == b.summary
    pd.testing.assert_frame_equal(a.requests, b.requests)
    pd.testing.assert_frame_equal(a.timeline, b.timeline)
    assert h.dump_jsonl(a.events) == h.dump_jsonl(b.events)
    c = simulate(scenario, seed=4)
    assert not a.requests["arrival_s"].equals(c.requests["arrival_s"])


def test_policies_see_the_same_requests():
    """Common random numbers: two policies, one seed, identical arrivals and request sizes."""
    a = simulate(steady({"max_surge_percent": 25}))
    b = simulate(steady({"max_unavailable_percent": 25}))
    assert a.requests["arrival_s"].equals(b.requests["arrival_s"])
    size_a = a.requests["end_s"] - a.requests["start_s"]
    size_b = b.requests["end_s"] - b.requests["start_s"]
    assert np.allclose(size_a, size_b)
