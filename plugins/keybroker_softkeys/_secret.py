"""Small helpers for handling secret bytes in Python without leaving copies.

CPython cannot scrub an immutable ``bytes`` object: once freed, its memory
keeps the secret until reused. Secrets therefore travel in ``bytearray``
buffers that are zeroed in place as soon as they have been handed to native
memory (a KeySlot) or to OpenSSL (a ``cryptography`` key object).
"""

from __future__ import annotations

import os
import stat
import threading

__all__ = ["random_bytearray", "zero"]

# Reading the kernel CSPRNG straight into a caller's buffer avoids the
# intermediate ``bytes`` object that os.urandom() would leave behind.
_URANDOM = "/dev/urandom"


class _Device:
    """A character device opened once for the process, checked before each use.

    Opening /dev/urandom cost more than reading a key from it. The check
    (its device number, by ``fstat``) makes sure a descriptor closed behind
    our back and reused for another file is never read as randomness.
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._kept: tuple[int, int] | None = None  # (fd, st_rdev)

    def fd(self) -> int | None:
        """The device's descriptor, or None where it cannot be opened."""
        with self._lock:
            if self._kept is not None:
                fd, device = self._kept
                try:
                    info = os.fstat(fd)
                except OSError:
                    info = None
                if info is not None and stat.S_ISCHR(info.st_mode) and info.st_rdev == device:
                    return fd
                self._kept = None  # not ours any more; never closed here, it may be someone else's
            try:
                fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return None
            info = os.fstat(fd)
            if not stat.S_ISCHR(info.st_mode):
                os.close(fd)
                return None
            self._kept = (fd, info.st_rdev)
            return fd


_urandom = _Device(_URANDOM)


def random_bytearray(n: int) -> bytearray:
    """``n`` bytes from the OS CSPRNG, written directly into a new bytearray.

    Falls back to ``os.urandom`` (same generator, one transient immutable
    copy) where /dev/urandom cannot be opened, e.g. in a minimal chroot.
    """
    buf = bytearray(n)
    fd = _urandom.fd()
    if fd is None:
        buf[:] = os.urandom(n)
        return buf
    view = memoryview(buf)
    got = 0
    while got < n:
        read = os.readv(fd, [view[got:]])
        if read <= 0:
            raise OSError(f"short read from {_URANDOM}")
        got += read
    return buf


def zero(buf: bytearray | memoryview) -> None:
    """Overwrite ``buf`` with zero bytes in place (same length, no reallocation)."""
    buf[:] = bytes(len(buf))
