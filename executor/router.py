"""The router application: one small CPU deployment in front of every version of a model.

Serve itself has no weighted split between deployments (it was removed with the 1.x endpoints
API), so the executor puts this router in front: each request goes to one version, chosen at
random by the controller's weights, which arrive as the router's `user_config` (a lightweight,
non-restarting update). It never routes to a version whose weight is 0: the controller gives a
version weight only while it has ready replicas, and a handle call to a deployment with no
replica would block. It counts ongoing requests per version for the pooled autoscaler.

Versions receive a plain dict (`{"method", "path", "query", "json"}`), since a starlette
Request cannot travel through a deployment handle.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from typing import Any

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

DEPLOYMENT = "Router"


@serve.deployment(
    name=DEPLOYMENT,
    ray_actor_options={"num_cpus": 0.05},
    max_ongoing_requests=1000,
    health_check_period_s=2,
)
class Router:
    def __init__(self) -> None:
        self.stamp = -1
        self.routes: list[dict[str, Any]] = []
        self.handles: dict[str, Any] = {}
        self.ongoing: Counter[str] = Counter()
        self.served: Counter[str] = Counter()
        self.reconfigured_at = 0.0

    def reconfigure(self, config: dict[str, Any]) -> None:
        """`{"stamp": n, "routes": [{"version", "app", "deployment", "weight"}, ...]}`."""
        routes = [r for r in config.get("routes", []) if float(r["weight"]) > 0]
        for r in routes:
            if r["app"] not in self.handles:
                self.handles[r["app"]] = serve.get_deployment_handle(r["deployment"], r["app"])
        self.routes = routes
        self.stamp = int(config.get("stamp", 0))
        self.reconfigured_at = time.time()

    def stats(self) -> dict[str, Any]:
        """What the executor reads: the config stamp applied, and requests per version."""
        return {
            "stamp": self.stamp,
            "ongoing": dict(self.ongoing),
            "served": dict(self.served),
            "weights": {r["version"]: float(r["weight"]) for r in self.routes},
        }

    def _choose(self) -> dict[str, Any] | None:
        if not self.routes:
            return None
        if len(self.routes) == 1:
            return self.routes[0]
        weights = [float(r["weight"]) for r in self.routes]
        return random.choices(self.routes, weights=weights)[0]

    async def __call__(self, request: Request) -> Any:
        route = self._choose()
        if route is None:
            return JSONResponse({"error": "no version is ready to serve"}, status_code=503)
        body = await request.body()
        try:
            payload = json.loads(body) if body else None
        except ValueError:
            return JSONResponse({"error": "the request body is not JSON"}, status_code=400)
        forwarded = {
            "method": request.method,
            "path": request.url.path,
            "query": dict(request.query_params),
            "json": payload,
        }
        version = route["version"]
        self.ongoing[version] += 1
        try:
            result = await self.handles[route["app"]].remote(forwarded)
        finally:
            self.ongoing[version] -= 1
        self.served[version] += 1
        return result


def app(args: dict[str, Any]) -> serve.Application:
    """Builder named by the executor's declarative config (`executor.router:app`)."""
    return Router.bind()
