"""broker.readhub on real socket pairs: who is woken, with what, and when."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import outcome
import pytest
import trio

from broker.readhub import MAX_EVENTS, ReadHub
from broker.streamio import SocketIO


@contextmanager
def socket_pairs(count: int) -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    """(writer, watched) pairs; the watched ends are non-blocking."""
    pairs = [socket.socketpair() for _ in range(count)]
    for _, watched in pairs:
        watched.setblocking(False)
    try:
        yield pairs
    finally:
        for writer, watched in pairs:
            writer.close()
            watched.close()


@asynccontextmanager
async def running_hub() -> AsyncIterator[ReadHub]:
    hub = ReadHub()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hub.run)
            yield hub
            nursery.cancel_scope.cancel()
    finally:
        hub.close()


def reading(sock: socket.socket, log: list[bytes], answer: Callable[[bytes], Any]) -> Callable[[], Any]:
    """An on_data that reads what landed, logs it, and returns ``answer(data)``."""

    def on_data() -> Any:
        data = sock.recv(4096)
        log.append(data)
        return answer(data)

    return on_data


async def settle() -> None:
    """Let the hub see what was just written (the loop is otherwise idle)."""
    await trio.sleep(0.02)


@asynccontextmanager
async def parked_reader(hub: ReadHub, fd: int) -> AsyncIterator[list[Any]]:
    """A task parked in ``hub.wait(fd)``; the list gets what it woke with, by the end of the block."""
    woken: list[Any] = []

    async def reader() -> None:
        woken.append(await hub.wait(fd))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await settle()
        yield woken


@asynccontextmanager
async def socket_io(
    hub: ReadHub, consumer: Callable[[memoryview], bool]
) -> AsyncIterator[tuple[trio.socket.SocketType, trio.SocketStream, SocketIO]]:
    """(peer, stream, io): a socket pair, our end read through a SocketIO watched by ``hub``."""
    peer, ours = trio.socket.socketpair()
    stream = trio.SocketStream(ours)
    io = SocketIO(stream, hub=hub, consumer=consumer)
    try:
        yield peer, stream, io
    finally:
        io.detach()
        await stream.aclose()
        peer.close()


async def test_a_parked_reader_wakes_with_what_on_data_returns() -> None:
    log: list[bytes] = []
    with socket_pairs(1) as [(writer, watched)]:
        async with running_hub() as hub:
            hub.register(watched.fileno(), reading(watched, log, lambda data: outcome.Value(data.upper())))
            async with parked_reader(hub, watched.fileno()) as woken:
                assert woken == []  # nothing sent: still parked
                with pytest.raises(trio.BusyResourceError):
                    await hub.wait(watched.fileno())  # one waiter at a time
                writer.send(b"ping")
            assert woken == [b"PING"] and log == [b"ping"]
            assert hub.handled == 0
            hub.unregister(watched.fileno())


async def test_what_on_data_deals_with_leaves_the_reader_parked() -> None:
    """on_data returning None: the reader stays parked, and every later arrival calls on_data again."""
    log: list[bytes] = []
    with socket_pairs(1) as [(writer, watched)]:
        async with running_hub() as hub:

            def answer(data: bytes) -> Any:
                return outcome.Value("woken") if data == b"wake" else None

            hub.register(watched.fileno(), reading(watched, log, answer))
            async with parked_reader(hub, watched.fileno()) as woken:
                for i in range(3):
                    writer.send(b"dealt %d" % i)
                    await settle()
                    assert woken == []
                assert hub.handled == 3
                writer.send(b"wake")
            assert woken == ["woken"]
            assert log == [b"dealt 0", b"dealt 1", b"dealt 2", b"wake"]


async def test_data_while_nobody_waits_makes_the_next_wait_return_at_once() -> None:
    calls: list[bytes] = []
    with socket_pairs(1) as [(writer, watched)]:
        async with running_hub() as hub:
            hub.register(watched.fileno(), reading(watched, calls, lambda _: None))
            writer.send(b"early")
            await settle()
            assert calls == []  # nobody was parked: on_data is not called
            with trio.fail_after(1):
                assert await hub.wait(watched.fileno()) is None
            assert watched.recv(100) == b"early"  # the reader reads for itself
            # The mark is spent: the next wait parks.
            with trio.move_on_after(0.05) as scope:
                await hub.wait(watched.fileno())
            assert scope.cancelled_caught


async def test_a_paused_watch_costs_the_hub_nothing_and_resuming_reports_what_landed() -> None:
    """While its reader polls the socket itself the hub is not woken for it; the next wait
    re-checks the socket, so data that landed during the pause is still seen."""
    calls: list[bytes] = []
    with socket_pairs(1) as [(writer, watched)]:
        async with running_hub() as hub:
            hub.register(watched.fileno(), reading(watched, calls, outcome.Value))
            hub.pause(watched.fileno())
            hub.pause(watched.fileno())  # twice is harmless
            writer.send(b"polled")
            await settle()
            assert hub.events == 0
            assert watched.recv(100) == b"polled"  # read by the polling reader
            hub.pause(watched.fileno())
            writer.send(b"during the pause")
            await settle()
            assert hub.events == 0
            with trio.fail_after(1):
                assert await hub.wait(watched.fileno()) == b"during the pause"
            assert calls == [b"during the pause"]


async def test_a_cancelled_wait_leaves_the_watch_working() -> None:
    calls: list[bytes] = []
    with socket_pairs(1) as [(writer, watched)]:
        async with running_hub() as hub:
            hub.register(watched.fileno(), reading(watched, calls, outcome.Value))
            with trio.move_on_after(0.02):
                await hub.wait(watched.fileno())
            writer.send(b"after")
            await settle()
            assert calls == []  # the cancelled reader is not parked any more
            assert await hub.wait(watched.fileno()) is None
            assert watched.recv(100) == b"after"
            async with parked_reader(hub, watched.fileno()) as woken:
                writer.send(b"again")
            assert woken == [b"again"]


async def test_a_bug_in_on_data_reaches_its_reader_only() -> None:
    with socket_pairs(2) as [(bad_writer, bad), (good_writer, good)]:
        async with running_hub() as hub:

            def broken() -> Any:
                raise RuntimeError("bug in one connection")

            hub.register(bad.fileno(), broken)
            hub.register(good.fileno(), reading(good, [], outcome.Value))
            raised: list[BaseException] = []

            async def bad_reader() -> None:
                try:
                    await hub.wait(bad.fileno())
                except RuntimeError as exc:
                    raised.append(exc)

            async with trio.open_nursery() as nursery, parked_reader(hub, good.fileno()) as woken:
                nursery.start_soon(bad_reader)
                await settle()
                bad_writer.send(b"x")
                await settle()
                good_writer.send(b"fine")
            assert [str(exc) for exc in raised] == ["bug in one connection"]
            assert woken == [b"fine"]


async def test_more_sockets_ready_than_one_poll_takes() -> None:
    count = MAX_EVENTS * 2 + 5
    with socket_pairs(count) as pairs:
        async with running_hub() as hub:
            woken: dict[int, Any] = {}
            for _, watched in pairs:
                hub.register(watched.fileno(), reading(watched, [], outcome.Value))
            async with trio.open_nursery() as nursery:
                for index, (_, watched) in enumerate(pairs):

                    async def reader(index: int = index, fd: int = watched.fileno()) -> None:
                        woken[index] = await hub.wait(fd)

                    nursery.start_soon(reader)
                await settle()
                for index, (writer, _) in enumerate(pairs):
                    writer.send(b"%d" % index)
            assert woken == {index: b"%d" % index for index in range(count)}


async def test_unregistered_sockets_are_forgotten_and_their_numbers_reusable() -> None:
    calls: list[bytes] = []
    async with running_hub() as hub:
        with socket_pairs(1) as [(writer, watched)]:
            fd = watched.fileno()
            hub.register(fd, reading(watched, calls, outcome.Value))
            hub.unregister(fd)
            hub.unregister(fd)  # twice is harmless
            writer.send(b"unwatched")
            await settle()
            with pytest.raises(KeyError):
                await hub.wait(fd)
        # A new socket may get the same number once the old one is closed.
        with socket_pairs(1) as [(writer, watched)]:
            hub.register(watched.fileno(), reading(watched, calls, outcome.Value))
            async with parked_reader(hub, watched.fileno()) as woken:
                writer.send(b"new")
            assert woken == [b"new"] and calls == [b"new"]
            hub.unregister(watched.fileno())


async def test_a_hang_up_wakes_the_reader_even_with_data_on_data_would_deal_with() -> None:
    """Data and the peer's hang-up seen at once: on_data is skipped, the reader reads both itself."""
    calls: list[bytes] = []
    with socket_pairs(1) as [(writer, watched)]:
        async with running_hub() as hub:
            hub.register(watched.fileno(), reading(watched, calls, lambda _: None))
            async with parked_reader(hub, watched.fileno()) as woken:
                # Both land before the hub runs again.
                writer.send(b"last words")
                writer.shutdown(socket.SHUT_WR)
            assert woken == [None] and calls == []
            assert watched.recv(100) == b"last words" and watched.recv(100) == b""
            hub.unregister(watched.fileno())


