"""Hostile bytes against a real broker on its socket: every frame gets a code
from docs/protocol.md's table or only that connection is closed, the broker never
crashes, and a well-behaved client on another connection is served throughout."""

from __future__ import annotations

import itertools
import resource
import shutil
import socket
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import msgpack
import pytest
import trio
from hypothesis import HealthCheck, given, settings

from broker.client import AsyncClient, Client
from broker.server import ServerInfo
from tests._broker_process import BrokerProcess, broker_process

CODES = {
    "invalid_request",
    "unknown_method",
    "invalid_argument",
    "permission_denied",
    "not_found",
    "already_exists",
    "invalid_state",
    "decryption_failed",
    "limit_exceeded",
    "approval_required",
    "unavailable",
    "internal",
}
METHODS = ["encrypt", "decrypt", "key.create", "key.get", "encrypt_batch", "datakey", "sign", "nope", ""]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.binary(max_size=40),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=8), st.integers(-(2**63), 2**64 - 1)), inner, max_size=4),
    ),
    max_leaves=12,
)
frames = st.one_of(
    # Well-formed envelopes around hostile params.
    st.builds(
        lambda mid, m, p: msgpack.packb([0, mid, m, [p]], use_bin_type=True),
        st.integers(0, 2**32 - 1),
        st.sampled_from(METHODS),
        st.dictionaries(st.text(max_size=12), values, max_size=5),
    ),
    # Wrong shapes, msgids out of range, extension types.
    st.builds(lambda v: msgpack.packb(v, use_bin_type=True), values),
    st.builds(
        lambda mid, v: msgpack.packb([0, mid, "ping", v], use_bin_type=True),
        st.integers(-(2**63), 2**64 - 1),
        values,
    ),
    st.builds(
        lambda code, data: msgpack.packb([0, 1, "ping", [msgpack.ExtType(code, data)]]),
        st.integers(0, 127),
        st.binary(max_size=16),
    ),
    # Raw garbage, non-UTF-8 str, huge declared lengths, deep nesting.
    st.binary(max_size=200),
    st.builds(lambda b: b"\x94\x00\x01\xa4" + b + b"\x91\x80", st.binary(min_size=4, max_size=4)),
    st.sampled_from(
        [
            b"\x94\x00\x01\xa4ping\x91\xdb\xff\xff\xff\xff",  # str of 4 GiB declared
            b"\x94\x00\x01\xa4ping\x91\xdd\xff\xff\xff\xff",  # array of 4 Gi items declared
            b"\x94\x00\x01\xa4ping\x91\xc6\x7f\xff\xff\xff",  # bin of 2 GiB declared
            b"\x91" * 5000 + b"\xc0",  # nesting 5000 deep
        ]
    ),
)


def exchange(path: str, payload: bytes) -> list[Any]:
    """Send ``payload``, half-close, read every response until the broker closes."""
    out: list[Any] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            return out
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            unpacker.feed(data)
            out.extend(unpacker)
    return out


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.fixture(scope="module")
def broker() -> Iterator[BrokerProcess]:
    directory = Path(tempfile.mkdtemp(prefix="kb-", dir="/tmp"))
    try:
        with broker_process(directory) as running:
            yield running
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(payloads=st.lists(frames, min_size=1, max_size=4))
def test_hostile_frames(broker: BrokerProcess, payloads: list[bytes]) -> None:
    path = str(broker.socket_path)
    responses = exchange(path, b"".join(payloads))
    for response in responses:
        assert isinstance(response, list) and len(response) == 4 and response[0] == 1, response
        _, msgid, error, result = response
        assert isinstance(msgid, int) and 0 <= msgid < 2**32
        if error is not None:
            assert result is None and error["code"] in CODES, error
            assert error["code"] != "internal", error
    # The broker lives, and another connection is served.
    assert broker.alive()
    with Client(path) as client:
        assert client.ping()["protocol"] == 1


async def test_well_behaved_client_unaffected(served: ServerInfo) -> None:
    """A steady client keeps getting answers while hostile connections come and go."""
    path = str(served.socket_path)
    answered = 0
    before = rss_mib()
    async with AsyncClient(served.socket_path) as client:
        await client.key_create("steady", "aes256-gcm")

        async def steady() -> None:
            nonlocal answered
            while True:
                ct = (await client.encrypt("steady", b"ok"))["ciphertext"]
                assert (await client.decrypt(ct))["plaintext"] == b"ok"
                answered += 1
                await trio.sleep(0)

        hostile = [
            b"\xc1" * 10,
            b"\x94\x00\x01\xa4ping\x91\xdb\xff\xff\xff\xff",
            msgpack.packb([0, 2**32, "ping", [{}]]),
            b"\x91" * 5000,
            msgpack.packb([0, 1, "encrypt", [{"key": "steady", "plaintext": "str"}]]),
            struct.pack(">B", 0xC6) + b"\xff" * 4,
        ]
        progress: list[int] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(steady)
            for _ in range(20):
                for payload in hostile:
                    await trio.to_thread.run_sync(exchange, path, payload)
                progress.append(answered)
            nursery.cancel_scope.cancel()
    # The steady client was answered during every round of hostile connections.
    assert all(b > a for a, b in itertools.pairwise([0, *progress])), progress
    assert rss_mib() - before < 200
