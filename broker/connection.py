"""One client connection: a reader, a task per request, one coalescing writer.

The reader decodes requests and spawns a task for each, holding one of
``limits.max_inflight_per_connection`` slots; when all slots are taken it
stops reading, so the kernel's socket buffers push back on the client. A slot
is returned only once its response has been written, which also bounds the
memory a client that never reads can pin. Responses go out in completion
order (msgpack-rpc matches them by msgid) through a single writer task that
sends everything ready at once in one ``send_all`` -- one write per response
costs several times more under pipelined load.

A connection closes itself when the peer leaves, after ``idle_timeout_s``
with no request in flight, when a started message is not complete within
``message_timeout_s`` (slow-loris), when a response cannot be delivered
within ``message_timeout_s`` (a client that stopped reading), or when the
stream cannot be decoded. A failure here never reaches another connection.
"""

from __future__ import annotations

import logging
import math
import traceback
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, final

import trio

from .auth import Principal
from .config import Limits
from .errors import BrokerError, Internal, InvalidRequest
from .protocol import (
    BadRequest,
    ProtocolError,
    Request,
    RequestDecoder,
    encode_notification,
    encode_response,
    new_packer,
)

__all__ = ["Connection", "Handler", "RequestContext"]

log = logging.getLogger("keybroker.connection")

# One receive_some can carry hundreds of pipelined requests; a large buffer
# keeps the number of reads (and scheduler round trips) per request low.
RECEIVE_SIZE: Final = 256 * 1024
# notify() waits while this much output is queued, so a subscriber that stops
# reading cannot make the broker buffer events without bound.
NOTIFY_HIGH_WATER: Final = 1 << 20
# Errors that mean the transport is gone; anything else is a bug.
_TRANSPORT_ERRORS: Final = (trio.BrokenResourceError, trio.ClosedResourceError)


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


