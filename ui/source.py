"""Everything the dashboard reads or sends, in one place: the adapter between `ui/` and the
executor's store, and the simulator's output folders.

The rest of `ui/` sees plain dicts and never imports `executor`: when the executor's store,
status or control functions change, this file is the one to adapt.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import sqlalchemy as sa

from rollout import controller as c
from rollout.errors import InputError

RUN_FILES = ("summary.json", "timeline.parquet", "events.jsonl")


class NotFound(InputError):
    """An unknown rollout id or run: the page answers 404."""


# ---- rollouts in the store ------------------------------------------------------------------


class Store:
    """The executor's stores (every one `rollout status ID` would search), opened once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stores: dict[str, Any] = {}
        self._clients: dict[str, Any] = {}

    def _open(self) -> list[tuple[Any, Any]]:
        from executor import status, store

        with self._lock:
            for url in store.known_urls():
                if url in self._stores:
                    continue
                try:
                    self._stores[url] = store.Store(url, create=False)
                except (FileNotFoundError, sa.exc.SQLAlchemyError):
                    continue
                self._clients[url] = status.client(url)
            return [(self._stores[u], self._clients[u]) for u in self._stores]

    def _locate(self, rollout_id: str) -> tuple[Any, Any, Any]:
        for st, db in self._open():
            rec = st.get(rollout_id)
            if rec is not None:
                return st, db, rec
        raise NotFound(f"unknown rollout id '{rollout_id}'")

    def list_rollouts(self) -> list[dict[str, Any]]:
        """Every indexed rollout: id, app, versions, created/finished times and outcome."""
        from executor import store

        rows: list[dict[str, Any]] = []
        for st, _ in self._open():
            try:
                with st.engine.connect() as conn:
                    got = conn.execute(sa.select(store.INDEX)).all()
            except sa.exc.SQLAlchemyError:  # a store without the index table yet
                continue
            rows.extend({k: v for k, v in r._mapping.items() if k != "plan"} for r in got)
        return rows

    def status(self, rollout_id: str) -> dict[str, Any]:
        """`rollout status ID --json`, plus `gpus_per_replica` per version (from the plan)."""
        from executor import rollouts

        st, db, rec = self._locate(rollout_id)
        got = rollouts.track(st, db, rec).status()
        got["gpus_per_replica"] = _gpus_per_replica(rec.plan)
        got["finished_at"] = rec.finished_at
        return got

    def read_steps(
        self, rollout_id: str, offset: int = 0
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
        """The statuses and history events recorded by the workflow's steps from `offset` on,
        and the offset to read from next time (a step still running is read next time)."""
        from executor import status

        _, db, _ = self._locate(rollout_id)
        statuses: list[dict[str, Any]] = []
        events: list[dict[str, Any]] = []
        for s in db.list_workflow_steps(rollout_id, offset=offset):
            if s.get("completed_at_epoch_ms") is None and s["output"] is None and not s["error"]:
                break
            offset += 1
            if s["function_name"].rsplit(".", 1)[-1] in status.HISTORY_STEPS and s["output"]:
                out = json.loads(s["output"])
                events.extend(out.get("events", []))
                if out.get("status"):
                    statuses.append(out["status"])
        return statuses, events, offset

    def send_control(self, rollout_id: str, control: str) -> str:
        """The same durable control as `rollout pause|resume|... ID`, with the CLI's messages;
        a rollout that has ended raises InputError with the CLI's line."""
        from executor import rollouts

        try:
            ctl = c.Control(control)
        except ValueError:
            raise InputError(f"unknown control '{control}'") from None
        tracked = rollouts.track(*self._locate(rollout_id))
        message = tracked.send(ctl)
        if not tracked.running:
            message += "; " + rollouts.NOT_RUNNING
        return message

    def close(self) -> None:
        with self._lock:
            for st in self._stores.values():
                st.dispose()
            self._stores.clear()
            self._clients.clear()


def _gpus_per_replica(plan_json: str) -> dict[str, float]:
    """GPUs one replica of each version holds, from the versions' Serve configs in the plan."""
    plan = json.loads(plan_json)
    out: dict[str, float] = {}
    for key, version in (("current_app", "from_version"), ("candidate_app", "to_version")):
        app, name = plan.get(key), plan.get(version)
        if app and name:
            options = app["deployments"][0].get("ray_actor_options") or {}
            out[name] = float(options.get("num_gpus") or 0)
    return out


# ---- simulated runs in output folders -------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """A folder `rollout simulate` wrote; `key` names it in URLs without exposing paths."""

    key: str
    path: Path
    name: str


def find_runs(folders: list[Path], max_depth: int = 4) -> dict[str, Run]:
    """Folders holding a simulated run's files, under each given folder (at most `max_depth`
    levels down), keyed by a short hash of their path."""
    runs: dict[str, Run] = {}
    cwd = Path.cwd().resolve()
    for root in folders:
        root = root.resolve()
        if not root.is_dir():
            continue
        for summary in sorted(root.rglob("summary.json")):
            folder = summary.parent
            depth = len(folder.relative_to(root).parts)
            if depth > max_depth or not all((folder / f).exists() for f in RUN_FILES):
                continue
            key = hashlib.sha1(str(folder).encode()).hexdigest()[:12]
            base = cwd if folder.is_relative_to(cwd) else root.parent
            name = str(folder.relative_to(base))
            runs[key] = Run(key, folder, name)
    return runs


@dataclass(frozen=True)
class RunData:
    summary: dict[str, Any]
    timeline: pd.DataFrame
    events: list[dict[str, Any]]
    requests: pd.DataFrame | None


def read_run(run: Run) -> RunData:
    """A run's summary, timeline, events and (when written) its requests."""
    summary = json.loads((run.path / "summary.json").read_text())
    timeline = pd.read_parquet(run.path / "timeline.parquet")
    lines = (run.path / "events.jsonl").read_text().splitlines()
    events = [json.loads(line) for line in lines if line.strip()]
    requests = None
    path = run.path / "requests.parquet"
    if path.exists():
        # `failed` (crashes, drain timeouts) is absent from runs written before faults existed
        wanted = ["arrival_s", "latency_s", "ttft_s", "version", "dropped", "failed"]
        names = set(pq.read_schema(path).names)
        requests = pd.read_parquet(path, columns=[c for c in wanted if c in names])
    return RunData(summary, timeline, events, requests)


def run_summary(run: Run) -> dict[str, Any]:
    return json.loads((run.path / "summary.json").read_text())
