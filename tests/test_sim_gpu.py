"""GPU capacity: replicas wait for a free GPU, hold it until drained, and a surge that does not
fit makes the rollout wait (and say why) instead of overcommitting the cluster."""

from __future__ import annotations

import numpy as np
import pytest
import simpy
from test_sim_rollout import AT_S, N, steady

from rollout import history as h
from rollout.scenario import FleetSpec
from sim.api import simulate
from sim.gpus import GpuSupply
from sim.replica import Replica


def test_surge_short_of_gpus_waits_and_says_why():
    result = simulate(steady({"max_surge_percent": 25}, fleet__gpu_capacity=N + 1))
    tl = result.timeline
    # one surge replica got the spare GPU, the other two wait for one
    row = tl[tl["t_s"] == AT_S].iloc[-1]
    assert (row["candidate_starting"], row["pending_gpu"], row["gpus_in_use"]) == (3, 2, N + 1)
    assert tl["gpus_in_use"].max() == N + 1  # never more than the cluster has
    waits = [e.reason for e in result.events if isinstance(e, h.Waiting)]
    assert "2 candidate replicas wait for a free GPU" in waits
    # the step can never complete: the progress deadline fails the rollout, which rolls back
    s = result.summary
    assert s["outcome"] == "failed"
    assert s["steps"] == 0
    (finished,) = [e for e in result.events if isinstance(e, h.Finished)]
    assert "2 waiting for a GPU" in finished.reason
    deadline = 600.0
    assert AT_S + deadline < finished.t <= AT_S + deadline + 10  # seen at the next check
    # no traffic ever went to the candidate, and the current version kept its full size
    assert (tl["candidate_weight"] == 0).all()
    assert (tl["current_ready"] == N).all()
    assert tl.iloc[-1]["candidate_starting"] == tl.iloc[-1]["pending_gpu"] == 0


def test_unavailable_fits_the_same_cluster():
    result = simulate(steady({"max_unavailable_percent": 25}, fleet__gpu_capacity=N))
    assert result.summary["outcome"] == "succeeded"
    assert result.timeline["gpus_in_use"].max() == N
    assert result.timeline["pending_gpu"].max() == 0  # the controller never asks beyond N


def test_draining_replicas_hold_their_gpus_until_the_last_request_ends():
    """Long requests (30 s): removed replicas drain, and candidates in unavailable mode start
    only in the capacity that drained replicas released."""
    result = simulate(
        steady(
            {"max_unavailable_percent": 25},
            service={"kind": "deterministic", "mean_s": 30.0},
            fleet__gpu_capacity=N,
            fleet__graceful_shutdown_timeout_s=60.0,  # longer than a request: all drain
        )
    )
    tl, req, reps = result.timeline, result.requests, result.replicas
    assert tl["current_draining"].max() > 0
    assert (tl["gpus_in_use"] <= N).all()
    removed = reps[(reps["version"] == "current") & reps["stopped_s"].notna()]
    assert len(removed) == N
    drained = 0
    for _, rep in removed.iterrows():
        ends = req.loc[req["replica_id"] == rep["replica_id"], "end_s"]
        assert rep["stopped_s"] >= ends.max()
        if rep["stopped_s"] > AT_S and np.isclose(rep["stopped_s"], ends.max()):
            drained += 1  # it stopped exactly when its last in-flight request finished
    assert drained > 0
    # every candidate got its GPU no earlier than some current replica released one
    cand = reps[reps["version"] == "candidate"].sort_values("gpu_s")
    releases = np.sort(removed["stopped_s"].to_numpy())
    assert (cand["gpu_s"].to_numpy() >= releases[: len(cand)]).all()
    assert result.summary["outcome"] == "succeeded"


def test_gpu_supply_is_first_come_first_served():
    granted: list[Replica] = []
    fleet = FleetSpec(replicas=1, gpus_per_replica=2, gpu_capacity=4)
    pool = GpuSupply(simpy.Environment(), fleet, None, on_grant=granted.extend, on_change=list)
    a, b, c, d = (Replica(i, 0, 0.0) for i in range(4))
    assert pool.request(a) and pool.request(b)
    assert not pool.request(c)
    assert not pool.request(d)
    pool.cancel(c)
    pool.release(a)
    assert granted == [d]  # c left the queue; d is next
    assert pool.in_use == 4
    pool.release(b)
    assert granted == [d]
    assert pool.in_use == 2


def test_gpus_per_replica_count():
    result = simulate(
        steady({"max_surge_percent": 25}, fleet__gpus_per_replica=2, fleet__gpu_capacity=26)
    )
    assert result.timeline["gpus_in_use"].max() == 26  # 13 replicas × 2 GPUs
    assert result.summary["gpu_hours"] == pytest.approx(
        2 * _replica_hours(result.timeline, result.summary["span_s"]), rel=1e-9
    )


def _replica_hours(tl, end):
    held = tl["current_ready"] + tl["current_starting"] + tl["current_draining"]
    held = held + tl["candidate_ready"] + tl["candidate_starting"] + tl["candidate_draining"]
    held = held - tl["pending_gpu"]
    spans = np.diff(np.append(tl["t_s"].to_numpy(), end))
    return float((held.to_numpy() * spans).sum() / 3600)
