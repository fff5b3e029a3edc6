"""A capacity-planning sweep at scale: 1,000 simulations of a day of traffic, on a local process
pool and on a local Ray cluster, with the same number of workers.

The grid is 2 modes × 5 percentages × 4 stabilization times × 5 rollout start times (spread over
the day) × 5 seeds = 1,000 simulations. The trace is a day-long synthetic diurnal trace (peak in
the afternoon, trough at night), written to a CSV file the scenario names, so the sweep reads it
once and ships it to its workers like a user's trace; it is scaled down to a mean of
`--rate` requests/s (86,400 requests a day at 1/s) against 8 replicas of the bundled
Llama-3.1-8B / H100 engine profile, so the whole benchmark fits a 2-core machine in minutes.

For each backend it prints simulations per second, the per-simulation overhead (wall time ×
workers, minus the time inside the simulations, per simulation: start-up, shipping, scheduling,
the idle tail) and the peak resident memory of each worker process (`ru_maxrss`, which counts
the pages of shipped inputs a Ray worker maps from the object store), then Ray's figures as
ratios of the pool's, measured in the same run. Both backends must give identical rows. The
report and plots of the sweep go to `--out` (default `out/sweep-scale`).

    .venv/bin/python benchmarks/sweep_scale.py [--workers 2] [--rate 1.0] [--seeds 5]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from rollout.scenario import Scenario, SyntheticTrace, TokenCounts, load_scenario
from rollout.traces import synthesize
from sim.inputs import Inputs
from sim.sweep import SweepPoint, SweepResult, run_sweep, simulate_point, write_sweep

ROOT = Path(__file__).resolve().parents[1]
DAY_S = 86_400.0
WORKER_COLUMNS = ["worker_pid", "worker_peak_rss_mb"]


def write_day_trace(path: Path, rate: float) -> int:
    """A day of diurnal arrivals with lognormal prompt and output lengths, as a trace CSV."""
    spec = SyntheticTrace(
        process="diurnal",
        rate_per_s=rate,
        duration_s=DAY_S,
        amplitude=0.6,
        period_s=DAY_S,
        context_tokens=TokenCounts(kind="lognormal", p50=800, p99=6000),
        generated_tokens=TokenCounts(kind="lognormal", p50=150, p99=900),
    )
    trace = synthesize(spec, seed=2024)
    frame = pd.DataFrame(
        {
            "arrival_s": np.round(trace.arrival_s, 3),
            "ContextTokens": trace.context_tokens,
            "GeneratedTokens": trace.generated_tokens,
        }
    )
    frame.to_csv(path, index=False)
    return len(frame)


def write_scenario(folder: Path, rate: float, seeds: int) -> Path:
    """The scenario next to its trace, naming it (and the bundled files) by relative path."""
    write_day_trace(folder / "day.csv", rate)
    data = os.path.relpath(ROOT / "data", folder)
    scenario = {
        "name": "day-scale",
        "seed": 100,
        "trace": {"path": "day.csv"},
        "service": {
            "kind": "engine",
            "engine": {"profile": f"{data}/engines/llama-3.1-8b-h100-vllm.yaml", "max_num_seqs": 8},
        },
        "fleet": {
            "replicas": 8,
            "gpu_capacity": 12,
            "max_ongoing_requests": 8,
            "request_timeout_s": 60,
        },
        "cold_start": {
            "kind": "empirical",
            "path": f"{data}/cold_start/alibaba_basemodel_load_percentiles.csv",
            "scale": 5,
        },
        "rollout": {
            "at_s": 7200,
            "policy": {"max_surge_percent": 25, "progress_deadline_seconds": 3600},
        },
        "sweep": {
            "max_surge_percent": [10, 20, 25, 34, 50],
            "max_unavailable_percent": [10, 20, 25, 34, 50],
            "stabilization_time_seconds": [0, 60, 300, 900],
            "rollout_at_s": [7200, 25200, 43200, 54000, 72000],  # 2:00, 7:00, 12:00, 15:00, 20:00
            "seeds": seeds,
        },
        "slo": {"latency_p99_s": 15.0, "ttft_p99_s": 2.0},
    }
    path = folder / "day-scale.yaml"
    path.write_text(yaml.safe_dump(scenario, sort_keys=False))
    return path


def measured_point(scenario: Scenario, point: SweepPoint, inputs: Inputs) -> dict[str, Any]:
    """The real simulation plus which process ran it and that process's peak memory so far."""
    metrics = simulate_point(scenario, point, inputs)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return metrics | {"worker_pid": os.getpid(), "worker_peak_rss_mb": peak_mb}


def figures(result: SweepResult, workers: int) -> dict[str, float]:
    n = len(result.points)
    busy = sum(result.point_seconds)
    per_worker = result.rows.groupby("worker_pid")["worker_peak_rss_mb"].max()
    return {
        "sims_per_s": n / result.wall_s,
        "sim_ms": busy / n * 1000,
        "overhead_ms": (result.wall_s * workers - busy) / n * 1000,
        "peak_mb_max": float(per_worker.max()),
        "peak_mb_mean": float(per_worker.mean()),
        "processes": float(len(per_worker)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="pool processes = Ray CPUs")
    parser.add_argument("--rate", type=float, default=1.0, help="mean requests/s of the day")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("out/sweep-scale"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        scenario = load_scenario(write_scenario(Path(tmp), args.rate, args.seeds))
        requests = len(pd.read_csv(Path(tmp) / "day.csv"))
        pool = run_sweep(scenario, workers=args.workers, point_fn=measured_point)

        import ray

        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
        try:
            remote = run_sweep(scenario, ray_address="auto", point_fn=measured_point)
        finally:
            ray.shutdown()
    pd.testing.assert_frame_equal(  # the same numbers, or no benchmark
        pool.rows.drop(columns=WORKER_COLUMNS), remote.rows.drop(columns=WORKER_COLUMNS)
    )
    assert pool.complete and remote.complete, pool.failures + remote.failures

    n = len(pool.points)
    print(
        f"{n} simulations ({len(pool.policies)} policies × {args.seeds} seeds × "
        f"{remote.rows['rollout_at_s'].nunique()} rollout times), a day of traffic each: "
        f"{requests:,} trace requests resampled per seed; {args.workers} workers; "
        f"machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}"
    )
    print(f"inputs shipped: {pool.inputs.nbytes / 1e6:.1f} MB (trace and cold-start samples)")
    rows = [("pool", figures(pool, args.workers)), ("ray", figures(remote, args.workers))]
    for name, f in rows:
        print(
            f"{name:4}: {f['sims_per_s']:6.2f} simulations/s, {f['sim_ms']:6.0f} ms simulating "
            f"and {f['overhead_ms']:6.1f} ms overhead per simulation; peak memory per worker "
            f"{f['peak_mb_max']:.0f} MB (mean {f['peak_mb_mean']:.0f} MB over "
            f"{f['processes']:.0f} processes)"
        )
    p, r = rows[0][1], rows[1][1]
    print(
        f"ray / pool: throughput {r['sims_per_s'] / p['sims_per_s']:.2f}×, overhead per "
        f"simulation {r['overhead_ms'] / p['overhead_ms']:.2f}×, peak memory per worker "
        f"{r['peak_mb_max'] / p['peak_mb_max']:.2f}×"
    )
    t0 = time.perf_counter()
    write_sweep(remote, args.out)
    print(f"report: {args.out / 'report.md'} (written in {time.perf_counter() - t0:.1f} s)")
    print(remote.recommendation.message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
