"""Defaults of ``[plugins.pkcs11]``, importable without python-pkcs11."""

from __future__ import annotations

from typing import Final

# Four sessions keep two cores busy with room for one slow call (key
# generation, RSA) without starving the rest; most tokens allow far more.
# (On SoftHSM2, 1-2 serve best: see bench/RESULTS.md, "pkcs11".)
DEFAULT_POOL_SIZE: Final = 4
# Long enough to ride out a burst queued behind a few RSA key generations
# (0.1-2 s each on SoftHSM2), short enough that a client's own timeout is
# not what ends the wait.
DEFAULT_WAIT_TIMEOUT_S: Final = 5.0
DEFAULT_ROOT_LABEL: Final = "keybroker-root"
