"""Scenario files (YAML): what `rollout simulate` and `rollout sweep` read. Unknown keys are errors.

The schema is documented in docs/simulator.md; times are seconds and money is USD.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rollout.autoscaler import AutoscalingConfig
from rollout.controller import Control
from rollout.errors import InputError, describe_validation_error
from rollout.policy import RolloutPolicy
from rollout.yamlfile import load_yaml_model

M = TypeVar("M", bound=BaseModel)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TokenCounts(_Strict):
    """Token counts drawn per request: lognormal by its median and 99th percentile, or sampled
    from a CSV column (a trace file works: `ContextTokens`, `GeneratedTokens`)."""

    kind: Literal["lognormal", "empirical"]
    p50: float | None = Field(None, gt=0)  # lognormal
    p99: float | None = Field(None, gt=0)
    path: Path | None = None  # empirical
    column: str | None = None  # default: ContextTokens or GeneratedTokens, as the field

    @model_validator(mode="after")
    def _fields_for_kind(self) -> TokenCounts:
        if self.kind == "lognormal":
            if self.p50 is None or self.p99 is None:
                raise ValueError("lognormal token counts need p50 and p99")
            if self.p99 < self.p50:
                raise ValueError("token counts' p99 must be at least their p50")
        elif self.path is None:
            raise ValueError("empirical token counts need a path to a CSV file")
        return self


class SyntheticTrace(_Strict):
    # sessions: conversations arrive as a Poisson process at rate_per_s / turns_mean, each
    # with a geometric number of turns (mean turns_mean) an exponential think time apart
    process: Literal["poisson", "diurnal", "step", "sessions"] = "poisson"
    rate_per_s: float = Field(gt=0)
    duration_s: float = Field(gt=0)
    turns_mean: float = Field(4.0, ge=1)
    think_s_mean: float = Field(30.0, ge=0)
    # diurnal: rate·(1 + amplitude·sin(2πt/period_s)); step: rate·step_factor after step_at_s
    amplitude: float = Field(0.5, ge=0, le=1)
    period_s: float = Field(3600.0, gt=0)
    step_at_s: float = Field(0.0, ge=0)
    step_factor: float = Field(2.0, gt=0)
    # token counts for the llm and engine service models: a constant or a distribution
    context_tokens: Annotated[int, Field(ge=0)] | TokenCounts = 1000
    generated_tokens: Annotated[int, Field(ge=0)] | TokenCounts = 200


class TraceSpec(_Strict):
    path: Path | None = None
    time_scale: float = Field(1.0, gt=0)  # 2.0 replays twice as fast (the span halves)
    rate_scale: float = Field(1.0, gt=0)  # 2.0: twice the requests over the same span
    # a file's arrivals are resampled per seed (rollout/traces.py); false replays it as is
    resample: bool = True
    jitter_s: float = Field(1.0, ge=0)  # resampling moves each copy by up to ±jitter_s/2
    synthetic: SyntheticTrace | None = None

    @model_validator(mode="after")
    def _one_source(self) -> TraceSpec:
        if (self.path is None) == (self.synthetic is None):
            raise ValueError("exactly one of trace.path and trace.synthetic must be set")
        if self.path is not None and not self.resample and self.rate_scale != 1.0:
            raise ValueError(
                "trace.rate_scale resamples the trace: it needs trace.resample to be true"
            )
        return self


class LlmService(_Strict):
    prefill_s_per_1k_tokens: float = Field(0.05, ge=0)
    decode_s_per_token: float = Field(0.02, ge=0)
    batch_slowdown: float = Field(0.1, ge=0)  # +10 % per extra concurrent request


class ColdStartSpec(_Strict):
    kind: Literal["deterministic", "lognormal", "empirical"] = "deterministic"
    seconds: float = Field(120.0, ge=0)  # deterministic
    p50_s: float | None = Field(None, gt=0)  # lognormal
    p99_s: float | None = Field(None, gt=0)
    path: Path | None = None  # empirical: CSV of samples (seconds, or `value` in ms)
    scale: float = Field(1.0, gt=0)  # multiplies every sample
    # a version's first replica starts this much later: the executor deploys each version as
    # its own Serve application, created before its first replica (1.9–2.4 s on the LLM example)
    first_of_version_s: float = Field(0.0, ge=0)

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


class Warmup(_Strict):
    requests: int = Field(0, ge=0)  # a new replica's first requests ...
    # ... and, with iteration admission, its first iterations (prefills and decode) ...
    iterations: int = Field(0, ge=0)
    factor: float = Field(1.0, ge=1)  # ... run this many times slower


class _EngineFields(_Strict):
    max_num_seqs: int | None = Field(256, ge=1)  # running sequences; None: no limit
    prefill_s_per_1k_tokens: float | None = Field(None, ge=0)
    # seconds of one decode iteration at batch size k; linear between points, flat outside
    decode_s_per_token: dict[int, float] | None = None
    kv_cache_tokens: int | None = Field(None, ge=1)  # None: no KV-cache limit
    warmup: Warmup = Warmup()
    # how a request joins the batch: at the next iteration boundary, prefilled in an iteration
    # that also decodes the batch (vLLM; sim/engine.py IterationEngine), or at once, its
    # prefill stalling decoding (the queueing oracles' idealisation)
    admission: Literal["iteration", "immediate"] = "iteration"

    @model_validator(mode="after")
    def _table(self) -> _EngineFields:
        if self.warmup.iterations and self.admission != "iteration":
            raise ValueError("warmup.iterations needs admission: iteration (immediate has none)")
        table = self.decode_s_per_token
        if table is not None:
            if not table:
                raise ValueError("decode_s_per_token needs at least one point")
            for k, sec in table.items():
                if k < 1:
                    raise ValueError(f"decode_s_per_token: batch size {k} is below 1")
                if not sec > 0:
                    raise ValueError(
                        f"decode_s_per_token: the time at batch size {k} must be > 0 (got {sec:g})"
                    )
        return self


class EngineProfile(_EngineFields):
    """A profile file in `data/engines/`: the engine's numbers and where they come from."""

    name: str
    provenance: str


