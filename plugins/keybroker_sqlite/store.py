"""SQLiteStore: keybroker's embedded key store, one SQLite file in WAL mode.

Resource handling: the store owns two connections. Every write goes through
the *writer*, one at a time (a ``trio.Lock``), each state change in one
``BEGIN IMMEDIATE ... COMMIT`` transaction. Changes that arrive while one is
being written share the next transaction (group commit: one commit, one
fsync), each in its own savepoint, so one change failing never affects
another and each caller learns only its own outcome; reads go through a second,
read-only connection, each in its own read transaction so a key and its
versions always come from the same snapshot. SQLite calls block, so each
runs in a worker thread (``trio.to_thread.run_sync``); a connection is only
ever used by one thread at a time because its lock is held across the call.

Cancellation: a worker thread cannot be interrupted, so a cancelled call
still lets its statement finish (a change commits or rolls back whole)
before the cancellation is delivered.

Error handling: SQLite failures of the medium (I/O error, disk full, locked
past the busy timeout, corruption) become :class:`broker.errors.Unavailable`
naming the SQLite error code, never the statement or its values.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Final, TypeVar, final

import trio

from broker.durable import fdatasync
from broker.errors import AlreadyExists, NotFound, Unavailable
from broker.keys import Key, KeyState
from broker.store import check_document_ref, key_columns, key_from_columns, lost_replace, version_columns

from .schema import SCHEMA_VERSION, migrate

log = logging.getLogger("keybroker.sqlite")

__all__ = ["DB_FILE_NAME", "DIR_MODE", "FILE_MODE", "SQLiteStore"]

DB_FILE_NAME: Final = "keys.db"
# The database holds every key's wrapped material: only the broker's user
# may read it, or even list the directory it lives in.
DIR_MODE: Final = 0o700
FILE_MODE: Final = 0o600
# How long a write waits for another process holding the database's write
# lock (an operator's sqlite3 shell, a backup) before giving up as unavailable.
DEFAULT_BUSY_TIMEOUT_S: Final = 5.0

_SQLITE_BUSY: Final = 5
# The writer checkpoints the log (in a worker thread) after this many
# committed groups: about what SQLite's default of 1,000 log pages would do.
CHECKPOINT_EVERY_GROUPS: Final = 256
# After an erasure, how often (and how patiently) the log is emptied before it
# is left to the periodic checkpoints (SQLiteStore._truncate_log).
TRUNCATE_ATTEMPTS: Final = 5
TRUNCATE_PAUSE_S: Final = 0.02

# Primary SQLite result codes that mean "the medium cannot serve now".
_UNAVAILABLE_CODES: Final[Mapping[int, str]] = {
    5: "the database is locked by another process",  # SQLITE_BUSY
    6: "a table is locked",  # SQLITE_LOCKED
    7: "out of memory",  # SQLITE_NOMEM
    8: "the database is read-only",  # SQLITE_READONLY
    10: "disk I/O error",  # SQLITE_IOERR
    11: "the database file is corrupt",  # SQLITE_CORRUPT
    13: "the disk is full",  # SQLITE_FULL
    14: "the database file cannot be opened",  # SQLITE_CANTOPEN
    15: "locking protocol error",  # SQLITE_PROTOCOL
    26: "the file is not a database",  # SQLITE_NOTADB
}

# Spelled out rather than generated so each statement reads as what it is.
_SELECT_KEY_BY_NAME: Final = """
    SELECT id, name, type, protection, classification, state, prior_state, primary_version,
           min_decrypt_version, rotation_period_s, max_uses_per_version, exportable, labels,
           created_at, updated_at, destroy_at, activate_at, deactivate_at, origin, revision
    FROM keys WHERE name = ?
"""
_SELECT_KEY_BY_ID: Final = """
    SELECT id, name, type, protection, classification, state, prior_state, primary_version,
           min_decrypt_version, rotation_period_s, max_uses_per_version, exportable, labels,
           created_at, updated_at, destroy_at, activate_at, deactivate_at, origin, revision
    FROM keys WHERE id = ?
"""
_SELECT_VERSIONS: Final = """
    SELECT key_id, number, state, created_at, uses, material, origin
    FROM versions WHERE key_id = ? ORDER BY number
