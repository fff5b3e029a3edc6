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


def test_a_surge_short_of_gpus_shrinks_the_pool_so_that_its_steps_fit():
    """10 replicas on 11 GPUs, surge 25 %: 10 + 3 does not fit. The largest pool whose step
    fits is 8 (8 + 2 = 10 ≤ 11; 9 + 3 = 12 > 11), so the controller drives 8, says why, and
    the rollout completes in 8 / 2 = 4 steps instead of failing at its deadline."""
    result = simulate(steady({"max_surge_percent": 25}, fleet__gpu_capacity=N + 1))
    capped = [e for e in result.events if isinstance(e, h.Capped)]
    assert [(e.t, e.desired, e.allowed, e.capacity) for e in capped] == [(AT_S, N, 8, N + 1)]
    assert capped[0].reason == (
        "desired 10 capped at 8: 8 + a surge of 2 use the 11 replicas the cluster can hold"
    )
    s = result.summary
    assert (s["outcome"], s["steps"], s["pool_capped_at"]) == ("succeeded", 4, 8)
    tl = result.timeline
    assert tl["gpus_in_use"].max() <= N + 1  # never more than the cluster has
    assert tl.iloc[-1]["candidate_ready"] == 8


def test_a_step_that_cannot_fit_at_all_waits_says_why_and_fails_at_its_deadline():
    """One replica on one GPU: even a pool of 1 needs 2 for a surge step, so nothing is
    capped; the candidate waits for a GPU until the progress deadline rolls the rollout back."""
    result = simulate(steady({"max_surge_percent": 25}, fleet__replicas=1, fleet__gpu_capacity=1))
    tl = result.timeline
    row = tl[tl["t_s"] == AT_S].iloc[-1]
    assert (row["candidate_starting"], row["pending_gpu"], row["gpus_in_use"]) == (1, 1, 1)
    assert tl["gpus_in_use"].max() == 1
    events = result.events
    assert [e.allowed for e in events if isinstance(e, h.Capped)] == [1]
    assert "1 candidate replicas wait for a free GPU" in [
        e.reason for e in events if isinstance(e, h.Waiting)
    ]
    s = result.summary
    assert (s["outcome"], s["steps"]) == ("failed", 0)
    (finished,) = [e for e in events if isinstance(e, h.Finished)]
    assert "1 waiting for a GPU" in finished.reason
    deadline = 600.0
    assert AT_S + deadline < finished.t <= AT_S + deadline + 10  # seen at the next check
    assert (tl["candidate_weight"] == 0).all()  # no traffic ever went to the candidate
    assert (tl["current_ready"] == 1).all()
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


TIGHT = """
name: tight
seed: 5
trace: {synthetic: {process: poisson, rate_per_s: 1.0, duration_s: 600}}
service: {kind: deterministic, mean_s: 0.5}
fleet: {replicas: 4, gpu_capacity: 5, max_ongoing_requests: 2}
cold_start: {kind: deterministic, seconds: 30}
health_check: {period_s: 5}
rollout:
  at_s: 60
  policy: {max_surge_percent: 25, stabilization_time_seconds: 0}
sweep:
  max_surge_percent: [25, 50]
  max_unavailable_percent: []
  stabilization_time_seconds: [0]
  seeds: 1
slo: {latency_p99_s: 5.0}
"""


def test_a_sweep_says_which_policies_the_gpus_capped(tmp_path) -> None:
    """4 replicas on 5 GPUs: surge 25 % (4 + 1) fits; surge 50 % (4 + 2) does not, and the
    largest pool whose step fits is 3 (3 + ceil(1.5) = 5)."""
    import pandas as pd
    from typer.testing import CliRunner

    from rollout.cli import app

    path = tmp_path / "tight.yaml"
    path.write_text(TIGHT)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["sweep", str(path), "--out", str(out), "--workers", "1"])
    assert res.exit_code == 0, res.output
    rows = pd.read_csv(out / "sweep.csv").set_index("max_surge_percent")
    assert rows.loc[50, "pool_capped_at"] == 3 and rows.loc[50, "outcome"] == "succeeded"
    assert np.isnan(rows.loc[25, "pool_capped_at"])
    report = (out / "report.md").read_text()
    assert "capped the pool of `surge=50 stab=0` (down to 3)" in report


def test_serve_drain_loop_stops_a_replica_at_its_first_idle_check():
    """`graceful_shutdown_wait_loop_s: 2`: a removed replica sleeps 2 s, then checks every 2 s,
    and stops (releasing its GPU) at the first check with nothing in flight: a whole number
    (≥ 1) of periods after its removal, never before its last request ends, and not a period
    after it. Without the loop the same run stops replicas at their last request."""
    loop = 2.0

    def run(wait_loop_s: float):  # type: ignore[no-untyped-def]
        return simulate(
            steady(
                {"max_unavailable_percent": 25},
                service={"kind": "deterministic", "mean_s": 30.0},
                fleet__gpu_capacity=N,
                fleet__graceful_shutdown_timeout_s=60.0,
                fleet__graceful_shutdown_wait_loop_s=wait_loop_s,
            )
        )

    result = run(loop)
    req, reps = result.requests, result.replicas
    removals = sorted(
        e.t for e in result.events if isinstance(e, h.Scaled) and e.version == "current"
    )
    removed = reps[(reps["version"] == "current") & reps["stopped_s"].notna()]
    assert len(removed) == N
    for _, rep in removed.iterrows():
        stopped = rep["stopped_s"]
        since = stopped - max(t for t in removals if t <= stopped)
        periods = since / loop
        assert periods >= 1 - 1e-9 and np.isclose(periods, round(periods))
        ends = req.loc[req["replica_id"] == rep["replica_id"], "end_s"]
        assert stopped >= ends.max()
        if round(periods) > 1:
            assert ends.max() > stopped - loop  # the check before still saw a request
    assert result.summary["outcome"] == "succeeded"
    plain = run(0.0)
    assert result.summary["rollout_duration_s"] > plain.summary["rollout_duration_s"]
    before = plain.replicas.loc[removed.index, "stopped_s"]
    assert not np.isclose(removed["stopped_s"], before).all()