class Handler(Protocol):
    """What the transport calls; the service layer implements it."""

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
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        principal: Principal,
        connection_id: int,
        handler: Handler,
        limits: Limits,
    ) -> None:
        self._stream = stream
        self._handler = handler
        self._limits = limits
        self.context = RequestContext(principal, connection_id, _connection=self)
        self._decoder = RequestDecoder(limits.max_message_bytes)
        self._packer = new_packer()
        self._slots = trio.Semaphore(limits.max_inflight_per_connection)
        self._inflight = 0
        self._idle_since = trio.current_time()
        self._partial_since: float | None = None
        # Writer state: queued frames, and how many of them are responses
        # (each holds an in-flight slot until written).
        self._pending: list[bytes] = []
        self._pending_responses = 0
        self._pending_bytes = 0
        self._wakeup = trio.Event()
        self._flushed = trio.Event()
        self._closing = False  # no more requests: the writer exits once empty
        self._closed = False  # nothing more will be written
        self._draining = False
        self._nursery: trio.Nursery | None = None
        self._reader_scope: trio.CancelScope | None = None
        self._read_scope: trio.CancelScope | None = None

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
                async with trio.open_nursery() as requests:
                    await self._read_loop(requests)
                # Every response is queued now; let the writer flush and stop.
                self._closing = True
                self._wakeup.set()
        finally:
            self._mark_closed()
            # The hook runs before the (checkpointing) close, so a
            # cancellation arriving meanwhile cannot skip it.
            try:
                self._handler.connection_closed(self.context)
            except Exception:
                log.exception("connection %d: connection_closed hook failed", self.connection_id)
            await trio.aclose_forcefully(self._stream)

    def begin_drain(self) -> None:
        """Stop reading requests; finish those in flight, flush, then close.

        Idempotent. The caller bounds how long the drain may take by
        cancelling :meth:`run`.
        """
        self._draining = True
        if self._reader_scope is not None:
            self._reader_scope.cancel()

    async def notify(self, method: str, params: list[Any]) -> None:
        """See :meth:`RequestContext.notify`."""
        while not self._closed and self._pending_bytes > NOTIFY_HIGH_WATER:
            await self._flushed.wait()
        if self._closed:
            raise trio.BrokenResourceError("connection closed")
        self._enqueue(encode_notification(method, params, self._packer), response=False)

    # -- reading -------------------------------------------------------------

    async def _read_loop(self, requests: trio.Nursery) -> None:
        with trio.CancelScope() as reader_scope:
            self._reader_scope = reader_scope
            if self._draining:
                return
            while True:
                with trio.CancelScope(deadline=self._read_deadline()) as scope:
                    self._read_scope = scope
                    try:
                        data = await self._stream.receive_some(RECEIVE_SIZE)
                    except _TRANSPORT_ERRORS:
                        self._abort("connection lost")
                        return
                self._read_scope = None
                if scope.cancelled_caught:
                    if self._partial_since is not None:
                        self._abort("message not completed in time")
                        return
                    if self._inflight == 0:
                        log.debug("connection %d: idle timeout", self.connection_id)
                        return
                    continue
                if not data:
                    return  # EOF: answer what is in flight, then close.
                try:
                    events = self._decoder.feed(data)
                except ProtocolError as exc:
                    self._abort(exc.reason)
                    return
                if not self._decoder.in_progress:
                    self._partial_since = None
                elif events or self._partial_since is None:
                    self._partial_since = trio.current_time()
                for event in events:
                    # Fast path without a checkpoint: a scheduler round trip
                    # per pipelined request would dominate their cost.
                    try:
                        self._slots.acquire_nowait()
                    except trio.WouldBlock:
                        await self._slots.acquire()
                    self._inflight += 1
                    requests.start_soon(self._dispatch, event)

    def _read_deadline(self) -> float:
        if self._partial_since is not None:
            return self._partial_since + self._limits.message_timeout_s
        if self._inflight == 0 and not self.context.keep_open:
            return self._idle_since + self._limits.idle_timeout_s
        return math.inf

    def _refresh_read_deadline(self) -> None:
        if self._read_scope is not None:
            self._read_scope.deadline = self._read_deadline()

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
                try:
                    payload = encode_response(event.msgid, None, result, self._packer)
                except (TypeError, ValueError, OverflowError) as exc:
                    payload = self._encode_error(event.msgid, self._internal(exc, event.method))
        self._enqueue(payload, response=True)

    def _encode_error(self, msgid: int, error: BrokerError) -> bytes:
        try:
            return encode_response(msgid, error.to_wire(), None, self._packer)
        except (TypeError, ValueError, OverflowError) as exc:
            # Undeliverable details (a bug in whoever raised it).
            return encode_response(msgid, self._internal(exc, "error encoding").to_wire(), None, self._packer)

    def _internal(self, exc: BaseException, method: str) -> Internal:
        """Log an unexpected exception under a fresh correlation id.

        Only the exception's type and stack are logged: its message may quote
        request data, and this is a key broker.
        """
        error = Internal()
        stack = "".join(traceback.format_tb(exc.__traceback__))
        log.error(
            "internal error (correlation id %s) in %s on connection %d: %s\n%s",
            error.correlation_id,
            method,
            self.connection_id,
            type(exc).__qualname__,
            stack,
        )
        return error

    # -- writing -------------------------------------------------------------

    def _enqueue(self, payload: bytes, *, response: bool) -> None:
        self._pending.append(payload)
        self._pending_bytes += len(payload)
        if response:
            self._pending_responses += 1
        self._wakeup.set()

    async def _write_loop(self) -> None:
        while True:
            if not self._pending:
                if self._closing:
                    self._mark_closed()
                    return
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                continue
            batch, self._pending = self._pending, []
            responses, self._pending_responses = self._pending_responses, 0
            self._pending_bytes = 0
            data = batch[0] if len(batch) == 1 else b"".join(batch)
            with trio.move_on_after(self._limits.message_timeout_s) as scope:
                try:
                    await self._stream.send_all(data)
                except _TRANSPORT_ERRORS:
                    self._abort("connection lost")
                    return
            if scope.cancelled_caught:
                self._abort("client did not read its responses in time")
                return
            self._flushed.set()
            self._flushed = trio.Event()
            for _ in range(responses):
                self._slots.release()
            self._inflight -= responses
            if responses and self._inflight == 0:
                self._idle_since = trio.current_time()
                self._refresh_read_deadline()

    # -- closing -------------------------------------------------------------

    def _mark_closed(self) -> None:
        self._closed = True
        self._flushed.set()

    def _abort(self, reason: str) -> None:
        """Close now: cancel everything in flight (the finally in run closes)."""
        if not self._closed:
            log.info("connection %d closed: %s", self.connection_id, reason)
        self._mark_closed()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
