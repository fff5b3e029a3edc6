"""Who sizes a version on Ray, without Ray: the configs the hand-over writes, checked with Serve
2.60's own schema and code-version hash, and the capacity the controller's cap reads.

The real hand-over (no restart, no dip) is measured in tests/test_executor_autoscaling.py.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import pytest
from ray.serve._private.deploy_utils import get_app_code_version
from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema
from test_executor_observation import plan_for, recorded

from executor import observation
from executor.apply_order import order
from executor.observation import Snapshot, scaling_of
from executor.plan import ROLES, Memory, Plan
from executor.serve_config import autoscaling_of, with_versions
from rollout import controller as c
from rollout.autoscaler import AutoscalingConfig

SCALING = AutoscalingConfig(min_replicas=2, max_replicas=8, target_ongoing_requests=1)


def plan_with(autoscaling: AutoscalingConfig | None, old: dict[str, Any] | None) -> Plan:
    """A v1 → v2 plan whose new deploy file has `autoscaling` and whose live v1 was deployed
    with the Serve `autoscaling_config` `old` (None: a fixed `num_replicas`)."""
    plan = plan_for(recorded("candidate_starts"), "v2")
    spec = plan.spec.model_copy(update={"autoscaling": autoscaling})
    current = copy.deepcopy(plan.current_app)
    assert current is not None
    if old is not None:
        current["deployments"][0].pop("num_replicas", None)
        current["deployments"][0]["autoscaling_config"] = old
    return plan.model_copy(update={"spec": spec, "current_app": current})


def deployment(apps: dict[str, dict[str, Any]], app: str) -> dict[str, Any]:
    return dict(apps[app]["deployments"][0])


def valid(apps: dict[str, dict[str, Any]]) -> None:
    """Serve's own schema accepts the whole config (as `deploy_apps` validates it)."""
    ServeDeploySchema.model_validate({"applications": list(apps.values())})


def code_version(apps: dict[str, dict[str, Any]], app: str) -> str:
    return get_app_code_version(ServeApplicationSchema.model_validate(apps[app]))


def test_a_version_with_autoscaling_is_pinned_while_driven_and_released_at_its_count() -> None:
    plan = plan_with(SCALING, SCALING.to_serve(initial_replicas=5))
    driven = with_versions(plan, {}, {c.CURRENT: 5, c.CANDIDATE: 2})
    valid(driven)
    for app, n in (("m_v1", 5), ("m_v2", 2)):
        dep = deployment(driven, app)
        assert "num_replicas" not in dep
        bounds = {k: dep["autoscaling_config"][k] for k in ("min_replicas", "max_replicas")}
        assert bounds == {"min_replicas": n, "max_replicas": n}
        assert dep["autoscaling_config"]["initial_replicas"] == n
        assert dep["autoscaling_config"]["target_ongoing_requests"] == 1

    end = with_versions(plan, {}, {c.CANDIDATE: 5}, frozenset({c.CANDIDATE}))
    valid(end)
    assert "m_v1" not in end
    assert deployment(end, "m_v2")["autoscaling_config"] == SCALING.to_serve(initial_replicas=5)
    # Serve rebuilds an application whose code version changes, restarting every replica: the
    # hand-over changes bounds only, so the code version stays
    assert code_version(end, "m_v2") == code_version(driven, "m_v2")


def test_switching_to_num_replicas_would_change_the_code_version() -> None:
    """Why the controller pins bounds instead of writing `num_replicas`: Serve hashes the
    deployments' autoscaling policies into the code version ([] vs [None])."""
    plan = plan_with(SCALING, None)
    pinned = with_versions(plan, {}, {c.CANDIDATE: 3})
    fixed = with_versions(plan_with(None, None), {}, {c.CANDIDATE: 3})
    assert deployment(fixed, "m_v2")["num_replicas"] == 3
    assert code_version(pinned, "m_v2") != code_version(fixed, "m_v2")


def test_a_cancelled_rollout_hands_the_old_version_back_with_its_own_config() -> None:
    """The old version returns to the `autoscaling_config` it was deployed with (not the new
    deploy file's), at its count clamped to its own bounds."""
    old = {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 3.0}
    plan = plan_with(SCALING, old)
    back = with_versions(plan, {}, {c.CURRENT: 3}, frozenset({c.CURRENT}))
    valid(back)
    assert deployment(back, "m_v1")["autoscaling_config"] == {**old, "initial_replicas": 3}
    assert autoscaling_of(plan, c.CURRENT, 9) == {**old, "initial_replicas": 4}


def test_versions_without_autoscaling_keep_a_fixed_count() -> None:
    plan = plan_with(None, None)
    assert autoscaling_of(plan, c.CANDIDATE, 3) is None
    assert autoscaling_of(plan, c.CURRENT, 3) is None
    end = with_versions(plan, {}, {c.CURRENT: 0, c.CANDIDATE: 3}, frozenset(ROLES))
    assert deployment(end, "m_v2")["num_replicas"] == 3
    assert "autoscaling_config" not in deployment(end, "m_v2")


def test_the_finishing_write_hands_back() -> None:
    end = order({c.CURRENT: 0, c.CANDIDATE: 2}, 1.0, 1.0, [c.Finish(c.Phase.SUCCEEDED)])
    assert [w.hand_back for w in end.writes] == [True]
    step = order({c.CURRENT: 2, c.CANDIDATE: 1}, 0.3, 0.3, [c.ScaleTo(c.CURRENT, 1)])
    assert not any(w.hand_back for w in step.writes)


@pytest.mark.parametrize(
    "conf,scaled_by",
    [
        ({"min_replicas": 2, "max_replicas": 8}, "serve"),
        ({"min_replicas": 3, "max_replicas": 3}, "fixed"),  # pinned by a rollout
        (None, "fixed"),
    ],
)
def test_scaling_of_reads_who_sizes_a_version(conf: dict[str, Any] | None, scaled_by: str) -> None:
    replicas = [{"state": "RUNNING"}, {"state": "RUNNING"}, {"state": "STARTING"}]
    app = {
        "deployments": {
            "Model": {
                "target_num_replicas": 3,
                "deployment_config": {"autoscaling_config": conf},
                "replicas": replicas,
            }
        }
    }
    got = scaling_of(app)
    assert (got["running"], got["target"], got["scaled_by"]) == (2, 3, scaled_by)


def test_capacity_is_the_free_gpus_and_those_the_pool_holds() -> None:
    """Recorded on 4 GPUs: v1's 2 replicas and v2's 1 placed, 1 GPU free."""
    snaps = recorded("candidate_starts")
    plan = plan_for(snaps, "v2")
    snap = snaps[-1]
    seen, _ = observation.observe(plan, Memory(targets={c.CURRENT: 2, c.CANDIDATE: 1}), snap, set())
    assert (seen[c.CURRENT].holding, seen[c.CANDIDATE].holding, snap.free_gpus) == (2, 1, 1.0)
    assert observation.capacity(plan, snap, seen) == 4
    # a GPU something else takes (another application, a placement group) is not the pool's
    taken = Snapshot(snap.time, snap.details, 0.0, snap.total_gpus)
    assert observation.capacity(plan, taken, seen) == 3
    # a replica waiting for a GPU holds none
    waiting = {**seen, c.CANDIDATE: replace(seen[c.CANDIDATE], pending_gpu=1)}
    assert observation.capacity(plan, taken, waiting) == 2
    cpu_only = plan.model_copy(deep=True)
    cpu_only.candidate_app["deployments"][0]["ray_actor_options"]["num_gpus"] = 0
    assert observation.capacity(cpu_only, snap, seen) is None
