"""One task watches every Unix-socket connection for data: the read hub.

With trio's ``wait_readable``, every request of a client that waits for
each reply costs its connection a wait: trio re-arms the descriptor in its
epoll set (a system call) and parks the reading task, and when the request
lands the scheduler runs that task only for it to read a few dozen bytes and
hand the request on to the gatherer. Under load from many such clients,
that is a good share of the event loop's time per request.

The hub keeps each connection's socket in an epoll set of its own,
registered once, edge-triggered, and a single task waits on that set. A
reading task that finds its socket drained parks with :meth:`ReadHub.wait`.
When data lands on its socket, the hub calls the connection's ``on_data``
in its own task: that reads the socket and either deals with what it read
(a lone request handed to the gatherer or a worker: the reader stays
parked), or says what to wake the reader with. Data that lands while the
reader is not parked marks the socket ready, and the reader's next wait
returns at once (the reader then reads for itself). Once the peer hangs
up (or the socket fails), every wait returns at once: the reader reads on
to the end of the stream by itself.

The set is edge-triggered: an event means new data arrived since the last
one. A reader parks only after a read left its socket empty, so no data
goes unnoticed; an event for data that a read has already taken costs one
read that finds nothing.

The hub pays off while the server is busy, when most requests go to the
gatherer. For a lone client it would only add a hop (the hub's task, then
the reader's), so a reader on an otherwise idle server sleeps with trio
instead (see :meth:`broker.gather.Gatherer.busy_elsewhere`), and so does
a reader that polls its socket: both :meth:`ReadHub.pause` its watch
first, so that the hub is not woken for what they read themselves.
"""

from __future__ import annotations

import select
from collections.abc import Callable
from typing import Any, Final, final

import outcome
import trio

__all__ = ["OnData", "ReadHub"]

# Events taken from the epoll set per poll; more are taken by polling again.
MAX_EVENTS: Final = 64
_FLAGS: Final = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET
# Paused: only what epoll always reports (a hang-up, an error), once.
_PAUSED: Final = select.EPOLLET

#: Called in the hub's task when data lands while the reader waits: the
#: outcome to wake the reader with (its ``wait`` returns or raises it), or
#: None to leave it parked.
OnData = Callable[[], "outcome.Outcome[Any] | None"]


@final
class _Watch:
    __slots__ = ("hung_up", "on_data", "paused", "ready", "task")

    def __init__(self, on_data: OnData) -> None:
        self.on_data = on_data
        self.paused = False  # its reader polls the socket itself (see ReadHub.pause)
        self.ready = False  # data landed while nobody waited
        # The peer hung up (or the socket failed): for good, so every wait
        # returns at once, and the reader reads on to the end.
        self.hung_up = False
        self.task: trio.lowlevel.Task | None = None  # the parked reader


@final
class ReadHub:
    """Readiness of many sockets from one edge-triggered epoll set, watched by :meth:`run`.

    Attributes:
        events: events taken from the epoll set, for tests and metrics.
        handled: events dealt with by ``on_data`` without waking the
            reader, for tests and metrics.
    """

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._watches: dict[int, _Watch] = {}
        self.events = 0
        self.handled = 0

    def register(self, fd: int, on_data: OnData) -> None:
        """Watch ``fd`` until :meth:`unregister`."""
        self._epoll.register(fd, _FLAGS)
        self._watches[fd] = _Watch(on_data)

    def unregister(self, fd: int) -> None:
        """Stop watching ``fd``; call it before the socket is closed."""
        if self._watches.pop(fd, None) is not None:
            self._epoll.unregister(fd)

    async def wait(self, fd: int) -> Any:
        """Park until data lands on ``fd``: None, or what its ``on_data`` woke the reader with.

        Returns at once, without a checkpoint, if data landed since the
        last wait or the peer has hung up.

        Raises:
            trio.BusyResourceError: another task waits on ``fd`` already.

        Cancellation: safe; a cancelled wait leaves the watch as it was.
        """
        watch = self._watches[fd]
        if watch.task is not None:
            raise trio.BusyResourceError("another task is already waiting for this socket")
        if watch.paused:
            # Asking again also reports data that landed during the pause.
            self._epoll.modify(fd, _FLAGS)
            watch.paused = False
        if watch.ready or watch.hung_up:
            watch.ready = False
            return None
        watch.task = trio.lowlevel.current_task()

        def abort(_: Any) -> trio.lowlevel.Abort:
            watch.task = None
            return trio.lowlevel.Abort.SUCCEEDED

        return await trio.lowlevel.wait_task_rescheduled(abort)

    def pause(self, fd: int) -> None:
        """Stop reporting data on ``fd`` until its reader waits again: it reads the socket itself meanwhile.

        A reader that polls its socket (:mod:`broker.busypoll`) would
        otherwise cost the hub a wake-up for every request it reads.
        Resuming at the next :meth:`wait` re-checks the socket, so nothing
        that lands during the pause goes unnoticed.
        """
        watch = self._watches[fd]
        if not watch.paused:
            self._epoll.modify(fd, _PAUSED)
            watch.paused = True
            watch.ready = False

    async def run(self) -> None:
        """Watch until cancelled."""
        epoll = self._epoll
        while True:
            await trio.lowlevel.wait_readable(epoll.fileno())
            while len(events := epoll.poll(0, MAX_EVENTS)) == MAX_EVENTS:
                self._dispatch(events)
            self._dispatch(events)

    def close(self) -> None:
        """Release the epoll set, once :meth:`run` has ended and every socket is unregistered."""
        self._epoll.close()

    def _dispatch(self, events: list[tuple[int, int]]) -> None:
        self.events += len(events)
        watches = self._watches
        for fd, flags in events:
            watch = watches.get(fd)
            if watch is None:
                continue
            if flags != select.EPOLLIN:
                # The peer hung up (or the socket failed), perhaps after
                # sending: no edge will follow the one that said so, and a
                # read that takes the data does not show the end behind it.
                # So the reader reads for itself from now on, to the end.
                watch.hung_up = True
            task = watch.task
            if task is None:
                watch.ready = True
                continue
            if watch.hung_up:
                watch.task = None
                trio.lowlevel.reschedule(task, outcome.Value(None))
                continue
            try:
                wake = watch.on_data()
            except Exception as exc:
                # A bug in one connection is for that connection to report
                # (its reader raises it), not for the hub or the others.
                wake = outcome.Error(exc)
            if wake is None:
                self.handled += 1
                continue
            watch.task = None
            trio.lowlevel.reschedule(task, wake)
