"""The cluster: the replicas of both versions and their lifecycles, on a GPU supply.

A replica asks for its GPUs when it is created and waits in FIFO order if none are free
(`sim/gpus.py`). It holds them through its cold start, while it serves, and while it drains
after removal; it releases them when its last in-flight request finishes, or when the drain
deadline (`graceful_shutdown_timeout_s`) passes and the requests still running fail. With
`graceful_shutdown_wait_loop_s` set, it drains as a Serve replica does: it sleeps one period,
then checks every period for requests in flight, and stops at the first check that finds none
(so at least one period after removal, even idle). Health
checks run every period from the moment the replica got its GPU, so it turns ready at the first
check after its cold start. A version's first replica's cold start is `first_of_version_s` longer
(the executor creates the version's Serve application before it).

Faults, per version: a start attempt fails with `start_failure_rate` (noticed at the first
health check after its cold-start draw, having held its GPU that long); a ready replica
crashes as a Poisson process at `crash_per_replica_hour`, and its requests in flight fail.
Either way Serve replaces the replica with a new one, which starts cold; failed starts are
counted for the rollout controller (`VersionObservation.failed_starts`, cumulative).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator

import numpy as np
import simpy

from rollout.controller import VersionObservation
from rollout.scenario import FaultSpec
from sim.coldstart import ColdStart
from sim.gpus import GpuSupply, Node
from sim.replica import Replica, State
from sim.router import Router

# scale-down order, as Serve 2.60's scheduler picks (`_get_replicas_to_stop`): replicas without
# traffic first (waiting, then starting), then ready ones node by node, the nodes with the fewest
# replicas first (so that nodes empty and can go; on-demand nodes before reserved ones on a tie),
# within a node the newest first (the last placed on a GPU), whatever they have in flight
_REMOVE_RANK = {State.PENDING_GPU: 0, State.STARTING: 1, State.READY: 2}


def _removal_order(rep: Replica) -> tuple[float, ...]:
    node = rep.node
    newest = -rep.gpu_at if rep.gpu_at is not None else 0.0
    if not isinstance(node, Node):
        return (_REMOVE_RANK[rep.state], newest, -rep.id)
    return (
        _REMOVE_RANK[rep.state],
        node.used,
        0 if node.on_demand else 1,
        node.index,
        newest,
        -rep.id,
    )


class Faults:
    """One version's fault model and its random stream."""

    def __init__(self, spec: FaultSpec, rng: np.random.Generator) -> None:
        self.spec = spec
        self.rng = rng

    def start_fails(self) -> bool:
        rate = self.spec.start_failure_rate
        return rate > 0 and float(self.rng.random()) < rate

    def time_to_crash(self) -> float:
        rate = self.spec.crash_per_replica_hour
        return math.inf if rate == 0 else float(self.rng.exponential(3600.0 / rate))


