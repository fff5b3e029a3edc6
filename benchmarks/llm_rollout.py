"""The LLM example rolled v1 → v2 under a trace replay, end to end, with the real commands.

Starts a local cluster (logical GPUs, or the machine's real ones with `--gpus auto`), deploys
examples/deploy-llm-v1.yaml with `rollout deploy`, starts `rollout load` on the Azure code trace
(sped up by `--time-scale`), rolls to v2 with `rollout deploy` while the replay runs, and prints
the replay's summary (latency and TTFT per version), each replica's start time as Serve saw it,
and the controller's added time per step (as benchmarks/executor_overhead.py measures it).

Usage: python benchmarks/llm_rollout.py [--backend auto|torch|profile] [--gpus auto|N]
       [--gpu-per-replica 1] [--time-scale 2] [--duration-s 120]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="auto")
    p.add_argument("--gpus", default="8", help="logical GPUs, or 'auto' for the real ones")
    p.add_argument("--gpu-per-replica", type=float, default=1.0)
    p.add_argument("--time-scale", type=float, default=2.0)
    p.add_argument("--duration-s", type=float, default=120.0)
    a = p.parse_args()

    from executor_overhead import Poller, analyse

    from executor import cluster

    tmp = Path(tempfile.mkdtemp(prefix="rollout-llm-"))
    os.environ["ROLLOUT_HOME"] = str(tmp / "home")
    os.chdir(REPO)
    gpus = None if a.gpus == "auto" else int(a.gpus)
    info = cluster.start_local(num_gpus=gpus, num_cpus=16)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(REPO))

    def rollout(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "rollout.cli", *args]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)

    def deploy_file(version: str) -> Path:
        spec = yaml.safe_load((REPO / "examples" / f"deploy-llm-{version}.yaml").read_text())
        spec["model"]["args"]["backend"] = a.backend
        spec["model"]["ray_actor_options"]["num_gpus"] = a.gpu_per_replica
        spec["cluster"] = {"num_gpus": gpus} if gpus is not None else {}
        spec["http"]["port"] = port
        path = tmp / f"llm-{version}.yaml"
        path.write_text(yaml.safe_dump(spec))
        return path

    try:
        cluster.connect(info.address)
        started = time.monotonic()
        first = rollout("deploy", str(deploy_file("v1")))
        if first.returncode != 0:
            print(first.stdout, first.stderr)
            return 1
        print(f"v1 deployed in {time.monotonic() - started:.1f} s")
        out = tmp / "replay"
        trace = REPO / "data" / "traces" / "azure_llm_2023_code.csv"
        replay = subprocess.Popen(
            [sys.executable, "-m", "rollout.cli", "load", str(trace), "--url",
             f"http://127.0.0.1:{port}/llm", "--time-scale", str(a.time_scale),
             "--duration-s", str(a.duration_s), "--out", str(out)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        time.sleep(5)
        with Poller() as poller:
            done = rollout("deploy", str(deploy_file("v2")))
        stdout, stderr = replay.communicate(timeout=a.duration_s / a.time_scale + 300)
        if done.returncode != 0 or replay.returncode != 0:
            print(done.stdout, done.stderr, stdout, stderr)
            return 1
        rollout_id = done.stdout.splitlines()[0]
        events = json.loads(rollout("history", rollout_id, "--json").stdout)
        rows = analyse(events, poller.running_at.get("llm_v2", {}))
    finally:
        import ray

        ray.shutdown()
        cluster.stop_local()
        shutil.rmtree(tmp, ignore_errors=True)
    print(stdout)
    print(f"{'step':>4}  {'ready→shifted s':>15}  {'shifted→removal s':>17}  {'Serve start s':>13}")
    for r in rows:
        print(
            f"{r['step']:>4}  {r['ready_to_shifted_s']:>15.3f}  {r['shifted_to_removal_s']:>17.3f}"
            f"  {r['serve_start_s']:>13.3f}"
        )
    if rows:
        added = [r["ready_to_shifted_s"] + (r["shifted_to_removal_s"] or 0.0) for r in rows]
        print(
            f"median added per step {statistics.median(added):.3f} s; median replica start "
            f"{statistics.median(r['serve_start_s'] for r in rows):.2f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
