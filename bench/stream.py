"""Streaming file encryption through the CLI: throughput and peak memory.

A broker is started as a subprocess (``keybroker serve``) on a temporary data
directory; then ``keybroker encrypt --key K IN OUT`` and ``keybroker decrypt
OUT BACK`` run as child processes on a file of 1 GiB (``--quick``: 64 MiB)
of random bytes, with the default 1 MiB segments. Each child's peak RSS is
read from ``os.wait4`` (the kernel's ``ru_maxrss`` of that one process), its
throughput is input bytes / wall-clock seconds (process start-up, the
broker round trip and the fsync of the output included). The decrypted file
is compared with the input.

Figures (medians of the repeats; peak RSS is the maximum):
  encrypt   MB/s and peak RSS of ``keybroker encrypt``
  decrypt   MB/s and peak RSS of ``keybroker decrypt``

Target: peak RSS under 100 MiB whatever the file size.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import machine_info, median
from broker.client import Client

MIB = 1024 * 1024
RSS_TARGET_MIB = 100


def _keybroker() -> list[str]:
    script = shutil.which("keybroker", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "broker"]


def _make_input(path: Path, size: int) -> None:
    # Random bytes, written a MiB at a time (AES-GCM's speed does not depend
    # on the data, but compressible input would flatter the page cache).
    block = os.urandom(MIB)
    with path.open("wb") as fh:
        for i in range(size // MIB):
            fh.write(i.to_bytes(8, "big") + block[8:])


def _run_child(args: list[str], env: dict[str, str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one child process."""
    started = time.perf_counter()
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        err = proc.stderr.read().decode() if proc.stderr else ""
        raise RuntimeError(f"{args[1:3]} failed ({proc.returncode}): {err}")
    if proc.stderr:
        proc.stderr.close()
    # Linux reports ru_maxrss in KiB.
    return elapsed, usage.ru_maxrss * 1024


def _wait_for(socket: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if socket.exists():
            try:
                with Client(socket, timeout=5) as client:
                    client.ping()
                return
            except OSError:
                pass
        time.sleep(0.1)
    raise RuntimeError("the broker did not start")


def run(*, quick: bool = False) -> dict[str, Any]:
    size = (64 if quick else 1024) * MIB
    repeats = 3
    keybroker = _keybroker()
    workdir = Path(tempfile.mkdtemp(prefix="kb-bench-stream-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYBROKER_")}
    data_dir = workdir / "data"
    socket = data_dir / "keybroker.sock"
    server = subprocess.Popen(
        [*keybroker, "serve", "--data-dir", str(data_dir), "--log-level", "warning"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for(socket)
        with Client(socket) as client:
            client.key_create("bench/stream", "aes256-gcm")
        env["KEYBROKER_SOCKET"] = str(socket)
        src, sealed, back = workdir / "in.bin", workdir / "in.kbst", workdir / "back.bin"
        _make_input(src, size)
        enc_times: list[float] = []
        dec_times: list[float] = []
        enc_rss: list[int] = []
        dec_rss: list[int] = []
        for _ in range(repeats):
            encrypt = [*keybroker, "encrypt", "--key", "bench/stream", str(src), str(sealed)]
            seconds, rss = _run_child(encrypt, env)
            enc_times.append(seconds)
            enc_rss.append(rss)
            seconds, rss = _run_child([*keybroker, "decrypt", str(sealed), str(back)], env)
            dec_times.append(seconds)
            dec_rss.append(rss)
            if not filecmp.cmp(src, back, shallow=False):
                raise RuntimeError("the decrypted file differs from the input")
            back.unlink()
        overhead = sealed.stat().st_size - size
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(workdir, ignore_errors=True)

    def row(name: str, times: list[float], rss: list[int]) -> list[Any]:
        mbps = size / median(times) / 1e6
        peak = max(rss) / MIB
        return [name, round(mbps, 1), round(peak, 1), "yes" if peak < RSS_TARGET_MIB else "NO", len(times)]

    return {
        "columns": ["figure", "MB/s", "peak RSS MiB", f"< {RSS_TARGET_MIB} MiB", "runs"],
        "rows": [row("encrypt", enc_times, enc_rss), row("decrypt", dec_times, dec_rss)],
        "file_bytes": size,
        "segment_size": MIB,
        "stream_overhead_bytes": overhead,
        "encrypt_seconds": enc_times,
        "decrypt_seconds": dec_times,
        "encrypt_peak_rss": enc_rss,
        "decrypt_peak_rss": dec_rss,
        "machine": machine_info(),
    }
