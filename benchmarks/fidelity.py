"""The fidelity experiment: real rollouts of the LLM example held against the simulator's
predictions of them, with only calibrated parameters.

1. Starts a local cluster (logical GPUs; the profile backend on the CPU), deploys v0 of
   examples/deploy-llm-v1.yaml with `rollout deploy` and rolls it out to v1 without load: the
   calibration's replica starts (a rollout's, one at a time; not the rollouts measured below).
2. Calibrates: `rollout calibrate --probe` (a load sweep on v1; the v0 → v1 rollout's replica
   starts), writing the scenario fragment to OUT/calibration/.
3. `--runs` times, for each policy in turn (surge: v1 → v2 with 50 % surge; unavailable:
   v2 → v1 with 50 % unavailable), replays the Azure code trace from minute 4 with `rollout
   load` (sped up by `--time-scale`), rolls out with `rollout deploy` `--lead-s` seconds into
   the replay (`--lead-step-s` more each run: every run meets the trace at another moment,
   with other requests in flight), stops the replay `--tail-s` seconds after the rollout, and
   exports the rollout with its requests (`rollout export`) to OUT/runs/POLICY/runN/measured.
4. Simulates each run `--seeds` times (the simulator's routing and cold-start draws): the
   requests the replay sent (times and token counts, no resampling), the same fleet, policy and
   rollout start, Serve's drain loop as the executor configures it, the calibrated engine, cold
   starts and health-check period; the first seed's files in OUT/runs/POLICY/runN/predicted.
5. Writes OUT/fidelity.csv (policy, metric, predicted, measured, error_pct: the median over
   the predictions against the median over the runs, and both ranges), OUT/fidelity_runs.csv
   (each run against the median of its own predictions), OUT/report.md and an overlay plot per
   policy (its first run).

The two versions run the same engine profile (v1's, with v2's own seed): the experiment tests the
rollout's prediction, not a guess at an unseen version's speed.

Usage: python benchmarks/fidelity.py [--out reports/fidelity] [--time-scale 3] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TRACE = REPO / "data" / "traces" / "azure_llm_2023_code.csv"
POLICIES = {
    "surge=50": ("v1", "v2", {"max_surge_percent": 50, "max_unavailable_percent": 0}),
    "unavailable=50": ("v2", "v1", {"max_surge_percent": 0, "max_unavailable_percent": 50}),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO / "reports" / "fidelity")
    p.add_argument("--time-scale", type=float, default=3.0)
    p.add_argument("--start-s", type=float, default=240.0)
    p.add_argument("--lead-s", type=float, default=30.0)
    p.add_argument("--lead-step-s", type=float, default=10.0)
    p.add_argument("--tail-s", type=float, default=30.0)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--runs", type=int, default=3, help="real rollouts per policy")
    p.add_argument("--seeds", type=int, default=5, help="simulations per real rollout")
    a = p.parse_args()

    from executor import cluster

    out = a.out.resolve()
    tmp = Path(tempfile.mkdtemp(prefix="rollout-fidelity-"))
    os.environ["ROLLOUT_HOME"] = str(tmp / "home")
    os.chdir(REPO)
    cluster.start_local(num_gpus=8, num_cpus=16)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    base = yaml.safe_load((REPO / "examples" / "deploy-llm-v1.yaml").read_text())

    def deploy_file(version: str, policy: dict[str, int]) -> Path:
        spec = json.loads(json.dumps(base))
        spec["version"] = version
        spec["model"]["args"] |= {"version": version, "seed": int(version[1:]),
                                  "backend": "profile"}  # fmt: skip
        spec["replicas"] = a.replicas
        spec["policy"] |= policy
        spec["cluster"] = {"num_gpus": 8}
        spec["http"]["port"] = port
        path = tmp / f"llm-{version}-{len(list(tmp.glob('*.yaml')))}.yaml"
        path.write_text(yaml.safe_dump(spec))
        return path

    def rollout(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "rollout.cli", *args]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"rollout {' '.join(args)}: {done.stdout}{done.stderr}")
        return done

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    try:
        rollout("deploy", str(deploy_file("v0", POLICIES["surge=50"][2])))
        v1 = deploy_file("v1", POLICIES["surge=50"][2])
        rollout("deploy", str(v1))  # a rollout: the probe's replica starts
        cal_dir = os.path.relpath(out / "calibration", REPO)
        cal = rollout("calibrate", "--probe", str(v1), "--out", cal_dir)
        print(cal.stdout)
        measured: dict[str, list[Path]] = {name: [] for name in POLICIES}
        for run in range(1, a.runs + 1):  # the policies alternate v1 → v2 → v1
            for name, (_, to, policy) in POLICIES.items():
                folder = out / "runs" / name / f"run{run}"
                lead = a.lead_s + (run - 1) * a.lead_step_s
                measured[name].append(run_one(a, rollout, env, port, deploy_file(to, policy),
                                              folder, lead))  # fmt: skip
    finally:
        subprocess.run([sys.executable, "-m", "rollout.cli", "down"], env=env,
                       capture_output=True, check=False)  # fmt: skip
        shutil.rmtree(tmp, ignore_errors=True)
    from measure.fidelity import compare, compare_runs

    rows, per_run = [], []
    for name, folders in measured.items():
        predicted, real = [], []
        for run, folder in enumerate(folders, 1):
            summaries, m = predict(name, folder, out, a.seeds, overlay=run == 1)
            per_run += [dict(run=run, **r) for r in compare(name, summaries, m)]
            predicted += summaries
            real.append(m)
        rows += compare_runs(name, predicted, real)
    pd.DataFrame(per_run).to_csv(out / "fidelity_runs.csv", index=False)
    write_report(a, out, rows, per_run, cal.stdout)
    print((out / "fidelity.csv").read_text())
    return 0


def run_one(a, rollout, env, port: int, deploy: Path, folder: Path, lead: float) -> Path:  # type: ignore[no-untyped-def]
    """One real rollout under the trace replay, exported with its requests."""
    load = folder / "load"
    replay = subprocess.Popen(
        [sys.executable, "-m", "rollout.cli", "load", str(TRACE.relative_to(REPO)), "--url",
         f"http://127.0.0.1:{port}/llm", "--time-scale", str(a.time_scale), "--start-s",
         str(a.start_s), "--duration-s", "3000", "--out", str(load)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(lead)
    done = rollout("deploy", str(deploy))
    time.sleep(a.tail_s)
    replay.send_signal(signal.SIGINT)
    stdout, _ = replay.communicate(timeout=300)
    print(stdout)
    rollout_id = done.stdout.splitlines()[0]
    measured = folder / "measured"
    rollout("export", rollout_id, "--out", str(measured), "--requests",
            str(load / "requests.parquet"))  # fmt: skip
    return measured


def write_trace(requests: pd.DataFrame, path: Path) -> float:
    """The requests as a trace file (times and token counts, the first at 0); the offset."""
    offset = float(requests["arrival_s"].min())
    pd.DataFrame({
        "arrival_s": requests["arrival_s"] - offset,
        "ContextTokens": requests["context_tokens"],
        "GeneratedTokens": requests["generated_tokens"],
    }).to_csv(path, index=False)  # fmt: skip
    return offset


def predict(
    name: str, measured_dir: Path, out: Path, seeds: int, overlay: bool
) -> tuple[list[dict], dict]:
    """Simulate what was measured, with the calibrated parameters only, once per seed: the
    predicted summaries and the measured one (the first seed's files written beside the run,
    and its overlay plot if asked)."""
    from measure.fidelity import plot_overlay
    from measure.runs import read_result, rollout_figures
    from rollout.scenario import Scenario
    from sim.api import simulate, write_outputs

    measured = read_result(measured_dir)
    req = measured.requests
    trace = measured_dir.parent / "trace.csv"
    offset = write_trace(req, trace)
    fragment = yaml.safe_load((out / "calibration" / "calibration.yaml").read_text())
    fragment["cold_start"]["path"] = str(out / "calibration" / fragment["cold_start"]["path"])
    policy = json.loads(json.dumps(measured.events[0].policy))  # the policy the rollout ran
    s = measured.summary
    replicas = int(measured.timeline["desired_replicas"].iloc[0])
    # Serve's drain loop as the executor configures it (executor/plan.py), not a fit
    base = yaml.safe_load((REPO / "examples" / "deploy-llm-v1.yaml").read_text())
    shutdown_s = float(base["model"]["graceful_shutdown_timeout_s"])
    raw = {
        "name": f"fidelity {name}",
        "trace": {"path": str(trace), "resample": False},
        "fleet": {"replicas": replicas, "gpu_capacity": 8, "max_ongoing_requests": 256,
                  "graceful_shutdown_timeout_s": shutdown_s, "request_timeout_s": 600,
                  "graceful_shutdown_wait_loop_s": min(2.0, shutdown_s)},
        "rollout": {"at_s": s["rollout_start_s"] - offset, "policy": policy},
        **fragment,
    }  # fmt: skip
    summaries = []
    for seed in range(1, seeds + 1):
        predicted = simulate(Scenario.model_validate(raw | {"seed": seed}))
        predicted.summary |= rollout_figures(predicted)
        summaries.append(predicted.summary)
        if seed == 1:
            write_outputs(predicted, measured_dir.parent / "predicted", title=raw["name"])
            if overlay:
                plot_overlay(predicted, measured, out / f"overlay-{name.replace('=', '')}.png",
                             f"{name}, run 1: measured (solid) and predicted (dashed, seed 1)",
                             shift=offset)  # fmt: skip
    return summaries, measured.summary


def probe_replay(out: Path, replicas: int) -> str:
    """The probe's own requests through the calibrated simulator, stage by stage: how the
    engine model fits the data it was calibrated on (a markdown table)."""
    from measure.probe import RATES_PER_REPLICA, STAGE_S
    from rollout.scenario import Scenario
    from sim.api import simulate

    cal = out / "calibration"
    real = pd.read_parquet(cal / "probe" / "requests.parquet").dropna(subset=["ttft_s"])
    real = real.sort_values("arrival_s", ignore_index=True)
    trace = cal / "probe" / "trace.csv"
    offset = write_trace(real, trace)
    fragment = yaml.safe_load((cal / "calibration.yaml").read_text())
    fragment["cold_start"] = {"seconds": 1.0}  # no replica starts in a steady deployment
    scenario = Scenario.model_validate({
        "name": "probe replayed", "trace": {"path": str(trace), "resample": False},
        "fleet": {"replicas": replicas, "gpu_capacity": 8, "max_ongoing_requests": 256,
                  "request_timeout_s": 600},
        **fragment,
    })  # fmt: skip
    sim = simulate(scenario).requests
    sim["arrival_s"] += offset  # back on the sweep's clock, where its stages are
    sim["generated_tokens"] = real["generated_tokens"].to_numpy()
    lines = [
        "| requests/s per replica | requests | TTFT p50 measured | predicted | TTFT p99 measured "
        "| predicted | time per token p50 measured | predicted |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k, rate in enumerate(RATES_PER_REPLICA):
        cells = []
        for d in (real, sim):
            at = d[(d["arrival_s"] >= k * STAGE_S) & (d["arrival_s"] < (k + 1) * STAGE_S)]
            tpot = (at["latency_s"] - at["ttft_s"]) / (at["generated_tokens"] - 1)
            cells.append((len(at), at["ttft_s"].median(), at["ttft_s"].quantile(0.99),
                          tpot.median()))  # fmt: skip
        (n, m50, m99, mt), (_, p50, p99, pt) = cells
        lines.append(f"| {rate:g} | {n} | {m50:.3f} | {p50:.3f} | {m99:.3f} | {p99:.3f} "
                     f"| {mt:.4f} | {pt:.4f} |")  # fmt: skip
    return "\n".join(lines)


def write_report(a, out: Path, rows: list[dict], per_run: list[dict], calibration: str) -> None:  # type: ignore[no-untyped-def]
    from measure.fidelity import table

    pd.DataFrame(rows).to_csv(out / "fidelity.csv", index=False)
    each = [r | {"policy": f"{r['policy']} run {r['run']}"} for r in per_run]
    images = "\n\n".join(f"![{name}](overlay-{name.replace('=', '')}.png)" for name in POLICIES)
    (out / "report.md").write_text(
        f"# Fidelity: predicted against measured rollouts\n\n"
        f"Written by `python benchmarks/fidelity.py --time-scale {a.time_scale:g}` on "
        f"{time.strftime('%Y-%m-%d')}: the LLM example (profile backend, {a.replicas} replicas, "
        f"logical GPUs) under the Azure code trace from {a.start_s:g} s, {a.time_scale:g}× "
        "sped up; how it is made and read: docs/fidelity.md.\n\n"
        f"## Calibration\n\n```\n{calibration.strip()}\n```\n\n"
        "The probe's own requests replayed through the calibrated simulator (seconds; how the "
        f"engine model fits the data it was calibrated on):\n\n{probe_replay(out, a.replicas)}\n\n"
        f"## Predicted against measured\n\nThe median of {a.runs} real rollouts per policy "
        f"against the median of {a.seeds} simulations of each (seeds 1–{a.seeds}), with both "
        f"ranges:\n\n{table(rows)}\n\n### Each run\n\nEach real rollout against the median of "
        f"its own {a.seeds} simulations:\n\n{table(each)}\n\n## Overlays\n\n"
        f"The first run of each policy and its first seed's prediction.\n\n{images}\n"
    )


if __name__ == "__main__":
    sys.exit(main())
