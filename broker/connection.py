"""One client connection: a reader, worker tasks for requests, one writer.

The reader decodes requests and queues them for worker tasks, each request
holding one of ``limits.max_inflight_per_connection`` slots; when all slots
are taken it stops reading, so the kernel's socket buffers push back on the
client. A slot is returned only once its response has been written. Slots
alone do not bound memory, as one small request (``datakey``) can ask for a
response of up to ``max_message_bytes``: so no request is started while the
responses waiting to be written, and those announced by requests still
running (:meth:`RequestContext.expect_response`), exceed
:func:`response_backlog` bytes, and a client that never reads pins about
that much, whatever it asks. Workers (at most
one per slot, parked when idle rather than spawned per request) run requests
concurrently; responses go out in completion order -- msgpack-rpc matches
them by msgid -- through a single writer task that sends everything ready at
once in one write, since one write per response costs several times more
under pipelined load. A lone request in flight is written directly by the
task that ran it, saving the hop to the writer on the request-reply path.

On that path (a request that arrives alone, nothing else in flight) the
reader runs the request itself, without a hop to a worker. Should the
request suspend, the reading role passes to a worker first, so the
connection keeps reading; see :meth:`Connection._read_loop`. A Unix-socket
reader that has drained its socket may poll it for a moment before it sleeps
(:mod:`broker.busypoll`); while it sleeps, the server's read hub watches the
socket and hands a lone request that the gatherer or a worker takes straight
to it, without waking the reader (:mod:`broker.readhub`).

Requests of one method that a handler lists in ``groupable`` and that wait
back to back in the queue (a client pipelining ``encrypt`` calls) are handed
to the handler in one ``handle_group`` call, at most ``MAX_GROUP`` at a
time: it answers each on its own, but shares the work they have in common.

A connection closes itself when the peer leaves, after ``idle_timeout_s``
with no request in flight, when a started message is not complete within
``message_timeout_s`` (slow-loris), when a response cannot be delivered
within ``message_timeout_s`` (a client that stopped reading), or when the
stream cannot be decoded. A failure here never reaches another connection.
"""

from __future__ import annotations

import collections
import logging
import math
import types
from collections.abc import Callable, Coroutine, Generator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol, cast, final

import trio

from .auth import Principal
from .busypoll import BusyPoller
from .config import Limits
from .errors import BrokerError, Internal, InvalidRequest, LimitExceeded
from .logs import failure
from .protocol import (
    BadRequest,
    ProtocolError,
    Request,
    RequestDecoder,
    encode_notification,
    encode_response,
    new_packer,
)
from .streamio import stream_io

if TYPE_CHECKING:
    from .gather import Gatherer
    from .readhub import ReadHub

__all__ = [
    "MAX_GROUP",
    "RESPONSE_BACKLOG_FLOOR",
    "Connection",
    "GroupHandler",
    "Handler",
    "RequestContext",
    "response_backlog",
    "run_group",
    "run_inline",
]

log = logging.getLogger("keybroker.connection")

# notify() waits while this much output is queued, so a subscriber that stops
# reading cannot make the broker buffer events without bound.
NOTIFY_HIGH_WATER: Final = 1 << 20
# Responses waiting to be written beyond which no request is started: a few
# writes' worth, so a fast reader never waits on it (see response_backlog).
RESPONSE_BACKLOG_FLOOR: Final = 4 << 20
# The most queued requests handed to one handle_group call.
MAX_GROUP: Final = 256
# Errors that mean the transport is gone; anything else is a bug.
_TRANSPORT_ERRORS: Final = (trio.BrokenResourceError, trio.ClosedResourceError)


async def run_inline(coro: Coroutine[Any, Any, None], on_suspend: Callable[[], None]) -> bool:
    """Run ``coro`` in this task; True if it finished without ever suspending.

    Should it suspend, ``on_suspend`` runs first (to hand this task's other
    duties to another task), then this task goes on running ``coro`` to its
    end and returns False.
    """
    try:
        trap = coro.send(None)
    except StopIteration:
        return True
    on_suspend()
    await _resume(coro, trap)
    return False


