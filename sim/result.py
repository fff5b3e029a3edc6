"""What a simulation returns: per-request rows, the replica timeline, the rollout history and
a summary with the numbers capacity planners compare."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from rollout import history as h
from rollout.scenario import FleetSpec

TIMELINE_COLUMNS = (
    "t_s",
    "current_ready",
    "current_starting",  # includes replicas waiting for a GPU, as the controller counts them
    "current_draining",
    "candidate_ready",
    "candidate_starting",
    "candidate_draining",
    "pending_gpu",
    "gpus_in_use",  # every GPU a replica holds, reserved or on demand
    "on_demand_gpus_in_use",
    "on_demand_nodes",  # on-demand nodes provisioning or up (each is billed)
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
class Billing:
    """How GPUs are paid for. `held`: reserved GPUs by the hour while a replica holds them;
    `reserved`: the whole reservation (`gpu_capacity`) for the whole span. On-demand nodes are
    paid by the node-hour from the moment they are asked for until they are handed back."""

    mode: str
    gpu_hour_usd: float
    reserved_gpus: int
    gpus_per_node: int | None = None
    node_hour_usd: float = 0.0

    @classmethod
    def of(cls, fleet: FleetSpec) -> Billing:
        return cls(
            mode=fleet.billing,
            gpu_hour_usd=fleet.gpu_hour_usd,
            reserved_gpus=fleet.gpu_capacity,
            gpus_per_node=fleet.gpus_per_node,
            node_hour_usd=fleet.on_demand.node_hour_usd if fleet.on_demand else 0.0,
        )

    def reservation(self, peak_gpus: int) -> int:
        """GPUs to reserve so that a run peaking at `peak_gpus` never waits nor buys nodes:
        whole nodes."""
        node = self.gpus_per_node
        return peak_gpus if not node else math.ceil(peak_gpus / node) * node

    def rate_usd_per_h(self, gpus: float, on_demand_gpus: float, nodes: float) -> float:
        """What an hour costs with this many GPUs held (of them on demand) and nodes bought."""
        gpu = self.reserved_gpus if self.mode == "reserved" else gpus - on_demand_gpus
        return gpu * self.gpu_hour_usd + nodes * self.node_hour_usd


@dataclass(frozen=True)
class RolloutOutcome:
    """How the rollout went; `start` is None without a rollout, `end` None if unfinished."""

    start: float | None
    end: float | None
    outcome: str  # succeeded | cancelled | failed | none | paused/progressing (unfinished)
    steps: int
    policy: str | None
    capped_at: int | None = None  # the smallest pool the GPUs' cap allowed, if it bit


def _percentiles(values: np.ndarray, *qs: float) -> list[float | None]:
    """Several percentiles of one array in one pass (one partition, not one per percentile)."""
    if not len(values):
        return [None] * len(qs)
    return [float(x) for x in np.percentile(values, qs)]


def _mean(values: np.ndarray) -> float | None:
    return float(values.mean()) if len(values) else None


def hours(timeline: pd.DataFrame, column: str, end_s: float) -> float:
    """The step function `column` integrated from 0 to end_s, in hours (GPU-hours for
    `gpus_in_use`, node-hours for `on_demand_nodes`)."""
    t = timeline["t_s"].to_numpy()
    g = timeline[column].to_numpy(dtype=float)
    spans = np.diff(np.append(t, max(end_s, t[-1])))
    return float((g * spans).sum() / 3600.0)


def gpu_hours(timeline: pd.DataFrame, end_s: float) -> float:
    """GPU-hours held: the step function `gpus_in_use` integrated from 0 to end_s."""
    return hours(timeline, "gpus_in_use", end_s)


def summarize(
    requests: pd.DataFrame,
    timeline: pd.DataFrame,
    rollout: RolloutOutcome,
    *,
    end_s: float,
    billing: Billing,
    seed: int,
    scenario: str,
) -> dict[str, Any]:
    """The run's numbers. Requests come in arrival order (the router writes them so), so a time
    window is a slice; columns are read as arrays, never copied as a frame (a day of traffic
    is millions of rows)."""
    dropped_mask = requests["dropped"].to_numpy()
    failed_mask = requests["failed"].to_numpy()
    served = ~(dropped_mask | failed_mask)
    arrival = requests["arrival_s"].to_numpy()
    latency_all = requests["latency_s"].to_numpy()  # NaN unless served
    ttft_all = requests["ttft_s"].to_numpy()
    latency = latency_all[served]
    ttft = ttft_all[served]
    start, end = rollout.start, rollout.end
    if start is not None:
        stop = end if end is not None else end_s
        lo = int(np.searchsorted(arrival, start, side="left"))
        hi = int(np.searchsorted(arrival, stop, side="right"))
        keep = served[lo:hi]
        during_latency = latency_all[lo:hi][keep]
        during_ttft = ttft_all[lo:hi][keep]
        window = _window(timeline, start, stop)
    else:
        during_latency = during_ttft = latency[:0]
        window = timeline
    ready = window["current_ready"] + window["candidate_ready"]
    held = gpu_hours(timeline, end_s)
    on_demand_gpu_h = hours(timeline, "on_demand_gpus_in_use", end_s)
    node_h = hours(timeline, "on_demand_nodes", end_s)
    if billing.mode == "reserved":
        gpu_cost = billing.reserved_gpus * max(end_s, 0.0) / 3600.0 * billing.gpu_hour_usd
    else:
        gpu_cost = (held - on_demand_gpu_h) * billing.gpu_hour_usd
    node_cost = node_h * billing.node_hour_usd
    last = timeline.iloc[-1]
    peak = int(timeline["gpus_in_use"].max())
    latency_p50, latency_p99 = _percentiles(latency, 50, 99)
    ttft_p50, ttft_p99 = _percentiles(ttft, 50, 99)
    n = len(requests)
    dropped = int(dropped_mask.sum())
    failed = int(failed_mask.sum())
    return {
        "scenario": scenario,
        "policy": rollout.policy,
        "seed": seed,
        "requests": n,
        "completed": n - dropped - failed,
        "dropped": dropped,
        "failed": failed,
        "drop_rate": dropped / n if n else 0.0,
        "failed_rate": failed / n if n else 0.0,
        "latency_mean_s": _mean(latency),
        "latency_p50_s": latency_p50,
        "latency_p99_s": latency_p99,
        "wait_mean_s": _mean(requests["wait_s"].to_numpy()[served]),
        "ttft_p50_s": ttft_p50,
        "ttft_p99_s": ttft_p99,
        "latency_p99_rollout_s": _percentiles(during_latency, 99)[0],
        "ttft_p99_rollout_s": _percentiles(during_ttft, 99)[0],
        "rollout_start_s": start,
        "rollout_end_s": end,
        "rollout_duration_s": None if start is None or end is None else end - start,
        "steps": rollout.steps,
        "outcome": rollout.outcome,
        "pool_capped_at": rollout.capped_at,
        "gpu_hours": held,
        "billing": billing.mode,
        "cost_gpu_usd": gpu_cost,
        "on_demand_node_hours": node_h,
        "cost_on_demand_usd": node_cost,
        "cost_usd": gpu_cost + node_cost,
        # what an hour costs at the end (a sweep extends shorter runs at this rate)
        "cost_rate_end_usd_h": billing.rate_usd_per_h(
            float(last["gpus_in_use"]),
            float(last["on_demand_gpus_in_use"]),
            float(last["on_demand_nodes"]),
        ),
        "peak_gpus": peak,
        "reserve_gpus": billing.reservation(peak),
        "min_ready_replicas": int(ready.min()),
        "span_s": end_s,
    }


def guard_summary(
    requests: pd.DataFrame, timeline: pd.DataFrame, events: list[h.Event], *, bad: bool
) -> dict[str, Any]:
    """The metric guard's figures: when it tripped (and the candidate's weight then), the
    blast radius and the detection time.

    `bad_requests`: for a bad release, every request the candidate handled (each was answered
    by the bad version or failed); for a good one, the candidate's failed requests. `detect_s`:
    from a bad release's first request to the guard's action (None if it never tripped)."""
    tripped = next((e.t for e in events if isinstance(e, h.GuardBreached)), None)
    version = requests["version"]  # compared by category code: no million-string array
    on_candidate = version.cat.codes.to_numpy() == version.cat.categories.get_loc("candidate")
    if not bad:
        on_candidate &= requests["dropped"].to_numpy() | requests["failed"].to_numpy()
    first = requests["arrival_s"].to_numpy()[on_candidate]
    detect = None
    if bad and tripped is not None and len(first):
        detect = tripped - float(first[0])
    weight = None
    if tripped is not None:  # the weight in effect just before the guard acted
        t = timeline["t_s"].to_numpy()
        row = max(0, int(np.searchsorted(t, tripped, side="left")) - 1)
        weight = float(timeline["candidate_weight"].iloc[row])
    return {
        "guard_tripped_s": tripped,
        "guard_tripped_weight": weight,
        "bad_requests": int(np.count_nonzero(on_candidate)),
        "detect_s": detect,
    }


MIN_STEP_REQUESTS = 100  # a step with fewer requests is too noisy to judge its split by


def split_steps(
    requests: pd.DataFrame, timeline: pd.DataFrame, start: float, stop: float
) -> pd.DataFrame:
    """Each weight the controller held during [start, stop] that split traffic (0 < w < 1):
    when, the weight, the requests that arrived meanwhile and the candidate's share of them
    (what sticky sessions move away from the weight)."""
    t = timeline["t_s"].to_numpy()
    w = timeline["candidate_weight"].to_numpy(dtype=float)
    change = np.r_[True, w[1:] != w[:-1]] if len(w) else np.zeros(0, bool)
    seg_t, seg_w = t[change], w[change]
    ends = np.r_[seg_t[1:], math.inf]
    arrival = requests["arrival_s"].to_numpy()
    on_candidate = requests["version"].cat.codes.to_numpy() == 1
    rows = []
    for t0, t1, weight in zip(seg_t, ends, seg_w, strict=True):
        lo_t, hi_t = max(t0, start), min(t1, stop)
        if not 0.0 < weight < 1.0 or hi_t <= lo_t:
            continue
        lo, hi = np.searchsorted(arrival, [lo_t, hi_t], side="left")
        if hi > lo:
            share = float(np.count_nonzero(on_candidate[lo:hi])) / (hi - lo)
            rows.append((lo_t, hi_t, float(weight), int(hi - lo), share))
    return pd.DataFrame(rows, columns=["from_s", "until_s", "weight", "requests", "share"])


def split_summary(
    requests: pd.DataFrame, timeline: pd.DataFrame, rollout: RolloutOutcome, end_s: float
) -> dict[str, Any]:
    """How far the candidate's realised share of requests strayed from its weight during the
    rollout, in percentage points: `split_lag_pp`, the request-weighted mean of weight − share
    (positive: the split lags the weight), and `split_off_pp`, the largest |weight − share| of
    a step with at least MIN_STEP_REQUESTS requests. None without a split to judge."""
    steps = pd.DataFrame()
    if rollout.start is not None:
        stop = rollout.end if rollout.end is not None else end_s
        steps = split_steps(requests, timeline, rollout.start, stop)
    if not len(steps):
        return {"split_lag_pp": None, "split_off_pp": None}
    gap = (steps["weight"] - steps["share"]) * 100.0
    lag = float((gap * steps["requests"]).sum() / steps["requests"].sum())
    judged = gap[steps["requests"] >= MIN_STEP_REQUESTS].abs()
    return {"split_lag_pp": lag, "split_off_pp": float(judged.max()) if len(judged) else None}


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
