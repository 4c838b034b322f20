"""What one RPC call carries through the method table, and how methods are declared."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from .errors import InvalidArgument
from .keys import NAME_PATTERN
from .params import Field, Spec, as_int, as_str

if TYPE_CHECKING:
    from .connection import RequestContext
    from .rpc import Dispatcher

__all__ = [
    "KEY", "NAME", "PERIOD", "PREFIX", "TIME", "USES", "VERSION", "Call", "GroupHandler", "Handler", "Kind",
    "Method", "as_key_name",
]

UINT32 = 2**32 - 1


@dataclass(slots=True)
class Call:
    """One request on its way through the table; collects what the audit record says."""

    ctx: RequestContext
    method: str
    key: str | None = None
    version: int | None = None
    alarm: bool = False
    details: dict[str, str | int | bool | None] = field(default_factory=dict)


Handler = Callable[["Dispatcher", Call, dict[str, Any]], Awaitable[Any]]
# Several parsed requests of one method at once: one outcome per call, the
# result or the BrokerError that call fails with (see Dispatcher.handle_group).
GroupHandler = Callable[["Dispatcher", list[Call], list[dict[str, Any]]], Awaitable[list[Any]]]


class Kind(Enum):
    """What a method does, which decides how it meets a failing audit log."""

    # Metadata reads: with ``audit.fail_open_reads`` they are served even
    # when their record cannot be written.
    READ = "read"
    # Uses of keys: the result is released only once its record is durable.
    USE = "use"
    # State changes: a "requested" record is made durable before the change,
    # so a change can never happen unaudited (fail closed).
    CHANGE = "change"


@dataclass(frozen=True, slots=True)
class Method:
    spec: Spec
    run: Handler
    kind: Kind = Kind.USE
    audited: bool = True
    # Runs queued requests of this method together (uses of keys only).
    group: GroupHandler | None = None


def as_key_name(name: str, value: Any) -> str:
    """A key name as docs/protocol.md defines it, checked before the call
    records it anywhere (the audit log, a log line, an error)."""
    text = as_str(name, value)
    if NAME_PATTERN.fullmatch(text) is None:
        raise InvalidArgument(
            f"{name}: a key name is 1-128 characters of [a-z0-9._/-] starting with a letter or digit",
            {"field": name},
        )
    return text


def _as_prefix(name: str, value: Any) -> str:
    """The start of key names: at most as long as a name."""
    text = as_str(name, value)
    if len(text) > 128:
        raise InvalidArgument(f"{name}: at most 128 characters", {"field": name})
    return text


# Fields many methods share.
NAME = Field(as_key_name, required=True)
KEY = Field(as_key_name, required=True)
PREFIX = Field(_as_prefix, default="")
VERSION = Field(as_int(1, UINT32))
PERIOD = Field(as_int(0, 2**40))
USES = Field(as_int(0, 2**62))
TIME = Field(as_int(0, 2**40))
