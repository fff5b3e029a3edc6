"""Which rollout of a model is in progress on a cluster, and who runs it.

Three records answer that together: the store's index row (the rollout, its cluster and
outcome), its lease (which controller runs it, until when) and DBOS's workflow status (whether
the workflow still runs). `deploy`, `recover`, `status`, the controls and `down` all ask here,
and only here is an index row closed because its workflow ended.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dbos import DBOSClient

from executor import status, store
from executor.deploy_file import DeploySpec
from rollout.controller import Control
from rollout.errors import InputError

NOT_RUNNING = "its controller is not running: the control waits until `rollout recover`"


@dataclass(frozen=True)
class Tracked:
    """One recorded rollout as it stands now."""

    store: store.Store
    db: DBOSClient
    rec: store.Record
    workflow: str | None  # DBOS's status; None until the controller started the workflow
    lease: store.Lease

    @property
    def id(self) -> str:
        return self.rec.id

    @property
    def in_progress(self) -> bool:
        return self.rec.outcome is None and self.workflow in (*status.RESUMABLE, None)

    @property
    def running(self) -> bool:
        """A controller holds a live lease on it."""
        return self.in_progress and self.lease.live and self.workflow != "ERROR"

    def status(self) -> dict[str, Any]:
        return status.read_status(self.db, self.rec, self.lease)

    def send(self, ctl: Control) -> str:
        """Send one durable control (a DBOS message the workflow receives); returns the line
        to tell the operator. A rollout that has ended is bad input."""
        verb = ctl.value.replace("_", "-")
        if not self.in_progress:
            raise InputError(
                f"rollout {self.id} has already ended ({self.rec.outcome}); cannot {verb}"
            )
        msg = {"control": ctl.value, "sent_at": time.time()}
        self.db.send(self.id, msg, topic=status.CONTROL_TOPIC)
        return f"{verb} sent to rollout {self.id}"


def open_store(spec: DeploySpec, path: Path) -> tuple[store.Store, DBOSClient]:
    """The deploy file's store (created if new), remembered for `status ID`."""
    url = spec.store or store.default_url()
    st = store.Store(url)
    store.remember(url, path)
    return st, status.client(url)


def track(st: store.Store, db: DBOSClient, rec: store.Record) -> Tracked:
    """The rollout now; an index row whose workflow has ended gets its outcome recorded. A
    workflow that raised (DBOS's ERROR) has not ended: `rollout recover` resumes it."""
    wf, _ = status.workflow_state(db, rec.id)
    got = Tracked(st, db, rec, wf, st.lease(rec.id))
    if rec.outcome is None and wf is not None and wf not in status.RESUMABLE:
        outcome = {"CANCELLED": "cancelled", "SUCCESS": None}.get(wf, "failed")
        if outcome is None:
            state = got.status()["state"]
            outcome = state if state in status.TERMINAL else "succeeded"
        st.finish(rec.id, outcome)
        got = replace(got, rec=st.get(rec.id) or rec)
    return got


def in_progress(
    st: store.Store, db: DBOSClient, app: str, cluster: str | None = None
) -> list[Tracked]:
    """The model's rollouts in progress (on `cluster`, when given), oldest first."""
    found = []
    for rec in st.active(app):
        if cluster is not None and rec.cluster not in (None, cluster):
            continue  # another cluster's rollout of this model
        got = track(st, db, rec)
        if got.in_progress:
            found.append(got)
    return found


def find(rollout_id: str) -> Tracked:
    """Any recorded rollout by id, from whichever known store holds it."""
    st, rec = store.find(rollout_id)
    return track(st, status.client(st.url), rec)


def find_model(name: str) -> Tracked | None:
    """A model's most recent rollout (by the model's name), or None."""
    got = store.find_latest(name)
    if got is None:
        return None
    st, rec = got
    return track(st, status.client(st.url), rec)
