"""The autoscaling policy shared by simulator and executor: Ray Serve 2.60's, decision for decision.

Three parts, each pure (see docs/autoscaling.md):

- `AutoscalingConfig`: the fields of Serve's `AutoscalingConfig`, with Serve's defaults, so the
  deploy file's `autoscaling` block is Serve's `autoscaling_config` (`to_serve()`), plus
  `interval_s`, how often our backends decide.
- The metrics pipeline (`Autoscaler.total`): Serve does not decide on the load of this instant.
  Handles record the ongoing requests every `record_interval` and push what they recorded in
  the last `look_back_period_s` every `metrics_interval_s`; the controller averages the last
  push over time, holding its last value until now. So a load step is seen up to
  `metrics_interval_s` late, and a spike between two records is never seen.
- The decision (`decide`): Serve's default policy wrapped by `_apply_autoscaling_config`
  (cold-start fast path, hold while no replica runs, `upscaling_factor`/`downscaling_factor`,
  wall-clock delays with `downscale_to_zero_delay_s`) and then clamped to
  [min_replicas, max_replicas] like `apply_bounds`.

It sees the pool of both versions as one: during a rollout the controller splits the total.
"""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass, field
from enum import StrEnum
from fractions import Fraction
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Serve's constants (ray/serve/_private/constants.py, ray/serve/autoscaling_policy.py, 2.60.0)
RECORD_INTERVAL_FACTOR = Fraction(1, 5)  # RAY_SERVE_AUTOSCALING_METRIC_RECORD_INTERVAL_FACTOR
DELAY_EPS_S = 1e-6  # _DELAY_ELAPSED_EPS_S: 400 s may elapse as 399.9999999999999 in floats
_MIN_LAST_WINDOW_S = 1e-3  # the controller holds a sample at `now` for 1 ms, never 0 s


class Aggregation(StrEnum):
    MEAN = "mean"  # time-weighted over the pushed window, the last value held until now
    MAX = "max"
    MIN = "min"


class AutoscalingConfig(BaseModel):
    """Serve's `AutoscalingConfig` fields and defaults (less the deprecated smoothing factors
    and custom `policy`), plus `interval_s`, which Serve does not have."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_replicas: int = Field(1, ge=0)
    initial_replicas: int | None = Field(None, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0)
    metrics_interval_s: float = Field(10.0, gt=0)  # how often handles push their samples
    look_back_period_s: float = Field(30.0, gt=0)
    upscaling_factor: float | None = Field(None, gt=0)
    downscaling_factor: float | None = Field(None, gt=0)
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)
    downscale_to_zero_delay_s: float | None = Field(None, ge=0)
    aggregation_function: Aggregation = Aggregation.MEAN
    interval_s: float = Field(1.0, gt=0)  # ours: how often a backend decides (Serve: 0.1 s)

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            unset = "" if "max_replicas" in self.model_fields_set else ", Serve's default"
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must not exceed max_replicas "
                f"({self.max_replicas}{unset})"
            )
        n = self.initial_replicas
        if n is not None and not self.min_replicas <= n <= self.max_replicas:
            raise ValueError(
                f"initial_replicas ({n}) must lie within min_replicas ({self.min_replicas}) "
                f"and max_replicas ({self.max_replicas})"
            )
        return self

    @property
    def record_interval(self) -> Fraction:
        """Seconds between two recorded samples: min(0.2 · look-back, push interval), as
        Serve's handles and replicas compute it (30 s look-back → every 6 s)."""
        by_look_back = _exact(self.look_back_period_s) * RECORD_INTERVAL_FACTOR
        return min(by_look_back, _exact(self.metrics_interval_s))

    def initial(self, replicas: int) -> int:
        """Serve's target at deploy time (`DeploymentAutoscalingState.register`):
        `initial_replicas` when set, else `replicas`, clamped to the bounds."""
        n = replicas if self.initial_replicas is None else self.initial_replicas
        return self.clamp(n)

    def clamp(self, n: int) -> int:
        """Serve's `apply_bounds`."""
        return max(self.min_replicas, min(self.max_replicas, n))

    def to_serve(self, initial_replicas: int | None = None) -> dict[str, Any]:
        """Serve's `autoscaling_config` for this block, field for field; `initial_replicas`
        overrides ours, e.g. to hand a version back to Serve at the size it has now."""
        d = self.model_dump(mode="json", exclude={"interval_s"}, exclude_none=True)
        if initial_replicas is not None:
            d["initial_replicas"] = self.clamp(initial_replicas)
        return d


