"""The key lifecycle state machine (NIST SP 800-57 / KMIP states). Pure logic.

Two tables say everything: :data:`TRANSITIONS` (which lifecycle call moves a
key from which states to which) and :data:`USAGE` (which kinds of use each
state allows). Every function takes the time as a parameter and returns a
new :class:`~broker.keys.Key`; nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, Final

from .errors import InvalidArgument, InvalidState, NotFound
from .keys import Classification, Key, KeyState, KeyType, Version, VersionState

__all__ = [
    "AES_GCM_DEFAULT_MAX_USES",
    "TRANSITIONS",
    "TYPE_OPERATIONS",
    "USAGE",
    "Transition",
    "Usage",
    "UseGrant",
    "add_version",
    "check_operation",
    "check_use",
    "compromise",
    "destroy",
    "new_key",
    "next_rotation_at",
    "to_metadata",
    "transition",
    "update_settings",
    "use_limit",
]

# Random 96-bit nonces bound one AES-GCM key to 2^32 encryptions (NIST SP
# 800-38D §8.3); the default stays a factor of two inside that bound.
AES_GCM_DEFAULT_MAX_USES = 2**31
# The most a key version may seal with random nonces (NIST SP 800-38D, 8.3).
AES_GCM_MAX_USES = 2**32
# Version numbers are unsigned 32-bit (the envelope header's field).
MAX_VERSION: Final = 2**32 - 1
# An imported version may take a number up to here, which leaves 2^31
# rotations after it (a key at MAX_VERSION can no longer rotate).
MAX_IMPORTED_VERSION: Final = 2**31 - 1
DAY = 86_400
MIN_PENDING_DAYS = 7
MAX_PENDING_DAYS = 30


class Usage(StrEnum):
    """Kinds of use a state may allow."""

    PROTECT = "protect"  # encrypt, datakey, sign, mac: make new protected data
    PROCESS = "process"  # decrypt, verify, verify_mac, rewrap's open side
    READ = "read"  # metadata, key.public


class Transition(StrEnum):
    ACTIVATE = "activate"
    DEACTIVATE = "deactivate"
    DISABLE = "disable"
    ENABLE = "enable"
    COMPROMISE = "compromise"
    SCHEDULE_DESTROY = "schedule_destroy"
    CANCEL_DESTROY = "cancel_destroy"
    DESTROY = "destroy"
    ROTATE = "rotate"


_ALL = frozenset(KeyState)
_S = KeyState

# Lifecycle call -> (states it may start from, state it leads to). None as the
# target means "computed": cancel_destroy returns to the state before, and
# rotate leaves the state as it is.
TRANSITIONS: Mapping[Transition, tuple[frozenset[KeyState], KeyState | None]] = {
    Transition.ACTIVATE: (frozenset({_S.PRE_ACTIVE}), _S.ACTIVE),
    Transition.DEACTIVATE: (frozenset({_S.ACTIVE}), _S.DEACTIVATED),
    Transition.DISABLE: (frozenset({_S.ACTIVE}), _S.DISABLED),
    Transition.ENABLE: (frozenset({_S.DISABLED}), _S.ACTIVE),
    Transition.COMPROMISE: (_ALL - {_S.COMPROMISED, _S.DESTROYED}, _S.COMPROMISED),
    Transition.SCHEDULE_DESTROY: (_ALL - {_S.DESTROY_PENDING, _S.DESTROYED}, _S.DESTROY_PENDING),
    Transition.CANCEL_DESTROY: (frozenset({_S.DESTROY_PENDING}), None),
    Transition.DESTROY: (frozenset({_S.DESTROY_PENDING}), _S.DESTROYED),
    Transition.ROTATE: (frozenset({_S.PRE_ACTIVE, _S.ACTIVE}), None),
}

# Key state -> kinds of use it allows. COMPROMISED allows PROCESS only when
# the caller passes allow_compromised (checked in check_use).
USAGE: Mapping[KeyState, frozenset[Usage]] = {
    _S.PRE_ACTIVE: frozenset({Usage.READ}),
    _S.ACTIVE: frozenset({Usage.PROTECT, Usage.PROCESS, Usage.READ}),
    _S.DEACTIVATED: frozenset({Usage.PROCESS, Usage.READ}),
    _S.COMPROMISED: frozenset({Usage.PROCESS, Usage.READ}),
    _S.DISABLED: frozenset({Usage.READ}),
    _S.DESTROY_PENDING: frozenset({Usage.READ}),
    _S.DESTROYED: frozenset({Usage.READ}),
}

# Key type -> the cryptographic operations it supports.
TYPE_OPERATIONS: Mapping[KeyType, frozenset[str]] = {
    KeyType.AES256_GCM: frozenset({"encrypt", "decrypt", "datakey", "rewrap", "export"}),
    KeyType.HMAC_SHA256: frozenset({"mac", "verify_mac", "export"}),
    KeyType.ED25519: frozenset({"sign", "verify", "public", "export"}),
    KeyType.ECDSA_P256: frozenset({"sign", "verify", "public", "export"}),
    KeyType.RSA_3072: frozenset({"sign", "verify", "public", "export"}),
}


@dataclass(frozen=True, slots=True)
class UseGrant:
    """The version a use may go ahead with, and whether it is an alarm."""

    version: Version
    alarm: bool = False


def check_operation(key: Key, operation: str) -> None:
    """Raise InvalidArgument if the key's type does not support ``operation``."""
    if operation not in TYPE_OPERATIONS[key.type]:
        raise InvalidArgument(f"a {key.type.value} key does not support {operation}", {"field": "key"})