class EngineSpec(_EngineFields):
    """A continuous-batching engine (vLLM-like) on each replica; `sim/engine.py` runs it.

    `profile` names a profile file; fields given here override the file's. `load_scenario`
    fills the fields in from the file (`with_profile`).
    """

    profile: Path | None = None

    def with_profile(self) -> EngineSpec:
        """The fields filled in from `profile` (fields set here win) and `profile` cleared, so
        a filled spec travels to other machines without the file; checks completeness."""
        spec = self
        if self.profile is not None:
            base = load_yaml_model(self.profile, EngineProfile, "engine profile")
            fields = base.model_dump(exclude={"name", "provenance"})
            fields |= {k: getattr(self, k) for k in self.model_fields_set if k != "profile"}
            spec = EngineSpec(**fields)  # read in: the spec no longer needs the file
        if spec.prefill_s_per_1k_tokens is None or spec.decode_s_per_token is None:
            raise InputError(
                "the engine needs prefill_s_per_1k_tokens and decode_s_per_token "
                "(inline or from a profile)"
            )
        return spec


class ServiceSpec(_Strict):
    kind: Literal["exponential", "deterministic", "lognormal", "llm", "engine"] = "exponential"
    mean_s: float = Field(1.0, gt=0)
    cv: float = Field(1.0, gt=0)  # lognormal only
    llm: LlmService = LlmService()  # llm only
    engine: EngineSpec | None = None  # engine only
    # what every request pays outside the replica (HTTP proxy, router, network): added to its
    # TTFT and latency; `rollout calibrate` measures it
    overhead_s: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _engine(self) -> ServiceSpec:
        if self.kind == "engine" and self.engine is None:
            raise ValueError("service kind engine needs an `engine:` section (or a profile)")
        return self


class OnDemandSpec(_Strict):
    """Nodes bought when a replica finds no free reserved GPU, released once empty."""

    max_nodes: int = Field(ge=0)
    provision_s: ColdStartSpec = Field(default_factory=lambda: ColdStartSpec(seconds=300.0))
    node_hour_usd: float = Field(ge=0)


