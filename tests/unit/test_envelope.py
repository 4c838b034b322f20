"""broker.envelope and the native module behind it."""

from __future__ import annotations

import copy
import os
import pickle
import threading
from array import array
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as pyca_hmac
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from broker import envelope
from broker._native import ffi, lib
from broker.envelope import (
    ALG_AES256_GCM,
    FORMAT_1,
    HEADER_LEN,
    MAGIC,
    NONCE_LEN,
    OVERHEAD,
    TAG_LEN,
    Header,
    KeySlot,
    pack_header,
    parse_header,
    rewrap_batch,
)
from broker.errors import DecryptionFailed, InvalidArgument, InvalidState, LimitExceeded

KEY = bytes(range(100, 132))
KEY2 = bytes(range(200, 232))
KID = bytes.fromhex("00112233445566778899aabbccddeeff")
KID2 = bytes.fromhex("ffeeddccbbaa99887766554433221100")


@pytest.fixture
def slot() -> Iterator[KeySlot]:
    s = KeySlot(KEY, KID, 7)
    yield s
    s.close()


@pytest.fixture
def slot2() -> Iterator[KeySlot]:
    s = KeySlot(KEY2, KID, 8)
    yield s
    s.close()


# -- format -----------------------------------------------------------------


def test_constants() -> None:
    assert (HEADER_LEN, NONCE_LEN, TAG_LEN, OVERHEAD) == (36, 12, 16, 52)
    assert (MAGIC, FORMAT_1, ALG_AES256_GCM) == (b"KB", 1, 1)
    assert envelope.MAX_BATCH_ITEMS == 100_000


def test_pack_and_parse_header() -> None:
    nonce = bytes(range(12))
    header = pack_header(KID, 0x01020304, nonce)
    assert header == b"KB\x01\x01" + KID + b"\x01\x02\x03\x04" + nonce
    assert parse_header(header) == Header(algorithm=1, key_id=KID, version=0x01020304, nonce=nonce)
    with pytest.raises(AttributeError):
        parse_header(header).version = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"KB",
        b"KB\x01\x01" + bytes(31),  # one byte short of a header
        b"XX\x01\x01" + bytes(60),  # bad magic
        b"KB\x02\x01" + bytes(60),  # unknown format
        b"KB\x01\x02" + bytes(60),  # unknown algorithm
    ],
)
def test_parse_header_rejects(data: bytes) -> None:
    with pytest.raises(DecryptionFailed):
        parse_header(data)


def test_pack_header_validates() -> None:
    nonce = bytes(12)
    with pytest.raises(InvalidArgument):
        pack_header(KID[:15], 1, nonce)
    with pytest.raises(InvalidArgument):
        pack_header(KID, 2**32, nonce)
    with pytest.raises(InvalidArgument):
        pack_header(KID, -1, nonce)
    with pytest.raises(InvalidArgument):
        pack_header(KID, 1, bytes(11))
    with pytest.raises(InvalidArgument):
        pack_header(KID, 1, nonce, algorithm=2)
    with pytest.raises(TypeError):
        pack_header("k" * 16, 1, nonce)  # type: ignore[arg-type]


# -- slots ------------------------------------------------------------------


@pytest.mark.parametrize("length", [0, 16, 31, 33, 64])
def test_wrong_aes_key_length(length: int) -> None:
    with pytest.raises(InvalidArgument) as info:
        KeySlot(bytes(length), KID, 1)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("length", [0, 15, 65, 128])
def test_wrong_hmac_key_length(length: int) -> None:
    with pytest.raises(InvalidArgument):
        KeySlot.for_hmac(bytes(length), KID, 1)


def test_slot_argument_types() -> None:
    with pytest.raises(TypeError):
        KeySlot("k" * 32, KID, 1)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        KeySlot(memoryview(KEY), KID, 1)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        KeySlot(KEY, KID[:8], 1)
    with pytest.raises(InvalidArgument):
        KeySlot(KEY, KID, 2**32)
    with pytest.raises(TypeError):
        KeySlot(KEY, KID, True)
    KeySlot(KEY, KID, 2**32 - 1).close()
    KeySlot(KEY, KID, 0).close()


