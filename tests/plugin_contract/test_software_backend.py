"""The built-in software custody plugin: conformance suite, root key file, hooks."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from pathlib import Path

import keybroker_softkeys
import pytest
import trio
from keybroker_softkeys import FileRootKey, RootKeyError, ScryptParams, SoftwareBackend

from broker.config import Config
from broker.errors import DecryptionFailed, InvalidArgument, InvalidState, Unavailable
from broker.keys import KeyType, VersionRef
from broker.testing import BackendConformance

# The cheapest scrypt cost the file format accepts keeps these tests quick.
FAST = ScryptParams(log2_n=14)
PASSPHRASE = "correct horse battery staple"

Change = Callable[[bytes], bytes]


@pytest.fixture(autouse=True)
def _no_ambient_passphrase(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(keybroker_softkeys.PASSPHRASE_ENV, raising=False)


class TestSoftwareBackend(BackendConformance):
    """The software backend passes the suite every backend plugin runs."""

    @pytest.fixture
    async def backend(self, tmp_path: Path) -> AsyncIterator[SoftwareBackend]:
        root = FileRootKey(tmp_path / "data" / "root.key")
        await root.open()
        backend = SoftwareBackend(root, limiter=trio.CapacityLimiter(2))
        await backend.open()
        try:
            yield backend
        finally:
            await backend.aclose()
            await root.aclose()


# --- the root key file --------------------------------------------------------


@pytest.fixture
def umask_zero() -> Iterator[None]:
    # With no umask, only the code's own mode choices protect the files.
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def config(tmp_path: Path, **changes: object) -> Config:
    data = tmp_path / "data"
    base = Config(data_dir=data, socket_path=data / "keybroker.sock")
    return replace(base, **changes)  # type: ignore[arg-type]


async def test_created_private(tmp_path: Path, umask_zero: None) -> None:
    path = tmp_path / "new" / "data" / "root.key"
    root = FileRootKey(path)
    await root.open()
    try:
        assert mode(path) == 0o600
        assert mode(path.parent) == 0o700
        assert path.read_bytes()[:4] == b"KBRK"
        # No temporary file is left behind.
        assert [p.name for p in path.parent.iterdir()] == ["root.key"]
    finally:
        await root.aclose()


async def test_reopen_reads_the_same_root(tmp_path: Path) -> None:
    path = tmp_path / "root.key"
    first = FileRootKey(path)
    await first.open()
    blob = await first.wrap(b"k" * 32, b"context")
    key_id = first.key_id
    await first.aclose()
    await first.aclose()  # idempotent

    second = FileRootKey(path)
    await second.open()
    try:
        assert second.key_id == key_id
        assert await second.unwrap(blob, b"context") == bytearray(b"k" * 32)
        with pytest.raises(DecryptionFailed):
            await second.unwrap(blob, b"another context")
    finally:
        await second.aclose()


async def test_a_new_file_is_a_new_root(tmp_path: Path) -> None:
    one = FileRootKey(tmp_path / "a" / "root.key")
    two = FileRootKey(tmp_path / "b" / "root.key")
    await one.open()
    await two.open()
    try:
        assert one.key_id != two.key_id
        blob = await one.wrap(b"material", b"c")
        with pytest.raises(DecryptionFailed):
            await two.unwrap(blob, b"c")
    finally:
        await one.aclose()
        await two.aclose()


async def test_closed_root_refuses_use(tmp_path: Path) -> None:
    root = FileRootKey(tmp_path / "root.key")
    with pytest.raises(InvalidState):
        await root.wrap(b"m", b"c")
    await root.open()
    await root.aclose()
    with pytest.raises(InvalidState):
        await root.unwrap(b"x" * 60, b"c")


async def test_sealed_with_passphrase_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "root.key"
    root = FileRootKey(path, passphrase=PASSPHRASE, scrypt=FAST)
    await root.open()
    blob = await root.wrap(b"material", b"c")
    await root.aclose()
    raw = path.read_bytes()
    assert raw[5] & 1  # the sealed flag
    assert PASSPHRASE.encode() not in raw

    # The KDF cost comes from the file, not from the opener's defaults.
    again = FileRootKey(path, passphrase=PASSPHRASE)
    await again.open()
    try:
        assert await again.unwrap(blob, b"c") == bytearray(b"material")
    finally:
        await again.aclose()


async def test_wrong_passphrase_is_refused_without_echo(tmp_path: Path) -> None:
    path = tmp_path / "root.key"
    root = FileRootKey(path, passphrase=PASSPHRASE, scrypt=FAST)
    await root.open()
    await root.aclose()
    wrong = "Tr0ub4dor&3-not-it"
    with pytest.raises(RootKeyError, match="wrong passphrase") as caught:
        await FileRootKey(path, passphrase=wrong).open()
    assert wrong not in str(caught.value)
    assert wrong not in repr(caught.value)
    assert PASSPHRASE not in str(caught.value)


async def test_sealed_file_needs_a_passphrase(tmp_path: Path) -> None:
    path = tmp_path / "root.key"
    root = FileRootKey(path, passphrase=PASSPHRASE, scrypt=FAST)
    await root.open()
    await root.aclose()
    with pytest.raises(RootKeyError, match="sealed under a passphrase, but none was given"):
        await FileRootKey(path).open()


async def test_plain_file_with_passphrase_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "root.key"
    root = FileRootKey(path)
    await root.open()
    await root.aclose()
    with pytest.raises(RootKeyError, match="not sealed, but a passphrase was given"):
        await FileRootKey(path, passphrase=PASSPHRASE).open()


def test_empty_passphrase_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty"):
        FileRootKey(tmp_path / "root.key", passphrase="")


async def _plain_file(tmp_path: Path) -> bytes:
    root = FileRootKey(tmp_path / "root.key")
    await root.open()
    await root.aclose()
    return (tmp_path / "root.key").read_bytes()


async def _sealed_file(tmp_path: Path) -> bytes:
    root = FileRootKey(tmp_path / "root.key", passphrase=PASSPHRASE, scrypt=FAST)
    await root.open()
    await root.aclose()
    return (tmp_path / "root.key").read_bytes()


def _flipped(raw: bytes, index: int) -> bytes:
    out = bytearray(raw)
    out[index] ^= 0x01
    return bytes(out)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda raw: raw[:-1], "truncated"),
        (lambda raw: raw[:30], "truncated"),
        (lambda raw: raw[:3], "truncated"),
        (lambda raw: raw + b"\x00", "trailing data"),
        (lambda raw: b"", "truncated"),
        (lambda raw: _flipped(raw, 30), "corrupt"),  # a root key byte
        (lambda raw: _flipped(raw, 10), "corrupt"),  # the root key id
        (lambda raw: _flipped(raw, len(raw) - 1), "corrupt"),  # the check value
        (lambda raw: b"XXXX" + raw[4:], "not a keybroker root key file"),
        (lambda raw: raw[:4] + b"\x02" + raw[5:], "unsupported format 2"),
        (lambda raw: raw[:5] + b"\x80" + raw[6:], "unknown flags"),
    ],
    ids=["cut-1", "cut-30", "cut-3", "extra", "empty", "key", "key-id", "check", "magic", "format", "flags"],
)
async def test_damaged_plain_file_is_refused(tmp_path: Path, change: Change, message: str) -> None:
    raw = await _plain_file(tmp_path)
    (tmp_path / "root.key").write_bytes(change(raw))
    with pytest.raises(RootKeyError, match=message):
        await FileRootKey(tmp_path / "root.key").open()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda raw: raw[:-1], "truncated"),
        (lambda raw: raw + b"\x00", "trailing data"),
        (lambda raw: _flipped(raw, 10), "wrong passphrase, or the file was modified"),  # root key id
        (lambda raw: _flipped(raw, 30), "wrong passphrase, or the file was modified"),  # salt
        (lambda raw: raw[:23] + b"\x0f" + raw[24:], "wrong passphrase, or the file was modified"),  # N
        (lambda raw: _flipped(raw, len(raw) - 20), "wrong passphrase, or the file was modified"),
        (lambda raw: raw[:23] + b"\x30" + raw[24:], "out-of-range scrypt parameters"),  # N = 2**48
        # Each parameter within its range, together 16 GiB and more than hashlib allows.
        (lambda raw: raw[:23] + b"\x16\x20\x10" + raw[26:], "out-of-range scrypt parameters"),
        (lambda raw: raw[:22] + b"\x07" + raw[23:], "unknown KDF 7"),
    ],
    ids=["cut-1", "extra-byte", "key-id", "salt", "cost", "sealed-key", "huge-cost", "huge-memory", "kdf"],
)
async def test_damaged_sealed_file_is_refused(tmp_path: Path, change: Change, message: str) -> None:
    raw = await _sealed_file(tmp_path)
    (tmp_path / "root.key").write_bytes(change(raw))
    with pytest.raises(RootKeyError, match=message):
        await FileRootKey(tmp_path / "root.key", passphrase=PASSPHRASE).open()


async def test_kdf_failure_is_a_root_key_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    await _sealed_file(tmp_path)

    def exhausted(*args: object, **kwargs: object) -> bytes:
        raise MemoryError

    monkeypatch.setattr(hashlib, "scrypt", exhausted)
    with pytest.raises(RootKeyError, match="cannot derive the key sealing root key file"):
        await FileRootKey(tmp_path / "root.key", passphrase=PASSPHRASE).open()


def test_params_needing_more_than_a_gibibyte_are_refused() -> None:
    ScryptParams(log2_n=19, r=8, p=1)  # 1 GiB
    with pytest.raises(ValueError, match="at most 1 GiB"):
        ScryptParams(log2_n=20, r=8, p=1)


async def test_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    await _plain_file(tmp_path)
    path = tmp_path / "root.key"
    path.chmod(0o640)
    with pytest.raises(RootKeyError, match="chmod 600"):
        await FileRootKey(path).open()


async def test_file_of_another_user_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    await _plain_file(tmp_path)
    path = tmp_path / "root.key"
    # As if the broker ran as another user than the file's owner (no chown needed).
    other = path.stat().st_uid + 1
    monkeypatch.setattr(os, "geteuid", lambda: other)
    with pytest.raises(RootKeyError, match=f"owned by uid {other - 1}, not by this broker's user"):
        await FileRootKey(path).open()


@pytest.mark.parametrize("target", ["a valid root key file", "nothing"])
async def test_symbolic_link_is_refused(tmp_path: Path, target: str) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if target != "nothing":
        await _plain_file(elsewhere)
    link = tmp_path / "data" / "root.key"
    link.parent.mkdir(mode=0o700)
    link.symlink_to(elsewhere / "root.key")
    with pytest.raises(RootKeyError, match="is a symbolic link"):
        await FileRootKey(link).open()


async def test_racing_creators_agree(tmp_path: Path) -> None:
    # Both derive their sealing key in a thread, so both reach the write; the
    # loser must adopt the winner's file instead of replacing it.
    path = tmp_path / "root.key"
    roots = [FileRootKey(path, passphrase=PASSPHRASE, scrypt=FAST) for _ in range(2)]
    async with trio.open_nursery() as nursery:
        for root in roots:
            nursery.start_soon(root.open)
    try:
        assert roots[0].key_id == roots[1].key_id
        blob = await roots[0].wrap(b"m", b"c")
        assert await roots[1].unwrap(blob, b"c") == bytearray(b"m")
    finally:
        for root in roots:
            await root.aclose()


async def test_concurrent_open_of_one_root(tmp_path: Path) -> None:
    root = FileRootKey(tmp_path / "root.key", passphrase=PASSPHRASE, scrypt=FAST)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(root.open)
        nursery.start_soon(root.open)
    try:
        blob = await root.wrap(b"m", b"c")
        assert await root.unwrap(blob, b"c") == bytearray(b"m")
    finally:
        await root.aclose()


# --- context binding and secrecy of reprs ------------------------------------------


@pytest.fixture
async def opened(tmp_path: Path) -> AsyncIterator[tuple[FileRootKey, SoftwareBackend]]:
    root = FileRootKey(tmp_path / "data" / "root.key")
    await root.open()
    backend = SoftwareBackend(root)
    await backend.open()
    try:
        yield root, backend
    finally:
        await backend.aclose()
        await root.aclose()


async def test_blob_swapped_between_versions_is_refused(
    opened: tuple[FileRootKey, SoftwareBackend],
) -> None:
    _, backend = opened
    key_id, other_id = os.urandom(16), os.urandom(16)
    one = VersionRef(key_id, 1, KeyType.AES256_GCM, await backend.generate(key_id, 1, KeyType.AES256_GCM))
    swaps = [
        replace(one, version=2),  # the blob of version 1 handed in as version 2
        replace(one, key_id=other_id),  # ... as another key's version 1
        replace(one, key_type=KeyType.HMAC_SHA256),  # ... as another type
        replace(one, material=one.material[:-1]),  # truncated
        replace(one, material=one.material[:40] + bytes([one.material[40] ^ 1]) + one.material[41:]),
    ]
    for swapped in swaps:
        with pytest.raises(Unavailable, match="does not unwrap under the root key"):
            if swapped.key_type is KeyType.HMAC_SHA256:
                await backend.mac(swapped, b"m")
            else:
                await backend.encrypt(swapped, [b"m"], b"")
    assert len(await backend.encrypt(one, [b"m"], b"")) == 1


async def test_signing_blob_swapped_between_types_is_refused(
    opened: tuple[FileRootKey, SoftwareBackend],
) -> None:
    _, backend = opened
    key_id = os.urandom(16)
    ed = VersionRef(key_id, 1, KeyType.ED25519, await backend.generate(key_id, 1, KeyType.ED25519))
    with pytest.raises(Unavailable):
        await backend.sign(replace(ed, key_type=KeyType.ECDSA_P256), b"m", prehashed=False)


async def test_reprs_hold_no_key_material(
    tmp_path: Path, opened: tuple[FileRootKey, SoftwareBackend]
) -> None:
    root, backend = opened
    raw = (tmp_path / "data" / "root.key").read_bytes()
    root_key = raw[22:54]
    key_id = os.urandom(16)
    refs = [
        VersionRef(key_id, 1, t, await backend.generate(key_id, 1, t))
        for t in (KeyType.AES256_GCM, KeyType.HMAC_SHA256, KeyType.ECDSA_P256)
    ]
    for ref in refs:
        backend.forget(key_id)
        if ref.key_type is KeyType.AES256_GCM:
            await backend.encrypt(ref, [b"x"], b"")
        elif ref.key_type is KeyType.HMAC_SHA256:
            await backend.mac(ref, b"x")
        else:
            await backend.sign(ref, b"x", prehashed=False)
    texts = [repr(root), str(root), repr(backend), str(backend), *map(repr, refs)]
    secrets = [root_key, *(ref.material for ref in refs)]
    for text in texts:
        for secret in secrets:
            for form in (secret.hex(), repr(secret)[2:-1], secret[:8].hex()):
                assert form not in text


# --- hooks -----------------------------------------------------------------------


def test_root_hook_ignores_other_roots(tmp_path: Path) -> None:
    assert keybroker_softkeys.kb_root_key(config=config(tmp_path, root="pkcs11")) is None


async def test_root_hook_plain_by_default(tmp_path: Path) -> None:
    root = keybroker_softkeys.kb_root_key(config=config(tmp_path))
    assert isinstance(root, FileRootKey)
    assert root.path == tmp_path / "data" / "root.key"
    await root.open()
    await root.aclose()
    assert root.path.read_bytes()[5] == 0


async def test_root_hook_passphrase_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(keybroker_softkeys.PASSPHRASE_ENV, PASSPHRASE)
    root = keybroker_softkeys.kb_root_key(config=config(tmp_path))
    assert isinstance(root, FileRootKey)
    await root.open()
    await root.aclose()
    assert root.path.read_bytes()[5] & 1
    assert PASSPHRASE not in repr(root)

    monkeypatch.setenv(keybroker_softkeys.PASSPHRASE_ENV, "not the passphrase")
    wrong = keybroker_softkeys.kb_root_key(config=config(tmp_path))
    assert wrong is not None
    with pytest.raises(RootKeyError, match="wrong passphrase") as caught:
        await wrong.open()
    assert "not the passphrase" not in str(caught.value)

    monkeypatch.delenv(keybroker_softkeys.PASSPHRASE_ENV)
    missing = keybroker_softkeys.kb_root_key(config=config(tmp_path))
    assert missing is not None
    with pytest.raises(RootKeyError, match="none was given"):
        await missing.open()


async def test_root_hook_passphrase_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret_file = tmp_path / "passphrase"
    secret_file.write_text(PASSPHRASE + "\n")
    sealed = config(tmp_path, passphrase_file=secret_file)
    root = keybroker_softkeys.kb_root_key(config=sealed)
    assert root is not None
    await root.open()
    blob = await root.wrap(b"m", b"c")
    await root.aclose()

    # The trailing newline was not part of the passphrase: the env var without
    # it opens the same file.
    monkeypatch.setenv(keybroker_softkeys.PASSPHRASE_ENV, PASSPHRASE)
    again = keybroker_softkeys.kb_root_key(config=config(tmp_path))
    assert again is not None
    await again.open()
    try:
        assert await again.unwrap(blob, b"c") == bytearray(b"m")
    finally:
        await again.aclose()


def test_root_hook_bad_passphrase_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InvalidArgument, match="cannot be read"):
        keybroker_softkeys.kb_root_key(config=config(tmp_path, passphrase_file=tmp_path / "absent"))
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(InvalidArgument, match="is empty"):
        keybroker_softkeys.kb_root_key(config=config(tmp_path, passphrase_file=empty))
    monkeypatch.setenv(keybroker_softkeys.PASSPHRASE_ENV, "")
    with pytest.raises(InvalidArgument, match="set but empty"):
        keybroker_softkeys.kb_root_key(config=config(tmp_path))


def test_backends_hook(tmp_path: Path) -> None:
    root = FileRootKey(tmp_path / "root.key")
    [backend] = keybroker_softkeys.kb_backends(config=config(tmp_path), root=root)
    assert isinstance(backend, SoftwareBackend)
    assert backend.protection == "software"
    for key_type in KeyType:
        backend.check_type(key_type)

    tuned = config(tmp_path, plugins={"software": {"threads": 3}})
    assert len(keybroker_softkeys.kb_backends(config=tuned, root=root)) == 1
    for bad in ({"threads": 0}, {"threads": "2"}, {"thread": 2}):
        with pytest.raises(InvalidArgument):
            keybroker_softkeys.kb_backends(config=config(tmp_path, plugins={"software": bad}), root=root)


# --- work placement ------------------------------------------------------------------


async def test_small_batches_stay_inline_and_large_ones_split(
    opened: tuple[FileRootKey, SoftwareBackend], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, backend = opened
    key_id = os.urandom(16)
    ref = VersionRef(key_id, 1, KeyType.AES256_GCM, await backend.generate(key_id, 1, KeyType.AES256_GCM))
    hops: list[int] = []
    real = trio.to_thread.run_sync

    async def counting(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        hops.append(len(args[0]) if args else 0)
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(trio.to_thread, "run_sync", counting)
    await backend.encrypt(ref, [b"small"] * 10, b"")
    assert hops == []
    big = [bytes(4096)] * 2048  # 8 MiB: worth two threads
    aads = [b"%d" % i for i in range(len(big))]
    sealed = await backend.encrypt(ref, big, aads)
    assert sorted(hops) == [1024, 1024]
    hops.clear()
    assert await backend.decrypt(ref, sealed, aads) == big
    assert len(hops) == 2
    hops.clear()
    await backend.encrypt(ref, [b"x"] * 500, b"")  # past the inline bound, one chunk
    assert hops == [500]
