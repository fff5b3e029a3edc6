"""Property tests: random fleets, policies, health delays, failed starts, crashes, controls at
random times, desired-scale changes, first deploys (an empty current version) and backend
failures (outage windows and random failed observe/apply calls, an apply failing half way),
against the in-memory fake cluster.

Invariants, checked after every decision (the fake applies actions at once):
- every replica holding a GPU counts: surge ≤ N + surge, unavailable ≤ N (while N is constant);
- with a capacity the controller never asks for more replicas than it holds (when even the
  smallest pool's step fits it);
  the controller's own targets never exceed N + headroom, whatever N does;
- in a steady fleet (constant N, no crash, no failed start, no forced rollback, no backend
  failure, not a first deploy) ready replicas never drop below N (surge) or N − unavailable;
- the candidate's weight never exceeds its share of ready replicas, even between two actions
  of one decision, and, after every iteration that did not fail, no traffic stays on a version
  with no ready replica while the other has one;
- while paused, no target changes except by a resize or a control;
- a rollback that has not finished always says what it waits for;
- the step index never goes back; the state round-trips through JSON exactly;
- every run ends in a terminal state; cancelled and failed runs end with all traffic on the
  current version and no candidate replica (a first deploy with none at all); succeeded runs
  with all traffic on the candidate and no current replica;
- every control received ends as applied or ignored.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pytest
from fake_cluster import FakeCluster
from hypothesis import given
from hypothesis import strategies as st
from sim_loop import Script, run

from rollout import controller as c
from rollout.capacity import pool_limit
from rollout.planner import headroom, ready_floor
from rollout.policy import RolloutPolicy

CONTROLS = list(c.Control)


@dataclass
class Case:
    policy: RolloutPolicy
    cluster: FakeCluster
    script: Script

    @property
    def steady(self) -> bool:
        return (
            not self.script.desired
            and not self.script.crashes
            and self.cluster.fail_prob == 0
            and not self.failing_backend
            and not self.cluster.first_deploy
            and c.Control.FORCE_CANCEL not in [ctl for _, ctl in self.script.controls]
        )

    @property
    def failing_backend(self) -> bool:
        return bool(self.cluster.outages) or self.cluster.error_prob > 0


@st.composite
def cases(draw) -> Case:
    n = draw(st.integers(1, 200))
    pct = draw(st.integers(1, 50))
    mode = draw(st.sampled_from(["max_surge_percent", "max_unavailable_percent"]))
    stab = draw(st.one_of(st.just(0.0), st.floats(0, 3600, allow_nan=False)))
    lo = draw(st.floats(0, 60))
    hi = lo + draw(st.floats(0, 120))
    deadline = draw(st.sampled_from([86400.0, 600.0, 90.0]))
    failing = draw(st.booleans())
    policy = RolloutPolicy(
        **{mode: pct},
        stabilization_time_seconds=stab,
        progress_deadline_seconds=deadline,
        max_start_failures=draw(st.integers(0, 10)),
        max_backend_errors=draw(st.integers(0, 10)),
    )
    times = st.floats(0, 4000, allow_nan=False)
    backend = draw(st.sampled_from(["healthy", "healthy", "outages", "flaky"]))
    outages = []
    if backend == "outages":
        starts = draw(st.lists(times, min_size=1, max_size=2))
        outages = [(t, t + draw(st.floats(0.5, 900))) for t in starts]
    cluster = FakeCluster(
        desired=n,
        seed=draw(st.integers(0, 2**16)),
        start_delay=(lo, hi),
        drain_s=draw(st.floats(0, 30)),
        fail_prob=draw(st.floats(0.01, 0.5)) if failing else 0.0,
        first_deploy=draw(st.integers(0, 3)) == 0,
        outages=outages,
        error_prob=draw(st.floats(0.01, 0.3)) if backend == "flaky" else 0.0,
        capacity=draw(st.one_of(st.none(), st.integers(n, n + 100))),
    )
    script = Script(
        controls=draw(st.lists(st.tuples(times, st.sampled_from(CONTROLS)), max_size=6)),
        desired=draw(st.lists(st.tuples(times, st.integers(1, 200)), max_size=3)),
        crashes=draw(
            st.lists(st.tuples(times, st.sampled_from([c.CURRENT, c.CANDIDATE])), max_size=3)
        ),
    )
    return Case(policy, cluster, script)


def _checker(case: Case):
    first_resize = min((t for t, _ in case.script.desired), default=float("inf"))
    prev = {"step": 0, "phase": c.Phase.PROGRESSING, "targets": (0, 0)}

    def check(d, cl, decision, seen, weight) -> None:
        # replay the actions one by one: the candidate's weight never exceeds its share of the
        # ready replicas, even between two actions of one decision
        ready = {c.CURRENT: seen.current.ready, c.CANDIDATE: seen.candidate.ready}
        for a in decision.actions:
            if isinstance(a, c.ScaleTo):
                ready[a.version] = min(ready[a.version], a.replicas)
            elif isinstance(a, c.SetWeight):
                weight = a.candidate_weight
            total = ready[c.CURRENT] + ready[c.CANDIDATE]
            if total:
                assert weight <= ready[c.CANDIDATE] / total + 1e-12, f"weight above share at {a}"

        s = d.state
        pol, n = s.policy, s.desired
        cur, cand = cl.count(c.CURRENT), cl.count(c.CANDIDATE)

        assert c.RolloutState.from_json(s.to_json()) == s
        assert s.current_target + s.candidate_target <= n + headroom(pol, n)
        if cl.capacity is not None and pool_limit(pol, cl.capacity) >= 1:
            assert s.current_target + s.candidate_target <= cl.capacity, "asked past capacity"
        if cl.now < first_resize and not s.capped:
            assert cl.holding() <= n + headroom(pol, n), "GPU bound exceeded"

        if case.steady and not s.forced:
            floor = ready_floor(pol, n)
            assert cur.ready + cand.ready >= floor, "ready below the mode's floor"

        if d.errors == 0:  # the iteration did not fail: the controller saw and acted
            if cand.ready == 0 and cur.ready > 0:
                assert cl.weight == 0.0, "traffic on a candidate with no ready replica"
            if cur.ready == 0 and cand.ready > 0:
                assert cl.weight == 1.0, "traffic on a current version with no ready replica"
            if cur.ready and cand.ready:
                assert cl.weight <= cand.ready / (cur.ready + cand.ready) + 1e-12

        # a resize, or a control applied in between (cancel, then pause again), may scale
        moved = any(e.kind in ("resized", "control_applied") for e in decision.events)
        targets = (s.current_target, s.candidate_target)
        if prev["phase"] is c.Phase.PAUSED and s.phase is c.Phase.PAUSED and not moved:
            assert targets == prev["targets"], "replicas changed while paused"
        if s.stage is c.Stage.ROLLBACK:
            assert s.waiting, "a rollback waits silently"
        assert s.step >= prev["step"]
        prev["step"], prev["phase"], prev["targets"] = s.step, s.phase, targets

    return check


@given(cases())
def test_controller_invariants(case: Case):
    check_case(case)


@pytest.mark.parametrize(
    "n,seed,start_delay,error_prob,resize",
    [(2, 0, (0.0, 1.0), 0.0625, (0.0, 55)), (20, 53045, (1.0, 2.0), 0.125, (1.0, 28))],
)
def test_failing_the_rollout_never_sends_sessions_back_above_the_share(
    n, seed, start_delay, error_prob, resize
):
    """Hypothesis' counterexamples: the pool grows while the candidate's first replica starts,
    an apply fails, and the next iteration (an observation that fails too, or one that sees 1
    more current replica ready) fails the rollout. Its rollback once re-emitted the last weight
    for the sessions, above the share the current version's growth had left the candidate."""
    policy = RolloutPolicy(
        max_surge_percent=1,
        stabilization_time_seconds=0.0,
        progress_deadline_seconds=86400.0,
        max_start_failures=0,
        max_backend_errors=0,
    )
    cluster = FakeCluster(
        desired=n,
        seed=seed,
        start_delay=start_delay,
        drain_s=0.0,
        fail_prob=0.5,
        error_prob=error_prob,
    )
    check_case(Case(policy, cluster, Script(desired=[resize])))


