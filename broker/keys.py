"""Key and version value types, and the rules for names and types.

Pure values, no I/O. A :class:`Key` is immutable: every change makes a new
one (see broker.lifecycle), which the store writes in one transaction with
an optimistic revision check.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from .errors import InvalidArgument

__all__ = [
    "HSM",
    "NAME_PATTERN",
    "SOFTWARE",
    "Classification",
    "Key",
    "KeyState",
    "KeyType",
    "Version",
    "VersionRef",
    "VersionState",
    "check_name",
]

SOFTWARE = "software"
HSM = "hsm"

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._/-]{0,127}")


class KeyType(StrEnum):
    AES256_GCM = "aes256-gcm"
    HMAC_SHA256 = "hmac-sha256"
    ED25519 = "ed25519"
    ECDSA_P256 = "ecdsa-p256"
    RSA_3072 = "rsa-3072"

    @property
    def symmetric(self) -> bool:
        return self in (KeyType.AES256_GCM, KeyType.HMAC_SHA256)

    @property
    def signing(self) -> bool:
        return not self.symmetric


class Classification(StrEnum):
    PUBLIC = "public"
    INTERNAL = "internal"
    CONFIDENTIAL = "confidential"
    CRITICAL = "critical"


class KeyState(StrEnum):
    PRE_ACTIVE = "pre_active"
    ACTIVE = "active"
    DEACTIVATED = "deactivated"
    DISABLED = "disabled"
    COMPROMISED = "compromised"
    DESTROY_PENDING = "destroy_pending"
    DESTROYED = "destroyed"


class VersionState(StrEnum):
    ACTIVE = "active"
    COMPROMISED = "compromised"
    DESTROYED = "destroyed"


def check_name(name: object) -> str:
    """Return ``name`` if it is a valid key name, else raise InvalidArgument."""
    if not isinstance(name, str) or NAME_PATTERN.fullmatch(name) is None:
        raise InvalidArgument(
            "key name must be 1-128 characters of [a-z0-9._/-] starting with a letter or digit",
            {"field": "name"},
        )
    return name


@dataclass(frozen=True, slots=True)
class Version:
    """One version of a key.

    ``material`` is opaque to the core: the backend's blob (key material
    wrapped under the root key, or a token object reference). It is empty
    once the version is destroyed. ``uses`` counts items sealed, signed or
    MACed; after a crash it is the reserved upper bound (the safe side).
    ``origin`` says where the material came from (``key.import`` makes
    "external" versions).
    """

    number: int
    state: VersionState
    created_at: int
    uses: int = 0
    material: bytes = field(default=b"", repr=False)
    # "broker" for material generated here, "external" for imported material.
    origin: str = "broker"


@dataclass(frozen=True, slots=True)
class Key:
    id: bytes
    name: str
    type: KeyType
    protection: str
    classification: Classification
    state: KeyState
    versions: tuple[Version, ...]
    primary_version: int
    min_decrypt_version: int
    created_at: int
    updated_at: int
    rotation_period_s: int = 0
    # None: the type's safe default (see broker.lifecycle.use_limit).
    max_uses_per_version: int | None = None
    exportable: bool = False
    labels: Mapping[str, str] = field(default_factory=dict)
    destroy_at: int | None = None
    # The state to go back to on cancel_destroy.
    prior_state: KeyState | None = None
    activate_at: int | None = None
    deactivate_at: int | None = None
    origin: str = "broker"
    # Bumped by every change; the store refuses a write based on a stale one.
    revision: int = 1

    def version(self, number: int) -> Version | None:
        """The version numbered ``number``, or None."""
        if 1 <= number <= len(self.versions):
            found = self.versions[number - 1]
            if found.number == number:
                return found
        return next((v for v in self.versions if v.number == number), None)

    @property
    def primary(self) -> Version:
        found = self.version(self.primary_version)
        assert found is not None, "a key always has its primary version"
        return found

    def ref(self, number: int) -> VersionRef:
        """The backend's handle on one version of this key."""
        version = self.version(number)
        assert version is not None
        return VersionRef(key_id=self.id, version=number, key_type=self.type, material=version.material)


@dataclass(frozen=True, slots=True)
class VersionRef:
    """What a backend needs to use one key version."""

    key_id: bytes
    version: int
    key_type: KeyType
    material: bytes = field(repr=False)
