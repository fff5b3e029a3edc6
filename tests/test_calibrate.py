"""`rollout calibrate` on small runs whose engine is known: it recovers prefill time per token,
time per token at each batch size, the engine's sequence limit and the cold starts, writes a
fragment the simulator runs with, and refuses inputs too small to fit with one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from measure import calibrate
from rollout.cli import app
from rollout.scenario import Scenario
from sim.api import simulate, write_outputs
from sim.result import TIMELINE_COLUMNS, SimResult

PREFILL_S_PER_TOKEN = 0.00004
OVERHEAD_S = 0.012
REPLICAS = 2
BASE_S, PER_SEQ_S = 0.020, 0.001  # the known engine's iteration: base + per_seq·(batch − 1)


def iteration_s(batch: int) -> float:
    return BASE_S + PER_SEQ_S * (batch - 1)


def serve(
    arrival: np.ndarray,
    ctx: np.ndarray,
    gen: np.ndarray,
    limit: int,
    warm: tuple[int, float] = (0, 1.0),
) -> tuple:
    """Replicas running the LLM example's engine loop, one iteration at a time (admission at
    iteration boundaries, FIFO up to `limit` sequences; an iteration lasts `iteration_s(batch)`
    plus its prefills, `warm[1]` times that for a replica's first `warm[0]` iterations, and
    gives each sequence in it one token), behind a router that sends each request to the
    replica with the fewest in flight. First-token and end times."""
    first, end = np.full(len(arrival), np.nan), np.full(len(arrival), np.nan)
    got = np.zeros(len(arrival), dtype=int)
    waiting: list[list[int]] = [[] for _ in range(REPLICAS)]
    batch: list[list[int]] = [[] for _ in range(REPLICAS)]
    until = [np.inf] * REPLICAS
    done = [0] * REPLICAS

    def start(r: int, t: float) -> None:
        room = max(0, limit - len(batch[r]))
        prefill, waiting[r] = waiting[r][:room], waiting[r][room:]
        batch[r] += prefill
        took = iteration_s(len(batch[r])) + PREFILL_S_PER_TOKEN * ctx[prefill].sum()
        until[r] = t + took * (warm[1] if done[r] < warm[0] else 1.0)
        done[r] += 1
        for k in prefill:
            got[k] = -1  # prefilling: its first token at this iteration's end

    i = 0
    while i < len(arrival) or min(until) < np.inf:
        r = int(np.argmin(until))
        if i < len(arrival) and arrival[i] < until[r]:
            t = arrival[i]
            r = min(range(REPLICAS), key=lambda q: len(batch[q]) + len(waiting[q]))
            waiting[r].append(i)
            i += 1
            if until[r] == np.inf:
                start(r, t)
            continue
        t = until[r]
        for k in batch[r]:
            if got[k] < 0:
                first[k], got[k] = t, 0
            got[k] += 1
            if got[k] == gen[k]:
                end[k] = t
        batch[r] = [k for k in batch[r] if got[k] < gen[k]]
        until[r] = np.inf
        if batch[r] or waiting[r]:
            start(r, t)
    return first, end


def run(
    rates: list[float],
    limit: int | None = None,
    seed: int = 0,
    warm: tuple[int, float] = (0, 1.0),
) -> SimResult:
    """Poisson load at each rate per replica, 60 s each with 10 s pauses, served by `serve`,
    as a client records it (every request also pays OVERHEAD_S outside the engine)."""
    rng = np.random.default_rng(seed)
    times = []
    for j, rate in enumerate(rates):
        n = rng.poisson(rate * REPLICAS * 60)
        times.append(np.sort(rng.uniform(0, 60, n)) + 70 * j)
    arrival = np.concatenate(times)
    ctx = rng.choice([128, 512, 2048], len(arrival))
    gen = rng.integers(8, 33, len(arrival))
    first, end = serve(arrival, ctx, gen, limit or 10**6, warm)
    df = pd.DataFrame({"arrival_s": arrival, "start_s": arrival, "end_s": end + OVERHEAD_S,
                       "latency_s": end + OVERHEAD_S - arrival,
                       "ttft_s": first + OVERHEAD_S - arrival,
                       "context_tokens": ctx, "generated_tokens": gen})  # fmt: skip
    df["wait_s"] = np.nan
    df["version"] = pd.Categorical(["current"] * len(df), categories=["current", "candidate"])
    df["dropped"] = df["failed"] = False
    timeline = pd.DataFrame([dict.fromkeys(TIMELINE_COLUMNS, 0)])
    timeline["current_ready"] = REPLICAS
    starts = rng.uniform(3.0, 4.0, 4)  # the last two replicas were not watched from their start
    replicas = pd.DataFrame(
        {
            "replica_id": [str(i) for i in range(6)],
            "created_s": 0.0,
            "gpu_s": [1.0] * 4 + [np.nan, 1.0],
            "running_s": [*(1.0 + starts), np.nan, np.nan],
            "ready_s": [*(1.1 + starts), np.nan, np.nan],
        }
    )  # fmt: skip
    summary = {"scenario": "measured", "span_s": 70.0 * len(rates), "rollout_start_s": None}
    return SimResult(summary, df, timeline, [], replicas)


def folder(tmp_path: Path, result: SimResult, name: str = "run") -> Path:
    write_outputs(result, tmp_path / name)
    return tmp_path / name


def test_recovers_the_engine_and_the_starts(tmp_path: Path) -> None:
    """From an iteration-by-iteration run of a known engine: prefill per token and the overhead
    exactly (TTFT on an idle replica is overhead + prefill + one iteration at batch 1), and time
    per token at each batch size with the prefills of requests admitted meanwhile taken out
    (left in, they add about a third at 8 requests per second per replica)."""
    result = run([1, 2, 4, 8, 11], limit=12)
    cal = calibrate.fit([result], [result.replicas])
    assert cal.prefill_s_per_1k_tokens == pytest.approx(PREFILL_S_PER_TOKEN * 1000, rel=0.01)
    assert cal.overhead_s == pytest.approx(OVERHEAD_S, abs=0.001)
    assert set(range(1, 13)) <= set(cal.decode_s_per_token)
    for k, sec in cal.decode_s_per_token.items():
        assert sec == pytest.approx(iteration_s(min(k, 12)), rel=0.07), k
    # the batch is estimated from requests in flight, waiting ones included: the limit shows
    # a little past the engine's
    assert cal.max_num_seqs is not None and 12 <= cal.max_num_seqs <= 14
    assert cal.warmup_iterations == 0  # none in this engine
    assert "warmup" not in cal.fragment("cold_starts.csv")["service"]["engine"]
    assert len(cal.cold_starts_s) == 4 and (cal.cold_starts_s >= 3).all()
    assert cal.health_check_period_s == pytest.approx(0.2)
    quality = {f.name: f for f in cal.fits}
    assert quality["TTFT on an idle replica"].r2 > 0.99
    limit = quality[f"time per token (limit {cal.max_num_seqs})"]
    assert limit.r2 > quality["time per output token (line)"].r2


@pytest.mark.parametrize(("iterations", "factor"), [(50, 3.0), (200, 2.0)])
def test_recovers_a_new_replicas_warm_up(iterations: int, factor: float) -> None:
    """Replicas whose first iterations run slower (the LLM example's warm-up): the factor
    within 10 %, the iterations within a quarter, and the table as the same load's without one."""
    result = run([1, 2, 4, 8], warm=(iterations, factor))
    cal = calibrate.fit([result], [result.replicas])
    assert cal.warmup_factor == pytest.approx(factor, rel=0.1)
    assert cal.warmup_iterations == pytest.approx(iterations, rel=0.25)
    assert cal.fragment("cold_starts.csv")["service"]["engine"]["warmup"] == {
        "iterations": cal.warmup_iterations,
        "factor": round(cal.warmup_factor, 3),
    }
    plain = calibrate.fit([run([1, 2, 4, 8])], [result.replicas])
    assert plain.warmup_iterations == 0
    for k, sec in cal.decode_s_per_token.items():
        assert sec == pytest.approx(plain.decode_s_per_token[k], rel=0.05), k


def test_a_versions_first_replica_waits_for_its_application() -> None:
    """Two rollouts' starts: each application's first replica took 2.1 and 2.3 s from the
    scale-up to its creation, the next ones 0.2 s: the wait is the median difference (2.0 s),
    it leaves the first replicas' cold starts, and the fragment carries it."""
    result = run([1, 2, 4, 8])
    reps = pd.DataFrame({
        "app": ["llm_v1", "llm_v1", "llm_v2", "llm_v2"],
        "replica_id": ["a", "b", "c", "d"],
        "asked_s": [0.0, 20.0, 100.0, 120.0],
        "created_s": [2.1, 20.2, 102.3, 120.2],
        "gpu_s": [4.0, 22.0, 104.0, 122.0],
        "running_s": [8.0, 26.1, 108.0, 126.0],
        "ready_s": [8.1, 26.2, 108.1, 126.1],
    })  # fmt: skip
    cal = calibrate.fit([result], [reps])
    assert cal.first_of_version_s == pytest.approx(2.0)
    assert sorted(cal.cold_starts_s) == pytest.approx([6.0, 6.0, 6.0, 6.1])
    assert cal.fragment("c.csv")["cold_start"]["first_of_version_s"] == pytest.approx(2.0)
    # without application names every start is a plain one
    plain = calibrate.fit([result], [reps.drop(columns="app")])
    assert plain.first_of_version_s == 0.0
    assert sorted(plain.cold_starts_s) == pytest.approx([6.0, 6.1, 8.0, 8.0])


def test_no_limit_is_reported_where_none_is_visible() -> None:
    result = run([1, 2, 4, 8])
    assert calibrate.fit([result], [result.replicas]).max_num_seqs is None


def test_the_fragment_runs_in_the_simulator(tmp_path: Path) -> None:
    runs = folder(tmp_path, run([1, 4, 8]))
    done = CliRunner().invoke(app, ["calibrate", str(runs), "--out", str(tmp_path / "cal")])
    assert done.exit_code == 0, done.output
    assert "R²" in done.output and "time per output token by batch size: 1:" in done.output
    fragment = yaml.safe_load((tmp_path / "cal" / "calibration.yaml").read_text())
    fragment["cold_start"]["path"] = str(tmp_path / "cal" / fragment["cold_start"]["path"])
    scenario = Scenario.model_validate(
        {
            "name": "calibrated",
            "trace": {"synthetic": {"process": "poisson", "rate_per_s": 2.0, "duration_s": 60,
                                    "context_tokens": 512, "generated_tokens": 32}},
            "fleet": {"replicas": 2, "gpu_capacity": 3, "max_ongoing_requests": 64},
            "rollout": {"at_s": 10, "policy": {"max_surge_percent": 50}},
            **fragment,
        }
    )  # fmt: skip
    sim = simulate(scenario)
    assert sim.summary["outcome"] == "succeeded" and sim.summary["failed"] == 0
    # an idle-ish engine: TTFT is prefill plus one iteration at batch 1
    assert sim.summary["ttft_p50_s"] < 0.2


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: run([4]).requests.head(0), "no answered requests"),
        (lambda: run([0.3, 0.3]), "one batch size"),
        (lambda: run([1, 4]).requests.head(20), "20 answered requests"),
        (lambda: "no starts", "no replica was seen starting"),
    ],
)
def test_refuses_too_little_to_fit(tmp_path: Path, make: object, message: str) -> None:
    got = make()  # type: ignore[operator]
    result = run([1, 4])
    if isinstance(got, SimResult):
        result = got
    elif isinstance(got, pd.DataFrame):
        result.requests = got
    else:
        result.replicas = result.replicas.assign(running_s=np.nan)
    done = CliRunner().invoke(
        app, ["calibrate", str(folder(tmp_path, result)), "--out", str(tmp_path / "cal")]
    )
    assert done.exit_code == 2, done.output
    lines = done.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.output


