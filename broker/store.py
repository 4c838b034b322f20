"""The Store interface: durable key metadata and wrapped material.

A store plugin (``kb_store`` hook) returns an object with these async
methods. Every state change is one transaction; ``replace_key`` is an
optimistic compare-and-swap on ``Key.revision``, so two writers (two tasks,
or two brokers on one database) can never both apply a change based on the
same old key. ``broker.testing`` has a conformance suite every store runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final, Protocol

from .errors import BrokerError, NotFound, StaleRevision
from .keys import Classification, Key, KeyState, KeyType, Version, VersionState

__all__ = [
    "KEY_COLUMNS",
    "MAX_DOCUMENT_ID_LEN",
    "MAX_DOCUMENT_KIND_LEN",
    "VERSION_COLUMNS",
    "Store",
    "check_document_ref",
    "is_scheduled",
    "key_columns",
    "key_from_columns",
    "lost_replace",
    "version_columns",
]

# Kinds name a feature ("cert", "ca_cert"); ids are things like serial
# numbers. Both bounds leave room in any database's indexed text column.
MAX_DOCUMENT_KIND_LEN = 64
MAX_DOCUMENT_ID_LEN = 256


def check_document_ref(kind: str, doc_id: str) -> None:
    """Raise ValueError unless ``kind`` and ``doc_id`` are well-formed document names.

    Both are non-empty strings without NUL (PostgreSQL text cannot hold it),
    of at most 64 and 256 characters. Ids compare as the code points they
    are, so stores must order them in binary (``COLLATE "C"``), not by locale.
    """
    if not isinstance(kind, str) or not isinstance(doc_id, str):
        raise TypeError("document kind and id must be str")
    if not 0 < len(kind) <= MAX_DOCUMENT_KIND_LEN or not 0 < len(doc_id) <= MAX_DOCUMENT_ID_LEN:
        raise ValueError("document kind (1-64 chars) or id (1-256 chars) out of range")
    if "\x00" in kind or "\x00" in doc_id:
        raise ValueError("document kind and id must not contain NUL")


# --- keys as flat columns: the mapping every table-based store shares -----------

#: A key's columns, in the order stores select them.
KEY_COLUMNS: Final = (
    "id", "name", "type", "protection", "classification", "state", "prior_state", "primary_version",
    "min_decrypt_version", "rotation_period_s", "max_uses_per_version", "exportable", "labels",
    "created_at", "updated_at", "destroy_at", "activate_at", "deactivate_at", "origin", "revision",
)
#: A version's columns (besides its key's id), in the order stores select them.
VERSION_COLUMNS: Final = ("number", "state", "created_at", "uses", "material", "origin")


def is_scheduled(key: Key) -> bool:
    """Whether time alone can make an action due on ``key`` (what :meth:`Store.list_scheduled` lists).

    A key with a destroy, activation or deactivation time, or an active key
    with a rotation period. The scheduler decides what is due now; every
    other key is never due and need not be read.
    """
    return (
        key.destroy_at is not None
        or key.activate_at is not None
        or key.deactivate_at is not None
        or (key.rotation_period_s > 0 and key.state is KeyState.ACTIVE)
    )


def key_columns(key: Key) -> dict[str, Any]:
    """The key's :data:`KEY_COLUMNS` as plain values: enums as their text, labels as a dict.

    A store adapts the few its database types differently (SQLite: ``exportable``
    as 0/1 and ``labels`` as JSON text).
    """
    return {
        "id": key.id,
        "name": key.name,
        "type": key.type.value,
        "protection": key.protection,
        "classification": key.classification.value,
        "state": key.state.value,
        "prior_state": None if key.prior_state is None else key.prior_state.value,
        "primary_version": key.primary_version,
        "min_decrypt_version": key.min_decrypt_version,
        "rotation_period_s": key.rotation_period_s,
        "max_uses_per_version": key.max_uses_per_version,
        "exportable": key.exportable,
        "labels": dict(key.labels),
        "created_at": key.created_at,
        "updated_at": key.updated_at,
        "destroy_at": key.destroy_at,
        "activate_at": key.activate_at,
        "deactivate_at": key.deactivate_at,
        "origin": key.origin,
        "revision": key.revision,
    }


def version_columns(key_id: bytes, version: Version) -> dict[str, Any]:
    """One version's :data:`VERSION_COLUMNS` and ``key_id``, as plain values."""
    return {
        "key_id": key_id,
        "number": version.number,
        "state": version.state.value,
        "created_at": version.created_at,
        "uses": version.uses,
        "material": version.material,
        "origin": version.origin,
    }


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def key_from_columns(row: Mapping[str, Any], versions: Iterable[Mapping[str, Any]]) -> Key:
    """The key stored as ``row`` (its :data:`KEY_COLUMNS`, ``labels`` a mapping) and its version rows.

    Raises:
        ValueError: a column holds a value no key can have (an unknown enum text).
    """
    return Key(
        id=bytes(row["id"]),
        name=str(row["name"]),
        type=KeyType(row["type"]),
        protection=str(row["protection"]),
        classification=Classification(row["classification"]),
        state=KeyState(row["state"]),
        prior_state=None if row["prior_state"] is None else KeyState(row["prior_state"]),
        versions=tuple(
            Version(
                number=int(v["number"]),
                state=VersionState(v["state"]),
                created_at=int(v["created_at"]),
                uses=int(v["uses"]),
                material=bytes(v["material"]),
                origin=str(v["origin"]),
            )
            for v in versions
        ),
        primary_version=int(row["primary_version"]),
        min_decrypt_version=int(row["min_decrypt_version"]),
        rotation_period_s=int(row["rotation_period_s"]),
        max_uses_per_version=_opt_int(row["max_uses_per_version"]),
        exportable=bool(row["exportable"]),
        labels={str(k): str(v) for k, v in row["labels"].items()},
        created_at=int(row["created_at"]),
        updated_at=int(row["updated_at"]),
        destroy_at=_opt_int(row["destroy_at"]),
        activate_at=_opt_int(row["activate_at"]),
        deactivate_at=_opt_int(row["deactivate_at"]),
        origin=str(row["origin"]),
        revision=int(row["revision"]),
    )


