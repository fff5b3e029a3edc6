"""Where rollouts are recorded: one database (SQLite under `.rollout/` by default, Postgres by URL).

DBOS keeps its system tables there (workflow status, every step's output, messages); this module
adds a small index of rollouts (which application, from which version to which, the plan, the
outcome) so that `rollout status ID` can name an id that does not exist, and `rollout deploy`
can find a rollout still in progress for the same application.

The index enforces one rollout in progress per model and cluster (a unique index over the
rows without an outcome), so of two deploys started together exactly one is recorded.

Which process runs a rollout is a lease on its row: the controller writes its id and an
expiry, and renews it from a heartbeat thread; a rollout whose lease expired has lost its
controller and may be taken over from any host or folder, one whose lease is live never is.
Expiry is judged by the database's clock, so hosts with skewed clocks agree.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    sa.Column("cluster", sa.String(200), nullable=True),  # the Ray address it runs on
    sa.Column("holder", sa.String(64), nullable=True),  # the controller holding the lease
    sa.Column("holder_info", sa.Text, nullable=True),  # JSON: pid, host, folder (for people)
    sa.Column("lease_until", sa.Float, nullable=True),  # epoch seconds, the database's clock
)
# What the controller observed, for `rollout export` (executor/recording.py writes them): each
# replica's lifecycle, one row per (replica, event) with the first time it was seen, and the
# per-version counts at every change, in the simulator's timeline columns.
REPLICA_EVENTS = sa.Table(
    "rollout_replica_events",
    _META,
    sa.Column("rollout_id", sa.String(120), primary_key=True),
    sa.Column("app", sa.String(64), primary_key=True),
    sa.Column("replica_id", sa.String(64), primary_key=True),
    sa.Column("event", sa.String(16), primary_key=True),  # created placed running ready ...
    sa.Column("role", sa.String(16), nullable=False),  # current | candidate
    sa.Column("t", sa.Float, nullable=False),  # epoch seconds
)
_COUNT_COLUMNS = ("current_ready", "current_starting", "current_draining", "candidate_ready",
                  "candidate_starting", "candidate_draining", "pending_gpu")  # fmt: skip
OBSERVATIONS = sa.Table(
    "rollout_observations",
    _META,
    sa.Column("rollout_id", sa.String(120), primary_key=True),
    sa.Column("t", sa.Float, primary_key=True),  # epoch seconds
    *(sa.Column(name, sa.Integer, nullable=False) for name in _COUNT_COLUMNS),
    sa.Column("gpus_in_use", sa.Float, nullable=False),
    sa.Column("candidate_weight", sa.Float, nullable=False),
    sa.Column("desired_replicas", sa.Integer, nullable=False),
    sa.Column("step", sa.Integer, nullable=False),
)
ONE_ACTIVE = sa.Index(
    "rollout_one_active",
    INDEX.c.app,
    INDEX.c.cluster,
    unique=True,
    sqlite_where=INDEX.c.outcome.is_(None),
    postgresql_where=INDEX.c.outcome.is_(None),
)


def _now(engine: sa.Engine) -> sa.ColumnElement[float]:
    """Now, in epoch seconds, by the database's clock."""
    if engine.dialect.name == "sqlite":
        return sa.literal_column("((julianday('now') - 2440587.5) * 86400.0)")
    return sa.literal_column("extract(epoch from clock_timestamp())")


def _migrate(engine: sa.Engine) -> None:
    """Add the columns and index a store made by an earlier version lacks."""
    have = {c["name"] for c in sa.inspect(engine).get_columns(INDEX.name)}
    with engine.begin() as c:
        for col in INDEX.columns:
            if col.name not in have:
                kind = col.type.compile(dialect=engine.dialect)
                c.execute(sa.text(f"ALTER TABLE {INDEX.name} ADD COLUMN {col.name} {kind}"))
    ONE_ACTIVE.create(engine, checkfirst=True)


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
    cluster: str | None = None
    holder: str | None = None
    holder_info: str | None = None
    lease_until: float | None = None


