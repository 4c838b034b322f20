"""Busy polling: a connection polls its socket for a moment before it parks.

A client that waits for each reply sends its next request one round trip
after the last reply went out. If the broker has gone to sleep in
``epoll_wait`` meanwhile, that request first pays for waking the thread
(and, in a virtual machine, the virtual CPU) and for a trip through the
scheduler, then runs on cold caches. A Unix-socket connection that has read
everything waiting for it and answered all of it may instead read again at
every scheduler round for a short window (other tasks run in between), and
picks the next request up as soon as it lands. (With a request in flight the
client is waiting, not sending, so the connection sleeps.) While one connection polls, the event loop never
blocks, so every other connection's I/O is noticed at once too; that is why
one polling connection at a time is enough, and it bounds the cost to one
core for at most the window after a reply. A broker with no requests for
longer than the window sleeps as before: an idle broker costs nothing.

Set by ``[limits] busy_poll_us``; 0 turns it off.
"""

from __future__ import annotations

import time
from typing import Final, final

__all__ = ["BusyPoller"]

# Connections that may poll at once (see the module docstring).
POLLING_SLOTS: Final = 1


@final
class BusyPoller:
    """Lets one connection at a time poll its socket for ``window_s`` seconds.

    Args:
        window_s: how long a connection may poll before it parks.

    Attributes:
        rounds: polls made so far (each one read attempt), for tests and
            metrics.
        polling: connections polling now.
    """

    def __init__(self, window_s: float) -> None:
        self._window = window_s
        self.rounds = 0
        self.polling = 0

    def start(self) -> float | None:
        """Begin polling: the ``time.perf_counter()`` to poll until, or None if the slot is taken.

        A caller that gets a deadline must call :meth:`stop` when done.
        """
        if self.polling >= POLLING_SLOTS:
            return None
        self.polling += 1
        return time.perf_counter() + self._window

    def stop(self) -> None:
        """End the polling :meth:`start` began."""
        self.polling -= 1
