"""The msgpack-rpc transport over real Unix sockets, with a small test handler."""

from __future__ import annotations

import functools
import os
import signal
import socket
import stat
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio

from broker.client import AsyncClient, Client, ConnectionLost
from broker.config import Config
from broker.connection import RESPONSE_BACKLOG_FLOOR
from broker.errors import InvalidState, NotFound, UnknownMethod
from broker.protocol import Notification, Response, encode_request
from broker.server import ServerInfo, serve
from tests._transport_helpers import EchoHandler, RawConn, make_config, running_server, short_tmpdir


@pytest.fixture
def tmpdir_short() -> Iterator[Path]:
    with short_tmpdir() as path:
        yield path


@pytest.fixture
def handler() -> EchoHandler:
    return EchoHandler()


@pytest.fixture
def limits() -> dict[str, Any]:
    return {}


@pytest.fixture
def config(tmpdir_short: Path, limits: dict[str, Any]) -> Config:
    return make_config(tmpdir_short, **limits)


@pytest.fixture
async def server(config: Config, handler: EchoHandler) -> AsyncIterator[ServerInfo]:
    async with running_server(config, handler) as info:
        yield info


async def test_happy_path_and_socket_mode(server: ServerInfo) -> None:
    assert stat.S_IMODE(os.stat(server.socket_path).st_mode) == 0o660
    conn = await RawConn.open(server.socket_path)
    resp = await conn.call(7, "echo", {"a": b"\x00\x01", "s": "x"})
    assert (resp.msgid, resp.error, resp.result) == (7, None, {"a": b"\x00\x01", "s": "x"})


async def test_pipelined_requests_come_back_out_of_order(server: ServerInfo) -> None:
    conn = await RawConn.open(server.socket_path)
    await conn.send(
        msgpack.packb([0, 1, "sleep", [{"s": 0.3}]])
        + msgpack.packb([0, 2, "sleep", [{"s": 0.1}]])
        + msgpack.packb([0, 3, "echo", [{}]])
    )
    with trio.fail_after(5):
        order = [r.msgid for r in await conn.responses(3)]
    assert order == [3, 2, 1]


@pytest.mark.parametrize("limits", [{"max_inflight_per_connection": 4}])
async def test_inflight_bound_stops_reading(server: ServerInfo, handler: EchoHandler) -> None:
    conn = await RawConn.open(server.socket_path)
    await conn.send(b"".join(msgpack.packb([0, i, "gate", [{}]]) for i in range(20)))
    await trio.sleep(0.2)
    assert handler.max_active == 4
    assert handler.started == 4
    handler.gate.set()
    with trio.fail_after(5):
        got = sorted(r.msgid for r in await conn.responses(20))
    assert got == list(range(20))
    assert handler.max_active == 4


@pytest.mark.parametrize(
    ("frame", "msgid"),
    [
        ([0, 5, "echo", {}], 5),  # params not an array
        ([0, 6, "echo", []], 6),  # no params map
        ([0, 7, "echo", [{}, {}]], 7),  # two maps
        ([0, 8, "echo", [1]], 8),  # not a map
        ([0, 9, 42, [{}]], 9),  # method not a string
        ([0, 10, b"echo", [{}]], 10),  # method is bin, not str
        ([0, 11, "echo"], 11),  # three elements
        ([0, 12, "echo", [{}], 1], 12),  # five elements
        ([1, 13, None, None], 13),  # a response sent to the server
        ([0, 14, "echo", [{1: 2}]], 14),  # non-string keys
        ([0, 15, "echo", [{b"k": 1}]], 15),  # bin keys
        ([True, 16, "echo", [{}]], 16),  # type is a bool
        ([0, 2**32 - 1, "echo", [[]]], 2**32 - 1),  # largest msgid
    ],
)
async def test_invalid_frames_get_invalid_request(server: ServerInfo, frame: list[Any], msgid: int) -> None:
    conn = await RawConn.open(server.socket_path)
    await conn.send(msgpack.packb(frame))
    resp = await conn.response()
    assert resp.msgid == msgid
    assert resp.error["code"] == "invalid_request"
    assert resp.result is None
    # The connection stays usable.
    assert (await conn.call(99, "echo", {"ok": 1})).result == {"ok": 1}