class Cluster:
    def __init__(
        self,
        env: simpy.Environment,
        *,
        gpus: GpuSupply,
        health_period_s: float,
        drain_timeout_s: float,
        cold_starts: tuple[ColdStart, ColdStart],
        faults: tuple[Faults, Faults],
        router: Router,
        on_change: Callable[[], None],
        drain_loop_s: float = 0.0,
    ) -> None:
        self.env = env
        self.gpus = gpus
        gpus.on_grant = self._granted
        self.period = health_period_s
        self.drain_timeout = drain_timeout_s
        self.drain_loop = drain_loop_s
        self.cold_starts = cold_starts
        self.faults = faults
        self.router = router
        self.on_change = on_change
        self.replicas: list[Replica] = []  # every replica ever created, by id
        self.live: tuple[list[Replica], list[Replica]] = ([], [])  # not yet stopped
        self.counts = [[0] * len(State), [0] * len(State)]
        self.failed_starts = [0, 0]  # cumulative, per version
        self.created = [False, False]  # per version: a replica was created
        self.firsts: set[int] = set()  # each version's first replica (its application is new)

    # ---- reading -------------------------------------------------------------------------

    def observe(self, version: int) -> VersionObservation:
        c = self.counts[version]
        return VersionObservation(
            ready=c[State.READY],
            starting=c[State.PENDING_GPU] + c[State.STARTING],
            draining=c[State.DRAINING],
            failed_starts=self.failed_starts[version],
            pending_gpu=c[State.PENDING_GPU],
        )

    def serving(self, version: int) -> int:
        """Replicas counted towards the version's size: all but draining ones."""
        c = self.counts[version]
        return c[State.PENDING_GPU] + c[State.STARTING] + c[State.READY]

    # ---- changing ------------------------------------------------------------------------

    def boot(self, version: int, n: int) -> None:
        """The fleet at time zero: n warm replicas, ready and holding their GPUs."""
        now = self.env.now
        for _ in range(n):
            rep = self._new(version)
            if rep.engine is not None:
                rep.engine.warmed()
            if self.gpus.request(rep):
                rep.gpu_at = now
                self._turn_ready(rep)
            else:
                self._wait_for_gpu(rep)
                self.env.process(self._life(rep))
        self.on_change()

    def scale_to(self, version: int, n: int) -> None:
        """Start or remove replicas until the version has n (draining ones do not count)."""
        live = [r for r in self.live[version] if r.state is not State.DRAINING]
        if len(live) < n:
            for _ in range(n - len(live)):
                self._start(version)
        elif len(live) > n:
            live.sort(key=_removal_order)
            for rep in live[: len(live) - n]:
                self._remove(rep)
        else:
            return
        self.on_change()

    def drained(self, rep: Replica, t: float) -> None:
        """The router saw rep's last in-flight request finish at t: stop it then."""
        ev = self.env.timeout(max(0.0, t - self.env.now))
        ev.callbacks.append(lambda _: self._stop_drained(rep))

    def _stop_drained(self, rep: Replica) -> None:
        if self.drain_loop > 0:
            return  # the drain loop's next check stops it
        if rep.state is State.DRAINING and rep.ongoing == 0:
            self._stop(rep, "removed")
            self.on_change()

    # ---- lifecycle -----------------------------------------------------------------------

    def _new(self, version: int) -> Replica:
        rep = Replica(len(self.replicas), version, self.env.now, self.router.engine_for(version))
        if not self.created[version]:
            self.created[version] = True
            self.firsts.add(rep.id)
        self.replicas.append(rep)
        self.live[version].append(rep)
        self.counts[version][rep.state] += 1
        return rep

    def _set(self, rep: Replica, state: State) -> None:
        c = self.counts[rep.version]
        c[rep.state] -= 1
        c[state] += 1
        rep.state = state

    def _start(self, version: int) -> None:
        rep = self._new(version)
        if self.gpus.request(rep):
            rep.gpu_at = self.env.now
            self._set(rep, State.STARTING)
        else:
            self._wait_for_gpu(rep)
        self.env.process(self._life(rep))

    def _wait_for_gpu(self, rep: Replica) -> None:
        rep.granted = self.env.event()

    def _granted(self, replicas: list[Replica]) -> None:
        now = self.env.now
        for rep in replicas:
            rep.gpu_at = now
            self._set(rep, State.STARTING)
            assert rep.granted is not None
            rep.granted.succeed()

    def _life(self, rep: Replica) -> Generator[simpy.Event, object, None]:
        if rep.state is State.PENDING_GPU:
            assert rep.granted is not None
            yield rep.granted
        if rep.state is not State.STARTING:
            return  # removed before it got a GPU
        cold = self.cold_starts[rep.version].sample(rep.id in self.firsts)
        fails = self.faults[rep.version].start_fails()
        checks = math.ceil(cold / self.period - 1e-9)
        if fails:
            checks = max(checks, 1)  # noticed at a health check, never at the same instant
        yield self.env.timeout(checks * self.period)
        if rep.state is not State.STARTING:
            return  # removed during its cold start
        if fails:
            self.failed_starts[rep.version] += 1
            self._replace(rep, "start_failed")
            return
        self._turn_ready(rep)
        self.on_change()

    def _turn_ready(self, rep: Replica) -> None:
        rep.ready_at = self.env.now
        self._set(rep, State.READY)
        self.router.add_ready(rep, self.env.now)
        crash_in = self.faults[rep.version].time_to_crash()
        if crash_in < math.inf:
            self.env.timeout(crash_in).callbacks.append(lambda _: self._crash(rep))

    def _crash(self, rep: Replica) -> None:
        if rep.state is State.READY:
            self.router.kill(rep, self.env.now)
            self._replace(rep, "crashed")
        elif rep.state is State.DRAINING:  # being removed anyway: no replacement
            self.router.kill(rep, self.env.now)
            self._stop(rep, "crashed")
            self.on_change()

    def _replace(self, rep: Replica, reason: str) -> None:
        """Serve replaces a replica that failed to start or crashed with a new one."""
        self._stop(rep, reason)
        self._start(rep.version)
        self.on_change()

    def _remove(self, rep: Replica) -> None:
        if rep.state is State.PENDING_GPU:
            self.gpus.cancel(rep)
            self._stop(rep, "removed")
        elif rep.state is State.STARTING:
            self._stop(rep, "removed")
        elif rep.state is State.READY:
            self._set(rep, State.DRAINING)
            self.router.remove_ready(rep, self.env.now)
            if rep.ongoing == 0 and (self.drain_loop == 0 or self.drain_timeout == 0):
                self._stop(rep, "removed")
                return
            if self.drain_loop > 0:
                self._drain_check_later(rep)
            if self.drain_timeout == 0:
                self._drain_deadline(rep)
            else:
                ev = self.env.timeout(self.drain_timeout)
                ev.callbacks.append(lambda _: self._drain_deadline(rep))

    def _drain_check_later(self, rep: Replica) -> None:
        ev = self.env.timeout(self.drain_loop)
        ev.callbacks.append(lambda _: self._drain_check(rep))

    def _drain_check(self, rep: Replica) -> None:
        """Serve's drain loop woke: stop if nothing is in flight, else sleep another period."""
        if rep.state is not State.DRAINING:
            return  # the deadline stopped it
        if rep.ongoing:
            self._drain_check_later(rep)
            return
        self._stop(rep, "removed")
        self.on_change()

    def _drain_deadline(self, rep: Replica) -> None:
        """graceful_shutdown_timeout_s passed: the requests still running fail."""
        if rep.state is not State.DRAINING:
            return
        self.router.kill(rep, self.env.now)
        self._stop(rep, "drain_timeout")
        self.on_change()

    def _stop(self, rep: Replica, reason: str) -> None:
        self._set(rep, State.STOPPED)
        rep.stopped_at = self.env.now
        rep.stop_reason = reason
        self.live[rep.version].remove(rep)
        self.gpus.release(rep)