def check_case(case: Case) -> None:
    """Run one case to its end, checking the invariants after every decision and at the end."""
    cl = case.cluster
    d = run(case.policy, cl, case.script, _checker(case))
    s = d.state
    assert s.terminal
    n = s.desired
    if s.phase in (c.Phase.CANCELLED, c.Phase.FAILED):
        assert cl.weight == 0.0
        assert cl.count(c.CANDIDATE).holding == 0 and s.candidate_target == 0
        assert s.current_target == (0 if cl.first_deploy else n)
    else:
        assert s.phase is c.Phase.SUCCEEDED
        assert cl.weight == 1.0
        assert cl.count(c.CURRENT).holding == 0 and s.current_target == 0
        assert s.candidate_target == n
    forced = [ctl for _, ctl in case.script.controls if ctl is c.Control.FORCE_CANCEL]
    quiet = not case.script.controls and not case.failing_backend and cl.fail_prob == 0
    if quiet and not case.script.crashes and case.policy.progress_deadline_seconds >= 86400:
        assert s.phase is c.Phase.SUCCEEDED, "a quiet rollout must succeed"
    received = Counter(e.control for e in d.history if e.kind == "control_received")
    answered = Counter(
        e.control for e in d.history if e.kind in ("control_applied", "control_ignored")
    )
    assert received == answered, "a control neither applied nor ignored"
    if forced and s.phase is c.Phase.SUCCEEDED:
        # force-cancel only loses to a rollout that had already finished
        done = next(e.t for e in d.history if e.kind == "finished")
        assert done <= min(t for t, ctl in case.script.controls if ctl is c.Control.FORCE_CANCEL)
