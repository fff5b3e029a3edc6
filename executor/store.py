"""Where rollouts are recorded: one database (SQLite under `.rollout/` by default, Postgres by URL).

DBOS keeps its system tables there (workflow status, every step's output, messages); this module
adds a small index of rollouts (which application, from which version to which, the plan, the
outcome) so that `rollout status ID` can name an id that does not exist, and `rollout deploy`
can find a rollout still in progress for the same application.

Which process runs a rollout is tracked with one lock file per controller process
(`.rollout/executors/<executor id>.lock`, held with flock for the process's life): a workflow
whose executor holds no lock has lost its controller and may be taken over. Locks are local
files, so controllers sharing a Postgres store must run on one host.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import sqlalchemy as sa

from rollout.errors import InputError, mask_secrets

_META = sa.MetaData()
INDEX = sa.Table(
    "rollout_index",
    _META,
    sa.Column("id", sa.String(120), primary_key=True),
    sa.Column("app", sa.String(64), nullable=False, index=True),
    sa.Column("from_version", sa.String(64), nullable=True),
    sa.Column("to_version", sa.String(64), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("plan", sa.Text, nullable=False),
    sa.Column("outcome", sa.String(32), nullable=True),
    sa.Column("finished_at", sa.Float, nullable=True),
)


def home() -> Path:
    """The `.rollout/` folder: `$ROLLOUT_HOME`, else `.rollout` in the working directory."""
    return Path(os.environ.get("ROLLOUT_HOME") or ".rollout").resolve()


def default_url() -> str:
    return f"sqlite:///{home() / 'rollout.sqlite'}"


def _known_stores_file() -> Path:
    return home() / "stores.json"


def mask_url(url: str) -> str:
    """The URL as it may be printed or recorded: without its password."""
    return mask_secrets(url)


def remember(url: str, deploy_file: Path) -> None:
    """Note which deploy file named a non-default store, so that `status ID` and `history ID`
    can find its rollouts. The URL itself (with its password) stays in that file only."""
    if url == default_url():
        return
    path = _known_stores_file()
    known = json.loads(path.read_text()) if path.exists() else []
    entry = {"store": mask_url(url), "deploy_file": str(deploy_file.resolve())}
    if entry not in known:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump([*known, entry], f)


def known_urls() -> list[str]:
    """`$ROLLOUT_STORE` if set, else the default store and the store of every deploy file that
    named one (read from that file again)."""
    if os.environ.get("ROLLOUT_STORE"):
        return [os.environ["ROLLOUT_STORE"]]
    from executor.deploy_file import load_deploy_file

    urls = [default_url()]
    path = _known_stores_file()
    for entry in json.loads(path.read_text()) if path.exists() else []:
        try:
            url = load_deploy_file(entry["deploy_file"]).store
        except (InputError, KeyError, TypeError):
            continue  # moved or rewritten since
        if url and mask_url(url) == entry.get("store") and url not in urls:
            urls.append(url)
    return urls


def _engine_url(url: str) -> str:
    if url.startswith("postgres://"):
        url = "postgresql://" + url.removeprefix("postgres://")
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return url


@dataclass(frozen=True)
class Record:
    id: str
    app: str
    from_version: str | None
    to_version: str
    created_at: float
    plan: str
    outcome: str | None
    finished_at: float | None


class Store:
    """The rollout index in one database; DBOS's tables live beside it."""

    def __init__(self, url: str | None = None, *, create: bool = True) -> None:
        self.url = url or default_url()
        if self.url.startswith("sqlite:///"):
            path = Path(self.url.removeprefix("sqlite:///"))
            if not create and not path.exists():
                raise FileNotFoundError(path)
            path.parent.mkdir(parents=True, exist_ok=True)
        postgres = _engine_url(self.url).startswith("postgresql")
        self.engine = sa.create_engine(
            _engine_url(self.url), connect_args={"connect_timeout": 5} if postgres else {}
        )
        try:
            if create:
                _META.create_all(self.engine)
            else:
                self.engine.connect().close()
        except sa.exc.DBAPIError as e:
            self.engine.dispose()
            why = str(e.orig or e).strip().splitlines()[0] if str(e.orig or e).strip() else ""
            raise InputError(f"cannot reach the store at {mask_url(self.url)}: {why}") from None

    def add(self, rec: Record) -> None:
        with self.engine.begin() as c:
            c.execute(INDEX.insert().values(**rec.__dict__))

    def get(self, rollout_id: str) -> Record | None:
        try:
            with self.engine.connect() as c:
                row = c.execute(INDEX.select().where(INDEX.c.id == rollout_id)).first()
        except sa.exc.OperationalError:  # a store without the index table
            return None
        return Record(**row._mapping) if row else None

    def active(self, app: str) -> list[Record]:
        with self.engine.connect() as c:
            rows = c.execute(
                INDEX.select()
                .where(INDEX.c.app == app, INDEX.c.outcome.is_(None))
                .order_by(INDEX.c.created_at)
            ).all()
        return [Record(**r._mapping) for r in rows]

    def all_active(self) -> list[Record]:
        with self.engine.connect() as c:
            rows = c.execute(INDEX.select().where(INDEX.c.outcome.is_(None))).all()
        return [Record(**r._mapping) for r in rows]

    def finish(self, rollout_id: str, outcome: str) -> None:
        """Idempotent: the first outcome recorded wins (a replayed step writes nothing new)."""
        with self.engine.begin() as c:
            c.execute(
                INDEX.update()
                .where(INDEX.c.id == rollout_id, INDEX.c.outcome.is_(None))
                .values(outcome=outcome, finished_at=time.time())
            )

    def dispose(self) -> None:
        self.engine.dispose()


