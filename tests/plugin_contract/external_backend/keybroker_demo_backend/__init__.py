"""A demo third-party keybroker backend plugin.

It offers software-protected keys under its own protection name,
``"demo-software"``, by reusing the built-in software backend's public class.
That is all a custody plugin needs: a module with ``hookimpl`` functions,
registered under the ``keybroker`` entry-point group in its pyproject.toml::

    [project.entry-points.keybroker]
    demo-software = "keybroker_demo_backend"

Clients then create keys with ``protection: "demo-software"``.
"""

from __future__ import annotations

from collections.abc import Sequence

from keybroker_softkeys import SoftwareBackend

from broker.backend import Backend, RootKey
from broker.config import Config
from broker.hookspecs import hookimpl

__all__ = ["PROTECTION", "DemoBackend", "kb_backends"]

PROTECTION = "demo-software"


class DemoBackend(SoftwareBackend):
    """The software backend under the protection name ``"demo-software"``."""

    protection = PROTECTION


@hookimpl
def kb_backends(config: Config, root: RootKey) -> Sequence[Backend]:
    """One :class:`DemoBackend` wrapping keys under the broker's root key."""
    return [DemoBackend(root)]
