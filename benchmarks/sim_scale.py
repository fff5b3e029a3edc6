"""Simulator scale: a day of traffic end to end, and routing cost against fleet size.

1. A day: 24 h of diurnal Poisson load averaging 100 requests/s (about 8.6M requests; the
   rate swings ±50 % over the day), the engine service kind with the bundled Llama-3.1-8B /
   H100 profile and lognormal token counts, 50 replicas to start, autoscaling between 20 and
   100, one surge rollout at 06:00. Runs `rollout simulate` as a command (a fresh process, every
   output written) and reports its wall time and peak memory (the child's maximum RSS).
   Required: under 60 s and under 1.5 GB.
2. Routing against fleet size: 10 and 1,000 replicas with one slot each
   (`max_ongoing_requests: 1`) at 97 % utilisation, the same number of requests, exponential
   service: most arrivals find both power-of-two picks full. Prints the time per request of
   each and their ratio (required: at most 2).

    .venv/bin/python benchmarks/sim_scale.py [--hours H] [--requests N]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

from sim_throughput import PROFILE, run_command  # benchmarks/ is on the path as a script's folder

from rollout.scenario import Scenario
from sim.api import simulate


def day(hours: float) -> dict:
    duration = hours * 3600.0
    return {
        "name": "day",
        "seed": 1,
        "trace": {
            "synthetic": {
                "process": "diurnal",
                "rate_per_s": 100.0,
                "amplitude": 0.5,
                "period_s": 86_400.0,
                "duration_s": duration,
                "context_tokens": {"kind": "lognormal", "p50": 1020, "p99": 4142},
                "generated_tokens": {"kind": "lognormal", "p50": 129, "p99": 601},
            }
        },
        "service": {"kind": "engine", "engine": {"profile": str(PROFILE)}},
        "fleet": {
            "replicas": 50,
            "gpu_capacity": 128,
            "max_ongoing_requests": 32,
            "request_timeout_s": 60.0,
        },
        "cold_start": {"kind": "lognormal", "p50_s": 120.0, "p99_s": 300.0},
        "autoscaling": {
            "min_replicas": 20,
            "max_replicas": 100,
            "target_ongoing_requests": 3.0,
            "upscale_delay_s": 30.0,
            "downscale_delay_s": 600.0,
        },
        "rollout": {
            "at_s": min(6 * 3600.0, duration / 4),
            "policy": {"max_surge_percent": 25, "stabilization_time_seconds": 60.0},
        },
    }


def run_day(hours: float) -> bool:
    wall, s = run_command(day(hours), Path(tempfile.mkdtemp(prefix="sim-scale-")))
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # kilobytes on Linux
    peak_mb = peak_kb / 1024 if sys.platform != "darwin" else peak_kb / 2**20
    n = s["requests"]
    print(
        f"{hours:g} h diurnal, 100 requests/s on average: {n:,} requests, rollout "
        f"{s['outcome']} ({s['steps']} steps), peak {s['peak_gpus']} GPUs, "
        f"p99 latency {s['latency_p99_s']:.2f} s, p99 TTFT {s['ttft_p99_s']:.3f} s"
    )
    print(
        f"  rollout simulate end to end: {wall:.1f} s ({n / wall:,.0f} requests/s), "
        f"peak memory {peak_mb:,.0f} MB ({peak_mb * 2**20 / n:.0f} bytes a request)"
    )
    print(f"  required: under 60 s and under 1536 MB (for the full 24 h, {hours:g} h run here)")
    return wall < 60.0 and peak_mb < 1536


def saturated(replicas: int, requests: int) -> Scenario:
    rate = 0.97 * replicas  # service 1 s on average, one slot each
    return Scenario.model_validate(
        {
            "name": f"saturated-{replicas}",
            "seed": 3,
            "trace": {
                "synthetic": {
                    "process": "poisson",
                    "rate_per_s": rate,
                    "duration_s": requests / rate,
                }
            },
            "service": {"kind": "exponential", "mean_s": 1.0},
            "fleet": {
                "replicas": replicas,
                "gpu_capacity": replicas,
                "max_ongoing_requests": 1,
                "request_timeout_s": 60.0,
            },
        }
    )


def per_request_s(replicas: int, requests: int) -> float:
    scenario = saturated(replicas, requests)
    simulate(scenario)  # warm: imports, the trace generator
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        result = simulate(scenario)
        best = min(best, time.perf_counter() - t0)
    n = result.summary["requests"]
    wait = result.summary["wait_mean_s"]
    print(
        f"{replicas:>5} replicas × 1 slot at 97 %: {n:,} requests in {best:.2f} s "
        f"({best / n * 1e6:.2f} µs a request, mean wait {wait:.2f} s)"
    )
    return best / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--requests", type=int, default=300_000)
    args = parser.parse_args()
    ok = run_day(args.hours)
    small = per_request_s(10, args.requests)
    large = per_request_s(1000, args.requests)
    ratio = large / small
    print(f"time per request, 1,000 against 10 replicas: {ratio:.2f}x (required <= 2)")
    ok = ok and ratio <= 2.0
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
