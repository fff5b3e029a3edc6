"""What the executor records of a rollout (replica lifecycles, per-version counts) and `rollout
export`, on Serve's details recorded from a real run (tests/data/serve_details), without Ray:
the store on SQLite and on a real PostgreSQL server, export's files against a simulated run's,
and bad input."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from postgres_fixture import postgres_url
from test_executor_observation import plan_for, recorded
from typer.testing import CliRunner

from executor import observation, recording, status, store
from executor.plan import Memory, Plan
from measure import export, runs
from rollout import controller as c
from rollout import history as h
from rollout.cli import app
from rollout.scenario import Scenario
from sim.api import simulate, write_outputs
from sim.result import TIMELINE_COLUMNS

__all__ = ["postgres_url"]


def play(plan: Plan, names: list[str], url: str, last: int = 0) -> list[dict[str, Any]]:
    """Observe the recorded snapshots in turn as the backend does (every probe passes) and
    record each tick as the workflow does (`last`: only the last ticks); returns each tick's
    time and counts."""
    recording._RECORDERS.clear()
    mem = Memory(targets={c.CURRENT: 2, c.CANDIDATE: 1})
    ticks = []
    for name in names:
        for snap in recorded(name)[-last:]:
            probe = observation.to_probe(plan, mem, snap.details)
            passed = {r["replica_id"] for r in probe}
            _, counts = observation.observe(plan, mem, snap, passed)
            state = {"candidate_weight": 0.5, "desired": 2, "step": 1}
            recording.record(url, plan, mem, snap, counts, state)
            ticks.append({"t": snap.time, "counts": counts})
    return ticks


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'rollout.sqlite'}"
        return
    url = request.getfixturevalue("postgres_url")
    st = store.Store(url)
    with st.engine.begin() as conn:
        conn.execute(store.OBSERVATIONS.delete())
        conn.execute(store.REPLICA_EVENTS.delete())
    st.dispose()
    yield url


def test_replica_lifecycles_and_counts_are_recorded_once_each(url: str) -> None:
    snaps = recorded("candidate_starts")
    plan = plan_for(snaps, "v2")
    ticks = play(plan, ["candidate_starts", "scale_down"], url)
    st = store.Store(url)
    events = {(e["replica_id"], e["event"]): e for e in st.replica_events("r")}
    new = "nlf4vh66"  # v2's replica, seen from STARTING on
    t = [s.time for s in snaps]
    assert events[(new, "placed")]["t"] == t[5] and events[(new, "placed")]["role"] == "candidate"
    assert events[(new, "running")]["t"] == t[6] == events[(new, "ready")]["t"]
    assert events[(new, "created")]["t"] < t[4]  # Serve's start time of the actor
    # v1's replicas ran before anything watched: created only, then u0re6hml's scale-down
    assert {e for r, e in events if r == "olweeo63"} == {"created", "seen"}
    gone = recorded("scale_down")
    assert events[("u0re6hml", "stopping")]["t"] == gone[2].time
    assert events[("u0re6hml", "stopped")]["t"] == gone[4].time
    rows = st.observations("r")
    # one row per change of the counts (GPUs, weight, replicas), none for a repeated state
    assert len(rows) < len(ticks)
    changes = [ticks[0]]
    for a, b in itertools.pairwise(ticks):
        if b["counts"] != a["counts"]:
            changes.append(b)
    assert {r["t"] for r in rows} >= {x["t"] for x in changes}
    assert rows[-1]["candidate_ready"] == 1 and rows[-1]["current_ready"] == 1
    # a controller that restarts (or a step run again) reads back what is recorded and adds
    # nothing twice
    before = len(st.replica_events("r")), len(rows)
    play(plan, ["scale_down"], url, last=2)
    assert (len(st.replica_events("r")), len(st.observations("r"))) == before
    st.dispose()


def load_output(folder: Path, started_at: float, versions: list[str | None]) -> Path:
    """A `rollout load` output: requests.parquet and summary.json with `started_at`."""
    n = len(versions)
    arrival = np.linspace(0.0, 12.0, n)
    latency = np.linspace(0.5, 2.0, n)
    dropped = np.zeros(n, dtype=bool)
    dropped[-1] = True
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(
        {
            "arrival_s": arrival, "start_s": arrival + 0.001, "end_s": arrival + latency,
            "wait_s": np.nan, "latency_s": latency, "ttft_s": latency / 4,
            "version": pd.array(versions, dtype="string"), "dropped": dropped,
            "status": np.where(dropped, 500, 200), "error": np.where(dropped, "HTTP 500", None),
            "context_tokens": 300, "generated_tokens": 20,
        }
    ).to_parquet(folder / "requests.parquet")  # fmt: skip
    (folder / "summary.json").write_text(json.dumps({"started_at": started_at}))
    return folder / "requests.parquet"


@pytest.fixture
def exported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, float]:
    """A recorded rollout in the default store of a temporary ROLLOUT_HOME, with its history
    (read by `rollout history` from DBOS's tables in a real run) given here."""
    monkeypatch.setenv("ROLLOUT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ROLLOUT_STORE", raising=False)
    snaps = recorded("candidate_starts")
    plan = plan_for(snaps, "v2")
    url = store.default_url()
    st = store.Store(url)
    t0 = snaps[0].time
    st.add(store.Record(id="r", app="m", from_version="v1", to_version="v2", created_at=t0,
                        plan=plan.model_dump_json(), outcome="succeeded", finished_at=t0 + 7,
                        cluster="x"))  # fmt: skip
    st.dispose()
    play(plan, ["candidate_starts", "scale_down"], url)
    policy = plan.spec.rollout_policy().model_dump()
    history: list[h.Event] = [
        h.RolloutStarted(t=t0, policy=policy, desired=2, steps=2),
        h.Scaled(t=t0 + 1.5, version="candidate", replicas=1, reason="step 1: surge"),
        h.StepCompleted(
            t=t0 + 5.0,
            step=1,
            direction="forward",
            candidate_weight=0.5,
            current_replicas=1,
            candidate_replicas=1,
        ),
        h.Finished(t=t0 + 6.3, outcome="succeeded", reason="all traffic on the candidate"),
    ]
    monkeypatch.setattr(status, "client", lambda url: None)
    monkeypatch.setattr(status, "read_history", lambda db, rid, offset=0: (history, 0))
    return tmp_path, t0


def simulated_columns(tmp_path: Path) -> dict[str, list[str]]:
    scenario = Scenario.model_validate(
        {
            "name": "tiny",
            "trace": {"synthetic": {"process": "poisson", "rate_per_s": 2.0, "duration_s": 60}},
            "fleet": {"replicas": 2, "gpu_capacity": 4},
            "cold_start": {"seconds": 5},
            "rollout": {"at_s": 10, "policy": {"max_surge_percent": 50}},
        }
    )
    write_outputs(simulate(scenario), tmp_path / "sim")
    return {
        name: list(pd.read_parquet(tmp_path / "sim" / f"{name}.parquet").columns)
        for name in ("timeline", "replicas", "requests")
    }


def test_export_writes_the_simulators_files_with_its_columns(
    exported: tuple[Path, float],
) -> None:
    tmp_path, t0 = exported
    versions: list[str | None] = ["v1"] * 20 + ["v2"] * 10
    req = load_output(tmp_path / "load", t0 - 2.0, versions)
    out = tmp_path / "export"
    done = CliRunner().invoke(app, ["export", "r", "--out", str(out), "--requests", str(req)])
    assert done.exit_code == 0, done.output
    sim = simulated_columns(tmp_path)
    for name, columns in sim.items():
        got = list(pd.read_parquet(out / f"{name}.parquet").columns)
        assert set(columns) - {"replica_id"} <= set(got), (name, columns, got)
    assert list(pd.read_parquet(out / "timeline.parquet").columns) == list(TIMELINE_COLUMNS)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rollout_start_s"] == pytest.approx(2.0)  # the replay's start is time 0
    assert summary["rollout_duration_s"] == pytest.approx(6.3)
    assert summary["outcome"] == "succeeded" and summary["steps"] == 1
    assert summary["step_duration_s_1"] == pytest.approx(5.0)
    assert summary["requests"] == 30 and summary["failed"] == 1 and summary["dropped"] == 0
    during = np.linspace(0.5, 2.0, 30)[(np.linspace(0, 12, 30) >= 2) & (np.linspace(0, 12, 30)
                                                                      <= 8.3)]  # fmt: skip
    assert summary["latency_p99_rollout_s"] == pytest.approx(np.percentile(during, 99))
    assert summary["latency_p50_rollout_s"] == pytest.approx(np.percentile(during, 50))
    assert summary["peak_gpus"] == 3 and summary["min_ready_replicas"] == 2
    replicas = pd.read_parquet(out / "replicas.parquet").set_index("replica_id")
    new = replicas.loc["nlf4vh66"]
    assert new["version"] == "candidate" and new["ready_s"] > new["gpu_s"] > new["created_s"]
    assert new["asked_s"] == pytest.approx(3.5)  # the scale-up that asked for it
    assert replicas.loc["u0re6hml", "stop_reason"] == "removed"
    requests = pd.read_parquet(out / "requests.parquet")
    assert list(requests["version"].astype(str).unique()) == ["current", "candidate"]
    events = h.load_jsonl((out / "events.jsonl").read_text())
    assert events[0].t == pytest.approx(2.0)
    # the simulator's plotting reads it back and draws it
    result = runs.read_result(out)
    assert len(result.requests) == 30
    (out / "timeline.png").unlink()
    assert CliRunner().invoke(app, ["plot", str(out)]).exit_code == 0
    assert (out / "timeline.png").stat().st_size > 10_000


def test_export_without_requests_starts_at_the_rollout(exported: tuple[Path, float]) -> None:
    tmp_path, _ = exported
    out = tmp_path / "export"
    assert export.export_command("r", out).summary["rollout_start_s"] == 0.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["latency_p99_rollout_s"] is None and summary["requests"] == 0


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("unknown", "unknown rollout id 'nope'"),
        ("elsewhen", "do not overlap the rollout"),
        ("other", "answered by version v7, not by this rollout's (v1 → v2)"),
        ("missing", "not a `rollout load` output"),
    ],
)
def test_bad_exports_end_in_one_line(exported: tuple[Path, float], case: str, message: str) -> None:
    tmp_path, t0 = exported
    args = ["export", "nope" if case == "unknown" else "r", "--out", str(tmp_path / "x")]
    if case == "elsewhen":
        args += ["--requests", str(load_output(tmp_path / "l", t0 - 3600, ["v1"] * 5))]
    elif case == "other":
        args += ["--requests", str(load_output(tmp_path / "l", t0, ["v1", "v7"]))]
    elif case == "missing":
        path = load_output(tmp_path / "l", t0, ["v1"])
        (path.parent / "summary.json").unlink()
        args += ["--requests", str(path)]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 2, done.output
    lines = done.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.output
    assert not (tmp_path / "x").exists()
