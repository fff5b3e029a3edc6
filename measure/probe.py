"""`rollout calibrate --probe DEPLOY.yaml`: a short load sweep on a live deployment to calibrate
from, when no real rollout under load has been recorded yet.

The sweep is open loop (as `rollout load`): six stages of `STAGE_S` seconds, Poisson arrivals at
0.5, 1, 2, 4, 8 and 16 requests per second per replica of the deployment, prompts of 128, 512
and 2,048 tokens in turn, `MAX_TOKENS` output tokens each. It loads the replicas from idle to
well into batching (the batch each request ran in is estimated as `calibrate` does), so the
engine's time per token is seen at several batch sizes and prefill at several prompt lengths.
Replica starts come from what the executor recorded of this application's rollouts in the
store: each is a start watched from the scale-up to ready. A rollout's starts are preferred:
a first deploy starts the router and every replica at once, which no rollout does (on the
2-core machine its starts took 9.4–9.9 s against 5.1–8.0 s for a rollout's), so the first
deploy's starts count only when the application has had no rollout yet.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa

from executor import status, store
from executor.deploy_file import load_deploy_file
from measure.export import replicas_frame, requests_frame
from measure.load import Replay, Schedule, _run, summarize
from rollout.errors import InputError
from sim.result import TIMELINE_COLUMNS, SimResult

RATES_PER_REPLICA = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
STAGE_S = 8.0
PROMPTS = (128, 512, 2048)
MAX_TOKENS = 32
TIMEOUT_S = 120.0


def sweep(replicas: int, seed: int = 0) -> Schedule:
    """The probe's requests: Poisson stages of rising rate, prompt lengths in turn."""
    rng = np.random.default_rng([seed, 0xCA1])
    times: list[np.ndarray] = []
    for k, rate in enumerate(RATES_PER_REPLICA):
        n = rng.poisson(rate * replicas * STAGE_S)
        times.append(np.sort(rng.uniform(0, STAGE_S, n)) + k * STAGE_S)
    at = np.concatenate(times)
    ctx = np.array([PROMPTS[i % len(PROMPTS)] for i in range(len(at))])
    return Schedule(at, ctx, np.full(len(at), MAX_TOKENS))


def probe_command(deploy_file: Path, out: Path) -> tuple[SimResult, list[pd.DataFrame]]:
    """Run the sweep against the deployment; its requests as a run, and the app's recorded
    replica starts."""
    spec = load_deploy_file(deploy_file)
    prefix = spec.http.route_prefix.rstrip("/")
    url = f"http://{spec.http.host}:{spec.http.port}{prefix}"
    reps = _recorded_starts(spec.store or store.default_url(), spec.name)
    plan = sweep(spec.replicas)
    replay = Replay(plan, url, "", timeout_s=TIMEOUT_S)

    def announce(r: Replay) -> None:
        print(f"probing {url} ({r.model}): {len(plan)} requests over "
              f"{len(RATES_PER_REPLICA) * STAGE_S:g} s", flush=True)  # fmt: skip

    _run(replay, announce)
    raw = replay.frame()
    out.mkdir(parents=True, exist_ok=True)
    raw.to_parquet(out / "requests.parquet", index=False)
    summary = summarize(raw, replay.lag, url=url, started_at=replay.started_at)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    live = set(raw["version"].dropna().astype(str))
    if not live:
        raise InputError(f"the probe got no answer from {url}: is {spec.name} deployed?")
    requests = requests_frame(raw, {v: "current" for v in live})
    timeline = pd.DataFrame([dict.fromkeys(TIMELINE_COLUMNS, 0)]).astype(float)
    timeline["current_ready"] = spec.replicas  # a live, steady deployment
    return SimResult({}, requests, timeline), reps


def _recorded_starts(url: str, app: str) -> list[pd.DataFrame]:
    st = store.Store(url)
    try:
        with st.engine.connect() as c:
            ids = c.execute(
                sa.select(store.INDEX.c.id, store.INDEX.c.from_version).where(
                    store.INDEX.c.app == app
                )
            ).all()
        ids = rollouts_first(ids)
        db = status.client(st.url)
        return [
            replicas_frame(st.replica_events(row.id), 0.0, status.read_history(db, row.id)[0])
            for row in ids
        ]
    finally:
        st.dispose()


def rollouts_first(rows: Sequence[Any]) -> list[Any]:
    """The rollouts (from a live version) among the recorded rows, or every row when there is
    none: a first deploy's replica starts are not the starts a rollout makes."""
    rollouts = [r for r in rows if r.from_version]
    return rollouts or list(rows)
