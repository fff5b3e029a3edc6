"""What the page draws, as plain data: pure functions from statuses, events and a simulated
run's tables to chart samples, and which controls apply now.

A sample is one moment of a rollout, for a real and a simulated run alike:
`{"t", "state", "step", "weight", "gpus", "replicas": {role: {"ready", "starting", "draining"}},
"latency_p99": {role: s}, "ttft_p99": {role: s}}`, where role is `current` (the version rolled
from) or `candidate` (the version rolled to), so a prediction lays over a real run role by role.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from rollout import controller as c

STATES = ("ready", "starting", "draining")
TERMINAL = tuple(p.value for p in c.Phase if p.terminal)
CONTROLS = tuple(ctl.value for ctl in c.Control)


def roles(status: Mapping[str, Any]) -> dict[str, str]:
    """Version name → role."""
    out = {}
    if status.get("from_version"):
        out[str(status["from_version"])] = c.CURRENT
    out[str(status.get("to_version"))] = c.CANDIDATE
    return out


def sample(status: Mapping[str, Any], gpus_per_replica: Mapping[str, float]) -> dict[str, Any]:
    """One real status as a chart sample; `router` metrics give latency, where reported."""
    role_of = roles(status)
    replicas: dict[str, dict[str, int]] = {}
    gpus = 0.0
    for version, n in (status.get("replicas") or {}).items():
        role = role_of.get(version)
        if role is None or "ready" not in n:  # before the first observation: targets only
            continue
        replicas[role] = {s: int(n.get(s, 0)) for s in STATES}
        holding = n["ready"] + n.get("starting", 0) - n.get("pending_gpu", 0)
        gpus += (holding + n.get("draining", 0)) * gpus_per_replica.get(version, 1.0)
    out: dict[str, Any] = {
        "t": float(status.get("updated_at") or 0.0),
        "state": status.get("state"),
        "step": int(status.get("step", 0)),
        "weight": float(status.get("candidate_weight", 0.0)),
        "replicas": replicas,
    }
    if replicas:
        out["gpus"] = gpus
    router = (status.get("router") or {}).get("versions") or {}
    for key, field in (("latency_p99", "latency_p99_s"), ("ttft_p99", "ttfb_p99_s")):
        got = {
            role_of[v]: float(m["window"][field])
            for v, m in router.items()
            if v in role_of and (m.get("window") or {}).get(field) is not None
        }
        if got:
            out[key] = got
    return out


def changed(prev: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
    """Whether a sample shows anything its predecessor did not (its time aside)."""
    if prev is None:
        return True
    return any(prev.get(k) != v for k, v in new.items() if k != "t")


def available_controls(status: Mapping[str, Any], events: Iterable[Mapping[str, Any]]) -> dict:
    """Which buttons apply now. The controller still has the last word: a control it cannot
    apply is recorded as `control_ignored`, as from the command line."""
    off = dict.fromkeys(CONTROLS, False)
    state = status.get("state")
    if state in TERMINAL or state == "pending":
        return off
    if status.get("kind") == "first deploy":  # no steps to pause or roll forward
        return {**off, "cancel": True, "force_cancel": True}
    if status.get("stage") == "rollback":
        return off
    pause_pending = cancelled = forward = False
    for e in events:  # replay the controls to know which are still pending
        ctl, kind = e.get("control"), e.get("kind")
        if kind == "control_received" and ctl == "pause":
            pause_pending = True
        elif kind in ("control_applied", "control_ignored") and ctl in ("pause", "resume"):
            pause_pending = False  # paused now (or refused), or a pending pause taken back
        elif kind == "control_received" and ctl == "roll_forward":
            forward, pause_pending = True, False
        elif kind == "control_applied" and ctl == "cancel":
            cancelled, forward, pause_pending = True, False, False
    paused = state == "paused"
    return {
        "pause": not paused and not pause_pending and not forward,
        "resume": paused or pause_pending,
        "cancel": not cancelled,
        "force_cancel": True,
        "roll_forward": not forward,
    }


# ---- simulated runs -------------------------------------------------------------------------


def run_samples(timeline: pd.DataFrame, gpus_per_replica: float = 1.0) -> list[dict[str, Any]]:
    """The simulator's timeline (one row per change) as samples."""
    out = []
    for row in timeline.itertuples(index=False):
        replicas = {
            role: {s: int(getattr(row, f"{role}_{s}")) for s in STATES}
            for role in (c.CURRENT, c.CANDIDATE)
        }
        gpus = getattr(row, "gpus_in_use", None)
        if gpus is None:
            gpus = sum(sum(r.values()) for r in replicas.values()) * gpus_per_replica
        out.append(
            {
                "t": float(row.t_s),
                "weight": float(row.candidate_weight),
                "gpus": float(gpus),
                "replicas": replicas,
            }
        )
    return out


def latency_windows(
    requests: pd.DataFrame, window_s: float, start: float, end: float
) -> list[dict[str, Any]]:
    """p99 latency and time to first token per role over windows of arrival time, as samples
    at each window's end (what a sliding-window metric would show then). Only served requests
    count: dropped and failed ones have no latency."""
    lost = requests["dropped"].astype(bool)
    if "failed" in requests:
        lost |= requests["failed"].astype(bool)
    done = requests[~lost]
    done = done[(done["arrival_s"] >= start) & (done["arrival_s"] < end)]
    if done.empty:
        return []
    bins = np.floor((done["arrival_s"].to_numpy() - start) / window_s).astype(int)
    out = []
    for b, group in done.groupby(bins):
        s: dict[str, Any] = {
            "t": start + (int(b) + 1) * window_s,
            "latency_p99": {},
            "ttft_p99": {},
        }
        for role, g in group.groupby(group["version"].astype(str)):
            if len(g) >= 5:
                s["latency_p99"][role] = float(np.percentile(g["latency_s"], 99))
                s["ttft_p99"][role] = float(np.percentile(g["ttft_s"], 99))
        out.append(s)
    return out


def run_payload(
    summary: Mapping[str, Any],
    timeline: pd.DataFrame,
    events: list[dict[str, Any]],
    requests: pd.DataFrame | None,
) -> dict[str, Any]:
    """What the page needs of a simulated run: its samples (timeline and latency windows),
    events and summary, with `t0` the rollout's start."""
    t0 = _finite(summary.get("rollout_start_s"))
    if t0 is None:
        t0 = next((e["t"] for e in events if e.get("kind") == "rollout_started"), 0.0)
    end = float(timeline["t_s"].max()) if len(timeline) else t0
    samples = run_samples(timeline)
    if requests is not None and len(requests):
        window = min(60.0, max(5.0, (end - float(requests["arrival_s"].min())) / 200))
        samples += latency_windows(requests, window, float(requests["arrival_s"].min()), end)
        samples.sort(key=lambda s: s["t"])
    return {"t0": t0, "summary": dict(summary), "samples": samples, "events": events}


def _finite(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None
