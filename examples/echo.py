"""A plain FastAPI-ingress Serve application, written with no thought of rollout.

It shows that any Serve application rolls out unchanged behind the router, and the tests and
benchmarks use it for exactly that: a text answer with a query parameter and custom headers,
a 418, a binary echo, every HTTP method, a cookie, a redirect, a server-sent event stream and a
websocket.
Its builder takes `version` (echoed in answers and in an `x-app-version` header) and
`chunk_delay_s` (the pause between stream events).

    serve run examples.echo:app version=v1    # or through a deploy file: examples.echo:app

(No `from __future__ import annotations` here: FastAPI must see `Request` as a class in the
handlers' signatures, not as a string.)
"""

import asyncio
import json
import os
from typing import Any

from fastapi import FastAPI, Request, Response, WebSocket
from fastapi.responses import JSONResponse, RedirectResponse, StreamingResponse
from ray import serve

api = FastAPI()


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=1000)
@serve.ingress(api)
class Echo:
    def __init__(self, version: str = "v1", chunk_delay_s: float = 0.0) -> None:
        self.version = version
        self.chunk_delay_s = float(chunk_delay_s)
        self.streams_cancelled = 0

    def _headers(self) -> dict[str, str]:
        return {"x-app-version": self.version, "x-replica": str(os.getpid())}

    @api.get("/hello")
    def hello(self, name: str = "world") -> Response:
        headers = {**self._headers(), "x-custom": f"greeting; name={name}"}
        return Response(f"hello {name} from {self.version}\n", media_type="text/plain",
                        headers=headers)  # fmt: skip

    @api.get("/teapot")
    def teapot(self) -> JSONResponse:
        return JSONResponse({"error": "I'm a teapot"}, status_code=418, headers=self._headers())

    @api.api_route("/echo", methods=["POST", "PUT", "PATCH", "DELETE"])
    async def echo(self, request: Request) -> Response:
        body = await request.body()
        headers = {
            **self._headers(),
            "x-method": request.method,
            "x-query": request.url.query,
            "x-path": request.url.path,
            "x-root-path": request.scope.get("root_path", ""),
            "x-seen-header": request.headers.get("x-test", ""),
        }
        kind = request.headers.get("content-type", "application/octet-stream")
        return Response(body, media_type=kind, headers=headers)

    @api.get("/cookie")
    def cookie(self) -> Response:
        r = Response("", status_code=204, headers=self._headers())
        r.set_cookie("session", "abc", httponly=True)
        r.set_cookie("theme", "dark")
        return r

    @api.get("/moved")
    def moved(self) -> RedirectResponse:
        return RedirectResponse("hello?name=moved", status_code=307, headers=self._headers())

    @api.get("/sse")
    async def sse(self, n: int = 10, delay_s: float | None = None) -> StreamingResponse:
        pause = self.chunk_delay_s if delay_s is None else delay_s

        async def events() -> Any:
            try:
                for i in range(n):
                    if pause:
                        await asyncio.sleep(pause)
                    yield f"data: {json.dumps({'i': i, 'version': self.version})}\n\n"
                yield "data: [DONE]\n\n"
            except asyncio.CancelledError:
                self.streams_cancelled += 1
                raise

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers=self._headers())  # fmt: skip

    @api.websocket("/ws")
    async def ws(self, websocket: WebSocket) -> None:
        """Answers each text message with the version and the message."""
        await websocket.accept(headers=[(b"x-app-version", self.version.encode())])
        async for text in websocket.iter_text():
            await websocket.send_text(f"{self.version}: {text}")

    @api.get("/cancelled")
    def cancelled(self) -> dict[str, Any]:
        """How many streams this replica saw cancelled by their client (tests read it)."""
        return {"version": self.version, "streams_cancelled": self.streams_cancelled}


def app(args: dict[str, Any]) -> serve.Application:
    return Echo.bind(**args)
