"""Defaults of ``[plugins.pkcs11]``, importable without python-pkcs11."""

from __future__ import annotations

from typing import Final

# Four sessions keep two cores busy with room for one slow call (key
# generation, RSA) without starving the rest; most tokens allow far more.
# Quick calls on one key share one loan whatever the size (see coalesce.py),
# so on a fast in-process token like SoftHSM2 extra sessions cost little.
DEFAULT_POOL_SIZE: Final = 4
# Long enough to ride out a burst queued behind a few RSA key generations
# (0.1-2 s each on SoftHSM2), short enough that a client's own timeout is
# not what ends the wait.
DEFAULT_WAIT_TIMEOUT_S: Final = 5.0
DEFAULT_ROOT_LABEL: Final = "keybroker-root"
