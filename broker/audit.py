"""Tamper-evident audit log: hash-chained records, group commit, sink fan-out.

Every decision the broker makes (allowed, denied, failed) becomes one
:class:`AuditRecord`. Records form a hash chain: each carries the SHA-256 of
the previous record (``prev``) and its own hash over every other field
(``hash``), so altering, deleting, inserting or reordering a record breaks the
chain at that point, and :func:`verify_chain` names the first bad line.

The module has two halves:

- pure chain logic (:class:`AuditRecord`, :func:`chain_hash`,
  :func:`verify_chain`) that does no I/O and is tested with hypothesis;
- the trio side (:func:`open_audit_log`, :class:`AuditLog`) that chains
  records in call order and commits them to the *primary* sink in batches
  (group commit: one durable write for everything queued since the last
  one), then fans them out to any other sinks in the background.

Sinks are provided by plugins through the ``kb_audit_sinks`` hook; the
built-in ``keybroker_auditlog`` plugin is the primary JSON-lines file sink
whose directory :func:`verify_audit_dir` reads.

No plaintext, key material or ciphertext is ever logged: ``details`` values
are restricted to ``str``/``int``/``bool``/``None`` and ``bytes`` are refused.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Protocol, TextIO, final

import trio

from .errors import Unavailable

__all__ = [
    "AUDIT_FILE_NAME",
    "GENESIS",
    "MAX_LINE_BYTES",
    "TORN_FILE_PREFIX",
    "AuditLog",
    "AuditRecord",
    "AuditSink",
    "ChainHead",
    "DetailValue",
    "VerifyResult",
    "audit_verify_main",
    "chain_hash",
    "open_audit_log",
    "parse_valid_line",
    "verify_audit_dir",
    "verify_chain",
]

logger = logging.getLogger(__name__)

#: ``prev`` of the first record: there is nothing before it.
GENESIS: Final = "0" * 64

#: The primary file sink's log, inside ``<data_dir>/audit/``.
AUDIT_FILE_NAME: Final = "audit.jsonl"
#: Torn tails set aside at start-up are kept as ``torn-<unix time>.bin``.
TORN_FILE_PREFIX: Final = "torn-"

# ``details`` is for a few words of context (a rule name, a count), not a
# payload: these caps keep one careless caller from bloating every record.
MAX_DETAILS: Final = 32
MAX_DETAIL_CHARS: Final = 1024

# A record is a few hundred bytes; anything longer than this cannot be one,
# so readers refuse to parse it instead of buffering an arbitrary blob.
MAX_LINE_BYTES: Final = 256 * 1024

# How many records a non-primary sink may fall behind before new ones are
# dropped for it (and counted as gaps). Bounds the memory a hanging sink can
# pin to roughly this many records (~300 bytes each).
FANOUT_QUEUE_LIMIT: Final = 100_000

# On shutdown, how long non-primary sinks get to write what is queued before
# they are cancelled; the primary is always drained fully first.
FANOUT_CLOSE_GRACE_S: Final = 2.0

# How long shutdown waits for the primary's last batch and for sinks to
# close, even when the surrounding scope is already cancelled.
CLOSE_TIMEOUT_S: Final = 10.0

DetailValue = str | int | bool | None

_HEX64 = re.compile(r"[0-9a-f]{64}")
_TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
_FIELDS: Final = frozenset(
    {"seq", "ts", "node", "principal", "op", "key", "version", "outcome", "code", "alarm", "details",
     "prev", "hash"}
)


def _canonical(obj: Mapping[str, Any]) -> bytes:
    # Sorted keys and no whitespace make the encoding a function of the
    # values alone, so a hash over it can be recomputed from a parsed line.
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _check_str(name: str, value: object, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str):
        raise TypeError(f"audit {name} must be a str, not {type(value).__name__}")
    # A lone surrogate cannot be written as UTF-8; refuse it at the call
    # rather than fail later inside the writer.
    if not value.isascii():
        value.encode("utf-8")


def _check_int(name: str, value: object, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"audit {name} must be an int, not {type(value).__name__}")


def _checked_details(details: Mapping[str, object] | None) -> dict[str, DetailValue]:
    """Validate ``details`` and return a copy (the caller's mapping may change later).

    Raises:
        TypeError: a key is not a str, or a value is not str/int/bool/None
            (``bytes`` in particular: secrets never enter the audit log).
        ValueError: too many entries, a string too long, or a lone surrogate.
    """
    if not details:
        return {}
    if not isinstance(details, Mapping):
        raise TypeError("audit details must be a mapping")
    if len(details) > MAX_DETAILS:
        raise ValueError(f"audit details hold at most {MAX_DETAILS} entries")
    copy: dict[str, DetailValue] = {}
    for name, value in details.items():
        _check_str("details key", name)
        if isinstance(value, bytes | bytearray | memoryview):
            raise TypeError(f"audit details[{name!r}] is binary; binary values are never logged")
        if isinstance(value, str):
            if len(value) > MAX_DETAIL_CHARS:
                raise ValueError(f"audit details[{name!r}] is longer than {MAX_DETAIL_CHARS} characters")
            _check_str(f"details[{name!r}]", value)
        elif value is not None and not isinstance(value, int):
            # int covers bool. Floats are refused too: their text form is not
            # canonical across encoders, which would make hashes fragile.
            raise TypeError(
                f"audit details[{name!r}] must be str, int, bool or None, not {type(value).__name__}"
            )
        copy[name] = value
    return copy


def _rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --- pure chain logic ------------------------------------------------------


def chain_hash(fields_without_hash: Mapping[str, Any]) -> str:
    """The chain hash of one record.

    Args:
        fields_without_hash: the record's fields as JSON-compatible values
            (``prev`` included). A ``hash`` entry, if present, is ignored.

    Returns:
        SHA-256, lowercase hex, over the canonical JSON of every field except
        ``hash``.
    """
    if "hash" in fields_without_hash:
        fields_without_hash = {k: v for k, v in fields_without_hash.items() if k != "hash"}
    return hashlib.sha256(_canonical(fields_without_hash)).hexdigest()


@final
@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One audited decision, a link of the hash chain.

    Construct with :meth:`seal` (which computes ``hash``) or :meth:`from_json`;
    the constructor checks types and shapes but not that ``hash`` is right
    (:func:`verify_chain` does).

    Raises:
        TypeError: a field has the wrong type; ``details`` holds bytes or
            anything but str/int/bool/None.
        ValueError: a field has the right type but an impossible value.
    """

    seq: int
    ts: str
    node: str
    principal: str
    op: str
    key: str | None
    version: int | None
    outcome: str
    code: str | None
    alarm: bool
    details: Mapping[str, DetailValue]
    prev: str
    hash: str

    def __post_init__(self) -> None:
        _check_int("seq", self.seq)
        if self.seq < 1:
            raise ValueError("audit seq starts at 1")
        for name in ("ts", "node", "principal", "op", "outcome"):
            _check_str(name, getattr(self, name))
        _check_str("key", self.key, optional=True)
        _check_str("code", self.code, optional=True)
        _check_int("version", self.version, optional=True)
        if not isinstance(self.alarm, bool):
            raise TypeError("audit alarm must be a bool")
        if not _TS.fullmatch(self.ts):
            raise ValueError("audit ts must be RFC 3339 UTC with microseconds")
        for name in ("prev", "hash"):
            value = getattr(self, name)
            if not isinstance(value, str) or not _HEX64.fullmatch(value):
                raise ValueError(f"audit {name} must be 64 lowercase hex digits")
        # Frozen, so a record handed to several sinks cannot be changed by one.
        object.__setattr__(self, "details", MappingProxyType(_checked_details(self.details)))

    @classmethod
    def seal(
        cls,
        *,
        seq: int,
        prev: str,
        ts: str,
        node: str,
        principal: str,
        op: str,
        outcome: str,
        key: str | None = None,
        version: int | None = None,
        code: str | None = None,
        alarm: bool = False,
        details: Mapping[str, DetailValue] | None = None,
    ) -> AuditRecord:
        """Build the record that follows ``prev`` at position ``seq``, hash included.

        Raises:
            TypeError, ValueError: as the constructor.
        """
        fields: dict[str, Any] = {
            "seq": seq, "ts": ts, "node": node, "principal": principal, "op": op, "key": key,
            "version": version, "outcome": outcome, "code": code, "alarm": alarm,
            "details": dict(details or {}), "prev": prev,
        }
        try:
            digest = chain_hash(fields)
        except (TypeError, ValueError):
            digest = GENESIS  # let the constructor name the bad field
        return cls(hash=digest, **fields)

    @classmethod
    def _trusted(cls, fields: dict[str, Any]) -> AuditRecord:
        """Build from values this module has already checked, skipping ``__post_init__``.

        The writer's hot path: every field of a queued entry was checked when
        :meth:`AuditLog.record` accepted it, and seq, prev and hash are the
        writer's own. ``fields["details"]`` must be a private dict.
        """
        record = object.__new__(cls)
        for name, value in fields.items():
            object.__setattr__(record, name, value)
        object.__setattr__(record, "details", MappingProxyType(fields["details"]))
        return record

    def to_dict(self) -> dict[str, Any]:
        """The record as plain JSON-compatible values (all thirteen fields)."""
        return {
            "seq": self.seq, "ts": self.ts, "node": self.node, "principal": self.principal,
            "op": self.op, "key": self.key, "version": self.version, "outcome": self.outcome,
            "code": self.code, "alarm": self.alarm, "details": dict(self.details),
            "prev": self.prev, "hash": self.hash,
        }

    def to_json_line(self) -> bytes:
        """The canonical encoding: sorted keys, compact, UTF-8, ending in ``\\n``."""
        return _canonical(self.to_dict()) + b"\n"

    def expected_hash(self) -> str:
        """What ``hash`` must be for the other fields (see :func:`chain_hash`)."""
        return chain_hash(self.to_dict())

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> AuditRecord:
        """Rebuild a record from a parsed JSON object.

        Args:
            obj: the result of ``json.loads`` on one line.

        Returns:
            The record (its hash is not checked here).

        Raises:
            ValueError: the object does not have exactly the record's fields.
            TypeError: a field has the wrong type.
        """
        if not isinstance(obj, Mapping):
            raise TypeError("an audit record is a JSON object")
        if obj.keys() != _FIELDS:
            missing = sorted(_FIELDS - obj.keys())
            extra = sorted(obj.keys() - _FIELDS)
            raise ValueError(f"audit record fields wrong (missing {missing}, unexpected {extra})")
        if not isinstance(obj["details"], Mapping):
            raise TypeError("audit details must be an object")
        return cls(**obj)


@final
@dataclass(frozen=True, slots=True)
class ChainHead:
    """Where the durable chain ends, as the primary sink found it on open.

    Attributes:
        seq: the last good record's ``seq`` (0 for an empty log).
        hash: its ``hash`` (:data:`GENESIS` for an empty log).
        set_aside_bytes: bytes after the last good record that were moved
            aside (a torn write from a crash); 0 when the log was clean.
        set_aside_path: where they went.
        set_aside_lines: complete (newline-terminated) lines among them. A
            crash can only tear the last line, so a non-zero count means
            something else damaged the tail and the recovery is an alarm.
    """

    seq: int
    hash: str
    set_aside_bytes: int = 0
    set_aside_path: str | None = None
    set_aside_lines: int = 0


@final
@dataclass(frozen=True, slots=True)
class VerifyResult:
    """The outcome of :func:`verify_chain`.

    Attributes:
        ok: the whole chain is intact.
        records: how many records verified (before the first bad one).
        first_bad: 1-based line number of the first bad line, or None.
        reason: why that line is bad, or None.
        last_hash: hash of the last good record (GENESIS when there is none);
            keep it elsewhere to detect a later truncation of the tail.
    """

    ok: bool
    records: int
    first_bad: int | None = None
    reason: str | None = None
    last_hash: str = GENESIS


def _parse_line(line: bytes) -> tuple[AuditRecord | None, str | None]:
    """Check one line on its own; returns (record, None) or (None, reason).

    The link to the previous record (seq, prev) is not checked here.
    """
    if not line.endswith(b"\n"):
        return None, "incomplete line (no newline at the end)"
    if len(line) > MAX_LINE_BYTES:
        return None, "line too long to be an audit record"
    try:
        record = AuditRecord.from_json(json.loads(line))
    except (ValueError, TypeError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None, f"not an audit record ({exc})"
    # Byte-exact: catches edits that parse to the same values (\u00e9 vs é,
    # a duplicated key, added whitespace), so every byte of the file counts.
    if record.to_json_line() != line:
        return None, "not in canonical form"
    if record.expected_hash() != record.hash:
        return None, "hash does not match the record's contents (record altered)"
    return record, None


def parse_valid_line(line: bytes) -> AuditRecord | None:
    """The record on one line when it is well-formed and self-consistent, else None.

    Sinks use it on open to find the last good record. It does not check the
    link to the record before (that needs the whole file: :func:`verify_chain`).
    """
    return _parse_line(line)[0]


def verify_chain(lines: Iterable[bytes]) -> VerifyResult:
    """Check that lines form one unbroken chain starting at seq 1.

    Each line must end in ``b"\\n"``, parse as an audit record in canonical
    form, have a ``hash`` that recomputes, a ``seq`` one more than the line
    before (1 for the first) and ``prev`` equal to the previous record's hash
    (:data:`GENESIS` for the first).

    Args:
        lines: the log's lines as read from a binary file (newline included).

    Returns:
        A :class:`VerifyResult`; ``first_bad`` is the 1-based line number.

    Note:
        A chain proves nothing about records cut off its *end*; compare
        ``last_hash`` with a copy kept elsewhere to detect that.
    """
    prev = GENESIS
    count = 0
    for number, line in enumerate(lines, start=1):
        record, reason = _parse_line(line)
        if record is not None and record.seq != count + 1:
            reason = f"seq is {record.seq}, expected {count + 1} (record missing, inserted or reordered)"
        elif record is not None and record.prev != prev:
            reason = "prev does not match the previous record's hash"
        if reason is not None or record is None:
            return VerifyResult(ok=False, records=count, first_bad=number, reason=reason, last_hash=prev)
        prev = record.hash
        count += 1
    return VerifyResult(ok=True, records=count, last_hash=prev)


def verify_audit_dir(path: Path) -> VerifyResult:
    """Verify the primary file sink's log in an audit directory.

    Args:
        path: the audit directory (``<data_dir>/audit``).

    Returns:
        The :class:`VerifyResult` over ``audit.jsonl``. Torn tails set aside
        at start-up (``torn-*.bin``) are not part of the chain.

    Raises:
        FileNotFoundError: no directory or no log in it.
        OSError: the log cannot be read.

    Note:
        Run it on a stopped broker, or accept that the last line may be a
        write still in flight.
    """
    with (path / AUDIT_FILE_NAME).open("rb") as fh:
        return verify_chain(fh)


def audit_verify_main(data_dir: Path, out: TextIO) -> int:
    """``keybroker audit verify``: check the chain under ``data_dir`` and report.

    Args:
        data_dir: the broker's data directory (the log is in ``audit/``).
        out: where the human-readable report goes.

    Returns:
        0 when the chain is intact, 1 when it is broken, 2 when there is no
        log to check or it cannot be read.
    """
    audit_dir = data_dir / "audit"
    if not (audit_dir / AUDIT_FILE_NAME).is_file():
        print(f"no audit log at {audit_dir / AUDIT_FILE_NAME}", file=out)
        return 2
    try:
        result = verify_audit_dir(audit_dir)
    except OSError as exc:
        print(f"cannot read the audit log: {exc}", file=out)
        return 2
    if result.ok:
        print(f"audit chain intact: {result.records} records", file=out)
        print(f"last hash: {result.last_hash}", file=out)
    else:
        print(f"audit chain broken at record/line {result.first_bad}: {result.reason}", file=out)
    torn = sorted(p.name for p in audit_dir.glob(f"{TORN_FILE_PREFIX}*.bin"))
    if torn:
        print(f"note: {len(torn)} torn tail(s) set aside, not part of the chain: {', '.join(torn)}", file=out)
    return 0 if result.ok else 1


# --- sinks -----------------------------------------------------------------


class AuditSink(Protocol):
    """Where audit records go; provided by ``kb_audit_sinks`` implementations.

    Exactly one sink is ``primary``: it holds the chain that ``keybroker
    audit verify`` checks, and a request is answered only once its record is
    durable there. Other sinks (a SIEM forwarder, say) receive the same
    records in the background and can never block or fail a request.

    The log calls ``open`` once, then ``write`` one call at a time (never
    concurrently), then ``aclose`` once.
    """

    #: Short name used in log messages and gap counters.
    name: str
    #: True for the one sink that holds the chain.
    primary: bool

    async def open(self) -> ChainHead | None:
        """Prepare the sink.

        Returns:
            Primary: the chain head it recovered — the last good record's seq
            and hash, and whether a torn tail was set aside. Non-primary: None.

        Raises:
            OSError: the primary cannot be opened (the broker does not start).
        """
        ...

    async def write(self, records: Sequence[AuditRecord]) -> None:
        """Persist ``records`` (consecutive, in chain order).

        Returns only once they are durable (flushed and fsynced). On failure
        the primary raises an ``OSError`` and must leave its storage as it
        was before the call (roll back a partial append), so that the next
        write continues the chain from the last durable record.
        """
        ...

    async def aclose(self) -> None:
        """Release the sink's resources. Idempotent."""
        ...


# --- the trio side ---------------------------------------------------------


@dataclass(slots=True)
class _Entry:
    """A record waiting for its place in the chain (seq, prev and hash)."""

    ts: str
    principal: str
    op: str
    outcome: str
    key: str | None
    version: int | None
    code: str | None
    alarm: bool
    details: dict[str, DetailValue]  # already checked, private copy


class _Batch:
    """Entries queued since the last commit, and their shared result."""

    __slots__ = ("done", "entries", "records")

    def __init__(self) -> None:
        self.entries: list[_Entry] = []
        self.records: list[AuditRecord] | None = None  # set once durable
        self.done = trio.Event()


class _Fanout:
    """Background delivery to one non-primary sink, with a bounded backlog."""

    def __init__(self, sink: AuditSink) -> None:
        self.sink = sink
        self.queue: collections.deque[AuditRecord] = collections.deque()
        self.gaps = 0
        self.closing = False
        self.finished = trio.Event()
        self._wakeup = trio.Event()
        self._overflowing = False

    def push(self, records: Sequence[AuditRecord]) -> None:
        room = FANOUT_QUEUE_LIMIT - len(self.queue)
        if len(records) > room:
            # Keep the oldest queued records and drop the newest: the sink
            # sees one gap instead of a hole punched in what it already has.
            if not self._overflowing:
                logger.warning("audit sink %s is %d records behind; dropping new records for it",
                               self.sink.name, len(self.queue))
                self._overflowing = True
            self.gaps += len(records) - max(room, 0)
            records = records[: max(room, 0)]
        else:
            self._overflowing = False
        self.queue.extend(records)
        self._wakeup.set()

    def close(self) -> None:
        self.closing = True
        self._wakeup.set()

    async def run(self) -> None:
        inflight: list[AuditRecord] = []
        try:
            try:
                await self.sink.open()
            except Exception:
                logger.exception("audit sink %s failed to open; writes will still be tried", self.sink.name)
            while True:
                if not self.queue:
                    if self.closing:
                        return
                    await self._wakeup.wait()
                    self._wakeup = trio.Event()
                    continue
                inflight = list(self.queue)
                self.queue.clear()
                try:
                    await self.sink.write(inflight)
                except Exception as exc:
                    self.gaps += len(inflight)
                    logger.warning("audit sink %s lost records %d-%d: %r",
                                   self.sink.name, inflight[0].seq, inflight[-1].seq, exc)
                inflight = []
        finally:
            # Cancelled at shutdown: what was in the write or still queued is lost.
            undelivered = len(inflight) + len(self.queue)
            if undelivered:
                self.gaps += undelivered
                logger.warning("audit sink %s closed with %d records undelivered",
                               self.sink.name, undelivered)
                self.queue.clear()
            self.finished.set()


@final
class AuditLog:
    """The broker's audit log; obtain one from :func:`open_audit_log`.

    Records are chained in the order :meth:`record` is called and committed
    to the primary sink by one writer task: everything queued while the
    previous write was in progress goes out in the next single ``write()``
    (one fsync), then all those callers are released together.
    """

    def __init__(
        self,
        primary: AuditSink,
        fanouts: Sequence[_Fanout],
        head: ChainHead,
        *,
        node: str,
        clock: Callable[[], float],
    ) -> None:
        self._primary = primary
        self._fanouts = list(fanouts)
        self._node = node
        self._clock = clock
        self._seq = head.seq
        self._hash = head.hash
        self._batch = _Batch()
        # Written ahead of the next batch until they are durable (recovery notes).
        self._notes: list[_Entry] = []
        self._wakeup = trio.Event()
        self._healthy = True
        self._closing = False
        self._writes = 0
        self._writer_finished = trio.Event()

    @property
    def healthy(self) -> bool:
        """False after the primary's last write failed; True again once one succeeds."""
        return self._healthy

    @property
    def head(self) -> tuple[int, str]:
        """The last durable record's (seq, hash)."""
        return self._seq, self._hash

    @property
    def writes(self) -> int:
        """How many ``write()`` calls the primary has completed (group-commit metric)."""
        return self._writes

    @property
    def sink_gaps(self) -> Mapping[str, int]:
        """Records each non-primary sink has missed so far, by sink name."""
        return {f.sink.name: f.gaps for f in self._fanouts}

    def _entry(
        self,
        *,
        principal: str,
        op: str,
        outcome: str,
        key: str | None,
        version: int | None,
        code: str | None,
        alarm: bool,
        details: Mapping[str, DetailValue] | None,
    ) -> _Entry:
        for name, value in (("principal", principal), ("op", op), ("outcome", outcome)):
            _check_str(name, value)
        _check_str("key", key, optional=True)
        _check_str("code", code, optional=True)
        _check_int("version", version, optional=True)
        if not isinstance(alarm, bool):
            raise TypeError("audit alarm must be a bool")
        return _Entry(_rfc3339(self._clock()), principal, op, outcome, key, version, code, alarm,
                      _checked_details(details))

    async def record(
        self,
        *,
        principal: str,
        op: str,
        outcome: str,
        key: str | None = None,
        version: int | None = None,
        code: str | None = None,
        alarm: bool = False,
        details: Mapping[str, DetailValue] | None = None,
    ) -> AuditRecord:
        """Append one record and wait until it is durable in the primary sink.

        Args:
            principal: who asked.
            op: the operation (an RPC method name, or an internal one like
                ``audit.recover``).
            outcome: "allowed", "denied", "error", "recovered", ...
            key: the key *name*, when the operation concerns one.
            version: the key version, when one is involved.
            code: the protocol error code on failure.
            alarm: mark records an operator must look at (compromised keys).
            details: a few non-secret facts; values str/int/bool/None only.

        Returns:
            The record as written, with its seq and hash.

        Raises:
            TypeError: a field has the wrong type; ``details`` holds bytes or
                another non-scalar value.
            ValueError: ``details`` too large, or a lone surrogate in a string.
            Unavailable: the primary sink failed to write this batch, or the
                log is closed. The record was not written and the chain was
                not advanced past it; later calls try again.

        Cancellation:
            Safe at any point. The record is queued before the first
            checkpoint; a caller cancelled while waiting does not learn the
            outcome, but the record may still be written, in its place in
            the chain, and the chain stays consistent either way.
        """
        if self._closing:
            raise Unavailable("audit log unavailable (closed)")
        entry = self._entry(
            principal=principal, op=op, outcome=outcome, key=key, version=version, code=code, alarm=alarm,
            details=details,
        )
        batch = self._batch
        index = len(batch.entries)
        batch.entries.append(entry)
        self._wakeup.set()
        await batch.done.wait()
        if batch.records is None:
            raise Unavailable("audit log unavailable")
        return batch.records[index]

    async def _commit(self, batch: _Batch) -> None:
        """Chain ``notes + batch`` on the durable head and write it; always releases the waiters."""
        try:
            entries = self._notes + batch.entries
            seq, prev = self._seq, self._hash
            records: list[AuditRecord] = []
            for e in entries:
                seq += 1
                fields: dict[str, Any] = {
                    "seq": seq, "ts": e.ts, "node": self._node, "principal": e.principal, "op": e.op,
                    "key": e.key, "version": e.version, "outcome": e.outcome, "code": e.code,
                    "alarm": e.alarm, "details": e.details, "prev": prev,
                }
                prev = fields["hash"] = hashlib.sha256(_canonical(fields)).hexdigest()
                records.append(AuditRecord._trusted(fields))
            try:
                await self._primary.write(records)
            except Exception as exc:
                # Fail closed: nobody is acknowledged and the head stays on the
                # last durable record, so the next batch re-chains from there.
                # Anything but OSError is a sink bug, hence the traceback.
                if self._healthy:
                    logger.error("audit log unavailable: primary sink %s failed: %r", self._primary.name, exc,
                                 exc_info=not isinstance(exc, OSError))
                self._healthy = False
                return
            if not self._healthy:
                logger.warning("audit log available again (primary sink %s)", self._primary.name)
            self._healthy = True
            self._writes += 1
            self._seq, self._hash = seq, prev
            del self._notes[:]
            batch.records = records[len(records) - len(batch.entries):]
            for fanout in self._fanouts:
                fanout.push(records)
        finally:
            batch.done.set()

    async def _run_writer(self) -> None:
        try:
            while True:
                if not self._batch.entries:
                    if self._closing:
                        return
                    await self._wakeup.wait()
                    self._wakeup = trio.Event()
                    continue
                batch, self._batch = self._batch, _Batch()
                await self._commit(batch)
        finally:
            # Cancelled with records queued (shutdown timed out): release
            # their callers with an error rather than leave them waiting.
            self._closing = True
            self._batch.done.set()
            self._writer_finished.set()


def _split_sinks(sinks: Sequence[AuditSink]) -> tuple[AuditSink, list[AuditSink]]:
    primaries = [s for s in sinks if s.primary]
    if len(primaries) != 1:
        names = ", ".join(s.name for s in primaries) or "none"
        raise ValueError(f"exactly one audit sink must be primary (found: {names})")
    return primaries[0], [s for s in sinks if not s.primary]


async def _close_sink(sink: AuditSink) -> None:
    try:
        await sink.aclose()
    except Exception:
        logger.exception("audit sink %s failed to close", sink.name)


@asynccontextmanager
async def open_audit_log(
    sinks: Sequence[AuditSink],
    *,
    node: str,
    clock: Callable[[], float] = time.time,
) -> AsyncIterator[AuditLog]:
    """Open the sinks, recover the chain head and run the writer task.

    If the primary set aside a torn tail, the first record written is
    ``op="audit.recover", outcome="recovered"`` by principal ``keybroker``,
    saying how many bytes went where (an alarm when more than a torn last
    line was set aside). Should that first write fail, the note is retried
    ahead of the next batch.

    Args:
        sinks: every sink the plugins provided; exactly one is primary.
        node: this broker's node name, stored in each record.
        clock: Unix time source for ``ts``.

    Yields:
        The :class:`AuditLog`.

    Raises:
        ValueError: not exactly one primary sink, or it returned no ChainHead.
        OSError: the primary sink could not be opened.

    Resource handling:
        On exit everything already queued is written to the primary (even
        when the surrounding scope is cancelled, up to a timeout), other
        sinks get a short grace to catch up, and every sink is closed.
    """
    primary, others = _split_sinks(sinks)
    _check_str("node", node)
    head = await primary.open()
    if not isinstance(head, ChainHead):
        await _close_sink(primary)
        raise ValueError(f"primary audit sink {primary.name} returned no ChainHead from open()")
    fanouts = [_Fanout(s) for s in others]
    log = AuditLog(primary, fanouts, head, node=node, clock=clock)
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            for fanout in fanouts:
                nursery.start_soon(fanout.run)
            if head.set_aside_bytes:
                log._notes.append(log._entry(
                    principal="keybroker", op="audit.recover", outcome="recovered", key=None, version=None,
                    code=None, alarm=head.set_aside_lines > 0,
                    details={"set_aside_bytes": head.set_aside_bytes, "set_aside_to": head.set_aside_path,
                             "set_aside_lines": head.set_aside_lines, "after_seq": head.seq},
                ))
                await log._commit(_Batch())
            nursery.start_soon(log._run_writer)
            try:
                yield log
            except BaseException as exc:
                # Re-raised below, outside the nursery, so callers see their
                # own exception rather than an ExceptionGroup around it.
                body_error = exc
            finally:
                log._closing = True
                log._wakeup.set()
                with trio.CancelScope(shield=True) as scope:
                    scope.deadline = trio.current_time() + CLOSE_TIMEOUT_S
                    await log._writer_finished.wait()
                    for fanout in fanouts:
                        fanout.close()
                    with trio.move_on_after(FANOUT_CLOSE_GRACE_S):
                        for fanout in fanouts:
                            await fanout.finished.wait()
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + CLOSE_TIMEOUT_S
            await _close_sink(primary)
            for sink in others:
                await _close_sink(sink)
    if body_error is not None:
        raise body_error

