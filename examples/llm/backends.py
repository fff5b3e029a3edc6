"""The compute of one engine iteration: a real transformer (`torch`) or a time profile.

`TorchBackend` is a small decoder-only transformer (pre-norm blocks, learned positions, tied
embeddings) with random weights of a configurable size. The weights live in a file: the first
replica of a version writes them (seeded by the version's seed), every replica loads them onto
its device, so a replica's start is a real load. Its KV cache is one preallocated block per
layer, `max_num_seqs` slots × `max_model_len` positions: a prefill writes its prompt's keys and
values into its slot; a decode step attends, per sequence, over its own slot up to its length
(a mask hides the rest of the batch's longest). It runs on CUDA where torch sees a GPU (fp16),
else on the CPU (fp32); torch is imported only when this backend is chosen.

`ProfileBackend` sleeps for the iteration a GPU would take, `base_s + per_seq_s × batch +
prefill_s_per_token × prefill tokens`, and draws tokens from the version's seed: for machines
without a GPU and for tests, where it keeps the scheduling real and the CPU idle.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from examples.llm.engine import Sequence

ROOT = Path(__file__).resolve().parents[2]  # relative weight paths start here


@dataclass(frozen=True)
class ProfileConfig:
    vocab_size: int = 32000
    max_model_len: int = 16384
    base_s: float = 0.02  # one iteration with a batch of one decode
    per_seq_s: float = 0.0003  # each further sequence in the batch
    prefill_s_per_token: float = 0.00003  # each prompt token prefilled


class ProfileBackend:
    def __init__(self, config: ProfileConfig, seed: int) -> None:
        self.config = config
        self.vocab_size = config.vocab_size
        self.max_model_len = config.max_model_len
        self.seed = int(seed)
        self.device = "none (profile)"

    def iteration_s(self, batch: int, prefill_tokens: int) -> float:
        c = self.config
        return c.base_s + c.per_seq_s * max(0, batch - 1) + c.prefill_s_per_token * prefill_tokens

    def admit(self, seq: Sequence) -> None:
        pass

    def release(self, seq: Sequence) -> None:
        pass

    def _token(self, seq: Sequence) -> int:
        last = seq.tokens[-1] if seq.tokens else seq.prompt[-1]
        x = (self.seed * 1_000_003 + last * 7919 + seq.length * 104_729) & 0xFFFFFFFF
        x = (x ^ (x >> 13)) * 0x5BD1E995 & 0xFFFFFFFF
        return (x ^ (x >> 15)) % self.vocab_size

    async def step(self, prefill: list[Sequence], decode: list[Sequence]) -> list[int]:
        tokens = sum(len(s.prompt) for s in prefill)
        await asyncio.sleep(self.iteration_s(len(prefill) + len(decode), tokens))
        return [self._token(s) for s in [*prefill, *decode]]


@dataclass(frozen=True)
class TorchConfig:
    weights: str = ".rollout/llm/weights.pt"  # written on first use, then loaded (relative
    # paths from the repository root)
    vocab_size: int = 8192
    d_model: int = 512
    layers: int = 4
    heads: int = 8
    max_model_len: int = 4096
    max_num_seqs: int = 64

    def shape(self) -> dict[str, int]:
        return {k: v for k, v in asdict(self).items() if k not in ("weights", "max_num_seqs")}


def torch_cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


class TorchBackend:
    def __init__(self, config: TorchConfig, seed: int, device: str | None = None) -> None:
        import torch

        self.torch = torch
        self.config = config
        self.vocab_size = config.vocab_size
        self.max_model_len = config.max_model_len
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = torch.float16 if self.device.startswith("cuda") else torch.float32
        path = Path(config.weights)
        if not path.is_absolute():  # replicas do not always start in the folder of the deploy
            path = ROOT / path
        ensure_weights(path, config, seed)
        started = time.perf_counter()
        saved = torch.load(path, map_location=self.device, weights_only=True)
        if saved["shape"] != config.shape():
            raise ValueError(
                f"{path} holds a model of shape {saved['shape']}, not {config.shape()}"
            )
        self.w = {k: v.to(self.dtype) for k, v in saved["weights"].items()}
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        self.load_s = time.perf_counter() - started
        self.parameters = sum(v.numel() for v in self.w.values())
        heads, d = config.heads, config.d_model
        shape = (config.max_num_seqs, heads, config.max_model_len, d // heads)
        self.k = [
            torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(config.layers)
        ]
        self.v = [
            torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(config.layers)
        ]
        self.free = list(range(config.max_num_seqs - 1, -1, -1))
        self.generator = torch.Generator(device=self.device).manual_seed(int(seed))

    # ---- slots ---------------------------------------------------------------------------

    def admit(self, seq: Sequence) -> None:
        seq.slot = self.free.pop()

    def release(self, seq: Sequence) -> None:
        if seq.slot >= 0:
            self.free.append(seq.slot)
            seq.slot = -1

    # ---- the model -------------------------------------------------------------------------

    def _block(self, i: int, x: Any, attend: Any) -> Any:
        F = self.torch.nn.functional
        w = self.w
        d = self.config.d_model
        h = F.layer_norm(x, (d,), w[f"b{i}.ln1.w"], w[f"b{i}.ln1.b"])
        q, k, v = (h @ w[f"b{i}.qkv"]).split(d, dim=-1)
        x = x + attend(i, q, k, v) @ w[f"b{i}.proj"]
        h = F.layer_norm(x, (d,), w[f"b{i}.ln2.w"], w[f"b{i}.ln2.b"])
        return x + F.gelu(h @ w[f"b{i}.fc1"]) @ w[f"b{i}.fc2"]

    def _heads(self, t: Any) -> Any:
        """[B, T, d] → [B, H, T, d/H]."""
        b, n, _ = t.shape
        return t.view(b, n, self.config.heads, -1).transpose(1, 2)

    def _merge(self, t: Any) -> Any:
        b, _, n, _ = t.shape
        return t.transpose(1, 2).reshape(b, n, self.config.d_model)

    def _logits(self, x: Any) -> Any:
        F = self.torch.nn.functional
        w = self.w
        x = F.layer_norm(x, (self.config.d_model,), w["ln.w"], w["ln.b"])
        return (x @ w["embed"].T).float()

    def prefill(self, seq: Sequence) -> Any:
        """The prompt's forward pass: fills the slot's cache; the last position's logits."""
        torch = self.torch
        F = torch.nn.functional
        ids = torch.tensor(seq.prompt, device=self.device)
        n = len(seq.prompt)
        x = (self.w["embed"][ids] + self.w["pos"][:n])[None]

        def attend(i: int, q: Any, k: Any, v: Any) -> Any:
            q, k, v = self._heads(q), self._heads(k), self._heads(v)
            self.k[i][seq.slot, :, :n] = k[0]
            self.v[i][seq.slot, :, :n] = v[0]
            return self._merge(F.scaled_dot_product_attention(q, k, v, is_causal=True))

        for i in range(self.config.layers):
            x = self._block(i, x, attend)
        return self._logits(x[:, -1])[0]

    def decode(self, seqs: list[Sequence]) -> Any:
        """One token for each running sequence, batched; logits [B, vocab]."""
        torch = self.torch
        F = torch.nn.functional
        slots = torch.tensor([s.slot for s in seqs], device=self.device)
        pos = torch.tensor([s.length - 1 for s in seqs], device=self.device)
        last = torch.tensor([s.tokens[-1] for s in seqs], device=self.device)
        span = int(max(s.length for s in seqs))
        mask = (torch.arange(span, device=self.device)[None] <= pos[:, None])[:, None, None]
        x = (self.w["embed"][last] + self.w["pos"][pos])[:, None]

        def attend(i: int, q: Any, k: Any, v: Any) -> Any:
            q, k, v = self._heads(q), self._heads(k), self._heads(v)
            self.k[i][slots, :, pos] = k[:, :, 0]
            self.v[i][slots, :, pos] = v[:, :, 0]
            keys = self.k[i][slots, :, :span]
            values = self.v[i][slots, :, :span]
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
            return self._merge(out)

        for i in range(self.config.layers):
            x = self._block(i, x, attend)
        return self._logits(x[:, 0])

    def _sample(self, logits: Any, seqs: list[Sequence]) -> list[int]:
        torch = self.torch
        out = logits.argmax(dim=-1)
        for j, s in enumerate(seqs):
            if s.temperature > 0:
                probs = torch.softmax(logits[j] / s.temperature, dim=-1)
                out[j] = torch.multinomial(probs, 1, generator=self.generator)[0]
        return [int(t) for t in out.tolist()]

    def step_sync(self, prefill: list[Sequence], decode: list[Sequence]) -> list[int]:
        with self.torch.inference_mode():
            rows = [self.prefill(s) for s in prefill]
            if decode:
                rows.extend(self.decode(decode))
            return self._sample(self.torch.stack(rows), [*prefill, *decode])

    async def step(self, prefill: list[Sequence], decode: list[Sequence]) -> list[int]:
        return await asyncio.to_thread(self.step_sync, prefill, decode)