def _exact(x: float) -> Fraction:
    """The decimal a user wrote, exactly: 0.1 → 1/10 (not the binary 0.1000000000000000055)."""
    return Fraction(repr(float(x)))


@dataclass(frozen=True)
class Ticks:
    """The instants k · interval, k = 0, 1, 2 …, each computed on its own and rounded once.

    Adding the interval tick after tick drifts: ten steps of 0.1 s end at 0.9999999999999999,
    which is before 1.0, so whatever is due at 1.0 happens one tick late. Here tick k is
    k·n/d in integers (Python rounds an int/int division correctly): tick 10 of 0.1 s is 1.0,
    tick 3 is 0.3, tick 36,000 is 3600.0.
    """

    step: Fraction
    # the step's numerator and denominator as plain ints: Fraction's properties are slow,
    # and a simulation asks for ticks hundreds of thousands of times
    _num: int = field(init=False, repr=False, compare=False)
    _den: int = field(init=False, repr=False, compare=False)
    # the last interval asked about, [at(k), at(k + 1), k]: a backend asks about the same or
    # the next interval tick after tick, and this answers it without the exact arithmetic
    _memo: list = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_num", self.step.numerator)
        object.__setattr__(self, "_den", self.step.denominator)
        object.__setattr__(self, "_memo", [self.at(0), self.at(1), 0])

    @classmethod
    def every(cls, interval: float | Fraction) -> Ticks:
        step = interval if isinstance(interval, Fraction) else _exact(interval)
        if step <= 0:
            raise ValueError(f"a tick interval must be positive (got {interval})")
        return cls(step)

    def at(self, k: int) -> float:
        return k * self._num / self._den

    def index_at_or_before(self, t: float) -> int:
        """The last k with at(k) ≤ t (negative before tick 0)."""
        memo = self._memo
        lo, hi, k = memo
        if lo <= t:
            if t < hi:  # at(k) ≤ t < at(k + 1)
                return k
            after = self.at(k + 2)
            if t < after:  # at(k + 1) ≤ t < at(k + 2): the next interval
                memo[:] = hi, after, k + 1
                return k + 1
        k = self._search(t)
        memo[:] = self.at(k), self.at(k + 1), k
        return k

    def _search(self, t: float) -> int:
        num, den = t.as_integer_ratio()
        k = (num * self._den) // (den * self._num)
        while self.at(k) > t:
            k -= 1
        while self.at(k + 1) <= t:
            k += 1
        return k

    def at_or_before(self, t: float) -> float:
        self.index_at_or_before(t)
        return self._memo[0]  # at(k), as the memo holds it

    def after(self, t: float) -> float:
        """The first tick strictly after t."""
        self.index_at_or_before(t)
        return self._memo[1]  # at(k + 1)


# ---- the decision: Serve's default policy, factors, delays and bounds ------------------------


def apply_factors(desired: float, running: int, config: AutoscalingConfig) -> int:
    """Serve's `_apply_scaling_factors`: move `factor` of the way from the running count.

    upscaling_factor 0.5, 5 running, 8 wanted: ceil(5 + 0.5·3) = 7; at 7: ceil(7 + 0.5·1) = 8.
    A downscale the factor would round back to the running count still removes one (10 → 9),
    and from no running replica the factor is not applied (it would amplify the whole count).
    """
    if running == 0:
        return math.ceil(desired)
    delta = desired - running
    factor = (config.upscaling_factor if delta > 0 else config.downscaling_factor) or 1.0
    scaled = math.ceil(running + factor * delta)
    if math.ceil(desired) < running and scaled == running:
        scaled -= 1
    return scaled


