"""The rbac policy: grants, roles, deny rules, config errors."""

from __future__ import annotations

import pytest
from keybroker_rbac import RbacPolicy

from broker.errors import InvalidArgument
from broker.policy import AuthzRequest, Decision


def policy(**section: object) -> RbacPolicy:
    return RbacPolicy.from_config(section, owner="uid:1")


def ask(p: RbacPolicy, principal: str, op: str, key: str | None = "k") -> Decision | None:
    return p.authorize(AuthzRequest(principal, op, key))


def test_owner_is_admin_and_everyone_else_has_nothing() -> None:
    p = policy()
    assert ask(p, "uid:1", "key.schedule_destroy") is Decision.ALLOW
    assert ask(p, "uid:2", "key.get") is None
    assert ask(p, "uid:2", "ping", None) is None
    assert p.roles("uid:1") == ["admin"] and p.roles("uid:2") == []
    assert ask(policy(owner_admin=False), "uid:1", "key.get") is None


def test_grants_by_role_and_key_glob() -> None:
    p = policy(grants=[{"principals": ["app*"], "roles": ["app"], "keys": ["a/*", "shared"]}])
    assert ask(p, "app7", "encrypt", "a/x") is Decision.ALLOW
    assert ask(p, "app7", "encrypt", "shared") is Decision.ALLOW
    assert ask(p, "app7", "encrypt", "b/x") is None
    assert ask(p, "app7", "key.rotate", "a/x") is None
    assert ask(p, "app7", "key.list", None) is Decision.ALLOW
    assert ask(p, "bob", "encrypt", "a/x") is None


def test_custom_roles_and_extra_operations() -> None:
    p = policy(
        roles={"rotator": ["key.get", "key.rotate"]},
        grants=[{"principals": ["ops"], "roles": ["rotator"], "operations": ["key.update"], "keys": ["*"]}],
    )
    assert ask(p, "ops", "key.rotate") is Decision.ALLOW
    assert ask(p, "ops", "key.update") is Decision.ALLOW
    assert ask(p, "ops", "encrypt") is None


def test_deny_wins() -> None:
    p = policy(deny=[{"principals": ["*"], "operations": ["key.schedule_destroy"], "keys": ["prod/*"]}])
    assert ask(p, "uid:1", "key.schedule_destroy", "prod/db") is Decision.DENY
    assert ask(p, "uid:1", "key.schedule_destroy", "dev/db") is Decision.ALLOW


@pytest.mark.parametrize(
    "section",
    [
        {"grants": [{"principals": ["x"], "roles": ["wizard"]}]},
        {"grants": [{"principals": "x", "roles": ["app"]}]},
        {"roles": ["app"]},
        {"roles": {"r": "encrypt"}},
        {"grants": {"principals": ["x"], "roles": ["app"]}},
        {"grants": ["app"]},
        {"deny": [["x"]]},
        {"owner_admin": "no"},
    ],
)
def test_config_errors(section: dict[str, object]) -> None:
    with pytest.raises(InvalidArgument):
        policy(**section)


@pytest.mark.parametrize(
    ("section", "where", "name"),
    [
        # Without its "keys" the grant would cover every key.
        ({"grants": [{"principals": ["app"], "roles": ["app"], "key": ["myapp/*"]}]}, "grants[0]", "key"),
        ({"grants": [{"principals": ["app"], "role": ["app"]}]}, "grants[0]", "role"),
        ({"deny": [{"principals": ["app"], "key": ["prod/*"]}]}, "deny[0]", "key"),
        ({"owner_admn": False}, "[plugins.rbac]", "owner_admn"),
        ({"grant": [{"principals": ["app"], "roles": ["app"]}]}, "[plugins.rbac]", "grant"),
    ],
)
def test_misspelled_options_are_refused_not_ignored(
    section: dict[str, object], where: str, name: str
) -> None:
    with pytest.raises(InvalidArgument, match="unknown option") as info:
        policy(**section)
    assert where in info.value.message and name in info.value.message


def test_auditor_reads_inventory_certificates_and_report_only() -> None:
    p = policy(grants=[{"principals": ["aud"], "roles": ["auditor"], "keys": ["*"]}])
    for op, key in (("report", None), ("cert.list", None), ("cert.ca", "ca"), ("key.get", "k")):
        assert ask(p, "aud", op, key) is Decision.ALLOW, op
    for op in ("encrypt", "key.rotate", "cert.issue", "key.export", "backup.create", "approve"):
        assert ask(p, "aud", op) is None, op