@pytest.mark.parametrize("how", ["eof", "reset"])
async def test_socket_io_reader_is_woken_by_eof_and_errors(how: str) -> None:
    """Through SocketIO, as the server uses it: EOF reads as empty, a reset raises."""
    got: list[Any] = []
    async with running_hub() as hub, socket_io(hub, lambda _: True) as (peer, stream, io):

        async def reader() -> None:
            try:
                data = await io.receive(watched=True)
                got.append(None if data is None else bytes(data))
            except trio.BrokenResourceError:
                got.append("broken")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await settle()
            if how == "reset":
                # A Unix socket closed with data it never read resets its peer.
                await stream.send_all(b"unread")
            peer.close()
    assert got == ([b""] if how == "eof" else ["broken"])


async def test_socket_io_reads_to_the_end_after_data_and_hang_up_land_together() -> None:
    """A part of a message and the hang-up behind it, seen in one event: receive returns the part,
    then the end of the stream (and does not wait for an event that will never come)."""
    got: list[bytes] = []
    async with running_hub() as hub, socket_io(hub, lambda _: True) as (peer, _, io):

        async def reader() -> None:
            while data := await io.receive(watched=True):
                got.append(bytes(data))
            got.append(b"<end>")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await settle()
            # No checkpoint between the two: the hub sees them in one event.
            os.write(peer.fileno(), b"a part")
            peer.shutdown(socket.SHUT_WR)
            with trio.fail_after(2):
                while got[-1:] != [b"<end>"]:
                    await trio.sleep(0.001)
    assert got == [b"a part", b"<end>"]


