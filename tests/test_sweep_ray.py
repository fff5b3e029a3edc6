"""Ray-task mode on a real local Ray cluster with the real simulator: the serial sweep's rows."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from test_sweep_sim import TINY

from rollout.errors import InputError
from rollout.scenario import load_scenario
from sim.sweep import run_sweep

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
    (tmp_path / "trace.csv").write_text("arrival_s\n0\n1\nsoon\n")
    path = tmp_path / "bad.yaml"
    path.write_text(
        TINY.replace(
            "trace: {synthetic: {process: poisson, rate_per_s: 3.0, duration_s: 900}}",
            f"trace: {{path: {tmp_path / 'trace.csv'}}}",
        )
    )
    with pytest.raises(InputError) as err:
        run_sweep(load_scenario(path), ray_address="auto")
    message = str(err.value)  # the simulator's own sentence, not Ray's wrapped traceback
    assert "\n" not in message and "line 4" in message and "'soon'" in message
