"""Key operations: the lifecycle and the cryptography, over store and backends.

The service knows nothing of sockets, principals or audit (broker.rpc adds
those). It keeps a write-through cache of keys, serialises changes to one
key with a per-key lock, and applies each change with the store's optimistic
revision check. Time comes from an injectable clock.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import trio

from .backend import Aad, Backend
from .errors import AlreadyExists, InvalidArgument, InvalidState, LimitExceeded, NotFound, StaleRevision
from .events import EventKind, KeyEvent
from .keys import Classification, Key, KeyState, KeyType, VersionRef, VersionState
from .lifecycle import (
    USAGE,
    Transition,
    Usage,
    UseGrant,
    add_version,
    check_operation,
    check_use,
    compromise,
    new_key,
    to_metadata,
    transition,
    update_settings,
    use_limit,
)
from .plugins import Plugins
from .store import Store
from .usage import Meter, lease_size

__all__ = ["KeyService", "Sealed"]

# A change that keeps losing the optimistic race is retried this often
# before the caller is told the store is unavailable.
MAX_CHANGE_ATTEMPTS = 8

EVENT_FOR: dict[Transition, EventKind] = {
    Transition.ACTIVATE: EventKind.STATE_CHANGED,
    Transition.DEACTIVATE: EventKind.STATE_CHANGED,
    Transition.DISABLE: EventKind.STATE_CHANGED,
    Transition.ENABLE: EventKind.STATE_CHANGED,
    Transition.COMPROMISE: EventKind.COMPROMISED,
    Transition.SCHEDULE_DESTROY: EventKind.DESTROY_SCHEDULED,
    Transition.CANCEL_DESTROY: EventKind.DESTROY_CANCELLED,
    Transition.DESTROY: EventKind.DESTROYED,
}


@dataclass(frozen=True, slots=True)
class Sealed:
    """Result of a protecting operation: outputs and the version used."""

    key: Key
    version: int
    outputs: list[bytes]


class KeyService:
    """Keys through their whole life, for one broker."""

    def __init__(
        self,
        *,
        store: Store,
        backends: dict[str, Backend],
        plugins: Plugins,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.backends = backends
        self.plugins = plugins
        self.clock = clock
        self._by_name: dict[str, Key] = {}
        self._name_by_id: dict[bytes, str] = {}
        self._locks: dict[str, trio.Lock] = {}
        self._meters: dict[tuple[bytes, int], Meter] = {}
        self._listeners: list[Callable[[KeyEvent], None]] = []

    def now(self) -> int:
        return int(self.clock())

    # --- events --------------------------------------------------------------

    def add_listener(self, listener: Callable[[KeyEvent], None]) -> Callable[[], None]:
        """Call ``listener`` for every key event; returns a function that removes it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def _emit(self, key: Key, kind: EventKind) -> None:
        event = KeyEvent(key.name, kind, key.primary_version, self.now(), key.state.value)
        self.plugins.key_event(event)
        for listener in list(self._listeners):
            listener(event)

    # --- reading -------------------------------------------------------------

    def _remember(self, key: Key) -> Key:
        self._by_name[key.name] = key
        self._name_by_id[key.id] = key.name
        return key

    def forget(self, name: str) -> None:
        """Drop a key from the cache (another broker changed it); ``"*"`` drops every key."""
        if name == "*":
            for cached in list(self._by_name):
                self.forget(cached)
            return
        key = self._by_name.pop(name, None)
        if key is not None:
            self._name_by_id.pop(key.id, None)
            backend = self.backends.get(key.protection)
            if backend is not None:
                backend.forget(key.id)

    async def find(self, name: str) -> Key | None:
        cached = self._by_name.get(name)
        if cached is not None:
            return cached
        key = await self.store.get_key(name)
        return None if key is None else self._remember(key)

    async def get(self, name: str) -> Key:
        key = await self.find(name)
        if key is None:
            raise NotFound(f"no key named {name!r}")
        return key

    async def get_by_id(self, key_id: bytes) -> Key:
        name = self._name_by_id.get(key_id)
        if name is not None and name in self._by_name:
            return self._by_name[name]
        key = await self.store.get_key_by_id(key_id)
        if key is None:
            raise NotFound("no key with the id named in the envelope")
        return self._remember(key)

    async def list(self, *, prefix: str, state: KeyState | None, limit: int, after: str | None) -> list[Key]:
        return await self.store.list_keys(prefix=prefix, state=state, after=after, limit=limit)

    def metadata(self, key: Key) -> dict[str, Any]:
        """Wire metadata with this broker's live use counts."""
        live = {
            v.number: max(v.uses, meter.spent)
            for v in key.versions
            if (meter := self._meters.get((key.id, v.number))) is not None
        }
        return to_metadata(key, live)

    def backend(self, key: Key) -> Backend:
        backend = self.backends.get(key.protection)
        if backend is None:
            raise InvalidArgument(
                f"protection {key.protection!r} is not configured on this broker", {"field": "protection"}
            )
        return backend

    # --- changing --------------------------------------------------------------

    def _lock(self, name: str) -> trio.Lock:
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = trio.Lock()
        return lock

    async def _apply(self, name: str, change: Callable[[Key], Awaitable[Key]]) -> Key:
        """Apply ``change`` to the current key under its lock, retrying lost races."""
        async with self._lock(name):
            for _ in range(MAX_CHANGE_ATTEMPTS):
                old = await self.get(name)
                new = await change(old)
                try:
                    await self.store.replace_key(new, expected_revision=old.revision)
                except StaleRevision:
                    self.forget(name)
                    continue
                return self._remember(new)
        raise StaleRevision(f"key {name!r} kept changing under this broker; try again")

    async def create(
        self,
        *,
        name: str,
        key_type: KeyType,
        protection: str,
        classification: Classification,
        activate: bool,
        rotation_period_s: int,
        max_uses_per_version: int | None,
        exportable: bool,
        labels: dict[str, str],
        activate_at: int | None = None,
        deactivate_at: int | None = None,
    ) -> Key:
        """Create a key with its first version.

        Raises:
            InvalidArgument: unknown protection, unsupported type, governance.
            AlreadyExists: the name is taken.
        """
        backend = self.backends.get(protection)
        if backend is None:
            raise InvalidArgument(
                f"protection {protection!r} is not configured on this broker"
                + (" (no HSM backend is configured)" if protection == "hsm" else ""),
                {"field": "protection"},
            )
        backend.check_type(key_type)
        now = self.now()
        key_id = os.urandom(16)
        pending = activate_at is not None and activate_at > now
        draft = new_key(
            key_id=key_id,
            name=name,
            key_type=key_type,
            protection=protection,
            classification=classification,
            material=b"",
            now=now,
            activate=activate and not pending,
            rotation_period_s=rotation_period_s,
            max_uses_per_version=max_uses_per_version,
            exportable=exportable,
            labels=labels,
            activate_at=activate_at if pending else None,
            deactivate_at=deactivate_at,
        )
        self.plugins.validate(draft, "create")
        async with self._lock(name):
            if await self.find(name) is not None:
                raise AlreadyExists(f"a key named {name!r} exists")
            material = await backend.generate(key_id, 1, key_type)
            key = _with_material(draft, 1, material)
            try:
                await self.store.insert_key(key)
            except BaseException:
                await backend.destroy(key.ref(1))
                raise
            self._remember(key)
        self._emit(key, EventKind.CREATED)
        return key

    async def rotate(self, name: str) -> Key:
        async def change(old: Key) -> Key:
            rotated = add_version(old, b"", self.now())
            self.plugins.validate(rotated, "rotate")
            material = await self.backend(old).generate(old.id, rotated.primary_version, old.type)
            return _with_material(rotated, rotated.primary_version, material)

        key = await self._apply(name, change)
        self._emit(key, EventKind.ROTATED)
        return key

    async def update(self, name: str, **settings: Any) -> Key:
        async def change(old: Key) -> Key:
            updated = update_settings(old, self.now(), **settings)
            self.plugins.validate(updated, "update")
            return updated

        key = await self._apply(name, change)
        self._emit(key, EventKind.UPDATED)
        return key

    async def lifecycle(self, name: str, call: Transition, *, pending_days: int | None = None) -> Key:
        """Apply activate / deactivate / disable / enable / compromise / (cancel_)destroy."""

        async def change(old: Key) -> Key:
            new = transition(old, call, self.now(), pending_days=pending_days)
            if call in (Transition.SCHEDULE_DESTROY, Transition.DESTROY):
                self.plugins.validate(new, "destroy")
            if call is Transition.DESTROY:
                backend = self.backend(old)
                for version in old.versions:
                    if version.state is not VersionState.DESTROYED:
                        await backend.destroy(old.ref(version.number))
            return new

        key = await self._apply(name, change)
        if call is Transition.DESTROY:
            self.backend(key).forget(key.id)
        self._emit(key, EVENT_FOR[call])
        return key

    async def compromise(self, name: str, version: int | None) -> Key:
        key = await self._apply(name, _async(lambda old: compromise(old, self.now(), version)))
        self._emit(key, EventKind.COMPROMISED)
        return key

    # --- usage -----------------------------------------------------------------

    def _meter(self, key: Key, number: int) -> Meter:
        meter = self._meters.get((key.id, number))
        if meter is None:
            version = key.version(number)
            meter = self._meters[(key.id, number)] = Meter(spent=version.uses if version else 0)
        return meter

    async def _reserve(self, key: Key, count: int) -> tuple[Key, UseGrant]:
        """Spend ``count`` uses of the primary version, rotating first if it would cross its limit.

        Raises:
            LimitExceeded: one call asks for more uses than a version may have.
            InvalidState: the key's state forbids protecting new data.
        """
        limit = use_limit(key)
        if limit is not None and count > limit:
            raise LimitExceeded(
                f"{count} items exceed the key's limit of {limit} uses per version",
                {"limit": limit},
            )
        grant = check_use(key, Usage.PROTECT)
        if self._meter(key, grant.version.number).take(count):
            return key, grant
        async with self._lock(key.name):
            for _ in range(MAX_CHANGE_ATTEMPTS):
                key = await self.get(key.name)
                grant = check_use(key, Usage.PROTECT)
                number = grant.version.number
                meter = self._meter(key, number)
                if meter.take(count):
                    return key, grant
                wanted = lease_size(limit, count - meter.available)
                meter.available += await self.store.reserve_uses(key.id, number, wanted, limit)
                if meter.take(count):
                    return key, grant
                # The version's limit is reached: rotate before crossing it.
                await self._rotate_for_usage(key)
        raise StaleRevision(f"key {key.name!r} could not reserve uses; try again")

    async def _rotate_for_usage(self, old: Key) -> None:
        rotated = add_version(old, b"", self.now())
        material = await self.backend(old).generate(old.id, rotated.primary_version, old.type)
        new = _with_material(rotated, rotated.primary_version, material)
        try:
            await self.store.replace_key(new, expected_revision=old.revision)
        except StaleRevision:
            self.forget(old.name)
            return
        self._remember(new)
        self._emit(new, EventKind.ROTATED)

    # --- cryptography ----------------------------------------------------------

    async def encrypt(self, key: Key, items: Sequence[bytes], aad: Aad) -> Sealed:
        check_operation(key, "encrypt")
        key, grant = await self._reserve(key, len(items))
        number = grant.version.number
        outputs = await self.backend(key).encrypt(key.ref(number), items, aad)
        return Sealed(key, number, outputs)

    def process_grant(self, key: Key, version: int, *, allow_compromised: bool) -> UseGrant:
        return check_use(key, Usage.PROCESS, version, allow_compromised=allow_compromised)

    async def decrypt(
        self, key: Key, version: int, envelopes: Sequence[bytes], aad: Aad
    ) -> list[bytes | None]:
        return await self.backend(key).decrypt(key.ref(version), envelopes, aad)

    async def rewrap(
        self, key: Key, version: int, envelopes: Sequence[bytes], aad: Aad
    ) -> tuple[int, list[bytes | None]]:
        key, grant = await self._reserve(key, len(envelopes))
        new = key.ref(grant.version.number)
        return new.version, await self.backend(key).rewrap(key.ref(version), new, envelopes, aad)

    async def sign(self, key: Key, data: bytes, *, prehashed: bool) -> tuple[int, bytes]:
        check_operation(key, "sign")
        key, grant = await self._reserve(key, 1)
        ref = key.ref(grant.version.number)
        return ref.version, await self.backend(key).sign(ref, data, prehashed=prehashed)

    async def mac(self, key: Key, message: bytes) -> tuple[int, bytes]:
        check_operation(key, "mac")
        key, grant = await self._reserve(key, 1)
        ref = key.ref(grant.version.number)
        return ref.version, await self.backend(key).mac(ref, message)

    def verification_versions(
        self, key: Key, version: int | None, *, allow_compromised: bool
    ) -> Iterator[UseGrant]:
        """Versions a signature or MAC may be checked against, newest first.

        With ``version``: that one (raising if its state forbids it). Without:
        every version from min_decrypt_version up that may be processed.
        """
        if version is not None:
            yield check_use(key, Usage.PROCESS, version, allow_compromised=allow_compromised)
            return
        if Usage.PROCESS not in USAGE[key.state]:
            raise InvalidState(f"key {key.name!r} is {key.state.value}: process not allowed")
        for candidate in sorted(key.versions, key=lambda v: -v.number):
            if candidate.number < key.min_decrypt_version:
                break
            try:
                yield check_use(key, Usage.PROCESS, candidate.number, allow_compromised=allow_compromised)
            except InvalidState:
                continue

    async def verify(
        self, key: Key, ref: VersionRef, data: bytes, signature: bytes, *, prehashed: bool
    ) -> bool:
        return await self.backend(key).verify(ref, data, signature, prehashed=prehashed)

    async def verify_mac(self, key: Key, ref: VersionRef, message: bytes, tag: bytes) -> bool:
        return await self.backend(key).verify_mac(ref, message, tag)

    async def public_pem(self, key: Key, version: int | None) -> tuple[int, bytes]:
        check_operation(key, "public")
        if key.state is KeyState.DESTROYED:
            raise InvalidState(f"key {key.name!r} is destroyed")
        number = key.primary_version if version is None else version
        found = key.version(number)
        if found is None:
            raise NotFound(f"key {key.name!r} has no version {number}")
        if found.state is VersionState.DESTROYED:
            raise InvalidState(f"key {key.name!r}: version {number} is destroyed")
        return number, await self.backend(key).public_pem(key.ref(number))


def _with_material(key: Key, number: int, material: bytes) -> Key:
    versions = tuple(replace(v, material=material) if v.number == number else v for v in key.versions)
    return replace(key, versions=versions)


def _async(fn: Callable[[Key], Key]) -> Callable[[Key], Awaitable[Key]]:
    async def wrapper(key: Key) -> Key:
        return fn(key)

    return wrapper
