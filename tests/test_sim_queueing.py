"""Queueing oracles: with one request per replica, Poisson arrivals and a fixed fleet, the
simulator is an M/M/c (or M/D/1) queue and must reproduce the exact mean waiting time.

Tolerances follow the sampling error of a mean wait (docs/simulator.md, Validation): at
ρ = 0.8 about 1M requests bring the mean within ±2 % (95 %); M/D/1 at ρ = 0.9 converges
slower, so it gets 2M requests.
"""

import math

import numpy as np
import pytest

from rollout.scenario import Scenario
from sim.api import simulate


def erlang_c_wait(c: int, lam: float, mu: float) -> float:
    """Mean wait in queue of M/M/c: Erlang B by recursion, then C = B / (1 − ρ + ρB)."""
    a = lam / mu
    b = 1.0
    for k in range(1, c + 1):
        b = a * b / (k + a * b)
    rho = a / c
    erlang_c = b / (1 - rho + rho * b)
    return erlang_c / (c * mu - lam)


def queue(*, servers: int, lam: float, service: dict, requests: int, seed: int) -> Scenario:
    return Scenario.model_validate(
        {
            "name": "queue",
            "seed": seed,
            "trace": {
                "synthetic": {"process": "poisson", "rate_per_s": lam, "duration_s": requests / lam}
            },
            "service": service,
            "fleet": {
                "replicas": servers,
                "gpu_capacity": servers,
                "max_ongoing_requests": 1,
                "request_timeout_s": 1e9,
            },
        }
    )


def waits(scenarios: list[Scenario]) -> np.ndarray:
    out = []
    for s in scenarios:
        result = simulate(s)
        assert result.summary["dropped"] == 0
        assert result.summary["outcome"] == "none"
        out.append(result.requests["wait_s"].to_numpy())
    return np.concatenate(out)


def test_erlang_c_formula_matches_the_table():
    # Erlang C by hand: M/M/10 λ=8 → 0.20459; M/M/2 λ=1.5 → 1.28571 (= 9/7)
    assert erlang_c_wait(10, 8.0, 1.0) == pytest.approx(0.20459, abs=5e-5)
    assert erlang_c_wait(2, 1.5, 1.0) == pytest.approx(9 / 7, rel=1e-9)


def test_mmc_matches_erlang_c():
    """c = 10, λ = 8, μ = 1: Wq = 0.2046, within 3 % over 1M requests from 4 seeds."""
    runs = [
        queue(
            servers=10,
            lam=8.0,
            service={"kind": "exponential", "mean_s": 1.0},
            requests=250_000,
            seed=seed,
        )
        for seed in (11, 12, 13, 14)
    ]
    w = waits(runs)
    assert len(w) > 990_000
    assert w.mean() == pytest.approx(erlang_c_wait(10, 8.0, 1.0), rel=0.03)
    # the probability of waiting at all is Erlang C itself: 0.40918
    assert (w > 0).mean() == pytest.approx(0.40918, rel=0.02)


def test_md1_matches_pollaczek_khinchine():
    """M/D/1 at ρ = 0.9: Wq = ρD / (2(1 − ρ)) = 4.5, within 3 %."""
    runs = [
        queue(
            servers=1,
            lam=0.9,
            service={"kind": "deterministic", "mean_s": 1.0},
            requests=1_000_000,
            seed=seed,
        )
        for seed in (21, 22)
    ]
    w = waits(runs)
    assert len(w) > 1_990_000
    assert w.mean() == pytest.approx(0.9 * 1.0 / (2 * (1 - 0.9)), rel=0.03)
    assert (w > 0).mean() == pytest.approx(0.9, rel=0.01)  # a single server: P(wait) = ρ


def test_utilisation_and_fifo_hold():
    """Cheap invariants on one run: utilisation = λE[S]/c, FIFO service, no early start."""
    s = queue(
        servers=4,
        lam=3.0,
        service={"kind": "exponential", "mean_s": 1.0},
        requests=100_000,
        seed=5,
    )
    req = simulate(s).requests
    span = req["end_s"].max()
    busy = (req["end_s"] - req["start_s"]).sum() / (4 * span)
    assert busy == pytest.approx(0.75, rel=0.02)
    # service never starts before arrival, and FIFO: start times follow arrival order
    assert (req["wait_s"] >= 0).all()
    assert np.all(np.diff(req["start_s"].to_numpy()) >= 0)
    assert not math.isnan(req["latency_s"].iloc[-1])
