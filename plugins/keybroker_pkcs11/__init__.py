"""keybroker's PKCS#11 custody: the "hsm" backend and a root of trust on the token.

Registered through the ``keybroker`` entry-point group like any other plugin::

    [project.entry-points.keybroker]
    pkcs11 = "keybroker_pkcs11"

It uses only keybroker's public plugin API and python-pkcs11 (the ``hsm``
extra: ``pip install 'keybroker[hsm]'``).

Hooks:

- ``kb_root_key``: when ``config.root == "pkcs11"``, a :class:`TokenRootKey`
  (a non-extractable AES-256 token key that wraps every software-protected
  version's material; no root key file is created).
- ``kb_backends``: a :class:`Pkcs11Backend` (protection ``"hsm"``) when
  ``[plugins.pkcs11]`` is configured, else nothing.

Configuration (``[plugins.pkcs11]``)::

    [plugins.pkcs11]
    module = "/usr/lib/softhsm/libsofthsm2.so"  # the PKCS#11 module (required)
    token_label = "keybroker"                    # the token (required)
    pin_env = "KEYBROKER_PKCS11_PIN"             # user PIN from this variable, or
    # pin_file = "/run/secrets/pkcs11-pin"       # from this file (exactly one of the two)
    pool_size = 4                                # sessions open at most (1-64)
    wait_timeout_s = 5.0                         # a call waits this long for a session
    root_key_label = "keybroker-root"            # label of the root key (root = "pkcs11")

The PIN itself is never a configuration value (config files are copied,
backed up and shown in diffs); a ``pin`` option is refused.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from broker.backend import Backend, RootKey
from broker.config import Config, check_options
from broker.errors import InvalidArgument
from broker.hookspecs import hookimpl
from broker.optional import lazy_attributes, require

from ._defaults import DEFAULT_POOL_SIZE, DEFAULT_ROOT_LABEL, DEFAULT_WAIT_TIMEOUT_S

if TYPE_CHECKING:
    from .backend import Pkcs11Backend
    from .pool import PoolCounters, SessionPool
    from .rootkey import TokenRootKey

__all__ = [
    "PLUGIN_NAME",
    "Pkcs11Backend",
    "Pkcs11Settings",
    "PoolCounters",
    "SessionPool",
    "TokenRootKey",
    "kb_backends",
    "kb_root_key",
    "open_pool",
]

# The name this plugin is registered under, hence its config section.
PLUGIN_NAME: Final = "pkcs11"
# python-pkcs11 is the optional `hsm` extra; the plugin is registered in every
# installation, so importing it must not need the binding. The classes that
# do load on first use (module __getattr__) or when [plugins.pkcs11] is set.
_LAZY: Final = {
    "Pkcs11Backend": "backend",
    "SessionPool": "pool",
    "PoolCounters": "pool",
    "TokenRootKey": "rootkey",
}


__getattr__ = lazy_attributes(__name__, _LAZY)


def _binding_available() -> None:
    require("pkcs11", needed_by=f"[plugins.{PLUGIN_NAME}]", extra="hsm", package="python-pkcs11")


_OPTIONS: Final = frozenset(
    {"module", "token_label", "pin_env", "pin_file", "pool_size", "wait_timeout_s", "root_key_label"}
)
# Far above what a sidecar needs; a typo like 4000 would exhaust the token.
_MAX_POOL_SIZE: Final = 64


@dataclass(frozen=True, slots=True)
class Pkcs11Settings:
    """``[plugins.pkcs11]``, checked. ``pin`` is read from its source and kept out of ``repr``."""

    module: str
    token_label: str
    pin: bytes = field(repr=False)
    pool_size: int = DEFAULT_POOL_SIZE
    wait_timeout_s: float = DEFAULT_WAIT_TIMEOUT_S
    root_key_label: str = DEFAULT_ROOT_LABEL

    @classmethod
    def from_config(cls, config: Config) -> Pkcs11Settings:
        """Parse and check the section, reading the PIN from its source.

        Raises:
            InvalidArgument: a missing or unknown option, a value of the wrong
                type, or a PIN source that is unset, unreadable or empty.
                Messages never contain the PIN.
        """
        return cls.from_mapping(config.section(PLUGIN_NAME))

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any]) -> Pkcs11Settings:
        """As :meth:`from_config`, from the raw section."""
        where = f"[plugins.{PLUGIN_NAME}]"
        if "pin" in options:
            raise InvalidArgument(
                f"config: {where} must not hold the PIN itself; name its source with pin_env or pin_file"
            )
        check_options(options, _OPTIONS, where)
        module = _string(options, "module", where)
        token_label = _string(options, "token_label", where)
        pool_size = options.get("pool_size", DEFAULT_POOL_SIZE)
        if (
            not isinstance(pool_size, int)
            or isinstance(pool_size, bool)
            or not 1 <= pool_size <= _MAX_POOL_SIZE
        ):
            raise InvalidArgument(f"config: {where} pool_size must be an integer from 1 to {_MAX_POOL_SIZE}")
        wait = options.get("wait_timeout_s", DEFAULT_WAIT_TIMEOUT_S)
        if not isinstance(wait, int | float) or isinstance(wait, bool) or not wait > 0:
            raise InvalidArgument(f"config: {where} wait_timeout_s must be a positive number")
        root_label = options.get("root_key_label", DEFAULT_ROOT_LABEL)
        if not isinstance(root_label, str) or not root_label:
            raise InvalidArgument(f"config: {where} root_key_label must be a non-empty string")
        return cls(
            module=module,
            token_label=token_label,
            pin=_read_pin(options, where),
            pool_size=pool_size,
            wait_timeout_s=float(wait),
            root_key_label=root_label,
        )


def _string(options: Mapping[str, Any], name: str, where: str) -> str:
    value = options.get(name)
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"config: {where} needs {name} (a non-empty string)")
    return value


def _read_pin(options: Mapping[str, Any], where: str) -> bytes:
    env, path = options.get("pin_env"), options.get("pin_file")
    if (env is None) == (path is None):
        raise InvalidArgument(f"config: {where} needs exactly one of pin_env and pin_file")
    if env is not None:
        if not isinstance(env, str) or not env:
            raise InvalidArgument(f"config: {where} pin_env must name an environment variable")
        value = os.environ.get(env)
        if not value:
            raise InvalidArgument(f"config: {where} pin_env names {env}, which is unset or empty")
        return value.encode()
    if not isinstance(path, str) or not path:
        raise InvalidArgument(f"config: {where} pin_file must be a path")
    pin_path = Path(path)
    try:
        mode = pin_path.stat().st_mode
        text = pin_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise InvalidArgument(f"config: {where} pin_file {pin_path} cannot be read: {reason}") from None
    if mode & stat.S_IRWXO:
        # Like ssh with a private key: a secret everyone can read is refused.
        raise InvalidArgument(
            f"config: {where} pin_file {pin_path} is accessible by every user; run: chmod o-rwx {pin_path}"
        )
    # Editors and `echo` add a final newline that is not part of the PIN.
    pin = text.removesuffix("\n").removesuffix("\r")
    if not pin:
        raise InvalidArgument(f"config: {where} pin_file {pin_path} is empty")
    return pin.encode()


def open_pool(settings: Pkcs11Settings) -> SessionPool:
    """A (not yet opened) session pool for these settings.

    Raises:
        InvalidArgument: python-pkcs11 is not installed.
    """
    _binding_available()
    from .pool import SessionPool, TokenSessions  # noqa: PLC0415 - optional binding

    source = TokenSessions(settings.module, settings.token_label, settings.pin)
    return SessionPool(source, size=settings.pool_size, wait_timeout_s=settings.wait_timeout_s)


@hookimpl
def kb_root_key(config: Config) -> RootKey | None:
    """A :class:`TokenRootKey` when ``config.root == "pkcs11"``.

    Raises:
        InvalidArgument: ``root = "pkcs11"`` without a valid ``[plugins.pkcs11]``.
    """
    if config.root != PLUGIN_NAME:
        return None
    if not config.section(PLUGIN_NAME):
        raise InvalidArgument(f'config: root = "{PLUGIN_NAME}" needs a [plugins.{PLUGIN_NAME}] section')
    settings = Pkcs11Settings.from_config(config)
    pool = open_pool(settings)
    from .rootkey import TokenRootKey  # noqa: PLC0415 - optional binding

    return TokenRootKey(pool, label=settings.root_key_label)


@hookimpl
def kb_backends(config: Config, root: RootKey) -> Sequence[Backend]:
    """The hsm backend when ``[plugins.pkcs11]`` is configured; it shares the root key's
    pool when the root of trust is on the same token."""
    if not config.section(PLUGIN_NAME):
        return []
    settings = Pkcs11Settings.from_config(config)
    _binding_available()
    from .backend import Pkcs11Backend  # noqa: PLC0415 - optional binding
    from .rootkey import TokenRootKey  # noqa: PLC0415

    if isinstance(root, TokenRootKey):
        return [Pkcs11Backend(root.pool)]
    return [Pkcs11Backend(open_pool(settings))]
