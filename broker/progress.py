"""A plain-text progress bar on stderr, drawn only when stderr is a terminal."""

from __future__ import annotations

import sys
import time
from typing import Final, TextIO

__all__ = ["ProgressBar"]

BAR_WIDTH: Final = 30
# Redrawing more often than this only costs time; the eye cannot follow it.
MIN_REDRAW_S: Final = 0.1


def _amount(value: int, unit: str) -> str:
    if unit != "B":
        return f"{value:,} {unit}"
    size = float(value)
    for suffix in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or suffix == "TiB":
            return f"{size:.0f} {suffix}" if suffix == "B" else f"{size:.1f} {suffix}"
        size /= 1024
    raise AssertionError("unreachable")


class ProgressBar:
    """``label [#########.........]  42%  12.0 MiB / 28.6 MiB`` redrawn in place.

    Args:
        label: what is progressing.
        unit: ``"B"`` for bytes (shown as KiB/MiB/...), or a word such as ``"keys"``.
        stream: where to draw (default stderr); nothing is drawn unless it is a TTY,
            so scripts and logs never see carriage returns.
    """

    def __init__(self, label: str, *, unit: str = "B", stream: TextIO | None = None) -> None:
        self.label = label
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last = 0.0
        self._drawn = False

    def __call__(self, done: int, total: int | None) -> None:
        """Record progress; redraw at most every :data:`MIN_REDRAW_S` seconds, and at the end."""
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < MIN_REDRAW_S and (total is None or done < total):
            return
        self._last = now
        if total:
            fraction = min(1.0, done / total)
            filled = int(fraction * BAR_WIDTH)
            bar = "#" * filled + "." * (BAR_WIDTH - filled)
            text = (
                f"\r{self.label} [{bar}] {fraction * 100:3.0f}%  "
                f"{_amount(done, self.unit)} / {_amount(total, self.unit)}"
            )
        else:
            text = f"\r{self.label} {_amount(done, self.unit)}"
        self.stream.write(text + "\x1b[K")
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        """End the bar's line (if one was drawn)."""
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False
