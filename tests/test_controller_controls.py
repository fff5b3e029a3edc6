"""One test per control, plus deadlines, failed starts, resizing and JSON round-trips."""

import re

import pytest
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


# ---- first deploys: the same controller from an empty current version -----------------------


@pytest.mark.parametrize("policy", [SURGE, UNAVAIL], ids=["surge", "unavailable"])
def test_a_first_deploy_starts_every_replica_in_one_step(policy):
    cl = FakeCluster(desired=4, start_delay=(2, 9), seed=1, first_deploy=True)
    ready_at = {}

    def check(d, cluster, decision, seen, weight):
        if cluster.count(c.CANDIDATE).ready and "first" not in ready_at:
            ready_at["first"] = (cluster.now, cluster.weight)

    d = run(policy, cl, check=check)
    started = d.history[0]
    assert started.first_deploy and started.steps == 1
    assert cl.applied[0] == c.ScaleTo(c.CANDIDATE, 4)  # all at once, as Kubernetes does
    assert [s.candidate_replicas for s in events(d, "step_completed")] == [4]
    # traffic goes to the first ready replica: there is no other version to serve it
    t_first, weight = ready_at["first"]
    assert weight == 1.0 and t_first < events(d, "step_completed")[0].t
    assert d.state.phase is c.Phase.SUCCEEDED and cl.count(c.CURRENT).holding == 0


def test_cancelling_a_first_deploy_removes_its_candidates():
    cl = FakeCluster(desired=4, start_delay=(5, 50), seed=2, first_deploy=True)
    d = run(SURGE, cl, Script([(20.0, c.Control.CANCEL)]))
    assert d.state.phase is c.Phase.CANCELLED
    assert events(d, "finished")[0].reason == "cancel: first deploy withdrawn"
    assert [e.control for e in events(d, "control_applied")] == ["cancel"]
    assert not events(d, "step_completed")  # nothing ramps back: there is nothing to go to
    assert cl.weight == 0.0 and cl.count(c.CANDIDATE).holding == 0
    assert d.state.current_target == d.state.candidate_target == 0


def test_a_first_deploy_past_its_deadline_fails_and_leaves_nothing():
    policy = RolloutPolicy(max_unavailable_percent=25, progress_deadline_seconds=60)
    cl = FakeCluster(desired=3, start_delay=(1e9, 1e9), first_deploy=True)
    d = run(policy, cl)
    assert d.state.phase is c.Phase.FAILED
    assert d.state.failure == (
        "step 1 exceeded its progress deadline of 60 s: 0 of 3 candidate replicas ready"
    )
    assert cl.count(c.CANDIDATE).holding == 0


def test_pause_and_roll_forward_during_a_first_deploy_are_ignored_with_a_reason():
    cl = FakeCluster(desired=2, start_delay=(5, 5), first_deploy=True)
    d = run(SURGE, cl, Script([(1.0, c.Control.PAUSE), (2.0, c.Control.ROLL_FORWARD)]))
    assert d.state.phase is c.Phase.SUCCEEDED
    # its one step is under way from the start: all replicas are already the candidate's
    assert [(e.control, e.reason) for e in events(d, "control_ignored")] == [
        ("pause", "nothing left to pause: all replicas replaced"),
        ("roll_forward", "nothing left to roll forward: all replicas replaced"),
    ]


# ---- controls that arrive during the last step ------------------------------------------------


