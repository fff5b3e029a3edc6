"""Every failure ends in a decided state: crash-looping candidates, backend errors (failed
observations and applies) and a rollback that cannot finish, against the fake cluster."""

from collections.abc import Sequence
from dataclasses import replace

import pytest
from fake_cluster import FakeCluster
from sim_loop import Script, run

from rollout import controller as c
from rollout.driver import BackendError, Driver
from rollout.policy import RolloutPolicy


def events(d, kind):
    return [e for e in d.history if e.kind == kind]


def rolled_back(d: Driver, cl: FakeCluster, n: int) -> None:
    """All traffic on the current version, candidates gone, the current version whole."""
    assert cl.weight == 0.0 and cl.count(c.CANDIDATE).holding == 0
    assert d.state.current_target == n and d.state.candidate_target == 0
    assert cl.count(c.CURRENT).ready > 0


@pytest.mark.parametrize(
    "mode,first_start", [("max_surge_percent", 0.0), ("max_unavailable_percent", 1.0)]
)
def test_a_crash_looping_candidate_fails_within_max_start_failures_attempts(mode, first_start):
    """Every candidate start fails after 5 s; with a limit of 3 the step fails at the fourth
    failure, after 4 start attempts (20 s), not at its 600 s deadline. (In unavailable mode
    the first candidate starts once the removed current replica has drained, after 1 s.)"""
    policy = RolloutPolicy(**{mode: 10}, max_start_failures=3, progress_deadline_seconds=600)
    cl = FakeCluster(desired=10, start_delay=(5, 5), fail_prob=1.0)
    at_failure = {}

    def check(d, cluster, decision, seen, weight):
        if any(e.kind == "transition" and e.stage == "rollback" for e in decision.events):
            at_failure.update(t=cluster.now, failed=cluster.failed[c.CANDIDATE])

    d = run(policy, cl, check=check)
    assert d.state.phase is c.Phase.FAILED
    assert d.state.failure == "candidate replicas failed to start 4 times"
    # one candidate per step (10 % of 10): four attempts, each failing after 5 s
    assert at_failure == {"t": first_start + 20.0, "failed": 4}
    rolled_back(d, cl, 10)


def test_a_crash_looping_first_deploy_fails_the_same_way():
    policy = RolloutPolicy(max_surge_percent=25, max_start_failures=2)
    cl = FakeCluster(desired=2, start_delay=(5, 5), fail_prob=1.0, first_deploy=True)
    d = run(policy, cl)
    assert d.state.phase is c.Phase.FAILED
    # both replicas start at once and fail together: 2 failures at 5 s, 4 at 10 s > 2
    assert d.state.failure == "candidate replicas failed to start 4 times"
    (failed,) = [e for e in events(d, "transition") if e.stage == "rollback"]
    assert failed.t == 10.0
    assert cl.count(c.CANDIDATE).holding == 0 and cl.count(c.CURRENT).holding == 0


def test_an_outage_longer_than_tolerated_fails_and_rolls_back_once_it_ends():
    """The cluster cannot be reached from 20 s to 200 s. With 5 failed iterations tolerated
    (one per second while failing), the sixth fails the rollout at 25 s; the rollback waits,
    saying why, until the cluster answers again, then restores the current version."""
    policy = RolloutPolicy(max_surge_percent=25, stabilization_time_seconds=30)
    cl = FakeCluster(desired=10, start_delay=(5, 5), outages=[(20.0, 200.0)])
    d = run(policy, cl)
    assert d.state.phase is c.Phase.FAILED
    why = "6 iterations in a row failed (at most 5 tolerated); the last: observe: the cluster "
    assert d.state.failure == why + "is unreachable"
    (failed,) = [e for e in events(d, "transition") if e.stage == "rollback"]
    assert failed.t == 25.0
    waits = [e.reason for e in events(d, "waiting") if 20 <= e.t < 200]
    assert waits == ["cannot observe the cluster: observe: the cluster is unreachable"]
    assert events(d, "finished")[0].t >= 200.0
    rolled_back(d, cl, 10)


def test_a_short_outage_is_waited_out():
    policy = RolloutPolicy(max_surge_percent=25, max_backend_errors=5)
    cl = FakeCluster(desired=10, start_delay=(5, 5), outages=[(7.0, 10.0)])
    d = run(policy, cl)
    assert d.state.phase is c.Phase.SUCCEEDED
    reasons = [e.reason for e in events(d, "waiting")]
    assert "cannot observe the cluster: observe: the cluster is unreachable" in reasons


