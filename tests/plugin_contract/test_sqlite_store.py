"""The built-in SQLite store: the store conformance suite, then what only SQLite has."""

from __future__ import annotations

import itertools
import os
import sqlite3
import stat
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import keybroker_sqlite
import pytest
import trio
from keybroker_sqlite import SCHEMA_VERSION, SchemaError, SQLiteStore
from keybroker_sqlite import schema as sqlite_schema
from keybroker_sqlite import store as sqlite_store

from broker.config import parse_config
from broker.errors import AlreadyExists, InvalidArgument, Unavailable
from broker.keys import Classification, Key, KeyType
from broker.lifecycle import Transition, add_version, new_key, transition
from broker.store import Store
from broker.testing.store_suite import OpenStore, StoreConformance, make_key


class TestSQLiteStore(StoreConformance):
    """SQLiteStore passes the suite every store plugin runs."""

    @pytest.fixture
    def reopen(self, tmp_path: Path) -> OpenStore:
        async def open_store() -> Store:
            store = SQLiteStore(tmp_path / "data" / "keys.db")
            await store.open()
            return store

        return open_store

    @pytest.fixture
    async def store(self, reopen: OpenStore) -> AsyncIterator[Store]:
        store = await reopen()
        try:
            yield store
        finally:
            await store.aclose()


# --- helpers ------------------------------------------------------------------------


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "keys.db"


