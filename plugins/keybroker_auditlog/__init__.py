"""Built-in primary audit sink: the hash chain as JSON lines in one file.

Records are appended to ``<data_dir>/audit/audit.jsonl``, one canonical JSON
object per line. :meth:`FileAuditSink.write` fsyncs each batch before it
returns; :meth:`FileAuditSink.append` writes without waiting for the disk and
:meth:`FileAuditSink.sync` fsyncs later (the staged mode of
:class:`broker.audit.StagedAuditSink`, ``[audit] sync = "changes"``). Either
way a record is in the file before the broker answers the request it
belongs to. ``keybroker audit verify`` reads the same file
(:func:`broker.audit.verify_audit_dir`).

Crash recovery: a crash in the middle of a write can leave a partial last
line. On open the sink finds the last complete, self-consistent record,
moves everything after it to ``audit/torn-<unix time>.bin`` (kept for
inspection, never deleted) and truncates the log back to that record. The
broker then writes an ``audit.recover`` record saying what was set aside, so
the gap is itself on the chain.

Write failures (disk full, I/O error) roll the file back to the end of the
last durable record before the ``OSError`` propagates, so the chain on disk
never holds a half-written batch that later records would follow.

This package is also the template for a third-party sink: a module with one
``@hookimpl`` function returning sink objects, registered through the
``keybroker`` entry-point group::

    [project.entry-points.keybroker]
    auditlog = "keybroker_auditlog"

It uses only the public plugin API: :mod:`broker.audit`,
:data:`broker.hookspecs.hookimpl` and :class:`broker.config.Config`.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import trio

from broker.audit import (
    AUDIT_FILE_NAME,
    GENESIS,
    MAX_LINE_BYTES,
    TORN_FILE_PREFIX,
    AuditRecord,
    ChainHead,
    joined_lines,
    parse_valid_line,
)
from broker.config import Config
from broker.durable import fdatasync, flush, sync_directory
from broker.hookspecs import hookimpl

__all__ = ["DIR_MODE", "FILE_MODE", "FileAuditSink", "kb_audit_sinks"]

# The log names every key and principal: only the broker's user reads it.
DIR_MODE: Final = 0o700
FILE_MODE: Final = 0o600

# Records are a few hundred bytes, so one read of this size from the end of
# the file normally finds the last several lines at once.
_SCAN_CHUNK: Final = 64 * 1024
_COPY_CHUNK: Final = 1024 * 1024


@hookimpl
def kb_audit_sinks(config: Config) -> list[FileAuditSink]:
    """Provide the primary file sink under ``config.audit_dir``."""
    return [FileAuditSink(config.audit_dir)]


class FileAuditSink:
    """The primary audit sink: an append-only, fsynced JSON-lines file.

    Args:
        directory: the audit directory; created 0700 if missing (its parent,
            the data directory, must exist).

    Resource handling:
        :meth:`open` takes an exclusive ``flock`` on the log, so a second
        broker on the same data directory fails to start instead of forking
        the chain; :meth:`aclose` releases it.

    File set-up and :meth:`write` run in a worker thread, through the
    sink's own limiter so audit writes never wait behind unrelated work in
    trio's default thread pool; :meth:`append` writes on the event loop and
    :meth:`sync` flushes on a native thread.
    """

    name = "file"
    primary = True

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / AUDIT_FILE_NAME
        self._fd: int | None = None
        # End of the last durable record: where a failed write is rolled back to.
        self._size = 0
        # A failed write whose rollback also failed left bytes past _size;
        # they must go before anything else is appended.
        self._dirty = False
        self._limiter = trio.CapacityLimiter(1)
        # What append wrote since the last successful sync: the last
        # len(_unsynced) bytes before _size (see sync).
        self._unsynced = bytearray()

    async def open(self) -> ChainHead:
        """Create or reopen the log, set aside a torn tail, and report the head.

        Returns:
            The last good record's seq and hash (0 and GENESIS for a new
            log), with what was set aside, if anything.

        Raises:
            OSError: the directory or file cannot be created or read, or
                another process holds the log (``BlockingIOError``).
        """
        return await trio.to_thread.run_sync(self._open_sync, limiter=self._limiter)

    async def write(self, records: Sequence[AuditRecord]) -> None:
        """Append ``records`` and fsync; on failure roll back and raise.

        Raises:
            OSError: the write or fsync failed (the file is as before the
                call), or the sink is closed.

        Cancellation:
            The write runs to completion in its thread; cancellation takes
            effect once it is durable (or rolled back).
        """
        if not records:
            return
        await trio.to_thread.run_sync(self._write_sync, records, limiter=self._limiter)

    def append(self, records: Sequence[AuditRecord]) -> None:
        """Write ``records`` to the file without fsync (``[audit] sync = "changes"``).

        A ``write(2)`` of a few hundred bytes into the page cache, done on
        the event loop: the records survive a crash of the broker at once,
        and a power loss once :meth:`sync` has run.

        Raises:
            OSError: the write failed (disk full, I/O error); the file is
                truncated back to the end of the last good record first.
        """
        if records:
            self._append(records, sync=False)

    async def sync(self) -> None:
        """Fsync everything appended so far (:func:`broker.durable.fdatasync`: off the event loop).

        After a failed fsync the kernel may have dropped the pages it could
        not write and marked them clean, so a later fsync that succeeds
        would not write them: the unsynced bytes are written again from the
        sink's own copy, then flushed, before this returns.

        Raises:
            OSError: the fsync failed (again) or the sink is closed.
        """
        fd = self._open_fd()
        covered = len(self._unsynced)
        try:
            await fdatasync(fd)
        except OSError:
            covered = self._rewrite_unsynced()  # appends may have come meanwhile
            await fdatasync(fd)
        del self._unsynced[:covered]

    async def aclose(self) -> None:
        """Close the file, releasing the lock. Idempotent."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    # --- blocking halves, run in a worker thread -------------------------

    def _open_sync(self) -> ChainHead:
        if self._fd is not None:
            raise OSError(errno.EBUSY, "audit log already open", str(self.path))
        _make_private_dir(self.directory)
        fd, created = _open_private(self.path, os.O_RDWR | os.O_APPEND)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise BlockingIOError(
                    errno.EWOULDBLOCK, "audit log is in use by another keybroker process", str(self.path)
                ) from None
            if created:
                # The new name must survive a crash as well as its contents.
                sync_directory(self.directory)
            head = self._recover(fd)
            self._size = os.fstat(fd).st_size
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return head

    def _recover(self, fd: int) -> ChainHead:
        size = os.fstat(fd).st_size
        good_end, last = _find_last_record(fd, size)
        seq, digest = (last.seq, last.hash) if last is not None else (0, GENESIS)
        if good_end == size:
            return ChainHead(seq=seq, hash=digest)
        # Copy first, truncate second: a crash in between only means the
        # tail is set aside twice on the next start, never lost.
        torn_path, lines = _set_aside(fd, self.directory, good_end, size)
        os.ftruncate(fd, good_end)
        flush(fd)
        return ChainHead(
            seq=seq, hash=digest, set_aside_bytes=size - good_end, set_aside_path=str(torn_path),
            set_aside_lines=lines,
        )

    def _write_sync(self, records: Sequence[AuditRecord]) -> None:
        self._append(records, sync=True)

    def _rewrite_unsynced(self) -> int:
        """Write the unsynced bytes again, in their place (the last ones before
        ``_size``); how many. Through a descriptor of its own: the sink's is
        O_APPEND, where Linux's pwrite appends."""
        view = memoryview(bytes(self._unsynced))
        written, offset = len(view), self._size - len(view)
        fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            while view:
                done = os.pwrite(fd, view, offset)
                view, offset = view[done:], offset + done
        finally:
            os.close(fd)
        return written

    def _open_fd(self) -> int:
        fd = self._fd
        if fd is None:
            raise OSError(errno.EBADF, "audit log is closed", str(self.path))
        return fd

    def _append(self, records: Sequence[AuditRecord], *, sync: bool) -> None:
        fd = self._open_fd()
        if self._dirty:
            os.ftruncate(fd, self._size)
            if sync:
                flush(fd)
            self._dirty = False
        data = joined_lines(records)
        try:
            # os.write on the raw descriptor: there is no user-space buffer
            # to flush, so durability is exactly the sync below.
            _write_all(fd, data)
            if sync:
                if self._unsynced:  # a sync failed since they were appended: write them again first
                    self._rewrite_unsynced()
                flush(fd)
                self._unsynced.clear()
            else:
                self._unsynced += data
        except OSError:
            self._dirty = True
            try:
                os.ftruncate(fd, self._size)
                flush(fd)
                self._dirty = False
            except OSError:
                pass  # _dirty stays set: the next write retries the rollback first
            raise
        self._size += len(data)


