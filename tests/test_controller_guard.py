"""The metric guard: validation, the pure verdict, and what the controller does with it (unit
tests against the fake cluster with a traffic model, and Hypothesis properties)."""

from __future__ import annotations

import pytest
from fake_cluster import FakeCluster, Load
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError
from sim_loop import Script, run

from rollout import controller as c
from rollout import history as h
from rollout.errors import describe_validation_error
from rollout.guard import Outcome, Traffic, judge
from rollout.policy import GuardPolicy, RolloutPolicy

ERRORS = GuardPolicy(window_s=60, min_requests=50, max_error_rate=0.01)


def policy(guard: GuardPolicy = ERRORS, **fields: object) -> RolloutPolicy:
    fields = {"max_surge_percent": 25, "stabilization_time_seconds": 60} | fields
    return RolloutPolicy(**fields, guard=guard)


def bad_load(error_rate: float = 0.2, rate: float = 10.0) -> Load:
    return Load(rate=rate, window_s=60, error_rate={c.CANDIDATE: error_rate})


def events(d, kind):
    return [e for e in d.history if e.kind == kind]


# ---- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "guard,message",
    [
        ({"max_error_rate": 0.01, "window": 60}, "unknown field 'guard.window'"),
        ({"max_error_rate": 0.01, "window_s": 0}, "guard.window_s: Input should be greater than 0"),
        ({"max_error_rate": 0.01, "window_s": -5}, "guard.window_s: Input should be greater"),
        ({"max_latency_p99_ratio": 1.0}, "guard.max_latency_p99_ratio: Input should be greater"),
        ({"max_latency_p99_ratio": 0.5}, "guard.max_latency_p99_ratio: Input should be greater"),
        ({}, "guard: the guard needs at least one limit"),
        ({"window_s": 30, "min_requests": 10}, "the guard needs at least one limit"),
        ({"max_error_rate": 0.01, "action": "rollback"}, "guard.action: Input should be"),
    ],
)
def test_invalid_guards_give_one_line_naming_the_field(guard, message):
    with pytest.raises(ValidationError) as err:
        RolloutPolicy(max_surge_percent=25, guard=guard)
    line = describe_validation_error(err.value)
    assert message in line
    assert "\n" not in line


