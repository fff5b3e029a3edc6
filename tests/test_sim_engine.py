"""The engine service kind: hand-computed timings (prefill stalls, a decode rate that follows
the batch, queues in the replica and at the router, KV cache, warm-up) and queueing oracles
(processor sharing, constant time, M/D/c) with immediate admission; admission at iteration
boundaries (vLLM's) by hand and against an iteration-by-iteration replay of the LLM example's
scheduling loop."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_sim_model import from_arrivals

from rollout.scenario import Scenario
from sim.api import simulate
from sim.engine import decode_times

ROOT = Path(__file__).parent.parent


def engine(admission: str = "immediate", **fields: Any) -> dict[str, Any]:
    """The engine service; these tests name their admission (the oracles hold for the
    idealised `immediate` one only)."""
    return {
        "kind": "engine",
        "engine": {"prefill_s_per_1k_tokens": 0.0, "admission": admission, **fields},
    }


def one_replica(max_ongoing: int = 1000, timeout: float = 60.0) -> dict[str, Any]:
    return {
        "replicas": 1,
        "gpu_capacity": 1,
        "max_ongoing_requests": max_ongoing,
        "request_timeout_s": timeout,
    }


def test_decode_table_is_linear_between_points_and_flat_outside():
    dt = decode_times({2: 0.01, 6: 0.05}, 8)
    assert dt[1] == dt[2] == 0.01  # flat below the first point
    assert dt[4] == pytest.approx(0.03)  # halfway between 2 and 6
    assert dt[6] == dt[7] == dt[8] == 0.05  # flat above the last point


def test_prefill_stalls_decoding_and_sets_the_first_token(tmp_path):
    """A: prompt 1000, 10 tokens at t=0. B: prompt 500, 5 tokens at t=0.15, when A has 5 tokens
    left. B's 0.05 s prefill stalls A; then both decode at the 2-sequence rate."""
    s = from_arrivals(
        tmp_path,
        [(0.0, 1000, 10), (0.15, 500, 5)],
        service=engine(prefill_s_per_1k_tokens=0.1, decode_s_per_token={1: 0.01, 2: 0.02}),
        fleet=one_replica(),
    )
    req = simulate(s).requests
    a, b = req.iloc[0], req.iloc[1]
    assert a["ttft_s"] == pytest.approx(0.1)  # its own prefill
    assert b["ttft_s"] == pytest.approx(0.05)
    # after B's prefill (0.15 to 0.2) both have 5 tokens left at 0.02 s each
    assert a["latency_s"] == pytest.approx(0.3)
    assert b["latency_s"] == pytest.approx(0.3 - 0.15)


def test_the_decode_rate_follows_the_batch_as_it_changes(tmp_path):
    """A (10 tokens) alone decodes 5 tokens by 0.05 s; B (2 tokens) joins: both at 0.02 s per
    token until B leaves at 0.09 s; A's last 3 tokens go at 0.01 s again."""
    s = from_arrivals(
        tmp_path,
        [(0.0, 0, 10), (0.05, 0, 2)],
        service=engine(decode_s_per_token={1: 0.01, 2: 0.02}),
        fleet=one_replica(),
    )
    req = simulate(s).requests
    assert req.iloc[1]["latency_s"] == pytest.approx(0.04)
    assert req.iloc[0]["latency_s"] == pytest.approx(0.12)  # not 0.1 + a fixed slowdown


def test_max_num_seqs_queues_in_the_replica_and_max_ongoing_at_the_router(tmp_path):
    """One sequence at a time, Serve's cap of 2 per replica, 10 s requests, 5 s timeout: the
    second request waits inside the replica (no timeout there), the third at the router, where
    it times out."""
    s = from_arrivals(
        tmp_path,
        [(0.0, 0, 1000), (0.0, 0, 1000), (0.0, 0, 1000)],
        service=engine(max_num_seqs=1, decode_s_per_token={1: 0.01}),
        fleet=one_replica(max_ongoing=2, timeout=5.0),
    )
    req = simulate(s).requests
    assert list(req["start_s"].iloc[:2]) == pytest.approx([0.0, 10.0])
    assert list(req["latency_s"].iloc[:2]) == pytest.approx([10.0, 20.0])
    assert list(req["dropped"]) == [False, False, True]
    assert req["end_s"].iloc[2] == pytest.approx(5.0)  # dropped at its deadline


