"""What a sweep means: SLO verdicts, the per-policy table, the Pareto front, the recommendation,
and the files a capacity planner reads (report.md and plots).

Everything here works on plain tables (one row per policy and seed), so it can be tested without
running a simulation and re-run on a `sweep.csv` written earlier.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.transforms import Bbox

from rollout.scenario import Slo

POLICY_COLUMNS = [
    "policy",
    "mode",
    "max_surge_percent",
    "max_unavailable_percent",
    "stabilization_time_seconds",
]

# Policies within a cent of the cheapest count as equally cheap; among them the one with the most
# latency margin wins (it is then also on the Pareto front), then the faster rollout.
COST_RESOLUTION_USD = 0.01

MODE_COLORS = {"surge": "tab:blue", "unavailable": "tab:orange"}


def _finite(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(float(x))


def assess(rows: pd.DataFrame, slo: Slo, gpu_hour_usd: float) -> pd.DataFrame:
    """Rows as simulated (one per policy and seed) plus comparable cost and the SLO verdict."""
    return evaluate_slo(add_horizon_cost(rows, gpu_hour_usd), slo)


def add_horizon_cost(rows: pd.DataFrame, gpu_hour_usd: float) -> pd.DataFrame:
    """Cost over one horizon for every row: the longest run of the sweep.

    A simulation runs until the trace ends and the rollout has finished, so a slow rollout makes
    its own run longer and its `cost_usd` covers more time than the others'. Each shorter run is
    extended at the GPU count it ended with (the fleet is steady once the rollout is over), so
    the costs compare like for like.
    """
    out = rows.copy()
    horizon = float(out["span_s"].max())
    extra_h = (horizon - out["span_s"].astype(float)) / 3600 * out["gpus_at_end"].astype(float)
    out["horizon_s"] = horizon
    out["cost_horizon_usd"] = out["cost_usd"].astype(float) + extra_h * gpu_hour_usd
    return out


def evaluate_slo(rows: pd.DataFrame, slo: Slo) -> pd.DataFrame:
    """Add the SLO verdict to each row (one policy and seed).

    Latency and TTFT are judged on the worst 5-minute window of the rollout (`*_worst5m_s`),
    since that is what the policy changes and what a p99 alert would see: over the whole
    rollout window a long, slow rollout dilutes its bad minutes. A row without such a window
    (too few requests) falls back to the rollout window, then to the whole run. `slo_severity`
    is the worst ratio of measured to allowed (above 1 is a violation), and a row only meets the
    SLO if its rollout also succeeded. `worst5m_severity` is the same ratio on the worst
    5-minute p99s alone.
    """
    out = rows.copy()
    requests = out["requests"].astype(float)
    out["drop_rate"] = np.where(requests > 0, out["dropped"].astype(float) / requests, 0.0)
    verdicts = []
    for _, r in out.iterrows():
        latency, window = _judged(r, "latency")
        ttft, _ = _judged(r, "ttft")
        terms = _slo_terms(slo, latency, ttft, float(r["drop_rate"]))
        broken = [text for ratio, text in terms if ratio > 1.0]
        if r["outcome"] != "succeeded":
            broken.append(f"rollout {r['outcome']}")
        worst5m = _slo_terms(slo, r.get("latency_p99_worst5m_s"), r.get("ttft_p99_worst5m_s"))
        verdicts.append(
            {
                "slo_window": window,
                "slo_latency_p99_s": latency,
                "slo_ttft_p99_s": ttft,
                "slo_severity": max((ratio for ratio, _ in terms), default=0.0),
                "worst5m_severity": max(
                    (ratio for ratio, _ in worst5m if math.isfinite(ratio)), default=0.0
                ),
                "slo_met": not broken,
                "slo_violation": "; ".join(broken),
            }
        )
    return pd.concat([out, pd.DataFrame(verdicts, index=out.index)], axis=1)


def _judged(row: pd.Series, metric: str) -> tuple[float, str]:
    """The p99 the SLO judges and where it was measured: the rollout's worst 5 minutes, else
    the whole rollout window, else the whole run."""
    for column, window in [
        (f"{metric}_p99_worst5m_s", "worst 5 min"),
        (f"{metric}_p99_rollout_s", "rollout"),
        (f"{metric}_p99_s", "run"),
    ]:
        value = row.get(column)
        if _finite(value):
            return float(value), window
    return math.nan, "run"


def _slo_terms(
    slo: Slo, latency: object, ttft: object, drop_rate: float | None = None
) -> list[tuple[float, str]]:
    """(measured / allowed, what broke) per SLO term; a missing measurement counts as broken."""
    terms = []
    for name, value, limit, unit in [
        ("p99", latency, slo.latency_p99_s, "s"),
        ("TTFT p99", ttft, slo.ttft_p99_s, "s"),
        ("drops", drop_rate, slo.max_drop_rate, "%"),
    ]:
        if limit is None or (name == "drops" and drop_rate is None):
            continue
        v = float(value) if _finite(value) else math.nan
        shown = f"{v:.2%} > {limit:.2%}" if unit == "%" else f"{v:.3g} s > {limit:g} s"
        terms.append((_ratio(v, limit), f"{name} {shown}"))
    return terms


def timeline_seed(rows: pd.DataFrame, policy: str) -> int:
    """The seed worth drawing for a policy: its worst, by either severity (first seed on ties)."""
    mine = rows[rows["policy"] == policy]
    risk = np.maximum(mine["slo_severity"], mine["worst5m_severity"]).to_numpy(float)
    return int(mine["seed"].iloc[int(np.argmax(risk))])


def _ratio(value: float, limit: float) -> float:
    if not math.isfinite(value):
        return math.inf
    if limit == 0:
        return 0.0 if value == 0 else math.inf
    return value / limit


def policy_table(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per policy: mean cost, worst-seed latency and severity, rollout duration spread.

    Worst seed, not mean, for the risk columns: the recommendation must hold on every seed.
    """
    g = rows.groupby("policy", sort=False)
    table = g[POLICY_COLUMNS[1:]].first()
    table["seeds"] = g.size()
    table["cost_usd"] = g["cost_horizon_usd"].mean()  # comparable across policies
    table["gpu_hours"] = g["gpu_hours"].mean()
    table["peak_gpus"] = g["peak_gpus"].max()
    table["latency_p99_s"] = g["slo_latency_p99_s"].max()
    table["ttft_p99_s"] = g["slo_ttft_p99_s"].max()
    for key in ("latency_p99_rollout_s", "ttft_p99_rollout_s"):  # informative, not judged
        table[key] = g[key].max() if key in rows.columns else math.nan
    table["drop_rate"] = g["drop_rate"].max()
    table["rollout_duration_s"] = g["rollout_duration_s"].mean()
    table["rollout_duration_min_s"] = g["rollout_duration_s"].min()
    table["rollout_duration_max_s"] = g["rollout_duration_s"].max()
    table["slo_severity"] = g["slo_severity"].max()
    table["seeds_meeting_slo"] = g["slo_met"].sum().astype(int)
    table["slo_met"] = g["slo_met"].all()
    table["succeeded"] = g["outcome"].apply(lambda s: bool((s == "succeeded").all()))
    table["pareto"] = pareto_front(table["cost_usd"].to_numpy(), table["latency_p99_s"].to_numpy())
    return table.reset_index()


