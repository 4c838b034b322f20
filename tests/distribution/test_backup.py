"""Backups: archive of keys restored into a fresh data directory; tampering refused whole."""

from __future__ import annotations

import hashlib
import io
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, cast

import pytest
import trio
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.app import open_broker, serve_broker
from broker.backup import Passphrase, Recipient, ScryptCost, collect_keys, create_backup, open_archive
from broker.backup_cli import UsageError, run_backup_create, run_backup_restore
from broker.config import parse_config
from broker.errors import BrokerError, DecryptionFailed, InvalidArgument
from broker.keys import Classification, Key, KeyState, KeyType, Version, VersionState
from broker.stream import MAX_SEGMENT_SIZE, MIN_SEGMENT_SIZE, SEGMENT_OVERHEAD
from tests import hsm_fixtures
from tests.conftest import Caller, ConfigFactory
from tests.distribution._fakes import rsa_key
from tests.hsm_fixtures import SoftToken

if TYPE_CHECKING:
    from broker.service import KeyService

softhsm = hsm_fixtures.softhsm  # the session's SoftHSM2 token fixture

PASSPHRASE = "correct horse battery staple"
# Cheap scrypt for tests: the format records the cost, so any cost restores.
CHEAP = ScryptCost(log2_n=10, r=8, p=1)


def public_pem(bits: int = 3072) -> str:
    public = rsa_key(bits).public_key()
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


async def populate(admin: Caller) -> dict[str, Any]:
    """Keys in many states and types; returns what to check after a restore."""
    made: dict[str, Any] = {"ct": {}, "sig": {}, "mac": {}}
    await admin("key.create", name="app/aes", type="aes256-gcm", labels={"team": "a"}, rotation_period_s=3600)
    made["ct"]["v1"] = (await admin("encrypt", key="app/aes", plaintext=b"one", aad=b"x"))["ciphertext"]
    await admin("key.rotate", name="app/aes")
    made["ct"]["v2"] = (await admin("encrypt", key="app/aes", plaintext=b"two"))["ciphertext"]
    await admin("key.compromise", name="app/aes", version=1)
    await admin("key.create", name="app/hmac", type="hmac-sha256")
    made["mac"] = (await admin("mac", key="app/hmac", message=b"m"))["mac"]
    await admin("key.create", name="app/ec", type="ecdsa-p256", exportable=True)
    made["sig"] = (await admin("sign", key="app/ec", message=b"m"))["signature"]
    await admin("key.create", name="app/ed", type="ed25519", activate=False)
    await admin("key.create", name="app/off", type="aes256-gcm")
    made["ct"]["off"] = (await admin("encrypt", key="app/off", plaintext=b"off"))["ciphertext"]
    await admin("key.deactivate", name="app/off")
    await admin("key.create", name="app/gone", type="aes256-gcm")
    await admin("key.schedule_destroy", name="app/gone", pending_days=7)
    return made


async def test_backup_over_rpc_restores_everything(make_config: ConfigFactory, owner: str) -> None:
    async with open_broker(make_config(name="old"), run_scheduler=False) as old:
        admin = Caller(old, owner)
        made = await populate(admin)
        before = {k["name"]: k for k in (await admin("key.list"))["keys"]}
        out = await admin("backup.create", recipient_public_key=public_pem())
        assert out["keys"] == len(before) and out["by_reference"] == [] and out["format"] == 1
        archive = out["archive"]
        with pytest.raises(BrokerError) as denied:
            await Caller(old, "uid:4242")("backup.create", recipient_public_key=public_pem())
        assert denied.value.code == "permission_denied"
        for bad in ({}, {"recipient_public_key": public_pem(), "passphrase": "x"}):
            with pytest.raises(BrokerError) as wrong:
                await admin("backup.create", **bad)
            assert wrong.value.code == "invalid_argument"
        with pytest.raises(BrokerError) as small:
            await admin("backup.create", recipient_public_key=public_pem(2048))
        assert small.value.code == "invalid_argument"
    target = make_config(name="new")
    path = target.data_dir.parent / "archive.kbbk"
    path.write_bytes(archive)
    result = await run_backup_restore(target, path, rsa_key())
    assert sorted(result["restored"]) == sorted(before) and result["skipped"] == []
    async with open_broker(target, run_scheduler=False) as new:
        admin = Caller(new, owner)
        after = {k["name"]: k for k in (await admin("key.list"))["keys"]}
        # aes256-gcm versions come back used up (the archive cannot know what
        # they sealed since); everything else exactly as it was.
        for name, meta in before.items():
            expected = meta
            if meta["type"] == "aes256-gcm":
                assert all(v["uses"] == 2**31 for v in after[name]["versions"]), name
                expected = {**meta, "versions": [{**v, "uses": 2**31} for v in meta["versions"]]}
            assert after[name] == expected, name
        # So the first encryption rotates: no nonce is drawn under a version of unknown count.
        sealed = await admin("encrypt", key="app/aes", plaintext=b"three")
        assert sealed["version"] == 3
        assert (await admin("decrypt", ciphertext=made["ct"]["v2"]))["plaintext"] == b"two"
        opened = await admin("decrypt", ciphertext=made["ct"]["v1"], aad=b"x", allow_compromised=True)
        assert opened["plaintext"] == b"one"
        assert (await admin("decrypt", ciphertext=made["ct"]["off"]))["plaintext"] == b"off"
        assert (await admin("verify", key="app/ec", message=b"m", signature=made["sig"]))["valid"]
        assert (await admin("verify_mac", key="app/hmac", message=b"m", mac=made["mac"]))["valid"]
    # A data directory that is not fresh is refused.
    with pytest.raises(UsageError):
        await run_backup_restore(target, path, rsa_key())


