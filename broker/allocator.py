"""Heap tuning for a serving broker (glibc): keep freed memory for the next batch.

glibc hands a large allocation its own mapping and returns freed memory at
the top of the heap to the kernel once more than 128 KiB is free. A broker
answers batch requests of a few MB again and again, so each batch's buffers
(joined inputs, outputs, the result objects) were mapped and page-faulted in
afresh on every call: measured on this project's 2-core VM, a
``seal_batch`` of 1,000 x 4 KiB ran at 0.2 M items/s that way and 0.9 M with
the thresholds below (bench/RESULTS.md, "peers"). The cost is that up to
``TRIM_THRESHOLD`` of freed heap stays with the process.

Key material is not affected: it lives in the native module's locked pages,
which are cleansed on release and never come from this heap.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from typing import Final

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "keep_freed_memory"]

log = logging.getLogger("keybroker.allocator")

# mallopt(3) parameters.
_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_THRESHOLD: Final = -3

#: Freed memory at the top of the heap kept for reuse (glibc default 128 KiB).
TRIM_THRESHOLD: Final = 64 * 1024 * 1024
#: Allocations at least this large get their own mapping (glibc default 128
#: KiB, raised dynamically up to 32 MiB); fixed at the dynamic maximum.
MMAP_THRESHOLD: Final = 32 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Raise glibc's trim and mmap thresholds; True if the C library took both.

    A no-op returning False on a C library without ``mallopt`` (musl, macOS).
    """
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
