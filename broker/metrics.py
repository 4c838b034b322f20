"""Prometheus metrics: what operators watch.

Request counters and histograms are plain numbers updated on the request
path (a dict look-up and a few additions) and exported when scraped; gauges
that need the store (keys by state) are refreshed by a background task.
Metrics are served only when ``[metrics]`` is set, on a loopback address by
default, by a small HTTP/1.0 responder on the event loop (:meth:`Metrics.serve`):
at most ``MAX_SCRAPERS`` connections at once, each given ``SCRAPE_TIMEOUT_S``
to send its request head of at most ``MAX_HEAD_BYTES`` and to read the page.
(prometheus-client's own server starts a thread per connection and waits on
it forever: idle connections to the port could use up the process's
threads, which the store and the audit log need.) Each broker has its own
registry, so several brokers in one process (tests) never mix their figures.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import logging
from collections.abc import Iterator, Mapping, Sequence

import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

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
# The metrics responder's bounds (see the module docstring).
MAX_SCRAPERS = 16
SCRAPE_TIMEOUT_S = 5.0
MAX_HEAD_BYTES = 8192
PAGE = 1000


class _Histogram:
    """One label set's histogram as plain numbers: per-bucket counts and a sum."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float, count: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += count
        for _ in range(count):  # added one by one, as count observations would be
            self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative counts per upper bound, as the exposition format wants them."""
        bounds = [*map(floatToGoString, self.bounds), "+Inf"]
        return list(zip(bounds, itertools.accumulate(self.counts), strict=True))


class _RequestCollector(Collector):
    """Request counts, latencies and batch sizes, kept as plain numbers and exported on scrape.

    A prometheus-client child takes a lock per update, and a request makes
    three updates; here one is a dict look-up and two additions. The event
    loop is the only writer; a scrape (another thread) copies each table
    first, so it may see a request counted in one family and not yet in the
    next, never a torn value.
    """

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str], int] = {}
        self.latency: dict[str, _Histogram] = {}
        self.batch_items: dict[str, _Histogram] = {}

    def observe(self, method: str, code: str, seconds: float, items: int | None, count: int) -> None:
        key = (method, code)
        self.requests[key] = self.requests.get(key, 0) + count
        latency = self.latency.get(method)
        if latency is None:
            latency = self.latency[method] = _Histogram(LATENCY_BUCKETS)
        latency.observe(seconds, count)
        if items is not None:
            batch = self.batch_items.get(method)
            if batch is None:
                batch = self.batch_items[method] = _Histogram(BATCH_BUCKETS)
            batch.observe(items, count)

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "keybroker_requests", "Requests by method and outcome code", labels=["method", "code"]
        )
        for (method, code), count in list(self.requests.items()):
            requests.add_metric([method, code], count)
        yield requests
        for name, doc, table in (
            ("keybroker_request_seconds", "Request latency by method", self.latency),
            ("keybroker_batch_items", "Items per batch request", self.batch_items),
        ):
            family = HistogramMetricFamily(name, doc, labels=["method"])
            for method, histogram in list(table.items()):
                family.add_metric([method], histogram.buckets(), histogram.total)
            yield family


class Metrics:
    """The broker's metrics in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._requests = _RequestCollector()
        self.registry.register(self._requests)
        self.keys = Gauge("keybroker_keys", "Keys by state", ["state"], registry=self.registry)
        self.scheduler_actions = Counter(
            "keybroker_scheduler_actions",
            "Actions taken by the scheduler",
            ["action", "outcome"],
            registry=self.registry,
        )

    def observe(
        self, method: str, code: str, seconds: float, items: int | None, count: int = 1
    ) -> None:
        """Count ``count`` requests, each with this outcome code, latency and (for batches) item count."""
        self._requests.observe(method, code, seconds, items, count)

    def set_key_counts(self, counts: Mapping[str, int]) -> None:
        for state, count in counts.items():
            self.keys.labels(state).set(count)

    async def serve(self, host: str, port: int, *, task_status: trio.TaskStatus[int]) -> None:
        """Serve /metrics on ``host:port`` until cancelled; reports the bound port once listening."""
        listeners = await trio.open_tcp_listeners(port, host=host)
        bound = int(listeners[0].socket.getsockname()[1])
        log.info("metrics on http://%s:%d/metrics", host, bound)
        scrapers = trio.CapacityLimiter(MAX_SCRAPERS)

        async def handle(stream: trio.SocketStream) -> None:
            try:
                scrapers.acquire_nowait()
            except trio.WouldBlock:
                await trio.aclose_forcefully(stream)  # a full house: refused, never queued
                return
            try:
                with trio.move_on_after(SCRAPE_TIMEOUT_S):
                    await _answer(stream, self.registry)
            finally:
                scrapers.release()
                await trio.aclose_forcefully(stream)

        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, handle, listeners)
            task_status.started(bound)

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


async def _answer(stream: trio.SocketStream, registry: CollectorRegistry) -> None:
    """Read one request head and answer it: the page for ``GET /metrics`` (or ``/``)."""
    head = bytearray()
    while b"\r\n\r\n" not in head and b"\n\n" not in head:
        if len(head) > MAX_HEAD_BYTES:
            await stream.send_all(_reply(b"431 Request Header Fields Too Large"))
            return
        try:
            data = await stream.receive_some(MAX_HEAD_BYTES)
        except trio.BrokenResourceError:
            return
        if not data:
            return
        head += data
    method, _, rest = bytes(head).partition(b" ")
    path = rest.split(b" ", 1)[0].split(b"?", 1)[0]
    if method != b"GET":
        reply = _reply(b"405 Method Not Allowed")
    elif path not in (b"/metrics", b"/"):
        reply = _reply(b"404 Not Found")
    else:
        reply = _reply(b"200 OK", generate_latest(registry), CONTENT_TYPE_LATEST.encode())
    with contextlib.suppress(trio.BrokenResourceError):
        await stream.send_all(reply)


def _reply(status: bytes, body: bytes = b"", content_type: bytes = b"text/plain; charset=utf-8") -> bytes:
    return (
        b"HTTP/1.0 " + status + b"\r\nContent-Type: " + content_type
        + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body
    )