"""
# A range plus an exact substr() test instead of LIKE: "_" is legal in key
# names and would be a LIKE wildcard. The range lets SQLite walk the name
# index from the first candidate.
_SELECT_PAGE: Final = """
    SELECT id, name, type, protection, classification, state, prior_state, primary_version,
           min_decrypt_version, rotation_period_s, max_uses_per_version, exportable, labels,
           created_at, updated_at, destroy_at, activate_at, deactivate_at, origin, revision
    FROM keys
    WHERE name >= :prefix AND substr(name, 1, :prefix_len) = :prefix
      AND (:after IS NULL OR name > :after) AND (:state IS NULL OR state = :state)
      -- :scheduled selects broker.store.is_scheduled
      AND (:scheduled = 0 OR destroy_at IS NOT NULL OR activate_at IS NOT NULL
           OR deactivate_at IS NOT NULL OR (rotation_period_s > 0 AND state = 'active'))
    ORDER BY name LIMIT :limit
"""
# The same page's versions, read in the same transaction (so the same snapshot).
_SELECT_PAGE_VERSIONS: Final = """
    SELECT key_id, number, state, created_at, uses, material, origin FROM versions
    WHERE key_id IN (
        SELECT id FROM keys
        WHERE name >= :prefix AND substr(name, 1, :prefix_len) = :prefix
          AND (:after IS NULL OR name > :after) AND (:state IS NULL OR state = :state)
          AND (:scheduled = 0 OR destroy_at IS NOT NULL OR activate_at IS NOT NULL
               OR deactivate_at IS NOT NULL OR (rotation_period_s > 0 AND state = 'active'))
        ORDER BY name LIMIT :limit
    )
    ORDER BY key_id, number
"""
_INSERT_KEY: Final = """
    INSERT INTO keys (
        id, name, type, protection, classification, state, prior_state, primary_version,
        min_decrypt_version, rotation_period_s, max_uses_per_version, exportable, labels,
        created_at, updated_at, destroy_at, activate_at, deactivate_at, origin, revision
    ) VALUES (
        :id, :name, :type, :protection, :classification, :state, :prior_state, :primary_version,
        :min_decrypt_version, :rotation_period_s, :max_uses_per_version, :exportable, :labels,
        :created_at, :updated_at, :destroy_at, :activate_at, :deactivate_at, :origin, :revision
    )
"""
# The compare-and-swap: no row changes unless the stored revision is the
# one the new key value was derived from.
_UPDATE_KEY: Final = """
    UPDATE keys SET
        name = :name, type = :type, protection = :protection, classification = :classification,
        state = :state, prior_state = :prior_state, primary_version = :primary_version,
        min_decrypt_version = :min_decrypt_version, rotation_period_s = :rotation_period_s,
        max_uses_per_version = :max_uses_per_version, exportable = :exportable, labels = :labels,
        created_at = :created_at, updated_at = :updated_at, destroy_at = :destroy_at,
        activate_at = :activate_at, deactivate_at = :deactivate_at, origin = :origin,
        revision = :revision
    WHERE id = :id AND revision = :expected_revision
"""
# Reserved uses only grow: a key value written back from a cache may carry
# fewer uses than reserve_uses has granted since, and lowering the stored
# count would let the usage limit be crossed after a restart.
_UPSERT_VERSION: Final = """
    INSERT INTO versions (key_id, number, state, created_at, uses, material, origin)
    VALUES (:key_id, :number, :state, :created_at, :uses, :material, :origin)
    ON CONFLICT (key_id, number) DO UPDATE SET
        state = excluded.state,
        created_at = excluded.created_at,
        uses = max(versions.uses, excluded.uses),
        material = excluded.material,
        origin = excluded.origin
"""
# Overwrite in place before the row changes, so that the old blob's bytes are
# replaced rather than merely unlinked; secure_delete then zeroes whatever
# SQLite frees, and a checkpoint afterwards pushes the zeroed pages into the
# main file and truncates the log that still held the old ones.
_ZERO_MATERIAL: Final = (
    "UPDATE versions SET material = zeroblob(length(material)) WHERE key_id = ? AND number = ?"
)

_T = TypeVar("_T")


def _unavailable(exc: sqlite3.Error) -> Unavailable | None:
    """The Unavailable error for a failure of the medium, None for anything else (a bug)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        # The sqlite3 module raises OperationalError without a code for some
        # failures it detects itself; only the wording tells them apart.
        text = str(exc).lower()
        for phrase in ("disk i/o error", "database or disk is full", "database is locked"):
            if phrase in text:
                return Unavailable(f"the key store is unavailable: {phrase}")
        return None
    reason = _UNAVAILABLE_CODES.get(code & 0xFF)
    if reason is None:
        return None
    return Unavailable(f"the key store is unavailable: {reason} ({exc.sqlite_errorname})")


