"""Backup archives: every (or some) key's metadata and material, sealed as one whole.

A backup must restore into a *fresh* data directory, whose root key differs
from the old one, so material cannot travel wrapped under the old root: each
software version's material is exported (:meth:`Backend.export_material`)
and sealed under a random 256-bit *backup data key*, which is itself
protected for the restorer -- RSA-OAEP-SHA256 to a recipient public key
(RSA-3072+), or a key derived from a passphrase with scrypt.

Archive format 1::

    0    4   magic "KBBK"
    4    1   format = 1
    5    1   protector: 1 = RSA-OAEP-SHA256 to a recipient, 2 = scrypt passphrase
    6    4   segment size (uint32, big-endian)
    10   16  archive id (random)
    26   8   created_at (uint64, Unix seconds)
    34   2   length P of the protector block
    36   P   protector block
               recipient:  SHA-256 of the recipient's DER public key (32)
                           || RSA-OAEP-SHA256(recipient, backup data key)
               passphrase: log2 N (1) || r (1) || p (1) || salt (16)
                           || AES-KWP(scrypt(passphrase, salt), backup data key)
    36+P     segments of the sealed payload, exactly as a stream's
             (docs/distribution.md, broker.stream), with the SHA-256 of the
             36+P header bytes bound into every segment

The payload is MessagePack: a manifest map, then one map per key (every
field of the key and its versions). A version's material is either
``material`` (raw, for keys whose custody lets it out) or ``ref`` (the
backend's opaque blob, for HSM keys: the material itself stays in the token,
and the archive only lets a broker configured with the same token find it).

Authentication is of the archive as a whole: every segment binds the header,
its counter and the last flag, so any flipped byte, reordering or truncation
fails, and :func:`open_archive` verifies every segment before a single key is
returned -- a tampered archive restores nothing.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import IO, TYPE_CHECKING, Any, Final

import msgpack
import trio
from cryptography.hazmat.primitives import hashes, keywrap, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from .envelope import KeySlot
from .errors import AlreadyExists, DecryptionFailed, InvalidArgument
from .kdf import MAX_SCRYPT_MEMORY, scrypt, scrypt_memory
from .keys import Key, KeyType, check_name
from .lifecycle import use_limit
from .store import key_columns, key_from_columns
from .stream import (
    DEFAULT_SEGMENT_SIZE,
    MAX_SEGMENT_SIZE,
    MIN_SEGMENT_SIZE,
    SEGMENT_OVERHEAD,
    Progress,
    open_segments,
    seal_segments,
)
from .transfer import load_recipient

if TYPE_CHECKING:
    from .service import KeyService

__all__ = [
    "MIN_PASSPHRASE_LEN",
    "BackupSummary",
    "Passphrase",
    "Recipient",
    "RestoreSummary",
    "ScryptCost",
    "collect_keys",
    "create_backup",
    "open_archive",
    "restore_keys",
]

MAGIC: Final = b"KBBK"
FORMAT: Final = 1
PROTECTOR_RSA: Final = 1
PROTECTOR_SCRYPT: Final = 2
DATA_KEY_LEN: Final = 32
SALT_LEN: Final = 16
# An archive is carried and stored away from the broker, where its
# passphrase meets offline guessing bounded only by scrypt's cost: a short
# one would be the weakest link.
MIN_PASSPHRASE_LEN: Final = 12
# Every key id is 16 random bytes; envelopes and stream headers carry it as such.
KEY_ID_LEN: Final = 16
_FIXED = struct.Struct(">4sBBI16sQH")
PAGE = 500


def _oaep() -> padding.OAEP:
    return padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


@dataclass(frozen=True, slots=True)
class ScryptCost:
    """scrypt parameters: RFC 7914's interactive-plus tier by default (32 MiB, ~0.1 s)."""

    log2_n: int = 15
    r: int = 8
    p: int = 1

    def __post_init__(self) -> None:
        # A crafted archive chooses these: each within range is not enough
        # (N = 2**20, r = 16, p = 4 would need 10 GiB), so the memory they
        # need together is bounded too (1 GiB, broker.kdf).
        in_range = 10 <= self.log2_n <= 20 and 1 <= self.r <= 16 and 1 <= self.p <= 4
        if not in_range or scrypt_memory(self.log2_n, self.r, self.p) > MAX_SCRYPT_MEMORY:
            raise InvalidArgument("scrypt parameters out of range")

    def derive(self, passphrase: str, salt: bytes) -> bytes:
        """The 32-byte key-encryption key for ``passphrase`` and ``salt``.

        Raises:
            ValueError: the KDF failed (out of memory).
        """
        return scrypt(
            passphrase.encode("utf-8"), salt, log2_n=self.log2_n, r=self.r, p=self.p, length=DATA_KEY_LEN
        )


