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


@dataclass(frozen=True, slots=True)
class KeyEvent:
    name: str
    event: EventKind
    version: int
    ts: int
    state: str

    def to_wire(self) -> dict[str, Any]:
        """The payload of a ``key.event`` notification."""
        return {
            "name": self.name,
            "event": self.event.value,
            "version": self.version,
            "ts": self.ts,
            "state": self.state,
        }