def test_bytearray_key_is_zeroed_after_copy() -> None:
    key = bytearray(KEY)
    with KeySlot(key, KID, 1) as s:
        assert key == bytearray(32)
        assert s.open(AESGCM_seal(KEY, KID, 1, b"x")) == b"x"
    hkey = bytearray(b"h" * 40)
    with KeySlot.for_hmac(hkey, KID, 1):
        assert hkey == bytearray(40)


def test_repr_never_shows_key(slot: KeySlot) -> None:
    text = repr(slot)
    assert KEY.hex() not in text and KEY.hex()[:16] not in text
    assert KID.hex() in text and "version=7" in text
    assert str(slot) == text


def test_slot_cannot_be_pickled_or_copied(slot: KeySlot) -> None:
    with pytest.raises(TypeError):
        pickle.dumps(slot)
    with pytest.raises(TypeError):
        copy.copy(slot)


def test_close_is_idempotent_and_final() -> None:
    s = KeySlot(KEY, KID, 1)
    env = s.seal(b"x")
    assert not s.closed
    s.close()
    s.close()
    assert s.closed and "closed" in repr(s)
    for call in (
        lambda: s.seal(b"x"),
        lambda: s.open(env),
        lambda: s.seal_batch([b"x"]),
        lambda: s.open_batch([env]),
    ):
        with pytest.raises(InvalidState):
            call()
    with KeySlot(KEY, KID, 2) as other, pytest.raises(InvalidState):
        rewrap_batch(s, other, [env])


def test_context_manager_closes() -> None:
    with KeySlot(KEY, KID, 1) as s:
        assert s.seal(b"") != b""
    assert s.closed


def test_locked_and_kind(slot: KeySlot) -> None:
    assert isinstance(slot.locked, bool)
    assert slot.kind == "aes-256-gcm"
    with KeySlot.for_hmac(b"k" * 32, KID, 1) as h:
        assert h.kind == "hmac-sha256"


def test_del_releases_slot() -> None:
    s = KeySlot(KEY, KID, 1)
    del s  # must not crash; ffi.gc frees the native slot


# -- single items and interop -----------------------------------------------


def AESGCM_seal(key: bytes, kid: bytes, version: int, plaintext: bytes, aad: bytes = b"") -> bytes:
    nonce = os.urandom(12)
    header = pack_header(kid, version, nonce)
    return header + AESGCM(key).encrypt(nonce, plaintext, header + aad)


def test_seal_open_round_trip(slot: KeySlot) -> None:
    for size in (0, 1, 15, 16, 17, 32, 1000, 70_000):
        pt = os.urandom(size)
        env = slot.seal(pt, b"ctx")
        assert len(env) == size + OVERHEAD
        assert slot.open(env, b"ctx") == pt
        with pytest.raises(DecryptionFailed):
            slot.open(env, b"ctx2")


def test_native_envelope_opens_with_cryptography(slot: KeySlot) -> None:
    env = slot.seal(b"data key bytes", b"tenant-1")
    header = parse_header(env)
    assert (header.algorithm, header.key_id, header.version) == (1, KID, 7)
    pt = AESGCM(KEY).decrypt(header.nonce, env[HEADER_LEN:], env[:HEADER_LEN] + b"tenant-1")
    assert pt == b"data key bytes"


def test_cryptography_envelope_opens_natively(slot: KeySlot) -> None:
    env = AESGCM_seal(KEY, KID, 7, b"hello", b"aad")
    assert slot.open(env, b"aad") == b"hello"
    assert slot.open_batch([env, env], [b"aad", b"bad"]) == [b"hello", None]


def test_open_rejects_nonsense(slot: KeySlot) -> None:
    for data in (b"", b"KB", os.urandom(51), os.urandom(52), os.urandom(500), b"KB\x01\x01" + bytes(100)):
        with pytest.raises(DecryptionFailed):
            slot.open(data)


def test_bytes_like_inputs(slot: KeySlot) -> None:
    env = slot.seal(bytearray(b"abc"), memoryview(b"ad"))
    assert slot.open(memoryview(env), bytearray(b"ad")) == b"abc"
    with pytest.raises(TypeError):
        slot.seal("abc")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        slot.open(123)  # type: ignore[arg-type]


