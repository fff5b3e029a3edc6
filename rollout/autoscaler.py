"""The autoscaling policy shared by simulator and executor: Ray Serve's default semantics.

Desired replicas = ceil(average total ongoing requests over the look-back window /
target_ongoing_requests), clamped to [min_replicas, max_replicas]. A scale-up happens only once
the recommendation has stayed above the current count for `upscale_delay_s`, a scale-down once
it has stayed below for `downscale_delay_s` (Serve counts consecutive decisions the same way).
It sees the pool of both versions as one: the rollout controller splits the total.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field, model_validator


class AutoscalingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    min_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(10, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0)
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)
    look_back_period_s: float = Field(30.0, gt=0)
    interval_s: float = Field(1.0, gt=0)  # how often the backend samples and decides

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must not exceed max_replicas "
                f"({self.max_replicas})"
            )
        return self


@dataclass
class Autoscaler:
    """Feed it samples of the pool's total ongoing requests; it returns the desired total."""

    config: AutoscalingConfig
    desired: int
    _samples: deque[tuple[float, float]] = field(default_factory=deque)
    _above_since: float | None = None
    _below_since: float | None = None

    def recommend(self, now: float) -> int:
        """Replicas the averaged load asks for, before delays."""
        c = self.config
        if not self._samples:
            return self.desired
        avg = sum(v for _, v in self._samples) / len(self._samples)
        raw = math.ceil(avg / c.target_ongoing_requests - 1e-9)
        return max(c.min_replicas, min(c.max_replicas, raw))

    def observe(self, now: float, total_ongoing: float) -> int:
        """Record a sample at `now` and return the desired replica count."""
        c = self.config
        self._samples.append((now, total_ongoing))
        while self._samples and self._samples[0][0] < now - c.look_back_period_s:
            self._samples.popleft()
        want = self.recommend(now)
        if want > self.desired:
            self._below_since = None
            if self._above_since is None:
                self._above_since = now
            if now - self._above_since >= c.upscale_delay_s:
                self.desired, self._above_since = want, None
        elif want < self.desired:
            self._above_since = None
            if self._below_since is None:
                self._below_since = now
            if now - self._below_since >= c.downscale_delay_s:
                self.desired, self._below_since = want, None
        else:
            self._above_since = self._below_since = None
        return self.desired
