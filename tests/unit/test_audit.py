"""broker.audit: record encoding, chain verification, and the AuditLog over in-memory sinks."""

from __future__ import annotations

import errno
import io
import json
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import pytest
import trio

from broker._audit_chain import _SHAPES, MAX_SHAPES, _chain_entries, _Entry
from broker.audit import (
    AUDIT_FILE_NAME,
    CLOSE_TIMEOUT_S,
    GENESIS,
    AuditRecord,
    ChainHead,
    audit_verify_main,
    chain_hash,
    joined_lines,
    open_audit_log,
    parse_valid_line,
    verify_chain,
)
from broker.errors import Unavailable

TS = "2026-11-28T15:12:51.123456Z"
T0 = 1795878771.123456  # TS as Unix time


def make_chain(n: int, **overrides: object) -> list[AuditRecord]:
    records: list[AuditRecord] = []
    prev = GENESIS
    for seq in range(1, n + 1):
        fields: dict[str, object] = {
            "seq": seq, "prev": prev, "ts": TS, "node": "n1", "principal": "uid:1000", "op": "encrypt",
            "outcome": "allowed", "key": "app/k1", "version": 1, "details": {"items": seq},
        }
        fields.update(overrides)
        record = AuditRecord.seal(**fields)  # type: ignore[arg-type]
        records.append(record)
        prev = record.hash
    return records


def lines_of(records: Sequence[AuditRecord]) -> list[bytes]:
    return [r.to_json_line() for r in records]


class MemorySink:
    """A primary (or not) sink that keeps lines in memory and can be told to fail."""

    def __init__(self, name: str = "memory", *, primary: bool = True, head: ChainHead | None = None) -> None:
        self.name = name
        self.primary = primary
        self.head = head or ChainHead(seq=0, hash=GENESIS)
        self.lines: list[bytes] = []
        self.batches: list[int] = []
        self.fail = False
        self.closed = False

    async def open(self) -> ChainHead | None:
        return self.head if self.primary else None

    async def write(self, records: Sequence[AuditRecord]) -> None:
        # A checkpoint stands in for the fsync: other callers queue meanwhile.
        await trio.sleep(0.001)
        if self.fail:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.lines.extend(r.to_json_line() for r in records)
        self.batches.append(len(records))

    async def aclose(self) -> None:
        self.closed = True


class HangingSink(MemorySink):
    async def write(self, records: Sequence[AuditRecord]) -> None:
        await trio.sleep_forever()


# --- records ------------------------------------------------------------------


def test_canonical_line() -> None:
    (record,) = make_chain(1, principal="ünï", details={"b": True, "a": None})
    line = record.to_json_line()
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert b" " not in line
    assert "ünï".encode() in line  # ensure_ascii=False
    obj = json.loads(line)
    assert list(obj) == sorted(obj)
    assert list(obj["details"]) == ["a", "b"]
    assert AuditRecord.from_json(obj) == record


def test_kept_record_shapes_are_bounded_and_stay_exact() -> None:
    # The writer keeps the encoded parts of records without details by who
    # did what to which key; many distinct ones must neither grow that
    # without bound nor change a record's bytes.
    prev = GENESIS
    for seq in range(1, MAX_SHAPES + 50):
        entry = _Entry(TS, f"uid:{seq}", "encrypt", "allowed", "k", 1, None, False, {})
        (chained,) = _chain_entries([entry], "n1", seq - 1, prev)
        if seq % 500 == 0 or seq > MAX_SHAPES - 2:
            sealed = AuditRecord.seal(seq=seq, prev=prev, ts=TS, node="n1", principal=f"uid:{seq}",
                                      op="encrypt", outcome="allowed", key="k", version=1)
            assert chained.to_json_line() == sealed.to_json_line()
        assert len(_SHAPES) <= MAX_SHAPES
        prev = chained.hash


