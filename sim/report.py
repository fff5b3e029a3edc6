"""The files a capacity planner reads from a sweep: the Pareto and duration plots (with label
placement that never overprints) and report.md. What the sweep decided comes from
`sim/verdict.py`; nothing here judges.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.transforms import Bbox

from rollout.scenario import FleetSpec, Slo
from sim.verdict import COST_RESOLUTION_USD, Recommendation, describe_slo, finite

MODE_COLORS = {"surge": "tab:blue", "unavailable": "tab:orange"}


# --- plots -----------------------------------------------------------------------------------


def draw_pareto(ax: Axes, policies: pd.DataFrame, slo: Slo, rec: Recommendation) -> None:
    """p99 latency in the rollout's worst 5 minutes (worst run) against GPU cost, with the
    Pareto front joined up."""
    for mode, sub in policies.groupby("mode"):
        met = sub["slo_met"].to_numpy(dtype=bool)
        ax.scatter(
            sub["cost_usd"],
            sub["latency_p99_s"],
            s=np.where(met, 46, 30),
            c=MODE_COLORS.get(str(mode), "gray"),
            alpha=0.85,
            label=str(mode),
            edgecolors=np.where(met, "black", "none"),
            linewidths=0.6,
        )
    front = policies[policies["pareto"]].sort_values("cost_usd")
    finite = front[np.isfinite(front["latency_p99_s"])]
    ax.step(
        finite["cost_usd"],
        finite["latency_p99_s"],
        where="post",
        color="black",
        lw=1,
        alpha=0.6,
        label="Pareto front",
    )
    if slo.latency_p99_s is not None:
        ax.axhline(slo.latency_p99_s, color="red", ls="--", lw=1, label="SLO p99")
    chosen = policies[policies["policy"] == rec.policy].iloc[0]
    ax.scatter(
        [chosen["cost_usd"]],
        [chosen["latency_p99_s"]],
        s=220,
        facecolors="none",
        edgecolors="green" if rec.meets_slo else "red",
        linewidths=2,
        label="recommended" if rec.meets_slo else "closest (misses SLO)",
    )
    ax.set_xlabel("GPU cost over the common horizon, USD (mean over runs)")
    ax.set_ylabel("p99 latency, worst 5 min of the rollout, s\n(worst run)")
    ax.set_title("Latency against cost per policy (outlined: meets the SLO on every run)")
    ax.title.set_fontsize(10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    _place_labels(ax, policies)


# Where a label may sit relative to its point (points, alignment), in order of preference.
_LABEL_SPOTS = [
    ((5, 3), "left", "bottom"),
    ((5, -3), "left", "top"),
    ((-5, 3), "right", "bottom"),
    ((-5, -3), "right", "top"),
    ((0, 7), "center", "bottom"),
    ((0, -7), "center", "top"),
]


def _place_labels(ax: Axes, policies: pd.DataFrame) -> None:
    """Name the points without overprinting: each label takes the first spot that overlaps no
    placed label, no marker and stays inside the axes (greedy, front labels first). A front
    label with no free spot keeps its first; any other is left out (the report's table names
    every policy), so a sweep of many policies stays readable."""
    fig = ax.get_figure()
    assert fig is not None
    fig.draw_without_rendering()  # settle the layout and limits before measuring
    canvas = fig.canvas if hasattr(fig.canvas, "get_renderer") else FigureCanvasAgg(fig)
    renderer = canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    xy = policies[["cost_usd", "latency_p99_s"]].to_numpy(dtype=float)
    xy = xy[np.isfinite(xy).all(axis=1)]
    r = 6.0 * fig.dpi / 110
    taken = [Bbox.from_extents(a - r, b - r, a + r, b + r) for a, b in ax.transData.transform(xy)]
    clusters = sorted(_label_clusters(policies), key=lambda c: not c[2])
    for (x, y), labels, on_front in clusters:
        first = None
        for offset, ha, va in _LABEL_SPOTS:
            note = ax.annotate(
                _join_labels(labels),
                (x, y),
                xytext=offset,
                textcoords="offset points",
                ha=ha,
                va=va,
                fontsize=7,
                color="black" if on_front else "dimgray",
            )
            box = note.get_window_extent(renderer)
            inside = (
                frame.containsx(box.x0)
                and frame.containsx(box.x1)
                and frame.containsy(box.y0)
                and frame.containsy(box.y1)
            )
            if inside and not any(box.overlaps(t) for t in taken):
                taken.append(box)
                if first is not None:
                    first.remove()
                break
            if first is None and on_front:
                first = note  # kept if no spot is free
            else:
                note.remove()
        else:
            if first is not None:
                taken.append(first.get_window_extent(renderer))


def _label_clusters(
    policies: pd.DataFrame,
) -> list[tuple[tuple[float, float], list[str], bool]]:
    """Policies whose points would overprint (within ~1 % of the axes) share one label."""
    x = policies["cost_usd"].to_numpy(dtype=float)
    y = policies["latency_p99_s"].to_numpy(dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    dx = max(float(np.ptp(x[ok])) if ok.any() else 0.0, 1e-9) * 0.012
    dy = max(float(np.ptp(y[ok])) if ok.any() else 0.0, 1e-9) * 0.025
    clusters: list[tuple[tuple[float, float], list[str], bool]] = []
    for xi, yi, label, front in zip(x, y, policies["policy"], policies["pareto"], strict=True):
        if not (math.isfinite(xi) and math.isfinite(yi)):
            continue
        for i, ((cx, cy), labels, on_front) in enumerate(clusters):
            if abs(xi - cx) <= dx and abs(yi - cy) <= dy:
                clusters[i] = ((cx, max(cy, yi)), [*labels, str(label)], on_front or bool(front))
                break
        else:
            clusters.append(((xi, yi), [str(label)], bool(front)))
    return clusters


def _join_labels(labels: list[str]) -> str:
    """`surge=25 stab=0` and `surge=25 stab=120` read as `surge=25 stab=0,120`, and percentages
    with the same stabilization times join too: `surge=10,25 stab=0,120`."""
    by_head: dict[str, list[str]] = {}
    for label in labels:
        head, _, stab = label.partition(" stab=")
        by_head.setdefault(head, []).append(stab)
    joined: dict[tuple[str, str], list[str]] = {}
    for head, stabs in by_head.items():
        mode, _, pct = head.partition("=")
        joined.setdefault((mode, ",".join(stabs)), []).append(pct)
    return "; ".join(f"{m}={','.join(p)} stab={st}" for (m, st), p in joined.items())


def draw_durations(ax: Axes, policies: pd.DataFrame) -> None:
    """Rollout duration per setting: one bar per policy, the range over runs as a whisker."""
    p = policies.sort_values(
        ["mode", "max_surge_percent", "max_unavailable_percent", "stabilization_time_seconds"]
    )
    mean = p["rollout_duration_s"].to_numpy(dtype=float) / 60
    lo = mean - p["rollout_duration_min_s"].to_numpy(dtype=float) / 60
    hi = p["rollout_duration_max_s"].to_numpy(dtype=float) / 60 - mean
    x = np.arange(len(p))
    colors = [MODE_COLORS.get(m, "gray") for m in p["mode"]]
    ax.bar(x, np.nan_to_num(mean), color=colors, yerr=np.nan_to_num([lo, hi]), capsize=3)
    ax.set_xticks(x, p["policy"], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("rollout duration, min")
    ax.set_title("Rollout duration per setting (bar: mean over runs; whisker: range)")
    ax.title.set_fontsize(10)
    handles = [Rectangle((0, 0), 1, 1, color=c) for c in MODE_COLORS.values()]
    ax.legend(handles, list(MODE_COLORS), fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def draw_blast(ax: Axes, policies: pd.DataFrame) -> None:
    """Bad requests (worst bad-release run) against the good release's rollout duration: the
    speed a policy buys with exposure. Hollow: not caught before all traffic reached it."""
    for mode, color in MODE_COLORS.items():
        p = policies[policies["mode"] == mode]
        if not len(p):
            continue
        x = p["rollout_duration_s"].to_numpy(dtype=float) / 60
        y = p["bad_requests"].to_numpy(dtype=float)
        caught = p["bad_caught"].fillna(False).to_numpy(dtype=bool)
        ax.scatter(x[caught], y[caught], color=color, label=f"{mode}: caught", zorder=3)
        ax.scatter(
            x[~caught], y[~caught], facecolors="none", edgecolors=color, zorder=3,
            label=f"{mode}: not caught before 100 %",
        )  # fmt: skip
        for xi, yi, label in zip(x, y, p["policy"], strict=True):
            ax.annotate(
                label.split(" ", 1)[1] if " " in label else label,
                (xi, yi), textcoords="offset points", xytext=(4, 3), fontsize=6,
            )  # fmt: skip
    ax.set_xlabel("rollout duration with the good release, min (mean)")
    ax.set_ylabel("bad requests (worst run)")
    ax.set_yscale("symlog", linthresh=100)
    ax.set_title("Bad release: blast radius against rollout speed")
    ax.title.set_fontsize(10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def plot_blast(policies: pd.DataFrame, path: Path) -> None:
    fig = Figure(figsize=(7.5, 4.8), dpi=110, layout="tight")
    draw_blast(fig.subplots(), policies)
    fig.savefig(path)


def plot_pareto(policies: pd.DataFrame, path: Path, slo: Slo, rec: Recommendation) -> None:
    fig = Figure(figsize=(7.5, 4.8), dpi=110, layout="tight")
    FigureCanvasAgg(fig)  # a canvas that can measure text, for label placement
    draw_pareto(fig.subplots(), policies, slo, rec)
    fig.savefig(path)


def plot_durations(policies: pd.DataFrame, path: Path) -> None:
    fig = Figure(figsize=(max(6.0, 0.45 * len(policies) + 2), 4.2), dpi=110, layout="tight")
    draw_durations(fig.subplots(), policies)
    fig.savefig(path)


# --- report.md -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportInputs:
    """What report.md is written from; plain values so the text is reproducible."""

    scenario: str
    seeds: list[int]
    slo: Slo
    policies: pd.DataFrame
    recommendation: Recommendation
    windows: list[str]  # slo_window of every row
    horizon_s: float  # the common horizon costs are compared over
    rollout_times: list[float]  # rollout.at_s of the runs
    fleet: FleetSpec  # for the billing
    images: dict[str, str]  # caption -> file name, in order
    guard_pick: str | None = None  # with a bad release: the policy that limits it best
    failures: list[str] = field(default_factory=list)  # `policy seed=…: Error: message`
    failed: int = 0  # how many simulations failed (failures may list only the first ones)


def billing_text(fleet: FleetSpec) -> str:
    """The billing a sweep's costs use, in words."""
    price = f"${fleet.gpu_hour_usd:g} per GPU-hour"
    if fleet.billing == "reserved":
        text = (
            f"**reserved** — all {fleet.gpu_capacity} reserved GPUs are paid for the whole "
            f"span at {price}, used or not"
        )
    else:
        text = (
            f"**held** — reserved GPUs are paid at {price} while a replica holds them "
            "(starting, serving or draining)"
        )
    od = fleet.on_demand
    if od is not None:
        text += (
            f"; on-demand nodes of {fleet.gpus_per_node} GPUs (up to {od.max_nodes}) at "
            f"${od.node_hour_usd:g} per node-hour from request to release"
        )
    return text


