"""Plots of a simulated run: replicas by version and state, traffic weight, desired replicas
and latency over time, with the rollout's steps marked."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from rollout import history as h
from sim.result import SimResult

CURRENT_COLOR = "#4477aa"
CANDIDATE_COLOR = "#ee6677"
STEP_COLOR = "#888888"
_BIN_WIDTHS = (10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0)


def plot_timeline(result: SimResult, path: Path, title: str | None = None) -> None:
    """Three stacked panels sharing simulated time (minutes): replicas, weight, latency."""
    fig = Figure(figsize=(12.5, 8.5))  # no pyplot: no global state, no GUI backend
    axes = fig.subplots(3, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1.2, 2]})
    draw_timeline(result, axes, legend=True)
    fig.suptitle(title or str(result.summary.get("scenario", "")), x=0.01, ha="left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_comparison(results: Sequence[SimResult], path: Path, title: str | None = None) -> None:
    """One column of timeline panels per policy, same axes, for side-by-side reading."""
    n = len(results)
    fig = Figure(figsize=(5.6 * n + 1.6, 8.5))
    axes = fig.subplots(
        3,
        n,
        sharex="col",
        sharey="row",
        gridspec_kw={"height_ratios": [3, 1.2, 2]},
        squeeze=False,
    )
    for col, result in enumerate(results):
        draw_timeline(result, axes[:, col], legend=col == n - 1)
        axes[0, col].set_title(str(result.summary.get("policy") or "no rollout"))
    axes[0, 0].set_ylim(0, max(_replica_top(r) for r in results))  # rows share their y axis
    fig.suptitle(title or "", x=0.01, ha="left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def draw_timeline(result: SimResult, axes: Sequence[Axes], *, legend: bool = True) -> None:
    tl = result.timeline
    span = float(result.summary.get("span_s") or tl["t_s"].iloc[-1])
    t = np.append(tl["t_s"].to_numpy(), span) / 60.0

    def steps(col: str) -> np.ndarray:
        values = tl[col].to_numpy(dtype=float)
        return np.append(values, values[-1])

    ax = axes[0]
    layers = [
        ("current ready", steps("current_ready"), CURRENT_COLOR, 1.0),
        ("current starting", steps("current_starting"), CURRENT_COLOR, 0.45),
        ("current draining", steps("current_draining"), CURRENT_COLOR, 0.2),
        ("candidate ready", steps("candidate_ready"), CANDIDATE_COLOR, 1.0),
        ("candidate starting", steps("candidate_starting"), CANDIDATE_COLOR, 0.45),
        ("candidate draining", steps("candidate_draining"), CANDIDATE_COLOR, 0.2),
    ]
    ax.stackplot(
        t,
        *[values for _, values, _, _ in layers],
        labels=[name for name, *_ in layers],
        colors=[color for *_, color, _ in layers],
        alpha=1.0,
        step="post",
    )
    # stackplot has no per-layer alpha: lighten starting/draining layers afterwards
    for poly, (*_, alpha) in zip(ax.collections, layers, strict=True):
        poly.set_alpha(alpha)
    ax.step(t, steps("gpus_in_use"), where="post", color="#228833", lw=1.4, label="GPUs in use")
    ax.step(
        t,
        steps("desired_replicas"),
        where="post",
        color="black",
        ls="--",
        lw=1.2,
        label="desired replicas",
    )
    if tl["pending_gpu"].any():
        ax.step(
            t,
            steps("pending_gpu"),
            where="post",
            color="#aa3377",
            lw=1.2,
            ls=":",
            label="waiting for a GPU",
        )
    ax.set_ylabel("replicas")
    ax.set_ylim(
        0,
        max(1.0, float(tl["gpus_in_use"].max()), float(tl["desired_replicas"].max())) * 1.18 + 0.5,
    )

    axes[1].step(
        t, steps("candidate_weight"), where="post", color=CANDIDATE_COLOR, lw=1.5, label="weight"
    )
    _share_dots(axes[1], result.requests, span)
    axes[1].set_ylabel("candidate\nweight")
    axes[1].set_ylim(-0.05, 1.05)

    _latency_panel(axes[2], result.requests, span)
    clock = "measured" if result.summary.get("measured") else "simulated"  # `rollout export`
    axes[2].set_xlabel(f"{clock} time (min)")
    for a in axes:
        _mark_rollout(a, result)
        a.grid(alpha=0.3)
        a.set_xlim(0, span / 60.0)
    if legend:  # outside, on the right: the plot's top is where a surge shows
        for a in axes:
            a.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)


def _replica_top(result: SimResult) -> float:
    tl = result.timeline
    return (
        max(1.0, float(tl["gpus_in_use"].max()), float(tl["desired_replicas"].max())) * 1.18 + 0.5
    )


def _binned_percentiles(
    arrival: np.ndarray, values: np.ndarray, width: float, qs: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Percentiles of the served values (NaN elsewhere) by arrival bin: requests are in arrival
    order, so each bin is a slice. Returns bin centres (min) and one row per percentile."""
    edges = np.arange(0.0, arrival[-1] + width, width) if len(arrival) else np.zeros(1)
    cuts = np.searchsorted(arrival, edges)
    centres, rows = [], []
    for i in range(len(cuts) - 1):
        chunk = values[cuts[i] : cuts[i + 1]]
        chunk = chunk[~np.isnan(chunk)]
        if len(chunk):
            centres.append((i + 0.5) * width / 60.0)
            rows.append(np.percentile(chunk, qs))
    return np.array(centres), np.array(rows).T.reshape(len(qs), -1)


