"""Queued ``encrypt`` / ``decrypt`` requests handled as one group.

A connection hands requests of a groupable method that wait back to back in
its queue to ``Dispatcher.handle_group``. Each must still be answered,
authorized, counted and audited as if it had come alone; these tests hold the
group to that, in-process (against the same requests one by one) and over a
real socket with pipelined requests.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.app import Broker, open_broker
from broker.audit import verify_audit_dir
from broker.config import parse_config
from broker.connection import Connection, RequestContext
from broker.errors import BrokerError, InvalidArgument, NotFound
from broker.gather import GATHER_WINDOW_S, Gatherer
from broker.server import ServerInfo
from tests._transport_helpers import EchoHandler, RawConn, running_server
from tests._transport_helpers import make_config as transport_config
from tests.conftest import Caller, ConfigFactory, local_context


def _records(broker: Broker) -> list[dict[str, Any]]:
    lines = (broker.config.audit_dir / "audit.jsonl").read_bytes().splitlines()
    return [json.loads(line) for line in lines]


def _code(outcome: Any) -> str:
    return outcome.code if isinstance(outcome, BrokerError) else "ok"


async def _one_by_one(
    broker: Broker, contexts: list[RequestContext], method: str, params: list[dict[str, Any]]
) -> list[Any]:
    outcomes: list[Any] = []
    for ctx, request in zip(contexts, params, strict=True):
        try:
            outcomes.append(await broker.dispatcher.handle(ctx, method, dict(request)))
        except BrokerError as exc:
            outcomes.append(exc)
    return outcomes


# One encrypt request: which key, what plaintext, which AAD, or a broken one.
_ENCRYPT = st.one_of(
    st.tuples(
        st.sampled_from(["g/a", "g/b", "g/missing"]),
        st.binary(max_size=64),
        st.sampled_from([None, b"", b"ctx-1", b"ctx-2"]),
    ).map(lambda t: {"key": t[0], "plaintext": t[1]} | ({} if t[2] is None else {"aad": t[2]})),
    st.sampled_from([{"key": "g/a"}, {"key": "g/a", "plaintext": "text"}, {"key": 7, "plaintext": b""},
                     {"key": "g/a", "plaintext": b"", "extra": 1}]),
)


@settings(max_examples=25)
@given(
    requests=st.lists(_ENCRYPT, min_size=1, max_size=24),
    tamper=st.sets(st.integers(0, 23)),
    strangers=st.sets(st.integers(0, 23)),
)
def test_group_answers_as_one_by_one(
    requests: list[dict[str, Any]], tamper: set[int], strangers: set[int]
) -> None:
    """Same outcome codes, ciphertexts that open to the same plaintexts, one record per request.

    A group may mix callers (requests from several connections): the
    requests at ``strangers`` come from a principal with no grants.
    """

    async def main() -> None:
        directory = Path(tempfile.mkdtemp(prefix="kb-", dir="/tmp"))
        config = parse_config({}, data_dir=directory / "data")
        async with open_broker(config, run_scheduler=False) as broker:
            ctx = local_context(f"uid:{os.getuid()}")
            stranger = local_context("uid:424242")
            contexts = [stranger if i in strangers else ctx for i in range(len(requests))]
            for name in ("g/a", "g/b"):
                await broker.dispatcher.handle(ctx, "key.create", {"name": name, "type": "aes256-gcm"})
            before = len(_records(broker))
            grouped = await broker.dispatcher.handle_group(contexts, "encrypt", [dict(r) for r in requests])
            single = await _one_by_one(broker, contexts, "encrypt", requests)
            assert [_code(o) for o in grouped] == [_code(o) for o in single]
            records = _records(broker)[before:]
            assert len(records) == 2 * len(requests)
            assert [r["outcome"] for r in records[: len(requests)]] == [
                r["outcome"] for r in records[len(requests) :]
            ]
            codes = [None if code == "ok" else code for code in map(_code, grouped)]
            assert [r["code"] for r in records[: len(requests)]] == codes
            assert [r["principal"] for r in records[: len(requests)]] == [c.principal.name for c in contexts]

            # Decrypt what was sealed (a few envelopes tampered with), grouped and one by one.
            sealed = [
                (r, o) for r, o in zip(requests, grouped, strict=True) if not isinstance(o, BrokerError)
            ]
            decrypts = []
            openers = []
            for index, (request, outcome) in enumerate(sealed):
                envelope = bytearray(outcome["ciphertext"])
                if index in tamper:
                    envelope[-1] ^= 1
                aad = {"aad": request["aad"]} if "aad" in request else {}
                decrypts.append({"ciphertext": bytes(envelope)} | aad)
                openers.append(stranger if len(decrypts) in strangers else ctx)
            if not decrypts:
                return
            opened = await broker.dispatcher.handle_group(openers, "decrypt", [dict(d) for d in decrypts])
            again = await _one_by_one(broker, openers, "decrypt", decrypts)
            assert [_code(o) for o in opened] == [_code(o) for o in again]
            for index, ((request, _), outcome) in enumerate(zip(sealed, opened, strict=True)):
                if openers[index] is stranger:
                    assert _code(outcome) == "permission_denied"
                elif index in tamper:
                    assert _code(outcome) == "decryption_failed"
                else:
                    assert outcome["plaintext"] == request["plaintext"] and outcome["key"] == request["key"]
            assert verify_audit_dir(config.audit_dir).ok

    trio.run(main)


async def test_changes_are_suspending_and_uses_and_reads_are_not(broker: Broker) -> None:
    # A change waits for its "requested" record's flush, so a connection hands
    # a lone one to a worker; a use or a read mostly answers without waiting,
    # so the reading task runs it itself.
    suspending = broker.dispatcher.suspending
    assert {"key.create", "key.rotate", "key.compromise", "key.schedule_destroy", "approve"} <= suspending
    assert not suspending & {"ping", "encrypt", "decrypt", "sign", "verify", "key.get", "key.list"}


async def test_group_respects_uses_per_version(admin: Caller, broker: Broker) -> None:
    """Ten queued encrypts under a 3-uses-per-version key rotate it as ten single calls would."""
    await admin("key.create", name="g/limited", type="aes256-gcm", max_uses_per_version=3)
    outcomes = await broker.dispatcher.handle_group(
        [admin.ctx] * 10, "encrypt", [{"key": "g/limited", "plaintext": b"%d" % i} for i in range(10)]
    )
    versions = Counter(o["version"] for o in outcomes)
    assert sum(versions.values()) == 10 and max(versions.values()) <= 3
    assert (await admin("key.get", name="g/limited"))["primary_version"] == max(versions)


async def test_group_from_an_unauthorized_principal(admin: Caller, broker: Broker) -> None:
    """Each request of a denied group is refused and audited as denied, one record each."""
    await admin("key.create", name="g/secret", type="aes256-gcm")
    sealed = await admin("encrypt", key="g/secret", plaintext=b"x")
    stranger = local_context("uid:424242")
    before = len(_records(broker))
    group = broker.dispatcher.handle_group
    denied = await group([stranger] * 3, "encrypt", [{"key": "g/secret", "plaintext": b"y"}] * 3)
    refused = await group([stranger] * 2, "decrypt", [{"ciphertext": sealed["ciphertext"]}] * 2)
    assert [_code(o) for o in denied + refused] == ["permission_denied"] * 5
    records = _records(broker)[before:]
    assert [(r["op"], r["outcome"], r["principal"]) for r in records] == [
        ("encrypt", "denied", "uid:424242")
    ] * 3 + [("decrypt", "denied", "uid:424242")] * 2


# --- over the socket --------------------------------------------------------------


async def test_pipelined_encrypts_and_decrypts(served: ServerInfo, make_config: ConfigFactory) -> None:
    """A burst of pipelined requests, a broken one among them: every msgid gets its own answer."""
    conn = await RawConn.open(served.socket_path)
    reply = await conn.call(1, "key.create", {"name": "g/wire", "type": "aes256-gcm"})
    assert reply.error is None
    burst = [[0, 100 + i, "encrypt", [{"key": "g/wire", "plaintext": b"item %d" % i}]] for i in range(60)]
    burst[30] = [0, 130, "encrypt", [{"key": "g/wire", "plaintext": "not bytes"}]]
    burst[40] = [0, 140, "encrypt", [{"key": "g/nope", "plaintext": b"x"}]]
    await conn.send(b"".join(msgpack.packb(m) for m in burst))
    with trio.fail_after(10):
        replies = {r.msgid: r for r in await conn.responses(len(burst))}
    assert sorted(replies) == [100 + i for i in range(60)]
    assert replies[130].error["code"] == InvalidArgument.code
    assert replies[140].error["code"] == NotFound.code
    sealed = {m: r.result["ciphertext"] for m, r in replies.items() if r.error is None}
    assert len(sealed) == 58
    await conn.send(
        b"".join(msgpack.packb([0, m + 1000, "decrypt", [{"ciphertext": c}]]) for m, c in sealed.items())
    )
    with trio.fail_after(10):
        opened = {r.msgid: r for r in await conn.responses(len(sealed))}
    assert {m - 1000: r.result["plaintext"] for m, r in opened.items()} == {
        m: b"item %d" % (m - 100) for m in sealed
    }
    audit_dir = make_config().audit_dir
    assert verify_audit_dir(audit_dir).ok
    ops = Counter(
        json.loads(line)["op"] for line in (audit_dir / "audit.jsonl").read_bytes().splitlines()
    )
    assert ops["encrypt"] == 60 and ops["decrypt"] == 58


class _GroupEcho:
    """A transport-level handler whose ``handle_group`` can misbehave on request."""

    groupable = frozenset({"g"})

    def __init__(self) -> None:
        self.groups: list[int] = []
        self.callers: list[set[int]] = []  # the connections of each group

    async def handle(self, ctx: RequestContext, method: str, params: dict[str, Any]) -> Any:
        if params.get("mode") == "slow":
            await trio.sleep(params["s"])
        return {"alone": params["n"]}

    async def handle_group(
        self, contexts: Sequence[RequestContext], method: str, params: list[dict[str, Any]]
    ) -> list[Any]:
        self.groups.append(len(params))
        self.callers.append({ctx.connection_id for ctx in contexts})
        mode = params[0].get("mode")
        if mode == "slow":
            await trio.sleep(params[0]["s"])
        if mode == "raise":
            raise NotFound("the whole group")
        if mode == "short":
            return [{"n": 0}]
        if mode == "bug":
            raise RuntimeError("handler bug")
        return [InvalidArgument("odd") if p["n"] % 2 else {"n": p["n"]} for p in params]

    def connection_closed(self, ctx: RequestContext) -> None:
        pass


@pytest.mark.parametrize(
    ("mode", "expect"),
    [(None, None), ("raise", "not_found"), ("short", "internal"), ("bug", "internal")],
)
async def test_connection_groups_queued_requests(mode: str | None, expect: str | None) -> None:
    handler = _GroupEcho()
    with tempfile.TemporaryDirectory(prefix="kb-", dir="/tmp") as directory:
        async with running_server(transport_config(Path(directory)), handler) as info:
            conn = await RawConn.open(info.socket_path)
            params = [{"n": i} | ({"mode": mode} if mode else {}) for i in range(40)]
            await conn.send(b"".join(msgpack.packb([0, i, "g", [p]]) for i, p in enumerate(params)))
            with trio.fail_after(10):
                replies = {r.msgid: r for r in await conn.responses(40)}
            # The connection still serves afterwards.
            alone = await conn.call(99, "g", {"n": 5})
    assert alone.result == {"alone": 5}
    assert sorted(replies) == list(range(40))
    assert max(handler.groups) > 1 and sum(handler.groups) == 40
    for n, reply in replies.items():
        if expect is not None:
            assert reply.error["code"] == expect
        elif n % 2:
            assert reply.error["code"] == "invalid_argument"
        else:
            assert reply.result == {"n": n}


# --- across connections -----------------------------------------------------------


async def _burst(conns: list[RawConn], method: str, params: list[dict[str, Any]], msgid: int) -> None:
    """One request on each connection, all written before the server can run."""
    for conn, p in zip(conns, params, strict=True):
        data = msgpack.packb([0, msgid, method, [p]])
        assert os.write(conn.stream.socket.fileno(), data) == len(data)
    await trio.sleep(0)


@pytest.mark.parametrize(("mode", "expect"), [(None, None), ("raise", "not_found"), ("bug", "internal")])
async def test_lone_requests_of_busy_connections_are_gathered(mode: str | None, expect: str | None) -> None:
    """Requests from many connections at once run as one group; each connection gets its own answer."""
    handler = _GroupEcho()
    with tempfile.TemporaryDirectory(prefix="kb-", dir="/tmp") as directory:
        async with running_server(transport_config(Path(directory)), handler) as info:
            gatherer = info.gatherer
            assert gatherer is not None
            # With nothing else in flight, a request runs alone (handle, not a group).
            blocker = await RawConn.open(info.socket_path)
            assert (await blocker.call(1, "g", {"n": 7})).result == {"alone": 7}
            # One that blocks keeps the server busy: what comes meanwhile is gathered.
            await blocker.request(2, "g", {"n": 0, "mode": "slow", "s": 30})
            while gatherer.inflight < 1:
                await trio.sleep(0.001)
            conns = [await RawConn.open(info.socket_path) for _ in range(12)]
            for round_ in range(3):
                params = [{"n": round_ * 100 + i} | ({"mode": mode} if mode else {}) for i in range(12)]
                await _burst(conns, "g", params, round_)
                with trio.fail_after(10):
                    replies = [await conn.response() for conn in conns]
                for p, reply in zip(params, replies, strict=True):
                    assert reply.msgid == round_
                    if expect is not None:
                        assert reply.error["code"] == expect
                    elif p["n"] % 2:
                        assert reply.error["code"] == "invalid_argument"
                    else:
                        assert reply.result == {"n": p["n"]}
            assert gatherer.inflight == 1  # the blocker
    # Every request went through a group, and groups held several connections.
    assert sum(handler.groups) == 36 and gatherer.groups == len(handler.groups)
    assert max(len(callers) for callers in handler.callers) > 1


@pytest.mark.parametrize("gather_poll_us", [0, 200_000])
async def test_after_a_group_the_loop_stays_awake_for_the_window(gather_poll_us: int) -> None:
    """Polling follows a group for gather_poll_us, then the gatherer sleeps; 0 turns it off."""
    handler = _GroupEcho()
    with tempfile.TemporaryDirectory(prefix="kb-", dir="/tmp") as directory:
        config = transport_config(Path(directory), gather_poll_us=gather_poll_us, busy_poll_us=0)
        async with running_server(config, handler) as info:
            gatherer = info.gatherer
            assert gatherer is not None
            await trio.sleep(0.05)
            assert gatherer.polls == 0  # nothing was run yet: asleep
            blocker = await RawConn.open(info.socket_path)
            await blocker.request(1, "g", {"n": 0, "mode": "slow", "s": 30})
            while gatherer.inflight < 1:
                await trio.sleep(0.001)
            conns = [await RawConn.open(info.socket_path) for _ in range(3)]
            await _burst(conns, "g", [{"n": 2 * i} for i in range(3)], 2)
            with trio.fail_after(5):
                assert [(await c.response()).result for c in conns] == [{"n": 0}, {"n": 2}, {"n": 4}]
            await trio.sleep(0.01)
            if not gather_poll_us:
                assert gatherer.polls == 0
                return
            assert gatherer.polls > 0  # polling after the group
            # A request that lands meanwhile is gathered without a wake-up.
            await _burst(conns, "g", [{"n": 6}, {"n": 8}, {"n": 10}], 3)
            with trio.fail_after(5):
                assert [(await c.response()).result for c in conns] == [{"n": 6}, {"n": 8}, {"n": 10}]
            await trio.sleep(0.3)  # the window passed: asleep again
            settled = gatherer.polls
            await trio.sleep(0.05)
            assert gatherer.polls == settled


async def test_a_slow_group_does_not_hold_back_the_next() -> None:
    """A group that suspends hands the gathering on; a drain still waits for its answers."""
    handler = _GroupEcho()
    with tempfile.TemporaryDirectory(prefix="kb-", dir="/tmp") as directory:
        async with running_server(transport_config(Path(directory)), handler) as info:
            gatherer = info.gatherer
            assert gatherer is not None
            slow = [await RawConn.open(info.socket_path) for _ in range(3)]
            fast = [await RawConn.open(info.socket_path) for _ in range(3)]
            await _burst(slow, "g", [{"n": i, "mode": "slow", "s": 1.5} for i in range(3)], 1)
            # The first runs alone (nothing else in flight) and blocks; the
            # other two are gathered, as the server is busy, into a slow group.
            while gatherer.inflight < 3 or sum(handler.groups) < 2:  # ... and it has started
                await trio.sleep(0.001)
            with trio.fail_after(1):  # well before the slow group ends
                for round_ in range(3):
                    await _burst(fast, "g", [{"n": 2 * i} for i in range(3)], 10 + round_)
                    assert [(await c.response()).result for c in fast] == [{"n": 2 * i} for i in range(3)]
            assert gatherer.inflight == 3  # the slow requests are all still running
            with trio.fail_after(5):
                await info.drain()  # waits for the slow requests
            replies = [await conn.response() for conn in slow]
    assert [r.msgid for r in replies] == [1, 1, 1]
    alone = [r.result for r in replies if r.result is not None and "alone" in r.result]
    assert len(alone) == 1  # whichever was read first
    for n, reply in enumerate(replies):
        if reply.result != {"alone": n}:
            assert (reply.result, reply.error) == (({"n": n}, None) if n % 2 == 0 else (None, reply.error))
            assert n % 2 == 0 or reply.error["code"] == "invalid_argument"


async def test_a_failed_answer_spares_the_rest_of_its_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug while answering one gathered request: the others are answered, the server serves on."""
    handler = _GroupEcho()
    original = Connection.answer

    def answer(self: Connection, request: Any, outcome: Any) -> None:
        if request.params["n"] == 4:
            raise RuntimeError("bug while answering")
        original(self, request, outcome)

    monkeypatch.setattr(Connection, "answer", answer)
    with tempfile.TemporaryDirectory(prefix="kb-", dir="/tmp") as directory:
        async with running_server(transport_config(Path(directory)), handler) as info:
            assert info.gatherer is not None
            blocker = await RawConn.open(info.socket_path)
            await blocker.request(1, "g", {"n": 1, "mode": "slow", "s": 30})  # keeps the server busy
            while info.gatherer.inflight < 1:
                await trio.sleep(0.001)
            conns = [await RawConn.open(info.socket_path) for _ in range(4)]
            await _burst(conns, "g", [{"n": 2 * i} for i in range(4)], 5)
            with trio.fail_after(5):
                answered = [await conn.response() for i, conn in enumerate(conns) if i != 2]
            assert [r.result for r in answered] == [{"n": 0}, {"n": 2}, {"n": 6}]
            await _burst(conns[:1], "g", [{"n": 8}], 6)
            with trio.fail_after(5):
                assert (await conns[0].response()).result == {"n": 8}


