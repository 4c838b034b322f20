"""The lifecycle tables and transitions, state by state."""

from __future__ import annotations

from dataclasses import replace

import pytest

from broker.errors import InvalidArgument, InvalidState, NotFound
from broker.keys import Classification, Key, KeyState, KeyType, VersionState
from broker.lifecycle import (
    AES_GCM_DEFAULT_MAX_USES,
    MAX_VERSION,
    TRANSITIONS,
    Transition,
    Usage,
    add_version,
    check_operation,
    check_use,
    compromise,
    new_key,
    next_rotation_at,
    to_metadata,
    transition,
    update_settings,
    use_limit,
)

NOW = 1_800_000_000
DAY = 86_400


def make(key_type: KeyType = KeyType.AES256_GCM, **kw: object) -> Key:
    return new_key(
        key_id=b"\x01" * 16,
        name="app/k",
        key_type=key_type,
        protection="software",
        classification=Classification.INTERNAL,
        material=b"blob",
        now=NOW,
        **kw,  # type: ignore[arg-type]
    )


def in_state(state: KeyState) -> Key:
    """A key brought to ``state`` through legal transitions only."""
    key = make(activate=state is not KeyState.PRE_ACTIVE)
    path = {
        KeyState.PRE_ACTIVE: [],
        KeyState.ACTIVE: [],
        KeyState.DEACTIVATED: [Transition.DEACTIVATE],
        KeyState.DISABLED: [Transition.DISABLE],
        KeyState.COMPROMISED: [Transition.COMPROMISE],
        KeyState.DESTROY_PENDING: [Transition.SCHEDULE_DESTROY],
        KeyState.DESTROYED: [Transition.SCHEDULE_DESTROY, Transition.DESTROY],
    }[state]
    for call in path:
        # Destruction comes once the (default, 30-day) grace period is over.
        key = transition(key, call, NOW + 30 * DAY if call is Transition.DESTROY else NOW)
    assert key.state is state
    return key


@pytest.mark.parametrize("state", list(KeyState))
@pytest.mark.parametrize("call", [t for t in Transition if t is not Transition.ROTATE])
def test_every_transition_follows_the_table(state: KeyState, call: Transition) -> None:
    key = in_state(state)
    sources, target = TRANSITIONS[call]
    # Past any grace period in_state began; a cancellation or compromise comes within it.
    within = call in (Transition.CANCEL_DESTROY, Transition.COMPROMISE)
    later = NOW + 1 if within else NOW + 31 * DAY
    if state not in sources:
        with pytest.raises(InvalidState):
            transition(key, call, later)
        return
    after = transition(key, call, later)
    assert after.revision == key.revision + 1
    if target is not None:
        assert after.state is target
    else:
        assert call is Transition.CANCEL_DESTROY


def test_the_target_state_itself_is_invalid_state() -> None:
    for call, (sources, target) in TRANSITIONS.items():
        if target is not None:
            assert target not in sources, call


def test_cancel_destroy_returns_to_the_state_before() -> None:
    for state in (KeyState.ACTIVE, KeyState.DEACTIVATED, KeyState.DISABLED, KeyState.PRE_ACTIVE):
        pending = transition(in_state(state), Transition.SCHEDULE_DESTROY, NOW, pending_days=7)
        assert pending.destroy_at == NOW + 7 * 86_400
        back = transition(pending, Transition.CANCEL_DESTROY, NOW + 5)
        assert back.state is state
        assert back.destroy_at is None
        # Once the grace period is over, the destruction is under way: no
        # other change of state may race it.
        for call in (Transition.CANCEL_DESTROY, Transition.COMPROMISE):
            with pytest.raises(InvalidState, match="grace period is over"):
                transition(pending, call, NOW + 7 * 86_400)
        assert transition(pending, Transition.COMPROMISE, NOW + 5).state is KeyState.COMPROMISED


@pytest.mark.parametrize("days", [0, 6, 31, -1])
def test_pending_days_out_of_range(days: int) -> None:
    with pytest.raises(InvalidArgument):
        transition(make(), Transition.SCHEDULE_DESTROY, NOW, pending_days=days)


def test_a_key_at_the_highest_version_number_cannot_rotate() -> None:
    last = add_version(make(), b"m", NOW)
    last = replace(last, versions=(*last.versions[:-1], replace(last.versions[-1], number=MAX_VERSION)),
                   primary_version=MAX_VERSION)
    with pytest.raises(InvalidState, match="highest"):
        add_version(last, b"m", NOW)


def test_destroy_drops_material_and_keeps_metadata() -> None:
    key = add_version(make(), b"blob2", NOW + 10)
    pending = transition(key, Transition.SCHEDULE_DESTROY, NOW, pending_days=7)
    with pytest.raises(InvalidState, match="grace period"):
        transition(pending, Transition.DESTROY, NOW + 7 * DAY - 1)
    gone = transition(pending, Transition.DESTROY, NOW + 7 * DAY)
    assert gone.state is KeyState.DESTROYED
    assert all(v.state is VersionState.DESTROYED and v.material == b"" for v in gone.versions)
    assert gone.name == key.name and len(gone.versions) == 2


