"""Small helpers for handling secret bytes in Python without leaving copies.

CPython cannot scrub an immutable ``bytes`` object: once freed, its memory
keeps the secret until reused. Secrets therefore travel in ``bytearray``
buffers that are zeroed in place as soon as they have been handed to native
memory (a KeySlot) or to OpenSSL (a ``cryptography`` key object).
"""

from __future__ import annotations

import os

__all__ = ["random_bytearray", "zero"]

# Reading the kernel CSPRNG straight into a caller's buffer avoids the
# intermediate ``bytes`` object that os.urandom() would leave behind.
_URANDOM = "/dev/urandom"


def random_bytearray(n: int) -> bytearray:
    """``n`` bytes from the OS CSPRNG, written directly into a new bytearray.

    Falls back to ``os.urandom`` (same generator, one transient immutable
    copy) where /dev/urandom cannot be opened, e.g. in a minimal chroot.
    """
    buf = bytearray(n)
    try:
        fd = os.open(_URANDOM, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        buf[:] = os.urandom(n)
        return buf
    try:
        view = memoryview(buf)
        got = 0
        while got < n:
            read = os.readv(fd, [view[got:]])
            if read <= 0:
                raise OSError(f"short read from {_URANDOM}")
            got += read
    finally:
        os.close(fd)
    return buf


def zero(buf: bytearray | memoryview) -> None:
    """Overwrite ``buf`` with zero bytes in place (same length, no reallocation)."""
    buf[:] = bytes(len(buf))
