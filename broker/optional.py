"""Optional dependencies of plugins: import them late, and say what to install.

Built-in plugins whose drivers are optional extras (``hsm``: python-pkcs11,
``postgres``: psycopg) are registered in every installation, so importing
them must not need the driver. A third-party plugin can do the same.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

from .errors import InvalidArgument

__all__ = ["lazy_attributes", "require"]


def lazy_attributes(package: str, names: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` that imports ``names[attr]`` (a submodule) on first use.

    Usage, in the plugin package's ``__init__``::

        __getattr__ = lazy_attributes(__name__, {"MyStore": "store"})
    """

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    return __getattr__


def require(module: str, *, needed_by: str, extra: str, package: str | None = None) -> None:
    """InvalidArgument naming the extra to install when ``module`` cannot be imported.

    Args:
        module: the import name of the driver (``"psycopg"``).
        needed_by: what in the config needs it, for the message.
        extra: the keybroker extra that installs it.
        package: the driver's distribution name, when not ``module``.
    """
    try:
        importlib.import_module(module)
    except ImportError:
        raise InvalidArgument(
            f"config: {needed_by} needs {package or module} (pip install 'keybroker[{extra}]')"
        ) from None
