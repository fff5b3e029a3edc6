"""The `rollout` command line. Backends are imported lazily so `--help` stays instant.

Bad input (a file, a flag, an id) ends in one line on stderr naming the problem and exit code 2;
nothing already recorded is touched.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from pydantic import ValidationError

from rollout.errors import InputError, describe_validation_error, mask_secrets

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Simulate and execute rolling deployments of GPU model-serving replicas.",
)

F = TypeVar("F", bound=Callable[..., object])


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"rollout: error: {mask_secrets(message)}", err=True)
    raise typer.Exit(code)


@contextmanager
def _importing() -> Iterator[None]:
    """No garbage collection while a backend's modules load: imports make only objects that
    live on, so the hundreds of collections they would set off find nothing (~0.05 s of a
    `rollout simulate` start-up)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def friendly(fn: F) -> F:
    """Turn input errors into one clear line and a non-zero exit, never a traceback."""

    @wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> object:
        try:
            return fn(*args, **kwargs)
        except InputError as e:
            fail(str(e))
        except ValidationError as e:
            fail(describe_validation_error(e))
        except FileNotFoundError as e:
            fail(f"no such file: {e.filename or e}")
        except KeyboardInterrupt:
            fail("interrupted", 130)
        return None

    return wrapper  # type: ignore[return-value]


OutDir = Annotated[Path | None, typer.Option("--out", help="Directory for the outputs.")]


@app.command()
@friendly
def simulate(
    scenario: Annotated[Path, typer.Argument(help="Scenario YAML file.")],
    out: OutDir = None,
    seed: Annotated[int | None, typer.Option(help="Override the scenario's seed.")] = None,
    policy: Annotated[
        list[str] | None,
        typer.Option(help="Override the policy: surge=25 or unavailable=25; repeat to compare."),
    ] = None,
    stabilization: Annotated[
        float | None, typer.Option(help="Override stabilization_time_seconds.")
    ] = None,
) -> None:
    """Simulate a scenario: latency, drops, rollout duration and GPU cost."""
    with _importing():
        from sim.api import simulate_command

    simulate_command(scenario, out, seed=seed, policy=policy, stabilization=stabilization)
    # Every output is written and closed. Python's exit would walk every object still alive
    # in several garbage collections (0.15 s after simulating a million requests) to find
    # almost no garbage; frozen, they are skipped (exit handlers still run). Only here: other
    # commands hold clients (Ray, databases) whose cleanup may rely on collection.
    gc.freeze()


@app.command()
@friendly
def sweep(
    scenario: Annotated[Path, typer.Argument(help="Scenario YAML file with a `sweep` grid.")],
    out: OutDir = None,
    workers: Annotated[int | None, typer.Option(help="Local worker processes.")] = None,
    ray_address: Annotated[
        str | None, typer.Option("--ray-address", help="Run points as Ray tasks on a cluster.")
    ] = None,
) -> None:
    """Run the scenario's policy grid and recommend the cheapest policy meeting the SLO."""
    from sim.sweep import sweep_command

    sweep_command(scenario, out, workers=workers, ray_address=ray_address)


@app.command()
@friendly
def deploy(
    deploy_file: Annotated[Path, typer.Argument(metavar="DEPLOY.yaml", help="Deploy file.")],
    detach: Annotated[bool, typer.Option(help="Return once the rollout has started.")] = False,
) -> None:
    """Deploy a version, or roll the live version to it (like `kubectl apply`)."""
    from executor.commands import deploy_command

    deploy_command(deploy_file, detach=detach)


@app.command()
@friendly
def recover(
    deploy_file: Annotated[Path, typer.Argument(metavar="DEPLOY.yaml", help="Deploy file.")],
) -> None:
    """Resume rollouts whose controller process died."""
    from executor.commands import recover_command

    recover_command(deploy_file)


@app.command()
@friendly
def status(
    rollout_id: Annotated[
        str, typer.Argument(metavar="ID|NAME", help="A rollout's id, or a model's name.")
    ],
    json_: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
) -> None:
    """Show a rollout's state; by a model's name, its last rollout and its live replicas."""
    from executor.commands import status_command

    status_command(rollout_id, as_json=json_)


@app.command()
@friendly
def history(
    rollout_id: Annotated[str, typer.Argument(metavar="ID")],
    json_: Annotated[bool, typer.Option("--json", help="A JSON array of events.")] = False,
) -> None:
    """Show every step, transition and control of a rollout."""
    from executor.commands import history_command

    history_command(rollout_id, as_json=json_)


