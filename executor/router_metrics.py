"""Per-version traffic metrics over a sliding window: what each router replica records and how
the executor combines the replicas. Pure (no Ray, no clock of its own): callers pass `now`.

Each router replica keeps one-second slots of finished requests per version: the count, the
status classes (`2xx` … `5xx`; `error` when the version failed without a complete answer,
`cancelled` when the client went away first), and log-bucketed histograms of time to first byte
and of latency. Histograms with fixed buckets add up, so the snapshots of several router replicas
merge exactly (`merge`) before percentiles are read (`summarize`); a bucket spans 4 %, so a
percentile is off by at most 2 % of its value. Ongoing requests per version are counted apart,
for the autoscaler, and `served` counts every finished request since the replica started.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from rollout.guard import Traffic

BASE_S = 1e-4  # the first bucket's lower edge; shorter times land in bucket 0
GROWTH = 1.04  # each bucket is 4 % wider than the one before
_LOG_GROWTH = math.log(GROWTH)
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx", "error", "cancelled")


def bucket(seconds: float) -> int:
    if seconds <= BASE_S:
        return 0
    return int(math.log(seconds / BASE_S) / _LOG_GROWTH)


def bucket_value(index: int) -> float:
    """The geometric middle of a bucket: within 2 % of every value in it."""
    return BASE_S * GROWTH ** (index + 0.5)


def status_class(status: int | None, *, cancelled: bool = False) -> str:
    if cancelled:
        return "cancelled"
    if status is None or not 100 <= status <= 599:
        return "error"
    return f"{status // 100}xx"


def quantile(hist: dict[int, int], q: float) -> float | None:
    """The q-quantile (0 < q ≤ 1) of a bucket histogram; None when it is empty."""
    total = sum(hist.values())
    if total == 0:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for index in sorted(hist):
        seen += hist[index]
        if seen >= rank:
            return bucket_value(index)
    return bucket_value(max(hist))


@dataclass
class _Slot:
    requests: int = 0
    status: Counter[str] = field(default_factory=Counter)
    ttfb: Counter[int] = field(default_factory=Counter)
    latency: Counter[int] = field(default_factory=Counter)


@dataclass
class Window:
    """One router replica's recorder: ongoing counts and `retention_s` of one-second slots."""

    retention_s: int = 300
    ongoing: Counter[str] = field(default_factory=Counter)
    served: Counter[str] = field(default_factory=Counter)
    _slots: dict[int, dict[str, _Slot]] = field(default_factory=dict)

    def started(self, version: str) -> None:
        self.ongoing[version] += 1

    def finished(
        self,
        version: str,
        now: float,
        *,
        status: int | None,
        ttfb_s: float | None,
        latency_s: float,
        cancelled: bool = False,
    ) -> None:
        """A request to `version` ended (answered, failed or cancelled) at `now`."""
        self.ongoing[version] -= 1
        if self.ongoing[version] <= 0:
            del self.ongoing[version]
        self.served[version] += 1
        second = int(now)
        per = self._slots.get(second)
        if per is None:
            per = self._slots[second] = {}
            self._expire(second)
        slot = per.get(version)
        if slot is None:
            slot = per[version] = _Slot()
        slot.requests += 1
        slot.status[status_class(status, cancelled=cancelled)] += 1
        if ttfb_s is not None:
            slot.ttfb[bucket(ttfb_s)] += 1
        slot.latency[bucket(latency_s)] += 1

    def _expire(self, second: int) -> None:
        for old in [s for s in self._slots if s <= second - self.retention_s]:
            del self._slots[old]

    def snapshot(self, now: float, window_s: float) -> dict[str, Any]:
        """The last `window_s` seconds (whole slots, the current one included), as plain data."""
        first = int(now) - max(1, math.ceil(min(window_s, self.retention_s))) + 1
        versions: dict[str, dict[str, Any]] = {}
        for second, per in self._slots.items():
            if second < first:
                continue
            for version, slot in per.items():
                v = versions.setdefault(
                    version, {"requests": 0, "status": {}, "ttfb": {}, "latency": {}}
                )
                v["requests"] += slot.requests
                _add(v["status"], slot.status)
                _add(v["ttfb"], slot.ttfb)
                _add(v["latency"], slot.latency)
        return {
            "window_s": float(window_s),
            "ongoing": dict(self.ongoing),
            "served": dict(self.served),
            "versions": versions,
        }


def _add(into: dict[Any, int], more: dict[Any, int]) -> None:
    for k, n in more.items():
        into[k] = into.get(k, 0) + n


def merge(snapshots: list[dict[str, Any]]) -> dict[str, Any]:
    """Add up the snapshots of several router replicas (same window)."""
    out: dict[str, Any] = {"window_s": 0.0, "ongoing": {}, "served": {}, "versions": {}}
    for s in snapshots:
        out["window_s"] = max(out["window_s"], float(s.get("window_s", 0.0)))
        _add(out["ongoing"], s.get("ongoing", {}))
        _add(out["served"], s.get("served", {}))
        for version, v in s.get("versions", {}).items():
            into = out["versions"].setdefault(
                version, {"requests": 0, "status": {}, "ttfb": {}, "latency": {}}
            )
            into["requests"] += v["requests"]
            for key in ("status", "ttfb", "latency"):
                _add(into[key], v[key])
    return out


@dataclass(frozen=True)
class VersionMetrics:
    """One version's traffic over the window, as the rest of the project reads it."""

    requests: int
    status: dict[str, int]
    failures: int  # 5xx, error: answers the version owes (4xx are the client's)
    ttfb_p50_s: float | None
    ttfb_p99_s: float | None
    latency_p50_s: float | None
    latency_p99_s: float | None

    @property
    def failure_rate(self) -> float:
        return self.failures / self.requests if self.requests else 0.0


def summarize(snapshot: dict[str, Any]) -> dict[str, VersionMetrics]:
    """Percentiles and failure counts per version of a (merged) snapshot."""
    out = {}
    for version, v in snapshot.get("versions", {}).items():
        status = {k: int(n) for k, n in v["status"].items()}
        ttfb = {int(k): int(n) for k, n in v["ttfb"].items()}
        latency = {int(k): int(n) for k, n in v["latency"].items()}
        out[version] = VersionMetrics(
            requests=int(v["requests"]),
            status=status,
            failures=status.get("5xx", 0) + status.get("error", 0),
            ttfb_p50_s=quantile(ttfb, 0.5),
            ttfb_p99_s=quantile(ttfb, 0.99),
            latency_p50_s=quantile(latency, 0.5),
            latency_p99_s=quantile(latency, 0.99),
        )
    return out


def guard_traffic(snapshot: dict[str, Any], versions: dict[str, str | None]) -> dict[str, Traffic]:
    """The controller's per-role traffic (`versions`: role → version name) from a merged
    snapshot: requests, failures (5xx and errors), latency and time-to-first-byte p99. A role
    with no version, or no request in the window, gets an empty `Traffic`."""
    metrics = summarize(snapshot)
    out = {}
    for role, version in versions.items():
        m = metrics.get(version) if version else None
        out[role] = (
            Traffic()
            if m is None
            else Traffic(m.requests, m.failures, m.latency_p99_s, m.ttfb_p99_s)
        )
    return out
