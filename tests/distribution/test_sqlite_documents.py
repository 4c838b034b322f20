"""The SQLite store passes the document conformance suite; a version-1 database migrates."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from keybroker_sqlite import SCHEMA_VERSION, SQLiteStore
from keybroker_sqlite.schema import APPLICATION_ID, MIGRATIONS

from broker.store import Store
from broker.testing.document_suite import DocumentConformance


class TestSQLiteDocuments(DocumentConformance):
    @pytest.fixture
    def reopen(self, tmp_path: Path) -> Callable[[], Awaitable[Store]]:
        async def open_store() -> Store:
            store = SQLiteStore(tmp_path / "data" / "keys.db")
            await store.open()
            return store

        return open_store

    @pytest.fixture
    async def store(self, reopen: Callable[[], Awaitable[Store]]) -> AsyncIterator[Store]:
        store = await reopen()
        try:
            yield store
        finally:
            await store.aclose()


async def test_version_1_database_migrates_and_reads_origin_broker(tmp_path: Path) -> None:
    path = tmp_path / "keys.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for statement in MIGRATIONS[0]:
        conn.execute(statement)
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    conn.execute("PRAGMA user_version = 1")
    key_id = bytes(16)
    conn.execute(
        "INSERT INTO keys VALUES (?, 'old', 'aes256-gcm', 'software', 'internal', 'active', NULL, 1, 1, 0,"
        " NULL, 0, '{}', 1, 1, NULL, NULL, NULL, 'broker', 1)",
        (key_id,),
    )
    conn.execute("INSERT INTO versions VALUES (?, 1, 'active', 1, 0, x'00')", (key_id,))
    conn.close()
    store = SQLiteStore(path)
    await store.open()
    try:
        key = await store.get_key("old")
        assert key is not None and [v.origin for v in key.versions] == ["broker"]
        assert (await store.pragmas())["user_version"] == SCHEMA_VERSION
        await store.put_document("cert", "1", b"x")
    finally:
        await store.aclose()
