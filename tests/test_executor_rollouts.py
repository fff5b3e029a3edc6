"""Real rollouts on a local Ray cluster with logical GPUs, driven through the `rollout` CLI.

Each test rolls a model from whatever version serves to the other one (v1 ↔ v2), so tests can
run alone or share a model's first deploy when run together.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import pytest
from executor_fixtures import (
    GPUS,
    Monitor,
    RayCluster,
    ensure_live,
    gpus_free,
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
__all__ = ["ray_cluster"]  # the module-scoped fixture, imported for pytest


def weight_windows(events: list[dict[str, Any]], started: float) -> list[tuple[float, float]]:
    """(time the router took it, candidate weight) for every weight the backend applied."""
    out = [(started, 0.0)]
    for e in events:
        if e["kind"] == "action_applied" and e["action"].startswith("weight "):
            out.append((e["t"], float(e["action"].split()[1])))
    return out


def check_split(
    answers: list[Answer], windows: list[tuple[float, float]], candidate: str, end: float
) -> int:
    """The observed share of the candidate between weight changes matches the weight."""
    checked = 0
    bounds = [*windows[1:], (end, 0.0)]
    for (t0, w), (t1, _) in zip(windows, bounds, strict=True):
        sample = [a for a in answers if t0 + 0.3 <= a.t < t1 and a.version]
        n = len(sample)
        if n < 30:
            continue
        share = sum(a.version == candidate for a in sample) / n
        tolerance = 0.08 + 3 * math.sqrt(w * (1 - w) / n)
        assert abs(share - w) <= tolerance, f"share {share:.3f} vs weight {w:.3f} over {n}"
        checked += 1
    return checked


def steps_completed(events: list[dict[str, Any]]) -> list[int]:
    return [e["step"] for e in events if e["kind"] == "step_completed"]


class TestModes:
    """A full rollout in each mode under steady HTTP load on the router."""

    NAME = "modes"

    @pytest.fixture(autouse=True, scope="class")
    @classmethod
    def _cleanup(cls, ray_cluster: RayCluster) -> Iterator[None]:
        yield
        remove(cls.NAME)

    @pytest.mark.parametrize(
        "policy,holding_bound,ready_floor",
        [
            ({"max_surge_percent": 25, "stabilization_time_seconds": 1.5}, 3, 2),
            ({"max_unavailable_percent": 50, "stabilization_time_seconds": 1.5}, 2, 1),
        ],
        ids=["surge", "unavailable"],
    )
    def test_rollout_under_load(
        self,
        ray_cluster: RayCluster,
        policy: dict[str, Any],
        holding_bound: int,
        ready_floor: int,
    ) -> None:
        c = ray_cluster
        old = ensure_live(c, self.NAME)
        new = other(old)
        path = c.deploy_file(self.NAME, new, policy=policy)
        apps = (f"{self.NAME}_{old}", f"{self.NAME}_{new}")
        load = Load(c.url(self.NAME), threads=3, pause_s=0.04, max_seconds=240).start()
        wait_for(lambda: len(load.answers) > 20, 30, what="the load to get answers")
        with Monitor(apps) as monitor:
            started = time.time()
            done = c.cli("deploy", str(path))
            time.sleep(1.5)
        answers = load.stop()
        assert done.returncode == 0, done.stdout + done.stderr
        rollout_id = done.stdout.splitlines()[0]

        failed = [a for a in answers if a.version is None]
        assert not failed, f"{len(failed)} of {len(answers)} requests failed: {failed[:3]}"

        events = c.history(rollout_id)
        windows = weight_windows(events, started)
        assert windows[-1][1] == 1.0
        assert check_split(answers, windows, new, time.time()) >= 3  # weights 0, 0.5 and 1

        during = [s for s in monitor.samples if s.t >= started]
        assert len(during) > 20
        assert max(s.holding for s in during) <= holding_bound
        assert max(s.gpus_used for s in during) <= holding_bound
        assert min(s.running for s in during) >= ready_floor

        tail = [a for a in answers if a.t > answers[-1].t - 1.0]
        assert tail and all(a.version == new for a in tail)
        details = serve_details()
        assert f"{self.NAME}_{old}" not in details["applications"]
        assert [r["state"] for r in replicas(details, f"{self.NAME}_{new}")] == ["RUNNING"] * 2
        assert c.status(rollout_id)["state"] == "succeeded"
        assert steps_completed(events) == list(range(1, len(steps_completed(events)) + 1))


class TestControls:
    """Each control issued from another process mid-rollout, with its expected end state."""

    NAME = "controls"

    @pytest.fixture(autouse=True, scope="class")
    @classmethod
    def _cleanup(cls, ray_cluster: RayCluster) -> Iterator[None]:
        yield
        remove(cls.NAME)

    def _start(self, c: RayCluster, stabilization_s: float = 2) -> tuple[str, str, str]:
        old = ensure_live(c, self.NAME, replicas=3)
        new = other(old)
        policy = {"max_surge_percent": 25, "stabilization_time_seconds": stabilization_s}
        path = c.deploy_file(self.NAME, new, replicas=3, policy=policy)
        rollout_id = c.deploy_detached(path)
        wait_for(lambda: c.peek(rollout_id)["step"] >= 1, 90, what="the first step")
        return rollout_id, old, new

    def _ended(self, c: RayCluster, rollout_id: str) -> dict[str, Any]:
        got = wait_for(
            lambda: (
                (s := c.peek(rollout_id))["state"] in ("succeeded", "cancelled", "failed")
                and not s["controller"]["running"]
                and s
            ),
            120,
            what="the rollout to end",
        )
        end = c.status(rollout_id)  # and the command line says the same
        assert end["state"] == got["state"]
        return end

    def _serving_only(self, c: RayCluster, version: str, gone: str) -> None:
        """Only `version` is deployed, and all 3 of its replicas run. A rollback ends once the
        current version is back at full size with one replica ready (docs/controller.md), so
        Serve may still be starting the others it refilled: their start is waited for."""
        details = serve_details()
        assert f"{self.NAME}_{gone}" not in details["applications"]
        assert len(replicas(details, f"{self.NAME}_{version}")) == 3
        wait_for(
            lambda: (
                [r["state"] for r in replicas(serve_details(), f"{self.NAME}_{version}")]
                == ["RUNNING"] * 3
            ),
            60,
            what=f"{version}'s 3 replicas running",
        )
        load = Load(c.url(self.NAME), threads=2, pause_s=0.02, max_seconds=2).start()
        time.sleep(2)
        answers = load.stop()
        assert answers and all(a.version == version for a in answers)

    def test_pause_then_resume(self, ray_cluster: RayCluster) -> None:
        c = ray_cluster
        rollout_id, _, new = self._start(c)
        assert c.cli("pause", rollout_id).returncode == 0
        paused = wait_for(
            lambda: (s := c.peek(rollout_id))["state"] == "paused" and s, 60, what="pause"
        )
        time.sleep(2.0)  # nothing moves while paused
        still = c.status(rollout_id)
        assert still["state"] == "paused"
        assert still["step"] == paused["step"] < still["steps"]
        targets = {v: n["target"] for v, n in still["replicas"].items()}
        assert targets == {v: n["target"] for v, n in paused["replicas"].items()}
        # another version of the same model cannot start while this rollout is in progress
        clash = c.cli("deploy", str(c.deploy_file(self.NAME, "v9", replicas=3)))
        assert clash.returncode == 2
        assert clash.stderr.count("\n") == 1 and "still in progress" in clash.stderr
        assert c.cli("resume", rollout_id).returncode == 0
        end = self._ended(c, rollout_id)
        assert end["state"] == "succeeded"
        kinds = [(e["kind"], e.get("control")) for e in c.history(rollout_id)]
        for ctl in ("pause", "resume"):
            assert ("control_received", ctl) in kinds
            assert ("control_applied", ctl) in kinds
        self._serving_only(c, new, other(new))

    @pytest.mark.parametrize("control", ["cancel", "force-cancel"])
    def test_cancel_goes_back(self, ray_cluster: RayCluster, control: str) -> None:
        c = ray_cluster
        rollout_id, old, new = self._start(c)
        assert c.status(rollout_id)["candidate_weight"] > 0
        out = c.cli(control, rollout_id)
        assert out.returncode == 0, out.stderr
        end = self._ended(c, rollout_id)
        assert end["state"] == "cancelled"
        assert end["candidate_weight"] == 0.0
        late = c.cli("resume", rollout_id)  # a control for a rollout that has ended
        assert late.returncode == 2 and "has already ended (cancelled)" in late.stderr
        events = c.history(rollout_id)
        applied = [e["control"] for e in events if e["kind"] == "control_applied"]
        assert applied == [control.replace("-", "_")]
        backward = [e for e in events if e["kind"] == "step_completed"]
        if control == "cancel":  # ramps back step by step
            assert any(e["direction"] == "backward" for e in backward)
        else:  # all traffic back at once
            assert any(e["kind"] == "transition" and e["stage"] == "rollback" for e in events)
            assert not any(e["direction"] == "backward" for e in backward)
        self._serving_only(c, old, new)

    def test_roll_forward(self, ray_cluster: RayCluster) -> None:
        """3 replicas, one per step: rolled forward while it stabilizes after step 1 (a window
        far longer than the test), the remaining two are replaced in one more step."""
        c = ray_cluster
        rollout_id, old, new = self._start(c, stabilization_s=600)
        before = c.peek(rollout_id)
        assert (before["step"], before["steps"]) == (1, 3)
        assert c.cli("roll-forward", rollout_id).returncode == 0
        end = self._ended(c, rollout_id)
        assert end["state"] == "succeeded"
        events = c.history(rollout_id)
        at = next(
            i
            for i, e in enumerate(events)
            if e["kind"] == "control_applied" and e["control"] == "roll_forward"
        )
        after = [e for e in events[at:] if e["kind"] == "step_completed"]
        assert len(after) == 1  # the rest of the rollout is one step
        assert steps_completed(events) == [1, 2]
        assert not any(  # and there is no stabilization wait after it
            e["kind"] == "waiting" and e["reason"].startswith("stabilizing") for e in events[at:]
        )
        self._serving_only(c, new, old)


def test_not_enough_gpus_fails_after_deadline_and_rolls_back(ray_cluster: RayCluster) -> None:
    """Other work holds 5 of the 6 GPUs; 1 replica + a surge of 1 need 2: no smaller pool fits
    either (the cap would otherwise shrink the pool to make room), so wait, fail, roll back."""
    from ray.util.placement_group import placement_group, remove_placement_group

    c = ray_cluster
    name = "tight"
    hog = placement_group([{"GPU": 1, "CPU": 0.01}] * (GPUS - 1))
    try:
        assert hog.wait(30)
        old = ensure_live(c, name, replicas=1)
        new = other(old)
        policy = {"max_surge_percent": 50, "stabilization_time_seconds": 0}
        path = c.deploy_file(name, new, policy=policy, progress_deadline_s=6, replicas=1)
        started = time.monotonic()
        done = c.cli("deploy", str(path))
        assert done.returncode == 1, done.stdout + done.stderr
        rollout_id = done.stdout.splitlines()[0]
        assert time.monotonic() - started >= 6
        end = c.status(rollout_id)
        assert end["state"] == "failed"
        assert end["candidate_weight"] == 0.0
        events = c.history(rollout_id)
        waits = [e["reason"] for e in events if e["kind"] == "waiting"]
        assert any("wait for a free GPU" in w for w in waits), waits
        finished = [e for e in events if e["kind"] == "finished"]
        assert len(finished) == 1 and "progress deadline" in finished[0]["reason"]
        assert "GPU" in finished[0]["reason"]
        assert not any(e["kind"] == "weight_set" and e["candidate_weight"] > 0 for e in events)
        details = serve_details()
        assert f"{name}_{new}" not in details["applications"]
        assert [r["state"] for r in replicas(details, f"{name}_{old}")] == ["RUNNING"]
        capped = [e for e in events if e["kind"] == "capped"]  # says why, and caps nothing
        assert capped and all(e["allowed"] == e["desired"] == 1 for e in capped), capped
        assert "the step waits for GPUs" in capped[0]["reason"]
        assert live_version(name) == old
        wait_for(lambda: gpus_free() == 0, 30, what="the candidate's pending GPU request to go")
    finally:
        remove_placement_group(hog)
        remove(name)


def test_down_removes_the_applications_and_stops_the_local_cluster(
    ray_cluster: RayCluster,
) -> None:
    """Last in this module: it stops the shared cluster (the fixture then has nothing to do)."""
    import ray

    from executor import cluster

    c = ray_cluster
    name = "last"
    ensure_live(c, name, replicas=1)
    info = cluster.local_cluster()
    assert info is not None
    ray.shutdown()  # this test process leaves the cluster before it goes
    out = c.cli("down", str(c.deploy_file(name, "v1", replicas=1)))
    assert out.returncode == 0, out.stderr
    assert f"removed {name}" in out.stdout and "stopped the local Ray cluster" in out.stdout
    wait_for(lambda: not cluster._alive(info.pid), 30, what="ray start to exit")
    assert cluster.local_cluster() is None
    again = c.cli("down")
    assert again.returncode == 0
    assert "no local Ray cluster" in again.stdout
