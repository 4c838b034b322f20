"""Envelope format 1 and the typed Python face of the native hot path.

An envelope is::

    off  len  field
    0    2    magic "KB"
    2    1    format = 1
    3    1    algorithm (1 = AES-256-GCM)
    4    16   key id
    20   4    key version (uint32, big-endian)
    24   12   nonce (random, from OpenSSL's CSPRNG)
    36   n    ciphertext
    36+n 16   GCM tag

The GCM additional data is the 36 header bytes followed by the caller's aad,
so an envelope cannot be replayed under another key id or version.

Key material lives only in native memory: :class:`KeySlot` copies the key into
locked memory owned by ``broker._native`` and keeps a handle. A ``bytearray``
key is zeroed as soon as it has been copied; a ``bytes`` key cannot be zeroed,
so callers holding key material should pass a ``bytearray``.

Arguments are validated here, before they reach C: wrong key or key id
lengths and out-of-range versions raise :class:`~broker.errors.InvalidArgument`,
oversized batches :class:`~broker.errors.LimitExceeded`, non-bytes items
``TypeError``. Inside a batch every item gets its own status; one bad item
never fails the batch (it comes back as ``None`` from the open and rewrap
functions). Batches go to C in chunks of 4096 items, each joined just before
its call: a non-bytes item raises ``TypeError`` when its chunk is reached, so
earlier chunks may have been processed (and sealed items counted in
:attr:`KeySlot.uses`) with their results dropped.

Every native call releases the GIL, so batches can run in worker threads, and
several threads may use the same slot at once.
"""

from __future__ import annotations

import contextlib
import logging
import struct
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, Self, cast

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from broker._native import ffi, lib
from broker.errors import DecryptionFailed, Internal, InvalidArgument, InvalidState, LimitExceeded

__all__ = [
    "ALG_AES256_GCM",
    "FORMAT_1",
    "HEADER_LEN",
    "KEY_ID_LEN",
    "KEY_LEN",
    "MAC_LEN",
    "MAGIC",
    "MAX_BATCH_ITEMS",
    "NONCE_LEN",
    "OVERHEAD",
    "TAG_LEN",
    "Header",
    "KeySlot",
    "pack_header",
    "parse_header",
    "rewrap_batch",
]

log = logging.getLogger("keybroker.envelope")

HEADER_LEN: Final = 36
NONCE_LEN: Final = 12
TAG_LEN: Final = 16
OVERHEAD: Final = HEADER_LEN + TAG_LEN  # 52
MAGIC: Final = b"KB"
FORMAT_1: Final = 1
ALG_AES256_GCM: Final = 1
KEY_ID_LEN: Final = 16
KEY_LEN: Final = 32
MAC_LEN: Final = 32
HMAC_KEY_MIN: Final = 16
HMAC_KEY_MAX: Final = 64
_VERSION_MAX: Final = 0xFFFFFFFF

#: Default upper bound on the number of items in one batch call; a batch
#: function's ``limit=`` keyword overrides it for that call.
MAX_BATCH_ITEMS: int = 100_000

_HEADER = struct.Struct(">2sBB16sI12s")
_BYTES_LIKE = (bytes, bytearray, memoryview)
_ALGORITHMS = frozenset({ALG_AES256_GCM})

# Payloads of at least this size are sealed and opened by the AES-GCM engine
# bundled with `cryptography` (a newer OpenSSL with wider AES code paths),
# keyed once from the slot and kept with it (KeySlot._engine): at 64 KiB it
# runs 1.9x and at 1 MiB 2.7x the system libcrypto (bench/RESULTS.md,
# "envelope"). 16 KiB is where a batch of items is faster routed one by one
# than sealed in one native call; a single seal alone would gain from ~4 KiB
# and a single open from ~8 KiB, by 10-30 %.
ROUTE_MIN_BYTES: Final = 16 * 1024
# What a new engine seals, to be opened natively before the engine is used (KeySlot._engine).
_PROBE: Final = b"keybroker large-payload engine probe"

