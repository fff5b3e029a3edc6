"""A run's folder read back, real or simulated: the files `rollout simulate` and `rollout export`
write have the same columns, so one reader and one plotting path serve both (`rollout plot`).
Also the figures the fidelity comparison holds a prediction against a measurement with, computed
the same way for both."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rollout import history as h
from rollout.errors import InputError
from sim.result import SimResult

RUN_FILES = ("summary.json", "timeline.parquet", "events.jsonl")
WORST_WINDOW_S = 60.0


def read_result(folder: Path) -> SimResult:
    """A run folder as a `SimResult` (requests and replicas empty where not written)."""
    folder = Path(folder)
    missing = [f for f in RUN_FILES if not (folder / f).is_file()]
    if missing:
        raise InputError(f"{folder}: not a run folder (no {', '.join(missing)})")
    summary = json.loads((folder / "summary.json").read_text())
    timeline = pd.read_parquet(folder / "timeline.parquet")
    events = h.load_jsonl((folder / "events.jsonl").read_text())
    requests = _read(folder / "requests.parquet")
    replicas = _read(folder / "replicas.parquet")
    return SimResult(summary, requests, timeline, events, replicas)


def _read(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path) if path.is_file() else pd.DataFrame()


def plot_command(folder: Path) -> None:
    """`rollout plot DIR`: draw timeline.png and latency.png of a run folder again."""
    from sim.plots import plot_latency, plot_timeline

    result = read_result(folder)
    policy = result.summary.get("policy")
    scenario = str(result.summary.get("scenario", ""))
    title = f"{scenario}: {policy}" if policy else scenario
    plot_timeline(result, Path(folder) / "timeline.png", title=title)
    if len(result.requests):
        plot_latency(result, Path(folder) / "latency.png", title=title)
    print(f"plots in {folder}/")


def rollout_figures(result: SimResult) -> dict[str, Any]:
    """The fidelity comparison's figures beyond the summary's own: p50 latency and TTFT during
    the rollout, p99 latency and TTFT in the rollout's worst 60 s window (the highest p99 over
    60 s windows of arrivals, in steps of 10 s), and each step's duration (from the rollout's
    start or the previous step's completion to the step's completion)."""
    s = result.summary
    start, end = s.get("rollout_start_s"), s.get("rollout_end_s")
    out: dict[str, Any] = {}
    steps = [e.t for e in result.events if isinstance(e, h.StepCompleted)]
    if start is not None:
        prev = float(start)
        for i, t in enumerate(steps, 1):
            out[f"step_duration_s_{i}"] = t - prev
            prev = t
    req = result.requests
    keys = ("latency_p50_rollout_s", "ttft_p50_rollout_s", "latency_p99_worst60s_s",
            "ttft_p99_worst60s_s")  # fmt: skip
    out |= dict.fromkeys(keys)
    if start is None or not len(req):
        return out
    stop = float(end if end is not None else s.get("span_s") or req["arrival_s"].max())
    arrival = req["arrival_s"].to_numpy(dtype=float)
    inside = (arrival >= start) & (arrival <= stop)
    for name in ("latency", "ttft"):
        values = req[f"{name}_s"].to_numpy(dtype=float)
        during = values[inside & ~np.isnan(values)]
        out[f"{name}_p50_rollout_s"] = float(np.percentile(during, 50)) if len(during) else None
        out[f"{name}_p99_worst60s_s"] = _worst_p99(arrival, values, float(start), stop)
    return out


def _worst_p99(arrival: np.ndarray, values: np.ndarray, start: float, stop: float) -> float | None:
    """The highest p99 over 60 s windows of arrivals inside [start, stop] (a shorter rollout
    is one window), windows starting every 10 s."""
    worst = None
    begins = np.arange(start, max(start, stop - WORST_WINDOW_S) + 1e-9, 10.0)
    for b in begins:
        e = min(b + WORST_WINDOW_S, stop)
        chunk = values[(arrival >= b) & (arrival <= e)]
        chunk = chunk[~np.isnan(chunk)]
        if len(chunk):
            p = float(np.percentile(chunk, 99))
            worst = p if worst is None else max(worst, p)
    return worst