def _key_params(key: Key) -> dict[str, object]:
    params = key_columns(key)
    params["exportable"] = int(key.exportable)
    # Sorted keys: equal label maps are stored as equal text.
    params["labels"] = json.dumps(params["labels"], sort_keys=True, separators=(",", ":"))
    return params


def _key_from_row(row: sqlite3.Row, versions: Iterable[sqlite3.Row]) -> Key:
    return key_from_columns({**dict(row), "labels": json.loads(row["labels"])}, versions)


def _load(keys: Sequence[sqlite3.Row], versions: Iterable[sqlite3.Row]) -> list[Key]:
    """Keys from rows of the keys table and all their rows of the versions table."""
    by_id: dict[bytes, list[sqlite3.Row]] = {bytes(r["id"]): [] for r in keys}
    for v in versions:
        by_id[bytes(v["key_id"])].append(v)
    return [_key_from_row(r, by_id[bytes(r["id"])]) for r in keys]


# --- transactions (run in a worker thread, on a connection held under its lock)


def _in_read_transaction(conn: sqlite3.Connection, body: Callable[[sqlite3.Connection], _T]) -> _T:
    """Run ``body`` inside one read transaction: everything it reads comes from one snapshot.

    (Writes go through :meth:`_Connection.change`, in group transactions.)
    """
    conn.execute("BEGIN")
    try:
        result = body(conn)
        conn.execute("COMMIT")
    except BaseException:
        # Some errors (I/O) make SQLite roll back on its own.
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return result


def _insert(conn: sqlite3.Connection, key: Key) -> None:
    # The constraints decide, as in the PostgreSQL store: two look-ups first
    # would cost every insert as much again to spare a rare duplicate.
    try:
        conn.execute(_INSERT_KEY, _key_params(key))
    except sqlite3.IntegrityError as exc:
        message = str(exc)
        if message == "UNIQUE constraint failed: keys.name":
            raise AlreadyExists(f"a key named {key.name!r} exists") from None
        if message == "UNIQUE constraint failed: keys.id":
            raise AlreadyExists(f"a key with the same id as {key.name!r} exists") from None
        raise
    conn.executemany(_UPSERT_VERSION, [version_columns(key.id, v) for v in key.versions])


def _replace(conn: sqlite3.Connection, key: Key, expected_revision: int) -> bool:
    """Write ``key`` over revision ``expected_revision``; True when material was erased."""
    params = _key_params(key)
    params["expected_revision"] = expected_revision
    if conn.execute(_UPDATE_KEY, params).rowcount == 0:
        row = conn.execute("SELECT revision FROM keys WHERE id = ?", (key.id,)).fetchone()
        raise lost_replace(key, None if row is None else row["revision"], expected_revision)
    stored = {
        r["number"]: r["size"]
        for r in conn.execute(
            "SELECT number, length(material) AS size FROM versions WHERE key_id = ?", (key.id,)
        )
    }
    keep = {v.number for v in key.versions}
    erased = False
    for number, size in stored.items():
        if number not in keep:
            # Not something the lifecycle does, but "write all versions" means
            # the stored key must equal the written one.
            if size:
                conn.execute(_ZERO_MATERIAL, (key.id, number))
                erased = True
            conn.execute("DELETE FROM versions WHERE key_id = ? AND number = ?", (key.id, number))
    for version in key.versions:
        if not version.material and stored.get(version.number):
            conn.execute(_ZERO_MATERIAL, (key.id, version.number))
            erased = True
    conn.executemany(_UPSERT_VERSION, [version_columns(key.id, v) for v in key.versions])
    return erased


