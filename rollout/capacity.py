"""Headroom against the autoscaler: the largest pool the cluster's GPUs leave room for.

A surge step holds N + surge(N) replicas at once. When the autoscaler raises N until that no
longer fits, the step's new replicas wait for GPUs that only the step itself could free, and the
rollout fails at its deadline. So the controller caps the pool's desired size at the largest N
whose step fits, and records the cap; in unavailable mode a step never holds more than N, so
the cap is the capacity itself: the pool grows into free GPUs only, and with none free it
stays at the GPUs it holds.

Capacity is counted in replicas: (GPUs the pool's replicas hold + free GPUs) ÷ GPUs per
replica. When even the smallest pool does not fit, capping would only shrink the serving
version for a step that waits anyway: the desired size stays, the step waits for GPUs and
fails at its deadline, as it always has.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rollout.planner import surge_count
from rollout.policy import Mode, RolloutPolicy


def replicas_fitting(gpus: float, gpus_per_replica: float) -> int | None:
    """Whole replicas that fit on `gpus`; None when a replica needs no GPU (no limit).

    8 GPUs at 1 per replica → 8; at 0.5 → 16; 7 GPUs at 2 → 3.
    """
    if gpus_per_replica <= 0:
        return None
    return max(0, math.floor(gpus / gpus_per_replica + 1e-9))


def surge_limit(capacity: int, percent: int) -> int:
    """The largest pool N whose surge step fits: N + ceil(p·N/100) ≤ capacity (0 if none).

    8 replicas' worth of GPUs at 50 %: N = 5, since 5 + ceil(2.5) = 8 and 6 + 3 = 9 > 8.
    10 at 25 % → 8 (8 + 2); 8 at 10 % → 7 (7 + 1); 2 at 50 % → 1 (1 + 1); 1 → 0.
    """
    n = capacity * 100 // (100 + percent)  # N·(1 + p/100) ≤ capacity, before rounding up
    while n > 0 and n + surge_count(percent, n) > capacity:
        n -= 1
    while n + 1 + surge_count(percent, n + 1) <= capacity:
        n += 1
    return max(0, n)


def step_room(policy: RolloutPolicy, n: int) -> int:
    """Replicas a step of a pool of n holds at most: n + surge(n), or n in unavailable mode."""
    if policy.mode is Mode.SURGE:
        return n + surge_count(policy.max_surge_percent, n)
    return n


def pool_limit(policy: RolloutPolicy, capacity: int) -> int:
    """The largest pool a step of this policy fits in: surge leaves room for the surge,
    unavailable mode never holds more than the pool (12 at 25 % surge → 9; unavailable → 12)."""
    if policy.mode is Mode.SURGE:
        return surge_limit(capacity, policy.max_surge_percent)
    return capacity


@dataclass(frozen=True)
class PoolCap:
    """The pool's size after the cap, and why: `reason` is empty when the desired size fits."""

    desired: int  # what the autoscaler (or the fleet) asked for
    allowed: int  # what the controller drives the versions to
    capacity: int | None  # replicas' worth of GPUs the cluster gives the pool
    limit: int | None  # the largest pool whose step fits
    reason: str = ""

    @property
    def capped(self) -> bool:
        return self.allowed < self.desired


def cap_desired(
    desired: int, capacity: int | None, policy: RolloutPolicy, minimum: int = 1
) -> PoolCap:
    """Cap `desired` at the largest pool whose step fits in `capacity` (None: unknown, no cap).

    | capacity | policy        | desired | allowed | why                                  |
    |----------|---------------|---------|---------|--------------------------------------|
    | 8        | surge 50 %    | 8       | 5       | 5 + ceil(0.5·5) = 8                  |
    | 8        | surge 50 %    | 4       | 4       | 4 + 2 = 6 fits                       |
    | 8        | unavailable   | 10      | 8       | never more than the capacity         |
    | 1        | surge 25 %    | 3       | 3       | even 1 + 1 does not fit: step waits  |
    """
    if capacity is None:
        return PoolCap(desired, desired, None, None)
    limit = pool_limit(policy, capacity)
    if desired <= limit:
        return PoolCap(desired, desired, capacity, limit)
    if limit < minimum:
        reason = (
            f"even a pool of {minimum} needs room for {step_room(policy, minimum)} and the cluster "
            f"can hold {capacity} for the pool: the step waits for GPUs until its deadline"
        )
        return PoolCap(desired, desired, capacity, limit, reason)
    if policy.mode is Mode.SURGE:
        surge = step_room(policy, limit) - limit
        why = f"{limit} + a surge of {surge} use the {capacity} replicas the cluster can hold"
    else:
        why = f"the cluster can hold {capacity} replicas for the pool"
    return PoolCap(desired, limit, capacity, limit, f"desired {desired} capped at {limit}: {why}")
