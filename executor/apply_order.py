"""The order in which one decision's actions reach the cluster: pure, no Ray.

Within one decision: first the router's weight (and any scale-up, which cannot make a replica
ready at once), then — once every router replica has confirmed the weight — the scale-downs.
The controller's weight never exceeds the share of the ready replicas left after its own
scale-downs, so applying the weight first never sends traffic to a version with no replica,
while scaling down first could (a request routed to a deployment with no replica waits).

The confirmation is part of the first write whenever the weight changed or a scale-down
follows, also when the cluster already runs that config: a re-run of a step after a crash
between `deploy_apps` and the step's checkpoint, or after a timed-out acknowledgement, finds
the config deployed and must still not scale down before the router has confirmed it.

The decision that finishes the rollout ends with one more write (or its scale-downs' write):
the hand-back, which gives the versions still running to Serve's own autoscaling at the
counts they have (executor/serve_config.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from executor.plan import ROLES
from rollout import controller as c


@dataclass(frozen=True)
class Write:
    """One write of the whole config, and whether to wait for the router after it."""

    targets: dict[str, int]
    weight: float
    session_weight: float  # the candidate's share of sticky sessions (rollout/sticky.py)
    confirm: bool  # wait until every router replica routes by this write's weight
    applied: tuple[str, ...]  # the actions it completes, as `action_applied` names them
    hand_back: bool = False  # the rollout ends: its versions go back to Serve's autoscaling


@dataclass(frozen=True)
class Order:
    writes: tuple[Write, ...]
    targets: dict[str, int]  # what the backend has applied once every write is done
    weight: float
    session_weight: float
    finished: tuple[str, ...]  # outcomes of Finish actions, reported last


def order(
    targets: dict[str, int], weight: float, session_weight: float, actions: Sequence[c.Action]
) -> Order:
    """The writes that apply `actions` on top of the applied `targets` and weights."""
    old = {role: targets.get(role, 0) for role in ROLES}
    new = dict(old)
    new_weight, new_sessions = weight, session_weight
    finished: list[str] = []
    for a in actions:
        if isinstance(a, c.ScaleTo):
            new[a.version] = a.replicas
        elif isinstance(a, c.SetWeight):
            new_weight, new_sessions = a.candidate_weight, a.session_weight
        elif isinstance(a, c.Finish):
            finished.append(a.outcome.value)
    ups = sorted(r for r in ROLES if new[r] > old[r])
    downs = sorted(r for r in ROLES if new[r] < old[r])
    shifted = new_weight != weight or new_sessions != session_weight
    writes = []
    if shifted or ups or downs:
        first = {r: (new[r] if r in ups else old[r]) for r in ROLES}
        what = f"weight {new_weight:.4f}"
        if new_sessions != new_weight:
            what += f", sessions {new_sessions:.4f}"
        names = ([what] if shifted else []) + [f"scale {r} to {new[r]}" for r in ups]
        confirm = shifted or bool(downs)
        writes.append(Write(first, new_weight, new_sessions, confirm, tuple(names)))
    if downs or finished:
        names = [f"scale {r} to {new[r]}" for r in downs]
        writes.append(
            Write(dict(new), new_weight, new_sessions, False, tuple(names), bool(finished))
        )
    return Order(tuple(writes), new, new_weight, new_sessions, tuple(finished))