async def test_non_utf8_string_with_readable_msgid(server: ServerInfo) -> None:
    conn = await RawConn.open(server.socket_path)
    # [0, 21, "\xff\xfe", [{}]] with an invalid UTF-8 method name.
    await conn.send(b"\x94\x00\x15\xa2\xff\xfe\x91\x80")
    resp = await conn.response()
    assert (resp.msgid, resp.error["code"]) == (21, "invalid_request")


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\xc1garbage", id="never-used-byte"),
        pytest.param(msgpack.packb({"not": "an array"}), id="map"),
        pytest.param(msgpack.packb(17), id="int"),
        pytest.param(msgpack.packb([0]), id="no-msgid"),
        pytest.param(msgpack.packb([0, -1, "echo", [{}]]), id="negative-msgid"),
        pytest.param(msgpack.packb([0, 2**32, "echo", [{}]]), id="msgid-over-uint32"),
        pytest.param(msgpack.packb([0, "1", "echo", [{}]]), id="msgid-str"),
        pytest.param(b"\x94\x00\xa2\xff\xfe\xa1x\x91\x80", id="non-utf8-msgid-position"),
    ],
)
async def test_undecodable_streams_close_only_that_connection(server: ServerInfo, data: bytes) -> None:
    good = await RawConn.open(server.socket_path)
    bad = await RawConn.open(server.socket_path)
    await bad.send(data)
    with trio.fail_after(5):
        await bad.expect_closed()
    assert (await good.call(1, "echo", {"still": "here"})).result == {"still": "here"}


@pytest.mark.parametrize("apart", [False, True], ids=["one-write", "bad-bytes-later"])
async def test_requests_before_undecodable_bytes_are_answered_then_the_connection_closes(
    server: ServerInfo, apart: bool
) -> None:
    conn = await RawConn.open(server.socket_path)
    first = encode_request(1, "echo", {"n": 1}) + encode_request(2, "sleep", {"s": 0.2})
    if apart:
        await conn.send(first)
        await trio.sleep(0.05)  # the sleep is running when the bad bytes come
        await conn.send(b"\xc1garbage")
    else:
        await conn.send(first + b"\xc1garbage")
    with trio.fail_after(5):
        answered = sorted([await conn.response(), await conn.response()], key=lambda r: r.msgid)
        await conn.expect_closed()
    got = [(r.msgid, r.error, r.result) for r in answered]
    assert got == [(1, None, {"n": 1}), (2, None, {"slept": 0.2})]


@pytest.mark.parametrize("limits", [{"max_message_bytes": 1024}])
async def test_oversized_message_closes(server: ServerInfo) -> None:
    conn = await RawConn.open(server.socket_path)
    # Exactly at the limit is fine ...
    # bin16 takes one header byte more than the empty bin8.
    filler = 1024 - len(msgpack.packb([0, 1, "echo", [{"b": b""}]])) - 1
    at_limit = msgpack.packb([0, 1, "echo", [{"b": b"x" * filler}]])
    assert len(at_limit) == 1024
    await conn.send(at_limit)
    assert (await conn.response()).error is None
    # ... one byte more closes the connection, before it is all buffered.
    await conn.send(msgpack.packb([0, 2, "echo", [{"b": b"x" * (filler + 1)}]]))
    with trio.fail_after(5):
        await conn.expect_closed()


@pytest.mark.parametrize("limits", [{"max_message_bytes": 1024}])
async def test_a_response_over_the_limit_becomes_limit_exceeded(server: ServerInfo) -> None:
    conn = await RawConn.open(server.socket_path)
    # The largest response that fits is sent as it is ...
    fits = 1024 - len(msgpack.packb([1, 1, None, {"b": b""}])) - 1
    assert len(msgpack.packb([1, 1, None, {"b": b"x" * fits}])) == 1024
    assert (await conn.call(1, "grow", {"n": fits})).result == {"b": b"x" * fits}
    # ... one byte more is refused, and the connection goes on.
    resp = await conn.call(2, "grow", {"n": fits + 1})
    assert resp.error is not None and resp.error["code"] == "limit_exceeded"
    assert resp.error["details"] == {"limit": 1024} and "grow" in resp.error["message"]
    assert (await conn.call(3, "echo", {"still": "here"})).result == {"still": "here"}


