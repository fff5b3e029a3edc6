"""The cluster's declarative Serve config, read and rewritten: pure functions over Serve's
details JSON, no Ray.

Layout on the cluster: one Serve application per version (`{name}_{version}`, one GPU
deployment each) and a router application (`{name}`) in front that splits traffic by the
controller's weight. Every change is declarative (`deploy_apps` with the whole
multi-application config), because a repeated `serve.run` restarts every replica; replica
counts and router weights are lightweight fields, so no running replica restarts. An
application scaled to zero is dropped from the config, which deletes it.
"""

from __future__ import annotations

import copy
from typing import Any

from executor.plan import ROLES, Plan


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
    plan: Plan, apps: dict[str, dict[str, Any]], targets: dict[str, int]
) -> dict[str, dict[str, Any]]:
    """`apps` with the plan's version applications at these replica counts (0: removed)."""
    out = copy.deepcopy(apps)
    for role in ROLES:
        app, template = plan.app(role), plan.template(role)
        if app is None or template is None:
            continue
        if targets.get(role, 0) > 0:
            conf = copy.deepcopy(template)
            conf["deployments"][0]["num_replicas"] = targets[role]
            out[app] = conf
        else:
            out.pop(app, None)
    return out
