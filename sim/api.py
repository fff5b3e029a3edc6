"""The simulator's public calls: run a scenario, write its outputs, compare policies.

`rollout simulate` (see `rollout/cli.py`) calls `simulate_command`; notebooks and the sweep
call `simulate` and `compare`, which are pure and deterministic for a seed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import multiprocessing
import os
import re
import traceback
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import ValidationError

from rollout import history as h
from rollout.errors import InputError, describe_validation_error
from rollout.policy import RolloutPolicy
from rollout.scenario import Scenario, load_scenario
from sim.inputs import Inputs
from sim.model import Progress, Simulation
from sim.result import SimResult, clean_json

log = logging.getLogger(__name__)

__all__ = [
    "SimResult",
    "compare",
    "compare_command",
    "simulate",
    "simulate_command",
    "write_outputs",
]


def simulate(
    scenario: Scenario,
    *,
    seed: int | None = None,
    progress: bool | Progress = False,
    inputs: Inputs | None = None,
) -> SimResult:
    """Run one scenario; `seed` overrides the scenario's. `progress` may be a callback
    `(requests_done, requests_total)`; True draws a progress bar on the terminal. `inputs`: the
    scenario's files read beforehand (`sim.inputs.read_inputs`), else they are read here."""
    if progress is True:
        return _with_bar(scenario, seed, scenario.name)
    callback = progress if callable(progress) else None
    return Simulation(scenario, seed=seed, progress=callback, inputs=inputs).run()


def compare(
    scenario: Scenario,
    policies: Sequence[RolloutPolicy | str],
    *,
    seed: int | None = None,
    progress: bool = False,
) -> list[SimResult]:
    """The scenario under each policy, same seed (same arrivals and request sizes), in order.
    A policy may be a flag string such as `surge=25`; the scenario's stabilization is kept."""
    results = []
    for p in policies:
        policy = _policy(scenario, p) if isinstance(p, str) else p
        variant = scenario.with_policy(policy)
        if progress:
            results.append(_with_bar(variant, seed, policy.label()))
        else:
            results.append(simulate(variant, seed=seed))
    return results


