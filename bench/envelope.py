"""Envelope hot path: native batches vs a plain ``cryptography`` AESGCM loop.

Both sides produce the identical format-1 envelope (header || ciphertext ||
tag, header as GCM aad). The ``cryptography`` side is written as a user would:
one ``AESGCM.encrypt`` per item with a fresh ``os.urandom(12)`` nonce. The
native side is the public :mod:`broker.envelope` API, Python wrapper included
(list of bytes in, list of bytes out).

Figures (medians of several interleaved repeats):
  wrap_32B            seal 32-byte data keys, one native batch call
  wrap_32B_2threads   the same batch split over two worker threads
  unwrap_32B          open them again
  rewrap_32B          re-seal under a new version (native: plaintext stays in C)
  seal_4KiB/64KiB/1MiB  single-item seal of larger payloads

``openssl speed -evp aes-256-gcm -seconds 1`` gives the system libcrypto's
ceiling; every figure is also printed as a fraction of it (payload bytes/s).
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bench import machine_info, median, timed
from broker.envelope import KeySlot, pack_header, rewrap_batch

KEY_ID_OLD = bytes(range(16))
KEY_ID_NEW = bytes(range(16, 32))
PREFIX_OLD = pack_header(KEY_ID_OLD, 1, bytes(12))[:24]
PREFIX_NEW = pack_header(KEY_ID_NEW, 2, bytes(12))[:24]

TARGETS = {
    "wrap_32B": 5.0,
    "wrap_32B_2threads": 9.0,
    "unwrap_32B": 2.5,
    "rewrap_32B": 4.0,
    "seal_64KiB": 0.9,
    "seal_1MiB": 0.9,
}


def _pyca_seal(aead: AESGCM, prefix: bytes, items: list[bytes]) -> list[bytes]:
    out = []
    for item in items:
        nonce = os.urandom(12)
        header = prefix + nonce
        out.append(header + aead.encrypt(nonce, item, header))
    return out


def _pyca_open(aead: AESGCM, envelopes: list[bytes]) -> list[bytes]:
    return [aead.decrypt(env[24:36], env[36:], env[:36]) for env in envelopes]


def _pyca_rewrap(old: AESGCM, new: AESGCM, envelopes: list[bytes]) -> list[bytes]:
    out = []
    for env in envelopes:
        plaintext = old.decrypt(env[24:36], env[36:], env[:36])
        nonce = os.urandom(12)
        header = PREFIX_NEW + nonce
        out.append(header + new.encrypt(nonce, plaintext, header))
    return out


def openssl_speed() -> dict[str, Any]:
    """Parse ``openssl speed -evp aes-256-gcm -seconds 1``: bytes/s per block size."""
    try:
        proc = subprocess.run(
            ["openssl", "speed", "-evp", "aes-256-gcm", "-seconds", "1"],
            capture_output=True, text=True, check=False, timeout=120,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return {"error": str(exc)}
    sizes: list[int] = []
    rates: list[float] = []
    for line in proc.stdout.splitlines():
        if line.startswith("type"):
            sizes = [int(x) for x in re.findall(r"(\d+) bytes", line)]
        elif line.upper().startswith("AES-256-GCM"):
            rates = [float(x) * 1000 for x in re.findall(r"([\d.]+)k", line)]
    if not sizes or len(sizes) != len(rates):
        return {"error": "could not parse openssl speed output", "stdout": proc.stdout[-2000:]}
    per_size = dict(zip(sizes, rates, strict=True))
    return {"bytes_per_s": {str(k): v for k, v in per_size.items()}, "ceiling_bytes_per_s": max(rates)}


def _measure(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds per run for each function, interleaved so noise hits all alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            times[key].append(timed(fn))
    return times


def run(quick: bool = False) -> dict[str, Any]:
    n = 100_000 if quick else 1_000_000
    repeats = 3 if quick else 5
    key_old, key_new = os.urandom(32), os.urandom(32)
    pyca_old, pyca_new = AESGCM(key_old), AESGCM(key_new)
    slot_old = KeySlot(bytearray(key_old), KEY_ID_OLD, 1)
    slot_new = KeySlot(bytearray(key_new), KEY_ID_NEW, 2)
    del key_old, key_new

    items = [os.urandom(32) for _ in range(n)]
    envelopes = slot_old.seal_batch(items, limit=n)
    assert _pyca_open(pyca_old, envelopes[:10]) == items[:10]
    assert slot_old.open_batch(_pyca_seal(pyca_old, PREFIX_OLD, items[:10])) == items[:10]
    halves = [items[: n // 2], items[n // 2 :]]
    pool = ThreadPoolExecutor(max_workers=2)

    def two_threads() -> None:
        futures = [pool.submit(slot_old.seal_batch, half, limit=n) for half in halves]
        for fut in futures:
            fut.result()

    figures: dict[str, dict[str, Any]] = {}

    def record(
        name: str, count: int, size: int, times: dict[str, list[float]], native: str, pyca: str
    ) -> None:
        nat, ref = median(times[native]), median(times[pyca])
        figures[name] = {
            "items": count,
            "item_bytes": size,
            "native_items_per_s": count / nat,
            "pyca_items_per_s": count / ref,
            "native_runs_s": times[native],
            "pyca_runs_s": times[pyca],
        }

    t = _measure(
        {
            "native": lambda: slot_old.seal_batch(items, limit=n),
            "native2": two_threads,
            "pyca": lambda: _pyca_seal(pyca_old, PREFIX_OLD, items),
        },
        repeats,
    )
    record("wrap_32B", n, 32, t, "native", "pyca")
    record("wrap_32B_2threads", n, 32, t, "native2", "pyca")
    pool.shutdown()

    t = _measure(
        {
            "native": lambda: slot_old.open_batch(envelopes, limit=n),
            "pyca": lambda: _pyca_open(pyca_old, envelopes),
        },
        repeats,
    )
    record("unwrap_32B", n, 32, t, "native", "pyca")

    t = _measure(
        {
            "native": lambda: rewrap_batch(slot_old, slot_new, envelopes, limit=n),
            "pyca": lambda: _pyca_rewrap(pyca_old, pyca_new, envelopes),
        },
        repeats,
    )
    record("rewrap_32B", n, 32, t, "native", "pyca")

    for label, size, full_count in (("4KiB", 4096, 20_000), ("64KiB", 65536, 2_000), ("1MiB", 1 << 20, 150)):
        count = max(full_count // 5, 20) if quick else full_count
        payload = os.urandom(size)

        def native_loop(
            seal: Callable[[bytes], bytes] = slot_old.seal, payload: bytes = payload, count: int = count
        ) -> None:
            for _ in range(count):
                seal(payload)

        def pyca_loop(payload: bytes = payload, count: int = count) -> None:
            encrypt = pyca_old.encrypt
            for _ in range(count):
                nonce = os.urandom(12)
                header = PREFIX_OLD + nonce
                header + encrypt(nonce, payload, header)

        t = _measure({"native": native_loop, "pyca": pyca_loop}, repeats)
        record(f"seal_{label}", count, size, t, "native", "pyca")

    speed = openssl_speed()
    ceiling = speed.get("ceiling_bytes_per_s")
    ratios: dict[str, float] = {}
    rows: list[list[object]] = []
    for name, fig in figures.items():
        ratio = fig["native_items_per_s"] / fig["pyca_items_per_s"]
        ratios[name] = round(ratio, 3)
        native_bps = fig["native_items_per_s"] * fig["item_bytes"]
        pyca_bps = fig["pyca_items_per_s"] * fig["item_bytes"]
        fig["native_bytes_per_s"] = native_bps
        fig["pyca_bytes_per_s"] = pyca_bps
        if ceiling:
            fig["native_vs_ceiling"] = native_bps / ceiling
            fig["pyca_vs_ceiling"] = pyca_bps / ceiling
        target = TARGETS.get(name)
        rows.append(
            [
                name,
                fig["native_items_per_s"],
                fig["pyca_items_per_s"],
                ratio,
                f">= {target}" if target else "-",
                "ok" if target is None or ratio >= target else "MISSED",
                f"{native_bps / ceiling:.3f}" if ceiling else "-",
                f"{pyca_bps / ceiling:.3f}" if ceiling else "-",
            ]
        )
    if ceiling:
        rows.append(["openssl speed ceiling (B/s)", ceiling, "-", "-", "-", "-", "1.000", "-"])
    slot_old.close()
    slot_new.close()
    return {
        "name": "envelope",
        "quick": quick,
        "n_32B": n,
        "repeats": repeats,
        "machine": machine_info(),
        "ratios": ratios,
        "targets": TARGETS,
        "figures": figures,
        "openssl_speed": speed,
        "columns": [
            "figure", "native items/s", "pyca items/s", "ratio", "target", "",
            "native/ceiling", "pyca/ceiling",
        ],
        "rows": rows,
    }