def test_kv_cache_admits_what_fits(tmp_path):
    """1,500 cache tokens: two requests of 1,000 (context + generated) cannot run together; a
    third of 400 fits beside the first; one larger than the cache runs alone."""
    s = from_arrivals(
        tmp_path,
        [(0.0, 900, 100), (0.0, 900, 100), (0.0, 300, 100), (0.0, 1900, 100)],
        service=engine(decode_s_per_token={1: 0.01}, kv_cache_tokens=1500),
        fleet=one_replica(),
    )
    req = simulate(s).requests
    # FIFO in the replica: the second waits for the first, the third waits behind the second
    assert list(req["start_s"]) == pytest.approx([0.0, 1.0, 1.0, 2.0])
    assert req["latency_s"].iloc[3] == pytest.approx(3.0)


FIRST = (0.0, 128, 1)  # a trace's first request is at 0: this one goes to the booted replica


def a_new_replica(timeout: float = 60.0) -> dict[str, Any]:
    """One replica, replaced at 0 by a rollout with a new one that serves alone from 2 s (the
    fleet the simulation starts with has served before: it is warm). Traces start with
    `FIRST`."""
    return {
        "fleet": {**one_replica(timeout=timeout), "gpu_capacity": 2},
        "cold_start": {"kind": "deterministic", "seconds": 1.0},
        "health_check": {"period_s": 1.0},
        "rollout": {
            "at_s": 0.0,
            "policy": {"max_surge_percent": 50, "stabilization_time_seconds": 0},
        },
    }


def test_warmup_slows_a_new_replicas_first_requests(tmp_path):
    rows = [(2.0, 1000, 100), (7.0, 1000, 100), (12.0, 1000, 100)]
    service = engine(
        prefill_s_per_1k_tokens=0.2,
        decode_s_per_token={1: 0.01},
        warmup={"requests": 2, "factor": 3.0},
    )
    new = simulate(from_arrivals(tmp_path, [FIRST, *rows], service=service, **a_new_replica()))
    req = new.requests.iloc[1:]
    assert list(req["version"]) == ["candidate"] * 3
    assert list(req["ttft_s"]) == pytest.approx([0.6, 0.6, 0.2])
    assert list(req["latency_s"]) == pytest.approx([3.6, 3.6, 1.2])
    booted = simulate(from_arrivals(tmp_path, rows, service=service, fleet=one_replica()))
    assert (booted.requests["version"] == "current").all()
    assert list(booted.requests["ttft_s"]) == pytest.approx([0.2, 0.2, 0.2])


# ---- queueing oracles -------------------------------------------------------------------------


def poisson_engine(
    *, rate: float, tokens: int, table: dict[int, float], seqs: int | None, requests: int, seed: int
) -> Scenario:
    return Scenario.model_validate(
        {
            "name": "oracle",
            "seed": seed,
            "trace": {
                "synthetic": {
                    "process": "poisson",
                    "rate_per_s": rate,
                    "duration_s": requests / rate,
                    "context_tokens": 0,
                    "generated_tokens": tokens,
                }
            },
            "service": engine(max_num_seqs=seqs, decode_s_per_token=table),
            "fleet": one_replica(max_ongoing=10**6, timeout=1e9),
        }
    )


def test_processor_sharing_oracle():
    """decode_s_per_token(k) = k·τ, no prefill: one replica is an M/G/1 processor-sharing queue,
    mean response n·τ / (1 − ρ). n = 100 tokens, τ = 10 ms (1 s of work), ρ = 0.7: 3.333 s."""
    tau, n, rho = 0.01, 100, 0.7
    table = {1: tau, 10_000: 10_000 * tau}  # linear: k·τ
    latencies = [
        simulate(
            poisson_engine(rate=rho, tokens=n, table=table, seqs=None, requests=200_000, seed=s)
        ).requests["latency_s"]
        for s in (1, 2)
    ]
    latency = np.concatenate(latencies)
    assert len(latency) > 395_000
    assert latency.mean() == pytest.approx(n * tau / (1 - rho), rel=0.03)


def test_constant_decode_time_without_a_batch_limit_takes_exactly_n_tau():
    s = poisson_engine(rate=20.0, tokens=150, table={1: 0.02}, seqs=None, requests=20_000, seed=4)
    req = simulate(s).requests
    assert req["latency_s"].to_numpy() == pytest.approx(np.full(len(req), 150 * 0.02), rel=1e-9)
    assert req["wait_s"].max() == 0.0