# Output buffers are fully written by C (failed items are zeroed there), so
# they need not be cleared on allocation.
_alloc = ffi.new_allocator(should_clear_after_alloc=False)


@dataclass(frozen=True, slots=True)
class Header:
    """The parsed 36-byte header of a format-1 envelope."""

    algorithm: int
    key_id: bytes
    version: int
    nonce: bytes


def _check_key_id(key_id: object) -> bytes:
    if not isinstance(key_id, bytes | bytearray):
        raise TypeError("key_id must be bytes")
    if len(key_id) != KEY_ID_LEN:
        raise InvalidArgument(f"key_id must be {KEY_ID_LEN} bytes")
    return bytes(key_id)


def _check_version(version: object) -> int:
    if not isinstance(version, int) or isinstance(version, bool):
        raise TypeError("version must be an int")
    if not 0 <= version <= _VERSION_MAX:
        raise InvalidArgument("version must fit in an unsigned 32-bit integer")
    return version


def pack_header(key_id: bytes, version: int, nonce: bytes, algorithm: int = ALG_AES256_GCM) -> bytes:
    """The 36 header bytes of a format-1 envelope."""
    kid = _check_key_id(key_id)
    ver = _check_version(version)
    if not isinstance(nonce, bytes | bytearray):
        raise TypeError("nonce must be bytes")
    if len(nonce) != NONCE_LEN:
        raise InvalidArgument(f"nonce must be {NONCE_LEN} bytes")
    if algorithm not in _ALGORITHMS:
        raise InvalidArgument("unknown envelope algorithm")
    return _HEADER.pack(MAGIC, FORMAT_1, algorithm, kid, ver, bytes(nonce))


def parse_header(envelope: bytes) -> Header:
    """Parse (without decrypting) the header of an envelope.

    Raises :class:`~broker.errors.DecryptionFailed` if the input is shorter
    than a header, or the magic, format or algorithm is not one this broker
    knows. Only the header is checked: the tag is verified by opening.
    """
    if not isinstance(envelope, _BYTES_LIKE):
        raise TypeError("envelope must be bytes")
    if len(envelope) < HEADER_LEN:
        raise DecryptionFailed()
    magic, fmt, alg, key_id, version, nonce = _HEADER.unpack_from(envelope)
    if magic != MAGIC or fmt != FORMAT_1 or alg not in _ALGORITHMS:
        raise DecryptionFailed()
    return Header(algorithm=alg, key_id=key_id, version=version, nonce=nonce)


# --------------------------------------------------------------------------
# batch plumbing


def _as_bytes(value: object, what: str) -> bytes:
    """bytes as is (cffi passes them without a copy); other bytes-likes copied; else TypeError."""
    if type(value) is bytes:
        return value
    if isinstance(value, _BYTES_LIKE):
        return bytes(value)
    raise TypeError(f"{what} must be bytes")


def _check_limit(n: int, limit: int | None) -> None:
    bound = MAX_BATCH_ITEMS if limit is None else limit
    if not isinstance(bound, int) or isinstance(bound, bool) or bound < 0:
        raise InvalidArgument("limit must be a non-negative int")
    if n > bound:
        raise LimitExceeded(f"batch of {n} items is over the limit of {bound} items")


# Batches go to C in chunks of at most this many items, each joined just
# before its call into buffers that are reused from chunk to chunk: no buffer
# of the whole batch is built (at 10^6 items those were fresh 30-90 MB
# mappings, page-faulted in on every call), and when two threads seal at once
# one thread's C part (GIL released) runs while the other joins and splits.
_CHUNK_ITEMS: Final = 4096


def _check_items(items: object, what: str) -> None:
    if isinstance(items, (*_BYTES_LIKE, str)):
        raise TypeError(f"{what} must be a sequence of bytes, not a single {type(items).__name__}")


