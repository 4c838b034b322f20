"""broker.__main__.startup_failure: which start-up errors ``serve`` reports in one line."""

from __future__ import annotations

import errno

from broker.__main__ import startup_failure
from broker.errors import InvalidArgument, StartupError


def test_a_broker_error_deep_in_nested_groups_is_reported() -> None:
    error = InvalidArgument("config: unknown option(s) in [plugins.sqlite]: bogus")
    group = ExceptionGroup("outer", [ExceptionGroup("inner", [error])])
    assert startup_failure(group) is error
    assert startup_failure(error) is error


def test_startup_errors_are_invalid_argument() -> None:
    error = StartupError("no plugin provides the store 'nonexistent'")
    assert startup_failure(ExceptionGroup("g", [error])) is error
    assert error.code == "invalid_argument"


def test_an_os_error_is_unavailable_naming_its_file() -> None:
    busy = BlockingIOError(errno.EWOULDBLOCK, "audit log is in use", "/d/audit/audit.jsonl")
    failure = startup_failure(ExceptionGroup("g", [busy]))
    assert failure is not None
    assert (failure.code, failure.message) == ("unavailable", "audit log is in use: /d/audit/audit.jsonl")


def test_anything_else_in_the_group_is_a_bug() -> None:
    config_error = InvalidArgument("config: bad")
    assert startup_failure(ExceptionGroup("g", [config_error, RuntimeError("bug")])) is None
    assert startup_failure(ExceptionGroup("g", [ExceptionGroup("h", [KeyError("k")])])) is None
    assert startup_failure(RuntimeError("bug")) is None
