"""The rollout store on SQLite and on a real PostgreSQL server: one rollout in progress per model
and cluster, leases taken, renewed, expired and refused, by the database's clock."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from postgres_fixture import postgres_url

from executor import store
from rollout.errors import InputError

__all__ = ["postgres_url"]


@pytest.fixture(params=["sqlite", "postgres"])
def st(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[store.Store]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'rollout.sqlite'}"
    else:
        url = request.getfixturevalue("postgres_url")
    s = store.Store(url)
    with s.engine.begin() as c:  # each test starts from an empty index
        c.execute(store.INDEX.delete())
    yield s
    s.dispose()


def record(rollout_id: str, app: str = "chat", cluster: str = "127.0.0.1:6379") -> store.Record:
    return store.Record(
        id=rollout_id, app=app, from_version="v1", to_version=rollout_id, created_at=time.time(),
        plan=json.dumps({"address": cluster}), outcome=None, finished_at=None, cluster=cluster,
    )  # fmt: skip


def test_one_rollout_in_progress_per_model_and_cluster(st: store.Store) -> None:
    st.add(record("a"))
    with pytest.raises(InputError) as e:
        st.add(record("b"))
    assert str(e.value) == (
        "rollout a of chat (v1 → a) is still in progress on 127.0.0.1:6379; wait for it or "
        "run `rollout cancel a`"
    )
    st.add(record("c", cluster="10.0.0.2:6379"))  # another cluster
    st.add(record("d", app="other"))  # another model
    st.finish("a", "succeeded")
    st.add(record("b"))  # once it ended
    assert [r.id for r in st.active("chat")] == ["c", "b"]  # in order of creation


def test_of_many_concurrent_claims_exactly_one_wins(st: store.Store) -> None:
    results: list[str] = []

    def claim(i: int) -> None:
        try:
            st.add(record(f"r{i}"))
            results.append("won")
        except InputError:
            results.append("refused")

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["refused"] * 5 + ["won"]


def test_leases_expire_and_are_taken_over_but_a_live_one_never(st: store.Store) -> None:
    st.add(record("a"))
    assert st.lease("a") == store.Lease(None, {}, None, False)
    info = {"pid": 1, "host": "old-host", "folder": "/one"}
    assert st.take_lease("a", "ctl-1", info, ttl_s=1.0)
    lease = st.lease("a")
    assert lease.live and lease.holder == "ctl-1" and lease.info == info
    assert "pid 1 on old-host in /one, lease until" in lease.describe()
    assert not st.take_lease("a", "ctl-2", {"host": "new-host"}, ttl_s=1.0)  # live: refused
    assert st.renew("a", "ctl-1", ttl_s=1.0)
    assert not st.renew("a", "ctl-2", ttl_s=1.0)
    time.sleep(1.3)  # ctl-1 died (or its host was renamed): nothing renews it
    assert not st.lease("a").live
    assert st.take_lease("a", "ctl-2", {"host": "new-host"}, ttl_s=5.0)
    assert st.lease("a").holder == "ctl-2"
    assert not st.renew("a", "ctl-1", ttl_s=5.0)  # the old holder learns it lost the lease
    st.release("a", "ctl-2")
    assert not st.lease("a").live
    st.finish("a", "succeeded")
    assert not st.take_lease("a", "ctl-3", {}, ttl_s=5.0)  # an ended rollout has no lease


def test_a_store_from_before_leases_gains_the_new_columns(tmp_path: Path) -> None:
    import sqlalchemy as sa

    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    engine = sa.create_engine(url)
    with engine.begin() as c:
        c.execute(
            sa.text(
                "CREATE TABLE rollout_index (id VARCHAR(120) PRIMARY KEY, app VARCHAR(64) NOT "
                "NULL, from_version VARCHAR(64), to_version VARCHAR(64) NOT NULL, created_at "
                "FLOAT NOT NULL, plan TEXT NOT NULL, outcome VARCHAR(32), finished_at FLOAT)"
            )
        )
        c.execute(sa.text("INSERT INTO rollout_index VALUES ('old', 'chat', NULL, 'v1', 1, '{}', "
                          "'succeeded', 2)"))  # fmt: skip
    engine.dispose()
    st = store.Store(url)
    old = st.get("old")
    assert old is not None and old.outcome == "succeeded" and old.cluster is None
    st.add(record("new"))
    assert st.take_lease("new", "ctl-1", {}, ttl_s=5.0)
