"""The rollout as a durable DBOS workflow: each controller iteration is one recorded step.

    workflow(plan):  begin  →  loop { recv controls (the tick's sleep)  →  iterate  }  →  finish
    iterate:         controls → Driver.tick(ServeBackend) → new state, error count + events

First deploys and rollouts alike run the one controller through `rollout.driver.Driver`; the
driver's state and its count of failed iterations are carried from step to step. A failure of
the cluster is an observation (the controller waits, then fails and rolls back); an iteration
that raises anyway counts as a failed one, so the workflow always reaches its finish step.

Each step's output (the controller state, the backend's bookkeeping and the step's new history
events) is checkpointed in the store before the next begins. After a crash DBOS re-runs the
workflow, replaying recorded outputs, so it resumes at the first unrecorded step with the state
and history exactly as recorded: a step interrupted half way is re-run from its recorded input,
and since actions are absolute counts (and unchanged configs are not redeployed), re-applying
changes nothing. The history is the concatenation of recorded step outputs, so it has neither
gaps nor duplicates. Controls are durable DBOS messages (`DBOSClient.send` from any process).

Each controller process has its own DBOS executor id and holds a lease on every rollout it
runs, renewed by a heartbeat thread (executor/store.py): a rollout whose lease expired has lost
its controller, and `rollout recover` (or `rollout deploy` again), from any host or folder, takes
the lease and hands the workflow back to DBOS recovery in a live process. A controller that
cannot renew its lease in time stops at once, so two never drive one rollout.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any

from dbos import DBOS, SetWorkflowID
from pydantic import BaseModel

from executor import metrics, recording, serve_calls, store
from executor.plan import Memory, Plan
from executor.serve_backend import ServeBackend
from executor.status import ACTIVE, CONTROL_TOPIC, STATUS_KEY
from rollout import controller as c
from rollout import history as h
from rollout.driver import BackendError, Driver

APP_VERSION = "rollout-executor-1"  # fixed, so a restarted controller recovers older runs
_STORE_URL = ""  # this controller's store, with its password (the plan holds it masked)


def tick_s() -> float:
    """Seconds between observations when nothing happens (controls cut the wait short)."""
    return float(os.environ.get("ROLLOUT_TICK_S", "0.2"))


class Carry(BaseModel):
    """What one step hands the next; recorded as the step's output. `state`, `errors` and
    `error` are the driver's (rollout/driver.py), so a failing backend's count survives a
    restarted controller too."""

    state: str  # the controller's `RolloutState`, as JSON
    errors: int = 0  # consecutive failed iterations
    error: str = ""  # the last failure's message
    memory: Memory
    events: list[dict[str, Any]] = []
    status: dict[str, Any] = {}
    outcome: str | None = None
    controls: list[dict[str, Any]] = []  # received by an iteration that raised: not yet seen

    def driver(self) -> Driver:
        return Driver(c.RolloutState.from_json(self.state), [], self.errors, self.error)


# ---- steps ----------------------------------------------------------------------------------


@DBOS.step(retries_allowed=True, max_attempts=5, interval_seconds=1.0, backoff_rate=2.0)
def begin_step(plan_json: str) -> str:
    plan = Plan.model_validate_json(plan_json)
    now = time.time()
    policy = plan.spec.rollout_policy()
    desired = plan.spec.replicas if plan.first_deploy else plan.desired_start
    driver = Driver.begin(policy, desired, now, first_deploy=plan.first_deploy)
    current = 0 if plan.first_deploy else plan.desired_start
    memory = Memory(targets={c.CURRENT: current, c.CANDIDATE: 0}, weight=0.0)
    carry = Carry(state=driver.state.to_json(), memory=memory)
    carry.events = [e.model_dump(mode="json") for e in driver.history]
    carry.status = _status(plan, carry, {}, now)
    metrics.observe(carry.status, carry.events)
    return carry.model_dump_json()


# A failure of the cluster is an observation (the driver counts it); only a bug makes the step
# raise, and it is tried once more before the workflow counts it as a failed iteration too.
@DBOS.step(retries_allowed=True, max_attempts=2, interval_seconds=1.0)
def iterate_step(plan_json: str, carry_json: str, controls: list[dict[str, Any]]) -> str:
    plan = Plan.model_validate_json(plan_json)
    carry = Carry.model_validate_json(carry_json)
    driver = carry.driver()
    backend = ServeBackend(plan, carry.memory)
    now = backend.clock()
    for msg in controls:
        driver.control(c.Control(msg["control"]), now)
    driver.tick(backend)
    carry.state = driver.state.to_json()
    carry.errors, carry.error = driver.errors, driver.error
    if driver.done:
        carry.outcome = driver.state.phase.value
    carry.memory = backend.mem
    carry.events = [e.model_dump(mode="json") for e in [*driver.history, *backend.events]]
    carry.status = _status(plan, carry, backend.counts, time.time(), backend.split)
    metrics.observe(carry.status, carry.events)
    state = {"candidate_weight": backend.mem.weight, "desired": driver.state.desired,
             "step": driver.state.step}  # fmt: skip
    recording.record(
        _STORE_URL or plan.store_url, plan, backend.mem, backend.snapshot, backend.counts, state
    )
    return carry.model_dump_json()


@DBOS.step(retries_allowed=True, max_attempts=5, interval_seconds=1.0)
def finish_step(plan_json: str, outcome: str, reason: str = "") -> str:
    """Close the rollout's record. A failed first deploy leaves nothing behind (its route
    table included); `reason` is set only when the workflow gave up on its controller (a bug that
    kept every iteration from running), recorded as the rollout's `finished` event."""
    plan = Plan.model_validate_json(plan_json)
    events: list[h.Event] = []
    if reason:
        events.append(h.Finished(t=time.time(), outcome=outcome, reason=reason))
    if plan.first_deploy and outcome != c.Phase.SUCCEEDED.value:
        try:
            serve_calls.connect(plan.address)
            serve_calls.remove_apps(plan.name)
        except BackendError as e:  # the record still closes; `rollout down` removes them
            print(f"could not remove {plan.name}'s applications: {e}", file=sys.stderr)
    st = store.Store(_STORE_URL or plan.store_url)
    try:
        st.finish(plan.id, outcome)
    finally:
        st.dispose()
    return json.dumps({"events": [e.model_dump(mode="json") for e in events]})


