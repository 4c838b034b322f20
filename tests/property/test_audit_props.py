"""broker.audit chain properties: every edit of a log is caught at the edited line."""

from __future__ import annotations

import io

from hypothesis import given, settings
from hypothesis import strategies as st

from broker._audit_chain import _chain_entries, _Entry
from broker.audit import GENESIS, AuditRecord, joined_lines, parse_valid_line, verify_chain

N = 6
TS = "2026-11-28T15:12:51.123456Z"

texts = st.text(max_size=20)
detail_values = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=30))
records_fields = st.fixed_dictionaries(
    {
        "principal": texts,
        "op": texts,
        "outcome": st.sampled_from(["allowed", "denied", "error", "recovered"]),
        "key": st.none() | texts,
        "version": st.none() | st.integers(min_value=1, max_value=2**32),
        "code": st.none() | texts,
        "alarm": st.booleans(),
        "details": st.dictionaries(texts, detail_values, max_size=4),
    }
)


def chain(fields_list: list[dict[str, object]]) -> list[AuditRecord]:
    records: list[AuditRecord] = []
    prev = GENESIS
    for seq, fields in enumerate(fields_list, start=1):
        record = AuditRecord.seal(seq=seq, prev=prev, ts=TS, node="n1", **fields)  # type: ignore[arg-type]
        records.append(record)
        prev = record.hash
    return records


def file_lines(data: bytes) -> list[bytes]:
    # Exactly how a binary file iterates: split after b"\n" only.
    return list(io.BytesIO(data))


def line_number_at(data: bytes, position: int) -> int:
    return data.count(b"\n", 0, position) + 1


# One fixed log for the tamper properties, with text that exercises escapes.
LOG = chain(
    [
        {"principal": f"uid:{i}", "op": "encrypt", "outcome": "allowed", "key": f"app/ключ-{i}",
         "version": i, "details": {"note": 'tab\tquote"\u2028', "n": i, "ok": True, "x": None}}
        for i in range(1, N + 1)
    ]
)
DATA = b"".join(r.to_json_line() for r in LOG)


@settings(max_examples=50)
@given(st.lists(records_fields, min_size=1, max_size=5))
def test_sealed_chains_verify_and_round_trip(fields_list: list[dict[str, object]]) -> None:
    records = chain(fields_list)
    lines = [r.to_json_line() for r in records]
    assert verify_chain(file_lines(b"".join(lines))).ok
    for record, line in zip(records, lines, strict=True):
        assert parse_valid_line(line) == record


def test_intact_log_verifies() -> None:
    result = verify_chain(file_lines(DATA))
    assert result.ok and result.records == N and result.last_hash == LOG[-1].hash


@settings(max_examples=300)
@given(st.data())
def test_any_single_byte_change_is_caught_at_its_line(data: st.DataObject) -> None:
    position = data.draw(st.integers(min_value=0, max_value=len(DATA) - 1), label="position")
    value = data.draw(st.integers(min_value=0, max_value=255).filter(lambda b: b != DATA[position]),
                      label="new byte")
    tampered = DATA[:position] + bytes([value]) + DATA[position + 1 :]
    result = verify_chain(file_lines(tampered))
    assert not result.ok
    assert result.first_bad == line_number_at(DATA, position)


@given(st.integers(min_value=0, max_value=N - 2))
def test_deleting_a_record_is_caught(index: int) -> None:
    lines = file_lines(DATA)
    del lines[index]
    result = verify_chain(lines)
    assert (result.ok, result.first_bad) == (False, index + 1)


def test_deleting_the_last_record_needs_an_anchor() -> None:
    # A chain cannot tell a shortened log from a younger one; what catches it
    # is comparing last_hash with a copy kept elsewhere.
    result = verify_chain(file_lines(DATA)[:-1])
    assert result.ok and result.records == N - 1
    assert result.last_hash != LOG[-1].hash


@given(st.lists(st.integers(min_value=0, max_value=N - 1), min_size=2, max_size=2, unique=True))
def test_swapping_two_records_is_caught(pair: list[int]) -> None:
    i, j = sorted(pair)
    lines = file_lines(DATA)
    lines[i], lines[j] = lines[j], lines[i]
    result = verify_chain(lines)
    assert (result.ok, result.first_bad) == (False, i + 1)


@given(st.integers(min_value=1, max_value=len(DATA) - 1))
def test_truncation_mid_line_is_caught(cut: int) -> None:
    result = verify_chain(file_lines(DATA[:cut]))
    if DATA[cut - 1 : cut] == b"\n":
        # Cut on a record boundary: indistinguishable from a shorter log (see above).
        assert result.ok and result.records == DATA.count(b"\n", 0, cut)
    else:
        assert not result.ok
        assert result.first_bad == line_number_at(DATA, cut - 1)
        assert result.reason is not None and "incomplete" in result.reason


@given(st.integers(min_value=0, max_value=N), st.sampled_from(LOG))
def test_inserting_a_copy_is_caught(index: int, copy: AuditRecord) -> None:
    genuine = file_lines(DATA)
    lines = [*genuine[:index], copy.to_json_line(), *genuine[index:]]
    result = verify_chain(lines)
    assert not result.ok
    # Named: the first line that differs from the genuine log (a copy put in
    # front of its own original only changes the line after it).
    first_diff = next(i for i, (a, b) in enumerate(zip(lines, [*genuine, b""], strict=True)) if a != b)
    assert result.first_bad == first_diff + 1


@settings(max_examples=100)
@given(
    st.lists(records_fields, min_size=1, max_size=4), st.integers(min_value=0, max_value=2**63), st.booleans()
)
def test_writer_encoding_equals_the_canonical_one(
    fields_list: list[dict[str, object]], after: int, plain: bool
) -> None:
    # The writer's hand-written encoder must produce exactly the bytes (and so
    # the hash) that json.dumps(sort_keys=True) gives and verification expects,
    # also for records of a shape it has seen (their parts are kept then).
    if plain:
        fields_list = [{**fields, "details": {}} for fields in fields_list] * 2
    entries = [
        _Entry(ts=TS, **{**fields, "details": dict(fields["details"])})  # type: ignore[arg-type]
        for fields in fields_list
    ]
    chained = _chain_entries(entries, "n1", after, GENESIS)
    prev = GENESIS
    sealed = []
    for at, fields in enumerate(fields_list, start=after + 1):
        sealed.append(AuditRecord.seal(seq=at, prev=prev, ts=TS, node="n1", **fields))  # type: ignore[arg-type]
        prev = sealed[-1].hash
    assert list(chained) == sealed
    assert joined_lines(chained) == b"".join(record.to_json_line() for record in sealed)
    assert chained.end == (after + len(sealed), sealed[-1].hash)
    for record in chained:
        assert parse_valid_line(record.to_json_line()) == record
    # A view (what callers get back) holds the same records.
    tail = chained[1:]
    assert list(tail) == sealed[1:] and joined_lines(tail) == b"".join(r.to_json_line() for r in sealed[1:])
    assert tail.end == chained.end  # an empty view ends where the records before it do