# --- through the read hub ---------------------------------------------------------


async def test_the_hub_hands_lone_requests_to_the_gatherer_without_waking_readers() -> None:
    """Parked readers stay parked: the hub reads each request and gives it to the gatherer."""
    handler = _GroupEcho()
    with tempfile.TemporaryDirectory(prefix="kb-", dir="/tmp") as directory:
        # No busy polling: every reader parks with the hub once its socket is empty.
        async with running_server(transport_config(Path(directory), busy_poll_us=0), handler) as info:
            gatherer, hub = info.gatherer, info.hub
            assert gatherer is not None and hub is not None
            blocker = await RawConn.open(info.socket_path)
            await blocker.request(1, "g", {"n": 0, "mode": "slow", "s": 30})
            while gatherer.inflight < 1:
                await trio.sleep(0.001)
            conns = [await RawConn.open(info.socket_path) for _ in range(6)]
            await trio.sleep(0.01)  # their readers find nothing and park
            for round_ in range(4):
                params = [{"n": 2 * (round_ * 10 + i)} for i in range(6)]
                await _burst(conns, "g", params, round_)
                with trio.fail_after(10):
                    replies = [await conn.response() for conn in conns]
                assert [(r.msgid, r.result) for r in replies] == [(round_, p) for p in params]
            assert hub.handled == 24  # every one, without a reader woken
            assert hub.events == 24
            assert sum(handler.groups) == 24
            # A connection the hub reads garbage from is closed; the others still serve.
            bad = await RawConn.open(info.socket_path)
            await trio.sleep(0.01)
            os.write(bad.stream.socket.fileno(), b"\xc1")
            with trio.fail_after(5):
                await bad.expect_closed()
            await _burst(conns, "g", [{"n": 100}] * 6, 9)
            with trio.fail_after(10):
                assert [(await conn.response()).result for conn in conns] == [{"n": 100}] * 6


