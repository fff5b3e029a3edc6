"""One test per control, plus deadlines, failed starts, resizing and JSON round-trips."""

import re

from fake_cluster import FakeCluster
from sim_loop import Script, run

from rollout import controller as c
from rollout import history as h
from rollout.policy import RolloutPolicy

SURGE = RolloutPolicy(max_surge_percent=25, stabilization_time_seconds=30)
UNAVAIL = RolloutPolicy(max_unavailable_percent=25, stabilization_time_seconds=30)


def events(d, kind):
    return [e for e in d.history if e.kind == kind]


def test_plain_surge_rollout_steps_and_weights():
    d = run(SURGE, FakeCluster(desired=10, start_delay=(5, 5)))
    assert d.state.phase is c.Phase.SUCCEEDED
    steps = events(d, "step_completed")
    assert [s.candidate_replicas for s in steps] == [3, 6, 9, 10]
    assert [s.current_replicas for s in steps] == [7, 4, 1, 0]
    # weight = the candidate's share of ready replicas once the step's old ones are gone
    assert [s.candidate_weight for s in steps] == [0.3, 0.6, 0.9, 1.0]


def test_plain_unavailable_rollout_steps_and_weights():
    d = run(UNAVAIL, FakeCluster(desired=10, start_delay=(5, 5)))
    assert d.state.phase is c.Phase.SUCCEEDED
    steps = events(d, "step_completed")
    assert [s.candidate_replicas for s in steps] == [2, 4, 6, 8, 10]
    assert [s.candidate_weight for s in steps] == [0.2, 0.4, 0.6, 0.8, 1.0]


def test_pause_takes_effect_at_the_step_boundary_and_resume_continues():
    cl = FakeCluster(desired=10, start_delay=(5, 5))
    log = []

    def check(d, cluster, decision, seen, weight):
        log.append((cluster.now, d.state.phase, d.state.step, d.state.candidate_target))

    d = run(
        SURGE,
        cl,
        Script(controls=[(2.0, c.Control.PAUSE), (500.0, c.Control.RESUME)]),
        check,
    )
    assert d.state.phase is c.Phase.SUCCEEDED
    paused = [s for s in log if s[1] is c.Phase.PAUSED]
    # the in-flight step finished (3 candidates ready, traffic shifted) before pausing
    assert paused and all(s[2] == 1 and s[3] == 3 for s in paused)
    assert min(s[0] for s in paused) >= 5.0 + 30.0  # after step 1's stabilization
    # nothing moved while paused, and step 2 began right at the resume
    step2 = [e for e in events(d, "transition") if e.reason == "step 2"]
    assert step2[0].t == 500.0
    assert [e.control for e in events(d, "control_applied")] == ["pause", "resume"]


def test_cancel_ramps_back_step_by_step():
    d = run(SURGE, FakeCluster(desired=10, start_delay=(5, 5)), Script([(90.0, c.Control.CANCEL)]))
    assert d.state.phase is c.Phase.CANCELLED
    back = [s for s in events(d, "step_completed") if s.direction == "backward"]
    weights = [s.candidate_weight for s in back]
    assert len(back) >= 2, "a graceful cancel takes more than one step"
    assert weights == sorted(weights, reverse=True) and weights[-1] == 0.0
    assert d.state.candidate_target == 0 and d.state.current_target == 10


def test_force_cancel_moves_all_traffic_back_at_once():
    cl = FakeCluster(desired=10, start_delay=(5, 5))
    at_force = {}

    def check(d, cluster, decision, seen, weight):
        if "weight" not in at_force and any(e.kind == "control_applied" for e in decision.events):
            at_force["weight"] = cluster.weight
            at_force["candidate"] = cluster.targets[c.CANDIDATE]

    d = run(SURGE, cl, Script([(40.0, c.Control.FORCE_CANCEL)]), check)
    assert at_force == {"weight": 0.0, "candidate": 0}
    assert d.state.phase is c.Phase.CANCELLED
    assert cl.weight == 0.0 and cl.count(c.CANDIDATE).holding == 0


def test_roll_forward_skips_stabilization_and_finishes_on_the_candidate():
    slow = RolloutPolicy(max_unavailable_percent=10, stabilization_time_seconds=600)
    normal = run(slow, FakeCluster(desired=10, start_delay=(5, 5)))
    fast = run(
        slow, FakeCluster(desired=10, start_delay=(5, 5)), Script([(1.0, c.Control.ROLL_FORWARD)])
    )
    assert fast.state.phase is c.Phase.SUCCEEDED and fast.state.candidate_weight == 1.0
    assert fast.history[-1].t < 100 < normal.history[-1].t
    applied = events(fast, "control_applied")
    assert applied[0].control == "roll_forward"
    assert applied[0].t >= 6.0  # at the end of step 1, not before


