"""Items/s against batch size, keybroker beside the peers (part of
``python -m bench peers``), and the plot of it (bench/results/peers_batch.png).

For each batch size n, each contender encrypts n 32-byte items per call:
keybroker in-process (``KeySlot.seal_batch`` of n) and over its socket
(``Client.encrypt_batch`` of n); the peers have no batch call, so "a batch"
is a loop of n single-item calls -- for the slow ones on at most ``cap``
items per call, their cost per item being the same at any n.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.peers_common import interleaved, rate
from bench.peers_envelope import Contender
from bench.peers_kmip import Endpoint, active_key, client, gcm_parameters
from broker.client import Client

SIZES = (1, 10, 100, 1_000, 10_000)
SOCKET = "keybroker over its socket (encrypt_batch)"
PYKMIP = "PyKMIP, one Encrypt request per item"
PYKMIP_CAP = 50
PLOT_KEY = "bench/peers-sweep"


def sweep(
    contenders: list[Contender], socket_path: Path, endpoint: Endpoint, *, seconds: float, repeats: int
) -> dict[str, dict[str, float]]:
    """``{contender: {str(batch size): items/s}}``, medians of interleaved repeats."""
    items = [os.urandom(32) for _ in range(max(SIZES))]
    with Client(socket_path) as kb, client(endpoint) as kmip:
        kb.key_create(PLOT_KEY, "aes256-gcm")
        uid = active_key(kmip)
        params = gcm_parameters()

        def kmip_loop(chunk: list[bytes]) -> None:
            for item in chunk:
                kmip.encrypt(item, uid=uid, cryptographic_parameters=params)

        calls: list[tuple[str, Callable[[list[bytes]], object], int | None]] = [
            (c.name, c.seal, c.cap) for c in contenders
        ]
        calls.insert(1, (SOCKET, lambda chunk: kb.encrypt_batch(PLOT_KEY, chunk), None))
        calls.append((PYKMIP, kmip_loop, PYKMIP_CAP))
        samplers: dict[str, Callable[[], float]] = {}
        for name, seal, cap in calls:
            for n in SIZES:
                chunk = items[: n if cap is None else min(n, cap)]
                samplers[f"{name}|{n}"] = _sampler(seal, chunk, seconds)
        medians, _ = interleaved(samplers, repeats)
    out: dict[str, dict[str, float]] = {}
    for key, value in medians.items():
        name, size = key.rsplit("|", 1)
        out.setdefault(name, {})[size] = value
    return out


def _sampler(
    seal: Callable[[list[bytes]], object], chunk: list[bytes], seconds: float
) -> Callable[[], float]:
    return lambda: rate(lambda: seal(chunk), len(chunk), seconds)


def draw(curves: dict[str, dict[str, float]], path: Path, note: str) -> None:
    """A log-log plot of items/s against batch size, keybroker solid, peers dashed."""
    import matplotlib  # noqa: PLC0415 -- installed by the bench itself

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(12, 6.5), dpi=110)
    for name, points in curves.items():
        sizes = [int(n) for n in points]
        style: dict[str, Any] = (
            {"linestyle": "-", "linewidth": 2.4} if name.startswith("keybroker") else {"linestyle": "--"}
        )
        ax.plot(sizes, list(points.values()), marker="o", label=name, **style)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(SIZES, [f"{n:,}" for n in SIZES])
    ax.set_xlabel("items per call (batch size); peers without a batch call loop over the items")
    ax.set_ylabel("items encrypted per second (32-byte items)")
    ax.set_title("keybroker vs peers: encryption throughput by batch size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.text(0.01, 0.005, note, fontsize=7, color="0.35")
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
