"""The router: rollout's weighted split between versions, inside Ray Serve's HTTP proxy.

Serve has no weighted split between applications (it went with the 1.x endpoints API), so
rollout adds one where Serve already handles every request: an ASGI middleware in each HTTP
proxy, loaded through Serve's hook for proxy middlewares, the environment variable
`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=executor.router:middlewares` of every node's
`ray start` (the local cluster rollout starts sets it; see docs/executor.md for a cluster of
one's own).

Each version is a Serve application with a route prefix of its own, `/_rollout/{name}_{version}`.
For a request below a model's public prefix the router picks a version by the controller's
weights and rewrites the path to that version's prefix (executor/routing.py); the proxy then
sends it to the version as to any application, in the one hop it makes anyway. So status,
headers, body bytes and streamed chunks come back as the version sends them, a client that
disconnects cancels the version's request (the proxy does that), and websockets pass too. The
router adds `x-rollout-version`, writes absolute redirects to the version's prefix back to the
public prefix, answers 503 with a JSON error itself when no version may take traffic, and counts
ongoing requests and records metrics per version (executor/router_metrics.py). With sticky
sessions on, a request carrying a session key goes to its session's version (executor/routing.py).

Weights reach every proxy without a Serve redeploy, through Ray's internal key-value store
(held by the GCS, behind the cluster's token; written only by the executor): one route table
per model under `table/{model}`, and `epoch`, which the executor changes after every write.
Each proxy polls `epoch` every POLL_S seconds and rereads the tables when it moved; it reads
them once before it serves its first request, so a restarted proxy routes by the current
weights. Each proxy publishes under `proxy/{its actor id}`, every PUBLISH_S seconds and as soon
as it applies a table, the stamp of every table it applies, its ongoing requests per version
and its metrics window: the executor waits for every proxy's stamp before removing replicas,
sums the ongoing counts for the autoscaler and merges the windows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from executor.router_metrics import Window
from executor.routing import RouteTable, model_for, public_location, rewrite_path, under

logger = logging.getLogger("ray.serve")
CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "executor.router:middlewares"
NAMESPACE = "rollout-router"
EPOCH_KEY = b"epoch"
TABLE_PREFIX = b"table/"
PROXY_PREFIX = b"proxy/"
VERSION_HEADER = b"x-rollout-version"
LOCATIONS = (b"location", b"content-location")  # headers naming a URL of the version's
POLL_S = 0.02  # how often a proxy looks for new weights
PUBLISH_S = 0.1  # how often it publishes its stamps and ongoing counts
METRICS_S = 1.0  # how often it recomputes its metrics windows for publishing
KV_TIMEOUT_S = 2.0

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def table_key(model: str) -> bytes:
    return TABLE_PREFIX + model.encode()


def proxy_key(proxy_id: str) -> bytes:
    return PROXY_PREFIX + proxy_id.encode()


class Store(Protocol):
    """Where the route tables come from and the proxy's reports go (Ray's KV in a proxy)."""

    def load(self) -> dict[str, bytes]: ...
    def publish(self, report: bytes) -> None: ...
    async def epoch(self) -> bytes | None: ...
    async def tables(self) -> dict[str, bytes]: ...
    async def publish_async(self, report: bytes) -> None: ...


class KvStore:
    """Ray's internal key-value store, as seen from inside a proxy actor."""

    def __init__(self) -> None:
        import ray
        from ray._private.worker import global_worker

        self.gcs = global_worker.gcs_client
        self.key = proxy_key(ray.get_runtime_context().get_actor_id() or "driver")

    def load(self) -> dict[str, bytes]:
        keys = self.gcs.internal_kv_keys(TABLE_PREFIX, NAMESPACE, timeout=KV_TIMEOUT_S)
        got = self.gcs.internal_kv_multi_get(keys, NAMESPACE, timeout=KV_TIMEOUT_S) if keys else {}
        return {k.decode(): v for k, v in got.items()}

    def publish(self, report: bytes) -> None:
        self.gcs.internal_kv_put(self.key, report, True, NAMESPACE, timeout=KV_TIMEOUT_S)

    async def epoch(self) -> bytes | None:
        return await self.gcs.async_internal_kv_get(EPOCH_KEY, NAMESPACE, timeout=KV_TIMEOUT_S)

    async def tables(self) -> dict[str, bytes]:
        keys = await self.gcs.async_internal_kv_keys(TABLE_PREFIX, NAMESPACE, timeout=KV_TIMEOUT_S)
        if not keys:
            return {}
        got = await self.gcs.async_internal_kv_multi_get(keys, NAMESPACE, timeout=KV_TIMEOUT_S)
        return {k.decode(): v for k, v in got.items()}

    async def publish_async(self, report: bytes) -> None:
        await self.gcs.async_internal_kv_put(
            self.key, report, True, NAMESPACE, timeout=KV_TIMEOUT_S
        )


