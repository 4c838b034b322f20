"""HSM keys through the wire protocol: a broker serving its Unix socket with the
pkcs11 plugin on a real SoftHSM2 token, driven by ``broker.client.AsyncClient``.

The broker is assembled as ``broker.app.serve_broker`` assembles it
(``open_broker`` + ``broker.server.serve``), because the destroy step calls the
service's ``lifecycle(name, Transition.DESTROY)`` directly: the grace period
would otherwise take days.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import pytest
import trio
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from broker.app import Broker, open_broker
from broker.client import AsyncClient
from broker.config import Config
from broker.errors import BrokerError, Unavailable
from broker.keys import Key
from broker.server import serve
from tests import hsm_fixtures
from tests.conftest import ConfigFactory
from tests.hsm_fixtures import SoftToken, token_objects

softhsm = hsm_fixtures.softhsm  # the session's SoftHSM2 token fixture

pytestmark = pytest.mark.slow


@asynccontextmanager
async def serving(config: Config) -> AsyncIterator[tuple[Broker, AsyncClient]]:
    async with open_broker(config) as broker, trio.open_nursery() as nursery:
        info = await nursery.start(serve, config, broker.dispatcher)
        try:
            async with AsyncClient(info.socket_path) as client:
                yield broker, client
        finally:
            await info.drain()


def hsm_config(make_config: ConfigFactory, token: SoftToken, **top: Any) -> Config:
    return make_config({"plugins": {"pkcs11": token.section(pool_size=2)}, **top})


async def fails(call: Any, code: str) -> BrokerError:
    with pytest.raises(BrokerError) as info:
        await call
    assert info.value.code == code, info.value.message
    return info.value


def envelope_fields(envelope: bytes) -> tuple[bytes, int, int, bytes, int]:
    """(magic, format, algorithm, key id, version), parsed here, not by broker.envelope."""
    magic, fmt, alg, key_id, version = struct.unpack(">2sBB16sI", envelope[:24])
    return magic, fmt, alg, key_id, version


async def test_every_operation_of_hsm_keys(
    make_config: ConfigFactory, softhsm: SoftToken, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = hsm_config(make_config, softhsm)
    async with serving(config) as (broker, client):
        made = {}
        for key_type in ("aes256-gcm", "hmac-sha256", "ecdsa-p256", "ed25519", "rsa-3072"):
            meta = await client.key_create(f"h/{key_type}", key_type, protection="hsm")
            assert meta["protection"] == "hsm" and meta["type"] == key_type and meta["state"] == "active"
            made[key_type] = meta

        # --- envelopes
        aes = made["aes256-gcm"]
        sealed = await client.encrypt("h/aes256-gcm", b"secret", aad=b"ctx")
        ct = sealed["ciphertext"]
        assert envelope_fields(ct) == (b"KB", 1, 1, aes["id"], 1) and len(ct) == 36 + 6 + 16
        opened = await client.decrypt(ct, aad=b"ctx")
        assert opened == {"plaintext": b"secret", "key": "h/aes256-gcm", "version": 1}
        await fails(client.decrypt(ct, aad=b"wrong"), "decryption_failed")
        items = [os.urandom(n) for n in (0, 1, 32, 1000)]
        batch = await client.encrypt_batch("h/aes256-gcm", items, aad=b"b")
        assert [len(c) for c in batch["ciphertexts"]] == [len(i) + 52 for i in items]
        back = await client.decrypt_batch([*batch["ciphertexts"], b"junk"], aad=b"b")
        assert back["plaintexts"][:4] == items and back["plaintexts"][4] is None
        assert back["errors"][4]["code"] == "decryption_failed"

        # --- rotation and rewrap
        rotated = await client.key_rotate("h/aes256-gcm")
        assert rotated["primary_version"] == 2
        rewrapped = await client.rewrap_batch(batch["ciphertexts"], aad=b"b")
        assert all(envelope_fields(c)[4] == 2 for c in rewrapped["ciphertexts"])
        assert (await client.decrypt_batch(rewrapped["ciphertexts"], aad=b"b"))["plaintexts"] == items
        assert (await client.decrypt(ct, aad=b"ctx"))["version"] == 1  # old version still opens

        # --- data keys
        dk = await client.datakey("h/aes256-gcm", count=3, bytes=24, aad=b"dk")
        assert dk["version"] == 2
        for entry in dk["keys"]:
            assert len(entry["plaintext"]) == 24
            assert (await client.decrypt(entry["wrapped"], aad=b"dk"))["plaintext"] == entry["plaintext"]

        # --- signatures, verified independently against key.public
        message = b"signed through the broker"
        for key_type in ("ecdsa-p256", "ed25519", "rsa-3072"):
            name = f"h/{key_type}"
            signature = (await client.sign(name, message=message))["signature"]
            pem = (await client.key_public(name))["pem"]
            public = serialization.load_pem_public_key(pem.encode() if isinstance(pem, str) else pem)
            if key_type == "ecdsa-p256":
                assert isinstance(public, ec.EllipticCurvePublicKey)
                public.verify(signature, message, ec.ECDSA(hashes.SHA256()))  # DER per docs/protocol.md
                digest_sig = (await client.sign(name, digest=hashlib.sha256(message).digest()))["signature"]
                public.verify(digest_sig, message, ec.ECDSA(hashes.SHA256()))
            elif key_type == "ed25519":
                assert isinstance(public, ed25519.Ed25519PublicKey)
                public.verify(signature, message)
            else:
                assert isinstance(public, rsa.RSAPublicKey) and public.key_size == 3072
                pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
                public.verify(signature, message, pss, hashes.SHA256())
            assert (await client.verify(name, signature, message=message))["valid"] is True
            assert (await client.verify(name, signature, message=message + b"!"))["valid"] is False

        # --- MACs
        tag = (await client.mac("h/hmac-sha256", b"m"))["mac"]
        assert len(tag) == 32
        assert (await client.verify_mac("h/hmac-sha256", b"m", tag))["valid"] is True
        assert (await client.verify_mac("h/hmac-sha256", b"n", tag))["valid"] is False
        await client.key_rotate("h/hmac-sha256")
        assert (await client.verify_mac("h/hmac-sha256", b"m", tag))["valid"] is True  # checks v1 too
        assert (await client.mac("h/hmac-sha256", b"m"))["mac"] != tag

        # --- schedule_destroy, then destroy: the token objects are gone
        object_ids = []
        for key_type in ("aes256-gcm", "ecdsa-p256"):
            name = f"h/{key_type}"
            stored = await broker.service.get(name)
            object_ids += [v.material[4:] for v in stored.versions]
        before = await trio.to_thread.run_sync(token_objects, softhsm, object_ids)
        assert all(before[i] for i in object_ids)  # 2 AES versions, 1 EC pair: present until destroy
        for key_type in ("aes256-gcm", "ecdsa-p256"):
            meta = await client.key_schedule_destroy(f"h/{key_type}", pending_days=7)
            assert meta["state"] == "destroy_pending" and meta["destroy_at"]
        # Eight days on, the scheduler destroys them.
        later = broker.service.now() + 8 * 86_400
        with monkeypatch.context() as clock:
            clock.setattr(broker.service, "now", lambda: later)
            assert await broker.scheduler.run_once() == 2
        for key_type in ("aes256-gcm", "ecdsa-p256"):
            assert (await client.key_get(f"h/{key_type}"))["state"] == "destroyed"
        found = await trio.to_thread.run_sync(token_objects, softhsm, object_ids)
        assert found and all(objects == [] for objects in found.values())
        await fails(client.decrypt(ct, aad=b"ctx"), "invalid_state")
        await fails(client.key_public("h/ecdsa-p256"), "invalid_state")
        # Keys of the other types are untouched.
        still = (await client.sign("h/ed25519", message=b"x"))["signature"]
        assert (await client.verify("h/ed25519", still, message=b"x"))["valid"] is True


async def test_hsm_ciphertexts_look_like_software_ones(
    make_config: ConfigFactory, softhsm: SoftToken
) -> None:
    async with serving(hsm_config(make_config, softhsm)) as (_, client):
        await client.key_create("soft", "aes256-gcm")
        await client.key_create("tok", "aes256-gcm", protection="hsm")
        for n in (0, 17, 4096):
            soft = (await client.encrypt("soft", b"\x00" * n))["ciphertext"]
            tok = (await client.encrypt("tok", b"\x00" * n))["ciphertext"]
            assert len(soft) == len(tok) == n + 52
            assert envelope_fields(soft)[:3] == envelope_fields(tok)[:3] == (b"KB", 1, 1)


async def test_root_of_trust_on_the_token(make_config: ConfigFactory, softhsm: SoftToken) -> None:
    section = softhsm.section(pool_size=2, root_key_label="kb-test-root-broker")
    config = make_config({"root": "pkcs11", "plugins": {"pkcs11": section}})
    async with serving(config) as (_, client):
        await client.key_create("sw/aes", "aes256-gcm")
        await client.key_create("sw/ec", "ecdsa-p256")
        await client.key_create("sw/mac", "hmac-sha256")
        ct = (await client.encrypt("sw/aes", b"kept across restarts", aad=b"a"))["ciphertext"]
        signature = (await client.sign("sw/ec", message=b"m"))["signature"]
        tag = (await client.mac("sw/mac", b"m"))["mac"]
        await client.key_create("tok", "aes256-gcm", protection="hsm")
        tok_ct = (await client.encrypt("tok", b"hsm"))["ciphertext"]
    assert not (config.data_dir / "root.key").exists()
    # A restarted broker unwraps the software keys under the same token root key.
    async with serving(config) as (_, client):
        assert (await client.decrypt(ct, aad=b"a"))["plaintext"] == b"kept across restarts"
        assert (await client.verify("sw/ec", signature, message=b"m"))["valid"] is True
        assert (await client.verify_mac("sw/mac", b"m", tag))["valid"] is True
        assert (await client.decrypt(tok_ct))["plaintext"] == b"hsm"
    assert not any(p.name == "root.key" for p in config.data_dir.rglob("*"))
    # Under another token root key the wrapped material does not open.
    other = make_config(
        {"root": "pkcs11", "plugins": {"pkcs11": softhsm.section(root_key_label="kb-test-root-other")}},
        name="data",
    )
    async with serving(other) as (_, client):
        await fails(client.decrypt(ct, aad=b"a"), "unavailable")


async def test_hsm_protection_needs_the_section(make_config: ConfigFactory, softhsm: SoftToken) -> None:
    async with serving(make_config()) as (broker, client):
        assert "hsm" not in broker.backends
        err = await fails(client.key_create("k", "aes256-gcm", protection="hsm"), "invalid_argument")
        assert "hsm" in err.message.lower()


async def test_a_rotation_that_loses_a_race_leaves_no_token_object(
    make_config: ConfigFactory, softhsm: SoftToken
) -> None:
    async with serving(hsm_config(make_config, softhsm)) as (broker, client):
        await client.key_create("h/raced", "aes256-gcm", protection="hsm")
        service = broker.service
        store = service.store
        real_replace = store.replace_key
        lost: list[Key] = []

        async def replace_after_another_broker(key: Key, *, expected_revision: int) -> None:
            if not lost:
                # Another broker on the same database changes the key first.
                current = await store.get_key(key.name)
                assert current is not None
                await real_replace(
                    replace(current, labels={"by": "elsewhere"}, revision=current.revision + 1),
                    expected_revision=current.revision,
                )
                lost.append(key)
            await real_replace(key, expected_revision=expected_revision)

        store.replace_key = replace_after_another_broker  # type: ignore[method-assign]
        try:
            rotated = await client.key_rotate("h/raced")
        finally:
            del store.replace_key
        assert rotated["primary_version"] == 2 and rotated["labels"] == {"by": "elsewhere"}
        loser_id = lost[0].version(2).material[4:]  # type: ignore[union-attr]
        winner = await service.get("h/raced")
        winner_ids = [v.material[4:] for v in winner.versions]
        assert loser_id not in winner_ids
        found = await trio.to_thread.run_sync(token_objects, softhsm, [loser_id, *winner_ids])
        assert found[loser_id] == []  # the losing attempt's version 2 was destroyed
        assert all(found[i] for i in winner_ids)  # the stored versions are intact
        sealed = (await client.encrypt("h/raced", b"after the race"))["ciphertext"]
        assert (await client.decrypt(sealed))["plaintext"] == b"after the race"


async def test_a_create_whose_outcome_is_unknown_keeps_its_token_object(
    make_config: ConfigFactory, softhsm: SoftToken
) -> None:
    """A commit whose flush failed may have happened: the key it stored must keep its material."""
    async with serving(hsm_config(make_config, softhsm)) as (broker, client):
        store = broker.service.store
        real_insert = store.insert_key

        async def insert_then_fail(key: Key) -> None:
            await real_insert(key)
            raise Unavailable("the key store could not flush its log: Input/output error")

        store.insert_key = insert_then_fail  # type: ignore[method-assign]
        try:
            await fails(client.key_create("h/unsure", "aes256-gcm", protection="hsm"), "unavailable")
        finally:
            store.insert_key = real_insert  # type: ignore[method-assign]
        broker.service.forget("h/unsure")
        # The key is there after all, and its material on the token still seals and opens.
        sealed = await client.encrypt("h/unsure", b"kept")
        assert (await client.decrypt(sealed["ciphertext"]))["plaintext"] == b"kept"
