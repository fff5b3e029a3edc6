"""Autoscaling on a real local cluster before, during and after a rollout (6 logical GPUs).

Between rollouts Serve's own autoscaling sizes the live version (the deploy file's
`autoscaling` as Serve's `autoscaling_config`); a rollout's controller takes the pool over at
the live count, resizes both versions as the load changes, and hands the winner back to Serve
at its size. Load is closed-loop client threads against the router (each keeps about one
request in flight, on a model answering in 0.3 s), so N threads want about N replicas at
`target_ongoing_requests: 1`, and no load leaves `min_replicas: 2`. Every test records each
version's running replicas and Serve's target over time and prints them (`-s` or `-rP`).

The tests follow one model through its life (first deploy, rollout to v2, rollout back to v1);
each starts from whatever version serves, so any of them also runs alone.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
from executor_fixtures import (
    GPUS,
    RayCluster,
    Sampler,
    live_version,
    other,
    ray_cluster,
    remove,
    serve_details,
    wait_for,
)

from examples.load import Answer, Load

pytestmark = pytest.mark.ray
__all__ = ["ray_cluster"]  # the module-scoped fixture, imported for pytest

NAME = "scale"
AUTOSCALING = {
    "min_replicas": 2,
    "max_replicas": GPUS,
    "target_ongoing_requests": 1,
    "upscale_delay_s": 1,
    "downscale_delay_s": 4,
    "look_back_period_s": 2,
    "metrics_interval_s": 0.5,
    "interval_s": 0.5,
}


def deploy_file(c: RayCluster, version: str, **over: Any) -> Any:
    model = {
        "args": {"weights": f"examples/weights-{version}.npz", "load_delay_s": 0.3, "work_s": 0.3},
        "max_ongoing_requests": 2,
    }
    return c.deploy_file(
        NAME,
        version,
        model=model,
        replicas=2,
        autoscaling=AUTOSCALING,
        policy={"max_surge_percent": 50, "stabilization_time_seconds": 1},
        **over,
    )


# ---- watching the cluster --------------------------------------------------------------------


def scaling(version: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    """One version's deployment as Serve reports it: running replica ids, target, autoscaled."""
    details = details if details is not None else serve_details()
    app = details.get("applications", {}).get(f"{NAME}_{version}") or {}
    dep = next(iter((app.get("deployments") or {}).values()), {})
    running = {r["replica_id"] for r in dep.get("replicas", []) if _name(r["state"]) == "RUNNING"}
    conf = (dep.get("deployment_config") or {}).get("autoscaling_config")
    serve = bool(conf) and conf["min_replicas"] < conf["max_replicas"]  # not pinned to one count
    return {"running": running, "target": dep.get("target_num_replicas"), "serve": serve}


def _name(state: Any) -> str:
    return str(getattr(state, "value", state))


class Recorder(Sampler):
    """Each version's running replicas and Serve's target, sampled from a thread."""

    every_s = 0.3

    def sample(self) -> tuple[float, dict[str, dict[str, Any]]]:
        details = serve_details()
        now = {v: scaling(v, details) for v in ("v1", "v2")}
        return time.time(), {v: s for v, s in now.items() if s["target"]}

    def timeline(self, title: str, marks: dict[str, float]) -> list[str]:
        """The changes only: `+12.3 s  v1 2/2 (serve)  v2 1/1 (fixed)`, plus named marks."""
        if not self.samples:
            return []
        t0 = self.samples[0][0]
        lines, last = [f"replica counts over time, {title} (running/target, who scales):"], ""
        events = sorted([(t, f"-- {m}") for m, t in marks.items()])
        for t, now in self.samples:
            while events and events[0][0] <= t:
                et, text = events.pop(0)
                lines.append(f"  {et - t0:+7.1f} s  {text}")
            row = "  ".join(
                f"{v} {len(s['running'])}/{s['target']} ({'serve' if s['serve'] else 'fixed'})"
                for v, s in sorted(now.items())
            )
            if row != last:
                lines.append(f"  {t - t0:+7.1f} s  {row}")
                last = row
        lines += [f"  {et - t0:+7.1f} s  {text}" for et, text in events]
        print("\n".join(lines), flush=True)
        return lines


