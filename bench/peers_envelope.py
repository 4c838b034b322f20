"""In-process envelope encryption, keybroker beside libraries an application
could use instead (part of ``python -m bench peers``).

Every contender encrypts a list of plaintexts into a list of self-contained
ciphertexts under one AES-256 key (or key-encryption key), a fresh random
nonce (or data key) per item:

* keybroker native batch -- ``broker.envelope.KeySlot.seal_batch``, one call
  for the whole list, format-1 envelopes; the same in calls of 10 items; and
  ``KeySlot.seal`` per item;
* ``cryptography`` AESGCM loop -- the same envelope built per item in Python
  (``bench.envelope._pyca_seal``);
* Tink AEAD -- ``tink.aead`` primitive of an ``AES256_GCM`` keyset, per item;
* Tink KmsEnvelopeAead -- a fresh ``AES256_GCM`` data key per item, wrapped by
  a local Tink AEAD standing in for the remote KMS;
* AWS Encryption SDK -- ``EncryptionSDKClient.encrypt`` per item with the
  committing suite without signatures (AES_256_GCM_HKDF_SHA512_COMMIT_KEY),
  through the legacy ``RawMasterKey`` and through the material providers'
  ``RawAESKeyring``.

Loops that take long per item run on the first ``cap`` items of the list
(their cost per item does not depend on the list's length).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.envelope import PREFIX_OLD, _pyca_open, _pyca_seal
from bench.peers_common import interleaved, rate

NATIVE = "keybroker native batch"
NATIVE_SINGLE = "keybroker KeySlot.seal per item"
NATIVE_10 = "keybroker native batches of 10"
PYCA = "cryptography AESGCM loop"
TINK = "Tink AEAD AES256_GCM"
TINK_ENVELOPE = "Tink KmsEnvelopeAead, local KEK"
ESDK_LEGACY = "AWS ESDK RawMasterKey, COMMIT_KEY suite"
ESDK_KEYRING = "AWS ESDK RawAESKeyring, COMMIT_KEY suite"

KEY_ID = bytes(range(16))
Seal = Callable[[list[bytes]], list[bytes]]
Open = Callable[[bytes], bytes]


@dataclass(frozen=True)
class Contender:
    """One way to encrypt a list of items, with the way to open one of its results."""

    name: str
    seal: Seal
    open: Open
    cap: int | None  # items per call for per-item loops; None: the whole list in one call


def _esdk_contenders(key: bytes) -> list[Contender]:
    import aws_encryption_sdk  # noqa: PLC0415 -- installed by the bench itself
    from aws_cryptographic_material_providers.mpl import AwsCryptographicMaterialProviders  # noqa: PLC0415
    from aws_cryptographic_material_providers.mpl.config import MaterialProvidersConfig  # noqa: PLC0415
    from aws_cryptographic_material_providers.mpl.models import (  # noqa: PLC0415
        AesWrappingAlg,
        CreateRawAesKeyringInput,
    )
    from aws_encryption_sdk.identifiers import (  # noqa: PLC0415
        Algorithm,
        CommitmentPolicy,
        EncryptionKeyType,
        WrappingAlgorithm,
    )
    from aws_encryption_sdk.internal.crypto.wrapping_keys import WrappingKey  # noqa: PLC0415
    from aws_encryption_sdk.key_providers.raw import RawMasterKey  # noqa: PLC0415

    client = aws_encryption_sdk.EncryptionSDKClient(
        commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT
    )
    suite = Algorithm.AES_256_GCM_HKDF_SHA512_COMMIT_KEY
    master_key = RawMasterKey(
        provider_id="bench",
        key_id=b"kek-1",
        wrapping_key=WrappingKey(
            wrapping_algorithm=WrappingAlgorithm.AES_256_GCM_IV12_TAG16_NO_PADDING,
            wrapping_key=key,
            wrapping_key_type=EncryptionKeyType.SYMMETRIC,
        ),
    )
    providers = AwsCryptographicMaterialProviders(config=MaterialProvidersConfig())
    keyring = providers.create_raw_aes_keyring(
        input=CreateRawAesKeyringInput(
            key_namespace="bench",
            key_name="kek-1",
            wrapping_key=key,
            wrapping_alg=AesWrappingAlg.ALG_AES256_GCM_IV12_TAG16,
        )
    )
    encrypt, decrypt = client.encrypt, client.decrypt

    def legacy(items: list[bytes]) -> list[bytes]:
        return [encrypt(source=x, key_provider=master_key, algorithm=suite)[0] for x in items]

    def with_keyring(items: list[bytes]) -> list[bytes]:
        return [encrypt(source=x, keyring=keyring, algorithm=suite)[0] for x in items]

    return [
        Contender(ESDK_LEGACY, legacy, lambda ct: decrypt(source=ct, key_provider=master_key)[0], 1_000),
        Contender(ESDK_KEYRING, with_keyring, lambda ct: decrypt(source=ct, keyring=keyring)[0], 200),
    ]


def _tink_contenders() -> list[Contender]:
    import tink  # noqa: PLC0415 -- installed by the bench itself
    from tink import aead  # noqa: PLC0415

    aead.register()
    template = aead.aead_key_templates.AES256_GCM
    primitive: Any = tink.new_keyset_handle(template).primitive(aead.Aead)
    kek: Any = tink.new_keyset_handle(template).primitive(aead.Aead)
    envelope: Any = aead.KmsEnvelopeAead(template, kek)

    def loop(prim: Any) -> Seal:
        encrypt = prim.encrypt
        return lambda items: [encrypt(x, b"") for x in items]

    return [
        Contender(TINK, loop(primitive), lambda ct: primitive.decrypt(ct, b""), 10_000),
        Contender(TINK_ENVELOPE, loop(envelope), lambda ct: envelope.decrypt(ct, b""), 10_000),
    ]


def contenders() -> tuple[list[Contender], Callable[[], None]]:
    """Every in-process contender, checked to round-trip, and a function that
    releases keybroker's key slot."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: PLC0415

    from broker.envelope import KeySlot  # noqa: PLC0415

    key = os.urandom(32)
    slot = KeySlot(bytearray(key), KEY_ID, 1)
    pyca = AESGCM(key)
    out = [
        Contender(
            NATIVE,
            lambda items: slot.seal_batch(items, limit=len(items)),
            lambda env: slot.open_batch([env])[0] or b"<failed>",
            None,
        ),
        Contender(NATIVE_10, lambda items: slot.seal_batch(items, limit=len(items)), slot.open, 10),
        Contender(NATIVE_SINGLE, lambda items: [slot.seal(x) for x in items], slot.open, 10_000),
        Contender(
            PYCA,
            lambda items: _pyca_seal(pyca, PREFIX_OLD, items),
            lambda env: _pyca_open(pyca, [env])[0],
            10_000,
        ),
        *_tink_contenders(),
        *_esdk_contenders(key),
    ]
    probe = [os.urandom(32), os.urandom(4096)]
    for contender in out:
        sealed = contender.seal(probe)
        if [contender.open(ct) for ct in sealed] != probe:
            raise RuntimeError(f"{contender.name} does not round-trip")
    return out, slot.close


def measure(
    everyone: list[Contender], *, quick: bool, seconds: float, repeats: int
) -> dict[str, dict[str, Any]]:
    """Items/s of each contender for 32-byte data keys and 4 KiB messages.

    Lists of 100,000 data keys (20,000 with ``quick``) and of 1,000 messages
    (4 MiB; with 10,000 every contender's 40 MiB of fresh results costs page
    faults and cache misses that swamp the cipher).

    Returns:
        ``{"32B": {name: items/s, ...}, "4KiB": {...}}`` plus ``samples`` per size.
    """
    sizes = {"32B": (32, 20_000 if quick else 100_000), "4KiB": (4096, 1_000)}
    result: dict[str, dict[str, Any]] = {}
    for label, (size, count) in sizes.items():
        items = [os.urandom(size) for _ in range(count)]

        def sampler(contender: Contender, items: list[bytes] = items) -> Callable[[], float]:
            chunk = items if contender.cap is None else items[: contender.cap]
            return lambda: rate(lambda: contender.seal(chunk), len(chunk), seconds)

        medians, samples = interleaved({c.name: sampler(c) for c in everyone}, repeats)
        result[label] = {"items": count, "item_bytes": size, "items_per_s": medians, "samples": samples}
    return result
