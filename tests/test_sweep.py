"""The sweep machinery against a fake point function: grid, runners, SLO verdicts, Pareto front,
recommendation, files and the command line. The real simulator is in test_sweep_sim.py."""

from __future__ import annotations

import math
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from rollout.cli import app
from rollout.errors import InputError
from rollout.scenario import Scenario, Slo, load_scenario
from sim import verdict
from sim.inputs import Inputs
from sim.sweep import (
    SweepPoint,
    run_sweep,
    summary_metrics,
    sweep_points,
    worst_window_p99,
    write_sweep,
)

SCENARIO = """
name: tiny
seed: 40
trace: {{synthetic: {{process: poisson, rate_per_s: 2.0, duration_s: 300}}}}
fleet: {{replicas: 4, gpu_capacity: 6}}
rollout:
  at_s: 30
  policy: {{max_surge_percent: 25, progress_deadline_seconds: 900}}
sweep:
  max_surge_percent: {surge}
  max_unavailable_percent: {unavailable}
  stabilization_time_seconds: [0, 60]
  seeds: 3
slo: {{latency_p99_s: 2.0, max_drop_rate: 0.01}}
"""


def write_scenario(tmp: Path, surge: str = "[25, 50]", unavailable: str = "[25, 50]") -> Path:
    path = tmp / "tiny.yaml"
    path.write_text(SCENARIO.format(surge=surge, unavailable=unavailable))
    return path


@pytest.fixture
def scenario(tmp_path: Path) -> Scenario:
    return load_scenario(write_scenario(tmp_path))


def fake_point(scenario: Scenario, point: SweepPoint, inputs: Inputs) -> dict[str, Any]:
    """Numbers shaped like a rollout's: surge costs GPUs, unavailable costs latency, longer
    stabilization costs time; each seed adds its own noise."""
    pol = point.policy
    rng = random.Random(f"{pol.label()}|{point.seed}")
    surge, unavail = pol.max_surge_percent, pol.max_unavailable_percent
    steps = math.ceil(100 / (surge or unavail))
    duration = steps * (120 + pol.stabilization_time_seconds) * rng.uniform(0.9, 1.1)
    p99 = 1.0 + unavail / 20 + rng.uniform(0, 0.5)
    requests = 600 + rng.randrange(50)
    return {
        "requests": requests,
        "completed": requests - (unavail // 25),
        "dropped": unavail // 25,
        "latency_p50_s": p99 / 3,
        "latency_p99_s": p99 * 0.9,
        "ttft_p99_s": p99 / 2,
        "latency_p99_rollout_s": p99,
        "ttft_p99_rollout_s": p99 / 2,
        "rollout_duration_s": duration,
        "gpu_hours": 4 * 300 / 3600 + surge / 100 * duration / 3600,
        "cost_usd": 2.5 * (4 * 300 / 3600 + surge / 100 * duration / 3600),
        "span_s": max(300.0, 30 + duration),
        "cost_rate_end_usd_h": 4 * 2.5,
        "peak_gpus": 4 + math.ceil(4 * surge / 100),
        "min_ready_replicas": 4 - (4 * unavail) // 100,
        "outcome": "succeeded",
        "pid": os.getpid(),
    }


def never_called(scenario: Scenario, point: SweepPoint, inputs: Inputs) -> dict[str, Any]:
    raise AssertionError("a point ran although the grid was invalid")


def broken_point(scenario: Scenario, point: SweepPoint, inputs: Inputs) -> dict[str, Any]:
    if point.policy.max_unavailable_percent == 50:
        raise ZeroDivisionError("boom")
    return fake_point(scenario, point, inputs)


# --- grid --------------------------------------------------------------------------------------


def test_points_cover_grid_times_seeds_in_order(scenario: Scenario) -> None:
    points = sweep_points(scenario)
    assert len(points) == 4 * 2 * 3  # (2 surge + 2 unavailable) × 2 stabilizations × 3 seeds
    assert [p.index for p in points] == list(range(len(points)))
    assert [p.seed for p in points[:3]] == [40, 41, 42]
    labels = {p.policy.label() for p in points}
    assert "surge=50 stab=60" in labels and "unavailable=25 stab=0" in labels
    # the scenario policy's other fields carry over to every point
    assert {p.policy.progress_deadline_seconds for p in points} == {900}


def test_invalid_point_fails_before_any_work(tmp_path: Path) -> None:
    scenario = load_scenario(write_scenario(tmp_path, unavailable="[25, 75]"))
    with pytest.raises(InputError, match=r"max_unavailable_percent=75"):
        run_sweep(scenario, workers=2, point_fn=never_called)


def test_scenario_without_grid_is_an_input_error(scenario: Scenario) -> None:
    with pytest.raises(InputError, match="no sweep grid"):
        sweep_points(scenario.model_copy(update={"sweep": None}))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"workers": 0}, "at least 1"), ({"workers": 2, "ray_address": "auto"}, "not both")],
)
def test_bad_runner_options(scenario: Scenario, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InputError, match=message):
        run_sweep(scenario, point_fn=never_called, **kwargs)


