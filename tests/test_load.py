"""`rollout load`: the schedule it derives from a trace, and replays against a local server.

The server here is a small aiohttp OpenAI look-alike on 127.0.0.1 that answers slowly, so an
open-loop replay must have sent every request before the first answer comes back; some of its
answers fail on purpose (HTTP 500, a stream cut short) to check what is recorded.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from measure.load import check_url, schedule
from rollout.errors import InputError
from rollout.traces import Trace, read_trace_csv

REPO = Path(__file__).resolve().parent.parent
CODE_TRACE = REPO / "data" / "traces" / "azure_llm_2023_code.csv"


def trace(times: list[float], ctx: int = 10, gen: int = 3) -> Trace:
    n = len(times)
    return Trace(np.array(times), np.full(n, ctx), np.full(n, gen), source="t.csv")


class TestSchedule:
    def test_window_and_time_scale(self) -> None:
        t = trace([0.0, 1.0, 2.0, 3.0, 4.0])
        s = schedule(t, start_s=1.0, duration_s=2.5, time_scale=2.0)
        assert s.at_s.tolist() == [0.0, 0.5, 1.0]
        assert s.context_tokens.tolist() == [10, 10, 10]

    def test_real_trace_tokens_are_kept(self) -> None:
        real = read_trace_csv(CODE_TRACE)
        s = schedule(real, duration_s=60)
        n = int((real.arrival_s < 60).sum())
        assert len(s) == n > 50
        assert s.context_tokens.tolist() == real.context_tokens[:n].tolist()
        assert s.generated_tokens.tolist() == real.generated_tokens[:n].tolist()

    def test_rate_scale_thins_and_copies(self) -> None:
        t = trace(list(np.arange(0, 1000, 0.5)))  # 2,000 requests
        half = schedule(t, rate_scale=0.5, seed=1)
        assert abs(len(half) - 1000) < 4 * np.sqrt(2000 * 0.25)
        assert set(half.at_s.tolist()) <= set(t.arrival_s.tolist())  # thinning keeps times
        more = schedule(t, rate_scale=2.5, seed=1)
        assert abs(len(more) - 5000) < 4 * np.sqrt(2000 * 0.25)
        assert np.all(np.diff(more.at_s) >= 0) and more.at_s[-1] < 1000.5
        again = schedule(t, rate_scale=2.5, seed=1)
        assert np.array_equal(more.at_s, again.at_s)  # seeded

    @pytest.mark.parametrize(
        "kwargs,match",
        [
            ({"time_scale": 0}, "greater than 0"),
            ({"rate_scale": -1}, "greater than 0"),
            ({"duration_s": 0}, "--duration-s"),
            ({"start_s": 100}, "no request in the chosen window"),
        ],
    )
    def test_bad_scaling(self, kwargs: dict[str, float], match: str) -> None:
        with pytest.raises(InputError, match=match):
            schedule(trace([0.0, 1.0]), **kwargs)

    def test_a_trace_without_tokens(self) -> None:
        with pytest.raises(InputError, match="no ContextTokens and GeneratedTokens"):
            schedule(Trace(np.array([0.0, 1.0]), source="x.csv"))

    @pytest.mark.parametrize("url", ["127.0.0.1:8000", "ftp://h/x", "http://", "http://h/?a=1"])
    def test_bad_urls(self, url: str) -> None:
        with pytest.raises(InputError, match="--url"):
            check_url(url)
        assert check_url("http://127.0.0.1:8000/llm/") == "http://127.0.0.1:8000/llm"


# ---- a local server -------------------------------------------------------------------------


class Server:
    """OpenAI look-alike: `max_tokens` SSE events `delay_s` apart; max_tokens 13 answers 500,
    max_tokens 17 cuts its stream short; every answer names version `vX`."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.seen: list[dict] = []
        self.port = 0
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from aiohttp import web

        async def models(_: web.Request) -> web.Response:
            return web.json_response({"object": "list", "data": [{"id": "m1"}]})

        async def completions(request: web.Request) -> web.StreamResponse:
            body = await request.json()
            self.seen.append(body)
            n = body["max_tokens"]
            if n == 13:
                return web.json_response({"error": {"message": "boom"}}, status=500,
                                         headers={"x-rollout-version": "vX"})  # fmt: skip
            resp = web.StreamResponse(
                headers={"content-type": "text/event-stream", "x-rollout-version": "vX"}
            )
            await resp.prepare(request)
            await asyncio.sleep(self.delay_s)
            try:
                for i in range(n if n != 17 else 2):
                    event = json.dumps({"choices": [{"text": str(i)}]})
                    await resp.write(f"data: {event}\n\n".encode())
                    await asyncio.sleep(0.01)
                if n != 17:
                    await resp.write(b"data: [DONE]\n\n")
            except ConnectionResetError:  # the client went away (the interrupted replay)
                pass
            return resp

        async def main() -> None:
            app = web.Application()
            app.add_routes(
                [web.get("/v1/models", models), web.post("/v1/completions", completions)]
            )
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self._ready.set()
            await asyncio.Event().wait()

        asyncio.run(main())

    def start(self) -> Server:
        self._thread.start()
        assert self._ready.wait(10)
        return self


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    yield Server(delay_s=1.0).start()


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rollout.cli", "load", *args],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_open_loop_replay_records_every_request(server: Server, tmp_path: Path) -> None:
    times = [i * 0.02 for i in range(20)]  # 20 requests in 0.4 s; each answer takes ≥ 1 s
    gen = [3] * 20
    gen[5], gen[9] = 13, 17
    csv = tmp_path / "t.csv"
    pd.DataFrame({"arrival_s": times, "ContextTokens": [4 + i for i in range(20)],
                  "GeneratedTokens": gen}).to_csv(csv, index=False)  # fmt: skip
    out = tmp_path / "out"
    done = cli(str(csv), "--url", f"http://127.0.0.1:{server.port}", "--out", str(out))
    assert done.returncode == 0, done.stderr
    df = pd.read_parquet(out / "requests.parquet")
    assert list(df.columns)[:8] == [
        "arrival_s", "start_s", "end_s", "wait_s", "latency_s", "ttft_s", "version", "dropped",
    ]  # fmt: skip
    assert {"status", "error"} <= set(df.columns)
    assert len(df) == 20 and df["arrival_s"].tolist() == pytest.approx(times)
    # open loop: every request went out on time although none had been answered yet
    assert (df["start_s"] - df["arrival_s"]).abs().max() < 0.05
    assert df["start_s"].max() < df["end_s"].drop(5).min()  # (5 is answered 500 at once)
    assert df["wait_s"].isna().all()
    assert (df["version"] == "vX").all()
    assert df["dropped"].tolist() == [i in (5, 9) for i in range(20)]
    assert df.loc[5, "status"] == 500 and "HTTP 500" in df.loc[5, "error"]
    assert df.loc[9, "status"] == 200 and "without data: [DONE]" in df.loc[9, "error"]
    ok = df[~df["dropped"]]
    assert ok["error"].isna().all() and (ok["status"] == 200).all()
    assert (ok["ttft_s"] >= 1.0).all() and (ok["latency_s"] > ok["ttft_s"]).all()
    bodies = sorted(server.seen[-20:], key=lambda b: len(b["prompt"]))
    assert [len(b["prompt"]) for b in bodies] == [4 + i for i in range(20)]  # exact prompts
    assert all(b["stream"] and b["model"] == "m1" for b in bodies)
    assert [b["max_tokens"] for b in bodies] == gen
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["sent"], summary["answered"], summary["failed"]) == (20, 18, 2)
    assert summary["versions"]["vX"]["requests"] == 20
    assert summary["send_lag_p99_s"] < 0.05
    assert "sent 20, answered 18, failed 2" in done.stdout
    assert "TTFT p50" in done.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["--url", "localhost:1"], "--url must be an http:// or https:// URL"),
        (["--url", "http://127.0.0.1:9"], "cannot reach http://127.0.0.1:9"),
    ],
)
def test_bad_url_or_unreachable_server(args: list[str], message: str) -> None:
    done = cli(str(CODE_TRACE), *args)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and message in done.stderr


