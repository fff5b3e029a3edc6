"""How much open-loop load `rollout load` sends on this machine, and how late.

A trivial OpenAI-style streaming server (aiohttp, its own process, answering
`/v1/completions` with one SSE event per token every `--token-interval` seconds) takes a
Poisson trace of `--rate` requests per second for `--seconds`; `rollout load` replays it (its
own process, as users run it). Each stream lasts about `tokens × interval`, so by Little's law
about `rate × tokens × interval` streams are open at once. Printed: the rate achieved, the most
streams open at once, and the send lag (actual minus scheduled send time), against the targets
(≥ 200 requests/s, ≥ 500 concurrent streams, send-lag p99 ≤ 10 ms on 2 cores), as ratios.

Usage: python benchmarks/load_capacity.py [--rate 220] [--seconds 20] [--tokens 12]
       [--token-interval 0.25]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
TARGET_RATE, TARGET_STREAMS, TARGET_LAG_S = 200.0, 500, 0.010


def serve(port: int, interval: float) -> None:
    """The trivial streaming server (run in a child process)."""
    from aiohttp import web

    open_now = peak = 0

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "trivial"}]})

    async def stats(_: web.Request) -> web.Response:
        return web.json_response({"open": open_now, "peak": peak})

    async def completions(request: web.Request) -> web.StreamResponse:
        nonlocal open_now, peak
        body = await request.json()
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        open_now += 1
        peak = max(peak, open_now)
        try:
            for i in range(int(body["max_tokens"])):
                await asyncio.sleep(interval)
                chunk = {"choices": [{"index": 0, "text": f" t{i}", "finish_reason": None}]}
                await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await resp.write(b"data: [DONE]\n\n")
        finally:
            open_now -= 1
        return resp

    app = web.Application()
    app.add_routes(
        [
            web.get("/v1/models", models),
            web.get("/stats", stats),
            web.post("/v1/completions", completions),
        ]
    )
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None, backlog=2048)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, default=220.0)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--tokens", type=int, default=12)
    p.add_argument("--token-interval", type=float, default=0.25)
    p.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.serve is not None:
        serve(a.serve, a.token_interval)
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="rollout-load-"))
    rng = np.random.default_rng(1)
    times = np.cumsum(rng.exponential(1 / a.rate, int(a.rate * a.seconds * 1.2)))
    times = times[times < a.seconds]
    trace = tmp / "poisson.csv"
    with trace.open("w") as f:
        f.write("arrival_s,ContextTokens,GeneratedTokens\n")
        for t in times:
            f.write(f"{t:.6f},100,{a.tokens}\n")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(port), "--token-interval", str(a.token_interval)]
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        out = tmp / "out"
        env = dict(os.environ, PYTHONPATH=str(REPO))
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.monotonic()
        run = subprocess.run(
            [sys.executable, "-m", "rollout.cli", "load", str(trace), "--url",
             f"http://127.0.0.1:{port}", "--out", str(out), "--timeout-s", "60"],
            env=env, capture_output=True, text=True, check=False,
        )  # fmt: skip
        wall = time.monotonic() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as r:
            peak = json.loads(r.read())["peak"]
    finally:
        server.terminate()
        server.wait(10)
    print(run.stdout)
    if run.returncode != 0:
        print(run.stderr)
        return 1
    s = json.loads((out / "summary.json").read_text())
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    rate = s["sent"] / float(times[-1])
    lag = s["send_lag_p99_s"]
    print(
        f"{s['sent']} requests in {times[-1]:.1f} s of trace ({wall:.1f} s wall), "
        f"{s['failed']} failed; the load generator used {cpu:.1f} CPU-s "
        f"({cpu / wall:.2f} of one core) on a {os.cpu_count()}-core machine"
    )
    r1, r2 = rate / TARGET_RATE, peak / TARGET_STREAMS
    print(f"rate sent        {rate:8.1f} req/s   target ≥ {TARGET_RATE:g}   ratio {r1:.2f}")
    print(f"streams at once  {peak:8d}         target ≥ {TARGET_STREAMS}   ratio {r2:.2f}")
    print(
        f"send lag p99     {lag * 1000:8.2f} ms      target ≤ {TARGET_LAG_S * 1000:g} ms   "
        f"ratio {lag / TARGET_LAG_S:.2f} (p50 {s['send_lag_p50_s'] * 1000:.2f} ms, "
        f"max {s['send_lag_max_s'] * 1000:.1f} ms)"
    )
    met = rate >= TARGET_RATE and peak >= TARGET_STREAMS and lag <= TARGET_LAG_S and not s["failed"]
    print("targets", "met" if met else "NOT met")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
