"""Sticky sessions in the simulator: the same assignment as the router (rollout/sticky.py),
and the realised split against a hand calculation for a simple session model.

The model: sessions start as a Poisson process at rate RATE / M, each with a geometric number
of turns (mean M) an exponential think time apart. Assignment depends only on a session's
point u and the session weight, so in a step held at weight w the candidate's share of the
requests is, in expectation, w itself: stickiness does not bias the split. It does make it
lumpier: whole sessions move together. With n_i requests of session i in the step and
X_i = [u_i < w] independent, share = Σ n_i X_i / Σ n_i has variance w(1 − w) Σ n_i² / (Σ n_i)².
A step far longer than a session holds about RATE·D/M sessions, whose request counts are
geometric with mean M (E n² = M(2M − 1)), so Var(share) ≈ w(1 − w)(2M − 1) / (RATE·D): the
spread of a request-by-request split, w(1 − w)/(RATE·D), times 2M − 1.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rollout.errors import InputError
from rollout.scenario import Scenario, SweepGrid, load_scenario
from rollout.traces import load_trace
from sim.api import simulate
from sim.result import split_steps
from sim.sweep import run_sweep, write_sweep

RATE = 20.0  # requests per second
M = 5.0  # turns per session (mean)
STAB_S = 600.0  # each weight is held about this long


def scenario(sticky: bool = True, **rollout: Any) -> Scenario:
    return Scenario.model_validate(
        {
            "name": "sessions",
            "seed": 3,
            "trace": {
                "synthetic": {
                    "process": "sessions",
                    "rate_per_s": RATE,
                    "duration_s": 3300,
                    "turns_mean": M,
                    "think_s_mean": 10,
                }
            },
            "service": {"kind": "deterministic", "mean_s": 0.2},
            "fleet": {"replicas": 4, "gpu_capacity": 8, "max_ongoing_requests": 8},
            "cold_start": {"kind": "deterministic", "seconds": 30},
            "health_check": {"period_s": 5},
            "rollout": {
                "at_s": 300,
                "policy": {"max_surge_percent": 25, "stabilization_time_seconds": STAB_S},
                **rollout,
            },
            "routing": {"sticky": sticky},
        }
    )


@pytest.fixture(scope="module")
def run() -> tuple[Scenario, Any]:
    s = scenario()
    return s, simulate(s)


def test_the_split_per_step_matches_the_hand_calculation(run: tuple[Scenario, Any]) -> None:
    s, result = run
    steps = split_steps(result.requests, result.timeline, 0.0, math.inf)
    assert list(steps["weight"]) == [0.25, 0.5, 0.75]
    points = load_trace(s.trace, seed=s.seed).session_point
    assert points is not None
    arrival = result.requests["arrival_s"].to_numpy()
    for _, step in steps.iterrows():
        w, n = step["weight"], step["requests"]
        rate = n / (step["until_s"] - step["from_s"])
        assert rate == pytest.approx(RATE, rel=0.1)  # the session model's request rate
        # the hand calculation's lumpiness: Σ n_i² / Σ n_i = E n² / E n = 2M − 1
        mine = points[(arrival >= step["from_s"]) & (arrival < step["until_s"])]
        per_session = np.unique(mine, return_counts=True)[1]
        assert (per_session**2).sum() / n == pytest.approx(2 * M - 1, rel=0.1)
        sd = math.sqrt(w * (1 - w) * (2 * M - 1) / n)
        assert abs(step["share"] - w) < 4 * sd, (w, step["share"], sd)
    summary = result.summary
    assert summary["split_off_pp"] == pytest.approx(
        100 * (steps["weight"] - steps["share"]).abs().max()
    )


def test_every_session_request_goes_where_its_point_says_and_only_forward(
    run: tuple[Scenario, Any],
) -> None:
    s, result = run
    points = load_trace(s.trace, seed=s.seed).session_point
    assert points is not None and (points >= 0).all()
    req = result.requests
    t = result.timeline["t_s"].to_numpy()
    weight = result.timeline["candidate_weight"].to_numpy()
    at = weight[np.searchsorted(t, req["arrival_s"].to_numpy(), side="right") - 1]
    on_candidate = req["version"].cat.codes.to_numpy() == 1
    assert (on_candidate == (points < at)).all()
    # forward only: per session (its point), the candidate never comes before the current
    order = np.lexsort((req["arrival_s"].to_numpy(), points))
    same = points[order][1:] == points[order][:-1]
    back = same & on_candidate[order][:-1] & ~on_candidate[order][1:]
    assert not back.any()
    moved = same & ~on_candidate[order][:-1] & on_candidate[order][1:]
    assert moved.sum() > 100  # sessions were split across a step and moved forward


def test_a_cancel_moves_every_session_back() -> None:
    s = scenario(controls=[{"at_s": 1000, "action": "cancel"}])
    result = simulate(s)
    assert result.summary["outcome"] == "cancelled"
    req = result.requests
    end = result.summary["rollout_end_s"]
    on_candidate = req["version"].cat.codes.to_numpy() == 1
    arrival = req["arrival_s"].to_numpy()
    assert on_candidate[arrival < 1000].any()
    assert not on_candidate[arrival > end].any()


def test_sticky_routing_needs_sessions() -> None:
    s = scenario().model_copy(
        update={
            "trace": Scenario.model_validate(
                {
                    "name": "x",
                    "trace": {"synthetic": {"rate_per_s": 1, "duration_s": 10}},
                    "fleet": {"replicas": 1, "gpu_capacity": 1},
                }
            ).trace
        }
    )
    with pytest.raises(InputError, match=r"routing\.sticky needs sessions"):
        simulate(s)


def test_the_sweep_report_says_how_far_the_split_strays(tmp_path: Path) -> None:
    s = scenario().model_copy(
        update={"sweep": SweepGrid(max_surge_percent=[25, 50], stabilization_time_seconds=[60])}
    )
    result = run_sweep(s, workers=1)
    write_sweep(result, tmp_path, timelines=False)
    report = (tmp_path / "report.md").read_text()
    assert "## Sticky sessions: the realised split" in report
    for _, p in result.policies.iterrows():
        row = f"| {p['policy']} | {p['split_lag_pp']:+.2f} | {p['split_off_pp']:.2f} |"
        assert row in report
        assert 0 < p["split_off_pp"] < 5  # a few hundred sessions per step: a few points
    worst = result.policies["split_off_pp"].max()
    assert f"by at most {worst:.1f} percentage points" in report


def test_the_bundled_sticky_scenario_loads_with_sessions() -> None:
    s = load_scenario(Path(__file__).parent.parent / "scenarios" / "sessions-sticky.yaml")
    assert s.routing.sticky and s.trace.synthetic is not None
    assert s.trace.synthetic.process == "sessions"