def test_chained_records_read_like_a_list_of_records() -> None:
    entries = [_Entry(TS, f"uid:{i}", "encrypt", "allowed", "k", 1, None, False, {}) for i in range(5)]
    chained = _chain_entries(entries, "n1", 10, GENESIS)
    records = list(chained)
    assert [r.seq for r in records] == [11, 12, 13, 14, 15]
    assert [r.prev for r in records[1:]] == [r.hash for r in records[:-1]] and records[0].prev == GENESIS
    assert chained[-1] == records[-1] and chained[-5] == records[0]
    for bad in (5, -6):
        with pytest.raises(IndexError):
            chained[bad]
    assert chained[::2] == records[::2]
    view = chained[1:3]
    assert list(view) == records[1:3] and view[-1] == records[2] and len(view) == 2
    assert list(view[1:]) == records[2:3] and view.end == (13, records[2].hash)  # type: ignore[attr-defined]
    empty = chained[2:2]
    assert len(empty) == 0 and empty.end == (12, records[1].hash)  # type: ignore[attr-defined]
    assert joined_lines(view) == records[1].to_json_line() + records[2].to_json_line()
    assert joined_lines(records) == joined_lines(chained)
    assert records[3] in chained and chained.index(records[3]) == 3


def test_records_are_hashable_by_chain_hash() -> None:
    a, b = make_chain(2)
    assert len({a, b, AuditRecord.from_json(a.to_dict())}) == 2


def test_chain_hash_covers_every_field_but_hash() -> None:
    (record,) = make_chain(1)
    fields = record.to_dict()
    assert chain_hash(fields) == record.hash == record.expected_hash()
    fields["prev"] = "1" * 64
    assert chain_hash(fields) != record.hash
    del fields["hash"]
    fields["prev"] = GENESIS
    assert chain_hash(fields) == record.hash


@pytest.mark.parametrize("value", [b"secret", bytearray(b"x"), memoryview(b"x")])
def test_binary_details_refused(value: object) -> None:
    with pytest.raises(TypeError, match="binary"):
        make_chain(1, details={"k": value})


@pytest.mark.parametrize("value", [1.5, {"nested": 1}, [1], object()])
def test_non_scalar_details_refused(value: object) -> None:
    with pytest.raises(TypeError):
        make_chain(1, details={"k": value})


def test_details_limits_and_freezing() -> None:
    with pytest.raises(ValueError):
        make_chain(1, details={f"k{i}": i for i in range(100)})
    with pytest.raises(ValueError):
        make_chain(1, details={"k": "x" * 5000})
    with pytest.raises(TypeError):
        make_chain(1, details={1: "x"})
    with pytest.raises(ValueError):
        make_chain(1, principal="\ud800")  # lone surrogate: not encodable as UTF-8
    source = {"k": "v"}
    (record,) = make_chain(1, details=source)
    source["k"] = "changed"
    assert record.details["k"] == "v"
    with pytest.raises(TypeError):
        record.details["k"] = "x"  # type: ignore[index]


def test_field_validation() -> None:
    (record,) = make_chain(1)
    fields = record.to_dict()
    for name, bad in [("seq", 0), ("ts", "yesterday"), ("prev", "x" * 64), ("hash", "A" * 64)]:
        with pytest.raises(ValueError):
            AuditRecord(**{**fields, name: bad})
    for name, bad in [("seq", True), ("version", "1"), ("alarm", 1), ("key", b"k")]:
        with pytest.raises(TypeError):
            AuditRecord(**{**fields, name: bad})
    with pytest.raises(ValueError, match="missing"):
        AuditRecord.from_json({k: v for k, v in fields.items() if k != "node"})
    with pytest.raises(ValueError, match="unexpected"):
        AuditRecord.from_json({**fields, "plaintext": "x"})


def test_parse_valid_line() -> None:
    (record,) = make_chain(1)
    line = record.to_json_line()
    assert parse_valid_line(line) == record
    assert parse_valid_line(line[:-1]) is None
    assert parse_valid_line(line.replace(b"encrypt", b"decrypt")) is None
    assert parse_valid_line(b"not json\n") is None


# --- verify_chain ---------------------------------------------------------------


def test_intact_chain_verifies() -> None:
    records = make_chain(5)
    result = verify_chain(lines_of(records))
    assert result.ok and result.records == 5 and result.first_bad is None
    assert result.last_hash == records[-1].hash
    assert verify_chain([]).ok


