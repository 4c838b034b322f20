"""One error hierarchy, mapped onto the wire protocol's error codes.

Every error the broker reports to a client is a :class:`BrokerError` whose
``code`` is one of the codes in docs/protocol.md's table. Messages are written for
the caller and never carry key material, plaintext or ciphertext.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any, ClassVar

__all__ = [
    "AlreadyExists",
    "ApprovalRequired",
    "BrokerError",
    "DecryptionFailed",
    "Internal",
    "InvalidArgument",
    "InvalidRequest",
    "InvalidState",
    "LimitExceeded",
    "NotFound",
    "PermissionDenied",
    "StaleRevision",
    "StartupError",
    "Unavailable",
    "UnknownMethod",
    "error_for_code",
    "leaves",
]


class BrokerError(Exception):
    """Base of every error that maps onto a protocol error code."""

    code: ClassVar[str] = "internal"

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = dict(details or {})

    def to_wire(self) -> dict[str, Any]:
        """The ``error`` map of a MessagePack-RPC response."""
        wire: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            wire["details"] = self.details
        return wire

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class InvalidRequest(BrokerError):
    """The frame is not ``[0, uint32, str, [map]]``."""

    code = "invalid_request"


class UnknownMethod(BrokerError):
    """No method of that name."""

    code = "unknown_method"


class InvalidArgument(BrokerError, ValueError):
    """A parameter is missing, unknown, mistyped, out of range or malformed."""

    code = "invalid_argument"


class PermissionDenied(BrokerError):
    """Policy refuses this principal this operation on this key."""

    code = "permission_denied"


class NotFound(BrokerError):
    """No such key or version."""

    code = "not_found"


class AlreadyExists(BrokerError):
    """The key name is taken."""

    code = "already_exists"


class InvalidState(BrokerError):
    """The key's or version's state forbids the operation."""

    code = "invalid_state"


class DecryptionFailed(BrokerError):
    """Tag or aad mismatch, unknown envelope format or truncated ciphertext.

    Deliberately opaque: it never says which check failed.
    """

    code = "decryption_failed"

    def __init__(self, message: str = "decryption failed", details: dict[str, Any] | None = None) -> None:
        super().__init__(message, details)


class LimitExceeded(BrokerError):
    """A request or batch is over a configured limit."""

    code = "limit_exceeded"


class ApprovalRequired(BrokerError):
    """The operation needs more approvals; ``details`` holds ``request_id``."""

    code = "approval_required"


class Unavailable(BrokerError):
    """A backend (HSM, database, disk) cannot serve now; retry later."""

    code = "unavailable"


class Internal(BrokerError):
    """A bug. The message carries a correlation id, never a secret."""

    code = "internal"

    def __init__(self, message: str = "internal error", details: dict[str, Any] | None = None) -> None:
        self.correlation_id = uuid.uuid4().hex
        super().__init__(f"{message} (correlation id {self.correlation_id})", details)


_BY_CODE: dict[str, type[BrokerError]] = {
    cls.code: cls
    for cls in (
        InvalidRequest,
        UnknownMethod,
        InvalidArgument,
        PermissionDenied,
        NotFound,
        AlreadyExists,
        InvalidState,
        DecryptionFailed,
        LimitExceeded,
        ApprovalRequired,
        Unavailable,
        Internal,
    )
}


def error_for_code(code: str) -> type[BrokerError]:
    """The error class for a wire code; unknown codes map to :class:`BrokerError`."""
    return _BY_CODE.get(code, BrokerError)


def leaves(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` itself, or every exception inside it when it is a (nested) group.

    trio's nurseries wrap what a body raises in exception groups; command
    lines look inside them to report a :class:`BrokerError` in one line.
    """
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from leaves(inner)
    else:
        yield exc


class StaleRevision(Unavailable):
    """A store refused a write based on a stale key revision.

    The service re-reads and retries; a client sees ``unavailable`` only if
    the retries run out.
    """


class StartupError(InvalidArgument):
    """The configured plugins do not add up to a working broker.

    No plugin provides the configured store or root of trust, two plugins
    claim the same protection or RPC method, or there is not exactly one
    primary audit sink. Raised while the broker opens, never to a client.
    """
