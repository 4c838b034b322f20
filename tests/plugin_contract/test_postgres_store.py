"""The PostgreSQL store: the store and document conformance suites, then what only it has.

Every test runs against a real server (tests/pg_fixtures.py) in a fresh
database.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from broker.config import parse_config
from broker.errors import InvalidArgument, StaleRevision, Unavailable
from broker.lifecycle import add_version
from broker.store import Store
from broker.testing.document_suite import DocumentConformance
from broker.testing.store_suite import OpenStore, StoreConformance, make_key, material
from tests import pg_fixtures
from tests.conftest import require
from tests.pg_fixtures import PgServer

try:
    import keybroker_postgres
    import psycopg
    from keybroker_postgres import PostgresStore, SchemaError, parse_options
    from keybroker_postgres import schema as pg_schema
except ImportError:  # without the postgres extra: every test skips, or fails in CI
    HAVE_PSYCOPG = False
else:
    HAVE_PSYCOPG = True

pg_server = pg_fixtures.pg_server
pg_dsn = pg_fixtures.pg_dsn


@pytest.fixture(autouse=True)
def _needs_psycopg() -> None:
    require(HAVE_PSYCOPG, "psycopg (the postgres extra)")


def make_store(dsn: str, **options: object) -> PostgresStore:
    return PostgresStore(parse_options({"dsn": dsn, **options}), node="test")


@pytest.fixture
def reopen(pg_dsn: str) -> OpenStore:
    async def open_store() -> Store:
        store = make_store(pg_dsn)
        await store.open()
        return store

    return open_store


@pytest.fixture
async def store(reopen: OpenStore) -> AsyncIterator[Store]:
    opened = await reopen()
    try:
        yield opened
    finally:
        await opened.aclose()


class TestPostgresStore(StoreConformance):
    """PostgresStore passes the suite every store plugin runs."""

    @pytest.fixture
    def reopen(self, reopen: OpenStore) -> OpenStore:
        return reopen

    @pytest.fixture
    async def store(self, store: Store) -> AsyncIterator[Store]:
        yield store


class TestPostgresDocuments(DocumentConformance):
    """And the document suite."""

    @pytest.fixture
    def reopen(self, reopen: OpenStore) -> OpenStore:
        return reopen

    @pytest.fixture
    async def store(self, store: Store) -> AsyncIterator[Store]:
        yield store


# --- configuration --------------------------------------------------------------------


def test_options_defaults_and_checks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parsed = parse_options({"dsn": "host=db dbname=kb"})
    assert (parsed.pool_min, parsed.pool_max, parsed.connect_timeout_s) == (1, 4, 5)
    assert (parsed.statement_timeout_s, parsed.call_timeout_s, parsed.leader_retry_s) == (10.0, 30.0, 2.0)
    for bad in (
        {},
        {"dsn": "host=a", "dsn_env": "X"},
        {"dsn": "host=a", "pool_max": 0},
        {"dsn": "host=a", "pool_min": 5, "pool_max": 2},
        {"dsn": "host=a", "connect_timeout_s": 1},
        {"dsn": "host=a", "statement_timeout_s": "10"},
        {"dsn": "host=a", "leader_retry_s": True},
        {"dsn": "host=a", "colour": "red"},
        {"dsn": "host"},
        {"dsn_env": "KB_TEST_UNSET_DSN"},
        {"dsn_file": str(tmp_path / "missing")},
    ):
        with pytest.raises(InvalidArgument):
            parse_options(bad)
    (tmp_path / "dsn").write_text("host=from-file dbname=kb password=hunter2\n")
    from_file = parse_options({"dsn_file": str(tmp_path / "dsn")})
    assert from_file.dsn.param("host") == "from-file"
    monkeypatch.setenv("KB_TEST_DSN", "host=from-env")
    assert parse_options({"dsn_env": "KB_TEST_DSN"}).dsn.param("host") == "from-env"


def test_the_password_never_shows() -> None:
    secret = "s3cr3t-pw"
    options = parse_options({"dsn": f"postgresql://kb:{secret}@db.internal:5433/keys"})
    store = PostgresStore(options, node="n1")
    shown = [repr(options), str(options.dsn), repr(store), repr(store.pool), options.dsn.where()]
    assert all(secret not in text for text in shown), shown
    assert options.dsn.redact(f"failed for {secret}!") == "failed for ***!"
    with pytest.raises(InvalidArgument) as info:
        parse_options({"dsn": f"host=x password={secret} port"})
    assert secret not in str(info.value)


def test_the_hook_selects_the_store_and_its_cluster(tmp_path: Path) -> None:
    config = parse_config(
        {"store": "postgres", "node": "n1", "plugins": {"postgres": {"dsn": "host=db"}}}, data_dir=tmp_path
    )
    found = keybroker_postgres.kb_store(config=config)
    assert isinstance(found, PostgresStore) and found.node == "n1"
    cluster = keybroker_postgres.kb_cluster(config=config, store=found)
    assert isinstance(cluster, keybroker_postgres.PostgresCluster)
    sqlite_config = parse_config({}, data_dir=tmp_path)
    assert keybroker_postgres.kb_store(config=sqlite_config) is None
    assert keybroker_postgres.kb_cluster(config=sqlite_config, store=object()) is None  # type: ignore[arg-type]


# --- what only PostgreSQL has -----------------------------------------------------------


async def test_schema_is_versioned_and_runs_with_fsync_and_timeouts(pg_dsn: str) -> None:
    store = make_store(pg_dsn, statement_timeout_s=7.5)
    await store.open()
    try:
        found = await store.settings()
    finally:
        await store.aclose()
    assert found["schema_version"] == found["schema_version_known"] == pg_schema.SCHEMA_VERSION
    assert found["fsync"] == "on" and found["synchronous_commit"] == "on"
    assert found["statement_timeout"] == "7500ms"
    # Over TCP, the server notices a broker cut off by the network (and drops its locks) within seconds.
    assert found["tcp_keepalives_idle"] == "5"


async def test_newer_or_foreign_schema_is_refused(pg_server: PgServer, pg_dsn: str) -> None:
    store = make_store(pg_dsn)
    await store.open()
    await store.aclose()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("UPDATE keybroker.meta SET schema_version = 99")
    with pytest.raises(SchemaError, match="newer"):
        await make_store(pg_dsn).open()
    other = pg_server.create_database()
    try:
        with psycopg.connect(other, autocommit=True) as conn:
            conn.execute("CREATE SCHEMA keybroker")
            conn.execute("CREATE TABLE keybroker.something (x int)")
        with pytest.raises(SchemaError, match="no keybroker schema version"):
            await make_store(other).open()
    finally:
        pg_server.drop_database(other)


async def test_brokers_starting_together_migrate_once(pg_dsn: str) -> None:
    stores = [make_store(pg_dsn) for _ in range(4)]
    async with trio.open_nursery() as nursery:
        for s in stores:
            nursery.start_soon(s.open)
    for s in stores:
        await s.aclose()
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT schema_version FROM keybroker.meta").fetchall() == [(1,)]


async def test_changes_are_announced_in_their_transaction(pg_dsn: str, store: PostgresStore) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as listener:
        listener.execute("LISTEN keybroker_keys")
        key = make_key("announced")
        await store.insert_key(key)
        new = add_version(key, material(key.name, 2), key.updated_at + 1)
        await store.replace_key(new, expected_revision=key.revision)
        with pytest.raises(StaleRevision):
            await store.replace_key(new, expected_revision=key.revision)
        await store.reserve_uses(key.id, 2, 10, None)
        got = [json.loads(n.payload) for n in listener.notifies(timeout=1.0)]
    # One per committed change; none for the refused write or the reservation.
    assert [g["name"] for g in got] == ["announced", "announced"]
    assert all(g["broker"] == store.instance and g["node"] == "test" for g in got)


async def test_concurrent_rotations_on_two_stores_never_share_a_version(pg_dsn: str) -> None:
    a, b = make_store(pg_dsn), make_store(pg_dsn)
    await a.open()
    await b.open()
    try:
        await a.insert_key(make_key("race"))
        written: list[int] = []

        async def rotate(store: PostgresStore, count: int) -> None:
            done = 0
            while done < count:
                key = await store.get_key("race")
                assert key is not None
                new = add_version(key, material("race", key.primary_version + 1), key.updated_at + 1)
                try:
                    await store.replace_key(new, expected_revision=key.revision)
                except StaleRevision:
                    continue
                written.append(new.primary_version)
                done += 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(rotate, a, 40)
            nursery.start_soon(rotate, b, 40)
        final = await a.get_key("race")
    finally:
        await a.aclose()
        await b.aclose()
    assert final is not None
    assert sorted(written) == list(range(2, 82))
    assert [v.number for v in final.versions] == list(range(1, 82))


async def test_reservations_across_stores_never_pass_the_limit(pg_dsn: str) -> None:
    stores = [make_store(pg_dsn, pool_max=3) for _ in range(3)]
    for s in stores:
        await s.open()
    try:
        key = make_key("metered")
        await stores[0].insert_key(key)
        granted: list[int] = []

        async def take(store: PostgresStore) -> None:
            while (got := await store.reserve_uses(key.id, 1, 7, 500)) > 0:
                granted.append(got)

        async with trio.open_nursery() as nursery:
            for s in stores:
                for _ in range(3):
                    nursery.start_soon(take, s)
        stored = await stores[1].get_key("metered")
    finally:
        for s in stores:
            await s.aclose()
    assert sum(granted) == 500
    assert stored is not None and stored.version(1) is not None and stored.versions[0].uses == 500


async def test_unreachable_server_is_unavailable_quickly_and_quietly() -> None:
    port = pg_fixtures._free_port()
    store = make_store(f"host=127.0.0.1 port={port} dbname=x user=kb password=hunter2", connect_timeout_s=2)
    with trio.fail_after(10):
        with pytest.raises(Unavailable) as info:
            await store.open()
    assert "hunter2" not in str(info.value) and "hunter2" not in repr(info.value)


async def test_dead_idle_connections_are_replaced_without_failing_a_call(
    pg_server: PgServer, pg_dsn: str, store: PostgresStore
) -> None:
    key = make_key("survivor")
    await store.insert_key(key)
    # Every idle session of the store dies (as on a server restart).
    with psycopg.connect(pg_server.dsn(), autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (pg_dsn.rsplit("dbname=", 1)[1],),
        )
    await trio.sleep(0.2)
    connects = store.pool.connects
    assert await store.get_key("survivor") is not None
    assert store.pool.connects == connects + 1


async def test_a_statement_past_its_timeout_is_unavailable(pg_dsn: str) -> None:
    store = make_store(pg_dsn, statement_timeout_s=0.2)
    await store.open()
    try:
        with pytest.raises(Unavailable, match="statement timeout"):
            await store.pool.run(lambda c: c.execute("SELECT pg_sleep(2)"))
        # The connection is still good for the next call.
        assert await store.get_key("none") is None
    finally:
        await store.aclose()


async def test_a_call_past_call_timeout_is_abandoned(pg_dsn: str) -> None:
    store = make_store(pg_dsn, call_timeout_s=0.3, pool_max=1)
    await store.open()
    try:
        start = trio.current_time()
        with pytest.raises(Unavailable, match="did not answer"):
            await store.pool.run(lambda c: c.execute("SELECT pg_sleep(1)"))
        assert trio.current_time() - start < 0.9
    finally:
        await store.aclose()
        # The abandoned thread finishes its statement and hands its connection back.
        await trio.sleep(1.0)


@pytest.mark.skipif(os.geteuid() != 0, reason="checks the root-only server start")
def test_fixture_runs_the_server_unprivileged(pg_server: PgServer) -> None:
    with psycopg.connect(pg_server.dsn()) as conn:
        user = conn.execute("SELECT current_setting('data_directory')").fetchone()
    assert user is not None
    assert pg_server.data.stat().st_uid != 0