# --- helpers -----------------------------------------------------------------


def _make_private_dir(path: Path) -> None:
    try:
        path.mkdir(mode=DIR_MODE)
    except FileExistsError:
        return  # an operator's choice of mode on an existing directory stands
    # mkdir's mode is filtered by the umask; chmod is not.
    os.chmod(path, DIR_MODE)
    sync_directory(path.parent)


def _open_private(path: Path, flags: int) -> tuple[int, bool]:
    """Open ``path``, creating it 0600 (umask-proof) if needed; returns (fd, created)."""
    flags |= os.O_CLOEXEC
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        return os.open(path, flags), False
    try:
        os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd, True


def _write_all(fd: int, data: bytes) -> None:
    written = os.write(fd, data)
    if written < len(data):  # a short write: a signal, or a nearly full disk
        view = memoryview(data)[written:]
        while view:
            view = view[os.write(fd, view):]


def _rfind_newline(fd: int, before: int) -> int:
    """Offset of the last ``\\n`` in ``[0, before)``, or -1; reads backwards in chunks."""
    pos = before
    while pos > 0:
        start = max(0, pos - _SCAN_CHUNK)
        chunk = os.pread(fd, pos - start, start)
        index = chunk.rfind(b"\n")
        if index >= 0:
            return start + index
        pos = start
    return -1


