"""Sticky sessions during a rollout: which version a session is on. Pure, shared by the router
(executor/router.py) and the simulator (sim/router.py), so both route a session alike.

A session key hashes to a point `u` in [0, 1) (`session_point`); the session is on the
candidate while `u` lies below the controller's *session weight* (`on_candidate`). The
assignment is a function of the key and the controller's state alone: every router replica
agrees without sharing anything, and a restarted replica routes every session as before.

The session weight (`next_session_weight`) is the candidate weight's high-water mark while the
rollout goes forward: when the weight grows, the sessions with `u` between the old and the new
mark move to the candidate, so the share of sessions on it follows the weight, and a dip of the
weight (a candidate replica lost) moves nobody back. Once the rollout is cancelled, rolled back
or failed, the session weight follows the weight down (all sessions are back on the current
version when it reaches 0); a force-cancel sets it to 0 at once with the weight.
"""

from __future__ import annotations

import hashlib


def session_point(key: str) -> float:
    """A stable point in [0, 1) for a session key (blake2b: the same on every host)."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def on_candidate(point: float, session_weight: float) -> bool:
    """Whether the session at `point` is assigned the candidate version."""
    return point < session_weight


def next_session_weight(session_weight: float, weight: float, *, forward: bool) -> float:
    """The session weight once the candidate weight is `weight`: its high-water mark while
    going forward, the weight itself once going back."""
    return max(session_weight, weight) if forward else weight
