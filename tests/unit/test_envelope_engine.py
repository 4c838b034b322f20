"""The GCM engine behind broker._native and the chunked batch plumbing.

broker._native drives OpenSSL's AES-256-GCM through the provider's cipher
functions when the start-up comparison with EVP passes, and through EVP
otherwise (forced with KEYBROKER_GCM_EVP=1): both must produce envelopes that
`cryptography` opens, and reject tampering. Batches larger than a chunk are
joined and sent to C chunk by chunk; results must not depend on where the
chunk boundaries fall.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from broker import envelope
from broker._native import lib
from broker.envelope import HEADER_LEN, KeySlot, rewrap_batch

ROOT = Path(__file__).resolve().parents[2]
KEY = bytes(range(100, 132))
KEY2 = bytes(range(200, 232))
KID = bytes.fromhex("00112233445566778899aabbccddeeff")


@pytest.fixture
def slots() -> Iterator[tuple[KeySlot, KeySlot]]:
    a, b = KeySlot(KEY, KID, 1), KeySlot(KEY2, KID, 2)
    yield a, b
    a.close()
    b.close()


def _pyca_open(key: bytes, env: bytes, aad: bytes) -> bytes:
    return AESGCM(key).decrypt(env[24:36], env[36:], env[:HEADER_LEN] + aad)


def test_default_engine_is_the_provider_path() -> None:
    # OpenSSL's default provider hands out its cipher functions; if this ever
    # fails, the EVP path is in use (correct, only slower).
    assert lib.kb_gcm_direct() == 1


_EVP_SCRIPT = textwrap.dedent(
    """
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from broker._native import lib
    from broker.envelope import KeySlot, rewrap_batch
    assert lib.kb_gcm_direct() == 0
    key, key2 = bytes(range(32)), bytes(range(32, 64))
    a, b = KeySlot(key, bytes(16), 1), KeySlot(key2, bytes(16), 2)
    items = [bytes([i % 256]) * (i % 50) for i in range(300)]
    envs = a.seal_batch(items, b"ad")
    assert [AESGCM(key).decrypt(e[24:36], e[36:], e[:36] + b"ad") for e in envs] == items
    assert a.open_batch(envs, b"ad") == items
    bad = bytearray(envs[7]); bad[-1] ^= 1
    assert a.open_batch([bytes(bad), envs[8]], b"ad") == [None, items[8]]
    assert b.open_batch(rewrap_batch(a, b, envs, b"ad"), b"ad") == items
    print("ok")
    """
)


def test_evp_engine_round_trips_and_interoperates() -> None:
    env = dict(os.environ, KEYBROKER_GCM_EVP="1")
    proc = subprocess.run(
        [sys.executable, "-c", _EVP_SCRIPT],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_chunk_boundaries_do_not_change_results(
    monkeypatch: pytest.MonkeyPatch, slots: tuple[KeySlot, KeySlot], chunk: int
) -> None:
    a, b = slots
    monkeypatch.setattr(envelope, "_CHUNK_ITEMS", chunk)
    items = [os.urandom(i % 5 * 9) for i in range(23)]  # mixed lengths, some empty
    aads = [os.urandom(i % 3) for i in range(23)]  # per-item aad, mixed lengths
    envs = a.seal_batch(items, aads)
    assert [len(e) for e in envs] == [len(x) + 52 for x in items]
    assert [_pyca_open(KEY, e, d) for e, d in zip(envs, aads, strict=True)] == items
    tampered = list(envs)
    for i in (0, 5, 22):
        bad = bytearray(tampered[i])
        bad[-1] ^= 1
        tampered[i] = bytes(bad)
    tampered[9] = b"short"
    expect = [None if i in (0, 5, 9, 22) else x for i, x in enumerate(items)]
    assert a.open_batch(tampered, aads) == expect
    moved = rewrap_batch(a, b, tampered, aads)
    assert [m is None for m in moved] == [x is None for x in expect]
    assert b.open_batch([m or b"" for m in moved], aads) == expect
    uniform = [os.urandom(32) for _ in range(20)]
    envs = a.seal_batch(uniform, b"shared")
    envs[13] = envs[12]  # a copy of item 12 opens to item 12's plaintext
    envs[12] = envs[12][:-1] + bytes([envs[12][-1] ^ 0x80])
    got = a.open_batch(envs, b"shared")
    assert got[:12] == uniform[:12]
    assert got[12] is None
    assert got[13] == uniform[12]
    assert got[14:] == uniform[14:]


def test_batch_over_several_real_chunks(slots: tuple[KeySlot, KeySlot]) -> None:
    a, b = slots
    n = 2 * envelope._CHUNK_ITEMS + 5
    items = [i.to_bytes(4, "big") * 8 for i in range(n)]
    envs = a.seal_batch(items, limit=n)
    assert a.uses == n
    bad = n - 3  # in the last chunk
    envs[bad] = envs[bad][:40] + bytes([envs[bad][40] ^ 1]) + envs[bad][41:]
    opened = a.open_batch(envs, limit=n)
    assert opened[bad] is None
    assert opened[:bad] == items[:bad]
    assert opened[bad + 1 :] == items[bad + 1 :]
    moved = rewrap_batch(a, b, envs, limit=n)
    assert moved[bad] is None
    assert _pyca_open(KEY2, moved[0] or b"", b"") == items[0]
    assert _pyca_open(KEY2, moved[-1] or b"", b"") == items[-1]


def test_non_bytes_item_in_a_later_chunk_raises(
    monkeypatch: pytest.MonkeyPatch, slots: tuple[KeySlot, KeySlot]
) -> None:
    a, _ = slots
    monkeypatch.setattr(envelope, "_CHUNK_ITEMS", 4)
    items: list[object] = [b"x" * 8] * 10
    items[9] = "not bytes"
    with pytest.raises(TypeError):
        a.seal_batch(items)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        a.open_batch(items)  # type: ignore[arg-type]
