"""A prediction held against a measurement: the fidelity table and the overlay plots.

Both runs are folders with the same files (`rollout simulate`'s and `rollout export`'s); every
figure is computed by the same code for both (`sim.result.summarize` and
`measure.runs.rollout_figures`), so a difference is the simulator's, not the bookkeeping's.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from sim.plots import CANDIDATE_COLOR, CURRENT_COLOR
from sim.result import SimResult

METRICS = (
    "rollout_duration_s",
    "peak_gpus",
    "min_ready_replicas",
    "latency_p50_rollout_s",
    "latency_p99_rollout_s",
    "ttft_p50_rollout_s",
    "ttft_p99_rollout_s",
    "latency_p99_worst60s_s",
    "ttft_p99_worst60s_s",
    "failed",
)
WINDOW_S = 30.0


def _names(summaries: Sequence[dict[str, Any]]) -> list[str]:
    """The metrics, with as many steps as any run took."""
    steps = sorted(
        {k for s in summaries for k in s if k.startswith("step_duration_s_")},
        key=lambda k: int(k.rsplit("_", 1)[1]),
    )
    return [METRICS[0], *steps, *METRICS[1:]]


def _error(p: Any, m: Any) -> float | None:
    """The error in percent of the measurement (None where it is 0 or either is missing)."""
    if p is not None and m is not None and m != 0:
        return (float(p) - float(m)) / abs(float(m)) * 100.0
    if p is not None and m is not None and p == m:
        return 0.0
    return None


def compare(
    policy: str, predicted: Sequence[dict[str, Any]], measured: dict[str, Any]
) -> list[dict]:
    """One real run against its predictions (their median): one row per metric (steps as many
    as either took) with predicted, measured, and the error in percent of the measurement."""
    columns = ("policy", "metric", "predicted", "measured", "error_pct")
    return [{k: r[k] for k in columns} for r in compare_runs(policy, predicted, [measured])]


def compare_runs(
    policy: str, predicted: Sequence[dict[str, Any]], measured: Sequence[dict[str, Any]]
) -> list[dict]:
    """Several real runs against several predictions (every seed of every run): one row per
    metric with each side's median, the error between the medians, and each side's range.

    One run is one draw: which replica Serve removes and which long requests it holds, or a
    p99 over a few hundred requests, differ from run to run of the same rollout, as they do
    from seed to seed of the simulator. Medians compare what a rollout does, the ranges show
    how much a single run varies."""
    rows = []
    for name in _names([*predicted, *measured]):
        ps = [float(s[name]) for s in predicted if s.get(name) is not None]
        ms = [float(s[name]) for s in measured if s.get(name) is not None]
        p = float(np.median(ps)) if ps else None
        m = float(np.median(ms)) if ms else None
        rows.append(dict(
            policy=policy, metric=name, predicted=p, measured=m, error_pct=_error(p, m),
            predicted_min=min(ps, default=None), predicted_max=max(ps, default=None),
            measured_min=min(ms, default=None), measured_max=max(ms, default=None),
            runs=len(ms),
        ))  # fmt: skip
    return rows


def _windows(result: SimResult, column: str, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """p50 and p99 of `column` over served requests by 30 s arrival window."""
    req = result.requests
    arrival = req["arrival_s"].to_numpy(dtype=float) + shift
    values = req[column].to_numpy(dtype=float)
    if not len(arrival):
        return np.zeros(0), np.zeros((2, 0))
    edges = np.arange(0.0, arrival.max() + WINDOW_S, WINDOW_S)
    centres, rows = [], []
    for lo in edges:
        chunk = values[(arrival >= lo) & (arrival < lo + WINDOW_S)]
        chunk = chunk[~np.isnan(chunk)]
        if len(chunk) >= 5:
            centres.append(lo + WINDOW_S / 2)
            rows.append(np.percentile(chunk, [50, 99]))
    return np.array(centres), np.array(rows).T.reshape(2, -1)


def plot_overlay(
    predicted: SimResult, measured: SimResult, path: Path, title: str, shift: float = 0.0
) -> None:
    """Replicas ready per version, the weight, and p50/p99 latency and TTFT per 30 s window,
    measured (solid) and predicted (dashed), on the measurement's clock (`shift` moves the
    prediction onto it)."""
    fig = Figure(figsize=(11, 9.5))
    axes = fig.subplots(4, 1, sharex=True, gridspec_kw={"height_ratios": [2, 1, 1.6, 1.6]})
    styles: Sequence[tuple[str, SimResult, str, float]] = (
        ("measured", measured, "-", 0.0),
        ("predicted", predicted, "--", shift),
    )
    for label, run, ls, dt in styles:
        tl = run.timeline
        t = tl["t_s"].to_numpy(dtype=float) + dt
        for version, color in (("current", CURRENT_COLOR), ("candidate", CANDIDATE_COLOR)):
            axes[0].step(t, tl[f"{version}_ready"], where="post", color=color, ls=ls,
                         label=f"{version} ready, {label}")  # fmt: skip
        axes[0].step(t, tl["gpus_in_use"], where="post", color="#228833", ls=ls, lw=1,
                     label=f"GPUs in use, {label}")  # fmt: skip
        axes[1].step(t, tl["candidate_weight"], where="post", color=CANDIDATE_COLOR, ls=ls,
                     label=label)  # fmt: skip
        for ax, column in ((axes[2], "latency_s"), (axes[3], "ttft_s")):
            x, (p50, p99) = _windows(run, column, dt)
            ax.plot(x, p50, color=CURRENT_COLOR, ls=ls, marker=".", label=f"p50, {label}")
            ax.plot(x, p99, color="#cc3311", ls=ls, marker=".", label=f"p99, {label}")
        start = run.summary.get("rollout_start_s")
        end = run.summary.get("rollout_end_s")
        if start is not None and end is not None:
            for ax in axes:
                ax.axvspan(start + dt, end + dt, color="#ccbb44", alpha=0.12 if ls == "-" else 0.0,
                           lw=0)  # fmt: skip
                ax.axvline(end + dt, color="#888888", ls=ls, lw=0.8)
    axes[0].set_ylabel("replicas / GPUs")
    axes[1].set_ylabel("candidate\nweight")
    axes[1].set_ylim(-0.05, 1.05)
    axes[2].set_ylabel(f"latency (s)\nper {WINDOW_S:g} s window")
    axes[3].set_ylabel(f"TTFT (s)\nper {WINDOW_S:g} s window")
    axes[3].set_xlabel("seconds from the load's start (shaded: the measured rollout)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    fig.suptitle(title, x=0.01, ha="left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table."""

    def fmt(v: Any) -> str:
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return "–"
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    frame = pd.DataFrame(rows)
    ranged = "measured_min" in frame
    head = "| policy | metric | predicted | measured | error % |"
    rule = "|---|---|---:|---:|---:|"
    if ranged:
        head += " predicted range | measured range |"
        rule += "---:|---:|"
    lines = [head, rule]
    for r in frame.to_dict("records"):
        err = "–" if r["error_pct"] is None or pd.isna(r["error_pct"]) else f"{r['error_pct']:+.1f}"
        line = (f"| {r['policy']} | {r['metric']} | {fmt(r['predicted'])} | "
                f"{fmt(r['measured'])} | {err} |")  # fmt: skip
        if ranged:
            line += (f" {fmt(r['predicted_min'])}–{fmt(r['predicted_max'])} |"
                     f" {fmt(r['measured_min'])}–{fmt(r['measured_max'])} |")  # fmt: skip
        lines.append(line)
    return "\n".join(lines)
