"""Side-by-side benchmarks.

Convention: ``python -m bench NAME [--quick]`` imports ``bench.NAME`` and calls
its ``run(quick=...)``, which returns a JSON-serialisable dict with at least::

    {"name": NAME, "columns": [...], "rows": [[...], ...], ...}

The runner prints ``columns``/``rows`` as a table and writes the whole dict to
``bench/results/NAME.json``. Benchmarks repeat each measurement and report
medians (the machines are shared and noisy); helpers for that live here.
"""

from __future__ import annotations

import importlib
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def timed(fn: Callable[[], object]) -> float:
    """Wall-clock seconds of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return platform.processor() or "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """CPU, core count and library versions, recorded with every result."""
    info: dict[str, Any] = {
        "cpu_model": _lscpu_model(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }
    try:
        out = subprocess.run(["openssl", "version"], capture_output=True, text=True, check=False, timeout=10)
        info["openssl_cli"] = out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        info["openssl_cli"] = None
    try:
        cryptography = importlib.import_module("cryptography")
        backend = importlib.import_module("cryptography.hazmat.backends.openssl").backend
        info["cryptography"] = cryptography.__version__
        info["cryptography_openssl"] = backend.openssl_version_text()
    except ImportError:
        info["cryptography"] = None
    return info


def format_table(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in columns]] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        if value >= 1000:
            return f"{value:,.0f}"
        return f"{value:.3g}" if value < 10 else f"{value:.1f}"
    return str(value)
