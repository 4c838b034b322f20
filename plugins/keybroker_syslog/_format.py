"""RFC 5424 messages for audit records, RFC 6587 framing, gap bookkeeping. Pure logic.

One audit record becomes one message::

    <PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID [SD-ID seq=".." op=".." ...] MSG

with the record's own ``ts`` as TIMESTAMP, its ``op`` as MSGID and its
fields as the parameters of one structured-data element (``keybroker@32473``
by default; 32473 is the enterprise number RFC 5612 reserves for
documentation, so set your own with ``enterprise_id``). Parameter values are
escaped as RFC 5424 §6.3.3 requires (``"``, ``\\`` and ``]`` get a
backslash); header fields are cut to their RFC lengths and stripped of
anything but printable US-ASCII.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from broker.audit import AuditRecord

__all__ = [
    "FACILITIES",
    "NILVALUE",
    "SEVERITY_ALERT",
    "SEVERITY_INFO",
    "SEVERITY_NOTICE",
    "SEVERITY_WARNING",
    "GapTracker",
    "Header",
    "format_gap",
    "format_record",
    "octet_counted",
    "sd_escape",
    "severity_of",
]

NILVALUE: Final = "-"

# RFC 5424 §6.2.1 severities used here.
SEVERITY_ALERT: Final = 1  # an alarm: a compromised key was used
SEVERITY_WARNING: Final = 4  # records were not forwarded
SEVERITY_NOTICE: Final = 5  # a denial or a failed request
SEVERITY_INFO: Final = 6  # an allowed request

# RFC 5424 §6.2.1 facility codes by their customary names.
FACILITIES: Final = {
    "kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6, "news": 7,
    "uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11, "ntp": 12, "security": 13, "console": 14,
    "solaris-cron": 15, "local0": 16, "local1": 17, "local2": 18, "local3": 19, "local4": 20,
    "local5": 21, "local6": 22, "local7": 23,
}

# RFC 5424 §6 header field lengths.
MAX_HOSTNAME: Final = 255
MAX_APP_NAME: Final = 48
MAX_PROCID: Final = 128
MAX_MSGID: Final = 32

# A gap notice lists at most this many separate seq ranges (the count stays
# exact): a flapping receiver must not make the notice itself unbounded.
MAX_GAP_RANGES: Final = 16

_NOT_PRINTUSASCII = re.compile(r"[^\x21-\x7e]")
_SD_ESCAPE = re.compile(r'(["\\\]])')
_UTF8_BOM: Final = b"\xef\xbb\xbf"


def _header_field(value: str | None, limit: int) -> str:
    """A header field: printable US-ASCII only (others become ``_``), cut to ``limit``."""
    if not value:
        return NILVALUE
    return _NOT_PRINTUSASCII.sub("_", value)[:limit]


def sd_escape(value: str) -> str:
    """Escape a PARAM-VALUE: ``"``, ``\\`` and ``]`` get a backslash (RFC 5424 §6.3.3)."""
    return _SD_ESCAPE.sub(r"\\\1", value)


def _sd_element(sd_id: str, params: Sequence[tuple[str, object]]) -> str:
    parts = [sd_id]
    for name, value in params:
        if value is None:
            continue  # absent, rather than an empty string that means something else
        text = ("true" if value else "false") if isinstance(value, bool) else str(value)
        parts.append(f'{name}="{sd_escape(text)}"')
    return "[" + " ".join(parts) + "]"


@dataclass(frozen=True, slots=True)
class Header:
    """The parts of every message that do not come from the record."""

    facility: int
    app_name: str
    procid: str
    enterprise_id: int
    # None: each record's own node name.
    hostname: str | None = None

    @property
    def sd_id(self) -> str:
        return f"keybroker@{self.enterprise_id}"

    @property
    def gap_sd_id(self) -> str:
        return f"keybroker-gap@{self.enterprise_id}"

    def line(self, severity: int, ts: str, hostname: str | None, msgid: str) -> str:
        host = self.hostname if self.hostname is not None else hostname
        return (
            f"<{self.facility * 8 + severity}>1 {ts} {_header_field(host, MAX_HOSTNAME)} "
            f"{_header_field(self.app_name, MAX_APP_NAME)} {_header_field(self.procid, MAX_PROCID)} "
            f"{_header_field(msgid, MAX_MSGID)}"
        )