def write_outputs(
    result: SimResult,
    out_dir: Path,
    title: str | None = None,
    plotter: PlotWorker | None = None,
) -> None:
    """summary.json, requests.parquet, timeline.parquet, replicas.parquet, events.jsonl and
    the plots (timeline.png, latency.png). `plotter`: draw the plots in its worker processes
    while this one writes the tables."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = plotter.draw(result, out_dir, title) if plotter is not None else []
    summary = clean_json(result.summary)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "events.jsonl").write_text(h.dump_jsonl(result.events))
    if plots:
        _write_tables(result, out_dir)
        if PlotWorker.done(plots):
            return
    # pyarrow encodes Parquet without holding the GIL: the tables are written while the plots
    # draw (matplotlib stays on this thread)
    with ThreadPoolExecutor(max_workers=1) as pool:
        tables = None if plots else pool.submit(_write_tables, result, out_dir)
        _draw_plots(result, out_dir, title)
        if tables is not None:
            tables.result()


def _draw_plots(result: SimResult, out_dir: Path, title: str | None) -> None:
    from sim.plots import plot_latency, plot_timeline

    plot_timeline(result, out_dir / "timeline.png", title=title)
    plot_latency(result, out_dir / "latency.png", title=title)


class PlotWorker:
    """A process that draws a run's two plots. Forked before the run, it imports matplotlib on
    the other core while the simulation runs; afterwards it draws both plots at once (the
    second in a child it forks, which shares its loaded modules) while the caller writes the
    tables. One warm process, not one per plot: the import is paid once, and it is all the CPU
    the plots take from the simulation. The plotted columns reach it through memory shared at
    the fork, not a pipe: a copy, not a pickle. If it fails, the caller draws the plots
    itself: every output is still written. One worker serves one run."""

    # what the worker draws (the second one in its forked child)
    PLOTS = (("plot_timeline", "timeline.png"), ("plot_latency", "latency.png"))
    # the request columns the plots read, as they travel (version: its category codes)
    COLUMNS = (
        ("arrival_s", np.float64),
        ("latency_s", np.float64),
        ("ttft_s", np.float64),
        ("version", np.int8),
        ("dropped", np.bool_),
        ("failed", np.bool_),
    )
    NICENESS = 5  # a weight of 335 against the simulation's 1,024 (Linux's CFS)
    # above this many requests the plots are drawn in process: the shared memory (27 bytes a
    # request, reserved up front, only what is written to is ever allocated) is sized for it
    MAX_REQUESTS = 2_000_000

    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None
        self._shared: mmap.mmap | None = None
        width = sum(np.dtype(dtype).itemsize for _, dtype in self.COLUMNS)
        try:
            self._shared = mmap.mmap(-1, self.MAX_REQUESTS * width)  # anonymous, MAP_SHARED
            self._pool = ProcessPoolExecutor(
                1,
                mp_context=multiprocessing.get_context("fork"),
                initializer=_start_worker,
                initargs=(self._shared,),  # forked, not pickled: the worker maps the same pages
            )
            self._pool.submit(_warm_up)
        except (OSError, ValueError) as e:  # no fork here, or no process to spare
            log.info("plots drawn in process: %s", e)
            self.close()

    def draw(self, result: SimResult, out_dir: Path, title: str | None) -> list[Future[None]]:
        n = len(result.requests)
        if self._pool is None or self._shared is None or n > self.MAX_REQUESTS:
            return []
        for column, shared in zip(self.COLUMNS, _columns(self._shared, n), strict=True):
            values = result.requests[column[0]]
            shared[:] = values.cat.codes if column[0] == "version" else values
        versions = list(result.requests["version"].cat.categories)
        slim = SimResult(result.summary, pd.DataFrame(), result.timeline, result.events)
        return [self._pool.submit(_draw_both, slim, n, versions, out_dir, title)]

    @staticmethod
    def done(plots: list[Future[None]]) -> bool:
        """Wait for the plots; False if the worker failed (then the caller draws them)."""
        try:
            for f in plots:
                f.result()
        except Exception as e:  # a broken worker (killed, out of memory): draw here
            log.warning("a plot worker failed (%s): drawing the plots in this process", e)
            return False
        return bool(plots)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
        self._pool = None
        if self._shared is not None:
            with contextlib.suppress(BufferError):  # a view still held (an error mid-draw)
                self._shared.close()
        self._shared = None


def _columns(shared: mmap.mmap, n: int) -> list[np.ndarray]:
    """The plotted columns of n requests, as arrays over the shared memory."""
    arrays, offset = [], 0
    for _, dtype in PlotWorker.COLUMNS:
        arrays.append(np.frombuffer(shared, dtype=dtype, count=n, offset=offset))
        offset += arrays[-1].nbytes
    return arrays


_shared: mmap.mmap | None = None  # in the plot worker: the memory it shares with its caller


def _start_worker(shared: mmap.mmap) -> None:
    global _shared
    _shared = shared
    _yield_cpu()


def _draw_both(
    result: SimResult, n: int, versions: list[str], out_dir: Path, title: str | None
) -> None:
    """In the plot worker: the requests' plotted columns from the shared memory, then the
    second plot in a forked child and the first here, at once."""
    assert _shared is not None
    columns = dict(zip((name for name, _ in PlotWorker.COLUMNS), _columns(_shared, n), strict=True))
    columns["version"] = pd.Categorical.from_codes(columns["version"], categories=versions)
    result.requests = pd.DataFrame(columns, copy=False)  # the plots only read them
    _claim_cpu()
    (first, first_file), (second, second_file) = PlotWorker.PLOTS
    child = os.fork()
    if child == 0:  # the child: draw, then leave without running the worker's exit handlers
        code = 1
        try:
            _draw_one(second, result, out_dir / second_file, title)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    try:
        _draw_one(first, result, out_dir / first_file, title)
    finally:
        _, status = os.waitpid(child, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"the process drawing {second_file} failed")


def _draw_one(plot: str, result: SimResult, path: Path, title: str | None) -> None:
    from sim import plots

    getattr(plots, plot)(result, path, title=title)


def _yield_cpu() -> None:
    """The plot worker runs at a lower priority while it warms up: it must take only what the
    simulation leaves of the machine (on two cores, a worker at the same priority may be put
    beside the simulation on its core)."""
    with contextlib.suppress(OSError):  # not allowed here: the caller's priority, then
        os.nice(PlotWorker.NICENESS)


def _claim_cpu() -> None:
    """Back to the caller's priority once the plots are what it waits for, where the system
    lets a process raise its priority again (root, or RLIMIT_NICE); elsewhere it stays
    lower, which costs time only while other work runs."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, os.getpriority(os.PRIO_PROCESS, os.getppid()))


def _warm_up() -> None:
    """Import the plotting modules (matplotlib: ~0.3 s) while the simulation runs. Drawing a
    throwaway figure as well was measured to save the real plots nothing."""
    import sim.plots  # noqa: F401


def _write_tables(result: SimResult, out_dir: Path) -> None:
    for name in ("requests", "timeline", "replicas"):
        table: pd.DataFrame = getattr(result, name)
        # dictionary encoding only where values repeat (versions, replica ids, flags): on a
        # million distinct latencies it is tried and dropped, a quarter of the write's time
        repeating = [c for c, dtype in table.dtypes.items() if dtype.kind != "f"]
        table.to_parquet(out_dir / f"{name}.parquet", index=False, use_dictionary=repeating)


# ---- the command line's side ---------------------------------------------------------------