def pareto_front(cost: Sequence[float], latency: Sequence[float]) -> np.ndarray:
    """Mask of points no other point beats: another point dominates when it is no worse on both
    axes and strictly better on one. Equal points are all on the front."""
    c = np.asarray(cost, dtype=float)
    lat = np.asarray(latency, dtype=float)
    lat = np.where(np.isnan(lat), np.inf, lat)
    front = np.ones(len(c), dtype=bool)
    order = np.lexsort((lat, c))  # by cost, then latency
    best = math.inf
    i = 0
    while i < len(order):
        # points with equal cost form one group: only the group's lowest latency can be on front
        j = i
        while j < len(order) and c[order[j]] == c[order[i]]:
            j += 1
        group = order[i:j]
        low = lat[group].min()
        for k in group:
            front[k] = lat[k] == low and low < best
        best = min(best, low)
        i = j
    return front


@dataclass(frozen=True)
class Recommendation:
    """The sweep's answer: the cheapest policy that meets the SLO on every seed, or, when none
    does, the one that comes closest (lowest worst-seed severity among successful rollouts)."""

    policy: str
    meets_slo: bool
    cost_usd: float
    latency_p99_s: float
    rollout_duration_s: float
    slo_severity: float
    riskiest: str
    message: str


def recommend(policies: pd.DataFrame, slo: Slo) -> Recommendation:
    """Pick from the per-policy table of `policy_table`."""
    ok = policies[policies["slo_met"]]
    if len(ok):
        cheap = ok[ok["cost_usd"] <= ok["cost_usd"].min() + COST_RESOLUTION_USD]
        order = ["latency_p99_s", "rollout_duration_s", "cost_usd"]
        best = cheap.sort_values(order, kind="stable").iloc[0]
        message = (
            f"Recommended: {_policy_text(best)} — the cheapest policy that meets the SLO "
            f"({describe_slo(slo)}) on all {int(best['seeds'])} seeds: "
            f"${best['cost_usd']:.2f} GPU cost, p99 {best['latency_p99_s']:.2f} s in the rollout's "
            f"worst 5 minutes (worst seed), rollout {best['rollout_duration_s'] / 60:.1f} min."
        )
    else:
        ranked = policies.assign(_failed=~policies["succeeded"]).sort_values(
            ["_failed", "slo_severity", "cost_usd"], kind="stable"
        )
        best = ranked.iloc[0]
        message = (
            f"No policy meets the SLO ({describe_slo(slo)}) on every seed. Closest: "
            f"{_policy_text(best)}, which meets it on {int(best['seeds_meeting_slo'])} of "
            f"{int(best['seeds'])} seeds; worst seed at {best['slo_severity']:.2f}× the limit "
            f"(rollout p99 {best['latency_p99_s']:.2f} s, drops {best['drop_rate']:.2%}"
            + ("" if best["succeeded"] else ", rollout did not always succeed")
            + ")."
        )
    return Recommendation(
        policy=str(best["policy"]),
        meets_slo=bool(best["slo_met"]),
        cost_usd=float(best["cost_usd"]),
        latency_p99_s=float(best["latency_p99_s"]),
        rollout_duration_s=float(best["rollout_duration_s"]),
        slo_severity=float(best["slo_severity"]),
        riskiest=riskiest(policies, slo),
        message=message,
    )