def test_cli_invalid_grid_is_one_line_and_nothing_written(tmp_path: Path) -> None:
    path = write_scenario(tmp_path, surge="[10, 80]")
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["sweep", str(path), "--out", str(out)])
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "max_surge_percent=80" in lines[0] and lines[0].startswith("rollout: error:")
    assert not out.exists()


# --- runners -----------------------------------------------------------------------------------


def test_parallel_and_serial_give_the_same_rows(scenario: Scenario) -> None:
    serial = run_sweep(scenario, workers=1, point_fn=fake_point)
    parallel = run_sweep(scenario, workers=2, point_fn=fake_point)
    assert serial.backend == "1 process"
    assert parallel.backend == "2 processes (this one and 1 spawned)"
    assert set(serial.rows["pid"]) == {os.getpid()}
    # this process simulates too, and a spawned helper took the first points it was handed
    helpers = set(parallel.rows["pid"]) - {os.getpid()}
    assert len(helpers) == 1 and os.getpid() in set(parallel.rows["pid"])
    pd.testing.assert_frame_equal(
        serial.rows.drop(columns="pid"), parallel.rows.drop(columns="pid")
    )
    assert serial.recommendation == parallel.recommendation


def test_rows_follow_grid_order_with_policy_fields(scenario: Scenario) -> None:
    result = run_sweep(scenario, workers=1, point_fn=fake_point)
    for point, (_, row) in zip(result.points, result.rows.iterrows(), strict=True):
        assert row["policy"] == point.policy.label()
        assert row["seed"] == point.seed
        assert row["max_surge_percent"] == point.policy.max_surge_percent
        assert row["stabilization_time_seconds"] == point.policy.stabilization_time_seconds
        assert row["cost_usd"] == fake_point(scenario, point, Inputs())["cost_usd"]


@pytest.mark.parametrize("workers", [1, 2])
def test_failing_points_are_named_and_the_rest_completes(scenario: Scenario, workers: int) -> None:
    result = run_sweep(scenario, workers=workers, point_fn=broken_point)
    broken = [p.label for p in result.points if p.policy.max_unavailable_percent == 50]
    assert len(broken) == 6  # unavailable=50 × 2 stabilizations × 3 seeds
    assert result.failures == [f"{label}: ZeroDivisionError: boom" for label in broken]
    assert not result.complete
    failed = result.rows[result.rows["outcome"] == "error"]
    assert list(failed["error"]) == ["ZeroDivisionError: boom"] * 6
    assert failed["cost_usd"].isna().all() and not failed["slo_met"].any()
    ok = result.rows[result.rows["outcome"] != "error"]
    assert len(ok) == 18 and ok["error"].isna().all()
    expected = run_sweep(scenario, workers=1, point_fn=fake_point).rows
    for column in ("policy", "seed", "cost_usd", "latency_p99_rollout_s"):
        assert list(ok[column]) == list(expected.loc[ok.index, column])
    assert not result.recommendation.policy.startswith("unavailable=50")


def test_cli_reports_failed_points_and_exits_incomplete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sim import sweep

    monkeypatch.setattr(sweep, "simulate_point", broken_point)
    out = tmp_path / "out"
    res = CliRunner().invoke(
        app, ["sweep", str(write_scenario(tmp_path)), "--workers", "1", "--out", str(out)]
    )
    assert res.exit_code == sweep.INCOMPLETE == 3
    assert "Incomplete: 6 of 24 simulations failed" in res.stderr
    assert "  unavailable=50 stab=60 seed=42: ZeroDivisionError: boom" in res.stderr
    assert res.stdout.startswith("Recommended:")
    report = (out / "report.md").read_text()
    assert "## Failed simulations" in report and "6 of 24 simulations" in report
    assert "- `unavailable=50 stab=0 seed=40: ZeroDivisionError: boom`" in report
    assert (pd.read_csv(out / "sweep.csv")["outcome"] == "error").sum() == 6


