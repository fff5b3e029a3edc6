"""Which version answers a request, and where it goes: the router's decisions, pure (no Ray).

A model's route table (`RouteTable`) holds its public route prefix and the controller's
weights; the executor writes one per model, and the router in Serve's HTTP proxy
(executor/router.py) reads it. A request is sent to the route whose share of the weight line
holds a point `u` in [0, 1), drawn at random per request. With sticky sessions on (`sessions`
set), a request that carries a session key goes to the version its session is assigned
(rollout/sticky.py: the key's point against the candidate's share of sessions), or to the other
one when that version has no route; a request without a key is routed by the weight. Both are
decided from the key and the table alone, so every proxy agrees.

Each version is a Serve application with a route prefix of its own under `/_rollout/`
(`hidden_prefix`). Routing a request is rewriting its path from the model's public prefix to
the chosen version's (`rewrite_path`); Serve's proxy then delivers it to that version as to any
application. Absolute redirects the version answers with name its own prefix, so they are
written back to the public one (`public_location`), as a reverse proxy does.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from rollout.sticky import on_candidate, session_point

HIDDEN_ROOT = "/_rollout"  # every version's own route prefix lies below this
SERVE_ENDPOINTS = ("/-/healthz", "/-/routes")  # answered by Serve's proxy itself


def hidden_prefix(app: str) -> str:
    """The route prefix of a version's Serve application."""
    return f"{HIDDEN_ROOT}/{app}"


def under(path: str, prefix: str) -> bool:
    """Whether `prefix` is a route prefix of `path`, as Serve's proxy matches them: `/a` takes
    `/a` and `/a/...`, not `/ab`; `/` takes everything."""
    if prefix == "/":
        return path.startswith("/")
    return path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] == "/")


@dataclass(frozen=True)
class Route:
    version: str  # the label clients see in `x-rollout-version`
    app: str  # the version's Serve application
    weight: float

    @property
    def prefix(self) -> str:
        return hidden_prefix(self.app)


@dataclass(frozen=True)
class Sticky:
    """Sticky sessions as the executor configured them for this rollout."""

    header: bytes | None  # lowercase, as ASGI scopes carry header names
    cookie: str | None
    max_age_s: float
    candidate: str  # the candidate's version label
    weight: float  # the candidate's share of sessions

    @classmethod
    def from_config(cls, config: dict[str, Any] | None) -> Sticky | None:
        if not config:
            return None
        header = config.get("header")
        return cls(
            header.encode() if header else None,
            config.get("cookie"),
            float(config.get("max_age_s", 3600.0)),
            str(config.get("candidate")),
            float(config.get("weight", 0.0)),
        )

    def key(self, headers: list[tuple[bytes, bytes]]) -> str | None:
        """The request's session key: its header, else its cookie; None without either."""
        if self.header is not None:
            for k, v in headers:
                if k == self.header and v.strip():
                    return v.strip().decode("latin-1")
        if self.cookie is not None:
            for k, v in headers:
                if k == b"cookie":
                    for part in v.decode("latin-1").split(";"):
                        name, eq, value = part.strip().partition("=")
                        if eq and name == self.cookie and value.strip('"'):
                            return value.strip('"')
        return None


@dataclass(frozen=True)
class RouteTable:
    """One model: its public prefix and the routes with a positive weight, in the order the
    executor wrote them. `stamp` identifies the write; routers report the stamp they apply."""

    model: str = ""
    prefix: str = "/"
    stamp: int = -1
    routes: tuple[Route, ...] = ()
    window_s: float = 60.0  # the window of the per-version metrics routers report
    sticky: Sticky | None = None
    live: frozenset[str] | None = None  # versions whose application exists (None: unknown)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> RouteTable:
        routes = tuple(
            Route(str(r["version"]), str(r["app"]), float(r["weight"]))
            for r in config.get("routes", [])
            if float(r["weight"]) > 0
        )
        return cls(
            model=str(config.get("model", "")),
            prefix=str(config.get("prefix", "/")),
            stamp=int(config.get("stamp", 0)),
            routes=routes,
            window_s=float(config.get("window_s", 60.0)),
            sticky=Sticky.from_config(config.get("sessions")),
            live=frozenset(map(str, config["live"])) if "live" in config else None,
        )

    @property
    def total(self) -> float:
        return sum(r.weight for r in self.routes)

    def weights(self) -> dict[str, float]:
        return {r.version: r.weight for r in self.routes}

    def pick(self, u: float) -> Route | None:
        """The route for a point `u` in [0, 1) (None: no version may take traffic).

        Routes own consecutive intervals of the weight line in table order, so with weights
        0.75 / 0.25 the points below 0.75 go to the first route.
        """
        if not self.routes:
            return None
        target = u * self.total
        edge = 0.0
        for r in self.routes:
            edge += r.weight
            if target < edge:
                return r
        return self.routes[-1]  # u * total rounding onto the last edge

    def pick_session(self, key: str) -> Route | None:
        """The route of a session: the version it is assigned, or the other one when that has
        no route (no ready replica, or no replica at all)."""
        if self.sticky is None or not self.routes:
            return None
        candidate = on_candidate(session_point(key), self.sticky.weight)
        for r in self.routes:
            if (r.version == self.sticky.candidate) == candidate:
                return r
        return self.routes[0]


def model_for(tables: Iterable[RouteTable], path: str) -> RouteTable | None:
    """The model whose public prefix is the longest route prefix of `path` (None: no model's;
    paths below `/_rollout` and the proxy's own endpoints are never a model's)."""
    if path in SERVE_ENDPOINTS or under(path, HIDDEN_ROOT):
        return None
    best = None
    for t in tables:
        if under(path, t.prefix) and (best is None or len(t.prefix) > len(best.prefix)):
            best = t
    return best


def rewrite_path(path: str, public: str, hidden: str) -> str:
    """`path` below the public prefix, moved below the version's hidden prefix."""
    return hidden + (path if public == "/" else path[len(public) :])


def public_location(value: str, hidden: str, public: str) -> str:
    """A `Location` the version answered, with its hidden prefix written as the public one
    (what nginx's `proxy_redirect default` does); any other location is left as it is."""
    parts = urlsplit(value)
    if not under(parts.path, hidden):
        return value
    rest = parts.path[len(hidden) :]
    path = (public.rstrip("/") + rest) or "/"
    return urlunsplit(parts._replace(path=path))
