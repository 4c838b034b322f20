"""The blocking client's busy polling for replies and its direct first write, over real sockets."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
import trio

from broker.client import Client, _PollSlot
from broker.protocol import Response
from broker.server import ServerInfo


@pytest.fixture
def polls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Records, per busy poll, how many replies it read (0: it gave up and the call blocked)."""
    counts: list[int] = []
    real = Client._poll_replies

    def counted(self: Client, sock: socket.socket) -> list[Response]:
        replies = real(self, sock)
        counts.append(len(replies))
        return replies

    monkeypatch.setattr(Client, "_poll_replies", counted)
    yield counts


def _round_trips(path: str, **options: int | None) -> None:
    items = [os.urandom(4096) for _ in range(1000)]  # 4 MiB: more than a socket buffer takes at once
    with Client(path, **options) as kb:  # type: ignore[arg-type]
        kb.key_create("poll/k", "aes256-gcm")
        for index in range(50):
            plaintext = index.to_bytes(4, "big")
            sealed = kb.encrypt("poll/k", plaintext)
            assert kb.decrypt(sealed["ciphertext"])["plaintext"] == plaintext
        sealed_batch = kb.encrypt_batch("poll/k", items)["ciphertexts"]
        assert kb.decrypt_batch(sealed_batch)["plaintexts"] == items


async def test_a_polling_client_reads_its_replies_without_sleeping(
    served: ServerInfo, polls: list[int]
) -> None:
    # A broker answers well within a second, so every call, the 4 MiB
    # replies read in parts too, finds its whole reply while polling.
    await trio.to_thread.run_sync(lambda: _round_trips(str(served.socket_path), busy_poll_us=1_000_000))
    assert polls == [1] * 103


async def test_the_default_client_polls(served: ServerInfo, polls: list[int]) -> None:
    # Whether each reply comes within the default window depends on the
    # machine; the first call polls whatever happens.
    await trio.to_thread.run_sync(lambda: _round_trips(str(served.socket_path)))
    assert polls


@pytest.mark.parametrize("options", [{"busy_poll_us": 0}, {"timeout": None, "busy_poll_us": 100}])
async def test_a_client_that_does_not_poll_blocks(
    served: ServerInfo, polls: list[int], options: dict[str, int | None]
) -> None:
    # Turned off; and without a timeout the socket blocks, so there is nothing to poll.
    await trio.to_thread.run_sync(lambda: _round_trips(str(served.socket_path), **options))
    assert polls == []


def _listening(path: str, backlog: int) -> socket.socket:
    """A Unix socket listening at ``path``."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(backlog)
    return listener


@pytest.fixture
def sleepy_broker(tmp_path: Path) -> Iterator[str]:
    """A Unix socket answering each request ``{"delay": s}`` with ``{"late": s}`` after ``s`` seconds."""
    path = str(tmp_path / "slow.sock")
    listener = _listening(path, 1)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            unpacker = msgpack.Unpacker(raw=False)
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                unpacker.feed(data)
                for _, msgid, _, (params,) in unpacker:
                    time.sleep(params["delay"])
                    conn.sendall(msgpack.packb([1, msgid, None, {"late": params["delay"]}]))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        listener.close()
        thread.join(5)


def test_a_late_reply_is_waited_for_after_the_poll(sleepy_broker: str, polls: list[int]) -> None:
    # Replies after 50 ms: each 100 µs poll gives up and its call blocks and
    # gets the reply; after each miss the client sleeps at once for 1, then
    # 2 calls, so 6 calls poll 3 times.
    with Client(sleepy_broker, busy_poll_us=100) as kb:
        for _ in range(6):
            assert kb.call("ping", {"delay": 0.05}) == {"late": 0.05}
    assert polls == [0, 0, 0]


def test_a_reply_found_while_polling_ends_the_back_off(sleepy_broker: str, polls: list[int]) -> None:
    # A 0.2 s window: the 0.4 s replies miss it, the immediate ones do not.
    delays = [0.4, 0.0, 0.0, 0.4, 0.0, 0.0]
    with Client(sleepy_broker, busy_poll_us=200_000) as kb:
        for delay in delays:
            assert kb.call("ping", {"delay": delay}) == {"late": delay}
    # Miss, sleep (back-off 1), hit; the second miss backs off 1 call again, not 2.
    assert polls == [0, 1, 0, 1]


def test_one_thread_per_process_polls(sleepy_broker: str, polls: list[int]) -> None:
    # Another thread is polling: this call sleeps at once rather than poll beside it.
    with _PollSlot.lock, Client(sleepy_broker, busy_poll_us=200_000) as kb:
        assert kb.call("ping", {"delay": 0.0}) == {"late": 0.0}
    assert polls == []


def test_a_forked_child_may_poll_though_its_parent_was_polling() -> None:
    with _PollSlot.lock:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            os._exit(0 if _PollSlot.lock.acquire(blocking=False) else 1)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_busy_poll_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="busy_poll_us"):
        Client("/nonexistent.sock", busy_poll_us=-1)


@pytest.fixture
def deaf_socket(tmp_path: Path) -> Iterator[str]:
    """A Unix socket path whose listener never accepts, reads or answers."""
    path = str(tmp_path / "deaf.sock")
    listener = _listening(path, 4)
    try:
        yield path
    finally:
        listener.close()


def test_polling_stops_at_the_calls_timeout(deaf_socket: str) -> None:
    with Client(deaf_socket, timeout=0.2, busy_poll_us=5_000_000) as kb:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            kb.call("ping", {})
        assert time.monotonic() - started < 2.0  # not the 5 s polling window


def test_a_send_that_times_out_is_a_timeout_and_not_sent_twice(deaf_socket: str) -> None:
    with Client(deaf_socket, timeout=0.3) as kb:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            kb.call("encrypt", {"key": "k", "plaintext": b"x" * (8 << 20)})  # more than the socket holds
        assert time.monotonic() - started < 1.0  # one timeout, not two
