"""The key inventory and its compliance state, as one JSON-ready dict. Pure logic.

:func:`build_report` takes keys, audit records and a governance callback and
returns the report; it does no I/O and reads no clock, so the same inputs
always give the same report. The edges live elsewhere:
:mod:`broker.report_cli` loads keys from a store and records from the audit
log (``keybroker report``), :mod:`broker.methods_report` does the same inside
a running broker (the ``report`` RPC), and :mod:`broker.report_html` renders
the dict as one self-contained HTML page.

Violations, each naming the rule it breaks (docs/report.md has the table):

- ``rotation.overdue``: an active key's ``next_rotation_at`` is in the past
  (the scheduler has not rotated it: it was stopped, or it failed);
- ``usage.limit``: a version that is not destroyed has more uses than the
  key's per-version limit (the limit was lowered below the count);
- every rule the configured governance policies report for the key through
  ``validate(key, "create")`` (``critical.protection`` for a critical key
  outside an HSM, ``critical.exportable`` for an exportable critical key,
  ``critical.max_rotation_period_days`` ...). The report asks the broker's
  own policy plugins, so it and the broker never disagree on a rule.

Destroyed keys hold no material and break no rule; they stay in the
inventory.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from .keys import Classification, Key, KeyState, VersionState
from .lifecycle import next_rotation_at, use_limit
from .policy import rule_id

__all__ = [
    "REPORT_FORMAT",
    "RULE_ROTATION_OVERDUE",
    "RULE_USAGE_LIMIT",
    "AuditStats",
    "Governance",
    "Violation",
    "build_report",
    "key_violations",
    "parse_ts",
    "rule_id",
]

#: Bumped when a field changes meaning or disappears (adding one does not).
REPORT_FORMAT: Final = 1

RULE_ROTATION_OVERDUE: Final = "rotation.overdue"
RULE_USAGE_LIMIT: Final = "usage.limit"

DAY: Final = 86_400
# The denials-over-time series has at most about this many buckets: a day
# each for a month or a quarter, wider buckets for longer periods, so the
# chart stays readable and the JSON small whatever --days says.
MAX_TIME_BUCKETS: Final = 92

#: Rules a key breaks according to the configured policies (empty: none).
Governance = Callable[[Key], Sequence[str]]


@dataclass(frozen=True, slots=True)
class Violation:
    """One rule one key (or one of its versions) breaks."""

    key: str
    rule: str
    #: "lifecycle" for the report's own checks, "governance" for policy rules.
    source: str
    message: str
    version: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "rule": self.rule,
            "source": self.source,
            "version": self.version,
            "message": self.message,
        }


def _duration(seconds: int) -> str:
    days, rest = divmod(max(0, seconds), DAY)
    hours = rest // 3600
    return f"{days}d {hours}h" if days else f"{hours}h {rest % 3600 // 60}m"


def _iso(t: int | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _day(t: int) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d")


def parse_ts(ts: object) -> float | None:
    """Unix time of an audit record's ``ts`` (RFC 3339 UTC), None if it is not one."""
    if not isinstance(ts, str):
        return None
    try:
        return datetime.fromisoformat(ts).timestamp()
    except ValueError:
        return None


def key_violations(key: Key, now: int, governance: Governance) -> list[Violation]:
    """Every rule ``key`` breaks at ``now``.

    Args:
        key: the key, with the use counts to judge by.
        now: Unix time the report is made for.
        governance: the configured policies' rules for a key.
    """
    if key.state is KeyState.DESTROYED:
        return []
    found: list[Violation] = []
    due = next_rotation_at(key)
    if due is not None and due < now:
        found.append(
            Violation(
                key.name,
                RULE_ROTATION_OVERDUE,
                "lifecycle",
                f"rotation overdue by {_duration(now - due)}: version {key.primary_version} was due to be "
                f"replaced at {_iso(due)}",
                key.primary_version,
            )
        )
    limit = use_limit(key)
    if limit is not None:
        for version in key.versions:
            if version.state is not VersionState.DESTROYED and version.uses > limit:
                found.append(
                    Violation(
                        key.name,
                        RULE_USAGE_LIMIT,
                        "lifecycle",
                        f"version {version.number} has {version.uses} uses, past the limit of {limit}",
                        version.number,
                    )
                )
    for sentence in governance(key):
        found.append(Violation(key.name, rule_id(sentence), "governance", sentence))
    return found


