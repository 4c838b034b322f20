"""Usage accounting per key version, without a store write per request.

A broker leases blocks of uses from the store (one atomic update reserves a
block), spends them in memory, and leases again when the block runs out. The
stored count is the sum of leases: a broker that dies forfeits its unspent
block, which errs on the safe side of the NIST usage bound.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Meter", "lease_size"]

# Largest block leased at once: one store write per ~65k uses.
MAX_LEASE = 2**16
# Lease at most this fraction of a version's limit at once, so a crash
# forfeits little of a small limit.
LEASE_FRACTION = 64


def lease_size(limit: int | None, wanted: int) -> int:
    """How many uses to ask the store for when ``wanted`` more are needed."""
    block = MAX_LEASE if limit is None else max(1, min(MAX_LEASE, limit // LEASE_FRACTION))
    return max(block, wanted)


@dataclass(slots=True)
class Meter:
    """Uses of one key version as this broker sees them.

    ``spent`` counts uses spent here plus what the store had counted before
    this broker loaded the version; ``available`` is leased and unspent.
    """

    spent: int = 0
    available: int = 0

    def take(self, count: int, limit: int | None) -> bool:
        """Spend ``count`` leased uses if enough are available and ``limit`` is not crossed.

        Leases granted under a limit never take ``spent`` past it; a block
        leased before the limit was lowered could, so it is not spent past
        the new one (``spent`` may count other brokers' unspent leases, so
        this errs on the safe side).
        """
        if count > self.available or (limit is not None and self.spent + count > limit):
            return False
        self.available -= count
        self.spent += count
        return True
