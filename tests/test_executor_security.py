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
from typing import Any

import psutil
import pytest
from executor_fixtures import (
    RayCluster,
    ensure_live,
    extra_node,
    live_version,
    ray_cluster,
    remove,
    serve_details,
    wait_for,
)
from postgres_fixture import postgres_url

from executor import status, store

pytestmark = pytest.mark.ray
__all__ = ["postgres_url", "ray_cluster"]  # module-scoped fixtures, imported for pytest

NAME = "guarded"
REPO_DIR = Path(__file__).resolve().parent.parent


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


def join(address: str, **env: str) -> subprocess.Popen[str]:
    """A plain `ray.init(address=...)` from a process with a clean environment."""
    code = f"import ray; ray.init(address={address!r}); print('JOINED')"
    clean = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", **env}
    return subprocess.Popen(
        [sys.executable, "-c", code], env=clean, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


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
    path = str(c.home / "ray-token")
    clients = {  # together: a refused client retries for a while before it gives up
        "plain": join(c.address, **single),
        "wrong": join(c.address, **single, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64),
        "right": join(c.address, **single, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=path),
    }
    got = {k: (p.communicate(timeout=180), p.returncode) for k, p in clients.items()}
    for refused in ("plain", "wrong"):
        (out, err), code = got[refused]
        assert code != 0 and "JOINED" not in out
        assert "authentication" in err.lower()
    (out, err), code = got["right"]
    assert code == 0 and "JOINED" in out, err[-2000:]


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
    assert len(replicas) == 1  # the model's replica (the router lives in Serve's proxy)
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
    before = live_version(NAME)
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
    assert live_version(NAME) == before  # nothing was started or changed


# ---- one rollout per model; leases across folders on a shared Postgres store ---------------


def other_files(c: RayCluster, *versions: str, **over: Any) -> list[Path]:
    model = {"args": {"weights": "examples/weights-v2.npz", "load_delay_s": 0.3}}
    return [c.deploy_file(NAME, v, replicas=1, model=model, **over) for v in versions]


def test_two_deploys_started_together_exactly_one_runs(served: RayCluster) -> None:
    c = served
    assert live_version(NAME)
    procs = [c.popen("deploy", str(f), "--detach") for f in other_files(c, "v3", "v4")]
    outs = [p.communicate(timeout=240) for p in procs]
    assert sorted(p.returncode for p in procs) == [0, 2], outs
    win = next(i for i, p in enumerate(procs) if p.returncode == 0)
    winner = outs[win][0].splitlines()[0]
    out, err = outs[1 - win]
    assert out == "" and err.count("\n") == 1
    assert err.startswith(f"rollout: error: rollout {winner} of {NAME} (")
    assert "still in progress" in err
    wait_for(lambda: c.peek(winner)["state"] == "succeeded", 120, what="the winner to finish")
    assert live_version(NAME) == ("v3", "v4")[win]


def read(url: str, rollout_id: str) -> dict[str, Any]:
    st = store.Store(url)
    try:
        rec = st.get(rollout_id)
        assert rec is not None
        return status.read_status(status.client(url), rec, st.lease(rollout_id))
    finally:
        st.dispose()


def test_a_killed_controller_is_recovered_from_another_folder_never_while_alive(
    served: RayCluster, postgres_url: str, tmp_path: Path
) -> None:
    """Postgres store shared by two folders; the cluster named by address and token file.
    Folder A's controller runs; B's `recover` leaves it alone; A's controller is killed (on a
    host since renamed); B takes the expired lease over and finishes the rollout. The store's
    password shows nowhere: not in `ps`, Ray's job table, logs, outputs or `.rollout/` files."""
    c = served
    password = postgres_url.split(":")[2].split("@")[0]
    a, b = tmp_path / "a", tmp_path / "b"
    b.mkdir()
    (path,) = other_files(
        c, "v5", store=postgres_url,
        cluster={"address": c.address, "token_file": str(c.home / "ray-token")},
        policy={"max_surge_percent": 50, "stabilization_time_seconds": 8},
    )  # fmt: skip
    outputs = []
    started = c.cli("deploy", str(path), "--detach", ROLLOUT_HOME=str(a / ".rollout"))
    outputs.append(started.stdout + started.stderr)
    assert started.returncode == 0, started.stderr
    rollout_id = started.stdout.splitlines()[0]
    running = wait_for(
        lambda: (s := read(postgres_url, rollout_id))["controller"]["running"] and s, 60
    )
    ctl = running["controller"]
    assert ctl["folder"] == str(REPO_DIR) and ctl["pid"]

    # a live lease is never taken over, from any folder
    home_b = str(b / ".rollout")
    live = c.cli("recover", str(path), cwd=b, ROLLOUT_HOME=home_b)
    outputs.append(live.stdout + live.stderr)
    assert live.returncode == 0, live.stderr
    assert live.stdout.startswith(f"rollout {rollout_id} is running (pid {ctl['pid']} on ")
    assert "nothing to recover" in live.stdout
    assert read(postgres_url, rollout_id)["controller"]["holder"] == ctl["holder"]

    # the password is in no process's arguments and in no Ray job's entrypoint
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert "executor.worker" in ps and password not in ps
    import ray

    jobs = ray._private.worker.global_worker.gcs_client.get_all_job_info()
    assert jobs and all(password not in str(j) for j in jobs.values())

    # the controller's host is renamed, then it dies: its lease expires and B takes over
    st = store.Store(postgres_url)
    with st.engine.begin() as conn:
        info = json.dumps({"pid": ctl["pid"], "host": "renamed-host", "folder": ctl["folder"]})
        conn.execute(
            store.INDEX.update().where(store.INDEX.c.id == rollout_id).values(holder_info=info)
        )
    st.dispose()
    psutil.Process(ctl["pid"]).kill()
    wait_for(lambda: not read(postgres_url, rollout_id)["controller"]["running"], 10)
    done = c.cli("recover", str(path), cwd=b, ROLLOUT_HOME=home_b)
    outputs.append(done.stdout + done.stderr)
    assert done.returncode == 0, done.stdout + done.stderr
    end = read(postgres_url, rollout_id)
    assert end["state"] == "succeeded"
    assert end["controller"]["folder"] == str(b) and end["controller"]["holder"] != ctl["holder"]
    assert live_version(NAME) == "v5"

    for text in outputs:
        assert password not in text
    for home in (a, b, c.home):
        for f in home.rglob("*"):
            assert not f.is_file() or password.encode() not in f.read_bytes(), f
    check_json_only(postgres_url, rollout_id, c, b)


class Boom:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("touch /tmp/rollout-unpickled",))


