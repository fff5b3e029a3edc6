"""Shared pieces of the executor's real-Ray tests: one local cluster per test module.

The cluster is the very one `rollout deploy` starts (a detached `ray start --head` with logical
GPUs, recorded under a temporary `.rollout/`); the tests drive it through the `rollout` command
line in subprocesses, as a user would, and watch it as a Ray driver.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
GPUS = 6  # logical GPUs of the test cluster
_CLIENTS: dict[str, Any] = {}


@dataclass
class RayCluster:
    home: Path
    port: int
    address: str
    tmp: Path
    pid: int  # `ray start`, the root of every process of the cluster
    agent_port: int  # the dashboard agent's HTTP server

    def env(self) -> dict[str, str]:
        return dict(
            os.environ,
            ROLLOUT_HOME=str(self.home),
            ROLLOUT_TICK_S="0.25",
            ROLLOUT_LEASE_S="3",  # a killed controller's rollout is free to take over soon
            PYTHONPATH=str(REPO),
        )

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def deploy_file(self, name: str, version: str, **over: Any) -> Path:
        """A deploy file for the example model (versions v1 and v2 carry matching weights)."""
        spec: dict[str, Any] = {
            "name": name,
            "version": version,
            "model": {
                "import_path": "examples.model:app",
                "args": {"weights": f"examples/weights-{version}.npz", "load_delay_s": 0.3},
                "ray_actor_options": {"num_gpus": 1, "num_cpus": 0.1},
                "graceful_shutdown_timeout_s": 1,
            },
            "health_check": {"period_s": 1, "timeout_s": 5},
            "replicas": 2,
            "policy": {"max_surge_percent": 25, "stabilization_time_seconds": 1},
            "progress_deadline_s": 90,
            "cluster": {"num_gpus": GPUS},
            "http": {"port": self.port, "route_prefix": f"/{name}"},
        }
        for key, value in over.items():
            if key in ("model", "http") and isinstance(value, dict):
                spec[key] = {**spec[key], **value}
            else:
                spec[key] = value
        path = self.tmp / f"{name}-{version}-{abs(hash(json.dumps(spec))) % 10**6}.yaml"
        path.write_text(yaml.safe_dump(spec))
        return path

    def cli(
        self, *args: str, timeout: float = 240, cwd: Path = REPO, **env: str
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "rollout.cli", *args],
            cwd=cwd, env={**self.env(), **env}, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip

    def popen(self, *args: str, **env: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "rollout.cli", *args],
            cwd=REPO, env={**self.env(), **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip

    def status(self, rollout_id: str) -> dict[str, Any]:
        """`rollout status ID --json`, as the command prints it."""
        out = self.cli("status", rollout_id, "--json")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def peek(self, rollout_id: str) -> dict[str, Any]:
        """The same status read in this process: cheap enough to poll on a 2-core machine."""
        from executor import status, store

        st, rec = store.find(rollout_id)
        if st.url not in _CLIENTS:
            _CLIENTS[st.url] = status.client(st.url)
        return status.read_status(_CLIENTS[st.url], rec, st.lease(rollout_id))

    def history(self, rollout_id: str) -> list[dict[str, Any]]:
        out = self.cli("history", rollout_id, "--json")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def deploy_detached(self, path: Path) -> str:
        out = self.cli("deploy", str(path), "--detach")
        assert out.returncode == 0, out.stderr
        return out.stdout.strip().splitlines()[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(fn: Callable[[], Any], timeout: float = 60, every: float = 0.4, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = fn()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what or fn}")


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    """A local cluster with logical GPUs started the way `rollout deploy` starts it."""
    with local_ray(tmp_path_factory.mktemp("executor"), num_gpus=GPUS) as c:
        yield c


@contextmanager
def local_ray(tmp: Path, num_gpus: int) -> Iterator[RayCluster]:
    """`rollout`'s local cluster with `num_gpus` logical GPUs on its head node, Serve's HTTP
    proxy on a free port, and this process connected as a driver."""
    import ray
    from ray import serve
    from ray._private import ray_constants

    from executor import auth, cluster

    home = tmp / "home"
    # starting and joining the cluster sets Ray's authentication variables in this process
    keys = ("ROLLOUT_HOME", "ROLLOUT_TICK_S", auth.MODE, auth.TOKEN, auth.TOKEN_PATH)
    saved = {k: os.environ.get(k) for k in (*keys, cluster.SINGLE_NODE)}
    multi_node = ray_constants.ENABLE_RAY_CLUSTER
    os.environ["ROLLOUT_HOME"] = str(home)
    os.environ["ROLLOUT_TICK_S"] = "0.25"
    cwd = os.getcwd()
    os.chdir(REPO)  # the cluster's workers import the example model from here
    try:
        info = cluster.start_local(num_gpus=num_gpus, num_cpus=16)
    finally:
        os.chdir(cwd)
    port = free_port()
    try:
        cluster.connect(info.address)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        assert info.agent_port is not None
        yield RayCluster(home, port, info.address, tmp, info.pid, info.agent_port)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.stop_local()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        auth.reload()
        ray_constants.ENABLE_RAY_CLUSTER = multi_node


# ---- a second node ----------------------------------------------------------------------------

# `ray start --address=127.0.0.1:PORT` for a second node, except that the address stays on the
# loopback: on a node allowed to join (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1) Ray swaps 127.0.0.1
# for the machine's network address, where the local cluster's head (every server on 127.0.0.1)
# does not listen.
JOIN_ON_LOOPBACK = (
    "import ray._private.services as s; s.resolve_ip_for_localhost = lambda host: host; "
    "from ray.scripts.scripts import main; main()"
)
PIN_APP = "node-pin"  # a replica that makes Serve start a proxy on the extra node


@contextmanager
def extra_node(c: RayCluster, *, router: bool) -> Iterator[None]:
    """A second node on 127.0.0.1, started with or without rollout's router in its
    environment, and one tiny replica pinned to it (by a resource only that node has): Serve
    runs an HTTP proxy on the head and on every node that runs a replica. The second proxy
    listens on the same port (Serve's proxies set SO_REUSEPORT), so connections spread over two
    proxies as over the machines of a cluster behind one address. At exit the replica and the
    node go, and Serve's list of proxies is back to one."""
    import ray

    from executor import cluster
    from executor import router as r
    from executor.router_client import proxies
    from executor.serve_calls import config_lock, deploy
    from executor.serve_config import declarative_apps

    info = cluster.local_cluster()
    assert info is not None
    env = dict(c.env(), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1")  # a node may join
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # its replica is gone before it stops
    env.pop(r.CALLBACK_ENV, None)
    if router:
        env[r.CALLBACK_ENV] = r.CALLBACK  # what docs/executor.md asks of every node
    temp_dir = tempfile.mkdtemp(prefix="rollout-node-", dir="/tmp")  # short: socket paths
    log = (c.tmp / "extra-node.log").open("a")  # `ray start`'s own words, when it cannot join
    node = subprocess.Popen(
        [sys.executable, "-c", JOIN_ON_LOOPBACK, "start", f"--address={info.address}",
         "--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0", "--block",
         '--resources={"extra_node": 1}', "--disable-usage-stats", f"--temp-dir={temp_dir}",
         f"--dashboard-agent-listen-port={free_port()}"],
        env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    log.close()

    def set_pin(on: bool) -> None:
        with config_lock():
            apps = declarative_apps(serve_details())
            apps.pop(PIN_APP, None)
            if on:
                apps[PIN_APP] = {
                    "name": PIN_APP, "route_prefix": None, "import_path": "examples.echo:app",
                    "args": {"version": "pin"},
                    "deployments": [{"name": "Echo", "num_replicas": 1, "ray_actor_options":
                                     {"num_cpus": 0, "resources": {"extra_node": 0.01}}}],
                }  # fmt: skip
            deploy(apps)

    try:
        joined = lambda: ray.cluster_resources().get("extra_node") or node.poll() is not None  # noqa: E731
        wait_for(joined, 60, what="the node to join")
        assert node.poll() is None, (c.tmp / "extra-node.log").read_text()[-2000:]
        set_pin(True)
        wait_for(
            lambda: [p.status for p in proxies(serve_details())] == ["HEALTHY"] * 2,
            90,
            what="a second HTTP proxy",
        )
        yield
    finally:
        set_pin(False)
        cluster._stop_pid(node.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)
        wait_for(lambda: len(proxies(serve_details())) == 1, 90, what="the node's proxy to go")


# ---- looking at the cluster ------------------------------------------------------------------


def serve_details() -> dict[str, Any]:
    from executor.cluster import serve_client

    return serve_client().get_serve_details()


def replicas(details: dict[str, Any], app: str) -> list[dict[str, Any]]:
    info = details.get("applications", {}).get(app)
    if not info:
        return []
    return [r for d in info.get("deployments", {}).values() for r in d.get("replicas", [])]


def live_version(name: str) -> str | None:
    from executor.serve_config import live_versions

    live = live_versions(name, serve_details())
    return next(iter(live)) if len(live) == 1 else None


def gpus_free() -> float:
    import ray

    return float(ray.available_resources().get("GPU", 0.0))


def remove(name: str) -> None:
    """Take a model's applications down and wait until their GPUs are free again."""
    from executor.serve_calls import remove_apps

    remove_apps(name)
    wait_for(lambda: gpus_free() >= GPUS, 60, what=f"{name}'s GPUs to be released")


def ensure_live(c: RayCluster, name: str, **over: Any) -> str:
    """The version of `name` that serves now, deploying v1 first if nothing does."""
    live = live_version(name)
    if live:
        return live
    out = c.cli("deploy", str(c.deploy_file(name, "v1", **over)))
    assert out.returncode == 0, out.stdout + out.stderr
    return "v1"


def other(version: str) -> str:
    return "v2" if version == "v1" else "v1"


@dataclass
class Sample:
    t: float
    holding: int  # replicas of both versions holding a GPU (placed: starting, running, stopping)
    running: int
    gpus_used: float


class Sampler:
    """Takes `sample()` every `every_s` seconds from a thread while in its `with` block."""

    every_s = 0.2

    def __init__(self) -> None:
        self.samples: list[Any] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> Any:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.sample())
            self._stop.wait(self.every_s)

    def __enter__(self) -> Any:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


class Monitor(Sampler):
    """Watches both versions' replicas every few hundred milliseconds from a thread."""

    def __init__(self, apps: tuple[str, ...]) -> None:
        super().__init__()
        self.apps = apps

    def sample(self) -> Sample:
        details = serve_details()
        free = gpus_free()
        holding = running = 0
        for app in self.apps:
            for r in replicas(details, app):
                holding += bool(r.get("node_id"))
                running += r["state"] == "RUNNING"
        return Sample(time.time(), holding, running, GPUS - free)
