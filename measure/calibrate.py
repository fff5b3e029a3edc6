"""`rollout calibrate RUN_DIR... --out DIR`: the simulator's engine, cold-start and health-check
parameters fitted from real runs (folders `rollout export` wrote, with their requests).

What is fitted, from what a client and the controller see:

The model fitted is the simulator's engine with admission at iteration boundaries (vLLM's, and
the LLM example's): an iteration at batch size k lasts `decode_s_per_token(k)` plus the prefills
of the sequences it admits, and the iteration that prefills a request yields its first token.

- **Prefill** (`prefill_s_per_1k_tokens`): time to first token against prompt length over the
  requests that found a replica idle (fewer requests in flight on their version at their arrival
  than ready replicas; the lowest quarter of batch sizes where fewer than 10 did). On an idle
  replica TTFT is `overhead + prefill + decode_s_per_token(1)`: the line's slope is prefill time
  per token, its intercept the overhead plus one iteration at batch 1. The line is robust
  (Theil–Sen): a new replica's slow first iterations (warm-up) do not tilt it.
- **Decode** (`decode_s_per_token`): time per output token, `(latency − TTFT) / (tokens − 1)`,
  against the batch it ran in. The batch is estimated per request as the requests in flight on
  its version at the middle of its decode divided by that version's ready replicas then (the
  router spreads them evenly). A request's decode iterations also prefill the requests admitted
  meanwhile, and the simulator adds those prefills itself: so their share (the prompt tokens of
  the version's requests whose first token came during its decode, over the ready replicas, at
  the fitted prefill rate) is taken out of its time per token first, or prefill would count
  twice. The table holds the median at each batch size seen (rounded); its quality is a line's
  fit through the per-request points. A batch size needs 10 requests; the medians are made
  non-decreasing (pool adjacent violators), as iterations never get faster with more sequences.
- **Warm-up** (`warmup.iterations`, `warmup.factor`), when visible: a new replica's first
  iterations run slower (a freshly loaded model's first passes), so the requests it serves
  first take more time per token than the table says at their batch. A version's first
  requests over `WARM_RATIO` times the table's value (those before `SETTLED` in a row are not)
  are taken as warm-up: the factor is the median of their ratios, and the iterations are their
  extra time counted in slow iterations, each shared by the requests of its batch, over the
  version's ready replicas (each new replica warms up once). On a known engine it finds
  50 iterations at 3× as 47 at 3.1× (tests/test_calibrate.py).
- **max_num_seqs**, when visible: past the engine's limit extra requests wait instead of
  joining the batch, so time per token stops growing with load. A hinge
  `a + b·min(batch, K)` that fits clearly better than the line (a fifth less squared error) at
  a K below the largest batch seen gives K.
- **Cold start**: each replica started while watched, from the controller's scale-up that asked
  for it to running, as an empirical distribution (`cold_starts.csv`). The simulator's cold
  start runs from a replica's creation to serving, so it holds Serve's whole start sequence:
  its controller creating the actor, Ray placing it, and the constructor (image, weights,
  warm-up). Placement → running alone misses seconds (see docs/fidelity.md); replicas without
  a recorded scale-up (`asked_s`) count from their placement. A version's first replica waits
  for its Serve application to be created (scale-up → created 1.9–2.4 s, against 0.2 s for the
  next): `first_of_version_s` is the median over applications of the first replica's scale-up
  → created less the others', and is taken out of the first replicas' samples.
- **Overhead** (`service.overhead_s`): the TTFT line's intercept less one iteration at batch 1,
  what every request pays outside the engine (HTTP proxy, router, network).
- **Health-check period**: how late readiness is noticed after Serve reports the replica
  running. The simulator notices readiness at the first health check after the cold start, on
  average half a period late, so the period is twice the mean running → ready delay (at least
  the recording's resolution, one controller tick).

Each fit prints its quality: R² and residual percentiles (p50, p90, p99 of |residual|).
Inputs too small to fit (too few answered requests, one batch size, no replica start) are
refused with one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from measure.runs import read_result
from rollout.errors import InputError
from rollout.scenario import ColdStartSpec, EngineSpec, HealthCheckSpec
from sim.engine import decode_times
from sim.result import SimResult

MIN_REQUESTS = 30  # answered requests with two tokens or more
MIN_PER_BATCH = 10  # requests at a batch size for its median to enter the table
HINGE_GAIN = 0.8  # a hinge must leave at most this share of the line's squared error
MIN_PERIOD_S = 0.1  # the controller's tick: readiness is not seen more finely
WARM_RATIO = 1.5  # time per token this far over the table's is a new replica's warm-up
MIN_WARM = 3  # requests that show a warm-up before one is fitted
SETTLED = 5  # a version's requests in a row at the table's speed: its warm-up is over


@dataclass(frozen=True)
class Fit:
    """One fit's quality: R² (None for fewer than 3 points or no spread to explain),
    |residual| percentiles, and the points it used."""

    name: str
    r2: float | None
    residual_p50: float
    residual_p90: float
    residual_p99: float
    n: int

    @classmethod
    def of(cls, name: str, y: np.ndarray, predicted: np.ndarray) -> Fit:
        resid = np.abs(y - predicted)
        total = float(((y - y.mean()) ** 2).sum())
        spread = len(y) >= 3 and total > 1e-12 * max(1.0, float((y**2).sum()))
        r2 = 1.0 - float(((y - predicted) ** 2).sum()) / total if spread else None
        p50, p90, p99 = (float(v) for v in np.percentile(resid, [50, 90, 99]))
        return cls(name, r2, p50, p90, p99, len(y))

    def line(self, unit: str = "s") -> str:
        r2 = "     –" if self.r2 is None else f"{self.r2:6.3f}"
        return (
            f"{self.name:<28} R² {r2}   |residual| p50 {self.residual_p50:.4f} "
            f"p90 {self.residual_p90:.4f} p99 {self.residual_p99:.4f} {unit}   n={self.n}"
        )


@dataclass(frozen=True)
class Calibration:
    prefill_s_per_1k_tokens: float
    overhead_s: float  # the stack's time per request outside the engine
    decode_s_per_token: dict[int, float]
    max_num_seqs: int | None
    warmup_iterations: int  # 0: none seen
    warmup_factor: float
    cold_starts_s: np.ndarray
    first_of_version_s: float
    health_check_period_s: float
    fits: list[Fit]

    def fragment(self, cold_start_path: str) -> dict[str, Any]:
        """The scenario fragment: `service`, `cold_start` and `health_check`."""
        engine: dict[str, Any] = {
            "prefill_s_per_1k_tokens": round(self.prefill_s_per_1k_tokens, 6),
            "decode_s_per_token": {k: round(v, 6) for k, v in self.decode_s_per_token.items()},
            "max_num_seqs": self.max_num_seqs,
            "admission": "iteration",  # the model the fit assumes
        }
        if self.warmup_iterations:
            engine["warmup"] = {
                "iterations": self.warmup_iterations,
                "factor": round(self.warmup_factor, 3),
            }
        return {
            "service": {
                "kind": "engine",
                "overhead_s": round(max(0.0, self.overhead_s), 6),
                "engine": engine,
            },
            "cold_start": {
                "kind": "empirical",
                "path": cold_start_path,
                "first_of_version_s": round(self.first_of_version_s, 3),
            },
            "health_check": {"period_s": round(self.health_check_period_s, 4)},
        }


def load_at(requests: pd.DataFrame, timeline: pd.DataFrame) -> pd.DataFrame:
    """Per answered request, what the replicas held while it ran (estimated from the client's
    records and the version's ready replicas, the router spreading requests evenly):

    - `batch`: requests in flight on its version at the middle of its decode, per ready replica
      (NaN where none was ready);
    - `idle`: it found fewer requests in flight on its version than ready replicas at its arrival
      (a replica was idle);
    - `others_tokens`: prompt tokens of the version's requests whose first token came during its
      decode, per ready replica (prefilled in its decode iterations);
    - `ready`: its version's ready replicas at its arrival.
    """
    start = requests["start_s"].to_numpy(dtype=float)
    first = start + requests["ttft_s"].to_numpy(dtype=float)
    end = requests["end_s"].to_numpy(dtype=float)
    ctx = requests["context_tokens"].to_numpy(dtype=float)
    mid = (first + end) / 2.0
    version = requests["version"].astype(str).to_numpy()
    batch = np.full(len(requests), np.nan)
    idle = np.zeros(len(requests), dtype=bool)
    others = np.zeros(len(requests))
    ready_then = np.zeros(len(requests))
    t = timeline["t_s"].to_numpy(dtype=float)
    for name in ("current", "candidate"):
        mine = version == name
        if not mine.any():
            continue
        starts = np.sort(start[mine])
        ends = np.sort(end[mine][np.isfinite(end[mine])])
        ready = timeline[f"{name}_ready"].to_numpy(dtype=float)

        def ready_at(at: np.ndarray, ready: np.ndarray = ready) -> np.ndarray:
            return ready[np.clip(np.searchsorted(t, at, side="right") - 1, 0, len(t) - 1)]

        at = mid[mine]
        inflight = np.searchsorted(starts, at, side="right") - np.searchsorted(ends, at)
        busy = np.searchsorted(starts, start[mine], side="left") - np.searchsorted(
            ends, start[mine], side="right"
        )
        order = np.argsort(first[mine])
        firsts = first[mine][order]
        tokens = np.concatenate([[0.0], np.cumsum(ctx[mine][order])])
        window = tokens[np.searchsorted(firsts, end[mine], side="right")] - tokens[
            np.searchsorted(firsts, first[mine], side="right")
        ]  # fmt: skip
        rep, rep0 = ready_at(at), ready_at(start[mine])
        with np.errstate(divide="ignore", invalid="ignore"):
            batch[mine] = np.where(rep > 0, inflight / rep, np.nan)
            others[mine] = np.where(rep > 0, window / rep, 0.0)
        idle[mine] = busy < rep0
        ready_then[mine] = rep0
    return pd.DataFrame(
        {"batch": batch, "idle": idle, "others_tokens": others, "ready": ready_then}
    )


def read_runs(runs: list[Path]) -> tuple[list[SimResult], list[pd.DataFrame]]:
    results = [read_result(folder) for folder in runs]
    return results, [r.replicas for r in results if len(r.replicas)]


def fit(results: list[SimResult], reps: list[pd.DataFrame]) -> Calibration:
    """Fit from runs' requests and timelines and from replica lifecycles."""
    frames = []
    for result in results:
        req = result.requests
        if len(req) and "context_tokens" in req:
            answered = req[req["latency_s"].notna() & req["ttft_s"].notna()].reset_index(drop=True)
            frames.append(pd.concat([answered, load_at(answered, result.timeline)], axis=1))
    req = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if not len(req):
        raise InputError("calibrate: the runs have no answered requests (export with --requests)")
    req = req[(req["generated_tokens"] >= 2) & req["batch"].notna()]
    if len(req) < MIN_REQUESTS:
        raise InputError(
            f"calibrate: {len(req)} answered requests with two tokens or more; at least "
            f"{MIN_REQUESTS} are needed to fit"
        )
    fits: list[Fit] = []
    batch = req["batch"].to_numpy(dtype=float)
    # prefill: TTFT against prompt length where a replica was idle (overhead + prefill + one
    # iteration at batch 1)
    low = req["idle"].to_numpy(dtype=bool)
    if low.sum() < MIN_PER_BATCH:
        low = batch <= np.percentile(batch, 25)
    ctx = req["context_tokens"].to_numpy(dtype=float)[low]
    ttft = req["ttft_s"].to_numpy(dtype=float)[low]
    if len(np.unique(ctx)) < 2:
        raise InputError("calibrate: every request had the same prompt length; prefill needs two")
    per_token, icept = theil_sen(ctx, ttft)
    per_token = max(0.0, per_token)
    fits.append(Fit.of("TTFT on an idle replica", ttft, icept + per_token * ctx))
    # decode: time per token less the prefills its iterations did for others
    tokens = req["generated_tokens"].to_numpy(dtype=float)
    tpot = (req["latency_s"] - req["ttft_s"]).to_numpy() / (tokens - 1)
    tpot = tpot - per_token * req["others_tokens"].to_numpy(dtype=float) / (tokens - 1)
    rounded = np.maximum(1, np.round(batch)).astype(int)
    sizes = [int(k) for k in np.unique(rounded) if (rounded == k).sum() >= MIN_PER_BATCH]
    if len(sizes) < 2:
        raise InputError(
            "calibrate: the requests ran at one batch size only; time per token against batch "
            "size needs load at two or more (rollout calibrate --probe sweeps it)"
        )
    medians = [float(np.median(tpot[rounded == k])) for k in sizes]
    weights = [int((rounded == k).sum()) for k in sizes]
    table = dict(zip(sizes, _non_decreasing(medians, weights), strict=True))
    slope, line_icept = np.polyfit(batch, tpot, 1)
    line = line_icept + slope * batch
    fits.append(Fit.of("time per output token (line)", tpot, line))
    max_num_seqs = _hinge(batch, tpot, float(((tpot - line) ** 2).sum()), fits)
    ratio = tpot / np.asarray(decode_times(table, int(rounded.max())))[rounded]
    warm_iterations, warm_factor = _warmup(req, ratio)
    cold, first, period = _starts(reps, fits)
    return Calibration(
        prefill_s_per_1k_tokens=per_token * 1000.0,
        overhead_s=float(icept) - decode_times(table, 1)[1],
        decode_s_per_token=table,
        max_num_seqs=max_num_seqs,
        warmup_iterations=warm_iterations,
        warmup_factor=warm_factor,
        cold_starts_s=cold,
        first_of_version_s=first,
        health_check_period_s=period,
        fits=fits,
    )


def theil_sen(x: np.ndarray, y: np.ndarray, most: int = 2000) -> tuple[float, float]:
    """A robust line (slope, intercept): the median of the slopes between pairs of points, the
    median intercept under it. A new replica's first iterations run slower (warm-up) and a few
    requests meet a busy replica after all: outliers that tilt a least-squares line. Over `most`
    points it uses an evenly spaced sample of them (the pairs grow as the square)."""
    if len(x) > most:
        pick = np.linspace(0, len(x) - 1, most).astype(int)
        x, y = x[pick], y[pick]
    i, j = np.triu_indices(len(x), 1)
    dx = x[j] - x[i]
    apart = dx != 0
    slope = float(np.median((y[j] - y[i])[apart] / dx[apart]))
    return slope, float(np.median(y - slope * x))


def _non_decreasing(values: list[float], weights: list[int]) -> list[float]:
    """The closest non-decreasing sequence (weighted least squares: pool adjacent violators).
    An iteration never gets faster with more sequences in it; a dip is noise of few requests
    (a 2-core machine's scheduling), and the simulator would take it as a faster engine."""
    blocks: list[list[float]] = []  # [mean, weight, count]
    for v, w in zip(values, weights, strict=True):
        blocks.append([v, float(w), 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m2, w2, n2), (m1, w1, n1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
    return [m for m, _, n in blocks for _ in range(int(n))]


def _hinge(batch: np.ndarray, tpot: np.ndarray, line_sse: float, fits: list[Fit]) -> int | None:
    """The batch size past which time per token stops growing, if the data show one."""
    best: tuple[float, int, np.ndarray] | None = None
    top = int(np.floor(batch.max()))
    for k in range(2, top):
        x = np.minimum(batch, k)
        if np.ptp(x) == 0:
            continue
        b, a = np.polyfit(x, tpot, 1)
        pred = a + b * x
        sse = float(((tpot - pred) ** 2).sum())
        if b > 0 and (best is None or sse < best[0]):
            best = (sse, k, pred)
    if best is None or best[0] > HINGE_GAIN * line_sse:
        return None
    fits.append(Fit.of(f"time per token (limit {best[1]})", tpot, best[2]))
    return best[1]


def _warmup(req: pd.DataFrame, ratio: np.ndarray) -> tuple[int, float]:
    """Warm-up iterations per new replica and their factor from the requests' time per token
    over the table's (`ratio`): a version's first requests, until `SETTLED` in a row run at the
    table's speed (later slow ones are load, not warm-up); (0, 1.0) where fewer than `MIN_WARM`
    show one."""
    warm = np.zeros(len(req), dtype=bool)
    slow = ratio > WARM_RATIO
    version = req["version"].astype(str).to_numpy()
    for name in np.unique(version):
        rows = np.flatnonzero(version == name)
        rows = rows[np.argsort(req["start_s"].to_numpy()[rows], kind="stable")]
        calm = np.convolve(~slow[rows], np.ones(SETTLED, dtype=int), mode="valid") == SETTLED
        end = int(np.argmax(calm)) if calm.any() else len(rows)
        warm[rows[:end]] = slow[rows[:end]]
    if warm.sum() < MIN_WARM:
        return 0, 1.0
    factor = float(np.median(ratio[warm]))
    tokens = req["generated_tokens"].to_numpy(dtype=float)[warm]
    iterations = (ratio[warm] - 1.0) / (factor - 1.0) * (tokens - 1.0)  # slow ones it ran
    batch = np.maximum(1.0, req["batch"].to_numpy(dtype=float)[warm])
    ready = np.maximum(1.0, req["ready"].to_numpy(dtype=float)[warm])
    return max(1, round(float((iterations / batch / ready).sum()))), factor


def _starts(reps: list[pd.DataFrame], fits: list[Fit]) -> tuple[np.ndarray, float, float]:
    """Cold starts (scale-up → running, less the first-of-version wait), that wait, and the
    health-check period of the watched starts."""
    frame = pd.concat(reps, ignore_index=True) if reps else pd.DataFrame()
    need = {"gpu_s", "running_s", "ready_s"}
    if not len(frame) or not need <= set(frame.columns):
        raise InputError("calibrate: the runs have no replica lifecycles (replicas.parquet)")
    watched = frame.dropna(subset=list(need))
    if not len(watched):
        raise InputError("calibrate: no replica was seen starting (from placed to ready)")
    asked = watched["asked_s"] if "asked_s" in watched else watched["gpu_s"]
    asked = asked.fillna(watched["gpu_s"])
    first, extra = _first_of_version(watched, asked)
    whole = (watched["running_s"] - asked).to_numpy(dtype=float)
    cold = np.sort(whole - np.where(first, extra, 0.0))
    late = (watched["ready_s"] - watched["running_s"]).to_numpy(dtype=float)
    period = max(MIN_PERIOD_S, 2.0 * float(late.mean()))
    # the model's starts (cold start, the first's wait, half a period) against the measured ones
    fits.append(Fit.of("scale-up → ready", whole + late, whole + period / 2.0))
    return cold, extra, period


def _first_of_version(watched: pd.DataFrame, asked: pd.Series) -> tuple[np.ndarray, float]:
    """Which watched starts were their application's first, and how much longer their
    scale-up → created took than the rest's (0 where no application shows both)."""
    first = np.zeros(len(watched), dtype=bool)
    if "app" not in watched or "created_s" not in watched:
        return first, 0.0
    wait = (watched["created_s"] - asked).to_numpy(dtype=float)
    apps = watched["app"].astype(str).to_numpy()
    extras = []
    for app in np.unique(apps):
        rows = np.flatnonzero(apps == app)
        rows = rows[np.argsort(asked.to_numpy(dtype=float)[rows], kind="stable")]
        if len(rows) >= 2 and np.isfinite(wait[rows]).all():
            first[rows[0]] = True
            extras.append(wait[rows[0]] - float(np.median(wait[rows[1:]])))
    extra = max(0.0, float(np.median(extras))) if extras else 0.0
    return first & (extra > 0), extra


def write(cal: Calibration, out: Path) -> Path:
    """calibration.yaml (the scenario fragment) and cold_starts.csv beside it."""
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"seconds": np.round(cal.cold_starts_s, 4)}).to_csv(
        out / "cold_starts.csv", index=False
    )
    fragment = cal.fragment("cold_starts.csv")
    # the fragment is what a scenario accepts: checked before it is written
    EngineSpec.model_validate(fragment["service"]["engine"])
    ColdStartSpec.model_validate({**fragment["cold_start"], "path": out / "cold_starts.csv"})
    HealthCheckSpec.model_validate(fragment["health_check"])
    head = (
        "# Fitted by `rollout calibrate` from measured runs; paste into a scenario (the\n"
        "# cold-start path is relative to this file).\n"
    )
    path = out / "calibration.yaml"
    path.write_text(head + yaml.safe_dump(fragment, sort_keys=False))
    return path


def report(cal: Calibration) -> str:
    table = ", ".join(f"{k}: {v * 1000:.2f} ms" for k, v in cal.decode_s_per_token.items())
    cold = cal.cold_starts_s
    lines = [
        f"prefill: {cal.prefill_s_per_1k_tokens * 1000:.2f} ms per 1k prompt tokens "
        f"(+ {cal.overhead_s * 1000:.1f} ms per request outside the engine: overhead_s)",
        f"time per output token by batch size: {table}",
        f"max_num_seqs: {cal.max_num_seqs if cal.max_num_seqs else 'not visible'}",
        "warm-up: "
        + (
            f"a new replica's first {cal.warmup_iterations} iterations, "
            f"{cal.warmup_factor:.2f}x as long"
            if cal.warmup_iterations
            else "not visible"
        ),
        f"cold start (scale-up → running): {len(cold)} starts, p50 {np.median(cold):.2f} s, "
        f"max {cold.max():.2f} s; a version's first replica {cal.first_of_version_s:.2f} s more "
        "(its Serve application is created first)",
        f"health-check period: {cal.health_check_period_s:.2f} s",
        "fits:",
        *(f"  {f.line()}" for f in cal.fits),
    ]
    return "\n".join(lines)


def calibrate_command(runs: list[Path], out: Path, probe: Path | None = None) -> Calibration:
    if probe is not None:
        from measure.probe import probe_command

        results, reps = read_runs(runs)
        got = probe_command(probe, out / "probe")
        results.append(got[0])
        reps.extend(got[1])
    elif not runs:
        raise InputError("calibrate: name run folders (from `rollout export`) or --probe")
    else:
        results, reps = read_runs(runs)
    cal = fit(results, reps)
    path = write(cal, out)
    print(report(cal))
    print(f"scenario fragment: {path}")
    return cal