def test_nonces_are_fresh(slot: KeySlot) -> None:
    single = [parse_header(slot.seal(b"x")).nonce for _ in range(500)]
    batch = [parse_header(e).nonce for e in slot.seal_batch([b"x"] * 500)]
    assert len(set(single + batch)) == 1000


# -- batches ----------------------------------------------------------------


def test_empty_batch(slot: KeySlot) -> None:
    assert slot.seal_batch([]) == []
    assert slot.open_batch([]) == []
    assert slot.seal_batch([], []) == []
    assert rewrap_batch(slot, slot, []) == []


def test_batch_uniform_and_variable(slot: KeySlot) -> None:
    uniform = [os.urandom(32) for _ in range(1000)]
    assert slot.open_batch(slot.seal_batch(uniform)) == uniform
    variable = [os.urandom(i % 70) for i in range(1000)]
    assert slot.open_batch(slot.seal_batch(variable, b"a"), b"a") == variable


def test_batch_per_item_aad(slot: KeySlot) -> None:
    items = [b"one", b"two", b"three"]
    aads = [b"a", b"", b"ccc"]
    envs = slot.seal_batch(items, aads)
    for env, item, aad in zip(envs, items, aads, strict=True):
        assert slot.open(env, aad) == item
    assert slot.open_batch(envs, aads) == items
    assert slot.open_batch(envs, [b"a", b"x", b"ccc"]) == [b"one", None, b"three"]
    assert slot.open_batch(envs, b"a") == [b"one", None, None]
    big_aad = [os.urandom(1000) for _ in items]
    assert slot.open_batch(slot.seal_batch(items, big_aad), big_aad) == items


def test_batch_aad_list_length_must_match(slot: KeySlot) -> None:
    with pytest.raises(InvalidArgument):
        slot.seal_batch([b"a", b"b"], [b"x"])
    with pytest.raises(InvalidArgument):
        slot.open_batch([b"a"], [b"x", b"y"])
    with pytest.raises(TypeError):
        slot.seal_batch([b"a"], [1])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        slot.seal_batch([b"a"], "x")  # type: ignore[arg-type]


def test_mixed_good_and_bad_items(slot: KeySlot, slot2: KeySlot) -> None:
    good = slot.seal_batch([b"k1", b"k2", b"k3"])
    flipped = bytearray(good[1])
    flipped[40] ^= 1
    batch = [good[0], bytes(flipped), b"", b"short", os.urandom(90), slot2.seal(b"other"), good[2], good[0]]
    assert slot.open_batch(batch) == [b"k1", None, None, None, None, None, b"k3", b"k1"]


