"""The metric guard's verdict: is the candidate's traffic over the last window within limits?

Pure arithmetic on what the backend measured (`Traffic` per version, over the policy's
`guard.window_s`); the controller decides what a verdict does. A verdict is one of:

- `breached`: a limit was exceeded; the first one in the order error rate, latency p99, time
  to first token p99, latency p99 ratio is named, with its value and threshold;
- `passed`: every limit that could be judged held;
- `too few requests`: the candidate had fewer than `min_requests` requests in the window, or no
  limit could be judged (the latency ratio alone, with too few requests on the current version).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from rollout.policy import GuardPolicy


@dataclass(frozen=True)
class Traffic:
    """One version's requests over the guard's window, as the backend measured them.

    `failures` counts the requests the version owes an answer for (5xx, errors, timeouts, drops).
    Latency is over every finished request, failures included, as a router measures it; time to
    first token over those that sent one. None: nothing to measure."""

    requests: int = 0
    failures: int = 0
    latency_p99_s: float | None = None
    ttft_p99_s: float | None = None

    @property
    def error_rate(self) -> float:
        return self.failures / self.requests if self.requests else 0.0


class Outcome(StrEnum):
    PASSED = "passed"
    BREACHED = "breached"
    TOO_FEW = "too few requests"


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    requests: int  # the candidate's requests in the window
    metric: str = ""  # breached: which limit
    value: float = 0.0
    threshold: float = 0.0

    def describe(self, window_s: float) -> str:
        """One line for the history, e.g. `error_rate 0.2 > 0.01 over 60 s (412 requests)`."""
        if self.outcome is not Outcome.BREACHED:
            return f"{self.outcome.value} over {window_s:g} s ({self.requests} requests)"
        return (
            f"{self.metric} {self.value:.4g} > {self.threshold:g} over {window_s:g} s "
            f"({self.requests} requests)"
        )


def judge(guard: GuardPolicy, candidate: Traffic, current: Traffic) -> Verdict:
    """The verdict on the candidate's window; `current` is the same window on the current
    version (for the latency ratio)."""
    n = candidate.requests
    if n < guard.min_requests:
        return Verdict(Outcome.TOO_FEW, n)
    checks: list[tuple[str, float | None, float | None]] = [
        ("error_rate", candidate.error_rate, guard.max_error_rate),
        ("latency_p99_s", candidate.latency_p99_s, guard.max_latency_p99_s),
        ("ttft_p99_s", candidate.ttft_p99_s, guard.max_ttft_p99_s),
    ]
    ratio = None
    cur = current.latency_p99_s
    if current.requests >= guard.min_requests and cur and candidate.latency_p99_s is not None:
        ratio = candidate.latency_p99_s / cur
    checks.append(("latency_p99_ratio", ratio, guard.max_latency_p99_ratio))
    judged = False
    for metric, value, limit in checks:
        if value is None or limit is None:
            continue
        judged = True
        if value > limit:
            return Verdict(Outcome.BREACHED, n, metric, value, limit)
    return Verdict(Outcome.PASSED if judged else Outcome.TOO_FEW, n)
