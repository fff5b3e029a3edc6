"""Service work: what each request asks of a replica, drawn once per request before the run.

Each request gets its size before the run starts, so two policies simulated with the same seed
see the same requests (common random numbers): their difference is the policy, not the noise.
Both versions draw from the same stream when their service kind matches, so a request is as
large on the candidate as on the current version, scaled by each version's mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from rollout.errors import InputError
from rollout.scenario import EngineSpec, ServiceSpec
from rollout.traces import Trace

_STREAM = {"exponential": 1, "lognormal": 2}


@dataclass(frozen=True)
class ServiceTimes:
    """Per-request work for one version of a fixed-time kind (not `engine`).

    `base[i]` is request i's service time alone on a replica. The LLM model multiplies it by
    `1 + slowdown · (k − 1)` when the request starts as the replica's k-th concurrent request
    (batching shares the GPU), and its first token comes after `prefill[i]` times that factor.
    Without `prefill` the response arrives whole, so time to first token equals latency.
    """

    base: np.ndarray
    prefill: np.ndarray | None = None
    slowdown: float = 0.0


@dataclass(frozen=True)
class EngineWork:
    """Per-request work for the engine kind: prefill seconds, tokens to decode and, with a
    KV-cache limit, the tokens the request holds in the cache (context + generated). Token
    counts stay integer arrays (4 or 8 bytes a request)."""

    spec: EngineSpec
    prefill: np.ndarray
    tokens: np.ndarray
    kv_need: np.ndarray | None


Work = ServiceTimes | EngineWork


def _tokens(trace: Trace, kind: str) -> tuple[np.ndarray, np.ndarray]:
    if not trace.has_tokens:
        raise InputError(
            f"service kind {kind} needs token counts: a trace with ContextTokens and "
            "GeneratedTokens columns, or a synthetic trace"
        )
    assert trace.context_tokens is not None and trace.generated_tokens is not None
    return trace.context_tokens, trace.generated_tokens


def service_times(spec: ServiceSpec, trace: Trace, seed: int) -> Work:
    n = len(trace)
    if spec.kind == "engine":
        ctx, gen = _tokens(trace, "engine")
        engine = spec.engine
        assert engine is not None  # the schema requires it
        engine = engine.with_profile()
        assert engine.prefill_s_per_1k_tokens is not None
        prefill = ctx * (engine.prefill_s_per_1k_tokens / 1000.0)
        kv_need = None
        if engine.kv_cache_tokens is not None:
            kv_need = np.ascontiguousarray(ctx + gen)
        return EngineWork(engine, prefill, np.ascontiguousarray(gen), kv_need)
    if spec.kind == "deterministic":
        return ServiceTimes(np.full(n, spec.mean_s))
    if spec.kind == "llm":
        ctx, gen = _tokens(trace, "llm")
        llm = spec.llm
        prefill = llm.prefill_s_per_1k_tokens * ctx / 1000.0
        base = prefill + llm.decode_s_per_token * gen
        return ServiceTimes(base, prefill, llm.batch_slowdown)
    rng = np.random.default_rng([seed, 0x5E2, _STREAM[spec.kind]])
    if spec.kind == "exponential":
        return ServiceTimes(spec.mean_s * rng.standard_exponential(n))
    # lognormal with the given mean and coefficient of variation
    sigma2 = math.log1p(spec.cv**2)
    mu = math.log(spec.mean_s) - sigma2 / 2
    return ServiceTimes(np.exp(mu + math.sqrt(sigma2) * rng.standard_normal(n)))
