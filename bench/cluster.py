"""``python -m bench cluster``: brokers sharing one PostgreSQL database.

A PostgreSQL server is started for the run (tests/pg_fixtures.py: loopback,
fsync on) and 1, 2 or 3 ``keybroker serve`` processes share one database,
each with its own data directory and the same root key. Clients in this
process (trio, over the brokers' Unix sockets) are spread round-robin over
the brokers in use.

Figures:
  encrypt_batch items/s   8 connections looping encrypt_batch of 1,000 x 32 B
                          on one key, for 1, 2 and 3 brokers
  rotations/s             4 connections per broker rotating keys of their own,
                          and all of them rotating one shared key (optimistic
                          retries, version numbers stay contiguous)
  rotation seen by others time from the ack of key.rotate on broker B until
                          an encrypt on broker A (looping) returns the new
                          version: NOTIFY delivery, cache drop, and a reload
                          from PostgreSQL

``--quick``: shorter runs and fewer repeats.
"""

from __future__ import annotations

import functools
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import trio

from bench import machine_info, median
from broker.client import AsyncClient
from broker.errors import BrokerError
from tests import pg_fixtures
from tests._broker_process import BrokerProcess, broker_process

BATCH = 1000
ITEM = b"k" * 32
THROUGHPUT_CONNECTIONS = 8
ROTATORS_PER_BROKER = 4


def _config(path: Path, dsn: str, index: int) -> Path:
    path.write_text(
        f'node = "bench-{index}"\nstore = "postgres"\n\n[plugins.postgres]\ndsn = "{dsn}"\n'
        "pool_max = 4\nleader_retry_s = 2.0\n"
    )
    return path


@contextmanager
def _brokers(directory: Path, dsn: str, count: int) -> Iterator[list[BrokerProcess]]:
    """``count`` broker processes on ``dsn``, the first one's root key copied to the others."""
    with ExitStack() as stack:
        started: list[BrokerProcess] = []
        for i in range(count):
            home = directory / f"b{i}"
            home.mkdir(parents=True, exist_ok=True)
            if started:
                data = home / "data"
                data.mkdir(mode=0o700, exist_ok=True)
                shutil.copyfile(started[0].data_dir / "root.key", data / "root.key")
                os.chmod(data / "root.key", 0o600)
            config = _config(home / "broker.toml", dsn, i)
            started.append(
                stack.enter_context(broker_process(home, "--log-level", "warning", config=config))
            )
        yield started


async def _throughput(sockets: list[Path], seconds: float) -> float:
    """encrypt_batch items/s over THROUGHPUT_CONNECTIONS connections spread over ``sockets``."""
    async with AsyncClient(sockets[0]) as admin:
        try:
            await admin.key_create("bench/throughput", "aes256-gcm")
        except BrokerError as exc:
            if exc.code != "already_exists":
                raise
    items = [ITEM] * BATCH
    done = 0
    go = trio.Event()

    async def connection(path: Path, deadline_box: list[float]) -> None:
        nonlocal done
        async with AsyncClient(path) as client:
            await client.encrypt_batch("bench/throughput", items)  # warm cache and lease
            await go.wait()
            while trio.current_time() < deadline_box[0]:
                await client.encrypt_batch("bench/throughput", items)
                done += BATCH

    deadline_box = [float("inf")]
    async with trio.open_nursery() as nursery:
        for i in range(THROUGHPUT_CONNECTIONS):
            nursery.start_soon(connection, sockets[i % len(sockets)], deadline_box)
        await trio.sleep(1.0)
        start = trio.current_time()
        deadline_box[0] = start + seconds
        go.set()
    return done / (trio.current_time() - start)


async def _rotations(sockets: list[Path], seconds: float, *, shared: bool, tag: str) -> tuple[float, int]:
    """Rotations/s over ROTATORS_PER_BROKER connections per broker; (rate, client retries).

    Each run rotates fresh keys (``tag``): a key's rotation cost grows with
    its number of versions, which repeated runs would otherwise pile up.
    """
    count = len(sockets) * ROTATORS_PER_BROKER
    names = [f"bench/rot-{tag}-{'shared' if shared else i}" for i in range(count)]
    async with AsyncClient(sockets[0]) as admin:
        for name in sorted(set(names)):
            await admin.key_create(name, "aes256-gcm")
    done = retries = 0

    async def rotator(path: Path, name: str, deadline: float) -> None:
        nonlocal done, retries
        async with AsyncClient(path) as client:
            while trio.current_time() < deadline:
                try:
                    await client.key_rotate(name)
                except BrokerError as exc:
                    if exc.code != "unavailable":  # optimistic retries ran out: try again
                        raise
                    retries += 1
                    continue
                done += 1

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for i, name in enumerate(names):
            nursery.start_soon(rotator, sockets[i % len(sockets)], name, start + seconds)
    return done / (trio.current_time() - start), retries