@pytest.mark.parametrize(
    ("mutate", "first_bad", "reason"),
    [
        (lambda ls: ls[:2] + ls[3:], 3, "seq is 4, expected 3"),  # delete record 3
        (lambda ls: [ls[0], ls[2], ls[1], *ls[3:]], 2, "seq is 3, expected 2"),  # swap 2 and 3
        (lambda ls: [*ls[:3], ls[3].replace(b"uid:1000", b"uid:1001"), ls[4]], 4, "hash does not match"),
        (lambda ls: [*ls[:4], ls[4][:-1]], 5, "incomplete line"),
        (lambda ls: [*ls[:1], b"\n", *ls[1:]], 2, "not an audit record"),
        (lambda ls: [*ls[:2], ls[2].replace(b'"seq":3', b'"seq": 3'), *ls[3:]], 3, "canonical"),
    ],
)
def test_broken_chains_name_the_first_bad_line(
    mutate: Callable[[list[bytes]], list[bytes]], first_bad: int, reason: str
) -> None:
    result = verify_chain(mutate(lines_of(make_chain(5))))
    assert not result.ok
    assert result.first_bad == first_bad
    assert result.records == first_bad - 1
    assert reason in (result.reason or "")


def test_rechained_record_with_wrong_prev() -> None:
    records = make_chain(3)
    fields = records[2].to_dict()
    del fields["hash"]
    fields["prev"] = records[0].hash  # self-consistent, but linked to the wrong record
    forged = AuditRecord.seal(**fields)
    result = verify_chain([*lines_of(records[:2]), forged.to_json_line()])
    assert (result.first_bad, result.reason) == (3, "prev does not match the previous record's hash")


# --- audit_verify_main ------------------------------------------------------------


def test_audit_verify_main(tmp_path: Path) -> None:
    out = io.StringIO()
    assert audit_verify_main(tmp_path, out) == 2
    assert "no audit log" in out.getvalue()
    audit_dir = tmp_path / "audit"
    audit_dir.mkdir()
    lines = lines_of(make_chain(4))
    (audit_dir / AUDIT_FILE_NAME).write_bytes(b"".join(lines))
    out = io.StringIO()
    assert audit_verify_main(tmp_path, out) == 0
    assert out.getvalue().startswith("audit chain intact: 4 records\n")
    (audit_dir / AUDIT_FILE_NAME).write_bytes(b"".join([lines[0], lines[2], lines[3]]))
    out = io.StringIO()
    assert audit_verify_main(tmp_path, out) == 1
    assert out.getvalue().startswith("audit chain broken at record/line 2: seq is 3")


# --- AuditLog ---------------------------------------------------------------------


async def test_record_returns_durable_chained_records() -> None:
    sink = MemorySink()
    async with open_audit_log([sink], node="n1", clock=lambda: T0) as log:
        first = await log.record(principal="uid:1", op="key.create", outcome="allowed", key="k", version=1)
        second = await log.record(principal="uid:2", op="encrypt", outcome="denied", key="k",
                                  code="permission_denied", details={"rule": "deny-default"})
        assert sink.lines == [first.to_json_line(), second.to_json_line()]
        assert log.head == (2, second.hash)
    # The writer's fast path builds exactly what the checked constructor would.
    for record in (first, second):
        assert AuditRecord.from_json(json.loads(record.to_json_line())) == record
        assert record.expected_hash() == record.hash
        with pytest.raises(TypeError):
            record.details["x"] = 1  # type: ignore[index]
    assert (first.seq, first.prev, first.ts, first.node) == (1, GENESIS, TS, "n1")
    assert (second.seq, second.prev, second.code) == (2, first.hash, "permission_denied")
    assert verify_chain(sink.lines).ok
    assert sink.closed


async def test_group_commit() -> None:
    sink = MemorySink()
    n = 50
    async with open_audit_log([sink], node="n1") as log:

        async def one(i: int) -> None:
            record = await log.record(principal=f"uid:{i}", op="encrypt", outcome="allowed")
            # Durable on return: the record is already in the sink.
            assert record.to_json_line() in sink.lines

        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(one, i)
    assert sum(sink.batches) == n
    assert len(sink.batches) < n
    assert log.writes == len(sink.batches)
    assert verify_chain(sink.lines).ok