def render_report(r: ReportInputs) -> str:
    rec = r.recommendation
    n_policies = len(r.policies)
    n_times = len(r.rollout_times)
    window = (
        "the worst 5-minute window of the rollout (the highest p99 over 5-minute arrival "
        "windows between the rollout's start and end)"
        if all(w == "worst 5 min" for w in r.windows)
        else "the worst 5-minute window of the rollout where it had enough requests, else the "
        "whole rollout window or run"
    )
    times = (
        f" × {n_times} rollout times ({', '.join(f'{t:g} s' for t in r.rollout_times)})"
        if n_times > 1
        else f"; the rollout starts at {r.rollout_times[0]:g} s"
    )
    runs = n_policies * len(r.seeds) * n_times
    on_demand = r.fleet.on_demand is not None
    lines = [
        f"# Sweep report: {r.scenario}",
        "",
        f"**{rec.message}**",
        "",
        f"- Grid: {n_policies} policies × {len(r.seeds)} seeds "
        f"(seeds {', '.join(map(str, r.seeds))}){times}; {runs} simulations.",
        f"- SLO: {describe_slo(r.slo)}. Latency and TTFT are judged on {window}; drops and "
        "failed requests on the whole run. A policy meets the SLO only if it does on every run.",
        f"- Billing: {billing_text(r.fleet)}.",
        f"- Cost: over a common horizon of {r.horizon_s / 60:.1f} min, the longest simulated "
        "run (a run lasts until the trace ends and the rollout is done, so a slow rollout "
        "lengthens its own run; shorter runs are extended at what an hour cost at their end); "
        f"mean over runs. Policies within ${COST_RESOLUTION_USD:.2f} of the cheapest count as "
        "equally cheap: among them the lowest worst-run p99 wins, then the faster rollout.",
        "- *Reserve GPUs*: the reservation with which the policy never waits for a GPU nor buys "
        "a node (its peak GPUs held, in whole nodes).",
        f"- Riskiest setting (furthest from the SLO on its worst run): `{rec.riskiest}`.",
        "",
        "## Policies",
        "",
        "Latency, TTFT, drops and failures are each policy's worst run. *p99* and *TTFT p99* are "
        "what the SLO judges: the highest p99 over 5-minute arrival windows inside the "
        "rollout. *Whole rollout* is the p99 over every request that arrived during the "
        "rollout, shown for comparison: in a long rollout it dilutes a few slow minutes.",
        "",
    ]
    head = (
        "| policy | cost USD | p99 s | TTFT p99 s | whole rollout: p99 / TTFT p99 s"
        " | drops | failed | rollout min (mean) | peak GPUs | reserve GPUs |"
    )
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    if on_demand:
        head += " on-demand node-h | on-demand USD |"
        rule += "---:|---:|"
    lines += [head + " meets SLO | Pareto |", rule + "---|---|"]
    for _, p in r.policies.sort_values(["cost_usd", "rollout_duration_s"]).iterrows():
        mark = "**" if p["policy"] == rec.policy else ""
        row = (
            f"| {mark}{p['policy']}{mark} | {_num(p['cost_usd'])} | {_num(p['latency_p99_s'])} | "
            f"{_num(p['ttft_p99_s'])} | {_num(p['latency_p99_rollout_s'])} / "
            f"{_num(p['ttft_p99_rollout_s'])} | {p['drop_rate']:.2%} | {p['failed_rate']:.2%} | "
            f"{_num(p['rollout_duration_s'] / 60, '.1f')} | {_num(p['peak_gpus'], '.0f')} | "
            f"{_num(p['reserve_gpus'], '.0f')} |"
        )
        if on_demand:
            row += f" {p['on_demand_node_hours']:.2f} | {p['cost_on_demand_usd']:.2f} |"
        lines.append(
            row + f" {int(p['runs_meeting_slo'])}/{int(p['runs'])} | "
            f"{'yes' if p['pareto'] else ''} |"
        )
    lines.append("")
    capped = r.policies.dropna(subset=["pool_capped_at"])
    if len(capped):
        which = ", ".join(
            f"`{p['policy']}` (down to {int(p['pool_capped_at'])})" for _, p in capped.iterrows()
        )
        lines += [
            f"The cluster's GPUs capped the pool of {which}: a step must fit in the GPUs, so "
            "the pool ran with fewer replicas than desired during the "
            "rollout (see the `capped` events of its history).",
            "",
        ]
    if r.guard_pick is not None:
        lines += _bad_release_lines(r)
    if r.failures:
        lines += [
            "## Failed simulations",
            "",
            f"{r.failed} of {runs} simulations raised an error and have no numbers "
            "(`outcome` `error` in `sweep.csv`); their policies count as not meeting the SLO:",
            "",
            *(f"- `{line}`" for line in r.failures),
            "",
        ]
    for caption, name in r.images.items():
        lines += [f"## {caption}", "", f"![{caption}]({name})", ""]
    lines += [
        "Every row of `sweep.csv` is one simulation (policy, seed and rollout time); its summary "
        "columns equal the `summary.json` of `rollout simulate SCENARIO --policy ... "
        "--stabilization ... --seed ...` (with `rollout.at_s` set to the row's "
        "`rollout_at_s`).",
        "",
    ]
    return "\n".join(lines)