@app.command()
@friendly
def load(
    trace: Annotated[Path, typer.Argument(metavar="TRACE", help="Trace CSV with token columns.")],
    url: Annotated[str, typer.Option(help="Base URL of an OpenAI-compatible server.")],
    time_scale: Annotated[
        float, typer.Option("--time-scale", help="Divide trace times: 2 replays twice as fast.")
    ] = 1.0,
    rate_scale: Annotated[
        float,
        typer.Option(
            "--rate-scale",
            help="Multiply the request rate by thinning (<1) or copying (>1) requests.",
        ),
    ] = 1.0,
    start_s: Annotated[
        float, typer.Option("--start-s", help="Start this many trace seconds in.")
    ] = 0.0,
    duration_s: Annotated[
        float | None, typer.Option("--duration-s", help="Replay this many trace seconds.")
    ] = None,
    out: OutDir = None,
    model: Annotated[
        str | None, typer.Option(help="Model to ask for (default: the server's first).")
    ] = None,
    timeout_s: Annotated[
        float, typer.Option("--timeout-s", help="Give up on one request after this long.")
    ] = 600.0,
    seed: Annotated[int, typer.Option(help="Seed of the prompts and of rate scaling.")] = 0,
) -> None:
    """Replay a trace open loop against a server: latency and TTFT per version."""
    from measure.load import load_command

    load_command(
        trace, url, time_scale=time_scale, rate_scale=rate_scale, start_s=start_s,
        duration_s=duration_s, out=out, model=model, timeout_s=timeout_s, seed=seed,
    )  # fmt: skip


@app.command()
@friendly
def export(
    rollout_id: Annotated[str, typer.Argument(metavar="ID")],
    out: Annotated[Path, typer.Option("--out", help="Directory for the outputs.")],
    requests: Annotated[
        Path | None,
        typer.Option(help="A `rollout load` output's requests.parquet measured during it."),
    ] = None,
) -> None:
    """Write a real rollout in the files `rollout simulate` writes."""
    from measure.export import export_command

    export_command(rollout_id, out, requests)


@app.command()
@friendly
def calibrate(
    runs: Annotated[
        list[Path] | None,
        typer.Argument(metavar="[RUN_DIR]...", help="Folders `rollout export` wrote."),
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="Directory for the fragment.")] = Path(
        "out/calibration"
    ),
    probe: Annotated[
        Path | None,
        typer.Option(metavar="DEPLOY.yaml", help="Run a load sweep on this live deployment."),
    ] = None,
) -> None:
    """Fit the simulator's engine, cold-start and health-check parameters from real runs."""
    from measure.calibrate import calibrate_command

    calibrate_command(list(runs or []), out, probe=probe)


@app.command()
@friendly
def plot(
    run: Annotated[Path, typer.Argument(metavar="DIR", help="A simulated or exported run.")],
) -> None:
    """Draw a run folder's plots again (timeline.png, latency.png)."""
    from measure.runs import plot_command

    plot_command(run)


def _control_command(name: str, control: str, doc: str) -> None:
    @app.command(name=name, help=doc)
    @friendly
    def _cmd(rollout_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
        from executor.commands import control_command

        control_command(rollout_id, control)


_control_command("pause", "pause", "Pause at the next step boundary.")
_control_command("resume", "resume", "Resume a paused rollout where it stopped.")
_control_command("cancel", "cancel", "Ramp traffic back to the previous version step by step.")
_control_command(
    "force-cancel", "force_cancel", "Send all traffic back at once; remove candidates."
)
_control_command("roll-forward", "roll_forward", "Move all traffic to the candidate now.")


@app.command()
@friendly
def down(
    deploy_file: Annotated[
        Path | None, typer.Argument(metavar="[DEPLOY.yaml]", help="Deploy file.")
    ] = None,
) -> None:
    """Remove the applications and stop a local cluster that `rollout` started."""
    from executor.commands import down_command

    down_command(deploy_file)


@app.command()
@friendly
def ui(
    runs: Annotated[
        list[Path] | None,
        typer.Argument(
            metavar="[RUN_DIR]...",
            help="Folders with simulated runs to list (out/ and reports/ are always searched).",
        ),
    ] = None,
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
    host: Annotated[
        str, typer.Option(help="Address to listen on (beyond loopback: put it behind TLS).")
    ] = "127.0.0.1",
) -> None:
    """Serve the live dashboard and /metrics; prints the URL to open (it carries a token)."""
    import os

    from ui.auth import TOKEN_ENV, new_token
    from ui.server import serve

    serve(host, port, runs or [], os.environ.get(TOKEN_ENV) or new_token())


def main() -> None:
    app(prog_name="rollout")


if __name__ == "__main__":
    sys.exit(main())
