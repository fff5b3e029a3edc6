"""`rollout export ID --out DIR`: a real rollout written as `rollout simulate` writes a simulated
one, so the simulator's plots, the dashboard and the fidelity comparison read either.

What the controller observed comes from the store (executor/recording.py: replica lifecycles
and per-version counts at every change; executor/status.py: the history). With `--requests`
(a `rollout load` output) the requests it measured are added and the summary gains its latency
and TTFT figures.

Time 0 is the replay's start (`started_at` in the load's summary.json) when requests are given,
else the rollout's start; before the first observation the fleet is taken to be as first seen.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from executor import status, store
from executor.plan import Plan
from measure.runs import rollout_figures
from rollout import history as h
from rollout.errors import InputError
from sim.api import write_outputs
from sim.result import TIMELINE_COLUMNS, Billing, RolloutOutcome, SimResult, summarize

VERSIONS = ["current", "candidate"]  # the simulator's categories, in its order
REJECTED = (429, 503)
# what an interrupted replay leaves unmeasured: requests never sent, and those it cut off
UNMEASURED = (
    "not sent",
    "interrupted before the answer ended",
)  # Serve's backpressure answers: the simulator's "dropped"


def export_command(rollout_id: str, out: Path, requests: Path | None = None) -> SimResult:
    st, rec = store.find(rollout_id)
    try:
        events, _ = status.read_history(status.client(st.url), rollout_id)
        observed = st.observations(rollout_id)
        replica_events = st.replica_events(rollout_id)
    finally:
        st.dispose()
    if not observed:
        raise InputError(
            f"rollout {rollout_id} has no recorded observations (a rollout run by an older "
            "version of rollout's controller, which did not record them)"
        )
    plan = Plan.model_validate_json(rec.plan)
    started = next((e.t for e in events if isinstance(e, h.RolloutStarted)), observed[0]["t"])
    ended = next((e.t for e in events if isinstance(e, h.Finished)), None)
    if requests is None:
        t0, req = started, _no_requests()
    else:
        frame, t0 = _read_requests(requests, plan)
        req = requests_frame(frame, {plan.from_version: "current", plan.to_version: "candidate"})
        _check_overlap(req, requests, started - t0, (ended or observed[-1]["t"]) - t0)
    timeline = _timeline(observed, t0)
    span = max(float(timeline["t_s"].iloc[-1]), float(req["end_s"].max()) if len(req) else 0.0)
    outcome = RolloutOutcome(
        start=started - t0,
        end=None if ended is None else ended - t0,
        outcome=rec.outcome or "progressing",
        steps=max([e.step for e in events if isinstance(e, h.StepCompleted)], default=0),
        policy=plan.spec.rollout_policy().label(),
    )
    billing = Billing(
        mode="held", gpu_hour_usd=2.5, reserved_gpus=int(timeline["gpus_in_use"].max())
    )
    summary = summarize(
        req, timeline, outcome, end_s=span, billing=billing, seed=0, scenario=rec.app
    )
    summary |= {"rollout_id": rollout_id, "measured": True, "started_at": t0}
    shifted = [e.model_copy(update={"t": e.t - t0}) for e in events]
    result = SimResult(summary, req, timeline, shifted, replicas_frame(replica_events, t0, events))
    result.summary |= rollout_figures(result)
    write_outputs(result, out, title=f"{rec.app} {rec.from_version} → {rec.to_version} (measured)")
    print(f"exported rollout {rollout_id} to {out}/")
    return result


def _read_requests(path: Path, plan: Plan) -> tuple[pd.DataFrame, float]:
    """A `rollout load` output's requests and its start (Unix time, from its summary.json)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no such requests file: {path}")
    meta = path.parent / "summary.json"
    try:
        started_at = float(json.loads(meta.read_text())["started_at"])
        frame = pd.read_parquet(path)
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(
            f"{path}: not a `rollout load` output (needs requests.parquet and summary.json with "
            "started_at beside it)"
        ) from None
    need = {"arrival_s", "start_s", "end_s", "latency_s", "ttft_s", "version", "dropped"}
    if not need <= set(frame.columns):
        raise InputError(f"{path}: lacks the columns {', '.join(sorted(need - set(frame)))}")
    known = {plan.from_version, plan.to_version}
    other = sorted(set(frame["version"].dropna().astype(str)) - known)
    if other:
        raise InputError(
            f"{path}: answered by version {', '.join(other)}, not by this rollout's "
            f"({plan.from_version or 'nothing'} → {plan.to_version})"
        )
    return frame, started_at


