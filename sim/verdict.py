"""What a sweep means: SLO verdicts, comparable costs, the per-policy table, the Pareto front
and the recommendation. Pure: plain tables in (one row per simulation), tables and a
`Recommendation` out, so it is tested without a simulation and re-runs on a `sweep.csv` written
earlier. `sim/report.py` draws and writes what this decides.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

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


def finite(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(float(x))


def assess(rows: pd.DataFrame, slo: Slo) -> pd.DataFrame:
    """Rows as simulated (one per policy, seed and rollout time) plus comparable cost and the
    SLO verdict."""
    return evaluate_slo(add_horizon_cost(rows), slo)


def add_horizon_cost(rows: pd.DataFrame) -> pd.DataFrame:
    """Cost over one horizon for every row: the longest run of the sweep.

    A simulation runs until the trace ends and the rollout has finished, so a slow rollout makes
    its own run longer and its `cost_usd` covers more time than the others'. Each shorter run is
    extended at what an hour cost at its end (`cost_rate_end_usd_h`: the fleet is steady once
    the rollout is over), so the costs compare like for like.
    """
    out = rows.copy()
    horizon = float(out["span_s"].max())
    extra_h = (horizon - out["span_s"].astype(float)) / 3600
    out["horizon_s"] = horizon
    out["cost_horizon_usd"] = out["cost_usd"].astype(float) + extra_h * out[
        "cost_rate_end_usd_h"
    ].astype(float)
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
    failed = out["failed"].astype(float) if "failed" in out else 0.0
    out["failed_rate"] = np.where(requests > 0, failed / requests, 0.0)
    verdicts = []
    for _, r in out.iterrows():
        latency, window = _judged(r, "latency")
        ttft, _ = _judged(r, "ttft")
        terms = _slo_terms(slo, latency, ttft, float(r["drop_rate"]), float(r["failed_rate"]))
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
        if finite(value):
            return float(value), window
    return math.nan, "run"


def _slo_terms(
    slo: Slo,
    latency: object,
    ttft: object,
    drop_rate: float | None = None,
    failed_rate: float | None = None,
) -> list[tuple[float, str]]:
    """(measured / allowed, what broke) per SLO term; a missing measurement counts as broken.
    Without rates (the worst-5-minute severity) only the latency terms count."""
    terms = []
    for name, value, limit, unit in [
        ("p99", latency, slo.latency_p99_s, "s"),
        ("TTFT p99", ttft, slo.ttft_p99_s, "s"),
        ("drops", drop_rate, slo.max_drop_rate, "%"),
        ("failed", failed_rate, slo.max_failed_rate, "%"),
    ]:
        if limit is None or (unit == "%" and value is None):
            continue
        v = float(value) if finite(value) else math.nan
        shown = f"{v:.2%} > {limit:.2%}" if unit == "%" else f"{v:.3g} s > {limit:g} s"
        terms.append((_ratio(v, limit), f"{name} {shown}"))
    return terms


def worst_run(rows: pd.DataFrame, policy: str) -> tuple[int, float | None]:
    """The run worth drawing for a policy: its worst (seed, rollout time), by either severity
    (the first on ties). The time is None when the sweep does not vary it."""
    mine = rows[rows["policy"] == policy]
    risk = np.maximum(mine["slo_severity"], mine["worst5m_severity"]).to_numpy(float)
    row = mine.iloc[int(np.argmax(risk))]
    at = row.get("rollout_at_s")
    return int(row["seed"]), None if at is None or not finite(at) else float(at)


def _ratio(value: float, limit: float) -> float:
    if not math.isfinite(value):
        return math.inf
    if limit == 0:
        return 0.0 if value == 0 else math.inf
    return value / limit


def policy_table(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per policy: mean cost, worst-run latency and severity, rollout duration spread.

    Worst run (seed and rollout time), not mean, for the risk columns: the recommendation must
    hold on every run.
    """
    g = rows.groupby("policy", sort=False)
    table = g[POLICY_COLUMNS[1:]].first()
    table["runs"] = g.size()
    table["seeds"] = g["seed"].nunique()
    table["rollout_times"] = g["rollout_at_s"].nunique() if "rollout_at_s" in rows else 1
    table["cost_usd"] = g["cost_horizon_usd"].mean()  # comparable across policies
    for key in ("cost_gpu_usd", "cost_on_demand_usd", "on_demand_node_hours"):
        table[key] = g[key].mean() if key in rows.columns else 0.0
    table["gpu_hours"] = g["gpu_hours"].mean()
    table["peak_gpus"] = g["peak_gpus"].max()
    has_reserve = "reserve_gpus" in rows
    table["reserve_gpus"] = g["reserve_gpus"].max() if has_reserve else table["peak_gpus"]
    table["latency_p99_s"] = g["slo_latency_p99_s"].max()
    table["ttft_p99_s"] = g["slo_ttft_p99_s"].max()
    for key in ("latency_p99_rollout_s", "ttft_p99_rollout_s"):  # informative, not judged
        table[key] = g[key].max() if key in rows.columns else math.nan
    table["drop_rate"] = g["drop_rate"].max()
    table["failed_rate"] = g["failed_rate"].max()
    table["rollout_duration_s"] = g["rollout_duration_s"].mean()
    capped = "pool_capped_at" in rows.columns
    table["pool_capped_at"] = g["pool_capped_at"].min() if capped else math.nan
    table["rollout_duration_min_s"] = g["rollout_duration_s"].min()
    table["rollout_duration_max_s"] = g["rollout_duration_s"].max()
    table["slo_severity"] = g["slo_severity"].max()
    table["runs_meeting_slo"] = g["slo_met"].sum().astype(int)
    table["slo_met"] = g["slo_met"].all()
    table["succeeded"] = g["outcome"].apply(lambda s: bool((s == "succeeded").all()))
    table["pareto"] = pareto_front(table["cost_usd"].to_numpy(), table["latency_p99_s"].to_numpy())
    return table.reset_index()