@pytest.mark.parametrize("limits", [{"max_message_bytes": 1024}])
async def test_many_small_messages_in_one_read_are_not_oversized(server: ServerInfo) -> None:
    conn = await RawConn.open(server.socket_path)
    await conn.send(b"".join(msgpack.packb([0, i, "echo", [{"i": i}]]) for i in range(500)))
    with trio.fail_after(10):
        got = sorted(r.msgid for r in await conn.responses(500))
    assert got == list(range(500))


async def test_declared_huge_array_does_not_allocate(server: ServerInfo) -> None:
    conn = await RawConn.open(server.socket_path)
    # 2000 nested array32 headers each claiming 2**28 elements: a
    # constructing unpacker would try to preallocate terabytes.
    await conn.send(b"\x94\x00\x01\xa1x" + b"\xdd\x10\x00\x00\x00" * 2000)
    good = await RawConn.open(server.socket_path)
    assert (await good.call(1, "echo", {})).error is None
    await conn.aclose()


@pytest.mark.parametrize("limits", [{"message_timeout_s": 0.3}])
async def test_truncated_message_times_out_while_others_are_served(server: ServerInfo) -> None:
    loris = await RawConn.open(server.socket_path)
    good = await RawConn.open(server.socket_path)
    whole = msgpack.packb([0, 1, "echo", [{"x": b"y" * 100}]])
    await loris.send(whole[:20])
    start = trio.current_time()
    for i in range(5):
        assert (await good.call(i, "echo", {"i": i})).result == {"i": i}
    with trio.fail_after(5):
        await loris.expect_closed()
    assert trio.current_time() - start >= 0.25


@pytest.mark.parametrize("limits", [{"message_timeout_s": 0.5}])
async def test_slow_loris_trickle_is_closed(server: ServerInfo) -> None:
    loris = await RawConn.open(server.socket_path)
    whole = msgpack.packb([0, 1, "echo", [{"x": b"y" * 100}]])
    start = trio.current_time()
    with trio.fail_after(5):
        for byte in whole[:-1]:
            try:
                await loris.send(bytes([byte]))
            except trio.BrokenResourceError:
                break
            await trio.sleep(0.05)
        await loris.expect_closed()
    assert trio.current_time() - start < 2


@pytest.mark.parametrize("limits", [{"max_inflight_per_connection": 2, "message_timeout_s": 1.0}])
async def test_client_that_never_reads_does_not_block_others(server: ServerInfo) -> None:
    slow = await RawConn.open(server.socket_path)
    big = msgpack.packb([0, 1, "echo", [{"x": b"y" * 200_000}]])

    async def flood() -> None:
        with trio.move_on_after(3):
            try:
                while True:
                    await slow.send(big)
            except trio.BrokenResourceError:
                pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(flood)
        good = await RawConn.open(server.socket_path)
        for i in range(10):
            with trio.fail_after(2):
                assert (await good.call(i, "echo", {"i": i})).result == {"i": i}
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("limits", [{"max_message_bytes": 2 << 20}])
async def test_a_client_that_does_not_read_pins_a_bounded_response_backlog(
    server: ServerInfo, handler: EchoHandler
) -> None:
    """Small requests for large responses: in-flight slots alone would let all 50 run."""
    size, count = 1 << 20, 50
    conn = await RawConn.open(server.socket_path)
    await conn.send(b"".join(encode_request(i, "grow", {"n": size}) for i in range(count)))
    await trio.sleep(0.3)
    # The backlog, one more response, and what the socket buffers took.
    assert handler.started <= RESPONSE_BACKLOG_FLOOR // size + 3
    with trio.fail_after(10):
        replies = await conn.responses(count)
    assert sorted(r.msgid for r in replies) == list(range(count))
    assert all(r.error is None and len(r.result["b"]) == size for r in replies)


@pytest.mark.parametrize("limits", [{"max_message_bytes": 2 << 20}])
async def test_announced_responses_count_before_they_are_made(
    server: ServerInfo, handler: EchoHandler
) -> None:
    """Requests that suspend before answering: without their announcements counted,
    every one would start before the first response is queued."""
    size, count = 1 << 20, 50
    conn = await RawConn.open(server.socket_path)
    await conn.send(b"".join(encode_request(i, "grow_later", {"n": size, "s": 0.5}) for i in range(count)))
    await trio.sleep(0.3)  # every request started is still sleeping
    assert handler.started <= RESPONSE_BACKLOG_FLOOR // size + 2
    with trio.fail_after(30):
        replies = await conn.responses(count)
    assert sorted(r.msgid for r in replies) == list(range(count))
    assert all(r.error is None and len(r.result["b"]) == size for r in replies)


