"""Three brokers on one PostgreSQL database, in one trio run.

Each broker has its own data directory and audit chain and the same DSN and
root key (tests/_pg_cluster.py). The server is real (tests/pg_fixtures.py);
the restart test gets a server of its own so it can restart it.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from broker.audit import verify_audit_dir
from broker.envelope import parse_header
from broker.errors import BrokerError
from tests import pg_fixtures
from tests._pg_cluster import Node, cluster_config, start_nodes
from tests.conftest import require

pg_server = pg_fixtures.pg_server
pg_dsn = pg_fixtures.pg_dsn

# Client-side bound on any one request in these tests: a request that takes
# longer has hung (the store's own call timeout is 8 s here).
REQUEST_BOUND_S = 10.0


@pytest.fixture(autouse=True)
def _needs_postgres() -> None:
    available, missing = pg_fixtures.pg_available()
    require(available, missing)


@pytest.fixture
async def nodes(pg_dsn: str, short_tmp: Path, owner: str, nursery: trio.Nursery) -> AsyncIterator[list[Node]]:
    configs = [cluster_config(short_tmp / f"b{i}", pg_dsn, i) for i in range(3)]
    started = await start_nodes(nursery, configs, owner)
    try:
        yield started
    finally:
        for node in started:
            await node.stop()


async def call(node: Node, method: str, **params: Any) -> Any:
    with trio.fail_after(REQUEST_BOUND_S):
        return await node.call(method, **params)


async def test_a_key_created_on_one_broker_is_usable_on_the_others_at_once(nodes: list[Node]) -> None:
    a, b, c = nodes
    meta = await call(a, "key.create", name="shared", type="aes256-gcm")
    sealed = await call(b, "encrypt", key="shared", plaintext=b"hello", aad=b"ctx")
    assert parse_header(sealed["ciphertext"]).key_id == meta["id"]
    opened = await call(c, "decrypt", ciphertext=sealed["ciphertext"], aad=b"ctx")
    assert opened["plaintext"] == b"hello"
    assert (await call(c, "key.get", name="shared"))["id"] == meta["id"]
    # Each broker keeps its own audit chain, whole, naming the broker in every record,
    # and the command line verifies it as it is.
    for node in nodes:
        assert verify_audit_dir(node.broker.config.audit_dir).ok
        records = (node.broker.config.audit_dir / "audit.jsonl").read_text().splitlines()
        assert records and all(json.loads(r)["node"] == node.broker.config.node for r in records)
    command = [sys.executable, "-m", "broker", "audit", "verify", "--data-dir", str(b.broker.config.data_dir)]
    done = await trio.run_process(command, capture_stdout=True, capture_stderr=True, check=False)
    assert done.returncode == 0, done.stderr


async def test_usage_limits_hold_across_brokers_under_load(nodes: list[Node]) -> None:
    limit = 1000
    await call(nodes[0], "key.create", name="metered", type="aes256-gcm", max_uses_per_version=limit)
    versions: Counter[int] = Counter()

    async def client(node: Node, batches: int) -> None:
        for _ in range(batches):
            out = await call(node, "encrypt_batch", key="metered", items=[b"x" * 16] * 10)
            for ciphertext in out["ciphertexts"]:
                versions[parse_header(ciphertext).version] += 1

    async with trio.open_nursery() as nursery:
        for node in nodes:
            for _ in range(4):
                nursery.start_soon(client, node, 50)
    assert sum(versions.values()) == 3 * 4 * 50 * 10
    assert max(versions.values()) <= limit, versions
    # 6,000 uses need at least 6 versions; forfeited lease blocks may add some.
    assert len(versions) >= 6
    meta = await call(nodes[1], "key.get", name="metered")
    assert all(v["uses"] <= limit for v in meta["versions"])


async def test_a_rotation_on_one_broker_is_used_by_another_within_a_second(nodes: list[Node]) -> None:
    a, b, _ = nodes
    await call(a, "key.create", name="turning", type="aes256-gcm")
    assert (await call(a, "encrypt", key="turning", plaintext=b"p"))["version"] == 1
    rotated = await call(b, "key.rotate", name="turning")
    acked = time.monotonic()
    assert rotated["primary_version"] == 2
    while (await call(a, "encrypt", key="turning", plaintext=b"p"))["version"] != 2:
        assert time.monotonic() - acked < 1.0, "broker A still encrypts under version 1"
        await trio.sleep(0.005)


@pytest.mark.slow
async def test_concurrent_rotations_give_contiguous_versions(nodes: list[Node]) -> None:
    per_broker, tasks = 200, 4
    await call(nodes[0], "key.create", name="spinning", type="aes256-gcm")
    acked: list[int] = []
    gave_up = Counter[str]()

    async def rotate(node: Node, count: int) -> None:
        done = 0
        while done < count:
            try:
                meta = await call(node, "key.rotate", name="spinning")
            except BrokerError as exc:
                # Optimistic retries can run out under this contention; the
                # client's answer is `unavailable`, and it tries again.
                assert exc.code == "unavailable", exc
                gave_up[exc.code] += 1
                continue
            acked.append(meta["primary_version"])
            done += 1

    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        for node in nodes:
            for _ in range(tasks):
                nursery.start_soon(rotate, node, per_broker // tasks)
    elapsed = time.monotonic() - started
    total = per_broker * len(nodes)
    assert sorted(acked) == list(range(2, total + 2)), "duplicate or missing versions"
    meta = await call(nodes[2], "key.get", name="spinning")
    assert [v["version"] for v in meta["versions"]] == list(range(1, total + 2))
    print(f"{total} rotations in {elapsed:.1f} s, {sum(gave_up.values())} retried by the client")


async def test_scheduling_moves_to_another_broker_when_the_leader_dies(nodes: list[Node]) -> None:
    retry_s = nodes[0].broker.store.options.leader_retry_s  # type: ignore[attr-defined]
    with trio.fail_after(3 * retry_s + 1):
        while sum(node.is_leader() for node in nodes) != 1:
            await trio.sleep(0.02)
    leader = next(node for node in nodes if node.is_leader())
    others = [node for node in nodes if node is not leader]
    await leader.stop()
    stopped = time.monotonic()
    with trio.fail_after(retry_s + 1.0):
        while not any(node.is_leader() for node in others):
            await trio.sleep(0.01)
    took = time.monotonic() - stopped
    assert took <= retry_s + 0.5, f"took {took:.2f} s with a retry interval of {retry_s} s"
    assert sum(node.is_leader() for node in others) == 1
    print(f"leadership moved {took:.2f} s after the leader stopped (retry interval {retry_s} s)")


@pytest.mark.slow
async def test_a_server_restart_under_load_loses_no_acknowledged_change(
    short_tmp: Path, owner: str, nursery: trio.Nursery
) -> None:
    prefix = pg_fixtures._run_as_prefix()
    assert prefix is not None
    server = pg_fixtures.start_server(prefix)
    try:
        dsn = server.create_database()
        configs = [cluster_config(short_tmp / f"r{i}", dsn, i, call_timeout_s=5.0) for i in range(2)]
        nodes = await start_nodes(nursery, configs, owner)
        for i in range(4):
            await call(nodes[0], "key.create", name=f"busy/{i}", type="aes256-gcm", max_uses_per_version=200)
        created: set[str] = set()
        rotated: dict[str, set[int]] = {f"busy/{i}": set() for i in range(4)}
        errors: Counter[str] = Counter()
        slowest = 0.0
        stop = trio.Event()

        async def load(node: Node, worker: int) -> None:
            nonlocal slowest
            n = 0
            while not stop.is_set():
                n += 1
                key = f"busy/{n % 4}"
                started = time.monotonic()
                try:
                    if n % 5 == 0:
                        meta = await call(node, "key.rotate", name=key)
                        rotated[key].add(meta["primary_version"])
                    elif n % 7 == 0:
                        name = f"new/{node.broker.config.node}/{worker}/{n}"
                        await call(node, "key.create", name=name, type="aes256-gcm")
                        created.add(name)
                    else:
                        await call(node, "encrypt_batch", key=key, items=[b"y"] * 20)
                except BrokerError as exc:
                    errors[exc.code] += 1
                    await trio.sleep(0.02)
                slowest = max(slowest, time.monotonic() - started)

        async with trio.open_nursery() as load_nursery:
            for node in nodes:
                for worker in range(3):
                    load_nursery.start_soon(load, node, worker)
            await trio.sleep(0.5)
            await trio.to_thread.run_sync(server.restart)
            restarted = time.monotonic()
            # Service resumes: both brokers answer a change again.
            for node in nodes:
                with trio.fail_after(REQUEST_BOUND_S):
                    while True:
                        try:
                            await node.call("key.rotate", name="busy/0")
                            break
                        except BrokerError as exc:
                            assert exc.code == "unavailable"
                            await trio.sleep(0.05)
            resumed = time.monotonic() - restarted
            await trio.sleep(0.5)
            stop.set()

        assert set(errors) <= {"unavailable"}, errors
        assert slowest < REQUEST_BOUND_S
        # Every acknowledged change is there, read back from the database.
        store = nodes[1].broker.store
        for name in created:
            assert await store.get_key(name) is not None, f"acknowledged create of {name} lost"
        for key, versions in rotated.items():
            stored = await store.get_key(key)
            assert stored is not None
            assert versions <= {v.number for v in stored.versions}, f"acknowledged rotation of {key} lost"
        assert sum(node.broker.store is not None for node in nodes) == 2
        print(f"errors during the restart: {dict(errors)}; service resumed {resumed:.2f} s after it")
        for node in nodes:
            await node.stop()
    finally:
        pg_fixtures.discard_server(server)
