"""The streaming file format: round trips, and every kind of tampering detected."""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.client import Client
from broker.envelope import KeySlot
from broker.errors import DecryptionFailed, InvalidArgument
from broker.server import ServerInfo
from broker.stream import (
    SEGMENT_OVERHEAD,
    StreamHeader,
    datakey_aad,
    decrypt_file,
    encrypt_file,
    open_stream,
    seal_stream,
)

KEY = bytes(range(32))
SID = bytes(16)
SEG = 64


def _slot() -> KeySlot:
    return KeySlot(bytearray(KEY), SID, 0)


def seal(data: bytes, segment: int = SEG, stream_id: bytes = SID) -> bytes:
    out = io.BytesIO()
    with KeySlot(bytearray(KEY), stream_id, 0) as slot:
        seal_stream(slot, StreamHeader(segment, stream_id, b"wrapped-key"), io.BytesIO(data), out)
    return out.getvalue()


def open_(blob: bytes) -> bytes:
    src = io.BytesIO(blob)
    header, raw = StreamHeader.read(src)
    out = io.BytesIO()
    with _slot() as slot:
        open_stream(slot, header, raw, src, out)
    return out.getvalue()


HEADER_SIZE = len(StreamHeader(SEG, SID, b"wrapped-key").pack())


def segments(blob: bytes) -> list[bytes]:
    body = blob[HEADER_SIZE:]
    step = SEG + SEGMENT_OVERHEAD
    return [body[i : i + step] for i in range(0, len(body), step)]


@pytest.mark.parametrize("size", [0, 1, SEG - 1, SEG, SEG + 1, 3 * SEG, 5 * SEG + 7])
def test_round_trip_sizes(size: int) -> None:
    data = os.urandom(size)
    blob = seal(data)
    assert open_(blob) == data
    assert len(segments(blob)) == max(1, -(-size // SEG))
    assert data[:32] not in blob or size < 8


def test_segment_swap_duplicate_and_reorder_fail() -> None:
    blob = seal(os.urandom(4 * SEG + 3))
    head, parts = blob[:HEADER_SIZE], segments(blob)
    for reordered in (
        [parts[1], parts[0], *parts[2:]],
        [parts[0], parts[0], *parts[2:]],
        [*parts[:2], parts[3], parts[2], parts[4]],
    ):
        with pytest.raises(DecryptionFailed):
            open_(head + b"".join(reordered))


def test_truncation_and_extension_fail() -> None:
    blob = seal(os.urandom(3 * SEG))
    head, parts = blob[:HEADER_SIZE], segments(blob)
    with pytest.raises(DecryptionFailed):
        open_(head + b"".join(parts[:-1]))  # dropped at a segment boundary
    with pytest.raises(DecryptionFailed):
        open_(blob[:-1])
    with pytest.raises(DecryptionFailed):
        open_(head)  # no segment at all
    with pytest.raises(DecryptionFailed):
        open_(blob + parts[0])
    with pytest.raises(DecryptionFailed):
        open_(blob[: HEADER_SIZE - 3])


@settings(max_examples=40)
@given(st.data())
def test_any_flipped_bit_fails(data: st.DataObject) -> None:
    blob = seal(b"z" * (2 * SEG + 5))
    position = data.draw(st.integers(0, len(blob) - 1))
    bit = data.draw(st.integers(0, 7))
    tampered = bytearray(blob)
    tampered[position] ^= 1 << bit
    with pytest.raises(DecryptionFailed):
        open_(bytes(tampered))


def test_segment_of_another_stream_fails() -> None:
    # Even under the same data key: each stream has its own id, bound into every segment.
    other = b"\x01" * 16
    one, two = seal(b"a" * 2 * SEG), seal(b"b" * 2 * SEG, stream_id=other)
    with pytest.raises(DecryptionFailed):
        open_(one[:HEADER_SIZE] + segments(two)[0] + segments(one)[1])


def test_segment_size_bounds() -> None:
    with pytest.raises(InvalidArgument):
        StreamHeader(8, SID, b"k")
    with pytest.raises(InvalidArgument):
        StreamHeader(65 * 1024 * 1024, SID, b"k")


# --- through a broker -------------------------------------------------------------------


async def test_encrypt_file_and_decrypt_file(served: ServerInfo, short_tmp: Path) -> None:
    src, enc, out = short_tmp / "in.bin", short_tmp / "in.kbst", short_tmp / "out.bin"
    data = os.urandom(10 * 1024 + 3)
    src.write_bytes(data)
    seen: list[int] = []

    def run() -> tuple[dict[str, int], dict[str, object]]:
        with Client(served.socket_path) as client:
            client.key_create("files", "aes256-gcm")
            sealed = encrypt_file(
                client, "files", src, enc, segment_size=1024, progress=lambda d, t: seen.append(d)
            )
            opened = decrypt_file(client, enc, out)
            return sealed, opened

    sealed, opened = await trio.to_thread.run_sync(run)
    assert sealed == {"bytes": len(data), "segments": 11, "version": 1}
    assert opened == {"bytes": len(data), "key": "files", "version": 1}
    assert out.read_bytes() == data and seen[-1] == len(data)
    # A truncated stream leaves no output behind, not even partial plaintext.
    enc.write_bytes(enc.read_bytes()[:-1100])
    out.unlink()

    def fail() -> None:
        with Client(served.socket_path) as client:
            decrypt_file(client, enc, out)

    with pytest.raises(DecryptionFailed):
        await trio.to_thread.run_sync(fail)
    assert not out.exists() and [p.name for p in short_tmp.iterdir() if "partial" in p.name] == []


@pytest.mark.parametrize("kind", ["fifo", "directory", "symlink"])
def test_an_output_that_is_not_a_regular_file_is_refused_first(short_tmp: Path, kind: str) -> None:
    # A rename over it would replace the device, FIFO or link with a file.
    src, stream, out = short_tmp / "in.bin", short_tmp / "in.kbst", short_tmp / "out"
    src.write_bytes(b"data")
    stream.write_bytes(seal(b"data"))
    if kind == "fifo":
        os.mkfifo(out)
    elif kind == "directory":
        out.mkdir()
    else:
        (short_tmp / "target").write_bytes(b"kept")
        out.symlink_to(short_tmp / "target")
    # No broker listens there: EINVAL rather than a failed connection shows
    # that the output was refused before the broker was asked.
    with Client(short_tmp / "nobody.sock") as client:
        for call in (lambda: encrypt_file(client, "k", src, out), lambda: decrypt_file(client, stream, out)):
            with pytest.raises(OSError, match="not a regular file") as raised:
                call()
            assert raised.value.errno == errno.EINVAL and raised.value.filename == str(out)
    assert out.is_symlink() if kind == "symlink" else not out.is_file()
    assert [p.name for p in short_tmp.iterdir() if "partial" in p.name] == []


async def test_a_data_key_that_is_not_256_bits_fails_as_an_altered_stream(
    served: ServerInfo, short_tmp: Path
) -> None:
    enc, out = short_tmp / "short-key.kbst", short_tmp / "out.bin"

    def run() -> None:
        with Client(served.socket_path) as client:
            client.key_create("files/short", "aes256-gcm")
            stream_id = os.urandom(16)
            wrapped = client.encrypt("files/short", bytes(16), aad=datakey_aad(stream_id, b""))["ciphertext"]
            enc.write_bytes(StreamHeader(SEG, stream_id, wrapped).pack())
            decrypt_file(client, enc, out)

    with pytest.raises(DecryptionFailed):
        await trio.to_thread.run_sync(run)
    assert not out.exists()
