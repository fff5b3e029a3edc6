"""The router application: a small CPU deployment in front of every version of a model.

Serve has no weighted split between deployments (it went with the 1.x endpoints API), so the
executor puts this router in front: each request goes to one version, chosen by the controller's
weights, which arrive as the router's `user_config` (a lightweight, non-restarting update).

It passes HTTP through unchanged. The router is a raw ASGI ingress; for each request it hands the
version's ingress deployment the very thing Serve's own HTTP proxy hands it — the ASGI scope
(method, path below the route prefix, query string, headers) and a `receive` that yields the
body — over a streaming deployment handle, and relays the version's ASGI messages (status,
headers, body chunks) to the client as they come. So any Serve application is a version as it
is (FastAPI ingress, a plain `__call__(request)`, streaming responses), and one hop costs one
Ray streaming call, not another trip through Serve's proxy. A client that goes away cancels
the version's request. Every answer carries `x-rollout-version`; with no version taking traffic
the router answers 503 with a JSON error itself. Request bodies are read whole before
forwarding (no streamed uploads), and websockets are refused (see docs/executor.md, Limits).
With sticky sessions on, a request carrying a session key goes to its session's version
(executor/routing.py), decided from the key and the config alone, so every replica agrees.

This relies on two Serve internals that Serve's proxy itself uses: a handle whose source is the
proxy (so Serve treats the call as an HTTP request) and `StreamingHTTPRequest`.

Per-version counts and windowed metrics (executor/router_metrics.py) are read by the executor
from every router replica through the replica's `record_routing_stats` hook.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import pickle
import random
import time
from typing import Any

from ray import serve
from ray.serve import context as serve_context
from ray.serve._private.common import DeploymentHandleSource, StreamingHTTPRequest
from ray.serve._private.utils import generate_request_id

from executor.router_metrics import Window
from executor.routing import Route, RouteTable

logger = logging.getLogger("ray.serve")
DEPLOYMENT = "Router"
VERSION_HEADER = b"x-rollout-version"
WINDOW_S = 60.0  # the default metrics window the executor reads


class BufferedBody:
    """The `receive` a version replica calls back: the whole request body at once, then
    nothing until the request ends (a client disconnect cancels the request instead)."""

    def __init__(self, body: bytes) -> None:
        self.messages = pickle.dumps([{"type": "http.request", "body": body, "more_body": False}])
        self.sent = False

    async def __call__(self, _metadata: Any) -> bytes:
        if not self.sent:
            self.sent = True
            return self.messages
        await asyncio.Event().wait()  # until cancelled with the request
        raise AssertionError("unreachable")


def _has_body(scope: dict[str, Any]) -> bool:
    """HTTP/1.1: a request has a body only with Content-Length > 0 or Transfer-Encoding."""
    for k, v in scope.get("headers", []):
        if k == b"transfer-encoding" or (k == b"content-length" and v.strip() not in (b"", b"0")):
            return True
    return False


async def _read_body(receive: Any) -> bytes | None:
    """The request body, or None when the client disconnected first."""
    chunks = []
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return None
        chunks.append(msg.get("body", b""))
        if not msg.get("more_body", False):
            return b"".join(chunks)


async def _answer(send: Any, status: int, payload: dict[str, Any], version: str = "") -> None:
    """An answer of the router's own: a JSON error."""
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    if version:
        headers.append((VERSION_HEADER, version.encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class _Asgi:
    """The router as an ASGI 3 app (uvicorn's lifespan runner takes a bound method for ASGI 2)."""

    def __init__(self, router: Any) -> None:
        self.router = router

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await self.router._asgi(scope, receive, send)


@serve.deployment(
    name=DEPLOYMENT,
    ray_actor_options={"num_cpus": 0.05},
    max_ongoing_requests=10_000,
    health_check_period_s=2,
)
@serve.ingress()
class Router:
    def __init__(self) -> None:
        self.table = RouteTable()
        self.handles: dict[str, Any] = {}
        self.window = Window()
        self.window_s = WINDOW_S

    def __serve_build_asgi_app__(self) -> Any:
        return _Asgi(self)

    async def reconfigure(self, config: dict[str, Any]) -> None:
        """`{"stamp": n, "routes": [{"version", "app", "deployment", "weight"}, ...],
        "window_s": s, "sessions": null | {"header", "cookie", "max_age_s", "candidate",
        "weight"}}`."""
        table = RouteTable.from_config(config)
        for r in table.routes:
            if r.app not in self.handles:
                handle = serve.get_deployment_handle(r.deployment, r.app)
                handle._init(_source=DeploymentHandleSource.PROXY)
                self.handles[r.app] = handle.options(stream=True)
        self.window_s = float(config.get("window_s", WINDOW_S))
        self.table = table

    async def record_routing_stats(self) -> dict[str, Any]:
        """What the executor reads from each router replica: the applied config stamp, the
        weights, and the traffic per version (ongoing now, and over the metrics window)."""
        snap = self.window.snapshot(time.time(), self.window_s)
        return {"stamp": self.table.stamp, "weights": self.table.weights(), **snap}

    async def _asgi(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1003})
            return
        table = self.table
        key = table.sticky.key(scope.get("headers", [])) if table.sticky else None
        route = table.pick(random.random()) if key is None else table.pick_session(key)
        if route is None:
            await _answer(send, 503, {"error": "no version is ready to serve"})
            return
        if key is not None and table.sticky is not None:
            self.window.session(key, route.version, time.time(), table.sticky.max_age_s)
        await self._forward(route, scope, receive, send)

    async def _forward(self, route: Route, scope: dict[str, Any], receive: Any, send: Any) -> None:
        started = time.perf_counter()
        self.window.started(route.version)
        status: int | None = None
        ttfb: float | None = None
        complete = cancelled = False
        response = None
        try:
            body = await _read_body(receive) if _has_body(scope) else b""
            if body is None:
                cancelled = True
                return
            ctx = serve_context._serve_request_context.get()
            serve_context._serve_request_context.set(
                dataclasses.replace(
                    ctx, _internal_request_id=generate_request_id(), is_http_request=True
                )
            )
            request = pickle.dumps(
                StreamingHTTPRequest(scope, receive_asgi_messages=BufferedBody(body))
            )
            handle = self.handles[route.app]
            if ctx.multiplexed_model_id or ctx.session_id:  # as Serve's proxy passes them on
                handle = handle.options(
                    multiplexed_model_id=ctx.multiplexed_model_id, session_id=ctx.session_id
                )
            response = handle.remote(request)
            version = route.version.encode()
            async for batch in response:
                for msg in pickle.loads(batch):
                    kind = msg["type"]
                    if kind == "http.response.start":
                        status = int(msg["status"])
                        msg = {
                            **msg,
                            "headers": [*msg.get("headers", []), (VERSION_HEADER, version)],
                        }
                    elif kind == "http.response.body":
                        if ttfb is None and (msg.get("body") or not msg.get("more_body")):
                            ttfb = time.perf_counter() - started
                        if not msg.get("more_body"):
                            complete = True
                    await send(msg)
            if status is None:
                why = f"version {route.version} sent no response"
                await _answer(send, 502, {"error": why}, route.version)
        except asyncio.CancelledError:
            cancelled = True
            raise
        except Exception as e:
            if status is not None:
                raise  # mid-answer: the client sees the stream break, as without the router
            logger.warning("version %s failed before answering", route.version, exc_info=True)
            last = next((x for x in reversed(str(e).splitlines()) if x.strip()), "")
            why = f"version {route.version} failed: {type(e).__name__}: {last.strip()}"[:500]
            await _answer(send, 500, {"error": why}, route.version)
        finally:
            if response is not None and not complete:
                response.cancel()
            self.window.finished(
                route.version,
                time.time(),
                status=status if complete else None,
                ttfb_s=ttfb,
                latency_s=time.perf_counter() - started,
                cancelled=cancelled,
            )


def app(args: dict[str, Any]) -> serve.Application:
    """Builder named by the executor's declarative config (`executor.router:app`)."""
    return Router.bind()