@dataclass(frozen=True, slots=True)
class Recipient:
    """Protect the backup data key for the holder of an RSA-3072+ private key."""

    public_key: rsa.RSAPublicKey

    @classmethod
    def from_pem(cls, pem: str | bytes) -> Recipient:
        return cls(load_recipient(pem, "recipient_public_key"))


@dataclass(frozen=True, slots=True)
class Passphrase:
    """Protect the backup data key with a passphrase (scrypt)."""

    passphrase: str = field(repr=False)
    cost: ScryptCost = field(default_factory=ScryptCost)

    def __post_init__(self) -> None:
        if not isinstance(self.passphrase, str):
            raise InvalidArgument("passphrase: must be a string", {"field": "passphrase"})
        if len(self.passphrase) < MIN_PASSPHRASE_LEN:
            raise InvalidArgument(
                f"passphrase: must be at least {MIN_PASSPHRASE_LEN} characters", {"field": "passphrase"}
            )


Protector = Recipient | Passphrase


def _fingerprint(public: rsa.RSAPublicKey) -> bytes:
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).digest()


def _protect(protector: Protector, data_key: bytes) -> tuple[int, bytes]:
    if isinstance(protector, Recipient):
        public = protector.public_key
        return PROTECTOR_RSA, _fingerprint(public) + public.encrypt(data_key, _oaep())
    salt = os.urandom(SALT_LEN)
    cost = protector.cost
    kek = protector.cost.derive(protector.passphrase, salt)
    wrapped = keywrap.aes_key_wrap_with_padding(kek, data_key)
    return PROTECTOR_SCRYPT, bytes([cost.log2_n, cost.r, cost.p]) + salt + wrapped


def _recover(kind: int, block: bytes, unlock: rsa.RSAPrivateKey | str) -> bytearray:
    """The backup data key from the protector block."""
    if kind == PROTECTOR_RSA:
        if not isinstance(unlock, rsa.RSAPrivateKey):
            raise InvalidArgument("this archive is protected for a recipient key: give its private key")
        if block[:32] != _fingerprint(unlock.public_key()):
            raise InvalidArgument("this archive was made for another recipient key")
        try:
            key = bytearray(unlock.decrypt(block[32:], _oaep()))
        except ValueError:
            raise DecryptionFailed("the backup archive is altered or damaged") from None
    elif kind == PROTECTOR_SCRYPT:
        if not isinstance(unlock, str):
            raise InvalidArgument("this archive is protected by a passphrase: give the passphrase")
        if len(block) < 3 + SALT_LEN + 8:
            raise DecryptionFailed("the backup archive is altered or damaged")
        try:
            cost = ScryptCost(block[0], block[1], block[2])
        except InvalidArgument:
            raise DecryptionFailed("the backup archive is altered or damaged") from None
        try:
            kek = cost.derive(unlock, block[3 : 3 + SALT_LEN])
        except ValueError:
            raise DecryptionFailed("the backup archive's passphrase key cannot be derived") from None
        try:
            key = bytearray(keywrap.aes_key_unwrap_with_padding(kek, block[3 + SALT_LEN :]))
        except keywrap.InvalidUnwrap:
            raise DecryptionFailed("wrong passphrase, or the backup archive is altered") from None
    else:
        raise DecryptionFailed("not a keybroker backup archive (unknown protector)")
    if len(key) != DATA_KEY_LEN:
        raise DecryptionFailed("the backup archive is altered or damaged")
    return key


# --- key records ---------------------------------------------------------------------