def test_the_overhead_is_added_to_every_answered_request() -> None:
    """`service.overhead_s` (the serving stack's time outside the replica) adds to each TTFT
    and latency and changes nothing else."""
    spec = {
        "name": "overhead",
        "trace": {"synthetic": {"process": "poisson", "rate_per_s": 5.0, "duration_s": 60}},
        "service": {"kind": "deterministic", "mean_s": 0.5},
        "fleet": {"replicas": 2, "gpu_capacity": 2, "max_ongoing_requests": 4},
    }
    plain = simulate(Scenario.model_validate(spec)).requests
    spec["service"] = {**spec["service"], "overhead_s": 0.07}
    slower = simulate(Scenario.model_validate(spec)).requests
    assert len(plain) == len(slower) > 200
    np.testing.assert_allclose(slower["latency_s"] - plain["latency_s"], 0.07, atol=1e-9)
    np.testing.assert_allclose(slower["ttft_s"] - plain["ttft_s"], 0.07, atol=1e-9)
    assert (slower["end_s"] == plain["end_s"]).all()


def test_time_per_token_never_falls_with_the_batch() -> None:
    """A dip in the medians (few requests at a size) is pooled with its neighbours, weighted."""
    got = calibrate._non_decreasing([1.0, 3.0, 2.0, 4.0, 0.5], [1, 1, 3, 1, 1])
    assert got == pytest.approx([1.0, 2.25, 2.25, 2.25, 2.25])


def test_the_probe_prefers_a_rollouts_replica_starts_to_a_first_deploys() -> None:
    """A first deploy starts the router and all replicas at once, which no rollout does: its
    starts count only when the application has had no rollout yet."""
    from collections import namedtuple

    from measure.probe import rollouts_first

    row = namedtuple("row", "id from_version")
    first, later, again = row("a", None), row("b", "v0"), row("c", "v1")
    assert rollouts_first([first, later, again]) == [later, again]
    assert rollouts_first([first]) == [first]
