"""What one rollout on Ray Serve is: its plan (the workflow's input) and the backend's memory
(carried from one recorded step to the next), and the Serve application config of a version.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from pydantic import BaseModel

from executor.deploy_file import DeploySpec, version_app
from executor.routing import hidden_prefix
from rollout import controller as c

ROLES = (c.CURRENT, c.CANDIDATE)


class Plan(BaseModel):
    """Everything a controller process needs to run one rollout; the workflow's input."""

    id: str
    name: str
    from_version: str | None  # None: a first deploy, nothing live before
    to_version: str
    spec: DeploySpec  # the deploy file of the new version
    current_app: dict[str, Any] | None  # the live version's Serve app config, as deployed
    candidate_app: dict[str, Any]
    desired_start: int  # the live version's replica count when the rollout began
    address: str
    store_url: str

    def version(self, role: str) -> str | None:
        return self.from_version if role == c.CURRENT else self.to_version

    def app(self, role: str) -> str | None:
        v = self.version(role)
        return version_app(self.name, v) if v else None

    def template(self, role: str) -> dict[str, Any] | None:
        return self.current_app if role == c.CURRENT else self.candidate_app

    def deployment(self, role: str) -> str | None:
        t = self.template(role)
        return t["deployments"][0]["name"] if t else None

    def gpus(self, role: str) -> float:
        t = self.template(role)
        if not t:
            return 0.0
        return float(t["deployments"][0].get("ray_actor_options", {}).get("num_gpus", 0) or 0)

    @property
    def first_deploy(self) -> bool:
        return self.from_version is None


class Memory(BaseModel):
    """The backend's bookkeeping, carried from one recorded step to the next."""

    probed: dict[str, list[str]] = {}  # app → replica ids whose health probe passed
    unready: dict[str, list[str]] = {}  # app → replica ids seen live, never ready yet
    live: dict[str, int] = {}  # app → replicas not stopping at the last observation
    unplaced_since: dict[str, float] = {}  # "app/replica id" → first seen without a node
    placed: dict[str, list[str]] = {}  # app → replica ids on a node at the last observation
    released: dict[str, float] = {}  # "app/replica id" → when Serve stopped listing it
    serve_failed: dict[str, str] = {}  # app → the failed status Serve reports for it now
    failed_starts: dict[str, int] = {}  # role → cumulative failed starts
    targets: dict[str, int] = {}  # role → replicas last applied
    weight: float = 0.0  # candidate weight last applied
    session_weight: float = 0.0  # the candidate's share of sticky sessions last applied
    autoscaler: dict[str, Any] | None = None  # `Autoscaler.to_dict()`


def app_dir() -> str:
    """Where import paths resolve first: the current folder, as `serve run --app-dir .`."""
    return os.getcwd()


def candidate_app_config(spec: DeploySpec, deployment: str) -> dict[str, Any]:
    """The Serve application config of the deploy file's version (replicas set on apply).

    Its replicas (and Serve's build of the application) get the current folder in front of
    the cluster's PYTHONPATH, so the import path resolves there as it did here.
    """
    m = spec.model
    return {
        "name": spec.app_name(),
        "route_prefix": hidden_prefix(spec.app_name()),
        "import_path": m.import_path,
        "args": dict(m.args),
        "runtime_env": {"env_vars": {"PYTHONPATH": f"{app_dir()}{os.pathsep}${{PYTHONPATH}}"}},
        "deployments": [
            {
                "name": deployment,
                "num_replicas": spec.replicas,
                "ray_actor_options": dict(m.ray_actor_options),
                "max_ongoing_requests": m.max_ongoing_requests,
                "health_check_period_s": spec.health_check.period_s,
                "health_check_timeout_s": spec.health_check.timeout_s,
                "graceful_shutdown_timeout_s": m.graceful_shutdown_timeout_s,
                "graceful_shutdown_wait_loop_s": min(2.0, m.graceful_shutdown_timeout_s),
            }
        ],
    }


def ingress_deployment(spec: DeploySpec) -> str:
    """The builder's ingress deployment name, by building the application locally (as
    `serve build` does); `model.deployment` in the deploy file skips the import."""
    if spec.model.deployment:
        return spec.model.deployment
    import importlib

    from rollout.errors import InputError

    module_name, _, attr = spec.model.import_path.partition(":")
    if app_dir() not in sys.path:
        sys.path.insert(0, app_dir())
    try:
        builder = getattr(importlib.import_module(module_name), attr)
        app = builder(dict(spec.model.args)) if callable(builder) else builder
        return str(app._bound_deployment.name)
    except Exception as e:
        raise InputError(
            f"cannot build {spec.model.import_path} to find its deployment name ({e}); "
            "set model.deployment in the deploy file"
        ) from None
