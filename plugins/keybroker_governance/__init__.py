"""Governance by classification: rules a key's settings must meet.

Configuration, one table per classification (everything optional)::

    [plugins.governance.critical]
    protection = ["hsm"]              # allowed protections
    exportable = false                # may keys be exportable?
    max_rotation_period_days = 90     # must rotate at least this often
    destroy_approvals = 2             # distinct approvals to destroy

    [plugins.governance.confidential]
    max_rotation_period_days = 365

With no ``[plugins.governance]`` table the built-in defaults below apply to
``critical`` keys only. Each violation names its rule, e.g.
``critical.protection``. An action is checked against the rules it could
break (``_CHECKED``): creating a key (and importing one) against all of
them; ``key.update``, which can change only the rotation period, against
``max_rotation_period_days``; exporting against ``exportable``, so a rule
made stricter holds for keys created before it. Rotating changes no
governed setting: a key that breaks a rule made stricter since it was
created still rotates (and ``keybroker report`` lists the violation), as
refusing would only leave it on its old material.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from broker.config import Config, check_options
from broker.errors import InvalidArgument
from broker.hookspecs import hookimpl
from broker.keys import Classification, Key
from broker.policy import Policy

__all__ = ["DEFAULT_RULES", "ClassRules", "GovernancePolicy", "kb_policies"]

DAY = 86_400
# The rules each action is checked against, by option name (see the module
# docstring); an action not named here is checked against none.
_ALL_RULES = frozenset({"protection", "exportable", "max_rotation_period_days"})
_CHECKED: Mapping[str, frozenset[str]] = {
    "create": _ALL_RULES,
    "update": frozenset({"max_rotation_period_days"}),
    "export": frozenset({"exportable"}),
}


@dataclass(frozen=True, slots=True)
class ClassRules:
    protection: tuple[str, ...] | None = None
    exportable: bool | None = None
    max_rotation_period_days: int | None = None
    destroy_approvals: int = 0

    @classmethod
    def from_table(cls, name: str, table: Mapping[str, Any]) -> ClassRules:
        where = f"plugins.governance.{name}"
        check_options(table, cls.__dataclass_fields__, f"[{where}]")
        protection = table.get("protection")
        if protection is not None and (
            not isinstance(protection, list) or not all(isinstance(p, str) for p in protection)
        ):
            raise InvalidArgument(f"config: {where}.protection must be a list of strings")
        exportable = table.get("exportable")
        if exportable is not None and not isinstance(exportable, bool):
            raise InvalidArgument(f"config: {where}.exportable must be true or false")
        period = table.get("max_rotation_period_days")
        approvals = table.get("destroy_approvals", 0)
        for option, value in (("max_rotation_period_days", period), ("destroy_approvals", approvals)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise InvalidArgument(f"config: {where}.{option} must be a whole number >= 0")
        return cls(
            protection=tuple(protection) if protection is not None else None,
            exportable=exportable,
            max_rotation_period_days=period,
            destroy_approvals=approvals,
        )


# Critical keys: in an HSM, never exported, rotated at least quarterly, and
# destroyed only with two approvals.
DEFAULT_RULES: Mapping[Classification, ClassRules] = {
    Classification.CRITICAL: ClassRules(
        protection=("hsm",), exportable=False, max_rotation_period_days=90, destroy_approvals=2
    ),
}


class GovernancePolicy(Policy):
    """Checks key settings against the rules of their classification."""

    def __init__(self, rules: Mapping[Classification, ClassRules]) -> None:
        self.rules = dict(rules)

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> GovernancePolicy:
        if not section:
            return cls(DEFAULT_RULES)
        rules: dict[Classification, ClassRules] = {}
        for name, table in section.items():
            try:
                classification = Classification(name)
            except ValueError:
                raise InvalidArgument(
                    f"config: [plugins.governance.{name}] is not a classification"
                ) from None
            if not isinstance(table, dict):
                raise InvalidArgument(f"config: [plugins.governance.{name}] must be a table")
            rules[classification] = ClassRules.from_table(name, table)
        return cls(rules)

    def validate(self, key: Key, action: str) -> Sequence[str]:
        rules = self.rules.get(key.classification)
        checked = _CHECKED.get(action, frozenset())
        if rules is None or not checked:
            return ()
        label = key.classification.value
        broken: list[str] = []
        protection = rules.protection if "protection" in checked else None
        if protection is not None and key.protection not in protection:
            broken.append(
                f"{label}.protection: {label} keys must be protected by {' or '.join(protection)}, "
                f"not {key.protection}"
            )
        if "exportable" in checked and rules.exportable is False and key.exportable:
            broken.append(f"{label}.exportable: {label} keys must not be exportable")
        limit = rules.max_rotation_period_days if "max_rotation_period_days" in checked else None
        if limit is not None and (key.rotation_period_s <= 0 or key.rotation_period_s > limit * DAY):
            broken.append(
                f"{label}.max_rotation_period_days: {label} keys must rotate at least every {limit} days "
                f"(rotation_period_s between 1 and {limit * DAY})"
            )
        return broken

    def required_approvals(self, key: Key, action: str) -> int | None:
        rules = self.rules.get(key.classification)
        if rules is None or action != "destroy":
            return None
        return rules.destroy_approvals


@hookimpl
def kb_policies(config: Config) -> Sequence[Policy]:
    return [GovernancePolicy.from_config(config.section("governance"))]