def _reserve(conn: sqlite3.Connection, key_id: bytes, version: int, count: int, limit: int | None) -> int:
    # Inside BEGIN IMMEDIATE the database's write lock is held from this read
    # on, so no other connection or process can move `uses` before the UPDATE:
    # the read and the update are one atomic step.
    row = conn.execute(
        "SELECT uses FROM versions WHERE key_id = ? AND number = ?", (key_id, version)
    ).fetchone()
    if row is None:
        if conn.execute("SELECT 1 FROM keys WHERE id = ?", (key_id,)).fetchone() is None:
            raise NotFound("no key with that id")
        raise NotFound(f"the key has no version {version}")
    granted = count if limit is None else max(0, min(count, limit - row["uses"]))
    if granted:
        conn.execute(
            "UPDATE versions SET uses = uses + ? WHERE key_id = ? AND number = ?", (granted, key_id, version)
        )
    return granted


def _select_one(conn: sqlite3.Connection, query: str, value: object) -> Key | None:
    row = conn.execute(query, (value,)).fetchone()
    if row is None:
        return None
    return _load([row], conn.execute(_SELECT_VERSIONS, (row["id"],)))[0]


def _select_page(
    conn: sqlite3.Connection,
    prefix: str,
    state: KeyState | None,
    after: str | None,
    limit: int,
    *,
    scheduled: bool = False,
) -> list[Key]:
    params = {
        "prefix": prefix,
        "prefix_len": len(prefix),
        "after": after,
        "state": None if state is None else state.value,
        "limit": limit,
        "scheduled": int(scheduled),
    }
    return _load(conn.execute(_SELECT_PAGE, params).fetchall(), conn.execute(_SELECT_PAGE_VERSIONS, params))


# --- opening -------------------------------------------------------------------


def _prepare_files(path: Path) -> None:
    """Create the directory (0700) and the database file (0600) if missing; tighten the file."""
    if not path.parent.exists():
        path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        # mkdir's mode is filtered by the umask; say exactly what we mean.
        os.chmod(path.parent, DIR_MODE)
    # Created here rather than by SQLite so it is never readable by others,
    # whatever the umask; SQLite gives its -wal and -shm files the same mode.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)
    for suffix in ("-wal", "-shm"):
        side = path.with_name(path.name + suffix)
        if side.exists():
            os.chmod(side, FILE_MODE)


def _connect(path: Path, busy_timeout_s: float, *, read_only: bool) -> sqlite3.Connection:
    # mode=rw: never let SQLite create the file itself (with umask-derived mode).
    conn = sqlite3.connect(
        f"{path.absolute().as_uri()}?mode=rw",
        uri=True,
        timeout=busy_timeout_s,
        isolation_level=None,  # we issue BEGIN/COMMIT ourselves
        check_same_thread=False,  # used from worker threads, one at a time under a lock
    )
    try:
        conn.row_factory = sqlite3.Row
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise Unavailable(f"the key store cannot use write-ahead logging (journal mode {mode})")
        # FULL: a commit is on disk (WAL fsynced) before the call returns
        # (the writer changes this once its schema is up to date: _for_the_loop).
        conn.execute("PRAGMA synchronous = FULL")
        # Freed and overwritten content is zeroed, so erased material does not
        # linger in free pages.
        conn.execute("PRAGMA secure_delete = ON")
        conn.execute("PRAGMA foreign_keys = ON")
        if read_only:
            conn.execute("PRAGMA query_only = ON")
    except BaseException:
        conn.close()
        raise
    return conn


class _Change:
    """One caller's change waiting for a group transaction, and its outcome."""

    __slots__ = ("body", "error", "finished", "taken", "value")

    def __init__(self, body: Callable[[sqlite3.Connection], object]) -> None:
        self.body = body
        self.taken = False  # in a transaction that is being written
        self.finished = trio.Event()
        self.value: object = None
        self.error: BaseException | None = None

    def outcome(self) -> object:
        if self.error is not None:
            raise self.error
        return self.value


