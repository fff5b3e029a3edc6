"""A continuous-batching engine on one replica (vLLM-like), advanced event by event.

Every running sequence gains one token per decode iteration, and an iteration with k sequences
takes `decode_s_per_token(k)`. So all running sequences progress at the same rate, and a
*virtual clock* counting tokens per sequence (`v`) is enough: a sequence that joins the batch at
v₀ needing n tokens finishes when v reaches v₀ + n. Finishing order is by that target (a heap),
and the real time of the next finish is `(target − v) · decode_s_per_token(k)`, recomputed
whenever k changes. One event costs O(log k); iterations are never simulated one by one.

How a request joins the batch is the profile's `admission`:

- `iteration` (vLLM's scheduling, and the LLM example's: `IterationEngine`): a request that finds
  the engine busy waits for the end of the current iteration (the virtual clock's next whole
  number); the iteration that starts then prefills it, and every sequence admitted with it,
  *and* decodes the running batch, so it lasts their prefills plus one decode iteration at the
  new batch size, and yields their first tokens (the first of their n tokens). An idle engine
  starts an iteration at once.
- `immediate` (the queueing oracles' idealisation: `Engine`): a request's prefill starts on
  admission and stalls the replica's decoding for its duration (prefills run one after another,
  in admission order); its first token is out when its prefill ends.

Up to
`max_num_seqs` requests run at once (prefilling or decoding); with `kv_cache_tokens`, admission
also waits until the running requests' context plus generated tokens leave room for the next
one's (reserved whole at admission, so there is no preemption). Requests that cannot start
wait in the replica's FIFO queue. Warm-up, as a freshly loaded model's first passes run slower:
a new replica's first `warmup.requests` requests run `warmup.factor` times slower (their prefill
and each of their tokens), and with iteration admission its first `warmup.iterations` iterations
take `warmup.factor` times as long (the LLM example's `warmup_iterations`).
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import dataclass
from heapq import heappop, heappush
from math import floor

import numpy as np

from rollout.scenario import EngineSpec

INF = math.inf
# a finish this close (in tokens) to the virtual clock is due now: float rounding of v
_DUE = 1e-7


def decode_times(table: dict[int, float], upto: int) -> list[float]:
    """`decode_s_per_token(k)` for k = 0 … upto: linear between the table's points, flat
    outside them (k = 0 has no iteration; its entry is never used)."""
    ks = sorted(table)
    ys = [table[k] for k in ks]
    out = [ys[0]]
    for k in range(1, upto + 1):
        i = bisect.bisect_left(ks, k)
        if i == 0:
            out.append(ys[0])
        elif i == len(ks):
            out.append(ys[-1])
        elif ks[i] == k:
            out.append(ys[i])
        else:
            k0, k1 = ks[i - 1], ks[i]
            out.append(ys[i - 1] + (ys[i] - ys[i - 1]) * (k - k0) / (k1 - k0))
    return out


@dataclass(eq=False)  # no field-wise ==: the compiled class holds C arrays
class EngineModel:
    """One version's engine, shared by its replicas: the profile and per-request work.

    `start`, `first` and `end` are the run's result columns (memoryviews of float64 arrays):
    the engine writes when a request starts (admitted to the batch), gets its first token and
    finishes.
    """

    max_seqs: float  # INF: no limit
    kv_capacity: float  # INF: no limit
    dt: list[float]  # decode seconds per iteration by batch size (index k)
    dt_last: float  # the flat value beyond the table's last point
    prefill: memoryview  # seconds per request
    tokens: memoryview  # generated tokens per request
    kv_need: memoryview | None  # context + generated tokens per request
    warm_requests: int
    warm_factor: float
    warm_iterations: float  # IterationEngine: the replica's first iterations that run slower
    iterations: bool  # admission at iteration boundaries (IterationEngine), else immediate
    start: memoryview
    first: memoryview
    end: memoryview

    @classmethod
    def build(
        cls,
        spec: EngineSpec,
        prefill: memoryview,
        tokens: memoryview,
        kv_need: memoryview | None,
        results: tuple[memoryview, memoryview, memoryview],
    ) -> EngineModel:
        assert spec.decode_s_per_token is not None  # completed by EngineSpec.with_profile
        # every batch size the engine can hold has its entry (no bounds check on the hot
        # path); without a batch limit the table grows as batches do (Engine._grow)
        upto = max(spec.decode_s_per_token) + 1
        if spec.max_num_seqs is not None:
            upto = max(upto, spec.max_num_seqs + 1)
        dt = decode_times(spec.decode_s_per_token, upto)
        seqs, cache = spec.max_num_seqs, spec.kv_cache_tokens
        if kv_need is not None and seqs is not None and cache is not None and len(kv_need):
            largest = int(np.max(np.asarray(kv_need)))
            kv_need = None if seqs * largest <= cache else kv_need  # can never bind: no books
        return cls(
            max_seqs=INF if spec.max_num_seqs is None else spec.max_num_seqs,
            kv_capacity=INF if spec.kv_cache_tokens is None else spec.kv_cache_tokens,
            dt=dt,
            dt_last=dt[-1],
            prefill=prefill,
            tokens=tokens,
            kv_need=kv_need if spec.kv_cache_tokens is not None else None,
            warm_requests=spec.warmup.requests,
            warm_factor=spec.warmup.factor,
            warm_iterations=float(spec.warmup.iterations),
            iterations=spec.admission == "iteration",
            start=results[0],
            first=results[1],
            end=results[2],
        )


class Engine:
    """One replica's engine, admitting immediately (`admission: immediate`). The router calls
    `admit` for each request it routes here and `wake` at `next_t`, the time of the engine's
    next finish (kept up to date by both); `wake` returns the requests that finished.
    `scheduled` is the time of the router's valid heap entry for this engine (an entry at
    another time is stale).

    Prefills need no events of their own: while the replica prefills, the virtual clock stands
    still, so a request can join the batch's heap at admission with its target `v + n` and a
    stall of its prefill's length appended to the replica's (`stall_end`). Its first token is
    out when the stall that includes its prefill ends; a finish is never due before the stall
    ends, since no token is decoded during it.
    """

    __slots__ = (
        "heap",
        "kv",
        "m",
        "next_t",
        "queue",
        "scheduled",
        "stall_end",
        "tv",
        "v",
        "warm_left",
    )

    def __init__(self, model: EngineModel) -> None:
        self.m = model
        self.queue: deque[int] = deque()  # routed here, not yet running
        self.heap: list[tuple[float, int]] = []  # (virtual finish, request) of running ones
        self.v = 0.0  # tokens each decoding sequence has gained (virtual clock)
        self.tv = 0.0  # real time at which v was last brought up to date
        self.stall_end = -INF  # prefills stall decoding until then
        self.kv = 0.0
        self.warm_left = model.warm_requests
        self.next_t = INF
        self.scheduled = INF

    def admit(self, k: int, t: float, head: bool = False) -> bool:
        """Request k is routed here at t: it starts now (True), or waits in the replica's FIFO
        queue. `head`: k is the queue's head, retried; it stays there if there is no room.

        Starting books the decoding done so far, then appends k's prefill to the stall and puts
        k in the batch (the hot path: no calls inside). A request larger than the whole KV
        cache runs alone rather than never."""
        m = self.m
        heap = self.heap
        n = len(heap)
        kvn = m.kv_need
        if (
            (self.queue and not head)
            or n >= m.max_seqs
            or (kvn is not None and n and self.kv + kvn[k] > m.kv_capacity)
        ):
            if not head:
                self.queue.append(k)
            return False
        dts = m.dt
        if n + 1 >= len(dts):
            dts.extend([m.dt_last] * len(dts))  # no batch limit: a larger batch than ever
        se = self.stall_end
        v = self.v
        if n:
            tv = self.tv if self.tv > se else se
            if t > tv:
                v += (t - tv) / dts[n]
                self.v = v
        self.tv = t
        f = 1.0
        if self.warm_left:
            self.warm_left -= 1
            f = m.warm_factor
        se = (se if se > t else t) + m.prefill[k] * f
        self.stall_end = se
        m.start[k] = t
        m.first[k] = se
        if kvn is not None:
            self.kv += kvn[k]
        heappush(heap, (v + m.tokens[k] * f, k))
        self.next_t = se + (heap[0][0] - v) * dts[n + 1]
        return True

    def wake(self, t: float) -> list[int]:
        """Bring the engine to time t (its scheduled event); returns the requests finished."""
        heap = self.heap
        se = self.stall_end
        if not heap or t < se:
            return []
        m = self.m
        dts = m.dt
        dt = dts[len(heap)]
        tv = self.tv
        if se > tv:
            tv = se
        v = self.v
        if t > tv:
            v += (t - tv) / dt
        self.tv = t
        top = heap[0][0]
        if top - v > _DUE:  # not due: an early wake-up
            self.v = v
            self.next_t = t + (top - v) * dt
            return []
        if v < top:
            v = top
        end = m.end
        kvn = m.kv_need
        done: list[int] = []
        while heap and heap[0][0] - v <= _DUE:
            k = heappop(heap)[1]
            end[k] = t
            done.append(k)
            if kvn is not None:
                self.kv -= kvn[k]
        self.v = v if heap else 0.0
        queue = self.queue
        while queue and self.admit(queue[0], t, head=True):
            queue.popleft()
        if heap:
            tv = t if t > self.stall_end else self.stall_end
            self.next_t = tv + (heap[0][0] - self.v) * dts[len(heap)]
        else:
            self.next_t = INF
        return done

    def warmed(self) -> None:
        """No warm-up: a replica that served before the simulated span began."""
        self.warm_left = 0

    def kill(self) -> list[int]:
        """The replica died (crash, or its drain deadline passed): everything in it is lost."""
        lost = list(self.queue) + [k for _, k in self.heap]
        self.queue.clear()
        self.heap.clear()
        self.kv = 0.0
        self.next_t = self.scheduled = INF
        return lost


class IterationEngine(Engine):
    """An engine that admits at iteration boundaries, as vLLM's scheduler (and the LLM
    example's engine loop) does: exact for that loop, with no events of its own.

    While the engine is busy, its iterations end where the virtual clock `v` crosses a whole
    number. A request routed to a busy engine joins the *pending* boundary `pb`, the end of the
    current iteration, reached at real time `tb` (fixed: the current iteration's batch and
    stall do not change once it runs). The sequences joining there (`pending`, with their
    prefills' seconds summed in `ps`) are in the heap with targets `pb + n` but do not decode
    before it. When an event finds `tb` passed, the boundary is *promoted*: the iteration that
    started at `tb` stalls for `ps` (the prefills) and then decodes one token at the new batch
    size, so the joiners' first token is at `tb + ps + decode_s_per_token(batch)`, written
    then for all of them (each request is promoted once: O(1) a request). An idle engine opens
    its boundary at once (`pb = 0`, `tb = now`); a finish at a boundary opens one there for the
    replica's queue. A request arriving at the very instant a boundary is crossed joins the
    next one, as the engine loop schedules the next batch straight after a step returns.

    Warm-up by iterations: the replica's iteration count is the virtual clock's whole numbers
    (over its busy periods), so its warm-up ends at the virtual time `wv`, rebased when the
    engine idles; before it, an iteration's prefills and decode take `warm_factor` times as
    long. `_span` and `_gain` convert between tokens and seconds across that point.
    """

    __slots__ = ("pb", "pending", "ps", "tb", "wv")

    def __init__(self, model: EngineModel) -> None:
        super().__init__(model)
        self.pending: list[int] = []  # joining at the pending boundary
        self.pb = 0.0  # the pending boundary on the virtual clock (a whole number)
        self.tb = -INF  # its real time
        self.ps = 0.0  # the prefill seconds of the iteration that starts there
        self.wv = model.warm_iterations  # the virtual time the warm-up ends (busy period's)

    def _span(self, v0: float, v1: float, dt: float) -> float:
        """Seconds to decode from v0 to v1 at dt a token, slower before `wv`."""
        w = self.wv
        if v0 >= w:
            return (v1 - v0) * dt
        f = self.m.warm_factor
        if v1 <= w:
            return (v1 - v0) * dt * f
        return (w - v0) * dt * f + (v1 - w) * dt

    def _gain(self, v0: float, secs: float, dt: float) -> float:
        """Tokens decoded from v0 in secs at dt a token (the inverse of `_span`)."""
        w = self.wv
        if v0 >= w:
            return secs / dt
        f = self.m.warm_factor
        head = (w - v0) * dt * f
        if secs <= head:
            return secs / (dt * f)
        return (w - v0) + (secs - head) / dt

    def _stall(self) -> float:
        """The prefill seconds of the iteration at the pending boundary."""
        return self.ps * self.m.warm_factor if self.pb < self.wv else self.ps

    def _advance(self, t: float) -> None:
        """Bring v up to time t: promote a boundary passed, then decode up to t."""
        heap = self.heap
        pend = self.pending
        dts = self.m.dt
        if pend and t > self.tb:
            tb = self.tb
            self.v = self.pb
            se = tb + self._stall()
            self.stall_end = se
            # the iteration's end: its joiners' first token
            first = se + self._span(self.pb, self.pb + 1.0, dts[len(heap)])
            out = self.m.first
            for k in pend:
                out[k] = first
            pend.clear()
            self.ps = 0.0
            self.tv = tb
        n = len(heap) - len(pend)  # decoding now
        if n:
            s = self.tv if self.tv > self.stall_end else self.stall_end
            if t > s:
                self.v += self._gain(self.v, t - s, dts[n])
        self.tv = t

    def _next(self) -> float:
        """The time of the next finish (the engine brought up to date)."""
        heap = self.heap
        top = heap[0][0]
        pend = self.pending
        dts = self.m.dt
        if pend:
            if top > self.pb + _DUE:
                return self.tb + self._stall() + self._span(self.pb, top, dts[len(heap)])
            if top >= self.pb - _DUE:
                return self.tb
        s = self.tv if self.tv > self.stall_end else self.stall_end
        return s + self._span(self.v, top, dts[len(heap) - len(pend)])

    def admit(self, k: int, t: float, head: bool = False) -> bool:
        """Request k is routed here at t: it joins the pending boundary (True), or waits in the
        replica's FIFO queue (as `Engine.admit`)."""
        m = self.m
        heap = self.heap
        n = len(heap)
        kvn = m.kv_need
        if (
            (self.queue and not head)
            or n >= m.max_seqs
            or (kvn is not None and n and self.kv + kvn[k] > m.kv_capacity)
        ):
            if not head:
                self.queue.append(k)
            return False
        dts = m.dt
        if n + 1 >= len(dts):
            dts.extend([m.dt_last] * len(dts))  # no batch limit: a larger batch than ever
        pend = self.pending
        if not n:  # idle: an iteration starts now
            if self.wv > 0.0:  # the warm-up left, on the new busy period's clock
                self.wv = self.wv - self.v if self.wv > self.v else 0.0
            self.v = self.pb = 0.0
            self.tb = self.tv = t
            self.stall_end = -INF
        else:
            self._advance(t)
            if not pend and t > self.tb:  # none open (`wake` opens one at a finish): the
                # current iteration's end
                v = self.v
                pb = floor(v + _DUE) + 1.0
                s = self.tv if self.tv > self.stall_end else self.stall_end
                self.pb = pb
                self.tb = s + self._span(v, pb, dts[n])
        f = 1.0
        if self.warm_left:
            self.warm_left -= 1
            f = m.warm_factor
        self.ps += m.prefill[k] * f
        pend.append(k)
        m.start[k] = t
        if kvn is not None:
            self.kv += kvn[k]
        heappush(heap, (self.pb + m.tokens[k] * f, k))
        self.next_t = self._next()
        return True

    def wake(self, t: float) -> list[int]:
        """Bring the engine to time t (its scheduled event); returns the requests finished."""
        heap = self.heap
        if not heap:
            return []
        self._advance(t)
        v = self.v
        top = heap[0][0]
        if top - v > _DUE:  # not due: an early wake-up
            self.next_t = self._next()
            return []
        if v < top:
            v = top
        m = self.m
        end = m.end
        kvn = m.kv_need
        done: list[int] = []
        while heap and heap[0][0] - v <= _DUE:
            k = heappop(heap)[1]
            end[k] = t
            done.append(k)
            if kvn is not None:
                self.kv -= kvn[k]
        self.v = v
        queue = self.queue
        if queue and heap and not self.pending:  # a boundary now: the queue's head joins it
            self.pb = v
            self.tb = t
        while queue and self.admit(queue[0], t, head=True):
            queue.popleft()
        self.next_t = self._next() if heap else INF
        return done

    def warmed(self) -> None:
        Engine.warmed(self)  # (a compiled cpdef method has no super())
        self.wv = 0.0

    def kill(self) -> list[int]:
        self.pending.clear()
        self.ps = 0.0
        return super().kill()
