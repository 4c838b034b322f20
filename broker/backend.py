"""The Backend and RootKey interfaces: key custody by protection name.

A backend plugin (``kb_backends`` hook) returns objects with these methods.
The core never sees raw key material: it stores the opaque ``material`` blob
that ``generate`` returns (key bytes wrapped under the root key, or a token
object reference) and hands it back in a :class:`~broker.keys.VersionRef`.
``broker.testing`` has a conformance suite every backend runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from .envelope import KEY_ID_LEN
from .errors import InvalidArgument
from .keys import KeyType, VersionRef

__all__ = ["KEY_ID_LEN", "Aad", "Backend", "RootKey", "check_bytes", "check_version_id", "key_type_of"]

# One aad for the whole batch, or one per item.
Aad = bytes | Sequence[bytes]


class RootKey(Protocol):
    """The root of trust that wraps software-protected key material."""

    name: str

    async def open(self) -> None:
        """Load or create the root key. Called once before use."""

    async def wrap(self, material: bytes | bytearray, context: bytes) -> bytes:
        """Encrypt ``material`` under the root key, bound to ``context``."""

    async def unwrap(self, blob: bytes, context: bytes) -> bytearray:
        """Decrypt a wrapped blob. The caller zeroes the result after use.

        Raises:
            DecryptionFailed: wrong root key or tampered blob.
        """

    async def aclose(self) -> None:
        """Cleanse the root key from memory. Idempotent."""


class Backend(Protocol):
    """Custody and use of key versions for one protection name."""

    protection: str

    async def open(self) -> None:
        """Connect to the custody medium (token sessions, ...). Called once before use."""

    def check_type(self, key_type: KeyType) -> None:
        """Raise InvalidArgument naming what is missing if ``key_type`` is unsupported."""

    async def generate(self, key_id: bytes, version: int, key_type: KeyType) -> bytes:
        """Create new key material; return the opaque blob the store keeps."""

    async def destroy(self, ref: VersionRef) -> None:
        """Destroy the version's material for good (token object, cached slots)."""

    async def encrypt(self, ref: VersionRef, items: Sequence[bytes], aad: Aad) -> list[bytes]:
        """Seal each item into a format-1 envelope under ``ref``."""

    async def decrypt(self, ref: VersionRef, envelopes: Sequence[bytes], aad: Aad) -> list[bytes | None]:
        """Open each envelope; None for an item that fails authentication."""

    async def rewrap(
        self, old: VersionRef, new: VersionRef, envelopes: Sequence[bytes], aad: Aad
    ) -> list[bytes | None]:
        """Open under ``old`` and seal under ``new``; plaintext stays inside the backend."""

    async def sign(self, ref: VersionRef, data: bytes, *, prehashed: bool) -> bytes:
        """Sign a message (or, ``prehashed``, a SHA-256 digest)."""

    async def verify(self, ref: VersionRef, data: bytes, signature: bytes, *, prehashed: bool) -> bool:
        """Check a signature; False when it does not verify."""

    async def mac(self, ref: VersionRef, message: bytes) -> bytes:
        """HMAC-SHA256 of ``message``."""

    async def verify_mac(self, ref: VersionRef, message: bytes, tag: bytes) -> bool:
        """Constant-time check of an HMAC-SHA256 tag."""

    async def public_pem(self, ref: VersionRef) -> bytes:
        """The public key of a signing key version, PEM SubjectPublicKeyInfo."""

    async def export_material(self, ref: VersionRef) -> bytearray:
        """The version's key material in the clear, for wrapping to a recipient or a backup.

        Only backends whose material may leave them implement it (software
        custody); a token-bound backend raises InvalidArgument. Formats: 32
        raw bytes for aes256-gcm and hmac-sha256, PKCS#8 DER for signing
        types. The caller zeroes the result after use. A backend written
        before this method existed simply lacks it; the core then treats it
        as not exportable.

        Raises:
            InvalidArgument: this backend's material never leaves it.
            InvalidState: the version is destroyed (empty ``ref.material``).
        """

    async def import_material(
        self, key_id: bytes, version: int, key_type: KeyType, material: bytearray
    ) -> bytes:
        """Take custody of material made elsewhere; return the opaque blob the store keeps.

        ``material`` has :meth:`export_material`'s format; the backend checks
        it suits ``key_type`` and zeroes the caller's buffer. Backends that
        cannot import raise InvalidArgument (or lack the method).

        Raises:
            InvalidArgument: material of the wrong length or type, or no import here.
        """

    def forget(self, key_id: bytes) -> None:
        """Drop any cached material of the key (it changed or was destroyed)."""

    async def aclose(self) -> None:
        """Release sessions and cleanse cached material. Idempotent."""


# --- argument checks a backend makes on what it is handed --------------------------


def key_type_of(key_type: object) -> KeyType:
    """The :class:`KeyType` named by ``key_type``; InvalidArgument for anything else."""
    if isinstance(key_type, str):
        try:
            return KeyType(key_type)
        except ValueError:
            pass
    raise InvalidArgument(f"unknown key type {key_type!r}")


def check_version_id(key_id: object, version: object) -> None:
    """InvalidArgument unless ``key_id`` is 16 bytes and ``version`` is in 1 .. 2**32-1."""
    if not isinstance(key_id, bytes) or len(key_id) != KEY_ID_LEN:
        raise InvalidArgument(f"key id must be {KEY_ID_LEN} bytes")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= 0xFFFFFFFF:
        raise InvalidArgument("version must be between 1 and 2**32 - 1")


def check_bytes(value: object, name: str) -> None:
    """InvalidArgument unless ``value`` is bytes-like."""
    if not isinstance(value, bytes | bytearray | memoryview):
        raise InvalidArgument(f"{name} must be bytes")