def _status(
    plan: Plan,
    carry: Carry,
    counts: dict[str, dict[str, int]],
    now: float,
    split: dict[str, dict[str, float]] | None = None,
) -> dict:
    """What `rollout status` prints (the controller fields plus observed replica counts, and
    with sticky sessions the candidate's share of sessions and the split the router saw)."""
    rs = c.RolloutState.from_json(carry.state)
    summary = rs.summary()
    targets = {c.CURRENT: rs.current_target, c.CANDIDATE: rs.candidate_target}
    replicas: dict[str, dict[str, int]] = {}
    for role, target in targets.items():
        version = plan.version(role)
        if version:
            replicas[version] = {"target": target, **counts.get(role, {})}
    waiting = str(summary.get("waiting") or summary.get("reason") or "")
    return {
        "id": plan.id,
        "app": plan.name,
        "from_version": plan.from_version,
        "to_version": plan.to_version,
        "kind": "first deploy" if plan.first_deploy else "rollout",
        "state": rs.phase.value,
        "stage": rs.stage.value,
        "step": rs.step,
        "steps": rs.planned_steps,
        "candidate_weight": rs.candidate_weight,
        **(
            {"session_weight": rs.session_weight, "split": split or {}}
            if plan.spec.routing.sticky
            else {}
        ),
        "replicas": replicas,
        "waiting": "" if rs.phase.terminal else waiting,
        "error": carry.error,
        "policy": plan.spec.rollout_policy().label(),
        "updated_at": now,
    }


# ---- the workflow ---------------------------------------------------------------------------


def _receive() -> list[dict[str, Any]]:
    """Wait one tick for controls (durably recorded); drain any that queued up."""
    got = []
    msg = DBOS.recv(CONTROL_TOPIC, timeout_seconds=tick_s())
    while msg is not None:
        got.append(msg)
        msg = DBOS.recv(CONTROL_TOPIC, timeout_seconds=0)
    return got


def _publish(before: Carry | None, after: Carry) -> None:
    def key(carry: Carry | None) -> str:
        if carry is None:
            return ""
        return json.dumps({k: v for k, v in carry.status.items() if k != "updated_at"})

    if key(before) != key(after):
        DBOS.set_event(STATUS_KEY, json.dumps(after.status))


def _give_up_after(plan: Plan) -> int:
    """Iterations in a row that raised (a bug, not a cluster failure) before the workflow
    stops: past the controller's own limit (it rolls back there) with room for the rollback."""
    return 3 * (plan.spec.rollout_policy().max_backend_errors + 1)


@DBOS.workflow(name="rollout")
def rollout_workflow(plan_json: str) -> str:
    """Always reaches `finish_step`: an iteration that raised counts as a failed one."""
    plan = Plan.model_validate_json(plan_json)
    carry = Carry.model_validate_json(begin_step(plan_json))
    _publish(None, carry)
    reason = ""
    while carry.outcome is None:
        controls = [*carry.controls, *_receive()]
        prev = carry
        carry_in = carry.model_dump_json(exclude={"events", "status", "controls"})
        try:
            carry = Carry.model_validate_json(iterate_step(plan_json, carry_in, controls))
        except Exception as e:  # recorded by DBOS as the step's error: replays the same way
            error = f"{type(e).__name__}: {e}"[:500]
            update = {"errors": prev.errors + 1, "error": error, "controls": controls}
            carry = prev.model_copy(update=update)  # its controls go to the next iteration
            if carry.errors > _give_up_after(plan):
                reason = (
                    f"the controller could not run {carry.errors} iterations in a row "
                    f"(last: {error}); check the cluster and `rollout status`"
                )
                carry.outcome = c.Phase.FAILED.value
                carry.status = {**carry.status, "state": carry.outcome, "waiting": ""}
        _publish(prev, carry)
    events = json.loads(finish_step(plan_json, carry.outcome, reason))["events"]
    if events:
        metrics.observe(carry.status, events)
    return carry.outcome


