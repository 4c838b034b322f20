"""Key-event subscriptions: ``subscribe`` turns a connection into a feed of
``key.event`` notifications for keys under a prefix."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from .errors import LimitExceeded
from .events import KeyEvent

if TYPE_CHECKING:
    from .connection import RequestContext
    from .service import KeyService

__all__ = ["Subscriptions"]

log = logging.getLogger("keybroker.subscriptions")

# Events buffered per subscriber; a subscriber that falls this far behind is
# cut off rather than allowed to make the broker hold events without bound.
MAX_BACKLOG = 1024
# Prefixes per connection: every key event is matched against each of them,
# so a client must not be able to make every change in the broker slower.
MAX_PREFIXES = 64


class Subscriptions:
    """Subscribers of one broker, fed by the service's key events.

    A connection has one feed: subscribing again adds a prefix to it (once,
    however often it is asked for; at most MAX_PREFIXES), and an event under
    several of its prefixes is sent once.
    """

    def __init__(self, nursery: trio.Nursery, service: KeyService) -> None:
        self._nursery = nursery
        self._service = service
        self._feeds: dict[int, tuple[list[str], Callable[[], None]]] = {}

    def add(self, ctx: RequestContext, prefix: str, visible: Callable[[str], bool]) -> None:
        """Feed ``ctx`` events of keys starting with ``prefix`` that ``visible`` allows
        (the connection's principal decides what is visible: the first call's ``visible`` stays).

        Raises:
            LimitExceeded: the connection already has MAX_PREFIXES other prefixes.
        """
        feed = self._feeds.get(ctx.connection_id)
        if feed is not None:
            _add_prefix(feed[0], prefix)
            return
        prefixes = [prefix]
        send, receive = trio.open_memory_channel[KeyEvent](MAX_BACKLOG)

        def listener(event: KeyEvent) -> None:
            if not any(event.name.startswith(p) for p in prefixes) or not visible(event.name):
                return
            try:
                send.send_nowait(event)
            except trio.WouldBlock:
                log.warning("connection %d: subscriber too slow, cut off", ctx.connection_id)
                send.close()
            except trio.ClosedResourceError:
                pass

        remove = self._service.add_listener(listener)

        def stop() -> None:
            remove()
            send.close()

        self._feeds[ctx.connection_id] = (prefixes, stop)
        self._nursery.start_soon(self._forward, ctx, receive)

    async def _forward(self, ctx: RequestContext, receive: trio.MemoryReceiveChannel[KeyEvent]) -> None:
        async with receive:
            async for event in receive:
                try:
                    await ctx.notify("key.event", [event.to_wire()])
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    break
        self.closed(ctx)

    def closed(self, ctx: RequestContext) -> None:
        """Stop the feed of a closed connection. Idempotent."""
        feed = self._feeds.pop(ctx.connection_id, None)
        if feed is not None:
            feed[1]()

    def __len__(self) -> int:
        """Subscribed prefixes over every connection."""
        return sum(len(prefixes) for prefixes, _ in self._feeds.values())


def _add_prefix(prefixes: list[str], prefix: str) -> None:
    if prefix in prefixes:
        return
    if len(prefixes) >= MAX_PREFIXES:
        raise LimitExceeded(
            f"a connection may subscribe to at most {MAX_PREFIXES} prefixes", {"limit": MAX_PREFIXES}
        )
    prefixes.append(prefix)