def test_a_roll_forward_during_the_last_backward_step_reverses_the_cancel():
    """Cancel at 90 s ramps back step by step; a roll-forward sent while the last backward step
    runs takes effect at its boundary, when all replicas are back: forward again, to the end."""
    script = [(90.0, c.Control.CANCEL)]
    cancelled = run(SURGE, FakeCluster(desired=10, start_delay=(5, 5)), Script(list(script)))
    back = [e for e in events(cancelled, "transition") if e.direction == "backward"]
    last_start = next(e.t for e in back if e.reason == f"step {cancelled.state.step}")
    last_end = events(cancelled, "step_completed")[-1].t
    assert last_start < last_end
    during = (last_start + last_end) / 2
    d = run(
        SURGE,
        FakeCluster(desired=10, start_delay=(5, 5)),
        Script([*script, (during, c.Control.ROLL_FORWARD)]),
    )
    assert d.state.phase is c.Phase.SUCCEEDED
    (applied,) = [e for e in events(d, "control_applied") if e.control == "roll_forward"]
    assert applied.t == last_end  # at the boundary after the last backward step
    steps = events(d, "step_completed")
    assert steps[-2].direction == "backward" and steps[-2].candidate_replicas == 0
    assert steps[-1].direction == "forward" and steps[-1].candidate_replicas == 10


def test_a_pause_during_the_last_step_is_ignored_with_a_reason():
    """Steps of 3 on 10 replicas: the fourth (last) starts at 3·(5 + 30) = 105 s."""
    d = run(SURGE, FakeCluster(desired=10, start_delay=(5, 5)), Script([(107.0, c.Control.PAUSE)]))
    assert d.state.phase is c.Phase.SUCCEEDED
    assert [(e.control, e.reason) for e in events(d, "control_ignored")] == [
        ("pause", "nothing left to pause: all replicas replaced")
    ]


def test_a_roll_forward_makes_the_rest_of_the_rollout_one_step():
    """3 replicas, surge 25 % (one per step), stabilization 600 s: rolled forward during the
    stabilization after step 1, the remaining two replicas are replaced in one more step (the
    surge bound still adds one at a time), with no stabilization: 2 steps in all, not 3."""
    policy = RolloutPolicy(max_surge_percent=25, stabilization_time_seconds=600)
    d = run(
        policy, FakeCluster(desired=3, start_delay=(5, 5)), Script([(20.0, c.Control.ROLL_FORWARD)])
    )
    assert d.state.phase is c.Phase.SUCCEEDED
    (applied,) = events(d, "control_applied")
    assert (applied.control, applied.t) == ("roll_forward", 20.0)
    steps = events(d, "step_completed")
    assert [(s.t, s.candidate_replicas) for s in steps] == [(5.0, 1), (31.0, 3)]
    assert not [e for e in events(d, "waiting") if e.t > 20 and "stabiliz" in e.reason]


@pytest.mark.parametrize(
    "later,reason",
    [
        (c.Control.CANCEL, "superseded by cancel"),
        (c.Control.FORCE_CANCEL, "superseded by force-cancel"),
        (c.Control.RESUME, "withdrawn by resume"),
    ],
)
def test_a_pending_pause_overridden_by_a_later_control_is_ignored(later, reason):
    d = run(
        SURGE,
        FakeCluster(desired=10, start_delay=(5, 5)),
        Script([(1.0, c.Control.PAUSE), (2.0, later)]),
    )
    assert [(e.control, e.reason) for e in events(d, "control_ignored")] == [("pause", reason)]
    assert [e.control for e in events(d, "control_applied")] == [later.value]


def test_a_pool_shrinking_in_the_middle_of_an_unavailable_step_makes_room_again():
    """N = 2, 1 % unavailable: step 1 removes one current replica to make room; the pool
    shrinks to 1 before the candidate starts, so the one current replica left fills the new
    bound. The step removes it too (the floor of 1 − 1 = 0 allows it) instead of waiting for
    room until its deadline."""
    policy = RolloutPolicy(max_unavailable_percent=1, progress_deadline_seconds=600)
    cl = FakeCluster(desired=2, start_delay=(1, 1), drain_s=1.0)
    d = run(policy, cl, Script(desired=[(0.5, 1)]))
    assert d.state.phase is c.Phase.SUCCEEDED
    assert events(d, "finished")[0].t < 10
    assert "the pool shrank: make room again" in [e.reason for e in events(d, "transition")]
