"""What the router adds to a streaming request: the same app called directly and through it.

On a local cluster, one Serve app (examples/echo.py, one replica) is deployed twice from the
same code: plainly at `/direct`, and with `rollout deploy` at `/routed`, where the router in
Serve's HTTP proxy picks the version and passes the request on to the version's own prefix.
Clients stream its SSE endpoint (`--events` events, `--gap` seconds apart) at 1 and at 64
concurrent streams, alternating direct and routed rounds so both see the same machine. Printed
per concurrency: p50 and p99 of the whole request and of the time to the first chunk, direct
and routed, the difference in milliseconds and the ratio routed/direct.
Targets on a 2-core machine: at 64 streams, ≤ 3 ms added p50 and ≤ 10 ms added time to first
chunk.

Usage: python benchmarks/router_overhead.py [--requests 300] [--rounds 3] [--events 10]
       [--gap 0.1]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
TARGET_P50_MS, TARGET_TTFC_MS = 3.0, 10.0


async def stream_round(url: str, concurrency: int, n: int) -> tuple[list[float], list[float]]:
    """`n` streams, `concurrency` at a time: (latencies, times to first chunk) in seconds."""
    import aiohttp

    lat: list[float] = []
    first: list[float] = []
    left = n

    async def client(s: aiohttp.ClientSession) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            started = time.perf_counter()
            async with s.get(url) as r:
                got_first = None
                async for _ in r.content.iter_any():
                    got_first = got_first or time.perf_counter() - started
                body_done = time.perf_counter() - started
            assert r.status == 200
            lat.append(body_done)
            first.append(got_first or body_done)

    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as s:
        await asyncio.gather(*(client(s) for _ in range(concurrency)))
    return lat, first


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=300, help="streams per round and target")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--events", type=int, default=10)
    p.add_argument("--gap", type=float, default=0.1)
    p.add_argument("--concurrency", default="1,64")
    a = p.parse_args()

    from executor import cluster
    from executor.serve_calls import config_lock, deploy
    from executor.serve_config import declarative_apps

    tmp = Path(tempfile.mkdtemp(prefix="rollout-router-"))
    os.environ["ROLLOUT_HOME"] = str(tmp / "home")
    os.chdir(REPO)
    info = cluster.start_local(num_gpus=2, num_cpus=16)
    port = free_port()
    try:
        cluster.connect(info.address)
        from ray import serve

        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = {"version": "v1", "chunk_delay_s": a.gap}
        spec = {
            "name": "routed", "version": "v1",
            "model": {"import_path": "examples.echo:app", "args": args,
                      "ray_actor_options": {"num_cpus": 0.1}, "max_ongoing_requests": 1000},
            "replicas": 1, "cluster": {"num_gpus": 2},
            "http": {"port": port, "route_prefix": "/routed"},
        }  # fmt: skip
        path = tmp / "routed.yaml"
        path.write_text(yaml.safe_dump(spec))
        env = dict(os.environ, PYTHONPATH=str(REPO))
        done = subprocess.run([sys.executable, "-m", "rollout.cli", "deploy", str(path)],
                              env=env, capture_output=True, text=True, check=False)  # fmt: skip
        if done.returncode != 0:
            print(done.stdout, done.stderr)
            return 1
        with config_lock():
            apps = declarative_apps(cluster.serve_client().get_serve_details())
            apps["direct"] = {
                "name": "direct", "route_prefix": "/direct", "import_path": "examples.echo:app",
                "args": args, "deployments": [{"name": "Echo", "num_replicas": 1,
                                               "ray_actor_options": {"num_cpus": 0.1}}],
            }  # fmt: skip
            deploy(apps)
        deadline = time.monotonic() + 60
        while serve.status().applications.get("direct") is None or (
            serve.status().applications["direct"].status != "RUNNING"
        ):
            if time.monotonic() > deadline:
                print("the direct app did not start")
                return 1
            time.sleep(0.5)
        base = f"http://127.0.0.1:{port}"
        query = f"/sse?n={a.events}"
        asyncio.run(stream_round(base + "/direct" + query, 8, 16))  # warm both paths up
        asyncio.run(stream_round(base + "/routed" + query, 8, 16))
        results = {}
        for conc in (int(x) for x in a.concurrency.split(",")):
            got: dict[str, tuple[list[float], list[float]]] = {
                "direct": ([], []),
                "routed": ([], []),
            }
            for _ in range(a.rounds):
                for target in ("direct", "routed"):
                    n = a.requests // a.rounds if conc > 1 else max(20, a.requests // a.rounds // 4)
                    lat, first = asyncio.run(stream_round(base + f"/{target}" + query, conc, n))
                    got[target][0].extend(lat)
                    got[target][1].extend(first)
            results[conc] = got
    finally:
        import shutil

        import ray

        ray.shutdown()
        cluster.stop_local()
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\nSSE stream of {a.events} events {a.gap * 1000:g} ms apart; one app replica; the "
          f"router in Serve's HTTP proxy; {os.cpu_count()} cores")  # fmt: skip
    print(f"{'streams':>7} {'measure':<18} {'direct ms':>10} {'routed ms':>10} {'added ms':>9} "
          f"{'ratio':>6}")  # fmt: skip
    verdict = True
    for conc, got in results.items():
        for name, i, q in [("latency p50", 0, 0.5), ("latency p99", 0, 0.99),
                           ("first chunk p50", 1, 0.5), ("first chunk p99", 1, 0.99)]:  # fmt: skip
            d = float(np.quantile(got["direct"][i], q)) * 1000
            r = float(np.quantile(got["routed"][i], q)) * 1000
            print(f"{conc:>7} {name:<18} {d:>10.1f} {r:>10.1f} {r - d:>9.1f} {r / d:>6.3f}")
            if conc == 64 and name == "latency p50":
                verdict &= r - d <= TARGET_P50_MS
            if conc == 64 and name == "first chunk p50":
                verdict &= r - d <= TARGET_TTFC_MS
        n = len(got["direct"][0])
        print(f"{conc:>7} ({n} streams per target)")
    print(
        f"targets at 64 streams: added p50 ≤ {TARGET_P50_MS:g} ms, added time to first chunk "
        f"≤ {TARGET_TTFC_MS:g} ms: {'met' if verdict else 'NOT met'}"
    )
    return 0 if verdict else 1


if __name__ == "__main__":
    sys.exit(main())
