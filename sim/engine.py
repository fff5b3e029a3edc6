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


@dataclass
class EngineModel:
    """One version's engine, shared by its replicas: the profile and per-request work.

    `start`, `first` and `end` are the run's result columns (memoryviews of float64 arrays):
    the engine writes when a request starts (admitted to the batch), gets its first token and
    finishes.
    """

    max_seqs: float  # INF: no limit
    kv_capacity: float  # INF: no limit
    dt: list[float]  # decode seconds per iteration by batch size, up to len(dt) - 1 ...
    dt_last: float  # ... and this beyond
    prefill: memoryview  # seconds per request
    tokens: memoryview  # generated tokens per request (float)
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
        upto = max(spec.decode_s_per_token)
        if spec.max_num_seqs is not None:
            upto = max(upto, spec.max_num_seqs)
        dt = decode_times(spec.decode_s_per_token, upto)
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
    `wake` at `next_time()`; both return nothing but may finish requests, which `wake`
    returns. `scheduled` is the time (and `ticket` the id) of the router's valid heap entry."""

    __slots__ = (
        "heap",
        "kv",
        "m",
        "pf_end",
        "pf_k",
        "pf_n",
        "prefills",
        "queue",
        "running",
        "scheduled",
        "ticket",
        "tv",
        "v",
        "warm_left",
    )

    def __init__(self, model: EngineModel) -> None:
        self.m = model
        self.queue: deque[int] = deque()  # routed here, not yet running
        self.prefills: deque[tuple[int, float, float]] = deque()  # (request, seconds, factor)
        self.pf_k = -1  # the request prefilling now, or -1
        self.pf_end = INF
        self.pf_n = 0.0  # its tokens to decode
        self.heap: list[tuple[float, int]] = []  # (virtual finish, request) of decoding ones
        self.v = 0.0  # tokens each decoding sequence has gained (virtual clock)
        self.tv = 0.0  # real time at which v was last brought up to date
        self.running = 0  # prefilling + decoding + waiting to prefill
        self.kv = 0.0
        self.warm_left = model.warm_requests
        self.scheduled = INF
        self.ticket = 0

    # ---- the router's calls ------------------------------------------------------------------

    def admit(self, k: int, t: float) -> None:
        if self.queue or not self._room(k):
            self.queue.append(k)
        else:
            self._start(k, t)

    def next_time(self) -> float:
        if self.pf_k >= 0:
            return self.pf_end
        heap = self.heap
        if not heap:
            return INF
        n = len(heap)
        m = self.m
        dt = m.dt[n] if n < len(m.dt) else m.dt_last
        return self.tv + (heap[0][0] - self.v) * dt

    def wake(self, t: float) -> list[int]:
        """Bring the engine to time t (its scheduled event); returns the requests finished."""
        done: list[int] = []
        m = self.m
        heap = self.heap
        if self.pf_k >= 0:
            if self.pf_end > t:
                return done
            self._end_prefill()
            if self.pf_k >= 0 or not heap:
                return done
        elif heap:
            n = len(heap)
            dt = m.dt[n] if n < len(m.dt) else m.dt_last
            v = self.v + (t - self.tv) / dt
            if heap[0][0] - v <= _DUE:
                v = max(v, heap[0][0])
                end = m.end
                kvn = m.kv_need
                while heap and heap[0][0] - v <= _DUE:
                    _, k = heappop(heap)
                    end[k] = t
                    done.append(k)
                    if kvn is not None:
                        self.kv -= kvn[k]
                self.running -= len(done)
            self.v = 0.0 if not heap else v
            self.tv = t
            if done:
                self._fill(t)
        return done

    def kill(self) -> list[int]:
        """The replica died (crash, or its drain deadline passed): everything in it is lost."""
        lost = list(self.queue)
        lost += [k for k, _, _ in self.prefills]
        if self.pf_k >= 0:
            lost.append(self.pf_k)
        lost += [k for _, k in self.heap]
        self.queue.clear()
        self.prefills.clear()
        self.heap.clear()
        self.pf_k = -1
        self.pf_end = INF
        self.running = 0
        self.kv = 0.0
        self.scheduled = INF
        return lost

    # ---- inside ------------------------------------------------------------------------------

    def _room(self, k: int) -> bool:
        m = self.m
        if self.running >= m.max_seqs:
            return False
        kvn = m.kv_need
        if kvn is None:
            return True
        # a request larger than the whole cache runs alone rather than never
        return self.kv + kvn[k] <= m.kv_capacity or self.running == 0

    def _fill(self, t: float) -> None:
        queue = self.queue
        while queue and self._room(queue[0]):
            self._start(queue.popleft(), t)

    def _start(self, k: int, t: float) -> None:
        m = self.m
        self.running += 1
        if m.kv_need is not None:
            self.kv += m.kv_need[k]
        m.start[k] = t
        f = 1.0
        if self.warm_left:
            self.warm_left -= 1
            f = m.warm_factor
        p = m.prefill[k] * f
        if self.pf_k < 0:
            self._advance(t)
            if p == 0.0:  # nothing to prefill: straight into the batch
                m.first[k] = t
                heappush(self.heap, (self.v + m.tokens[k] * f, k))
            else:
                self.pf_k, self.pf_end, self.pf_n = k, t + p, m.tokens[k] * f
        else:
            self.prefills.append((k, p, f))

    def _advance(self, t: float) -> None:
        """Decode progress up to t (called before the batch changes or decoding stalls)."""
        heap = self.heap
        if heap and self.pf_k < 0:
            n = len(heap)
            m = self.m
            dt = m.dt[n] if n < len(m.dt) else m.dt_last
            self.v += (t - self.tv) / dt
        self.tv = t

    def _end_prefill(self) -> None:
        """The prefill(s) due by now end: each request joins the batch; the next one starts."""
        m = self.m
        t = self.pf_end
        k = self.pf_k
        m.first[k] = t
        heappush(self.heap, (self.v + self.pf_n, k))
        prefills = self.prefills
        while prefills:
            k, p, f = prefills.popleft()
            if p > 0.0:
                self.pf_k, self.pf_end, self.pf_n = k, t + p, m.tokens[k] * f
                return
            m.first[k] = t
            heappush(self.heap, (self.v + m.tokens[k] * f, k))
        self.pf_k = -1
        self.pf_end = INF
        self.tv = t  # decoding resumes now
