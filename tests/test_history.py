from fake_cluster import FakeCluster
from sim_loop import Script, run

from rollout import controller as c
from rollout import history as h
from rollout.policy import RolloutPolicy


def test_every_event_type_round_trips_through_json_lines():
    d = run(
        RolloutPolicy(max_surge_percent=50, stabilization_time_seconds=10),
        FakeCluster(desired=4, start_delay=(3, 3)),
        Script(
            controls=[(1.0, c.Control.PAUSE), (2.0, c.Control.PAUSE), (100.0, c.Control.RESUME)],
            desired=[(50.0, 6)],
        ),
    )
    events = [*d.history, h.ActionApplied(t=1.5, action="ScaleTo(candidate, 2)", seconds=0.2)]
    text = h.dump_jsonl(events)
    assert h.load_jsonl(text) == events
    kinds = {e.kind for e in events}
    assert {
        "rollout_started",
        "control_received",
        "control_applied",
        "control_ignored",
        "transition",
        "scaled",
        "weight_set",
        "waiting",
        "step_completed",
        "resized",
        "finished",
        "action_applied",
    } <= kinds
    times = [e.t for e in d.history]
    assert times == sorted(times), "history is in time order"