def _join(items: Sequence[bytes], what: str) -> tuple[bytes, list[int] | None, int]:
    """(items joined, per-item lengths or None when uniform, uniform length); items is not empty."""
    try:
        data = b"".join(items)
    except TypeError:
        raise TypeError(f"{what} must be a sequence of bytes") from None
    lens = list(map(len, items))
    first = lens[0]
    if lens.count(first) == len(lens):
        if first * len(lens) != len(data):  # a memoryview whose len() is not its byte count
            raise TypeError(f"{what} must be a sequence of bytes")
        return data, None, first
    if sum(lens) != len(data):
        raise TypeError(f"{what} must be a sequence of bytes")
    return data, lens, 0


def _aad_arg(aad: bytes | Sequence[bytes], n: int) -> bytes | Sequence[bytes]:
    """The shared aad as bytes, or the sequence of per-item aads (length checked)."""
    if isinstance(aad, _BYTES_LIKE):
        # Exactly bytes: its length goes to C with it, and a subclass's len() could differ.
        return _as_bytes(aad, "aad")
    if isinstance(aad, str) or not isinstance(aad, Sequence):
        raise TypeError("aad must be bytes or a sequence of bytes")
    if len(aad) != n:
        raise InvalidArgument(f"aad list has {len(aad)} entries for {n} items")
    return aad


def _lens_arg(lens: list[int] | None, uniform: int, count: int) -> Any:
    arr = array("Q", [uniform]) * count if lens is None else array("Q", lens)
    return ffi.from_buffer("uint64_t[]", arr)


def _run_chunks(
    call: Any, n: int, items: Sequence[bytes], what: str, aad: bytes | Sequence[bytes], *, grow: int
) -> tuple[list[Any], int]:
    """Calls ``call(n, in, in_len, lens, aad, aad_len, aad_lens, out, out_len, status)``
    once per chunk of items (n > 0). Returns the outputs as bytes, None for
    each failed item, and the number of failed items. Output item i is
    ``max(len(item i) + grow, 0)`` bytes long. Raises if a call is rejected
    as a whole, or TypeError at the first chunk holding a non-bytes item
    (earlier chunks have then been processed, their results dropped)."""
    _check_items(items, what)
    shared = isinstance(aad, bytes)
    cap = 0
    out: Any = None
    buf: Any = None
    status = _alloc("unsigned char[]", min(n, _CHUNK_ITEMS))
    result: list[Any] = []
    failed = 0
    for start in range(0, n, _CHUNK_ITEMS):
        chunk = items[start : start + _CHUNK_ITEMS] if n > _CHUNK_ITEMS else items
        count = len(chunk)
        data, lens, uniform = _join(chunk, what)
        if shared:
            ad, ad_lens = aad, ffi.NULL
        else:
            ad, alens, auniform = _join(cast("Sequence[bytes]", aad)[start : start + count], "aad")
            ad_lens = _lens_arg(alens, auniform, count)
        if lens is None:
            size = uniform + grow if uniform + grow > 0 else 0
            out_len = size * count
        else:
            sizes = [x + grow if x + grow > 0 else 0 for x in lens]
            out_len = sum(sizes)
        if out is None or out_len > cap:
            cap = max(out_len, 1)
            out = _alloc("unsigned char[]", cap)
            buf = ffi.buffer(out)
        in_lens = ffi.NULL if lens is None else _lens_arg(lens, 0, count)
        rc = call(count, data, len(data), in_lens, ad, len(ad), ad_lens, out, out_len, status)
        if rc < 0:
            _raise_native(rc)
        result += _split_uniform(buf, size, count) if lens is None else _split(buf, sizes)
        if rc > 0:
            failed += rc
            _mark_failed(result, status, start, count)
    return result, failed


_ZERO_KEY = bytes(KEY_LEN)


_unlocked = {"reported": False}


def _report_unlocked() -> None:
    """Say once per process that key slots fell back to swappable memory."""
    if not _unlocked["reported"]:
        _unlocked["reported"] = True
        log.warning(
            "key slots are in ordinary, swappable memory: mlock failed "
            "(raise RLIMIT_MEMLOCK, e.g. LimitMEMLOCK= in the service unit)"
        )


def _cleanse(key: bytearray) -> None:
    """Overwrite a lent key in place (the bytearray's buffer is the only copy Python made)."""
    key[:] = _ZERO_KEY


