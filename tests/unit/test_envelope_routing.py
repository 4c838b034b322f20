"""Large payloads go to the faster AES-GCM engine; both engines read each
other's envelopes, count uses, and reject tampering the same way."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from broker.envelope import HEADER_LEN, OVERHEAD, ROUTE_MIN_BYTES, KeySlot, parse_header
from broker.errors import DecryptionFailed

KEY = os.urandom(32)
KEY_ID = os.urandom(16)


@pytest.fixture
def slot() -> KeySlot:
    return KeySlot(KEY, KEY_ID, 7)


def test_large_envelopes_interoperate(slot: KeySlot) -> None:
    big = os.urandom(ROUTE_MIN_BYTES + 5)
    small = os.urandom(100)
    sealed = slot.seal(big, b"ctx")
    header = parse_header(sealed)
    assert (header.key_id, header.version) == (KEY_ID, 7) and len(sealed) == len(big) + OVERHEAD
    # An independent implementation opens it ...
    assert AESGCM(KEY).decrypt(header.nonce, sealed[HEADER_LEN:], sealed[:HEADER_LEN] + b"ctx") == big
    # ... and so does the native path, inside a mixed batch.
    assert slot.open_batch([sealed, slot.seal(small)], [b"ctx", b""]) == [big, small]
    # A batch of large items is routed item by item, natively sealed ones open there.
    natively = slot.seal_batch([small, big])[1]
    assert slot.open_batch([natively, sealed], [b"", b"ctx"]) == [big, big]
    assert slot.open(natively) == big


def test_routed_use_counter_and_failures(slot: KeySlot) -> None:
    big = os.urandom(ROUTE_MIN_BYTES)
    envelopes = slot.seal_batch([big, big, big])
    assert slot.uses == 3
    bad = bytearray(envelopes[0])
    bad[-1] ^= 1
    assert slot.open_batch([bytes(bad), envelopes[1]]) == [None, big]
    with pytest.raises(DecryptionFailed):
        slot.open(envelopes[0], aad=b"other")
    other = KeySlot(KEY, KEY_ID, 8)  # same key, another version: the header no longer matches
    with pytest.raises(DecryptionFailed):
        other.open(envelopes[0])
    slot.close()
    with pytest.raises(Exception, match="closed"):
        slot.seal(big)
    with pytest.raises(Exception, match="closed"):  # the engine kept from before refuses too
        slot.open(envelopes[1])


def test_the_kept_engine_draws_a_fresh_nonce_per_seal(slot: KeySlot) -> None:
    big = os.urandom(ROUTE_MIN_BYTES)
    nonces = {parse_header(slot.seal(big)).nonce for _ in range(200)}
    assert len(nonces) == 200 and slot.uses == 200
