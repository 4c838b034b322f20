"""Role-based access control: deny by default, grants from the TOML config.

Configuration (``[plugins.rbac]``; everything optional)::

    # The uid running the broker is admin on every key unless this is false.
    owner_admin = true

    # Extra roles, or built-in ones redefined: role -> operation globs.
    [plugins.rbac.roles]
    rotator = ["key.get", "key.rotate"]

    # Each grant gives principals roles on keys whose names match a glob.
    [[plugins.rbac.grants]]
    principals = ["uid:1000", "spiffe://example.org/billing"]
    roles = ["app"]
    keys = ["billing/*"]

    # Each deny rule refuses operations outright, whatever the grants say.
    [[plugins.rbac.deny]]
    principals = ["*"]
    operations = ["key.schedule_destroy"]
    keys = ["root/*"]

Principals are the names the broker gives callers: ``uid:N`` on the Unix
socket, the URI SAN (SPIFFE ID) or CN over mutual TLS, or the name they map
to under ``[principals]``. Operations are RPC method names. An operation on
no key (``key.list``) matches a grant's role whatever its key globs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from broker.config import Config, check_options
from broker.errors import InvalidArgument
from broker.hookspecs import hookimpl
from broker.policy import AuthzRequest, Decision, Policy

__all__ = ["BUILTIN_ROLES", "Grant", "RbacPolicy", "kb_policies"]

_USE = [
    "encrypt",
    "decrypt",
    "encrypt_batch",
    "decrypt_batch",
    "rewrap_batch",
    "datakey",
    "sign",
    "verify",
    "mac",
    "verify_mac",
]
_READ = ["key.get", "key.list", "key.public", "subscribe", "cert.ca"]

BUILTIN_ROLES: Mapping[str, tuple[str, ...]] = {
    # Every operation on every key it is granted.
    "admin": ("*",),
    # An application: use keys and read their metadata, no lifecycle changes.
    "app": (*_USE, *_READ),
    # Read-only: inventory, public keys, certificates and the compliance report.
    "auditor": (*_READ, "cert.list", "report"),
}


@dataclass(frozen=True, slots=True)
class Grant:
    principals: tuple[str, ...]
    operations: tuple[str, ...]
    keys: tuple[str, ...]
    roles: tuple[str, ...] = ()

    def matches(self, request: AuthzRequest) -> bool:
        if not any(fnmatchcase(request.principal, p) for p in self.principals):
            return False
        if not any(fnmatchcase(request.operation, o) for o in self.operations):
            return False
        return request.key is None or any(fnmatchcase(request.key, k) for k in self.keys)


def _strings(table: Mapping[str, Any], name: str, where: str) -> tuple[str, ...]:
    value = table.get(name, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidArgument(f"config: {where}.{name} must be a list of strings")
    return tuple(value)


_SECTION_OPTIONS = frozenset({"owner_admin", "roles", "grants", "deny"})
_GRANT_OPTIONS = frozenset({"principals", "roles", "operations", "keys"})
_DENY_OPTIONS = frozenset({"principals", "operations", "keys"})


def _tables(
    section: Mapping[str, Any], name: str, allowed: frozenset[str]
) -> list[tuple[str, Mapping[str, Any]]]:
    """The list of tables ``section[name]``, each with its ``where`` and only ``allowed`` options.

    A misspelled option is refused rather than ignored: in a grant, a
    missing ``keys`` means every key, so ``key = [...]`` would silently
    widen the grant.
    """
    value = section.get(name, [])
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise InvalidArgument(f"config: plugins.rbac.{name} must be a list of tables")
    out = []
    for index, table in enumerate(value):
        where = f"plugins.rbac.{name}[{index}]"
        check_options(table, allowed, f"[{where}]")
        out.append((where, table))
    return out


class RbacPolicy(Policy):
    """Grants and deny rules evaluated in memory on every request."""

    def __init__(self, grants: Sequence[Grant], denies: Sequence[Grant]) -> None:
        self.grants = tuple(grants)
        self.denies = tuple(denies)

    @classmethod
    def from_config(cls, section: Mapping[str, Any], *, owner: str) -> RbacPolicy:
        """Build the policy from ``[plugins.rbac]``.

        Raises:
            InvalidArgument: a malformed table or an unknown role.
        """
        check_options(section, _SECTION_OPTIONS, "[plugins.rbac]")
        owner_admin = section.get("owner_admin", True)
        if not isinstance(owner_admin, bool):
            raise InvalidArgument("config: plugins.rbac.owner_admin must be true or false")
        roles: dict[str, tuple[str, ...]] = dict(BUILTIN_ROLES)
        extra_roles = section.get("roles", {})
        if not isinstance(extra_roles, dict):
            raise InvalidArgument("config: [plugins.rbac.roles] must be a table")
        for name in extra_roles:
            roles[name] = _strings(extra_roles, name, "plugins.rbac.roles")
        grants: list[Grant] = []
        if owner_admin:
            grants.append(Grant((owner,), ("*",), ("*",), ("admin",)))
        for where, table in _tables(section, "grants", _GRANT_OPTIONS):
            role_names = _strings(table, "roles", where)
            unknown = [r for r in role_names if r not in roles]
            if unknown:
                raise InvalidArgument(f"config: {where} names unknown role(s) {', '.join(unknown)}")
            operations = tuple(op for r in role_names for op in roles[r]) + _strings(
                table, "operations", where
            )
            grants.append(
                Grant(
                    _strings(table, "principals", where),
                    operations,
                    _strings(table, "keys", where) or ("*",),
                    role_names,
                )
            )
        denies = [
            Grant(
                _strings(t, "principals", where),
                _strings(t, "operations", where) or ("*",),
                _strings(t, "keys", where) or ("*",),
            )
            for where, t in _tables(section, "deny", _DENY_OPTIONS)
        ]
        return cls(grants, denies)

    def authorize(self, request: AuthzRequest) -> Decision | None:
        if any(rule.matches(request) for rule in self.denies):
            return Decision.DENY
        if any(grant.matches(request) for grant in self.grants):
            return Decision.ALLOW
        return None

    def roles(self, principal: str) -> Sequence[str]:
        return sorted(
            {
                role
                for grant in self.grants
                if any(fnmatchcase(principal, p) for p in grant.principals)
                for role in grant.roles
            }
        )


def owner_principal(config: Config) -> str:
    """The name of the uid running the broker, after ``[principals]`` mapping."""
    identity = f"uid:{os.getuid()}"
    return config.principals.get(identity, identity)


@hookimpl
def kb_policies(config: Config) -> Sequence[Policy]:
    return [RbacPolicy.from_config(config.section("rbac"), owner=owner_principal(config))]
