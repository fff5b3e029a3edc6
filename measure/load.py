"""`rollout load`: replay a trace against an OpenAI-compatible server, open loop, and measure it.

Open loop: every trace request is sent at its (scaled) trace time whether or not earlier ones
have been answered, as real users do; a closed loop would slow down with the server and hide
queueing. Each request is a streaming completion (`POST {url}/v1/completions`, `stream: true`)
with a prompt of exactly the trace's `ContextTokens` token ids and its `GeneratedTokens` as
`max_tokens`. One row per request goes to `requests.parquet`, with the simulator's columns:

- `arrival_s`: when the trace says to send it (seconds from the replay's start, scaled);
- `start_s`: when it was sent (`arrival_s` plus the load generator's own send lag);
- `end_s`, `latency_s` (`end_s - start_s`), `ttft_s` (first streamed byte − `start_s`);
- `wait_s`: null (the server's queueing is not visible from outside);
- `version`: the `x-rollout-version` header of the answer (null without one);
- `dropped`: no complete answer (an HTTP error, a failure, a stream without `data: [DONE]`);
- `status` (HTTP status, null when none came) and `error` (null when answered).

Scaling: `time_scale` S divides trace times (S = 2 replays twice as fast). `rate_scale` R keeps
the time axis and thins or multiplies requests: R < 1 keeps each request with probability R;
R > 1 sends each request ⌊R⌋ times and once more with probability R − ⌊R⌋, its copies at times
drawn uniformly between it and the next request. The draws are seeded, so a replay repeats.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pandas as pd

from rollout.errors import InputError
from rollout.traces import Trace, read_trace_csv

PREFLIGHT_TIMEOUT_S = 10.0
TOKEN_LOW, TOKEN_HIGH = 100, 1000  # prompt token ids: valid in any real vocabulary


@dataclass(frozen=True)
class Schedule:
    """What to send: per request, when (seconds from the start) and how many tokens."""

    at_s: np.ndarray
    context_tokens: np.ndarray
    generated_tokens: np.ndarray

    def __len__(self) -> int:
        return len(self.at_s)


def schedule(
    trace: Trace,
    *,
    time_scale: float = 1.0,
    rate_scale: float = 1.0,
    start_s: float = 0.0,
    duration_s: float | None = None,
    seed: int = 0,
) -> Schedule:
    """The requests of the trace window [start_s, start_s + duration_s) in trace seconds,
    scaled (see the module docstring); times start at 0 at `start_s`."""
    if not trace.has_tokens:
        raise InputError(
            f"{trace.source}: the trace has no ContextTokens and GeneratedTokens columns, "
            "which a replay needs for its prompts and max_tokens"
        )
    if time_scale <= 0 or rate_scale <= 0:
        raise InputError("--time-scale and --rate-scale must be greater than 0")
    if start_s < 0 or (duration_s is not None and duration_s <= 0):
        raise InputError("--start-s must be at least 0 and --duration-s greater than 0")
    assert trace.context_tokens is not None and trace.generated_tokens is not None
    t = trace.arrival_s
    end = math.inf if duration_s is None else start_s + duration_s
    keep = (t >= start_s) & (t < end)
    at = t[keep] - start_s
    ctx, gen = trace.context_tokens[keep], trace.generated_tokens[keep]
    if rate_scale != 1.0:
        at, ctx, gen = _rescale(at, ctx, gen, rate_scale, seed, end - start_s)
    if len(at) == 0:
        raise InputError(f"{trace.source}: no request in the chosen window of the trace")
    return Schedule(at / time_scale, np.maximum(ctx, 1), np.maximum(gen, 1))


def _rescale(
    at: np.ndarray, ctx: np.ndarray, gen: np.ndarray, rate: float, seed: int, span: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, 0x10AD])
    whole, frac = int(rate), rate - int(rate)
    copies = np.full(len(at), whole) + (rng.random(len(at)) < frac)
    index = np.repeat(np.arange(len(at)), copies)
    first = np.r_[True, index[1:] != index[:-1]]  # each request's own copy keeps its time
    nxt = np.r_[at[1:], min(span, at[-1] + 1.0) if len(at) else 0.0]
    jitter = rng.random(len(index)) * (nxt[index] - at[index])
    times = np.where(first, at[index], at[index] + jitter)
    order = np.argsort(times, kind="stable")
    return times[order], ctx[index][order], gen[index][order]


# ---- running ----------------------------------------------------------------------------------


@dataclass
class Records:
    """Per-request measurements, in loop-clock seconds relative to the replay's start."""

    n: int
    sent: np.ndarray = field(init=False)
    first: np.ndarray = field(init=False)
    end: np.ndarray = field(init=False)
    status: list[int | None] = field(init=False)
    version: list[str | None] = field(init=False)
    error: list[str | None] = field(init=False)

    def __post_init__(self) -> None:
        self.sent = np.full(self.n, np.nan)
        self.first = np.full(self.n, np.nan)
        self.end = np.full(self.n, np.nan)
        self.status = [None] * self.n
        self.version = [None] * self.n
        self.error = ["not sent"] * self.n


