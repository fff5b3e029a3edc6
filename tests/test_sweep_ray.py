"""Ray-task mode on a real local Ray cluster with the real simulator: the serial sweep's rows,
bad input in a task as its one line, and a worker killed mid-sweep retried."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from test_sweep_sim import TINY

from rollout.errors import InputError
from rollout.scenario import Scenario, load_scenario
from sim.inputs import Inputs
from sim.sweep import SweepPoint, run_sweep, simulate_point

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_tasks_give_the_serial_rows(ray_session: None, tmp_path: Path) -> None:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    scenario = load_scenario(path)
    serial = run_sweep(scenario, workers=1)
    remote = run_sweep(scenario, ray_address="auto")
    assert remote.backend == "ray (auto)"
    pd.testing.assert_frame_equal(serial.rows, remote.rows)
    assert remote.recommendation == serial.recommendation


def test_bad_input_in_a_task_is_the_users_one_line(ray_session: None, tmp_path: Path) -> None:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)

    def seed_dependent(scenario: Scenario, point: SweepPoint, inputs: Inputs) -> dict[str, Any]:
        raise InputError(f"seed {point.seed} draws no request (raise rate_per_s)")

    with pytest.raises(InputError) as err:
        run_sweep(load_scenario(path), ray_address="auto", point_fn=seed_dependent)
    message = str(err.value)  # the point's own sentence, not Ray's wrapped traceback
    assert "\n" not in message and "draws no request" in message


def test_a_killed_worker_is_retried_and_every_row_comes_back(
    ray_session: None, tmp_path: Path
) -> None:
    """SIGKILL the worker process running one point mid-simulation: Ray runs the point again
    elsewhere and the sweep completes with the serial run's rows."""
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    scenario = load_scenario(path)
    marker = tmp_path / "victim.pid"

    def killed_once(scenario: Scenario, point: SweepPoint, inputs: Inputs) -> dict[str, Any]:
        if point.index == 3 and not marker.exists():
            marker.write_text(str(os.getpid()))
            time.sleep(120)  # killed here
        return simulate_point(scenario, point, inputs)

    killed: list[int] = []

    def kill_the_victim() -> None:
        deadline = time.monotonic() + 60
        while not marker.exists() or not marker.read_text():
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)
        pid = int(marker.read_text())
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    killer = threading.Thread(target=kill_the_victim)
    killer.start()
    remote = run_sweep(scenario, ray_address="auto", point_fn=killed_once)
    killer.join()
    assert killed and killed[0] != os.getpid()
    assert remote.complete
    pd.testing.assert_frame_equal(remote.rows, run_sweep(scenario, workers=1).rows)
