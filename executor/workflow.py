"""The rollout as a durable DBOS workflow: each controller iteration is one recorded step.

    workflow(plan):  begin  →  loop { recv controls (the tick's sleep)  →  iterate  }  →  finish
    iterate:         controls → observe Serve → controller.decide → apply → new state + events

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
from typing import Any, Literal

from dbos import DBOS, SetWorkflowID
from pydantic import BaseModel

from executor import metrics, store
from executor.serve_backend import Memory, Plan, ServeBackend, remove_apps
from executor.status import ACTIVE, CONTROL_TOPIC, STATUS_KEY
from rollout import controller as c
from rollout import history as h
from rollout.planner import step_count

APP_VERSION = "rollout-executor-1"  # fixed, so a restarted controller recovers older runs
_STORE_URL = ""  # this controller's store, with its password (the plan holds it masked)


def tick_s() -> float:
    """Seconds between observations when nothing happens (controls cut the wait short)."""
    return float(os.environ.get("ROLLOUT_TICK_S", "0.2"))


class InstallState(BaseModel):
    """A first deploy (nothing live before): start the replicas, then open the router."""

    started_at: float
    phase: str = c.Phase.PROGRESSING.value
    stage: str = c.Stage.SCALE_UP.value
    waiting: str = ""

    @property
    def terminal(self) -> bool:
        return c.Phase(self.phase).terminal


class Carry(BaseModel):
    """What one step hands the next; recorded as the step's output."""

    kind: Literal["rollout", "install"]
    state: str
    memory: Memory
    events: list[dict[str, Any]] = []
    status: dict[str, Any] = {}
    outcome: str | None = None


# ---- steps ----------------------------------------------------------------------------------


@DBOS.step(retries_allowed=True, max_attempts=5, interval_seconds=1.0, backoff_rate=2.0)
def begin_step(plan_json: str) -> str:
    plan = Plan.model_validate_json(plan_json)
    now = time.time()
    policy = plan.spec.rollout_policy()
    if plan.from_version is None:
        st = InstallState(started_at=now)
        events: list[h.Event] = [
            h.RolloutStarted(t=now, policy=policy.model_dump(), desired=plan.spec.replicas, steps=1)
        ]
        carry = Carry(kind="install", state=st.model_dump_json(), memory=Memory())
    else:
        state, events = c.start(policy, plan.desired_start, now)
        memory = Memory(targets={c.CURRENT: plan.desired_start, c.CANDIDATE: 0}, weight=0.0)
        carry = Carry(kind="rollout", state=state.to_json(), memory=memory)
    carry.events = [e.model_dump(mode="json") for e in events]
    carry.status = _status(plan, carry, {}, now)
    metrics.observe(carry.status, carry.events)
    return carry.model_dump_json()


@DBOS.step(retries_allowed=True, max_attempts=10, interval_seconds=1.0, backoff_rate=1.5)
def iterate_step(plan_json: str, carry_json: str, controls: list[dict[str, Any]]) -> str:
    plan = Plan.model_validate_json(plan_json)
    carry = Carry.model_validate_json(carry_json)
    backend = ServeBackend(plan, carry.memory)
    if carry.kind == "install":
        events = _install_tick(plan, carry, backend, controls)
    else:
        events = _rollout_tick(carry, backend, controls)
    events.extend(backend.events)
    carry.memory = backend.mem
    carry.events = [e.model_dump(mode="json") for e in events]
    carry.status = _status(plan, carry, backend.counts, time.time())
    metrics.observe(carry.status, carry.events)
    return carry.model_dump_json()


@DBOS.step(retries_allowed=True, max_attempts=5, interval_seconds=1.0)
def finish_step(plan_json: str, outcome: str) -> None:
    plan = Plan.model_validate_json(plan_json)
    if plan.from_version is None and outcome != c.Phase.SUCCEEDED.value:
        ServeBackend(plan, Memory())  # connects
        remove_apps(plan.name)  # a failed first deploy leaves nothing behind, router included
    st = store.Store(_STORE_URL or plan.store_url)
    try:
        st.finish(plan.id, outcome)
    finally:
        st.dispose()


def _rollout_tick(carry: Carry, backend: ServeBackend, controls: list[dict[str, Any]]) -> list:
    state = c.RolloutState.from_json(carry.state)
    events: list[h.Event] = []
    now = time.time()
    for msg in controls:
        state, got = c.control(state, c.Control(msg["control"]), now)
        events.extend(got)
    decision = c.decide(state, backend.observe())
    backend.apply(decision.actions)
    events.extend(decision.events)
    carry.state = decision.state.to_json()
    if decision.state.terminal:
        carry.outcome = decision.state.phase.value
    return events


