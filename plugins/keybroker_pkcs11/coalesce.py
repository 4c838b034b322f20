"""Shared loans for concurrent small batches on one key version (see :class:`Coalescer`)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from functools import partial
from typing import Final, Generic, TypeVar, final

import trio

from broker.errors import Unavailable

from .pool import Lease, SessionPool

__all__ = ["SPREAD_AFTER_S", "Coalescer"]

#: How long queued work waits for a busy loan of its group before it takes
#: another session. Loans on a fast token (SoftHSM2: ~10 µs per item) end
#: well within it, so their callers share one loan and one thread trip;
#: on a slow token, or behind a big batch, work spreads over the pool.
SPREAD_AFTER_S: Final = 0.001

_Item = TypeVar("_Item")
_Out = TypeVar("_Out")


@final
class _Request(Generic[_Item, _Out]):
    __slots__ = ("abandoned", "done", "error", "items", "result", "taken", "wake")

    def __init__(self, items: list[_Item]) -> None:
        self.items = items
        self.taken = False
        self.abandoned = False  # its caller left while a runner held it
        self.done = False
        self.result: list[_Out] = []
        self.error: BaseException | None = None
        self.wake = trio.Event()


@final
class _Group(Generic[_Item, _Out]):
    __slots__ = ("pending", "runners")

    def __init__(self) -> None:
        self.pending: list[_Request[_Item, _Out]] = []
        self.runners = 0


@final
class Coalescer(Generic[_Item, _Out]):
    """Concurrent small batches of the same kind (one key version, one
    operation) share loans: a caller that finds the group's runners busy
    queues its items, and the next loan processes everyone's at once.

    Why: a token call on SoftHSM2 costs ~5-20 µs, a trip to a worker thread
    and back several times that, so eight callers sending one item each are
    bound by the trips, not by the token (measured: 2-2.5x the single-item
    throughput). A group runs one loan at a time while its loans are quick;
    work that has waited ``SPREAD_AFTER_S`` for a busy loan starts another,
    up to ``pool.size`` per group, so a slow token or a big batch still
    spreads over the pool's sessions. (Splitting quick work over sessions
    only adds thread trips: on SoftHSM2 pool 4 ran single items at 0.55x
    pool 1 before this rule.)

    Args:
        pool: the session pool.
        max_items: at most this many items go into one loan.

    Cancellation: a caller cancelled before its items were taken leaves the
        queue; once taken, the loan finishes and its share is discarded. A
        runner cancelled while waiting for a loan puts back the part of the
        batch it took whose callers still wait, and wakes them all: one of
        them runs it.
    """

    def __init__(self, pool: SessionPool, *, max_items: int = 4096) -> None:
        self.pool = pool
        self.max_items = max_items
        self._groups: dict[object, _Group[_Item, _Out]] = {}

    async def run(
        self, key: object, items: list[_Item], work: Callable[[Lease, list[_Item]], list[_Out]]
    ) -> list[_Out]:
        """``work(lease, all_items)`` over this and concurrent callers' items; this caller's results.

        ``work`` must return one result per item, in order, and must not
        depend on which caller an item came from.

        Raises:
            Unavailable: as :meth:`SessionPool.run` (also when the batch this
                caller's items were in failed that way), or no loan took the
                items before the pool's deadline.
        """
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group()
        request: _Request[_Item, _Out] = _Request(items)
        group.pending.append(request)
        now = trio.current_time()
        deadline = now + self.pool.wait_timeout_s
        spread_at = now + SPREAD_AFTER_S
        try:
            while not request.done:
                may_run = group.runners == 0 or (
                    group.runners < self.pool.size and trio.current_time() >= spread_at
                )
                if may_run and not request.taken:
                    group.runners += 1
                    try:
                        await self._drain(group, work)
                    finally:
                        group.runners -= 1
                        # Work handed back (a cancelled runner) needs a runner.
                        for waiting in group.pending:
                            if waiting is not request:
                                waiting.wake.set()
                    continue
                if request.wake.is_set():
                    request.wake = trio.Event()
                wait_until = math.inf if request.taken else deadline
                if group.runners < self.pool.size and not request.taken:
                    wait_until = min(wait_until, spread_at)
                with trio.move_on_at(wait_until):
                    await request.wake.wait()
                if not request.done and not request.taken and trio.current_time() >= deadline:
                    raise Unavailable(f"no PKCS#11 session became free within {self.pool.wait_timeout_s:g} s")
        finally:
            if not request.taken:
                with contextlib.suppress(ValueError):
                    group.pending.remove(request)
            elif not request.done:
                request.abandoned = True  # a runner holds it: not to be handed back
            if not group.pending and group.runners == 0 and self._groups.get(key) is group:
                del self._groups[key]
        if request.error is not None:
            raise request.error
        return request.result

    async def _drain(
        self, group: _Group[_Item, _Out], work: Callable[[Lease, list[_Item]], list[_Out]]
    ) -> None:
        while group.pending:
            batch: list[_Request[_Item, _Out]] = []
            count = 0
            while group.pending and (not batch or count + len(group.pending[0].items) <= self.max_items):
                request = group.pending.pop(0)
                request.taken = True
                batch.append(request)
                count += len(request.items)
            items = [item for request in batch for item in request.items]
            try:
                results = await self.pool.run(partial(_apply, work, items))
            except Exception as exc:
                for request in batch:
                    request.error = exc
                    request.done = True
                    request.wake.set()
                continue
            except BaseException:
                # Cancelled before the batch ran: hand back what is still awaited.
                waiting = [request for request in batch if not request.abandoned]
                for request in waiting:
                    request.taken = False
                group.pending[:0] = waiting
                raise
            offset = 0
            for request in batch:
                end = offset + len(request.items)
                request.result = results[offset:end]
                offset = end
                request.done = True
                request.wake.set()


def _apply(work: Callable[[Lease, list[_Item]], list[_Out]], items: list[_Item], lease: Lease) -> list[_Out]:
    return work(lease, items)
