"""keybroker's built-in software custody: a file root key and the "software" backend.

This plugin uses only keybroker's public plugin API (``broker.backend``,
``broker.keys``, ``broker.envelope``, ``broker.errors``, ``broker.config``,
``broker.hookspecs``), so it doubles as a template for a custody plugin. It
is registered through the ``keybroker`` entry-point group like any other::

    [project.entry-points.keybroker]
    software = "keybroker_softkeys"

Hooks:

- ``kb_root_key``: when ``config.root == "file"``, a :class:`FileRootKey` at
  ``<data_dir>/root.key``. The file is sealed under a passphrase taken from
  the ``KEYBROKER_PASSPHRASE`` environment variable or, when that is unset,
  from ``config.passphrase_file``; with neither, it is stored in the clear
  (the embedded laptop/test default).
- ``kb_backends``: one :class:`SoftwareBackend` (protection ``"software"``).

Configuration (``[plugins.software]``, all optional):

- ``threads``: worker threads the backend may use at once (default: the
  number of CPUs).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import trio

from broker.backend import Backend, RootKey
from broker.config import Config, check_options
from broker.errors import InvalidArgument
from broker.hookspecs import hookimpl

from .backend import SoftwareBackend as SoftwareBackend
from .backend import wrap_context as wrap_context
from .rootfile import FileRootKey as FileRootKey
from .rootfile import RootKeyError as RootKeyError
from .rootfile import ScryptParams as ScryptParams

__all__ = [
    "PASSPHRASE_ENV",
    "ROOT_FILE_NAME",
    "FileRootKey",
    "RootKeyError",
    "ScryptParams",
    "SoftwareBackend",
    "kb_backends",
    "kb_root_key",
    "wrap_context",
]

#: Environment variable holding the root key passphrase; it wins over
#: ``passphrase_file`` so that a deployment can inject it without a file.
PASSPHRASE_ENV = "KEYBROKER_PASSPHRASE"  # noqa: S105 - a variable name, not a secret
ROOT_FILE_NAME = "root.key"
# The name this plugin is registered under, hence its config section.
PLUGIN_NAME = "software"
_OPTIONS = frozenset({"threads"})


def passphrase_from(config: Config) -> str | None:
    """The root key passphrase: ``KEYBROKER_PASSPHRASE``, else ``passphrase_file``, else None.

    Raises:
        InvalidArgument: the variable is set but empty, or the passphrase file
            cannot be read or is empty. Messages never include the passphrase.
    """
    from_env = os.environ.get(PASSPHRASE_ENV)
    if from_env is not None:
        if not from_env:
            raise InvalidArgument(f"{PASSPHRASE_ENV} is set but empty")
        return from_env
    if config.passphrase_file is None:
        return None
    path = Path(config.passphrase_file)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise InvalidArgument(f"passphrase_file {path} cannot be read: {reason}") from None
    # Editors and `echo` add a final newline that is not part of the passphrase.
    passphrase = text.removesuffix("\n").removesuffix("\r")
    if not passphrase:
        raise InvalidArgument(f"passphrase_file {path} is empty")
    return passphrase


@hookimpl
def kb_root_key(config: Config) -> RootKey | None:
    """A :class:`FileRootKey` in the data directory when ``config.root == "file"``."""
    if config.root != "file":
        return None
    return FileRootKey(config.data_dir / ROOT_FILE_NAME, passphrase=passphrase_from(config))


@hookimpl
def kb_backends(config: Config, root: RootKey) -> Sequence[Backend]:
    """The software backend, wrapping keys under ``root``."""
    options = config.section(PLUGIN_NAME)
    check_options(options, _OPTIONS, f"[plugins.{PLUGIN_NAME}]")
    threads = options.get("threads", os.cpu_count() or 1)
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise InvalidArgument(f"config: plugins.{PLUGIN_NAME}.threads must be a positive integer")
    return [SoftwareBackend(root, limiter=trio.CapacityLimiter(threads))]
