"""The request path: arrivals, routing, queueing, service and completions.

SimPy owns simulated time and the control plane (replica lifecycles, the autoscaler, the rollout
controller). Requests are far more numerous, so they bypass SimPy's generator processes: the
router keeps its own heap of request events and a cursor into the sorted arrivals, and the main
loop lets it run up to the next control-plane event before SimPy takes that event. Same-time
ties go to requests first, then to the control plane; within requests, heap events before
arrivals. Per-request results go into preallocated numpy columns (written through
memoryviews), not Python objects.

Routing, as Ray Serve does it for a weighted pair of deployments:
1. the version is drawn by the controller's candidate weight (never a version without a ready
   replica); with sticky sessions, a request of a session goes to its session's version
   (rollout/sticky.py: its point below the session weight), as the executor's router does;
2. within the version, power of two choices on ongoing requests picks a replica; when both
   picks are full (`max_ongoing_requests`), power of two choices among the replicas that have
   room (Serve's router retries random pairs until one has room), which the router keeps in
   an indexable list, so a pick costs O(1) however many replicas there are;
3. when every ready replica of the version is full, the request waits in the version's FIFO
   lane at the router; the first replica to free a slot takes the lane's head;
4. a request still waiting `request_timeout_s` after it arrived is dropped. Lanes are FIFO
   with one timeout, so expired requests are always at the head and are dropped lazily,
   stamped with their deadline.

Heap events: `(end, request, replica)` for fixed-time service kinds (one per request), and
`(time, -1 - replica id, replica)` for a replica's engine (`sim/engine.py`), whose next event
moves whenever its batch changes; an entry at another time than the engine's `scheduled` is
stale and skipped.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Callable

import numpy as np

from rollout.guard import Traffic
from sim.engine import Engine, EngineModel, IterationEngine
from sim.replica import Replica
from sim.service import EngineWork, ServiceTimes, Work

INF = math.inf
DONE, DROPPED, FAILED = 0, 1, 2  # the `status` column


class FixedModel:
    """A fixed-time service kind: each request's time is drawn up front."""

    __slots__ = ("base", "prefill", "slowdown")

    def __init__(self, work: ServiceTimes) -> None:
        self.base = memoryview(np.ascontiguousarray(work.base, dtype=float))
        self.prefill = (
            None
            if work.prefill is None
            else memoryview(np.ascontiguousarray(work.prefill, dtype=float))
        )
        self.slowdown = work.slowdown