def test_batch_wrong_types(slot: KeySlot) -> None:
    for bad in ([b"a", "b"], [b"a", None], [1, 2], b"abc", "abc", [memoryview(bytes(8)).cast("I")]):
        with pytest.raises(TypeError):
            slot.seal_batch(bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            slot.open_batch(bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        slot.seal_batch(x for x in [b"a"])  # type: ignore[arg-type]


def test_batch_limits(slot: KeySlot, monkeypatch: pytest.MonkeyPatch) -> None:
    items = [b"x"] * 10
    with pytest.raises(LimitExceeded):
        slot.seal_batch(items, limit=9)
    with pytest.raises(LimitExceeded):
        slot.open_batch(items, limit=5)
    with pytest.raises(LimitExceeded):
        rewrap_batch(slot, slot, items, limit=1)
    assert len(slot.seal_batch(items, limit=10)) == 10
    monkeypatch.setattr(envelope, "MAX_BATCH_ITEMS", 3)
    with pytest.raises(LimitExceeded):
        slot.seal_batch(items)
    assert len(slot.seal_batch(items, limit=100)) == 10
    with pytest.raises(InvalidArgument):
        slot.seal_batch(items, limit=-1)


def test_default_limit_is_100k(slot: KeySlot) -> None:
    with pytest.raises(LimitExceeded):
        slot.seal_batch([b""] * 100_001)
    assert len(slot.seal_batch([b""] * 100_000)) == 100_000


# -- rewrap -----------------------------------------------------------------


def test_rewrap_across_versions(slot: KeySlot, slot2: KeySlot) -> None:
    items = [os.urandom(32) for _ in range(50)] + [b"", os.urandom(20_000)]
    envs = slot.seal_batch(items, b"aad")
    new = rewrap_batch(slot, slot2, envs, b"aad")
    assert all(parse_header(e).version == 8 for e in new if e is not None)
    assert [len(e) for e in new if e is not None] == [len(e) for e in envs]
    assert slot2.open_batch(new, b"aad") == items
    assert slot.open_batch(new, b"aad") == [None] * len(items)


def test_rewrap_failures_are_per_item(slot: KeySlot, slot2: KeySlot) -> None:
    envs = slot.seal_batch([b"a", b"b", b"c"], [b"1", b"2", b"3"])
    bad = bytearray(envs[1])
    bad[-1] ^= 1
    new = rewrap_batch(slot, slot2, [envs[0], bytes(bad), envs[2], b"junk", slot2.seal(b"x")],
                       [b"1", b"2", b"3", b"", b""])
    assert new[1] is None and new[3] is None and new[4] is None
    assert slot2.open_batch([new[0], new[2]], [b"1", b"3"]) == [b"a", b"c"]  # type: ignore[list-item]


def test_rewrap_needs_aes_slots(slot: KeySlot) -> None:
    with KeySlot.for_hmac(b"k" * 32, KID, 1) as h, pytest.raises(InvalidArgument):
        rewrap_batch(slot, h, [slot.seal(b"x")])
    with pytest.raises(TypeError):
        rewrap_batch(slot, object(), [])  # type: ignore[arg-type]


# -- use counters -----------------------------------------------------------


def test_use_counters(slot: KeySlot, slot2: KeySlot) -> None:
    assert slot.uses == 0
    slot.seal(b"x")
    envs = slot.seal_batch([b"a"] * 10)
    assert slot.uses == 11
    slot.open_batch(envs)
    slot.open(envs[0])
    assert slot.uses == 11
    rewrap_batch(slot, slot2, envs)
    assert (slot.uses, slot2.uses) == (11, 10)


def test_use_counter_under_threads(slot: KeySlot) -> None:
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda _: slot.seal_batch([b"x" * 32] * 500), range(8)))
    assert slot.uses == 4000
    assert all(slot.open_batch(r) == [b"x" * 32] * 500 for r in results)


# -- HMAC -------------------------------------------------------------------


@pytest.mark.parametrize("key_len", [16, 32, 64])
def test_hmac_matches_cryptography(key_len: int) -> None:
    key = os.urandom(key_len)
    with KeySlot.for_hmac(key, KID, 1) as h:
        for msg in (b"", b"abc", os.urandom(5000)):
            ref = pyca_hmac.HMAC(key, hashes.SHA256())
            ref.update(msg)
            expected = ref.finalize()
            assert h.mac(msg) == expected
            assert h.verify_mac(msg, expected)
            assert not h.verify_mac(msg + b"!", expected)
            assert not h.verify_mac(msg, expected[:-1] + bytes([expected[-1] ^ 1]))
            assert not h.verify_mac(msg, expected[:16])
            assert not h.verify_mac(msg, b"")


def test_hmac_and_aes_slots_do_not_mix(slot: KeySlot) -> None:
    with pytest.raises(InvalidArgument):
        slot.mac(b"x")
    with pytest.raises(InvalidArgument):
        slot.verify_mac(b"x", bytes(32))
    with KeySlot.for_hmac(b"k" * 32, KID, 1) as h:
        with pytest.raises(InvalidArgument):
            h.seal(b"x")
        with pytest.raises(InvalidArgument):
            h.open_batch([slot.seal(b"x")])
        with pytest.raises(TypeError):
            h.mac("text")  # type: ignore[arg-type]
    with pytest.raises(InvalidState):
        h.mac(b"x")


# -- concurrency and fork ---------------------------------------------------


def test_threads_share_a_slot(slot: KeySlot) -> None:
    items = [os.urandom(48) for _ in range(2000)]
    barrier = threading.Barrier(4)

    def work(i: int) -> bool:
        barrier.wait()
        envs = slot.seal_batch(items, b"%d" % i)
        return slot.open_batch(envs, b"%d" % i) == items

    with ThreadPoolExecutor(max_workers=4) as pool:
        assert all(pool.map(work, range(4)))


