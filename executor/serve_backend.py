"""The controller's backend on Ray Serve: `observe`, `apply` and `clock` for `Driver.tick`.

This module only connects the parts, each with one job:

- executor/plan.py — the rollout's plan and the memory carried between steps;
- executor/observation.py — Serve's details → the controller's counts (pure);
- executor/apply_order.py — the order of one decision's writes (pure);
- executor/serve_config.py — the cluster's declarative config, read and rewritten (pure);
- executor/router_link.py — everything about the router;
- executor/serve_calls.py — every call to Ray or Serve, each with a timeout.

Observing or applying fails with `BackendError` (a timeout, a Serve controller restarting, a
config Serve rejected); the driver counts it and the controller decides. The memory is changed
only by what succeeded, so a failed apply is applied again from the same memory.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import replace

from executor import observation, router_link, serve_calls
from executor.apply_order import Write, order
from executor.observation import Snapshot
from executor.plan import ROLES, Memory, Plan
from executor.serve_config import autoscaling_of, declarative_apps, with_versions
from rollout import controller as c
from rollout import history as h
from rollout.autoscaler import Autoscaler

PROBE_BUDGET_S = 2.0


class ServeBackend:
    """`observe()`, `apply()` and `clock()` for the driver, plus the events applying produced."""

    def __init__(self, plan: Plan, memory: Memory) -> None:
        self.plan = plan
        self.mem = memory.model_copy(deep=True)
        self.events: list[h.Event] = []
        self.counts: dict[str, dict[str, int]] = {}
        self.split: dict[str, dict[str, float]] = {}  # version → share of requests, sessions
        self.snapshot: Snapshot | None = None  # this tick's look at the cluster, once observed
        self._connected = False

    def clock(self) -> float:
        return time.time()

    def _connect(self) -> None:
        if not self._connected:
            serve_calls.connect(self.plan.address)
            self._connected = True

    # ---- observe ---------------------------------------------------------------------------

    def observe(self) -> c.Observation:
        self._connect()
        details = serve_calls.details()
        free, total = serve_calls.gpus()
        mem = self.mem.model_copy(deep=True)
        candidates = observation.to_probe(self.plan, mem, details)
        timeout = min(PROBE_BUDGET_S, self.plan.spec.health_check.timeout_s)
        passed = serve_calls.probe(candidates, timeout)
        snap = Snapshot(time.time(), details, free, total)
        seen, self.counts = observation.observe(self.plan, mem, snap, passed)
        guard, sticky = self.plan.spec.policy.guard, self.plan.spec.routing.sticky
        routed = router_link.snapshot(self.plan) if guard or sticky else {}
        if guard is not None:  # the metric guard's window, per role
            traffic = router_link.traffic(self.plan, routed)
            seen = {role: replace(v, traffic=traffic[role]) for role, v in seen.items()}
        if sticky is not None:  # for `rollout status`: how the split really goes
            self.split = router_link.split(routed)
        desired = self._desired(mem, snap.time)
        self.mem, self.snapshot = mem, snap
        return c.Observation(
            time=snap.time,
            desired=desired,
            current=seen[c.CURRENT],
            candidate=seen[c.CANDIDATE],
            capacity=observation.capacity(self.plan, snap, seen),
        )

    def _desired(self, mem: Memory, now: float) -> int:
        """The pool's size: fixed, or the autoscaler's decision on the router's traffic."""
        cfg = self.plan.spec.autoscaling
        if cfg is None:
            return self.plan.spec.replicas
        saved = mem.autoscaler or {"desired": self.plan.desired_start}
        scaler = Autoscaler.from_dict(cfg, saved)
        desired = scaler.observe(now, router_link.ongoing(self.plan))
        mem.autoscaler = scaler.to_dict()
        return desired

    # ---- apply -----------------------------------------------------------------------------

    def apply(self, actions: Sequence[c.Action]) -> None:
        if not actions:
            return
        plan = order(self.mem.targets, self.mem.weight, self.mem.session_weight, actions)
        self._connect()
        added = {r: plan.targets[r] - self.mem.targets.get(r, 0) for r in ROLES}
        self._check_gpus({r: n for r, n in added.items() if n > 0})
        before = self.mem.targets
        for w in plan.writes:
            began = time.time()
            handed = self._write(w, before)
            before = w.targets
            done = time.time()
            for name in w.applied:
                self._applied(name, done, began)
            for role in handed:
                what = f"hand {self.plan.version(role)} to Serve's autoscaling at {w.targets[role]}"
                self._applied(what, done, began)
        for outcome in plan.finished:
            self._applied(f"finish {outcome}", time.time(), time.time())
        self.mem.targets, self.mem.weight = plan.targets, plan.weight
        self.mem.session_weight = plan.session_weight

    def _write(self, w: Write, before: dict[str, int]) -> list[str]:
        """Write the whole declarative config with this write's counts (unless the cluster runs
        it already), then the route table with its weight; then, if asked, wait for the router
        to confirm the weight. A version removed by this write first gets its requests in
        flight at the proxies drained. Returns the roles handed back to Serve's autoscaling."""
        handed = [
            r
            for r in ROLES
            if w.hand_back
            and w.targets.get(r, 0) > 0
            and autoscaling_of(self.plan, r, w.targets[r]) is not None
        ]
        table = router_link.route_table(self.plan, w.targets, w.weight, w.session_weight)
        gone = [
            str(self.plan.version(r))
            for r in ROLES
            if self.plan.app(r) and before.get(r, 0) > 0 and w.targets.get(r, 0) == 0
        ]
        if gone:  # the router no longer sends them anything: let what it sent end first
            router_link.drain(self.plan, gone, self.plan.spec.model.graceful_shutdown_timeout_s)
        with serve_calls.config_lock():
            apps = declarative_apps(serve_calls.details())
            new = with_versions(self.plan, apps, w.targets, frozenset(handed))
            new.pop(self.plan.name, None)  # the router app earlier releases ran there
            if new != apps:
                serve_calls.deploy(new)
            # after the versions: a new route's prefix is routed by Serve once its app is
            # deployed, and a removed version had its weight taken away by an earlier write
            stamp = router_link.publish(self.plan, table)
        if w.confirm:
            router_link.confirm(self.plan, stamp)
        return handed

    def _applied(self, action: str, done: float, began: float) -> None:
        seconds = round(max(0.0, done - began), 4)
        self.events.append(h.ActionApplied(t=done, action=action, seconds=seconds))

    def _check_gpus(self, added: dict[str, int]) -> None:
        """Before a scale-up: say in the history when the cluster lacks GPUs for it."""
        need = sum(n * self.plan.gpus(role) for role, n in added.items())
        if need <= 0:
            return
        free, _ = serve_calls.gpus()
        # draining replicas give their GPUs back within their graceful shutdown
        freeing = sum(self.counts.get(r, {}).get("draining", 0) * self.plan.gpus(r) for r in ROLES)
        if need <= free + freeing + 1e-9:
            return
        role = max(added, key=lambda r: added[r] * self.plan.gpus(r))
        per = self.plan.gpus(role) or 1.0
        short = min(added[role], math.ceil((need - free) / per - 1e-9))
        deadline = self.plan.spec.rollout_policy().progress_deadline_seconds
        self.events.append(
            h.Waiting(
                t=time.time(),
                reason=(
                    f"{short} {role} replicas wait for a free GPU: the step needs {need:g} GPUs "
                    f"and the cluster has {free:g} free; the step fails after its progress "
                    f"deadline of {deadline:g} s unless GPUs free up"
                ),
            )
        )
