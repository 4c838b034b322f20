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
from broker.connection import RequestContext
from broker.errors import BrokerError, InvalidArgument, NotFound
from broker.server import ServerInfo
from tests._transport_helpers import RawConn, running_server
from tests._transport_helpers import make_config as transport_config
from tests.conftest import Caller, ConfigFactory, local_context


def _records(broker: Broker) -> list[dict[str, Any]]:
    lines = (broker.config.audit_dir / "audit.jsonl").read_bytes().splitlines()
    return [json.loads(line) for line in lines]


def _code(outcome: Any) -> str:
    return outcome.code if isinstance(outcome, BrokerError) else "ok"


async def _one_by_one(
    broker: Broker, ctx: RequestContext, method: str, params: list[dict[str, Any]]
) -> list[Any]:
    outcomes: list[Any] = []
    for request in params:
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
@given(requests=st.lists(_ENCRYPT, min_size=1, max_size=24), tamper=st.sets(st.integers(0, 23)))
def test_group_answers_as_one_by_one(requests: list[dict[str, Any]], tamper: set[int]) -> None:
    """Same outcome codes, ciphertexts that open to the same plaintexts, one record per request."""

    async def main() -> None:
        directory = Path(tempfile.mkdtemp(prefix="kb-", dir="/tmp"))
        config = parse_config({}, data_dir=directory / "data")
        async with open_broker(config, run_scheduler=False) as broker:
            ctx = local_context(f"uid:{os.getuid()}")
            for name in ("g/a", "g/b"):
                await broker.dispatcher.handle(ctx, "key.create", {"name": name, "type": "aes256-gcm"})
            before = len(_records(broker))
            grouped = await broker.dispatcher.handle_group(ctx, "encrypt", [dict(r) for r in requests])
            single = await _one_by_one(broker, ctx, "encrypt", requests)
            assert [_code(o) for o in grouped] == [_code(o) for o in single]
            records = _records(broker)[before:]
            assert len(records) == 2 * len(requests)
            assert [r["outcome"] for r in records[: len(requests)]] == [
                r["outcome"] for r in records[len(requests) :]
            ]
            codes = [None if code == "ok" else code for code in map(_code, grouped)]
            assert [r["code"] for r in records[: len(requests)]] == codes

            # Decrypt what was sealed (a few envelopes tampered with), grouped and one by one.
            sealed = [
                (r, o) for r, o in zip(requests, grouped, strict=True) if not isinstance(o, BrokerError)
            ]
            decrypts = []
            for index, (request, outcome) in enumerate(sealed):
                envelope = bytearray(outcome["ciphertext"])
                if index in tamper:
                    envelope[-1] ^= 1
                aad = {"aad": request["aad"]} if "aad" in request else {}
                decrypts.append({"ciphertext": bytes(envelope)} | aad)
            if not decrypts:
                return
            opened = await broker.dispatcher.handle_group(ctx, "decrypt", [dict(d) for d in decrypts])
            again = await _one_by_one(broker, ctx, "decrypt", decrypts)
            assert [_code(o) for o in opened] == [_code(o) for o in again]
            for index, ((request, _), outcome) in enumerate(zip(sealed, opened, strict=True)):
                if index in tamper:
                    assert _code(outcome) == "decryption_failed"
                else:
                    assert outcome["plaintext"] == request["plaintext"] and outcome["key"] == request["key"]
            assert verify_audit_dir(config.audit_dir).ok

    trio.run(main)


async def test_group_respects_uses_per_version(admin: Caller, broker: Broker) -> None:
    """Ten queued encrypts under a 3-uses-per-version key rotate it as ten single calls would."""
    await admin("key.create", name="g/limited", type="aes256-gcm", max_uses_per_version=3)
    outcomes = await broker.dispatcher.handle_group(
        admin.ctx, "encrypt", [{"key": "g/limited", "plaintext": b"%d" % i} for i in range(10)]
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
    denied = await group(stranger, "encrypt", [{"key": "g/secret", "plaintext": b"y"}] * 3)
    refused = await group(stranger, "decrypt", [{"ciphertext": sealed["ciphertext"]}] * 2)
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

    async def handle(self, ctx: RequestContext, method: str, params: dict[str, Any]) -> Any:
        return {"alone": params["n"]}

    async def handle_group(self, ctx: RequestContext, method: str, params: list[dict[str, Any]]) -> list[Any]:
        self.groups.append(len(params))
        mode = params[0].get("mode")
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
