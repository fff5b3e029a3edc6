"""The executor's added latency per rollout step, next to Ray Serve's own replica start time.

Runs the example model v1 → v2 on a local cluster (logical GPUs unless the machine has real
ones) with the real `rollout` command, while a thread polls Serve's replica states every 50 ms.
From the recorded history and those polls it prints, per forward step:

- ready → shifted: from the moment Serve reports the step's last candidate RUNNING to the
  moment the router has taken the new weight (the controller's detection tick, health probe,
  config write and the router's reconfigure);
- shifted → removal applied: from the router taking the weight to the scale-down of the old
  replicas being accepted by Serve (what the controller adds before Serve drains them);
- Serve's replica start: from the scale-up being applied to the new replica RUNNING (Serve
  and Ray's own cost: worker start, model load, the replica's first health check).

Usage: python benchmarks/executor_overhead.py [--replicas 4] [--load-delay 1] [--gpus N]
Required: median added latency per step under 1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def deploy_file(tmp: Path, version: str, a: argparse.Namespace, port: int) -> Path:
    spec = {
        "name": "bench",
        "version": version,
        "model": {
            "import_path": "examples.model:app",
            "args": {"weights": f"examples/weights-{version}.npz", "load_delay_s": a.load_delay},
            "ray_actor_options": {"num_gpus": a.gpu_per_replica, "num_cpus": 0.1},
            "graceful_shutdown_timeout_s": 1,
        },
        "health_check": {"period_s": 1, "timeout_s": 10},
        "replicas": a.replicas,
        "policy": {a.policy_field: a.policy_percent, "stabilization_time_seconds": a.stabilization},
        "progress_deadline_s": 600,
        "cluster": {"num_gpus": a.gpus},
        "http": {"port": port, "route_prefix": "/bench"},
    }
    path = tmp / f"bench-{version}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


class Poller:
    """First time each replica id was seen RUNNING, per application."""

    def __init__(self) -> None:
        self.running_at: dict[str, dict[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from executor.cluster import serve_client

        while not self._stop.is_set():
            details = serve_client().get_serve_details()
            now = time.time()
            for app, info in details.get("applications", {}).items():
                for dep in info.get("deployments", {}).values():
                    for r in dep.get("replicas", []):
                        if r["state"] == "RUNNING":
                            self.running_at.setdefault(app, {}).setdefault(r["replica_id"], now)
            self._stop.wait(0.05)

    def __enter__(self) -> Poller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def analyse(events: list[dict], running_at: dict[str, float]) -> list[dict[str, float]]:
    """Per forward step: ready → shifted, shifted → removal applied, replica start times."""

    def applied(prefix: str) -> list[dict]:
        return [
            e for e in events if e["kind"] == "action_applied" and e["action"].startswith(prefix)
        ]

    ups, weights, downs = applied("scale candidate"), applied("weight"), applied("scale current")
    rows = []
    for w in weights:
        before = [u for u in ups if u["t"] <= w["t"]]
        if not before:
            continue
        up = before[-1]  # the scale-up of this step
        new = [t for t in running_at.values() if up["t"] - up["seconds"] <= t <= w["t"]]
        if not new:
            continue  # a weight set before its candidates were ready (unavailable mode, N = 1)
        ready = max(new)
        down = next((d for d in downs if d["t"] >= w["t"]), None)
        rows.append(
            {
                "step": len(rows) + 1,
                "ready_to_shifted_s": w["t"] - ready,
                "shifted_to_removal_s": (down["t"] - w["t"]) if down else float("nan"),
                "serve_start_s": statistics.median(t - up["t"] for t in new),
            }
        )
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--load-delay", type=float, default=1.0)
    p.add_argument("--stabilization", type=float, default=1.0)
    p.add_argument(
        "--gpus", default=None, help="logical GPUs of the local cluster, or 'auto' to let Ray "
        "detect the real ones (default: enough logical GPUs for the surge)",
    )  # fmt: skip
    p.add_argument("--gpu-per-replica", type=float, default=1.0)
    p.add_argument("--policy", default="surge=25", help="surge=P or unavailable=P")
    p.add_argument("--tick", type=float, default=None, help="ROLLOUT_TICK_S for the controller")
    a = p.parse_args()
    mode, _, pct = a.policy.partition("=")
    a.policy_field = {"surge": "max_surge_percent", "unavailable": "max_unavailable_percent"}[mode]
    a.policy_percent = int(pct)
    if a.gpus == "auto":
        a.gpus = None
    elif a.gpus is None:
        a.gpus = int(a.replicas * 2 * a.gpu_per_replica + 1)
    else:
        a.gpus = int(a.gpus)

    from executor import cluster
    from executor.status import format_event
    from rollout import history as h

    tmp = Path(tempfile.mkdtemp(prefix="rollout-bench-"))
    os.environ["ROLLOUT_HOME"] = str(tmp / "home")
    if a.tick:
        os.environ["ROLLOUT_TICK_S"] = str(a.tick)
    paths = [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    os.chdir(REPO)
    info = cluster.start_local(num_gpus=a.gpus, num_cpus=max(8, a.replicas * 2))
    try:
        cluster.connect(info.address)
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]

        def rollout(*args: str) -> subprocess.CompletedProcess[str]:
            cmd = [sys.executable, "-m", "rollout.cli", *args]
            return subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)

        first = rollout("deploy", str(deploy_file(tmp, "v1", a, port)))
        if first.returncode != 0:
            print(first.stdout, first.stderr)
            return 1
        with Poller() as poller:
            done = rollout("deploy", str(deploy_file(tmp, "v2", a, port)))
        if done.returncode != 0:
            print(done.stdout, done.stderr)
            return 1
        rollout_id = done.stdout.splitlines()[0]
        events = json.loads(rollout("history", rollout_id, "--json").stdout)
        print(f"history of {rollout_id}:")
        for e in events:
            print("  " + format_event(h.EVENT.validate_python(e)))
        rows = analyse(events, poller.running_at.get("bench_v2", {}))
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/bench", timeout=30) as r:
            print(f"GET /bench after the rollout: {r.read().decode()}")
    finally:
        import shutil

        import ray

        ray.shutdown()
        cluster.stop_local()
        shutil.rmtree(tmp, ignore_errors=True)
    tick = os.environ.get("ROLLOUT_TICK_S", "0.2")
    gpus = "the real GPUs" if a.gpus is None else f"{a.gpus} logical GPUs"
    print(
        f"\n{a.replicas} replicas x {a.gpu_per_replica:g} GPU, {a.policy}, load delay "
        f"{a.load_delay:g} s, controller tick {tick} s, {gpus}"
    )
    print(f"{'step':>4}  {'ready→shifted s':>15}  {'shifted→removal s':>17}  {'Serve start s':>13}")
    for r in rows:
        print(
            f"{r['step']:>4}  {r['ready_to_shifted_s']:>15.3f}  {r['shifted_to_removal_s']:>17.3f}"
            f"  {r['serve_start_s']:>13.3f}"
        )
    if not rows:
        print("no step could be measured")
        return 1
    med_shift = statistics.median(r["ready_to_shifted_s"] for r in rows)
    removals = [
        r["shifted_to_removal_s"]
        for r in rows
        if r["shifted_to_removal_s"] == r["shifted_to_removal_s"]
    ]
    med_remove = statistics.median(removals) if removals else 0.0
    med_start = statistics.median(r["serve_start_s"] for r in rows)
    added = med_shift + med_remove
    print(
        f"median  ready→shifted {med_shift:.3f} s, shifted→removal {med_remove:.3f} s, "
        f"added per step {added:.3f} s; Serve's replica start {med_start:.3f} s "
        f"(added/start = {added / med_start:.2f})"
    )
    print(f"requirement: median added latency per step < 1 s: {'met' if added < 1 else 'NOT met'}")
    return 0 if added < 1 else 1


if __name__ == "__main__":
    sys.exit(main())
