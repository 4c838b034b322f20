"""The event-loop CPU meter of ``bench peers``, against a real broker process:
it finds the broker behind a socket and tells a busy broker from an idle one."""

from __future__ import annotations

import time
from pathlib import Path

from bench.peers_common import LoopCpu, rate, server_pid
from broker.client import Client
from tests._broker_process import broker_process

SAMPLE_S = 0.5


def _idle() -> float:
    time.sleep(SAMPLE_S)
    return 1.0  # one unit a second, so per-unit figures stay defined


def test_the_meter_tells_a_busy_broker_from_an_idle_one(short_tmp: Path) -> None:
    with broker_process(short_tmp, "--log-level", "warning") as broker, Client(broker.socket_path) as kb:
        assert server_pid(broker.socket_path) == broker.proc.pid
        meter = LoopCpu(broker.proc.pid)
        pings = meter.around("pings", lambda: rate(kb.ping, 1, SAMPLE_S))
        idle = meter.around("idle", _idle)
        for sample in (pings, idle, pings, idle, pings, idle):
            assert sample() > 0
        figures = meter.medians()
    assert set(figures) == {"pings", "idle"}
    assert len(meter.samples["pings"]) == 3
    # A client calling back to back keeps the loop busy; each ping costs
    # microseconds of its CPU, not nothing and not milliseconds.
    assert figures["pings"]["busy_pct"] > 20
    assert 0 < figures["pings"]["user_us"] + figures["pings"]["system_us"] < 1_000
    # With nobody calling, the loop sleeps.
    assert figures["idle"]["busy_pct"] < 10
