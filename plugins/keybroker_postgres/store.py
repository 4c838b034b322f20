"""PostgresStore: keys shared by several brokers in one PostgreSQL database.

Resource handling: a small :class:`~keybroker_postgres.pool.Pool` of
autocommit connections, each lent to one worker thread at a time.

Transactions: every change is one transaction at READ COMMITTED, relying on
row locks. ``replace_key`` is an ``UPDATE ... WHERE revision = expected``
compare-and-swap: a concurrent writer's UPDATE waits for ours to commit,
re-reads the row, finds another revision and changes nothing, so of two
brokers rotating one key at once exactly one writes version n+1 and the
other retries (and writes n+2); the primary key on (key id, version number)
backs this up. ``reserve_uses`` is one statement that locks the version row.
Reads are single statements (a key joined with its versions), so a key and
its versions always come from one snapshot. Every insert and replace sends
``pg_notify('keybroker_keys', ...)`` in the same transaction: other brokers
hear of a change exactly when it commits, never before and never not at all.

Error handling: failures of the medium (connection refused or lost, server
shutting down, statement or call timeout) become
:class:`broker.errors.Unavailable`, never naming the DSN, a statement or its
values.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Sequence
from typing import Any, Final, final

import psycopg
from psycopg.types.json import Jsonb

from broker.errors import AlreadyExists, NotFound
from broker.keys import Key, KeyState
from broker.store import (
    KEY_COLUMNS,
    VERSION_COLUMNS,
    check_document_ref,
    key_columns,
    key_from_columns,
    lost_replace,
    version_columns,
)

from .options import PostgresOptions
from .pool import Connection, Pool, transaction
from .schema import SCHEMA_VERSION, migrate

__all__ = ["NOTIFY_CHANNEL", "PostgresStore", "connection_defaults"]

# The LISTEN/NOTIFY channel every broker of one database shares.
NOTIFY_CHANNEL: Final = "keybroker_keys"

# TCP keepalives and tcp_user_timeout make a dead server or a cut network
# noticed within ~10 s on an otherwise idle connection (the cluster feed's
# listener) and bound how long sent data may go unacknowledged. libpq
# ignores them on Unix sockets, where the kernel reports a dead peer at once.
_KEEPALIVES: Final = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 10_000,  # ms
}

# The same from the server's side (its own socket settings, per session): a
# broker cut off by the network is noticed within ~10 s, and its session,
# with the scheduler's advisory lock, ends, where the server's defaults (the
# kernel's, about 2 hours) would keep both. (A broker that is stopped, not
# cut off, still answers keepalives: its lock stays until it resumes or dies.)
_SERVER_KEEPALIVES: Final = (
    "-c tcp_keepalives_idle=5 -c tcp_keepalives_interval=2 -c tcp_keepalives_count=3 "
    "-c tcp_user_timeout=10000"
)

# Queries read the key's columns in KEY_COLUMNS order, then the version's in
# VERSION_COLUMNS order (None when a key has no versions: the LEFT JOIN keeps
# the key); _key_from_rows zips them with those names, strictly.
_N_KEY: Final = len(KEY_COLUMNS)

# One statement, so the key and its versions come from one snapshot.
_SELECT_BY_NAME: Final = """
    SELECT k.id, k.name, k.type, k.protection, k.classification, k.state, k.prior_state, k.primary_version,
           k.min_decrypt_version, k.rotation_period_s, k.max_uses_per_version, k.exportable, k.labels,
           k.created_at, k.updated_at, k.destroy_at, k.activate_at, k.deactivate_at, k.origin, k.revision,
           v.number, v.state, v.created_at, v.uses, v.material, v.origin
    FROM keybroker.keys k LEFT JOIN keybroker.versions v ON v.key_id = k.id
    WHERE k.name = %s ORDER BY v.number
"""
_SELECT_BY_ID: Final = """
    SELECT k.id, k.name, k.type, k.protection, k.classification, k.state, k.prior_state, k.primary_version,
           k.min_decrypt_version, k.rotation_period_s, k.max_uses_per_version, k.exportable, k.labels,
           k.created_at, k.updated_at, k.destroy_at, k.activate_at, k.deactivate_at, k.origin, k.revision,
           v.number, v.state, v.created_at, v.uses, v.material, v.origin
    FROM keybroker.keys k LEFT JOIN keybroker.versions v ON v.key_id = k.id
    WHERE k.id = %s ORDER BY v.number
