"""keybroker's service beside a PyKMIP server (part of ``python -m bench peers``).

keybroker runs as ``python -m broker serve`` on embedded defaults (SQLite,
root key file, audit log flushed before every reply) and is driven over its
Unix socket by :class:`broker.client.Client` with its defaults (one client,
which polls briefly for each reply before it sleeps) and
:class:`broker.client.AsyncClient` (8 clients, one connection and one trio
task each, in one process). PyKMIP runs as ``KmipServer`` over TLS on
loopback and is driven by ``ProxyKmipClient`` (one client in this process; 8
clients in 8 processes, see :class:`bench.peers_kmip.Workers`).

Figures, medians of interleaved repeats:

* create ops/s -- keybroker ``key.create`` of an aes256-gcm key (stored,
  activated, audited) vs KMIP ``Create`` of an AES-256 key (left pre-active);
* encrypt ops/s -- ``encrypt`` of 32 bytes vs KMIP ``Encrypt`` (AES-GCM,
  server-generated IV), 1 and 8 clients;
* ping ops/s -- keybroker ``ping`` with one client: the round trip of a
  request that does no work, the ceiling of any single-client figure;
* the same single-client encrypt and ping with a client that sleeps at once
  while it waits for each reply (``Client(busy_poll_us=0)``);
* batch items/s -- one ``encrypt_batch`` of 10,000 x 32-byte items vs the
  same items sent to PyKMIP one ``Encrypt`` request each (a bounded number of
  requests, timed).

Beside each keybroker figure, the CPU time of the broker's event-loop thread
(user and system, from ``/proc``) per request and how busy it was: a figure
bound by that thread shows it near 100% busy. The broker runs its default
polls (``[limits] busy_poll_us``, ``gather_poll_us``), whose windows count as
busy, so these are upper bounds on the work a request costs.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import trio

from bench.peers_common import LoopCpu, interleaved, rate, server_pid
from bench.peers_kmip import Endpoint, Workers, active_key, aes256, client, gcm_parameters
from broker.client import DEFAULT_BUSY_POLL_US, AsyncClient, Client

CONCURRENT = 8
BATCH = 10_000
KEY = "bench/peers"
_names = itertools.count()


def _key_name() -> str:
    return f"bench/created/{os.getpid()}/{next(_names)}"


async def concurrent_rate(socket_path: Path, op: str, clients: int, seconds: float, key: str = KEY) -> float:
    """Calls per second of ``clients`` AsyncClients (a connection and a task each) calling ``op``
    ("create": key.create of a fresh aes256-gcm key; "encrypt": 32 bytes under ``key``)."""
    done = warm = 0
    everyone_warm, start = trio.Event(), trio.Event()
    deadline = 0.0
    payload = bytes(32)

    async def one(kb: AsyncClient) -> None:
        nonlocal done, warm
        call: Callable[[], Awaitable[Any]]
        if op == "create":

            def call() -> Awaitable[Any]:
                return kb.key_create(_key_name(), "aes256-gcm")
        else:

            def call() -> Awaitable[Any]:
                return kb.encrypt(key, payload)

        await call()
        warm += 1
        if warm == clients:
            everyone_warm.set()
        await start.wait()
        while trio.current_time() < deadline:
            await call()
            done += 1

    async with AsyncExitStack() as stack:
        kbs = [await stack.enter_async_context(AsyncClient(socket_path)) for _ in range(clients)]
        async with trio.open_nursery() as nursery:
            for kb in kbs:
                nursery.start_soon(one, kb)
            await everyone_warm.wait()
            began = time.perf_counter()
            deadline = trio.current_time() + seconds
            start.set()
        elapsed = time.perf_counter() - began
    return done / elapsed


def measure(
    socket_path: Path, endpoint: Endpoint, *, quick: bool, seconds: float, repeats: int
) -> dict[str, Any]:
    """Medians (and samples) of every service figure, keybroker and PyKMIP in turns."""
    items = [os.urandom(32) for _ in range(BATCH)]
    kmip_requests = 300 if quick else 1_000
    payload = bytes(32)
    workers = Workers(endpoint, CONCURRENT)
    loop_cpu = LoopCpu(server_pid(socket_path))
    try:
        with (
            Client(socket_path) as kb,
            Client(socket_path, busy_poll_us=0) as blocking,
            client(endpoint) as kmip,
        ):
            kb.key_create(KEY, "aes256-gcm")
            uid = active_key(kmip)
            params = gcm_parameters()

            def kmip_encrypt() -> object:
                return kmip.encrypt(payload, uid=uid, cryptographic_parameters=params)

            def kmip_items() -> None:
                for item in items[:kmip_requests]:
                    kmip.encrypt(item, uid=uid, cryptographic_parameters=params)

            def kb_concurrent(op: str) -> Callable[[], float]:
                return lambda: trio.run(concurrent_rate, socket_path, op, CONCURRENT, seconds)

            samplers: dict[str, Callable[[], float]] = {
                "keybroker|create x1": lambda: rate(
                    lambda: kb.key_create(_key_name(), "aes256-gcm"), 1, seconds
                ),
                "pykmip|create x1": lambda: rate(lambda: kmip.create(*aes256()), 1, seconds),
                "keybroker|create x8": kb_concurrent("create"),
                "pykmip|create x8": lambda: workers.rate("create", uid, seconds),
                "keybroker|encrypt x1": lambda: rate(lambda: kb.encrypt(KEY, payload), 1, seconds),
                "pykmip|encrypt x1": lambda: rate(kmip_encrypt, 1, seconds),
                "keybroker|encrypt x8": kb_concurrent("encrypt"),
                "pykmip|encrypt x8": lambda: workers.rate("encrypt", uid, seconds),
                "keybroker|ping x1": lambda: rate(kb.ping, 1, seconds),
                "keybroker|encrypt x1 blocking": lambda: rate(
                    lambda: blocking.encrypt(KEY, payload), 1, seconds
                ),
                "keybroker|ping x1 blocking": lambda: rate(blocking.ping, 1, seconds),
                "keybroker|batch items": lambda: rate(lambda: kb.encrypt_batch(KEY, items), BATCH, seconds),
                "pykmip|batch items": lambda: rate(kmip_items, kmip_requests, 0.0),
            }
            samplers = {
                name: loop_cpu.around(name, sample) if name.startswith("keybroker|") else sample
                for name, sample in samplers.items()
            }
            medians, samples = interleaved(samplers, repeats)
    finally:
        workers.close()
    return {
        "medians": medians,
        "samples": samples,
        "batch_items": BATCH,
        "pykmip_requests_per_batch_sample": kmip_requests,
        "concurrent_clients": CONCURRENT,
        "client_busy_poll_us": DEFAULT_BUSY_POLL_US,
        "event_loop_cpu": loop_cpu.medians(),
    }
