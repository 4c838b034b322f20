"""A real broker process (``python -m broker serve``) for tests that want the
whole thing: the CLI, signals, logs, and a process that could crash."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

START_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class BrokerProcess:
    proc: subprocess.Popen[bytes]
    data_dir: Path
    log_path: Path

    @property
    def socket_path(self) -> Path:
        return self.data_dir / "keybroker.sock"

    def alive(self) -> bool:
        return self.proc.poll() is None


@contextmanager
def broker_process(directory: Path, *extra_args: str, config: Path | None = None) -> Iterator[BrokerProcess]:
    """Start a broker serving ``directory/data``; SIGTERM it on exit."""
    data = directory / "data"
    log_path = directory / "broker.log"
    args: Sequence[str] = [sys.executable, "-m", "broker", "serve", "--data-dir", str(data), *extra_args]
    if config is not None:
        args = [*args, "--config", str(config)]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    running = BrokerProcess(proc, data, log_path)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not running.socket_path.exists():
        if not running.alive() or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"broker did not start:\n{log_path.read_text()}")
        time.sleep(0.05)
    try:
        yield running
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