@pytest.mark.parametrize("limits", [{"max_connections": 2}])
async def test_connection_limit(server: ServerInfo) -> None:
    a = await RawConn.open(server.socket_path)
    b = await RawConn.open(server.socket_path)
    assert (await a.call(1, "echo", {})).error is None
    assert (await b.call(1, "echo", {})).error is None
    c = await RawConn.open(server.socket_path)
    with trio.fail_after(5):
        await c.expect_closed()
    await a.aclose()
    await trio.sleep(0.1)
    d = await RawConn.open(server.socket_path)
    assert (await d.call(1, "echo", {})).error is None


# What a failure's message might quote; the stack shows the name, not this.
_QUOTED = "-".join(("secret", "material"))


class _BrokenOnce(EchoHandler):
    """Fails while the first connection is being set up, before it is served."""

    def __init__(self) -> None:
        super().__init__()
        self.failures = 0

    @property
    def suspending(self) -> frozenset[str]:
        if not self.failures:
            self.failures += 1
            raise RuntimeError(f"a bug met while setting up a connection, quoting {_QUOTED}")
        return frozenset()


async def test_a_connection_that_fails_before_it_is_served_leaves_the_server_up(
    tmpdir_short: Path, caplog: pytest.LogCaptureFixture
) -> None:
    handler = _BrokenOnce()
    async with running_server(make_config(tmpdir_short), handler) as info:
        first = await RawConn.open(info.socket_path)
        with trio.fail_after(5):
            await first.expect_closed()
        assert handler.failures == 1
        second = await RawConn.open(info.socket_path)
        assert (await second.call(1, "echo", {})).error is None
    # Logged by type and stack, never by the message, which may quote what a peer sent.
    assert "RuntimeError" in caplog.text and "secret-material" not in caplog.text


@pytest.mark.parametrize("limits", [{"idle_timeout_s": 0.3}])
async def test_idle_timeout(server: ServerInfo, handler: EchoHandler) -> None:
    conn = await RawConn.open(server.socket_path)
    # A request in flight longer than the idle timeout keeps it open ...
    assert (await conn.call(1, "sleep", {"s": 0.5})).error is None
    start = trio.current_time()
    # ... and the idle clock starts once its reply is out.
    with trio.fail_after(5):
        await conn.expect_closed()
    assert 0.2 <= trio.current_time() - start < 2
    await trio.sleep(0.05)
    assert handler.closed


@pytest.mark.parametrize("limits", [{"idle_timeout_s": 0.2}])
async def test_keep_open_exempts_subscribers_from_idle_timeout(server: ServerInfo) -> None:
    conn = await RawConn.open(server.socket_path)
    assert (await conn.call(1, "subscribe", {})).error is None
    await trio.sleep(0.5)
    await conn.request(2, "notify", {"name": "k"})
    # The notification is queued before the reply, so it arrives first.
    note, resp = await conn.next(), await conn.next()
    assert isinstance(note, Notification)
    assert (note.method, note.params) == ("key.event", [{"name": "k"}])
    assert isinstance(resp, Response)
    assert (resp.msgid, resp.error) == (2, None)


async def test_handler_errors_map_to_codes(server: ServerInfo) -> None:
    conn = await RawConn.open(server.socket_path)
    resp = await conn.call(1, "nope", {})
    assert resp.error["code"] == "unknown_method"
    resp = await conn.call(2, "fail", {"code": "not_found", "message": "no key k", "details": {"k": 1}})
    assert resp.error == {"code": "not_found", "message": "no key k", "details": {"k": 1}}


async def test_unexpected_exceptions_are_internal_without_secrets(
    server: ServerInfo, caplog: pytest.LogCaptureFixture
) -> None:
    conn = await RawConn.open(server.socket_path)
    for method in ("boom", "unencodable"):
        resp = await conn.call(1, method, {})
        assert resp.error["code"] == "internal"
        assert "secret" not in resp.error["message"]
        assert "correlation id" in resp.error["message"]
    assert "secret-material" not in caplog.text
    assert "correlation id" in caplog.text


async def test_principal_from_so_peercred(server: ServerInfo) -> None:
    conn = await RawConn.open(server.socket_path)
    result = (await conn.call(1, "whoami", {})).result
    assert result == {
        "name": f"uid:{os.getuid()}",
        "transport": "unix",
        "uid": os.getuid(),
        "gid": os.getgid(),
        "pid": os.getpid(),
    }


