"""broker.report and broker.report_html: pure report building and escaping."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from html.parser import HTMLParser
from typing import Any

from broker.keys import Classification, Key, KeyState, KeyType, VersionState
from broker.lifecycle import add_version, new_key
from broker.report import AuditStats, build_report, key_violations, rule_id
from broker.report_html import render_html

DAY = 86_400
T0 = 1_900_000_000


def _key(name: str, **settings: Any) -> Key:
    return new_key(
        key_id=name.encode().ljust(16, b"_")[:16],
        name=name,
        key_type=settings.pop("key_type", KeyType.AES256_GCM),
        protection=settings.pop("protection", "software"),
        classification=settings.pop("classification", Classification.INTERNAL),
        material=b"m",
        now=T0,
        **settings,
    )


def no_rules(key: Key) -> Sequence[str]:
    return ()


def test_rule_ids_come_from_the_sentence() -> None:
    assert rule_id("critical.protection: critical keys must be ...") == "critical.protection"
    assert rule_id("keys must have an owner label") == "policy"
    assert rule_id("a b: not a rule id") == "policy"


def test_overdue_only_once_the_due_time_has_passed() -> None:
    key = _key("r", rotation_period_s=10 * DAY)
    assert key_violations(key, T0 + 10 * DAY, no_rules) == []
    (found,) = key_violations(key, T0 + 10 * DAY + 1, no_rules)
    assert (found.rule, found.version, found.source) == ("rotation.overdue", 1, "lifecycle")
    rotated = add_version(key, b"m2", T0 + 9 * DAY)
    assert key_violations(rotated, T0 + 12 * DAY, no_rules) == []
    # Not active: no rotation is due, so none is overdue.
    assert key_violations(replace(key, state=KeyState.DEACTIVATED), T0 + 99 * DAY, no_rules) == []


def test_usage_past_the_limit_per_version_and_not_for_destroyed_versions() -> None:
    key = _key("u", max_uses_per_version=100)
    key = add_version(key, b"m2", T0)
    key = replace(
        key,
        versions=(
            replace(key.versions[0], uses=101, state=VersionState.DESTROYED),
            replace(key.versions[1], uses=101),
        ),
    )
    assert [(v.rule, v.version) for v in key_violations(key, T0, no_rules)] == [("usage.limit", 2)]
    exact = replace(key, versions=(key.versions[0], replace(key.versions[1], uses=100)))
    assert key_violations(exact, T0, no_rules) == []  # at the limit is where rotation happens


def test_governance_sentences_become_violations_except_for_destroyed_keys() -> None:
    key = _key("c", classification=Classification.CRITICAL)

    def strict(k: Key) -> Sequence[str]:
        return ["critical.protection: must be hsm", "free text"] if k.classification == "critical" else []

    assert [(v.rule, v.source) for v in key_violations(key, T0, strict)] == [
        ("critical.protection", "governance"),
        ("policy", "governance"),
    ]
    assert key_violations(replace(key, state=KeyState.DESTROYED), T0, strict) == []


def test_audit_stats_filter_by_period_and_bucket_denials() -> None:
    stats = AuditStats(since=T0, until=T0 + 3 * DAY)

    def record(seq: int, t: float, outcome: str, principal: str = "p", key: str | None = "k") -> Any:
        ts = datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return {"seq": seq, "ts": ts, "principal": principal, "op": "key.get", "key": key,
                "outcome": outcome, "alarm": False}

    stats.add(record(1, T0 - 1, "denied"))  # before the period
    stats.add(record(2, T0, "denied"))
    stats.add(record(3, T0 + DAY + 5, "allowed", key=None))
    stats.add(record(4, T0 + 2 * DAY, "denied", principal="q"))
    stats.add(record(5, T0 + 3 * DAY + 0.5, "denied"))  # in the last second
    stats.add(record(6, T0 + 3 * DAY + 1, "denied"))  # after
    stats.add({"seq": 7, "ts": "yesterday"})
    out = stats.to_dict()
    assert out["records"] == 4 and (out["first_seq"], out["last_seq"]) == (2, 5)
    assert out["unreadable_records"] == 1
    assert out["denials"]["total"] == 3 and out["denials"]["by_principal"] == {"p": 2, "q": 1}
    assert out["by_key"] == {"k": {"total": 3, "denied": 3, "ops": {"key.get": 3}}}
    counts = [b["count"] for b in out["denials"]["over_time"]["buckets"]]
    start = T0 - T0 % DAY
    assert out["denials"]["over_time"]["buckets"][0]["start"] == start
    assert sum(counts) == 3 and len(counts) == 4


def test_a_batch_with_refused_items_counts_as_a_denial() -> None:
    stats = AuditStats(since=T0, until=T0 + DAY)
    ts = datetime.fromtimestamp(T0 + 5, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    base = {"ts": ts, "principal": "mallory", "op": "decrypt_batch", "key": None, "outcome": "allowed",
            "alarm": False}
    stats.add({**base, "seq": 1, "details": {"items": 3, "denied": 2}})
    stats.add({**base, "seq": 2, "details": {"items": 3, "denied": 0}})
    stats.add({**base, "seq": 3, "details": {"denied": True}})  # not a count
    denials = stats.to_dict()["denials"]
    assert denials["total"] == 1 and denials["by_principal"] == {"mallory": 1}
    assert denials["by_op"] == {"decrypt_batch": 1}


def test_long_periods_get_wider_buckets() -> None:
    stats = AuditStats(since=T0, until=T0 + 365 * DAY)
    over_time = stats.to_dict()["denials"]["over_time"]
    assert over_time["bucket_s"] == 4 * DAY and len(over_time["buckets"]) <= 92


def _report(keys: Sequence[Key], audit: AuditStats | None = None) -> dict[str, Any]:
    return build_report(keys, audit, now=T0 + DAY, governance=no_rules, node="n<1>")


def test_report_is_plain_json_and_counts_every_state() -> None:
    keys = [_key("b"), replace(_key("a"), state=KeyState.DISABLED)]
    report = _report(keys)
    assert json.loads(json.dumps(report)) == report
    assert [k["name"] for k in report["keys"]] == ["a", "b"]
    assert report["summary"]["by_state"]["disabled"] == 1 and report["summary"]["by_state"]["destroyed"] == 0
    assert report["summary"]["compliant"] and report["audit"] == {"available": False, "source": None}
    assert report["keys"][1]["primary_age_s"] == DAY


class _Texts(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.text: list[str] = []
        self.attrs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attrs += [v or "" for _, v in attrs]

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_every_string_is_escaped() -> None:
    hostile = "<script>alert(1)</script>\"'&"
    key = _key("k", labels={hostile: hostile}, rotation_period_s=DAY // 2)
    report = build_report(
        [key], AuditStats(since=T0, until=T0 + DAY), now=T0 + DAY,
        governance=lambda k: [f"x.y: {hostile}"], node=hostile,
    )
    stats = AuditStats(since=T0, until=T0 + DAY)
    stats.add({"seq": 1, "ts": "2030-03-17T17:46:40.000000Z", "principal": hostile, "op": hostile,
               "key": hostile, "outcome": "denied"})
    report["audit"] = {"available": True, "source": hostile, **stats.to_dict()}
    page = render_html(report)
    assert "<script" not in page
    parsed = _Texts()
    parsed.feed(page)
    assert "script" not in parsed.tags
    # The hostile text survives as text, intact, wherever it is shown.
    assert any(hostile in t for t in parsed.text)
    assert "".join(parsed.text).count("alert(1)") >= 5


def test_page_has_the_three_plots_with_their_marks() -> None:
    keys = [
        add_version(_key("a", rotation_period_s=30 * DAY), b"m", T0 + 1),
        _key("h", key_type=KeyType.HMAC_SHA256),
    ]
    stats = AuditStats(since=T0, until=T0 + 6 * DAY)
    page = render_html(_report(keys, stats))
    for chart in ("rotation-timeline", "uses-chart", "denials-chart"):
        assert f'<svg id="{chart}"' in page
    timeline = page.split('<svg id="rotation-timeline"')[1].split("</svg>")[0]
    assert timeline.count('<circle class="mark version"') == 3
    assert timeline.count('class="mark next-rotation"') == 1
    uses = page.split('<svg id="uses-chart"')[1].split("</svg>")[0]
    assert uses.count('class="mark bar') == 2  # the hmac key has no limit
    denials = page.split('<svg id="denials-chart"')[1].split("</svg>")[0]
    assert denials.count('class="mark bar"') == 7
    assert "http" not in page.replace("http://www.w3.org/2000/svg", "").replace("http-equiv", "")


def test_versions_of_a_key() -> None:
    key = _key("v")
    for day in (1, 2):
        key = add_version(key, b"m", T0 + day * DAY)
    entry = _report([key])["keys"][0]
    assert [v["version"] for v in entry["versions"]] == [1, 2, 3]
    assert entry["primary_age_s"] == 0 and entry["use_limit"] == 2**31
    assert entry["versions"][0] == {
        "version": 1, "state": "active", "created_at": T0, "uses": 0, "limit": 2**31, "use_fraction": 0.0,
        "over_limit": False,
    }

