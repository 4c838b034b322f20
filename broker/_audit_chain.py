"""The pure half of the audit log: records, the hash chain, and its verification.

No I/O here: records are built, encoded, hashed and checked from values and
bytes alone, so the chain rules are tested with hypothesis. The public names
are re-exported by :mod:`broker.audit`; import them from there.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from json.encoder import encode_basestring as _json_str  # type: ignore[attr-defined]
from types import MappingProxyType
from typing import Any, Final, final, overload

#: ``prev`` of the first record: there is nothing before it.
GENESIS: Final = "0" * 64

# ``details`` is for a few words of context (a rule name, a count), not a
# payload: these caps keep one careless caller from bloating every record.
MAX_DETAILS: Final = 32
MAX_DETAIL_CHARS: Final = 1024

# A record is a few hundred bytes; anything longer than this cannot be one,
# so readers refuse to parse it instead of buffering an arbitrary blob.
MAX_LINE_BYTES: Final = 256 * 1024
# The record a start-up writes after setting a damaged tail aside.
RECOVER_OP: Final = "audit.recover"

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


def _json_opt(value: str | None) -> str:
    return "null" if value is None else _json_str(value)


@dataclass(slots=True)
class _Entry:
    """A record waiting for its place in the chain (seq, prev and hash); fields already checked."""

    ts: str
    principal: str
    op: str
    outcome: str
    key: str | None
    version: int | None
    code: str | None
    alarm: bool
    details: dict[str, DetailValue]  # a private copy


# (head, text before prev, text between prev and seq, text after ts) of a
# record: its encoded parts but for seq, ts and prev (see _split_values).
_Shape = tuple[str, str, str, str]
# The shapes of records without details, by the fields they encode (see
# _split_values), and how many are kept at most.
_SHAPES: dict[tuple[Any, ...], _Shape] = {}
MAX_SHAPES: Final = 4096


def _split_values(seq: int, entry: _Entry, node: str, prev: str) -> tuple[str, str]:
    """The canonical JSON of a record without ``hash``, cut where ``hash`` belongs.

    ``(head + tail).encode()`` equals :func:`_canonical` of the same fields;
    the record's line is ``head + '"hash":"…",' + tail``. Written out for
    the fixed schema because ``json.dumps(sort_keys=True)`` costs more than
    everything else the writer does per record; the property tests check it
    against :func:`_canonical`, which verification keeps using.
    """
    if entry.details:
        shape = _encode_shape(entry, node)
    else:
        # Records without details mostly repeat who did what to which key:
        # their encoded parts are kept, so only seq, ts and prev are encoded.
        shape_key = (entry.alarm, entry.code, entry.key, node, entry.op, entry.outcome, entry.principal,
                     entry.version)
        shape = _SHAPES.get(shape_key)
        if shape is None:
            if len(_SHAPES) >= MAX_SHAPES:
                _SHAPES.clear()
            shape = _SHAPES[shape_key] = _encode_shape(entry, node)
    head, before_prev, before_seq, after_ts = shape
    seq_text = int.__repr__(seq)
    return head, f'{before_prev}{_json_str(prev)}{before_seq}{seq_text},"ts":{_json_str(entry.ts)}{after_ts}'


def _encode_shape(entry: _Entry, node: str) -> _Shape:
    """The encoded parts of ``entry``'s record around its seq, ts and prev (see :func:`_split_values`)."""
    details = entry.details
    version = entry.version
    return (
        f'{{"alarm":{"true" if entry.alarm else "false"},"code":{_json_opt(entry.code)},'
        f'"details":{_canonical(details).decode() if details else "{}"},',
        f'"key":{_json_opt(entry.key)},"node":{_json_str(node)},"op":{_json_str(entry.op)},'
        f'"outcome":{_json_str(entry.outcome)},"prev":',
        f',"principal":{_json_str(entry.principal)},"seq":',
        f',"version":{"null" if version is None else int.__repr__(version)}}}',
    )


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


_SECOND_CACHE: list[Any] = [None, ""]