def md_c_wait(c: int, a: float) -> float:
    """Mean wait in queue of M/D/c in units of D, offered load a = λD < c.

    With deterministic service D, everyone in service at time t has left by t + D, and nobody
    else has; so the number in system at t and at t + D satisfy Q' = max(Q − c, 0) + A, with A
    Poisson(a) (Crommelin, 1932). Its stationary law is that of the number in system at any
    time (the recursion holds for every t), and Wq = E[max(Q − c, 0)] / λ by Little's law.
    """
    size = int(c + a + 60 * math.sqrt(a) + 200)
    arrivals = np.array([math.exp(-a + j * math.log(a) - math.lgamma(j + 1)) for j in range(size)])
    pi = np.zeros(size)
    pi[0] = 1.0
    for _ in range(100_000):
        served = np.zeros(size)
        served[0] = pi[: c + 1].sum()
        served[1 : size - c] = pi[c + 1 :]
        new = np.convolve(served, arrivals)[:size]
        new /= new.sum()
        if np.abs(new - pi).sum() < 1e-14:
            break
        pi = new
    waiting = np.maximum(np.arange(size) - c, 0)
    return float((waiting * new).sum() / a)


def test_md_c_solver_matches_pollaczek_khinchine():
    # M/D/1: Wq = ρD / (2(1 − ρ)); the M/D/c solver must agree at c = 1
    for rho in (0.5, 0.9):
        assert md_c_wait(1, rho) == pytest.approx(rho / (2 * (1 - rho)), rel=1e-6)


def test_md_c_oracle():
    """max_num_seqs = 4 with a constant decode time: one replica is an M/D/4 queue (waiting in
    the replica's FIFO queue). D = 100 tokens × 10 ms = 1 s, ρ = 0.8: Wq = 0.3861 s."""
    want = md_c_wait(4, 3.2)
    assert want == pytest.approx(0.3861, abs=1e-4)
    waits = [
        simulate(
            poisson_engine(rate=3.2, tokens=100, table={1: 0.01}, seqs=4, requests=250_000, seed=s)
        ).requests["wait_s"]
        for s in (5, 6)
    ]
    wait = np.concatenate(waits)
    assert len(wait) > 495_000
    assert wait.mean() == pytest.approx(want, rel=0.03)


def test_the_bundled_profile_loads_and_serves():
    from rollout.scenario import load_scenario

    s = load_scenario(ROOT / "scenarios" / "azure-conv.yaml")
    assert s.service.kind == "engine" and s.service.engine is not None
    spec = s.service.engine
    assert spec.profile is None  # read in: the scenario travels without the file
    assert spec.decode_s_per_token == {1: 0.00648, 4: 0.00659, 16: 0.01094, 64: 0.04691}


# ---- admission at iteration boundaries ---------------------------------------------------------


def test_a_request_on_a_busy_engine_waits_for_the_iteration_boundary(tmp_path):
    """A: prompt 1000 (0.1 s), 10 tokens at 0, alone: its first iteration (prefill + decode)
    ends at 0.11, then one token each 0.01 s. B: prompt 500 (0.05 s), 5 tokens at 0.155, in
    A's 6th iteration: it joins at its end (0.16); that iteration prefills B and decodes both,
    0.05 + 0.02 s: B's first token at 0.23. A's 3 last tokens at 0.02 s: A ends at 0.29; B's
    last token alone at 0.30."""
    s = from_arrivals(
        tmp_path,
        [(0.0, 1000, 10), (0.155, 500, 5)],
        service=engine(
            "iteration", prefill_s_per_1k_tokens=0.1, decode_s_per_token={1: 0.01, 2: 0.02}
        ),
        fleet=one_replica(),
    )
    req = simulate(s).requests
    a, b = req.iloc[0], req.iloc[1]
    assert a["ttft_s"] == pytest.approx(0.11)
    assert b["ttft_s"] == pytest.approx(0.23 - 0.155)
    assert a["latency_s"] == pytest.approx(0.29)
    assert b["latency_s"] == pytest.approx(0.30 - 0.155)


def test_requests_arriving_together_share_one_prefill_iteration(tmp_path):
    """Two requests at 0 on an idle engine: one iteration prefills both (0.1 + 0.05 s) and
    decodes both (0.02 s): both first tokens at 0.17."""
    s = from_arrivals(
        tmp_path,
        [(0.0, 1000, 3), (0.0, 500, 3)],
        service=engine(
            "iteration", prefill_s_per_1k_tokens=0.1, decode_s_per_token={1: 0.01, 2: 0.02}
        ),
        fleet=one_replica(),
    )
    req = simulate(s).requests
    assert list(req["ttft_s"]) == pytest.approx([0.17, 0.17])
    assert list(req["latency_s"]) == pytest.approx([0.21, 0.21])


