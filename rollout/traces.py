"""Request arrivals: real load traces from CSV files, or synthetic arrival processes.

A trace is a sorted array of arrival times in seconds from its first request, with optional
per-request token counts (the Azure LLM traces carry `ContextTokens` and `GeneratedTokens`).
Bad files end in one `InputError` sentence naming the file and, where it helps, the row.

A file is replayed as a sample of its traffic, varied by the seed (`resample`, on by default):
every request of the file appears a Poisson(`rate_scale`) number of times (0, 1, 2, ...; on
average `rate_scale`), each copy with the original's token counts, moved by a uniform offset in
±`jitter_s`/2 (reflected at the trace's ends). The expected number of arrivals in any window
longer than the jitter is `rate_scale` times the file's, so the trace keeps its rate over time,
its bursts and its request sizes, while each seed sees a different draw of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd

from rollout.errors import InputError
from rollout.scenario import SyntheticTrace, TraceSpec

TIME_COLUMNS = ("TIMESTAMP", "arrival_s")
TOKEN_COLUMNS = ("ContextTokens", "GeneratedTokens")


@dataclass(frozen=True)
class Trace:
    """Arrival times (seconds, sorted, the first at 0 for files) and optional token counts."""

    arrival_s: np.ndarray
    context_tokens: np.ndarray | None = None
    generated_tokens: np.ndarray | None = None
    source: str = ""

    def __len__(self) -> int:
        return len(self.arrival_s)

    @property
    def has_tokens(self) -> bool:
        return self.context_tokens is not None and self.generated_tokens is not None

    @property
    def duration_s(self) -> float:
        return float(self.arrival_s[-1]) if len(self.arrival_s) else 0.0


class TraceFiles(Protocol):
    """Where a trace's files come from: the disk (`DISK`), or contents read once elsewhere and
    shipped to this process (`sim.inputs.Inputs`)."""

    def trace(self, path: Path) -> Trace: ...

    def token_column(self, path: Path, column: str) -> np.ndarray: ...


class _Disk:
    def trace(self, path: Path) -> Trace:
        return read_trace_csv(path)

    def token_column(self, path: Path, column: str) -> np.ndarray:
        return read_token_column(path, column)


DISK: TraceFiles = _Disk()


def load_trace(spec: TraceSpec, *, seed: int = 0, files: TraceFiles = DISK) -> Trace:
    """The scenario's arrivals: a file (resampled for the seed unless `resample` is off) or a
    synthetic process, with `rate_scale` times the requests, replayed `time_scale` times
    faster."""
    if spec.synthetic is not None:
        syn = spec.synthetic
        if spec.rate_scale != 1.0:
            syn = syn.model_copy(update={"rate_per_s": syn.rate_per_s * spec.rate_scale})
        trace = synthesize(syn, seed=seed, files=files)
    else:
        assert spec.path is not None  # the schema requires exactly one source
        trace = files.trace(spec.path)
        if spec.resample:
            trace = resample(trace, spec.rate_scale, spec.jitter_s, seed=seed)
    if spec.time_scale != 1.0:
        trace = Trace(
            trace.arrival_s / spec.time_scale,
            trace.context_tokens,
            trace.generated_tokens,
            trace.source,
        )
    return trace


def read_trace_csv(path: Path | str) -> Trace:
    """Read a CSV with a `TIMESTAMP` (date-time) or `arrival_s` (seconds) column.

    Azure's timestamps carry 7 fractional digits (`2023-11-16 18:17:03.9799600`), one more than
    Python's `%f` takes, so they are parsed as ISO 8601 (pandas keeps nanoseconds). Parsing is
    most of a short simulation's time, so a sweep parses each file once per process: the
    parsed trace is cached by path, size and modification time, with read-only arrays.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no such trace file: {path}")
    stat = path.stat()
    return _read_cached(str(path), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=8)
def _read_cached(name: str, size: int, mtime_ns: int) -> Trace:
    trace = _read(Path(name))
    for arr in (trace.arrival_s, trace.context_tokens, trace.generated_tokens):
        if arr is not None:
            arr.setflags(write=False)
    return trace


