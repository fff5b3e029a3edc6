"""Record Serve's details JSON during real faults, for the observation unit tests.

`python tests/record_serve_details.py` (under the heavy-job lock) starts a local cluster with
logical GPUs, deploys v1 of the example model, then beside it: a candidate whose weights file is
missing (crash-looping constructor), a candidate whose health check hangs, and a good candidate
(STARTING → RUNNING), and finally scales v1 down (STOPPING). Each distinct state of the model's
applications is written to tests/data/serve_details/<scenario>.json as a list of snapshots
`{"t", "free_gpus", "total_gpus", "details"}` (only the model's applications are kept).
"""

from __future__ import annotations

import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "tests" / "data" / "serve_details"
GPUS = 4


def app_config(label: str, replicas: int, **args: Any) -> dict[str, Any]:
    import_path = args.pop("import_path", "examples.model:app")
    dep = "HungHealthCheck" if "faulty" in import_path else "Model"
    return {
        "name": f"m_{label}",
        "route_prefix": None,
        "import_path": import_path,
        "args": args,
        "runtime_env": {"env_vars": {"PYTHONPATH": str(REPO)}},
        "deployments": [
            {
                "name": dep,
                "num_replicas": replicas,
                "ray_actor_options": {"num_gpus": 1, "num_cpus": 0.1},
                "health_check_period_s": 1,
                "health_check_timeout_s": 3,
                "graceful_shutdown_timeout_s": 1,
                "graceful_shutdown_wait_loop_s": 1,
            }
        ],
    }


def trimmed(details: dict[str, Any]) -> dict[str, Any]:
    apps = {k: v for k, v in details.get("applications", {}).items() if k.startswith("m_")}
    return {"applications": copy.deepcopy(apps)}


def key(snapshot: dict[str, Any]) -> str:
    """What makes a snapshot new: states, replica ids, nodes and statuses, not timestamps."""
    out = []
    for name, app in sorted(snapshot["applications"].items()):
        out.append((name, app.get("status")))
        for dname, dep in sorted(app.get("deployments", {}).items()):
            out.append((dname, dep.get("status"), dep.get("message", "")[:60]))
            for r in dep.get("replicas", []):
                out.append((r["replica_id"], r["state"], bool(r.get("node_id"))))
    return json.dumps(out)


def record(scenario: str, seconds: float, until: Any = None) -> None:
    import ray

    from executor.cluster import serve_client

    snaps, last = [], ""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        details = trimmed(serve_client().get_serve_details())
        k = key(details)
        if k != last:
            last = k
            snaps.append(
                {
                    "t": time.time(),
                    "free_gpus": float(ray.available_resources().get("GPU", 0.0)),
                    "total_gpus": float(ray.cluster_resources().get("GPU", 0.0)),
                    "details": details,
                }
            )
        if until is not None and until(details):
            break
        time.sleep(0.1)
    (OUT / f"{scenario}.json").write_text(json.dumps(snaps, indent=1, sort_keys=True) + "\n")
    print(f"{scenario}: {len(snaps)} snapshots", flush=True)


def main() -> int:
    from ray import serve

    from executor import cluster
    from executor.serve_calls import deploy

    home = Path(tempfile.mkdtemp(prefix="record-serve-"))
    os.environ["ROLLOUT_HOME"] = str(home)
    os.chdir(REPO)
    info = cluster.start_local(num_gpus=GPUS, num_cpus=8)
    try:
        cluster.connect(info.address)
        serve.start(http_options={"host": "127.0.0.1", "port": 18765})
        v1 = app_config("v1", 2, weights="examples/weights-v1.npz", load_delay_s=0.3)

        def running(app: str, n: int):
            def ok(d: dict[str, Any]) -> bool:
                deps = d["applications"].get(app, {}).get("deployments", {})
                reps = [r for dep in deps.values() for r in dep.get("replicas", [])]
                return sum(r["state"] == "RUNNING" for r in reps) >= n

            return ok

        deploy({"m_v1": v1})
        record("first_deploy", 60, running("m_v1", 2))
        crash = app_config("v2", 1, weights="examples/weights-missing.npz")
        deploy({"m_v1": v1, "m_v2": crash})
        record("crash_loop", 25)
        hung = app_config("v3", 1, import_path="tests.faulty_model:app", version="v3")
        deploy({"m_v1": v1, "m_v3": hung})
        record("hung_health_check", 12)
        good = app_config("v2", 1, weights="examples/weights-v2.npz", load_delay_s=1.0)
        deploy({"m_v1": v1, "m_v2": good})
        record("candidate_starts", 40, running("m_v2", 1))
        deploy({"m_v1": app_config("v1", 1, **v1["args"]), "m_v2": good})
        record("scale_down", 15, lambda d: len(d["applications"]["m_v1"]["deployments"]
                                               ["Model"]["replicas"]) == 1)  # fmt: skip
    finally:
        import ray

        ray.shutdown()
        cluster.stop_local()
    return 0


if __name__ == "__main__":
    sys.exit(main())
