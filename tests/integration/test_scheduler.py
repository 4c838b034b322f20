"""The lifecycle runs itself: scheduled and usage-based rotation, activation,
deactivation and destruction, on a fake clock and across restarts."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from broker.app import Broker, open_broker
from broker.client import AsyncClient
from broker.config import Config
from broker.envelope import parse_header
from broker.errors import BrokerError, Unavailable
from broker.keys import Classification, Key, KeyType
from broker.lifecycle import new_key
from broker.protocol import Notification
from broker.scheduler import PAUSE_PER_PASS_TIME, Action, Scheduler, due_action
from broker.service import KeyService
from broker.subscriptions import MAX_PREFIXES
from tests._transport_helpers import RawConn
from tests.conftest import Caller, ConfigFactory

DAY = 86_400
T0 = 1_900_000_000


@dataclass
class FakeClock:
    now: float = T0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def fails(call: Any, code: str) -> None:
    with pytest.raises(BrokerError) as info:
        await call
    assert info.value.code == code, info.value.message


def opened(config: Config, clock: FakeClock) -> Any:
    return open_broker(config, clock=clock, run_scheduler=False)


def audit_records(broker: Broker, principal: str) -> list[dict[str, Any]]:
    lines = (broker.config.audit_dir / "audit.jsonl").read_bytes().splitlines()
    return [r for r in map(json.loads, lines) if r["principal"] == principal]


def audit_ops(broker: Broker, principal: str) -> list[str]:
    """The operations ``principal`` carried out, each after its durable "requested" record."""
    records = audit_records(broker, principal)
    done = []
    for before, record in itertools.pairwise([{"outcome": None}, *records]):
        if record["outcome"] == "allowed":
            assert (before["outcome"], before.get("op")) == ("requested", record["op"]), record
            done.append(record["op"])
    return done


async def test_thirty_day_rotation_over_a_year_across_a_restart(
    make_config: ConfigFactory, owner: str
) -> None:
    config, clock = make_config(), FakeClock()
    async with opened(config, clock) as broker:
        await Caller(broker, owner)("key.create", name="r", type="aes256-gcm", rotation_period_s=30 * DAY)
        for _ in range(180):
            clock.advance(DAY)
            await broker.scheduler.run_once()
    async with opened(config, clock) as broker:  # a restart, no downtime
        for _ in range(185):
            clock.advance(DAY)
            await broker.scheduler.run_once()
        meta = await Caller(broker, owner)("key.get", name="r")
        assert audit_ops(broker, "scheduler") == ["key.rotate"] * 12
    created = [v["created_at"] for v in meta["versions"]]
    assert len(created) == 13  # 365 days / 30 = 12 rotations
    assert all(b - a == 30 * DAY for a, b in itertools.pairwise(created))
    assert meta["next_rotation_at"] == created[-1] + 30 * DAY


async def test_a_stale_page_never_rotates_what_is_no_longer_due(
    make_config: ConfigFactory, owner: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    async with opened(make_config(), clock) as broker:
        admin = Caller(broker, owner)
        await admin("key.create", name="r", type="aes256-gcm", rotation_period_s=DAY)
        clock.advance(2 * DAY)
        # The scheduler reads its page; then, before it acts, an admin steps in.
        stale = await broker.service.list_scheduled(limit=10, after=None)
        await admin("key.rotate", name="r")

        async def listed(**_: Any) -> list[Key]:
            return stale

        monkeypatch.setattr(broker.service, "list_scheduled", listed)
        assert await broker.scheduler.run_once() == 0
        assert (await admin("key.get", name="r"))["primary_version"] == 2
        assert [(r["op"], r["outcome"]) for r in audit_records(broker, "scheduler")] == [
            ("key.rotate", "requested"), ("key.rotate", "error"),
        ]


async def test_missed_periods_rotate_once_on_start(make_config: ConfigFactory, owner: str) -> None:
    config, clock = make_config(), FakeClock()
    async with opened(config, clock) as broker:
        await Caller(broker, owner)("key.create", name="r", type="hmac-sha256", rotation_period_s=30 * DAY)
    clock.advance(100 * DAY)  # the broker was down for more than three periods
    async with opened(config, clock) as broker:
        assert await broker.scheduler.run_once() == 1
        assert await broker.scheduler.run_once() == 0
        clock.advance(29 * DAY)
        assert await broker.scheduler.run_once() == 0
        clock.advance(DAY)
        assert await broker.scheduler.run_once() == 1
        meta = await Caller(broker, owner)("key.get", name="r")
    assert meta["primary_version"] == 3


async def test_activation_and_deactivation_on_time(make_config: ConfigFactory, owner: str) -> None:
    clock = FakeClock()
    async with opened(make_config(), clock) as broker:
        admin = Caller(broker, owner)
        meta = await admin("key.create", name="p", type="aes256-gcm", activate_at=T0 + 100,
                           deactivate_at=T0 + 500)
        assert meta["state"] == "pre_active" and meta["activate_at"] == T0 + 100
        clock.advance(99)
        await broker.scheduler.run_once()
        await fails(admin("encrypt", key="p", plaintext=b"x"), "invalid_state")
        clock.advance(1)
        await broker.scheduler.run_once()
        assert (await admin("key.get", name="p"))["state"] == "active"
        ct = (await admin("encrypt", key="p", plaintext=b"x"))["ciphertext"]
        clock.advance(400)
        await broker.scheduler.run_once()
        assert (await admin("key.get", name="p"))["state"] == "deactivated"
        assert (await admin("decrypt", ciphertext=ct))["plaintext"] == b"x"
        assert audit_ops(broker, "scheduler") == ["key.activate", "key.deactivate"]


async def test_destroyed_after_the_grace_period(make_config: ConfigFactory, owner: str) -> None:
    clock = FakeClock()
    async with opened(make_config(), clock) as broker:
        admin = Caller(broker, owner)
        await admin("key.create", name="d", type="aes256-gcm")
        ct = (await admin("encrypt", key="d", plaintext=b"old"))["ciphertext"]
        await admin("key.rotate", name="d")
        meta = await admin("key.schedule_destroy", name="d", pending_days=7)
        assert meta["destroy_at"] == T0 + 7 * DAY
        clock.advance(7 * DAY - 1)
        assert await broker.scheduler.run_once() == 0
        clock.advance(1)
        assert await broker.scheduler.run_once() == 1
        meta = await admin("key.get", name="d")
        assert meta["state"] == "destroyed"
        assert {v["state"] for v in meta["versions"]} == {"destroyed"}
        await fails(admin("decrypt", ciphertext=ct), "invalid_state")
        await fails(admin("encrypt", key="d", plaintext=b"x"), "invalid_state")
        stored = await broker.store.get_key("d")
        assert stored is not None and all(v.material == b"" for v in stored.versions)
        await fails(admin("key.cancel_destroy", name="d"), "invalid_state")


async def test_usage_rotation_under_concurrent_batches(make_config: ConfigFactory, owner: str) -> None:
    limit = 1000
    async with open_broker(make_config(), run_scheduler=False) as broker:
        admin = Caller(broker, owner)
        await admin("key.create", name="u", type="aes256-gcm", max_uses_per_version=limit)
        sealed: list[bytes] = []

        async def client(seed: int) -> None:
            for i in range(10):
                batch = [b"x"] * (37 + (seed * 7 + i * 13) % 60)
                sealed.extend((await admin("encrypt_batch", key="u", items=batch))["ciphertexts"])

        async with trio.open_nursery() as nursery:
            for seed in range(20):
                nursery.start_soon(client, seed)
        per_version = Counter(parse_header(c).version for c in sealed)
        assert len(per_version) >= len(sealed) // limit
        assert max(per_version.values()) <= limit
        meta = await admin("key.get", name="u")
        assert all(v["uses"] <= limit for v in meta["versions"])
        assert sum(per_version.values()) == len(sealed)


def test_due_action_is_pure() -> None:
    key = new_key(key_id=b"k" * 16, name="k", key_type=KeyType.AES256_GCM, protection="software",
                  classification=Classification.INTERNAL, material=b"m", now=T0, rotation_period_s=10)
    assert due_action(key, T0 + 9) is None
    due = due_action(key, T0 + 10)
    assert due is not None and due.action is Action.ROTATE


@pytest.fixture
async def governed(make_config: ConfigFactory, owner: str) -> AsyncIterator[Broker]:
    config = make_config({"plugins": {
        "governance": {"critical": {"protection": ["software"], "exportable": False,
                                    "max_rotation_period_days": 90, "destroy_approvals": 2}},
        "rbac": {"grants": [
            {"principals": ["alice", "bob"], "roles": ["admin"], "keys": ["*"]},
            {"principals": ["app"], "roles": ["app"], "keys": ["*"]},
        ]},
    }})
    async with open_broker(config, run_scheduler=False) as broker:
        yield broker


async def test_governance_rules_name_the_rule(make_config: ConfigFactory, owner: str) -> None:
    async with open_broker(make_config(), run_scheduler=False) as broker:  # built-in defaults
        admin = Caller(broker, owner)
        with pytest.raises(BrokerError) as info:
            await admin("key.create", name="c", type="aes256-gcm", classification="critical",
                        rotation_period_s=30 * DAY)
        assert info.value.code == "invalid_argument"
        assert "critical.protection" in info.value.message
        assert any("critical.protection" in r for r in info.value.details["rules"])


async def test_governance_on_update_and_exportable(governed: Broker, owner: str) -> None:
    admin = Caller(governed, owner)
    await fails(admin("key.create", name="c", type="aes256-gcm", classification="critical"),
                "invalid_argument")
    await fails(admin("key.create", name="c", type="aes256-gcm", classification="critical",
                      rotation_period_s=30 * DAY, exportable=True), "invalid_argument")
    await admin("key.create", name="c", type="aes256-gcm", classification="critical",
                rotation_period_s=30 * DAY)
    await fails(admin("key.update", name="c", rotation_period_s=100 * DAY), "invalid_argument")
    await fails(admin("key.update", name="c", rotation_period_s=0), "invalid_argument")


async def test_a_rule_made_stricter_holds_for_export_and_never_stops_rotation(
    make_config: ConfigFactory, owner: str
) -> None:
    async with open_broker(make_config(), run_scheduler=False) as broker:
        await Caller(broker, owner)(
            "key.create", name="old", type="aes256-gcm", classification="confidential",
            rotation_period_s=180 * DAY, exportable=True,
        )
    rules = {"exportable": False, "max_rotation_period_days": 90}
    stricter = {"plugins": {"governance": {"confidential": rules}}}
    async with open_broker(make_config(stricter), run_scheduler=False) as broker:
        admin = Caller(broker, owner)
        # Rotating fixes nothing the rules ask for, and refusing would only keep the old material.
        assert (await admin("key.rotate", name="old"))["primary_version"] == 2
        public = rsa.generate_private_key(public_exponent=65537, key_size=3072).public_key()
        pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        with pytest.raises(BrokerError) as refused:
            await admin("key.export", name="old", public_key=pem.decode())
        assert refused.value.code == "permission_denied"
        assert refused.value.details == {"rule": "confidential.exportable"}
        # An update is held to the rule it can change, and may bring the key into it.
        await fails(admin("key.update", name="old", rotation_period_s=100 * DAY), "invalid_argument")
        await admin("key.update", name="old", rotation_period_s=30 * DAY)


async def test_two_admin_destroy(governed: Broker, owner: str) -> None:
    requester, alice, bob, app = (Caller(governed, p) for p in (owner, "alice", "bob", "app"))
    await requester("key.create", name="c", type="aes256-gcm", classification="critical",
                    rotation_period_s=30 * DAY)
    with pytest.raises(BrokerError) as info:
        await requester("key.schedule_destroy", name="c")
    assert info.value.code == "approval_required"
    request_id = info.value.details["request_id"]
    # Asking again gives the same pending request.
    with pytest.raises(BrokerError) as again:
        await requester("key.schedule_destroy", name="c")
    assert again.value.details["request_id"] == request_id

    await fails(requester("approve", request_id=request_id), "permission_denied")
    await fails(app("approve", request_id=request_id), "permission_denied")
    # An approver who names another key approves nothing.
    await requester("key.create", name="other", type="aes256-gcm")
    await fails(alice("approve", request_id=request_id, name="other"), "invalid_argument")
    approved = await alice("approve", request_id=request_id, name="c")
    # The approver is told what they approved.
    what = {"key": "c", "op": "key.schedule_destroy", "requester": owner}
    assert {k: approved.pop(k) for k in what} == what
    assert approved.pop("params")["pending_days"] == 30 and approved.pop("expires_at") > 0
    assert approved == {"approvals": 1, "required": 2, "done": False}
    # One admin twice is still one approval.
    assert (await alice("approve", request_id=request_id))["approvals"] == 1
    assert (await alice("key.get", name="c"))["state"] == "active"
    done = await bob("approve", request_id=request_id)
    assert (done["approvals"], done["required"], done["done"]) == (2, 2, True)
    meta = await alice("key.get", name="c")
    assert meta["state"] == "destroy_pending"
    await fails(bob("approve", request_id=request_id), "not_found")
    # What could never be carried out is refused before anyone is asked to approve it.
    await fails(requester("key.schedule_destroy", name="c"), "invalid_state")
    await requester("key.create", name="d", type="aes256-gcm", classification="critical",
                    rotation_period_s=30 * DAY)
    await fails(requester("key.schedule_destroy", name="d", pending_days=3), "invalid_argument")


async def test_approvals_expire(make_config: ConfigFactory, owner: str) -> None:
    clock = FakeClock()
    config = make_config({
        "scheduler": {"approval_ttl_s": 3600},
        "plugins": {
            "governance": {"internal": {"destroy_approvals": 1}},
            "rbac": {"grants": [{"principals": ["alice"], "roles": ["admin"], "keys": ["*"]}]},
        },
    })
    async with opened(config, clock) as broker:
        admin, alice = Caller(broker, owner), Caller(broker, "alice")
        await admin("key.create", name="k", type="aes256-gcm")
        with pytest.raises(BrokerError) as info:
            await admin("key.schedule_destroy", name="k")
        clock.advance(3600)
        await fails(alice("approve", request_id=info.value.details["request_id"]), "not_found")


async def test_subscriber_sees_rotation_within_a_second(served: Any) -> None:
    async with AsyncClient(served.socket_path) as watcher, AsyncClient(served.socket_path) as admin:
        await admin.key_create("svc/k", "aes256-gcm")
        await admin.key_create("other/k", "aes256-gcm")
        events = watcher.subscribe("svc/")
        seen: list[dict[str, Any]] = []

        async def watch() -> None:
            async for event in events:
                seen.append(event)
                if event["event"] == "rotated":
                    return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            await trio.sleep(0.1)
            await admin.key_rotate("other/k")
            started = trio.current_time()
            await admin.key_rotate("svc/k")
            with trio.fail_after(1.0):
                while not seen or seen[-1]["event"] != "rotated":
                    await trio.sleep(0.005)
            assert trio.current_time() - started < 1.0
        assert [(e["name"], e["event"], e["version"]) for e in seen] == [("svc/k", "rotated", 2)]


async def test_subscribing_again_adds_a_prefix_and_each_event_comes_once(served: Any) -> None:
    watcher = await RawConn.open(served.socket_path)
    async with AsyncClient(served.socket_path) as admin:
        await admin.key_create("svc/k", "aes256-gcm")
        await admin.key_create("other/k", "aes256-gcm")
        for msgid, prefix in enumerate(("svc/", "svc/k", "other/")):
            assert (await watcher.call(msgid, "subscribe", {"prefix": prefix})).result == {}
        await admin.key_rotate("svc/k")  # under two of the prefixes
        await admin.key_rotate("other/k")
        await admin.key_create("third/k", "aes256-gcm")  # under none
        await admin.key_rotate("svc/k")
        seen = []
        with trio.fail_after(5):
            while len(seen) < 3:
                event = await watcher.next()
                assert isinstance(event, Notification)
                seen.extend((e["name"], e["version"]) for e in event.params)
    assert seen == [("svc/k", 2), ("other/k", 2), ("svc/k", 3)]
    with trio.move_on_after(0.2):
        extra = await watcher.next()
        raise AssertionError(f"an event came twice: {extra}")
    await watcher.aclose()


async def test_subscribed_prefixes_are_kept_once_and_capped(served: Any) -> None:
    watcher = await RawConn.open(served.socket_path)
    for msgid in range(MAX_PREFIXES + 10):  # one prefix, however often
        assert (await watcher.call(msgid, "subscribe", {"prefix": "svc/"})).error is None
    for msgid in range(1, MAX_PREFIXES):
        assert (await watcher.call(msgid, "subscribe", {"prefix": f"p{msgid}/"})).error is None
    refused = await watcher.call(0, "subscribe", {"prefix": "one-too-many/"})
    assert refused.error["code"] == "limit_exceeded"
    assert refused.error["details"] == {"limit": MAX_PREFIXES}
    await watcher.aclose()


async def test_a_long_pass_stretches_the_pause_after_it(autojump_clock: trio.testing.MockClock) -> None:
    # A pass reads every key; with very many keys the pause after it grows
    # with it, so the scheduler never takes more than a few percent of time.
    starts: list[float] = []

    class Timed(Scheduler):
        async def run_once(self) -> int:
            starts.append(trio.current_time())
            await trio.sleep(2.0 if len(starts) == 1 else 0.0)  # the first pass is long
            return 0

    timed = Timed(service=None, audit=None, is_leader=lambda: True)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(timed.run, 5.0)
        await trio.sleep(60)
        nursery.cancel_scope.cancel()
    assert starts[1] - starts[0] == pytest.approx(2.0 + 2.0 * PAUSE_PER_PASS_TIME)
    assert starts[2] - starts[1] == pytest.approx(5.0)  # a quick pass: the configured interval


async def test_a_store_without_list_scheduled_has_every_key_read() -> None:
    # list_scheduled is newer than the Store interface's first version: a
    # third-party store without it still gets a working scheduler.
    seen: list[dict[str, Any]] = []
    plain = new_key(
        key_id=bytes(16),
        name="plain",
        key_type=KeyType.AES256_GCM,
        protection="software",
        classification=Classification.INTERNAL,
        material=b"m",
        now=1,
    )
    everything = [plain]

    class ListOnly:
        async def list_keys(self, **query: Any) -> list[Key]:
            seen.append(query)
            return everything

    service = KeyService(store=ListOnly(), backends={}, plugins=None)  # type: ignore[arg-type]
    assert await service.list_scheduled(limit=7, after="a") == everything
    assert seen == [{"prefix": "", "state": None, "after": "a", "limit": 7}]


async def test_a_key_whose_action_keeps_failing_is_retried_less_and_less_often(
    make_config: ConfigFactory, owner: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    async with opened(make_config(), clock) as broker:
        await Caller(broker, owner)("key.create", name="flaky", type="aes256-gcm", rotation_period_s=10)
        clock.advance(11)
        rotate = broker.service.rotate
        attempts: list[float] = []

        async def unavailable(name: str, **kw: Any) -> Key:
            attempts.append(clock.now)
            raise Unavailable("the key's custody is unreachable")

        monkeypatch.setattr(broker.service, "rotate", unavailable)
        started = clock.now
        for _ in range(40):  # passes every 5 s for 200 s
            await broker.scheduler.run_once()
            clock.advance(5)
        # Tried at once, then 30 s later, then 60 s after that (the next is
        # due 120 s on, past the 200 s): not at every pass.
        assert [t - started for t in attempts] == [0, 30, 90]
        failed = [r for r in audit_records(broker, "scheduler") if r["outcome"] == "error"]
        assert len(failed) == len(attempts) and all(r["code"] == "unavailable" for r in failed)
        monkeypatch.setattr(broker.service, "rotate", rotate)
        clock.advance(900)
        assert await broker.scheduler.run_once() == 1
        assert (await Caller(broker, owner)("key.get", name="flaky"))["primary_version"] == 2
