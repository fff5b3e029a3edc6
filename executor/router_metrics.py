"""Per-version traffic metrics over a sliding window: what each router replica records and how
the executor combines the replicas. Pure (no Ray, no clock of its own): callers pass `now`.

Each router replica keeps one-second slots of finished requests per version: the count, the
status classes (`2xx` … `5xx`; `error` when the version failed without a complete answer,
`cancelled` when the client went away first), and log-bucketed histograms of time to first byte
and of latency. Histograms with fixed buckets add up, so the snapshots of several router replicas
merge exactly (`merge`) before percentiles are read (`summarize`); a bucket spans 4 %, so a
percentile is off by at most 2 % of its value. Ongoing requests per version are counted apart,
for the autoscaler, and `served` counts every finished request since the replica started.

With sticky sessions each replica also remembers, per session, the version and time of its last
request (under a digest of the key: session keys are often secrets), until `max_age_s` passes
without one; snapshots list the most recent `SESSIONS_REPORTED` of them, and merging keeps each
session's latest, so a session that both router replicas saw counts once.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any

from rollout.guard import Traffic

BASE_S = 1e-4  # the first bucket's lower edge; shorter times land in bucket 0
GROWTH = 1.04  # each bucket is 4 % wider than the one before
_LOG_GROWTH = math.log(GROWTH)
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx", "error", "cancelled")
SESSIONS_KEPT = 100_000  # sessions a router replica remembers (the oldest are forgotten first)
SESSIONS_REPORTED = 4096  # the most recent of them a snapshot lists


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
    # session digest → (time of its last request, the version that got it), oldest first
    _sessions: OrderedDict[str, tuple[float, str]] = field(default_factory=OrderedDict)

    def session(self, key: str, version: str, now: float, max_age_s: float) -> None:
        """A request of session `key` went to `version` at `now`."""
        digest = hashlib.blake2b(key.encode(), digest_size=8).hexdigest()
        self._sessions[digest] = (now, version)
        self._sessions.move_to_end(digest)
        while self._sessions:
            oldest = next(iter(self._sessions.values()))
            if oldest[0] > now - max_age_s and len(self._sessions) <= SESSIONS_KEPT:
                break
            self._sessions.popitem(last=False)

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

    def forget(self, keep: frozenset[str]) -> None:
        """Drop the finished requests of every version not in `keep` (versions whose application
        is gone), so that a later version of the same label starts with an empty window rather
        than the old one's answers. Requests in flight stay counted."""
        gone = {v for per in self._slots.values() for v in per} | set(self.served)
        for version in gone - keep:
            self.served.pop(version, None)
            for per in self._slots.values():
                per.pop(version, None)

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
        out: dict[str, Any] = {
            "window_s": float(window_s),
            "ongoing": dict(self.ongoing),
            "served": dict(self.served),
            "versions": versions,
        }
        if self._sessions:
            recent = list(self._sessions.items())[-SESSIONS_REPORTED:]
            out["sessions"] = {k: [t, v] for k, (t, v) in recent}
        return out


def _add(into: dict[Any, int], more: dict[Any, int]) -> None:
    for k, n in more.items():
        into[k] = into.get(k, 0) + n


def merge(snapshots: list[dict[str, Any]]) -> dict[str, Any]:
    """Add up the snapshots of several router replicas (same window)."""
    out: dict[str, Any] = {"window_s": 0.0, "ongoing": {}, "served": {}, "versions": {}}
    sessions: dict[str, list[Any]] = {}
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
        for key, (t, version) in s.get("sessions", {}).items():
            if key not in sessions or sessions[key][0] < t:
                sessions[key] = [t, version]
    if sessions:
        out["sessions"] = sessions
    return out


def session_counts(snapshot: dict[str, Any]) -> dict[str, int]:
    """Sessions per version (the version of each session's last request) in a snapshot."""
    return dict(Counter(version for _, version in snapshot.get("sessions", {}).values()))


def split(snapshot: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Each version's share of the window's requests and, with sticky sessions, of the active
    sessions: what `rollout status` shows next to the weight."""
    requests = {v: int(m["requests"]) for v, m in snapshot.get("versions", {}).items()}
    sessions = session_counts(snapshot)
    out: dict[str, dict[str, float]] = {}
    for what, counts in (("requests", requests), ("sessions", sessions)):
        total = sum(counts.values())
        for version, n in counts.items():
            if total:
                out.setdefault(version, {})[what] = round(n / total, 4)
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
