"""`rollout ui`: the dashboard's web server (Starlette on uvicorn) and its routes.

    GET  /                               the page: rollouts in the store, simulated runs
    GET  /rollouts/{id}  /runs/{key}     the page for one rollout or run (404 when unknown)
    GET  /api/rollouts                   the two lists as JSON
    GET  /api/rollouts/{id}?samples=N&events=M   status, available controls, and the samples
                                         and events from index N and M on (the page polls it)
    POST /api/rollouts/{id}/controls/{control}   pause, resume, cancel, force_cancel, roll_forward
    GET  /api/runs/{key}                 a simulated run's samples, events and summary
    GET  /metrics                        Prometheus metrics of every rollout in the store

Every route needs the token (see ui/auth.py) except `/metrics` while listening on loopback only.
"""

from __future__ import annotations

import errno
import html
import ipaddress
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from executor.metrics import RolloutMetrics
from rollout.errors import InputError
from ui import series
from ui.auth import Auth
from ui.live import Live
from ui.source import NotFound, Run, Store, find_runs, read_run, run_summary

STATIC = Path(__file__).parent / "static"
DEFAULT_FOLDERS = (Path("out"), Path("reports"))


def _page(kind: str, auth: Auth, title: str) -> HTMLResponse:
    text = (STATIC / "index.html").read_text()
    text = text.replace("{{csrf}}", auth.csrf).replace("{{kind}}", kind)
    return HTMLResponse(text.replace("{{title}}", html.escape(title)))


def _not_found(what: str) -> HTMLResponse:
    body = (
        f"<!doctype html><meta charset=utf-8><title>Not found</title>"
        f"<link rel=stylesheet href=/static/style.css><main class=notfound><h1>404</h1>"
        f"<p>{html.escape(what)}</p><p><a href=/>All rollouts</a></p></main>"
    )
    return HTMLResponse(body, status_code=404)


