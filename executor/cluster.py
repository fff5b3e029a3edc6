"""The Ray cluster a deployment runs on: a given address, or a local one that rollout starts.

The local cluster must outlive the command that started it (a deployed version keeps serving
after `rollout deploy` returns), so it is a detached `ray start --head --block` process in its
own session, recorded in `.rollout/cluster.json`; `rollout down` stops it with SIGTERM, upon
which `ray start --block` stops every process it started. It runs with Ray's token
authentication (executor/auth.py): a fresh token in `.rollout/ray-token`, so no process
without it can join the cluster or use its agents' HTTP APIs. It gets its own temp folder, so
its address file does not make other programs' plain `ray.init()` join it, and its head binds
to 127.0.0.1. Logical GPUs (`num_gpus`) let GPU replicas schedule on machines without one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from executor import auth, router, store
from executor.deploy_file import DeploySpec, HttpSpec
from rollout.errors import InputError

NAMESPACE = "rollout"
SINGLE_NODE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": a one-node cluster on 127.0.0.1
START_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class LocalCluster:
    address: str
    pid: int
    temp_dir: str
    num_gpus: int | None
    num_cpus: int
    agent_port: int | None = None  # the dashboard agent's HTTP server (its job API among others)
    started_at: float | None = None  # the `ray start` process's start time, as the kernel has it


def _state_file() -> Path:
    return store.home() / "cluster.json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _alive(pid: int) -> bool:
    """Running, not exited (a zombie waiting for its parent to reap it counts as exited)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _ours(info: LocalCluster) -> bool:
    """The recorded pid is still the `ray start` rollout launched: same start time and command
    line (after a reboot the pid may belong to anything)."""
    import psutil

    try:
        proc = psutil.Process(info.pid)
        cmd = proc.cmdline()
        same_start = info.started_at is None or abs(proc.create_time() - info.started_at) < 1.0
    except psutil.Error:
        return False
    return same_start and "ray.scripts.scripts" in cmd and f"--temp-dir={info.temp_dir}" in cmd


def local_cluster() -> LocalCluster | None:
    """The local cluster rollout started, if it is still running."""
    path = _state_file()
    if not path.exists():
        return None
    info = LocalCluster(**json.loads(path.read_text()))
    if not _alive(info.pid) or not _ours(info):
        path.unlink(missing_ok=True)
        return None
    return info


def start_local(num_gpus: int | None, num_cpus: int | None = None) -> LocalCluster:
    """Start a detached single-node cluster and wait until it accepts drivers."""
    home = auth.private_home()
    token = auth.Token(path=auth.create_local_token())
    auth.use(token)  # this process, `ray start` and everything it starts present the token
    digest = hashlib.sha1(str(home).encode()).hexdigest()[:8]
    temp_dir = Path(f"/tmp/rollout-ray-{digest}")  # short: Ray's socket paths have a limit
    shutil.rmtree(temp_dir, ignore_errors=True)
    cpus = num_cpus or max(8, os.cpu_count() or 1)
    port, agent_port = _free_port(), _free_port()
    cmd = [
        sys.executable,  # `ray start`, without relying on the console script being on PATH
        "-m",
        "ray.scripts.scripts",
        "start",
        "--head",
        "--block",
        f"--port={port}",
        "--node-ip-address=127.0.0.1",
        f"--num-cpus={cpus}",
        "--include-dashboard=false",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        f"--ray-client-server-port={_free_port()}",
        f"--dashboard-agent-listen-port={agent_port}",
    ]
    if num_gpus is not None:
        cmd.append(f"--num-gpus={num_gpus}")
    env = dict(os.environ)
    # replicas import the model by its import path, relative to where rollout was run
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH")]))
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # `down` drains Serve itself first
    env[SINGLE_NODE] = "0"  # one node, every server on 127.0.0.1
    env[router.CALLBACK_ENV] = router.CALLBACK  # Serve's proxy runs rollout's router
    log = (home / "cluster.log").open("w")
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True, env=env, cwd=os.getcwd(),
    )  # fmt: skip
    address_file = temp_dir / "ray_current_cluster"
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while not address_file.exists():
            if proc.poll() is not None:
                raise InputError(
                    f"the local Ray cluster did not start (exit {proc.returncode}); "
                    f"see {home / 'cluster.log'}"
                )
            if time.monotonic() > deadline:
                raise InputError(
                    f"the local Ray cluster did not start within {START_TIMEOUT_S:g} s"
                )
            time.sleep(0.2)
    except BaseException:  # interrupted or failed: leave no half-started cluster behind
        _stop_pid(proc.pid, timeout_s=10)
        raise
    import psutil

    started_at = psutil.Process(proc.pid).create_time()
    info = LocalCluster(
        f"127.0.0.1:{port}", proc.pid, str(temp_dir), num_gpus, cpus, agent_port, started_at
    )
    _state_file().write_text(json.dumps(asdict(info)))
    return info