def test_summary_metrics_keep_scalars_in_a_stable_order() -> None:
    summary = {"zeta": 1, "outcome": "succeeded", "policy": {"a": 1}, "seed": 3, "requests": 5}
    summary |= {"steps_list": [1, 2], "cost_usd": 1.5}
    out = summary_metrics(summary)
    assert list(out)[:2] == ["requests", "completed"]
    assert out["cost_usd"] == 1.5 and out["zeta"] == 1 and out["completed"] is None
    assert "policy" not in out and "seed" not in out and "steps_list" not in out


# --- SLO, Pareto, recommendation ---------------------------------------------------------------


def rows_table(rng: np.random.Generator, n_policies: int, seeds: int) -> pd.DataFrame:
    """A random sweep table: integer-dollar costs so the cheapest is unambiguous."""
    rows = []
    costs = rng.permutation(np.arange(10, 10 + 3 * n_policies))[:n_policies]
    for i in range(n_policies):
        mode = "surge" if i % 2 else "unavailable"
        for s in range(seeds):
            rows.append(
                {
                    "policy": f"{mode}={i + 1} stab=0",
                    "mode": mode,
                    "max_surge_percent": (i + 1) * (mode == "surge"),
                    "max_unavailable_percent": (i + 1) * (mode == "unavailable"),
                    "stabilization_time_seconds": 0.0,
                    "seed": s,
                    "requests": 1000,
                    "dropped": int(rng.integers(0, 5)),
                    "latency_p99_s": float(rng.uniform(0.5, 4)),
                    "latency_p99_rollout_s": float(rng.uniform(0.5, 4)),
                    "ttft_p99_s": 0.1,
                    "ttft_p99_rollout_s": math.nan,
                    "rollout_duration_s": float(rng.uniform(100, 1000)),
                    "cost_usd": float(costs[i]) + s * 0.001,
                    "span_s": 3600.0 + float(rng.choice([0.0, 0.0, rng.uniform(0, 600)])),
                    "cost_rate_end_usd_h": 2 * 2.5,
                    "gpu_hours": float(costs[i]) / 2.5,
                    "peak_gpus": 10,
                    "outcome": "succeeded" if rng.random() > 0.1 else "failed",
                }
            )
    return pd.DataFrame(rows)


def test_slo_judges_the_worst_five_minutes_then_the_rollout_then_the_run() -> None:
    rows = rows_table(np.random.default_rng(0), 2, 2)
    rows.loc[1, "latency_p99_rollout_s"] = math.nan
    judged = verdict.assess(rows, Slo(latency_p99_s=2.0))
    assert list(judged["slo_window"]) == ["rollout", "run", "rollout", "rollout"]
    rows.loc[2, "latency_p99_worst5m_s"] = 7.5
    rows.loc[2, "latency_p99_rollout_s"] = 1.0  # diluted by a long rollout
    judged = verdict.assess(rows, Slo(latency_p99_s=2.0))
    assert judged.loc[2, "slo_window"] == "worst 5 min"
    assert judged.loc[2, "slo_latency_p99_s"] == 7.5 and not judged.loc[2, "slo_met"]
    assert judged.loc[1, "slo_latency_p99_s"] == rows.loc[1, "latency_p99_s"]
    assert judged.loc[0, "slo_latency_p99_s"] == rows.loc[0, "latency_p99_rollout_s"]
    assert judged.loc[0, "slo_ttft_p99_s"] == 0.1  # TTFT window missing: whole run