def _write_group(conn: sqlite3.Connection, changes: Sequence[_Change], *, wait_ms: int = 0) -> bool:
    """Write ``changes`` in one IMMEDIATE transaction, each in a savepoint; record each outcome.

    A change that raises is rolled back to its savepoint alone. A failure of
    the medium that ends the whole transaction, or of the commit, fails
    every change of the group: none of them is on disk. The commit does not
    flush the log (see :class:`_WriteAheadLog`).

    Returns False, having done nothing, when another connection holds the
    write lock and ``wait_ms`` is 0; with ``wait_ms`` it waits that long
    for the lock (and fails the group as unavailable after).
    """
    try:
        if wait_ms:
            conn.execute(f"PRAGMA busy_timeout = {int(wait_ms)}")
        try:
            conn.execute("BEGIN IMMEDIATE")
        finally:
            if wait_ms:
                conn.execute("PRAGMA busy_timeout = 0")
    except sqlite3.Error as exc:
        if not wait_ms and (getattr(exc, "sqlite_errorcode", 0) & 0xFF) == _SQLITE_BUSY:
            return False
        _fail_all(changes, exc)
        return True
    for change in changes:
        try:
            conn.execute("SAVEPOINT change")
            change.value = change.body(conn)
            conn.execute("RELEASE change")
        except Exception as exc:
            if not conn.in_transaction:  # SQLite rolled the whole transaction back
                _fail_all(changes, exc)
                return True
            conn.execute("ROLLBACK TO change")
            conn.execute("RELEASE change")
            change.error = _translate(exc)
    try:
        conn.execute("COMMIT")
    except Exception as exc:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        _fail_all(changes, exc)
    return True


def _for_the_loop(conn: sqlite3.Connection) -> None:
    """Settings of the writer, whose changes run on the event loop (:meth:`_Connection.change`)."""
    # The commit writes the log without flushing it (NORMAL), and the store
    # flushes the log itself before anyone learns the outcome
    # (_WriteAheadLog): together what FULL does inside the commit.
    conn.execute("PRAGMA synchronous = NORMAL")
    # Checkpoints run in a worker thread, never inside a commit on the
    # event loop; nor does a commit wait there for another process's lock
    # (_write_group reports it, and a thread waits instead).
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    conn.execute("PRAGMA busy_timeout = 0")


def _checkpoint(conn: sqlite3.Connection) -> None:
    """Copy the log's committed pages into the database without waiting for readers."""
    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


def _checkpoint_truncate(conn: sqlite3.Connection) -> bool:
    """Copy the whole log into the database and empty it; False if a reader kept it (busy)."""
    busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    return bool(busy)


def _fail_all(changes: Sequence[_Change], exc: Exception) -> None:
    error = _translate(exc)
    for change in changes:
        change.value, change.error = None, error


def _translate(exc: Exception) -> BaseException:
    """What the caller of a failed change sees: Unavailable for the medium, else the error itself."""
    if isinstance(exc, sqlite3.Error):
        return _unavailable(exc) or exc
    return exc


class _WriteAheadLog:
    """The database's ``-wal`` file, flushed after each commit of the writer.

    With ``synchronous = NORMAL`` a commit writes its frames to the log
    without fsync; flushing the log file then makes the transaction durable,
    exactly the sync FULL makes at the end of a commit. The flush runs on a
    native thread (:func:`broker.durable.fdatasync`). The file is reopened
    if it was replaced (a log is only removed when the last connection
    closes, so this is defence, not routine).
    """

    def __init__(self, db_path: Path) -> None:
        self.path = db_path.with_name(db_path.name + "-wal")
        self._fd: int | None = None
        self._inode = -1

    async def flush(self) -> None:
        """Make every commit so far durable.

        Raises:
            OSError: the log cannot be opened or flushed.
        """
        inode = os.stat(self.path).st_ino
        if self._fd is None or inode != self._inode:
            self.close()
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            self._inode = os.fstat(self._fd).st_ino
        await fdatasync(self._fd)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


