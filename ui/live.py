"""Following rollouts for the page and for `/metrics`: each rollout's samples and history,
read incrementally from the store and kept in memory, so a poll costs one small read.

Once a rollout has ended and its last steps are read it is never read again.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import sqlalchemy as sa

from executor.metrics import RolloutMetrics
from ui import series
from ui.source import Store


class Followed:
    """One rollout as read so far: samples where something changed, and every event."""

    def __init__(self, rollout_id: str) -> None:
        self.id = rollout_id
        self.offset = 0
        self.samples: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.status: dict[str, Any] = {}
        self.done = False
        self.lock = threading.Lock()


class Live:
    """Every rollout the page or `/metrics` asked about, and the metrics fed from them."""

    def __init__(self, store: Store, metrics: RolloutMetrics) -> None:
        self.store = store
        self.metrics = metrics
        self._followed: dict[str, Followed] = {}
        self._lock = threading.Lock()
        self._ended: dict[str, dict[str, Any]] = {}  # final statuses of ended rollouts

    def follow(self, rollout_id: str) -> Followed:
        """The rollout brought up to date (raises NotFound for an unknown id)."""
        with self._lock:
            f = self._followed.get(rollout_id)
            if f is None:
                f = self._followed[rollout_id] = Followed(rollout_id)
        with f.lock:
            if not f.done:
                self._refresh(f)
        return f

    def _refresh(self, f: Followed) -> None:
        status = self.store.status(f.id)  # first: an unknown id raises before anything
        statuses, events, f.offset = self.store.read_steps(f.id, f.offset)
        gpus = status.get("gpus_per_replica", {})
        for st in statuses:
            s = series.sample(st, gpus)
            if series.changed(f.samples[-1] if f.samples else None, s):
                f.samples.append(s)
        f.events.extend(events)
        self.metrics.observe(status, events)
        f.status = status
        ended = status["state"] in series.TERMINAL and not status["controller"]["running"]
        if ended and status["controller"]["workflow"] not in ("PENDING", "ENQUEUED"):
            f.done = True

    def rollouts(self) -> list[dict[str, Any]]:
        """The rollouts list: live ones first (newest first), then ended ones, newest first."""
        rows = []
        now = time.time()
        for rec in self.store.list_rollouts():
            status = self._ended.get(rec["id"])
            if status is None:
                try:
                    status = self.store.status(rec["id"])
                except sa.exc.SQLAlchemyError:  # a row another process is writing: next time
                    continue
                if rec["outcome"] and status["state"] in series.TERMINAL:
                    self._ended[rec["id"]] = status
            live = status["state"] not in series.TERMINAL
            end = now if live else (rec["finished_at"] or status.get("updated_at") or now)
            rows.append(
                {
                    "id": rec["id"],
                    "app": rec["app"],
                    "from_version": rec["from_version"],
                    "to_version": rec["to_version"],
                    "state": status["state"],
                    "step": status.get("step", 0),
                    "steps": status.get("steps"),
                    "candidate_weight": status.get("candidate_weight", 0.0),
                    "started": rec["created_at"],
                    "duration_s": max(0.0, end - rec["created_at"]),
                    "live": live,
                    "controller_running": status["controller"]["running"],
                }
            )
        rows.sort(key=lambda r: (not r["live"], -r["started"]))
        return rows

    def refresh_all(self) -> None:
        """Bring every rollout's metrics up to date (before a scrape of `/metrics`)."""
        for row in self.rollouts():
            self.follow(row["id"])