@pytest.fixture
async def opened(db_path: Path) -> AsyncIterator[SQLiteStore]:
    store = SQLiteStore(db_path)
    await store.open()
    try:
        yield store
    finally:
        await store.aclose()


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    """Prove the modes do not depend on the process umask being strict."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def raw(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


def on_disk(db_path: Path) -> bytes:
    """Everything SQLite keeps on disk for the database: main file, log and index."""
    return b"".join(p.read_bytes() for p in (db_path, db_path.with_name(db_path.name + "-wal")) if p.exists())


# --- files and settings -------------------------------------------------------------


@pytest.mark.usefixtures("permissive_umask")
async def test_directory_and_files_are_private(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "data" / "keys.db"
    store = SQLiteStore(path)
    await store.open()
    try:
        await store.insert_key(make_key("modes"))
        assert mode(path.parent) == 0o700
        for name in ("keys.db", "keys.db-wal", "keys.db-shm"):
            assert mode(path.parent / name) == 0o600, name
    finally:
        await store.aclose()


async def test_existing_loose_file_is_tightened(db_path: Path) -> None:
    db_path.parent.mkdir(mode=0o700)
    db_path.touch(mode=0o644)
    os.chmod(db_path, 0o644)
    store = SQLiteStore(db_path)
    await store.open()
    await store.aclose()
    assert mode(db_path) == 0o600


async def test_connection_settings(opened: SQLiteStore) -> None:
    assert await opened.pragmas() == {
        "journal_mode": "wal",
        "synchronous": 1,  # NORMAL: the store flushes the log after each commit itself
        "secure_delete": 1,
        "foreign_keys": 1,
        "user_version": SCHEMA_VERSION,
        "schema_version_known": SCHEMA_VERSION,
    }


# --- schema ---------------------------------------------------------------------------


async def test_empty_file_is_migrated_to_the_current_schema(db_path: Path) -> None:
    db_path.parent.mkdir(mode=0o700)
    db_path.touch(mode=0o600)
    store = SQLiteStore(db_path)
    await store.open()
    await store.aclose()
    with raw(db_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA application_id").fetchone()[0] == sqlite_schema.APPLICATION_ID
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_schema WHERE type = 'table'")}
        assert {"keys", "versions"} <= tables


async def test_newer_schema_is_refused(opened: SQLiteStore, db_path: Path) -> None:
    await opened.aclose()
    with raw(db_path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    store = SQLiteStore(db_path)
    with pytest.raises(SchemaError, match="newer"):
        await store.open()
    with pytest.raises(Unavailable):
        await store.get_key("anything")


async def test_foreign_databases_are_refused(tmp_path: Path) -> None:
    other_app = tmp_path / "other.db"
    with raw(other_app) as conn:
        conn.execute("PRAGMA application_id = 1234")
    unversioned = tmp_path / "unversioned.db"
    with raw(unversioned) as conn:
        conn.execute("CREATE TABLE notes (body TEXT)")
    for path in (other_app, unversioned):
        with pytest.raises(SchemaError, match=r"not a keybroker key store|no keybroker schema version"):
            await SQLiteStore(path).open()


async def test_later_migrations_apply_in_order_and_keep_keys(
    opened: SQLiteStore, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = make_key("migrated")
    await opened.insert_key(key)
    await opened.aclose()
    step = ("ALTER TABLE keys ADD COLUMN note TEXT", "UPDATE keys SET note = 'added by step 2'")
    monkeypatch.setattr(sqlite_schema, "MIGRATIONS", (*sqlite_schema.MIGRATIONS, step))
    monkeypatch.setattr(sqlite_schema, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    store = SQLiteStore(db_path)
    await store.open()
    try:
        assert await store.get_key("migrated") == key
    finally:
        await store.aclose()
    with raw(db_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
        assert conn.execute("SELECT note FROM keys").fetchall() == [("added by step 2",)]


async def test_every_index_the_schema_creates_serves_a_query(opened: SQLiteStore, db_path: Path) -> None:
    # An index no query reads only makes every insert and state change dearer
    # (keys_by_state, until schema version 3). The constraints' own indexes
    # (sqlite_autoindex_*) are left out: they enforce uniqueness.
    page_params = [
        {
            "prefix": prefix,
            "prefix_len": len(prefix),
            "after": after,
            "state": state,
            "limit": 100,
            "scheduled": scheduled,
        }
        for prefix, after, state, scheduled in itertools.product(
            ("", "a/"), (None, "a/b"), (None, "active"), (0, 1)
        )
    ]
    plans = [
        (query, params)
        for query in (sqlite_store._SELECT_PAGE, sqlite_store._SELECT_PAGE_VERSIONS)
        for params in page_params
    ]
    plans += [
        (sqlite_store._SELECT_KEY_BY_NAME, ("a",)),
        (sqlite_store._SELECT_KEY_BY_ID, (bytes(16),)),
        (sqlite_store._SELECT_VERSIONS, (bytes(16),)),
    ]
    explicit = "SELECT name FROM sqlite_schema WHERE type = 'index' AND sql IS NOT NULL"
    with raw(db_path) as conn:
        created = {name for (name,) in conn.execute(explicit)}
        read = {
            word
            for query, params in plans
            for row in conn.execute("EXPLAIN QUERY PLAN " + query, params)
            for word in row[3].split()
        }
    assert created - read == set()


# --- erasure, failures, plugin hook ----------------------------------------------------


def key_with_markers(name: str) -> tuple[Key, list[bytes]]:
    """A key of two versions whose material is easy to find on disk."""
    markers = [b"wrapped-material-v1:" + os.urandom(40), b"wrapped-material-v2:" + os.urandom(400)]
    first = new_key(
        key_id=os.urandom(16),
        name=name,
        key_type=KeyType.AES256_GCM,
        protection="software",
        classification=Classification.INTERNAL,
        material=markers[0],
        now=1_700_000_000,
    )
    return add_version(first, markers[1], first.created_at + 1), markers


async def destroy(store: SQLiteStore, key: Key) -> None:
    pending = transition(key, Transition.SCHEDULE_DESTROY, key.updated_at, pending_days=7)
    await store.replace_key(pending, expected_revision=key.revision)
    destroyed = transition(pending, Transition.DESTROY, pending.updated_at + 7 * 86_400)
    await store.replace_key(destroyed, expected_revision=pending.revision)


async def test_erasure_is_not_held_up_by_the_stores_own_reads(opened: SQLiteStore, db_path: Path) -> None:
    for i in range(40):
        await opened.insert_key(make_key(f"filler-{i}"))
    key, markers = key_with_markers("erase-me")
    await opened.insert_key(key)
    async with trio.open_nursery() as nursery:

        async def keep_reading() -> None:
            while True:
                await opened.list_keys(prefix="", limit=1000)
                await trio.sleep(0)

        nursery.start_soon(keep_reading)
        await trio.sleep(0.01)
        await destroy(opened, key)
        data = on_disk(db_path)
        nursery.cancel_scope.cancel()
    assert not any(m in data for m in markers)


async def test_erasure_kept_from_the_log_by_a_reader_is_finished_on_the_next_open(
    opened: SQLiteStore, db_path: Path
) -> None:
    key, markers = key_with_markers("erase-me")
    await opened.insert_key(key)
    # Another process's connection, open throughout (so closing the store
    # does not empty the log either), holds a snapshot during the erasure.
    other = raw(db_path)
    try:
        other.execute("BEGIN")
        other.execute("SELECT count(*) FROM keys").fetchall()
        await destroy(opened, key)
        assert any(m in on_disk(db_path) for m in markers)  # kept in the log meanwhile
        other.execute("COMMIT")
        await opened.aclose()
        reopened = SQLiteStore(db_path)
        await reopened.open()
        try:
            assert not any(m in on_disk(db_path) for m in markers)
        finally:
            await reopened.aclose()
    finally:
        other.close()


async def test_erased_material_leaves_no_trace_on_disk(opened: SQLiteStore, db_path: Path) -> None:
    key, markers = key_with_markers("erase-me")
    await opened.insert_key(key)
    assert all(m in on_disk(db_path) for m in markers)

    await destroy(opened, key)
    data = on_disk(db_path)
    assert not any(m in data for m in markers)
    await opened.aclose()
    assert not any(m in on_disk(db_path) for m in markers)


async def test_lock_held_too_long_is_unavailable(opened: SQLiteStore, db_path: Path) -> None:
    slow = SQLiteStore(db_path, busy_timeout_s=0.05)
    await slow.open()
    blocker = raw(db_path)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        with pytest.raises(Unavailable, match="locked") as caught:
            await slow.insert_key(make_key("blocked"))
        assert "blocked" not in str(caught.value)
        blocker.execute("ROLLBACK")
        await slow.insert_key(make_key("blocked"))
        assert await opened.get_key("blocked") is not None
    finally:
        blocker.close()
        await slow.aclose()


async def test_a_lock_released_in_time_is_waited_for(opened: SQLiteStore, db_path: Path) -> None:
    blocker = raw(db_path)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(opened.insert_key, make_key("waited"))
            await trio.sleep(0.1)
            assert await opened.get_key("waited") is None
            blocker.execute("ROLLBACK")
        assert await opened.get_key("waited") is not None
    finally:
        blocker.close()


async def test_a_change_returns_only_once_its_log_is_flushed(
    opened: SQLiteStore, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The writer commits without fsync (synchronous = NORMAL): what makes a
    # change durable is the flush of the log that follows the commit.
    log = db_path.with_name(db_path.name + "-wal")
    flushed: list[tuple[int, int]] = []
    real = keybroker_sqlite.store.fdatasync

    async def recording(fd: int) -> None:
        await real(fd)
        flushed.append((os.fstat(fd).st_ino, os.fstat(fd).st_size))

    monkeypatch.setattr(keybroker_sqlite.store, "fdatasync", recording)
    for name in ("one", "two"):
        await opened.insert_key(make_key(name))
        assert flushed[-1] == (log.stat().st_ino, log.stat().st_size)
    assert len(flushed) == 2


async def test_a_failed_flush_fails_the_change_and_every_later_one_until_reopened(
    opened: SQLiteStore, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(keybroker_sqlite.store, "fdatasync", failing)
    with pytest.raises(Unavailable, match="flush"):
        await opened.insert_key(make_key("unflushed"))
    monkeypatch.undo()
    # The kernel may have dropped what it failed to write: a later flush that
    # succeeds would acknowledge commits that recovery could not reach.
    with pytest.raises(Unavailable, match="until the broker restarts"):
        await opened.insert_key(make_key("after"))
    assert await opened.get_key("after") is None
    await opened.aclose()
    reopened = SQLiteStore(db_path)
    await reopened.open()
    try:
        await reopened.insert_key(make_key("flushed"))
        assert await reopened.get_key("flushed") is not None
    finally:
        await reopened.aclose()


async def test_the_log_is_checkpointed_into_the_database(opened: SQLiteStore, db_path: Path) -> None:
    # The writer never checkpoints inside a commit; the store does so in a
    # worker thread every CHECKPOINT_EVERY_GROUPS groups.
    before = db_path.stat().st_size
    for index in range(keybroker_sqlite.store.CHECKPOINT_EVERY_GROUPS + 1):
        await opened.insert_key(make_key(f"k{index}"))
    assert db_path.stat().st_size > before  # pages reached the main file


async def test_the_log_stays_bounded_under_steady_writes(
    opened: SQLiteStore, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SQLite writes the log from its start again only after a checkpoint
    # reached its end: the store checkpoints holding the writer, so that
    # the log of a busy broker does not grow without bound.
    monkeypatch.setattr(keybroker_sqlite.store, "CHECKPOINT_EVERY_GROUPS", 4)
    log = db_path.with_name(db_path.name + "-wal")

    async def writer(task: int) -> None:
        for index in range(150):
            await opened.insert_key(make_key(f"w/{task}/{index}"))

    async with trio.open_nursery() as nursery:
        for task in range(8):
            nursery.start_soon(writer, task)
    assert log.stat().st_size < 1 << 20, log.stat().st_size
    assert len(await opened.list_keys(prefix="w/", state=None, after=None, limit=1000)) == 1000


async def test_closed_store_is_unavailable(opened: SQLiteStore) -> None:
    await opened.aclose()
    with pytest.raises(Unavailable):
        await opened.get_key("x")
    with pytest.raises(Unavailable):
        await opened.insert_key(make_key("x"))


def test_hook_provides_the_store_only_when_configured(tmp_path: Path) -> None:
    store = keybroker_sqlite.kb_store(config=parse_config({}, data_dir=tmp_path / "d"))
    assert isinstance(store, SQLiteStore)
    assert store.path == tmp_path / "d" / "keys.db"
    tuned = keybroker_sqlite.kb_store(
        config=parse_config({"plugins": {"sqlite": {"busy_timeout_s": 0.5}}}, data_dir=tmp_path)
    )
    assert isinstance(tuned, SQLiteStore) and tuned.busy_timeout_s == 0.5
    assert keybroker_sqlite.kb_store(config=parse_config({"store": "postgres"}, data_dir=tmp_path)) is None
    for bad in ({"busy_timeout": 1}, {"busy_timeout_s": "soon"}, {"busy_timeout_s": -1}):
        with pytest.raises(InvalidArgument):
            keybroker_sqlite.kb_store(config=parse_config({"plugins": {"sqlite": bad}}, data_dir=tmp_path))


# --- group commit ---------------------------------------------------------------------


async def test_concurrent_changes_share_commits_and_fail_alone(opened: SQLiteStore) -> None:
    writer = opened._write_conn()
    assert writer.conn is not None
    commits: list[str] = []
    writer.conn.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)
    names = [f"g/{i}" for i in range(30)] + ["g/3", "g/7"]  # two duplicates among them
    outcomes: dict[int, str] = {}

    async def insert(index: int, name: str) -> None:
        try:
            await opened.insert_key(make_key(name))
            outcomes[index] = "ok"
        except AlreadyExists:
            outcomes[index] = "exists"

    async with trio.open_nursery() as nursery:
        for index, name in enumerate(names):
            nursery.start_soon(insert, index, name)
    writer.conn.set_trace_callback(None)
    # Of each duplicated name exactly one insert won; every other insert is intact.
    for name in set(names):
        indexes = [i for i, n in enumerate(names) if n == name]
        assert sorted(outcomes[i] for i in indexes) == sorted(["ok"] + ["exists"] * (len(indexes) - 1))
    assert len(commits) < len(names)  # shared transactions
    stored = await opened.list_keys(prefix="g/", state=None, after=None, limit=100)
    assert sorted(k.name for k in stored) == sorted(set(names))


async def test_a_change_cancelled_while_queued_is_not_written(
    opened: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = trio.Event()
    real = keybroker_sqlite.store.fdatasync

    async def slow_flush(fd: int) -> None:
        await release.wait()
        await real(fd)

    monkeypatch.setattr(keybroker_sqlite.store, "fdatasync", slow_flush)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(opened.insert_key, make_key("g/first"))
        await trio.sleep(0.05)  # the first change holds the writer, flushing
        with trio.move_on_after(0.05):
            await opened.insert_key(make_key("g/cancelled"))
        release.set()
    assert await opened.get_key("g/first") is not None
    assert await opened.get_key("g/cancelled") is None
    await opened.insert_key(make_key("g/after"))  # the writer is usable again
    assert await opened.get_key("g/after") is not None


class _FailingCommit:
    """The writer connection, except that COMMIT fails as on a full disk."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    @property
    def in_transaction(self) -> bool:
        return self._conn.in_transaction

    def execute(self, sql: str, *args: object) -> sqlite3.Cursor:
        if sql == "COMMIT":
            raise sqlite3.OperationalError("database or disk is full")
        return self._conn.execute(sql, *args)

    def __getattr__(self, name: str) -> object:
        return getattr(self._conn, name)


async def test_a_failed_commit_fails_every_change_of_its_group(opened: SQLiteStore) -> None:
    writer = opened._write_conn()
    real = writer.conn
    assert real is not None
    writer.conn = _FailingCommit(real)  # type: ignore[assignment]
    errors: list[str] = []

    async def insert(name: str) -> None:
        try:
            await opened.insert_key(make_key(name))
        except Unavailable as exc:
            errors.append(str(exc))

    async with trio.open_nursery() as nursery:
        for i in range(3):
            nursery.start_soon(insert, f"g/full{i}")
    writer.conn = real
    assert errors == ["the key store is unavailable: database or disk is full"] * 3
    for i in range(3):
        assert await opened.get_key(f"g/full{i}") is None
    await opened.insert_key(make_key("g/full0"))  # rolled back cleanly: the name is free
