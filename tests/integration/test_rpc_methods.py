"""Every method of docs/protocol.md through the method table of a real in-process
broker (SQLite store, software keys, audit file), happy paths and error codes."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from typing import Any

import msgpack
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from broker.app import Broker, open_broker
from broker.audit import verify_audit_dir
from broker.envelope import parse_header
from broker.errors import BrokerError, Unavailable
from broker.keys import KeyState
from tests.conftest import Caller, ConfigFactory


async def fails(call: Any, code: str) -> BrokerError:
    with pytest.raises(BrokerError) as info:
        await call
    assert info.value.code == code, info.value.message
    return info.value


def audit_records(broker: Broker) -> list[dict[str, Any]]:
    path = broker.config.audit_dir / "audit.jsonl"
    return [json.loads(line) for line in path.read_bytes().splitlines()]


async def test_ping_and_whoami(admin: Caller, owner: str) -> None:
    ping = await admin("ping")
    assert ping["protocol"] == 1 and ping["version"] and ping["node"]
    assert await admin("whoami") == {"principal": owner, "roles": ["admin"]}


@pytest.mark.parametrize("key_type", ["aes256-gcm", "hmac-sha256", "ed25519", "ecdsa-p256", "rsa-3072"])
async def test_create_every_type(admin: Caller, key_type: str) -> None:
    meta = await admin("key.create", name="t/k1", type=key_type, labels={"team": "x"})
    assert meta["name"] == "t/k1" and meta["type"] == key_type
    assert meta["state"] == "active" and meta["primary_version"] == 1
    assert meta["protection"] == "software" and meta["classification"] == "internal"
    assert len(meta["id"]) == 16 and meta["labels"] == {"team": "x"}
    assert meta["versions"][0]["version"] == 1
    assert await admin("key.get", name="t/k1") == meta


async def test_create_errors(admin: Caller) -> None:
    await admin("key.create", name="dup", type="aes256-gcm")
    await fails(admin("key.create", name="dup", type="aes256-gcm"), "already_exists")
    for bad in ("", "Upper", "-lead", "x" * 129, "sp ace"):
        await fails(admin("key.create", name=bad, type="aes256-gcm"), "invalid_argument")
    await fails(admin("key.create", name="k", type="des"), "invalid_argument")
    await fails(admin("key.create", name="k", type="aes256-gcm", colour="red"), "invalid_argument")
    await fails(admin("key.create", name="k", type="aes256-gcm", exportable="yes"), "invalid_argument")
    # Random nonces bound an AES-GCM version to 2^32 encryptions.
    for limit in (0, 2**32 + 1):
        refused = admin("key.create", name="lim", type="aes256-gcm", max_uses_per_version=limit)
        await fails(refused, "invalid_argument")
    await admin("key.create", name="lim", type="aes256-gcm", max_uses_per_version=2**32)
    await fails(admin("key.update", name="lim", max_uses_per_version=2**40), "invalid_argument")
    await admin("key.create", name="lim-mac", type="hmac-sha256", max_uses_per_version=2**40)
    await fails(admin("key.create", name="k", type="aes256-gcm", max_uses_per_version=0), "invalid_argument")
    err = await fails(admin("key.create", name="k", type="aes256-gcm", protection="hsm"), "invalid_argument")
    assert "hsm" in err.message.lower()
    await fails(admin("key.create", type="aes256-gcm"), "invalid_argument")
    # A nil optional field counts as absent.
    meta = await admin("key.create", name="k", type="aes256-gcm", labels=None, protection=None)
    assert meta["labels"] == {}


async def test_get_list_and_pagination(admin: Caller) -> None:
    await fails(admin("key.get", name="nope"), "not_found")
    for i in range(5):
        await admin("key.create", name=f"p/{i}", type="aes256-gcm")
    await admin("key.create", name="q/0", type="aes256-gcm")
    await admin("key.disable", name="p/3")
    page = await admin("key.list", prefix="p/", limit=2)
    names = [k["name"] for k in page["keys"]]
    assert names == ["p/0", "p/1"] and page["cursor"] == "p/1"
    while page["cursor"] is not None:
        page = await admin("key.list", prefix="p/", limit=2, cursor=page["cursor"])
        names += [k["name"] for k in page["keys"]]
    assert names == [f"p/{i}" for i in range(5)]
    disabled = await admin("key.list", state="disabled")
    assert [k["name"] for k in disabled["keys"]] == ["p/3"]
    await fails(admin("key.list", state="sleepy"), "invalid_argument")


async def test_encrypt_decrypt(admin: Caller) -> None:
    meta = await admin("key.create", name="e", type="aes256-gcm")
    out = await admin("encrypt", key="e", plaintext=b"secret", aad=b"ctx")
    assert out["version"] == 1
    header = parse_header(out["ciphertext"])
    assert header.key_id == meta["id"] and header.version == 1
    assert await admin("decrypt", ciphertext=out["ciphertext"], aad=b"ctx") == {
        "plaintext": b"secret",
        "key": "e",
        "version": 1,
    }
    await fails(admin("decrypt", ciphertext=out["ciphertext"], aad=b"other"), "decryption_failed")
    await fails(admin("decrypt", ciphertext=out["ciphertext"]), "decryption_failed")
    await fails(admin("decrypt", ciphertext=b"garbage"), "decryption_failed")
    await fails(admin("decrypt", ciphertext=out["ciphertext"][:40]), "decryption_failed")
    forged = out["ciphertext"][:4] + b"\x00" * 16 + out["ciphertext"][20:]
    await fails(admin("decrypt", ciphertext=forged), "not_found")
    await fails(admin("encrypt", key="e", plaintext="text"), "invalid_argument")
    await fails(admin("encrypt", key="missing", plaintext=b"x"), "not_found")
    await admin("key.create", name="s", type="ed25519")
    await fails(admin("encrypt", key="s", plaintext=b"x"), "invalid_argument")


async def test_envelope_layout(admin: Caller) -> None:
    meta = await admin("key.create", name="e", type="aes256-gcm")
    await admin("key.rotate", name="e")
    ct = (await admin("encrypt", key="e", plaintext=b"p" * 10))["ciphertext"]
    assert ct[:4] == b"KB\x01\x01" and len(ct) == 36 + 10 + 16
    assert ct[4:20] == meta["id"] and int.from_bytes(ct[20:24], "big") == 2


async def test_batches(admin: Caller, make_config: ConfigFactory) -> None:
    await admin("key.create", name="b", type="aes256-gcm")
    items = [bytes([i]) * i for i in range(20)]
    out = await admin("encrypt_batch", key="b", items=items, aad=[b"%d" % i for i in range(20)])
    cts = out["ciphertexts"]
    assert len(cts) == 20 and out["version"] == 1
    assert (await admin("encrypt_batch", key="b", items=[]))["ciphertexts"] == []
    await fails(admin("encrypt_batch", key="b", items=items, aad=[b"1"]), "invalid_argument")
    await fails(admin("encrypt_batch", key="b", items=[b"ok", "str"]), "invalid_argument")
    mixed = [cts[0], cts[1][:-1] + bytes([cts[1][-1] ^ 1]), b"junk", cts[3]]
    res = await admin("decrypt_batch", ciphertexts=mixed, aad=[b"0", b"1", b"2", b"3"])
    assert res["plaintexts"] == [items[0], None, None, items[3]]
    assert [e and e["code"] for e in res["errors"]] == [None, "decryption_failed", "decryption_failed", None]
    assert await admin("decrypt_batch", ciphertexts=[]) == {"plaintexts": [], "errors": []}


async def test_batch_limit(make_config: ConfigFactory, owner: str) -> None:
    async with open_broker(make_config({"limits": {"max_batch_items": 3}})) as broker:
        admin = Caller(broker, owner)
        await admin("key.create", name="b", type="aes256-gcm")
        await admin("encrypt_batch", key="b", items=[b"1"] * 3)
        await fails(admin("encrypt_batch", key="b", items=[b"1"] * 4), "limit_exceeded")
        await fails(admin("decrypt_batch", ciphertexts=[b"1"] * 4), "limit_exceeded")
        await fails(admin("datakey", key="b", count=4), "limit_exceeded")


async def test_a_response_over_the_message_limit_is_refused_before_any_use(
    make_config: ConfigFactory, owner: str
) -> None:
    limit = 64 * 1024
    async with open_broker(make_config({"limits": {"max_message_bytes": limit}})) as broker:
        admin = Caller(broker, owner)
        await admin("key.create", name="b", type="aes256-gcm")
        err = await fails(admin("encrypt_batch", key="b", items=[b"x" * 30_000] * 3), "limit_exceeded")
        assert err.details == {"limit": limit}
        err = await fails(admin("datakey", key="b", count=40, bytes=1024), "limit_exceeded")
        assert err.details == {"limit": limit}
        assert (await admin("key.get", name="b"))["versions"][0]["uses"] == 0
        # Without plaintexts the same data keys fit; so does a batch near the limit.
        assert len((await admin("datakey", key="b", count=40, bytes=1024, plaintext=False))["keys"]) == 40
        items = [b"x" * 6_000] * 10
        sealed = await admin("encrypt_batch", key="b", items=items)
        assert len(msgpack.packb([1, 1, None, sealed])) > 0.9 * limit
        assert (await admin("key.get", name="b"))["versions"][0]["uses"] == 50


async def test_rewrap_moves_items_to_the_primary(admin: Caller) -> None:
    await admin("key.create", name="r", type="aes256-gcm")
    old = (await admin("encrypt_batch", key="r", items=[b"a", b"b"], aad=b"x"))["ciphertexts"]
    await admin("key.rotate", name="r")
    res = await admin("rewrap_batch", ciphertexts=[*old, b"bad"], aad=b"x")
    assert [parse_header(c).version for c in res["ciphertexts"][:2]] == [2, 2]
    assert res["ciphertexts"][2] is None and res["errors"][2]["code"] == "decryption_failed"
    opened = await admin("decrypt_batch", ciphertexts=res["ciphertexts"][:2], aad=b"x")
    assert opened["plaintexts"] == [b"a", b"b"]


async def test_datakey(admin: Caller) -> None:
    await admin("key.create", name="d", type="aes256-gcm")
    out = await admin("datakey", key="d", count=3, bytes=16, aad=b"f")
    assert len(out["keys"]) == 3 and out["version"] == 1
    for item in out["keys"]:
        assert len(item["plaintext"]) == 16
        opened = await admin("decrypt", ciphertext=item["wrapped"], aad=b"f")
        assert opened["plaintext"] == item["plaintext"]
    bare = await admin("datakey", key="d", plaintext=False)
    assert set(bare["keys"][0]) == {"wrapped"}
    await fails(admin("datakey", key="d", bytes=0), "invalid_argument")
    await fails(admin("datakey", key="d", bytes=1025), "invalid_argument")


def public_key(pem: str) -> Any:
    return serialization.load_pem_public_key(pem.encode())


async def test_sign_verify_independently(admin: Caller) -> None:
    message = b"release 1.2.3"
    digest = hashlib.sha256(message).digest()
    for key_type in ("ed25519", "ecdsa-p256", "rsa-3072"):
        name = f"sig/{key_type}"
        await admin("key.create", name=name, type=key_type)
        signed = await admin("sign", key=name, message=message)
        pem = (await admin("key.public", name=name))["pem"]
        pub = public_key(pem)
        sig = signed["signature"]
        if key_type == "ed25519":
            assert isinstance(pub, ed25519.Ed25519PublicKey)
            pub.verify(sig, message)
            await fails(admin("sign", key=name, digest=digest), "invalid_argument")
        elif key_type == "ecdsa-p256":
            assert isinstance(pub, ec.EllipticCurvePublicKey)
            pub.verify(sig, message, ec.ECDSA(hashes.SHA256()))
            by_digest = (await admin("sign", key=name, digest=digest))["signature"]
            pub.verify(by_digest, message, ec.ECDSA(hashes.SHA256()))
        else:
            assert isinstance(pub, rsa.RSAPublicKey)
            pub.verify(sig, message, padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())
            with pytest.raises(InvalidSignature):
                pub.verify(sig, b"other", padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())
        assert (await admin("verify", key=name, message=message, signature=sig))["valid"] is True
        assert (await admin("verify", key=name, message=b"x", signature=sig))["valid"] is False
        await admin("key.rotate", name=name)
        # Without a version, every version from min_decrypt_version up is tried.
        assert (await admin("verify", key=name, message=message, signature=sig))["valid"] is True
        assert (await admin("verify", key=name, message=message, signature=sig, version=2))["valid"] is False
        await fails(admin("sign", key=name), "invalid_argument")
        await fails(admin("sign", key=name, message=message, digest=digest), "invalid_argument")
    await admin("key.create", name="aes", type="aes256-gcm")
    await fails(admin("sign", key="aes", message=b"m"), "invalid_argument")
    await fails(admin("key.public", name="aes"), "invalid_argument")


async def test_mac(admin: Caller) -> None:
    await admin("key.create", name="m", type="hmac-sha256")
    tag = await admin("mac", key="m", message=b"msg")
    assert len(tag["mac"]) == 32 and tag["version"] == 1
    assert (await admin("verify_mac", key="m", message=b"msg", mac=tag["mac"]))["valid"]
    assert not (await admin("verify_mac", key="m", message=b"msh", mac=tag["mac"]))["valid"]
    await admin("key.rotate", name="m")
    assert (await admin("verify_mac", key="m", message=b"msg", mac=tag["mac"]))["valid"]
    assert not (await admin("verify_mac", key="m", message=b"msg", mac=tag["mac"], version=2))["valid"]
    await admin("key.update", name="m", min_decrypt_version=2)
    assert not (await admin("verify_mac", key="m", message=b"msg", mac=tag["mac"]))["valid"]
    await fails(admin("mac", key="nope", message=b"m"), "not_found")


@pytest.mark.parametrize("whole_key", [False, True], ids=["one-version", "whole-key"])
async def test_a_signature_by_a_compromised_version_is_not_called_invalid(
    admin: Caller, whole_key: bool
) -> None:
    await admin("key.create", name="s", type="ed25519")
    await admin("key.create", name="h", type="hmac-sha256")
    sig = (await admin("sign", key="s", message=b"m"))["signature"]
    tag = (await admin("mac", key="h", message=b"m"))["mac"]
    for name in ("s", "h"):
        await admin("key.rotate", name=name)
        await admin("key.compromise", name=name, **({} if whole_key else {"version": 1}))
    # Made by the compromised version: invalid_state naming it, not "valid: false" ...
    err = await fails(admin("verify", key="s", message=b"m", signature=sig), "invalid_state")
    assert err.details == {"version": 1}
    err = await fails(admin("verify_mac", key="h", message=b"m", mac=tag), "invalid_state")
    assert err.details == {"version": 1}
    # ... accepted with allow_compromised ...
    assert (await admin("verify", key="s", message=b"m", signature=sig, allow_compromised=True))["valid"]
    assert (await admin("verify_mac", key="h", message=b"m", mac=tag, allow_compromised=True))["valid"]
    # ... while what no version made stays "valid: false".
    assert not (await admin("verify", key="s", message=b"other", signature=sig))["valid"]
    assert not (await admin("verify_mac", key="h", message=b"other", mac=tag))["valid"]


async def test_a_malformed_name_is_refused_before_it_is_recorded(broker: Broker, owner: str) -> None:
    admin, nobody = Caller(broker, owner), Caller(broker, "uid:4242")
    huge = "k" * 300_000
    for caller in (admin, nobody):
        await fails(caller("key.get", name=huge), "invalid_argument")
        await fails(caller("encrypt", key="Upper", plaintext=b"x"), "invalid_argument")
        await fails(caller("subscribe", prefix=huge), "invalid_argument")
    records = audit_records(broker)
    assert all(len(json.dumps(r)) < 4096 for r in records)
    assert verify_audit_dir(broker.config.audit_dir).ok


async def test_a_principal_learns_no_name_of_a_key_it_may_not_see(
    make_config: ConfigFactory, owner: str
) -> None:
    grant = {"principals": ["alice"], "roles": ["app", "auditor"], "operations": ["backup.create"]}
    grants = {"grants": [{**grant, "keys": ["alice/*"]}]}
    async with open_broker(make_config({"plugins": {"rbac": grants}})) as broker:
        admin, alice = Caller(broker, owner), Caller(broker, "alice")
        names = ["alice/a", "hr/payroll", "hr/salaries", "alice/b", "ops/db"]
        for name in names:
            await admin("key.create", name=name, type="aes256-gcm")
        # Listing one key at a time: every cursor names a key alice may see.
        seen, cursor = [], None
        while True:
            page = await alice("key.list", limit=1, **({"cursor": cursor} if cursor else {}))
            seen += [k["name"] for k in page["keys"]]
            cursor = page["cursor"]
            if cursor is None:
                break
            assert cursor.startswith("alice/")
        assert seen == ["alice/a", "alice/b"]
        # An envelope of another key: refused without its name, in a batch too.
        sealed = (await admin("encrypt", key="hr/payroll", plaintext=b"x"))["ciphertext"]
        err = await fails(alice("decrypt", ciphertext=sealed), "permission_denied")
        assert "hr/" not in err.message
        mine = (await alice("encrypt", key="alice/a", plaintext=b"y"))["ciphertext"]
        batch = await alice("decrypt_batch", ciphertexts=[sealed, mine])
        assert batch["plaintexts"] == [None, b"y"] and "hr/" not in str(batch["errors"])
        # The batch succeeded, and its audit record counts the refused item.
        record = audit_records(broker)[-1]
        assert (record["op"], record["outcome"]) == ("decrypt_batch", "allowed")
        assert record["details"]["denied"] == 1
        # A backup of everything, which alice may not make, names no key either.
        err = await fails(alice("backup.create", passphrase="a long enough passphrase"), "permission_denied")
        assert "every key" in err.message and "hr/" not in err.message and "ops/" not in err.message


async def test_lifecycle_calls(admin: Caller) -> None:
    await admin("key.create", name="l", type="aes256-gcm", activate=False)
    await fails(admin("encrypt", key="l", plaintext=b"x"), "invalid_state")
    assert (await admin("key.activate", name="l"))["state"] == "active"
    await fails(admin("key.activate", name="l"), "invalid_state")
    ct = (await admin("encrypt", key="l", plaintext=b"x"))["ciphertext"]
    assert (await admin("key.deactivate", name="l"))["state"] == "deactivated"
    await fails(admin("encrypt", key="l", plaintext=b"x"), "invalid_state")
    assert (await admin("decrypt", ciphertext=ct))["plaintext"] == b"x"
    meta = await admin("key.schedule_destroy", name="l", pending_days=7)
    assert meta["state"] == "destroy_pending"
    assert meta["destroy_at"] - meta["updated_at"] == 7 * 86_400
    await fails(admin("decrypt", ciphertext=ct), "invalid_state")
    await fails(admin("key.schedule_destroy", name="l"), "invalid_state")
    assert (await admin("key.cancel_destroy", name="l"))["state"] == "deactivated"
    await fails(admin("key.schedule_destroy", name="l", pending_days=6), "invalid_argument")


async def test_compromise_and_alarm(admin: Caller, broker: Broker) -> None:
    await admin("key.create", name="c", type="aes256-gcm")
    ct = (await admin("encrypt", key="c", plaintext=b"x"))["ciphertext"]
    await admin("key.compromise", name="c", version=1)
    await fails(admin("encrypt", key="c", plaintext=b"x"), "invalid_state")
    await fails(admin("decrypt", ciphertext=ct), "invalid_state")
    assert (await admin("decrypt", ciphertext=ct, allow_compromised=True))["plaintext"] == b"x"
    await admin("key.rotate", name="c")
    moved = await admin("rewrap_batch", ciphertexts=[ct], allow_compromised=True)
    assert parse_header(moved["ciphertexts"][0]).version == 2
    assert (await admin("key.compromise", name="c"))["state"] == "compromised"
    alarms = [r for r in audit_records(broker) if r["alarm"]]
    assert {r["op"] for r in alarms} >= {"decrypt", "rewrap_batch", "key.compromise"}


async def test_update(admin: Caller) -> None:
    await admin("key.create", name="u", type="aes256-gcm", labels={"a": "1"})
    meta = await admin("key.update", name="u", labels={"b": "2"}, rotation_period_s=3600)
    assert meta["labels"] == {"b": "2"}
    assert meta["next_rotation_at"] == meta["versions"][0]["created_at"] + 3600
    await fails(admin("key.update", name="u", min_decrypt_version=2), "invalid_argument")
    await fails(admin("key.update", name="u", labels={"a": 1}), "invalid_argument")


async def test_usage_limit_rotates_before_crossing(admin: Caller) -> None:
    await admin("key.create", name="n", type="aes256-gcm", max_uses_per_version=10)
    versions = [(await admin("encrypt", key="n", plaintext=b"x"))["version"] for _ in range(25)]
    assert versions == [1] * 10 + [2] * 10 + [3] * 5
    meta = await admin("key.get", name="n")
    assert [v["uses"] for v in meta["versions"]][:2] == [10, 10]
    await fails(admin("encrypt_batch", key="n", items=[b"x"] * 11), "limit_exceeded")
    out = await admin("encrypt_batch", key="n", items=[b"x"] * 10)
    assert out["version"] == 4


async def test_a_lowered_usage_limit_holds_at_once(admin: Caller) -> None:
    # The first encrypt leases a block of uses under the default limit
    # (2^32); lowering the limit must not let that block be spent past it.
    await admin("key.create", name="lowered", type="aes256-gcm")
    await admin("encrypt", key="lowered", plaintext=b"x")
    await admin("key.update", name="lowered", max_uses_per_version=10)
    versions = [(await admin("encrypt", key="lowered", plaintext=b"x"))["version"] for _ in range(15)]
    assert versions == [1] * 9 + [2] * 6
    await admin("key.update", name="lowered", max_uses_per_version=3)
    versions = [(await admin("encrypt", key="lowered", plaintext=b"x"))["version"] for _ in range(4)]
    assert versions == [3, 3, 3, 4]


async def test_encrypt_follows_a_change_made_by_another_broker(admin: Caller, broker: Broker) -> None:
    # Repeated encrypts reuse what the first one worked out about the key
    # (its limit, version and meter); a change made elsewhere reaches this
    # broker as a forget (the cluster feed), after which the next encrypt
    # must see the stored key, not the plan.
    await admin("key.create", name="shared", type="aes256-gcm")
    for _ in range(3):
        assert (await admin("encrypt", key="shared", plaintext=b"x"))["version"] == 1
    store = broker.service.store
    current = await store.get_key("shared")
    assert current is not None
    elsewhere = replace(current, state=KeyState.DEACTIVATED, revision=current.revision + 1)
    await store.replace_key(elsewhere, expected_revision=current.revision)
    assert (await admin("encrypt", key="shared", plaintext=b"x"))["version"] == 1  # not told yet
    broker.service.forget("shared")
    await fails(admin("encrypt", key="shared", plaintext=b"x"), "invalid_state")


async def test_strangers_are_denied_and_learn_nothing(broker: Broker, admin: Caller) -> None:
    await admin("key.create", name="mine", type="aes256-gcm")
    ct = (await admin("encrypt", key="mine", plaintext=b"x"))["ciphertext"]
    stranger = Caller(broker, "uid:424242")
    for method, params in [
        ("key.get", {"name": "mine"}),
        ("key.get", {"name": "absent"}),
        ("encrypt", {"key": "mine", "plaintext": b"x"}),
        ("decrypt", {"ciphertext": ct}),
        ("key.create", {"name": "theirs", "type": "aes256-gcm"}),
        ("key.rotate", {"name": "mine"}),
        ("key.list", {}),
    ]:
        await fails(stranger(method, **params), "permission_denied")
    res = await stranger("decrypt_batch", ciphertexts=[ct])
    assert res["errors"][0]["code"] == "permission_denied" and res["plaintexts"] == [None]
    assert (await stranger("whoami"))["roles"] == []
    denied = [r for r in audit_records(broker) if r["outcome"] == "denied"]
    assert len(denied) == 7 and all(r["principal"] == "uid:424242" for r in denied)


async def test_audit_has_every_decision_and_no_secrets(admin: Caller, broker: Broker) -> None:
    await admin("key.create", name="a", type="aes256-gcm")
    secret = b"SUPER-SECRET-PLAINTEXT"
    ct = (await admin("encrypt", key="a", plaintext=secret))["ciphertext"]
    await admin("decrypt", ciphertext=ct)
    await fails(admin("key.get", name="zzz"), "not_found")
    raw = (broker.config.audit_dir / "audit.jsonl").read_bytes()
    assert secret not in raw and ct not in raw and ct.hex().encode() not in raw
    ops = [(r["op"], r["outcome"], r["key"]) for r in audit_records(broker)]
    # A change is recorded as requested before it is made (fail closed).
    assert ops == [
        ("key.create", "requested", "a"),
        ("key.create", "allowed", "a"),
        ("encrypt", "allowed", "a"),
        ("decrypt", "allowed", "a"),
        ("key.get", "error", "zzz"),
    ]
    assert verify_audit_dir(broker.config.audit_dir).ok


async def test_unknown_method(admin: Caller) -> None:
    await fails(admin("key.explode"), "unknown_method")


async def test_keys_survive_restart(make_config: ConfigFactory, owner: str) -> None:
    config = make_config()
    async with open_broker(config) as broker:
        admin = Caller(broker, owner)
        await admin("key.create", name="keep", type="aes256-gcm")
        await admin("key.rotate", name="keep")
        ct = (await admin("encrypt", key="keep", plaintext=b"persist"))["ciphertext"]
        sig_key = await admin("key.create", name="sig", type="ecdsa-p256")
        sig = (await admin("sign", key="sig", message=b"m"))["signature"]
    async with open_broker(config) as broker:
        admin = Caller(broker, owner)
        assert (await admin("decrypt", ciphertext=ct))["plaintext"] == b"persist"
        assert (await admin("key.get", name="keep"))["primary_version"] == 2
        assert (await admin("verify", key="sig", message=b"m", signature=sig))["valid"]
        assert (await admin("key.get", name="sig"))["id"] == sig_key["id"]


async def test_a_change_whose_reply_was_lost_leaves_no_stale_key_in_the_cache(
    broker: Broker, owner: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    admin = Caller(broker, owner)
    await admin("key.create", name="k", type="aes256-gcm")
    store = broker.service.store
    real_replace = store.replace_key

    async def committed_then_lost(key: Any, *, expected_revision: int) -> None:
        await real_replace(key, expected_revision=expected_revision)
        raise Unavailable("the connection was lost during the commit")

    monkeypatch.setattr(store, "replace_key", committed_then_lost)
    await fails(admin("key.compromise", name="k"), "unavailable")
    monkeypatch.setattr(store, "replace_key", real_replace)
    # The compromise did happen: no encryption under the key from before it.
    await fails(admin("encrypt", key="k", plaintext=b"x"), "invalid_state")


async def test_a_read_that_overlaps_a_change_is_not_cached(
    broker: Broker, owner: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    admin, service = Caller(broker, owner), broker.service
    await admin("key.create", name="k", type="aes256-gcm")
    service.forget("k")
    store = service.store
    real_get = store.get_key

    async def read_then_changed_elsewhere(name: str) -> Any:
        before = await real_get(name)
        # Meanwhile another broker compromises the key, and its notice arrives
        # before this read's answer does.
        changed = replace(before, state=KeyState.COMPROMISED, revision=before.revision + 1)
        await store.replace_key(changed, expected_revision=before.revision)
        service.forget(name)
        return before

    monkeypatch.setattr(store, "get_key", read_then_changed_elsewhere)
    assert (await service.find("k")).state is KeyState.ACTIVE  # this call's read, as it was
    monkeypatch.setattr(store, "get_key", real_get)
    assert (await service.find("k")).state is KeyState.COMPROMISED  # not kept in the cache
