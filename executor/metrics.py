"""Prometheus metrics of rollouts, fed from each controller iteration's status and new events.

The controller process calls `observe(status, events)` once per recorded step (never on replay,
so a recovered rollout counts nothing twice) and serves its registry on
`127.0.0.1:$ROLLOUT_METRICS_PORT` when that is set. `rollout ui` keeps its own `RolloutMetrics`
fed from the store, so both expose the same names (documented in docs/ui.md).

Router metrics arrive inside the status as `status["router"]` (shape below): cumulative
per-version counts and histogram buckets, exported as they are reported.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

PHASES = ("progressing", "paused", "succeeded", "cancelled", "failed")
REPLICA_STATES = ("ready", "starting", "draining", "pending_gpu")
ACTION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
LABELS = ("rollout", "app")

# What the router reports per version, cumulative since it started (all keys optional);
# `window` holds sliding-window figures that the dashboard draws:
#   status["router"] = {"window_s": 30, "versions": {"v2": {
#       "requests_total": 1520, "failures_total": 3,
#       "latency_seconds": {"buckets": [[0.1, 800], [0.5, 1400], ["+Inf", 1520]], "sum": 310.2},
#       "ttfb_seconds": {"buckets": [[0.05, 900], ["+Inf", 1520]], "sum": 80.1},
#       "window": {"requests": 240, "failures": 0, "latency_p99_s": 0.8, "ttfb_p99_s": 0.2}}}}


class RolloutMetrics:
    """One registry's rollout metrics; `observe` is the only way in."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        def gauge(name: str, doc: str, *extra: str) -> Gauge:
            return Gauge(name, doc, [*LABELS, *extra], registry=registry)

        def counter(name: str, doc: str, *extra: str) -> Counter:
            return Counter(name, doc, [*LABELS, *extra], registry=registry)

        self.phase = gauge("rollout_phase", "1 for the rollout's phase, 0 for the others", "phase")
        self.step = gauge("rollout_step", "Steps completed, in either direction")
        self.steps = gauge("rollout_steps", "Steps the rollout plans")
        self.weight = gauge("rollout_candidate_weight", "Share of traffic sent to the candidate")
        self.replicas = gauge(
            "rollout_replicas", "Replicas per version and state", "version", "state"
        )
        self.target = gauge("rollout_replicas_target", "Replicas the controller wants", "version")
        self.updated = gauge(
            "rollout_status_updated_timestamp_seconds", "When the controller last observed"
        )
        self.received = counter("rollout_controls_received", "Controls received", "control")
        self.applied = counter("rollout_controls_applied", "Controls that took effect", "control")
        self.ignored = counter("rollout_controls_ignored", "Controls that did not apply", "control")
        self.actions = counter("rollout_actions_applied", "Actions the backend applied", "action")
        self.action_seconds = Histogram(
            "rollout_action_seconds",
            "How long applying one action took",
            [*LABELS, "action"],
            buckets=ACTION_BUCKETS,
            registry=registry,
        )
        self.router = _RouterCollector()
        registry.register(self.router)

    def observe(self, status: Mapping[str, Any], events: Iterable[Mapping[str, Any]]) -> None:
        """One step's status (as `rollout status --json` prints it) and its new events."""
        rollout_id, app = str(status.get("id", "")), str(status.get("app", ""))
        key = (rollout_id, app)
        state = status.get("state")
        if state in PHASES:
            for phase in PHASES:
                self.phase.labels(*key, phase).set(float(phase == state))
        self.step.labels(*key).set(float(status.get("step", 0)))
        if "steps" in status:
            self.steps.labels(*key).set(float(status["steps"]))
        self.weight.labels(*key).set(float(status.get("candidate_weight", 0.0)))
        for version, counts in (status.get("replicas") or {}).items():
            for st in REPLICA_STATES:
                self.replicas.labels(*key, version, st).set(float(counts.get(st, 0)))
            if "target" in counts:
                self.target.labels(*key, version).set(float(counts["target"]))
        if "updated_at" in status:
            self.updated.labels(*key).set(float(status["updated_at"]))
        if status.get("router"):
            self.router.reports[key] = status["router"]
        for e in events:
            kind = e.get("kind")
            if kind == "control_received":
                self.received.labels(*key, e["control"]).inc()
            elif kind == "control_applied":
                self.applied.labels(*key, e["control"]).inc()
            elif kind == "control_ignored":
                self.ignored.labels(*key, e["control"]).inc()
            elif kind == "action_applied":
                action = str(e["action"]).split(" ", 1)[0]  # "weight 0.5" → "weight"
                self.actions.labels(*key, action).inc()
                self.action_seconds.labels(*key, action).observe(float(e["seconds"]))


class _RouterCollector(Collector):
    """The router's cumulative per-version counts and histograms, exported as last reported."""

    def __init__(self) -> None:
        self.reports: dict[tuple[str, str], Mapping[str, Any]] = {}

    def collect(self) -> Iterator[Any]:
        labels = [*LABELS, "version"]
        requests = CounterMetricFamily(
            "rollout_router_requests", "Requests the router sent to a version", labels=labels
        )
        failures = CounterMetricFamily(
            "rollout_router_failures", "Requests to a version that failed", labels=labels
        )
        latency = HistogramMetricFamily(
            "rollout_router_request_duration_seconds",
            "Request latency through the router, per version",
            labels=labels,
        )
        ttfb = HistogramMetricFamily(
            "rollout_router_time_to_first_byte_seconds",
            "Time to the response's first byte (the first token when streaming), per version",
            labels=labels,
        )
        for (rollout_id, app), report in list(self.reports.items()):
            for version, m in (report.get("versions") or {}).items():
                values = [rollout_id, app, version]
                if "requests_total" in m:
                    requests.add_metric(values, float(m["requests_total"]))
                if "failures_total" in m:
                    failures.add_metric(values, float(m["failures_total"]))
                for family, field in ((latency, "latency_seconds"), (ttfb, "ttfb_seconds")):
                    h = m.get(field)
                    if h and h.get("buckets"):
                        buckets = [(_le(le), float(n)) for le, n in h["buckets"]]
                        if buckets[-1][0] != "+Inf":
                            buckets.append(("+Inf", buckets[-1][1]))
                        family.add_metric(values, buckets, float(h.get("sum", 0.0)))
        yield from (requests, failures, latency, ttfb)


def _le(bound: Any) -> str:
    return "+Inf" if str(bound) in ("+Inf", "inf", "Infinity") else repr(float(bound))


# ---- the controller process -----------------------------------------------------------------

_DEFAULT: RolloutMetrics | None = None


def observe(status: Mapping[str, Any], events: Iterable[Mapping[str, Any]]) -> None:
    """The controller's hook, called once per recorded step; never lets metrics fail a step."""
    global _DEFAULT
    try:
        if _DEFAULT is None:
            _DEFAULT = RolloutMetrics()
        _DEFAULT.observe(status, events)
    except Exception as e:  # a metric must never stop a rollout
        print(f"rollout metrics: {e}", file=sys.stderr)


def serve_from_env() -> int | None:
    """Serve this process's metrics on 127.0.0.1:$ROLLOUT_METRICS_PORT (unset: not served)."""
    from prometheus_client import start_http_server

    port = os.environ.get("ROLLOUT_METRICS_PORT")
    if not port:
        return None
    with contextlib.suppress(OSError, ValueError):
        server, _ = start_http_server(int(port), addr="127.0.0.1")
        return int(server.server_port)
    print(f"rollout metrics: cannot listen on 127.0.0.1:{port}; not served", file=sys.stderr)
    return None