class FleetSpec(_Strict):
    replicas: int = Field(ge=1, le=10_000)
    gpus_per_replica: int = Field(1, ge=0)
    gpu_capacity: int = Field(ge=0)  # reserved GPUs
    gpus_per_node: int | None = Field(None, ge=1)  # None: one pool of gpu_capacity
    max_ongoing_requests: int = Field(1, ge=1)  # Serve's cap per replica; more wait at the router
    request_timeout_s: float = Field(60.0, gt=0)
    graceful_shutdown_timeout_s: float = Field(20.0, ge=0)  # a draining replica's deadline
    # Serve's drain loop: a draining replica checks for requests in flight every this many
    # seconds (the first check one period after removal); 0: it stops with its last request
    graceful_shutdown_wait_loop_s: float = Field(0.0, ge=0)
    gpu_hour_usd: float = Field(2.5, ge=0)
    # held: GPUs paid while replicas hold them; reserved: all of gpu_capacity for the whole span
    billing: Literal["held", "reserved"] = "held"
    on_demand: OnDemandSpec | None = None

    @model_validator(mode="after")
    def _nodes(self) -> FleetSpec:
        node = self.gpus_per_node
        if node is None:
            if self.on_demand is not None:
                raise ValueError("fleet.on_demand buys whole nodes: set fleet.gpus_per_node")
            return self
        if self.gpus_per_replica and node % self.gpus_per_replica:
            raise ValueError(
                f"fleet.gpus_per_node ({node}) does not divide into whole replicas of "
                f"{self.gpus_per_replica} GPUs"
            )
        if self.gpu_capacity % node:
            raise ValueError(
                f"fleet.gpu_capacity ({self.gpu_capacity}) is not a whole number of "
                f"{node}-GPU nodes"
            )
        return self


class HealthCheckSpec(_Strict):
    period_s: float = Field(10.0, gt=0)


class FaultSpec(_Strict):
    """Replicas that fail to start (each attempt fails with this probability; Serve retries)
    and ready replicas that crash (a Poisson process per replica; Serve restarts them)."""

    start_failure_rate: float = Field(0.0, ge=0, le=1)
    crash_per_replica_hour: float = Field(0.0, ge=0)


class CandidateOverrides(_Strict):
    """How the candidate differs from the current version. A candidate with a service of its
    own or an error rate is a bad release for the summary's blast radius (`bad_requests`)."""

    service: ServiceSpec | None = None
    cold_start: ColdStartSpec | None = None
    faults: FaultSpec | None = None
    error_rate: float = Field(0.0, ge=0, le=1)  # this share of its requests fails at once

    @property
    def bad(self) -> bool:
        return self.error_rate > 0 or self.service is not None


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
    rollout_at_s: list[float] = []  # the same policies rolled out at each time; []: rollout.at_s
    # each policy also rolls out this bad candidate (overrides on top of rollout.candidate)
    bad_release: CandidateOverrides | None = None

    @model_validator(mode="after")
    def _times(self) -> SweepGrid:
        if self.bad_release is not None and not self.bad_release.bad:
            raise ValueError("sweep.bad_release needs an error_rate above 0 or a service")
        for t in self.rollout_at_s:
            if t < 0:
                raise ValueError(f"sweep.rollout_at_s: {t:g} is before the trace starts")
        if len(set(self.rollout_at_s)) != len(self.rollout_at_s):
            raise ValueError("sweep.rollout_at_s lists a time twice")
        return self

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


class RoutingSpec(_Strict):
    # sticky sessions (rollout/sticky.py): a request with a session (a trace's `session_id`
    # column, or the `sessions` process) goes to its session's version
    sticky: bool = False


class Slo(_Strict):
    latency_p99_s: float | None = Field(None, gt=0)
    ttft_p99_s: float | None = Field(None, gt=0)
    max_drop_rate: float | None = Field(None, ge=0, le=1)
    max_failed_rate: float | None = Field(None, ge=0, le=1)  # crashes and drain timeouts


