"""Token work for the hsm backend: the functions that run in worker threads on a lent session.

Every function here blocks on the token; the backend calls them through the
session pool, never on the trio thread.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from pkcs11 import MGF, Attribute, Mechanism, MechanismFlag, ObjectClass, PKCS11Error
from pkcs11 import KeyType as P11KeyType
from pkcs11.exceptions import GeneralError
from pkcs11.mechanisms import GCMParams
from pkcs11.util.ec import encode_named_curve_parameters

from broker.envelope import HEADER_LEN, NONCE_LEN, OVERHEAD, TAG_LEN
from broker.errors import Unavailable
from broker.keys import KeyType

from .pool import SESSION_ERRORS, Lease

__all__ = [
    "PublicKey",
    "find",
    "generate",
    "open_envelope",
    "read_public",
    "seal_all",
    "sign",
    "token_mechanisms",
    "verifier",
]

PSS_SALT_LEN: Final = 32
TAG_BITS: Final = TAG_LEN * 8
# DER of the Ed25519 curve OID 1.3.101.112, as CKA_EC_PARAMS (RFC 8410).
ED25519_PARAMS: Final = bytes.fromhex("06032b6570")
# A search that meets a session copy being made retries this often, this
# much later (the copy settles within microseconds).
FIND_ATTEMPTS: Final = 3
FIND_RETRY_S: Final = 0.001
# Private and secret parts: generated inside, never readable outside.
PRIVATE_TEMPLATE: Final = {
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.PRIVATE: True,
}
# A private key signs only through the signing mechanisms: sign-recover with
# raw RSA (CKM_RSA_X_509) would be a raw private-key operation.
KEY_PAIR_PRIVATE_TEMPLATE: Final = {**PRIVATE_TEMPLATE, Attribute.SIGN_RECOVER: False}
PUBLIC_TEMPLATE: Final = {Attribute.PRIVATE: False}
SIGN_VERIFY: Final = MechanismFlag.SIGN | MechanismFlag.VERIFY
PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey


def token_mechanisms(lease: Lease) -> frozenset[Any]:
    return frozenset(lease.session.token.slot.get_mechanisms())


def find(session: Any, object_class: ObjectClass, object_id: bytes, missing: Exception) -> Any:
    """The one token object of a class with CKA_ID ``object_id``.

    Session copies share the id and the search asks for CKA_TOKEN true, but
    SoftHSM2 2.6 can still return a copy that another session is making
    right then (C_CopyObject registers the object before it applies the
    template; measured under load). So the results are checked again here,
    and a search that still sees two is repeated once the copy has settled.
    """
    query = {Attribute.CLASS: object_class, Attribute.ID: object_id, Attribute.TOKEN: True}
    for _ in range(FIND_ATTEMPTS):
        found = [obj for obj in session.get_objects(query) if obj[Attribute.TOKEN]]
        if not found:
            raise missing
        if len(found) == 1:
            return found[0]
        time.sleep(FIND_RETRY_S)
    raise Unavailable("several token objects share one key version's CKA_ID")


def generate(session: Any, key_type: KeyType, object_id: bytes, label: str) -> PublicKey | None:
    common: dict[str, Any] = {"id": object_id, "label": label, "store": True}
    if key_type is KeyType.AES256_GCM:
        session.generate_key(
            P11KeyType.AES, 256, capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
            template=PRIVATE_TEMPLATE, **common,
        )  # fmt: skip
        return None
    if key_type is KeyType.HMAC_SHA256:
        session.generate_key(
            P11KeyType.GENERIC_SECRET, 256, mechanism=Mechanism.GENERIC_SECRET_KEY_GEN,
            capabilities=SIGN_VERIFY, template=PRIVATE_TEMPLATE, **common,
        )  # fmt: skip
        return None
    pair: dict[str, Any] = {
        "capabilities": SIGN_VERIFY,
        "private_template": KEY_PAIR_PRIVATE_TEMPLATE,
        "public_template": PUBLIC_TEMPLATE,
        **common,
    }
    if key_type is KeyType.RSA_3072:
        public, _ = session.generate_keypair(P11KeyType.RSA, 3072, **pair)
    elif key_type is KeyType.ECDSA_P256:
        params = session.create_domain_parameters(
            P11KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")}, local=True
        )
        public, _ = params.generate_keypair(**pair)
    else:
        params = session.create_domain_parameters(
            P11KeyType.EC_EDWARDS, {Attribute.EC_PARAMS: ED25519_PARAMS}, local=True
        )
        public, _ = params.generate_keypair(mechanism=Mechanism.EC_EDWARDS_KEY_PAIR_GEN, **pair)
    return read_public(public, key_type)


def read_public(public: Any, key_type: KeyType) -> PublicKey:
    if key_type is KeyType.RSA_3072:
        n = int.from_bytes(public[Attribute.MODULUS], "big")
        e = int.from_bytes(public[Attribute.PUBLIC_EXPONENT], "big")
        return rsa.RSAPublicNumbers(e, n).public_key()
    point = _unwrap_octet_string(bytes(public[Attribute.EC_POINT]))
    if key_type is KeyType.ED25519:
        return ed25519.Ed25519PublicKey.from_public_bytes(point)
    return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)


def _unwrap_octet_string(value: bytes) -> bytes:
    """CKA_EC_POINT is a DER OCTET STRING per PKCS#11 2.40; some tokens give the raw point."""
    if len(value) >= 2 and value[0] == 0x04 and value[1] == len(value) - 2 and value[1] < 0x80:
        return value[2:]
    if len(value) >= 3 and value[0] == 0x04 and value[1] == 0x81 and value[2] == len(value) - 3:
        return value[3:]
    return value


