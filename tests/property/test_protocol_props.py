"""Hypothesis: the request decoder has exactly its documented outcomes."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.protocol import (
    MAX_MSGID,
    BadRequest,
    ProtocolError,
    Request,
    RequestDecoder,
    Response,
    ResponseDecoder,
    encode_request,
    encode_response,
)

SETTINGS = settings(max_examples=200, deadline=None)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=40)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20,
)
any_keys_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(
            st.text(max_size=4) | st.binary(max_size=4) | st.integers(-(2**63), 2**64 - 1), inner, max_size=4
        )
    ),
    max_leaves=20,
)
params = st.dictionaries(st.text(max_size=10), values, max_size=6)
msgids = st.integers(min_value=0, max_value=MAX_MSGID)


def decode_all(data: bytes, limit: int, chunk: int) -> list[Request | BadRequest] | ProtocolError:
    dec = RequestDecoder(limit)
    out: list[Request | BadRequest] = []
    try:
        for i in range(0, len(data), chunk):
            out.extend(dec.feed(data[i : i + chunk]))
    except ProtocolError as exc:
        return exc
    return out


@SETTINGS
@given(st.binary(max_size=300), st.integers(1, 64), st.integers(1, 400))
def test_raw_bytes_only_documented_outcomes(data: bytes, chunk: int, limit: int) -> None:
    result = decode_all(data, limit, chunk)
    if not isinstance(result, ProtocolError):
        for event in result:
            assert isinstance(event, Request | BadRequest)
            assert 0 <= event.msgid <= MAX_MSGID


@SETTINGS
@given(st.lists(any_keys_values, max_size=5), st.integers(min_value=1, max_value=32))
def test_arbitrary_msgpack_values(items: list[Any], chunk: int) -> None:
    data = b"".join(msgpack.packb(v, use_bin_type=True) for v in items)
    result = decode_all(data, 1 << 20, chunk)
    if isinstance(result, ProtocolError):
        return
    assert len(result) == len(items)
    for event, item in zip(result, items, strict=True):
        assert isinstance(item, list)
        assert event.msgid == item[1]
        if isinstance(event, Request):
            assert item == [0, event.msgid, event.method, [event.params]]


@SETTINGS
@given(st.lists(st.tuples(msgids, st.text(max_size=12), params), max_size=8), st.integers(1, 50))
def test_request_round_trip(requests: list[tuple[int, str, dict[str, Any]]], chunk: int) -> None:
    data = b"".join(encode_request(m, name, p) for m, name, p in requests)
    assert decode_all(data, 1 << 20, chunk) == [Request(m, name, p) for m, name, p in requests]


@SETTINGS
@given(st.lists(st.tuples(msgids, values), max_size=8), st.integers(1, 50))
def test_response_round_trip(responses: list[tuple[int, Any]], chunk: int) -> None:
    data = b"".join(encode_response(m, None, v) for m, v in responses)
    dec = ResponseDecoder(1 << 20)
    got = []
    for i in range(0, len(data), chunk):
        got.extend(dec.feed(data[i : i + chunk]))
    assert got == [Response(m, None, v) for m, v in responses]


@SETTINGS
@given(st.lists(st.tuples(msgids, params), min_size=1, max_size=5), st.integers(1, 300))
def test_size_limit_exact(requests: list[tuple[int, dict[str, Any]]], limit: int) -> None:
    frames = [encode_request(m, "m", p) for m, p in requests]
    result = decode_all(b"".join(frames), limit, 7)
    first_big = next((i for i, f in enumerate(frames) if len(f) > limit), None)
    if first_big is None:
        assert isinstance(result, list)
        assert len(result) == len(frames)
    else:
        assert isinstance(result, ProtocolError)


@SETTINGS
@given(
    st.lists(st.tuples(msgids, st.text(max_size=12), params), min_size=1, max_size=6),
    st.sampled_from(
        [
            b"\xc1",  # never valid msgpack
            msgpack.packb({"a": 1}),  # a message with no msgid
            b"\x91" * 5000,  # nesting past the unpacker's stack
            encode_request(1, "m", {"b": b"x" * 5000}),  # over the limit
        ]
    ),
    st.integers(1, 64),
)
def test_requests_before_bad_bytes_are_still_decoded(
    requests: list[tuple[int, str, dict[str, Any]]], bad: bytes, chunk: int
) -> None:
    """Whatever the chunking, every request complete before the bad bytes
    comes out, from the feeds before the error or on the error itself."""
    data = b"".join(encode_request(m, name, p) for m, name, p in requests)
    dec = RequestDecoder(len(data) + 1024)
    out: list[Request | BadRequest] = []
    stream = data + bad
    with pytest.raises(ProtocolError) as info:
        for i in range(0, len(stream), chunk):
            out.extend(dec.feed(stream[i : i + chunk]))
        dec.feed(b"\xc1")  # bad bytes that a partial message absorbed: end it
    out.extend(info.value.events)
    assert out[: len(requests)] == [Request(m, name, p) for m, name, p in requests]


def decode_chunks(chunks: list[bytes], limit: int) -> tuple[list[Request | BadRequest], str | None]:
    """Events decoded from ``chunks`` fed in turn, and the reason of the error that stopped it."""
    dec = RequestDecoder(limit)
    out: list[Request | BadRequest] = []
    for chunk in chunks:
        try:
            out.extend(dec.feed(chunk))
        except ProtocolError as exc:
            return out, exc.reason
    return out, None


@SETTINGS
@given(
    st.lists(
        st.builds(encode_request, msgids, st.text(max_size=12), params)
        | any_keys_values.map(lambda v: msgpack.packb(v, use_bin_type=True)),
        max_size=6,
    ),
    st.integers(1, 400),
)
def test_one_message_per_read_decodes_as_byte_by_byte(messages: list[bytes], limit: int) -> None:
    """A read holding exactly one message takes a shorter path; it must agree with the general one.

    Each chunk is one whole msgpack value (a request or anything else), so
    feeding them in turn exercises the shorter path, and feeding the stream
    a byte at a time the general one.
    """
    data = b"".join(messages)
    byte_by_byte = decode_chunks([data[i : i + 1] for i in range(len(data))], limit)
    assert decode_chunks(messages, limit) == byte_by_byte