def check_url(url: str) -> str:
    """The base URL without a trailing slash; one line naming the problem otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(f"--url must be an http:// or https:// URL with a host (got {url!r})")
    if parts.query or parts.fragment:
        raise InputError(f"--url must not have a query or fragment (got {url!r})")
    return url.rstrip("/")


async def _preflight(session: Any, url: str, model: str | None) -> str:
    """Reach the server (one line and exit 2 when it cannot be reached); the model to ask
    for: `model`, else the first one the server lists at /v1/models."""
    import aiohttp

    try:
        async with session.get(f"{url}/v1/models", timeout=PREFLIGHT_TIMEOUT_S) as r:
            body = await r.read()
            status = r.status
    except (TimeoutError, aiohttp.ClientError, OSError) as e:
        why = str(e) or type(e).__name__
        raise InputError(f"cannot reach {url}: {why}") from None
    if model:
        return model
    try:
        return str(json.loads(body)["data"][0]["id"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise InputError(
            f"{url}/v1/models answered {status} without a model list; pass --model"
        ) from None


class Replay:
    """Sends the schedule open loop on one event loop and records what comes back."""

    def __init__(
        self, plan: Schedule, url: str, model: str, *, timeout_s: float, seed: int = 0
    ) -> None:
        self.plan = plan
        self.url = url
        self.model = model
        self.timeout_s = timeout_s
        self.records = Records(len(plan))
        self.lag = np.full(len(plan), np.nan)
        self.sent = self.done = self.failed = 0
        self.seed = seed
        self.t0 = 0.0  # loop clock at the replay's start
        self.started_at = 0.0  # the same instant, Unix time

    def _body(self, i: int) -> bytes:
        n = int(self.plan.context_tokens[i])
        rng = np.random.default_rng([self.seed, i])
        prompt = rng.integers(TOKEN_LOW, TOKEN_HIGH, n).tolist()
        return json.dumps({
            "model": self.model,
            "prompt": prompt,
            "max_tokens": int(self.plan.generated_tokens[i]),
            "stream": True,
            "stream_options": {"include_usage": True},
        }).encode()  # fmt: skip

    async def _one(self, session: Any, i: int, due: float) -> None:
        import aiohttp

        loop = asyncio.get_running_loop()
        rec = self.records
        body = self._body(i)
        sent = loop.time()
        self.lag[i] = sent - due
        rec.sent[i] = sent - self.t0
        rec.error[i] = None
        self.sent += 1
        tail = b""
        try:
            async with session.post(
                f"{self.url}/v1/completions",
                data=body,
                headers={"content-type": "application/json"},
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            ) as r:
                rec.status[i] = r.status
                rec.version[i] = r.headers.get("x-rollout-version")
                if r.status != 200:
                    text = (await r.read())[:300].decode(errors="replace")
                    rec.error[i] = f"HTTP {r.status}: {' '.join(text.split())}"
                else:
                    async for chunk in r.content.iter_any():
                        if tail == b"" and chunk:
                            rec.first[i] = loop.time() - self.t0
                        tail = (tail + chunk)[-64:]
                    if not tail.rstrip().endswith(b"data: [DONE]"):
                        rec.error[i] = "the stream ended without data: [DONE]"
        except asyncio.CancelledError:  # the replay was interrupted
            rec.error[i] = "interrupted before the answer ended"
            raise
        except Exception as e:  # any failure is recorded against the request, never raised
            rec.error[i] = f"{type(e).__name__}: {e}"[:300]
        finally:
            rec.end[i] = loop.time() - self.t0
        self.done += 1
        self.failed += rec.error[i] is not None

    async def run(self, progress: Any = None, announce: Any = None) -> None:
        import aiohttp

        loop = asyncio.get_running_loop()
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        async with aiohttp.ClientSession(connector=connector) as session:
            self.model = await _preflight(session, self.url, self.model)
            if announce is not None:
                announce(self)
            tasks: set[asyncio.Task[None]] = set()
            ticker = loop.create_task(self._tick(progress)) if progress else None
            self.t0 = loop.time() + 0.05
            self.started_at = time.time() + 0.05
            try:
                for i, at in enumerate(self.plan.at_s.tolist()):
                    due = self.t0 + at
                    delay = due - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    task = loop.create_task(self._one(session, i, due))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                while tasks:
                    await asyncio.wait(set(tasks))
            except asyncio.CancelledError:
                # interrupted: end the requests in flight as such before the session closes
                # their connections, or one being sent then fails as the server's error
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
            if ticker is not None:
                ticker.cancel()
                progress(self)

    async def _tick(self, progress: Any) -> None:
        while True:
            progress(self)
            await asyncio.sleep(0.25)

    def frame(self) -> pd.DataFrame:
        r = self.records
        status = pd.array(r.status, dtype="Int64")
        dropped = np.array([e is not None for e in r.error])
        return pd.DataFrame(
            {
                "arrival_s": self.plan.at_s.astype(float),
                "start_s": r.sent,
                "end_s": r.end,
                "wait_s": np.full(r.n, np.nan),
                "latency_s": r.end - r.sent,
                "ttft_s": r.first - r.sent,
                "version": pd.array(r.version, dtype="string"),
                "dropped": dropped,
                "status": status,
                "error": pd.array(r.error, dtype="string"),
                "context_tokens": self.plan.context_tokens.astype(np.int64),
                "generated_tokens": self.plan.generated_tokens.astype(np.int64),
            }
        )


# ---- summary ----------------------------------------------------------------------------------


def _pct(values: pd.Series, q: float) -> float | None:
    v = values.dropna()
    return float(np.quantile(v, q)) if len(v) else None


def summarize(requests: pd.DataFrame, lag: np.ndarray, **extra: Any) -> dict[str, Any]:
    """What the command prints and writes to summary.json. Requests an interrupted replay never
    sent are counted apart (`not_sent`), not as failures of the server."""
    not_sent = int(requests["start_s"].isna().sum())
    requests = requests[requests["start_s"].notna()]
    ok = requests[~requests["dropped"]]

    def stats(df: pd.DataFrame) -> dict[str, Any]:
        done = df[~df["dropped"]]
        return {
            "requests": len(df),
            "answered": len(done),
            "failed": int(df["dropped"].sum()),
            "latency_p50_s": _pct(done["latency_s"], 0.5),
            "latency_p99_s": _pct(done["latency_s"], 0.99),
            "ttft_p50_s": _pct(done["ttft_s"], 0.5),
            "ttft_p99_s": _pct(done["ttft_s"], 0.99),
        }

    versions = {
        str(v): stats(requests[requests["version"] == v])
        for v in sorted(requests["version"].dropna().unique())
    }
    sent = int(np.isfinite(lag).sum())
    lags = lag[np.isfinite(lag)]
    return {
        **stats(requests),
        "sent": sent,
        "not_sent": not_sent,
        "send_lag_p50_s": float(np.quantile(lags, 0.5)) if len(lags) else None,
        "send_lag_p99_s": float(np.quantile(lags, 0.99)) if len(lags) else None,
        "send_lag_max_s": float(lags.max()) if len(lags) else None,
        "duration_s": float(requests["end_s"].max()) if len(ok) else None,
        "versions": versions,
        "errors": requests["error"].dropna().value_counts().head(5).to_dict(),
        **extra,
    }


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.0f} ms" if x < 10 else f"{x:.1f} s"


def format_summary(s: dict[str, Any]) -> str:
    counts = f"sent {s['sent']}, answered {s['answered']}, failed {s['failed']}"
    if s.get("not_sent"):
        counts += f", not sent {s['not_sent']} (interrupted)"
    if s["send_lag_p99_s"] is not None:
        counts += f"; send lag p99 {s['send_lag_p99_s'] * 1000:.1f} ms"
    lines = [
        counts,
        f"{'':<10}{'requests':>9}{'failed':>8}{'latency p50':>13}{'p99':>9}"
        f"{'TTFT p50':>10}{'p99':>9}",
    ]
    rows = [("all", s), *s["versions"].items()]
    for name, v in rows:
        lines.append(
            f"{name:<10}{v['requests']:>9}{v['failed']:>8}{_ms(v['latency_p50_s']):>13}"
            f"{_ms(v['latency_p99_s']):>9}{_ms(v['ttft_p50_s']):>10}{_ms(v['ttft_p99_s']):>9}"
        )
    for err, n in s["errors"].items():
        lines.append(f"  {n} × {err}")
    return "\n".join(lines)


# ---- the command ------------------------------------------------------------------------------


def load_command(
    trace_path: Path,
    url: str,
    *,
    time_scale: float = 1.0,
    rate_scale: float = 1.0,
    start_s: float = 0.0,
    duration_s: float | None = None,
    out: Path | None = None,
    model: str | None = None,
    timeout_s: float = 600.0,
    seed: int = 0,
) -> dict[str, Any]:
    base = check_url(url)
    trace = read_trace_csv(trace_path)
    plan = schedule(
        trace, time_scale=time_scale, rate_scale=rate_scale, start_s=start_s,
        duration_s=duration_s, seed=seed,
    )  # fmt: skip
    out_dir = (
        Path(out) if out is not None else Path("out") / f"load-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    replay = Replay(plan, base, model or "", timeout_s=timeout_s, seed=seed)

    def announce(r: Replay) -> None:
        print(
            f"replaying {len(plan)} requests over {plan.at_s[-1]:.1f} s against {base} "
            f"(model {r.model}, time scale {time_scale:g}, rate scale {rate_scale:g})",
            file=sys.stderr,
            flush=True,
        )

    interrupted = False
    try:
        _run(replay, announce)
    except KeyboardInterrupt:  # keep what was measured: requests not sent are marked so
        interrupted = True
    requests = replay.frame()
    summary = summarize(
        requests, replay.lag, url=base, model=replay.model, trace=str(trace_path),
        time_scale=time_scale, rate_scale=rate_scale, start_s=start_s, duration_s=duration_s,
        started_at=replay.started_at,
    )  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    requests.to_parquet(out_dir / "requests.parquet", index=False)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(format_summary(summary))
    print(f"wrote {out_dir / 'requests.parquet'} and summary.json", file=sys.stderr)
    if interrupted:
        raise KeyboardInterrupt
    return summary


def _run(replay: Replay, announce: Any) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    bar = Progress(
        TextColumn("replay"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[state]}"), console=console, auto_refresh=False,
        disable=not console.is_terminal,
    )  # fmt: skip
    task = bar.add_task("replay", total=len(replay.plan), state="")

    def progress(r: Replay) -> None:
        state = f"in flight {r.sent - r.done}, failed {r.failed}"
        bar.update(task, completed=r.done, state=state)
        bar.refresh()

    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop comes with ray[serve]
        runner = asyncio.run
    with bar:
        runner(replay.run(progress, announce))