async def test_concurrent_records_are_chained_in_call_order() -> None:
    sink = MemorySink()
    async with open_audit_log([sink], node="n1") as log:
        results: dict[int, AuditRecord] = {}

        async def one(i: int) -> None:
            results[i] = await log.record(principal="p", op=f"op{i}", outcome="allowed")

        async with trio.open_nursery() as nursery:
            for i in range(10):
                nursery.start_soon(one, i)
                await trio.sleep(0)  # makes the call order deterministic
    assert [results[i].seq for i in range(10)] == list(range(1, 11))


async def test_primary_failure_is_unavailable_then_recovers() -> None:
    sink = MemorySink()
    async with open_audit_log([sink], node="n1") as log:
        ok = await log.record(principal="p", op="a", outcome="allowed")
        sink.fail = True
        with pytest.raises(Unavailable, match="audit log unavailable"):
            await log.record(principal="p", op="b", outcome="allowed")

        async def doomed() -> None:
            with pytest.raises(Unavailable):
                await log.record(principal="p", op="c", outcome="allowed")

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(doomed)
        assert not log.healthy
        assert log.head == (1, ok.hash)  # nothing unwritten was chained onto
        sink.fail = False
        again = await log.record(principal="p", op="d", outcome="allowed")
        assert log.healthy
    assert (again.seq, again.prev) == (2, ok.hash)
    assert verify_chain(sink.lines).ok


async def test_hanging_secondary_never_delays_record(autojump_clock: trio.testing.MockClock) -> None:
    primary = MemorySink()
    hanging = HangingSink("siem", primary=False)
    async with open_audit_log([hanging, primary], node="n1") as log:
        with trio.fail_after(1):
            for i in range(20):
                await log.record(principal="p", op=f"op{i}", outcome="allowed")
        assert log.sink_gaps == {"siem": 0}  # still queued, not yet lost
    assert len(primary.lines) == 20
    assert hanging.closed
    assert log.sink_gaps["siem"] == 20  # cancelled at close: in its write or still queued


class StuckClosing(MemorySink):
    async def aclose(self) -> None:
        await trio.sleep_forever()


async def test_a_sink_that_hangs_closing_costs_no_other_its_close(
    autojump_clock: trio.testing.MockClock,
) -> None:
    primary, after = MemorySink(), MemorySink("after", primary=False)
    stuck = StuckClosing("stuck", primary=False)
    started = trio.current_time()
    async with open_audit_log([primary, stuck, after], node="n1") as log:
        await log.record(principal="p", op="a", outcome="allowed")
    assert primary.closed and after.closed
    assert trio.current_time() - started <= CLOSE_TIMEOUT_S + 1  # one timeout, not one per sink


async def test_failing_secondary_counts_gaps_and_gets_same_records() -> None:
    primary = MemorySink()
    mirror = MemorySink("mirror", primary=False)
    broken = MemorySink("broken", primary=False)
    broken.fail = True
    async with open_audit_log([primary, mirror, broken], node="n1") as log:
        for i in range(5):
            await log.record(principal="p", op=f"op{i}", outcome="allowed")
    assert mirror.lines == primary.lines
    assert log.sink_gaps == {"mirror": 0, "broken": 5}
    assert log.healthy


@pytest.mark.parametrize("primaries", [0, 2])
async def test_exactly_one_primary(primaries: int) -> None:
    sinks = [MemorySink(f"s{i}", primary=i < primaries) for i in range(3)]
    with pytest.raises(ValueError, match="exactly one"):
        async with open_audit_log(sinks, node="n1"):
            pass


async def test_torn_tail_note_is_first_record() -> None:
    (previous,) = make_chain(1)
    head = ChainHead(seq=1, hash=previous.hash, set_aside_bytes=17, set_aside_path="/d/audit/torn-1.bin")
    sink = MemorySink(head=head)
    async with open_audit_log([sink], node="n1") as log:
        await log.record(principal="p", op="encrypt", outcome="allowed")
    note = AuditRecord.from_json(json.loads(sink.lines[0]))
    assert (note.seq, note.prev, note.op, note.outcome, note.principal) == (
        2, previous.hash, "audit.recover", "recovered", "keybroker")
    assert note.details["set_aside_bytes"] == 17
    assert note.details["set_aside_to"] == "/d/audit/torn-1.bin"
    assert not note.alarm
    assert verify_chain([previous.to_json_line(), *sink.lines]).ok