def test_a_trace_without_token_columns(tmp_path: Path, server: Server) -> None:
    csv = tmp_path / "times.csv"
    csv.write_text("arrival_s\n0.0\n1.0\n")
    done = cli(str(csv), "--url", f"http://127.0.0.1:{server.port}")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "no ContextTokens and GeneratedTokens" in done.stderr


def test_an_interrupted_replay_keeps_what_it_measured(server: Server, tmp_path: Path) -> None:
    import signal

    csv = tmp_path / "t.csv"
    pd.DataFrame({"arrival_s": [i * 0.1 for i in range(40)], "ContextTokens": 5,
                  "GeneratedTokens": 3}).to_csv(csv, index=False)  # fmt: skip
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "rollout.cli", "load", str(csv), "--url",
         f"http://127.0.0.1:{server.port}", "--out", str(out)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while "replaying" not in (proc.stderr.readline() if proc.stderr else ""):
        assert time.monotonic() < deadline
    time.sleep(1.5)  # about 15 sent, the first few answered (each answer takes over 1 s)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip().endswith("rollout: error: interrupted")
    df = pd.read_parquet(out / "requests.parquet")
    assert len(df) == 40
    answered = df[~df["dropped"]]
    assert 1 <= len(answered) < 10 and answered["error"].isna().all()
    errors = df["error"].value_counts()
    assert errors["not sent"] > 10 and errors["interrupted before the answer ended"] > 5
    # a request cut off while being sent is the interruption's, not the server's failure
    assert set(errors.index) == {"not sent", "interrupted before the answer ended"}
    assert df.loc[df["error"] == "not sent", "start_s"].isna().all()
    summary = json.loads((out / "summary.json").read_text())  # unsent requests are not failures
    assert summary["not_sent"] == errors["not sent"] and summary["sent"] == 40 - errors["not sent"]
    assert summary["failed"] == errors["interrupted before the answer ended"]
