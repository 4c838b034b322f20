"""The PKCS#11 session pool: sessions opened and logged in once, lent to one batch at a time.

Why it lives in this plugin rather than in ``broker/``: it is the only user,
it needs python-pkcs11 (an optional extra the core must import without), and
it turns PKCS#11 errors into :class:`~broker.errors.Unavailable` at this
plugin's edge, so the core never sees a binding type.

How a call runs (:meth:`SessionPool.run`):

1. Wait for one of ``size`` loans on a :class:`trio.CapacityLimiter`, at most
   until the pool's deadline (``wait_timeout_s`` after the call began); past
   it the caller gets ``Unavailable``, never a hang.
2. Take an idle session, or open (and if needed log in) a new one while
   holding the loan, so that never more than ``size`` sessions are open.
3. Run the caller's function with the session in a worker thread
   (:func:`in_worker_thread`, the primitive under ``trio.to_thread.run_sync``):
   token calls block, and python-pkcs11 releases the GIL around them. A
   whole batch is one loan.
4. Give the session back. One that failed with a session or device error
   (:data:`SESSION_ERRORS`) is closed and the call retried on a *fresh*
   session, up to ``retries`` times within the same deadline; when the token
   is gone the open fails and the caller gets ``Unavailable``.

:class:`~keybroker_pkcs11.coalesce.Coalescer` sits in front of :meth:`SessionPool.run` for small
batches: concurrent callers on one key version share a loan, because on a
fast token the thread trip costs more than the token call.

Cancellation: a cancelled waiter simply leaves the queue. A token call cannot
be interrupted, so the worker thread is never abandoned: the cancellation is
delivered when the call returns, and the session goes back to the pool.

Sessions are never shared between threads: a lent session belongs to one
thread (python-pkcs11 documents "single session per process" trouble with some
modules under concurrent use of one session), while different sessions run in
parallel; that needs the module initialized with CKF_OS_LOCKING_OK, which
:func:`~keybroker_pkcs11._cryptoki.load_library` does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Final, Protocol, TypeVar, final

import outcome
import trio
from pkcs11 import PKCS11Error
from pkcs11.exceptions import (
    DeviceError,
    DeviceRemoved,
    GeneralError,
    PinIncorrect,
    PinLocked,
    SessionClosed,
    SessionHandleInvalid,
    SlotIDInvalid,
    TokenNotPresent,
    TokenNotRecognised,
    UserNotLoggedIn,
)

from broker.errors import Unavailable

from ._cryptoki import USER_STATES, Cryptoki, load_library
from ._defaults import DEFAULT_POOL_SIZE, DEFAULT_WAIT_TIMEOUT_S

__all__ = [
    "DEFAULT_POOL_SIZE",
    "DEFAULT_RETRIES",
    "DEFAULT_WAIT_TIMEOUT_S",
    "SESSION_ERRORS",
    "Lease",
    "PoolCounters",
    "SessionPool",
    "SessionSource",
    "TokenSessions",
    "in_worker_thread",
]

_T = TypeVar("_T")

# A failed call is retried on a fresh session at most this often: once covers
# a session closed behind our back, twice also a stale idle one met next.
DEFAULT_RETRIES: Final = 2

#: Errors after which a session is not trusted again: it is closed, and the
#: call retried on a freshly opened one. GeneralError is here because
#: SoftHSM2 and others report a lost device that way; callers that expect it
#: for bad input (SoftHSM2's GCM tag mismatch) catch it themselves and check
#: :meth:`Lease.alive`.
SESSION_ERRORS: Final[tuple[type[PKCS11Error], ...]] = (
    SessionClosed,
    SessionHandleInvalid,
    DeviceError,
    DeviceRemoved,
    TokenNotPresent,
    TokenNotRecognised,
    GeneralError,
    UserNotLoggedIn,
)
# Open failures that mean the token went away: forget the cached Token object.
_GONE: Final = (SlotIDInvalid, TokenNotPresent, TokenNotRecognised, DeviceRemoved, SessionClosed)


class SessionSource(Protocol):
    """Where the pool's sessions come from. Every method blocks; the pool calls them in threads."""

    def open(self) -> Any:
        """A new logged-in session (python-pkcs11 ``Session``)."""

    def close(self, session: Any) -> None:
        """Close ``session`` without logging the application out; never raises."""

    def alive(self, session: Any) -> bool:
        """Whether ``session`` is still an open session of this application."""


