"""The loop both backends run: observe, decide, apply, record.

A backend adapts a cluster (SimPy's or Ray Serve's) to two calls. The driver keeps the
controller's state and the history; it knows no clock: the observation carries the time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from rollout import controller as c
from rollout import history as h
from rollout.policy import RolloutPolicy


class Backend(Protocol):
    def observe(self) -> c.Observation: ...

    def apply(self, actions: Sequence[c.Action]) -> None: ...


@dataclass
class Driver:
    state: c.RolloutState
    history: list[h.Event] = field(default_factory=list)

    @classmethod
    def begin(cls, policy: RolloutPolicy, desired: int, now: float) -> Driver:
        state, events = c.start(policy, desired, now)
        return cls(state, list(events))

    def control(self, ctl: c.Control, now: float) -> None:
        self.state, events = c.control(self.state, ctl, now)
        self.history.extend(events)

    def tick(self, backend: Backend) -> c.Decision:
        decision = c.decide(self.state, backend.observe())
        backend.apply(decision.actions)
        self.state = decision.state
        self.history.extend(decision.events)
        return decision

    @property
    def done(self) -> bool:
        return self.state.terminal
