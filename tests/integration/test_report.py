"""keybroker report: a data dir with keys in every state and every violation,
reported as JSON (exactly those violations), gated by --check, served by the
``report`` RPC, and rendered as HTML that a real headless browser draws.

The critical keys are software-protected. The broker that creates them runs
a permissive governance config (critical keys may be software and
exportable); the report then runs with the default rules (critical keys in an
HSM, never exportable), as a stricter production config would, and must flag
them. Time comes from a fake clock that starts 120 days before the wall
clock, so the command line (which reads the real clock) sees the same state.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import trio

from broker.app import open_broker
from broker.config import Config, parse_config
from broker.errors import BrokerError
from broker.lifecycle import Transition
from broker.report_cli import gather_report
from tests.conftest import Caller, require

DAY = 86_400
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
HOSTILE_LABEL = "<script>alert('x')</script>"
CHROMIUM = shutil.which("chromium")

# Creation-time governance: critical keys may be software and exportable.
PERMISSIVE = {
    "plugins": {
        "governance": {"critical": {"protection": ["software", "hsm"], "max_rotation_period_days": 90}},
        "rbac": {"grants": [{"principals": ["viewer"], "roles": ["auditor"], "keys": ["*"]}]},
    },
    "scheduler": {"enabled": False},
}

EXPECTED = {
    ("overdue", "rotation.overdue", 1),
    ("usage", "usage.limit", 1),
    ("crit-soft", "critical.protection", None),
    ("crit-export", "critical.protection", None),
    ("crit-export", "critical.exportable", None),
}
STATES = ["pre_active", "active", "deactivated", "disabled", "compromised", "destroy_pending", "destroyed"]


@dataclass
class FakeClock:
    now: float

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class Scenario:
    bad: Path  # data dir with every violation
    good: Path  # data dir with compliant keys only
    now: int  # the fake clock at the end of building
    start: int  # the fake clock at the start


def _config(data_dir: Path, table: dict[str, Any] | None = None) -> Config:
    return parse_config(table or {}, data_dir=data_dir)


async def _build_bad(data_dir: Path, clock: FakeClock) -> None:
    owner = f"uid:{os.getuid()}"
    async with open_broker(_config(data_dir, PERMISSIVE), clock=clock, run_scheduler=False) as broker:
        admin = Caller(broker, owner)
        mallory, service = Caller(broker, "mallory"), broker.service

        async def create(name: str, **params: Any) -> None:
            await admin("key.create", name=name, type=params.pop("type", "aes256-gcm"), **params)

        await create("pre", activate=False)
        await create("active-ok", rotation_period_s=90 * DAY, labels={"owner": HOSTILE_LABEL})
        await create("deact", type="hmac-sha256")
        await admin("key.deactivate", name="deact")
        await create("disabled", type="ed25519")
        await admin("key.disable", name="disabled")
        await create("compromised")
        await admin("key.compromise", name="compromised")
        await create("pending")
        await admin("key.schedule_destroy", name="pending", pending_days=7)
        await create("gone")
        await admin("key.schedule_destroy", name="gone", pending_days=7)
        # A destroyed critical software key breaks no rule any more.
        await create("crit-gone", classification="critical", rotation_period_s=30 * DAY)
        await service.lifecycle("crit-gone", Transition.SCHEDULE_DESTROY, pending_days=7)
        await create("overdue", type="hmac-sha256", rotation_period_s=30 * DAY)
        await create("crit-soft", classification="critical", rotation_period_s=60 * DAY)
        await create("crit-export", classification="critical", rotation_period_s=60 * DAY, exportable=True)
        await create("usage", max_uses_per_version=1000)
        await admin("encrypt_batch", key="usage", items=[b"x"] * 50)
        # Lowering the limit below what version 1 has used leaves it past the limit.
        await admin("key.update", name="usage", max_uses_per_version=10)
        for day in range(1, 121):
            clock.now += DAY
            if day == 7:  # their grace periods are over
                await service.lifecycle("gone", Transition.DESTROY)
                await service.lifecycle("crit-gone", Transition.DESTROY)
            if day in (40, 80, 100):
                await admin("key.rotate", name="active-ok")
            if day == 100:
                await admin("key.rotate", name="crit-soft")
                await admin("key.rotate", name="crit-export")
            if day in (95, 100, 101, 110, 119):  # denials spread over the audit period
                for _ in range(1 + day % 3):
                    with pytest.raises(BrokerError):
                        await mallory("key.get", name="active-ok")
            if day % 10 == 0:
                await admin("encrypt", key="active-ok", plaintext=b"p")


async def _build_good(data_dir: Path, clock: FakeClock) -> None:
    async with open_broker(_config(data_dir), clock=clock, run_scheduler=False) as broker:
        admin = Caller(broker, f"uid:{os.getuid()}")
        await admin("key.create", name="fine", type="aes256-gcm", rotation_period_s=365 * DAY)
        await admin("key.create", name="mac", type="hmac-sha256")


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    base = tmp_path_factory.mktemp("report")
    start = int(time.time()) - 120 * DAY
    clock = FakeClock(start)
    trio.run(_build_bad, base / "bad", clock)
    trio.run(_build_good, base / "good", FakeClock(start))
    return Scenario(bad=base / "bad", good=base / "good", now=int(clock.now), start=start)


def _triples(report: dict[str, Any]) -> set[tuple[str, str, int | None]]:
    return {(v["key"], v["rule"], v["version"]) for v in report["violations"]}


async def test_json_report_lists_exactly_the_violations(scenario: Scenario) -> None:
    report = await gather_report(_config(scenario.bad), now=scenario.now, since=scenario.now - 30 * DAY)
    json.dumps(report)  # plain JSON values only
    assert _triples(report) == EXPECTED
    assert len(report["violations"]) == len(EXPECTED)
    summary = report["summary"]
    assert summary["compliant"] is False and summary["violations"] == 5 and summary["keys_in_violation"] == 4
    assert summary["by_state"] == {
        "pre_active": 1, "active": 5, "deactivated": 1, "disabled": 1, "compromised": 1,
        "destroy_pending": 1, "destroyed": 2,
    }
    assert list(summary["by_state"]) == STATES
    assert summary["by_classification"] == {"public": 0, "internal": 9, "confidential": 0, "critical": 3}
    assert summary["by_protection"] == {"software": 12}
    assert summary["by_rule"] == {"critical.exportable": 1, "critical.protection": 2, "rotation.overdue": 1,
                                  "usage.limit": 1}

    keys = {k["name"]: k for k in report["keys"]}
    assert [k["name"] for k in report["keys"]] == sorted(keys)
    ok = keys["active-ok"]
    assert [v["version"] for v in ok["versions"]] == [1, 2, 3, 4]
    assert ok["primary_age_s"] == 20 * DAY
    assert ok["next_rotation_at"] == scenario.start + 190 * DAY and ok["rotation_overdue_s"] == 0
    assert ok["labels"] == {"owner": HOSTILE_LABEL} and ok["compliant"]
    assert ok["use_limit"] == 2**31 and ok["versions"][-1]["uses"] >= 1
    overdue = keys["overdue"]
    assert overdue["next_rotation_at"] == scenario.start + 30 * DAY
    assert overdue["rotation_overdue_s"] == 90 * DAY and overdue["violations"] == ["rotation.overdue"]
    assert overdue["use_limit"] is None  # hmac: no default limit
    usage = keys["usage"]["versions"][0]
    assert usage["limit"] == 10 and usage["uses"] >= 50 and usage["over_limit"] and usage["use_fraction"] >= 5
    assert keys["crit-gone"]["state"] == "destroyed" and keys["crit-gone"]["compliant"]
    assert keys["crit-export"]["violations"] == ["critical.exportable", "critical.protection"]

    audit = report["audit"]
    assert audit["available"] and audit["since"] == scenario.now - 30 * DAY
    denials = audit["denials"]
    # Days 95..119 of the build fall in the last 30 days: 3 + 2 + 3 + 3 + 3 denials.
    assert denials["total"] == 14
    assert denials["by_principal"] == {"mallory": 14} and denials["by_key"] == {"active-ok": 14}
    buckets = denials["over_time"]["buckets"]
    assert denials["over_time"]["bucket_s"] == DAY and len(buckets) in (30, 31)
    assert sum(b["count"] for b in buckets) == 14
    assert sorted(b["count"] for b in buckets if b["count"]) == [2, 3, 3, 3, 3]
    assert audit["by_principal"]["mallory"]["denied"] == 14
    assert audit["by_principal"]["mallory"]["ops"] == {"key.get": 14}
    assert audit["by_key"]["active-ok"]["ops"]["encrypt"] == 4  # days 90 (the inclusive start) to 120
    assert audit["by_outcome"]["denied"] == 14


async def test_report_with_the_creation_config_agrees_with_the_broker(scenario: Scenario) -> None:
    # The permissive rules the keys were created under allow software and
    # exportable critical keys: only the lifecycle violations remain.
    report = await gather_report(_config(scenario.bad, PERMISSIVE), now=scenario.now, since=scenario.start)
    assert _triples(report) == {t for t in EXPECTED if not t[1].startswith("critical.")}


async def test_report_rpc_is_for_admins_and_auditors_and_matches_the_command(
    scenario: Scenario, tmp_path: Path
) -> None:
    data = tmp_path / "copy"
    shutil.copytree(scenario.bad, data)
    clock = FakeClock(scenario.now)
    async with open_broker(_config(data, PERMISSIVE), clock=clock, run_scheduler=False) as broker:
        with pytest.raises(BrokerError) as info:
            await Caller(broker, "mallory")("report")
        assert info.value.code == "permission_denied"
        # Auditors read the report too (rbac's built-in auditor role).
        assert (await Caller(broker, "viewer")("report"))["summary"]["keys"] > 0
        admin = Caller(broker, f"uid:{os.getuid()}")
        with pytest.raises(BrokerError) as info:
            await admin("report", days=3, since=1)
        assert info.value.code == "invalid_argument"
        report = await admin("report", days=30)
    # The broker judges by its own (permissive) governance rules.
    assert _triples(report) == {t for t in EXPECTED if not t[1].startswith("critical.")}
    # 14 denials while building, and the refused report call.
    assert report["audit"]["denials"]["by_principal"] == {"mallory": 15}
    async with open_broker(_config(data), clock=clock, run_scheduler=False) as broker:
        report = await Caller(broker, f"uid:{os.getuid()}")("report")
    assert _triples(report) == EXPECTED
    lines = (data / "audit" / "audit.jsonl").read_text().splitlines()
    last = json.loads(lines[-1])
    assert last["op"] == "report" and last["outcome"] == "allowed" and last["details"]["violations"] == 5


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker", "report", *map(str, args)],
        capture_output=True, text=True, timeout=60, check=False,
    )


def test_check_gates_a_pipeline(scenario: Scenario, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    bad = _cli("--data-dir", scenario.bad, "--check", "--out", out, "--days", "30")
    assert bad.returncode == 1, bad.stderr
    assert "5 violation(s) in 4 key(s)" in bad.stderr and "overdue v1: rotation.overdue" in bad.stderr
    assert _triples(json.loads(out.read_text())) == EXPECTED
    assert out.stat().st_mode & 0o777 == 0o600  # the inventory is its owner's to read
    good = _cli("--data-dir", scenario.good, "--check", "--since", "2000-01-01")
    assert good.returncode == 0, good.stderr
    report = json.loads(good.stdout)
    assert report["summary"]["compliant"] and report["violations"] == []
    assert report["audit"]["records"] >= 2
    without_check = _cli("--data-dir", scenario.bad, "--format", "json")
    assert without_check.returncode == 0
    assert _cli("--data-dir", scenario.bad, "--days", "0").returncode == 1
    assert _cli("--data-dir", scenario.bad, "--since", "yesterday").returncode == 1


def test_report_out_never_writes_through_a_link(scenario: Scenario, tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("IMPORTANT")
    link = tmp_path / "report.html"
    link.symlink_to(victim)
    refused = _cli("--data-dir", scenario.bad, "--format", "html", "--out", link, "--days", "30")
    assert refused.returncode != 0 and "not a regular file" in refused.stderr
    assert victim.read_text() == "IMPORTANT" and link.is_symlink()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# --- the HTML page in a real browser ------------------------------------------


class _Dom(HTMLParser):
    """Collects the rows of each table and the marks of each SVG from a dumped DOM."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, list[dict[str, str]]] = {}
        self.marks: dict[str, list[dict[str, str]]] = {}
        self.scripts = 0
        self._table: str | None = None
        self._svg: str | None = None
        self._cell: list[str] | None = None
        self._row: dict[str, str] | None = None
        self.cells: dict[str, list[list[str]]] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "script":
            self.scripts += 1
        elif tag == "table":
            self._table = a.get("id", "")
            self.rows.setdefault(self._table, [])
            self.cells.setdefault(self._table, [])
        elif tag == "tr" and self._table is not None and "class" in a:
            self._row = a
            self.rows[self._table].append(a)
            self.cells[self._table].append([])
        elif tag == "td" and self._row is not None:
            self._cell = []
        elif tag == "svg":
            self._svg = a.get("id", "")
            self.marks.setdefault(self._svg, [])
        elif self._svg is not None and "mark" in a.get("class", "").split():
            self.marks[self._svg].append({"tag": tag, **a})

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._table = None
        elif tag == "tr":
            self._row = None
        elif tag == "td" and self._cell is not None and self._table is not None:
            self.cells[self._table][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "svg":
            self._svg = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def _chromium(url: str, profile: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", *extra, url],
        capture_output=True, text=True, timeout=60, check=False,
    )


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_html_page_renders_in_a_headless_browser(scenario: Scenario, tmp_path: Path) -> None:
    require(CHROMIUM is not None, "chromium")
    page = tmp_path / "report.html"
    result = _cli("--data-dir", scenario.bad, "--format", "html", "--out", page, "--days", "30")
    assert result.returncode == 0, result.stderr
    text = page.read_text(encoding="utf-8")
    # Self-contained: nothing to fetch, no script at all.
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:|//)""", text)
    assert "<script" not in text and "&lt;script&gt;" in text
    report = json.loads(_cli("--data-dir", scenario.bad, "--days", "30").stdout)

    dumped = _chromium(page.as_uri(), tmp_path / "profile", "--dump-dom")
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    dom = _Dom()
    dom.feed(dumped.stdout)
    assert dom.scripts == 0  # the hostile label stayed text
    assert [r["data-key"] for r in dom.rows["keys"]] == [k["name"] for k in report["keys"]]
    labels = {r["data-key"]: cells[10] for r, cells in zip(dom.rows["keys"], dom.cells["keys"], strict=True)}
    assert labels["active-ok"] == f"owner={HOSTILE_LABEL}"
    shown = {(r["data-key"], r["data-rule"]) for r in dom.rows["violations"]}
    assert shown == {(key, rule) for key, rule, _ in EXPECTED}
    assert len(dom.rows["violations"]) == 5
    assert len(dom.rows["versions"]) == sum(len(k["versions"]) for k in report["keys"])
    assert {r["data-principal"] for r in dom.rows["audit-principals"]} >= {"mallory"}

    charted = [k for k in report["keys"] if k["state"] != "destroyed"]
    timeline = dom.marks["rotation-timeline"]
    assert sum(m["tag"] == "circle" for m in timeline) == sum(len(k["versions"]) for k in charted)
    diamonds = [m for m in timeline if m["tag"] == "polygon"]
    assert len(diamonds) == sum(k["next_rotation_at"] is not None for k in charted)
    assert sum("overdue" in m["class"] for m in diamonds) == 1
    bars = dom.marks["uses-chart"]
    assert len(bars) == sum(len(k["versions"]) for k in charted if k["use_limit"] is not None)
    assert sum("over" in m["class"].split() for m in bars) == 1
    denials = dom.marks["denials-chart"]
    buckets = report["audit"]["denials"]["over_time"]["buckets"]
    assert len(denials) == len(buckets)
    assert sum(float(m["height"]) > 0 for m in denials) == sum(b["count"] > 0 for b in buckets) == 5

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report.png"
    shot.unlink(missing_ok=True)
    taken = _chromium(page.as_uri(), tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,2000",
                      "--hide-scrollbars")
    assert taken.returncode == 0, taken.stderr[-2000:]
    assert _png_size(shot) == (1280, 2000)
    assert shot.stat().st_size > 30_000  # a blank page compresses to a few kB
