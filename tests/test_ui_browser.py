"""The dashboard in a real browser (headless Chromium driven by Playwright) on a real rollout on
a local Ray cluster: it sees the weight change, pauses at a step boundary, resumes, and sees the
rollout succeed; the controller's and the UI's `/metrics` count what happened.

Chromium is Debian's package (`.ci/run` installs it); Playwright never downloads a browser. Set
`ROLLOUT_UI_SCREENSHOT=docs/ui.png` to refresh the README's screenshot from this run.
"""

from __future__ import annotations

import http.client
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from executor_fixtures import REPO, RayCluster, ensure_live, free_port, ray_cluster, remove
from prometheus_client.parser import text_string_to_metric_families
from test_ui import simulated_run

pytestmark = pytest.mark.ray
__all__ = ["ray_cluster"]  # the module-scoped fixture, imported for pytest

CHROMIUM = os.environ.get("ROLLOUT_CHROMIUM", "/usr/bin/chromium")
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TOKEN = "browser-test-token-42"
NAME = "dash"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium with a fresh profile; a missing browser fails the test, loudly."""
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"no Chromium at {CHROMIUM}: `.ci/run` installs Debian's `chromium` package "
            "(apt-get install chromium); elsewhere set ROLLOUT_CHROMIUM to a Chromium binary"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            yield b
        finally:
            b.close()


def scrape(port: int, path: str = "/metrics") -> dict[tuple[str, frozenset], float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path)
    text = conn.getresponse().read().decode()
    conn.close()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(got: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float | None:
    want = set(labels.items())
    hits = [v for (n, ls), v in got.items() if n == name and want <= ls]
    return sum(hits) if hits else None


def twin_scenario(folder: Path) -> Path:
    """The simulator's model of the test's rollout (3 replicas, surge 25 %, 3 s stabilization,
    replicas that start in about 4 s), for the overlay."""
    return simulated_run(
        folder,
        "example-twin",
        seed=1,
        trace={"synthetic": {"process": "poisson", "rate_per_s": 5.0, "duration_s": 90}},
        service={"kind": "exponential", "mean_s": 0.05},
        fleet={"replicas": 3, "gpu_capacity": 6, "max_ongoing_requests": 5},
        cold_start={"kind": "deterministic", "seconds": 4.0},
        health_check={"period_s": 1},
        rollout={"at_s": 20, "policy": {"max_surge_percent": 25, "stabilization_time_seconds": 3}},
    )


def test_dashboard_follows_pauses_and_resumes_a_real_rollout(
    ray_cluster: RayCluster, browser: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from playwright.sync_api import expect

    c = ray_cluster
    old = ensure_live(c, NAME, replicas=3)
    new = "v2" if old == "v1" else "v1"
    twin_scenario(tmp_path / "runs")
    ui_port, metrics_port = free_port(), free_port()
    env = dict(c.env(), ROLLOUT_UI_TOKEN=TOKEN, ROLLOUT_METRICS_PORT=str(metrics_port))
    ui = subprocess.Popen(
        [sys.executable, "-m", "rollout.cli", "ui", "--port", str(ui_port), str(tmp_path / "runs")],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        assert ui.stdout is not None
        line = ui.stdout.readline()
        base = f"http://127.0.0.1:{ui_port}"
        assert line.strip() == f"rollout ui: {base}/?token={TOKEN}", line + ui.stderr.read()

        # the list: the first deploy is there; the new rollout appears on top, live
        page.goto(f"{base}/?token={TOKEN}")
        expect(page.locator("#rollouts tbody tr").first).to_be_visible()
        policy = {"max_surge_percent": 25, "stabilization_time_seconds": 3}
        path = c.deploy_file(NAME, new, replicas=3, policy=policy)
        out = subprocess.run(
            [sys.executable, "-m", "rollout.cli", "deploy", str(path), "--detach"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        rollout_id = out.stdout.split()[0]
        top = page.locator("#rollouts tbody tr").first
        expect(top).to_have_attribute("data-id", rollout_id, timeout=15_000)
        expect(top.locator(".badge")).to_have_text("progressing")
        top.locator("a").click()

        # the rollout's page: the weight changes without a reload
        expect(page.locator("#state")).to_be_visible()
        page.wait_for_function("window.rolloutUI.loadMs !== null")
        load_ms = page.evaluate("window.rolloutUI.loadMs")
        seen = [page.locator("#weight").inner_text()]
        deadline = time.monotonic() + 90
        while len(set(seen)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
            seen.append(page.locator("#weight").inner_text())
        assert len(set(seen)) >= 2, f"the weight never changed on the page: {seen[-1]}"
        assert page.locator("#btn-resume").is_disabled()

        # pause: sent at once, applied at the next step boundary, and nothing moves after
        page.click("#btn-pause")
        expect(page.locator("#ctl-msg")).to_have_text(f"pause sent to rollout {rollout_id}")
        expect(page.locator("#state")).to_have_text("paused", timeout=60_000)
        step, weight = page.locator("#step").inner_text(), page.locator("#weight").inner_text()
        history = page.locator("#history")
        expect(history).to_contain_text("paused at a step boundary")
        expect(history).to_contain_text("control_applied")
        assert page.locator("#btn-pause").is_disabled() and page.locator("#btn-resume").is_enabled()
        done, total = (int(x) for x in step.split(" / "))
        assert 1 <= done < total

        # compare with the simulated twin: predicted lines join the measured ones
        page.select_option("#overlay", index=1)
        expect(page.locator("#chart-replicas")).to_contain_text("ready, predicted")
        expect(page.locator("#chart-weight")).to_contain_text("weight, predicted")
        time.sleep(2.0)  # paused: the page keeps updating, and nothing moves
        assert page.locator("#step").inner_text() == step
        assert page.locator("#weight").inner_text() == weight
        expect(page.locator("#state")).to_have_text("paused")
        shot = tmp_path / "ui.png"
        page.screenshot(path=str(shot), full_page=True)
        if os.environ.get("ROLLOUT_UI_SCREENSHOT"):
            page.screenshot(path=os.environ["ROLLOUT_UI_SCREENSHOT"], full_page=True)

        # the controller process counts the same on its own /metrics
        ctl = scrape(metrics_port)
        mine = {"rollout": rollout_id}
        assert sample(ctl, "rollout_phase", phase="paused", **mine) == 1.0
        assert sample(ctl, "rollout_controls_received_total", control="pause", **mine) == 1.0
        assert sample(ctl, "rollout_controls_applied_total", control="pause", **mine) == 1.0
        assert sample(ctl, "rollout_actions_applied_total", action="weight", **mine) >= 1
        assert sample(ctl, "rollout_replicas", version=new, state="ready", **mine) == done

        # force-cancel asks first; declining sends nothing
        page.click("#btn-force_cancel")
        expect(page.locator("#confirm")).to_be_visible()
        page.click("#confirm-no")
        expect(page.locator("#confirm")).to_be_hidden()

        # resume: the rollout goes on and succeeds; every button is off once it ended
        page.click("#btn-resume")
        expect(page.locator("#state")).to_have_text("succeeded", timeout=120_000)
        expect(page.locator("#live")).to_have_text("ended · history complete", timeout=10_000)
        for name in ("pause", "resume", "cancel", "force_cancel", "roll_forward"):
            assert page.locator(f"#btn-{name}").is_disabled(), name
        assert "force_cancel" not in page.locator("#history").inner_text()
        lags = page.evaluate("window.rolloutUI.lags")
        assert not errors, errors

        # the UI's own /metrics (open on loopback) read the same from the store
        got = scrape(ui_port)
        assert sample(got, "rollout_phase", phase="succeeded", **mine) == 1.0
        for ctl_name in ("pause", "resume"):
            n = sample(got, "rollout_controls_applied_total", control=ctl_name, **mine)
            assert n == 1.0, ctl_name
        assert sample(got, "rollout_candidate_weight", **mine) == 1.0

        # a control for an ended rollout gets the command line's message
        conn = http.client.HTTPConnection("127.0.0.1", ui_port, timeout=30)
        auth = {"Authorization": f"Bearer {TOKEN}"}
        conn.request("POST", f"/api/rollouts/{rollout_id}/controls/pause", headers=auth)
        r = conn.getresponse()
        body = json.loads(r.read())
        cli = c.cli("pause", rollout_id)
        assert r.status == 409 and cli.returncode == 2
        assert cli.stderr.strip() == f"rollout: error: {body['error']}"
        assert body["error"] == f"rollout {rollout_id} has already ended (succeeded); cannot pause"

        with capsys.disabled():
            lag = sorted(lags)
            print(
                f"\nrollout ui: rollout page loaded in {load_ms:.0f} ms; update latency "
                f"(controller step recorded → drawn in the page) median "
                f"{statistics.median(lag):.2f} s, p90 {lag[int(0.9 * (len(lag) - 1))]:.2f} s, "
                f"max {lag[-1]:.2f} s over {len(lag)} updates (polling every 1 s)"
            )
    finally:
        page.close()
        ui.terminate()
        ui.wait(10)
        remove(NAME)
