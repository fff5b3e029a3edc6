"""The metric guard on a real local Ray cluster: a bad version rolled out over v1 under load is
cancelled by the guard with no operator action and traffic returns to v1; a good version with the
guard on succeeds. The guard reads the router's per-version window (executor/router_metrics.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from executor_fixtures import (
    RayCluster,
    ensure_live,
    other,
    ray_cluster,
    remove,
    replicas,
    serve_details,
    wait_for,
)

from examples.load import Load

pytestmark = pytest.mark.ray
__all__ = ["ray_cluster"]  # the shared module-scoped cluster fixture

NAME = "guarded"
GUARD = {"window_s": 10, "min_requests": 15, "max_error_rate": 0.05, "action": "cancel"}


@pytest.fixture(autouse=True, scope="module")
def _cleanup(ray_cluster: RayCluster) -> Iterator[None]:
    yield
    remove(NAME)


def deploy_under_load(c: RayCluster, version: str, args: dict[str, Any]) -> tuple[Any, ...]:
    """Roll `version` out over the live one while three clients send requests; returns the
    rollout id, every answer and when the deploy started."""
    path = c.deploy_file(
        NAME,
        version,
        model={"args": {"weights": f"examples/weights-{version}.npz", "load_delay_s": 0.3} | args},
        policy={"max_surge_percent": 50, "stabilization_time_seconds": 20, "guard": GUARD},
    )
    load = Load(c.url(NAME), threads=3, pause_s=0.03, max_seconds=180).start()
    wait_for(lambda: len(load.answers) > 20, 30, what="the load to get answers")
    started = time.time()
    done = c.cli("deploy", str(path))
    time.sleep(1.5)
    answers = load.stop()
    return done.stdout.splitlines()[0], answers, started, done


def test_a_bad_version_is_cancelled_by_the_guard_and_traffic_returns(ray_cluster: RayCluster):
    c = ray_cluster
    old = ensure_live(c, NAME)
    new = other(old)
    rollout_id, answers, started, done = deploy_under_load(
        c, new, {"error_rate": 0.5, "work_s": 0.05}
    )
    assert done.returncode == 1, done.stdout + done.stderr  # the deploy did not succeed
    assert c.status(rollout_id)["state"] == "cancelled"
    events = c.history(rollout_id)
    assert not [e for e in events if e["kind"] == "control_received"]  # no operator action
    (breach,) = [e for e in events if e["kind"] == "guard_breached"]
    assert breach["metric"] == "error_rate" and breach["threshold"] == 0.05
    assert breach["window_s"] == 10 and breach["requests"] >= 15 and breach["value"] > 0.05
    finished = next(e for e in events if e["kind"] == "finished")
    assert finished["reason"].startswith("guard: error_rate")
    assert finished["outcome"] == "cancelled"

    # every failure came from the bad version while it had traffic; none after it was cancelled
    on_bad = [a for a in answers if a.t >= started and (a.version == new or a.version is None)]
    first_bad = min(a.t for a in on_bad)
    detect_s = breach["t"] - first_bad
    failed = sum(a.version is None for a in on_bad)
    print(f"\nreal guard: detected {detect_s:.2f} s after the first bad request; {len(on_bad)} bad")
    print(f"requests ({failed} failed)")
    assert 0 < detect_s < 20
    back = [e["t"] for e in events if e["kind"] == "weight_set" and e["candidate_weight"] == 0]
    tail = [a for a in answers if a.t > max(back) + 1.0]
    assert tail and all(a.version == old for a in tail)
    details = serve_details()
    assert f"{NAME}_{new}" not in details["applications"]
    assert [r["state"] for r in replicas(details, f"{NAME}_{old}")] == ["RUNNING"] * 2


def test_a_good_version_with_the_guard_on_succeeds(ray_cluster: RayCluster):
    c = ray_cluster
    old = ensure_live(c, NAME)
    new = other(old)
    rollout_id, answers, _, done = deploy_under_load(c, new, {})
    assert done.returncode == 0, done.stdout + done.stderr
    assert c.status(rollout_id)["state"] == "succeeded"
    events = c.history(rollout_id)
    assert not [e for e in events if e["kind"] == "guard_breached"]
    checks = [e for e in events if e["kind"] == "metrics_checked"]
    assert checks and checks[0]["verdict"] == "passed" and checks[0]["requests"] >= 15
    assert not [a for a in answers if a.version is None]
    tail = [a for a in answers if a.t > answers[-1].t - 1.0]
    assert tail and all(a.version == new for a in tail)
