"""The LLM example's engine on its torch backend: time per output token and time to first token.

Runs the engine of examples/llm (continuous batching over the small transformer with a KV
cache) in this process, on CUDA where torch sees a GPU, else on the CPU, and prints:

- load: writing the version's random weights once, then loading them onto the device (what a
  replica's start costs beyond Serve's own);
- time per output token at batch sizes 1, 8, 32 and 64 (that many sequences decoding
  together; the median iteration once all have been prefilled);
- time to first token at prompt lengths 128 and 2,048 (one request alone: its prefill).

Usage: python benchmarks/llm_engine.py [--d-model 1024] [--layers 8] [--heads 16]
       [--vocab 32000] [--max-len 4096] [--device cuda|cpu]
       (the defaults are the model of examples/deploy-llm-v1.yaml; on a CPU try
       --d-model 256 --layers 2 --heads 4 --max-len 2304)
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


async def tpot(backend, batch: int, tokens: int) -> float:  # type: ignore[no-untyped-def]
    """Median iteration time once `batch` sequences of 128 prompt tokens all decode."""
    from examples.llm.engine import Engine, EngineConfig

    engine = Engine(backend, EngineConfig(max_num_seqs=64))
    engine.start()
    times: list[float] = []

    async def one(i: int) -> None:
        last = None
        async for _ in engine.generate([(i * 7 + j) % 1000 for j in range(128)], tokens):
            now = time.perf_counter()
            if last is not None and i == 0:
                times.append(now - last)
            last = now

    await asyncio.gather(*(one(i) for i in range(batch)))
    return statistics.median(times[2:])


async def ttft(backend, prompt: int) -> float:  # type: ignore[no-untyped-def]
    from examples.llm.engine import Engine, EngineConfig

    engine = Engine(backend, EngineConfig(max_num_seqs=64))
    engine.start()
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        async for _ in engine.generate([(j * 13) % 1000 for j in range(prompt)], 1):
            best = min(best, time.perf_counter() - started)
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--max-len", type=int, default=4096)
    p.add_argument("--device", default=None)
    p.add_argument("--tokens", type=int, default=24, help="tokens generated per sequence")
    a = p.parse_args()

    import torch

    from examples.llm.backends import TorchBackend, TorchConfig

    weights = Path(tempfile.mkdtemp(prefix="rollout-llm-")) / "w.pt"
    cfg = TorchConfig(weights=str(weights), vocab_size=a.vocab, d_model=a.d_model,
                      layers=a.layers, heads=a.heads, max_model_len=a.max_len)  # fmt: skip
    started = time.perf_counter()
    first = TorchBackend(cfg, seed=1, device=a.device)
    cold = time.perf_counter() - started
    del first
    started = time.perf_counter()
    backend = TorchBackend(cfg, seed=1, device=a.device)
    warm = time.perf_counter() - started
    device = backend.device
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
    cache = 2 * sum(k.numel() * k.element_size() for k in backend.k) / 2**30
    print(
        f"{name}, torch {torch.__version__}: {backend.parameters / 1e6:.1f} M parameters "
        f"({backend.dtype}), KV cache {cache:.2f} GiB"
    )
    print(
        f"replica start: {cold:.2f} s writing and loading the weights the first time, "
        f"{warm:.2f} s loading them ({backend.load_s:.2f} s of it reading the file to {device})"
    )
    asyncio.run(tpot(backend, 4, 8))  # warm-up: kernels, allocator
    for batch in (1, 8, 32, 64):
        t = asyncio.run(tpot(backend, batch, a.tokens))
        print(f"time per output token, batch {batch:>2}: {t * 1000:8.2f} ms")
    for prompt in (128, 2048):
        if prompt + 1 > a.max_len:
            continue
        t = asyncio.run(ttft(backend, prompt))
        print(f"time to first token, prompt {prompt:>4}: {t * 1000:8.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