def find(rollout_id: str) -> tuple[Store, Record]:
    """The store holding `rollout_id`; an unknown id is bad input, and so is a store that
    cannot be reached (it may hold the id)."""
    unreachable: list[str] = []
    for url in known_urls():
        try:
            store = Store(url, create=False)
        except FileNotFoundError:
            continue
        except InputError as e:
            unreachable.append(str(e))
            continue
        rec = store.get(rollout_id)
        if rec is not None:
            return store, rec
        store.dispose()
    if unreachable:
        raise InputError(f"{unreachable[0]} (rollout '{rollout_id}' may be recorded there)")
    raise InputError(f"unknown rollout id '{rollout_id}'")


def dbos_serializer():  # type: ignore[no-untyped-def]
    """DBOS's portable JSON for every workflow input, step output, event and message rollout
    stores, and no unpickling of a value tagged as pickled: write access to the store is then
    not code execution in controllers or in the terminals that read status."""
    from dbos import _serialization as ser

    class NoPickle(ser.DefaultSerializer):
        def deserialize(cls, serialized_data: str) -> object:
            raise TypeError("the store holds a pickled value; rollout reads JSON only")

    if not isinstance(ser.DBOSDefaultSerializer, NoPickle):  # DBOS looks it up per call
        ser.DBOSDefaultSerializer = NoPickle()
    return ser.DBOSPortableJSON


def new_rollout_id(app: str, version: str) -> str:
    return f"{app}-{version}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"


# ---- controller liveness --------------------------------------------------------------------


def new_executor_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def _lock_path(executor_id: str) -> Path:
    return home() / "executors" / f"{executor_id}.lock"


class ExecutorLock:
    """Held by a controller process for its whole life; the kernel drops it when it dies."""

    def __init__(self, executor_id: str) -> None:
        path = _lock_path(executor_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file: IO[str] = path.open("w")
        fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.file.write(json.dumps({"pid": os.getpid(), "started": time.time()}))
        self.file.flush()


def executor_alive(executor_id: str | None) -> bool:
    """False only when we can tell the controller is gone: its lock file is here and free."""
    if not executor_id:
        return False
    if not executor_id.startswith(socket.gethostname() + "-"):
        return True  # another host's controller: we cannot tell, so never take it over
    path = _lock_path(executor_id)
    if not path.exists():
        return False
    with path.open() as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def executor_pid(executor_id: str | None) -> int | None:
    if not executor_id:
        return None
    try:
        return int(json.loads(_lock_path(executor_id).read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return None
