"""The metric guard in the simulator: a bad release's detection time and blast radius on a
deterministic case, worked out by hand; and the summary fields of a good release."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml

from rollout.scenario import load_scenario
from sim.api import simulate


def scenario(tmp_path, action: str, error_rate: float = 1.0) -> dict:
    """One replica, a request every 0.25 s (a trace file, not resampled), each taking 25 s on
    a replica that holds up to 128 at once; a rollout at 100 s with a 30 s cold start, health
    checks every 10 s, and a candidate that fails every request at once."""
    trace = tmp_path / "trace.csv"
    pd.DataFrame({"arrival_s": np.arange(0, 300, 0.25)}).to_csv(trace, index=False)
    return {
        "name": "hand",
        "trace": {"path": str(trace), "resample": False},
        "service": {"kind": "deterministic", "mean_s": 25},
        "fleet": {"replicas": 1, "gpu_capacity": 4, "max_ongoing_requests": 128},
        "cold_start": {"seconds": 30},
        "health_check": {"period_s": 10},
        "rollout": {
            "at_s": 100,
            "policy": {
                "max_surge_percent": 50,
                "guard": {
                    "window_s": 60,
                    "min_requests": 20,
                    "max_error_rate": 0.5,
                    "action": action,
                },
            },
            "candidate": {"error_rate": error_rate},
        },
    }


def run(tmp_path, spec: dict):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    return simulate(load_scenario(path))


@pytest.mark.parametrize("action,bad", [("cancel", 200), ("force_cancel", 40)])
def test_detection_time_and_blast_radius_match_the_hand_calculation(tmp_path, action, bad):
    """By hand: the candidate starts at 100 s and is ready at the health check at 130 s; the
    rollout's one step shifts all traffic to it then (the old replica drains its requests).
    The arrival at 130.0 s comes before the control plane at the same instant, so the first
    bad request is the one at 130.25 s. The 20th fails at 135 s; the controller next looks at
    its heartbeat at 140 s, sees 40 failed of 40 (the arrival at 140.0 included) over the
    60 s window and acts: detect_s = 140 − 130.25 = 9.75 s.

    Blast radius: the old replica was killed at its 20 s drain deadline (150 s), and the pool's
    bound (1 + 1 surge) leaves room for a new current replica only then. `cancel` ramps back:
    the current replica starts at 150 s, is ready at 180 s, and traffic moves back then: the
    arrivals in (130, 180] reach the bad release, 200 of them. `force_cancel` removes the
    candidate at once (with no room to start a current replica first, the pool of one takes
    the downtime its own bound allows): the arrivals in (130, 140], 40, reach it; later ones
    wait at the router for the current replica."""
    result = run(tmp_path, scenario(tmp_path, action))
    s = result.summary
    assert s["outcome"] == "cancelled"
    assert s["guard_tripped_s"] == 140.0
    assert s["detect_s"] == pytest.approx(9.75)
    assert s["guard_tripped_weight"] == 1.0
    assert s["bad_requests"] == bad
    (breach,) = [e for e in result.events if e.kind == "guard_breached"]
    assert (breach.metric, breach.value, breach.requests, breach.action) == (
        "error_rate",
        1.0,
        40,
        action,
    )
    on_candidate = result.requests[result.requests["version"] == "candidate"]
    assert on_candidate["arrival_s"].min() == 130.25
    assert on_candidate["failed"].all()


def test_a_good_release_with_the_guard_succeeds_and_reports_no_trip(tmp_path):
    spec = scenario(tmp_path, "cancel", error_rate=0.0)
    spec["rollout"]["candidate"] = {}
    result = run(tmp_path, spec)
    s = result.summary
    assert s["outcome"] == "succeeded"
    assert (s["guard_tripped_s"], s["detect_s"], s["guard_tripped_weight"]) == (None, None, None)
    assert s["bad_requests"] == 0


SWEEP = """
name: tiny-guard
seed: 3
trace: {synthetic: {process: poisson, rate_per_s: 10, duration_s: 600}}
service: {kind: exponential, mean_s: 0.2}
fleet: {replicas: 4, gpu_capacity: 8, max_ongoing_requests: 4}
cold_start: {kind: deterministic, seconds: 20}
health_check: {period_s: 5}
rollout:
  at_s: 60
  policy:
    max_surge_percent: 25
    stabilization_time_seconds: 30
    guard: {window_s: 30, min_requests: 20, max_error_rate: 0.05, action: force_cancel}
sweep:
  max_surge_percent: [25, 50]
  max_unavailable_percent: [25]
  stabilization_time_seconds: [30]
  seeds: 1
  bad_release: {error_rate: 0.5}
slo: {latency_p99_s: 5}
"""


def test_sweep_runs_each_policy_good_and_bad_and_names_the_smallest_blast_radius(tmp_path):
    from sim.sweep import BAD_CSV_NAME, run_sweep, write_sweep

    path = tmp_path / "s.yaml"
    path.write_text(SWEEP)
    result = run_sweep(load_scenario(path), workers=1)
    good, bad = result.rows, result.bad_rows
    assert len(good) == len(bad) == 3
    assert set(good["outcome"]) == {"succeeded"} and good["guard_tripped_s"].isna().all()
    assert set(bad["outcome"]) == {"cancelled"} and bad["guard_tripped_s"].notna().all()
    assert (bad["detect_s"] > 0).all() and (bad["bad_requests"] > 0).all()
    table = result.policies.set_index("policy")
    for _, row in bad.iterrows():
        assert table.loc[row["policy"], "bad_requests"] == row["bad_requests"]
    caught = table[table["slo_met"] & table["bad_caught"]]
    best = caught["bad_requests"].idxmin()
    field, pct = ("max_surge_percent", best.split()[0].split("=")[1])
    if best.startswith("unavailable"):
        field = "max_unavailable_percent"
    assert result.guard_pick is not None and f"{field}={pct}," in result.guard_pick
    assert f"at most {int(caught['bad_requests'].min()):,} bad requests" in result.guard_pick
    out = write_sweep(result, tmp_path / "out", timelines=False)
    report = (out / "report.md").read_text()
    assert "## Bad release" in report and result.guard_pick in report
    assert (out / "blast.png").stat().st_size > 10_000
    assert len(pd.read_csv(out / BAD_CSV_NAME)) == 3
