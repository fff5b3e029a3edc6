"""The router's pure parts: the route table's choice and the windowed per-version metrics."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from executor.router_metrics import (
    BASE_S,
    GROWTH,
    Window,
    bucket,
    bucket_value,
    merge,
    quantile,
    status_class,
    summarize,
)
from executor.routing import RouteTable, session_point


def table(*weights: float) -> RouteTable:
    routes = [
        {"version": f"v{i}", "app": f"m_v{i}", "deployment": "D", "weight": w}
        for i, w in enumerate(weights, start=1)
    ]
    return RouteTable.from_config({"stamp": 7, "routes": routes})


class TestRouteTable:
    def test_zero_weights_are_dropped_and_none_left_means_no_route(self) -> None:
        t = table(0.0, 1.0)
        assert [r.version for r in t.routes] == ["v2"]
        assert t.stamp == 7
        assert RouteTable().pick(0.5) is None
        assert table(0.0).pick(0.1) is None

    @pytest.mark.parametrize(
        "u,want",
        [(0.0, "v1"), (0.7499, "v1"), (0.75, "v2"), (0.9999999, "v2")],
    )
    def test_intervals_follow_table_order(self, u: float, want: str) -> None:
        route = table(0.75, 0.25).pick(u)
        assert route is not None and route.version == want

    def test_weights_need_not_sum_to_one(self) -> None:
        t = table(3.0, 1.0)
        assert t.weights() == {"v1": 3.0, "v2": 1.0}
        assert t.pick(0.74).version == "v1"  # type: ignore[union-attr]
        assert t.pick(0.76).version == "v2"  # type: ignore[union-attr]

    def test_random_points_split_by_weight(self) -> None:
        rng = random.Random(3)
        t = table(0.8, 0.2)
        n = 20_000
        share = sum(t.pick(rng.random()).version == "v2" for _ in range(n)) / n  # type: ignore[union-attr]
        assert abs(share - 0.2) < 4 * math.sqrt(0.2 * 0.8 / n)

    @given(st.text(min_size=1, max_size=40))
    def test_session_points_are_stable_and_in_range(self, key: str) -> None:
        u = session_point(key)
        assert 0.0 <= u < 1.0
        assert session_point(key) == u


class TestHistogram:
    @given(st.floats(min_value=BASE_S * 1.001, max_value=1e4))
    def test_bucket_middle_is_within_two_percent(self, x: float) -> None:
        mid = bucket_value(bucket(x))
        assert abs(mid - x) / x <= math.sqrt(GROWTH) - 1 + 1e-9

    def test_quantiles_of_known_values(self) -> None:
        hist: dict[int, int] = {}
        for ms in range(1, 101):  # 1 … 100 ms
            hist[bucket(ms / 1000)] = hist.get(bucket(ms / 1000), 0) + 1
        assert quantile(hist, 0.5) == pytest.approx(0.050, rel=0.021)
        assert quantile(hist, 0.99) == pytest.approx(0.099, rel=0.021)
        assert quantile(hist, 1.0) == pytest.approx(0.100, rel=0.021)
        assert quantile({}, 0.5) is None

    @pytest.mark.parametrize(
        "status,cancelled,want",
        [(200, False, "2xx"), (418, False, "4xx"), (503, False, "5xx"), (101, False, "1xx"),
         (None, False, "error"), (200, True, "cancelled"), (999, False, "error")],
    )  # fmt: skip
    def test_status_classes(self, status: int | None, cancelled: bool, want: str) -> None:
        assert status_class(status, cancelled=cancelled) == want


class TestWindow:
    def test_ongoing_counts_rise_and_fall(self) -> None:
        w = Window()
        w.started("v1")
        w.started("v1")
        w.started("v2")
        assert w.snapshot(100.0, 60)["ongoing"] == {"v1": 2, "v2": 1}
        w.finished("v1", 100.0, status=200, ttfb_s=0.01, latency_s=0.1)
        w.finished("v2", 100.0, status=None, ttfb_s=None, latency_s=0.2)
        snap = w.snapshot(100.0, 60)
        assert snap["ongoing"] == {"v1": 1}
        assert snap["served"] == {"v1": 1, "v2": 1}

    def test_the_window_slides(self) -> None:
        w = Window(retention_s=120)
        for t in range(0, 100):  # one request a second, latency t ms
            w.started("v1")
            w.finished("v1", float(t) + 0.5, status=200, ttfb_s=0.001, latency_s=(t + 1) / 1000)
        last10 = summarize(w.snapshot(99.9, 10))["v1"]
        assert last10.requests == 10
        assert last10.latency_p50_s == pytest.approx(0.095, rel=0.03)
        assert summarize(w.snapshot(99.9, 100))["v1"].requests == 100
        w.started("v1")
        w.finished("v1", 300.0, status=200, ttfb_s=0.001, latency_s=0.5)  # expires the old
        assert summarize(w.snapshot(300.0, 120))["v1"].requests == 1

    def test_replicas_merge_exactly(self) -> None:
        """Two router replicas' snapshots merged equal one replica that saw everything."""
        rng = random.Random(5)
        one, a, b = Window(), Window(), Window()
        for _ in range(2000):
            version = rng.choice(["v1", "v2"])
            status = rng.choice([200, 200, 200, 404, 500, None])
            lat = rng.lognormvariate(-3, 1)
            ttfb = lat * rng.random()
            side = rng.choice([a, b])
            for w in (one, side):
                w.started(version)
                w.finished(version, 50.0, status=status, ttfb_s=ttfb, latency_s=lat)
        merged = merge([a.snapshot(50.0, 60), b.snapshot(50.0, 60)])
        assert summarize(merged) == summarize(one.snapshot(50.0, 60))
        v1 = summarize(merged)["v1"]
        assert v1.failures == v1.status.get("5xx", 0) + v1.status.get("error", 0)
        assert sum(v1.status.values()) == v1.requests
        assert 0 < v1.failure_rate < 1


