"""The executor's commands, as `rollout/cli.py` calls them.

`deploy` works like `kubectl apply`: nothing live → deploy the version; another version live →
roll from it to this one; a rollout of this very file still recorded as in progress → resume it
(or follow it, when its controller is alive). It blocks and prints the history as it grows, or
with `--detach` hands the rollout to a background controller process and prints its id.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from executor import cluster, rollouts, serve_calls, status, store
from executor.deploy_file import DeploySpec, load_deploy_file
from rollout import controller as c
from rollout.driver import BackendError
from rollout.errors import InputError

T = TypeVar("T")

DETACH_WAIT_S = 90.0
CANCEL_WINDOW_S = 5.0  # after Ctrl-C, a second one this soon cancels the rollout


def _cluster_call(fn: Callable[[], T]) -> T:
    """A command's own call to Serve: a cluster that does not answer is one line, exit 2."""
    try:
        return fn()
    except BackendError as e:
        raise InputError(str(e)) from None


# ---- deploy ---------------------------------------------------------------------------------


def deploy_command(path: Path, detach: bool = False) -> None:
    spec = load_deploy_file(path)
    address = cluster.address_for(spec, start=False)  # and its token, for a resumed controller
    st, db = rollouts.open_store(spec, path)
    for t in rollouts.in_progress(st, db, spec.name, address or ""):
        rec = t.rec
        if rec.to_version != spec.version:
            raise InputError(
                f"rollout {rec.id} of {rec.app} ({rec.from_version or 'nothing'} → "
                f"{rec.to_version}) is still in progress; wait for it or run "
                f"`rollout cancel {rec.id}`"
            )
        _resume(t, detach)
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
        _detach(st, plan.id, "start")
    else:
        _run_here(st, plan.id, resume=False)


def _plan(spec: DeploySpec, url: str):  # type: ignore[no-untyped-def]
    """The plan for this deploy file against what the cluster runs now (None: nothing to do)."""
    from executor.plan import Plan, candidate_app_config, ingress_deployment
    from executor.router_client import check_routers
    from executor.serve_config import live_versions

    address = cluster.address_for(spec)
    assert address is not None
    cluster.connect(address)
    cluster.ensure_serve(spec.http)
    check_routers()  # every proxy must run the router, or a node's requests reach no version
    details = _cluster_call(serve_calls.details)
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


def _resume(t: rollouts.Tracked, detach: bool) -> None:
    if t.workflow is None and time.time() - t.rec.created_at < DETACH_WAIT_S:
        raise InputError(f"rollout {t.id} is just starting; try again in a minute")
    print(t.id, flush=True)
    if t.running:
        print(f"rollout {t.id} is already running ({t.lease.describe()})", file=sys.stderr)
        if not detach:
            _finish(t.id, _follow(t.db, t.id))
        return
    print(f"resuming rollout {t.id} from its last recorded step", file=sys.stderr, flush=True)
    if detach:
        _detach(t.store, t.id, "recover")
    else:
        _run_here(t.store, t.id, resume=True)


def recover_command(path: Path) -> None:
    spec = load_deploy_file(path)
    cluster.address_for(spec, start=False)  # the cluster's token
    st, db = rollouts.open_store(spec, path)
    pending = rollouts.in_progress(st, db, spec.name)
    if not pending:
        print(f"no rollout of {spec.name} to recover")
        return
    for t in pending:
        if t.running:
            print(f"rollout {t.id} is running ({t.lease.describe()}); nothing to recover")
            continue
        print(t.id, flush=True)
        print(f"resuming rollout {t.id} from its last recorded step", file=sys.stderr)
        _run_here(st, t.id, resume=True)


def _run_here(st: store.Store, rollout_id: str, *, resume: bool) -> None:
    """Be the controller: run (or take over) the rollout's workflow in this process. Ctrl-C
    hands the rollout to a background controller (as `--detach` does) instead of leaving it
    without one; a second Ctrl-C within `CANCEL_WINDOW_S` cancels it."""
    from executor.plan import Plan
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
        try:
            state = _follow(status.client(st.url), rollout_id)
            proc.drain()
        except KeyboardInterrupt:
            again = threading.Event()  # a further Ctrl-C from now on cancels the rollout
            signal.signal(signal.SIGINT, lambda *_: again.set())
            logging.getLogger("dbos").setLevel(logging.CRITICAL)  # the cut-off step is no news
            proc.close()  # stops this controller and frees the lease for the next one
            _hand_over(st, rollout_id, again)
    finally:
        proc.close()
    _finish(rollout_id, state)


