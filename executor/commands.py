"""The executor's commands, as `rollout/cli.py` calls them.

`deploy` works like `kubectl apply`: nothing live → deploy the version; another version live →
roll from it to this one; a rollout of this very file still recorded as in progress → resume it
(or follow it, when its controller is alive). It blocks and prints the history as it grows, or
with `--detach` hands the rollout to a background controller process and prints its id.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from executor import cluster, status, store
from executor.deploy_file import DeploySpec, load_deploy_file
from rollout import controller as c
from rollout.errors import InputError

DETACH_WAIT_S = 90.0


def _store_for(spec: DeploySpec, path: Path) -> store.Store:
    url = spec.store or store.default_url()
    st = store.Store(url)
    store.remember(url, path)
    return st


def _settle(st: store.Store, db: object, rec: store.Record) -> str | None:
    """DBOS's state of an indexed rollout; closes index rows whose workflow has ended."""
    wf, _ = status.workflow_state(db, rec.id)  # type: ignore[arg-type]
    if wf is not None and wf not in status.ACTIVE:
        outcome = {"CANCELLED": "cancelled", "SUCCESS": None}.get(wf, "failed")
        if outcome is None:
            got = status.read_status(db, rec)  # type: ignore[arg-type]
            outcome = got["state"] if got["state"] in status.TERMINAL else "succeeded"
        st.finish(rec.id, outcome)
    return wf


# ---- deploy ---------------------------------------------------------------------------------


def deploy_command(path: Path, detach: bool = False) -> None:
    spec = load_deploy_file(path)
    address = cluster.address_for(spec, start=False)  # and its token, for a resumed controller
    st = _store_for(spec, path)
    db = status.client(st.url)
    for rec in st.active(spec.name):
        if rec.cluster not in (None, address):
            continue  # another cluster's rollout of this model
        wf = _settle(st, db, rec)
        if wf is not None and wf not in status.ACTIVE:
            continue
        if rec.to_version != spec.version:
            raise InputError(
                f"rollout {rec.id} of {rec.app} ({rec.from_version or 'nothing'} → "
                f"{rec.to_version}) is still in progress; wait for it or run "
                f"`rollout cancel {rec.id}`"
            )
        _resume(st, rec, detach)
        return
    plan = _plan(spec, st.url)
    if plan is None:
        return
    st.add(
        store.Record(
            id=plan.id, app=plan.name, from_version=plan.from_version, to_version=plan.to_version,
            created_at=time.time(), plan=plan.model_dump_json(), outcome=None, finished_at=None,
            cluster=plan.address,
        )
    )  # fmt: skip
    print(plan.id, flush=True)
    what = f"rolling {plan.name} from {plan.from_version} to {plan.to_version}"
    if plan.from_version is None:
        what = f"deploying {plan.name} {plan.to_version}"
    print(f"{what} ({spec.rollout_policy().label()})", file=sys.stderr, flush=True)
    if detach:
        _spawn(st, plan.id, "start")
    else:
        _run_here(st, plan.id, resume=False)


def _plan(spec: DeploySpec, url: str):  # type: ignore[no-untyped-def]
    """The plan for this deploy file against what the cluster runs now (None: nothing to do)."""
    from executor.serve_backend import (
        Plan,
        candidate_app_config,
        ingress_deployment,
        live_versions,
    )

    address = cluster.address_for(spec)
    assert address is not None
    cluster.connect(address)
    cluster.ensure_serve(spec.http)
    details = cluster.serve_client().get_serve_details()
    live = live_versions(spec.name, details)
    if list(live) == [spec.version]:
        print(f"{spec.name} {spec.version} is already live; nothing to roll out", file=sys.stderr)
        return None
    if len(live) > 1:
        raise InputError(
            f"{spec.name} runs versions {', '.join(sorted(live))} with no rollout in progress; "
            f"take it down with `rollout down` first"
        )
    deployment = ingress_deployment(spec)
    from_version, current_app, desired = None, None, spec.replicas
    if live:
        from_version, info = next(iter(live.items()))
        current_app = info.get("deployed_app_config")
        if not current_app:
            raise InputError(f"{spec.name} {from_version} was not deployed by rollout")
        dep = current_app["deployments"][0]["name"]
        desired = int(info["deployments"][dep].get("target_num_replicas") or spec.replicas)
    return Plan(
        id=store.new_rollout_id(spec.name, spec.version),
        name=spec.name,
        from_version=from_version,
        to_version=spec.version,
        spec=spec.model_copy(update={"store": spec.store and store.mask_url(spec.store)}),
        current_app=current_app,
        candidate_app=candidate_app_config(spec, deployment),
        desired_start=max(1, desired),
        address=address,
        store_url=store.mask_url(url),  # the controller gets the URL itself from its caller
    )


