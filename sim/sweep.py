"""`rollout sweep`: every policy of a scenario's grid on several seeds, in parallel.

Points are independent simulations, so they run in local processes or as Ray tasks on a cluster
(`sim/sweep_runners.py`). The scenario's files are read once, here, before any point runs, and
shipped with the work. Every point's numbers depend only on (scenario, policy, seed), so the
backend and the worker count never change the results; rows come back in the grid's order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from rollout.errors import InputError
from rollout.policy import RolloutPolicy
from rollout.scenario import Scenario, load_scenario
from sim.api import simulate
from sim.inputs import Inputs, read_inputs
from sim.sweep_runners import (
    PointFn,
    PointOutcome,
    default_workers,
    progress_bar,
    run_processes,
    run_ray,
    run_serial,
)

if TYPE_CHECKING:
    from sim.verdict import Recommendation

# Summary keys copied into sweep.csv, in this order; other scalar keys the simulator adds follow.
METRICS = [
    "requests",
    "completed",
    "dropped",
    "latency_p50_s",
    "latency_p99_s",
    "ttft_p99_s",
    "latency_p99_rollout_s",
    "ttft_p99_rollout_s",
    "rollout_start_s",
    "rollout_end_s",
    "rollout_duration_s",
    "steps",
    "failed",
    "gpu_hours",
    "cost_usd",
    "peak_gpus",
    "reserve_gpus",
    "min_ready_replicas",
    "outcome",
]
_NOT_METRICS = {"policy", "seed", "scenario"}


@dataclass(frozen=True)
class SweepPoint:
    """One simulation of the sweep; `index` is its place in the grid's order. `rollout_at_s`
    replaces the scenario's `rollout.at_s` (None: the scenario's own)."""

    index: int
    policy: RolloutPolicy
    seed: int
    rollout_at_s: float | None = None
    bad: bool = False  # rolls out the sweep's bad release instead of the candidate

    @property
    def label(self) -> str:
        at = "" if self.rollout_at_s is None else f" at={self.rollout_at_s:g}"
        return f"{self.policy.label()} seed={self.seed}{at}{' bad release' if self.bad else ''}"

    def scenario(self, base: Scenario) -> Scenario:
        """The scenario this point simulates: its policy, its rollout time if it has one, and
        the bad release's overrides on the candidate for a bad point."""
        scenario = base.with_policy(self.policy)
        assert scenario.rollout is not None  # with_policy always sets one
        update: dict[str, Any] = {}
        if self.rollout_at_s is not None:
            update["at_s"] = self.rollout_at_s
        if self.bad:
            assert base.sweep is not None and base.sweep.bad_release is not None
            bad = base.sweep.bad_release
            changes = {k: getattr(bad, k) for k in bad.model_fields_set}
            update["candidate"] = scenario.rollout.candidate.model_copy(update=changes)
        if not update:
            return scenario
        rollout = scenario.rollout.model_copy(update=update)
        return scenario.model_copy(update={"rollout": rollout})


def sweep_points(scenario: Scenario) -> list[SweepPoint]:
    """The grid × rollout times × seeds, validated before any work starts (the first invalid
    point raises).

    Seeds are `scenario.seed + i`, so seed i of a sweep is reproducible with `--seed`.
    """
    grid = scenario.sweep
    if grid is None:
        raise InputError(f"scenario '{scenario.name}' has no sweep grid: add a `sweep:` section")
    base = scenario.rollout.policy if scenario.rollout else RolloutPolicy(max_surge_percent=25)
    seeds = [scenario.seed + i for i in range(grid.seeds)]
    policies = grid.policies(base)
    labels = [p.label() for p in policies]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise InputError(f"the sweep grid lists the policy {dupes[0]} twice")
    times: list[float | None] = list(grid.rollout_at_s) or [None]
    if scenario.rollout is not None:
        for ctl in scenario.rollout.controls:
            early = [t for t in times if t is not None and t > ctl.at_s]
            if early:
                raise InputError(
                    f"sweep.rollout_at_s {early[0]:g} is after a scripted control at "
                    f"{ctl.at_s:g} s (rollout.controls)"
                )
    combos = [(p, at, seed) for p in policies for at in times for seed in seeds]
    bad = [False] if grid.bad_release is None else [False, True]
    return [
        SweepPoint(i, p, seed, at, b)
        for i, (b, (p, at, seed)) in enumerate((b, c) for b in bad for c in combos)
    ]


