"""What a simulation returns: per-request rows, the replica timeline, the rollout history and
a summary with the numbers capacity planners compare."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from rollout import history as h

TIMELINE_COLUMNS = (
    "t_s",
    "current_ready",
    "current_starting",  # includes replicas waiting for a GPU, as the controller counts them
    "current_draining",
    "candidate_ready",
    "candidate_starting",
    "candidate_draining",
    "pending_gpu",
    "gpus_in_use",
    "candidate_weight",
    "desired_replicas",
    "step",  # rollout steps completed so far (either direction)
)


@dataclass
class SimResult:
    summary: dict[str, Any]
    requests: pd.DataFrame
    timeline: pd.DataFrame
    events: list[h.Event] = field(default_factory=list)
    # one row per replica: id, version, created_s, gpu_s, ready_s, stopped_s (NaN: never)
    replicas: pd.DataFrame = field(default_factory=pd.DataFrame)


@dataclass(frozen=True)
class RolloutOutcome:
    """How the rollout went; `start` is None without a rollout, `end` None if unfinished."""

    start: float | None
    end: float | None
    outcome: str  # succeeded | cancelled | failed | none | paused/progressing (unfinished)
    steps: int
    policy: str | None


def _percentile(values: np.ndarray, q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def _mean(values: np.ndarray) -> float | None:
    return float(values.mean()) if len(values) else None


def gpu_hours(timeline: pd.DataFrame, end_s: float) -> float:
    """GPU-hours held: the step function `gpus_in_use` integrated from 0 to end_s."""
    t = timeline["t_s"].to_numpy()
    g = timeline["gpus_in_use"].to_numpy(dtype=float)
    spans = np.diff(np.append(t, max(end_s, t[-1])))
    return float((g * spans).sum() / 3600.0)


def summarize(
    requests: pd.DataFrame,
    timeline: pd.DataFrame,
    rollout: RolloutOutcome,
    *,
    end_s: float,
    gpu_hour_usd: float,
    seed: int,
    scenario: str,
) -> dict[str, Any]:
    done = requests[~requests["dropped"]]
    latency = done["latency_s"].to_numpy()
    ttft = done["ttft_s"].to_numpy()
    start, end = rollout.start, rollout.end
    if start is not None:
        stop = end if end is not None else end_s
        during = done[(done["arrival_s"] >= start) & (done["arrival_s"] <= stop)]
        window = _window(timeline, start, stop)
    else:
        during = done.iloc[:0]
        window = timeline
    ready = window["current_ready"] + window["candidate_ready"]
    hours = gpu_hours(timeline, end_s)
    n = len(requests)
    dropped = int(requests["dropped"].sum())
    return {
        "scenario": scenario,
        "policy": rollout.policy,
        "seed": seed,
        "requests": n,
        "completed": n - dropped,
        "dropped": dropped,
        "drop_rate": dropped / n if n else 0.0,
        "latency_mean_s": _mean(latency),
        "latency_p50_s": _percentile(latency, 50),
        "latency_p99_s": _percentile(latency, 99),
        "wait_mean_s": _mean(done["wait_s"].to_numpy()),
        "ttft_p50_s": _percentile(ttft, 50),
        "ttft_p99_s": _percentile(ttft, 99),
        "latency_p99_rollout_s": _percentile(during["latency_s"].to_numpy(), 99),
        "ttft_p99_rollout_s": _percentile(during["ttft_s"].to_numpy(), 99),
        "rollout_start_s": start,
        "rollout_end_s": end,
        "rollout_duration_s": None if start is None or end is None else end - start,
        "steps": rollout.steps,
        "outcome": rollout.outcome,
        "gpu_hours": hours,
        "cost_usd": hours * gpu_hour_usd,
        "peak_gpus": int(timeline["gpus_in_use"].max()),
        "min_ready_replicas": int(ready.min()),
        "span_s": end_s,
    }


def _window(timeline: pd.DataFrame, start: float, stop: float) -> pd.DataFrame:
    """Timeline rows in effect during [start, stop], including the one in effect at start."""
    t = timeline["t_s"].to_numpy()
    first = max(0, int(np.searchsorted(t, start, side="right")) - 1)
    last = int(np.searchsorted(t, stop, side="right"))
    return timeline.iloc[first:last]


def clean_json(value: Any) -> Any:
    """NaN and infinities become null; numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {k: clean_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean_json(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
