"""broker.connection over in-memory streams, with trio's autojump clock."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgpack
import pytest
import trio
import trio.testing

from broker.auth import Principal
from broker.config import Limits
from broker.connection import Connection, RequestContext
from broker.protocol import Notification, Response, ResponseDecoder, encode_request
from tests._transport_helpers import EchoHandler

PRINCIPAL = Principal(name="uid:1", transport="unix", uid=1, gid=1, pid=1)


class Peer:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.decoder = ResponseDecoder(1 << 24)
        self.events: list[Response | Notification] = []
        self.reads = 0

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def next(self) -> Response | Notification:
        while not self.events:
            data = await self.stream.receive_some(1 << 20)
            if not data:
                raise EOFError
            self.reads += 1
            self.events.extend(self.decoder.feed(data))
        return self.events.pop(0)

    async def closed(self) -> bool:
        try:
            while True:
                if not await self.stream.receive_some(1 << 20):
                    return True
        except trio.BrokenResourceError:
            return True


@asynccontextmanager
async def connection(handler: Any, **limits: Any) -> AsyncIterator[tuple[Peer, Connection, trio.Nursery]]:
    client, server = trio.testing.memory_stream_pair()
    conn = Connection(server, principal=PRINCIPAL, connection_id=9, handler=handler, limits=Limits(**limits))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.run)
        yield Peer(client), conn, nursery
        nursery.cancel_scope.cancel()


async def test_responses_are_coalesced_into_one_write() -> None:
    handler = EchoHandler()
    client, server = trio.testing.memory_stream_pair()
    writes: list[int] = []
    original = server.send_stream.send_all

    async def counting_send_all(data: bytes | bytearray | memoryview) -> None:
        writes.append(len(data))
        await original(data)

    server.send_stream.send_all = counting_send_all  # type: ignore[method-assign]
    conn = Connection(server, principal=PRINCIPAL, connection_id=1, handler=handler, limits=Limits())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.run)
        await client.send_all(b"".join(encode_request(i, "echo", {"i": i}) for i in range(100)))
        peer = Peer(client)
        got = [await peer.next() for _ in range(100)]
        assert sorted(e.msgid for e in got if isinstance(e, Response)) == list(range(100))
        assert len(writes) == 1
        nursery.cancel_scope.cancel()


async def test_idle_timeout_with_mock_clock(autojump_clock: trio.testing.MockClock) -> None:
    handler = EchoHandler()
    async with connection(handler, idle_timeout_s=300.0) as (peer, _conn, _):
        start = trio.current_time()
        assert await peer.closed()
        assert trio.current_time() - start == pytest.approx(300.0)
    assert handler.closed == [9]


async def test_message_timeout_with_mock_clock(autojump_clock: trio.testing.MockClock) -> None:
    async with connection(EchoHandler(), message_timeout_s=30.0) as (peer, _conn, _):
        await trio.sleep(100)  # idle but below the idle timeout
        await peer.send(encode_request(1, "echo", {})[:-1])
        start = trio.current_time()
        assert await peer.closed()
        assert trio.current_time() - start == pytest.approx(30.0)


async def test_keep_open_survives_idle(autojump_clock: trio.testing.MockClock) -> None:
    async with connection(EchoHandler(), idle_timeout_s=10.0) as (peer, conn, _):
        await peer.send(encode_request(1, "subscribe", {}))
        assert isinstance(await peer.next(), Response)
        await trio.sleep(1000)
        await conn.context.notify("key.event", [{"n": 1}])
        note = await peer.next()
        assert note == Notification("key.event", [{"n": 1}])


async def test_notify_after_close_raises() -> None:
    handler = EchoHandler()
    async with connection(handler) as (peer, conn, _):
        await peer.stream.aclose()
        while not handler.closed:
            await trio.sleep(0.01)
        with pytest.raises(trio.BrokenResourceError):
            await conn.context.notify("key.event", [])


async def test_local_context_drops_notifications() -> None:
    ctx = RequestContext(Principal("local", "local"), 0)
    await ctx.notify("key.event", [{}])


async def test_eof_still_answers_inflight() -> None:
    handler = EchoHandler()
    client, server = trio.testing.memory_stream_pair()
    conn = Connection(server, principal=PRINCIPAL, connection_id=1, handler=handler, limits=Limits())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.run)
        await client.send_all(encode_request(1, "sleep", {"s": 0.05}))
        await client.send_stream.aclose()  # half-close: we still read
        peer = Peer(client)
        resp = await peer.next()
        assert isinstance(resp, Response)
        assert resp.result == {"slept": 0.05}
        assert await peer.closed()


async def test_drain_on_idle_connection_closes_at_once() -> None:
    async with connection(EchoHandler()) as (peer, conn, _):
        await trio.sleep(0.01)
        conn.begin_drain()
        with trio.fail_after(1):
            assert await peer.closed()


async def test_drain_while_backpressured(autojump_clock: trio.testing.MockClock) -> None:
    handler = EchoHandler()
    async with connection(handler, max_inflight_per_connection=2) as (peer, conn, _):
        await peer.send(b"".join(msgpack.packb([0, i, "sleep", [{"s": 1}]]) for i in range(5)))
        await trio.sleep(0.5)
        assert handler.active == 2
        conn.begin_drain()
        got = []
        with pytest.raises(EOFError):
            while True:
                got.append(await peer.next())
        # Requests already running finish; queued ones are never started.
        assert sorted(e.msgid for e in got if isinstance(e, Response)) == [0, 1]
        assert handler.started == 2


async def test_bad_request_and_handler_error_keep_connection() -> None:
    async with connection(EchoHandler()) as (peer, _conn, _):
        await peer.send(msgpack.packb([0, 4, "echo", [1]]) + encode_request(5, "fail", {"code": "not_found"}))
        first, second = sorted([await peer.next(), await peer.next()], key=lambda e: e.msgid)  # type: ignore[union-attr]
        assert isinstance(first, Response) and first.error["code"] == "invalid_request"
        assert isinstance(second, Response) and second.error["code"] == "not_found"


async def test_lone_requests_run_in_the_reading_task() -> None:
    handler = EchoHandler()
    async with connection(handler) as (peer, _, nursery):
        for i in range(5):
            await peer.send(encode_request(i, "echo", {"i": i}))
            response = await peer.next()
            assert isinstance(response, Response) and response.result == {"i": i}
        (reader,) = nursery.child_tasks  # Connection.run
        assert handler.tasks == [reader] * 5


async def _block_at_gate(peer: Peer, handler: EchoHandler) -> None:
    """Send request 1, a lone request that waits at the handler's gate, and wait until it runs."""
    await peer.send(encode_request(1, "gate", {}))
    while handler.started < 1:
        await trio.sleep(0.001)