def check_json_only(url: str, rollout_id: str, c: RayCluster, folder: Path) -> None:
    """DBOS stored the rollout as JSON; a pickled value written into the store is refused, not
    run, by the terminal that reads status."""
    import base64
    import pickle

    import sqlalchemy as sa

    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.begin() as conn:
        kinds = {
            t: {r[0] for r in conn.execute(sa.text(f"SELECT DISTINCT serialization FROM dbos.{t}"))}
            for t in ("workflow_status", "operation_outputs", "workflow_events")
        }
        # every value DBOS stored is JSON (steps that return nothing store no value at all)
        assert all(k - {None} == {"portable_json"} for k in kinds.values()), kinds
        evil = base64.b64encode(pickle.dumps(Boom())).decode()
        conn.execute(
            sa.text(
                "UPDATE dbos.workflow_events SET value = :v, serialization = 'py_pickle' "
                "WHERE workflow_uuid = :id AND key = 'status'"
            ),
            {"v": evil, "id": rollout_id},
        )
    engine.dispose()
    got = c.cli("status", rollout_id, cwd=folder, ROLLOUT_STORE=url)
    assert got.returncode == 2 and got.stdout == ""
    assert (
        got.stderr == "rollout: error: the store holds a pickled value; rollout reads JSON only\n"
    )
    assert not os.path.exists("/tmp/rollout-unpickled")


# ---- a cluster of one's own: every node's proxy must run the router ------------------------


def test_a_proxy_without_the_router_is_one_line(served: RayCluster) -> None:
    """A node started without the router's variable (a cluster the user brings, half set up):
    its Serve proxy would pass the model's requests to no version, so `deploy` refuses to
    start, in one line naming the node and the variable, and changes nothing."""
    from executor.router import CALLBACK, CALLBACK_ENV

    c = served
    before = live_version(NAME)
    own = {"address": c.address, "token_file": str(c.home / "ray-token")}
    path = c.deploy_file(NAME, "v9", replicas=1, cluster=own)
    with extra_node(c, router=False):
        out = c.cli("deploy", str(path))
    assert out.returncode == 2 and out.stdout == "", out.stdout + out.stderr
    assert out.stderr.count("\n") == 1
    assert out.stderr.startswith(
        "rollout: error: the Serve HTTP proxy on 127.0.0.1 does not run rollout's router: "
    )
    assert f"{CALLBACK_ENV}={CALLBACK}" in out.stderr
    assert live_version(NAME) == before