async def _visibility(a: Path, b: Path, repeats: int, name: str) -> list[float]:
    """Seconds from a rotate ack on ``b`` until an encrypt on ``a`` uses the new version."""
    delays: list[float] = []
    async with AsyncClient(a) as on_a, AsyncClient(b) as on_b:
        await on_b.key_create(name, "aes256-gcm")
        for _ in range(repeats):
            await on_a.encrypt(name, b"p")  # A's cache holds the current version
            rotated = await on_b.key_rotate(name)
            acked = time.perf_counter()
            while (await on_a.encrypt(name, b"p"))["version"] != rotated["primary_version"]:
                pass
            delays.append(time.perf_counter() - acked)
            await trio.sleep(0.05)
    return delays


def run(quick: bool = False) -> dict[str, Any]:
    seconds = 2.0 if quick else 5.0
    repeats = 1 if quick else 3
    visible_repeats = 20 if quick else 100
    available, missing = pg_fixtures.pg_available()
    if not available:
        raise SystemExit(f"bench cluster needs {missing}")
    prefix = pg_fixtures._run_as_prefix()
    assert prefix is not None
    server = pg_fixtures.start_server(prefix)
    directory = Path(tempfile.mkdtemp(prefix="kb-cluster-", dir="/tmp"))
    figures: dict[str, Any] = {}
    try:
        for count in (1, 2, 3):
            dsn = server.create_database()
            with _brokers(directory / f"n{count}", dsn, count) as brokers:
                sockets = [b.socket_path for b in brokers]
                rates = [trio.run(_throughput, sockets, seconds) for _ in range(repeats)]
                figures[f"encrypt_batch_items_per_s_{count}"] = median(rates)
                own = [
                    trio.run(functools.partial(_rotations, sockets, seconds, shared=False, tag=f"o{r}"))
                    for r in range(repeats)
                ]
                figures[f"rotations_per_s_own_keys_{count}"] = median([r for r, _ in own])
                one = [
                    trio.run(functools.partial(_rotations, sockets, seconds, shared=True, tag=f"s{r}"))
                    for r in range(repeats)
                ]
                figures[f"rotations_per_s_one_key_{count}"] = median([r for r, _ in one])
                figures[f"rotation_client_retries_one_key_{count}"] = sum(n for _, n in one)
                if count == 2:
                    delays = trio.run(_visibility, sockets[0], sockets[1], visible_repeats, "bench/visible")
                    ordered = sorted(delays)
                    figures["rotation_visible_ms_p50"] = statistics.median(delays) * 1e3
                    figures["rotation_visible_ms_p90"] = ordered[int(0.9 * (len(ordered) - 1))] * 1e3
                    figures["rotation_visible_ms_max"] = ordered[-1] * 1e3
                    same = trio.run(_visibility, sockets[1], sockets[1], visible_repeats, "bench/visible-1")
                    figures["rotation_visible_same_broker_ms_p50"] = statistics.median(same) * 1e3
                if not all(b.alive() for b in brokers):
                    raise RuntimeError("a broker died during the run")
    finally:
        pg_fixtures.discard_server(server)
        shutil.rmtree(directory, ignore_errors=True)

    base = figures["encrypt_batch_items_per_s_1"]
    rows: list[list[Any]] = []
    for count in (1, 2, 3):
        rows.append([f"encrypt_batch {BATCH} x 32 B (items/s)", count,
                     round(figures[f"encrypt_batch_items_per_s_{count}"]),
                     round(figures[f"encrypt_batch_items_per_s_{count}"] / base, 2)])
    for count in (1, 2, 3):
        rows.append(["rotations/s, a key per connection", count,
                     round(figures[f"rotations_per_s_own_keys_{count}"], 1), ""])
    for count in (1, 2, 3):
        rows.append(["rotations/s, all on one key", count,
                     round(figures[f"rotations_per_s_one_key_{count}"], 1),
                     f"{figures[f'rotation_client_retries_one_key_{count}']} client retries"])
    rows.append(["rotate on B → A encrypts new version, p50 / p90 / max (ms)", 2,
                 f"{figures['rotation_visible_ms_p50']:.2f} / {figures['rotation_visible_ms_p90']:.2f} / "
                 f"{figures['rotation_visible_ms_max']:.2f}", ""])
    rows.append(["same, rotate and encrypt on one broker, p50 (ms)", 1,
                 f"{figures['rotation_visible_same_broker_ms_p50']:.2f}", ""])
    return {
        "columns": ["figure", "brokers", "value", "vs 1 broker"],
        "rows": rows,
        "figures": figures,
        "ratios": {
            "encrypt_batch_2_vs_1": figures["encrypt_batch_items_per_s_2"] / base,
            "encrypt_batch_3_vs_1": figures["encrypt_batch_items_per_s_3"] / base,
        },
        "settings": {"seconds": seconds, "repeats": repeats, "batch": BATCH,
                     "throughput_connections": THROUGHPUT_CONNECTIONS,
                     "rotators_per_broker": ROTATORS_PER_BROKER, "visibility_repeats": visible_repeats},
        "machine": machine_info(),
        "quick": quick,
    }