@pytest.mark.parametrize("seed", range(8))
def test_recommendation_is_the_cheapest_row_group_meeting_the_slo(seed: int) -> None:
    rng = np.random.default_rng(seed)
    slo = Slo(latency_p99_s=3.0, max_drop_rate=0.003)
    rows = verdict.assess(rows_table(rng, 7, 3), slo)
    # the verdict, computed independently of the module
    met = (
        (rows["latency_p99_rollout_s"] <= 3.0)
        & (rows["dropped"] / rows["requests"] <= 0.003)
        & (rows["outcome"] == "succeeded")
    )
    assert list(rows["slo_met"]) == list(met)
    ok = met.groupby(rows["policy"]).all()
    # cost over the longest run: shorter runs keep paying for the GPUs they ended with
    extended = rows["cost_usd"] + (rows["span_s"].max() - rows["span_s"]) / 3600 * 2 * 2.5
    cost = extended.groupby(rows["policy"]).mean()
    rec = verdict.recommend(verdict.policy_table(rows), slo)
    if ok.any():
        assert rec.meets_slo
        assert rec.policy == cost[ok].idxmin()
        assert rec.message.startswith("Recommended: ")
    else:
        assert not rec.meets_slo and rec.message.startswith("No policy meets the SLO")


def test_no_policy_meets_the_slo_names_the_closest() -> None:
    rows = verdict.assess(rows_table(np.random.default_rng(3), 5, 2), Slo(latency_p99_s=0.1))
    rows["outcome"] = "succeeded"
    policies = verdict.policy_table(rows)
    rec = verdict.recommend(policies, Slo(latency_p99_s=0.1))
    assert not rec.meets_slo
    worst = rows.groupby("policy")["latency_p99_rollout_s"].max()
    assert rec.policy == worst.idxmin()
    mode, pct = rec.policy.split()[0].split("=")
    assert f"Closest: max_{mode}_percent={pct}, stabilization_time_seconds=0" in rec.message
    assert rec.riskiest == worst.idxmax()


def test_costs_compare_over_the_longest_run() -> None:
    rows = pd.DataFrame(
        {"span_s": [3600.0, 5400.0], "cost_rate_end_usd_h": [25.0, 30.0], "cost_usd": [25.0, 40.0]}
    )
    out = verdict.add_horizon_cost(rows)
    assert list(out["horizon_s"]) == [5400.0, 5400.0]
    # the shorter run pays 30 more minutes at what its last hour cost (10 GPUs at $2.5)
    assert list(out["cost_horizon_usd"]) == [25.0 + 0.5 * 10 * 2.5, 40.0]


def test_costs_within_a_cent_tie_and_latency_margin_decides() -> None:
    rows = rows_table(np.random.default_rng(1), 4, 1)
    rows["outcome"] = "succeeded"
    rows["dropped"] = 0
    rows["span_s"] = 3600.0
    rows["cost_usd"] = [10.004, 10.009, 10.013, 10.001]
    rows["latency_p99_rollout_s"] = [1.0, 0.5, 0.4, 2.0]
    rows["rollout_duration_s"] = [300.0, 900.0, 100.0, 300.0]
    rec = verdict.recommend(verdict.policy_table(verdict.assess(rows, Slo())), Slo())
    # within a cent of the cheapest (10.001): rows 0, 1 and 3; row 1 has the most margin
    assert rec.policy == rows.loc[1, "policy"]
    rows["latency_p99_rollout_s"] = 1.0  # equal margins: the faster rollout
    rec = verdict.recommend(verdict.policy_table(verdict.assess(rows, Slo())), Slo())
    assert rec.policy in {rows.loc[0, "policy"], rows.loc[3, "policy"]}
    assert rec.rollout_duration_s == 300.0


def test_worst_window_p99_finds_the_bad_five_minutes() -> None:
    arrival = np.arange(100.0, 1300.0, 1.0)  # 1 request/s; the rollout runs 100 s to 1000 s
    ttft = np.full(len(arrival), 0.1)
    bad = (arrival >= 700) & (arrival < 800)  # inside the third window [700, 1000)
    ttft[bad] = np.linspace(1.0, 9.0, bad.sum())
    requests = pd.DataFrame({"arrival_s": arrival, "ttft_s": ttft, "dropped": False})
    want = float(np.percentile(ttft[(arrival >= 700) & (arrival < 1000)], 99))
    assert worst_window_p99(requests, "ttft_s", 100.0, 1000.0) == pytest.approx(want)
    # the whole-window p99 dilutes it
    assert float(np.percentile(ttft[arrival <= 1000], 99)) < want
    # windows with fewer than 50 requests don't count; no rollout, no number
    assert worst_window_p99(requests, "ttft_s", 100.0, 130.0) is None
    assert worst_window_p99(requests, "ttft_s", None, None) is None


