"""Authorization requests and their evaluation over policy hooks. Pure logic.

Deny by default: a request is allowed only when at least one ``kb_authorize``
implementation allows it and none denies it.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .connection import RequestContext
    from .keys import Key

__all__ = ["AuthzRequest", "Decision", "Policy", "RpcMethod", "combine", "rule_id"]

# What a governance rule sentence starts with: "critical.protection: ...".
_RULE_PREFIX = re.compile(r"([A-Za-z0-9_.-]{1,64}):\s")


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


def combine(decisions: Iterable[object]) -> bool:
    """Allowed iff some plugin allows and none denies.

    Fails closed: anything but ALLOW, DENY (or their strings, "allow" and
    "deny") and None, from a policy that returns, say, False, is a denial.
    """
    allowed = False
    for decision in decisions:
        if decision is None:
            continue
        if decision == Decision.ALLOW:
            allowed = True
            continue
        return False  # DENY, or an answer that is no Decision
    return allowed


def rule_id(sentence: str) -> str:
    """The rule a governance sentence (:meth:`Policy.validate`) names (``"critical.protection: ..."``).

    Policies from other plugins may word their sentences freely; one without
    a ``rule: `` prefix is filed under ``policy``.
    """
    match = _RULE_PREFIX.match(sentence)
    return match.group(1) if match else "policy"


class Policy:
    """A policy provider. Subclass it and override what your policy decides.

    Every method's default is "no opinion", so a policy that only checks
    governance rules need not say anything about authorization.
    """

    def authorize(self, request: AuthzRequest) -> Decision | None:
        """ALLOW, DENY or None (no opinion); any other answer counts as DENY.

        Must not block, and must be a pure function of the request and the
        configuration: the broker remembers each answer for the request's
        fields (principal, operation, key, classification) for the life of
        the process, so a policy is not asked again for a request it has
        answered. (Time-based or rate-limiting rules do not fit here.)
        """
        return None

    def roles(self, principal: str) -> Sequence[str]:
        """The roles ``principal`` holds (reported by ``whoami``)."""
        return ()

    def validate(self, key: Key, action: str) -> Sequence[str]:
        """Governance rules ``key`` breaks for ``action``, each a sentence naming
        the rule; empty when compliant.

        Actions: "create" (also a key import, and ``keybroker report``'s
        check of every stored key: every rule the key's settings could
        break), "update", "rotate", "destroy" and "export" (before material
        leaves the broker). A policy may check each action against the
        rules that action can break, and should answer unknown actions
        with no violations.
        """
        return ()

    def required_approvals(self, key: Key, action: str) -> int | None:
        """How many distinct approvals ``action`` on ``key`` needs; None for no opinion."""
        return None


@dataclass(frozen=True, slots=True)
class RpcMethod:
    """An RPC method added by a plugin (``kb_rpc_methods``).

    ``handler(ctx, params)`` returns the result map. ``key_param`` names the
    parameter holding the key name the call acts on (authorization is checked
    on it), or None for a call on no key.
    """

    handler: Callable[[RequestContext, Mapping[str, Any]], Awaitable[Any]]
    key_param: str | None = None