def simulate_point(scenario: Scenario, point: SweepPoint, inputs: Inputs) -> dict[str, Any]:
    """The real point function: one simulation, reduced to its summary's scalars."""
    result = simulate(point.scenario(scenario), seed=point.seed, inputs=inputs)
    summary = result.summary
    extra: dict[str, Any] = {}
    for column in ("latency_s", "ttft_s"):
        extra[f"{column[:-2]}_p99_worst5m_s"] = worst_window_p99(
            result.requests, column, summary.get("rollout_start_s"), summary.get("rollout_end_s")
        )
    return summary_metrics(summary) | extra


WORST_WINDOW_S = 300.0
WORST_WINDOW_MIN_REQUESTS = 50


def worst_window_p99(
    requests: pd.DataFrame, column: str, start: float | None, end: float | None
) -> float | None:
    """The highest p99 of `column` over 5-minute arrival windows inside the rollout.

    The rollout-window p99 dilutes a few bad minutes in a long rollout; this does not. Windows
    with fewer than 50 served requests are skipped (their p99 is nearly their maximum).
    """
    if start is None or end is None:
        return None
    arrival = requests["arrival_s"]
    inside = requests[(arrival >= start) & (arrival <= end)]
    inside = inside[inside[column].notna()]  # served (not dropped, not failed)
    bins = ((inside["arrival_s"] - start) // WORST_WINDOW_S).astype(int)
    groups = inside.groupby(bins)[column]
    p99 = groups.quantile(0.99)[groups.size() >= WORST_WINDOW_MIN_REQUESTS]
    return float(p99.max()) if len(p99) else None


def summary_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    extra = sorted(k for k in summary if k not in METRICS and k not in _NOT_METRICS)
    out: dict[str, Any] = {}
    for key in [*METRICS, *extra]:
        value = summary.get(key)
        if value is None or isinstance(value, bool | int | float | str):
            out[key] = value
    return out


# --- the sweep ---------------------------------------------------------------------------------


@dataclass
class SweepResult:
    """Rows in grid order (policy, then seed), the per-policy table and the recommendation."""

    scenario: Scenario
    points: list[SweepPoint]
    rows: pd.DataFrame
    policies: pd.DataFrame
    recommendation: Recommendation
    point_seconds: list[float]  # per point, time inside the simulation
    wall_s: float
    backend: str
    bad_rows: pd.DataFrame | None = None  # the bad release's runs (sweep.bad_release)
    guard_pick: str | None = None  # the sentence naming the policy that limits it best
    inputs: Inputs = field(default_factory=Inputs)  # the scenario's files, as read
    failures: list[str] = field(default_factory=list)  # `policy seed=…: Error: message`

    @property
    def complete(self) -> bool:
        return not self.failures

    def point(self, policy: str) -> SweepPoint:
        """The first point (seed, rollout time) of a policy label."""
        return next(p for p in self.points if p.policy.label() == policy)


def run_sweep(
    scenario: Scenario,
    *,
    workers: int | None = None,
    ray_address: str | None = None,
    progress: bool = False,
    point_fn: PointFn | None = None,  # None: simulate_point
    inputs: Inputs | None = None,  # the scenario's files, if already read; else read here
) -> SweepResult:
    """Run the scenario's grid: serially for one worker, else in worker processes or Ray tasks.

    Everything the points need is checked and read first (grid, runner options, the files the
    scenario names): bad input raises InputError before any point runs. A point whose
    simulation raises is a row with `outcome` `error` and its one-line `error`, listed in
    `failures`; the others complete. If every point fails, RuntimeError says why.
    """
    from sim import verdict

    points = sweep_points(scenario)
    _check_runner(workers, ray_address)
    scenario = scenario.with_engine_profiles()
    inputs = read_inputs(scenario) if inputs is None else inputs
    n = min(workers or default_workers(), len(points))
    point_fn = point_fn or simulate_point

    outcomes: dict[int, PointOutcome] = {}
    t0 = time.perf_counter()
    with progress_bar(len(points), progress) as advance:
        if ray_address is not None:
            backend = f"ray ({ray_address})"
            stream = run_ray(point_fn, scenario, inputs, points, ray_address, advance)
        elif n == 1:
            backend = "1 process"
            stream = run_serial(point_fn, scenario, inputs, points, advance)
        else:
            backend = f"{n} processes (this one and {n - 1} spawned)"
            stream = run_processes(point_fn, scenario, inputs, points, n, advance)
        for out in stream:
            outcomes[out.index] = out
    wall = time.perf_counter() - t0

    failures = [f"{p.label}: {outcomes[p.index].error}" for p in points if outcomes[p.index].error]
    if len(failures) == len(points):
        raise RuntimeError(f"every simulation of the sweep failed; the first: {failures[0]}")
    ok = next(o.metrics for o in outcomes.values() if o.metrics is not None)
    good = [p for p in points if not p.bad]
    rows = pd.DataFrame([_row(scenario, p, outcomes[p.index], list(ok)) for p in good])
    rows = verdict.assess(rows, scenario.slo)
    policies = verdict.policy_table(rows)
    bad_rows, pick = None, None
    if len(good) < len(points):
        bad_rows = pd.DataFrame(
            [_row(scenario, p, outcomes[p.index], list(ok)) for p in points if p.bad]
        )
        policies = policies.merge(verdict.blast_table(bad_rows), on="policy", how="left")
        pick = verdict.guard_pick(policies, scenario.slo)
    return SweepResult(
        scenario=scenario,
        points=good,
        rows=rows,
        policies=policies,
        recommendation=verdict.recommend(policies, scenario.slo),
        point_seconds=[outcomes[p.index].seconds for p in points],
        wall_s=wall,
        backend=backend,
        bad_rows=bad_rows,
        guard_pick=pick,
        inputs=inputs,
        failures=failures,
    )


def _check_runner(workers: int | None, ray_address: str | None) -> None:
    if workers is not None and workers < 1:
        raise InputError(f"--workers must be at least 1 (got {workers})")
    if workers is not None and ray_address is not None:
        raise InputError("give either --workers or --ray-address, not both")


ERROR = "error"  # the `outcome` of a point whose simulation raised
SHOWN_FAILURES = 20  # failures listed by name on the terminal and in report.md
INCOMPLETE = 3  # `rollout sweep`'s exit code when some simulations failed (bad input: 2)


def shown_failures(failures: list[str]) -> list[str]:
    """The first SHOWN_FAILURES, then how many more (sweep.csv has them all)."""
    more = len(failures) - SHOWN_FAILURES
    return failures[:SHOWN_FAILURES] + ([f"… and {more} more (see sweep.csv)"] if more > 0 else [])


def _row(
    scenario: Scenario, point: SweepPoint, out: PointOutcome, keys: list[str]
) -> dict[str, Any]:
    """The point's policy fields and metrics; a failed point has the same columns, empty, with
    `outcome` `error`, and an `error` column (only in sweeps with a failure) says what broke."""
    if out.metrics is None:
        metrics = dict.fromkeys(keys) | {"outcome": ERROR, "error": out.error}
    else:
        metrics = out.metrics
    pol = point.policy
    at = point.rollout_at_s
    if at is None:
        at = scenario.rollout.at_s if scenario.rollout else 0.0
    return {
        "policy": pol.label(),
        "mode": pol.mode.value,
        "max_surge_percent": pol.max_surge_percent,
        "max_unavailable_percent": pol.max_unavailable_percent,
        "stabilization_time_seconds": pol.stabilization_time_seconds,
        "seed": point.seed,
        "rollout_at_s": at,
        **metrics,
    }


# --- files -------------------------------------------------------------------------------------

CSV_NAME = "sweep.csv"
BAD_CSV_NAME = "sweep-bad-release.csv"


def write_sweep(result: SweepResult, out_dir: Path | str, *, timelines: bool = True) -> Path:
    """Write sweep.csv, report.md and the plots; `timelines` re-simulates the recommended and the
    riskiest policy on their worst runs to draw their timelines."""
    from sim import report, verdict

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = result.rows.drop(columns=["slo_window"])
    rows.to_csv(out / CSV_NAME, index=False)
    rec = result.recommendation
    report.plot_pareto(result.policies, out / "pareto.png", result.scenario.slo, rec)
    report.plot_durations(result.policies, out / "durations.png")
    images = {
        "p99 latency in the worst 5 minutes of the rollout against GPU cost": "pareto.png",
        "Rollout duration per setting": "durations.png",
    }
    if result.bad_rows is not None:
        result.bad_rows.to_csv(out / BAD_CSV_NAME, index=False)
        report.plot_blast(result.policies, out / "blast.png")
        images["Bad release: blast radius against rollout duration"] = "blast.png"
    if timelines:
        from sim.plots import plot_timeline

        which = {"recommended": rec.policy, "riskiest": rec.riskiest}
        simulated = result.rows[result.rows["outcome"] != ERROR]
        for role, label in which.items():
            if label not in set(simulated["policy"]):
                continue  # every run of it failed: nothing to draw
            seed, at = verdict.worst_run(simulated, label)
            point = SweepPoint(0, result.point(label).policy, seed, at)
            sim = simulate(point.scenario(result.scenario), seed=seed, inputs=result.inputs)
            name = f"timeline-{role}.png"
            run = (
                f"seed {seed}"
                if len(set(result.rows["rollout_at_s"])) == 1
                else (f"seed {seed}, rollout at {at:g} s")
            )
            plot_timeline(sim, out / name, title=f"{role}: {label}, {run} (its worst)")
            images[f"Timeline of the {role} setting ({label}, its worst run: {run})"] = name
    text = report.render_report(
        report.ReportInputs(
            scenario=result.scenario.name,
            seeds=sorted({p.seed for p in result.points}),
            slo=result.scenario.slo,
            policies=result.policies,
            recommendation=rec,
            windows=list(result.rows["slo_window"]),
            horizon_s=float(result.rows["horizon_s"].iloc[0]),
            rollout_times=sorted(set(result.rows["rollout_at_s"])),
            fleet=result.scenario.fleet,
            images=images,
            guard_pick=result.guard_pick,
            failures=shown_failures(result.failures),
            failed=len(result.failures),
        )
    )
    (out / "report.md").write_text(text)
    return out


def sweep_command(
    path: Path, out: Path | None, *, workers: int | None, ray_address: str | None
) -> None:
    """The CLI's `rollout sweep`: validate everything, run, write, print the recommendation.

    Exits with INCOMPLETE (3) after writing everything when some simulations failed."""
    import typer

    scenario = load_scenario(path)
    points = sweep_points(scenario)  # fails on an invalid grid before anything runs
    _check_runner(workers, ray_address)
    inputs = read_inputs(scenario)  # and on a bad file
    out_dir = out or Path("out") / f"sweep-{scenario.name}"
    n_pol = len({p.policy for p in points})
    n_at = len({p.rollout_at_s for p in points})
    times = f" × {n_at} rollout times" if n_at > 1 else ""
    bad = " × good and bad release" if any(p.bad for p in points) else ""
    typer.echo(
        f"Sweeping {scenario.name}: {n_pol} policies × {len({p.seed for p in points})} seeds"
        f"{times}{bad} = {len(points)} simulations",
        err=True,
    )
    result = run_sweep(
        scenario, workers=workers, ray_address=ray_address, progress=True, inputs=inputs
    )
    write_sweep(result, out_dir)
    busy = sum(result.point_seconds)
    typer.echo(
        f"Ran {len(points)} simulations in {result.wall_s:.1f} s on {result.backend} "
        f"({busy:.1f} s of simulation); wrote {out_dir}/report.md, {CSV_NAME} and plots.",
        err=True,
    )
    typer.echo(result.recommendation.message)
    if result.guard_pick is not None:
        typer.echo(result.guard_pick)
    if result.failures:
        typer.echo(
            f"Incomplete: {len(result.failures)} of {len(points)} simulations failed "
            "(rows with outcome `error` in sweep.csv; policies with one cannot be recommended):",
            err=True,
        )
        for line in shown_failures(result.failures):
            typer.echo(f"  {line}", err=True)
        raise typer.Exit(INCOMPLETE)