@pytest.mark.parametrize("passphrase", [True, 123, "", "eleven char", "twelve chars"])
async def test_backup_passphrase_is_a_string_of_at_least_12_characters(
    make_config: ConfigFactory, owner: str, passphrase: object
) -> None:
    async with open_broker(make_config(), run_scheduler=False) as broker:
        admin = Caller(broker, owner)
        if passphrase == "twelve chars":
            assert (await admin("backup.create", passphrase=passphrase))["keys"] == 0
            return
        with pytest.raises(BrokerError) as refused:
            await admin("backup.create", passphrase=passphrase)
        assert (refused.value.code, refused.value.details) == ("invalid_argument", {"field": "passphrase"})


async def test_passphrase_and_selected_keys(make_config: ConfigFactory, owner: str) -> None:
    config = make_config(name="old")
    async with open_broker(config, run_scheduler=False) as old:
        admin = Caller(old, owner)
        await admin("key.create", name="a", type="aes256-gcm")
        await admin("key.create", name="b", type="aes256-gcm")
        sealed = (await admin("encrypt", key="b", plaintext=b"kept"))["ciphertext"]
        keys = await collect_keys(old.service, ["b"])
        out = io.BytesIO()
        await create_backup(old.service, keys, Passphrase("correct horse", CHEAP), out)
    with pytest.raises(DecryptionFailed):
        open_archive(io.BytesIO(out.getvalue()), "wrong horse")
    with pytest.raises(InvalidArgument):
        open_archive(io.BytesIO(out.getvalue()), rsa_key())
    path = config.data_dir.parent / "b.kbbk"
    path.write_bytes(out.getvalue())
    target = make_config(name="new")
    assert (await run_backup_restore(target, path, "correct horse"))["restored"] == ["b"]
    async with open_broker(target, run_scheduler=False) as new:
        assert (await Caller(new, owner)("decrypt", ciphertext=sealed))["plaintext"] == b"kept"
        assert await new.service.find("a") is None


@pytest.mark.slow
async def test_hsm_keys_travel_by_reference(
    make_config: ConfigFactory, softhsm: SoftToken, owner: str
) -> None:
    token = {"plugins": {"pkcs11": softhsm.section(pool_size=1)}}
    config = make_config(token, name="old")
    async with open_broker(config, run_scheduler=False) as old:
        admin = Caller(old, owner)
        await admin("key.create", name="soft", type="aes256-gcm")
        await admin("key.create", name="tok", type="ecdsa-p256", protection="hsm")
        out = await admin("backup.create", passphrase=PASSPHRASE)
        assert out["by_reference"] == ["tok"]
        tok = await admin("key.get", name="tok")
        public = (await admin("key.public", name="tok"))["pem"]
    path = config.data_dir.parent / "a.kbbk"
    path.write_bytes(out["archive"])
    plain = make_config(name="plain")
    assert await run_backup_restore(plain, path, PASSPHRASE) == {"restored": ["soft"], "skipped": ["tok"]}
    with_token = make_config(token, name="token")
    restored = await run_backup_restore(with_token, path, PASSPHRASE)
    assert restored == {"restored": ["soft", "tok"], "skipped": []}
    async with open_broker(with_token, run_scheduler=False) as new:
        admin = Caller(new, owner)
        assert await admin("key.get", name="tok") == tok
        # The restored entry names the same token object: it signs, and the
        # signature verifies under the public key read before the backup.
        signature = (await admin("sign", key="tok", message=b"after restore"))["signature"]
        key = serialization.load_pem_public_key(public.encode())
        assert isinstance(key, ec.EllipticCurvePublicKey)
        key.verify(signature, b"after restore", ec.ECDSA(hashes.SHA256()))


