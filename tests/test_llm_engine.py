"""The LLM example's engine loop (continuous batching) and its two compute backends.

The torch backend runs on the CPU here: a KV-cached, batched decode must give the logits of a
plain forward pass over the whole sequence.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from examples.llm.backends import ProfileBackend, ProfileConfig, TorchBackend, TorchConfig
from examples.llm.engine import Engine, EngineConfig, Sequence
from examples.llm.tokenizer import Tokenizer

FAST = ProfileConfig(vocab_size=1000, base_s=0.02, per_seq_s=0.0, prefill_s_per_token=0.0)


async def collect(engine: Engine, prompt: list[int], n: int) -> tuple[list[int], float, float]:
    """Tokens, time to first token and total time of one request."""
    started = time.perf_counter()
    first = None
    tokens = []
    async for t in engine.generate(prompt, n):
        first = first or time.perf_counter() - started
        tokens.append(t)
    return tokens, first or 0.0, time.perf_counter() - started


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


class TestEngine:
    def test_max_tokens_exactly_and_seeded_tokens(self) -> None:
        async def main() -> tuple[list[int], list[int], list[int]]:
            a, b = (
                Engine(ProfileBackend(FAST, 1), EngineConfig()),
                Engine(ProfileBackend(FAST, 2), EngineConfig()),
            )
            a.start()
            b.start()
            t1, _, _ = await collect(a, [5, 6, 7], 7)
            t2, _, _ = await collect(a, [5, 6, 7], 7)
            t3, _, _ = await collect(b, [5, 6, 7], 7)
            return t1, t2, t3

        t1, t2, t3 = run(main())
        assert len(t1) == 7 and t1 == t2  # deterministic per seed
        assert t3 != t1  # another version's "weights"

    def test_a_late_request_joins_the_running_batch(self) -> None:
        """Continuous batching: a request arriving mid-way gets its first token one iteration
        later, not after the running request finishes; both then share iterations."""

        async def main() -> tuple[float, float, int]:
            engine = Engine(ProfileBackend(FAST, 1), EngineConfig(max_num_seqs=8))
            engine.start()
            long = asyncio.create_task(collect(engine, [1], 30))  # 30 iterations ≈ 0.6 s
            await asyncio.sleep(0.1)
            _, ttft, _ = await collect(engine, [2], 3)
            _, _, long_total = await long
            return ttft, long_total, engine.stats.max_batch

        ttft, long_total, max_batch = run(main())
        assert ttft < 0.1  # at most one iteration in progress plus its own (2 × 20 ms)
        assert max_batch == 2
        assert long_total < 30 * 0.02 * 1.5  # the newcomer did not stretch the long one much

    def test_max_num_seqs_makes_the_rest_wait(self) -> None:
        async def main() -> list[float]:
            engine = Engine(ProfileBackend(FAST, 1), EngineConfig(max_num_seqs=2))
            engine.start()
            got = await asyncio.gather(*(collect(engine, [i], 5) for i in range(3)))
            assert engine.stats.max_batch == 2
            return [ttft for _, ttft, _ in got]

        ttfts = run(main())
        assert max(ttfts[:2]) < 0.05
        assert ttfts[2] >= 5 * 0.02 * 0.9  # waited for a slot: five iterations

    def test_iteration_time_grows_with_batch_and_prefill(self) -> None:
        b = ProfileBackend(ProfileConfig(base_s=0.01, per_seq_s=0.001, prefill_s_per_token=1e-5), 1)
        assert b.iteration_s(1, 0) == pytest.approx(0.01)
        assert b.iteration_s(11, 0) == pytest.approx(0.02)
        assert b.iteration_s(1, 2000) == pytest.approx(0.03)

    def test_warmup_slows_the_first_iterations(self) -> None:
        async def main() -> tuple[float, float]:
            cfg = EngineConfig(warmup_iterations=5, warmup_factor=3.0)
            engine = Engine(ProfileBackend(FAST, 1), cfg)
            engine.start()
            _, _, cold = await collect(engine, [1], 5)
            _, _, warm = await collect(engine, [1], 5)
            return cold, warm

        cold, warm = run(main())
        assert cold > 2.4 * warm

    def test_a_client_that_leaves_frees_its_slot(self) -> None:
        async def main() -> tuple[int, int, float]:
            engine = Engine(ProfileBackend(FAST, 1), EngineConfig(max_num_seqs=1))
            engine.start()
            gen = engine.generate([1], 1000)
            await gen.__anext__()
            await gen.aclose()  # the client went away after one token
            _, ttft, _ = await collect(engine, [2], 2)
            return engine.stats.cancelled, len(engine.running), ttft

        cancelled, running, ttft = run(main())
        assert cancelled == 1 and running == 0
        assert ttft < 0.1

    def test_a_failing_backend_fails_requests_and_the_engine(self) -> None:
        class Broken(ProfileBackend):
            async def step(self, prefill: list[Sequence], decode: list[Sequence]) -> list[int]:
                raise RuntimeError("CUDA error: out of memory")

        async def main() -> Engine:
            engine = Engine(Broken(FAST, 1), EngineConfig())
            engine.start()
            with pytest.raises(RuntimeError, match="out of memory"):
                await collect(engine, [1], 3)
            await asyncio.sleep(0)
            return engine

        engine = run(main())
        assert not engine.alive


class TestTokenizer:
    def test_one_token_per_word_and_readable_words(self) -> None:
        tok = Tokenizer(32000)
        ids = tok.encode("the quick  brown\nfox the")
        assert len(ids) == 5 and ids[0] == ids[4]
        assert all(0 <= i < 32000 for i in ids)
        words = [tok.decode(i) for i in (0, 69, 70, 31999)]
        assert all(w.startswith(" ") and w[1:].isalpha() for w in words)
        assert len(set(words)) == 4


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> TorchBackend:
    path = tmp_path_factory.mktemp("llm") / "w.pt"
    cfg = TorchConfig(weights=str(path), vocab_size=300, d_model=32, layers=2, heads=4,
                      max_model_len=64, max_num_seqs=4)  # fmt: skip
    return TorchBackend(cfg, seed=3, device="cpu")


class TestTorchBackend:
    def test_weights_are_saved_then_loaded(self, backend: TorchBackend, tmp_path: Path) -> None:
        assert Path(backend.config.weights).stat().st_size > 4 * backend.parameters
        again = TorchBackend(backend.config, seed=3, device="cpu")  # loads the same file
        assert all(again.w[k].equal(backend.w[k]) for k in backend.w)
        other_cfg = TorchConfig(**{**backend.config.__dict__, "weights": str(tmp_path / "v2.pt")})
        other = TorchBackend(other_cfg, seed=4, device="cpu")
        assert not other.w["embed"].equal(backend.w["embed"])  # another version's weights

    def test_cached_batched_decode_matches_a_full_forward(self, backend: TorchBackend) -> None:
        import torch

        seqs = [Sequence([1, 2, 3, 4, 5], 8), Sequence([9, 8], 8), Sequence(list(range(20)), 8)]
        for s in seqs:
            backend.admit(s)
        for s, t in zip(seqs, backend.step_sync(seqs, []), strict=True):
            s.tokens.append(t)
        for _ in range(6):
            for s, t in zip(seqs, backend.step_sync([], seqs), strict=True):
                s.tokens.append(t)
        with torch.inference_mode():
            cached = backend.decode(seqs)  # logits for each sequence's next token
            for s, row in zip(seqs, cached, strict=True):
                ref = Sequence(s.prompt + s.tokens, 1)
                backend.admit(ref)
                full = backend.prefill(ref)
                backend.release(ref)
                assert torch.allclose(row, full, atol=1e-4), (row - full).abs().max()
        for s in seqs:
            backend.release(s)
        assert sorted(backend.free) == [0, 1, 2, 3]

    def test_the_engine_runs_on_it(self, backend: TorchBackend) -> None:
        async def main() -> list[list[int]]:
            engine = Engine(backend, EngineConfig(max_num_seqs=4))
            engine.start()
            got = await asyncio.gather(*(collect(engine, [i + 1] * (i + 2), 6) for i in range(6)))
            assert engine.stats.max_batch == 4
            return [tokens for tokens, _, _ in got]

        outs = run(main())
        assert [len(o) for o in outs] == [6] * 6
        assert all(0 <= t < 300 for o in outs for t in o)