def severity_of(record: AuditRecord) -> int:
    """Alarm > denial or failure > allowed."""
    if record.alarm:
        return SEVERITY_ALERT
    if record.outcome in ("denied", "error"):
        return SEVERITY_NOTICE
    return SEVERITY_INFO


def _msg(text: str) -> bytes:
    # RFC 5424 §6.4: UTF-8 text is marked with a BOM; plain ASCII needs none.
    data = text.encode("utf-8")
    return data if text.isascii() else _UTF8_BOM + data


def format_record(record: AuditRecord, header: Header) -> bytes:
    """One audit record as an RFC 5424 message (no framing, no trailing newline)."""
    sd = _sd_element(
        header.sd_id,
        [
            ("seq", record.seq),
            ("op", record.op),
            ("principal", record.principal),
            ("key", record.key),
            ("version", record.version),
            ("outcome", record.outcome),
            ("code", record.code),
            ("alarm", record.alarm),
            ("hash", record.hash),
        ],
    )
    what = record.op + (f" {record.key}" if record.key else "") + (
        f" v{record.version}" if record.version is not None else ""
    )
    text = f"{record.principal} {what}: {record.outcome}" + (f" ({record.code})" if record.code else "")
    head = header.line(severity_of(record), record.ts, record.node, record.op)
    return f"{head} {sd} ".encode() + _msg(text)


@dataclass(slots=True)
class GapTracker:
    """Which audit records never reached the receiver, until a notice says so.

    Records are forwarded in seq order, so a gap shows up either as a batch
    the sink failed to send (:meth:`lost`) or as a jump in seq between two
    batches it was given (:meth:`seen`: the broker dropped records for a
    sink that fell too far behind).
    """

    missed: int = 0
    ranges: list[tuple[int, int]] = field(default_factory=list)
    last_seq: int | None = None

    def _add(self, first: int, last: int) -> None:
        self.missed += last - first + 1
        if self.ranges and self.ranges[-1][1] + 1 >= first:
            self.ranges[-1] = (self.ranges[-1][0], max(last, self.ranges[-1][1]))
        else:
            self.ranges.append((first, last))
        if len(self.ranges) > MAX_GAP_RANGES:
            # Fold the two oldest ranges into one span; `missed` stays exact.
            (a, _), (_, b) = self.ranges[0], self.ranges[1]
            self.ranges[:2] = [(a, b)]

    def seen(self, records: Sequence[AuditRecord]) -> None:
        """Note a batch handed to the sink; a seq jump before it is a gap."""
        if not records:
            return
        first = records[0].seq
        if self.last_seq is not None and first > self.last_seq + 1:
            self._add(self.last_seq + 1, first - 1)
        self.last_seq = max(records[-1].seq, self.last_seq or 0)

    def lost(self, records: Sequence[AuditRecord]) -> None:
        """Note a batch that could not be sent."""
        if records:
            self._add(records[0].seq, records[-1].seq)

    def clear(self) -> None:
        """The notice went out: start counting afresh."""
        self.missed = 0
        self.ranges = []


def format_gap(tracker: GapTracker, header: Header, ts: str, hostname: str | None) -> bytes:
    """The notice that ``tracker.missed`` records were not forwarded, with their seq ranges."""
    first, last = tracker.ranges[0][0], tracker.ranges[-1][1]
    ranges = ",".join(f"{a}-{b}" if a != b else str(a) for a, b in tracker.ranges)
    sd = _sd_element(
        header.gap_sd_id,
        [("missed", tracker.missed), ("first_seq", first), ("last_seq", last), ("ranges", ranges)],
    )
    text = (
        f"{tracker.missed} audit records were not forwarded (seq {ranges}); "
        "the local audit log holds every one of them"
    )
    return f"{header.line(SEVERITY_WARNING, ts, hostname, 'audit.gap')} {sd} ".encode() + _msg(text)


def octet_counted(message: bytes) -> bytes:
    """RFC 6587 §3.4.1 octet-counting framing: ``LEN SP MSG``."""
    return b"%d %s" % (len(message), message)
