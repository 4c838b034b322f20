"""broker.protocol: framing, request validation, limits, encoding."""

from __future__ import annotations

import tracemalloc

import msgpack
import pytest

from broker.protocol import (
    MAX_MSGID,
    BadRequest,
    Notification,
    ProtocolError,
    Request,
    RequestDecoder,
    Response,
    ResponseDecoder,
    encode_notification,
    encode_request,
    encode_response,
)


def frame(*items: object) -> bytes:
    return msgpack.packb(list(items), use_bin_type=True)


def test_request_decodes() -> None:
    dec = RequestDecoder(1024)
    assert dec.feed(encode_request(3, "encrypt", {"key": "k", "plaintext": b"\x00"})) == [
        Request(3, "encrypt", {"key": "k", "plaintext": b"\x00"})
    ]
    assert not dec.in_progress


def test_byte_at_a_time_and_many_per_feed() -> None:
    data = b"".join(encode_request(i, "m", {"i": i}) for i in range(50))
    dec = RequestDecoder(1024)
    events = []
    for byte in data:
        events.extend(dec.feed(bytes([byte])))
    assert [e.msgid for e in events] == list(range(50))  # type: ignore[union-attr]
    assert RequestDecoder(1024).feed(data) == events


def test_in_progress_tracks_partial_messages() -> None:
    dec = RequestDecoder(1024)
    whole = encode_request(1, "m", {})
    assert dec.feed(whole[:3]) == []
    assert dec.in_progress
    assert len(dec.feed(whole[3:] + whole[:1])) == 1
    assert dec.in_progress
    dec.feed(whole[1:])
    assert not dec.in_progress


@pytest.mark.parametrize(
    ("msg", "reason"),
    [
        ([0, 1, "m", {}], "params"),
        ([0, 1, "m", []], "params"),
        ([0, 1, "m", [{}, {}]], "params"),
        ([0, 1, "m", [None]], "params"),
        ([0, 1, None, [{}]], "method"),
        ([0, 1, b"m", [{}]], "method"),
        ([0, 1, "m"], "not a request"),
        ([2, 1, "m", [{}]], "not a request"),
        ([False, 1, "m", [{}]], "not a request"),
        ([0.0, 1, "m", [{}]], "not a request"),
        ([0, 1, "m", [{b"k": 1}]], "names"),
    ],
)
def test_bad_requests_keep_msgid(msg: list[object], reason: str) -> None:
    [event] = RequestDecoder(1024).feed(frame(*msg))
    assert isinstance(event, BadRequest)
    assert event.msgid == 1
    assert reason in event.reason


def test_undecodable_content_with_readable_msgid() -> None:
    # Invalid UTF-8 in the method; an int map key (strict_map_key).
    for data in (b"\x94\x00\x07\xa2\xff\xfe\x91\x80", frame(0, 7, "m", [{1: 2}])):
        [event] = RequestDecoder(1024).feed(data)
        assert event == BadRequest(7, event.reason)  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "data",
    [
        b"\xc1",
        frame(),
        frame(0),
        frame(0, -1, "m", [{}]),
        frame(0, MAX_MSGID + 1, "m", [{}]),
        frame(0, True, "m", [{}]),
        frame(0, 1.0, "m", [{}]),
        msgpack.packb({"a": 1}),
        msgpack.packb("str"),
        b"\x92\x00\xa2\xff\xfe",  # msgid slot holds invalid UTF-8
        b"\x91" * 5000,  # nesting past the unpacker's stack
    ],
)
def test_stream_errors(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        RequestDecoder(1 << 16).feed(data)


def test_size_limit_is_exact() -> None:
    at_limit = encode_request(1, "m", {"b": b"x" * 100})
    dec = RequestDecoder(len(at_limit))
    assert len(dec.feed(at_limit * 3)) == 3
    over = encode_request(1, "m", {"b": b"x" * 101})
    with pytest.raises(ProtocolError, match="too large"):
        RequestDecoder(len(at_limit)).feed(over)


def test_oversize_detected_before_the_rest_arrives() -> None:
    dec = RequestDecoder(64)
    # A bin header announcing 1 MiB: refused once 64 bytes are buffered,
    # not after a megabyte.
    head = b"\x94\x00\x01\xa1m\x91\x81\xa1b\xc6\x00\x10\x00\x00"
    dec.feed(head)
    with pytest.raises(ProtocolError):
        dec.feed(b"x" * 64)


def test_huge_declared_lengths_wait_for_bytes() -> None:
    dec = RequestDecoder(1 << 20)
    assert dec.feed(b"\x94\x00\x01\xa1m" + b"\xdd\x10\x00\x00\x00" * 100) == []
    assert dec.in_progress


@pytest.mark.parametrize("decoder", [RequestDecoder, ResponseDecoder])
def test_a_read_of_nested_headers_is_scanned_before_anything_is_built(decoder: type) -> None:
    """A read that fits the limit is not decoded outright: each of these
    array32 headers declares as many elements as the read has bytes, and a
    constructing unpacker would allocate for all of them at every level."""
    size, levels = 64 * 1024, 100
    bomb = (b"\xdd" + size.to_bytes(4, "big")) * levels
    dec = decoder(1 << 20)
    tracemalloc.start()
    try:
        assert dec.feed(bomb + b"\x00" * (size - len(bomb))) == []
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * size * 8  # not levels * size * 8 (about 50 MB)


def test_response_decoder() -> None:
    dec = ResponseDecoder(1024)
    data = encode_response(5, None, {"ok": b"\x01"}) + encode_notification("key.event", [{"name": "k"}])
    assert dec.feed(data) == [Response(5, None, {"ok": b"\x01"}), Notification("key.event", [{"name": "k"}])]
    with pytest.raises(ProtocolError):
        ResponseDecoder(1024).feed(frame(0, 1, "m", [{}]))


def test_encoding_keeps_bin_and_str_apart() -> None:
    raw = encode_response(1, None, {"s": "text", "b": b"bytes"})
    assert msgpack.unpackb(raw, raw=True) == [1, 1, None, {b"s": b"text", b"b": b"bytes"}]
    assert b"\xa4text" in raw
    assert b"\xc4\x05bytes" in raw
    with pytest.raises(TypeError):
        encode_response(1, None, object())
    # The shared packer is usable after a failure.
    assert msgpack.unpackb(encode_response(2, None, 1)) == [1, 2, None, 1]


def test_zero_limit_rejected() -> None:
    with pytest.raises(ValueError):
        RequestDecoder(0)