def _find_last_record(fd: int, size: int) -> tuple[int, AuditRecord | None]:
    """The end offset of the last complete, self-consistent record, and the record.

    Walks backwards line by line from the end, so reopening a large log
    reads only its tail. Returns ``(0, None)`` when no line is a record.
    """
    end = _rfind_newline(fd, size) + 1  # bytes after the last newline are torn
    while end > 0:
        start = _rfind_newline(fd, end - 1) + 1
        if end - start <= MAX_LINE_BYTES:
            record = parse_valid_line(os.pread(fd, end - start, start))
            if record is not None:
                return end, record
        end = start
    return 0, None


def _set_aside(fd: int, directory: Path, start: int, end: int) -> tuple[Path, int]:
    """Copy bytes ``[start, end)`` of the log to a new torn-*.bin file.

    Returns:
        The new file's path and how many complete lines the bytes held.
    """
    stamp = int(time.time())
    for attempt in range(1000):
        suffix = f"-{attempt}" if attempt else ""
        path = directory / f"{TORN_FILE_PREFIX}{stamp}{suffix}.bin"
        try:
            out, _ = _open_private(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            continue
        break
    else:
        raise FileExistsError(errno.EEXIST, "no free name to set the torn audit tail aside", str(directory))
    lines = 0
    try:
        pos = start
        while pos < end:
            chunk = os.pread(fd, min(_COPY_CHUNK, end - pos), pos)
            if not chunk:
                raise OSError(errno.EIO, "audit log shrank while setting its tail aside", str(path))
            lines += chunk.count(b"\n")
            _write_all(out, chunk)
            pos += len(chunk)
        os.fsync(out)
    finally:
        os.close(out)
    sync_directory(directory)
    return path, lines
