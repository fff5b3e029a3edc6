"""`rollout simulate`: outputs, overrides, the side-by-side comparison, the bundled scenarios,
and one clear line (never a traceback) for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from rollout import history as h
from rollout.cli import app
from rollout.scenario import load_scenario
from sim.api import compare, simulate

ROOT = Path(__file__).parent.parent
SCENARIOS = ["azure-conv", "azure-conv-autoscaled", "azure-code", "azure-code-autoscaled"]
TIMELINE = [
    "t_s",
    "current_ready",
    "current_starting",
    "current_draining",
    "candidate_ready",
    "candidate_starting",
    "candidate_draining",
    "pending_gpu",
    "gpus_in_use",
    "on_demand_gpus_in_use",
    "on_demand_nodes",
    "candidate_weight",
    "desired_replicas",
]
REQUESTS = [
    "arrival_s",
    "start_s",
    "end_s",
    "wait_s",
    "latency_s",
    "ttft_s",
    "version",
    "replica_id",
    "dropped",
    "failed",
]
SUMMARY = [
    "requests",
    "completed",
    "dropped",
    "latency_p50_s",
    "latency_p99_s",
    "ttft_p99_s",
    "rollout_duration_s",
    "gpu_hours",
    "cost_usd",
    "failed",
    "billing",
    "cost_gpu_usd",
    "cost_on_demand_usd",
    "on_demand_node_hours",
    "reserve_gpus",
    "peak_gpus",
    "min_ready_replicas",
    "outcome",
    "latency_p99_rollout_s",
    "ttft_p99_rollout_s",
    "rollout_start_s",
    "rollout_end_s",
    "steps",
    "policy",
    "seed",
    "scenario",
]


def small_scenario(tmp_path: Path, **changes) -> Path:
    raw = {
        "name": "small",
        "seed": 5,
        "trace": {"synthetic": {"process": "poisson", "rate_per_s": 3.0, "duration_s": 900}},
        "service": {"kind": "exponential", "mean_s": 1.0},
        "fleet": {"replicas": 4, "gpu_capacity": 6, "max_ongoing_requests": 2},
        "cold_start": {"kind": "deterministic", "seconds": 30},
        "rollout": {"at_s": 100, "policy": {"max_surge_percent": 25}},
    }
    raw.update(changes)
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def one_line_error(result, needle: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("rollout: error: ")
    assert needle in lines[0]
    assert "Traceback" not in result.output


def test_simulate_writes_every_output(tmp_path):
    out = tmp_path / "out"
    result = invoke("simulate", str(small_scenario(tmp_path)), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "latency p99" in result.stdout and "succeeded" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert set(SUMMARY) <= set(summary)
    assert summary["outcome"] == "succeeded"
    assert summary["policy"] == "surge=25 stab=0"
    assert summary["requests"] == summary["completed"] + summary["dropped"] + summary["failed"]
    requests = pd.read_parquet(out / "requests.parquet")
    assert list(requests.columns) == REQUESTS
    assert len(requests) == summary["requests"]
    assert set(requests["version"].astype(str)) == {"current", "candidate"}
    timeline = pd.read_parquet(out / "timeline.parquet")
    assert set(TIMELINE) <= set(timeline.columns)
    # one row per change: no two consecutive rows are equal
    values = timeline.drop(columns="t_s")
    assert not (values.diff().fillna(1).abs().sum(axis=1) == 0).any()
    events = h.load_jsonl((out / "events.jsonl").read_text())
    assert isinstance(events[0], h.RolloutStarted)
    assert isinstance(events[-1], h.Finished)
    for png in ("timeline.png", "latency.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_policy_and_stabilization_override(tmp_path):
    out = tmp_path / "out"
    path = small_scenario(tmp_path)
    result = invoke(
        "simulate",
        str(path),
        "--out",
        str(out),
        "--policy",
        "unavailable=50",
        "--stabilization",
        "30",
        "--seed",
        "9",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["policy"] == "unavailable=50 stab=30"
    assert summary["seed"] == 9
    assert summary["peak_gpus"] == 4  # unavailable: never above the fleet
    assert summary["steps"] == 2


def test_same_seed_same_files(tmp_path):
    path = small_scenario(tmp_path)
    for name in ("a", "b"):
        assert invoke("simulate", str(path), "--out", str(tmp_path / name)).exit_code == 0
    for name in ("summary.json", "events.jsonl"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()
    for name in ("requests.parquet", "timeline.parquet"):
        pd.testing.assert_frame_equal(
            pd.read_parquet(tmp_path / "a" / name), pd.read_parquet(tmp_path / "b" / name)
        )


def test_compare_runs_policies_side_by_side(tmp_path):
    from sim.api import compare_command

    out = tmp_path / "cmp"
    results = compare_command(small_scenario(tmp_path), ["surge=25", "unavailable=25"], out)
    assert [r.summary["policy"] for r in results] == ["surge=25 stab=0", "unavailable=25 stab=0"]
    table = pd.read_csv(out / "comparison.csv")
    assert table["policy"].tolist() == ["surge=25 stab=0", "unavailable=25 stab=0"]
    assert (out / "comparison.png").is_file()
    assert (out / "surge=25_stab=0" / "summary.json").is_file()
    # the same requests under both policies, so the difference is the policy
    a, b = results
    assert a.requests["arrival_s"].equals(b.requests["arrival_s"])
    assert a.summary["peak_gpus"] > b.summary["peak_gpus"]
    assert a.summary["min_ready_replicas"] > b.summary["min_ready_replicas"]


@pytest.mark.parametrize("name", SCENARIOS)
def test_bundled_scenarios_roll_out(name):
    scenario = load_scenario(ROOT / "scenarios" / f"{name}.yaml")
    assert scenario.rollout is not None and scenario.sweep is not None
    assert scenario.slo.latency_p99_s is not None
    assert scenario.sweep.policies(scenario.rollout.policy)
    result = simulate(scenario)
    s = result.summary
    assert s["outcome"] == "succeeded"
    # the trace resampled at rate_scale: that many times its requests, up to Poisson noise
    want = {"conv": 19_366, "code": 8_819}[name.split("-")[1]] * scenario.trace.rate_scale
    assert abs(s["requests"] - want) < 4 * want**0.5
    assert s["dropped"] == s["failed"] == 0
    od = scenario.fleet.on_demand
    extra = od.max_nodes * (scenario.fleet.gpus_per_node or 0) if od else 0
    assert s["peak_gpus"] <= scenario.fleet.gpu_capacity + extra


def test_the_main_comparison_shows_the_trade_off():
    """The README's first command: surge keeps capacity but costs GPUs; unavailable keeps
    the GPU count but loses capacity, which shows in the tail latency during the rollout."""
    scenario = load_scenario(ROOT / "scenarios" / "azure-conv.yaml")
    surge, unavailable = compare(scenario, ["surge=25", "unavailable=25"])
    assert surge.summary["peak_gpus"] == 13 and unavailable.summary["peak_gpus"] == 10
    assert surge.summary["min_ready_replicas"] == 10
    assert unavailable.summary["min_ready_replicas"] == 8
    assert surge.summary["ttft_p99_rollout_s"] < unavailable.summary["ttft_p99_rollout_s"]


# ---- bad input: one clear line and a non-zero exit ------------------------------------------


def test_unknown_key(tmp_path):
    path = small_scenario(tmp_path, fleet={"replicas": 4, "gpu_capacity": 6, "gpus": 1})
    one_line_error(invoke("simulate", str(path)), "unknown field 'fleet.gpus'")


@pytest.mark.parametrize(
    "flag,needle",
    [
        ("surge=80", "max_surge_percent"),
        ("fast=3", "--policy must look like surge=25 or unavailable=25"),
        ("surge=", "--policy must look like"),
    ],
)
def test_bad_policy_flag(tmp_path, flag, needle):
    path = small_scenario(tmp_path)
    one_line_error(invoke("simulate", str(path), "--policy", flag), needle)


def test_bad_policy_in_the_scenario(tmp_path):
    path = small_scenario(
        tmp_path,
        rollout={"at_s": 0, "policy": {"max_surge_percent": 25, "max_unavailable_percent": 25}},
    )
    one_line_error(invoke("simulate", str(path)), "exactly one of max_surge_percent")


def test_bad_stabilization(tmp_path):
    path = small_scenario(tmp_path)
    one_line_error(
        invoke("simulate", str(path), "--stabilization", "5000"), "stabilization_time_seconds"
    )


@pytest.mark.parametrize(
    "content,needle",
    [
        (None, "no such trace file"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\n", "the trace has no requests"),
        ("", "the trace is empty"),
        ("TIMESTAMP\n2023-11-16 18:17:03\nnot a time\n", "line 3: TIMESTAMP 'not a time'"),
        ("arrival_s\n0\n5\n4\n", "timestamps must be sorted"),
        ("when\n1\n", "needs a TIMESTAMP or arrival_s column"),
    ],
)
def test_bad_trace(tmp_path, content, needle):
    trace = tmp_path / "trace.csv"
    if content is not None:
        trace.write_text(content)
    path = small_scenario(tmp_path, trace={"path": str(trace)})
    one_line_error(invoke("simulate", str(path), "--out", str(tmp_path / "o")), needle)
    assert not (tmp_path / "o").exists()  # nothing written


def test_missing_scenario(tmp_path):
    one_line_error(invoke("simulate", str(tmp_path / "none.yaml")), "no such scenario file")


def test_missing_cold_start_samples(tmp_path):
    path = small_scenario(
        tmp_path, cold_start={"kind": "empirical", "path": str(tmp_path / "no.csv")}
    )
    one_line_error(invoke("simulate", str(path)), "no such cold-start sample file")


def test_negative_seed(tmp_path):
    one_line_error(invoke("simulate", str(small_scenario(tmp_path)), "--seed", "-1"), "seed")


ENGINE = {
    "kind": "engine",
    "engine": {"prefill_s_per_1k_tokens": 0.05, "decode_s_per_token": {1: 0.01}},
}


def engine_with(**fields):
    return {"kind": "engine", "engine": {**ENGINE["engine"], **fields}}


@pytest.mark.parametrize(
    "changes,needle",
    [
        ({"service": engine_with(decode_s_per_token={})}, "needs at least one point"),
        ({"service": engine_with(decode_s_per_token={1: 0.01, 8: -0.02})}, "must be > 0"),
        ({"service": engine_with(max_num_seqs=0)}, "max_num_seqs"),
        ({"faults": {"start_failure_rate": 1.5}}, "start_failure_rate"),
        (
            {
                "fleet": {
                    "replicas": 2,
                    "gpus_per_replica": 3,
                    "gpus_per_node": 8,
                    "gpu_capacity": 8,
                }
            },
            "does not divide into whole replicas",
        ),
        (
            {
                "trace": {
                    "synthetic": {"process": "poisson", "rate_per_s": 3.0, "duration_s": 900},
                    "rate_scale": 0,
                }
            },
            "rate_scale",
        ),
        ({"fleet": {"replicas": 4, "gpu_capacity": 6, "billing": "monthly"}}, "fleet.billing"),
        (
            {
                "service": engine_with(
                    admission="immediate", warmup={"iterations": 50, "factor": 3.0}
                )
            },
            "warmup.iterations needs admission: iteration",
        ),
    ],
    ids=[
        "no-points",
        "negative-time",
        "zero-seqs",
        "fault-rate",
        "node-size",
        "rate-scale",
        "billing",
        "warm-iterations-immediate",
    ],
)
def test_bad_engine_fault_supply_and_trace_inputs(tmp_path, changes, needle):
    out = tmp_path / "o"
    path = small_scenario(tmp_path, **changes)
    one_line_error(invoke("simulate", str(path), "--out", str(out)), needle)
    assert not out.exists()  # nothing written
    sweep_out = tmp_path / "s"
    one_line_error(invoke("sweep", str(path), "--out", str(sweep_out)), needle)
    assert not sweep_out.exists()


def test_a_bad_profile_file_names_itself(tmp_path):
    profile = tmp_path / "engine.yaml"
    profile.write_text(
        "name: bad\nprovenance: test\nprefill_s_per_1k_tokens: 0.05\n"
        "decode_s_per_token: {1: -0.01}\n"
    )
    path = small_scenario(tmp_path, service={"kind": "engine", "engine": {"profile": str(profile)}})
    one_line_error(invoke("simulate", str(path), "--out", str(tmp_path / "o")), str(profile))
    assert not (tmp_path / "o").exists()


def test_a_plot_worker_that_dies_leaves_no_output_missing(tmp_path, monkeypatch, caplog):
    """The plots are drawn by forked worker processes (sim.api.PlotWorker); a worker killed
    mid-plot costs time, not a file: the command draws them itself, and says so once."""
    import os

    import sim.api

    def killed(*_: object) -> None:
        os._exit(9)

    monkeypatch.setattr(sim.api, "_draw_one", killed)  # the forked workers inherit it
    out = tmp_path / "out"
    result = invoke("simulate", str(small_scenario(tmp_path)), "--out", str(out))
    assert result.exit_code == 0, result.output
    for png in ("timeline.png", "latency.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("requests.parquet", "timeline.parquet", "replicas.parquet", "summary.json"):
        assert (out / name).stat().st_size > 0
    failures = [r for r in caplog.records if "plot worker failed" in r.getMessage()]
    assert len(failures) == 1


def test_a_plot_child_that_dies_leaves_no_output_missing(tmp_path, monkeypatch, caplog):
    """The worker draws the latency plot in a child it forks; if only that child dies, the
    worker reports it and the command draws both plots itself."""
    import os

    import sim.api

    draw = sim.api._draw_one

    def latency_killed(plot: str, *args: object) -> None:
        if plot == "plot_latency":
            os._exit(3)
        draw(plot, *args)

    monkeypatch.setattr(sim.api, "_draw_one", latency_killed)
    out = tmp_path / "out"
    result = invoke("simulate", str(small_scenario(tmp_path)), "--out", str(out))
    assert result.exit_code == 0, result.output
    for png in ("timeline.png", "latency.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    failures = [r.getMessage() for r in caplog.records if "plot worker failed" in r.getMessage()]
    assert len(failures) == 1 and "latency.png" in failures[0]