def _bad_release_lines(r: ReportInputs) -> list[str]:
    lines = [
        "## Bad release",
        "",
        f"**{r.guard_pick}**",
        "",
        "Each policy also rolled out the sweep's bad release (`sweep.bad_release`), on the same "
        "seeds. *Bad requests* are the requests the bad release handled, answered or failed "
        "(worst run); *detected* is the time from its first request to the guard's action "
        "(worst run); *caught* says whether the guard acted before all traffic reached it on "
        "every run.",
        "",
        "| policy | bad requests (worst) | bad requests (mean) | detected s (worst) | caught |"
        " rollout min (good) | meets SLO (good) |",
        "|---|---:|---:|---:|---|---:|---|",
    ]
    for _, p in r.policies.sort_values(["bad_requests", "rollout_duration_s"]).iterrows():
        lines.append(
            f"| {p['policy']} | {_num(p['bad_requests'], ',.0f')} | "
            f"{_num(p['bad_requests_mean'], ',.0f')} | {_num(p['detect_s'], '.0f')} | "
            f"{int(p['bad_runs_caught'])}/{int(p['runs'])} | "
            f"{_num(p['rollout_duration_s'] / 60, '.1f')} | {'yes' if p['slo_met'] else 'no'} |"
        )
    return [*lines, ""]


def _num(x: float, fmt: str = ".2f") -> str:
    return format(float(x), fmt) if finite(float(x)) else "–"