class Router:
    def __init__(
        self,
        arrivals: np.ndarray,
        work: tuple[Work, Work],
        *,
        max_ongoing: int,
        timeout_s: float,
        seed: int,
        on_drained: Callable[[Replica, float], None],
        fails: np.ndarray | None = None,
        sessions: np.ndarray | None = None,
    ) -> None:
        n = len(arrivals)
        self.n = n
        self.arrival_s = np.ascontiguousarray(arrivals, dtype=float)
        # read through a copy that ends in an infinite sentinel: no bounds check per arrival
        self.arrivals = memoryview(np.append(self.arrival_s, math.inf))
        # result columns, written through memoryviews (as fast as lists, 8 bytes a value)
        self.start_s = np.full(n, np.nan)
        self.end_s = np.full(n, np.nan)
        self.first_s = np.full(n, np.nan)  # first token
        self.replica_id = np.full(n, -1, dtype=np.int32)
        self.version_of = np.zeros(n, dtype=np.uint8)
        self.status_of = np.zeros(n, dtype=np.uint8)
        self.start = memoryview(self.start_s)
        self.end = memoryview(self.end_s)
        self.first = memoryview(self.first_s)
        self.replica = memoryview(self.replica_id)
        self.version = memoryview(self.version_of)
        self.status = memoryview(self.status_of)
        # a bad candidate's requests that fail at once (an error answer); one flag a request,
        # drawn up front so every policy fails the same requests
        self.fails = memoryview(
            np.zeros(n, dtype=np.uint8) if fails is None else np.ascontiguousarray(fails, np.uint8)
        )
        self.models = tuple(self._model(w) for w in work)
        self.max_ongoing = max_ongoing
        self.timeout_s = timeout_s
        self.on_drained = on_drained
        self.weight = 0.0  # the candidate's share of new requests
        self.session_weight = 0.0  # the candidate's share of sessions (sticky routing)
        # sticky routing: each request's session point (-1: none); None: routed by weight
        self.sessions = None if sessions is None else memoryview(np.asarray(sessions, float))
        self.next_i = 0  # next arrival to process
        self.heap: list[tuple[float, int, Replica]] = []
        self.lanes: tuple[deque[int], deque[int]] = (deque(), deque())
        self.ready: tuple[list[Replica], list[Replica]] = ([], [])
        self.avail: tuple[list[Replica], list[Replica]] = ([], [])  # ready with a free slot
        self.inflight = 0  # requests routed to a replica and not finished
        # two streams: one draw per arrival for the version, so the split of requests between
        # versions lines up across policies; another for the replica picks
        self._version_draw = random.Random(seed * 2 + 1).random
        self._pick_draw = random.Random(seed * 2 + 2).random

    def _model(self, work: Work) -> FixedModel | EngineModel:
        if isinstance(work, EngineWork):
            # token counts as floats (exact below 2**53): the engine's arithmetic is in floats,
            # and its compiled form reads one C type (sim/engine.pxd)
            kv = None if work.kv_need is None else memoryview(_floats(work.kv_need))
            return EngineModel.build(
                work.spec,
                memoryview(_floats(work.prefill)),
                memoryview(_floats(work.tokens)),
                kv,
                (self.start, self.first, self.end),
            )
        return FixedModel(work)

    def engine_for(self, version: int) -> Engine | None:
        """A new replica's engine, or None for a fixed-time service kind."""
        model = self.models[version]
        if not isinstance(model, EngineModel):
            return None
        return IterationEngine(model) if model.iterations else Engine(model)

    # ---- what the control plane reads ----------------------------------------------------

    @property
    def idle(self) -> bool:
        return self.next_i >= self.n and not self.heap and not self.lanes[0] and not self.lanes[1]

    def ongoing(self, now: float) -> int:
        """Requests in service or waiting at the router (Ray Serve's autoscaling metric)."""
        self._purge(now)
        return self.inflight + len(self.lanes[0]) + len(self.lanes[1])

    def traffic(self, now: float, window_s: float) -> tuple[Traffic, Traffic]:
        """Each version's requests that arrived in the last `window_s` and ended by `now`
        (answered, failed or dropped), what the metric guard judges. Arrivals are sorted, so
        the window is a slice: one vectorised pass over it per call, nothing in the hot loop."""
        self._purge(now)
        lo = int(np.searchsorted(self.arrival_s, now - window_s, side="right"))
        hi = self.next_i
        arrival = self.arrival_s[lo:hi]
        end = self.end_s[lo:hi]
        done = end <= now
        version = self.version_of[lo:hi]
        failed = self.status_of[lo:hi] != DONE
        first = self.first_s[lo:hi]
        out = []
        for v in (0, 1):
            mine = done & (version == v)
            n = int(np.count_nonzero(mine))
            if n == 0:
                out.append(Traffic())
                continue
            latency = end[mine] - arrival[mine]
            answered = mine & ~failed & (first <= now)
            ttft = first[answered] - arrival[answered]
            out.append(
                Traffic(
                    requests=n,
                    failures=int(np.count_nonzero(mine & failed)),
                    latency_p99_s=float(np.percentile(latency, 99)),
                    ttft_p99_s=float(np.percentile(ttft, 99)) if len(ttft) else None,
                )
            )
        return out[0], out[1]

    # ---- what the control plane changes --------------------------------------------------

    def set_weight(self, weight: float, session_weight: float | None = None) -> None:
        self.weight = weight
        self.session_weight = weight if session_weight is None else session_weight

    def add_ready(self, rep: Replica, now: float) -> None:
        v = rep.version
        self.ready[v].append(rep)
        if rep.ongoing < self.max_ongoing:
            self._avail_add(rep)
        other = 1 - v
        if self.lanes[other] and not self.ready[other]:
            self._adopt(v, other)  # orphans of a version that has no ready replica
        self._refill(v, now)

    def remove_ready(self, rep: Replica, now: float) -> None:
        """Stop routing to `rep` at once; its in-flight requests finish."""
        v = rep.version
        self.ready[v].remove(rep)
        if rep.slot >= 0:
            self._avail_remove(rep)
        rep.draining = True
        other = 1 - v
        if not self.ready[v] and self.ready[other] and self.lanes[v]:
            self._adopt(other, v)
            self._refill(other, now)

    def kill(self, rep: Replica, now: float) -> int:
        """`rep` died (crash, or its drain deadline passed): its requests fail now. Returns
        how many failed."""
        if rep in self.ready[rep.version]:
            self.remove_ready(rep, now)
        lost = [k for _, k, r in self.heap if r is rep and k >= 0]
        if rep.engine is not None:
            lost += rep.engine.kill()
        if lost:
            self.heap[:] = [e for e in self.heap if e[2] is not rep]
            heapq.heapify(self.heap)
        for k in lost:
            self.end[k] = now
            self.status[k] = FAILED
        self.inflight -= rep.ongoing
        rep.ongoing = 0
        return len(lost)

    def _avail_add(self, rep: Replica) -> None:
        av = self.avail[rep.version]
        rep.slot = len(av)
        av.append(rep)

    def _avail_remove(self, rep: Replica) -> None:
        av = self.avail[rep.version]
        last = av.pop()
        if last is not rep:
            av[rep.slot] = last
            last.slot = rep.slot
        rep.slot = -1

    def _adopt(self, v: int, other: int) -> None:
        """Move the other version's waiting requests into v's lane, keeping arrival order."""
        merged = deque(heapq.merge(self.lanes[v], self.lanes[other]))
        self.lanes[other].clear()
        self.lanes[v].clear()
        self.lanes[v].extend(merged)

    def _purge(self, now: float) -> None:
        arr, timeout, end, status = self.arrivals, self.timeout_s, self.end, self.status
        for lane in self.lanes:
            while lane and arr[lane[0]] + timeout < now:
                k = lane.popleft()
                end[k] = arr[k] + timeout
                status[k] = DROPPED

    def _refill(self, v: int, now: float) -> None:
        """Give waiting requests to free slots of version v (a replica became ready)."""
        self._purge(now)
        lane, av = self.lanes[v], self.avail[v]
        while lane and av:
            rep = min(av, key=_ongoing)
            self._serve(lane.popleft(), rep, now)

    def _serve(self, k: int, rep: Replica, now: float) -> None:
        """Start request k on rep: count it, then hand it to the replica's service."""
        rep.ongoing += 1
        self.inflight += 1
        if rep.ongoing >= self.max_ongoing and rep.slot >= 0:
            self._avail_remove(rep)
        self.replica[k] = rep.id
        self.version[k] = rep.version
        eng = rep.engine
        if eng is not None:
            eng.admit(k, now)
            t = eng.next_t
            # an entry already due earlier stays: when it fires, the engine reschedules (a
            # prefill only ever pushes the next finish later, so this saves a stale entry)
            if t < eng.scheduled:
                eng.scheduled = t
                heapq.heappush(self.heap, (t, -1 - rep.id, rep))
            return
        svc = self.models[rep.version]
        factor = 1.0 + svc.slowdown * (rep.ongoing - 1) if svc.slowdown else 1.0
        end = now + svc.base[k] * factor
        self.start[k] = now
        self.end[k] = end
        self.first[k] = end if svc.prefill is None else now + svc.prefill[k] * factor
        heapq.heappush(self.heap, (end, k, rep))

    # ---- the hot loop ------------------------------------------------------------------------

    def advance(self, until: float) -> None:
        """Process request events up to and including `until`.

        Returns early when a draining replica finishes its last request: the control plane must
        release its GPU at that moment, before any later event.
        """
        arr, heap, lanes, ready, avail = (
            self.arrivals,
            self.heap,
            self.lanes,
            self.ready,
            self.avail,
        )
        end, status, fails = self.end, self.status, self.fails
        maxo, timeout = self.max_ongoing, self.timeout_s
        vdraw, pdraw = self._version_draw, self._pick_draw
        replica, version = self.replica, self.version
        serve = self._serve
        avail_add, avail_remove = self._avail_add, self._avail_remove
        heappop, heappush = heapq.heappop, heapq.heappush
        weight = self.weight  # only the control plane changes it, between calls
        sessions, session_weight = self.sessions, self.session_weight
        i = self.next_i
        t_arr = arr[i]  # INF past the last arrival
        try:
            while True:
                if heap and heap[0][0] <= t_arr:
                    # ---- a request event: a completion, or a replica's engine
                    t = heap[0][0]
                    if t > until:
                        break
                    _, key, rep = heappop(heap)
                    if key >= 0:
                        done: tuple[int, ...] | list[int] = (key,)
                        eng = None
                    else:
                        eng = rep.engine
                        if t != eng.scheduled:
                            continue  # stale: the engine's next event moved since
                        eng.scheduled = INF
                        nt = eng.next_t
                        if nt > t:  # early: a prefill since pushed the finish later
                            # `_schedule`, inlined (it runs about once per request)
                            if nt < INF:
                                eng.scheduled = nt
                                heappush(heap, (nt, -1 - rep.id, rep))
                            continue
                        done = eng.wake(t)
                    drained = False
                    for _ in done:
                        rep.ongoing -= 1
                        self.inflight -= 1
                        if rep.draining:
                            drained = rep.ongoing == 0
                            continue
                        v = rep.version
                        lane = lanes[v]
                        k = -1
                        while lane:
                            k = lane.popleft()
                            if arr[k] + timeout >= t:
                                break
                            end[k] = arr[k] + timeout  # waited too long: dropped at its deadline
                            status[k] = DROPPED
                            k = -1
                        if k >= 0:
                            serve(k, rep, t)
                        elif rep.slot < 0 and rep.ongoing < maxo:
                            avail_add(rep)
                    if eng is not None and eng.next_t != eng.scheduled:
                        # `_schedule`, inlined (it runs once per engine event)
                        nt = eng.next_t
                        eng.scheduled = nt
                        if nt < INF:
                            heappush(heap, (nt, -1 - rep.id, rep))
                    if drained:
                        self.on_drained(rep, t)
                        break
                    continue
                # ---- an arrival
                if t_arr > until:
                    break
                t = t_arr
                k = i
                i += 1
                t_arr = arr[i]
                v = 1 if vdraw() < weight else 0
                if sessions is not None and sessions[k] >= 0.0:
                    v = 1 if sessions[k] < session_weight else 0
                if not ready[v] and ready[1 - v]:
                    v = 1 - v
                if v and fails[k] and ready[1]:  # the bad candidate answers with an error
                    self.version[k] = 1
                    self.start[k] = end[k] = t
                    status[k] = FAILED
                    continue
                av = avail[v]
                if not av:
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
                        m = len(av)
                        if m == 1:
                            rep = av[0]
                        else:
                            a = int(pdraw() * m)
                            b = int(pdraw() * (m - 1))
                            if b >= a:
                                b += 1
                            rep = av[a]
                            other = av[b]
                            if other.ongoing < rep.ongoing:
                                rep = other
                eng = rep.engine
                if eng is None:
                    serve(k, rep, t)
                    continue
                # `_serve` for an engine, inlined: it runs once per request
                ongoing = rep.ongoing + 1
                rep.ongoing = ongoing
                self.inflight += 1
                if ongoing >= maxo and rep.slot >= 0:
                    avail_remove(rep)
                replica[k] = rep.id
                version[k] = rep.version
                eng.admit(k, t)
                nt = eng.next_t
                if nt < eng.scheduled:  # see `_serve`
                    eng.scheduled = nt
                    heappush(heap, (nt, -1 - rep.id, rep))
        finally:
            self.next_i = i

    def finish(self) -> None:
        """The run is over: whoever still waits is dropped at its deadline."""
        self._purge(INF)


def _floats(values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(values, dtype=float)


def _ongoing(rep: Replica) -> int:
    return rep.ongoing