@final
class Lease:
    """One pooled session, lent to one worker thread at a time.

    ``cache`` belongs to the pool's user: objects bound to this session
    (python-pkcs11 key objects, session copies of token keys) that die with
    it. ``mark`` is the user's bookkeeping (e.g. the last change it applied
    to ``cache``).
    """

    __slots__ = ("_source_alive", "cache", "mark", "number", "session")

    def __init__(self, session: Any, number: int, source: SessionSource) -> None:
        self.session = session
        self.number = number
        self.cache: dict[Any, Any] = {}
        self.mark = 0
        self._source_alive = source.alive

    def alive(self) -> bool:
        """Ask the module whether this session still exists (one cheap call)."""
        return self._source_alive(self.session)

    def __repr__(self) -> str:
        return f"<Lease #{self.number} cached={len(self.cache)}>"


@dataclass(slots=True)
class PoolCounters:
    """What the pool has done; read a consistent copy with :meth:`snapshot`.

    Attributes:
        size: sessions the pool may have open at once.
        open / peak_open: sessions open now / at most so far.
        in_use / peak_in_use: sessions on loan now / at most so far.
        loans: loans granted.
        waits: loans that had to queue because every session was busy.
        timeouts: waiters that gave up at the deadline (got ``unavailable``).
        errors: token calls that failed with a session or device error.
        replacements: sessions dropped after such an error (fresh ones are
            opened on demand).
        open_failures: attempts to open a session that failed.
    """

    size: int
    open: int = 0
    peak_open: int = 0
    in_use: int = 0
    peak_in_use: int = 0
    loans: int = 0
    waits: int = 0
    timeouts: int = 0
    errors: int = 0
    replacements: int = 0
    open_failures: int = 0

    def snapshot(self) -> PoolCounters:
        """A copy that later pool activity does not change."""
        return replace(self)


