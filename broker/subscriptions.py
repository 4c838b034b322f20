"""Key-event subscriptions: ``subscribe`` turns a connection into a feed of
``key.event`` notifications for keys under a prefix."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from .events import KeyEvent

if TYPE_CHECKING:
    from .connection import RequestContext
    from .service import KeyService

__all__ = ["Subscriptions"]

log = logging.getLogger("keybroker.subscriptions")

# Events buffered per subscriber; a subscriber that falls this far behind is
# cut off rather than allowed to make the broker hold events without bound.
MAX_BACKLOG = 1024


class Subscriptions:
    """Subscribers of one broker, fed by the service's key events."""

    def __init__(self, nursery: trio.Nursery, service: KeyService) -> None:
        self._nursery = nursery
        self._service = service
        self._by_connection: dict[int, list[Callable[[], None]]] = {}

    def add(self, ctx: RequestContext, prefix: str, visible: Callable[[str], bool]) -> None:
        """Start feeding ``ctx`` events of keys starting with ``prefix`` that ``visible`` allows."""
        send, receive = trio.open_memory_channel[KeyEvent](MAX_BACKLOG)

        def listener(event: KeyEvent) -> None:
            if not event.name.startswith(prefix) or not visible(event.name):
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

        self._by_connection.setdefault(ctx.connection_id, []).append(stop)
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
        """Stop every subscription of a closed connection. Idempotent."""
        for stop in self._by_connection.pop(ctx.connection_id, []):
            stop()

    def __len__(self) -> int:
        return sum(len(stops) for stops in self._by_connection.values())
