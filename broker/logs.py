"""Logging set-up: human lines or structured JSON lines with request ids.

Each request handled by the dispatcher runs with a request id in a context
variable; every log line written while serving it carries that id, so one
request's lines can be found among thousands. Log messages never contain
key material, plaintext or ciphertext: callers log names, codes and counts.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
import traceback
from typing import Any

__all__ = ["JsonFormatter", "configure_logging", "failure", "request_id"]

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("keybroker_request_id", default=None)



def failure(exc: BaseException) -> str:
    """An unexpected exception as a log may show it: its type and stack, never
    its message, which may quote request data (and this is a key broker)."""
    return f"{type(exc).__qualname__}\n{''.join(traceback.format_tb(exc.__traceback__))}"


_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, request_id, extras."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = request_id.get()
        if rid is not None:
            out["request_id"] = rid
        for name, value in record.__dict__.items():
            if name not in _STANDARD and not name.startswith("_"):
                out[name] = value if isinstance(value, str | int | float | bool | None) else repr(value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, separators=(",", ":"))


def configure_logging(level: str = "info", fmt: str = "text") -> None:
    """Send the ``keybroker`` loggers to stderr as text or JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))