@dataclass(frozen=True)
class Lease:
    """Who runs a rollout and until when (`live`: not expired by the database's clock)."""

    holder: str | None
    info: dict[str, Any]
    until: float | None
    live: bool

    def describe(self) -> str:
        i = self.info
        who = f"pid {i.get('pid')} on {i.get('host')} in {i.get('folder')}"
        when = time.strftime("%H:%M:%S", time.localtime(self.until or 0))
        return f"{who}, lease until {when}" if self.live else f"{who}, lease expired {when}"


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
                _migrate(self.engine)
            else:
                self.engine.connect().close()
        except sa.exc.DBAPIError as e:
            self.engine.dispose()
            why = str(e.orig or e).strip().splitlines()[0] if str(e.orig or e).strip() else ""
            raise InputError(f"cannot reach the store at {mask_url(self.url)}: {why}") from None

    def add(self, rec: Record) -> None:
        """Record a rollout in progress; one of the same model and cluster is bad input."""
        try:
            with self.engine.begin() as c:
                c.execute(INDEX.insert().values(**rec.__dict__))
        except sa.exc.IntegrityError:
            other = next((r for r in self.active(rec.app) if r.cluster == rec.cluster), rec)
            raise InputError(
                f"rollout {other.id} of {rec.app} ({other.from_version or 'nothing'} → "
                f"{other.to_version}) is still in progress on {rec.cluster}; wait for it or run "
                f"`rollout cancel {other.id}`"
            ) from None

    # ---- leases ------------------------------------------------------------------------------

    def take_lease(self, rollout_id: str, holder: str, info: dict[str, Any], ttl_s: float) -> bool:
        """Hold the rollout's lease if it is free, expired or already ours; False if another
        controller holds a live one. Atomic: of two takers at most one succeeds."""
        now = _now(self.engine)
        free = sa.or_(
            INDEX.c.holder.is_(None),
            INDEX.c.holder == holder,
            INDEX.c.lease_until.is_(None),
            INDEX.c.lease_until < now,
        )
        with self.engine.begin() as c:
            got = c.execute(
                INDEX.update()
                .where(INDEX.c.id == rollout_id, INDEX.c.outcome.is_(None), free)
                .values(holder=holder, holder_info=json.dumps(info), lease_until=now + ttl_s)
            )
        return got.rowcount == 1

    def renew(self, rollout_id: str, holder: str, ttl_s: float) -> bool:
        """Extend our lease; False once another controller took it (or the rollout ended)."""
        with self.engine.begin() as c:
            got = c.execute(
                INDEX.update()
                .where(INDEX.c.id == rollout_id, INDEX.c.holder == holder)
                .values(lease_until=_now(self.engine) + ttl_s)
            )
        return got.rowcount == 1

    def release(self, rollout_id: str, holder: str) -> None:
        """Give the lease up at once (the holder stays recorded, for `status`)."""
        with self.engine.begin() as c:
            c.execute(
                INDEX.update()
                .where(INDEX.c.id == rollout_id, INDEX.c.holder == holder)
                .values(lease_until=0.0)
            )

    def lease(self, rollout_id: str) -> Lease:
        with self.engine.connect() as c:
            row = c.execute(
                sa.select(
                    INDEX.c.holder, INDEX.c.holder_info, INDEX.c.lease_until,
                    _now(self.engine).label("now"),
                ).where(INDEX.c.id == rollout_id)
            ).first()  # fmt: skip
        if row is None or row.holder is None:
            return Lease(None, {}, None, False)
        until = row.lease_until
        live = until is not None and until > row.now
        return Lease(row.holder, json.loads(row.holder_info or "{}"), until, live)

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

    def latest(self, app: str) -> Record | None:
        """The model's most recent rollout (or first deploy), ended or not."""
        try:
            with self.engine.connect() as c:
                row = c.execute(
                    INDEX.select().where(INDEX.c.app == app).order_by(INDEX.c.created_at.desc())
                ).first()
        except sa.exc.OperationalError:  # a store without the index table
            return None
        return Record(**row._mapping) if row else None

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

    # ---- what the controller observed -------------------------------------------------------

    def record(self, observation: dict[str, Any] | None, replica_events: list[dict[str, Any]]):
        """Add an observation row and replica events; a row already recorded (a step run again)
        is left as it is."""
        insert = _insert_ignore(self.engine)
        with self.engine.begin() as c:
            if observation is not None:
                c.execute(insert(OBSERVATIONS).values(**observation))
            if replica_events:
                c.execute(insert(REPLICA_EVENTS), replica_events)

    def observations(self, rollout_id: str) -> list[dict[str, Any]]:
        return self._rows(OBSERVATIONS, rollout_id)

    def replica_events(self, rollout_id: str) -> list[dict[str, Any]]:
        return self._rows(REPLICA_EVENTS, rollout_id)

    def _rows(self, table: sa.Table, rollout_id: str) -> list[dict[str, Any]]:
        """The rollout's rows of `table`, oldest first."""
        with self.engine.connect() as c:
            rows = c.execute(
                table.select().where(table.c.rollout_id == rollout_id).order_by(table.c.t)
            ).all()
        return [dict(r._mapping) for r in rows]

    def dispose(self) -> None:
        self.engine.dispose()


def _insert_ignore(engine: sa.Engine):  # type: ignore[no-untyped-def]
    """INSERT … ON CONFLICT DO NOTHING in the store's dialect."""
    if engine.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return lambda table: insert(table).on_conflict_do_nothing()


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


def find_latest(app: str) -> tuple[Store, Record] | None:
    """The store and record of the model's most recent rollout across the known stores."""
    best: tuple[Store, Record] | None = None
    for url in known_urls():
        try:
            store = Store(url, create=False)
        except (FileNotFoundError, InputError):
            continue
        rec = store.latest(app)
        if rec is not None and (best is None or rec.created_at > best[1].created_at):
            if best is not None:
                best[0].dispose()
            best = (store, rec)
        else:
            store.dispose()
    return best


def dbos_serializer():  # type: ignore[no-untyped-def]
    """DBOS's portable JSON for every workflow input, step output, event and message rollout
    stores, and no unpickling of a value tagged as pickled: write access to the store is then
    not code execution in controllers or in the terminals that read status."""
    from dbos import _serialization as ser

    class NoPickle(ser.DefaultSerializer):
        def deserialize(cls, serialized_data: str) -> object:
            raise InputError("the store holds a pickled value; rollout reads JSON only")

    if not isinstance(ser.DBOSDefaultSerializer, NoPickle):  # DBOS looks it up per call
        ser.DBOSDefaultSerializer = NoPickle()
    return ser.DBOSPortableJSON


def new_rollout_id(app: str, version: str) -> str:
    return f"{app}-{version}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"


# ---- controllers ---------------------------------------------------------------------------


def new_executor_id() -> str:
    """A controller process's DBOS executor id: unique, and naming no host or folder."""
    return f"ctl-{uuid.uuid4().hex[:16]}"


def holder_info() -> dict[str, Any]:
    """Who a controller is, for people reading `rollout status` (nothing decides by it)."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "folder": os.getcwd()}


def lease_s() -> float:
    """How long a lease lasts without renewal (the heartbeat renews it three times as often)."""
    return float(os.environ.get("ROLLOUT_LEASE_S", "15"))