def _resume(st: store.Store, rec: store.Record, detach: bool) -> None:
    db = status.client(st.url)
    wf, _ = status.workflow_state(db, rec.id)
    if wf is None and time.time() - rec.created_at < DETACH_WAIT_S:
        raise InputError(f"rollout {rec.id} is just starting; try again in a minute")
    print(rec.id, flush=True)
    lease = st.lease(rec.id)
    if lease.live:
        print(f"rollout {rec.id} is already running ({lease.describe()})", file=sys.stderr)
        if not detach:
            _finish(rec.id, _follow(db, rec.id))
        return
    print(f"resuming rollout {rec.id} from its last recorded step", file=sys.stderr, flush=True)
    if detach:
        _spawn(st, rec.id, "recover")
    else:
        _run_here(st, rec.id, resume=True)


def recover_command(path: Path) -> None:
    spec = load_deploy_file(path)
    cluster.address_for(spec, start=False)  # the cluster's token
    st = _store_for(spec, path)
    db = status.client(st.url)
    pending = [r for r in st.active(spec.name) if _settle(st, db, r) in (*status.ACTIVE, None)]
    if not pending:
        print(f"no rollout of {spec.name} to recover")
        return
    for rec in pending:
        lease = st.lease(rec.id)
        if lease.live:
            print(f"rollout {rec.id} is running ({lease.describe()}); nothing to recover")
            continue
        print(rec.id, flush=True)
        print(f"resuming rollout {rec.id} from its last recorded step", file=sys.stderr)
        _run_here(st, rec.id, resume=True)


def _run_here(st: store.Store, rollout_id: str, *, resume: bool) -> None:
    """Be the controller: run (or take over) the rollout's workflow in this process."""
    from executor.serve_backend import Plan
    from executor.workflow import ControllerProcess

    rec = st.get(rollout_id)
    assert rec is not None
    plan = Plan.model_validate_json(rec.plan)
    cluster.connect(plan.address)  # in the main thread, where Ray can install its handlers
    proc = ControllerProcess(st.url)
    try:
        if resume:
            proc.take_over(rollout_id, plan)
        else:
            proc.start(plan)
        state = _follow(status.client(st.url), rollout_id)
        proc.drain()
    finally:
        proc.close()
    _finish(rollout_id, state)


def _follow(db: object, rollout_id: str) -> str:
    """Print the history as it grows until the rollout ends; returns its final state."""
    offset = 0
    while True:
        events, offset = status.read_history(db, rollout_id, offset)  # type: ignore[arg-type]
        for e in events:
            print(status.format_event(e), flush=True)
        wf, _ = status.workflow_state(db, rollout_id)  # type: ignore[arg-type]
        if wf is not None and wf not in status.ACTIVE:
            events, offset = status.read_history(db, rollout_id, offset)  # type: ignore[arg-type]
            for e in events:
                print(status.format_event(e), flush=True)
            break
        time.sleep(0.3)
    raw = db.get_event(rollout_id, status.STATUS_KEY, timeout_seconds=0)  # type: ignore[attr-defined]
    state = json.loads(raw)["state"] if raw else "failed"
    if wf == "CANCELLED":
        state = "cancelled"
    return str(state)


def _finish(rollout_id: str, state: str) -> None:
    print(f"rollout {rollout_id}: {state}", flush=True)
    if state != c.Phase.SUCCEEDED.value:
        raise SystemExit(1)


