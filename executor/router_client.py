"""The executor's side of the router: writing a model's route table, reading the proxies.

The router runs inside every Serve HTTP proxy (executor/router.py); this module is how the
executor talks to it, through Ray's internal key-value store (the GCS, behind the cluster's
token). Writing a table changes the model's weights everywhere within a poll; the executor then
waits until every proxy reports the table's stamp before it removes replicas. Each proxy's
report carries its ongoing requests per version and its metrics window, which merge across
proxies (the autoscaler sums the ongoing counts; executor/router_metrics.py reads the windows).

Which proxies count: those Serve lists for the cluster's nodes. A listed proxy that has not
reported yet has not read the tables yet, and will read the current ones before it serves; a
proxy Serve no longer calls healthy, or whose report has not moved for STALE_S seconds of this
process's clock, is gone and is not waited for.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from executor.router import (
    CALLBACK,
    CALLBACK_ENV,
    EPOCH_KEY,
    NAMESPACE,
    proxy_key,
    table_key,
)
from executor.router_metrics import VersionMetrics, merge, summarize
from rollout.errors import InputError

STALE_S = 5.0  # a report unchanged this long belongs to a proxy that is gone
CALL_TIMEOUT_S = 5.0  # the executor's budget for one read or write of the store
PROXY_START_TIMEOUT_S = 60.0
LIVE = ("STARTING", "HEALTHY")


@dataclass(frozen=True)
class Proxy:
    actor_id: str
    actor_name: str
    status: str
    node_ip: str


def proxies(details: dict[str, Any]) -> list[Proxy]:
    """Serve's HTTP proxies, one per node (from `get_serve_details`)."""
    return [
        Proxy(*(_text(p.get(k)) for k in ("actor_id", "actor_name", "status", "node_ip")))
        for p in (details.get("proxies") or {}).values()
    ]


def _text(value: Any) -> str:
    """A detail as text; Serve gives the status as an enum, whose str() is its class name."""
    return str(getattr(value, "value", value) or "")


def _kv() -> Any:
    from ray._private.worker import global_worker

    return global_worker.gcs_client


def write_table(model: str, table: dict[str, Any]) -> int:
    """Store the model's route table (`prefix`, `routes`, `window_s`, `sessions`) and announce
    it; returns its stamp."""
    stamp = time.time_ns() // 1000
    raw = json.dumps({**table, "model": model, "stamp": stamp}).encode()
    gcs = _kv()
    gcs.internal_kv_put(table_key(model), raw, True, NAMESPACE)
    gcs.internal_kv_put(EPOCH_KEY, str(stamp).encode(), True, NAMESPACE)
    return stamp


def read_table(model: str) -> dict[str, Any] | None:
    raw = _kv().internal_kv_get(table_key(model), NAMESPACE)
    return json.loads(raw) if raw else None


def delete_table(model: str) -> None:
    gcs = _kv()
    gcs.internal_kv_del(table_key(model), False, NAMESPACE)
    gcs.internal_kv_put(EPOCH_KEY, str(time.time_ns() // 1000).encode(), True, NAMESPACE)


def reports(ids: list[str]) -> dict[str, dict[str, Any]]:
    """The latest report of each of these proxies that has published one."""
    if not ids:
        return {}
    got = _kv().internal_kv_multi_get([proxy_key(i) for i in ids], NAMESPACE)
    prefix = len(proxy_key(""))
    return {k[prefix:].decode(): json.loads(v) for k, v in got.items()}


@dataclass(frozen=True)
class RouterView:
    """What the proxies reported for one model, together."""

    stamps: list[int]  # the table stamp each reporting proxy applies
    snapshot: dict[str, Any] = field(default_factory=dict)  # merged metrics window

    @property
    def ongoing(self) -> dict[str, int]:
        return dict(self.snapshot.get("ongoing", {}))

    def metrics(self) -> dict[str, VersionMetrics]:
        return summarize(self.snapshot)


def read_router(model: str, details: dict[str, Any]) -> RouterView:
    """The model's traffic as every live proxy reports it."""
    ids = [p.actor_id for p in proxies(details) if p.status in LIVE]
    mine = [r["models"][model] for r in reports(ids).values() if model in r.get("models", {})]
    return RouterView(stamps=[int(m["stamp"]) for m in mine], snapshot=merge(mine))


def wait_for_stamp(model: str, stamp: int, timeout_s: float, every_s: float) -> float:
    """Poll until every live proxy that has reported applies `stamp`; returns the seconds it
    took. Proxies are listed again every half second (one may start or stop meanwhile)."""
    from executor.cluster import serve_client

    started = time.monotonic()
    listed_at = -1.0
    ids: list[str] = []
    moved: dict[str, tuple[float, float]] = {}  # proxy → (its last report's t, seen at)
    while True:
        now = time.monotonic()
        if now - listed_at >= 0.5:
            ids = [p.actor_id for p in proxies(serve_client().get_serve_details())
                   if p.status in LIVE]  # fmt: skip
            listed_at = now
        behind = []
        for pid, r in reports(ids).items():
            applied = r.get("models", {}).get(model, {}).get("stamp")
            if applied == stamp:
                continue
            t, seen = moved.get(pid, (None, now))
            if r.get("t") != t:
                moved[pid] = (r.get("t"), now)
            elif now - seen > STALE_S:
                continue  # this proxy stopped reporting: gone
            behind.append(f"{pid[:8]}: {applied}")
        if not behind:
            return time.monotonic() - started
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(
                f"the router did not take the new weights within {timeout_s:g} s "
                f"(proxies report stamps {', '.join(behind)}, not {stamp})"
            )
        time.sleep(every_s)


def check_routers(timeout_s: float = PROXY_START_TIMEOUT_S) -> int:
    """Every HTTP proxy of the cluster must run the router; returns how many do.

    Waits for Serve's proxies to start (a fresh Serve instance starts them now), then expects
    a report from each healthy one: a proxy publishes one before it accepts connections.
    """
    from executor.cluster import serve_client

    deadline = time.monotonic() + timeout_s
    while True:
        listed = proxies(serve_client().get_serve_details())
        healthy = [p for p in listed if p.status == "HEALTHY"]
        if healthy and all(p.status == "HEALTHY" for p in listed if p.status in LIVE):
            break
        if time.monotonic() > deadline:
            raise InputError(f"Serve's HTTP proxies did not start within {timeout_s:g} s")
        time.sleep(0.2)
    got = reports([p.actor_id for p in healthy])
    missing = [p.node_ip or p.actor_id for p in healthy if p.actor_id not in got]
    if missing:
        raise InputError(
            f"the Serve HTTP proxy on {', '.join(missing)} does not run rollout's router: start "
            f"every node of the cluster with {CALLBACK_ENV}={CALLBACK} in the environment of "
            "`ray start` (see docs/executor.md, Authentication and what listens where)"
        )
    return len(healthy)