async def test_on_an_idle_server_a_reader_sleeps_with_trio_not_the_hub() -> None:
    """A lone client on an otherwise idle server: its reader runs each request, and the hub is
    never woken for it (nothing would be gathered, and trio wakes the reader one hop sooner)."""
    handler = EchoHandler()
    with tempfile.TemporaryDirectory(prefix="kb-", dir="/tmp") as directory:
        async with running_server(transport_config(Path(directory), busy_poll_us=0), handler) as info:
            hub = info.hub
            assert hub is not None
            conn = await RawConn.open(info.socket_path)
            for i in range(5):
                await trio.sleep(0.005)  # the reader sleeps
                assert (await conn.call(i, "echo", {"i": i})).result == {"i": i}
            assert hub.events == 0
            # One task ran them all: the connection's reader, woken for each.
            assert len(set(handler.tasks)) == 1
            # Pipelined requests are all answered too.
            await conn.send(b"".join(msgpack.packb([0, 10 + i, "echo", [{"i": i}]]) for i in range(20)))
            with trio.fail_after(10):
                replies = await conn.responses(20)
            assert sorted(r.msgid for r in replies) == list(range(10, 30))


class _Conn:
    def __init__(self, connection_id: int) -> None:
        self.connection_id = connection_id


async def test_busy_elsewhere_means_other_connections_have_work() -> None:
    gatherer = Gatherer(_GroupEcho())
    mine, other = _Conn(1), _Conn(2)
    assert not gatherer.busy_elsewhere(mine, 0)  # type: ignore[arg-type]
    gatherer.inflight = 2
    assert not gatherer.busy_elsewhere(mine, 2)  # type: ignore[arg-type]  # all of them mine
    assert gatherer.busy_elsewhere(mine, 1)  # type: ignore[arg-type]
    gatherer.inflight = 0
    # A lone request just read from another connection (answered at once) counts, for a moment.
    assert not gatherer.takes(other, "g")  # type: ignore[arg-type]
    assert gatherer.busy_elsewhere(mine, 0)  # type: ignore[arg-type]
    assert not gatherer.busy_elsewhere(other, 0)  # type: ignore[arg-type]  # its own does not
    await trio.sleep(2 * GATHER_WINDOW_S)
    assert not gatherer.busy_elsewhere(mine, 0)  # type: ignore[arg-type]