class Dashboard:
    """The routes over one store reader and a set of output folders."""

    def __init__(self, folders: list[Path], auth: Auth, open_metrics: bool) -> None:
        self.folders = folders
        self.auth = auth
        self.open_metrics = open_metrics
        self.store = Store()
        self.registry = CollectorRegistry()
        self.live = Live(self.store, RolloutMetrics(self.registry))
        self._runs: dict[tuple[str, float], dict[str, Any]] = {}

    # ---- pages ------------------------------------------------------------------------------

    def home(self, request: Request) -> Response:
        return _page("list", self.auth, "rollouts")

    def rollout_page(self, request: Request) -> Response:
        rollout_id = request.path_params["id"]
        try:
            self.live.follow(rollout_id)
        except NotFound:
            return _not_found(f"No rollout '{rollout_id}' in the store.")
        return _page("rollout", self.auth, rollout_id)

    def run_page(self, request: Request) -> Response:
        run = find_runs(self.folders).get(request.path_params["key"])
        if run is None:
            return _not_found("No simulated run by that name in the output folders.")
        return _page("run", self.auth, run.name)

    # ---- JSON -------------------------------------------------------------------------------

    def list_api(self, request: Request) -> Response:
        runs = []
        for run in find_runs(self.folders).values():
            try:
                summary = run_summary(run)
            except (OSError, ValueError):
                continue
            runs.append({"key": run.key, "name": run.name, **_run_row(summary)})
        return JSONResponse({"rollouts": self.live.rollouts(), "runs": runs})

    def rollout_api(self, request: Request) -> Response:
        rollout_id = request.path_params["id"]
        try:
            f = self.live.follow(rollout_id)
        except NotFound as e:
            return JSONResponse({"error": str(e)}, status_code=404)
        n, m = _index(request, "samples"), _index(request, "events")
        reset = n > len(f.samples) or m > len(f.events)  # the server restarted: start over
        if reset:
            n = m = 0
        return JSONResponse(
            {
                "status": f.status,
                "now": series.sample(f.status, f.status.get("gpus_per_replica", {})),
                "controls": series.available_controls(f.status, f.events),
                "samples": f.samples[n:],
                "events": f.events[m:],
                "offset": {"samples": len(f.samples), "events": len(f.events)},
                "reset": reset,
            }
        )

    def control_api(self, request: Request) -> Response:
        if not self.auth.may_send(request):
            return JSONResponse({"error": "missing or wrong CSRF token"}, status_code=403)
        rollout_id, control = request.path_params["id"], request.path_params["control"]
        if control not in series.CONTROLS:
            return JSONResponse({"error": f"unknown control '{control}'"}, status_code=400)
        try:
            message = self.live.store.send_control(rollout_id, control)
        except NotFound as e:
            return JSONResponse({"error": str(e)}, status_code=404)
        except InputError as e:
            return JSONResponse({"error": str(e)}, status_code=409)
        return JSONResponse({"message": message})

    def run_api(self, request: Request) -> Response:
        run = find_runs(self.folders).get(request.path_params["key"])
        if run is None:
            return JSONResponse({"error": "no such simulated run"}, status_code=404)
        return JSONResponse(self._run_payload(run))

    def _run_payload(self, run: Run) -> dict[str, Any]:
        stamp = (run.key, (run.path / "summary.json").stat().st_mtime)
        if stamp not in self._runs:
            data = read_run(run)
            payload = series.run_payload(data.summary, data.timeline, data.events, data.requests)
            self._runs[stamp] = {"key": run.key, "name": run.name, **payload}
        return self._runs[stamp]

    def metrics(self, request: Request) -> Response:
        self.live.refresh_all()
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    # ---- the application --------------------------------------------------------------------

    async def guard(
        self, request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        """Authenticate every request; a token in the URL becomes the session cookie."""
        token = request.query_params.get("token")
        if token is not None:
            if not self.auth.token_ok(token):
                return HTMLResponse(_DENIED, status_code=401)
            query = urlencode(
                [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
            )
            target = request.url.path + (f"?{query}" if query else "")
            response = RedirectResponse(target, status_code=303)
            response.set_cookie(
                self.auth.cookie, self.auth.session, httponly=True, samesite="strict", path="/"
            )
            return response
        if request.url.path == "/metrics" and self.open_metrics:
            return await call_next(request)
        if not self.auth.authenticated(request):
            if request.url.path.startswith(("/api/", "/metrics")):
                return JSONResponse({"error": "not authenticated"}, status_code=401)
            return HTMLResponse(_DENIED, status_code=401)
        return await call_next(request)

    def app(self) -> Starlette:
        routes = [
            Route("/", self.home),
            Route("/rollouts/{id}", self.rollout_page),
            Route("/runs/{key}", self.run_page),
            Route("/api/rollouts", self.list_api),
            Route("/api/rollouts/{id}", self.rollout_api),
            Route("/api/rollouts/{id}/controls/{control}", self.control_api, methods=["POST"]),
            Route("/api/runs/{key}", self.run_api),
            Route("/metrics", self.metrics),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ]
        return Starlette(
            routes=routes,
            middleware=[Middleware(BaseHTTPMiddleware, dispatch=self.guard)],
            exception_handlers={404: _no_page},
        )


async def _no_page(request: Request, exc: Exception) -> Response:
    return _not_found("No such page.")


_DENIED = (
    "<!doctype html><meta charset=utf-8><title>Token needed</title>"
    "<main style='font:15px system-ui;margin:3em'><h1>Token needed</h1>"
    "<p>Open the URL that <code>rollout ui</code> printed: it carries the access token.</p></main>"
)


def _index(request: Request, name: str) -> int:
    try:
        return max(0, int(request.query_params.get(name, 0)))
    except ValueError:
        return 0


def _run_row(summary: dict[str, Any]) -> dict[str, Any]:
    keys = ("scenario", "policy", "seed", "outcome", "rollout_duration_s", "latency_p99_s")
    return {k: summary.get(k) for k in (*keys, "ttft_p99_s", "cost_usd", "peak_gpus")}


# ---- serving --------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything starts: a port in use is bad input."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except (OSError, OverflowError) as e:
        sock.close()
        if getattr(e, "errno", None) == errno.EADDRINUSE:
            why = f"port {port} on {host} is in use; choose another with --port"
            raise InputError(why) from None
        why = getattr(e, "strerror", None) or str(e)
        raise InputError(f"cannot listen on {host} port {port}: {why}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(host: str, port: int, folders: list[Path], token: str) -> None:
    """Serve the dashboard until interrupted; prints the URL to open (it carries the token)."""
    import uvicorn

    sock = bind(host, port)
    port = sock.getsockname()[1]
    auth = Auth(token, port)
    dashboard = Dashboard([*folders, *DEFAULT_FOLDERS], auth, open_metrics=is_loopback(host))
    shown = f"[{host}]" if ":" in host else host
    print(f"rollout ui: http://{shown}:{port}/?token={token}", flush=True)
    if not is_loopback(host):
        print(
            "rollout ui: listening beyond this machine over plain HTTP; put it behind TLS "
            "(or an SSH tunnel) and keep the token secret",
            file=sys.stderr,
        )
    config = uvicorn.Config(dashboard.app(), log_level="warning", access_log=False, lifespan="off")
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        dashboard.store.close()