@types.coroutine
def _resume(coro: Coroutine[Any, Any, None], trap: Any) -> Generator[Any, Any, None]:
    """Go on running ``coro``, which suspended at ``trap``, in this task (as ``await`` would)."""
    while True:
        try:
            value = yield trap
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:  # delivered into coro, as trio would
            try:
                trap = coro.throw(exc)
            except StopIteration:
                return
        else:
            try:
                trap = coro.send(value)
            except StopIteration:
                return


def response_backlog(limits: Limits) -> int:
    """Bytes of responses waiting to be written beyond which a connection starts no request.

    At least one largest response (``max_message_bytes``), so that one can
    always be queued behind another. A request started below the bound adds
    at most one response, so a connection holds at most about twice this
    (plus a joined copy while it writes); a group of ``encrypt`` or
    ``decrypt`` requests taken at once adds one per request, responses that
    the requests' own bytes already bounded.
    """
    return max(RESPONSE_BACKLOG_FLOOR, limits.max_message_bytes)


def internal_error(exc: BaseException, method: str, where: str) -> Internal:
    """Log an unexpected exception under a fresh correlation id, and return the error to send.

    Only the exception's type and stack are logged: its message may quote
    request data, and this is a key broker.
    """
    error = Internal()
    log.error("internal error (correlation id %s) in %s on %s: %s",
              error.correlation_id, method, where, failure(exc))
    return error


async def run_group(
    handler: GroupHandler,
    contexts: Sequence[RequestContext],
    method: str,
    params: list[dict[str, Any]],
    where: str,
) -> list[Any]:
    """The outcome of each request of a ``handle_group`` call (a result or a BrokerError).

    If the call itself fails, or miscounts, every request fails with that
    error (``internal`` for anything but a BrokerError).
    """
    try:
        outcomes = await handler.handle_group(contexts, method, params)
        if len(outcomes) != len(params):
            raise RuntimeError(f"{len(outcomes)} outcomes for {len(params)} requests")
    except BrokerError as exc:
        return [exc] * len(params)
    except Exception as exc:
        return [internal_error(exc, method, where)] * len(params)
    return outcomes


@dataclass(eq=False)
class RequestContext:
    """What a handler knows about the caller; one per connection.

    Attributes:
        principal: the authenticated peer.
        connection_id: unique within the server process, for logs and audit.
        keep_open: set by a handler (``subscribe``) so the idle timeout no
            longer closes a connection that only receives notifications.
    """

    principal: Principal
    connection_id: int
    keep_open: bool = False
    _connection: Connection | None = field(default=None, repr=False)

    async def notify(self, method: str, params: list[Any]) -> None:
        """Send ``[2, method, params]`` to this connection's client.

        Notifications share the response writer, so they never interleave
        with a response's bytes. A context without a connection (an
        in-process caller) drops them.

        Raises:
            trio.BrokenResourceError: the connection is closed.
            TypeError / ValueError: ``params`` is not msgpack-encodable.

        Cancellation: safe; a notification is either queued whole or not at all.
        """
        if self._connection is not None:
            await self._connection.notify(method, params)

    def expect_response(self, size: int) -> None:
        """The request being run (by this task) will answer with up to ``size`` bytes.

        Counted against the connection's response backlog from now until the
        request is answered, so that requests which suspend before they
        answer (reserving uses, say) are not all started meanwhile. Callers
        announce responses that may be large (``datakey``, batches) before
        the work; a context without a connection ignores it.
        """
        if self._connection is not None:
            self._connection.expect_response(size)


