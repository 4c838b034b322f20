"""Conformance tests for the store's document API and per-version origin.

Every store runs these next to :class:`~broker.testing.store_suite.StoreConformance`
(same fixtures: ``store``, and optionally ``reopen``)::

    from broker.testing.document_suite import DocumentConformance

    class TestMyStoreDocuments(DocumentConformance):
        ...  # the same ``store`` / ``reopen`` fixtures as the store suite

Behaviour this suite defines, beyond :class:`broker.store.Store`'s docstrings:

- ``put_document`` replaces a body whole; ``get_document`` of an absent
  document is None; bodies are arbitrary bytes (NUL included) of up to 64 KiB
  at least, read back as ``bytes``.
- Kinds are separate namespaces; ``list_documents`` orders ids in binary
  (code point) order, pages with ``after`` and ``limit``.
- A malformed kind or id raises ``ValueError`` (or ``TypeError``).
- ``Version.origin`` ("broker" or "external") round-trips through
  ``insert_key`` and ``replace_key``.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from dataclasses import replace

import pytest

from broker.keys import Classification, KeyType
from broker.lifecycle import add_version, new_key
from broker.store import Store

__all__ = ["DocumentConformance"]

OpenStore = Callable[[], Awaitable[Store]]
NOW = 1_700_000_000


class DocumentConformance:
    """Tests of the document API every Store must pass. Subclasses provide the fixtures."""

    @pytest.fixture
    def store(self) -> Store:
        raise NotImplementedError("subclass DocumentConformance and provide a `store` fixture")

    @pytest.fixture
    def reopen(self) -> OpenStore:
        async def unsupported() -> Store:
            pytest.skip("this store's tests provide no `reopen` fixture")

        return unsupported

    async def test_put_get_and_replace(self, store: Store) -> None:
        assert await store.get_document("cert", "01") is None
        await store.put_document("cert", "01", b"first")
        assert await store.get_document("cert", "01") == b"first"
        await store.put_document("cert", "01", b"second, longer body")
        got = await store.get_document("cert", "01")
        assert got == b"second, longer body" and type(got) is bytes

    async def test_bodies_are_arbitrary_bytes(self, store: Store) -> None:
        body = b"\x00\xff" + os.urandom(64 * 1024)
        await store.put_document("blob", "big", body)
        assert await store.get_document("blob", "big") == body
        await store.put_document("blob", "empty", b"")
        assert await store.get_document("blob", "empty") == b""

    async def test_kinds_are_separate(self, store: Store) -> None:
        await store.put_document("cert", "same", b"a cert")
        await store.put_document("ca_cert", "same", b"a ca")
        assert await store.get_document("cert", "same") == b"a cert"
        assert await store.get_document("ca_cert", "same") == b"a ca"
        assert await store.list_documents("other") == []

    async def test_list_orders_and_pages(self, store: Store) -> None:
        ids = ["b", "a", "c/1", "c/0", "Z", "é", "a_b", "a%b"]
        for doc_id in ids:
            await store.put_document("page", doc_id, doc_id.encode())
        want = sorted(ids)  # Python orders str by code point, as the store must
        got = await store.list_documents("page", limit=100)
        assert [i for i, _ in got] == want
        assert all(body == i.encode() and type(body) is bytes for i, body in got)
        seen: list[str] = []
        after: str | None = None
        while True:
            page = await store.list_documents("page", after=after, limit=3)
            seen += [i for i, _ in page]
            if len(page) < 3:
                break
            after = page[-1][0]
        assert seen == want
        assert await store.list_documents("page", limit=0) == []

    @pytest.mark.parametrize(
        ("kind", "doc_id"), [("", "x"), ("k", ""), ("k\x00", "x"), ("k", "x\x00"), ("k" * 65, "x")]
    )
    async def test_malformed_refs_are_refused(self, store: Store, kind: str, doc_id: str) -> None:
        with pytest.raises((ValueError, TypeError)):
            await store.put_document(kind, doc_id, b"x")

    async def test_documents_survive_reopen(self, store: Store, reopen: OpenStore) -> None:
        await store.put_document("cert", "kept", b"durable")
        await store.aclose()
        again = await reopen()
        try:
            assert await again.get_document("cert", "kept") == b"durable"
        finally:
            await again.aclose()

    async def test_version_origin_round_trips(self, store: Store) -> None:
        key = new_key(
            key_id=os.urandom(16),
            name=f"origin/{os.urandom(4).hex()}",
            key_type=KeyType.AES256_GCM,
            protection="software",
            classification=Classification.INTERNAL,
            material=b"wrapped-1",
            now=NOW,
            origin="external",
        )
        key = replace(key, versions=tuple(replace(v, origin="external") for v in key.versions))
        await store.insert_key(key)
        got = await store.get_key(key.name)
        assert got is not None and got.origin == "external"
        assert [v.origin for v in got.versions] == ["external"]
        rotated = add_version(got, b"wrapped-2", NOW + 1)
        await store.replace_key(rotated, expected_revision=got.revision)
        again = await store.get_key_by_id(key.id)
        assert again is not None and [v.origin for v in again.versions] == ["external", "broker"]
