"""``python -m bench load``: many connections, a realistic mix, a fixed time.

1,000 connections (``--quick``: 100) against one broker process on embedded
defaults, each looping over a mix of 70% single-item encrypt/decrypt, 20%
batches (100 items) and 10% lifecycle calls (get, rotate, update) on a pool
of keys, for a fixed time. Reports throughput, p50/p99 latency, errors
(which must be zero) and the broker's peak RSS. The test suite runs a small
version of the same generator (tests/integration/test_load_small.py).
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from bench import machine_info
from broker.client import AsyncClient
from tests._broker_process import broker_process

KEYS = 20
BATCH = 100


@dataclass
class LoadResult:
    connections: int
    duration_s: float
    requests: int = 0
    items: int = 0
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    by_kind: dict[str, int] = field(default_factory=dict)

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else 0.0


async def _connection(path: Path, seed: int, deadline: float, result: LoadResult, ready: trio.Event) -> None:
    rng = random.Random(seed)
    async with AsyncClient(path) as client:
        await ready.wait()
        sealed: list[bytes] = []
        while trio.current_time() < deadline:
            key = f"load/{rng.randrange(KEYS)}"
            roll = rng.random()
            started = time.perf_counter()
            try:
                if roll < 0.35 or (roll < 0.70 and not sealed):
                    kind = "encrypt"
                    sealed.append((await client.encrypt(key, os.urandom(64)))["ciphertext"])
                    del sealed[:-8]
                    result.items += 1
                elif roll < 0.70:
                    kind = "decrypt"
                    await client.decrypt(sealed[rng.randrange(len(sealed))])
                    result.items += 1
                elif roll < 0.90:
                    kind = "batch"
                    items = [os.urandom(32) for _ in range(BATCH)]
                    out = await client.encrypt_batch(key, items)
                    opened = await client.decrypt_batch(out["ciphertexts"])
                    if opened["plaintexts"] != items:
                        raise AssertionError("batch round trip changed the items")
                    result.items += 2 * BATCH
                else:
                    kind = "lifecycle"
                    pick = rng.random()
                    if pick < 0.5:
                        await client.key_get(key)
                    elif pick < 0.75:
                        await client.key_rotate(key)
                    else:
                        await client.key_update(key, labels={"seen": str(seed)})
            except Exception as exc:  # every failure is a finding: count it, name it
                result.errors.append(f"{type(exc).__name__}: {exc}"[:200])
                continue
            result.latencies.append(time.perf_counter() - started)
            result.requests += 1 if kind != "batch" else 2
            result.by_kind[kind] = result.by_kind.get(kind, 0) + 1


async def run_load(path: Path, connections: int, duration_s: float, seed: int = 0) -> LoadResult:
    """Drive ``connections`` clients against the broker at ``path`` for ``duration_s``."""
    async with AsyncClient(path) as admin:
        for i in range(KEYS):
            await admin.key_create(f"load/{i}", "aes256-gcm")
    result = LoadResult(connections, duration_s)
    ready = trio.Event()
    async with trio.open_nursery() as nursery:
        deadline = trio.current_time() + duration_s + 5.0  # connections open first
        for i in range(connections):
            nursery.start_soon(_connection, path, seed * 100_000 + i, deadline, result, ready)
        await trio.sleep(5.0)
        result.latencies.clear()
        result.requests = result.items = 0
        ready.set()
    return result


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run(quick: bool = False) -> dict[str, Any]:
    connections = 100 if quick else 1000
    duration = 10.0 if quick else 60.0
    directory = Path(tempfile.mkdtemp(prefix="kb-load-", dir="/tmp"))
    try:
        with broker_process(directory, "--log-level", "warning") as broker:
            result = trio.run(run_load, broker.socket_path, connections, duration)
            rss = peak_rss_mib(broker.proc.pid)
            alive = broker.alive()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    figures = {
        "connections": connections,
        "duration_s": duration,
        "requests": result.requests,
        "requests_per_s": result.requests / duration,
        "items_per_s": result.items / duration,
        "p50_ms": result.percentile(0.50) * 1e3,
        "p99_ms": result.percentile(0.99) * 1e3,
        "errors": len(result.errors),
        "broker_peak_rss_mib": rss,
        "broker_alive": alive,
        "by_kind": result.by_kind,
    }
    rows = [[name, f"{value:,.1f}" if isinstance(value, float) else value] for name, value in figures.items()]
    return {
        "name": "load",
        "quick": quick,
        "machine": machine_info(),
        "columns": ["figure", "value"],
        "rows": rows,
        "figures": figures,
        "first_errors": result.errors[:10],
    }
