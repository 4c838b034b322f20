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
functions).

Every native call releases the GIL, so batches can run in worker threads, and
several threads may use the same slot at once.
"""

from __future__ import annotations

import contextlib
import os
import struct
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Self, cast

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
# bundled with `cryptography` (a newer OpenSSL with wider AES code paths) with
# the key lent from the slot for that one call: measured on the reference
# machine the crossover is 16 KiB; at 64 KiB it runs 1.9x and at 1 MiB 2.7x
# the system libcrypto (bench/RESULTS.md, "envelope"). Below it, per-call
# set-up costs more than the cipher and the native path wins.
ROUTE_MIN_BYTES: Final = 16 * 1024

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


_JOIN_CHUNK = 512


def _join(items: Sequence[bytes], n: int, what: str) -> tuple[bytes, list[int] | None, int]:
    """(contiguous bytes, per-item lengths or None when uniform, uniform length)."""
    if isinstance(items, (*_BYTES_LIKE, str)):
        raise TypeError(f"{what} must be a sequence of bytes, not a single {type(items).__name__}")
    try:
        if n <= _JOIN_CHUNK:
            data = b"".join(items)
        else:  # joining in chunks keeps join's per-item buffer table in cache: ~5x faster at 10^6 items
            join = b"".join
            data = join([join(items[i : i + _JOIN_CHUNK]) for i in range(0, n, _JOIN_CHUNK)])
    except TypeError:
        raise TypeError(f"{what} must be a sequence of bytes") from None
    lens = list(map(len, items))
    first = lens[0]
    if lens.count(first) == n:
        if first * n != len(data):
            raise TypeError(f"{what} must be a sequence of bytes")
        return data, None, first
    if sum(lens) != len(data):  # a memoryview whose len() is not its byte count
        raise TypeError(f"{what} must be a sequence of bytes")
    return data, lens, 0


def _aad_args(aad: bytes | Sequence[bytes], n: int) -> tuple[Any, int, Any]:
    """(aad buffer, its length, per-item length array or NULL)."""
    if isinstance(aad, bytes):
        return aad, len(aad), ffi.NULL
    if isinstance(aad, bytearray | memoryview):
        data = bytes(aad)
        return data, len(data), ffi.NULL
    if isinstance(aad, str) or not isinstance(aad, Sequence):
        raise TypeError("aad must be bytes or a sequence of bytes")
    if len(aad) != n:
        raise InvalidArgument(f"aad list has {len(aad)} entries for {n} items")
    if n == 0:
        return b"", 0, ffi.NULL
    data, lens, uniform = _join(cast("Sequence[bytes]", aad), n, "aad")
    arr = array("Q", lens) if lens is not None else array("Q", [uniform]) * n
    return data, len(data), ffi.from_buffer("uint64_t[]", arr)


_ZERO_KEY = bytes(KEY_LEN)


def _cleanse(key: bytearray) -> None:
    """Overwrite a lent key in place (the bytearray's buffer is the only copy Python made)."""
    key[:] = _ZERO_KEY


def _all_large(items: Sequence[bytes], size: int) -> bool:
    """Whether every item is bytes-like and at least ``size`` bytes (route them one by one)."""
    return all(isinstance(x, _BYTES_LIKE) and len(x) >= size for x in items)


def _aad_list(aad: bytes | Sequence[bytes], n: int) -> list[bytes]:
    """One aad per item (``aad`` already checked by :func:`_aad_args`)."""
    return [aad] * n if isinstance(aad, _BYTES_LIKE) else [bytes(a) for a in aad]  # type: ignore[list-item]


def _lens_arg(lens: list[int] | None) -> Any:
    return ffi.NULL if lens is None else ffi.from_buffer("uint64_t[]", array("Q", lens))


_CHUNK = 256
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


def _mark_failed(result: list[Any], status: Any, n: int) -> None:
    flags = ffi.buffer(status, n)[:]
    i = flags.find(1)
    while i >= 0:
        result[i] = None
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

    __slots__ = ("__weakref__", "_kind", "_ptr", "key_id", "version")

    key_id: bytes
    version: int

    def __init__(self, key: bytes | bytearray, key_id: bytes, version: int) -> None:
        self._ptr: Any = None
        self._init(lib.KB_KIND_AES256GCM, key, key_id, version)

    @classmethod
    def for_hmac(cls, key: bytes | bytearray, key_id: bytes, version: int) -> KeySlot:
        """A slot holding an HMAC-SHA256 key of 16 to 64 bytes."""
        self = cls.__new__(cls)
        self._ptr = None
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

    def _seal_large(self, pt: bytes, ad: bytes) -> bytes:
        nonce = os.urandom(NONCE_LEN)
        header = _HEADER.pack(MAGIC, FORMAT_1, ALG_AES256_GCM, self.key_id, self.version, nonce)
        key = self._lend_key(1)
        try:
            return header + AESGCM(key).encrypt(nonce, pt, header + ad)
        finally:
            _cleanse(key)

    def _open_large(self, env: bytes, ad: bytes) -> bytes:
        parsed = parse_header(env)
        if len(env) < OVERHEAD or parsed.key_id != self.key_id or parsed.version != self.version:
            raise DecryptionFailed()
        key = self._lend_key(0)
        try:
            return AESGCM(key).decrypt(parsed.nonce, env[HEADER_LEN:], env[:HEADER_LEN] + ad)
        except InvalidTag:
            raise DecryptionFailed() from None
        finally:
            _cleanse(key)

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
        ad, ad_len, ad_lens = _aad_args(aad, n)
        ptr = self._handle()
        if n == 0:
            return []
        if n == 1 and type(items[0]) is bytes and isinstance(aad, _BYTES_LIKE):
            return [self.seal(items[0], bytes(aad))]  # fewer conversions than the batch call
        if _all_large(items, ROUTE_MIN_BYTES):
            return [self._seal_large(x, a) for x, a in zip(items, _aad_list(aad, n), strict=True)]
        data, lens, uniform = _join(items, n, "items")
        size = len(data) + OVERHEAD * n
        out = _alloc("unsigned char[]", size)
        status = _alloc("unsigned char[]", n)
        rc = lib.kb_seal_batch(
            ptr, n, data, len(data), _lens_arg(lens), ad, ad_len, ad_lens, out, size, status
        )
        if rc < 0:
            _raise_native(rc)
        if rc > 0:  # only an internal OpenSSL failure can fail a seal
            raise Internal(f"sealing failed for {rc} of {n} items")
        buf = ffi.buffer(out, size)
        if lens is None:
            return _split_uniform(buf, uniform + OVERHEAD, n)
        return _split(buf, [x + OVERHEAD for x in lens])

    def open_batch(
        self, envelopes: Sequence[bytes], aad: bytes | Sequence[bytes] = b"", *, limit: int | None = None
    ) -> list[bytes | None]:
        """The plaintext of each envelope, or None for each one that fails."""
        n = len(envelopes)
        _check_limit(n, limit)
        ad, ad_len, ad_lens = _aad_args(aad, n)
        ptr = self._handle()
        if n == 0:
            return []
        if _all_large(envelopes, ROUTE_MIN_BYTES + OVERHEAD):
            return [self._open_or_none(e, a) for e, a in zip(envelopes, _aad_list(aad, n), strict=True)]
        data, lens, uniform = _join(envelopes, n, "envelopes")
        if lens is None:
            pt_sizes = None
            pt_uniform = max(uniform - OVERHEAD, 0)
            size = pt_uniform * n
        else:
            pt_sizes = [x - OVERHEAD if x > OVERHEAD else 0 for x in lens]
            size = sum(pt_sizes)
        out = _alloc("unsigned char[]", size or 1)
        status = _alloc("unsigned char[]", n)
        rc = lib.kb_open_batch(
            ptr, n, data, len(data), _lens_arg(lens), ad, ad_len, ad_lens, out, size, status
        )
        if rc < 0:
            _raise_native(rc)
        buf = ffi.buffer(out, size)
        parts = _split_uniform(buf, pt_uniform, n) if pt_sizes is None else _split(buf, pt_sizes)
        result: list[bytes | None] = parts  # type: ignore[assignment]
        if rc > 0:
            _mark_failed(result, status, n)
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
    ad, ad_len, ad_lens = _aad_args(aad, n)
    old_ptr = old._handle()
    new_ptr = new._handle()
    if n == 0:
        return []
    data, lens, uniform = _join(envelopes, n, "envelopes")
    size = len(data)
    out = _alloc("unsigned char[]", size or 1)
    status = _alloc("unsigned char[]", n)
    rc = lib.kb_rewrap_batch(
        old_ptr, new_ptr, n, data, size, _lens_arg(lens), ad, ad_len, ad_lens, out, size, status
    )
    if rc < 0:
        _raise_native(rc)
    buf = ffi.buffer(out, size)
    parts = _split_uniform(buf, uniform, n) if lens is None else _split(buf, lens)
    result: list[bytes | None] = parts  # type: ignore[assignment]
    if rc > 0:
        _mark_failed(result, status, n)
    return result
