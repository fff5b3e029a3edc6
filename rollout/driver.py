"""The loop both backends run: observe, decide, apply, record.

A backend adapts a cluster (SimPy's or Ray Serve's) to three calls. The driver keeps the
controller's state, the history and the count of failed iterations; it knows no clock: the
observation carries the time, and `clock()` gives it when observing failed.

A backend raises `BackendError` for a failure outside the controller's control (a timeout, a
lost connection, a config the cluster rejected). The driver hands it to the controller inside
the next observation (`Observation.errors`, `.error`), so a failing backend makes the rollout
wait, then fail and roll back once `policy.max_backend_errors` iterations in a row have failed.
Any other exception is a bug and propagates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from rollout import controller as c
from rollout import history as h
from rollout.policy import RolloutPolicy


class BackendError(Exception):
    """Observing or applying failed; the controller decides what that means."""


class Backend(Protocol):
    def clock(self) -> float: ...

    def observe(self) -> c.Observation: ...

    def apply(self, actions: Sequence[c.Action]) -> None: ...


@dataclass
class Driver:
    state: c.RolloutState
    history: list[h.Event] = field(default_factory=list)
    errors: int = 0  # consecutive failed iterations; a backend that persists state keeps it
    error: str = ""  # the last failure's message

    @classmethod
    def begin(
        cls, policy: RolloutPolicy, desired: int, now: float, first_deploy: bool = False
    ) -> Driver:
        state, events = c.start(policy, desired, now, first_deploy=first_deploy)
        return cls(state, list(events))

    def control(self, ctl: c.Control, now: float) -> None:
        self.state, events = c.control(self.state, ctl, now)
        self.history.extend(events)

    def tick(self, backend: Backend) -> c.Decision:
        """One iteration. A decision is recorded before its actions are applied: if applying
        fails, the next one applies the recorded state again. Only the decision that ends the
        rollout is recorded after applying, so a rollout never ends with its last actions
        lost; a failed one is decided again."""
        try:
            obs = replace(backend.observe(), errors=self.errors, error=self.error)
        except BackendError as e:
            self._failed(e)
            obs = c.Observation.unseen(backend.clock(), self.errors, self.error)
        decision = c.decide(self.state, obs)
        if not obs.seen:  # a decision without counts emits no action
            return self._record(decision)
        if not decision.state.terminal:
            self._record(decision)
        try:
            backend.apply(decision.actions)
        except BackendError as e:
            self._failed(e)
            return decision if not decision.state.terminal else c.Decision(self.state, (), ())
        self.errors, self.error = 0, ""
        if decision.state.terminal:
            self._record(decision)
        return decision

    def _failed(self, e: BackendError) -> None:
        self.errors += 1
        self.error = str(e) or type(e).__name__

    def _record(self, decision: c.Decision) -> c.Decision:
        self.state = decision.state
        self.history.extend(decision.events)
        return decision

    @property
    def done(self) -> bool:
        return self.state.terminal
