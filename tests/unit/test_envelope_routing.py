"""Large payloads go to the faster AES-GCM engine; both engines read each
other's envelopes, count uses, and reject tampering the same way."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from broker import envelope
from broker.envelope import HEADER_LEN, OVERHEAD, ROUTE_MIN_BYTES, KeySlot, parse_header, rewrap_batch
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
    assert slot.uses == 3 + 1  # the engine's probe drew a nonce too
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
    assert len(nonces) == 200 and slot.uses == 200 + 1  # and the engine's probe


class RekeyingPerCall:
    """AESGCM as ``cryptography`` builds it on an OpenSSL older than 3.2: it
    keeps the key object and keys a context from it at every call."""

    def __init__(self, key: bytearray) -> None:
        self._key = key

    def encrypt(self, nonce: bytes, data: bytes, aad: bytes | None) -> bytes:
        return AESGCM(bytes(self._key)).encrypt(nonce, data, aad)

    def decrypt(self, nonce: bytes, data: bytes, aad: bytes | None) -> bytes:
        return AESGCM(bytes(self._key)).decrypt(nonce, data, aad)


def test_an_engine_that_would_seal_under_the_cleansed_key_is_not_used(
    slot: KeySlot, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr("broker.envelope.AESGCM", RekeyingPerCall)
    big = os.urandom(ROUTE_MIN_BYTES)
    sealed = slot.seal(big, b"ctx")
    header = parse_header(sealed)
    # Sealed under the slot's key (natively), not under the overwritten copy.
    assert AESGCM(KEY).decrypt(header.nonce, sealed[HEADER_LEN:], sealed[:HEADER_LEN] + b"ctx") == big
    assert slot.open(sealed, b"ctx") == big
    assert slot.open_batch(slot.seal_batch([big, big])) == [big, big]
    assert "native path" in caplog.text


def test_bytes_likes_take_the_large_routes_too(slot: KeySlot) -> None:
    big = os.urandom(ROUTE_MIN_BYTES)
    sealed = slot.seal_batch([memoryview(big), bytearray(big)], aad=memoryview(b"ctx"))
    assert slot.open_batch([memoryview(e) for e in sealed], aad=[bytearray(b"ctx")] * 2) == [big, big]


class LongerThanItIs(bytes):
    def __len__(self) -> int:
        return 1 << 20


def test_a_shared_aad_is_passed_by_its_real_length(slot: KeySlot) -> None:
    aad = LongerThanItIs(b"ctx")
    sealed = slot.seal_batch([b"a", b"b"], aad=aad)
    assert slot.open_batch(sealed, aad=b"ctx") == [b"a", b"b"]
    assert slot.open_batch(sealed, aad=aad) == [b"a", b"b"]
    other = KeySlot(os.urandom(32), os.urandom(16), 1)
    assert other.open_batch(rewrap_batch(slot, other, sealed, aad=aad), aad=b"ctx") == [b"a", b"b"]


class MlockFails:
    """The native library as it behaves when mlock fails under RLIMIT_MEMLOCK."""

    def __init__(self, lib: object) -> None:
        self._lib = lib

    def __getattr__(self, name: str) -> object:
        return getattr(self._lib, name)

    def kb_slot_locked(self, _ptr: object) -> int:
        return 0


def test_unlocked_key_slots_are_reported_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(envelope, "lib", MlockFails(envelope.lib))
    monkeypatch.setitem(envelope._unlocked, "reported", False)
    KeySlot(KEY, KEY_ID, 1).close()
    KeySlot(KEY, KEY_ID, 2).close()
    assert len(caplog.records) == 1 and "swappable" in caplog.text
