"""`rollout sweep`: every policy of a scenario's grid on several seeds, in parallel.

Points are independent simulations, so they run in local processes (this one plus spawned
helpers; the scenario is sent once per helper, each task carries only a policy and a seed) or as
Ray tasks on a cluster. Every
point's numbers depend only on (scenario, policy, seed), so the backend and the worker count
never change the results; rows come back in the grid's order.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from rollout.errors import InputError
from rollout.policy import RolloutPolicy
from rollout.scenario import Scenario, load_scenario
from sim.api import simulate

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


PointFn = Callable[[Scenario, SweepPoint], dict[str, Any]]


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


def simulate_point(scenario: Scenario, point: SweepPoint) -> dict[str, Any]:
    """The real point function: one simulation, reduced to its summary's scalars."""
    result = simulate(point.scenario(scenario), seed=point.seed)
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


# --- running points ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PointOutcome:
    index: int
    metrics: dict[str, Any]
    seconds: float  # time inside the point function (the simulation), measured where it ran


def run_point(fn: PointFn, scenario: Scenario, point: SweepPoint) -> PointOutcome:
    t0 = time.perf_counter()
    try:
        metrics = fn(scenario, point)
    except InputError:
        raise
    except Exception as e:
        raise RuntimeError(f"sweep point {point.label} failed: {type(e).__name__}: {e}") from e
    return PointOutcome(point.index, metrics, time.perf_counter() - t0)


_WORKER: tuple[PointFn, Scenario] | None = None


def _init_worker(fn: PointFn, scenario: Scenario) -> None:
    """Runs once per worker process: the scenario crosses the process boundary once."""
    global _WORKER
    _WORKER = (fn, scenario)


def _run_in_worker(point: SweepPoint) -> PointOutcome:
    assert _WORKER is not None, "worker not initialised"
    fn, scenario = _WORKER
    return run_point(fn, scenario, point)


Progress = Callable[[PointOutcome], None]


def _run_serial(
    fn: PointFn, scenario: Scenario, points: list[SweepPoint], done: Progress
) -> Iterator[PointOutcome]:
    for p in points:
        out = run_point(fn, scenario, p)
        done(out)
        yield out


def _run_processes(
    fn: PointFn, scenario: Scenario, points: list[SweepPoint], workers: int, done: Progress
) -> Iterator[PointOutcome]:
    """This process and `workers - 1` spawned helpers share the points.

    This process starts simulating at once while the helpers pay their start-up (a spawned
    Python importing the simulator, about a second). Each helper holds one point running and one
    queued, refilled the moment one finishes (from the future's callback), so it never waits for
    this process to hand it work and the tail at the end stays short.
    """
    todo = deque(points)
    lock = threading.Lock()
    finished: queue.SimpleQueue[Future[PointOutcome]] = queue.SimpleQueue()

    def take() -> SweepPoint | None:
        with lock:
            return todo.popleft() if todo else None

    # spawn, not fork: forking a process that may hold Ray or plotting threads is unsafe
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        max_workers=workers - 1, mp_context=ctx, initializer=_init_worker, initargs=(fn, scenario)
    ) as pool:

        def hand_out(_: object = None) -> None:  # runs in the pool's thread after each point
            point = take()
            if point is None:
                return
            try:
                future = pool.submit(_run_in_worker, point)
            except Exception as e:  # a broken or closed pool: report it through the queue
                future = Future()
                future.set_exception(e)
            future.add_done_callback(finished.put)
            future.add_done_callback(hand_out)

        try:
            for _ in range(2 * (workers - 1)):
                hand_out()
            for _ in points:
                # a helper's finished point first; else simulate one here; else (all handed
                # out) wait for the helpers' last points
                point = take() if finished.empty() else None
                if point is None:
                    out = _helper_result(finished.get())
                else:
                    out = run_point(fn, scenario, point)
                done(out)
                yield out
        finally:
            with lock:
                todo.clear()  # stop handing out; the pool finishes what is running


def _helper_result(future: Future[PointOutcome]) -> PointOutcome:
    try:
        return future.result()
    except BrokenProcessPool:
        raise RuntimeError(
            "a sweep worker process died: out of memory, killed, or it could not start "
            "(a script that calls run_sweep must do so under `if __name__ == '__main__':`, "
            "as worker processes are spawned)"
        ) from None