def pareto_front(cost: Sequence[float], latency: Sequence[float]) -> np.ndarray:
    """Mask of points no other point beats: another point dominates when it is no worse on both
    axes and strictly better on one. Equal points are all on the front."""
    c = np.asarray(cost, dtype=float)
    c = np.where(np.isnan(c), np.inf, c)  # a policy whose every run failed has no cost
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
    """The sweep's answer: the cheapest policy that meets the SLO on every run (seed and
    rollout time), or, when none does, the one that comes closest (lowest worst-run severity
    among successful rollouts)."""

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
            f"({describe_slo(slo)}) on all {runs_text(best)}: "
            f"${best['cost_usd']:.2f} GPU cost, p99 {best['latency_p99_s']:.2f} s in the rollout's "
            f"worst 5 minutes (worst run), rollout {best['rollout_duration_s'] / 60:.1f} min."
        )
    else:
        ranked = policies.assign(_failed=~policies["succeeded"]).sort_values(
            ["_failed", "slo_severity", "cost_usd"], kind="stable"
        )
        best = ranked.iloc[0]
        message = (
            f"No policy meets the SLO ({describe_slo(slo)}) on every run. Closest: "
            f"{_policy_text(best)}, which meets it on {int(best['runs_meeting_slo'])} of "
            f"{runs_text(best)}; worst run at {best['slo_severity']:.2f}× the limit "
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


def blast_table(bad_rows: pd.DataFrame) -> pd.DataFrame:
    """Per policy, what its bad-release runs exposed: the worst run's bad requests and detection
    time, and whether the guard caught the release before all traffic reached it on every run
    (it tripped with the candidate's weight below 1)."""
    caught = bad_rows["guard_tripped_weight"].fillna(1.0) < 1.0
    g = bad_rows.assign(_caught=caught).groupby("policy", sort=False)
    return pd.DataFrame(
        {
            "bad_requests": g["bad_requests"].max(),
            "bad_requests_mean": g["bad_requests"].mean(),
            "detect_s": g["detect_s"].max(),
            "bad_caught": g["_caught"].all(),
            "bad_runs_caught": g["_caught"].sum().astype(int),
        }
    ).reset_index()


def guard_pick(policies: pd.DataFrame, slo: Slo) -> str:
    """The policy that catches the bad release on every run with the fewest bad requests
    (worst run) while meeting the SLO with the good one; ties go to the faster rollout."""
    ok = policies[policies["slo_met"] & policies["bad_caught"].fillna(False).astype(bool)]
    if not len(ok):
        return (
            "Bad release: no policy both meets the SLO with the good release and catches the bad "
            "one before all traffic reaches it on every run."
        )
    best = ok.sort_values(["bad_requests", "rollout_duration_s"], kind="stable").iloc[0]
    return (
        f"Bad release: {_policy_text(best)} catches it with the fewest bad requests while "
        f"meeting the SLO ({describe_slo(slo)}) with the good one: at most "
        f"{int(best['bad_requests']):,} bad requests, detected within {best['detect_s']:.0f} s "
        f"of its first request (worst of {runs_text(best)}); rollout "
        f"{best['rollout_duration_s'] / 60:.1f} min."
    )


def riskiest(policies: pd.DataFrame, slo: Slo) -> str:
    """The policy furthest from the SLO (worst run); without SLO terms, the highest p99."""
    has_terms = any(v is not None for v in slo.model_dump().values())
    key = "slo_severity" if has_terms else "latency_p99_s"
    ranked = policies.assign(_ok=policies["succeeded"]).sort_values(
        ["_ok", key], ascending=[True, False], kind="stable"
    )
    return str(ranked.iloc[0]["policy"])


def runs_text(row: pd.Series) -> str:
    """`3 seeds`, or `6 runs (3 seeds × 2 rollout times)` when the sweep varies the time."""
    seeds, times = int(row["seeds"]), int(row.get("rollout_times", 1))
    if times <= 1:
        return f"{seeds} seeds"
    return f"{seeds * times} runs ({seeds} seeds × {times} rollout times)"


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
    if slo.max_failed_rate is not None:
        parts.append(f"failed ≤ {slo.max_failed_rate:.2%}")
    return ", ".join(parts) + (", " if parts else "") + "rollout succeeded"
