"""Requests from several connections, run as one group while the server is busy.

Many clients that each wait for their reply send one request at a time, each
on its own connection. A connection's reader runs such a lone request itself
(:mod:`broker.connection`), paying alone for the key lookup, authorization,
use reservation, native call and audit write. When other requests are in
flight on the server, a reader gives a request of a groupable method
(``encrypt``, ``decrypt``) to the :class:`Gatherer` instead. Everything
given to it while the scheduler runs one batch of ready tasks is run by one
``handle_group`` call in the next batch, and each connection then answers its
own request. The dispatcher still authorizes each request as its own
principal and writes one audit record per request; the group shares the rest
per key and principal. With nothing else in flight a request is never held
back: a lone client keeps its shortest path.

After a group, with nothing more given to it, the gatherer keeps the event
loop awake for ``[limits] gather_poll_us`` (see :meth:`Gatherer._poll`), as
the clients it just answered send their next requests moments later.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final, final

import trio

from .connection import MAX_GROUP, run_group, run_inline
from .logs import failure

if TYPE_CHECKING:
    from .connection import Connection, GroupHandler
    from .protocol import Request

__all__ = ["GATHER_WINDOW_S", "Gatherer"]

log = logging.getLogger("keybroker.gather")

# Lone requests from different connections closer together than this mean
# several clients are busy at once (see Gatherer.takes).
GATHER_WINDOW_S: Final = 1e-3


@final
class Gatherer:
    """Collects lone requests of groupable methods and runs them in groups.

    Args:
        handler: the service; it lists the methods it groups in ``groupable``.
        poll_s: after running what it was given, keep the event loop awake
            this long before sleeping (see :meth:`_poll`); 0 sleeps at once.

    Attributes:
        inflight: requests read and not yet answered, over every connection
            (kept by the connections).
        groups: groups run so far, for tests and metrics.
        polls: scheduler rounds spent polling, for tests and metrics.
    """

    def __init__(self, handler: GroupHandler, poll_s: float = 0.0) -> None:
        self._handler = handler
        self._poll_s = poll_s
        self.polls = 0
        self._groupable: frozenset[str] = handler.groupable
        self.inflight = 0
        self.groups = 0
        self._pending: list[tuple[Connection, Request]] = []
        self._wakeup: trio.Event | None = None
        self._nursery: trio.Nursery | None = None
        # The connection (id) of the last lone request, and when it was read.
        self._last = 0
        self._last_at = 0.0

    def takes(self, connection: Connection, method: str) -> bool:
        """Should a lone request of ``method``, just read by ``connection``, be given here?

        Yes while the server is busy: a group is being gathered, other
        requests are in flight, or the last lone request came from another
        connection less than ``GATHER_WINDOW_S`` ago (clients taking turns
        that fast each find nothing else in flight, as each request is
        answered within the step that read it). A lone client's requests are
        never held back. The request itself is ``connection``'s one request
        in flight (see :meth:`busy_elsewhere`).
        """
        busy = method in self._groupable and self.busy_elsewhere(connection, 1)
        self._last, self._last_at = connection.connection_id, time.perf_counter()
        return busy

    def busy_elsewhere(self, connection: Connection, inflight: int) -> bool:
        """Are other connections busy? Requests in flight (``connection`` has
        ``inflight`` of its own), or one read elsewhere within ``GATHER_WINDOW_S``.

        Then a lone request from ``connection`` would be given here, and
        its reader, about to sleep, lets the read hub watch its socket
        (:mod:`broker.readhub`): the hub hands such a request on without
        waking it. Else the reader sleeps with trio, which wakes it at once.
        """
        if self._pending or self.inflight > inflight:
            return True
        recent = time.perf_counter() - self._last_at < GATHER_WINDOW_S
        return recent and self._last != connection.connection_id

    def add(self, connection: Connection, request: Request) -> None:
        """Run ``request`` with the next group; ``connection.answer`` gets its outcome."""
        self._pending.append((connection, request))
        wakeup, self._wakeup = self._wakeup, None
        if wakeup is not None:
            wakeup.set()

    async def run(self) -> None:
        """Run groups until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self._serve()

    async def _serve(self) -> None:
        """Take what was added, run it; a group that suspends passes this role to a new task.

        A group usually completes without suspending, so it runs here; one
        that suspends (a key being loaded, a rotation) must not hold back
        the groups after it, so another task takes over first.
        """
        ran = False
        while True:
            if not self._pending:
                if ran and self._poll_s and await self._poll():
                    continue
                ran = False
                self._wakeup = trio.Event()
                await self._wakeup.wait()
                continue
            ran = True
            pending, self._pending = self._pending, []
            by_method: dict[str, list[tuple[Connection, Request]]] = {}
            for item in pending:
                by_method.setdefault(item[1].method, []).append(item)
            groups = [
                (method, items[start : start + MAX_GROUP])
                for method, items in by_method.items()
                for start in range(0, len(items), MAX_GROUP)
            ]
            for index, (method, items) in enumerate(groups):
                hand_over = functools.partial(self._hand_over, groups, index + 1)
                if not await run_inline(self._run(method, items), hand_over):
                    return

    async def _poll(self) -> bool:
        """Stay runnable for ``poll_s`` or until something is added; True if something was.

        Clients answered by a group send their next requests within tens of
        microseconds. While a task runs at every scheduler round, trio looks
        for I/O without blocking, so their connections' readers run as soon
        as the requests land, rather than after the wake-up of a sleeping
        thread (and, in a virtual machine, of its virtual CPU). Only after a
        group, so a broker with nothing to do still sleeps.
        """
        deadline = time.perf_counter() + self._poll_s
        while not self._pending:
            if time.perf_counter() >= deadline:
                return False
            await trio.lowlevel.checkpoint()
            self.polls += 1
        return True

    def _hand_over(
        self, groups: Sequence[tuple[str, Sequence[tuple[Connection, Request]]]], start: int
    ) -> None:
        """A group suspended: a new task serves, taking ``groups[start:]`` (those after it) first."""
        self._pending[:0] = [item for _, items in groups[start:] for item in items]
        assert self._nursery is not None
        self._nursery.start_soon(self._serve)

    async def _run(self, method: str, items: Sequence[tuple[Connection, Request]]) -> None:
        self.groups += 1
        outcomes: list[Any] = await run_group(
            self._handler,
            [connection.context for connection, _ in items],
            method,
            [request.params for _, request in items],
            "a gathered group",
        )
        for (connection, request), outcome in zip(items, outcomes, strict=True):
            try:
                connection.answer(request, outcome)
            except Exception as exc:
                # A bug in one connection must not take the others' answers, or the server, down.
                log.error("connection %d: answering a gathered request failed: %s",
                          connection.connection_id, failure(exc))
