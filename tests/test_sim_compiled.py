"""The simulator's compiled hot path (setup.py, sim/*.pxd) is the same code as its Python
source: the same scenarios give identical request tables and summaries, bit for bit, whichever
runs. And when it is built, the compiled one is what runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import pandas as pd
import pytest
import yaml

import sim
from sim import engine, replica, router

ROOT = Path(__file__).parent.parent
PROFILE = ROOT / "data" / "engines" / "llama-3.1-8b-h100-vllm.yaml"

RUN = """
import json, sys
import sim.router
from rollout.scenario import load_scenario
from sim.api import simulate
result = simulate(load_scenario(sys.argv[1]))
result.requests.to_parquet(sys.argv[2] + ".parquet")
summary = {k: v for k, v in result.summary.items() if isinstance(v, (int, float, str))}
json.dump({"summary": summary, "router": sim.router.__file__}, open(sys.argv[2] + ".json", "w"))
"""


def _engine_scenario() -> dict:
    """Engine kind with every per-request path: a binding KV cache, warm-up (by requests and
    by iterations), a router queue (a low `max_ongoing_requests`), timeouts, crashes, failed
    starts, autoscaling and a surge rollout whose candidate answers some requests with
    errors."""
    return {
        "name": "compiled-engine",
        "seed": 3,
        "trace": {
            "synthetic": {
                "process": "poisson",
                "rate_per_s": 80.0,
                "duration_s": 1000.0,
                "context_tokens": {"kind": "lognormal", "p50": 1020, "p99": 4142},
                "generated_tokens": {"kind": "lognormal", "p50": 129, "p99": 601},
            }
        },
        "service": {
            "kind": "engine",
            "engine": {
                "profile": str(PROFILE),
                "max_num_seqs": 12,
                "kv_cache_tokens": 20000,
                "warmup": {"requests": 20, "iterations": 200, "factor": 2.0},
            },
        },
        "fleet": {
            "replicas": 12,
            "gpu_capacity": 24,
            "max_ongoing_requests": 10,
            "request_timeout_s": 5.0,
        },
        "faults": {"start_failure_rate": 0.1, "crash_per_replica_hour": 2.0},
        "cold_start": {"kind": "lognormal", "p50_s": 30.0, "p99_s": 90.0},
        "health_check": {"period_s": 10.0},
        "autoscaling": {"min_replicas": 10, "max_replicas": 20, "target_ongoing_requests": 4},
        "rollout": {
            "at_s": 300.0,
            "policy": {"max_surge_percent": 25, "stabilization_time_seconds": 30.0},
            "candidate": {"error_rate": 0.01},
        },
    }


def _immediate_scenario() -> dict:
    """The same with the oracles' engine (`admission: immediate`, `Engine` rather than
    `IterationEngine`)."""
    s = _engine_scenario()
    s["name"] = "compiled-immediate"
    s["service"]["engine"]["admission"] = "immediate"
    s["service"]["engine"]["warmup"] = {"requests": 20, "factor": 2.0}  # no iterations there
    return s


def _llm_scenario() -> dict:
    """A fixed-time kind (`llm`, slowdown by concurrency) on an unavailable-style rollout."""
    s = _engine_scenario()
    s["name"] = "compiled-llm"
    s["service"] = {
        "kind": "llm",
        "llm": {
            "prefill_s_per_1k_tokens": 0.05,
            "decode_s_per_token": 0.01,
            "batch_slowdown": 0.05,
        },
    }
    s["rollout"] = {"at_s": 300.0, "policy": {"max_unavailable_percent": 25}}
    return s


def _run(scenario: Path, out: Path, source: bool) -> tuple[pd.DataFrame, dict]:
    env = dict(os.environ)
    env.pop("ROLLOUT_SIM_SOURCE", None)
    if source:
        env["ROLLOUT_SIM_SOURCE"] = "1"
    subprocess.run(
        [sys.executable, "-c", RUN, str(scenario), str(out)], check=True, env=env, cwd=ROOT
    )
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["router"].endswith(".py") == (source or not sim.compiled()), info["router"]
    return pd.read_parquet(out.with_suffix(".parquet")), info["summary"]


@pytest.mark.parametrize(
    "scenario",
    [
        _engine_scenario(),
        _immediate_scenario(),
        _llm_scenario(),
        ROOT / "scenarios" / "sessions-sticky.yaml",
    ],
    ids=["engine", "engine-immediate", "llm", "sessions-sticky"],
)
def test_compiled_and_source_give_identical_results(tmp_path, scenario):
    if isinstance(scenario, dict):
        path = tmp_path / "scenario.yaml"
        path.write_text(yaml.safe_dump(scenario))
    else:
        path = scenario
    compiled, summary_c = _run(path, tmp_path / "compiled", source=False)
    source, summary_s = _run(path, tmp_path / "source", source=True)
    assert len(compiled) > 10_000
    # the scenarios reach the paths they are for: timeouts, and crashes or error answers
    assert compiled["dropped"].any() or path.name.startswith("sessions")
    assert compiled["failed"].any() or path.name.startswith("sessions")
    pd.testing.assert_frame_equal(compiled, source, check_exact=True)
    assert summary_c == summary_s


def test_the_compiled_hot_path_is_in_use_when_built():
    """Every module built beside its source is the one imported, and is newer than its source
    (`make` rebuilds it; sim/__init__.py falls back to the source otherwise). CI requires the
    build (ROLLOUT_REQUIRE_COMPILED, set by .ci/run): a missing compiler must not go unseen."""
    modules = {"engine": engine, "replica": replica, "router": router}
    built = {name: sim._built(name) for name in sim.COMPILED}
    if os.environ.get("ROLLOUT_REQUIRE_COMPILED"):
        assert all(built.values()), f"not compiled: {built}"
    if all(built.values()) and not os.environ.get("ROLLOUT_SIM_SOURCE"):
        assert sim.compiled()
        for name, path in built.items():
            assert Path(modules[name].__file__) == path
            assert sim._why_source() is None
    else:
        assert not sim.compiled()
        assert all(m.__file__.endswith(".py") for m in modules.values())


def test_a_stale_build_falls_back_to_the_source(tmp_path):
    """A compiled module older than its .py is never used: the package loads every hot-path
    module from source, with one warning line."""
    pkg = tmp_path / "sim"
    pkg.mkdir()
    (pkg / "__init__.py").write_text((ROOT / "sim" / "__init__.py").read_text())
    for name in sim.COMPILED:
        (pkg / f"{name}.py").write_text(f"WHO = 'source {name}'\n")
        built = pkg / f"{name}{EXTENSION_SUFFIXES[0]}"
        built.write_text("not a real extension: importing it would fail")
        os.utime(built, (1_000_000, 1_000_000))  # built long before its source
    code = "import sim.router, sim.engine; print(sim.router.WHO, sim.engine.WHO)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["source", "router", "source", "engine"]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "compiled from an older engine.py" in lines[0], out.stderr