@pytest.fixture(scope="module")
def small_archive() -> bytes:
    async def make() -> bytes:
        with tempfile.TemporaryDirectory(prefix="kb-", dir="/tmp") as tmp:
            async with open_broker(parse_config({}, data_dir=Path(tmp) / "d"), run_scheduler=False) as b:
                await b.service.create(
                    name="k",
                    key_type=KeyType.AES256_GCM,
                    protection="software",
                    classification=Classification.INTERNAL,
                    activate=True,
                    rotation_period_s=0,
                    max_uses_per_version=None,
                    exportable=False,
                    labels={},
                )
                out = io.BytesIO()
                keys = await collect_keys(b.service, None)
                await create_backup(b.service, keys, Passphrase(PASSPHRASE, CHEAP), out, segment_size=64)
                return out.getvalue()

    return trio.run(make)


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_flipped_byte_refuses_the_whole_archive(small_archive: bytes, data: st.DataObject) -> None:
    position = data.draw(st.integers(0, len(small_archive) - 1))
    tampered = bytearray(small_archive)
    tampered[position] ^= data.draw(st.integers(1, 255))
    with pytest.raises((DecryptionFailed, InvalidArgument)):
        open_archive(io.BytesIO(bytes(tampered)), PASSPHRASE)


def test_truncated_or_extended_archive_is_refused(small_archive: bytes) -> None:
    assert len(open_archive(io.BytesIO(small_archive), PASSPHRASE).keys) == 1
    for cut in (len(small_archive) - 1, len(small_archive) - 80, 40, 10):
        with pytest.raises(DecryptionFailed):
            open_archive(io.BytesIO(small_archive[:cut]), PASSPHRASE)
    with pytest.raises(DecryptionFailed):
        open_archive(io.BytesIO(small_archive + b"\x00" * 80), PASSPHRASE)


def _record(
    name: str = "k",
    key_id: bytes = b"i" * 16,
    numbers: tuple[int, ...] = (1,),
    primary: int = 1,
    min_decrypt: int = 1,
) -> Key:
    versions = tuple(Version(n, VersionState.ACTIVE, 0) for n in numbers)
    return Key(
        id=key_id,
        name=name,
        type=KeyType.HMAC_SHA256,
        protection="software",
        classification=Classification.INTERNAL,
        state=KeyState.ACTIVE,
        versions=versions,
        primary_version=primary,
        min_decrypt_version=min_decrypt,
        created_at=0,
        updated_at=0,
    )


async def _archive_of(keys: list[Key]) -> bytes:
    """An authentic archive of any records: versions without material export nothing."""
    service = cast("KeyService", SimpleNamespace(backends={}))
    out = io.BytesIO()
    await create_backup(service, keys, Passphrase(PASSPHRASE, CHEAP), out, now=0)
    return out.getvalue()


@pytest.mark.parametrize(
    ("keys", "problem"),
    [
        ([_record(name="../Bad Name\n!")], "record 1 has an invalid key name"),
        ([_record(key_id=b"x")], "a key id that is not 16 bytes"),
        ([_record(numbers=(1, 1))], "duplicate version numbers"),
        ([_record(primary=7)], "primary version 7, which it does not hold"),
        ([_record(min_decrypt=0)], "min_decrypt_version 0 outside"),
        ([_record(numbers=(1, 2), min_decrypt=2)], "min_decrypt_version 2 outside"),
        ([_record(), _record(key_id=b"j" * 16)], "record 2 \\('k'\\) has the name of an earlier record"),
        ([_record(), _record(name="other")], "the key id of an earlier record"),
    ],
)
async def test_archive_with_a_record_the_broker_would_not_hold_is_refused(
    keys: list[Key], problem: str
) -> None:
    # A recipient archive is authentic to anyone holding the public key.
    with pytest.raises(InvalidArgument, match=problem):
        open_archive(io.BytesIO(await _archive_of(keys)), PASSPHRASE)


async def test_records_as_the_broker_keeps_them_open() -> None:
    # Imported at version 5, min_decrypt_version later set to 1 (key.update allows it).
    keys = [_record(numbers=(5, 6), primary=6, min_decrypt=1), _record(name="b", key_id=b"j" * 16)]
    assert [a.key for a in open_archive(io.BytesIO(await _archive_of(keys)), PASSPHRASE).keys] == keys


async def test_archive_holding_a_key_twice_restores_nothing(make_config: ConfigFactory) -> None:
    target = make_config(name="new")
    path = target.data_dir.parent / "twice.kbbk"
    path.write_bytes(await _archive_of([_record(), _record()]))
    with pytest.raises(InvalidArgument, match="earlier record"):
        await run_backup_restore(target, path, PASSPHRASE)
    assert list(target.data_dir.parent.iterdir()) == [path]


