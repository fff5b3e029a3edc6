"""Ray token authentication for every cluster rollout drives.

Ray (2.52+) authenticates every RPC to its GCS, raylets and agents, and every HTTP request to
the dashboard agent (its job API among them), with one shared bearer token when
`RAY_AUTH_MODE=token`. A process finds the token in `RAY_AUTH_TOKEN`, else in the file
`RAY_AUTH_TOKEN_PATH` names. Rollout passes it only that way, never on a command line:

- the local cluster rollout starts gets a fresh token in `.rollout/ray-token` (the file 0600,
  the folder 0700); `ray start`, and through it every raylet, worker and replica, inherits the
  path in its environment, as do the drivers and controller processes rollout starts;
- a cluster given by `cluster.address` uses the token of whoever runs that cluster: the file
  `cluster.token_file` of the deploy file names, or `RAY_AUTH_TOKEN_PATH` / `RAY_AUTH_TOKEN` in
  the environment. `RAY_AUTH_MODE=disabled` in the environment is the explicit opt-out for a
  cluster that runs without authentication.

A client without the token is refused by the GCS (so a plain `ray.init(address=...)` fails)
and by the dashboard agent's HTTP server (401).
"""

from __future__ import annotations

import os
import secrets
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from executor import store
from executor.deploy_file import ClusterSpec
from rollout.errors import InputError

TOKEN_FILE = "ray-token"
MODE, TOKEN, TOKEN_PATH = "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"


@dataclass(frozen=True)
class Token:
    """Where a driver finds a cluster's token: a file, the environment, or none (opt-out)."""

    path: Path | None = None  # a token file
    from_env: bool = False  # RAY_AUTH_TOKEN as the user set it
    disabled: bool = False  # RAY_AUTH_MODE=disabled, set by the user for a remote cluster


def local_token_path() -> Path:
    return store.home() / TOKEN_FILE


def private_home() -> Path:
    """`.rollout/`, created (or narrowed) to mode 0700: it holds the token and the store."""
    home = store.home()
    home.mkdir(parents=True, exist_ok=True)
    if stat.S_IMODE(home.stat().st_mode) & 0o077:
        home.chmod(0o700)
    return home


def create_local_token() -> Path:
    """A fresh token for a local cluster about to start (the old one dies with its cluster)."""
    path = private_home() / TOKEN_FILE
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))  # 256 bits, as `ray get-auth-token --generate`
    return path


def check_token_file(path: Path) -> Path:
    """A token file must exist, be non-empty and be readable by its owner only."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise InputError(f"the Ray token file {path} does not exist") from None
    if not stat.S_ISREG(info.st_mode):
        raise InputError(f"the Ray token file {path} is not a file")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise InputError(
            f"the Ray token file {path} is readable by other users (mode {mode:04o}); "
            f"run `chmod 600 {path}`"
        )
    if info.st_size == 0:
        raise InputError(f"the Ray token file {path} is empty")
    return path


def token_for(spec: ClusterSpec) -> Token:
    """The token a driver of this deploy file's cluster presents."""
    if spec.address is None:
        return Token(path=check_token_file(local_token_path()))
    if spec.token_file:
        return Token(path=check_token_file(Path(spec.token_file).expanduser().resolve()))
    if os.environ.get(TOKEN):
        return Token(from_env=True)
    if os.environ.get(TOKEN_PATH):
        return Token(path=check_token_file(Path(os.environ[TOKEN_PATH]).resolve()))
    if os.environ.get(MODE, "").lower() == "disabled":
        return Token(disabled=True)
    raise InputError(
        f"cluster.address {spec.address} needs the cluster's Ray token: name its file in "
        f"cluster.token_file, or set RAY_AUTH_TOKEN_PATH (RAY_AUTH_MODE=disabled for a cluster "
        "that runs without authentication)"
    )


def use(token: Token) -> None:
    """Present this token from now on: in this process's next `ray.init` and in every process
    it starts (they inherit the environment)."""
    if token.disabled:
        os.environ[MODE] = "disabled"
        os.environ.pop(TOKEN, None)
        os.environ.pop(TOKEN_PATH, None)
    else:
        os.environ[MODE] = "token"
        if token.path is not None:
            os.environ.pop(TOKEN, None)  # it would take precedence over the file
            os.environ[TOKEN_PATH] = str(token.path)
    reload()


def reload() -> None:
    """Make Ray read the authentication settings from the environment again (it caches its
    config and the token once loaded)."""
    if "ray._raylet" in sys.modules:
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