def riskiest(policies: pd.DataFrame, slo: Slo) -> str:
    """The policy furthest from the SLO (worst seed); without SLO terms, the highest p99."""
    has_terms = any(v is not None for v in slo.model_dump().values())
    key = "slo_severity" if has_terms else "latency_p99_s"
    ranked = policies.assign(_ok=policies["succeeded"]).sort_values(
        ["_ok", key], ascending=[True, False], kind="stable"
    )
    return str(ranked.iloc[0]["policy"])


def _policy_text(row: pd.Series) -> str:
    field = "max_surge_percent" if row["mode"] == "surge" else "max_unavailable_percent"
    return (
        f"{field}={int(row[field])}, "
        f"stabilization_time_seconds={row['stabilization_time_seconds']:g}"
    )


def describe_slo(slo: Slo) -> str:
    parts = []
    if slo.latency_p99_s is not None:
        parts.append(f"p99 latency ≤ {slo.latency_p99_s:g} s")
    if slo.ttft_p99_s is not None:
        parts.append(f"p99 TTFT ≤ {slo.ttft_p99_s:g} s")
    if slo.max_drop_rate is not None:
        parts.append(f"drops ≤ {slo.max_drop_rate:.2%}")
    return ", ".join(parts) + (", " if parts else "") + "rollout succeeded"


# --- plots -----------------------------------------------------------------------------------