def random_weights(config: TorchConfig, seed: int) -> dict[str, Any]:
    """Random weights of the configured shape, scaled so activations stay of order one."""
    import torch

    g = torch.Generator().manual_seed(int(seed))
    d, v = config.d_model, config.vocab_size

    def rand(*shape: int, scale: float) -> Any:
        return torch.randn(*shape, generator=g) * scale

    w: dict[str, Any] = {
        "embed": rand(v, d, scale=d**-0.5),
        "pos": rand(config.max_model_len, d, scale=0.02),
        "ln.w": torch.ones(d),
        "ln.b": torch.zeros(d),
    }
    for i in range(config.layers):
        w |= {
            f"b{i}.ln1.w": torch.ones(d),
            f"b{i}.ln1.b": torch.zeros(d),
            f"b{i}.qkv": rand(d, 3 * d, scale=d**-0.5),
            f"b{i}.proj": rand(d, d, scale=(2 * config.layers * d) ** -0.5),
            f"b{i}.ln2.w": torch.ones(d),
            f"b{i}.ln2.b": torch.zeros(d),
            f"b{i}.fc1": rand(d, 4 * d, scale=d**-0.5),
            f"b{i}.fc2": rand(4 * d, d, scale=(8 * config.layers * d) ** -0.5),
        }
    return w


def ensure_weights(path: Path, config: TorchConfig, seed: int) -> None:
    """Write the version's random weights unless the file exists (atomically: replicas of one
    version may start together)."""
    if path.exists():
        return
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(
        {"shape": config.shape(), "seed": seed, "weights": random_weights(config, seed)}, tmp
    )
    os.replace(tmp, path)