class Clients:
    """Closed-loop client threads against the router; more can be added, all stop together."""

    def __init__(self, c: RayCluster) -> None:
        self.url = c.url(NAME)
        self.loads: list[Load] = []
        self.answers: list[Answer] = []  # of the loads stopped so far

    def add(self, threads: int) -> None:
        self.loads.append(
            Load(self.url, threads=threads, pause_s=0.0, max_seconds=200, timeout_s=30).start()
        )

    def drop(self, threads: int) -> None:
        """Stop the newest loads until `threads` fewer run (loads are stopped whole)."""
        while threads > 0:
            load = self.loads.pop()
            self.answers += load.stop()
            threads -= load.threads
        assert threads == 0

    def stop(self) -> list[Answer]:
        while self.loads:
            self.answers += self.loads.pop().stop()
        return sorted(self.answers, key=lambda a: a.t)


def no_failures(answers: list[Answer]) -> None:
    failed = [a for a in answers if a.version is None]
    assert answers and not failed, f"{len(failed)} of {len(answers)} failed: {failed[:3]}"
    print(f"{len(answers)} requests, {len(failed)} failed", flush=True)


def history(c: RayCluster, rollout_id: str) -> list[dict[str, Any]]:
    """The rollout's recorded events, read in this process (cheap to poll)."""
    from executor import status, store

    st, _ = store.find(rollout_id)
    events, _ = status.read_history(status.client(st.url), rollout_id)
    return [e.model_dump(mode="json") for e in events]