def _hand_over(st: store.Store, rollout_id: str, again: threading.Event) -> None:
    """After Ctrl-C: a background controller takes the rollout over; one line says so. Any
    further Ctrl-C (`again`, up to `CANCEL_WINDOW_S` after that line) cancels the rollout.
    The process then ends at once (os._exit), as a killed controller would: whatever step was
    in flight here is run again by the next controller from its recorded input."""
    pid, log = _spawn(st, rollout_id, "recover")
    print(
        f"interrupted: rollout {rollout_id} continues in a background controller (pid {pid}, "
        f"log {log}); follow it with `rollout status {rollout_id}`, or press Ctrl-C again "
        f"within {CANCEL_WINDOW_S:g} s to cancel it",
        file=sys.stderr,
        flush=True,
    )
    if again.wait(CANCEL_WINDOW_S):
        print(rollouts.find(rollout_id).send(c.Control.CANCEL), file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(130)


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


def _detach(st: store.Store, rollout_id: str, mode: str) -> None:
    pid, _ = _spawn(st, rollout_id, mode)
    print(
        f"controller pid {pid} runs it; follow with `rollout status {rollout_id}`", file=sys.stderr
    )


def _spawn(st: store.Store, rollout_id: str, mode: str) -> tuple[int, str]:
    """Hand the rollout to a detached controller process and wait until it has it; its pid
    and log file."""
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
            return proc.pid, log.name
        if proc.poll() is not None:
            raise InputError(f"the controller process exited early; see {log.name}")
        time.sleep(0.2)
    raise InputError(f"the controller process did not start in time; see {log.name}")


# ---- reading and controlling ----------------------------------------------------------------


def status_command(ref: str, as_json: bool = False) -> None:
    """A rollout's status by its id; by a model's name, its last rollout's status and what the
    cluster runs now (`live`: each version's running replicas and Serve's target)."""
    try:
        s = rollouts.find(ref).status()
    except InputError:
        t = rollouts.find_model(ref)
        if t is None:
            raise
        s = {**t.status(), "live": _live(t.rec)}
    print(json.dumps(s) if as_json else status.format_status(s))


def _live(rec: store.Record) -> dict[str, Any]:
    """Each live version of the model, as Serve sizes it now; {"error": why} when the
    cluster cannot be asked (the rest of the status still prints)."""
    from executor.auth import token_for, use
    from executor.observation import scaling_of
    from executor.plan import Plan
    from executor.serve_config import live_versions

    plan = Plan.model_validate_json(rec.plan)
    try:
        use(token_for(plan.spec.cluster))
        serve_calls.connect(rec.cluster or plan.address)
        details = serve_calls.details()
    except (BackendError, InputError) as e:
        return {"error": str(e)}
    return {v: scaling_of(app) for v, app in sorted(live_versions(plan.name, details).items())}


def history_command(rollout_id: str, as_json: bool = False) -> None:
    st, _ = store.find(rollout_id)
    events, _ = status.read_history(status.client(st.url), rollout_id)
    if as_json:
        print(json.dumps([e.model_dump(mode="json") for e in events]))
    else:
        for e in events:
            print(status.format_event(e))


def control_command(rollout_id: str, control_name: str) -> None:
    t = rollouts.find(rollout_id)
    print(t.send(c.Control(control_name)))
    if not t.running:
        print(rollouts.NOT_RUNNING, file=sys.stderr)


# ---- down -----------------------------------------------------------------------------------


def _withdraw(t: rollouts.Tracked) -> None:
    """Stop a rollout's workflow (its controller exits) before its applications go."""
    if t.workflow in status.ACTIVE:
        with contextlib.suppress(Exception):
            t.db.cancel_workflow(t.id)
        deadline = time.monotonic() + 20
        while t.store.lease(t.id).live and time.monotonic() < deadline:
            time.sleep(0.2)
    t.store.finish(t.id, "cancelled")
    print(f"cancelled rollout {t.id}")


def down_command(path: Path | None = None) -> None:
    if path is None:
        local = cluster.local_cluster()
        if local is None:
            print("no local Ray cluster started by rollout is running")
            return
        for url in store.known_urls():  # only rollouts on the cluster this stops
            try:
                st = store.Store(url, create=False)
            except FileNotFoundError:
                continue
            except InputError as e:  # unreachable: its rollouts are not on this cluster's store
                print(f"warning: {e}", file=sys.stderr)
                continue
            db = status.client(url)
            for rec in st.all_active():
                if rec.cluster == local.address:
                    _withdraw(rollouts.track(st, db, rec))
        cluster.stop_local()
        print("removed every application and stopped the local Ray cluster")
        return
    from executor.serve_config import declarative_apps

    spec = load_deploy_file(path)
    address = cluster.address_for(spec, start=False)
    st, db = rollouts.open_store(spec, path)
    for t in rollouts.in_progress(st, db, spec.name, address or ""):
        _withdraw(t)
    if address is None:
        print(f"no cluster runs {spec.name}")
        return
    cluster.connect(address)
    removed = _cluster_call(lambda: serve_calls.remove_apps(spec.name))
    print(f"removed {', '.join(removed)}" if removed else f"{spec.name} was not deployed")
    local = cluster.local_cluster()
    if local and local.address == address:
        left = declarative_apps(_cluster_call(serve_calls.details))
        if not left:
            import ray

            ray.shutdown()
            cluster.stop_local()
            print("stopped the local Ray cluster (no application left on it)")