class Handler(Protocol):
    """What the transport calls; the service layer implements it.

    A handler may also have a ``suspending`` attribute: the frozenset of
    methods whose every request waits (for a flush, say) before it is
    answered. A lone request of one of them is handed to a worker rather
    than run by the reading task (see :meth:`Connection._read_loop`).
    """

    async def handle(self, ctx: RequestContext, method: str, params: dict[str, Any]) -> Any:
        """Run one request and return a msgpack-encodable result.

        Raises:
            BrokerError: reported to the caller as that error code; any other
                exception becomes ``internal``.
        """
        ...

    def connection_closed(self, ctx: RequestContext) -> None:
        """Called once when the connection of ``ctx`` has closed."""
        ...


class GroupHandler(Handler, Protocol):
    """A handler that can also take queued requests of one method together.

    Attributes:
        groupable: the methods :meth:`handle_group` accepts.
    """

    groupable: frozenset[str]

    async def handle_group(
        self, contexts: Sequence[RequestContext], method: str, params: list[dict[str, Any]]
    ) -> list[Any]:
        """Run several requests of ``method``; one outcome per request, in order.

        ``contexts[i]`` is the caller of ``params[i]``: a group may hold
        requests of several connections and principals.

        Each outcome is the request's result or the :class:`BrokerError` it
        fails with, exactly as :meth:`handle` would have returned or raised
        for that request alone.

        Raises:
            BrokerError: every request fails with it.
        """
        ...


