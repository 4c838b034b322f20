"""A few psycopg connections lent to worker threads, with the waiting done in trio.

psycopg's asynchronous API needs asyncio, so the store uses synchronous
connections in worker threads (``trio.to_thread.run_sync``), at most
``size`` at once under a :class:`trio.CapacityLimiter`. A call queues in
trio, where it can be cancelled, rather than inside a blocked thread.

Why not ``psycopg_pool.ConnectionPool``: its waiters block in threads, and
after an outage it reconnects in the background with an exponential backoff
that starts at one second and doubles (``AttemptWithBackoff``), so requests
keep failing for seconds after the server is back. Here every call that
finds no usable idle connection connects at once (bounded by
``connect_timeout``), so service resumes with the first request after the
server returns, and no thread runs when nothing is asked.

Health: an idle connection is checked without a round trip before it is
lent. A server that shut down or restarted has sent each idle session an
error and closed it, so its socket reads as ready; such a connection is
dropped. A call that still meets a dead connection (it died while idle
after the check) is retried once on a new connection, but only when the
failure came before the commit: see :func:`transaction`.

Cancellation: a worker thread cannot be interrupted. A call is abandoned
when its caller is cancelled or its ``call_timeout_s`` passes; its thread
finishes the statement (bounded by the server's ``statement_timeout``) and
hands the connection back, and its limiter token is released only then, so
the pool never lends more connections than ``size``. The caller of an
abandoned write cannot know whether it committed, as with any lost reply.
"""

from __future__ import annotations

import logging
import select
import threading
import time
from collections.abc import Callable
from typing import Any, Final, TypeVar

import psycopg
import trio
from psycopg.pq import TransactionStatus

from broker.errors import Unavailable

from .options import Dsn

__all__ = ["MAX_CONNECTION_AGE_S", "OutcomeUnknown", "Pool", "transaction", "unavailable"]

log = logging.getLogger("keybroker.postgres")

# Connections are replaced after this long, so that a broker spreads over a
# failed-over or rebalanced server and the server frees per-session caches.
MAX_CONNECTION_AGE_S: Final = 1800.0
# Longest server message kept in an `unavailable` message.
_MAX_REASON = 200

_T = TypeVar("_T")
Connection = psycopg.Connection[tuple[Any, ...]]


class OutcomeUnknown(Unavailable):
    """The connection was lost while the commit was in flight: the change may or may not be applied."""


def transaction(conn: Connection, body: Callable[[Connection], _T]) -> _T:
    """Run ``body`` in one transaction on ``conn`` (autocommit mode); commit it.

    Returns:
        What ``body`` returns, once the commit is acknowledged (durable on
        the server with the default ``synchronous_commit``).

    Raises:
        OutcomeUnknown: the connection was lost during the commit.
        Exception: anything ``body`` raises, after a rollback.
    """
    committing = False
    try:
        with conn.transaction():
            result = body(conn)
            committing = True
    except psycopg.Error as exc:
        if committing and (conn.closed or conn.broken):
            raise OutcomeUnknown(
                "the connection to the key store was lost during a commit; the change may or may not "
                "have been applied"
            ) from exc
        raise
    return result


def unavailable(exc: BaseException, dsn: Dsn) -> Unavailable | None:
    """The Unavailable error for a failure of the medium, None for anything else (a bug).

    Operational errors (connection refused or lost, server shutting down,
    statement timeout, out of connections or disk) and interface errors (a
    closed connection) are the medium's; data and programming errors are
    bugs and keep their type. The message carries the server's first line
    with the DSN's secrets redacted, never a statement or its values.
    """
    if isinstance(exc, Unavailable):
        return exc
    if isinstance(exc, psycopg.errors.QueryCanceled):
        return Unavailable("the key store did not answer within its statement timeout")
    if not isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        return None
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:_MAX_REASON]
    state = getattr(exc, "sqlstate", None)
    return Unavailable(
        f"the key store is unavailable: {dsn.redact(first)}" + (f" (SQLSTATE {state})" if state else "")
    )


def _readable(conn: Connection) -> bool:
    """Whether the server sent something to an idle connection (a termination notice, EOF)."""
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
    return bool(poller.poll(0))


def _close_quietly(conn: Connection) -> None:
    try:
        conn.close()
    except psycopg.Error as exc:  # closing a dead connection may complain; it is closed anyway
        log.debug("closing a key store connection: %s", type(exc).__name__)


def _close_all(conns: list[Connection]) -> None:
    for conn in conns:
        _close_quietly(conn)