async def test_torn_tail_note_retried_after_failed_write() -> None:
    head = ChainHead(seq=0, hash=GENESIS, set_aside_bytes=5, set_aside_path="x", set_aside_lines=2)
    sink = MemorySink(head=head)
    sink.fail = True
    async with open_audit_log([sink], node="n1") as log:
        assert not log.healthy
        sink.fail = False
        record = await log.record(principal="p", op="encrypt", outcome="allowed")
    assert record.seq == 2
    note = AuditRecord.from_json(json.loads(sink.lines[0]))
    assert note.op == "audit.recover" and note.alarm  # complete lines set aside: not just a crash
    assert verify_chain(sink.lines).ok


async def test_cancelled_caller_keeps_chain_consistent() -> None:
    sink = MemorySink()
    async with open_audit_log([sink], node="n1") as log:
        with trio.CancelScope() as scope:
            scope.cancel()
            await log.record(principal="p", op="cancelled", outcome="allowed")
        assert scope.cancelled_caught
        await log.record(principal="p", op="after", outcome="allowed")
    ops = [json.loads(line)["op"] for line in sink.lines]
    assert ops == ["cancelled", "after"]  # queued before the checkpoint, so still written
    assert verify_chain(sink.lines).ok


async def test_record_argument_checks_and_closed_log() -> None:
    sink = MemorySink()
    async with open_audit_log([sink], node="n1") as log:
        with pytest.raises(TypeError):
            await log.record(principal="p", op="x", outcome="allowed", details={"ct": b"\x00"})  # type: ignore[dict-item]
        with pytest.raises(TypeError):
            await log.record(principal="p", op="x", outcome="allowed", version="2")  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            await log.record(principal=b"p", op="x", outcome="allowed")  # type: ignore[arg-type]
    assert sink.lines == []
    with pytest.raises(Unavailable):
        await log.record(principal="p", op="x", outcome="allowed")


async def test_body_exception_is_not_wrapped() -> None:
    sink = MemorySink()
    with pytest.raises(KeyError):
        async with open_audit_log([sink], node="n1") as log:
            await log.record(principal="p", op="x", outcome="allowed")
            raise KeyError("boom")
    assert sink.closed and len(sink.lines) == 1


async def test_cancelled_body_drains_queue_and_closes(autojump_clock: trio.testing.MockClock) -> None:
    sink = MemorySink()
    with trio.move_on_after(5) as scope:
        async with open_audit_log([sink], node="n1") as log, trio.open_nursery() as nursery:
            for i in range(5):
                nursery.start_soon(partial(log.record, principal="p", op=f"op{i}", outcome="allowed"))
            await trio.sleep_forever()
    assert scope.cancelled_caught  # plain Cancelled reached its scope: no ExceptionGroup
    assert sink.closed
    assert len(sink.lines) == 5
    assert verify_chain(sink.lines).ok


class OpenCancelledSink(MemorySink):
    async def open(self) -> ChainHead | None:
        await trio.lowlevel.cancel_shielded_checkpoint()  # the blocking half ran...
        await trio.sleep_forever()  # ...and the cancel arrives afterwards
        raise AssertionError


async def test_sink_closed_when_open_is_cancelled() -> None:
    sink = OpenCancelledSink()
    with trio.move_on_after(0.01):
        async with open_audit_log([sink], node="n1"):
            raise AssertionError("not reached")
    assert sink.closed


class SlowSink(MemorySink):
    async def write(self, records: Sequence[AuditRecord]) -> None:
        await trio.sleep(1)
        await super().write(records)


async def test_queued_records_are_written_on_cancellation(autojump_clock: trio.testing.MockClock) -> None:
    sink = SlowSink()
    with trio.move_on_after(0.5):
        async with open_audit_log([sink], node="n1") as log, trio.open_nursery() as nursery:
            for i in range(5):
                nursery.start_soon(partial(log.record, principal="p", op=f"op{i}", outcome="allowed"))
                await trio.sleep(0.01)  # the first write is in progress, the rest queue behind it
            await trio.sleep_forever()
    # The callers were cancelled, but what they queued was drained on close.
    assert [json.loads(line)["op"] for line in sink.lines] == [f"op{i}" for i in range(5)]
    assert sink.batches == [1, 4]
    assert verify_chain(sink.lines).ok
