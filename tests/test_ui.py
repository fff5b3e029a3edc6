"""`rollout ui` without a cluster: the real server in a subprocess, over real HTTP — its
authentication, CSRF protection, 404 pages, simulated runs, `/metrics`, a port in use — and the
pure pieces (chart samples, which controls apply, the Prometheus metrics).

The dashboard on a real rollout, in a real browser, is in test_ui_browser.py.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from executor_fixtures import REPO, free_port
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from test_sim_cli import small_scenario

from executor.metrics import RolloutMetrics
from rollout.scenario import load_scenario
from sim.api import simulate, write_outputs
from ui import series

TOKEN = "test-token-0123456789"


def simulated_run(folder: Path, name: str = "small", **changes: object) -> Path:
    """A real `rollout simulate` output folder from a small synthetic scenario."""
    folder.mkdir(parents=True, exist_ok=True)
    write_outputs(
        simulate(load_scenario(small_scenario(folder, name=name, **changes))), folder / name
    )
    return folder / name


@dataclass
class Server:
    port: int
    proc: subprocess.Popen[str]
    url_line: str

    def request(
        self,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
        cookie: bool = True,
    ) -> tuple[int, dict[str, str], str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        h = dict(headers or {})
        if cookie:
            h.setdefault("Cookie", self.cookie)
        conn.request(method, path, headers=h)
        r = conn.getresponse()
        body = r.read().decode()
        conn.close()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, body

    @property
    def cookie(self) -> str:
        _, headers, _ = self.request("GET", f"/?token={TOKEN}", cookie=False)
        return headers["set-cookie"].split(";", 1)[0]


def start_ui(cwd: Path, home: Path, *args: str) -> Server:
    port = free_port()
    env = dict(os.environ, ROLLOUT_HOME=str(home), ROLLOUT_UI_TOKEN=TOKEN, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "rollout.cli", "ui", "--port", str(port), *args],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("rollout ui: http://127.0.0.1:"), line + proc.stderr.read()
    return Server(port, proc, line.strip())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`rollout ui RUNS` in a folder whose out/ holds one run; RUNS holds another."""
    tmp = tmp_path_factory.mktemp("ui")
    simulated_run(tmp / "out", "found")
    simulated_run(tmp / "given", "named", rollout={"at_s": 60, "policy": {"max_surge_percent": 50}})
    s = start_ui(tmp, tmp / "home", str(tmp / "given"))
    try:
        yield s
    finally:
        s.proc.terminate()
        s.proc.wait(10)


# ---- the server -----------------------------------------------------------------------------


def test_prints_one_url_with_the_token_and_serves_loopback_only(server: Server) -> None:
    assert server.url_line == f"rollout ui: http://127.0.0.1:{server.port}/?token={TOKEN}"
    listening = [  # /proc/net/tcp: local address as hex IP:port, state 0A = LISTEN
        line.split()[1]
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
        if line.split()[3] == "0A" and line.split()[1].endswith(f":{server.port:04X}")
    ]
    assert listening == [f"0100007F:{server.port:04X}"]  # 127.0.0.1 only
    assert f":{server.port:04X}" not in Path("/proc/net/tcp6").read_text()


def test_the_token_in_the_url_becomes_an_httponly_cookie(server: Server) -> None:
    status, headers, _ = server.request("GET", f"/rollouts/x?token={TOKEN}&a=1", cookie=False)
    assert status == 303
    assert headers["location"] == "/rollouts/x?a=1"  # the token leaves the address bar
    cookie = headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    assert TOKEN.lower() not in cookie  # the cookie holds a value derived from it
    status, _, _ = server.request("GET", "/?token=wrong", cookie=False)
    assert status == 401


def test_nothing_is_served_without_the_token(server: Server) -> None:
    for path in ("/", "/api/rollouts", "/static/app.js", "/rollouts/x"):
        status, _, _ = server.request("GET", path, cookie=False)
        assert status == 401, path
    status, _, body = server.request(
        "GET", "/api/rollouts", {"Authorization": f"Bearer {TOKEN}"}, cookie=False
    )
    assert status == 200 and json.loads(body)["rollouts"] == []


