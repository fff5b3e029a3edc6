"""Typed events: the rollout's history, the same shape in simulation and in execution.

Every decision, state transition and control becomes one event with a timestamp (seconds:
simulated time in `sim/`, Unix time in `executor/`). Events serialise to JSON lines so a
simulated rollout and a real one can be laid side by side.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    t: float


class RolloutStarted(_Event):
    kind: Literal["rollout_started"] = "rollout_started"
    policy: dict[str, Any]
    desired: int
    steps: int
    first_deploy: bool = False  # nothing served before: the rollout starts from an empty pool


class ControlReceived(_Event):
    kind: Literal["control_received"] = "control_received"
    control: str


class ControlApplied(_Event):
    kind: Literal["control_applied"] = "control_applied"
    control: str


class ControlIgnored(_Event):
    kind: Literal["control_ignored"] = "control_ignored"
    control: str
    reason: str


class Transition(_Event):
    """The controller moved to another phase or stage."""

    kind: Literal["transition"] = "transition"
    phase: str
    stage: str
    direction: str
    step: int
    reason: str = ""


class Scaled(_Event):
    kind: Literal["scaled"] = "scaled"
    version: str
    replicas: int
    reason: str


class WeightSet(_Event):
    kind: Literal["weight_set"] = "weight_set"
    candidate_weight: float
    reason: str


class Waiting(_Event):
    """Why the rollout is not progressing; recorded once per distinct reason."""

    kind: Literal["waiting"] = "waiting"
    reason: str


class StepCompleted(_Event):
    kind: Literal["step_completed"] = "step_completed"
    step: int
    direction: str
    candidate_weight: float
    current_replicas: int
    candidate_replicas: int


class Resized(_Event):
    """The pool's desired size changed mid-rollout; both versions were resized."""

    kind: Literal["resized"] = "resized"
    desired_from: int
    desired_to: int
    current_replicas: int
    candidate_replicas: int


class Capped(_Event):
    """The pool's desired size does not fit the cluster's GPUs with room for a step: the
    controller drives a smaller pool (`allowed`), or, when even one replica's step does not
    fit, keeps `desired` and waits (see rollout/capacity.py). Recorded when the reason changes."""

    kind: Literal["capped"] = "capped"
    desired: int
    allowed: int
    capacity: int
    reason: str


class GuardBreached(_Event):
    """The metric guard found the candidate over a limit in its last window and acted."""

    kind: Literal["guard_breached"] = "guard_breached"
    metric: str  # error_rate | latency_p99_s | ttft_p99_s | latency_p99_ratio
    value: float
    threshold: float
    window_s: float
    requests: int  # the candidate's requests in the window
    action: str  # cancel | force_cancel


class MetricsChecked(_Event):
    """At a step boundary: the candidate's last window passed, or too few requests came."""

    kind: Literal["metrics_checked"] = "metrics_checked"
    step: int  # steps completed
    verdict: str  # passed | too few requests
    requests: int
    min_requests: int
    window_s: float


class Finished(_Event):
    kind: Literal["finished"] = "finished"
    outcome: str
    reason: str


class ActionApplied(_Event):
    """A backend finished applying an action; `seconds` is how long applying took."""

    kind: Literal["action_applied"] = "action_applied"
    action: str
    seconds: float


Event = Annotated[
    RolloutStarted
    | ControlReceived
    | ControlApplied
    | ControlIgnored
    | Transition
    | Scaled
    | WeightSet
    | Waiting
    | StepCompleted
    | Resized
    | Capped
    | GuardBreached
    | MetricsChecked
    | Finished
    | ActionApplied,
    Field(discriminator="kind"),
]

EVENT = TypeAdapter(Event)


def to_json(event: Event) -> str:
    return event.model_dump_json()


def from_json(line: str) -> Event:
    return EVENT.validate_json(line)


def dump_jsonl(events: Iterable[Event]) -> str:
    return "".join(to_json(e) + "\n" for e in events)


def load_jsonl(text: str) -> list[Event]:
    return [from_json(line) for line in text.splitlines() if line.strip()]
