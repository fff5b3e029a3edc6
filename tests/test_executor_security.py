"""The executor on a shared machine: the local cluster refuses clients without its token, and
listens on 127.0.0.1 wherever Ray lets it.

One real local cluster (the one `rollout deploy` starts) serves this module; its clients are
separate processes with a clean environment, as an intruder on the same machine would be.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from executor_fixtures import RayCluster, ensure_live, ray_cluster, remove, serve_details

pytestmark = pytest.mark.ray
__all__ = ["ray_cluster"]  # the module-scoped fixture, imported for pytest

NAME = "guarded"


@pytest.fixture(scope="module")
def served(ray_cluster: RayCluster) -> Iterator[RayCluster]:
    """The cluster with one model deployed (its replicas open sockets of their own)."""
    ensure_live(ray_cluster, NAME, replicas=1)
    yield ray_cluster
    remove(NAME)


def token(c: RayCluster) -> str:
    return (c.home / "ray-token").read_text()


def cluster_processes(c: RayCluster) -> list[psutil.Process]:
    root = psutil.Process(c.pid)
    return [root, *root.children(recursive=True)]


def join(address: str, **env: str) -> subprocess.CompletedProcess[str]:
    """A plain `ray.init(address=...)` from a process with a clean environment."""
    code = f"import ray; ray.init(address={address!r}); print('JOINED')"
    clean = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", **env}
    return subprocess.run(
        [sys.executable, "-c", code], env=clean, capture_output=True, text=True, timeout=120
    )


def test_the_token_is_private_and_never_on_a_command_line(served: RayCluster) -> None:
    c = served
    secret = token(c)
    assert len(secret) == 64 and int(secret, 16) > 0
    assert stat.S_IMODE((c.home / "ray-token").stat().st_mode) == 0o600
    assert stat.S_IMODE(c.home.stat().st_mode) == 0o700
    procs = cluster_processes(c)
    assert len(procs) > 8  # GCS, raylet, agents, Serve's controller and proxy, replicas
    for p in procs:
        assert secret not in " ".join(p.cmdline())
    # every process of the cluster finds the token through the file's path
    raylet = next(p for p in procs if p.name() == "raylet")
    assert raylet.environ().get("RAY_AUTH_MODE") == "token"
    assert raylet.environ().get("RAY_AUTH_TOKEN_PATH") == str(c.home / "ray-token")
    assert "RAY_AUTH_TOKEN" not in raylet.environ()


def test_a_driver_without_the_token_is_refused(served: RayCluster) -> None:
    c = served
    # as Ray itself resolves 127.0.0.1 for a one-node cluster, so that the GCS is reached
    single = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    plain = join(c.address, **single)
    assert plain.returncode != 0 and "JOINED" not in plain.stdout
    assert "authentication" in plain.stderr.lower()
    wrong = join(c.address, **single, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64)
    assert wrong.returncode != 0 and "JOINED" not in wrong.stdout
    assert "authentication" in wrong.stderr.lower()
    path = str(c.home / "ray-token")
    right = join(c.address, **single, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=path)
    assert right.returncode == 0 and "JOINED" in right.stdout, right.stderr[-2000:]


def post_job(c: RayCluster, headers: dict[str, str]) -> int:
    """POST a job to the dashboard agent's job API; the HTTP status."""
    body = json.dumps({"entrypoint": "touch /tmp/rollout-intruder", "submission_id": "x"})
    req = urllib.request.Request(
        f"http://127.0.0.1:{c.agent_port}/api/job_agent/jobs/",
        data=body.encode(), method="POST",
        headers={"Content-Type": "application/json", **headers},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


def test_the_job_api_refuses_a_request_without_the_token(served: RayCluster) -> None:
    c = served
    assert post_job(c, {}) == 401
    assert post_job(c, {"Authorization": "Bearer " + "0" * 64}) == 403
    assert not os.path.exists("/tmp/rollout-intruder")


def name(p: psutil.Process) -> str:
    """`gcs_server`, `raylet`, `ray::ServeReplica`, `python` ... (without a replica's app)."""
    first = p.cmdline()[0]
    return "ray::" + first.split(":")[2] if first.startswith("ray::") else Path(first).name


def listening(c: RayCluster) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every TCP socket the cluster listens on."""
    out = []
    for p in cluster_processes(c):
        try:
            conns = p.net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            continue
        for s in conns:
            if s.status == psutil.CONN_LISTEN:
                out.append((s.laddr.ip, s.laddr.port, name(p)))
    return out


def grpc_call(port: int, metadata: tuple[tuple[str, str], ...]) -> str:
    """The status of one call to a replica's inter-deployment gRPC server."""
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary("/ray.serve.ASGIService/HandleRequest")
        try:
            call(b"", metadata=metadata, timeout=10)
        except grpc.RpcError as e:
            return e.code().name
    return "OK"


def test_only_token_checked_servers_listen_beyond_loopback(served: RayCluster) -> None:
    c = served
    sockets = listening(c)
    loopback = {"127.0.0.1", "::ffff:127.0.0.1"}
    wide = [(ip, port, name) for ip, port, name in sockets if ip not in loopback]
    assert {name for _, _, name in sockets} >= {"gcs_server", "raylet"}, sockets
    # Serve 2.60 binds each replica's inter-deployment gRPC server to [::]; nothing else is wide
    replicas = [r for a in serve_details()["applications"].values()
                for d in a["deployments"].values() for r in d["replicas"]]  # fmt: skip
    assert len(replicas) == 3  # the model's replica and its router's two
    assert sorted(name for _, _, name in wide) == ["ray::ServeReplica"] * len(replicas)
    assert {ip for ip, _, _ in wide} == {"::"}
    bearer = (("authorization", "Bearer " + token(c)),)
    for _, port, _ in wide:
        assert grpc_call(port, ()) == "UNAUTHENTICATED"
        assert grpc_call(port, (("authorization", "Bearer " + "0" * 64),)) == "UNAUTHENTICATED"
        assert grpc_call(port, bearer) not in ("UNAUTHENTICATED", "UNAVAILABLE")


def test_a_token_file_missing_or_readable_by_others_is_bad_input(served: RayCluster) -> None:
    c = served
    path, spare = c.home / "ray-token", c.home / "ray-token.spare"
    deploy = str(c.deploy_file(NAME, "v2", replicas=1))
    try:
        path.chmod(0o644)
        out = c.cli("deploy", deploy)
        assert out.returncode == 2 and out.stdout == ""
        assert out.stderr == (
            f"rollout: error: the Ray token file {path} is readable by other users "
            f"(mode 0644); run `chmod 600 {path}`\n"
        )
        path.chmod(0o600)
        path.rename(spare)
        out = c.cli("deploy", deploy)
        assert out.returncode == 2 and out.stdout == ""
        assert out.stderr == f"rollout: error: the Ray token file {path} does not exist\n"
    finally:
        if spare.exists():
            spare.rename(path)
        path.chmod(0o600)
    assert ensure_live(c, NAME) == "v1"  # nothing was started or changed
