"""The shared autoscaling policy against Ray Serve 2.60's own.

Cases marked `Serve:` are ported from Serve's unit tests,
`python/ray/serve/tests/unit/test_autoscaling_policy.py` in ray-project/ray (2.60), named by
class and test; the property test runs Serve's policy function itself beside ours.
"""

from __future__ import annotations

import json
import math
import random
from fractions import Fraction
from typing import Any
from unittest.mock import patch

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from rollout.autoscaler import (
    Autoscaler,
    AutoscalingConfig,
    Ticks,
    apply_factors,
    decide,
)

PARAMS = "TestAutoscalingConfigParameters"
CUSTOM = "TestCustomPolicyWithDefaultParameters"


def cfg(**kw: Any) -> AutoscalingConfig:
    return AutoscalingConfig(**({"max_replicas": 10} | kw))


class Policy:
    """Serve's controller for one deployment: the target and the two delay clocks."""

    def __init__(self, config: AutoscalingConfig, target: int) -> None:
        self.config, self.target = config, target
        self.above: float | None = None
        self.below: float | None = None

    def __call__(self, total: float, running: int, now: float = 0.0) -> int:
        self.target, self.above, self.below = decide(
            self.config,
            total=total,
            running=running,
            target=self.target,
            above=self.above,
            below=self.below,
            now=now,
        )
        return self.target


class Clock:
    """Serve's tests' fake clock: each call is one control-loop period (0.1 s) later."""

    def __init__(self) -> None:
        self.ticks, self.k = Ticks.every(0.1), 0

    def __call__(self) -> float:
        self.k += 1
        return self.ticks.at(self.k - 1)


# ---- ported from Serve's unit tests -------------------------------------------------------------


def test_scaling_factor_scale_up_from_0_replicas() -> None:
    """Serve: TestReplicaQueueLengthPolicy::test_scaling_factor_scale_up_from_0_replicas.
    One request and nothing running: ceil(1 · factor) at once, then Serve's bounds."""
    assert Policy(cfg(min_replicas=0, max_replicas=20, upscaling_factor=10), 0)(1, 0) == 10
    assert Policy(cfg(min_replicas=0, max_replicas=2, upscaling_factor=10), 0)(1, 0) == 2
    assert Policy(cfg(min_replicas=0, max_replicas=2, upscaling_factor=0.5), 0)(1, 0) == 1


def test_scaling_factor_scale_down_to_0_replicas() -> None:
    """Serve: TestReplicaQueueLengthPolicy::test_scaling_factor_scale_down_to_0_replicas."""
    fast = cfg(min_replicas=0, max_replicas=5, downscaling_factor=10, downscale_delay_s=0)
    p = Policy(fast, 5)
    assert p(0, 5) == 1  # down to zero first stops at one
    assert p(0, 1) == 0
    slow = fast.model_copy(update={"downscaling_factor": 0.2})
    p, n = Policy(slow, 5), 5
    trail = [n := p(0, n) for _ in range(5)]
    assert trail == [4, 3, 2, 1, 0]  # a factor that rounds back still removes one


