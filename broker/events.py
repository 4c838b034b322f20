"""Key events: what happened to a key, fanned out to hooks and subscribers."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

__all__ = ["EventKind", "KeyEvent"]


class EventKind(StrEnum):
    CREATED = "created"
    ROTATED = "rotated"
    STATE_CHANGED = "state_changed"
    UPDATED = "updated"
    DESTROY_SCHEDULED = "destroy_scheduled"
    DESTROY_CANCELLED = "destroy_cancelled"
    DESTROYED = "destroyed"
    COMPROMISED = "compromised"
    # A certificate issued with the key (a CA key) nears its expiry; the
    # event carries the certificate's serial.
    CERTIFICATE_EXPIRING = "certificate_expiring"


@dataclass(frozen=True, slots=True)
class KeyEvent:
    name: str
    event: EventKind
    version: int
    ts: int
    state: str
    # Only for certificate_expiring: the certificate's serial (hex).
    serial: str | None = None

    def to_wire(self) -> dict[str, Any]:
        """The payload of a ``key.event`` notification."""
        wire: dict[str, Any] = {
            "name": self.name,
            "event": self.event.value,
            "version": self.version,
            "ts": self.ts,
            "state": self.state,
        }
        if self.serial is not None:
            wire["serial"] = self.serial
        return wire
