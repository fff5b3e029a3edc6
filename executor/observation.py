"""Serve's details JSON → the controller's per-version counts: pure, no Ray.

A replica is **ready** when Serve reports it RUNNING and one health probe (its `check_health`,
called on that very replica by the backend) has passed; STARTING, unprobed or failing ones are
**starting**; STOPPING ones that were placed on a node are **draining** (they still hold a GPU),
and so are replicas Serve stopped listing whose GPU Ray has not given back yet. A STARTING
replica that was never placed while the cluster has too few free GPUs **waits for a GPU**.

**Failed starts** (`VersionObservation.failed_starts`, cumulative per version) count:

- a replica that stopped or vanished before it was ever ready, unless the backend had just
  scaled the version down (Serve stops a replica whose constructor or first health check
  raised: STARTING → STOPPING → gone, then starts a new one);
- Serve reporting the deployment UNHEALTHY (replicas failing their health checks): one per
  time it turns so;
- Serve reporting the deployment DEPLOY_FAILED: Serve has stopped retrying (after 3 failed
  starts per target replica), so no replica will ever come; it counts as the whole budget
  (`max_start_failures + 1`), and the step fails at once instead of at its deadline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from executor.plan import ROLES, Memory, Plan
from rollout import controller as c
from rollout.capacity import replicas_fitting

# a replica placed a moment ago can still lack a node in Serve's details while the GPU count
# already shows it: only one unplaced for this long counts as waiting for a GPU
PLACEMENT_GRACE_S = 2.0
RELEASE_LINGER_S = 10.0  # longest a dropped replica may still count as holding its GPU
RUNNING = ("RUNNING", "UPDATING")
FAILED = ("DEPLOY_FAILED", "UNHEALTHY")


@dataclass(frozen=True)
class Snapshot:
    """One look at the cluster: Serve's details and Ray's GPU counts."""

    time: float
    details: dict[str, Any]
    free_gpus: float
    total_gpus: float


def deployment(plan: Plan, role: str, details: dict[str, Any]) -> dict[str, Any]:
    app, dep = plan.app(role), plan.deployment(role)
    if app is None or dep is None:
        return {}
    info = details.get("applications", {}).get(app) or {}
    return dict(info.get("deployments", {}).get(dep) or {})


def listed_gpus(details: dict[str, Any]) -> float:
    """GPUs held by every replica Serve lists on a node, across all applications."""
    total = 0.0
    for app in details.get("applications", {}).values():
        for dep in app.get("deployments", {}).values():
            options = (dep.get("deployment_config") or {}).get("ray_actor_options") or {}
            per = float(options.get("num_gpus") or 0)
            total += per * sum(1 for r in dep.get("replicas", []) if r.get("node_id"))
    return total


def capacity(plan: Plan, snap: Snapshot, seen: dict[str, c.VersionObservation]) -> int | None:
    """Replicas' worth of GPUs the cluster can give the pool (`Observation.capacity`, which
    caps the pool's size so that a step's surge fits): the free GPUs plus those the pool's
    replicas hold, at the new version's GPUs per replica; None when a replica needs no GPU.

    The pool holds a GPU for every replica counted ready, starting or draining, except those
    waiting for a GPU. A replica placed a moment ago may not show its node yet while Ray
    already counts its GPU as used, and one just unplaced may show it free already: counting
    such replicas as held errs towards a larger capacity for an instant (a step that waits a
    moment), never a smaller one (a cap that would shrink the serving version for nothing).
    GPUs held by anything else (other applications, placement groups) are not the pool's."""
    per = plan.gpus(c.CANDIDATE)
    if per <= 0:
        return None
    held = sum(plan.gpus(r) * max(0, v.holding - v.pending_gpu) for r, v in seen.items())
    return replicas_fitting(snap.free_gpus + held, per)


def scaling_of(app: dict[str, Any]) -> dict[str, Any]:
    """How Serve sizes one version application now, from its details: `running` replicas,
    Serve's `target` and who sets it (`serve`: its autoscaling between bounds; `fixed`:
    `num_replicas` or bounds pinned to one count, as a rollout's controller writes them)."""
    deps = list(app.get("deployments", {}).values())
    dep = deps[0] if deps else {}
    conf = (dep.get("deployment_config") or {}).get("autoscaling_config")
    running = sum(1 for r in dep.get("replicas", []) if _value(r.get("state")) == "RUNNING")
    out: dict[str, Any] = {
        "running": running,
        "target": int(dep.get("target_num_replicas") or 0),
        "scaled_by": "serve" if conf and conf["min_replicas"] < conf["max_replicas"] else "fixed",
    }
    if conf:
        out.update(min_replicas=conf.get("min_replicas"), max_replicas=conf.get("max_replicas"))
    return out


def to_probe(plan: Plan, mem: Memory, details: dict[str, Any]) -> list[dict[str, Any]]:
    """The running replicas of both versions whose health probe has not passed yet."""
    out = []
    for role in ROLES:
        app = plan.app(role)
        probed = set(mem.probed.get(app or "", []))
        for r in deployment(plan, role, details).get("replicas", []):
            if r["state"] in RUNNING and r["replica_id"] not in probed:
                out.append(r)
    return out