def _version_entry(number: int, state: str, created_at: int, uses: int, limit: int | None) -> dict[str, Any]:
    return {
        "version": number,
        "state": state,
        "created_at": created_at,
        "uses": uses,
        "limit": limit,
        # Rounded: the page shows percentages, and JSON diffs stay stable.
        "use_fraction": None if limit is None else round(uses / limit, 6),
        "over_limit": limit is not None and uses > limit,
    }


def _key_entry(key: Key, now: int, violations: Sequence[Violation]) -> dict[str, Any]:
    limit = use_limit(key)
    due = next_rotation_at(key)
    return {
        "name": key.name,
        "id": key.id.hex(),
        "type": key.type.value,
        "protection": key.protection,
        "classification": key.classification.value,
        "state": key.state.value,
        "created_at": key.created_at,
        "updated_at": key.updated_at,
        "primary_version": key.primary_version,
        "min_decrypt_version": key.min_decrypt_version,
        "primary_created_at": key.primary.created_at,
        "primary_age_s": max(0, now - key.primary.created_at),
        "rotation_period_s": key.rotation_period_s,
        "next_rotation_at": due,
        "rotation_overdue_s": max(0, now - due) if due is not None else 0,
        "use_limit": limit,
        "exportable": key.exportable,
        "labels": dict(key.labels),
        "destroy_at": key.destroy_at,
        "versions": [
            _version_entry(v.number, v.state.value, v.created_at, v.uses, limit) for v in key.versions
        ],
        "violations": sorted({v.rule for v in violations}),
        "compliant": not violations,
    }


def _counts(values: Iterable[str], known: Iterable[str] = ()) -> dict[str, int]:
    """Counts by value, listing every ``known`` value (with 0) first, in order."""
    counted = Counter(values)
    result = {name: counted.pop(name, 0) for name in known}
    result.update(sorted(counted.items()))
    return result


