"""The executor's one boundary to the router: the router application's config, the wait for
its replicas to take a new weight, and the traffic they count.

Everything the backend knows of how traffic is split goes through these five functions, so the
router can change (another router, or routing inside Serve's HTTP proxy) by changing this
module alone. Today the router is executor/router.py: a Serve application at the model's
route prefix whose `user_config` carries the routes with a stamp; a weight counts as applied
once every running router replica reports that stamp (executor/router_client.py).
"""

from __future__ import annotations

import time
from typing import Any

from executor import router_client, serve_calls
from executor.plan import Plan
from executor.router import DEPLOYMENT as ROUTER_DEPLOYMENT
from executor.router_metrics import guard_traffic
from rollout import controller as c
from rollout.driver import BackendError
from rollout.guard import Traffic

ROUTER_IMPORT = "executor.router:app"
# The router is all non-blocking asyncio: its replicas run its code and its handles' routing on
# the replica's own event loop (Serve's throughput settings), saving two thread hops a message.
ROUTER_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
}
ACK_TIMEOUT_S = 20.0
ACK_POLL_S = 0.005  # how often the router replicas are asked whether they took a new config


def routes(config: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The routes a router application config carries."""
    if not config:
        return []
    return list(config["deployments"][0].get("user_config", {}).get("routes", []))


def stamp(config: dict[str, Any] | None) -> int:
    if not config:
        return -1
    return int(config["deployments"][0].get("user_config", {}).get("stamp", -1))


def router_app(
    plan: Plan, targets: dict[str, int], weight: float, deployed: dict[str, Any] | None
) -> dict[str, Any]:
    """The router application for this weight (pure): the deployed one unchanged when it
    already routes so, else a new config with a new stamp. A version with no replica gets no
    route."""
    table = []
    for role, share in ((c.CURRENT, 1.0 - weight), (c.CANDIDATE, weight)):
        app = plan.app(role)
        if app is None or share <= 1e-9 or targets.get(role, 0) == 0:
            continue
        table.append(
            {
                "version": plan.version(role),
                "app": app,
                "deployment": plan.deployment(role),
                "weight": round(share, 6),
            }
        )
    if deployed is not None and routes(deployed) == table:
        return deployed
    spec = plan.spec
    guard = spec.policy.guard  # the metric guard judges the router's window: its own if set
    user_config = {
        "stamp": time.time_ns() // 1000,
        "routes": table,
        "window_s": guard.window_s if guard else spec.router.metrics_window_s,
    }
    return {
        "name": plan.name,
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
                "user_config": user_config,
            }
        ],
    }


def confirm(plan: Plan, config: dict[str, Any], timeout_s: float = ACK_TIMEOUT_S) -> float:
    """Wait until every running router replica routes by `config`; the seconds it took. Called
    before any scale-down, also when the config was already deployed (a re-run after a crash or
    a timed-out acknowledgement), so no replica is removed while a router still sends to it."""
    want = stamp(config)

    def wait() -> float:
        return router_client.wait_for_stamp(plan.name, want, timeout_s, ACK_POLL_S)

    return serve_calls.bounded(wait, timeout_s + 15.0, "the router")


def ongoing(plan: Plan) -> float:
    """Requests in flight at the model's router replicas, both versions together (0 when
    there is no router yet, or it does not answer)."""

    def read() -> float:
        names = router_client.router_actor_names(plan.name, serve_calls.details())
        view = router_client.read_router(names)
        return float(sum(view.ongoing.values()))

    try:
        return serve_calls.bounded(read, router_client.CALL_TIMEOUT_S + 15.0, "the router")
    except BackendError:
        return 0.0


def traffic(plan: Plan) -> dict[str, Traffic]:
    """Each role's traffic over the router's metrics window, for the metric guard; empty while
    no router replica answers, so the guard sees too few requests rather than a failure."""

    def read() -> dict[str, Any]:
        names = router_client.router_actor_names(plan.name, serve_calls.details())
        return router_client.read_router(names).snapshot

    try:
        snapshot = serve_calls.bounded(read, router_client.CALL_TIMEOUT_S + 15.0, "the router")
    except BackendError:
        snapshot = {}
    return guard_traffic(snapshot, {role: plan.version(role) for role in (c.CURRENT, c.CANDIDATE)})
