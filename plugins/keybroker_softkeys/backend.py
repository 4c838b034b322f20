"""The software backend: key versions wrapped under the root key, used in native memory.

``generate`` makes the key material (32 CSPRNG bytes for AES and HMAC keys; a
``cryptography`` key pair for signing types), wraps it under the root key
with a context that names the key id, version and type, and returns the
wrapped blob for the store to keep. Nothing else is persisted here.

On first use of a version the blob is unwrapped into a native
:class:`~broker.envelope.KeySlot` (AES, HMAC) or a ``cryptography`` private
key object (signing types, whose key then lives in OpenSSL memory), and the
unwrapped buffer is zeroed at once. Loaded versions are cached until
``forget``, ``destroy`` or ``aclose``.

Work placement: a thread hop costs about 50-100 µs, more than sealing a few
small items, so small batches run inline on the trio thread. Larger ones run
in worker threads under a :class:`trio.CapacityLimiter`; a large batch is
split into chunks that run in parallel, which pays because the native calls
release the GIL.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Callable, Sequence
from itertools import accumulate, pairwise
from typing import TypeVar

import trio
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from broker.backend import Aad, RootKey, check_bytes, check_version_id, key_type_of
from broker.envelope import KeySlot, rewrap_batch
from broker.errors import DecryptionFailed, InvalidArgument, InvalidState, Unavailable
from broker.keys import SOFTWARE, KeyType, VersionRef
from broker.transfer import check_material

from ._secret import random_bytearray, zero

__all__ = [
    "INLINE_MAX_BYTES",
    "INLINE_MAX_ITEMS",
    "ITEM_COST_BYTES",
    "MIN_CHUNK_WORK",
    "SoftwareBackend",
    "wrap_context",
]

# A batch below both bounds runs on the trio thread: the native work takes
# less time than handing it to a worker thread would.
INLINE_MAX_ITEMS = 64
INLINE_MAX_BYTES = 64 * 1024
# Joining a batch's items into one buffer and splitting the results run in
# Python under the GIL, at roughly the cost of sealing this many bytes.
ITEM_COST_BYTES = 1024
# A batch is split across threads only into chunks of at least this much
# work (bytes + ITEM_COST_BYTES per item). Measured with AES-NI: a 1 MiB
# batch seals in ~0.3 ms and splitting it loses; from ~4 MiB or ~20,000
# items, two threads finish 1.3-1.8x sooner.
MIN_CHUNK_WORK = 2 * 1024 * 1024
# Messages this long are hashed (sign, verify, mac) off the trio thread.
INLINE_MAX_MESSAGE = 64 * 1024

SYMMETRIC_KEY_LEN = 32
RSA_PUBLIC_EXPONENT = 65537
RSA_BITS = 3072
SHA256_LEN = 32
# docs/protocol.md fixes the PSS salt length to the hash length.
PSS_SALT_LEN = 32
# Versioned so that a later change of wrapping can be told apart.
CONTEXT_PREFIX = b"keybroker/v1/"

_T = TypeVar("_T")
_PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
_Loaded = KeySlot | _PrivateKey


def wrap_context(key_id: bytes, version: int, key_type: KeyType) -> bytes:
    """The context a version's material is wrapped under.

    It binds the blob to one key id, version and type: a blob copied to
    another key or version fails to unwrap instead of silently serving the
    wrong key. The key id is fixed-length, so the encoding is unambiguous.
    """
    return CONTEXT_PREFIX + key_id + version.to_bytes(4, "big") + key_type.value.encode()


class SoftwareBackend:
    """Backend for protection ``"software"``: keys wrapped under a :class:`RootKey`.

    Supports every key type: aes256-gcm, hmac-sha256, ed25519, ecdsa-p256 and
    rsa-3072. Subclass and set :attr:`protection` to offer the same custody
    under another protection name.

    Args:
        root: the root of trust, already opened by the core.
        limiter: bounds the worker threads this backend uses at once; the
            default allows one per CPU. A large batch is split across at most
            this many threads.

    Resource handling:
        Loaded key versions are cached; ``forget`` and ``destroy`` drop them,
        ``aclose`` cleanses all of them. The root key is owned by the core and
        is not closed here.
    """

    protection: str = SOFTWARE

    def __init__(self, root: RootKey, *, limiter: trio.CapacityLimiter | None = None) -> None:
        self._root = root
        self._limiter = limiter or trio.CapacityLimiter(os.cpu_count() or 1)
        self._cache: dict[tuple[bytes, int], _Loaded] = {}
        # Bumped by forget/destroy/aclose; a version unwrapped while it
        # changed is used once and not cached (it may be the destroyed one).
        self._epoch = 0
        self._closed = False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} protection={self.protection!r} cached_versions={len(self._cache)}>"

    # --- Backend protocol ------------------------------------------------------

    async def open(self) -> None:
        """Nothing to connect: material is unwrapped lazily on first use."""

    def check_type(self, key_type: KeyType) -> None:
        """Every key type is supported; only an unknown type is refused."""
        key_type_of(key_type)

    async def generate(self, key_id: bytes, version: int, key_type: KeyType) -> bytes:
        """Create new material and return it wrapped under the root key.

        Raises:
            InvalidArgument: malformed key id, version out of range, unknown type.
        """
        key_type = key_type_of(key_type)
        check_version_id(key_id, version)
        context = wrap_context(key_id, version, key_type)
        if key_type.symmetric:
            material = random_bytearray(SYMMETRIC_KEY_LEN)
            try:
                return await self._root.wrap(material, context)
            finally:
                zero(material)
        if key_type is KeyType.RSA_3072:
            # RSA-3072 key generation takes 0.1-1 s (the GIL is released).
            private: _PrivateKey = await trio.to_thread.run_sync(
                _generate_rsa, limiter=self._limiter
            )
        elif key_type is KeyType.ECDSA_P256:
            private = ec.generate_private_key(ec.SECP256R1())
        else:
            private = ed25519.Ed25519PrivateKey.generate()
        # cryptography hands the encoding back as immutable bytes; it is
        # dropped right after wrapping.
        der = private.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return await self._root.wrap(der, context)

    async def destroy(self, ref: VersionRef) -> None:
        """Drop the version's loaded key.

        Software material exists only as the wrapped blob the store keeps; the
        core erases it, and later refs carry ``material=b""``, which every
        operation refuses with InvalidState.
        """
        self._epoch += 1
        loaded = self._cache.pop((ref.key_id, ref.version), None)
        if loaded is not None:
            _close(loaded)

    async def encrypt(self, ref: VersionRef, items: Sequence[bytes], aad: Aad) -> list[bytes]:
        """Seal each item into a format-1 envelope under ``ref``."""
        _check_batch(items, aad)
        async with self._loaded(ref, KeyType.AES256_GCM, "encrypt") as slot:
            assert isinstance(slot, KeySlot)
            limit = len(items)
            return await self._batch(lambda chunk, a: slot.seal_batch(chunk, a, limit=limit), items, aad)

    async def decrypt(self, ref: VersionRef, envelopes: Sequence[bytes], aad: Aad) -> list[bytes | None]:
        """Open each envelope; None for an item that fails authentication."""
        _check_batch(envelopes, aad)
        async with self._loaded(ref, KeyType.AES256_GCM, "decrypt") as slot:
            assert isinstance(slot, KeySlot)
            limit = len(envelopes)
            return await self._batch(lambda chunk, a: slot.open_batch(chunk, a, limit=limit), envelopes, aad)

    async def rewrap(
        self, old: VersionRef, new: VersionRef, envelopes: Sequence[bytes], aad: Aad
    ) -> list[bytes | None]:
        """Open under ``old`` and seal under ``new`` inside native code.

        The plaintext never reaches Python. None for an item that fails to open.
        """
        _check_batch(envelopes, aad)
        async with (
            self._loaded(old, KeyType.AES256_GCM, "rewrap") as old_slot,
            self._loaded(new, KeyType.AES256_GCM, "rewrap") as new_slot,
        ):
            assert isinstance(old_slot, KeySlot) and isinstance(new_slot, KeySlot)
            limit = len(envelopes)
            return await self._batch(
                lambda chunk, a: rewrap_batch(old_slot, new_slot, chunk, a, limit=limit), envelopes, aad
            )

    async def sign(self, ref: VersionRef, data: bytes, *, prehashed: bool) -> bytes:
        """Sign per docs/protocol.md: ECDSA P-256 / SHA-256 (DER), RSA-PSS / SHA-256 with
        a 32-byte salt, or Ed25519 (message only).

        Args:
            data: the message, or with ``prehashed`` its 32-byte SHA-256 digest.

        Raises:
            InvalidArgument: not a signing key, ``prehashed`` with ed25519, or a
                digest that is not 32 bytes.
        """
        check_bytes(data, "data")
        async with self._loaded(ref, None, "sign") as private:
            assert not isinstance(private, KeySlot)
            signer = _signer(private, data, prehashed)
            # An RSA private-key operation takes milliseconds; keep it off the loop.
            heavy = isinstance(private, rsa.RSAPrivateKey) or len(data) > INLINE_MAX_MESSAGE
            return await self._call(signer, heavy=heavy)

    async def verify(self, ref: VersionRef, data: bytes, signature: bytes, *, prehashed: bool) -> bool:
        """Check a signature made by :meth:`sign`; False when it does not verify."""
        check_bytes(data, "data")
        check_bytes(signature, "signature")
        async with self._loaded(ref, None, "verify") as private:
            assert not isinstance(private, KeySlot)
            verifier = _verifier(private, data, signature, prehashed)
            return await self._call(verifier, heavy=len(data) > INLINE_MAX_MESSAGE)

    async def mac(self, ref: VersionRef, message: bytes) -> bytes:
        """HMAC-SHA256 of ``message``."""
        check_bytes(message, "message")
        async with self._loaded(ref, KeyType.HMAC_SHA256, "mac") as slot:
            assert isinstance(slot, KeySlot)
            return await self._call(lambda: slot.mac(message), heavy=len(message) > INLINE_MAX_MESSAGE)

    async def verify_mac(self, ref: VersionRef, message: bytes, tag: bytes) -> bool:
        """Constant-time check of an HMAC-SHA256 tag (done in native code)."""
        check_bytes(message, "message")
        check_bytes(tag, "tag")
        async with self._loaded(ref, KeyType.HMAC_SHA256, "verify_mac") as slot:
            assert isinstance(slot, KeySlot)
            return await self._call(
                lambda: slot.verify_mac(message, tag), heavy=len(message) > INLINE_MAX_MESSAGE
            )

    async def public_pem(self, ref: VersionRef) -> bytes:
        """The version's public key as PEM SubjectPublicKeyInfo."""
        async with self._loaded(ref, None, "public") as private:
            assert not isinstance(private, KeySlot)
            return private.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )

    async def export_material(self, ref: VersionRef) -> bytearray:
        """The version's material unwrapped from the root key, for ``key.export`` and backups.

        Returns:
            32 raw bytes (aes256-gcm, hmac-sha256) or a PKCS#8 DER private
            key (signing types), in a bytearray the caller zeroes.

        Raises:
            InvalidState: the version is destroyed.
            Unavailable: the blob does not unwrap under this root key.
        """
        if self._closed:
            raise Unavailable(f"the {self.protection} backend is closed")
        key_type = key_type_of(ref.key_type)
        if not ref.material:
            raise InvalidState(f"version {ref.version} of this key is destroyed; its material is gone")
        return await self._unwrap_material(ref, key_type)

    async def import_material(
        self, key_id: bytes, version: int, key_type: KeyType, material: bytearray
    ) -> bytes:
        """Check imported material, wrap it under the root key, zero the caller's buffer.

        Signing keys are re-encoded as canonical PKCS#8 DER before wrapping.

        Raises:
            InvalidArgument: malformed ids, unknown type, or material that does
                not suit the type (see :func:`broker.transfer.check_material`).
        """
        try:
            if self._closed:
                raise Unavailable(f"the {self.protection} backend is closed")
            key_type = key_type_of(key_type)
            check_version_id(key_id, version)
            canonical = check_material(key_type, material)
            try:
                return await self._root.wrap(canonical, wrap_context(key_id, version, key_type))
            finally:
                zero(canonical)
        finally:
            zero(material)

    def forget(self, key_id: bytes) -> None:
        """Close and drop every loaded version of the key."""
        self._epoch += 1
        for cache_key in [k for k in self._cache if k[0] == key_id]:
            _close(self._cache.pop(cache_key))

    async def aclose(self) -> None:
        """Cleanse every loaded version. Idempotent; later calls raise Unavailable."""
        self._closed = True
        self._epoch += 1
        cache, self._cache = self._cache, {}
        for loaded in cache.values():
            _close(loaded)

    # --- loading -------------------------------------------------------------

    def _loaded(self, ref: VersionRef, want: KeyType | None, operation: str) -> _Loan:
        """``async with``: the loaded key of ``ref``, checked to suit ``operation``.

        ``want`` is the one key type the operation needs, or None for "any
        signing type".
        """
        return _Loan(self, ref, want, operation)

    async def _unwrap_material(self, ref: VersionRef, key_type: KeyType) -> bytearray:
        context = wrap_context(ref.key_id, ref.version, key_type)
        try:
            return await self._root.unwrap(ref.material, context)
        except DecryptionFailed:
            # Not the caller's data at fault: the stored blob does not belong
            # to this key version under this root key. An operator must act.
            raise Unavailable(
                f"the stored material of version {ref.version} of this key does not unwrap under "
                "the root key (a different root key file, or an altered or misplaced blob)"
            ) from None

    async def _unwrap(self, ref: VersionRef, key_type: KeyType) -> _Loaded:
        material = await self._unwrap_material(ref, key_type)
        try:
            if key_type is KeyType.AES256_GCM:
                return KeySlot(material, ref.key_id, ref.version)
            if key_type is KeyType.HMAC_SHA256:
                return KeySlot.for_hmac(material, ref.key_id, ref.version)
            private = serialization.load_der_private_key(material, password=None)
            if not _matches(private, key_type):
                raise Unavailable(
                    f"the stored material of version {ref.version} is not a {key_type.value} key"
                )
            assert isinstance(private, _PrivateKey)
            return private
        finally:
            # KeySlot already zeroed it; a signing key now lives in OpenSSL.
            zero(material)

    # --- work placement --------------------------------------------------------

    async def _call(self, fn: Callable[[], _T], *, heavy: bool) -> _T:
        if not heavy:
            return fn()
        return await trio.to_thread.run_sync(fn, limiter=self._limiter)

    async def _batch(
        self, fn: Callable[[Sequence[bytes], Aad], list[_T]], items: Sequence[bytes], aad: Aad
    ) -> list[_T]:
        """Run a batch function inline, in one worker thread, or in parallel chunks."""
        n = len(items)
        if n < INLINE_MAX_ITEMS and sum(map(len, items)) < INLINE_MAX_BYTES:
            return fn(items, aad)
        work = list(accumulate((len(item) + ITEM_COST_BYTES for item in items), initial=0))
        total = work[-1]
        chunks = max(1, min(int(self._limiter.total_tokens), total // MIN_CHUNK_WORK, n))
        if chunks == 1:
            return await trio.to_thread.run_sync(fn, items, aad, limiter=self._limiter)
        # Cut where the running work crosses each 1/chunks of the total, so
        # that the threads finish at about the same time.
        cuts = [0] + [bisect.bisect_left(work, total * i // chunks) for i in range(1, chunks)] + [n]
        per_item_aad = not isinstance(aad, bytes | bytearray | memoryview)
        outcomes: list[list[_T] | BaseException] = []

        async def run(lo: int, hi: int, index: int) -> None:
            part_aad = aad[lo:hi] if per_item_aad else aad
            try:
                outcomes[index] = await trio.to_thread.run_sync(
                    fn, items[lo:hi], part_aad, limiter=self._limiter
                )
            except Exception as exc:
                # Collected rather than raised so that the caller sees the
                # original error, not an ExceptionGroup from the nursery.
                outcomes[index] = exc

        spans = [(lo, hi) for lo, hi in pairwise(cuts) if hi > lo]
        outcomes.extend([] for _ in spans)
        async with trio.open_nursery() as nursery:
            for index, (lo, hi) in enumerate(spans):
                nursery.start_soon(run, lo, hi, index)
        result: list[_T] = []
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
            result.extend(outcome)
        return result


# --- helpers -----------------------------------------------------------------


def _generate_rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=RSA_PUBLIC_EXPONENT, key_size=RSA_BITS)




class _Loan:
    """A loaded key for one ``async with``: the cached one, or one loaded for the block.

    A class rather than an ``asynccontextmanager`` generator: it is entered
    on every operation, and a generator costs several times more.
    """

    __slots__ = ("_backend", "_operation", "_owned", "_ref", "_want")

    def __init__(
        self, backend: SoftwareBackend, ref: VersionRef, want: KeyType | None, operation: str
    ) -> None:
        self._backend, self._ref, self._want, self._operation = backend, ref, want, operation
        self._owned: _Loaded | None = None  # loaded for this block only, closed on exit

    async def __aenter__(self) -> _Loaded:
        backend, ref, want = self._backend, self._ref, self._want
        if backend._closed:
            raise Unavailable(f"the {backend.protection} backend is closed")
        key_type = key_type_of(ref.key_type)
        if (want is None and not key_type.signing) or (want is not None and key_type is not want):
            raise InvalidArgument(f"a {key_type.value} key cannot {self._operation}")
        if not ref.material:
            raise InvalidState(f"version {ref.version} of this key is destroyed; its material is gone")
        cache_key = (ref.key_id, ref.version)
        cached = backend._cache.get(cache_key)
        if cached is not None:
            return cached
        epoch = backend._epoch
        loaded = await backend._unwrap(ref, key_type)
        if epoch == backend._epoch and not backend._closed:
            # Another task may have loaded it during the await; keep one.
            kept = backend._cache.setdefault(cache_key, loaded)
            if kept is not loaded:
                _close(loaded)
            return kept
        self._owned = loaded  # forgotten or closed meanwhile: not cached
        return loaded

    async def __aexit__(self, *exc: object) -> None:
        owned, self._owned = self._owned, None
        if owned is not None:
            _close(owned)


def _check_batch(items: Sequence[bytes], aad: Aad) -> None:
    if isinstance(items, bytes | bytearray | memoryview | str):
        raise InvalidArgument("items must be a list of bytes")
    if not isinstance(aad, bytes | bytearray | memoryview) and len(aad) != len(items):
        raise InvalidArgument(f"aad list has {len(aad)} entries for {len(items)} items")


def _matches(private: object, key_type: KeyType) -> bool:
    if key_type is KeyType.ED25519:
        return isinstance(private, ed25519.Ed25519PrivateKey)
    if key_type is KeyType.ECDSA_P256:
        return isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, ec.SECP256R1)
    return isinstance(private, rsa.RSAPrivateKey) and private.key_size == RSA_BITS


def _hash_for(data: bytes, prehashed: bool) -> hashes.HashAlgorithm | Prehashed:
    if not prehashed:
        return hashes.SHA256()
    if len(data) != SHA256_LEN:
        raise InvalidArgument(f"a digest must be a {SHA256_LEN}-byte SHA-256")
    return Prehashed(hashes.SHA256())


def _pss() -> padding.PSS:
    return padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=PSS_SALT_LEN)


def _signer(private: _PrivateKey, data: bytes, prehashed: bool) -> Callable[[], bytes]:
    """A no-argument signing call, with its arguments checked up front."""
    if isinstance(private, ed25519.Ed25519PrivateKey):
        if prehashed:
            raise InvalidArgument("ed25519 signs the message itself; a digest is not accepted")
        return lambda: private.sign(data)
    algorithm = _hash_for(data, prehashed)
    if isinstance(private, ec.EllipticCurvePrivateKey):
        return lambda: private.sign(data, ec.ECDSA(algorithm))
    return lambda: private.sign(data, _pss(), algorithm)


def _verifier(private: _PrivateKey, data: bytes, signature: bytes, prehashed: bool) -> Callable[[], bool]:
    """A no-argument verification call, with its arguments checked up front."""
    public = private.public_key()
    check: Callable[[], None]
    if isinstance(public, ed25519.Ed25519PublicKey):
        if prehashed:
            raise InvalidArgument("ed25519 verifies the message itself; a digest is not accepted")
        ed_public = public
        check = lambda: ed_public.verify(signature, data)  # noqa: E731
    else:
        algorithm = _hash_for(data, prehashed)
        if isinstance(public, ec.EllipticCurvePublicKey):
            ec_public = public
            check = lambda: ec_public.verify(signature, data, ec.ECDSA(algorithm))  # noqa: E731
        else:
            assert isinstance(public, rsa.RSAPublicKey)
            rsa_public = public
            check = lambda: rsa_public.verify(signature, data, _pss(), algorithm)  # noqa: E731

    def verify() -> bool:
        try:
            check()
        except InvalidSignature:
            return False
        return True

    return verify


def _close(loaded: _Loaded) -> None:
    # Signing keys are freed (and their private parts cleared) by OpenSSL
    # when the object is collected; only slots need an explicit close.
    if isinstance(loaded, KeySlot):
        loaded.close()
