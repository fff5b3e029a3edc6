"""Model parts: health checks, timeouts, the LLM service model, cold-start samplers,
autoscaling, candidate overrides and requests that find no ready replica."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_sim_rollout import steady

from rollout import history as h
from rollout.scenario import ColdStartSpec, Scenario
from sim.api import simulate
from sim.coldstart import ColdStart

ROOT = Path(__file__).parent.parent


def value_at(tl, column: str, times: np.ndarray) -> np.ndarray:
    """The timeline's value in effect at each time (rows are written only on change)."""
    rows = np.searchsorted(tl["t_s"].to_numpy(), times, side="right") - 1
    return tl[column].to_numpy()[rows]


def from_arrivals(tmp_path: Path, rows: list[tuple], **raw: Any) -> Scenario:
    """A scenario over a small hand-written trace: rows of (arrival_s[, ctx, gen])."""
    path = tmp_path / "trace.csv"
    header = ["arrival_s", "ContextTokens", "GeneratedTokens"][: len(rows[0])]
    path.write_text(",".join(header) + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    base: dict[str, Any] = {"name": "small", "trace": {"path": str(path), "resample": False}}
    return Scenario.model_validate(base | raw)


@pytest.mark.parametrize(
    "cold,period,ready_after", [(0, 10, 0), (20, 10, 20), (21, 10, 30), (115, 10, 120), (7, 3, 9)]
)
def test_ready_at_the_first_health_check_after_cold_start(cold, period, ready_after):
    result = simulate(
        steady(
            {"max_surge_percent": 25},
            cold_start={"kind": "deterministic", "seconds": cold},
            health_check={"period_s": period},
        )
    )
    cand = result.replicas[result.replicas["version"] == "candidate"]
    assert len(cand) == 10
    assert np.allclose(cand["ready_s"] - cand["gpu_s"], ready_after)


def test_a_versions_first_replica_waits_for_its_application():
    """The candidate's first replica (its Serve application is new) starts 7 s later; the
    other candidates and the current version's replicas do not."""
    result = simulate(
        steady(
            {"max_surge_percent": 25},
            cold_start={"kind": "deterministic", "seconds": 20, "first_of_version_s": 7},
            health_check={"period_s": 1},
        )
    )
    cand = result.replicas[result.replicas["version"] == "candidate"].sort_values("created_s")
    waits = (cand["ready_s"] - cand["gpu_s"]).to_numpy()
    assert waits[0] == pytest.approx(27.0)
    assert np.allclose(waits[1:], 20.0) and len(waits) == 10


def test_timeouts_drop_the_oldest_waiters(tmp_path):
    """One replica, 10 s requests, one arrival per second, 5 s timeout: compare with a direct
    FIFO single-server calculation."""
    arrivals = list(range(40))
    s = from_arrivals(
        tmp_path,
        [(t,) for t in arrivals],
        service={"kind": "deterministic", "mean_s": 10.0},
        fleet={
            "replicas": 1,
            "gpu_capacity": 1,
            "max_ongoing_requests": 1,
            "request_timeout_s": 5.0,
        },
    )
    req = simulate(s).requests
    free_at, expected_start = 0.0, []
    for t in arrivals:  # FIFO: served when the server frees up, unless that is past its deadline
        start = max(t, free_at)
        if start > t + 5.0:
            expected_start.append(math.nan)
        else:
            expected_start.append(start)
            free_at = start + 10.0
    assert np.allclose(req["start_s"], expected_start, equal_nan=True)
    dropped = req[req["dropped"]]
    assert len(dropped) == int(np.isnan(expected_start).sum()) > 0
    assert np.allclose(dropped["end_s"], dropped["arrival_s"] + 5.0)  # dropped at the deadline
    assert dropped["latency_s"].isna().all()
    assert simulate(s).summary["dropped"] == len(dropped)


def test_llm_prefill_decode_and_batch_slowdown(tmp_path):
    # two requests overlap on one replica: the second runs as the second concurrent one
    s = from_arrivals(
        tmp_path,
        [(0.0, 2000, 100), (1.0, 1000, 50)],
        service={
            "kind": "llm",
            "llm": {
                "prefill_s_per_1k_tokens": 0.1,
                "decode_s_per_token": 0.02,
                "batch_slowdown": 0.5,
            },
        },
        fleet={"replicas": 1, "gpu_capacity": 1, "max_ongoing_requests": 2},
    )
    req = simulate(s).requests
    first, second = req.iloc[0], req.iloc[1]
    assert first["ttft_s"] == pytest.approx(0.2)  # 2k tokens × 0.1 s
    assert first["latency_s"] == pytest.approx(0.2 + 100 * 0.02)
    factor = 1 + 0.5  # one other request in flight
    assert second["ttft_s"] == pytest.approx(0.1 * factor)
    assert second["latency_s"] == pytest.approx((0.1 + 50 * 0.02) * factor)


def test_llm_needs_token_counts(tmp_path):
    from rollout.errors import InputError

    s = from_arrivals(
        tmp_path,
        [(0.0,), (1.0,)],
        service={"kind": "llm"},
        fleet={"replicas": 1, "gpu_capacity": 1},
    )
    with pytest.raises(InputError, match="needs token counts"):
        simulate(s)


def test_non_streaming_services_report_ttft_as_latency():
    result = simulate(steady({"max_surge_percent": 25}))
    req = result.requests[~result.requests["dropped"]]
    assert np.array_equal(req["ttft_s"], req["latency_s"])


def test_lognormal_cold_start_hits_its_quantiles():
    spec = ColdStartSpec(kind="lognormal", p50_s=60, p99_s=300)
    sampler = ColdStart(spec, np.random.default_rng(1))
    x = np.array([sampler.sample() for _ in range(40_000)])
    assert np.percentile(x, 50) == pytest.approx(60, rel=0.03)
    assert np.percentile(x, 99) == pytest.approx(300, rel=0.06)


def test_empirical_cold_start_keeps_the_bundled_shape():
    path = ROOT / "data" / "cold_start" / "alibaba_basemodel_load_percentiles.csv"
    spec = ColdStartSpec(kind="empirical", path=path, scale=5)
    sampler = ColdStart(spec, np.random.default_rng(2))
    x = np.array([sampler.sample() for _ in range(40_000)]) / 5
    # the Alibaba base-model load shape (data/cold_start/README.md)
    assert np.percentile(x, 50) == pytest.approx(22.7, rel=0.03)
    assert np.percentile(x, 90) == pytest.approx(42.0, rel=0.03)
    assert (x < 5).mean() == pytest.approx(0.33, abs=0.02)
    assert x.min() >= 1.33 - 1e-9 and x.max() <= 79.44 + 1e-9


def test_empirical_cold_start_reads_milliseconds(tmp_path):
    path = tmp_path / "ms.csv"
    path.write_text("value\n1000\n3000\n")
    sampler = ColdStart(ColdStartSpec(kind="empirical", path=path), np.random.default_rng(0))
    x = [sampler.sample() for _ in range(1000)]
    assert min(x) >= 1.0 and max(x) <= 3.0


def test_autoscaler_follows_the_load():
    """Poisson 4 → 12 req/s at 1 s per request, target 1 ongoing request per replica."""
    s = Scenario.model_validate(
        {
            "name": "auto",
            "trace": {
                "synthetic": {
                    "process": "step",
                    "rate_per_s": 4.0,
                    "step_at_s": 1800,
                    "step_factor": 3.0,
                    "duration_s": 3600,
                }
            },
            "service": {"kind": "exponential", "mean_s": 1.0},
            "fleet": {"replicas": 4, "gpu_capacity": 32, "max_ongoing_requests": 4},
            "cold_start": {"kind": "deterministic", "seconds": 30},
            "autoscaling": {
                "min_replicas": 1,
                "max_replicas": 30,
                "target_ongoing_requests": 1.0,
                "upscale_delay_s": 30,
                "downscale_delay_s": 600,
            },
        }
    )
    result = simulate(s)
    tl = result.timeline
    before = value_at(tl, "desired_replicas", np.arange(600, 1800, 10))
    late = value_at(tl, "desired_replicas", np.arange(2400, 3600, 10))
    assert before.min() >= 4 and before.max() <= 8  # ≈ λ·E[S] = 4 ongoing
    assert late.min() >= 11 and late.max() <= 18  # ≈ 12 ongoing
    # the fleet follows the desired count once cold starts are over
    last = tl.iloc[-1]
    assert last["current_ready"] + last["current_starting"] == last["desired_replicas"]


def test_desired_change_mid_rollout_resizes_both_versions():
    s = Scenario.model_validate(
        {
            "name": "auto-roll",
            "trace": {
                "synthetic": {
                    "process": "step",
                    "rate_per_s": 4.0,
                    "step_at_s": 1000,
                    "step_factor": 3.0,
                    "duration_s": 2400,
                }
            },
            "service": {"kind": "exponential", "mean_s": 1.0},
            "fleet": {"replicas": 4, "gpu_capacity": 40, "max_ongoing_requests": 4},
            "cold_start": {"kind": "deterministic", "seconds": 60},
            "autoscaling": {
                "min_replicas": 4,
                "max_replicas": 24,
                "target_ongoing_requests": 1.0,
                "upscale_delay_s": 30,
                "downscale_delay_s": 3600,
            },
            "rollout": {
                "at_s": 700,
                "policy": {"max_surge_percent": 25, "stabilization_time_seconds": 300},
            },
        }
    )
    result = simulate(s)
    resized = [e for e in result.events if isinstance(e, h.Resized)]
    assert resized, "the load step should change the desired count mid-rollout"
    first = resized[0]
    assert first.desired_to > first.desired_from
    assert first.current_replicas > 0 and first.candidate_replicas > 0  # both versions kept
    assert result.summary["outcome"] == "succeeded"
    last = result.timeline.iloc[-1]
    assert last["candidate_ready"] == last["desired_replicas"] > 4


def test_candidate_overrides_apply_to_the_candidate_only():
    result = simulate(
        steady(
            {"max_surge_percent": 25},
            rollout__candidate={
                "service": {"kind": "deterministic", "mean_s": 2.0},
                "cold_start": {"kind": "deterministic", "seconds": 30},
            },
        )
    )
    req = result.requests[~result.requests["dropped"]]
    service = req["end_s"] - req["start_s"]
    assert np.allclose(service[req["version"] == "current"], 0.5)
    assert np.allclose(service[req["version"] == "candidate"], 2.0)
    cand = result.replicas[result.replicas["version"] == "candidate"]
    assert np.allclose(cand["ready_s"] - cand["gpu_s"], 30.0)


def test_requests_wait_when_no_version_has_a_ready_replica():
    """One replica, unavailable mode: the only replica goes first; arrivals in the gap wait
    at the router for the candidate (or time out), and none is routed to a missing replica."""
    result = simulate(
        steady(
            {"max_unavailable_percent": 25},
            fleet={
                "replicas": 1,
                "gpu_capacity": 1,
                "max_ongoing_requests": 2,
                "request_timeout_s": 60.0,
            },
        )
    )
    req, reps = result.requests, result.replicas
    cand_ready = reps.loc[reps["version"] == "candidate", "ready_s"].min()
    gap = req[(req["arrival_s"] > 300.5) & (req["arrival_s"] < cand_ready)]
    assert len(gap) > 100
    served = gap[~gap["dropped"]]
    assert (served["version"] == "candidate").all()
    assert (served["start_s"] >= cand_ready).all()  # nothing ran without a ready replica
    assert np.isclose(served["start_s"].min(), cand_ready)  # the backlog starts at once
    assert (served["start_s"] - served["arrival_s"] <= 60).all()
    assert gap.loc[gap["arrival_s"] < cand_ready - 60, "dropped"].all()  # waited too long
    assert result.timeline["gpus_in_use"].max() == 1