def use_limit(key: Key) -> int | None:
    """The effective uses-per-version limit, None for unlimited."""
    if key.max_uses_per_version is None:
        return AES_GCM_DEFAULT_MAX_USES if key.type is KeyType.AES256_GCM else None
    return key.max_uses_per_version or None


def _check_use_limit(key_type: KeyType, max_uses_per_version: int | None) -> None:
    """Random 96-bit nonces bound an AES-GCM key to 2^32 encryptions (NIST SP 800-38D, 8.3):
    no limit (0), or a limit past that, is refused for aes256-gcm."""
    if key_type is not KeyType.AES256_GCM or max_uses_per_version is None:
        return
    if not 0 < max_uses_per_version <= AES_GCM_MAX_USES:
        raise InvalidArgument(
            "max_uses_per_version must be 1 to 2^32 for aes256-gcm (random nonces bound a key "
            "to 2^32 encryptions); 0, no limit, is refused",
            {"field": "max_uses_per_version"},
        )


def check_use(
    key: Key, usage: Usage, version: int | None = None, *, allow_compromised: bool = False
) -> UseGrant:
    """Decide whether ``key`` may be used as ``usage`` now.

    Args:
        key: the key.
        usage: PROTECT uses the primary version; PROCESS uses ``version``.
        version: for PROCESS, the version named by the envelope or caller.
        allow_compromised: the caller accepts processing under a
            compromised key or version (audited as an alarm).

    Returns:
        The version to use and whether the use is an alarm.

    Raises:
        InvalidState: the key's or version's state forbids the use.
        NotFound: no such version.
    """
    if usage not in USAGE[key.state]:
        raise InvalidState(f"key {key.name!r} is {key.state.value}: {usage.value} not allowed")
    if usage is Usage.READ:
        return UseGrant(key.primary)
    if usage is Usage.PROTECT:
        primary = key.primary
        if primary.state is not VersionState.ACTIVE:
            raise InvalidState(
                f"key {key.name!r}: primary version {primary.number} is {primary.state.value}; rotate the key"
            )
        return UseGrant(primary)
    number = key.primary_version if version is None else version
    found = key.version(number)
    if found is None:
        raise NotFound(f"key {key.name!r} has no version {number}")
    if found.state is VersionState.DESTROYED:
        raise InvalidState(f"key {key.name!r}: version {number} is destroyed")
    if number < key.min_decrypt_version:
        raise InvalidState(
            f"key {key.name!r}: version {number} is below min_decrypt_version {key.min_decrypt_version}"
        )
    compromised = key.state is KeyState.COMPROMISED or found.state is VersionState.COMPROMISED
    if compromised and not allow_compromised:
        raise InvalidState(
            f"key {key.name!r}: version {number} is compromised; pass allow_compromised to use it"
        )
    return UseGrant(found, alarm=compromised)


def _check_from(key: Key, call: Transition) -> KeyState | None:
    sources, target = TRANSITIONS[call]
    if key.state not in sources:
        raise InvalidState(f"key {key.name!r} is {key.state.value}: cannot {call.value}")
    return target


