"""Prometheus metrics on a loopback port: requests by method and code,
latency, batch sizes, keys by state, scheduler actions."""

from __future__ import annotations

import threading
import urllib.request

import pytest
import trio

from broker import metrics as metrics_module
from broker.app import open_broker
from broker.errors import NotFound
from tests.conftest import Caller, ConfigFactory


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def value(text: str, prefix: str) -> float:
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {prefix!r} in metrics")


async def test_metrics_endpoint(make_config: ConfigFactory, owner: str) -> None:
    config = make_config({"metrics": {"host": "127.0.0.1", "port": 0}})
    async with open_broker(config, run_scheduler=False) as broker:
        assert broker.metrics_port
        admin = Caller(broker, owner)
        await admin("key.create", name="m", type="aes256-gcm", rotation_period_s=1)
        await admin("encrypt_batch", key="m", items=[b"x"] * 50)
        for _ in range(3):
            await admin("encrypt", key="m", plaintext=b"y")
        with pytest.raises(NotFound):
            await admin("key.get", name="missing")
        await admin("key.disable", name="m")
        await broker.scheduler.run_once()  # nothing due on a disabled key
        await admin("key.enable", name="m")
        await trio.sleep(1.1)
        await broker.scheduler.run_once()
        await broker.metrics.count_keys(broker.service)
        text = await trio.to_thread.run_sync(scrape, broker.metrics_port)
    assert value(text, 'keybroker_requests_total{code="ok",method="encrypt"}') == 3
    assert value(text, 'keybroker_requests_total{code="not_found",method="key.get"}') == 1
    assert value(text, 'keybroker_batch_items_count{method="encrypt_batch"}') == 1
    assert value(text, 'keybroker_batch_items_sum{method="encrypt_batch"}') == 50
    assert value(text, 'keybroker_request_seconds_count{method="encrypt"}') == 3
    assert value(text, 'keybroker_scheduler_actions_total{action="key.rotate",outcome="ok"}') == 1
    assert value(text, 'keybroker_keys{state="active"}') == 1
    assert value(text, 'keybroker_keys{state="destroyed"}') == 0
    # No key material or names of secrets in metrics: only method names and codes.
    assert "plaintext" not in text


async def test_idle_scrapers_are_bounded_and_timed_out(
    make_config: ConfigFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics_module, "SCRAPE_TIMEOUT_S", 0.5)
    config = make_config({"metrics": {"host": "127.0.0.1", "port": 0}})
    async with open_broker(config, run_scheduler=False) as broker:
        port = broker.metrics_port
        assert port
        threads = threading.active_count()
        idle = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(metrics_module.MAX_SCRAPERS)]
        await trio.sleep(0.1)
        # One more is refused at once rather than queued; no thread was started for any.
        extra = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(2):
            assert await extra.receive_some(100) == b""
        assert threading.active_count() == threads
        # The idle ones are closed after the timeout, and scraping works again.
        with trio.fail_after(3):
            for stream in idle:
                assert await stream.receive_some(100) == b""
        text = await trio.to_thread.run_sync(scrape, port)
        assert "keybroker_requests_total" in text or "keybroker_keys" in text
        for method, path, status in (("POST", "/metrics", b"405"), ("GET", "/other", b"404")):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            with trio.fail_after(2):
                assert (await stream.receive_some(100)).startswith(b"HTTP/1.0 " + status)
            await stream.aclose()