def test_controls_need_the_csrf_value_and_the_same_origin(server: Server) -> None:
    path = "/api/rollouts/nope/controls/pause"
    status, _, body = server.request("POST", path)
    assert status == 403 and "CSRF" in body
    _, _, page = server.request("GET", "/")
    csrf = page.split('name="csrf" content="', 1)[1].split('"', 1)[0]
    foreign = {"X-CSRF-Token": csrf, "Origin": "http://evil.example"}
    assert server.request("POST", path, foreign)[0] == 403
    own = {"X-CSRF-Token": csrf, "Origin": f"http://127.0.0.1:{server.port}"}
    status, _, body = server.request("POST", path, own)
    assert status == 404 and json.loads(body)["error"] == "unknown rollout id 'nope'"
    status, _, body = server.request("POST", "/api/rollouts/nope/controls/explode", own)
    assert status == 400 and "unknown control" in body
    # a script holding the token needs no CSRF value
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    assert server.request("POST", path, bearer, cookie=False)[0] == 404
    assert server.request("GET", path)[0] == 405  # controls are POSTs only


def test_unknown_rollout_and_run_give_404_pages(server: Server) -> None:
    status, headers, body = server.request("GET", "/rollouts/<img%20src=x%20onerror=alert(1)>")
    assert status == 404 and headers["content-type"].startswith("text/html")
    assert "No rollout &#x27;&lt;img src=x onerror=alert(1)&gt;&#x27; in the store." in body
    assert "<img" not in body
    assert server.request("GET", "/runs/0000")[0] == 404
    assert server.request("GET", "/no/such/page")[0] == 404
    status, _, body = server.request("GET", "/api/rollouts/nope")
    assert status == 404 and json.loads(body) == {"error": "unknown rollout id 'nope'"}


def test_lists_simulated_runs_from_given_folders_and_out(server: Server) -> None:
    status, _, body = server.request("GET", "/api/rollouts")
    runs = {r["name"].rsplit("/", 1)[-1]: r for r in json.loads(body)["runs"]}
    assert set(runs) == {"found", "named"}
    assert runs["found"]["name"] == "out/found"  # relative to where `rollout ui` runs
    assert runs["named"]["policy"] == "surge=50 stab=0"
    assert runs["found"]["outcome"] == "succeeded"
    status, _, body = server.request("GET", f"/api/runs/{runs['named']['key']}")
    run = json.loads(body)
    assert status == 200
    assert run["t0"] == pytest.approx(run["summary"]["rollout_start_s"])
    assert run["t0"] >= 60
    timeline = [s for s in run["samples"] if "replicas" in s]
    assert timeline[0]["replicas"]["current"]["ready"] == 4
    assert timeline[-1]["replicas"]["candidate"]["ready"] == 4
    assert timeline[-1]["weight"] == 1.0
    windows = [s for s in run["samples"] if "latency_p99" in s]
    assert windows and any("candidate" in s["latency_p99"] for s in windows)
    assert run["events"][0]["kind"] == "rollout_started"
    assert server.request("GET", f"/runs/{runs['named']['key']}")[0] == 200


def test_metrics_are_open_on_loopback(server: Server) -> None:
    status, headers, body = server.request("GET", "/metrics", cookie=False)
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert "# TYPE rollout_controls_received_total counter" in body
    assert "# TYPE rollout_action_seconds histogram" in body


def test_the_page_and_its_charting_library_are_served_locally(server: Server) -> None:
    _, _, page = server.request("GET", "/")
    assert "http://" not in page and "https://" not in page  # nothing from a CDN
    status, _, js = server.request("GET", "/static/vendor/uPlot.iife.min.js")
    assert status == 200 and "uPlot" in js


