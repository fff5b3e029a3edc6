"""GPU supply and billing: held against reserved billing, whole nodes, on-demand nodes that
arrive after a provisioning delay and go once empty, and the reservation each policy needs."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError
from test_sim_rollout import AT_S, N, steady

from rollout.scenario import FleetSpec
from sim.api import simulate
from sim.result import hours


def test_reserved_billing_pays_the_whole_reservation():
    held = simulate(steady({"max_surge_percent": 25}))
    reserved = simulate(steady({"max_surge_percent": 25}, fleet__billing="reserved"))
    span = held.summary["span_s"]
    assert reserved.summary["span_s"] == span  # billing changes what is paid, nothing else
    assert held.summary["cost_usd"] == pytest.approx(held.summary["gpu_hours"] * 2.5)
    assert reserved.summary["cost_usd"] == pytest.approx(16 * span / 3600 * 2.5)
    assert reserved.summary["billing"] == "reserved" and held.summary["billing"] == "held"
    # the reservation surge needs: its peak, N + 3
    assert held.summary["reserve_gpus"] == held.summary["peak_gpus"] == N + 3


def test_on_demand_nodes_arrive_late_and_are_billed_by_the_node_hour():
    """Reserved: 10 GPUs on 2-GPU nodes, full. Surge 25 % needs 3 more: two on-demand nodes,
    provisioned in 60 s, so the first candidates get GPUs 60 s into the rollout."""
    result = simulate(
        steady(
            {"max_surge_percent": 25},
            fleet={
                "replicas": N,
                "gpu_capacity": N,
                "gpus_per_node": 2,
                "max_ongoing_requests": 2,
                "on_demand": {
                    "max_nodes": 2,
                    "provision_s": {"kind": "deterministic", "seconds": 60},
                    "node_hour_usd": 20.0,
                },
            },
        )
    )
    s, tl, reps = result.summary, result.timeline, result.replicas
    assert s["outcome"] == "succeeded"
    cand = reps[reps["version"] == "candidate"].sort_values("replica_id")
    assert list(cand["gpu_s"].head(3)) == [AT_S + 60] * 3
    assert tl["on_demand_nodes"].max() == 2
    assert tl.loc[tl["t_s"] < AT_S, "on_demand_nodes"].max() == 0
    node_h = hours(tl, "on_demand_nodes", s["span_s"])
    assert node_h > 0
    assert s["on_demand_node_hours"] == pytest.approx(node_h)
    assert s["cost_on_demand_usd"] == pytest.approx(20.0 * node_h)
    reserved_h = s["gpu_hours"] - hours(tl, "on_demand_gpus_in_use", s["span_s"])
    assert s["cost_gpu_usd"] == pytest.approx(2.5 * reserved_h)
    assert s["cost_usd"] == pytest.approx(s["cost_gpu_usd"] + s["cost_on_demand_usd"])
    assert s["reserve_gpus"] == 14  # a peak of 13 GPUs is 7 whole 2-GPU nodes
    # never more GPUs held than the reserved ones plus the nodes' (bought or on their way)
    assert (tl["gpus_in_use"] <= N + 2 * tl["on_demand_nodes"]).all()


def test_an_on_demand_node_goes_once_empty():
    """A load step brings the autoscaler above the reservation; when the load falls, the
    replicas on the on-demand node are removed first (fewest replicas on their node) and the
    node is handed back."""
    result = simulate(
        steady(
            {"max_surge_percent": 25},
            rollout=None,
            trace={
                "synthetic": {
                    "process": "step",
                    "rate_per_s": 16.0,
                    "step_at_s": 1200,
                    "step_factor": 0.25,
                    "duration_s": 2400,
                }
            },
            fleet={
                "replicas": 4,
                "gpu_capacity": 4,
                "gpus_per_node": 4,
                "max_ongoing_requests": 4,
                "on_demand": {
                    "max_nodes": 1,
                    "provision_s": {"kind": "deterministic", "seconds": 30},
                    "node_hour_usd": 10.0,
                },
            },
            autoscaling={
                "min_replicas": 2,
                "max_replicas": 8,
                "target_ongoing_requests": 1.0,
                "upscale_delay_s": 10,
                "downscale_delay_s": 60,
            },
        )
    )
    tl = result.timeline
    up = tl.loc[tl["on_demand_nodes"] > 0, "t_s"]
    assert len(up) and up.min() < 1200
    assert tl.iloc[-1]["on_demand_nodes"] == 0
    released = tl.loc[(tl["t_s"] > 1200) & (tl["on_demand_nodes"] == 0), "t_s"].min()
    assert 1200 < released < 1500
    assert np.isfinite(result.summary["on_demand_node_hours"])


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"gpus_per_replica": 3, "gpus_per_node": 8, "gpu_capacity": 24}, "whole replicas"),
        ({"gpus_per_node": 8, "gpu_capacity": 12}, "whole number of 8-GPU nodes"),
        ({"billing": "monthly"}, "billing"),
        (
            {"on_demand": {"max_nodes": 1, "node_hour_usd": 1.0}},
            "fleet.on_demand buys whole nodes",
        ),
    ],
)
def test_bad_supply(fields, message):
    with pytest.raises(ValidationError, match=message):
        FleetSpec.model_validate({"replicas": 1, "gpu_capacity": 8, **fields})