# The passphrase protector block starts at 36: log2 N, r, p.
_COST = slice(36, 39)


@pytest.mark.parametrize("cost", [(20, 16, 4), (20, 8, 1)], ids=["10GiB", "2GiB"])
def test_scrypt_cost_beyond_the_memory_ceiling_is_refused(
    small_archive: bytes, cost: tuple[int, ...]
) -> None:
    crafted = bytearray(small_archive)
    crafted[_COST] = bytes(cost)
    with pytest.raises(DecryptionFailed, match="altered or damaged"):
        open_archive(io.BytesIO(bytes(crafted)), PASSPHRASE)
    with pytest.raises(InvalidArgument, match="out of range"):
        ScryptCost(*cost)


def test_kdf_failure_is_decryption_failed(small_archive: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    def exhausted(*args: object, **kwargs: object) -> bytes:
        raise MemoryError

    monkeypatch.setattr(hashlib, "scrypt", exhausted)
    with pytest.raises(DecryptionFailed, match="cannot be derived"):
        open_archive(io.BytesIO(small_archive), PASSPHRASE)


class _ReadRecorder(io.BytesIO):
    """Records the largest read asked for, and never allocates for it."""

    largest = 0

    def read(self, size: int | None = -1, /) -> bytes:
        self.largest = max(self.largest, size or 0)
        return super().read(min(size, 1 << 20) if size is not None and size >= 0 else size)


@pytest.mark.parametrize("size", [0xFFFFFFF0, MAX_SEGMENT_SIZE + 1, MIN_SEGMENT_SIZE - 1, 0])
def test_segment_size_out_of_range_is_refused_before_reading(small_archive: bytes, size: int) -> None:
    # The header is not yet authenticated: its segment size must not size a read.
    crafted = _ReadRecorder(small_archive[:6] + size.to_bytes(4, "big") + small_archive[10:])
    with pytest.raises(DecryptionFailed, match="segment size"):
        open_archive(crafted, PASSPHRASE)
    assert crafted.largest <= MAX_SEGMENT_SIZE + SEGMENT_OVERHEAD


async def test_tampered_archive_restores_nothing(make_config: ConfigFactory, small_archive: bytes) -> None:
    target = make_config(name="new")
    path = target.data_dir.parent / "t.kbbk"
    path.write_bytes(small_archive[:-20] + bytes([small_archive[-20] ^ 1]) + small_archive[-19:])
    with pytest.raises(DecryptionFailed):
        await run_backup_restore(target, path, PASSPHRASE)
    assert not target.data_dir.exists()
    assert [p for p in target.data_dir.parent.iterdir() if "restoring" in p.name] == []


@pytest.mark.slow
async def test_thousand_keys_restore_into_a_fresh_data_dir(make_config: ConfigFactory, owner: str) -> None:
    config = make_config(name="old")
    names = [f"bulk/{i:04d}" for i in range(1000)]
    sealed: dict[str, bytes] = {}
    started = time.perf_counter()
    async with open_broker(config, run_scheduler=False) as old:
        admin = Caller(old, owner)
        for name in names:
            await admin("key.create", name=name, type="aes256-gcm")
            sealed[name] = (await admin("encrypt", key=name, plaintext=name.encode()))["ciphertext"]
    created = time.perf_counter()
    archive = config.data_dir.parent / "bulk.kbbk"
    summary = await run_backup_create(config, Recipient.from_pem(public_pem()), archive, None)
    backed_up = time.perf_counter()
    assert summary["keys"] == 1000
    target = make_config(name="new")
    result = await run_backup_restore(target, archive, rsa_key())
    restored = time.perf_counter()
    assert len(result["restored"]) == 1000
    async with open_broker(target, run_scheduler=False) as new:
        admin = Caller(new, owner)
        for name in names:
            assert (await admin("decrypt", ciphertext=sealed[name]))["plaintext"] == name.encode()
    print(
        f"\n1000 keys: create+encrypt {created - started:.1f}s, backup {backed_up - created:.2f}s "
        f"({summary['bytes']:,} bytes), restore {restored - backed_up:.1f}s, "
        f"decrypt all {time.perf_counter() - restored:.1f}s"
    )
    # The offline backup refuses while a broker serves the directory.
    async with trio.open_nursery() as nursery:
        info = await nursery.start(serve_broker, config)
        with pytest.raises(UsageError):
            await run_backup_create(config, Recipient.from_pem(public_pem()), archive, None)
        info.shutdown.set()