async def _expect_gate_reply(peer: Peer) -> None:
    response = await peer.next()
    assert isinstance(response, Response) and (response.msgid, response.result) == (1, {"gate": True})


async def _answered_around_the_gate(peer: Peer, handler: EchoHandler) -> None:
    """With request 1 waiting at the gate: requests 2 to 4 are read and answered
    meanwhile; then the gate opens, 1 is answered, and a lone request 5 after it too."""
    for i in range(2, 5):
        await peer.send(encode_request(i, "echo", {"i": i}))
        response = await peer.next()
        assert isinstance(response, Response) and (response.msgid, response.result) == (i, {"i": i})
    handler.gate.set()
    await _expect_gate_reply(peer)
    await peer.send(encode_request(5, "echo", {"i": 5}))
    response = await peer.next()
    assert isinstance(response, Response) and response.msgid == 5


async def test_lone_request_that_blocks_passes_on_reading() -> None:
    handler = EchoHandler()
    async with connection(handler) as (peer, _, _nursery):
        await _block_at_gate(peer, handler)
        # The first request waits; the connection still reads and answers.
        await _answered_around_the_gate(peer, handler)


class SuspendingEchoHandler(EchoHandler):
    """Says that its "gate" requests always wait before they are answered."""

    suspending = frozenset({"gate"})


async def test_lone_requests_of_suspending_methods_go_to_a_worker() -> None:
    handler = SuspendingEchoHandler()
    async with connection(handler) as (peer, _, nursery):
        (reader,) = nursery.child_tasks  # Connection.run
        await _block_at_gate(peer, handler)
        assert handler.tasks[0] is not reader
        await _answered_around_the_gate(peer, handler)
        # The reading role never moved: the lone request after the gate ran
        # in the task that read the first (where a blocked lone request hands
        # reading to a worker, that worker would run it).
        assert handler.tasks[-1] is reader
        # The next gate goes to a worker as well, and is answered.
        await peer.send(encode_request(1, "gate", {}))
        await _expect_gate_reply(peer)
        assert handler.tasks[-1] is not reader


async def test_drain_waits_for_a_lone_request_that_blocks() -> None:
    handler = EchoHandler()
    async with connection(handler) as (peer, conn, _):
        await _block_at_gate(peer, handler)
        conn.begin_drain()
        await trio.sleep(0.01)
        handler.gate.set()
        await _expect_gate_reply(peer)
        with trio.fail_after(1):
            assert await peer.closed()
