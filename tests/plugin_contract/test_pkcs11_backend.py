"""The hsm backend (keybroker_pkcs11) against a real SoftHSM2 token: the
backend conformance suite, plus what is particular to token custody."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from broker.envelope import HEADER_LEN, OVERHEAD, TAG_LEN, parse_header
from broker.errors import InvalidArgument, InvalidState, Unavailable
from broker.keys import KeyType, VersionRef
from broker.testing import BackendConformance
from tests import hsm_fixtures
from tests.hsm_fixtures import SoftToken

softhsm = hsm_fixtures.softhsm  # the session's SoftHSM2 token fixture


def _plugin():  # type: ignore[no-untyped-def]
    import keybroker_pkcs11  # noqa: PLC0415 - needs python-pkcs11, checked by the fixture

    return keybroker_pkcs11


def _pool(token: SoftToken, size: int = 2, wait: float = 5.0):  # type: ignore[no-untyped-def]
    plugin = _plugin()
    settings = plugin.Pkcs11Settings.from_mapping(token.section(pool_size=size, wait_timeout_s=wait))
    return plugin.open_pool(settings)


class TestPkcs11Backend(BackendConformance):
    # The material blob is a 20-byte reference; no two versions share a run.
    material_common_run = 8

    @pytest.fixture
    async def backend(self, softhsm: SoftToken) -> AsyncIterator[object]:
        backend = _plugin().Pkcs11Backend(_pool(softhsm))
        await backend.open()
        try:
            yield backend
        finally:
            await backend.aclose()


class TestSoftwareBackendOnTokenRoot(BackendConformance):
    """The software backend, unchanged, on top of the token root of trust."""

    @pytest.fixture
    async def backend(self, softhsm: SoftToken) -> AsyncIterator[object]:
        from keybroker_softkeys import SoftwareBackend  # noqa: PLC0415

        root = _plugin().TokenRootKey(_pool(softhsm), label="kb-test-root-suite")
        await root.open()
        backend = SoftwareBackend(root, limiter=trio.CapacityLimiter(2))
        try:
            yield backend
        finally:
            await backend.aclose()
            await root.aclose()


@pytest.fixture
async def hsm(softhsm: SoftToken) -> AsyncIterator[object]:
    backend = _plugin().Pkcs11Backend(_pool(softhsm))
    await backend.open()
    try:
        yield backend
    finally:
        await backend.aclose()


async def _ref(backend: object, key_type: KeyType, version: int = 1) -> VersionRef:
    key_id = os.urandom(16)
    material = await backend.generate(key_id, version, key_type)  # type: ignore[attr-defined]
    return VersionRef(key_id=key_id, version=version, key_type=key_type, material=material)


async def test_material_is_a_reference_to_non_extractable_token_objects(
    hsm: object,
    softhsm: SoftToken,
) -> None:
    from tests.hsm_fixtures import token_objects  # noqa: PLC0415

    refs = {t: await _ref(hsm, t) for t in KeyType}
    for ref in refs.values():
        assert len(ref.material) == 20 and ref.material.startswith(b"KBH\x01")
    ids = {t: ref.material[4:] for t, ref in refs.items()}
    found = await trio.to_thread.run_sync(token_objects, softhsm, list(ids.values()))
    for key_type, object_id in ids.items():
        objects = found[object_id]
        classes = sorted(o["class"] for o in objects)
        # CKO_SECRET_KEY = 4; a pair is CKO_PUBLIC_KEY = 2 and CKO_PRIVATE_KEY = 3.
        assert classes == ([4] if key_type.symmetric else [2, 3]), key_type
        for obj in objects:
            assert obj["token"] is True
            if obj["class"] != 2:
                assert obj["sensitive"] is True and obj["extractable"] is False


async def test_ciphertexts_have_the_envelope_format(hsm: object) -> None:
    """Checked without broker.envelope: a client cannot tell hsm envelopes from software ones."""
    import struct  # noqa: PLC0415

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: PLC0415

    ref = await _ref(hsm, KeyType.AES256_GCM, version=7)
    items = [b"", b"x", os.urandom(1000)]
    sealed = await hsm.encrypt(ref, items, b"aad")  # type: ignore[attr-defined]
    nonces = set()
    for item, env in zip(items, sealed, strict=True):
        assert len(env) == 36 + len(item) + 16
        magic, fmt, alg, key_id, version = struct.unpack(">2sBB16sI", env[:24])
        assert (magic, fmt, alg, key_id, version) == (b"KB", 1, 1, ref.key_id, 7)
        nonces.add(env[24:36])
        # The broker's own parser agrees.
        assert parse_header(env).key_id == ref.key_id
    assert len(nonces) == 3
    # It is GCM with the header as aad: a wrong key fails, so the tag is real.
    env = sealed[2]
    with pytest.raises(Exception):  # noqa: B017 - cryptography's InvalidTag
        AESGCM(bytes(32)).decrypt(env[24:36], env[36:], env[:36] + b"aad")
    assert len(env) - HEADER_LEN - TAG_LEN == 1000 and OVERHEAD == 52


async def test_check_type_names_the_missing_mechanism(hsm: object) -> None:
    for key_type in KeyType:
        hsm.check_type(key_type)  # type: ignore[attr-defined]  # SoftHSM2 2.6 has them all
    from pkcs11 import Mechanism  # noqa: PLC0415

    hsm._mechanisms = hsm._mechanisms - {int(Mechanism.EDDSA)}  # type: ignore[attr-defined]
    with pytest.raises(InvalidArgument, match="CKM_EDDSA"):
        hsm.check_type(KeyType.ED25519)  # type: ignore[attr-defined]
    with pytest.raises(InvalidArgument, match="CKM_EDDSA"):
        await hsm.generate(os.urandom(16), 1, KeyType.ED25519)  # type: ignore[attr-defined]


async def test_destroy_removes_token_objects_and_session_copies(hsm: object, softhsm: SoftToken) -> None:
    from tests.hsm_fixtures import token_objects  # noqa: PLC0415

    aes = await _ref(hsm, KeyType.AES256_GCM)
    ec_ref = await _ref(hsm, KeyType.ECDSA_P256)

    async def use(i: int) -> None:
        await hsm.decrypt(aes, await hsm.encrypt(aes, [b"%d" % i], b""), b"")  # type: ignore[attr-defined]

    # Several sessions each make their session copy of the AES key.
    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(use, i)
    await hsm.sign(ec_ref, b"m", prehashed=False)  # type: ignore[attr-defined]
    for ref in (aes, ec_ref):
        await hsm.destroy(ref)  # type: ignore[attr-defined]
        await hsm.destroy(ref)  # type: ignore[attr-defined]  # idempotent

    from pkcs11 import Attribute  # noqa: PLC0415

    for ref in (aes, ec_ref):
        object_id = ref.material[4:]
        # The broker's process sees neither the token objects nor any session copy.
        count = await hsm.pool.run(  # type: ignore[attr-defined]
            lambda lease, oid=object_id: len(list(lease.session.get_objects({Attribute.ID: oid})))
        )
        assert count == 0
    with pytest.raises(InvalidState):
        await hsm.encrypt(aes, [b"x"], b"")  # type: ignore[attr-defined]
    with pytest.raises(InvalidState):
        await hsm.sign(ec_ref, b"m", prehashed=False)  # type: ignore[attr-defined]
    found = await trio.to_thread.run_sync(token_objects, softhsm, [aes.material[4:], ec_ref.material[4:]])
    assert all(objects == [] for objects in found.values())


async def test_material_of_another_token_is_unavailable(hsm: object) -> None:
    ref = VersionRef(os.urandom(16), 1, KeyType.AES256_GCM, b"KBH\x01" + os.urandom(16))
    with pytest.raises(Unavailable, match="no object"):
        await hsm.encrypt(ref, [b"x"], b"")  # type: ignore[attr-defined]
    with pytest.raises(InvalidArgument):
        await hsm.encrypt(replace(ref, material=b"garbage"), [b"x"], b"")  # type: ignore[attr-defined]


async def test_export_and_import_are_refused(hsm: object) -> None:
    ref = await _ref(hsm, KeyType.AES256_GCM)
    with pytest.raises(InvalidArgument, match="never leaves"):
        await hsm.export_material(ref)  # type: ignore[attr-defined]
    buf = bytearray(b"\x01" * 32)
    with pytest.raises(InvalidArgument):
        await hsm.import_material(ref.key_id, 2, KeyType.AES256_GCM, buf)  # type: ignore[attr-defined]
    assert buf == bytearray(32)


# --- the root of trust on the token ---------------------------------------------------


async def test_token_root_key_wraps_with_context(softhsm: SoftToken) -> None:
    from broker.errors import DecryptionFailed  # noqa: PLC0415

    plugin = _plugin()
    root = plugin.TokenRootKey(_pool(softhsm), label="kb-test-root-a")
    await root.open()
    try:
        blob = await root.wrap(bytearray(b"k" * 32), b"context")
        assert len(blob) == 36 + 32 + 16 and parse_header(blob).key_id == root.key_id
        assert await root.unwrap(blob, b"context") == bytearray(b"k" * 32)
        with pytest.raises(DecryptionFailed):
            await root.unwrap(blob, b"other context")
        tampered = bytearray(blob)
        tampered[40] ^= 1
        with pytest.raises(DecryptionFailed):
            await root.unwrap(bytes(tampered), b"context")
        first_id = root.key_id
    finally:
        await root.aclose()
    # Found again by label, not created anew: old blobs still open.
    again = plugin.TokenRootKey(_pool(softhsm), label="kb-test-root-a")
    await again.open()
    other = plugin.TokenRootKey(_pool(softhsm), label="kb-test-root-b")
    await other.open()
    try:
        assert again.key_id == first_id
        assert await again.unwrap(blob, b"context") == bytearray(b"k" * 32)
        with pytest.raises(DecryptionFailed):
            await other.unwrap(blob, b"context")
    finally:
        await again.aclose()
        await other.aclose()


# --- configuration -----------------------------------------------------------------------


def test_backend_offered_only_when_configured(softhsm: SoftToken, tmp_path: Path) -> None:
    from broker.config import parse_config  # noqa: PLC0415

    plugin = _plugin()
    bare = parse_config({}, data_dir=tmp_path)
    assert plugin.kb_backends(config=bare, root=object()) == []
    assert plugin.kb_root_key(config=bare) is None
    configured = parse_config({"plugins": {"pkcs11": softhsm.section()}}, data_dir=tmp_path)
    [backend] = plugin.kb_backends(config=configured, root=object())
    assert backend.protection == "hsm"
    with pytest.raises(InvalidArgument, match="needs a"):
        plugin.kb_root_key(config=parse_config({"root": "pkcs11"}, data_dir=tmp_path))
    root = plugin.kb_root_key(
        config=parse_config({"root": "pkcs11", "plugins": {"pkcs11": softhsm.section()}}, data_dir=tmp_path)
    )
    [shared] = plugin.kb_backends(config=configured, root=root)
    assert shared.pool is root.pool


def test_settings_reject_bad_pin_sources(
    softhsm: SoftToken, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _plugin().Pkcs11Settings
    base = {"module": softhsm.module, "token_label": softhsm.label}
    with pytest.raises(InvalidArgument, match="must not hold the PIN") as info:
        settings.from_mapping({**base, "pin": softhsm.pin})
    assert softhsm.pin not in str(info.value)
    with pytest.raises(InvalidArgument, match="exactly one"):
        settings.from_mapping(base)
    with pytest.raises(InvalidArgument, match="exactly one"):
        settings.from_mapping({**base, "pin_env": "X", "pin_file": "/x"})
    monkeypatch.delenv("KB_UNSET_PIN", raising=False)
    with pytest.raises(InvalidArgument, match="unset"):
        settings.from_mapping({**base, "pin_env": "KB_UNSET_PIN"})
    with pytest.raises(InvalidArgument, match="unknown option"):
        settings.from_mapping({**base, "pin_env": softhsm.pin_env, "slot": 0})
    with pytest.raises(InvalidArgument, match="pool_size"):
        settings.from_mapping({**base, "pin_env": softhsm.pin_env, "pool_size": 0})
    pin_file = tmp_path / "pin"
    pin_file.write_text(softhsm.pin + "\n")
    pin_file.chmod(0o644)
    with pytest.raises(InvalidArgument, match="every user") as info:
        settings.from_mapping({**base, "pin_file": str(pin_file)})
    assert softhsm.pin not in str(info.value)
    pin_file.chmod(0o600)
    parsed = settings.from_mapping({**base, "pin_file": str(pin_file)})
    assert parsed.pin == softhsm.pin.encode()
    assert softhsm.pin not in repr(parsed)
    pool = _plugin().open_pool(parsed)
    assert softhsm.pin not in repr(pool) and softhsm.pin not in repr(pool.source)


async def test_wrong_pin_is_unavailable_and_not_retried(
    softhsm: SoftToken, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KB_WRONG_PIN", "0000")
    plugin = _plugin()
    settings = plugin.Pkcs11Settings.from_mapping(softhsm.section(pin_env="KB_WRONG_PIN"))
    pool = plugin.open_pool(settings)
    backend = plugin.Pkcs11Backend(pool)
    # Only while no other pool is logged in does the PIN get checked at all.
    with pytest.raises(Unavailable, match="PIN") as info:
        await backend.open()
    assert "0000" not in str(info.value)
    # The next attempt does not even try: repeated wrong PINs lock tokens.
    with pytest.raises(Unavailable, match="restart"):
        await backend.open()


def test_plugin_loads_without_python_pkcs11(tmp_path: Path) -> None:
    """The plugin is registered in every installation; without the `hsm` extra it
    still imports, offers nothing, and says what is missing once configured."""
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    code = """
import sys
sys.modules["pkcs11"] = None  # as if python-pkcs11 were not installed
from pathlib import Path
import keybroker_pkcs11 as plugin
from broker.config import parse_config
from broker.errors import InvalidArgument
data = Path(sys.argv[1])
assert plugin.kb_backends(config=parse_config({}, data_dir=data), root=object()) == []
assert plugin.kb_root_key(config=parse_config({}, data_dir=data)) is None
section = {"module": "/x.so", "token_label": "t", "pin_env": "HOME"}
try:
    plugin.kb_backends(config=parse_config({"plugins": {"pkcs11": section}}, data_dir=data), root=object())
except InvalidArgument as exc:
    assert "python-pkcs11" in exc.message, exc.message
else:
    raise AssertionError("configured without the binding must fail")
"""
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=60, env=dict(os.environ))