def new_key(
    *,
    key_id: bytes,
    name: str,
    key_type: KeyType,
    protection: str,
    classification: Classification,
    material: bytes,
    now: int,
    activate: bool = True,
    rotation_period_s: int = 0,
    max_uses_per_version: int | None = None,
    exportable: bool = False,
    labels: Mapping[str, str] | None = None,
    activate_at: int | None = None,
    deactivate_at: int | None = None,
    origin: str = "broker",
) -> Key:
    """A new key with version 1 holding ``material``."""
    _check_use_limit(key_type, max_uses_per_version)
    _check_window(activate_at, deactivate_at)
    return Key(
        id=key_id,
        name=name,
        type=key_type,
        protection=protection,
        classification=classification,
        state=KeyState.ACTIVE if activate else KeyState.PRE_ACTIVE,
        versions=(Version(1, VersionState.ACTIVE, now, 0, material),),
        primary_version=1,
        min_decrypt_version=1,
        created_at=now,
        updated_at=now,
        rotation_period_s=rotation_period_s,
        max_uses_per_version=max_uses_per_version,
        exportable=exportable,
        labels=dict(labels or {}),
        activate_at=activate_at,
        deactivate_at=deactivate_at,
        origin=origin,
    )


def _changed(key: Key, now: int, **changes: Any) -> Key:
    return replace(key, updated_at=max(now, key.updated_at), revision=key.revision + 1, **changes)


def transition(key: Key, call: Transition, now: int, *, pending_days: int | None = None) -> Key:
    """Apply a whole-key lifecycle call (not ROTATE; see :func:`add_version`).

    Raises:
        InvalidState: the diagram has no such arrow from the key's state.
        InvalidArgument: ``pending_days`` out of 7..30.
    """
    if call is Transition.ROTATE:
        raise ValueError("use add_version to rotate")
    target = _check_from(key, call)
    if call is Transition.COMPROMISE and _grace_over(key, now):
        # As for cancel_destroy: once the grace period is over, only the
        # destruction may change the key's state, so that no change racing it
        # (from another broker) can leave a key whose material is gone.
        raise InvalidState(f"key {key.name!r}: its grace period is over; it is being destroyed")
    if call is Transition.SCHEDULE_DESTROY:
        days = 30 if pending_days is None else pending_days
        if not MIN_PENDING_DAYS <= days <= MAX_PENDING_DAYS:
            raise InvalidArgument(
                f"pending_days must be {MIN_PENDING_DAYS}-{MAX_PENDING_DAYS}", {"field": "pending_days"}
            )
        return _changed(key, now, state=target, prior_state=key.state, destroy_at=now + days * DAY)
    if call is Transition.CANCEL_DESTROY:
        if _grace_over(key, now):
            # Its material may already be gone (destruction is not one step
            # on an HSM): bringing the key back could only bring back a husk.
            raise InvalidState(f"key {key.name!r}: its grace period is over; it is being destroyed")
        back = key.prior_state or KeyState.ACTIVE
        return _changed(key, now, state=back, prior_state=None, destroy_at=None)
    if call is Transition.DESTROY:
        return destroy(key, now)
    assert target is not None
    extra: dict[str, Any] = {}
    if call is Transition.ACTIVATE:
        extra["activate_at"] = None
    elif call is Transition.DEACTIVATE:
        extra["deactivate_at"] = None
    elif call is Transition.COMPROMISE:
        # Out of destroy_pending, nothing is pending any more: the grace
        # period's end destroys only destroy_pending keys, and cancel_destroy
        # has no arrow from compromised. schedule_destroy starts a new one.
        extra.update(destroy_at=None, prior_state=None)
    return _changed(key, now, state=target, **extra)


def _grace_over(key: Key, now: int) -> bool:
    return key.state is KeyState.DESTROY_PENDING and key.destroy_at is not None and key.destroy_at <= now


def destroy(key: Key, now: int) -> Key:
    """Every version destroyed and its material dropped; metadata kept."""
    if key.state is not KeyState.DESTROY_PENDING:
        raise InvalidState(f"key {key.name!r} is {key.state.value}: cannot destroy")
    if not _grace_over(key, now):
        raise InvalidState(f"key {key.name!r}: its grace period is not over")
    versions = tuple(replace(v, state=VersionState.DESTROYED, material=b"") for v in key.versions)
    return _changed(key, now, state=KeyState.DESTROYED, versions=versions, prior_state=None)


def compromise(key: Key, now: int, version: int | None = None) -> Key:
    """Mark the whole key (no version) or one version compromised."""
    if version is None:
        return transition(key, Transition.COMPROMISE, now)
    if key.state is KeyState.DESTROYED:
        raise InvalidState(f"key {key.name!r} is destroyed")
    found = key.version(version)
    if found is None:
        raise NotFound(f"key {key.name!r} has no version {version}")
    if found.state is not VersionState.ACTIVE:
        raise InvalidState(f"key {key.name!r}: version {version} is already {found.state.value}")
    versions = tuple(
        replace(v, state=VersionState.COMPROMISED) if v.number == version else v for v in key.versions
    )
    return _changed(key, now, versions=versions)


