"""Key operations: the lifecycle and the cryptography, over store and backends.

The service knows nothing of sockets, principals or audit (broker.rpc adds
those). It keeps a write-through cache of keys, serialises changes to one
key with a per-key lock, and applies each change with the store's optimistic
revision check. Time comes from an injectable clock.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

import trio

from .backend import Aad, Backend
from .errors import (
    AlreadyExists,
    BrokerError,
    InvalidArgument,
    InvalidState,
    LimitExceeded,
    NotFound,
    PermissionDenied,
    StaleRevision,
)
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
from .namelocks import NameLocks
from .plugins import Plugins
from .policy import rule_id
from .store import Store
from .transfer import ImportToken, ImportTokens, new_wrapping_key, unwrap
from .usage import Meter, lease_size

__all__ = ["KeyService", "NotDue", "Sealed"]

log = logging.getLogger("keybroker.service")

# A change that keeps losing the optimistic race is retried this often
# before the caller is told the store is unavailable.
MAX_CHANGE_ATTEMPTS = 8
# The longest pause before the first retry of a lost race (then 2x, 3x, ...).
RETRY_PAUSE_S = 0.005

# Origin of material imported through key.import (generated material: "broker").
EXTERNAL = "external"
# Export hands material out for use elsewhere: only from states where the key
# is meant to be usable (not disabled, compromised or on its way out).
EXPORTABLE_STATES = frozenset({KeyState.PRE_ACTIVE, KeyState.ACTIVE, KeyState.DEACTIVATED})

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


class NotDue(Exception):
    """A scheduled change found the key, read afresh under its lock, no longer
    due: another change (a cancel_destroy, a manual rotation) came first."""


def _check_due(old: Key, only_if: Callable[[Key], bool] | None) -> None:
    if only_if is not None and not only_if(old):
        raise NotDue(old.name)


@dataclass(frozen=True, slots=True)
class _Protecting:
    """What the last successful reservation on a key found, reused while the key is unchanged.

    Everything here follows from ``key`` alone (a Key never changes; a
    changed key is a new object), except the meter, which is the one
    kept for that version for the broker's life.
    """

    key: Key
    limit: int | None
    meter: Meter
    ref: VersionRef


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
        # How many times a key was forgotten: a read that began before one is not cached.
        self._forgotten = 0
        self._name_by_id: dict[bytes, str] = {}
        self._lock = NameLocks()
        self._meters: dict[tuple[bytes, int], Meter] = {}
        self._protecting: dict[bytes, _Protecting] = {}
        self._listeners: list[Callable[[KeyEvent], None]] = []
        # One-time RSA wrapping keys for key.import, in this broker's memory.
        self.import_tokens = ImportTokens(self.now)

    def now(self) -> int:
        return int(self.clock())

    # --- events --------------------------------------------------------------

    def add_listener(self, listener: Callable[[KeyEvent], None]) -> Callable[[], None]:
        """Call ``listener`` for every key event; returns a function that removes it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def _emit(self, key: Key, kind: EventKind) -> None:
        self.emit_event(KeyEvent(key.name, kind, key.primary_version, self.now(), key.state.value))

    def emit_event(self, event: KeyEvent) -> None:
        """Hand ``event`` to the ``kb_key_event`` hooks and every listener (subscriptions)."""
        self.plugins.key_event(event)
        for listener in list(self._listeners):
            listener(event)

    # --- reading -------------------------------------------------------------

    def _remember(self, key: Key) -> Key:
        self._by_name[key.name] = key
        self._name_by_id[key.id] = key.name
        self._protecting.pop(key.id, None)
        return key

    def forget(self, name: str) -> None:
        """Drop a key from the cache (another broker changed it); ``"*"`` drops every key."""
        self._forgotten += 1
        if name == "*":
            for cached in list(self._by_name):
                self.forget(cached)
            return
        key = self._by_name.pop(name, None)
        if key is not None:
            self._name_by_id.pop(key.id, None)
            self._protecting.pop(key.id, None)
            backend = self.backends.get(key.protection)
            if backend is not None:
                backend.forget(key.id)

    async def find(self, name: str) -> Key | None:
        cached = self._by_name.get(name)
        if cached is not None:
            return cached
        seen = self._forgotten
        key = await self.store.get_key(name)
        return None if key is None else self._remember_read(key, seen)

    async def get(self, name: str) -> Key:
        key = await self.find(name)
        if key is None:
            raise NotFound(f"no key named {name!r}")
        return key

    async def get_by_id(self, key_id: bytes) -> Key:
        name = self._name_by_id.get(key_id)
        if name is not None and name in self._by_name:
            return self._by_name[name]
        seen = self._forgotten
        key = await self.store.get_key_by_id(key_id)
        if key is None:
            raise NotFound("no key with the id named in the envelope")
        return self._remember_read(key, seen)

    def _remember_read(self, key: Key, seen: int) -> Key:
        """Cache a key read from the store, unless something was forgotten
        while the read was on its way: the change behind it may be newer than
        what the read returned, and caching that would keep it for good."""
        return self._remember(key) if self._forgotten == seen else key

    async def list_keys(
        self, *, prefix: str, state: KeyState | None, limit: int, after: str | None
    ) -> list[Key]:
        return await self.store.list_keys(prefix=prefix, state=state, after=after, limit=limit)

    async def list_scheduled(self, *, limit: int, after: str | None) -> list[Key]:
        """A page of the keys time can make due (every key, with a store that cannot tell them)."""
        lister = getattr(self.store, "list_scheduled", None)
        if lister is None:
            return await self.store.list_keys(prefix="", state=None, after=after, limit=limit)
        keys: list[Key] = await lister(after=after, limit=limit)
        return keys

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

    async def _apply(self, name: str, change: Callable[[Key], Awaitable[Key]]) -> Key:
        """Apply ``change`` to the current key under its lock, retrying lost races.

        A race is lost to another broker on the same store (this broker's
        own changes to one key take turns under the lock); each retry waits
        a random pause first, so that brokers racing for one key spread out.
        """
        async with self._lock(name):
            for attempt in range(MAX_CHANGE_ATTEMPTS):
                old = await self.get(name)
                new = await change(old)
                if await self._replace(old, new, attempt):
                    return self._remember(new)
        raise StaleRevision(f"key {name!r} kept changing under this broker; try again")

    async def _replace(self, old: Key, new: Key, attempt: int) -> bool:
        """Store ``new`` over ``old``: True if it was written, False if the race was lost.

        Any other failure may have happened after the commit (a lost reply):
        the cached copy is dropped before it is raised, so that the next
        call reads what the store holds, never the key from before.
        """
        try:
            await self.store.replace_key(new, expected_revision=old.revision)
        except StaleRevision:
            await self._lost_race(old, new, attempt)
            return False
        except BaseException:
            self.forget(old.name)
            raise
        return True

    async def _lost_race(self, old: Key, new: Key, attempt: int) -> None:
        """After ``new`` lost to a change made elsewhere: drop what it generated, forget, pause.

        Material generated for versions ``old`` did not have was never stored;
        the backend destroys it (a token object would otherwise be left on
        the HSM, unreachable).
        """
        self.forget(old.name)
        backend = self.backend(new)
        for version in new.versions:
            if version.material and old.version(version.number) is None:
                try:
                    await backend.destroy(new.ref(version.number))
                except BrokerError as exc:
                    log.warning("could not destroy unstored material of %r v%d: %s",
                                new.name, version.number, exc.code)
        await trio.sleep(RETRY_PAUSE_S * (attempt + 1) * secrets.randbelow(1001) / 1000)

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
            # Only the cache is asked: the store's insert refuses a taken name
            # in the same transaction, so a store read here would only make
            # every create slower to spare a rare duplicate one generate.
            if name in self._by_name:
                raise AlreadyExists(f"a key named {name!r} exists")
            material = await backend.generate(key_id, 1, key_type)
            key = _with_material(draft, 1, material)
            try:
                await self.store.insert_key(key)
            except BaseException:
                with trio.CancelScope(shield=True):
                    if not await self._may_be_stored(key_id):
                        await backend.destroy(key.ref(1))
                raise
            self._remember(key)
        self._emit(key, EventKind.CREATED)
        return key

    async def _may_be_stored(self, key_id: bytes) -> bool:
        """After a failed insert: could the key be stored all the same?

        A commit whose flush failed, or whose answer a lost connection
        swallowed, may have happened; the material it names must then stay.
        Only a store that answers "no such key" lets it go.
        """
        try:
            return await self.store.get_key_by_id(key_id) is not None
        except Exception:  # not knowing means keeping the material
            return True

    async def rotate(self, name: str, *, only_if: Callable[[Key], bool] | None = None) -> Key:
        """Add a primary version.

        ``only_if`` (the scheduler's) is asked about the current key under
        its lock, before anything is generated; NotDue if it says no.
        """

        async def change(old: Key) -> Key:
            _check_due(old, only_if)
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

    async def lifecycle(
        self,
        name: str,
        call: Transition,
        *,
        pending_days: int | None = None,
        only_if: Callable[[Key], bool] | None = None,
    ) -> Key:
        """Apply activate / deactivate / disable / enable / compromise / (cancel_)destroy.

        ``only_if``: as for :meth:`rotate`.
        """

        async def change(old: Key) -> Key:
            _check_due(old, only_if)
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

    async def _reserve(self, key: Key, count: int) -> tuple[Key, VersionRef]:
        """Spend ``count`` uses of the primary version, rotating first if it would cross its limit.

        Returns the key as it is now (a rotation makes a new one) and the
        version the uses were spent on.

        Raises:
            LimitExceeded: one call asks for more uses than a version may have.
            InvalidState: the key's state forbids protecting new data.
        """
        last = self._protecting.get(key.id)
        # take() refuses a count over the limit too: that case falls through to
        # _use_limit_for below, which raises.
        if last is not None and last.key is key and last.meter.take(count, last.limit):
            return key, last.ref
        limit = _use_limit_for(key, count)
        number = check_use(key, Usage.PROTECT).version.number
        if not self._meter(key, number).take(count, limit):
            async with self._lock(key.name):
                for _ in range(MAX_CHANGE_ATTEMPTS):
                    key = await self.get(key.name)
                    limit = _use_limit_for(key, count)  # as stored now: it may have been lowered
                    number = check_use(key, Usage.PROTECT).version.number
                    meter = self._meter(key, number)
                    if meter.take(count, limit):
                        break
                    wanted = lease_size(limit, count - meter.available)
                    meter.available += await self.store.reserve_uses(key.id, number, wanted, limit)
                    if meter.take(count, limit):
                        break
                    # The version's limit is reached: rotate before crossing it.
                    await self._rotate_for_usage(key)
                else:
                    raise StaleRevision(f"key {key.name!r} could not reserve uses; try again")
        ref = key.ref(number)
        if self._by_name.get(key.name) is key:
            self._protecting[key.id] = _Protecting(key, limit, self._meter(key, number), ref)
        return key, ref

    async def _rotate_for_usage(self, old: Key) -> None:
        rotated = add_version(old, b"", self.now())
        material = await self.backend(old).generate(old.id, rotated.primary_version, old.type)
        new = _with_material(rotated, rotated.primary_version, material)
        if await self._replace(old, new, 0):
            self._remember(new)
            self._emit(new, EventKind.ROTATED)

    # --- cryptography ----------------------------------------------------------

    async def encrypt(self, key: Key, items: Sequence[bytes], aad: Aad) -> Sealed:
        check_operation(key, "encrypt")
        key, ref = await self._reserve(key, len(items))
        outputs = await self.backend(key).encrypt(ref, items, aad)
        return Sealed(key, ref.version, outputs)

    def process_grant(self, key: Key, version: int, *, allow_compromised: bool) -> UseGrant:
        return check_use(key, Usage.PROCESS, version, allow_compromised=allow_compromised)

    async def decrypt(
        self, key: Key, version: int, envelopes: Sequence[bytes], aad: Aad
    ) -> list[bytes | None]:
        return await self.backend(key).decrypt(key.ref(version), envelopes, aad)

    async def rewrap(
        self, key: Key, version: int, envelopes: Sequence[bytes], aad: Aad
    ) -> tuple[int, list[bytes | None]]:
        key, new = await self._reserve(key, len(envelopes))
        return new.version, await self.backend(key).rewrap(key.ref(version), new, envelopes, aad)

    async def sign(self, key: Key, data: bytes, *, prehashed: bool) -> tuple[int, bytes]:
        check_operation(key, "sign")
        key, ref = await self._reserve(key, 1)
        return ref.version, await self.backend(key).sign(ref, data, prehashed=prehashed)

    async def mac(self, key: Key, message: bytes) -> tuple[int, bytes]:
        check_operation(key, "mac")
        key, ref = await self._reserve(key, 1)
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

    # --- export, import, restore -------------------------------------------------

    async def export_material(self, key: Key, version: int | None) -> tuple[int, bytearray]:
        """A version's material in the clear, for wrapping to a recipient (``key.export``).

        Args:
            key: the key.
            version: the version to export; None for the primary.

        Returns:
            The version number and the material (32 raw bytes, or PKCS#8 DER
            for signing keys) in a bytearray the caller zeroes.

        Raises:
            InvalidArgument: the key's custody keeps material inside (hsm).
            PermissionDenied: the key was not created ``exportable``.
            InvalidState: the key is not pre_active, active or deactivated,
                or the version is compromised or destroyed.
            NotFound: no such version.
        """
        check_operation(key, "export")
        export = getattr(self.backend(key), "export_material", None)
        if export is None:
            raise InvalidArgument(
                f"keys of protection {key.protection!r} cannot be exported: "
                "their material stays in the backend",
                {"field": "name"},
            )
        if not key.exportable:
            raise PermissionDenied(
                f"key {key.name!r} was not created exportable; its material never leaves the broker",
                {"rule": "exportable"},
            )
        try:
            # A governance rule made stricter since the key was created holds.
            self.plugins.validate(key, "export")
        except InvalidArgument as exc:
            rules = exc.details.get("rules")
            rule = rule_id(str(rules[0])) if isinstance(rules, list) and rules else "governance"
            raise PermissionDenied(exc.message, {"rule": rule}) from None
        if key.state not in EXPORTABLE_STATES:
            raise InvalidState(f"key {key.name!r} is {key.state.value}: export not allowed")
        number = key.primary_version if version is None else version
        found = key.version(number)
        if found is None:
            raise NotFound(f"key {key.name!r} has no version {number}")
        if found.state is not VersionState.ACTIVE:
            raise InvalidState(
                f"key {key.name!r}: version {number} is {found.state.value}; export not allowed"
            )
        material: bytearray = await export(key.ref(number))
        return number, material

    async def new_import_token(self, key_type: KeyType, principal: str) -> ImportToken:
        """Issue a one-time RSA-3072 wrapping key for importing ``key_type`` material.

        Raises:
            LimitExceeded: too many tokens outstanding.
        """
        self.import_tokens.check_room()
        # RSA-3072 generation takes 0.1-1 s; cryptography releases the GIL.
        private = await trio.to_thread.run_sync(new_wrapping_key)
        return self.import_tokens.issue(key_type, principal, private)

    def _importer(self, protection: str) -> Callable[[bytes, int, KeyType, bytearray], Awaitable[bytes]]:
        backend = self.backends.get(protection)
        if backend is None:
            raise InvalidArgument(
                f"protection {protection!r} is not configured on this broker", {"field": "protection"}
            )
        importer = getattr(backend, "import_material", None)
        if importer is None:
            raise InvalidArgument(
                f"protection {protection!r} cannot take imported material", {"field": "protection"}
            )
        return cast("Callable[[bytes, int, KeyType, bytearray], Awaitable[bytes]]", importer)

    @staticmethod
    def _unwrap_import(token: ImportToken, key_type: KeyType, wrapped: bytes) -> bytearray:
        if token.key_type is not key_type:
            raise InvalidArgument(
                f"the import token was issued for {token.key_type.value} material, not {key_type.value}",
                {"field": "type"},
            )
        return unwrap(token.private, wrapped)

    async def import_key(
        self,
        *,
        token: ImportToken,
        wrapped: bytes,
        name: str,
        key_type: KeyType,
        key_id: bytes | None,
        version: int,
        protection: str,
        classification: Classification,
        activate: bool,
        rotation_period_s: int,
        max_uses_per_version: int | None,
        exportable: bool,
        labels: dict[str, str],
    ) -> Key:
        """Create a key whose first version is imported material (origin ``external``).

        Args:
            token: the consumed import token whose key unwraps ``wrapped``.
            wrapped: RSA-OAEP(ephemeral) || AES-KWP(ephemeral, material).
            key_id: keep this 16-byte id (so envelopes made elsewhere under
                it decrypt here); None for a new random id.
            version: the number the imported version gets (keeps another
                broker's numbering); min_decrypt_version starts there.

        Raises:
            DecryptionFailed: ``wrapped`` does not unwrap under the token.
            InvalidArgument: wrong type for the token, malformed material,
                protection without import, governance.
            AlreadyExists: the name or the key id is taken.
        """
        importer = self._importer(protection)
        material = self._unwrap_import(token, key_type, wrapped)
        try:
            now = self.now()
            new_id = key_id if key_id is not None else os.urandom(16)
            draft = new_key(
                key_id=new_id,
                name=name,
                key_type=key_type,
                protection=protection,
                classification=classification,
                material=b"",
                now=now,
                activate=activate,
                rotation_period_s=rotation_period_s,
                max_uses_per_version=max_uses_per_version,
                exportable=exportable,
                labels=labels,
                origin=EXTERNAL,
            )
            first = replace(draft.versions[0], number=version, origin=EXTERNAL)
            draft = replace(draft, versions=(first,), primary_version=version, min_decrypt_version=version)
            self.plugins.validate(draft, "create")
            async with self._lock(name):
                if await self.find(name) is not None:
                    raise AlreadyExists(f"a key named {name!r} exists")
                if await self.store.get_key_by_id(new_id) is not None:
                    raise AlreadyExists("a key with that key_id exists", {"field": "key_id"})
                blob = await importer(new_id, version, key_type, material)
                key = _with_material(draft, version, blob)
                await self.store.insert_key(key)
                self._remember(key)
        finally:
            material[:] = bytes(len(material))
        self._emit(key, EventKind.CREATED)
        return key

    async def import_version(
        self, name: str, *, token: ImportToken, wrapped: bytes, key_type: KeyType, version: int | None
    ) -> Key:
        """Add imported material as the key's new primary version (origin ``external``).

        Args:
            version: the new version's number, above every existing one;
                None for the next number.

        Raises:
            DecryptionFailed: ``wrapped`` does not unwrap under the token.
            InvalidArgument: a type other than the key's, malformed material,
                a version number not above the existing ones.
            InvalidState: the key cannot rotate in its state.
        """
        material = self._unwrap_import(token, key_type, wrapped)
        try:

            async def change(old: Key) -> Key:
                if old.type is not key_type:
                    raise InvalidArgument(
                        f"key {old.name!r} is {old.type.value}, not {key_type.value}", {"field": "type"}
                    )
                importer = self._importer(old.protection)
                rotated = add_version(old, b"", self.now())
                number = rotated.primary_version if version is None else version
                if number < rotated.primary_version:
                    raise InvalidArgument(
                        f"version must be above {rotated.primary_version - 1}, the key's highest",
                        {"field": "version"},
                    )
                last = replace(rotated.versions[-1], number=number, origin=EXTERNAL)
                rotated = replace(rotated, versions=(*rotated.versions[:-1], last), primary_version=number)
                self.plugins.validate(rotated, "rotate")
                blob = await importer(old.id, number, old.type, bytearray(material))
                return _with_material(rotated, number, blob)

            key = await self._apply(name, change)
        finally:
            material[:] = bytes(len(material))
        self._emit(key, EventKind.ROTATED)
        return key

    async def restore_key(self, key: Key) -> Key:
        """Insert a key brought back from a backup, exactly as given (ids, versions, states).

        Raises:
            AlreadyExists: the name or id is taken.
        """
        async with self._lock(key.name):
            await self.store.insert_key(key)
            self._remember(key)
        self._emit(key, EventKind.CREATED)
        return key


def _with_material(key: Key, number: int, material: bytes) -> Key:
    versions = tuple(replace(v, material=material) if v.number == number else v for v in key.versions)
    return replace(key, versions=versions)


def _async(fn: Callable[[Key], Key]) -> Callable[[Key], Awaitable[Key]]:
    async def wrapper(key: Key) -> Key:
        return fn(key)

    return wrapper


def _use_limit_for(key: Key, count: int) -> int | None:
    """The key's uses-per-version limit (:func:`use_limit`), checked against one call's ``count``.

    Raises:
        LimitExceeded: one call asks for more uses than a version may have.
    """
    limit = use_limit(key)
    if limit is not None and count > limit:
        raise LimitExceeded(
            f"{count} items exceed the key's limit of {limit} uses per version",
            {"limit": limit},
        )
    return limit
