"""Prometheus metrics: what operators watch.

Counters and histograms are updated on the request path (cheap: a dict
lookup and an add); gauges that need the store (keys by state) are refreshed
by a background task. Metrics are served only when ``[metrics] listen`` is
set, on a loopback address by default, in a thread of prometheus-client's.
Each broker has its own registry, so several brokers in one process (tests)
never mix their figures.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from .errors import BrokerError
from .keys import KeyState
from .service import KeyService

__all__ = ["Metrics"]

log = logging.getLogger("keybroker.metrics")

# Request latencies from 50 µs (a pipelined encrypt) to 10 s (a huge batch).
LATENCY_BUCKETS = (
    5e-5,
    1e-4,
    2.5e-4,
    5e-4,
    1e-3,
    2.5e-3,
    5e-3,
    1e-2,
    2.5e-2,
    0.05,
    0.1,
    0.25,
    1.0,
    2.5,
    10.0,
)
BATCH_BUCKETS = (1, 10, 100, 1_000, 10_000, 100_000)
# How often keys are counted by state.
REFRESH_S = 15.0
PAGE = 1000


class Metrics:
    """The broker's metrics in a registry of its own."""

    def __init__(self) -> None:
        self._children: dict[tuple[str, str], tuple[Any, Any, Any]] = {}
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "keybroker_requests",
            "Requests by method and outcome code",
            ["method", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "keybroker_request_seconds",
            "Request latency by method",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_items = Histogram(
            "keybroker_batch_items",
            "Items per batch request",
            ["method"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.keys = Gauge("keybroker_keys", "Keys by state", ["state"], registry=self.registry)
        self.scheduler_actions = Counter(
            "keybroker_scheduler_actions",
            "Actions taken by the scheduler",
            ["action", "outcome"],
            registry=self.registry,
        )

    def observe(self, method: str, code: str, seconds: float, items: int | None) -> None:
        # Label look-ups cost more than the update; keep each method's children.
        children = self._children.get((method, code))
        if children is None:
            children = self._children[(method, code)] = (
                self.requests.labels(method, code),
                self.latency.labels(method),
                self.batch_items.labels(method),
            )
        requests, latency, batch = children
        requests.inc()
        latency.observe(seconds)
        if items is not None:
            batch.observe(items)

    def set_key_counts(self, counts: Mapping[str, int]) -> None:
        for state, count in counts.items():
            self.keys.labels(state).set(count)

    def serve(self, host: str, port: int) -> tuple[int, Callable[[], None]]:
        """Serve /metrics on ``host:port`` in a background thread.

        Returns:
            The bound port and a function that stops the server.
        """
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        bound = int(server.server_address[1])
        log.info("metrics on http://%s:%d/metrics", host, bound)

        def stop() -> None:
            server.shutdown()
            server.server_close()
            thread.join(5)

        return bound, stop

    async def count_keys(self, service: KeyService) -> None:
        """Count keys by state now."""
        counts = dict.fromkeys((state.value for state in KeyState), 0)
        after: str | None = None
        while True:
            keys = await service.list_keys(prefix="", state=None, limit=PAGE, after=after)
            for key in keys:
                counts[key.state.value] += 1
            if len(keys) < PAGE:
                break
            after = keys[-1].name
        self.set_key_counts(counts)

    async def refresh_keys(self, service: KeyService, interval_s: float = REFRESH_S) -> None:
        """Count keys by state every ``interval_s`` seconds, until cancelled."""
        while True:
            try:
                await self.count_keys(service)
            except BrokerError as exc:
                log.warning("could not count keys: %s", exc.code)
            await trio.sleep(interval_s)
