"""The executor's one boundary to the router: the model's route table, the wait for every
proxy to take a new one, and the traffic the proxies count.

Everything the backend knows of how traffic is split goes through these functions, so the
router can change by changing this module alone. The router runs inside each of Serve's HTTP
proxies (executor/router.py) and reads each model's route table from Ray's key-value store
(executor/router_client.py); a weight counts as applied once every live proxy reports the
table's stamp. Each version is a Serve application at its own hidden route prefix
(executor/routing.py), which `with_versions` (executor/serve_config.py) gives it.
"""

from __future__ import annotations

import time
from typing import Any

from executor import router_client, router_metrics, serve_calls
from executor.plan import Plan
from executor.router_metrics import guard_traffic
from rollout import controller as c
from rollout.driver import BackendError
from rollout.guard import Traffic

ACK_TIMEOUT_S = 20.0
ACK_POLL_S = 0.005  # how often the proxies' reports are read while waiting for new weights
DRAIN_POLL_S = 0.02  # ... and while waiting for a removed version's requests to end


def route_table(
    plan: Plan, targets: dict[str, int], weight: float, session_weight: float
) -> dict[str, Any]:
    """The model's route table for these weights (pure; `publish` stamps it). A version with
    no replica gets no route. With sticky sessions on, the table also carries the candidate's
    share of sessions and which version is the candidate (executor/routing.py)."""
    routes = []
    for role, share in ((c.CURRENT, 1.0 - weight), (c.CANDIDATE, weight)):
        app = plan.app(role)
        if app is None or share <= 1e-9 or targets.get(role, 0) == 0:
            continue
        routes.append({"version": plan.version(role), "app": app, "weight": round(share, 6)})
    spec = plan.spec
    sticky = spec.routing.sticky
    sessions = None
    if sticky is not None:
        sessions = {
            "header": sticky.header,
            "cookie": sticky.cookie,
            "max_age_s": sticky.max_age_s,
            "candidate": plan.version(c.CANDIDATE),
            "weight": round(session_weight, 6),
        }
    guard = spec.policy.guard  # the metric guard judges the router's window: its own if set
    live = [plan.version(r) for r in (c.CURRENT, c.CANDIDATE) if plan.app(r) and targets.get(r)]
    return {
        "prefix": spec.http.route_prefix,
        "routes": routes,
        # the proxies forget the metrics of other versions: a label rolled out again (after a
        # cancel) is judged by the guard on its new answers only
        "live": live,
        "window_s": guard.window_s if guard else spec.router.metrics_window_s,
        "sessions": sessions,
    }


def publish(plan: Plan, table: dict[str, Any]) -> int:
    """Store `table` unless the stored one already says the same; the stamp the proxies must
    report either way (a re-run after a crash finds its table stored, and still waits)."""

    def write() -> int:
        old = router_client.read_table(plan.name) or {}
        if "stamp" in old and {k: old.get(k) for k in table} == table:
            return int(old["stamp"])
        return router_client.write_table(plan.name, table)

    return serve_calls.bounded(write, router_client.CALL_TIMEOUT_S + 15.0, "Ray's key-value store")


def confirm(plan: Plan, stamp: int, timeout_s: float = ACK_TIMEOUT_S) -> float:
    """Wait until every live proxy routes by the table `stamp`; the seconds it took. Called
    before any scale-down, also when the table was already stored (a re-run after a crash or a
    timed-out acknowledgement), so no replica is removed while a proxy still sends to it."""

    def wait() -> float:
        return router_client.wait_for_stamp(plan.name, stamp, timeout_s, ACK_POLL_S)

    return serve_calls.bounded(wait, timeout_s + 15.0, "the router")


def drain(plan: Plan, versions: list[str], timeout_s: float) -> float:
    """Wait until no proxy has a request to these versions in flight, at most `timeout_s`; the
    seconds it took. Called before a version's application is removed, after the router took
    its weight away: a request the proxy still queues for one of its replicas would otherwise
    wait for a replica that never comes."""

    def wait() -> float:
        started = time.monotonic()
        details = serve_calls.details()
        while True:
            ongoing = router_client.read_router(plan.name, details).ongoing
            waited = time.monotonic() - started
            if not any(ongoing.get(v, 0) for v in versions) or waited > timeout_s:
                return waited
            time.sleep(DRAIN_POLL_S)

    try:
        return serve_calls.bounded(wait, timeout_s + 15.0, "the router")
    except BackendError:  # the proxies cannot be read: Serve's graceful shutdown still applies
        return 0.0


def remove(name: str) -> None:
    """Forget a model's route table (`down`): the proxies stop routing its prefix."""
    router_client.delete_table(name)


def ongoing(plan: Plan) -> float:
    """Requests in flight at the model's router (all proxies), both versions together (0 when
    no proxy has reported, or they cannot be read)."""

    def read() -> float:
        view = router_client.read_router(plan.name, serve_calls.details())
        return float(sum(view.ongoing.values()))

    try:
        return serve_calls.bounded(read, router_client.CALL_TIMEOUT_S + 15.0, "the router")
    except BackendError:
        return 0.0


def snapshot(plan: Plan) -> dict[str, Any]:
    """The proxies' merged metrics snapshot (executor/router_metrics.py); empty while none can
    be read."""

    def read() -> dict[str, Any]:
        return router_client.read_router(plan.name, serve_calls.details()).snapshot

    try:
        return serve_calls.bounded(read, router_client.CALL_TIMEOUT_S + 15.0, "the router")
    except BackendError:
        return {}


def traffic(plan: Plan, snap: dict[str, Any]) -> dict[str, Traffic]:
    """Each role's traffic in a `snapshot`, for the metric guard; with no proxy
    reporting the guard sees too few requests rather than a failure."""
    return guard_traffic(snap, {role: plan.version(role) for role in (c.CURRENT, c.CANDIDATE)})


def split(snap: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Each version's share of the window's requests and of the active sticky sessions."""
    return router_metrics.split(snap)
