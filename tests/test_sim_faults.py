"""Faults and bounded drains: failed starts fail the rollout through the controller's
`max_start_failures`, crashes lose their requests in flight and are replaced cold, and a
draining replica gets `graceful_shutdown_timeout_s` before its requests fail."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_sim_rollout import AT_S, COLD_S, PERIOD_S, N, steady

from rollout import history as h
from sim.api import simulate

CHECKED_S = math.ceil(COLD_S / PERIOD_S) * PERIOD_S  # a start is judged at a health check


def test_a_crash_looping_candidate_fails_the_step_and_rolls_back():
    policy = {"max_surge_percent": 25, "max_start_failures": 3}
    result = simulate(steady(policy, rollout__candidate={"faults": {"start_failure_rate": 1.0}}))
    s, reps = result.summary, result.replicas
    assert s["outcome"] == "failed" and s["steps"] == 0
    (finished,) = [e for e in result.events if isinstance(e, h.Finished)]
    # the 3 candidates of the first step fail at the same health check (3: within the limit);
    # Serve's replacements fail one cold start later, and 6 > 3 fails the step
    assert finished.reason == "candidate replicas failed to start 6 times"
    assert finished.t == AT_S + 2 * CHECKED_S
    failed = reps[reps["stop_reason"] == "start_failed"]
    assert (failed["version"] == "candidate").all()
    assert len(failed) == 6
    first = failed.sort_values("replica_id").head(3)
    assert list(first["gpu_s"]) == [AT_S] * 3
    # a failed start held its GPU for the time it took
    assert np.allclose(failed["stopped_s"] - failed["gpu_s"], CHECKED_S)
    # each failure is replaced at once by a new replica of the same version
    replaced = reps[reps["created_s"].isin(failed["stopped_s"]) & (reps["version"] == "candidate")]
    assert len(replaced) >= 3
    # rolled back: no traffic ever reached the candidate, the fleet is whole again
    assert (result.timeline["candidate_weight"] == 0).all()
    last = result.timeline.iloc[-1]
    assert last["current_ready"] == N and last["candidate_ready"] == 0
    assert s["failed"] == 0  # no request was lost: failed starts never served


def test_failed_starts_under_the_limit_only_slow_the_rollout():
    policy = {"max_surge_percent": 25, "max_start_failures": 1000}
    faulty = simulate(
        steady(policy, rollout__candidate={"faults": {"start_failure_rate": 0.3}}, seed=5)
    )
    clean = simulate(steady(policy, seed=5))
    assert faulty.summary["outcome"] == clean.summary["outcome"] == "succeeded"
    failed = faulty.replicas["stop_reason"] == "start_failed"
    assert failed.sum() > 0
    assert faulty.summary["rollout_duration_s"] > clean.summary["rollout_duration_s"]


def test_crashes_lose_requests_in_flight_and_restart_cold():
    """2 crashes per replica-hour on 10 replicas over 40 minutes, 30 s requests."""
    result = simulate(
        steady(
            {"max_surge_percent": 25},
            service={"kind": "deterministic", "mean_s": 30.0},
            faults={"crash_per_replica_hour": 2.0},
            fleet__max_ongoing_requests=16,
            rollout=None,
        )
    )
    req, reps = result.requests, result.replicas
    crashed = reps[reps["stop_reason"] == "crashed"]
    # about 2 × 10 replicas × 0.67 h = 13 crashes (less the time spent restarting)
    assert 4 <= len(crashed) <= 25
    failed = req[req["failed"]]
    assert result.summary["failed"] == len(failed) > 0
    assert not failed["dropped"].any() and failed["latency_s"].isna().all()
    for _, rep in crashed.iterrows():
        lost = req[(req["replica_id"] == rep["replica_id"]) & req["failed"]]
        assert np.allclose(lost["end_s"], rep["stopped_s"])  # failed at the crash
        # Serve replaced it at once with a new replica that starts cold
        new = reps[np.isclose(reps["created_s"], rep["stopped_s"])]
        assert len(new) >= 1
        ready = new["ready_s"].dropna()  # the run may end before it is ready
        assert (ready - new.loc[ready.index, "gpu_s"] >= COLD_S).all()
    served = req[~req["failed"] & ~req["dropped"]]
    assert np.allclose(served["end_s"] - served["start_s"], 30.0)  # the others were unharmed
    s = result.summary
    assert s["requests"] == s["completed"] + s["dropped"] + s["failed"]


def test_a_drain_longer_than_the_timeout_fails_what_still_runs():
    """30 s requests, 20 s graceful shutdown: a removed replica stops 20 s after its removal
    and its requests still running fail then; with 60 s, every request finishes."""
    policy = {"max_unavailable_percent": 25}
    service = {"kind": "deterministic", "mean_s": 30.0}
    short = simulate(steady(policy, service=service, fleet__graceful_shutdown_timeout_s=20.0))
    reps, req = short.replicas, short.requests
    timed_out = reps[reps["stop_reason"] == "drain_timeout"]
    assert len(timed_out) > 0
    removed = [e.t for e in short.events if isinstance(e, h.Scaled) and e.version == "current"]
    for _, rep in timed_out.iterrows():
        assert any(np.isclose(rep["stopped_s"], t + 20.0) for t in removed)
        lost = req[(req["replica_id"] == rep["replica_id"]) & req["failed"]]
        assert len(lost) > 0 and np.allclose(lost["end_s"], rep["stopped_s"])
    assert short.summary["failed"] == int(req["failed"].sum()) > 0

    long = simulate(steady(policy, service=service, fleet__graceful_shutdown_timeout_s=60.0))
    assert long.summary["failed"] == 0
    assert (long.replicas["stop_reason"] != "drain_timeout").all()


@pytest.mark.parametrize("rate", [1.5, -0.1])
def test_fault_rates_outside_zero_and_one_are_rejected(rate):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="start_failure_rate"):
        steady({"max_surge_percent": 25}, faults={"start_failure_rate": rate})
