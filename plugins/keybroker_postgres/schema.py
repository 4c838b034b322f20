"""The PostgreSQL store's schema and its forward migrations.

Every table lives in the schema (namespace) ``keybroker`` of the configured
database, so the broker's tables never clash with an application's sharing
the database. The schema version is the one row of ``keybroker.meta``. :data:`MIGRATIONS`
is an ordered list: entry ``i`` takes the database from version ``i`` to
``i + 1``. PostgreSQL's DDL is transactional, so each entry runs in one
transaction together with the version bump: a crash or a lost connection
during a migration leaves the database at the version before it, never
half-migrated. Brokers starting together against a new database take turns:
each step holds a transaction-scoped advisory lock while it reads the version
and migrates, so exactly one of them runs it and the others find it done.

Rules for changing the schema: never edit a released entry, only append one.
A database written by a newer keybroker (a version above
:data:`SCHEMA_VERSION`) is refused rather than guessed at.
"""

from __future__ import annotations

from typing import Any, Final

import psycopg
from psycopg.rows import tuple_row

from broker.errors import Unavailable

__all__ = ["MIGRATIONS", "MIGRATION_LOCK", "SCHEMA", "SCHEMA_VERSION", "SchemaError", "migrate"]

SCHEMA: Final = "keybroker"
# Advisory lock keys are one bigint namespace per database, shared with any
# other application: "KBMG" (keybroker migration) in ASCII keeps ours apart.
MIGRATION_LOCK: Final = 0x4B424D47

MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    # 0 -> 1: keys, their versions, and small documents for other features.
    # Names and document ids compare in code-point order (COLLATE "C"), as
    # the broker and the SQLite store do: a locale collation would sort
    # "a-b" and "a/b" differently and break key.list cursors.
    (
        "CREATE SCHEMA IF NOT EXISTS keybroker",
        """
        CREATE TABLE keybroker.meta (
            singleton      boolean PRIMARY KEY DEFAULT true CHECK (singleton),
            schema_version integer NOT NULL
        )
        """,
        "INSERT INTO keybroker.meta (schema_version) VALUES (0)",
        """
        CREATE TABLE keybroker.keys (
            id                   bytea PRIMARY KEY CHECK (length(id) = 16),
            name                 text COLLATE "C" NOT NULL UNIQUE,
            type                 text NOT NULL,
            protection           text NOT NULL,
            classification       text NOT NULL,
            state                text NOT NULL,
            prior_state          text,
            primary_version      integer NOT NULL CHECK (primary_version >= 1),
            min_decrypt_version  integer NOT NULL,
            rotation_period_s    bigint NOT NULL,
            max_uses_per_version bigint,  -- NULL: the key type's default limit
            exportable           boolean NOT NULL,
            labels               jsonb NOT NULL,  -- object of str -> str
            created_at           bigint NOT NULL,
            updated_at           bigint NOT NULL,
            destroy_at           bigint,
            activate_at          bigint,
            deactivate_at        bigint,
            origin               text NOT NULL,
            revision             bigint NOT NULL
        )
        """,
        # The primary key (key_id, number) is what makes two brokers that
        # both try to add version n+1 fail loudly rather than both succeed.
        """
        CREATE TABLE keybroker.versions (
            key_id     bytea NOT NULL REFERENCES keybroker.keys (id),
            number     integer NOT NULL CHECK (number >= 1),
            state      text NOT NULL,
            created_at bigint NOT NULL,
            uses       bigint NOT NULL CHECK (uses >= 0),
            material   bytea NOT NULL,
            origin     text NOT NULL,
            PRIMARY KEY (key_id, number)
        )
        """,
        # key.list filters by state and pages by name.
        "CREATE INDEX keys_by_state ON keybroker.keys (state, name)",
        """
        CREATE TABLE keybroker.documents (
            kind text COLLATE "C" NOT NULL,
            id   text COLLATE "C" NOT NULL,
            body bytea NOT NULL,
            PRIMARY KEY (kind, id)
        )
        """,
    ),
)

SCHEMA_VERSION: Final = len(MIGRATIONS)


class SchemaError(Unavailable):
    """The database cannot be used by this keybroker: too new, not a key store, not UTF8.

    Raised by ``open``; retrying will not help until an operator acts
    (upgrade keybroker, or point it at the right database).
    """


def _one(conn: psycopg.Connection[Any], query: str, params: tuple[object, ...] = ()) -> Any:
    # A tuple cursor whatever the connection's row factory.
    with conn.cursor(row_factory=tuple_row) as cur:
        row = cur.execute(query, params).fetchone()
    return None if row is None else row[0]


def _version(conn: psycopg.Connection[Any], where: str) -> int:
    """The database's schema version, after checking it is ours and not too new."""
    if not _one(conn, "SELECT to_regclass('keybroker.meta') IS NOT NULL"):
        # No version table: the namespace must be absent or empty, else it is
        # something else that happens to be called keybroker.
        if _one(conn, "SELECT count(*) FROM pg_catalog.pg_tables WHERE schemaname = %s", (SCHEMA,)):
            raise SchemaError(f"{where}: schema {SCHEMA!r} holds tables but no keybroker schema version")
        return 0
    version = int(_one(conn, "SELECT schema_version FROM keybroker.meta") or 0)
    if version > SCHEMA_VERSION:
        raise SchemaError(
            f"{where} has schema version {version}, newer than the {SCHEMA_VERSION} this keybroker "
            "knows; upgrade keybroker (downgrades are not supported)"
        )
    return version


def migrate(conn: psycopg.Connection[Any], *, where: str = "the database") -> int:
    """Bring the database up to :data:`SCHEMA_VERSION`, one transaction per step.

    Args:
        conn: a connection used by this thread only.
        where: how to name the database in error messages (never the DSN).

    Returns:
        The schema version the database had before.

    Raises:
        SchemaError: the database is newer than this code, not a key store,
            or not encoded in UTF8.
        psycopg.Error: the server failed (the caller translates it).
    """
    encoding = str(_one(conn, "SHOW server_encoding")).upper()
    if encoding not in ("UTF8", "UTF-8"):
        # Key names, labels and document ids are Unicode text.
        raise SchemaError(f"{where}: the database must be encoded in UTF8, not {encoding}")
    found: int | None = None
    while True:
        with conn.transaction():
            # Held to the end of this transaction: one migrator at a time.
            _one(conn, "SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            version = _version(conn, where)
            if found is None:
                found = version
            if version == SCHEMA_VERSION:
                return found
            for statement in MIGRATIONS[version]:
                conn.execute(statement)
            conn.execute("UPDATE keybroker.meta SET schema_version = %s", (version + 1,))
