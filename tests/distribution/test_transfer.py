"""key.export, key.import_params and key.import: the RSA-AES key wrap, BYOK, moving keys between brokers."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, keywrap, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from broker.app import Broker, open_broker
from broker.envelope import pack_header
from broker.errors import BrokerError, DecryptionFailed, InvalidArgument
from broker.transfer import load_recipient, unwrap, wrap
from tests import hsm_fixtures
from tests.conftest import Caller, ConfigFactory
from tests.distribution._fakes import FakeClock, rsa_key
from tests.hsm_fixtures import SoftToken

softhsm = hsm_fixtures.softhsm  # the session's SoftHSM2 token fixture


def recipient(bits: int = 3072) -> rsa.RSAPrivateKey:
    return rsa_key(bits)


def pem(private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def wrap_for(public_pem: str, material: bytes) -> bytes:
    """What a third party does to send material: CKM_RSA_AES_KEY_WRAP with cryptography alone."""
    public = serialization.load_pem_public_key(public_pem.encode())
    assert isinstance(public, rsa.RSAPublicKey)
    ephemeral = os.urandom(32)
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    return public.encrypt(ephemeral, oaep) + keywrap.aes_key_wrap_with_padding(ephemeral, material)


def unwrap_with(private: rsa.RSAPrivateKey, wrapped: bytes) -> bytes:
    size = private.key_size // 8
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    ephemeral = private.decrypt(wrapped[:size], oaep)
    return keywrap.aes_key_unwrap_with_padding(ephemeral, wrapped[size:])


def seal_like_the_broker(key: bytes, key_id: bytes, version: int, plaintext: bytes, aad: bytes) -> bytes:
    """A format-1 envelope made with cryptography's AESGCM, as docs/design.md lays it out."""
    nonce = os.urandom(12)
    header = pack_header(key_id, version, nonce)
    return header + AESGCM(key).encrypt(nonce, plaintext, header + aad)


async def fails(call: Any, code: str) -> BrokerError:
    with pytest.raises(BrokerError) as info:
        await call
    assert info.value.code == code, info.value.message
    return info.value


# --- the construction alone --------------------------------------------------------


def test_wrap_matches_an_independent_unwrap() -> None:
    private = recipient()
    material = os.urandom(32)
    wrapped = wrap(private.public_key(), material)
    assert len(wrapped) == 384 + 40 and material not in wrapped
    assert unwrap_with(private, wrapped) == material
    assert bytes(unwrap(private, wrap_for(pem(private), material))) == material


@pytest.mark.parametrize("position", [0, 100, 383, 384, 400, -1])
def test_any_flipped_byte_fails_to_unwrap(position: int) -> None:
    private = recipient()
    wrapped = bytearray(wrap(private.public_key(), b"k" * 48))
    wrapped[position] ^= 0x01
    with pytest.raises(DecryptionFailed):
        unwrap(private, bytes(wrapped))
    with pytest.raises(DecryptionFailed):
        unwrap(private, bytes(wrapped[:390]))


def test_recipient_keys_are_checked() -> None:
    with pytest.raises(InvalidArgument):
        load_recipient(pem(recipient(2048)))
    with pytest.raises(InvalidArgument):
        load_recipient(pem(ec.generate_private_key(ec.SECP256R1())))
    with pytest.raises(InvalidArgument):
        load_recipient("not a key")
    assert load_recipient(pem(recipient())).key_size == 3072


# --- through the method table ---------------------------------------------------------


GRANTS = {"plugins": {"rbac": {"grants": [{"principals": ["app"], "roles": ["admin"], "keys": ["*"]}]}}}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def first(make_config: ConfigFactory, clock: FakeClock) -> AsyncIterator[Broker]:
    async with open_broker(make_config(GRANTS, name="first"), clock=clock, run_scheduler=False) as broker:
        yield broker


@pytest.fixture
async def second(make_config: ConfigFactory, clock: FakeClock) -> AsyncIterator[Broker]:
    async with open_broker(make_config(GRANTS, name="second"), clock=clock, run_scheduler=False) as broker:
        yield broker


async def test_export_refusals(first: Broker, owner: str) -> None:
    admin = Caller(first, owner)
    to = pem(recipient())
    await admin("key.create", name="kept", type="aes256-gcm")
    err = await fails(admin("key.export", name="kept", public_key=to), "permission_denied")
    assert err.details == {"rule": "exportable"}
    await admin("key.create", name="out", type="aes256-gcm", exportable=True)
    await fails(admin("key.export", name="out", public_key=pem(recipient(2048))), "invalid_argument")
    await fails(admin("key.export", name="out", public_key=to, version=9), "not_found")
    await admin("key.disable", name="out")
    await fails(admin("key.export", name="out", public_key=to), "invalid_state")
    await admin("key.enable", name="out")
    await admin("key.compromise", name="out", version=1)
    await fails(admin("key.export", name="out", public_key=to), "invalid_state")
    await fails(Caller(first, "uid:4242")("key.export", name="out", public_key=to), "permission_denied")


