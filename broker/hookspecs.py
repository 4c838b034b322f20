"""Every hook a keybroker plugin can implement, and the ``hookimpl`` marker.

Hooks are synchronous and cheap: those that provide a capability return a
provider object (a Store, a Backend, a RootKey, an AuditSink) whose methods
are ``async``. That keeps pluggy, which has no async support, out of the
request path, and avoids the trap where a coroutine object counts as a
``firstresult`` answer.

A plugin is a module (or object) with functions decorated by ``hookimpl``,
registered through the ``keybroker`` entry-point group::

    [project.entry-points.keybroker]
    myplugin = "my_package"

Only the names imported from ``broker`` and its documented modules are the
plugin API; everything starting with ``_`` is private.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .audit import AuditSink
    from .backend import Backend, RootKey
    from .cluster import Cluster
    from .config import Config
    from .events import KeyEvent
    from .policy import Policy, RpcMethod
    from .store import Store

PROJECT = "keybroker"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

__all__ = ["PROJECT", "hookimpl", "hookspec"]


# --- custody ---------------------------------------------------------------


@hookspec(firstresult=True)
def kb_root_key(config: Config) -> RootKey | None:
    """Provide the root of trust named by ``config.root`` ("file", "pkcs11", ...).

    Return a RootKey when ``config.root`` names this plugin's root, else None.
    Called once at start-up. Stops at first non-None result.
    """


@hookspec
def kb_backends(config: Config, root: RootKey) -> Sequence[Backend]:
    """Provide key-custody backends, each serving one protection name.

    Return the backends this plugin offers under this config (an empty list
    when it is not configured). Two backends claiming one protection name is
    a start-up error. Called once at start-up.
    """


# --- storage ---------------------------------------------------------------


@hookspec(firstresult=True)
def kb_store(config: Config) -> Store | None:
    """Provide the metadata store named by ``config.store`` ("sqlite", ...).

    Return a Store when ``config.store`` names this plugin's store, else None.
    Called once at start-up. Stops at first non-None result.
    """


@hookspec(firstresult=True)
def kb_cluster(config: Config, store: Store) -> Cluster | None:
    """Provide coordination for a store that several brokers share.

    Return a Cluster when ``store`` is this plugin's shared store, else None
    (a single broker needs none). Called once at start-up. Stops at first
    non-None result.
    """


# --- policy ----------------------------------------------------------------


@hookspec
def kb_policies(config: Config) -> Sequence[Policy]:
    """Provide policies: authorization and governance over keys.

    Each policy answers ``authorize`` (allow, deny or no opinion), names a
    principal's roles, checks key settings against governance rules and says
    how many approvals an action needs (see :class:`broker.policy.Policy`).
    A request is allowed only when at least one policy allows and none
    denies: deny by default. Called once at start-up.
    """


# --- audit and events ------------------------------------------------------


@hookspec
def kb_audit_sinks(config: Config) -> Sequence[AuditSink]:
    """Provide audit sinks; every audit record is written to each of them.

    Exactly one sink must be ``primary`` (it holds the hash chain that
    ``keybroker audit verify`` checks). Called once at start-up.
    """


@hookspec
def kb_key_event(event: KeyEvent) -> None:
    """Observe a key event (created, rotated, state changed, destroyed, ...).

    Called after the change is durable. Must not block; schedule any I/O.
    An exception is logged and ignored: the change stands, and the other
    observers are still called.
    """


# --- RPC -------------------------------------------------------------------


@hookspec
def kb_rpc_methods(config: Config) -> Mapping[str, RpcMethod]:
    """Add RPC methods: a mapping of method name to :class:`broker.policy.RpcMethod`.

    Names must not clash with built-in methods or each other.
    """
