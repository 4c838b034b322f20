"""``python -m bench wire``: keybroker end to end over its Unix socket.

Side by side, in one run:

* sequential ``encrypt`` of 64 bytes (request/reply on one connection) beside
  a bare trio msgpack-rpc echo server, with p50/p99 latency;
* 100 pipelined ``encrypt`` requests on one connection beside the pipelined
  echo figure;
* ``encrypt_batch`` of 10,000 x 32-byte items, client encode to client
  decode, beside the same items sealed in-process by a plain `cryptography`
  AESGCM loop with a fresh nonce per item ("asking the broker beats doing it
  yourself").

The broker runs as ``python -m broker serve`` in its own process on embedded
defaults (SQLite, root key file, audit file with fsync), so every request
is authorized, counted and audited, as in production.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bench import machine_info, median
from bench.wire_echo import measure_echo, measure_rpc
from broker.client import Client

TARGETS = {"batch_vs_pyca": 1.5, "sequential_vs_echo": 0.5, "pipelined_vs_echo": 0.06, "p99_over_p50": 3.0}


def _start_broker(directory: Path, config: Path | None = None) -> subprocess.Popen[bytes]:
    """``python -m broker serve`` on ``directory/data`` (and a TOML ``config``), once its socket exists."""
    data = directory / "data"
    args = [sys.executable, "-m", "broker", "serve", "--data-dir", str(data), "--log-level", "warning"]
    proc = subprocess.Popen(
        args if config is None else [*args, "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    sock = data / "keybroker.sock"
    deadline = time.monotonic() + 30
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("broker did not start")
        time.sleep(0.05)
    return proc


def _latencies(client: Client, count: int) -> list[float]:
    out = []
    for _ in range(count):
        start = time.perf_counter()
        client.encrypt("bench/wire", b"x" * 64)
        out.append(time.perf_counter() - start)
    return sorted(out)


def _pyca_loop(items: list[bytes]) -> list[bytes]:
    aead = AESGCM(AESGCM.generate_key(bit_length=256))
    prefix = b"KB\x01\x01" + os.urandom(16) + b"\x00\x00\x00\x01"
    out = []
    for item in items:
        nonce = os.urandom(12)
        header = prefix + nonce
        out.append(header + aead.encrypt(nonce, item, header))
    return out


def run(quick: bool = False) -> dict[str, Any]:
    duration = 1.0 if quick else 3.0
    repeats = 3 if quick else 5
    batch_items = [os.urandom(32) for _ in range(10_000)]
    echo = measure_echo(kind="echo", pipeline=100, duration_s=duration, repeats=repeats)
    directory = Path(tempfile.mkdtemp(prefix="kb-bench-", dir="/tmp"))
    proc = _start_broker(directory)
    try:
        sock = directory / "data" / "keybroker.sock"
        with Client(sock) as client:
            client.key_create("bench/wire", "aes256-gcm")
            params = {"key": "bench/wire", "plaintext": b"x" * 64}
            seq = [measure_rpc(sock, "encrypt", params, duration_s=duration) for _ in range(repeats)]
            pipe = [
                measure_rpc(sock, "encrypt", params, pipeline=100, duration_s=duration)
                for _ in range(repeats)
            ]
            lat = _latencies(client, 2_000 if quick else 10_000)
            batch_s, pyca_s = [], []
            for _ in range(repeats * 2):
                start = time.perf_counter()
                sealed = client.encrypt_batch("bench/wire", batch_items)["ciphertexts"]
                batch_s.append(time.perf_counter() - start)
                start = time.perf_counter()
                _pyca_loop(batch_items)
                pyca_s.append(time.perf_counter() - start)
            assert len(sealed) == len(batch_items)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        shutil.rmtree(directory, ignore_errors=True)

    p50, p99 = lat[len(lat) // 2], lat[int(len(lat) * 0.99)]
    batch_rate = len(batch_items) / median(batch_s)
    pyca_rate = len(batch_items) / median(pyca_s)
    figures = {
        "encrypt_sequential_req_s": median(seq),
        "echo_sequential_req_s": echo["sequential"],
        "encrypt_pipelined_req_s": median(pipe),
        "echo_pipelined_req_s": echo["pipelined"],
        "encrypt_p50_us": p50 * 1e6,
        "encrypt_p99_us": p99 * 1e6,
        "encrypt_batch_items_s": batch_rate,
        "pyca_loop_items_s": pyca_rate,
    }
    ratios = {
        "batch_vs_pyca": round(batch_rate / pyca_rate, 3),
        "sequential_vs_echo": round(median(seq) / echo["sequential"], 3),
        "pipelined_vs_echo": round(median(pipe) / echo["pipelined"], 3),
        "p99_over_p50": round(p99 / p50, 2),
    }

    def verdict(name: str) -> str:
        ok = ratios[name] <= TARGETS[name] if name == "p99_over_p50" else ratios[name] >= TARGETS[name]
        return "ok" if ok else "MISSED"

    rows = [
        [
            "encrypt_batch 10k x 32 B (items/s)",
            f"{batch_rate:,.0f}",
            f"pyca loop {pyca_rate:,.0f}",
            ratios["batch_vs_pyca"],
            ">= 1.5",
            verdict("batch_vs_pyca"),
        ],
        [
            "encrypt 64 B sequential (req/s)",
            f"{median(seq):,.0f}",
            f"echo {echo['sequential']:,.0f}",
            ratios["sequential_vs_echo"],
            ">= 0.5",
            verdict("sequential_vs_echo"),
        ],
        [
            "encrypt 64 B, 100 pipelined (req/s)",
            f"{median(pipe):,.0f}",
            f"echo {echo['pipelined']:,.0f}",
            ratios["pipelined_vs_echo"],
            ">= 0.06",
            verdict("pipelined_vs_echo"),
        ],
        [
            "encrypt latency p50 / p99 (us)",
            f"{p50 * 1e6:,.0f} / {p99 * 1e6:,.0f}",
            "-",
            ratios["p99_over_p50"],
            "p99 <= 3x p50",
            verdict("p99_over_p50"),
        ],
    ]
    return {
        "name": "wire",
        "quick": quick,
        "machine": machine_info(),
        "columns": ["figure", "keybroker", "peer", "ratio", "target", ""],
        "rows": rows,
        "figures": figures,
        "ratios": ratios,
        "targets": TARGETS,
    }
