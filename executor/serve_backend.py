"""The controller's backend on Ray Serve: observe replicas, apply scale and weight actions.

Layout on the cluster: one Serve application per version (`{name}_{version}`, one GPU
deployment each) and a router application (`{name}`) in front that splits traffic by the
controller's weight (executor/router.py). Every change is declarative (`deploy_apps` with the
whole multi-application config), because a repeated `serve.run` restarts every replica; replica
counts and router weights are lightweight fields, so no running replica restarts. An application
scaled to zero is dropped from the config, which deletes it.

Apply order within one decision: first the router's weight (and any scale-up, which cannot make
a replica ready at once), waiting until the router reports the new config; then scale-downs.
The controller's weight never exceeds the share of the ready replicas left after its own
scale-downs, so applying the weight first never sends traffic to a version with no replica,
while scaling down first could (a handle call to a deployment with no replica blocks).

Observation: a replica is ready when Serve reports it RUNNING and one health probe (its
`check_health`, called on that very replica) has passed; STARTING, unprobed or failed ones are
starting; STOPPING ones that were placed on a node are draining (they still hold a GPU). A
STARTING replica that was never placed while the cluster has too few free GPUs waits for a GPU.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from pydantic import BaseModel

from executor import cluster
from executor.deploy_file import DeploySpec, version_app
from executor.router import DEPLOYMENT as ROUTER_DEPLOYMENT
from executor.router_client import read_router, router_actor_names, wait_for_stamp
from executor.router_metrics import guard_traffic
from rollout import controller as c
from rollout import history as h
from rollout.autoscaler import Autoscaler
from rollout.guard import Traffic

ROLES = (c.CURRENT, c.CANDIDATE)
ROUTER_IMPORT = "executor.router:app"
# The router is all non-blocking asyncio: its replicas run its code and its handles' routing on
# the replica's own event loop (Serve's throughput settings), saving two thread hops a message.
ROUTER_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
}
ACK_TIMEOUT_S = 20.0
ACK_POLL_S = 0.005  # how often the router replicas are asked whether they took a new config
PROBE_BUDGET_S = 2.0
# a replica placed a moment ago can still lack a node in Serve's details while the GPU count
# already shows it: only one unplaced for this long counts as waiting for a GPU
PLACEMENT_GRACE_S = 2.0
RELEASE_LINGER_S = 10.0  # longest a dropped replica may still count as holding its GPU


class Plan(BaseModel):
    """Everything a controller process needs to run one rollout; the workflow's input."""

    id: str
    name: str
    from_version: str | None  # None: a first deploy, nothing live before
    to_version: str
    spec: DeploySpec  # the deploy file of the new version
    current_app: dict[str, Any] | None  # the live version's Serve app config, as deployed
    candidate_app: dict[str, Any]
    desired_start: int  # the live version's replica count when the rollout began
    address: str
    store_url: str

    def version(self, role: str) -> str | None:
        return self.from_version if role == c.CURRENT else self.to_version

    def app(self, role: str) -> str | None:
        v = self.version(role)
        return version_app(self.name, v) if v else None

    def template(self, role: str) -> dict[str, Any] | None:
        return self.current_app if role == c.CURRENT else self.candidate_app

    def deployment(self, role: str) -> str | None:
        t = self.template(role)
        return t["deployments"][0]["name"] if t else None

    def gpus(self, role: str) -> float:
        t = self.template(role)
        if not t:
            return 0.0
        return float(t["deployments"][0].get("ray_actor_options", {}).get("num_gpus", 0) or 0)


class Memory(BaseModel):
    """The backend's bookkeeping, carried from one recorded step to the next."""

    probed: dict[str, list[str]] = {}  # app → replica ids whose health probe passed
    unready: dict[str, list[str]] = {}  # app → replica ids seen, not yet RUNNING
    live: dict[str, int] = {}  # app → replicas not stopping at the last observation
    unplaced_since: dict[str, float] = {}  # "app/replica id" → first seen without a node
    placed: dict[str, list[str]] = {}  # app → replica ids on a node at the last observation
    released: dict[str, float] = {}  # "app/replica id" → when Serve stopped listing it
    failed_starts: dict[str, int] = {}  # role → cumulative failed starts
    targets: dict[str, int] = {}  # role → replicas last applied
    weight: float = 0.0  # candidate weight last applied
    autoscaler: dict[str, Any] | None = None


def app_dir() -> str:
    """Where import paths resolve first: the current folder, as `serve run --app-dir .`."""
    return os.getcwd()