"""
# starts_with() instead of LIKE: "_" is legal in key names and would be a
# LIKE wildcard. The range (in the column's "C" collation) lets the planner
# walk the name index from the first candidate.
_SELECT_PAGE: Final = """
    WITH k AS (
        SELECT * FROM keybroker.keys
        WHERE name >= %(prefix)s AND starts_with(name, %(prefix)s)
          AND (%(after)s::text IS NULL OR name > %(after)s)
          AND (%(state)s::text IS NULL OR state = %(state)s)
          AND (NOT %(scheduled)s OR destroy_at IS NOT NULL OR activate_at IS NOT NULL
               OR deactivate_at IS NOT NULL OR (rotation_period_s > 0 AND state = 'active'))
        ORDER BY name LIMIT %(limit)s
    )
    SELECT k.id, k.name, k.type, k.protection, k.classification, k.state, k.prior_state, k.primary_version,
           k.min_decrypt_version, k.rotation_period_s, k.max_uses_per_version, k.exportable, k.labels,
           k.created_at, k.updated_at, k.destroy_at, k.activate_at, k.deactivate_at, k.origin, k.revision,
           v.number, v.state, v.created_at, v.uses, v.material, v.origin
    FROM k LEFT JOIN keybroker.versions v ON v.key_id = k.id
    ORDER BY k.name, v.number
"""
_INSERT_KEY: Final = """
    INSERT INTO keybroker.keys (
        id, name, type, protection, classification, state, prior_state, primary_version,
        min_decrypt_version, rotation_period_s, max_uses_per_version, exportable, labels,
        created_at, updated_at, destroy_at, activate_at, deactivate_at, origin, revision
    ) VALUES (
        %(id)s, %(name)s, %(type)s, %(protection)s, %(classification)s, %(state)s, %(prior_state)s,
        %(primary_version)s, %(min_decrypt_version)s, %(rotation_period_s)s, %(max_uses_per_version)s,
        %(exportable)s, %(labels)s, %(created_at)s, %(updated_at)s, %(destroy_at)s, %(activate_at)s,
        %(deactivate_at)s, %(origin)s, %(revision)s
    )
"""
# The compare-and-swap: no row changes unless the stored revision is the one
# the new key value was derived from.
_UPDATE_KEY: Final = """
    UPDATE keybroker.keys SET
        name = %(name)s, type = %(type)s, protection = %(protection)s,
        classification = %(classification)s, state = %(state)s, prior_state = %(prior_state)s,
        primary_version = %(primary_version)s, min_decrypt_version = %(min_decrypt_version)s,
        rotation_period_s = %(rotation_period_s)s, max_uses_per_version = %(max_uses_per_version)s,
        exportable = %(exportable)s, labels = %(labels)s, created_at = %(created_at)s,
        updated_at = %(updated_at)s, destroy_at = %(destroy_at)s, activate_at = %(activate_at)s,
        deactivate_at = %(deactivate_at)s, origin = %(origin)s, revision = %(revision)s
    WHERE id = %(id)s AND revision = %(expected_revision)s
"""
# Reserved uses only grow: a key value written back from a cache may carry
# fewer uses than reserve_uses has granted since (here or on another broker),
# and lowering the stored count would let the usage limit be crossed.
_UPSERT_VERSION: Final = """
    INSERT INTO keybroker.versions AS v (key_id, number, state, created_at, uses, material, origin)
    VALUES (%(key_id)s, %(number)s, %(state)s, %(created_at)s, %(uses)s, %(material)s, %(origin)s)
    ON CONFLICT (key_id, number) DO UPDATE SET
        state = EXCLUDED.state,
        created_at = EXCLUDED.created_at,
        uses = GREATEST(v.uses, EXCLUDED.uses),
        material = EXCLUDED.material,
        origin = EXCLUDED.origin
"""
# One atomic step across every broker. The CTE's FOR UPDATE takes the
# version row's lock, waiting for any concurrent reservation and then
# reading its committed count (READ COMMITTED re-reads a row it waited for);
# the grant is computed from that count and added under the same lock. The
# sum of all grants therefore never passes the limit. A NULL limit means
# unlimited.
_RESERVE: Final = """
    WITH cur AS (
        SELECT key_id, number,
               GREATEST(0, LEAST(%(count)s::bigint, COALESCE(%(limit)s::bigint - uses, %(count)s::bigint)))
                   AS granted
        FROM keybroker.versions WHERE key_id = %(key_id)s AND number = %(number)s
        FOR UPDATE
    )
    UPDATE keybroker.versions AS v SET uses = v.uses + cur.granted
    FROM cur WHERE v.key_id = cur.key_id AND v.number = cur.number
    RETURNING cur.granted
