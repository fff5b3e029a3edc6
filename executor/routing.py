"""Which version answers a request: the router's route table, pure and without Ray.

The controller's weights arrive as the router's `user_config` (`{"stamp", "routes",
"sessions"}`); a request is sent to the route whose share of the weight line holds a point `u`
in [0, 1), drawn at random per request. With sticky sessions on (`sessions` set), a request that
carries a session key goes to the version its session is assigned (rollout/sticky.py: the key's
point against the candidate's share of sessions), or to the other one when that version has no
route (no ready replica); a request without a key is routed by the weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rollout.sticky import on_candidate, session_point


@dataclass(frozen=True)
class Route:
    version: str  # the label clients see in `x-rollout-version`
    app: str  # the version's Serve application
    deployment: str  # its ingress deployment
    weight: float


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
    """The routes with a positive weight, in the order the executor wrote them."""

    stamp: int = -1
    routes: tuple[Route, ...] = ()
    sticky: Sticky | None = None

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> RouteTable:
        routes = tuple(
            Route(str(r["version"]), str(r["app"]), str(r["deployment"]), float(r["weight"]))
            for r in config.get("routes", [])
            if float(r["weight"]) > 0
        )
        sticky = Sticky.from_config(config.get("sessions"))
        return cls(int(config.get("stamp", 0)), routes, sticky)

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
