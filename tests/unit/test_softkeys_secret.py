"""keybroker_softkeys._secret: randomness read straight into a buffer from a kept descriptor."""

from __future__ import annotations

import os
from pathlib import Path

from keybroker_softkeys import _secret
from keybroker_softkeys._secret import random_bytearray, zero


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_random_bytes_come_in_a_fresh_buffer() -> None:
    first, second = random_bytearray(32), random_bytearray(32)
    assert isinstance(first, bytearray) and len(first) == 32 and first != second
    assert len(random_bytearray(0)) == 0 and len(random_bytearray(100_000)) == 100_000
    zero(first)
    assert first == bytearray(32)


def test_the_device_is_opened_once() -> None:
    random_bytearray(32)
    before = _open_fds()
    for _ in range(50):
        random_bytearray(32)
    assert _open_fds() == before


def test_a_descriptor_reused_for_another_file_is_never_read(tmp_path: Path) -> None:
    random_bytearray(32)
    kept = _secret._urandom.fd()
    assert kept is not None
    # Someone closes our descriptor and the number is reused for a file of zeros.
    filler = tmp_path / "zeros"
    filler.write_bytes(bytes(4096))
    opened = os.open(filler, os.O_RDONLY)
    os.dup2(opened, kept)  # closes ours; the number now names the file
    os.close(opened)
    try:
        assert random_bytearray(64) != bytearray(64)
        assert os.lseek(kept, 0, os.SEEK_CUR) == 0  # the file was not read
        assert _secret._urandom.fd() not in (None, kept)
    finally:
        os.close(kept)