def _run_ray(
    fn: PointFn, scenario: Scenario, points: list[SweepPoint], address: str, done: Progress
) -> Iterator[PointOutcome]:
    import ray

    started_here = False
    if not ray.is_initialized():  # a notebook or test may already hold a session: use it
        _check_reachable(address)
        try:
            ray.init(address=address, log_to_driver=False, logging_level="WARNING")
        except Exception as e:  # Ray raises ConnectionError, ValueError or RuntimeError here
            raise InputError(f"cannot connect to the Ray cluster at {address!r}: {e}") from None
        started_here = True
    try:
        task = ray.remote(num_cpus=1, max_retries=2)(run_point)
        fn_ref, scenario_ref = ray.put(fn), ray.put(scenario)  # shipped once, not per task
        pending = [task.remote(fn_ref, scenario_ref, p) for p in points]
        while pending:
            # in batches: one wait per finished task would be quadratic for thousands of points
            ready, pending = ray.wait(pending, num_returns=min(64, len(pending)), timeout=0.5)
            for ref in ready:
                try:
                    out = ray.get(ref)
                except ray.exceptions.RayTaskError as e:
                    if isinstance(e.cause, InputError):  # bad input: its one line, no traceback
                        raise e.cause from None
                    raise e.as_instanceof_cause() from None
                done(out)
                yield out
    finally:
        if started_here:
            ray.shutdown()


def _check_reachable(address: str) -> None:
    """Fail in seconds on a wrong `host:port`: `ray.init` retries an unreachable GCS for minutes."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto", "local" and other forms Ray resolves itself
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
    except OSError as e:
        raise InputError(f"cannot connect to the Ray cluster at {address!r}: {e}") from None


def default_workers() -> int:
    return os.cpu_count() or 1


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

    def point(self, policy: str) -> SweepPoint:
        """The first point (seed, rollout time) of a policy label."""
        return next(p for p in self.points if p.policy.label() == policy)


def run_sweep(
    scenario: Scenario,
    *,
    workers: int | None = None,
    ray_address: str | None = None,
    progress: bool = False,
    point_fn: PointFn = simulate_point,
) -> SweepResult:
    """Run the scenario's grid: serially for one worker, else in worker processes or Ray tasks."""
    from sim import verdict

    points = sweep_points(scenario)
    _check_runner(workers, ray_address)
    n = min(workers or default_workers(), len(points))

    outcomes: dict[int, PointOutcome] = {}
    t0 = time.perf_counter()
    with _progress_bar(len(points), progress) as advance:
        if ray_address is not None:
            backend = f"ray ({ray_address})"
            stream = _run_ray(point_fn, scenario, points, ray_address, advance)
        elif n == 1:
            backend = "1 process"
            stream = _run_serial(point_fn, scenario, points, advance)
        else:
            backend = f"{n} processes (this one and {n - 1} spawned)"
            stream = _run_processes(point_fn, scenario, points, n, advance)
        for out in stream:
            outcomes[out.index] = out
    wall = time.perf_counter() - t0

    good = [p for p in points if not p.bad]
    rows = pd.DataFrame([_row(scenario, p, outcomes[p.index].metrics) for p in good])
    rows = verdict.assess(rows, scenario.slo)
    policies = verdict.policy_table(rows)
    bad_rows, pick = None, None
    if len(good) < len(points):
        bad_rows = pd.DataFrame(
            [_row(scenario, p, outcomes[p.index].metrics) for p in points if p.bad]
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
    )


def _check_runner(workers: int | None, ray_address: str | None) -> None:
    if workers is not None and workers < 1:
        raise InputError(f"--workers must be at least 1 (got {workers})")
    if workers is not None and ray_address is not None:
        raise InputError("give either --workers or --ray-address, not both")


def _row(scenario: Scenario, point: SweepPoint, metrics: dict[str, Any]) -> dict[str, Any]:
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


@contextmanager
def _progress_bar(total: int, enabled: bool) -> Iterator[Progress]:
    if not enabled:
        yield lambda _out: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn("sweep"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    with bar:
        task = bar.add_task("sweep", total=total)
        yield lambda _out: bar.advance(task)


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
        for role, label in which.items():
            seed, at = verdict.worst_run(result.rows, label)
            point = SweepPoint(0, result.point(label).policy, seed, at)
            sim = simulate(point.scenario(result.scenario), seed=seed)
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
        )
    )
    (out / "report.md").write_text(text)
    return out


def sweep_command(
    path: Path, out: Path | None, *, workers: int | None, ray_address: str | None
) -> None:
    """The CLI's `rollout sweep`: validate everything, run, write, print the recommendation."""
    import typer

    scenario = load_scenario(path)
    points = sweep_points(scenario)  # fails on an invalid grid before anything runs
    _check_runner(workers, ray_address)
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
    result = run_sweep(scenario, workers=workers, ray_address=ray_address, progress=True)
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