class Flaky:
    """The fake cluster behind a switch: while `broken`, apply fails after applying the first
    `prefix` actions."""

    def __init__(self, cluster: FakeCluster, prefix: int = 0) -> None:
        self.cluster = cluster
        self.prefix = prefix
        self.broken = False

    def clock(self) -> float:
        return self.cluster.clock()

    def observe(self) -> c.Observation:
        return self.cluster.observe()

    def apply(self, actions: Sequence[c.Action]) -> None:
        if self.broken:
            self.cluster.apply(actions[: self.prefix])
            raise BackendError(self.message)
        self.cluster.apply(actions)

    message = "deploy_apps timed out"


def test_a_failed_apply_is_recorded_and_the_next_decision_applies_the_whole_state():
    policy = RolloutPolicy(max_surge_percent=25)
    cl = FakeCluster(desired=4, start_delay=(5, 5))
    backend = Flaky(cl, prefix=1)
    d = Driver.begin(policy, 4, 0.0)
    d.tick(backend)  # step 1: scale the candidate up
    cl.advance(5.0)  # ready: scale the current version down and move traffic
    backend.broken = True
    shift = d.tick(backend)
    backend.broken = False
    assert shift.actions == (c.ScaleTo(c.CURRENT, 3), c.SetWeight(0.25))
    assert d.errors == 1 and d.error == "deploy_apps timed out"
    # recorded, though only the first action was applied
    assert (d.state.current_target, d.state.candidate_weight) == (3, 0.25)
    assert cl.weight == 0.0
    again = d.tick(backend)
    assert d.errors == 0
    # the weight first, never above the candidate's share, then every target again
    assert again.actions == (
        c.SetWeight(0.25),
        c.ScaleTo(c.CURRENT, 3),
        c.ScaleTo(c.CANDIDATE, 1),
    )
    assert cl.weight == 0.25
    waiting = [e.reason for e in again.events if e.kind == "waiting"]
    assert waiting[0] == "applying again after a failed iteration: deploy_apps timed out"


def test_the_decision_that_ends_a_rollout_is_kept_only_once_applied():
    cl = FakeCluster(desired=1, start_delay=(1, 1), drain_s=0.0)
    backend = Flaky(cl)
    d = Driver.begin(RolloutPolicy(max_surge_percent=50), 1, 0.0)
    d.tick(backend)
    cl.advance(1.0)
    d.tick(backend)  # all traffic to the candidate, the current replica removed
    assert d.state.stage is c.Stage.FINISHING
    backend.broken = True
    ended = d.tick(backend)
    assert not d.done and ended.actions == () and d.errors == 1
    backend.broken = False
    d.tick(backend)  # applies the recorded state again: not the decision that ends it
    assert not d.done
    d.tick(backend)
    assert d.done and d.state.phase is c.Phase.SUCCEEDED
    assert [e.kind for e in d.history].count("finished") == 1


def test_a_rollback_that_cannot_finish_says_why_and_keeps_serving():
    """N = 2, surge 50 %: after step 1 one current and one candidate replica serve. The current
    one crashes and its restart never gets ready; force-cancel cannot move traffic back. The
    rollback keeps all traffic on the ready candidate and says what it waits for, and again
    once past its deadline; it finishes as soon as a current replica is ready."""
    policy = RolloutPolicy(
        max_surge_percent=50, stabilization_time_seconds=300, progress_deadline_seconds=60
    )
    cl = FakeCluster(desired=2, start_delay=(5, 5))
    weights = []

    def check(d, cluster, decision, seen, weight):
        if cluster.now >= 6:
            cluster.start_delay = (1e5, 1e5)  # replicas started from now on take a day
        if d.state.stage is c.Stage.ROLLBACK and cluster.count(c.CURRENT).ready == 0:
            weights.append(cluster.weight)

    d = run(
        policy,
        cl,
        Script(controls=[(12.0, c.Control.FORCE_CANCEL)], crashes=[(10.0, c.CURRENT)]),
        check,
    )
    waits = [(e.t, e.reason) for e in events(d, "waiting") if e.t >= 12]
    assert waits[:3] == [
        # the crashed replica restarting; then one more started to refill the current version
        (12.0, "rollback: waiting for a ready current replica before moving traffic back "
         "(1 starting)"),
        (12.0, "rollback: waiting for a ready current replica before moving traffic back "
         "(2 starting)"),
        (72.0 + 1e-6, "rollback past its deadline of 60 s, waiting for a ready current replica "
         "before moving traffic back (2 starting); serving on 0 current and 1 candidate replicas"),
    ]  # fmt: skip
    assert len(weights) > 3 and set(weights) == {1.0}  # all on the only ready version meanwhile
    assert d.state.phase is c.Phase.CANCELLED
    assert events(d, "finished")[0].t == 10.0 + 1e5 + 1.0  # then the candidate drains (1 s)
    rolled_back(d, cl, 2)


