"""Streaming file encryption: one data key, fixed-size authenticated segments.

A file of any size is encrypted with ONE data key from the broker
(``datakey``) and sealed segment by segment, so memory stays flat whatever
the file size and the broker is asked once per file (``decrypt`` opens the
wrapped data key on the way back).

Format 1::

    header
      0   4   magic "KBST"
      4   1   format = 1
      5   1   flags = 0 (reserved; a reader refuses other values)
      6   4   segment size S: plaintext bytes per segment (uint32, big-endian)
      10  16  stream id (random)
      26  2   length L of the wrapped data key (uint16, big-endian)
      28  L   wrapped data key: the format-1 envelope ``datakey`` returned,
              sealed with aad = "keybroker/stream/v1" || stream id || the
              caller's aad (if any; not stored)
    segments, one after another, each
      12      nonce (random)
      n       AES-256-GCM ciphertext (n = S for every segment but the last,
              0..S for the last)
      16      GCM tag

Segment i (counting from 0) is sealed under the data key with additional data

    36-byte envelope header (magic, format, algorithm, stream id, version 0, nonce)
    || SHA-256(stream header) || i (uint64, big-endian) || last (1 byte: 1 for the final segment)

(the envelope header is what :class:`~broker.envelope.KeySlot` authenticates
on its own; the rest is ours). Hence a flipped bit fails its segment's tag;
swapping, duplicating or reordering segments fails the counter; dropping
segments from the end fails the last flag (the new final segment was sealed
with last = 0), and so does appending one; altering the header fails every
segment (and the wrapped key is bound to the stream id). An empty file is
one empty final segment. Random 96-bit nonces bound one data key to 2^32
segments (4 PiB at 1 MiB segments); a stream never gets that far.

The pure format (header, segment sealing and opening over file objects) is
separate from :func:`encrypt_file` / :func:`decrypt_file`, which talk to a
broker. Decryption writes to a temporary file beside the output and renames
it only once the final segment has verified: a truncated or altered file
never leaves partial plaintext at the output path.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Final

from .durable import sync_directory
from .envelope import HEADER_LEN, NONCE_LEN, TAG_LEN, KeySlot, pack_header
from .errors import DecryptionFailed, InvalidArgument

if TYPE_CHECKING:
    from .client import Client

__all__ = [
    "DEFAULT_SEGMENT_SIZE",
    "FORMAT",
    "MAGIC",
    "MAX_SEGMENT_SIZE",
    "MIN_SEGMENT_SIZE",
    "SEGMENT_OVERHEAD",
    "Progress",
    "StreamHeader",
    "atomic_output",
    "datakey_aad",
    "decrypt_file",
    "encrypt_file",
    "open_segments",
    "open_stream",
    "seal_segments",
    "seal_stream",
]

MAGIC: Final = b"KBST"
FORMAT: Final = 1
# 1 MiB segments: per-segment overhead (28 bytes, one GCM set-up) is lost in
# the noise, and reading/writing a segment at a time keeps memory flat.
DEFAULT_SEGMENT_SIZE: Final = 1024 * 1024
# Tiny segments are for tests; above 64 MiB a segment no longer "streams".
MIN_SEGMENT_SIZE: Final = 16
MAX_SEGMENT_SIZE: Final = 64 * 1024 * 1024
SEGMENT_OVERHEAD: Final = NONCE_LEN + TAG_LEN
# NIST SP 800-38D §8.3: random nonces bound one key to 2^32 invocations.
MAX_SEGMENTS: Final = 2**32
DATAKEY_AAD_PREFIX: Final = b"keybroker/stream/v1"
STREAM_ID_LEN: Final = 16
# A stream's data key: an AES-256 key from ``datakey``.
DATA_KEY_LEN: Final = 32
# The envelope fields before the nonce, rebuilt per segment: magic, format,
# algorithm, stream id and version 0.
_PREFIX_LEN: Final = HEADER_LEN - NONCE_LEN
_FIXED = struct.Struct(">4sBBI16sH")
_SEGMENT_AAD = struct.Struct(">32sQB")

#: Progress callback: (bytes of input processed so far, total or None).
Progress = Callable[[int, int | None], None]


def datakey_aad(stream_id: bytes, aad: bytes = b"") -> bytes:
    """The aad the stream's data key is wrapped (``datakey``) and opened (``decrypt``) with.

    A caller's own ``aad`` (not stored in the file, like an envelope's) is
    bound there too: the stream then opens only with the same ``aad``.
    """
    return DATAKEY_AAD_PREFIX + stream_id + aad


@dataclass(frozen=True, slots=True)
class StreamHeader:
    """The header of a format-1 stream."""

    segment_size: int
    stream_id: bytes
    wrapped_key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not MIN_SEGMENT_SIZE <= self.segment_size <= MAX_SEGMENT_SIZE:
            raise InvalidArgument(
                f"segment size must be {MIN_SEGMENT_SIZE} to {MAX_SEGMENT_SIZE} bytes",
                {"field": "segment_size"},
            )
        if len(self.stream_id) != STREAM_ID_LEN:
            raise InvalidArgument(f"stream id must be {STREAM_ID_LEN} bytes")
        if not 0 < len(self.wrapped_key) < 2**16:
            raise InvalidArgument("wrapped data key must be 1 to 65535 bytes")

    def pack(self) -> bytes:
        """The header bytes."""
        fixed = _FIXED.pack(MAGIC, FORMAT, 0, self.segment_size, self.stream_id, len(self.wrapped_key))
        return fixed + self.wrapped_key

    @classmethod
    def read(cls, src: IO[bytes]) -> tuple[StreamHeader, bytes]:
        """Read and parse a header from ``src``; returns it and its raw bytes.

        Raises:
            DecryptionFailed: not a format-1 stream, or a truncated header.
        """
        fixed = src.read(_FIXED.size)
        if len(fixed) != _FIXED.size:
            raise DecryptionFailed()
        magic, fmt, flags, size, stream_id, wrapped_len = _FIXED.unpack(fixed)
        if magic != MAGIC or fmt != FORMAT or flags != 0:
            raise DecryptionFailed()
        wrapped = src.read(wrapped_len)
        if len(wrapped) != wrapped_len:
            raise DecryptionFailed()
        try:
            header = cls(size, stream_id, wrapped)
        except InvalidArgument:
            raise DecryptionFailed() from None
        return header, fixed + wrapped


def _read_full(src: IO[bytes], size: int) -> bytes:
    """Up to ``size`` bytes, fewer only at end of input (pipes return short reads)."""
    data = src.read(size)
    if len(data) == size or not data:
        return data
    parts = [data]
    got = len(data)
    while got < size:
        more = src.read(size - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _segment_aad(digest: bytes, counter: int, last: bool) -> bytes:
    return _SEGMENT_AAD.pack(digest, counter, 1 if last else 0)


def seal_segments(
    slot: KeySlot,
    digest: bytes,
    segment_size: int,
    src: IO[bytes],
    dst: IO[bytes],
    *,
    progress: Progress | None = None,
    total: int | None = None,
) -> int:
    """Seal everything ``src`` holds into segments written to ``dst`` (no header).

    The segment layer shared by streams and backup archives: each segment's
    additional data binds ``digest`` (of the container's header), its counter
    and whether it is the last.

    Returns:
        The number of plaintext bytes sealed.

    Raises:
        InvalidArgument: over 2^32 segments.
    """
    current = _read_full(src, segment_size)
    counter = 0
    done = 0
    while True:
        following = _read_full(src, segment_size) if len(current) == segment_size else b""
        last = not following
        if counter >= MAX_SEGMENTS:
            raise InvalidArgument("the input is too large for one stream (2^32 segments)")
        envelope = slot.seal(current, _segment_aad(digest, counter, last))
        dst.write(memoryview(envelope)[_PREFIX_LEN:])
        done += len(current)
        if progress is not None:
            progress(done, total)
        if last:
            return done
        current = following
        counter += 1


def open_segments(
    slot: KeySlot,
    digest: bytes,
    segment_size: int,
    src: IO[bytes],
    dst: IO[bytes],
    *,
    progress: Progress | None = None,
    total: int | None = None,
    done: int = 0,
) -> int:
    """Open the segments ``src`` holds (from its position to its end) into ``dst``.

    Args:
        slot: the key slot; its key id and version 0 rebuild each envelope header.
        digest: what :func:`seal_segments` was given.
        done: input bytes already consumed (the header), for ``progress``.

    Returns:
        The number of plaintext bytes written.

    Raises:
        DecryptionFailed: any segment altered, reordered, duplicated, missing
            or added (output written so far must then be discarded).
    """
    prefix = pack_header(slot.key_id, 0, bytes(NONCE_LEN))[:_PREFIX_LEN]
    record = segment_size + SEGMENT_OVERHEAD
    current = _read_full(src, record)
    counter = 0
    written = 0
    while True:
        if len(current) < SEGMENT_OVERHEAD:
            raise DecryptionFailed()
        following = _read_full(src, record) if len(current) == record else b""
        last = not following
        plaintext = slot.open(prefix + current, _segment_aad(digest, counter, last))
        dst.write(plaintext)
        written += len(plaintext)
        done += len(current)
        if progress is not None:
            progress(done, total)
        if last:
            return written
        current = following
        counter += 1


def seal_stream(
    slot: KeySlot,
    header: StreamHeader,
    src: IO[bytes],
    dst: IO[bytes],
    *,
    progress: Progress | None = None,
    total: int | None = None,
) -> int:
    """Write ``header`` and the sealed segments of everything ``src`` holds to ``dst``.

    Args:
        slot: holds the data key; made with ``key_id=header.stream_id, version=0``.
        header: the stream's header.
        src / dst: binary file objects.
        progress: called after each segment with the input bytes so far.
        total: the input size for ``progress`` (None when unknown).

    Returns:
        The number of plaintext bytes sealed.
    """
    raw = header.pack()
    dst.write(raw)
    digest = hashlib.sha256(raw).digest()
    return seal_segments(slot, digest, header.segment_size, src, dst, progress=progress, total=total)


def open_stream(
    slot: KeySlot,
    header: StreamHeader,
    raw_header: bytes,
    src: IO[bytes],
    dst: IO[bytes],
    *,
    progress: Progress | None = None,
    total: int | None = None,
) -> int:
    """Open the segments after the header in ``src`` into ``dst``, checking order and end.

    Args:
        slot: holds the data key; made with ``key_id=header.stream_id, version=0``.
        header, raw_header: what :meth:`StreamHeader.read` returned.
        src / dst: binary file objects; ``src`` positioned after the header.
        progress: called after each segment with the input bytes so far.
        total: the input size for ``progress``.

    Returns:
        The number of plaintext bytes written.

    Raises:
        DecryptionFailed: any segment altered, reordered, duplicated, missing
            or added (written output must then be discarded by the caller).
    """
    if slot.key_id != header.stream_id:
        raise DecryptionFailed()
    digest = hashlib.sha256(raw_header).digest()
    return open_segments(
        slot, digest, header.segment_size, src, dst, progress=progress, total=total, done=len(raw_header)
    )


# --- talking to a broker -----------------------------------------------------------


def _size_of(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


@contextlib.contextmanager
def atomic_output(dst: Path) -> Iterator[IO[bytes]]:
    """A 0600 temporary file beside ``dst``, renamed over it only if the block succeeds.

    On any exception the temporary file is removed and ``dst`` is untouched,
    so a failed decryption never leaves (partial) plaintext behind. Same
    directory, hence same file system: the rename is atomic; the directory
    is flushed after it, so the name survives a power loss once this returns.

    Raises:
        OSError: ``dst`` exists and is not a regular file (a device such as
            /dev/null, a FIFO, a directory or a symbolic link): the rename
            would put a file in its place rather than write through it,
            and writing through would release data before it is complete.
            Checked before anything else, so a caller that creates the
            output first learns of it before doing any work.
    """
    try:
        mode = dst.lstat().st_mode
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISREG(mode):
            refused = "exists and is not a regular file; give a new or regular file"
            raise OSError(errno.EINVAL, refused, str(dst))
    try:
        fd, name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".partial", dir=dst.parent)
    except OSError as exc:
        # Name the output asked for, not the temporary file never made.
        raise OSError(exc.errno, exc.strerror, str(dst)) from None
    temp = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, dst)
        sync_directory(dst.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()


def encrypt_file(
    client: Client,
    key: str,
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
    aad: bytes = b"",
    progress: Progress | None = None,
) -> dict[str, int]:
    """Encrypt the file ``src`` into ``dst`` under one data key of ``key``.

    Args:
        client: a connected :class:`~broker.client.Client`.
        key: the name of an aes256-gcm key (the caller needs ``datakey`` on it).
        src / dst: input and output paths; ``dst`` is replaced atomically.
        segment_size: plaintext bytes per segment.
        aad: additional data the stream is bound to (needed again to decrypt).
        progress: called with (input bytes done, input size).

    Returns:
        ``{"bytes": plaintext bytes, "segments": segment count, "version": key version}``.

    Raises:
        BrokerError: the broker refused the data key.
        InvalidArgument: a segment size out of range.
        OSError: a file cannot be read or written.
    """
    source, target = Path(src), Path(dst)
    stream_id = os.urandom(STREAM_ID_LEN)
    StreamHeader(segment_size, stream_id, b"\x00")  # check the size before asking the broker
    # The input is open and the output created before the broker is asked:
    # a file problem never costs a use of the key whose data key is then lost.
    with source.open("rb") as reader, atomic_output(target) as out:
        reply = client.datakey(
            key, count=1, bytes=DATA_KEY_LEN, plaintext=True, aad=datakey_aad(stream_id, aad)
        )
        item = reply["keys"][0]
        data_key = bytearray(item["plaintext"])
        header = StreamHeader(segment_size, stream_id, item["wrapped"])
        with KeySlot(data_key, stream_id, 0) as slot:
            done = seal_stream(slot, header, reader, out, progress=progress, total=_size_of(source))
    # The final segment may be full; an empty input is one empty segment.
    segments = max(1, -(-done // segment_size))
    return {"bytes": done, "segments": segments, "version": int(reply["version"])}


def decrypt_file(
    client: Client,
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    aad: bytes = b"",
    allow_compromised: bool = False,
    progress: Progress | None = None,
) -> dict[str, object]:
    """Decrypt a stream made by :func:`encrypt_file` into ``dst`` (one ``decrypt`` call).

    ``aad`` must be what the stream was encrypted with. ``allow_compromised``
    lets the broker open a data key wrapped by a compromised key version
    (audited as an alarm), as ``decrypt`` does.

    Returns:
        ``{"bytes": plaintext bytes, "key": key name, "version": key version}``.

    Raises:
        DecryptionFailed: not a stream, or altered, truncated, extended or
            reordered anywhere; ``dst`` is then left untouched.
        BrokerError: the broker refused to open the data key.
        OSError: a file cannot be read or written.
    """
    source, target = Path(src), Path(dst)
    with source.open("rb") as reader:
        header, raw = StreamHeader.read(reader)
        # The output is created before the broker opens the data key (see encrypt_file).
        with atomic_output(target) as out:
            opened = client.decrypt(
                header.wrapped_key,
                aad=datakey_aad(header.stream_id, aad),
                allow_compromised=True if allow_compromised else None,
            )
            data_key = bytearray(opened["plaintext"])
            if len(data_key) != DATA_KEY_LEN:  # a stream's data key is an AES-256 key
                data_key[:] = bytes(len(data_key))
                raise DecryptionFailed()
            with KeySlot(data_key, header.stream_id, 0) as slot:
                total = _size_of(source)
                written = open_stream(slot, header, raw, reader, out, progress=progress, total=total)
    return {"bytes": written, "key": opened["key"], "version": opened["version"]}
