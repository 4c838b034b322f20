"""Property tests of the envelope format and the native hot path.

Example counts are bounded for CI; KB_ENVELOPE_EXAMPLES scales them (the
sanitizer run in tests/unit/test_native_asan.py sets it low).
"""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from broker.envelope import HEADER_LEN, OVERHEAD, KeySlot, pack_header, parse_header, rewrap_batch
from broker.errors import DecryptionFailed

EXAMPLES = int(os.environ.get("KB_ENVELOPE_EXAMPLES", "40"))
FEW = max(EXAMPLES // 4, 5)

bounded = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
few = settings(
    max_examples=FEW,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)

KEY_A = bytes(range(32))
KEY_B = bytes(range(32, 64))
ID_A = b"A" * 16
ID_B = b"B" * 16


def _big(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


# Mostly small payloads, now and then a large one (up to 1 MiB), generated from
# a seed so hypothesis does not have to draw a megabyte byte by byte.
payloads = st.one_of(
    st.binary(max_size=64),
    st.binary(max_size=600),
    st.binary(max_size=64),
    st.builds(_big, st.integers(min_value=0, max_value=1 << 20), st.integers(min_value=0, max_value=2**32)),
)
aads = st.one_of(st.just(b""), st.binary(max_size=300))


@pytest.fixture(scope="module")
def slot_a() -> KeySlot:
    return KeySlot(KEY_A, ID_A, 1)


@pytest.fixture(scope="module")
def slot_b() -> KeySlot:
    return KeySlot(KEY_B, ID_B, 1)


@pytest.fixture(scope="module")
def slot_a2() -> KeySlot:
    """Same key bytes and key id as slot_a, next version."""
    return KeySlot(KEY_A, ID_A, 2)


@bounded
@given(plaintext=payloads, aad=aads)
def test_round_trip_single(slot_a: KeySlot, plaintext: bytes, aad: bytes) -> None:
    env = slot_a.seal(plaintext, aad)
    assert len(env) == len(plaintext) + OVERHEAD
    header = parse_header(env)
    assert (header.key_id, header.version) == (ID_A, 1)
    assert slot_a.open(env, aad) == plaintext


@bounded
@given(items=st.lists(st.tuples(payloads.filter(lambda p: len(p) < 70_000), aads), max_size=12))
def test_round_trip_batch(slot_a: KeySlot, items: list[tuple[bytes, bytes]]) -> None:
    plaintexts = [p for p, _ in items]
    aad_list = [a for _, a in items]
    envs = slot_a.seal_batch(plaintexts, aad_list)
    assert [len(e) for e in envs] == [len(p) + OVERHEAD for p in plaintexts]
    assert slot_a.open_batch(envs, aad_list) == plaintexts


@bounded
@given(plaintext=st.binary(max_size=200), aad=aads, data=st.data())
def test_any_bit_flip_fails(slot_a: KeySlot, plaintext: bytes, aad: bytes, data: st.DataObject) -> None:
    env = bytearray(slot_a.seal(plaintext, aad))
    bit = data.draw(st.integers(min_value=0, max_value=len(env) * 8 - 1))
    env[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(DecryptionFailed):
        slot_a.open(bytes(env), aad)
    good = slot_a.seal(plaintext, aad)
    assert slot_a.open_batch([bytes(env), good], aad) == [None, plaintext]


@bounded
@given(plaintext=st.binary(max_size=200), aad=aads, data=st.data())
def test_any_truncation_fails(slot_a: KeySlot, plaintext: bytes, aad: bytes, data: st.DataObject) -> None:
    env = slot_a.seal(plaintext, aad)
    cut = data.draw(st.integers(min_value=0, max_value=len(env) - 1))
    with pytest.raises(DecryptionFailed):
        slot_a.open(env[:cut], aad)
    assert slot_a.open_batch([env[:cut], env], aad) == [None, plaintext]


@bounded
@given(plaintext=st.binary(max_size=200), aad=aads, other=aads)
def test_any_aad_change_fails(slot_a: KeySlot, plaintext: bytes, aad: bytes, other: bytes) -> None:
    assume(aad != other)
    env = slot_a.seal(plaintext, aad)
    with pytest.raises(DecryptionFailed):
        slot_a.open(env, other)
    assert slot_a.open_batch([env], [other]) == [None]


@bounded
@given(plaintext=st.binary(max_size=200), aad=aads)
def test_header_swap_between_keys_and_versions_fails(
    slot_a: KeySlot, slot_b: KeySlot, slot_a2: KeySlot, plaintext: bytes, aad: bytes
) -> None:
    env = slot_a.seal(plaintext, aad)
    nonce = parse_header(env).nonce
    body = env[HEADER_LEN:]
    # Relabelled as the next version of the same key (same key bytes!): the
    # header is authenticated, so it must not open.
    as_v2 = pack_header(ID_A, 2, nonce) + body
    # Relabelled as another key.
    as_b = pack_header(ID_B, 1, nonce) + body
    for forged, slot in ((as_v2, slot_a2), (as_v2, slot_a), (as_b, slot_b), (as_b, slot_a)):
        with pytest.raises(DecryptionFailed):
            slot.open(forged, aad)
        assert slot.open_batch([forged], aad) == [None]
    # And an envelope of one version never opens under another.
    with pytest.raises(DecryptionFailed):
        slot_a2.open(env, aad)


@few
@given(
    items=st.lists(
        st.tuples(st.binary(max_size=100), st.sampled_from(["good", "flip", "cut", "junk", "other_key"])),
        max_size=20,
    )
)
def test_batch_statuses_are_per_item(
    slot_a: KeySlot, slot_b: KeySlot, items: list[tuple[bytes, str]]
) -> None:
    envs: list[bytes] = []
    expected: list[bytes | None] = []
    for plaintext, kind in items:
        env = slot_a.seal(plaintext)
        if kind == "flip":
            env = env[:-1] + bytes([env[-1] ^ 0x80])
        elif kind == "cut":
            env = env[: len(env) // 2]
        elif kind == "junk":
            env = os.urandom(len(env))
        elif kind == "other_key":
            env = slot_b.seal(plaintext)
        envs.append(env)
        expected.append(plaintext if kind == "good" else None)
    assert slot_a.open_batch(envs) == expected


@few
@given(plaintexts=st.lists(st.binary(max_size=300), max_size=10), aad=aads)
def test_rewrap_round_trip(slot_a: KeySlot, slot_a2: KeySlot, plaintexts: list[bytes], aad: bytes) -> None:
    envs = slot_a.seal_batch(plaintexts, aad)
    new = rewrap_batch(slot_a, slot_a2, envs, aad)
    assert all(e is not None and parse_header(e).version == 2 for e in new)
    assert slot_a2.open_batch(new, aad) == plaintexts  # type: ignore[arg-type]
    assert slot_a.open_batch(new, aad) == [None] * len(plaintexts)  # type: ignore[arg-type]