@pytest.mark.parametrize("state", list(KeyState))
def test_usage_table(state: KeyState) -> None:
    key = in_state(state)
    protect_ok = state is KeyState.ACTIVE
    process_ok = state in (KeyState.ACTIVE, KeyState.DEACTIVATED)
    if protect_ok:
        assert check_use(key, Usage.PROTECT).version.number == 1
    else:
        with pytest.raises(InvalidState):
            check_use(key, Usage.PROTECT)
    if process_ok:
        assert check_use(key, Usage.PROCESS, 1).alarm is False
    elif state is KeyState.COMPROMISED:
        with pytest.raises(InvalidState):
            check_use(key, Usage.PROCESS, 1)
        assert check_use(key, Usage.PROCESS, 1, allow_compromised=True).alarm is True
    else:
        with pytest.raises(InvalidState):
            check_use(key, Usage.PROCESS, 1)
    check_use(key, Usage.READ)


def test_compromised_primary_blocks_protect_until_rotation() -> None:
    key = compromise(make(), NOW, version=1)
    assert key.state is KeyState.ACTIVE
    with pytest.raises(InvalidState, match="rotate"):
        check_use(key, Usage.PROTECT)
    with pytest.raises(InvalidState):
        check_use(key, Usage.PROCESS, 1)
    assert check_use(key, Usage.PROCESS, 1, allow_compromised=True).alarm
    rotated = add_version(key, b"new", NOW + 1)
    assert check_use(rotated, Usage.PROTECT).version.number == 2
    with pytest.raises(InvalidState):
        compromise(rotated, NOW, version=1)
    with pytest.raises(NotFound):
        compromise(rotated, NOW, version=9)


def test_rotation_numbers_versions_from_one() -> None:
    key = make()
    for expected in range(2, 6):
        key = add_version(key, b"m", NOW + expected)
        assert key.primary_version == expected
    assert [v.number for v in key.versions] == [1, 2, 3, 4, 5]


def test_rotate_refused_outside_active_and_pre_active() -> None:
    for state in (KeyState.DEACTIVATED, KeyState.DISABLED, KeyState.COMPROMISED,
                  KeyState.DESTROY_PENDING, KeyState.DESTROYED):
        with pytest.raises(InvalidState):
            add_version(in_state(state), b"m", NOW)


def test_min_decrypt_version_bounds() -> None:
    key = add_version(add_version(make(), b"2", NOW), b"3", NOW)
    raised = update_settings(key, NOW, min_decrypt_version=3)
    with pytest.raises(InvalidState):
        check_use(raised, Usage.PROCESS, 2)
    lowered = update_settings(raised, NOW, min_decrypt_version=1)
    assert check_use(lowered, Usage.PROCESS, 1).version.number == 1
    for bad in (0, 4):
        with pytest.raises(InvalidArgument):
            update_settings(key, NOW, min_decrypt_version=bad)


def test_use_limits() -> None:
    assert use_limit(make()) == AES_GCM_DEFAULT_MAX_USES < 2**32
    assert use_limit(make(KeyType.HMAC_SHA256)) is None
    assert use_limit(make(KeyType.HMAC_SHA256, max_uses_per_version=0)) is None
    assert use_limit(make(max_uses_per_version=10)) == 10
    with pytest.raises(InvalidArgument):
        make(max_uses_per_version=0)
    with pytest.raises(InvalidArgument):
        update_settings(make(), NOW, max_uses_per_version=0)


def test_next_rotation_at() -> None:
    assert next_rotation_at(make()) is None
    key = make(rotation_period_s=3600)
    assert next_rotation_at(key) == NOW + 3600
    assert next_rotation_at(add_version(key, b"m", NOW + 100)) == NOW + 100 + 3600
    assert next_rotation_at(transition(key, Transition.DISABLE, NOW)) is None


def test_type_operations() -> None:
    check_operation(make(), "encrypt")
    with pytest.raises(InvalidArgument):
        check_operation(make(), "sign")
    with pytest.raises(InvalidArgument):
        check_operation(make(KeyType.ED25519), "encrypt")
    check_operation(make(KeyType.HMAC_SHA256), "mac")


def test_metadata_shape() -> None:
    meta = to_metadata(add_version(make(labels={"team": "a"}), b"m", NOW + 1), {2: 7})
    assert meta["primary_version"] == 2
    assert [v["uses"] for v in meta["versions"]] == [0, 7]
    assert meta["labels"] == {"team": "a"}
    assert meta["id"] == b"\x01" * 16
    assert "material" not in repr(meta)
    for field in ("name", "id", "type", "protection", "classification", "state", "primary_version",
                  "min_decrypt_version", "versions", "rotation_period_s", "max_uses_per_version",
                  "next_rotation_at", "exportable", "labels", "created_at", "updated_at", "destroy_at"):
        assert field in meta


def test_a_key_deactivates_after_it_activates() -> None:
    with pytest.raises(InvalidArgument, match="after activate_at"):
        make(activate=False, activate_at=NOW + 10, deactivate_at=NOW + 10)
    pending = make(activate=False, activate_at=NOW + 10)
    with pytest.raises(InvalidArgument, match="after activate_at"):
        update_settings(pending, NOW, deactivate_at=NOW + 5)
    with pytest.raises(InvalidArgument, match="after activate_at"):
        update_settings(make(activate=False, deactivate_at=NOW + 20), NOW, activate_at=NOW + 30)
    assert update_settings(pending, NOW, deactivate_at=NOW + 11).deactivate_at == NOW + 11


def test_activate_at_needs_pre_active() -> None:
    pending = make(activate=False)
    assert update_settings(pending, NOW, activate_at=NOW + 10).activate_at == NOW + 10
    with pytest.raises(InvalidState):
        update_settings(make(), NOW, activate_at=NOW + 10)