def test_timelines_show_each_policys_worst_seed() -> None:
    rows = rows_table(np.random.default_rng(5), 1, 3)
    rows["latency_p99_worst5m_s"] = [1.0, 1.0, 9.0]  # seed 2: a bad five minutes
    rows["latency_p99_rollout_s"] = [2.5, 1.0, 1.0]  # seed 0: the worst window p99
    rows["ttft_p99_worst5m_s"] = math.nan
    judged = verdict.assess(rows, Slo(latency_p99_s=2.0))
    assert list(judged["worst5m_severity"]) == [0.5, 0.5, 4.5]
    assert verdict.worst_run(judged, rows.loc[0, "policy"]) == (2, None)
    # without 5-minute windows the rollout-window p99 decides: seed 0
    rows["latency_p99_worst5m_s"] = math.nan
    judged = verdict.assess(rows, Slo(latency_p99_s=2.0))
    assert list(judged["slo_window"]) == ["rollout"] * 3
    assert verdict.worst_run(judged, rows.loc[0, "policy"]) == (0, None)


def brute_front(cost: list[float], lat: list[float]) -> list[bool]:
    def dominated(i: int) -> bool:
        return any(
            cost[j] <= cost[i] and lat[j] <= lat[i] and (cost[j] < cost[i] or lat[j] < lat[i])
            for j in range(len(cost))
        )

    return [not dominated(i) for i in range(len(cost))]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 6), st.integers(0, 6)),
        min_size=1,
        max_size=12,
    )
)
def test_pareto_front_matches_the_definition(points: list[tuple[int, int]]) -> None:
    cost = [float(c) for c, _ in points]
    lat = [float(v) for _, v in points]
    assert list(verdict.pareto_front(cost, lat)) == brute_front(cost, lat)


# --- files and the command -----------------------------------------------------------------------


def test_write_sweep_files_round_trip(scenario: Scenario, tmp_path: Path) -> None:
    result = run_sweep(scenario, workers=1, point_fn=fake_point)
    out = write_sweep(result, tmp_path / "report", timelines=False)
    csv = pd.read_csv(out / "sweep.csv")
    csv["slo_violation"] = csv["slo_violation"].fillna("")  # an empty cell: nothing violated
    expected = result.rows.drop(columns="slo_window")
    pd.testing.assert_frame_equal(csv, expected)
    text = (out / "report.md").read_text()
    assert result.recommendation.message in text
    assert "![" in text and "(pareto.png)" in text and "(durations.png)" in text
    for png in ["pareto.png", "durations.png"]:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # every policy appears in the report's table
    for label in result.policies["policy"]:
        assert f"| {label} |" in text or f"| **{label}** |" in text


def test_bad_input_files_stop_the_sweep_before_any_point_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Paths resolve against the scenario's folder whatever the working directory, and every
    file is read and checked before a runner (local or Ray) is started."""
    from sim import sweep

    def no_runner(*args: object) -> None:
        raise AssertionError("a runner started although an input file is bad")

    for runner in ("run_serial", "run_processes", "run_ray"):
        monkeypatch.setattr(sweep, runner, no_runner)
    folder = tmp_path / "scenario"
    folder.mkdir()
    (folder / "trace.csv").write_text("arrival_s\n0\n1\nsoon\n")
    text = SCENARIO.format(surge="[25]", unavailable="[25]").replace(
        "{synthetic: {process: poisson, rate_per_s: 2.0, duration_s: 300}}", "{path: trace.csv}"
    )
    (folder / "tiny.yaml").write_text(text)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    scenario = load_scenario(Path("../scenario/tiny.yaml"))
    assert scenario.trace.path == folder / "trace.csv"  # absolute, in the scenario's folder
    for kwargs in ({"workers": 1}, {"workers": 2}, {"ray_address": "auto"}):
        with pytest.raises(InputError, match=r"trace.csv: line 4: arrival_s 'soon'"):
            run_sweep(scenario, point_fn=never_called, **kwargs)  # type: ignore[arg-type]
    res = CliRunner().invoke(app, ["sweep", "../scenario/tiny.yaml", "--out", "out"])
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rollout: error: ")
    assert "trace.csv: line 4" in lines[0] and not Path("out").exists()