def candidate_app_config(spec: DeploySpec, deployment: str) -> dict[str, Any]:
    """The Serve application config of the deploy file's version (replicas set on apply).

    Its replicas (and Serve's build of the application) get the current folder in front of
    the cluster's PYTHONPATH, so the import path resolves there as it did here.
    """
    m = spec.model
    return {
        "name": spec.app_name(),
        "route_prefix": None,
        "import_path": m.import_path,
        "args": dict(m.args),
        "runtime_env": {"env_vars": {"PYTHONPATH": f"{app_dir()}{os.pathsep}${{PYTHONPATH}}"}},
        "deployments": [
            {
                "name": deployment,
                "num_replicas": spec.replicas,
                "ray_actor_options": dict(m.ray_actor_options),
                "max_ongoing_requests": m.max_ongoing_requests,
                "health_check_period_s": spec.health_check.period_s,
                "health_check_timeout_s": spec.health_check.timeout_s,
                "graceful_shutdown_timeout_s": m.graceful_shutdown_timeout_s,
                "graceful_shutdown_wait_loop_s": min(2.0, m.graceful_shutdown_timeout_s),
            }
        ],
    }


def ingress_deployment(spec: DeploySpec) -> str:
    """The builder's ingress deployment name, by building the application locally (as
    `serve build` does); `model.deployment` in the deploy file skips the import."""
    if spec.model.deployment:
        return spec.model.deployment
    import importlib

    from rollout.errors import InputError

    module_name, _, attr = spec.model.import_path.partition(":")
    if app_dir() not in sys.path:
        sys.path.insert(0, app_dir())
    try:
        builder = getattr(importlib.import_module(module_name), attr)
        app = builder(dict(spec.model.args)) if callable(builder) else builder
        return str(app._bound_deployment.name)
    except Exception as e:
        raise InputError(
            f"cannot build {spec.model.import_path} to find its deployment name ({e}); "
            "set model.deployment in the deploy file"
        ) from None


def config_lock() -> contextlib.AbstractContextManager[None]:
    """Serialises read-modify-write of the cluster's declarative config between every writer
    of the cluster (deploy_apps replaces the whole set of applications)."""
    return cluster.config_lock()