def rollout_ui(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, ROLLOUT_HOME=str(tmp_path), PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "rollout.cli", "ui", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_a_port_in_use_is_one_line_and_exit_2(server: Server, tmp_path: Path) -> None:
    out = rollout_ui(tmp_path, "--port", str(server.port))
    assert out.returncode == 2
    assert out.stderr == (
        f"rollout: error: port {server.port} on 127.0.0.1 is in use; choose another with --port\n"
    )
    out = rollout_ui(tmp_path, "--port", "70000")
    assert out.returncode == 2
    assert out.stderr.startswith("rollout: error: cannot listen on 127.0.0.1 port 70000: ")
    assert out.stderr.count("\n") == 1


# ---- pure pieces ----------------------------------------------------------------------------

STATUS = {
    "id": "chat-v2-1",
    "app": "chat",
    "from_version": "v1",
    "to_version": "v2",
    "kind": "rollout",
    "state": "progressing",
    "stage": "stabilize",
    "step": 1,
    "steps": 3,
    "candidate_weight": 0.25,
    "replicas": {
        "v1": {"target": 3, "ready": 3, "starting": 0, "draining": 1, "pending_gpu": 0},
        "v2": {"target": 2, "ready": 1, "starting": 1, "draining": 0, "pending_gpu": 1},
    },
    "updated_at": 1000.0,
}


def test_a_status_becomes_a_sample_by_role_with_gpus_held() -> None:
    s = series.sample(STATUS, {"v1": 1.0, "v2": 0.5})
    assert s["replicas"] == {
        "current": {"ready": 3, "starting": 0, "draining": 1},
        "candidate": {"ready": 1, "starting": 1, "draining": 0},
    }
    # v1: 3 ready + 1 draining = 4 GPUs; v2: 1 ready + 1 starting − 1 waiting for a GPU = 0.5
    assert s["gpus"] == 4.5
    assert s["weight"] == 0.25 and s["t"] == 1000.0
    assert "latency_p99" not in s
    window = {"latency_p99_s": 0.8, "ttfb_p99_s": 0.2}
    routed = {**STATUS, "router": {"versions": {"v2": {"window": window}}}}
    got = series.sample(routed, {})
    assert got["latency_p99"] == {"candidate": 0.8} and got["ttft_p99"] == {"candidate": 0.2}
    begun = {**STATUS, "replicas": {"v1": {"target": 3}, "v2": {"target": 0}}}
    assert series.sample(begun, {})["replicas"] == {}  # targets alone: nothing observed yet
    assert "gpus" not in series.sample(begun, {})
    assert series.changed(s, {**s, "t": 2000.0}) is False
    assert series.changed(s, {**s, "weight": 0.5}) is True


def control_events(*pairs: tuple[str, str]) -> list[dict[str, object]]:
    return [{"t": 1.0, "kind": kind, "control": ctl} for kind, ctl in pairs]


@pytest.mark.parametrize(
    "status,events,enabled",
    [
        ({}, [], {"pause", "cancel", "force_cancel", "roll_forward"}),
        ({"state": "paused"}, [], {"resume", "cancel", "force_cancel", "roll_forward"}),
        (  # a pause waits for the step boundary: it can be taken back with resume
            {},
            control_events(("control_received", "pause")),
            {"resume", "cancel", "force_cancel", "roll_forward"},
        ),
        (
            {},
            control_events(("control_received", "pause"), ("control_applied", "resume")),
            {"pause", "cancel", "force_cancel", "roll_forward"},
        ),
        (
            {},
            control_events(("control_received", "cancel"), ("control_applied", "cancel")),
            {"pause", "force_cancel", "roll_forward"},
        ),
        ({}, control_events(("control_received", "roll_forward")), {"cancel", "force_cancel"}),
        ({"stage": "rollback"}, [], set()),
        ({"state": "succeeded"}, [], set()),
        ({"state": "pending"}, [], set()),
        ({"kind": "first deploy"}, [], {"cancel", "force_cancel"}),
    ],
)
def test_which_controls_apply(
    status: dict[str, object], events: list[dict[str, object]], enabled: set[str]
) -> None:
    got = series.available_controls({**STATUS, **status}, events)
    assert set(got) == set(series.CONTROLS)
    assert {k for k, v in got.items() if v} == enabled


def scrape(registry: CollectorRegistry) -> dict[tuple[str, frozenset], float]:
    """Every sample of the exposition text, by name and labels."""
    text = generate_latest(registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def at(name: str, **labels: str) -> tuple[str, frozenset]:
    return name, frozenset({"rollout": "chat-v2-1", "app": "chat", **labels}.items())


def test_metrics_follow_status_and_events() -> None:
    registry = CollectorRegistry()
    m = RolloutMetrics(registry)
    events = [
        {"t": 1, "kind": "control_received", "control": "pause"},
        {"t": 2, "kind": "control_applied", "control": "pause"},
        {"t": 3, "kind": "action_applied", "action": "weight 0.25", "seconds": 0.4},
        {"t": 3, "kind": "action_applied", "action": "scale candidate 2", "seconds": 0.02},
    ]
    m.observe({**STATUS, "state": "paused"}, events)
    m.observe({**STATUS, "state": "paused"}, events[:1])
    got = scrape(registry)
    assert got[at("rollout_phase", phase="paused")] == 1.0
    assert got[at("rollout_phase", phase="progressing")] == 0.0
    assert got[at("rollout_candidate_weight")] == 0.25
    assert got[at("rollout_step")] == 1.0 and got[at("rollout_steps")] == 3.0
    assert got[at("rollout_replicas", version="v1", state="draining")] == 1.0
    assert got[at("rollout_replicas", version="v2", state="pending_gpu")] == 1.0
    assert got[at("rollout_replicas_target", version="v2")] == 2.0
    assert got[at("rollout_status_updated_timestamp_seconds")] == 1000.0
    assert got[at("rollout_controls_received_total", control="pause")] == 2.0
    assert got[at("rollout_controls_applied_total", control="pause")] == 1.0
    assert got[at("rollout_actions_applied_total", action="weight")] == 1.0
    assert got[at("rollout_action_seconds_bucket", action="weight", le="0.5")] == 1.0
    assert got[at("rollout_action_seconds_bucket", action="weight", le="0.25")] == 0.0
    assert got[at("rollout_action_seconds_count", action="scale")] == 1.0
    assert not [k for k in got if k[0].startswith("rollout_router")]  # the router reported none


def test_router_reports_become_counters_and_histograms() -> None:
    registry = CollectorRegistry()
    m = RolloutMetrics(registry)
    latency = {"buckets": [[0.1, 800], [0.5, 1400], ["+Inf", 1520]], "sum": 310}
    ttfb = {"buckets": [[0.05, 900], [1.0, 1500]], "sum": 80}
    v2 = {"requests_total": 1520, "failures_total": 3, "latency_seconds": latency}
    report = {"versions": {"v2": {**v2, "ttfb_seconds": ttfb}}}
    m.observe({**STATUS, "router": report}, [])
    got = scrape(registry)
    assert got[at("rollout_router_requests_total", version="v2")] == 1520
    assert got[at("rollout_router_failures_total", version="v2")] == 3
    h = "rollout_router_request_duration_seconds"
    assert got[at(f"{h}_bucket", version="v2", le="0.5")] == 1400
    assert got[at(f"{h}_count", version="v2")] == 1520
    assert got[at(f"{h}_sum", version="v2")] == 310
    # a report without its +Inf bucket gets one equal to the last
    h = "rollout_router_time_to_first_byte_seconds"
    assert got[at(f"{h}_bucket", version="v2", le="+Inf")] == 1500


def test_run_payload_starts_at_the_rollout(tmp_path: Path) -> None:
    from ui.source import find_runs, read_run

    folder = simulated_run(tmp_path / "runs")
    (tmp_path / "runs" / "broken").mkdir()
    (tmp_path / "runs" / "broken" / "summary.json").write_text("{}")  # no timeline: not a run
    runs = find_runs([tmp_path / "runs", tmp_path / "missing"])
    assert [r.path for r in runs.values()] == [folder]
    data = read_run(next(iter(runs.values())))
    payload = series.run_payload(data.summary, data.timeline, data.events, data.requests)
    assert payload["t0"] == data.summary["rollout_start_s"] == data.events[0]["t"]
    ts = [s["t"] for s in payload["samples"]]
    assert ts == sorted(ts)
    assert sum("replicas" in s for s in payload["samples"]) == len(data.timeline)


def test_failed_requests_stay_out_of_the_latency_windows(tmp_path: Path) -> None:
    """Crashed replicas fail their requests in flight (no latency): the page's p99 windows are
    over served requests only, so every value is a number."""
    from ui.source import find_runs, read_run

    simulated_run(
        tmp_path / "runs",
        service={"kind": "deterministic", "mean_s": 20.0},
        fleet={"replicas": 4, "gpu_capacity": 6, "max_ongoing_requests": 8},
        faults={"crash_per_replica_hour": 6.0},
    )
    data = read_run(next(iter(find_runs([tmp_path / "runs"]).values())))
    assert data.requests is not None and data.requests["failed"].sum() == data.summary["failed"] > 0
    payload = series.run_payload(data.summary, data.timeline, data.events, data.requests)
    windows = [s for s in payload["samples"] if "ttft_p99" in s]
    values = [v for s in windows for k in ("latency_p99", "ttft_p99") for v in s[k].values()]
    assert windows and values and all(math.isfinite(v) for v in values)