def test_errors_while_paused_still_fail_the_rollout():
    """Paused after step 1 (5 s); the cluster is unreachable from 20 s to 30 s: the third
    failed iteration in a row (22 s) fails the paused rollout, which rolls back at 30 s."""
    policy = RolloutPolicy(max_surge_percent=25, max_backend_errors=2)
    cl = FakeCluster(desired=4, start_delay=(5, 5), outages=[(20.0, 30.0)])
    d = run(policy, cl, Script(controls=[(1.0, c.Control.PAUSE), (100.0, c.Control.RESUME)]))
    assert d.state.phase is c.Phase.FAILED
    moves = [(e.t, e.phase, e.stage) for e in events(d, "transition")]
    assert moves[-2:] == [(5.0, "paused", "boundary"), (22.0, "progressing", "rollback")]
    assert events(d, "finished")[0].t >= 30.0
    rolled_back(d, cl, 4)


def test_an_unseen_observation_takes_no_control_and_emits_no_action():
    state, _ = c.start(RolloutPolicy(max_surge_percent=25), 4, 0.0)
    state, _ = c.control(state, c.Control.CANCEL, 0.5)
    d = c.decide(state, c.Observation.unseen(1.0, errors=1, error="timed out"))
    assert d.actions == () and d.state.pending == (c.Control.CANCEL,)
    assert [e.reason for e in d.events] == ["cannot observe the cluster: timed out"]
    assert replace(d.state, waiting="") == state


def test_failing_on_an_unseen_observation_emits_nothing_until_it_sees_again():
    """The failure that fails the rollout is an observation's: the rollback is recorded, but
    its first actions (sessions following the weight back) wait for counts, and the next
    decision re-applies the weight within the share it sees."""
    policy = RolloutPolicy(max_surge_percent=25, max_backend_errors=0)
    # sessions' high-water mark is above the weight: failing moves them back to it
    state = c.RolloutState(policy, 4, 4, 1, candidate_weight=0.25, session_weight=0.5, step=1)
    d = c.decide(state, c.Observation.unseen(1.0, errors=1, error="timed out"))
    assert d.actions == ()
    assert d.state.stage is c.Stage.ROLLBACK and d.state.forced == "failed"
    # meanwhile the current version reached its target: 4 ready current replicas, a share of 1/5
    obs = c.Observation(
        2.0, 4, c.VersionObservation(ready=4), c.VersionObservation(ready=1), errors=1
    )
    d = c.decide(d.state, obs)
    assert d.actions[0] == c.SetWeight(0.2, 0.2)
    assert c.SetWeight(0.0) in d.actions  # then the rollback moves traffic back


class RejectsCandidate(Flaky):
    """Serve rejecting the candidate's config: every apply that would leave a candidate
    replica fails, and applies nothing."""

    message = "the candidate's config was rejected"

    def apply(self, actions: Sequence[c.Action]) -> None:
        scaled = [
            a.replicas for a in actions if isinstance(a, c.ScaleTo) and a.version == c.CANDIDATE
        ]
        self.broken = (scaled[-1] if scaled else self.cluster.targets[c.CANDIDATE]) > 0
        super().apply(actions)


def test_a_rejected_candidate_config_fails_the_rollout_and_the_rollback_goes_through():
    """The step's scale-up keeps failing; the sixth failure in a row fails the rollout, and
    the rollback, whose config has no candidate, is accepted."""
    cl = FakeCluster(desired=10, start_delay=(5, 5))
    backend = RejectsCandidate(cl)
    d = Driver.begin(RolloutPolicy(max_surge_percent=25), 10, 0.0)
    for _ in range(20):
        d.tick(backend)
        if d.done:
            break
        cl.advance(1.0)
    assert d.state.phase is c.Phase.FAILED
    assert d.state.failure == (
        "6 iterations in a row failed (at most 5 tolerated); "
        "the last: the candidate's config was rejected"
    )
    assert cl.count(c.CURRENT).ready == 10 and cl.count(c.CANDIDATE).holding == 0
    assert cl.weight == 0.0
