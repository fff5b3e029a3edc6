"""Which version answers a request: the router's route table, pure and without Ray.

The controller's weights arrive as the router's `user_config` (`{"stamp", "routes"}`); a request
is sent to the route whose share of the weight line holds a point `u` in [0, 1). The router draws
`u` at random per request; sticky sessions can derive it from a session key instead
(`session_point`), so one session keeps its version while the weights stay put, and a weight
change moves only the sessions whose point crosses a boundary.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Route:
    version: str  # the label clients see in `x-rollout-version`
    app: str  # the version's Serve application
    deployment: str  # its ingress deployment
    weight: float


@dataclass(frozen=True)
class RouteTable:
    """The routes with a positive weight, in the order the executor wrote them."""

    stamp: int = -1
    routes: tuple[Route, ...] = ()

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> RouteTable:
        routes = tuple(
            Route(str(r["version"]), str(r["app"]), str(r["deployment"]), float(r["weight"]))
            for r in config.get("routes", [])
            if float(r["weight"]) > 0
        )
        return cls(int(config.get("stamp", 0)), routes)

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


def session_point(key: str) -> float:
    """A stable point in [0, 1) for a session key (what sticky routing would pass to `pick`)."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64
