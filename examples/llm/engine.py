"""One replica's engine loop, scheduled the way vLLM schedules: continuous batching.

Requests wait in a FIFO queue. Each iteration of the loop runs one forward pass of the model
over a batch that holds every running sequence (each advances by one token: decode) and the
waiting sequences admitted this iteration (their whole prompt: prefill, which yields their first
token), up to `max_num_seqs` sequences and `max_num_batched_tokens` tokens. A sequence leaves the
batch when it has produced exactly `max_tokens` tokens (there is no end-of-sequence token, so no
early stop) or when its client went away. Time to first token is thus the wait in the queue plus
the prefill iteration, and time per output token is the length of the iterations a sequence
shares with the rest of the batch: both come out of the scheduling, as in a real server.

The compute of an iteration is a backend's (examples/llm/backends.py): a real transformer with a
KV cache (`torch`), or a time profile (`profile`). The first `warmup_iterations` take
`warmup_factor` times as long, as a freshly loaded model's first passes do.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(eq=False)
class Sequence:
    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    tokens: list[int] = field(default_factory=list)
    slot: int = -1  # the backend's cache slot while running
    cancelled: bool = False
    done: bool = False
    queue: asyncio.Queue[int | BaseException] = field(default_factory=asyncio.Queue)

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.tokens)


class Backend(Protocol):
    """The compute of one iteration; `step` returns one token per sequence, prefills first."""

    vocab_size: int
    max_model_len: int

    def admit(self, seq: Sequence) -> None: ...
    def release(self, seq: Sequence) -> None: ...
    async def step(self, prefill: list[Sequence], decode: list[Sequence]) -> list[int]: ...


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 16384
    warmup_iterations: int = 0
    warmup_factor: float = 1.0


@dataclass
class EngineStats:
    iterations: int = 0
    max_batch: int = 0
    prefilled: int = 0
    generated_tokens: int = 0
    cancelled: int = 0
    last_iteration_s: float = 0.0


class Engine:
    def __init__(self, backend: Backend, config: EngineConfig) -> None:
        self.backend = backend
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.stats = EngineStats()
        self.error: BaseException | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the loop on the running event loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done() and self.error is None

    async def generate(
        self, prompt: list[int], max_tokens: int, temperature: float = 0.0
    ) -> AsyncIterator[int]:
        """Queue a sequence and yield its tokens as iterations produce them; leaving early
        (the client went away) takes it out of the batch at the next iteration."""
        if self.error is not None:
            raise RuntimeError(f"the engine failed: {self.error!r}")
        seq = Sequence(list(prompt), int(max_tokens), float(temperature))
        self.waiting.append(seq)
        self._wake.set()
        try:
            for _ in range(seq.max_tokens):
                got = await seq.queue.get()
                if isinstance(got, BaseException):
                    raise got
                yield got
        finally:
            if not seq.done:
                seq.cancelled = True
                self._wake.set()

    def _schedule(self) -> tuple[list[Sequence], list[Sequence]]:
        """This iteration's batch: every running sequence, then waiting ones in order while
        the sequence and token budgets allow (the first always fits an empty batch)."""
        for seq in [s for s in self.running if s.cancelled]:
            self._drop(seq)
        decode = list(self.running)
        prefill: list[Sequence] = []
        budget = self.config.max_num_batched_tokens - len(decode)
        while self.waiting and len(decode) + len(prefill) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if seq.cancelled:
                self.waiting.popleft()
                self.stats.cancelled += 1
                continue
            if len(seq.prompt) > budget and (prefill or decode):
                break
            self.waiting.popleft()
            budget -= len(seq.prompt)
            self.backend.admit(seq)
            prefill.append(seq)
        return prefill, decode

    def _drop(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.backend.release(seq)
        self.stats.cancelled += 1

    async def _loop(self) -> None:
        batch: list[Sequence] = []
        try:
            while True:
                if not self.running and not self.waiting:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                prefill, decode = self._schedule()
                batch = prefill + decode
                if not batch:
                    continue
                started = time.perf_counter()
                tokens = await self.backend.step(prefill, decode)
                took = time.perf_counter() - started
                if self.stats.iterations < self.config.warmup_iterations:
                    await asyncio.sleep(took * (self.config.warmup_factor - 1.0))
                self.stats.iterations += 1
                self.stats.max_batch = max(self.stats.max_batch, len(batch))
                self.stats.prefilled += len(prefill)
                self.stats.last_iteration_s = time.perf_counter() - started
                self.running = []
                for seq, token in zip(batch, tokens, strict=True):
                    seq.tokens.append(token)
                    seq.queue.put_nowait(token)
                    self.stats.generated_tokens += 1
                    if len(seq.tokens) >= seq.max_tokens:
                        seq.done = True
                        self.backend.release(seq)
                    else:
                        self.running.append(seq)
        except Exception as e:  # a failed forward pass: fail every request, report unhealthy
            self.error = e
            for seq in {*batch, *self.running, *self.waiting}:
                seq.queue.put_nowait(RuntimeError(f"the engine failed: {e!r}"))
            raise