async def test_drain_lets_inflight_requests_finish(config: Config, handler: EchoHandler) -> None:
    async with trio.open_nursery() as nursery:
        info: ServerInfo = await nursery.start(serve, config, handler)
        busy = await RawConn.open(info.socket_path)
        idle = await RawConn.open(info.socket_path)
        await busy.request(1, "sleep", {"s": 0.3})
        await trio.sleep(0.05)
        await info.drain()
        resp = await busy.response()
        assert (resp.msgid, resp.error) == (1, None)
        await busy.expect_closed()
        await idle.expect_closed()
        assert not info.socket_path.exists()
    with pytest.raises(OSError):
        await trio.open_unix_socket(str(info.socket_path))


async def test_drain_timeout_cancels_stragglers(tmpdir_short: Path, handler: EchoHandler) -> None:
    config = make_config(tmpdir_short, drain_timeout_s=0.2)
    async with trio.open_nursery() as nursery:
        info: ServerInfo = await nursery.start(serve, config, handler)
        conn = await RawConn.open(info.socket_path)
        await conn.request(1, "gate", {})
        await trio.sleep(0.05)
        with trio.fail_after(3):
            await info.drain()
        await conn.expect_closed()


async def test_stale_socket_replaced_live_one_refused(config: Config, handler: EchoHandler) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(config.socket_path))
    stale.close()
    async with running_server(config, handler) as info, trio.open_nursery() as nursery:
        with pytest.raises(OSError):
            await nursery.start(serve, config, handler)
        conn = await RawConn.open(info.socket_path)
        assert (await conn.call(1, "echo", {})).error is None


async def test_regular_file_at_socket_path_is_not_removed(config: Config, handler: EchoHandler) -> None:
    config.socket_path.write_text("precious")
    async with trio.open_nursery() as nursery:
        with pytest.raises(FileExistsError):
            await nursery.start(serve, config, handler)
    assert config.socket_path.read_text() == "precious"


async def test_async_client(server: ServerInfo) -> None:
    async with AsyncClient(server.socket_path) as client:
        assert await client.call("echo", {"a": 1}) == {"a": 1}
        results: list[Any] = []

        async def one(i: int) -> None:
            results.append(await client.call("echo", {"i": i}))

        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(one, i)
        assert sorted(r["i"] for r in results) == list(range(50))
        with pytest.raises(UnknownMethod):
            await client.ping()
        with pytest.raises(NotFound) as info:
            await client.call("fail", {"code": "not_found", "message": "no key x"})
        assert info.value.message == "no key x"
        with pytest.raises(Exception) as internal:
            await client.call("boom", {})
        assert internal.value.code == "internal"  # type: ignore[attr-defined]
        assert internal.value.message.count("correlation id") == 1  # type: ignore[attr-defined]


async def test_sync_client_in_thread(server: ServerInfo) -> None:
    def work() -> list[Any]:
        with Client(server.socket_path, timeout=5) as client:
            out = [client.call("echo", {"n": i}) for i in range(3)]
            try:
                client.call("fail", {"code": "invalid_state", "message": "m"})
            except InvalidState as exc:
                out.append(exc.code)
            out.append(client.call("whoami", {})["name"])
            return out

    out = await trio.to_thread.run_sync(work)
    assert out == [{"n": 0}, {"n": 1}, {"n": 2}, "invalid_state", f"uid:{os.getuid()}"]


@pytest.mark.parametrize("limits", [{"idle_timeout_s": 0.2}])
async def test_clients_reconnect_after_idle_close(server: ServerInfo) -> None:
    async with AsyncClient(server.socket_path) as client:
        assert await client.call("echo", {"a": 1}) == {"a": 1}
        await trio.sleep(0.5)
        # A state-changing method too: the broker closed an idle connection
        # before this request was sent, so sending it again is safe.
        assert await client.call("notify", {"x": 1}) == {}

    def sync() -> Any:
        with Client(server.socket_path, timeout=5) as client:
            client.call("echo", {})
            time.sleep(0.5)
            return client.call("notify", {"x": 2})

    assert await trio.to_thread.run_sync(sync) == {}


