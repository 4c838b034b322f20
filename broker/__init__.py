"""keybroker: a key lifecycle management service."""

from __future__ import annotations

__version__ = "0.1.0"
