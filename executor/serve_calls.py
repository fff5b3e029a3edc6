"""Every call the executor makes to Ray or Serve, each with a timeout.

A Serve controller that restarts, a GCS that blips or an actor that hangs must not hang a
workflow step: the controller could then never check its progress deadline. Each call here
either answers within its timeout or raises `BackendError` with one line saying what did not
answer; the driver hands that to the controller as an observation. Calls Ray offers without a
timeout (`ray.available_resources`, `ray.get_actor`) run on a daemon thread that is waited for
with one. Exceptions that are not about the cluster (a bug) propagate unchanged.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from executor import cluster
from rollout.driver import BackendError

T = TypeVar("T")

DETAILS_TIMEOUT_S = 10.0  # Serve's controller assembling its details
DEPLOY_TIMEOUT_S = 20.0  # Serve's controller validating and storing a whole config
LOCK_WAIT_S = 30.0  # waiting for another writer of the cluster's config
LOCK_TTL_S = 40.0  # a writer that died holding the lock blocks the others this long
GCS_TIMEOUT_S = 30.0  # resource counts, actor look-ups (slow on a loaded 2-core machine)


def _failure(what: str, e: BaseException) -> BackendError:
    first = (str(e).strip().splitlines() or [""])[0][:300]
    return BackendError(f"{what} failed: {type(e).__name__}: {first}".rstrip(": "))


def _errors() -> tuple[type[BaseException], ...]:
    """What a call to the cluster raises when the cluster, not the caller, is at fault."""
    from ray.exceptions import RayError

    return (RayError, ConnectionError, TimeoutError, OSError, RuntimeError, ValueError)


def bounded(fn: Callable[[], T], timeout_s: float, what: str) -> T:
    """`fn()` on a daemon thread, waited for `timeout_s` (a hung call is left behind)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the caller's thread
            box["error"] = e

    t = threading.Thread(target=run, daemon=True, name=f"serve-call {what}")
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise BackendError(f"{what} did not answer within {timeout_s:g} s")
    if "error" in box:
        e = box["error"]
        if isinstance(e, BackendError):
            raise e
        if isinstance(e, _errors()):
            raise _failure(what, e) from None
        raise e
    return box["value"]  # type: ignore[no-any-return]