def declarative_apps(details: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The applications deployed from configs (those a new config would otherwise delete)."""
    out = {}
    for name, app in details.get("applications", {}).items():
        conf = app.get("deployed_app_config")
        if conf and app.get("source") == "declarative" and app.get("status") != "DELETING":
            out[name] = conf
    return out


def deploy_config(apps: dict[str, dict[str, Any]]) -> None:
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate({"applications": list(apps.values())})
    cluster.serve_client().deploy_apps(schema)


def remove_apps(name: str) -> list[str]:
    """Delete a model's router and every version application (what `down DEPLOY.yaml` does)."""
    with config_lock():
        details = cluster.serve_client().get_serve_details()
        apps = declarative_apps(details)
        mine = [a for a in apps if a == name or a.startswith(f"{name}_")]
        if mine:
            deploy_config({k: v for k, v in apps.items() if k not in mine})
    return mine


def live_versions(name: str, details: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Version label → (application config, Serve details) of a model's live versions."""
    out = {}
    for app_name, app in details.get("applications", {}).items():
        if not app_name.startswith(f"{name}_") or app.get("status") == "DELETING":
            continue
        out[app_name.removeprefix(f"{name}_")] = app
    return out


def listed_gpus(details: dict[str, Any]) -> float:
    """GPUs held by every replica Serve lists on a node, across all applications."""
    total = 0.0
    for app in details.get("applications", {}).values():
        for dep in app.get("deployments", {}).values():
            options = (dep.get("deployment_config") or {}).get("ray_actor_options") or {}
            per = float(options.get("num_gpus") or 0)
            total += per * sum(1 for r in dep.get("replicas", []) if r.get("node_id"))
    return total


def router_routes(config: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not config:
        return []
    return list(config["deployments"][0].get("user_config", {}).get("routes", []))


def router_stats(name: str) -> dict[str, Any]:
    """Every running router replica's traffic, merged: `ongoing` and `served` per version, the
    metrics window, and `stamps` (each replica's applied config); {} when there is no router."""
    try:
        view = read_router(router_actor_names(name, cluster.serve_client().get_serve_details()))
    except Exception:  # no router yet, or it is restarting
        return {}
    return {**view.snapshot, "stamps": view.stamps}


def version_traffic(plan: Plan) -> dict[str, Traffic]:
    """Each role's traffic over the metrics window, for the metric guard: the one place the
    executor fetches it (today from the router replicas; empty while none answers, so the guard
    sees too few requests rather than a failure)."""
    stats = router_stats(plan.name)
    return guard_traffic(stats, {role: plan.version(role) for role in ROLES})


class ServeBackend:
    """`observe()` and `apply()` for the driver loop, plus the events applying produced."""

    def __init__(self, plan: Plan, memory: Memory) -> None:
        self.plan = plan
        self.mem = memory.model_copy(deep=True)
        self.events: list[h.Event] = []
        self.counts: dict[str, dict[str, int]] = {}
        self._unaccounted = 0.0
        self._router_actors: list[str] = []  # running router replicas at the last config write
        cluster.connect(plan.address)

    # ---- observe ---------------------------------------------------------------------------

    def observe(self) -> c.Observation:
        import ray

        details = cluster.serve_client().get_serve_details()
        free_gpus = float(ray.available_resources().get("GPU", 0.0))
        total_gpus = float(ray.cluster_resources().get("GPU", 0.0))
        now = time.time()
        # GPUs in use that no listed replica accounts for: replicas Serve already dropped
        # whose actors have not yet given their GPU back (or other work on the cluster)
        self._unaccounted = max(0.0, total_gpus - free_gpus - listed_gpus(details))
        seen = {role: self._version(role, details, free_gpus) for role in ROLES}
        if self.plan.spec.policy.guard is not None:
            traffic = version_traffic(self.plan)
            seen = {role: replace(v, traffic=traffic[role]) for role, v in seen.items()}
        return c.Observation(
            time=now,
            desired=self._desired(now),
            current=seen[c.CURRENT],
            candidate=seen[c.CANDIDATE],
        )

    def _replicas(self, role: str, details: dict[str, Any]) -> list[dict[str, Any]]:
        app, dep = self.plan.app(role), self.plan.deployment(role)
        if app is None or dep is None:
            return []
        info = details.get("applications", {}).get(app)
        if not info:
            return []
        return list(info.get("deployments", {}).get(dep, {}).get("replicas", []))

    def _version(
        self, role: str, details: dict[str, Any], free_gpus: float
    ) -> c.VersionObservation:
        app = self.plan.app(role)
        if app is None:
            self.counts[role] = {"ready": 0, "starting": 0, "draining": 0, "pending_gpu": 0}
            return c.VersionObservation()
        reps = self._replicas(role, details)
        probed = set(self.mem.probed.get(app, []))
        unready = set(self.mem.unready.get(app, []))
        running = [r for r in reps if r["state"] in ("RUNNING", "UPDATING")]
        probed |= self._probe([r for r in running if r["replica_id"] not in probed])
        ready = starting = draining = unplaced = 0
        live_ids: set[str] = set()
        now = time.time()
        for r in reps:
            rid, state, placed = r["replica_id"], r["state"], bool(r.get("node_id"))
            if state == "STOPPING":
                draining += placed  # a replica never placed holds no GPU
                continue
            live_ids.add(rid)
            if state in ("RUNNING", "UPDATING"):
                unready.discard(rid)
                if rid in probed:
                    ready += 1
                    continue
            else:
                unready.add(rid)
            starting += 1
            key = f"{app}/{rid}"
            if placed:
                self.mem.unplaced_since.pop(key, None)
            else:
                since = self.mem.unplaced_since.setdefault(key, now)
                unplaced += now - since >= PLACEMENT_GRACE_S
        # a replica that vanished before ever running failed to start, unless we scaled down
        vanished = unready - live_ids
        if vanished and self.mem.targets.get(role, 0) >= self.mem.live.get(app, 0):
            self.mem.failed_starts[role] = self.mem.failed_starts.get(role, 0) + len(vanished)
        unready -= vanished
        self.mem.probed[app] = sorted(probed & {r["replica_id"] for r in reps})
        self.mem.unready[app] = sorted(unready)
        self.mem.live[app] = len(live_ids)
        for key in list(self.mem.unplaced_since):
            if key.startswith(f"{app}/") and key.split("/", 1)[1] not in live_ids:
                del self.mem.unplaced_since[key]
        per = self.plan.gpus(role)
        draining += self._releasing(role, app, reps, now, per)
        pending_gpu = unplaced if per > 0 and free_gpus + 1e-9 < per else 0
        self.counts[role] = {
            "ready": ready,
            "starting": starting,
            "draining": draining,
            "pending_gpu": pending_gpu,
        }
        return c.VersionObservation(
            ready=ready,
            starting=starting,
            draining=draining,
            failed_starts=self.mem.failed_starts.get(role, 0),
            pending_gpu=pending_gpu,
        )

    def _releasing(
        self, role: str, app: str, reps: list[dict[str, Any]], now: float, per: float
    ) -> int:
        """Replicas Serve no longer lists whose GPUs Ray still counts as in use: they drain on.

        Serve drops a stopped replica from its details a moment before Ray returns the
        replica's GPU; counting it as draining until then keeps the mode's bound true in GPUs.
        """
        placed = {r["replica_id"] for r in reps if r.get("node_id")}
        for rid in set(self.mem.placed.get(app, [])) - placed:
            self.mem.released.setdefault(f"{app}/{rid}", now)
        self.mem.placed[app] = sorted(placed)
        mine = [k for k in self.mem.released if k.startswith(f"{app}/")]
        for key in mine:
            if now - self.mem.released[key] > RELEASE_LINGER_S:
                del self.mem.released[key]
        mine = [k for k in self.mem.released if k.startswith(f"{app}/")]
        if per <= 0 or not mine:
            return 0
        held = min(len(mine), int(self._unaccounted / per + 1e-9))
        self._unaccounted -= held * per
        if held == 0:
            for key in mine:
                del self.mem.released[key]
        return held

    def _probe(self, replicas: Sequence[dict[str, Any]]) -> set[str]:
        """Call `check_health` on each replica's own actor; the ids that answered in time."""
        if not replicas:
            return set()
        import ray

        refs = {}
        for r in replicas:
            try:
                actor = ray.get_actor(r["actor_name"], namespace="serve")
            except ValueError:
                continue  # gone since the observation
            refs[actor.check_health.remote()] = r["replica_id"]
        timeout = min(PROBE_BUDGET_S, self.plan.spec.health_check.timeout_s)
        done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
        passed = set()
        for ref in done:
            try:
                ray.get(ref)
            except Exception:  # an unhealthy replica: probed again next time
                continue
            passed.add(refs[ref])
        return passed

    def _desired(self, now: float) -> int:
        cfg = self.plan.spec.autoscaling
        if cfg is None:
            return self.plan.spec.replicas
        saved = self.mem.autoscaler or {"desired": self.plan.desired_start}
        scaler = Autoscaler(
            cfg,
            int(saved["desired"]),
            _samples=deque((float(t), float(v)) for t, v in saved.get("samples", [])),
            _above_since=saved.get("above"),
            _below_since=saved.get("below"),
        )
        ongoing = sum(self.router_stats().get("ongoing", {}).values())
        desired = scaler.observe(now, float(ongoing))
        self.mem.autoscaler = {
            "desired": scaler.desired,
            "samples": [list(s) for s in scaler._samples],
            "above": scaler._above_since,
            "below": scaler._below_since,
        }
        return desired

    def router_stats(self) -> dict[str, Any]:
        return router_stats(self.plan.name)

    # ---- apply -----------------------------------------------------------------------------

    def apply(self, actions: Sequence[c.Action]) -> None:
        old = {role: self.mem.targets.get(role, 0) for role in ROLES}
        new = dict(old)
        weight = self.mem.weight
        finishing = False
        for a in actions:
            if isinstance(a, c.ScaleTo):
                new[a.version] = a.replicas
            elif isinstance(a, c.SetWeight):
                weight = a.candidate_weight
            elif isinstance(a, c.Finish):
                finishing = True
        ups = {r for r in ROLES if new[r] > old[r]}
        downs = {r for r in ROLES if new[r] < old[r]}
        started = time.time()
        if ups:
            self._check_gpus({r: new[r] - old[r] for r in ups})
        first = {r: (new[r] if r in ups else old[r]) for r in ROLES}
        if weight != self.mem.weight or ups:
            stamp = self._deploy(first, weight)
            if stamp is not None and weight != self.mem.weight:
                self._wait_for_router(stamp)
            done = time.time()
            if weight != self.mem.weight:
                self._applied(f"weight {weight:.4f}", done, started)
            for r in sorted(ups):
                self._applied(f"scale {r} to {new[r]}", done, started)
        if downs or finishing:
            begun = time.time()
            self._deploy(new, weight)
            done = time.time()
            for r in sorted(downs):
                self._applied(f"scale {r} to {new[r]}", done, begun)
        for a in actions:
            if isinstance(a, c.Finish):
                self._applied(f"finish {a.outcome.value}", time.time(), time.time())
        self.mem.targets = new
        self.mem.weight = weight

    def _applied(self, action: str, done: float, began: float) -> None:
        seconds = round(max(0.0, done - began), 4)
        self.events.append(h.ActionApplied(t=done, action=action, seconds=seconds))

    def _check_gpus(self, added: dict[str, int]) -> None:
        """Before a scale-up: say in the history when the cluster lacks GPUs for it."""
        import ray

        need = sum(n * self.plan.gpus(role) for role, n in added.items())
        if need <= 0:
            return
        free = float(ray.available_resources().get("GPU", 0.0))
        # draining replicas give their GPUs back within their graceful shutdown
        freeing = sum(self.counts.get(r, {}).get("draining", 0) * self.plan.gpus(r) for r in ROLES)
        if need <= free + freeing + 1e-9:
            return
        role = max(added, key=lambda r: added[r] * self.plan.gpus(r))
        per = self.plan.gpus(role) or 1.0
        short = min(added[role], math.ceil((need - free) / per - 1e-9))
        deadline = self.plan.spec.rollout_policy().progress_deadline_seconds
        self.events.append(
            h.Waiting(
                t=time.time(),
                reason=(
                    f"{short} {role} replicas wait for a free GPU: the step needs {need:g} GPUs "
                    f"and the cluster has {free:g} free; the step fails after its progress "
                    f"deadline of {deadline:g} s unless GPUs free up"
                ),
            )
        )

    def _router_config(self, targets: dict[str, int], weight: float) -> dict[str, Any]:
        routes = []
        for role, share in ((c.CURRENT, 1.0 - weight), (c.CANDIDATE, weight)):
            app = self.plan.app(role)
            if app is None or share <= 1e-9 or targets.get(role, 0) == 0:
                continue
            routes.append(
                {
                    "version": self.plan.version(role),
                    "app": app,
                    "deployment": self.plan.deployment(role),
                    "weight": round(share, 6),
                }
            )
        spec = self.plan.spec
        return {
            "name": self.plan.name,
            "route_prefix": spec.http.route_prefix,
            "import_path": ROUTER_IMPORT,
            "args": {},
            "runtime_env": {"env_vars": dict(ROUTER_ENV)},
            "deployments": [
                {
                    "name": ROUTER_DEPLOYMENT,
                    "num_replicas": spec.router.replicas,
                    # reconfigure every replica at once (Serve's default is 20 % at a time)
                    "rolling_update_percentage": 1.0,
                    "logging_config": {"enable_access_log": False},  # the versions log them
                    "user_config": {},
                }
            ],
            "_routes": routes,
        }

    def _deploy(self, targets: dict[str, int], weight: float) -> int | None:
        """Write the whole declarative config with these counts and weight; returns the router
        config stamp when the routes changed (None: nothing changed, e.g. a replayed step)."""
        with config_lock():
            details = cluster.serve_client().get_serve_details()
            apps = declarative_apps(details)
            before = copy.deepcopy(apps)
            for role in ROLES:
                app, template = self.plan.app(role), self.plan.template(role)
                if app is None or template is None:
                    continue
                if targets.get(role, 0) > 0:
                    conf = copy.deepcopy(template)
                    conf["deployments"][0]["num_replicas"] = targets[role]
                    apps[app] = conf
                else:
                    apps.pop(app, None)
            router = self._router_config(targets, weight)
            routes = router.pop("_routes")
            stamp = None
            if routes != router_routes(before.get(self.plan.name)):
                stamp = time.time_ns() // 1000
                router["deployments"][0]["user_config"] = self._user_config(stamp, routes)
                apps[self.plan.name] = router
            elif self.plan.name in before:
                apps[self.plan.name] = before[self.plan.name]
            else:
                router["deployments"][0]["user_config"] = self._user_config(0, routes)
                apps[self.plan.name] = router
            if apps != before:
                deploy_config(apps)
            self._router_actors = router_actor_names(self.plan.name, details)
            return stamp

    def _user_config(self, stamp: int, routes: list[dict[str, Any]]) -> dict[str, Any]:
        # the metric guard judges the router's window: its own when it has one
        guard = self.plan.spec.policy.guard
        window = guard.window_s if guard else self.plan.spec.router.metrics_window_s
        return {"stamp": stamp, "routes": routes, "window_s": window}

    def _wait_for_router(self, stamp: int) -> None:
        """Until every running router replica has taken the new routes."""
        wait_for_stamp(self.plan.name, stamp, ACK_TIMEOUT_S, ACK_POLL_S, self._router_actors)