def _all_large(items: Sequence[bytes], size: int) -> bool:
    """Whether every item is bytes-like and at least ``size`` bytes (route them one by one)."""
    return all(isinstance(x, _BYTES_LIKE) and len(x) >= size for x in items)


def _aad_list(aad: bytes | Sequence[bytes], n: int) -> list[bytes]:
    """One aad per item (``aad`` already checked by :func:`_aad_arg`)."""
    if isinstance(aad, _BYTES_LIKE):
        return [_as_bytes(aad, "aad")] * n
    return [_as_bytes(a, "aad") for a in aad]


_CHUNK = 1024  # items per struct unpack in _split_uniform
_structs: dict[int, struct.Struct] = {}


def _split_uniform(buf: Any, size: int, n: int) -> list[bytes]:
    """n consecutive `size`-byte items of buf, as bytes (struct unpacks in C)."""
    if size == 0:
        return [b""] * n
    chunk = _structs.get(size)
    if chunk is None:
        chunk = struct.Struct(f"{size}s" * _CHUNK)
        if len(_structs) < 64:
            _structs[size] = chunk
    out: list[bytes] = []
    step = size * _CHUNK
    full = n // _CHUNK
    unpack = chunk.unpack_from
    for off in range(0, full * step, step):
        out += unpack(buf, off)
    rest = n - full * _CHUNK
    if rest:
        out += struct.Struct(f"{size}s" * rest).unpack_from(buf, full * step)
    return out


def _split(buf: Any, sizes: list[int]) -> list[bytes]:
    """Consecutive items of the given sizes, as bytes."""
    return list(struct.Struct("s".join(map(str, sizes)) + "s").unpack_from(buf))


def _raise_native(rc: int) -> None:
    if rc == lib.KB_ECLOSED:
        raise InvalidState("key slot is closed")
    if rc == lib.KB_EKIND:
        raise InvalidArgument("this key slot's kind does not allow the operation")
    if rc == lib.KB_ENOMEM:
        raise Internal("native memory allocation failed")
    if rc == lib.KB_ECRYPTO:
        raise Internal("OpenSSL operation failed")
    raise Internal(f"native call rejected its arguments (code {rc})")


def _mark_failed(result: list[Any], status: Any, start: int, count: int) -> None:
    """Sets result[start + i] to None for each failed item i of a chunk's status bytes."""
    flags = ffi.buffer(status, count)[:]
    i = flags.find(1)
    while i >= 0:
        result[start + i] = None
        i = flags.find(1, i + 1)


# --------------------------------------------------------------------------
# key slots

_KIND_NAMES = {lib.KB_KIND_AES256GCM: "aes-256-gcm", lib.KB_KIND_HMAC_SHA256: "hmac-sha256"}


