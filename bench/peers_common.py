"""Shared parts of ``python -m bench peers``: the peers' pinned packages, their
versions, the rate meter, the event-loop CPU meter and the keybroker broker
process.

The peers are not keybroker dependencies. :func:`ensure_peers` installs the
pinned versions below into the running interpreter's environment (normally
the project venv) the first time the benchmark runs, with pip, and does
nothing once they are there.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from bench import median
from bench.wire import _start_broker
from broker.auth import unix_peer

# Versions that install cleanly on CPython 3.11 (x86_64 wheels, no builds).
PEER_PINS = {
    "tink": "1.16.1",
    "aws-encryption-sdk": "4.0.7",
    "aws-cryptographic-material-providers": "1.11.3",
    "pykmip": "0.11.0",
    "trustme": "1.2.1",
    "matplotlib": "3.11.2",
}
# Reported beside the pins: what the peers run on.
REPORTED = (
    "cryptography",
    "protobuf",
    "sqlalchemy",
    "boto3",
    "python-pkcs11",
    "msgpack",
    "trio",
    "keybroker",
)


def _installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def ensure_peers() -> list[str]:
    """Install the pinned peers that are missing or at another version; what was installed."""
    wanted = [f"{name}=={pin}" for name, pin in PEER_PINS.items() if _installed(name) != pin]
    if wanted:
        print(f"bench peers: installing {' '.join(wanted)} into {sys.prefix}", file=sys.stderr)
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *wanted],
            check=True,
            timeout=900,
        )
        importlib.invalidate_caches()
    return wanted


def versions() -> dict[str, str | None]:
    """Installed version of every peer and of what they run on."""
    out: dict[str, str | None] = {name: _installed(name) for name in (*PEER_PINS, *REPORTED)}
    try:
        softhsm = subprocess.run(
            ["softhsm2-util", "--version"], capture_output=True, text=True, check=False, timeout=10
        )
        out["softhsm2"] = softhsm.stdout.strip() or None
    except OSError:
        out["softhsm2"] = None
    return out


def fsync_latency_us(directory: str = "/tmp", count: int = 200) -> float:
    """Median microseconds of appending 300 bytes and fsyncing, in ``directory``
    (where the broker's data directory lives: its audit log and SQLite sync there)."""
    fd, path = tempfile.mkstemp(prefix="kb-fsync-", dir=directory)
    try:
        times = []
        for _ in range(count):
            start = time.perf_counter()
            os.write(fd, bytes(300))
            os.fsync(fd)
            times.append(time.perf_counter() - start)
    finally:
        os.close(fd)
        os.unlink(path)
    return median(times) * 1e6


def rate(call: Callable[[], object], units: int, seconds: float, min_calls: int = 1) -> float:
    """Units per second of calling ``call`` (``units`` each) back to back for about ``seconds``."""
    calls = 0
    start = time.perf_counter()
    end = start + seconds
    while True:
        call()
        calls += 1
        now = time.perf_counter()
        if now >= end and calls >= min_calls:
            return calls * units / (now - start)


def server_pid(socket_path: Path) -> int:
    """The process serving ``socket_path``, from the credentials of a connection to it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(socket_path))
        _uid, _gid, pid = unix_peer(sock)
    return pid


def thread_cpu_s(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of the main thread of ``pid`` (the broker's event loop)."""
    # Fields after "pid (comm)": state is the first, utime the 12th, stime the 13th.
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


class LoopCpu:
    """Samples the event-loop thread's CPU around each sample of a keybroker figure."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        # figure -> [(busy %, user µs per unit, system µs per unit)], one per sample
        self.samples: dict[str, list[tuple[float, float, float]]] = {}

    def around(self, figure: str, sampler: Callable[[], float]) -> Callable[[], float]:
        """``sampler`` (units per second), also recording the thread's CPU while it runs."""

        def sample() -> float:
            user, system = thread_cpu_s(self.pid)
            began = time.perf_counter()
            per_second = sampler()
            wall = time.perf_counter() - began
            user_after, system_after = thread_cpu_s(self.pid)
            units = per_second * wall
            self.samples.setdefault(figure, []).append(
                (
                    100 * (user_after - user + system_after - system) / wall,
                    1e6 * (user_after - user) / units,
                    1e6 * (system_after - system) / units,
                )
            )
            return per_second

        return sample

    def medians(self) -> dict[str, dict[str, float]]:
        return {
            figure: {
                "busy_pct": round(median([s[0] for s in samples]), 1),
                "user_us": round(median([s[1] for s in samples]), 2),
                "system_us": round(median([s[2] for s in samples]), 2),
            }
            for figure, samples in self.samples.items()
        }


def interleaved(
    contenders: dict[str, Callable[[], float]], repeats: int
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Run each contender's sampler ``repeats`` times, in turns so that noise hits
    all alike; the median of each and the samples."""
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, sample in contenders.items():
            samples[name].append(sample())
    return {name: median(values) for name, values in samples.items()}, samples


@contextmanager
def keybroker_process(config: str | None = None) -> Iterator[Path]:
    """A ``python -m broker serve`` process on embedded defaults (plus a TOML
    ``config`` text, if given) in a temporary directory; yields its socket path."""
    directory = Path(tempfile.mkdtemp(prefix="kb-peers-", dir="/tmp"))
    config_path = None
    if config is not None:
        config_path = directory / "keybroker.toml"
        config_path.write_text(config)
    proc = _start_broker(directory, config_path)
    try:
        yield directory / "data" / "keybroker.sock"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        shutil.rmtree(directory, ignore_errors=True)