def test_a_queued_request_joins_at_the_boundary_where_a_slot_frees(tmp_path):
    """max_num_seqs 1: B (prompt 1000, 5 tokens) waits in the replica while A (10 tokens,
    no prompt) runs to 0.1; the iteration starting then prefills B: first token at 0.21."""
    s = from_arrivals(
        tmp_path,
        [(0.0, 0, 10), (0.033, 1000, 5)],
        service=engine(
            "iteration",
            max_num_seqs=1,
            prefill_s_per_1k_tokens=0.1,
            decode_s_per_token={1: 0.01},
        ),
        fleet=one_replica(),
    )
    b = simulate(s).requests.iloc[1]
    assert b["start_s"] == pytest.approx(0.1)
    assert b["ttft_s"] == pytest.approx(0.21 - 0.033)
    assert b["latency_s"] == pytest.approx(0.25 - 0.033)


def replay_iterations(
    rows: list[tuple[float, int, int]],
    base: float,
    per_seq: float,
    pps: float,
    seqs: int,
    warm: tuple[int, float] = (0, 1.0),
) -> tuple[np.ndarray, np.ndarray]:
    """The LLM example's engine loop (examples/llm/engine.py) with the profile backend's
    iteration time, one iteration at a time: each iteration admits waiting requests (FIFO, up to
    `seqs` sequences), lasts base + per_seq·(batch − 1) + pps·prefill tokens (`warm`: the first
    so many iterations take this factor times as long), and gives every sequence in it one
    token. First-token and end times per request."""
    first = np.full(len(rows), np.nan)
    end = np.full(len(rows), np.nan)
    got = [0] * len(rows)
    running: list[int] = []
    i, t, done = 0, 0.0, 0
    waiting: list[int] = []
    while i < len(rows) or waiting or running:
        if not running and not waiting:
            t = max(t, rows[i][0])
        while i < len(rows) and rows[i][0] <= t:
            waiting.append(i)
            i += 1
        prefill = waiting[: max(0, seqs - len(running))]
        waiting = waiting[len(prefill) :]
        batch = running + prefill
        took = base + per_seq * (len(batch) - 1) + pps * sum(rows[k][1] for k in prefill)
        t += took * (warm[1] if done < warm[0] else 1.0)
        done += 1
        for k in prefill:
            first[k] = t
        running = []
        for k in batch:
            got[k] += 1
            if got[k] == rows[k][2]:
                end[k] = t
            else:
                running.append(k)
    return first, end


@pytest.mark.parametrize(("seqs", "warm"), [(4, (0, 1.0)), (64, (0, 1.0)), (64, (300, 3.0))])
def test_iteration_admission_matches_the_engine_loop_exactly(tmp_path, seqs, warm):
    """400 Poisson requests at 70 % or more of one replica's capacity, prompts and lengths
    varied: every first token and end equals the iteration-by-iteration replay's; with a
    warm-up of 300 iterations at 3× too (it spans busy periods and ends inside one)."""
    rng = np.random.default_rng(seqs)
    at = 2.0 + np.cumsum(rng.exponential(0.25, 400))  # on a new replica (`a_new_replica`)
    rows = [
        (round(float(a), 6), int(c), int(g))
        for a, c, g in zip(
            at, rng.choice([128, 512, 2048], 400), rng.integers(1, 40, 400), strict=True
        )
    ]
    base, per_seq, pps = 0.02, 0.0003, 0.00003
    s = from_arrivals(
        tmp_path,
        [FIRST, *rows],
        service=engine(
            "iteration",
            max_num_seqs=seqs,
            prefill_s_per_1k_tokens=pps * 1000,
            decode_s_per_token={1: base, 1001: base + 1000 * per_seq},
            warmup={"iterations": warm[0], "factor": warm[1]},
        ),
        **a_new_replica(timeout=1e6),
    )
    req = simulate(s).requests.iloc[1:]
    assert (req["version"] == "candidate").all()
    first, end = replay_iterations(rows, base, per_seq, pps, seqs, warm)
    arrival = np.array([r[0] for r in rows])
    assert req["ttft_s"].to_numpy() == pytest.approx(first - arrival, abs=1e-9)
    assert req["latency_s"].to_numpy() == pytest.approx(end - arrival, abs=1e-9)
    assert req["ttft_s"].min() >= pps * 128 + base - 1e-12  # at least a prefill iteration
