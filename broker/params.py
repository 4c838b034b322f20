"""Validation of RPC parameters: one declarative spec per method. Pure logic.

Unknown fields, wrong msgpack types, values out of range and unknown enum
values all raise :class:`~broker.errors.InvalidArgument` naming the field.
A nil optional field counts as absent.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from .errors import InvalidArgument

__all__ = [
    "MISSING",
    "Field",
    "Spec",
    "as_aad",
    "as_bin",
    "as_bin_list",
    "as_bool",
    "as_enum",
    "as_int",
    "as_labels",
    "as_str",
    "parse",
]

MISSING: Any = object()
UINT32_MAX = 2**32 - 1
INT64_MAX = 2**63 - 1

Check = Callable[[str, Any], Any]


def _bad(name: str, what: str) -> InvalidArgument:
    return InvalidArgument(f"{name}: {what}", {"field": name})


def as_str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _bad(name, "must be a string")
    return value


def as_bin(name: str, value: Any) -> bytes:
    if not isinstance(value, bytes):
        raise _bad(name, "must be binary (msgpack bin)")
    return value


def as_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _bad(name, "must be a boolean")
    return value


def as_int(low: int = 0, high: int = INT64_MAX) -> Check:
    def check(name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad(name, "must be an integer")
        if not low <= value <= high:
            raise _bad(name, f"must be between {low} and {high}")
        return value

    return check


def as_enum(enum: type[StrEnum]) -> Check:
    def check(name: str, value: Any) -> StrEnum:
        try:
            return enum(as_str(name, value))
        except ValueError:
            allowed = ", ".join(member.value for member in enum)
            raise _bad(name, f"must be one of {allowed}") from None

    return check


def as_bin_list(name: str, value: Any) -> list[bytes]:
    if not isinstance(value, list | tuple) or not all(isinstance(item, bytes) for item in value):
        raise _bad(name, "must be an array of binary values")
    return list(value)


def as_aad(name: str, value: Any) -> bytes | list[bytes]:
    """A single aad, or (batch calls) one aad per item."""
    if isinstance(value, bytes):
        return value
    return as_bin_list(name, value)


# Labels are small metadata; bound them so metadata stays metadata.
MAX_LABELS = 64
MAX_LABEL_LEN = 256


def as_labels(name: str, value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise _bad(name, "must be a map of strings to strings")
    if len(value) > MAX_LABELS:
        raise _bad(name, f"at most {MAX_LABELS} labels")
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, str) or not k:
            raise _bad(name, "must be a map of strings to strings")
        if len(k) > MAX_LABEL_LEN or len(v) > MAX_LABEL_LEN:
            raise _bad(name, f"labels are at most {MAX_LABEL_LEN} characters")
    return dict(value)


@dataclass(frozen=True, slots=True)
class Field:
    check: Check
    required: bool = False
    default: Any = MISSING


Spec = Mapping[str, Field]


def parse(spec: Spec, params: Mapping[str, Any]) -> dict[str, Any]:
    """Check ``params`` against ``spec``; absent optional fields get their default.

    Raises:
        InvalidArgument: unknown, missing or malformed field.
    """
    unknown = [name for name in params if name not in spec]
    if unknown:
        shown = ", ".join(sorted(str(name) for name in unknown))
        raise InvalidArgument(f"unknown field(s): {shown}", {"field": str(unknown[0])})
    out: dict[str, Any] = {}
    for name, field in spec.items():
        value = params.get(name)
        if value is None:
            if field.required:
                raise _bad(name, "is required")
            if field.default is not MISSING:
                out[name] = field.default
            continue
        out[name] = field.check(name, value)
    return out
