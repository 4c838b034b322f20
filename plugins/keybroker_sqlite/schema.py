"""The SQLite store's schema and its forward migrations.

The schema version lives in the database header (``PRAGMA user_version``),
next to an application id that marks the file as a keybroker key store.
:data:`MIGRATIONS` is an ordered list: entry ``i`` takes a database from
version ``i`` to ``i + 1``. Each entry runs in one transaction together with
the ``user_version`` bump, so a crash during a migration leaves the database
at the version before it, never half-migrated.

Rules for changing the schema: never edit a released entry, only append one.
A database written by a newer keybroker (a ``user_version`` above
:data:`SCHEMA_VERSION`) is refused rather than guessed at.
"""

from __future__ import annotations

import sqlite3
from typing import Final

from broker.errors import Unavailable

__all__ = [
    "APPLICATION_ID",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "SchemaError",
    "migrate",
]

# "KBKS" (keybroker key store) in the header's application_id field: tells a
# keybroker database apart from any other SQLite file handed to us by mistake.
APPLICATION_ID: Final = 0x4B424B53

MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    # 0 -> 1: keys and their versions. STRICT tables make SQLite refuse a value
    # of the wrong type instead of silently storing it.
    (
        """
        CREATE TABLE keys (
            id                   BLOB PRIMARY KEY CHECK (length(id) = 16),
            name                 TEXT NOT NULL UNIQUE,
            type                 TEXT NOT NULL,
            protection           TEXT NOT NULL,
            classification       TEXT NOT NULL,
            state                TEXT NOT NULL,
            prior_state          TEXT,
            primary_version      INTEGER NOT NULL CHECK (primary_version >= 1),
            min_decrypt_version  INTEGER NOT NULL,
            rotation_period_s    INTEGER NOT NULL,
            max_uses_per_version INTEGER,  -- NULL: the key type's default limit
            exportable           INTEGER NOT NULL CHECK (exportable IN (0, 1)),
            labels               TEXT NOT NULL,  -- JSON object of str -> str
            created_at           INTEGER NOT NULL,
            updated_at           INTEGER NOT NULL,
            destroy_at           INTEGER,
            activate_at          INTEGER,
            deactivate_at        INTEGER,
            origin               TEXT NOT NULL,
            revision             INTEGER NOT NULL
        ) STRICT
        """,
        """
        CREATE TABLE versions (
            key_id     BLOB NOT NULL REFERENCES keys (id),
            number     INTEGER NOT NULL CHECK (number >= 1),
            state      TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            uses       INTEGER NOT NULL CHECK (uses >= 0),
            material   BLOB NOT NULL,
            PRIMARY KEY (key_id, number)
        ) STRICT
        """,
        # key.list filters by state and pages by name.
        "CREATE INDEX keys_by_state ON keys (state, name)",
    ),
    # 1 -> 2: where each version's material came from (imports make
    # "external" versions), and small documents kept for other features
    # (issued certificates, CA certificates), each a blob under (kind, id).
    (
        "ALTER TABLE versions ADD COLUMN origin TEXT NOT NULL DEFAULT 'broker'",
        """
        CREATE TABLE documents (
            kind TEXT NOT NULL,
            id   TEXT NOT NULL,
            body BLOB NOT NULL,
            PRIMARY KEY (kind, id)
        ) STRICT
        """,
    ),
    # 2 -> 3: drop keys_by_state. The store's page query tests the state as
    # "(:state IS NULL OR state = :state)", a form SQLite cannot answer from
    # an index, so no query ever read it, and every key insert and state
    # change paid for keeping it (the name index serves every page).
    ("DROP INDEX keys_by_state",),
)

SCHEMA_VERSION: Final = len(MIGRATIONS)

# STRICT tables appeared in SQLite 3.37.0 (2021-11-27).
MIN_SQLITE_VERSION: Final = (3, 37, 0)


class SchemaError(Unavailable):
    """The database cannot be used by this keybroker: too new, or not a key store.

    Raised by ``open``; retrying will not help until an operator acts (upgrade
    keybroker, or point it at the right file).
    """


def _header(conn: sqlite3.Connection) -> tuple[int, int]:
    application_id = conn.execute("PRAGMA application_id").fetchone()[0]
    user_version = conn.execute("PRAGMA user_version").fetchone()[0]
    return int(application_id), int(user_version)


def _check(conn: sqlite3.Connection, where: str) -> int:
    """The database's schema version, after checking it is ours and not too new."""
    application_id, version = _header(conn)
    if application_id not in (0, APPLICATION_ID):
        raise SchemaError(f"{where} is not a keybroker key store (application id {application_id:#x})")
    if version > SCHEMA_VERSION:
        raise SchemaError(
            f"{where} has schema version {version}, newer than the {SCHEMA_VERSION} this keybroker "
            "knows; upgrade keybroker (downgrades are not supported)"
        )
    if version == 0:
        # A version-0 file must be empty: anything else is some other database.
        tables = conn.execute("SELECT count(*) FROM sqlite_schema WHERE type = 'table'").fetchone()[0]
        if tables:
            raise SchemaError(f"{where} already holds tables but no keybroker schema version")
    return version


def migrate(conn: sqlite3.Connection, *, where: str) -> int:
    """Bring the database up to :data:`SCHEMA_VERSION`, one transaction per step.

    Args:
        conn: a connection in autocommit mode (``isolation_level=None``).
        where: how to name the database in error messages (its path).

    Returns:
        The schema version the database had before.

    Raises:
        SchemaError: the database is newer than this code, or not a key store.
    """
    if sqlite3.sqlite_version_info < MIN_SQLITE_VERSION:
        raise SchemaError(
            f"SQLite {sqlite3.sqlite_version} is too old for the key store; "
            f"{'.'.join(map(str, MIN_SQLITE_VERSION))} or later is needed"
        )
    found = _check(conn, where)
    while True:
        # IMMEDIATE takes the write lock before reading the version, so two
        # processes opening the same new database cannot both run a step.
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = _check(conn, where)
            if version == SCHEMA_VERSION:
                conn.execute("COMMIT")
                return found
            for statement in MIGRATIONS[version]:
                conn.execute(statement)
            # PRAGMAs cannot take parameters; both values are our own integers.
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID:d}")
            conn.execute(f"PRAGMA user_version = {version + 1:d}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
