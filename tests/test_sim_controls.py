"""Scripted operator controls change the simulated timeline as docs/controller.md says.

The fleet is test_sim_rollout's: 10 replicas, surge 25 % (3 per step), cold start 115 s seen
at the 120 s health check, 60 s stabilization, rollout at 300 s. Without controls step k
completes at 420 + 180·(k − 1) s and the rollout ends at 960 s.
"""

from __future__ import annotations

import pytest
from test_sim_rollout import N, steady

from rollout import history as h
from sim.api import SimResult, simulate

SURGE = {"max_surge_percent": 25}
ROUND_S = 120.0  # cold start plus health-check wait


def run(*controls: tuple[float, str]) -> SimResult:
    spec = [{"at_s": t, "action": a} for t, a in controls]
    return simulate(steady(SURGE, rollout__controls=spec))


def applied(result: SimResult, control: str) -> float:
    (event,) = [
        e for e in result.events if isinstance(e, h.ControlApplied) and e.control == control
    ]
    return event.t


def steps(result: SimResult, direction: str = "forward") -> list[h.StepCompleted]:
    return [e for e in result.events if isinstance(e, h.StepCompleted) and e.direction == direction]


@pytest.fixture(scope="module")
def baseline() -> SimResult:
    return run()


def test_baseline_schedule(baseline):
    assert [e.t for e in steps(baseline)] == [420, 600, 780, 960]
    assert baseline.summary["rollout_end_s"] == pytest.approx(960, abs=1)


def test_pause_waits_for_the_step_boundary_and_resume_continues(baseline):
    result = run((350, "pause"), (1000, "resume"))
    tl = result.timeline
    # the step in flight at 350 s finishes (replicas ready, traffic shifted, stabilized) ...
    assert steps(result)[0].t == 420
    # ... and the pause takes effect at the boundary after its stabilization
    assert applied(result, "pause") == 480
    paused = [e for e in result.events if isinstance(e, h.Transition) and e.phase == "paused"]
    assert [e.t for e in paused] == [480]
    # nothing changes while paused
    assert tl[(tl["t_s"] > 480) & (tl["t_s"] < 1000)].empty
    row = tl[tl["t_s"] <= 999].iloc[-1]
    assert (row["current_ready"], row["candidate_ready"], row["candidate_weight"]) == (7, 3, 0.3)
    # resume continues from exactly there: step 2 starts at 1000 s
    assert applied(result, "resume") == 1000
    assert tl[tl["t_s"] == 1000]["candidate_starting"].max() == 3
    assert [e.t for e in steps(result)] == [420, 1120, 1300, 1480]
    pause_s = 1000 - 480
    assert result.summary["rollout_duration_s"] == pytest.approx(
        baseline.summary["rollout_duration_s"] + pause_s, abs=1
    )
    assert result.summary["outcome"] == "succeeded"


def test_cancel_ramps_back_step_by_step():
    result = run((650, "cancel"))
    tl = result.timeline
    assert applied(result, "cancel") == 650
    after = tl[tl["t_s"] >= 650]
    weights = after["candidate_weight"].tolist()
    assert weights == sorted(weights, reverse=True)  # never forward again
    distinct = list(dict.fromkeys(weights))
    assert distinct == [0.6, 0.3, 0.0]  # back the way it came, one step at a time
    back = steps(result, "backward")
    assert len(back) == 2
    assert back[0].t - 650 == pytest.approx(ROUND_S)  # the current version cold-starts again
    # the bounds of the mode hold on the way back too
    total = after[[c for c in tl.columns if c.endswith(("ready", "starting", "draining"))]]
    assert total.sum(axis=1).max() <= N + 3
    assert (after["current_ready"] + after["candidate_ready"]).min() >= N
    last = tl.iloc[-1]
    assert last["current_ready"] == N and last["candidate_ready"] == 0
    assert last["candidate_starting"] == last["candidate_draining"] == 0
    assert result.summary["outcome"] == "cancelled"


def test_force_cancel_sends_traffic_back_at_once():
    result = run((650, "force_cancel"))
    tl = result.timeline
    at_650 = tl[tl["t_s"] <= 650].iloc[-1]
    assert at_650["candidate_weight"] == 0.0
    assert at_650["candidate_ready"] == 0  # candidates removed at once
    assert not steps(result, "backward")  # no ramp
    req = result.requests
    assert (req.loc[req["arrival_s"] > 650, "version"] == "current").all()
    served_after = req[(req["start_s"] > 651) & (req["version"] == "candidate")]
    assert served_after.empty
    assert result.summary["outcome"] == "cancelled"
    assert tl.iloc[-1]["current_ready"] == N  # the current version restores its size
    assert tl["candidate_ready"].iloc[-1] == 0


def test_roll_forward_skips_the_remaining_waits(baseline):
    result = run((450, "roll_forward"))
    tl = result.timeline
    t_applied = applied(result, "roll_forward")
    assert 450 <= t_applied <= 480  # at the latest at the next step boundary
    # after it: no stabilization, only cold-start rounds until the candidate has everything
    end = result.summary["rollout_end_s"]
    rounds = (end - t_applied) / ROUND_S
    assert rounds == pytest.approx(round(rounds), abs=0.01)
    assert end < baseline.summary["rollout_end_s"] - 60
    # all traffic moves to the candidate only once enough candidates are ready
    full = tl[tl["candidate_weight"] == 1.0].iloc[0]
    assert full["candidate_ready"] >= N
    assert result.summary["outcome"] == "succeeded"


def test_controls_before_the_rollout_are_rejected():
    from rollout.errors import InputError

    with pytest.raises(InputError, match=r"rollout.controls.0.at_s \(100\) is before"):
        run((100, "pause"))