class _Connection:
    """One sqlite3 connection, used by one task at a time; the writer also owns the log."""

    def __init__(
        self, conn: sqlite3.Connection, log: _WriteAheadLog | None = None, busy_timeout_s: float = 0.0
    ) -> None:
        self.conn: sqlite3.Connection | None = conn
        self.lock = trio.Lock()
        self._queued: list[_Change] = []
        self._log = log
        self._busy_timeout_s = busy_timeout_s
        self._groups = 0  # committed since the last checkpoint
        # Erased material may still be in the log (SQLiteStore._truncate_log):
        # the periodic checkpoint empties the log, not only copies it.
        self.erasure_pending = False
        # Why the log's flush failed, once it has: no change is written after.
        self.broken: str | None = None

    async def change(self, body: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``body`` in a write transaction shared with the changes queued beside it.

        The caller holding the lock writes every change queued so far in
        one transaction; later callers find theirs done.

        Cancellation: before its change is taken into a transaction, a
        caller leaves and nothing is written; after, it waits (shielded)
        for the outcome and returns it, so a change is never written behind
        the back of a caller that saw it fail. The cancellation is delivered
        at the caller's next checkpoint.
        """
        change = _Change(body)
        self._queued.append(change)
        try:
            await self.lock.acquire()
        except BaseException:
            if not change.taken:
                self._queued.remove(change)
                raise
            with trio.CancelScope(shield=True):
                await change.finished.wait()
            return change.outcome()  # type: ignore[return-value]
        try:
            if not change.taken:
                await self._write_queued()
        finally:
            self.lock.release()
        return change.outcome()  # type: ignore[return-value]

    async def _write_queued(self) -> None:
        changes, self._queued = self._queued, []
        for queued in changes:
            queued.taken = True
        conn = self.conn
        try:
            if conn is None or self._log is None:
                _fail_all(changes, Unavailable("the key store is closed"))
                return
            if self.broken is not None:
                refused = f"{self.broken}; no change is written until the broker restarts"
                _fail_all(changes, Unavailable(refused))
                return
            # Statements and commit run here on the event loop: a few tens of
            # microseconds per change, where a worker thread would first wait
            # for the GIL the busy loop keeps retaking. Only when another
            # process holds the write lock does a thread wait for it.
            if not _write_group(conn, changes):
                wait_ms = max(1, round(self._busy_timeout_s * 1000))
                await trio.to_thread.run_sync(functools.partial(_write_group, conn, changes, wait_ms=wait_ms))
            if any(change.error is None for change in changes):
                try:
                    await self._log.flush()
                except OSError as exc:
                    # Committed, but not known to be durable: nobody is told
                    # it succeeded (the data is visible and may survive).
                    # Nor is anyone after: the kernel may have dropped the
                    # pages it failed to write, and a later flush that
                    # succeeds would not bring them back, while recovery stops
                    # at the first bad frame of the log, taking every later
                    # commit with it. Writes wait for a reopen.
                    self.broken = f"the key store could not flush its log: {exc.strerror}"
                    _fail_all(changes, Unavailable(self.broken))
                self._groups += 1
        finally:
            for queued in changes:
                queued.finished.set()
        if self._groups >= CHECKPOINT_EVERY_GROUPS:
            self._groups = 0
            # Under the lock, after the group's callers were released.
            with contextlib.suppress(Unavailable):
                if self.erasure_pending:
                    truncate = functools.partial(_checkpoint_truncate, conn)
                    self.erasure_pending = await trio.to_thread.run_sync(_translated, truncate)
                else:
                    await trio.to_thread.run_sync(_translated, functools.partial(_checkpoint, conn))

    async def run(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        async with self.lock:
            conn = self.conn
            if conn is None:
                raise Unavailable("the key store is closed")
            return await trio.to_thread.run_sync(_translated, functools.partial(fn, conn))

    async def close(self) -> None:
        async with self.lock:
            conn, self.conn = self.conn, None
            if self._log is not None:
                self._log.close()
            if conn is not None:
                await trio.to_thread.run_sync(conn.close)


def _translated(fn: Callable[[], _T]) -> _T:
    """Call ``fn``, turning SQLite failures of the medium into Unavailable."""
    try:
        return fn()
    except sqlite3.Error as exc:
        error = _translate(exc)
        if error is exc:
            raise
        raise error from None


@final
class SQLiteStore:
    """keybroker's :class:`~broker.store.Store` over one SQLite database file.

    Args:
        path: the database file; its directory is created 0700 if missing.
        busy_timeout_s: how long a write waits for another process's lock
            before the call fails with ``Unavailable``.
    """

    def __init__(self, path: Path, *, busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S) -> None:
        if busy_timeout_s < 0:
            raise ValueError("busy_timeout_s must not be negative")
        self.name: str = "sqlite"
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self._writer: _Connection | None = None
        self._reader: _Connection | None = None

    def __repr__(self) -> str:
        return f"SQLiteStore({str(self.path)!r})"

    # --- lifecycle -------------------------------------------------------------

    async def open(self) -> None:
        """Create the files if missing, apply pragmas and migrate the schema.

        Raises:
            SchemaError: the database is newer than this keybroker, or not a key store.
            Unavailable: the file cannot be opened or written.
            OSError: the directory or file cannot be created.
        """
        if self._writer is not None:
            raise RuntimeError("the store is already open")

        def connect() -> tuple[sqlite3.Connection, sqlite3.Connection]:
            _prepare_files(self.path)
            writer = _connect(self.path, self.busy_timeout_s, read_only=False)
            try:
                migrate(writer, where=str(self.path))
                # A broker that stopped before it could empty the log after an
                # erasure left the old material in it: empty it now (best effort,
                # another process may be reading).
                _checkpoint_truncate(writer)
                _for_the_loop(writer)
                reader = _connect(self.path, self.busy_timeout_s, read_only=True)
            except BaseException:
                writer.close()
                raise
            return writer, reader

        writer, reader = await trio.to_thread.run_sync(_translated, connect)
        self._writer = _Connection(writer, _WriteAheadLog(self.path), self.busy_timeout_s)
        self._reader = _Connection(reader)

    async def aclose(self) -> None:
        """Close both connections, waiting for a call in progress. Idempotent."""
        writer, reader = self._writer, self._reader
        self._writer = self._reader = None
        if writer is not None:
            await writer.close()
        if reader is not None:
            await reader.close()

    def _write_conn(self) -> _Connection:
        if self._writer is None:
            raise Unavailable("the key store is not open")
        return self._writer

    def _read_conn(self) -> _Connection:
        if self._reader is None:
            raise Unavailable("the key store is not open")
        return self._reader

    # --- writes ----------------------------------------------------------------

    async def insert_key(self, key: Key) -> None:
        """Add ``key`` and all its versions in one transaction.

        Raises:
            AlreadyExists: the name (or the id) is taken.
            Unavailable: the database cannot be written.
        """
        await self._write_conn().change(lambda c: _insert(c, key))

    async def replace_key(self, key: Key, *, expected_revision: int) -> None:
        """Write ``key`` (all fields and versions) if the stored revision is ``expected_revision``.

        One transaction: the compare-and-swap on the revision, the key row,
        and every version. A version's stored ``uses`` never goes down (see
        :meth:`reserve_uses`). A version whose material became empty is
        overwritten with zeros before it is emptied; after such a change the
        log is checkpointed so the old pages leave the write-ahead log too.

        Raises:
            StaleRevision: the stored revision is not ``expected_revision``.
            NotFound: no key has ``key.id``.
            Unavailable: the database cannot be written.
        """
        writer = self._write_conn()
        erased = await writer.change(lambda c: _replace(c, key, expected_revision))
        if erased:
            # Outside the change's transaction, so a crash here cannot undo
            # the erasure. The change is committed: failing the call now
            # would make the caller retry a change that happened.
            await self._truncate_log()

    async def _truncate_log(self) -> None:
        """Copy the whole log into the database and empty it.

        Erased material is overwritten in the database by the checkpoint, but
        its old bytes stay in the log's earlier frames until the log is
        emptied, which SQLite refuses (reporting "busy", not an error) while
        any reader holds a snapshot. The store's own reader is held off
        meanwhile; a reader in another process may still be, so this tries a
        few times, then leaves the log marked for the next checkpoints (and
        for the next open, after a crash).
        """
        writer, reader = self._write_conn(), self._read_conn()
        for attempt in range(TRUNCATE_ATTEMPTS):
            try:
                async with reader.lock:
                    busy = await writer.run(_checkpoint_truncate)
            except Unavailable:
                busy = True
            if not busy:
                writer.erasure_pending = False
                return
            await trio.sleep(TRUNCATE_PAUSE_S * (attempt + 1))
        writer.erasure_pending = True
        log.warning("the key store's log could not be emptied yet; erased material stays in it until it can")

    async def reserve_uses(self, key_id: bytes, version: int, count: int, limit: int | None) -> int:
        """Atomically add up to ``count`` to the version's uses, never past ``limit``.

        Does not change the key's revision: reservations are counted apart
        from the key's lifecycle, so a cached key stays current.

        Returns:
            The number granted: ``count``, or what is left below ``limit``
            (0 once it is reached). ``limit`` None means unlimited.

        Raises:
            NotFound: no such key or version.
            ValueError: ``count`` is negative.
        """
        if count < 0:
            raise ValueError("count must not be negative")
        return await self._write_conn().change(lambda c: _reserve(c, key_id, version, count, limit))

    # --- reads -----------------------------------------------------------------

    async def get_key(self, name: str) -> Key | None:
        """The key named ``name``, or None."""
        return await self._read_conn().run(
            lambda c: _in_read_transaction(c, lambda t: _select_one(t, _SELECT_KEY_BY_NAME, name))
        )

    async def get_key_by_id(self, key_id: bytes) -> Key | None:
        """The key whose 16-byte id is ``key_id``, or None."""
        return await self._read_conn().run(
            lambda c: _in_read_transaction(c, lambda t: _select_one(t, _SELECT_KEY_BY_ID, bytes(key_id)))
        )

    async def list_keys(
        self, *, prefix: str = "", state: KeyState | None = None, after: str | None = None, limit: int = 100
    ) -> list[Key]:
        """Up to ``limit`` keys ordered by name, with names > ``after``, starting with ``prefix``.

        Args:
            prefix: only names starting with it.
            state: only keys in this state.
            after: the last name of the previous page (a cursor).
            limit: page size.
        """
        return await self._page(prefix, state, after, limit, scheduled=False)

    async def list_scheduled(self, *, after: str | None = None, limit: int = 100) -> list[Key]:
        """Up to ``limit`` keys that time can make due (:func:`broker.store.is_scheduled`), by name."""
        return await self._page("", None, after, limit, scheduled=True)

    async def _page(
        self, prefix: str, state: KeyState | None, after: str | None, limit: int, *, scheduled: bool
    ) -> list[Key]:
        if limit < 0:
            raise ValueError("limit must not be negative")
        return await self._read_conn().run(
            lambda c: _in_read_transaction(
                c, lambda t: _select_page(t, prefix, state, after, limit, scheduled=scheduled)
            )
        )

    # --- documents -------------------------------------------------------------

    async def put_document(self, kind: str, doc_id: str, body: bytes) -> None:
        """Store ``body`` under ``(kind, doc_id)``, replacing what was there, in one transaction.

        Raises:
            ValueError: a malformed kind or id (see :func:`broker.store.check_document_ref`).
            Unavailable: the database cannot be written.
        """
        check_document_ref(kind, doc_id)
        blob = bytes(body)
        await self._write_conn().change(
            lambda c: c.execute(
                "INSERT INTO documents (kind, id, body) VALUES (?, ?, ?) "
                "ON CONFLICT (kind, id) DO UPDATE SET body = excluded.body",
                (kind, doc_id, blob),
            )
        )

    async def get_document(self, kind: str, doc_id: str) -> bytes | None:
        """The body stored under ``(kind, doc_id)``, or None."""
        check_document_ref(kind, doc_id)

        def read(conn: sqlite3.Connection) -> bytes | None:
            query = "SELECT body FROM documents WHERE kind = ? AND id = ?"
            row = conn.execute(query, (kind, doc_id)).fetchone()
            return None if row is None else bytes(row["body"])

        return await self._read_conn().run(read)

    async def list_documents(
        self, kind: str, *, after: str | None = None, limit: int = 100
    ) -> list[tuple[str, bytes]]:
        """Up to ``limit`` ``(id, body)`` pairs of ``kind``, ordered by id, with ids > ``after``."""
        check_document_ref(kind, "x" if after is None else after)
        if limit < 0:
            raise ValueError("limit must not be negative")

        def read(conn: sqlite3.Connection) -> list[tuple[str, bytes]]:
            rows = conn.execute(
                "SELECT id, body FROM documents WHERE kind = ? AND (? IS NULL OR id > ?) ORDER BY id LIMIT ?",
                (kind, after, after, limit),
            ).fetchall()
            return [(str(r["id"]), bytes(r["body"])) for r in rows]

        return await self._read_conn().run(read)

    # --- diagnostics -------------------------------------------------------------

    async def pragmas(self) -> dict[str, object]:
        """The settings the writer connection runs with, for operators and tests.

        Keys: ``journal_mode``, ``synchronous`` (1 = NORMAL; the store flushes the log), ``secure_delete``,
        ``foreign_keys``, ``user_version`` (the schema version) and
        ``schema_version_known`` (the newest this code can migrate to).
        """

        def read(conn: sqlite3.Connection) -> dict[str, object]:
            names = ("journal_mode", "synchronous", "secure_delete", "foreign_keys", "user_version")
            found: dict[str, object] = {n: conn.execute(f"PRAGMA {n}").fetchone()[0] for n in names}
            found["schema_version_known"] = SCHEMA_VERSION
            return found

        return await self._write_conn().run(read)
