"""Simulator throughput: the full model against a naive SimPy M/M/c, same arrivals, one run.

Full model: 1,000,000 Poisson arrivals, exponential service, 24 replicas of 2 slots each,
autoscaling on, one surge rollout with cold starts, power-of-two-choices routing, every
request recorded. Naive model: the textbook SimPy way, one process per request queueing for a
`simpy.Resource` with as many slots as the full model's fleet starts with, same arrival times
and service times. Prints simulated requests per second for both, their ratio (required: at
least 2) and the full model's peak memory (required: under 1.5 GB).

    .venv/bin/python benchmarks/sim_throughput.py [--requests N]
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import time
from collections.abc import Generator

import simpy

from rollout.scenario import Scenario
from rollout.traces import load_trace
from sim.api import simulate
from sim.service import service_times

REPLICAS = 24
SLOTS = 2  # max_ongoing_requests
RATE = 40.0  # requests/s: utilisation 40 / 48 ≈ 0.83 of the starting fleet


def scenario(requests: int) -> Scenario:
    duration = requests / RATE
    return Scenario.model_validate(
        {
            "name": "throughput",
            "seed": 1,
            "trace": {
                "synthetic": {"process": "poisson", "rate_per_s": RATE, "duration_s": duration}
            },
            "service": {"kind": "exponential", "mean_s": 1.0},
            "fleet": {
                "replicas": REPLICAS,
                "gpu_capacity": 64,
                "max_ongoing_requests": SLOTS,
                "request_timeout_s": 30.0,
            },
            "cold_start": {"kind": "lognormal", "p50_s": 60.0, "p99_s": 180.0},
            "health_check": {"period_s": 10.0},
            "autoscaling": {
                "min_replicas": 20,
                "max_replicas": 40,
                "target_ongoing_requests": 1.6,
                "upscale_delay_s": 30.0,
                "downscale_delay_s": 300.0,
            },
            "rollout": {
                "at_s": duration / 5,
                "policy": {"max_surge_percent": 25, "stabilization_time_seconds": 60.0},
            },
        }
    )


def naive(arrivals: list[float], service: list[float], servers: int) -> float:
    """One SimPy process per request and a Resource; returns the mean wait."""
    env = simpy.Environment()
    slots = simpy.Resource(env, capacity=servers)
    waits = [0.0] * len(arrivals)

    def request(i: int) -> Generator[simpy.Event, object, None]:
        arrived = env.now
        with slots.request() as turn:
            yield turn
            waits[i] = env.now - arrived
            yield env.timeout(service[i])

    def source() -> Generator[simpy.Event, object, None]:
        last = 0.0
        for i, t in enumerate(arrivals):
            yield env.timeout(t - last)
            last = t
            env.process(request(i))

    env.process(source())
    env.run()
    return sum(waits) / len(waits)


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1_000_000)
    args = parser.parse_args()
    scen = scenario(args.requests)

    gc.collect()
    t0 = time.perf_counter()
    result = simulate(scen)
    full_s = time.perf_counter() - t0
    full_peak = peak_rss_mb()
    n = result.summary["requests"]
    replicas = int(result.timeline[["current_ready", "candidate_ready"]].sum(axis=1).max())
    s = result.summary
    print(f"full model:  {n:,} requests in {full_s:.2f} s = {n / full_s:,.0f} requests/s")
    print(
        f"  rollout {s['outcome']} in {s['rollout_duration_s']:.0f} s ({s['steps']} steps), "
        f"up to {replicas} ready replicas, {s['dropped']:,} dropped, "
        f"mean wait {s['wait_mean_s']:.4f} s, p99 latency {s['latency_p99_s']:.2f} s"
    )
    print(f"  peak memory (process RSS) {full_peak:,.0f} MB")
    del result
    gc.collect()

    trace = load_trace(scen.trace, seed=scen.seed)
    arrivals = trace.arrival_s.tolist()
    service = service_times(scen.service, trace, scen.seed).base
    t0 = time.perf_counter()
    wait = naive(arrivals, service, REPLICAS * SLOTS)
    naive_s = time.perf_counter() - t0
    print(
        f"naive SimPy: {n:,} requests in {naive_s:.2f} s = {n / naive_s:,.0f} requests/s "
        f"(M/M/{REPLICAS * SLOTS}, mean wait {wait:.4f} s)"
    )
    ratio = naive_s / full_s
    print(f"ratio full/naive: {ratio:.2f}x (required >= 2)")
    print(f"peak memory: {full_peak:,.0f} MB (required < 1536 MB)")
    ok = ratio >= 2.0 and full_peak < 1536
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