async def test_exported_aes_key_opens_broker_ciphertexts(first: Broker, owner: str) -> None:
    admin = Caller(first, owner)
    meta = await admin("key.create", name="x/aes", type="aes256-gcm", exportable=True)
    sealed = (await admin("encrypt", key="x/aes", plaintext=b"payload", aad=b"ctx"))["ciphertext"]
    out = await admin("key.export", name="x/aes", public_key=pem(recipient()))
    assert out["key_id"] == meta["id"] and out["version"] == 1 and out["format"] == "raw"
    assert out["algorithm"] == "rsa-aes-key-wrap-sha256" and out["type"] == "aes256-gcm"
    key = unwrap_with(recipient(), out["wrapped"])
    assert AESGCM(key).decrypt(sealed[24:36], sealed[36:], sealed[:36] + b"ctx") == b"payload"
    log = (first.config.audit_dir / "audit.jsonl").read_text()
    record = [line for line in log.splitlines() if '"key.export"' in line][-1]
    assert '"exported":true' in record.replace(" ", "") and key.hex() not in log


async def test_exported_signing_key_is_pkcs8_of_the_same_key(first: Broker, owner: str) -> None:
    admin = Caller(first, owner)
    await admin("key.create", name="x/ec", type="ecdsa-p256", exportable=True)
    out = await admin("key.export", name="x/ec", public_key=pem(recipient()))
    assert out["format"] == "pkcs8-der"
    private = serialization.load_der_private_key(unwrap_with(recipient(), out["wrapped"]), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert pem(private) == (await admin("key.public", name="x/ec"))["pem"]


async def test_byok_material_decrypts_a_ciphertext_made_outside(first: Broker, owner: str) -> None:
    admin = Caller(first, owner)
    params = await admin("key.import_params", type="aes256-gcm")
    assert params["expires_at"] == 1_800_000_000 + 86_400
    assert load_recipient(params["public_key"]).key_size == 3072
    material = os.urandom(32)
    meta = await admin(
        "key.import",
        import_token=params["import_token"],
        wrapped=wrap_for(params["public_key"], material),
        name="byok/1",
        type="aes256-gcm",
        labels={"src": "test"},
    )
    assert meta["origin"] == "external" and meta["versions"][0]["origin"] == "external"
    assert meta["labels"] == {"src": "test"} and meta["state"] == "active" and not meta["exportable"]
    envelope = seal_like_the_broker(material, meta["id"], 1, b"made elsewhere", b"aad")
    opened = await admin("decrypt", ciphertext=envelope, aad=b"aad")
    assert opened == {"plaintext": b"made elsewhere", "key": "byok/1", "version": 1}
    # The token was single use.
    again = wrap_for(params["public_key"], material)
    await fails(
        admin("key.import", import_token=params["import_token"], wrapped=again, name="b2", type="aes256-gcm"),
        "not_found",
    )


async def test_import_refusals(first: Broker, owner: str, clock: FakeClock) -> None:
    admin, app = Caller(first, owner), Caller(first, "app")

    async def token(key_type: str = "aes256-gcm") -> dict[str, Any]:
        result: dict[str, Any] = await admin("key.import_params", type=key_type)
        return result

    def args(params: dict[str, Any], material: bytes, **extra: Any) -> dict[str, Any]:
        wrapped = wrap_for(params["public_key"], material)
        return {"import_token": params["import_token"], "wrapped": wrapped, "type": "aes256-gcm", **extra}

    p = await token()
    # Another principal cannot use my token (and does not burn it).
    await fails(app("key.import", name="i/a", **args(p, os.urandom(32))), "not_found")
    await fails(admin("key.import", name="i/a", **args(p, os.urandom(31))), "invalid_argument")
    p = await token()
    tampered = args(p, os.urandom(32), name="i/b")
    tampered["wrapped"] = tampered["wrapped"][:-1] + bytes([tampered["wrapped"][-1] ^ 1])
    await fails(admin("key.import", **tampered), "decryption_failed")
    p = await token("hmac-sha256")
    await fails(admin("key.import", name="i/c", **args(p, os.urandom(32))), "invalid_argument")
    p = await token()
    clock.now += 86_400
    await fails(admin("key.import", name="i/d", **args(p, os.urandom(32))), "not_found")
    existing = await admin("key.create", name="i/e", type="aes256-gcm")
    p = await token()
    await fails(
        admin("key.import", name="i/f", key_id=existing["id"], **args(p, os.urandom(32))), "already_exists"
    )
    p = await token()
    await fails(admin("key.import", name="i/e", **args(p, os.urandom(32))), "already_exists")
    p = await token()
    await fails(
        admin("key.import", name="i/e", new_version=True, labels={}, **args(p, os.urandom(32))),
        "invalid_argument",
    )
    p = await token()
    await fails(
        admin("key.import", name="i/h", key_id=b"short", **args(p, os.urandom(32))), "invalid_argument"
    )
    await fails(Caller(first, "uid:4242")("key.import_params", type="aes256-gcm"), "permission_denied")


@pytest.mark.slow
async def test_token_key_material_neither_leaves_nor_enters_the_token(
    make_config: ConfigFactory, softhsm: SoftToken, owner: str
) -> None:
    config = make_config({**GRANTS, "plugins": {**GRANTS["plugins"], "pkcs11": softhsm.section(pool_size=1)}})
    async with open_broker(config, run_scheduler=False) as broker:
        admin = Caller(broker, owner)
        await admin("key.create", name="tok", type="aes256-gcm", protection="hsm", exportable=True)
        err = await fails(admin("key.export", name="tok", public_key=pem(recipient())), "invalid_argument")
        assert "token" in err.message
        params = await admin("key.import_params", type="aes256-gcm")
        wrapped = wrap_for(params["public_key"], os.urandom(32))
        arguments = {"import_token": params["import_token"], "wrapped": wrapped, "type": "aes256-gcm"}
        err = await fails(admin("key.import", name="in", protection="hsm", **arguments), "invalid_argument")
        assert "token" in err.message
        await fails(admin("key.get", name="in"), "not_found")
        # Neither refusal disturbed the token key, which still seals and opens on the token.
        sealed = (await admin("encrypt", key="tok", plaintext=b"still here"))["ciphertext"]
        assert (await admin("decrypt", ciphertext=sealed))["plaintext"] == b"still here"


async def test_import_as_new_version_keeps_per_version_origin(first: Broker, owner: str) -> None:
    admin = Caller(first, owner)
    await admin("key.create", name="nv", type="aes256-gcm")
    p = await admin("key.import_params", type="aes256-gcm")
    material = os.urandom(32)
    meta = await admin(
        "key.import",
        import_token=p["import_token"],
        wrapped=wrap_for(p["public_key"], material),
        name="nv",
        type="aes256-gcm",
        new_version=True,
    )
    assert meta["primary_version"] == 2 and meta["origin"] == "broker"
    assert [(v["version"], v["origin"]) for v in meta["versions"]] == [(1, "broker"), (2, "external")]
    sealed = (await admin("encrypt", key="nv", plaintext=b"v2"))["ciphertext"]
    assert AESGCM(material).decrypt(sealed[24:36], sealed[36:], sealed[:36]) == b"v2"
    p = await admin("key.import_params", type="aes256-gcm")
    await fails(
        admin(
            "key.import",
            import_token=p["import_token"],
            wrapped=wrap_for(p["public_key"], material),
            name="nv",
            type="aes256-gcm",
            new_version=True,
            version=2,
        ),
        "invalid_argument",
    )


async def test_an_imported_version_number_leaves_room_to_rotate(first: Broker, owner: str) -> None:
    admin = Caller(first, owner)
    await admin("key.create", name="high", type="aes256-gcm")

    async def import_as(version: int) -> Any:
        p = await admin("key.import_params", type="aes256-gcm")
        wrapped = wrap_for(p["public_key"], os.urandom(32))
        return await admin(
            "key.import", import_token=p["import_token"], wrapped=wrapped, name="high", type="aes256-gcm",
            new_version=True, version=version,
        )

    await fails(import_as(2**31), "invalid_argument")
    assert (await import_as(2**31 - 1))["primary_version"] == 2**31 - 1
    assert (await admin("key.rotate", name="high"))["primary_version"] == 2**31


async def test_export_import_between_brokers_keeps_old_ciphertexts_readable(
    first: Broker, second: Broker, owner: str
) -> None:
    a, b = Caller(first, owner), Caller(second, owner)
    meta = await a("key.create", name="move/me", type="aes256-gcm", exportable=True)
    sealed = [(await a("encrypt", key="move/me", plaintext=b"v1"))["ciphertext"]]
    await a("key.rotate", name="move/me")
    sealed.append((await a("encrypt", key="move/me", plaintext=b"v2"))["ciphertext"])
    for version in (1, 2):
        p = await b("key.import_params", type="aes256-gcm")
        out = await a("key.export", name="move/me", version=version, public_key=p["public_key"])
        common = {"import_token": p["import_token"], "wrapped": out["wrapped"], "type": out["type"]}
        if version == 1:
            imported = await b(
                "key.import", name="move/me", key_id=out["key_id"], version=1, exportable=True, **common
            )
        else:
            imported = await b("key.import", name="move/me", new_version=True, version=2, **common)
    assert imported["id"] == meta["id"] and imported["primary_version"] == 2
    for version, envelope in enumerate(sealed, start=1):
        assert await b("decrypt", ciphertext=envelope) == {
            "plaintext": b"v%d" % version,
            "key": "move/me",
            "version": version,
        }