def test_a_bad_guard_in_a_scenario_is_one_line_and_exit_2(tmp_path):
    from typer.testing import CliRunner

    from rollout.cli import app

    path = tmp_path / "s.yaml"
    path.write_text(
        "name: s\ntrace: {synthetic: {rate_per_s: 1, duration_s: 10}}\n"
        "fleet: {replicas: 2, gpu_capacity: 4}\n"
        "rollout: {policy: {max_surge_percent: 25, guard: {window_s: 60}}}\n"
    )
    result = CliRunner().invoke(app, ["simulate", str(path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    lines = [x for x in result.output.splitlines() if x.strip()]
    assert len(lines) == 1 and "the guard needs at least one limit" in lines[0]
    assert "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


# ---- the verdict ---------------------------------------------------------------------------


def test_no_verdict_below_min_requests():
    v = judge(ERRORS, Traffic(49, 49, 9.0), Traffic(500))
    assert v.outcome is Outcome.TOO_FEW and v.requests == 49


@pytest.mark.parametrize(
    "guard,candidate,metric,value",
    [
        (ERRORS, Traffic(100, 2, 1.0, 0.5), "error_rate", 0.02),
        (GuardPolicy(max_latency_p99_s=2.0), Traffic(100, 0, 2.5, 0.1), "latency_p99_s", 2.5),
        (GuardPolicy(max_ttft_p99_s=0.2), Traffic(100, 0, 1.0, 0.3), "ttft_p99_s", 0.3),
        (
            GuardPolicy(max_latency_p99_ratio=1.5),
            Traffic(100, 0, 1.6, 0.1),
            "latency_p99_ratio",
            1.6,
        ),
    ],
)
def test_each_limit_breaches_and_names_itself(guard, candidate, metric, value):
    v = judge(guard, candidate, Traffic(100, 0, 1.0, 0.1))
    assert (v.outcome, v.metric) == (Outcome.BREACHED, metric)
    assert v.value == pytest.approx(value)


def test_limits_at_the_threshold_pass():
    guard = GuardPolicy(max_error_rate=0.01, max_latency_p99_s=2.0, max_latency_p99_ratio=2.0)
    v = judge(guard, Traffic(100, 1, 2.0, 0.1), Traffic(100, 0, 1.0))
    assert v.outcome is Outcome.PASSED


def test_the_ratio_needs_min_requests_on_the_current_version_too():
    guard = GuardPolicy(max_latency_p99_ratio=1.5)
    assert judge(guard, Traffic(100, 0, 9.0), Traffic(49, 0, 1.0)).outcome is Outcome.TOO_FEW
    both = guard.model_copy(update={"max_error_rate": 0.5})
    assert judge(both, Traffic(100, 0, 9.0), Traffic(49, 0, 1.0)).outcome is Outcome.PASSED


# ---- the controller ------------------------------------------------------------------------


def test_a_breach_cancels_ramps_back_and_names_the_breach():
    cl = FakeCluster(desired=10, start_delay=(5, 5), load=bad_load())
    d = run(policy(), cl, heartbeat_s=10)
    assert d.state.phase is c.Phase.CANCELLED
    assert cl.weight == 0.0 and cl.count(c.CANDIDATE).holding == 0
    (breach,) = events(d, "guard_breached")
    assert (breach.metric, breach.threshold, breach.window_s, breach.action) == (
        "error_rate",
        0.01,
        60.0,
        "cancel",
    )
    assert breach.value == pytest.approx(0.2, abs=0.01) and breach.requests >= 50
    # step 1 (3 candidates, weight 0.3) was the only one: the guard acted in its stabilization
    assert [s.direction for s in events(d, "step_completed")] == ["forward", "backward"]
    finished = events(d, "finished")[0]
    assert finished.reason.startswith("guard: error_rate 0.2")
    assert "over 60 s" in finished.reason
    reasons = [e.reason for e in events(d, "transition")]
    assert any(r.startswith("guard: error_rate") and "ramping back" in r for r in reasons)


def test_force_cancel_moves_all_traffic_back_in_the_deciding_decision():
    guard = ERRORS.model_copy(update={"action": "force_cancel"})
    cl = FakeCluster(desired=10, start_delay=(5, 5), load=bad_load())
    d = run(policy(guard), cl, heartbeat_s=10)
    assert d.state.phase is c.Phase.CANCELLED
    breach = events(d, "guard_breached")[0]
    weights = [e for e in events(d, "weight_set") if e.t == breach.t]
    assert weights and weights[-1].candidate_weight == 0.0
    assert events(d, "finished")[0].reason.startswith("guard: error_rate")


def test_a_paused_rollout_still_guards():
    cl = FakeCluster(desired=10, start_delay=(5, 5), load=bad_load(rate=5.0))
    # paused at step 1's boundary (no stabilization: right after its shift at 5 s, weight 0.3);
    # at 1.5 candidate requests a second the window reaches 50 only while paused. A resume
    # far in the future keeps the loop from resuming by itself.
    script = Script(controls=[(1.0, c.Control.PAUSE), (5000.0, c.Control.RESUME)])
    d = run(policy(stabilization_time_seconds=0), cl, script, heartbeat_s=10)
    breach = events(d, "guard_breached")[0]
    paused = next(e for e in events(d, "transition") if e.phase == "paused")
    assert paused.t < breach.t < 5000
    assert breach.requests >= 50
    assert d.state.phase is c.Phase.CANCELLED and cl.weight == 0.0


def test_step_boundaries_record_the_window_passed_or_too_few_requests():
    healthy = Load(rate=10.0, window_s=60)
    d = run(policy(), FakeCluster(desired=10, start_delay=(5, 5), load=healthy), heartbeat_s=10)
    assert d.state.phase is c.Phase.SUCCEEDED
    checks = events(d, "metrics_checked")
    assert [x.step for x in checks] == [1, 2, 3, 4]
    assert {x.verdict for x in checks} == {"passed"}
    assert not events(d, "guard_breached")
    quiet = Load(rate=0.1, window_s=60, error_rate={c.CANDIDATE: 1.0})
    d = run(policy(), FakeCluster(desired=10, start_delay=(5, 5), load=quiet), heartbeat_s=10)
    assert d.state.phase is c.Phase.SUCCEEDED  # never enough requests for a verdict
    assert {x.verdict for x in events(d, "metrics_checked")} == {"too few requests"}
    assert all(x.requests < 50 and x.min_requests == 50 for x in events(d, "metrics_checked"))


def test_no_guard_on_a_first_deploy():
    cl = FakeCluster(desired=4, first_deploy=True, load=bad_load(error_rate=1.0))
    d = run(policy(), cl, heartbeat_s=10)
    assert d.state.phase is c.Phase.SUCCEEDED and not events(d, "guard_breached")


def test_roll_forward_after_a_trip_overrides_the_guard():
    cl = FakeCluster(desired=10, start_delay=(30, 30), load=bad_load())
    d = run(policy(), cl, Script(controls=[(60.0, c.Control.ROLL_FORWARD)]), heartbeat_s=10)
    assert len(events(d, "guard_breached")) == 1
    assert d.state.phase is c.Phase.SUCCEEDED


def test_guard_events_round_trip_through_json():
    d = run(policy(), FakeCluster(desired=10, load=bad_load()), heartbeat_s=10)
    kinds = {"guard_breached", "metrics_checked"}
    guarded = [e for e in d.history if e.kind in kinds]
    assert {e.kind for e in guarded} == {"guard_breached"}
    assert h.load_jsonl(h.dump_jsonl(d.history)) == d.history
    assert c.RolloutState.from_json(d.state.to_json()) == d.state


# ---- properties ----------------------------------------------------------------------------

MODES = ["max_surge_percent", "max_unavailable_percent"]


@st.composite
def guarded(draw, bad: bool):
    n = draw(st.integers(1, 40))
    mode = draw(st.sampled_from(MODES))
    guard = GuardPolicy(
        window_s=draw(st.floats(5, 300)),
        min_requests=draw(st.integers(1, 500)),
        max_error_rate=draw(st.floats(0, 0.2)),
        max_latency_p99_ratio=draw(st.one_of(st.none(), st.floats(1.01, 3))),
        action=draw(st.sampled_from(["cancel", "force_cancel"])),
    )
    pol = RolloutPolicy(
        **{mode: draw(st.integers(1, 50))},
        stabilization_time_seconds=draw(st.floats(0, 300)),
        progress_deadline_seconds=86400,
        guard=guard,
    )
    err = draw(st.floats(0.3, 1.0)) if bad else 0.0
    slow = draw(st.floats(1.0, 10.0)) if bad else 1.0
    load = Load(
        rate=draw(st.floats(0.1, 200)),
        window_s=guard.window_s,
        error_rate={c.CANDIDATE: err},
        latency_s={c.CANDIDATE: slow},
    )
    lo = draw(st.floats(0, 60))
    cluster = FakeCluster(
        desired=n, seed=draw(st.integers(0, 2**16)), start_delay=(lo, lo + 30), load=load
    )
    # any control but roll-forward (an operator's override of the guard)
    ctl = st.sampled_from([x for x in c.Control if x is not c.Control.ROLL_FORWARD])
    script = Script(
        controls=draw(st.lists(st.tuples(st.floats(0, 3000), ctl), max_size=4)) if bad else []
    )
    return pol, cluster, script


def _min_requests_check(d, cl, decision, seen, weight) -> None:
    for e in decision.events:
        if isinstance(e, h.GuardBreached):
            assert seen.candidate.traffic.requests >= d.state.policy.guard.min_requests
            assert e.requests == seen.candidate.traffic.requests


@given(guarded(bad=True))
def test_a_breach_always_ends_cancelled_with_no_traffic_on_the_candidate(case):
    pol, cl, script = case
    d = run(pol, cl, script, _min_requests_check, heartbeat_s=10)
    if events(d, "guard_breached"):
        assert d.state.phase is c.Phase.CANCELLED
        assert cl.weight == 0.0
        assert cl.count(c.CANDIDATE).holding == 0 and d.state.candidate_target == 0
        assert d.state.guard_breach


@given(guarded(bad=False))
def test_a_healthy_candidate_never_trips(case):
    pol, cl, script = case
    d = run(pol, cl, script, _min_requests_check, heartbeat_s=10)
    assert not events(d, "guard_breached")
    assert d.state.phase is c.Phase.SUCCEEDED


def test_history_lines_print_a_policy_with_a_guard():
    from executor.status import format_event

    started = c.start(policy(), 10, 0.0)[1][0]
    line = format_event(started)
    assert "guard={window_s=60,min_requests=50,max_error_rate=0.01,action=cancel}" in line
    assert "max_latency_p99_s" not in line  # unset limits are left out
