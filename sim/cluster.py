"""The cluster: a pool of GPUs and the replicas of both versions, with their lifecycles.

A replica asks for its GPUs when it is created and waits in FIFO order if none are free. It
holds them through its cold start, while it serves, and while it drains after removal; it
releases them when its last in-flight request finishes. Health checks run every period from
the moment the replica got its GPU, so it turns ready at the first check after its cold start.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Generator

import simpy

from rollout.controller import VersionObservation
from sim.coldstart import ColdStart
from sim.replica import Replica, State
from sim.router import Router


class GpuPool:
    """GPUs handed out whole, first come first served."""

    def __init__(self, capacity: int, per_replica: int) -> None:
        self.capacity = capacity
        self.per_replica = per_replica
        self.in_use = 0
        self.waiting: deque[Replica] = deque()

    def request(self, rep: Replica) -> bool:
        """Take GPUs for rep now (True), or queue it (False)."""
        if not self.waiting and self.in_use + self.per_replica <= self.capacity:
            self.in_use += self.per_replica
            return True
        self.waiting.append(rep)
        return False

    def cancel(self, rep: Replica) -> None:
        self.waiting.remove(rep)

    def release(self) -> list[Replica]:
        """Give one replica's GPUs back; returns the waiting replicas that now got theirs."""
        self.in_use -= self.per_replica
        granted = []
        while self.waiting and self.in_use + self.per_replica <= self.capacity:
            self.in_use += self.per_replica
            granted.append(self.waiting.popleft())
        return granted


# scale-down order: replicas without traffic first (waiting, then starting), then ready ones
_REMOVE_RANK = {State.PENDING_GPU: 0, State.STARTING: 1, State.READY: 2}


class Cluster:
    def __init__(
        self,
        env: simpy.Environment,
        *,
        gpus: GpuPool,
        health_period_s: float,
        cold_starts: tuple[ColdStart, ColdStart],
        router: Router,
        on_change: Callable[[], None],
    ) -> None:
        self.env = env
        self.gpus = gpus
        self.period = health_period_s
        self.cold_starts = cold_starts
        self.router = router
        self.on_change = on_change
        self.replicas: list[Replica] = []  # every replica ever created, by id
        self.live: tuple[list[Replica], list[Replica]] = ([], [])  # not yet stopped
        self.counts = [[0] * len(State), [0] * len(State)]

    # ---- reading -------------------------------------------------------------------------

    def observe(self, version: int) -> VersionObservation:
        c = self.counts[version]
        return VersionObservation(
            ready=c[State.READY],
            starting=c[State.PENDING_GPU] + c[State.STARTING],
            draining=c[State.DRAINING],
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
            if self.gpus.request(rep):
                rep.gpu_at = rep.ready_at = now
                self._set(rep, State.READY)
                self.router.add_ready(rep, now)
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
            live.sort(key=lambda r: (_REMOVE_RANK[r.state], r.ongoing, -r.id))
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
        if rep.state is State.DRAINING and rep.ongoing == 0:
            self._stop(rep)
            self.on_change()

    # ---- lifecycle -----------------------------------------------------------------------

    def _new(self, version: int) -> Replica:
        rep = Replica(len(self.replicas), version, self.env.now)
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

    def _life(self, rep: Replica) -> Generator[simpy.Event, object, None]:
        if rep.state is State.PENDING_GPU:
            assert rep.granted is not None
            yield rep.granted
        if rep.state is not State.STARTING:
            return  # removed before it got a GPU
        cold = self.cold_starts[rep.version].sample()
        checks = math.ceil(cold / self.period - 1e-9)
        yield self.env.timeout(checks * self.period)
        if rep.state is not State.STARTING:
            return  # removed during its cold start
        rep.ready_at = self.env.now
        self._set(rep, State.READY)
        self.router.add_ready(rep, self.env.now)
        self.on_change()

    def _remove(self, rep: Replica) -> None:
        if rep.state is State.PENDING_GPU:
            self.gpus.cancel(rep)
            self._stop(rep, held_gpu=False)
        elif rep.state is State.STARTING:
            self._stop(rep)
        elif rep.state is State.READY:
            self._set(rep, State.DRAINING)
            self.router.remove_ready(rep, self.env.now)
            if rep.ongoing == 0:
                self._stop(rep)

    def _stop(self, rep: Replica, *, held_gpu: bool = True) -> None:
        now = self.env.now
        self._set(rep, State.STOPPED)
        rep.stopped_at = now
        self.live[rep.version].remove(rep)
        if not held_gpu:
            return
        for waiting in self.gpus.release():
            waiting.gpu_at = now
            self._set(waiting, State.STARTING)
            assert waiting.granted is not None
            waiting.granted.succeed()
