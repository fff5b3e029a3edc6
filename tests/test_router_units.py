"""The router without a cluster: the route table's choice (by weight and by session), path
rewriting, the windowed per-version metrics, and the proxy middleware driven with a fake Serve
app and store."""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from executor.router import Router
from executor.router_metrics import (
    BASE_S,
    GROWTH,
    Window,
    bucket,
    bucket_value,
    merge,
    quantile,
    session_counts,
    split,
    status_class,
    summarize,
)
from executor.routing import (
    RouteTable,
    Sticky,
    hidden_prefix,
    model_for,
    public_location,
    rewrite_path,
    under,
)
from rollout.sticky import session_point


def table(*weights: float) -> RouteTable:
    routes = [
        {"version": f"v{i}", "app": f"m_v{i}", "weight": w} for i, w in enumerate(weights, start=1)
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


def sticky_table(session_weight: float, *weights: float, **sticky: object) -> RouteTable:
    """v1 (current) and v2 (candidate) with these weights and sticky sessions on."""
    routes = [
        {"version": f"v{i}", "app": f"m_v{i}", "weight": w} for i, w in enumerate(weights, start=1)
    ]
    sessions = {"header": "x-session-id", "cookie": None, "max_age_s": 60.0,
                "candidate": "v2", "weight": session_weight, **sticky}  # fmt: skip
    return RouteTable.from_config({"stamp": 1, "routes": routes, "sessions": sessions})


class TestStickyRoutes:
    @pytest.mark.parametrize(
        "headers,key",
        [
            ([(b"x-session-id", b" abc ")], "abc"),
            ([(b"x-session-id", b"")], None),
            ([(b"cookie", b"a=1; sid=xyz; b=2")], "xyz"),
            ([(b"cookie", b'sid="q"')], "q"),
            ([(b"x-session-id", b"h"), (b"cookie", b"sid=c")], "h"),
            ([(b"cookie", b"sidx=1")], None),
            ([], None),
        ],
    )
    def test_the_key_is_the_header_else_the_cookie(self, headers: list, key: str | None) -> None:
        sticky = Sticky.from_config(
            {
                "header": "x-session-id",
                "cookie": "sid",
                "max_age_s": 60,
                "candidate": "v2",
                "weight": 0.5,
            }
        )
        assert sticky is not None and sticky.key(headers) == key

    def test_off_without_sessions_in_the_config(self) -> None:
        assert table(0.5, 0.5).sticky is None
        assert table(0.5, 0.5).pick_session("k") is None

    def test_a_session_is_on_the_candidate_below_the_session_weight(self) -> None:
        keys = [f"s{i}" for i in range(2000)]
        for sw in (0.0, 0.1, 0.5, 0.9, 1.0):
            t = sticky_table(sw, 1 - sw or 1e-3, sw or 1e-3)
            on = [k for k in keys if t.pick_session(k).version == "v2"]  # type: ignore[union-attr]
            assert on == [k for k in keys if session_point(k) < sw]

    def test_forward_only_as_the_session_weight_grows(self) -> None:
        keys = [f"s{i}" for i in range(500)]
        seen: set[str] = set()
        for sw in (0.1, 0.25, 0.5, 0.75, 1.0):
            t = sticky_table(sw, 1 - sw or 1e-3, sw)
            now = {k for k in keys if t.pick_session(k).version == "v2"}  # type: ignore[union-attr]
            assert seen <= now
            seen = now
        assert len(seen) == len(keys)

    def test_a_version_without_a_route_sends_its_sessions_to_the_other(self) -> None:
        """The candidate lost its last ready replica (weight 0): its sessions go to v1; and a
        first deploy (no current version) sends every session to the candidate."""
        no_candidate = sticky_table(0.6, 1.0, 0.0)
        assert {no_candidate.pick_session(f"s{i}").version for i in range(100)} == {"v1"}  # type: ignore[union-attr]
        routes = [{"version": "v2", "app": "m_v2", "weight": 1.0}]
        only = RouteTable.from_config({"routes": routes, "sessions": {"candidate": "v2"}})
        assert {only.pick_session(f"s{i}").version for i in range(100)} == {"v2"}  # type: ignore[union-attr]
        assert RouteTable.from_config({"sessions": {"candidate": "v2"}}).pick_session("k") is None


class TestSessionCounts:
    def test_sessions_expire_after_max_age_and_keys_are_not_kept(self) -> None:
        w = Window()
        w.session("secret-1", "v1", 0.0, 60.0)
        w.session("secret-2", "v2", 30.0, 60.0)
        w.session("secret-1", "v2", 50.0, 60.0)  # moved forward
        snap = w.snapshot(50.0, 60)
        assert session_counts(snap) == {"v2": 2}
        assert "secret" not in str(snap)
        w.session("secret-3", "v1", 100.0, 60.0)  # secret-2's last request was 70 s ago
        assert session_counts(w.snapshot(100.0, 60)) == {"v1": 1, "v2": 1}

    def test_merge_counts_a_session_seen_by_both_replicas_once_at_its_latest(self) -> None:
        a, b = Window(), Window()
        a.session("s1", "v1", 10.0, 600.0)
        b.session("s1", "v2", 20.0, 600.0)
        b.session("s2", "v1", 5.0, 600.0)
        merged = merge([a.snapshot(20.0, 60), b.snapshot(20.0, 60)])
        assert session_counts(merged) == {"v1": 1, "v2": 1}

    def test_split_gives_shares_of_requests_and_sessions(self) -> None:
        w = Window()
        for i in range(4):
            w.started("v1" if i else "v2")
            w.finished("v1" if i else "v2", 10.0, status=200, ttfb_s=0.01, latency_s=0.1)
        w.session("s1", "v2", 10.0, 60.0)
        w.session("s2", "v1", 10.0, 60.0)
        assert split(w.snapshot(10.0, 60)) == {
            "v1": {"requests": 0.75, "sessions": 0.5},
            "v2": {"requests": 0.25, "sessions": 0.5},
        }


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

    def test_a_gone_version_is_forgotten(self) -> None:
        w = Window()
        for version in ("v1", "v2", "v2"):
            w.started(version)
            w.finished(version, 100.0, status=500, ttfb_s=0.01, latency_s=0.1)
        w.started("v2")  # in flight when v2's application goes
        w.forget(frozenset({"v1"}))
        snap = w.snapshot(100.0, 60)
        assert set(snap["versions"]) == {"v1"} and snap["served"] == {"v1": 1}
        assert snap["ongoing"] == {"v2": 1}

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


class TestPaths:
    @pytest.mark.parametrize(
        "path,prefix,want",
        [("/a", "/a", True), ("/a/b", "/a", True), ("/ab", "/a", False), ("/", "/a", False),
         ("/x", "/", True), ("/", "/", True), ("/a/b/c", "/a/b", True)],
    )  # fmt: skip
    def test_prefixes_match_as_serve_matches_them(self, path: str, prefix: str, want: bool) -> None:
        assert under(path, prefix) is want

    def test_the_longest_public_prefix_wins_and_hidden_paths_are_nobodys(self) -> None:
        root = RouteTable(model="root", prefix="/")
        chat = RouteTable(model="chat", prefix="/chat")
        tables = [root, chat]
        assert model_for(tables, "/chat/v1/completions") is chat
        assert model_for(tables, "/chatty") is root
        assert model_for(tables, "/") is root
        assert model_for(tables, hidden_prefix("chat_v1") + "/x") is None
        assert model_for(tables, "/_rollout") is None
        assert model_for(tables, "/-/healthz") is None and model_for(tables, "/-/routes") is None
        assert model_for([chat], "/other") is None

    @pytest.mark.parametrize(
        "path,public,want",
        [("/chat/v1/models", "/chat", "/_rollout/c_v1/v1/models"),
         ("/chat", "/chat", "/_rollout/c_v1"),
         ("/chat/", "/chat", "/_rollout/c_v1/"),
         ("/v1/models", "/", "/_rollout/c_v1/v1/models"),
         ("/", "/", "/_rollout/c_v1/")],
    )  # fmt: skip
    def test_paths_move_below_the_versions_prefix(self, path: str, public: str, want: str) -> None:
        assert rewrite_path(path, public, hidden_prefix("c_v1")) == want

    @pytest.mark.parametrize(
        "location,public,want",
        [("http://h:8000/_rollout/c_v1/items/?a=1", "/chat", "http://h:8000/chat/items/?a=1"),
         ("/_rollout/c_v1/items", "/chat", "/chat/items"),
         ("/_rollout/c_v1", "/chat", "/chat"),
         ("/_rollout/c_v1/x", "/", "/x"),
         ("/_rollout/c_v1", "/", "/"),
         ("hello?name=moved", "/chat", "hello?name=moved"),
         ("https://example.com/docs", "/chat", "https://example.com/docs"),
         ("/_rollout/c_v10/x", "/chat", "/_rollout/c_v10/x")],
    )  # fmt: skip
    def test_redirects_to_the_versions_prefix_name_the_public_one(
        self, location: str, public: str, want: str
    ) -> None:
        assert public_location(location, hidden_prefix("c_v1"), public) == want


# ---- the middleware, in front of a fake Serve proxy app -----------------------------------------


class FakeStore:
    """Route tables and reports in memory, as the proxy would see Ray's key-value store."""

    def __init__(self, tables: dict[str, dict]) -> None:
        self.raw = {f"table/{k}": json.dumps(v).encode() for k, v in tables.items()}
        self.epoch_value = b"1"
        self.reads = 0
        self.reports: list[dict] = []

    def load(self) -> dict[str, bytes]:
        return dict(self.raw)

    def publish(self, report: bytes) -> None:
        self.reports.append(json.loads(report))

    async def epoch(self) -> bytes | None:
        return self.epoch_value

    async def tables(self) -> dict[str, bytes]:
        self.reads += 1
        return dict(self.raw)

    async def publish_async(self, report: bytes) -> None:
        self.publish(report)


class FakeServe:
    """Serve's proxy app: its route table, and an answer recording the scope it was given."""

    def __init__(self, prefixes: list[str], status: int = 200, stream: int = 1,
                 location: str | None = None, finish: bool = True) -> None:  # fmt: skip
        self.prefixes, self.status, self.stream = prefixes, status, stream
        self.location, self.finish = location, finish
        self.scopes: list[dict] = []

    def match_route(self, path: str) -> tuple[str, object, bool] | None:
        hits = [p for p in self.prefixes if under(path, p)]
        return (max(hits, key=len), object(), False) if hits else None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        self.scopes.append(scope)
        if scope["type"] == "websocket":
            await send({"type": "websocket.accept", "headers": [(b"x-w", b"1")]})
            return
        headers = [(b"content-type", b"text/plain")]
        if self.location:
            headers.append((b"location", self.location.encode()))
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        for i in range(self.stream):
            await send({"type": "http.response.body", "body": b"%d" % i, "more_body": True})
        if self.finish:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        else:
            assert (await receive())["type"] == "http.disconnect"


def chat_table(weights: dict[str, float], stamp: int = 3) -> dict:
    routes = [{"version": v, "app": f"chat_{v}", "weight": w} for v, w in weights.items()]
    return {"model": "chat", "prefix": "/chat", "stamp": stamp, "routes": routes, "window_s": 30}


def middleware(serve: FakeServe, store: FakeStore) -> Router:
    return Router(serve, store=store, routes=serve)


def call(
    router: Router,
    path: str,
    *,
    kind: str = "http",
    raw: bool = True,
    disconnect: bool = False,
    headers: list | None = None,
) -> tuple[list[dict], dict]:
    scope: dict[str, Any] = {
        "type": kind,
        "path": path,
        "root_path": "",
        "headers": headers or [],
        "query_string": b"a=1",
    }
    if raw:
        scope["raw_path"] = path.encode()
    sent: list[dict] = []

    async def receive() -> dict:
        if disconnect:
            return {"type": "http.disconnect"}
        await asyncio.sleep(10)
        return {}

    async def send(msg: dict) -> None:
        sent.append(msg)

    asyncio.run(router(scope, receive, send))
    return sent, scope


HIDDEN = ["/_rollout/chat_v1", "/_rollout/chat_v2"]


class TestMiddleware:
    def test_a_request_goes_to_the_versions_prefix_and_comes_back_labelled(self) -> None:
        serve = FakeServe(HIDDEN, stream=3, location="http://h/_rollout/chat_v1/items/")
        store = FakeStore({"chat": chat_table({"v1": 1.0})})
        router = middleware(serve, store)
        sent, scope = call(router, "/chat/v1/models")
        inner = serve.scopes[0]
        assert inner["path"] == "/_rollout/chat_v1/v1/models"
        assert inner["raw_path"] == b"/_rollout/chat_v1/v1/models"
        assert inner["query_string"] == b"a=1" and inner["root_path"] == ""
        assert scope["path"] == "/chat/v1/models"  # the caller's scope is left as it was
        start = sent[0]
        assert start["status"] == 200
        assert (b"x-rollout-version", b"v1") in start["headers"]
        assert (b"location", b"http://h/chat/items/") in start["headers"]
        assert [m.get("body") for m in sent[1:]] == [b"0", b"1", b"2", b""]
        snap = router.windows["chat"].snapshot(time.time(), 30)
        assert snap["served"] == {"v1": 1} and snap["ongoing"] == {}
        assert snap["versions"]["v1"]["status"] == {"2xx": 1}
        assert store.reports[0]["models"]["chat"]["stamp"] == 3  # reported before serving

    def test_weights_split_the_requests(self) -> None:
        serve = FakeServe(HIDDEN)
        router = middleware(serve, FakeStore({"chat": chat_table({"v1": 0.75, "v2": 0.25})}))
        random.seed(11)
        for _ in range(400):
            call(router, "/chat/x")
        share = sum(s["path"].startswith("/_rollout/chat_v2/") for s in serve.scopes) / 400
        assert abs(share - 0.25) < 4 * math.sqrt(0.25 * 0.75 / 400)

    def test_no_version_taking_traffic_is_a_503_of_the_routers_own(self) -> None:
        serve = FakeServe(HIDDEN)
        sent, _ = call(middleware(serve, FakeStore({"chat": chat_table({})})), "/chat/x")
        assert sent[0]["status"] == 503 and not serve.scopes
        assert json.loads(sent[1]["body"]) == {"error": "no version is ready to serve"}
        assert b"x-rollout-version" not in dict(sent[0]["headers"])

    def test_a_version_serve_does_not_route_yet_is_not_sent_a_request(self) -> None:
        serve = FakeServe(["/"])  # an application at "/" would otherwise take it
        sent, _ = call(middleware(serve, FakeStore({"chat": chat_table({"v1": 1})})), "/chat/x")
        assert sent[0]["status"] == 503 and not serve.scopes
        assert json.loads(sent[1]["body"])["error"] == "version v1 is not routed by Serve yet"

    def test_other_paths_and_longer_serve_prefixes_pass_untouched(self) -> None:
        serve = FakeServe([*HIDDEN, "/chat/admin"])
        router = middleware(serve, FakeStore({"chat": chat_table({"v1": 1.0})}))
        for path in ("/chat/admin/x", "/other", "/_rollout/chat_v1/x", "/-/healthz"):
            sent, scope = call(router, path)
            assert serve.scopes[-1] is scope
            assert b"x-rollout-version" not in dict(sent[0]["headers"])
        assert router.windows == {}

    def test_a_client_that_leaves_is_counted_cancelled_and_a_cut_answer_an_error(self) -> None:
        serve = FakeServe(HIDDEN, finish=False)
        router = middleware(serve, FakeStore({"chat": chat_table({"v1": 1.0})}))
        call(router, "/chat/x", disconnect=True)
        statuses = router.windows["chat"].snapshot(time.time(), 30)["versions"]["v1"]["status"]
        assert statuses == {"cancelled": 1}

    def test_websockets_are_routed_too(self) -> None:
        serve = FakeServe(HIDDEN)
        router = middleware(serve, FakeStore({"chat": chat_table({"v1": 1.0})}))
        sent, _ = call(router, "/chat/ws", kind="websocket", raw=False)
        assert serve.scopes[0]["path"] == "/_rollout/chat_v1/ws"
        assert sent[0]["type"] == "websocket.accept"
        assert sent[0]["headers"] == [(b"x-w", b"1"), (b"x-rollout-version", b"v1")]

    def test_new_weights_are_read_when_the_epoch_moves_and_reported(self) -> None:
        store = FakeStore({"chat": chat_table({"v1": 1.0})})
        router = middleware(FakeServe(HIDDEN), store)
        asyncio.run(router.step())
        assert store.reads == 1  # the epoch differs from none at first
        asyncio.run(router.step())
        assert store.reads == 1  # unchanged epoch: the tables are not read again
        store.raw["table/chat"] = json.dumps(chat_table({"v1": 0.5, "v2": 0.5}, 4)).encode()
        store.epoch_value = b"2"
        asyncio.run(router.step())
        assert router.tables["chat"].weights() == {"v1": 0.5, "v2": 0.5}
        assert store.reports[-1]["models"]["chat"]["stamp"] == 4
        del store.raw["table/chat"]
        store.epoch_value = b"3"
        asyncio.run(router.step())
        assert router.tables == {} and store.reports[-1]["models"] == {}

    def test_a_session_keeps_its_version_and_is_counted_once(self) -> None:
        sessions = {"header": "x-session-id", "cookie": None, "max_age_s": 60.0,
                    "candidate": "v2", "weight": 0.5}  # fmt: skip
        store = FakeStore({"chat": {**chat_table({"v1": 0.5, "v2": 0.5}), "sessions": sessions}})
        serve = FakeServe(HIDDEN)
        router = middleware(serve, store)
        keys = [f"user-{i}" for i in range(40)]
        for _ in range(3):
            for k in keys:
                call(router, "/chat/x", headers=[(b"x-session-id", k.encode())])
        got = [s["path"].split("/")[2] for s in serve.scopes]
        want = ["chat_v2" if session_point(k) < 0.5 else "chat_v1" for k in keys]
        assert got == want * 3  # every request of a session to its assigned version
        assert 0 < want.count("chat_v2") < len(keys)
        router._metrics_at = 0.0  # the window is recomputed for the next report
        report = json.loads(router._report())["models"]["chat"]
        assert session_counts(report) == {"v1": want.count("chat_v1"), "v2": want.count("chat_v2")}

    def test_a_table_forgets_the_metrics_of_versions_that_are_gone(self) -> None:
        store = FakeStore({"chat": {**chat_table({"v1": 0.5, "v2": 0.5}), "live": ["v1", "v2"]}})
        router = middleware(FakeServe(HIDDEN), store)
        for _ in range(20):
            call(router, "/chat/x")
        store.raw["table/chat"] = json.dumps(
            {**chat_table({"v1": 1.0}, 4), "live": ["v1"]}
        ).encode()
        store.epoch_value = b"2"
        asyncio.run(router.step())
        assert set(router.windows["chat"].snapshot(time.time(), 30)["versions"]) == {"v1"}

    def test_outside_a_serve_proxy_it_says_what_is_missing(self) -> None:
        with pytest.raises(RuntimeError, match="RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"):
            Router(object(), store=FakeStore({}))


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
