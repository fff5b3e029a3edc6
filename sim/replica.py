"""A model-serving replica as the simulator tracks it."""

from __future__ import annotations

from enum import IntEnum
from typing import TYPE_CHECKING

import simpy

if TYPE_CHECKING:
    from sim.engine import Engine


class State(IntEnum):
    PENDING_GPU = 0  # asked for a GPU; none free yet
    STARTING = 1  # holds its GPU; cold start and health checks under way
    READY = 2  # passed a health check; the router sends it requests
    DRAINING = 3  # removed: no new requests, finishing in-flight ones, still holds its GPU
    STOPPED = 4  # released its GPU


CURRENT, CANDIDATE = 0, 1
VERSION_NAMES = ("current", "candidate")


class Replica:
    """One replica; slots keep the request path's attribute reads cheap."""

    __slots__ = (
        "created_at",
        "draining",
        "engine",
        "gpu_at",
        "granted",
        "id",
        "node",
        "ongoing",
        "ready_at",
        "slot",
        "state",
        "stop_reason",
        "stopped_at",
        "version",
    )

    def __init__(self, rid: int, version: int, now: float, engine: Engine | None = None) -> None:
        self.id = rid
        self.version = version
        self.state = State.PENDING_GPU
        self.ongoing = 0  # requests routed to this replica and not finished
        self.draining = False
        self.engine = engine  # the engine kind's per-replica state; None for fixed-time kinds
        self.slot = -1  # index in the router's list of ready replicas with room, or -1
        self.node: object | None = None  # the node whose GPUs it holds
        self.created_at = now
        self.gpu_at: float | None = None
        self.ready_at: float | None = None
        self.stopped_at: float | None = None
        self.stop_reason = ""  # removed | start_failed | crashed | drain_timeout
        self.granted: simpy.Event | None = None

    def __lt__(self, other: Replica) -> bool:
        """Heap entries tie on (time, key) only for one replica's stale duplicates; any order
        will do, but the comparison must exist."""
        return False

    def __repr__(self) -> str:
        name = VERSION_NAMES[self.version]
        return f"Replica({self.id}, {name}, {self.state.name}, ongoing={self.ongoing})"
