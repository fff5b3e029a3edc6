"""Drive the controller against the fake cluster on an event-driven clock (for tests)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from fake_cluster import FakeCluster

from rollout import controller as c
from rollout.driver import Driver
from rollout.policy import RolloutPolicy

Check = Callable[[Driver, FakeCluster, c.Decision, c.Observation, float], None]
BACKOFF_S = 1.0  # after a failed iteration, as a real backend waits before trying again


@dataclass
class Script:
    controls: list[tuple[float, c.Control]] = field(default_factory=list)
    desired: list[tuple[float, int]] = field(default_factory=list)
    crashes: list[tuple[float, str]] = field(default_factory=list)


def next_time(d: Driver, cl: FakeCluster, script: Script) -> float:
    """The next moment anything can change: a replica ready or drained, a timer, a script item."""
    now = cl.now
    times = [r.ready_at for rs in cl.replicas.values() for r in rs if r.ready_at > now]
    times += [r.drain_until for rs in cl.replicas.values() for r in rs if r.drain_until]
    s = d.state
    if s.stabilize_until is not None:
        times.append(s.stabilize_until)
    times.append(s.step_started_at + s.policy.progress_deadline_seconds + 1e-6)
    times += [t for t, _ in script.controls] + [t for t, _ in script.desired]
    times += [t for t, _ in script.crashes]
    times += [t for window in cl.outages for t in window]
    later = [t for t in times if t is not None and t > now]
    return min(later) if later else now + 1.0


def run(
    policy: RolloutPolicy,
    cluster: FakeCluster,
    script: Script | None = None,
    check: Check | None = None,
    max_decisions: int = 50_000,
    heartbeat_s: float | None = None,
) -> Driver:
    """Run to the end; `heartbeat_s` also ticks at least that often (as the backends do, so
    the metric guard sees traffic build up between events)."""
    script = script or Script()
    controls = sorted(script.controls, key=lambda x: x[0])
    desired = sorted(script.desired, key=lambda x: x[0])
    crashes = sorted(script.crashes, key=lambda x: x[0])
    d = Driver.begin(policy, cluster.desired, cluster.now, first_deploy=cluster.first_deploy)
    for _ in range(max_decisions):
        while controls and controls[0][0] <= cluster.now:
            d.control(controls.pop(0)[1], cluster.now)
        while desired and desired[0][0] <= cluster.now:
            cluster.desired = desired.pop(0)[1]
        while crashes and crashes[0][0] <= cluster.now:
            cluster.crash_ready(crashes.pop(0)[1])
        seen, weight = cluster.snapshot(), cluster.weight
        decision = d.tick(cluster)
        if check:
            check(d, cluster, decision, seen, weight)
        if d.done:
            return d
        if d.errors:  # the iteration failed: back off, then try again
            step = next_time(d, cluster, Script(controls, desired, crashes)) - cluster.now
            cluster.advance(min(BACKOFF_S, step))
            continue
        if decision.actions:  # a backend looks again right after applying
            continue
        if d.state.phase is c.Phase.PAUSED and not controls:
            controls.append((cluster.now + 1.0, c.Control.RESUME))  # the operator comes back
        t = next_time(d, cluster, Script(controls, desired, crashes))
        if heartbeat_s is not None:
            t = min(t, cluster.now + heartbeat_s)
        cluster.advance(t - cluster.now)
    raise AssertionError(f"no terminal state after {max_decisions} decisions: {d.state}")