def draw_pareto(ax: Axes, policies: pd.DataFrame, slo: Slo, rec: Recommendation) -> None:
    """p99 latency in the rollout's worst 5 minutes (worst seed) against GPU cost, with the
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
    ax.set_xlabel("GPU cost over the common horizon, USD (mean over seeds)")
    ax.set_ylabel("p99 latency, worst 5 min of the rollout, s\n(worst seed)")
    ax.set_title("Latency against cost per policy (outlined: meets the SLO on every seed)")
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
    """Name every point without overprinting: each label takes the first spot that overlaps no
    placed label, no marker and stays inside the axes (greedy, front labels first)."""
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
            if first is None:
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
    """`surge=25 stab=0` and `surge=25 stab=120` read as `surge=25 stab=0,120`."""
    by_mode: dict[str, list[str]] = {}
    for label in labels:
        head, _, stab = label.partition(" stab=")
        by_mode.setdefault(head, []).append(stab)
    return "; ".join(f"{head} stab={','.join(stabs)}" for head, stabs in by_mode.items())


def draw_durations(ax: Axes, policies: pd.DataFrame) -> None:
    """Rollout duration per setting: one bar per policy, the range over seeds as a whisker."""
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
    ax.set_title("Rollout duration per setting (bar: mean over seeds; whisker: range)")
    ax.title.set_fontsize(10)
    handles = [Rectangle((0, 0), 1, 1, color=c) for c in MODE_COLORS.values()]
    ax.legend(handles, list(MODE_COLORS), fontsize=8)
    ax.grid(axis="y", alpha=0.3)


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
    images: dict[str, str]  # caption -> file name, in order


def render_report(r: ReportInputs) -> str:
    rec = r.recommendation
    n_policies = len(r.policies)
    window = (
        "the worst 5-minute window of the rollout (the highest p99 over 5-minute arrival "
        "windows between the rollout's start and end)"
        if all(w == "worst 5 min" for w in r.windows)
        else "the worst 5-minute window of the rollout where it had enough requests, else the "
        "whole rollout window or run"
    )
    lines = [
        f"# Sweep report: {r.scenario}",
        "",
        f"**{rec.message}**",
        "",
        f"- Grid: {n_policies} policies × {len(r.seeds)} seeds "
        f"(seeds {', '.join(map(str, r.seeds))}) = {n_policies * len(r.seeds)} simulations.",
        f"- SLO: {describe_slo(r.slo)}. Latency and TTFT are judged on {window}; drops on the "
        "whole run. A policy meets the SLO only if it does on every seed.",
        f"- Cost: GPU-hours × price over a common horizon of {r.horizon_s / 60:.1f} min, the "
        "longest simulated run (a run lasts until the trace ends and the rollout is done, so a "
        "slow rollout lengthens its own run; shorter runs are extended at the GPU count they "
        "ended with); mean over seeds. Policies within "
        f"${COST_RESOLUTION_USD:.2f} of the cheapest count as equally cheap: among them the "
        "lowest worst-seed p99 wins, then the faster rollout.",
        f"- Riskiest setting (furthest from the SLO on its worst seed): `{rec.riskiest}`.",
        "",
        "## Policies",
        "",
        "Latency, TTFT and drops are each policy's worst seed. *p99* and *TTFT p99* are what "
        "the SLO judges: the highest p99 over 5-minute arrival windows inside the rollout. "
        "*Whole rollout* is the p99 over every request that arrived during the rollout, shown "
        "for comparison: in a long rollout it dilutes a few slow minutes.",
        "",
        "| policy | cost USD | p99 s | TTFT p99 s | whole rollout: p99 / TTFT p99 s"
        " | drops | rollout min (mean) | peak GPUs | meets SLO | Pareto |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for _, p in r.policies.sort_values(["cost_usd", "rollout_duration_s"]).iterrows():
        mark = "**" if p["policy"] == rec.policy else ""
        lines.append(
            f"| {mark}{p['policy']}{mark} | {p['cost_usd']:.2f} | {_num(p['latency_p99_s'])} | "
            f"{_num(p['ttft_p99_s'])} | {_num(p['latency_p99_rollout_s'])} / "
            f"{_num(p['ttft_p99_rollout_s'])} | {p['drop_rate']:.2%} | "
            f"{_num(p['rollout_duration_s'] / 60, '.1f')} | {_num(p['peak_gpus'], '.0f')} | "
            f"{int(p['seeds_meeting_slo'])}/{int(p['seeds'])} | {'yes' if p['pareto'] else ''} |"
        )
    lines.append("")
    for caption, name in r.images.items():
        lines += [f"## {caption}", "", f"![{caption}]({name})", ""]
    lines += [
        "Every row of `sweep.csv` is one simulation (policy and seed); its summary columns equal "
        "the `summary.json` of `rollout simulate SCENARIO --policy ... --stabilization ... "
        "--seed ...`.",
        "",
    ]
    return "\n".join(lines)


def _num(x: float, fmt: str = ".2f") -> str:
    return format(float(x), fmt) if _finite(float(x)) else "–"