def _rfc3339(t: float) -> str:
    # Formatting the date part costs more than the rest of a record; records
    # come thousands a second, so the text of the current second is kept.
    second = int(t)
    if _SECOND_CACHE[0] != second:
        _SECOND_CACHE[:] = [second, datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")]
    micros = min(int((t - second) * 1_000_000), 999_999)
    return f"{_SECOND_CACHE[1]}.{micros:06d}Z"


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
    # The encoded line, kept by records the writer chained (see _chain_entries).
    _line: bytes | None = field(default=None, init=False, repr=False, compare=False)

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

    def __hash__(self) -> int:
        # The chain hash already identifies the record; the default would
        # try to hash the details mapping and fail.
        return hash(self.hash)

    @classmethod
    def _assemble(
        cls, seq: int, entry: _Entry, node: str, *, prev: str, digest: str, line: bytes
    ) -> AuditRecord:
        """The record of a chained entry, skipping ``__post_init__`` (see :class:`_Chained`)."""
        # Slot by slot, unrolled: a loop over the setters costs twice as much.
        record = object.__new__(cls)
        details = entry.details
        _set_seq(record, seq)
        _set_ts(record, entry.ts)
        _set_node(record, node)
        _set_principal(record, entry.principal)
        _set_op(record, entry.op)
        _set_key(record, entry.key)
        _set_version(record, entry.version)
        _set_outcome(record, entry.outcome)
        _set_code(record, entry.code)
        _set_alarm(record, entry.alarm)
        _set_details(record, MappingProxyType(details) if details else _NO_DETAILS)
        _set_prev(record, prev)
        _set_hash(record, digest)
        _set_line(record, line)
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
        line = self._line
        return line if line is not None else _canonical(self.to_dict()) + b"\n"

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


# Slot setters of AuditRecord for _assemble: they write a frozen record's
# slots without the checks of __setattr__ (cheaper per record).
(_set_seq, _set_ts, _set_node, _set_principal, _set_op, _set_key, _set_version, _set_outcome, _set_code,
 _set_alarm, _set_details, _set_prev, _set_hash, _set_line) = (
    AuditRecord.__dict__[name].__set__
    for name in ("seq", "ts", "node", "principal", "op", "key", "version", "outcome", "code", "alarm",
                 "details", "prev", "hash", "_line")
)
_NO_DETAILS: Final[Mapping[str, DetailValue]] = MappingProxyType({})


def _chain_entries(entries: Sequence[_Entry], node: str, seq: int, prev: str) -> _Chained:
    """``entries`` chained after the record ``(seq, prev)``: their hashes and lines.

    The writer's hot path: every field of an entry was checked when
    :meth:`broker.audit.AuditLog.record` accepted it, and seq and prev are
    the writer's own.
    """
    hashes: list[str] = []
    lines: list[bytes] = []
    sha256 = hashlib.sha256
    at, digest = seq, prev
    for entry in entries:
        at += 1
        head, tail = _split_values(at, entry, node, digest)
        digest = sha256(f"{head}{tail}".encode()).hexdigest()
        hashes.append(digest)
        lines.append(f'{head}"hash":"{digest}",{tail}\n'.encode())
    return _Chained((entries, node, seq, prev, hashes, lines), 0, len(lines))


# What _Chained views: the entries, the node, the seq and hash of the record
# before the first, and each record's hash and line.
_Chain = tuple[Sequence[_Entry], str, int, str, list[str], list[bytes]]


@final
class _Chained(Sequence[AuditRecord]):
    """Records the writer chained, kept as their hashes and lines; records ``start`` to ``stop``.

    Most records are only ever written out as lines, so each
    :class:`AuditRecord` is built when a sink or a caller reads it. A slice
    is a view of the same records.
    """

    __slots__ = ("_chain", "_start", "_stop")

    def __init__(self, chain: _Chain, start: int, stop: int) -> None:
        self._chain, self._start, self._stop = chain, start, stop

    def __len__(self) -> int:
        return self._stop - self._start

    @overload
    def __getitem__(self, index: int) -> AuditRecord: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[AuditRecord]: ...
    def __getitem__(self, index: int | slice) -> AuditRecord | Sequence[AuditRecord]:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                return [self[i] for i in range(start, stop, step)]
            return _Chained(self._chain, self._start + start, self._start + max(start, stop))
        at = index + len(self) if index < 0 else index
        if not 0 <= at < len(self):
            raise IndexError("chained record index out of range")
        i = self._start + at
        entries, node, after, prev, hashes, lines = self._chain
        before = hashes[i - 1] if i else prev
        return AuditRecord._assemble(
            after + 1 + i, entries[i], node, prev=before, digest=hashes[i], line=lines[i]
        )

    @property
    def end(self) -> tuple[int, str]:
        """(seq, hash) of the view's last record (of the record before it, for an empty view)."""
        _, _, after, prev, hashes, _ = self._chain
        stop = self._stop
        return after + stop, hashes[stop - 1] if stop else prev

    def lines(self) -> bytes:
        """The records' canonical lines, concatenated."""
        lines = self._chain[5]
        if self._start == 0 and self._stop == len(lines):
            return lines[0] if len(lines) == 1 else b"".join(lines)
        return b"".join(lines[self._start : self._stop])


def joined_lines(records: Sequence[AuditRecord]) -> bytes:
    """The records' canonical lines (:meth:`AuditRecord.to_json_line`), concatenated.

    What a sink that stores lines writes; for the records the writer hands
    to sinks it costs one join, without building each record.
    """
    if isinstance(records, _Chained):
        return records.lines()
    return b"".join(record.to_json_line() for record in records)


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
        set_aside_lines: complete lines the log once held past its last good
            record that a start-up set aside (as its ``audit.recover``
            records say). A crash leaves at most a partial last line, so a
            complete line set aside means the end of the log was altered.
        hashes: every good record's hash, when asked for (see verify_chain).
    """

    ok: bool
    records: int
    first_bad: int | None = None
    reason: str | None = None
    last_hash: str = GENESIS
    set_aside_lines: int = 0
    hashes: frozenset[str] = frozenset()


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


def verify_chain(lines: Iterable[bytes], *, keep_hashes: bool = False) -> VerifyResult:
    """Check that lines form one unbroken chain starting at seq 1.

    Each line must end in ``b"\\n"``, parse as an audit record in canonical
    form, have a ``hash`` that recomputes, a ``seq`` one more than the line
    before (1 for the first) and ``prev`` equal to the previous record's hash
    (:data:`GENESIS` for the first).

    Args:
        lines: the log's lines as read from a binary file (newline included).
        keep_hashes: collect every good record's hash in ``hashes``.

    Returns:
        A :class:`VerifyResult`; ``first_bad`` is the 1-based line number.

    Note:
        A chain proves nothing about records cut off its *end*; compare
        ``last_hash`` with a copy kept elsewhere to detect that.
    """
    prev = GENESIS
    count = set_aside = 0
    hashes: set[str] = set()
    for number, line in enumerate(lines, start=1):
        record, reason = _parse_line(line)
        if record is not None and record.seq != count + 1:
            reason = f"seq is {record.seq}, expected {count + 1} (record missing, inserted or reordered)"
        elif record is not None and record.prev != prev:
            reason = "prev does not match the previous record's hash"
        if reason is not None or record is None:
            return VerifyResult(
                ok=False, records=count, first_bad=number, reason=reason, last_hash=prev,
                set_aside_lines=set_aside, hashes=frozenset(hashes),
            )
        if record.op == RECOVER_OP:
            lines_set_aside = record.details.get("set_aside_lines")
            set_aside += lines_set_aside if isinstance(lines_set_aside, int) else 0
        if keep_hashes:
            hashes.add(record.hash)
        prev = record.hash
        count += 1
    return VerifyResult(
        ok=True, records=count, last_hash=prev, set_aside_lines=set_aside, hashes=frozenset(hashes)
    )
