"""PostgresCluster: change notifications and scheduler leadership over one session.

One dedicated autocommit connection per broker, outside the store's pool:

- it ``LISTEN``s on ``keybroker_keys``. Every committed insert or replace
  of a key sends a notification in its own transaction (see
  :mod:`keybroker_postgres.store`), so a change is heard exactly when it
  commits. Notifications from this broker itself are skipped by the
  instance id in their payload.
- it holds the scheduler lock: a session-level advisory lock
  (``pg_try_advisory_lock``) retried every ``leader_retry_s``. The server
  drops the lock when the session ends, so when the leader dies (process,
  connection or host) another broker takes over within the retry interval
  of the server noticing. While it holds the lock, the leader runs a trivial
  query at the same interval: a session the server has ended shows up as a
  failed query, and leadership is given up at once.

Waiting happens in a worker thread, in slices of at most
:data:`POLL_S` (``conn.notifies(timeout=...)``), so cancellation is
honoured within a slice. When the connection is lost this broker stops
being leader at once, reconnects with a capped exponential backoff, and
reports ``changed("*")`` after reconnecting: notifications sent while it was
away are lost, so every cached key is suspect.

Two leaders at once cannot arise from this broker's side (it gives up
leadership as soon as its session fails). A partition can make the server
keep a dead leader's session, and its lock, until TCP keepalives expire it
(~10 s): the scheduler then pauses, which is the safe direction. Scheduled
changes go through the same optimistic revision check as every other, so
even an overlap would apply each due change once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Final, final

import psycopg
import trio

from broker.errors import Unavailable

from .pool import Connection
from .store import NOTIFY_CHANNEL, PostgresStore

__all__ = ["LEADER_LOCK", "POLL_S", "PostgresCluster"]

log = logging.getLogger("keybroker.postgres.cluster")

# "KBLD" (keybroker leader) in ASCII: our advisory lock key, apart from any
# other application's in the same database.
LEADER_LOCK: Final = 0x4B424C44
# Longest a worker-thread wait lasts: bounds how long cancellation takes
# and costs one thread hop per slice when nothing happens.
POLL_S: Final = 0.25
# Reconnection backoff: first retry soon (a restart takes about a second),
# then no more often than every few seconds while the server stays away.
RECONNECT_MIN_S: Final = 0.2
RECONNECT_MAX_S: Final = 5.0


class _Lost(Exception):
    """The cluster connection failed; reconnect."""


@final
class PostgresCluster:
    """The :class:`broker.cluster.Cluster` of brokers sharing one PostgreSQL store.

    Args:
        store: this broker's store (its connection settings and instance id).
        leader_retry_s: how often to try for leadership, and how often the
            leader checks its session (default: the store's option).
    """

    def __init__(self, store: PostgresStore, *, leader_retry_s: float | None = None) -> None:
        self.store = store
        self.leader_retry_s = store.options.leader_retry_s if leader_retry_s is None else leader_retry_s
        if self.leader_retry_s <= 0:
            raise ValueError("leader_retry_s must be positive")
        self._leader = False
        # One thread at a time uses the connection, and never more than one
        # worker thread is taken from trio's default pool.
        self._limiter = trio.CapacityLimiter(1)
        self.reconnects = 0  # for tests and diagnostics
        # The current connection's server process id, for operators and tests.
        self.backend_pid: int | None = None

    def __repr__(self) -> str:
        return f"PostgresCluster({self.store!r}, leader={self._leader})"

    def is_leader(self) -> bool:
        """Whether this broker holds the scheduler lock now."""
        return self._leader

    # --- blocking work (worker thread) -------------------------------------------------

    def _open_session(self) -> Connection:
        conn = self.store.pool.connect()
        try:
            conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
            self.backend_pid = conn.info.backend_pid
        except psycopg.Error as exc:
            conn.close()
            raise _Lost(type(exc).__name__) from None
        return conn

    def _wait(self, conn: Connection, timeout: float) -> list[str]:
        """Names changed by other brokers, waiting up to ``timeout`` for the first one."""
        names: list[str] = []
        try:
            for notify in conn.notifies(timeout=timeout, stop_after=1):
                name = self._name_from(notify.payload)
                if name is not None:
                    names.append(name)
        except psycopg.Error as exc:
            raise _Lost(type(exc).__name__) from None
        return names

    def _name_from(self, payload: str) -> str | None:
        try:
            message = json.loads(payload)
            name = message["name"]
            sender = message.get("broker")
        except (ValueError, TypeError, KeyError):
            # Not ours to interpret; another writer on the channel. Safe side:
            # it may announce a change we cannot name.
            log.warning("unexpected payload on %s; dropping every cached key", NOTIFY_CHANNEL)
            return "*"
        if sender == self.store.instance or not isinstance(name, str):
            return None
        return name

    def _lead(self, conn: Connection) -> bool:
        """Try for the lock (or, holding it, prove the session alive); whether we hold it."""
        try:
            if self._leader:
                conn.execute("SELECT 1")
                return True
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (LEADER_LOCK,)).fetchone()
        except psycopg.Error as exc:
            raise _Lost(type(exc).__name__) from None
        return bool(row and row[0])

    # --- trio side -------------------------------------------------------------------

    async def _connect(self) -> Connection:
        conn = await trio.to_thread.run_sync(self._open_session, limiter=self._limiter)
        try:
            self._leader = await trio.to_thread.run_sync(self._lead, conn, limiter=self._limiter)
        except BaseException:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(conn.close, limiter=self._limiter)
            raise
        if self._leader:
            log.info("this broker is now the scheduler leader")
        return conn

    async def _follow(self, conn: Connection, changed: Callable[[str], None]) -> None:
        """Report changes and keep leadership until the connection fails (raises _Lost)."""
        next_lead = trio.current_time() + self.leader_retry_s
        while True:
            timeout = max(0.0, min(POLL_S, next_lead - trio.current_time()))
            names = await trio.to_thread.run_sync(self._wait, conn, timeout, limiter=self._limiter)
            for name in names:
                changed(name)
            if trio.current_time() >= next_lead:
                was = self._leader
                self._leader = await trio.to_thread.run_sync(self._lead, conn, limiter=self._limiter)
                if self._leader and not was:
                    log.info("this broker is now the scheduler leader")
                next_lead = trio.current_time() + self.leader_retry_s

    async def run(
        self, changed: Callable[[str], None], *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Report every key another broker changes, and keep leadership, until cancelled.

        Args:
            changed: called with a key name, or ``"*"`` after a reconnection.
            task_status: started once this broker listens (from then on no
                committed change of another broker goes unreported).

        Raises:
            Unavailable: the first connection cannot be made (start-up).

        Cancellation: returns within one wait slice (:data:`POLL_S`), closing
        the connection, which ends the session and releases leadership.
        """
        try:
            conn: Connection | None = await self._connect()
        except _Lost as exc:
            raise Unavailable(f"the key store's notification channel failed ({exc})") from None
        task_status.started()
        delay = RECONNECT_MIN_S
        try:
            while True:
                if conn is not None:
                    try:
                        await self._follow(conn, changed)
                    except _Lost as exc:
                        log.warning("lost the key store's notification channel (%s); reconnecting", exc)
                    self._leader = False
                    dead, conn = conn, None
                    await trio.to_thread.run_sync(dead.close, limiter=self._limiter)
                await trio.sleep(delay)
                try:
                    conn = await self._connect()
                except (_Lost, Unavailable):
                    delay = min(delay * 2, RECONNECT_MAX_S)
                    continue
                delay = RECONNECT_MIN_S
                self.reconnects += 1
                # Notifications sent while we were away are lost.
                changed("*")
        finally:
            self._leader = False
            if conn is not None:
                # Closing ends the session: the server releases the lock now
                # rather than when it notices a dead peer.
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(conn.close, limiter=self._limiter)
