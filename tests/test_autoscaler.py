import pytest
from pydantic import ValidationError

from rollout.autoscaler import Autoscaler, AutoscalingConfig


def cfg(**kw):
    base = dict(
        min_replicas=1,
        max_replicas=10,
        target_ongoing_requests=2.0,
        upscale_delay_s=30,
        downscale_delay_s=600,
        look_back_period_s=30,
    )
    return AutoscalingConfig(**(base | kw))


def feed(a, start, end, load, step=1.0):
    t, out = start, []
    while t <= end:
        out.append((t, a.observe(t, load)))
        t += step
    return out


def test_scales_up_only_after_the_upscale_delay():
    a = Autoscaler(cfg(), desired=2)
    trace = feed(a, 0, 60, load=12.0)  # wants ceil(12 / 2) = 6
    first_up = next(t for t, d in trace if d > 2)
    assert first_up == 30.0
    assert trace[-1][1] == 6


def test_scales_down_only_after_the_downscale_delay_and_respects_min():
    a = Autoscaler(cfg(min_replicas=2), desired=6)
    trace = feed(a, 0, 700, load=0.0, step=10.0)
    assert next(t for t, d in trace if d < 6) == 600.0
    assert trace[-1][1] == 2


def test_clamped_to_max_replicas_and_averaged_over_the_window():
    a = Autoscaler(cfg(upscale_delay_s=0, look_back_period_s=10), desired=1)
    a.observe(0.0, 100.0)
    assert a.desired == 10  # 50 requested, capped at 10
    b = Autoscaler(cfg(upscale_delay_s=0, look_back_period_s=10), desired=1)
    for t in range(10):
        b.observe(float(t), 0.0)
    b.observe(10.0, 22.0)  # mean over the 11 samples in the window = 2 → 1 replica
    assert b.desired == 1


def test_a_dip_resets_the_upscale_clock():
    a = Autoscaler(cfg(look_back_period_s=1), desired=1)
    feed(a, 0, 20, load=10.0)
    feed(a, 21, 22, load=0.0)  # back at the current size: the clock restarts
    assert a.desired == 1
    trace = feed(a, 23, 60, load=10.0)
    assert next(t for t, d in trace if d > 1) == 53.0


def test_min_above_max_is_rejected():
    with pytest.raises(ValidationError, match="min_replicas"):
        cfg(min_replicas=5, max_replicas=2)
