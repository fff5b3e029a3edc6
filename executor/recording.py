"""What the controller observes, recorded for `rollout export`: each replica's lifecycle and the
per-version counts at every change, in the store beside the history.

The observation is built once per controller tick (executor/serve_backend.py); after the tick
`record` turns it into rows:

- **replica events**, the first time each was seen: `created` (Serve's `start_time_s` of the
  replica's actor), `placed` (Serve lists it on a node), `running` (Serve reports it RUNNING),
  `ready` (its health probe passed: what the controller counts as ready), `stopping` (STOPPING)
  and `stopped` (Serve no longer lists it). A replica already past STARTING when first seen (the
  live version's, at the rollout's start) gets `created` and `seen` (when first seen) instead:
  its other moments happened before anything watched, and a calibration must not read them as
  instant starts.
- **observations**: the simulator's timeline columns (replicas per version and state, GPUs in
  use, the weight applied, desired replicas, steps completed), one row whenever one changed.

Times are epoch seconds, precise to one tick (`ROLLOUT_TICK_S`) plus Serve's details call.
Recording is idempotent (rows already stored are kept), so a step DBOS runs again adds
nothing; a failing store write is reported on stderr once and never stops the rollout.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from executor import store
from executor.observation import RUNNING, Snapshot, deployment
from executor.plan import ROLES, Memory, Plan

REPLICA_EVENTS = ("created", "placed", "running", "ready", "stopping", "stopped")
_BEFORE = {"placed", "running", "ready"}  # of a replica first seen past STARTING: not seen
COUNTS = ("ready", "starting", "draining")


@dataclass
class Recorder:
    """One rollout's recording in one controller process: what is stored already, so that
    each tick writes only what is new (read back from the store after a restart)."""

    rollout_id: str
    seen: dict[tuple[str, str], set[str]] = field(default_factory=dict)  # (app, id) → events
    last: dict[str, Any] | None = None  # the last observation row, without `t`

    def changes(
        self,
        plan: Plan,
        mem: Memory,
        snap: Snapshot,
        counts: dict[str, dict[str, int]],
        state: dict[str, Any],
    ) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        """The new observation row (None if nothing changed) and the new replica events. Pure
        apart from updating what this recorder has seen."""
        events: list[dict[str, Any]] = []

        def add(app: str, role: str, rid: str, event: str, t: float) -> None:
            have = self.seen.setdefault((app, rid), set())
            if event not in have:
                have.add(event)
                events.append(
                    dict(rollout_id=self.rollout_id, app=app, replica_id=rid, event=event,
                         role=role, t=t)
                )  # fmt: skip

        listed: set[tuple[str, str]] = set()
        for role in ROLES:
            app = plan.app(role)
            if app is None:
                continue
            probed = set(mem.probed.get(app, []))
            for r in deployment(plan, role, snap.details).get("replicas", []):
                rid, st = r["replica_id"], str(getattr(r["state"], "value", r["state"]))
                listed.add((app, rid))
                first = (app, rid) not in self.seen
                add(app, role, rid, "created", float(r.get("start_time_s") or snap.time))
                if first and st != "STARTING":
                    add(app, role, rid, "seen", snap.time)
                    self.seen[(app, rid)] |= _BEFORE
                if r.get("node_id"):
                    add(app, role, rid, "placed", snap.time)
                if st in RUNNING:
                    add(app, role, rid, "running", snap.time)
                if rid in probed:
                    add(app, role, rid, "ready", snap.time)
                if st == "STOPPING":
                    add(app, role, rid, "stopping", snap.time)
        roles = {plan.app(role): role for role in ROLES}
        for app, rid in list(self.seen):
            if (app, rid) not in listed and app in roles:
                add(app, roles[app] or "", rid, "stopped", snap.time)
        row = self._row(counts, snap, state)
        if row == self.last:
            return None, events
        self.last = row
        return {"rollout_id": self.rollout_id, "t": snap.time, **row}, events

    @staticmethod
    def _row(
        counts: dict[str, dict[str, int]], snap: Snapshot, state: dict[str, Any]
    ) -> dict[str, Any]:
        row: dict[str, Any] = {}
        for role in ROLES:
            for name in COUNTS:
                row[f"{role}_{name}"] = int(counts.get(role, {}).get(name, 0))
        row["pending_gpu"] = sum(int(counts.get(r, {}).get("pending_gpu", 0)) for r in ROLES)
        row["gpus_in_use"] = round(max(0.0, snap.total_gpus - snap.free_gpus), 6)
        row["candidate_weight"] = float(state["candidate_weight"])
        row["desired_replicas"] = int(state["desired"])
        row["step"] = int(state["step"])
        return row

    @classmethod
    def resume(cls, st: store.Store, rollout_id: str) -> Recorder:
        """A recorder that knows what the store holds for the rollout already."""
        rec = cls(rollout_id)
        for e in st.replica_events(rollout_id):
            have = rec.seen.setdefault((e["app"], e["replica_id"]), set())
            have |= {e["event"]} | (_BEFORE if e["event"] == "seen" else set())
        rows = st.observations(rollout_id)
        if rows:
            rec.last = {k: v for k, v in rows[-1].items() if k not in ("rollout_id", "t")}
        return rec


_STORES: dict[str, store.Store] = {}
_RECORDERS: dict[str, Recorder] = {}
_WARNED: set[str] = set()


def record(
    url: str,
    plan: Plan,
    mem: Memory,
    snap: Snapshot | None,
    counts: dict[str, dict[str, int]],
    state: dict[str, Any],
) -> None:
    """Store what this tick observed (nothing if observing failed)."""
    if snap is None:
        return
    try:
        st = _STORES.get(url)
        if st is None:
            st = _STORES[url] = store.Store(url)
        rec = _RECORDERS.get(plan.id)
        if rec is None:
            rec = _RECORDERS[plan.id] = Recorder.resume(st, plan.id)
        row, events = rec.changes(plan, mem, snap, counts, state)
        if row is not None or events:
            st.record(row, events)
    except Exception as e:  # the rollout goes on; its export will lack these rows
        _RECORDERS.pop(plan.id, None)  # read back from the store next time
        if plan.id not in _WARNED:
            _WARNED.add(plan.id)
            print(f"rollout {plan.id}: could not record an observation: {e}", file=sys.stderr)