"""


def connection_defaults(options: PostgresOptions, node: str) -> dict[str, Any]:
    """libpq parameters every keybroker connection uses unless the DSN sets them.

    Timeouts, keepalives, and server settings passed at connect time (no
    extra round trip): the statement timeout, and an idle-in-transaction
    timeout so a broker that vanishes mid-transaction cannot hold row locks
    for long.
    """
    statement_ms = max(1, round(options.statement_timeout_s * 1000))
    # application_name is ASCII, at most 63 bytes; it shows in pg_stat_activity.
    app = "".join(c for c in f"keybroker {node}" if 32 <= ord(c) < 127)[:63]
    return {
        "connect_timeout": options.connect_timeout_s,
        "application_name": app,
        "options": (
            f"-c statement_timeout={statement_ms} -c idle_in_transaction_session_timeout={2 * statement_ms} "
            + _SERVER_KEEPALIVES
        ),
        **_KEEPALIVES,
    }


def _key_params(key: Key) -> dict[str, object]:
    params = key_columns(key)
    params["labels"] = Jsonb(params["labels"])
    return params


def _key_from_rows(rows: Sequence[tuple[Any, ...]]) -> Key:
    """One key from its joined rows (one per version; one row of NULLs when it has none)."""
    return key_from_columns(
        dict(zip(KEY_COLUMNS, rows[0][:_N_KEY], strict=True)),
        (dict(zip(VERSION_COLUMNS, r[_N_KEY:], strict=True)) for r in rows if r[_N_KEY] is not None),
    )


def _keys_from_rows(rows: Iterable[tuple[Any, ...]]) -> list[Key]:
    """Keys from rows ordered by key then version number."""
    keys: list[Key] = []
    group: list[tuple[Any, ...]] = []
    for row in rows:
        if group and bytes(group[0][0]) != bytes(row[0]):
            keys.append(_key_from_rows(group))
            group = []
        group.append(row)
    if group:
        keys.append(_key_from_rows(group))
    return keys


# --- work run in a worker thread, on a lent connection --------------------------------


def _notify(conn: Connection, payload: str) -> None:
    conn.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, payload))


def _insert(conn: Connection, key: Key, payload: str) -> None:
    try:
        conn.execute(_INSERT_KEY, _key_params(key))
    except psycopg.errors.UniqueViolation as exc:
        constraint = exc.diag.constraint_name or ""
        what = "the same id as" if constraint.endswith("pkey") else "the name"
        raise AlreadyExists(f"a key with {what} {key.name!r} exists") from None
    with conn.cursor() as cur:
        cur.executemany(_UPSERT_VERSION, [version_columns(key.id, v) for v in key.versions])
    _notify(conn, payload)


def _replace(conn: Connection, key: Key, expected_revision: int, payload: str) -> None:
    params = _key_params(key)
    params["expected_revision"] = expected_revision
    if conn.execute(_UPDATE_KEY, params).rowcount == 0:
        row = conn.execute("SELECT revision FROM keybroker.keys WHERE id = %s", (key.id,)).fetchone()
        raise lost_replace(key, None if row is None else int(row[0]), expected_revision)
    # The key row stays locked by our UPDATE until commit, so its versions
    # cannot change under us except through reserve_uses, which only raises
    # `uses` (and the upsert keeps the larger count). Only versions that
    # differ are written: a rotation of a key with 600 versions writes one
    # row, not 600.
    stored = {
        int(r[0]): (str(r[1]), int(r[2]), int(r[3]), bytes(r[4]), str(r[5]))
        for r in conn.execute(
            "SELECT number, state, created_at, uses, material, origin FROM keybroker.versions "
            "WHERE key_id = %s",
            (key.id,),
        )
    }
    keep = {v.number for v in key.versions}
    gone = sorted(set(stored) - keep)
    if gone:
        # Not something the lifecycle does, but "write all versions" means
        # the stored key must equal the written one.
        conn.execute(
            "DELETE FROM keybroker.versions WHERE key_id = %s AND number = ANY(%s)", (key.id, gone)
        )
    changed = []
    for version in key.versions:
        old = stored.get(version.number)
        new = (version.state.value, version.created_at, version.uses, version.material, version.origin)
        if old is None or old[:2] != new[:2] or old[3:] != new[3:] or version.uses > old[2]:
            changed.append(version_columns(key.id, version))
    if changed:
        # Erased material is written as empty bytea here: no reader sees the
        # old blob once this commits. PostgreSQL keeps the dead row version
        # until VACUUM reclaims it (docs/cluster.md).
        with conn.cursor() as cur:
            cur.executemany(_UPSERT_VERSION, changed)
    _notify(conn, payload)


def _reserve(conn: Connection, key_id: bytes, version: int, count: int, limit: int | None) -> int:
    params = {"count": count, "limit": limit, "key_id": key_id, "number": version}
    row = conn.execute(_RESERVE, params).fetchone()
    if row is None:
        if conn.execute("SELECT 1 FROM keybroker.keys WHERE id = %s", (key_id,)).fetchone() is None:
            raise NotFound("no key with that id")
        raise NotFound(f"the key has no version {version}")
    return int(row[0])


@final
class PostgresStore:
    """keybroker's :class:`~broker.store.Store` over one PostgreSQL database.

    Args:
        options: ``[plugins.postgres]``, parsed; its DSN is never shown.
        node: this broker's name (``config.node``). Change notifications
            carry it (for operators) and a random instance id, which this
            broker's cluster feed uses to skip its own changes (brokers on
            one host may share a node name).
    """

    def __init__(self, options: PostgresOptions, *, node: str) -> None:
        self.name: str = "postgres"
        self.options = options
        self.node = node
        self.instance = secrets.token_hex(8)
        conninfo = options.dsn.conninfo(**connection_defaults(options, node))
        self.pool = Pool(
            conninfo,
            options.dsn,
            size=options.pool_max,
            keep=options.pool_min,
            call_timeout_s=options.call_timeout_s,
        )
        self._open = False

    def __repr__(self) -> str:
        # Never the DSN: it may hold a password.
        return f"PostgresStore({self.options.dsn.where()!r}, node={self.node!r})"

    def _payload(self, name: str) -> str:
        return json.dumps({"node": self.node, "broker": self.instance, "name": name}, separators=(",", ":"))

    # --- lifecycle -------------------------------------------------------------

    async def open(self) -> None:
        """Connect ``pool_min`` connections (at least one) and migrate the schema.

        Raises:
            SchemaError: the database is newer than this keybroker, not a key
                store, or not UTF8.
            Unavailable: the database cannot be reached.
        """
        if self._open:
            raise RuntimeError("the store is already open")
        where = self.options.dsn.where()

        def setup(conn: Connection) -> None:
            migrate(conn, where=where)

        await self.pool.open(setup)
        self._open = True

    async def aclose(self) -> None:
        """Close idle connections; calls in flight close theirs when done. Idempotent."""
        self._open = False
        await self.pool.aclose()

    # --- writes ----------------------------------------------------------------

    async def insert_key(self, key: Key) -> None:
        """Add ``key`` and all its versions in one transaction, and announce it.

        Raises:
            AlreadyExists: the name (or the id) is taken.
            Unavailable: the database cannot be written.
        """
        payload = self._payload(key.name)
        await self.pool.run(lambda c: transaction(c, lambda t: _insert(t, key, payload)))

    async def replace_key(self, key: Key, *, expected_revision: int) -> None:
        """Write ``key`` (all fields and versions) if the stored revision is ``expected_revision``.

        One transaction: the compare-and-swap on the revision, the key row,
        the versions that differ, and the change notification. A version's
        stored ``uses`` never goes down (see :meth:`reserve_uses`).

        Raises:
            StaleRevision: the stored revision is not ``expected_revision``.
            NotFound: no key has ``key.id``.
            Unavailable: the database cannot be written (including
                :class:`~keybroker_postgres.pool.OutcomeUnknown` when the
                connection died during the commit).
        """
        payload = self._payload(key.name)
        await self.pool.run(lambda c: transaction(c, lambda t: _replace(t, key, expected_revision, payload)))

    async def reserve_uses(self, key_id: bytes, version: int, count: int, limit: int | None) -> int:
        """Atomically add up to ``count`` to the version's uses, never past ``limit``, across brokers.

        Does not change the key's revision and sends no notification: other
        brokers' cached keys stay current.

        Returns:
            The number granted: ``count``, or what is left below ``limit``
            (0 once it is reached). ``limit`` None means unlimited.

        Raises:
            NotFound: no such key or version.
            ValueError: ``count`` is negative.
        """
        if count < 0:
            raise ValueError("count must not be negative")
        key_id = bytes(key_id)
        return await self.pool.run(
            lambda c: transaction(c, lambda t: _reserve(t, key_id, version, count, limit))
        )

    # --- reads -----------------------------------------------------------------

    async def get_key(self, name: str) -> Key | None:
        """The key named ``name``, or None."""
        rows = await self.pool.run(lambda c: c.execute(_SELECT_BY_NAME, (name,)).fetchall())
        return _key_from_rows(rows) if rows else None

    async def get_key_by_id(self, key_id: bytes) -> Key | None:
        """The key whose 16-byte id is ``key_id``, or None."""
        key_id = bytes(key_id)
        rows = await self.pool.run(lambda c: c.execute(_SELECT_BY_ID, (key_id,)).fetchall())
        return _key_from_rows(rows) if rows else None

    async def list_keys(
        self, *, prefix: str = "", state: KeyState | None = None, after: str | None = None, limit: int = 100
    ) -> list[Key]:
        """Up to ``limit`` keys ordered by name, with names > ``after``, starting with ``prefix``.

        Args:
            prefix: only names starting with it (literally).
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
        params = {
            "prefix": prefix,
            "after": after,
            "state": None if state is None else state.value,
            "limit": limit,
            "scheduled": scheduled,
        }
        rows = await self.pool.run(lambda c: c.execute(_SELECT_PAGE, params).fetchall())
        return _keys_from_rows(rows)

    # --- documents -------------------------------------------------------------

    async def put_document(self, kind: str, doc_id: str, body: bytes) -> None:
        """Store ``body`` under ``(kind, doc_id)``, replacing what was there, in one transaction.

        Raises:
            ValueError: a malformed kind or id (see :func:`broker.store.check_document_ref`).
            Unavailable: the database cannot be written.
        """
        check_document_ref(kind, doc_id)
        blob = bytes(body)
        await self.pool.run(
            lambda c: transaction(
                c,
                lambda t: t.execute(
                    "INSERT INTO keybroker.documents (kind, id, body) VALUES (%s, %s, %s) "
                    "ON CONFLICT (kind, id) DO UPDATE SET body = EXCLUDED.body",
                    (kind, doc_id, blob),
                ),
            )
        )

    async def get_document(self, kind: str, doc_id: str) -> bytes | None:
        """The body stored under ``(kind, doc_id)``, or None."""
        check_document_ref(kind, doc_id)
        row = await self.pool.run(
            lambda c: c.execute(
                "SELECT body FROM keybroker.documents WHERE kind = %s AND id = %s", (kind, doc_id)
            ).fetchone()
        )
        return None if row is None else bytes(row[0])

    async def list_documents(
        self, kind: str, *, after: str | None = None, limit: int = 100
    ) -> list[tuple[str, bytes]]:
        """Up to ``limit`` ``(id, body)`` pairs of ``kind``, ordered by id (code points), ids > ``after``."""
        check_document_ref(kind, "x" if after is None else after)
        if limit < 0:
            raise ValueError("limit must not be negative")
        rows = await self.pool.run(
            lambda c: c.execute(
                "SELECT id, body FROM keybroker.documents WHERE kind = %s AND (%s::text IS NULL OR id > %s) "
                "ORDER BY id LIMIT %s",
                (kind, after, after, limit),
            ).fetchall()
        )
        return [(str(r[0]), bytes(r[1])) for r in rows]

    # --- diagnostics -------------------------------------------------------------

    async def settings(self) -> dict[str, object]:
        """What the server runs this store's sessions with, for operators and tests.

        Keys: ``schema_version`` (stored), ``schema_version_known`` (the
        newest this code can migrate to), ``fsync``, ``synchronous_commit``,
        ``statement_timeout``, ``tcp_keepalives_idle`` (0 over a Unix
        socket), ``server_version``.
        """

        def read(conn: Connection) -> dict[str, object]:
            found: dict[str, object] = {}
            for name in (
                "fsync", "synchronous_commit", "statement_timeout", "tcp_keepalives_idle", "server_version"
            ):
                row = conn.execute(f"SHOW {name}").fetchone()
                found[name] = None if row is None else row[0]
            row = conn.execute("SELECT schema_version FROM keybroker.meta").fetchone()
            found["schema_version"] = None if row is None else int(row[0])
            found["schema_version_known"] = SCHEMA_VERSION
            return found

        return await self.pool.run(read)