def observe(
    plan: Plan, mem: Memory, snap: Snapshot, passed: set[str]
) -> tuple[dict[str, c.VersionObservation], dict[str, dict[str, int]]]:
    """Both versions' counts from one snapshot, and the counts `rollout status` shows; `passed`
    holds the replica ids whose probe passed just now. Updates `mem` (the step's copy)."""
    # GPUs in use that no listed replica accounts for: replicas Serve already dropped whose
    # actors have not yet given their GPU back (or other work on the cluster)
    unaccounted = [max(0.0, snap.total_gpus - snap.free_gpus - listed_gpus(snap.details))]
    seen, counts = {}, {}
    for role in ROLES:
        seen[role], counts[role] = _version(plan, mem, role, snap, passed, unaccounted)
    return seen, counts


def _version(
    plan: Plan,
    mem: Memory,
    role: str,
    snap: Snapshot,
    passed: set[str],
    unaccounted: list[float],
) -> tuple[c.VersionObservation, dict[str, int]]:
    app = plan.app(role)
    if app is None:
        return c.VersionObservation(), {"ready": 0, "starting": 0, "draining": 0, "pending_gpu": 0}
    dep = deployment(plan, role, snap.details)
    reps = list(dep.get("replicas", []))
    probed = set(mem.probed.get(app, [])) | passed
    unready = set(mem.unready.get(app, []))
    ready = starting = draining = unplaced = 0
    live_ids: set[str] = set()
    now = snap.time
    for r in reps:
        rid, state, placed = r["replica_id"], r["state"], bool(r.get("node_id"))
        if state == "STOPPING":
            draining += placed  # a replica never placed holds no GPU
            continue
        live_ids.add(rid)
        if state in RUNNING and rid in probed:
            ready += 1
            unready.discard(rid)
            continue
        unready.add(rid)
        starting += 1
        key = f"{app}/{rid}"
        if placed:
            mem.unplaced_since.pop(key, None)
        else:
            since = mem.unplaced_since.setdefault(key, now)
            unplaced += now - since >= PLACEMENT_GRACE_S
    failed = 0
    # a replica that stopped or vanished before it was ever ready failed to start, unless the
    # backend scaled the version down since the last observation
    gone = unready - live_ids
    if gone and mem.targets.get(role, 0) >= mem.live.get(app, 0):
        failed += len(gone)
    unready -= gone
    status = _value(dep.get("status", ""))
    if status in FAILED and mem.serve_failed.get(app) != status:
        failed += plan.spec.rollout_policy().max_start_failures + 1 if status == FAILED[0] else 1
    if status in FAILED:
        mem.serve_failed[app] = status
    else:
        mem.serve_failed.pop(app, None)
    if failed:
        mem.failed_starts[role] = mem.failed_starts.get(role, 0) + failed
    mem.probed[app] = sorted(probed & {r["replica_id"] for r in reps})
    mem.unready[app] = sorted(unready)
    mem.live[app] = len(live_ids)
    for key in list(mem.unplaced_since):
        if key.startswith(f"{app}/") and key.split("/", 1)[1] not in live_ids:
            del mem.unplaced_since[key]
    per = plan.gpus(role)
    draining += _releasing(mem, app, reps, now, per, unaccounted)
    pending_gpu = unplaced if per > 0 and snap.free_gpus + 1e-9 < per else 0
    counts = dict(ready=ready, starting=starting, draining=draining, pending_gpu=pending_gpu)
    return c.VersionObservation(**counts, failed_starts=mem.failed_starts.get(role, 0)), counts


def _value(status: Any) -> str:
    """A status as its name: Serve's client hands its details over with enum members (str
    enums, whose `str()` is `DeploymentStatus.X`), the recorded JSON with plain strings."""
    return str(getattr(status, "value", status))


def _releasing(
    mem: Memory,
    app: str,
    reps: list[dict[str, Any]],
    now: float,
    per: float,
    unaccounted: list[float],
) -> int:
    """Replicas Serve no longer lists whose GPUs Ray still counts as in use: they drain on.

    Serve drops a stopped replica from its details a moment before Ray returns the replica's
    GPU; counting it as draining until then keeps the mode's bound true in GPUs.
    """
    placed = {r["replica_id"] for r in reps if r.get("node_id")}
    for rid in set(mem.placed.get(app, [])) - placed:
        mem.released.setdefault(f"{app}/{rid}", now)
    mem.placed[app] = sorted(placed)
    for key in [k for k in mem.released if k.startswith(f"{app}/")]:
        if now - mem.released[key] > RELEASE_LINGER_S:
            del mem.released[key]
    mine = [k for k in mem.released if k.startswith(f"{app}/")]
    if per <= 0 or not mine:
        return 0
    held = min(len(mine), int(unaccounted[0] / per + 1e-9))
    unaccounted[0] -= held * per
    if held == 0:
        for key in mine:
            del mem.released[key]
    return held