class Scenario(_Strict):
    name: str
    seed: int = 0
    trace: TraceSpec
    service: ServiceSpec = ServiceSpec()
    fleet: FleetSpec
    cold_start: ColdStartSpec = ColdStartSpec()
    health_check: HealthCheckSpec = HealthCheckSpec()
    faults: FaultSpec = FaultSpec()
    autoscaling: AutoscalingConfig | None = None
    rollout: RolloutSpec | None = None
    routing: RoutingSpec = RoutingSpec()
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

    def with_engine_profiles(self) -> Scenario:
        """Engine profiles read into the engine specs (fields set inline win), so the scenario
        needs no profile file any more, wherever it is simulated."""

        def filled(spec: ServiceSpec | None) -> ServiceSpec | None:
            if spec is None or spec.engine is None:
                return spec
            return spec.model_copy(update={"engine": spec.engine.with_profile()})

        update: dict[str, object] = {"service": filled(self.service)}
        if self.rollout is not None and self.rollout.candidate.service is not None:
            candidate = self.rollout.candidate.model_copy(
                update={"service": filled(self.rollout.candidate.service)}
            )
            update["rollout"] = self.rollout.model_copy(update={"candidate": candidate})
        return self.model_copy(update=update)

    def with_policy(self, policy: RolloutPolicy) -> Scenario:
        """The same scenario with another rollout policy (a rollout at t=0 if it had none)."""
        spec = self.rollout or RolloutSpec(policy=policy)
        return self.model_copy(update={"rollout": spec.model_copy(update={"policy": policy})})


def load_scenario(path: Path | str) -> Scenario:
    """Read and validate a scenario; relative paths inside resolve against the scenario file's
    folder (whatever the working directory), made absolute. Raises InputError with one
    sentence."""
    scenario = load_yaml_model(path, Scenario, "scenario file")
    return _resolve_paths(scenario, Path(path).parent.resolve())


def _resolve(p: Path | None, base: Path) -> Path | None:
    if p is None:
        return None
    p = p.expanduser()
    return p if p.is_absolute() else Path(os.path.normpath(base / p))


def _resolve_paths(s: Scenario, base: Path) -> Scenario:
    """Paths relative to the scenario's folder made absolute, and engine profiles read in."""

    def path(model: M, field: str = "path") -> M:
        return model.model_copy(update={field: _resolve(getattr(model, field), base)})

    def service(spec: ServiceSpec) -> ServiceSpec:
        if spec.engine is None:
            return spec
        return spec.model_copy(update={"engine": path(spec.engine, "profile")})

    def cold(spec: ColdStartSpec) -> ColdStartSpec:
        return path(spec)

    trace = path(s.trace)
    if trace.synthetic is not None:
        syn = trace.synthetic
        tokens = {
            name: path(getattr(syn, name))
            for name in ("context_tokens", "generated_tokens")
            if isinstance(getattr(syn, name), TokenCounts)
        }
        trace = trace.model_copy(update={"synthetic": syn.model_copy(update=tokens)})
    fleet = s.fleet
    if fleet.on_demand is not None:
        on_demand = fleet.on_demand.model_copy(
            update={"provision_s": cold(fleet.on_demand.provision_s)}
        )
        fleet = fleet.model_copy(update={"on_demand": on_demand})
    update: dict[str, object] = {
        "trace": trace,
        "cold_start": cold(s.cold_start),
        "service": service(s.service),
        "fleet": fleet,
    }
    if s.rollout is not None:
        cand = s.rollout.candidate
        changes = {}
        if cand.service is not None:
            changes["service"] = service(cand.service)
        if cand.cold_start is not None:
            changes["cold_start"] = cold(cand.cold_start)
        candidate = cand.model_copy(update=changes)
        update["rollout"] = s.rollout.model_copy(update={"candidate": candidate})
    bad = s.sweep.bad_release if s.sweep else None
    if s.sweep is not None and bad is not None and bad.service is not None:
        bad = bad.model_copy(update={"service": service(bad.service)})
        update["sweep"] = s.sweep.model_copy(update={"bad_release": bad})
    return s.model_copy(update=update).with_engine_profiles()