def applied(events: list[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    return [e for e in events if e["kind"] == "action_applied" and e["action"].startswith(prefix)]


def serve_settles(version: str, n: int, timeout: float = 60) -> dict[str, Any]:
    """Wait until Serve's autoscaling holds `version` at `n` running replicas."""

    def at_n() -> dict[str, Any] | None:
        s = scaling(version)
        return s if s["serve"] and s["target"] == n and len(s["running"]) == n else None

    return wait_for(at_n, timeout, 0.3, f"Serve to hold {version} at {n} replicas")


def handed_back(version: str) -> dict[str, Any]:
    """The version once Serve applied the hand-back (`deploy_apps` returns before Serve's
    controller has applied the new config)."""
    return wait_for(
        lambda: (s := scaling(version))["serve"] and s, 20, 0.2, f"{version} handed to Serve"
    )


def ended(c: RayCluster, rollout_id: str, timeout: float = 120) -> dict[str, Any]:
    return wait_for(
        lambda: (s := c.peek(rollout_id))["state"] in ("succeeded", "failed", "cancelled") and s,
        timeout,
        0.3,
        f"rollout {rollout_id} to end",
    )


def live_or_deploy(c: RayCluster) -> str:
    live = live_version(NAME)
    if live:
        return live
    out = c.cli("deploy", str(deploy_file(c, "v1")))
    assert out.returncode == 0, out.stdout + out.stderr
    return "v1"


@pytest.fixture(scope="module", autouse=True)
def _cleanup(ray_cluster: RayCluster) -> Iterator[None]:
    yield
    remove(NAME)


@pytest.fixture
def clients(ray_cluster: RayCluster) -> Iterator[Clients]:
    """The test's clients, stopped when it ends (also when it fails: load left running would
    keep the next test's version scaled up)."""
    got = Clients(ray_cluster)
    yield got
    got.stop()


# ---- the tests -------------------------------------------------------------------------------


def test_the_live_version_scales_up_and_down_between_rollouts(
    ray_cluster: RayCluster, clients: Clients
) -> None:
    c = ray_cluster
    marks: dict[str, float] = {}
    with Recorder() as rec:
        if live_version(NAME) is None:
            out = c.cli("deploy", str(deploy_file(c, "v1")))
            assert out.returncode == 0, out.stdout + out.stderr
            rollout_id = out.stdout.splitlines()[0]
            marks["first deploy done"] = time.time()
            # the first deploy ends by handing v1 to Serve's autoscaling at its 2 replicas
            handed = applied(history(c, rollout_id), "hand v1 to Serve's autoscaling at 2")
            assert len(handed) == 1
        version = live_version(NAME)
        assert version is not None
        serve_settles(version, 2)
        clients.add(4)
        marks["load: 4 clients"] = time.time()

        def grown() -> dict[str, Any] | None:
            s = scaling(version)
            return s if s["target"] >= 4 and len(s["running"]) == s["target"] else None

        up = wait_for(grown, 60, 0.3, f"Serve to scale {version} up")
        status = c.cli("status", NAME, "--json")
        assert status.returncode == 0, status.stderr
        live = json.loads(status.stdout)["live"][version]
        assert live["scaled_by"] == "serve" and live["running"] >= 4
        text = c.cli("status", NAME).stdout  # a moment later: Serve may have moved on
        line = re.search(rf"live {version}: (\d+) running, target (\d+) \(by (.*)\)", text)
        assert line, text
        assert int(line[1]) >= 4 and int(line[2]) >= 4 and line[3] == "Serve's autoscaling, 2–6"

        clients.drop(4)
        marks["load: none"] = time.time()
        down = serve_settles(version, 2)
        assert down["running"] < up["running"]
        answers = clients.stop()
    rec.timeline("the live version between rollouts", marks)
    no_failures(answers)
    # the first deploy's hand-back restarted nothing: from its first 2 running replicas on,
    # the version never ran fewer than 2 (Serve's minimum)
    counts = [len(s[version]["running"]) for _, s in rec.samples if version in s]
    first = next(i for i, n in enumerate(counts) if n >= 2)
    assert min(counts[first:]) >= 2, counts


def test_a_rollout_takes_the_pool_over_resizes_with_the_load_and_hands_it_back(
    ray_cluster: RayCluster, clients: Clients
) -> None:
    c = ray_cluster
    old = live_or_deploy(c)
    new = other(old)
    marks: dict[str, float] = {}
    with Recorder() as rec:
        serve_settles(old, 2)
        rollout_id = c.deploy_detached(deploy_file(c, new))
        marks["rollout started"] = time.time()
        clients.add(2)
        marks["load: 2 clients"] = time.time()
        assert c.cli("pause", rollout_id).returncode == 0
        paused = wait_for(
            lambda: (s := c.peek(rollout_id))["state"] == "paused" and s, 90, 0.3, "the pause"
        )
        marks["paused"] = time.time()
        # taken over at the live count, 2 (the deploy file says `replicas: 1`)
        assert paused["replicas"][old]["target"] + paused["replicas"][new]["target"] >= 2
        weight = paused["candidate_weight"]
        assert 0 < weight < 1
        assert not scaling(old)["serve"]  # the controller sizes it now, with num_replicas

        clients.add(2)  # 4 clients: the pool wants 4 or more (at most 4 fit with a surge)
        marks["load: 4 clients"] = time.time()

        def grown() -> dict[str, Any] | None:
            s = c.peek(rollout_id)["replicas"]
            big = s[old]["target"] + s[new]["target"] == 4 and s[new]["ready"] == s[new]["target"]
            return s if big and s[old]["ready"] == s[old]["target"] else None

        sizes = wait_for(grown, 60, 0.3, "both versions to grow to a pool of 4")
        assert sizes[old]["target"] >= 1 and sizes[new]["target"] >= 1
        marks["pool of 4 ready"] = time.time()
        split_from = time.time()
        wait_for(lambda: time.time() > split_from + 4, 10, 0.5, "answers at the new size")

        clients.drop(4)  # no load: the pool shrinks back to 2
        marks["load: none"] = time.time()
        split_to = time.time()

        def shrunk() -> dict[str, Any] | None:
            s = c.peek(rollout_id)["replicas"]
            return s if s[old]["target"] + s[new]["target"] == 2 else None

        small = wait_for(shrunk, 60, 0.3, "both versions to shrink to a pool of 2")
        assert small[old]["target"] == 1 and small[new]["target"] == 1
        marks["pool of 2"] = time.time()
        clients.add(1)
        marks["load: 1 client"] = time.time()

        assert c.cli("resume", rollout_id).returncode == 0
        end = ended(c, rollout_id)
        marks["rollout ended"] = time.time()
        after = handed_back(new)
        answers = clients.stop()
    lines = rec.timeline(f"rollout {old} → {new} under changing load", marks)
    assert end["state"] == "succeeded", end
    no_failures(answers)

    events = history(c, rollout_id)
    resized = [e for e in events if e["kind"] == "resized"]
    print("resized:", [(e["desired_from"], e["desired_to"]) for e in resized], flush=True)
    assert any(e["desired_to"] == 4 for e in resized)
    assert any(e["desired_from"] > e["desired_to"] == 2 for e in resized)
    # the split follows the weight while the pool was 4
    window = [a for a in answers if split_from <= a.t < split_to]
    share = sum(a.version == new for a in window) / len(window)
    assert len(window) >= 30 and abs(share - weight) <= 0.12 + 3 * math.sqrt(0.25 / len(window))

    # handed back to Serve at the size it had, with no restart: the replicas running when the
    # rollout ended are the very ones that served before the hand-back
    handed = applied(events, f"hand {new} to Serve's autoscaling at ")
    assert len(handed) == 1, events[-5:]
    n = int(handed[0]["action"].rsplit(" ", 1)[1])
    before = [s[new]["running"] for t, s in rec.samples if t < handed[0]["t"] - 0.2 and new in s]
    assert after["serve"] and after["target"] == n and before[-1] <= after["running"], (
        after,
        before[-1],
        lines,
    )
    assert old not in {v for _, s in rec.samples[-1:] for v in s}


def test_a_surge_rollout_on_a_full_cluster_is_capped_and_completes(
    ray_cluster: RayCluster, clients: Clients
) -> None:
    c = ray_cluster
    old = live_or_deploy(c)
    new = other(old)
    clients.add(GPUS)  # the live version grows to every GPU of the cluster
    marks: dict[str, float] = {}
    with Recorder() as rec:
        serve_settles(old, GPUS, timeout=90)
        marks[f"{old} at {GPUS} replicas, all GPUs"] = time.time()
        out = c.cli("deploy", str(deploy_file(c, new)), timeout=180)
        marks["rollout ended"] = time.time()
        assert out.returncode == 0, out.stdout + out.stderr
        rollout_id = out.stdout.splitlines()[0]
        # back with Serve, the new version grows to the load again
        regrown = serve_settles(new, GPUS, timeout=90)
        marks[f"{new} back at {GPUS}"] = time.time()
        answers = clients.stop()
    rec.timeline(f"capped rollout {old} → {new} on a full cluster", marks)
    no_failures(answers)
    assert regrown["serve"]
    # the controller took the pool over at the live count (6), not the deploy file's 2, and
    # pinning the old version restarted none of its replicas (those kept are Serve's own)
    served = [s[old]["running"] for _, s in rec.samples if old in s and s[old]["serve"]]
    pinned = next(s[old]["running"] for _, s in rec.samples if old in s and not s[old]["serve"])
    assert len(served[-1]) == GPUS and pinned and pinned <= served[-1]

    events = c.history(rollout_id)  # as `rollout history` prints it
    assert events[0]["kind"] == "rollout_started" and events[0]["desired"] == GPUS
    capped = [e for e in events if e["kind"] == "capped"]
    print("capped:", [(e["desired"], e["allowed"], e["reason"]) for e in capped], flush=True)
    # 6 GPUs at 50 % surge: a pool of 4 leaves room for its surge of 2
    assert capped and capped[0]["desired"] == GPUS and capped[0]["allowed"] == 4
    assert capped[0]["capacity"] == GPUS
    # uncapped, the step would need 6 + 3 GPUs and wait out its 90 s deadline
    assert marks["rollout ended"] - marks[f"{old} at {GPUS} replicas, all GPUs"] < 60
    assert applied(events, f"hand {new} to Serve's autoscaling at 4")


def test_a_cancelled_rollout_hands_the_old_version_back(
    ray_cluster: RayCluster, clients: Clients
) -> None:
    c = ray_cluster
    old = live_or_deploy(c)
    new = other(old)
    clients.add(1)
    marks: dict[str, float] = {}
    with Recorder() as rec:
        before = serve_settles(old, 2)
        rollout_id = c.deploy_detached(deploy_file(c, new))
        marks["rollout started"] = time.time()
        assert c.cli("cancel", rollout_id).returncode == 0
        end = ended(c, rollout_id)
        marks["rollout ended"] = time.time()
        after = handed_back(old)
        answers = clients.stop()
    rec.timeline(f"cancelled rollout {old} → {new}", marks)
    assert end["state"] == "cancelled", end
    no_failures(answers)
    handed = applied(history(c, rollout_id), f"hand {old} to Serve's autoscaling at 2")
    assert len(handed) == 1
    # back with Serve at 2, on the very replicas that served before the rollout
    assert after["serve"] and after["target"] == 2 and after["running"] == before["running"]
    assert new not in {v for _, s in rec.samples[-1:] for v in s}