def _key_record(key: Key, materials: dict[int, bytearray]) -> dict[str, Any]:
    versions = []
    for v in key.versions:
        entry: dict[str, Any] = {
            "number": v.number,
            "state": v.state.value,
            "created_at": v.created_at,
            "uses": v.uses,
            "origin": v.origin,
        }
        exported = materials.get(v.number)
        if exported is not None:
            # msgpack packs a bytearray as bin without another copy in Python.
            entry["material"] = exported
        elif v.material:
            entry["ref"] = v.material
        versions.append(entry)
    record = key_columns(key)
    del record["revision"]  # a store's concurrency token: restored keys start afresh
    record["versions"] = versions
    return record


@dataclass(frozen=True, slots=True)
class ArchivedKey:
    """One key as the archive holds it: the key (material empty) and per-version contents."""

    key: Key
    # version -> raw material (software custody) ...
    materials: dict[int, bytes] = field(repr=False)
    # ... or the backend's opaque reference (HSM: material stays in the token).
    references: dict[int, bytes] = field(repr=False)

    @property
    def by_reference(self) -> bool:
        return bool(self.references)


def _key_from_record(record: dict[str, Any]) -> ArchivedKey:
    try:
        materials: dict[int, bytes] = {}
        references: dict[int, bytes] = {}
        for v in record["versions"]:
            number = int(v["number"])
            if "material" in v:
                materials[number] = bytes(v["material"])
            elif "ref" in v:
                references[number] = bytes(v["ref"])
        key = key_from_columns(
            {**record, "revision": 1}, ({**v, "material": b""} for v in record["versions"])
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        # Authenticated yet malformed: written by a different (newer) format.
        raise InvalidArgument("the backup archive holds a key record this keybroker cannot read") from None
    return ArchivedKey(key, materials, references)


def _record_problem(key: Key, names: set[str], ids: set[bytes]) -> str | None:
    """What makes ``key`` (its name already checked) unfit to restore after ``names``/``ids``, or None."""
    if len(key.id) != KEY_ID_LEN:
        return f"a key id that is not {KEY_ID_LEN} bytes"
    numbers = [v.number for v in key.versions]
    if len(set(numbers)) != len(numbers):
        return "duplicate version numbers"
    if key.primary_version not in numbers:
        return f"primary version {key.primary_version}, which it does not hold"
    # key.update's rule (destroyed versions below it may be gone from a key).
    if not 1 <= key.min_decrypt_version <= key.primary_version:
        return f"min_decrypt_version {key.min_decrypt_version} outside 1 .. its primary version"
    if key.name in names:
        return "the name of an earlier record"
    if key.id in ids:
        return "the key id of an earlier record"
    return None


def _check_records(keys: Sequence[ArchivedKey]) -> None:
    """Refuse the archive unless every record could be a key of this broker, each name and id once.

    Authentication proves only who could make an archive -- for a recipient
    archive, anyone with the public key -- so each record must meet the
    rules the broker keeps for its own keys before the store sees any.

    Raises:
        InvalidArgument: naming the first bad record (by position, and by
            name when the name is valid) and its problem; never its material.
    """
    names: set[str] = set()
    ids: set[bytes] = set()
    for index, item in enumerate(keys, start=1):
        key = item.key
        try:
            check_name(key.name)
        except InvalidArgument:
            raise _bad_record(index, "has an invalid key name") from None
        problem = _record_problem(key, names, ids)
        if problem is not None:
            raise _bad_record(index, f"({key.name!r}) has {problem}")
        names.add(key.name)
        ids.add(key.id)


def _bad_record(index: int, problem: str) -> InvalidArgument:
    return InvalidArgument(
        f"the backup archive's key record {index} {problem}; nothing was restored", {"record": index}
    )


# --- creating ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BackupSummary:
    keys: int
    by_reference: tuple[str, ...]
    archive_bytes: int


async def collect_keys(service: KeyService, names: Sequence[str] | None) -> list[Key]:
    """The keys to back up: the named ones (each must exist), or every key.

    Raises:
        NotFound: a named key does not exist.
    """
    if names is not None:
        return [await service.get(name) for name in dict.fromkeys(names)]
    found: list[Key] = []
    after: str | None = None
    while True:
        page = await service.list_keys(prefix="", state=None, limit=PAGE, after=after)
        found += page
        if len(page) < PAGE:
            return found
        after = page[-1].name


async def create_backup(
    service: KeyService,
    keys: Sequence[Key],
    protector: Protector,
    dst: IO[bytes],
    *,
    node: str = "",
    segment_size: int = DEFAULT_SEGMENT_SIZE,
    progress: Progress | None = None,
    now: int | None = None,
) -> BackupSummary:
    """Write an archive of ``keys`` to ``dst``.

    Args:
        service: exports material through its backends.
        keys: what to back up.
        protector: who can open it (recipient public key, or passphrase).
        dst: a binary file object.
        node: the broker's node name, recorded in the manifest.
        segment_size: payload bytes per sealed segment.
        progress: called with (keys done, keys in all) while collecting.
        now: creation time (default: the service's clock).

    Returns:
        The number of keys, the names of keys carried by reference, and the
        archive size.

    Resource handling:
        The payload (raw material included) is built in memory and zeroed as
        soon as it is sealed.
    """
    created = service.now() if now is None else now
    data_key = bytearray(os.urandom(DATA_KEY_LEN))
    # scrypt (~0.1 s) and RSA must not stall the event loop.
    kind, block = await trio.to_thread.run_sync(_protect, protector, bytes(data_key))
    archive_id = os.urandom(16)
    header = _FIXED.pack(MAGIC, FORMAT, kind, segment_size, archive_id, created, len(block)) + block
    payload = io.BytesIO()
    packer = msgpack.Packer(use_bin_type=True)
    payload.write(packer.pack({"format": FORMAT, "created_at": created, "node": node, "keys": len(keys)}))
    by_reference: list[str] = []
    for index, key in enumerate(keys):
        materials = await _export_versions(service, key)
        if materials is None:
            by_reference.append(key.name)
        try:
            payload.write(packer.pack(_key_record(key, materials or {})))
        finally:
            for raw in (materials or {}).values():
                raw[:] = bytes(len(raw))
        if progress is not None:
            progress(index + 1, len(keys))
    dst.write(header)
    payload.seek(0)
    try:
        with KeySlot(data_key, archive_id, 0) as slot:
            digest = hashlib.sha256(header).digest()
            sealed = await trio.to_thread.run_sync(
                lambda: seal_segments(slot, digest, segment_size, payload, dst)
            )
    finally:
        view = payload.getbuffer()
        view[:] = bytes(len(view))
        view.release()
    segments = max(1, -(-sealed // segment_size))
    return BackupSummary(len(keys), tuple(by_reference), len(header) + sealed + segments * SEGMENT_OVERHEAD)


async def _export_versions(service: KeyService, key: Key) -> dict[int, bytearray] | None:
    """Each live version's raw material, or None when the key's custody keeps it (by reference)."""
    live = [v for v in key.versions if v.material]
    export = getattr(service.backends.get(key.protection), "export_material", None)
    if not live:
        return {}
    if export is None:
        return None
    materials: dict[int, bytearray] = {}
    for version in live:
        try:
            materials[version.number] = await export(key.ref(version.number))
        except InvalidArgument:
            # This custody keeps its material (an HSM): carry references only.
            for raw in materials.values():
                raw[:] = bytes(len(raw))
            return None
    return materials


# --- restoring -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Archive:
    """A verified, decoded archive."""

    created_at: int
    node: str
    keys: list[ArchivedKey] = field(repr=False)


def open_archive(src: IO[bytes], unlock: rsa.RSAPrivateKey | str) -> Archive:
    """Verify and decode a whole archive. Nothing is trusted before every segment checks out.

    Args:
        src: the archive.
        unlock: the recipient's RSA private key, or the passphrase.

    Raises:
        DecryptionFailed: altered, truncated or extended anywhere, or the wrong passphrase.
        InvalidArgument: the wrong kind of unlock, another recipient's archive,
            a format this keybroker cannot read, or a key record the broker
            would not hold (an invalid name, duplicate version numbers, a
            primary or min_decrypt version out of place, a name or id twice).
    """
    fixed = src.read(_FIXED.size)
    if len(fixed) != _FIXED.size:
        raise DecryptionFailed("not a keybroker backup archive (too short)")
    magic, fmt, kind, segment_size, archive_id, _created, block_len = _FIXED.unpack(fixed)
    if magic != MAGIC:
        raise DecryptionFailed("not a keybroker backup archive")
    if fmt != FORMAT:
        raise DecryptionFailed(f"unknown backup archive format {fmt}")
    if not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
        # The header is authenticated only once a segment opens, and this
        # size sizes every read: a crafted one must not ask for gigabytes.
        raise DecryptionFailed("the backup archive is altered or damaged (segment size out of range)")
    block = src.read(block_len)
    if len(block) != block_len:
        raise DecryptionFailed("the backup archive is truncated")
    header = fixed + block
    data_key = _recover(kind, block, unlock)
    plain = io.BytesIO()
    try:
        with KeySlot(data_key, archive_id, 0) as slot:
            open_segments(slot, hashlib.sha256(header).digest(), segment_size, src, plain)
    except DecryptionFailed:
        _wipe(plain)
        raise DecryptionFailed("the backup archive is altered, truncated or damaged") from None
    except InvalidArgument:
        _wipe(plain)
        raise DecryptionFailed("the backup archive is altered or damaged") from None
    try:
        unpacker = msgpack.Unpacker(io.BytesIO(plain.getbuffer()), raw=False, strict_map_key=False)
        manifest = next(unpacker)
        keys = [_key_from_record(record) for record in unpacker]
    except (StopIteration, ValueError, msgpack.UnpackException):
        raise InvalidArgument("the backup archive's contents cannot be read") from None
    finally:
        _wipe(plain)
    if not isinstance(manifest, dict) or manifest.get("keys") != len(keys):
        raise InvalidArgument("the backup archive's manifest does not match its contents")
    _check_records(keys)
    return Archive(int(manifest.get("created_at", 0)), str(manifest.get("node", "")), keys)


def _wipe(buffer: io.BytesIO) -> None:
    try:
        view = buffer.getbuffer()
    except BufferError:
        return
    view[:] = bytes(len(view))
    view.release()


@dataclass(frozen=True, slots=True)
class RestoreSummary:
    restored: tuple[str, ...]
    # Keys held by reference (HSM) whose custody is not configured here.
    skipped: tuple[str, ...]


def _restored_uses(key: Key, archived: int) -> int:
    """A restored version's use count.

    An aes256-gcm version may have sealed more since the backup than the
    archive counts, each with a random nonce; so it comes back used up to
    its limit, and the first encryption after the restore rotates the key
    (usage-based rotation), never drawing more nonces under it.
    """
    limit = use_limit(key) if key.type is KeyType.AES256_GCM else None
    return archived if limit is None else max(archived, limit)


async def restore_keys(
    service: KeyService, archive: Archive, *, progress: Callable[[int, int], None] | None = None
) -> RestoreSummary:
    """Bring back every key of a verified archive, with the same ids, versions, states and metadata.

    Each software version's material is handed to the backend's
    ``import_material`` (wrapping it under this broker's root key). A key
    held by reference is restored only when a backend of its protection is
    configured (the same token, which still holds the material); otherwise it
    is listed as skipped.

    Raises:
        AlreadyExists: a key's name or id is taken here (checked for every
            key before any is written).
    """
    for item in archive.keys:
        if await service.find(item.key.name) is not None or await service.store.get_key_by_id(item.key.id):
            raise AlreadyExists(
                f"key {item.key.name!r} (or its id) already exists; restore into a fresh data directory"
            )
    restored: list[str] = []
    skipped: list[str] = []
    total = len(archive.keys)
    for index, item in enumerate(archive.keys):
        key = item.key
        backend = service.backends.get(key.protection)
        if item.by_reference:
            if backend is None:
                skipped.append(key.name)
                continue
            blobs = item.references
        else:
            importer = getattr(backend, "import_material", None) if backend is not None else None
            if item.materials and importer is None:
                skipped.append(key.name)
                continue
            blobs = {}
            for number, material in item.materials.items():
                assert importer is not None
                blobs[number] = await importer(key.id, number, key.type, bytearray(material))
        versions = tuple(
            replace(v, material=blobs.get(v.number, b""), uses=_restored_uses(key, v.uses))
            for v in key.versions
        )
        await service.restore_key(replace(key, versions=versions, revision=1))
        restored.append(key.name)
        if progress is not None:
            progress(index + 1, total)
    return RestoreSummary(tuple(restored), tuple(skipped))
