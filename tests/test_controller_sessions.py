"""The session weight (sticky routing, rollout/sticky.py): the candidate weight's high-water
mark going forward, the weight itself once cancelled or rolled back."""

from fake_cluster import FakeCluster
from hypothesis import given
from hypothesis import strategies as st
from sim_loop import Script, run

from rollout import controller as c
from rollout.policy import RolloutPolicy
from rollout.sticky import next_session_weight, on_candidate, session_point

SURGE = RolloutPolicy(max_surge_percent=25, stabilization_time_seconds=30)


def weights(cluster: FakeCluster) -> list[tuple[float, float]]:
    """(candidate weight, session weight) of every SetWeight applied, in order."""
    return [
        (a.candidate_weight, a.session_weight)
        for a in cluster.applied
        if isinstance(a, c.SetWeight)
    ]


def test_forward_rollout_sessions_follow_the_weight_up():
    cl = FakeCluster(desired=10, start_delay=(5, 5))
    d = run(SURGE, cl)
    assert d.state.phase is c.Phase.SUCCEEDED
    pairs = weights(cl)
    assert [w for w, _ in pairs] == [0.3, 0.6, 0.9, 1.0]
    assert all(sw == w for w, sw in pairs)
    assert d.state.session_weight == 1.0


def test_a_weight_dip_moves_no_session_back():
    """A ready candidate crashes after step 2: the weight drops to the share of ready replicas,
    the session weight stays at its high-water mark."""
    cl = FakeCluster(desired=10, start_delay=(5, 5))
    d = run(SURGE, cl, Script(crashes=[(80.0, c.CANDIDATE)]))
    assert d.state.phase is c.Phase.SUCCEEDED
    pairs = weights(cl)
    dips = [(w, sw) for w, sw in pairs if sw > w]
    assert dips, f"the crash lowered the weight below its high-water mark: {pairs}"
    session = [sw for _, sw in pairs]
    assert session == sorted(session), "the session weight never decreases going forward"


def test_cancel_moves_sessions_back_with_the_weight_to_zero():
    """A crash lowers the weight below its mark; the cancel brings the session weight down to
    the weight at once, and from then on it follows the weight down to 0."""
    cl = FakeCluster(desired=10, start_delay=(5, 5))
    mark = {}

    def check(d, cluster, decision, seen, weight):
        if "at" not in mark and any(e.kind == "control_applied" for e in decision.events):
            mark["at"] = len([a for a in cluster.applied if isinstance(a, c.SetWeight)])

    script = Script(crashes=[(80.0, c.CANDIDATE)], controls=[(90.0, c.Control.CANCEL)])
    d = run(SURGE, cl, script, check)
    assert d.state.phase is c.Phase.CANCELLED
    pairs = weights(cl)
    before, after = pairs[: mark["at"] - 1], pairs[mark["at"] - 1 :]
    assert any(sw > w for w, sw in before), "the crash made a dip before the cancel"
    assert after and all(w == sw for w, sw in after)
    assert after[-1] == (0.0, 0.0) and d.state.session_weight == 0.0
    session = [sw for _, sw in after]
    assert session == sorted(session, reverse=True)


def test_force_cancel_moves_every_session_back_at_once():
    cl = FakeCluster(desired=10, start_delay=(5, 5))
    d = run(SURGE, cl, Script(controls=[(90.0, c.Control.FORCE_CANCEL)]))
    assert d.state.phase is c.Phase.CANCELLED
    pairs = weights(cl)
    high = max(sw for _, sw in pairs)
    assert high > 0
    # one SetWeight takes both from their mark to 0
    assert pairs[pairs.index((high, high)) + 1] == (0.0, 0.0)


def test_state_round_trips_with_the_session_weight():
    state, _ = c.start(SURGE, 4, 0.0)
    state = c.replace(state, candidate_weight=0.25, session_weight=0.5)
    assert c.RolloutState.from_json(state.to_json()) == state


def test_set_weight_defaults_its_session_weight_to_the_weight():
    assert c.SetWeight(0.4) == c.SetWeight(0.4, 0.4)
    assert c.SetWeight(0.4, 0.6).session_weight == 0.6


@given(
    st.lists(st.floats(0, 1), min_size=1, max_size=30),
    st.lists(st.floats(0, 1), min_size=1, max_size=30),
    st.text(min_size=1, max_size=20),
)
def test_forward_only_means_a_candidate_session_stays(ups, downs, key):
    """Going forward a session on the candidate stays there; going back the share of points
    below the session weight is the weight itself."""
    u = session_point(key)
    sw, seen = 0.0, False
    for w in ups:
        sw = next_session_weight(sw, w, forward=True)
        now = on_candidate(u, sw)
        assert now or not seen
        seen = seen or now
    for w in downs:
        sw = next_session_weight(sw, w, forward=False)
        assert sw == w
    assert not on_candidate(u, next_session_weight(sw, 0.0, forward=False))