class Pool:
    """Up to ``size`` autocommit connections, lent one per worker thread.

    Args:
        conninfo: the full connection string (secrets included; never shown).
        dsn: the operator's DSN, for redacting messages and naming the server.
        size: most connections open and lent at once.
        keep: connections opened at start and kept idle afterwards.
        call_timeout_s: client-side bound on one call.
    """

    def __init__(self, conninfo: str, dsn: Dsn, *, size: int, keep: int, call_timeout_s: float) -> None:
        if not 0 <= keep <= size or size < 1 or call_timeout_s <= 0:
            raise ValueError("need 0 <= keep <= size, size >= 1 and a positive call timeout")
        self._conninfo = conninfo
        self.dsn = dsn
        self.size = size
        self.keep = keep
        self.call_timeout_s = call_timeout_s
        self._limiter = trio.CapacityLimiter(size)
        self._lock = threading.Lock()
        # (connection, time it was opened), most recently returned last.
        self._idle: list[tuple[Connection, float]] = []
        self._closed = False
        self.connects = 0  # connections opened so far, for tests and diagnostics

    def __repr__(self) -> str:
        return f"Pool({self.dsn.where()!r}, size={self.size})"

    # --- blocking helpers (worker threads) -------------------------------------------

    def connect(self) -> Connection:
        """Open a new autocommit connection. Blocking.

        Raises:
            Unavailable: the server cannot be reached or refuses us.
        """
        try:
            conn = psycopg.Connection.connect(self._conninfo, autocommit=True)
        except psycopg.Error as exc:
            error = unavailable(exc, self.dsn) or Unavailable("the key store cannot be reached")
            log.warning("cannot connect to the key store at %s: %s", self.dsn.where(), error.message)
            raise error from None
        self.connects += 1
        return conn

    def _usable(self, conn: Connection, born: float, now: float) -> bool:
        if conn.closed or conn.broken or now - born > MAX_CONNECTION_AGE_S:
            return False
        if conn.info.transaction_status != TransactionStatus.IDLE:
            return False
        return not _readable(conn)

    def _checkout(self) -> tuple[Connection, float, bool]:
        """An idle connection that looks alive, else a new one: (conn, born, fresh)."""
        now = time.monotonic()
        while True:
            with self._lock:
                if self._closed:
                    raise Unavailable("the key store is closed")
                if not self._idle:
                    break
                conn, born = self._idle.pop()
            if self._usable(conn, born, now):
                return conn, born, False
            _close_quietly(conn)
        return self.connect(), now, True

    def _checkin(self, conn: Connection, born: float) -> None:
        healthy = not (conn.closed or conn.broken) and conn.info.transaction_status == TransactionStatus.IDLE
        if healthy:
            with self._lock:
                if not self._closed and len(self._idle) < self.size:
                    self._idle.append((conn, born))
                    return
        _close_quietly(conn)

    def _call(self, fn: Callable[[Connection], _T]) -> _T:
        """Run ``fn`` on a lent connection; retry once on a new one if an idle one was dead."""
        conn, born, fresh = self._checkout()
        try:
            return fn(conn)
        except psycopg.Error:
            lost = conn.closed or conn.broken
            if not lost or fresh:
                raise
            # The connection died while idle, so nothing of this call was
            # committed (a lost commit raises OutcomeUnknown instead): the
            # call can run again, once, on a new connection.
            log.info("a key store connection was lost while idle; retrying on a new one")
        finally:
            self._checkin(conn, born)
        conn, born = self.connect(), time.monotonic()
        try:
            return fn(conn)
        finally:
            self._checkin(conn, born)

    def _translated(self, fn: Callable[[Connection], _T]) -> _T:
        try:
            return self._call(fn)
        except psycopg.Error as exc:
            error = unavailable(exc, self.dsn)
            if error is None:
                raise
            log.warning("key store call failed: %s", error.message)
            raise error from None

    # --- trio side -------------------------------------------------------------------

    async def open(self, setup: Callable[[Connection], None] | None = None) -> None:
        """Open ``keep`` connections (at least one) and run ``setup`` on the first.

        Raises:
            Unavailable: the server cannot be reached or failed during ``setup``.
            Exception: what ``setup`` raises otherwise (all connections closed).
        """

        def connect_all() -> list[Connection]:
            opened: list[Connection] = []
            try:
                for _ in range(max(1, self.keep)):
                    opened.append(self.connect())
                if setup is not None:
                    setup(opened[0])
            except BaseException as exc:
                for conn in opened:
                    _close_quietly(conn)
                error = unavailable(exc, self.dsn) if isinstance(exc, psycopg.Error) else None
                if error is not None:
                    raise error from None
                raise
            return opened

        opened = await trio.to_thread.run_sync(connect_all)
        now = time.monotonic()
        with self._lock:
            self._idle.extend((conn, now) for conn in opened[: self.keep])
        extra = opened[self.keep :]
        if extra:
            await trio.to_thread.run_sync(_close_all, extra)

    async def run(self, fn: Callable[[Connection], _T]) -> _T:
        """Call ``fn(connection)`` in a worker thread and return its result.

        ``fn`` runs whole statements or :func:`transaction` bodies; it must
        be safe to run twice when its first run failed before committing
        (every store call is).

        Raises:
            Unavailable: no connection, the server failed, or the call took
                longer than ``call_timeout_s`` (its thread is abandoned).

        Cancellation: the call is abandoned at once; its thread finishes on
        its own (see the module docstring).
        """
        if self._closed:
            raise Unavailable("the key store is closed")
        try:
            with trio.fail_after(self.call_timeout_s):
                return await trio.to_thread.run_sync(
                    self._translated, fn, limiter=self._limiter, abandon_on_cancel=True
                )
        except trio.TooSlowError:
            log.warning("a key store call took longer than %.1f s; abandoned", self.call_timeout_s)
            raise Unavailable(f"the key store did not answer within {self.call_timeout_s:g} s") from None

    async def aclose(self) -> None:
        """Close idle connections; lent ones close when handed back. Idempotent."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        if idle:
            await trio.to_thread.run_sync(_close_all, [conn for conn, _ in idle])
