"""The Store interface: durable key metadata and wrapped material.

A store plugin (``kb_store`` hook) returns an object with these async
methods. Every state change is one transaction; ``replace_key`` is an
optimistic compare-and-swap on ``Key.revision``, so two writers (two tasks,
or two brokers on one database) can never both apply a change based on the
same old key. ``broker.testing`` has a conformance suite every store runs.
"""

from __future__ import annotations

from typing import Protocol

from .keys import Key, KeyState

__all__ = ["Store"]


class Store(Protocol):
    """Durable home of keys. Methods raise ``Unavailable`` when the medium fails."""

    name: str

    async def open(self) -> None:
        """Connect, create or migrate the schema. Called once before use."""

    async def aclose(self) -> None:
        """Release connections. Idempotent."""

    async def insert_key(self, key: Key) -> None:
        """Add a new key with all its versions, atomically.

        Raises:
            AlreadyExists: the name is taken.
        """

    async def replace_key(self, key: Key, *, expected_revision: int) -> None:
        """Write ``key`` (all fields and versions) if the stored revision is ``expected_revision``.

        A version whose ``material`` became empty has its stored material
        erased (overwritten, then deleted) in the same transaction.

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

    async def reserve_uses(self, key_id: bytes, version: int, count: int, limit: int | None) -> int:
        """Atomically add up to ``count`` to the version's reserved uses, never past ``limit``.

        Returns the number granted (0 when the limit is reached). The stored
        ``uses`` of a version is this reservation: a broker that dies
        forfeits what it reserved but did not spend, which errs on the safe
        side of the usage limit.

        Raises:
            NotFound: no such key or version.
        """