def _delay(
    desired: int,
    target: int,
    config: AutoscalingConfig,
    above: float | None,
    below: float | None,
    now: float,
) -> tuple[int, float | None, float | None]:
    """Serve's `_apply_delay_logic`: a change happens once it has been wanted, in the same
    direction, for the delay (by the clock, not by counting ticks); the other direction or no
    change restarts the clock. Down to zero only from one replica, after
    `downscale_to_zero_delay_s` (else `downscale_delay_s`); any other downscale stops at one."""
    if desired > target:
        since = now if above is None else above
        if now - since + DELAY_EPS_S >= config.upscale_delay_s:
            return desired, None, None
        return target, since, None
    if desired < target:
        if target == 1:
            delay = config.downscale_to_zero_delay_s
            delay = config.downscale_delay_s if delay is None else delay
        else:
            delay = config.downscale_delay_s
            desired = max(1, desired)
        since = now if below is None else below
        if now - since + DELAY_EPS_S >= delay:
            return desired, None, None
        return target, None, since
    return target, None, None


def decide(
    config: AutoscalingConfig,
    *,
    total: float,
    running: int,
    target: int,
    above: float | None,
    below: float | None,
    now: float,
) -> tuple[int, float | None, float | None]:
    """One decision of Serve's controller: (new target, upscale clock, downscale clock).

    `total`: the averaged ongoing requests Serve sees (`Autoscaler.total`); `running`: replicas
    RUNNING now (ready, in either version); `target`: the current target. Serve's order:
    cold-start fast path, `replica_queue_length_autoscaling_policy`, scaling factors, the
    bypass while no replica runs, the delays, and last the [min, max] bounds.
    """
    if running == 0 and total > 0:  # cold start: at once, at least the target, clocks kept
        return config.clamp(max(math.ceil(config.upscaling_factor or 1.0), target)), above, below
    if running == 0:
        raw = float(target)
    else:  # Serve's arithmetic, for the same float: running · total / (target · running)
        raw = running * (total / (config.target_ongoing_requests * running))
    scaled = apply_factors(raw, running, config)
    if running == 0 and scaled > 0:  # replicas still starting, no load: hold the target
        return config.clamp(scaled), above, below
    n, above, below = _delay(max(0, scaled), target, config, above, below, now)
    return config.clamp(n), above, below


# ---- the autoscaler: samples in, desired replicas out ----------------------------------------


def _time(sample: tuple[float, float]) -> float:
    return sample[0]


@dataclass(frozen=True)
class _Window:
    """The records one push carries: (instant, ongoing requests), oldest first, and the area
    under them up to the last one (what the mean needs again at every decision until the next
    push)."""

    at: float
    points: list[tuple[float, float]]
    area: float

    @classmethod
    def of(cls, at: float, points: list[tuple[float, float]]) -> _Window:
        area = sum(v * (t1 - t0) for (t0, v), (t1, _) in itertools.pairwise(points))
        return cls(at, points, area)

    def seen(self, now: float, how: Aggregation) -> float:
        """Serve's aggregate at `now`; for the mean, `time_weighted_average` from the first
        record to `now`, the last record's value held (for 1 ms when it is from `now`)."""
        points = self.points
        if not points:
            return 0.0
        if how is Aggregation.MAX:
            return max(v for _, v in points)
        if how is Aggregation.MIN:
            return min(v for _, v in points)
        last, value = points[-1]
        end = last + (now - last if now > last else _MIN_LAST_WINDOW_S)
        return (self.area + value * (end - last)) / (end - points[0][0])


class AutoscalerState(BaseModel):
    """What an `Autoscaler` carries from one decision to the next, as recorded (JSON).

    The keys are those the executor has always recorded, so a step memory written by an
    earlier version still loads.
    """

    model_config = ConfigDict(extra="forbid")

    desired: int = Field(ge=0)
    samples: list[tuple[float, float]] = []  # (time, ongoing requests), oldest first
    above: float | None = None  # wanting more replicas since
    below: float | None = None  # wanting fewer replicas since


