"""The request path: arrivals, routing, queueing, service and completions.

SimPy owns simulated time and the control plane (replica lifecycles, the autoscaler, the rollout
controller). Requests are far more numerous, so they bypass SimPy's generator processes: the
router keeps its own heap of completions and a cursor into the sorted arrivals, and the main
loop lets it run up to the next control-plane event before SimPy takes that event. Same-time
ties go to requests first, then to the control plane; within requests, completions before
arrivals. Per-request results go into preallocated lists, not objects.

Routing, as Ray Serve does it for a weighted pair of deployments:
1. the version is drawn by the controller's candidate weight (never a version without a ready
   replica);
2. within the version, power of two choices on ongoing requests picks a replica; when both
   picks are full but another replica has room, the request goes there (Serve's router retries
   until it finds one);
3. when every ready replica of the version is full, the request waits in the version's FIFO
   lane at the router; the first replica to free a slot takes the lane's head;
4. a request still waiting `request_timeout_s` after it arrived is dropped. Lanes are FIFO
   with one timeout, so expired requests are always at the head and are dropped lazily,
   stamped with their deadline.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Callable
from operator import attrgetter

from sim.replica import Replica
from sim.service import ServiceTimes

INF = math.inf
_ONGOING = attrgetter("ongoing")


class Router:
    def __init__(
        self,
        arrivals: list[float],
        services: tuple[ServiceTimes, ServiceTimes],
        *,
        max_ongoing: int,
        timeout_s: float,
        seed: int,
        on_drained: Callable[[Replica, float], None],
    ) -> None:
        n = len(arrivals)
        self.arrivals = arrivals
        self.n = n
        self.services = services
        self.max_ongoing = max_ongoing
        self.timeout_s = timeout_s
        self.on_drained = on_drained
        self.weight = 0.0  # the candidate's share of new requests
        self.next_i = 0  # next arrival to process
        self.heap: list[tuple[float, int, Replica]] = []  # (end, request, replica)
        self.lanes: tuple[deque[int], deque[int]] = (deque(), deque())
        self.ready: tuple[list[Replica], list[Replica]] = ([], [])
        self.free = [0, 0]  # free slots on ready replicas, per version
        self.dropped = 0
        # two streams: one draw per arrival for the version, so the split of requests between
        # versions lines up across policies; another for the replica picks
        self._version_draw = random.Random(seed * 2 + 1).random
        self._pick_draw = random.Random(seed * 2 + 2).random
        nan = math.nan
        self.start = [nan] * n
        self.end = [nan] * n
        self.first = [nan] * n  # first token
        self.replica = [-1] * n
        self.version = bytearray(n)

    # ---- what the control plane reads ----------------------------------------------------

    @property
    def idle(self) -> bool:
        return self.next_i >= self.n and not self.heap and not self.lanes[0] and not self.lanes[1]

    def ongoing(self, now: float) -> int:
        """Requests in service or waiting at the router (Ray Serve's autoscaling metric)."""
        self._purge(now)
        return len(self.heap) + len(self.lanes[0]) + len(self.lanes[1])

    # ---- what the control plane changes --------------------------------------------------

    def set_weight(self, weight: float) -> None:
        self.weight = weight

    def add_ready(self, rep: Replica, now: float) -> None:
        v = rep.version
        self.ready[v].append(rep)
        self.free[v] += self.max_ongoing - rep.ongoing
        other = 1 - v
        if self.lanes[other] and not self.ready[other]:
            self._adopt(v, other)  # orphans of a version that has no ready replica
        self._refill(v, now)

    def remove_ready(self, rep: Replica, now: float) -> None:
        """Stop routing to `rep` at once; its in-flight requests finish."""
        v = rep.version
        self.ready[v].remove(rep)
        self.free[v] -= self.max_ongoing - rep.ongoing
        rep.draining = True
        other = 1 - v
        if not self.ready[v] and self.ready[other] and self.lanes[v]:
            self._adopt(other, v)
            self._refill(other, now)

    def _adopt(self, v: int, other: int) -> None:
        """Move the other version's waiting requests into v's lane, keeping arrival order."""
        merged = deque(heapq.merge(self.lanes[v], self.lanes[other]))
        self.lanes[other].clear()
        self.lanes[v].clear()
        self.lanes[v].extend(merged)

    def _purge(self, now: float) -> None:
        arr, timeout, end = self.arrivals, self.timeout_s, self.end
        for lane in self.lanes:
            while lane and arr[lane[0]] + timeout < now:
                k = lane.popleft()
                end[k] = arr[k] + timeout
                self.dropped += 1

    def _refill(self, v: int, now: float) -> None:
        """Give waiting requests to free slots of version v (a replica became ready)."""
        self._purge(now)
        lane, ready = self.lanes[v], self.ready[v]
        while lane and self.free[v] > 0:
            rep = min(ready, key=_ONGOING)
            self.free[v] -= 1
            rep.ongoing += 1
            self._serve(lane.popleft(), rep, now)

    def _serve(self, k: int, rep: Replica, now: float) -> None:
        """Start request k on rep (its `ongoing` already counts k)."""
        svc = self.services[rep.version]
        factor = 1.0 + svc.slowdown * (rep.ongoing - 1)
        end = now + svc.base[k] * factor
        self.start[k] = now
        self.end[k] = end
        self.first[k] = end if svc.prefill is None else now + svc.prefill[k] * factor
        self.replica[k] = rep.id
        self.version[k] = rep.version
        heapq.heappush(self.heap, (end, k, rep))

    # ---- the hot loop ------------------------------------------------------------------------

    def advance(self, until: float) -> None:
        """Process request events up to and including `until`.

        Returns early when a draining replica finishes its last request: the control plane must
        release its GPU at that moment, before any later event.
        """
        arr, n, heap, lanes, ready, free = (
            self.arrivals,
            self.n,
            self.heap,
            self.lanes,
            self.ready,
            self.free,
        )
        end, version = self.end, self.version
        maxo, timeout = self.max_ongoing, self.timeout_s
        vdraw, pdraw = self._version_draw, self._pick_draw
        serve = self._serve
        heappop = heapq.heappop
        i = self.next_i
        t_arr = arr[i] if i < n else INF
        try:
            while True:
                if heap and heap[0][0] <= t_arr:
                    # ---- a completion
                    t = heap[0][0]
                    if t > until:
                        break
                    _, _, rep = heappop(heap)
                    rep.ongoing -= 1
                    if rep.draining:
                        if rep.ongoing == 0:
                            self.on_drained(rep, t)
                            break
                        continue
                    v = rep.version
                    lane = lanes[v]
                    k = -1
                    while lane:
                        k = lane.popleft()
                        if arr[k] + timeout >= t:
                            break
                        end[k] = arr[k] + timeout  # waited too long: dropped at its deadline
                        self.dropped += 1
                        k = -1
                    if k < 0:
                        free[v] += 1
                        continue
                    rep.ongoing += 1
                    serve(k, rep, t)
                    continue
                # ---- an arrival
                if t_arr > until or i >= n:
                    break
                t = t_arr
                k = i
                i += 1
                t_arr = arr[i] if i < n else INF
                w = self.weight
                v = 1 if vdraw() < w else 0
                if not ready[v] and ready[1 - v]:
                    v = 1 - v
                if free[v] <= 0:
                    lanes[v].append(k)
                    version[k] = v
                    continue
                reps = ready[v]
                m = len(reps)
                if m == 1:
                    rep = reps[0]
                else:
                    a = int(pdraw() * m)
                    b = int(pdraw() * (m - 1))
                    if b >= a:
                        b += 1
                    rep = reps[a]
                    other = reps[b]
                    if other.ongoing < rep.ongoing:
                        rep = other
                    if rep.ongoing >= maxo:
                        rep = min(reps, key=_ONGOING)
                free[v] -= 1
                rep.ongoing += 1
                serve(k, rep, t)
        finally:
            self.next_i = i

    def finish(self) -> None:
        """The run is over: whoever still waits is dropped at its deadline."""
        self._purge(INF)
