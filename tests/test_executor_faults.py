"""Faults injected into real rollouts on a local Ray cluster, under HTTP load: each test checks
the rollout's end state (from its history and from the cluster) and counts failed requests.

One cluster and one model (`faults`) for the module; each test rolls from whatever version
serves, so they run alone or together. The router-replica kill is in test_traffic_rollouts.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from executor_fixtures import (
    RayCluster,
    ensure_live,
    live_version,
    other,
    ray_cluster,
    remove,
    replicas,
    serve_details,
    wait_for,
)

from examples.load import Answer, Load

pytestmark = pytest.mark.ray
__all__ = ["ray_cluster"]

NAME = "faults"
THREADS = 3  # load threads: at most this many requests are in flight at any moment
TERMINAL = ("succeeded", "cancelled", "failed")


@pytest.fixture(autouse=True, scope="module")
def _cleanup(ray_cluster: RayCluster) -> Iterator[None]:
    yield
    remove(NAME)


@pytest.fixture(autouse=True)
def _no_rollout_left(ray_cluster: RayCluster) -> Iterator[None]:
    """A test that failed half way leaves no rollout in progress for the next one."""
    from executor import store

    yield
    if store.Store(store.default_url()).active(NAME):
        ray_cluster.cli("down", str(ray_cluster.deploy_file(NAME, "v1")))


def deploy(c: RayCluster, path: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`rollout deploy` in the foreground; on a timeout, the assertion shows the history."""
    try:
        return c.cli("deploy", str(path), timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        rollout_id = out.splitlines()[0]
        lines = [f"{x['kind']} {x}" for x in c.history(rollout_id)]
        why = f"deploy still running after {timeout:g} s:\n" + "\n".join(lines)
        raise AssertionError(why) from None


def under_load(c: RayCluster, run: Callable[[], Any]) -> tuple[Any, list[Answer]]:
    """`run()` while THREADS threads send requests to the model's router; the failed ones
    (printed with the total, for `pytest -rP` to show what was measured)."""
    load = Load(c.url(NAME), threads=THREADS, pause_s=0.04, max_seconds=240).start()
    started = time.monotonic()
    try:
        wait_for(lambda: len(load.answers) > 20, 30, what="the load to get answers")
        got = run()
        time.sleep(1.0)
    finally:
        answers = load.stop()
    failed = [a for a in answers if a.version is None]
    took = time.monotonic() - started
    print(f"measured: {len(failed)} of {len(answers)} requests failed over {took:.0f} s")
    return got, failed


def ended(c: RayCluster, rollout_id: str, timeout: float = 120) -> dict[str, Any]:
    return wait_for(
        lambda: (
            (s := c.peek(rollout_id))["state"] in TERMINAL and not s["controller"]["running"] and s
        ),
        timeout,
        what=f"rollout {rollout_id} to end",
    )


def finished(events: list[dict[str, Any]]) -> dict[str, Any]:
    ends = [e for e in events if e["kind"] == "finished"]
    assert len(ends) == 1, ends
    return ends[0]


def serving_only(version: str, gone: str, n: int = 2) -> None:
    """The cluster serves this version alone, with all its replicas running (never split)."""
    details = serve_details()
    assert f"{NAME}_{gone}" not in details["applications"]
    assert [r["state"] for r in replicas(details, f"{NAME}_{version}")] == ["RUNNING"] * n
    assert live_version(NAME) == version


def steps_completed(events: list[dict[str, Any]]) -> list[int]:
    return [e["step"] for e in events if e["kind"] == "step_completed"]


def test_a_crash_looping_candidate_fails_through_its_failed_starts(ray_cluster: RayCluster) -> None:
    """The candidate's weights file is missing: each replica dies while starting. With a
    240 s deadline, the rollout fails on `max_start_failures` within seconds, rolls back,
    and no request fails."""
    c = ray_cluster
    old = ensure_live(c, NAME)
    new = other(old)
    model = {"args": {"weights": "examples/weights-missing.npz", "load_delay_s": 0.3}}
    policy = {"max_surge_percent": 50, "max_start_failures": 3, "stabilization_time_seconds": 1}
    path = c.deploy_file(NAME, new, model=model, policy=policy, progress_deadline_s=240)
    started = time.monotonic()
    done, failed = under_load(c, lambda: deploy(c, path))
    took = time.monotonic() - started
    assert done.returncode == 1, done.stdout + done.stderr
    rollout_id = done.stdout.splitlines()[0]
    assert c.status(rollout_id)["state"] == "failed"
    end = finished(c.history(rollout_id))
    assert end["outcome"] == "failed" and "failed to start" in end["reason"], end
    assert took < 60, f"took {took:.0f} s: failed starts were not counted"
    print(f"measured: failed after {took:.0f} s: {end['reason']}")
    assert not failed, f"{len(failed)} requests failed: {failed[:3]}"
    serving_only(old, new)


def test_a_killed_candidate_replica_is_replaced_and_the_rollout_completes(
    ray_cluster: RayCluster,
) -> None:
    """`ray.kill` on a ready candidate replica while the first step stabilizes: Serve starts a
    new one, the rollout completes; only requests in flight on the killed replica may fail."""
    import ray

    c = ray_cluster
    old = ensure_live(c, NAME)
    new = other(old)
    policy = {"max_surge_percent": 50, "stabilization_time_seconds": 3}
    path = c.deploy_file(NAME, new, policy=policy)

    def run() -> str:
        rollout_id = c.deploy_detached(path)
        wait_for(
            lambda: c.peek(rollout_id)["candidate_weight"] > 0, 90, what="traffic on the candidate"
        )
        reps = [r for r in replicas(serve_details(), f"{NAME}_{new}") if r["state"] == "RUNNING"]
        ray.kill(ray.get_actor(reps[0]["actor_name"], namespace="serve"), no_restart=True)
        ended(c, rollout_id)
        return rollout_id

    rollout_id, failed = under_load(c, run)
    assert c.status(rollout_id)["state"] == "succeeded"
    assert finished(c.history(rollout_id))["outcome"] == "succeeded"
    assert len(failed) <= THREADS, f"{len(failed)} requests failed: {failed[:3]}"
    serving_only(new, old)


def test_serves_controller_killed_mid_rollout_never_leaves_it_split(
    ray_cluster: RayCluster,
) -> None:
    """Serve's controller actor is killed while a step waits for its candidates (Ray restarts
    it): the rollout ends decided — succeeded with only the new version serving, or failed and
    rolled back with only the old one — whichever its history says."""
    import ray

    c = ray_cluster
    old = ensure_live(c, NAME)
    new = other(old)
    model = {"args": {"weights": f"examples/weights-{new}.npz", "load_delay_s": 1.5}}
    policy = {"max_surge_percent": 50, "stabilization_time_seconds": 1}
    path = c.deploy_file(NAME, new, model=model, policy=policy)

    def run() -> str:
        rollout_id = c.deploy_detached(path)
        wait_for(
            lambda: c.peek(rollout_id)["replicas"].get(new, {}).get("target", 0) > 0,
            90,
            what="a step starting its candidates",
        )
        ray.kill(ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve"), no_restart=False)
        ended(c, rollout_id, timeout=180)
        return rollout_id

    rollout_id, failed = under_load(c, run)
    events = c.history(rollout_id)
    outcome = finished(events)["outcome"]
    print(f"measured: the rollout {outcome}: {finished(events)['reason']}")
    assert c.status(rollout_id)["state"] == outcome
    if outcome == "succeeded":
        serving_only(new, old)
    else:
        assert outcome == "failed", events[-3:]
        serving_only(old, new)
    assert len(failed) <= THREADS, f"{len(failed)} requests failed: {failed[:3]}"


def test_a_hung_health_check_never_turns_ready_and_the_step_fails(
    ray_cluster: RayCluster,
) -> None:
    """The candidate's `check_health` never answers (tests/faulty_model.py): its replica never
    counts as ready, the step fails at its progress deadline and rolls back; nothing fails."""
    c = ray_cluster
    old = ensure_live(c, NAME)
    model = {"import_path": "tests.faulty_model:app", "args": {"version": "v9"}}
    policy = {"max_surge_percent": 50, "stabilization_time_seconds": 1}
    path = c.deploy_file(NAME, "v9", model=model, policy=policy, progress_deadline_s=8)
    done, failed = under_load(c, lambda: deploy(c, path))
    assert done.returncode == 1, done.stdout + done.stderr
    rollout_id = done.stdout.splitlines()[0]
    events = c.history(rollout_id)
    end = finished(events)
    assert end["outcome"] == "failed" and "progress deadline" in end["reason"], end
    assert "0 of" in end["reason"] or "ready" in end["reason"]
    assert not any(e["kind"] == "weight_set" and e["candidate_weight"] > 0 for e in events)
    assert not failed, f"{len(failed)} requests failed: {failed[:3]}"
    serving_only(old, "v9")


def test_controller_killed_again_and_again_then_recovered(ray_cluster: RayCluster) -> None:
    """SIGKILL the controller at three moments of one rollout (a step starting its candidates,
    a stabilization window, the last step), `rollout recover` after each: it succeeds, the
    history has no gap or repeat, and nothing is left over."""
    c = ray_cluster
    old = ensure_live(c, NAME)
    new = other(old)
    model = {"args": {"weights": f"examples/weights-{new}.npz", "load_delay_s": 1.0}}
    policy = {"max_surge_percent": 25, "stabilization_time_seconds": 2}
    path = c.deploy_file(NAME, new, model=model, policy=policy, replicas=3)
    moments: list[Callable[[dict[str, Any]], bool]] = [
        lambda s: s["stage"] == "wait_healthy" and s["step"] == 0,
        lambda s: s["stage"] == "stabilize" and s["step"] == 1,
        lambda s: s["stage"] == "wait_healthy" and s["step"] == 2,
    ]
    histories: list[list[dict[str, Any]]] = []
    pids: list[int] = []
    controllers: list[subprocess.Popen[str]] = []

    def run() -> str:
        rollout_id = c.deploy_detached(path)
        for at in moments:
            s = wait_for(
                lambda at=at: (s := c.peek(rollout_id))["controller"]["running"] and at(s) and s,
                90,
                what="the moment to kill",
            )
            pids.append(int(s["controller"]["pid"]))
            os.kill(pids[-1], signal.SIGKILL)
            wait_for(lambda: not c.peek(rollout_id)["controller"]["running"], 10, what="death")
            histories.append(c.history(rollout_id))
            if at is not moments[-1]:  # the next controller, killed at the next moment
                controllers.append(c.popen("recover", str(path)))
        done = c.cli("recover", str(path))
        assert done.returncode == 0, done.stdout + done.stderr
        return rollout_id

    try:
        rollout_id, failed = under_load(c, run)
    finally:
        for proc in controllers:
            proc.kill()
            proc.communicate(timeout=30)
    assert len(set(pids)) == 3
    assert pids[1:] == [p.pid for p in controllers]
    assert c.status(rollout_id)["state"] == "succeeded"
    events = c.history(rollout_id)
    for before in histories:
        assert events[: len(before)] == before  # nothing recorded was lost or rewritten
    times = [e["t"] for e in events]
    assert times == sorted(times)
    assert steps_completed(events) == [1, 2, 3]
    scaled = [(e["version"], e["replicas"]) for e in events if e["kind"] == "scaled"]
    assert len(scaled) == len(set(scaled))  # no scale change decided twice
    assert finished(events)["outcome"] == "succeeded"
    assert not failed, f"{len(failed)} requests failed: {failed[:3]}"
    serving_only(new, old, n=3)


def test_ctrl_c_hands_the_rollout_to_a_background_controller(ray_cluster: RayCluster) -> None:
    """Ctrl-C on a foreground deploy: one line says a background controller continues it,
    which then completes the rollout."""
    c = ray_cluster
    old = ensure_live(c, NAME)
    new = other(old)
    policy = {"max_surge_percent": 50, "stabilization_time_seconds": 2}
    path = c.deploy_file(NAME, new, policy=policy)

    def run() -> tuple[str, str, int]:
        proc = c.popen("deploy", str(path))
        assert proc.stdout is not None
        rollout_id = proc.stdout.readline().strip()
        first = wait_for(
            lambda: (s := c.peek(rollout_id))["step"] >= 1 and s, 90, what="the first step"
        )
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        ended(c, rollout_id)
        return rollout_id, err, int(first["controller"]["pid"])

    (rollout_id, err, pid), failed = under_load(c, run)
    said = [line for line in err.splitlines() if line.startswith("interrupted:")]
    assert len(said) == 1 and "continues in a background controller" in said[0], err
    assert "Traceback" not in err
    end = c.status(rollout_id)
    assert end["state"] == "succeeded"
    assert end["controller"]["pid"] not in (None, pid)  # another process finished it
    assert not failed, f"{len(failed)} requests failed: {failed[:3]}"
    serving_only(new, old)


def test_a_second_ctrl_c_cancels_the_rollout(ray_cluster: RayCluster) -> None:
    c = ray_cluster
    old = ensure_live(c, NAME)
    new = other(old)
    policy = {"max_surge_percent": 50, "stabilization_time_seconds": 30}
    path = c.deploy_file(NAME, new, policy=policy)
    proc = c.popen("deploy", str(path))
    assert proc.stdout is not None and proc.stderr is not None
    rollout_id = proc.stdout.readline().strip()
    wait_for(lambda: c.peek(rollout_id)["step"] >= 1, 90, what="the first step")
    proc.send_signal(signal.SIGINT)
    line = proc.stderr.readline()
    while line and not line.startswith("interrupted:"):
        line = proc.stderr.readline()
    assert "press Ctrl-C again" in line
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert f"cancel sent to rollout {rollout_id}" in err
    end = ended(c, rollout_id)
    assert end["state"] == "cancelled"
    events = c.history(rollout_id)
    assert [e["control"] for e in events if e["kind"] == "control_applied"] == ["cancel"]
    serving_only(old, new)
