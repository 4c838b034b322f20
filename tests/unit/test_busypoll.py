"""Busy polling after replies: bounded by its window, off when configured so."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio

from broker.busypoll import BusyPoller
from broker.config import DEFAULT_BUSY_POLL_US, parse_config
from broker.errors import InvalidArgument
from tests._transport_helpers import EchoHandler, RawConn, make_config, running_server, short_tmpdir


def test_one_connection_polls_at_a_time() -> None:
    poller = BusyPoller(0.5)
    before = time.perf_counter()
    deadline = poller.start()
    assert deadline is not None and before + 0.5 <= deadline <= time.perf_counter() + 0.5
    assert poller.start() is None  # the slot is taken
    poller.stop()
    assert poller.start() is not None
    poller.stop()
    assert poller.polling == 0


def test_config_default_zero_and_negative(tmp_path: Path) -> None:
    assert parse_config({}, data_dir=tmp_path).limits.busy_poll_us == DEFAULT_BUSY_POLL_US
    assert parse_config({"limits": {"busy_poll_us": 0}}, data_dir=tmp_path).limits.busy_poll_us == 0
    with pytest.raises(InvalidArgument, match="busy_poll_us"):
        parse_config({"limits": {"busy_poll_us": -1}}, data_dir=tmp_path)
    limits = parse_config({"limits": {"gather_poll_us": 0}}, data_dir=tmp_path).limits
    assert limits.gather_poll_us == 0 and parse_config({}, data_dir=tmp_path).limits.gather_poll_us > 0
    with pytest.raises(InvalidArgument, match="gather_poll_us"):
        parse_config({"limits": {"gather_poll_us": -1}}, data_dir=tmp_path)
    with pytest.raises(InvalidArgument, match="max_connections"):
        parse_config({"limits": {"max_connections": 0}}, data_dir=tmp_path)


async def _echo(conn: RawConn, msgid: int) -> None:
    await conn.request(msgid, "echo", {"i": msgid})
    response = await conn.next()
    assert (response.msgid, response.result) == (msgid, {"i": msgid})


@pytest.mark.parametrize("busy_poll_us", [0, 200_000])
async def test_server_polls_after_replies_when_configured(busy_poll_us: int) -> None:
    with short_tmpdir() as directory:
        config = make_config(directory, busy_poll_us=busy_poll_us)
        async with running_server(config, EchoHandler()) as info:
            if not busy_poll_us:
                assert info.poller is None
                await _echo(await RawConn.open(info.socket_path), 1)
                return
            poller = info.poller
            assert poller is not None
            first, second = await RawConn.open(info.socket_path), await RawConn.open(info.socket_path)
            await _echo(first, 1)
            await trio.sleep(0.005)
            assert poller.rounds > 0 and poller.polling == 1  # polling after the reply
            # A request on a connection that is not polling is still answered.
            await _echo(second, 2)
            assert poller.polling == 1
            await trio.sleep(0.3)
            assert poller.polling == 0  # the window passed: parked
            settled = poller.rounds
            await trio.sleep(0.05)
            assert poller.rounds == settled
            # A request that lands while a connection polls is read by the poll.
            await _echo(first, 3)
            await trio.sleep(0.002)
            polled = poller.rounds
            await _echo(first, 4)
            assert poller.rounds > polled
            for conn in (first, second):
                await conn.stream.aclose()


async def test_no_polling_while_the_connection_waits_for_its_reply() -> None:
    handler = EchoHandler()
    with short_tmpdir() as directory:
        async with running_server(make_config(directory, busy_poll_us=200_000), handler) as info:
            poller = info.poller
            assert poller is not None
            conn = await RawConn.open(info.socket_path)
            await _echo(conn, 1)
            await trio.sleep(0.3)  # the window after that reply has passed
            await conn.request(2, "gate", {})
            while handler.started < 2:
                await trio.sleep(0.001)
            await trio.sleep(0.01)
            # The client waits for its reply, so the connection sleeps in epoll.
            assert poller.polling == 0
            handler.gate.set()
            assert (await conn.next()).msgid == 2
            # A request answered at once (the request-reply loop) is followed by a poll.
            await _echo(conn, 3)
            await trio.sleep(0.005)
            assert poller.polling == 1
            await conn.stream.aclose()
