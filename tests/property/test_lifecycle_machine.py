"""A model-based test: random lifecycle and crypto calls against a real
in-process broker (SQLite store, software keys, audit) and a small
independent model of what docs/protocol.md says must happen."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, precondition, rule

from broker.audit import verify_audit_dir
from broker.errors import BrokerError
from tests._broker_thread import BrokerThread

NAMES = st.sampled_from(["a", "b/c", "d.e"])

# The model's own reading of docs/design.md's diagram (deliberately not imported
# from broker.lifecycle, so a mistake in one shows up against the other).
ARROWS: dict[str, tuple[set[str], str | None]] = {
    "key.activate": ({"pre_active"}, "active"),
    "key.deactivate": ({"active"}, "deactivated"),
    "key.disable": ({"active"}, "disabled"),
    "key.enable": ({"disabled"}, "active"),
    "key.compromise": (
        {"pre_active", "active", "deactivated", "disabled", "destroy_pending"}, "compromised"),
    "key.schedule_destroy": (
        {"pre_active", "active", "deactivated", "disabled", "compromised"}, "destroy_pending"),
    "key.cancel_destroy": ({"destroy_pending"}, None),
}


@dataclass
class ModelKey:
    state: str
    versions: dict[int, str] = field(default_factory=lambda: {1: "active"})
    primary: int = 1
    min_decrypt: int = 1
    prior: str | None = None


@dataclass(frozen=True)
class Sealed:
    name: str
    version: int
    ciphertext: bytes
    plaintext: bytes
    aad: bytes


class LifecycleMachine(RuleBasedStateMachine):
    sealed = Bundle("sealed")

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="kb-sm-", dir="/tmp"))
        self.kb = BrokerThread.at(self.dir / "data")
        self.model: dict[str, ModelKey] = {}

    def teardown(self) -> None:
        self.kb.close()
        result = verify_audit_dir(self.dir / "data" / "audit")
        shutil.rmtree(self.dir, ignore_errors=True)
        assert result.ok, result.reason

    def expect(self, ok: bool, code: str, method: str, **params: object) -> object:
        try:
            result = self.kb.call(method, **params)
        except BrokerError as exc:
            assert not ok, f"{method} failed with {exc.code}: {exc.message}"
            assert exc.code == code, f"{method}: expected {code}, got {exc.code}: {exc.message}"
            return None
        assert ok, f"{method} succeeded; expected {code}"
        return result

    @rule(name=NAMES, activate=st.booleans())
    def create(self, name: str, activate: bool) -> None:
        exists = name in self.model
        self.expect(not exists, "already_exists", "key.create", name=name, type="aes256-gcm",
                    activate=activate)
        if not exists:
            self.model[name] = ModelKey("active" if activate else "pre_active")

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def rotate(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.model)))
        key = self.model[name]
        ok = key.state in ("active", "pre_active")
        self.expect(ok, "invalid_state", "key.rotate", name=name)
        if ok:
            key.primary += 1
            key.versions[key.primary] = "active"

    @precondition(lambda self: self.model)
    @rule(data=st.data(), method=st.sampled_from(sorted(ARROWS)))
    def lifecycle(self, data: st.DataObject, method: str) -> None:
        if method == "key.compromise" and data.draw(st.integers(0, 3)):
            return
        name = data.draw(st.sampled_from(sorted(self.model)))
        key = self.model[name]
        sources, target = ARROWS[method]
        ok = key.state in sources
        params: dict[str, object] = {"name": name}
        if method == "key.schedule_destroy":
            params["pending_days"] = data.draw(st.integers(7, 30))
        self.expect(ok, "invalid_state", method, **params)
        if not ok:
            return
        if method == "key.schedule_destroy":
            key.prior = key.state
        if target is None:
            target, key.prior = key.prior or "active", None
        key.state = target

    @precondition(lambda self: self.model)
    @rule(data=st.data(), often=st.integers(0, 3))
    def compromise_version(self, data: st.DataObject, often: int) -> None:
        # Compromise ends most of a key's life; keep it rarer than the rest.
        if often:
            return
        name = data.draw(st.sampled_from(sorted(self.model)))
        key = self.model[name]
        version = data.draw(st.integers(1, key.primary + 1))
        if version not in key.versions:
            self.expect(False, "not_found", "key.compromise", name=name, version=version)
            return
        ok = key.versions[version] == "active"
        self.expect(ok, "invalid_state", "key.compromise", name=name, version=version)
        if ok:
            key.versions[version] = "compromised"

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def set_min_decrypt(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.model)))
        key = self.model[name]
        value = data.draw(st.integers(1, key.primary))
        self.expect(True, "", "key.update", name=name, min_decrypt_version=value)
        key.min_decrypt = value

    @precondition(lambda self: self.model)
    @rule(target=sealed, data=st.data(), plaintext=st.binary(max_size=64), aad=st.binary(max_size=8))
    def encrypt(self, data: st.DataObject, plaintext: bytes, aad: bytes) -> Sealed | None:
        name = data.draw(st.sampled_from(sorted(self.model)))
        key = self.model[name]
        ok = key.state == "active" and key.versions[key.primary] == "active"
        result = self.expect(ok, "invalid_state", "encrypt", key=name, plaintext=plaintext, aad=aad)
        if result is None:
            return None
        assert isinstance(result, dict)
        assert result["version"] == key.primary
        return Sealed(name, key.primary, result["ciphertext"], plaintext, aad)

    @rule(item=sealed, allow=st.booleans(), wrong_aad=st.booleans())
    def decrypt(self, item: Sealed | None, allow: bool, wrong_aad: bool) -> None:
        if item is None:
            return
        key = self.model[item.name]
        compromised = key.state == "compromised" or key.versions[item.version] == "compromised"
        ok = (
            key.state in ("active", "deactivated", "compromised")
            and item.version >= key.min_decrypt
            and (allow or not compromised)
        )
        aad = item.aad + b"x" if wrong_aad else item.aad
        code = "invalid_state" if not ok else "decryption_failed"
        result = self.expect(ok and not wrong_aad, code, "decrypt", ciphertext=item.ciphertext, aad=aad,
                             allow_compromised=allow)
        if result is not None:
            assert isinstance(result, dict)
            assert result == {"plaintext": item.plaintext, "key": item.name, "version": item.version}

    @invariant()
    def metadata_matches(self) -> None:
        for name, key in self.model.items():
            meta = self.kb.call("key.get", name=name)
            assert meta["state"] == key.state
            # A destruction is pending exactly while the key is destroy_pending.
            assert (meta["destroy_at"] is not None) == (key.state == "destroy_pending")
            assert meta["primary_version"] == key.primary
            assert meta["min_decrypt_version"] == key.min_decrypt
            assert {v["version"]: v["state"] for v in meta["versions"]} == key.versions


TestLifecycleMachine = LifecycleMachine.TestCase
TestLifecycleMachine.settings = settings(max_examples=40, stateful_step_count=40, deadline=None)