def _read(path: Path) -> Trace:
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise InputError(f"{path}: the trace is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{path}: not a readable CSV file ({first})") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    column = next((c for c in TIME_COLUMNS if c in frame.columns), None)
    if column is None:
        found = ", ".join(frame.columns[:6]) or "none"
        raise InputError(f"{path}: needs a TIMESTAMP or arrival_s column (found: {found})")
    if frame.empty:
        raise InputError(f"{path}: the trace has no requests")
    times = _parse_times(path, frame[column], column)
    _check_sorted(path, times)
    tokens = [
        _parse_tokens(path, frame[c], c) if c in frame.columns else None for c in TOKEN_COLUMNS
    ]
    return Trace(times - times[0], tokens[0], tokens[1], source=str(path))


def _row_of(index: int) -> int:
    """The file's line number for a data row (line 1 is the header)."""
    return index + 2


def _parse_times(path: Path, raw: pd.Series, column: str) -> np.ndarray:
    if column == "arrival_s":
        values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=float)
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad):
            i = int(bad[0])
            raise InputError(
                f"{path}: line {_row_of(i)}: arrival_s {raw.iloc[i]!r} is not a number of seconds"
            )
        return values
    stamps = pd.to_datetime(raw, format="ISO8601", errors="coerce")
    bad = np.flatnonzero(stamps.isna().to_numpy())
    if len(bad):
        i = int(bad[0])
        raise InputError(
            f"{path}: line {_row_of(i)}: TIMESTAMP {raw.iloc[i]!r} is not a date-time "
            "like 2023-11-16 18:17:03.9799600"
        )
    ns = stamps.to_numpy(dtype="datetime64[ns]").astype(np.int64)
    return (ns - ns[0]) / 1e9


def _check_sorted(path: Path, times: np.ndarray) -> None:
    back = np.flatnonzero(np.diff(times) < 0)
    if len(back):
        i = int(back[0]) + 1
        raise InputError(
            f"{path}: timestamps must be sorted, but line {_row_of(i)} goes back in time "
            f"({times[i] - times[i - 1]:.6g} s)"
        )


def _parse_tokens(path: Path, raw: pd.Series, column: str) -> np.ndarray:
    values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=float)
    bad = np.flatnonzero(~np.isfinite(values) | (values < 0) | (values != np.round(values)))
    if len(bad):
        i = int(bad[0])
        raise InputError(
            f"{path}: line {_row_of(i)}: {column} {raw.iloc[i]!r} is not a whole number >= 0"
        )
    return values.astype(np.int64)


def resample(trace: Trace, rate_scale: float, jitter_s: float, *, seed: int) -> Trace:
    """A Poisson bootstrap of the trace with jittered copies (see the module docstring)."""
    rng = np.random.default_rng([seed, 0x7E5A])
    copies = rng.poisson(rate_scale, len(trace))
    index = np.repeat(np.arange(len(trace)), copies)
    if len(index) == 0:
        raise InputError(
            f"{trace.source}: resampled at rate_scale {rate_scale:g}, the trace has no requests"
        )
    end = trace.duration_s
    times = trace.arrival_s[index] + (rng.random(len(index)) - 0.5) * jitter_s
    times = np.abs(times)  # reflected at both ends: the rate near the edges is kept
    if end > 0:
        times = np.where(times > end, 2 * end - times, times)
        times = np.clip(times, 0.0, end)
    order = np.argsort(times, kind="stable")
    index = index[order]
    ctx, gen = trace.context_tokens, trace.generated_tokens
    return Trace(
        times[order],
        None if ctx is None else ctx[index],
        None if gen is None else gen[index],
        source=trace.source,
    )