def address_for(spec: DeploySpec, *, start: bool = True) -> str | None:
    """The cluster address a deploy file means, starting the local cluster if needed; from
    here on this process and those it starts present that cluster's token."""
    if spec.cluster.address:
        auth.use(auth.token_for(spec.cluster))
        return spec.cluster.address
    info = local_cluster()
    if info is None and start:
        check_port_free(spec.http)  # before anything starts
        print("starting a local Ray cluster ...", file=sys.stderr)
        info = start_local(spec.cluster.num_gpus, spec.cluster.num_cpus)
    if info is None:
        return None
    auth.use(auth.token_for(spec.cluster))
    return info.address


def _quiet() -> None:
    for name in ("ray", "ray.serve", "ray._private", "ray.serve._private"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _check_reachable(address: str) -> None:
    """Fail in seconds on a wrong `host:port`: `ray.init` retries an unreachable GCS for minutes."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except (OSError, ValueError) as e:
        raise InputError(f"cannot reach the Ray cluster at {address}: {e}") from None


def _single_node(address: str) -> None:
    """Take a loopback address as it is. Ray otherwise swaps 127.0.0.1 for the machine's
    network address, where the local cluster (a single node on 127.0.0.1) does not listen."""
    if address.rpartition(":")[0] not in ("127.0.0.1", "localhost"):
        return
    os.environ[SINGLE_NODE] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # read at call time; set once Ray is imported


def connect(address: str) -> None:
    """Join the cluster as a driver (idempotent within a process), presenting the token that
    `address_for` chose; a wrong address or token is one line of bad input."""
    import ray

    if ray.is_initialized():
        return
    _quiet()
    _check_reachable(address)
    _single_node(address)
    try:
        ray.init(
            address=address,
            namespace=NAMESPACE,
            log_to_driver=False,
            logging_level=logging.WARNING,
            configure_logging=False,
        )
    except Exception as e:  # Ray raises ConnectionError, RuntimeError, AuthenticationError
        why = str(e.__cause__ or e).strip().splitlines()[0]
        if "authentication" in str(e).lower() or "authentication" in why.lower():
            why = "it refused this client's Ray token (see `cluster.token_file`)"
        raise InputError(f"cannot join the Ray cluster at {address}: {why}") from None


def ensure_serve(http: HttpSpec) -> None:
    """Join the running Serve instance, or start it with its HTTP proxy on the deploy file's
    host and port (Serve's proxy options are fixed once it runs)."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        serve_client()
    except (RayServeException, InputError):
        check_port_free(http)
        serve.start(http_options={"host": http.host, "port": http.port})


def check_port_free(http: HttpSpec) -> None:
    """Serve's proxy cannot take a port another program listens on; say so before starting."""
    with socket.socket() as s:
        try:
            s.bind((http.host, http.port))
        except OSError as e:
            raise InputError(
                f"http.port {http.port} on {http.host} is already in use by another program "
                f"({e.strerror}); free it or choose another port"
            ) from None


def serve_client():  # type: ignore[no-untyped-def]
    """Serve's controller client (the declarative API), connecting when needed."""
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    if client is None:
        raise InputError("Serve is not running on this cluster")
    return client


def _stop_pid(pid: int, timeout_s: float = 30.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while _alive(pid) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.2)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def stop_local() -> bool:
    """Shut Serve down and stop the local cluster rollout started; False if there was none."""
    info = local_cluster()
    if info is None:
        return False
    import ray

    try:
        auth.use(auth.Token(path=auth.local_token_path()))
        connect(info.address)
        from ray import serve

        serve.shutdown()
    except Exception as e:  # stopping must go on even when the cluster is half dead
        print(f"warning: could not shut Serve down cleanly: {e}", file=sys.stderr)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    _stop_pid(info.pid)
    _state_file().unlink(missing_ok=True)
    auth.local_token_path().unlink(missing_ok=True)
    shutil.rmtree(info.temp_dir, ignore_errors=True)
    return True
