"""Scenario files (YAML): what `rollout simulate` and `rollout sweep` read. Unknown keys are errors.

The schema is fixed by DESIGN.md; times are seconds and money is USD.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rollout.autoscaler import AutoscalingConfig
from rollout.controller import Control
from rollout.errors import InputError, describe_validation_error
from rollout.policy import RolloutPolicy
from rollout.yamlfile import load_yaml_model


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SyntheticTrace(_Strict):
    process: Literal["poisson", "diurnal", "step"] = "poisson"
    rate_per_s: float = Field(gt=0)
    duration_s: float = Field(gt=0)
    # diurnal: rate·(1 + amplitude·sin(2πt/period_s)); step: rate·step_factor after step_at_s
    amplitude: float = Field(0.5, ge=0, le=1)
    period_s: float = Field(3600.0, gt=0)
    step_at_s: float = Field(0.0, ge=0)
    step_factor: float = Field(2.0, gt=0)
    context_tokens: int = Field(1000, ge=0)  # token counts for the llm service model
    generated_tokens: int = Field(200, ge=0)


class TraceSpec(_Strict):
    path: Path | None = None
    time_scale: float = Field(1.0, gt=0)
    synthetic: SyntheticTrace | None = None

    @model_validator(mode="after")
    def _one_source(self) -> TraceSpec:
        if (self.path is None) == (self.synthetic is None):
            raise ValueError("exactly one of trace.path and trace.synthetic must be set")
        return self


class LlmService(_Strict):
    prefill_s_per_1k_tokens: float = Field(0.05, ge=0)
    decode_s_per_token: float = Field(0.02, ge=0)
    batch_slowdown: float = Field(0.1, ge=0)  # +10 % per extra concurrent request


class ServiceSpec(_Strict):
    kind: Literal["exponential", "deterministic", "lognormal", "llm"] = "exponential"
    mean_s: float = Field(1.0, gt=0)
    cv: float = Field(1.0, gt=0)  # lognormal only
    llm: LlmService = LlmService()  # llm only


class FleetSpec(_Strict):
    replicas: int = Field(ge=1, le=10_000)
    gpus_per_replica: int = Field(1, ge=0)
    gpu_capacity: int = Field(ge=0)
    max_ongoing_requests: int = Field(1, ge=1)
    request_timeout_s: float = Field(60.0, gt=0)
    gpu_hour_usd: float = Field(2.5, ge=0)


class ColdStartSpec(_Strict):
    kind: Literal["deterministic", "lognormal", "empirical"] = "deterministic"
    seconds: float = Field(120.0, ge=0)  # deterministic
    p50_s: float | None = Field(None, gt=0)  # lognormal
    p99_s: float | None = Field(None, gt=0)
    path: Path | None = None  # empirical: CSV of samples (seconds, or `value` in ms)
    scale: float = Field(1.0, gt=0)  # multiplies every sample

    @model_validator(mode="after")
    def _fields_for_kind(self) -> ColdStartSpec:
        if self.kind == "lognormal":
            if self.p50_s is None or self.p99_s is None:
                raise ValueError("a lognormal cold start needs p50_s and p99_s")
            if self.p99_s < self.p50_s:
                raise ValueError("cold_start.p99_s must be at least p50_s")
        if self.kind == "empirical" and self.path is None:
            raise ValueError("an empirical cold start needs a path to samples")
        return self


class HealthCheckSpec(_Strict):
    period_s: float = Field(10.0, gt=0)


class CandidateOverrides(_Strict):
    service: ServiceSpec | None = None
    cold_start: ColdStartSpec | None = None


class ScriptedControl(_Strict):
    at_s: float = Field(ge=0)
    action: Control


class RolloutSpec(_Strict):
    at_s: float = Field(0.0, ge=0)
    policy: RolloutPolicy
    candidate: CandidateOverrides = CandidateOverrides()
    controls: list[ScriptedControl] = []


class SweepGrid(_Strict):
    max_surge_percent: list[int] = []
    max_unavailable_percent: list[int] = []
    stabilization_time_seconds: list[float] = [0.0]
    seeds: int = Field(3, ge=1, le=1000)

    def policies(self, base: RolloutPolicy) -> list[RolloutPolicy]:
        """Every point of the grid, both modes; the first invalid point raises."""
        out: list[RolloutPolicy] = []
        modes = [("max_surge_percent", p) for p in self.max_surge_percent] + [
            ("max_unavailable_percent", p) for p in self.max_unavailable_percent
        ]
        for (name, pct), stab in itertools.product(modes, self.stabilization_time_seconds):
            fields = base.model_dump() | {
                "max_surge_percent": 0,
                "max_unavailable_percent": 0,
                name: pct,
                "stabilization_time_seconds": stab,
            }
            try:
                out.append(RolloutPolicy(**fields))
            except ValidationError as e:
                raise InputError(
                    f"sweep point {name}={pct}, stabilization_time_seconds={stab:g}: "
                    + describe_validation_error(e)
                ) from None
        if not out:
            raise InputError(
                "the sweep grid has no policy: list max_surge_percent or "
                "max_unavailable_percent values"
            )
        return out


class Slo(_Strict):
    latency_p99_s: float | None = Field(None, gt=0)
    ttft_p99_s: float | None = Field(None, gt=0)
    max_drop_rate: float | None = Field(None, ge=0, le=1)


class Scenario(_Strict):
    name: str
    seed: int = 0
    trace: TraceSpec
    service: ServiceSpec = ServiceSpec()
    fleet: FleetSpec
    cold_start: ColdStartSpec = ColdStartSpec()
    health_check: HealthCheckSpec = HealthCheckSpec()
    autoscaling: AutoscalingConfig | None = None
    rollout: RolloutSpec | None = None
    sweep: SweepGrid | None = None
    slo: Slo = Slo()

    @model_validator(mode="after")
    def _fits(self) -> Scenario:
        need = self.fleet.replicas * self.fleet.gpus_per_replica
        if need > self.fleet.gpu_capacity:
            raise ValueError(
                f"fleet.gpu_capacity ({self.fleet.gpu_capacity}) is below the "
                f"{need} GPUs the initial {self.fleet.replicas} replicas need"
            )
        if self.autoscaling is not None and self.autoscaling.min_replicas == 0:
            # the policy scales to zero, but a simulated rollout cannot yet start from an
            # empty pool: refuse it here rather than fail mid-run
            raise ValueError(
                "autoscaling.min_replicas 0 (scale to zero) is not simulated yet; use 1 or more"
            )
        return self

    def with_policy(self, policy: RolloutPolicy) -> Scenario:
        """The same scenario with another rollout policy (a rollout at t=0 if it had none)."""
        spec = self.rollout or RolloutSpec(policy=policy)
        return self.model_copy(update={"rollout": spec.model_copy(update={"policy": policy})})


def load_scenario(path: Path | str) -> Scenario:
    """Read and validate a scenario; relative paths inside resolve against the working directory
    first and then the scenario's folder. Raises InputError with one sentence."""
    scenario = load_yaml_model(path, Scenario, "scenario file")
    return _resolve_paths(scenario, Path(path).parent)


def _resolve(p: Path | None, base: Path) -> Path | None:
    if p is None or p.is_absolute() or p.exists():
        return p
    return base / p if (base / p).exists() else p


def _resolve_paths(s: Scenario, base: Path) -> Scenario:
    trace = s.trace.model_copy(update={"path": _resolve(s.trace.path, base)})
    cold = s.cold_start.model_copy(update={"path": _resolve(s.cold_start.path, base)})
    return s.model_copy(update={"trace": trace, "cold_start": cold})