def seal_all(key: Any, prefix: bytes, pairs: Sequence[tuple[bytes, bytes]]) -> list[bytes]:
    out: list[bytes] = []
    append = out.append
    urandom = os.urandom
    for item, ad in pairs:
        nonce = urandom(NONCE_LEN)
        header = prefix + nonce
        sealed = key.encrypt(
            item, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(nonce, header + ad, TAG_BITS)
        )
        append(header + sealed)
    return out


def open_envelope(lease: Lease, key: Any, prefix: bytes, envelope: bytes, ad: bytes) -> bytes | None:
    if len(envelope) < OVERHEAD or not envelope.startswith(prefix):
        return None
    header = envelope[:HEADER_LEN]
    params = GCMParams(header[-NONCE_LEN:], header + ad, TAG_BITS)
    try:
        return bytes(key.decrypt(envelope[HEADER_LEN:], mechanism=Mechanism.AES_GCM, mechanism_param=params))
    except GeneralError:
        # SoftHSM2 reports a tag mismatch as CKR_GENERAL_ERROR, which is also
        # how a lost device looks: only a live session makes it a bad item.
        if not lease.alive():
            raise
        return None
    except SESSION_ERRORS:
        raise
    except PKCS11Error:
        return None  # CKR_ENCRYPTED_DATA_INVALID and friends: this item fails


def sign(key: Any, key_type: KeyType, data: bytes, prehashed: bool) -> bytes:
    if key_type is KeyType.ED25519:
        return bytes(key.sign(data, mechanism=Mechanism.EDDSA))
    digest = data if prehashed else hashlib.sha256(data).digest()
    if key_type is KeyType.ECDSA_P256:
        raw = bytes(key.sign(digest, mechanism=Mechanism.ECDSA))
        half = len(raw) // 2
        return encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))
    return bytes(
        key.sign(
            digest,
            mechanism=Mechanism.RSA_PKCS_PSS,
            mechanism_param=(Mechanism.SHA256, MGF.SHA256, PSS_SALT_LEN),
        )
    )


def verifier(public: PublicKey, data: bytes, signature: bytes, prehashed: bool) -> Callable[[], bool]:
    def check() -> bool:
        try:
            if isinstance(public, ed25519.Ed25519PublicKey):
                public.verify(signature, data)
            else:
                algorithm: hashes.HashAlgorithm | Prehashed = (
                    Prehashed(hashes.SHA256()) if prehashed else hashes.SHA256()
                )
                if isinstance(public, ec.EllipticCurvePublicKey):
                    public.verify(signature, data, ec.ECDSA(algorithm))
                else:
                    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=PSS_SALT_LEN)
                    public.verify(signature, data, pss, algorithm)
        except InvalidSignature:
            return False
        return True

    return check
