"""The rollout policy: the three fields users know from Baseten, plus guards against stuck steps."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Mode(StrEnum):
    SURGE = "surge"  # add candidates first; capacity briefly above the target
    UNAVAILABLE = "unavailable"  # remove old replicas first; never above the target


class GuardPolicy(BaseModel):
    """Limits on the candidate's traffic over a sliding window; a breach cancels the rollout.

    Each limit is off (None) unless set, and at least one must be set. A verdict needs
    `min_requests` candidate requests in the window; the latency ratio also needs as many on the
    current version (both measured over the same window).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    window_s: float = Field(60.0, gt=0, le=300)  # the router keeps 300 s of metrics
    min_requests: int = Field(50, ge=1)
    max_error_rate: float | None = Field(None, ge=0, lt=1)
    max_latency_p99_s: float | None = Field(None, gt=0)
    max_ttft_p99_s: float | None = Field(None, gt=0)
    max_latency_p99_ratio: float | None = Field(None, gt=1)
    action: Literal["cancel", "force_cancel"] = "cancel"

    @model_validator(mode="after")
    def _some_limit(self) -> GuardPolicy:
        limits = (
            self.max_error_rate,
            self.max_latency_p99_s,
            self.max_ttft_p99_s,
            self.max_latency_p99_ratio,
        )
        if all(x is None for x in limits):
            raise ValueError(
                "the guard needs at least one limit: max_error_rate, max_latency_p99_s, "
                "max_ttft_p99_s or max_latency_p99_ratio"
            )
        return self


class RolloutPolicy(BaseModel):
    """How a rollout steps from the current version to the candidate.

    Exactly one of the two percentages is non-zero (Baseten rejects both-set and both-zero,
    stricter than Kubernetes). Percentages are of the pool's desired replica count.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_surge_percent: int = Field(0, ge=0, le=50)
    max_unavailable_percent: int = Field(0, ge=0, le=50)
    stabilization_time_seconds: float = Field(0.0, ge=0, le=3600)
    progress_deadline_seconds: float = Field(600.0, gt=0, le=86400)
    max_start_failures: int = Field(3, ge=0, le=1000)
    # consecutive iterations whose observe or apply failed (a timeout, a lost connection, a
    # rejected config) tolerated before the rollout fails and rolls back
    max_backend_errors: int = Field(5, ge=0, le=1000)
    guard: GuardPolicy | None = None  # cancel the rollout when the candidate regresses

    @model_validator(mode="after")
    def _exactly_one_mode(self) -> RolloutPolicy:
        if (self.max_surge_percent > 0) == (self.max_unavailable_percent > 0):
            raise ValueError(
                "exactly one of max_surge_percent and max_unavailable_percent must be non-zero"
                f" (got {self.max_surge_percent} and {self.max_unavailable_percent})"
            )
        return self

    @property
    def mode(self) -> Mode:
        return Mode.SURGE if self.max_surge_percent > 0 else Mode.UNAVAILABLE

    @property
    def percent(self) -> int:
        return self.max_surge_percent or self.max_unavailable_percent

    def label(self) -> str:
        """Short name used in tables and file names, e.g. `surge=25 stab=60`."""
        return f"{self.mode.value}={self.percent} stab={self.stabilization_time_seconds:g}"

    @classmethod
    def parse_flag(cls, flag: str, **rest: float) -> RolloutPolicy:
        """Parse the command line's `surge=25` or `unavailable=25`."""
        name, sep, value = flag.partition("=")
        field = {"surge": "max_surge_percent", "unavailable": "max_unavailable_percent"}.get(name)
        if not sep or field is None or not value.strip().isdigit():
            raise ValueError(f"--policy must look like surge=25 or unavailable=25 (got {flag!r})")
        return cls(**{field: int(value)}, **rest)
