"""Deploy files (YAML): what `rollout deploy` reads. Unknown keys are errors, like scenarios.

The format is documented in docs/executor.md; times are seconds. A few optional keys
(`model.deployment`, `model.graceful_shutdown_timeout_s`, `http.route_prefix`) have defaults
that keep older files valid.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from executor.routing import HIDDEN_ROOT, under
from rollout.autoscaler import AutoscalingConfig
from rollout.policy import RolloutPolicy
from rollout.yamlfile import load_yaml_model

# Serve application names derive from these: `{name}_{version}` is one version (at the route
# prefix `/_rollout/{name}_{version}`), so neither may contain an underscore.
NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")
VERSION = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,30}[A-Za-z0-9])?$")
IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    import_path: str  # a Serve application builder, resolved on the cluster
    args: dict[str, Any] = {}
    ray_actor_options: dict[str, Any] = {}
    max_ongoing_requests: int = Field(5, ge=1, le=100_000)
    deployment: str | None = None  # the builder's ingress deployment; found by import if unset
    graceful_shutdown_timeout_s: float = Field(20.0, ge=0, le=3600)

    @field_validator("import_path")
    @classmethod
    def _import_path(cls, v: str) -> str:
        if not IMPORT_PATH.match(v):
            raise ValueError("must look like package.module:builder")
        return v

    @field_validator("ray_actor_options")
    @classmethod
    def _actor_options(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key in ("num_gpus", "num_cpus"):
            got = v.get(key, 0)
            if not isinstance(got, int | float) or isinstance(got, bool) or got < 0:
                raise ValueError(f"{key} must be a number of at least 0 (got {got!r})")
        return v

    @property
    def num_gpus(self) -> float:
        return float(self.ray_actor_options.get("num_gpus", 0))


class HealthCheckSpec(_Strict):
    period_s: float = Field(10.0, gt=0, le=3600)
    timeout_s: float = Field(30.0, gt=0, le=3600)


class ClusterSpec(_Strict):
    address: str | None = None  # null: a local cluster that rollout starts and `down` stops
    num_gpus: int | None = Field(None, ge=0, le=4096)  # local cluster: logical GPUs
    num_cpus: int | None = Field(None, ge=1, le=4096)  # local cluster: logical CPUs
    token_file: str | None = None  # given address: the file holding the cluster's Ray token

    @model_validator(mode="after")
    def _token_for_address(self) -> ClusterSpec:
        if self.token_file and self.address is None:
            raise ValueError("token_file is for a cluster given by address, not a local one")
        return self


class HttpSpec(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    route_prefix: str = "/"

    @field_validator("route_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("must start with '/'")
        if v != "/" and v.endswith("/"):
            raise ValueError("must not end with '/' (except '/' itself), as in Serve")
        if under(v, HIDDEN_ROOT):
            raise ValueError(f"{HIDDEN_ROOT} is where rollout serves each version")
        return v


class RouterSpec(_Strict):
    # no effect: the router runs in every Serve HTTP proxy (one per node); kept so that deploy
    # files written for the router application of earlier releases stay valid
    replicas: int = Field(2, ge=1, le=64)
    metrics_window_s: float = Field(60.0, gt=0, le=300)  # the per-version metrics' window


HEADER = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]{1,64}$")  # an HTTP field name, lowercase
COOKIE = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}$")  # a cookie name (RFC 6265 token)


class StickySpec(_Strict):
    """Sticky sessions during a rollout (docs/executor.md, Sticky sessions): the session key is
    the request's `header`, else its `cookie`; `max_age_s` without a request ends a session
    for the router's session counts (the assignment itself needs no memory)."""

    header: str | None = "x-session-id"
    cookie: str | None = None
    max_age_s: float = Field(3600.0, gt=0, le=7 * 86400)

    @field_validator("header")
    @classmethod
    def _header(cls, v: str | None) -> str | None:
        if v is not None and not HEADER.match(v):
            raise ValueError("must be an HTTP header name in lowercase (letters, digits, '-')")
        return v

    @field_validator("cookie")
    @classmethod
    def _cookie(cls, v: str | None) -> str | None:
        if v is not None and not COOKIE.match(v):
            raise ValueError("must be a cookie name (letters, digits, '-', '_', '.')")
        return v

    @model_validator(mode="after")
    def _a_key(self) -> StickySpec:
        if self.header is None and self.cookie is None:
            raise ValueError("needs a header or a cookie to read the session key from")
        return self


class RoutingSpec(_Strict):
    sticky: StickySpec | None = None  # null: every request is routed by the weight alone


class DeploySpec(_Strict):
    name: str
    version: str
    model: ModelSpec
    health_check: HealthCheckSpec = HealthCheckSpec()
    replicas: int = Field(ge=1, le=1000)
    autoscaling: AutoscalingConfig | None = None
    policy: RolloutPolicy = RolloutPolicy(max_surge_percent=25)
    progress_deadline_s: float | None = Field(None, gt=0, le=86400)
    cluster: ClusterSpec = ClusterSpec()
    http: HttpSpec = HttpSpec()
    router: RouterSpec = RouterSpec()
    routing: RoutingSpec = RoutingSpec()
    store: str | None = None  # null: SQLite under .rollout/; or a postgresql:// URL

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME.match(v):
            raise ValueError("must be 1-40 lowercase letters, digits or '-', not at either end")
        return v

    @field_validator("version")
    @classmethod
    def _version(cls, v: str) -> str:
        if not VERSION.match(v):
            raise ValueError("must be 1-32 letters, digits, '.' or '-', not at either end")
        return v

    @field_validator("store")
    @classmethod
    def _store(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("postgresql://", "postgres://", "sqlite:///")):
            raise ValueError("must be null, a postgresql:// URL or a sqlite:/// URL")
        return v

    @model_validator(mode="after")
    def _fits(self) -> DeploySpec:
        gpus, need = self.cluster.num_gpus, self.replicas * self.model.num_gpus
        if self.cluster.address is None and gpus is not None and need > gpus:
            raise ValueError(
                f"cluster.num_gpus ({gpus}) is below the {need:g} GPUs that "
                f"{self.replicas} replicas need"
            )
        if self.autoscaling is not None:
            lo, hi = self.autoscaling.min_replicas, self.autoscaling.max_replicas
            if not lo <= self.replicas <= hi:
                raise ValueError(
                    f"replicas ({self.replicas}) must lie within autoscaling's "
                    f"min_replicas ({lo}) and max_replicas ({hi})"
                )
        return self

    def rollout_policy(self) -> RolloutPolicy:
        """The policy with the file's top-level progress deadline folded in."""
        if self.progress_deadline_s is None:
            return self.policy
        return self.policy.model_copy(
            update={"progress_deadline_seconds": self.progress_deadline_s}
        )

    def app_name(self, version: str | None = None) -> str:
        return version_app(self.name, version or self.version)


def version_app(name: str, version: str) -> str:
    """The Serve application that runs one version."""
    return f"{name}_{version}"


def load_deploy_file(path: Path | str) -> DeploySpec:
    """Read and validate a deploy file; raises InputError with one sentence."""
    return load_yaml_model(path, DeploySpec, "deploy file")
