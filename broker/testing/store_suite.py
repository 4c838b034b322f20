"""A conformance suite every store plugin runs.

Subclass :class:`StoreConformance` in a test module and provide a ``reopen``
fixture (how to open your store over one test's data) and a ``store``
fixture (the store the tests use, opened and closed by the fixture)::

    from collections.abc import AsyncIterator
    from pathlib import Path

    import pytest
    from broker.store import Store
    from broker.testing.store_suite import OpenStore, StoreConformance

    class TestMyStore(StoreConformance):
        @pytest.fixture
        def reopen(self, tmp_path: Path) -> OpenStore:
            async def open_store() -> Store:
                store = MyStore(tmp_path / "keys.db")
                await store.open()
                return store

            return open_store

        @pytest.fixture
        async def store(self, reopen: OpenStore) -> AsyncIterator[Store]:
            store = await reopen()
            try:
                yield store
            finally:
                await store.aclose()

The suite runs under pytest-trio (``trio_mode = true``). It builds keys with
:mod:`broker.lifecycle`, as the broker does, plus arbitrary :class:`Key`
values from hypothesis, and checks what the broker relies on.

Behaviour this suite defines for every store, beyond the docstrings of
:class:`broker.store.Store`:

- A key reads back equal to what was written, field for field and with the
  same types: ``bytes`` (not ``memoryview``) for ids and material, enum
  members (not plain strings) for types and states, None kept as None.
- ``reserve_uses`` does not change the key's revision, and ``replace_key``
  never lowers a version's stored ``uses``: the broker writes back key values
  from its cache, whose counts may predate reservations made since, and a
  lowered count would let a version cross its usage limit after a restart.
- ``list_keys``'s ``prefix`` is literal: ``_`` and ``%`` are not wildcards.
- ``aclose`` is idempotent.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import fields, replace
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.errors import AlreadyExists, NotFound, StaleRevision
from broker.keys import NAME_PATTERN, Classification, Key, KeyState, KeyType, Version, VersionState
from broker.lifecycle import Transition, add_version, compromise, new_key, transition, update_settings
from broker.store import Store, is_scheduled

__all__ = ["OpenStore", "StoreConformance", "key_values", "keys"]

# Opens a new store over the data of the current test.
OpenStore = Callable[[], Awaitable[Store]]

NOW = 1_700_000_000
DAY = 86_400

# --- building keys ------------------------------------------------------------


def material(tag: str, version: int) -> bytes:
    """A recognisable, distinct 64-byte stand-in for a wrapped key blob."""
    return hashlib.sha256(f"{tag}/{version}".encode()).digest() * 2


def make_key(name: str, *, now: int = NOW, **settings: Any) -> Key:
    """A new key with version 1, as the broker creates it."""
    settings.setdefault("key_type", KeyType.AES256_GCM)
    settings.setdefault("protection", "software")
    settings.setdefault("classification", Classification.INTERNAL)
    return new_key(key_id=os.urandom(16), name=name, material=material(name, 1), now=now, **settings)


def rotated(key: Key, times: int = 1) -> Key:
    """``key`` after ``times`` rotations, an hour apart."""
    for _ in range(times):
        key = add_version(key, material(key.name, key.primary_version + 1), key.updated_at + 3600)
    return key


# Text as a PostgreSQL text column can hold it too: any Unicode but NUL.
_text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=24)
_times = st.integers(min_value=0, max_value=2**40)
# Within a signed 64-bit integer, with room to spare.
_counts = st.integers(min_value=0, max_value=2**62)


@st.composite
def key_values(draw: st.DrawFn) -> dict[str, Any]:
    """Keyword arguments for :class:`Key`: every field, arbitrary but well formed."""
    count = draw(st.integers(min_value=1, max_value=4))
    versions = tuple(
        Version(
            number=number,
            state=draw(st.sampled_from(VersionState)),
            created_at=draw(_times),
            uses=draw(_counts),
            # Small blobs, and some past SQLite's page size (overflow pages).
            material=draw(st.binary(max_size=96) | st.binary(min_size=4000, max_size=6000)),
            origin=draw(st.sampled_from(["broker", "external"]) | _text),
        )
        for number in range(1, count + 1)
    )
    primary = draw(st.integers(min_value=1, max_value=count))
    return {
        "id": draw(st.binary(min_size=16, max_size=16)),
        "name": draw(st.from_regex(NAME_PATTERN, fullmatch=True)),
        "type": draw(st.sampled_from(KeyType)),
        "protection": draw(_text.filter(bool)),
        "classification": draw(st.sampled_from(Classification)),
        "state": draw(st.sampled_from(KeyState)),
        "versions": versions,
        "primary_version": primary,
        "min_decrypt_version": draw(st.integers(min_value=1, max_value=primary)),
        "created_at": draw(_times),
        "updated_at": draw(_times),
        "rotation_period_s": draw(st.integers(min_value=0, max_value=2**31)),
        "max_uses_per_version": draw(st.none() | _counts),
        "exportable": draw(st.booleans()),
        "labels": draw(st.dictionaries(_text, _text, max_size=4)),
        "destroy_at": draw(st.none() | _times),
        "prior_state": draw(st.none() | st.sampled_from(KeyState)),
        "activate_at": draw(st.none() | _times),
        "deactivate_at": draw(st.none() | _times),
        "origin": draw(_text),
        "revision": draw(st.integers(min_value=1, max_value=2**62)),
    }


def keys() -> st.SearchStrategy[Key]:
    """Arbitrary well-formed :class:`Key` values."""
    return key_values().map(lambda values: Key(**values))


# --- checking keys ------------------------------------------------------------


def _describe_version(version: Version) -> str:
    # Material is shown by length and digest: a failing test should not print
    # blobs that might be real wrapped keys in a plugin author's fixture.
    parts = []
    for f in fields(Version):
        value = getattr(version, f.name)
        if f.name == "material":
            parts.append(f"material={len(value)} bytes sha256:{hashlib.sha256(value).hexdigest()[:12]}")
        else:
            parts.append(f"{f.name}={value!r}")
    return f"Version({', '.join(parts)})"


def _explain(got: Key | None, want: Key) -> str:
    if got is None:
        return f"key {want.name!r} is missing"
    lines = [f"key {want.name!r} differs from what was written:"]
    for f in fields(Key):
        stored, written = getattr(got, f.name), getattr(want, f.name)
        if f.name == "versions":
            stored = [_describe_version(v) for v in stored]
            written = [_describe_version(v) for v in written]
        if stored != written:
            lines.append(f"  {f.name}: stored {stored!r}, written {written!r}")
    return "\n".join(lines)


def _check_types(key: Key) -> None:
    """Equality alone would pass a memoryview for bytes, or a str for a StrEnum."""
    assert type(key.id) is bytes, f"id is a {type(key.id).__name__}, not bytes"
    assert isinstance(key.type, KeyType), "type must be a KeyType member"
    assert isinstance(key.classification, Classification), "classification must be a Classification"
    assert isinstance(key.state, KeyState), "state must be a KeyState member"
    assert key.prior_state is None or isinstance(key.prior_state, KeyState), "prior_state: KeyState or None"
    assert type(key.exportable) is bool, "exportable must be a bool"
    assert isinstance(key.labels, Mapping), "labels must be a mapping"
    assert type(key.versions) is tuple, "versions must be a tuple"
    for version in key.versions:
        assert isinstance(version.state, VersionState), "a version's state must be a VersionState"
        assert type(version.material) is bytes, f"material is a {type(version.material).__name__}"


def assert_stored(got: Key | None, want: Key) -> None:
    """``got`` (read back from a store) equals ``want`` field for field, with the same types."""
    assert got == want, _explain(got, want)
    assert got is not None
    _check_types(got)


def _unique(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:12]}"


class StoreConformance:
    """Tests every Store must pass. Subclasses provide the fixtures.

    Fixture contract:
        ``store``: a pytest fixture (usually async) yielding an opened object
        that implements :class:`broker.store.Store`, afresh for each test
        and closing it after. The suite may call ``aclose`` on it first, so
        ``aclose`` must be idempotent.
        ``reopen`` (optional): a fixture returning an async callable that
        opens and returns another store over the same data as ``store``.
        The suite closes ``store`` before calling it, and closes the store
        it returns. Without it the durability tests are skipped.
    """

    @pytest.fixture
    def store(self) -> Store:
        raise NotImplementedError("subclass StoreConformance and provide a `store` fixture")

    @pytest.fixture
    def reopen(self) -> OpenStore:
        async def unsupported() -> Store:
            pytest.skip("this store's tests provide no `reopen` fixture")

        return unsupported

    # --- round trips --------------------------------------------------------------

    async def test_insert_then_get_by_name_and_by_id(self, store: Store) -> None:
        key = make_key(
            "payments/card-tokens",
            classification=Classification.CONFIDENTIAL,
            rotation_period_s=30 * DAY,
            max_uses_per_version=1_000_000,
            exportable=True,
            labels={"team": "payments", "env": "prod", "note": "ü ✓"},
            deactivate_at=NOW + 365 * DAY,
            origin="import",
        )
        key = compromise(rotated(key, 2), NOW + 10_000, version=2)
        await store.insert_key(key)
        assert_stored(await store.get_key(key.name), key)
        assert_stored(await store.get_key_by_id(key.id), key)

    async def test_round_trip_keeps_none_and_empty_fields(self, store: Store) -> None:
        key = make_key(
            "ops/pre-active",
            key_type=KeyType.ED25519,
            classification=Classification.PUBLIC,
            activate=False,
            activate_at=NOW + DAY,
        )
        assert key.labels == {} and key.max_uses_per_version is None and key.destroy_at is None
        await store.insert_key(key)
        assert_stored(await store.get_key(key.name), key)

    async def test_round_trip_of_arbitrary_keys(self, store: Store) -> None:
        # pytest-trio sets async fixtures up once per test, not per hypothesis
        # example, so the property runs in a worker thread and hands each
        # example back to this test's event loop (and this store).
        async def check(key: Key) -> None:
            await store.insert_key(key)
            assert_stored(await store.get_key(key.name), key)
            assert_stored(await store.get_key_by_id(key.id), key)

        @settings(
            max_examples=50,
            deadline=None,
            # Each store plugin's subclass runs this same method on its own loop.
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors],
        )
        @given(values=key_values())
        def round_trip(values: dict[str, Any]) -> None:
            # Every example writes to the same store: give each a fresh name and id.
            name = f"{uuid.uuid4().hex[:16]}/{values['name']}"[:128]
            trio.from_thread.run(check, Key(**{**values, "name": name, "id": uuid.uuid4().bytes}))

        await trio.to_thread.run_sync(round_trip)

    @settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.differing_executors])
    @given(values=key_values())
    def test_generated_keys_set_every_field(self, values: dict[str, Any]) -> None:
        # A new Key or Version field must be added to key_values() (and to every store).
        assert set(values) == {f.name for f in fields(Key)}
        drawn = {"number", "state", "created_at", "uses", "material", "origin"}
        assert drawn == {f.name for f in fields(Version)}, "key_values() does not draw every Version field"

    async def test_missing_keys_read_as_none(self, store: Store) -> None:
        assert await store.get_key("no-such-key") is None
        assert await store.get_key_by_id(os.urandom(16)) is None

    async def test_duplicate_name_is_refused(self, store: Store) -> None:
        first = make_key("dup")
        await store.insert_key(first)
        with pytest.raises(AlreadyExists):
            await store.insert_key(make_key("dup", key_type=KeyType.HMAC_SHA256))
        assert_stored(await store.get_key("dup"), first)

    async def test_duplicate_id_is_refused(self, store: Store) -> None:
        first = make_key("dup/first")
        await store.insert_key(first)
        with pytest.raises(AlreadyExists):
            await store.insert_key(replace(make_key("dup/second"), id=first.id))
        assert await store.get_key("dup/second") is None
        assert_stored(await store.get_key_by_id(first.id), first)

    # --- replacing ------------------------------------------------------------------

    async def test_replace_at_current_revision_writes_every_change(self, store: Store) -> None:
        key = make_key("svc/replace", labels={"a": "1"})
        await store.insert_key(key)
        steps: list[Callable[[Key, int], Key]] = [
            lambda k, t: update_settings(
                k, t, rotation_period_s=7 * DAY, max_uses_per_version=500, labels={"b": "2"}
            ),
            lambda k, t: rotated(k),
            lambda k, t: update_settings(k, t, min_decrypt_version=2),
            lambda k, t: transition(k, Transition.DISABLE, t),
            lambda k, t: transition(k, Transition.SCHEDULE_DESTROY, t, pending_days=7),
            lambda k, t: transition(k, Transition.CANCEL_DESTROY, t),
            lambda k, t: transition(k, Transition.ENABLE, t),
            compromise,
        ]
        for i, step in enumerate(steps, start=1):
            new = step(key, NOW + i * 60)
            assert new.revision == key.revision + 1
            await store.replace_key(new, expected_revision=key.revision)
            assert_stored(await store.get_key(key.name), new)
            key = new

    async def test_replace_at_stale_revision_is_refused(self, store: Store) -> None:
        base = make_key("svc/race")
        await store.insert_key(base)
        winner = rotated(base)
        loser = update_settings(base, NOW + 5, labels={"late": "yes"})
        await store.replace_key(winner, expected_revision=base.revision)
        with pytest.raises(StaleRevision):
            await store.replace_key(loser, expected_revision=base.revision)
        with pytest.raises(StaleRevision):
            await store.replace_key(rotated(winner), expected_revision=winner.revision + 5)
        assert_stored(await store.get_key(base.name), winner)

    async def test_replace_unknown_key_is_not_found(self, store: Store) -> None:
        ghost = make_key("svc/ghost")
        with pytest.raises(NotFound):
            await store.replace_key(rotated(ghost), expected_revision=ghost.revision)
        assert await store.get_key(ghost.name) is None

    async def test_rotation_appends_versions(self, store: Store) -> None:
        key = make_key("svc/rotating", key_type=KeyType.HMAC_SHA256)
        await store.insert_key(key)
        for _ in range(4):
            new = rotated(key)
            await store.replace_key(new, expected_revision=key.revision)
            key = new
        got = await store.get_key(key.name)
        assert_stored(got, key)
        assert got is not None
        assert [v.number for v in got.versions] == [1, 2, 3, 4, 5]
        assert got.primary_version == 5
        assert [v.material for v in got.versions] == [material(key.name, n) for n in range(1, 6)]

    async def test_destroy_erases_material_and_keeps_metadata(self, store: Store) -> None:
        key = rotated(make_key("svc/doomed", labels={"owner": "ops"}), 2)
        await store.insert_key(key)
        pending = transition(key, Transition.SCHEDULE_DESTROY, NOW + DAY, pending_days=7)
        await store.replace_key(pending, expected_revision=key.revision)
        destroyed = transition(pending, Transition.DESTROY, NOW + 8 * DAY)
        await store.replace_key(destroyed, expected_revision=pending.revision)
        got = await store.get_key(key.name)
        assert_stored(got, destroyed)
        assert got is not None
        assert got.state is KeyState.DESTROYED
        assert all(v.material == b"" and v.state is VersionState.DESTROYED for v in got.versions)
        assert got.labels == {"owner": "ops"} and got.created_at == key.created_at

    async def test_replace_never_lowers_reserved_uses(self, store: Store) -> None:
        key = make_key("svc/cached", max_uses_per_version=100)
        await store.insert_key(key)
        assert await store.reserve_uses(key.id, 1, 30, 100) == 30
        # Written back from a cache that still says uses=0, as the broker does.
        await store.replace_key(update_settings(key, NOW + 1, labels={"x": "y"}), expected_revision=1)
        got = await store.get_key(key.name)
        assert got is not None and got.labels == {"x": "y"}
        assert got.primary.uses == 30
        assert await store.reserve_uses(key.id, 1, 100, 100) == 70

    # --- listing ----------------------------------------------------------------------

    async def _insert_all(self, store: Store, keys: list[Key]) -> None:
        for key in keys:
            await store.insert_key(key)

    async def test_list_orders_by_name(self, store: Store) -> None:
        names = ["m", "a/2", "a/10", "z.9", "a-1", "b_c", "0"]
        await self._insert_all(store, [make_key(n) for n in names])
        listed = await store.list_keys()
        assert [k.name for k in listed] == sorted(names)
        by_name = {k.name: k for k in listed}
        assert_stored(await store.get_key("m"), by_name["m"])

    async def test_list_prefix_is_literal(self, store: Store) -> None:
        names = ["app/one", "app/two", "app_x", "apq", "ap", "apple", "b/app"]
        await self._insert_all(store, [make_key(n) for n in names])

        async def listed(prefix: str) -> list[str]:
            return [k.name for k in await store.list_keys(prefix=prefix)]

        assert await listed("app/") == ["app/one", "app/two"]
        assert await listed("app_") == ["app_x"]
        assert await listed("app") == ["app/one", "app/two", "app_x", "apple"]
        assert await listed("") == sorted(names)
        assert await listed("zzz") == []

    async def test_list_filters_by_state(self, store: Store) -> None:
        active = make_key("st/active")
        pre = make_key("st/pre", activate=False)
        off = transition(make_key("st/off"), Transition.DEACTIVATE, NOW + 1)
        gone = transition(make_key("st/gone"), Transition.SCHEDULE_DESTROY, NOW + 1)
        await self._insert_all(store, [active, pre, off, gone])
        for state, expected in [
            (KeyState.ACTIVE, ["st/active"]),
            (KeyState.PRE_ACTIVE, ["st/pre"]),
            (KeyState.DEACTIVATED, ["st/off"]),
            (KeyState.DESTROY_PENDING, ["st/gone"]),
            (KeyState.COMPROMISED, []),
        ]:
            assert [k.name for k in await store.list_keys(state=state)] == expected
        assert len(await store.list_keys(prefix="st/")) == 4

    async def test_list_scheduled_holds_exactly_the_keys_time_can_make_due(self, store: Store) -> None:
        plain = make_key("sc/plain")
        keys = [
            plain,
            make_key("sc/rotating", rotation_period_s=3600),
            transition(make_key("sc/rotating-off", rotation_period_s=3600), Transition.DEACTIVATE, NOW + 1),
            make_key("sc/activates", activate=False, activate_at=NOW + 60),
            make_key("sc/deactivates", deactivate_at=NOW + 60),
            transition(make_key("sc/destroys"), Transition.SCHEDULE_DESTROY, NOW + 1),
            transition(make_key("sc/disabled"), Transition.DISABLE, NOW + 1),
        ]
        await self._insert_all(store, keys)
        expected = sorted(k.name for k in keys if is_scheduled(k))
        assert expected == ["sc/activates", "sc/deactivates", "sc/destroys", "sc/rotating"]
        listed: list[str] = []
        after: str | None = None
        while page := [k.name for k in await store.list_scheduled(after=after, limit=2)]:
            assert len(page) <= 2
            listed += page
            after = page[-1]
        assert listed == expected
        by_name = {k.name: k for k in keys}
        for key in await store.list_scheduled(limit=10):
            assert_stored(key, by_name[key.name])

    async def test_list_pages_with_after_and_limit(self, store: Store) -> None:
        keys = [make_key(f"pg/{i:02d}") for i in range(7)]
        keys += [transition(make_key(f"pg/{i:02d}x"), Transition.DISABLE, NOW + 1) for i in range(3)]
        keys.append(make_key("other"))
        await self._insert_all(store, keys)

        async def walk(limit: int, **query: Any) -> list[list[str]]:
            pages: list[list[str]] = []
            after: str | None = None
            while True:
                page = [k.name for k in await store.list_keys(after=after, limit=limit, **query)]
                if not page:
                    return pages
                assert len(page) <= limit
                pages.append(page)
                after = page[-1]

        every = sorted(k.name for k in keys if k.name.startswith("pg/"))
        pages = await walk(3, prefix="pg/")
        assert [len(p) for p in pages] == [3, 3, 3, 1]
        assert [n for p in pages for n in p] == every
        disabled = await walk(2, prefix="pg/", state=KeyState.DISABLED)
        assert disabled == [["pg/00x", "pg/01x"], ["pg/02x"]]
        # "other" sorts before "pg/": after a name, only greater names follow.
        assert [k.name for k in await store.list_keys(after="pg/02", limit=4)] == [
            "pg/02x",
            "pg/03",
            "pg/04",
            "pg/05",
        ]
        assert await store.list_keys(after="zzz") == []

    # --- usage reservations -------------------------------------------------------------

    async def test_reserve_uses_grants_up_to_the_limit(self, store: Store) -> None:
        key = rotated(make_key("use/limited", max_uses_per_version=10))
        await store.insert_key(key)
        assert [await store.reserve_uses(key.id, 2, 4, 10) for _ in range(4)] == [4, 4, 2, 0]
        # A lowered limit, already passed, grants nothing and takes nothing back.
        assert await store.reserve_uses(key.id, 2, 1, 5) == 0
        got = await store.get_key(key.name)
        assert got is not None
        assert [v.uses for v in got.versions] == [0, 10]
        assert got.revision == key.revision, "reserve_uses must not change the revision"

    async def test_reserve_uses_without_limit(self, store: Store) -> None:
        key = make_key("use/unlimited", key_type=KeyType.HMAC_SHA256)
        await store.insert_key(key)
        assert await store.reserve_uses(key.id, 1, 2**40, None) == 2**40
        assert await store.reserve_uses(key.id, 1, 5, None) == 5
        assert await store.reserve_uses(key.id, 1, 0, None) == 0
        got = await store.get_key_by_id(key.id)
        assert got is not None and got.primary.uses == 2**40 + 5

    async def test_concurrent_reservations_never_over_grant(self, store: Store) -> None:
        key = make_key("use/contended", max_uses_per_version=100)
        await store.insert_key(key)
        grants: list[int] = []

        async def reserve(count: int) -> None:
            grants.append(await store.reserve_uses(key.id, 1, count, 100))

        async with trio.open_nursery() as nursery:
            for i in range(40):
                nursery.start_soon(reserve, 1 + i % 5)
        assert sum(grants) == 100
        assert all(0 <= g <= 5 for g in grants)
        got = await store.get_key(key.name)
        assert got is not None and got.primary.uses == 100

    async def test_reserve_uses_unknown_key_or_version_is_not_found(self, store: Store) -> None:
        key = make_key("use/versions")
        await store.insert_key(key)
        with pytest.raises(NotFound):
            await store.reserve_uses(key.id, 2, 1, None)
        with pytest.raises(NotFound):
            await store.reserve_uses(os.urandom(16), 1, 1, None)

    # --- durability -----------------------------------------------------------------------

    async def test_changes_survive_reopen(self, store: Store, reopen: OpenStore) -> None:
        kept = rotated(make_key("dur/kept", labels={"k": "v"}))
        doomed = make_key("dur/doomed")
        await self._insert_all(store, [kept, doomed])
        again = rotated(kept)
        await store.replace_key(again, expected_revision=kept.revision)
        assert await store.reserve_uses(kept.id, 3, 7, None) == 7
        pending = transition(doomed, Transition.SCHEDULE_DESTROY, NOW + 1, pending_days=7)
        await store.replace_key(pending, expected_revision=doomed.revision)
        destroyed = transition(pending, Transition.DESTROY, NOW + 8 * DAY)
        await store.replace_key(destroyed, expected_revision=pending.revision)
        await store.aclose()

        reopened = await reopen()
        try:
            got = await reopened.get_key(kept.name)
            assert got is not None and got.primary.uses == 7
            reserved = tuple(replace(v, uses=7) if v.number == 3 else v for v in again.versions)
            assert_stored(got, replace(again, versions=reserved))
            assert_stored(await reopened.get_key_by_id(destroyed.id), destroyed)
            assert [k.name for k in await reopened.list_keys(prefix="dur/")] == ["dur/doomed", "dur/kept"]
        finally:
            await reopened.aclose()

    async def test_aclose_is_idempotent(self, store: Store) -> None:
        await store.aclose()
        await store.aclose()