def _spawn(st: store.Store, rollout_id: str, mode: str) -> None:
    """Hand the rollout to a detached controller process and wait until it has it."""
    logs = store.home() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = (logs / f"{rollout_id}.log").open("a")
    # the store's URL (with its password) goes by environment, never on the command line
    env = dict(os.environ, ROLLOUT_HOME=str(store.home()), ROLLOUT_STORE_URL=st.url)
    proc = subprocess.Popen(
        [sys.executable, "-m", "executor.worker", mode, rollout_id],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True, env=env, cwd=os.getcwd(),
    )  # fmt: skip
    db = status.client(st.url)
    deadline = time.monotonic() + DETACH_WAIT_S
    while time.monotonic() < deadline:
        wf, _ = status.workflow_state(db, rollout_id)
        if wf is not None and (wf not in status.ACTIVE or st.lease(rollout_id).live):
            print(
                f"controller pid {proc.pid} runs it; follow with `rollout status {rollout_id}`",
                file=sys.stderr,
            )
            return
        if proc.poll() is not None:
            raise InputError(f"the controller process exited early; see {log.name}")
        time.sleep(0.2)
    raise InputError(f"the controller process did not start in time; see {log.name}")


# ---- reading and controlling ----------------------------------------------------------------


def status_command(rollout_id: str, as_json: bool = False) -> None:
    st, rec = store.find(rollout_id)
    s = status.read_status(status.client(st.url), rec, st.lease(rollout_id))
    print(json.dumps(s) if as_json else status.format_status(s))


def history_command(rollout_id: str, as_json: bool = False) -> None:
    st, _ = store.find(rollout_id)
    events, _ = status.read_history(status.client(st.url), rollout_id)
    if as_json:
        print(json.dumps([e.model_dump(mode="json") for e in events]))
    else:
        for e in events:
            print(status.format_event(e))


def control_command(rollout_id: str, control_name: str) -> None:
    ctl = c.Control(control_name)
    verb = ctl.value.replace("_", "-")
    st, rec = store.find(rollout_id)
    db = status.client(st.url)
    wf = _settle(st, db, rec)
    rec = st.get(rollout_id) or rec
    if rec.outcome or (wf is not None and wf not in status.ACTIVE):
        raise InputError(f"rollout {rollout_id} has already ended ({rec.outcome}); cannot {verb}")
    db.send(rollout_id, {"control": ctl.value, "sent_at": time.time()}, topic=status.CONTROL_TOPIC)
    print(f"{verb} sent to rollout {rollout_id}")
    if not st.lease(rollout_id).live:
        print(
            "its controller is not running: the control waits until `rollout recover`",
            file=sys.stderr,
        )


# ---- down -----------------------------------------------------------------------------------


def _withdraw(st: store.Store, rec: store.Record) -> None:
    """Stop a rollout's workflow (its controller exits) before its applications go."""
    db = status.client(st.url)
    wf, _ = status.workflow_state(db, rec.id)
    if wf in status.ACTIVE:
        with contextlib.suppress(Exception):
            db.cancel_workflow(rec.id)
        deadline = time.monotonic() + 20
        while st.lease(rec.id).live and time.monotonic() < deadline:
            time.sleep(0.2)
    st.finish(rec.id, "cancelled")
    print(f"cancelled rollout {rec.id}")


def _address(rec: store.Record) -> str | None:
    return json.loads(rec.plan).get("address")


def down_command(path: Path | None = None) -> None:
    if path is None:
        local = cluster.local_cluster()
        if local is None:
            print("no local Ray cluster started by rollout is running")
            return
        for url in store.known_urls():  # only rollouts on the cluster this stops
            try:
                st = store.Store(url, create=False)
                for rec in st.all_active():
                    if _address(rec) == local.address:
                        _withdraw(st, rec)
            except FileNotFoundError:
                continue
        cluster.stop_local()
        print("removed every application and stopped the local Ray cluster")
        return
    from executor.serve_backend import declarative_apps, remove_apps

    spec = load_deploy_file(path)
    st = _store_for(spec, path)
    for rec in st.active(spec.name):
        _withdraw(st, rec)
    address = cluster.address_for(spec, start=False)
    if address is None:
        print(f"no cluster runs {spec.name}")
        return
    cluster.connect(address)
    removed = remove_apps(spec.name)
    print(f"removed {', '.join(removed)}" if removed else f"{spec.name} was not deployed")
    local = cluster.local_cluster()
    if local and local.address == address:
        left = declarative_apps(cluster.serve_client().get_serve_details())
        if not left:
            import ray

            ray.shutdown()
            cluster.stop_local()
            print("stopped the local Ray cluster (no application left on it)")
