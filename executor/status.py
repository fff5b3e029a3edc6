"""Reading a rollout back from the store, from any process: its status and its history.

Nothing here imports Ray: `rollout status` and `rollout history` only read the database (DBOS's
recorded step outputs and the published status event) through a `DBOSClient`.
"""

from __future__ import annotations

import json
import time
from typing import Any

from dbos import DBOSClient

from executor import store
from rollout import history as h

HISTORY_STEPS = ("begin_step", "iterate_step", "finish_step")
CONTROL_TOPIC = "control"  # DBOS message topic the workflow receives controls on
STATUS_KEY = "status"  # DBOS event the workflow publishes its status under
ACTIVE = ("PENDING", "ENQUEUED")
RESUMABLE = (*ACTIVE, "ERROR")  # ERROR: the workflow raised; `rollout recover` resumes it
TERMINAL = ("succeeded", "cancelled", "failed")


def client(url: str) -> DBOSClient:
    return DBOSClient(system_database_url=url, serializer=store.dbos_serializer())


def read_history(db: DBOSClient, rollout_id: str, offset: int = 0) -> tuple[list[h.Event], int]:
    """Events recorded from step `offset` on, and the offset to read from next time."""
    events: list[h.Event] = []
    for s in db.list_workflow_steps(rollout_id, offset=offset):
        if s.get("completed_at_epoch_ms") is None and s["output"] is None and not s["error"]:
            break  # still running: read it next time
        offset += 1
        if s["function_name"].rsplit(".", 1)[-1] in HISTORY_STEPS and s["output"]:
            out = json.loads(s["output"])
            events.extend(h.EVENT.validate_python(e) for e in out.get("events", []))
    return events, offset


def workflow_state(db: DBOSClient, rollout_id: str) -> tuple[str | None, str | None]:
    """DBOS's status of the rollout's workflow and the executor that last ran it."""
    try:
        st = db.retrieve_workflow(rollout_id).get_status()
    except Exception:  # not started yet
        return None, None
    return st.status, st.executor_id


def read_status(db: DBOSClient, rec: store.Record, lease: store.Lease) -> dict[str, Any]:
    """The status object of `rollout status --json`."""
    raw = db.get_event(rec.id, STATUS_KEY, timeout_seconds=0)
    status: dict[str, Any] = json.loads(raw) if raw else {}
    wf, executor = workflow_state(db, rec.id)
    status.setdefault("id", rec.id)
    status.setdefault("app", rec.app)
    status.setdefault("from_version", rec.from_version)
    status.setdefault("to_version", rec.to_version)
    status.setdefault("state", "pending")
    status.setdefault("step", 0)
    status.setdefault("candidate_weight", 0.0)
    status.setdefault("replicas", {})
    if rec.outcome and status["state"] not in TERMINAL:
        status["state"] = rec.outcome  # e.g. taken down by `rollout down`
    elif wf == "CANCELLED" and status["state"] not in TERMINAL:
        status["state"] = "cancelled"
    status["controller"] = {
        "workflow": wf,
        "executor": executor,
        "holder": lease.holder,
        "pid": lease.info.get("pid"),
        "host": lease.info.get("host"),
        "folder": lease.info.get("folder"),
        "lease_until": lease.until,
        "running": lease.live and wf in (*ACTIVE, None),
        "held_by": lease.describe() if lease.holder else None,
    }
    status["created_at"] = rec.created_at
    return status


def _clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) + f".{int(t * 1000) % 1000:03d}"


def format_event(e: h.Event) -> str:
    fields = e.model_dump(exclude={"t", "kind"})
    parts = []
    for k, v in fields.items():
        if isinstance(v, float):
            v = f"{v:.4g}"
        elif isinstance(v, dict):
            v = _fields(v)
        parts.append(f"{k}={v}")
    return f"{_clock(e.t)}  {e.kind:<16} " + "  ".join(parts)


def _fields(d: dict[str, Any]) -> str:
    """`a=1,b=2` for a policy; unset (None) fields left out, a nested one (the guard) braced."""
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out.append(f"{k}={{{_fields(v)}}}")
        elif isinstance(v, int | float) and not isinstance(v, bool):
            out.append(f"{k}={v:g}")
        elif v is not None:
            out.append(f"{k}={v}")
    return ",".join(out)


def _live_lines(live: dict[str, Any] | None) -> list[str]:
    """What the cluster runs now (only `rollout status NAME` asks the cluster)."""
    if live is None:
        return []
    if "error" in live:
        return [f"  live: unknown ({live['error']})"]
    if not live:
        return ["  live: no version of this model runs on the cluster"]
    out = []
    for version, n in live.items():
        by = (
            f"Serve's autoscaling, {n['min_replicas']}–{n['max_replicas']}"
            if n["scaled_by"] == "serve"
            else "a fixed count (a rollout's controller, or no autoscaling)"
        )
        out.append(f"  live {version}: {n['running']} running, target {n['target']} (by {by})")
    return out


def format_status(s: dict[str, Any]) -> str:
    frm = s.get("from_version") or "nothing"
    lines = [
        f"rollout {s['id']}: {s['state']}",
        f"  {s['app']}: {frm} → {s['to_version']}  ({s.get('kind', 'rollout')}, "
        f"policy {s.get('policy', '?')})",
        f"  step {s['step']} of {s.get('steps', '?')}, stage {s.get('stage', '?')}, "
        f"weight on {s['to_version']} {s['candidate_weight']:.2f}",
    ]
    if "session_weight" in s:
        lines.append(f"  sticky sessions: {s['session_weight']:.2f} of them on {s['to_version']}")
    what = {"requests": "of the window's requests", "sessions": "of the active sessions"}
    for version, share in s.get("split", {}).items():
        got = ", ".join(f"{share[k]:.0%} {what[k]}" for k in what if k in share)
        lines.append(f"  {version}: {got}")
    for version, n in s.get("replicas", {}).items():
        counts = ", ".join(f"{k} {v}" for k, v in n.items())
        lines.append(f"  {version}: {counts}")
    lines.extend(_live_lines(s.get("live")))
    if s.get("waiting") and s["state"] not in TERMINAL:
        lines.append(f"  waiting: {s['waiting']}")
    ctl = s.get("controller", {})
    if s["state"] not in TERMINAL:
        if ctl.get("running"):
            lines.append(f"  controller: running ({ctl['held_by']})")
        else:
            was = f" (was {ctl['held_by']})" if ctl.get("held_by") else ""
            lines.append(
                f"  controller: not running{was}; `rollout recover DEPLOY.yaml` resumes it"
            )
    return "\n".join(lines)
