"""Key transfer wrapping: CKM_RSA_AES_KEY_WRAP over RSA-OAEP-SHA256 and AES-KWP. Pure logic.

``key.export`` and ``key.import`` move key material between keybroker and
another party without it ever crossing in the clear. The construction is the
one PKCS#11 names ``CKM_RSA_AES_KEY_WRAP`` (and cloud KMSs call
"RSA_AES_KEY_WRAP_SHA_256")::

    ephemeral = 32 random bytes                        (an AES-256 key)
    wrapped   = RSA-OAEP(recipient, ephemeral)         (SHA-256, MGF1-SHA-256, no label)
             || AES-KWP(ephemeral, material)           (RFC 5649 key wrap with padding)

The first part is exactly as long as the recipient's RSA modulus (384 bytes
for RSA-3072), so the split needs no length field. RSA-OAEP alone could not
carry an RSA-3072 private key (it wraps at most 318 bytes under RSA-3072),
hence the ephemeral AES key. AES-KWP's integrity check makes any change to
the second part fail to unwrap; a change to the first part gives another
ephemeral key, which fails the same check.

Material formats: 32 raw bytes for aes256-gcm and hmac-sha256 keys, a
PKCS#8 DER ``PrivateKeyInfo`` for signing keys. :func:`check_material`
validates and canonicalises imported material.

Python cannot scrub immutable ``bytes``: results that hold key material are
``bytearray`` buffers the caller zeroes, and the short-lived ephemeral key is
zeroed here. ``cryptography``'s own internal copies are outside our reach.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes, keywrap, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap

from .errors import DecryptionFailed, InvalidArgument, LimitExceeded, NotFound
from .keys import KeyType

__all__ = [
    "EPHEMERAL_KEY_LEN",
    "IMPORT_TOKEN_TTL_S",
    "MAX_IMPORT_TOKENS",
    "MIN_RSA_BITS",
    "WRAPPING_ALGORITHM",
    "ImportToken",
    "ImportTokens",
    "check_material",
    "load_recipient",
    "material_format",
    "new_wrapping_key",
    "public_pem",
    "recipient_fingerprint",
    "unwrap",
    "wrap",
]

#: The name results carry, so a reader knows which construction to undo.
WRAPPING_ALGORITHM = "rsa-aes-key-wrap-sha256"
EPHEMERAL_KEY_LEN = 32
# NIST SP 800-57 part 1: RSA-3072 is the smallest modulus giving 128-bit
# security, the strength of the AES-256 keys it carries.
MIN_RSA_BITS = 3072
# Larger moduli only cost time; beyond 16 Kibit a key is more likely a
# mistake (or a way to make the broker burn CPU) than a need.
MAX_RSA_BITS = 16384
RSA_PUBLIC_EXPONENT = 65537
# An import token lives a day (as cloud KMSs' import tokens do): long enough
# to move the wrapped material between machines, short enough that a stolen
# token soon becomes useless.
IMPORT_TOKEN_TTL_S = 24 * 3600
# Each outstanding token pins an RSA-3072 private key in memory and cost the
# broker ~0.1-1 s of CPU to make; the bound keeps a caller from exhausting either.
MAX_IMPORT_TOKENS = 256
# PEM text bigger than this is not a public key.
MAX_PEM_CHARS = 16 * 1024

SYMMETRIC_LEN = 32
HMAC_MIN_LEN = 32
HMAC_MAX_LEN = 64


def _oaep() -> padding.OAEP:
    return padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


def _zero(buf: bytearray) -> None:
    buf[:] = bytes(len(buf))


def load_recipient(pem: str | bytes, field_name: str = "public_key") -> rsa.RSAPublicKey:
    """Parse a recipient's PEM public key and check it is RSA of 3072 to 16384 bits.

    Args:
        pem: PEM SubjectPublicKeyInfo (``-----BEGIN PUBLIC KEY-----``).
        field_name: the parameter to name in errors.

    Raises:
        InvalidArgument: not PEM, not RSA, or too small or large a modulus.
    """
    text = pem.encode("ascii", "replace") if isinstance(pem, str) else bytes(pem)
    if len(text) > MAX_PEM_CHARS:
        raise InvalidArgument(f"{field_name}: too long for a public key", {"field": field_name})
    try:
        public = serialization.load_pem_public_key(text)
    except (ValueError, TypeError):
        raise InvalidArgument(f"{field_name}: not a PEM public key", {"field": field_name}) from None
    if not isinstance(public, rsa.RSAPublicKey):
        raise InvalidArgument(f"{field_name}: must be an RSA public key", {"field": field_name})
    if not MIN_RSA_BITS <= public.key_size <= MAX_RSA_BITS:
        raise InvalidArgument(
            f"{field_name}: RSA keys of {MIN_RSA_BITS} to {MAX_RSA_BITS} bits only, not {public.key_size}",
            {"field": field_name},
        )
    return public


def recipient_fingerprint(public: rsa.RSAPublicKey) -> str:
    """SHA-256 of the DER SubjectPublicKeyInfo, hex: names a recipient in audit records."""
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def public_pem(public: rsa.RSAPublicKey) -> str:
    """PEM SubjectPublicKeyInfo text of ``public``."""
    pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem.decode("ascii")


def wrap(public: rsa.RSAPublicKey, material: bytes | bytearray) -> bytes:
    """Wrap ``material`` for the holder of ``public``'s private key.

    Returns:
        RSA-OAEP(ephemeral) || AES-KWP(ephemeral, material).

    Raises:
        InvalidArgument: empty material.
    """
    if not material:
        raise InvalidArgument("nothing to wrap")
    ephemeral = bytearray(secrets.token_bytes(EPHEMERAL_KEY_LEN))
    try:
        head = public.encrypt(bytes(ephemeral), _oaep())
        body = keywrap.aes_key_wrap_with_padding(ephemeral, material)
    finally:
        _zero(ephemeral)
    return head + body


def unwrap(private: rsa.RSAPrivateKey, wrapped: bytes) -> bytearray:
    """Undo :func:`wrap` with the recipient's private key.

    Returns:
        The material, in a bytearray the caller zeroes after use.

    Raises:
        DecryptionFailed: wrong key, truncated or altered input (one opaque
            error, whichever check failed).
    """
    size = private.key_size // 8
    if len(wrapped) <= size + 8:
        raise DecryptionFailed()
    try:
        ephemeral = bytearray(private.decrypt(wrapped[:size], _oaep()))
    except ValueError:
        raise DecryptionFailed() from None
    try:
        if len(ephemeral) != EPHEMERAL_KEY_LEN:
            raise DecryptionFailed()
        return bytearray(keywrap.aes_key_unwrap_with_padding(ephemeral, wrapped[size:]))
    except InvalidUnwrap:
        raise DecryptionFailed() from None
    finally:
        _zero(ephemeral)


def material_format(key_type: KeyType) -> str:
    """How material of ``key_type`` is encoded: ``"raw"`` or ``"pkcs8-der"``."""
    return "raw" if key_type.symmetric else "pkcs8-der"


_PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def _private_matches(private: object, key_type: KeyType) -> bool:
    if key_type is KeyType.ED25519:
        return isinstance(private, ed25519.Ed25519PrivateKey)
    if key_type is KeyType.ECDSA_P256:
        return isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, ec.SECP256R1)
    return (
        isinstance(private, rsa.RSAPrivateKey)
        and private.key_size == MIN_RSA_BITS
        and private.public_key().public_numbers().e == RSA_PUBLIC_EXPONENT
    )


def check_material(key_type: KeyType, material: bytearray) -> bytearray:
    """Validate imported material for ``key_type``; return it in canonical form.

    aes256-gcm: exactly 32 bytes. hmac-sha256: 32 to 64 bytes (at least the
    hash length, at most its block size). Signing types: an unencrypted
    PKCS#8 DER private key of that type (rsa-3072: 3072-bit modulus, public
    exponent 65537), re-encoded canonically so trailing or odd encodings are
    not stored.

    Args:
        key_type: the key type the material is for.
        material: the candidate; not modified.

    Returns:
        A new bytearray the caller zeroes after use.

    Raises:
        InvalidArgument: wrong length, not a PKCS#8 key, or a key of another
            type. The message never includes the material.
    """
    if key_type is KeyType.AES256_GCM:
        if len(material) != SYMMETRIC_LEN:
            raise InvalidArgument(
                f"aes256-gcm material must be {SYMMETRIC_LEN} raw bytes", {"field": "wrapped"}
            )
        return bytearray(material)
    if key_type is KeyType.HMAC_SHA256:
        if not HMAC_MIN_LEN <= len(material) <= HMAC_MAX_LEN:
            raise InvalidArgument(
                f"hmac-sha256 material must be {HMAC_MIN_LEN} to {HMAC_MAX_LEN} raw bytes",
                {"field": "wrapped"},
            )
        return bytearray(material)
    try:
        private = serialization.load_der_private_key(bytes(material), password=None)
    except (ValueError, TypeError):
        raise InvalidArgument(
            f"{key_type.value} material must be an unencrypted PKCS#8 DER private key", {"field": "wrapped"}
        ) from None
    if not _private_matches(private, key_type):
        raise InvalidArgument(f"the material is not a {key_type.value} private key", {"field": "wrapped"})
    assert isinstance(private, _PrivateKey)
    return bytearray(
        private.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )


def new_wrapping_key() -> rsa.RSAPrivateKey:
    """A fresh RSA-3072 wrapping key (blocking: 0.1-1 s; run it in a thread)."""
    return rsa.generate_private_key(public_exponent=RSA_PUBLIC_EXPONENT, key_size=MIN_RSA_BITS)


@dataclass(frozen=True, slots=True)
class ImportToken:
    """A one-time RSA wrapping key handed out by ``key.import_params``."""

    token: str = field(repr=False)
    key_type: KeyType
    principal: str
    expires_at: int
    private: rsa.RSAPrivateKey = field(repr=False)


class ImportTokens:
    """Outstanding import tokens, in memory.

    A token is single use (the first ``key.import`` naming it consumes it,
    whatever the outcome), bound to the principal it was issued to and to a
    key type, and lapses after :data:`IMPORT_TOKEN_TTL_S`. Tokens live in
    this broker's memory only: a restart forgets them (ask for new import
    parameters), and in a cluster the import must go to the broker that
    issued the token.

    Args:
        clock: time source (integer Unix seconds).
        ttl_s: token lifetime.
        max_tokens: outstanding tokens allowed at once.
    """

    def __init__(
        self,
        clock: Callable[[], int],
        *,
        ttl_s: int = IMPORT_TOKEN_TTL_S,
        max_tokens: int = MAX_IMPORT_TOKENS,
    ) -> None:
        self._clock = clock
        self.ttl_s = ttl_s
        self.max_tokens = max_tokens
        self._tokens: dict[str, ImportToken] = {}

    def __len__(self) -> int:
        return len(self._tokens)

    def _purge(self, now: int) -> None:
        for name in [t for t, v in self._tokens.items() if v.expires_at <= now]:
            del self._tokens[name]

    def check_room(self) -> None:
        """Raise LimitExceeded if no further token may be issued now."""
        self._purge(self._clock())
        if len(self._tokens) >= self.max_tokens:
            raise LimitExceeded(
                f"{self.max_tokens} import tokens are outstanding; use or let some expire first",
                {"limit": self.max_tokens},
            )

    def issue(self, key_type: KeyType, principal: str, private: rsa.RSAPrivateKey) -> ImportToken:
        """Register a new token for ``private``.

        Raises:
            LimitExceeded: too many tokens outstanding.
        """
        self.check_room()
        token = ImportToken(
            token=secrets.token_urlsafe(24),
            key_type=key_type,
            principal=principal,
            expires_at=self._clock() + self.ttl_s,
            private=private,
        )
        self._tokens[token.token] = token
        return token

    def take(self, token: str, principal: str) -> ImportToken:
        """Consume a token.

        Raises:
            NotFound: unknown, used, expired, or issued to another principal
                (indistinguishable on purpose: a token is a capability).
        """
        self._purge(self._clock())
        found = self._tokens.get(token)
        if found is None or found.principal != principal:
            raise NotFound(
                "no such import token (unknown, already used, or expired)", {"field": "import_token"}
            )
        del self._tokens[token]
        return found