# ---- the controller process -----------------------------------------------------------------


def dbos_config(url: str, executor_id: str) -> dict[str, Any]:
    return {
        "name": "rollout",
        "system_database_url": url,
        "executor_id": executor_id,
        "application_version": APP_VERSION,
        "log_level": "WARNING",
        "notification_listener_polling_interval_sec": 0.1,
        "serializer": store.dbos_serializer(),
    }


class ControllerProcess:
    """This process as a rollout controller: DBOS launched under its own executor id, holding
    the lease of every rollout it runs."""

    def __init__(self, url: str) -> None:
        global _STORE_URL
        self.url = _STORE_URL = url
        self.executor_id = store.new_executor_id()
        self.store = store.Store(url)
        self.held: set[str] = set()
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._renew, daemon=True, name="lease")
        self._heartbeat.start()
        DBOS(config=dbos_config(url, self.executor_id))  # type: ignore[arg-type]
        DBOS.launch()
        metrics.serve_from_env()

    def _take(self, rollout_id: str) -> bool:
        got = self.store.take_lease(
            rollout_id, self.executor_id, store.holder_info(), store.lease_s()
        )
        if got:
            self.held.add(rollout_id)
        return got

    def _renew(self) -> None:
        """Renew every held lease a few times per lease; stop the process once one is lost or
        could not be renewed before it expired (another controller may have it by then)."""
        ttl = store.lease_s()
        renewed = time.monotonic()
        while not self._stop.wait(ttl / 4):
            try:
                for rollout_id in list(self.held):
                    rec = self.store.get(rollout_id)
                    if rec is not None and rec.outcome is not None:
                        self.held.discard(rollout_id)  # ended: nothing left to guard
                    elif not self.store.renew(rollout_id, self.executor_id, ttl):
                        self._lost(f"the lease of {rollout_id} was taken over")
                renewed = time.monotonic()
            except Exception as e:  # the store is unreachable: hold on until the lease ends
                if time.monotonic() - renewed > ttl * 0.8:
                    self._lost(f"could not renew the lease for {ttl * 0.8:g} s ({e})")

    def _lost(self, why: str) -> None:
        print(f"controller {self.executor_id}: {why}; stopping", file=sys.stderr, flush=True)
        os._exit(3)

    def start(self, plan: Plan) -> None:
        if not self._take(plan.id):
            raise RuntimeError(f"rollout {plan.id} is held by another controller")
        with SetWorkflowID(plan.id):
            DBOS.start_workflow(rollout_workflow, plan.model_dump_json())

    def take_over(self, rollout_id: str, plan: Plan) -> str:
        """Resume a rollout whose controller's lease expired; says what happened."""
        status = DBOS.get_workflow_status(rollout_id)
        if status is not None and status.status not in (*ACTIVE, "ERROR"):
            return "ended"
        if not self._take(rollout_id):
            return "alive"
        if status is not None and status.status == "ERROR":
            self._reopen(rollout_id)  # a workflow that raised: resume it from its steps
        if status is None:  # its controller died before starting it
            with SetWorkflowID(plan.id):
                DBOS.start_workflow(rollout_workflow, plan.model_dump_json())
            return "started"
        if status.status in ("PENDING", "ERROR") and status.executor_id != self.executor_id:
            DBOS._recover_pending_workflows([status.executor_id])  # re-run here from its steps
        return "recovered"

    def _reopen(self, rollout_id: str) -> None:
        """Mark a workflow DBOS ended in ERROR as PENDING again, so recovery re-runs it from
        its recorded steps (its failed step replays as the failed iteration it was). DBOS's
        `resume_workflow` leaves ERROR workflows alone and `fork_workflow` would give the
        rollout a new id, so this one row of DBOS's status table is changed here."""
        import sqlalchemy as sa
        from dbos._dbos import _get_dbos_instance

        sys_db = _get_dbos_instance()._sys_db
        table = sys_db.tables.workflow_status
        with sys_db.engine.begin() as conn:
            conn.execute(
                sa.update(table)
                .where(table.c.workflow_uuid == rollout_id, table.c.status == "ERROR")
                .values(status="PENDING", recovery_attempts=0, error=None, output=None)
            )

    def outcome(self, rollout_id: str) -> str:
        return str(DBOS.retrieve_workflow(rollout_id).get_result())

    def drain(self, timeout_s: float = 3600.0) -> None:
        """Before exiting: finish any other rollout this process picked up in recovery."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            mine = DBOS.list_workflows(
                status=list(ACTIVE), executor_id=self.executor_id, load_input=False
            )
            if not mine:
                return
            time.sleep(0.5)

    def close(self) -> None:
        """Stop this controller and free its leases (again: nothing happens)."""
        if self._stop.is_set():
            return
        self._stop.set()
        DBOS.destroy()
        for rollout_id in self.held:
            self.store.release(rollout_id, self.executor_id)
        self.store.dispose()
