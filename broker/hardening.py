"""Process hardening for a broker that holds keys.

A core dump of a key broker is a copy of its keys. Key slots are already
excluded from dumps (MADV_DONTDUMP in the native module), but Python objects
pass through memory too, so a serving broker turns core dumps off entirely.
"""

from __future__ import annotations

import logging
import resource

__all__ = ["disable_core_dumps"]

log = logging.getLogger("keybroker.hardening")


def disable_core_dumps() -> None:
    """Set RLIMIT_CORE to 0 (soft and hard), so no core file is ever written."""
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (OSError, ValueError) as exc:  # pragma: no cover - refused by an unusual sandbox
        log.warning("could not disable core dumps: %s", exc)
