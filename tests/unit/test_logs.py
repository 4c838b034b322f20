"""Structured logs: one JSON object a line, with the request id of the call."""

from __future__ import annotations

import json
import logging

from broker.logs import JsonFormatter, failure, request_id


def test_json_lines_carry_request_id_and_extras() -> None:
    formatter = JsonFormatter()
    record = logging.LogRecord("keybroker.rpc", logging.WARNING, __file__, 1, "key %s failed", ("k",), None)
    record.code = "unavailable"
    token = request_id.set("3-2a")
    try:
        line = formatter.format(record)
    finally:
        request_id.reset(token)
    out = json.loads(line)
    assert out["message"] == "key k failed"
    assert out["level"] == "warning" and out["logger"] == "keybroker.rpc"
    assert out["request_id"] == "3-2a" and out["code"] == "unavailable"
    assert out["ts"].endswith("Z")
    assert "request_id" not in json.loads(formatter.format(record))


def test_a_failure_is_logged_by_type_and_stack_never_by_message() -> None:
    quoted = "-".join(("request", "data"))
    try:
        raise ValueError(f"bad {quoted}")
    except ValueError as exc:
        text = failure(exc)
    assert text.startswith("ValueError\n") and "test_a_failure_is_logged" in text
    assert quoted not in text