def simulate_command(
    path: Path | str,
    out: Path | None = None,
    *,
    seed: int | None = None,
    policy: str | Sequence[str] | None = None,
    stabilization: float | None = None,
) -> list[SimResult]:
    """`rollout simulate`: load, override the policy, run with a progress bar, write, print.

    Several `policy` flags run the scenario once per policy and print them side by side.
    """
    scenario = load_scenario(path)
    flags = [policy] if isinstance(policy, str) else list(policy or [])
    if len(flags) > 1:
        return compare_command(path, flags, out, seed=seed, stabilization=stabilization)
    if flags or stabilization is not None:
        chosen = _policy(scenario, flags[0] if flags else None, stabilization)
        scenario = scenario.with_policy(chosen)
    out_dir = Path(out) if out is not None else Path("out") / scenario.name
    plotter = PlotWorker()
    try:
        result = simulate(scenario, seed=seed, progress=True)
        write_outputs(result, out_dir, title=_title(scenario, result), plotter=plotter)
    finally:
        plotter.close()
    _print_table([result], out_dir)
    return [result]


def compare_command(
    path: Path | str,
    policies: Sequence[str],
    out: Path | None = None,
    *,
    seed: int | None = None,
    stabilization: float | None = None,
) -> list[SimResult]:
    """Simulate the scenario under each policy flag and print the results side by side;
    each policy's outputs go to a subfolder of `out`, plus `comparison.csv` and a plot."""
    from sim.plots import plot_comparison

    scenario = load_scenario(path)
    if not policies:
        raise InputError("compare needs at least one policy, such as surge=25")
    chosen = [_policy(scenario, flag, stabilization) for flag in policies]
    out_dir = Path(out) if out is not None else Path("out") / scenario.name
    results = compare(scenario, chosen, seed=seed, progress=True)
    for policy, result in zip(chosen, results, strict=True):
        variant = scenario.with_policy(policy)
        write_outputs(result, out_dir / _slug(policy.label()), title=_title(variant, result))
    table = pd.DataFrame([clean_json(r.summary) for r in results])
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_dir / "comparison.csv", index=False)
    plot_comparison(results, out_dir / "comparison.png", title=scenario.name)
    _print_table(results, out_dir)
    return results


def _policy(
    scenario: Scenario, flag: str | None, stabilization: float | None = None
) -> RolloutPolicy:
    """A policy from a `surge=25` flag and/or a stabilization override; the rest of the
    scenario's policy (deadlines, limits) is kept."""
    base = scenario.rollout.policy if scenario.rollout else RolloutPolicy(max_surge_percent=25)
    fields = base.model_dump()
    if stabilization is not None:
        fields["stabilization_time_seconds"] = stabilization
    try:
        if flag is None:
            return RolloutPolicy(**fields)
        parsed = RolloutPolicy.parse_flag(
            flag, stabilization_time_seconds=fields["stabilization_time_seconds"]
        )
        fields |= {
            "max_surge_percent": parsed.max_surge_percent,
            "max_unavailable_percent": parsed.max_unavailable_percent,
        }
        return RolloutPolicy(**fields)
    except ValidationError as e:
        raise InputError(f"--policy {flag}: {describe_validation_error(e)}") from None
    except ValueError as e:
        raise InputError(str(e)) from None


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9=._-]+", "_", label).strip("_")


def _title(scenario: Scenario, result: SimResult) -> str:
    policy = result.summary.get("policy")
    return f"{scenario.name}: {policy}" if policy else scenario.name


def _with_bar(scenario: Scenario, seed: int | None, label: str) -> SimResult:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    sim = Simulation(scenario, seed=seed)
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("requests"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(label, total=sim.router.n)
        sim.progress = lambda done, total: bar.update(task, completed=done)
        return sim.run()


_ROWS = (
    ("outcome", "outcome", "{}"),
    ("rollout_duration_s", "rollout duration (s)", "{:,.0f}"),
    ("steps", "steps", "{}"),
    ("requests", "requests", "{:,}"),
    ("dropped", "dropped", "{:,}"),
    ("latency_p50_s", "latency p50 (s)", "{:.3f}"),
    ("latency_p99_s", "latency p99 (s)", "{:.3f}"),
    ("latency_p99_rollout_s", "latency p99 during rollout (s)", "{:.3f}"),
    ("ttft_p99_s", "TTFT p99 (s)", "{:.3f}"),
    ("ttft_p99_rollout_s", "TTFT p99 during rollout (s)", "{:.3f}"),
    ("min_ready_replicas", "min ready replicas", "{}"),
    ("peak_gpus", "peak GPUs", "{}"),
    ("gpu_hours", "GPU-hours", "{:,.2f}"),
    ("cost_usd", "cost (USD)", "{:,.2f}"),
)


def _print_table(results: Sequence[SimResult], out_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=results[0].summary["scenario"], title_justify="left")
    table.add_column("")
    for r in results:
        table.add_column(r.summary.get("policy") or "no rollout", justify="right")
    for key, name, fmt in _ROWS:
        cells = []
        for r in results:
            value = r.summary.get(key)
            cells.append("–" if value is None else fmt.format(value))
        table.add_row(name, *cells)
    console = Console()
    console.print(table)
    console.print(f"outputs in {out_dir}/")