def test_close_while_other_threads_use_the_slot() -> None:
    s = KeySlot(KEY, KID, 1)
    items = [b"x" * 32] * 20_000
    errors: list[BaseException] = []

    def work() -> None:
        for _ in range(20):
            try:
                s.seal_batch(items)
            except InvalidState:
                return
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)
                return

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    s.close()
    for t in threads:
        t.join()
    assert errors == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_never_reuses_parent_nonces(slot: KeySlot) -> None:
    slot.seal(b"warm the per-thread nonce cache")
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            nonce = parse_header(slot.seal(b"child")).nonce
            os.write(write_fd, nonce)
        finally:
            os._exit(0)
    os.close(write_fd)
    parent_nonce = parse_header(slot.seal(b"parent")).nonce
    child_nonce = os.read(read_fd, 12)
    os.close(read_fd)
    os.waitpid(pid, 0)
    assert len(child_nonce) == 12
    assert child_nonce != parent_nonce


def test_large_single_items(slot: KeySlot) -> None:
    pt = os.urandom(1 << 20)
    env = slot.seal(pt, b"big")
    assert slot.open(env, b"big") == pt
    assert AESGCM(KEY).decrypt(env[24:36], env[36:], env[:36] + b"big") == pt


# -- the C API's own argument checks (the wrapper never sends these) ---------


def test_native_rejects_inconsistent_sizes(slot: KeySlot) -> None:
    ptr = slot._handle()
    data = b"x" * 64
    out = ffi.new("unsigned char[]", 64 + 2 * OVERHEAD)
    status = ffi.new("unsigned char[]", 2)
    null = ffi.NULL

    def seal(
        n: int, lens: object, out_len: int, aad_lens: object = null, aad: bytes = b"", p: object = ptr
    ) -> int:
        rc = lib.kb_seal_batch(p, n, data, len(data), lens, aad, len(aad), aad_lens, out, out_len, status)
        return int(rc)

    good = 64 + 2 * OVERHEAD
    assert seal(2, null, good) == 0
    assert slot.open_batch([ffi.buffer(out)[:84], ffi.buffer(out)[84:]]) == [b"x" * 32] * 2
    assert seal(3, null, 64 + 3 * OVERHEAD) == lib.KB_EARG  # 64 not divisible by 3
    assert seal(2, null, good - 1) == lib.KB_EARG  # output too small
    assert seal(2, null, good + 1) == lib.KB_EARG  # output size must be exact
    lens = array("Q", [60, 5])  # sums past the input
    assert seal(2, ffi.from_buffer("uint64_t[]", lens), good) == lib.KB_EARG
    huge = array("Q", [2**64 - 1, 65])  # wraps around if added carelessly
    assert seal(2, ffi.from_buffer("uint64_t[]", huge), good) == lib.KB_EARG
    aad_lens = array("Q", [1, 1])  # aad lengths must sum to the aad buffer
    assert seal(2, null, good, ffi.from_buffer("uint64_t[]", aad_lens), b"abc") == lib.KB_EARG
    assert seal(2**62, null, good) == lib.KB_EARG  # n * OVERHEAD overflows nothing, but does not fit
    assert seal(2, null, good, p=null) == lib.KB_EARG
    opened = lib.kb_open_batch(ptr, 2, data, len(data), null, b"", 0, null, out, 1, status)
    assert opened == lib.KB_EARG
    rewrapped = lib.kb_rewrap_batch(ptr, ptr, 2, data, len(data), null, b"", 0, null, out, 63, status)
    assert rewrapped == lib.KB_EARG
    mac = ffi.new("unsigned char[]", 32)
    assert int(lib.kb_hmac(ptr, b"m", 1, mac, 31)) == lib.KB_EARG
    assert int(lib.kb_hmac(ptr, b"m", 1, mac, 32)) == lib.KB_EKIND
    assert int(lib.kb_slot_new(1, b"k" * 32, 32, b"i" * 15, 15, 1, ffi.new("kb_slot **"))) == lib.KB_EARG
    assert int(lib.kb_slot_new(9, b"k" * 32, 32, b"i" * 16, 16, 1, ffi.new("kb_slot **"))) == lib.KB_EKIND