@dataclass
class Autoscaler:
    """Feed it the pool's ongoing requests (running + waiting at the router) and the replicas
    running; it returns the pool's desired replica count, as Serve would decide it.

    The metrics pipeline needs no state of its own: what Serve's controller sees at `now` is
    a function of the samples (what each record instant would have read) and of `now` (the
    last push instant), so the samples are the whole of it.
    """

    config: AutoscalingConfig
    desired: int
    _samples: list[tuple[float, float]] = field(default_factory=list)
    _above_since: float | None = None
    _below_since: float | None = None
    _decisions: Ticks = field(init=False, repr=False, compare=False)
    _records: Ticks = field(init=False, repr=False, compare=False)
    _pushes: Ticks = field(init=False, repr=False, compare=False)
    _pushed: _Window | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._samples = [(float(t), float(v)) for t, v in self._samples]
        c = self.config
        self._decisions = Ticks.every(c.interval_s)
        self._records = Ticks.every(c.record_interval)
        self._pushes = Ticks.every(c.metrics_interval_s)

    @classmethod
    def start(cls, config: AutoscalingConfig, replicas: int) -> Autoscaler:
        """A pool deployed with `replicas` (or the config's `initial_replicas`)."""
        return cls(config, config.initial(replicas))

    # ---- serialisation -------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return AutoscalerState(
            desired=self.desired,
            samples=self._samples,
            above=self._above_since,
            below=self._below_since,
        ).model_dump(mode="json")

    @classmethod
    def from_dict(cls, config: AutoscalingConfig, data: dict[str, Any]) -> Autoscaler:
        s = AutoscalerState.model_validate(data)
        return cls(config, s.desired, s.samples, s.above, s.below)

    # ---- time ----------------------------------------------------------------------------

    def next_tick(self, after: float) -> float:
        """The next instant a backend should call `observe`: a decision, record or push
        instant, whichever comes first, exact (see `Ticks`). Chain it from the previous tick,
        not from a clock that may sit one ulp before it."""
        return min(
            self._decisions.after(after), self._records.after(after), self._pushes.after(after)
        )

    # ---- the pipeline --------------------------------------------------------------------

    def total(self, now: float, running: int) -> float:
        """The ongoing requests Serve's controller sees at `now`.

        The last push (at the last multiple of `metrics_interval_s`) carried the samples
        recorded at multiples of `record_interval` within `look_back_period_s` before it; each
        record reads the latest sample at or before its instant. While no replica runs,
        handles push with every request (Serve's scale-from-zero shortcut): the push is now.
        No sample pushed yet reads as 0, as in Serve.
        """
        if not self._samples:
            return 0.0
        if running == 0 and self._samples[-1][1] > 0:
            window = self._window(now)
        else:
            pushed = self._pushes.at_or_before(now)
            if self._pushed is None or self._pushed.at != pushed:
                self._pushed = self._window(pushed)
            window = self._pushed
        return window.seen(now, self.config.aggregation_function)

    def _window(self, pushed: float) -> _Window:
        """The records a push at `pushed` carries."""
        samples, records = self._samples, self._records
        lo = pushed - self.config.look_back_period_s
        k = records.index_at_or_before(lo)
        if records.at(k) < lo:
            k += 1
        points: list[tuple[float, float]] = []
        while (s := records.at(k)) <= pushed:
            i = bisect.bisect_right(samples, s, key=_time) - 1
            if i >= 0:
                points.append((s, samples[i][1]))
            k += 1
        return _Window.of(pushed, points)

    def _prune(self, now: float) -> None:
        """Keep the samples a record of a push still to come may read: those after the
        earliest record instant of the current push's window, and the one before it."""
        horizon = self._pushes.at_or_before(now) - self.config.look_back_period_s
        samples = self._samples
        if len(samples) < 2 or samples[1][0] > horizon:
            return  # at most the first sample is at or before the horizon: none to drop
        i = bisect.bisect_right(samples, horizon, key=_time) - 1
        if i > 0:
            del samples[:i]

    # ---- deciding ------------------------------------------------------------------------

    def observe(self, now: float, total_ongoing: float, running: int | None = None) -> int:
        """Record a sample of the pool's ongoing requests at `now`, decide, return the desired
        replica count. `running`: the pool's replicas serving now (None: assume the target)."""
        if self._pushed is not None and now <= self._pushed.at:
            self._pushed = None  # a sample at or before that push may change its records
        sample, samples = (float(now), float(total_ongoing)), self._samples
        if not samples or samples[-1][0] <= sample[0]:
            samples.append(sample)  # where insort would put it, found at once
        else:
            bisect.insort(samples, sample, key=_time)
        self._prune(now)
        run = self.desired if running is None else running
        self.desired, self._above_since, self._below_since = decide(
            self.config,
            total=self.total(now, run),
            running=run,
            target=self.desired,
            above=self._above_since,
            below=self._below_since,
            now=now,
        )
        return self.desired