def test_roll_forward_reverses_a_cancel():
    d = run(
        SURGE,
        FakeCluster(desired=10, start_delay=(5, 5)),
        Script([(90.0, c.Control.CANCEL), (100.0, c.Control.ROLL_FORWARD)]),
    )
    assert d.state.phase is c.Phase.SUCCEEDED
    assert {s.direction for s in events(d, "step_completed")} == {"forward", "backward"}


def test_progress_deadline_fails_and_rolls_back():
    policy = RolloutPolicy(max_surge_percent=25, progress_deadline_seconds=60)
    cl = FakeCluster(desired=4, start_delay=(1e9, 1e9))  # candidates never become ready
    d = run(policy, cl)
    assert d.state.phase is c.Phase.FAILED
    assert "progress deadline of 60 s" in events(d, "finished")[0].reason
    assert cl.weight == 0.0 and cl.count(c.CANDIDATE).holding == 0
    assert cl.count(c.CURRENT).ready == 4


def test_failed_starts_beyond_the_limit_fail_the_rollout():
    policy = RolloutPolicy(max_surge_percent=50, max_start_failures=2)
    cl = FakeCluster(desired=4, start_delay=(5, 5), fail_prob=1.0)
    d = run(policy, cl)
    assert d.state.phase is c.Phase.FAILED
    assert re.search(r"failed to start [3-9] times", d.state.failure)


def test_waiting_for_a_gpu_is_recorded():
    cl = FakeCluster(desired=2, start_delay=(5, 5))
    state, _ = c.start(RolloutPolicy(max_surge_percent=50), 2, 0.0)
    obs = c.Observation(
        time=1.0,
        desired=2,
        current=c.VersionObservation(ready=2),
        candidate=c.VersionObservation(starting=1, pending_gpu=1),
    )
    d1 = c.decide(state, cl.observe())  # scale up the candidate
    d2 = c.decide(d1.state, obs)
    assert [e.reason for e in d2.events if e.kind == "waiting"] == [
        "1 candidate replicas wait for a free GPU"
    ]


def test_resize_mid_rollout_keeps_the_split():
    cl = FakeCluster(desired=10, start_delay=(5, 5))
    d = run(SURGE, cl, Script(desired=[(50.0, 20)]))
    resized = events(d, "resized")[0]
    # at t=50 the fleet stabilizes after step 2 at 4 current / 6 candidate: the split is kept
    assert (resized.current_replicas, resized.candidate_replicas) == (8, 12)
    assert d.state.phase is c.Phase.SUCCEEDED and d.state.candidate_target == 20


def test_controls_after_the_end_are_ignored():
    d = run(SURGE, FakeCluster(desired=2, start_delay=(1, 1)))
    state, evs = c.control(d.state, c.Control.CANCEL, 999.0)
    assert state == d.state
    assert [type(e) for e in evs] == [h.ControlReceived, h.ControlIgnored]


def test_duplicate_controls_are_ignored_with_a_reason():
    d = run(
        SURGE,
        FakeCluster(desired=10, start_delay=(5, 5)),
        Script(
            [
                (1.0, c.Control.RESUME),
                (2.0, c.Control.PAUSE),
                (3.0, c.Control.PAUSE),
                (50.0, c.Control.RESUME),
                (60.0, c.Control.CANCEL),
                (61.0, c.Control.CANCEL),
            ]
        ),
    )
    reasons = [(e.control, e.reason) for e in events(d, "control_ignored")]
    assert reasons == [
        ("resume", "not paused"),
        ("pause", "already paused"),
        ("cancel", "already cancelling"),
    ]


def test_state_round_trips_through_json_at_every_step():
    cl = FakeCluster(desired=7, start_delay=(2, 9), seed=3)
    states = []

    def check(d, cluster, decision, seen, weight):
        states.append((d.state, cluster.observe()))

    run(
        UNAVAIL,
        cl,
        Script(controls=[(20.0, c.Control.PAUSE), (90.0, c.Control.RESUME)]),
        check,
    )
    assert len(states) > 10
    for state, obs in states:
        back = c.RolloutState.from_json(state.to_json())
        assert back == state
        assert c.decide(back, obs) == c.decide(state, obs)
