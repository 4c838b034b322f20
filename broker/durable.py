"""Flushing a file to stable storage without holding up the event loop.

``trio.to_thread.run_sync(os.fdatasync, fd)`` runs the flush on a Python
thread, which must take the GIL to start and again to report back. A busy
event loop releases and retakes the GIL at every system call, and CPython
hands it to a waiting thread only when its holder keeps it for a whole
switch interval, so that thread can wait far longer than the flush takes:
with 8 clients creating keys, ~200 µs to start and ~100 µs to report back,
around a 270 µs flush. :func:`fdatasync` flushes on a native thread that
never enters Python and reports through an eventfd, which the event loop
waits on like any socket. Up to eight such threads are started as needed and
kept for the life of the process; more flushes at once wait their turn.

The eventfds are kept too, a few of them, for the next flushes: opening and
closing one per flush were two system calls out of the handful an event loop
makes per flush. One goes back only once its report has been read, which
leaves it at zero, and a forked child closes the ones it inherited rather
than share them with its parent.

Plugins (audit sinks, stores) use it for the flush that stands between a
write and its acknowledgement.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

import trio

from ._native import lib

__all__ = ["fdatasync", "flush", "sync_directory"]

# Eventfds kept for the next flushes (see the module docstring), at most this many.
MAX_IDLE_EVENTFDS: Final = 16
_idle_eventfds: list[int] = []


def _forget_idle_eventfds() -> None:
    """In a forked child: close the inherited eventfds, which the parent goes on using."""
    while _idle_eventfds:
        os.close(_idle_eventfds.pop())


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_idle_eventfds)


def flush(fd: int) -> None:
    """The blocking flush: fdatasync(2), or fsync(2) where there is no fdatasync (macOS).

    fdatasync also persists a new file size (needed to read the data back)
    but skips timestamps: one journal write less per flush.
    """
    if hasattr(os, "fdatasync"):
        os.fdatasync(fd)
    else:  # pragma: no cover - macOS
        os.fsync(fd)


def sync_directory(path: Path) -> None:
    """Flush a directory's entries: after a file in it is created, renamed or
    linked, until this returns the new name may not survive a power loss."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def fdatasync(fd: int) -> None:
    """Flush ``fd`` (:func:`flush`) while the event loop goes on; return once it is durable.

    On Linux the flush runs on a native thread (see the module docstring);
    elsewhere on a trio worker thread.

    Raises:
        OSError: the flush failed (EIO, ENOSPC, EBADF, EINVAL for a pipe...),
            or no thread could be started for it.

    Cancellation: shielded once the flush has started. A flush cannot be
    stopped, and its outcome is what the caller's acknowledgement rests on:
    it is returned (or raised), and the cancellation is delivered at the
    caller's next checkpoint.
    """
    if not hasattr(os, "eventfd"):  # pragma: no cover - not Linux
        await trio.to_thread.run_sync(flush, fd)
        return
    try:
        # One pop, not a test then a pop: brokers in other threads share the list.
        notify = _idle_eventfds.pop()
    except IndexError:
        notify = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        err = lib.kb_fdatasync_start(fd, notify)
        if err:
            raise OSError(err, os.strerror(err))
        try:
            await trio.lowlevel.wait_readable(notify)
        except trio.Cancelled:
            # Rare, so the shield is only entered now rather than around
            # every wait. The cancellation is not lost: trio raises it again
            # at the caller's next checkpoint in the cancelled scope.
            with trio.CancelScope(shield=True):
                await trio.lowlevel.wait_readable(notify)
        outcome = os.eventfd_read(notify)
    except BaseException:
        # Its report may still be on the way: never reuse it.
        os.close(notify)
        raise
    if len(_idle_eventfds) < MAX_IDLE_EVENTFDS:
        _idle_eventfds.append(notify)
    else:
        os.close(notify)
    if outcome != 1:
        raise OSError(outcome - 1, os.strerror(outcome - 1))