@final
class Connection:
    """Serves msgpack-rpc requests on one stream.

    Args:
        stream: a connected (and, for TLS, handshaken) stream; this object
            closes it.
        principal: the authenticated peer.
        connection_id: unique id for logs.
        handler: the service.
        limits: the configured limits.
        poller: grants a Unix-socket connection that has read everything a
            moment of polling for the next request (``[limits] busy_poll_us``).
        gatherer: runs lone requests of groupable methods from several
            connections together while the server is busy (:mod:`broker.gather`).
        hub: watches a Unix-socket connection's socket while its reader
            waits, and hands what arrives to the gatherer when it can
            (:mod:`broker.readhub`, :meth:`_consume`).
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        principal: Principal,
        connection_id: int,
        handler: Handler,
        limits: Limits,
        poller: BusyPoller | None = None,
        gatherer: Gatherer | None = None,
        hub: ReadHub | None = None,
    ) -> None:
        self._stream = stream
        self._gatherer = gatherer
        # Requests given to the gatherer and not yet answered.
        self._gathered = 0
        self._gathered_done = trio.Event()
        self._io = stream_io(stream, poller, hub, self._consume)
        # What _consume left for the reader: the requests it decoded, a lone
        # request it counted in flight for the reader to run, or the error
        # that stopped decoding.
        self._kept: list[Request | BadRequest] | Request | ProtocolError | None = None
        self._handler = handler
        self._groupable: frozenset[str] = getattr(handler, "groupable", frozenset())
        self._suspending: frozenset[str] = getattr(handler, "suspending", frozenset())
        self._limits = limits
        self.context = RequestContext(principal, connection_id, _connection=self)
        self._decoder = RequestDecoder(limits.max_message_bytes)
        self._packer = new_packer()
        # Requests read whose response is not yet written; the reader waits
        # on _slot_freed while this is at the limit.
        self._inflight = 0
        self._max_inflight = limits.max_inflight_per_connection
        self._slot_freed = trio.Event()
        self._idle_since = trio.current_time()
        self._partial_since: float | None = None
        # Writer state: queued frames, and how many of them are responses
        # (each holds an in-flight slot until written).
        self._pending: list[bytes] = []
        self._pending_responses = 0
        self._pending_bytes = 0
        self._sending_bytes = 0  # of the write under way
        self._max_backlog = response_backlog(limits)
        # Responses announced by requests still running (expect_response),
        # by the task running each, and their total.
        self._expected: dict[trio.lowlevel.Task, int] = {}
        self._expected_bytes = 0
        self._writing = False  # the writer task is inside send_all
        self._wakeup = trio.Event()
        self._flushed = trio.Event()
        self._closing = False  # no more requests: the writer exits once empty
        self._closed = False  # nothing more will be written
        self._draining = False
        self._nursery: trio.Nursery | None = None
        # Worker tasks run requests. Spawning a task per request costs more
        # than the rest of the transport on pipelined load, so workers are
        # kept (at most one per in-flight slot) and parked when idle.
        self._workers_nursery: trio.Nursery | None = None
        self._queue: collections.deque[Request | BadRequest] = collections.deque()
        self._idle_workers: list[trio.lowlevel.Task] = []
        self._workers = 0
        self._waking = 0  # workers woken or spawned that have not run yet
        self._counted_wakes: set[trio.lowlevel.Task] = set()
        self._reader_done = False
        self._reader_wanted = False  # the reading role awaits a worker
        # Covers the current reader's loop. The watchdog (timeouts) and
        # begin_drain cancel it, but only while the reader waits.
        self._read_scope: trio.CancelScope | None = None
        self._receiving = False  # the reader waits for the peer
        self._held_back = False  # the reader waits for a free slot
        self._timed_out: str | None = None  # set by the watchdog
        self._watchdog_scope = trio.CancelScope()

    @property
    def connection_id(self) -> int:
        return self.context.connection_id

    async def run(self) -> None:
        """Serve until the peer leaves, a limit trips, or a drain completes.

        Never raises for anything the peer does; the stream is closed and
        ``handler.connection_closed`` called on the way out.

        Cancellation: cancels in-flight requests and closes the stream.
        """
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._write_loop)
                nursery.start_soon(self._watchdog)
                async with trio.open_nursery() as workers:
                    self._workers_nursery = workers
                    try:
                        # This task reads first; should the role pass to a
                        # worker, it works until reading has ended.
                        await self._read_role()
                        await self._work()
                    finally:
                        # Workers finish what is queued, then exit.
                        self._end_reading()
                    while self._gathered:  # requests run by the gatherer
                        self._gathered_done = trio.Event()
                        await self._gathered_done.wait()
                # Every response is queued now; let the writer flush and stop.
                self._closing = True
                self._wakeup.set()
                self._watchdog_scope.cancel()
        finally:
            self._mark_closed()
            # The hook runs before the (checkpointing) close, so a
            # cancellation arriving meanwhile cannot skip it.
            try:
                self._handler.connection_closed(self.context)
            except Exception as exc:
                log.error(
                    "connection %d: connection_closed hook failed: %s", self.connection_id, failure(exc)
                )
            self._io.detach()
            await trio.aclose_forcefully(self._stream)

    def begin_drain(self) -> None:
        """Stop reading requests; finish those in flight, flush, then close.

        Idempotent. The caller bounds how long the drain may take by
        cancelling :meth:`run`.
        """
        self._draining = True
        if self._read_scope is not None and (self._receiving or self._held_back):
            self._read_scope.cancel()

    async def notify(self, method: str, params: list[Any]) -> None:
        """See :meth:`RequestContext.notify`."""
        while not self._closed and self._pending_bytes > NOTIFY_HIGH_WATER:
            await self._flushed.wait()
        if self._closed:
            raise trio.BrokenResourceError("connection closed")
        self._enqueue(encode_notification(method, params, self._packer), responses=0)

    # -- reading -------------------------------------------------------------

    async def _read_role(self) -> None:
        """Read requests until reading ends, or until the role passes to a worker."""
        if await self._read_loop():
            self._end_reading()

    def _end_reading(self) -> None:
        self._reader_done = True
        self._wake_all_workers()

    async def _read_loop(self) -> bool:
        """Read and queue requests; True when reading has ended, False when the role passed on.

        A request that arrives alone, with nothing else in flight (a client
        waiting for each reply), is run here rather than handed to a worker:
        it is answered one scheduler round sooner. Most complete without
        ever suspending. One that does suspend (an fsync, a thread) first
        passes the reading role to a worker, so that further requests on the
        connection are read and run meanwhile, and this task becomes a worker
        once its request is done. A request of a method the handler lists in
        ``suspending`` always waits before it answers (for a flush): it goes
        to a worker at once, and this task goes on reading, as handing over
        a request costs less than handing over the reading role (a cancel
        scope of its own, and every resumption through :func:`run_inline`).
        The read scope is cancelled (drain, idle and message timeouts) only
        while the reader waits for the peer or for a slot, never while it
        runs a request. While it waits for the peer on a Unix socket, the
        read hub may read for it and hand requests on (:meth:`_consume`);
        ``receive`` then returns None, and ``_kept`` holds what is left for
        this task.
        """
        with trio.CancelScope() as scope:
            self._read_scope = scope
            while not self._draining:
                self._receiving = True
                gatherer = self._gatherer
                try:
                    # Poll only with nothing in flight: a client waiting for a
                    # reply sends nothing, and the poll would take the CPU
                    # (and the GIL) from the work it waits for.
                    data = await self._io.receive(
                        poll=self._inflight == 0,
                        watched=gatherer is not None and gatherer.busy_elsewhere(self, self._inflight),
                    )
                except _TRANSPORT_ERRORS:
                    self._abort("connection lost")
                    return True
                finally:
                    self._receiving = False
                broken: ProtocolError | None = None
                if data is None:  # the hub read it, and _consume kept it for us
                    kept, self._kept = self._kept, None
                    if isinstance(kept, ProtocolError):
                        broken, kept = kept, kept.events
                    if isinstance(kept, Request):  # a lone request, counted, for this task to run
                        if await run_inline(self._dispatch(kept), self._pass_reading):
                            continue
                        return False
                    assert kept is not None
                    events = kept
                elif not data:
                    return True  # EOF: answer what is in flight, then close.
                else:
                    try:
                        events = self._decode(data)
                    except ProtocolError as exc:
                        broken, events = exc, exc.events
                for event in events:
                    # Backpressure: with every slot taken, stop reading. No
                    # checkpoint otherwise: a scheduler round trip per
                    # pipelined request would dominate their cost.
                    while self._inflight >= self._max_inflight:
                        self._slot_freed = trio.Event()
                        self._held_back = True
                        try:
                            await self._slot_freed.wait()
                        finally:
                            self._held_back = False
                    self._count_in()
                    # Alone, unless cancelled while the data came in: then a worker runs it.
                    alone = broken is None and self._inflight == 1 and len(events) == 1
                    alone = alone and not scope.cancel_called
                    if alone and type(event) is Request:
                        if self._hand_off(event):
                            continue
                        if await run_inline(self._dispatch(event), self._pass_reading):
                            continue  # answered without suspending
                        return False
                    self._submit(event)
                if broken is not None:
                    # Read no more; answer what came before the bad bytes, then close.
                    log.info("connection %d closing: %s", self.connection_id, broken.reason)
                    return True
        if self._timed_out == "message":
            self._abort("message not completed in time")
        elif self._timed_out == "idle":
            log.debug("connection %d: idle timeout", self.connection_id)
        return True

    def _count_in(self) -> None:
        """One more request read and not yet answered, here and in the gatherer's count
        (:meth:`_responses_written` counts it out of both)."""
        self._inflight += 1
        if self._gatherer is not None:
            self._gatherer.inflight += 1

    def _decode(self, data: bytes | bytearray | memoryview) -> list[Request | BadRequest]:
        """The requests completed by ``data``.

        Raises:
            ProtocolError: the stream cannot be decoded.
        """
        events = self._decoder.feed(data)
        if not self._decoder.in_progress:
            self._partial_since = None
        elif events or self._partial_since is None:
            self._partial_since = trio.current_time()
        return events

    def _hand_off(self, event: Request) -> bool:
        """Give a lone request to the gatherer or to a worker; False if the reader should run it.

        The gatherer takes it while other connections have requests in
        flight (to run it with theirs); a worker takes a request of a
        ``suspending`` method (see :meth:`_read_loop`).
        """
        gatherer = self._gatherer
        if gatherer is not None and gatherer.takes(self, event.method):
            self._gathered += 1
            gatherer.add(self, event)
            return True
        if event.method in self._suspending:
            self._submit(event)
            return True
        return False

    def _consume(self, data: memoryview) -> bool:
        """Bytes the hub read while the reader waits: True if dealt with here.

        A lone request that the gatherer or a worker takes (see
        :meth:`_hand_off`) goes to it here, as the reader would have sent
        it, and the reader stays parked; so does the start of a request
        still incomplete. Anything else (several requests, a lone request
        the reader runs itself, bytes that cannot be decoded) is kept in
        ``_kept`` for the reader, which the hub then wakes.
        """
        try:
            events = self._decode(data)
        except ProtocolError as exc:
            self._kept = exc
            return False
        if not events:
            return True  # a part of a request: the reader goes on waiting
        scope = self._read_scope
        if (
            len(events) != 1 or self._inflight or scope is None or scope.cancel_called or self._draining
            or type(event := events[0]) is not Request
        ):
            self._kept = events
            return False
        self._count_in()
        if self._hand_off(event):
            return True
        self._kept = event
        return False

    def _read_deadline(self) -> float:
        if self._partial_since is not None:
            return self._partial_since + self._limits.message_timeout_s
        if self._inflight == 0 and not self.context.keep_open:
            return self._idle_since + self._limits.idle_timeout_s
        return math.inf

    async def _watchdog(self) -> None:
        """Enforce the idle and message timeouts.

        A separate task, so the per-request path never touches a deadline:
        it only records times, and this task re-reads them when it wakes.
        It wakes at least every ``min(idle, message timeout)``, so a deadline
        that appears while it sleeps (the last reply went out, a message
        started) is never passed by: that deadline lies at least one such
        period after the moment it started sleeping.
        """
        with self._watchdog_scope:
            await self._watch()

    async def _watch(self) -> None:
        limits = self._limits
        period = min(limits.idle_timeout_s, limits.message_timeout_s)
        while True:
            now = trio.current_time()
            deadline = self._read_deadline()
            # Only a peer we are waiting on can time out; not one we are
            # holding back because our own in-flight slots are full.
            if deadline <= now and self._receiving and self._read_scope is not None:
                self._timed_out = "message" if self._partial_since is not None else "idle"
                self._read_scope.cancel()
                return
            if deadline <= now:
                # Expired while we hold the peer back; look again shortly
                # after the reader is waiting on it once more.
                deadline = now + period / 8
            await trio.sleep_until(min(deadline, now + period))

    # -- workers -------------------------------------------------------------

    def _submit(self, event: Request | BadRequest) -> None:
        self._queue.append(event)
        self._wake_worker()

    def _wake_worker(self) -> None:
        """Make sure some worker will look at the queue soon.

        At most one wake-up is outstanding: a worker that runs requests
        without blocking drains the whole queue in one go (so a pipelined
        burst costs one wake-up); one that blocks in a handler wakes the next
        worker before it starts (see _worker), so requests still overlap.
        """
        if not self._waking and self._queue and not self._backlogged():
            self._rouse()

    def _backlogged(self) -> bool:
        """Too many response bytes wait to be written, or are announced by
        requests still running, to start another request.

        The writer wakes a worker once they have gone out (see _write_loop).
        """
        return self._pending_bytes + self._sending_bytes + self._expected_bytes > self._max_backlog

    def expect_response(self, size: int) -> None:
        """See :meth:`RequestContext.expect_response`; released when the request is answered (_dispatch)."""
        task = trio.lowlevel.current_task()
        self._expected[task] = self._expected.get(task, 0) + size
        self._expected_bytes += size

    def _pass_reading(self) -> None:
        """Have a worker take over reading (see :meth:`_read_loop`)."""
        self._reader_wanted = True
        if not self._waking:
            # A worker woken but not yet run takes the role instead. With
            # every worker busy and no room for another, the first to finish
            # takes it: then every slot is taken and there is nothing to read.
            self._rouse()

    def _rouse(self) -> None:
        """Wake an idle worker, or start one if there is room."""
        if self._idle_workers:
            task = self._idle_workers.pop()
            self._waking += 1
            self._counted_wakes.add(task)
            trio.lowlevel.reschedule(task)
        elif self._workers < self._limits.max_inflight_per_connection and self._workers_nursery is not None:
            self._waking += 1
            self._workers += 1
            self._workers_nursery.start_soon(self._worker)

    def _wake_all_workers(self) -> None:
        while self._idle_workers:
            trio.lowlevel.reschedule(self._idle_workers.pop())

    async def _worker(self) -> None:
        self._waking -= 1
        await self._work()

    async def _work(self) -> None:
        """Run queued requests (or take the reading role) until reading has ended."""
        task = trio.lowlevel.current_task()
        while True:
            if self._reader_wanted:
                self._reader_wanted = False
                await self._read_role()
                continue
            if self._queue and not self._backlogged():
                event = self._queue.popleft()
                group = self._take_group(event)
                self._wake_worker()  # for the rest of the queue, should we block
                if group is None:
                    await self._dispatch(event)
                else:
                    await self._dispatch_group(group)
                continue
            if self._reader_done and not self._queue:
                return
            self._idle_workers.append(task)

            def abort(_: Any, task: trio.lowlevel.Task = task) -> trio.lowlevel.Abort:
                self._idle_workers.remove(task)
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)
            if task in self._counted_wakes:
                self._counted_wakes.discard(task)
                self._waking -= 1

    def _take_group(self, event: Request | BadRequest) -> list[Request] | None:
        """``event`` and the queued requests of its method right behind it, if groupable."""
        if type(event) is not Request or event.method not in self._groupable:
            return None
        queue, group = self._queue, [event]
        while queue and len(group) < MAX_GROUP:
            head = queue[0]
            if type(head) is not Request or head.method != event.method:
                break
            group.append(queue.popleft())
        return group if len(group) > 1 else None

    # -- handling ------------------------------------------------------------

    async def _dispatch(self, event: Request | BadRequest) -> None:
        if type(event) is BadRequest:
            payload = self._encode_error(event.msgid, InvalidRequest(f"invalid request: {event.reason}"))
        else:
            assert type(event) is Request
            try:
                result = await self._handler.handle(self.context, event.method, event.params)
            except BrokerError as exc:
                payload = self._encode_error(event.msgid, exc)
            except Exception as exc:
                payload = self._encode_error(event.msgid, self._internal(exc, event.method))
            else:
                payload = self._encode_result(event.msgid, event.method, result)
            finally:
                if self._expected:  # this request announced its response: it is now made
                    self._expected_bytes -= self._expected.pop(trio.lowlevel.current_task(), 0)
        self._respond(payload, 1)

    async def _dispatch_group(self, group: list[Request]) -> None:
        handler = cast("GroupHandler", self._handler)  # it lists the method in groupable
        method = group[0].method
        outcomes = await run_group(
            handler, [self.context] * len(group), method, [r.params for r in group], self._where
        )
        self._respond(
            b"".join(
                self._encode_outcome(request.msgid, method, outcome)
                for request, outcome in zip(group, outcomes, strict=True)
            ),
            len(group),
        )

    def answer(self, request: Request, outcome: Any) -> None:
        """Respond to ``request``, which this connection gave to the gatherer.

        ``outcome`` is its result or the BrokerError it failed with.
        """
        self._gathered -= 1
        try:
            self._respond(self._encode_outcome(request.msgid, request.method, outcome), 1)
        finally:
            if not self._gathered:
                self._gathered_done.set()

    def _encode_outcome(self, msgid: int, method: str, outcome: Any) -> bytes:
        if isinstance(outcome, BrokerError):
            return self._encode_error(msgid, outcome)
        return self._encode_result(msgid, method, outcome)

    def _respond(self, payload: bytes, responses: int) -> None:
        """Send or queue ``payload``, which holds the responses to ``responses`` requests."""
        if self._closed:
            return  # nobody to tell
        if self._inflight == responses and not self._writing and not self._pending and self._io.direct:
            # Nothing else in flight (request-reply use): write it now,
            # skipping the hop to the writer task. With more in flight the
            # writer gathers them into one write instead.
            try:
                sent = self._io.try_send(payload)
            except _TRANSPORT_ERRORS:
                self._abort("connection lost")
                return
            if sent == len(payload):
                self._responses_written(responses)
                return
            payload = payload[sent:]  # the writer sends the rest first
        self._enqueue(payload, responses=responses)

    def _encode_result(self, msgid: int, method: str, result: Any) -> bytes:
        try:
            payload = encode_response(msgid, None, result, self._packer)
        except (TypeError, ValueError, OverflowError) as exc:
            return self._encode_error(msgid, self._internal(exc, method))
        limit = self._limits.max_message_bytes
        if len(payload) > limit:
            # Responses obey the message limit too: a client may read no more.
            too_big = LimitExceeded(
                f"the response to {method} is {len(payload)} bytes, over the message limit of {limit} bytes",
                {"limit": limit},
            )
            return self._encode_error(msgid, too_big)
        return payload

    def _encode_error(self, msgid: int, error: BrokerError) -> bytes:
        try:
            return encode_response(msgid, error.to_wire(), None, self._packer)
        except (TypeError, ValueError, OverflowError) as exc:
            # Undeliverable details (a bug in whoever raised it).
            return encode_response(msgid, self._internal(exc, "error encoding").to_wire(), None, self._packer)

    def _internal(self, exc: BaseException, method: str) -> Internal:
        return internal_error(exc, method, self._where)

    @property
    def _where(self) -> str:
        return f"connection {self.connection_id}"

    # -- writing -------------------------------------------------------------

    def _enqueue(self, payload: bytes, *, responses: int) -> None:
        """Queue bytes for the writer; they complete ``responses`` requests."""
        self._pending.append(payload)
        self._pending_bytes += len(payload)
        self._pending_responses += responses
        self._wakeup.set()

    def _responses_written(self, count: int) -> None:
        if not count:
            return
        self._inflight -= count
        if self._gatherer is not None and not self._closed:
            self._gatherer.inflight -= count
        self._slot_freed.set()
        if self._inflight == 0:
            self._idle_since = trio.current_time()

    async def _write_loop(self) -> None:
        while True:
            if not self._pending:
                if self._closing:
                    self._mark_closed()
                    return
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                continue
            if not await self._write_pending():
                return
            self._wake_worker()  # one held back by the response backlog

    async def _write_pending(self) -> bool:
        """Write everything queued in one write; False if the connection was aborted.

        A function of its own so that the bytes written are no longer
        referenced once it returns: the loop would otherwise keep the last
        write (up to a message limit or more) alive while it waits.
        """
        responses, self._pending_responses = self._pending_responses, 0
        self._sending_bytes, self._pending_bytes = self._pending_bytes, 0
        batch, self._pending = self._pending, []
        data = batch[0] if len(batch) == 1 else b"".join(batch)
        del batch  # one copy of the bytes during the write, not two
        self._writing = True
        with trio.move_on_after(self._limits.message_timeout_s) as scope:
            try:
                await self._io.send_all(data)
            except _TRANSPORT_ERRORS:
                self._abort("connection lost")
                return False
        self._writing = False
        self._sending_bytes = 0
        if scope.cancelled_caught:
            self._abort("client did not read its responses in time")
            return False
        self._flushed.set()
        self._flushed = trio.Event()
        self._responses_written(responses)
        return True

    # -- closing -------------------------------------------------------------

    def _mark_closed(self) -> None:
        if not self._closed and self._gatherer is not None:
            self._gatherer.inflight -= self._inflight  # never to be answered
        self._closed = True
        self._flushed.set()

    def _abort(self, reason: str) -> None:
        """Close now: cancel everything in flight (the finally in run closes)."""
        if not self._closed:
            log.info("connection %d closed: %s", self.connection_id, reason)
        self._mark_closed()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