class TestForwarding:
    """The router's request plumbing that needs no cluster."""

    @pytest.mark.parametrize(
        "headers,has",
        [
            ([], False),
            ([(b"content-length", b"0")], False),
            ([(b"content-length", b"12")], True),
            ([(b"transfer-encoding", b"chunked")], True),
            ([(b"x-other", b"1")], False),
        ],
    )
    def test_which_requests_carry_a_body(self, headers: list, has: bool) -> None:
        from executor.router import _has_body

        assert _has_body({"headers": headers}) is has

    def test_the_body_reaches_the_version_once_then_receive_waits(self) -> None:
        import asyncio
        import pickle

        from executor.router import BufferedBody

        async def main() -> list:
            body = pickle.loads(pickle.dumps(BufferedBody(b"\x00abc")))  # as a replica gets it
            first = pickle.loads(await body(None))
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(body(None), 0.05)
            return first

        assert asyncio.run(main()) == [{"type": "http.request", "body": b"\x00abc",
                                        "more_body": False}]  # fmt: skip

    def test_the_version_header_and_answers_of_its_own(self) -> None:
        import asyncio
        import json

        from executor.router import VERSION_HEADER, _answer

        sent: list = []

        async def send(msg: dict) -> None:
            sent.append(msg)

        asyncio.run(_answer(send, 503, {"error": "no version is ready to serve"}))
        asyncio.run(_answer(send, 500, {"error": "x"}, "v2"))
        assert sent[0]["status"] == 503 and VERSION_HEADER not in dict(sent[0]["headers"])
        assert json.loads(sent[1]["body"]) == {"error": "no version is ready to serve"}
        assert dict(sent[2]["headers"])[VERSION_HEADER] == b"v2"


def test_guard_traffic_converts_the_merged_window_per_role():
    from executor.router_metrics import guard_traffic
    from rollout.guard import Traffic

    a, b = Window(), Window()
    for w, n in ((a, 30), (b, 10)):  # two router replicas
        for i in range(n):
            w.started("v2")
            status = 500 if i % 5 == 0 else 200
            w.finished("v2", 100.0, status=status, ttfb_s=0.01, latency_s=0.5 if i else 2.0)
    a.started("v1")
    a.finished("v1", 100.0, status=404, ttfb_s=None, latency_s=0.1)
    merged = merge([a.snapshot(100.0, 60), b.snapshot(100.0, 60)])
    got = guard_traffic(merged, {"current": "v1", "candidate": "v2", "none": None})
    cand = got["candidate"]
    assert (cand.requests, cand.failures) == (40, 8)  # 500s fail; the current's 404 does not
    assert cand.latency_p99_s == pytest.approx(2.0, rel=0.02)  # the two 2 s answers are the top 5 %
    assert cand.ttft_p99_s == pytest.approx(0.01, rel=0.02)
    assert (got["current"].requests, got["current"].failures) == (1, 0)
    assert got["current"].ttft_p99_s is None
    assert got["none"] == Traffic()