async def test_socket_io_consumer_decides_whether_the_reader_wakes() -> None:
    """What the consumer deals with never reaches receive; what it keeps makes receive return None."""
    seen: list[bytes] = []

    def consumer(data: memoryview) -> bool:
        seen.append(bytes(data))
        return data != b"keep"

    got: list[Any] = []
    async with running_hub() as hub, socket_io(hub, consumer) as (peer, _, io):

        async def reader() -> None:
            assert bytes(await io.receive(watched=True)) == b"first"  # type: ignore[arg-type]
            got.append(await io.receive(watched=True))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await peer.send(b"first")  # read by the reader itself (not drained yet)
            await settle()
            for message in (b"one", b"two"):
                await peer.send(message)
                await settle()
                assert got == []
            await peer.send(b"keep")
    assert seen == [b"one", b"two", b"keep"] and got == [None]


async def test_a_socket_the_hub_cannot_watch_is_read_with_trio(monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of epoll watches: the connection still works, waiting with trio alone."""
    async with running_hub() as hub:

        def refuse(fd: int, on_data: object) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(hub, "register", refuse)
        got: list[bytes] = []
        async with socket_io(hub, lambda _: True) as (peer, _, io):

            async def reader() -> None:
                while data := await io.receive(watched=True):
                    got.append(bytes(data))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                await settle()
                await peer.send(b"still read")
                await settle()
                peer.close()
    assert got == [b"still read"] and hub.events == 0
