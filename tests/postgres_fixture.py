"""A throwaway PostgreSQL server for the tests: Debian's `postgresql` package (`.ci/run`
installs it), a fresh cluster from `initdb` in a temporary folder, listening on 127.0.0.1 with a
random port and password authentication, stopped and deleted afterwards.

PostgreSQL refuses to run as root, so under root the server runs as `nobody`.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

PASSWORD_PREFIX = "pg-Secret-"


def _bindir() -> Path:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not versions:
        raise RuntimeError("PostgreSQL is not installed: `apt-get install -y postgresql`")
    return Path(versions[-1]).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """`postgresql://rollout:PASSWORD@127.0.0.1:PORT/postgres` of a fresh server."""
    bindir = _bindir()
    root = Path(tempfile.mkdtemp(prefix="rollout-pg-"))
    password = PASSWORD_PREFIX + secrets.token_hex(8)
    user = pwd.getpwnam("nobody") if os.geteuid() == 0 else None

    def as_owner() -> None:
        if user is not None:
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)

    (root / "pw").write_text(password)
    if user is not None:
        for p in (root, root / "pw"):
            os.chown(p, user.pw_uid, user.pw_gid)
    data, port = root / "data", _free_port()
    run = dict(capture_output=True, text=True, timeout=120, preexec_fn=as_owner, cwd=root)
    subprocess.run(
        [bindir / "initdb", "-D", data, "-U", "rollout", "--auth=scram-sha-256",
         f"--pwfile={root / 'pw'}", "--no-sync"],
        check=True, **run,
    )  # fmt: skip
    (root / "pw").unlink()
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off"
    subprocess.run(
        [bindir / "pg_ctl", "-D", data, "-o", options, "-l", root / "log", "-w", "start"],
        check=True, **run,
    )  # fmt: skip
    try:
        yield f"postgresql://rollout:{password}@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([bindir / "pg_ctl", "-D", data, "-m", "immediate", "stop"], **run)
        shutil.rmtree(root, ignore_errors=True)