def get(ref: Any, timeout_s: float, what: str) -> Any:
    """`ray.get` with a timeout; a timeout or a failed task is a `BackendError`."""
    import ray

    try:
        return ray.get(ref, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise BackendError(f"{what} did not answer within {timeout_s:g} s") from None
    except _errors() as e:
        raise _failure(what, e) from None


def connect(address: str) -> None:
    """Join the cluster (once per process); a cluster that cannot be joined is a backend error,
    so a controller that loses its cluster still decides (and rolls back once it is back)."""
    from rollout.errors import InputError

    try:
        bounded(lambda: cluster.connect(address), 60.0, f"joining the Ray cluster at {address}")
    except InputError as e:
        raise BackendError(str(e)) from None


def _controller() -> Any:
    try:
        return cluster.serve_client()._controller
    except Exception as e:  # Serve is not running (yet, or any more)
        raise _failure("reaching Serve's controller", e) from None


def details(timeout_s: float = DETAILS_TIMEOUT_S) -> dict[str, Any]:
    """Serve's details (`serve status` in JSON): every application, deployment and replica."""
    ref = bounded(lambda: _controller().get_serve_instance_details.remote(), GCS_TIMEOUT_S, "Serve")
    return dict(get(ref, timeout_s, "Serve's controller (get_serve_details)"))


def deploy(apps: dict[str, dict[str, Any]], timeout_s: float = DEPLOY_TIMEOUT_S) -> None:
    """Write the cluster's whole declarative config (`deploy_apps`); Serve rejecting it is a
    backend error too (the controller decides what a rejected config means)."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    try:
        schema = ServeDeploySchema.model_validate({"applications": list(apps.values())})
    except ValidationError as e:
        raise BackendError(f"Serve's config schema refused the config: {e}") from None
    ref = bounded(lambda: _controller().apply_config.remote(schema), GCS_TIMEOUT_S, "Serve")
    get(ref, timeout_s, "Serve's controller (deploy_apps)")


def gpus() -> tuple[float, float]:
    """(free, total) GPUs of the cluster."""
    import ray

    def read() -> tuple[float, float]:
        free = float(ray.available_resources().get("GPU", 0.0))
        return free, float(ray.cluster_resources().get("GPU", 0.0))

    return bounded(read, GCS_TIMEOUT_S, "the cluster's resource counts")


def actor(name: str, namespace: str = "serve") -> Any | None:
    """A named actor's handle; None when it is gone."""
    import ray

    def look_up() -> Any | None:
        try:
            return ray.get_actor(name, namespace=namespace)
        except ValueError:
            return None

    return bounded(look_up, GCS_TIMEOUT_S, f"looking up actor {name}")


def probe(replicas: Sequence[dict[str, Any]], timeout_s: float) -> set[str]:
    """Call `check_health` on each replica's own actor at once; the ids that passed in time
    (a replica that is gone, fails or hangs is left out, to be probed again next time)."""
    if not replicas:
        return set()
    import ray

    refs = {}
    for r in replicas:
        handle = actor(r["actor_name"])
        if handle is not None:
            refs[handle.check_health.remote()] = r["replica_id"]
    if not refs:
        return set()
    done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    passed = set()
    for ref in done:
        with contextlib.suppress(Exception):  # an unhealthy replica
            ray.get(ref, timeout=0)
            passed.add(refs[ref])
    return passed


class ConfigLock:
    """A lock with an expiry, as a named detached actor on the cluster: every writer of the
    cluster's Serve config takes it, from whatever host, folder or store it runs (a writer
    that dies holding it blocks the others for `ttl_s` at most)."""

    def __init__(self) -> None:
        import asyncio

        self.holder: str | None = None
        self.until = 0.0
        self.cond = asyncio.Condition()  # bound to the actor's event loop on first use

    async def acquire(self, token: str, ttl_s: float, wait_s: float) -> bool:
        """Take the lock, waiting at most `wait_s`; False when it stayed held."""
        import asyncio

        give_up = time.time() + wait_s
        async with self.cond:
            while self.holder is not None and time.time() < self.until:
                left = min(self.until, give_up) - time.time()
                if left <= 0:
                    return False
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.cond.wait(), max(0.01, left))
            self.holder, self.until = token, time.time() + ttl_s
            return True

    async def release(self, token: str) -> None:
        async with self.cond:
            if self.holder == token:
                self.holder = None
                self.cond.notify_all()


LOCK_NAME = "rollout-config-lock-2"  # the lock's actor (its interface changed from the first)


@contextlib.contextmanager
def config_lock(wait_s: float = LOCK_WAIT_S, ttl_s: float = LOCK_TTL_S) -> Iterator[None]:
    """Serialise a read-modify-write of the cluster's whole declarative config (deploy_apps
    replaces every application) with every other writer of this cluster."""
    import ray

    def lock_actor() -> Any:
        return (
            ray.remote(ConfigLock)
            .options(  # type: ignore[attr-defined]
                name=LOCK_NAME, namespace=cluster.NAMESPACE, lifetime="detached",
                get_if_exists=True, num_cpus=0,
            )
            .remote()
        )  # fmt: skip

    lock = bounded(lock_actor, GCS_TIMEOUT_S, "the config lock's actor")
    token = uuid.uuid4().hex
    ref = lock.acquire.remote(token, ttl_s, wait_s)
    if not get(ref, wait_s + GCS_TIMEOUT_S, "the config lock"):
        raise BackendError(f"another writer held the cluster's config lock for {wait_s:g} s")
    try:
        yield
    finally:
        with contextlib.suppress(BackendError):  # it expires by itself
            get(lock.release.remote(token), GCS_TIMEOUT_S, "releasing the config lock")


def remove_apps(name: str) -> list[str]:
    """Delete a model's route table and every version application (`down DEPLOY.yaml`)."""
    from executor.router_link import remove
    from executor.serve_config import declarative_apps

    with config_lock():
        remove(name)
        apps = declarative_apps(details())
        mine = [a for a in apps if a == name or a.startswith(f"{name}_")]
        if mine:
            deploy({k: v for k, v in apps.items() if k not in mine})
    return mine