async def test_async_subscribe_yields_key_events(server: ServerInfo) -> None:
    events: list[dict[str, Any]] = []
    async with AsyncClient(server.socket_path) as client:

        async def listen() -> None:
            async for event in client.subscribe(prefix="k"):
                events.append(event)
                return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(listen)
            await trio.sleep(0.05)
            await client.call("notify", {"name": "k", "event": "rotated"})
    assert events == [{"name": "k", "event": "rotated"}]


async def test_async_subscriptions_each_get_their_prefix_and_end_alone(server: ServerInfo) -> None:
    async with AsyncClient(server.socket_path) as client:
        got: dict[str, list[str]] = {"a": [], "b": []}

        async def listen(prefix: str, count: int) -> None:
            async for event in client.subscribe(prefix=prefix):
                got[prefix].append(event["name"])
                if len(got[prefix]) == count:
                    return  # ends this subscription, not the connection

        async with trio.open_nursery() as nursery:
            nursery.start_soon(listen, "a", 1)
            nursery.start_soon(listen, "b", 2)
            await trio.sleep(0.05)
            for name in ("a1", "b1", "a2", "b2"):
                await client.call("notify", {"name": name})
                await trio.sleep(0.01)
        # Events kept coming for the ended subscription; the connection is still the same.
        await client.call("notify", {"name": "a3"})
        assert await client.call("echo", {"still": 1}) == {"still": 1}
    assert got == {"a": ["a1"], "b": ["b1", "b2"]}


async def test_a_request_cancelled_while_sending_does_not_garble_the_next(server: ServerInfo) -> None:
    async with AsyncClient(server.socket_path) as client:
        conn = await client._ensure()  # the connection the cancelled send will use
        with trio.move_on_after(0.001):
            # Larger than the socket buffers: the send is still going when cancelled.
            await client.call("echo", {"b": b"x" * (8 << 20)})
        assert conn.broken
        with trio.fail_after(5):
            assert await client.call("echo", {"after": 1}) == {"after": 1}


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), float("inf")])
def test_a_client_timeout_must_be_positive_and_finite(timeout: float) -> None:
    with pytest.raises(ValueError, match="timeout"):
        Client("/nonexistent.sock", timeout=timeout)


def test_sync_subscribe_yields_key_events(tmpdir_short: Path) -> None:
    config = make_config(tmpdir_short)

    async def main() -> list[Any]:
        async with running_server(config, EchoHandler()) as info:

            def work() -> list[Any]:
                with Client(info.socket_path, timeout=5) as client:
                    stream = client.subscribe()
                    client.call("notify", {"name": "a"})
                    return [next(stream)]

            return await trio.to_thread.run_sync(work)

    assert trio.run(main) == [{"name": "a"}]


async def _lossy_server(listener: trio.SocketListener, accepted: list[int]) -> None:
    """Reads one request per connection and hangs up without replying."""
    while True:
        stream = await listener.accept()
        accepted.append(1)
        await stream.receive_some(65536)
        await stream.aclose()


@pytest.mark.parametrize(("method", "connections"), [("encrypt", 1), ("key.get", 2)])
async def test_lost_reply_resent_only_for_reads(tmpdir_short: Path, method: str, connections: int) -> None:
    path = tmpdir_short / "lossy.sock"
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen(8)
    accepted: list[int] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_lossy_server, trio.SocketListener(sock), accepted)
        async with AsyncClient(path) as client:
            with pytest.raises(ConnectionLost):
                await client.call(method, {"name": "k"})
        await trio.sleep(0.05)
        # One connection is opened on entering the client; a read is retried
        # once on a second, a state-changing call never.
        assert len(accepted) == connections

        def sync_call() -> None:
            with Client(path, timeout=5) as c:
                c.call(method, {"name": "k"})

        before = len(accepted)
        with pytest.raises(ConnectionLost):
            await trio.to_thread.run_sync(sync_call)
        await trio.sleep(0.05)
        assert len(accepted) - before == connections
        nursery.cancel_scope.cancel()


async def test_sigterm_drains(config: Config, handler: EchoHandler) -> None:
    async with trio.open_nursery() as nursery:
        info: ServerInfo = await nursery.start(functools.partial(serve, config, handler, handle_signals=True))
        conn = await RawConn.open(info.socket_path)
        await conn.request(1, "sleep", {"s": 0.2})
        await trio.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)
        resp = await conn.response()
        assert (resp.msgid, resp.error) == (1, None)
        await conn.expect_closed()
    assert info.shutdown.is_set()
