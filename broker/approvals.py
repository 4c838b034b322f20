"""Pending approval requests: multi-person control over sensitive actions.

A governed action (say, destroying a critical key) is not run when asked:
it becomes a request that distinct principals approve. The requester's own
approval does not count, one principal counts once, and a request lapses
after its time to live. Requests live in this broker's memory: a restart
forgets them, which errs on the side of asking again.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import NotFound, PermissionDenied

__all__ = ["ApprovalRequest", "Approvals"]


@dataclass(slots=True)
class ApprovalRequest:
    id: str
    op: str
    key: str
    params: Mapping[str, Any]
    requester: str
    required: int
    expires_at: float
    approvers: set[str] = field(default_factory=set)

    @property
    def done(self) -> bool:
        return len(self.approvers) >= self.required

    def summary(self) -> dict[str, Any]:
        return {"approvals": len(self.approvers), "required": self.required, "done": self.done}

    def describe(self) -> dict[str, Any]:
        """What is being approved, for the approver to check."""
        return {
            "key": self.key,
            "op": self.op,
            "requester": self.requester,
            "params": dict(self.params),
            "expires_at": int(self.expires_at),
        }


class Approvals:
    """The pending requests of one broker."""

    def __init__(self, clock: Callable[[], float], ttl_s: float) -> None:
        self._clock = clock
        self._ttl = ttl_s
        self._pending: dict[str, ApprovalRequest] = {}

    def _expire(self) -> None:
        now = self._clock()
        for request_id in [r.id for r in self._pending.values() if r.expires_at <= now]:
            del self._pending[request_id]

    def request(
        self, *, op: str, key: str, params: Mapping[str, Any], requester: str, required: int
    ) -> ApprovalRequest:
        """A pending request for this action (the same one if already asked and not lapsed)."""
        self._expire()
        for pending in self._pending.values():
            if (pending.op, pending.key, pending.requester, dict(pending.params)) == (
                op,
                key,
                requester,
                dict(params),
            ):
                return pending
        request = ApprovalRequest(
            id=secrets.token_hex(16),
            op=op,
            key=key,
            params=dict(params),
            requester=requester,
            required=required,
            expires_at=self._clock() + self._ttl,
        )
        self._pending[request.id] = request
        return request

    def get(self, request_id: str) -> ApprovalRequest:
        """The pending request ``request_id``.

        Raises:
            NotFound: unknown, already done, or lapsed.
        """
        self._expire()
        request = self._pending.get(request_id)
        if request is None:
            raise NotFound("no pending approval request with that id (it may have lapsed)")
        return request

    def approve(self, request_id: str, approver: str) -> ApprovalRequest:
        """Count ``approver``'s approval; a request that is done leaves the pending set.

        Raises:
            NotFound: no such pending request.
            PermissionDenied: the requester approving their own request.
        """
        request = self.get(request_id)
        if approver == request.requester:
            raise PermissionDenied("the requester's own approval does not count")
        request.approvers.add(approver)
        if request.done:
            del self._pending[request_id]
        return request
