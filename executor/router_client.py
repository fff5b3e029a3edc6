"""Reading a model's router replicas from the executor: config acknowledgements and traffic.

A Serve handle call reaches one replica of its choosing, but the executor needs every router
replica: the autoscaler sums their ongoing requests, a weight change counts as applied only once
each running replica has taken it, and windowed metrics merge all of them. So each running
router replica is called directly on its actor, through the replica's `record_routing_stats`
hook (executor/router.py answers it with its stamp, weights and metrics snapshot).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from executor.router import DEPLOYMENT
from executor.router_metrics import VersionMetrics, merge, summarize

CALL_TIMEOUT_S = 5.0
_ACTORS: dict[str, Any] = {}  # actor name → handle (a lookup costs a GCS round trip)


@dataclass(frozen=True)
class RouterView:
    """What the running router replicas of one model reported, together."""

    stamps: list[int]  # the config stamp each answering replica has applied
    snapshot: dict[str, Any] = field(default_factory=dict)  # merged metrics window

    @property
    def ongoing(self) -> dict[str, int]:
        return dict(self.snapshot.get("ongoing", {}))

    def metrics(self) -> dict[str, VersionMetrics]:
        return summarize(self.snapshot)


def router_actor_names(name: str, details: dict[str, Any]) -> list[str]:
    """The actor names of the model's RUNNING router replicas, from Serve's details."""
    app = details.get("applications", {}).get(name) or {}
    dep = app.get("deployments", {}).get(DEPLOYMENT) or {}
    return [r["actor_name"] for r in dep.get("replicas", []) if r.get("state") == "RUNNING"]


def _actor(actor_name: str) -> Any:
    import ray

    if actor_name not in _ACTORS:
        _ACTORS[actor_name] = ray.get_actor(actor_name, namespace="serve")
    return _ACTORS[actor_name]


def read_router(actor_names: list[str], timeout_s: float = CALL_TIMEOUT_S) -> RouterView:
    """Ask each router replica at once; a replica that is gone or slow is left out."""
    import ray

    refs = {}
    for actor_name in actor_names:
        try:
            refs[_actor(actor_name).record_routing_stats.remote()] = actor_name
        except ValueError:  # gone since Serve listed it
            _ACTORS.pop(actor_name, None)
    done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s) if refs else ([], [])
    got = []
    for ref in done:
        try:
            got.append(ray.get(ref))
        except Exception:  # died meanwhile; a replacement will be listed
            _ACTORS.pop(refs[ref], None)
    return RouterView(
        stamps=[int(s.get("stamp", -1)) for s in got],
        snapshot=merge(got),
    )


def wait_for_stamp(
    name: str, stamp: int, timeout_s: float, every_s: float, actor_names: list[str] | None = None
) -> float:
    """Poll the model's running router replicas until every one that answers has applied
    `stamp` (a replica still starting reads the new config when it starts); returns the
    seconds it took. Replicas are listed again when none is known yet or one went away."""
    from executor.cluster import serve_client

    started = time.monotonic()
    names = list(actor_names or [])
    while True:
        if not names:
            names = router_actor_names(name, serve_client().get_serve_details())
        view = read_router(names, timeout_s=min(CALL_TIMEOUT_S, timeout_s))
        if view.stamps and set(view.stamps) == {stamp}:
            return time.monotonic() - started
        if len(view.stamps) < len(names):
            names = []
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(
                f"the router did not take the new weights within {timeout_s:g} s "
                f"(its replicas report stamps {sorted(view.stamps)}, not {stamp})"
            )
        time.sleep(every_s)
