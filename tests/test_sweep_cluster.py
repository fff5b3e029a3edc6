"""A sweep on an external two-node Ray cluster, started the way a team runs one: `ray start
--head` and `ray start --address` on a second node, each from its own working directory with its
own temp dir, token authentication from a file named in the environment. The user runs
`rollout sweep` from a third folder; the rows must equal a local run's. A second driver deletes
the scenario's files once the sweep has read them: every point still runs, on both nodes, so the
workers need neither the files nor the user's folder. The cluster is stopped by the pids the
test started."""

from __future__ import annotations

import io
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from rollout.scenario import load_scenario
from sim.sweep import run_sweep

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    address: str
    env: dict[str, str]  # what a driver of this cluster needs: the token, by file
    temp_dirs: list[Path]


def as_written(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows as sweep.csv gives them back (empty strings and None read as NaN)."""
    return pd.read_csv(io.StringIO(rows.to_csv(index=False)))


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM makes `ray start --block` stop everything it started; SIGKILL its group if not."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _wait_for_nodes(cluster: Cluster, n: int, procs: list[subprocess.Popen[bytes]]) -> None:
    check = "import ray; ray.init(address='{}'); print(sum(x['Alive'] for x in ray.nodes()))"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), "a `ray start` exited"
        out = subprocess.run(
            [PY, "-c", check.format(cluster.address)],
            env=cluster.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if out.returncode == 0 and out.stdout.strip() == str(n):
            return
        time.sleep(1)
    raise AssertionError(f"the cluster did not reach {n} nodes")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    base = tmp_path_factory.mktemp("cluster")
    token = base / "ray-token"
    fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    port = free_port()
    # short temp dirs: Ray's socket paths have a length limit
    temps = [Path(tempfile.mkdtemp(prefix="rs16-", dir="/tmp")) for _ in range(2)]
    common = ["--block", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats"]
    nodes = [
        [
            "--head",
            f"--port={port}",
            "--include-dashboard=false",
            f"--ray-client-server-port={free_port()}",
        ],
        [f"--address=127.0.0.1:{port}"],
    ]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i, args in enumerate(nodes):
            cwd = base / f"node{i}"  # each node from its own working directory
            cwd.mkdir()
            cmd = [
                PY,
                "-m",
                "ray.scripts.scripts",
                "start",
                *args,
                *common,
                f"--temp-dir={temps[i]}",
                f"--dashboard-agent-listen-port={free_port()}",
            ]
            log = (base / f"node{i}.log").open("wb")
            procs.append(
                subprocess.Popen(
                    cmd,
                    cwd=cwd,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
            if i == 0:
                _wait_for_nodes(Cluster(f"127.0.0.1:{port}", env, temps), 1, procs)
        c = Cluster(f"127.0.0.1:{port}", env, temps)
        _wait_for_nodes(c, 2, procs)
        yield c
    finally:
        for proc in reversed(procs):
            _stop(proc)
        for t in temps:
            shutil.rmtree(t, ignore_errors=True)


def test_bundled_sweep_on_two_nodes_equals_the_local_run(cluster: Cluster, tmp_path: Path) -> None:
    user = tmp_path / "user"  # the user's folder: neither node's working directory
    user.mkdir()
    out = tmp_path / "remote"
    scenario = os.path.relpath(ROOT / "scenarios" / "azure-conv.yaml", user)
    res = subprocess.run(
        [
            PY,
            "-m",
            "rollout.cli",
            "sweep",
            scenario,
            "--ray-address",
            cluster.address,
            "--out",
            str(out),
        ],
        cwd=user,
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"on ray ({cluster.address})" in res.stderr
    local = run_sweep(load_scenario(ROOT / "scenarios" / "azure-conv.yaml"), workers=2)
    remote = pd.read_csv(out / "sweep.csv")
    assert len(remote) == 36
    expected = as_written(local.rows.drop(columns="slo_window"))
    pd.testing.assert_frame_equal(remote, expected, check_dtype=False)
    assert res.stdout.strip() == local.recommendation.message


DRIVER = """
import os, sys
from pathlib import Path
import ray
from rollout.scenario import load_scenario
from sim.sweep import run_sweep, simulate_point

folder = Path(sys.argv[1])

def delete_then_simulate(scenario, point, inputs):
    # the sweep has read its inputs: from here on no file of the user's exists
    for name in ("trace.csv", "cold.csv", "tiny.yaml"):
        (folder / name).unlink(missing_ok=True)
    node = ray.get_runtime_context().get_node_id()
    return simulate_point(scenario, point, inputs) | {"node": node}

result = run_sweep(load_scenario(folder / "tiny.yaml"), ray_address=sys.argv[2],
                   point_fn=delete_then_simulate)
assert not any(folder.iterdir()), list(folder.iterdir())
result.rows.drop(columns="node").to_csv(sys.argv[3], index=False)
print(len(result.rows), len(result.failures), result.rows["node"].nunique())
"""

TINY_FILES = """
name: tiny-files
seed: 3
trace: {path: trace.csv, rate_scale: 2}
service: {kind: exponential, mean_s: 1.0}
fleet: {replicas: 4, gpu_capacity: 6, max_ongoing_requests: 1}
cold_start: {kind: empirical, path: cold.csv}
rollout: {at_s: 60, policy: {max_surge_percent: 25}}
sweep: {max_surge_percent: [25, 50], max_unavailable_percent: [25], seeds: 3}
"""


def test_workers_need_no_file_of_the_users(cluster: Cluster, tmp_path: Path) -> None:
    folder = tmp_path / "user"
    folder.mkdir()
    arrivals = "\n".join(f"{i * 0.6:.1f}" for i in range(500))
    (folder / "trace.csv").write_text(f"arrival_s\n{arrivals}\n")
    (folder / "cold.csv").write_text("seconds\n20\n30\n45\n")
    (folder / "tiny.yaml").write_text(TINY_FILES)
    local = run_sweep(load_scenario(folder / "tiny.yaml"), workers=1)
    rows = tmp_path / "rows.csv"
    res = subprocess.run(
        [PY, "-c", textwrap.dedent(DRIVER), str(folder), cluster.address, str(rows)],
        cwd=tmp_path,
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["9", "0", "2"]  # every point, none failed, on both nodes
    expected = as_written(local.rows.drop(columns="slo_window"))
    remote = pd.read_csv(rows).drop(columns="slo_window")
    pd.testing.assert_frame_equal(remote, expected, check_dtype=False)
