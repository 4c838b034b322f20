"""One lock per name, kept only while someone holds it or waits for it.

The key service serializes changes to one key under a lock of that key's
name. Locks kept for every name ever used would grow with the number of keys
(four objects per key that the cyclic garbage collector then scans on every
full collection); these exist only while in use.
"""

from __future__ import annotations

from typing import final

import trio

__all__ = ["NameLocks"]


@final
class _Entry:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = trio.Lock()
        self.users = 0  # tasks holding or waiting for the lock


@final
class NameLocks:
    """``async with locks(name):`` holds the lock of ``name``; names lock independently.

    Attributes:
        active: how many names have a holder or a waiter now.
    """

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    @property
    def active(self) -> int:
        return len(self._entries)

    def __call__(self, name: str) -> _Hold:
        return _Hold(self._entries, name)


@final
class _Hold:
    """One ``async with``: takes the name's lock on entry, releases it on exit.

    Cancellation: while waiting, the task leaves without the lock and the
    entry is dropped if nobody else uses it.
    """

    __slots__ = ("_entries", "_entry", "_name")

    def __init__(self, entries: dict[str, _Entry], name: str) -> None:
        self._entries, self._name = entries, name
        self._entry: _Entry | None = None

    async def __aenter__(self) -> None:
        entry = self._entries.get(self._name)
        if entry is None:
            entry = self._entries[self._name] = _Entry()
        entry.users += 1
        if entry.users == 1:
            # Nobody else holds or waits for it: taken at once. A trio lock
            # would still yield to the scheduler (a task step, a trip down
            # the caller's whole stack), for nothing here: the holder's
            # next await is its own checkpoint.
            entry.lock.acquire_nowait()
            self._entry = entry
            return
        try:
            await entry.lock.acquire()
        except BaseException:
            self._leave(entry)
            raise
        self._entry = entry

    async def __aexit__(self, *exc: object) -> None:
        entry, self._entry = self._entry, None
        assert entry is not None
        entry.lock.release()
        self._leave(entry)

    def _leave(self, entry: _Entry) -> None:
        entry.users -= 1
        if not entry.users:
            del self._entries[self._name]