def _upscale_downscale_flow(p: Policy, overload: float, start: int, up_to: int) -> None:
    """Serve's `_run_upscale_downscale_flow`: the delays, their resets and scale-to-zero, one
    call per control-loop period, each with the target equal to the running count."""
    c, now = p.config, Clock()
    up = round(c.upscale_delay_s * 10)
    down = round(c.downscale_delay_s * 10)
    zero = round((c.downscale_to_zero_delay_s or c.downscale_delay_s) * 10)

    def calls(n: int, total: float, running: int, expect: int) -> None:
        for i in range(n):
            p.target = running
            assert p(total, running, now()) == expect, i

    calls(up, overload, start, start)
    calls(1, overload, start, up_to)
    calls(down, 0, up_to, up_to)
    calls(1, 0, up_to, 1)
    calls(zero, 0, 1, 1)
    calls(1, 0, 1, 0)
    calls(up // 2, overload, 1, 1)  # some upscale decisions, then one the other way
    calls(1, 0, 1, 1)
    calls(up, overload, 1, 1)  # the clock restarted
    calls(1, overload, 1, up_to)
    calls(down // 2, 0, up_to, up_to)
    calls(1, overload, up_to, up_to)
    calls(down, 0, up_to, up_to)
    calls(1, 0, up_to, 1)
    calls(zero // 2, 0, 1, 1)
    calls(1, overload, 1, 1)
    calls(zero, 0, 1, 1)
    calls(1, 0, 1, 0)


@pytest.mark.parametrize("to_zero", [None, 300.0])
def test_upscale_downscale_delay(to_zero: float | None) -> None:
    """Serve: TestReplicaQueueLengthPolicy::test_upscale_downscale_delay[None|300]."""
    c = cfg(
        min_replicas=0,
        max_replicas=2,
        target_ongoing_requests=1,
        upscale_delay_s=30,
        downscale_delay_s=600,
        downscale_to_zero_delay_s=to_zero,
    )
    p = Policy(c, 0)
    assert p(1, 0) == 1  # a request and no replica: one at once
    _upscale_downscale_flow(p, overload=2, start=1, up_to=2)


def test_replicas_delayed_startup() -> None:
    """Serve: TestReplicaQueueLengthPolicy::test_replicas_delayed_startup."""
    c = cfg(max_replicas=200, upscale_delay_s=0, downscale_delay_s=100000,
            target_ongoing_requests=1)  # fmt: skip
    p = Policy(c, 1)
    assert p(100, 1) == 100
    assert p(100, 1) == 100  # none of the 99 started yet
    assert p(123, 3) == 123
    assert p(10, 4) == 123  # the load fell, but the downscale delay holds


@pytest.mark.parametrize("delay", [30.0, 0.0])
def test_fluctuating_ongoing_requests(delay: float) -> None:
    """Serve: TestReplicaQueueLengthPolicy::test_fluctuating_ongoing_requests. The load swings
    between 100 on one replica and 40 on two (target 50): with a delay nothing moves."""
    c = cfg(upscale_delay_s=delay, downscale_delay_s=delay, target_ongoing_requests=50)
    now = Clock()
    for trial in range(1000):
        if trial % 2 == 0:
            assert Policy(c, 1)(100, 1, now()) == (1 if delay else 2)
        else:
            assert Policy(c, 2)(40, 2, now()) == (2 if delay else 1)
    p = Policy(c, 1)  # and with the clocks carried from call to call, as our backends do
    for trial in range(1000):
        p.target = before = 1 if trial % 2 == 0 else 2
        got = p(100 if before == 1 else 40, before, now())
        assert got == (before if delay else 3 - before)


@pytest.mark.parametrize("ongoing", [20, 100, 10])
def test_single_replica_receives_all_requests(ongoing: int) -> None:
    """Serve: TestReplicaQueueLengthPolicy::test_single_replica_receives_all_requests."""
    c = cfg(max_replicas=50, target_ongoing_requests=5, upscale_delay_s=0, downscale_delay_s=0)
    assert Policy(c, 4)(ongoing, 4) == ongoing / 5


@pytest.mark.parametrize(
    "desired,running,up,down,expected,source",
    [
        (20, 10, 0.5, None, 15, f"{PARAMS}::test_apply_scaling_factors_upscale"),
        (5, 20, None, 0.5, 13, f"{PARAMS}::test_apply_scaling_factors_downscale"),
        (9, 10, None, 0.5, 9, f"{PARAMS}::test_apply_scaling_factors_stuck_downscale"),
        (3, 1, 0.5, None, 2, f"{CUSTOM}::test_apply_scaling_factors"),
        (3, 1, 1.0, None, 3, f"{CUSTOM}::test_apply_scaling_factors"),
        (0, 3, None, 0.5, 2, f"{CUSTOM}::test_apply_scaling_factors"),
        (8, 5, 0.5, None, 7, "the issue's ramp 5 → 7 → 8"),
        (8, 7, 0.5, None, 8, "the issue's ramp 5 → 7 → 8"),
    ],
)
def test_apply_scaling_factors(
    desired: int, running: int, up: float | None, down: float | None, expected: int, source: str
) -> None:
    """Serve: the scaling-factor tables named in `source`."""
    c = cfg(max_replicas=30, upscaling_factor=up, downscaling_factor=down)
    assert apply_factors(desired, running, c) == expected


def test_upscaling_factor_ramps_as_replicas_start() -> None:
    """upscaling_factor 0.5 and 8 wanted: 5 → 7, held while the two start, then → 8."""
    p = Policy(cfg(target_ongoing_requests=1, upscaling_factor=0.5, upscale_delay_s=0), 5)
    assert p(8, 5) == 7
    assert p(8, 5) == 7  # Serve moves from the running count, not from the target
    assert p(8, 7) == 8


def test_upscale_delay_respected_with_slow_loop_steps() -> None:
    """Serve: TestAutoscalingConfigParameters::test_upscale_delay_respected_with_slow_loop_steps.
    The delay is wall-clock time: 0.6 s per decision still scales up after 100 s."""
    p = Policy(cfg(upscale_delay_s=100), 1)
    ticks, k = Ticks.every(0.6), 0
    while p(10, 1, ticks.at(k)) == 1:
        k += 1
    assert 100 <= ticks.at(k) <= 100.6


def test_apply_delay_logic_upscale() -> None:
    """Serve: TestAutoscalingConfigParameters::test_apply_delay_logic_upscale."""
    p = Policy(cfg(upscale_delay_s=0.3, target_ongoing_requests=1), 1)
    for dt in (0.0, 0.05, 0.1):
        assert p(5, 1, 1000 + dt) == 1
    assert p(5, 1, 1000.31) == 5


def test_apply_delay_logic_downscale() -> None:
    """Serve: TestAutoscalingConfigParameters::test_apply_delay_logic_downscale."""
    c = cfg(min_replicas=0, downscale_to_zero_delay_s=0.4, downscale_delay_s=0.3)
    p = Policy(c, 4)
    for dt in (0.0, 0.05, 0.1):
        assert p(0, 4, 1000 + dt) == 4
    assert p(0, 4, 1000.31) == 1
    for dt in (0.0, 0.1, 0.2):
        assert p(0, 1, 1000.5 + dt) == 1
    assert p(0, 1, 1000.91) == 0


@pytest.mark.parametrize("factor", [0.5, 1.0, 1.5, 2.0, 10.0])
def test_no_runaway_scaling_during_warmup(factor: float) -> None:
    """Serve: TestWarmupScalingFeedbackLoop::test_no_runaway_scaling_during_warmup. While no
    replica runs and nothing comes in, the target holds, whatever the factor."""
    c = cfg(min_replicas=2, target_ongoing_requests=0.2, upscaling_factor=factor,
            upscale_delay_s=5, downscale_delay_s=30)  # fmt: skip
    p, now = Policy(c, 2), Clock()
    assert all(p(0, 0, now()) == 2 for _ in range(100))


def test_holds_the_target_until_a_replica_runs() -> None:
    """Serve waits for a running replica before it sizes by load: 40 requests on a target of
    4 still starting stay at 4; once one runs, 40 / 2 = 20 (after the delay)."""
    p = Policy(cfg(max_replicas=30, upscale_delay_s=10), 4)
    assert [p(40, 0, t) for t in (0, 5, 15, 30)] == [4, 4, 4, 4]
    assert p(40, 1, 31) == 4 and p(40, 1, 41) == 20


# ---- the same decisions as Serve's own function, on random sequences ----------------------------


@st.composite
def configs(draw: st.DrawFn) -> AutoscalingConfig:
    lo = draw(st.integers(0, 3))
    factor = st.none() | st.sampled_from([0.2, 0.5, 1.0, 1.5, 3.0])
    delay = st.sampled_from([0.0, 0.3, 1.0, 2.5])
    return AutoscalingConfig(
        min_replicas=lo,
        max_replicas=draw(st.integers(max(1, lo), 12)),
        target_ongoing_requests=draw(st.sampled_from([0.2, 0.7, 1.0, 2.0, 3.0])),
        upscaling_factor=draw(factor),
        downscaling_factor=draw(factor),
        upscale_delay_s=draw(delay),
        downscale_delay_s=draw(delay),
        downscale_to_zero_delay_s=draw(st.none() | delay),
    )


def _serve() -> Any:
    """Serve's default policy as its controller wraps it, and its `apply_bounds`."""
    import ray.serve.autoscaling_policy as sap
    from ray.serve.config import AutoscalingConfig as ServeConfig
    from ray.serve.config import AutoscalingContext

    policy = sap._apply_autoscaling_config(sap.replica_queue_length_autoscaling_policy)

    def serve(c: AutoscalingConfig, target: int, total: float, running: int, state: dict) -> Any:
        sc = ServeConfig(**c.to_serve())
        ctx = AutoscalingContext(
            deployment_id=None, deployment_name="d", app_name="a",
            current_num_replicas=running, target_num_replicas=target, running_replicas=[],
            total_num_requests=total, total_queued_requests=0, aggregated_metrics=None,
            raw_metrics=None, capacity_adjusted_min_replicas=sc.min_replicas,
            capacity_adjusted_max_replicas=sc.max_replicas, policy_state=state,
            last_scale_up_time=None, last_scale_down_time=None, current_time=None,
            config=sc,
        )  # fmt: skip
        n, state = policy(ctx)
        return max(sc.min_replicas, min(sc.max_replicas, n)), state  # apply_bounds

    return serve


@given(
    c=configs(),
    start=st.integers(0, 12),
    steps=st.lists(
        st.tuples(
            st.sampled_from([0.1, 0.2, 0.5, 1.0]),  # seconds to the next decision
            st.sampled_from([0.0, 0.3, 1.0, 2.0, 4.5, 7.0, 13.0, 40.0]),  # ongoing requests
            st.integers(0, 3) | st.integers(0, 12),  # replicas running
        ),
        min_size=1,
        max_size=40,
    ),
)
def test_same_decisions_as_serve(
    c: AutoscalingConfig, start: int, steps: list[tuple[float, float, int]]
) -> None:
    """Serve: `_apply_autoscaling_config(replica_queue_length_autoscaling_policy)` and
    `apply_bounds`, called as its controller calls them, decide as `decide` does, tick by tick."""
    clock = [1000.0]
    with patch("ray.serve.autoscaling_policy.time") as fake_time:  # as Serve's tests do
        fake_time.time = lambda: clock[0]
        serve = _serve()
        target = c.clamp(start)
        ours, state = Policy(c, target), {}
        for dt, total, running in steps:
            clock[0] += dt
            want, state = serve(c, target, total, running, state)
            assert ours(total, running, clock[0]) == want
            target = want


# ---- the metrics pipeline: what Serve's controller sees, when -----------------------------------


def run(a: Autoscaler, load: Any, start: float, end: float) -> list[tuple[float, int]]:
    """Drive `a` as a simulator would: at every tick it asks for, all replicas running."""
    out, t = [], start
    while (t := a.next_tick(t)) <= end:
        out.append((t, a.observe(t, load(t), running=a.desired)))
    return out


def test_a_load_step_is_seen_at_the_next_push() -> None:
    """Look-back 10 s: samples every 2 s, pushed at multiples of 10 s. Load 2 → 10 at 103 s,
    target 1 per replica, no upscale delay. A naive model scales to 10 at 103 s; Serve sees the
    push of 110 s, whose window [100, 110] averages (2·2 + 2·2 + 10·6 + 10·0.001) / 10.001 =
    6.8 → 7, then its last value held until now lifts the mean: (68 + 10·1) / 11 = 7.09 → 8
    at 111 s, 138 / 17 = 8.1 → 9 at 117 s, and the push of 120 s carries only 10s → 10."""
    c = cfg(max_replicas=20, target_ongoing_requests=1, upscale_delay_s=0,
            look_back_period_s=10)  # fmt: skip
    trace = run(Autoscaler(c, 2), lambda t: 2.0 if t < 103 else 10.0, 89, 121)
    changes = [(t, d) for (t, d), (_, prev) in zip(trace[1:], trace, strict=False) if d != prev]
    assert changes == [(110.0, 7), (111.0, 8), (117.0, 9), (120.0, 10)]


def test_a_spike_between_two_records_is_never_seen() -> None:
    """Look-back 30 s: a sample every 6 s (…, 102, 108, …). Ten requests for 5 s, from 103 to
    108 s, as long as the upscale delay: no record reads them and the pool stays at 2."""
    c = cfg(max_replicas=20, target_ongoing_requests=1, upscale_delay_s=5)
    trace = run(Autoscaler(c, 2), lambda t: 10.0 if 103 <= t < 108 else 2.0, 59, 200)
    assert {d for _, d in trace} == {2}
    shifted = run(Autoscaler(c, 2), lambda t: 10.0 if 100 <= t < 105 else 2.0, 59, 200)
    assert max(d for _, d in shifted) > 2  # the same spike over a record instant is seen


def test_scale_from_zero_at_the_next_record() -> None:
    """Scaled to zero, a request at 50.5 s: handles push with every request while no replica
    runs, so the controller sees the first record that counts it, at 54 s (every 6 s)."""
    c = cfg(min_replicas=0, upscale_delay_s=30)
    a = Autoscaler(c, 0)
    trace = run(a, lambda t: 1.0 if t >= 50.5 else 0.0, 0, 60)
    assert next(t for t, d in trace if d > 0) == 54.0
    assert a.desired == 1


def test_scale_to_zero_after_downscale_to_zero_delay() -> None:
    """min_replicas 0, look-back 20 s (a sample every 4 s, pushed every 10 s); 3 requests
    until 100 s, none after. The push of 110 s still holds two samples of 3 in its window
    [90, 110]: (3·4 + 3·4) / 18 = 1.33 → 2 < 3 starts the downscale clock; 60 s later, at 170 s,
    the pool goes to 1 (never to 0 from more than one), the next decision starts the to-zero
    clock and 30 s later, at 201 s, the pool is at 0."""
    c = cfg(min_replicas=0, target_ongoing_requests=1, look_back_period_s=20,
            upscale_delay_s=0, downscale_delay_s=60, downscale_to_zero_delay_s=30)  # fmt: skip
    trace = run(Autoscaler(c, 3), lambda t: 3.0 if t < 100 else 0.0, 59, 400)
    changes = [(t, d) for (t, d), (_, prev) in zip(trace[1:], trace, strict=False) if d != prev]
    assert changes == [(170.0, 1), (201.0, 0)]


def test_aggregation_max_and_min_read_the_pushed_samples() -> None:
    for agg, want in (("max", 8.0), ("min", 2.0)):
        a = Autoscaler(cfg(aggregation_function=agg, look_back_period_s=10), 1)
        for t in range(90, 111):
            a.observe(float(t), 8.0 if t == 104 else 2.0)
        assert a.total(110.0, 1) == want


@pytest.mark.parametrize("look_back", [10.0, 9.0])
def test_the_mean_is_serves_time_weighted_average(look_back: float) -> None:
    """Serve: `time_weighted_average` (metrics_utils) over the points the push of 110 s carries
    (records every 0.2 · look-back s, from 110 − look-back on), the last held until now."""
    from ray.serve._private.common import TimeStampedValue
    from ray.serve._private.metrics_utils import time_weighted_average

    c = cfg(look_back_period_s=look_back)
    load = {t: float((t * 37) % 11) for t in range(90, 112)}
    a = Autoscaler(c, 1)
    for t, v in load.items():
        a.observe(float(t), v)
    unpruned = Autoscaler.from_dict(c, {"desired": 1, "samples": list(load.items())})
    step = Fraction(look_back).limit_denominator() / 5  # 2 s, or 1.8 s: 102.6, 104.4, …, 109.8
    instants = [k * step for k in range(200) if 110 - look_back <= k * step <= 110]
    points = [TimeStampedValue(float(s), load[math.floor(s)]) for s in instants]
    for now in (110.0, 111.0, 113.5):
        last = points[-1].timestamp
        want = time_weighted_average(points, last_window_s=now - last if now > last else 1e-3)
        assert a.total(now, 1) == pytest.approx(want, rel=1e-12)
        assert unpruned.total(now, 1) == a.total(now, 1)


def test_a_second_sample_at_a_push_instant_is_the_one_pushed() -> None:
    """Two samples at the push instant (a step observed twice): the record reads the later,
    as an autoscaler rebuilt from the state does."""
    a = Autoscaler(cfg(look_back_period_s=10), 1)
    for t in range(90, 111):
        a.observe(float(t), 2.0)
    before = a.total(110.0, 1)
    a.observe(110.0, 50.0)
    rebuilt = Autoscaler.from_dict(a.config, a.to_dict())
    assert a.total(110.5, 1) == rebuilt.total(110.5, 1) > before


def test_samples_stay_bounded() -> None:
    a = Autoscaler(cfg(interval_s=0.1, look_back_period_s=30), 1)
    run(a, lambda t: 2.0, 0, 1000)
    # a push window (30 s) plus the time since the last push (< 10 s) of 0.1-s samples
    assert len(a._samples) <= (30 + 10) * 10 + 2


# ---- exact time ---------------------------------------------------------------------------------


def test_ticks_are_exact_where_adding_drifts() -> None:
    added, t = [], 0.0
    for _ in range(10):
        t += 0.1
        added.append(t)
    assert added[-1] == 0.9999999999999999  # what `yield env.timeout(0.1)` ten times reaches
    ticks = Ticks.every(0.1)
    assert [ticks.at(k) for k in (3, 10, 36000)] == [0.3, 1.0, 3600.0]
    assert all(ticks.at(k) == k / 10 for k in range(100000))
    assert ticks.after(0.9999999999999999) == 1.0 and ticks.after(1.0) == 1.1
    assert ticks.at_or_before(0.30000000000000004) == 0.3


def test_a_delay_that_elapses_as_a_hair_less_still_counts() -> None:
    """Serve's `_DELAY_ELAPSED_EPS_S`: from tick 0.4 to tick 0.7, 0.29999999999999993 s pass
    in floats; a 0.3 s delay is over at 0.7 s all the same."""
    assert 0.7 - 0.4 < 0.3
    p = Policy(cfg(upscale_delay_s=0.3, target_ongoing_requests=1), 1)
    assert p(5, 1, 0.4) == 1
    assert p(5, 1, 0.7) == 5


def test_a_decision_lands_on_its_tick() -> None:
    """interval_s 0.1 and a 1 s upscale delay: load from 0 s (first seen at the push of 0 s,
    at the first tick), so the upscale is due at exactly 1.0 s, not one tick later."""
    c = cfg(interval_s=0.1, upscale_delay_s=1.0, look_back_period_s=10, metrics_interval_s=0.1)
    a = Autoscaler(c, 1)
    trace = run(a, lambda t: 8.0, -0.1, 2.0)
    assert next(t for t, d in trace if d > 1) == 1.0


# ---- configuration, Serve's dict and serialisation ----------------------------------------------


def test_min_above_max_and_initial_outside_are_rejected() -> None:
    with pytest.raises(
        ValidationError, match=r"min_replicas \(5\) must not exceed max_replicas \(2\)"
    ):
        cfg(min_replicas=5, max_replicas=2)
    with pytest.raises(ValidationError, match=r"max_replicas \(1, Serve's default\)"):
        AutoscalingConfig(min_replicas=2)
    with pytest.raises(ValidationError, match="initial_replicas"):
        cfg(min_replicas=2, max_replicas=4, initial_replicas=5)
    with pytest.raises(ValidationError, match="policy"):
        AutoscalingConfig.model_validate({"policy": {"policy_function": "x:y"}})


def test_initial_replicas() -> None:
    c = cfg(min_replicas=1, max_replicas=8, initial_replicas=3)
    assert Autoscaler.start(c, 6).desired == 3
    assert Autoscaler.start(cfg(min_replicas=2, max_replicas=8), 12).desired == 8


FULL = {
    "min_replicas": 0,
    "initial_replicas": 2,
    "max_replicas": 8,
    "target_ongoing_requests": 1.5,
    "metrics_interval_s": 5.0,
    "look_back_period_s": 20.0,
    "upscaling_factor": 0.5,
    "downscaling_factor": 0.25,
    "upscale_delay_s": 5.0,
    "downscale_delay_s": 120.0,
    "downscale_to_zero_delay_s": 300.0,
    "aggregation_function": "max",
}


def test_the_block_is_serves_autoscaling_config() -> None:
    from ray.serve.config import AutoscalingConfig as ServeConfig

    ours = AutoscalingConfig.model_validate(FULL | {"interval_s": 0.5})
    assert ours.to_serve() == FULL  # one to one; interval_s is ours alone
    theirs = ServeConfig(**ours.to_serve())
    for name, value in FULL.items():
        assert getattr(theirs, name) == value, name
    assert ours.to_serve(initial_replicas=5)["initial_replicas"] == 5  # hand back at 5
    assert ours.to_serve(initial_replicas=50)["initial_replicas"] == 8  # within the bounds
    # every field a Serve user sets, less the deprecated smoothing factors and custom policy
    deprecated = {"smoothing_factor", "upscale_smoothing_factor", "downscale_smoothing_factor"}
    assert set(ServeConfig.model_fields) - deprecated - {"policy"} == set(FULL)
    # and the defaults are Serve's
    defaults = AutoscalingConfig().to_serve()
    assert all(getattr(ServeConfig(), k) == v for k, v in defaults.items())


def test_scenario_and_deploy_files_take_the_whole_block() -> None:
    from executor.deploy_file import DeploySpec
    from rollout.scenario import Scenario

    spec = {"name": "chat", "version": "v1", "replicas": 2, "autoscaling": FULL,
            "model": {"import_path": "examples.llm.app:build"}}  # fmt: skip
    deployed = DeploySpec.model_validate(spec).autoscaling
    assert deployed is not None and deployed.to_serve() == FULL
    block = FULL | {"min_replicas": 1}
    scenario = {
        "name": "s",
        "trace": {"synthetic": {"process": "poisson", "rate_per_s": 1.0, "duration_s": 10}},
        "fleet": {"replicas": 2, "gpu_capacity": 8},
        "autoscaling": block,
    }
    simulated = Scenario.model_validate(scenario).autoscaling
    assert simulated is not None and simulated.to_serve() == block
    # a simulated rollout cannot start from an empty pool yet: one clear line, not a crash
    with pytest.raises(ValidationError, match=r"min_replicas 0 .* is not simulated yet"):
        Scenario.model_validate(scenario | {"autoscaling": FULL})


def test_state_round_trips_and_decides_on_as_if_never_stopped() -> None:
    c = cfg(target_ongoing_requests=1, upscale_delay_s=3, downscale_delay_s=7,
            look_back_period_s=10)  # fmt: skip
    twin, a, t = Autoscaler(c, 2), Autoscaler(c, 2), 0.0
    for i in range(120):
        t = twin.next_tick(t)
        load = float((i * 7) % 11)
        running = max(0, twin.desired - i % 3)
        want = twin.observe(t, load, running)
        a = Autoscaler.from_dict(c, json.loads(json.dumps(a.to_dict())))  # as recorded
        assert a.observe(t, load, running) == want
    assert set(a.to_dict()) == {"desired", "samples", "above", "below"}  # the executor's keys


def test_ticks_remembered_interval_answers_as_the_exact_search() -> None:
    """`Ticks` answers from the interval it was last asked about; in any order of questions
    (the same, the next, an earlier or a far one) the answer is the exact search's."""
    rng = random.Random(7)
    for step in (0.1, 0.6, 1.0, 6.0, 10.0, 1 / 3):
        ticks, t = Ticks.every(step), 0.0
        for _ in range(3000):
            move = rng.random()
            if move < 0.5:
                t = ticks.after(t)  # chained, as a backend asks
            elif move < 0.7:
                t = ticks.at(rng.randrange(-5, 5000)) + rng.choice((0.0, -1e-9, 1e-9))
            else:
                t += rng.uniform(-3 * step, 3 * step)
            k = ticks._search(t)
            assert ticks.index_at_or_before(t) == k
            assert ticks.at_or_before(t) == ticks.at(k)
            assert ticks.after(t) == ticks.at(k + 1)