def lost_replace(key: Key, stored_revision: int | None, expected_revision: int) -> BrokerError:
    """The error of a ``replace_key`` whose revision check matched no row.

    Args:
        key: the key that was to be written.
        stored_revision: the revision stored under ``key.id``, None when no
            key has that id.
        expected_revision: the revision the caller based its change on.

    Returns:
        NotFound, or StaleRevision naming both revisions (for the caller to raise).
    """
    if stored_revision is None:
        return NotFound(f"no key named {key.name!r}")
    return StaleRevision(
        f"key {key.name!r} is at revision {stored_revision}, not {expected_revision}: changed meanwhile"
    )


class Store(Protocol):
    """Durable home of keys. Methods raise ``Unavailable`` when the medium fails."""

    name: str

    async def open(self) -> None:
        """Connect, create or migrate the schema. Called once before use."""

    async def aclose(self) -> None:
        """Release connections. Idempotent."""

    async def insert_key(self, key: Key) -> None:
        """Add a new key with all its versions, atomically.

        Every field of the key and of its versions (``Version.origin``
        included) reads back equal.

        Raises:
            AlreadyExists: the name is taken.
        """

    async def replace_key(self, key: Key, *, expected_revision: int) -> None:
        """Write ``key`` (all fields and versions) if the stored revision is ``expected_revision``.

        A version whose ``material`` became empty has its stored material
        erased (overwritten, then deleted) in the same transaction. A
        version's stored ``uses`` is never lowered: the written key may have
        been read before later reservations.

        Raises:
            StaleRevision: another writer changed the key first.
            NotFound: no such key.
        """

    async def get_key(self, name: str) -> Key | None:
        """The key named ``name``, or None."""

    async def get_key_by_id(self, key_id: bytes) -> Key | None:
        """The key whose 16-byte id is ``key_id``, or None."""

    async def list_keys(
        self, *, prefix: str = "", state: KeyState | None = None, after: str | None = None, limit: int = 100
    ) -> list[Key]:
        """Keys ordered by name, with names > ``after``, starting with ``prefix``."""

    async def list_scheduled(self, *, after: str | None = None, limit: int = 100) -> list[Key]:
        """The keys :func:`is_scheduled` holds for, ordered by name, with names > ``after``.

        The scheduler's pass reads only these. Optional: with a store that
        lacks it, the scheduler reads every key through :meth:`list_keys`.
        """

    async def reserve_uses(self, key_id: bytes, version: int, count: int, limit: int | None) -> int:
        """Atomically add up to ``count`` to the version's reserved uses, never past ``limit``.

        Returns the number granted (0 when the limit is reached). The stored
        ``uses`` of a version is this reservation: a broker that dies
        forfeits what it reserved but did not spend, which errs on the safe
        side of the usage limit. It does not change the key's revision.

        Raises:
            NotFound: no such key or version.
        """

    # --- documents: small blobs kept for other features (certificates) -----------

    async def put_document(self, kind: str, doc_id: str, body: bytes) -> None:
        """Store ``body`` under ``(kind, doc_id)``, replacing any earlier body, atomically.

        Documents are opaque to the store: a few KiB each (an issued
        certificate and its bookkeeping), never key material.

        Raises:
            ValueError: a malformed kind or id (:func:`check_document_ref`).
        """

    async def get_document(self, kind: str, doc_id: str) -> bytes | None:
        """The body stored under ``(kind, doc_id)``, or None."""

    async def list_documents(
        self, kind: str, *, after: str | None = None, limit: int = 100
    ) -> list[tuple[str, bytes]]:
        """Up to ``limit`` ``(id, body)`` pairs of ``kind``, ordered by id (binary order),
        with ids > ``after`` (a cursor: the last id of the previous page)."""
