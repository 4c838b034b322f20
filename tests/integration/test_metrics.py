"""Prometheus metrics on a loopback port: requests by method and code,
latency, batch sizes, keys by state, scheduler actions."""

from __future__ import annotations

import urllib.request

import pytest
import trio

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
