"""Step arithmetic: small pure functions with worked numbers, tested from tables.

Rounding follows Kubernetes (`intstr.GetScaledValueFromIntOrPercent`): a surge percentage
rounds up, an unavailable percentage rounds down, and a step always changes at least one
replica (Kubernetes' `ResolveFenceposts` falls back to one unavailable replica for the same
reason: a step of zero would never finish). Proportions round halves away from zero, as Go's
`math.Round` does (Python's `round()` rounds halves to even: 2.5 → 2 where Go gives 3).
"""

from __future__ import annotations

import math

from rollout.policy import Mode, RolloutPolicy


def surge_count(percent: int, replicas: int) -> int:
    """Replicas added per surge step: ceil(p·N/100), at least 1. 10 % of 8 → 1; 25 % of 10 → 3."""
    if percent <= 0:
        return 0
    return max(1, math.ceil(percent * replicas / 100))


def unavailable_count(percent: int, replicas: int) -> int:
    """Replicas removed per unavailable step: floor(p·N/100), at least 1. 25 % of 10 → 2."""
    if percent <= 0:
        return 0
    return max(1, (percent * replicas) // 100)


def step_size(policy: RolloutPolicy, replicas: int) -> int:
    """Replicas replaced per step for a pool of `replicas`."""
    if policy.mode is Mode.SURGE:
        return surge_count(policy.max_surge_percent, replicas)
    return unavailable_count(policy.max_unavailable_percent, replicas)


def headroom(policy: RolloutPolicy, replicas: int) -> int:
    """Replicas allowed above the target: the surge in surge mode, none in unavailable mode."""
    return surge_count(policy.max_surge_percent, replicas)


def ready_floor(policy: RolloutPolicy, replicas: int) -> int:
    """Ready replicas the pool keeps while a steady rollout runs: N (surge) or N − u."""
    return replicas - unavailable_count(policy.max_unavailable_percent, replicas)


def step_count(policy: RolloutPolicy, replicas: int) -> int:
    """Steps for N replicas and a constant pool: ceil(N / step). 10 at 25 % surge → 4."""
    return math.ceil(replicas / step_size(policy, replicas))


def candidate_share(candidate_ready: int, current_ready: int) -> float | None:
    """The candidate's share of the ready replicas; None when neither version has one.

    This is the weight the candidate gets at a step boundary: traffic in proportion to the
    healthy replicas, never more than the candidate's share, never on a version with no ready
    replica.
    """
    total = candidate_ready + current_ready
    if total == 0:
        return None
    return candidate_ready / total


def outgoing_removal(
    budget: int, target: int, unready: int, ready: int, floor: int
) -> tuple[int, int]:
    """Outgoing replicas one unavailable-mode step removes, as (unready, ready): unready ones
    first, then ready ones down to the floor, `budget` (the step) in all.

    Kubernetes' `reconcileOldReplicaSets`: `cleanupUnhealthyReplicas` removes unavailable old
    pods first (they serve nothing, so the ready floor is untouched), then
    `scaleDownOldReplicaSetsForRollingUpdate` removes available ones down to `MinAvailable`.
    `ready` counts both versions. 10 old, budget 2, floor 8: all ready → (0, 2); 9 ready →
    (1, 1); 8 ready → (2, 0); 1 ready → (2, 0), never a ready one below the floor.
    """
    unready_gone = min(budget, unready, target)
    ready_gone = min(budget - unready_gone, target - unready_gone, max(0, ready - floor))
    return unready_gone, ready_gone


def round_half_away(x: float) -> int:
    """Go's math.Round, which Kubernetes uses: halves round away from zero (2.5 → 3)."""
    return math.floor(x + 0.5) if x >= 0 else -math.floor(-x + 0.5)


def proportion(size: int, old_allowed: int, new_allowed: int) -> int:
    """How much a version of `size` grows (or shrinks) when its pool's allowed size changes:
    round(size · new / old) − size (Kubernetes' `getReplicaSetFraction`). 50 of 110 → 130:
    +9; 6 of 12 → 10: −1."""
    return round_half_away(size * new_allowed / old_allowed) - size


def proportional_resize(
    sizes: dict[str, int], old_allowed: int, new_allowed: int
) -> dict[str, int]:
    """Resize the versions of one pool to `new_allowed` replicas, keeping their split.

    Kubernetes' proportional scaling (`sync.go` `scale()`, `GetProportion`): each version grows
    by round(size · new_allowed / old_allowed) − size, capped at what is left to add; a version
    at zero stays at zero; the rounding leftover goes to the largest version (newest on ties
    when adding, oldest when removing: pass `sizes` oldest first).

    Worked example from the Kubernetes docs: 8 old and 5 new replicas, surge 3, desired 10 → 15:
    old_allowed = 10 + 3 = 13, new_allowed = 15 + 3 = 18, old round(8·18/13) = 11,
    new round(5·18/13) = 7.
    """
    total = sum(sizes.values())
    to_add = new_allowed - total
    if to_add == 0 or total == 0:
        return dict(sizes)
    names = list(sizes)
    if to_add > 0:  # bigger first, newer first on ties
        order = sorted(names, key=lambda n: (-sizes[n], -names.index(n)))
    else:  # bigger first, older first on ties
        order = sorted(names, key=lambda n: (-sizes[n], names.index(n)))
    new = dict(sizes)
    added = 0
    for name in order:
        size = sizes[name]
        left = to_add - added
        if size == 0 or left == 0:
            continue
        fraction = proportion(size, old_allowed, new_allowed)
        prop = min(fraction, left) if to_add > 0 else max(fraction, left)
        new[name] = size + prop
        added += prop
    biggest = order[0]
    new[biggest] = max(0, new[biggest] + to_add - added)
    return new
