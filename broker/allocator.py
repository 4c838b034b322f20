"""Heap tuning for a serving broker: keep freed memory for the next batch.

glibc hands a large allocation its own mapping and returns freed memory at
the top of the heap to the kernel once more than 128 KiB is free. A broker
answers batch requests of a few MB again and again, so each batch's buffers
(joined inputs, outputs, the result objects) were mapped and page-faulted in
afresh on every call: measured on this project's 2-core VM, a
``seal_batch`` of 1,000 x 4 KiB ran at 0.2 M items/s that way and 0.9 M with
the thresholds below (bench/RESULTS.md, "peers"). The cost is that up to
``TRIM_THRESHOLD`` of freed heap stays with the process.

Small objects (every item and envelope of a batch of data keys) never come
from that heap: CPython's own allocator maps arenas for them and unmaps each
one as soon as it empties, so a batch of 100,000 x 32 B mapped its ~10 arenas
anew each time. The native module's arena cache (``kb_arena_cache``)
keeps up to ``KEPT_ARENA_BYTES`` of emptied arenas for the next batch.

Neither is cleansed when it is kept, as neither was before when it was
freed: plaintext a request carried (a data key that ``datakey`` returned, an
item of ``decrypt_batch``) can stay in that memory until it is reused,
longer than when it went back to the system at once. Key slots are not
affected: their key bytes live in the native module's locked pages, which
are cleansed on release and never come from this heap or those arenas.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
from typing import Final

from ._native import ffi, lib

__all__ = ["KEPT_ARENA_BYTES", "MMAP_THRESHOLD", "TRIM_THRESHOLD", "keep_freed_arenas", "keep_freed_memory"]

log = logging.getLogger("keybroker.allocator")

# mallopt(3) parameters.
_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_THRESHOLD: Final = -3

#: Freed memory at the top of the heap kept for reuse (glibc default 128 KiB).
TRIM_THRESHOLD: Final = 64 * 1024 * 1024
#: Allocations at least this large get their own mapping (glibc default 128
#: KiB, raised dynamically up to 32 MiB); fixed at the dynamic maximum.
MMAP_THRESHOLD: Final = 32 * 1024 * 1024
#: Emptied small-object arenas kept for reuse: the same budget as the heap's.
KEPT_ARENA_BYTES: Final = TRIM_THRESHOLD


def keep_freed_memory() -> bool:
    """Raise glibc's trim and mmap thresholds and keep emptied arenas; True if both took.

    The thresholds are a no-op on a C library without ``mallopt`` (musl,
    macOS); see :func:`keep_freed_arenas` for the arenas.
    """
    arenas = keep_freed_arenas()
    return _raise_thresholds() and arenas


def keep_freed_arenas() -> bool:
    """Route CPython's small-object arenas through the native arena cache; True if installed.

    Idempotent. False where the interpreter has no arena allocator to
    replace (not CPython).
    """
    api = getattr(ctypes, "pythonapi", None)
    if sys.implementation.name != "cpython" or api is None:
        return False
    current = ffi.new("kb_arena_allocator *")
    api.PyObject_GetArenaAllocator(ctypes.c_void_p(int(ffi.cast("uintptr_t", current))))
    cache = lib.kb_arena_cache(current, KEPT_ARENA_BYTES)
    if cache == ffi.NULL:
        log.warning("the arena cache could not be installed; batches of small items may run slower")
        return False
    api.PyObject_SetArenaAllocator(ctypes.c_void_p(int(ffi.cast("uintptr_t", cache))))
    return True


def _raise_thresholds() -> bool:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    if not ok:
        log.warning("the C library refused the heap thresholds; large batches may run slower")
    return ok
