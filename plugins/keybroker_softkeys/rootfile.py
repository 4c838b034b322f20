"""The file root of trust: a 256-bit AES key kept in ``<data_dir>/root.key``.

This is keybroker's embedded default, meant for a laptop, a test or a single
small host. A production deployment with stronger custody needs uses a
non-extractable root key on a PKCS#11 token instead.

The file is created on first open with 32 bytes from the OS CSPRNG and a
random 16-byte root key id, mode 0600. It is sealed under a key derived from
a passphrase (scrypt) when one is given; without a passphrase the key is
stored in the clear and the file's permissions are its only protection.

File format 1 (all integers unsigned)::

    off  len  field
    0    4    magic "KBRK"
    4    1    format = 1
    5    1    flags: bit 0 set = sealed under a passphrase
    6    16   root key id
    -- plain (flags = 0) --
    22   32   root key
    54   16   check: SHA-256(bytes 0..54)[:16], catches truncation and corruption
    -- sealed (flags = 1) --
    22   1    kdf = 1 (scrypt)
    23   1    log2(N)
    24   1    r
    25   1    p
    26   16   salt
    42   84   format-1 envelope (broker.envelope) of the root key under the
              passphrase-derived key; its aad is bytes 0..42, so the header,
              the KDF parameters and the salt are all authenticated

In memory the root key lives only in a native :class:`~broker.envelope.KeySlot`
(locked memory, cleansed on close); Python never keeps it as ``bytes``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import trio

from broker.durable import sync_directory
from broker.envelope import KeySlot
from broker.errors import DecryptionFailed, InvalidState, Unavailable
from broker.kdf import MAX_SCRYPT_MEMORY, scrypt, scrypt_memory

from ._secret import random_bytearray, zero

__all__ = [
    "FileRootKey",
    "RootKeyError",
    "ScryptParams",
]

MAGIC = b"KBRK"
FORMAT_1 = 1
FLAG_SEALED = 0x01
KDF_SCRYPT = 1
KEY_LEN = 32
KEY_ID_LEN = 16
SALT_LEN = 16
CHECK_LEN = 16
# Root key slots carry a version so that a later re-keying of the root can be
# told apart in wrapped blobs' headers; format 1 has only ever one.
ROOT_VERSION = 1

_PREFIX = struct.Struct(">4sBB16s")  # magic, format, flags, root key id
_KDF = struct.Struct(">BBBB16s")  # kdf, log2(N), r, p, salt
_PLAIN_LEN = _PREFIX.size + KEY_LEN + CHECK_LEN
_SEALED_HEADER_LEN = _PREFIX.size + _KDF.size
# Envelope overhead (36-byte header + 16-byte tag) around the 32-byte key.
_SEALED_LEN = _SEALED_HEADER_LEN + 36 + KEY_LEN + 16
# Refuse absurd KDF parameters read from a (possibly hostile) file: they would
# turn a start-up into a memory or CPU exhaustion.
_MAX_LOG2_N = 22
_MAX_R = 32
_MAX_P = 16


@dataclass(frozen=True, slots=True)
class ScryptParams:
    """scrypt cost parameters; the defaults follow RFC 7914's interactive-plus tier.

    N = 2**15, r = 8 costs 32 MiB and roughly 0.1 s per derivation, paid once
    per broker start.
    """

    log2_n: int = 15
    r: int = 8
    p: int = 1

    def __post_init__(self) -> None:
        in_range = 14 <= self.log2_n <= _MAX_LOG2_N and 8 <= self.r <= _MAX_R and 1 <= self.p <= _MAX_P
        if not in_range or scrypt_memory(self.log2_n, self.r, self.p) > MAX_SCRYPT_MEMORY:
            raise ValueError(
                "scrypt parameters out of range (N from 2**14 to 2**22, r 8-32, p 1-16, "
                "and 128*N*r*(p+1) at most 1 GiB)"
            )


class RootKeyError(Unavailable):
    """The root key file cannot be used: missing passphrase, wrong passphrase,
    corrupt or truncated file, or unsafe permissions, owner or symbolic link.
    The message names the cause."""


class FileRootKey:
    """A :class:`broker.backend.RootKey` kept in a file (see the module docstring).

    Args:
        path: the root key file, normally ``<data_dir>/root.key``. Its
            directory is created 0700 when missing.
        passphrase: seal the file under a scrypt-derived key. None stores the
            key in the clear (embedded laptop and test default; the file's 0600
            mode is then its only protection).
        scrypt: KDF cost used when a new sealed file is created. Opening an
            existing file uses the parameters stored in its header.

    Resource handling:
        ``open`` loads (or creates) the key into a native slot; ``aclose``
        cleanses it. ``aclose`` is idempotent.
    """

    name = "file"

    def __init__(
        self,
        path: Path | str,
        *,
        passphrase: str | bytes | None = None,
        scrypt: ScryptParams | None = None,
    ) -> None:
        if isinstance(passphrase, str):
            passphrase = passphrase.encode()
        if passphrase is not None and not passphrase:
            raise ValueError("the root key passphrase must not be empty")
        self.path = Path(path)
        # Kept (not just its derived key) because open() may run later than
        # construction; it is the operator's secret, not key material.
        self._passphrase = passphrase
        self._scrypt = scrypt or ScryptParams()
        self._slot: KeySlot | None = None
        self._key_id: bytes | None = None

    def __repr__(self) -> str:
        state = "open" if self._slot is not None else "closed"
        sealed = "sealed" if self._passphrase is not None else "plain"
        return f"<FileRootKey {str(self.path)!r} {sealed} {state}>"

    @property
    def key_id(self) -> bytes:
        """The 16-byte root key id (public: it appears in every wrapped blob's header)."""
        if self._key_id is None:
            raise InvalidState("the root key is not open")
        return self._key_id

    async def open(self) -> None:
        """Load the root key, creating the file on first use.

        Raises:
            RootKeyError: the file is corrupt or truncated, was sealed under a
                different passphrase, is sealed but no passphrase was given,
                is plain but a passphrase was given, is readable by others,
                is owned by another user, or is a symbolic link.
            OSError: the data directory cannot be created or read.

        Cancellation: the scrypt derivation runs in a worker thread and is not
            interrupted; a cancelled open leaves nothing loaded.
        """
        if self._slot is not None:
            return
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            buf, size = self._read()
        except FileNotFoundError:
            buf, size = await self._create()
        try:
            key_id, key = await self._decode(memoryview(buf)[:size])
        finally:
            zero(buf)
        try:
            # KeySlot copies the key into locked memory and zeroes our buffer.
            slot = KeySlot(key, key_id, ROOT_VERSION)
        finally:
            zero(key)  # already zero unless KeySlot failed
        if self._slot is not None:
            # A concurrent open() finished first while this one was awaiting.
            slot.close()
            return
        self._slot = slot
        self._key_id = key_id

    async def wrap(self, material: bytes | bytearray, context: bytes) -> bytes:
        """Seal ``material`` under the root key; ``context`` is bound as aad."""
        # KeySlot reads any bytes-like object; a bytearray avoids an immutable copy.
        return self._require().seal(cast("bytes", material), aad=context)

    async def unwrap(self, blob: bytes, context: bytes) -> bytearray:
        """Open a wrapped blob. The caller zeroes the result after use.

        Raises:
            DecryptionFailed: wrong root key, wrong context, or tampered blob.
        """
        # The native open returns an immutable copy; it is dropped at once.
        return bytearray(self._require().open(blob, aad=context))

    async def aclose(self) -> None:
        """Cleanse the root key from native memory. Idempotent."""
        slot, self._slot = self._slot, None
        if slot is not None:
            slot.close()

    # --- internals -----------------------------------------------------------

    def _require(self) -> KeySlot:
        if self._slot is None:
            raise InvalidState("the root key is not open")
        return self._slot

    def _read(self) -> tuple[bytearray, int]:
        """The file's bytes in a buffer the caller zeroes, and how many were read."""
        fd = self._open_own()
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise RootKeyError(f"root key file {self.path} is not a regular file")
            if info.st_uid != os.geteuid():
                # Whoever owns the file chose the root key: another user could
                # plant one they know, and read everything wrapped under it.
                raise RootKeyError(
                    f"root key file {self.path} is owned by uid {info.st_uid}, not by this "
                    f"broker's user (uid {os.geteuid()}); refusing a root key another user controls"
                )
            if info.st_mode & 0o077:
                # Like ssh with private keys: a key others can read is refused,
                # not silently used.
                raise RootKeyError(
                    f"root key file {self.path} is accessible by other users "
                    f"(mode {stat.S_IMODE(info.st_mode):04o}); run: chmod 600 {self.path}"
                )
            # One byte past the largest valid file, to notice trailing data. The
            # buffer is never resized: a resize may copy the key and free the
            # old block without zeroing it.
            buf = bytearray(max(_PLAIN_LEN, _SEALED_LEN) + 1)
            with memoryview(buf) as view:
                got = 0
                while got < len(buf):
                    read = os.readv(fd, [view[got:]])
                    if read == 0:
                        break
                    got += read
            return buf, got
        finally:
            os.close(fd)

    def _open_own(self) -> int:
        """A read-only descriptor on the file itself, never on a symbolic link's target.

        Raises:
            FileNotFoundError: no file yet (the caller creates one).
            RootKeyError: the name is a symbolic link.
        """
        try:
            return os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            raise RootKeyError(
                f"root key file {self.path} is a symbolic link; refusing to follow it "
                "(put the file itself in the data directory)"
            ) from None

    async def _create(self) -> tuple[bytearray, int]:
        key_id = os.urandom(KEY_ID_LEN)
        key = random_bytearray(KEY_LEN)
        try:
            raw = await self._encode(key_id, key)
        finally:
            zero(key)
        try:
            self._write_new(raw)
        except FileExistsError:
            # Another broker process created the file first: use theirs.
            zero(raw)
            return self._read()
        return raw, len(raw)

    def _write_new(self, raw: bytearray) -> None:
        """Write the file atomically and without clobbering.

        The bytes go to a fresh temporary file first, then ``link`` gives it the
        final name, which fails if the name exists. A crash therefore never
        leaves a half-written root.key, which would need manual repair, and two
        processes racing to create it cannot both win.
        """
        directory = self.path.parent
        tmp = directory / f".{self.path.name}.{os.urandom(8).hex()}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
        fd = os.open(tmp, flags, 0o600)
        try:
            # The umask may have masked bits off 0o600, never added any; fchmod
            # makes the mode exact regardless.
            os.fchmod(fd, 0o600)
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        sync_directory(directory)

    async def _encode(self, key_id: bytes, key: bytearray) -> bytearray:
        if self._passphrase is None:
            # Filled in place: growing a bytearray may copy the key and free
            # the old block without zeroing it.
            out = bytearray(_PLAIN_LEN)
            _PREFIX.pack_into(out, 0, MAGIC, FORMAT_1, 0, key_id)
            body_end = _PREFIX.size + KEY_LEN
            out[_PREFIX.size : body_end] = key
            out[body_end:] = hashlib.sha256(memoryview(out)[:body_end]).digest()[:CHECK_LEN]
            return out
        params = self._scrypt
        salt = os.urandom(SALT_LEN)
        header = _PREFIX.pack(MAGIC, FORMAT_1, FLAG_SEALED, key_id) + _KDF.pack(
            KDF_SCRYPT, params.log2_n, params.r, params.p, salt
        )
        kek = await self._derive(params, salt)
        sealer = KeySlot(kek, key_id, ROOT_VERSION)
        try:
            return bytearray(header + sealer.seal(cast("bytes", key), aad=header))
        finally:
            sealer.close()

    async def _decode(self, raw: memoryview) -> tuple[bytes, bytearray]:
        if len(raw) < _PREFIX.size:
            raise RootKeyError(f"root key file {self.path} is truncated")
        magic, fmt, flags, key_id = _PREFIX.unpack_from(raw)
        if magic != MAGIC:
            raise RootKeyError(f"{self.path} is not a keybroker root key file")
        if fmt != FORMAT_1:
            raise RootKeyError(f"root key file {self.path} has unsupported format {fmt}")
        if flags & ~FLAG_SEALED:
            raise RootKeyError(f"root key file {self.path} has unknown flags {flags:#04x}")
        if not flags & FLAG_SEALED:
            return key_id, self._decode_plain(raw)
        return key_id, await self._decode_sealed(raw, key_id)

    def _decode_plain(self, raw: memoryview) -> bytearray:
        if len(raw) != _PLAIN_LEN:
            raise RootKeyError(f"root key file {self.path} is truncated or has trailing data")
        body = raw[: _PREFIX.size + KEY_LEN]
        if hashlib.sha256(body).digest()[:CHECK_LEN] != bytes(raw[-CHECK_LEN:]):
            raise RootKeyError(f"root key file {self.path} is corrupt (check value mismatch)")
        if self._passphrase is not None:
            raise RootKeyError(
                f"root key file {self.path} is not sealed, but a passphrase was given; "
                "refusing to use an unprotected root key when protection was asked for"
            )
        return bytearray(body[_PREFIX.size :])

    async def _decode_sealed(self, raw: memoryview, key_id: bytes) -> bytearray:
        if self._passphrase is None:
            raise RootKeyError(
                f"root key file {self.path} is sealed under a passphrase, but none was given "
                "(set KEYBROKER_PASSPHRASE or passphrase_file)"
            )
        if len(raw) != _SEALED_LEN:
            raise RootKeyError(f"root key file {self.path} is truncated or has trailing data")
        kdf, log2_n, r, p, salt = _KDF.unpack_from(raw, _PREFIX.size)
        if kdf != KDF_SCRYPT:
            raise RootKeyError(f"root key file {self.path} names unknown KDF {kdf}")
        try:
            params = ScryptParams(log2_n, r, p)
        except ValueError:
            raise RootKeyError(f"root key file {self.path} has out-of-range scrypt parameters") from None
        header = bytes(raw[:_SEALED_HEADER_LEN])
        kek = await self._derive(params, salt)
        opener = KeySlot(kek, key_id, ROOT_VERSION)
        try:
            # The native open returns an immutable copy, converted and dropped.
            return bytearray(opener.open(bytes(raw[_SEALED_HEADER_LEN:]), aad=header))
        except DecryptionFailed:
            # GCM cannot tell a wrong passphrase from a modified file.
            raise RootKeyError(
                f"cannot unseal root key file {self.path}: wrong passphrase, or the file was modified"
            ) from None
        finally:
            opener.close()

    async def _derive(self, params: ScryptParams, salt: bytes) -> bytearray:
        passphrase = self._passphrase
        assert passphrase is not None

        def derive() -> bytearray:
            # scrypt returns bytes; the copy lives only for this call.
            return bytearray(
                scrypt(passphrase, salt, log2_n=params.log2_n, r=params.r, p=params.p, length=KEY_LEN)
            )

        try:
            # ~0.1 s of CPU with the GIL released: keep it off the trio thread.
            return await trio.to_thread.run_sync(derive)
        except ValueError as exc:
            # The message names the parameters or the failure, never the passphrase.
            raise RootKeyError(f"cannot derive the key sealing root key file {self.path}: {exc}") from None