@dataclass(slots=True)
class AuditStats:
    """Audit statistics accumulated over one period; feed records to :meth:`add`.

    Args:
        since: first second of the period (inclusive).
        until: end of the period (inclusive).
    """

    since: int
    until: int
    records: int = 0
    unreadable: int = 0
    first_seq: int | None = None
    last_seq: int | None = None

    _outcomes: Counter[str] = field(default_factory=Counter, init=False)
    _ops: Counter[str] = field(default_factory=Counter, init=False)
    _principals: dict[str, Counter[str]] = field(default_factory=dict, init=False)
    _keys: dict[str, Counter[str]] = field(default_factory=dict, init=False)
    _denied_principal: Counter[str] = field(default_factory=Counter, init=False)
    _denied_key: Counter[str] = field(default_factory=Counter, init=False)
    _denied_op: Counter[str] = field(default_factory=Counter, init=False)
    _denied_at: list[float] = field(default_factory=list, init=False)
    _alarms: int = field(default=0, init=False)

    def add(self, record: Mapping[str, Any]) -> None:
        """Count one parsed audit record if its ``ts`` falls in the period."""
        t = parse_ts(record.get("ts"))
        op, principal, outcome = record.get("op"), record.get("principal"), record.get("outcome")
        if t is None or not all(isinstance(v, str) for v in (op, principal, outcome)):
            self.unreadable += 1
            return
        assert isinstance(op, str) and isinstance(principal, str) and isinstance(outcome, str)
        # `until` is a whole second and inclusive; ts carries microseconds.
        if not self.since <= t < self.until + 1:
            return
        self.records += 1
        seq = record.get("seq")
        if isinstance(seq, int):
            self.first_seq = seq if self.first_seq is None else min(self.first_seq, seq)
            self.last_seq = seq if self.last_seq is None else max(self.last_seq, seq)
        self._outcomes[outcome] += 1
        self._ops[op] += 1
        self._principals.setdefault(principal, Counter())[op] += 1
        key = record.get("key")
        if isinstance(key, str):
            self._keys.setdefault(key, Counter())[op] += 1
        if record.get("alarm") is True:
            self._alarms += 1
        details = record.get("details")
        refused = details.get("denied") if isinstance(details, dict) else None
        # A batch call with refused items succeeds, its record counting them.
        partly = type(refused) is int and refused > 0
        if outcome == "denied" or partly:
            self._denied_principal[principal] += 1
            self._denied_op[op] += 1
            if isinstance(key, str):
                self._denied_key[key] += 1
            self._denied_at.append(t)

    def _by(self, table: Mapping[str, Counter[str]], denied: Counter[str]) -> dict[str, Any]:
        return {
            name: {
                "total": sum(ops.values()),
                "denied": denied.get(name, 0),
                "ops": dict(sorted(ops.items())),
            }
            for name, ops in sorted(table.items())
        }

    def timeline(self) -> dict[str, Any]:
        """Denials per time bucket over the whole period, empty buckets included."""
        start = self.since - self.since % DAY  # buckets on UTC day boundaries
        span_days = max(1, math.ceil((self.until + 1 - start) / DAY))
        bucket_days = max(1, math.ceil(span_days / MAX_TIME_BUCKETS))
        width = bucket_days * DAY
        buckets = [0] * math.ceil(span_days / bucket_days)
        for t in self._denied_at:
            index = min(len(buckets) - 1, int((t - start) // width))
            buckets[index] += 1
        return {
            "bucket_s": width,
            "buckets": [
                {"start": start + i * width, "day": _day(start + i * width), "count": count}
                for i, count in enumerate(buckets)
            ],
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "since": self.since,
            "until": self.until,
            "records": self.records,
            "unreadable_records": self.unreadable,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "alarms": self._alarms,
            "by_outcome": dict(sorted(self._outcomes.items())),
            "by_op": dict(sorted(self._ops.items())),
            "by_principal": self._by(self._principals, self._denied_principal),
            "by_key": self._by(self._keys, self._denied_key),
            "denials": {
                "total": sum(self._denied_principal.values()),
                "by_principal": dict(sorted(self._denied_principal.items())),
                "by_key": dict(sorted(self._denied_key.items())),
                "by_op": dict(sorted(self._denied_op.items())),
                "over_time": self.timeline(),
            },
        }


def build_report(
    keys: Iterable[Key],
    audit: AuditStats | None,
    *,
    now: int,
    governance: Governance,
    node: str = "",
    audit_source: str | None = None,
) -> dict[str, Any]:
    """The whole report: inventory, violations, audit statistics.

    Args:
        keys: every key to report on (any order; the report sorts by name),
            with the use counts to judge by.
        audit: statistics over the chosen period, or None when no audit log
            could be read (the report says so rather than pretending zero).
        now: Unix time the report is made for.
        governance: the configured policies' rules for a key; use
            :meth:`broker.plugins.Plugins.validate`'s rules so the report
            agrees with the broker.
        node: the broker's node name, for the header.
        audit_source: where the records came from, for the header.

    Returns:
        A dict of str, int, float, bool, None, lists and dicts only (JSON and
        msgpack ready); docs/report.md describes every field.
    """
    ordered = sorted(keys, key=lambda k: k.name)
    violations: list[Violation] = []
    entries: list[dict[str, Any]] = []
    for key in ordered:
        found = key_violations(key, now, governance)
        violations.extend(found)
        entries.append(_key_entry(key, now, found))
    combos = Counter((k.state.value, k.classification.value, k.protection) for k in ordered)
    summary = {
        "keys": len(ordered),
        "by_state": _counts((k.state.value for k in ordered), (s.value for s in KeyState)),
        "by_classification": _counts(
            (k.classification.value for k in ordered), (c.value for c in Classification)
        ),
        "by_protection": _counts(k.protection for k in ordered),
        "by_state_classification_protection": [
            {"state": s, "classification": c, "protection": p, "keys": n}
            for (s, c, p), n in sorted(combos.items())
        ],
        "violations": len(violations),
        "keys_in_violation": len({v.key for v in violations}),
        "by_rule": _counts(v.rule for v in violations),
        "compliant": not violations,
    }
    audit_part: dict[str, Any] = {"available": audit is not None, "source": audit_source}
    if audit is not None:
        audit_part.update(audit.to_dict())
    return {
        "format": REPORT_FORMAT,
        "generated_at": now,
        "generated_at_iso": _iso(now),
        "node": node,
        "summary": summary,
        "violations": [v.to_dict() for v in violations],
        "keys": entries,
        "audit": audit_part,
    }