def middlewares() -> list[Any]:
    """The callback Serve's proxy calls for its middlewares (`CALLBACK`)."""
    from starlette.middleware import Middleware

    return [Middleware(Router)]


def serve_routes(app: Any) -> Any:
    """Serve's own route table inside the proxy (its `ProxyRouter`), found below the app the
    middleware wraps: the router defers to longer prefixes of other applications and checks
    that a version's prefix is routed before it sends a request there."""
    seen = app
    for _ in range(8):
        if hasattr(seen, "proxy_router"):
            return seen.proxy_router
        seen = getattr(seen, "app", None) or getattr(seen, "_app", None)
        if seen is None:
            break
    raise RuntimeError(
        f"{CALLBACK} must be loaded by Ray Serve's HTTP proxy ({CALLBACK_ENV}); "
        "it found no Serve route table below it"
    )


def _public(value: bytes, hidden: str, public: str) -> bytes:
    return public_location(value.decode("latin-1"), hidden, public).encode("latin-1")


def _json_answer(status: int, payload: dict[str, Any]) -> tuple[Message, Message]:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    return (
        {"type": "http.response.start", "status": status, "headers": headers},
        {"type": "http.response.body", "body": body, "more_body": False},
    )


class Router:
    """The ASGI middleware: one per proxy, in front of Serve's own proxy app."""

    def __init__(self, app: Any, store: Store | None = None, routes: Any = None) -> None:
        self.app = app
        self.routes = routes if routes is not None else serve_routes(app)
        self.store = store if store is not None else KvStore()
        self.tables: dict[str, RouteTable] = {}
        self.windows: dict[str, Window] = {}
        self._raw: dict[str, bytes] = {}
        self._epoch: bytes | None = None
        self._metrics: dict[str, Any] = {}
        self._metrics_at = 0.0
        self._published_at = 0.0
        self._apply(self.store.load())  # the current weights before the first request
        self.store.publish(self._report())
        self._task: asyncio.Task[None] | None = None
        with contextlib.suppress(RuntimeError):  # no event loop: tests drive `step` themselves
            self._task = asyncio.get_running_loop().create_task(self._watch())

    # ---- the weights ----------------------------------------------------------------------

    def _apply(self, raw: dict[str, bytes]) -> bool:
        """Take the tables as stored; True when any changed."""
        if raw == self._raw:
            return False
        tables = {}
        for key, value in raw.items():
            try:
                t = RouteTable.from_config(json.loads(value))
            except (ValueError, KeyError, TypeError):
                logger.warning("rollout router: ignoring a malformed route table %s", key)
                continue
            tables[t.model] = t
        self.tables = tables
        for model, window in self.windows.items():
            live = tables[model].live if model in tables else None
            if live is not None:
                window.forget(live)
        for model in list(self.windows):
            if model not in tables and not self.windows[model].ongoing:
                del self.windows[model]
        self._raw = raw
        return True

    def _report(self) -> bytes:
        now = time.time()
        if now - self._metrics_at >= METRICS_S:
            self._metrics = {
                m: w.snapshot(now, self.tables[m].window_s if m in self.tables else 60.0)
                for m, w in self.windows.items()
            }
            self._metrics_at = now
        models: dict[str, Any] = {}
        for model, table in self.tables.items():
            w = self.windows.get(model)
            models[model] = {
                **self._metrics.get(model, {}),  # versions, sessions: refreshed each METRICS_S
                "stamp": table.stamp,
                "ongoing": dict(w.ongoing) if w else {},
                "served": dict(w.served) if w else {},
                "window_s": table.window_s,
            }
        return json.dumps({"t": now, "models": models}).encode()

    async def step(self) -> None:
        """One poll: new tables when `epoch` moved, and a report when one is due."""
        epoch = await self.store.epoch()
        changed = False
        if epoch != self._epoch:
            changed = self._apply(await self.store.tables())
            self._epoch = epoch
        now = time.monotonic()
        if changed or now - self._published_at >= PUBLISH_S:
            await self.store.publish_async(self._report())
            self._published_at = now

    async def _watch(self) -> None:
        failing = False
        while True:
            try:
                await self.step()
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception:  # the GCS restarting, a timeout: keep the last weights
                if not failing:
                    logger.warning("rollout router: cannot read the route tables", exc_info=True)
                failing = True
            await asyncio.sleep(POLL_S)

    # ---- requests -------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket") or not self.tables:
            await self.app(scope, receive, send)
            return
        root = scope.get("root_path", "")
        path = scope["path"][len(root) :]
        table = model_for(self.tables.values(), path)
        if table is None:
            await self.app(scope, receive, send)
            return
        serve_match = self.routes.match_route(path)
        if serve_match is not None and len(serve_match[0]) > len(table.prefix):
            await self.app(scope, receive, send)  # another application's longer prefix
            return
        sticky = table.sticky
        key = sticky.key(scope.get("headers", [])) if sticky else None
        route = table.pick(random.random()) if key is None else table.pick_session(key)
        if route is None:
            await self._refuse(scope, send, {"error": "no version is ready to serve"})
            return
        hidden = route.prefix
        inner = {**scope, "path": root + rewrite_path(path, table.prefix, hidden)}
        raw = scope.get("raw_path")
        if raw is not None:
            raw_path = raw.decode("latin-1")[len(root) :]
            if under(raw_path, table.prefix):
                inner["raw_path"] = (root + rewrite_path(raw_path, table.prefix, hidden)).encode(
                    "latin-1"
                )
            else:
                del inner["raw_path"]  # optional in ASGI; `path` is what Serve and apps read
        target = self.routes.match_route(inner["path"][len(root) :])
        if target is None or target[0] != hidden:
            why = f"version {route.version} is not routed by Serve yet"
            await self._refuse(scope, send, {"error": why})
            return
        if key is not None and sticky is not None:
            self._window(table.model).session(key, route.version, time.time(), sticky.max_age_s)
        await self._forward(table, route.version, hidden, inner, receive, send)

    def _window(self, model: str) -> Window:
        window = self.windows.get(model)
        if window is None:
            window = self.windows[model] = Window()
        return window

    async def _refuse(self, scope: Scope, send: Send, payload: dict[str, Any]) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1013})  # try again later
            return
        for msg in _json_answer(503, payload):
            await send(msg)

    async def _forward(
        self, table: RouteTable, version: str, hidden: str, scope: Scope, receive: Receive,
        send: Send,
    ) -> None:  # fmt: skip
        window = self._window(table.model)
        label = version.encode()
        started = time.perf_counter()
        window.started(version)
        status: int | None = None
        ttfb: float | None = None
        complete = left = False

        async def relay(msg: Message) -> None:
            nonlocal status, ttfb, complete
            kind = msg["type"]
            if kind == "http.response.body":
                if ttfb is None and (msg.get("body") or not msg.get("more_body")):
                    ttfb = time.perf_counter() - started
                if not msg.get("more_body"):
                    complete = True
            elif kind == "http.response.start" or kind == "websocket.accept":
                status = int(msg.get("status", 101))
                headers = [
                    (k, _public(v, hidden, table.prefix)) if k.lower() in LOCATIONS else (k, v)
                    for k, v in msg.get("headers", ())
                ]
                headers.append((VERSION_HEADER, label))
                msg = {**msg, "headers": headers}
                if kind == "websocket.accept":
                    ttfb = time.perf_counter() - started
                    complete = True  # a websocket is answered once it is accepted
            await send(msg)

        async def listen() -> Message:
            nonlocal left
            msg = await receive()
            if msg["type"] in ("http.disconnect", "websocket.disconnect"):
                left = True
            return msg

        try:
            await self.app(scope, listen, relay)
        except asyncio.CancelledError:
            left = True
            raise
        finally:
            window.finished(
                version,
                time.time(),
                status=status if complete else None,
                ttfb_s=ttfb,
                latency_s=time.perf_counter() - started,
                cancelled=left and not complete,
            )