@final
class SessionPool:
    """Lends PKCS#11 sessions to whole calls (see the module docstring).

    Args:
        source: opens, closes and checks sessions (:class:`TokenSessions`).
        size: sessions open at most; also the calls in flight at most.
        wait_timeout_s: how long a call may wait for a session before
            ``Unavailable``; retries after a session error share it.
        retries: fresh-session retries after a session or device error.

    Resource handling:
        ``open`` and ``aclose`` are counted, so a root key and a backend can
        share one pool: the sessions close when the last user closes. A
        session on loan at that moment is closed when it comes back.
    """

    def __init__(
        self,
        source: SessionSource,
        *,
        size: int = DEFAULT_POOL_SIZE,
        wait_timeout_s: float = DEFAULT_WAIT_TIMEOUT_S,
        retries: int = DEFAULT_RETRIES,
    ) -> None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError("size must be a positive int")
        if not wait_timeout_s > 0:
            raise ValueError("wait_timeout_s must be positive")
        if retries < 0:
            raise ValueError("retries must not be negative")
        self.source = source
        self.size = size
        self.wait_timeout_s = float(wait_timeout_s)
        self.retries = retries
        self.counters = PoolCounters(size)
        self._loans = trio.CapacityLimiter(size)
        self._idle: list[Lease] = []
        self._users = 0
        self._numbered = 0

    def __repr__(self) -> str:
        c = self.counters
        return f"<SessionPool size={self.size} open={c.open} in_use={c.in_use} users={self._users}>"

    # --- lifecycle ---------------------------------------------------------

    async def open(self) -> None:
        """Start using the pool; the first user opens a session now, so a bad
        module path, token label or PIN fails at start-up.

        Raises:
            Unavailable: the first session cannot be opened (the message says why).

        Cancellation: safe; a cancelled first open leaves the pool closed.
        """
        self._users += 1
        if self._users > 1:
            return
        try:
            await self.run(_nothing)
        except BaseException:
            self._users -= 1
            raise

    async def aclose(self) -> None:
        """Stop using the pool; the last user's call closes the idle sessions. Idempotent.

        Cancellation: closing runs shielded, so sessions are not leaked.
        """
        if self._users == 0:
            return
        self._users -= 1
        if self._users:
            return
        idle, self._idle = self._idle, []
        with trio.CancelScope(shield=True):
            for lease in idle:
                self.counters.open -= 1
                await in_worker_thread(partial(self.source.close, lease.session))

    @property
    def closed(self) -> bool:
        return self._users == 0

    @property
    def idle(self) -> tuple[Lease, ...]:
        """The sessions not on loan right now (for diagnostics and fault tests)."""
        return tuple(self._idle)

    # --- loans ---------------------------------------------------------------

    async def run(self, fn: Callable[[Lease], _T]) -> _T:
        """Run ``fn(lease)`` in a worker thread on a pooled session and return its result.

        Args:
            fn: the whole unit of work (one batch); it must not keep the
                lease after returning. It may raise BrokerErrors; PKCS#11
                errors it lets out are handled here.

        Returns:
            What ``fn`` returned.

        Raises:
            Unavailable: the pool is closed, no session became free before the
                deadline, no session could be opened, a session or device
                error persisted through the retries, or the token refused
                the call (the message names the PKCS#11 error, never data).

        Cancellation: while waiting, the call leaves the queue. While ``fn``
            runs, the cancellation waits for it to return (a token call
            cannot be interrupted); the session then goes back to the pool.
        """
        if self._users == 0:
            raise Unavailable("the PKCS#11 session pool is closed")
        await trio.lowlevel.checkpoint_if_cancelled()
        deadline = trio.current_time() + self.wait_timeout_s
        fresh = False
        attempt = 0
        while True:
            lease = await self._borrow(deadline, fresh=fresh)
            failure: PKCS11Error | None = None
            try:
                return await in_worker_thread(partial(fn, lease))
            except SESSION_ERRORS as exc:
                self.counters.errors += 1
                failure = exc
            except PKCS11Error as exc:
                # The token refused this call; the session itself is fine.
                raise Unavailable(f"the token refused the operation ({type(exc).__name__})") from None
            finally:
                await self._give_back(lease, broken=failure is not None)
            attempt += 1
            if attempt > self.retries:
                raise Unavailable(
                    f"the token failed {attempt} times in a row ({type(failure).__name__})"
                ) from None
            fresh = True

    async def _borrow(self, deadline: float, *, fresh: bool) -> Lease:
        counters = self.counters
        try:
            # The common case costs no trip through the scheduler; waiters
            # queued before us still come first (acquire_nowait respects them).
            self._loans.acquire_nowait()
        except trio.WouldBlock:
            counters.waits += 1
            with trio.move_on_at(deadline) as scope:
                await self._loans.acquire()
            if scope.cancelled_caught:
                counters.timeouts += 1
                raise Unavailable(
                    f"no PKCS#11 session became free within {self.wait_timeout_s:g} s"
                ) from None
        try:
            if self._idle and not fresh:
                lease = self._idle.pop()
            else:
                if self._idle:
                    # Retrying after a session error: an idle session opened
                    # before it is suspect, and closing one keeps the count
                    # within size when the new one opens.
                    stale = self._idle.pop(0)
                    counters.open -= 1
                    counters.replacements += 1
                    with trio.CancelScope(shield=True):
                        await in_worker_thread(partial(self.source.close, stale.session))
                lease = await self._open_lease()
        except BaseException:
            self._loans.release()
            raise
        self._lent()
        return lease

    def _lent(self) -> None:
        counters = self.counters
        counters.loans += 1
        counters.in_use += 1
        counters.peak_in_use = max(counters.peak_in_use, counters.in_use)

    async def _open_lease(self) -> Lease:
        counters = self.counters
        try:
            # Not abandoned on cancel: the session it opens comes back to us
            # and reaches the caller's finally, instead of leaking.
            session = await in_worker_thread(self.source.open)
        except Unavailable:
            counters.open_failures += 1
            raise
        except (PKCS11Error, OSError, RuntimeError) as exc:
            counters.open_failures += 1
            raise Unavailable(f"cannot open a session on the token ({_describe(exc)})") from None
        self._numbered += 1
        counters.open += 1
        counters.peak_open = max(counters.peak_open, counters.open)
        return Lease(session, self._numbered, self.source)

    async def _give_back(self, lease: Lease, *, broken: bool) -> None:
        """Return a loan. No checkpoint unless the session must be closed, so a
        cancelled caller's finally still returns it."""
        counters = self.counters
        counters.in_use -= 1
        try:
            if broken or self._users == 0:
                counters.open -= 1
                if broken:
                    counters.replacements += 1
                lease.cache.clear()
                with trio.CancelScope(shield=True):
                    await in_worker_thread(partial(self.source.close, lease.session))
            else:
                self._idle.append(lease)
        finally:
            # Released only after the close: a new session may open only
            # once the old one is gone, so at most `size` are ever open.
            self._loans.release()