def add_version(key: Key, material: bytes, now: int) -> Key:
    """Rotate: a new primary version holding ``material``."""
    _check_from(key, Transition.ROTATE)
    number = max(v.number for v in key.versions) + 1
    if number > MAX_VERSION:
        raise InvalidState(f"key {key.name!r} is at version {MAX_VERSION}, the highest; it cannot rotate")
    versions = (*key.versions, Version(number, VersionState.ACTIVE, now, 0, material))
    return _changed(key, now, versions=versions, primary_version=number)


def update_settings(
    key: Key,
    now: int,
    *,
    rotation_period_s: int | None = None,
    max_uses_per_version: int | None = None,
    min_decrypt_version: int | None = None,
    labels: Mapping[str, str] | None = None,
    activate_at: int | None = None,
    deactivate_at: int | None = None,
) -> Key:
    """Change settings; None leaves a setting as it is. ``labels`` replaces the map."""
    if key.state is KeyState.DESTROYED:
        raise InvalidState(f"key {key.name!r} is destroyed")
    changes: dict[str, Any] = {}
    if rotation_period_s is not None:
        changes["rotation_period_s"] = rotation_period_s
    if max_uses_per_version is not None:
        _check_use_limit(key.type, max_uses_per_version)
        changes["max_uses_per_version"] = max_uses_per_version
    if min_decrypt_version is not None:
        if not 1 <= min_decrypt_version <= key.primary_version:
            raise InvalidArgument(
                f"min_decrypt_version must be between 1 and {key.primary_version}",
                {"field": "min_decrypt_version"},
            )
        below = [v for v in key.versions if min_decrypt_version <= v.number < key.min_decrypt_version]
        if any(v.state is VersionState.DESTROYED for v in below):
            raise InvalidState("min_decrypt_version cannot be lowered below a destroyed version")
        changes["min_decrypt_version"] = min_decrypt_version
    if labels is not None:
        changes["labels"] = dict(labels)
    if activate_at is not None:
        if key.state is not KeyState.PRE_ACTIVE:
            raise InvalidState(f"key {key.name!r} is {key.state.value}: activate_at needs pre_active")
        changes["activate_at"] = activate_at
    if deactivate_at is not None:
        changes["deactivate_at"] = deactivate_at
    window = changes.get("activate_at", key.activate_at), changes.get("deactivate_at", key.deactivate_at)
    _check_window(*window)
    return _changed(key, now, **changes)


def _check_window(activate_at: int | None, deactivate_at: int | None) -> None:
    """A key set to deactivate must do so after it activates (a window that ends
    before it opens is a typo that would leave the key never usable)."""
    if activate_at is not None and deactivate_at is not None and deactivate_at <= activate_at:
        raise InvalidArgument(
            f"deactivate_at ({deactivate_at}) must come after activate_at ({activate_at})",
            {"field": "deactivate_at"},
        )


def next_rotation_at(key: Key) -> int | None:
    """Primary's created_at + rotation period; None when no period or not active."""
    if key.rotation_period_s <= 0 or key.state is not KeyState.ACTIVE:
        return None
    return key.primary.created_at + key.rotation_period_s


def to_metadata(key: Key, uses: Mapping[int, int] | None = None) -> dict[str, Any]:
    """The wire form of a key (docs/protocol.md "Key metadata").

    Args:
        key: the key.
        uses: live per-version use counts that override the stored ones.
    """
    live = uses or {}
    limit = use_limit(key)
    return {
        "name": key.name,
        "id": key.id,
        "type": key.type.value,
        "protection": key.protection,
        "classification": key.classification.value,
        "state": key.state.value,
        "primary_version": key.primary_version,
        "min_decrypt_version": key.min_decrypt_version,
        "versions": [
            {
                "version": v.number,
                "state": v.state.value,
                "created_at": v.created_at,
                "uses": live.get(v.number, v.uses),
                "origin": v.origin,
            }
            for v in key.versions
        ],
        "rotation_period_s": key.rotation_period_s,
        "max_uses_per_version": limit or 0,
        "next_rotation_at": next_rotation_at(key),
        "exportable": key.exportable,
        "labels": dict(key.labels),
        "created_at": key.created_at,
        "updated_at": key.updated_at,
        "destroy_at": key.destroy_at,
        "activate_at": key.activate_at,
        "deactivate_at": key.deactivate_at,
        "origin": key.origin,
    }
