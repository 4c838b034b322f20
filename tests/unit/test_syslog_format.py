"""keybroker_syslog: RFC 5424 messages, RFC 6587 framing, gap bookkeeping, config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from keybroker_syslog import SyslogConfig, kb_audit_sinks
from keybroker_syslog._format import (
    MAX_GAP_RANGES,
    GapTracker,
    Header,
    format_gap,
    format_record,
    octet_counted,
    sd_escape,
)

from broker.audit import GENESIS, AuditRecord
from broker.config import parse_config
from broker.errors import InvalidArgument
from tests._rfc5424 import MESSAGE, parse_sd, split_sd

HEADER = Header(facility=10, app_name="keybroker", procid="42", enterprise_id=32473)
TS = "2030-03-17T17:46:40.123456Z"

def record(**fields: Any) -> AuditRecord:
    base: dict[str, Any] = {"seq": 7, "prev": GENESIS, "ts": TS, "node": "node-1", "principal": "uid:0",
                            "op": "key.get", "outcome": "allowed", "key": "app/k", "version": 3}
    base.update(fields)
    return AuditRecord.seal(**base)


def test_a_record_is_one_rfc5424_message_with_its_fields_as_structured_data() -> None:
    r = record()
    match = MESSAGE.fullmatch(format_record(r, HEADER))
    assert match
    assert int(match["pri"]) == 10 * 8 + 6  # authpriv.info
    assert (match["ts"], match["host"], match["app"], match["procid"], match["msgid"]) == (
        TS.encode(), b"node-1", b"keybroker", b"42", b"key.get"
    )
    sd = parse_sd(match["rest"].decode())
    assert sd == {"keybroker@32473": {"seq": "7", "op": "key.get", "principal": "uid:0", "key": "app/k",
                                      "version": "3", "outcome": "allowed", "alarm": "false", "hash": r.hash}}
    assert split_sd(match["rest"].decode())[1] == "uid:0 key.get app/k v3: allowed"


def test_absent_fields_are_left_out_and_severity_follows_the_outcome() -> None:
    denied = record(key=None, version=None, outcome="denied", code="permission_denied")
    match = MESSAGE.fullmatch(format_record(denied, HEADER))
    assert match and int(match["pri"]) == 85  # notice
    params = parse_sd(match["rest"].decode())["keybroker@32473"]
    assert "key" not in params and "version" not in params and params["code"] == "permission_denied"
    alarm = MESSAGE.fullmatch(format_record(record(alarm=True), HEADER))
    assert alarm and int(alarm["pri"]) == 81  # alert


def test_param_values_escape_quote_backslash_and_bracket() -> None:
    assert sd_escape('a"b\\c]d[e') == 'a\\"b\\\\c\\]d[e'
    hostile = 'cn=Eve "the] \\admin" [x]'
    match = MESSAGE.fullmatch(format_record(record(principal=hostile), HEADER))
    assert match
    assert parse_sd(match["rest"].decode())["keybroker@32473"]["principal"] == hostile


def test_header_fields_are_printable_ascii_and_bounded() -> None:
    header = Header(facility=16, app_name="key broker" + "x" * 60, procid="1", enterprise_id=1,
                    hostname="höst name")
    match = MESSAGE.fullmatch(format_record(record(op="o" * 40, principal="Zoë"), header))
    assert match
    assert match["host"] == b"h_st_name" and len(match["app"]) == 48 and len(match["msgid"]) == 32
    # A non-ASCII MSG is UTF-8 marked with a BOM.
    assert match["rest"].split(b"] ", 1)[1].startswith(b"\xef\xbb\xbfZo\xc3\xab ")
    assert match["rest"].startswith(b"[keybroker@1 ")


def test_octet_counting_frames_by_bytes() -> None:
    assert octet_counted("zoë".encode()) == b"4 zo\xc3\xab"


def test_gap_tracker_merges_ranges_and_counts_exactly() -> None:
    gaps = GapTracker()
    gaps.seen([record(seq=1), record(seq=2)])
    gaps.seen([record(seq=5)])  # 3-4 never reached the sink
    gaps.lost([record(seq=5)])
    gaps.seen([record(seq=6)])
    gaps.seen([record(seq=9)])
    assert gaps.missed == 5 and gaps.ranges == [(3, 5), (7, 8)]
    match = MESSAGE.fullmatch(format_gap(gaps, HEADER, TS, "node-1"))
    assert match and match["msgid"] == b"audit.gap" and int(match["pri"]) == 84  # warning
    params = parse_sd(match["rest"].decode())["keybroker-gap@32473"]
    assert params == {"missed": "5", "first_seq": "3", "last_seq": "8", "ranges": "3-5,7-8"}
    message = split_sd(match["rest"].decode())[1]
    assert message and message.startswith("5 audit records were not forwarded (seq 3-5,7-8)")
    gaps.clear()
    assert gaps.missed == 0 and gaps.ranges == []
    for seq in range(10, 10 + 3 * (MAX_GAP_RANGES + 5), 3):
        gaps.lost([record(seq=seq)])
    assert len(gaps.ranges) <= MAX_GAP_RANGES and gaps.missed == MAX_GAP_RANGES + 5


def test_config_parsing() -> None:
    config = SyslogConfig.from_table({"transport": "tcp", "address": "[::1]:6514", "facility": "local3"})
    assert (config.host, config.port, config.facility) == ("::1", 6514, 19)
    assert SyslogConfig.from_table({"address": "logs.example"}).port == 514
    assert SyslogConfig.from_table({}).transport == "unix"
    for bad in ({"transport": "http"}, {"address": "h:0"}, {"facility": "nope"}, {"facility": 24},
                {"send_timeout_s": 0}, {"hostname": ""}, {"colour": "red"}, {"enterprise_id": True}):
        with pytest.raises(InvalidArgument):
            SyslogConfig.from_table(bad)


def test_no_section_no_sink() -> None:
    assert kb_audit_sinks(parse_config({}, data_dir=Path("/nonexistent"))) == []
    sinks = kb_audit_sinks(parse_config({"plugins": {"syslog": {}}}, data_dir=Path("/x")))
    assert len(sinks) == 1 and not sinks[0].primary and sinks[0].name == "syslog"