def requests_frame(frame: pd.DataFrame, names: dict[str | None, str]) -> pd.DataFrame:
    """The load's rows in the simulator's columns (`names`: version → current or candidate),
    in arrival order: answered ones have their
    latency and TTFT; a 429/503 is dropped (Serve's backpressure), any other failure failed;
    what an interrupted replay did not measure (requests never sent or cut off) is left out."""
    error = frame["error"].fillna("") if "error" in frame else pd.Series("", index=frame.index)
    frame = frame[~error.isin(UNMEASURED)].sort_values("arrival_s", kind="stable")
    lost = frame["dropped"].to_numpy(dtype=bool)
    status_ = pd.to_numeric(frame.get("status"), errors="coerce").to_numpy(dtype=float)
    rejected = lost & np.isin(status_, REJECTED)
    version = frame["version"].astype("object").map(lambda v: names.get(v))
    return pd.DataFrame(
        {
            "arrival_s": frame["arrival_s"].to_numpy(dtype=float),
            "start_s": frame["start_s"].to_numpy(dtype=float),
            "end_s": frame["end_s"].to_numpy(dtype=float),
            "wait_s": np.nan,  # the server's queueing is not visible from outside
            "latency_s": np.where(lost, np.nan, frame["latency_s"].to_numpy(dtype=float)),
            "ttft_s": np.where(lost, np.nan, frame["ttft_s"].to_numpy(dtype=float)),
            "version": pd.Categorical(version, categories=VERSIONS),
            "dropped": rejected,
            "failed": lost & ~rejected,
            "context_tokens": frame["context_tokens"].to_numpy()
            if "context_tokens" in frame
            else 0,
            "generated_tokens": frame["generated_tokens"].to_numpy()
            if "generated_tokens" in frame
            else 0,
        }
    ).reset_index(drop=True)


def _no_requests() -> pd.DataFrame:
    cols = {c: pd.Series(dtype=float) for c in ("arrival_s", "start_s", "end_s", "wait_s",
                                                 "latency_s", "ttft_s")}  # fmt: skip
    return pd.DataFrame(
        cols
        | {
            "version": pd.Categorical([], categories=VERSIONS),
            "dropped": pd.Series(dtype=bool),
            "failed": pd.Series(dtype=bool),
        }
    )


def _check_overlap(req: pd.DataFrame, path: Path | None, start: float, end: float) -> None:
    """Requests from another time than the rollout's are bad input."""
    if not len(req):
        raise InputError(f"{path}: has no request that was sent")
    first, last = float(req["arrival_s"].min()), float(np.nanmax(req["end_s"]))
    if last < start or first > end:
        raise InputError(
            f"{path}: its requests ({first:.0f} s to {last:.0f} s from its start) do not overlap "
            f"the rollout ({start:.0f} s to {end:.0f} s): a replay of another time"
        )


def _timeline(observed: list[dict[str, Any]], t0: float) -> pd.DataFrame:
    frame = pd.DataFrame(observed).drop(columns=["rollout_id"])
    frame["t_s"] = frame.pop("t") - t0
    frame["on_demand_gpus_in_use"] = 0
    frame["on_demand_nodes"] = 0
    if frame["t_s"].iloc[0] > 0:  # before the first look: as first seen
        first = frame.iloc[[0]].assign(t_s=0.0)
        frame = pd.concat([first, frame], ignore_index=True)
    frame = frame[list(TIMELINE_COLUMNS)]
    ints = [c for c in TIMELINE_COLUMNS if c not in ("t_s", "candidate_weight", "gpus_in_use")]
    return frame.astype({c: np.int32 for c in ints}).reset_index(drop=True)


def replicas_frame(
    rows: list[dict[str, Any]], t0: float, events: list[h.Event] | None = None
) -> pd.DataFrame:
    """One row per replica: the simulator's columns (`gpu_s` is when it was placed on a node)
    plus `asked_s` (the controller's scale-up that created it: the latest one of its version
    before Serve created it), `running_s` and `stopping_s`; NaN where not seen (before the
    recording began, or not yet)."""
    columns = {"created": "created_s", "placed": "gpu_s", "running": "running_s",
               "ready": "ready_s", "stopping": "stopping_s", "stopped": "stopped_s"}  # fmt: skip
    if not rows:
        frame = pd.DataFrame(columns=["app", "replica_id", "role", *columns.values()])
    else:
        seen = pd.DataFrame(rows)
        seen = seen[seen["event"].isin(list(columns))].assign(t=lambda d: d["t"] - t0)
        frame = seen.pivot_table(
            index=["app", "replica_id", "role"], columns="event", values="t", aggfunc="min"
        ).reset_index()
        frame = frame.rename(columns=columns)
        for name in columns.values():
            if name not in frame:
                frame[name] = np.nan
    asked = np.full(len(frame), np.nan)
    ups = [(e.t - t0, e.version) for e in events or [] if isinstance(e, h.Scaled)]
    for i, (role, created) in enumerate(zip(frame["role"], frame["created_s"], strict=True)):
        before = [t for t, v in ups if v == role and t <= created]
        asked[i] = max(before) if before else np.nan
    frame["asked_s"] = asked
    stopped = frame["stopped_s"].notna()
    # placed while watched, never ready, gone: a failed start (Serve stops and replaces it)
    failed = stopped & frame["ready_s"].isna() & frame["gpu_s"].notna()
    reason = np.where(failed, "start_failed", np.where(stopped, "removed", ""))
    return pd.DataFrame(
        {
            "replica_id": frame["replica_id"].astype(str),
            "version": pd.Categorical(frame["role"], categories=VERSIONS),
            "asked_s": frame["asked_s"].astype(float),
            **{name: frame[name].astype(float) for name in columns.values()},
            "stop_reason": pd.Categorical(
                reason, categories=["", "removed", "start_failed", "crashed", "drain_timeout"]
            ),
            "app": frame["app"].astype(str),
        }
    ).sort_values("created_s", kind="stable", ignore_index=True)
