"""The cluster's declarative Serve config, read and rewritten: pure functions over Serve's
details JSON, no Ray.

Layout on the cluster: one Serve application per version (`{name}_{version}`, one GPU
deployment each) at its own hidden route prefix (`/_rollout/{name}_{version}`); the router in
Serve's HTTP proxies splits the model's public prefix between them (executor/router.py). Every
change is declarative (`deploy_apps` with the whole multi-application config), because a
repeated `serve.run` restarts every replica; replica counts are lightweight fields, so no
running replica restarts. An application scaled to zero is dropped from the config, which
deletes it.

Who sizes a version is in its config too. A version with an `autoscaling` block always carries
an `autoscaling_config`: Serve's own between rollouts, and the same one pinned at the
controller's count (`min_replicas = max_replicas = initial_replicas = n`) while a rollout
drives it. Never `num_replicas` instead: Serve 2.60 hashes the deployments' autoscaling
policies into the application's code version (`get_app_code_version`), and a switch between
`num_replicas` and `autoscaling_config` changes that list ([] ↔ [None]), so Serve rebuilds the
application and replaces every replica (measured: the only replica stopped before its
successor ran). A change of bounds is lightweight; Serve registers the new config and takes
`initial_replicas` as the target, so the hand-over either way keeps every replica running.
A version without `autoscaling` keeps a plain `num_replicas`.
"""

from __future__ import annotations

import copy
from typing import Any

from executor.plan import ROLES, Plan
from executor.routing import hidden_prefix
from rollout.controller import CANDIDATE


def declarative_apps(details: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The applications deployed from configs (those a new config would otherwise delete)."""
    out = {}
    for name, app in details.get("applications", {}).items():
        conf = app.get("deployed_app_config")
        if conf and app.get("source") == "declarative" and app.get("status") != "DELETING":
            out[name] = conf
    return out


def live_versions(name: str, details: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Version label → Serve's details of each of a model's live version applications."""
    out = {}
    for app_name, app in details.get("applications", {}).items():
        if not app_name.startswith(f"{name}_") or app.get("status") == "DELETING":
            continue
        out[app_name.removeprefix(f"{name}_")] = app
    return out


def with_versions(
    plan: Plan,
    apps: dict[str, dict[str, Any]],
    targets: dict[str, int],
    hand_back: frozenset[str] = frozenset(),
) -> dict[str, dict[str, Any]]:
    """`apps` with the plan's version applications at these replica counts (0: removed), held
    there for the controller; the roles in `hand_back` go to Serve's autoscaling instead,
    starting at that count."""
    out = copy.deepcopy(apps)
    for role in ROLES:
        app, template = plan.app(role), plan.template(role)
        if app is None or template is None:
            continue
        n = targets.get(role, 0)
        if n <= 0:
            out.pop(app, None)
            continue
        conf = copy.deepcopy(template)
        conf["route_prefix"] = hidden_prefix(app)  # where the router sends the version's share
        dep = conf["deployments"][0]
        scaling = autoscaling_of(plan, role, n)
        dep.pop("autoscaling_config", None)
        dep.pop("num_replicas", None)
        if scaling is None:
            dep["num_replicas"] = n
        elif role in hand_back:
            dep["autoscaling_config"] = scaling
        else:  # pinned: Serve's autoscaler can only hold n
            dep["autoscaling_config"] = scaling | dict.fromkeys(
                ("min_replicas", "max_replicas", "initial_replicas"), n
            )
        out[app] = conf
    return out


def autoscaling_of(plan: Plan, role: str, replicas: int) -> dict[str, Any] | None:
    """Serve's `autoscaling_config` for a version handed back at `replicas` (None: the version
    has none and stays at a fixed count). The new version scales by its deploy file's
    `autoscaling`; the old one by the config it was deployed with, so a cancelled rollout
    leaves it as it was."""
    if role == CANDIDATE:
        cfg = plan.spec.autoscaling
        return None if cfg is None else cfg.to_serve(initial_replicas=replicas)
    template = plan.template(role) or {"deployments": [{}]}
    old = template["deployments"][0].get("autoscaling_config")
    if not old:
        return None
    lo, hi = int(old.get("min_replicas", 1)), int(old.get("max_replicas", 1))
    return {**old, "initial_replicas": max(lo, min(hi, replicas))}
