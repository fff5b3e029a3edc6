"""The Serve backend's pure parts on Serve's details JSON recorded from real runs, without Ray.

tests/data/serve_details/*.json were written by tests/record_serve_details.py on a local cluster
(4 logical GPUs; v1 of the example model with 2 replicas at `m_v1`, candidates beside it): each
file is the sequence of distinct states Serve reported while a fault or a change played out.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from executor import observation, router_client, router_link, serve_backend, serve_calls
from executor.apply_order import Write, order
from executor.deploy_file import DeploySpec
from executor.observation import Snapshot
from executor.plan import Memory, Plan
from rollout import controller as c

DATA = Path(__file__).parent / "data" / "serve_details"
REPO = Path(__file__).resolve().parent.parent


def recorded(name: str) -> list[Snapshot]:
    snaps = json.loads((DATA / f"{name}.json").read_text())
    return [Snapshot(s["t"], s["details"], s["free_gpus"], s["total_gpus"]) for s in snaps]


def app_of(snaps: list[Snapshot], app: str) -> dict[str, Any]:
    return next(s.details["applications"][app] for s in snaps if app in s.details["applications"])


def plan_for(snaps: list[Snapshot], candidate: str, current: str | None = "v1") -> Plan:
    spec = yaml.safe_load((REPO / "examples" / "deploy-v2.yaml").read_text())
    spec.update(name="m", version=candidate, replicas=2)
    spec["policy"] = {"max_surge_percent": 50, "max_start_failures": 3}
    cur = app_of(snaps, f"m_{current}")["deployed_app_config"] if current else None
    return Plan(
        id="r", name="m", from_version=current, to_version=candidate,
        spec=DeploySpec.model_validate(spec), current_app=cur,
        candidate_app=app_of(snaps, f"m_{candidate}")["deployed_app_config"],
        desired_start=2, address="", store_url="",
    )  # fmt: skip


def play(
    plan: Plan, snaps: list[Snapshot], mem: Memory, healthy: bool = True
) -> list[dict[str, c.VersionObservation]]:
    """Observe each snapshot in turn, as the backend does; every running replica's probe
    passes when `healthy`."""
    out = []
    for snap in snaps:
        probe = observation.to_probe(plan, mem, snap.details)
        passed = {r["replica_id"] for r in probe} if healthy else set()
        seen, _ = observation.observe(plan, mem, snap, passed)
        out.append(seen)
    return out


def test_a_crash_looping_candidate_counts_every_failed_start() -> None:
    """Its weights file is missing: each replica goes STARTING → STOPPING, three times, then
    Serve stops retrying (DEPLOY_FAILED), which counts as the whole budget."""
    snaps = recorded("crash_loop")
    plan = plan_for(snaps, "v2")
    mem = Memory(targets={c.CURRENT: 2, c.CANDIDATE: 1})
    seen = play(plan, snaps, mem)
    failed = [s[c.CANDIDATE].failed_starts for s in seen]
    assert failed == sorted(failed)
    statuses = [
        s.details["applications"].get("m_v2", {}).get("status") for s in snaps
    ]  # the first DEPLOY_FAILED snapshot
    at = statuses.index("DEPLOY_FAILED")
    assert failed[at - 1] == 2  # two attempts seen stopping before Serve gave up
    assert failed[at] == 2 + 1 + 3 + 1  # the third attempt, then the whole budget
    assert failed[-1] == failed[at]  # counted once
    assert all(s[c.CANDIDATE].ready == 0 for s in seen)
    assert all(s[c.CURRENT].ready == 2 and s[c.CURRENT].failed_starts == 0 for s in seen)


def test_serves_own_status_enums_count_as_their_names() -> None:
    """In the controller, Serve's client hands the details over with enum members, not the
    strings of the JSON: DEPLOY_FAILED must count all the same."""
    from ray.serve._private.common import DeploymentStatus, ReplicaState

    snaps = recorded("crash_loop")
    for snap in snaps:
        for app in snap.details["applications"].values():
            for dep in app["deployments"].values():
                dep["status"] = DeploymentStatus(dep["status"])
                for r in dep["replicas"]:
                    r["state"] = ReplicaState(r["state"])
    plan = plan_for(snaps, "v2")
    seen = play(plan, snaps, Memory(targets={c.CURRENT: 2, c.CANDIDATE: 1}))
    assert seen[-1][c.CANDIDATE].failed_starts == 2 + 1 + 3 + 1


def test_the_controller_fails_the_crash_looping_step_from_those_counts() -> None:
    snaps = recorded("crash_loop")
    plan = plan_for(snaps, "v2")
    mem = Memory(targets={c.CURRENT: 2, c.CANDIDATE: 0})
    state, _ = c.start(plan.spec.rollout_policy(), 2, snaps[0].time)
    decision = c.decide(state, c.Observation(snaps[0].time, 2, c.VersionObservation(ready=2),
                                             c.VersionObservation()))  # fmt: skip
    state = decision.state  # the step's surge replica is asked for
    mem.targets = {c.CURRENT: 2, c.CANDIDATE: state.candidate_target}
    for snap, seen in zip(snaps, play(plan, snaps, mem), strict=True):
        state = c.decide(state, c.Observation(snap.time, 2, seen[c.CURRENT],
                                              seen[c.CANDIDATE])).state  # fmt: skip
    assert state.stage == c.Stage.ROLLBACK, state.summary()
    assert "failed to start" in state.failure, state.failure


def test_a_hung_health_check_never_turns_ready_and_is_no_failed_start() -> None:
    snaps = recorded("hung_health_check")
    plan = plan_for(snaps, "v3")
    seen = play(plan, snaps, Memory(targets={c.CURRENT: 2, c.CANDIDATE: 1}))
    assert [s[c.CANDIDATE].ready for s in seen] == [0] * len(seen)
    assert seen[-1][c.CANDIDATE].starting == 1
    assert seen[-1][c.CANDIDATE].failed_starts == 0


def test_a_running_replica_is_ready_only_once_its_probe_passed() -> None:
    snaps = recorded("candidate_starts")
    plan = plan_for(snaps, "v2")
    mem = Memory(targets={c.CURRENT: 2, c.CANDIDATE: 1})
    unprobed = play(plan, snaps, mem.model_copy(deep=True), healthy=False)
    assert unprobed[-1][c.CANDIDATE].ready == 0 and unprobed[-1][c.CANDIDATE].starting == 1
    probed = play(plan, snaps, mem)
    assert probed[-1][c.CANDIDATE].ready == 1
    assert [s[c.CANDIDATE].failed_starts for s in probed] == [0] * len(snaps)


def test_a_first_deploy_counts_its_replicas_starting_then_ready() -> None:
    snaps = recorded("first_deploy")
    plan = plan_for(snaps, "v1", current=None)
    seen = play(plan, snaps, Memory(targets={c.CURRENT: 0, c.CANDIDATE: 2}))
    assert [(s[c.CANDIDATE].ready, s[c.CANDIDATE].starting) for s in seen] == [
        (0, 0), (0, 0), (0, 2), (0, 2), (0, 2), (1, 1), (2, 0),
    ]  # fmt: skip
    assert all(s[c.CANDIDATE].pending_gpu == 0 for s in seen)


def test_a_replica_scaled_down_drains_and_is_no_failed_start() -> None:
    snaps = recorded("scale_down")
    plan = plan_for(snaps, "v2")
    seen = play(plan, snaps, Memory(targets={c.CURRENT: 1, c.CANDIDATE: 1}))
    assert max(s[c.CURRENT].draining for s in seen) == 1
    assert seen[-1][c.CURRENT].ready == 1
    assert all(s[c.CURRENT].failed_starts == 0 for s in seen)


# ---- apply order ----------------------------------------------------------------------------


def test_the_weight_goes_first_and_is_confirmed_before_any_scale_down() -> None:
    got = order(
        {c.CURRENT: 4, c.CANDIDATE: 1},
        0.2,
        0.2,
        [c.ScaleTo(c.CANDIDATE, 2), c.SetWeight(0.4), c.ScaleTo(c.CURRENT, 3)],
    )
    assert got.writes == (
        Write(
            {c.CURRENT: 4, c.CANDIDATE: 2},
            0.4,
            0.4,
            True,
            ("weight 0.4000", "scale candidate to 2"),
        ),
        Write({c.CURRENT: 3, c.CANDIDATE: 2}, 0.4, 0.4, False, ("scale current to 3",)),
    )
    assert got.targets == {c.CURRENT: 3, c.CANDIDATE: 2} and got.weight == 0.4


def test_a_scale_down_alone_still_waits_for_the_router_first() -> None:
    """The weight was set by an earlier, interrupted apply: the scale-down must wait for the
    router to confirm what is deployed."""
    got = order({c.CURRENT: 4, c.CANDIDATE: 2}, 0.4, 0.4, [c.ScaleTo(c.CURRENT, 3)])
    assert [(w.targets, w.confirm) for w in got.writes] == [
        ({c.CURRENT: 4, c.CANDIDATE: 2}, True),
        ({c.CURRENT: 3, c.CANDIDATE: 2}, False),
    ]


def test_scale_ups_alone_need_no_confirmation_and_finish_writes_last() -> None:
    up = order({c.CURRENT: 2, c.CANDIDATE: 0}, 0.0, 0.0, [c.ScaleTo(c.CANDIDATE, 1)])
    assert [w.confirm for w in up.writes] == [False]
    end = order({c.CURRENT: 0, c.CANDIDATE: 2}, 1.0, 1.0, [c.Finish(c.Phase.SUCCEEDED)])
    assert [w.applied for w in end.writes] == [()] and end.finished == ("succeeded",)
    assert order({c.CURRENT: 2}, 0.0, 0.0, []).writes == ()


def test_a_session_weight_change_alone_is_written_and_confirmed() -> None:
    """A cancel lowers the sessions' weight to the weight's: no replica moves, yet the router
    must take it before anything else happens."""
    got = order({c.CURRENT: 3, c.CANDIDATE: 1}, 0.25, 0.5, [c.SetWeight(0.25, 0.25)])
    assert got.writes == (
        Write({c.CURRENT: 3, c.CANDIDATE: 1}, 0.25, 0.25, True, ("weight 0.2500",)),
    )
    assert got.session_weight == 0.25


def test_a_replayed_apply_finds_its_config_deployed_and_still_waits_for_the_router(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A crash between the step's writes and its checkpoint: the re-run's first write changes
    nothing on the cluster, yet the scale-down waits for the router's confirmation."""
    snaps = recorded("candidate_starts")
    plan = plan_for(snaps, "v2")
    calls: list[str] = []
    deployed: dict[str, dict[str, Any]] = {}
    tables: dict[str, dict[str, Any]] = {}

    def deploy(apps: dict[str, dict[str, Any]]) -> None:
        calls.append("deploy " + ",".join(sorted(apps)))
        deployed.clear()
        deployed.update(apps)

    def details() -> dict[str, Any]:
        return {"applications": {
            k: {"deployed_app_config": v, "source": "declarative", "status": "RUNNING"}
            for k, v in deployed.items()}}  # fmt: skip

    def write_table(model: str, table: dict[str, Any]) -> int:
        stamp = len(calls)
        calls.append(f"table {stamp}")
        tables[model] = {**table, "model": model, "stamp": stamp}
        return stamp

    monkeypatch.setattr(serve_calls, "details", details)
    monkeypatch.setattr(serve_calls, "deploy", deploy)
    monkeypatch.setattr(serve_calls, "gpus", lambda: (6.0, 6.0))
    monkeypatch.setattr(serve_calls, "connect", lambda address: None)
    monkeypatch.setattr(serve_calls, "config_lock", contextlib.nullcontext)
    monkeypatch.setattr(router_client, "read_table", tables.get)
    monkeypatch.setattr(router_client, "write_table", write_table)
    monkeypatch.setattr(
        router_link, "confirm", lambda plan, stamp: calls.append(f"confirm {stamp}") or 0.0
    )
    actions = [c.SetWeight(0.5), c.ScaleTo(c.CURRENT, 1)]
    memory = Memory(targets={c.CURRENT: 2, c.CANDIDATE: 1}, weight=0.0)
    serve_backend.ServeBackend(plan, memory).apply(actions)
    stamp = tables["m"]["stamp"]
    assert calls == ["deploy m_v1,m_v2", f"table {stamp}", f"confirm {stamp}", "deploy m_v1,m_v2"]
    assert [(r["version"], r["weight"]) for r in tables["m"]["routes"]] == [
        ("v1", 0.5),
        ("v2", 0.5),
    ]
    assert {a["route_prefix"] for a in deployed.values()} == {"/_rollout/m_v1", "/_rollout/m_v2"}
    calls.clear()
    deployed["m_v1"]["deployments"][0]["num_replicas"] = 2  # the crash came before the scale-down
    serve_backend.ServeBackend(plan, memory).apply(actions)  # the re-run, from the same memory
    assert calls == [f"confirm {stamp}", "deploy m_v1,m_v2"]
    assert tables["m"]["stamp"] == stamp


# ---- every call has a timeout ---------------------------------------------------------------


def test_a_call_that_hangs_or_fails_on_the_cluster_is_a_backend_error() -> None:
    import threading

    from rollout.driver import BackendError

    release = threading.Event()
    with pytest.raises(BackendError, match=r"Serve did not answer within 0\.2 s"):
        serve_calls.bounded(lambda: release.wait(30), 0.2, "Serve")
    release.set()

    def lost() -> None:
        raise ConnectionError("GCS unreachable\nmore lines")

    with pytest.raises(BackendError, match=r"^Serve failed: ConnectionError: GCS unreachable$"):
        serve_calls.bounded(lost, 5, "Serve")

    def bug() -> None:
        raise KeyError("replicas")

    with pytest.raises(KeyError):  # a bug is not the cluster's failure: it propagates
        serve_calls.bounded(bug, 5, "Serve")
    assert serve_calls.bounded(lambda: 7, 5, "Serve") == 7
