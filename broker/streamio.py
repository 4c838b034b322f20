"""Non-blocking stream I/O shared by the server's connections and the trio client.

:class:`SocketIO` drives a plain socket with non-blocking system calls:
trio's ``SocketStream`` yields to the scheduler after every successful
``recv`` and ``send``, which on a request-reply path adds scheduler rounds
per request. :class:`StreamIO` wraps any other trio stream (TLS, in-memory)
with the same interface. :func:`stream_io` picks one.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, Final

import outcome
import trio

from .busypoll import BusyPoller
from .readhub import ReadHub

__all__ = ["RECEIVE_SIZE", "SocketIO", "StreamIO", "stream_io"]

# One receive_some can carry hundreds of pipelined requests; a large buffer
# keeps the number of reads (and scheduler round trips) per request low.
RECEIVE_SIZE: Final = 256 * 1024
# A reader that keeps finding data yields to other tasks after this many
# reads in a row (each read may carry hundreds of requests).
_MAX_READS_WITHOUT_YIELD: Final = 8
# The hub's read went to the consumer, which kept what the reader needs.
_CONSUMED: Final = -1

#: Takes the bytes the hub read while the reader waited (see
#: :meth:`SocketIO._on_data`): True if it dealt with them, False if it kept
#: what the reader needs (the reader's ``receive`` then returns None).
Consumer = Callable[[memoryview], bool]


class StreamIO:
    """Any trio stream (TLS, in-memory): every operation goes through trio."""

    direct = False

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream

    def detach(self) -> None:
        """Nothing to stop: no hub watches this stream."""

    async def receive(self, *, poll: bool = False, watched: bool = False) -> bytes | bytearray | memoryview:
        """The next bytes from the peer, empty at EOF (``poll`` and ``watched`` are for sockets only)."""
        return await self._stream.receive_some(RECEIVE_SIZE)

    def try_send(self, data: bytes | memoryview) -> int:  # pragma: no cover - direct is False
        raise NotImplementedError

    async def send_all(self, data: bytes) -> None:
        await self._stream.send_all(data)


class SocketIO:
    """A plain socket, driven with non-blocking system calls.

    trio's SocketStream yields to the scheduler after every successful recv
    and send. On the request-reply path that adds scheduler rounds per
    request, so here a read or write that completes at once does not yield;
    a reader that keeps finding data yields every few reads instead, which
    keeps the connection a good citizen under a flood. With a hub, a drained
    socket is watched by the hub's task, which may deal with what lands
    without waking the reader (:mod:`broker.readhub`).
    """

    direct = True

    def __init__(
        self,
        stream: trio.SocketStream,
        poller: BusyPoller | None = None,
        hub: ReadHub | None = None,
        consumer: Consumer | None = None,
    ) -> None:
        self._poller = poller
        self._hub = hub
        self._consumer = consumer
        # Waits are on the descriptor itself: given the socket object, trio
        # would ask it for its fileno() at every wait.
        self._fd = stream.socket.fileno()
        self._unyielded = 0  # reads in a row that found data waiting
        # Reads land in one buffer kept for the connection: a fresh 256 KiB
        # bytes object per read costs several times the read itself.
        self._buffer = bytearray(RECEIVE_SIZE)
        self._view = memoryview(self._buffer)
        # The last read left the socket empty: wait before reading again,
        # rather than pay for a read that fails.
        self._drained = False
        if hub is not None:
            try:
                hub.register(self._fd, self._on_data)
            except OSError:
                # Out of epoll watches (fs.epoll.max_user_watches): this
                # connection waits with trio alone, as it would without a hub.
                self._hub = None

    def detach(self) -> None:
        """Stop the hub's watch (before the socket closes)."""
        if self._hub is not None:
            self._hub.unregister(self._fd)

    def _on_data(self) -> outcome.Outcome[Any] | None:
        """The hub saw data while the reader waits: what to wake it with, or None to leave it parked."""
        try:
            count = self._read()
        except trio.BrokenResourceError as exc:
            return outcome.Error(exc)
        if count is None:
            return None  # an event for data already read
        consumer = self._consumer
        if consumer is None or not 0 < count < RECEIVE_SIZE:
            return outcome.Value(count)
        if consumer(self._view[:count]):
            return None
        return outcome.Value(_CONSUMED)

    async def receive(self, *, poll: bool = False, watched: bool = False) -> memoryview | None:
        """The next bytes from the peer, empty at EOF; valid until the next call.

        None when the hub read the bytes while this task waited and gave
        them to the consumer, which keeps what this task is to handle.

        Args:
            poll: if the socket is empty, poll it for a moment before
                sleeping (see :meth:`_poll`): worth it when a reply has just
                gone out and the peer's next request may follow at once.
            watched: sleep with the hub watching the socket, rather than
                with trio: worth it while other connections are busy, as the
                hub may then hand what lands on without waking this task.
        """
        while True:
            if self._drained:
                self._drained = False
                self._unyielded = 0
                count = await self._poll() if poll else None
                while count is None:
                    count = await self._wait(watched)
                if count == _CONSUMED:
                    # The hub's read (shorter than the buffer) emptied the socket.
                    self._drained = True
                    return None
            else:
                count = self._read()
            if count is None:
                self._drained = True
                continue
            if count < RECEIVE_SIZE:
                self._drained = True
            else:
                self._unyielded += 1
                if self._unyielded >= _MAX_READS_WITHOUT_YIELD:
                    # A peer that always has more to send must not
                    # monopolise the loop.
                    self._unyielded = 0
                    await trio.lowlevel.checkpoint()
            return self._view[:count]

    async def _wait(self, watched: bool) -> int | None:
        """Sleep until the peer sends: the byte count read, None if the read found nothing after all, or
        ``_CONSUMED`` (the hub read it for the consumer)."""
        if self._hub is None or not watched:
            if self._hub is not None:
                # Else every request that lands would wake the hub too.
                self._hub.pause(self._fd)
            await trio.lowlevel.wait_readable(self._fd)
            return self._read()
        count = await self._hub.wait(self._fd)
        return self._read() if count is None else count

    def _read(self) -> int | None:
        """Read what is waiting into the buffer: the byte count, or None if nothing is."""
        try:
            return os.readv(self._fd, [self._buffer])
        except BlockingIOError:
            return None
        except OSError as exc:
            raise trio.BrokenResourceError(str(exc)) from exc

    async def _poll(self) -> int | None:
        """Busy polling (see :mod:`broker.busypoll`): read once per scheduler round for a while.

        Returns the byte count once something was read, or None when the
        window passed, or another connection holds the polling slot.
        """
        poller = self._poller
        if poller is None:
            return None
        deadline = poller.start()
        if deadline is None:
            return None
        if self._hub is not None:
            self._hub.pause(self._fd)  # this task reads the socket itself meanwhile
        try:
            while True:
                await trio.lowlevel.checkpoint()
                poller.rounds += 1
                count = self._read()
                if count is not None or time.perf_counter() >= deadline:
                    return count
        finally:
            poller.stop()

    def try_send(self, data: bytes | memoryview) -> int:
        """Write what the socket buffer takes now; returns the byte count.

        Raises:
            trio.BrokenResourceError: the peer is gone.
        """
        try:
            return os.write(self._fd, data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise trio.BrokenResourceError(str(exc)) from exc

    async def send_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            sent = self.try_send(view)
            view = view[sent:]
            if view:
                await trio.lowlevel.wait_writable(self._fd)


def stream_io(
    stream: trio.abc.Stream,
    poller: BusyPoller | None = None,
    hub: ReadHub | None = None,
    consumer: Consumer | None = None,
) -> StreamIO | SocketIO:
    """:class:`SocketIO` for a plain trio socket stream, :class:`StreamIO` for any other stream.

    Args:
        poller: lets a drained socket poll for a moment (server side).
        hub: watches a drained socket while its reader waits (server side,
            :mod:`broker.readhub`).
        consumer: takes what the hub reads while the reader waits.
    """
    if type(stream) is trio.SocketStream:
        return SocketIO(stream, poller, hub, consumer)
    return StreamIO(stream)
