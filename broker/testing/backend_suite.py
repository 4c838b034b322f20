"""A conformance suite every key-custody backend plugin runs.

Subclass :class:`BackendConformance` in a test module and provide an async
``backend`` fixture that yields an opened backend (and closes it after)::

    import pytest
    from broker.testing import BackendConformance

    class TestMyBackend(BackendConformance):
        @pytest.fixture
        async def backend(self, tmp_path):
            root = MyRootKey(tmp_path / "root.key")
            await root.open()
            backend = MyBackend(root)
            await backend.open()
            try:
                yield backend
            finally:
                await backend.aclose()
                await root.aclose()

The suite runs under pytest-trio (``trio_mode = true``). It generates keys
of every type the backend accepts (types whose ``check_type`` raises are
skipped) and checks behaviour a client can observe: envelope round trips and
failures, rewrap, signatures checked independently with ``cryptography``
against ``public_pem``, HMAC, per-version independence and destruction.

Behaviour this suite defines for every backend:

- A ref whose ``material`` is empty (what the core passes once a version is
  destroyed) is refused with :class:`~broker.errors.InvalidState` by every
  operation, even if the backend had that version loaded before.
- Using a key for an operation its type does not allow raises
  :class:`~broker.errors.InvalidArgument`, as does ``prehashed=True`` with
  ed25519 or a digest that is not 32 bytes.
- ``decrypt`` and ``rewrap`` return None for an item that fails (wrong aad,
  tampered, truncated, garbage, another key's envelope) and never fail the
  batch for it.
- After ``aclose`` (idempotent) every operation raises a
  :class:`~broker.errors.BrokerError` rather than quietly serving.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any, ClassVar

import pytest
import trio
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from broker.backend import Backend
from broker.envelope import HEADER_LEN, OVERHEAD, parse_header
from broker.errors import BrokerError, InvalidArgument, InvalidState
from broker.keys import KeyType, VersionRef

__all__ = ["BackendConformance"]

# A deferred backend call: built lazily so that no coroutine is left unawaited
# when an earlier check fails.
_Call = Callable[[], Awaitable[Any]]
SIGNING_TYPES = [t for t in KeyType if t.signing]
# DER-encoded algorithm OIDs: a plaintext PKCS#8 private key contains its
# algorithm's OID, so a blob that does must not be stored as "material".
_KEY_OIDS = {
    KeyType.ED25519: bytes.fromhex("06032b6570"),
    KeyType.ECDSA_P256: bytes.fromhex("06072a8648ce3d0201"),
    KeyType.RSA_3072: bytes.fromhex("06092a864886f70d010101"),
}


def _new_key_id() -> bytes:
    return os.urandom(16)


def _share_run(a: bytes, b: bytes, run: int) -> bool:
    """True if ``a`` and ``b`` have a common substring of ``run`` bytes."""
    if len(a) < run or len(b) < run:
        return False
    grams = {a[i : i + run] for i in range(len(a) - run + 1)}
    return any(b[i : i + run] in grams for i in range(len(b) - run + 1))


def _flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


def _check_signature(pem: bytes, key_type: KeyType, message: bytes, signature: bytes) -> None:
    """Verify with ``cryptography`` alone, per docs/protocol.md; raises InvalidSignature."""
    public = serialization.load_pem_public_key(pem)
    if key_type is KeyType.ED25519:
        assert isinstance(public, ed25519.Ed25519PublicKey)
        public.verify(signature, message)
    elif key_type is KeyType.ECDSA_P256:
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert isinstance(public.curve, ec.SECP256R1)
        public.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    else:
        assert isinstance(public, rsa.RSAPublicKey)
        assert public.key_size == 3072
        assert public.public_numbers().e == 65537
        pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
        public.verify(signature, message, pss, hashes.SHA256())


class BackendConformance:
    """Tests every Backend must pass. Subclasses provide the ``backend`` fixture.

    Fixture contract:
        ``backend``: an async pytest fixture yielding an opened object that
        implements :class:`broker.backend.Backend`. It is created afresh for
        each test, and the fixture closes it (and its root key) afterwards.
        The suite may call ``forget``, ``destroy`` and ``aclose`` on it, so
        ``aclose`` must be idempotent.

    Class attributes a subclass may override:
        material_common_run: two versions' material blobs must not share a
            run of this many bytes (a shared key would). A backend whose
            material is a structured reference with a long common prefix may
            raise it, or set None to skip the check.
    """

    material_common_run: ClassVar[int | None] = 32

    # --- helpers ---------------------------------------------------------------

    @staticmethod
    def _require(backend: Backend, key_type: KeyType) -> None:
        try:
            backend.check_type(key_type)
        except InvalidArgument as exc:
            pytest.skip(f"{backend.protection} does not support {key_type.value}: {exc.message}")

    async def _ref(
        self, backend: Backend, key_type: KeyType, *, key_id: bytes | None = None, version: int = 1
    ) -> VersionRef:
        self._require(backend, key_type)
        key_id = key_id or _new_key_id()
        material = await backend.generate(key_id, version, key_type)
        assert isinstance(material, bytes)
        assert material, "generate must return a non-empty material blob"
        return VersionRef(key_id=key_id, version=version, key_type=key_type, material=material)

    async def _fail_destroyed(self, backend: Backend, ref: VersionRef) -> None:
        """Every operation the type allows raises InvalidState on a destroyed ref."""
        gone = replace(ref, material=b"")
        calls: list[_Call]
        if ref.key_type is KeyType.AES256_GCM:
            calls = [
                lambda: backend.encrypt(gone, [b"x"], b""),
                lambda: backend.decrypt(gone, [b"\x00" * OVERHEAD], b""),
                lambda: backend.rewrap(gone, gone, [b"\x00" * OVERHEAD], b""),
            ]
        elif ref.key_type is KeyType.HMAC_SHA256:
            calls = [lambda: backend.mac(gone, b"x"), lambda: backend.verify_mac(gone, b"x", b"\x00" * 32)]
        else:
            calls = [
                lambda: backend.sign(gone, b"x", prehashed=False),
                lambda: backend.verify(gone, b"x", b"\x00" * 64, prehashed=False),
                lambda: backend.public_pem(gone),
            ]
        for call in calls:
            with pytest.raises(InvalidState):
                await call()

    # --- generation -------------------------------------------------------------

    @pytest.mark.parametrize("key_type", list(KeyType))
    async def test_generate_gives_distinct_material(self, backend: Backend, key_type: KeyType) -> None:
        key_id = _new_key_id()
        one = await self._ref(backend, key_type, key_id=key_id, version=1)
        two = await self._ref(backend, key_type, key_id=key_id, version=2)
        assert one.material != two.material
        if self.material_common_run is not None:
            assert not _share_run(one.material, two.material, self.material_common_run)

    @pytest.mark.parametrize("key_type", SIGNING_TYPES)
    async def test_material_is_not_a_plaintext_private_key(self, backend: Backend, key_type: KeyType) -> None:
        ref = await self._ref(backend, key_type)
        assert _KEY_OIDS[key_type] not in ref.material
        public = serialization.load_pem_public_key(await backend.public_pem(ref))
        raw = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        # The last 32 bytes of the SPKI are public key bits that a plaintext
        # encoding of the pair (PKCS#8 v2, or RSA's modulus) would carry too.
        assert raw[-32:] not in ref.material

    async def test_check_type_rejects_unknown_type(self, backend: Backend) -> None:
        with pytest.raises(InvalidArgument):
            backend.check_type("des-ede3")  # type: ignore[arg-type]

    # --- envelopes ---------------------------------------------------------------

    async def test_encrypt_decrypt_round_trip(self, backend: Backend) -> None:
        ref = await self._ref(backend, KeyType.AES256_GCM)
        items = [b"", b"a", b"hello world", os.urandom(1000), bytes(70_000)]
        envelopes = await backend.encrypt(ref, items, b"context")
        assert len(envelopes) == len(items)
        for item, envelope in zip(items, envelopes, strict=True):
            assert len(envelope) == len(item) + OVERHEAD
            header = parse_header(envelope)
            assert (header.key_id, header.version) == (ref.key_id, ref.version)
        assert await backend.decrypt(ref, envelopes, b"context") == items

    async def test_nonces_are_fresh(self, backend: Backend) -> None:
        ref = await self._ref(backend, KeyType.AES256_GCM)
        envelopes = await backend.encrypt(ref, [b"same"] * 50, b"")
        assert len({parse_header(e).nonce for e in envelopes}) == 50
        assert len(set(envelopes)) == 50

    async def test_per_item_aad(self, backend: Backend) -> None:
        ref = await self._ref(backend, KeyType.AES256_GCM)
        items = [b"one", b"two", b"three"]
        aads = [b"a1", b"", b"a3"]
        envelopes = await backend.encrypt(ref, items, aads)
        assert await backend.decrypt(ref, envelopes, aads) == items
        # The aad of item 0 applied to item 2: only that item fails.
        assert await backend.decrypt(ref, envelopes, [b"a1", b"", b"a1"]) == [b"one", b"two", None]
        assert await backend.decrypt(ref, envelopes, b"a1") == [b"one", None, None]

    async def test_wrong_aad_fails_per_item(self, backend: Backend) -> None:
        ref = await self._ref(backend, KeyType.AES256_GCM)
        envelopes = await backend.encrypt(ref, [b"x", b"y"], b"right")
        assert await backend.decrypt(ref, envelopes, b"wrong") == [None, None]
        assert await backend.decrypt(ref, envelopes, b"") == [None, None]

    async def test_aad_list_length_must_match(self, backend: Backend) -> None:
        ref = await self._ref(backend, KeyType.AES256_GCM)
        with pytest.raises(InvalidArgument):
            await backend.encrypt(ref, [b"x", b"y"], [b"only one"])

    async def test_tampered_envelopes_fail_per_item(self, backend: Backend) -> None:
        ref = await self._ref(backend, KeyType.AES256_GCM)
        [good] = await backend.encrypt(ref, [b"some plaintext"], b"")
        bad = [
            _flip(good, 3),  # algorithm
            _flip(good, 10),  # key id
            _flip(good, 23),  # version
            _flip(good, 30),  # nonce
            _flip(good, HEADER_LEN + 2),  # ciphertext
            _flip(good, len(good) - 1),  # tag
            good[:-1],  # truncated tag
            good[:HEADER_LEN],  # header only
            b"",
            b"not an envelope at all, but long enough to hold a header" * 2,
        ]
        result = await backend.decrypt(ref, [good, *bad, good], b"")
        assert result == [b"some plaintext", *([None] * len(bad)), b"some plaintext"]

    async def test_other_key_envelopes_fail(self, backend: Backend) -> None:
        ref = await self._ref(backend, KeyType.AES256_GCM)
        other = await self._ref(backend, KeyType.AES256_GCM)
        envelopes = await backend.encrypt(other, [b"secret"], b"")
        assert await backend.decrypt(ref, envelopes, b"") == [None]

    async def test_empty_batches(self, backend: Backend) -> None:
        ref = await self._ref(backend, KeyType.AES256_GCM)
        assert await backend.encrypt(ref, [], b"") == []
        assert await backend.decrypt(ref, [], b"") == []
        assert await backend.rewrap(ref, ref, [], b"") == []

    async def test_large_batch_keeps_order(self, backend: Backend) -> None:
        # Big enough that a backend offloads it (and may split it) across threads.
        ref = await self._ref(backend, KeyType.AES256_GCM)
        items = [i.to_bytes(4, "big") * (256 + i % 7) for i in range(2500)]
        aads = [str(i).encode() for i in range(len(items))]
        envelopes = await backend.encrypt(ref, items, aads)
        assert await backend.decrypt(ref, envelopes, aads) == items
        shifted = [*aads[1:], aads[0]]
        assert await backend.decrypt(ref, envelopes, shifted) == [None] * len(items)

    async def test_concurrent_first_use(self, backend: Backend) -> None:
        ref = await self._ref(backend, KeyType.AES256_GCM)
        results: dict[int, list[bytes | None]] = {}

        async def one(i: int) -> None:
            sealed = await backend.encrypt(ref, [b"%d" % i], b"")
            results[i] = await backend.decrypt(ref, sealed, b"")

        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(one, i)
        assert results == {i: [b"%d" % i] for i in range(20)}

    # --- rewrap -------------------------------------------------------------------

    async def test_rewrap_to_new_version(self, backend: Backend) -> None:
        key_id = _new_key_id()
        old = await self._ref(backend, KeyType.AES256_GCM, key_id=key_id, version=1)
        new = await self._ref(backend, KeyType.AES256_GCM, key_id=key_id, version=2)
        items = [b"alpha", b"", os.urandom(5000)]
        aads = [b"1", b"2", b"3"]
        envelopes = await backend.encrypt(old, items, aads)
        tampered = _flip(envelopes[0], HEADER_LEN)
        rewrapped = await backend.rewrap(old, new, [*envelopes, tampered], [*aads, b"1"])
        assert rewrapped[-1] is None
        fresh = rewrapped[:-1]
        assert all(e is not None for e in fresh)
        for envelope in fresh:
            assert envelope is not None
            assert parse_header(envelope).version == 2
        opened = await backend.decrypt(new, [e for e in fresh if e is not None], aads)
        assert opened == items
        # The new envelopes are bound to version 2 only.
        assert await backend.decrypt(old, [e for e in fresh if e is not None], aads) == [None] * 3

    async def test_rewrap_wrong_aad_fails_per_item(self, backend: Backend) -> None:
        key_id = _new_key_id()
        old = await self._ref(backend, KeyType.AES256_GCM, key_id=key_id, version=1)
        new = await self._ref(backend, KeyType.AES256_GCM, key_id=key_id, version=2)
        envelopes = await backend.encrypt(old, [b"a", b"b"], b"right")
        first, second = await backend.rewrap(old, new, envelopes, [b"right", b"wrong"])
        assert second is None
        assert first is not None
        assert await backend.decrypt(new, [first], b"right") == [b"a"]

    # --- signatures ---------------------------------------------------------------

    @pytest.mark.parametrize("key_type", SIGNING_TYPES)
    async def test_sign_verify(self, backend: Backend, key_type: KeyType) -> None:
        ref = await self._ref(backend, key_type)
        message = b"the message to sign"
        signature = await backend.sign(ref, message, prehashed=False)
        assert await backend.verify(ref, message, signature, prehashed=False)
        assert not await backend.verify(ref, message + b"!", signature, prehashed=False)
        assert not await backend.verify(ref, message, _flip(signature, len(signature) // 2), prehashed=False)
        assert not await backend.verify(ref, message, b"", prehashed=False)
        # Independent check against the published public key.
        pem = await backend.public_pem(ref)
        _check_signature(pem, key_type, message, signature)
        with pytest.raises(InvalidSignature):
            _check_signature(pem, key_type, b"another message", signature)

    @pytest.mark.parametrize("key_type", [KeyType.ECDSA_P256, KeyType.RSA_3072])
    async def test_sign_prehashed(self, backend: Backend, key_type: KeyType) -> None:
        ref = await self._ref(backend, key_type)
        message = b"a message hashed by the client"
        digest = hashlib.sha256(message).digest()
        signature = await backend.sign(ref, digest, prehashed=True)
        # A signature over the digest is a signature over the message.
        _check_signature(await backend.public_pem(ref), key_type, message, signature)
        assert await backend.verify(ref, message, signature, prehashed=False)
        assert await backend.verify(ref, digest, signature, prehashed=True)
        assert not await backend.verify(ref, _flip(digest, 0), signature, prehashed=True)
        with pytest.raises(InvalidArgument):
            await backend.sign(ref, digest[:20], prehashed=True)
        with pytest.raises(InvalidArgument):
            await backend.verify(ref, digest + b"x", signature, prehashed=True)

    async def test_ed25519_refuses_prehashed(self, backend: Backend) -> None:
        ref = await self._ref(backend, KeyType.ED25519)
        digest = hashlib.sha256(b"m").digest()
        with pytest.raises(InvalidArgument):
            await backend.sign(ref, digest, prehashed=True)
        signature = await backend.sign(ref, b"m", prehashed=False)
        with pytest.raises(InvalidArgument):
            await backend.verify(ref, digest, signature, prehashed=True)

    async def test_signature_of_other_version_fails(self, backend: Backend) -> None:
        key_id = _new_key_id()
        one = await self._ref(backend, KeyType.ECDSA_P256, key_id=key_id, version=1)
        two = await self._ref(backend, KeyType.ECDSA_P256, key_id=key_id, version=2)
        signature = await backend.sign(one, b"m", prehashed=False)
        assert not await backend.verify(two, b"m", signature, prehashed=False)
        assert await backend.public_pem(one) != await backend.public_pem(two)

    # --- MACs -----------------------------------------------------------------------

    async def test_mac(self, backend: Backend) -> None:
        key_id = _new_key_id()
        ref = await self._ref(backend, KeyType.HMAC_SHA256, key_id=key_id)
        tag = await backend.mac(ref, b"message")
        assert len(tag) == 32
        assert await backend.mac(ref, b"message") == tag  # deterministic
        assert await backend.mac(ref, b"message!") != tag
        assert await backend.verify_mac(ref, b"message", tag)
        assert not await backend.verify_mac(ref, b"message!", tag)
        assert not await backend.verify_mac(ref, b"message", _flip(tag, 31))
        assert not await backend.verify_mac(ref, b"message", tag[:16])
        assert not await backend.verify_mac(ref, b"message", b"")
        other = await self._ref(backend, KeyType.HMAC_SHA256, key_id=key_id, version=2)
        assert await backend.mac(other, b"message") != tag
        assert not await backend.verify_mac(other, b"message", tag)

    async def test_mac_large_message(self, backend: Backend) -> None:
        ref = await self._ref(backend, KeyType.HMAC_SHA256)
        message = os.urandom(300_000)
        tag = await backend.mac(ref, message)
        assert await backend.verify_mac(ref, message, tag)

    # --- wrong types ------------------------------------------------------------------

    async def test_operations_check_the_key_type(self, backend: Backend) -> None:
        aes = await self._ref(backend, KeyType.AES256_GCM)
        hmac = await self._ref(backend, KeyType.HMAC_SHA256)
        ed = await self._ref(backend, KeyType.ED25519)
        wrong: list[_Call] = [
            lambda: backend.encrypt(hmac, [b"x"], b""),
            lambda: backend.encrypt(ed, [b"x"], b""),
            lambda: backend.decrypt(hmac, [b"x" * OVERHEAD], b""),
            lambda: backend.rewrap(ed, ed, [b"x" * OVERHEAD], b""),
            lambda: backend.mac(aes, b"x"),
            lambda: backend.mac(ed, b"x"),
            lambda: backend.verify_mac(aes, b"x", b"\x00" * 32),
            lambda: backend.sign(aes, b"x", prehashed=False),
            lambda: backend.sign(hmac, b"x", prehashed=False),
            lambda: backend.verify(aes, b"x", b"\x00" * 64, prehashed=False),
            lambda: backend.public_pem(aes),
            lambda: backend.public_pem(hmac),
        ]
        for call in wrong:
            with pytest.raises(InvalidArgument):
                await call()

    # --- lifecycle of loaded material ----------------------------------------------------

    async def test_forget_then_use_again(self, backend: Backend) -> None:
        ref = await self._ref(backend, KeyType.AES256_GCM)
        envelopes = await backend.encrypt(ref, [b"kept"], b"")
        backend.forget(ref.key_id)
        assert await backend.decrypt(ref, envelopes, b"") == [b"kept"]
        backend.forget(_new_key_id())  # unknown keys are fine

    @pytest.mark.parametrize("key_type", [KeyType.AES256_GCM, KeyType.HMAC_SHA256, KeyType.ECDSA_P256])
    async def test_destroyed_version_is_refused(self, backend: Backend, key_type: KeyType) -> None:
        key_id = _new_key_id()
        doomed = await self._ref(backend, key_type, key_id=key_id, version=1)
        kept = await self._ref(backend, key_type, key_id=key_id, version=2)
        # Load both, so that a cache cannot hide a missing destroy.
        await self._use(backend, doomed)
        await self._use(backend, kept)
        await backend.destroy(doomed)
        await self._fail_destroyed(backend, doomed)
        await self._use(backend, kept)

    async def test_destroy_before_use(self, backend: Backend) -> None:
        ref = await self._ref(backend, KeyType.AES256_GCM)
        await backend.destroy(ref)
        await self._fail_destroyed(backend, ref)

    async def test_aclose_is_idempotent(self, backend: Backend) -> None:
        ref = await self._ref(backend, KeyType.AES256_GCM)
        await backend.encrypt(ref, [b"x"], b"")
        await backend.aclose()
        await backend.aclose()
        with pytest.raises(BrokerError):
            await backend.encrypt(ref, [b"x"], b"")

    # --- export and import (key.export, key.import, backups) -----------------------

    @staticmethod
    async def _exported(backend: Backend, ref: VersionRef) -> bytearray | None:
        """The exported material, or None when this backend's material never leaves it."""
        export = getattr(backend, "export_material", None)
        if export is None:
            return None
        try:
            material: bytearray = await export(ref)
        except InvalidArgument:
            return None
        assert isinstance(material, bytearray), "export_material returns a bytearray the caller zeroes"
        return material

    @pytest.mark.parametrize("key_type", list(KeyType))
    async def test_export_then_import_serves_the_same_key(self, backend: Backend, key_type: KeyType) -> None:
        ref = await self._ref(backend, key_type)
        material = await self._exported(backend, ref)
        if material is None:
            importer = getattr(backend, "import_material", None)
            if importer is not None:
                with pytest.raises(InvalidArgument):
                    await importer(ref.key_id, 2, key_type, bytearray(32))
            pytest.skip(f"{backend.protection} material does not leave the backend")
        if key_type.symmetric:
            assert len(material) == 32
        else:
            private = serialization.load_der_private_key(bytes(material), password=None)
            pem = private.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            assert pem == await backend.public_pem(ref)
        copy = bytearray(material)
        blob = await backend.import_material(ref.key_id, ref.version, key_type, material)
        assert material == bytearray(len(material)), "import_material zeroes the caller's buffer"
        assert isinstance(blob, bytes) and blob and bytes(copy) not in blob
        imported = replace(ref, material=blob)
        if key_type is KeyType.AES256_GCM:
            sealed = await backend.encrypt(ref, [b"moved"], b"aad")
            assert await backend.decrypt(imported, sealed, b"aad") == [b"moved"]
        elif key_type is KeyType.HMAC_SHA256:
            assert await backend.mac(imported, b"m") == await backend.mac(ref, b"m")
        else:
            signature = await backend.sign(imported, b"m", prehashed=False)
            assert await backend.verify(ref, b"m", signature, prehashed=False)
        again = await self._exported(backend, imported)
        assert again == copy

    @pytest.mark.parametrize(
        ("key_type", "material"),
        [
            (KeyType.AES256_GCM, b"\x01" * 31),
            (KeyType.AES256_GCM, b"\x01" * 33),
            (KeyType.HMAC_SHA256, b"\x01" * 16),
            (KeyType.ED25519, b"\x01" * 32),
            (KeyType.ECDSA_P256, b"0\x03\x02\x01\x00"),
        ],
    )
    async def test_import_refuses_malformed_material(
        self, backend: Backend, key_type: KeyType, material: bytes
    ) -> None:
        self._require(backend, key_type)
        importer = getattr(backend, "import_material", None)
        if importer is None:
            pytest.skip(f"{backend.protection} has no import_material")
        with pytest.raises(InvalidArgument):
            await importer(_new_key_id(), 1, key_type, bytearray(material))

    async def test_import_refuses_a_key_of_another_type(self, backend: Backend) -> None:
        importer = getattr(backend, "import_material", None)
        if importer is None:
            pytest.skip(f"{backend.protection} has no import_material")
        self._require(backend, KeyType.ECDSA_P256)
        der = ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        with pytest.raises(InvalidArgument):
            await importer(_new_key_id(), 1, KeyType.ECDSA_P256, bytearray(der))

    async def test_export_of_destroyed_version_is_refused(self, backend: Backend) -> None:
        ref = await self._ref(backend, KeyType.AES256_GCM)
        if await self._exported(backend, ref) is None:
            pytest.skip(f"{backend.protection} material does not leave the backend")
        await backend.destroy(ref)
        with pytest.raises(InvalidState):
            await backend.export_material(replace(ref, material=b""))

    @staticmethod
    async def _use(backend: Backend, ref: VersionRef) -> None:
        if ref.key_type is KeyType.AES256_GCM:
            sealed: Sequence[bytes] = await backend.encrypt(ref, [b"probe"], b"")
            assert await backend.decrypt(ref, sealed, b"") == [b"probe"]
        elif ref.key_type is KeyType.HMAC_SHA256:
            assert await backend.verify_mac(ref, b"probe", await backend.mac(ref, b"probe"))
        else:
            signature = await backend.sign(ref, b"probe", prehashed=False)
            assert await backend.verify(ref, b"probe", signature, prehashed=False)
