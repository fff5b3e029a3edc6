"""A minimal in-memory cluster for controller tests (like Kubernetes' fake clientset).

Replicas start after a per-replica delay, may fail to start, go ready, and drain for a fixed
time when removed; every replica holds a GPU from start to the end of its drain. It records
every applied action so tests can assert on them. `first_deploy` starts it empty; `outages`
(time windows) and `error_prob` make observe and apply raise `BackendError`, an apply after
applying a random prefix of its actions, as a backend that fails half way does.

With a `load`, it also reports each version's traffic over the guard's window: `rate` requests
a second split by the weight in effect at each moment (the integral over the window), each
version failing its share `error_rate` and answering with its fixed `latency_s` as p99.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from rollout import controller as c
from rollout.driver import BackendError
from rollout.guard import Traffic


@dataclass(frozen=True)
class Load:
    rate: float  # requests per second, both versions together
    window_s: float
    error_rate: dict[str, float] = field(default_factory=dict)  # per version, default 0
    latency_s: dict[str, float] = field(default_factory=dict)  # per version, default 1 s


@dataclass
class Replica:
    ready_at: float
    fails: bool = False
    drain_until: float | None = None


@dataclass
class FakeCluster:
    desired: int
    now: float = 0.0
    seed: int = 0
    start_delay: tuple[float, float] = (5.0, 5.0)  # uniform range, seconds
    drain_s: float = 1.0
    fail_prob: float = 0.0  # chance that a candidate start fails (it is retried)
    fail_versions: tuple[str, ...] = (c.CANDIDATE,)
    first_deploy: bool = False  # nothing runs yet: the current version has no replica
    outages: list[tuple[float, float]] = field(default_factory=list)  # [from, until) windows
    error_prob: float = 0.0  # chance that one observe or apply fails
    capacity: int | None = None  # replicas' worth of GPUs for the pool (reported, not enforced)
    weight: float = 0.0
    replicas: dict[str, list[Replica]] = field(default_factory=dict)
    targets: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    applied: list[c.Action] = field(default_factory=list)
    load: Load | None = None
    weights: list[tuple[float, float]] = field(default_factory=lambda: [(0.0, 0.0)])

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        live = 0 if self.first_deploy else self.desired
        self.replicas = {c.CURRENT: [Replica(0.0) for _ in range(live)], c.CANDIDATE: []}
        self.targets = {c.CURRENT: live, c.CANDIDATE: 0}
        self.failed = {c.CURRENT: 0, c.CANDIDATE: 0}

    # ---- what holds GPUs ---------------------------------------------------------------

    def live(self, version: str) -> list[Replica]:
        return [r for r in self.replicas[version] if r.drain_until is None]

    def holding(self) -> int:
        return sum(len(rs) for rs in self.replicas.values())

    def count(self, version: str) -> c.VersionObservation:
        ready = starting = draining = 0
        for r in self.replicas[version]:
            if r.drain_until is not None:
                draining += 1
            elif r.ready_at <= self.now:
                ready += 1
            else:
                starting += 1
        return c.VersionObservation(
            ready=ready,
            starting=starting,
            draining=draining,
            failed_starts=self.failed[version],
            traffic=self.traffic(version),
        )

    def traffic(self, version: str) -> Traffic:
        """Requests over the last window: rate × the integral of the version's share."""
        load = self.load
        if load is None:
            return Traffic()
        lo, total = self.now - load.window_s, 0.0
        for i, (t, w) in enumerate(self.weights):
            until = self.weights[i + 1][0] if i + 1 < len(self.weights) else self.now
            span = max(0.0, min(until, self.now) - max(t, lo))
            total += span * (w if version == c.CANDIDATE else 1.0 - w)
        n = int(load.rate * total)
        if n == 0:
            return Traffic()
        failures = round(n * load.error_rate.get(version, 0.0))
        latency = load.latency_s.get(version, 1.0)
        return Traffic(n, failures, latency, latency / 2)

    def clock(self) -> float:
        return self.now

    def _maybe_fail(self, what: str) -> None:
        if any(lo <= self.now < hi for lo, hi in self.outages):
            raise BackendError(f"{what}: the cluster is unreachable")
        if self.error_prob and self.rng.random() < self.error_prob:
            raise BackendError(f"{what} timed out")

    def observe(self) -> c.Observation:
        self._maybe_fail("observe")
        return self.snapshot()

    def snapshot(self) -> c.Observation:
        """What the cluster looks like, even while observing it fails (for checks)."""
        return c.Observation(
            time=self.now,
            desired=self.desired,
            current=self.count(c.CURRENT),
            candidate=self.count(c.CANDIDATE),
            capacity=self.capacity,
        )

    # ---- applying actions ---------------------------------------------------------------

    def apply(self, actions: Sequence[c.Action]) -> None:
        try:
            self._maybe_fail("apply")
        except BackendError:
            if actions:  # fail half way: a prefix is applied
                self._apply(actions[: self.rng.randrange(len(actions))])
            raise
        self._apply(actions)

    def _apply(self, actions: Sequence[c.Action]) -> None:
        for a in actions:
            self.applied.append(a)
            if isinstance(a, c.ScaleTo):
                self.targets[a.version] = a.replicas
                self._reconcile(a.version)
            elif isinstance(a, c.SetWeight):
                self.weight = a.candidate_weight
                self.weights.append((self.now, a.candidate_weight))

    def _start(self, version: str) -> Replica:
        lo, hi = self.start_delay
        fails = version in self.fail_versions and self.rng.random() < self.fail_prob
        # a replica is never ready in the instant it starts: the controller must see it first
        return Replica(self.now + max(1e-3, self.rng.uniform(lo, hi)), fails=fails)

    def _reconcile(self, version: str) -> None:
        live = self.live(version)
        while len(live) < self.targets[version]:
            r = self._start(version)
            self.replicas[version].append(r)
            live.append(r)
        # remove starting replicas first, then ready ones (as Serve and Kubernetes do)
        extra = len(live) - self.targets[version]
        if extra > 0:
            live.sort(key=lambda r: r.ready_at <= self.now)
            for r in live[:extra]:
                r.drain_until = self.now + self.drain_s
        gone = [r for r in self.replicas[version] if r.drain_until is not None]
        for r in gone:
            if r.drain_until <= self.now:  # nothing in flight to drain
                self.replicas[version].remove(r)

    def advance(self, dt: float) -> None:
        self.now += dt
        for version, rs in self.replicas.items():
            keep = []
            for r in rs:
                if r.drain_until is not None and r.drain_until <= self.now:
                    continue
                if r.drain_until is None and r.fails and r.ready_at <= self.now:
                    self.failed[version] += 1
                    continue  # a failed start; reconcile starts a replacement
                keep.append(r)
            self.replicas[version] = keep
            self._reconcile(version)

    def crash_ready(self, version: str) -> bool:
        """A ready replica dies (the backend restarts it)."""
        ready = [r for r in self.live(version) if r.ready_at <= self.now]
        if not ready:
            return False
        self.replicas[version].remove(ready[0])
        self._reconcile(version)
        return True
