"""A model whose health check never answers, for the executor's fault-injection tests.

Its constructor loads nothing and its requests answer like the example model's `GET /`; only
`check_health` hangs, as a replica whose GPU runtime deadlocked would. Serve calls the check
once while starting the replica, so the replica never gets past STARTING.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ray import serve
from starlette.requests import Request


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
class HungHealthCheck:
    def __init__(self, version: str) -> None:
        self.version = version

    async def check_health(self) -> None:
        await asyncio.sleep(3600)

    async def __call__(self, request: Request) -> dict[str, Any]:
        return {"version": self.version}


def app(args: dict[str, Any]) -> serve.Application:
    return HungHealthCheck.bind(**args)