class KeySlot:
    """One key held in native locked memory, used through a handle.

    ``KeySlot(key, key_id, version)`` holds a 32-byte AES-256-GCM key;
    :meth:`for_hmac` holds a 16..64-byte HMAC-SHA256 key. :meth:`close`
    cleanses the key (once every call running on it has returned).
    """

    __slots__ = ("__weakref__", "_aead", "_kind", "_ptr", "key_id", "version")

    key_id: bytes
    version: int

    def __init__(self, key: bytes | bytearray, key_id: bytes, version: int) -> None:
        self._ptr: Any = None
        self._aead: AESGCM | Literal[False] | None = None
        self._init(lib.KB_KIND_AES256GCM, key, key_id, version)

    @classmethod
    def for_hmac(cls, key: bytes | bytearray, key_id: bytes, version: int) -> KeySlot:
        """A slot holding an HMAC-SHA256 key of 16 to 64 bytes."""
        self = cls.__new__(cls)
        self._ptr = None
        self._aead = None
        self._init(lib.KB_KIND_HMAC_SHA256, key, key_id, version)
        return self

    def _init(self, kind: int, key: bytes | bytearray, key_id: bytes, version: int) -> None:
        if not isinstance(key, bytes | bytearray):
            raise TypeError("key must be bytes or bytearray")
        if kind == lib.KB_KIND_AES256GCM:
            if len(key) != KEY_LEN:
                raise InvalidArgument(f"an AES-256-GCM key must be {KEY_LEN} bytes")
        elif not HMAC_KEY_MIN <= len(key) <= HMAC_KEY_MAX:
            raise InvalidArgument(f"an HMAC key must be {HMAC_KEY_MIN} to {HMAC_KEY_MAX} bytes")
        self.key_id = _check_key_id(key_id)
        self.version = _check_version(version)
        self._kind = kind
        out = ffi.new("kb_slot **")
        rc = lib.kb_slot_new(kind, ffi.from_buffer(key), len(key), self.key_id, KEY_ID_LEN, self.version, out)
        if rc != lib.KB_OK:
            _raise_native(rc)
        self._ptr = ffi.gc(out[0], lib.kb_slot_free)
        if isinstance(key, bytearray):
            key[:] = bytes(len(key))  # the caller's copy is gone; only the slot holds the key
        if not lib.kb_slot_locked(self._ptr):
            _report_unlocked()

    # -- state

    def _handle(self) -> Any:
        ptr = self._ptr
        if ptr is None:
            raise InvalidState("key slot is closed")
        return ptr

    @property
    def uses(self) -> int:
        """Items sealed with this slot so far (each drew a fresh random nonce)."""
        ptr = self._ptr
        return 0 if ptr is None else int(lib.kb_slot_uses(ptr))

    @property
    def closed(self) -> bool:
        return self._ptr is None

    @property
    def locked(self) -> bool:
        """True if the key bytes sit in locked (non-swappable) memory."""
        ptr = self._ptr
        return ptr is not None and bool(lib.kb_slot_locked(ptr))

    @property
    def kind(self) -> str:
        return _KIND_NAMES[self._kind]

    def close(self) -> None:
        """Cleanse the key. Idempotent; calls already running finish first."""
        self._aead = None  # OpenSSL cleanses the engine's key schedule as it is freed
        ptr, self._ptr = self._ptr, None
        if ptr is not None:
            lib.kb_slot_close(ptr)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown; ffi.gc frees the slot regardless
            self.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._ptr is None else f"uses={self.uses}"
        return f"<KeySlot {self.kind} key_id={self.key_id.hex()} version={self.version} {state}>"

    def __reduce__(self) -> Any:
        raise TypeError("a KeySlot cannot be pickled or copied")

    # -- single items

    def _lend_key(self, uses: int) -> bytearray:
        """The AES key in a bytearray for one call; the caller cleanses it with :func:`_cleanse`."""
        ptr = self._handle()
        if self._kind != lib.KB_KIND_AES256GCM:
            raise InvalidArgument("this key slot does not hold an AES key")
        key = bytearray(KEY_LEN)
        rc = lib.kb_slot_lend_key(ptr, ffi.from_buffer(key), KEY_LEN, uses)
        if rc != lib.KB_OK:
            _cleanse(key)
            _raise_native(rc)
        return key

    def _engine(self) -> AESGCM | None:
        """The large-payload engine keyed from this slot, made on first use and
        kept with the slot; None if it does not seal under this slot's key.

        The key is lent once into a bytearray that is overwritten as soon as
        ``AESGCM`` has keyed its OpenSSL contexts; from then on the key
        schedule lives in those contexts, as it lives in this module's own
        cached GCM contexts, and is cleansed by OpenSSL when :meth:`close`
        drops the engine. A ``cryptography`` built on an OpenSSL older than
        3.2 keys its contexts from the key object at every call instead, and
        would find it overwritten: so before it is used, the engine's seal of
        a probe must open through the native path. If it does not, every
        payload of this slot stays on the native path.
        """
        aead = self._aead
        if aead is None:
            key = self._lend_key(0)
            try:
                made = AESGCM(key)
            finally:
                _cleanse(key)
            aead = made if self._opens_natively(made) else False
            if aead is False:
                log.warning("large payloads stay on the native path: this cryptography build rekeys per call")
            self._aead = aead
        return aead or None

    def _opens_natively(self, aead: AESGCM) -> bool:
        """Whether an envelope ``aead`` seals (with a nonce drawn as for any seal) opens natively."""
        head = self._header()
        try:
            return self._open_native(head + aead.encrypt(head[24:], _PROBE, head), b"") == _PROBE
        except DecryptionFailed:
            return False

    def _header(self) -> bytes:
        """A format-1 header with a fresh nonce, counted as one use of the version."""
        header = _alloc("unsigned char[]", HEADER_LEN)
        rc = lib.kb_slot_seal_header(self._handle(), header, HEADER_LEN)
        if rc != lib.KB_OK:
            _raise_native(rc)
        head: bytes = ffi.buffer(header, HEADER_LEN)[:]
        return head

    def _seal_large(self, pt: bytes, ad: bytes) -> bytes:
        aead = self._engine()
        if aead is None:
            return self._seal_native(pt, ad)
        head = self._header()
        return head + aead.encrypt(head[24:], pt, head + ad if ad else head)

    def _open_large(self, env: bytes, ad: bytes) -> bytes:
        parsed = parse_header(env)
        if len(env) < OVERHEAD or parsed.key_id != self.key_id or parsed.version != self.version:
            raise DecryptionFailed()
        aead = self._engine()
        if aead is None:
            return self._open_native(env, ad)
        self._handle()  # refuses a closed slot even when the engine was made before
        try:
            return aead.decrypt(parsed.nonce, env[HEADER_LEN:], env[:HEADER_LEN] + ad)
        except InvalidTag:
            raise DecryptionFailed() from None

    def _open_or_none(self, env: bytes, ad: bytes) -> bytes | None:
        try:
            return self._open_large(env, ad)
        except DecryptionFailed:
            return None

    def seal(self, plaintext: bytes, aad: bytes = b"") -> bytes:
        """One envelope for plaintext under this slot's key."""
        pt = _as_bytes(plaintext, "plaintext")
        ad = _as_bytes(aad, "aad")
        if len(pt) >= ROUTE_MIN_BYTES:
            return self._seal_large(pt, ad)
        return self._seal_native(pt, ad)

    def _seal_native(self, pt: bytes, ad: bytes) -> bytes:
        ptr = self._handle()
        size = len(pt) + OVERHEAD
        out = _alloc("unsigned char[]", size)
        rc = lib.kb_seal(ptr, pt, len(pt), ad, len(ad), out, size)
        if rc < 0:
            _raise_native(rc)
        if rc != lib.KB_OK:
            raise Internal("sealing failed")
        sealed: bytes = ffi.buffer(out, size)[:]
        return sealed

    def open(self, envelope: bytes, aad: bytes = b"") -> bytes:
        """The plaintext of one envelope; DecryptionFailed if it does not verify."""
        env = _as_bytes(envelope, "envelope")
        ad = _as_bytes(aad, "aad")
        if len(env) >= ROUTE_MIN_BYTES + OVERHEAD:
            return self._open_large(env, ad)
        return self._open_native(env, ad)

    def _open_native(self, env: bytes, ad: bytes) -> bytes:
        ptr = self._handle()
        size = len(env) - OVERHEAD
        if size < 0:
            raise DecryptionFailed()
        out = _alloc("unsigned char[]", size or 1)
        rc = lib.kb_open(ptr, env, len(env), ad, len(ad), out, size)
        if rc < 0:
            _raise_native(rc)
        if rc != lib.KB_OK:
            raise DecryptionFailed()
        opened: bytes = ffi.buffer(out, size)[:]
        return opened

    # -- batches

    def seal_batch(
        self, items: Sequence[bytes], aad: bytes | Sequence[bytes] = b"", *, limit: int | None = None
    ) -> list[bytes]:
        """One envelope per item, in order. ``aad`` is shared or one per item."""
        n = len(items)
        _check_limit(n, limit)
        ad = _aad_arg(aad, n)
        self._handle()
        if n == 0:
            return []
        if n == 1 and type(items[0]) is bytes and isinstance(aad, _BYTES_LIKE):
            return [self.seal(items[0], bytes(aad))]  # fewer conversions than the batch call
        if _all_large(items, ROUTE_MIN_BYTES):
            return [
                self._seal_large(_as_bytes(x, "items"), a)
                for x, a in zip(items, _aad_list(aad, n), strict=True)
            ]
        result, failed = _run_chunks(self._seal_call, n, items, "items", ad, grow=OVERHEAD)
        if failed:  # only an internal OpenSSL failure can fail a seal
            raise Internal(f"sealing failed for {failed} of {n} items")
        return cast("list[bytes]", result)

    def _seal_call(self, *args: Any) -> int:
        return int(lib.kb_seal_batch(self._handle(), *args))

    def _open_call(self, *args: Any) -> int:
        return int(lib.kb_open_batch(self._handle(), *args))

    def open_batch(
        self, envelopes: Sequence[bytes], aad: bytes | Sequence[bytes] = b"", *, limit: int | None = None
    ) -> list[bytes | None]:
        """The plaintext of each envelope, or None for each one that fails."""
        n = len(envelopes)
        _check_limit(n, limit)
        ad = _aad_arg(aad, n)
        self._handle()
        if n == 0:
            return []
        if _all_large(envelopes, ROUTE_MIN_BYTES + OVERHEAD):
            return [
                self._open_or_none(_as_bytes(e, "envelopes"), a)
                for e, a in zip(envelopes, _aad_list(aad, n), strict=True)
            ]
        result, _ = _run_chunks(self._open_call, n, envelopes, "envelopes", ad, grow=-OVERHEAD)
        return result

    # -- HMAC-SHA256

    def mac(self, message: bytes) -> bytes:
        """HMAC-SHA256 of message (slot made with :meth:`for_hmac`)."""
        if not isinstance(message, _BYTES_LIKE):
            raise TypeError("message must be bytes")
        ptr = self._handle()
        if self._kind != lib.KB_KIND_HMAC_SHA256:
            raise InvalidArgument("this key slot does not hold an HMAC key")
        out = _alloc("unsigned char[]", MAC_LEN)
        msg = ffi.from_buffer(message)
        rc = lib.kb_hmac(ptr, msg, len(msg), out, MAC_LEN)
        if rc != lib.KB_OK:
            _raise_native(rc)
        tag: bytes = ffi.buffer(out, MAC_LEN)[:]
        return tag

    def verify_mac(self, message: bytes, tag: bytes) -> bool:
        """True if tag is message's HMAC-SHA256 (constant-time comparison)."""
        if not isinstance(message, _BYTES_LIKE) or not isinstance(tag, _BYTES_LIKE):
            raise TypeError("message and tag must be bytes")
        ptr = self._handle()
        if self._kind != lib.KB_KIND_HMAC_SHA256:
            raise InvalidArgument("this key slot does not hold an HMAC key")
        msg = ffi.from_buffer(message)
        tg = ffi.from_buffer(tag)
        rc = lib.kb_hmac_verify(ptr, msg, len(msg), tg, len(tg))
        if rc < 0:
            _raise_native(rc)
        return bool(rc == 1)


def rewrap_batch(
    old: KeySlot,
    new: KeySlot,
    envelopes: Sequence[bytes],
    aad: bytes | Sequence[bytes] = b"",
    *,
    limit: int | None = None,
) -> list[bytes | None]:
    """Re-seal envelopes from ``old``'s key to ``new``'s; the plaintext never leaves C.

    Each result is the new envelope, or None where the old one failed to open.
    """
    if not isinstance(old, KeySlot) or not isinstance(new, KeySlot):
        raise TypeError("old and new must be KeySlot")
    n = len(envelopes)
    _check_limit(n, limit)
    ad = _aad_arg(aad, n)
    old._handle()
    new._handle()
    if n == 0:
        return []

    def call(*args: Any) -> int:
        return int(lib.kb_rewrap_batch(old._handle(), new._handle(), *args))

    result, _ = _run_chunks(call, n, envelopes, "envelopes", ad, grow=0)
    return result
