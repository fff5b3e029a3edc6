"""Service times: how long a replica spends on one request, drawn once per request.

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
from rollout.scenario import ServiceSpec
from rollout.traces import Trace

_STREAM = {"exponential": 1, "lognormal": 2}


@dataclass(frozen=True)
class ServiceTimes:
    """Per-request work for one version.

    `base[i]` is request i's service time alone on a replica. The LLM model multiplies it by
    `1 + slowdown · (k − 1)` when the request starts as the replica's k-th concurrent request
    (batching shares the GPU), and its first token comes after `prefill[i]` times that factor.
    Without `prefill` the response arrives whole, so time to first token equals latency.
    """

    base: list[float]
    prefill: list[float] | None = None
    slowdown: float = 0.0


def service_times(spec: ServiceSpec, trace: Trace, seed: int) -> ServiceTimes:
    n = len(trace)
    if spec.kind == "deterministic":
        return ServiceTimes([spec.mean_s] * n)
    if spec.kind == "llm":
        if not trace.has_tokens:
            raise InputError(
                "service kind llm needs token counts: a trace with ContextTokens and "
                "GeneratedTokens columns, or a synthetic trace"
            )
        assert trace.context_tokens is not None and trace.generated_tokens is not None
        llm = spec.llm
        prefill = llm.prefill_s_per_1k_tokens * trace.context_tokens / 1000.0
        base = prefill + llm.decode_s_per_token * trace.generated_tokens
        return ServiceTimes(base.tolist(), prefill.tolist(), llm.batch_slowdown)
    rng = np.random.default_rng([seed, 0x5E2, _STREAM[spec.kind]])
    if spec.kind == "exponential":
        return ServiceTimes((spec.mean_s * rng.standard_exponential(n)).tolist())
    # lognormal with the given mean and coefficient of variation
    sigma2 = math.log1p(spec.cv**2)
    mu = math.log(spec.mean_s) - sigma2 / 2
    return ServiceTimes(np.exp(mu + math.sqrt(sigma2) * rng.standard_normal(n)).tolist())