async def in_worker_thread(fn: Callable[[], _T]) -> _T:
    """``fn()`` in a cached worker thread; the trio loop keeps running meanwhile.

    The same primitive ``trio.to_thread.run_sync`` is built on
    (``trio.lowlevel.start_thread_soon``), without what a pool loan does not
    need: a second limiter (the loan already bounds the threads to the pool
    size), context copying and thread naming. Measured on the reference
    machine, that halves the trio-side cost of a small token call.

    Cancellation: a token call cannot be interrupted, so the thread is never
    abandoned: the caller waits for it, and the cancellation is delivered at
    its next checkpoint (which is how a loan always comes back).
    """
    task = trio.lowlevel.current_task()
    token = trio.lowlevel.current_trio_token()

    def deliver(result: outcome.Outcome[_T]) -> None:
        token.run_sync_soon(trio.lowlevel.reschedule, task, result)

    trio.lowlevel.start_thread_soon(fn, deliver)

    def abort(raise_cancel: object) -> trio.lowlevel.Abort:
        return trio.lowlevel.Abort.FAILED

    result: _T = await trio.lowlevel.wait_task_rescheduled(abort)
    return result


def _nothing(lease: Lease) -> None:
    return None


def _describe(exc: BaseException) -> str:
    # python-pkcs11's messages name the return code or the search; never a PIN.
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@final
class TokenSessions:
    """Opens logged-in read-write sessions on the token with a given label.

    Every session is opened *without* a PIN through python-pkcs11, so that
    its ``close`` never calls C_Logout (which would log out every session of
    the process). The first session that finds the application logged out
    logs in through :meth:`Cryptoki.login`. After the token has rejected the
    PIN once, no further login is tried until restart: repeated attempts
    with a wrong PIN lock the user PIN on most tokens.

    Args:
        module: path of the PKCS#11 module.
        token_label: label of the token to use.
        pin: the user PIN (kept for logging in again after the token comes
            back; never logged, never in ``repr``).
    """

    def __init__(self, module: str, token_label: str, pin: bytes) -> None:
        self.module = module
        self.token_label = token_label
        self._pin = pin
        self._token: Any = None
        self._pin_rejected: str | None = None
        self.cryptoki: Cryptoki | None = None

    def __repr__(self) -> str:
        return f"<TokenSessions module={self.module!r} token={self.token_label!r}>"

    def open(self) -> Any:
        """A new logged-in RW session (blocking).

        Raises:
            Unavailable: the PIN was rejected (now or earlier).
            pkcs11.PKCS11Error / OSError / RuntimeError: module, token or session trouble.
        """
        if self._pin_rejected is not None:
            raise Unavailable(
                f"the token rejected the configured PIN ({self._pin_rejected}); fix it and restart"
            )
        library, cryptoki = load_library(self.module)
        self.cryptoki = cryptoki
        token = self._token
        if token is None:
            token = library.get_token(token_label=self.token_label)
        try:
            session = token.open(rw=True)
        except _GONE:
            self._token = None
            raise
        try:
            if cryptoki.session_state(session.handle) not in USER_STATES:
                cryptoki.login(session.handle, self._pin)
        except (PinIncorrect, PinLocked) as exc:
            self._pin_rejected = type(exc).__name__
            self.close(session)
            raise Unavailable(f"the token rejected the configured PIN ({self._pin_rejected})") from None
        except BaseException:
            self.close(session)
            raise
        self._token = token
        return session

    def close(self, session: Any) -> None:
        """C_CloseSession; a session that is already gone is fine."""
        with contextlib.suppress(PKCS11Error):
            session.close()

    def alive(self, session: Any) -> bool:
        cryptoki = self.cryptoki
        return cryptoki is not None and cryptoki.session_state(session.handle) is not None

    def slot_id(self) -> int | None:
        """The token's slot id once a session has been opened (for diagnostics and tests)."""
        token = self._token
        return None if token is None else int(token.slot.slot_id)