def _share_dots(ax: Axes, requests: pd.DataFrame, span: float) -> None:
    """The candidate's realised share of the requests that arrived in each bin, beside the
    weight line (sticky sessions make it stray; see sim/result.py `split_steps`)."""
    width = next((w for w in _BIN_WIDTHS if w >= span / 120.0), _BIN_WIDTHS[-1])
    arrival = requests["arrival_s"].to_numpy()
    if not len(arrival):
        return
    bins = (arrival // width).astype(int)
    total = np.bincount(bins)
    on_candidate = np.bincount(bins, weights=requests["version"].cat.codes.to_numpy() == 1)
    seen = total > 0
    x = (np.nonzero(seen)[0] + 0.5) * width / 60.0
    ax.plot(x, on_candidate[seen] / total[seen], ".", color="black", ms=2.5,
            label="share of requests")  # fmt: skip


def _latency_panel(ax: Axes, requests: pd.DataFrame, span: float) -> None:
    """p50 and p99 latency (and TTFT p99 when it differs) of served requests by arrival bin,
    and the arrival times of dropped and failed requests."""
    width = next((w for w in _BIN_WIDTHS if w >= span / 150.0), _BIN_WIDTHS[-1])
    arrival = requests["arrival_s"].to_numpy()
    latency = requests["latency_s"].to_numpy()
    ttft = requests["ttft_s"].to_numpy()
    x, lat = _binned_percentiles(arrival, latency, width, [50, 99])
    if len(x):
        ax.plot(x, lat[0], color="#4477aa", lw=1.0, label="latency p50")
        ax.plot(x, lat[1], color="#cc3311", lw=1.0, label="latency p99")
        if not np.array_equal(ttft, latency, equal_nan=True):
            x, first = _binned_percentiles(arrival, ttft, width, [99])
            ax.plot(x, first[0], color="#009988", lw=1.0, label="TTFT p99")
    for column, color, label in (("dropped", "black", "dropped"), ("failed", "#aa3377", "failed")):
        lost = arrival[requests[column].to_numpy()] / 60.0
        if len(lost):
            ax.plot(lost, np.zeros_like(lost), "|", color=color, ms=8, label=label)
    ax.set_ylabel(f"latency (s)\nby arrival, {width:g} s bins")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_ylim(bottom=0)


def _mark_rollout(ax: Axes, result: SimResult) -> None:
    start = result.summary.get("rollout_start_s")
    if start is None:
        return
    end = result.summary.get("rollout_end_s") or result.summary.get("span_s")
    ax.axvspan(start / 60.0, end / 60.0, color="#ccbb44", alpha=0.15, lw=0, zorder=0)
    for e in result.events:
        if isinstance(e, h.StepCompleted):
            ax.axvline(e.t / 60.0, color=STEP_COLOR, lw=0.8, ls=":")
        elif isinstance(e, h.ControlReceived):
            ax.axvline(e.t / 60.0, color="#aa3377", lw=1.0, ls="-.")


def plot_latency(result: SimResult, path: Path, title: str | None = None) -> None:
    """Latency distribution (CCDF, log scale) per version and inside/outside the rollout."""
    req = result.requests
    latency = req["latency_s"].to_numpy()
    served = ~np.isnan(latency)
    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.subplots()
    start = result.summary.get("rollout_start_s")
    end = result.summary.get("rollout_end_s") or result.summary.get("span_s")
    groups: list[tuple[str, np.ndarray, str]] = []
    codes = req["version"].cat.codes.to_numpy()
    for code, (version, color) in enumerate(
        (("current", CURRENT_COLOR), ("candidate", CANDIDATE_COLOR))
    ):
        lat = latency[served & (codes == code)]
        if len(lat):
            groups.append((f"{version} version", lat, color))
    if start is not None:
        arrival = req["arrival_s"].to_numpy()
        inside = served & (arrival >= start) & (arrival <= end)
        groups.append(("arrived during the rollout", latency[inside], "#ccbb44"))
    for name, lat, color in groups:
        if not len(lat):
            continue
        lat.sort()
        # at most ~2,000 points: every rank in the tail, log-spaced fractions elsewhere
        n = len(lat)
        ranks = np.unique(
            np.concatenate(
                [
                    (n - np.geomspace(n, 1, 1500)).astype(np.int64),
                    np.arange(max(0, n - 500), n),
                ]
            )
        )
        ccdf = 1.0 - ranks / n
        ax.step(lat[ranks], ccdf, where="post", color=color, label=f"{name} ({n:,})")
    ax.set_yscale("log")
    ax.set_xlabel("latency (s)")
    ax.set_ylabel("fraction of requests slower")
    ax.grid(alpha=0.3, which="both")
    if groups:
        ax.legend(fontsize=8)
    ax.set_title(title or str(result.summary.get("scenario", "")), loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
