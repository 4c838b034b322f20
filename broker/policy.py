"""Authorization requests and their evaluation over policy hooks. Pure logic.

Deny by default: a request is allowed only when at least one ``kb_authorize``
implementation allows it and none denies it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .connection import RequestContext

__all__ = ["AuthzRequest", "Decision", "RpcMethod", "combine"]


class Decision(StrEnum):
    ALLOW = "allow"
    DENY = "deny"


@dataclass(frozen=True, slots=True)
class AuthzRequest:
    """Who wants to do what to which key.

    ``operation`` is the RPC method name ("encrypt", "key.rotate", ...).
    ``key`` is the key name, or None for operations on no key ("ping").
    ``classification`` is the key's classification when the key exists.
    """

    principal: str
    operation: str
    key: str | None = None
    classification: str | None = None


def combine(decisions: Iterable[Decision | None]) -> bool:
    """Allowed iff some plugin allows and none denies."""
    allowed = False
    for decision in decisions:
        if decision is Decision.DENY:
            return False
        if decision is Decision.ALLOW:
            allowed = True
    return allowed


@dataclass(frozen=True, slots=True)
class RpcMethod:
    """An RPC method added by a plugin (``kb_rpc_methods``).

    ``handler(ctx, params)`` returns the result map. ``key_param`` names the
    parameter holding the key name the call acts on (authorization is checked
    on it), or None for a call on no key.
    """

    handler: Callable[[RequestContext, Mapping[str, Any]], Awaitable[Any]]
    key_param: str | None = None
