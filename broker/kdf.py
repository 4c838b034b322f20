"""scrypt with the memory bound every caller shares.

Both scrypt users -- the root key file (keybroker_softkeys) and passphrase
backup archives (broker.backup) -- read the cost parameters from a file that
may be hostile, so the parameters must be refused before they cost memory,
and the KDF's own failures must reach the caller as one error it can
translate. ``hashlib.scrypt`` alone accepts parameters that need more memory
than its ``maxmem`` (which must stay below 2**31) can ever allow, and then
raises a bare ``ValueError`` or ``MemoryError``.
"""

from __future__ import annotations

import hashlib
from typing import Final

__all__ = ["MAX_SCRYPT_MEMORY", "scrypt", "scrypt_memory"]

# A ceiling on 128 * N * r * (p + 1) bytes: well above RFC 7914's
# interactive tiers (64 MiB for N = 2**15, r = 8, p = 1), well below what
# hashlib accepts (maxmem < 2**31) and what a small host can spare at start-up.
MAX_SCRYPT_MEMORY: Final = 1 << 30
# OpenSSL counts a few blocks more than the working set; this covers them.
_SLACK: Final = 1 << 20


def scrypt_memory(log2_n: int, r: int, p: int) -> int:
    """The bytes scrypt may need for N = 2**log2_n, r and p (working set plus p blocks, generously)."""
    return 128 * (1 << log2_n) * r * (p + 1)


def scrypt(secret: bytes, salt: bytes, *, log2_n: int, r: int, p: int, length: int) -> bytes:
    """scrypt(secret, salt) of ``length`` bytes, the cost bounded by :data:`MAX_SCRYPT_MEMORY`.

    Raises:
        ValueError: the parameters need more than :data:`MAX_SCRYPT_MEMORY`,
            or the KDF failed (out of memory included).
    """
    memory = scrypt_memory(log2_n, r, p)
    if memory > MAX_SCRYPT_MEMORY:
        raise ValueError(f"scrypt parameters need {memory} bytes, more than {MAX_SCRYPT_MEMORY}")
    try:
        return hashlib.scrypt(
            secret, salt=salt, n=1 << log2_n, r=r, p=p, maxmem=memory + _SLACK, dklen=length
        )
    except MemoryError:
        raise ValueError("scrypt ran out of memory") from None
