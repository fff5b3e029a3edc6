"""Simulator throughput: the full model against a naive SimPy M/M/c, same arrivals, one run.

Full model: 1,000,000 Poisson arrivals with lognormal token counts, the engine service kind
(the bundled Llama-3.1-8B / H100 profile: continuous batching, prefill stalls), 24 replicas,
autoscaling between 20 and 40, one surge rollout with lognormal cold starts, power-of-two-choices
routing, every request recorded. Measured twice: `simulate()` in this process, and
`rollout simulate` end to end as a command (a fresh process: start-up, the simulation, and
every output written: Parquet files, events, plots). Naive model: the textbook SimPy way, one
process per request queueing for a `simpy.Resource` with 48 slots, same arrival times,
exponential service with a mean of 1 s (an M/M/48 at ρ ≈ 0.83). Prints requests per second for
each and the ratios (required: at least 4 for the model, 3 end to end).

    .venv/bin/python benchmarks/sim_throughput.py [--requests N]
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Generator
from pathlib import Path

import numpy as np
import simpy
import yaml

from rollout.scenario import load_scenario
from rollout.traces import load_trace
from sim.api import simulate

ROOT = Path(__file__).resolve().parent.parent
PROFILE = ROOT / "data" / "engines" / "llama-3.1-8b-h100-vllm.yaml"
REPLICAS = 24
SLOTS = 2  # naive model: servers = REPLICAS × SLOTS
RATE = 40.0  # requests/s


def scenario(requests: int) -> dict:
    duration = requests / RATE
    return {
        "name": "throughput",
        "seed": 1,
        "trace": {
            "synthetic": {
                "process": "poisson",
                "rate_per_s": RATE,
                "duration_s": duration,
                "context_tokens": {"kind": "lognormal", "p50": 1020, "p99": 4142},
                "generated_tokens": {"kind": "lognormal", "p50": 129, "p99": 601},
            }
        },
        "service": {"kind": "engine", "engine": {"profile": str(PROFILE)}},
        "fleet": {
            "replicas": REPLICAS,
            "gpu_capacity": 64,
            "max_ongoing_requests": 16,
            "request_timeout_s": 30.0,
        },
        "cold_start": {"kind": "lognormal", "p50_s": 60.0, "p99_s": 180.0},
        "health_check": {"period_s": 10.0},
        "autoscaling": {
            "min_replicas": 20,
            "max_replicas": 40,
            "target_ongoing_requests": 2.5,
            "upscale_delay_s": 30.0,
            "downscale_delay_s": 300.0,
        },
        "rollout": {
            "at_s": duration / 5,
            "policy": {"max_surge_percent": 25, "stabilization_time_seconds": 60.0},
        },
    }


def run_command(scenario: dict, work: Path) -> tuple[float, dict]:
    """`rollout simulate` on the scenario as a fresh process, outputs written under `work`:
    wall time and summary."""
    path = work / f"{scenario['name']}.yaml"
    path.write_text(yaml.safe_dump(scenario))
    out = work / "out"
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "rollout.cli", "simulate", str(path), "--out", str(out)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    wall = time.perf_counter() - t0
    return wall, json.loads((out / "summary.json").read_text())


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1_000_000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sim-throughput-"))
    path = work / "throughput.yaml"
    path.write_text(yaml.safe_dump(scenario(args.requests)))
    scen = load_scenario(path)

    gc.collect()
    t0 = time.perf_counter()
    result = simulate(scen)
    full_s = time.perf_counter() - t0
    n = result.summary["requests"]
    s = result.summary
    replicas = int(result.timeline[["current_ready", "candidate_ready"]].sum(axis=1).max())
    print(f"full model:  {n:,} requests in {full_s:.2f} s = {n / full_s:,.0f} requests/s")
    print(
        f"  rollout {s['outcome']} in {s['rollout_duration_s']:.0f} s ({s['steps']} steps), "
        f"up to {replicas} ready replicas, {s['dropped']:,} dropped, "
        f"mean wait {s['wait_mean_s']:.4f} s, p99 latency {s['latency_p99_s']:.2f} s, "
        f"p99 TTFT {s['ttft_p99_s']:.3f} s"
    )
    del result
    gc.collect()

    cli_s, summary = run_command(scenario(args.requests), work)
    assert summary["requests"] == n
    files = sorted(p.name for p in (work / "out").iterdir())
    print(f"rollout simulate, end to end: {cli_s:.2f} s = {n / cli_s:,.0f} requests/s")
    print(f"  wrote {', '.join(files)}")

    trace = load_trace(scen.trace, seed=scen.seed)
    arrivals = trace.arrival_s.tolist()
    service = np.random.default_rng(0).standard_exponential(len(arrivals)).tolist()
    t0 = time.perf_counter()
    wait = naive(arrivals, service, REPLICAS * SLOTS)
    naive_s = time.perf_counter() - t0
    print(
        f"naive SimPy: {n:,} requests in {naive_s:.2f} s = {n / naive_s:,.0f} requests/s "
        f"(M/M/{REPLICAS * SLOTS}, mean wait {wait:.4f} s)"
    )
    model_ratio = naive_s / full_s
    cli_ratio = naive_s / cli_s
    print(f"ratio full model / naive: {model_ratio:.2f}x (required >= 4)")
    print(f"ratio rollout simulate end to end / naive: {cli_ratio:.2f}x (required >= 3)")
    ok = model_ratio >= 4.0 and cli_ratio >= 3.0
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
