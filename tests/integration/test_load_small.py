"""A small version of ``bench load``: many connections, the realistic mix, a
real broker process; zero errors and bounded memory."""

from __future__ import annotations

from pathlib import Path

from bench.load import peak_rss_mib, run_load
from tests._broker_process import broker_process

CONNECTIONS = 60
DURATION_S = 4.0
RSS_BOUND_MIB = 400


async def test_mixed_load_has_no_errors_and_bounded_memory(short_tmp: Path) -> None:
    with broker_process(short_tmp, "--log-level", "warning") as broker:
        result = await run_load(broker.socket_path, CONNECTIONS, DURATION_S, seed=7)
        rss = peak_rss_mib(broker.proc.pid)
        assert broker.alive()
    assert result.errors == []
    assert result.requests > 500
    assert set(result.by_kind) == {"encrypt", "decrypt", "batch", "lifecycle"}
    assert rss < RSS_BOUND_MIB, f"broker peak RSS {rss:.0f} MiB"