def synthesize(spec: SyntheticTrace, *, seed: int = 0, files: TraceFiles = DISK) -> Trace:
    """Arrivals of a Poisson process: constant, diurnal (sinusoidal) or with one step in rate.

    Non-constant rates are drawn by thinning (Lewis and Shedler, 1979): candidates at the peak
    rate, each kept with probability rate(t) / peak.
    """
    rng = np.random.default_rng([seed, 0x7A3E])
    if spec.process == "poisson":
        peak = spec.rate_per_s
    elif spec.process == "diurnal":
        peak = spec.rate_per_s * (1.0 + spec.amplitude)
    else:
        peak = spec.rate_per_s * max(1.0, spec.step_factor)
    times = _poisson_times(rng, peak, spec.duration_s)
    if spec.process != "poisson":
        keep = rng.random(len(times)) * peak < _rate_at(spec, times)
        times = times[keep]
    if len(times) == 0:
        raise InputError(
            f"the synthetic {spec.process} trace has no requests: raise rate_per_s "
            f"({spec.rate_per_s:g}) or duration_s ({spec.duration_s:g})"
        )
    ctx, gen = token_counts(spec, len(times), seed=seed, files=files)
    return Trace(times, ctx, gen, source=f"synthetic {spec.process}")


def token_counts(
    spec: SyntheticTrace, n: int, *, seed: int, files: TraceFiles = DISK
) -> tuple[np.ndarray, np.ndarray]:
    """Context and generated tokens for n synthetic requests: constants, lognormal draws, or
    rows sampled from a CSV file (the same rows for both when both name the same file, so a
    trace's pairing of prompt and output lengths is kept)."""
    rng = np.random.default_rng([seed, 0x70C5])
    rows: dict[Path, np.ndarray] = {}
    out = []
    for value, default in (
        (spec.context_tokens, "ContextTokens"),
        (spec.generated_tokens, "GeneratedTokens"),
    ):
        if isinstance(value, int):
            out.append(np.full(n, value, dtype=np.int32))
        elif value.kind == "lognormal":
            assert value.p50 is not None and value.p99 is not None
            mu = np.log(value.p50)
            sigma = (np.log(value.p99) - mu) / Z99
            draws = np.exp(mu + sigma * rng.standard_normal(n))
            out.append(np.rint(draws).astype(np.int32))
        else:
            assert value.path is not None
            column = files.token_column(value.path, value.column or default)
            if value.path not in rows:
                rows[value.path] = rng.integers(0, len(column), n)
            out.append(column[rows[value.path]].astype(np.int32))
    return out[0], out[1]


Z99 = 2.3263478740408408  # standard normal 99th percentile


def read_token_column(path: Path, column: str) -> np.ndarray:
    """Whole token counts >= 0 from one column of a CSV file (a trace file works)."""
    if not Path(path).is_file():
        raise InputError(f"no such token-count file: {path}")
    try:
        frame = pd.read_csv(path, usecols=lambda c: c.strip() == column, dtype=str)
    except pd.errors.EmptyDataError:
        raise InputError(f"{path}: the file is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError):
        raise InputError(f"{path}: not a readable CSV file of token counts") from None
    if frame.shape[1] == 0:
        raise InputError(f"{path}: has no {column} column")
    if frame.empty:
        raise InputError(f"{path}: has no token counts")
    return _parse_tokens(Path(path), frame.iloc[:, 0], column)


def _poisson_times(rng: np.random.Generator, rate: float, duration: float) -> np.ndarray:
    """Homogeneous Poisson arrivals in [0, duration): exponential gaps, drawn in batches."""
    expected = rate * duration
    chunks: list[np.ndarray] = []
    last = 0.0
    while last < duration:
        size = max(1024, int(expected + 6 * np.sqrt(expected) + 16))
        chunk = last + np.cumsum(rng.exponential(1.0 / rate, size))
        chunks.append(chunk)
        last = float(chunk[-1])
    times = np.concatenate(chunks)
    return times[times < duration]


def _rate_at(spec: SyntheticTrace, t: np.ndarray) -> np.ndarray:
    if spec.process == "diurnal":
        return spec.rate_per_s * (1.0 + spec.amplitude * np.sin(2 * np.pi * t / spec.period_s))
    if spec.process == "step":
        return np.where(t < spec.step_at_s, spec.rate_per_s, spec.rate_per_s * spec.step_factor)
    return np.full_like(t, spec.rate_per_s)
