"""A continuous-batching engine on one replica (vLLM-like), advanced event by event.

Every running sequence gains one token per decode iteration, and an iteration with k sequences
takes `decode_s_per_token(k)`. So all running sequences progress at the same rate, and a
*virtual clock* counting tokens per sequence (`v`) is enough: a sequence that joins the batch at
v₀ needing n tokens finishes when v reaches v₀ + n. Finishing order is by that target (a heap),
and the real time of the next finish is `(target − v) · decode_s_per_token(k)`, recomputed
whenever k changes. One event costs O(log k); iterations are never simulated one by one.

A request's prefill stalls the whole replica's decoding for its duration (prefills run one after
another, in admission order); its first token is out when its prefill ends. Up to
`max_num_seqs` requests run at once (prefilling or decoding); with `kv_cache_tokens`, admission
also waits until the running requests' context plus generated tokens leave room for the next
one's (reserved whole at admission, so there is no preemption). Requests that cannot start
wait in the replica's FIFO queue. A new replica's first `warmup.requests` requests run
`warmup.factor` times slower.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import dataclass
from heapq import heappop, heappush

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
            start=results[0],
            first=results[1],
            end=results[2],
        )


class Engine:
    """One replica's engine. The router calls `admit` for each request it routes here and
    `wake` at `next_t`, the time of the engine's next finish (kept up to date by both);
    `wake` returns the requests that finished. `scheduled` is the time of the router's valid
    heap entry for this engine (an entry at another time is stale).

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

    def kill(self) -> list[int]:
        """The replica died (crash, or its drain deadline passed): everything in it is lost."""
        lost = list(self.queue) + [k for _, k in self.heap]
        self.queue.clear()
        self.heap.clear()
        self.kv = 0.0
        self.next_t = self.scheduled = INF
        return lost
