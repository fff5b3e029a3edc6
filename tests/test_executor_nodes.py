"""A GPU node lost mid-rollout, on a two-node local cluster: the head holds no GPU, a second
`ray start --address` on this machine holds them all, and it is stopped while a step's candidates
start. The rollout waits for GPUs (its history says so); when the node returns in time it
completes, and when the step's progress deadline passes first it fails and rolls back, the
rollback waiting for the node; its history says which.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from executor_fixtures import (
    GPUS,
    JOIN_ON_LOOPBACK,
    REPO,
    RayCluster,
    free_port,
    live_version,
    local_ray,
    replicas,
    serve_details,
    wait_for,
)

from examples.load import Load

pytestmark = pytest.mark.ray

NAME = "nodes"


@dataclass
class GpuNode:
    """A second node holding the cluster's GPUs, started and stopped like a machine."""

    c: RayCluster
    proc: subprocess.Popen[bytes] | None = None
    temp_dir: str = ""

    def start(self) -> None:
        from executor import cluster, router

        info = cluster.local_cluster()
        assert info is not None
        env = dict(self.c.env(), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1")  # a node may join
        env[router.CALLBACK_ENV] = router.CALLBACK  # its Serve proxy runs rollout's router
        self.temp_dir = tempfile.mkdtemp(prefix="rollout-node-", dir="/tmp")  # short paths
        log = (self.c.tmp / "gpu-node.log").open("a")  # `ray start`'s own words
        self.proc = subprocess.Popen(
            [sys.executable, "-c", JOIN_ON_LOOPBACK, "start", f"--address={info.address}",
             "--node-ip-address=127.0.0.1", "--num-cpus=2", f"--num-gpus={GPUS}", "--block",
             "--disable-usage-stats", f"--temp-dir={self.temp_dir}",
             f"--dashboard-agent-listen-port={free_port()}"],
            env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        log.close()
        wait_for(
            lambda: gpus_total() >= GPUS or self.proc.poll() is not None,  # type: ignore[union-attr]
            60,
            what="the GPU node to join",
        )
        assert self.proc.poll() is None, (self.c.tmp / "gpu-node.log").read_text()[-2000:]

    def stop(self) -> None:
        """Stop the node, its replicas with it; the cluster counts no GPU after."""
        from executor import cluster

        if self.proc is None:
            return
        cluster._stop_pid(self.proc.pid)
        self.proc = None
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        wait_for(lambda: gpus_total() == 0, 60, what="the GPU node to leave")


def gpus_total() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RayCluster, GpuNode]]:
    with local_ray(tmp_path_factory.mktemp("nodes"), num_gpus=0) as c:
        node = GpuNode(c)
        node.start()
        try:
            yield c, node
        finally:
            node.stop()


def candidate_starting(c: RayCluster, rollout_id: str, new: str) -> bool:
    """The rollout's first step has placed a candidate replica."""
    return c.peek(rollout_id)["state"] == "progressing" and any(
        r.get("node_id") for r in replicas(serve_details(), f"{NAME}_{new}")
    )


def waits(events: list[dict[str, Any]]) -> list[str]:
    return [e.get("reason", "") for e in events if e["kind"] == "waiting"]


def run_with_node_lost(
    c: RayCluster, node: GpuNode, new: str, *, deadline_s: float, back_when: Callable[[str], bool]
) -> tuple[str, list[dict[str, Any]]]:
    """Roll to `new` under load, stop the GPU node once the first candidate is placed, start it
    again once `back_when(rollout_id)`; the rollout's id and history once it ended."""
    path = c.deploy_file(NAME, new, progress_deadline_s=deadline_s)
    load = Load(c.url(NAME), threads=2, pause_s=0.05, max_seconds=300).start()
    try:
        wait_for(lambda: len(load.answers) > 10, 30, what="the load to get answers")
        rollout_id = c.deploy_detached(path)
        wait_for(lambda: candidate_starting(c, rollout_id, new), 60, what="a candidate")
        node.stop()
        wait_for(lambda: back_when(rollout_id), 120, every=1.5, what="the moment for the node")
        node.start()
        wait_for(lambda: c.peek(rollout_id)["state"] in ("succeeded", "failed"), 120,
                 what="the rollout to end")  # fmt: skip
        # with the node back, one version serves and every request is answered again
        wait_for(lambda: live_version(NAME) is not None, 60, what="one version serving")
        n = len(load.answers)
        wait_for(lambda: len(load.answers) > n + 20, 60, what="answers after the node returned")
        recent = load.answers[n:]
    finally:
        load.stop()
    assert all(a.version is not None for a in recent), [a for a in recent if a.version is None]
    return rollout_id, c.history(rollout_id)


def test_a_lost_gpu_node_that_returns_lets_the_rollout_complete(
    two_nodes: tuple[RayCluster, GpuNode],
) -> None:
    """The node returns while the step waits for GPUs: the rollout completes within its deadline,
    its history showing the wait."""
    c, node = two_nodes
    out = c.cli("deploy", str(c.deploy_file(NAME, "v1")))
    assert out.returncode == 0, out.stdout + out.stderr

    def gpu_wait_seen(rollout_id: str) -> bool:
        return any("wait for a free GPU" in w for w in waits(c.history(rollout_id)))

    rollout_id, events = run_with_node_lost(c, node, "v2", deadline_s=90, back_when=gpu_wait_seen)
    end = [e for e in events if e["kind"] == "finished"]
    assert [e["outcome"] for e in end] == ["succeeded"], end
    assert any("wait for a free GPU" in w for w in waits(events)), waits(events)
    assert live_version(NAME) == "v2"
    print(f"measured: {rollout_id} waited {waits(events)[:2]} and succeeded")


def test_a_lost_gpu_node_fails_the_step_at_its_deadline_and_the_rollback_waits_for_it(
    two_nodes: tuple[RayCluster, GpuNode],
) -> None:
    """With no GPU anywhere, the step fails at its deadline; the rollback cannot move traffic
    back before a current replica is ready, so it waits (and says so) until the node returns,
    then ends `failed` with the old version serving alone."""
    c, node = two_nodes
    assert live_version(NAME) == "v2"

    def rollback_waits(rollout_id: str) -> bool:
        return any(
            "rollback" in w and "waiting for a ready current replica" in w
            for w in waits(c.history(rollout_id))
        )

    rollout_id, events = run_with_node_lost(c, node, "v1", deadline_s=15, back_when=rollback_waits)
    end = [e for e in events if e["kind"] == "finished"]
    assert [e["outcome"] for e in end] == ["failed"], end
    assert "progress deadline" in end[0]["reason"], end
    assert live_version(NAME) == "v2"
    print(f"measured: {rollout_id} waited {sorted(set(waits(events)))} and ended {end[0]}")
