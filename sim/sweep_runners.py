"""Where a sweep's points run: in this process, in spawned local processes, or as Ray tasks.

Every runner gets the scenario and its inputs (`sim.inputs.Inputs`, the files it names, already
read) once per worker, not per point: a process helper through its initializer, a Ray cluster
through the object store (`ray.put` once; each node holds one copy that its workers map). A
point carries only its policy, seed and rollout time. A point whose simulation raises comes
back as a failed outcome with its one-line error, and the others go on; bad input (an
`InputError`) stops the sweep. On Ray, a point whose worker process or node dies is run again
(`MAX_RETRIES` times) before it counts as failed.
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
from typing import TYPE_CHECKING, Any

from rollout.errors import InputError
from rollout.scenario import Scenario
from sim.inputs import Inputs

if TYPE_CHECKING:
    from sim.sweep import SweepPoint

PointFn = Callable[[Scenario, "SweepPoint", Inputs], dict[str, Any]]
MAX_RETRIES = 3  # Ray re-runs a point whose worker died this many times


@dataclass(frozen=True)
class PointOutcome:
    index: int
    metrics: dict[str, Any] | None  # None: the point failed
    seconds: float  # time inside the point function (the simulation), measured where it ran
    error: str | None = None  # one line: what the simulation raised, or how its worker died


def one_line(e: BaseException) -> str:
    text = str(e).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def run_point(fn: PointFn, scenario: Scenario, inputs: Inputs, point: SweepPoint) -> PointOutcome:
    t0 = time.perf_counter()
    try:
        metrics = fn(scenario, point, inputs)
    except InputError:
        raise
    except Exception as e:
        return PointOutcome(point.index, None, time.perf_counter() - t0, one_line(e))
    return PointOutcome(point.index, metrics, time.perf_counter() - t0)


Progress = Callable[[PointOutcome], None]


def run_serial(
    fn: PointFn, scenario: Scenario, inputs: Inputs, points: list[SweepPoint], done: Progress
) -> Iterator[PointOutcome]:
    for p in points:
        out = run_point(fn, scenario, inputs, p)
        done(out)
        yield out


_WORKER: tuple[PointFn, Scenario, Inputs] | None = None


def _init_worker(fn: PointFn, scenario: Scenario, inputs: Inputs) -> None:
    """Runs once per worker process: the scenario and its inputs cross over once."""
    global _WORKER
    _WORKER = (fn, scenario, inputs)


def _run_in_worker(point: SweepPoint) -> PointOutcome:
    assert _WORKER is not None, "worker not initialised"
    fn, scenario, inputs = _WORKER
    return run_point(fn, scenario, inputs, point)


def run_processes(
    fn: PointFn,
    scenario: Scenario,
    inputs: Inputs,
    points: list[SweepPoint],
    workers: int,
    done: Progress,
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
        max_workers=workers - 1,
        mp_context=ctx,
        initializer=_init_worker,
        initargs=(fn, scenario, inputs),
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
                    out = run_point(fn, scenario, inputs, point)
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


def run_ray(
    fn: PointFn,
    scenario: Scenario,
    inputs: Inputs,
    points: list[SweepPoint],
    address: str,
    done: Progress,
) -> Iterator[PointOutcome]:
    """Each point a Ray task (one CPU); the function, scenario and inputs are put in the object
    store once and passed by reference. Ray re-runs a task whose worker or node died."""
    import ray
    from ray.exceptions import RayError, RayTaskError

    started_here = False
    if not ray.is_initialized():  # a notebook or test may already hold a session: use it
        connect(address)
        started_here = True
    pending: list[Any] = []
    try:
        task = ray.remote(num_cpus=1, max_retries=MAX_RETRIES)(run_point)
        refs = ray.put(fn), ray.put(scenario), ray.put(inputs)
        point_of = {}
        for p in points:
            ref = task.remote(*refs, p)
            point_of[ref] = p
            pending.append(ref)
        while pending:
            # in batches: one wait per finished task would be quadratic for thousands of points
            ready, pending = ray.wait(pending, num_returns=min(64, len(pending)), timeout=0.5)
            for ref in ready:
                try:
                    out = ray.get(ref)
                except RayTaskError as e:  # run_point returns failures: this is bad input
                    if isinstance(e.cause, InputError):  # its one line, no traceback
                        raise e.cause from None
                    raise e.as_instanceof_cause() from None
                except RayError as e:  # the worker or node died on every try
                    why = f"lost after {MAX_RETRIES + 1} tries: {one_line(e)}"
                    out = PointOutcome(point_of[ref].index, None, 0.0, why)
                done(out)
                yield out
    finally:
        for ref in pending:  # stopped early (bad input, interrupted): drop the rest
            ray.cancel(ref, force=True)
        if started_here:
            ray.shutdown()


def connect(address: str) -> None:
    """Join the cluster as a driver; a wrong address or a refused token is one line."""
    import ray

    check_reachable(address)
    try:
        ray.init(address=address, log_to_driver=False, logging_level="WARNING")
    except Exception as e:  # Ray raises ConnectionError, ValueError, RuntimeError or its own
        why = str(e.__cause__ or e).strip().splitlines()[0] if str(e).strip() else repr(e)
        if "authentication" in str(e).lower() or "authentication" in why.lower():
            why = (
                "the cluster refused this client's Ray token (set RAY_AUTH_MODE=token and "
                "RAY_AUTH_TOKEN_PATH to the cluster's token file)"
            )
        raise InputError(f"cannot connect to the Ray cluster at {address!r}: {why}") from None


def check_reachable(address: str) -> None:
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


@contextmanager
def progress_bar(total: int, enabled: bool) -> Iterator[Progress]:
    """Simulations done and failed, elapsed and estimated time left, on stderr."""
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
        TextColumn("done, {task.fields[failed]} failed"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    failed = 0
    with bar:
        task = bar.add_task("sweep", total=total, failed=0)

        def advance(out: PointOutcome) -> None:
            nonlocal failed
            failed += out.error is not None
            bar.update(task, advance=1, failed=failed)

        yield advance