def _install_tick(
    plan: Plan, carry: Carry, backend: ServeBackend, controls: list[dict[str, Any]]
) -> list:
    st = InstallState.model_validate_json(carry.state)
    events: list[h.Event] = []
    now = time.time()
    stop = ""
    for msg in controls:
        name = msg["control"]
        events.append(h.ControlReceived(t=now, control=name))
        if name in (c.Control.CANCEL.value, c.Control.FORCE_CANCEL.value):
            events.append(h.ControlApplied(t=now, control=name))
            stop = stop or name
        else:
            reason = "a first deploy has no steps to pause or roll forward"
            events.append(h.ControlIgnored(t=now, control=name, reason=reason))
    obs = backend.observe()
    n = obs.desired
    actions: list[c.Action] = []
    deadline = plan.spec.rollout_policy().progress_deadline_seconds

    def transition(stage: c.Stage, phase: c.Phase, reason: str) -> None:
        st.stage, st.phase = stage.value, phase.value
        events.append(
            h.Transition(
                t=now, phase=phase.value, stage=stage.value, direction="forward", step=0,
                reason=reason,
            )
        )  # fmt: skip

    def finish(outcome: c.Phase, reason: str) -> None:
        if backend.mem.targets.get(c.CANDIDATE, 0):
            actions.append(c.ScaleTo(c.CANDIDATE, 0))
            events.append(h.Scaled(t=now, version=c.CANDIDATE, replicas=0, reason=reason))
        actions.append(c.Finish(outcome))
        events.append(h.Finished(t=now, outcome=outcome.value, reason=reason))
        st.phase, st.stage = outcome.value, c.Stage.DONE.value

    if stop:
        finish(c.Phase.CANCELLED, f"{stop}: first deploy of {plan.to_version} withdrawn")
    elif st.stage == c.Stage.SCALE_UP.value:
        actions.append(c.ScaleTo(c.CANDIDATE, n))
        why = f"first deploy of {plan.to_version}"
        events.append(h.Scaled(t=now, version=c.CANDIDATE, replicas=n, reason=why))
        transition(c.Stage.WAIT_HEALTHY, c.Phase.PROGRESSING, "replicas starting")
    elif obs.candidate.ready >= n:
        actions += [c.SetWeight(1.0), c.Finish(c.Phase.SUCCEEDED)]
        events.append(h.WeightSet(t=now, candidate_weight=1.0, reason=f"{n} replicas healthy"))
        events.append(
            h.StepCompleted(
                t=now, step=1, direction="forward", candidate_weight=1.0, current_replicas=0,
                candidate_replicas=n,
            )
        )  # fmt: skip
        events.append(h.Finished(t=now, outcome="succeeded", reason=f"{plan.to_version} serving"))
        st.phase, st.stage = c.Phase.SUCCEEDED.value, c.Stage.DONE.value
    elif now - st.started_at > deadline:
        finish(
            c.Phase.FAILED,
            f"first deploy exceeded its progress deadline of {deadline:g} s: "
            f"{obs.candidate.ready} of {n} replicas ready",
        )
    else:
        o = obs.candidate
        why = (
            f"{o.pending_gpu} replicas wait for a free GPU"
            if o.pending_gpu
            else f"waiting for {n - o.ready} replicas to become healthy"
        )
        if why != st.waiting:
            st.waiting = why
            events.append(h.Waiting(t=now, reason=why))
    backend.apply(actions)
    carry.state = st.model_dump_json()
    if st.terminal:
        carry.outcome = st.phase
    return events


def _status(plan: Plan, carry: Carry, counts: dict[str, dict[str, int]], now: float) -> dict:
    """What `rollout status` prints (the controller fields plus observed replica counts)."""
    if carry.kind == "install":
        st = InstallState.model_validate_json(carry.state)
        state, stage, step, steps = st.phase, st.stage, int(st.terminal), 1
        weight = carry.memory.weight
        targets = {c.CANDIDATE: carry.memory.targets.get(c.CANDIDATE, 0)}
        waiting = st.waiting
    else:
        rs = c.RolloutState.from_json(carry.state)
        summary = rs.summary()
        state, stage, step = rs.phase.value, rs.stage.value, rs.step
        steps = step_count(rs.policy, rs.desired)
        weight = rs.candidate_weight
        targets = {c.CURRENT: rs.current_target, c.CANDIDATE: rs.candidate_target}
        waiting = str(summary.get("waiting") or summary.get("reason") or "")
    replicas: dict[str, dict[str, int]] = {}
    for role, target in targets.items():
        version = plan.version(role)
        if version:
            replicas[version] = {"target": target, **counts.get(role, {})}
    return {
        "id": plan.id,
        "app": plan.name,
        "from_version": plan.from_version,
        "to_version": plan.to_version,
        "kind": "first deploy" if carry.kind == "install" else "rollout",
        "state": state,
        "stage": stage,
        "step": step,
        "steps": steps,
        "candidate_weight": weight,
        "replicas": replicas,
        "waiting": "" if c.Phase(state).terminal else waiting,
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


@DBOS.workflow(name="rollout")
def rollout_workflow(plan_json: str) -> str:
    carry = Carry.model_validate_json(begin_step(plan_json))
    _publish(None, carry)
    while carry.outcome is None:
        controls = _receive()
        prev = carry
        carry_in = carry.model_dump_json(exclude={"events", "status"})
        carry = Carry.model_validate_json(iterate_step(plan_json, carry_in, controls))
        _publish(prev, carry)
    finish_step(plan_json, carry.outcome)
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
        if status is not None and status.status not in ACTIVE:
            return "ended"
        if not self._take(rollout_id):
            return "alive"
        if status is None:  # its controller died before starting it
            with SetWorkflowID(plan.id):
                DBOS.start_workflow(rollout_workflow, plan.model_dump_json())
            return "started"
        if status.status == "PENDING" and status.executor_id != self.executor_id:
            DBOS._recover_pending_workflows([status.executor_id])  # re-run here from its steps
        return "recovered"

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
        self._stop.set()
        DBOS.destroy()
        for rollout_id in self.held:
            self.store.release(rollout_id, self.executor_id)
        self.store.dispose()
